//! The bridge driven by libssh2 itself, with no ring and no socket: a
//! deterministic fake peer.
//!
//! Each test creates a real libssh2 session wired to a [`CallbackContext`] through
//! [`callbacks::new_session`] and calls `libssh2_session_handshake`
//! synchronously, in a loop, the way `Session::poll_call` does: clear the
//! "asked for input" flag, call, then move the bytes libssh2 queued to the
//! fake peer and hand the peer's scripted answer back with
//! [`Bridge::deliver`]. End of stream, socket failures and teardown are the
//! bridge's `set_peer_closed`, `set_failed` and `kill`.
//!
//! No threads, no sockets, no clocks: the only randomness is a fixed-seed
//! xorshift, so every run sees the same bytes in the same pieces.
//!
//! The peer never gets past the unencrypted part of the protocol (it has no
//! key exchange of its own): the furthest a test goes is libssh2's first
//! key-exchange message, sent in answer to a scripted server KEXINIT.

// Only the fuzz entry point is compiled outside of tests.
#![cfg_attr(not(test), allow(dead_code, unused_imports))]

use std::os::raw::{c_char, c_int};

use super::bridge::{Bridge, BridgeStats, Link};
use super::callbacks::{self, CallbackContext};
use crate::ffi;

const EAGAIN: c_int = ffi::LIBSSH2_ERROR_EAGAIN;

/// What the fake server announces itself as.
const SERVER_BANNER: &[u8] = b"SSH-2.0-FakePeer_1.0\r\n";

/// SSH message numbers the tests look at (RFC 4253, RFC 5656).
const MSG_KEXINIT: u8 = 20;
/// SSH_MSG_KEXDH_INIT / SSH_MSG_KEX_ECDH_INIT: a client's first key-exchange
/// message for every fixed-group, ECDH, curve25519 and ML-KEM hybrid method.
const MSG_KEX_ECDH_INIT: u8 = 30;

/// EAGAINs in a row without asking the bridge for input, after which a
/// caller like `poll_call` would be spinning. libssh2 does this once when a
/// recv left it with less than a packet header (5 bytes): it returns EAGAIN
/// instead of asking again, and asks on the next call.
const MAX_SILENT_EAGAIN: usize = 2;

/// A bound on libssh2 calls per session: any loop that reaches it failed to
/// end. (A server KEXINIT delivered one byte per call takes ~950 calls.)
const MAX_CALLS: usize = 10_000;

/// The bound on calls while a peer sends garbage: libssh2 must fail by then.
const GARBAGE_CALLS: usize = 1000;

// ---------------------------------------------------------------------------
// Randomness
// ---------------------------------------------------------------------------

/// xorshift64 (Marsaglia): deterministic, seeded per test.
struct XorShift(u64);

impl XorShift {
    fn new(seed: u64) -> Self {
        // The all-zero state is a fixed point.
        XorShift(seed.max(1))
    }

    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }

    /// Uniform enough in `0..n` for test data.
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| (self.next() >> 32) as u8).collect()
    }
}

// ---------------------------------------------------------------------------
// The client under test: a libssh2 session over a bridge
// ---------------------------------------------------------------------------

/// One libssh2 session and the [`CallbackContext`] its callbacks use.
struct Client {
    /// Boxed so its address, which libssh2 keeps, never changes. Must
    /// outlive `raw`: `Drop` frees the session before the box.
    context: Box<CallbackContext>,
    raw: *mut ffi::LIBSSH2_SESSION,
    /// libssh2 calls made so far.
    calls: usize,
    /// Calls that said EAGAIN without asking the bridge for input.
    silent_eagains: usize,
}

impl Client {
    fn new() -> Client {
        let shared = Box::new(CallbackContext::new());
        // SAFETY: `shared` is boxed (stable address) and owned by the
        // returned `Client`, which frees the session (`free` or `Drop`)
        // before the box is dropped, or leaks the box if it cannot.
        let raw = unsafe { callbacks::new_session(&*shared) };
        assert!(!raw.is_null(), "libssh2_session_init_ex failed");
        Client {
            context: shared,
            raw,
            calls: 0,
            silent_eagains: 0,
        }
    }

    fn bridge(&self) -> &Bridge {
        &self.context.bridge
    }

    fn stats(&self) -> BridgeStats {
        self.bridge().stats()
    }

    /// One `libssh2_session_handshake` call, after clearing the "asked for
    /// input" flag as `poll_call` does.
    fn handshake(&mut self) -> c_int {
        assert!(!self.raw.is_null(), "session already freed");
        assert!(
            self.calls < MAX_CALLS,
            "more than {MAX_CALLS} libssh2 calls"
        );
        self.calls += 1;
        self.bridge().clear_wants_recv();
        // SAFETY: `raw` is a live session (not freed: checked above) whose
        // `CallbackContext` is alive; this thread is the only one using it and no
        // callback of it is running.
        unsafe { ffi::libssh2_session_handshake(self.raw, callbacks::dummy_fd()) }
    }

    /// Calls the handshake until it ends (success or error) or returns
    /// EAGAIN *after asking for input*; panics if it keeps saying EAGAIN
    /// without asking (the caller would spin, or sleep forever).
    fn handshake_until_blocked(&mut self) -> c_int {
        for _ in 0..MAX_SILENT_EAGAIN {
            let rc = self.handshake();
            if rc != EAGAIN || self.bridge().wants_recv() {
                return rc;
            }
            self.silent_eagains += 1;
        }
        panic!("libssh2 said EAGAIN {MAX_SILENT_EAGAIN} times in a row without asking for input");
    }

    /// Everything libssh2 has queued for the peer.
    fn take_out(&self) -> Vec<u8> {
        self.bridge().take_outbound(Vec::new())
    }

    /// Bytes from the peer.
    fn deliver(&self, bytes: &[u8]) {
        let _spare = self.bridge().deliver(bytes.to_vec(), bytes.len());
    }

    /// libssh2's last error message, for assertion messages.
    fn last_error(&self) -> String {
        if self.raw.is_null() {
            return String::from("(session freed)");
        }
        let mut msg: *mut c_char = std::ptr::null_mut();
        let mut len: c_int = 0;
        // SAFETY: `raw` is live; with `want_buf` 0 libssh2 points `msg` at
        // its own storage (or a static string), valid until the next call on
        // the session, and we copy it out at once.
        unsafe {
            let rc = ffi::libssh2_session_last_error(self.raw, &mut msg, &mut len, 0);
            if msg.is_null() || len <= 0 {
                return format!("{rc}");
            }
            let text = std::slice::from_raw_parts(msg as *const u8, len as usize);
            format!("{rc}: {}", String::from_utf8_lossy(text))
        }
    }

    /// `libssh2_session_free`. Returns its result; on anything but EAGAIN
    /// the session is gone.
    fn free(&mut self) -> c_int {
        assert!(!self.raw.is_null(), "session already freed");
        // SAFETY: `raw` is live and not in use; `shared` outlives this call.
        let rc = unsafe { ffi::libssh2_session_free(self.raw) };
        if rc != EAGAIN {
            self.raw = std::ptr::null_mut();
        }
        rc
    }

    /// Frees the session and checks that libssh2 gave back every byte and
    /// block it allocated through this session's allocator.
    fn free_and_check(mut self) {
        let rc = self.free();
        assert_eq!(rc, 0, "libssh2_session_free");
        assert_eq!(self.context.bytes_outstanding(), 0, "bytes left after free");
        assert_eq!(
            self.context.blocks_outstanding(),
            0,
            "blocks left after free"
        );
        assert!(self.context.take_panic().is_none(), "a callback panicked");
    }

    // -- Scripted openings ------------------------------------------------

    /// First call: libssh2 sends its banner and waits for the server's.
    /// Returns the banner.
    fn start(&mut self) -> Vec<u8> {
        let rc = self.handshake();
        assert_eq!(rc, EAGAIN, "first handshake call: {}", self.last_error());
        assert!(self.bridge().wants_recv(), "waiting for the server banner");
        self.take_out()
    }

    /// Up to libssh2's KEXINIT, sent after the server's banner; returns it
    /// (one packet, framing checked).
    fn drive_to_kexinit(&mut self) -> Vec<u8> {
        self.start();
        self.deliver(SERVER_BANNER);
        let rc = self.handshake_until_blocked();
        assert_eq!(rc, EAGAIN, "after the server banner: {}", self.last_error());
        let out = self.take_out();
        let mut payloads = unpack(&out);
        assert_eq!(payloads.len(), 1, "one packet after the banner");
        let kexinit = payloads.remove(0);
        assert_eq!(kexinit[0], MSG_KEXINIT);
        kexinit
    }

    /// Up to libssh2's first key-exchange message, sent in answer to an
    /// agreeable server KEXINIT; returns that message's payload.
    fn drive_to_kex_reply_wait(&mut self) -> Vec<u8> {
        let client = name_lists(&self.drive_to_kexinit());
        self.deliver(&packet(&kexinit(&agreeable(&client))));
        let rc = self.handshake_until_blocked();
        assert_eq!(
            rc,
            EAGAIN,
            "after the server KEXINIT: {}",
            self.last_error()
        );
        let mut payloads = unpack(&self.take_out());
        assert_eq!(payloads.len(), 1, "one packet after the server KEXINIT");
        let init = payloads.remove(0);
        assert_eq!(init[0], MSG_KEX_ECDH_INIT);
        init
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        if self.raw.is_null() {
            return;
        }
        // A test failed with the session alive: tear it down without IO.
        self.bridge().kill();
        if self.free() == EAGAIN {
            // libssh2 still points at `shared`: leak it rather than dangle.
            let shared = std::mem::replace(&mut self.context, Box::new(CallbackContext::new()));
            Box::leak(shared);
        }
    }
}

// ---------------------------------------------------------------------------
// The fake server's side of the wire protocol (RFC 4253, unencrypted)
// ---------------------------------------------------------------------------

/// An unencrypted binary packet: uint32 length, byte padding length,
/// payload, padding of at least 4 bytes, total a multiple of 8.
fn packet(payload: &[u8]) -> Vec<u8> {
    let mut pad = 8 - (4 + 1 + payload.len()) % 8;
    if pad < 4 {
        pad += 8;
    }
    let length = (1 + payload.len() + pad) as u32;
    let mut p = Vec::with_capacity(4 + length as usize);
    p.extend_from_slice(&length.to_be_bytes());
    p.push(pad as u8);
    p.extend_from_slice(payload);
    p.resize(p.len() + pad, 0);
    p
}

/// Splits what libssh2 sent into packet payloads, checking the framing of
/// each (RFC 4253 §6: padding ≥ 4, whole packet a multiple of 8 bytes).
fn unpack(mut stream: &[u8]) -> Vec<Vec<u8>> {
    let mut payloads = Vec::new();
    while !stream.is_empty() {
        assert!(stream.len() >= 5, "truncated packet header: {stream:?}");
        let length = u32::from_be_bytes(stream[..4].try_into().unwrap()) as usize;
        let pad = stream[4] as usize;
        assert!(stream.len() >= 4 + length, "truncated packet");
        assert_eq!((4 + length) % 8, 0, "packet not a multiple of 8 bytes");
        assert!(
            pad >= 4 && pad < length,
            "padding {pad} in a packet of {length}"
        );
        payloads.push(stream[5..4 + length - pad].to_vec());
        stream = &stream[4 + length..];
    }
    payloads
}

/// The ten name-lists of a KEXINIT, in order: kex, host key, cipher c→s,
/// cipher s→c, MAC c→s, MAC s→c, compression c→s, s→c, languages c→s, s→c.
type NameLists = [String; 10];

/// A KEXINIT payload: type, 16-byte cookie, the name-lists,
/// first_kex_packet_follows = false, reserved uint32 0.
fn kexinit(lists: &NameLists) -> Vec<u8> {
    let mut p = vec![MSG_KEXINIT];
    p.extend_from_slice(b"fake-peer-cookie");
    for list in lists {
        p.extend_from_slice(&(list.len() as u32).to_be_bytes());
        p.extend_from_slice(list.as_bytes());
    }
    p.push(0);
    p.extend_from_slice(&[0; 4]);
    p
}

/// The name-lists of a KEXINIT payload (panics if it is malformed).
fn name_lists(payload: &[u8]) -> NameLists {
    assert_eq!(payload[0], MSG_KEXINIT);
    let mut rest = &payload[17..];
    std::array::from_fn(|_| {
        let n = u32::from_be_bytes(rest[..4].try_into().unwrap()) as usize;
        let s = String::from_utf8(rest[4..4 + n].to_vec()).expect("ASCII name-list");
        rest = &rest[4 + n..];
        s
    })
}

/// A server KEXINIT libssh2 can agree with: one key exchange whose first
/// client message is SSH_MSG_KEX_ECDH_INIT (30), everything else as the
/// client offered it.
fn agreeable(client: &NameLists) -> NameLists {
    let kex = client[0]
        .split(',')
        .find(|k| {
            !k.contains("group-exchange")
                && !k.starts_with("ext-info")
                && !k.starts_with("kex-strict")
        })
        .expect("a key exchange with a fixed group")
        .to_string();
    let mut server = client.clone();
    server[0] = kex;
    server
}

/// A session's KEXINIT name-lists, learnt from a throwaway session (the
/// lists depend only on the libssh2 build, not on the session).
fn client_name_lists() -> NameLists {
    let mut c = Client::new();
    let lists = name_lists(&c.drive_to_kexinit());
    c.free_and_check();
    lists
}

fn is_error(rc: c_int) -> bool {
    rc < 0 && rc != EAGAIN
}

// ---------------------------------------------------------------------------
// 1. The client banner
// ---------------------------------------------------------------------------

#[test]
fn client_banner_is_sent_whole_in_one_send() {
    let mut c = Client::new();
    let banner = c.start();
    let text = String::from_utf8(banner.clone()).expect("ASCII banner");
    assert!(text.starts_with("SSH-2.0-libssh2_"), "{text:?}");
    assert!(text.ends_with("\r\n"), "{text:?}");
    assert_eq!(text.matches('\n').count(), 1, "{text:?}");
    let stats = c.stats();
    assert_eq!(stats.packets_sent, 1, "the banner in one send");
    assert_eq!(stats.bytes_sent, banner.len() as u64);

    // Asked again with nothing new from the peer: no resend, still waiting.
    for _ in 0..3 {
        assert_eq!(c.handshake(), EAGAIN);
        assert!(c.bridge().wants_recv());
    }
    assert_eq!(c.bridge().outbound_len(), 0);
    assert_eq!(c.stats().packets_sent, 1);
    c.free_and_check();
}

// ---------------------------------------------------------------------------
// 2. A slow server: one byte per call, or random pieces
// ---------------------------------------------------------------------------

#[test]
fn server_banner_one_byte_per_call_reaches_kexinit() {
    let mut c = Client::new();
    c.start();
    for (i, byte) in SERVER_BANNER.iter().enumerate() {
        c.deliver(std::slice::from_ref(byte));
        let rc = c.handshake();
        assert_eq!(rc, EAGAIN, "byte {i}: {}", c.last_error());
        assert!(
            c.bridge().wants_recv(),
            "byte {i}: EAGAIN without asking for input"
        );
        assert_eq!(c.bridge().inbound_len(), 0, "byte {i} not consumed");
        if i + 1 < SERVER_BANNER.len() {
            assert_eq!(
                c.bridge().outbound_len(),
                0,
                "sent something before the banner ended"
            );
        }
    }
    let out = c.take_out();
    assert!(out.len() > 5, "no KEXINIT after the banner");
    assert_eq!(out[5], MSG_KEXINIT, "byte 5 of the first packet");
    let payloads = unpack(&out);
    assert_eq!(payloads.len(), 1);
    assert_eq!(c.stats().packets_sent, 2, "banner + KEXINIT, one send each");
    // A well-formed KEXINIT with the ten name-lists.
    let lists = name_lists(&payloads[0]);
    assert!(!lists[0].is_empty() && !lists[2].is_empty(), "{lists:?}");
    c.free_and_check();
}

/// The server's banner and KEXINIT in pieces of random size (seeded), up to
/// three delivered between two calls (as ring recvs completing back to back
/// would), and one byte per call: libssh2 only ever says EAGAIN after asking
/// for input until it has the whole KEXINIT, then sends its first
/// key-exchange message.
#[test]
fn server_banner_and_kexinit_in_random_pieces_reach_kex_init() {
    let server_kexinit = packet(&kexinit(&agreeable(&client_name_lists())));
    let mut stream = SERVER_BANNER.to_vec();
    stream.extend_from_slice(&server_kexinit);
    // (seed, largest piece, most pieces per call).
    let cases = [
        (1, 1, 1),
        (7, 3, 3),
        (42, 16, 3),
        (0xdead_beef, 64, 3),
        (0x9e37_79b9_7f4a_7c15, 700, 3),
    ];
    for (seed, max_piece, max_pieces) in cases {
        let mut rng = XorShift::new(seed);
        let mut c = Client::new();
        c.start();
        let mut pos = 0;
        let mut out = Vec::new();
        while pos < stream.len() {
            for _ in 0..1 + rng.below(max_pieces) {
                let n = (1 + rng.below(max_piece)).min(stream.len() - pos);
                c.deliver(&stream[pos..pos + n]);
                pos += n;
            }
            let rc = c.handshake_until_blocked();
            assert_eq!(rc, EAGAIN, "seed {seed}, at {pos}: {}", c.last_error());
            assert!(c.bridge().wants_recv());
            assert_eq!(
                c.bridge().inbound_len(),
                0,
                "seed {seed}: bytes left unread"
            );
            let sent = c.take_out();
            if pos < SERVER_BANNER.len() {
                assert!(sent.is_empty(), "seed {seed}: sent before the banner ended");
            }
            out.extend_from_slice(&sent);
        }
        let payloads = unpack(&out);
        let types: Vec<u8> = payloads.iter().map(|p| p[0]).collect();
        assert_eq!(types, [MSG_KEXINIT, MSG_KEX_ECDH_INIT], "seed {seed}");
        assert_eq!(
            c.stats().packets_sent,
            3,
            "seed {seed}: one send per packet"
        );
        // Silent EAGAINs only while the server KEXINIT's 5-byte header was
        // incomplete: one per short piece of it, so four at one byte a call.
        assert!(
            c.silent_eagains <= 4,
            "seed {seed}: {} silent EAGAINs",
            c.silent_eagains
        );
        if max_piece == 1 && max_pieces == 1 {
            assert_eq!(c.silent_eagains, 4, "seed {seed}");
        }
        c.free_and_check();
    }
}

// ---------------------------------------------------------------------------
// 3. The server closes early
// ---------------------------------------------------------------------------

/// Calls the handshake until it stops saying EAGAIN (bounded); returns the
/// result. With the link closed or failed, nothing more arrives.
fn run_to_end(c: &mut Client) -> c_int {
    for _ in 0..20 {
        let rc = c.handshake();
        if rc != EAGAIN {
            return rc;
        }
    }
    panic!(
        "still EAGAIN after 20 calls on a link in state {:?}",
        c.bridge().link()
    );
}

#[test]
fn server_closes_after_its_banner() {
    // Banner and EOF arrive together (libssh2 reads the banner, then its
    // KEXINIT is refused: the bridge takes no sends after EOF), or EOF comes
    // once libssh2 read the banner and sent its KEXINIT.
    for (eof_with_banner, sends) in [(true, 1), (false, 2)] {
        let mut c = Client::new();
        c.start();
        c.deliver(SERVER_BANNER);
        if !eof_with_banner {
            assert_eq!(c.handshake_until_blocked(), EAGAIN, "{}", c.last_error());
        }
        c.bridge().set_peer_closed();
        let rc = run_to_end(&mut c);
        assert!(is_error(rc), "{rc}");
        assert!(
            [
                ffi::LIBSSH2_ERROR_KEX_FAILURE,
                ffi::LIBSSH2_ERROR_SOCKET_RECV
            ]
            .contains(&rc),
            "eof with banner {eof_with_banner}: {}",
            c.last_error()
        );
        // Later calls fail too; none says EAGAIN.
        for _ in 0..3 {
            assert!(is_error(c.handshake()));
        }
        assert_eq!(
            c.stats().packets_sent,
            sends,
            "eof with banner {eof_with_banner}"
        );
        c.free_and_check();
    }
}

#[test]
fn server_closes_before_or_inside_its_banner() {
    for banner_bytes in [0, 1, 8, SERVER_BANNER.len() - 1] {
        let mut c = Client::new();
        c.start();
        c.deliver(&SERVER_BANNER[..banner_bytes]);
        c.bridge().set_peer_closed();
        let rc = run_to_end(&mut c);
        assert_eq!(
            rc,
            ffi::LIBSSH2_ERROR_SOCKET_RECV,
            "{banner_bytes} bytes: {}",
            c.last_error()
        );
        assert_eq!(c.stats().packets_sent, 1, "only the client banner");
        c.free_and_check();
    }
}

// ---------------------------------------------------------------------------
// Before the server banner
// ---------------------------------------------------------------------------

/// RFC 4253 §4.2 lets a server send other lines before its version line;
/// libssh2 skips them with no limit on their number (only the session's
/// handshake timeout ends a peer that never sends `SSH-`).
#[test]
fn lines_before_the_server_banner_are_skipped_without_limit() {
    let mut c = Client::new();
    c.start();
    for i in 0..2000 {
        c.deliver(format!("not a banner, line {i}\r\n").as_bytes());
        let rc = c.handshake();
        assert_eq!(rc, EAGAIN, "line {i}: {}", c.last_error());
        assert!(c.bridge().wants_recv());
        // The same call read every byte delivered so far.
        assert_eq!(c.bridge().inbound_len(), 0);
    }
    assert_eq!(c.stats().packets_sent, 1, "nothing sent before a banner");
    c.deliver(SERVER_BANNER);
    assert_eq!(c.handshake_until_blocked(), EAGAIN, "{}", c.last_error());
    assert_eq!(unpack(&c.take_out())[0][0], MSG_KEXINIT);
    c.free_and_check();
}

#[test]
fn nul_in_the_server_banner_fails() {
    let mut c = Client::new();
    c.start();
    c.deliver(b"SSH-2.0-Fake\0Peer\r\n");
    let rc = c.handshake();
    assert_eq!(rc, ffi::LIBSSH2_ERROR_BANNER_RECV, "{}", c.last_error());
    assert_eq!(c.stats().packets_sent, 1);
    c.free_and_check();
}

// ---------------------------------------------------------------------------
// 4. Garbage after the banner
// ---------------------------------------------------------------------------

/// Feeds `next_piece()` after the server banner until the handshake fails;
/// asserts it fails within [`GARBAGE_CALLS`] calls, then frees the session.
fn feed_until_error(label: &str, mut next_piece: impl FnMut() -> Vec<u8>) -> c_int {
    let mut c = Client::new();
    c.start();
    c.deliver(SERVER_BANNER);
    loop {
        let rc = c.handshake_until_blocked();
        if rc != EAGAIN {
            assert!(is_error(rc), "{label}: handshake returned {rc}");
            c.free_and_check();
            return rc;
        }
        assert!(
            c.calls < GARBAGE_CALLS,
            "{label}: EAGAIN for {GARBAGE_CALLS} calls"
        );
        c.deliver(&next_piece());
    }
}

#[test]
fn huge_packet_length_after_banner_fails() {
    let mut sent = false;
    let rc = feed_until_error("0xFFFFFFFF", || {
        assert!(!sent, "libssh2 wants more after a 4 GiB packet length");
        sent = true;
        vec![0xff, 0xff, 0xff, 0xff, 0x04, 0, 0, 0]
    });
    assert_eq!(rc, ffi::LIBSSH2_ERROR_KEX_FAILURE);
}

#[test]
fn zero_packet_length_after_banner_fails() {
    let mut sent = false;
    let rc = feed_until_error("length 0", || {
        assert!(!sent, "libssh2 wants more after a zero packet length");
        sent = true;
        vec![0, 0, 0, 0, 0, 0, 0, 0]
    });
    assert_eq!(rc, ffi::LIBSSH2_ERROR_KEX_FAILURE);
}

#[test]
fn random_bytes_after_banner_fail() {
    for seed in [
        1,
        2,
        3,
        42,
        1234,
        0xdead_beef,
        0x9e37_79b9_7f4a_7c15,
        u64::MAX,
    ] {
        let mut rng = XorShift::new(seed);
        let rc = feed_until_error(&format!("random, seed {seed}"), || {
            let n = 1 + rng.below(64);
            rng.bytes(n)
        });
        assert!(is_error(rc));
    }
}

/// Packets with plausible lengths and random padding lengths, message types
/// and contents: deeper into libssh2's parser than random lengths get.
#[test]
fn random_packets_after_banner_fail() {
    for seed in [5, 6, 7, 8, 99, 31337, 0xfeed_f00d, 0x0123_4567_89ab_cdef] {
        let mut rng = XorShift::new(seed);
        let rc = feed_until_error(&format!("packets, seed {seed}"), || {
            let length = 1 + rng.below(300);
            let mut p = (length as u32).to_be_bytes().to_vec();
            p.extend(rng.bytes(length));
            p
        });
        assert!(is_error(rc));
    }
}

// ---------------------------------------------------------------------------
// 5 and 6. Teardown and socket failure mid-handshake
// ---------------------------------------------------------------------------

/// How far the handshake got when the link goes away.
#[derive(Debug, Clone, Copy)]
enum Stage {
    /// No libssh2 call yet.
    Fresh,
    /// Client banner sent, nothing received.
    BannerSent,
    /// Part of the server banner read.
    InsideServerBanner,
    /// Client KEXINIT sent, waiting for the server's.
    KexinitSent,
    /// The server KEXINIT delivered to the bridge, not read by libssh2 yet.
    ServerKexinitBuffered,
    /// Three bytes of the server KEXINIT read: less than a packet header.
    InsideServerKexinitHeader,
    /// Three bytes of the server KEXINIT delivered, not read yet.
    ServerKexinitHeaderBuffered,
    /// Client's first key-exchange message sent, waiting for the reply.
    KexReplyAwaited,
}

const STAGES: [Stage; 8] = [
    Stage::Fresh,
    Stage::BannerSent,
    Stage::InsideServerBanner,
    Stage::KexinitSent,
    Stage::ServerKexinitBuffered,
    Stage::InsideServerKexinitHeader,
    Stage::ServerKexinitHeaderBuffered,
    Stage::KexReplyAwaited,
];

/// A session driven to `stage`, everything it sent taken by the peer.
fn client_at(stage: Stage) -> Client {
    let mut c = Client::new();
    match stage {
        Stage::Fresh => {}
        Stage::BannerSent => {
            c.start();
        }
        Stage::InsideServerBanner => {
            c.start();
            c.deliver(&SERVER_BANNER[..6]);
            assert_eq!(c.handshake_until_blocked(), EAGAIN);
        }
        Stage::KexinitSent => {
            c.drive_to_kexinit();
        }
        Stage::ServerKexinitBuffered
        | Stage::InsideServerKexinitHeader
        | Stage::ServerKexinitHeaderBuffered => {
            let server = packet(&kexinit(&agreeable(&name_lists(&c.drive_to_kexinit()))));
            match stage {
                Stage::ServerKexinitBuffered => c.deliver(&server),
                Stage::ServerKexinitHeaderBuffered => c.deliver(&server[..3]),
                _ => {
                    c.deliver(&server[..3]);
                    assert_eq!(c.handshake_until_blocked(), EAGAIN);
                }
            }
        }
        Stage::KexReplyAwaited => {
            c.drive_to_kex_reply_wait();
        }
    }
    assert_eq!(c.bridge().outbound_len(), 0);
    c
}

#[test]
fn kill_mid_handshake_fails_the_next_call_and_frees() {
    for stage in STAGES {
        let mut c = client_at(stage);
        let before = c.stats();
        c.bridge().kill();
        for i in 0..3 {
            let rc = c.handshake();
            assert!(is_error(rc), "{stage:?}, call {i} after kill: {rc}");
        }
        assert_eq!(
            c.stats().packets_sent,
            before.packets_sent,
            "{stage:?}: a send was taken after kill"
        );
        assert_eq!(c.stats().bytes_sent, before.bytes_sent, "{stage:?}");
        assert_eq!(c.bridge().outbound_len(), 0, "{stage:?}");
        assert_eq!(c.bridge().link(), Link::Dead);
        c.free_and_check();
    }
}

#[test]
fn connection_reset_mid_handshake_fails_without_eagain() {
    // The errors libssh2 reports a failed recv or send as, directly or
    // folded into its key-exchange failure codes.
    let allowed = [
        ffi::LIBSSH2_ERROR_SOCKET_RECV,
        ffi::LIBSSH2_ERROR_SOCKET_SEND,
        ffi::LIBSSH2_ERROR_SOCKET_DISCONNECT,
        ffi::LIBSSH2_ERROR_KEX_FAILURE,
        ffi::LIBSSH2_ERROR_KEY_EXCHANGE_FAILURE,
    ];
    for stage in STAGES {
        let mut c = client_at(stage);
        let before = c.stats();
        c.bridge().set_failed(libc::ECONNRESET);
        let mut rc = c.handshake();
        if let Stage::ServerKexinitHeaderBuffered = stage {
            // The one EAGAIN: the bytes that arrived before the failure are
            // still handed over, and with less than a packet header libssh2
            // returns EAGAIN without asking again (`poll_call` turns EAGAIN
            // on a failed link into an error). The next call asks and fails.
            assert_eq!(rc, EAGAIN, "{stage:?}: {}", c.last_error());
            assert!(!c.bridge().wants_recv() && c.bridge().inbound_len() == 0);
            rc = c.handshake();
        }
        assert!(allowed.contains(&rc), "{stage:?}: {}", c.last_error());
        for _ in 0..3 {
            assert!(is_error(c.handshake()), "{stage:?}");
        }
        assert_eq!(
            c.stats().packets_sent,
            before.packets_sent,
            "{stage:?}: a send was taken after the failure"
        );
        assert_eq!(c.bridge().outbound_len(), 0);
        c.free_and_check();
    }
}

// ---------------------------------------------------------------------------
// 7. Allocator accounting
// ---------------------------------------------------------------------------

#[test]
fn session_allocations_are_counted_and_returned() {
    let c = Client::new();
    assert!(c.context.bytes_outstanding() > 0);
    assert!(c.context.blocks_outstanding() > 0);
    c.free_and_check();

    // And after a handshake got as far as key exchange (banners, both
    // KEXINITs, key-exchange state held by libssh2).
    let c = client_at(Stage::KexReplyAwaited);
    assert!(c.context.bytes_outstanding() > 0);
    c.free_and_check();
}

/// The process-wide counters, checked in a child process that runs only this
/// test: in this one, other tests allocate through libssh2 concurrently.
#[test]
fn process_wide_counters_return_to_their_baseline() {
    const CHILD: &str = "URING_SSH_FAKE_PEER_CHILD";
    let name = concat!(
        module_path!(),
        "::process_wide_counters_return_to_their_baseline"
    );
    // The test's path as libtest names it: without the crate.
    let name = name.split_once("::").map_or(name, |(_, rest)| rest);
    if std::env::var_os(CHILD).is_none() {
        let out = std::process::Command::new(std::env::current_exe().unwrap())
            .args([name, "--exact", "--test-threads=1", "--nocapture"])
            .env(CHILD, "1")
            .output()
            .expect("run the test binary");
        let stdout = String::from_utf8_lossy(&out.stdout);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "child failed:\n{stdout}\n{stderr}");
        assert!(
            stdout.contains("1 passed"),
            "child did not run the test:\n{stdout}"
        );
        return;
    }

    let bytes_before = crate::libssh2_bytes_outstanding();
    let blocks_before = crate::libssh2_blocks_outstanding();
    let c = client_at(Stage::KexReplyAwaited);
    assert_eq!(
        crate::libssh2_bytes_outstanding() - bytes_before,
        c.context.bytes_outstanding(),
        "the global counter moves with the session's"
    );
    assert_eq!(
        crate::libssh2_blocks_outstanding() - blocks_before,
        c.context.blocks_outstanding()
    );
    c.free_and_check();
    assert_eq!(crate::libssh2_bytes_outstanding(), bytes_before);
    assert_eq!(crate::libssh2_blocks_outstanding(), blocks_before);
}

// ---------------------------------------------------------------------------
// 8. Algorithm negotiation against a scripted server KEXINIT
// ---------------------------------------------------------------------------

/// The handshake's result once the server answers with `server` lists.
fn negotiate(server: &NameLists) -> (c_int, Vec<Vec<u8>>) {
    let mut c = Client::new();
    c.drive_to_kexinit();
    let sent_before = c.stats().packets_sent;
    c.deliver(&packet(&kexinit(server)));
    let rc = c.handshake_until_blocked();
    let after = unpack(&c.take_out());
    assert_eq!(c.stats().packets_sent - sent_before, after.len() as u64);
    if rc != EAGAIN {
        assert!(is_error(rc), "{rc}");
    }
    c.free_and_check();
    (rc, after)
}

#[test]
fn agreeable_server_kexinit_leads_to_key_exchange() {
    // The control for the failures below: the same scripted KEXINIT with
    // nothing removed is accepted.
    let (rc, after) = negotiate(&agreeable(&client_name_lists()));
    assert_eq!(rc, EAGAIN);
    assert_eq!(after.len(), 1);
    assert_eq!(after[0][0], MSG_KEX_ECDH_INIT);
}

#[test]
fn server_kexinit_without_a_common_algorithm_fails_the_kex() {
    let client = client_name_lists();
    let good = agreeable(&client);
    let none = "fake-algorithm@example.invalid".to_string();
    // (what is missing, list index)
    let cases = [
        ("key exchange", 0),
        ("host key", 1),
        ("cipher client to server", 2),
        ("cipher server to client", 3),
        ("compression client to server", 6),
        ("compression server to client", 7),
    ];
    for (what, index) in cases {
        let mut server = good.clone();
        server[index] = none.clone();
        let (rc, after) = negotiate(&server);
        assert_eq!(rc, ffi::LIBSSH2_ERROR_KEX_FAILURE, "no common {what}");
        // libssh2 gives up silently: not even a DISCONNECT.
        assert!(
            after.is_empty(),
            "no common {what}: libssh2 sent {:?}",
            after.iter().map(|p| p[0]).collect::<Vec<_>>()
        );
    }

    // No common MAC matters only with a cipher that has none built in.
    let plain_ciphers = |list: &str| {
        list.split(',')
            .filter(|c| !c.contains("gcm") && !c.contains("poly1305"))
            .collect::<Vec<_>>()
            .join(",")
    };
    let mut server = good.clone();
    server[2] = plain_ciphers(&good[2]);
    server[3] = plain_ciphers(&good[3]);
    assert!(
        !server[2].is_empty(),
        "no cipher without a built-in MAC: {:?}",
        good[2]
    );
    server[4] = none.clone();
    server[5] = none.clone();
    let (rc, _) = negotiate(&server);
    assert_eq!(rc, ffi::LIBSSH2_ERROR_KEX_FAILURE, "no common MAC");

    // The control: with AES-GCM, which carries its own MAC, a server without
    // a common MAC is fine (libssh2 does not negotiate one). Not so with
    // chacha20-poly1305: libssh2 1.11 has no MAC override for it
    // (`_libssh2_mac_override`, mac.c) and insists on a common MAC it will
    // not use, where OpenSSH ignores the MAC lists for both.
    let only = |list: &str, pattern: &str| {
        list.split(',')
            .filter(|c| c.contains(pattern))
            .collect::<Vec<_>>()
            .join(",")
    };
    let cases = [
        ("gcm", false, EAGAIN),
        ("chacha20-poly1305", false, ffi::LIBSSH2_ERROR_KEX_FAILURE),
        ("chacha20-poly1305", true, EAGAIN),
    ];
    for (pattern, common_mac, expected) in cases {
        let mut server = good.clone();
        server[2] = only(&good[2], pattern);
        server[3] = only(&good[3], pattern);
        assert!(
            !server[2].is_empty(),
            "no {pattern} cipher offered: {:?}",
            good[2]
        );
        if !common_mac {
            server[4] = none.clone();
            server[5] = none.clone();
        }
        let (rc, after) = negotiate(&server);
        assert_eq!(rc, expected, "{pattern}, common MAC: {common_mac}");
        if rc == EAGAIN {
            assert_eq!(after.len(), 1);
            assert_eq!(after[0][0], MSG_KEX_ECDH_INIT);
        }
    }
}

#[test]
fn malformed_server_kexinit_fails_the_kex() {
    let good = kexinit(&agreeable(&client_name_lists()));
    // Cut inside the cookie, inside the first name-list, before the
    // first_kex_packet_follows byte.
    for cut in [10, 25, good.len() - 5] {
        let (rc, after) = negotiate_raw(&good[..cut]);
        assert_eq!(rc, ffi::LIBSSH2_ERROR_KEX_FAILURE, "cut at {cut}");
        assert!(after.is_empty(), "cut at {cut}");
    }
    // A name-list whose length runs past the end of the packet.
    let mut long = good.clone();
    long[17..21].copy_from_slice(&u32::MAX.to_be_bytes());
    let (rc, _) = negotiate_raw(&long);
    assert_eq!(
        rc,
        ffi::LIBSSH2_ERROR_KEX_FAILURE,
        "name-list length 0xFFFFFFFF"
    );
}

/// As [`negotiate`], with a raw server KEXINIT payload.
fn negotiate_raw(payload: &[u8]) -> (c_int, Vec<Vec<u8>>) {
    let mut c = Client::new();
    c.drive_to_kexinit();
    c.deliver(&packet(payload));
    let rc = c.handshake_until_blocked();
    let after = unpack(&c.take_out());
    c.free_and_check();
    (rc, after)
}

/// Fuzzing entry: a server that sends a valid banner, then `data` in
/// pieces whose sizes come from `data` too; libssh2 must end the handshake
/// with an error or keep waiting for input, never spin, crash or leak.
#[cfg(fuzzing)]
pub(crate) fn fuzz_server_bytes(data: &[u8]) {
    let mut c = Client::new();
    c.start();
    c.deliver(SERVER_BANNER);
    let mut rest = data;
    let mut sizes = data.iter().copied().cycle();
    loop {
        let rc = c.handshake_until_blocked();
        c.take_out();
        if rc != EAGAIN {
            break;
        }
        if rest.is_empty() {
            // Out of input: the peer closes; libssh2 must then fail.
            c.bridge().set_peer_closed();
            c.handshake_until_blocked();
            break;
        }
        let n = (sizes.next().unwrap_or(1) as usize % 64 + 1).min(rest.len());
        c.deliver(&rest[..n]);
        rest = &rest[n..];
    }
    c.bridge().kill();
    let rc = c.free();
    assert_ne!(rc, EAGAIN, "free over a killed link said EAGAIN");
    assert_eq!(
        c.context.bytes_outstanding(),
        0,
        "libssh2 bytes left after free"
    );
    assert!(c.context.take_panic().is_none(), "a callback panicked");
}

/// Fuzzing entry: `data` read as a known_hosts file by libssh2 (line by
/// line, as `libssh2_knownhost_readfile` does), then a lookup; nothing may
/// crash, and every byte libssh2 allocated must be freed.
#[cfg(fuzzing)]
pub(crate) fn fuzz_known_hosts(data: &[u8]) {
    let mut c = Client::new();
    // SAFETY: `c.raw` is a live session used only by this thread; the
    // collection is freed before the session; every buffer outlives the
    // call that reads it.
    unsafe {
        let kh = ffi::libssh2_knownhost_init(c.raw);
        assert!(!kh.is_null());
        for line in data.split(|&b| b == b'\n') {
            ffi::libssh2_knownhost_readline(
                kh,
                line.as_ptr() as *const c_char,
                line.len(),
                ffi::LIBSSH2_KNOWNHOST_FILE_OPENSSH,
            );
        }
        let key = [
            0u8, 0, 0, 11, b's', b's', b'h', b'-', b'e', b'd', b'2', b'5', b'5', b'1', b'9',
        ];
        let mut entry = std::ptr::null_mut();
        ffi::libssh2_knownhost_checkp(
            kh,
            c"127.0.0.1".as_ptr(),
            2222,
            key.as_ptr() as *const c_char,
            key.len(),
            ffi::LIBSSH2_KNOWNHOST_TYPE_PLAIN | ffi::LIBSSH2_KNOWNHOST_KEYENC_RAW,
            &mut entry,
        );
        ffi::libssh2_knownhost_free(kh);
    }
    c.bridge().kill();
    assert_ne!(c.free(), EAGAIN);
    assert_eq!(c.context.bytes_outstanding(), 0, "libssh2 bytes left");
}
