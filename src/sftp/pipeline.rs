//! The read and write pipelines of one handle, shared by [`File`] and the
//! whole-file transfers: requests in flight in offset order, replies taken
//! from the front and checked the same way for both.
//!
//! How many requests to keep in flight is the caller's choice (a file's
//! read-ahead depth, a transfer's byte budget); each request carries a `T`
//! of the caller's (a budget permit), released when its reply is taken.
//!
//! [`File`]: super::File

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll, ready};

use super::client::{Client, ReplyFuture, status_ok, unexpected};
use super::codec::{Reply, status};
use super::rope::Rope;
use crate::error::{Error, Result};

/// What the oldest READ of a [`ReadPipeline`] brought.
pub(crate) enum Chunk {
    /// `data` from offset `at`. `short`: less than asked; the reads queued
    /// behind it assumed a full one and were dropped, and the pipeline
    /// goes on from where the data ends.
    Data { at: u64, data: Rope, short: bool },
    /// End of file, answering the read at offset `at`; the pipeline was
    /// emptied.
    Eof { at: u64 },
}

/// READs of one handle in flight: (offset, length, the caller's `T`,
/// reply), in offset order.
pub(crate) struct ReadPipeline<T = ()> {
    reads: VecDeque<(u64, u32, T, ReplyFuture)>,
    /// Where the next READ starts.
    next: u64,
}

impl<T> Default for ReadPipeline<T> {
    fn default() -> Self {
        ReadPipeline {
            reads: VecDeque::new(),
            next: 0,
        }
    }
}

impl<T> ReadPipeline<T> {
    pub(crate) fn len(&self) -> usize {
        self.reads.len()
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.reads.is_empty()
    }

    /// Where the next READ starts.
    pub(crate) fn next_offset(&self) -> u64 {
        self.next
    }

    /// Abandons every READ in flight (their replies are discarded on
    /// arrival); the next starts at `from`.
    pub(crate) fn restart(&mut self, from: u64) {
        self.reads.clear();
        self.next = from;
    }

    /// Queues a READ of `len` bytes at the next offset.
    pub(crate) fn push(&mut self, client: &Rc<Client>, handle: &[u8], len: u32, extra: T) {
        let f = client.read(handle, self.next, len);
        self.reads.push_back((self.next, len, extra, f));
        self.next += len as u64;
    }

    /// Takes the reply of the oldest READ (there must be one). `path`
    /// names the file in an SFTP error.
    pub(crate) fn poll_front(
        &mut self,
        cx: &mut Context<'_>,
        path: Option<&[u8]>,
    ) -> Poll<Result<Chunk>> {
        let (at, len, _, f) = self.reads.front_mut().expect("a READ in flight");
        let (at, len) = (*at, *len as usize);
        let r = ready!(Pin::new(f).poll(cx));
        self.reads.pop_front();
        Poll::Ready(match r {
            Err(e) => Err(e),
            Ok(Reply::Data(data)) if !data.is_empty() && data.len() <= len => {
                let short = data.len() < len;
                if short {
                    self.restart(at + data.len() as u64);
                }
                Ok(Chunk::Data { at, data, short })
            }
            Ok(Reply::Data(_)) => Err(Error::sftp_protocol(
                "READ reply empty or longer than asked",
            )),
            Ok(Reply::Status {
                code: status::EOF, ..
            }) => {
                self.reads.clear();
                Ok(Chunk::Eof { at })
            }
            Ok(other) => Err(unexpected(other, path)),
        })
    }
}

/// WRITEs of one handle in flight, oldest first: (length, the caller's
/// `T`, reply).
pub(crate) struct WritePipeline<T = ()> {
    writes: VecDeque<(u32, T, ReplyFuture)>,
}

impl<T> Default for WritePipeline<T> {
    fn default() -> Self {
        WritePipeline {
            writes: VecDeque::new(),
        }
    }
}

impl<T> WritePipeline<T> {
    pub(crate) fn len(&self) -> usize {
        self.writes.len()
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.writes.is_empty()
    }

    /// Queues a WRITE of `data` at `offset`.
    pub(crate) fn push(
        &mut self,
        client: &Rc<Client>,
        handle: &[u8],
        offset: u64,
        data: &[u8],
        extra: T,
    ) {
        let f = client.write(handle, offset, data);
        self.writes.push_back((data.len() as u32, extra, f));
    }

    /// Queues a WRITE at `offset` of up to `max` bytes of `src` from the
    /// same offset, read straight into the request: the bytes queued, 0 at
    /// the end of the file (nothing queued, `extra` dropped).
    pub(crate) fn push_from_file(
        &mut self,
        client: &Rc<Client>,
        handle: &[u8],
        offset: u64,
        max: usize,
        src: &std::fs::File,
        extra: T,
    ) -> std::io::Result<usize> {
        Ok(match client.write_from_file(handle, offset, max, src)? {
            Some((n, f)) => {
                self.writes.push_back((n as u32, extra, f));
                n
            }
            None => 0,
        })
    }

    /// Takes the answer to the oldest WRITE: `None` if none is in flight,
    /// else its length once the server acknowledged it, or the error.
    /// `path` names the file in an SFTP error.
    pub(crate) fn poll_front(
        &mut self,
        cx: &mut Context<'_>,
        path: Option<&[u8]>,
    ) -> Poll<Option<Result<u32>>> {
        let Some((n, _, f)) = self.writes.front_mut() else {
            return Poll::Ready(None);
        };
        let n = *n;
        let r = ready!(Pin::new(f).poll(cx));
        self.writes.pop_front();
        Poll::Ready(Some(r.and_then(|r| status_ok(r, path)).map(|()| n)))
    }

    /// Polls the newest WRITE once, so that it is handed on now rather
    /// than at the next poll; its answer if it already came.
    pub(crate) fn poll_back(&mut self, cx: &mut Context<'_>) -> Option<Result<u32>> {
        let (n, _, f) = self.writes.back_mut()?;
        let n = *n;
        let Poll::Ready(r) = Pin::new(f).poll(cx) else {
            return None;
        };
        self.writes.pop_back();
        Some(r.and_then(|r| status_ok(r, None)).map(|()| n))
    }
}
