//! One error type for the crate, mapped to [`std::io::ErrorKind`] where one fits.

use std::fmt;
use std::io;
use std::time::Duration;

use crate::methods::MethodType;

/// Everything that can go wrong in this crate.
#[derive(Debug)]
#[non_exhaustive]
pub enum Error {
    /// libssh2 reported an error: its code (`LIBSSH2_ERROR_*`) and message,
    /// copied when the call failed.
    Ssh {
        /// The `LIBSSH2_ERROR_*` code.
        code: i32,
        /// libssh2's message for it.
        message: String,
    },
    /// An operating-system error, or the transport under the session failed
    /// (connection refused or reset, peer closed the connection).
    Io(io::Error),
    /// An operation did not finish within its configured timeout.
    Timeout {
        /// What was being done.
        operation: &'static str,
        /// The timeout that expired.
        after: Duration,
    },
    /// The server's host key did not pass verification.
    HostKey(HostKeyError),
    /// The kernel cannot run the reactor.
    Kernel(KernelSupportError),
    /// The crate is used outside of what it supports (no runtime, or a
    /// multi-thread one).
    Runtime(RuntimeError),
    /// A caller passed something unusable (a string with a NUL byte, a
    /// missing file, arguments that do not go together).
    InvalidInput(InvalidInput),
    /// The session or channel was closed, or torn down, before this call.
    Closed(&'static str),
    /// The SFTP server answered a request with an error status.
    Sftp {
        /// The `SSH_FX_*` status code (see [`crate::sftp::status`]).
        code: u32,
        /// The server's message.
        message: String,
        /// The path the request named, if it named one.
        path: Option<String>,
    },
    /// The server broke the SFTP or scp protocol (a malformed or unexpected
    /// reply, a header scp does not allow).
    Protocol {
        /// Which protocol.
        protocol: RemoteProtocol,
        /// What the server did, its text escaped and bounded.
        message: String,
    },
    /// An earlier call on the same object was abandoned half-way (its future
    /// was dropped or timed out) in a way libssh2 cannot resume; the object
    /// must be dropped.
    Poisoned(&'static str),
    /// The server sent a name the client refuses to use as a local path
    /// component: empty, `.` or `..`, or holding `/` or NUL. Only the entry
    /// that carried it fails.
    UnsafeName {
        /// The name as sent, escaped (`\xNN` for bytes that are not
        /// printable ASCII).
        name: String,
        /// The directory whose listing held it, as the server spells it.
        listed_in: String,
        /// Why it was refused.
        reason: &'static str,
    },
    /// A local write would have left its destination directory: a symbolic
    /// link or a path that escapes stands where the transfer writes. The
    /// kernel refused it (`openat2` with `RESOLVE_BENEATH |
    /// RESOLVE_NO_SYMLINKS`, or `O_NOFOLLOW`), and nothing was written.
    OutsideDestination {
        /// The local path concerned.
        path: std::path::PathBuf,
        /// What stood in the way.
        reason: String,
    },
    /// Client and server offered no algorithm of one class in common: the
    /// negotiation that follows the first exchange of KEXINIT messages
    /// failed. Both offers are as sent (the server's names escaped and
    /// bounded).
    NoCommonAlgorithm {
        /// The class with nothing in common (the first one, in KEXINIT order).
        kind: MethodType,
        /// What this client offered.
        ours: Vec<String>,
        /// What the server offered.
        theirs: Vec<String>,
    },
    /// The server ended the session with SSH_MSG_DISCONNECT ("Too many
    /// authentication failures", a shutdown, …). Nothing more can be done
    /// on the session.
    Disconnected {
        /// The reason code (`SSH_DISCONNECT_*`, RFC 4253 §11.1).
        reason: u32,
        /// The server's description, escaped and bounded.
        description: String,
    },
    /// The private key is encrypted and no passphrase was given.
    KeyEncrypted {
        /// Which key (its path, or "the key in memory").
        key: String,
    },
    /// Something the server controls exceeded a bound the client keeps
    /// (entries in a tree, a file's size, a name's length, a header line).
    LimitExceeded {
        /// What was bounded.
        what: &'static str,
        /// The bound.
        limit: u64,
    },
}

/// Where the crate cannot run.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum RuntimeError {
    /// Called outside a tokio runtime.
    NoRuntime,
    /// Called on a multi-thread tokio runtime: the reactor keeps one ring
    /// per thread and needs a current-thread runtime.
    MultiThread,
    /// `reactor::init` on a thread that has a reactor already.
    ReactorExists,
    /// `reactor::init_with` asked for one engine on a thread whose reactor
    /// runs the other.
    BackendMismatch {
        /// The engine the thread's reactor runs.
        running: crate::reactor::Backend,
        /// The engine asked for.
        asked: crate::reactor::Backend,
    },
    /// The pool thread that owned a [`SessionHandle`](crate::SessionHandle)'s
    /// session is gone: the pool shut down (or was dropped), and the session
    /// was dropped with it.
    PoolClosed,
}

/// What is wrong with a caller's input.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum InvalidInput {
    /// A string for libssh2 (a user name, a command, a path) holds a NUL
    /// byte, or a newline where the protocol forbids one.
    ForbiddenByte {
        /// What the string is.
        what: String,
        /// The byte.
        byte: u8,
    },
    /// A file or socket the call needs does not exist.
    NotFound {
        /// What the file is for.
        what: String,
        /// Where it was looked for.
        path: std::path::PathBuf,
    },
    /// A path the call cannot use: it names no file, or not a regular
    /// file, where one is needed.
    Path {
        /// The path given.
        path: String,
        /// What is wrong with it.
        problem: &'static str,
    },
    /// An algorithm preference list that is empty, or names an algorithm
    /// this build does not have.
    Algorithm {
        /// The algorithm class.
        kind: MethodType,
        /// The name this build lacks (`None`: the list was empty).
        unsupported: Option<String>,
        /// What this build has for the class, in its default order.
        supported: Vec<String>,
    },
    /// An environment variable holds a value the crate does not know.
    Environment {
        /// The variable.
        variable: &'static str,
        /// Its value (lossily decoded).
        value: String,
        /// The values it may hold.
        expected: &'static str,
    },
    /// A host name that resolved to no address.
    NoAddress {
        /// The name.
        host: String,
    },
    /// Arguments that do not go together, or a call made out of order.
    Usage(&'static str),
}

/// A protocol run over an SSH channel whose rules the server broke.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum RemoteProtocol {
    /// SFTP (the `sftp` subsystem).
    Sftp,
    /// scp's protocol (`scp -t` / `scp -f`).
    Scp,
}

/// Why a host key was rejected.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum HostKeyError {
    /// The host is not in the known_hosts file and the policy is strict.
    Unknown {
        /// `host` or `[host]:port` as looked up.
        host: String,
        /// The key's type name (`ssh-ed25519`, …).
        key_type: String,
        /// `SHA256:` fingerprint of the key the server presented.
        fingerprint: String,
    },
    /// The host is known with a different key: possibly an attack.
    Changed {
        /// `host` or `[host]:port` as looked up.
        host: String,
        /// The key's type name.
        key_type: String,
        /// `SHA256:` fingerprint of the key the server presented.
        fingerprint: String,
    },
    /// The known_hosts file could not be read or written.
    File {
        /// The file.
        path: String,
        /// What failed.
        reason: String,
    },
}

/// Why the reactor cannot run on this kernel.
#[derive(Debug)]
#[non_exhaustive]
pub enum KernelSupportError {
    /// io_uring cannot be set up at all.
    Unavailable {
        /// A sentence naming the likely cause.
        reason: String,
        /// The error from the system call.
        source: io::Error,
    },
    /// The kernel lacks an opcode the reactor needs.
    MissingOpcode {
        /// The opcode's name.
        opcode: &'static str,
        /// The kernel release that added it.
        since: &'static str,
    },
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Ssh { code, message } => write!(f, "libssh2 error {code}: {message}"),
            Error::Io(e) => write!(f, "{e}"),
            Error::Timeout { operation, after } => {
                write!(f, "{operation} timed out after {after:?}")
            }
            Error::HostKey(e) => write!(f, "{e}"),
            Error::Kernel(e) => write!(f, "{e}"),
            Error::Runtime(e) => write!(f, "{e}"),
            Error::InvalidInput(e) => write!(f, "invalid input: {e}"),
            Error::Closed(what) => write!(f, "{what} is closed"),
            Error::Sftp {
                code,
                message,
                path,
            } => {
                let name = sftp_status::name(*code);
                match path {
                    Some(p) => write!(f, "SFTP {name} for {p}: {message}"),
                    None => write!(f, "SFTP {name}: {message}"),
                }
            }
            Error::Protocol { protocol, message } => {
                write!(f, "{protocol} protocol error: {message}")
            }
            Error::Poisoned(what) => write!(
                f,
                "{what} is unusable: an earlier call on it was abandoned half-way"
            ),
            Error::UnsafeName {
                name,
                listed_in,
                reason,
            } => write!(f, "refused name \"{name}\" listed in {listed_in}: {reason}"),
            Error::OutsideDestination { path, reason } => {
                write!(f, "refused to write {}: {reason}", path.display())
            }
            Error::LimitExceeded { what, limit } => {
                write!(f, "{what} exceeds the client's limit of {limit}")
            }
            Error::NoCommonAlgorithm { kind, ours, theirs } => write!(
                f,
                "no matching {kind} algorithm: we offered {}; the server offered {}",
                ours.join(","),
                if theirs.is_empty() {
                    "nothing".to_string()
                } else {
                    theirs.join(",")
                }
            ),
            Error::Disconnected {
                reason,
                description,
            } => write!(
                f,
                "the server disconnected ({}, reason {reason}): {description}",
                disconnect_reason(*reason)
            ),
            Error::KeyEncrypted { key } => write!(
                f,
                "private key {key} is encrypted and no passphrase was given \
                 (give its passphrase, or use an agent holding it)"
            ),
        }
    }
}

impl fmt::Display for RuntimeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RuntimeError::NoRuntime => {
                f.write_str("uring-ssh must be used inside a tokio current-thread runtime")
            }
            RuntimeError::MultiThread => f.write_str(
                "uring-ssh keeps one ring per thread and needs a current-thread runtime \
                 (run one per thread instead of a multi-thread runtime)",
            ),
            RuntimeError::ReactorExists => f.write_str("this thread has a reactor already"),
            RuntimeError::BackendMismatch { running, asked } => write!(
                f,
                "this thread's reactor already runs on {running}, not {asked}"
            ),
            RuntimeError::PoolClosed => f.write_str(
                "the pool thread that owned this session has stopped (the pool shut down)",
            ),
        }
    }
}

impl fmt::Display for InvalidInput {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            InvalidInput::ForbiddenByte { what, byte: 0 } => {
                write!(f, "{what} contains a NUL byte")
            }
            InvalidInput::ForbiddenByte { what, byte: b'\n' } => {
                write!(f, "{what} contains a newline")
            }
            InvalidInput::ForbiddenByte { what, byte } => {
                write!(f, "{what} contains the byte {byte:#04x}")
            }
            InvalidInput::NotFound { what, path } => {
                write!(f, "{what} {} does not exist", path.display())
            }
            InvalidInput::Path { path, problem } => write!(f, "{path} {problem}"),
            InvalidInput::Algorithm {
                kind,
                unsupported: None,
                ..
            } => write!(f, "empty {kind} algorithm list"),
            InvalidInput::Algorithm {
                kind,
                unsupported: Some(name),
                supported,
            } => write!(
                f,
                "{kind} algorithm {name:?} is not supported by this build (it has: {})",
                supported.join(",")
            ),
            InvalidInput::Environment {
                variable,
                value,
                expected,
            } => write!(f, "{variable}={value:?}: expected {expected}"),
            InvalidInput::NoAddress { host } => write!(f, "{host} has no address"),
            InvalidInput::Usage(what) => f.write_str(what),
        }
    }
}

impl fmt::Display for RemoteProtocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            RemoteProtocol::Sftp => "SFTP",
            RemoteProtocol::Scp => "scp",
        })
    }
}

impl fmt::Display for HostKeyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HostKeyError::Unknown {
                host,
                key_type,
                fingerprint,
            } => write!(
                f,
                "host key for {host} is not in known_hosts ({key_type} {fingerprint})"
            ),
            HostKeyError::Changed {
                host,
                key_type,
                fingerprint,
            } => write!(
                f,
                "host key for {host} has CHANGED: the server presented {key_type} {fingerprint}, \
                 which differs from the key in known_hosts"
            ),
            HostKeyError::File { path, reason } => write!(f, "known_hosts file {path}: {reason}"),
        }
    }
}

impl fmt::Display for KernelSupportError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            KernelSupportError::Unavailable { reason, source } => {
                write!(f, "io_uring unavailable: {reason} ({source})")
            }
            KernelSupportError::MissingOpcode { opcode, since } => write!(
                f,
                "io_uring lacks {opcode}, which needs Linux {since} or newer"
            ),
        }
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Error::Io(e) => Some(e),
            Error::Kernel(KernelSupportError::Unavailable { source, .. }) => Some(source),
            _ => None,
        }
    }
}

impl std::error::Error for HostKeyError {}
impl std::error::Error for RuntimeError {}
impl std::error::Error for InvalidInput {}
impl std::error::Error for KernelSupportError {}

impl Error {
    /// The closest [`io::ErrorKind`].
    pub fn kind(&self) -> io::ErrorKind {
        use io::ErrorKind as K;
        match self {
            Error::Io(e) => e.kind(),
            Error::Timeout { .. } => K::TimedOut,
            Error::HostKey(_) => K::PermissionDenied,
            Error::Kernel(_) => K::Unsupported,
            Error::Runtime(RuntimeError::PoolClosed) => K::NotConnected,
            Error::Runtime(_) => K::Unsupported,
            Error::InvalidInput(_) => K::InvalidInput,
            Error::Closed(_) => K::NotConnected,
            Error::Poisoned(_) => K::Other,
            Error::UnsafeName { .. } => K::InvalidData,
            Error::OutsideDestination { .. } => K::PermissionDenied,
            Error::LimitExceeded { .. } => K::InvalidData,
            Error::Protocol { .. } => K::InvalidData,
            Error::NoCommonAlgorithm { .. } => K::Unsupported,
            Error::Disconnected { .. } => K::ConnectionAborted,
            Error::KeyEncrypted { .. } => K::InvalidInput,
            Error::Sftp { code, .. } => {
                use sftp_status as st;
                match *code {
                    st::EOF => K::UnexpectedEof,
                    st::NO_SUCH_FILE => K::NotFound,
                    st::PERMISSION_DENIED => K::PermissionDenied,
                    st::BAD_MESSAGE => K::InvalidData,
                    st::NO_CONNECTION | st::CONNECTION_LOST => K::ConnectionAborted,
                    st::OP_UNSUPPORTED => K::Unsupported,
                    _ => K::Other,
                }
            }
            Error::Ssh { code, .. } => match *code {
                libssh2_sys::LIBSSH2_ERROR_AUTHENTICATION_FAILED
                | libssh2_sys::LIBSSH2_ERROR_PUBLICKEY_UNVERIFIED
                | libssh2_sys::LIBSSH2_ERROR_PASSWORD_EXPIRED
                | libssh2_sys::LIBSSH2_ERROR_KEYFILE_AUTH_FAILED => K::PermissionDenied,
                // A key file that exists (we check first) but cannot be
                // used: wrong passphrase or unsupported format.
                libssh2_sys::LIBSSH2_ERROR_FILE => K::InvalidData,
                libssh2_sys::LIBSSH2_ERROR_TIMEOUT | libssh2_sys::LIBSSH2_ERROR_SOCKET_TIMEOUT => {
                    K::TimedOut
                }
                libssh2_sys::LIBSSH2_ERROR_SOCKET_DISCONNECT => K::ConnectionAborted,
                libssh2_sys::LIBSSH2_ERROR_CHANNEL_CLOSED
                | libssh2_sys::LIBSSH2_ERROR_CHANNEL_EOF_SENT => K::BrokenPipe,
                libssh2_sys::LIBSSH2_ERROR_INVAL | libssh2_sys::LIBSSH2_ERROR_BAD_USE => {
                    K::InvalidInput
                }
                libssh2_sys::LIBSSH2_ERROR_ALLOC => K::OutOfMemory,
                libssh2_sys::LIBSSH2_ERROR_PROTO
                | libssh2_sys::LIBSSH2_ERROR_INVALID_MAC
                | libssh2_sys::LIBSSH2_ERROR_DECRYPT => K::InvalidData,
                _ => K::Other,
            },
        }
    }

    /// The libssh2 error code, if this error came from libssh2.
    pub fn ssh_code(&self) -> Option<i32> {
        match self {
            Error::Ssh { code, .. } => Some(*code),
            _ => None,
        }
    }

    /// Whether the server rejected the credentials offered.
    pub fn is_auth_failure(&self) -> bool {
        matches!(
            self.ssh_code(),
            Some(
                libssh2_sys::LIBSSH2_ERROR_AUTHENTICATION_FAILED
                    | libssh2_sys::LIBSSH2_ERROR_PUBLICKEY_UNVERIFIED
                    | libssh2_sys::LIBSSH2_ERROR_KEYFILE_AUTH_FAILED
                    | libssh2_sys::LIBSSH2_ERROR_METHOD_NONE
            )
        )
    }
}

/// RFC 4253 §11.1's name for a disconnect reason code.
fn disconnect_reason(code: u32) -> &'static str {
    match code {
        1 => "host not allowed to connect",
        2 => "protocol error",
        3 => "key exchange failed",
        5 => "MAC error",
        6 => "compression error",
        7 => "service not available",
        8 => "protocol version not supported",
        9 => "host key not verifiable",
        10 => "connection lost",
        11 => "by application",
        12 => "too many connections",
        13 => "auth cancelled by user",
        14 => "no more auth methods available",
        15 => "illegal user name",
        _ => "unknown reason",
    }
}

impl Error {
    /// An SFTP protocol error.
    pub(crate) fn sftp_protocol(message: impl Into<String>) -> Error {
        Error::Protocol {
            protocol: RemoteProtocol::Sftp,
            message: message.into(),
        }
    }

    /// An scp protocol error.
    pub(crate) fn scp_protocol(message: impl Into<String>) -> Error {
        Error::Protocol {
            protocol: RemoteProtocol::Scp,
            message: message.into(),
        }
    }
}

impl InvalidInput {
    /// `what` holds a NUL byte.
    pub(crate) fn nul(what: impl Into<String>) -> InvalidInput {
        InvalidInput::ForbiddenByte {
            what: what.into(),
            byte: 0,
        }
    }
}

impl From<InvalidInput> for Error {
    fn from(e: InvalidInput) -> Self {
        Error::InvalidInput(e)
    }
}

impl From<RuntimeError> for Error {
    fn from(e: RuntimeError) -> Self {
        Error::Runtime(e)
    }
}

impl From<io::Error> for Error {
    fn from(e: io::Error) -> Self {
        Error::Io(e)
    }
}

/// Kernel-support failures are errors of their own kind.
impl From<KernelSupportError> for Error {
    fn from(e: KernelSupportError) -> Self {
        Error::Kernel(e)
    }
}

impl From<Error> for io::Error {
    fn from(e: Error) -> Self {
        match e {
            Error::Io(e) => e,
            other => io::Error::new(other.kind(), other),
        }
    }
}

// Kept beside the error they fill, so that the SFTP layer takes them from
// here and not the reverse; public as `uring_ssh::sftp::status`.
/// SFTP status codes (`SSH_FX_*`) and their names.
pub mod sftp_status {
    /// Success.
    pub const OK: u32 = 0;
    /// End of file, or no more directory entries.
    pub const EOF: u32 = 1;
    /// The path does not exist.
    pub const NO_SUCH_FILE: u32 = 2;
    /// The server refused the operation.
    pub const PERMISSION_DENIED: u32 = 3;
    /// A generic failure (OpenSSH: directory not empty, file exists, …).
    pub const FAILURE: u32 = 4;
    /// The server could not parse the request.
    pub const BAD_MESSAGE: u32 = 5;
    /// No connection (client-side code).
    pub const NO_CONNECTION: u32 = 6;
    /// The connection was lost (client-side code).
    pub const CONNECTION_LOST: u32 = 7;
    /// The server does not support the operation.
    pub const OP_UNSUPPORTED: u32 = 8;

    /// The name of an SFTP status code.
    pub fn name(code: u32) -> &'static str {
        match code {
            OK => "OK",
            EOF => "EOF",
            NO_SUCH_FILE => "no such file",
            PERMISSION_DENIED => "permission denied",
            FAILURE => "failure",
            BAD_MESSAGE => "bad message",
            NO_CONNECTION => "no connection",
            CONNECTION_LOST => "connection lost",
            OP_UNSUPPORTED => "operation unsupported",
            _ => "unknown status",
        }
    }
}

/// Shorthand for results of this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;
