//! Teardown against a real sshd: graceful close sends nothing after
//! DISCONNECT, drops never block, a dead server is an error, not a hang.

use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use uring_ssh::{Error, Session};
use uring_ssh_testkit::sshd::Sshd;
use uring_ssh_testkit::util::{config, connect, settle_orphans};

/// Dropping a session mid-transfer with channels open builds no packet:
/// the session is marked disconnected before libssh2 frees it, so no
/// channel's EOF and CLOSE is built, encrypted and refused by the dead link.
#[tokio::test]
async fn drop_mid_transfer_builds_no_packet_for_the_dead_link() {
    let sshd = Sshd::start();
    let s = connect(&sshd).await;
    let mut streaming = s.exec("cat /dev/zero").await.unwrap();
    let idle = s.exec("cat").await.unwrap();
    let mut buf = vec![0u8; 64 * 1024];
    let mut got = 0;
    while got < 1 << 20 {
        got += streaming.read(&mut buf).await.unwrap();
    }
    let before = uring_ssh::sends_on_dead_links();
    // The channels first (their frees are deferred to the driver), then the
    // session, before the driver ran: the session's free frees them.
    drop((streaming, idle));
    drop(s);
    assert_eq!(
        uring_ssh::sends_on_dead_links() - before,
        0,
        "packets built for a torn-down link"
    );
    let st = settle_orphans(Duration::from_secs(2)).await;
    assert_eq!(st.orphaned_outstanding, 0);
}

#[tokio::test]
async fn graceful_close_sends_nothing_after_disconnect() {
    let sshd = Sshd::start();
    let s = connect(&sshd).await;

    // Leave work behind that owes the server packets: a channel still
    // streaming, one with unsent stdin, and one dropped (its close deferred).
    let streaming = s.exec("cat /dev/zero").await.unwrap();
    let mut writing = s.exec("cat > /dev/null").await.unwrap();
    writing.write_all(&[7u8; 100_000]).await.unwrap();
    let dropped = s.exec("sleep 30").await.unwrap();
    drop(dropped);

    let before = s.stats().bridge;
    s.close("test over").await.expect("graceful close");
    let after = s.stats().bridge;
    assert!(
        after.packets_sent > before.packets_sent,
        "close sent nothing"
    );
    assert_eq!(
        after.sends_after_disconnect, 0,
        "packets handed to the send callback after SSH_MSG_DISCONNECT"
    );
    assert!(s.is_closed());

    // The channels are gone with the session.
    drop((streaming, writing));
    let log_has = |needle: &str| {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            if sshd.log().contains(needle) {
                return true;
            }
            if Instant::now() > deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    };
    assert!(
        log_has("Received disconnect from 127.0.0.1"),
        "sshd did not see a clean DISCONNECT:\n{}",
        sshd.log()
    );
    assert!(log_has("test over"), "{}", sshd.log());
    let log = sshd.log();
    for bad in [
        "Connection reset",
        "Bad packet length",
        "message authentication code",
    ] {
        assert!(!log.contains(bad), "sshd logged {bad:?}:\n{log}");
    }

    // Calls after close fail cleanly.
    match s.channel_session().await {
        Err(Error::Closed(_)) => {}
        Err(e) => panic!("expected Closed, got {e}"),
        Ok(_) => panic!("a closed session opened a channel"),
    }
    let st = settle_orphans(Duration::from_secs(2)).await;
    assert_eq!(st.orphaned_outstanding, 0);
}

#[tokio::test]
async fn killed_server_mid_transfer_is_an_error_not_a_hang() {
    let sshd = Sshd::start();
    let s = connect(&sshd).await;
    let mut ch = s.exec("cat /dev/zero").await.unwrap();
    let mut buf = vec![0u8; 64 * 1024];
    let mut got = 0usize;
    while got < 8 << 20 {
        got += ch.read(&mut buf).await.unwrap();
    }
    sshd.kill_connections();
    let outcome = tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            match ch.read(&mut buf).await {
                Ok(0) => return Ok(()),
                Ok(_) => continue,
                Err(e) => return Err(e),
            }
        }
    })
    .await
    .expect("read hung after the server died");
    let err = outcome.expect_err("a killed server must give an error, not a clean EOF");
    eprintln!("server killed: {err} ({:?})", err.kind());
    assert!(matches!(
        err.kind(),
        std::io::ErrorKind::ConnectionReset
            | std::io::ErrorKind::ConnectionAborted
            | std::io::ErrorKind::BrokenPipe
            | std::io::ErrorKind::UnexpectedEof
    ));
    // Later calls fail at once too.
    let t = Instant::now();
    assert!(s.channel_session().await.is_err());
    assert!(t.elapsed() < Duration::from_secs(5));
}

#[tokio::test]
async fn dropped_channel_is_closed_later_by_its_session() {
    let sshd = Sshd::start();
    let s = connect(&sshd).await;
    for _ in 0..20 {
        let mut ch = s.exec("cat /dev/zero").await.unwrap();
        let mut buf = [0u8; 1000];
        ch.read_exact(&mut buf).await.unwrap();
        let t = Instant::now();
        drop(ch);
        assert!(
            t.elapsed() < Duration::from_millis(100),
            "channel drop blocked"
        );
    }
    // The session keeps working, and sshd sees every channel closed
    // (MaxSessions would refuse new ones if they leaked server-side).
    for _ in 0..80 {
        let mut ch = s.exec("true").await.unwrap();
        assert!(ch.wait().await.unwrap().success());
    }
    s.close("bye").await.unwrap();
    assert_eq!(s.stats().bridge.sends_after_disconnect, 0);
}

#[tokio::test]
async fn drop_mid_handshake_and_mid_auth_is_immediate() {
    let sshd = Sshd::start();
    for phase in 0..2 {
        let addr = sshd.addr();
        let cfg = config(&sshd);
        let user = sshd.user();
        let key = sshd.user_key();
        let fut = async move {
            let s = Session::connect_addr(addr, cfg).await?;
            if phase == 1 {
                s.auth_pubkey_file(&user, &key, None).await?;
            }
            std::future::pending::<()>().await;
            Ok::<_, Error>(s)
        };
        let mut fut = Box::pin(fut);
        // Poll long enough for the connect to start, not to finish the phase.
        let _ = tokio::time::timeout(Duration::from_millis(2 + 3 * phase), &mut fut).await;
        let t = Instant::now();
        drop(fut);
        assert!(t.elapsed() < Duration::from_millis(50), "drop blocked");
    }
    let st = settle_orphans(Duration::from_secs(2)).await;
    assert_eq!(st.orphaned_outstanding, 0, "{st:?}");
}

#[tokio::test]
async fn keepalive_detects_a_stopped_server() {
    let sshd = Sshd::start();
    let cfg = config(&sshd).keepalive(Some(Duration::from_secs(1)), 2);
    let s = uring_ssh_testkit::util::connect_with(&sshd, cfg).await;
    let mut ch = s.exec("sleep 60").await.unwrap();
    // Freeze the server's side of this connection: it stays open, silent.
    let pids = sshd.connection_pids();
    assert!(!pids.is_empty());
    for p in &pids {
        // SAFETY: plain kill(2) on processes of our own sshd.
        unsafe { libc::kill(*p as i32, libc::SIGSTOP) };
    }
    let t = Instant::now();
    let mut buf = [0u8; 16];
    let r = tokio::time::timeout(Duration::from_secs(20), ch.read(&mut buf))
        .await
        .expect("keepalive did not fire");
    for p in &pids {
        // SAFETY: as above.
        unsafe { libc::kill(*p as i32, libc::SIGCONT) };
    }
    let err = r.expect_err("a silent server must end in an error");
    assert_eq!(err.kind(), std::io::ErrorKind::TimedOut, "{err}");
    eprintln!("keepalive fired after {:?}: {err}", t.elapsed());
}

#[tokio::test]
async fn channel_open_during_close_is_refused() {
    let sshd = Sshd::start();
    let s = connect(&sshd).await;
    // Channels whose close takes a while (sshd answers CLOSE when the child exits).
    let slow = s.exec("sleep 2").await.unwrap();
    let slow2 = s.exec("sleep 2").await.unwrap();
    let opener = async {
        tokio::time::sleep(Duration::from_millis(300)).await;
        s.channel_session().await
    };
    let (closed, opened) = tokio::join!(s.close("bye"), opener);
    closed.expect("close");
    match opened {
        Err(Error::Closed(_)) => {}
        Err(e) => panic!("expected Closed, got {e}"),
        Ok(ch) => panic!("a channel was opened during close: {ch:?}"),
    }
    // Channels of a closed session report it and drop without harm.
    assert!(slow.eof());
    assert!(matches!(slow.exit_status(), Err(Error::Closed(_))));
    drop((slow, slow2));
    assert_eq!(s.stats().bridge.sends_after_disconnect, 0);
}

#[tokio::test]
async fn a_refused_close_leaves_the_session_usable_and_a_later_close_works() {
    let sshd = Sshd::start();
    let s = connect(&sshd).await;
    match s.close("bad\0description").await {
        Err(Error::InvalidInput(_)) => {}
        other => panic!("expected InvalidInput, got {other:?}"),
    }
    assert!(!s.is_closed());
    let mut ch = s.exec("echo alive").await.unwrap();
    let mut out = String::new();
    ch.read_to_string(&mut out).await.unwrap();
    assert_eq!(out, "alive\n");
    s.close("bye").await.unwrap();
    assert!(s.is_closed());
    // Closing again is a no-op.
    s.close("again").await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while !sshd.log().contains("Received disconnect") && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(sshd.log().contains("Received disconnect"), "{}", sshd.log());
}

#[tokio::test]
async fn an_abandoned_close_tears_the_session_down() {
    let sshd = Sshd::start();
    let s = connect(&sshd).await;
    let slow = s.exec("sleep 3").await.unwrap();
    // Give up on the close while it waits for the channel.
    let r = tokio::time::timeout(Duration::from_millis(200), s.close("bye")).await;
    assert!(r.is_err(), "close finished too early to test abandoning it");
    assert!(s.is_closed());
    assert!(matches!(s.channel_session().await, Err(Error::Closed(_))));
    drop(slow);
    let st = settle_orphans(Duration::from_secs(2)).await;
    assert_eq!(st.orphaned_outstanding, 0);
}

#[tokio::test]
async fn wait_reports_the_exit_status_while_a_sibling_streams() {
    let sshd = Sshd::start();
    let s = connect(&sshd).await;
    // Packets of a busy sibling interleave with each command's EOF, exit
    // status and CLOSE.
    let mut busy = s.exec("cat /dev/zero").await.unwrap();
    let reader = async {
        let mut buf = vec![0u8; 1 << 16];
        while busy.read(&mut buf).await.unwrap() > 0 {}
    };
    let waiter = async {
        let mut wrong = Vec::new();
        for i in 0..100 {
            let mut ch = s.exec(&format!("exit {}", 1 + i % 100)).await.unwrap();
            let st = ch.wait().await.unwrap();
            if st.code != 1 + i % 100 {
                wrong.push((i, st));
            }
        }
        wrong
    };
    let wrong = tokio::select! {
        w = waiter => w,
        _ = reader => panic!("the streaming sibling ended"),
    };
    assert!(wrong.is_empty(), "wrong exit statuses: {wrong:?}");
}

#[tokio::test]
async fn keepalive_does_not_end_a_healthy_idle_session() {
    let sshd = Sshd::start();
    let cfg = config(&sshd).keepalive(Some(Duration::from_secs(1)), 1);
    let s = uring_ssh_testkit::util::connect_with(&sshd, cfg).await;
    tokio::time::sleep(Duration::from_millis(3500)).await;
    let mut ch = s.exec("echo alive").await.expect("idle session was ended");
    let mut out = String::new();
    ch.read_to_string(&mut out).await.unwrap();
    assert_eq!(out, "alive\n");
}

/// A starved thread runs its keepalive ticks late. A probe answered at
/// once must not count as unanswered because the next tick ran more than
/// an interval after the answer.
#[tokio::test]
async fn late_keepalive_ticks_do_not_end_a_healthy_session() {
    let sshd = Sshd::start();
    let cfg = config(&sshd).keepalive(Some(Duration::from_secs(1)), 1);
    let s = uring_ssh_testkit::util::connect_with(&sshd, cfg).await;
    let end = Instant::now() + Duration::from_secs(7);
    while Instant::now() < end {
        tokio::time::sleep(Duration::from_millis(100)).await;
        // The thread is busy elsewhere: timers and completions wait.
        std::thread::sleep(Duration::from_millis(450));
    }
    let mut ch = s
        .exec("echo alive")
        .await
        .expect("healthy session was ended");
    let mut out = String::new();
    ch.read_to_string(&mut out).await.unwrap();
    assert_eq!(out, "alive\n");
}

#[test]
fn a_drop_just_before_the_runtime_ends_still_closes_the_socket() {
    let sshd = Sshd::start();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let s = connect(&sshd).await;
        assert!(!sshd.connection_pids().is_empty());
        drop(s);
    });
    drop(rt);
    // The shutdown was submitted when the driver stopped, with no runtime
    // left to drive the ring: sshd sees the connection end and its
    // per-connection process exits.
    let deadline = Instant::now() + Duration::from_secs(10);
    while !sshd.connection_pids().is_empty() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(
        sshd.connection_pids().is_empty(),
        "the dropped session's connection stayed open"
    );
}
