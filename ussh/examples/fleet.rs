//! The README's main command: starts throwaway OpenSSH servers on loopback,
//! names them as many host aliases in a temporary ssh config, and runs the
//! `ussh` binary across them — `exec` (streamed and gathered), `get` and
//! `put` of a tree, and a `put --update` that moves nothing — with progress
//! shown, then prints each step's wall time and client CPU.
//!
//! `cargo run --release -p ussh --example fleet -- --help` for options.

use uring_ssh_testkit::sshd;

use std::fs;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

struct Options {
    servers: usize,
    hosts: usize,
    transfer_hosts: usize,
    files: usize,
    big_mib: usize,
}

fn options() -> Options {
    let mut o = Options {
        servers: 4,
        hosts: 64,
        transfer_hosts: 16,
        files: 500,
        big_mib: 16,
    };
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut num = |name: &str| -> usize {
            args.next()
                .and_then(|v| v.parse().ok())
                .unwrap_or_else(|| panic!("{name} needs a number"))
        };
        match a.as_str() {
            "--servers" => o.servers = num("--servers").max(1),
            "--hosts" => o.hosts = num("--hosts").max(1),
            "--transfer-hosts" => o.transfer_hosts = num("--transfer-hosts").max(1),
            "--files" => o.files = num("--files"),
            "--big-mib" => o.big_mib = num("--big-mib"),
            "--help" | "-h" => {
                println!(
                    "fleet [--servers N] [--hosts N] [--transfer-hosts N] [--files N] [--big-mib M]"
                );
                std::process::exit(0);
            }
            other => {
                eprintln!("unknown option {other} (see --help)");
                std::process::exit(2);
            }
        }
    }
    o.transfer_hosts = o.transfer_hosts.min(o.hosts);
    o
}

/// CPU used by waited-for children so far.
fn children_cpu() -> Duration {
    let mut ru = std::mem::MaybeUninit::<libc::rusage>::zeroed();
    // SAFETY: getrusage fills the struct it is given.
    let rc = unsafe { libc::getrusage(libc::RUSAGE_CHILDREN, ru.as_mut_ptr()) };
    assert_eq!(rc, 0, "getrusage");
    // SAFETY: initialised by the successful call (and zeroed before).
    let ru = unsafe { ru.assume_init() };
    let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

struct Step {
    what: String,
    hosts: usize,
    exit: i32,
    wall: Duration,
    cpu: Duration,
}

fn ussh_binary() -> PathBuf {
    // target/<profile>/examples/fleet -> target/<profile>/ussh
    let exe = std::env::current_exe().expect("current exe");
    let bin = exe
        .parent()
        .and_then(Path::parent)
        .map(|d| d.join("ussh"))
        .expect("target dir");
    assert!(
        bin.exists(),
        "{} not found: build it first (`cargo build --release -p ussh`, as scripts/demo.sh does)",
        bin.display()
    );
    bin
}

fn run(steps: &mut Vec<Step>, config: &Path, what: &str, hosts: usize, args: &[&str]) {
    println!("\n$ ussh {}", args.join(" "));
    let cpu0 = children_cpu();
    let start = Instant::now();
    let status = Command::new(ussh_binary())
        .arg(args[0])
        .arg("-F")
        .arg(config)
        .arg("--no-agent")
        .args(&args[1..])
        .status()
        .expect("run ussh");
    steps.push(Step {
        what: what.to_string(),
        hosts,
        exit: status.code().unwrap_or(-1),
        wall: start.elapsed(),
        cpu: children_cpu() - cpu0,
    });
}

fn main() {
    let o = options();
    println!(
        "Starting {} throwaway sshd processes on 127.0.0.1 for {} host aliases…",
        o.servers, o.hosts
    );
    let servers: Vec<sshd::Sshd> = (0..o.servers).map(|_| sshd::Sshd::start()).collect();
    // Files on tmpfs where there is one: creating thousands of files on a
    // disk file system costs the client more CPU than moving their bytes.
    let shm = Path::new("/dev/shm");
    let mut tmp = tempfile::Builder::new();
    tmp.prefix("ussh-demo-");
    let work = if shm.is_dir() {
        tmp.tempdir_in(shm)
    } else {
        tmp.tempdir()
    }
    .expect("temp dir");
    let w = work.path();

    // One known_hosts for all servers, one alias per "host".
    let kh = w.join("known_hosts");
    let mut known = String::new();
    for s in &servers {
        known.push_str(&fs::read_to_string(s.known_hosts()).expect("known_hosts"));
    }
    fs::write(&kh, known).expect("write known_hosts");
    let width = o.hosts.to_string().len().max(2);
    let mut cfg = String::from("# Written by the ussh demo: every alias is a loopback sshd.\n");
    for i in 1..=o.hosts {
        let s = &servers[(i - 1) % servers.len()];
        cfg.push_str(&format!(
            "Host web{i:0width$}\n    HostName 127.0.0.1\n    Port {}\n    IdentityFile {}\n",
            s.port(),
            s.user_key().display()
        ));
    }
    // A host that is down: nothing listens on its port.
    let down = TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port();
    cfg.push_str(&format!(
        "Host down1\n    HostName 127.0.0.1\n    Port {down}\n\
         Host *\n    User {}\n    UserKnownHostsFile {}\n    KexAlgorithms curve25519-sha256\n",
        servers[0].user(),
        kh.display()
    ));
    let config = w.join("ssh_config");
    fs::write(&config, cfg).expect("write ssh config");

    // A tree to move: many small files and one large one.
    let tree = w.join("site");
    for i in 0..o.files {
        let d = tree.join(format!("pages/{:02}", i % 20));
        fs::create_dir_all(&d).expect("mkdir");
        let body = format!("page {i}\n").repeat(1 + i % 300);
        fs::write(d.join(format!("p{i:04}.html")), body).expect("write");
    }
    fs::create_dir_all(tree.join("assets")).expect("mkdir");
    let big: Vec<u8> = (0..o.big_mib << 20)
        .map(|i: usize| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    fs::write(tree.join("assets/bundle.bin"), big).expect("write");

    let all = format!("web[{:0width$}-{}]", 1, o.hosts);
    let some = format!("web[{:0width$}-{:0width$}]", 1, o.transfer_hosts);
    let got = w.join("got");
    let pushed = w.join("pushed/{host}");
    let tree_s = tree.to_str().expect("utf-8 path");
    let mut steps = Vec::new();
    let c = config.as_path();
    run(
        &mut steps,
        c,
        "exec, streamed (3 hosts)",
        3,
        &[
            "exec",
            "-H",
            &format!("web[{:0width$}-{:0width$}]", 1, 3),
            "--",
            "echo hello from $(hostname) port ${SSH_CONNECTION##* }",
        ],
    );
    run(
        &mut steps,
        c,
        "exec, gathered, one host down",
        o.hosts + 1,
        &[
            "exec",
            "-b",
            "-H",
            &format!("{all},down1"),
            "--retries",
            "0",
            "--",
            "uname -sr",
        ],
    );
    run(
        &mut steps,
        c,
        "exec true",
        o.hosts,
        &["exec", "-q", "-H", &all, "--", "true"],
    );
    run(
        &mut steps,
        c,
        "get tree",
        o.transfer_hosts,
        &[
            "get",
            "-u",
            "-H",
            &some,
            tree_s,
            got.to_str().expect("utf-8"),
        ],
    );
    run(
        &mut steps,
        c,
        "put tree",
        o.transfer_hosts,
        &[
            "put",
            "-u",
            "-H",
            &some,
            tree_s,
            pushed.to_str().expect("utf-8"),
        ],
    );
    run(
        &mut steps,
        c,
        "put --update, unchanged",
        o.transfer_hosts,
        &[
            "put",
            "-u",
            "-H",
            &some,
            tree_s,
            pushed.to_str().expect("utf-8"),
        ],
    );

    println!(
        "\nFigures (client = the ussh process; {} sshd processes share this machine; files under {}):",
        o.servers,
        w.display()
    );
    println!(
        "{:<32} {:>6} {:>5} {:>8} {:>12} {:>14}",
        "step", "hosts", "exit", "wall s", "client CPU s", "CPU ms / host"
    );
    for s in &steps {
        println!(
            "{:<32} {:>6} {:>5} {:>8.2} {:>12.3} {:>14.1}",
            s.what,
            s.hosts,
            s.exit,
            s.wall.as_secs_f64(),
            s.cpu.as_secs_f64(),
            s.cpu.as_secs_f64() * 1000.0 / s.hosts as f64
        );
    }
    let files = o.files + 1;
    println!(
        "\nEach transfer host moved {files} files (one of {} MiB) each way; the work directory is removed on exit.",
        o.big_mib
    );
    println!("The gathered step exits 1 because down1 is down; the others exit 0.");
}
