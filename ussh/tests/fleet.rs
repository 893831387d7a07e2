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
        let mut c = Command::new(USSH);
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
    let cases: [(&[&str], &str); 6] = [
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
