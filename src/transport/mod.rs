//! The bridge between libssh2 and the reactor.
//!
//! libssh2 calls our send and recv callbacks ([`callbacks`]), which only
//! touch the session's [`Bridge`]: packets go into an outbound queue whole,
//! received bytes come out of an inbound buffer. `Transport` moves those
//! bytes between the bridge and the real socket with reactor operations whose
//! completions run as callbacks on the reactor's driver task, so the socket
//! keeps flowing even when no future of the session is being polled.

pub(crate) mod alloc;
pub(crate) mod batch;
pub mod bridge;
pub mod callbacks;
#[cfg(any(test, fuzzing))]
pub(crate) mod fake_peer;
pub(crate) mod kexinit;

use std::cell::{Cell, RefCell};
use std::rc::{Rc, Weak};
use std::task::Waker;
use std::time::{Duration, Instant};

use crate::reactor::{Completion, OpId, Reactor, SharedFd, buffers};
use crate::session::children::Registry;
use batch::{BatchPolicy, NextRecv};
pub use bridge::{Bridge, BridgeStats, Link};
pub use callbacks::CallbackContext;

/// Bytes asked for by a recv on a quiet session (an idle session holds two
/// buffers of this size: the one in flight and the one libssh2 reads).
/// Small, because idle sessions are many: 16 KiB cost 300 idle sessions
/// 24 KiB of RSS each over 4 KiB. A busy session doubles it per full recv.
pub(crate) const RECV_MIN: usize = 4 * 1024;

/// Bytes asked for by a ring recv on a session that fills every recv: one
/// `io_uring_enter` then carries up to this much.
pub(crate) const RECV_MAX: usize = 512 * 1024;

/// Received bytes libssh2 has not read yet, above which no new recv is
/// submitted (libssh2 reads at most ~35000 bytes per callback).
const READAHEAD_LIMIT: usize = 2 * RECV_MAX;

/// Bytes waiting to be sent above which writers wait before calling libssh2.
pub(crate) const OUTBOUND_HIGH_WATER: usize = 1024 * 1024;

/// How many of this thread's sessions are streaming: those whose
/// receives brought [`batch::STREAM_MIN`] or more in the current or the
/// previous millisecond. Many streams together are worth batching for the
/// thread's sake even when each one is slow.
struct Streams {
    /// The millisecond (since `start`) being counted.
    window: Cell<u64>,
    /// Sessions counted in that millisecond, and in the one before.
    now: Cell<usize>,
    before: Cell<usize>,
    start: Instant,
}

thread_local! {
    static STREAMS: Streams = Streams {
        window: Cell::new(0),
        now: Cell::new(0),
        before: Cell::new(0),
        start: Instant::now(),
    };
}

impl Streams {
    fn window_of(&self, at: Instant) -> u64 {
        at.duration_since(self.start).as_millis() as u64
    }

    /// Moves the count on to the millisecond of `at`.
    fn advance(&self, at: Instant) -> u64 {
        let w = self.window_of(at);
        let current = self.window.get();
        if w != current {
            let before = if w == current + 1 { self.now.get() } else { 0 };
            self.before.set(before);
            self.now.set(0);
            self.window.set(w);
        }
        w
    }

    /// A session whose last counted millisecond is `last` received a
    /// stream's worth at `at`.
    fn note(&self, last: &Cell<u64>, at: Instant) {
        let w = self.advance(at);
        // Windows count from 1 so that 0 means never.
        if last.get() != w + 1 {
            last.set(w + 1);
            self.now.set(self.now.get() + 1);
        }
    }

    /// Sessions streaming as of `at`.
    fn count(&self, at: Instant) -> usize {
        self.advance(at);
        self.now.get().max(self.before.get())
    }
}

/// One session's socket, the ops in flight on it and the tasks waiting for it.
pub(crate) struct Transport {
    /// What libssh2's abstract pointer points at (boxed: stable address).
    pub context: Box<CallbackContext>,
    reactor: Rc<Reactor>,
    fd: RefCell<Option<Rc<SharedFd>>>,
    send_op: Cell<Option<OpId>>,
    /// Bytes of the send op in flight that the kernel has not taken yet.
    sending: Cell<usize>,
    recv_op: Cell<Option<OpId>>,
    /// Waiting for the tick that ends a batch's delay
    /// ([`batch::NextRecv::Delay`]).
    delayed: Cell<bool>,
    /// The last millisecond [`STREAMS`] counted this session in (+1).
    streaming: Cell<u64>,
    /// Size of the next recv: doubles while recvs come back full, halves
    /// when they come back mostly empty.
    recv_size: Cell<usize>,
    /// Whether, and how much, the next receive is batched.
    batch: Cell<BatchPolicy>,
    /// The recv in flight is a batched one.
    recv_batched: Cell<bool>,
    /// The recv in flight takes only what is there (`Reactor::recv_now`):
    /// its `EAGAIN` is an empty tick, not a failure.
    recv_now: Cell<bool>,
    /// Lingering after the graceful end ([`Transport::linger_close`]):
    /// what arrives is received and dropped.
    discarding: Cell<bool>,
    spare_out: RefCell<Vec<u8>>,
    spare_in: RefCell<Vec<u8>>,
    waiters: RefCell<Vec<Waker>>,
    last_rx: Cell<Instant>,
    /// Runs after each receive (the session retries deferred channel frees).
    /// Run after each receive, failure and teardown, while alive: the
    /// session's retry of deferred frees, readers of channel data that no
    /// task awaits right now.
    recv_hooks: Registry<dyn Fn()>,
    this: Weak<Transport>,
}

impl Transport {
    /// A transport over the connected (blocking) socket `fd`.
    pub fn new(reactor: Rc<Reactor>, fd: Rc<SharedFd>) -> Rc<Transport> {
        Rc::new_cyclic(|this| Transport {
            context: Box::new(CallbackContext::new()),
            reactor,
            fd: RefCell::new(Some(fd)),
            send_op: Cell::new(None),
            sending: Cell::new(0),
            recv_op: Cell::new(None),
            delayed: Cell::new(false),
            streaming: Cell::new(0),
            recv_size: Cell::new(RECV_MIN),
            batch: Cell::new(BatchPolicy::default()),
            recv_batched: Cell::new(false),
            recv_now: Cell::new(false),
            discarding: Cell::new(false),
            spare_out: RefCell::new(Vec::new()),
            spare_in: RefCell::new(Vec::new()),
            waiters: RefCell::new(Vec::new()),
            last_rx: Cell::new(Instant::now()),
            recv_hooks: Registry::new(),
            this: this.clone(),
        })
    }

    /// The bridge the callbacks use.
    pub fn bridge(&self) -> &Bridge {
        &self.context.bridge
    }

    /// Lets data gather for `wait` before a receive of up to `max` bytes
    /// while data streams in (ring engine only): one completion, and one
    /// wake-up of the thread, then carries a burst of packets instead of
    /// one. How, and when batching starts and stops: [`batch`].
    pub fn set_batch_wait(&self, wait: Option<Duration>, max: usize) {
        let ring = self.reactor.features().backend == crate::reactor::Backend::IoUring;
        let mut policy = self.batch.get();
        let mode = std::env::var(crate::session::RECEIVE_BATCH_MODE_ENV);
        if mode.as_deref() == Ok("waitall") {
            policy.set_mode(batch::BatchMode::WaitAll);
        }
        let off = mode.as_deref() == Ok("off");
        policy.set(wait.filter(|_| ring && !off), max);
        self.batch.set(policy);
    }

    /// Batched receives so far, and those of them that ended in a pause
    /// of the stream (each cost up to the batch wait of latency).
    pub fn batch_counts(&self) -> (u64, u64) {
        let policy = self.batch.get();
        (policy.batches(), policy.pauses())
    }

    /// Adds a hook run after each receive, failure and teardown, in the
    /// order added, for as long as it is alive.
    pub fn add_recv_hook(&self, hook: Weak<dyn Fn()>) {
        self.recv_hooks.add(hook);
    }

    fn run_recv_hooks(&self) {
        // Not borrowed while they run: a hook may add another, or end in
        // `kill()`.
        for hook in self.recv_hooks.live() {
            hook();
        }
    }

    /// When bytes last arrived, or now if receiving is paused because
    /// libssh2 has not read what arrived (the peer is not silent then).
    pub fn last_rx(&self) -> Instant {
        if self.bridge().inbound_len() >= READAHEAD_LIMIT {
            return Instant::now();
        }
        self.last_rx.get()
    }

    /// Bytes queued or in flight towards the socket.
    pub fn outbound_pending(&self) -> usize {
        self.bridge().outbound_len() + self.sending.get()
    }

    /// Wakes `waker` at the next socket event of this session.
    pub fn register(&self, waker: &Waker) {
        let mut w = self.waiters.borrow_mut();
        if !w.iter().any(|x| x.will_wake(waker)) {
            w.push(waker.clone());
        }
    }

    fn wake_all(&self) {
        let waiters = std::mem::take(&mut *self.waiters.borrow_mut());
        for w in waiters {
            w.wake();
        }
    }

    /// Moves queued packets to the socket and keeps a recv in flight. Called
    /// after every libssh2 call and from completions.
    pub fn pump(&self) {
        self.flush_out();
        self.ensure_recv();
    }

    fn link_usable(&self) -> bool {
        matches!(self.bridge().link(), Link::Open | Link::Disconnected)
    }

    fn flush_out(&self) {
        if self.send_op.get().is_some() || self.bridge().outbound_len() == 0 {
            return;
        }
        let Some(fd) = self.fd.borrow().clone() else {
            return;
        };
        if !self.link_usable() {
            return;
        }
        let buf = self
            .bridge()
            .take_outbound(std::mem::take(&mut *self.spare_out.borrow_mut()));
        self.submit_send(fd, buf, 0);
    }

    fn submit_send(&self, fd: Rc<SharedFd>, buf: Vec<u8>, offset: usize) {
        self.sending.set(buf.len() - offset);
        let this = self.this.clone();
        let id = self.reactor.send(
            fd,
            buf,
            offset,
            Box::new(move |c| {
                if let Some(t) = this.upgrade() {
                    t.send_done(c)
                }
            }),
        );
        self.send_op.set(Some(id));
    }

    fn send_done(&self, c: Completion) {
        self.send_op.set(None);
        self.sending.set(0);
        let result = c.result();
        let Completion { mut resources, .. } = c;
        match result {
            Ok(n) => {
                let offset = resources.offset + n as usize;
                if offset < resources.buf.len() && n > 0 {
                    // A blocking socket sends everything unless interrupted;
                    // send the rest with the same buffer.
                    if let Some(fd) = resources.fd.take() {
                        self.submit_send(fd, std::mem::take(&mut resources.buf), offset);
                    }
                } else if offset < resources.buf.len() {
                    self.bridge().set_failed(libc::EPIPE);
                } else {
                    let mut buf = std::mem::take(&mut resources.buf);
                    buf.clear();
                    *self.spare_out.borrow_mut() = buf;
                    self.flush_out();
                }
            }
            Err(e) => self
                .bridge()
                .set_failed(e.raw_os_error().unwrap_or(libc::EIO)),
        }
        self.wake_all();
    }

    fn ensure_recv(&self) {
        if self.recv_op.get().is_some()
            || self.delayed.get()
            || !self.link_usable()
            || (self.bridge().inbound_len() >= READAHEAD_LIMIT && !self.discarding.get())
        {
            return;
        }
        let Some(fd) = self.fd.borrow().clone() else {
            return;
        };
        let next = self.batch.get().next();
        if let NextRecv::Delay(wait) = next {
            let this = self.this.clone();
            self.delayed.set(true);
            self.reactor.at_tick(
                wait,
                Box::new(move |_| {
                    if let Some(t) = this.upgrade()
                        && t.delayed.replace(false)
                    {
                        let mut policy = t.batch.get();
                        policy.delay_passed();
                        t.batch.set(policy);
                        t.ensure_recv();
                    }
                }),
            );
            return;
        }
        let size = self.recv_size.get();
        // Receive buffers stay initialized: zeroed once when they grow,
        // then recycled.
        let mut buf = std::mem::take(&mut *self.spare_in.borrow_mut());
        if buf.len() > 4 * size {
            // A transfer's large buffer on a session gone quiet: not held
            // per idle session, but kept for the thread's busy ones.
            buffers::keep(std::mem::take(&mut buf));
        }
        if buf.len() < size
            && let Some(kept) = buffers::take(size)
        {
            // A large buffer another session left: no heap growth.
            buffers::keep(std::mem::replace(&mut buf, kept));
        }
        if buf.is_empty() {
            // calloc: fresh pages are zero without being touched.
            buf = vec![0; size];
        } else if buf.len() < size {
            buf.resize(size, 0);
        }
        let this = self.this.clone();
        let done: crate::reactor::Callback = Box::new(move |c| {
            if let Some(t) = this.upgrade() {
                t.recv_done(c)
            }
        });
        let now = next == NextRecv::Drain && self.batch.get().drain_now();
        let id = match next {
            NextRecv::WaitAll(wait) => self.reactor.recv_batched(fd, buf, size, wait, done),
            _ if now => self.reactor.recv_now(fd, buf, size, done),
            _ => self.reactor.recv(fd, buf, size, done),
        };
        self.recv_now.set(now);
        self.recv_batched
            .set(matches!(next, NextRecv::WaitAll(_) | NextRecv::Drain));
        self.recv_op.set(Some(id));
    }

    fn recv_done(&self, c: Completion) {
        self.recv_op.set(None);
        let result = c.result();
        let Completion { mut resources, .. } = c;
        let batched = self.recv_batched.replace(false);
        let now = self.recv_now.replace(false);
        match result {
            Ok(0) => self.bridge().set_peer_closed(),
            // Lingering: nobody reads this any more, and the session's
            // hooks are not run (nothing may be sent now).
            Ok(_) if self.discarding.get() => {
                *self.spare_in.borrow_mut() = std::mem::take(&mut resources.buf);
                self.ensure_recv();
                return;
            }
            // A batched receive whose wait ran out before anything arrived:
            // the stream paused; receive as usual until it resumes.
            Err(e) if batched && e.raw_os_error() == Some(libc::ECANCELED) => {
                self.adapt(0, true, Instant::now());
                self.ensure_recv();
                if self.discarding.get() {
                    // Lingering: nothing arrived, nobody is to be woken.
                    return;
                }
            }
            // A drain that does not wait found nothing: the buffer comes
            // back, and the next tick (or a pause) decides. Nothing
            // arrived, so nobody is woken (each waiter would only find
            // libssh2 empty again).
            Err(e) if now && e.raw_os_error() == Some(libc::EAGAIN) => {
                *self.spare_in.borrow_mut() = std::mem::take(&mut resources.buf);
                let mut policy = self.batch.get();
                policy.after_empty();
                self.batch.set(policy);
                self.ensure_recv();
                return;
            }
            Ok(n) => {
                let n = n as usize;
                let now = Instant::now();
                self.adapt(n, batched, now);
                let buf = std::mem::take(&mut resources.buf);
                self.last_rx.set(now);
                if n >= batch::STREAM_MIN {
                    STREAMS.with(|s| s.note(&self.streaming, now));
                }
                let spare = self.bridge().deliver(buf, n);
                *self.spare_in.borrow_mut() = spare;
                self.ensure_recv();
            }
            Err(e) => self
                .bridge()
                .set_failed(e.raw_os_error().unwrap_or(libc::EIO)),
        }
        self.run_recv_hooks();
        self.wake_all();
    }

    /// The next receive's size, and whether it is batched, after one that
    /// brought `n` bytes and completed at `now`.
    fn adapt(&self, n: usize, batched: bool, now: Instant) {
        let size = self.recv_size.get();
        let mut policy = self.batch.get();
        policy.set_streams(STREAMS.with(|s| s.count(now)));
        let next = if batched {
            policy.after_batch(n, size)
        } else {
            policy.after_plain(n, size)
        };
        self.batch.set(policy);
        self.recv_size.set(next);
    }

    /// Fails the link with `errno` (keepalive timeout), waking every waiter.
    pub fn fail(&self, errno: i32) {
        self.bridge().set_failed(errno);
        self.run_recv_hooks();
        self.wake_all();
    }

    /// Waits until everything queued has left for the socket or the link
    /// failed. Returns whether everything left.
    pub async fn drain(&self) -> bool {
        std::future::poll_fn(|cx| {
            self.pump();
            if self.outbound_pending() == 0 {
                return std::task::Poll::Ready(true);
            }
            if !self.link_usable() {
                return std::task::Poll::Ready(false);
            }
            self.register(cx.waker());
            std::task::Poll::Pending
        })
        .await
    }

    /// Graceful end once the last packet has left: `shutdown(SHUT_WR)`
    /// puts a FIN behind it, then whatever still arrives is received and
    /// dropped until the peer closes, the link fails or `timeout` passes;
    /// only then is the socket torn down ([`Transport::kill`]).
    ///
    /// Closing with unread bytes makes the kernel answer with a reset,
    /// which can reach a peer that is still writing before it has read our
    /// last packet: it then fails on `EPIPE` and never sees it.
    pub async fn linger_close(&self, timeout: Duration) {
        // Nothing reads from here on: arrivals are dropped, not queued.
        self.discarding.set(true);
        let fd = self.fd.borrow().clone();
        if let Some(fd) = fd {
            let linger = async {
                let shut = self.reactor.shutdown(&fd, libc::SHUT_WR).await;
                if shut.result().is_err() {
                    return;
                }
                std::future::poll_fn(|cx| {
                    self.ensure_recv();
                    if !self.link_usable() {
                        return std::task::Poll::Ready(());
                    }
                    self.register(cx.waker());
                    std::task::Poll::Pending
                })
                .await
            };
            let _ = tokio::time::timeout(timeout, linger).await;
            // Closed when the last op holding it completes; no second
            // shutdown to wait for (what `kill` would submit).
            drop(self.fd.borrow_mut().take());
        }
        self.kill();
    }

    /// Teardown without waiting: both callbacks fail from now on, the ops in
    /// flight are cancelled (the ring keeps their buffers until their CQEs),
    /// a shutdown is submitted, and the socket is closed once the last op
    /// holding it completes.
    pub fn kill(&self) {
        self.bridge().kill();
        // A tick still due finds nothing to do.
        self.delayed.set(false);
        let ops = [self.send_op.take(), self.recv_op.take()];
        let fd = self.fd.borrow_mut().take();
        match &fd {
            // One SQE cancels every op on the socket.
            Some(fd) if self.reactor.features().cancel_by_fd => {
                let mut any = false;
                for op in ops.into_iter().flatten() {
                    any |= self.reactor.orphan(op);
                }
                if any {
                    self.reactor.cancel_fd(fd);
                }
            }
            _ => {
                for op in ops.into_iter().flatten() {
                    self.reactor.abandon(op);
                }
            }
        }
        if let Some(fd) = fd {
            self.reactor.shutdown_detached(&fd);
        }
        self.run_recv_hooks();
        self.wake_all();
    }
}

impl Drop for Transport {
    fn drop(&mut self) {
        self.kill();
        buffers::keep(std::mem::take(self.spare_in.get_mut()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::reactor::engine_tests::{both, tcp_pair};
    use std::io::{Read, Write};

    /// A peer that is still writing when our last packet leaves: after a
    /// graceful end it gets every byte it wrote accepted, then our packet,
    /// then our FIN, and no reset. The reset would come if we closed on
    /// unread bytes (a server then fails on `EPIPE` before reading what we
    /// sent last).
    #[test]
    fn a_lingering_close_lets_a_writing_peer_finish_and_read_our_last_packet() {
        both(|reactor| async move {
            let (fd, mut peer) = tcp_pair();
            // More than both socket buffers hold: the peer still writes
            // when we close.
            const FLOOD: usize = 48 << 20;
            let server = std::thread::spawn(move || {
                let chunk = vec![0x5au8; 256 * 1024];
                let mut wrote = 0;
                while wrote < FLOOD {
                    peer.write_all(&chunk)?;
                    wrote += chunk.len();
                }
                let mut got = Vec::new();
                peer.read_to_end(&mut got)?;
                Ok::<_, std::io::Error>(got)
            });
            let t = Transport::new(reactor, fd);
            t.pump();
            assert_eq!(t.bridge().on_send(b"last packet"), 11);
            t.pump();
            assert!(t.drain().await, "the last packet did not leave");
            t.bridge().set_disconnected();
            t.linger_close(Duration::from_secs(30)).await;
            let got = server.join().unwrap().expect("the peer's writes and reads");
            assert_eq!(got, b"last packet");
        });
    }

    /// A peer that never stops writing and never closes holds a lingering
    /// close only for its bound, and what it sends meanwhile is dropped,
    /// not queued for libssh2.
    #[test]
    fn a_lingering_close_ends_at_its_bound_and_keeps_nothing() {
        both(|reactor| async move {
            let (fd, mut peer) = tcp_pair();
            let server = std::thread::spawn(move || {
                let chunk = vec![0xa5u8; 64 * 1024];
                let mut wrote = 0usize;
                // Ends when our close resets the connection.
                while peer.write_all(&chunk).is_ok() {
                    wrote += chunk.len();
                }
                wrote
            });
            let t = Transport::new(reactor, fd);
            t.pump();
            t.bridge().set_disconnected();
            let queued = t.bridge().inbound_len();
            assert!(queued <= 2 * READAHEAD_LIMIT, "{queued}");
            let bound = Duration::from_millis(300);
            let start = Instant::now();
            tokio::time::timeout(Duration::from_secs(10), t.linger_close(bound))
                .await
                .expect("the linger outlived its bound");
            assert!(
                start.elapsed() >= bound,
                "ended after {:?}",
                start.elapsed()
            );
            assert_eq!(t.bridge().inbound_len(), queued, "lingering queued data");
            assert_eq!(t.bridge().link(), Link::Dead);
            // The driver must run to close the socket (that reset ends
            // the peer's writes): wait without blocking the thread.
            let deadline = Instant::now() + Duration::from_secs(10);
            while !server.is_finished() && Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            assert!(
                server.is_finished(),
                "the peer still writes to a closed socket"
            );
            let wrote = server.join().unwrap();
            assert!(wrote > READAHEAD_LIMIT, "the peer wrote only {wrote} bytes");
        });
    }

    #[test]
    fn streams_count_the_sessions_of_this_and_the_last_millisecond() {
        let s = Streams {
            window: Cell::new(0),
            now: Cell::new(0),
            before: Cell::new(0),
            start: Instant::now(),
        };
        let ms = |n: u64| s.start + Duration::from_millis(n) + Duration::from_micros(100);
        let (a, b, c) = (Cell::new(0), Cell::new(0), Cell::new(0));
        s.note(&a, ms(5));
        s.note(&a, ms(5));
        s.note(&b, ms(5));
        assert_eq!(s.count(ms(5)), 2, "each session once per millisecond");
        s.note(&c, ms(6));
        assert_eq!(s.count(ms(6)), 2, "the last millisecond's two still count");
        s.note(&a, ms(6));
        s.note(&b, ms(6));
        assert_eq!(s.count(ms(6)), 3);
        assert_eq!(s.count(ms(7)), 3);
        assert_eq!(s.count(ms(9)), 0, "a quiet millisecond forgets");
    }
}
