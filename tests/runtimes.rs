//! A whole SSH session (connect, auth, exec, close) in each runtime setup the
//! crate supports: a plain current-thread runtime, a `LocalSet`, and
//! `tokio_uring::start` (whose own ring lives beside ours).

use tokio::io::AsyncReadExt;
use uring_ssh_testkit::sshd::Sshd;
use uring_ssh_testkit::util::connect;

async fn exec_echo(sshd: &Sshd) -> String {
    let s = connect(sshd).await;
    let mut ch = s.exec("echo hello from $0").await.unwrap();
    let mut out = String::new();
    ch.read_to_string(&mut out).await.unwrap();
    assert!(ch.wait().await.unwrap().success());
    s.close("bye").await.unwrap();
    assert_eq!(s.stats().bridge.sends_after_disconnect, 0);
    out
}

#[test]
fn session_in_current_thread_runtime() {
    let sshd = Sshd::start();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let out = rt.block_on(exec_echo(&sshd));
    assert!(out.starts_with("hello from"), "{out:?}");
}

#[test]
fn session_in_local_set_task() {
    let sshd = Sshd::start();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let local = tokio::task::LocalSet::new();
    let out = local.block_on(&rt, async {
        let sshd = &sshd;
        // Sessions are not Send: a local task holds one.
        let addr = sshd.addr();
        let known = sshd.known_hosts();
        let (user, key) = (sshd.user(), sshd.user_key());
        tokio::task::spawn_local(async move {
            let cfg = uring_ssh::Config::new().known_hosts(Some(known));
            let s = uring_ssh::Session::connect_addr(addr, cfg).await.unwrap();
            s.auth_pubkey_file(&user, &key, None).await.unwrap();
            let mut ch = s.exec("echo local").await.unwrap();
            let mut out = String::new();
            ch.read_to_string(&mut out).await.unwrap();
            out
        })
        .await
        .unwrap()
    });
    assert_eq!(out, "local\n");
}

#[test]
fn session_inside_tokio_uring_start() {
    let sshd = Sshd::start();
    let out = tokio_uring::start(async {
        // tokio-uring's own ring works beside ours on the same thread.
        tokio_uring::no_op().await.unwrap();
        exec_echo(&sshd).await
    });
    assert!(out.starts_with("hello from"), "{out:?}");
}

/// Where io_uring is forbidden (a seccomp filter returning EPERM, as
/// Docker's default profile does), the reactor falls back to its poll
/// engine and a whole session works, unless the environment insists on
/// io_uring.
#[test]
fn session_where_io_uring_is_forbidden_runs_on_the_poll_engine() {
    use uring_ssh::reactor::{BACKEND_ENV, Backend};
    if std::env::var(BACKEND_ENV).as_deref() == Ok("io_uring") {
        panic!("{BACKEND_ENV}=io_uring forbids the fallback this test checks");
    }
    let sshd = std::sync::Arc::new(Sshd::start());
    let sshd2 = sshd.clone();
    let (backend, out) =
        uring_ssh_testkit::seccomp::on_thread_without_io_uring(libc::EPERM, move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async {
                let backend = uring_ssh::reactor::init().expect("fallback").backend;
                (backend, exec_echo(&sshd2).await)
            })
        });
    assert_eq!(backend, Backend::Poll);
    assert!(out.starts_with("hello from"), "{out:?}");
}
