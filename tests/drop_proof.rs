//! The drop proof: a session dropped at a random point — mid-connect,
//! mid-handshake, mid-auth, mid-transfer — 1,000 times on one thread, and
//! 1,000 times over the two threads of a `Pool`, and afterwards nothing is
//! left: no libssh2 memory, no orphaned ring buffers, no open fds. Its own
//! test binary, its tests one at a time, so the process-wide counters it
//! reads belong to the test reading them.

use std::cell::Cell;
use std::rc::Rc;
use std::time::{Duration, Instant};

use tokio::io::AsyncReadExt;
use uring_ssh::{Pool, PoolConfig, Session};
use uring_ssh_testkit::sshd::Sshd;
use uring_ssh_testkit::util::{Prng, open_fds, settle};

const DROPS: usize = 1000;

use uring_ssh_testkit::util::{Login, serial};

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Phase {
    Connecting,
    Authenticating,
    Opening,
    Transferring,
}

#[test]
fn thousand_random_drops_leak_nothing() {
    let _g = serial();
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
        .block_on(drops_on_one_thread());
}

async fn drops_on_one_thread() {
    let sshd = Sshd::builder().extra("MaxStartups 1000:30:1000").start();
    let login = Login::of(&sshd);
    let (to_auth, setup) = warm_up(&login).await;
    let stats = settle(Duration::from_secs(10)).await;
    let fds_before = open_fds();
    let bytes_before = uring_ssh::libssh2_bytes_outstanding();
    let blocks_before = uring_ssh::libssh2_blocks_outstanding();
    assert_eq!(
        bytes_before, 0,
        "libssh2 memory outstanding with no session"
    );
    assert_eq!(stats.ops_in_flight, 0);

    let (mut durations, phases) = drop_many(&login, DROPS, 0xd0d0, to_auth, setup).await;

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
    covers_every_phase(&phases);
}

/// The proof covers every phase, not just the easy one.
fn covers_every_phase(phases: &[usize; 4]) {
    assert!(phases[Phase::Transferring as usize] >= 100, "{phases:?}");
    assert!(
        phases[Phase::Connecting as usize] + phases[Phase::Authenticating as usize] >= 50,
        "{phases:?}"
    );
}

/// Warms up (OpenSSL, the ring, the shared dummy fd) and times how long a
/// session takes to authenticate and to reach its transfer. The quickest
/// authentication bounds the early drops: one slow warm-up (a busy
/// machine) must not push them all past authentication.
async fn warm_up(login: &Login) -> (Duration, Duration) {
    let mut to_auth = Duration::MAX;
    let mut setup = Duration::ZERO;
    for _ in 0..3 {
        let t = Instant::now();
        let s = Session::connect_addr(login.addr, login.config())
            .await
            .expect("connect");
        s.auth_pubkey_file(&login.user, &login.key, None)
            .await
            .expect("auth");
        to_auth = to_auth.min(t.elapsed());
        let ch = s.exec("true").await.unwrap();
        setup = setup.max(t.elapsed());
        drop(ch);
        s.close("warm-up").await.unwrap();
    }
    (to_auth, setup)
}

/// `n` sessions, each dropped at a random point: a third before
/// authentication ends, the rest over opening the channel and
/// transferring. The drops' durations, and how many fell in each phase.
async fn drop_many(
    login: &Login,
    n: usize,
    seed: u64,
    to_auth: Duration,
    setup: Duration,
) -> (Vec<Duration>, [usize; 4]) {
    let mut rng = Prng::new(seed);
    let mut durations = Vec::with_capacity(n);
    let mut phases = [0usize; 4];
    for _ in 0..n {
        let phase = Rc::new(Cell::new(Phase::Connecting));
        let mut job = Box::pin(transfer(login, phase.clone()));
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
    (durations, phases)
}

/// The same proof over the two threads of a pool, 500 drops each at once;
/// counted after the pool's reactors have settled, and once more after
/// the pool has shut down and its threads have exited.
#[test]
fn thousand_random_drops_across_two_pool_threads_leak_nothing() {
    let _g = serial();
    let sshd = Sshd::builder().extra("MaxStartups 1000:30:1000").start();
    let login = Login::of(&sshd);
    let pool = Pool::new(PoolConfig::new().threads(2)).expect("pool");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let settled = |pool: &Pool| {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let s = rt.block_on(pool.stats());
            if (s.ops_in_flight == 0 && s.orphaned_outstanding == 0) || Instant::now() > deadline {
                return s;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    };
    let warm: Vec<_> = (0..2)
        .map(|i| {
            let login = login.clone();
            pool.spawn_on(i, move || async move { warm_up(&login).await })
        })
        .collect();
    let timings: Vec<(Duration, Duration)> = warm
        .into_iter()
        .map(|h| rt.block_on(h).expect("warm-up"))
        .collect();
    let stats = settled(&pool);
    assert_eq!(stats.ops_in_flight, 0, "{stats:?}");
    let fds_before = open_fds();
    assert_eq!(uring_ssh::libssh2_bytes_outstanding(), 0);
    assert_eq!(uring_ssh::libssh2_blocks_outstanding(), 0);
    let leaked_before = uring_ssh::leaked_objects();

    let runs: Vec<_> = timings
        .into_iter()
        .enumerate()
        .map(|(i, (to_auth, setup))| {
            let login = login.clone();
            pool.spawn_on(i, move || async move {
                drop_many(&login, DROPS / 2, 0xd0d0 + i as u64, to_auth, setup).await
            })
        })
        .collect();
    let mut phases = [0usize; 4];
    let mut durations = Vec::new();
    for r in runs {
        let (d, p) = rt.block_on(r).expect("drops");
        durations.extend(d);
        for (all, one) in phases.iter_mut().zip(p) {
            *all += one;
        }
    }
    let stats = settled(&pool);
    assert_eq!(stats.orphaned_outstanding, 0, "{stats:?}");
    assert_eq!(stats.ops_in_flight, 0, "{stats:?}");
    assert_eq!(uring_ssh::libssh2_bytes_outstanding(), 0);
    assert_eq!(uring_ssh::libssh2_blocks_outstanding(), 0);
    assert_eq!(uring_ssh::leaked_objects(), leaked_before);
    assert_eq!(open_fds(), fds_before, "fds leaked");
    durations.sort();
    let pct = |p: f64| durations[((durations.len() - 1) as f64 * p) as usize];
    eprintln!(
        "{DROPS} drops over two pool threads (connecting {}, authenticating {}, opening {}, transferring {}): p50 {:?}, p99 {:?}",
        phases[0],
        phases[1],
        phases[2],
        phases[3],
        pct(0.5),
        pct(0.99),
    );
    covers_every_phase(&phases);

    pool.shutdown();
    assert_eq!(uring_ssh::libssh2_bytes_outstanding(), 0);
    assert!(
        open_fds() < fds_before,
        "the pool's reactors closed their fds"
    );
}

/// Connect, authenticate, open a channel and read forever, recording how far it got.
async fn transfer(login: &Login, phase: Rc<Cell<Phase>>) -> Result<(), uring_ssh::Error> {
    let s = Session::connect_addr(login.addr, login.config()).await?;
    phase.set(Phase::Authenticating);
    s.auth_pubkey_file(&login.user, &login.key, None).await?;
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
