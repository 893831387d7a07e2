//! Unit tests of the reactor on the running kernel.
//!
//! libtest runs every test on a thread of its own, so every test gets its
//! own ring (the reactor is per thread); assertions are on deltas of
//! [`Reactor::stats`] taken after a warm-up round trip.
//! `kernel-notes/io_uring.md` names the kernel behaviour each test proves.

use std::os::fd::{AsRawFd, FromRawFd, IntoRawFd, OwnedFd, RawFd};
use std::rc::Rc;
use std::time::{Duration, Instant};

use io_uring::{IoUring, Probe, opcode, types};

use super::probe::REQUIRED;
use super::{Lifecycle, Op, Reactor, Resources, SharedFd, Stats};

/// Upper bound for anything that should happen "soon".
const PATIENCE: Duration = Duration::from_secs(2);

/// This thread's reactor, after one nop round trip so that the driver task
/// has been polled and is parked on the ring fd.
async fn warm_reactor() -> Rc<Reactor> {
    let reactor = Reactor::current_with(super::Choice::Only(super::Backend::IoUring))
        .expect("io_uring reactor");
    super::nop().await.expect("warm-up nop");
    reactor
}

/// Yields until `pred` holds for the stats, or [`PATIENCE`] passes; returns
/// whether it held. `check` runs on every intermediate snapshot.
async fn settle(
    reactor: &Reactor,
    pred: impl Fn(&Stats) -> bool,
    mut check: impl FnMut(&Stats),
) -> bool {
    let deadline = Instant::now() + PATIENCE;
    loop {
        let s = reactor.stats();
        if pred(&s) {
            return true;
        }
        check(&s);
        if Instant::now() > deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Yields until the driver has handed at least `n` SQEs to the kernel.
async fn until_submitted(reactor: &Reactor, n: u64) {
    let ok = settle(reactor, |s| s.sqes_submitted >= n, |_| {}).await;
    assert!(ok, "driver did not submit within {PATIENCE:?}");
}

/// `socketpair(AF_UNIX, SOCK_STREAM)`, both ends blocking.
fn socketpair_raw() -> (OwnedFd, OwnedFd) {
    let mut fds = [-1 as RawFd; 2];
    // SAFETY: `fds` is a valid array of two ints for the kernel to fill.
    let rc = unsafe {
        libc::socketpair(
            libc::AF_UNIX,
            libc::SOCK_STREAM | libc::SOCK_CLOEXEC,
            0,
            fds.as_mut_ptr(),
        )
    };
    assert_eq!(rc, 0, "socketpair: {}", std::io::Error::last_os_error());
    // SAFETY: socketpair just returned these two fds; nothing else owns them.
    unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) }
}

/// A socketpair whose first end belongs to the ring, the second to the test.
fn socketpair() -> (Rc<SharedFd>, OwnedFd) {
    let (ring_end, peer) = socketpair_raw();
    (SharedFd::new(ring_end.into_raw_fd()), peer)
}

/// A blocking TCP socket (AF_INET), owned by a `SharedFd`.
fn tcp_socket() -> Rc<SharedFd> {
    // SAFETY: plain socket(2) call, no pointers.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    assert!(fd >= 0, "socket: {}", std::io::Error::last_os_error());
    SharedFd::new(fd)
}

/// A connected TCP loopback pair: (the ring's end, the test's end).
fn tcp_pair() -> (Rc<SharedFd>, std::net::TcpStream) {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let client = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
    let (server, _) = listener.accept().unwrap();
    (SharedFd::new(client.into_raw_fd()), server)
}

fn write_all(fd: RawFd, data: &[u8]) {
    // SAFETY: `data` is valid for `data.len()` bytes for the whole call.
    let n = unsafe { libc::write(fd, data.as_ptr().cast(), data.len()) };
    assert_eq!(
        n,
        data.len() as isize,
        "write: {}",
        std::io::Error::last_os_error()
    );
}

/// Non-blocking read of whatever is queued on `fd`: `Ok(empty)` at EOF,
/// `Err(WouldBlock)` if the socket is open and idle.
fn read_now(fd: RawFd) -> std::io::Result<Vec<u8>> {
    let mut buf = vec![0u8; 256];
    // SAFETY: `buf` is valid for writes of `buf.len()` bytes for the whole call.
    let n = unsafe { libc::recv(fd, buf.as_mut_ptr().cast(), buf.len(), libc::MSG_DONTWAIT) };
    if n < 0 {
        return Err(std::io::Error::last_os_error());
    }
    buf.truncate(n as usize);
    Ok(buf)
}

/// Submits a recv of up to `cap` bytes into a fresh buffer owned by the op.
/// Returns the op and the buffer's address, to recognise it later.
fn submit_recv(reactor: &Rc<Reactor>, fd: &Rc<SharedFd>, cap: usize) -> (Op, *const u8) {
    // Zeroed, so every byte of the capacity is initialised and `set_len`
    // up to the received length is sound whatever the kernel wrote.
    let mut buf = vec![0u8; cap];
    let sqe = Reactor::recv_sqe(fd, &mut buf);
    buf.clear();
    let ptr = buf.as_ptr();
    let op = reactor.submit_op(
        sqe,
        Resources {
            buf,
            fd: Some(fd.clone()),
            ..Resources::default()
        },
    );
    (op, ptr)
}

// ---------------------------------------------------------------- NOP, batching

#[tokio::test]
async fn nop_round_trip() {
    let reactor = warm_reactor().await;
    let before = reactor.stats();
    let done = reactor
        .submit_op(opcode::Nop::new().build(), Resources::default())
        .await;
    assert_eq!(done.raw(), 0);
    let after = reactor.stats();
    assert_eq!(after.sqes_submitted - before.sqes_submitted, 1);
    assert_eq!(after.cqes_reaped - before.cqes_reaped, 1);
    assert_eq!(after.enter_calls - before.enter_calls, 1);
    assert_eq!(after.ops_in_flight, before.ops_in_flight);
    assert_eq!(after.orphaned_outstanding, before.orphaned_outstanding);
}

/// 100 ops created in one go leave in one `io_uring_enter`. Exactly one: the
/// driver runs once after the ops are queued, submits all 100 SQEs in one
/// enter, and NOPs complete inline during that enter, so the following reap
/// finds all 100 CQEs and nothing is left to submit.
#[tokio::test]
async fn hundred_nops_leave_in_one_enter() {
    let reactor = warm_reactor().await;
    let before = reactor.stats();
    let ops: Vec<Op> = (0..100)
        .map(|_| reactor.submit_op(opcode::Nop::new().build(), Resources::default()))
        .collect();
    // Pushing only queues SQEs; the kernel has not been entered yet.
    let queued = reactor.stats();
    assert_eq!(queued.enter_calls, before.enter_calls);
    assert_eq!(queued.sqes_submitted, before.sqes_submitted);
    assert_eq!(queued.ops_in_flight - before.ops_in_flight, 100);
    for op in ops {
        assert_eq!(op.await.raw(), 0);
    }
    let after = reactor.stats();
    assert_eq!(after.enter_calls - before.enter_calls, 1);
    assert_eq!(after.sqes_submitted - before.sqes_submitted, 100);
    assert_eq!(after.cqes_reaped - before.cqes_reaped, 100);
    assert_eq!(after.ops_in_flight, before.ops_in_flight);
}

/// An op whose CQE arrived but whose future is dropped unpolled is freed at
/// once and costs no cancel SQE.
#[tokio::test]
async fn completed_op_dropped_unpolled_needs_no_cancel() {
    let reactor = warm_reactor().await;
    let before = reactor.stats();
    let op = reactor.submit_op(opcode::Nop::new().build(), Resources::default());
    let reaped = settle(&reactor, |s| s.cqes_reaped > before.cqes_reaped, |_| {}).await;
    assert!(reaped);
    assert_eq!(reactor.stats().ops_in_flight - before.ops_in_flight, 1);
    drop(op);
    let after = reactor.stats();
    assert_eq!(after.ops_in_flight, before.ops_in_flight);
    assert_eq!(after.orphaned_outstanding, before.orphaned_outstanding);
    tokio::time::sleep(Duration::from_millis(20)).await;
    assert_eq!(reactor.stats().sqes_submitted - before.sqes_submitted, 1);
}

// ---------------------------------------------------------------- recv

#[tokio::test]
async fn recv_on_socketpair_fills_the_op_buffer() {
    let reactor = warm_reactor().await;
    let before = reactor.stats();
    let (fd, peer) = socketpair();
    let (op, _) = submit_recv(&reactor, &fd, 64);
    until_submitted(&reactor, before.sqes_submitted + 1).await;
    write_all(peer.as_raw_fd(), b"hello, ring");
    let done = op.await;
    let n = done.result().expect("recv");
    let mut buf = done.resources.buf;
    assert!(n as usize <= buf.capacity());
    // SAFETY: all `capacity` bytes were initialised (zeroed) before the op,
    // and the kernel wrote `n <= capacity` bytes at the start of the buffer.
    unsafe { buf.set_len(n as usize) };
    assert_eq!(buf, b"hello, ring");
    assert_eq!(reactor.stats().ops_in_flight, before.ops_in_flight);
}

/// The only thing that can wake this thread while the data is on its way is
/// the ring fd turning readable in tokio's epoll (the thread's ring,
/// cooperative where the kernel has it) driven through `AsyncFd`.
#[tokio::test]
async fn recv_completion_wakes_the_driver_through_the_ring_fd() {
    let reactor = warm_reactor().await;
    let before = reactor.stats();
    let (fd, peer) = socketpair();
    let (op, _) = submit_recv(&reactor, &fd, 64);
    let writer = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(150));
        write_all(peer.as_raw_fd(), b"late");
        peer
    });
    let done = tokio::time::timeout(Duration::from_secs(5), op)
        .await
        .expect("the driver was never woken by the ring fd");
    assert_eq!(done.raw(), 4);
    let _peer = writer.join().unwrap();
    let after = reactor.stats();
    assert_eq!(after.ops_in_flight, before.ops_in_flight);
    // The recv was submitted before the data existed: it waited in the kernel.
    assert_eq!(after.sqes_submitted - before.sqes_submitted, 1);
}

/// SEND of `buf[offset..]` with MSG_NOSIGNAL.
#[tokio::test]
async fn send_from_an_offset_reaches_the_peer() {
    let reactor = warm_reactor().await;
    let (fd, peer) = socketpair();
    let buf = b"skip:payload".to_vec();
    let sqe = Reactor::send_sqe(&fd, &buf, 5);
    let done = reactor
        .submit_op(
            sqe,
            Resources {
                buf,
                offset: 5,
                fd: Some(fd.clone()),
                ..Resources::default()
            },
        )
        .await;
    assert_eq!(done.raw(), 7);
    assert_eq!(done.resources.buf, b"skip:payload");
    assert_eq!(read_now(peer.as_raw_fd()).unwrap(), b"payload");
}

/// Dropping the last `SharedFd` inside a runtime closes the socket with
/// IORING_OP_CLOSE through the ring.
#[tokio::test]
async fn last_shared_fd_dropped_closes_through_the_ring() {
    let reactor = warm_reactor().await;
    let before = reactor.stats();
    let (fd, peer) = socketpair();
    drop(fd);
    assert_eq!(reactor.stats().ops_in_flight - before.ops_in_flight, 1);
    let back = settle(
        &reactor,
        |s| s.ops_in_flight == before.ops_in_flight,
        |_| {},
    )
    .await;
    assert!(back, "close not reaped: {:?}", reactor.stats());
    assert_eq!(reactor.stats().sqes_submitted - before.sqes_submitted, 1);
    assert_eq!(read_now(peer.as_raw_fd()).expect("EOF, not EAGAIN"), b"");
}

// ---------------------------------------------------------------- orphans

/// Like tokio-uring's `complete_ops_on_drop`: a dropped in-flight op is
/// cancelled, and its resources (buffer and fd reference) stay alive in the
/// ring until its own CQE; then they are dropped and the counters return.
#[tokio::test]
async fn dropped_recv_is_cancelled_and_keeps_its_resources_until_its_cqe() {
    let reactor = warm_reactor().await;
    let before = reactor.stats();
    let (fd, peer) = socketpair();
    let (op, buf_ptr) = submit_recv(&reactor, &fd, 4096);
    until_submitted(&reactor, before.sqes_submitted + 1).await;
    // The resources own one reference to the fd, the test the other.
    assert_eq!(Rc::strong_count(&fd), 2);

    drop(op);
    let dropped = reactor.stats();
    assert_eq!(
        dropped.orphaned_outstanding - before.orphaned_outstanding,
        1
    );
    // The recv and the cancel that was just queued for it.
    assert_eq!(dropped.ops_in_flight - before.ops_in_flight, 2);
    {
        let slots = reactor.slots.borrow();
        let orphan = slots
            .iter()
            .find(|(_, s)| matches!(s.lifecycle, Lifecycle::Orphaned))
            .map(|(_, s)| s)
            .expect("the orphaned op keeps its slot");
        assert_eq!(orphan.resources.buf.as_ptr(), buf_ptr);
        assert_eq!(orphan.resources.buf.capacity(), 4096);
    }

    let back = settle(
        &reactor,
        |s| {
            s.orphaned_outstanding == before.orphaned_outstanding
                && s.ops_in_flight == before.ops_in_flight
        },
        |s| {
            if s.orphaned_outstanding > before.orphaned_outstanding {
                // Until the recv's own CQE the ring holds the op and its resources.
                assert!(s.ops_in_flight > before.ops_in_flight);
                assert_eq!(Rc::strong_count(&fd), 2, "resources dropped too early");
            }
        },
    )
    .await;
    assert!(
        back,
        "orphan not reaped within {PATIENCE:?}: {:?}",
        reactor.stats()
    );
    // Its resources are gone now: the ring's reference to the fd was dropped.
    assert_eq!(Rc::strong_count(&fd), 1);
    let after = reactor.stats();
    assert_eq!(after.sqes_submitted - before.sqes_submitted, 2);
    assert_eq!(after.cqes_reaped - before.cqes_reaped, 2);

    // The recv really was cancelled: it did not swallow the next message.
    write_all(peer.as_raw_fd(), b"next");
    assert_eq!(read_now(fd.raw()).unwrap(), b"next");
}

/// A standalone timer abandoned before it fires is cancelled by `user_data`
/// (ASYNC_CANCEL), its callback never runs, and its slot is reaped.
#[tokio::test]
async fn abandoned_timer_is_cancelled_by_user_data() {
    let reactor = warm_reactor().await;
    let before = reactor.stats();
    let ran = Rc::new(std::cell::Cell::new(None::<i32>));
    let seen = ran.clone();
    let id = reactor.submit_timer(
        Duration::from_secs(30),
        Box::new(move |c| seen.set(Some(c.raw()))),
    );
    until_submitted(&reactor, before.sqes_submitted + 1).await;
    reactor.abandon(id);
    assert_eq!(
        reactor.stats().orphaned_outstanding - before.orphaned_outstanding,
        1
    );
    let back = settle(
        &reactor,
        |s| {
            s.orphaned_outstanding == before.orphaned_outstanding
                && s.ops_in_flight == before.ops_in_flight
        },
        |_| {},
    )
    .await;
    assert!(back, "cancelled timer not reaped: {:?}", reactor.stats());
    assert_eq!(ran.get(), None, "an abandoned op's callback must not run");
    // Abandoning again (stale id) is a no-op.
    reactor.abandon(id);
    assert_eq!(reactor.stats().ops_in_flight, before.ops_in_flight);
}

/// `IORING_ASYNC_CANCEL_FD | ALL` (5.19): one SQE cancels every op on a file.
#[tokio::test]
async fn cancel_fd_cancels_every_recv_on_the_socket() {
    let reactor = warm_reactor().await;
    if !reactor.features().cancel_by_fd {
        eprintln!("skipped: kernel without IORING_ASYNC_CANCEL_FD");
        return;
    }
    let before = reactor.stats();
    let (fd, _peer) = socketpair();
    let (a, _) = submit_recv(&reactor, &fd, 64);
    let (b, _) = submit_recv(&reactor, &fd, 64);
    until_submitted(&reactor, before.sqes_submitted + 2).await;
    reactor.cancel_fd(&fd);
    let a = tokio::time::timeout(PATIENCE, a).await.expect("recv a");
    let b = tokio::time::timeout(PATIENCE, b).await.expect("recv b");
    assert_eq!(a.raw(), -libc::ECANCELED);
    assert_eq!(b.raw(), -libc::ECANCELED);
    let back = settle(
        &reactor,
        |s| s.ops_in_flight == before.ops_in_flight,
        |_| {},
    )
    .await;
    assert!(back, "cancel SQE not reaped: {:?}", reactor.stats());
}

// ---------------------------------------------------------------- shutdown

/// shutdown(SHUT_RDWR) through the ring completes a pending recv with 0.
#[tokio::test]
async fn shutdown_completes_pending_recv_with_zero_on_socketpair() {
    let reactor = warm_reactor().await;
    let before = reactor.stats();
    let (fd, _peer) = socketpair();
    let (recv, _) = submit_recv(&reactor, &fd, 64);
    until_submitted(&reactor, before.sqes_submitted + 1).await;
    let shut = reactor.shutdown(&fd, libc::SHUT_RDWR).await;
    assert_eq!(shut.raw(), 0, "shutdown: {:?}", shut.result());
    let done = tokio::time::timeout(PATIENCE, recv)
        .await
        .expect("pending recv not completed by shutdown");
    assert_eq!(done.raw(), 0);
    assert_eq!(reactor.stats().ops_in_flight, before.ops_in_flight);
}

/// The same on TCP loopback, the kind of socket the transport uses.
#[tokio::test]
async fn shutdown_completes_pending_recv_with_zero_on_tcp() {
    let reactor = warm_reactor().await;
    let before = reactor.stats();
    let (fd, _server) = tcp_pair();
    let (recv, _) = submit_recv(&reactor, &fd, 64);
    until_submitted(&reactor, before.sqes_submitted + 1).await;
    let shut = reactor.shutdown(&fd, libc::SHUT_RDWR).await;
    assert_eq!(shut.raw(), 0, "shutdown: {:?}", shut.result());
    let done = tokio::time::timeout(PATIENCE, recv)
        .await
        .expect("pending recv not completed by shutdown");
    assert_eq!(done.raw(), 0);
}

// ---------------------------------------------------------------- connect

#[tokio::test]
async fn connect_to_listening_port_succeeds() {
    let reactor = warm_reactor().await;
    let before = reactor.stats();
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let fd = tcp_socket();
    let done = reactor.connect(&fd, addr, Duration::from_secs(2)).await;
    assert_eq!(done.raw(), 0, "connect: {:?}", done.result());
    let (_server, from) = listener.accept().unwrap();
    assert_eq!(from.ip(), addr.ip());
    // The linked timeout completes too (with -ECANCELED) and is reaped.
    let back = settle(
        &reactor,
        |s| s.ops_in_flight == before.ops_in_flight,
        |_| {},
    )
    .await;
    assert!(back, "link timeout not reaped: {:?}", reactor.stats());
    let after = reactor.stats();
    assert_eq!(after.sqes_submitted - before.sqes_submitted, 2);
    assert_eq!(after.cqes_reaped - before.cqes_reaped, 2);
}

#[tokio::test]
async fn connect_to_closed_port_is_refused() {
    let reactor = warm_reactor().await;
    let addr = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let fd = tcp_socket();
    let done = reactor.connect(&fd, addr, Duration::from_secs(2)).await;
    assert_eq!(done.raw(), -libc::ECONNREFUSED);
}

/// A loopback listener with `listen(fd, 0)` whose accept queue is full
/// (nobody accepts), so it drops further SYNs: a connect to it hangs.
/// Returns the listener, its address and the connections filling it.
pub(super) fn listener_dropping_syns() -> (
    std::net::TcpListener,
    std::net::SocketAddr,
    Vec<std::net::TcpStream>,
) {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    // SAFETY: plain listen(2) on a socket we own; a backlog of 0 lets one
    // connection wait in the accept queue.
    assert_eq!(unsafe { libc::listen(listener.as_raw_fd(), 0) }, 0);
    // Fill the accept queue; stop at the first connect whose SYN is dropped.
    let mut fillers = Vec::new();
    for _ in 0..8 {
        match std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200)) {
            Ok(s) => fillers.push(s),
            Err(_) => break,
        }
    }
    (listener, addr, fillers)
}

/// A listener with `listen(fd, 0)` and a full accept queue drops further
/// SYNs, so the connect hangs until the linked timeout cancels it.
#[tokio::test]
async fn connect_is_cancelled_by_its_linked_timeout() {
    let reactor = warm_reactor().await;
    let before = reactor.stats();
    let (_listener, addr, fillers) = listener_dropping_syns();
    assert!(fillers.len() < 8, "the accept queue never filled up");

    let fd = tcp_socket();
    let started = Instant::now();
    let done = tokio::time::timeout(
        Duration::from_secs(10),
        reactor.connect(&fd, addr, Duration::from_millis(300)),
    )
    .await
    .expect("the linked timeout never fired");
    eprintln!(
        "connect with a full accept queue: res {} after {:?}",
        done.raw(),
        started.elapsed()
    );
    assert_eq!(done.raw(), -libc::ECANCELED);
    let back = settle(
        &reactor,
        |s| s.ops_in_flight == before.ops_in_flight,
        |_| {},
    )
    .await;
    assert!(back, "link timeout not reaped: {:?}", reactor.stats());
}

// ---------------------------------------------------------------- timers

#[tokio::test]
async fn timer_fires_with_etime_and_runs_its_callback() {
    let reactor = warm_reactor().await;
    let before = reactor.stats();
    let (tx, rx) = tokio::sync::oneshot::channel();
    let started = Instant::now();
    reactor.submit_timer(
        Duration::from_millis(50),
        Box::new(move |c| {
            let _ = tx.send(c.raw());
        }),
    );
    let raw = tokio::time::timeout(PATIENCE, rx)
        .await
        .expect("timer never fired")
        .expect("callback dropped without running");
    assert_eq!(raw, -libc::ETIME);
    assert!(started.elapsed() >= Duration::from_millis(50));
    assert_eq!(reactor.stats().ops_in_flight, before.ops_in_flight);
}

// ---------------------------------------------------------------- probe, teardown

/// Every opcode in `probe::REQUIRED` is offered by the running kernel, and
/// `Features::cancel_by_fd` matches the IORING_OP_SOCKET marker.
#[test]
fn required_opcodes_are_supported() {
    let ring = IoUring::new(8).expect("io_uring_setup");
    let mut probe = Probe::new();
    ring.submitter().register_probe(&mut probe).expect("probe");
    let missing: Vec<&str> = REQUIRED
        .iter()
        .filter(|(code, _, _)| !probe.is_supported(*code))
        .map(|(_, name, _)| *name)
        .collect();
    assert!(missing.is_empty(), "missing opcodes: {missing:?}");
    let (_ring, features) = super::probe::setup(8).expect("setup");
    assert_eq!(
        features.cancel_by_fd,
        probe.is_supported(opcode::Socket::CODE)
    );
}

/// A thread that exits with a recv in flight: the op's future is dropped
/// after the runtime stopped driving (orphan + queued cancel, driver gone),
/// then the reactor's Drop at thread exit cancels, reaps and frees it
/// (nothing leaked) and the socket is closed.
#[test]
fn thread_exit_with_recv_in_flight_cancels_and_closes_the_socket() {
    let leaked_before = super::leaked_at_teardown();
    let (ring_end, peer) = socketpair_raw();
    let worker = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let reactor = warm_reactor().await;
            let before = reactor.stats();
            let fd = SharedFd::new(ring_end.into_raw_fd());
            let (op, _) = submit_recv(&reactor, &fd, 64);
            until_submitted(&reactor, before.sqes_submitted + 1).await;
            drop(fd);
            // `op` is dropped as this future completes: block_on returns
            // without running the driver again, so the cancel stays queued.
            drop(op);
            let s = reactor.stats();
            assert_eq!(s.orphaned_outstanding - before.orphaned_outstanding, 1);
        });
        drop(rt);
        // The thread-local reactor is dropped after this closure returns.
    });
    let started = Instant::now();
    worker.join().expect("worker panicked");
    eprintln!(
        "thread with a recv in flight exited in {:?}",
        started.elapsed()
    );
    // The ring's end is closed: the peer reads EOF (not EAGAIN).
    assert_eq!(read_now(peer.as_raw_fd()).expect("peer"), b"");
    assert_eq!(super::leaked_at_teardown(), leaked_before);
}

/// Kernel fact: `close(2)` alone does not complete a pending recv (the
/// request holds its own file reference); a cancel does.
#[test]
fn kernel_close_alone_does_not_complete_a_pending_recv() {
    let (ring_end, _peer) = socketpair_raw();
    let raw = ring_end.as_raw_fd();
    let mut ring = IoUring::new(8).unwrap();
    // Leaked, so that a failing assertion cannot free it under the kernel.
    let buf: &'static mut [u8] = Box::leak(vec![0u8; 64].into_boxed_slice());
    let recv = opcode::Recv::new(types::Fd(raw), buf.as_mut_ptr(), 64)
        .build()
        .user_data(1);
    // SAFETY: `buf` is leaked, so it outlives the recv however it ends.
    unsafe { ring.submission().push(&recv).unwrap() };
    ring.submit().unwrap();
    drop(ring_end); // close(2)
    let ts = types::Timespec::from(Duration::from_millis(100));
    let args = types::SubmitArgs::new().timespec(&ts);
    let waited = ring.submitter().submit_with_args(1, &args);
    assert_eq!(
        waited.map_err(|e| e.raw_os_error()),
        Err(Some(libc::ETIME)),
        "a CQE arrived after close(2)"
    );
    assert!(ring.completion().next().is_none());
    let cancel = opcode::AsyncCancel::new(1).build().user_data(2);
    // SAFETY: a cancel SQE carries no pointer.
    unsafe { ring.submission().push(&cancel).unwrap() };
    ring.submit_and_wait(2).unwrap();
    let mut results: Vec<(u64, i32)> = ring
        .completion()
        .map(|c| (c.user_data(), c.result()))
        .collect();
    results.sort();
    assert_eq!(results, vec![(1, -libc::ECANCELED), (2, 0)]);
}

/// Kernel fact: dropping a ring with a recv in flight returns at once (the
/// kernel tears down later), so the reactor must keep or leak buffers.
#[test]
fn kernel_ring_drop_with_recv_in_flight_returns_at_once() {
    let (ring_end, _peer) = socketpair_raw();
    let mut ring = IoUring::new(8).unwrap();
    // Leaked on purpose: the kernel may still own it after the ring is gone.
    let buf: &'static mut [u8] = Box::leak(vec![0u8; 64].into_boxed_slice());
    let recv = opcode::Recv::new(types::Fd(ring_end.as_raw_fd()), buf.as_mut_ptr(), 64)
        .build()
        .user_data(1);
    // SAFETY: `buf` is leaked, so it outlives the recv however it ends.
    unsafe { ring.submission().push(&recv).unwrap() };
    ring.submit().unwrap();
    let started = Instant::now();
    drop(ring);
    let took = started.elapsed();
    eprintln!("ring dropped with a recv in flight in {took:?}");
    assert!(
        took < Duration::from_secs(1),
        "ring drop blocked for {took:?}"
    );
}

/// The last reference to a socket is dropped after the thread's runtime is
/// gone (the thread lives on): its close should not wait for a next runtime.
#[test]

fn fd_dropped_after_the_runtime_is_closed_at_once() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let (fd, peer) = rt.block_on(async {
        warm_reactor().await;
        socketpair()
    });
    drop(rt);
    drop(fd);
    std::thread::sleep(Duration::from_millis(50));
    // EOF once the ring's end is closed; WouldBlock while it stays open.
    let got = read_now(peer.as_raw_fd());
    assert_eq!(got.as_deref().ok(), Some(&b""[..]), "{got:?}");
}

/// More SQEs in one scheduler tick than the submission queue holds (1024):
/// the rest waits in the backlog and leaves with the next enter.
#[tokio::test]

async fn more_ops_in_one_tick_than_the_submission_queue_holds() {
    let reactor = warm_reactor().await;
    let before = reactor.stats();
    let ops: Vec<Op> = (0..3000)
        .map(|_| reactor.submit_op(opcode::Nop::new().build(), Resources::default()))
        .collect();
    let all = tokio::time::timeout(PATIENCE, async {
        for op in ops {
            assert_eq!(op.await.raw(), 0);
        }
    })
    .await;
    assert!(all.is_ok(), "ops lost: {:?}", reactor.stats());
    let after = reactor.stats();
    assert_eq!(after.sqes_submitted - before.sqes_submitted, 3000);
    assert_eq!(after.ops_in_flight, before.ops_in_flight);
}

/// More completions at once than the CQ ring holds (4 x 1024): the thread is
/// blocked while 5000 timers fire, so the kernel keeps the CQEs that do not
/// fit in its overflow list (IORING_FEAT_NODROP); they must still be reaped.
#[tokio::test]

async fn completions_beyond_the_cq_ring_size_are_all_reaped() {
    const N: u32 = 5000;
    let reactor = warm_reactor().await;
    let before = reactor.stats();
    let fired = Rc::new(std::cell::Cell::new(0u32));
    // Batches that fit the submission queue, each submitted before the next.
    for batch in 0..N / 1000 {
        for _ in 0..1000 {
            let fired = fired.clone();
            reactor.submit_timer(
                Duration::from_millis(300),
                Box::new(move |c| {
                    assert_eq!(c.raw(), -libc::ETIME);
                    fired.set(fired.get() + 1);
                }),
            );
        }
        until_submitted(&reactor, before.sqes_submitted + 1000 * (batch as u64 + 1)).await;
    }
    // Block the thread (and so the driver) while all timers fire.
    std::thread::sleep(Duration::from_millis(600));
    let all = settle(
        &reactor,
        |s| s.ops_in_flight == before.ops_in_flight,
        |_| {},
    )
    .await;
    assert!(
        all,
        "{} of {N} timers reaped: {:?}",
        fired.get(),
        reactor.stats()
    );
    assert_eq!(fired.get(), N);
}

/// Each task-work mode the reactor can set up (cooperative where the kernel
/// has it, the default ring as the fallback) wakes the driver when a recv
/// that waited in the kernel completes, entering through the registered
/// ring fd where the kernel offers one (5.18+) and by the ring's own fd
/// where it does not (the fallback, forced here).
#[test]
fn every_task_work_mode_wakes_the_driver_and_delivers() {
    use super::probe::TaskWork;
    let modes = [TaskWork::Cooperative, TaskWork::Signal];
    for (mode, register) in modes.into_iter().flat_map(|m| [(m, true), (m, false)]) {
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async {
                let reactor =
                    Reactor::install_ring_with(&[mode], register).expect("ring in this mode");
                let f = reactor.features();
                assert_eq!(f.task_work, mode);
                assert_eq!(f.registered_ring, register, "5.18+ registers the ring fd");
                super::nop().await.expect("warm-up nop");
                let before = reactor.stats();
                let (fd, peer) = socketpair();
                let (op, _) = submit_recv(&reactor, &fd, 64);
                let writer = std::thread::spawn(move || {
                    std::thread::sleep(Duration::from_millis(100));
                    write_all(peer.as_raw_fd(), b"mode");
                    peer
                });
                let done = tokio::time::timeout(Duration::from_secs(5), op)
                    .await
                    .unwrap_or_else(|_| {
                        panic!("{mode}, registered {register}: the driver was never woken")
                    });
                assert_eq!(done.raw(), 4, "{mode}, registered {register}");
                let _peer = writer.join().unwrap();
                let after = reactor.stats();
                assert_eq!(
                    after.ops_in_flight, before.ops_in_flight,
                    "{mode}, registered {register}"
                );
                assert_eq!(
                    after.sqes_submitted - before.sqes_submitted,
                    1,
                    "{mode}, registered {register}"
                );
            });
        })
        .join()
        .unwrap();
    }
}

/// `URING_SSH_TASK_WORK` values: best first for `auto`, one mode when
/// named, an error naming the variable otherwise.
#[test]
fn task_work_values_parse() {
    use super::probe::TaskWork;
    assert_eq!(
        TaskWork::parse("auto").unwrap(),
        &[TaskWork::Cooperative, TaskWork::Signal]
    );
    assert_eq!(TaskWork::parse("").unwrap().len(), 2);
    assert_eq!(TaskWork::parse(" coop ").unwrap(), &[TaskWork::Cooperative]);
    assert_eq!(TaskWork::parse("signal").unwrap(), &[TaskWork::Signal]);
    let e = TaskWork::parse("deferred").unwrap_err().to_string();
    assert!(e.contains("URING_SSH_TASK_WORK"), "{e}");
}

/// A background task runs with nobody polling it, woken from another
/// thread, and leaves the reactor when it ends.
#[tokio::test]
async fn a_background_task_runs_unpolled_and_is_woken_from_any_thread() {
    let reactor = warm_reactor().await;
    let (tx, rx) = tokio::sync::oneshot::channel::<u32>();
    let got = Rc::new(std::cell::Cell::new(0));
    let seen = got.clone();
    reactor.spawn_local(async move {
        seen.set(rx.await.unwrap_or(0));
    });
    assert_eq!(reactor.stats().background_tasks, 1);
    std::thread::spawn(move || tx.send(7).unwrap())
        .join()
        .unwrap();
    let ok = settle(&reactor, |s| s.background_tasks == 0, |_| {}).await;
    assert!(ok, "the task did not finish within {PATIENCE:?}");
    assert_eq!(got.get(), 7);
}

/// Tasks still pending when their thread exits are dropped, even one
/// holding the reactor (which would otherwise keep itself alive).
#[test]
fn pending_background_tasks_are_dropped_at_thread_exit() {
    struct Flag(std::sync::Arc<std::sync::atomic::AtomicBool>);
    impl Drop for Flag {
        fn drop(&mut self) {
            self.0.store(true, std::sync::atomic::Ordering::SeqCst);
        }
    }
    let dropped = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flag = Flag(dropped.clone());
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let reactor = warm_reactor().await;
            let held = reactor.clone();
            reactor.spawn_local(async move {
                let _keep = (held, flag);
                std::future::pending::<()>().await;
            });
            super::nop().await.unwrap();
        });
    })
    .join()
    .unwrap();
    assert!(dropped.load(std::sync::atomic::Ordering::SeqCst));
}

/// A batched receive (`MSG_WAITALL` under a linked timeout) ends three
/// ways, and the transport relies on each: a full buffer completes at once
/// with its length; a partial one completes when the wait runs out, with
/// the bytes that arrived (none lost); an empty one completes with
/// `-ECANCELED`. Both CQEs of each pair are reaped.
#[tokio::test]
async fn batched_recv_is_full_partial_or_cancelled_and_loses_nothing() {
    let reactor = warm_reactor().await;
    let (fd, peer) = socketpair();
    let wait = Duration::from_millis(50);
    let run = |len: usize| {
        let (tx, rx) = tokio::sync::oneshot::channel();
        reactor.recv_batched(
            fd.clone(),
            vec![0u8; 64],
            len,
            wait,
            Box::new(move |c| {
                let _ = tx.send((c.raw(), c.resources.buf));
            }),
        );
        rx
    };

    // Full: 64 bytes already there.
    write_all(peer.as_raw_fd(), &[1u8; 64]);
    let t = Instant::now();
    let (res, buf) = run(64).await.unwrap();
    assert_eq!(res, 64);
    assert!(buf.iter().all(|&b| b == 1));
    assert!(t.elapsed() < wait, "a full buffer waited for the timeout");

    // Partial: 10 bytes, then nothing; they come back when the wait ends.
    write_all(peer.as_raw_fd(), b"0123456789");
    let t = Instant::now();
    let (res, buf) = run(64).await.unwrap();
    assert_eq!(res, 10);
    assert_eq!(&buf[..10], b"0123456789");
    assert!(
        t.elapsed() >= wait,
        "a partial buffer ended before the wait"
    );

    // Empty: nothing arrives within the wait.
    let (res, _) = run(64).await.unwrap();
    assert_eq!(res, -libc::ECANCELED);

    let ok = settle(&reactor, |s| s.ops_in_flight == 0, |_| {}).await;
    assert!(ok, "the linked timeouts were not reaped");
}

/// Kernel behaviour this reactor works around (seen on 6.18): a linked
/// timeout can miss the `MSG_WAITALL` receive it bounds. A receive that
/// took part of its bytes is tried again from task work; when the timeout
/// fires in between, the kernel's cancel finds the receive nowhere, the
/// timeout completes with `-ENOENT`, and the receive waits for a full
/// buffer. Here the sender never gets that far ahead (as an SSH server
/// whose window is spent): without the reactor's second cancel, the first
/// miss hangs a receive for good. Every batched receive must end, and
/// every byte sent must arrive in order.
#[tokio::test]
async fn batched_recvs_end_when_their_linked_timeout_misses_them() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

    const WINDOW: u64 = 384 * 1024;
    const LEN: usize = 512 * 1024;
    const CHUNK: usize = 4096;
    let reactor = warm_reactor().await;
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let consumed = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (consumed, stop) = (consumed.clone(), stop.clone());
        std::thread::spawn(move || {
            use std::io::Write;
            let mut s = std::net::TcpStream::connect(addr).unwrap();
            s.set_nodelay(true).unwrap();
            let mut sent = 0u64;
            while !stop.load(Ordering::Relaxed) {
                if (sent + CHUNK as u64).saturating_sub(consumed.load(Ordering::Acquire)) > WINDOW {
                    std::thread::yield_now();
                    continue;
                }
                let chunk: Vec<u8> = (sent..sent + CHUNK as u64).map(|i| i as u8).collect();
                if s.write_all(&chunk).is_err() {
                    return;
                }
                sent += CHUNK as u64;
                let t = Instant::now();
                while t.elapsed() < Duration::from_micros(3) {
                    std::hint::spin_loop();
                }
            }
        })
    };
    let (stream, _) = listener.accept().unwrap();
    let fd = SharedFd::new(stream.into_raw_fd());
    let before = reactor.stats();
    let started = Instant::now();
    let mut received = 0u64;
    let mut batches = 0u64;
    // Until the kernel has missed a few times (once per few thousand
    // batches here), or 20 s.
    while reactor.stats().cancels_missed - before.cancels_missed < 3
        && started.elapsed() < Duration::from_secs(20)
    {
        let (tx, rx) = tokio::sync::oneshot::channel();
        reactor.recv_batched(
            fd.clone(),
            vec![0u8; LEN],
            LEN,
            Duration::from_micros(200),
            Box::new(move |c| {
                let _ = tx.send((c.raw(), c.resources.buf));
            }),
        );
        let (res, buf) = tokio::time::timeout(PATIENCE, rx)
            .await
            .unwrap_or_else(|_| {
                panic!(
                    "batch {batches}: a receive bounded by 200 µs did not end in {PATIENCE:?} \
                     ({received} bytes before it; {:?})",
                    reactor.stats()
                )
            })
            .unwrap();
        assert!(
            res > 0 || res == -libc::ECANCELED,
            "batch {batches}: result {res}"
        );
        let n = res.max(0) as u64;
        assert!(n < WINDOW + CHUNK as u64, "more than the sender may send");
        for (i, &b) in buf[..n as usize].iter().enumerate() {
            assert_eq!(
                b,
                (received + i as u64) as u8,
                "byte {}",
                received + i as u64
            );
        }
        received += n;
        batches += 1;
        consumed.store(received, Ordering::Release);
    }
    let missed = reactor.stats().cancels_missed - before.cancels_missed;
    eprintln!(
        "{batches} batches, {received} bytes in {:?}; linked timeouts that missed: {missed}",
        started.elapsed()
    );
    stop.store(true, Ordering::Relaxed);
    consumed.store(u64::MAX / 2, Ordering::Release);
    drop(fd);
    writer.join().unwrap();
    let ok = settle(
        &reactor,
        |s| s.ops_in_flight == before.ops_in_flight,
        |_| {},
    )
    .await;
    assert!(ok, "ops left in flight: {:?}", reactor.stats());
}

/// Callbacks asked for within one tick's window share its one timer and
/// run together, each told how many were due; none runs before half the
/// wait.
#[tokio::test]
async fn callbacks_due_at_one_tick_share_one_timer() {
    let reactor = warm_reactor().await;
    let before = reactor.stats();
    let ran = Rc::new(std::cell::RefCell::new(Vec::new()));
    let wait = Duration::from_millis(20);
    let start = Instant::now();
    for _ in 0..100 {
        let ran = ran.clone();
        reactor.at_tick(
            wait,
            Box::new(move |due| ran.borrow_mut().push((due, start.elapsed()))),
        );
    }
    assert!(settle(&reactor, |_| ran.borrow().len() == 100, |_| {}).await);
    assert_eq!(reactor.stats().sqes_submitted - before.sqes_submitted, 1);
    for &(due, after) in ran.borrow().iter() {
        assert_eq!(due, 100);
        assert!(after >= wait / 2, "ran after {after:?}");
    }
    // Past the window, a new tick (and timer) is started.
    let late = Rc::new(std::cell::Cell::new(0));
    for pause in [Duration::ZERO, wait] {
        tokio::time::sleep(pause).await;
        let late = late.clone();
        reactor.at_tick(wait, Box::new(move |due| late.set(late.get() + due)));
    }
    assert!(settle(&reactor, |_| late.get() == 2, |_| {}).await);
    assert_eq!(reactor.stats().sqes_submitted - before.sqes_submitted, 3);
}
