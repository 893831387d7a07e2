//! The C side of the bridge: libssh2's allocator and IO callbacks, and the
//! creation of a libssh2 session wired to them.
//!
//! Every callback receives `abstract`, a pointer to the session's abstract
//! pointer, which points at the session's [`Shared`]. No panic may unwind
//! through these functions: each body runs under `catch_unwind`.

use std::cell::{Cell, RefCell};
use std::os::raw::{c_char, c_int, c_uint, c_void};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicI64, Ordering};

use super::bridge::Bridge;
use super::kexinit::Sniffer;
use crate::ffi;

/// Bytes and blocks libssh2 holds right now, over all sessions.
static GLOBAL_BYTES: AtomicI64 = AtomicI64::new(0);
static GLOBAL_BLOCKS: AtomicI64 = AtomicI64::new(0);

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

/// Bytes libssh2 has allocated through our allocator and not freed, over all
/// sessions of the process.
pub fn libssh2_bytes_outstanding() -> i64 {
    GLOBAL_BYTES.load(Ordering::Relaxed)
}

/// Blocks libssh2 has allocated through our allocator and not freed, over all
/// sessions of the process.
pub fn libssh2_blocks_outstanding() -> i64 {
    GLOBAL_BLOCKS.load(Ordering::Relaxed)
}

/// Answers keyboard-interactive prompts: `(name, instruction, prompts)` →
/// one response per prompt. A prompt is its text and whether to echo it.
pub type KbdResponder<'a> = dyn FnMut(&str, &str, &[(String, bool)]) -> Vec<String> + 'a;

/// What libssh2's abstract pointer points at: one per session.
pub struct Shared {
    /// The byte queues and link state.
    pub bridge: Bridge,
    bytes: Cell<i64>,
    blocks: Cell<i64>,
    /// The responder of a keyboard-interactive call in progress. Only set
    /// while that call runs (borrowed, lifetime erased).
    pub(crate) kbd: RefCell<Option<*mut KbdResponder<'static>>>,
    /// How long an agent request may wait for the agent (`None`: no limit).
    pub(crate) agent_timeout: Cell<Option<std::time::Duration>>,
    /// A panic caught in a callback (which then returned an error), to be
    /// resumed once the libssh2 call that ran the callback has returned.
    panic: RefCell<Option<Box<dyn std::any::Any + Send>>>,
    /// Packet-sized blocks libssh2 freed, kept for its next packets.
    cache: RefCell<Vec<*mut usize>>,
    /// The next block is the session itself: map it as fresh zero pages.
    map_next: Cell<bool>,
    /// Our KEXINIT, read off the bytes libssh2 sends.
    pub(crate) sent_offer: RefCell<Sniffer>,
    /// The server's KEXINIT, read off the bytes handed to libssh2.
    pub(crate) received_offer: RefCell<Sniffer>,
    /// The server's SSH_MSG_DISCONNECT: reason code and description.
    pub(crate) disconnect: RefCell<Option<(u32, String)>>,
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared")
            .field("bridge", &self.bridge)
            .field("bytes", &self.bytes.get())
            .field("blocks", &self.blocks.get())
            .finish()
    }
}

impl Default for Shared {
    fn default() -> Self {
        Self::new()
    }
}

impl Shared {
    /// A fresh bridge and zeroed counters.
    pub fn new() -> Self {
        Shared {
            bridge: Bridge::new(),
            bytes: Cell::new(0),
            blocks: Cell::new(0),
            kbd: RefCell::new(None),
            panic: RefCell::new(None),
            agent_timeout: Cell::new(None),
            cache: RefCell::new(Vec::new()),
            map_next: Cell::new(false),
            sent_offer: RefCell::new(Sniffer::default()),
            received_offer: RefCell::new(Sniffer::default()),
            disconnect: RefCell::new(None),
        }
    }

    /// Blocks kept in this session's cache and their bytes.
    pub fn cached(&self) -> (usize, usize) {
        let cache = self.cache.borrow();
        // SAFETY: cached blocks are live allocations whose header holds
        // their capacity (set by `alloc`).
        let bytes = cache.iter().map(|&b| unsafe { *b.add(1) }).sum();
        (cache.len(), bytes)
    }

    /// Takes the panic a callback caught, if any (resume it with
    /// `std::panic::resume_unwind` outside the libssh2 call).
    pub fn take_panic(&self) -> Option<Box<dyn std::any::Any + Send>> {
        self.panic.borrow_mut().take()
    }

    /// Bytes libssh2 holds for this session.
    pub fn bytes_outstanding(&self) -> i64 {
        self.bytes.get()
    }

    /// Blocks libssh2 holds for this session.
    pub fn blocks_outstanding(&self) -> i64 {
        self.blocks.get()
    }

    fn account(&self, bytes: i64, blocks: i64) {
        self.bytes.set(self.bytes.get() + bytes);
        self.blocks.set(self.blocks.get() + blocks);
        GLOBAL_BYTES.fetch_add(bytes, Ordering::Relaxed);
        GLOBAL_BLOCKS.fetch_add(blocks, Ordering::Relaxed);
    }

    /// Copies `data` (plus a NUL) into a block from this session's allocator,
    /// for strings libssh2 will free itself (keyboard-interactive answers).
    pub(crate) fn alloc_copy(&self, data: &[u8]) -> *mut c_char {
        let p = self.alloc(data.len() + 1) as *mut u8;
        if !p.is_null() {
            // SAFETY: `p` points at `data.len() + 1` writable bytes just allocated.
            unsafe {
                std::ptr::copy_nonoverlapping(data.as_ptr(), p, data.len());
                *p.add(data.len()) = 0;
            }
        }
        p as *mut c_char
    }

    fn alloc(&self, size: usize) -> *mut c_void {
        if self.map_next.replace(false) {
            return self.alloc_mapped(size);
        }
        let capacity = block_capacity(size);
        let base = match self.take_cached(capacity) {
            Some(base) => base,
            None => {
                let Some(total) = capacity.checked_add(HEADER) else {
                    return std::ptr::null_mut();
                };
                // SAFETY: plain malloc; the result is checked for null.
                let base = unsafe { libc::malloc(total) } as *mut usize;
                if base.is_null() {
                    return std::ptr::null_mut();
                }
                base
            }
        };
        // SAFETY: `base` points at HEADER + `capacity` bytes: the header
        // records the size libssh2 asked for (for accounting) and the
        // capacity (for the cache).
        unsafe {
            *base = size;
            *base.add(1) = capacity;
            self.account(size as i64, 1);
            (base as *mut u8).add(HEADER) as *mut c_void
        }
    }

    /// A block of fresh anonymous pages: zero, and resident only once
    /// written. Its capacity field holds the mapping's length with
    /// [`MAPPED`] set.
    fn alloc_mapped(&self, size: usize) -> *mut c_void {
        let Some(total) = size.checked_add(HEADER) else {
            return std::ptr::null_mut();
        };
        // SAFETY: an anonymous private mapping; the result is checked.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                total,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if base == libc::MAP_FAILED {
            return std::ptr::null_mut();
        }
        let base = base as *mut usize;
        // SAFETY: the mapping holds HEADER + `size` bytes.
        unsafe {
            *base = size;
            *base.add(1) = total | MAPPED;
            self.account(size as i64, 1);
            (base as *mut u8).add(HEADER) as *mut c_void
        }
    }

    fn take_cached(&self, capacity: usize) -> Option<*mut usize> {
        if !(CACHE_MIN..=CACHE_MAX).contains(&capacity) {
            return None;
        }
        let mut cache = self.cache.borrow_mut();
        // SAFETY: cached blocks are live allocations with a valid header.
        let at = cache
            .iter()
            .position(|&b| unsafe { *b.add(1) } == capacity)?;
        THREAD_CACHED.with(|c| c.set(c.get() - capacity));
        Some(cache.swap_remove(at))
    }

    /// Frees a block libssh2 let go of, or keeps it for the next packet.
    ///
    /// # Safety
    /// `base` is the start of a live block made by `alloc`/`realloc_cb`.
    unsafe fn release(&self, base: *mut usize) {
        // SAFETY: per the contract, the header is valid.
        let capacity = unsafe { *base.add(1) };
        if (CACHE_MIN..=CACHE_MAX).contains(&capacity) {
            let mut cache = self.cache.borrow_mut();
            let kept: usize = cache.len() * CACHE_MAX;
            let fits = kept + capacity <= CACHE_SESSION_BYTES
                && THREAD_CACHED.with(|c| c.get()) + capacity <= CACHE_THREAD_BYTES;
            if fits {
                THREAD_CACHED.with(|c| c.set(c.get() + capacity));
                cache.push(base);
                return;
            }
        }
        // SAFETY: per the contract, `base` is a live block of ours.
        unsafe { free_block(base) };
    }
}

/// Hands a block back to the system: unmaps a mapping of its own
/// ([`MAPPED`]), frees a malloc'd one.
///
/// # Safety
/// `base` is the start of a live block made by `alloc`/`alloc_mapped`/
/// `realloc_cb`, not used afterwards.
unsafe fn free_block(base: *mut usize) {
    // SAFETY: per the contract, the header is valid; a mapped block's
    // mapping starts at `base` and is as long as its capacity without the
    // flag, any other block came from malloc/realloc.
    unsafe {
        let capacity = *base.add(1);
        if capacity & MAPPED != 0 {
            libc::munmap(base as *mut c_void, capacity & !MAPPED);
        } else {
            libc::free(base as *mut c_void);
        }
    }
}

impl Drop for Shared {
    fn drop(&mut self) {
        for base in self.cache.get_mut().drain(..) {
            // SAFETY: cached blocks are live allocations owned by the cache.
            unsafe {
                THREAD_CACHED.with(|c| c.set(c.get() - *base.add(1)));
                libc::free(base as *mut c_void);
            }
        }
    }
}

/// Blocks of this many bytes (after rounding) are cached: libssh2 allocates
/// and frees one per packet (up to 35,000 bytes plus headers), and handing
/// them back to malloc made glibc trim and regrow the heap top every few
/// packets: a page fault for every 4 KiB received.
const CACHE_MIN: usize = 4 * 1024;
const CACHE_MAX: usize = 64 * 1024;
/// Bytes of cached blocks per session (each counted as CACHE_MAX: at most
/// 16 blocks) and per thread.
const CACHE_SESSION_BYTES: usize = 16 * CACHE_MAX;
const CACHE_THREAD_BYTES: usize = 64 * 1024 * 1024;

thread_local! {
    /// Bytes in the caches of this thread's sessions.
    static THREAD_CACHED: Cell<usize> = const { Cell::new(0) };
}

/// The capacity of a block for `size` bytes: packet-sized blocks are
/// rounded up to 4 KiB so that the cache serves packets of similar size.
fn block_capacity(size: usize) -> usize {
    if (CACHE_MIN..=CACHE_MAX).contains(&size) {
        size.div_ceil(4096) * 4096
    } else {
        size
    }
}

/// Bytes in front of each block (the size asked for, then the capacity),
/// keeping malloc's 16-byte alignment.
const HEADER: usize = 16;

/// Set in a block's capacity field when the block is a mapping of its own
/// (the session: see [`new_session`]).
const MAPPED: usize = 1 << (usize::BITS - 1);

/// # Safety
/// `abstract_` must be a libssh2 abstract pointer to a live `Shared`.
unsafe fn shared<'a>(abstract_: *mut *mut c_void) -> Option<&'a Shared> {
    // SAFETY: per the contract, `*abstract_` is our `Shared` (set at
    // `libssh2_session_init_ex`) and outlives the libssh2 session.
    unsafe {
        if abstract_.is_null() || (*abstract_).is_null() {
            return None;
        }
        Some(&*(*abstract_ as *const Shared))
    }
}

extern "C" fn alloc_cb(size: libc::size_t, abstract_: *mut *mut c_void) -> *mut c_void {
    catch_unwind(|| {
        // SAFETY: libssh2 passes the abstract pointer we gave it.
        match unsafe { shared(abstract_) } {
            Some(s) => s.alloc(size),
            None => std::ptr::null_mut(),
        }
    })
    .unwrap_or(std::ptr::null_mut())
}

extern "C" fn free_cb(ptr: *mut c_void, abstract_: *mut *mut c_void) {
    let _ = catch_unwind(|| {
        if ptr.is_null() {
            return;
        }
        // SAFETY: `ptr` came from `alloc_cb`/`realloc_cb`, so a header with
        // its size precedes it; libssh2 frees each block once.
        unsafe {
            let base = (ptr as *mut u8).sub(HEADER) as *mut usize;
            let size = *base;
            match shared(abstract_) {
                Some(s) => {
                    s.account(-(size as i64), -1);
                    s.release(base);
                }
                None => free_block(base),
            }
        }
    });
}

extern "C" fn realloc_cb(
    ptr: *mut c_void,
    size: libc::size_t,
    abstract_: *mut *mut c_void,
) -> *mut c_void {
    catch_unwind(|| {
        // SAFETY: as in `free_cb` for the old block; the new block gets a
        // fresh header. On failure the old block stays valid, as realloc promises.
        unsafe {
            let Some(s) = shared(abstract_) else {
                return std::ptr::null_mut();
            };
            if ptr.is_null() {
                return s.alloc(size);
            }
            let base = (ptr as *mut u8).sub(HEADER) as *mut usize;
            let old = *base;
            if *base.add(1) & MAPPED != 0 {
                // The session's own block (never resized by libssh2 today):
                // move it to the heap.
                let new = s.alloc(size);
                if !new.is_null() {
                    std::ptr::copy_nonoverlapping(ptr as *const u8, new as *mut u8, old.min(size));
                    s.account(-(old as i64), -1);
                    s.release(base);
                }
                return new;
            }
            if size <= *base.add(1) {
                // Fits the block as it is (a cached capacity may exceed it).
                *base = size;
                s.account(size as i64 - old as i64, 0);
                return ptr;
            }
            let capacity = block_capacity(size);
            let Some(total) = capacity.checked_add(HEADER) else {
                return std::ptr::null_mut();
            };
            let new = libc::realloc(base as *mut c_void, total) as *mut usize;
            if new.is_null() {
                return std::ptr::null_mut();
            }
            *new = size;
            *new.add(1) = capacity;
            s.account(size as i64 - old as i64, 0);
            (new as *mut u8).add(HEADER) as *mut c_void
        }
    })
    .unwrap_or(std::ptr::null_mut())
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
            let Some(s) = shared(abstract_) else {
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
        s.bridge.on_send(data)
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
            let Some(s) = shared(abstract_) else {
                return -(libc::EBADF as isize);
            };
            (s, std::slice::from_raw_parts_mut(buf as *mut u8, len))
        };
        let n = s.bridge.on_recv(out);
        let mut offer = s.received_offer.borrow_mut();
        if n > 0 && offer.wants() {
            offer.feed(&out[..n as usize]);
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
    let timeout = unsafe { shared(abstract_) }
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
    if let Some(s) = unsafe { shared(abstract_) } {
        s.panic.borrow_mut().get_or_insert(payload);
        s.bridge.kill();
    }
    -(libc::ECONNABORTED as isize)
}

/// libssh2's keyboard-interactive callback: asks the responder stored in
/// `Shared::kbd` and hands libssh2 answers allocated with its allocator.
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
            let Some(s) = shared(abstract_) else { return };
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
                r.text = s.alloc_copy(answer);
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
        if let Some(s) = unsafe { shared(abstract_) } {
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
pub(crate) unsafe fn new_session(shared: *const Shared) -> *mut ffi::LIBSSH2_SESSION {
    ffi::init();
    crate::mlkem::register();
    // SAFETY: the allocator functions honour libssh2's contract; `shared`
    // outlives the session per this function's contract.
    unsafe {
        // The session's ~81 KB block comes from fresh zero pages that
        // libssh2 does not clear again (patch 0010): an idle session keeps
        // only the pages it wrote.
        (*shared).map_next.set(true);
        let raw = ffi::libssh2_session_init_zeroed_ex(
            Some(alloc_cb),
            Some(free_cb),
            Some(realloc_cb),
            shared as *mut c_void,
        );
        (*shared).map_next.set(false);
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
            let Some(s) = shared(abstract_) else { return };
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
mod tests {
    use super::*;

    /// libssh2's view: the allocator callbacks with the session's abstract pointer.
    struct Libssh2<'a> {
        abstract_: *mut c_void,
        _shared: std::marker::PhantomData<&'a Shared>,
    }

    impl Libssh2<'_> {
        fn new(shared: &Shared) -> Libssh2<'_> {
            Libssh2 {
                abstract_: shared as *const Shared as *mut c_void,
                _shared: std::marker::PhantomData,
            }
        }
        fn alloc(&mut self, n: usize) -> *mut c_void {
            let p = alloc_cb(n, &mut self.abstract_);
            assert!(!p.is_null());
            // SAFETY: `p` has room for `n` bytes: write all of them, so that
            // a block smaller than promised shows under ASan/valgrind.
            unsafe { std::ptr::write_bytes(p as *mut u8, 0xa5, n) };
            p
        }
        fn realloc(&mut self, p: *mut c_void, n: usize) -> *mut c_void {
            let q = realloc_cb(p, n, &mut self.abstract_);
            assert!(!q.is_null());
            // SAFETY: as in `alloc`.
            unsafe { std::ptr::write_bytes(q as *mut u8, 0x5a, n) };
            q
        }
        fn free(&mut self, p: *mut c_void) {
            free_cb(p, &mut self.abstract_);
        }
    }

    #[test]
    fn packet_blocks_are_reused_and_the_cache_is_bounded() {
        let shared = Shared::new();
        let mut l = Libssh2::new(&shared);
        // A burst of packet-sized blocks, as libssh2 reading a full recv.
        let first: Vec<_> = (0..24).map(|i| l.alloc(32_768 + 29 + i)).collect();
        assert_eq!(shared.blocks_outstanding(), 24);
        for &p in &first {
            l.free(p);
        }
        assert_eq!(
            (shared.blocks_outstanding(), shared.bytes_outstanding()),
            (0, 0)
        );
        let (kept, bytes) = shared.cached();
        assert_eq!(kept, 16, "at most 16 blocks per session");
        assert_eq!(bytes, 16 * 36_864, "rounded up to 4 KiB");
        // The next burst gets the cached blocks back.
        let second: Vec<_> = (0..16).map(|_| l.alloc(33_000)).collect();
        assert!(second.iter().all(|p| first.contains(p)));
        assert_eq!(shared.cached().0, 0);
        assert_eq!(shared.bytes_outstanding(), 16 * 33_000);
        for p in second {
            l.free(p);
        }
    }

    #[test]
    fn small_and_large_blocks_are_exact_and_never_cached() {
        let shared = Shared::new();
        let mut l = Libssh2::new(&shared);
        let small = l.alloc(20);
        let large = l.alloc(1 << 20);
        assert_eq!(shared.bytes_outstanding(), 20 + (1 << 20));
        l.free(small);
        l.free(large);
        assert_eq!(shared.cached(), (0, 0));
        assert_eq!(
            (shared.blocks_outstanding(), shared.bytes_outstanding()),
            (0, 0)
        );
    }

    #[test]
    fn realloc_keeps_the_contents_and_the_accounting() {
        let shared = Shared::new();
        let mut l = Libssh2::new(&shared);
        let p = l.alloc(5_000);
        // Within the rounded capacity: the same block.
        let q = l.realloc(p, 8_000);
        assert_eq!(p, q);
        assert_eq!(shared.bytes_outstanding(), 8_000);
        // SAFETY: `q` holds 8,000 bytes written by `realloc`.
        unsafe { *(q as *mut u8) = 7 };
        let r = realloc_cb(q, 100_000, &mut l.abstract_);
        assert!(!r.is_null());
        // SAFETY: `r` starts with the old block's bytes.
        assert_eq!(unsafe { *(r as *mut u8) }, 7, "contents moved");
        assert_eq!(shared.bytes_outstanding(), 100_000);
        let s = l.realloc(r, 10_000);
        assert_eq!(shared.bytes_outstanding(), 10_000);
        l.free(s);
        assert_eq!(
            (shared.blocks_outstanding(), shared.bytes_outstanding()),
            (0, 0)
        );
    }
}

#[cfg(test)]
mod session_block_tests {
    use super::*;

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
    /// session unmaps it with nothing left outstanding.
    #[test]
    fn a_new_session_block_is_mapped_and_mostly_untouched() {
        let shared = Box::new(Shared::new());
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
