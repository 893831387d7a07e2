//! The drop proof: a session dropped at a random point — mid-connect,
//! mid-handshake, mid-auth, mid-transfer — 1,000 times on one thread, and
//! afterwards nothing is left: no libssh2 memory, no orphaned ring buffers,
//! no open fds. Its own test binary, so the process-wide counters it reads
//! belong to it alone.

use std::cell::Cell;
use std::rc::Rc;
use std::time::{Duration, Instant};

use tokio::io::AsyncReadExt;
use uring_ssh::Session;
use uring_ssh_testkit::sshd::Sshd;
use uring_ssh_testkit::util::{Prng, config, open_fds, settle};

const DROPS: usize = 1000;

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Phase {
    Connecting,
    Authenticating,
    Opening,
    Transferring,
}

#[tokio::test]
async fn thousand_random_drops_leak_nothing() {
    let sshd = Sshd::builder().extra("MaxStartups 1000:30:1000").start();

    // Warm up (OpenSSL, the ring, the shared dummy fd) and time how long a
    // session takes to authenticate and to reach its transfer.
    // The quickest authentication bounds the early drops: one slow warm-up
    // (a busy machine) must not push them all past authentication.
    let mut to_auth = Duration::MAX;
    let mut setup = Duration::ZERO;
    for _ in 0..3 {
        let t = Instant::now();
        let s = uring_ssh_testkit::util::connect(&sshd).await;
        to_auth = to_auth.min(t.elapsed());
        let ch = s.exec("true").await.unwrap();
        setup = setup.max(t.elapsed());
        drop(ch);
        s.close("warm-up").await.unwrap();
    }
    let stats = settle(Duration::from_secs(10)).await;
    let fds_before = open_fds();
    let bytes_before = uring_ssh::libssh2_bytes_outstanding();
    let blocks_before = uring_ssh::libssh2_blocks_outstanding();
    assert_eq!(
        bytes_before, 0,
        "libssh2 memory outstanding with no session"
    );
    assert_eq!(stats.ops_in_flight, 0);

    let mut rng = Prng::new(0xd0d0);
    let mut durations = Vec::with_capacity(DROPS);
    let mut phases = [0usize; 4];
    for _ in 0..DROPS {
        let phase = Rc::new(Cell::new(Phase::Connecting));
        let job = transfer(&sshd, phase.clone());
        let mut job = Box::pin(job);
        // A third of the drops before authentication ends, the rest
        // spread over opening the channel and transferring.
        let (from, to) = if rng.below(3) == 0 {
            (Duration::ZERO, to_auth)
        } else {
            (to_auth, 2 * setup)
        };
        let span = (to - from).as_micros().max(1) as u64;
        let delay = from + Duration::from_micros(rng.below(span));
        let outcome = tokio::time::timeout(delay, &mut job).await;
        assert!(outcome.is_err(), "the job ended by itself: {outcome:?}");
        let t = Instant::now();
        drop(job);
        durations.push(t.elapsed());
        phases[phase.get() as usize] += 1;
    }

    let stats = settle(Duration::from_secs(10)).await;
    assert_eq!(stats.orphaned_outstanding, 0, "{stats:?}");
    assert_eq!(stats.ops_in_flight, 0, "{stats:?}");
    assert_eq!(uring_ssh::libssh2_bytes_outstanding(), bytes_before);
    assert_eq!(uring_ssh::libssh2_blocks_outstanding(), blocks_before);
    assert_eq!(uring_ssh::leaked_objects(), 0);
    assert_eq!(open_fds(), fds_before, "fds leaked");

    durations.sort();
    let pct = |p: f64| durations[((durations.len() - 1) as f64 * p) as usize];
    eprintln!(
        "session setup {setup:?} (auth done at {to_auth:?}); {DROPS} drops (connecting {}, authenticating {}, opening {}, transferring {}): \
         p50 {:?}, p99 {:?}, max {:?}; ring after: {stats:?}",
        phases[0],
        phases[1],
        phases[2],
        phases[3],
        pct(0.5),
        pct(0.99),
        durations[durations.len() - 1]
    );
    // The proof covers every phase, not just the easy one.
    assert!(phases[Phase::Transferring as usize] >= 100, "{phases:?}");
    assert!(
        phases[Phase::Connecting as usize] + phases[Phase::Authenticating as usize] >= 50,
        "{phases:?}"
    );
}

/// Connect, authenticate, open a channel and read forever, recording how far it got.
async fn transfer(sshd: &Sshd, phase: Rc<Cell<Phase>>) -> Result<(), uring_ssh::Error> {
    let s = Session::connect_addr(sshd.addr(), config(sshd)).await?;
    phase.set(Phase::Authenticating);
    s.auth_pubkey_file(&sshd.user(), &sshd.user_key(), None)
        .await?;
    phase.set(Phase::Opening);
    let mut ch = s.exec("cat /dev/zero").await?;
    phase.set(Phase::Transferring);
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        if ch.read(&mut buf).await? == 0 {
            return Ok(());
        }
    }
}
