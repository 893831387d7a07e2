//! The byte queues between libssh2's IO callbacks and the socket, with no
//! ring in sight: this is what the callbacks touch, and it is tested with a
//! deterministic fake peer instead of a kernel.

use std::cell::{Cell, RefCell};

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
    /// Bytes the recv callback gave to libssh2.
    pub bytes_received: u64,
    /// Sends attempted after SSH_MSG_DISCONNECT (refused; 0 on a correct teardown).
    pub sends_after_disconnect: u64,
}

/// Received bytes: `buf[pos..end]` is unread. `buf` stays fully initialized
/// (it is zeroed when it grows, then reused), so the kernel writes into
/// initialized memory and memory checkers see it as such.
#[derive(Default)]
struct Inbound {
    buf: Vec<u8>,
    pos: usize,
    end: usize,
}

/// Outbound queue, inbound buffer and link state of one session.
pub struct Bridge {
    outbound: RefCell<Vec<u8>>,
    inbound: RefCell<Inbound>,
    link: Cell<Link>,
    /// Set when libssh2 asked for bytes that were not there.
    want_recv: Cell<bool>,
    /// SSH_MSG_DISCONNECT has been queued.
    disconnect_sent: Cell<bool>,
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
        if self.disconnect_sent.get() {
            // Whatever the link state: nothing may follow the DISCONNECT.
            self.bump(|s| s.sends_after_disconnect += 1);
        }
        match self.link.get() {
            Link::Open => {
                self.outbound.borrow_mut().extend_from_slice(data);
                self.bump(|s| {
                    s.packets_sent += 1;
                    s.bytes_sent += data.len() as u64;
                });
                data.len() as isize
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
        let available = inbound.end - inbound.pos;
        if available > 0 && !out.is_empty() {
            let n = available.min(out.len());
            let start = inbound.pos;
            out[..n].copy_from_slice(&inbound.buf[start..start + n]);
            inbound.pos += n;
            if inbound.pos == inbound.end {
                inbound.pos = 0;
                inbound.end = 0;
            }
            drop(inbound);
            self.bump(|s| s.bytes_received += n as u64);
            return n as isize;
        }
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
        let inbound = self.inbound.borrow();
        inbound.end - inbound.pos
    }

    /// Hands received bytes, the first `n` of `buf`, to libssh2's side. When
    /// nothing is buffered the vector itself becomes the buffer (no copy).
    /// Returns a vector to receive into next (its length is kept: the bytes
    /// are initialized and are overwritten by the next receive).
    pub fn deliver(&self, mut buf: Vec<u8>, n: usize) -> Vec<u8> {
        assert!(n <= buf.len(), "delivered more bytes than the buffer holds");
        self.want_recv.set(false);
        let mut ib = self.inbound.borrow_mut();
        if ib.pos == ib.end {
            std::mem::swap(&mut ib.buf, &mut buf);
            ib.pos = 0;
            ib.end = n;
            return buf;
        }
        if ib.end + n > ib.buf.len() {
            let (pos, end) = (ib.pos, ib.end);
            ib.buf.copy_within(pos..end, 0);
            ib.end -= pos;
            ib.pos = 0;
            let need = ib.end + n;
            if need > ib.buf.len() {
                ib.buf.resize(need, 0);
            }
        }
        let end = ib.end;
        ib.buf[end..end + n].copy_from_slice(&buf[..n]);
        ib.end += n;
        buf
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
}
