//! The operations the transport and the session use, on both engines: each
//! test runs once on the io_uring ring and once on the poll engine, on a
//! thread (and so a reactor) of its own.

use std::io::{Read, Write};
use std::os::fd::{AsRawFd, IntoRawFd};
use std::rc::Rc;
use std::time::{Duration, Instant};

use super::{Backend, Choice, Reactor, SharedFd};

const PATIENCE: Duration = Duration::from_secs(5);

/// Runs `test` on a fresh thread whose reactor runs on `backend`.
pub(crate) fn on<F, Fut>(backend: Backend, test: F)
where
    F: FnOnce(Rc<Reactor>) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()>,
{
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let reactor = Reactor::current_with(Choice::Only(backend)).expect("reactor");
            assert_eq!(reactor.features().backend, backend);
            test(reactor.clone()).await;
            // Every op finished or was reaped.
            let deadline = Instant::now() + PATIENCE;
            while reactor.stats().ops_in_flight > 0 && Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            let s = reactor.stats();
            assert_eq!((s.ops_in_flight, s.orphaned_outstanding), (0, 0), "{s:?}");
        });
    })
    .join()
    .unwrap_or_else(|_| panic!("test on the {backend} engine failed"));
}

/// Runs `test` on each engine in turn.
pub(crate) fn both<F, Fut>(test: F)
where
    F: Fn(Rc<Reactor>) -> Fut + Send + Clone + 'static,
    Fut: std::future::Future<Output = ()>,
{
    on(Backend::IoUring, test.clone());
    on(Backend::Poll, test);
}

/// A connected loopback TCP pair: (the reactor's end, the test's end).
pub(crate) fn tcp_pair() -> (Rc<SharedFd>, std::net::TcpStream) {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let client = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
    let (server, _) = listener.accept().unwrap();
    (SharedFd::new(client.into_raw_fd()), server)
}

fn tcp_socket() -> Rc<SharedFd> {
    // SAFETY: plain socket(2) call, no pointers.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    assert!(fd >= 0, "socket: {}", std::io::Error::last_os_error());
    SharedFd::new(fd)
}

/// Writes `bytes` to `peer` 50 ms from now, then closes it.
fn write_later_and_close(
    mut peer: std::net::TcpStream,
    bytes: &'static [u8],
) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(50));
        peer.write_all(bytes).unwrap();
    })
}

/// A recv's result, through a callback, as the transport gets it.
async fn recv(reactor: &Reactor, fd: &Rc<SharedFd>, len: usize) -> (i32, Vec<u8>) {
    recv_with(reactor, fd, len, false).await
}

/// A `recv_now`'s result, through a callback.
async fn recv_now(reactor: &Reactor, fd: &Rc<SharedFd>, len: usize) -> (i32, Vec<u8>) {
    recv_with(reactor, fd, len, true).await
}

async fn recv_with(reactor: &Reactor, fd: &Rc<SharedFd>, len: usize, now: bool) -> (i32, Vec<u8>) {
    let (tx, rx) = tokio::sync::oneshot::channel();
    let done: super::Callback = Box::new(move |c| {
        let raw = c.raw();
        let _ = tx.send((raw, c.resources.buf));
    });
    if now {
        reactor.recv_now(fd.clone(), vec![0; len], len, done);
    } else {
        reactor.recv(fd.clone(), vec![0; len], len, done);
    }
    let (raw, mut buf) = tokio::time::timeout(PATIENCE, rx).await.unwrap().unwrap();
    buf.truncate(raw.max(0) as usize);
    (raw, buf)
}

#[test]
fn recv_now_takes_what_is_there_and_never_waits() {
    both(|reactor| async move {
        let (fd, mut peer) = tcp_pair();
        // Nothing there: EAGAIN at once, the buffer handed back whole.
        let started = Instant::now();
        let (n, _) = recv_now(&reactor, &fd, 64).await;
        assert_eq!(n, -libc::EAGAIN);
        assert!(started.elapsed() < Duration::from_secs(1));
        // Then what the peer wrote, without waiting for more.
        peer.write_all(b"hello").unwrap();
        let deadline = Instant::now() + PATIENCE;
        let got = loop {
            match recv_now(&reactor, &fd, 64).await {
                (n, got) if n > 0 => break got,
                (n, _) => assert_eq!(n, -libc::EAGAIN),
            }
            assert!(Instant::now() < deadline, "the bytes never came");
            tokio::time::sleep(Duration::from_millis(1)).await;
        };
        assert_eq!(&got[..], b"hello");
        // Drained again: EAGAIN, and a later plain recv still waits and
        // gets the next bytes (the engine's readiness is not lost).
        assert_eq!(recv_now(&reactor, &fd, 64).await.0, -libc::EAGAIN);
        let writer = write_later_and_close(peer, b"later");
        let (n, got) = recv(&reactor, &fd, 64).await;
        assert_eq!((n, &got[..]), (5, &b"later"[..]));
        writer.join().unwrap();
        assert_eq!(recv_now(&reactor, &fd, 64).await.0, 0, "EOF");
    });
}

#[test]
fn nop_round_trips() {
    both(|_| async {
        for _ in 0..100 {
            super::nop().await.expect("nop");
        }
    });
}

#[test]
fn recv_gets_what_the_peer_wrote_and_zero_at_eof() {
    both(|reactor| async move {
        let (fd, mut peer) = tcp_pair();
        peer.write_all(b"hello").unwrap();
        let (n, got) = recv(&reactor, &fd, 64).await;
        assert_eq!((n, &got[..]), (5, &b"hello"[..]));
        // A recv waiting for data is completed when it comes.
        let writer = write_later_and_close(peer, b"later");
        let (n, got) = recv(&reactor, &fd, 64).await;
        assert_eq!((n, &got[..]), (5, &b"later"[..]));
        writer.join().unwrap();
        assert_eq!(recv(&reactor, &fd, 64).await.0, 0, "EOF");
    });
}

#[test]
fn send_moves_all_of_a_large_buffer_from_its_offset() {
    both(|reactor| async move {
        let (fd, mut peer) = tcp_pair();
        // Larger than the socket buffers: the poll engine sees EAGAIN and
        // waits for the peer to read.
        let data: Vec<u8> = (0..16 << 20)
            .map(|i: u32| (i * 7 + i / 4096) as u8)
            .collect();
        let want = data[3..].to_vec();
        let reader = std::thread::spawn(move || {
            let mut got = Vec::new();
            peer.read_to_end(&mut got).unwrap();
            got
        });
        let (tx, rx) = tokio::sync::oneshot::channel();
        reactor.send(
            fd.clone(),
            data,
            3,
            Box::new(move |c| {
                let _ = tx.send(c.raw());
            }),
        );
        let mut sent = tokio::time::timeout(PATIENCE, rx).await.unwrap().unwrap() as usize;
        // The ring may return short (a signal); the transport sends the
        // rest, as here.
        while sent < want.len() {
            let (tx, rx) = tokio::sync::oneshot::channel();
            reactor.send(
                fd.clone(),
                want.clone(),
                sent,
                Box::new(move |c| {
                    let _ = tx.send(c.raw());
                }),
            );
            sent += tokio::time::timeout(PATIENCE, rx).await.unwrap().unwrap() as usize;
        }
        reactor.shutdown(&fd, libc::SHUT_RDWR).await;
        drop(fd);
        let got = reader.join().unwrap();
        assert!(got == want, "{} bytes arrived of {}", got.len(), want.len());
    });
}

#[test]
fn send_to_a_reset_peer_is_an_error() {
    both(|reactor| async move {
        let (fd, peer) = tcp_pair();
        // SO_LINGER 0: close sends RST.
        let linger = libc::linger {
            l_onoff: 1,
            l_linger: 0,
        };
        // SAFETY: `linger` is valid for the call.
        unsafe {
            libc::setsockopt(
                peer.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_LINGER,
                &linger as *const libc::linger as *const libc::c_void,
                std::mem::size_of::<libc::linger>() as libc::socklen_t,
            )
        };
        drop(peer);
        let mut last = 0;
        for _ in 0..4 {
            let (tx, rx) = tokio::sync::oneshot::channel();
            reactor.send(
                fd.clone(),
                vec![1; 1024],
                0,
                Box::new(move |c| {
                    let _ = tx.send(c.raw());
                }),
            );
            last = tokio::time::timeout(PATIENCE, rx).await.unwrap().unwrap();
            if last < 0 {
                break;
            }
        }
        assert!(
            last == -libc::ECONNRESET || last == -libc::EPIPE,
            "send after RST: {last}"
        );
    });
}

#[test]
fn timers_fire_with_etime_in_deadline_order() {
    both(|reactor| async move {
        let started = Instant::now();
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        for ms in [80u64, 20, 50] {
            let tx = tx.clone();
            reactor.submit_timer(
                Duration::from_millis(ms),
                Box::new(move |c| {
                    let _ = tx.send((ms, c.raw(), started.elapsed()));
                }),
            );
        }
        let mut order = Vec::new();
        for _ in 0..3 {
            let (ms, raw, at) = tokio::time::timeout(PATIENCE, rx.recv())
                .await
                .unwrap()
                .unwrap();
            assert_eq!(raw, -libc::ETIME);
            assert!(at >= Duration::from_millis(ms), "{ms} ms timer at {at:?}");
            order.push(ms);
        }
        assert_eq!(order, [20, 50, 80]);
    });
}

#[test]
fn abandoned_ops_are_cancelled_and_reaped() {
    both(|reactor| async move {
        let (fd, peer) = tcp_pair();
        let timer = reactor.submit_timer(Duration::from_secs(60), Box::new(|_| {}));
        let pending = reactor.recv(fd.clone(), vec![0; 64], 64, Box::new(|_| {}));
        assert_eq!(reactor.stats().ops_in_flight, 2);
        reactor.abandon(timer);
        reactor.abandon(pending);
        assert_eq!(reactor.stats().orphaned_outstanding, 2);
        // `on` checks that both are reaped; the socket stays usable.
        super::nop().await.unwrap();
        let mut peer = peer;
        peer.write_all(b"x").unwrap();
        assert_eq!(recv(&reactor, &fd, 8).await.0, 1);
    });
}

#[test]
fn cancel_fd_and_shutdown_end_a_waiting_recv() {
    both(|reactor| async move {
        let (fd, _peer) = tcp_pair();
        let (tx, rx) = tokio::sync::oneshot::channel();
        let id = reactor.recv(
            fd.clone(),
            vec![0; 64],
            64,
            Box::new(move |c| {
                let _ = tx.send(c.raw());
            }),
        );
        super::nop().await.unwrap();
        assert!(reactor.orphan(id));
        reactor.cancel_fd(&fd);
        drop(rx);
        let (fd2, _peer2) = tcp_pair();
        let waiting = recv(&reactor, &fd2, 64);
        let shut = async {
            tokio::time::sleep(Duration::from_millis(20)).await;
            reactor.shutdown_detached(&fd2);
        };
        let ((n, _), ()) = tokio::join!(waiting, shut);
        assert_eq!(n, 0, "a shut-down socket reads EOF");
    });
}

#[test]
fn connect_succeeds_is_refused_or_times_out() {
    both(|reactor| async move {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let fd = tcp_socket();
        let done = reactor.connect(&fd, addr, PATIENCE).await;
        assert_eq!(done.raw(), 0);
        let (mut accepted, _) = listener.accept().unwrap();
        accepted.write_all(b"hi").unwrap();
        assert_eq!(recv(&reactor, &fd, 8).await.1, b"hi");

        drop(listener);
        let refused = reactor.connect(&tcp_socket(), addr, PATIENCE).await;
        assert_eq!(refused.raw(), -libc::ECONNREFUSED);

        // A full accept queue (backlog 0, nobody accepts) drops SYNs.
        let (_listener, addr, _fillers) = super::tests::listener_dropping_syns();
        let started = Instant::now();
        let timed_out = reactor
            .connect(&tcp_socket(), addr, Duration::from_millis(300))
            .await;
        assert_eq!(timed_out.raw(), -libc::ECANCELED);
        let took = started.elapsed();
        assert!(took >= Duration::from_millis(290), "{took:?}");
    });
}

#[test]
fn the_last_shared_fd_closes_the_socket() {
    both(|reactor| async move {
        let (fd, mut peer) = tcp_pair();
        // Registered with the engine by a first op.
        peer.write_all(b"x").unwrap();
        assert_eq!(recv(&reactor, &fd, 8).await.0, 1);
        drop(fd);
        super::nop().await.unwrap();
        let mut buf = [0u8; 8];
        peer.set_read_timeout(Some(PATIENCE)).unwrap();
        assert_eq!(peer.read(&mut buf).unwrap(), 0, "EOF once closed");
    });
}

#[test]
fn backend_names_parse_and_bad_ones_are_refused() {
    assert_eq!(Choice::parse("poll").unwrap(), Choice::Only(Backend::Poll));
    assert_eq!(
        Choice::parse(" io_uring ").unwrap(),
        Choice::Only(Backend::IoUring)
    );
    assert_eq!(Choice::parse("auto").unwrap(), Choice::Auto);
    assert_eq!(Choice::parse("").unwrap(), Choice::Auto);
    let err = Choice::parse("kqueue").unwrap_err().to_string();
    assert!(err.contains("kqueue") && err.contains("poll"), "{err}");
}
