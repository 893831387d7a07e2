//! [`Session`]: connect, handshake, host-key check, authentication,
//! keepalive, channels, and teardown.

use std::cell::{Cell, RefCell};
use std::ffi::CString;
use std::future::Future;
use std::net::SocketAddr;
use std::os::raw::{c_char, c_int, c_uint};
use std::path::{Path, PathBuf};
use std::rc::{Rc, Weak};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use crate::channel::{Channel, ChannelInner};
use crate::error::{Error, Result};
use crate::ffi;
use crate::knownhosts::{self, HostKey, HostKeyPolicy};
use crate::methods::MethodType;
use crate::methods::{check_methods, no_common_algorithm};
use crate::reactor::{OpId, Reactor, SharedFd};
use crate::transport::callbacks::{self, KbdResponder};
use crate::transport::{BridgeStats, Link, Transport};
use zeroize::Zeroize;

/// Cipher order offered by default on CPUs with AES instructions (see
/// [`default_ciphers`]): AES-GCM first, ordered by measured client CPU per
/// GiB. With our libssh2 build (bulk AES, libcrypto ChaCha20-Poly1305; see
/// `libssh2-patches/README.md`), one session moving 1 GiB over exec from a
/// loopback OpenSSH server on an AES-NI machine measured aes128-gcm and
/// aes256-gcm at ~0.4 s user CPU per GiB reading and writing,
/// chacha20-poly1305 at ~0.5–0.6 s, aes128-ctr (with hmac-sha2-256) at
/// ~1 s (`examples/cipher_bench.rs`).
pub const DEFAULT_CIPHERS: &str = "aes128-gcm@openssh.com,aes256-gcm@openssh.com,\
chacha20-poly1305@openssh.com,aes128-ctr,aes192-ctr,aes256-ctr";

/// Cipher order offered by default on CPUs without AES instructions:
/// chacha20-poly1305 first. There AES runs in software, several times
/// slower than ChaCha20, and table-based AES leaks timing.
pub const DEFAULT_CIPHERS_NO_AES: &str = "chacha20-poly1305@openssh.com,aes128-gcm@openssh.com,\
aes256-gcm@openssh.com,aes128-ctr,aes192-ctr,aes256-ctr";

/// The default cipher order for the CPU this runs on: [`DEFAULT_CIPHERS`]
/// where it has AES and carry-less multiply instructions (AES-NI and
/// PCLMULQDQ on x86-64, AES and PMULL on aarch64), which libcrypto uses
/// for AES-GCM, else [`DEFAULT_CIPHERS_NO_AES`].
pub fn default_ciphers() -> &'static str {
    #[cfg(target_arch = "x86_64")]
    let aes = std::arch::is_x86_feature_detected!("aes")
        && std::arch::is_x86_feature_detected!("pclmulqdq");
    #[cfg(target_arch = "aarch64")]
    let aes = std::arch::is_aarch64_feature_detected!("aes")
        && std::arch::is_aarch64_feature_detected!("pmull");
    #[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
    let aes = false;
    if aes {
        DEFAULT_CIPHERS
    } else {
        DEFAULT_CIPHERS_NO_AES
    }
}

/// Channel receive window offered by default. Throughput is at most
/// window / RTT, so raise it ([`Config::channel_window`]) for long links. On
/// loopback a larger window only costs: one session reading over exec
/// measured ~385 MB/s and 0.1 s sys CPU per GiB at 1–2 MiB, ~375 MB/s and
/// 0.2 s at 4–8 MiB, and ~210 MB/s at 16 MiB (more bytes in flight than the
/// caches hold).
pub const DEFAULT_WINDOW: u32 = 2 * 1024 * 1024;
/// Bound of a graceful close when no per-operation timeout is configured.
const CLOSE_LIMIT: Duration = Duration::from_secs(30);

/// Times a libssh2 call is repeated at once while it has input to process.
const MAX_REPEATS: usize = 64;

/// Largest packet libssh2 accepts (its receive buffer holds ~35000 bytes).
pub const DEFAULT_PACKET: u32 = 32768;

/// How a session connects, verifies and behaves.
#[derive(Debug, Clone)]
pub struct Config {
    pub(crate) connect_timeout: Duration,
    pub(crate) timeout: Option<Duration>,
    pub(crate) keepalive: Option<Duration>,
    pub(crate) keepalive_count_max: u32,
    pub(crate) known_hosts: Option<PathBuf>,
    pub(crate) host_key_policy: HostKeyPolicy,
    pub(crate) methods: Vec<(MethodType, String)>,
    pub(crate) banner: Option<String>,
    pub(crate) window_size: u32,
    pub(crate) packet_size: u32,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            connect_timeout: Duration::from_secs(10),
            timeout: Some(Duration::from_secs(60)),
            keepalive: Some(Duration::from_secs(30)),
            keepalive_count_max: 3,
            known_hosts: knownhosts::default_known_hosts(),
            host_key_policy: HostKeyPolicy::Strict,
            methods: vec![
                (MethodType::CipherClientToServer, default_ciphers().into()),
                (MethodType::CipherServerToClient, default_ciphers().into()),
            ],
            banner: None,
            window_size: DEFAULT_WINDOW,
            packet_size: DEFAULT_PACKET,
        }
    }
}

impl Config {
    /// The defaults: 10 s connect timeout, 60 s per operation, keepalive every
    /// 30 s (3 missed replies end the session), strict host-key checking
    /// against `~/.ssh/known_hosts`, ciphers in the order of
    /// [`default_ciphers`].
    pub fn new() -> Self {
        Self::default()
    }

    /// Time allowed for the TCP connect.
    pub fn connect_timeout(mut self, t: Duration) -> Self {
        self.connect_timeout = t;
        self
    }

    /// Time allowed for each async call (handshake, each auth attempt,
    /// channel open, each channel request, graceful close). `None`: no limit.
    /// Stream reads and writes are not limited by it: keepalive detects a
    /// dead peer.
    pub fn timeout(mut self, t: Option<Duration>) -> Self {
        self.timeout = t;
        self
    }

    /// Sends a keepalive after this much time with nothing received; when
    /// `count_max` keepalives in a row go unanswered the session fails with
    /// `TimedOut` (as OpenSSH's `ServerAliveInterval`/`ServerAliveCountMax`).
    /// `None` disables keepalive.
    pub fn keepalive(mut self, interval: Option<Duration>, count_max: u32) -> Self {
        self.keepalive = interval;
        self.keepalive_count_max = count_max.max(1);
        self
    }

    /// The known_hosts file to check against (`None`: no file; only
    /// [`HostKeyPolicy::InsecureAcceptAny`] then connects).
    pub fn known_hosts(mut self, path: Option<impl Into<PathBuf>>) -> Self {
        self.known_hosts = path.map(Into::into);
        self
    }

    /// What to do with unknown host keys.
    pub fn host_key_policy(mut self, p: HostKeyPolicy) -> Self {
        self.host_key_policy = p;
        self
    }

    /// Sets the preference list (comma-separated names) for one method type,
    /// replacing an earlier setting for the same type.
    pub fn method(mut self, kind: MethodType, prefs: impl Into<String>) -> Self {
        self.methods.retain(|(k, _)| *k != kind);
        self.methods.push((kind, prefs.into()));
        self
    }

    /// Sets the cipher preference in both directions.
    pub fn ciphers(self, prefs: &str) -> Self {
        self.method(MethodType::CipherClientToServer, prefs)
            .method(MethodType::CipherServerToClient, prefs)
    }

    /// The identification string sent to the server (after `SSH-2.0-`).
    pub fn banner(mut self, banner: impl Into<String>) -> Self {
        self.banner = Some(banner.into());
        self
    }

    /// Default receive window and maximum packet size of new channels.
    pub fn channel_window(mut self, window: u32, packet: u32) -> Self {
        self.window_size = window.max(packet);
        self.packet_size = packet.clamp(1024, DEFAULT_PACKET);
        self
    }
}

/// Counters of one session.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SessionStats {
    /// Bytes libssh2 holds for this session.
    pub libssh2_bytes: i64,
    /// Blocks libssh2 holds for this session.
    pub libssh2_blocks: i64,
    /// The send and recv callbacks' counters.
    pub bridge: BridgeStats,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Open,
    Closing,
    Closed,
}

/// An SSH session over the thread's io_uring ring.
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
    channels: RefCell<Vec<Weak<ChannelInner>>>,
    /// Channels dropped while their close was still owed to the peer.
    deferred_frees: RefCell<Vec<*mut ffi::LIBSSH2_CHANNEL>>,
    /// A driver callback that frees the deferred channels is queued.
    frees_scheduled: Cell<bool>,
    keepalive_op: Cell<Option<OpId>>,
    /// Keepalives sent since bytes last arrived.
    keepalives_unanswered: Cell<u32>,
    /// When the last keepalive left: bytes arriving after it answer it.
    keepalive_sent_at: Cell<Option<Instant>>,
    pub(crate) reactor: Rc<Reactor>,
    /// Remote forwarding: listeners, their deferred cancels, the queue of
    /// `forward_listen` calls.
    pub(crate) forwards: crate::forward::Forwards,
    /// Live [`crate::Agent`]s: freed before the session (libssh2 frees an
    /// agent through its session).
    pub(crate) agents: RefCell<Vec<Weak<crate::agent::AgentInner>>>,
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

pub(crate) fn cstring(what: &str, s: &str) -> Result<CString> {
    CString::new(s).map_err(|_| Error::InvalidInput(format!("{what} contains a NUL byte")))
}

/// A secret (a password or a key passphrase) copied for libssh2 as a
/// NUL-terminated string, wiped when dropped. Its `Debug` shows nothing of it.
///
/// The buffer is allocated once at its final size and never grows, so no
/// copy of the secret is left behind by a reallocation.
pub(crate) struct SecretCString(Vec<u8>);

impl SecretCString {
    /// Copies `secret`; `what` names it in the error for an inner NUL byte
    /// (the error never holds the secret).
    pub(crate) fn new(what: &str, secret: &str) -> Result<Self> {
        if secret.as_bytes().contains(&0) {
            return Err(Error::InvalidInput(format!("{what} contains a NUL byte")));
        }
        let mut buf = Vec::with_capacity(secret.len() + 1);
        buf.extend_from_slice(secret.as_bytes());
        buf.push(0);
        Ok(SecretCString(buf))
    }

    /// The NUL-terminated copy, valid while `self` lives.
    pub(crate) fn as_ptr(&self) -> *const c_char {
        self.0.as_ptr() as *const c_char
    }

    /// Overwrites the copy with zeros, in place (the buffer keeps its
    /// length, so it stays an empty NUL-terminated string).
    fn wipe(&mut self) {
        self.0.as_mut_slice().zeroize();
    }
}

impl Drop for SecretCString {
    fn drop(&mut self) {
        self.wipe();
    }
}

impl std::fmt::Debug for SecretCString {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SecretCString(<redacted>)")
    }
}

fn path_cstring(what: &str, p: &Path) -> Result<CString> {
    if !p.exists() {
        return Err(Error::InvalidInput(format!(
            "{what} {} does not exist",
            p.display()
        )));
    }
    CString::new(p.as_os_str().as_encoded_bytes())
        .map_err(|_| Error::InvalidInput(format!("{what} path contains a NUL byte")))
}

/// Sets a flag if dropped before `done()`: marks half-done libssh2 calls.
pub(crate) struct Abandon<'a>(Option<&'a Cell<bool>>);

impl<'a> Abandon<'a> {
    pub(crate) fn new(flag: &'a Cell<bool>) -> Self {
        Abandon(Some(flag))
    }
    pub(crate) fn done(mut self) {
        self.0 = None;
    }
}

impl Drop for Abandon<'_> {
    fn drop(&mut self) {
        if let Some(f) = self.0 {
            f.set(true);
        }
    }
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
        Err(last.unwrap_or_else(|| Error::InvalidInput(format!("{host} has no address"))))
    }

    /// Connects to `addr`; known_hosts is searched for its IP address.
    pub async fn connect_addr(addr: SocketAddr, config: Config) -> Result<Session> {
        Self::connect_addr_as(addr, &addr.ip().to_string(), config).await
    }

    async fn connect_addr_as(addr: SocketAddr, host: &str, config: Config) -> Result<Session> {
        // A bad algorithm list fails here, before any connection is made.
        for (kind, prefs) in &config.methods {
            check_methods(*kind, prefs)?;
        }
        let reactor = Reactor::current()?;
        let fd = tcp_socket(addr)?;
        let done = reactor.connect(&fd, addr, config.connect_timeout).await;
        match done.raw() {
            0 => {}
            r if r == -libc::ECANCELED || r == -libc::ETIME => {
                return Err(Error::Timeout {
                    operation: "connect",
                    after: config.connect_timeout,
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
        drop(done);
        let transport = Transport::new(reactor.clone(), fd);
        // SAFETY: `transport.shared` is boxed inside the Rc'd transport, which
        // the session keeps until after `libssh2_session_free` (SessionInner
        // frees the session before its fields drop).
        let raw = unsafe { callbacks::new_session(&*transport.shared) };
        if raw.is_null() {
            return Err(Error::Ssh {
                code: ffi::LIBSSH2_ERROR_ALLOC,
                message: "libssh2_session_init_ex failed".into(),
            });
        }
        let inner = Rc::new(SessionInner {
            raw: Cell::new(raw),
            transport,
            config,
            state: Cell::new(State::Open),
            auth_lock: tokio::sync::Mutex::new(()),
            open_lock: tokio::sync::Mutex::new(()),
            open_abandoned: Cell::new(false),
            open_kind: Cell::new(OpenKind::Session),
            auth_abandoned: Cell::new(false),
            channels: RefCell::new(Vec::new()),
            deferred_frees: RefCell::new(Vec::new()),
            frees_scheduled: Cell::new(false),
            keepalive_op: Cell::new(None),
            keepalives_unanswered: Cell::new(0),
            keepalive_sent_at: Cell::new(None),
            reactor,
            forwards: crate::forward::Forwards::new(),
            agents: RefCell::new(Vec::new()),
            host_key: RefCell::new(None),
        });
        let weak = Rc::downgrade(&inner);
        inner.transport.set_after_recv(Rc::new(move || {
            if let Some(s) = weak.upgrade() {
                s.retry_deferred_frees();
            }
        }));
        inner
            .transport
            .shared
            .agent_timeout
            .set(inner.config.timeout);
        inner.apply_config()?;
        inner.prefer_known_host_key_types(host, addr.port())?;
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
            addr.port(),
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

    /// The authentication methods the server offers `user`, or an empty list
    /// if `none` authentication succeeded.
    pub async fn auth_methods(&self, user: &str) -> Result<Vec<String>> {
        let c_user = cstring("user name", user)?;
        let inner = &self.inner;
        inner
            .auth("auth methods", |s| {
                // SAFETY: live session; `c_user` outlives the call.
                let p =
                    unsafe { ffi::libssh2_userauth_list(s, c_user.as_ptr(), user.len() as c_uint) };
                if p.is_null() {
                    // SAFETY: live session.
                    if unsafe { ffi::libssh2_userauth_authenticated(s) } != 0 {
                        return Ok(Vec::new());
                    }
                    // SAFETY: live session.
                    return Err(unsafe { ffi::libssh2_session_last_errno(s) });
                }
                // SAFETY: libssh2 returned a NUL-terminated string it owns.
                let list = unsafe { std::ffi::CStr::from_ptr(p) }.to_string_lossy();
                Ok(list.split(',').map(str::to_owned).collect())
            })
            .await
    }

    /// Whether authentication has succeeded.
    pub fn authenticated(&self) -> bool {
        self.inner
            .raw()
            // SAFETY: live session.
            .map(|s| unsafe { ffi::libssh2_userauth_authenticated(s) } != 0)
            .unwrap_or(false)
    }

    /// Authenticates with a private key file (OpenSSH or PEM format); the
    /// public key is derived from it. `passphrase` decrypts an encrypted key.
    ///
    /// The copy of `passphrase` made for libssh2 is wiped when the call
    /// returns; no error holds it.
    pub async fn auth_pubkey_file(
        &self,
        user: &str,
        private_key: &Path,
        passphrase: Option<&str>,
    ) -> Result<()> {
        let c_user = cstring("user name", user)?;
        let c_key = path_cstring("private key", private_key)?;
        let c_pass = passphrase
            .map(|p| SecretCString::new("passphrase", p))
            .transpose()?;
        self.inner
            .auth("public-key authentication", |s| {
                // SAFETY: live session; every string (`c_pass` included,
                // wiped only when dropped after the call) outlives the call.
                code(unsafe {
                    ffi::libssh2_userauth_publickey_fromfile_ex(
                        s,
                        c_user.as_ptr(),
                        user.len() as c_uint,
                        std::ptr::null(),
                        c_key.as_ptr(),
                        c_pass.as_ref().map_or(std::ptr::null(), |p| p.as_ptr()),
                    )
                })
            })
            .await
            .map_err(|e| {
                let which = private_key.display().to_string();
                let encrypted = passphrase.is_none()
                    && std::fs::read(private_key).is_ok_and(|mut k| {
                        let encrypted = key_is_encrypted(&k);
                        k.zeroize();
                        encrypted
                    });
                key_error(e, &which, encrypted)
            })
    }

    /// Authenticates with a private key held in memory (PEM or OpenSSH text).
    ///
    /// `private_key` is handed to libssh2 as it is (no copy is made here);
    /// the copy of `passphrase` made for libssh2 is wiped when the call
    /// returns. No error holds either.
    pub async fn auth_pubkey_memory(
        &self,
        user: &str,
        private_key: &str,
        passphrase: Option<&str>,
    ) -> Result<()> {
        let c_pass = passphrase
            .map(|p| SecretCString::new("passphrase", p))
            .transpose()?;
        self.inner
            .auth("public-key authentication", |s| {
                // SAFETY: live session; the buffers (`c_pass` included,
                // wiped only when dropped after the call) outlive the call.
                code(unsafe {
                    ffi::libssh2_userauth_publickey_frommemory(
                        s,
                        user.as_ptr() as *const c_char,
                        user.len(),
                        std::ptr::null(),
                        0,
                        private_key.as_ptr() as *const c_char,
                        private_key.len(),
                        c_pass.as_ref().map_or(std::ptr::null(), |p| p.as_ptr()),
                    )
                })
            })
            .await
            .map_err(|e| {
                let encrypted = passphrase.is_none() && key_is_encrypted(private_key.as_bytes());
                key_error(e, "the key in memory", encrypted)
            })
    }

    /// Authenticates with a password.
    ///
    /// `password` is handed to libssh2 by pointer and length (no copy is
    /// made here); no error holds it.
    pub async fn auth_password(&self, user: &str, password: &str) -> Result<()> {
        self.inner
            .auth("password authentication", |s| {
                // SAFETY: live session; the buffers outlive the call.
                code(unsafe {
                    ffi::libssh2_userauth_password_ex(
                        s,
                        user.as_ptr() as *const c_char,
                        user.len() as c_uint,
                        password.as_ptr() as *const c_char,
                        password.len() as c_uint,
                        None,
                    )
                })
            })
            .await
    }

    /// Keyboard-interactive authentication: `respond(name, instruction,
    /// prompts)` returns one answer per prompt (a prompt is its text and
    /// whether the answer may be echoed). No error holds an answer.
    pub async fn auth_keyboard_interactive<F>(&self, user: &str, mut respond: F) -> Result<()>
    where
        F: FnMut(&str, &str, &[(String, bool)]) -> Vec<String>,
    {
        let shared = &self.inner.transport.shared;
        let responder: &mut KbdResponder<'_> = &mut respond;
        // SAFETY: only the lifetime is erased; the pointer is cleared below
        // before `respond` goes out of scope, on every path (guard).
        let ptr: *mut KbdResponder<'static> = unsafe { std::mem::transmute(responder) };
        self.inner
            .auth("keyboard-interactive authentication", |s| {
                *shared.kbd.borrow_mut() = Some(ptr);
                // SAFETY: live session; the callback reads `shared.kbd`.
                let rc = unsafe {
                    ffi::libssh2_userauth_keyboard_interactive_ex(
                        s,
                        user.as_ptr() as *const c_char,
                        user.len() as c_uint,
                        Some(callbacks::kbd_cb),
                    )
                };
                *shared.kbd.borrow_mut() = None;
                code(rc)
            })
            .await
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

    /// Opens a channel and runs `command` on it.
    pub async fn exec(&self, command: &str) -> Result<Channel> {
        let mut ch = self.channel_session().await?;
        ch.exec(command).await?;
        Ok(ch)
    }

    /// Counters of this session.
    pub fn stats(&self) -> SessionStats {
        let shared = &self.inner.transport.shared;
        SessionStats {
            libssh2_bytes: shared.bytes_outstanding(),
            libssh2_blocks: shared.blocks_outstanding(),
            bridge: shared.bridge.stats(),
        }
    }

    /// Graceful close: closes every channel (EOF, CLOSE, the peer's CLOSE),
    /// sends SSH_MSG_DISCONNECT with `description`, waits until it has left,
    /// shuts the socket down and frees libssh2's state. Nothing is sent after
    /// the DISCONNECT.
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
            inner.transport.shutdown(after).await;
            Ok(())
        };
        tokio::time::timeout(after, graceful)
            .await
            .map_err(|_| Error::Timeout {
                operation: "close",
                after,
            })?
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

/// libssh2 reports an undecryptable key as a file error: say what it means.
fn key_error(e: Error, which: &str, encrypted: bool) -> Error {
    match e {
        Error::Ssh { code, .. } if code == ffi::LIBSSH2_ERROR_FILE && encrypted => {
            Error::KeyEncrypted {
                key: which.to_string(),
            }
        }
        Error::Ssh { code, message } if code == ffi::LIBSSH2_ERROR_FILE => Error::Ssh {
            code,
            message: format!(
                "cannot use private key {which}: wrong passphrase or unsupported format ({message})"
            ),
        },
        e => e,
    }
}

/// Whether a private key (OpenSSH or PEM text) is protected by a
/// passphrase: PEM's `ENCRYPTED` markers, or an OpenSSH key whose cipher
/// is not `none`.
fn key_is_encrypted(key: &[u8]) -> bool {
    // Searched in place, and only the key's first 64 base64 characters
    // decoded (magic, cipher and KDF names): no copy of key material is made.
    let find = |needle: &[u8]| key.windows(needle.len()).position(|w| w == needle);
    if find(b"-----BEGIN ENCRYPTED PRIVATE KEY-----").is_some()
        || find(b"Proc-Type: 4,ENCRYPTED").is_some()
    {
        return true;
    }
    let begin = b"-----BEGIN OPENSSH PRIVATE KEY-----";
    let Some(at) = find(begin) else {
        return false;
    };
    let head: String = key[at + begin.len()..]
        .iter()
        .take_while(|&&b| b != b'-')
        .filter(|b| !b.is_ascii_whitespace())
        .take(64)
        .map(|&b| b as char)
        .collect();
    let Some(raw) = base64_decode(&head) else {
        return false;
    };
    // "openssh-key-v1\0", then the cipher name as an SSH string.
    let magic = b"openssh-key-v1\0";
    let Some(rest) = raw.strip_prefix(magic.as_slice()) else {
        return false;
    };
    let Some(len) = rest.get(..4) else {
        return false;
    };
    let len = u32::from_be_bytes(len.try_into().expect("4 bytes")) as usize;
    rest.get(4..4 + len).is_some_and(|cipher| cipher != b"none")
}

/// Standard base64 (padding optional); `None` on a character outside it.
fn base64_decode(s: &str) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(s.len() * 3 / 4);
    let (mut acc, mut bits) = (0u32, 0);
    for c in s.bytes().take_while(|&c| c != b'=') {
        let v = match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => return None,
        } as u32;
        acc = (acc << 6) | v;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
        }
    }
    Some(out)
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

/// A libssh2 return code as a result.
pub(crate) fn code(rc: c_int) -> std::result::Result<(), c_int> {
    if rc < 0 { Err(rc) } else { Ok(()) }
}

/// Bytes of peer-supplied text kept in an error message.
pub(crate) const REMOTE_TEXT_MAX: usize = 1024;

/// Text that may come from the server (libssh2's error text, an SFTP status
/// message, the remote scp's error line, a signal name), made safe to print:
/// at most [`REMOTE_TEXT_MAX`] bytes of it are kept (then `… (N bytes)`),
/// invalid UTF-8 becomes U+FFFD, and control and bidirectional-formatting
/// characters are escaped (`\x1b`, `\u{202e}`), so the text cannot move a
/// terminal's cursor, recolour it, or reorder what is printed around it.
pub(crate) fn remote_text(bytes: &[u8]) -> String {
    let kept = &bytes[..bytes.len().min(REMOTE_TEXT_MAX)];
    let mut out = String::with_capacity(kept.len());
    for c in String::from_utf8_lossy(kept).chars() {
        let bidi = matches!(c, '\u{200e}' | '\u{200f}' | '\u{061c}')
            || ('\u{202a}'..='\u{202e}').contains(&c)
            || ('\u{2066}'..='\u{2069}').contains(&c);
        if c.is_control() || bidi {
            use std::fmt::Write;
            if (c as u32) < 0x80 {
                let _ = write!(out, "\\x{:02x}", c as u32);
            } else {
                let _ = write!(out, "\\u{{{:x}}}", c as u32);
            }
        } else {
            out.push(c);
        }
    }
    if bytes.len() > kept.len() {
        use std::fmt::Write;
        let _ = write!(out, "… ({} bytes)", bytes.len());
    }
    out
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
        let shared = &self.transport.shared;
        let (ours, theirs) = (shared.sent_offer.borrow(), shared.received_offer.borrow());
        match (ours.offer(), theirs.offer()) {
            (Some(o), Some(t)) => no_common_algorithm(o, t).unwrap_or(e),
            _ => e,
        }
    }

    /// libssh2's last error for `rc`, or the transport failure behind it.
    pub(crate) fn error(&self, rc: c_int) -> Error {
        if let Some((reason, description)) = self.transport.shared.disconnect.borrow().clone() {
            return Error::Disconnected {
                reason,
                description,
            };
        }
        let message = self
            .raw()
            .ok()
            .map(|s| {
                let mut msg: *mut c_char = std::ptr::null_mut();
                let mut len: c_int = 0;
                // SAFETY: live session; the message is copied at once (it
                // points into a session buffer reused by the next error).
                unsafe {
                    ffi::libssh2_session_last_error(s, &mut msg, &mut len, 0);
                    if msg.is_null() || len <= 0 {
                        String::new()
                    } else {
                        remote_text(std::slice::from_raw_parts(msg as *const u8, len as usize))
                    }
                }
            })
            .unwrap_or_default();
        match self.transport.bridge().link() {
            Link::PeerClosed => Error::Io(std::io::Error::new(
                std::io::ErrorKind::ConnectionReset,
                format!("connection closed by the server ({message})"),
            )),
            Link::Failed(errno) => {
                let e = std::io::Error::from_raw_os_error(errno);
                Error::Io(std::io::Error::new(e.kind(), format!("{e} ({message})")))
            }
            Link::Dead => Error::Closed("session"),
            Link::Open | Link::Disconnected => Error::Ssh { code: rc, message },
        }
    }

    /// Runs `fut` under the per-operation timeout.
    pub(crate) async fn with_timeout<T>(
        &self,
        operation: &'static str,
        fut: impl Future<Output = Result<T>>,
    ) -> Result<T> {
        match self.config.timeout {
            Some(after) => tokio::time::timeout(after, fut)
                .await
                .map_err(|_| Error::Timeout { operation, after })?,
            None => fut.await,
        }
    }

    /// Runs a libssh2 call: `Pending` (with the waker registered for this
    /// session's next socket event) while it says EAGAIN for want of input.
    ///
    /// libssh2 also says EAGAIN with input still buffered: it stops after
    /// decrypting the first block of a packet whose rest it has not read yet
    /// (AEAD ciphers), without asking for more. No socket event would come
    /// for that, so such a call is simply repeated.
    pub(crate) fn poll_call<T>(
        &self,
        cx: &mut Context<'_>,
        f: &mut impl FnMut(*mut ffi::LIBSSH2_SESSION) -> std::result::Result<T, c_int>,
    ) -> Poll<Result<T>> {
        let raw = match self.raw() {
            Ok(r) => r,
            Err(e) => return Poll::Ready(Err(e)),
        };
        self.reactor.ensure_driver_here();
        let bridge = self.transport.bridge();
        let mut stalls = 0;
        for _ in 0..MAX_REPEATS {
            bridge.clear_wants_recv();
            let taken = bridge.stats().bytes_received;
            let r = f(raw);
            if let Some(panic) = self.transport.shared.take_panic() {
                // A callback (the keyboard-interactive responder) panicked
                // inside libssh2; it was caught there, resume it here.
                std::panic::resume_unwind(panic);
            }
            self.transport.pump();
            match r {
                Ok(v) => return Poll::Ready(Ok(v)),
                Err(ffi::LIBSSH2_ERROR_EAGAIN) => {
                    // Bytes that arrived before an EOF or a failure are still
                    // valid (an exit status, the server's DISCONNECT reason):
                    // let libssh2 read them before reporting the link. Repeat
                    // only while libssh2 makes progress through them.
                    if bridge.stats().bytes_received != taken {
                        stalls = 0;
                    } else {
                        stalls += 1;
                    }
                    // One repeat without input is allowed in a row (libssh2
                    // stops once after decrypting a packet's first block from
                    // bytes it holds); a second means it waits for something else.
                    if !bridge.wants_recv()
                        && bridge.inbound_len() > 0
                        && bridge.link() != Link::Dead
                        && stalls <= 1
                    {
                        continue;
                    }
                    if !matches!(bridge.link(), Link::Open | Link::Disconnected) {
                        return Poll::Ready(Err(self.error(ffi::LIBSSH2_ERROR_SOCKET_RECV)));
                    }
                    self.transport.register(cx.waker());
                    return Poll::Pending;
                }
                Err(rc) => return Poll::Ready(Err(self.error(rc))),
            }
        }
        // Progress without end: let other tasks run, then continue.
        cx.waker().wake_by_ref();
        Poll::Pending
    }

    /// Repeats a libssh2 call until it stops saying EAGAIN.
    pub(crate) async fn call<T>(
        &self,
        mut f: impl FnMut(*mut ffi::LIBSSH2_SESSION) -> std::result::Result<T, c_int>,
    ) -> Result<T> {
        std::future::poll_fn(|cx| self.poll_call(cx, &mut f)).await
    }

    /// An authentication call: one at a time per session, under the timeout.
    pub(crate) async fn auth<T>(
        &self,
        operation: &'static str,
        f: impl FnMut(*mut ffi::LIBSSH2_SESSION) -> std::result::Result<T, c_int>,
    ) -> Result<T> {
        self.with_timeout(operation, async {
            let _lock = self.auth_lock.lock().await;
            if self.auth_abandoned.get() {
                return Err(Error::Poisoned("session authentication"));
            }
            let guard = Abandon::new(&self.auth_abandoned);
            let r = self.call(f).await;
            guard.done();
            r
        })
        .await
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
        this.channels.borrow_mut().push(Rc::downgrade(&ch));
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
            self.free_channel(raw);
        }
        Ok(())
    }

    /// Frees a channel without waiting: whatever close it still owes is
    /// finished later by the session (or skipped if the session dies first).
    fn free_channel(&self, raw: *mut ffi::LIBSSH2_CHANNEL) {
        // SAFETY: `raw` belongs to this live session and is freed once:
        // either now, or later from the deferred list.
        let rc = unsafe { ffi::libssh2_channel_free(raw) };
        if rc == ffi::LIBSSH2_ERROR_EAGAIN {
            self.deferred_frees.borrow_mut().push(raw);
        }
        self.transport.pump();
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
        this.deferred_frees.borrow_mut().push(raw);
        if this.frees_scheduled.replace(true) {
            return;
        }
        let weak = Rc::downgrade(this);
        this.reactor.run_soon(Box::new(move |_| {
            if let Some(s) = weak.upgrade() {
                s.frees_scheduled.set(false);
                s.retry_deferred_frees();
            }
        }));
    }

    /// Retries the deferred frees; only while the session is open (a close
    /// in progress owns the list).
    fn retry_deferred_frees(&self) {
        if !self.is_open() {
            return;
        }
        let pending = std::mem::take(&mut *self.deferred_frees.borrow_mut());
        for raw in pending {
            self.free_channel(raw);
        }
        crate::forward::retry_deferred_cancels(self);
    }

    /// Graceful close of every live channel, then the deferred frees. A
    /// channel stays on the deferred list until libssh2 has freed it, so a
    /// close abandoned half-way leaves nothing behind for `free_now`.
    async fn close_channels(&self) {
        let live: Vec<Rc<ChannelInner>> = self
            .channels
            .borrow()
            .iter()
            .filter_map(Weak::upgrade)
            .collect();
        for ch in live {
            let _ = ch.close().await;
            ch.release();
        }
        loop {
            let Some(raw) = self.deferred_frees.borrow().last().copied() else {
                break;
            };
            // Any result but EAGAIN means libssh2 freed the channel.
            let _ = self
                .call(|_| {
                    // SAFETY: a channel on the deferred list, which only this
                    // loop touches while the session is closing; `call`
                    // repeats only on EAGAIN, when libssh2 has not freed it.
                    code(unsafe { ffi::libssh2_channel_free(raw) })
                })
                .await;
            self.deferred_frees.borrow_mut().retain(|&r| r != raw);
        }
    }

    fn start_keepalive(this: &Rc<Self>) {
        let Some(interval) = this.config.keepalive else {
            return;
        };
        if let Ok(s) = this.raw() {
            // SAFETY: live session.
            unsafe { ffi::libssh2_keepalive_config(s, 1, interval.as_secs().max(1) as c_uint) };
        }
        Self::arm_keepalive(this, interval);
    }

    fn arm_keepalive(this: &Rc<Self>, after: Duration) {
        let weak = Rc::downgrade(this);
        let id = this.reactor.submit_timer(
            after,
            Box::new(move |done| {
                if done.raw() != -libc::ETIME {
                    return;
                }
                if let Some(s) = weak.upgrade() {
                    s.keepalive_op.set(None);
                    s.keepalive_tick(&s);
                }
            }),
        );
        this.keepalive_op.set(Some(id));
    }

    fn keepalive_tick(&self, this: &Rc<Self>) {
        let (Some(interval), Ok(s)) = (self.config.keepalive, self.raw()) else {
            return;
        };
        if self.state.get() != State::Open || !matches!(self.transport.bridge().link(), Link::Open)
        {
            return;
        }
        let last_rx = self.transport.last_rx();
        if self
            .keepalive_sent_at
            .get()
            .is_some_and(|sent| last_rx >= sent)
        {
            // Bytes came after the last probe: it was answered, however
            // late this tick runs.
            self.keepalives_unanswered.set(0);
        }
        let silent = Instant::now().duration_since(last_rx);
        if silent < interval {
            // Bytes arrived within the interval: the peer is alive and no
            // keepalive is needed (each reply stays in libssh2's packet list,
            // which nothing empties).
            self.keepalives_unanswered.set(0);
            Self::arm_keepalive(this, interval - silent);
            return;
        }
        // Silent for an interval: probe, unless `count_max` probes in a row
        // went unanswered (as OpenSSH's ServerAliveCountMax).
        let unanswered = self.keepalives_unanswered.get();
        if unanswered >= self.config.keepalive_count_max {
            self.transport.fail(libc::ETIMEDOUT);
            return;
        }
        // While a key exchange is under way libssh2 sends no keepalive
        // (`keepalive_send` resumes the exchange, which returns EAGAIN,
        // and reports nothing sent), so a peer that goes silent in the
        // middle of a rekey is never probed. Silence as long as the
        // unanswered probes would have taken (plus libssh2's whole-second
        // clock) ends the session all the same.
        if silent >= interval * (self.config.keepalive_count_max + 1) + Duration::from_secs(2) {
            self.transport.fail(libc::ETIMEDOUT);
            return;
        }
        let sent_before = self.transport.bridge().stats().packets_sent;
        let mut next: c_int = 0;
        // SAFETY: live session; no libssh2 call is running (single thread,
        // and completions never run inside one).
        unsafe { ffi::libssh2_keepalive_send(s, &mut next) };
        self.transport.pump();
        self.retry_deferred_frees();
        if self.transport.bridge().stats().packets_sent > sent_before {
            self.keepalives_unanswered.set(unanswered + 1);
            self.keepalive_sent_at.set(Some(Instant::now()));
            // Its reply stays in libssh2's packet list, where the next
            // `forward_listen` would take it for its own.
            self.forwards.note_stale_reply();
            Self::arm_keepalive(this, interval);
        } else {
            // libssh2 throttles on its own clock (whole seconds, 2 s at
            // least): come back when it will send.
            Self::arm_keepalive(this, Duration::from_secs(next.max(1) as u64));
        }
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
        // Agents first: libssh2 frees them through the session.
        let agents: Vec<_> = self.agents.borrow_mut().drain(..).collect();
        for agent in agents.iter().filter_map(Weak::upgrade) {
            agent.release();
        }
        // Listeners (live or with a cancel owed) go with `session_free`.
        self.forwards.forget();
        let live: Vec<Rc<ChannelInner>> = self
            .channels
            .borrow_mut()
            .drain(..)
            .filter_map(|w| w.upgrade())
            .collect();
        for ch in live {
            ch.release();
        }
        for raw in std::mem::take(&mut *self.deferred_frees.borrow_mut()) {
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

    /// Drops registry entries of channels that no longer exist.
    pub(crate) fn prune_channels(&self) {
        self.channels.borrow_mut().retain(|w| w.strong_count() > 0);
    }
}

impl Drop for SessionInner {
    fn drop(&mut self) {
        self.free_now();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &str = "correct horse battery staple";

    #[test]
    fn encrypted_keys_are_told_apart_from_plain_and_unreadable_ones() {
        let openssh = |body: &str| {
            format!(
                "-----BEGIN OPENSSH PRIVATE KEY-----\n{}\n-----END OPENSSH PRIVATE KEY-----\n",
                body.as_bytes()
                    .chunks(20)
                    .map(|c| std::str::from_utf8(c).unwrap())
                    .collect::<Vec<_>>()
                    .join("\n")
            )
        };
        let none = "b3BlbnNzaC1rZXktdjEAAAAABG5vbmUAAAAGYmNyeXB0";
        let aes = "b3BlbnNzaC1rZXktdjEAAAAACmFlczI1Ni1jdHIAAAAGYmNyeXB0";
        let chacha =
            "b3BlbnNzaC1rZXktdjEAAAAAHWNoYWNoYTIwLXBvbHkxMzA1QG9wZW5zc2guY29tAAAABmJjcnlwdA==";
        assert!(!key_is_encrypted(openssh(none).as_bytes()));
        assert!(key_is_encrypted(openssh(aes).as_bytes()));
        assert!(key_is_encrypted(openssh(chacha).as_bytes()));
        assert!(!key_is_encrypted(openssh("not*base64").as_bytes()));
        assert!(!key_is_encrypted(b"-----BEGIN OPENSSH PRIVATE KEY-----"));
        assert!(key_is_encrypted(
            b"-----BEGIN RSA PRIVATE KEY-----\nProc-Type: 4,ENCRYPTED\nDEK-Info: AES-128-CBC,00\n"
        ));
        assert!(key_is_encrypted(
            b"-----BEGIN ENCRYPTED PRIVATE KEY-----\nMIIB\n"
        ));
        assert!(!key_is_encrypted(b"-----BEGIN PRIVATE KEY-----\nMIIB\n"));
        assert!(!key_is_encrypted(b""));
    }

    #[test]
    fn secret_copy_is_nul_terminated_and_wiped_in_place() {
        let mut s = SecretCString::new("password", SECRET).unwrap();
        let mut want = SECRET.as_bytes().to_vec();
        want.push(0);
        assert_eq!(s.0, want);
        // SAFETY: `s` is alive and holds a NUL-terminated copy made by `new`.
        let seen = unsafe { std::ffi::CStr::from_ptr(s.as_ptr()) };
        assert_eq!(seen.to_bytes(), SECRET.as_bytes());
        // What `drop` runs; the buffer is still allocated, so it can be read.
        s.wipe();
        assert_eq!(s.0.len(), SECRET.len() + 1, "wiped in place, not shrunk");
        assert!(s.0.iter().all(|&b| b == 0), "not wiped: {:?}", s.0);
    }

    #[test]
    fn secret_copy_refuses_a_nul_without_echoing_the_secret() {
        let bad = format!("{SECRET}\0tail");
        let e = SecretCString::new("passphrase", &bad).unwrap_err();
        for text in [e.to_string(), format!("{e:?}")] {
            assert!(text.contains("passphrase"), "{text}");
            assert!(!text.contains(SECRET), "the secret leaked: {text}");
            assert!(!text.contains("tail"), "the secret leaked: {text}");
        }
    }

    #[test]
    fn secret_copy_debug_shows_nothing_of_it() {
        let s = SecretCString::new("password", SECRET).unwrap();
        for text in [format!("{s:?}"), format!("{s:#?}")] {
            assert!(!text.contains(SECRET), "{text}");
            assert!(text.contains("redacted"), "{text}");
        }
    }

    #[test]
    fn remote_text_escapes_controls_and_caps_length() {
        assert_eq!(remote_text(b"No such file"), "No such file");
        assert_eq!(remote_text("é ü".as_bytes()), "é ü");
        assert_eq!(
            remote_text(b"\x1b[2J\x1b]0;pwned\x07a\tb\r\n"),
            "\\x1b[2J\\x1b]0;pwned\\x07a\\x09b\\x0d\\x0a"
        );
        assert_eq!(
            remote_text("x\u{202e}y\u{85}z".as_bytes()),
            "x\\u{202e}y\\u{85}z"
        );
        assert_eq!(remote_text(b"a\xffb"), "a\u{fffd}b");
        let long = vec![b'A'; 100_000];
        let t = remote_text(&long);
        assert!(t.starts_with(&"A".repeat(REMOTE_TEXT_MAX)), "{}", &t[..20]);
        assert!(t.ends_with("… (100000 bytes)"), "{}", &t[t.len() - 30..]);
        assert_eq!(t.len(), REMOTE_TEXT_MAX + "… (100000 bytes)".len());
        // Escapes at most quadruple the kept bytes: the bound holds.
        assert!(remote_text(&[0x1b; 100_000]).len() <= 4 * REMOTE_TEXT_MAX + 32);
    }
}
