//! [`File`]: an open remote file with tokio's `AsyncRead`, `AsyncWrite` and
//! `AsyncSeek`, reading ahead and writing behind with several requests in
//! flight.

use std::future::Future;
use std::io::{self, SeekFrom};
use std::path::Path;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll, ready};

use bytes::Buf;
use tokio::io::{AsyncRead, AsyncSeek, AsyncWrite, ReadBuf};

use super::client::{Client, ReplyFuture, status_ok, unexpected};
use super::codec::{self, FileAttributes, Reply, open_flags};
use super::pipeline::{Chunk, ReadPipeline, WritePipeline};
use super::rope::Rope;
use super::{Sftp, StatVfs, check_attrs, protocol, wire};
use crate::error::{Error, InvalidInput, Result};

/// Most bytes requested ahead of the reader (at least two requests): enough
/// to keep a loopback or LAN link busy; more only parks data in memory,
/// which a dropped file then frees on the dropper's path.
const READ_AHEAD_BYTES: usize = 1024 * 1024;

/// Most bytes of WRITE requests in flight behind the writer.
const WRITE_BEHIND_BYTES: usize = 2 * 1024 * 1024;

/// How to open a remote file, like [`std::fs::OpenOptions`].
#[derive(Debug, Clone)]
pub struct OpenOptions {
    read: bool,
    write: bool,
    append: bool,
    create: bool,
    create_new: bool,
    truncate: bool,
    mode: u32,
}

impl Default for OpenOptions {
    fn default() -> Self {
        Self::new()
    }
}

impl OpenOptions {
    /// Nothing set; permission bits 0644 for files it creates.
    pub fn new() -> Self {
        OpenOptions {
            read: false,
            write: false,
            append: false,
            create: false,
            create_new: false,
            truncate: false,
            mode: 0o644,
        }
    }

    /// Open for reading.
    pub fn read(&mut self, yes: bool) -> &mut Self {
        self.read = yes;
        self
    }

    /// Open for writing.
    pub fn write(&mut self, yes: bool) -> &mut Self {
        self.write = yes;
        self
    }

    /// Every write goes to the end of the file (implies write).
    pub fn append(&mut self, yes: bool) -> &mut Self {
        self.append = yes;
        self
    }

    /// Create the file if it does not exist.
    pub fn create(&mut self, yes: bool) -> &mut Self {
        self.create = yes;
        self
    }

    /// Create the file, failing if it exists.
    pub fn create_new(&mut self, yes: bool) -> &mut Self {
        self.create_new = yes;
        self
    }

    /// Truncate the file to 0 bytes.
    pub fn truncate(&mut self, yes: bool) -> &mut Self {
        self.truncate = yes;
        self
    }

    /// Permission bits for a file this open creates (the server applies
    /// its umask).
    pub fn mode(&mut self, mode: u32) -> &mut Self {
        self.mode = mode & 0o7777;
        self
    }

    fn flags(&self) -> Result<u32> {
        let write = self.write || self.append;
        if !self.read && !write {
            return Err(Error::InvalidInput(InvalidInput::Usage(
                "open needs read, write or append",
            )));
        }
        if (self.create || self.create_new || self.truncate) && !write {
            return Err(Error::InvalidInput(InvalidInput::Usage(
                "create and truncate need write or append",
            )));
        }
        let mut f = 0;
        if self.read {
            f |= open_flags::READ;
        }
        if write {
            f |= open_flags::WRITE;
        }
        if self.append {
            f |= open_flags::APPEND;
        }
        if self.create || self.create_new {
            f |= open_flags::CREAT;
        }
        if self.create_new {
            f |= open_flags::EXCL;
        }
        if self.truncate {
            f |= open_flags::TRUNC;
        }
        Ok(f)
    }

    /// Opens `path` with these options.
    pub async fn open(&self, sftp: &Sftp, path: impl AsRef<Path>) -> Result<File> {
        let flags = self.flags()?;
        let handle = sftp
            .timed(
                "SFTP open",
                open_handle(sftp, path.as_ref(), flags, self.mode),
            )
            .await?;
        Ok(File::new(sftp.clone(), handle))
    }
}

/// OPEN: the handle for `path` opened with `flags` (`SSH_FXF_*`), created
/// with permission bits `mode` if it is created. No timeout of its own.
pub(crate) async fn open_handle(
    sftp: &Sftp,
    path: &Path,
    flags: u32,
    mode: u32,
) -> Result<Vec<u8>> {
    let p = wire(path);
    let attrs = FileAttributes {
        permissions: Some(mode),
        ..Default::default()
    };
    match sftp.inner.client.open(p, flags, &attrs).await? {
        Reply::Handle(h) => Ok(h),
        other => Err(unexpected(other, Some(p))),
    }
}

/// A server handle; shared with the client's registry so that a graceful
/// close of the client closes it.
pub(crate) struct Handle {
    pub(crate) bytes: Vec<u8>,
    /// A CLOSE was sent (by the file or by the client's close).
    pub(crate) closed: std::cell::Cell<bool>,
}

enum SeekState {
    Idle,
    /// Seeking relative to the end: waiting for the size.
    Sizing(ReplyFuture, i64),
    Done(u64),
}

/// An open remote file. Reads are sequential from the cursor, with up to
/// 1 MiB of READ requests in flight ahead of it once the reading is
/// sequential; writes are queued as WRITE requests and reported taken at
/// once (up to 2 MiB in flight); their errors surface on a later write, on flush, or on
/// [`File::close`]. Flush before trusting that data is on the server.
///
/// Dropping a file never blocks: its CLOSE is sent in the background.
pub struct File {
    sftp: Sftp,
    handle: Rc<Handle>,
    /// The cursor: where the next read or write starts.
    pos: u64,
    /// In-flight reads, from where the read-ahead started.
    reads: ReadPipeline,
    /// How many reads may be in flight: grows while reading is sequential.
    depth: usize,
    /// Received data not yet handed out, in the pieces it arrived in.
    buf: Rope,
    eof: bool,
    /// In-flight writes.
    writes: WritePipeline,
    write_error: Option<Error>,
    seek: SeekState,
}

impl std::fmt::Debug for File {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("File")
            .field("pos", &self.pos)
            .field("reads_in_flight", &self.reads.len())
            .field("writes_in_flight", &self.writes.len())
            .field("closed", &self.handle.closed.get())
            .finish()
    }
}

impl File {
    pub(crate) fn new(sftp: Sftp, handle: Vec<u8>) -> File {
        let handle = Rc::new(Handle {
            bytes: handle,
            closed: std::cell::Cell::new(false),
        });
        sftp.inner.register(&handle);
        File {
            sftp,
            handle,
            pos: 0,
            reads: ReadPipeline::default(),
            depth: 1,
            buf: Rope::new(),
            eof: false,
            writes: WritePipeline::default(),
            write_error: None,
            seek: SeekState::Idle,
        }
    }

    fn client(&self) -> &Rc<Client> {
        &self.sftp.inner.client
    }

    fn check_open(&self) -> Result<()> {
        if self.handle.closed.get() {
            Err(Error::Closed("SFTP file"))
        } else {
            Ok(())
        }
    }

    /// Reads up to `len` bytes at `offset` without moving the cursor; an
    /// empty result means end of file.
    pub async fn read_at(&self, offset: u64, len: u32) -> Result<Vec<u8>> {
        self.check_open()?;
        let len = len.min(self.sftp.inner.read_size);
        let r = self
            .sftp
            .timed(
                "SFTP read",
                self.client().read(&self.handle.bytes, offset, len),
            )
            .await?;
        match r {
            Reply::Data(d) if d.len() <= len as usize => Ok(d.to_vec()),
            Reply::Data(_) => Err(Error::sftp_protocol("READ reply longer than asked")),
            Reply::Status {
                code: codec::status::EOF,
                ..
            } => Ok(Vec::new()),
            other => Err(unexpected(other, None)),
        }
    }

    /// Writes all of `data` at `offset` without moving the cursor, in
    /// requests of the server's write size, all in flight at once.
    pub async fn write_at(&self, offset: u64, data: &[u8]) -> Result<()> {
        self.check_open()?;
        let size = self.sftp.inner.write_size as usize;
        let futs: Vec<_> = data
            .chunks(size.max(1))
            .enumerate()
            .map(|(i, c)| {
                self.client()
                    .write(&self.handle.bytes, offset + (i * size) as u64, c)
            })
            .collect();
        self.sftp
            .timed("SFTP write", async {
                for f in futs {
                    status_ok(f.await?, None)?;
                }
                Ok(())
            })
            .await
    }

    /// A request on the file's handle (made by `request`, given the client
    /// and the handle).
    async fn handle_op(
        &self,
        operation: &'static str,
        request: impl FnOnce(&Rc<Client>, &[u8]) -> ReplyFuture,
    ) -> Result<Reply> {
        self.check_open()?;
        self.sftp
            .timed(operation, async {
                request(self.client(), &self.handle.bytes).await
            })
            .await
    }

    /// The file's attributes (`FSTAT`).
    pub async fn stat(&self) -> Result<FileAttributes> {
        match self.handle_op("SFTP fstat", |c, h| c.fstat(h)).await? {
            Reply::Attrs(a) => Ok(a),
            other => Err(unexpected(other, None)),
        }
    }

    /// Changes the attributes present in `attrs` (`FSETSTAT`).
    pub async fn setstat(&self, attrs: &FileAttributes) -> Result<()> {
        check_attrs(attrs)?;
        status_ok(
            self.handle_op("SFTP fsetstat", |c, h| c.fsetstat(h, attrs))
                .await?,
            None,
        )
    }

    /// Waits for every queued write, then asks the server to flush the file
    /// to stable storage (`fsync@openssh.com`; `Unsupported` if the server
    /// does not offer it).
    pub async fn fsync(&mut self) -> Result<()> {
        std::future::poll_fn(|cx| self.poll_writes(cx, 0)).await?;
        self.check_open()?;
        let h = self.handle.clone();
        let r = self
            .sftp
            .extended(
                "SFTP fsync",
                self.sftp.inner.extensions.fsync,
                "fsync@openssh.com",
                &[&h.bytes],
            )
            .await?;
        status_ok(r, None)
    }

    /// File system statistics for the file's file system
    /// (`fstatvfs@openssh.com`).
    pub async fn statvfs(&self) -> Result<StatVfs> {
        self.check_open()?;
        let h = self.handle.clone();
        let r = self
            .sftp
            .extended(
                "SFTP fstatvfs",
                self.sftp.inner.extensions.fstatvfs,
                "fstatvfs@openssh.com",
                &[&h.bytes],
            )
            .await?;
        match r {
            Reply::Extended(d) => codec::decode_statvfs(&d).map_err(protocol),
            other => Err(unexpected(other, None)),
        }
    }

    /// Waits for every queued write, then closes the handle and waits for
    /// the server's answer: the first error of any write, or of the close.
    pub async fn close(mut self) -> Result<()> {
        let flushed = std::future::poll_fn(|cx| self.poll_writes(cx, 0)).await;
        self.reads.restart(self.pos);
        if self.handle.closed.replace(true) {
            return flushed;
        }
        let h = self.handle.clone();
        let r = self
            .sftp
            .timed("SFTP close", async {
                status_ok(self.client().close(&h.bytes).await?, None)
            })
            .await;
        flushed.and(r)
    }

    /// Polls finished writes off the front until at most `keep` remain.
    fn poll_writes(&mut self, cx: &mut Context<'_>, keep: usize) -> Poll<Result<()>> {
        while self.writes.len() > keep {
            if let Some(Err(e)) = ready!(self.writes.poll_front(cx, None)) {
                self.write_error.get_or_insert(e);
            }
        }
        match self.write_error.take() {
            Some(e) => Poll::Ready(Err(e)),
            None => Poll::Ready(Ok(())),
        }
    }

    /// Drops the read-ahead: the cursor moved.
    fn reset_reads(&mut self) {
        self.reads.restart(self.pos);
        self.buf = Rope::new();
        self.depth = 1;
        self.eof = false;
    }

    fn poll_read_inner(&mut self, cx: &mut Context<'_>, out: &mut ReadBuf<'_>) -> Poll<Result<()>> {
        self.check_open()?;
        if !self.writes.is_empty() {
            ready!(self.poll_writes(cx, 0))?;
        }
        loop {
            if !self.buf.is_empty() {
                // As much as fits, across the pieces the data arrived in.
                while out.remaining() > 0 && !self.buf.is_empty() {
                    let piece = self.buf.chunk();
                    let n = out.remaining().min(piece.len());
                    out.put_slice(&piece[..n]);
                    self.buf.advance(n);
                    self.pos += n as u64;
                }
                return Poll::Ready(Ok(()));
            }
            if self.eof || out.remaining() == 0 {
                return Poll::Ready(Ok(()));
            }
            let size = self.sftp.inner.read_size;
            while self.reads.len() < self.depth {
                self.reads
                    .push(&self.sftp.inner.client, &self.handle.bytes, size, ());
            }
            match ready!(self.reads.poll_front(cx, None))? {
                Chunk::Data { data, short, .. } => {
                    // A short read restarted the read-ahead from its end.
                    if !short && self.depth * (size as usize) < READ_AHEAD_BYTES {
                        self.depth *= 2;
                    }
                    self.buf = data;
                }
                Chunk::Eof { .. } => self.eof = true,
            }
        }
    }

    fn poll_write_inner(&mut self, cx: &mut Context<'_>, data: &[u8]) -> Poll<Result<usize>> {
        self.check_open()?;
        if !self.reads.is_empty() || !self.buf.is_empty() {
            self.reset_reads();
        }
        let behind = (WRITE_BEHIND_BYTES / self.sftp.inner.write_size as usize).max(2);
        ready!(self.poll_writes(cx, behind - 1))?;
        let n = data.len().min(self.sftp.inner.write_size as usize);
        if n == 0 {
            return Poll::Ready(Ok(0));
        }
        self.writes.push(
            &self.sftp.inner.client,
            &self.handle.bytes,
            self.pos,
            &data[..n],
            (),
        );
        self.pos += n as u64;
        if let Some(Err(e)) = self.writes.poll_back(cx) {
            self.write_error.get_or_insert(e);
        }
        Poll::Ready(Ok(n))
    }
}

impl AsyncRead for File {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        self.get_mut()
            .poll_read_inner(cx, buf)
            .map_err(io::Error::from)
    }
}

impl AsyncWrite for File {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.get_mut()
            .poll_write_inner(cx, buf)
            .map_err(io::Error::from)
    }

    /// Waits until every queued write is acknowledged by the server.
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.get_mut().poll_writes(cx, 0).map_err(io::Error::from)
    }

    /// Waits for the writes; the handle stays open until [`File::close`]
    /// or drop.
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.get_mut().poll_writes(cx, 0).map_err(io::Error::from)
    }
}

impl AsyncSeek for File {
    fn start_seek(self: Pin<&mut Self>, to: SeekFrom) -> io::Result<()> {
        let this = self.get_mut();
        let target = |base: u64, delta: i64| {
            base.checked_add_signed(delta).ok_or_else(|| {
                io::Error::new(
                    io::ErrorKind::InvalidInput,
                    "seek before the start or past u64",
                )
            })
        };
        this.seek = match to {
            SeekFrom::Start(n) => SeekState::Done(n),
            SeekFrom::Current(d) => SeekState::Done(target(this.pos, d)?),
            SeekFrom::End(d) => SeekState::Sizing(this.client().fstat(&this.handle.bytes), d),
        };
        Ok(())
    }

    fn poll_complete(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<u64>> {
        let this = self.get_mut();
        // Queued writes land where they were aimed; wait for them so that
        // a size read from the server includes them.
        ready!(this.poll_writes(cx, 0))?;
        let to = match &mut this.seek {
            SeekState::Idle => return Poll::Ready(Ok(this.pos)),
            SeekState::Done(n) => *n,
            SeekState::Sizing(f, d) => {
                let d = *d;
                let r = ready!(Pin::new(f).poll(cx));
                this.seek = SeekState::Idle;
                let size = match r? {
                    Reply::Attrs(FileAttributes { size: Some(s), .. }) => s,
                    Reply::Attrs(_) => {
                        return Poll::Ready(Err(io::Error::new(
                            io::ErrorKind::Unsupported,
                            "the server did not report the file's size",
                        )));
                    }
                    other => return Poll::Ready(Err(unexpected(other, None).into())),
                };
                size.checked_add_signed(d).ok_or_else(|| {
                    io::Error::new(io::ErrorKind::InvalidInput, "seek before the start")
                })?
            }
        };
        this.seek = SeekState::Idle;
        if to != this.pos {
            this.pos = to;
            this.reset_reads();
        }
        Poll::Ready(Ok(to))
    }
}

impl Drop for File {
    fn drop(&mut self) {
        // Abandon what is in flight (its replies are discarded on arrival),
        // then close the handle in the background. Read-ahead data can be
        // a megabyte in large buffers: freed on the driver task, not on
        // the dropper's path (returning big blocks to the kernel costs
        // tens of microseconds each).
        let parked = (
            std::mem::take(&mut self.reads),
            std::mem::take(&mut self.writes),
            std::mem::take(&mut self.buf),
        );
        if !parked.0.is_empty() || !parked.2.is_empty() {
            self.sftp
                .inner
                .client
                .chan
                .session
                .reactor()
                .run_soon(Box::new(move |_| drop(parked)));
        }
        if !self.handle.closed.replace(true) {
            self.client().close_in_background(&self.handle.bytes);
        }
    }
}
