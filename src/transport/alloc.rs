//! libssh2's memory: the allocator handed to `libssh2_session_init_ex`.
//!
//! Every block is counted (bytes and blocks, per session and over the
//! process, the latter in per-thread parts summed on reading), so leaks
//! are measured rather than guessed; packet-sized blocks are cached for
//! the next packets of the thread's sessions; the session's own block is
//! mapped as fresh zero pages, resident only where libssh2 writes.

use std::cell::{Cell, RefCell};
use std::os::raw::{c_char, c_void};
use std::panic::catch_unwind;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex};

use super::callbacks::context;

/// One thread's part of the process-wide counts. Only its own thread
/// writes it (sessions never leave their thread), on a cache line of its
/// own: counting every libssh2 allocation costs no shared, contended line
/// however many threads run sessions. Readers sum every part.
#[derive(Default)]
#[repr(align(64))]
struct ThreadCounts {
    bytes: AtomicI64,
    blocks: AtomicI64,
}

impl ThreadCounts {
    /// Adds to this thread's counts; a plain load and store, as no other
    /// thread writes them.
    fn add(&self, bytes: i64, blocks: i64) {
        let (b, k) = (&self.bytes, &self.blocks);
        b.store(b.load(Ordering::Relaxed) + bytes, Ordering::Relaxed);
        k.store(k.load(Ordering::Relaxed) + blocks, Ordering::Relaxed);
    }
}

/// The parts of live threads, and what exited threads left (their parts
/// folded in at exit, under the same lock readers take).
struct Census {
    live: Vec<Arc<ThreadCounts>>,
    exited: (i64, i64),
}

static CENSUS: Mutex<Census> = Mutex::new(Census {
    live: Vec::new(),
    exited: (0, 0),
});

fn census() -> std::sync::MutexGuard<'static, Census> {
    CENSUS.lock().unwrap_or_else(|p| p.into_inner())
}

/// A thread's registration; folds its counts into the census at exit.
struct Registered(Arc<ThreadCounts>);

impl Registered {
    fn new() -> Registered {
        let counts = Arc::new(ThreadCounts::default());
        census().live.push(counts.clone());
        Registered(counts)
    }
}

impl Drop for Registered {
    fn drop(&mut self) {
        let mut c = census();
        c.live.retain(|p| !Arc::ptr_eq(p, &self.0));
        c.exited.0 += self.0.bytes.load(Ordering::Relaxed);
        c.exited.1 += self.0.blocks.load(Ordering::Relaxed);
    }
}

thread_local! {
    static THIS_THREAD: Registered = Registered::new();
}

/// Counts `bytes` and `blocks` for the process, on this thread's part (or,
/// while the thread is exiting, straight into the census).
fn count_globally(bytes: i64, blocks: i64) {
    if THIS_THREAD.try_with(|r| r.0.add(bytes, blocks)).is_err() {
        let mut c = census();
        c.exited.0 += bytes;
        c.exited.1 += blocks;
    }
}

/// (bytes, blocks) over every thread.
fn global_counts() -> (i64, i64) {
    let c = census();
    c.live.iter().fold(c.exited, |(b, k), p| {
        (
            b + p.bytes.load(Ordering::Relaxed),
            k + p.blocks.load(Ordering::Relaxed),
        )
    })
}

/// Bytes libssh2 has allocated through our allocator and not freed, over all
/// sessions of the process, including the packets the application still
/// holds as chunks ([`Channel::read_chunk`](crate::Channel::read_chunk)).
pub fn libssh2_bytes_outstanding() -> i64 {
    global_counts().0
}

/// Blocks libssh2 has allocated through our allocator and not freed, over all
/// sessions of the process, including chunks the application holds.
pub fn libssh2_blocks_outstanding() -> i64 {
    global_counts().1
}

/// One session's allocator state.
#[derive(Debug, Default)]
pub(crate) struct BlockAllocator {
    bytes: Cell<i64>,
    blocks: Cell<i64>,
    /// The next block is the session itself: map it as fresh zero pages.
    map_next: Cell<bool>,
}

impl BlockAllocator {
    /// Maps the next block as fresh zero pages (set around
    /// `libssh2_session_init_zeroed_ex`, whose first block is the session).
    pub(crate) fn map_next(&self, on: bool) {
        self.map_next.set(on);
    }

    /// Bytes libssh2 holds for this session.
    pub(crate) fn bytes_outstanding(&self) -> i64 {
        self.bytes.get()
    }

    /// Blocks libssh2 holds for this session.
    pub(crate) fn blocks_outstanding(&self) -> i64 {
        self.blocks.get()
    }

    fn account(&self, bytes: i64, blocks: i64) {
        self.bytes.set(self.bytes.get() + bytes);
        self.blocks.set(self.blocks.get() + blocks);
        count_globally(bytes, blocks);
    }

    /// Copies `data` (plus a NUL) into a block from this session's allocator,
    /// for strings libssh2 will free itself (keyboard-interactive answers).
    pub(crate) fn copy_in(&self, data: &[u8]) -> *mut c_char {
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

    pub(crate) fn alloc(&self, size: usize) -> *mut c_void {
        let _ = RUNS_SESSIONS.try_with(|r| r.set(true));
        if self.map_next.replace(false) {
            return self.alloc_mapped(size);
        }
        let capacity = block_capacity(size);
        let base = match take_cached(capacity) {
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
        let base = match take_kept_block(total) {
            Some(base) => base,
            None => {
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
                base
            }
        };
        let base = base as *mut usize;
        // SAFETY: the mapping holds HEADER + `size` bytes.
        unsafe {
            *base = size;
            *base.add(1) = total | MAPPED;
            self.account(size as i64, 1);
            (base as *mut u8).add(HEADER) as *mut c_void
        }
    }

    /// Takes over a block libssh2 handed out (patch 0020): `ptr` as our
    /// `alloc` returned it, its data `len` bytes at `start`. The block
    /// leaves this session's counts and stays in the process's until the
    /// returned owner drops. `None` (and the block freed) if the range does
    /// not lie within the block.
    ///
    /// # Safety
    /// `ptr` is a live block of this session's allocator that libssh2 no
    /// longer uses, handed to nobody else.
    pub(crate) unsafe fn take_over(
        &self,
        ptr: *mut u8,
        start: usize,
        len: usize,
    ) -> Option<TakenBlock> {
        // SAFETY: per the contract, a header with the block's size precedes `ptr`.
        let (base, size) = unsafe {
            let base = ptr.sub(HEADER) as *mut usize;
            (base, *base)
        };
        self.bytes.set(self.bytes.get() - size as i64);
        self.blocks.set(self.blocks.get() - 1);
        let block = TakenBlock { base, start, len };
        match start.checked_add(len) {
            Some(end) if end <= size => Some(block),
            // Dropping it frees the block.
            _ => None,
        }
    }
}

/// A packet's data that libssh2 handed over, with no copy: the payload
/// block is owned here, and dropping it (on any thread) frees it or keeps
/// it for that thread's next packets.
pub(crate) struct TakenBlock {
    base: *mut usize,
    start: usize,
    len: usize,
}

// SAFETY: the block is owned by this value alone (libssh2 unlinked it and
// the session's counts let it go); it is malloc'd memory, and dropping it
// touches only the dropping thread's cache and counts.
unsafe impl Send for TakenBlock {}

impl AsRef<[u8]> for TakenBlock {
    fn as_ref(&self) -> &[u8] {
        // SAFETY: `start + len` lies within the block (checked by
        // `take_over`), whose bytes libssh2 wrote (the decrypted packet).
        unsafe {
            std::slice::from_raw_parts((self.base as *const u8).add(HEADER + self.start), self.len)
        }
    }
}

impl Drop for TakenBlock {
    fn drop(&mut self) {
        // SAFETY: the block is ours alone, with a valid header.
        unsafe {
            count_globally(-(*self.base as i64), -1);
            release(self.base);
        }
    }
}

/// Frees a block libssh2 let go of, or keeps it for the next packet.
///
/// # Safety
/// `base` is the start of a live block made by `alloc`/`realloc_cb`.
unsafe fn release(base: *mut usize) {
    // SAFETY: per the contract, the header is valid.
    let capacity = unsafe { *base.add(1) };
    let base = if (CACHE_MIN..=CACHE_MAX).contains(&capacity) {
        match keep_cached(base, capacity) {
            Ok(()) => return,
            Err(base) => base,
        }
    } else {
        base
    };
    // SAFETY: per the contract, `base` is a live block of ours, and
    // the cache did not take it.
    unsafe { free_block(base) };
}

/// Hands a block back: a mapping of its own ([`MAPPED`]) is kept for the
/// thread's next session or unmapped (see `keep_or_unmap`), a malloc'd
/// one is freed.
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
            keep_or_unmap(base as *mut c_void, capacity & !MAPPED);
        } else {
            libc::free(base as *mut c_void);
        }
    }
}

/// Session blocks (mappings of their own) this thread keeps once their
/// session is freed, for its next sessions: unmapping one (a TLB flush and
/// its pages freed) was most of the time a drop took. A kept block is
/// cleared when it is taken again, at the next session's creation; until
/// then its written pages (up to ~84 KiB each, packet buffers included)
/// stay resident in this process, as freed heap memory does.
const KEPT_SESSION_BLOCKS: usize = 8;

/// The mappings (address, length) this thread keeps for its next sessions.
struct KeptBlocks(Vec<(usize, usize)>);

impl Drop for KeptBlocks {
    fn drop(&mut self) {
        for (base, len) in self.0.drain(..) {
            // SAFETY: a mapping of ours that nothing uses any more.
            unsafe { libc::munmap(base as *mut c_void, len) };
        }
    }
}

thread_local! {
    static KEPT: RefCell<KeptBlocks> = const { RefCell::new(KeptBlocks(Vec::new())) };
}

/// Keeps a freed session block's mapping for the thread's next session, or
/// unmaps it when enough are kept (or the thread is exiting).
///
/// # Safety
/// `base` is the start of a mapping of `len` bytes of ours, not used
/// afterwards.
unsafe fn keep_or_unmap(base: *mut c_void, len: usize) {
    let kept = KEPT
        .try_with(|k| {
            let mut k = k.borrow_mut();
            if k.0.len() < KEPT_SESSION_BLOCKS {
                k.0.push((base as usize, len));
                true
            } else {
                false
            }
        })
        .unwrap_or(false);
    if !kept {
        // SAFETY: per the contract.
        unsafe { libc::munmap(base, len) };
    }
}

/// A kept mapping of exactly `len` bytes, cleared to zero pages again (as
/// a fresh mapping: resident only once written), if this thread has one.
fn take_kept_block(len: usize) -> Option<*mut c_void> {
    let base = KEPT
        .try_with(|k| {
            let mut k = k.borrow_mut();
            let at = k.0.iter().position(|&(_, l)| l == len)?;
            Some(k.0.swap_remove(at).0)
        })
        .ok()
        .flatten()? as *mut c_void;
    // SAFETY: a private anonymous mapping of ours of `len` bytes that
    // nothing uses: on Linux, MADV_DONTNEED drops its pages, and it then
    // reads as zeros.
    if unsafe { libc::madvise(base, len, libc::MADV_DONTNEED) } != 0 {
        // SAFETY: as above; a block we cannot clear is not reused.
        unsafe { libc::munmap(base, len) };
        return None;
    }
    Some(base)
}

/// Blocks of this many bytes (after rounding) are cached: libssh2 allocates
/// and frees one per packet (up to 35,000 bytes plus headers), and handing
/// them back to malloc made glibc trim and regrow the heap top every few
/// packets: a page fault for every 4 KiB received.
const CACHE_MIN: usize = 4 * 1024;
const CACHE_MAX: usize = 64 * 1024;
/// Size classes of cached blocks: capacities are multiples of 4 KiB.
const CLASSES: usize = CACHE_MAX / CACHE_MIN;
/// Bytes of cached blocks one thread keeps at most (~220 full packets: a
/// dropped session's queued window, or the packets in flight of hundreds
/// of sessions).
const CACHE_THREAD_BYTES: usize = 8 * 1024 * 1024;

/// Packet-sized blocks the thread's sessions freed, one stack per size
/// class, shared by all of them: the next packet of any session gets the
/// block freed last, whose lines the cache most likely still holds. Kept
/// per session instead, each of hundreds of sessions cycled through blocks
/// of its own, and decrypting into them stalled on memory (64 sessions
/// reading: client CPU per GiB 0.81 with per-session caches against 0.67
/// with this one; `BENCHMARKS.md`, "Many sessions share hot memory").
struct PacketBlocks {
    classes: [Vec<*mut usize>; CLASSES],
    bytes: usize,
}

impl Drop for PacketBlocks {
    fn drop(&mut self) {
        for base in self.classes.iter_mut().flat_map(|c| c.drain(..)) {
            // SAFETY: cached blocks are live malloc'd blocks owned here.
            unsafe { libc::free(base as *mut c_void) };
        }
    }
}

thread_local! {
    /// libssh2 allocated on this thread: it runs sessions, whose next
    /// packets cached blocks serve. A thread that only drops chunks handed
    /// to it frees their blocks.
    static RUNS_SESSIONS: Cell<bool> = const { Cell::new(false) };
    static PACKET_BLOCKS: RefCell<PacketBlocks> = const {
        RefCell::new(PacketBlocks { classes: [const { Vec::new() }; CLASSES], bytes: 0 })
    };
}

/// The stack of blocks of `capacity` (a multiple of 4 KiB in the cached
/// range).
fn class(capacity: usize) -> usize {
    capacity / CACHE_MIN - 1
}

/// The block of exactly `capacity` this thread's sessions freed last, if
/// the thread keeps one.
fn take_cached(capacity: usize) -> Option<*mut usize> {
    if !(CACHE_MIN..=CACHE_MAX).contains(&capacity) {
        return None;
    }
    PACKET_BLOCKS
        .try_with(|p| {
            let mut p = p.borrow_mut();
            let base = p.classes[class(capacity)].pop()?;
            p.bytes -= capacity;
            Some(base)
        })
        .ok()
        .flatten()
}

/// Keeps a freed packet block (`capacity` in the cached range, a multiple
/// of 4 KiB) for the thread's next packets; gives it back (`Err`) when the
/// thread keeps enough, runs no sessions, or is exiting.
fn keep_cached(base: *mut usize, capacity: usize) -> Result<(), *mut usize> {
    if !RUNS_SESSIONS.try_with(Cell::get).unwrap_or(false) {
        return Err(base);
    }
    PACKET_BLOCKS
        .try_with(|p| {
            let mut p = p.borrow_mut();
            if p.bytes + capacity > CACHE_THREAD_BYTES {
                return Err(base);
            }
            p.bytes += capacity;
            p.classes[class(capacity)].push(base);
            Ok(())
        })
        .unwrap_or(Err(base))
}

/// Blocks and bytes this thread keeps for its sessions' next packets.
#[cfg(test)]
fn cached_blocks() -> (usize, usize) {
    PACKET_BLOCKS.with(|p| {
        let p = p.borrow();
        (p.classes.iter().map(Vec::len).sum(), p.bytes)
    })
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
pub(super) const HEADER: usize = 16;

/// Set in a block's capacity field when the block is a mapping of its own
/// (the session: see [`new_session`]).
pub(super) const MAPPED: usize = 1 << (usize::BITS - 1);

pub(super) extern "C" fn alloc_cb(size: libc::size_t, abstract_: *mut *mut c_void) -> *mut c_void {
    catch_unwind(|| {
        // SAFETY: libssh2 passes the abstract pointer we gave it.
        match unsafe { context(abstract_) } {
            Some(s) => s.alloc.alloc(size),
            None => std::ptr::null_mut(),
        }
    })
    .unwrap_or(std::ptr::null_mut())
}

pub(super) extern "C" fn free_cb(ptr: *mut c_void, abstract_: *mut *mut c_void) {
    let _ = catch_unwind(|| {
        if ptr.is_null() {
            return;
        }
        // SAFETY: `ptr` came from `alloc_cb`/`realloc_cb`, so a header with
        // its size precedes it; libssh2 frees each block once.
        unsafe {
            let base = (ptr as *mut u8).sub(HEADER) as *mut usize;
            let size = *base;
            match context(abstract_) {
                Some(s) => {
                    s.alloc.account(-(size as i64), -1);
                    release(base);
                }
                None => free_block(base),
            }
        }
    });
}

pub(super) extern "C" fn realloc_cb(
    ptr: *mut c_void,
    size: libc::size_t,
    abstract_: *mut *mut c_void,
) -> *mut c_void {
    catch_unwind(|| {
        // SAFETY: as in `free_cb` for the old block; the new block gets a
        // fresh header. On failure the old block stays valid, as realloc promises.
        unsafe {
            let Some(s) = context(abstract_) else {
                return std::ptr::null_mut();
            };
            if ptr.is_null() {
                return s.alloc.alloc(size);
            }
            let base = (ptr as *mut u8).sub(HEADER) as *mut usize;
            let old = *base;
            if *base.add(1) & MAPPED != 0 {
                // The session's own block (never resized by libssh2 today):
                // move it to the heap.
                let new = s.alloc.alloc(size);
                if !new.is_null() {
                    std::ptr::copy_nonoverlapping(ptr as *const u8, new as *mut u8, old.min(size));
                    s.alloc.account(-(old as i64), -1);
                    release(base);
                }
                return new;
            }
            if size <= *base.add(1) {
                // Fits the block as it is (a cached capacity may exceed it).
                *base = size;
                s.alloc.account(size as i64 - old as i64, 0);
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
            s.alloc.account(size as i64 - old as i64, 0);
            (new as *mut u8).add(HEADER) as *mut c_void
        }
    })
    .unwrap_or(std::ptr::null_mut())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::transport::callbacks::CallbackContext;

    /// libssh2's view: the allocator callbacks with the session's abstract pointer.
    struct Libssh2<'a> {
        abstract_: *mut c_void,
        _shared: std::marker::PhantomData<&'a CallbackContext>,
    }

    impl Libssh2<'_> {
        fn new(shared: &CallbackContext) -> Libssh2<'_> {
            Libssh2 {
                abstract_: shared as *const CallbackContext as *mut c_void,
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
    fn a_freed_session_block_is_kept_and_comes_back_as_zero_pages() {
        // Run on a thread of its own: the kept blocks are per thread.
        std::thread::spawn(|| {
            let shared = CallbackContext::new();
            let mut l = Libssh2::new(&shared);
            let session = |l: &mut Libssh2<'_>| {
                shared.alloc.map_next(true);
                let p = l.alloc(82_944); // written all over
                shared.alloc.map_next(false);
                p
            };
            let a = session(&mut l);
            l.free(a);
            assert_eq!(KEPT.with(|k| k.borrow().0.len()), 1, "kept, not unmapped");
            let b = session(&mut l);
            assert_eq!(a, b, "the next session gets the kept block");
            assert_eq!(KEPT.with(|k| k.borrow().0.len()), 0);
            // (`alloc` wrote it: check a fresh take before any write.)
            l.free(b);
            shared.alloc.map_next(true);
            let c = alloc_cb(82_944, &mut l.abstract_);
            shared.alloc.map_next(false);
            // SAFETY: a live block of 82,944 bytes.
            let bytes = unsafe { std::slice::from_raw_parts(c as *const u8, 82_944) };
            assert!(
                bytes.iter().all(|&x| x == 0),
                "a kept block comes back cleared"
            );
            l.free(c);
            // At most KEPT_SESSION_BLOCKS are kept; the rest are unmapped.
            let many: Vec<_> = (0..KEPT_SESSION_BLOCKS + 3)
                .map(|_| session(&mut l))
                .collect();
            for p in many {
                l.free(p);
            }
            assert_eq!(KEPT.with(|k| k.borrow().0.len()), KEPT_SESSION_BLOCKS);
            assert_eq!(
                (shared.blocks_outstanding(), shared.bytes_outstanding()),
                (0, 0)
            );
        })
        .join()
        .unwrap();
    }

    #[test]
    fn packet_blocks_are_reused_last_freed_first_and_the_cache_is_bounded() {
        // Run on a thread of its own: the cache is per thread.
        std::thread::spawn(|| {
            let shared = CallbackContext::new();
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
            assert_eq!(cached_blocks(), (24, 24 * 36_864), "rounded up to 4 KiB");
            // The next packets get the blocks freed last first.
            let second: Vec<_> = (0..16).map(|_| l.alloc(33_000)).collect();
            let expected: Vec<_> = first.iter().rev().take(16).copied().collect();
            assert_eq!(second, expected);
            assert_eq!(cached_blocks().0, 8);
            assert_eq!(shared.bytes_outstanding(), 16 * 33_000);
            // Another size class is served from its own stack.
            let other = l.alloc(9_000);
            assert!(!first.contains(&other));
            l.free(other);
            for p in second {
                l.free(p);
            }
            // Bounded: a thread keeps CACHE_THREAD_BYTES, the rest is freed.
            let many: Vec<_> = (0..CACHE_THREAD_BYTES / 36_864 + 40)
                .map(|_| l.alloc(33_000))
                .collect();
            for p in many {
                l.free(p);
            }
            let (_, bytes) = cached_blocks();
            assert!(
                bytes <= CACHE_THREAD_BYTES && bytes > CACHE_THREAD_BYTES - 36_864,
                "{bytes}"
            );
            assert_eq!(
                (shared.blocks_outstanding(), shared.bytes_outstanding()),
                (0, 0)
            );
        })
        .join()
        .unwrap();
    }

    #[test]
    fn the_block_freed_last_by_any_session_serves_the_next_packet() {
        // Run on a thread of its own: the cache is per thread.
        std::thread::spawn(|| {
            let a = CallbackContext::new();
            let b = CallbackContext::new();
            let mut la = Libssh2::new(&a);
            let mut lb = Libssh2::new(&b);
            let pa = la.alloc(33_000);
            let pb = lb.alloc(33_000);
            la.free(pa);
            // Session b's next packet takes the block session a just freed.
            let pb2 = lb.alloc(33_000);
            assert_eq!(pb2, pa);
            lb.free(pb);
            let from_dropped = {
                let c = CallbackContext::new();
                let mut lc = Libssh2::new(&c);
                let blocks: Vec<_> = (0..24).map(|_| lc.alloc(33_000)).collect();
                for &p in &blocks {
                    lc.free(p);
                }
                blocks
            };
            // A dropped session's blocks serve the others.
            let pa2 = la.alloc(33_000);
            assert_eq!(pa2, from_dropped[23]);
            assert_eq!(cached_blocks().0, 23);
            assert_eq!((a.blocks_outstanding(), b.blocks_outstanding()), (1, 1));
            la.free(pa2);
            lb.free(pb2);
        })
        .join()
        .unwrap();
    }

    #[test]
    fn a_taken_block_leaves_the_session_and_is_freed_where_it_drops() {
        std::thread::spawn(|| {
            let shared = CallbackContext::new();
            let mut l = Libssh2::new(&shared);
            // (The process's counts are checked in tests/channel.rs, in a
            // process of its own: other tests allocate concurrently here.)
            let mine = || THIS_THREAD.with(|r| r.0.bytes.load(Ordering::Relaxed));
            let before = mine();
            let p = l.alloc(33_000) as *mut u8;
            // SAFETY: a live block of 33,000 bytes.
            unsafe { std::ptr::copy_nonoverlapping(b"hello".as_ptr(), p.add(100), 5) };
            // SAFETY: a live block of this session, handed to nobody else.
            let taken = unsafe { shared.alloc.take_over(p, 100, 5) }.expect("in range");
            assert_eq!(taken.as_ref(), b"hello");
            assert_eq!(
                (shared.blocks_outstanding(), shared.bytes_outstanding()),
                (0, 0)
            );
            assert_eq!(mine(), before + 33_000, "still the process's");
            // Dropped on a thread that runs no session: freed, not cached.
            std::thread::spawn(move || {
                drop(taken);
                assert_eq!(cached_blocks(), (0, 0));
            })
            .join()
            .unwrap();
            // A range past the block's end is refused, and the block freed.
            let q = l.alloc(33_000) as *mut u8;
            // SAFETY: as above.
            assert!(unsafe { shared.alloc.take_over(q, 32_000, 1_001) }.is_none());
            assert_eq!(mine(), before + 33_000, "freed: counted off here");
            // On a thread of sessions, a dropped block serves the next packet.
            let r = l.alloc(33_000) as *mut u8;
            // SAFETY: as above.
            drop(unsafe { shared.alloc.take_over(r, 0, 33_000) });
            assert_eq!(l.alloc(33_000) as *mut u8, r);
        })
        .join()
        .unwrap();
    }

    #[test]
    fn small_and_large_blocks_are_exact_and_never_cached() {
        let shared = CallbackContext::new();
        let mut l = Libssh2::new(&shared);
        let small = l.alloc(20);
        let large = l.alloc(1 << 20);
        assert_eq!(shared.bytes_outstanding(), 20 + (1 << 20));
        let before = cached_blocks();
        l.free(small);
        l.free(large);
        assert_eq!(cached_blocks(), before);
        assert_eq!(
            (shared.blocks_outstanding(), shared.bytes_outstanding()),
            (0, 0)
        );
    }

    #[test]
    fn realloc_keeps_the_contents_and_the_accounting() {
        let shared = CallbackContext::new();
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
