//! Large IO buffers kept per thread from one owner to the next.
//!
//! A busy session's receive buffers grow to 512 KiB. Freed when it was
//! dropped (by its owner, or by the reactor when an orphaned op's own
//! completion came), they left glibc's heap with megabytes free at its top
//! or were unmapped, and glibc gave them back to the kernel at once (`brk`
//! shrinking the heap or `munmap`: ~100 µs of unmapping), only for the
//! next session to map them again, page fault by page fault. Kept here
//! instead, they are the next busy owner's buffers. Small buffers (quiet
//! sessions) are left to malloc, which keeps them in its bins anyway.
//!
//! Sessions also hand their read-out receive buffers here rather than
//! keeping them for their own next receive, and a receive takes the buffer
//! kept last that fits: the kernel then copies into lines the cache most
//! likely still holds. Each of many sessions cycling through buffers of
//! its own made both that copy and the decryption reading it stall on
//! memory (`BENCHMARKS.md`, "Many sessions share hot memory").

use std::cell::RefCell;

/// Buffers smaller than this are not kept.
pub(crate) const KEEP_MIN: usize = 64 * 1024;

/// Bytes of buffers one thread keeps at most: a few busy sessions' worth
/// (eight 512 KiB receive buffers). 16 MiB read 64 and 256 sessions for
/// the same CPU, and the 10-minute soak's RSS grew 12% with it (the store
/// fills with large buffers over time and holds them).
const KEEP_MAX_BYTES: usize = 4 * 1024 * 1024;

thread_local! {
    static KEPT: RefCell<Kept> = const { RefCell::new(Kept { bufs: Vec::new(), bytes: 0 }) };
}

struct Kept {
    bufs: Vec<Vec<u8>>,
    /// Capacity of `bufs` in all.
    bytes: usize,
}

/// Keeps `buf` for a later op on this thread if it holds many initialized
/// bytes (what [`take`] hands out) and the thread keeps less than its
/// bound; frees it otherwise. Its bytes stay as they are: the next receive
/// overwrites them.
pub(crate) fn keep(buf: Vec<u8>) {
    let cap = buf.capacity();
    // A large allocation with few initialized bytes (a send's) could never
    // be taken, and would only hold the thread's budget.
    if buf.len() < KEEP_MIN {
        return;
    }
    // During thread exit the store may be gone: then the buffer is freed.
    let _ = KEPT.try_with(|k| {
        let mut k = k.borrow_mut();
        if k.bytes + cap <= KEEP_MAX_BYTES {
            k.bytes += cap;
            k.bufs.push(buf);
        }
    });
}

/// A kept buffer of at least `size` initialized bytes (its length), if the
/// thread keeps one: the one kept last of those up to 4 × `size` (a small
/// receive leaves the large buffers to the streams), or else the smallest
/// that fits.
pub(crate) fn take(size: usize) -> Option<Vec<u8>> {
    take_within(size, size.saturating_mul(4)).or_else(|| take_smallest(size))
}

/// The smallest kept buffer of at least `size` initialized bytes.
fn take_smallest(size: usize) -> Option<Vec<u8>> {
    take_picked(size, |bufs| {
        let fits = bufs.iter().enumerate().filter(|(_, b)| b.len() >= size);
        fits.min_by_key(|(_, b)| b.len()).map(|(i, _)| i)
    })
}

/// The kept buffer of at least `size` initialized bytes kept last among
/// those of at most `max_capacity` bytes.
pub(crate) fn take_within(size: usize, max_capacity: usize) -> Option<Vec<u8>> {
    take_picked(size, |bufs| {
        bufs.iter()
            .rposition(|b| b.len() >= size && b.capacity() <= max_capacity)
    })
}

/// Removes the kept buffer `pick` chooses (none below [`KEEP_MIN`]).
fn take_picked(size: usize, pick: impl FnOnce(&[Vec<u8>]) -> Option<usize>) -> Option<Vec<u8>> {
    if size < KEEP_MIN {
        return None;
    }
    KEPT.try_with(|k| {
        let mut k = k.borrow_mut();
        let i = pick(&k.bufs)?;
        let buf = k.bufs.remove(i);
        k.bytes -= buf.capacity();
        Some(buf)
    })
    .ok()
    .flatten()
}

/// Bytes of buffers this thread keeps.
#[cfg(test)]
pub(crate) fn kept_bytes() -> usize {
    KEPT.with(|k| k.borrow().bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn large_buffers_are_kept_up_to_the_bound_and_small_ones_are_not() {
        assert_eq!(kept_bytes(), 0);
        keep(vec![1; 4096]);
        assert_eq!(kept_bytes(), 0, "small buffers go back to malloc");
        let mut sent = Vec::with_capacity(KEEP_MIN * 4);
        sent.extend_from_slice(&[2; 100]);
        keep(sent);
        assert_eq!(kept_bytes(), 0, "nor large ones with few bytes");
        assert!(take(4096).is_none());
        let big = vec![7u8; KEEP_MIN * 2];
        let at = big.as_ptr();
        keep(big);
        keep(vec![8u8; KEEP_MIN]);
        assert_eq!(kept_bytes(), KEEP_MIN * 3);
        // The one kept last that fits, bytes as they were.
        let b = take(KEEP_MIN + 1).expect("the large one");
        assert_eq!((b.as_ptr(), b.len()), (at, KEEP_MIN * 2));
        assert!(b.iter().all(|&x| x == 7));
        assert!(take(KEEP_MIN * 2).is_none());
        keep(b);
        let small = take(KEEP_MIN).expect("kept last");
        assert_eq!((small.as_ptr(), small.len()), (at, KEEP_MIN * 2));
        assert_eq!(take(KEEP_MIN).map(|b| b.len()), Some(KEEP_MIN));
        assert_eq!(kept_bytes(), 0);
        // A small receive leaves a much larger buffer kept later to the
        // streams, and takes it only when nothing else fits.
        keep(vec![1u8; KEEP_MIN]);
        keep(vec![2u8; KEEP_MIN * 8]);
        assert_eq!(take(KEEP_MIN).map(|b| b[0]), Some(1));
        assert_eq!(take(KEEP_MIN).map(|b| b.len()), Some(KEEP_MIN * 8));
        assert_eq!(kept_bytes(), 0);
        // Never more than the bound.
        for _ in 0..KEEP_MAX_BYTES / KEEP_MIN + 4 {
            keep(vec![0u8; KEEP_MIN]);
        }
        assert_eq!(kept_bytes(), KEEP_MAX_BYTES);
    }
}
