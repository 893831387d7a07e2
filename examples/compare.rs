//! The comparison harness: uring-ssh beside every peer client, every
//! scenario, one run, one table. Normally started by `bash
//! scripts/compare.sh [--smoke] [--json FILE]`, which installs what is
//! missing, builds the peer programs (`benches/peers`, a workspace of its
//! own) and this example, and pins this process to core 0.
//!
//! It starts a throwaway OpenSSH server on loopback (pinned to core 1 with
//! `taskset` when there are two cores) and runs each scenario for each
//! client as a separate process pinned to core 0: uring-ssh (this program
//! again, in client mode), uring-ssh with `URING_SSH_BACKEND=poll`, ssh2-rs,
//! async-ssh2-lite, russh (+ russh-sftp), and the OpenSSH tools (`ssh`,
//! `sftp`, `scp`, `rsync`, `tar`), plus two ceilings: `openssl speed -evp`
//! for the cipher, and a plain loopback TCP stream read through tokio-uring
//! (uring-ssh's reactor has no public TCP API). Each client prints one JSON
//! line of figures (see `benches/peers/src/common.rs`); OpenSSH tools are
//! timed from outside, their CPU from `getrusage(RUSAGE_CHILDREN)`.
//!
//! Rows of one case run in alternating order (reversed every other run);
//! the table shows medians and the ratios uring-ssh ÷ row. Any failed row
//! makes the exit status non-zero.
//!
//! Options: `--smoke` (1 run, small sizes), `--runs R`, `--json FILE`,
//! `--peers DIR` (the peer programs), `--only 1,4,8` (scenario numbers),
//! `--big-mib N` (size of scenarios 1 and 4, the total of 3 and 9, and the
//! count of 1 MiB files in 8; default 1024), `--session-mib N` (per session
//! in scenario 2; default 16), `--scaling-mib N` (total of scenario 9;
//! default: `--big-mib`), `--files N` (4 KiB files in scenario 8; default
//! 10,000), `--max-sessions N` (session counts of scenario 2 up to N; in
//! scenario 9 the peers stop there and uring-ssh goes on alone, one run),
//! `--cipher NAME` (repeat; scenarios 1 to 3 run for each, the others for
//! chacha20-poly1305).

#[path = "../benches/peers/src/common.rs"]
mod client;
use uring_ssh_testkit::drops;
#[path = "../benches/common/ours.rs"]
mod ours;
use uring_ssh_testkit::sshd;
use uring_ssh_testkit::tools;

use std::fmt::Write as _;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use client::{Args, Figures};

const MIB: u64 = 1 << 20;
const GIB: f64 = (1u64 << 30) as f64;
/// The label of our row, the reference of every ratio.
const OURS: &str = "uring-ssh";
/// Client mode: this program run as one of the clients.
const CLIENT_FLAG: &str = "--client";
/// The label of the raw TCP ceiling row.
const TCP_CEILING: &str = "ceiling: loopback TCP (tokio-uring)";

fn main() {
    let mut argv = std::env::args().skip(1).peekable();
    if argv.peek().map(String::as_str) == Some(CLIENT_FLAG) {
        argv.next();
        client_main(client::parse_args(argv));
    } else {
        std::process::exit(orchestrate(Opts::parse(argv)));
    }
}

// ---------------------------------------------------------------------------
// Client mode: uring-ssh doing one scenario, one JSON line out.

fn client_main(a: Args) {
    client::raise_nofile();
    let f = match a.scenario.as_str() {
        "tcp-read" | "tcp-write" => tcp_client(&a),
        _ => {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            tokio::task::LocalSet::new().block_on(&rt, async {
                if a.scenario == "drop" {
                    drop_figures(&a).await
                } else {
                    client::run_async::<ours::Ours>(&a).await
                }
            })
        }
    };
    client::report(&f);
}

/// Scenario 7: `drops::run` with `--count` drops per phase.
async fn drop_figures(a: &Args) -> Figures {
    let target = drops::Target {
        addr: SocketAddr::from(([127, 0, 0, 1], a.port)),
        known_hosts: a.known_hosts.clone().into(),
        user: a.user.clone(),
        key: a.key.clone().into(),
    };
    let m = client::Meter::start(Vec::new());
    let all = drops::run(&target, a.count).await;
    let mut f = m.finish(0, Vec::new());
    let mid = &all[0];
    let us = |d: std::time::Duration| d.as_secs_f64() * 1e6;
    f.set("p50_us", us(mid.p50));
    f.set("p99_us", us(mid.p99));
    f.set("max_us", us(mid.max));
    f.set("count", a.count as f64);
    f.set("leaks", all.iter().filter(|d| !d.clean).count() as f64);
    f
}

/// The TCP ceiling: `--mib` MiB read from (or written to) the sink server
/// of the orchestrator over a tokio-uring `TcpStream`.
fn tcp_client(a: &Args) -> Figures {
    let write = a.scenario == "tcp-write";
    tokio_uring::start(async {
        let addr = SocketAddr::from(([127, 0, 0, 1], a.port));
        let s = tokio_uring::net::TcpStream::connect(addr)
            .await
            .expect("connect");
        let header = a.bytes() | if write { 1 << 63 } else { 0 };
        let (r, _) = s.write_all(header.to_le_bytes().to_vec()).await;
        r.expect("header");
        let m = client::Meter::start(Vec::new());
        let mut buf = vec![0x5au8; client::BUF];
        let mut done = 0u64;
        while done < a.bytes() {
            if write {
                let n = (a.bytes() - done).min(buf.len() as u64) as usize;
                buf.truncate(n);
                let (r, b) = s.write_all(buf).await;
                r.expect("write");
                buf = b;
                done += n as u64;
            } else {
                let (r, b) = s.read(buf).await;
                let n = r.expect("read");
                assert!(n > 0, "early EOF");
                buf = b;
                done += n as u64;
            }
        }
        let f = m.finish(done, Vec::new());
        s.shutdown(std::net::Shutdown::Both).ok();
        f
    })
}

/// The orchestrator's sink/source for the TCP ceiling: reads an 8-byte
/// header (length, top bit set: the client writes), then sends that many
/// zero bytes or reads until EOF. Runs on `core` if given.
fn tcp_server(core: Option<usize>) -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = l.local_addr().expect("addr").port();
    std::thread::spawn(move || {
        if let Some(c) = core {
            pin_this_thread(c);
        }
        for conn in l.incoming().flatten() {
            let mut conn = conn;
            let mut h = [0u8; 8];
            if conn.read_exact(&mut h).is_err() {
                continue;
            }
            let h = u64::from_le_bytes(h);
            let len = h & !(1 << 63);
            if h >> 63 == 1 {
                std::io::copy(&mut conn, &mut std::io::sink()).ok();
            } else {
                let zeros = vec![0u8; 1 << 20];
                let mut left = len;
                while left > 0 {
                    let n = left.min(zeros.len() as u64) as usize;
                    if conn.write_all(&zeros[..n]).is_err() {
                        break;
                    }
                    left -= n as u64;
                }
            }
        }
    });
    port
}

fn pin_this_thread(core: usize) {
    // SAFETY: a zeroed cpu_set_t is an empty set; CPU_SET writes inside it,
    // and sched_setaffinity(0, ...) applies to the calling thread.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(core, &mut set);
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
    }
}

// ---------------------------------------------------------------------------
// Orchestrator.

struct Opts {
    smoke: bool,
    runs: usize,
    json: Option<PathBuf>,
    peers: PathBuf,
    only: Vec<u32>,
    big_mib: Option<u64>,
    session_mib: Option<u64>,
    scaling_mib: Option<u64>,
    files: Option<usize>,
    max_sessions: usize,
    ciphers: Vec<String>,
}

impl Opts {
    fn parse(mut it: impl Iterator<Item = String>) -> Opts {
        let mut o = Opts {
            smoke: false,
            runs: 0,
            json: None,
            peers: PathBuf::from("benches/peers/target/release"),
            only: Vec::new(),
            big_mib: None,
            session_mib: None,
            scaling_mib: None,
            files: None,
            max_sessions: usize::MAX,
            ciphers: Vec::new(),
        };
        while let Some(a) = it.next() {
            let mut value = || it.next().unwrap_or_else(|| panic!("{a} needs a value"));
            match a.as_str() {
                "--smoke" => o.smoke = true,
                "--runs" => o.runs = value().parse().expect("--runs R"),
                "--json" => o.json = Some(value().into()),
                "--peers" => o.peers = value().into(),
                "--only" => {
                    o.only = value()
                        .split(',')
                        .map(|n| n.trim().parse().expect("--only 1,2,..."))
                        .collect()
                }
                "--big-mib" => o.big_mib = Some(value().parse().expect("--big-mib N")),
                "--session-mib" => o.session_mib = Some(value().parse().expect("--session-mib N")),
                "--scaling-mib" => o.scaling_mib = Some(value().parse().expect("--scaling-mib N")),
                "--files" => o.files = Some(value().parse().expect("--files N")),
                "--max-sessions" => o.max_sessions = value().parse().expect("--max-sessions N"),
                "--cipher" => o.ciphers.push(value()),
                _ => {
                    eprintln!(
                        "compare [--smoke] [--runs R] [--json FILE] [--peers DIR] [--only 1,2,..] \
                         [--big-mib N] [--session-mib N] [--scaling-mib N] [--files N] [--max-sessions N] [--cipher NAME]..."
                    );
                    std::process::exit(2);
                }
            }
        }
        if o.runs == 0 {
            o.runs = if o.smoke { 1 } else { 3 };
        }
        if o.ciphers.is_empty() {
            o.ciphers = vec![
                "aes128-gcm@openssh.com".into(),
                "chacha20-poly1305@openssh.com".into(),
            ];
        }
        o
    }

    fn wants(&self, scenario: u32) -> bool {
        self.only.is_empty() || self.only.contains(&scenario)
    }

    /// `full` in full mode, `smoke` in smoke mode.
    fn pick<T>(&self, full: T, smoke: T) -> T {
        if self.smoke { smoke } else { full }
    }

    fn big(&self) -> u64 {
        self.big_mib.unwrap_or(self.pick(1024, 32))
    }

    fn sessions(&self, full: &[usize], smoke: &[usize]) -> Vec<usize> {
        self.pick(full, smoke)
            .iter()
            .copied()
            .filter(|&n| n <= self.max_sessions)
            .collect()
    }
}

/// How one row runs.
#[derive(Clone)]
enum How {
    /// A client program taking the common arguments, printing one JSON line.
    Client {
        program: PathBuf,
        env: Vec<(&'static str, &'static str)>,
    },
    /// A shell script (OpenSSH tools) timed from outside; what it moves.
    Shell {
        script: String,
        bytes: u64,
        count: u64,
    },
    /// Figures measured once, outside the runs (the openssl ceiling).
    Fixed(Figures),
}

/// One row of a case.
#[derive(Clone)]
struct Job {
    client: String,
    how: How,
    /// Client options of this row only.
    extra: Vec<String>,
}

/// What a case checks after each run, and what it cleans before.
#[derive(Clone, Default)]
struct Check {
    /// Removed before each run.
    clear: Option<PathBuf>,
    /// A file whose size must be this after each run.
    file: Option<(PathBuf, u64)>,
    /// A tree (source, destination, files) compared after each run.
    tree: Option<(PathBuf, PathBuf, usize)>,
}

struct Case {
    scenario: u32,
    name: String,
    /// Client options (`--scenario` etc.) shared by its client rows.
    args: Vec<String>,
    jobs: Vec<Job>,
    check: Check,
    /// Count the client's system calls (once per row, under `perf`).
    syscalls: bool,
    /// Runs (1 for cases too slow to repeat).
    runs: usize,
}

struct Row {
    scenario: u32,
    case: String,
    client: String,
    runs: Vec<Figures>,
    error: Option<String>,
}

struct Ctx {
    sshd: sshd::Sshd,
    pin: bool,
    counter: Option<&'static str>,
    peers: PathBuf,
    me: PathBuf,
    work: tempfile::TempDir,
    tcp_port: u16,
}

impl Ctx {
    fn client_args(&self, cipher: &str) -> Vec<String> {
        let s = &self.sshd;
        vec![
            "--port".into(),
            s.port().to_string(),
            "--user".into(),
            s.user(),
            "--key".into(),
            s.user_key().display().to_string(),
            "--known-hosts".into(),
            s.known_hosts().display().to_string(),
            "--cipher".into(),
            cipher.into(),
        ]
    }

    fn opts(&self, cipher: &str) -> String {
        tools::ssh_opts(&self.sshd.known_hosts(), &self.sshd.user_key(), cipher).join(" ")
    }

    fn target(&self) -> String {
        format!("{}@127.0.0.1", self.sshd.user())
    }

    /// `ssh` to the server running `command`.
    fn ssh(&self, cipher: &str, command: &str) -> String {
        format!(
            "ssh -p {} {} {} '{command}'",
            self.sshd.port(),
            self.opts(cipher),
            self.target()
        )
    }

    fn ours(&self) -> Job {
        Job {
            client: OURS.into(),
            how: How::Client {
                program: self.me.clone(),
                env: vec![("URING_SSH_BACKEND", "io_uring")],
            },
            extra: Vec::new(),
        }
    }

    fn ours_poll(&self) -> Job {
        Job {
            client: format!("{OURS} (poll backend)"),
            how: How::Client {
                program: self.me.clone(),
                env: vec![("URING_SSH_BACKEND", "poll")],
            },
            extra: Vec::new(),
        }
    }

    fn peer(&self, client: &str, program: &str) -> Job {
        Job {
            client: client.into(),
            how: How::Client {
                program: self.peers.join(program),
                env: Vec::new(),
            },
            extra: Vec::new(),
        }
    }

    /// Ours on both backends and the three Rust peers.
    fn rust_clients(&self, with_ssh2: bool) -> Vec<Job> {
        let mut v = vec![self.ours(), self.ours_poll()];
        if with_ssh2 {
            v.push(self.peer("ssh2-rs 0.9", "peer_ssh2"));
        }
        v.push(self.peer("async-ssh2-lite 0.5", "peer_async_ssh2_lite"));
        v.push(self.peer("russh 0.65", "peer_russh"));
        v
    }

    fn shell(&self, client: &str, script: String, bytes: u64, count: u64) -> Job {
        Job {
            client: client.into(),
            how: How::Shell {
                script,
                bytes,
                count,
            },
            extra: Vec::new(),
        }
    }

    /// The argv that runs `job` with `args`, pinned, maybe counted.
    fn command(&self, job: &Job, args: &[String], counted: Option<&Path>) -> Command {
        let mut argv: Vec<String> = Vec::new();
        if self.pin {
            argv.extend(["taskset", "-c", "0"].map(String::from));
        }
        if let (Some(out), Some(tool)) = (counted, self.counter) {
            match tool {
                "perf" => argv.extend(
                    [
                        "perf",
                        "stat",
                        "-x",
                        ",",
                        "-e",
                        "raw_syscalls:sys_enter",
                        "-o",
                        &out.display().to_string(),
                        "--",
                    ]
                    .map(String::from),
                ),
                _ => argv.extend(
                    ["strace", "-f", "-c", "-o", &out.display().to_string()].map(String::from),
                ),
            }
        }
        let mut env = Vec::new();
        match &job.how {
            How::Client { program, env: e } => {
                argv.push(program.display().to_string());
                if *program == self.me {
                    argv.push(CLIENT_FLAG.into());
                }
                argv.extend(args.iter().cloned());
                env.extend(e.iter().cloned());
            }
            How::Shell { script, .. } => {
                argv.extend(["sh".into(), "-c".into(), script.clone()]);
            }
            How::Fixed(_) => unreachable!("fixed rows do not run"),
        }
        let mut c = Command::new(&argv[0]);
        c.args(&argv[1..]).envs(env).stdin(Stdio::null());
        c
    }

    /// Runs one row once; its figures or what went wrong.
    fn run(&self, job: &Job, args: &[String], counted: Option<&Path>) -> Result<Figures, String> {
        if let How::Fixed(f) = &job.how {
            return Ok(f.clone());
        }
        let mut cmd = self.command(job, args, counted);
        let (t0, c0) = (Instant::now(), tools::cpu_split(true));
        let out = cmd.output().map_err(|e| format!("spawn: {e}"))?;
        let secs = t0.elapsed().as_secs_f64();
        let c1 = tools::cpu_split(true);
        if !out.status.success() {
            let err = String::from_utf8_lossy(&out.stderr);
            let tail: Vec<&str> = err.lines().rev().take(6).collect();
            return Err(format!("{}: {}", out.status, tail.join(" | ")));
        }
        let mut f = match &job.how {
            How::Shell { bytes, count, .. } => {
                let mut f = Figures::default();
                f.set("bytes", *bytes as f64);
                f.set("count", *count as f64);
                f.set("secs", secs);
                f.set("user", c1.0 - c0.0);
                f.set("sys", c1.1 - c0.1);
                f
            }
            _ => {
                let text = String::from_utf8_lossy(&out.stdout);
                let line = text.lines().rev().find(|l| l.starts_with('{'));
                line.and_then(Figures::parse)
                    .ok_or_else(|| format!("no figures in output: {text}"))?
            }
        };
        if let Some(path) = counted {
            f.set("syscalls", syscall_count(path).ok_or("no syscall count")?);
        }
        Ok(f)
    }
}

/// The total of a `perf stat -x,` or `strace -c` output file.
fn syscall_count(path: &Path) -> Option<f64> {
    let text = std::fs::read_to_string(path).ok()?;
    if let Some(l) = text.lines().find(|l| l.contains("raw_syscalls:sys_enter")) {
        return l.split(',').next()?.trim().parse().ok();
    }
    let total = text
        .lines()
        .rev()
        .find(|l| l.trim_end().ends_with("total"))?;
    total.split_whitespace().nth(3)?.parse().ok()
}

/// `openssl speed -evp` for the cipher, 16 KiB blocks: bytes per second.
fn openssl_speed(cipher: &str) -> Option<Figures> {
    let evp = match cipher {
        "aes128-gcm@openssh.com" => "aes-128-gcm",
        "aes256-gcm@openssh.com" => "aes-256-gcm",
        "chacha20-poly1305@openssh.com" => "chacha20-poly1305",
        _ => return None,
    };
    let out = Command::new("openssl")
        .args(["speed", "-seconds", "2", "-bytes", "16384", "-evp", evp])
        .stderr(Stdio::null())
        .output()
        .ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let last = text.lines().rev().find(|l| l.trim_end().ends_with('k'))?;
    let kbps: f64 = last
        .split_whitespace()
        .last()?
        .trim_end_matches('k')
        .parse()
        .ok()?;
    let mut f = Figures::default();
    f.set("bytes", GIB);
    f.set("secs", GIB / (kbps * 1000.0));
    f.set("user", GIB / (kbps * 1000.0));
    f.set("sys", 0.0);
    Some(f)
}

fn strings(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}

/// Every case of the run, in order.
fn cases(o: &Opts, ctx: &Ctx) -> Vec<Case> {
    let mut cases = Vec::new();
    let d = ctx.work.path();
    let chacha = "chacha20-poly1305@openssh.com";
    let case = |scenario, name: String, args: Vec<String>, jobs, runs| Case {
        scenario,
        name,
        args,
        jobs,
        check: Check::default(),
        syscalls: false,
        runs,
    };
    for cipher in &o.ciphers {
        let short = cipher.split('@').next().unwrap_or(cipher);
        let base = ctx.client_args(cipher);
        let ceiling = openssl_speed(cipher).map(|f| Job {
            client: format!("ceiling: openssl speed -evp {short}"),
            how: How::Fixed(f),
            extra: Vec::new(),
        });
        if o.wants(1) {
            for (mib, counted) in [(o.big(), false), (o.pick(256, 16).min(o.big()), true)] {
                for write in [false, true] {
                    let dir = if write { "write" } else { "read" };
                    let mut jobs = ctx.rust_clients(true);
                    let bytes = mib * MIB;
                    let script = if write {
                        format!(
                            "head -c {bytes} /dev/zero | {}",
                            ctx.ssh(cipher, client::WRITE_COMMAND)
                        )
                    } else {
                        format!(
                            "{} > /dev/null",
                            ctx.ssh(cipher, &format!("head -c {bytes} /dev/zero"))
                        )
                    };
                    jobs.push(ctx.shell("OpenSSH ssh", script, bytes, 1));
                    let mut tcp = ctx.ours();
                    tcp.client = TCP_CEILING.into();
                    jobs.push(tcp);
                    if let (Some(c), false) = (&ceiling, counted) {
                        jobs.push(c.clone());
                    }
                    let mut args = base.clone();
                    args.extend(strings(&["--scenario", dir, "--mib", &mib.to_string()]));
                    let what = if counted { ", syscalls" } else { "" };
                    let mut c = case(
                        1,
                        format!("{short} {dir} {mib} MiB{what}"),
                        args,
                        jobs,
                        if counted { 1 } else { o.runs },
                    );
                    c.syscalls = counted;
                    cases.push(c);
                }
            }
        }
        if o.wants(2) {
            let mib = o.session_mib.unwrap_or(o.pick(16, 4));
            for n in o.sessions(&[1, 16, 64, 256], &[1, 16]) {
                let mut jobs = ctx.rust_clients(true);
                let one = ctx.ssh(cipher, &format!("head -c {} /dev/zero", mib * MIB));
                jobs.push(ctx.shell(
                    "OpenSSH ssh (one process each)",
                    format!("for i in $(seq {n}); do {one} > /dev/null & done; wait"),
                    n as u64 * mib * MIB,
                    n as u64,
                ));
                let mut args = base.clone();
                args.extend(strings(&[
                    "--scenario",
                    "read",
                    "--mib",
                    &mib.to_string(),
                    "--sessions",
                    &n.to_string(),
                ]));
                cases.push(case(
                    2,
                    format!("{short} {n} sessions x {mib} MiB read"),
                    args,
                    jobs,
                    o.runs,
                ));
            }
        }
        if o.wants(3) {
            let mib = (o.big() / 16).max(1);
            let mut args = base.clone();
            args.extend(strings(&[
                "--scenario",
                "read",
                "--mib",
                &mib.to_string(),
                "--channels",
                "16",
            ]));
            cases.push(case(
                3,
                format!("{short} 1 session, 16 channels x {mib} MiB read"),
                args,
                ctx.rust_clients(false),
                o.runs,
            ));
        }
    }
    // The rest with one cipher.
    let base = ctx.client_args(chacha);
    let opts = ctx.opts(chacha);
    let port = ctx.sshd.port();
    let target = ctx.target();
    if o.wants(9) {
        // Ours at every N; the peers up to --max-sessions.
        for &n in o.pick(&[1usize, 16, 64, 256, 1000][..], &[1, 32]) {
            let total = o.scaling_mib.unwrap_or(o.big());
            let mib = (total / n as u64).max(1);
            let mut args = ctx.client_args(chacha);
            args.extend(strings(&[
                "--scenario",
                "read",
                "--mib",
                &mib.to_string(),
                "--sessions",
                &n.to_string(),
            ]));
            let (jobs, runs) = if n <= o.max_sessions {
                (ctx.rust_clients(true), o.runs)
            } else {
                (vec![ctx.ours()], 1)
            };
            cases.push(case(
                9,
                format!("chacha20-poly1305 scaling: {n} sessions x {mib} MiB read"),
                args,
                jobs,
                if n >= 1000 { 1 } else { runs },
            ));
        }
    }
    if o.wants(4) {
        let mib = o.big();
        let src = d.join("big.bin");
        tools::write_file(&src, (mib * MIB) as usize);
        let out = d.join("big.out");
        for (dir, cmd) in [("download", "get"), ("upload", "put")] {
            let mut jobs = ctx.rust_clients(true);
            jobs.push(ctx.shell(
                "OpenSSH sftp",
                tools::sftp_one(cmd, &src, &out, port, &opts, &target),
                mib * MIB,
                1,
            ));
            let mut args = base.clone();
            let (remote, local) = if cmd == "get" {
                (&src, &out)
            } else {
                (&out, &src)
            };
            args.extend(strings(&[
                "--scenario",
                &format!("sftp-{cmd}"),
                "--remote",
                &remote.display().to_string(),
                "--local",
                &local.display().to_string(),
            ]));
            let mut c = case(
                4,
                format!("chacha20-poly1305 SFTP {dir} {mib} MiB"),
                args,
                jobs,
                o.runs,
            );
            c.check = Check {
                clear: Some(out.clone()),
                file: Some((out.clone(), mib * MIB)),
                tree: None,
            };
            cases.push(c);
        }
    }
    if o.wants(5) {
        for (at_once, count) in [(1usize, o.pick(50usize, 5)), (16, o.pick(160, 32))] {
            let mut jobs = ctx.rust_clients(true);
            let one = ctx.ssh(chacha, "true");
            let script = if at_once == 1 {
                format!("for i in $(seq {count}); do {one}; done")
            } else {
                format!("seq {count} | xargs -P {at_once} -I{{}} {one}")
            };
            jobs.push(ctx.shell("OpenSSH ssh (+ exec true)", script, 0, count as u64));
            let mut args = base.clone();
            args.extend(strings(&[
                "--scenario",
                "connect",
                "--count",
                &count.to_string(),
                "--sessions",
                &at_once.to_string(),
            ]));
            cases.push(case(
                5,
                format!("connect+kex+auth, {at_once} at once, {count} in all"),
                args,
                jobs,
                o.runs,
            ));
        }
    }
    if o.wants(6) {
        let n = o.pick(1000usize, 50);
        let mut args = base.clone();
        args.extend(strings(&[
            "--scenario",
            "idle",
            "--sessions",
            &n.to_string(),
        ]));
        cases.push(case(
            6,
            format!("{n} idle sessions"),
            args,
            ctx.rust_clients(true),
            1,
        ));
    }
    if o.wants(7) {
        let mut args = base.clone();
        let count = o.pick(300, 20);
        args.extend(strings(&[
            "--scenario",
            "drop",
            "--count",
            &count.to_string(),
        ]));
        cases.push(case(
            7,
            format!("drop mid-transfer, {count} drops"),
            args,
            vec![ctx.ours()],
            1,
        ));
    }
    if o.wants(8) {
        let small = o.files.unwrap_or(o.pick(10_000, 200));
        let big = (o.big() as usize).min(1000);
        for (files, kib) in [(small, 4usize), (big, 1024)] {
            let src = d.join(format!("tree{kib}"));
            tools::write_tree(&src, files, kib * 1024);
            let dst = d.join("dst");
            let bytes = (files * kib * 1024) as u64;
            let mut jobs = vec![ctx.ours()];
            let mut four = ctx.ours();
            four.client = format!("{OURS}, 4 sessions");
            four.extra = strings(&["--sessions", "4"]);
            jobs.push(four);
            for (name, cmd) in tools::tree_tools(&src, port, &opts, &target) {
                jobs.push(ctx.shell(
                    name,
                    cmd.replace("{dst}", &dst.display().to_string()),
                    bytes,
                    files as u64,
                ));
            }
            jobs.push(ctx.peer("ssh2-rs 0.9 sftp", "peer_ssh2"));
            jobs.push(ctx.peer("async-ssh2-lite 0.5 sftp", "peer_async_ssh2_lite"));
            jobs.push(ctx.peer("russh-sftp 2", "peer_russh"));
            let mut args = base.clone();
            args.extend(strings(&[
                "--scenario",
                "tree",
                "--remote",
                &src.display().to_string(),
                "--local",
                &dst.display().to_string(),
            ]));
            let mut c = case(8, format!("{files} files x {kib} KiB"), args, jobs, o.runs);
            c.check = Check {
                clear: Some(dst.clone()),
                file: None,
                tree: Some((src, dst, files)),
            };
            cases.push(c);
        }
    }
    cases
}

fn orchestrate(o: Opts) -> i32 {
    let started = Instant::now();
    // Online CPUs, not this process's affinity (scripts/compare.sh pins us).
    // SAFETY: sysconf has no preconditions.
    let two_cores = unsafe { libc::sysconf(libc::_SC_NPROCESSORS_ONLN) } >= 2;
    let pin = two_cores && tools::have("taskset");
    let sshd = sshd::Sshd::builder()
        .log_level("ERROR")
        .extra("MaxStartups 2000:30:2000")
        .start();
    let mut notes = Vec::new();
    if pin {
        let ok = Command::new("taskset")
            .args(["-a", "-c", "-p", "1", &sshd.pid().to_string()])
            .stdout(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        notes.push(if ok {
            "sshd pinned to core 1, clients to core 0 (taskset)".to_string()
        } else {
            "taskset of sshd failed: not pinned".to_string()
        });
    } else {
        notes.push("not pinned (one core or no taskset)".to_string());
    }
    let counter = if Command::new("perf")
        .args([
            "stat",
            "-e",
            "raw_syscalls:sys_enter",
            "-o",
            "/dev/null",
            "--",
            "true",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
    {
        Some("perf")
    } else if tools::have("strace") {
        Some("strace")
    } else {
        None
    };
    notes.push(format!(
        "syscalls counted with {}",
        match counter {
            Some("perf") => "perf stat -e raw_syscalls:sys_enter (whole client process tree)",
            Some(_) => "strace -f -c (whole client process tree)",
            None => "nothing (neither perf nor strace works): column empty",
        }
    ));
    let base = std::env::var("BENCH_DIR").unwrap_or_else(|_| "/dev/shm".into());
    let ctx = Ctx {
        pin,
        counter,
        peers: o.peers.clone(),
        me: std::env::current_exe().expect("current exe"),
        work: tempfile::tempdir_in(&base).expect("work dir"),
        tcp_port: tcp_server(pin.then_some(1)),
        sshd,
    };
    // A missing tool would drop rows: fail instead.
    let missing: Vec<&str> = ["ssh", "sftp", "scp", "rsync", "tar", "openssl"]
        .into_iter()
        .filter(|t| !tools::have(t))
        .collect();
    if !missing.is_empty() {
        eprintln!(
            "compare: missing {}: run as root (scripts/compare.sh installs them)",
            missing.join(", ")
        );
        return 1;
    }
    for p in ["peer_ssh2", "peer_russh", "peer_async_ssh2_lite"] {
        if !ctx.peers.join(p).exists() {
            eprintln!(
                "compare: {} missing: build benches/peers first (scripts/compare.sh does)",
                ctx.peers.join(p).display()
            );
            return 1;
        }
    }
    println!(
        "compare: {} mode, {} run(s) per case, libssh2 {}, OpenSSH sshd on 127.0.0.1:{}; {}",
        if o.smoke { "smoke" } else { "full" },
        o.runs,
        uring_ssh::libssh2_version(),
        ctx.sshd.port(),
        notes.join("; ")
    );
    let cases = cases(&o, &ctx);
    let mut rows: Vec<Row> = Vec::new();
    for case in &cases {
        let t = Instant::now();
        let first = rows.len();
        let args = &case.args;
        for j in &case.jobs {
            rows.push(Row {
                scenario: case.scenario,
                case: case.name.clone(),
                client: j.client.clone(),
                runs: Vec::new(),
                error: None,
            });
        }
        // The TCP ceiling talks to the sink server, not sshd.
        let tcp_args = {
            let mut a = args.clone();
            if let Some(i) = a.iter().position(|x| x == "--port") {
                a[i + 1] = ctx.tcp_port.to_string();
            }
            if let Some(i) = a.iter().position(|x| x == "--scenario") {
                a[i + 1] = format!("tcp-{}", a[i + 1]);
            }
            a
        };
        for run in 0..case.runs {
            let mut order: Vec<usize> = (0..case.jobs.len()).collect();
            if run % 2 == 1 {
                order.reverse();
            }
            for i in order {
                let job = &case.jobs[i];
                let row = &mut rows[first + i];
                if row.error.is_some() {
                    continue;
                }
                if let Some(p) = &case.check.clear {
                    let _ = std::fs::remove_dir_all(p);
                    let _ = std::fs::remove_file(p);
                }
                let mut job_args = if job.client == TCP_CEILING {
                    tcp_args.clone()
                } else {
                    args.clone()
                };
                job_args.extend(job.extra.iter().cloned());
                let counted = case.syscalls.then(|| ctx.work.path().join("syscalls.txt"));
                let r = ctx.run(job, &job_args, counted.as_deref()).and_then(|f| {
                    check(&case.check)?;
                    Ok(f)
                });
                match r {
                    Ok(f) => row.runs.push(f),
                    Err(e) => {
                        eprintln!(
                            "FAILED: [{}] {} / {}: {e}",
                            case.scenario, case.name, job.client
                        );
                        row.error = Some(e);
                    }
                }
            }
        }
        print_case(&rows[first..]);
        println!("  ({:.1} s)", t.elapsed().as_secs_f64());
    }
    let table = table(&rows);
    println!("\n{table}");
    let failed = rows.iter().filter(|r| r.error.is_some()).count();
    println!(
        "compare: {} rows, {failed} failed, {:.0} s in all",
        rows.len(),
        started.elapsed().as_secs_f64()
    );
    if let Some(path) = &o.json {
        let mut f = std::fs::File::create(path).expect("create JSON file");
        f.write_all(json(&o, &notes, &rows).as_bytes())
            .expect("write JSON");
        println!("compare: JSON in {}", path.display());
    }
    i32::from(failed > 0)
}

fn check(c: &Check) -> Result<(), String> {
    if let Some((path, len)) = &c.file {
        let got = std::fs::metadata(path)
            .map_err(|e| format!("{}: {e}", path.display()))?
            .len();
        if got != *len {
            return Err(format!("{}: {got} bytes, expected {len}", path.display()));
        }
    }
    if let Some((src, dst, files)) = &c.tree {
        let (src, dst, files) = (src.clone(), dst.clone(), *files);
        std::panic::catch_unwind(move || tools::same_tree(&src, &dst, files))
            .map_err(|_| "tree differs".to_string())?;
    }
    Ok(())
}

/// Medians of one row.
struct Medians {
    mbps: f64,
    user_gib: f64,
    sys_gib: f64,
    rate: f64,
    other: String,
}

fn medians(r: &Row) -> Medians {
    let m = |f: &dyn Fn(&Figures) -> f64| tools::median(&r.runs.iter().map(f).collect::<Vec<_>>());
    let gib = |f: &Figures| f.get("bytes") / GIB;
    let mbps = m(&|f| {
        if f.get("bytes") > 0.0 {
            f.get("bytes") / f.get("secs") / 1e6
        } else {
            f64::NAN
        }
    });
    let user_gib = m(&|f| {
        if gib(f) > 0.0 {
            f.get("user") / gib(f)
        } else {
            f64::NAN
        }
    });
    let sys_gib = m(&|f| {
        if gib(f) > 0.0 {
            f.get("sys") / gib(f)
        } else {
            f64::NAN
        }
    });
    let rate = m(&|f| f.get("count") / f.get("secs"));
    let mut other = Vec::new();
    let per_mib = |k: &str| m(&|f| f.get(k) / (f.get("bytes") / MIB as f64));
    let syscalls = per_mib("syscalls");
    if syscalls.is_finite() {
        other.push(format!("{syscalls:.1} syscalls/MiB"));
    }
    let enters = per_mib("ring_enters");
    if r.client.contains("poll backend") && m(&|f| f.get("ring_enters")) > 0.0 {
        other.push("io_uring ring used: this build has no poll backend".into());
    }
    if enters.is_finite() && mbps.is_finite() {
        other.push(format!(
            "ring: {enters:.1} enters, {:.1} SQEs /MiB",
            per_mib("ring_sqes")
        ));
    }
    match r.scenario {
        5 => other.push(format!(
            "{rate:.1} connects/s, {:.1} ms CPU each",
            m(&|f| (f.get("user") + f.get("sys")) / f.get("count")) * 1e3
        )),
        6 => other.push(format!(
            "{:.0} KiB RSS/session",
            m(&|f| f.get("rss_kib_per_session"))
        )),
        7 => other.push(format!(
            "p50 {:.0} µs, p99 {:.0} µs, max {:.0} µs, phases leaking {:.0}",
            m(&|f| f.get("p50_us")),
            m(&|f| f.get("p99_us")),
            m(&|f| f.get("max_us")),
            m(&|f| f.get("leaks"))
        )),
        8 => other.push(format!(
            "{rate:.0} files/s, CPU {:.2} s",
            m(&|f| f.get("user") + f.get("sys"))
        )),
        _ => {}
    }
    Medians {
        mbps,
        user_gib,
        sys_gib,
        rate,
        other: other.join("; "),
    }
}

fn num(x: f64, digits: usize) -> String {
    if x.is_finite() {
        format!("{x:.digits$}")
    } else {
        String::new()
    }
}

/// The one table: medians, and ours ÷ row for MB/s (or the rate) and CPU.
fn table(rows: &[Row]) -> String {
    let mut t = String::from(
        "| # | case | client | MB/s | client CPU s/GiB (user + sys) | other | ours ÷ row: MB/s or rate | ours ÷ row: CPU/GiB |\n\
         |---|---|---|---:|---:|---|---:|---:|\n",
    );
    let mut i = 0;
    while i < rows.len() {
        let j = rows[i..]
            .iter()
            .position(|r| r.case != rows[i].case)
            .map_or(rows.len(), |k| i + k);
        let group = &rows[i..j];
        let ours = group.iter().find(|r| r.client == OURS).map(medians);
        for r in group {
            let m = medians(r);
            let (speed, cpu) = match &ours {
                Some(o) if r.error.is_none() => {
                    let speed = if o.mbps.is_finite() {
                        o.mbps / m.mbps
                    } else {
                        o.rate / m.rate
                    };
                    (speed, (o.user_gib + o.sys_gib) / (m.user_gib + m.sys_gib))
                }
                _ => (f64::NAN, f64::NAN),
            };
            let cpu_cell = if m.user_gib.is_finite() {
                format!("{} + {}", num(m.user_gib, 2), num(m.sys_gib, 2))
            } else {
                String::new()
            };
            let cell = |s: &str| s.replace('|', "\\|");
            let other = match &r.error {
                Some(e) => format!("FAILED: {}", cell(e)),
                None => cell(&m.other),
            };
            let _ = writeln!(
                t,
                "| {} | {} | {} | {} | {} | {} | {} | {} |",
                r.scenario,
                cell(&r.case),
                cell(&r.client),
                num(m.mbps, 0),
                cpu_cell,
                other,
                num(speed, 2),
                num(cpu, 2)
            );
        }
        i = j;
    }
    t
}

fn print_case(rows: &[Row]) {
    for r in rows {
        let m = medians(r);
        let line = match &r.error {
            Some(e) => format!("FAILED {e}"),
            None if m.mbps.is_finite() => format!(
                "{} MB/s, {} + {} s/GiB {}",
                num(m.mbps, 0),
                num(m.user_gib, 2),
                num(m.sys_gib, 2),
                m.other
            ),
            None => m.other,
        };
        println!("[{}] {} / {}: {line}", r.scenario, r.case, r.client);
    }
}

fn json_str(s: &str) -> String {
    let mut o = String::from("\"");
    for c in s.chars() {
        match c {
            '"' => o.push_str("\\\""),
            '\\' => o.push_str("\\\\"),
            c if (c as u32) < 0x20 => o.push_str(&format!("\\u{:04x}", c as u32)),
            c => o.push(c),
        }
    }
    o.push('"');
    o
}

fn json_num(x: f64) -> String {
    if x.is_finite() {
        format!("{x}")
    } else {
        "null".into()
    }
}

fn json(o: &Opts, notes: &[String], rows: &[Row]) -> String {
    let mut s = format!(
        "{{\"mode\":{},\"runs\":{},\"libssh2\":{},\"notes\":[{}],\"rows\":[\n",
        json_str(if o.smoke { "smoke" } else { "full" }),
        o.runs,
        json_str(&uring_ssh::libssh2_version()),
        notes
            .iter()
            .map(|n| json_str(n))
            .collect::<Vec<_>>()
            .join(",")
    );
    let body: Vec<String> = rows
        .iter()
        .map(|r| {
            let m = medians(r);
            format!(
                "{{\"scenario\":{},\"case\":{},\"client\":{},\"mbps\":{},\"user_s_per_gib\":{},\"sys_s_per_gib\":{},\"rate_per_s\":{},\"other\":{},\"error\":{},\"runs\":[{}]}}",
                r.scenario,
                json_str(&r.case),
                json_str(&r.client),
                json_num(m.mbps),
                json_num(m.user_gib),
                json_num(m.sys_gib),
                json_num(m.rate),
                json_str(&m.other),
                r.error.as_deref().map_or("null".into(), json_str),
                r.runs.iter().map(Figures::to_json).collect::<Vec<_>>().join(",")
            )
        })
        .collect();
    s.push_str(&body.join(",\n"));
    s.push_str("\n]}\n");
    s
}
