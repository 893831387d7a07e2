//! Drop latency of sessions against a loopback OpenSSH server, shared by
//! `benches/drop_latency.rs` and the comparison harness
//! (`examples/compare/`): sessions connected, authenticated, maybe mid-
//! transfer, then dropped; only the drop is timed, and everything the drops
//! could leave behind is counted afterwards.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use tokio::io::AsyncReadExt;
use uring_ssh::{Config, Session};

use crate::util::settle;

const MIB: usize = 1 << 20;

/// Where the sessions go and how they log in.
#[derive(Debug, Clone)]
pub struct Target {
    /// sshd's address.
    pub addr: SocketAddr,
    /// Its known_hosts file.
    pub known_hosts: PathBuf,
    /// User to log in as.
    pub user: String,
    /// Private key of that user.
    pub key: PathBuf,
}

/// What one phase of drops measured.
#[derive(Debug, Clone)]
pub struct DropFigures {
    /// Median drop time.
    pub p50: Duration,
    /// 99th percentile.
    pub p99: Duration,
    /// Slowest drop.
    pub max: Duration,
    /// Nothing was left behind (libssh2 memory, ring buffers, fds, objects).
    pub clean: bool,
}

/// Drops `drops` sessions mid-transfer (`exec("cat /dev/zero")`, at least
/// 1 MiB read) and `drops` idle right after auth, after a warm-up.
pub async fn run(sshd: &Target, drops: usize) -> Vec<DropFigures> {
    // Warm up (OpenSSL, the ring, the shared dummy fd) with graceful closes.
    for _ in 0..3 {
        let s = session(sshd).await;
        let mut ch = s.exec("true").await.expect("exec");
        ch.wait().await.expect("exit");
        drop(ch);
        s.close("warm-up").await.expect("close");
    }

    let mid = measure("drop mid-transfer", drops, || async {
        let s = session(sshd).await;
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
    let idle = measure("drop idle after auth", drops, || async {
        (None, session(sshd).await)
    })
    .await;
    vec![mid, idle]
}

/// Runs `drops` times: `make` a session (and maybe a channel), then times
/// dropping them. Prints one line.
async fn measure<F, Fut>(label: &str, drops: usize, make: F) -> DropFigures
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = (Option<uring_ssh::Channel>, Session)>,
{
    let before = settle(Duration::from_secs(10)).await;
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
    let ring = settle(Duration::from_secs(10)).await;
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
    DropFigures {
        p50,
        p99,
        max,
        clean,
    }
}

async fn session(t: &Target) -> Session {
    let s = Session::connect_addr(t.addr, Config::new().known_hosts(Some(&t.known_hosts)))
        .await
        .expect("connect");
    s.auth_pubkey_file(&t.user, &t.key, None)
        .await
        .expect("auth");
    s
}

fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd")
        .expect("/proc/self/fd")
        .count()
}
