//! How long dropping a session takes, and what it leaves behind: against a
//! throwaway OpenSSH server on loopback, on one current-thread runtime,
//! `DROPS` times (default 300) a session is connected, authenticated, and
//! either mid-transfer (`exec("cat /dev/zero")` with at least 1 MiB read) or
//! idle (right after auth), then dropped; only the drop itself is timed.
//! Exits non-zero if anything leaked.

#[path = "../tests/common/sshd.rs"]
#[allow(dead_code)]
mod sshd;

use std::time::{Duration, Instant};

use tokio::io::AsyncReadExt;
use uring_ssh::{Config, Session};

const MIB: usize = 1 << 20;

fn main() {
    // `cargo bench` passes `--bench`; nothing else is expected.
    let drops: usize = std::env::var("DROPS")
        .ok()
        .map(|v| v.parse().expect("DROPS must be a number"))
        .unwrap_or(300);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let ok = rt.block_on(run(drops));
    if !ok {
        std::process::exit(1);
    }
}

async fn run(drops: usize) -> bool {
    let sshd = sshd::Sshd::builder()
        .extra("MaxStartups 1000:30:1000")
        .start();
    println!(
        "drop_latency: OpenSSH on 127.0.0.1:{} (throwaway), libssh2 {}, one thread, {drops} drops each",
        sshd.port(),
        uring_ssh::libssh2_version()
    );

    // Warm up (OpenSSL, the ring, the shared dummy fd) with graceful closes.
    for _ in 0..3 {
        let s = session(&sshd).await;
        let mut ch = s.exec("true").await.expect("exec");
        ch.wait().await.expect("exit");
        drop(ch);
        s.close("warm-up").await.expect("close");
    }

    let mut ok = true;
    ok &= measure("drop mid-transfer", drops, || async {
        let s = session(&sshd).await;
        let mut ch = s.exec("cat /dev/zero").await.expect("exec");
        let mut buf = vec![0u8; 64 * 1024];
        let mut got = 0usize;
        while got < MIB {
            let n = ch.read(&mut buf).await.expect("read");
            assert!(n > 0, "cat /dev/zero ended");
            got += n;
        }
        (Some(ch), s)
    })
    .await;
    ok &= measure("drop idle after auth", drops, || async {
        (None, session(&sshd).await)
    })
    .await;
    ok
}

/// Runs `drops` times: `make` a session (and maybe a channel), then times
/// dropping them. Prints one line; returns whether nothing leaked.
async fn measure<F, Fut>(label: &str, drops: usize, make: F) -> bool
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = (Option<uring_ssh::Channel>, Session)>,
{
    let before = settle().await;
    let fds_before = open_fds();
    let bytes_before = uring_ssh::libssh2_bytes_outstanding();
    let leaked_before = uring_ssh::leaked_objects();
    let mut durations = Vec::with_capacity(drops);
    // Ops the drops found in flight and left to the ring (a measure of how
    // busy the sessions were when dropped).
    let mut orphaned_by_drops = 0u64;
    let started = Instant::now();
    for _ in 0..drops {
        let (ch, s) = make().await;
        let orphaned = uring_ssh::reactor::stats()
            .expect("ring")
            .orphaned_outstanding;
        let t = Instant::now();
        drop(ch);
        drop(s);
        durations.push(t.elapsed());
        let now = uring_ssh::reactor::stats()
            .expect("ring")
            .orphaned_outstanding;
        orphaned_by_drops += now.saturating_sub(orphaned);
    }
    let wall = started.elapsed();
    let ring = settle().await;
    let fds_after = open_fds();
    let bytes = uring_ssh::libssh2_bytes_outstanding();
    let blocks = uring_ssh::libssh2_blocks_outstanding();
    let leaked = uring_ssh::leaked_objects() - leaked_before;

    durations.sort();
    let pct = |q: f64| durations[((durations.len() - 1) as f64 * q) as usize];
    let (p50, p99, max) = if durations.is_empty() {
        Default::default()
    } else {
        (pct(0.5), pct(0.99), durations[durations.len() - 1])
    };
    println!(
        "{label}: {drops} drops, p50 {p50:?} p99 {p99:?} max {max:?}, \
         libssh2 bytes outstanding {bytes}, orphaned ring buffers {}, \
         fds before/after {fds_before}/{fds_after}, leaked objects {leaked}",
        ring.orphaned_outstanding,
    );
    println!(
        "  ({:.1} s for the phase; libssh2 bytes before {bytes_before}, blocks after {blocks}; \
         {orphaned_by_drops} in-flight ops orphaned by the drops ({:.2} per drop); \
         ring: {} ops in flight after settle, {} io_uring_enter and {} SQEs over the phase)",
        wall.as_secs_f64(),
        orphaned_by_drops as f64 / drops.max(1) as f64,
        ring.ops_in_flight,
        ring.enter_calls - before.enter_calls,
        ring.sqes_submitted - before.sqes_submitted,
    );
    let clean = bytes == 0
        && blocks == 0
        && ring.orphaned_outstanding == 0
        && ring.ops_in_flight == 0
        && fds_after == fds_before
        && leaked == 0;
    if !clean {
        eprintln!("{label}: LEAK (see the line above)");
    }
    clean
}

async fn session(sshd: &sshd::Sshd) -> Session {
    let s = Session::connect_addr(
        sshd.addr(),
        Config::new().known_hosts(Some(sshd.known_hosts())),
    )
    .await
    .expect("connect");
    s.auth_pubkey_file(&sshd.user(), &sshd.user_key(), None)
        .await
        .expect("auth");
    s
}

/// Waits (bounded, 10 s) until the ring has nothing in flight.
async fn settle() -> uring_ssh::reactor::Stats {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let r = uring_ssh::reactor::stats().expect("ring");
        if (r.ops_in_flight == 0 && r.orphaned_outstanding == 0) || Instant::now() > deadline {
            return r;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd")
        .expect("/proc/self/fd")
        .count()
}
