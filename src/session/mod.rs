//! [`Session`]: connect, handshake, host-key check, channels, and teardown.
//! Its other jobs have a file each: [`config`] (how it connects and
//! behaves), [`call`] (the libssh2 call driver), [`auth`] and
//! [`keepalive`].

mod auth;
pub(crate) mod call;
pub(crate) mod children;
pub(crate) mod config;
mod jump;
mod keepalive;

use std::cell::{Cell, RefCell};
use std::net::SocketAddr;
use std::os::raw::{c_char, c_int, c_uint};
use std::rc::{Rc, Weak};
use std::time::{Duration, Instant};

use crate::channel::{Channel, ChannelInner};
use crate::error::{Error, InvalidInput, Result};
use crate::ffi;
use crate::knownhosts::{self, HostKey, HostKeyPolicy};
use crate::methods::MethodType;
use crate::methods::{check_methods, no_common_algorithm};
use crate::reactor::{OpId, Reactor, SharedFd};
use crate::transport::callbacks;
use crate::transport::{BridgeStats, Link, Transport};

pub(crate) use crate::text::{cstring, remote_text};
pub(crate) use call::{Abandon, code};
use children::{Children, Deferred, Release};
pub use config::{
    Config, DEFAULT_CIPHERS, DEFAULT_CIPHERS_NO_AES, DEFAULT_PACKET, DEFAULT_RECEIVE_BATCH_WAIT,
    DEFAULT_WINDOW, RECEIVE_BATCH_MODE_ENV, default_ciphers,
};

/// Bound of a graceful close when no per-operation timeout is configured.
const CLOSE_LIMIT: Duration = Duration::from_secs(30);

/// How long a graceful close waits, once SSH_MSG_DISCONNECT has left, for
/// the server to close its end (what arrives meanwhile is dropped), so
/// that our close does not reset a connection the server is still writing
/// to before it has read the DISCONNECT.
const LINGER_LIMIT: Duration = Duration::from_secs(2);

/// Counters of one session.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SessionStats {
    /// Bytes libssh2 holds for this session.
    pub libssh2_bytes: i64,
    /// Blocks libssh2 holds for this session.
    pub libssh2_blocks: i64,
    /// The send and recv callbacks' counters.
    pub bridge: BridgeStats,
    /// Batched receives ([`Config::receive_batch_wait`]): the receive
    /// after each batch's wait, and those that follow a full batch at once.
    pub batches: u64,
    /// Batched receives that ended in a pause of the stream, each having
    /// cost up to the batch wait of latency.
    pub batch_pauses: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Open,
    Closing,
    Closed,
}

/// An SSH session over the thread's reactor (its io_uring ring, or the
/// poll engine where the kernel refuses the ring).
///
/// Cheap to clone: clones share one connection. Every channel keeps its
/// session alive. Not `Send`: a session lives on the thread whose ring it
/// uses; run one current-thread runtime per thread to use several cores.
///
/// Dropping the last handle tears the session down at once without blocking:
/// see the crate documentation.
#[derive(Clone)]
pub struct Session {
    pub(crate) inner: Rc<SessionInner>,
}

pub(crate) struct SessionInner {
    raw: Cell<*mut ffi::LIBSSH2_SESSION>,
    pub(crate) transport: Rc<Transport>,
    pub(crate) config: Config,
    state: Cell<State>,
    /// Session-wide single-flight calls (libssh2 keeps their state in the session).
    auth_lock: tokio::sync::Mutex<()>,
    open_lock: tokio::sync::Mutex<()>,
    /// A channel open was abandoned half-way; the next opener finishes it.
    open_abandoned: Cell<bool>,
    /// The libssh2 function of the open in progress (or abandoned): an
    /// abandoned open must be resumed with the function that began it.
    open_kind: Cell<OpenKind>,
    auth_abandoned: Cell<bool>,
    /// Live channels, agents and listeners.
    pub(crate) children: Children,
    /// Channels dropped while their close was still owed to the peer.
    deferred_frees: Deferred<ffi::LIBSSH2_CHANNEL>,
    /// A driver callback that retries the deferred frees and cancels is queued.
    retry_scheduled: Cell<bool>,
    /// Retries the deferred frees after each receive, failure and teardown
    /// of the transport (which holds it weakly).
    recv_hook: Rc<dyn Fn()>,
    keepalive_op: Cell<Option<OpId>>,
    /// Keepalives sent since bytes last arrived.
    keepalives_unanswered: Cell<u32>,
    /// When the last keepalive left: bytes arriving after it answer it.
    keepalive_sent_at: Cell<Option<Instant>>,
    pub(crate) reactor: Rc<Reactor>,
    /// Remote forwarding: deferred listener cancels, the queue of
    /// `forward_listen` calls.
    pub(crate) forwards: crate::forward::Forwards,
    host_key: RefCell<Option<HostKey>>,
}

/// libssh2 objects freed while libssh2 still said EAGAIN (leaked rather
/// than spun on), over the process.
static LEAKED_OBJECTS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// libssh2 objects (sessions, channels) that could not be freed without
/// waiting and were leaked instead; 0 in a correct run.
pub fn leaked_objects() -> u64 {
    LEAKED_OBJECTS.load(std::sync::atomic::Ordering::Relaxed)
}

impl Session {
    /// Connects to `host:port` (resolved with the system resolver), runs the
    /// handshake and verifies the host key under `config`'s policy. The name
    /// `host` is what known_hosts is searched for.
    pub async fn connect(host: &str, port: u16, config: Config) -> Result<Session> {
        let addrs: Vec<SocketAddr> = tokio::net::lookup_host((host, port))
            .await
            .map_err(|e| Error::Io(std::io::Error::new(e.kind(), format!("{host}: {e}"))))?
            .collect();
        let mut last = None;
        for addr in addrs {
            match Self::connect_addr_as(addr, host, config.clone()).await {
                Ok(s) => return Ok(s),
                Err(e @ (Error::Io(_) | Error::Timeout { .. })) => last = Some(e),
                Err(e) => return Err(e),
            }
        }
        Err(last.unwrap_or_else(|| {
            Error::InvalidInput(InvalidInput::NoAddress {
                host: host.to_string(),
            })
        }))
    }

    /// Connects to `addr`; known_hosts is searched for its IP address.
    pub async fn connect_addr(addr: SocketAddr, config: Config) -> Result<Session> {
        Self::connect_addr_as(addr, &addr.ip().to_string(), config).await
    }

    async fn connect_addr_as(addr: SocketAddr, host: &str, config: Config) -> Result<Session> {
        // A bad algorithm list fails here, before any connection is made.
        check_config(&config)?;
        let reactor = Reactor::current()?;
        let fd = tcp_connect(&reactor, addr, config.connect_timeout).await?;
        Self::connect_over(reactor, fd, host, addr.port(), config).await
    }

    /// Runs SSH over `stream`, a connected stream socket of any family
    /// (TCP, a Unix socket, one end of a `socketpair` whose other end a
    /// proxy command or a relay holds), which the session owns from here
    /// on; `host` and `port` are what known_hosts is searched for. The
    /// socket is put in blocking mode: the reactor's operations wait on it,
    /// nothing else does.
    ///
    /// Bastions without a TCP path of their own reach a host this way: a
    /// `ProxyCommand` such as `ssh -W %h:%p bastion` is given one end of a
    /// `socketpair` as its stdin and stdout, the session the other.
    ///
    /// Fails with [`Error::Io`] when `stream` is not a stream socket.
    pub async fn connect_stream(
        stream: std::os::fd::OwnedFd,
        host: &str,
        port: u16,
        config: Config,
    ) -> Result<Session> {
        check_config(&config)?;
        let reactor = Reactor::current()?;
        let fd = stream_socket(stream)?;
        Self::connect_over(reactor, fd, host, port, config).await
    }

    /// Handshake and host-key check over a connected socket.
    async fn connect_over(
        reactor: Rc<Reactor>,
        fd: Rc<SharedFd>,
        host: &str,
        port: u16,
        config: Config,
    ) -> Result<Session> {
        let transport = Transport::new(reactor.clone(), fd);
        // A batch holds back the window adjusts of what it holds: a quarter of
        // the window leaves the server room to go on sending meanwhile.
        transport.set_batch_wait(config.receive_batch_wait, config.window_size as usize / 4);
        let inner = SessionInner::new(transport, config, reactor)?;
        inner
            .transport
            .context
            .agent_timeout
            .set(inner.config.timeout);
        inner.apply_config()?;
        inner.prefer_known_host_key_types(host, port)?;
        inner
            .with_timeout("handshake", async {
                inner
                    .call(|s| {
                        // SAFETY: live session; the dummy fd stays open for the process.
                        let rc =
                            unsafe { ffi::libssh2_session_handshake(s, callbacks::dummy_fd()) };
                        code(rc)
                    })
                    .await
            })
            .await
            .map_err(|e| inner.negotiation_error(e))?;
        let key = knownhosts::session_host_key(inner.raw()?).ok_or_else(|| Error::Ssh {
            code: ffi::LIBSSH2_ERROR_HOSTKEY_INIT,
            message: "the server presented no host key".into(),
        })?;
        knownhosts::verify(
            inner.raw()?,
            host,
            port,
            &key,
            inner.config.known_hosts.as_deref(),
            inner.config.host_key_policy,
        )?;
        *inner.host_key.borrow_mut() = Some(key);
        SessionInner::start_keepalive(&inner);
        Ok(Session { inner })
    }

    /// The key the server presented.
    pub fn host_key(&self) -> Option<HostKey> {
        self.inner.host_key.borrow().clone()
    }

    /// The server's identification string (`SSH-2.0-OpenSSH_9.2p1 …`).
    pub fn remote_banner(&self) -> Option<String> {
        let raw = self.inner.raw().ok()?;
        // SAFETY: live session; the string is copied at once.
        unsafe {
            let p = ffi::libssh2_session_banner_get(raw);
            (!p.is_null()).then(|| std::ffi::CStr::from_ptr(p).to_string_lossy().into_owned())
        }
    }

    /// The banner the server sent before authentication (OpenSSH's
    /// `Banner`). libssh2 keeps it only from [`Session::auth_methods`], the
    /// first exchange of the authentication protocol: call that first.
    pub fn auth_banner(&self) -> Option<String> {
        let raw = self.inner.raw().ok()?;
        let mut p: *mut c_char = std::ptr::null_mut();
        // SAFETY: live session; the string belongs to the session and is
        // copied at once.
        unsafe {
            if ffi::libssh2_userauth_banner(raw, &mut p) != 0 || p.is_null() {
                return None;
            }
            Some(std::ffi::CStr::from_ptr(p).to_string_lossy().into_owned())
        }
    }

    /// The algorithm negotiated for `kind` (e.g. the cipher in use).
    pub fn negotiated(&self, kind: MethodType) -> Option<String> {
        let raw = self.inner.raw().ok()?;
        // SAFETY: live session; the string is copied at once.
        unsafe {
            let p = ffi::libssh2_session_methods(raw, kind.raw());
            (!p.is_null()).then(|| std::ffi::CStr::from_ptr(p).to_string_lossy().into_owned())
        }
    }

    /// Every class of algorithm the handshake settled on; `None` once the
    /// session is closed.
    pub fn algorithms(&self) -> Option<crate::methods::Negotiated> {
        let get = |kind| self.negotiated(kind);
        Some(crate::methods::Negotiated {
            kex: get(MethodType::Kex)?,
            host_key: get(MethodType::HostKey)?,
            cipher_client_to_server: get(MethodType::CipherClientToServer)?,
            cipher_server_to_client: get(MethodType::CipherServerToClient)?,
            mac_client_to_server: get(MethodType::MacClientToServer)?,
            mac_server_to_client: get(MethodType::MacServerToClient)?,
        })
    }

    /// Opens a session channel with the configured window and packet size.
    pub async fn channel_session(&self) -> Result<Channel> {
        let c = &self.inner.config;
        self.channel_session_with(c.window_size, c.packet_size)
            .await
    }

    /// Opens a session channel with the given receive window and packet size.
    pub async fn channel_session_with(&self, window: u32, packet: u32) -> Result<Channel> {
        SessionInner::open_channel(&self.inner, OpenKind::Session, |s| {
            open_session_channel(s, window, packet)
        })
        .await
    }

    /// Sets the methods of `kind` offered at the next key re-exchange
    /// (comma-separated, most preferred first), as [`Config::method`] does
    /// for the first exchange. A re-exchange may change the key exchange
    /// and the MACs, not the cipher: one that would agree on another
    /// cipher than the one in use fails the session with libssh2's
    /// `LIBSSH2_ERROR_KEX_FAILURE`, "the server changed the cipher at a key
    /// re-exchange" (libssh2 keeps using the old keys through the new
    /// cipher's code until the new keys take over, so it cannot switch
    /// safely).
    pub fn set_method_pref(&self, kind: MethodType, prefs: &str) -> Result<()> {
        let raw = self.inner.raw()?;
        let c = cstring("method preference", prefs)?;
        // SAFETY: live session on this thread; libssh2 copies the list.
        let rc = unsafe { ffi::libssh2_session_method_pref(raw, kind.raw(), c.as_ptr()) };
        if rc < 0 {
            return Err(self.inner.error(rc));
        }
        Ok(())
    }

    /// Opens a channel and runs `command` on it.
    pub async fn exec(&self, command: &str) -> Result<Channel> {
        let mut ch = self.channel_session().await?;
        ch.exec(command).await?;
        Ok(ch)
    }

    /// Counters of this session.
    pub fn stats(&self) -> SessionStats {
        let shared = &self.inner.transport.context;
        let (batches, batch_pauses) = self.inner.transport.batch_counts();
        SessionStats {
            libssh2_bytes: shared.bytes_outstanding(),
            libssh2_blocks: shared.blocks_outstanding(),
            bridge: shared.bridge.stats(),
            batches,
            batch_pauses,
        }
    }

    /// Graceful close: closes every channel (EOF, CLOSE, the peer's CLOSE),
    /// sends SSH_MSG_DISCONNECT with `description`, waits until it has left,
    /// shuts down our sending side and frees libssh2's state. Nothing is
    /// sent after the DISCONNECT. Until the server closes its end (at most
    /// 2 s more, within the timeout below) what it still sends is received
    /// and dropped: closing on unread bytes would reset the connection,
    /// possibly before the server has read the DISCONNECT.
    ///
    /// Bounded by the configured timeout (30 s if none is set); on timeout,
    /// or if this future is dropped before it finishes, the session is torn
    /// down as on drop. Closing a closed session is `Ok`; a second close
    /// while one is running is `Err(Closed)`.
    pub async fn close(&self, description: &str) -> Result<()> {
        let inner = &self.inner;
        match inner.state.get() {
            State::Closed => return Ok(()),
            State::Closing => return Err(Error::Closed("session (a close is in progress)")),
            State::Open => {}
        }
        let desc = cstring("description", description)?;
        inner.state.set(State::Closing);
        // Runs on every way out, including this future being dropped.
        struct FreeOnExit<'a>(&'a SessionInner);
        impl Drop for FreeOnExit<'_> {
            fn drop(&mut self) {
                self.0.free_now();
            }
        }
        let _free = FreeOnExit(inner);
        let after = inner.config.timeout.unwrap_or(CLOSE_LIMIT);
        let started = Instant::now();
        let graceful = async {
            inner.close_channels().await;
            crate::forward::close_listeners(inner).await;
            // SSH_DISCONNECT_BY_APPLICATION
            inner
                .call(|s| {
                    // SAFETY: live session; `desc` outlives the call.
                    code(unsafe {
                        ffi::libssh2_session_disconnect_ex(s, 11, desc.as_ptr(), c"".as_ptr())
                    })
                })
                .await?;
            inner.transport.bridge().set_disconnected();
            inner.transport.drain().await;
            Ok::<(), Error>(())
        };
        tokio::time::timeout(after, graceful)
            .await
            .map_err(|_| Error::Timeout {
                operation: "close",
                after,
            })??;
        let left = after.saturating_sub(started.elapsed());
        inner.transport.linger_close(left.min(LINGER_LIMIT)).await;
        Ok(())
    }

    /// Whether the session was closed or its connection failed.
    pub fn is_closed(&self) -> bool {
        self.inner.state.get() != State::Open
            || !matches!(self.inner.transport.bridge().link(), Link::Open)
    }
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session")
            .field("state", &self.inner.state.get())
            .field("link", &self.inner.transport.bridge().link())
            .field(
                "host_key",
                &self
                    .inner
                    .host_key
                    .borrow()
                    .as_ref()
                    .map(|k| k.fingerprint.clone()),
            )
            .finish()
    }
}

fn open_session_channel(
    s: *mut ffi::LIBSSH2_SESSION,
    window: u32,
    packet: u32,
) -> std::result::Result<*mut ffi::LIBSSH2_CHANNEL, c_int> {
    const KIND: &str = "session";
    // SAFETY: live session; the type string outlives the call.
    let p = unsafe {
        ffi::libssh2_channel_open_ex(
            s,
            KIND.as_ptr() as *const c_char,
            KIND.len() as c_uint,
            window,
            packet,
            std::ptr::null(),
            0,
        )
    };
    if p.is_null() {
        // SAFETY: live session.
        Err(unsafe { ffi::libssh2_session_last_errno(s) })
    } else {
        Ok(p)
    }
}

/// Which libssh2 function opens a channel: a half-done open is resumed
/// only through the function that began it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum OpenKind {
    /// `libssh2_channel_open_ex` with type "session".
    Session,
    /// `libssh2_channel_direct_tcpip_ex` (keeps its message in the session).
    DirectTcpip,
    /// `libssh2_channel_direct_streamlocal_ex` (likewise).
    DirectStreamlocal,
}

/// A blocking TCP socket connected to `addr` through the reactor, within
/// `timeout`.
async fn tcp_connect(
    reactor: &Rc<Reactor>,
    addr: SocketAddr,
    timeout: Duration,
) -> Result<Rc<SharedFd>> {
    let fd = tcp_socket(addr)?;
    let done = reactor.connect(&fd, addr, timeout).await;
    match done.raw() {
        0 => {}
        r if r == -libc::ECANCELED || r == -libc::ETIME => {
            return Err(Error::Timeout {
                operation: "connect",
                after: timeout,
            });
        }
        r => {
            let e = std::io::Error::from_raw_os_error(-r);
            return Err(Error::Io(std::io::Error::new(
                e.kind(),
                format!("connect to {addr}: {e}"),
            )));
        }
    }
    Ok(fd)
}

/// Refuses a config naming an algorithm this build lacks, before any
/// connection is made.
pub(crate) fn check_config(config: &Config) -> Result<()> {
    for (kind, prefs) in &config.methods {
        check_methods(*kind, prefs)?;
    }
    Ok(())
}

/// `stream`, checked to be a stream socket and made blocking, owned for
/// the ring.
fn stream_socket(stream: std::os::fd::OwnedFd) -> Result<Rc<SharedFd>> {
    use std::os::fd::{AsRawFd, IntoRawFd};
    let raw = stream.as_raw_fd();
    let mut kind: c_int = 0;
    let mut len = std::mem::size_of::<c_int>() as libc::socklen_t;
    // SAFETY: `raw` is open (owned by `stream`); `kind` and `len` are ours.
    let rc = unsafe {
        libc::getsockopt(
            raw,
            libc::SOL_SOCKET,
            libc::SO_TYPE,
            &mut kind as *mut c_int as *mut libc::c_void,
            &mut len,
        )
    };
    if rc != 0 {
        let e = std::io::Error::last_os_error();
        return Err(Error::Io(std::io::Error::new(
            e.kind(),
            format!("the stream given to connect_stream is not a socket: {e}"),
        )));
    }
    if kind != libc::SOCK_STREAM {
        return Err(Error::Io(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "the socket given to connect_stream is not a stream socket",
        )));
    }
    // SAFETY: fcntl on the open fd `raw`.
    let flags = unsafe { libc::fcntl(raw, libc::F_GETFL) };
    // SAFETY: as above; clearing O_NONBLOCK only.
    if flags < 0 || unsafe { libc::fcntl(raw, libc::F_SETFL, flags & !libc::O_NONBLOCK) } < 0 {
        return Err(Error::Io(std::io::Error::last_os_error()));
    }
    // TCP_NODELAY where it applies; other families refuse it, harmlessly.
    let one: c_int = 1;
    // SAFETY: setsockopt on the open fd `raw` with a c_int we own.
    unsafe {
        libc::setsockopt(
            raw,
            libc::IPPROTO_TCP,
            libc::TCP_NODELAY,
            &one as *const c_int as *const libc::c_void,
            std::mem::size_of::<c_int>() as libc::socklen_t,
        )
    };
    Ok(SharedFd::new(stream.into_raw_fd()))
}

/// A blocking TCP socket with TCP_NODELAY, owned for the ring.
fn tcp_socket(addr: SocketAddr) -> Result<Rc<SharedFd>> {
    let domain = if addr.is_ipv4() {
        libc::AF_INET
    } else {
        libc::AF_INET6
    };
    // SAFETY: plain syscalls on a descriptor we own.
    unsafe {
        let fd = libc::socket(domain, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
        if fd < 0 {
            return Err(Error::Io(std::io::Error::last_os_error()));
        }
        let fd = SharedFd::new(fd);
        let one: c_int = 1;
        libc::setsockopt(
            fd.raw(),
            libc::IPPROTO_TCP,
            libc::TCP_NODELAY,
            &one as *const c_int as *const libc::c_void,
            std::mem::size_of::<c_int>() as libc::socklen_t,
        );
        Ok(fd)
    }
}

impl SessionInner {
    /// A libssh2 session over `transport`, wired to its callbacks, its
    /// receive hook registered.
    fn new(transport: Rc<Transport>, config: Config, reactor: Rc<Reactor>) -> Result<Rc<Self>> {
        // SAFETY: `transport.context` is boxed inside the Rc'd transport, which
        // the session keeps until after `libssh2_session_free` (SessionInner
        // frees the session before its fields drop).
        let raw = unsafe { callbacks::new_session(&*transport.context) };
        if raw.is_null() {
            return Err(Error::Ssh {
                code: ffi::LIBSSH2_ERROR_ALLOC,
                message: "libssh2_session_init_ex failed".into(),
            });
        }
        let inner = Rc::new_cyclic(|this: &Weak<SessionInner>| {
            let this = this.clone();
            let recv_hook: Rc<dyn Fn()> = Rc::new(move || {
                if let Some(s) = this.upgrade() {
                    s.retry_deferred();
                }
            });
            SessionInner {
                raw: Cell::new(raw),
                transport,
                config,
                state: Cell::new(State::Open),
                auth_lock: tokio::sync::Mutex::new(()),
                open_lock: tokio::sync::Mutex::new(()),
                open_abandoned: Cell::new(false),
                open_kind: Cell::new(OpenKind::Session),
                auth_abandoned: Cell::new(false),
                children: Children::new(),
                deferred_frees: Deferred::new(),
                retry_scheduled: Cell::new(false),
                keepalive_op: Cell::new(None),
                keepalives_unanswered: Cell::new(0),
                keepalive_sent_at: Cell::new(None),
                reactor,
                forwards: crate::forward::Forwards::new(),
                host_key: RefCell::new(None),
                recv_hook,
            }
        });
        inner
            .transport
            .add_recv_hook(Rc::downgrade(&inner.recv_hook));
        Ok(inner)
    }

    /// The libssh2 session, unless it was freed.
    pub(crate) fn raw(&self) -> Result<*mut ffi::LIBSSH2_SESSION> {
        let raw = self.raw.get();
        if raw.is_null() {
            Err(Error::Closed("session"))
        } else {
            Ok(raw)
        }
    }

    fn apply_config(&self) -> Result<()> {
        let raw = self.raw()?;
        for (kind, prefs) in &self.config.methods {
            let c = cstring("method preference", prefs)?;
            // SAFETY: live session; `c` outlives the call.
            let rc = unsafe { ffi::libssh2_session_method_pref(raw, kind.raw(), c.as_ptr()) };
            if rc < 0 {
                return Err(self.error(rc));
            }
        }
        if let Some(b) = &self.config.banner {
            let c = cstring("banner", &format!("SSH-2.0-{b}"))?;
            // SAFETY: live session; libssh2 copies the banner.
            let rc = unsafe { ffi::libssh2_session_banner_set(raw, c.as_ptr()) };
            if rc < 0 {
                return Err(self.error(rc));
            }
        }
        Ok(())
    }

    /// Offers first the host-key algorithms whose key type known_hosts
    /// holds for the host, unless the configuration sets the order.
    fn prefer_known_host_key_types(&self, host: &str, port: u16) -> Result<()> {
        let config = &self.config;
        if config
            .methods
            .iter()
            .any(|(k, _)| *k == MethodType::HostKey)
            || config.host_key_policy == HostKeyPolicy::InsecureAcceptAny
        {
            return Ok(());
        }
        let Some(path) = config.known_hosts.as_deref() else {
            return Ok(());
        };
        let raw = self.raw()?;
        let supported = crate::methods::supported_methods(MethodType::HostKey);
        if let Some(order) =
            knownhosts::preferred_host_key_algorithms(raw, host, port, path, supported)
        {
            let c = cstring("host-key preference", &order)?;
            // SAFETY: live session; `c` outlives the call.
            let rc = unsafe {
                ffi::libssh2_session_method_pref(raw, MethodType::HostKey.raw(), c.as_ptr())
            };
            if rc < 0 {
                return Err(self.error(rc));
            }
        }
        Ok(())
    }

    /// A failed handshake as what failed in it: the first algorithm class
    /// the two offers do not share, when that is the cause.
    fn negotiation_error(&self, e: Error) -> Error {
        let shared = &self.transport.context;
        let (ours, theirs) = (shared.sent_offer.borrow(), shared.received_offer.borrow());
        match (ours.offer(), theirs.offer()) {
            (Some(o), Some(t)) => no_common_algorithm(o, t).unwrap_or(e),
            _ => e,
        }
    }

    /// Opens a channel with `open`, a libssh2 open function of kind `kind`:
    /// queued behind the session's other opens (libssh2 keeps a half-done
    /// open in the session), under the timeout.
    pub(crate) async fn open_channel(
        this: &Rc<Self>,
        kind: OpenKind,
        open: impl FnMut(
            *mut ffi::LIBSSH2_SESSION,
        ) -> std::result::Result<*mut ffi::LIBSSH2_CHANNEL, c_int>,
    ) -> Result<Channel> {
        this.with_timeout("channel open", async {
            let _lock = this.open_lock.lock().await;
            if !this.is_open() {
                return Err(Error::Closed("session"));
            }
            this.finish_abandoned_open().await?;
            this.open_kind.set(kind);
            let guard = Abandon::new(&this.open_abandoned);
            let r = this.call(open).await;
            guard.done();
            Self::adopt_channel(this, r?)
        })
        .await
    }

    /// Wraps a channel libssh2 handed over (opened or accepted) and
    /// registers it for the close path.
    pub(crate) fn adopt_channel(
        this: &Rc<Self>,
        raw: *mut ffi::LIBSSH2_CHANNEL,
    ) -> Result<Channel> {
        let ch = ChannelInner::new(this.clone(), raw);
        if !this.is_open() {
            // A close began while the open was in flight: the new channel
            // goes with the session (dropping `ch` hands it back).
            return Err(Error::Closed("session"));
        }
        this.children.channels.add(Rc::downgrade(&ch));
        Ok(Channel::from_inner(ch))
    }

    /// Finishes a channel open whose caller went away, and frees the channel.
    async fn finish_abandoned_open(&self) -> Result<()> {
        if !self.open_abandoned.get() {
            return Ok(());
        }
        // libssh2 resumes the half-done open whatever the arguments, but
        // only through the function that began it: a direct-tcpip open
        // keeps its message in the session too.
        let kind = self.open_kind.get();
        let r = self
            .call(|s| match kind {
                OpenKind::Session => open_session_channel(s, DEFAULT_WINDOW, DEFAULT_PACKET),
                OpenKind::DirectTcpip => crate::forward::resume_direct_tcpip(s),
                OpenKind::DirectStreamlocal => crate::forward::resume_direct_streamlocal(s),
            })
            .await;
        self.open_abandoned.set(false);
        if let Ok(raw) = r {
            // Freed now, or later if its close must wait for the peer.
            self.deferred_frees.push(raw);
            self.retry_deferred();
        }
        Ok(())
    }

    /// Frees a channel over a dead link: no IO, no waiting. libssh2 may say
    /// EAGAIN once (an AEAD read that stops before asking for input); the
    /// second attempt reaches the failing recv. Anything else is counted
    /// as a leak rather than spun on.
    pub(crate) fn free_channel_dead(&self, raw: *mut ffi::LIBSSH2_CHANNEL) {
        for _ in 0..2 {
            // SAFETY: `raw` belongs to this session; libssh2 frees it on any
            // result but EAGAIN, after which it is not touched again.
            if unsafe { ffi::libssh2_channel_free(raw) } != ffi::LIBSSH2_ERROR_EAGAIN {
                return;
            }
        }
        LEAKED_OBJECTS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }

    /// Hands a dropped channel to the session: its free (which sends EOF and
    /// CLOSE and may first process buffered input, ~100 µs mid-transfer)
    /// runs on the driver task, not on the dropper's path. During a close
    /// or teardown, the close path frees it.
    pub(crate) fn defer_free(this: &Rc<Self>, raw: *mut ffi::LIBSSH2_CHANNEL) {
        this.deferred_frees.push(raw);
        Self::schedule_retry(this);
    }

    /// Queues one driver callback that retries the deferred channel frees
    /// and listener cancels.
    pub(crate) fn schedule_retry(this: &Rc<Self>) {
        if this.retry_scheduled.replace(true) {
            return;
        }
        let weak = Rc::downgrade(this);
        this.reactor.run_soon(Box::new(move |_| {
            if let Some(s) = weak.upgrade() {
                s.retry_scheduled.set(false);
                s.retry_deferred();
            }
        }));
    }

    /// Retries the deferred channel frees and listener cancels, without
    /// waiting; only while the session is open (a close in progress owns
    /// the lists).
    pub(crate) fn retry_deferred(&self) {
        if !self.is_open() {
            return;
        }
        // SAFETY: channels of this live session on the deferred list only;
        // libssh2 frees each on any result but EAGAIN, after which the
        // list no longer holds it.
        self.deferred_frees
            .retry(|raw| unsafe { ffi::libssh2_channel_free(raw) });
        self.transport.pump();
        crate::forward::retry_deferred_cancels(self);
    }

    /// Graceful close of every live channel, then the deferred frees. A
    /// channel stays on the deferred list until libssh2 has freed it, so a
    /// close abandoned half-way leaves nothing behind for `free_now`.
    async fn close_channels(&self) {
        for ch in self.children.channels.live() {
            let _ = ch.close().await;
            ch.release();
        }
        self.deferred_frees
            // SAFETY: as in `retry_deferred`; only this close touches the
            // list while the session is closing.
            .finish(self, |raw| unsafe { ffi::libssh2_channel_free(raw) })
            .await;
    }

    /// Non-blocking teardown: the transport fails both callbacks, the ring
    /// cancels what is in flight (keeping its buffers until their CQEs),
    /// libssh2 frees everything without IO.
    fn free_now(&self) {
        self.state.set(State::Closed);
        if let Some(op) = self.keepalive_op.take() {
            self.reactor.abandon(op);
        }
        self.transport.kill();
        let raw = self.raw.get();
        if !raw.is_null() {
            // SAFETY: a live session; this only sets its socket state. The
            // link is dead (both callbacks fail): no channel free below
            // needs to build and encrypt an EOF and a CLOSE to find out.
            unsafe { ffi::libssh2_session_set_disconnected(raw) };
        }
        self.children.release_all();
        // Listeners with a cancel owed go with `session_free` too.
        self.forwards.forget();
        for raw in self.deferred_frees.take_all() {
            self.free_channel_dead(raw);
        }
        let raw = self.raw.replace(std::ptr::null_mut());
        if !raw.is_null() {
            // Like `free_channel_dead`: one EAGAIN may precede the failing recv.
            let freed = (0..2).any(|_| {
                // SAFETY: the session is freed once (libssh2 frees it on any
                // result but EAGAIN); both callbacks fail, so no IO happens.
                let rc = unsafe { ffi::libssh2_session_free(raw) };
                rc != ffi::LIBSSH2_ERROR_EAGAIN
            });
            if !freed {
                LEAKED_OBJECTS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
        }
    }

    /// Whether the session is still usable for new calls.
    /// The reactor this session runs on.
    pub(crate) fn reactor(&self) -> &Rc<Reactor> {
        &self.reactor
    }

    pub(crate) fn is_open(&self) -> bool {
        self.state.get() == State::Open
    }
}

impl Drop for SessionInner {
    fn drop(&mut self) {
        self.free_now();
    }
}
