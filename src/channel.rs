//! [`Channel`]: a session channel (exec, shell, subsystem) with tokio
//! `AsyncRead`/`AsyncWrite` for stdout/stdin and a separate stderr reader.

use std::cell::{Cell, RefCell};
use std::io;
use std::os::raw::{c_char, c_int, c_uint};
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll, ready};

use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::error::{Error, Result};
use crate::ffi;
use crate::session::children::Release;
use crate::session::{Abandon, SessionInner, code, cstring};
use crate::transport::alloc::TakenBlock;
use crate::transport::{Link, OUTBOUND_HIGH_WATER};

/// How a remote process ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExitStatus {
    /// The exit code the server reported (0 if it reported none).
    pub code: i32,
    /// The signal that ended the process (`"TERM"`, `"KILL"`, …), if any:
    /// the server's text, control characters escaped, at most 1 KiB kept.
    pub signal: Option<String>,
}

impl ExitStatus {
    /// Exited with code 0 and no signal.
    pub fn success(&self) -> bool {
        self.code == 0 && self.signal.is_none()
    }
}

/// A session channel. Reading it yields the remote stdout, writing it feeds
/// the remote stdin; [`Channel::stderr`] gives a reader of stderr.
///
/// Dropping a channel never blocks: the close it owes the server is sent
/// and awaited by its session in the background.
///
/// # Unread output is bounded by the window
///
/// libssh2 keeps what the server sent on the channel (stdout and stderr
/// alike) in its packet list until it is read, and the server may send
/// only as much as the channel's receive window allows. The window is
/// reopened for bytes once they are *read*, on either stream: stderr that
/// nobody reads keeps its share of the window. Reads are capped at the
/// initial window ([`Config::channel_window`](crate::Config::channel_window),
/// 2 MiB by default), or at 32 KiB for a smaller window, so the window
/// never exceeds the initial window plus that cap (plus 1 KiB): 4 MiB by
/// default, and that is the most output libssh2 ever holds for a channel:
/// a server flooding stderr while only stdout is read cannot make it hold
/// more (what it sends past the window is dropped, as RFC 4254 allows).
/// The bound is
/// on data bytes: libssh2 keeps each packet in allocations of its own
/// (about 100 bytes besides the data with padding and MAC), so a server
/// that splits its output into 1-byte packets makes the memory up to about
/// 100 times the window (the transfer of those packets costs it about
/// half that in bytes sent).
///
/// The flip side: a remote process whose stderr fills the window blocks
/// until stderr is read, and its stdout then stops too. Read both (as
/// [`Channel::wait`] asks), or call [`Channel::discard_stderr`] to have
/// stderr thrown away as it arrives.
pub struct Channel {
    inner: Rc<ChannelInner>,
}

/// A reader of a channel's stderr (extended data stream 1).
pub struct Stderr {
    inner: Rc<ChannelInner>,
}

pub(crate) struct ChannelInner {
    pub(crate) session: Rc<SessionInner>,
    raw: Cell<*mut ffi::LIBSSH2_CHANNEL>,
    /// A request (exec, pty, …) was abandoned half-way.
    abandoned: Cell<bool>,
    /// Data accepted from the caller that libssh2 has not taken yet.
    pending_write: RefCell<Vec<u8>>,
    eof_sent: Cell<bool>,
    /// Stderr is read and dropped whenever stdout is read.
    discard_stderr: Cell<bool>,
    /// Stderr bytes dropped that way.
    stderr_discarded: Cell<u64>,
    /// The most one read asks for (see `poll_read_raw`); 0 until the
    /// first read looks up the channel's initial window, which never
    /// changes.
    read_cap: Cell<usize>,
}

/// libssh2 writes at most this much per call.
const MAX_WRITE: usize = 32700;

/// The smallest cap on one read: below it a read is as large as asked.
const MIN_READ_CAP: usize = 32 * 1024;

/// Chunks smaller than this are copied out of their packet, which is
/// freed at once: a block held for a few bytes would cost far more than
/// they do.
const CHUNK_COPY_BELOW: usize = 1024;

/// The read size a chunk read stands for when libssh2 keeps the window: it
/// is reopened to the initial window plus this much once a quarter of the
/// initial window is consumed. A larger window lets the server go on
/// while receives wait to batch: one session reading 1 GiB on loopback
/// did 1,060 MB/s with 32 KiB here, 1,300 with 256 KiB and 1,570 with
/// 1 MiB (client CPU per GiB 0.369, 0.345, 0.313). Within the bound of
/// the [`Channel`] docs (initial window plus the read cap).
const CHUNK_WANT: usize = 1024 * 1024;

/// Bytes of stderr dropped per libssh2 call in discard mode.
const DISCARD_CHUNK: usize = 16 * 1024;

/// Whether a channel read takes part in tokio's cooperative budget.
#[derive(Clone, Copy)]
enum Budget {
    /// Yields (`Pending`, the task woken) once the task's budget is spent.
    Cooperative,
    /// Never yields for the budget: the caller bounds its own reads.
    Exempt,
}

impl ChannelInner {
    pub(crate) fn new(session: Rc<SessionInner>, raw: *mut ffi::LIBSSH2_CHANNEL) -> Rc<Self> {
        Rc::new(ChannelInner {
            session,
            raw: Cell::new(raw),
            abandoned: Cell::new(false),
            pending_write: RefCell::new(Vec::new()),
            eof_sent: Cell::new(false),
            discard_stderr: Cell::new(false),
            stderr_discarded: Cell::new(0),
            read_cap: Cell::new(0),
        })
    }

    fn raw(&self) -> Result<*mut ffi::LIBSSH2_CHANNEL> {
        let raw = self.raw.get();
        // A freed session took its channels with it.
        if raw.is_null() || self.session.raw().is_err() {
            Err(Error::Closed("channel"))
        } else {
            Ok(raw)
        }
    }

    /// Repeats a libssh2 call on this channel until it stops saying EAGAIN.
    async fn call<T>(
        &self,
        mut f: impl FnMut(*mut ffi::LIBSSH2_CHANNEL) -> std::result::Result<T, c_int>,
    ) -> Result<T> {
        std::future::poll_fn(|cx| {
            let raw = match self.raw() {
                Ok(r) => r,
                Err(e) => return Poll::Ready(Err(e)),
            };
            self.session.poll_call(cx, &mut |_| f(raw))
        })
        .await
    }

    /// A channel request (exec, pty, env, …): libssh2 keeps its half-done
    /// state in the channel, so an abandoned one makes the channel unusable.
    async fn request(
        &self,
        operation: &'static str,
        f: impl FnMut(*mut ffi::LIBSSH2_CHANNEL) -> std::result::Result<(), c_int>,
    ) -> Result<()> {
        self.session
            .with_timeout(operation, async {
                if self.abandoned.get() {
                    return Err(Error::Poisoned("channel"));
                }
                let guard = Abandon::new(&self.abandoned);
                let r = self.call(f).await;
                guard.done();
                r
            })
            .await
    }

    fn poll_read_stream(
        &self,
        cx: &mut Context<'_>,
        stream: c_int,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        // SAFETY: libssh2 only writes into the unfilled part; we mark as
        // initialized exactly the bytes it reports.
        let dst = unsafe { buf.unfilled_mut() };
        if dst.is_empty() {
            return Poll::Ready(Ok(()));
        }
        let n = ready!(self.poll_read_raw(
            cx,
            stream,
            dst.as_mut_ptr() as *mut c_char,
            dst.len(),
            Budget::Cooperative
        ))?;
        // SAFETY: libssh2 wrote `n` bytes at the start of the unfilled part.
        unsafe { buf.assume_init(n) };
        buf.advance(n);
        Poll::Ready(Ok(()))
    }

    /// One libssh2 read of `stream` into `dst`: bytes read (0 at EOF), or
    /// `Pending` with the waker registered for the session's next input.
    pub(crate) fn poll_read_into(
        &self,
        cx: &mut Context<'_>,
        stream: c_int,
        dst: &mut [u8],
    ) -> Poll<io::Result<usize>> {
        self.poll_read_raw(
            cx,
            stream,
            dst.as_mut_ptr() as *mut c_char,
            dst.len(),
            Budget::Cooperative,
        )
    }

    /// [`Self::poll_read_into`] appending to `dst`'s spare capacity, which
    /// is left uninitialized: no zeroing of buffers that libssh2 is about
    /// to overwrite. Bytes read (0 at EOF or when `dst` is full).
    pub(crate) fn poll_read_spare(
        &self,
        cx: &mut Context<'_>,
        stream: c_int,
        dst: &mut bytes::BytesMut,
    ) -> Poll<io::Result<usize>> {
        let mut spare = ReadBuf::uninit(dst.spare_capacity_mut());
        ready!(self.poll_read_stream(cx, stream, &mut spare))?;
        let n = spare.filled().len();
        // SAFETY: `poll_read_stream` filled (initialized) the first `n`
        // bytes of the spare capacity.
        unsafe { dst.set_len(dst.len() + n) };
        Poll::Ready(Ok(n))
    }

    /// [`Self::poll_read_into`] for memory that may be uninitialized: the
    /// caller keeps `dst` valid for writes of `len` bytes during the call.
    fn poll_read_raw(
        &self,
        cx: &mut Context<'_>,
        stream: c_int,
        dst: *mut c_char,
        len: usize,
        budget: Budget,
    ) -> Poll<io::Result<usize>> {
        let raw = self.raw()?;
        // libssh2 opens the window to the initial size plus the length of
        // the read (more if the read exceeds the window): capping reads at
        // the initial window caps the window, and with it what unread
        // stderr can make libssh2 hold, at twice the initial window.
        let len = len.min(self.read_cap());
        let discard = stream == 0 && self.discard_stderr.get();
        // Tokio's cooperative budget, as its own sockets do: a loop that
        // reads a channel whose data never runs out yields now and then, so
        // futures sharing its task (a `select!`, a `join!`) and other tasks
        // still run.
        let coop = match budget {
            Budget::Cooperative => Some(ready!(tokio::task::coop::poll_proceed(cx))),
            Budget::Exempt => None,
        };
        let n = ready!(self.session.poll_call(cx, &mut |_| {
            if discard {
                self.drop_queued_stderr(raw)?;
            }
            // SAFETY: live channel; the caller keeps `dst` writable for
            // `len` bytes, and libssh2 writes at most that many.
            let n = unsafe { ffi::libssh2_channel_read_ex(raw, stream, dst, len) };
            if n < 0 {
                Err(n as c_int)
            } else {
                Ok(n as usize)
            }
        }))?;
        if let Some(coop) = coop {
            coop.made_progress();
        }
        Poll::Ready(Ok(n))
    }

    /// The stream's next packet of data, handed over by libssh2 with no
    /// copy (patch 0020): `None` at EOF, `Pending` with the waker
    /// registered for the session's next input.
    pub(crate) fn poll_read_chunk(
        &self,
        cx: &mut Context<'_>,
        stream: c_int,
    ) -> Poll<io::Result<Option<Bytes>>> {
        let taken = ready!(self.poll_take_block(cx, stream, Budget::Cooperative))?;
        Poll::Ready(Ok(taken.map(|block| {
            if block.as_ref().len() < CHUNK_COPY_BELOW {
                Bytes::copy_from_slice(block.as_ref())
            } else {
                Bytes::from_owner(block)
            }
        })))
    }

    /// The stream's next packet of data as libssh2's block itself (the
    /// caller keeps it, or copies its bytes and frees it at once, back to
    /// the thread's cache), outside tokio's cooperative budget: for a
    /// caller that bounds its own reads and may poll with a waker nobody
    /// listens to (`Waker::noop()`: a reader run from a receive hook). The
    /// budget's `Pending` would wake that waker only, and the bytes would
    /// wait in the session for the next receive, which may never come.
    /// `Pending` from here always means no input.
    pub(crate) fn poll_read_block_unbudgeted(
        &self,
        cx: &mut Context<'_>,
        stream: c_int,
    ) -> Poll<io::Result<Option<TakenBlock>>> {
        self.poll_take_block(cx, stream, Budget::Exempt)
    }

    fn poll_take_block(
        &self,
        cx: &mut Context<'_>,
        stream: c_int,
        budget: Budget,
    ) -> Poll<io::Result<Option<TakenBlock>>> {
        let raw = self.raw()?;
        // What libssh2 keeps the window open for beyond its initial size,
        // as for a read into a buffer of that size (see `CHUNK_WANT`).
        let want = CHUNK_WANT.min(self.read_cap());
        let discard = stream == 0 && self.discard_stderr.get();
        let coop = match budget {
            Budget::Cooperative => Some(ready!(tokio::task::coop::poll_proceed(cx))),
            Budget::Exempt => None,
        };
        let alloc = &self.session.transport.context.alloc;
        let taken = ready!(self.session.poll_call(cx, &mut |_| {
            if discard {
                self.drop_queued_stderr(raw)?;
            }
            let mut block = std::ptr::null_mut();
            let mut offset = 0;
            // SAFETY: live channel; libssh2 writes the two out-parameters.
            let n = unsafe {
                ffi::libssh2_channel_read_take(raw, stream, want, &mut block, &mut offset)
            };
            if n < 0 {
                return Err(n as c_int);
            }
            if n == 0 || block.is_null() {
                return Ok(None);
            }
            // SAFETY: on a positive return libssh2 handed `block` over: a
            // live block of this session's allocator that it no longer
            // holds, its `n` bytes of data at `offset`.
            match unsafe { alloc.take_over(block, offset, n as usize) } {
                Some(b) => Ok(Some(b)),
                None => Err(ffi::LIBSSH2_ERROR_OUT_OF_BOUNDARY),
            }
        }))?;
        if let Some(coop) = coop {
            coop.made_progress();
        }
        Poll::Ready(Ok(taken))
    }

    /// The largest read: the initial window (see `poll_read_raw`).
    fn read_cap(&self) -> usize {
        if self.read_cap.get() == 0
            && let Ok(raw) = self.raw()
        {
            let mut initial: std::os::raw::c_ulong = 0;
            // SAFETY: live channel; libssh2 only stores the initial window
            // size.
            unsafe { ffi::libssh2_channel_window_read_ex(raw, std::ptr::null_mut(), &mut initial) };
            self.read_cap.set((initial as usize).max(MIN_READ_CAP));
        }
        self.read_cap.get().max(MIN_READ_CAP)
    }

    /// Reads and drops the stderr libssh2 holds for the channel (which
    /// reopens the window for it); stops when none is left.
    fn drop_queued_stderr(&self, raw: *mut ffi::LIBSSH2_CHANNEL) -> std::result::Result<(), c_int> {
        let mut scratch = [0u8; DISCARD_CHUNK];
        loop {
            // SAFETY: live channel (the caller's); `scratch` is writable for
            // its length, and libssh2 writes at most that many bytes.
            let n = unsafe {
                ffi::libssh2_channel_read_ex(
                    raw,
                    1,
                    scratch.as_mut_ptr() as *mut c_char,
                    scratch.len(),
                )
            };
            match n {
                n if n > 0 => self
                    .stderr_discarded
                    .set(self.stderr_discarded.get() + n as u64),
                // No stderr left (0: the server's EOF).
                0 => return Ok(()),
                n if n as c_int == ffi::LIBSSH2_ERROR_EAGAIN => return Ok(()),
                n => return Err(n as c_int),
            }
        }
    }

    /// One libssh2 write of `data` (at most [`MAX_WRITE`] bytes): bytes
    /// taken, or `Pending` while the window or the socket is full.
    pub(crate) fn poll_write_raw(
        &self,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let raw = self.raw()?;
        let len = data.len().min(MAX_WRITE);
        let n = ready!(self.session.poll_call(cx, &mut |_| {
            // SAFETY: live channel; `data` outlives the call.
            let n = unsafe {
                ffi::libssh2_channel_write_ex(raw, 0, data.as_ptr() as *const c_char, len)
            };
            // 0: no window left and nothing to read; wait like for EAGAIN.
            match n {
                0 => Err(ffi::LIBSSH2_ERROR_EAGAIN),
                n if n < 0 => Err(n as c_int),
                n => Ok(n as usize),
            }
        }))?;
        Poll::Ready(Ok(n))
    }

    /// Hands `pending_write` to libssh2 until it is all taken.
    pub(crate) fn poll_drive_pending(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        loop {
            let pending = std::mem::take(&mut *self.pending_write.borrow_mut());
            if pending.is_empty() {
                return Poll::Ready(Ok(()));
            }
            let r = self.poll_write_raw(cx, &pending);
            let mut slot = self.pending_write.borrow_mut();
            *slot = pending;
            match r {
                Poll::Ready(Ok(n)) => {
                    slot.drain(..n);
                }
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => return Poll::Pending,
            }
        }
    }

    pub(crate) fn wait_transport(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let session = &self.session;
        if !matches!(session.transport.bridge().link(), Link::Open) {
            return Poll::Ready(Err(session.error(ffi::LIBSSH2_ERROR_SOCKET_SEND).into()));
        }
        session.transport.register(cx.waker());
        Poll::Pending
    }

    /// Writes to stdin: bytes taken, or `Pending` under backpressure.
    pub(crate) fn poll_write(&self, cx: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
        ready!(self.poll_drive_pending(cx))?;
        let session = &self.session;
        // Backpressure before libssh2: its send callback must always take
        // the whole packet.
        if session.transport.outbound_pending() >= OUTBOUND_HIGH_WATER {
            session.transport.pump();
            ready!(self.wait_transport(cx))?;
        }
        match self.poll_write_raw(cx, data) {
            Poll::Ready(r) => Poll::Ready(r),
            Poll::Pending => {
                // libssh2 may hold half-built state that must be resumed
                // with the same bytes: keep a copy and report it taken. The
                // waker is registered; the copy is driven by the next call.
                let len = data.len().min(MAX_WRITE);
                self.pending_write
                    .borrow_mut()
                    .extend_from_slice(&data[..len]);
                Poll::Ready(Ok(len))
            }
        }
    }

    fn poll_flush(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        ready!(self.poll_drive_pending(cx))?;
        let t = &self.session.transport;
        t.pump();
        if t.outbound_pending() == 0 {
            return Poll::Ready(Ok(()));
        }
        self.wait_transport(cx)
    }

    /// Flushes what was written, then sends EOF (once).
    pub(crate) fn poll_send_eof(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        ready!(self.poll_flush(cx))?;
        if self.eof_sent.get() {
            return Poll::Ready(Ok(()));
        }
        let raw = self.raw()?;
        let r = ready!(self.session.poll_call(cx, &mut |_| {
            // SAFETY: live channel.
            code(unsafe { ffi::libssh2_channel_send_eof(raw) })
        }));
        r?;
        self.eof_sent.set(true);
        self.poll_flush(cx)
    }

    /// Sends EOF, waits for the server's EOF (its output is complete), then
    /// closes. Closing before the server's EOF can make it discard stdin
    /// data it has not yet written to the process.
    async fn finish(&self) -> Result<()> {
        std::future::poll_fn(|cx| self.poll_send_eof(cx)).await?;
        self.call(|raw| {
            // SAFETY: live channel.
            code(unsafe { ffi::libssh2_channel_wait_eof(raw) })
        })
        .await?;
        self.close().await?;
        // libssh2's close stops waiting after the first packet of any kind;
        // the exit status comes before the server's CLOSE, so wait for that.
        self.call(|raw| {
            // SAFETY: live channel whose remote EOF has been seen.
            code(unsafe { ffi::libssh2_channel_wait_closed(raw) })
        })
        .await
    }

    /// Sends EOF and CLOSE at once and processes input until a packet
    /// arrives (libssh2's close does not wait for the peer's CLOSE itself).
    pub(crate) async fn close(&self) -> Result<()> {
        let _ = std::future::poll_fn(|cx| self.poll_flush(cx)).await;
        self.call(|raw| {
            // SAFETY: live channel.
            code(unsafe { ffi::libssh2_channel_close(raw) })
        })
        .await
    }
}

impl Release for ChannelInner {
    /// Gives the libssh2 channel back to the session (freed now or later).
    fn release(&self) {
        let raw = self.raw.replace(std::ptr::null_mut());
        if raw.is_null() {
            return;
        }
        if self.session.transport.bridge().link() == Link::Dead {
            // Teardown: the free does no IO and cannot wait.
            self.session.free_channel_dead(raw);
        } else {
            SessionInner::defer_free(&self.session, raw);
        }
    }
}

impl ChannelInner {
    fn exit_status(&self) -> Result<ExitStatus> {
        let raw = self.raw()?;
        // SAFETY: live channel; the signal name is copied and then freed
        // with libssh2's allocator, as its docs require.
        unsafe {
            let code = ffi::libssh2_channel_get_exit_status(raw);
            let mut sig: *mut c_char = std::ptr::null_mut();
            let mut sig_len = 0usize;
            ffi::libssh2_channel_get_exit_signal(
                raw,
                &mut sig,
                &mut sig_len,
                std::ptr::null_mut(),
                std::ptr::null_mut(),
                std::ptr::null_mut(),
                std::ptr::null_mut(),
            );
            let signal = if sig.is_null() {
                None
            } else {
                // The server's text: printable, at most 1 KiB.
                let s = crate::session::remote_text(std::slice::from_raw_parts(
                    sig as *const u8,
                    sig_len,
                ));
                if let Ok(sess) = self.session.raw() {
                    ffi::libssh2_free(sess, sig as *mut _);
                }
                Some(s)
            };
            Ok(ExitStatus { code, signal })
        }
    }
}

impl Drop for ChannelInner {
    fn drop(&mut self) {
        self.release();
        self.session.children.channels.prune();
    }
}

impl Channel {
    pub(crate) fn from_inner(inner: Rc<ChannelInner>) -> Self {
        Channel { inner }
    }

    pub(crate) fn inner(&self) -> &Rc<ChannelInner> {
        &self.inner
    }

    /// The session this channel belongs to.
    pub(crate) fn session(&self) -> Rc<SessionInner> {
        self.inner.session.clone()
    }

    async fn process_startup(
        &mut self,
        request: &'static str,
        message: Option<&str>,
    ) -> Result<()> {
        let msg = message.map(|m| cstring(request, m)).transpose()?;
        self.inner
            .request(request, |raw| {
                // SAFETY: live channel; the strings outlive the call.
                code(unsafe {
                    ffi::libssh2_channel_process_startup(
                        raw,
                        request.as_ptr() as *const c_char,
                        request.len() as c_uint,
                        msg.as_ref().map_or(std::ptr::null(), |m| m.as_ptr()),
                        msg.as_ref().map_or(0, |m| m.as_bytes().len() as c_uint),
                    )
                })
            })
            .await
    }

    /// Runs `command` through the user's shell on the server.
    pub async fn exec(&mut self, command: &str) -> Result<()> {
        self.process_startup("exec", Some(command)).await
    }

    /// Starts the user's login shell.
    pub async fn shell(&mut self) -> Result<()> {
        self.process_startup("shell", None).await
    }

    /// Starts a subsystem (`sftp`, …).
    pub async fn subsystem(&mut self, name: &str) -> Result<()> {
        self.process_startup("subsystem", Some(name)).await
    }

    /// Asks for a pseudo-terminal of type `term` (`"xterm"`, …) and size.
    pub async fn request_pty(&mut self, term: &str, columns: u32, rows: u32) -> Result<()> {
        self.inner
            .request("pty request", |raw| {
                // SAFETY: live channel; `term` outlives the call.
                code(unsafe {
                    ffi::libssh2_channel_request_pty_ex(
                        raw,
                        term.as_ptr() as *const c_char,
                        term.len() as c_uint,
                        std::ptr::null(),
                        0,
                        columns as c_int,
                        rows as c_int,
                        0,
                        0,
                    )
                })
            })
            .await
    }

    /// Sets an environment variable for the command (the server must accept
    /// it: OpenSSH's `AcceptEnv`).
    pub async fn setenv(&mut self, name: &str, value: &str) -> Result<()> {
        self.inner
            .request("env request", |raw| {
                // SAFETY: live channel; the strings outlive the call.
                code(unsafe {
                    ffi::libssh2_channel_setenv_ex(
                        raw,
                        name.as_ptr() as *const c_char,
                        name.len() as c_uint,
                        value.as_ptr() as *const c_char,
                        value.len() as c_uint,
                    )
                })
            })
            .await
    }

    /// From now on, reading stdout first reads and drops whatever stderr
    /// has arrived, so that stderr nobody reads cannot fill the channel
    /// window and stall the remote process (see the type's documentation).
    /// A [`Stderr`] reader may still read: it gets what arrives between two
    /// reads of stdout. Dropped bytes are counted in
    /// [`Channel::stderr_discarded`].
    pub fn discard_stderr(&self) {
        self.inner.discard_stderr.set(true);
    }

    /// Stderr bytes dropped since [`Channel::discard_stderr`].
    pub fn stderr_discarded(&self) -> u64 {
        self.inner.stderr_discarded.get()
    }

    /// A reader of the remote stderr, usable at the same time as this channel.
    pub fn stderr(&self) -> Stderr {
        Stderr {
            inner: self.inner.clone(),
        }
    }

    /// Sends EOF: the remote stdin ends. Writing afterwards fails.
    pub async fn send_eof(&mut self) -> Result<()> {
        let inner = &self.inner;
        inner
            .session
            .with_timeout("send EOF", async {
                std::future::poll_fn(|cx| inner.poll_send_eof(cx))
                    .await
                    .map_err(Error::from)
            })
            .await
    }

    /// Whether the server has sent EOF (no more stdout/stderr data after
    /// what is buffered).
    pub fn eof(&self) -> bool {
        self.inner
            .raw()
            // SAFETY: live channel.
            .map(|raw| unsafe { ffi::libssh2_channel_eof(raw) } != 0)
            .unwrap_or(true)
    }

    /// Ends the channel in order — EOF, the server's EOF, CLOSE, the
    /// server's CLOSE (after which the exit status is final) — and returns
    /// how the remote process ended. Read
    /// stdout and stderr to their end first (or stdout after
    /// [`Channel::discard_stderr`]): a process whose output window is full
    /// cannot finish.
    pub async fn wait(&mut self) -> Result<ExitStatus> {
        let inner = &self.inner;
        inner
            .session
            .with_timeout("channel close", async { inner.finish().await })
            .await?;
        inner.exit_status()
    }

    /// The exit status reported so far (code 0 until the server sends one).
    pub fn exit_status(&self) -> Result<ExitStatus> {
        self.inner.exit_status()
    }

    /// The next stdout data as it arrived, with no copy: at most one
    /// packet's worth (up to 32 KiB from OpenSSH), in the memory it was
    /// decrypted into, which the returned [`Bytes`] owns (it may be kept,
    /// sent to another thread, and dropped anywhere). `None` at the end of
    /// stdout. It mixes with [`AsyncRead`] reads: each returns the bytes
    /// that follow the last one's.
    ///
    /// The cheapest way to consume output that is processed in place
    /// (hashed, parsed, written to a file): reading into a buffer copies
    /// every byte once more. A chunk of 1 KiB or more
    /// holds its packet's whole block (36 KiB for a full packet) until
    /// dropped; a smaller one is a copy, so a server sending tiny packets
    /// costs what they carry. The window counts the bytes as read, so
    /// chunks kept without bound are memory without bound.
    pub async fn read_chunk(&mut self) -> io::Result<Option<Bytes>> {
        std::future::poll_fn(|cx| self.inner.poll_read_chunk(cx, 0)).await
    }
}

impl Stderr {
    /// [`Channel::read_chunk`] for stderr: the next stderr data with no
    /// copy, `None` at its end.
    pub async fn read_chunk(&mut self) -> io::Result<Option<Bytes>> {
        std::future::poll_fn(|cx| self.inner.poll_read_chunk(cx, 1)).await
    }
}

impl std::fmt::Debug for Channel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Channel")
            .field("open", &!self.inner.raw.get().is_null())
            .field("eof_sent", &self.inner.eof_sent.get())
            .finish()
    }
}

impl std::fmt::Debug for Stderr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Stderr")
            .field("open", &!self.inner.raw.get().is_null())
            .finish()
    }
}

impl AsyncRead for Channel {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        self.inner.poll_read_stream(cx, 0, buf)
    }
}

impl AsyncRead for Stderr {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        self.inner.poll_read_stream(cx, 1, buf)
    }
}

impl AsyncWrite for Channel {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.inner.poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.inner.poll_flush(cx)
    }

    /// Flushes and sends EOF.
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.inner.poll_send_eof(cx)
    }
}
