//! `ussh` against real sshd processes on loopback: several servers on
//! different ports, reached under host aliases of a temporary ssh config.

#[path = "../../tests/common/sshd.rs"]
#[allow(dead_code)]
mod sshd;

use std::collections::BTreeMap;
use std::fs;
use std::io::Read;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant, SystemTime};

use sha2::{Digest, Sha256};
use sshd::Sshd;
use tempfile::TempDir;

const USSH: &str = env!("CARGO_BIN_EXE_ussh");
/// GNU time (Debian package `time`, installed by scripts/setup.sh).
const TIME: &str = "/usr/bin/time";

/// Several sshd processes and an ssh config naming `count` aliases
/// `{prefix}NNN` spread over them round-robin.
struct Fleet {
    sshds: Vec<Sshd>,
    dir: TempDir,
    config: PathBuf,
    known_hosts: PathBuf,
}

impl Fleet {
    fn start(servers: usize, prefix: &str, count: usize) -> Fleet {
        let sshds: Vec<Sshd> = (0..servers).map(|_| Sshd::start()).collect();
        let dir = tempfile::Builder::new()
            .prefix("ussh-fleet-")
            .tempdir()
            .expect("temp dir");
        let known_hosts = dir.path().join("known_hosts");
        let mut kh = String::new();
        for s in &sshds {
            kh.push_str(&fs::read_to_string(s.known_hosts()).expect("known_hosts"));
        }
        fs::write(&known_hosts, kh).expect("write known_hosts");
        let config = dir.path().join("ssh_config");
        let mut f = Fleet {
            sshds,
            dir,
            config,
            known_hosts,
        };
        let mut text = String::new();
        for i in 1..=count {
            text.push_str(&f.alias_block(&format!("{prefix}{i:03}"), (i - 1) % servers));
        }
        f.write_config(&text);
        f
    }

    /// A `Host` block for `alias` on server `n`.
    fn alias_block(&self, alias: &str, n: usize) -> String {
        let s = &self.sshds[n];
        format!(
            "Host {alias}\n    HostName 127.0.0.1\n    Port {}\n    User {}\n    IdentityFile {}\n    UserKnownHostsFile {}\n",
            s.port(),
            s.user(),
            s.user_key().display(),
            self.known_hosts.display()
        )
    }

    fn write_config(&mut self, text: &str) {
        fs::write(&self.config, text).expect("write ssh config");
    }

    fn append_config(&mut self, text: &str) {
        let mut c = fs::read_to_string(&self.config).expect("read config");
        c.push_str(text);
        self.write_config(&c);
    }

    /// `ussh ARGS` with this fleet's config, no agent, plain output.
    fn cmd(&self, args: &[&str]) -> Command {
        self.with_args(Command::new(USSH), args)
    }

    /// `c` (ussh, or a command that runs it) with ussh's `ARGS`, this
    /// fleet's config, no agent.
    fn with_args(&self, mut c: Command, args: &[&str]) -> Command {
        c.arg(args[0])
            .arg("-F")
            .arg(&self.config)
            .arg("--no-agent")
            .args(&args[1..])
            .env_remove("SSH_AUTH_SOCK")
            .stdin(Stdio::null());
        c
    }

    fn run(&self, args: &[&str]) -> Output {
        let out = self.cmd(args).output().expect("run ussh");
        eprintln!(
            "ussh {args:?} -> {}\n--- stderr ---\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        out
    }

    /// `ussh ARGS` to its end, with its peak resident set size in KiB as
    /// GNU time reports it (ussh is exec'd from the small `time` process:
    /// a child of this test would be charged this process's own size).
    fn run_measured(&self, args: &[&str]) -> (Output, u64) {
        assert!(
            Path::new(TIME).exists(),
            "{TIME} not found: the memory tests need GNU time; run `bash scripts/setup.sh` as root"
        );
        let report = tempfile::NamedTempFile::new().expect("temp file");
        let mut c = Command::new(TIME);
        c.args(["-f", "%M", "-o"]).arg(report.path()).arg(USSH);
        let out = self
            .with_args(c, args)
            .output()
            .expect("run ussh under time");
        // `time` adds "Command exited with non-zero status N" before the
        // figure when ussh fails.
        let text = fs::read_to_string(report.path()).expect("read time's report");
        let rss: u64 = text
            .lines()
            .last()
            .and_then(|l| l.trim().parse().ok())
            .unwrap_or_else(|| panic!("no peak RSS in time's report: {text:?}"));
        let err = String::from_utf8_lossy(&out.stderr);
        // Only the end: flooded stderr may be megabytes.
        let from = err.char_indices().rev().nth(3000).map_or(0, |(i, _)| i);
        eprintln!(
            "ussh {args:?} -> {}, peak RSS {:.1} MiB\n--- stderr (end) ---\n{}",
            out.status,
            rss as f64 / 1024.0,
            &err[from..]
        );
        (out, rss)
    }
}

/// `then` on the fleet's first server, `otherwise` on the others (told
/// apart by the server port in $SSH_CONNECTION).
fn on_first_server(f: &Fleet, then: &str, otherwise: &str) -> String {
    format!(
        "if [ \"$(echo $SSH_CONNECTION | cut -d' ' -f4)\" = {} ]; then {then}; else {otherwise}; fi",
        f.sshds[0].port()
    )
}

fn json_records(out: &Output) -> BTreeMap<String, serde_json::Value> {
    let mut m = BTreeMap::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let v: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("bad JSON line {line:?}: {e}"));
        let host = v["host"].as_str().expect("host field").to_string();
        assert!(m.insert(host, v).is_none(), "one record per host");
    }
    m
}

fn sha256(path: &Path) -> String {
    let mut f = fs::File::open(path).unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).expect("read");
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    h.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

/// Every regular file under `root`, relative, with its SHA-256.
fn tree_hashes(root: &Path) -> BTreeMap<PathBuf, String> {
    let mut out = BTreeMap::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in fs::read_dir(&d).unwrap_or_else(|e| panic!("read_dir {}: {e}", d.display())) {
            let e = e.expect("dir entry");
            let t = e.file_type().expect("file type");
            if t.is_dir() {
                stack.push(e.path());
            } else {
                let rel = e
                    .path()
                    .strip_prefix(root)
                    .expect("under root")
                    .to_path_buf();
                out.insert(rel, sha256(&e.path()));
            }
        }
    }
    out
}

/// xorshift bytes, so that every byte matters.
fn random_bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.max(1);
    let mut v = Vec::with_capacity(len + 8);
    while v.len() < len {
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        v.extend_from_slice(&x.wrapping_mul(0x2545_f491_4f6c_dd1d).to_le_bytes());
    }
    v.truncate(len);
    v
}

/// 1,000 small files in nested directories plus three large ones.
fn make_tree(root: &Path) {
    for i in 0..1000u64 {
        let d = root.join(format!("d{}/e{}", i % 10, i % 7));
        fs::create_dir_all(&d).expect("mkdir");
        let len = ((i * 2654435761) % 4096) as usize;
        fs::write(d.join(format!("f{i:04}.dat")), random_bytes(len, i + 1)).expect("write");
    }
    fs::create_dir_all(root.join("big")).expect("mkdir big");
    for (i, len) in [(1u64, 5 << 20), (2, 8 << 20), (3, (3 << 20) + 7)] {
        fs::write(
            root.join(format!("big/large{i}.bin")),
            random_bytes(len, 1000 + i),
        )
        .expect("write large");
    }
}

#[test]
fn exec_on_104_hosts_streams_output_and_exit_codes() {
    let f = Fleet::start(4, "n", 104);
    let ports: Vec<u16> = f.sshds.iter().map(|s| s.port()).collect();
    let port_of = |i: usize| ports[(i - 1) % ports.len()];
    // The server port tells each host apart; the exit code derives from it.
    let command = "p=$(echo $SSH_CONNECTION | cut -d' ' -f4); echo port $p; echo to-stderr >&2; exit $((p % 5))";

    let start = Instant::now();
    let out = f.run(&[
        "exec",
        "--kex",
        "curve25519-sha256",
        "-H",
        "n[001-104]",
        "--",
        command,
    ]);
    eprintln!("streamed exec on 104 hosts: {:?}", start.elapsed());
    let any_nonzero = (1..=104).any(|i| port_of(i) % 5 != 0);
    assert_eq!(out.status.code(), Some(if any_nonzero { 1 } else { 0 }));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    for i in 1..=104 {
        let host = format!("n{i:03}");
        let line = format!("{host}: port {}", port_of(i));
        assert_eq!(
            stdout.lines().filter(|l| *l == line).count(),
            1,
            "expected {line:?} once in stdout:\n{stdout}"
        );
        assert!(stderr.contains(&format!("{host}: to-stderr")));
        // The per-host progress line (stderr is not a terminal) has the
        // exit status.
        let code = port_of(i) % 5;
        let status = if code == 0 {
            format!("] {host}: ok (exit 0) in ")
        } else {
            format!("] {host}: failed (exit {code}) in ")
        };
        assert_eq!(
            stderr.matches(&status).count(),
            1,
            "{status:?} in\n{stderr}"
        );
    }
    assert_eq!(stdout.lines().count(), 104, "{stdout}");
    // The summary counts the hosts, and reports the client's CPU.
    let ok = (1..=104).filter(|&i| port_of(i) % 5 == 0).count();
    assert!(
        stderr.contains(&format!(
            "ussh exec: 104 hosts, {ok} ok, {} failed",
            104 - ok
        )),
        "{stderr}"
    );
    assert!(stderr.contains("client CPU"), "{stderr}");
}

#[test]
fn gathered_output_folds_identical_hosts() {
    let f = Fleet::start(2, "g", 12);
    let p0 = f.sshds[0].port();
    let command = format!(
        "echo same; if [ \"$(echo $SSH_CONNECTION | cut -d' ' -f4)\" = {p0} ]; then echo first; exit 4; fi"
    );
    let out = f.run(&["exec", "-b", "-H", "g[001-012]", "--", &command]);
    assert_eq!(out.status.code(), Some(1));
    let stdout = String::from_utf8_lossy(&out.stdout);
    // Odd aliases are on the first server.
    let blocks: Vec<&str> = stdout.lines().filter(|l| l.ends_with(')')).collect();
    assert_eq!(
        blocks,
        [
            "g[001,003,005,007,009,011] (6)",
            "g[002,004,006,008,010,012] (6)"
        ],
        "{stdout}"
    );
    assert!(
        stdout.contains(
            "g[001,003,005,007,009,011] (6)\n------------------------------\nsame\nfirst\n"
        ),
        "{stdout}"
    );
    assert!(
        stdout.contains("g[002,004,006,008,010,012] (6)\n------------------------------\nsame\n"),
        "{stdout}"
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("ussh: g[001,003,005,007,009,011]: exited with exit code 4"),
        "{stderr}"
    );
}

#[test]
fn get_and_put_trees_on_10_hosts_with_update() {
    let f = Fleet::start(3, "t", 10);
    let work = f.dir.path();
    let src = work.join("src/tree");
    make_tree(&src);
    let want = tree_hashes(&src);
    assert_eq!(want.len(), 1003);

    // get: every host's copy under DEST/<host>/tree.
    let dest = work.join("got");
    let src_s = src.to_str().unwrap();
    let start = Instant::now();
    let out = f.run(&[
        "get",
        "--json",
        "-u",
        "-H",
        "t[001-010]",
        src_s,
        dest.to_str().unwrap(),
    ]);
    eprintln!("get 10 x 1003 files: {:?}", start.elapsed());
    assert_eq!(out.status.code(), Some(0));
    let recs = json_records(&out);
    assert_eq!(recs.len(), 10);
    for i in 1..=10 {
        let host = format!("t{i:03}");
        assert_eq!(recs[&host]["files"], 1003, "{}", recs[&host]);
        assert_eq!(tree_hashes(&dest.join(&host).join("tree")), want, "{host}");
    }
    // put: into a per-host remote directory.
    let remote = work.join("pushed/{host}");
    let remote_s = remote.to_str().unwrap();
    let start = Instant::now();
    let out = f.run(&["put", "--json", "-u", "-H", "t[001-010]", src_s, remote_s]);
    eprintln!("put 10 x 1003 files: {:?}", start.elapsed());
    assert_eq!(out.status.code(), Some(0));
    for i in 1..=10 {
        let host = format!("t{i:03}");
        let got = tree_hashes(&work.join("pushed").join(&host).join("tree"));
        assert_eq!(got, want, "{host}");
    }
    // Nothing left half-done anywhere.
    for root in [work.join("got"), work.join("pushed")] {
        let parts = tree_hashes(&root)
            .keys()
            .filter(|p| p.to_string_lossy().ends_with(".part"))
            .count();
        assert_eq!(parts, 0);
    }

    // --update: a second run moves nothing.
    for args in [
        vec![
            "get",
            "--json",
            "-u",
            "-H",
            "t[001-010]",
            src_s,
            dest.to_str().unwrap(),
        ],
        vec!["put", "--json", "-u", "-H", "t[001-010]", src_s, remote_s],
    ] {
        let out = f.run(&args);
        assert_eq!(out.status.code(), Some(0));
        for (h, r) in json_records(&out) {
            assert_eq!(r["files"], 0, "{h}: {r}");
            assert_eq!(r["skipped"], 1003, "{h}: {r}");
            assert_eq!(r["bytes"], 0, "{h}: {r}");
        }
    }
    // Touch one source file: only it moves, both ways.
    let changed = src.join("d3/e3/f0003.dat");
    fs::write(&changed, b"changed contents").expect("rewrite");
    let later = SystemTime::now() + Duration::from_secs(5);
    fs::File::options()
        .write(true)
        .open(&changed)
        .and_then(|f| f.set_modified(later))
        .expect("set mtime");
    for args in [
        vec![
            "get",
            "--json",
            "-u",
            "-H",
            "t[001-010]",
            src_s,
            dest.to_str().unwrap(),
        ],
        vec!["put", "--json", "-u", "-H", "t[001-010]", src_s, remote_s],
    ] {
        let out = f.run(&args);
        assert_eq!(out.status.code(), Some(0));
        for (h, r) in json_records(&out) {
            assert_eq!(r["files"], 1, "{h}: {r}");
            assert_eq!(r["skipped"], 1002, "{h}: {r}");
            assert_eq!(r["bytes"], 16, "{h}: {r}");
        }
    }
    let want = tree_hashes(&src);
    for i in 1..=10 {
        let host = format!("t{i:03}");
        assert_eq!(tree_hashes(&dest.join(&host).join("tree")), want, "{host}");
        assert_eq!(
            tree_hashes(&work.join("pushed").join(&host).join("tree")),
            want,
            "{host}"
        );
    }
}

/// Accepts connections and never says anything.
fn stalling_listener() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = l.local_addr().expect("addr").port();
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for s in l.incoming().flatten() {
            held.push(s);
        }
    });
    port
}

fn closed_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind");
    l.local_addr().expect("addr").port()
}

#[test]
fn failing_hosts_fail_alone() {
    let mut f = Fleet::start(2, "ok", 6);
    let stall = stalling_listener();
    let refused = closed_port();
    // A known_hosts that lists the second server's key for the first one.
    let wrong_kh = f.dir.path().join("wrong_known_hosts");
    fs::write(
        &wrong_kh,
        format!(
            "[127.0.0.1]:{} {}\n",
            f.sshds[0].port(),
            f.sshds[1].host_key_pub()
        ),
    )
    .expect("write");
    let garbage_key = f.dir.path().join("garbage_key");
    fs::write(&garbage_key, "not a key\n").expect("write");
    let user = f.sshds[0].user();
    let p0 = f.sshds[0].port();
    let key0 = f.sshds[0].user_key();
    f.append_config(&format!(
        "Host refused\n    HostName 127.0.0.1\n    Port {refused}\n\
         Host stall\n    HostName 127.0.0.1\n    Port {stall}\n    ConnectTimeout 2\n\
         Host changed\n    HostName 127.0.0.1\n    Port {p0}\n    User {user}\n    IdentityFile {}\n    UserKnownHostsFile {}\n\
         Host badkey\n    HostName 127.0.0.1\n    Port {p0}\n    User {user}\n    IdentityFile {}\n    UserKnownHostsFile {}\n\
         Host proxied\n    ProxyJump bastion\n    ForwardAgent yes\n",
        key0.display(),
        wrong_kh.display(),
        garbage_key.display(),
        f.known_hosts.display(),
    ));
    let start = Instant::now();
    let out = f.run(&[
        "exec",
        "--json",
        "--retries",
        "1",
        "-H",
        "ok[001-006],refused,stall,changed,badkey,nosuchhost.invalid,proxied",
        "--",
        "echo fine",
    ]);
    eprintln!("12 hosts, 6 failing: {:?}", start.elapsed());
    assert_eq!(out.status.code(), Some(1));
    let recs = json_records(&out);
    // Stall: 2 s, a retry after ~0.5 s, 2 s again.
    let stalled = recs["stall"]["duration"].as_f64().expect("duration");
    assert!((4.0..8.0).contains(&stalled), "stall took {stalled} s");
    assert_eq!(recs.len(), 12);
    for i in 1..=6 {
        let r = &recs[&format!("ok{i:03}")];
        assert_eq!(r["status"], "ok", "{r}");
        assert_eq!(r["stdout"], "fine\n");
    }
    let err = |h: &str| {
        let r = &recs[h];
        assert_eq!(r["status"], "error", "{r}");
        r["error"].as_str().expect("error text").to_string()
    };
    let e = err("refused");
    assert!(
        e.contains("connection refused") && e.contains("after 2 attempts"),
        "{e}"
    );
    let e = err("stall");
    assert!(e.contains("no SSH handshake within 2 s"), "{e}");
    assert_eq!(recs["stall"]["attempts"], 2);
    let e = err("changed");
    assert!(e.contains("CHANGED"), "{e}");
    assert_eq!(
        recs["changed"]["attempts"], 1,
        "host key errors are not retried"
    );
    let e = err("badkey");
    assert!(
        e.contains("authentication as") && e.contains("garbage_key"),
        "{e}"
    );
    let e = err("nosuchhost.invalid");
    assert!(e.contains("unknown host nosuchhost.invalid"), "{e}");
    let e = err("proxied");
    assert!(
        e.starts_with("ProxyJump (") && e.ends_with("is not supported: not connecting"),
        "{e}"
    );
    assert_eq!(recs["proxied"]["attempts"], 0);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("ProxyCommand are not connected to): ForwardAgent (")
            && stderr.contains(", ProxyJump ("),
        "{stderr}"
    );
    assert_eq!(
        stderr.matches("directives not supported").count(),
        1,
        "reported once: {stderr}"
    );
}

#[test]
fn bad_input_is_one_clear_line() {
    let f = Fleet::start(1, "b", 2);
    let outdir = f.dir.path().join("never-created");
    let outdir = outdir.to_str().unwrap();
    let cases: [(&[&str], &str); 10] = [
        (&["exec", "-H", "b[001-", "--", "true"], "unclosed '['"),
        (&["exec", "-H", "b[5-1]", "--", "true"], "backwards"),
        (
            &["exec", "-H", "b001", "--shard", "3/2", "--", "true"],
            "--shard",
        ),
        (
            &["exec", "-H", "b001", "-i", "/nonexistent/key", "--", "true"],
            "key /nonexistent/key",
        ),
        (
            &["put", "-H", "b001", "/nonexistent/local", "/tmp"],
            "local path /nonexistent/local",
        ),
        (
            &["exec", "-f", "/nonexistent/hosts", "--", "true"],
            "hosts file /nonexistent/hosts",
        ),
        (
            &["exec", "-H", "b001", "--max-output", "0", "--", "true"],
            "--max-output \"0\": must be at least 1 byte",
        ),
        (
            &["exec", "-H", "b001", "--max-output", "8X", "--", "true"],
            "--max-output \"8X\": not a size",
        ),
        // Host names that are not one path component cannot name output
        // files: refused before anything starts.
        (
            &["exec", "-H", "b001,x/../../y", "-o", outdir, "--", "true"],
            "--outdir: a host's name must be a plain file name; not usable: \"x/../../y\" (it contains '/')",
        ),
        (
            &["exec", "-H", "..,b001", "-e", outdir, "--", "true"],
            "not usable: \"..\" (it names a directory)",
        ),
    ];
    for (args, want) in cases {
        let out = f.run(args);
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(stderr.lines().count(), 1, "{args:?}: {stderr}");
        assert!(
            stderr.starts_with("ussh: ") && stderr.contains(want),
            "{args:?}: {stderr}"
        );
    }
    assert!(!Path::new(outdir).exists(), "created for a refused run");
    // --timeout bounds a host's whole job.
    let start = Instant::now();
    let out = f.run(&[
        "exec",
        "--json",
        "--timeout",
        "1",
        "-H",
        "b001",
        "--",
        "sleep 20",
    ]);
    assert!(
        start.elapsed() < Duration::from_secs(8),
        "{:?}",
        start.elapsed()
    );
    assert_eq!(out.status.code(), Some(1));
    let r = &json_records(&out)["b001"];
    assert_eq!(r["status"], "error", "{r}");
    assert_eq!(
        r["error"], "timed out after 1 s while running the command",
        "{r}"
    );
    // Hosts file on stdin, and --shard.
    let mut c = f.cmd(&[
        "exec", "--json", "-f", "-", "--shard", "2/2", "--", "echo hi",
    ]);
    c.stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = c.spawn().expect("spawn");
    use std::io::Write;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"# two hosts\nb001\nb002  # the second\n")
        .unwrap();
    let out = child.wait_with_output().expect("wait");
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let recs = json_records(&out);
    assert_eq!(recs.keys().collect::<Vec<_>>(), ["b002"]);
}

#[test]
fn sigint_mid_transfer_leaves_no_partial_file() {
    let f = Fleet::start(2, "s", 12);
    let work = f.dir.path();
    let src = work.join("src");
    fs::create_dir_all(&src).unwrap();
    fs::write(src.join("big.bin"), random_bytes(64 << 20, 77)).unwrap();
    let want = sha256(&src.join("big.bin"));
    let dest = work.join("got");
    let child = f
        .cmd(&[
            "get",
            "-H",
            "s[001-012]",
            src.join("big.bin").to_str().unwrap(),
            dest.to_str().unwrap(),
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    // Wait until some file is being written.
    let deadline = Instant::now() + Duration::from_secs(30);
    let partial = || {
        (1..=12).any(|i| {
            fs::read_dir(dest.join(format!("s{i:03}")))
                .map(|rd| {
                    rd.flatten()
                        .any(|e| e.file_name().to_string_lossy().ends_with(".part"))
                })
                .unwrap_or(false)
        })
    };
    while !partial() {
        assert!(Instant::now() < deadline, "no transfer started");
        std::thread::sleep(Duration::from_millis(2));
    }
    let sent = Instant::now();
    let kill = Command::new("kill")
        .arg("-INT")
        .arg(child.id().to_string())
        .status()
        .expect("kill");
    assert!(kill.success());
    let out = child.wait_with_output().expect("wait");
    let took = sent.elapsed();
    let stderr = String::from_utf8_lossy(&out.stderr);
    eprintln!("{stderr}");
    assert!(took < Duration::from_secs(3), "exit took {took:?}");
    assert_eq!(out.status.code(), Some(130), "{stderr}");
    assert!(stderr.contains("interrupted"), "{stderr}");
    // Every file under its final name is whole; no temporary is left.
    let mut whole = 0;
    for i in 1..=12 {
        let d = dest.join(format!("s{i:03}"));
        for e in fs::read_dir(&d).into_iter().flatten().flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            assert!(
                !name.ends_with(".part"),
                "left behind: {}",
                e.path().display()
            );
            assert_eq!(name, "big.bin");
            assert_eq!(sha256(&e.path()), want, "partial file under its final name");
            whole += 1;
        }
    }
    eprintln!("{whole} of 12 hosts had finished before SIGINT");
    assert!(whole < 12, "the interrupt came too late to test anything");
}

/// Peak RSS of ussh running a few hosts, one of them flooding (with its
/// channel window of received data in flight), before any output it keeps:
/// measured at about 13 MiB, so this leaves room. Holding the floods of
/// these tests instead would take 50 to 210 MB.
const OVERHEAD_MIB: u64 = 24;

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

/// Asserts a peak RSS (KiB) within [`OVERHEAD_MIB`] plus `kept_mib` of
/// output held.
fn assert_rss_within(what: &str, kib: u64, kept_mib: u64) {
    let limit = OVERHEAD_MIB + kept_mib;
    assert!(
        kib < limit * 1024,
        "{what}: peak RSS {:.1} MiB, more than {limit} MiB",
        mib(kib)
    );
}

/// The gathered (-b) output of the flood test: c001's kept bytes and
/// marker, then c002's block.
fn gathered_flood(kept: usize, marker: &str) -> Vec<u8> {
    let mut v = b"---------------\nc001 (1)\n---------------\n".to_vec();
    v.resize(v.len() + kept, 0);
    v.extend_from_slice(format!("\n{marker}\n").as_bytes());
    v.extend_from_slice(b"---------------\nc002 (1)\n---------------\nnormal\n");
    v
}

#[test]
fn flooding_host_is_capped_when_gathering() {
    let f = Fleet::start(2, "c", 2);
    // c001 prints 200 MB on stdout and 10 MB on stderr, without a
    // newline, then exits 3; c002 behaves.
    let command = on_first_server(
        &f,
        "head -c 200000000 /dev/zero; head -c 10000000 /dev/zero >&2; exit 3",
        "echo normal; echo quiet >&2",
    );
    let (out, quiet_rss) = f.run_measured(&["exec", "-b", "-H", "c002", "--", &command]);
    assert_eq!(out.status.code(), Some(0));

    // Gathered: the first 8 MiB, then the marker; the rest of the run
    // intact (exit status included).
    let start = Instant::now();
    let (out, rss) = f.run_measured(&["exec", "-b", "-H", "c[001-002]", "--", &command]);
    eprintln!("gathered flood: {:?}", start.elapsed());
    assert_eq!(out.status.code(), Some(1));
    let want = gathered_flood(
        8 << 20,
        "[output truncated at 8 MiB: 191611392 bytes dropped]",
    );
    assert!(
        out.stdout == want,
        "gathered output: {} bytes, ending {:?}",
        out.stdout.len(),
        String::from_utf8_lossy(&out.stdout[out.stdout.len().saturating_sub(200)..])
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("c002: quiet\n"), "{stderr}");
    assert!(
        stderr.contains("ussh: c001: exited with exit code 3"),
        "{stderr}"
    );
    // Gathered mode streams stderr: the 10 MB line came out in pieces.
    assert_eq!(
        stderr.matches(" [line continues]\n").count(),
        10_000_000 / 65536,
        "pieces of 64 KiB"
    );
    assert_rss_within("gathered", rss, 8);

    // A smaller cap.
    let (out, small_rss) = f.run_measured(&[
        "exec",
        "-b",
        "--max-output",
        "100K",
        "-H",
        "c[001-002]",
        "--",
        &command,
    ]);
    assert_eq!(out.status.code(), Some(1));
    let want = gathered_flood(
        100 << 10,
        "[output truncated at 100 KiB: 199897600 bytes dropped]",
    );
    assert!(
        out.stdout == want,
        "gathered output: {} bytes, ending {:?}",
        out.stdout.len(),
        String::from_utf8_lossy(&out.stdout[out.stdout.len().saturating_sub(200)..])
    );
    assert_rss_within("gathered, 100K cap", small_rss, 0);

    // JSON: both streams capped, flagged and counted.
    let start = Instant::now();
    let (out, json_rss) = f.run_measured(&["exec", "--json", "-H", "c[001-002]", "--", &command]);
    eprintln!("JSON flood: {:?}", start.elapsed());
    assert_eq!(out.status.code(), Some(1));
    let recs = json_records(&out);
    let r = &recs["c001"];
    assert_eq!(r["status"], "failed");
    assert_eq!(r["exit_code"], 3);
    let so = r["stdout"].as_str().expect("stdout");
    assert_eq!(so.len(), 8 << 20);
    assert!(so.bytes().all(|b| b == 0));
    assert_eq!(r["stdout_truncated"], true);
    assert_eq!(r["stdout_dropped"], 200_000_000 - (8 << 20));
    assert_eq!(r["stderr"].as_str().expect("stderr").len(), 8 << 20);
    assert_eq!(r["stderr_truncated"], true);
    assert_eq!(r["stderr_dropped"], 10_000_000 - (8 << 20));
    let r = &recs["c002"];
    assert_eq!(r["status"], "ok", "{r}");
    assert_eq!(r["stdout"], "normal\n");
    assert_eq!(r["stderr"], "quiet\n");
    for field in ["stdout_truncated", "stderr_truncated"] {
        assert_eq!(r[field], false, "{r}");
    }
    for field in ["stdout_dropped", "stderr_dropped"] {
        assert_eq!(r[field], 0, "{r}");
    }
    assert_rss_within("JSON", json_rss, 16);
    eprintln!(
        "peak RSS: one quiet host {:.1} MiB; with the flood gathered {:.1} MiB \
         (100K cap: {:.1} MiB), as JSON {:.1} MiB",
        mib(quiet_rss),
        mib(rss),
        mib(small_rss),
        mib(json_rss)
    );
}

#[test]
fn streamed_long_line_comes_out_in_pieces() {
    let f = Fleet::start(2, "l", 2);
    // A 50 MB line without a newline on l001.
    let command = on_first_server(&f, "head -c 50000000 /dev/zero | tr '\\0' a", "echo normal");
    let start = Instant::now();
    let (out, rss) = f.run_measured(&["exec", "-H", "l[001-002]", "--", &command]);
    eprintln!("streamed 50 MB line: {:?}", start.elapsed());
    assert_eq!(out.status.code(), Some(0));
    let text = String::from_utf8(out.stdout).expect("text");
    let mut pieces = 0;
    let mut total = 0;
    let mut other = Vec::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("l001: ") {
            pieces += 1;
            let body = match rest.strip_suffix(" [line continues]") {
                Some(b) => b,
                None => {
                    assert_eq!(
                        total + rest.len(),
                        50_000_000,
                        "only the last piece is unmarked"
                    );
                    rest
                }
            };
            assert!(body.len() <= 65536, "piece of {} bytes", body.len());
            assert!(body.bytes().all(|b| b == b'a'));
            total += body.len();
        } else {
            other.push(line);
        }
    }
    assert_eq!(total, 50_000_000);
    assert_eq!(pieces, 50_000_000usize.div_ceil(65536));
    assert_eq!(other, ["l002: normal"]);
    eprintln!("peak RSS streaming a 50 MB line: {:.1} MiB", mib(rss));
    assert_rss_within("streamed", rss, 0);

    // A cap below 64 KiB cuts streamed lines at the cap.
    let out = f.run(&[
        "exec",
        "--max-output",
        "1000",
        "-H",
        "l[001-002]",
        "--",
        "head -c 2500 /dev/zero | tr '\\0' b; echo; echo short",
    ]);
    assert_eq!(out.status.code(), Some(0));
    let text = String::from_utf8(out.stdout).expect("text");
    for host in ["l001", "l002"] {
        let mine: Vec<&str> = text
            .lines()
            .filter_map(|l| l.strip_prefix(&format!("{host}: ")))
            .collect();
        let b = |n| "b".repeat(n);
        assert_eq!(
            mine,
            [
                format!("{} [line continues]", b(1000)),
                format!("{} [line continues]", b(1000)),
                b(500),
                "short".to_string()
            ],
            "{host}"
        );
    }
}

#[test]
fn outdir_and_errdir_get_each_hosts_whole_output() {
    let f = Fleet::start(2, "o", 3);
    let work = f.dir.path();
    let outdir = work.join("out");
    let errdir = work.join("err");
    // A symbolic link planted where o003's stdout would go, pointing
    // outside the directory.
    fs::create_dir_all(&outdir).expect("mkdir");
    let victim = work.join("victim");
    fs::write(&victim, "untouched\n").expect("write");
    std::os::unix::fs::symlink(&victim, outdir.join("o003")).expect("symlink");
    // o001 and o003 are on the first server: 20 MB (beyond the default
    // cap) of stdout, 1234 bytes of stderr.
    let command = on_first_server(
        &f,
        "head -c 20000000 /dev/zero; head -c 1234 /dev/zero >&2",
        "echo normal; echo quiet >&2",
    );
    let (o, e) = (outdir.to_str().unwrap(), errdir.to_str().unwrap());
    let (out, rss) =
        f.run_measured(&["exec", "-o", o, "-e", e, "-H", "o[001-003]", "--", &command]);
    eprintln!("peak RSS writing 20 MB to --outdir: {:.1} MiB", mib(rss));
    assert_rss_within("--outdir", rss, 0);
    assert_eq!(out.status.code(), Some(1), "o003 fails");
    // Nothing on the terminal but ussh's own lines.
    assert!(
        out.stdout.is_empty(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("quiet"), "{stderr}");
    assert_eq!(
        fs::metadata(outdir.join("o001")).expect("o001").len(),
        20_000_000
    );
    assert_eq!(fs::metadata(errdir.join("o001")).expect("o001").len(), 1234);
    assert_eq!(fs::read(outdir.join("o002")).expect("o002"), b"normal\n");
    assert_eq!(fs::read(errdir.join("o002")).expect("o002"), b"quiet\n");
    // The link was not followed: the file behind it is intact, the link
    // still there, and o003 failed saying why.
    assert_eq!(fs::read_to_string(&victim).expect("victim"), "untouched\n");
    let meta = fs::symlink_metadata(outdir.join("o003")).expect("o003");
    assert!(meta.file_type().is_symlink());
    let failure = stderr
        .lines()
        .find(|l| l.contains("] o003: error"))
        .unwrap_or_else(|| panic!("no error line for o003: {stderr}"));
    assert!(
        failure.ends_with(&format!(
            "cannot write {}: it is a symbolic link (not followed)",
            outdir.join("o003").display()
        )),
        "{failure}"
    );

    // A second run replaces the files; with --json the records name them.
    fs::remove_file(outdir.join("o003")).expect("rm link");
    let out = f.run(&[
        "exec",
        "--json",
        "-o",
        o,
        "-H",
        "o[001-003]",
        "--",
        &command,
    ]);
    assert_eq!(out.status.code(), Some(0));
    let recs = json_records(&out);
    for (host, size) in [("o001", 20_000_000), ("o002", 7), ("o003", 20_000_000)] {
        let r = &recs[host];
        let path = outdir.join(host);
        assert_eq!(r["stdout"], serde_json::Value::Null, "{r}");
        assert_eq!(r["stdout_file"], path.to_str().unwrap(), "{r}");
        assert_eq!(r["stdout_truncated"], false, "{r}");
        assert_eq!(fs::metadata(&path).expect("file").len(), size, "{host}");
    }
    assert_eq!(recs["o002"]["stderr"], "quiet\n");
}
