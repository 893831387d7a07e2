//! Bytes in pieces, as the channel hands them over: what the client has
//! received but not parsed, and the data of a READ reply.
//!
//! The channel gives the client each SSH packet's payload in the memory
//! libssh2 decrypted it into (`ChannelInner::poll_read_chunk`). A READ
//! reply spans several packets; its data stays in those blocks, as slices,
//! until the caller has written it to a file or copied it out. Only what
//! must be contiguous to be parsed (the length fields, and the bodies of
//! replies other than DATA) is copied.

use std::collections::VecDeque;
use std::fmt;
use std::io::IoSlice;

use bytes::{Buf, Bytes};

/// Pieces smaller than this are copied together by [`Rope::push_merging`].
pub(crate) const MERGE_BELOW: usize = 8 * 1024;

/// The largest piece [`Rope::push_merging`] builds by copying.
const MERGED_MAX: usize = 32 * 1024;

/// A sequence of bytes held as the [`Bytes`] pieces it arrived in.
#[derive(Default, Clone)]
pub(crate) struct Rope {
    /// Never holds an empty piece.
    parts: VecDeque<Bytes>,
    len: usize,
    /// The last piece is a copy [`Rope::push_merging`] made, which it may
    /// grow.
    last_is_copy: bool,
}

impl Rope {
    /// An empty rope.
    pub(crate) fn new() -> Rope {
        Rope::default()
    }

    /// Appends `piece`.
    pub(crate) fn push(&mut self, piece: Bytes) {
        if !piece.is_empty() {
            self.len += piece.len();
            self.parts.push_back(piece);
            self.last_is_copy = false;
        }
    }

    /// Appends `piece`, copying one under [`MERGE_BELOW`] bytes onto the
    /// end of the last piece while that one is such a copy of our own and
    /// stays under [`MERGED_MAX`]: a peer that cuts its data into tiny
    /// messages cannot make each one cost a piece, and a block of
    /// libssh2's, of its own.
    pub(crate) fn push_merging<B>(&mut self, piece: B)
    where
        B: AsRef<[u8]> + Send + 'static,
    {
        if piece.as_ref().len() >= MERGE_BELOW {
            return self.push(Bytes::from_owner(piece));
        }
        // The owner (a block libssh2 handed over) is freed here, back to
        // the thread's cache.
        self.push_small(piece.as_ref());
    }

    /// Appends a copy of `piece` (under [`MERGE_BELOW`] bytes), onto the
    /// end of the last piece as [`Self::push_merging`] does.
    fn push_small(&mut self, piece: &[u8]) {
        debug_assert!(piece.len() < MERGE_BELOW);
        if piece.is_empty() {
            return;
        }
        if let Some(last) = self.parts.back_mut().filter(|_| self.last_is_copy) {
            let fits = last.len() + piece.len() <= MERGED_MAX;
            // Only a buffer nobody else holds (our copy, not a piece shared
            // by a split) grows in place.
            let taken = std::mem::take(last);
            match if fits {
                taken.try_into_mut()
            } else {
                Err(taken)
            } {
                Ok(mut grown) => {
                    grown.extend_from_slice(piece);
                    self.len += piece.len();
                    *last = grown.freeze();
                    return;
                }
                Err(taken) => *last = taken,
            }
        }
        self.push(Bytes::copy_from_slice(piece));
        self.last_is_copy = true;
    }

    /// Replaces each piece shorter than `below` with a copy of its bytes,
    /// so that it no longer holds the memory of the buffer it is a slice
    /// of.
    pub(crate) fn copy_pieces_below(&mut self, below: usize) {
        for p in self.parts.iter_mut().filter(|p| p.len() < below) {
            *p = Bytes::copy_from_slice(p);
        }
    }

    /// How many bytes it holds.
    pub(crate) fn len(&self) -> usize {
        self.len
    }

    /// Whether it holds nothing.
    pub(crate) fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// How many pieces hold its bytes.
    #[cfg(test)]
    pub(crate) fn pieces(&self) -> usize {
        self.parts.len()
    }

    /// The pieces, in order.
    #[cfg(test)]
    pub(crate) fn iter(&self) -> impl Iterator<Item = &Bytes> {
        self.parts.iter()
    }

    /// Copies the first `dst.len()` bytes into `dst`, consuming nothing;
    /// `false` if it holds fewer.
    pub(crate) fn peek(&self, dst: &mut [u8]) -> bool {
        if dst.len() > self.len {
            return false;
        }
        let mut at = 0;
        for p in &self.parts {
            if at == dst.len() {
                break;
            }
            let n = p.len().min(dst.len() - at);
            dst[at..at + n].copy_from_slice(&p[..n]);
            at += n;
        }
        true
    }

    /// Takes the first `n` bytes (at most [`Self::len`]) as a rope of
    /// their own, without copying: a piece split at `n` is shared.
    pub(crate) fn split_to(&mut self, n: usize) -> Rope {
        assert!(n <= self.len, "split_to({n}) of a rope of {}", self.len);
        let mut head = Rope::new();
        while head.len < n {
            let front = self.parts.front_mut().expect("bytes left to split");
            let want = n - head.len;
            if front.len() <= want {
                let piece = self.parts.pop_front().expect("a front piece");
                head.len += piece.len();
                head.parts.push_back(piece);
            } else {
                head.len += want;
                head.parts.push_back(front.split_to(want));
            }
        }
        self.len -= n;
        head
    }

    /// Its bytes in one piece: the piece itself if there is one, else a
    /// copy.
    pub(crate) fn into_contiguous(mut self) -> Bytes {
        match self.parts.len() {
            0 => Bytes::new(),
            1 => self.parts.pop_front().expect("one piece"),
            _ => Bytes::from(self.to_vec()),
        }
    }

    /// A copy of its bytes.
    pub(crate) fn to_vec(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(self.len);
        for p in &self.parts {
            v.extend_from_slice(p);
        }
        v
    }
}

impl From<Vec<u8>> for Rope {
    fn from(v: Vec<u8>) -> Rope {
        let mut r = Rope::new();
        r.push(Bytes::from(v));
        r
    }
}

impl From<&[u8]> for Rope {
    fn from(s: &[u8]) -> Rope {
        let mut r = Rope::new();
        r.push(Bytes::copy_from_slice(s));
        r
    }
}

impl Buf for Rope {
    fn remaining(&self) -> usize {
        self.len
    }

    fn chunk(&self) -> &[u8] {
        self.parts.front().map_or(&[], |p| &p[..])
    }

    fn advance(&mut self, mut n: usize) {
        assert!(n <= self.len, "advance({n}) past a rope of {}", self.len);
        self.len -= n;
        while n > 0 {
            let front = self.parts.front_mut().expect("bytes left to skip");
            if front.len() <= n {
                n -= front.len();
                self.parts.pop_front();
            } else {
                front.advance(n);
                n = 0;
            }
        }
    }

    fn chunks_vectored<'a>(&'a self, dst: &mut [IoSlice<'a>]) -> usize {
        let mut n = 0;
        for (slot, p) in dst.iter_mut().zip(&self.parts) {
            *slot = IoSlice::new(p);
            n += 1;
        }
        n
    }
}

impl PartialEq for Rope {
    /// Equal bytes, however they are cut.
    fn eq(&self, other: &Rope) -> bool {
        self.len == other.len
            && self
                .parts
                .iter()
                .flat_map(|p| p.iter())
                .eq(other.parts.iter().flat_map(|p| p.iter()))
    }
}

impl Eq for Rope {}

impl fmt::Debug for Rope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Rope({} bytes in {} pieces)", self.len, self.parts.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cut(data: &[u8], sizes: &[usize]) -> Rope {
        let mut r = Rope::new();
        let mut at = 0;
        for &s in sizes {
            r.push(Bytes::copy_from_slice(&data[at..at + s]));
            at += s;
        }
        r.push(Bytes::copy_from_slice(&data[at..]));
        r
    }

    #[test]
    fn splits_peeks_and_advances_across_pieces_at_every_offset() {
        let data: Vec<u8> = (0..200u32).map(|i| i as u8).collect();
        for n in 0..=data.len() {
            let mut r = cut(&data, &[0, 7, 1, 64, 50]);
            assert_eq!(r.pieces(), 5, "the empty piece is not kept");
            let mut first = vec![0; n];
            assert!(r.peek(&mut first));
            assert_eq!(first, data[..n]);
            let head = r.split_to(n);
            assert_eq!(head.len(), n);
            assert_eq!(head.to_vec(), data[..n]);
            assert_eq!(r.len(), data.len() - n);
            assert_eq!(r.to_vec(), data[n..]);
            assert!(!r.peek(&mut vec![0; r.len() + 1]), "peek past the end");
            let mut rest = r.clone();
            let skip = (data.len() - n) / 2;
            rest.advance(skip);
            assert_eq!(rest.to_vec(), data[n + skip..]);
            assert_eq!(rest.chunk().first(), data.get(n + skip));
        }
    }

    #[test]
    fn a_split_shares_the_pieces_memory() {
        let a = Bytes::from(vec![1u8; 1000]);
        let b = Bytes::from(vec![2u8; 1000]);
        let (pa, pb) = (a.as_ptr() as usize, b.as_ptr() as usize);
        let mut r = Rope::new();
        r.push(a);
        r.push(b);
        let mut head = r.split_to(1500);
        head.advance(10);
        let inside = |p: &Bytes| {
            let at = p.as_ptr() as usize;
            (pa..pa + 1000).contains(&at) || (pb..pb + 1000).contains(&at)
        };
        assert!(head.iter().chain(r.iter()).all(inside));
        assert_eq!(head.pieces(), 2);
        let mut iov = [IoSlice::new(&[]); 4];
        assert_eq!(head.chunks_vectored(&mut iov), 2);
        assert_eq!(iov[0].len() + iov[1].len(), 1490);
        // One piece comes out as itself; several are copied together.
        let one = r.split_to(500).into_contiguous();
        assert_eq!(one.as_ptr() as usize, pb + 500);
        assert_eq!(head.into_contiguous().len(), 1490);
    }

    #[test]
    fn tiny_pieces_are_merged_and_large_ones_kept_as_they_are() {
        let mut r = Rope::new();
        for i in 0..100_000u32 {
            r.push_merging(Bytes::copy_from_slice(&[i as u8]));
        }
        assert_eq!(r.len(), 100_000);
        assert!(
            r.pieces() <= 100_000 / MERGED_MAX + 1,
            "{} pieces",
            r.pieces()
        );
        assert!(r.to_vec().iter().enumerate().all(|(i, &b)| b == i as u8));
        // A large piece is kept (no copy); a small one after it starts a
        // copy of its own rather than touch it.
        let big = Bytes::from(vec![7u8; MERGE_BELOW]);
        let at = big.as_ptr();
        r.push_merging(big);
        r.push_merging(Bytes::from_static(b"tail"));
        let parts: Vec<&Bytes> = r.iter().collect();
        assert_eq!(parts[parts.len() - 2].as_ptr(), at);
        assert_eq!(&parts[parts.len() - 1][..], b"tail");
        // A piece a split shares is never grown in place.
        let mut r = Rope::new();
        r.push_merging(Bytes::from_static(b"abcdef"));
        let head = r.split_to(3);
        r.push_merging(Bytes::from_static(b"gh"));
        assert_eq!(head.to_vec(), b"abc");
        assert_eq!(r.to_vec(), b"defgh");
    }

    #[test]
    fn equality_ignores_where_the_pieces_are_cut() {
        let data = b"the same bytes, cut differently";
        assert_eq!(cut(data, &[3, 9]), cut(data, &[20]));
        assert_eq!(cut(data, &[3, 9]), Rope::from(&data[..]));
        assert_ne!(cut(data, &[3]), Rope::from(&data[1..]));
    }
}
