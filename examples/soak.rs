//! Soak: many authenticated sessions on one thread against a throwaway
//! OpenSSH server on loopback, for minutes, each running small exec and
//! SFTP work in a loop; now and then a session is dropped in the middle of
//! its work (an injected drop) and reconnects.
//!
//! Every `--report-secs` it prints RSS, live sessions, operations done,
//! errors and drops; at the end it closes everything and checks that
//! nothing is left: no error beyond the injected drops, libssh2 memory,
//! leaked objects, ring operations and fds back to their baseline, and RSS
//! at the end within 25% (+32 MiB) of RSS after warm-up. Exits 1 if not.
//!
//! `cargo run --release --example soak -- --sessions 1000 --minutes 10`

use uring_ssh_testkit::sshd;
use uring_ssh_testkit::util::{raise_nofile, settle};

use std::cell::{Cell, RefCell};
use std::rc::Rc;
use std::time::{Duration, Instant};

use tokio::io::AsyncReadExt;
use uring_ssh::{Config, Error, Session};

struct Options {
    sessions: usize,
    minutes: f64,
    report_secs: u64,
    /// One drop per this many operations, on average.
    drop_every: u64,
}

fn options() -> Options {
    let mut o = Options {
        sessions: 1000,
        minutes: 10.0,
        report_secs: 30,
        drop_every: 50,
    };
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut val = |name: &str| -> f64 {
            args.next()
                .and_then(|v| v.parse().ok())
                .unwrap_or_else(|| panic!("{name} needs a number"))
        };
        match a.as_str() {
            "--sessions" => o.sessions = (val("--sessions") as usize).max(1),
            "--minutes" => o.minutes = val("--minutes"),
            "--report-secs" => o.report_secs = (val("--report-secs") as u64).max(1),
            "--drop-every" => o.drop_every = (val("--drop-every") as u64).max(1),
            "--help" | "-h" => {
                println!(
                    "soak [--sessions N (1000)] [--minutes M (10)] [--report-secs S (30)] [--drop-every K (50)]"
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

/// What all workers have done so far.
#[derive(Default)]
struct Counters {
    live: Cell<usize>,
    connects: Cell<u64>,
    ops: Cell<u64>,
    drops: Cell<u64>,
    errors: Cell<u64>,
    first_errors: RefCell<Vec<String>>,
}

impl Counters {
    fn error(&self, what: &str, e: &dyn std::fmt::Display) {
        self.errors.set(self.errors.get() + 1);
        let mut f = self.first_errors.borrow_mut();
        if f.len() < 20 {
            eprintln!("error: {what}: {e}");
            f.push(format!("{what}: {e}"));
        }
    }
}

/// xorshift64*.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) % n.max(1)
    }
}

fn rss_kib() -> u64 {
    let s = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    s.lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

/// glibc's heap, in KiB: bytes in use (all arenas, mmapped chunks
/// included) and bytes free but kept by malloc. RSS that grows with the
/// first is memory held; with the second, fragmentation.
fn heap_kib() -> (u64, u64) {
    // SAFETY: mallinfo2 only reads malloc's own counters.
    let m = unsafe { libc::mallinfo2() };
    (
        ((m.uordblks + m.hblkhd) / 1024) as u64,
        (m.fordblks / 1024) as u64,
    )
}

fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").map_or(0, |d| d.count())
}

fn main() {
    let o = options();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let local = tokio::task::LocalSet::new();
    let ok = local.block_on(&rt, run(o));
    std::process::exit(if ok { 0 } else { 1 });
}

struct Env {
    sshd: sshd::Sshd,
    config: Config,
    dir: tempfile::TempDir,
    counters: Counters,
    deadline: Instant,
    drop_every: u64,
}

async fn connect(env: &Env) -> Result<Session, Error> {
    let s = Session::connect_addr(env.sshd.addr(), env.config.clone()).await?;
    s.auth_pubkey_file(&env.sshd.user(), &env.sshd.user_key(), None)
        .await?;
    Ok(s)
}

/// One small piece of work; an `Err` is an error beyond the injected ones.
async fn op(
    env: &Env,
    s: &Session,
    sftp: &uring_ssh::sftp::Sftp,
    id: usize,
    n: u64,
) -> Result<(), String> {
    match n % 3 {
        0 => {
            let mut ch = s
                .exec(&format!("echo soak {id}"))
                .await
                .map_err(|e| format!("exec: {e}"))?;
            let mut out = String::new();
            ch.read_to_string(&mut out)
                .await
                .map_err(|e| format!("exec read: {e}"))?;
            ch.wait().await.map_err(|e| format!("exec wait: {e}"))?;
            if out != format!("soak {id}\n") {
                return Err(format!("exec output {out:?}"));
            }
        }
        1 => {
            let path = env.dir.path().join(format!("s{id}"));
            let data: Vec<u8> = (0..4096u32)
                .map(|i| (i as u64 * 31 + n + id as u64) as u8)
                .collect();
            let f = sftp
                .create(&path)
                .await
                .map_err(|e| format!("sftp create: {e}"))?;
            f.write_at(0, &data)
                .await
                .map_err(|e| format!("sftp write: {e}"))?;
            f.close().await.map_err(|e| format!("sftp close: {e}"))?;
            let f = sftp
                .open(&path)
                .await
                .map_err(|e| format!("sftp open: {e}"))?;
            let got = f
                .read_at(0, 4096)
                .await
                .map_err(|e| format!("sftp read: {e}"))?;
            f.close().await.map_err(|e| format!("sftp close: {e}"))?;
            if got != data {
                return Err("sftp read back different bytes".into());
            }
        }
        _ => {
            let a = sftp
                .stat(env.dir.path())
                .await
                .map_err(|e| format!("sftp stat: {e}"))?;
            if !a.is_dir() {
                return Err("sftp stat: not a directory".into());
            }
        }
    }
    Ok(())
}

/// Work that a drop interrupts: a stream read, an SFTP read, or nothing.
async fn interrupted(s: &Session, sftp: &uring_ssh::sftp::Sftp, env: &Env, kind: u64) {
    match kind {
        0 => {
            if let Ok(mut ch) = s.exec("cat /dev/zero").await {
                let mut buf = vec![0u8; 64 * 1024];
                while let Ok(n) = ch.read(&mut buf).await {
                    if n == 0 {
                        break;
                    }
                }
            }
        }
        _ => {
            let path = env.sshd.dir().join("sshd_config");
            if let Ok(f) = sftp.open(&path).await {
                loop {
                    if f.read_at(0, 4096).await.is_err() {
                        break;
                    }
                }
            }
        }
    }
    std::future::pending::<()>().await;
}

async fn worker(env: Rc<Env>, id: usize) {
    let c = &env.counters;
    let mut rng = Rng(0x5eed_0000 + id as u64 * 7919);
    // Spread the first connects over a few seconds.
    tokio::time::sleep(Duration::from_millis(id as u64 * 5)).await;
    let mut n = 0u64;
    while Instant::now() < env.deadline {
        let s = match connect(&env).await {
            Ok(s) => s,
            Err(e) => {
                c.error("connect", &e);
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        let sftp = match s.sftp().await {
            Ok(f) => f,
            Err(e) => {
                c.error("sftp", &e);
                continue;
            }
        };
        c.connects.set(c.connects.get() + 1);
        c.live.set(c.live.get() + 1);
        let dropped = loop {
            if Instant::now() >= env.deadline {
                break false;
            }
            // Paced: each session works every 1-4 s.
            tokio::time::sleep(Duration::from_millis(1000 + rng.below(3000))).await;
            if rng.below(env.drop_every) == 0 {
                // Injected: drop the session in the middle of some work.
                let kind = rng.below(2);
                let after = Duration::from_millis(rng.below(50));
                let _ = tokio::time::timeout(after, interrupted(&s, &sftp, &env, kind)).await;
                c.drops.set(c.drops.get() + 1);
                break true;
            }
            n += 1;
            match op(&env, &s, &sftp, id, n).await {
                Ok(()) => c.ops.set(c.ops.get() + 1),
                Err(e) => {
                    c.error("op", &e);
                    break true;
                }
            }
        };
        c.live.set(c.live.get() - 1);
        if dropped {
            drop(sftp);
            drop(s);
        } else {
            drop(sftp);
            if let Err(e) = s.close("soak done").await {
                c.error("close", &e);
            }
        }
    }
}

async fn run(o: Options) -> bool {
    let nofile = raise_nofile();
    let sshd = sshd::Sshd::builder()
        .log_level("INFO")
        .extra(&format!(
            "MaxStartups {0}:100:{0}\nMaxSessions 16",
            o.sessions * 2 + 10
        ))
        .start();
    let dir = tempfile::tempdir().expect("tempdir");
    let config = Config::new()
        .known_hosts(Some(sshd.known_hosts()))
        .timeout(Some(Duration::from_secs(60)))
        .connect_timeout(Duration::from_secs(60));
    println!(
        "soak: {} sessions on one thread for {} min against OpenSSH on 127.0.0.1:{}; a drop every ~{} ops; fd limit {nofile}",
        o.sessions,
        o.minutes,
        sshd.port(),
        o.drop_every
    );
    // Baseline after one session (OpenSSL, the ring, the shared dummy fd).
    let env = Rc::new(Env {
        sshd,
        config,
        dir,
        counters: Counters::default(),
        deadline: Instant::now() + Duration::from_secs_f64(o.minutes * 60.0),
        drop_every: o.drop_every,
    });
    connect(&env)
        .await
        .expect("first session")
        .close("warm-up")
        .await
        .expect("close");
    settle(Duration::from_secs(20)).await;
    let fds0 = open_fds();
    let bytes0 = uring_ssh::libssh2_bytes_outstanding();
    let t0 = Instant::now();

    let workers: Vec<_> = (0..o.sessions)
        .map(|id| tokio::task::spawn_local(worker(env.clone(), id)))
        .collect();
    let reporter = {
        let env = env.clone();
        let every = Duration::from_secs(o.report_secs);
        tokio::task::spawn_local(async move {
            let mut curve = Vec::new();
            println!(
                "   time   RSS MiB  heap used  heap free  sessions       ops  errors  drops  libssh2 KiB  ring ops  fds"
            );
            loop {
                tokio::time::sleep(every).await;
                let c = &env.counters;
                let st = uring_ssh::reactor::stats().expect("ring");
                let rss = rss_kib();
                let (used, free) = heap_kib();
                println!(
                    "{:>6.0} s {:>9.1} {:>10.1} {:>10.1} {:>9} {:>9} {:>7} {:>6} {:>12} {:>9} {:>4}",
                    t0.elapsed().as_secs_f64(),
                    rss as f64 / 1024.0,
                    used as f64 / 1024.0,
                    free as f64 / 1024.0,
                    c.live.get(),
                    c.ops.get(),
                    c.errors.get(),
                    c.drops.get(),
                    uring_ssh::libssh2_bytes_outstanding() / 1024,
                    st.ops_in_flight,
                    open_fds()
                );
                curve.push((c.live.get(), rss));
                if Instant::now() >= env.deadline {
                    return curve;
                }
            }
        })
    };
    for w in workers {
        w.await.expect("worker panicked");
    }
    let curve = reporter.await.expect("reporter");
    let took = t0.elapsed();
    let st = settle(Duration::from_secs(20)).await;
    let c = &env.counters;
    // Warm-up: the first report with (nearly) every session up.
    let warm = curve
        .iter()
        .find(|(live, _)| *live * 10 >= o.sessions * 9)
        .or(curve.first())
        .map_or(0, |p| p.1);
    let end = curve.last().map_or(0, |p| p.1);
    let rss_after = rss_kib();
    let fds = open_fds();
    let bytes = uring_ssh::libssh2_bytes_outstanding();
    let leaked = uring_ssh::leaked_objects();
    println!(
        "soak: {:.1} min, {} connects, {} ops, {} injected drops, {} errors",
        took.as_secs_f64() / 60.0,
        c.connects.get(),
        c.ops.get(),
        c.drops.get(),
        c.errors.get()
    );
    for e in c.first_errors.borrow().iter() {
        println!("  error: {e}");
    }
    if c.errors.get() > 0 {
        // What sshd said about it.
        let log = env.sshd.log();
        let lines: Vec<&str> = log
            .lines()
            .filter(|l| !l.starts_with("Accepted") && !l.contains("disconnect"))
            .filter(|l| !l.starts_with("Connection from") && !l.starts_with("Starting session"))
            .take(20)
            .collect();
        println!(
            "sshd log, first lines other than logins:\n  {}",
            lines.join("\n  ")
        );
    }
    let (used, free) = heap_kib();
    println!(
        "RSS: {:.1} MiB after warm-up, {:.1} MiB at the end, {:.1} MiB once all closed \
         (heap: {:.1} MiB in use, {:.1} MiB free in malloc)",
        warm as f64 / 1024.0,
        end as f64 / 1024.0,
        rss_after as f64 / 1024.0,
        used as f64 / 1024.0,
        free as f64 / 1024.0
    );
    println!(
        "after close: libssh2 bytes {bytes} (baseline {bytes0}), leaked objects {leaked}, fds {fds} (baseline {fds0}), ring {st:?}"
    );
    let mut ok = true;
    let mut check = |cond: bool, what: &str| {
        if !cond {
            println!("FAIL: {what}");
            ok = false;
        }
    };
    check(c.errors.get() == 0, "errors beyond the injected drops");
    check(c.ops.get() > 0 && c.drops.get() > 0, "no work or no drops");
    check(bytes == bytes0, "libssh2 memory not back to its baseline");
    check(leaked == 0, "leaked libssh2 objects");
    check(fds == fds0, "fds not back to their baseline");
    check(
        st.ops_in_flight == 0 && st.orphaned_outstanding == 0,
        "ring operations left",
    );
    check(
        end <= warm + warm / 4 + 32 * 1024,
        "RSS grew more than 25% (+32 MiB) after warm-up",
    );
    println!("soak: {}", if ok { "ok" } else { "FAILED" });
    ok
}
