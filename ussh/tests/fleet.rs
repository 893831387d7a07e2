//! `ussh` against real sshd processes on loopback: several servers on
//! different ports, reached under host aliases of a temporary ssh config.

use std::collections::BTreeMap;
use std::fs;
use std::io::Read;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant, SystemTime};

use sha2::{Digest, Sha256};
use tempfile::TempDir;
use uring_ssh_testkit::sshd::Sshd;

const USSH: &str = env!("CARGO_BIN_EXE_ussh");
/// GNU time (Debian package `time`, installed by scripts/setup.sh).
const TIME: &str = "/usr/bin/time";

/// Several sshd processes and an ssh config with host aliases on them:
/// `{prefix}NNN` round-robin ([`Fleet::start`]) or as given ([`Fleet::of`]).
struct Fleet {
    sshds: Vec<Sshd>,
    dir: TempDir,
    config: PathBuf,
    known_hosts: PathBuf,
}

impl Fleet {
    fn start(servers: usize, prefix: &str, count: usize) -> Fleet {
        let sshds: Vec<Sshd> = (0..servers).map(|_| Sshd::start()).collect();
        let aliases: Vec<(String, usize)> = (1..=count)
            .map(|i| (format!("{prefix}{i:03}"), (i - 1) % servers))
            .collect();
        Fleet::of(sshds, &aliases)
    }

    /// A fleet of the given servers, with an alias for each `(alias, n)`
    /// on server `n`.
    fn of(sshds: Vec<Sshd>, aliases: &[(String, usize)]) -> Fleet {
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
        for (alias, n) in aliases {
            text.push_str(&f.alias_block(alias, *n));
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

/// Standard base64 decoded (the records' `_b64` fields).
fn unbase64(s: &str) -> Vec<u8> {
    let val = |c: u8| match c {
        b'A'..=b'Z' => c - b'A',
        b'a'..=b'z' => c - b'a' + 26,
        b'0'..=b'9' => c - b'0' + 52,
        b'+' => 62,
        b'/' => 63,
        _ => panic!("not base64: {s:?}"),
    };
    let mut out = Vec::new();
    for q in s.as_bytes().chunks(4) {
        assert_eq!(q.len(), 4, "unpadded base64: {s:?}");
        let n = q
            .iter()
            .take_while(|&&c| c != b'=')
            .fold(0u32, |n, &c| (n << 6) | u32::from(val(c)));
        let pad = q.iter().filter(|&&c| c == b'=').count();
        let n = n << (6 * pad);
        out.extend_from_slice(&n.to_be_bytes()[1..4 - pad]);
    }
    out
}

#[test]
fn json_records_signals_and_bytes_as_they_are() {
    let f = Fleet::start(1, "j", 3);
    // Bytes that are not UTF-8 on stdout, UTF-8 on stderr, then the shell
    // kills itself.
    let out = f.run(&[
        "exec",
        "--json",
        "-H",
        "j001",
        "--",
        "printf '\\377\\376'; printf 'caf\\303\\251\\n' >&2; kill -TERM $$",
    ]);
    assert_eq!(out.status.code(), Some(1));
    let recs = json_records(&out);
    assert_eq!(out.stdout.iter().filter(|&&b| b == b'\n').count(), 1);
    let r = &recs["j001"];
    assert_eq!(r["status"], "failed", "{r}");
    assert_eq!(r["exit_code"], serde_json::Value::Null, "{r}");
    assert_eq!(r["signal"], "TERM", "{r}");
    assert_eq!(r["stdout"], serde_json::Value::Null, "{r}");
    assert_eq!(
        unbase64(r["stdout_b64"].as_str().expect("stdout_b64")),
        [0xff, 0xfe],
        "{r}"
    );
    assert_eq!(r["stderr"], "café\n", "{r}");
    assert!(r.get("stderr_b64").is_none(), "{r}");
    // No progress on stderr with --json: the summary only.
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("] j001:"), "{stderr}");
    assert!(
        stderr.contains("ussh exec: 1 hosts, 0 ok, 1 failed"),
        "{stderr}"
    );

    // KILL, then an exit code; progress asked for.
    let out = f.run(&[
        "exec",
        "--json",
        "--progress",
        "-H",
        "j[001-003]",
        "--",
        "kill -KILL $$",
    ]);
    assert_eq!(out.status.code(), Some(1));
    let recs = json_records(&out);
    assert_eq!(recs.len(), 3);
    assert_eq!(String::from_utf8_lossy(&out.stdout).lines().count(), 3);
    for r in recs.values() {
        assert_eq!(r["exit_code"], serde_json::Value::Null, "{r}");
        assert_eq!(r["signal"], "KILL", "{r}");
        assert_eq!(r["stdout"], "", "{r}");
    }
    let stderr = String::from_utf8_lossy(&out.stderr);
    for h in ["j001", "j002", "j003"] {
        assert!(stderr.contains(&format!("] {h}: failed")), "{stderr}");
    }
    let out = f.run(&["exec", "--json", "-H", "j002", "--", "echo ok; exit 7"]);
    let r = &json_records(&out)["j002"];
    assert_eq!(
        (r["exit_code"].as_i64(), &r["signal"]),
        (Some(7), &serde_json::Value::Null),
        "{r}"
    );
    assert_eq!(r["stdout"], "ok\n", "{r}");
}

#[test]
fn first_contact_accept_new_adds_the_key_and_a_changed_key_stays_refused() {
    let mut f = Fleet::start(1, "k", 1);
    let s = &f.sshds[0];
    let (port, user, key, host_key) = (s.port(), s.user(), s.user_key(), s.host_key_pub());
    let kh = f.dir.path().join("fresh/known_hosts");
    // No port, user nor known_hosts in the config: -o gives them.
    let block = format!(
        "Host new1\n    HostName 127.0.0.1\n    IdentityFile {}\n",
        key.display()
    );
    f.append_config(&block);
    let port_opt = format!("Port={port}");
    let user_opt = format!("User {user}");
    let kh_opt = format!("UserKnownHostsFile={}", kh.display());
    let run = |strict: &str| {
        let strict = format!("StrictHostKeyChecking={strict}");
        f.run(&[
            "exec",
            "-o",
            &port_opt,
            "-o",
            &user_opt,
            "-o",
            &kh_opt,
            "-o",
            &strict,
            "-H",
            "new1",
            "--",
            "echo reached",
        ])
    };
    let entry = format!("[127.0.0.1]:{port} ");

    // Strict: refused, naming the file and both ways to fix it.
    let out = run("yes");
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    let file = kh.display().to_string();
    for want in [
        format!("host key for [127.0.0.1]:{port} is not in known_hosts"),
        format!("checked {file}"),
        "-o StrictHostKeyChecking=accept-new".to_string(),
        format!("ssh-keyscan -p {port} 127.0.0.1 >> {file}"),
    ] {
        assert!(stderr.contains(&want), "{want:?} in {stderr}");
    }
    assert!(!kh.exists(), "strict checking wrote {file}");

    // accept-new: the key is added, owner-only, and the command runs.
    let out = run("accept-new");
    assert_eq!(out.status.code(), Some(0));
    assert_eq!(String::from_utf8_lossy(&out.stdout), "new1: reached\n");
    let text = fs::read_to_string(&kh).expect("known_hosts written");
    assert_eq!(text, format!("{entry}{host_key}\n"));
    use std::os::unix::fs::PermissionsExt;
    let mode = fs::metadata(&kh).expect("stat").permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "{mode:o}");
    // Now strict checking passes, and nothing more is added.
    let out = run("yes");
    assert_eq!(out.status.code(), Some(0));
    assert_eq!(fs::read_to_string(&kh).expect("read"), text);

    // Another server's key under this host's name: a changed key, refused
    // even with accept-new, and the file left as it was.
    let other = Sshd::start();
    let forged = format!("{entry}{}\n", other.host_key_pub());
    fs::write(&kh, &forged).expect("write");
    let out = run("accept-new");
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("has CHANGED"), "{stderr}");
    assert!(stderr.contains(&format!("known_hosts {file}")), "{stderr}");
    assert!(
        stderr.contains(&format!("ssh-keygen -R '[127.0.0.1]:{port}' -f {file}")),
        "{stderr}"
    );
    assert!(out.stdout.is_empty());
    assert_eq!(fs::read_to_string(&kh).expect("read"), forged);

    // Options ussh does not know, or bad values, stop the run at once.
    for (opt, want) in [
        (
            "ForwardAgent=yes",
            "\"ForwardAgent\" is not an ssh option ussh understands",
        ),
        ("Port=0", "Port: bad port"),
        ("StrictHostKeyChecking=maybe", "\"maybe\""),
        ("out", "--outdir DIR"),
    ] {
        let out = f.run(&["exec", "-o", opt, "-H", "new1", "--", "true"]);
        assert_eq!(out.status.code(), Some(2), "{opt}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(stderr.lines().count(), 1, "{stderr}");
        assert!(stderr.contains(want), "{opt}: {stderr}");
    }
}

#[test]
fn operators_options_exclude_maxrc_gather_all_and_quiet() {
    let f = Fleet::start(2, "x", 4);
    // Odd aliases are on the first server.
    let hosts_of = |out: &Output| json_records(out).into_keys().collect::<Vec<_>>();
    let out = f.run(&[
        "exec",
        "--json",
        "-H",
        "x[001-004]",
        "-x",
        "x002",
        "--",
        "true",
    ]);
    assert_eq!(hosts_of(&out), ["x001", "x003", "x004"]);
    let out = f.run(&[
        "exec",
        "--json",
        "-H",
        "x[001-004]",
        "-x",
        "x[003-004]",
        "-x",
        "x001",
        "--",
        "true",
    ]);
    assert_eq!(hosts_of(&out), ["x002"]);
    let out = f.run(&["exec", "-H", "x001", "-x", "x001", "--", "true"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no hosts to work on"));

    // -S: the largest exit code, not 1.
    let codes = on_first_server(&f, "exit 3", "exit 5");
    let out = f.run(&["exec", "-S", "-H", "x[001-004]", "--", &codes]);
    assert_eq!(out.status.code(), Some(5));
    let out = f.run(&["exec", "-S", "-H", "x001,x003", "--", &codes]);
    assert_eq!(out.status.code(), Some(3));
    let out = f.run(&["exec", "-H", "x[001-004]", "--", &codes]);
    assert_eq!(out.status.code(), Some(1));
    let out = f.run(&["exec", "-S", "-H", "x[001-004]", "--", "true"]);
    assert_eq!(out.status.code(), Some(0));
    // A host not reached counts as 255, as ssh's own exit code.
    let mut g = Fleet::start(1, "y", 1);
    g.append_config(&format!(
        "Host down\n    HostName 127.0.0.1\n    Port {}\n",
        closed_port()
    ));
    let out = g.run(&["exec", "-S", "-H", "y001,down", "--", "exit 4"]);
    assert_eq!(out.status.code(), Some(255));

    // -B: stderr in the gathered block, not streamed.
    let out = f.run(&[
        "exec",
        "-B",
        "-H",
        "x[001-002]",
        "--",
        "echo out; sleep 0.2; echo err >&2",
    ]);
    assert_eq!(out.status.code(), Some(0));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.ends_with("x[001-002] (2)\n---------------\nout\nerr\n"),
        "{stdout}"
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !stderr.contains("x001: err") && !stderr.contains("x002: err"),
        "{stderr}"
    );

    // -q: nothing on stderr when every host succeeds; only the failures
    // otherwise. The command's output is still printed.
    let out = f.run(&["exec", "-q", "-H", "x[001-004]", "--", "true"]);
    assert_eq!(out.status.code(), Some(0));
    assert!(out.stdout.is_empty() && out.stderr.is_empty(), "{out:?}");
    let fail_first = on_first_server(&f, "exit 4", "echo fine");
    let out = f.run(&["exec", "-q", "-H", "x[001-002]", "--", &fail_first]);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(String::from_utf8_lossy(&out.stdout), "x002: fine\n");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("x001  failed"), "{stderr}");
    assert!(!stderr.contains("x002"), "{stderr}");
    assert!(
        stderr.contains("ussh exec: 2 hosts, 1 ok, 1 failed"),
        "{stderr}"
    );

    // Each subcommand's help has examples and its exit codes.
    for sub in ["exec", "get", "put"] {
        let out = Command::new(USSH)
            .args([sub, "--help"])
            .output()
            .expect("help");
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(text.contains("Examples:\n  ussh "), "{sub}: {text}");
        assert!(
            text.contains("Exit status: 0 if every host succeeded"),
            "{sub}: {text}"
        );
    }
    let out = Command::new(USSH)
        .args(["exec", "--help"])
        .output()
        .expect("help");
    assert!(String::from_utf8_lossy(&out.stdout).contains("with -S instead"));
}

#[test]
fn get_of_two_paths_with_one_name_is_refused() {
    let dest = tempfile::tempdir().expect("temp dir");
    let out = Command::new(USSH)
        .args([
            "get", "-F", "none", "-H", "h1,h2", "/a/conf", "/b/x", "/b/conf/",
        ])
        .arg(dest.path())
        .stdin(Stdio::null())
        .output()
        .expect("run ussh");
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        stderr,
        "ussh: get: /a/conf and /b/conf/ would both be written to <host>/conf; \
         fetch them in separate runs, into different destinations\n"
    );
    assert_eq!(fs::read_dir(dest.path()).expect("dest").count(), 0);
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
        e.starts_with("jump host bastion: unknown host bastion"),
        "{e}"
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("not supported (ignored): ForwardAgent ("),
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
    let cases: [(&[&str], &str); 12] = [
        (&["exec", "-H", "b[001-", "--", "true"], "unclosed '['"),
        (
            &[
                "exec",
                "-H",
                "b001",
                "--kex",
                "curve25519-sha256,sntrup761x25519-sha512@openssh.com",
                "--",
                "true",
            ],
            "--kex: \"sntrup761x25519-sha512@openssh.com\" is not supported by this build (it has: mlkem768x25519-sha256,",
        ),
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
            &[
                "exec",
                "-H",
                "b001,x/../../y",
                "--outdir",
                outdir,
                "--",
                "true",
            ],
            "--outdir: a host's name must be a plain file name; not usable: \"x/../../y\" (it contains '/')",
        ),
        (
            &["exec", "-H", "..,b001", "-e", outdir, "--", "true"],
            "not usable: \"..\" (it names a directory)",
        ),
        (
            &[
                "exec",
                "--sudo",
                "--askpass-env",
                "USSH_NO_SUCH_VARIABLE",
                "-H",
                "b001",
                "--",
                "true",
            ],
            "--askpass-env USSH_NO_SUCH_VARIABLE: no such variable in the environment",
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
    let (out, rss) = f.run_measured(&[
        "exec",
        "--outdir",
        o,
        "-e",
        e,
        "-H",
        "o[001-003]",
        "--",
        &command,
    ]);
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
        "--outdir",
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

// `ussh get` against a hostile SFTP server: `uring-ssh-evil-sftp` (the root
// package's `tests/evil_sftp/`) run by a real sshd as its `sftp` subsystem.

/// `uring-ssh-evil-sftp`, from the profile directory of this test
/// (`target/<profile>/deps/<test>` -> `target/<profile>/`). Cargo builds it
/// for the root package's tests, not for this package's: a missing binary
/// fails the test, saying how to build it.
fn evil_sftp_bin() -> PathBuf {
    let exe = std::env::current_exe().expect("the test's own path");
    let profile = exe
        .parent()
        .and_then(Path::parent)
        .unwrap_or_else(|| panic!("{} is not in target/<profile>/deps", exe.display()));
    let bin = profile.join("uring-ssh-evil-sftp");
    if !bin.is_file() {
        let flag = if profile.file_name() == Some("release".as_ref()) {
            " --release"
        } else {
            ""
        };
        panic!(
            "{} is missing: the hostile-server tests need it. Build it from the workspace root \
             with `cargo build{flag} --bin uring-ssh-evil-sftp` (`cargo test{flag} --workspace` \
             builds it too), then run the tests again",
            bin.display()
        );
    }
    bin
}

/// What every file the evil server makes up holds.
const PAYLOAD: &[u8] = b"uring-ssh-evil-sftp payload\n";

/// The real files of the served `/evil`, by path below it; besides them
/// `/evil` holds the empty directory `empty`.
fn evil_tree() -> Vec<(&'static str, Vec<u8>)> {
    let data: Vec<u8> = (0..3000u32).map(|i| (i * 31 + 7) as u8).collect();
    vec![
        ("hello.txt", b"hello, world\n".to_vec()),
        ("data.bin", data),
        ("sub/inner.txt", b"inner\n".to_vec()),
        ("sub/deeper/leaf.txt", b"leaf\n".to_vec()),
    ]
}

/// Bytes of [`evil_tree`].
const EVIL_TREE_BYTES: u64 = 13 + 3000 + 6 + 5;

/// Creates `root/evil` holding [`evil_tree`] and `empty`.
fn make_evil_root(root: &Path) {
    let evil = root.join("evil");
    for (rel, data) in evil_tree() {
        let p = evil.join(rel);
        fs::create_dir_all(p.parent().unwrap()).expect("mkdir");
        fs::write(&p, data).expect("write");
    }
    fs::create_dir_all(evil.join("empty")).expect("mkdir empty");
}

/// `p` as one word of sshd's `Subsystem` line (split on spaces, run by
/// `sh -c`): plain characters only.
fn shell_word(p: &Path) -> String {
    let s = p.to_str().expect("a UTF-8 path");
    assert!(
        s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "/._-+".contains(c)),
        "{s:?} cannot go into the Subsystem line unquoted"
    );
    s.to_string()
}

/// An sshd whose `sftp` subsystem is `uring-ssh-evil-sftp` serving `root`
/// (`/` of the SFTP paths) in `scenario` (`none`: a plain, correct
/// server), its hostile names and links pointing into `target`, one line
/// per request appended to `log`.
fn evil_sshd(root: &Path, scenario: &str, target: &Path, log: &Path) -> Sshd {
    let bin = evil_sftp_bin();
    let list = Command::new(&bin)
        .arg("--list")
        .output()
        .unwrap_or_else(|e| panic!("run {}: {e}", bin.display()));
    let known = String::from_utf8_lossy(&list.stdout).into_owned();
    assert!(
        known.lines().any(|l| l == scenario),
        "{} does not know the scenario {scenario:?} (stale? rebuild it); it knows:\n{known}",
        bin.display()
    );
    let command = [
        bin.as_path(),
        Path::new("--root"),
        root,
        Path::new("--scenario"),
        Path::new(scenario),
        Path::new("--target"),
        target,
        Path::new("--log"),
        log,
    ]
    .iter()
    .map(|p| shell_word(p))
    .collect::<Vec<_>>()
    .join(" ");
    Sshd::builder().subsystem_sftp(&command).start()
}

/// One entry of a local tree, as seen without following links.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Item {
    Dir,
    File(Vec<u8>),
    Link(PathBuf),
}

/// Everything under `root` by path relative to it (directories, files
/// with their bytes, links with their targets); links are not followed.
fn snapshot(root: &Path) -> BTreeMap<PathBuf, Item> {
    let mut out = BTreeMap::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in fs::read_dir(&d).unwrap_or_else(|e| panic!("read_dir {}: {e}", d.display())) {
            let p = e.expect("dir entry").path();
            let rel = p.strip_prefix(root).expect("under root").to_path_buf();
            let t = fs::symlink_metadata(&p).expect("lstat").file_type();
            let item = if t.is_symlink() {
                Item::Link(fs::read_link(&p).expect("readlink"))
            } else if t.is_dir() {
                stack.push(p.clone());
                Item::Dir
            } else {
                Item::File(fs::read(&p).unwrap_or_else(|e| panic!("read {}: {e}", p.display())))
            };
            out.insert(rel, item);
        }
    }
    out
}

/// Panics, listing every difference, unless the trees are the same.
fn assert_same_tree(what: &str, got: &BTreeMap<PathBuf, Item>, want: &BTreeMap<PathBuf, Item>) {
    let show = |i: &Item| match i {
        Item::Dir => "directory".to_string(),
        Item::File(b) => format!("file of {} bytes", b.len()),
        Item::Link(t) => format!("link to {}", t.display()),
    };
    let mut diffs = Vec::new();
    for (p, g) in got {
        match want.get(p) {
            None => diffs.push(format!("unexpected {}: {}", p.display(), show(g))),
            Some(w) if w != g => diffs.push(format!(
                "changed {}: {} (wanted {})",
                p.display(),
                show(g),
                show(w)
            )),
            Some(_) => {}
        }
    }
    for (p, w) in want {
        if !got.contains_key(p) {
            diffs.push(format!("missing {}: {}", p.display(), show(w)));
        }
    }
    assert!(diffs.is_empty(), "{what}:\n  {}", diffs.join("\n  "));
}

/// Adds [`evil_tree`] (with `empty` and the directories) at `at`.
fn add_evil_tree(tree: &mut BTreeMap<PathBuf, Item>, at: &Path) {
    tree.insert(at.to_path_buf(), Item::Dir);
    for d in ["sub", "sub/deeper", "empty"] {
        tree.insert(at.join(d), Item::Dir);
    }
    for (rel, data) in evil_tree() {
        tree.insert(at.join(rel), Item::File(data));
    }
}

/// A listing scenario and what `ussh get` must make of it.
struct Hostile {
    /// The first name refused (escaped as ussh shows it) and why, or
    /// `None` when nothing is refused.
    refused: Option<(String, &'static str)>,
    /// Further refusals, counted in the error line.
    more: usize,
    /// What correctly lands beside the real tree in DEST/evil/evil.
    extra: Vec<(&'static str, Item)>,
}

impl Hostile {
    /// `scenario` with its hostile names and links pointing into `target`.
    fn new(scenario: &'static str, target: &Path) -> Hostile {
        let refused = |name: &str, why| Some((name.to_string(), why));
        let (refused, more, extra) = match scenario {
            // `..` and `.` (listed again, as files) are not entries.
            "dotdot" => (refused("../../escape", "holds a '/'"), 0, vec![]),
            "abs-name" => (
                refused(&format!("{}/abs-name", target.display()), "holds a '/'"),
                0,
                vec![],
            ),
            // `sub/inner`, then `nosub/inner`.
            "slash-name" => (refused("sub/inner", "holds a '/'"), 1, vec![]),
            "nul-name" => (refused("nul\\x00name", "holds a NUL byte"), 0, vec![]),
            "empty-name" => (refused("", "empty name"), 0, vec![]),
            // The link is kept (`--links keep`: as a link, never followed);
            // the directory `x` listed after it is a second `x`.
            "link-then-file" => (
                refused("x", "listed more than once"),
                0,
                vec![("x", Item::Link(target.to_path_buf()))],
            ),
            // The directory comes first and is kept, with its file.
            "dir-and-link" => (
                refused("dl", "listed more than once"),
                0,
                vec![
                    ("dl", Item::Dir),
                    ("dl/inner", Item::File(PAYLOAD.to_vec())),
                ],
            ),
            // Kept as a link: nothing to refuse.
            "link-to-root" => (None, 0, vec![("root-link", Item::Link("/".into()))]),
            _ => panic!("no expectations for {scenario:?}"),
        };
        Hostile {
            refused,
            more,
            extra,
        }
    }

    fn files(&self) -> u64 {
        4 + self
            .extra
            .iter()
            .filter(|(_, i)| matches!(i, Item::File(_)))
            .count() as u64
    }
}

/// `ussh get -H evil,good1,good2 /evil DEST` for each listing scenario, the
/// evil host lying in it, the good ones serving the same tree: the evil
/// host fails (or, with nothing to refuse, keeps a link as a link), names
/// what it refused, and nothing at all changes outside DEST/<host>/evil:
/// not a sentinel beside DEST or in it, not the directory behind links
/// planted in the evil host's landing place, not the server's target.
///
/// The remote path must be `/evil` for every host of one run: the evil
/// server makes its entries up in the listing of exactly `/evil`. So the
/// good hosts run the same binary without a scenario (a plain, correct
/// server of a root holding the same `/evil`); OpenSSH's own SFTP server
/// is covered by `get_and_put_trees_on_10_hosts_with_update`.
#[test]
fn get_from_a_hostile_server_writes_only_beneath_its_host_directory() {
    let logs = tempfile::Builder::new()
        .prefix("ussh-hostile-logs-")
        .tempdir()
        .expect("temp dir");
    let work = tempfile::Builder::new()
        .prefix("ussh-hostile-")
        .tempdir()
        .expect("temp dir");
    let w = work.path();
    let (evil_root, good_root) = (w.join("srv/evil-root"), w.join("srv/good-root"));
    make_evil_root(&evil_root);
    make_evil_root(&good_root);
    let scenarios = [
        "dotdot",
        "abs-name",
        "slash-name",
        "nul-name",
        "empty-name",
        "link-then-file",
        "dir-and-link",
        "link-to-root",
    ];
    let start = Instant::now();
    let unused = w.join("srv/unused-target");
    fs::create_dir_all(&unused).expect("mkdir");
    let mut sshds: Vec<Sshd> = ["good1", "good2"]
        .iter()
        .map(|g| evil_sshd(&good_root, "none", &unused, &logs.path().join(g)))
        .collect();
    for sc in scenarios {
        let target = w.join(sc).join("target");
        fs::create_dir_all(&target).expect("mkdir target");
        sshds.push(evil_sshd(&evil_root, sc, &target, &logs.path().join(sc)));
    }
    let good = [("good1".to_string(), 0), ("good2".to_string(), 1)];
    let mut f = Fleet::of(sshds, &good);
    eprintln!(
        "{} sshd started in {:?}",
        scenarios.len() + 2,
        start.elapsed()
    );
    let good_blocks = f.alias_block("good1", 0) + &f.alias_block("good2", 1);

    let mut results = Vec::new();
    for (i, sc) in scenarios.into_iter().enumerate() {
        let base = w.join(sc);
        let target = base.join("target");
        let case = Hostile::new(sc, &target);
        let evil_block = f.alias_block("evil", i + 2);
        f.write_config(&format!("{good_blocks}{evil_block}"));

        // Sentinels: a file beside DEST, a directory in it, and links in
        // the evil host's landing place to a directory outside.
        let dest = base.join("dest");
        let outside = base.join("outside");
        fs::write(base.join("beside.txt"), "beside DEST\n").expect("write");
        fs::create_dir_all(&outside).expect("mkdir");
        fs::write(outside.join("keep.txt"), "outside\n").expect("write");
        fs::create_dir_all(dest.join("other")).expect("mkdir");
        fs::write(dest.join("other/keep.txt"), "other\n").expect("write");
        let landing = dest.join("evil/evil");
        fs::create_dir_all(&landing).expect("mkdir");
        // `nosub` is where `nosub/inner` (slash-name) would go.
        for name in ["planted", "nosub"] {
            std::os::unix::fs::symlink(&outside, landing.join(name)).expect("symlink");
        }
        let before = snapshot(w);

        let t = Instant::now();
        let out = f.run(&[
            "get",
            "--json",
            "--progress",
            "--timeout",
            "60",
            "-H",
            "evil,good1,good2",
            "/evil",
            dest.to_str().unwrap(),
        ]);
        let took = t.elapsed();

        // Exactly the three trees were added, nothing else changed.
        let rel = |p: &Path| p.strip_prefix(w).expect("under work").to_path_buf();
        let mut want = before.clone();
        for g in ["good1", "good2"] {
            want.insert(rel(&dest.join(g)), Item::Dir);
            add_evil_tree(&mut want, &rel(&dest.join(g).join("evil")));
        }
        add_evil_tree(&mut want, &rel(&landing));
        for (p, item) in &case.extra {
            want.insert(rel(&landing.join(p)), item.clone());
        }
        assert_same_tree(&format!("{sc}: the work directory"), &snapshot(w), &want);
        assert_eq!(
            fs::read_dir(&target).expect("read target").count(),
            0,
            "{sc}: the server's target"
        );

        let stderr = String::from_utf8_lossy(&out.stderr);
        let line = stderr
            .lines()
            .find(|l| l.contains("] evil: "))
            .unwrap_or_else(|| panic!("{sc}: no line for the evil host:\n{stderr}"));
        let recs = json_records(&out);
        assert_eq!(recs.len(), 3, "{sc}");
        for g in ["good1", "good2"] {
            let r = &recs[g];
            assert_eq!(r["status"], "ok", "{sc}: {r}");
            assert_eq!(r["files"], 4, "{sc}: {r}");
            assert_eq!(r["bytes"], EVIL_TREE_BYTES, "{sc}: {r}");
            assert_eq!(r["error"], serde_json::Value::Null, "{sc}: {r}");
        }
        let r = &recs["evil"];
        assert_eq!(r["files"], case.files(), "{sc}: {r}");
        assert_eq!(r["failed_files"], 0, "{sc}: {r}");
        match &case.refused {
            Some((name, why)) => {
                assert_eq!(out.status.code(), Some(1), "{sc}");
                // The listed directory is named `/evil/` (the remote
                // root joined with an empty path); `/evil` would do too.
                let said = |dir: &str| {
                    let e = format!("{dir}: refused name \"{name}\" listed in {dir}: {why}");
                    match case.more {
                        0 => e,
                        1 => format!("{e} (and 1 more problem)"),
                        n => format!("{e} (and {n} more problems)"),
                    }
                };
                let error = r["error"].as_str().unwrap_or_else(|| panic!("{sc}: {r}"));
                assert_eq!(r["status"], "failed", "{sc}: {r}");
                assert!(
                    [said("/evil"), said("/evil/")].contains(&error.to_string()),
                    "{sc}: {r}"
                );
                assert!(
                    line.starts_with("ussh: [")
                        && line.contains(&format!("] evil: failed {} files ", case.files()))
                        && line.ends_with(&format!(": {error}")),
                    "{sc}: {line}"
                );
            }
            None => {
                assert_eq!(out.status.code(), Some(0), "{sc}");
                assert_eq!(r["status"], "ok", "{sc}: {r}");
                assert_eq!(r["error"], serde_json::Value::Null, "{sc}: {r}");
                assert!(line.contains("] evil: ok "), "{sc}: {line}");
            }
        }
        results.push(format!(
            "{sc}: exit {:?} in {took:.2?}; {line}",
            out.status.code()
        ));
    }
    eprintln!(
        "hostile listings, {:?} in all:\n  {}",
        start.elapsed(),
        results.join("\n  ")
    );
}

/// `--links skip`, `--safe-links` and `--links safe` against hosts listing
/// a link to `/` and one to `../../..` beside the tree's own links (one
/// staying inside at each level, one climbing out): skipped links are
/// left out, and a host that only skipped links is ok. The default
/// (`keep`) run shows what the others leave out.
#[test]
fn get_link_policies_leave_out_links_out_of_the_tree() {
    let logs = tempfile::Builder::new()
        .prefix("ussh-links-logs-")
        .tempdir()
        .expect("temp dir");
    let work = tempfile::Builder::new()
        .prefix("ussh-links-")
        .tempdir()
        .expect("temp dir");
    let w = work.path();
    let root = w.join("srv/root");
    make_evil_root(&root);
    let own_links = [
        ("inside", "hello.txt", true),
        ("sub/up-one", "../hello.txt", true),
        ("sub/up-two", "../../beside-the-tree", false),
    ];
    for (at, to, _) in own_links {
        std::os::unix::fs::symlink(to, root.join("evil").join(at)).expect("symlink");
    }
    // Host, scenario, the link it makes up.
    let hosts = [
        ("lroot", "link-to-root", ("root-link", "/")),
        ("lparent", "link-to-parent", ("up", "../../..")),
    ];
    let mut sshds = Vec::new();
    for (host, sc, _) in hosts {
        let target = w.join(format!("target-{host}"));
        fs::create_dir_all(&target).expect("mkdir");
        sshds.push(evil_sshd(&root, sc, &target, &logs.path().join(host)));
    }
    let aliases: Vec<(String, usize)> = hosts
        .iter()
        .enumerate()
        .map(|(i, (h, _, _))| (h.to_string(), i))
        .collect();
    let f = Fleet::of(sshds, &aliases);

    #[derive(Clone, Copy, PartialEq)]
    enum Kept {
        All,
        None,
        Inside,
    }
    let runs: [(&str, &[&str], Kept); 4] = [
        ("keep", &[], Kept::All),
        ("skip", &["--links", "skip"], Kept::None),
        ("safe-links", &["--safe-links"], Kept::Inside),
        ("links-safe", &["--links", "safe"], Kept::Inside),
    ];
    for (name, flags, kept) in runs {
        let dest = w.join(name);
        let before = snapshot(w);
        let mut args = vec!["get", "--json", "--timeout", "60"];
        args.extend_from_slice(flags);
        args.extend(["-H", "lroot,lparent", "/evil", dest.to_str().unwrap()]);
        let t = Instant::now();
        let out = f.run(&args);
        eprintln!(
            "{name}: exit {:?} in {:.2?}",
            out.status.code(),
            t.elapsed()
        );

        // Skipped links are not failures.
        assert_eq!(out.status.code(), Some(0), "{name}");
        let recs = json_records(&out);
        for (host, _, _) in hosts {
            let r = &recs[host];
            assert_eq!(r["status"], "ok", "{name}: {r}");
            assert_eq!(r["files"], 4, "{name}: {r}");
            assert_eq!(r["error"], serde_json::Value::Null, "{name}: {r}");
            // The tree's own three links and the one the server made up.
            let skipped = match kept {
                Kept::All => 0,
                Kept::None => 4,
                Kept::Inside => 2,
            };
            assert_eq!(r["links_skipped"], skipped, "{name}: {r}");
        }
        let rel = |p: &Path| p.strip_prefix(w).expect("under work").to_path_buf();
        let mut want = before.clone();
        want.insert(rel(&dest), Item::Dir);
        for (host, _, (link, to)) in hosts {
            let landing = rel(&dest.join(host).join("evil"));
            want.insert(rel(&dest.join(host)), Item::Dir);
            add_evil_tree(&mut want, &landing);
            for (at, target, inside) in own_links {
                if kept == Kept::All || (kept == Kept::Inside && inside) {
                    want.insert(landing.join(at), Item::Link(target.into()));
                }
            }
            if kept == Kept::All {
                want.insert(landing.join(link), Item::Link(to.into()));
            }
        }
        assert_same_tree(&format!("{name}: the work directory"), &snapshot(w), &want);
    }
}

/// A host name that is not one path component cannot name a directory of
/// DEST: `ussh get` refuses it with one line and exit code 2 before
/// connecting anywhere, and creates nothing. The same aliases lead to a
/// working server: without the check, the files would land outside DEST.
#[test]
fn get_refuses_host_names_that_are_not_one_path_component() {
    let logs = tempfile::Builder::new()
        .prefix("ussh-names-logs-")
        .tempdir()
        .expect("temp dir");
    let work = tempfile::Builder::new()
        .prefix("ussh-names-")
        .tempdir()
        .expect("temp dir");
    let w = work.path();
    let root = w.join("srv/root");
    make_evil_root(&root);
    let log = logs.path().join("good1");
    let sshd = evil_sshd(&root, "none", &w.join("srv"), &log);
    let mut f = Fleet::of(vec![sshd], &[("good1".to_string(), 0)]);
    let escape = "evil/../../escape";
    let blocks = f.alias_block(escape, 0) + &f.alias_block("..", 0);
    f.append_config(&blocks);

    let dest = w.join("dest");
    let per_host = w.join("dest/{host}");
    let plain = |bad: &str, why: &str| {
        format!("ussh: get: a host's name must be a plain file name; not usable: \"{bad}\" ({why})")
    };
    let cases = [
        (
            format!("good1,{escape}"),
            &dest,
            plain(escape, "it contains '/'"),
        ),
        (
            format!("good1,{escape}"),
            &per_host,
            plain(escape, "it contains '/'"),
        ),
        (
            "..,good1".to_string(),
            &dest,
            plain("..", "it names a directory"),
        ),
    ];
    for (hosts, to, want) in &cases {
        let before = snapshot(w);
        let out = f.run(&["get", "-H", hosts, "/evil", to.to_str().unwrap()]);
        assert_eq!(out.status.code(), Some(2), "{hosts}");
        assert!(out.stdout.is_empty(), "{hosts}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(stderr, format!("{want}\n"), "{hosts}");
        assert!(!dest.exists(), "{hosts}: {} created", dest.display());
        assert_same_tree(
            &format!("{hosts}: the work directory"),
            &snapshot(w),
            &before,
        );
    }
    let requests = fs::read_to_string(&log).unwrap_or_default();
    assert!(
        !requests.contains("INIT"),
        "a refused run reached the server:\n{requests}"
    );

    // The server and the alias work: only the name stood in the way.
    let out = f.run(&["get", "-H", "good1", "/evil", dest.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(0));
    let mut want = BTreeMap::new();
    add_evil_tree(&mut want, Path::new("good1/evil"));
    want.insert(PathBuf::from("good1"), Item::Dir);
    assert_same_tree("the control run", &snapshot(&dest), &want);
}

/// 40 aliases of one Dropbear, which resets a client address's sixth
/// unauthenticated connection: paced per server address, every host
/// succeeds. `--json` names each host's key exchange, and the summary says
/// that none was post-quantum (Dropbear 2022.83 has none), unless told not to.
#[test]
fn forty_aliases_of_one_dropbear_all_succeed() {
    let db = uring_ssh_testkit::dropbear::Dropbear::start();
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("ssh_config");
    let mut text = String::new();
    for i in 1..=40 {
        text.push_str(&format!(
            "Host d{i:03}\n    HostName 127.0.0.1\n    Port {}\n    User {}\n    IdentityFile {}\n    UserKnownHostsFile {}\n",
            db.addr().port(),
            db.user(),
            db.user_key().display(),
            db.known_hosts().display()
        ));
    }
    fs::write(&config, text).unwrap();
    let run = |extra: &[&str]| {
        let out = Command::new(USSH)
            .args(["exec", "-F"])
            .arg(&config)
            .args(["--no-agent", "-H", "d[001-040]"])
            .args(extra)
            .args(["--", "echo", "up"])
            .env_remove("SSH_AUTH_SOCK")
            .stdin(Stdio::null())
            .output()
            .expect("run ussh");
        eprintln!("{}", String::from_utf8_lossy(&out.stderr));
        out
    };
    let out = run(&["--json"]);
    assert_eq!(out.status.code(), Some(0), "every host succeeds");
    let records = json_records(&out);
    assert_eq!(records.len(), 40);
    for (host, r) in &records {
        assert_eq!(r["status"], "ok", "{host}: {r}");
        assert_eq!(r["kex"], "curve25519-sha256", "{host}: {r}");
    }
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("40 of 40 hosts negotiated no post-quantum key exchange"),
        "{stderr}"
    );
    let out = run(&["-q", "--no-pq-warning"]);
    assert_eq!(out.status.code(), Some(0));
    assert!(!String::from_utf8_lossy(&out.stderr).contains("post-quantum"));
    // Without pacing (one gate slot per host), Dropbear's limit shows, and
    // the error says what the likely cause is.
    let out = run(&["--per-address", "40", "--retries", "0"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(1),
        "40 connections at once exceed Dropbear's 5"
    );
    assert!(
        stderr.contains("limit unauthenticated connections"),
        "{stderr}"
    );
}

/// An ssh config written for OpenSSH may name algorithms this build lacks:
/// those are left out and the host connects with the rest; a list with
/// nothing this build has blocks only its host, with a line naming it.
#[test]
fn config_algorithm_lists_keep_what_the_build_has() {
    let mut f = Fleet::start(1, "k", 2);
    f.append_config(
        "Host k001\n    KexAlgorithms sntrup761x25519-sha512@openssh.com,curve25519-sha256\n\
         Host k002\n    KexAlgorithms sntrup761x25519-sha512@openssh.com\n",
    );
    let out = f.run(&["exec", "--json", "-H", "k[001-002]", "--", "true"]);
    let records = json_records(&out);
    assert_eq!(records["k001"]["status"], "ok", "{:?}", records["k001"]);
    assert_eq!(records["k001"]["kex"], "curve25519-sha256");
    assert_eq!(records["k002"]["status"], "error");
    let error = records["k002"]["error"].as_str().unwrap();
    assert!(
        error.contains(
            "KexAlgorithms sntrup761x25519-sha512@openssh.com: none of these is supported"
        ),
        "{error}"
    );
}

/// The summary's `threads:` line as (thread count, per thread its hosts
/// and the rest of its entry, the bytes it moved when moving files).
fn threads_line(stderr: &str) -> Option<(usize, Vec<(usize, String)>)> {
    let line = stderr.lines().find(|l| l.starts_with("threads: "))?;
    let mut parts = line.split(" · ");
    let n = parts.next()?["threads: ".len()..].parse().ok()?;
    let per: Vec<(usize, String)> = parts
        .enumerate()
        .map(|(t, p)| {
            let rest = p
                .strip_prefix(&format!("t{t} "))
                .unwrap_or_else(|| panic!("entry {t} of {line:?}"));
            let (hosts, rest) = rest.split_once(" hosts").expect("hosts");
            (hosts.parse().expect("host count"), rest.trim().to_string())
        })
        .collect();
    assert_eq!(per.len(), n, "{line}");
    Some((n, per))
}

/// Bytes as ussh's summary writes them (`1.5 MiB`).
fn human_bytes(n: u64) -> String {
    let units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let (mut v, mut u) = (n as f64, 0);
    while v >= 1024.0 && u + 1 < units.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", units[u])
    }
}

/// Sorted lines.
fn sorted_lines(b: &[u8]) -> Vec<String> {
    let mut v: Vec<String> = String::from_utf8_lossy(b)
        .lines()
        .map(String::from)
        .collect();
    v.sort();
    v
}

/// `--threads 1` and `--threads 2` do the same work with the same output:
/// streamed lines whole and prefixed (hosts on both threads printing at
/// once), gathered blocks, JSON records, exit codes and files; the summary
/// names each thread with its hosts (and, moving files, its bytes), and
/// JSON records name their host's thread.
#[test]
fn one_thread_or_two_give_the_same_results() {
    let f = Fleet::start(2, "w", 10);
    let hosts = "w[001-010]";
    let port_of = |i: usize| f.sshds[(i - 1) % 2].port();
    let lines = 300;
    let command = format!(
        "p=$(echo $SSH_CONNECTION | cut -d' ' -f4); for i in $(seq 1 {lines}); do \
         echo \"line $i from port $p\"; echo \"err $i\" >&2; done; exit $((p % 3))"
    );
    let exec = |threads: &str, extra: &[&str]| {
        let mut args = vec!["exec", "--threads", threads, "-H", hosts];
        args.extend_from_slice(extra);
        args.extend_from_slice(&["--", &command]);
        f.run(&args)
    };
    let want_code = if (1..=10).any(|i| port_of(i) % 3 != 0) {
        1
    } else {
        0
    };

    // Streamed.
    let one = exec("1", &[]);
    let two = exec("2", &[]);
    for out in [&one, &two] {
        assert_eq!(out.status.code(), Some(want_code));
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert_eq!(stdout.lines().count(), 10 * lines, "{stdout}");
        for l in stdout.lines() {
            let (host, rest) = l.split_once(": ").unwrap_or_else(|| panic!("{l:?}"));
            let i: usize = host[1..].parse().unwrap_or_else(|_| panic!("{l:?}"));
            let (_, port) = rest
                .rsplit_once(" from port ")
                .unwrap_or_else(|| panic!("{l:?}"));
            assert!(rest.starts_with("line "), "{l:?}");
            assert_eq!(port, port_of(i).to_string(), "{l:?}");
        }
    }
    assert_eq!(sorted_lines(&one.stdout), sorted_lines(&two.stdout));
    let err_lines = |out: &Output| -> Vec<String> {
        sorted_lines(&out.stderr)
            .into_iter()
            .filter(|l| l.starts_with('w') && l.contains(": err "))
            .collect()
    };
    assert_eq!(err_lines(&one).len(), 10 * lines);
    assert_eq!(err_lines(&one), err_lines(&two));
    let one_err = String::from_utf8_lossy(&one.stderr);
    let two_err = String::from_utf8_lossy(&two.stderr);
    assert_eq!(threads_line(&one_err), None, "{one_err}");
    let (n, per) = threads_line(&two_err).expect("a threads line");
    assert_eq!(n, 2);
    assert!(per.iter().all(|(h, _)| *h > 0), "{per:?}");
    assert_eq!(per.iter().map(|(h, _)| h).sum::<usize>(), 10);
    assert!(per.iter().all(|(_, bytes)| bytes.is_empty()), "{per:?}");

    // Gathered: the same blocks, byte for byte.
    let one = exec("1", &["-b"]);
    let two = exec("2", &["-b"]);
    assert_eq!(one.status.code(), Some(want_code));
    assert_eq!(two.status.code(), Some(want_code));
    assert!(!one.stdout.is_empty());
    assert_eq!(one.stdout, two.stdout);

    // JSON: the same records but for timing; with several threads each
    // names its thread, and the summary's counts agree. More threads than
    // hosts start one per host.
    let one = exec("1", &["--json"]);
    let two = exec("2", &["--json"]);
    let many = exec("64", &["--json"]);
    let strip = |mut r: serde_json::Value| {
        r.as_object_mut().expect("object").remove("duration");
        r
    };
    let one_recs = json_records(&one);
    for (out, threads) in [(&two, 2), (&many, 10)] {
        assert_eq!(out.status.code(), Some(want_code));
        let recs = json_records(out);
        assert_eq!(recs.len(), 10);
        let mut per_thread = vec![0usize; threads];
        for (host, r) in recs {
            let t = r["thread"].as_u64().unwrap_or_else(|| panic!("{r}")) as usize;
            per_thread[t] += 1;
            let mut r = strip(r);
            r.as_object_mut().unwrap().remove("thread");
            assert_eq!(r, strip(one_recs[&host].clone()), "{host}");
        }
        let stderr = String::from_utf8_lossy(&out.stderr);
        let (n, per) = threads_line(&stderr).expect("a threads line");
        assert_eq!(n, threads);
        let hosts: Vec<usize> = per.iter().map(|(h, _)| *h).collect();
        assert_eq!(hosts, per_thread, "{stderr}");
    }
    for r in one_recs.values() {
        assert!(r.get("thread").is_none(), "{r}");
    }

    let out = exec("0", &[]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--threads"));
}

/// `get` and `put` with one thread or two move the same files; the summary
/// says what each thread moved.
#[test]
fn one_thread_or_two_move_the_same_files() {
    let f = Fleet::start(2, "x", 8);
    let hosts = "x[001-008]";
    let work = f.dir.path();
    let src = work.join("src/tree");
    for i in 0..40u64 {
        let d = src.join(format!("d{}", i % 4));
        fs::create_dir_all(&d).expect("mkdir");
        let len = ((i * 2654435761) % 8192) as usize;
        fs::write(d.join(format!("f{i:02}")), random_bytes(len, i + 1)).expect("write");
    }
    fs::write(src.join("large.bin"), random_bytes((3 << 20) + 5, 99)).expect("write");
    let want = tree_hashes(&src);
    let src_s = src.to_str().unwrap();

    // The summary's bytes per thread are those of the hosts it ran.
    let check_threads = |out: &Output, threads: usize| {
        let recs = json_records(out);
        assert_eq!(recs.len(), 8);
        let stderr = String::from_utf8_lossy(&out.stderr);
        if threads == 1 {
            assert_eq!(threads_line(&stderr), None, "{stderr}");
            return;
        }
        let mut per_thread = vec![(0usize, 0u64); threads];
        for r in recs.values() {
            let t = r["thread"].as_u64().expect("thread") as usize;
            per_thread[t].0 += 1;
            per_thread[t].1 += r["bytes"].as_u64().expect("bytes");
        }
        let want: Vec<(usize, String)> = per_thread
            .iter()
            .map(|&(h, b)| (h, human_bytes(b)))
            .collect();
        assert_eq!(threads_line(&stderr), Some((threads, want)), "{stderr}");
        assert!(per_thread.iter().all(|&(h, _)| h > 0), "{per_thread:?}");
    };
    for threads in [1, 2] {
        let t = threads.to_string();
        let dest = work.join(format!("got{threads}"));
        let out = f.run(&[
            "get",
            "--json",
            "--threads",
            &t,
            "-H",
            hosts,
            src_s,
            dest.to_str().unwrap(),
        ]);
        assert_eq!(out.status.code(), Some(0));
        check_threads(&out, threads);
        for i in 1..=8 {
            let host = format!("x{i:03}");
            assert_eq!(tree_hashes(&dest.join(&host).join("tree")), want, "{host}");
        }

        let remote = work.join(format!("pushed{threads}/{{host}}"));
        let out = f.run(&[
            "put",
            "--json",
            "--threads",
            &t,
            "-H",
            hosts,
            src_s,
            remote.to_str().unwrap(),
        ]);
        assert_eq!(out.status.code(), Some(0));
        check_threads(&out, threads);
        for i in 1..=8 {
            let host = format!("x{i:03}");
            let got = tree_hashes(
                &work
                    .join(format!("pushed{threads}"))
                    .join(&host)
                    .join("tree"),
            );
            assert_eq!(got, want, "{host}");
        }
    }
}

/// Hosts reachable only through a `ProxyCommand` (`ssh -W` via the first
/// server as a bastion) all succeed; `-o ProxyCommand=none` takes the
/// proxy away and they fail by name; a proxy that exits fails its host
/// alone, promptly.
#[test]
fn proxy_commands_reach_hosts_behind_a_bastion() {
    let mut f = Fleet::start(2, "direct", 1);
    let (bastion, target) = (&f.sshds[0], &f.sshds[1]);
    // A name only the proxy's route knows: resolving it here fails.
    let hidden = "behind-bastion.invalid";
    let mut kh = fs::read_to_string(&f.known_hosts).expect("known_hosts");
    kh.push_str(&format!(
        "[{hidden}]:{} {}\n",
        target.port(),
        target.host_key_pub()
    ));
    fs::write(&f.known_hosts, kh).expect("known_hosts");
    let proxy = format!(
        "ssh -o BatchMode=yes -o IdentitiesOnly=yes -o StrictHostKeyChecking=yes \
         -o UserKnownHostsFile={} -i {} -p {} -W 127.0.0.1:%p {}@127.0.0.1",
        f.known_hosts.display(),
        bastion.user_key().display(),
        bastion.port(),
        bastion.user(),
    );
    let mut text = String::new();
    for i in 1..=8 {
        text.push_str(&format!(
            "Host pc{i:03}\n    HostName {hidden}\n    Port {}\n    User {}\n    IdentityFile {}\n    \
             UserKnownHostsFile {}\n    ProxyCommand {proxy}\n",
            target.port(),
            target.user(),
            target.user_key().display(),
            f.known_hosts.display(),
        ));
    }
    text.push_str(&format!(
        "Host broken\n    HostName 127.0.0.1\n    Port {}\n    ProxyCommand exit 3\n",
        target.port()
    ));
    f.append_config(&text);
    let start = Instant::now();
    let out = f.run(&[
        "exec",
        "--json",
        "--retries",
        "0",
        "-H",
        "pc[001-008],broken,direct001",
        "--",
        "echo through",
    ]);
    assert!(
        start.elapsed() < Duration::from_secs(30),
        "{:?}",
        start.elapsed()
    );
    assert_eq!(out.status.code(), Some(1));
    let recs = json_records(&out);
    for i in 1..=8 {
        let r = &recs[&format!("pc{i:03}")];
        assert_eq!(r["status"], "ok", "{r}");
        assert_eq!(r["stdout"], "through\n");
    }
    assert_eq!(recs["direct001"]["status"], "ok");
    let e = recs["broken"]["error"].as_str().expect("error").to_string();
    assert!(e.contains("through ProxyCommand \"exit 3\""), "{e}");

    let out = f.run(&[
        "exec",
        "--json",
        "-o",
        "ProxyCommand=none",
        "--retries",
        "0",
        "-H",
        "pc001",
        "--",
        "true",
    ]);
    assert_eq!(out.status.code(), Some(1));
    let e = json_records(&out)["pc001"]["error"]
        .as_str()
        .expect("error")
        .to_string();
    assert!(e.contains(&format!("unknown host {hidden}")), "{e}");
}

/// Hosts behind jump hosts, no process spawned: 16 hosts through one jump
/// share its sessions (two: eight hosts each), a chain of two jumps from
/// the config's `ProxyJump` works, and hosts behind a jump host that is
/// down fail alone, naming it.
#[test]
fn jump_hosts_carry_the_hosts_behind_them() {
    let mut f = Fleet::start(3, "unused", 0);
    let closed = closed_port();
    let mut text = String::new();
    for (alias, n) in [("j1", 0), ("j2", 1)] {
        text.push_str(&f.alias_block(alias, n));
    }
    text.push_str(&format!(
        "Host down\n    HostName 127.0.0.1\n    Port {closed}\n"
    ));
    for i in 1..=16 {
        text.push_str(&f.alias_block(&format!("t{i:03}"), 2));
    }
    for i in 1..=4 {
        text.push_str(&f.alias_block(&format!("c{i:03}"), 2));
        text.push_str("    ProxyJump j1,j2\n");
    }
    for i in 1..=2 {
        text.push_str(&f.alias_block(&format!("d{i:03}"), 2));
        text.push_str("    ProxyJump down\n");
    }
    f.append_config(&text);
    let accepted = |n: usize| f.sshds[n].log().matches("Accepted publickey").count();

    // Every host's command overlaps the others', so that all 16 hold a
    // place on a jump session at once.
    let out = f.run(&[
        "exec",
        "--json",
        "--threads",
        "1",
        "-J",
        "j1",
        "-H",
        "t[001-016]",
        "--",
        "sleep 1; echo behind",
    ]);
    assert_eq!(out.status.code(), Some(0));
    let recs = json_records(&out);
    assert_eq!(recs.len(), 16);
    assert!(recs.values().all(|r| r["stdout"] == "behind\n"), "{recs:?}");
    assert_eq!(accepted(0), 2, "16 hosts, 8 per jump session");
    assert_eq!(accepted(2), 16);

    let out = f.run(&[
        "exec",
        "--json",
        "--retries",
        "0",
        "-H",
        "c[001-004],d[001-002]",
        "--",
        "echo chained",
    ]);
    assert_eq!(out.status.code(), Some(1));
    let recs = json_records(&out);
    for i in 1..=4 {
        assert_eq!(recs[&format!("c{i:03}")]["stdout"], "chained\n");
    }
    for i in 1..=2 {
        let e = recs[&format!("d{i:03}")]["error"].as_str().expect("error");
        assert!(e.starts_with("jump host down: connection refused"), "{e}");
    }
    assert!(accepted(1) >= 1, "the chain's second hop was used");
    assert!(accepted(0) >= 3, "the chain's first hop was used");

    // A first hop's own ProxyJump is followed (as by OpenSSH): e001 names
    // only j2b, and j2b (j2 under another name) is reached through j1.
    let mut text = f.alias_block("j2b", 1);
    text.push_str("    ProxyJump j1\n");
    text.push_str(&f.alias_block("e001", 2));
    text.push_str("    ProxyJump j2b\n");
    // A loop of ProxyJumps is refused before anything connects.
    for (a, b) in [("l1", "l2"), ("l2", "l1")] {
        text.push_str(&f.alias_block(a, 0));
        text.push_str(&format!("    ProxyJump {b}\n"));
    }
    text.push_str(&f.alias_block("e002", 2));
    text.push_str("    ProxyJump l1\n");
    f.append_config(&text);
    let accepted = |n: usize| f.sshds[n].log().matches("Accepted publickey").count();
    let before = (accepted(0), accepted(1), accepted(2));
    let out = f.run(&["exec", "--json", "-H", "e001", "--", "echo nested"]);
    assert_eq!(out.status.code(), Some(0));
    assert_eq!(json_records(&out)["e001"]["stdout"], "nested\n");
    assert_eq!(
        (accepted(0), accepted(1), accepted(2)),
        (before.0 + 1, before.1 + 1, before.2 + 1),
        "one login on each of j1, j2b and the host"
    );
    let out = f.run(&["exec", "-H", "e002", "--", "true"]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("ProxyJump leads back to itself (e002 -> l1 -> l2 -> l1)"),
        "{err}"
    );
    assert_eq!(accepted(0), before.0 + 1, "nothing connected for the loop");

    // A jump host that accepts and never speaks: eight hosts that start
    // together on one thread (no per-address waves) fail together after
    // one connect timeout, not one timeout after another.
    let stall = stalling_listener();
    f.append_config(&format!(
        "Host stalljump\n    HostName 127.0.0.1\n    Port {stall}\n    ConnectTimeout 2\n"
    ));
    let start = Instant::now();
    let out = f.run(&[
        "exec",
        "--json",
        "--threads",
        "1",
        "--retries",
        "0",
        "-J",
        "stalljump",
        "-H",
        "t[001-008]",
        "--",
        "true",
    ]);
    let took = start.elapsed();
    assert_eq!(out.status.code(), Some(1));
    let recs = json_records(&out);
    assert_eq!(recs.len(), 8);
    for r in recs.values() {
        let e = r["error"].as_str().expect("error");
        assert!(e.starts_with("jump host stalljump:"), "{e}");
    }
    assert!(took < Duration::from_secs(6), "8 hosts took {took:?}");
}

/// 64 hosts on one server: 32 behind a chain of two jump hosts, 32 behind
/// a third. The chain's second hop dies while every command runs (each
/// waits for the kill): exactly the 32 hosts behind it fail, each with an
/// error, and the other 32 finish.
#[test]
fn a_jump_host_killed_mid_run_fails_only_the_hosts_behind_it() {
    // j1, j2 (the chain), k (the other jump), t (every target).
    let mut f = Fleet::start(4, "unused", 0);
    let mut text = String::new();
    for (alias, n) in [("j1", 0), ("j2", 1), ("k", 2)] {
        text.push_str(&f.alias_block(alias, n));
    }
    for i in 1..=32 {
        text.push_str(&f.alias_block(&format!("c{i:03}"), 3));
        text.push_str("    ProxyJump j1,j2\n");
        text.push_str(&f.alias_block(&format!("k{i:03}"), 3));
        text.push_str("    ProxyJump k\n");
    }
    f.append_config(&text);
    let started = |f: &Fleet| {
        f.sshds[3]
            .log()
            .matches("Starting session: command")
            .count()
    };

    // Every command waits until the hop is dead, so that no host behind
    // it can finish before. A command whose session is gone ends at its
    // next write to stderr (SIGPIPE), not when the marker appears: the
    // marker goes with the test's directory.
    let killed = f.dir.path().join("j2-killed");
    let mut child = f
        .cmd(&[
            "exec",
            "--json",
            "--retries",
            "0",
            "-H",
            "c[001-032],k[001-032]",
            "--",
            &format!(
                "while [ ! -e {} ]; do sleep 0.5; printf . >&2 || exit 1; done; echo finished",
                killed.display()
            ),
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run ussh");
    // Each JSON record as it comes, with when it came.
    let stdout = child.stdout.take().expect("stdout");
    let reader = std::thread::spawn(move || {
        use std::io::BufRead;
        std::io::BufReader::new(stdout)
            .lines()
            .map(|l| (l.expect("a line of ussh's output"), Instant::now()))
            .collect::<Vec<_>>()
    });
    let deadline = Instant::now() + Duration::from_secs(30);
    while started(&f) < 64 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(started(&f), 64, "every host's command runs before the kill");
    let behind_j2 = f.sshds[1].connection_pids().len();
    assert!(behind_j2 > 0, "the chain's second hop carries connections");
    let killed_at = Instant::now();
    f.sshds[1].stop();
    fs::write(&killed, b"").expect("mark the kill");

    let out = child.wait_with_output().expect("ussh output");
    eprintln!(
        "ussh -> {} ({:?} after the kill)\n--- stderr ---\n{}",
        out.status,
        killed_at.elapsed(),
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(out.status.code(), Some(1), "some hosts failed");
    let lines = reader.join().expect("reader");
    let mut recs = BTreeMap::new();
    for (line, at) in &lines {
        let r: serde_json::Value = serde_json::from_str(line).expect("a JSON record");
        let host = r["host"].as_str().expect("host").to_string();
        let after = at.duration_since(killed_at);
        eprintln!("{host}: {after:?} after the kill");
        // The hosts behind the dead hop learn of it from their relays at
        // once, not from a keepalive or a timeout.
        if host.starts_with('c') {
            assert!(after < Duration::from_secs(5), "{host}: {after:?}");
        }
        assert!(recs.insert(host, r).is_none(), "one record per host");
    }
    assert_eq!(recs.len(), 64, "one record per host");
    for i in 1..=32 {
        let c = &recs[&format!("c{i:03}")];
        let e = c["error"]
            .as_str()
            .unwrap_or_else(|| panic!("c{i:03}: {c}"));
        assert!(!e.is_empty(), "c{i:03}: {c}");
        assert_ne!(c["stdout"], "finished\n", "c{i:03} behind the dead hop");
        let k = &recs[&format!("k{i:03}")];
        assert_eq!(k["stdout"], "finished\n", "k{i:03}: {k}");
        assert_eq!(k["exit_code"], 0, "k{i:03}: {k}");
        assert!(k["error"].is_null(), "k{i:03}: {k}");
    }
}

/// The variables `--shard auto` reads, cleared so that the test's own
/// environment (a CI job under Slurm) does not leak in.
const SHARD_VARS: [&str; 5] = [
    "SLURM_ARRAY_TASK_ID",
    "SLURM_ARRAY_TASK_COUNT",
    "SLURM_ARRAY_TASK_MIN",
    "SLURM_ARRAY_TASK_STEP",
    "JOB_COMPLETION_INDEX",
];

/// Environment variables, as `(name, value)`.
type Vars<'a> = Vec<(&'a str, String)>;

/// `ussh ARGS` with exactly the shard variables `vars` set.
fn run_sharded(f: &Fleet, args: &[&str], vars: &[(&str, String)]) -> Output {
    let mut c = f.cmd(args);
    for v in SHARD_VARS {
        c.env_remove(v);
    }
    c.envs(vars.iter().map(|(n, v)| (n, v)));
    let out = c.output().expect("run ussh");
    eprintln!(
        "ussh {args:?} {vars:?} -> {}\n--- stderr ---\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

#[test]
fn shard_auto_splits_hosts_over_slurm_and_kubernetes_tasks() {
    let f = Fleet::start(1, "s", 11);
    let all: Vec<String> = (1..=11).map(|i| format!("s{i:03}")).collect();
    let args = [
        "exec",
        "--json",
        "-H",
        "s[001-011]",
        "--shard",
        "auto",
        "--",
        "true",
    ];
    // A Slurm array submitted as --array=1-4: IDs from SLURM_ARRAY_TASK_MIN.
    // A Kubernetes Indexed Job of 3 completions: indexes from 0.
    let runs: Vec<(String, Vec<Vars>)> = vec![
        (
            "auto".into(),
            (1..=4)
                .map(|id| {
                    vec![
                        ("SLURM_ARRAY_TASK_ID", id.to_string()),
                        ("SLURM_ARRAY_TASK_COUNT", "4".to_string()),
                        ("SLURM_ARRAY_TASK_MIN", "1".to_string()),
                        ("SLURM_ARRAY_TASK_MAX", "4".to_string()),
                    ]
                })
                .collect(),
        ),
        (
            "auto/3".into(),
            (0..3)
                .map(|i| vec![("JOB_COMPLETION_INDEX", i.to_string())])
                .collect(),
        ),
    ];
    for (spec, tasks) in runs {
        let mut args = args;
        args[5] = &spec;
        let mut seen: Vec<String> = Vec::new();
        for vars in &tasks {
            let out = run_sharded(&f, &args, vars);
            assert_eq!(out.status.code(), Some(0), "{spec} {vars:?}");
            let recs = json_records(&out);
            assert!(!recs.is_empty(), "{spec} {vars:?}: an empty shard");
            assert!(recs.values().all(|r| r["status"] == "ok"));
            seen.extend(recs.into_keys());
        }
        seen.sort();
        assert_eq!(seen, all, "{spec}: every host in exactly one shard");
    }
    // Missing or bad variables: a usage error naming them, nothing run.
    let cases: [(&str, Vars, &str); 4] = [
        (
            "auto",
            vec![],
            "--shard auto: SLURM_ARRAY_TASK_ID and SLURM_ARRAY_TASK_COUNT not set",
        ),
        (
            "auto",
            vec![("SLURM_ARRAY_TASK_ID", "2".into())],
            "--shard auto: SLURM_ARRAY_TASK_COUNT not set",
        ),
        (
            "auto/3",
            vec![("SLURM_ARRAY_TASK_ID", "2".into())],
            "--shard auto/3: JOB_COMPLETION_INDEX not set",
        ),
        (
            "auto/3",
            vec![("JOB_COMPLETION_INDEX", "3".into())],
            "JOB_COMPLETION_INDEX=3 is not below 3",
        ),
    ];
    for (spec, vars, want) in cases {
        let mut args = args;
        args[5] = spec;
        let out = run_sharded(&f, &args, &vars);
        assert_eq!(out.status.code(), Some(2), "{spec} {vars:?}");
        assert!(out.stdout.is_empty());
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(stderr.lines().count(), 1, "{stderr}");
        assert!(
            stderr.starts_with("ussh: ") && stderr.contains(want),
            "{stderr}"
        );
    }
}

#[test]
fn put_removes_only_stale_upload_temp_files() {
    let f = Fleet::start(1, "p", 1);
    let work = f.dir.path();
    let src = work.join("src");
    fs::create_dir_all(src.join("tree/sub")).unwrap();
    fs::write(src.join("f"), b"the file").unwrap();
    fs::write(src.join("tree/sub/x"), b"in the tree").unwrap();
    let dest = work.join("dest");
    fs::create_dir_all(dest.join("tree/sub")).unwrap();
    fs::create_dir_all(dest.join("elsewhere")).unwrap();
    let hour_ago = SystemTime::now() - Duration::from_secs(3600);
    let plant = |rel: &str, when: SystemTime| {
        let p = dest.join(rel);
        fs::write(&p, b"partial").unwrap();
        fs::File::options()
            .write(true)
            .open(&p)
            .unwrap()
            .set_modified(when)
            .unwrap();
    };
    // Left by interrupted uploads into directories this put writes into.
    let stale = [".f.1234-0.part", "tree/sub/.x.77-3.part"];
    // Look-alikes, a fresh one (an upload still in flight, written after
    // this run started), one in a directory the put does not write into,
    // and a directory and a link of the pattern: all stay.
    let kept = [
        ".f.part",
        "f.1234-0.part",
        ".f.12a-0.part",
        ".f.1234-0.part.bak",
        ".f.1234.part",
        "tree/.sub.1-1.part~",
        "elsewhere/.f.1234-0.part",
    ];
    for rel in stale.iter().chain(&kept) {
        plant(rel, hour_ago);
    }
    plant(
        ".g.99-1.part",
        SystemTime::now() + Duration::from_secs(3600),
    );
    fs::create_dir(dest.join(".d.1-2.part")).unwrap();
    std::os::unix::fs::symlink("f", dest.join(".l.1-2.part")).unwrap();

    let out = f.run(&[
        "put",
        "--json",
        "-H",
        "p001",
        src.join("f").to_str().unwrap(),
        src.join("tree").to_str().unwrap(),
        dest.to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(0));
    let r = &json_records(&out)["p001"];
    assert_eq!(r["files"], 2, "{r}");
    assert_eq!(r["stale_parts_removed"], 2, "{r}");
    for rel in stale {
        assert!(!dest.join(rel).exists(), "{rel} is still there");
    }
    for rel in kept.iter().chain(&[".g.99-1.part", ".d.1-2.part"]) {
        assert!(dest.join(rel).exists(), "{rel} was removed");
    }
    assert!(fs::symlink_metadata(dest.join(".l.1-2.part")).is_ok());
    assert_eq!(fs::read(dest.join("f")).unwrap(), b"the file");
    assert_eq!(fs::read(dest.join("tree/sub/x")).unwrap(), b"in the tree");
    // Nothing else went, and nothing of the put itself is left.
    let names = |d: &Path| -> Vec<String> {
        let mut v: Vec<String> = fs::read_dir(d)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    };
    let mut want: Vec<&str> = kept
        .iter()
        .filter(|k| !k.contains('/'))
        .copied()
        .chain([
            "f",
            "tree",
            "elsewhere",
            ".g.99-1.part",
            ".d.1-2.part",
            ".l.1-2.part",
        ])
        .collect();
    want.sort();
    assert_eq!(names(&dest), want);
    assert_eq!(names(&dest.join("tree/sub")), ["x"]);
}

/// The environment variable the password tests hand ussh the password in.
const PASSWORD_VAR: &str = "USSH_FLEET_TEST_PASSWORD";

/// Panics with instructions unless sudo is installed and the test user may
/// use it with its password (`scripts/test.sh` sets both up).
fn require_sudo() {
    uring_ssh_testkit::sshd::require_test_user();
    assert!(
        Path::new("/usr/bin/sudo").exists(),
        "/usr/bin/sudo not found: the --sudo tests need sudo; run `bash scripts/test.sh` as root"
    );
    let dropin = Path::new("/etc/sudoers.d/uring-ssh-test");
    let rules = fs::read_to_string(dropin).unwrap_or_else(|e| {
        panic!(
            "{}: {e}: the --sudo tests need the test user in sudoers; run `bash scripts/test.sh` as root",
            dropin.display()
        )
    });
    assert!(
        !rules.contains("NOPASSWD"),
        "{}: the test user must need its password for sudo",
        dropin.display()
    );
}

/// A fleet of `sshds` whose aliases `{prefix}1`… (round-robin) log in as
/// the test user, with `key` of their server as their only identity.
fn test_user_fleet(
    sshds: Vec<Sshd>,
    prefix: &str,
    count: usize,
    key: fn(&Sshd) -> PathBuf,
) -> Fleet {
    let n = sshds.len();
    let mut f = Fleet::of(sshds, &[]);
    let mut text = String::new();
    for i in 1..=count {
        let s = &f.sshds[(i - 1) % n];
        text.push_str(&format!(
            "Host {prefix}{i}\n    HostName 127.0.0.1\n    Port {}\n    User {}\n    IdentityFile {}\n    IdentitiesOnly yes\n    UserKnownHostsFile {}\n",
            s.port(),
            uring_ssh_testkit::sshd::TEST_USER,
            key(s).display(),
            f.known_hosts.display()
        ));
    }
    f.write_config(&text);
    f
}

/// `ussh ARGS` with `password` in [`PASSWORD_VAR`] (`--askpass-env` is
/// among ARGS), with a bound on how long it may take.
fn run_with_password(f: &Fleet, args: &[&str], password: &str, bound: Duration) -> Output {
    let mut c = f.cmd(args);
    c.env(PASSWORD_VAR, password)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let start = Instant::now();
    let child = c.spawn().expect("run ussh");
    let pid = child.id();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    let out = match rx.recv_timeout(bound) {
        Ok(out) => out.expect("ussh output"),
        Err(_) => {
            let _ = Command::new("kill").arg("-9").arg(pid.to_string()).status();
            panic!("ussh {args:?} still running after {bound:?}");
        }
    };
    eprintln!(
        "ussh {args:?} -> {} in {:?}\n--- stderr ---\n{}",
        out.status,
        start.elapsed(),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Asserts that `password` is nowhere in `out`'s stdout or stderr.
fn assert_password_absent(what: &str, out: &Output, password: &str) {
    for (name, bytes) in [("stdout", &out.stdout), ("stderr", &out.stderr)] {
        let text = String::from_utf8_lossy(bytes);
        assert!(
            !text.contains(password),
            "{what}: the password is in {name}:\n{text}"
        );
        assert!(
            !text.contains("[ussh-sudo-"),
            "{what}: sudo's prompt is in {name}:\n{text}"
        );
    }
}

#[test]
fn askpass_logs_in_with_password_and_keyboard_interactive() {
    use uring_ssh_testkit::sshd::{TEST_PASSWORD, TEST_USER, require_test_user};
    require_test_user();
    // One server takes passwords, the other only keyboard-interactive
    // (PAM); the aliases' key is not authorized, and is tried first.
    let sshds = vec![
        Sshd::builder().password_auth(true).start(),
        Sshd::builder().kbd_interactive(true).start(),
    ];
    let f = test_user_fleet(sshds, "pw", 4, Sshd::wrong_key);
    let bound = Duration::from_secs(60);
    let askpass = ["--askpass-env", PASSWORD_VAR];

    let out = run_with_password(
        &f,
        &[&["exec"][..], &askpass, &["-H", "pw[1-4]", "--", "id -un"]].concat(),
        TEST_PASSWORD,
        bound,
    );
    assert_eq!(out.status.code(), Some(0));
    let lines = sorted_lines(&out.stdout);
    let want: Vec<String> = (1..=4).map(|i| format!("pw{i}: {TEST_USER}")).collect();
    assert_eq!(lines, want);
    assert_password_absent("--askpass", &out, TEST_PASSWORD);
    let log0 = f.sshds[0].log();
    let log1 = f.sshds[1].log();
    assert!(
        log0.contains(&format!("Accepted password for {TEST_USER}")),
        "{log0}"
    );
    assert!(
        log1.contains(&format!(
            "Accepted keyboard-interactive/pam for {TEST_USER}"
        )),
        "{log1}"
    );
    for log in [&log0, &log1] {
        assert!(
            !log.contains(TEST_PASSWORD),
            "the password is in sshd's log"
        );
    }

    // Without a password: the key is refused, and that is all there is.
    let out = f.run(&["exec", "-H", "pw[1-4]", "--", "id -un"]);
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    for i in 1..=4 {
        let want = format!(
            "authentication as {TEST_USER} failed: key {} refused",
            f.sshds[(i - 1) % 2].wrong_key().display()
        );
        assert!(
            stderr
                .lines()
                .any(|l| l.starts_with(&format!("pw{i} ")) && l.ends_with(&want)),
            "{want:?} for pw{i} in\n{stderr}"
        );
    }

    // A wrong password: refused by both methods, said so on each host.
    let bad = "not-the-password-9b1f";
    let out = run_with_password(
        &f,
        &[
            &["exec"][..],
            &askpass,
            &["--json", "-H", "pw[1-4]", "--", "id -un"],
        ]
        .concat(),
        bad,
        bound,
    );
    assert_eq!(out.status.code(), Some(1));
    assert_password_absent("wrong --askpass", &out, bad);
    let records = json_records(&out);
    assert_eq!(records.len(), 4);
    for (host, r) in &records {
        let error = r["error"].as_str().unwrap_or_default();
        assert_eq!(r["status"], "error", "{host}: {r}");
        assert!(
            error.starts_with(&format!("authentication as {TEST_USER} failed: key "))
                && error.contains("password refused"),
            "{host}: {error}"
        );
    }

    // --askpass with no terminal to ask on (setsid: no controlling one).
    let mut c = Command::new("setsid");
    c.arg("-w").arg(USSH);
    let out = f
        .with_args(c, &["exec", "--askpass", "-H", "pw1", "--", "true"])
        .output()
        .expect("run ussh under setsid");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(
        stderr.starts_with("ussh: --askpass: cannot ask for the password: /dev/tty: ")
            && stderr.contains("--askpass-env VAR"),
        "{stderr}"
    );
}

#[test]
fn sudo_runs_the_command_as_root_with_the_password_on_its_stdin() {
    use uring_ssh_testkit::sshd::TEST_PASSWORD;
    require_sudo();
    // Logged in with the key; sudo needs the password.
    let f = test_user_fleet(vec![Sshd::start(), Sshd::start()], "su", 6, Sshd::user_key);
    let bound = Duration::from_secs(90);
    let sudo = ["--sudo", "--askpass-env", PASSWORD_VAR];

    // Streamed, over two threads: `host: 0` and nothing else.
    let out = run_with_password(
        &f,
        &[
            &["exec"][..],
            &sudo,
            &["--threads", "2", "-H", "su[1-6]", "--", "id", "-u"],
        ]
        .concat(),
        TEST_PASSWORD,
        bound,
    );
    assert_eq!(out.status.code(), Some(0));
    let lines = sorted_lines(&out.stdout);
    let want: Vec<String> = (1..=6).map(|i| format!("su{i}: 0")).collect();
    assert_eq!(lines, want);
    assert_password_absent("--sudo streamed", &out, TEST_PASSWORD);
    let stderr = String::from_utf8_lossy(&out.stderr);
    // No host's stderr line (`suN: ...`): sudo's prompt was all there was.
    assert!(
        !(1..=6).any(|i| stderr.contains(&format!("\nsu{i}: ")) || stderr.starts_with("su")),
        "a host wrote to stderr:\n{stderr}"
    );

    // JSON: stdout and stderr exactly the command's, no password anywhere.
    let out = run_with_password(
        &f,
        &[
            &["exec"][..],
            &sudo,
            &[
                "--json",
                "-H",
                "su[1-6]",
                "--",
                "id -u; id -un; echo err >&2",
            ],
        ]
        .concat(),
        TEST_PASSWORD,
        bound,
    );
    assert_eq!(out.status.code(), Some(0));
    assert_password_absent("--sudo --json", &out, TEST_PASSWORD);
    let records = json_records(&out);
    assert_eq!(records.len(), 6);
    for (host, r) in &records {
        assert_eq!(r["status"], "ok", "{host}: {r}");
        assert_eq!(r["stdout"], "0\nroot\n", "{host}: {r}");
        // The command's own stderr; sudo's prompt, before it, taken out.
        assert_eq!(r["stderr"], "err\n", "{host}: {r}");
    }

    // -B: stderr in the blocks, sudo's prompt not; the command's stdin is
    // /dev/null (nothing of the password's line reaches `cat`).
    let out = run_with_password(
        &f,
        &[
            &["exec"][..],
            &sudo,
            &["-B", "--threads", "2", "-H", "su[1-6]", "--", "cat; id -u"],
        ]
        .concat(),
        TEST_PASSWORD,
        bound,
    );
    assert_eq!(out.status.code(), Some(0));
    assert_password_absent("--sudo -B", &out, TEST_PASSWORD);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("su[1-6] (6)\n") && stdout.ends_with("-\n0\n"),
        "{stdout}"
    );
    for s in &f.sshds {
        assert!(
            !s.log().contains(TEST_PASSWORD),
            "the password is in sshd's log"
        );
    }
}

#[test]
fn sudo_with_a_wrong_password_fails_each_host_promptly() {
    require_sudo();
    let f = test_user_fleet(vec![Sshd::start(), Sshd::start()], "sw", 4, Sshd::user_key);
    let bad = "wrong-sudo-password-4c2e";
    let start = Instant::now();
    let out = run_with_password(
        &f,
        &[
            "exec",
            "--sudo",
            "--askpass-env",
            PASSWORD_VAR,
            "--json",
            "-H",
            "sw[1-4]",
            "--",
            "id -u",
        ],
        bad,
        Duration::from_secs(60),
    );
    let took = start.elapsed();
    assert!(took < Duration::from_secs(30), "took {took:?}");
    assert_eq!(out.status.code(), Some(1));
    assert_password_absent("wrong --sudo", &out, bad);
    let records = json_records(&out);
    assert_eq!(records.len(), 4);
    for (host, r) in &records {
        assert_eq!(r["status"], "failed", "{host}: {r}");
        assert_eq!(r["error"], "sudo refused the password", "{host}: {r}");
        assert_eq!(r["exit_code"], 1, "{host}: {r}");
        assert_eq!(r["stdout"], "", "{host}: {r}");
        let stderr = r["stderr"].as_str().unwrap_or_default();
        assert!(stderr.contains("incorrect password"), "{host}: {stderr}");
    }

    // Streamed, with -S: sudo's exit code, and the reason on each host's line.
    let out = run_with_password(
        &f,
        &[
            "exec",
            "--sudo",
            "--askpass-env",
            PASSWORD_VAR,
            "-S",
            "-H",
            "sw[1-4]",
            "--",
            "id -u",
        ],
        bad,
        Duration::from_secs(60),
    );
    assert_eq!(out.status.code(), Some(1));
    assert_password_absent("wrong --sudo -S", &out, bad);
    let stderr = String::from_utf8_lossy(&out.stderr);
    for i in 1..=4 {
        assert!(
            stderr.contains(&format!("] sw{i}: failed (exit 1) in "))
                && stderr.lines().any(|l| l.starts_with(&format!("sw{i} "))
                    && l.ends_with(" sudo refused the password")),
            "sw{i} in\n{stderr}"
        );
    }
}
