//! The pool of ring threads against a real sshd: spawn and join from a
//! thread without a runtime, placement over threads, a panic reaching its
//! handle, and a shutdown in the middle of transfers that leaves no libssh2
//! memory, no orphaned ring buffer and no fd behind. Its own test binary,
//! so the process-wide counters it reads belong to it alone.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tokio::io::AsyncReadExt;
use uring_ssh::{JoinError, Pool, PoolConfig};
use uring_ssh_testkit::sshd::Sshd;
use uring_ssh_testkit::util::open_fds;

use uring_ssh_testkit::util::{Login, serial};

/// Awaits `fut` from a plain thread.
fn block_on<F: std::future::Future>(fut: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(fut)
}

#[test]
fn tasks_run_on_every_thread_and_their_outputs_come_back() {
    let _serial = serial();
    let sshd = Sshd::start();
    let login = Login::of(&sshd);
    let pool = Pool::new(PoolConfig::new().threads(2)).expect("pool");
    assert_eq!(pool.threads(), 2);
    let handles: Vec<_> = (0..8)
        .map(|i| {
            let login = login.clone();
            pool.spawn(move || async move {
                let s = login.session().await;
                let mut ch = s.exec(&format!("echo {i}")).await.expect("exec");
                let mut out = String::new();
                ch.read_to_string(&mut out).await.expect("read");
                assert_eq!(ch.wait().await.expect("wait").code, 0);
                s.close("done").await.expect("close");
                (out, std::thread::current().name().unwrap().to_string())
            })
        })
        .collect();
    let mut threads = std::collections::BTreeSet::new();
    for (i, h) in handles.into_iter().enumerate() {
        let (out, thread) = block_on(h).expect("task");
        assert_eq!(out, format!("{i}\n"));
        threads.insert(thread);
    }
    // Least-loaded placement spreads eight tasks spawned at once.
    assert_eq!(
        threads.into_iter().collect::<Vec<_>>(),
        ["uring-ssh-0", "uring-ssh-1"]
    );
    let stats = block_on(pool.stats());
    assert_eq!(stats.ops_in_flight, 0, "{stats:?}");
    pool.shutdown();
}

#[test]
fn a_panic_reaches_its_handle_and_the_thread_goes_on() {
    let _serial = serial();
    let pool = Pool::new(PoolConfig::new().threads(1)).expect("pool");
    let h = pool.spawn(|| async {
        uring_ssh::reactor::nop().await.unwrap();
        panic!("task failed on purpose")
    });
    match block_on(h) {
        Err(e @ JoinError::Panicked(_)) => {
            assert!(e.to_string().contains("task failed on purpose"), "{e}")
        }
        other => panic!("expected a panic, got {other:?}"),
    }
    // A panic while building the future counts as the task's too.
    let h = pool.spawn(|| -> std::future::Ready<()> { panic!("before the future") });
    assert!(matches!(block_on(h), Err(JoinError::Panicked(_))));
    // The thread still runs tasks.
    let h = pool.spawn(|| async { uring_ssh::reactor::nop().await.map(|_| 7) });
    assert_eq!(block_on(h).unwrap().unwrap(), 7);
    pool.shutdown();
}

#[test]
fn shutdown_mid_transfer_drops_every_session_and_leaks_nothing() {
    let _serial = serial();
    let sshd = Sshd::builder().extra("MaxStartups 100:30:100").start();
    let login = Login::of(&sshd);
    // Warm up what lives for the process (the dummy fd libssh2 is handed).
    let warm = Pool::new(PoolConfig::new().threads(1)).expect("pool");
    let l = login.clone();
    block_on(warm.spawn(move || async move { l.session().await.close("warm").await }))
        .expect("task")
        .expect("close");
    warm.shutdown();
    let fds_before = open_fds();
    let pool = Pool::new(PoolConfig::new().threads(2)).expect("pool");
    let moved = Arc::new(AtomicU64::new(0));
    let handles: Vec<_> = (0..8)
        .map(|_| {
            let (login, moved) = (login.clone(), moved.clone());
            pool.spawn(move || async move {
                let s = login.session().await;
                let mut ch = s.exec("cat /dev/zero").await.expect("exec");
                let mut buf = vec![0u8; 64 * 1024];
                loop {
                    let n = ch.read(&mut buf).await.expect("read");
                    assert!(n > 0, "an endless stream ended");
                    moved.fetch_add(n as u64, Ordering::Relaxed);
                }
            })
        })
        .collect();
    let deadline = Instant::now() + Duration::from_secs(30);
    while moved.load(Ordering::Relaxed) < 64 << 20 {
        assert!(Instant::now() < deadline, "the transfers did not start");
        std::thread::sleep(Duration::from_millis(10));
    }
    let leaked_before = uring_ssh::leaked_objects();
    let ring_leaks_before = uring_ssh::reactor::leaked_at_teardown();
    let t = Instant::now();
    pool.shutdown();
    let took = t.elapsed();
    for h in handles {
        assert!(matches!(block_on(h), Err(JoinError::Cancelled)));
    }
    assert_eq!(
        uring_ssh::libssh2_bytes_outstanding(),
        0,
        "libssh2 bytes left"
    );
    assert_eq!(
        uring_ssh::libssh2_blocks_outstanding(),
        0,
        "libssh2 blocks left"
    );
    assert_eq!(uring_ssh::leaked_objects(), leaked_before, "objects leaked");
    // Every op's buffer came back through its own completion: none was
    // left to the threads' ring teardown.
    assert_eq!(
        uring_ssh::reactor::leaked_at_teardown(),
        ring_leaks_before,
        "ring buffers leaked at thread exit"
    );
    assert_eq!(open_fds(), fds_before, "fds left open");
    eprintln!("shutdown of 2 threads with 8 busy sessions took {took:?}");
}
