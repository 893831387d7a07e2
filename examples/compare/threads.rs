//! uring-ssh's client over several threads (`--threads T`): the native
//! API on a [`Pool`] of T ring threads, each running its share of the
//! sessions, or (`--via handle`) the `Send` session handles driven from a
//! multi-thread runtime.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use bytes::Bytes;
use futures_util::future::join_all;
use tokio::sync::Barrier;
use uring_ssh::{Config, MethodType, Pool, PoolConfig, SessionHandle};

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

/// `read`/`write` through [`SessionHandle`]s: the sessions on a pool of
/// `a.threads` threads, every channel driven from a task of a multi-thread
/// runtime with as many workers, its bytes crossing in `Bytes` chunks.
pub fn via_handle(a: &Args) -> Figures {
    let pool = Arc::new(Pool::new(PoolConfig::new().threads(a.threads.max(1))).expect("pool"));
    let addr = SocketAddr::from(([127, 0, 0, 1], a.port));
    let p = pool.clone();
    let f = client::run_multi_thread(
        a,
        move |a: Args| {
            let cfg = Config::new()
                .known_hosts(Some(&a.known_hosts))
                .ciphers(&a.cipher)
                .method(MethodType::Kex, &a.kex);
            let connecting = p.connect_addr(addr, cfg);
            async move {
                let h = connecting.await.expect("connect");
                h.auth_pubkey_file(&a.user, Path::new(&a.key), None)
                    .await
                    .expect("auth");
                h
            }
        },
        |h: Arc<SessionHandle>, a: Args, write: bool| async move {
            if write {
                let mut p = h.exec(client::WRITE_COMMAND).await.expect("exec");
                let buf = Bytes::from(vec![0x5au8; client::BUF]);
                let mut left = a.bytes();
                while left > 0 {
                    let n = left.min(buf.len() as u64) as usize;
                    p.write_chunk(buf.slice(..n)).await.expect("write");
                    left -= n as u64;
                }
                p.send_eof().await.expect("eof");
                assert!(p.wait().await.expect("exit").success());
            } else {
                let mut p = h.exec(&a.read_command()).await.expect("exec");
                p.discard_stderr();
                let mut got = 0u64;
                while let Some(chunk) = p.read_chunk().await.expect("read") {
                    got += chunk.len() as u64;
                }
                assert_eq!(got, a.bytes());
                assert!(p.wait().await.expect("exit").success());
            }
        },
    );
    if let Ok(pool) = Arc::try_unwrap(pool) {
        pool.shutdown();
    }
    f
}
