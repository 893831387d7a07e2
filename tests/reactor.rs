//! The reactor through the public API, in every kind of runtime a user may
//! run it in. Each test runs on a thread of its own, so each gets its own ring.

use std::future::Future;
use std::pin::pin;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use uring_ssh::reactor::{BACKEND_ENV, Backend, Features, init, init_with, nop, stats};
use uring_ssh::{Error, KernelSupportError};

use uring_ssh_testkit::seccomp::on_thread_without_io_uring;

fn current_thread_runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime")
}

/// Runs `n` nops and checks the reactor saw them (on the ring: as SQEs).
async fn nops(n: u64) {
    let before = stats().map(|s| s.sqes_submitted).unwrap_or(0);
    for _ in 0..n {
        nop().await.expect("nop");
    }
    let after = stats().expect("a reactor exists after a nop");
    if init().expect("init").backend == Backend::IoUring {
        assert!(after.sqes_submitted - before >= n);
    } else {
        assert_eq!(after.sqes_submitted, 0, "the poll engine has no ring");
    }
}

/// Nothing is left in flight on this thread's ring.
fn assert_idle() {
    let s = stats().expect("ring");
    assert_eq!(s.ops_in_flight, 0, "{s:?}");
    assert_eq!(s.orphaned_outstanding, 0, "{s:?}");
}

/// The kernel release as (major, minor), from uname(2).
fn kernel_release() -> (u32, u32) {
    // SAFETY: `utsname` is plain old data; all-zero is a valid value.
    let mut uts: libc::utsname = unsafe { std::mem::zeroed() };
    // SAFETY: `uts` is a valid, writable utsname for the kernel to fill.
    assert_eq!(unsafe { libc::uname(&mut uts) }, 0);
    // SAFETY: uname NUL-terminates `release` within the array.
    let release = unsafe { std::ffi::CStr::from_ptr(uts.release.as_ptr()) }
        .to_string_lossy()
        .into_owned();
    let mut parts = release.split(['.', '-']).map(|p| p.parse().unwrap_or(0));
    (parts.next().unwrap_or(0), parts.next().unwrap_or(0))
}

#[test]
fn init_returns_features() {
    current_thread_runtime().block_on(async {
        let features: Features = init().expect("init");
        let again = init().expect("init twice");
        assert_eq!(features.cancel_by_fd, again.cancel_by_fd);
        if kernel_release() >= (5, 19) {
            assert!(features.cancel_by_fd, "5.19+ has IORING_ASYNC_CANCEL_FD");
        }
        assert!(stats().is_some(), "init creates the ring");
    });
}

#[test]
fn current_thread_runtime_runs_nops() {
    assert!(stats().is_none(), "no ring before first use");
    current_thread_runtime().block_on(nops(10));
    assert_idle();
}

#[test]
fn local_set_runs_nops_in_spawned_local_tasks() {
    let local = tokio::task::LocalSet::new();
    current_thread_runtime().block_on(local.run_until(async {
        let tasks: Vec<_> = (0..4).map(|_| tokio::task::spawn_local(nops(5))).collect();
        for t in tasks {
            t.await.expect("local task");
        }
    }));
    assert_idle();
}

#[test]
fn tokio_uring_start_runs_nops_beside_its_own_ring() {
    tokio_uring::start(async {
        for _ in 0..5 {
            nop().await.expect("our nop");
            tokio_uring::no_op().await.expect("tokio-uring's nop");
        }
        let local = tokio::task::spawn_local(nops(5));
        local.await.expect("local task");
    });
    assert_idle();
}

#[test]
fn multi_thread_runtime_is_refused_with_a_runtime_error() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let on_block_on = rt.block_on(nop());
    assert!(
        matches!(on_block_on, Err(Error::Runtime(_))),
        "{on_block_on:?}"
    );
    // `nop()` is !Send (it holds the thread's reactor), so a worker task
    // can only ask through `init()`.
    let on_worker = rt.block_on(async { tokio::spawn(async { init() }).await.unwrap() });
    assert!(matches!(on_worker, Err(Error::Runtime(_))), "{on_worker:?}");
    let init_result = rt.block_on(async { init() });
    assert!(
        matches!(init_result, Err(Error::Runtime(_))),
        "{init_result:?}"
    );
}

#[test]
fn nop_outside_any_runtime_is_a_runtime_error() {
    assert!(matches!(init(), Err(Error::Runtime(_))));
    let mut fut = pin!(nop());
    let mut cx = Context::from_waker(Waker::noop());
    match fut.as_mut().poll(&mut cx) {
        Poll::Ready(Err(Error::Runtime(e @ uring_ssh::RuntimeError::NoRuntime))) => {
            assert!(e.to_string().contains("runtime"), "{e}")
        }
        Poll::Ready(other) => panic!("expected Error::Runtime, got {other:?}"),
        Poll::Pending => panic!("nop outside a runtime must fail at once"),
    }
}

#[test]
fn two_runtimes_in_turn_on_one_thread_both_work() {
    let first = current_thread_runtime();
    first.block_on(nops(3));
    drop(first);
    let second = current_thread_runtime();
    second.block_on(async {
        tokio::time::timeout(Duration::from_secs(5), nops(3))
            .await
            .expect("the driver was not re-spawned in the second runtime");
    });
    drop(second);
    // And a third time, with a LocalSet.
    let local = tokio::task::LocalSet::new();
    current_thread_runtime().block_on(local.run_until(nops(3)));
}

/// The first runtime is still alive (not dropped) while a second one on the
/// same thread uses the reactor.
#[test]

fn second_runtime_works_while_the_first_is_still_alive() {
    let first = current_thread_runtime();
    first.block_on(nops(1));
    let second = current_thread_runtime();
    second.block_on(async {
        tokio::time::timeout(Duration::from_secs(2), nops(1))
            .await
            .expect("nop hung: the driver task lives in the first runtime");
    });
    drop(first);
}

fn assert_unavailable(result: Result<(), Error>, errno: i32, reason_mentions: &str) {
    match result {
        Err(Error::Kernel(KernelSupportError::Unavailable { reason, source })) => {
            assert_eq!(source.raw_os_error(), Some(errno), "{source}");
            assert!(reason.contains(reason_mentions), "{reason}");
        }
        other => panic!("expected Error::Kernel(Unavailable), got {other:?}"),
    }
}

#[test]
fn io_uring_forbidden_gives_a_typed_kernel_error_or_the_poll_engine() {
    let (explicit, auto, nop_on_auto) = on_thread_without_io_uring(libc::EPERM, || {
        current_thread_runtime().block_on(async {
            let explicit = init_with(Backend::IoUring).map(drop);
            let auto = init_auto();
            (explicit, auto, nop().await)
        })
    });
    assert_unavailable(explicit, libc::EPERM, "io_uring_disabled");
    match auto {
        // Unless the environment insists on io_uring, the reactor falls
        // back to the poll engine.
        Some(Ok(f)) => assert_eq!(f.backend, Backend::Poll),
        Some(Err(e)) => assert_unavailable(Err(e), libc::EPERM, "seccomp"),
        None => {}
    }
    if std::env::var(BACKEND_ENV).as_deref() != Ok("io_uring") {
        nop_on_auto.expect("nop on the fallback engine");
    }
}

/// `init()` as the environment chooses, or `None` when the environment
/// picks the poll engine explicitly (nothing to fall back from).
fn init_auto() -> Option<Result<Features, Error>> {
    match std::env::var(BACKEND_ENV).as_deref() {
        Ok("poll") => None,
        _ => Some(init()),
    }
}

#[test]
fn io_uring_missing_gives_a_typed_kernel_error() {
    let from_init = on_thread_without_io_uring(libc::ENOSYS, || {
        current_thread_runtime().block_on(async { init_with(Backend::IoUring).map(drop) })
    });
    assert_unavailable(from_init, libc::ENOSYS, "ENOSYS");
}

/// The engine follows `URING_SSH_BACKEND` (the test suite runs once with
/// `poll`, once without), and a thread may ask for either explicitly.
#[test]
fn the_engine_follows_the_environment_and_explicit_choices() {
    let wanted = match std::env::var(BACKEND_ENV).as_deref() {
        Ok("poll") => Backend::Poll,
        Ok("io_uring") | Ok("auto") | Err(_) => Backend::IoUring,
        Ok(other) => panic!("unexpected {BACKEND_ENV}={other}"),
    };
    current_thread_runtime().block_on(async {
        assert_eq!(init().expect("init").backend, wanted);
        let other = match wanted {
            Backend::Poll => Backend::IoUring,
            Backend::IoUring => Backend::Poll,
        };
        match init_with(other) {
            Err(Error::Runtime(
                e @ uring_ssh::RuntimeError::BackendMismatch { running, asked },
            )) => {
                assert_eq!((running, asked), (wanted, other));
                assert!(e.to_string().contains("already runs on"), "{e}")
            }
            r => panic!("a second engine on one thread: {r:?}"),
        }
    });
    for backend in [Backend::IoUring, Backend::Poll] {
        std::thread::spawn(move || {
            current_thread_runtime().block_on(async move {
                assert_eq!(init_with(backend).expect("init_with").backend, backend);
                nop().await.expect("nop");
            })
        })
        .join()
        .unwrap();
    }
}
