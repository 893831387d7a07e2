//! uring-ssh's client over several threads (`--threads T`): the native
//! API on a [`Pool`] of T ring threads, each running its share of the
//! sessions, or (`--via handle`) the `Send` session handles driven from a
//! multi-thread runtime.

use std::sync::Arc;

use futures_util::future::join_all;
use tokio::sync::Barrier;
use uring_ssh::{Pool, PoolConfig};

use crate::client::{self, Args, AsyncPeer, Figures, Meter};
use crate::ours::Ours;

/// `read`/`write` with the sessions spread over a pool of `a.threads`
/// threads, thread `i` taking every `i`-th session. Timed once every
/// thread has its sessions authenticated; CPU is the whole process's.
pub fn on_pool(a: &Args) -> Figures {
    assert!(
        matches!(a.scenario.as_str(), "read" | "write"),
        "--threads runs read or write only"
    );
    let threads = a.threads.clamp(1, a.sessions);
    let pool = Pool::new(PoolConfig::new().threads(threads)).expect("pool");
    // Each thread, then the timer, meets at `connected`; nobody moves a byte
    // before the timer has started (`go`).
    let connected = Arc::new(Barrier::new(threads + 1));
    let go = Arc::new(Barrier::new(threads + 1));
    let tasks: Vec<_> = (0..threads)
        .map(|i| {
            let share = a.sessions / threads + usize::from(i < a.sessions % threads);
            let a = a.clone();
            let (connected, go) = (connected.clone(), go.clone());
            pool.spawn_on(i, move || async move {
                let sessions = client::connect_many::<Ours>(&a, share).await;
                connected.wait().await;
                go.wait().await;
                let write = a.scenario == "write";
                let a = &a;
                join_all(sessions.iter().flat_map(|s| {
                    (0..a.channels).map(move |_| async move {
                        if write {
                            Ours::write(s, a).await
                        } else {
                            Ours::read(s, a).await
                        }
                    })
                }))
                .await;
            })
        })
        .collect();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let f = rt.block_on(async {
        connected.wait().await;
        let before = ring_counters(&pool.stats().await);
        let m = Meter::start(before);
        go.wait().await;
        for t in tasks {
            t.await.expect("pool task");
        }
        let total = a.bytes() * (a.sessions * a.channels) as u64;
        m.finish(total, ring_counters(&pool.stats().await))
    });
    pool.shutdown();
    f
}

/// The counters [`Ours::counters`] reports, summed over the pool.
fn ring_counters(s: &uring_ssh::reactor::Stats) -> Vec<(&'static str, f64)> {
    vec![
        ("ring_enters", s.enter_calls as f64),
        ("ring_sqes", s.sqes_submitted as f64),
    ]
}
