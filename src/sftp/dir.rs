//! Directory listing as a stream of [`DirEntry`].

use std::collections::VecDeque;
use std::future::Future;
use std::path::Path;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll, ready};

use super::client::{ReplyFuture, status_ok, unexpected};
use super::codec::{self, FileAttributes, NameEntry, Reply};
use super::file::Handle;
use super::{Sftp, wire};
use crate::error::{Error, Result};

/// One directory entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirEntry {
    entry: NameEntry,
}

impl DirEntry {
    /// The file name, with invalid UTF-8 replaced (see
    /// [`DirEntry::name_bytes`] for the exact bytes).
    pub fn name(&self) -> std::borrow::Cow<'_, str> {
        String::from_utf8_lossy(&self.entry.filename)
    }

    /// The file name as the server sent it.
    pub fn name_bytes(&self) -> &[u8] {
        &self.entry.filename
    }

    /// The server's `ls -l`-style line for the entry.
    pub fn longname(&self) -> std::borrow::Cow<'_, str> {
        String::from_utf8_lossy(&self.entry.longname)
    }

    /// The entry's attributes (of the entry itself: a symbolic link is
    /// reported as one).
    pub fn attrs(&self) -> &FileAttributes {
        &self.entry.attrs
    }
}

/// An open directory: entries arrive in batches (one READDIR request per
/// batch). Implements [`futures_core::Stream`]; [`ReadDir::next_entry`] is
/// the same without the trait. Dropping it closes the handle in the
/// background.
///
/// At most one batch is held: the next READDIR goes out only once the
/// previous batch was consumed, and a batch is bounded by the reply that
/// carried it (one packet of at most 4 MiB, whose announced count must fit
/// the bytes that follow it). A batch holding a name longer than
/// [`MAX_NAME_LEN`](super::codec::MAX_NAME_LEN) bytes, or a malformed one,
/// ends the listing with [`Error::LimitExceeded`] or [`Error::Protocol`]
/// (the handle is still closed).
pub struct ReadDir {
    sftp: Sftp,
    handle: Rc<Handle>,
    batch: VecDeque<NameEntry>,
    pending: Option<ReplyFuture>,
    done: bool,
}

impl std::fmt::Debug for ReadDir {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReadDir")
            .field("buffered", &self.batch.len())
            .field("done", &self.done)
            .finish()
    }
}

impl ReadDir {
    pub(crate) async fn open(sftp: &Sftp, path: &Path) -> Result<ReadDir> {
        let p = wire(path);
        let h = sftp
            .timed("SFTP opendir", async {
                match sftp.inner.client.opendir(p).await? {
                    Reply::Handle(h) => Ok(h),
                    other => Err(unexpected(other, Some(p))),
                }
            })
            .await?;
        let handle = Rc::new(Handle {
            bytes: h,
            closed: std::cell::Cell::new(false),
        });
        sftp.inner.register(&handle);
        Ok(ReadDir {
            sftp: sftp.clone(),
            handle,
            batch: VecDeque::new(),
            pending: None,
            done: false,
        })
    }

    fn poll_entry(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<DirEntry>>> {
        loop {
            if let Some(entry) = self.batch.pop_front() {
                return Poll::Ready(Some(Ok(DirEntry { entry })));
            }
            if self.done {
                return Poll::Ready(None);
            }
            if self.handle.closed.get() {
                self.done = true;
                return Poll::Ready(Some(Err(Error::Closed("SFTP directory"))));
            }
            let f = self
                .pending
                .get_or_insert_with(|| self.sftp.inner.client.readdir(&self.handle.bytes));
            let r = ready!(Pin::new(f).poll(cx));
            self.pending = None;
            match r {
                Ok(Reply::Name(names)) => self.batch.extend(names),
                Ok(Reply::Status {
                    code: codec::status::EOF,
                    ..
                }) => self.done = true,
                Ok(other) => {
                    self.done = true;
                    return Poll::Ready(Some(Err(unexpected(other, None))));
                }
                Err(e) => {
                    self.done = true;
                    return Poll::Ready(Some(Err(e)));
                }
            }
        }
    }

    /// The next entry (`.` and `..` included, as the server lists them),
    /// or `None` at the end.
    pub async fn next_entry(&mut self) -> Result<Option<DirEntry>> {
        let sftp = self.sftp.clone();
        sftp.timed(
            "SFTP readdir",
            std::future::poll_fn(|cx| self.poll_entry(cx).map(Option::transpose)),
        )
        .await
    }

    /// Closes the directory handle and waits for the server's answer.
    pub async fn close(mut self) -> Result<()> {
        self.pending = None;
        if self.handle.closed.replace(true) {
            return Ok(());
        }
        let h = self.handle.clone();
        self.sftp
            .timed("SFTP close", async {
                status_ok(self.sftp.inner.client.close(&h.bytes).await?, None)
            })
            .await
    }
}

impl futures_core::Stream for ReadDir {
    type Item = Result<DirEntry>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.get_mut().poll_entry(cx)
    }
}

impl Drop for ReadDir {
    fn drop(&mut self) {
        self.pending = None;
        if !self.handle.closed.replace(true) {
            self.sftp
                .inner
                .client
                .close_in_background(&self.handle.bytes);
        }
    }
}
