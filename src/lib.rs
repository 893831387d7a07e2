//! SSH over io_uring: libssh2's protocol engine with its socket IO replaced
//! by a per-thread io_uring ring.
//!
//! # Design
//!
//! * [`reactor`]: one ring per thread, knowing nothing of SSH. Operations
//!   own their buffers until their own completion arrives; submissions of
//!   every session on the thread go to the kernel in one `io_uring_enter`
//!   per scheduler tick. Where io_uring is forbidden or missing (Docker's
//!   default seccomp profile, `kernel.io_uring_disabled`), the same
//!   operations run as non-blocking socket calls on epoll readiness
//!   ([`reactor::Backend::Poll`]): chosen when the kernel refuses the ring,
//!   or explicitly with [`reactor::init_with`] or
//!   `URING_SSH_BACKEND=poll`.
//! * The transport (crate-private): libssh2's allocator and its send and
//!   recv callbacks. The send callback takes each packet whole into an
//!   outbound queue (never short, never `EAGAIN`, which would pin libssh2
//!   to that packet); the recv callback reads from a buffer that the
//!   reactor's receives fill (4 KiB on a quiet session, doubling up to
//!   512 KiB while they come back full). libssh2 is handed a dummy
//!   non-blocking fd; the real, blocking socket is seen only by the
//!   reactor. Its counters are public: [`SessionStats`],
//!   [`libssh2_bytes_outstanding`], [`sends_on_dead_links`].
//! * [`Session`] and [`Channel`]: async wrappers. Each libssh2 call that
//!   says `EAGAIN` waits for the session's next socket event and is
//!   resumed. libssh2 keeps the half-done state of a call in its object, so
//!   such calls never overlap: channel opens (session, direct-tcpip,
//!   streamlocal), `forward_listen` and authentications queue per
//!   session (an open abandoned half-way is finished by the next opener,
//!   with the libssh2 function that began it;
//!   an abandoned authentication makes further ones fail with
//!   [`Error::Poisoned`]), and a channel's requests take `&mut self`.
//!
//! # What Drop promises
//!
//! Dropping a [`Session`] (its last handle) at any moment — mid-handshake,
//! mid-transfer — never blocks and never waits for the peer: the transport
//! is marked dead so both callbacks fail, `IORING_OP_ASYNC_CANCEL` is
//! submitted for the session's in-flight ops together with a `SHUTDOWN`,
//! libssh2 frees channels and session at once without IO, and the ring keeps
//! each buffer (and the socket) until that op's own completion arrives.
//! Dropping a [`Channel`] while its session lives frees it without blocking;
//! the EOF/CLOSE it owes is finished by the session later.
//! The same holds for what is built on channels ([`ScpWriter`],
//! [`ScpReader`], the connections of a [`LocalForward`]) and for a dropped
//! [`Listener`], whose `cancel-tcpip-forward` the session sends later; an
//! [`Agent`] is freed before its session.
//!
//! The graceful path, [`Session::close`], closes channels, sends
//! `SSH_MSG_DISCONNECT`, waits until it has left, and only then shuts the
//! socket down: nothing is sent after the DISCONNECT.
//!
//! # Example
//!
//! ```no_run
//! use tokio::io::AsyncReadExt;
//! use uring_ssh::{Config, Session};
//!
//! #[tokio::main(flavor = "current_thread")]
//! async fn main() -> Result<(), uring_ssh::Error> {
//!     let session = Session::connect("127.0.0.1", 22, Config::new()).await?;
//!     let key = std::path::Path::new("/root/.ssh/id_ed25519");
//!     session.auth_pubkey_file("root", key, None).await?;
//!     let mut channel = session.exec("uname -a").await?;
//!     let mut out = String::new();
//!     channel.read_to_string(&mut out).await?;
//!     let status = channel.wait().await?;
//!     println!("{out} (exit {})", status.code);
//!     session.close("bye").await
//! }
//! ```
#![warn(missing_docs, missing_debug_implementations)]

#[cfg(feature = "aws-lc")]
mod aes_gcm;
mod agent;
mod channel;
mod error;
mod ffi;
mod forward;
#[cfg(fuzzing)]
#[doc(hidden)]
pub mod fuzzing;
mod handle;
pub mod knownhosts;
mod localdir;
mod methods;
mod mlkem;
mod pool;
pub mod reactor;
mod scp;
mod session;
pub mod sftp;
mod text;
mod transport;

/// Design notes from `kernel-notes/`, rendered with the API docs.
pub mod notes {
    /// What the reactor relies on, per kernel version, and the tests that
    /// prove it on the running kernel.
    pub mod io_uring {
        #![doc = include_str!("../kernel-notes/io_uring.md")]
    }
    /// Costs found on the receive path by profiling, and what removed them.
    pub mod receive_path {
        #![doc = include_str!("../kernel-notes/receive-path.md")]
    }
    /// The poll engine: the reactor's fallback where io_uring cannot run.
    pub mod poll_backend {
        #![doc = include_str!("../kernel-notes/poll-backend.md")]
    }
    /// Freeing a libssh2 session: close order, IO in the free functions,
    /// non-blocking teardown, and the traps met on the way.
    pub mod teardown {
        #![doc = include_str!("../kernel-notes/teardown.md")]
    }
    /// The SFTP client: why our own, how replies reach their waiters, how
    /// transfers pipeline and never leave a half-written file.
    pub mod sftp {
        #![doc = include_str!("../kernel-notes/sftp.md")]
    }
    /// The threat model: what a hostile server, network or local user can
    /// and cannot make the client do, each claim with its test.
    pub mod security {
        #![doc = include_str!("../kernel-notes/security.md")]
    }
    /// The reactor's background tasks (the relays of sessions through a
    /// jump session): why they exist and how they are woken and dropped.
    pub mod background_tasks {
        #![doc = include_str!("../kernel-notes/background-tasks.md")]
    }
    /// What the tests, fault matrix, drop proofs and fuzz targets cover,
    /// and the commands to repeat them.
    pub mod testing {
        #![doc = include_str!("../kernel-notes/testing.md")]
    }
}

pub use agent::{Agent, AgentIdentity};
pub use channel::{Channel, ExitStatus, Stderr};
pub use error::{
    Error, HostKeyError, InvalidInput, KernelSupportError, RemoteProtocol, Result, RuntimeError,
};
pub use forward::{DEFAULT_ACCEPT_QUEUE, Listener, LocalForward, LocalForwardStats};
pub use handle::{
    EXEC_CHUNK, EXEC_MAX_BUFFERED, EXEC_QUEUE_CHUNKS, EXEC_STDIN_CHUNK, EXEC_STDIN_QUEUE_CHUNKS,
    RemoteProcess, RemoteStderr, SFTP_READ_LIMIT, SessionHandle, SftpHandle,
};
pub use knownhosts::{HostKey, HostKeyPolicy};
pub use methods::{MethodType, Negotiated, is_post_quantum, supported_methods};
pub use pool::{JoinError, JoinHandle, Pool, PoolConfig};
pub use scp::{ScpReader, ScpStat, ScpWriter};
pub use session::{
    Config, DEFAULT_CIPHERS, DEFAULT_CIPHERS_NO_AES, DEFAULT_PACKET, DEFAULT_RECEIVE_BATCH_WAIT,
    DEFAULT_WINDOW, RECEIVE_BATCH_MODE_ENV, Session, SessionStats, default_ciphers, leaked_objects,
};
/// The bridge's byte queues alone, public only so that `benches/bridge.rs`
/// can measure them without a session; not part of the API.
#[doc(hidden)]
pub use transport::Bridge;
pub use transport::BridgeStats;
pub use transport::alloc::{libssh2_blocks_outstanding, libssh2_bytes_outstanding};
pub use transport::callbacks::sends_on_dead_links;

/// AES-GCM cipher states that AWS-LC holds for libssh2 (feature `aws-lc`,
/// on by default): two per session whose keys use `aes128-gcm` or
/// `aes256-gcm`, one each way, freed with the session or replaced at a
/// rekey. 0 without the feature, or with `URING_SSH_AES_GCM=openssl` set
/// before the first session (OpenSSL's AES-GCM, inside libssh2's counts).
pub fn aes_gcm_states_outstanding() -> u64 {
    #[cfg(feature = "aws-lc")]
    return aes_gcm::states_outstanding();
    #[cfg(not(feature = "aws-lc"))]
    0
}

/// The libssh2 version linked, as it reports itself at run time.
pub fn libssh2_version() -> String {
    // SAFETY: returns a static NUL-terminated string.
    unsafe { std::ffi::CStr::from_ptr(ffi::libssh2_version(0)) }
        .to_string_lossy()
        .into_owned()
}
