//! The C side of the bridge: libssh2's allocator and IO callbacks, and the
//! creation of a libssh2 session wired to them.
//!
//! Every callback receives `abstract`, a pointer to the session's abstract
//! pointer, which points at the session's [`CallbackContext`]. No panic may unwind
//! through these functions: each body runs under `catch_unwind`.

use std::cell::{Cell, RefCell};
use std::os::raw::{c_char, c_int, c_uint, c_void};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::OnceLock;

use super::alloc::{BlockAllocator, alloc_cb, free_cb, realloc_cb};
use super::bridge::Bridge;
use super::kexinit::Sniffer;
use crate::ffi;

thread_local! {
    /// Packets libssh2 handed this thread's send callback on a torn-down
    /// link (refused).
    static SENDS_ON_DEAD_LINKS: Cell<u64> = const { Cell::new(0) };
}

/// Packets libssh2 built and handed to the send callback of a session on
/// this thread after its teardown began (each refused). Freeing a session
/// marks it disconnected first, so this stays 0: libssh2 then skips the
/// EOF and CLOSE it would otherwise build, encrypt and fail to send for
/// every open channel.
pub fn sends_on_dead_links() -> u64 {
    SENDS_ON_DEAD_LINKS.with(Cell::get)
}

/// Answers keyboard-interactive prompts: `(name, instruction, prompts)` →
/// one response per prompt. A prompt is its text and whether to echo it.
pub type KbdResponder<'a> = dyn FnMut(&str, &str, &[(String, bool)]) -> Vec<String> + 'a;

/// What libssh2's abstract pointer points at: one per session.
pub struct CallbackContext {
    /// The byte queues and link state.
    pub bridge: Bridge,
    /// libssh2's memory for this session.
    pub(crate) alloc: BlockAllocator,
    /// The responder of a keyboard-interactive call in progress. Only set
    /// while that call runs (borrowed, lifetime erased).
    pub(crate) kbd: RefCell<Option<*mut KbdResponder<'static>>>,
    /// How long an agent request may wait for the agent (`None`: no limit).
    pub(crate) agent_timeout: Cell<Option<std::time::Duration>>,
    /// A panic caught in a callback (which then returned an error), to be
    /// resumed once the libssh2 call that ran the callback has returned.
    panic: RefCell<Option<Box<dyn std::any::Any + Send>>>,
    /// Our KEXINIT, read off the bytes libssh2 sends.
    pub(crate) sent_offer: RefCell<Sniffer>,
    /// The server's KEXINIT, read off the bytes handed to libssh2.
    pub(crate) received_offer: RefCell<Sniffer>,
    /// The server's SSH_MSG_DISCONNECT: reason code and description.
    pub(crate) disconnect: RefCell<Option<(u32, String)>>,
}

impl std::fmt::Debug for CallbackContext {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CallbackContext")
            .field("bridge", &self.bridge)
            .field("alloc", &self.alloc)
            .finish()
    }
}

impl Default for CallbackContext {
    fn default() -> Self {
        Self::new()
    }
}

impl CallbackContext {
    /// Bytes handed to libssh2 (copied or lent): the server's KEXINIT is
    /// read off them while it is wanted.
    fn note_received(&self, bytes: &[u8]) {
        let mut offer = self.received_offer.borrow_mut();
        if offer.wants() {
            offer.feed(bytes);
        }
    }

    /// A fresh bridge and zeroed counters.
    pub fn new() -> Self {
        CallbackContext {
            bridge: Bridge::new(),
            alloc: BlockAllocator::default(),
            kbd: RefCell::new(None),
            panic: RefCell::new(None),
            agent_timeout: Cell::new(None),
            sent_offer: RefCell::new(Sniffer::default()),
            received_offer: RefCell::new(Sniffer::default()),
            disconnect: RefCell::new(None),
        }
    }

    /// Bytes libssh2 holds for this session.
    pub fn bytes_outstanding(&self) -> i64 {
        self.alloc.bytes_outstanding()
    }

    /// Blocks libssh2 holds for this session.
    pub fn blocks_outstanding(&self) -> i64 {
        self.alloc.blocks_outstanding()
    }

    /// Takes the panic a callback caught, if any (resume it with
    /// `std::panic::resume_unwind` outside the libssh2 call).
    pub fn take_panic(&self) -> Option<Box<dyn std::any::Any + Send>> {
        self.panic.borrow_mut().take()
    }
}

/// # Safety
/// `abstract_` must be a libssh2 abstract pointer to a live `CallbackContext`.
pub(super) unsafe fn context<'a>(abstract_: *mut *mut c_void) -> Option<&'a CallbackContext> {
    // SAFETY: per the contract, `*abstract_` is our `CallbackContext` (set at
    // `libssh2_session_init_ex`) and outlives the libssh2 session.
    unsafe {
        if abstract_.is_null() || (*abstract_).is_null() {
            return None;
        }
        Some(&*(*abstract_ as *const CallbackContext))
    }
}

unsafe extern "C" fn send_cb(
    fd: ffi::libssh2_socket_t,
    buf: *const c_void,
    len: usize,
    flags: c_int,
    abstract_: *mut *mut c_void,
) -> isize {
    if fd != dummy_fd() {
        // libssh2's agent code talks to the agent's unix socket through the
        // session's send callback: a blocking local socket of its own,
        // bounded by the session's timeout.
        // SAFETY: libssh2 passes its own fd and a buffer of `len` bytes.
        return agent_io(fd, libc::POLLOUT, abstract_, || unsafe {
            libc::send(fd, buf, len, flags)
        });
    }
    catch_unwind(AssertUnwindSafe(|| {
        // SAFETY: libssh2 passes our abstract pointer and a buffer of `len`
        // readable bytes that lives for this call.
        let (s, data) = unsafe {
            let Some(s) = context(abstract_) else {
                return -(libc::EBADF as isize);
            };
            (s, std::slice::from_raw_parts(buf as *const u8, len))
        };
        if s.bridge.link() == super::bridge::Link::Dead {
            SENDS_ON_DEAD_LINKS.with(|c| c.set(c.get() + 1));
        }
        let mut offer = s.sent_offer.borrow_mut();
        if offer.wants() {
            offer.feed(data);
        }
        if s.bridge.take_in_place(buf as *const u8, len) {
            // SAFETY: libssh2 built these `len` bytes in the outbound
            // queue's spare room that `send_buffer_cb` handed out for this
            // packet (patch 0014); `take_in_place` checked that they start
            // where that room did, fit in it, and that the room is still
            // the queue's spare capacity (nothing was queued since).
            return s
                .bridge
                .on_send_with(len, |out| unsafe { out.set_len(out.len() + len) });
        }
        s.bridge.on_send(data)
    }))
    .unwrap_or_else(|p| panicked(abstract_, p))
}

/// Where libssh2 builds its next packet (patch 0014): the spare room of
/// the session's outbound queue, so that `send_cb` queues the packet
/// without copying it. Null (libssh2's own buffer) when the link is not
/// open or the session is unknown.
unsafe extern "C" fn send_buffer_cb(
    _session: *mut ffi::LIBSSH2_SESSION,
    size: usize,
    abstract_: *mut *mut c_void,
) -> *mut u8 {
    catch_unwind(AssertUnwindSafe(|| {
        // SAFETY: libssh2 passes the session's abstract pointer, ours.
        let Some(s) = (unsafe { context(abstract_) }) else {
            return std::ptr::null_mut();
        };
        s.bridge.send_buffer(size).unwrap_or(std::ptr::null_mut())
    }))
    .unwrap_or_else(|p| {
        // Recorded like any callback's panic (the session fails); libssh2
        // falls back to its own buffer for this packet.
        panicked(abstract_, p);
        std::ptr::null_mut()
    })
}

/// Lends libssh2 the next received bytes where they lie (our patch 0016):
/// libssh2 decrypts from the ring's receive buffer instead of from a copy.
unsafe extern "C" fn recv_buffer_cb(
    _session: *mut ffi::LIBSSH2_SESSION,
    data: *mut *mut u8,
    abstract_: *mut *mut c_void,
) -> isize {
    catch_unwind(AssertUnwindSafe(|| {
        // SAFETY: libssh2 passes the session's abstract pointer, ours.
        let Some(s) = (unsafe { context(abstract_) }) else {
            return -(libc::EBADF as isize);
        };
        match s.bridge.lend() {
            Ok((at, n)) => {
                // SAFETY: `lend` returned `n` initialized bytes at `at`,
                // kept by the bridge until libssh2 asks again.
                s.note_received(unsafe { std::slice::from_raw_parts(at, n) });
                // SAFETY: libssh2 passes a pointer to write the address to.
                unsafe { *data = at };
                n as isize
            }
            Err(e) => e,
        }
    }))
    .unwrap_or_else(|p| panicked(abstract_, p))
}

unsafe extern "C" fn recv_cb(
    fd: ffi::libssh2_socket_t,
    buf: *mut c_void,
    len: usize,
    flags: c_int,
    abstract_: *mut *mut c_void,
) -> isize {
    if fd != dummy_fd() {
        // The agent's socket (see `send_cb`).
        // SAFETY: libssh2 passes its own fd and a buffer of `len` writable bytes.
        return agent_io(fd, libc::POLLIN, abstract_, || unsafe {
            libc::recv(fd, buf, len, flags)
        });
    }
    catch_unwind(AssertUnwindSafe(|| {
        // SAFETY: libssh2 passes our abstract pointer and a buffer of `len`
        // writable bytes that lives for this call.
        let (s, out) = unsafe {
            let Some(s) = context(abstract_) else {
                return -(libc::EBADF as isize);
            };
            (s, std::slice::from_raw_parts_mut(buf as *mut u8, len))
        };
        let n = s.bridge.on_recv(out);
        if n > 0 {
            s.note_received(&out[..n as usize]);
        }
        n
    }))
    .unwrap_or_else(|p| panicked(abstract_, p))
}

/// One send or recv on the agent's socket, after waiting (at most the
/// session's timeout) until it is ready: an agent that waits for a user's
/// confirmation must not hold the thread forever.
fn agent_io(
    fd: c_int,
    events: libc::c_short,
    abstract_: *mut *mut c_void,
    io: impl FnOnce() -> isize,
) -> isize {
    // SAFETY: the pointer libssh2 gave the callback.
    let timeout = unsafe { context(abstract_) }
        .and_then(|s| s.agent_timeout.get())
        .map_or(-1, |t| t.as_millis().min(i32::MAX as u128) as c_int);
    let mut pfd = libc::pollfd {
        fd,
        events,
        revents: 0,
    };
    // SAFETY: one valid pollfd.
    match unsafe { libc::poll(&mut pfd, 1, timeout) } {
        0 => -(libc::ETIMEDOUT as isize),
        n if n < 0 => os_result(-1),
        _ => os_result(io()),
    }
}

/// A send/recv return value in the callbacks' convention (-errno on error).
fn os_result(n: isize) -> isize {
    if n < 0 {
        -(std::io::Error::last_os_error()
            .raw_os_error()
            .unwrap_or(libc::EIO) as isize)
    } else {
        n
    }
}

/// After a caught panic: kill the link so the session fails cleanly, and
/// keep the panic for the caller of libssh2.
fn panicked(abstract_: *mut *mut c_void, payload: Box<dyn std::any::Any + Send>) -> isize {
    // SAFETY: same pointer the callback was given.
    if let Some(s) = unsafe { context(abstract_) } {
        s.panic.borrow_mut().get_or_insert(payload);
        s.bridge.kill();
    }
    -(libc::ECONNABORTED as isize)
}

/// libssh2's keyboard-interactive callback: asks the responder stored in
/// `CallbackContext::kbd` and hands libssh2 answers allocated with its allocator.
pub(crate) extern "C" fn kbd_cb(
    name: *const c_char,
    name_len: c_int,
    instruction: *const c_char,
    instruction_len: c_int,
    num_prompts: c_int,
    prompts: *const ffi::LIBSSH2_USERAUTH_KBDINT_PROMPT,
    responses: *mut ffi::LIBSSH2_USERAUTH_KBDINT_RESPONSE,
    abstract_: *mut *mut c_void,
) {
    let caught = catch_unwind(AssertUnwindSafe(|| {
        // SAFETY: libssh2 passes valid (pointer, length) pairs for the name,
        // instruction and `num_prompts` prompts, and `num_prompts` writable
        // responses; the responder pointer is valid while the auth call runs.
        unsafe {
            let Some(s) = context(abstract_) else { return };
            let text = |p: *const c_char, n: c_int| -> String {
                if p.is_null() || n <= 0 {
                    String::new()
                } else {
                    String::from_utf8_lossy(std::slice::from_raw_parts(p as *const u8, n as usize))
                        .into_owned()
                }
            };
            let name = text(name, name_len);
            let instruction = text(instruction, instruction_len);
            let n = num_prompts.max(0) as usize;
            let asked: Vec<(String, bool)> = (0..n)
                .map(|i| {
                    let p = &*prompts.add(i);
                    (
                        text(p.text as *const c_char, p.length as c_int),
                        p.echo != 0,
                    )
                })
                .collect();
            let Some(responder) = *s.kbd.borrow() else {
                return;
            };
            // Wiped when dropped: the answers may be passwords.
            let answers = zeroize::Zeroizing::new((*responder)(&name, &instruction, &asked));
            for i in 0..n {
                let r = &mut *responses.add(i);
                let answer = answers.get(i).map(|a| a.as_bytes()).unwrap_or(b"");
                r.text = s.alloc.copy_in(answer);
                r.length = if r.text.is_null() {
                    0
                } else {
                    answer.len() as c_uint
                };
            }
        }
    }));
    if let Err(payload) = caught {
        // The answers stay unset: libssh2 sends empty ones, and the caller
        // re-raises the responder's panic once libssh2 has returned.
        // SAFETY: same pointer the callback was given.
        if let Some(s) = unsafe { context(abstract_) } {
            s.panic.borrow_mut().get_or_insert(payload);
        }
    }
}

/// A process-wide non-blocking eventfd handed to every libssh2 session as
/// its "socket". libssh2 only inspects its flags; the real socket is never
/// shown to it.
pub(crate) fn dummy_fd() -> c_int {
    static FD: OnceLock<c_int> = OnceLock::new();
    *FD.get_or_init(|| {
        // SAFETY: plain syscall; the fd lives for the whole process.
        unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) }
    })
}

/// A libssh2 session allocating through `shared`'s counters and doing its IO
/// through `shared`'s bridge, in non-blocking mode.
///
/// # Safety
/// `shared` must outlive the returned session (until `libssh2_session_free`
/// has returned).
pub(crate) unsafe fn new_session(shared: *const CallbackContext) -> *mut ffi::LIBSSH2_SESSION {
    ffi::init();
    crate::mlkem::register();
    #[cfg(feature = "aws-lc")]
    crate::aes_gcm::register();
    // SAFETY: the allocator functions honour libssh2's contract; `shared`
    // outlives the session per this function's contract.
    unsafe {
        // The session's ~81 KB block comes from fresh zero pages that
        // libssh2 does not clear again (patch 0010): an idle session keeps
        // only the pages it wrote.
        (*shared).alloc.map_next(true);
        let raw = ffi::libssh2_session_init_zeroed_ex(
            Some(alloc_cb),
            Some(free_cb),
            Some(realloc_cb),
            shared as *mut c_void,
        );
        (*shared).alloc.map_next(false);
        if raw.is_null() {
            return raw;
        }
        ffi::libssh2_session_callback_set2(
            raw,
            ffi::LIBSSH2_CALLBACK_SEND,
            send_cb as ffi::SendCallback as *mut c_void,
        );
        ffi::libssh2_session_callback_set2(
            raw,
            ffi::LIBSSH2_CALLBACK_RECV,
            recv_cb as ffi::RecvCallback as *mut c_void,
        );
        ffi::libssh2_session_callback_set2(
            raw,
            ffi::LIBSSH2_CALLBACK_SEND_BUFFER,
            send_buffer_cb as ffi::SendBufferCallback as *mut c_void,
        );
        ffi::libssh2_session_callback_set2(
            raw,
            ffi::LIBSSH2_CALLBACK_RECV_BUFFER,
            recv_buffer_cb as ffi::RecvBufferCallback as *mut c_void,
        );
        ffi::libssh2_session_callback_set2(
            raw,
            LIBSSH2_CALLBACK_DISCONNECT,
            disconnect_cb as DisconnectCallback as *mut c_void,
        );
        ffi::libssh2_session_set_blocking(raw, 0);
        raw
    }
}

/// `cbtype` of libssh2's SSH_MSG_DISCONNECT callback.
const LIBSSH2_CALLBACK_DISCONNECT: c_int = 2;

/// `LIBSSH2_DISCONNECT_FUNC`.
type DisconnectCallback = unsafe extern "C" fn(
    *mut ffi::LIBSSH2_SESSION,
    c_int,
    *const c_char,
    c_int,
    *const c_char,
    c_int,
    *mut *mut c_void,
);

/// Keeps the server's disconnect reason and description (sanitised and
/// bounded: it is the server's text) for the error the caller gets next.
unsafe extern "C" fn disconnect_cb(
    _session: *mut ffi::LIBSSH2_SESSION,
    reason: c_int,
    message: *const c_char,
    message_len: c_int,
    _language: *const c_char,
    _language_len: c_int,
    abstract_: *mut *mut c_void,
) {
    let _ = catch_unwind(AssertUnwindSafe(|| {
        // SAFETY: libssh2 passes our abstract pointer, and `message` (when
        // not null) points at `message_len` bytes of the packet it is
        // handling, alive for this call.
        let (s, text) = unsafe {
            let Some(s) = context(abstract_) else { return };
            let text = if message.is_null() || message_len <= 0 {
                &[][..]
            } else {
                std::slice::from_raw_parts(message as *const u8, message_len as usize)
            };
            (s, text)
        };
        s.disconnect
            .borrow_mut()
            .get_or_insert((reason as u32, crate::session::remote_text(text)));
    }));
}

#[cfg(test)]
mod session_block_tests {
    use super::*;
    use crate::transport::alloc::{HEADER, MAPPED};

    /// Pages of `len` bytes at `base` that are resident (`mincore`).
    fn resident_pages(base: *mut c_void, len: usize) -> usize {
        let page = 4096;
        let mut vec = vec![0u8; len.div_ceil(page)];
        // SAFETY: `base` is the page-aligned start of a live mapping of
        // `len` bytes; `vec` has one byte per page.
        let rc = unsafe { libc::mincore(base, len, vec.as_mut_ptr()) };
        assert_eq!(rc, 0, "mincore: {}", std::io::Error::last_os_error());
        vec.iter().filter(|&&b| b & 1 == 1).count()
    }

    /// The session's own block is a mapping of fresh pages that libssh2 does
    /// not clear (patch 0010): a new session has only the pages its
    /// initialisation wrote resident, not its ~81 KB, and freeing the
    /// session leaves nothing outstanding (the block is kept for the
    /// thread's next session, or unmapped).
    #[test]
    fn a_new_session_block_is_mapped_and_mostly_untouched() {
        let shared = Box::new(CallbackContext::new());
        // SAFETY: `shared` outlives the session (freed below).
        let raw = unsafe { new_session(&*shared) };
        assert!(!raw.is_null());
        // SAFETY: the session pointer is the block's data; its header
        // precedes it (see `alloc_mapped`).
        let (size, capacity) = unsafe {
            let base = (raw as *mut u8).sub(HEADER) as *mut usize;
            (*base, *base.add(1))
        };
        assert_ne!(capacity & MAPPED, 0, "the session block is a mapping");
        let len = capacity & !MAPPED;
        assert!(size > 70_000, "LIBSSH2_SESSION is {size} bytes");
        // SAFETY: as above.
        let base = unsafe { (raw as *mut u8).sub(HEADER) } as *mut c_void;
        let resident = resident_pages(base, len);
        let pages = len.div_ceil(4096);
        assert!(
            resident * 4 <= pages,
            "{resident} of {pages} pages resident after init: the block was cleared"
        );
        // SAFETY: a session made by `new_session`, freed once.
        unsafe { ffi::libssh2_session_free(raw) };
        assert_eq!(
            (shared.blocks_outstanding(), shared.bytes_outstanding()),
            (0, 0)
        );
    }
}
