//! The main job on its embedded default: starts a throwaway OpenSSH server on
//! loopback, then on one thread
//!
//! 1. reads from one session (single-stream MB/s),
//! 2. reads from N sessions at once (aggregate MB/s),
//! 3. drops sessions at random points mid-work and counts what is left,
//!
//! printing throughput, client CPU, io_uring submissions per MiB and drop
//! statistics. `cargo run --release --example demo -- --help` for options.

use uring_ssh_testkit::sshd;
use uring_ssh_testkit::util::settle;

use std::cell::Cell;
use std::rc::Rc;
use std::time::{Duration, Instant};

use futures::future::join_all;
use tokio::io::AsyncReadExt;
use uring_ssh::{Config, Session};

struct Options {
    sessions: usize,
    mib_single: usize,
    mib_each: usize,
    drops: usize,
    cipher: Option<String>,
    window: Option<u32>,
}

fn options() -> Options {
    let mut o = Options {
        sessions: 16,
        mib_single: 512,
        mib_each: 64,
        drops: 200,
        cipher: None,
        window: None,
    };
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut num = |name: &str| -> usize {
            args.next()
                .and_then(|v| v.parse().ok())
                .unwrap_or_else(|| panic!("{name} needs a number"))
        };
        match a.as_str() {
            "--sessions" => o.sessions = num("--sessions").max(1),
            "--mib-single" => o.mib_single = num("--mib-single"),
            "--mib-each" => o.mib_each = num("--mib-each"),
            "--drops" => o.drops = num("--drops"),
            "--cipher" => o.cipher = args.next(),
            "--window-kib" => o.window = Some(num("--window-kib") as u32 * 1024),
            "--help" | "-h" => {
                println!(
                    "demo [--sessions N] [--mib-single M] [--mib-each M] [--drops D] [--cipher NAME] [--window-kib K]"
                );
                std::process::exit(0);
            }
            other => {
                eprintln!("unknown option {other} (see --help)");
                std::process::exit(2);
            }
        }
    }
    o
}

/// User and system CPU seconds of this process so far.
fn cpu() -> (f64, f64) {
    // SAFETY: getrusage fills the struct it is given.
    let ru = unsafe {
        let mut ru: libc::rusage = std::mem::zeroed();
        libc::getrusage(libc::RUSAGE_SELF, &mut ru);
        ru
    };
    let s = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    (s(ru.ru_utime), s(ru.ru_stime))
}

struct Measure {
    start: Instant,
    cpu: (f64, f64),
    ring: uring_ssh::reactor::Stats,
}

impl Measure {
    fn start() -> Self {
        Measure {
            start: Instant::now(),
            cpu: cpu(),
            ring: uring_ssh::reactor::stats().unwrap_or_default(),
        }
    }

    fn report(&self, label: &str, bytes: u64) {
        let secs = self.start.elapsed().as_secs_f64();
        let (u, s) = cpu();
        let ring = uring_ssh::reactor::stats().unwrap_or_default();
        let mib = bytes as f64 / (1 << 20) as f64;
        let gib = mib / 1024.0;
        println!(
            "{label:<28} {:>8.0} MB/s  {:>5.2} s user + {:>5.2} s sys per GiB  \
             {:>6.1} io_uring_enter/MiB  {:>6.1} SQEs/MiB",
            bytes as f64 / secs / 1e6,
            (u - self.cpu.0) / gib,
            (s - self.cpu.1) / gib,
            (ring.enter_calls - self.ring.enter_calls) as f64 / mib,
            (ring.sqes_submitted - self.ring.sqes_submitted) as f64 / mib,
        );
    }
}

async fn session(sshd: &sshd::Sshd, o: &Options) -> Session {
    let mut cfg = Config::new().known_hosts(Some(sshd.known_hosts()));
    if let Some(c) = &o.cipher {
        cfg = cfg.ciphers(c);
    }
    if let Some(w) = o.window {
        cfg = cfg.channel_window(w, uring_ssh::DEFAULT_PACKET);
    }
    let s = Session::connect_addr(sshd.addr(), cfg)
        .await
        .expect("connect");
    s.auth_pubkey_file(&sshd.user(), &sshd.user_key(), None)
        .await
        .expect("auth");
    s
}

/// Reads `mib` MiB of zeros over exec; returns the bytes read.
async fn read_zeros(s: &Session, mib: usize) -> u64 {
    let mut ch = s
        .exec(&format!("head -c {} /dev/zero", mib << 20))
        .await
        .expect("exec");
    let mut buf = vec![0u8; 256 * 1024];
    let mut n = 0u64;
    loop {
        let k = ch.read(&mut buf).await.expect("read");
        if k == 0 {
            break;
        }
        n += k as u64;
    }
    ch.wait().await.expect("exit");
    n
}

fn main() {
    let o = options();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let local = tokio::task::LocalSet::new();
    local.block_on(&rt, run(o));
}

async fn run(o: Options) {
    let sshd = sshd::Sshd::start();
    println!(
        "uring-ssh demo: OpenSSH on 127.0.0.1:{} (throwaway), libssh2 {}, one thread",
        sshd.port(),
        uring_ssh::libssh2_version()
    );

    // 1. One session.
    let s = session(&sshd, &o).await;
    println!(
        "cipher {}",
        s.negotiated(uring_ssh::MethodType::CipherServerToClient)
            .unwrap_or_default()
    );
    let m = Measure::start();
    let n = read_zeros(&s, o.mib_single).await;
    m.report("1 session, read", n);
    s.close("done").await.expect("close");

    // 2. N sessions at once on this thread.
    let sessions = join_all((0..o.sessions).map(|_| session(&sshd, &o))).await;
    let m = Measure::start();
    let moved: u64 = join_all(sessions.iter().map(|s| read_zeros(s, o.mib_each)))
        .await
        .into_iter()
        .sum();
    m.report(&format!("{} sessions, read (aggregate)", o.sessions), moved);
    for s in &sessions {
        s.close("done").await.expect("close");
    }
    drop(sessions);

    // 3. Random drops.
    settle(Duration::from_secs(10)).await;
    let fds_before = open_fds();
    let mut durations = Vec::new();
    let mut mid_transfer = 0;
    let mut seed = 0x9e37_79b9_7f4a_7c15u64;
    for _ in 0..o.drops {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        let delay = Duration::from_micros(seed % 150_000);
        let transferring = Rc::new(Cell::new(false));
        let flag = transferring.clone();
        let sshd = &sshd;
        let o = &o;
        let mut job = Box::pin(async move {
            let s = session(sshd, o).await;
            let mut ch = s.exec("cat /dev/zero").await.expect("exec");
            flag.set(true);
            let mut buf = vec![0u8; 65536];
            while ch.read(&mut buf).await.expect("read") > 0 {}
        });
        let _ = tokio::time::timeout(delay, &mut job).await;
        let t = Instant::now();
        drop(job);
        durations.push(t.elapsed());
        mid_transfer += transferring.get() as usize;
    }
    let ring = settle(Duration::from_secs(10)).await;
    durations.sort();
    if !durations.is_empty() {
        let p = |q: f64| durations[((durations.len() - 1) as f64 * q) as usize];
        println!(
            "{} drops ({} mid-transfer): p50 {:?}  p99 {:?}  max {:?}",
            durations.len(),
            mid_transfer,
            p(0.5),
            p(0.99),
            durations[durations.len() - 1]
        );
    }
    println!(
        "left after drops: libssh2 {} bytes in {} blocks, {} orphaned ring buffers, \
         {} ops in flight, {} fds leaked, {} libssh2 objects leaked",
        uring_ssh::libssh2_bytes_outstanding(),
        uring_ssh::libssh2_blocks_outstanding(),
        ring.orphaned_outstanding,
        ring.ops_in_flight,
        open_fds() as i64 - fds_before as i64,
        uring_ssh::leaked_objects()
    );
}

fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd")
        .map(|d| d.count())
        .unwrap_or(0)
}
