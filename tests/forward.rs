//! Port forwarding against a real sshd: direct-tcpip with many concurrent
//! connections on one session, the LocalForward helper, remote forwarding
//! with Listener (and its cancel on drop), direct-streamlocal, and an
//! abandoned direct open resumed with its own libssh2 function.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener as StdListener, TcpStream as StdStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use uring_ssh::{Error, LocalForward};
use uring_ssh_testkit::sshd::Sshd;
use uring_ssh_testkit::util::{Prng, config, connect, connect_with, settle_orphans, wait_freed};

const MIB: usize = 1024 * 1024;

/// Echoes every byte; after the client's EOF (a half-close) it still
/// writes `END <count>\n`, then closes: a client that reads that line has
/// seen its EOF go through while the other direction stayed open.
async fn echo_conn<S: AsyncRead + AsyncWrite + Unpin>(mut s: S) {
    let mut buf = vec![0u8; 64 * 1024];
    let mut total = 0u64;
    loop {
        match s.read(&mut buf).await {
            Ok(0) => break,
            Ok(n) => {
                total += n as u64;
                if s.write_all(&buf[..n]).await.is_err() {
                    return;
                }
            }
            Err(_) => return,
        }
    }
    let _ = s.write_all(format!("END {total}\n").as_bytes()).await;
    let _ = s.shutdown().await;
}

/// A TCP echo server on 127.0.0.1 in a thread of its own (a second core
/// for the test's other end); it lives until the test process ends.
fn tcp_echo_server() -> SocketAddr {
    let std = StdListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind echo server");
    let addr = std.local_addr().unwrap();
    std.set_nonblocking(true).unwrap();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let l = tokio::net::TcpListener::from_std(std).unwrap();
            loop {
                let Ok((s, _)) = l.accept().await else { return };
                let _ = s.set_nodelay(true);
                tokio::spawn(echo_conn(s));
            }
        });
    });
    addr
}

/// A unix-socket echo server like [`tcp_echo_server`].
fn unix_echo_server(path: &Path) {
    let std = std::os::unix::net::UnixListener::bind(path).expect("bind unix echo server");
    std.set_nonblocking(true).unwrap();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let l = tokio::net::UnixListener::from_std(std).unwrap();
            loop {
                let Ok((s, _)) = l.accept().await else { return };
                tokio::spawn(echo_conn(s));
            }
        });
    });
}

/// A server that writes `tag` to each connection and closes it.
fn tag_server(tag: &'static [u8]) -> SocketAddr {
    let l = StdListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
    let addr = l.local_addr().unwrap();
    std::thread::spawn(move || {
        for s in l.incoming() {
            let Ok(mut s) = s else { return };
            let _ = s.write_all(tag);
        }
    });
    addr
}

/// Pushes `len` seeded bytes through `s`, half-closes, reads everything
/// back and checks it: the same bytes, then `END <len>`.
async fn push_and_check<S: AsyncRead + AsyncWrite>(s: S, len: usize, seed: u64) -> usize {
    let mut data = vec![0u8; len];
    Prng::new(seed).fill(&mut data);
    let (mut r, mut w) = tokio::io::split(s);
    let writer = async {
        w.write_all(&data).await.expect("write");
        w.shutdown().await.expect("half-close");
    };
    let reader = async {
        let mut back = Vec::with_capacity(len + 32);
        r.read_to_end(&mut back).await.expect("read back");
        back
    };
    let ((), back) = tokio::join!(writer, reader);
    let trailer = format!("END {len}\n");
    assert_eq!(
        back.len(),
        len + trailer.len(),
        "connection {seed}: wrong length back"
    );
    assert!(
        back[..len] == data[..],
        "connection {seed}: the echoed bytes differ"
    );
    assert_eq!(
        &back[len..],
        trailer.as_bytes(),
        "connection {seed}: the EOF did not reach the server"
    );
    len
}

#[tokio::test]
async fn thirty_two_concurrent_direct_tcpip_connections_echo_their_bytes() {
    let sshd = Sshd::start();
    let echo = tcp_echo_server();
    let s = connect(&sshd).await;
    const CONNS: usize = 32;
    const EACH: usize = 4 * MIB;
    let t = Instant::now();
    // All 32 opens are issued at once and queue on the session.
    let tasks = (0..CONNS).map(|i| {
        let s = &s;
        async move {
            let ch = s
                .channel_direct_tcpip("127.0.0.1", echo.port(), "127.0.0.1", 40000 + i as u16)
                .await
                .expect("direct-tcpip open");
            push_and_check(ch, EACH, 1 + i as u64).await
        }
    });
    let moved: usize = futures::future::join_all(tasks).await.into_iter().sum();
    let secs = t.elapsed().as_secs_f64();
    assert_eq!(moved, CONNS * EACH);
    eprintln!(
        "{CONNS} forwarded connections x {} MiB each way: {:.2} s, {:.0} MB/s through the session (both directions)",
        EACH / MIB,
        secs,
        (2 * CONNS * EACH) as f64 / secs / 1e6
    );
    // Nothing leaked server-side: the session still opens channels.
    let mut ch = s.exec("echo alive").await.unwrap();
    let mut out = String::new();
    ch.read_to_string(&mut out).await.unwrap();
    assert_eq!(out, "alive\n");
    s.close("bye").await.unwrap();
    assert_eq!(s.stats().bridge.sends_after_disconnect, 0);
}

#[tokio::test]
async fn direct_tcpip_to_a_closed_port_is_a_clear_error() {
    let sshd = Sshd::start();
    let s = connect(&sshd).await;
    let port = {
        let l = StdListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
        l.local_addr().unwrap().port()
    };
    match s
        .channel_direct_tcpip("127.0.0.1", port, "127.0.0.1", 1)
        .await
    {
        Err(e @ Error::Ssh { .. }) => {
            assert_eq!(e.ssh_code(), Some(-21), "{e}"); // LIBSSH2_ERROR_CHANNEL_FAILURE
            assert!(e.to_string().contains("connect failed"), "{e}");
        }
        other => panic!("expected a channel failure, got {other:?}"),
    }
    // The failed open left the queue usable.
    let echo = tcp_echo_server();
    let ch = s
        .channel_direct_tcpip("127.0.0.1", echo.port(), "127.0.0.1", 1)
        .await
        .unwrap();
    push_and_check(ch, 1000, 9).await;
}

#[tokio::test]
async fn local_forward_serves_a_local_port_through_the_session() {
    let sshd = Sshd::start();
    let echo = tcp_echo_server();
    let s = connect(&sshd).await;
    let fwd = LocalForward::bind(&s, "127.0.0.1:0", "127.0.0.1", echo.port())
        .await
        .unwrap();
    let local = fwd.local_addr().unwrap();
    const CONNS: usize = 8;
    const EACH: usize = 2 * MIB;
    let clients = async {
        let tasks = (0..CONNS).map(|i| async move {
            let c = tokio::net::TcpStream::connect(local).await.unwrap();
            push_and_check(c, EACH, 100 + i as u64).await
        });
        let n: usize = futures::future::join_all(tasks).await.into_iter().sum();
        // The last connections' bookkeeping ends just after their clients.
        let deadline = Instant::now() + Duration::from_secs(5);
        while fwd.stats().active > 0 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        n
    };
    let moved = tokio::select! {
        n = clients => n,
        r = fwd.run() => panic!("LocalForward::run ended: {r:?}"),
    };
    assert_eq!(moved, CONNS * EACH);
    let st = fwd.stats();
    assert_eq!(st.accepted, CONNS as u64, "{st:?}");
    assert_eq!(st.active, 0, "{st:?}");
    assert_eq!(st.failed, 0, "{st:?}");
    assert_eq!(st.bytes_out, (CONNS * EACH) as u64, "{st:?}");
    let trailer = format!("END {EACH}\n").len();
    assert_eq!(st.bytes_in, (CONNS * (EACH + trailer)) as u64, "{st:?}");

    // A target with nothing listening: the client's connection is closed
    // and counted as failed; the forward goes on.
    let dead = {
        let l = StdListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
        l.local_addr().unwrap().port()
    };
    let bad = LocalForward::bind(&s, "127.0.0.1:0", "127.0.0.1", dead)
        .await
        .unwrap();
    let bad_addr = bad.local_addr().unwrap();
    let client = async {
        let mut c = tokio::net::TcpStream::connect(bad_addr).await.unwrap();
        let mut buf = Vec::new();
        let _ = c.read_to_end(&mut buf).await;
        assert!(buf.is_empty());
        let deadline = Instant::now() + Duration::from_secs(5);
        while bad.stats().failed == 0 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    };
    tokio::select! {
        () = client => {},
        r = bad.run() => panic!("LocalForward::run ended: {r:?}"),
    }
    assert_eq!(bad.stats().failed, 1);
}

/// A client of the remote-forwarded port, in a thread: pushes `len` bytes,
/// half-closes, returns everything read back.
fn remote_client(port: u16, len: usize, seed: u64) -> std::thread::JoinHandle<(Vec<u8>, Vec<u8>)> {
    std::thread::spawn(move || {
        let mut c =
            StdStream::connect((Ipv4Addr::LOCALHOST, port)).expect("connect to forwarded port");
        let mut data = vec![0u8; len];
        Prng::new(seed).fill(&mut data);
        let mut w = c.try_clone().unwrap();
        let d2 = data.clone();
        let writer = std::thread::spawn(move || {
            w.write_all(&d2).unwrap();
            w.shutdown(std::net::Shutdown::Write).unwrap();
        });
        let mut back = Vec::new();
        c.read_to_end(&mut back).unwrap();
        writer.join().unwrap();
        (data, back)
    })
}

#[tokio::test]
async fn remote_forward_accepts_connections_and_cancels_on_drop() {
    let sshd = Sshd::start();
    let s = connect(&sshd).await;
    let listener = s
        .forward_listen("127.0.0.1", 0)
        .await
        .expect("forward_listen");
    let port = listener.port();
    assert_ne!(port, 0, "the server-chosen port is reported");
    const CONNS: usize = 8;
    const EACH: usize = MIB;
    let clients: Vec<_> = (0..CONNS)
        .map(|i| remote_client(port, EACH, 200 + i as u64))
        .collect();
    // Accept each forwarded connection and echo it (with the END trailer).
    let mut served = Vec::new();
    for _ in 0..CONNS {
        let ch = tokio::time::timeout(Duration::from_secs(20), listener.accept())
            .await
            .expect("accept timed out")
            .expect("accept");
        served.push(echo_conn(ch));
    }
    futures::future::join_all(served).await;
    for c in clients {
        let (data, back) = c.join().unwrap();
        let trailer = format!("END {EACH}\n");
        assert_eq!(back.len(), data.len() + trailer.len());
        assert!(back[..data.len()] == data[..], "echoed bytes differ");
        assert_eq!(&back[data.len()..], trailer.as_bytes());
    }

    // A connection that is never accepted: the cancel frees its channel.
    let mut pending = StdStream::connect((Ipv4Addr::LOCALHOST, port)).unwrap();
    pending.write_all(b"never read").unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;

    // Dropping the listener never blocks, and the server stops listening.
    let t = Instant::now();
    drop(listener);
    let took = t.elapsed();
    assert!(
        took < Duration::from_millis(20),
        "listener drop took {took:?}"
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match StdStream::connect((Ipv4Addr::LOCALHOST, port)) {
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => break,
            _ if Instant::now() > deadline => panic!("port {port} still accepts after the drop"),
            // Still listening: the cancel is on its way.
            _ => tokio::time::sleep(Duration::from_millis(10)).await,
        }
    }
    eprintln!(
        "listener drop: {took:?}, port refused after {:?}",
        t.elapsed()
    );
    // The session goes on, and can listen on the same port again.
    let again = s
        .forward_listen("127.0.0.1", port)
        .await
        .expect("listen again");
    assert_eq!(again.port(), port);
    let c = remote_client(port, 1000, 7);
    let ch = listener_accept(&again).await;
    echo_conn(ch).await;
    let (data, back) = c.join().unwrap();
    assert_eq!(&back[..data.len()], &data[..]);
    // The never-accepted connection was refused once the session read
    // its open (libssh2 parses packets only while some call reads).
    pending
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut rest = Vec::new();
    let r = pending.read_to_end(&mut rest);
    assert!(
        matches!(&r, Ok(0))
            || r.as_ref()
                .is_err_and(|e| e.kind() == std::io::ErrorKind::ConnectionReset),
        "the never-accepted connection stayed open: {r:?}"
    );
    // A graceful close cancels the live listener before the DISCONNECT.
    s.close("bye").await.unwrap();
    assert_eq!(s.stats().bridge.sends_after_disconnect, 0);
    assert!(matches!(again.accept().await, Err(Error::Closed(_))));
    drop(again);
    let st = settle_orphans(Duration::from_secs(2)).await;
    assert_eq!(st.orphaned_outstanding, 0);
}

async fn listener_accept(l: &uring_ssh::Listener) -> uring_ssh::Channel {
    tokio::time::timeout(Duration::from_secs(20), l.accept())
        .await
        .expect("accept timed out")
        .expect("accept")
}

#[tokio::test]
async fn forward_listen_after_keepalives_takes_its_own_reply() {
    let sshd = Sshd::start();
    let cfg = config(&sshd).keepalive(Some(Duration::from_secs(1)), 3);
    let s = connect_with(&sshd, cfg).await;
    // Idle: keepalives go out, and their replies stay in libssh2's packet
    // list, where a naive forward_listen would take one for its answer.
    tokio::time::sleep(Duration::from_millis(4500)).await;
    match s.forward_listen("127.0.0.1", 0).await {
        Err(e) => {
            assert_eq!(e.ssh_code(), Some(-32), "{e}"); // LIBSSH2_ERROR_REQUEST_DENIED
            assert!(e.to_string().contains("fixed port"), "{e}");
        }
        Ok(l) => panic!("port 0 after keepalives should be refused, got {l:?}"),
    }
    for _ in 0..2 {
        let port = {
            let l = StdListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
            l.local_addr().unwrap().port()
        };
        let l = s
            .forward_listen("127.0.0.1", port)
            .await
            .expect("fixed-port forward after keepalives");
        assert_eq!(l.port(), port);
        let c = remote_client(port, 5000, 3);
        let ch = listener_accept(&l).await;
        echo_conn(ch).await;
        let (data, back) = c.join().unwrap();
        assert_eq!(&back[..data.len()], &data[..]);
    }
}

#[tokio::test]
async fn a_taken_port_is_refused() {
    let sshd = Sshd::start();
    let s = connect(&sshd).await;
    let taken = StdListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
    let port = taken.local_addr().unwrap().port();
    match s.forward_listen("127.0.0.1", port).await {
        Err(e) => assert_eq!(e.ssh_code(), Some(-32), "{e}"),
        Ok(l) => panic!("listening on a taken port succeeded: {l:?}"),
    }
    // The refusal left nothing behind: the next request works.
    let l = s.forward_listen("127.0.0.1", 0).await.unwrap();
    assert_ne!(l.port(), 0);
}

#[tokio::test]
async fn direct_streamlocal_reaches_a_unix_socket() {
    let sshd = Sshd::start();
    let dir = tempfile::tempdir().unwrap();
    let sock: PathBuf = dir.path().join("echo.sock");
    unix_echo_server(&sock);
    let s = connect(&sshd).await;
    let tasks = (0..4).map(|i| {
        let s = &s;
        let sock = sock.to_str().unwrap().to_owned();
        async move {
            let ch = s
                .channel_direct_streamlocal(&sock)
                .await
                .expect("streamlocal open");
            push_and_check(ch, MIB, 300 + i).await
        }
    });
    let n: usize = futures::future::join_all(tasks).await.into_iter().sum();
    assert_eq!(n, 4 * MIB);
    let missing = dir.path().join("nothing.sock");
    assert!(
        s.channel_direct_streamlocal(missing.to_str().unwrap())
            .await
            .is_err()
    );
}

#[tokio::test]
async fn an_abandoned_direct_open_is_finished_with_its_own_function() {
    let sshd = Sshd::start();
    let a = tag_server(b"A");
    let b = tag_server(b"B");
    let s = connect(&sshd).await;
    // Warm up, then measure what libssh2 holds with no channel open.
    let ch = s
        .channel_direct_tcpip("127.0.0.1", b.port(), "127.0.0.1", 1)
        .await
        .unwrap();
    let held = s.stats();
    drop(ch);
    let before = wait_freed(&s, held, Duration::from_secs(10), "the warm-up channel")
        .await
        .libssh2_bytes;
    for round in 0..5 {
        // Start an open to A and give up on it once its request is out.
        {
            let mut fut = Box::pin(s.channel_direct_tcpip("127.0.0.1", a.port(), "127.0.0.1", 2));
            assert!(
                futures::poll!(&mut fut).is_pending(),
                "the open finished at once"
            );
        }
        // The next direct open must reach B, not A (libssh2 keeps A's
        // message in the session until that open is finished).
        let mut ch = s
            .channel_direct_tcpip("127.0.0.1", b.port(), "127.0.0.1", 3)
            .await
            .expect("open after an abandoned one");
        let mut got = Vec::new();
        ch.read_to_end(&mut got).await.unwrap();
        assert_eq!(
            got, b"B",
            "round {round}: the open reached the wrong server"
        );
        // And a session channel after an abandoned direct open.
        {
            let mut fut = Box::pin(s.channel_direct_tcpip("127.0.0.1", a.port(), "127.0.0.1", 2));
            assert!(futures::poll!(&mut fut).is_pending());
        }
        let mut ch = s.exec("echo session").await.unwrap();
        let mut out = String::new();
        ch.read_to_string(&mut out).await.unwrap();
        assert_eq!(out, "session\n");
    }
    // Every abandoned open's channel was freed.
    let deadline = Instant::now() + Duration::from_secs(5);
    while s.stats().libssh2_bytes != before && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(
        s.stats().libssh2_bytes,
        before,
        "libssh2 memory left behind"
    );
}

#[tokio::test]
async fn an_abandoned_forward_listen_is_finished_and_cancelled() {
    let sshd = Sshd::start();
    let s = connect(&sshd).await;
    let free_port = || {
        let l = StdListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
        l.local_addr().unwrap().port()
    };
    let first = free_port();
    {
        // Give up once the request is out.
        let mut fut = Box::pin(s.forward_listen("127.0.0.1", first));
        assert!(futures::poll!(&mut fut).is_pending());
    }
    // The next request finishes the abandoned one (same arguments, so
    // libssh2 builds the right listener), cancels it, and gets its own.
    let second = free_port();
    let l = s.forward_listen("127.0.0.1", second).await.unwrap();
    assert_eq!(l.port(), second);
    let c = remote_client(second, 2000, 5);
    echo_conn(listener_accept(&l).await).await;
    let (data, back) = c.join().unwrap();
    assert_eq!(&back[..data.len()], &data[..]);
    // The abandoned forward does not stay open on the server.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match StdStream::connect((Ipv4Addr::LOCALHOST, first)) {
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => break,
            _ if Instant::now() > deadline => panic!("the abandoned forward still listens"),
            _ => {
                // Let the session read (its deferred cancel runs on the driver).
                let mut ch = s.exec("true").await.unwrap();
                ch.wait().await.unwrap();
            }
        }
    }
}

#[tokio::test]
async fn forwards_dropped_midway_leak_nothing() {
    let sshd = Sshd::start();
    let echo = tcp_echo_server();
    let s = connect(&sshd).await;
    // Warm up, then what libssh2 holds for the idle session.
    let mut ch = s
        .channel_direct_tcpip("127.0.0.1", echo.port(), "127.0.0.1", 1)
        .await
        .unwrap();
    push_and_check(&mut ch, 1000, 1).await;
    let held = s.stats();
    drop(ch);
    wait_freed(&s, held, Duration::from_secs(10), "the warm-up channel").await;
    let l = s.forward_listen("127.0.0.1", 0).await.unwrap();
    let held = s.stats();
    drop(l);
    let before = wait_freed(&s, held, Duration::from_secs(10), "the warm-up listener")
        .await
        .libssh2_bytes;

    let mut rng = Prng::new(77);
    for round in 0..4 {
        // Forwarded channels mid-transfer, dropped at random points.
        let mut chans = Vec::new();
        for _ in 0..8 {
            let mut ch = s
                .channel_direct_tcpip("127.0.0.1", echo.port(), "127.0.0.1", 2)
                .await
                .unwrap();
            let n = 1 + rng.below(512 * 1024) as usize;
            ch.write_all(&vec![round as u8; n]).await.unwrap();
            ch.flush().await.unwrap();
            let mut buf = vec![0u8; 1 + rng.below(n as u64) as usize];
            ch.read_exact(&mut buf).await.unwrap();
            chans.push(ch);
        }
        // A listener with a connection queued but never accepted.
        let l = s.forward_listen("127.0.0.1", 0).await.unwrap();
        let mut queued = StdStream::connect((Ipv4Addr::LOCALHOST, l.port())).unwrap();
        queued.write_all(b"x").unwrap();
        // An open given up half-way.
        {
            let mut fut =
                Box::pin(s.channel_direct_tcpip("127.0.0.1", echo.port(), "127.0.0.1", 3));
            let _ = futures::poll!(&mut fut);
        }
        let t = Instant::now();
        drop(chans);
        drop(l);
        assert!(t.elapsed() < Duration::from_millis(50), "drops blocked");
        // The session still works (and reads, so the queued open is seen).
        let ch = s
            .channel_direct_tcpip("127.0.0.1", echo.port(), "127.0.0.1", 4)
            .await
            .unwrap();
        push_and_check(ch, 10_000, 4).await;
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while s.stats().libssh2_bytes != before && Instant::now() < deadline {
        let mut ch = s.exec("true").await.unwrap();
        ch.wait().await.unwrap();
        drop(ch);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        s.stats().libssh2_bytes,
        before,
        "libssh2 memory left behind"
    );
    s.close("bye").await.unwrap();
    assert_eq!(s.stats().bridge.sends_after_disconnect, 0);
    assert_eq!(s.stats().libssh2_bytes, 0);
    assert_eq!(uring_ssh::leaked_objects(), 0);
}

#[tokio::test]
async fn a_server_that_forbids_forwarding_refuses_clearly() {
    let sshd = Sshd::builder()
        .extra("AllowTcpForwarding no\nAllowStreamLocalForwarding no")
        .start();
    let echo = tcp_echo_server();
    let s = connect(&sshd).await;
    let e = s
        .channel_direct_tcpip("127.0.0.1", echo.port(), "127.0.0.1", 1)
        .await
        .expect_err("direct-tcpip must be refused");
    assert_eq!(e.ssh_code(), Some(-21), "{e}"); // LIBSSH2_ERROR_CHANNEL_FAILURE
    assert!(e.to_string().contains("administratively prohibited"), "{e}");
    let e = s
        .forward_listen("127.0.0.1", 0)
        .await
        .expect_err("tcpip-forward must be refused");
    assert_eq!(e.ssh_code(), Some(-32), "{e}"); // LIBSSH2_ERROR_REQUEST_DENIED
    let e = s
        .channel_direct_streamlocal("/tmp/any.sock")
        .await
        .expect_err("streamlocal must be refused");
    assert_eq!(e.ssh_code(), Some(-21), "{e}");
    // Refusals leave the session as it was.
    let mut ch = s.exec("echo alive").await.unwrap();
    let mut out = String::new();
    ch.read_to_string(&mut out).await.unwrap();
    assert_eq!(out, "alive\n");
}
