//! The byte queues between libssh2's IO callbacks and the socket, with no
//! ring in sight: this is what the callbacks touch, and it is tested with a
//! deterministic fake peer instead of a kernel.

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;

/// The state of the link under a session, as the callbacks see it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Link {
    /// Bytes flow both ways.
    Open,
    /// SSH_MSG_DISCONNECT was handed to the send callback: every later send
    /// is refused (and counted), receives still work.
    Disconnected,
    /// The peer closed its side (recv returned 0).
    PeerClosed,
    /// A socket operation failed with this errno.
    Failed(i32),
    /// The session is being torn down: both callbacks fail at once.
    Dead,
}

/// Counters the send and recv callbacks keep.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BridgeStats {
    /// Packets libssh2 handed to the send callback.
    pub packets_sent: u64,
    /// Bytes libssh2 handed to the send callback.
    pub bytes_sent: u64,
    /// Of the packets sent, those libssh2 built in the outbound queue
    /// itself (our patch 0014) and that were queued without a copy.
    pub packets_built_in_place: u64,
    /// Bytes the recv callbacks gave to libssh2 (copied or lent).
    pub bytes_received: u64,
    /// Of the bytes received, those lent to libssh2 where they lay, read
    /// without a copy into its own buffer (our patch 0016).
    pub bytes_lent: u64,
    /// Sends attempted after SSH_MSG_DISCONNECT (refused; 0 on a correct teardown).
    pub sends_after_disconnect: u64,
}

/// Received bytes not yet read by libssh2: a queue of receive buffers,
/// each with its unread part `buf[pos..end]`. A receive that comes while
/// bytes wait is queued as it is (no copy) unless it is small, in which
/// case it is copied behind the last one, so that many small receives
/// cannot pin many large buffers. Buffers stay fully initialized (zeroed
/// when they grow, then reused), so the kernel writes into initialized
/// memory and memory checkers see it as such.
#[derive(Default)]
struct Inbound {
    chunks: VecDeque<Chunk>,
    /// Unread bytes over all chunks.
    len: usize,
    /// Read-out buffers, handed back as the next receive buffers.
    free: Vec<Vec<u8>>,
    /// The receive whose bytes libssh2 was lent last: it may still read
    /// (and decrypt in place) what it has not yet processed of them, so
    /// the buffer stays here, untouched, until libssh2 asks for bytes
    /// again or the bridge is dropped (after the session is freed).
    lent: Option<Vec<u8>>,
}

impl Inbound {
    /// libssh2 is done with the lent bytes: their buffer may be reused.
    fn release_lent(&mut self) {
        if let Some(buf) = self.lent.take() {
            self.recycle(buf);
        }
    }

    /// A read-out buffer: a large one goes to the thread, whose next
    /// receive (this session's or another's) takes the buffer read out
    /// last, still in the cache; a small one is this session's next.
    fn recycle(&mut self, buf: Vec<u8>) {
        if buf.len() < crate::reactor::buffers::KEEP_MIN && self.free.len() < FREE_BUFFERS {
            self.free.push(buf);
        } else {
            crate::reactor::buffers::keep(buf);
        }
    }
}

impl Drop for Inbound {
    fn drop(&mut self) {
        // The session is gone (libssh2 freed before its bridge): its
        // buffers, lent ones too, serve the thread's next sessions.
        let lent = self.lent.take();
        let queued = self.chunks.drain(..).map(|c| c.buf);
        for buf in lent.into_iter().chain(queued).chain(self.free.drain(..)) {
            crate::reactor::buffers::keep(buf);
        }
    }
}

struct Chunk {
    buf: Vec<u8>,
    pos: usize,
    end: usize,
}

/// Read-out buffers kept for the next receives.
const FREE_BUFFERS: usize = 2;

/// Outbound queue, inbound buffer and link state of one session.
pub struct Bridge {
    outbound: RefCell<Vec<u8>>,
    inbound: RefCell<Inbound>,
    link: Cell<Link>,
    /// Set when libssh2 asked for bytes that were not there.
    want_recv: Cell<bool>,
    /// SSH_MSG_DISCONNECT has been queued.
    disconnect_sent: Cell<bool>,
    /// The room [`Bridge::send_buffer`] handed out last (address, size),
    /// until the next send.
    handed_out: Cell<Option<(usize, usize)>>,
    stats: Cell<BridgeStats>,
}

impl std::fmt::Debug for Bridge {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Bridge")
            .field("link", &self.link.get())
            .field("outbound", &self.outbound_len())
            .field("inbound", &self.inbound_len())
            .field("stats", &self.stats.get())
            .finish()
    }
}

impl Default for Bridge {
    fn default() -> Self {
        Self::new()
    }
}

impl Bridge {
    /// An open link with empty queues.
    pub fn new() -> Self {
        Bridge {
            outbound: RefCell::new(Vec::new()),
            inbound: RefCell::new(Inbound::default()),
            link: Cell::new(Link::Open),
            want_recv: Cell::new(false),
            disconnect_sent: Cell::new(false),
            handed_out: Cell::new(None),
            stats: Cell::new(BridgeStats::default()),
        }
    }

    /// The link state.
    pub fn link(&self) -> Link {
        self.link.get()
    }

    /// The callbacks' counters.
    pub fn stats(&self) -> BridgeStats {
        self.stats.get()
    }

    fn bump(&self, f: impl FnOnce(&mut BridgeStats)) {
        let mut s = self.stats.get();
        f(&mut s);
        self.stats.set(s);
    }

    /// The send callback's logic: take the whole packet, never a part, and
    /// never ask libssh2 to retry (a retry pins libssh2 to this packet).
    pub fn on_send(&self, data: &[u8]) -> isize {
        self.on_send_with(data.len(), |out| out.extend_from_slice(data))
    }

    /// [`Bridge::on_send`] for a packet of `len` bytes that `append` puts
    /// at the end of the outbound queue (called only while the link is
    /// open).
    pub fn on_send_with(&self, len: usize, append: impl FnOnce(&mut Vec<u8>)) -> isize {
        if self.disconnect_sent.get() {
            // Whatever the link state: nothing may follow the DISCONNECT.
            self.bump(|s| s.sends_after_disconnect += 1);
        }
        match self.link.get() {
            Link::Open => {
                append(&mut self.outbound.borrow_mut());
                self.bump(|s| {
                    s.packets_sent += 1;
                    s.bytes_sent += len as u64;
                });
                len as isize
            }
            Link::Disconnected => -(libc::ESHUTDOWN as isize),
            Link::PeerClosed => -(libc::EPIPE as isize),
            Link::Failed(errno) => -(errno as isize),
            Link::Dead => -(libc::ECONNABORTED as isize),
        }
    }

    /// The recv callback's logic: buffered bytes first; when there are none,
    /// -EAGAIN while the link is open and an error once it is not (never 0,
    /// never -EAGAIN after EOF, failure or teardown).
    pub fn on_recv(&self, out: &mut [u8]) -> isize {
        if self.link.get() == Link::Dead {
            return -(libc::ECONNABORTED as isize);
        }
        let mut inbound = self.inbound.borrow_mut();
        // libssh2 copied what it had left of the lent bytes before asking.
        inbound.release_lent();
        if inbound.len > 0 && !out.is_empty() {
            let mut n = 0;
            while n < out.len() {
                let Some(front) = inbound.chunks.front_mut() else {
                    break;
                };
                let k = (front.end - front.pos).min(out.len() - n);
                out[n..n + k].copy_from_slice(&front.buf[front.pos..front.pos + k]);
                front.pos += k;
                n += k;
                if front.pos == front.end {
                    let done = inbound.chunks.pop_front().expect("front chunk");
                    inbound.recycle(done.buf);
                }
            }
            inbound.len -= n;
            drop(inbound);
            self.bump(|s| s.bytes_received += n as u64);
            return n as isize;
        }
        drop(inbound);
        self.nothing_to_read()
    }

    /// The recv buffer callback's logic (our patch 0016): the unread bytes
    /// of the oldest receive, lent where they lie (address and count); they
    /// count as received, and their buffer is kept unmoved until libssh2
    /// asks for bytes again. With nothing buffered, the recv callback's
    /// -EAGAIN or error.
    pub fn lend(&self) -> Result<(*mut u8, usize), isize> {
        let mut inbound = self.inbound.borrow_mut();
        // Asking again means libssh2 is done with the last lent bytes.
        inbound.release_lent();
        if self.link.get() != Link::Dead
            && let Some(mut front) = inbound.chunks.pop_front()
        {
            let n = front.end - front.pos;
            // Queued receives are never empty (see `deliver`, `on_recv`).
            debug_assert!(n > 0, "an empty receive queued");
            inbound.len -= n;
            let at = front.buf[front.pos..].as_mut_ptr();
            // Moving the vector moves no bytes: `at` stays valid.
            inbound.lent = Some(front.buf);
            drop(inbound);
            self.bump(|s| {
                s.bytes_received += n as u64;
                s.bytes_lent += n as u64;
            });
            return Ok((at, n));
        }
        drop(inbound);
        Err(self.nothing_to_read())
    }

    /// What a recv callback answers when it has no bytes: -EAGAIN while
    /// the link is open (noting that libssh2 waits for input), an error
    /// once it is not (never 0, never -EAGAIN after EOF, failure or
    /// teardown).
    fn nothing_to_read(&self) -> isize {
        match self.link.get() {
            Link::Open | Link::Disconnected => {
                self.want_recv.set(true);
                -(libc::EAGAIN as isize)
            }
            Link::PeerClosed => -(libc::ECONNRESET as isize),
            Link::Failed(errno) => -(errno as isize),
            Link::Dead => -(libc::ECONNABORTED as isize),
        }
    }

    /// Where libssh2 is to build its next packet (our patch 0014): room
    /// for `size` bytes at the end of the outbound queue, so that the send
    /// callback can take the packet where it is ([`Bridge::take_in_place`]).
    /// `None` unless the link is open: libssh2 then builds in its own
    /// buffer, and the send fails as it would have.
    pub fn send_buffer(&self, size: usize) -> Option<*mut u8> {
        if self.link.get() != Link::Open {
            self.handed_out.set(None);
            return None;
        }
        let mut out = self.outbound.borrow_mut();
        out.reserve(size);
        let at: *mut u8 = out.spare_capacity_mut().as_mut_ptr().cast();
        self.handed_out.set(Some((at as usize, size)));
        Some(at)
    }

    /// Whether the `len` bytes at `data` are the packet built in the room
    /// [`Bridge::send_buffer`] handed out last: the same address, no longer
    /// than that room, and still at the end of the queue. A room is taken
    /// once; any send forgets it. Counted as built in place if so.
    pub fn take_in_place(&self, data: *const u8, len: usize) -> bool {
        let Some((at, size)) = self.handed_out.take() else {
            return false;
        };
        let out = self.outbound.borrow();
        let in_place = data as usize == at
            && len <= size
            && std::ptr::eq(data, out.as_ptr().wrapping_add(out.len()))
            && len <= out.capacity() - out.len();
        drop(out);
        if in_place && self.link.get() == Link::Open {
            self.bump(|s| s.packets_built_in_place += 1);
        }
        in_place
    }

    /// Takes everything queued for sending, leaving `spare` (cleared) in its place.
    pub fn take_outbound(&self, mut spare: Vec<u8>) -> Vec<u8> {
        spare.clear();
        std::mem::replace(&mut *self.outbound.borrow_mut(), spare)
    }

    /// Bytes queued for sending.
    pub fn outbound_len(&self) -> usize {
        self.outbound.borrow().len()
    }

    /// Bytes received and not yet read by libssh2.
    pub fn inbound_len(&self) -> usize {
        self.inbound.borrow().len
    }

    /// Hands received bytes, the first `n` of `buf`, to libssh2's side. The
    /// vector itself is queued (no copy) unless bytes are waiting and `n`
    /// is small next to it. Returns a vector to receive into next (its
    /// length is kept: the bytes are initialized and are overwritten by the
    /// next receive); an empty one when none is left over.
    pub fn deliver(&self, buf: Vec<u8>, n: usize) -> Vec<u8> {
        assert!(n <= buf.len(), "delivered more bytes than the buffer holds");
        self.want_recv.set(false);
        if n == 0 {
            return buf;
        }
        let mut ib = self.inbound.borrow_mut();
        ib.len += n;
        if n <= buf.len() / 4
            && let Some(last) = ib.chunks.back_mut()
        {
            if last.buf.len() - last.end < n {
                last.buf.copy_within(last.pos..last.end, 0);
                last.end -= last.pos;
                last.pos = 0;
                if last.buf.len() - last.end < n {
                    let need = last.end + n;
                    last.buf.resize(need, 0);
                }
            }
            let end = last.end;
            last.buf[end..end + n].copy_from_slice(&buf[..n]);
            last.end += n;
            return buf;
        }
        ib.chunks.push_back(Chunk {
            buf,
            pos: 0,
            end: n,
        });
        ib.free.pop().unwrap_or_default()
    }

    /// Whether libssh2 asked for bytes that were not there, since the last
    /// delivery or [`Self::clear_wants_recv`].
    pub fn wants_recv(&self) -> bool {
        self.want_recv.get()
    }

    /// Forgets an earlier unanswered ask (before a new libssh2 call).
    pub fn clear_wants_recv(&self) {
        self.want_recv.set(false);
    }

    /// The peer closed its side.
    pub fn set_peer_closed(&self) {
        if matches!(self.link.get(), Link::Open | Link::Disconnected) {
            self.link.set(Link::PeerClosed);
        }
    }

    /// A socket operation failed with `errno`.
    pub fn set_failed(&self, errno: i32) {
        if matches!(self.link.get(), Link::Open | Link::Disconnected) {
            self.link.set(Link::Failed(errno));
        }
    }

    /// SSH_MSG_DISCONNECT has been queued: refuse every later send.
    pub fn set_disconnected(&self) {
        self.disconnect_sent.set(true);
        if self.link.get() == Link::Open {
            self.link.set(Link::Disconnected);
        }
    }

    /// Teardown: both callbacks fail from now on.
    pub fn kill(&self) {
        self.link.set(Link::Dead);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_handed_out_room_is_taken_in_place_once_and_only_as_handed_out() {
        let b = Bridge::new();
        assert_eq!(b.on_send(&[7; 100]), 100);
        let at = b.send_buffer(600).expect("room on an open link");
        // Another address, a longer packet, or a second take: not in place.
        assert!(!b.take_in_place(at.wrapping_add(1), 10));
        let at = b.send_buffer(600).unwrap();
        assert!(!b.take_in_place(at, 601));
        let at = b.send_buffer(600).unwrap();
        assert!(b.take_in_place(at, 600));
        assert!(!b.take_in_place(at, 600), "a room is taken once");
        // A room handed out before something else was queued is stale.
        let at = b.send_buffer(600).unwrap();
        assert_eq!(b.on_send(&[8; 5]), 5);
        assert!(!b.take_in_place(at, 5));
        assert_eq!(b.stats().packets_built_in_place, 1);
        // No room at all once the link is gone.
        b.set_failed(libc::EPIPE);
        assert!(b.send_buffer(600).is_none());
        assert!(!b.take_in_place(at, 5));
    }

    #[test]
    fn send_takes_whole_packets_and_counts_them() {
        let b = Bridge::new();
        assert_eq!(b.on_send(&[1; 35000]), 35000);
        assert_eq!(b.on_send(&[2; 10]), 10);
        assert_eq!(b.outbound_len(), 35010);
        let out = b.take_outbound(Vec::new());
        assert_eq!(out.len(), 35010);
        assert_eq!(out[35000], 2);
        assert_eq!(b.outbound_len(), 0);
        assert_eq!(b.stats().packets_sent, 2);
    }

    #[test]
    fn recv_is_eagain_when_empty_then_delivers_in_pieces() {
        let b = Bridge::new();
        let mut out = [0u8; 4];
        assert_eq!(b.on_recv(&mut out), -(libc::EAGAIN as isize));
        assert!(b.wants_recv());
        let spare = b.deliver(b"abcdef".to_vec(), 6);
        assert!(spare.is_empty());
        assert!(!b.wants_recv());
        assert_eq!(b.on_recv(&mut out), 4);
        assert_eq!(&out, b"abcd");
        let _ = b.deliver(b"gh?".to_vec(), 2);
        assert_eq!(b.inbound_len(), 4);
        assert_eq!(b.on_recv(&mut out), 4);
        assert_eq!(&out, b"efgh");
        assert_eq!(b.on_recv(&mut out), -(libc::EAGAIN as isize));
    }

    #[test]
    fn lent_bytes_stay_where_they_lie_until_libssh2_asks_again() {
        let b = Bridge::new();
        assert_eq!(b.lend(), Err(-(libc::EAGAIN as isize)));
        assert!(b.wants_recv());
        let first: Vec<u8> = (0..100u8).collect();
        let first_ptr = first.as_ptr();
        let _ = b.deliver(first, 100);
        // A copying read took part of it: the rest is lent where it lies.
        let mut out = [0u8; 10];
        assert_eq!(b.on_recv(&mut out), 10);
        let (at, n) = b.lend().expect("bytes");
        assert_eq!((at as *const u8, n), (first_ptr.wrapping_add(10), 90));
        assert_eq!(b.inbound_len(), 0);
        // Receives that come meanwhile (small ones too, which are appended
        // to the last queued buffer) neither move nor touch the lent bytes,
        // and libssh2 may decrypt them in place.
        let _ = b.deliver(vec![7; 40], 40);
        let _ = b.deliver(vec![8; 40], 4);
        // SAFETY: the bridge keeps the lent buffer until the next ask.
        let lent = unsafe { std::slice::from_raw_parts_mut(at, n) };
        assert!(lent.iter().enumerate().all(|(i, &x)| x == i as u8 + 10));
        lent.fill(0xee);
        assert_eq!(b.inbound_len(), 44);
        // Asking again releases them; the next receive's bytes come lent.
        let (at2, n2) = b.lend().expect("bytes");
        assert_eq!(n2, 44);
        // SAFETY: as above.
        let next = unsafe { std::slice::from_raw_parts(at2, n2) };
        assert!(next[..40].iter().all(|&x| x == 7) && next[40..].iter().all(|&x| x == 8));
        let st = b.stats();
        assert_eq!((st.bytes_received, st.bytes_lent), (144, 134));
        // The first buffer, released, is the next receive buffer.
        let next_buffer = b.deliver(vec![1; 64], 64);
        assert_eq!(next_buffer.as_ptr(), first_ptr);
        // Once the link is down, nothing more is lent.
        b.set_failed(libc::ETIMEDOUT);
        let (_, n3) = b.lend().expect("buffered bytes first");
        assert_eq!(n3, 64);
        assert_eq!(b.lend(), Err(-(libc::ETIMEDOUT as isize)));
        b.kill();
        let _ = b.deliver(vec![2; 64], 64);
        assert_eq!(b.lend(), Err(-(libc::ECONNABORTED as isize)));
    }

    #[test]
    fn eof_and_failure_are_errors_after_buffered_bytes() {
        let b = Bridge::new();
        let _ = b.deliver(b"xy".to_vec(), 2);
        b.set_peer_closed();
        let mut out = [0u8; 8];
        assert_eq!(b.on_recv(&mut out), 2);
        assert_eq!(b.on_recv(&mut out), -(libc::ECONNRESET as isize));
        assert_eq!(b.on_send(b"z"), -(libc::EPIPE as isize));

        let b = Bridge::new();
        b.set_failed(libc::ETIMEDOUT);
        assert_eq!(b.on_recv(&mut out), -(libc::ETIMEDOUT as isize));
        assert_eq!(b.on_send(b"z"), -(libc::ETIMEDOUT as isize));
    }

    #[test]
    fn dead_link_fails_both_ways_even_with_bytes_buffered() {
        let b = Bridge::new();
        let _ = b.deliver(b"data".to_vec(), 4);
        b.kill();
        let mut out = [0u8; 8];
        assert_eq!(b.on_recv(&mut out), -(libc::ECONNABORTED as isize));
        assert_eq!(b.on_send(b"z"), -(libc::ECONNABORTED as isize));
        assert_eq!(b.stats().packets_sent, 0);
    }

    #[test]
    fn sends_after_disconnect_are_refused_and_counted() {
        let b = Bridge::new();
        assert_eq!(b.on_send(b"disconnect"), 10);
        b.set_disconnected();
        assert!(b.on_send(b"late") < 0);
        assert_eq!(b.stats().sends_after_disconnect, 1);
        assert_eq!(b.stats().packets_sent, 1);
        // receiving still works after DISCONNECT
        let _ = b.deliver(b"r".to_vec(), 1);
        let mut out = [0u8; 1];
        assert_eq!(b.on_recv(&mut out), 1);
        // and teardown does not hide a late send from the count
        b.kill();
        assert!(b.on_send(b"later") < 0);
        assert_eq!(b.stats().sends_after_disconnect, 2);
    }

    #[test]
    fn large_receives_queue_without_a_copy_and_small_ones_are_appended() {
        let b = Bridge::new();
        let first: Vec<u8> = (0..100u8).collect();
        let first_ptr = first.as_ptr();
        assert!(b.deliver(first, 100).is_empty());
        // A full receive while bytes wait: queued as it is.
        let second: Vec<u8> = (100..200u8).collect();
        let spare = b.deliver(second, 100);
        assert!(spare.is_empty(), "no read-out buffer yet");
        // A small one is appended to the last buffer, which is handed back.
        let small = b.deliver(vec![200, 201, 0, 0, 0, 0, 0, 0, 0, 0], 2);
        assert_eq!(small.len(), 10);
        assert_eq!(b.inbound_len(), 202);
        let mut out = vec![0u8; 150];
        assert_eq!(b.on_recv(&mut out), 150);
        assert!(out.iter().enumerate().all(|(i, &x)| x == i as u8));
        // The first buffer, read out, is the next receive buffer.
        let next = b.deliver(vec![0; 400], 400);
        assert_eq!(next.as_ptr(), first_ptr);
        let mut rest = vec![0u8; 1000];
        assert_eq!(b.on_recv(&mut rest), 52 + 400);
        assert!(
            rest[..52]
                .iter()
                .enumerate()
                .all(|(i, &x)| x == 150 + i as u8)
        );
        assert_eq!(b.inbound_len(), 0);
        assert_eq!(b.on_recv(&mut rest), -(libc::EAGAIN as isize));
    }
}
