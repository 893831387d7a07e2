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

use std::cell::RefCell;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll, Waker};

use slab::Slab;

use super::codec::{self, DecodeError, Reply, fxp};
use crate::channel::ChannelInner;
use crate::error::{Error, Result};
use crate::transport::OUTBOUND_HIGH_WATER;

/// Bytes read from the channel per call.
const RX_CHUNK: usize = 256 * 1024;

/// Channel reads per poll before the reader lets other tasks run.
const READS_PER_POLL: usize = 32;

enum Slot {
    /// Sent (or queued); the waiter's waker, if it has been polled.
    Waiting(Option<Waker>),
    /// The reply arrived; the waiter has not taken it yet.
    Done(Result<Reply>),
    /// The waiter went away. If the request was an open, the handle in
    /// its reply is closed as soon as the reply arrives.
    Abandoned { close_handle: bool },
}

struct State {
    /// Encoded requests not yet taken by libssh2, from `out_pos`.
    out: Vec<u8>,
    out_pos: usize,
    /// Received bytes not yet parsed, from `rx_pos` to `rx_end`.
    rx: Vec<u8>,
    rx_pos: usize,
    rx_end: usize,
    slots: Slab<Slot>,
    /// Why the channel can carry no more requests.
    dead: Option<(io::ErrorKind, String)>,
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
    /// Registered with the session (weakly): drains replies that nobody
    /// awaits, so that abandoned requests never stall the channel.
    _drain: Rc<dyn Fn()>,
}

impl Client {
    pub(crate) fn new(chan: Rc<ChannelInner>, leftover: &[u8]) -> Rc<Client> {
        let mut rx = vec![0; RX_CHUNK.max(leftover.len() * 2)];
        rx[..leftover.len()].copy_from_slice(leftover);
        let client = Rc::new_cyclic(|weak: &std::rc::Weak<Client>| {
            let weak = weak.clone();
            let drain: Rc<dyn Fn()> = Rc::new(move || {
                if let Some(c) = weak.upgrade() {
                    c.drain_unattended();
                }
            });
            Client {
                _drain: drain,
                chan,
                st: RefCell::new(State {
                    out: Vec::with_capacity(64 * 1024),
                    out_pos: 0,
                    rx,
                    rx_pos: 0,
                    rx_end: leftover.len(),
                    slots: Slab::new(),
                    dead: None,
                    flush_scheduled: false,
                    requests: 0,
                    replies: 0,
                }),
            }
        });
        client
            .chan
            .session
            .transport
            .add_listener(Rc::downgrade(&client._drain));
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
            if st.dead.is_some() || (st.slots.is_empty() && st.out_pos == st.out.len()) {
                return;
            }
        }
        if self.chan.session.transport.bridge().link() == crate::transport::Link::Dead {
            self.fail(
                io::ErrorKind::NotConnected,
                "the session was torn down".into(),
            );
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
    pub(crate) fn request(
        self: &Rc<Self>,
        is_open: bool,
        build: impl FnOnce(&mut Vec<u8>, u32),
    ) -> ReplyFuture {
        let mut st = self.st.borrow_mut();
        let id = st.slots.insert(Slot::Waiting(None));
        build(&mut st.out, id as u32);
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
    pub(crate) fn send_and_forget(self: &Rc<Self>, build: impl FnOnce(&mut Vec<u8>, u32)) {
        let mut st = self.st.borrow_mut();
        if st.dead.is_some() {
            return;
        }
        let id = st.slots.insert(Slot::Abandoned {
            close_handle: false,
        });
        build(&mut st.out, id as u32);
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
        self.st
            .borrow()
            .dead
            .as_ref()
            .map(|(k, m)| Error::Io(io::Error::new(*k, m.clone())))
    }

    /// Marks the channel dead: every waiter gets `why`.
    fn fail(&self, kind: io::ErrorKind, why: String) {
        let mut st = self.st.borrow_mut();
        if st.dead.is_none() {
            st.dead = Some((kind, why));
        }
        let (kind, why) = st.dead.clone().unwrap_or((kind, String::new()));
        let mut wake = Vec::new();
        let mut gone = Vec::new();
        for (id, slot) in st.slots.iter_mut() {
            match slot {
                Slot::Waiting(w) => {
                    if let Some(w) = w.take() {
                        wake.push(w);
                    }
                    *slot = Slot::Done(Err(Error::Io(io::Error::new(kind, why.clone()))));
                }
                Slot::Abandoned { .. } => gone.push(id),
                Slot::Done(_) => {}
            }
        }
        for id in gone {
            st.slots.remove(id);
        }
        st.out.clear();
        st.out_pos = 0;
        drop(st);
        wake.into_iter().for_each(Waker::wake);
    }

    /// Hands queued requests to libssh2 until they are all taken or the
    /// channel window or the socket is full (`Pending`, waker registered).
    fn flush(&self, cx: &mut Context<'_>) -> Poll<Result<()>> {
        let session = &self.chan.session;
        loop {
            let (out, pos) = {
                let mut st = self.st.borrow_mut();
                if st.out_pos == st.out.len() {
                    st.out.clear();
                    st.out_pos = 0;
                    return Poll::Ready(Ok(()));
                }
                (std::mem::take(&mut st.out), st.out_pos)
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
                self.chan.poll_write_raw(cx, &out[pos..])
            };
            let mut st = self.st.borrow_mut();
            // Requests queued during the call (none today) go after ours.
            let added = std::mem::replace(&mut st.out, out);
            st.out.extend_from_slice(&added);
            match r {
                Poll::Ready(Ok(n)) => st.out_pos += n,
                Poll::Ready(Err(e)) => {
                    drop(st);
                    let kind = e.kind();
                    let msg = format!("SFTP channel write failed: {e}");
                    self.fail(kind, msg);
                    return Poll::Ready(Err(Error::Io(e)));
                }
                Poll::Pending => return Poll::Pending,
            }
        }
    }

    /// Reads from the channel and dispatches every complete reply, until
    /// the channel has nothing more ([`Read::Drained`]), the channel failed
    /// ([`Read::Dead`]), or a cap on work per call is hit ([`Read::More`]).
    fn read_replies(&self, cx: &mut Context<'_>) -> Read {
        for _ in 0..READS_PER_POLL {
            if let Err(e) = self.dispatch() {
                self.fail(io::ErrorKind::InvalidData, e.to_string());
                return Read::Dead;
            }
            let mut rx = {
                let mut st = self.st.borrow_mut();
                if st.dead.is_some() {
                    return Read::Dead;
                }
                // Compact, then make room for a read.
                if st.rx_pos > 0 {
                    let (p, e) = (st.rx_pos, st.rx_end);
                    st.rx.copy_within(p..e, 0);
                    st.rx_end -= p;
                    st.rx_pos = 0;
                }
                if st.rx.len() - st.rx_end < RX_CHUNK / 4 {
                    let want = st.rx.len() * 2;
                    st.rx.resize(want, 0);
                }
                std::mem::take(&mut st.rx)
            };
            let end = self.st.borrow().rx_end;
            let r = self.chan.poll_read_into(cx, 0, &mut rx[end..]);
            let mut st = self.st.borrow_mut();
            st.rx = rx;
            match r {
                Poll::Ready(Ok(0)) => {
                    drop(st);
                    self.fail(
                        io::ErrorKind::UnexpectedEof,
                        "the server closed the SFTP channel".into(),
                    );
                    return Read::Dead;
                }
                Poll::Ready(Ok(n)) => st.rx_end += n,
                Poll::Ready(Err(e)) => {
                    drop(st);
                    self.fail(e.kind(), format!("SFTP channel read failed: {e}"));
                    return Read::Dead;
                }
                Poll::Pending => {
                    drop(st);
                    if let Err(e) = self.dispatch() {
                        self.fail(io::ErrorKind::InvalidData, e.to_string());
                        return Read::Dead;
                    }
                    return Read::Drained;
                }
            }
        }
        if let Err(e) = self.dispatch() {
            self.fail(io::ErrorKind::InvalidData, e.to_string());
            return Read::Dead;
        }
        Read::More
    }

    /// Hands every complete reply in the receive buffer to its slot.
    fn dispatch(&self) -> std::result::Result<(), DecodeError> {
        let mut wake = Vec::new();
        let mut close = Vec::new();
        {
            let mut st = self.st.borrow_mut();
            loop {
                let avail = &st.rx[st.rx_pos..st.rx_end];
                let Some(len) = codec::frame(avail)? else {
                    break;
                };
                let (id, reply) = codec::decode_reply(&avail[4..len])?;
                st.rx_pos += len;
                st.replies += 1;
                let id = id as usize;
                let slot = st
                    .slots
                    .get_mut(id)
                    .ok_or(DecodeError("reply to a request never sent"))?;
                match slot {
                    Slot::Waiting(w) => {
                        if let Some(w) = w.take() {
                            wake.push(w);
                        }
                        *slot = Slot::Done(Ok(reply));
                    }
                    Slot::Abandoned { close_handle } => {
                        if let (true, Reply::Handle(h)) = (*close_handle, reply) {
                            close.push(h);
                        }
                        st.slots.remove(id);
                    }
                    Slot::Done(_) => return Err(DecodeError("two replies to one request")),
                }
            }
        }
        for w in wake {
            w.wake();
        }
        for h in close {
            self.close_handle_later(h);
        }
        Ok(())
    }

    /// Sends CLOSE for `handle` without waiting for its reply.
    pub(crate) fn close_handle_later(self: &Client, handle: Vec<u8>) {
        // `send_and_forget` needs the Rc for its deferred flush; replies are
        // dispatched from a `&Client`, so queue directly: the next waiter
        // (there is one: we are inside a poll) flushes it.
        let mut st = self.st.borrow_mut();
        if st.dead.is_some() {
            return;
        }
        let id = st.slots.insert(Slot::Abandoned {
            close_handle: false,
        });
        codec::Request::new(&mut st.out, fxp::CLOSE, id as u32)
            .str(&handle)
            .finish();
        st.requests += 1;
    }

    /// A waiter's turn at the IO: hand queued requests on (waiting for
    /// the window with `cx` if it is full) and read what is buffered.
    fn poll_io(&self, cx: &mut Context<'_>) {
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
        if let Some(Slot::Waiting(w)) = this.client.st.borrow_mut().slots.get_mut(this.id) {
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
            let c = self.client.clone();
            c.send_and_forget(|out, id| {
                codec::Request::new(out, fxp::CLOSE, id).str(&h).finish();
            });
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
        other => Error::Protocol(format!(
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
