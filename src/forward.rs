//! Port forwarding: local (`direct-tcpip`, `direct-streamlocal`), the
//! [`LocalForward`] helper that serves a local TCP port through a session,
//! and remote (`tcpip-forward`) with [`Listener`].
//!
//! libssh2 keeps a half-done channel open in the session (`open_state`,
//! plus `direct_state` for the direct kinds), so direct opens queue with
//! every other open of the session ([`SessionInner::open_channel`]). A
//! `forward_listen` keeps its own state (`fwdLstn_state`) and queues on its
//! own lock here.
//!
//! # Stale global-request replies
//!
//! `forward_listen` takes the first `SSH_MSG_REQUEST_SUCCESS` or `_FAILURE`
//! in libssh2's packet list as its answer. The replies to our keepalives
//! (`keepalive@libssh2.org`, answered with FAILURE by OpenSSH) stay in that
//! list forever, ahead of the answer to a later `tcpip-forward`. Each
//! `forward_listen` call sends one request and takes one reply, so those
//! stale replies are never used up; the session counts them
//! (`Forwards::stale_replies`) and a forward request is sent that many times
//! more: the earlier copies take the stale replies, the last call takes the
//! answer to the first copy, and the answers to the copies (refused by the
//! server: the port is taken by the first) become the new stale replies. A
//! dynamic port (0) cannot be requested that way (each copy would bind a
//! port of its own), so it is refused with a clear error once keepalives
//! have been sent.

use std::cell::{Cell, RefCell};
use std::ffi::CString;
use std::net::SocketAddr;
use std::os::raw::c_int;
use std::rc::Rc;
use std::task::Poll;

use tokio::net::{TcpListener, TcpStream, ToSocketAddrs};

use crate::channel::Channel;
use crate::error::{Error, Result};
use crate::ffi;
use crate::session::children::{Deferred, Release};
use crate::session::{OpenKind, Session, SessionInner, cstring};

/// Connections libssh2 queues for a [`Listener`] before they are accepted;
/// the server's further connections are refused until some are.
pub const DEFAULT_ACCEPT_QUEUE: u32 = 64;

/// Copy buffer per direction of a forwarded connection ([`LocalForward`]).
const COPY_BUF: usize = 64 * 1024;

/// One `forward_listen` whose replies the session still owes to libssh2:
/// `calls_left` more calls with exactly these arguments (libssh2 builds
/// the listener from the arguments of the call that takes the reply).
struct ListenRequest {
    host: CString,
    port: c_int,
    queue: c_int,
    calls_left: u32,
}

/// A session's remote-forwarding state.
pub(crate) struct Forwards {
    listen_lock: tokio::sync::Mutex<()>,
    /// A request in progress, or abandoned half-way (the next caller finishes it).
    pending: RefCell<Option<ListenRequest>>,
    /// Listeners dropped whose cancel libssh2 has not finished.
    deferred: Deferred<ffi::LIBSSH2_LISTENER>,
    /// Global-request replies in libssh2's packet list that no request of
    /// ours will claim (see the module docs).
    stale_replies: Cell<u32>,
}

impl Forwards {
    pub(crate) fn new() -> Self {
        Forwards {
            listen_lock: tokio::sync::Mutex::new(()),
            pending: RefCell::new(None),
            deferred: Deferred::new(),
            stale_replies: Cell::new(0),
        }
    }

    /// A keepalive left: its reply will sit in libssh2's packet list.
    pub(crate) fn note_stale_reply(&self) {
        self.stale_replies.set(self.stale_replies.get() + 1);
    }

    /// The session is being freed: `libssh2_session_free` cancels and frees
    /// every listener with a cancel owed; nothing here may touch them again.
    pub(crate) fn forget(&self) {
        self.deferred.take_all();
    }
}

impl std::fmt::Debug for Forwards {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Forwards")
            .field("deferred_cancels", &self.deferred.len())
            .field("stale_replies", &self.stale_replies.get())
            .finish()
    }
}

/// Resumes an abandoned `direct-tcpip` open: libssh2 keeps its message in
/// the session (`direct_state`), so the arguments are not read again.
pub(crate) fn resume_direct_tcpip(
    s: *mut ffi::LIBSSH2_SESSION,
) -> std::result::Result<*mut ffi::LIBSSH2_CHANNEL, c_int> {
    // SAFETY: live session (the caller's `call` checked it); the empty
    // strings are static. With `direct_state` past idle libssh2 reads
    // neither argument.
    let p = unsafe { ffi::libssh2_channel_direct_tcpip_ex(s, c"".as_ptr(), 0, c"".as_ptr(), 0) };
    opened(s, p)
}

/// Resumes an abandoned `direct-streamlocal` open (like [`resume_direct_tcpip`]).
pub(crate) fn resume_direct_streamlocal(
    s: *mut ffi::LIBSSH2_SESSION,
) -> std::result::Result<*mut ffi::LIBSSH2_CHANNEL, c_int> {
    // SAFETY: as in `resume_direct_tcpip`.
    let p = unsafe { ffi::libssh2_channel_direct_streamlocal_ex(s, c"".as_ptr(), c"".as_ptr(), 0) };
    opened(s, p)
}

/// A channel pointer from a libssh2 open, or its error code.
fn opened(
    s: *mut ffi::LIBSSH2_SESSION,
    p: *mut ffi::LIBSSH2_CHANNEL,
) -> std::result::Result<*mut ffi::LIBSSH2_CHANNEL, c_int> {
    if p.is_null() {
        // SAFETY: live session.
        Err(unsafe { ffi::libssh2_session_last_errno(s) })
    } else {
        Ok(p)
    }
}

impl Session {
    /// Opens a `direct-tcpip` channel: the server connects to `host:port`
    /// and the channel carries that TCP stream (like `ssh -L`). `src_host`
    /// and `src_port` tell the server where the connection comes from (it
    /// only logs them). Queued behind the session's other channel opens;
    /// under the per-operation timeout.
    ///
    /// The server's refusal (`AllowTcpForwarding no`, nothing listening at
    /// the target) is an [`Error::Ssh`] with code
    /// `LIBSSH2_ERROR_CHANNEL_FAILURE` and libssh2's reason.
    pub async fn channel_direct_tcpip(
        &self,
        host: &str,
        port: u16,
        src_host: &str,
        src_port: u16,
    ) -> Result<Channel> {
        let c_host = cstring("forward host", host)?;
        let c_src = cstring("source host", src_host)?;
        SessionInner::open_channel(&self.inner, OpenKind::DirectTcpip, |s| {
            // SAFETY: live session; the strings outlive the call (libssh2
            // copies them into its message on the first call).
            let p = unsafe {
                ffi::libssh2_channel_direct_tcpip_ex(
                    s,
                    c_host.as_ptr(),
                    c_int::from(port),
                    c_src.as_ptr(),
                    c_int::from(src_port),
                )
            };
            opened(s, p)
        })
        .await
    }

    /// Opens a `direct-streamlocal@openssh.com` channel: the server connects
    /// to the unix socket at `path` on its side (like `ssh -L x:/path`).
    /// Needs OpenSSH's `AllowStreamLocalForwarding`. Queued like
    /// [`Session::channel_direct_tcpip`].
    pub async fn channel_direct_streamlocal(&self, path: &str) -> Result<Channel> {
        let c_path = cstring("socket path", path)?;
        SessionInner::open_channel(&self.inner, OpenKind::DirectStreamlocal, |s| {
            // SAFETY: live session; the strings outlive the call.
            let p = unsafe {
                ffi::libssh2_channel_direct_streamlocal_ex(s, c_path.as_ptr(), c"".as_ptr(), 0)
            };
            opened(s, p)
        })
        .await
    }

    /// Asks the server to listen on `host:port` on its side and to forward
    /// each connection to this session (like `ssh -R`); `port` 0 lets the
    /// server choose ([`Listener::port`] tells which). Accept the
    /// connections with [`Listener::accept`]. Queued behind other
    /// `forward_listen` calls of the session; under the per-operation timeout.
    ///
    /// A refusal (port taken, `AllowTcpForwarding` off, a privileged port)
    /// is an [`Error::Ssh`] with code `LIBSSH2_ERROR_REQUEST_DENIED`.
    ///
    /// libssh2 takes the first global-request reply in its packet list as
    /// the answer, and the replies to keepalives stay there for good. Once
    /// keepalives have been sent, the request is therefore repeated once
    /// per stale reply (the copies are refused by the server, the port
    /// being taken by the first, and their refusals replace the stale
    /// replies), which works for a fixed port only: port 0 is then refused
    /// with `LIBSSH2_ERROR_REQUEST_DENIED` and a message saying so.
    pub async fn forward_listen(&self, host: &str, port: u16) -> Result<Listener> {
        self.forward_listen_with(host, port, DEFAULT_ACCEPT_QUEUE)
            .await
    }

    /// Like [`Session::forward_listen`], with the number of connections
    /// queued before they are accepted (further ones are refused).
    pub async fn forward_listen_with(&self, host: &str, port: u16, queue: u32) -> Result<Listener> {
        let inner = &self.inner;
        let c_host = cstring("forward host", host)?;
        let queue = queue.clamp(1, i32::MAX as u32) as c_int;
        inner
            .with_timeout("forward listen", async {
                let f = &inner.forwards;
                let _lock = f.listen_lock.lock().await;
                if !inner.is_open() {
                    return Err(Error::Closed("session"));
                }
                // A request abandoned half-way: finish it, cancel what it made.
                let abandoned = f.pending.borrow().is_some();
                if abandoned && let Ok(Some((raw, _))) = run_listen(inner).await {
                    defer_cancel(inner, raw);
                }
                let stale = f.stale_replies.get();
                if stale > 0 && port == 0 {
                    return Err(Error::Ssh {
                        code: ffi::LIBSSH2_ERROR_REQUEST_DENIED,
                        message: format!(
                            "cannot request a server-chosen port on this session: {stale} \
                             keepalive replies wait in libssh2's packet list and would be \
                             taken for the answer; ask for a fixed port"
                        ),
                    });
                }
                *f.pending.borrow_mut() = Some(ListenRequest {
                    host: c_host.clone(),
                    port: c_int::from(port),
                    queue,
                    calls_left: stale + 1,
                });
                let (raw, bound) = run_listen(inner).await?.ok_or(Error::Closed("session"))?;
                let l = Rc::new(ListenerInner {
                    session: inner.clone(),
                    raw: Cell::new(raw),
                    port: bound as u16,
                });
                if !inner.is_open() {
                    // A close began meanwhile: its listener pass (or the
                    // session's free) cancels it.
                    l.raw.set(std::ptr::null_mut());
                    f.deferred.push(raw);
                    return Err(Error::Closed("session"));
                }
                inner.children.listeners.add(Rc::downgrade(&l));
                Ok(Listener { inner: l })
            })
            .await
    }
}

/// Runs the session's pending `forward_listen` to its end: each call takes
/// one reply; the last call's result is the answer. A listener made by an
/// earlier call (a stale reply that was a success: not expected) is cancelled.
/// Returns the listener and the port it is bound to.
async fn run_listen(
    inner: &Rc<SessionInner>,
) -> Result<Option<(*mut ffi::LIBSSH2_LISTENER, c_int)>> {
    loop {
        let (host, port, queue) = {
            let p = inner.forwards.pending.borrow();
            let Some(req) = p.as_ref() else {
                return Ok(None);
            };
            (req.host.clone(), req.port, req.queue)
        };
        let r = inner
            .call(|s| {
                let mut bound: c_int = 0;
                // SAFETY: live session; `host` outlives the call. The
                // arguments are those of the request libssh2 may have half
                // done (it builds the listener from them).
                let p = unsafe {
                    ffi::libssh2_channel_forward_listen_ex(
                        s,
                        host.as_ptr(),
                        port,
                        &mut bound,
                        queue,
                    )
                };
                if p.is_null() {
                    // SAFETY: live session.
                    Err(unsafe { ffi::libssh2_session_last_errno(s) })
                } else {
                    // libssh2 sets `bound` with the listener: the port asked
                    // for, or the one the server chose for port 0.
                    Ok((p, bound))
                }
            })
            .await;
        let last = {
            let mut p = inner.forwards.pending.borrow_mut();
            // Only this loop clears the request (under the listen lock).
            let Some(req) = p.as_mut() else {
                return Ok(None);
            };
            req.calls_left -= 1;
            let last = req.calls_left == 0;
            if last {
                *p = None;
            }
            last
        };
        match r {
            Ok(made) if last => return Ok(Some(made)),
            Ok((raw, _)) => defer_cancel(inner, raw),
            Err(e) if last => return Err(e),
            Err(e) if !matches!(e, Error::Ssh { .. }) => {
                // The link failed: nothing more will be answered.
                *inner.forwards.pending.borrow_mut() = None;
                return Err(e);
            }
            Err(_) => {}
        }
    }
}

/// Hands a listener's cancel to the driver task (it sends a global request
/// and frees the connections queued for it).
fn defer_cancel(inner: &Rc<SessionInner>, raw: *mut ffi::LIBSSH2_LISTENER) {
    inner.forwards.deferred.push(raw);
    SessionInner::schedule_retry(inner);
}

/// Retries the deferred cancels; only while the session is open (a close
/// in progress owns the list).
pub(crate) fn retry_deferred_cancels(inner: &SessionInner) {
    if inner.forwards.deferred.is_empty() || !inner.is_open() || inner.raw().is_err() {
        return;
    }
    // SAFETY: listeners of this live session on the deferred list only:
    // libssh2 frees each on any result but EAGAIN, after which the list
    // no longer holds it.
    inner
        .forwards
        .deferred
        .retry(|raw| unsafe { ffi::libssh2_channel_forward_cancel(raw) });
    inner.transport.pump();
}

/// Graceful close: cancels every listener, live or deferred, before the
/// session's DISCONNECT.
pub(crate) async fn close_listeners(inner: &SessionInner) {
    for l in inner.children.listeners.live() {
        let raw = l.raw.replace(std::ptr::null_mut());
        if !raw.is_null() {
            // Stays reachable (for `forget`) until libssh2 has freed it.
            inner.forwards.deferred.push(raw);
        }
    }
    inner
        .forwards
        .deferred
        // SAFETY: as in `retry_deferred_cancels`; only this close touches
        // the list while the session closes.
        .finish(inner, |raw| unsafe {
            ffi::libssh2_channel_forward_cancel(raw)
        })
        .await;
}

/// A remote forward: the server listens on its side and hands each
/// connection to this session as a channel.
///
/// Dropping it cancels the forward without blocking: the cancel request is
/// sent (and connections not yet accepted are closed) by the session on its
/// driver task.
///
/// libssh2 takes in the server's new connections only while some call on
/// the session reads (an [`Listener::accept`] in progress, a channel read,
/// an open): keep an `accept` pending, or the connections wait, unanswered,
/// in the session's input.
pub struct Listener {
    inner: Rc<ListenerInner>,
}

pub(crate) struct ListenerInner {
    session: Rc<SessionInner>,
    /// Null once cancelled or handed to the session's close path.
    raw: Cell<*mut ffi::LIBSSH2_LISTENER>,
    port: u16,
}

impl ListenerInner {
    fn raw(&self) -> Result<*mut ffi::LIBSSH2_LISTENER> {
        let raw = self.raw.get();
        if raw.is_null() || self.session.raw().is_err() {
            Err(Error::Closed("listener"))
        } else {
            Ok(raw)
        }
    }
}

impl Listener {
    /// The port the server listens on (the one it chose, for port 0).
    pub fn port(&self) -> u16 {
        self.inner.port
    }

    /// Waits for the next forwarded connection. Not limited by the
    /// per-operation timeout (wrap it in one if needed); fails when the
    /// session closes or its link fails.
    pub async fn accept(&self) -> Result<Channel> {
        let inner = &self.inner;
        let raw = std::future::poll_fn(|cx| {
            let raw = match inner.raw() {
                Ok(r) => r,
                Err(e) => return Poll::Ready(Err(e)),
            };
            inner.session.poll_call(cx, &mut |s| {
                // SAFETY: live listener of this live session.
                let p = unsafe { ffi::libssh2_channel_forward_accept(raw) };
                if !p.is_null() {
                    return Ok(p);
                }
                // SAFETY: live session.
                match unsafe { ffi::libssh2_session_last_errno(s) } {
                    // Nothing queued and the read stopped without an error.
                    ffi::LIBSSH2_ERROR_CHANNEL_UNKNOWN => Err(ffi::LIBSSH2_ERROR_EAGAIN),
                    rc => Err(rc),
                }
            })
        })
        .await?;
        SessionInner::adopt_channel(&inner.session, raw)
    }
}

impl Drop for ListenerInner {
    fn drop(&mut self) {
        let raw = self.raw.replace(std::ptr::null_mut());
        if raw.is_null() || self.session.raw().is_err() {
            return;
        }
        defer_cancel(&self.session, raw);
        self.session.children.listeners.prune();
    }
}

impl Release for ListenerInner {
    /// `libssh2_session_free` cancels and frees the listener: forget it.
    fn release(&self) {
        self.raw.set(std::ptr::null_mut());
    }
}

impl std::fmt::Debug for Listener {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Listener")
            .field("port", &self.inner.port)
            .field("open", &!self.inner.raw.get().is_null())
            .finish()
    }
}

/// Counters of a [`LocalForward`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LocalForwardStats {
    /// Local connections accepted.
    pub accepted: u64,
    /// Connections being forwarded now.
    pub active: u64,
    /// Connections whose channel could not be opened or whose copy failed.
    pub failed: u64,
    /// Bytes carried from local clients to the target.
    pub bytes_out: u64,
    /// Bytes carried from the target back to local clients.
    pub bytes_in: u64,
}

/// Serves a local TCP port through a session, like `ssh -L`: each accepted
/// connection gets a `direct-tcpip` channel to the target, and bytes are
/// copied both ways. An EOF in one direction is passed on as an EOF (a TCP
/// half-close, or an SSH EOF) while the other direction goes on.
///
/// [`LocalForward::run`] does the work: nothing is accepted while it is
/// not being polled. Dropping the `LocalForward` (or the `run` future)
/// stops listening and drops the connections it forwards.
pub struct LocalForward {
    session: Session,
    listener: TcpListener,
    host: String,
    port: u16,
    stats: Cell<LocalForwardStats>,
}

impl LocalForward {
    /// Listens on `local` (e.g. `"127.0.0.1:0"`); connections will be
    /// forwarded to `host:port` as the server resolves it.
    pub async fn bind(
        session: &Session,
        local: impl ToSocketAddrs,
        host: &str,
        port: u16,
    ) -> Result<LocalForward> {
        cstring("forward host", host)?;
        let listener = TcpListener::bind(local).await?;
        Ok(LocalForward {
            session: session.clone(),
            listener,
            host: host.to_owned(),
            port,
            stats: Cell::new(LocalForwardStats::default()),
        })
    }

    /// The local address listened on.
    pub fn local_addr(&self) -> Result<SocketAddr> {
        Ok(self.listener.local_addr()?)
    }

    /// Counters so far.
    pub fn stats(&self) -> LocalForwardStats {
        self.stats.get()
    }

    fn update(&self, f: impl FnOnce(&mut LocalForwardStats)) {
        let mut s = self.stats.get();
        f(&mut s);
        self.stats.set(s);
    }

    /// Accepts and forwards connections until the local listener fails or
    /// the session is found closed (then `Err`; it is checked whenever a
    /// connection or the listener makes progress). A connection whose
    /// channel cannot be opened is closed and counted in
    /// [`LocalForwardStats::failed`]; the others go on.
    pub async fn run(&self) -> Result<()> {
        type Conn<'a> = std::pin::Pin<Box<dyn std::future::Future<Output = ()> + 'a>>;
        let mut conns: Vec<Conn<'_>> = Vec::new();
        std::future::poll_fn(|cx| {
            loop {
                match self.listener.poll_accept(cx) {
                    Poll::Ready(Ok((stream, peer))) => {
                        self.update(|s| {
                            s.accepted += 1;
                            s.active += 1;
                        });
                        conns.push(Box::pin(self.serve(stream, peer)));
                    }
                    Poll::Ready(Err(e)) => return Poll::Ready(Err(Error::Io(e))),
                    Poll::Pending => break,
                }
            }
            conns.retain_mut(|c| c.as_mut().poll(cx).is_pending());
            if self.session.inner.raw().is_err() {
                return Poll::Ready(Err(Error::Closed("session")));
            }
            Poll::Pending
        })
        .await
    }

    /// Forwards one accepted connection.
    async fn serve(&self, mut stream: TcpStream, peer: SocketAddr) {
        let _ = stream.set_nodelay(true);
        let opened = self
            .session
            .channel_direct_tcpip(&self.host, self.port, &peer.ip().to_string(), peer.port())
            .await;
        let ok = match opened {
            Ok(mut ch) => {
                match tokio::io::copy_bidirectional_with_sizes(
                    &mut stream,
                    &mut ch,
                    COPY_BUF,
                    COPY_BUF,
                )
                .await
                {
                    Ok((out, back)) => {
                        self.update(|s| {
                            s.bytes_out += out;
                            s.bytes_in += back;
                        });
                        true
                    }
                    Err(_) => false,
                }
                // Dropping the channel hands its close to the session.
            }
            Err(_) => false,
        };
        self.update(|s| {
            s.active -= 1;
            if !ok {
                s.failed += 1;
            }
        });
    }
}

impl std::fmt::Debug for LocalForward {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalForward")
            .field("local", &self.listener.local_addr().ok())
            .field("target", &format_args!("{}:{}", self.host, self.port))
            .field("stats", &self.stats.get())
            .finish()
    }
}
