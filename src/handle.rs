//! [`SessionHandle`]: a `Send + Sync + Clone` handle on a session that
//! lives on a [`Pool`] thread, for tasks of any runtime (tokio's
//! multi-thread runtime included).
//!
//! [`Session`], [`Channel`], [`Sftp`] and [`File`](crate::sftp::File) are
//! `!Send`: each lives on the thread whose reactor does its IO. A
//! `SessionHandle` owns no libssh2 state itself. Its session is owned by a
//! task on one pool thread (the one with the fewest live tasks when it
//! connected), and every call is a message to that task, which runs the
//! native call there and sends the result back. A call costs one hop
//! between threads each way; exec streams move their bytes in owned
//! [`Bytes`] chunks through bounded queues.
//!
//! The `!Send` API stays the fast path, and the right choice for code that
//! already runs on a pool thread ([`Pool::spawn`]): no hop, no copy
//! between threads. Use handles where the code that drives SSH cannot live
//! on a pool thread: tasks spawned with `tokio::spawn` on a multi-thread
//! runtime, or state shared between such tasks.
//!
//! # Drop
//!
//! Dropping the last clone of a handle (the clones held by
//! [`RemoteProcess`] and [`SftpHandle`] count) drops the session on its
//! thread at once: its task sees the last sender gone, drops every call
//! still running, then the session, with the usual Drop guarantees.
//! Dropping a call's future drops the native call on the pool thread.
//! Dropping a [`RemoteProcess`] drops its native channel there.
//!
//! If the pool thread is gone (the pool shut down), calls fail with
//! [`RuntimeError::PoolClosed`], and exec streams with an IO error that
//! carries it.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::pin::Pin;
use std::rc::Rc;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll, ready};

use bytes::{Bytes, BytesMut};
use futures_util::StreamExt;
use futures_util::future::LocalBoxFuture;
use futures_util::stream::FuturesUnordered;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::sync::{OnceCell, mpsc, oneshot};
use zeroize::Zeroizing;

use crate::channel::{Channel, ChannelInner, ExitStatus};
use crate::error::{Error, Result, RuntimeError};
use crate::pool::Pool;
use crate::session::{Config, Session};
use crate::sftp::{DirEntry, FileAttributes, Sftp, TransferOptions, TransferReport};

/// Bytes of one chunk of exec output at most: what the pump finds ready
/// in one turn, up to this, crosses as one chunk (one wake of the reader).
/// Each wake is a thread switch, so chunks are large; but libssh2 copies
/// every byte into them, and a buffer the reader has returned is reused,
/// so it should still be in the core's cache: 512 KiB, two of them and the
/// one being filled fitting in a 2 MiB L2, costs less than 1 MiB chunks.
pub const EXEC_CHUNK: usize = 512 * 1024;

/// Chunks of one exec stream queued between the pool thread and the
/// reader at most: two, so that the pump rarely waits on a reader that
/// still holds the previous chunk.
pub const EXEC_QUEUE_CHUNKS: usize = 2;

/// Writes to a [`RemoteProcess`]'s stdin queued for the pool thread at
/// most. The pool thread takes the whole queue at once, so that a writer
/// is woken once per queue, not once per write; while it writes them, as
/// many more may be queued. Through `AsyncWrite` a write holds at most
/// [`EXEC_STDIN_CHUNK`] bytes, so at most 2 × 4 × 256 KiB = 2 MiB are held;
/// [`RemoteProcess::write_chunk`] holds its `Bytes` as given.
pub const EXEC_STDIN_QUEUE_CHUNKS: usize = 4;

/// Bytes one `AsyncWrite::poll_write` of a [`RemoteProcess`] copies into a
/// stdin chunk at most.
pub const EXEC_STDIN_CHUNK: usize = 256 * 1024;

/// The most exec output a [`RemoteProcess`] holds outside libssh2, stdout
/// and stderr together: per stream, the queued chunks and the one the
/// pump waits to queue. Past it the pump stops reading, the channel window
/// closes, and the server stops sending. Not counted: the chunk a reader
/// holds, and the rest of the [`EXEC_CHUNK`] buffer a small chunk keeps
/// allocated (chunks are cut from one buffer), up to about 1.5 times this
/// in memory.
pub const EXEC_MAX_BUFFERED: usize = 2 * (EXEC_QUEUE_CHUNKS + 1) * EXEC_CHUNK;

/// The default bound of [`SftpHandle::read`].
pub const SFTP_READ_LIMIT: u64 = 64 << 20;

/// What a pool thread's session task is asked to run: builds a future
/// there, given the session's state.
type Job = Box<dyn FnOnce(Rc<Ctx>) -> LocalBoxFuture<'static, ()> + Send>;

/// The session's state on its pool thread.
struct Ctx {
    session: Session,
    /// One SFTP channel, opened by the first SFTP call and shared by all.
    sftp: OnceCell<Sftp>,
}

impl Ctx {
    async fn sftp(&self) -> Result<Sftp> {
        self.sftp
            .get_or_try_init(|| self.session.sftp())
            .await
            .cloned()
    }
}

// A configuration is moved to the pool thread; the handles are what any
// task of any runtime may hold.
const _: () = {
    const fn send<T: Send>() {}
    const fn send_sync<T: Send + Sync>() {}
    send::<Config>();
    send_sync::<SessionHandle>();
    send_sync::<SftpHandle>();
    send::<RemoteProcess>();
    send::<RemoteStderr>();
};

fn pool_closed() -> Error {
    Error::Runtime(RuntimeError::PoolClosed)
}

/// A `Send + Sync + Clone` handle on a session owned by a [`Pool`] thread.
///
/// ```no_run
/// use uring_ssh::{Config, Pool, PoolConfig, SessionHandle};
///
/// # async fn f() -> Result<(), uring_ssh::Error> {
/// let pool = Pool::new(PoolConfig::new().threads(2))?;
/// let ssh = pool.connect("127.0.0.1", 22, Config::new()).await?;
/// ssh.auth_pubkey_file("me", "/home/me/.ssh/id_ed25519", None).await?;
/// let task = tokio::spawn({
///     let ssh = ssh.clone();
///     async move { ssh.exec("uname -a").await?.output().await }
/// });
/// let (out, status) = task.await.expect("task")?;
/// println!("{} (exit {})", String::from_utf8_lossy(&out), status.code);
/// ssh.close("bye").await
/// # }
/// ```
#[derive(Clone)]
pub struct SessionHandle {
    tx: mpsc::UnboundedSender<Job>,
}

impl std::fmt::Debug for SessionHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SessionHandle")
            .field("pool_thread_alive", &!self.tx.is_closed())
            .finish()
    }
}

impl Pool {
    /// [`SessionHandle::connect`] on this pool.
    pub fn connect(
        &self,
        host: &str,
        port: u16,
        config: Config,
    ) -> impl Future<Output = Result<SessionHandle>> + Send + 'static + use<> {
        SessionHandle::connect(self, host, port, config)
    }

    /// [`SessionHandle::connect_addr`] on this pool.
    pub fn connect_addr(
        &self,
        addr: SocketAddr,
        config: Config,
    ) -> impl Future<Output = Result<SessionHandle>> + Send + 'static + use<> {
        SessionHandle::connect_addr(self, addr, config)
    }
}

impl SessionHandle {
    /// Connects to `host:port` as [`Session::connect`] does, from the pool
    /// thread with the fewest live tasks, which then owns the session.
    ///
    /// The connection starts at once; the future resolves when the
    /// handshake and host-key check are done. Dropping it before then drops
    /// the connection on its thread.
    pub fn connect(
        pool: &Pool,
        host: &str,
        port: u16,
        config: Config,
    ) -> impl Future<Output = Result<SessionHandle>> + Send + 'static + use<> {
        let host = host.to_owned();
        Self::start(pool, move || {
            Box::pin(async move { Session::connect(&host, port, config).await })
        })
    }

    /// Connects to `addr` as [`Session::connect_addr`] does; see
    /// [`SessionHandle::connect`].
    pub fn connect_addr(
        pool: &Pool,
        addr: SocketAddr,
        config: Config,
    ) -> impl Future<Output = Result<SessionHandle>> + Send + 'static + use<> {
        Self::start(pool, move || {
            Box::pin(async move { Session::connect_addr(addr, config).await })
        })
    }

    fn start<F>(
        pool: &Pool,
        connect: F,
    ) -> impl Future<Output = Result<SessionHandle>> + Send + 'static + use<F>
    where
        F: FnOnce() -> LocalBoxFuture<'static, Result<Session>> + Send + 'static,
    {
        let (tx, rx) = mpsc::unbounded_channel::<Job>();
        let (ready_tx, ready_rx) = oneshot::channel::<Result<()>>();
        // Detached: the task reports through `ready_tx`, and lives as long
        // as the handles (or until the pool shuts down).
        let _task = pool.spawn(move || async move {
            let mut ready_tx = ready_tx;
            let connected = tokio::select! {
                r = connect() => r,
                // The caller gave up: drop the half-made connection here.
                _ = ready_tx.closed() => return,
            };
            match connected {
                Ok(session) => {
                    if ready_tx.send(Ok(())).is_ok() {
                        serve(session, rx).await;
                    }
                }
                Err(e) => {
                    let _ = ready_tx.send(Err(e));
                }
            }
        });
        async move {
            match ready_rx.await {
                Ok(Ok(())) => Ok(SessionHandle { tx }),
                Ok(Err(e)) => Err(e),
                Err(_) => Err(pool_closed()),
            }
        }
    }

    /// Sends `job` to the session's task.
    fn send(&self, job: Job) -> Result<()> {
        self.tx.send(job).map_err(|_| pool_closed())
    }

    /// Runs the future `f` builds on the session's thread and brings back
    /// its output. Dropping the returned future drops that one there.
    async fn call<T, F, Fut>(&self, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(Rc<Ctx>) -> Fut + Send + 'static,
        Fut: Future<Output = Result<T>> + 'static,
    {
        let (tx, rx) = oneshot::channel();
        self.send(Box::new(move |ctx| {
            Box::pin(async move {
                let mut tx = tx;
                // A panic (a caller's progress callback, say) ends this
                // call only and reaches its caller; the session and the
                // other calls go on.
                let mut call = std::pin::pin!(f(ctx));
                let run = std::future::poll_fn(move |cx| {
                    let poll = std::panic::AssertUnwindSafe(|| call.as_mut().poll(cx));
                    match std::panic::catch_unwind(poll) {
                        Ok(Poll::Pending) => Poll::Pending,
                        Ok(Poll::Ready(r)) => Poll::Ready(Ok(r)),
                        Err(panic) => Poll::Ready(Err(panic)),
                    }
                });
                tokio::select! {
                    r = run => { let _ = tx.send(r); }
                    _ = tx.closed() => {}
                }
            })
        }))?;
        match rx.await.map_err(|_| pool_closed())? {
            Ok(r) => r,
            Err(panic) => std::panic::resume_unwind(panic),
        }
    }

    /// Authenticates `user` with a private key file, as
    /// [`Session::auth_pubkey_file`] does. The passphrase crosses to the
    /// pool thread in a buffer that is wiped when dropped.
    pub async fn auth_pubkey_file(
        &self,
        user: &str,
        private_key: impl Into<PathBuf>,
        passphrase: Option<&str>,
    ) -> Result<()> {
        let user = user.to_owned();
        let key = private_key.into();
        let pass = passphrase.map(|p| Zeroizing::new(p.to_owned()));
        self.call(move |c| async move {
            c.session
                .auth_pubkey_file(&user, &key, pass.as_ref().map(|p| p.as_str()))
                .await
        })
        .await
    }

    /// Authenticates `user` with a password, as [`Session::auth_password`]
    /// does. The password crosses to the pool thread in a buffer that is
    /// wiped when dropped.
    pub async fn auth_password(&self, user: &str, password: &str) -> Result<()> {
        let user = user.to_owned();
        let password = Zeroizing::new(password.to_owned());
        self.call(move |c| async move { c.session.auth_password(&user, &password).await })
            .await
    }

    /// Whether authentication succeeded.
    pub async fn authenticated(&self) -> Result<bool> {
        self.call(|c| async move { Ok(c.session.authenticated()) })
            .await
    }

    /// Runs `command` on a new channel, as [`Session::exec`] does. The
    /// returned process streams stdin, stdout and stderr between the
    /// caller and a task on the pool thread that owns the native channel.
    pub async fn exec(&self, command: &str) -> Result<RemoteProcess> {
        let command = command.to_owned();
        let (stdin_tx, stdin_rx) = mpsc::channel(EXEC_STDIN_QUEUE_CHUNKS);
        let (stdout_tx, stdout_rx) = mpsc::channel(EXEC_QUEUE_CHUNKS);
        let (stderr_tx, stderr_rx) = mpsc::channel(EXEC_QUEUE_CHUNKS);
        let (wait_tx, wait_rx) = oneshot::channel();
        let (ready_tx, ready_rx) = oneshot::channel::<Result<()>>();
        let counters = Arc::new(Counters::default());
        let pump_counters = counters.clone();
        self.send(Box::new(move |ctx| {
            Box::pin(async move {
                let mut ready_tx = ready_tx;
                let opened = tokio::select! {
                    r = ctx.session.exec(&command) => r,
                    _ = ready_tx.closed() => return,
                };
                drop(ctx);
                match opened {
                    Ok(channel) => {
                        if ready_tx.send(Ok(())).is_ok() {
                            let io = PumpIo {
                                stdin: stdin_rx,
                                stdout: stdout_tx,
                                stderr: stderr_tx,
                                counters: pump_counters,
                            };
                            pump(channel, io, wait_rx).await;
                        }
                    }
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                    }
                }
            })
        }))?;
        ready_rx.await.map_err(|_| pool_closed())??;
        Ok(RemoteProcess {
            _session: self.clone(),
            stdin: Some(stdin_tx),
            reserving: None,
            stdout: Incoming::new(stdout_rx, counters.clone()),
            stderr: Some(Incoming::new(stderr_rx, counters.clone())),
            wait_tx,
            _gone: MarkGone(counters.clone()),
            counters,
        })
    }

    /// The session's SFTP client. The SFTP channel is opened by the first
    /// call through it (of any clone) and shared by all.
    pub fn sftp(&self) -> SftpHandle {
        SftpHandle {
            session: self.clone(),
        }
    }

    /// Graceful close, as [`Session::close`] does. Calls made afterwards
    /// fail as they do on a closed [`Session`] ([`Error::Closed`]); the
    /// session's task lives on until the last handle is dropped.
    pub async fn close(&self, description: &str) -> Result<()> {
        let description = description.to_owned();
        self.call(move |c| async move { c.session.close(&description).await })
            .await
    }

    /// Whether the session was closed or its connection failed.
    pub async fn is_closed(&self) -> Result<bool> {
        self.call(|c| async move { Ok(c.session.is_closed()) })
            .await
    }
}

/// The session's task on its pool thread: runs the jobs the handles send,
/// all at once, until the last handle is gone.
async fn serve(session: Session, mut rx: mpsc::UnboundedReceiver<Job>) {
    let ctx = Rc::new(Ctx {
        session,
        sftp: OnceCell::new(),
    });
    let mut work: FuturesUnordered<LocalBoxFuture<'static, ()>> = FuturesUnordered::new();
    loop {
        tokio::select! {
            job = rx.recv() => match job {
                Some(job) => work.push(job(ctx.clone())),
                None => break,
            },
            Some(()) = work.next(), if !work.is_empty() => {}
        }
    }
    // The jobs hold channels and the SFTP client: drop them before the
    // session, which then goes at once.
    drop(work);
    drop(ctx);
}

/// Bytes of exec output held between the pool thread and the reader.
#[derive(Debug, Default)]
struct Counters {
    now: AtomicUsize,
    peak: AtomicUsize,
    /// The [`RemoteProcess`] is gone (its pump may then end without
    /// marking the streams' end): what a taken [`RemoteStderr`] says.
    process_dropped: std::sync::atomic::AtomicBool,
}

impl Counters {
    fn add(&self, n: usize) {
        let now = self.now.fetch_add(n, Ordering::Relaxed) + n;
        self.peak.fetch_max(now, Ordering::Relaxed);
    }

    fn sub(&self, n: usize) {
        self.now.fetch_sub(n, Ordering::Relaxed);
    }
}

/// What flows to the pump's stdin side.
enum Input {
    Data(Bytes),
    /// Send EOF and say how it went.
    Eof(oneshot::Sender<Result<()>>),
}

/// A chunk of output, an empty chunk marking the stream's end.
type Chunk = io::Result<Bytes>;

/// The pool-thread ends of a process's queues.
struct PumpIo {
    stdin: mpsc::Receiver<Input>,
    stdout: mpsc::Sender<Chunk>,
    stderr: mpsc::Sender<Chunk>,
    counters: Arc<Counters>,
}

/// Moves bytes between the native channel and a [`RemoteProcess`]'s
/// queues; returns (dropping the channel) as soon as the process handle is
/// dropped.
async fn pump(
    mut channel: Channel,
    io: PumpIo,
    mut wait_rx: oneshot::Receiver<oneshot::Sender<Result<ExitStatus>>>,
) {
    let PumpIo {
        stdin,
        stdout,
        stderr,
        counters,
    } = io;
    let mut reply: Option<oneshot::Sender<Result<ExitStatus>>> = None;
    {
        let inner = channel.inner().clone();
        let streams = futures_util::future::join3(
            read_stream(&inner, 0, stdout, &counters),
            read_stream(&inner, 1, stderr, &counters),
            feed_stdin(&mut channel, stdin),
        );
        tokio::pin!(streams);
        loop {
            if let Some(tx) = reply.as_mut() {
                // `wait` was called: go on until the streams end, unless
                // its future is dropped.
                tokio::select! {
                    _ = &mut streams => break,
                    _ = tx.closed() => return,
                }
            } else {
                tokio::select! {
                    _ = &mut streams => break,
                    r = &mut wait_rx => match r {
                        Ok(tx) => reply = Some(tx),
                        // The process handle was dropped.
                        Err(_) => return,
                    },
                }
            }
        }
    }
    let mut reply = match reply {
        Some(r) => r,
        None => match wait_rx.await {
            Ok(r) => r,
            Err(_) => return,
        },
    };
    tokio::select! {
        status = channel.wait() => { let _ = reply.send(status); }
        _ = reply.closed() => {}
    }
}

/// Reads `stream` of the channel into chunks for `tx` until its end; once
/// the reader is gone, reads on and drops, so that the remote process is
/// never stalled by output nobody wants.
async fn read_stream(
    inner: &ChannelInner,
    stream: std::os::raw::c_int,
    tx: mpsc::Sender<Chunk>,
    counters: &Counters,
) {
    let mut tx = Some(tx);
    let mut buf = BytesMut::new();
    loop {
        // Chunks are split off one buffer, read into uninitialized. When it
        // runs short it is taken back whole if the reader has dropped every
        // chunk of it (its memory is still in cache), else replaced (the old
        // one is freed with its chunks).
        if buf.capacity() < EXEC_CHUNK / 4 && !buf.try_reclaim(EXEC_CHUNK) {
            buf = BytesMut::with_capacity(EXEC_CHUNK);
        }
        // Everything already there, in one chunk: each chunk costs the
        // reader a wake-up on another thread.
        // (`buf` is empty here: each chunk takes all it holds.)
        let r = std::future::poll_fn(|cx| {
            loop {
                match inner.poll_read_spare(cx, stream, &mut buf) {
                    Poll::Ready(Ok(n)) if n > 0 => {
                        if buf.len() == buf.capacity() {
                            return Poll::Ready(Ok(buf.len()));
                        }
                    }
                    // The end or an error comes again on the next read.
                    _ if !buf.is_empty() => return Poll::Ready(Ok(buf.len())),
                    other => return other,
                }
            }
        })
        .await;
        let item = match r {
            Ok(0) => Ok(Bytes::new()),
            Ok(_) => Ok(buf.split().freeze()),
            Err(e) => Err(e),
        };
        let last = !matches!(&item, Ok(b) if !b.is_empty());
        if let Some(t) = &tx {
            let n = item.as_ref().map_or(0, Bytes::len);
            counters.add(n);
            if t.send(item).await.is_err() {
                counters.sub(n);
                tx = None;
            }
        }
        if last {
            return;
        }
    }
}

/// Writes what arrives for stdin to the channel; sends EOF when asked or
/// when the writer is gone. Ends (closing the queue, so that writers see a
/// broken pipe) at EOF or on a write error.
async fn feed_stdin(channel: &mut Channel, mut rx: mpsc::Receiver<Input>) {
    let mut batch = Vec::with_capacity(EXEC_STDIN_QUEUE_CHUNKS);
    // Everything queued at once: the writer, woken once, refills the
    // whole queue, rather than once per chunk.
    while rx.recv_many(&mut batch, EXEC_STDIN_QUEUE_CHUNKS).await > 0 {
        for input in batch.drain(..) {
            match input {
                Input::Data(data) => {
                    if channel.write_all(&data).await.is_err() {
                        return;
                    }
                }
                Input::Eof(reply) => {
                    let r = channel.shutdown().await.map_err(Error::Io);
                    let _ = reply.send(r);
                    return;
                }
            }
        }
        // Nothing more queued: what the window held back must still leave
        // (a command typed and waited on).
        if rx.is_empty() && channel.flush().await.is_err() {
            return;
        }
    }
    let _ = channel.shutdown().await;
}

/// One output stream as the caller sees it.
struct Incoming {
    rx: mpsc::Receiver<Chunk>,
    chunk: Bytes,
    ended: bool,
    counters: Arc<Counters>,
}

impl Incoming {
    fn new(rx: mpsc::Receiver<Chunk>, counters: Arc<Counters>) -> Self {
        Incoming {
            rx,
            chunk: Bytes::new(),
            ended: false,
            counters,
        }
    }

    /// The next chunk: `None` at the end.
    fn poll_chunk(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<Option<Bytes>>> {
        if !self.chunk.is_empty() {
            return Poll::Ready(Ok(Some(std::mem::take(&mut self.chunk))));
        }
        if self.ended {
            return Poll::Ready(Ok(None));
        }
        match ready!(self.rx.poll_recv(cx)) {
            Some(Ok(b)) if b.is_empty() => {
                self.ended = true;
                Poll::Ready(Ok(None))
            }
            Some(Ok(b)) => {
                self.counters.sub(b.len());
                Poll::Ready(Ok(Some(b)))
            }
            Some(Err(e)) => {
                self.ended = true;
                Poll::Ready(Err(e))
            }
            // The pump went without marking the end: the process handle
            // was dropped (a taken stderr outlives it), or the pool
            // thread is gone.
            None => {
                self.ended = true;
                let e = if self.counters.process_dropped.load(Ordering::Acquire) {
                    Error::Closed("the remote process (its RemoteProcess is gone)")
                } else {
                    pool_closed()
                };
                Poll::Ready(Err(e.into()))
            }
        }
    }

    fn poll_read(&mut self, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        if buf.remaining() == 0 {
            return Poll::Ready(Ok(()));
        }
        let Some(mut chunk) = ready!(self.poll_chunk(cx))? else {
            return Poll::Ready(Ok(()));
        };
        let n = chunk.len().min(buf.remaining());
        buf.put_slice(&chunk.split_to(n));
        self.chunk = chunk;
        Poll::Ready(Ok(()))
    }
}

/// A remote command started by [`SessionHandle::exec`]: `Send`, usable from
/// any runtime. Reading it yields the remote stdout, writing it feeds the
/// remote stdin; [`RemoteProcess::stderr`] gives the stderr reader.
///
/// Output crosses threads in chunks of at most [`EXEC_CHUNK`] bytes through
/// bounded queues: a reader that does not read makes the pump stop
/// reading, the channel window close and the server stop sending, with at
/// most [`EXEC_MAX_BUFFERED`] bytes held here. As with [`Channel`], stderr
/// that nobody reads stalls the process once the window is full: read it,
/// or call [`RemoteProcess::discard_stderr`].
///
/// Writes are queued to the pool thread (a flush returns once they are
/// queued); [`RemoteProcess::send_eof`] returns once everything written
/// before it has been handed to the channel and EOF sent.
///
/// Holds its session alive. Dropping it drops the native channel on its
/// thread at once (the session finishes the channel's close later).
pub struct RemoteProcess {
    _session: SessionHandle,
    stdin: Option<mpsc::Sender<Input>>,
    /// A write waiting for room in the stdin queue.
    reserving: Option<Reserve>,
    stdout: Incoming,
    stderr: Option<Incoming>,
    wait_tx: oneshot::Sender<oneshot::Sender<Result<ExitStatus>>>,
    counters: Arc<Counters>,
    _gone: MarkGone,
}

/// Marks the process handle gone when dropped (however it goes: dropped,
/// or consumed by `wait`), so that a taken [`RemoteStderr`] whose pump
/// then ends says so rather than that the pool is closed.
struct MarkGone(Arc<Counters>);

impl Drop for MarkGone {
    fn drop(&mut self) {
        self.0.process_dropped.store(true, Ordering::Release);
    }
}

type Reserve = Pin<
    Box<
        dyn Future<
                Output = std::result::Result<mpsc::OwnedPermit<Input>, mpsc::error::SendError<()>>,
            > + Send,
    >,
>;

impl std::fmt::Debug for RemoteProcess {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RemoteProcess")
            .field("stdin_open", &self.stdin.is_some())
            .field("stdout_ended", &self.stdout.ended)
            .field("buffered_bytes", &self.buffered_bytes())
            .finish()
    }
}

/// The remote stderr of a [`RemoteProcess`], `Send`, readable apart from
/// it (from another task or thread).
pub struct RemoteStderr {
    inner: Incoming,
}

impl std::fmt::Debug for RemoteStderr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RemoteStderr")
            .field("ended", &self.inner.ended)
            .finish()
    }
}

fn broken_pipe() -> io::Error {
    io::Error::new(
        io::ErrorKind::BrokenPipe,
        "the remote process's stdin is closed",
    )
}

impl RemoteProcess {
    /// The stderr reader; `None` if it was taken already (or discarded).
    pub fn stderr(&mut self) -> Option<RemoteStderr> {
        self.stderr.take().map(|inner| RemoteStderr { inner })
    }

    /// Drops stderr as it arrives (unless [`RemoteProcess::stderr`] took
    /// its reader), so that it cannot fill the channel window.
    pub fn discard_stderr(&mut self) {
        self.stderr = None;
    }

    /// The next chunk of stdout as it crossed from the pool thread, with
    /// no copy; `None` at the end. Do not mix with partial reads through
    /// `AsyncRead` (a chunk they began is returned first).
    pub async fn read_chunk(&mut self) -> io::Result<Option<Bytes>> {
        std::future::poll_fn(|cx| self.stdout.poll_chunk(cx)).await
    }

    /// Queues `data` for stdin whole, with no copy (at most
    /// [`EXEC_STDIN_QUEUE_CHUNKS`] writes are queued, and as many more
    /// taken and being written; this waits for room).
    pub async fn write_chunk(&mut self, data: Bytes) -> io::Result<()> {
        if data.is_empty() {
            return Ok(());
        }
        let tx = self.stdin.as_ref().ok_or_else(broken_pipe)?;
        tx.send(Input::Data(data)).await.map_err(|_| broken_pipe())
    }

    /// Sends EOF on stdin once everything written before it is handed to
    /// the channel; returns when EOF has left. Writing afterwards fails.
    /// Sending it twice is `Ok`.
    pub async fn send_eof(&mut self) -> Result<()> {
        self.reserving = None;
        let Some(tx) = self.stdin.take() else {
            return Ok(());
        };
        let (reply_tx, reply_rx) = oneshot::channel();
        tx.send(Input::Eof(reply_tx))
            .await
            .map_err(|_| Error::Closed("channel"))?;
        match reply_rx.await {
            Ok(r) => r,
            // The pump stopped feeding stdin before the EOF came (a write
            // failed), or its thread is gone.
            Err(_) if !self.wait_tx.is_closed() => Err(Error::Closed("channel")),
            Err(_) => Err(pool_closed()),
        }
    }

    /// Sends EOF (if not sent), lets the output the caller did not read go
    /// (stdout, and stderr unless its reader was taken: a taken reader must
    /// be read to its end, or dropped), and returns how the remote process
    /// ended once the channel is closed, as [`Channel::wait`] does.
    pub async fn wait(self) -> Result<ExitStatus> {
        let RemoteProcess {
            _session,
            stdin,
            wait_tx,
            stdout,
            stderr,
            ..
        } = self;
        drop((stdin, stdout, stderr));
        let (tx, rx) = oneshot::channel();
        wait_tx.send(tx).map_err(|_| pool_closed())?;
        rx.await.map_err(|_| pool_closed())?
    }

    /// Reads stdout and stderr (unless taken) to their end, each up to
    /// `limit` bytes (past it: [`Error::LimitExceeded`], and the process is
    /// dropped), then waits: `(stdout, stderr, status)`.
    pub async fn output_limited(mut self, limit: usize) -> Result<(Vec<u8>, Vec<u8>, ExitStatus)> {
        self.reserving = None;
        self.stdin = None;
        let mut stderr = self.stderr();
        let mut out = Vec::new();
        let mut err = Vec::new();
        let read_out = read_limited(&mut self.stdout, &mut out, limit);
        let read_err = async {
            match &mut stderr {
                Some(s) => read_limited(&mut s.inner, &mut err, limit).await,
                None => Ok(()),
            }
        };
        // The first error stops both readers (and drops the process):
        // waiting for the other stream would wait for a process blocked on
        // the stream given up.
        tokio::try_join!(read_out, read_err)?;
        let status = self.wait().await?;
        Ok((out, err, status))
    }

    /// Reads stdout to its end (stderr is dropped unless its reader was
    /// taken), up to 64 MiB, then waits: `(stdout, status)`. See
    /// [`RemoteProcess::output_limited`].
    pub async fn output(mut self) -> Result<(Vec<u8>, ExitStatus)> {
        if self.stderr.is_some() {
            self.discard_stderr();
        }
        let (out, _, status) = self.output_limited(64 << 20).await?;
        Ok((out, status))
    }

    /// Output bytes held outside libssh2 right now, stdout and stderr
    /// together: queued for the reader, or waiting to be queued.
    pub fn buffered_bytes(&self) -> usize {
        self.counters.now.load(Ordering::Relaxed)
    }

    /// The most [`RemoteProcess::buffered_bytes`] has been; never above
    /// [`EXEC_MAX_BUFFERED`].
    pub fn peak_buffered_bytes(&self) -> usize {
        self.counters.peak.load(Ordering::Relaxed)
    }
}

/// Reads `from` to its end into `to`, refusing more than `limit` bytes.
async fn read_limited(from: &mut Incoming, to: &mut Vec<u8>, limit: usize) -> Result<()> {
    while let Some(chunk) = std::future::poll_fn(|cx| from.poll_chunk(cx))
        .await
        .map_err(Error::Io)?
    {
        if to.len() + chunk.len() > limit {
            return Err(Error::LimitExceeded {
                what: "remote process output",
                limit: limit as u64,
            });
        }
        to.extend_from_slice(&chunk);
    }
    Ok(())
}

impl AsyncRead for RemoteProcess {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        self.get_mut().stdout.poll_read(cx, buf)
    }
}

impl AsyncRead for RemoteStderr {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        self.get_mut().inner.poll_read(cx, buf)
    }
}

impl AsyncWrite for RemoteProcess {
    /// Copies up to [`EXEC_STDIN_CHUNK`] bytes into one chunk for the pool
    /// thread, once the stdin queue has room.
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if data.is_empty() {
            return Poll::Ready(Ok(0));
        }
        let Some(tx) = &this.stdin else {
            return Poll::Ready(Err(broken_pipe()));
        };
        let permit = match this.reserving.as_mut() {
            Some(r) => ready!(r.as_mut().poll(cx)),
            None => match tx.clone().try_reserve_owned() {
                Ok(p) => Ok(p),
                Err(mpsc::error::TrySendError::Full(tx)) => {
                    let r = this.reserving.insert(Box::pin(tx.reserve_owned()));
                    ready!(r.as_mut().poll(cx))
                }
                Err(mpsc::error::TrySendError::Closed(_)) => Err(mpsc::error::SendError(())),
            },
        };
        this.reserving = None;
        let Ok(permit) = permit else {
            return Poll::Ready(Err(broken_pipe()));
        };
        let n = data.len().min(EXEC_STDIN_CHUNK);
        permit.send(Input::Data(Bytes::copy_from_slice(&data[..n])));
        Poll::Ready(Ok(n))
    }

    /// Ready once nothing waits for room: what was written is queued.
    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    /// Closes stdin: the pool thread sends EOF after what was queued.
    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        this.reserving = None;
        this.stdin = None;
        Poll::Ready(Ok(()))
    }
}

/// The SFTP client of a [`SessionHandle`]: `Send + Sync + Clone`. Its calls
/// run on the session's thread over one SFTP channel per session, opened by
/// the first call; it keeps the session alive.
#[derive(Debug, Clone)]
pub struct SftpHandle {
    session: SessionHandle,
}

impl SftpHandle {
    async fn call<T, F, Fut>(&self, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(Sftp) -> Fut + Send + 'static,
        Fut: Future<Output = Result<T>> + 'static,
    {
        self.session
            .call(move |c| async move {
                let sftp = c.sftp().await?;
                drop(c);
                f(sftp).await
            })
            .await
    }

    /// [`Sftp::stat`].
    pub async fn stat(&self, path: impl Into<PathBuf>) -> Result<FileAttributes> {
        let path = path.into();
        self.call(move |s| async move { s.stat(&path).await }).await
    }

    /// [`Sftp::read_dir_all`]: the whole listing without `.` and `..`, as
    /// long as the server makes it.
    pub async fn read_dir(&self, path: impl Into<PathBuf>) -> Result<Vec<DirEntry>> {
        let path = path.into();
        self.call(move |s| async move { s.read_dir_all(&path).await })
            .await
    }

    /// [`Sftp::mkdir`].
    pub async fn mkdir(&self, path: impl Into<PathBuf>, mode: u32) -> Result<()> {
        let path = path.into();
        self.call(move |s| async move { s.mkdir(&path, mode).await })
            .await
    }

    /// [`Sftp::rmdir`].
    pub async fn rmdir(&self, path: impl Into<PathBuf>) -> Result<()> {
        let path = path.into();
        self.call(move |s| async move { s.rmdir(&path).await })
            .await
    }

    /// [`Sftp::unlink`].
    pub async fn unlink(&self, path: impl Into<PathBuf>) -> Result<()> {
        let path = path.into();
        self.call(move |s| async move { s.unlink(&path).await })
            .await
    }

    /// [`Sftp::rename`].
    pub async fn rename(&self, from: impl Into<PathBuf>, to: impl Into<PathBuf>) -> Result<()> {
        let (from, to) = (from.into(), to.into());
        self.call(move |s| async move { s.rename(&from, &to).await })
            .await
    }

    /// [`Sftp::download`]: the file is written by the pool thread; returns
    /// the bytes received.
    pub async fn download(
        &self,
        remote: impl Into<PathBuf>,
        local: impl Into<PathBuf>,
    ) -> Result<u64> {
        let (remote, local) = (remote.into(), local.into());
        self.call(move |s| async move { s.download(&remote, &local).await })
            .await
    }

    /// [`Sftp::upload`]: the file is read by the pool thread; returns the
    /// bytes sent.
    pub async fn upload(
        &self,
        local: impl Into<PathBuf>,
        remote: impl Into<PathBuf>,
    ) -> Result<u64> {
        let (local, remote) = (local.into(), remote.into());
        self.call(move |s| async move { s.upload(&local, &remote).await })
            .await
    }

    /// [`Sftp::download_tree`]. `options` builds the options on the pool
    /// thread ([`TransferOptions`] may hold a `!Send` progress callback);
    /// pass `TransferOptions::default` for the defaults.
    pub async fn download_tree(
        &self,
        remote: impl Into<PathBuf>,
        local: impl Into<PathBuf>,
        options: impl FnOnce() -> TransferOptions + Send + 'static,
    ) -> Result<TransferReport> {
        let (remote, local) = (remote.into(), local.into());
        self.call(move |s| async move { Ok(s.download_tree(&remote, &local, &options()).await) })
            .await
    }

    /// [`Sftp::upload_tree`]; `options` as for
    /// [`SftpHandle::download_tree`].
    pub async fn upload_tree(
        &self,
        local: impl Into<PathBuf>,
        remote: impl Into<PathBuf>,
        options: impl FnOnce() -> TransferOptions + Send + 'static,
    ) -> Result<TransferReport> {
        let (local, remote) = (local.into(), remote.into());
        self.call(move |s| async move { Ok(s.upload_tree(&local, &remote, &options()).await) })
            .await
    }

    /// Reads the whole file at `path`, up to [`SFTP_READ_LIMIT`] bytes
    /// (past it: [`Error::LimitExceeded`]).
    pub async fn read(&self, path: impl Into<PathBuf>) -> Result<Bytes> {
        self.read_limited(path, SFTP_READ_LIMIT).await
    }

    /// Reads the whole file at `path`, up to `limit` bytes (past it:
    /// [`Error::LimitExceeded`]): however large the server says the file
    /// is, at most `limit + 1` bytes are held.
    pub async fn read_limited(&self, path: impl Into<PathBuf>, limit: u64) -> Result<Bytes> {
        let path = path.into();
        self.call(move |s| async move {
            let f = s.open(&path).await?;
            let mut data = Vec::new();
            f.take(limit.saturating_add(1))
                .read_to_end(&mut data)
                .await
                .map_err(Error::Io)?;
            if data.len() as u64 > limit {
                return Err(Error::LimitExceeded {
                    what: "file read whole",
                    limit,
                });
            }
            Ok(Bytes::from(data))
        })
        .await
    }

    /// Writes `data` as the whole file at `path` (created with mode 0644, or
    /// truncated), and closes it once every write is acknowledged.
    pub async fn write(&self, path: impl Into<PathBuf>, data: Bytes) -> Result<()> {
        let path = path.into();
        self.call(move |s| async move {
            let mut f = s.create(&path).await?;
            f.write_all(&data).await.map_err(Error::Io)?;
            f.close().await
        })
        .await
    }
}
