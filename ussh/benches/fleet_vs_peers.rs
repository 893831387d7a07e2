//! `ussh` beside the fleet tools operators use today — `parallel-ssh`,
//! `parallel-slurp`, `parallel-scp` (pssh), `clush` (ClusterShell) and
//! `pdsh`/`rpdcp`/`pdcp` — on the same throwaway loopback sshd processes,
//! reached as host aliases of one temporary ssh config:
//!
//! * `true` on `HOSTS` hosts (default 64), all at once;
//! * fetch a `MIB` MiB file (default 16) from `XFER_HOSTS` hosts (default 32);
//! * push it to `XFER_HOSTS` hosts;
//! * `true` on `BASTION_HOSTS` hosts (default 64) reached through one jump
//!   host (`ProxyJump bastion` in the config every tool reads: ussh
//!   carries each host over a channel of a shared bastion session, the
//!   peers' `ssh` spawns an `ssh -W` to the bastion per host).
//!
//! `BENCH_USER` is the remote user (default: ours); its shell's rc files
//! run before every remote command, on the servers' core.
//!
//! `WORKLOADS` picks rows by name (`exec,fetch,push,bastion`, the default:
//! all), `TOOLS` by tool (`ussh,pssh,clush,pdsh`). For a thousand hosts: `HOSTS=1000 SERVERS=8 WORKLOADS=exec`; the
//! peers' fan-out is `FANOUT` (default: every host at once), ussh's `-j`
//! always every host.
//!
//! Key exchange pinned to curve25519-sha256 and chacha20-poly1305 for every
//! tool (in the ssh config every tool reads). The client runs on core 0 and
//! the sshd processes on core 1 when the machine has two cores or more
//! (`taskset`). For each row: wall seconds and the client's CPU (user +
//! sys of the tool and every process it waited for), medians over `ROUNDS`
//! rounds (default 3) run in rotating order, and the peak memory of the
//! tool's process tree (the sum of its processes' PSS, sampled every
//! 100 ms: shared pages counted once).
//!
//! Run (as root, with the Debian packages pssh, clustershell and pdsh):
//! `cargo bench -p ussh --bench fleet_vs_peers`. A missing peer is skipped
//! with a note.

use uring_ssh_testkit::sshd;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const USSH: &str = env!("CARGO_BIN_EXE_ussh");

fn env(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .map(|v| {
            v.parse()
                .unwrap_or_else(|_| panic!("{name} must be a number"))
        })
        .unwrap_or(default)
}

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

fn have(bin: &str) -> bool {
    Path::new("/usr/bin").join(bin).exists()
}

struct Row {
    workload: &'static str,
    tool: &'static str,
    hosts: usize,
    /// (wall s, cpu s, peak PSS MiB) per round.
    runs: Vec<(f64, f64, f64)>,
}

/// `root` and its live descendants.
fn tree(root: u32) -> Vec<u32> {
    let mut pids = sshd::descendants(root);
    pids.push(root);
    pids
}

/// The summed PSS of `pids` in KiB (processes gone meanwhile count 0).
fn pss_kib(pids: &[u32]) -> u64 {
    pids.iter()
        .filter_map(|p| fs::read_to_string(format!("/proc/{p}/smaps_rollup")).ok())
        .filter_map(|t| {
            t.lines()
                .find(|l| l.starts_with("Pss:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse::<u64>().ok())
        })
        .sum()
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).expect("no NaN"));
    v[v.len() / 2]
}

/// Runs `argv` on core 0 (if pinning), with `envs`; panics if it fails.
/// Returns wall seconds, client CPU seconds and the peak PSS of its
/// process tree in MiB.
fn timed(argv: &[String], envs: &[(&str, String)], pin: bool) -> (f64, f64, f64) {
    let mut c = if pin {
        let mut c = Command::new("taskset");
        c.arg("-c").arg("0").args(argv);
        c
    } else {
        let mut c = Command::new(&argv[0]);
        c.args(&argv[1..]);
        c
    };
    c.envs(envs.iter().map(|(k, v)| (k, v)))
        .env_remove("SSH_AUTH_SOCK")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let cpu0 = children_cpu();
    let start = Instant::now();
    let mut child = c.spawn().expect("spawn");
    let mut stderr = child.stderr.take().expect("stderr");
    let drain = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = std::io::Read::read_to_end(&mut stderr, &mut v);
        v
    });
    let mut peak = 0;
    let status = loop {
        if let Some(st) = child.try_wait().expect("wait") {
            break st;
        }
        peak = peak.max(pss_kib(&tree(child.id())));
        std::thread::sleep(Duration::from_millis(100));
    };
    let wall = start.elapsed().as_secs_f64();
    let cpu = (children_cpu() - cpu0).as_secs_f64();
    let err = drain.join().expect("stderr");
    if !status.success() {
        panic!(
            "{argv:?} failed ({status}):\n{}",
            String::from_utf8_lossy(&err)
        );
    }
    (wall, cpu, peak as f64 / 1024.0)
}

fn s(v: impl AsRef<std::ffi::OsStr>) -> String {
    v.as_ref().to_string_lossy().into_owned()
}

fn main() {
    let hosts = env("HOSTS", 64);
    let xfer_hosts = env("XFER_HOSTS", 32);
    let mib = env("MIB", 16);
    let rounds = env("ROUNDS", 3).max(1);
    let servers = env("SERVERS", 4).max(1);
    let bastion_hosts = env("BASTION_HOSTS", 64);
    let workloads = std::env::var("WORKLOADS").unwrap_or_else(|_| "exec,fetch,push,bastion".into());
    let want = |w: &str| workloads.split(',').any(|x| x.trim() == w);
    for w in workloads.split(',') {
        assert!(
            ["exec", "fetch", "push", "bastion"].contains(&w.trim()),
            "WORKLOADS: unknown workload {w:?} (exec, fetch, push, bastion)"
        );
    }
    let fanout = env("FANOUT", 0);
    let per_address = std::env::var("USSH_PER_ADDRESS").ok();
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let pin = cores >= 2 && have("taskset");

    let sshds: Vec<sshd::Sshd> = (0..servers)
        .map(|_| sshd::Sshd::builder().log_level("ERROR").start())
        .collect();
    let bastion = sshd::Sshd::builder().log_level("ERROR").start();
    if pin {
        for s in sshds.iter().chain([&bastion]) {
            let _ = Command::new("taskset")
                .args(["-a", "-p", "-c", "1", &s.pid().to_string()])
                .stdout(Stdio::null())
                .status();
        }
    }
    let base = std::env::var("BENCH_DIR").unwrap_or_else(|_| "/dev/shm".into());
    let work = tempfile::Builder::new()
        .prefix("ussh-bench-")
        .tempdir_in(&base)
        .expect("temp dir");
    let w = work.path();
    // The remote user. Its login shell runs every remote command, after
    // its rc files: root's may be slow (a `pyenv init` there costs 0.27 s
    // of the server's core per command) and then bounds the wall time of
    // every tool. BENCH_USER names another (e.g. the test user that
    // scripts/test.sh creates); the fixture's authorized keys serve any.
    let user = std::env::var("BENCH_USER").unwrap_or_else(|_| sshds[0].user());
    if user != sshds[0].user() {
        use std::os::unix::fs::PermissionsExt;
        fs::set_permissions(w, fs::Permissions::from_mode(0o755)).expect("chmod");
    }
    let kh = w.join("known_hosts");
    let mut known = String::new();
    for s in sshds.iter().chain([&bastion]) {
        known.push_str(&fs::read_to_string(s.known_hosts()).expect("known_hosts"));
    }
    fs::write(&kh, known).expect("known_hosts");
    let n = hosts.max(xfer_hosts);
    // Zero-padded to one width, so that `h[001-100]` or `h[0001-1000]`
    // names every alias for every tool.
    let width = n.to_string().len().max(3);
    let mut cfg = String::new();
    for i in 1..=n {
        let s = &sshds[(i - 1) % sshds.len()];
        cfg.push_str(&format!(
            "Host h{i:0width$}\n    HostName 127.0.0.1\n    Port {}\n    IdentityFile {}\n",
            s.port(),
            s.user_key().display()
        ));
    }
    cfg.push_str(&format!(
        "Host bastion\n    HostName 127.0.0.1\n    Port {}\n    IdentityFile {}\n",
        bastion.port(),
        bastion.user_key().display()
    ));
    for i in 1..=bastion_hosts {
        let s = &sshds[(i - 1) % sshds.len()];
        cfg.push_str(&format!(
            "Host b{i:03}\n    HostName 127.0.0.1\n    Port {}\n    IdentityFile {}\n    ProxyJump bastion\n",
            s.port(),
            s.user_key().display()
        ));
    }
    cfg.push_str(&format!(
        "Host *\n    User {}\n    UserKnownHostsFile {}\n    StrictHostKeyChecking yes\n    \
         BatchMode yes\n    KexAlgorithms curve25519-sha256\n    \
         Ciphers chacha20-poly1305@openssh.com\n",
        user,
        kh.display()
    ));
    let config = w.join("ssh_config");
    fs::write(&config, cfg).expect("ssh config");
    let hosts_file = |prefix: &str, k: usize, width: usize| -> PathBuf {
        let p = w.join(format!("hosts-{prefix}{k}"));
        let list: String = (1..=k).map(|i| format!("{prefix}{i:0width$}\n")).collect();
        fs::write(&p, list).expect("hosts file");
        p
    };
    let (hf_exec, hf_xfer) = (
        hosts_file("h", hosts, width),
        hosts_file("h", xfer_hosts, width),
    );
    let hf_bastion = hosts_file("b", bastion_hosts, 3);
    let set = |k: usize| format!("h[{:0width$}-{k:0width$}]", 1);
    let bset = format!("b[001-{bastion_hosts:03}]");
    // The peers' fan-out: every host at once unless FANOUT says otherwise.
    let fan = |k: usize| if fanout == 0 { k } else { fanout }.to_string();
    let src = w.join("src/payload.bin");
    fs::create_dir_all(src.parent().expect("parent")).expect("mkdir");
    let data: Vec<u8> = (0..mib << 20)
        .map(|i: usize| (i.wrapping_mul(2654435761) >> 11) as u8)
        .collect();
    fs::write(&src, data).expect("payload");
    let cfg_s = s(&config);
    let fetched = w.join("fetched");
    let pushed = w.join("pushed");
    fs::create_dir_all(&pushed).expect("mkdir");
    if user != sshds[0].user() {
        use std::os::unix::fs::PermissionsExt;
        fs::set_permissions(&pushed, fs::Permissions::from_mode(0o1777)).expect("chmod");
    }

    type Cmd = (
        &'static str,
        &'static str,
        usize,
        Vec<String>,
        Vec<(&'static str, String)>,
    );
    let mut cmds: Vec<Cmd> = Vec::new();
    let exec = "true";
    cmds.push((
        "exec true",
        "ussh",
        hosts,
        vec![
            USSH.into(),
            "exec".into(),
            "-q".into(),
            "-F".into(),
            cfg_s.clone(),
            "--no-agent".into(),
            "-j".into(),
            hosts.to_string(),
            "-H".into(),
            set(hosts),
            "--".into(),
            exec.into(),
        ],
        vec![],
    ));
    let fetch_dir = |tool: &str| s(fetched.join(tool));
    let ussh_get = vec![
        USSH.into(),
        "get".into(),
        "-q".into(),
        "-F".into(),
        cfg_s.clone(),
        "--no-agent".into(),
        "-H".into(),
        set(xfer_hosts),
        s(&src),
        fetch_dir("ussh"),
    ];
    let ussh_put = vec![
        USSH.into(),
        "put".into(),
        "-q".into(),
        "-F".into(),
        cfg_s.clone(),
        "--no-agent".into(),
        "-H".into(),
        set(xfer_hosts),
        s(&src),
        s(pushed.join("ussh")),
    ];
    let mut ussh_bastion: Vec<String> = vec![
        USSH.into(),
        "exec".into(),
        "-q".into(),
        "-F".into(),
        cfg_s.clone(),
        "--no-agent".into(),
        "-j".into(),
        bastion_hosts.to_string(),
        "-H".into(),
        bset.clone(),
        "--".into(),
        exec.into(),
    ];
    if let Some(n) = &per_address {
        for argv in [&mut cmds[0].3, &mut ussh_bastion] {
            argv.splice(2..2, ["--per-address".to_string(), n.clone()]);
        }
    }
    cmds.push(("via bastion", "ussh", bastion_hosts, ussh_bastion, vec![]));
    cmds.push(("fetch", "ussh", xfer_hosts, ussh_get, vec![]));
    cmds.push(("push", "ussh", xfer_hosts, ussh_put, vec![]));
    let ssh_x = format!("-F {cfg_s}");
    if have("parallel-ssh") {
        cmds.push((
            "exec true",
            "pssh",
            hosts,
            vec![
                "parallel-ssh".into(),
                "-p".into(),
                fan(hosts),
                "-x".into(),
                ssh_x.clone(),
                "-h".into(),
                s(&hf_exec),
                exec.into(),
            ],
            vec![],
        ));
        cmds.push((
            "fetch",
            "pssh",
            xfer_hosts,
            vec![
                "parallel-slurp".into(),
                "-p".into(),
                fan(xfer_hosts),
                "-x".into(),
                ssh_x.clone(),
                "-h".into(),
                s(&hf_xfer),
                "-L".into(),
                fetch_dir("pssh"),
                s(&src),
                "payload.bin".into(),
            ],
            vec![],
        ));
        cmds.push((
            "push",
            "pssh",
            xfer_hosts,
            vec![
                "parallel-scp".into(),
                "-p".into(),
                fan(xfer_hosts),
                "-x".into(),
                ssh_x.clone(),
                "-h".into(),
                s(&hf_xfer),
                s(&src),
                s(pushed.join("pssh.bin")),
            ],
            vec![],
        ));
        cmds.push((
            "via bastion",
            "pssh",
            bastion_hosts,
            vec![
                "parallel-ssh".into(),
                "-p".into(),
                fan(bastion_hosts),
                "-x".into(),
                ssh_x.clone(),
                "-h".into(),
                s(&hf_bastion),
                exec.into(),
            ],
            vec![],
        ));
    } else {
        eprintln!("parallel-ssh not found (Debian package pssh): its rows are skipped");
    }
    if have("clush") {
        let o = vec!["-o".to_string(), ssh_x.clone()];
        let mut c = vec!["clush".to_string(), "-f".into(), fan(hosts)];
        c.extend(o.clone());
        c.extend(["-w".into(), set(hosts), exec.into()]);
        cmds.push(("exec true", "clush", hosts, c, vec![]));
        let mut c = vec!["clush".to_string(), "-f".into(), fan(xfer_hosts)];
        c.extend(o.clone());
        c.extend([
            "-w".into(),
            set(xfer_hosts),
            "--rcopy".into(),
            s(&src),
            "--dest".into(),
            fetch_dir("clush"),
        ]);
        cmds.push(("fetch", "clush", xfer_hosts, c, vec![]));
        let mut c = vec!["clush".to_string(), "-f".into(), fan(xfer_hosts)];
        c.extend(o);
        c.extend([
            "-w".into(),
            set(xfer_hosts),
            "--copy".into(),
            s(&src),
            "--dest".into(),
            s(pushed.join("clush.bin")),
        ]);
        cmds.push(("push", "clush", xfer_hosts, c, vec![]));
        let mut c = vec!["clush".to_string(), "-f".into(), fan(bastion_hosts)];
        c.extend(["-o".to_string(), ssh_x.clone()]);
        c.extend(["-w".into(), bset.clone(), exec.into()]);
        cmds.push(("via bastion", "clush", bastion_hosts, c, vec![]));
    } else {
        eprintln!("clush not found (Debian package clustershell): its rows are skipped");
    }
    if have("pdsh") {
        let e = vec![("PDSH_SSH_ARGS_APPEND", ssh_x.clone())];
        cmds.push((
            "exec true",
            "pdsh",
            hosts,
            vec![
                "pdsh".into(),
                "-R".into(),
                "ssh".into(),
                "-f".into(),
                fan(hosts),
                "-w".into(),
                set(hosts),
                exec.into(),
            ],
            e.clone(),
        ));
        cmds.push((
            "fetch",
            "pdsh",
            xfer_hosts,
            vec![
                "rpdcp".into(),
                "-R".into(),
                "ssh".into(),
                "-f".into(),
                fan(xfer_hosts),
                "-w".into(),
                set(xfer_hosts),
                s(&src),
                fetch_dir("pdsh"),
            ],
            e.clone(),
        ));
        cmds.push((
            "push",
            "pdsh",
            xfer_hosts,
            vec![
                "pdcp".into(),
                "-R".into(),
                "ssh".into(),
                "-f".into(),
                fan(xfer_hosts),
                "-w".into(),
                set(xfer_hosts),
                s(&src),
                s(pushed.join("pdsh.bin")),
            ],
            e.clone(),
        ));
        cmds.push((
            "via bastion",
            "pdsh",
            bastion_hosts,
            vec![
                "pdsh".into(),
                "-R".into(),
                "ssh".into(),
                "-f".into(),
                fan(bastion_hosts),
                "-w".into(),
                bset.clone(),
                exec.into(),
            ],
            e,
        ));
    } else {
        eprintln!("pdsh not found (Debian package pdsh): its rows are skipped");
    }

    let tools = std::env::var("TOOLS").unwrap_or_else(|_| "ussh,pssh,clush,pdsh".into());
    cmds.retain(|(workload, tool, ..)| {
        tools.split(',').any(|t| t.trim() == *tool)
            && want(match *workload {
                "exec true" => "exec",
                "via bastion" => "bastion",
                w => w,
            })
    });
    let mut rows: Vec<Row> = cmds
        .iter()
        .map(|(workload, tool, hosts, _, _)| Row {
            workload,
            tool,
            hosts: *hosts,
            runs: Vec::new(),
        })
        .collect();
    eprintln!(
        "{} sshd processes, {n} aliases, {rounds} rounds, client pinned: {pin}",
        sshds.len()
    );
    for round in 0..rounds {
        for k in 0..cmds.len() {
            let i = (k + round) % cmds.len();
            let (workload, tool, _, argv, envs) = &cmds[i];
            let _ = fs::remove_dir_all(&fetched);
            for t in ["ussh", "pssh", "clush", "pdsh"] {
                fs::create_dir_all(fetched.join(t)).expect("mkdir");
            }
            let r = timed(argv, envs, pin);
            eprintln!(
                "round {round}: {workload:<11} {tool:<6} {:>6.2} s wall {:>6.3} s CPU {:>8.1} MiB peak",
                r.0, r.1, r.2
            );
            rows[i].runs.push(r);
        }
    }
    println!(
        "\n{:<11} {:<6} {:>6} {:>8} {:>12} {:>14} {:>12} {:>14}",
        "workload",
        "tool",
        "hosts",
        "wall s",
        "client CPU s",
        "CPU ms / host",
        "CPU s / GiB",
        "peak PSS MiB"
    );
    for r in &rows {
        let wall = median(r.runs.iter().map(|x| x.0).collect());
        let cpu = median(r.runs.iter().map(|x| x.1).collect());
        let peak = median(r.runs.iter().map(|x| x.2).collect());
        let per_gib = if r.workload == "exec true" || r.workload == "via bastion" {
            "-".to_string()
        } else {
            let gib = (r.hosts * mib) as f64 / 1024.0;
            format!("{:.2}", cpu / gib)
        };
        println!(
            "{:<11} {:<6} {:>6} {:>8.2} {:>12.3} {:>14.1} {:>12} {:>14.1}",
            r.workload,
            r.tool,
            r.hosts,
            wall,
            cpu,
            cpu * 1000.0 / r.hosts as f64,
            per_gib,
            peak
        );
    }
}
