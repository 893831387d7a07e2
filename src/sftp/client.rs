//! The request engine: any number of requests in flight on one channel,
//! replies matched to their waiters by id.
//!
//! There is no task of our own. The session's transport calls this
//! client after every receive (on the reactor's driver task): it reads the
//! channel, hands each reply to its slot and wakes exactly that waiter. A
//! waiter that is polled also flushes queued requests and reads what is
//! already buffered, so progress never depends on one particular future
//! being polled, and a hundred waiters cost one wakeup per reply, not a
//! hundred per socket event.
//!
//! A request's id is its slot in a slab, and a slot is freed only when the
//! reply for it has arrived: an id in flight is never reused, so a reply
//! can never reach the wrong waiter, even after its future was dropped.
//!
//! What a server can make the engine hold is bounded:
//!
//! * received bytes are parsed as each piece arrives, so what waits is at
//!   most one unfinished packet of [`codec::MAX_PACKET`] and its length
//!   field, and the piece that brought its end: a longer length fails the
//!   channel with [`Error::Protocol`] naming it, before more is read;
//! * a reply whose id answers no request in flight, or answers one a
//!   second time, fails the channel with [`Error::Protocol`] (every waiter
//!   gets it): nothing is kept for an id nobody asked for;
//! * a reply that is framed correctly but whose body is malformed, of an
//!   unknown type, or over a bound of the codec (a handle over 256 bytes, a
//!   name over [`codec::MAX_NAME_LEN`]) fails only the request it answers,
//!   with [`Error::Protocol`] or [`Error::LimitExceeded`]; the channel
//!   carries on. If that request was an OPEN, no handle was accepted and
//!   there is nothing to close: the server drops it with the channel;
//! * replies are kept only in the slots of requests in flight, one each.

use std::cell::RefCell;
use std::collections::VecDeque;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll, Waker};

use slab::Slab;

use bytes::Buf;

use super::codec::{self, FileAttributes, Reply, Request, fxp};
use super::rope::{MERGE_BELOW, Rope};
use crate::channel::ChannelInner;
use crate::error::{Error, Result};
use crate::transport::OUTBOUND_HIGH_WATER;

/// Requests are encoded into segments of this size (or of one request,
/// if larger), each request whole in one: the channel takes them from the
/// front while new ones go to the back, and a segment is dropped (or kept
/// for reuse) once taken whole, so nothing queued is ever moved.
const OUT_SEGMENT: usize = 256 * 1024;

/// The size of a segment started while none is queued.
const FIRST_SEGMENT: usize = 16 * 1024;

/// The room a request other than a WRITE is given in a segment (a longer
/// one, with paths of several KiB, still fits: its segment grows).
const SMALL_REQUEST: usize = 4096;

/// Channel reads per poll before the reader lets other tasks run.
const READS_PER_POLL: usize = 32;

enum Slot {
    /// Sent (or queued); the waiter's waker, if it has been polled, and
    /// the most data its reply may carry (what a READ asked for): a DATA
    /// reply over it is refused on arrival, not held.
    Waiting { waker: Option<Waker>, max_data: u32 },
    /// The reply arrived; the waiter has not taken it yet.
    Done(Result<Reply>),
    /// The waiter went away. If the request was an open, the handle in
    /// its reply is closed as soon as the reply arrives.
    Abandoned { close_handle: bool },
}

impl Slot {
    /// A request just queued, whose reply may carry at most `max_data`
    /// bytes of data.
    fn waiting(max_data: u32) -> Slot {
        Slot::Waiting {
            waker: None,
            max_data,
        }
    }
}

/// Why the channel can carry no more requests.
#[derive(Debug, Clone)]
enum Dead {
    /// The channel or the session under it failed.
    Io(io::ErrorKind, String),
    /// The server broke the protocol in a way no single request owns.
    Protocol(String),
}

impl Dead {
    /// The error every request on the dead channel gets.
    fn error(&self) -> Error {
        match self {
            Dead::Io(kind, why) => Error::Io(io::Error::new(*kind, why.clone())),
            Dead::Protocol(why) => Error::sftp_protocol(why.clone()),
        }
    }
}

/// Encoded requests not yet taken by the channel, in segments of about
/// [`OUT_SEGMENT`]: oldest first, the first from `pos`.
#[derive(Default)]
struct Outbox {
    segments: VecDeque<Vec<u8>>,
    pos: usize,
    /// A segment taken whole, emptied, for the next one: a stream of
    /// WRITEs allocates nothing once it runs.
    spare: Option<Vec<u8>>,
}

impl Outbox {
    fn is_empty(&self) -> bool {
        self.segments.is_empty()
    }

    /// The segment to encode the next request, of up to `len` bytes,
    /// into: one with that much room left.
    fn back(&mut self, len: usize) -> &mut Vec<u8> {
        if self
            .segments
            .back()
            .is_none_or(|b| b.capacity() - b.len() < len)
        {
            // A client that sends a request now and then holds a small
            // segment; requests that queue up get full ones.
            let size = if self.segments.is_empty() {
                FIRST_SEGMENT
            } else {
                OUT_SEGMENT
            };
            let fresh = match self.spare.take() {
                Some(spare) if spare.capacity() >= len => spare,
                _ => Vec::with_capacity(len.max(size)),
            };
            self.segments.push_back(fresh);
        }
        self.segments.back_mut().expect("a segment was just added")
    }

    /// The oldest bytes not taken yet (empty if there are none).
    fn front(&self) -> &[u8] {
        self.segments.front().map_or(&[], |f| &f[self.pos..])
    }

    /// The channel took `n` bytes of [`Self::front`].
    /// Segments taken whole (and any empty one) leave the front, so that
    /// [`Self::front`] is empty only when nothing is queued.
    fn consume(&mut self, n: usize) {
        self.pos += n;
        while let Some(front) = self.segments.front() {
            debug_assert!(self.pos <= front.len());
            if self.pos < front.len() {
                return;
            }
            let done = self.segments.pop_front().expect("a front segment");
            self.pos = 0;
            self.keep_spare(done);
        }
    }

    /// Takes back the segment [`Self::back`] added for a request that was
    /// not queued after all, if it is empty: an empty segment left queued
    /// would be "sent" as a write of nothing.
    fn drop_empty_back(&mut self) {
        if self.segments.back().is_some_and(Vec::is_empty) {
            let seg = self.segments.pop_back().expect("an empty back segment");
            self.keep_spare(seg);
        }
    }

    /// One segment of the usual size is kept for the next; a larger one (a
    /// single large request's) is not kept by an idle client.
    fn keep_spare(&mut self, mut seg: Vec<u8>) {
        if seg.capacity() <= OUT_SEGMENT {
            seg.clear();
            self.spare = Some(seg);
        }
    }

    /// Queues `later`'s requests after these.
    fn append(&mut self, mut later: Outbox) {
        if self.segments.is_empty() {
            self.pos = later.pos;
        } else if later.pos > 0
            && let Some(first) = later.segments.front_mut()
        {
            first.drain(..later.pos);
        }
        self.segments.append(&mut later.segments);
    }
}

/// What dispatching left to do once the state is no longer borrowed.
#[derive(Default)]
struct Dispatched {
    /// Waiters whose reply arrived.
    wake: Vec<Waker>,
    /// Handles of abandoned opens, to close.
    close: Vec<Vec<u8>>,
}

struct State {
    /// Encoded requests not yet taken by libssh2.
    out: Outbox,
    /// Received bytes not yet parsed, in the pieces the channel handed
    /// over (each packet's payload, where libssh2 decrypted it).
    rx: Rope,
    slots: Slab<Slot>,
    /// Why the channel can carry no more requests.
    dead: Option<Dead>,
    /// A flush of fire-and-forget requests is queued on the driver task.
    flush_scheduled: bool,
    /// Requests sent and replies received, for statistics.
    requests: u64,
    replies: u64,
}

/// The engine of one SFTP channel.
pub(crate) struct Client {
    pub(crate) chan: Rc<ChannelInner>,
    st: RefCell<State>,
    /// Registered with the session (weakly), and kept alive here: drains
    /// replies that nobody awaits, so that abandoned requests never stall
    /// the channel.
    drain_hook: Rc<dyn Fn()>,
}

impl Client {
    pub(crate) fn new(chan: Rc<ChannelInner>, leftover: &[u8]) -> Rc<Client> {
        let client = Rc::new_cyclic(|weak: &std::rc::Weak<Client>| {
            let weak = weak.clone();
            let drain: Rc<dyn Fn()> = Rc::new(move || {
                if let Some(c) = weak.upgrade() {
                    c.drain_unattended();
                }
            });
            Client {
                drain_hook: drain,
                chan,
                st: RefCell::new(State::new(leftover)),
            }
        });
        client
            .chan
            .session
            .transport
            .add_recv_hook(Rc::downgrade(&client.drain_hook));
        client
    }

    /// Runs on the driver task after each receive, failure or teardown:
    /// reads and dispatches replies (waking their waiters), and hands
    /// queued requests on once the channel window opens.
    fn drain_unattended(self: Rc<Self>) {
        {
            let Ok(st) = self.st.try_borrow() else {
                // Inside one of our own calls: it reads after itself.
                return;
            };
            if st.dead.is_some() || (st.slots.is_empty() && st.out.is_empty()) {
                return;
            }
        }
        if self.chan.session.transport.bridge().link() == crate::transport::Link::Dead {
            self.fail(Dead::Io(
                io::ErrorKind::NotConnected,
                "the session was torn down".into(),
            ));
            return;
        }
        let mut cx = Context::from_waker(Waker::noop());
        let _ = self.flush(&mut cx);
        if self.read_replies(&mut cx) == Read::More {
            // Capped to keep the driver responsive: continue soon.
            let weak = Rc::downgrade(&self);
            self.chan.session.reactor().run_soon(Box::new(move |_| {
                if let Some(c) = weak.upgrade() {
                    c.drain_unattended();
                }
            }));
        }
    }

    /// Queues a request built by `build` (given the buffer and the id) and
    /// returns the future of its reply. `is_open`: the reply carries a
    /// handle that must be closed if nobody takes it.
    fn request(
        self: &Rc<Self>,
        is_open: bool,
        build: impl FnOnce(&mut Vec<u8>, u32),
    ) -> ReplyFuture {
        self.request_of(is_open, SMALL_REQUEST, u32::MAX, build)
    }

    /// [`Self::request`] for a request of up to `len` bytes whose reply
    /// may carry at most `max_data` bytes of data.
    fn request_of(
        self: &Rc<Self>,
        is_open: bool,
        len: usize,
        max_data: u32,
        build: impl FnOnce(&mut Vec<u8>, u32),
    ) -> ReplyFuture {
        let mut st = self.st.borrow_mut();
        let id = st.slots.insert(Slot::waiting(max_data));
        build(st.out.back(len), id as u32);
        st.requests += 1;
        ReplyFuture {
            client: self.clone(),
            id,
            is_open,
            finished: false,
        }
    }

    /// Queues a request whose reply nobody waits for (a CLOSE of a dropped
    /// file), and makes sure it is sent even if no other request follows.
    fn send_and_forget(self: &Rc<Self>, build: impl FnOnce(&mut Vec<u8>, u32)) {
        let mut st = self.st.borrow_mut();
        if st.dead.is_some() {
            return;
        }
        let id = st.slots.insert(Slot::Abandoned {
            close_handle: false,
        });
        build(st.out.back(SMALL_REQUEST), id as u32);
        st.requests += 1;
        if std::mem::replace(&mut st.flush_scheduled, true) {
            return;
        }
        drop(st);
        let weak = Rc::downgrade(self);
        self.chan.session.reactor().run_soon(Box::new(move |_| {
            if let Some(c) = weak.upgrade() {
                c.st.borrow_mut().flush_scheduled = false;
                // Nobody waits here: a full window leaves the rest queued
                // for the next request's waiter.
                let _ = c.flush(&mut Context::from_waker(Waker::noop()));
            }
        }));
    }

    /// Requests queued or in flight.
    pub(crate) fn in_flight(&self) -> usize {
        self.st.borrow().slots.len()
    }

    /// (requests sent, replies received).
    pub(crate) fn counts(&self) -> (u64, u64) {
        let st = self.st.borrow();
        (st.requests, st.replies)
    }

    /// The error for a dead channel, if it is.
    fn dead_error(&self) -> Option<Error> {
        self.st.borrow().dead.as_ref().map(Dead::error)
    }

    /// Marks the channel dead: every waiter gets the error for `why` (the
    /// first failure's, if the channel was dead already).
    fn fail(&self, why: Dead) {
        let wake = self.st.borrow_mut().fail(why);
        wake.into_iter().for_each(Waker::wake);
    }

    /// Hands queued requests to libssh2 until they are all taken or the
    /// channel window or the socket is full (`Pending`, waker registered).
    fn flush(&self, cx: &mut Context<'_>) -> Poll<Result<()>> {
        let session = &self.chan.session;
        loop {
            let out = {
                let mut st = self.st.borrow_mut();
                // (Never a write of nothing: libssh2 would send an empty
                // data message and answer 0, which reads as a full window.)
                st.out.consume(0);
                if st.out.is_empty() {
                    return Poll::Ready(Ok(()));
                }
                std::mem::take(&mut st.out)
            };
            // Backpressure before libssh2: its send callback must always
            // take the whole packet.
            let r = if session.transport.outbound_pending() >= OUTBOUND_HIGH_WATER {
                session.transport.pump();
                match self.chan.wait_transport(cx) {
                    Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
                    _ => Poll::Pending,
                }
            } else {
                self.chan.poll_write_raw(cx, out.front())
            };
            let mut st = self.st.borrow_mut();
            // Requests queued during the call (none today) go after ours.
            let added = std::mem::replace(&mut st.out, out);
            st.out.append(added);
            match r {
                Poll::Ready(Ok(n)) => st.out.consume(n),
                Poll::Ready(Err(e)) => {
                    drop(st);
                    let kind = e.kind();
                    let msg = format!("SFTP channel write failed: {e}");
                    self.fail(Dead::Io(kind, msg));
                    return Poll::Ready(Err(Error::Io(e)));
                }
                Poll::Pending => return Poll::Pending,
            }
        }
    }

    /// Reads from the channel and dispatches every complete reply, until
    /// the channel has nothing more ([`Read::Drained`]), the channel failed
    /// ([`Read::Dead`]), or a cap on work per call is hit ([`Read::More`]).
    fn read_replies(self: &Rc<Self>, cx: &mut Context<'_>) -> Read {
        for _ in 0..READS_PER_POLL {
            if !self.dispatch() {
                return Read::Dead;
            }
            if self.st.borrow().dead.is_some() {
                return Read::Dead;
            }
            // Outside the cooperative budget: `cx` is often a no-op waker
            // (the receive hook, `poll_io`), so a budget's `Pending` would
            // be lost and the replies read here would wait for a receive
            // that the server, with every request answered, never sends.
            // `READS_PER_POLL` bounds the loop. No borrow of the state is
            // held across the call, which may run the session's hooks.
            match self.chan.poll_read_block_unbudgeted(cx, 0) {
                // A small packet's bytes are copied and its block goes
                // back to the thread's cache at once; a large one is kept.
                Poll::Ready(Ok(Some(block))) => self.st.borrow_mut().rx.push_merging(block),
                Poll::Ready(Ok(None)) => {
                    self.fail(Dead::Io(
                        io::ErrorKind::UnexpectedEof,
                        "the server closed the SFTP channel".into(),
                    ));
                    return Read::Dead;
                }
                Poll::Ready(Err(e)) => {
                    self.fail(Dead::Io(e.kind(), format!("SFTP channel read failed: {e}")));
                    return Read::Dead;
                }
                Poll::Pending => {
                    if !self.dispatch() {
                        return Read::Dead;
                    }
                    return Read::Drained;
                }
            }
        }
        if !self.dispatch() {
            return Read::Dead;
        }
        Read::More
    }

    /// Hands every complete reply received so far to its slot, wakes
    /// the waiters and queues the CLOSEs owed; `false` if the server broke
    /// the protocol and the channel is now dead.
    fn dispatch(self: &Rc<Self>) -> bool {
        let mut done = Dispatched::default();
        let r = self.st.borrow_mut().dispatch(&mut done);
        for w in done.wake {
            w.wake();
        }
        // Dispatching may run on the driver task with no waiter left to
        // flush: each CLOSE schedules its own send.
        for h in done.close {
            self.close_in_background(&h);
        }
        match r {
            Ok(()) => true,
            Err(why) => {
                self.fail(Dead::Protocol(why));
                false
            }
        }
    }

    /// A waiter's turn at the IO: hand queued requests on (waiting for
    /// the window with `cx` if it is full) and read what is buffered.
    fn poll_io(self: &Rc<Self>, cx: &mut Context<'_>) {
        if let Poll::Ready(Err(_)) = self.flush(cx) {
            return;
        }
        // Reading needs no registration: the transport calls
        // `drain_unattended` after the next receive.
        if self.read_replies(&mut Context::from_waker(Waker::noop())) == Read::More {
            cx.waker().wake_by_ref();
        }
        // Replies may have queued CLOSEs of abandoned opens.
        let _ = self.flush(cx);
    }
}

/// The typed requests: the one place where request packets are encoded.
/// Paths and handles are the bytes sent on the wire.
impl Client {
    /// The INIT packet asking for protocol `version`, sent before the
    /// engine starts (INIT carries no request id).
    pub(crate) fn init_packet(version: u32) -> Vec<u8> {
        let mut out = Vec::new();
        Request::new(&mut out, fxp::INIT, 0).u32(version).finish();
        out
    }

    /// A request of type `kind` whose only field is `s` (a path or a
    /// handle).
    fn one_str(self: &Rc<Self>, kind: u8, s: &[u8]) -> ReplyFuture {
        self.request(false, |out, id| {
            Request::new(out, kind, id).str(s).finish();
        })
    }

    /// A request of type `kind` on `s` (a path or a handle) and `attrs`.
    fn str_attrs(self: &Rc<Self>, kind: u8, s: &[u8], attrs: &FileAttributes) -> ReplyFuture {
        self.request(false, |out, id| {
            Request::new(out, kind, id).str(s).attrs(attrs).finish();
        })
    }

    /// A request of type `kind` on two paths.
    fn two_str(self: &Rc<Self>, kind: u8, a: &[u8], b: &[u8]) -> ReplyFuture {
        self.request(false, |out, id| {
            Request::new(out, kind, id).str(a).str(b).finish();
        })
    }

    /// OPEN `path` with `flags` (`SSH_FXF_*`); the handle in its reply is
    /// closed if the future is dropped before taking it.
    pub(crate) fn open(
        self: &Rc<Self>,
        path: &[u8],
        flags: u32,
        attrs: &FileAttributes,
    ) -> ReplyFuture {
        self.request(true, |out, id| {
            Request::new(out, fxp::OPEN, id)
                .str(path)
                .u32(flags)
                .attrs(attrs)
                .finish();
        })
    }

    /// OPENDIR `path`; like [`Client::open`], an untaken handle is closed.
    pub(crate) fn opendir(self: &Rc<Self>, path: &[u8]) -> ReplyFuture {
        self.request(true, |out, id| {
            Request::new(out, fxp::OPENDIR, id).str(path).finish();
        })
    }

    /// CLOSE `handle`.
    pub(crate) fn close(self: &Rc<Self>, handle: &[u8]) -> ReplyFuture {
        self.one_str(fxp::CLOSE, handle)
    }

    /// CLOSE `handle` without waiting for the reply; sent even if no other
    /// request follows.
    pub(crate) fn close_in_background(self: &Rc<Self>, handle: &[u8]) {
        self.send_and_forget(|out, id| {
            Request::new(out, fxp::CLOSE, id).str(handle).finish();
        });
    }

    /// READ `len` bytes of `handle` at `offset`.
    pub(crate) fn read(self: &Rc<Self>, handle: &[u8], offset: u64, len: u32) -> ReplyFuture {
        self.request_of(false, SMALL_REQUEST, len, |out, id| {
            Request::new(out, fxp::READ, id)
                .str(handle)
                .u64(offset)
                .u32(len)
                .finish();
        })
    }

    /// WRITE `data` to `handle` at `offset`.
    pub(crate) fn write(self: &Rc<Self>, handle: &[u8], offset: u64, data: &[u8]) -> ReplyFuture {
        let len = codec::WRITE_HEADER + handle.len() + data.len();
        self.request_of(false, len, u32::MAX, |out, id| {
            Request::new(out, fxp::WRITE, id)
                .str(handle)
                .u64(offset)
                .str(data)
                .finish();
        })
    }

    /// A WRITE at `offset` of up to `max` bytes of `src` from the same
    /// offset, read straight into the request: the bytes read and the
    /// reply's future, or `None` at the end of the file (nothing sent).
    pub(crate) fn write_from_file(
        self: &Rc<Self>,
        handle: &[u8],
        offset: u64,
        max: usize,
        src: &std::fs::File,
    ) -> io::Result<Option<(usize, ReplyFuture)>> {
        let mut st = self.st.borrow_mut();
        let id = st.slots.vacant_key();
        let seg = st.out.back(codec::WRITE_HEADER + handle.len() + max);
        let built = Request::new(seg, fxp::WRITE, id as u32)
            .str(handle)
            .u64(offset)
            .str_from(|out| crate::reactor::files::read_append_at(src, out, max, offset));
        let req = match built {
            Ok(Some(req)) => req,
            Ok(None) => {
                st.out.drop_empty_back();
                return Ok(None);
            }
            Err(e) => {
                st.out.drop_empty_back();
                return Err(e);
            }
        };
        let n = req.finish() - codec::WRITE_HEADER - handle.len();
        let taken = st.slots.insert(Slot::waiting(u32::MAX));
        debug_assert_eq!(taken, id);
        st.requests += 1;
        Ok(Some((
            n,
            ReplyFuture {
                client: self.clone(),
                id,
                is_open: false,
                finished: false,
            },
        )))
    }

    /// READDIR: the next batch of names of the directory `handle`.
    pub(crate) fn readdir(self: &Rc<Self>, handle: &[u8]) -> ReplyFuture {
        self.one_str(fxp::READDIR, handle)
    }

    /// FSTAT `handle`.
    pub(crate) fn fstat(self: &Rc<Self>, handle: &[u8]) -> ReplyFuture {
        self.one_str(fxp::FSTAT, handle)
    }

    /// FSETSTAT `handle` to `attrs`.
    pub(crate) fn fsetstat(self: &Rc<Self>, handle: &[u8], attrs: &FileAttributes) -> ReplyFuture {
        self.str_attrs(fxp::FSETSTAT, handle, attrs)
    }

    /// STAT `path` (following links).
    pub(crate) fn stat(self: &Rc<Self>, path: &[u8]) -> ReplyFuture {
        self.one_str(fxp::STAT, path)
    }

    /// LSTAT `path` (not following a link).
    pub(crate) fn lstat(self: &Rc<Self>, path: &[u8]) -> ReplyFuture {
        self.one_str(fxp::LSTAT, path)
    }

    /// SETSTAT `path` to `attrs`.
    pub(crate) fn setstat(self: &Rc<Self>, path: &[u8], attrs: &FileAttributes) -> ReplyFuture {
        self.str_attrs(fxp::SETSTAT, path, attrs)
    }

    /// MKDIR `path` with `attrs`.
    pub(crate) fn mkdir(self: &Rc<Self>, path: &[u8], attrs: &FileAttributes) -> ReplyFuture {
        self.str_attrs(fxp::MKDIR, path, attrs)
    }

    /// RMDIR `path`.
    pub(crate) fn rmdir(self: &Rc<Self>, path: &[u8]) -> ReplyFuture {
        self.one_str(fxp::RMDIR, path)
    }

    /// REMOVE `path`.
    pub(crate) fn remove(self: &Rc<Self>, path: &[u8]) -> ReplyFuture {
        self.one_str(fxp::REMOVE, path)
    }

    /// REMOVE `path` without waiting for the reply.
    pub(crate) fn remove_in_background(self: &Rc<Self>, path: &[u8]) {
        self.send_and_forget(|out, id| {
            Request::new(out, fxp::REMOVE, id).str(path).finish();
        });
    }

    /// RENAME `from` to `to` (SFTP v3: refused if `to` exists).
    pub(crate) fn rename(self: &Rc<Self>, from: &[u8], to: &[u8]) -> ReplyFuture {
        self.two_str(fxp::RENAME, from, to)
    }

    /// SYMLINK at `link` to `target`, in OpenSSH's order: target first
    /// (the draft has them the other way round; OpenSSH's server reads
    /// them so, and every OpenSSH client sends them so).
    pub(crate) fn symlink(self: &Rc<Self>, target: &[u8], link: &[u8]) -> ReplyFuture {
        self.two_str(fxp::SYMLINK, target, link)
    }

    /// REALPATH `path`.
    pub(crate) fn realpath(self: &Rc<Self>, path: &[u8]) -> ReplyFuture {
        self.one_str(fxp::REALPATH, path)
    }

    /// READLINK `path`.
    pub(crate) fn readlink(self: &Rc<Self>, path: &[u8]) -> ReplyFuture {
        self.one_str(fxp::READLINK, path)
    }

    /// The extension request `name` with `args`, each sent as a string.
    pub(crate) fn extended(self: &Rc<Self>, name: &str, args: &[&[u8]]) -> ReplyFuture {
        self.request(false, |out, id| {
            let mut r = Request::new(out, fxp::EXTENDED, id).str(name.as_bytes());
            for a in args {
                r = r.str(a);
            }
            r.finish();
        })
    }
}

/// A DATA reply in `body` (a packet without its length): its id and its
/// data, left in the pieces it arrived in; `None`, with `body` untouched,
/// for any other packet, and for a DATA reply whose string does not end
/// where the packet does (the codec then says what is wrong with it).
fn take_data(body: &mut Rope) -> Option<(u32, Rope)> {
    let mut head = [0u8; 9];
    if !body.peek(&mut head) || head[0] != fxp::DATA {
        return None;
    }
    let id = u32::from_be_bytes([head[1], head[2], head[3], head[4]]);
    let n = u32::from_be_bytes([head[5], head[6], head[7], head[8]]) as usize;
    if body.len().checked_sub(head.len()) != Some(n) {
        return None;
    }
    body.advance(head.len());
    let mut data = std::mem::take(body);
    // A slice much smaller than the block it lies in (a reply's first or
    // last bytes in a packet mostly of others) is copied, so that what
    // replies hold stays within a few times their data.
    data.copy_pieces_below(MERGE_BELOW);
    Some((id, data))
}

impl State {
    fn new(leftover: &[u8]) -> State {
        State {
            out: Outbox::default(),
            rx: Rope::from(leftover),
            slots: Slab::new(),
            dead: None,
            flush_scheduled: false,
            requests: 0,
            replies: 0,
        }
    }

    /// Hands every complete reply received so far to its slot.
    /// `Err` (the message of an [`Error::Protocol`]) when the server broke
    /// the protocol in a way that belongs to no request: a bad frame, an id
    /// nobody waits for, a second reply to a request.
    fn dispatch(&mut self, done: &mut Dispatched) -> std::result::Result<(), String> {
        loop {
            let mut head = [0u8; 4];
            if !self.rx.peek(&mut head) {
                return Ok(());
            }
            // Checks the length as soon as it is in, before waiting for more.
            codec::frame(&head).map_err(|e| e.to_string())?;
            let len = 4 + u32::from_be_bytes(head) as usize;
            if self.rx.len() < len {
                return Ok(());
            }
            let mut packet = self.rx.split_to(len);
            packet.advance(4);
            let (id, reply) = match take_data(&mut packet) {
                Some((id, data)) => (id, Ok(Reply::Data(data))),
                None => {
                    let body = packet.into_contiguous();
                    match codec::decode_reply(&body) {
                        Ok((id, reply)) => (id, Ok(reply)),
                        // Framed correctly: the error is the request's alone.
                        Err(e) => match codec::reply_id(&body) {
                            Some(id) if self.slots.contains(id as usize) => {
                                (id, Err(Error::from(e)))
                            }
                            _ => return Err(e.to_string()),
                        },
                    }
                }
            };
            self.replies += 1;
            let Some(slot) = self.slots.get_mut(id as usize) else {
                return Err(format!(
                    "SFTP reply with id {id} answers no request in flight"
                ));
            };
            match slot {
                Slot::Waiting { waker, max_data } => {
                    if let Some(w) = waker.take() {
                        done.wake.push(w);
                    }
                    let reply = match reply {
                        Ok(Reply::Data(d)) if d.len() > *max_data as usize => {
                            Err(Error::sftp_protocol(format!(
                                "READ reply longer than asked: {} bytes for a read of {max_data}",
                                d.len()
                            )))
                        }
                        r => r,
                    };
                    *slot = Slot::Done(reply);
                }
                Slot::Abandoned { close_handle } => {
                    // A rejected handle (over 256 bytes) is not closed: the
                    // client never sends one.
                    if let (true, Ok(Reply::Handle(h))) = (*close_handle, reply) {
                        done.close.push(h);
                    }
                    self.slots.remove(id as usize);
                }
                Slot::Done(_) => {
                    return Err(format!("a second SFTP reply to request {id}"));
                }
            }
        }
    }

    /// Marks the channel dead (keeping the first reason): every waiting
    /// request gets the error, abandoned ones are forgotten, queued ones
    /// dropped. Returns the waiters to wake.
    fn fail(&mut self, why: Dead) -> Vec<Waker> {
        let why = self.dead.get_or_insert(why).clone();
        let mut wake = Vec::new();
        let mut gone = Vec::new();
        for (id, slot) in self.slots.iter_mut() {
            match slot {
                Slot::Waiting { waker, .. } => {
                    if let Some(w) = waker.take() {
                        wake.push(w);
                    }
                    *slot = Slot::Done(Err(why.error()));
                }
                Slot::Abandoned { .. } => gone.push(id),
                Slot::Done(_) => {}
            }
        }
        for id in gone {
            self.slots.remove(id);
        }
        self.out = Outbox::default();
        wake
    }
}

#[derive(Debug, PartialEq, Eq)]
enum Read {
    Drained,
    More,
    Dead,
}

/// The reply to one request.
pub(crate) struct ReplyFuture {
    client: Rc<Client>,
    id: usize,
    is_open: bool,
    finished: bool,
}

impl ReplyFuture {
    fn take(&mut self) -> Option<Result<Reply>> {
        let mut st = self.client.st.borrow_mut();
        if let Some(Slot::Done(_)) = st.slots.get(self.id) {
            let Slot::Done(r) = st.slots.remove(self.id) else {
                unreachable!("checked above")
            };
            self.finished = true;
            return Some(r);
        }
        None
    }
}

impl Future for ReplyFuture {
    type Output = Result<Reply>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = &mut *self;
        if let Some(r) = this.take() {
            return Poll::Ready(r);
        }
        if let Some(e) = this.client.dead_error() {
            this.client.st.borrow_mut().slots.remove(this.id);
            this.finished = true;
            return Poll::Ready(Err(e));
        }
        // The waker goes in first: reading below may dispatch our reply.
        if let Some(Slot::Waiting { waker: w, .. }) =
            this.client.st.borrow_mut().slots.get_mut(this.id)
        {
            match w {
                Some(w) if w.will_wake(cx.waker()) => {}
                _ => *w = Some(cx.waker().clone()),
            }
        }
        this.client.poll_io(cx);
        match this.take() {
            Some(r) => Poll::Ready(r),
            None => Poll::Pending,
        }
    }
}

impl Drop for ReplyFuture {
    fn drop(&mut self) {
        if self.finished {
            return;
        }
        let mut handle = None;
        {
            let mut st = self.client.st.borrow_mut();
            match st.slots.get(self.id) {
                Some(Slot::Done(_)) => {
                    if let Slot::Done(Ok(Reply::Handle(h))) = st.slots.remove(self.id) {
                        handle = self.is_open.then_some(h);
                    }
                }
                Some(_) => {
                    st.slots[self.id] = Slot::Abandoned {
                        close_handle: self.is_open,
                    }
                }
                None => {}
            }
        }
        if let Some(h) = handle {
            self.client.close_in_background(&h);
        }
    }
}

/// Turns a `STATUS` reply into `Ok(())` for `OK`, the SFTP error otherwise.
pub(crate) fn status_ok(reply: Reply, path: Option<&[u8]>) -> Result<()> {
    match reply {
        Reply::Status { code: 0, .. } => Ok(()),
        other => Err(unexpected(other, path)),
    }
}

/// The error for a reply that is not what the request expects: the SFTP
/// status for a STATUS, a protocol error for anything else.
pub(crate) fn unexpected(reply: Reply, path: Option<&[u8]>) -> Error {
    match reply {
        Reply::Status { code, message } => Error::Sftp {
            code,
            message,
            path: path.map(|p| String::from_utf8_lossy(p).into_owned()),
        },
        other => Error::sftp_protocol(format!(
            "unexpected SFTP reply {}",
            match other {
                Reply::Handle(_) => "HANDLE",
                Reply::Data(_) => "DATA",
                Reply::Name(_) => "NAME",
                Reply::Attrs(_) => "ATTRS",
                Reply::Extended(_) => "EXTENDED_REPLY",
                Reply::Status { .. } => "STATUS",
            }
        )),
    }
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;

    use super::*;
    use crate::sftp::codec::{MAX_NAME_LEN, MAX_PACKET, put_str, put_u32};

    /// Bytes per simulated channel read: one SSH packet's payload.
    const READ: usize = 32 * 1024;

    /// The most the client ever holds unparsed: one packet of the largest
    /// length accepted with its length field, and the piece that ends it.
    const RX_MOST: usize = 4 + MAX_PACKET + READ;

    /// A reply packet (with its length) of type `kind` for `id`.
    fn packet(kind: u8, id: u32, payload: &[u8]) -> Vec<u8> {
        let mut p = Vec::new();
        put_u32(&mut p, (payload.len() + 5) as u32);
        p.push(kind);
        put_u32(&mut p, id);
        p.extend_from_slice(payload);
        p
    }

    fn handle_reply(id: u32, handle: &[u8]) -> Vec<u8> {
        let mut h = Vec::new();
        put_str(&mut h, handle);
        packet(fxp::HANDLE, id, &h)
    }

    fn ok_status(id: u32) -> Vec<u8> {
        packet(fxp::STATUS, id, &[0, 0, 0, 0])
    }

    /// What `read_replies` does, with `bytes` as what the channel yields
    /// in pieces of [`READ`]: dispatch, read, until everything was read and
    /// parsed. Returns the most the client held unparsed.
    fn pump(
        st: &mut State,
        bytes: &[u8],
        done: &mut Dispatched,
    ) -> std::result::Result<usize, String> {
        pump_pieces(st, bytes.chunks(READ).map(Bytes::copy_from_slice), done)
    }

    /// [`pump`] with the pieces given.
    fn pump_pieces(
        st: &mut State,
        pieces: impl IntoIterator<Item = Bytes>,
        done: &mut Dispatched,
    ) -> std::result::Result<usize, String> {
        let mut most = st.rx.len();
        st.dispatch(done)?;
        for piece in pieces {
            st.rx.push_merging(piece);
            most = most.max(st.rx.len());
            st.dispatch(done)?;
        }
        Ok(most)
    }

    fn waiting(st: &mut State) -> u32 {
        st.slots.insert(Slot::Waiting {
            waker: Some(Waker::noop().clone()),
            max_data: u32::MAX,
        }) as u32
    }

    fn take(st: &mut State, id: u32) -> Result<Reply> {
        match st.slots.remove(id as usize) {
            Slot::Done(r) => r,
            _ => panic!("request {id} has no reply"),
        }
    }

    /// Takes up to `n` bytes from `out` the way the channel does, into
    /// `sent`.
    fn take_out(out: &mut Outbox, mut n: usize, sent: &mut Vec<u8>) {
        while n > 0 && !out.is_empty() {
            let f = out.front();
            let k = f.len().min(n);
            sent.extend_from_slice(&f[..k]);
            out.consume(k);
            n -= k;
        }
    }

    #[test]
    fn queued_requests_leave_in_order_and_are_never_moved() {
        let mut out = Outbox::default();
        let (mut sent, mut want) = (Vec::new(), Vec::new());
        let data = vec![9u8; 255 * 1024];
        for i in 0..60u32 {
            let n = (i as usize * 77_777) % data.len();
            let seg = out.back(codec::WRITE_HEADER + 4 + n);
            let (cap, at, start) = (seg.capacity(), seg.as_ptr(), seg.len());
            Request::new(seg, fxp::WRITE, i)
                .str(b"hand")
                .u64(0)
                .str(&data[..n])
                .finish();
            assert_eq!((seg.capacity(), seg.as_ptr()), (cap, at), "a segment grew");
            want.extend_from_slice(&seg[start..]);
            // The channel takes a little less than comes, then catches up.
            take_out(&mut out, 100_003 * (i as usize % 3), &mut sent);
            let held: usize = out.segments.iter().map(Vec::capacity).sum();
            // A request starts a new segment only when it does not fit in
            // the last: two neighbours hold more than a segment's worth.
            let queued = want.len() - sent.len();
            assert!(held <= 2 * queued + OUT_SEGMENT, "held {held} for {queued}");
        }
        take_out(&mut out, usize::MAX, &mut sent);
        assert!(sent == want, "the bytes left in another order");
        assert!(out.is_empty() && out.front().is_empty());
        // Requests queued while the others were out go after them.
        let mut later = Outbox::default();
        later.back(SMALL_REQUEST).extend_from_slice(b"later");
        out.back(SMALL_REQUEST).extend_from_slice(b"first");
        out.append(later);
        let mut sent = Vec::new();
        take_out(&mut out, 3, &mut sent);
        take_out(&mut out, usize::MAX, &mut sent);
        assert_eq!(sent, b"firstlater");
    }

    #[test]
    fn a_request_not_queued_after_all_leaves_no_empty_segment() {
        // A WRITE whose file read found the end: `back` made room for it in
        // a segment of its own, which goes again.
        let mut out = Outbox::default();
        let seg = out.back(codec::WRITE_HEADER + 4 + 1000);
        let r = Request::new(seg, fxp::WRITE, 1)
            .str(b"hand")
            .u64(0)
            .str_from(|_| Ok(0));
        assert!(r.unwrap().is_none());
        out.drop_empty_back();
        assert!(out.is_empty(), "an empty segment stayed queued");
        // Behind a queued request, the request's own segment goes too, and
        // the queued one is untouched.
        out.back(SMALL_REQUEST).extend_from_slice(b"queued");
        out.back(OUT_SEGMENT + 1);
        out.drop_empty_back();
        assert_eq!(out.segments.len(), 1);
        assert_eq!(out.front(), b"queued");
        // An empty segment at the front is never what the channel is given.
        out.consume(6);
        out.segments.push_back(Vec::new());
        out.segments.push_back(b"next".to_vec());
        out.consume(0);
        assert_eq!(out.front(), b"next");
    }

    #[test]
    fn replies_are_parsed_as_each_piece_arrives() {
        let mut st = State::new(&[]);
        // Small replies one at a time (a stat, a 4 KiB read): nothing is
        // left behind.
        let mut done = Dispatched::default();
        for _ in 0..100 {
            let id = waiting(&mut st);
            let mut data = Vec::new();
            put_str(&mut data, &[7; 4096]);
            let most = pump(&mut st, &packet(fxp::DATA, id, &data), &mut done).unwrap();
            assert_eq!(most, 4096 + 13);
            assert!(matches!(take(&mut st, id), Ok(Reply::Data(d)) if d.len() == 4096));
            assert!(st.rx.is_empty());
        }
        // Many replies at once, far more than a piece: each piece is parsed
        // before the next is read.
        let mut wire = Vec::new();
        let ids: Vec<u32> = (0..20_000).map(|_| waiting(&mut st)).collect();
        for &id in &ids {
            wire.extend(ok_status(id));
        }
        let most = pump(&mut st, &wire, &mut done).unwrap();
        assert!(most <= READ + 13, "held {most}");
        for id in ids {
            assert!(matches!(
                take(&mut st, id),
                Ok(Reply::Status { code: 0, .. })
            ));
        }
    }

    #[test]
    fn the_client_holds_at_most_one_unfinished_packet() {
        let mut st = State::new(&[]);
        let id = waiting(&mut st);
        // The largest DATA reply accepted, then a small one behind it.
        let mut data = Vec::new();
        put_str(&mut data, &vec![0xab; MAX_PACKET - 9]);
        let mut wire = packet(fxp::DATA, id, &data);
        assert_eq!(wire.len(), 4 + MAX_PACKET);
        let id2 = waiting(&mut st);
        wire.extend(ok_status(id2));
        let mut done = Dispatched::default();
        let most = pump(&mut st, &wire, &mut done).unwrap();
        assert!(most <= RX_MOST, "held {most}");
        assert_eq!(done.wake.len(), 2);
        assert!(
            matches!(take(&mut st, id), Ok(Reply::Data(d)) if d.len() == MAX_PACKET - 9 && d.to_vec().iter().all(|&b| b == 0xab))
        );
        assert!(matches!(
            take(&mut st, id2),
            Ok(Reply::Status { code: 0, .. })
        ));
        assert!(st.rx.is_empty());
    }

    #[test]
    fn read_data_stays_in_the_pieces_the_channel_handed_over() {
        // Replies cut at every offset of their headers and data, as SSH
        // packets cut them: each DATA reply's bytes are those sent, and
        // they lie in the pieces given (no copy), except a reply's header.
        let data: Vec<u8> = (0..50_000u32).map(|i| (i % 253) as u8).collect();
        for cut in [1, 2, 3, 4, 5, 9, 12, 13, 14, 1000, MERGE_BELOW, 32 * 1024] {
            let mut st = State::new(&[]);
            let ids: Vec<u32> = (0..3).map(|_| waiting(&mut st)).collect();
            let mut wire = Vec::new();
            for &id in &ids {
                let mut body = Vec::new();
                put_str(&mut body, &data);
                wire.extend(packet(fxp::DATA, id, &body));
            }
            // The short end goes with the piece before it.
            let mut cuts: Vec<&[u8]> = wire.chunks(cut).collect();
            if cuts.len() > 1 && cuts[cuts.len() - 1].len() < cut {
                let end = cuts.pop().unwrap().len();
                let last = cuts.pop().unwrap();
                cuts.push(&wire[wire.len() - last.len() - end..]);
            }
            let pieces: Vec<Bytes> = cuts.into_iter().map(Bytes::copy_from_slice).collect();
            let inside = |p: &Bytes| {
                let at = p.as_ptr() as usize;
                pieces.iter().any(|q| {
                    let start = q.as_ptr() as usize;
                    at >= start && at + p.len() <= start + q.len()
                })
            };
            let mut done = Dispatched::default();
            pump_pieces(&mut st, pieces.clone(), &mut done).unwrap();
            assert_eq!(done.wake.len(), 3, "cut {cut}");
            for id in ids {
                match take(&mut st, id) {
                    Ok(Reply::Data(d)) => {
                        assert_eq!(d.to_vec(), data, "cut {cut}");
                        if cut >= MERGE_BELOW {
                            // All but a reply's small first and last slices
                            // stay where they arrived.
                            let kept: Vec<&Bytes> =
                                d.iter().filter(|p| p.len() >= MERGE_BELOW).collect();
                            assert!(kept.iter().all(|p| inside(p)), "cut {cut}: copied");
                            let kept: usize = kept.iter().map(|p| p.len()).sum();
                            assert!(kept + 2 * MERGE_BELOW >= data.len(), "cut {cut}: {kept}");
                        } else {
                            // Small pieces are copied together (see
                            // `Rope::push_merging`), not kept one by one.
                            assert!(d.pieces() <= 1 + data.len() / MERGE_BELOW, "cut {cut}");
                        }
                    }
                    other => panic!("cut {cut}: {other:?}"),
                }
            }
            assert!(st.rx.is_empty());
        }
    }

    #[test]
    fn replies_split_at_any_offset_are_parsed_whole() {
        // Two pieces, cut at every offset of a DATA reply and a STATUS
        // behind it, kept as they come (no merging of small pieces).
        let mut body = Vec::new();
        put_str(&mut body, b"0123456789");
        for k in 0..=13 + 10 + 13 {
            let mut st = State::new(&[]);
            let (a, b) = (waiting(&mut st), waiting(&mut st));
            let wire = [packet(fxp::DATA, a, &body), ok_status(b)].concat();
            let mut done = Dispatched::default();
            for piece in [&wire[..k], &wire[k..]] {
                st.rx.push(Bytes::copy_from_slice(piece));
                st.dispatch(&mut done).unwrap();
            }
            assert_eq!(done.wake.len(), 2, "cut at {k}");
            assert!(
                matches!(take(&mut st, a), Ok(Reply::Data(d)) if d.to_vec() == b"0123456789"),
                "cut at {k}"
            );
            assert!(matches!(
                take(&mut st, b),
                Ok(Reply::Status { code: 0, .. })
            ));
            assert!(st.rx.is_empty());
        }
    }

    #[test]
    fn a_read_reply_longer_than_asked_fails_its_request_and_is_not_kept() {
        let mut st = State::new(&[]);
        let asked = st.slots.insert(Slot::waiting(100)) as u32;
        let fits = st.slots.insert(Slot::waiting(100)) as u32;
        let mut long = Vec::new();
        put_str(&mut long, &[1; 101]);
        let mut exact = Vec::new();
        put_str(&mut exact, &[2; 100]);
        let wire = [
            packet(fxp::DATA, asked, &long),
            packet(fxp::DATA, fits, &exact),
        ]
        .concat();
        let mut done = Dispatched::default();
        pump(&mut st, &wire, &mut done).unwrap();
        assert!(
            matches!(take(&mut st, asked), Err(Error::Protocol { message: m, .. }) if m.contains("longer than asked: 101 bytes for a read of 100"))
        );
        assert!(matches!(take(&mut st, fits), Ok(Reply::Data(d)) if d.len() == 100));
        assert!(st.dead.is_none(), "only the request fails");
    }

    #[test]
    fn a_data_reply_whose_string_overruns_or_underruns_its_packet_fails_its_request() {
        let mut st = State::new(&[]);
        let (a, b, c) = (waiting(&mut st), waiting(&mut st), waiting(&mut st));
        let mut long = Vec::new();
        put_u32(&mut long, 100);
        long.extend_from_slice(&[1; 50]);
        let mut short = Vec::new();
        put_str(&mut short, &[2; 50]);
        short.extend_from_slice(&[0; 3]);
        let wire = [
            packet(fxp::DATA, a, &long),
            packet(fxp::DATA, b, &short),
            ok_status(c),
        ]
        .concat();
        let mut done = Dispatched::default();
        pump(&mut st, &wire, &mut done).unwrap();
        assert!(matches!(take(&mut st, a), Err(Error::Protocol { .. })));
        assert!(
            matches!(take(&mut st, b), Err(Error::Protocol { message: m, .. }) if m.contains("trailing bytes"))
        );
        assert!(matches!(
            take(&mut st, c),
            Ok(Reply::Status { code: 0, .. })
        ));
        assert!(st.dead.is_none());
    }

    #[test]
    fn a_packet_length_of_4_gib_fails_the_channel_with_a_protocol_error() {
        let mut st = State::new(&[]);
        let id = waiting(&mut st);
        let mut done = Dispatched::default();
        let why = pump(&mut st, &[0xff, 0xff, 0xff, 0xff, fxp::DATA], &mut done).unwrap_err();
        assert!(why.contains("4294967295"), "{why}");
        assert_eq!(st.rx.len(), 5, "nothing more was read for it");
        // What `Client::fail` does with it: the waiter, and every request
        // after, gets the protocol error naming the length.
        assert_eq!(st.fail(Dead::Protocol(why.clone())).len(), 1);
        match take(&mut st, id) {
            Err(Error::Protocol { message: m, .. }) => assert_eq!(m, why),
            other => panic!("{other:?}"),
        }
        assert!(
            matches!(st.dead.as_ref().map(Dead::error), Some(Error::Protocol { message: m, .. }) if m == why)
        );
    }

    #[test]
    fn replies_to_no_request_fail_the_channel_and_keep_nothing() {
        let mut st = State::new(&[]);
        let id = waiting(&mut st);
        let mut done = Dispatched::default();
        let why = pump(&mut st, &ok_status(id + 7), &mut done).unwrap_err();
        assert_eq!(
            why,
            format!("SFTP reply with id {} answers no request in flight", id + 7)
        );
        assert_eq!(st.slots.len(), 1, "nothing kept for the unknown id");
        assert!(matches!(
            st.slots.get(id as usize),
            Some(Slot::Waiting { .. })
        ));

        // A second reply to a request whose first reply is not taken yet.
        let mut st = State::new(&[]);
        let id = waiting(&mut st);
        let wire = [ok_status(id), ok_status(id)].concat();
        let why = pump(&mut st, &wire, &mut done).unwrap_err();
        assert_eq!(why, format!("a second SFTP reply to request {id}"));
    }

    #[test]
    fn a_malformed_reply_fails_only_its_request() {
        let mut st = State::new(&[]);
        let (a, b, c, d) = (
            waiting(&mut st),
            waiting(&mut st),
            waiting(&mut st),
            waiting(&mut st),
        );
        let mut name = Vec::new();
        put_u32(&mut name, 1);
        put_str(&mut name, &vec![b'n'; MAX_NAME_LEN + 1]);
        put_str(&mut name, b"");
        put_u32(&mut name, 0);
        let wire = [
            handle_reply(a, &[1; 257]),
            packet(99, b, &[]),
            packet(fxp::NAME, c, &name),
            ok_status(d),
        ]
        .concat();
        let mut done = Dispatched::default();
        pump(&mut st, &wire, &mut done).unwrap();
        assert_eq!(done.wake.len(), 4);
        assert!(
            matches!(take(&mut st, a), Err(Error::Protocol { message: m, .. }) if m.contains("handle longer than 256"))
        );
        assert!(
            matches!(take(&mut st, b), Err(Error::Protocol { message: m, .. }) if m.contains("unknown reply type"))
        );
        assert!(matches!(
            take(&mut st, c),
            Err(Error::LimitExceeded { limit, .. }) if limit == MAX_NAME_LEN as u64
        ));
        assert!(matches!(
            take(&mut st, d),
            Ok(Reply::Status { code: 0, .. })
        ));
        assert!(st.dead.is_none());
    }

    #[test]
    fn abandoned_opens_close_accepted_handles_only() {
        let mut st = State::new(&[]);
        let good = st.slots.insert(Slot::Abandoned { close_handle: true }) as u32;
        let long = st.slots.insert(Slot::Abandoned { close_handle: true }) as u32;
        let other = st.slots.insert(Slot::Abandoned {
            close_handle: false,
        }) as u32;
        let wire = [
            handle_reply(good, b"h-ok"),
            handle_reply(long, &[2; 300]),
            handle_reply(other, b"h-other"),
        ]
        .concat();
        let mut done = Dispatched::default();
        pump(&mut st, &wire, &mut done).unwrap();
        assert_eq!(done.close, vec![b"h-ok".to_vec()]);
        assert!(st.slots.is_empty(), "every abandoned slot was freed");
    }

    #[test]
    fn wrong_reply_types_are_typed_errors() {
        let e = unexpected(Reply::Data(Rope::from(vec![1])), Some(b"/x"));
        assert!(
            matches!(e, Error::Protocol { message: ref m, .. } if m == "unexpected SFTP reply DATA"),
            "{e:?}"
        );
        let e = status_ok(Reply::Name(Vec::new()), None).unwrap_err();
        assert!(
            matches!(e, Error::Protocol { message: ref m, .. } if m.contains("NAME")),
            "{e:?}"
        );
        let e = status_ok(
            Reply::Status {
                code: codec::status::NO_SUCH_FILE,
                message: "gone".into(),
            },
            Some(b"/x"),
        )
        .unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::NotFound);
    }
}
