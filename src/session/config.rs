//! [`Config`]: how a session connects, verifies and behaves, and the
//! defaults it starts from (cipher order per CPU, channel window).

use std::path::PathBuf;
use std::time::Duration;

use crate::knownhosts::{self, HostKeyPolicy};
use crate::methods::MethodType;

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
    pub(crate) receive_batch_wait: Option<Duration>,
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
            receive_batch_wait: Some(DEFAULT_RECEIVE_BATCH_WAIT),
        }
    }
}

/// The default of [`Config::receive_batch_wait`]: what the benchmarks
/// measured.
pub const DEFAULT_RECEIVE_BATCH_WAIT: Duration = Duration::from_millis(1);

/// The environment variable that, for measurement, changes how every
/// session of the process batches its receives: `off` never batches,
/// whatever the config says; `waitall` makes sessions that batch gather
/// each batch with one `MSG_WAITALL` receive and a linked timeout (the
/// kernel copies each packet as it comes, waking the thread) instead of a
/// timer and then one receive of what the socket holds (the default,
/// which sleeps through the wait).
/// See `kernel-notes/io_uring.md`. Read when a session connects.
pub const RECEIVE_BATCH_MODE_ENV: &str = "URING_SSH_RECEIVE_BATCH_MODE";

impl Config {
    /// The defaults: 10 s connect timeout, 60 s per operation, keepalive every
    /// 30 s (3 missed replies end the session), strict host-key checking
    /// against `~/.ssh/known_hosts`, ciphers in the order of
    /// [`default_ciphers`].
    pub fn new() -> Self {
        Self::default()
    }

    /// How long the session lets data gather before it receives a batch
    /// (64 KiB up to 512 KiB or a quarter of the channel window) while data
    /// streams in, on the io_uring engine: a timer, then one receive of
    /// what the socket holds, and at once the next while receives come
    /// back full. One completion, and one wake-up of the thread, then
    /// carries a burst of packets instead of one (`kernel-notes/io_uring.md`).
    /// Batching starts when a receive finds more than one full packet
    /// waiting (48 KiB or more); a batch that
    /// brings less than half its buffer after its wait is a pause of the
    /// stream, which costs up to this much latency and makes the session
    /// receive packet by packet for twice as long as after the last pause
    /// before batching again, so traffic of requests and replies pays it a
    /// few times, not on every reply. Default:
    /// [`DEFAULT_RECEIVE_BATCH_WAIT`]; `None` receives each packet as it
    /// comes. The poll engine never batches, nor does a session whose
    /// channel window ([`Config::channel_window`]) is under 256 KiB.
    pub fn receive_batch_wait(mut self, wait: Option<Duration>) -> Self {
        self.receive_batch_wait = wait;
        self
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
