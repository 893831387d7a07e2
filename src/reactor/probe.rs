//! Checks, once per ring, that the kernel offers what the reactor submits.

use io_uring::{IoUring, Probe, opcode};

use crate::error::{Error, InvalidInput, KernelSupportError};

/// The opcodes the reactor submits, with the kernel release that added each.
pub(crate) const REQUIRED: &[(u8, &str, &str)] = &[
    (opcode::Nop::CODE, "IORING_OP_NOP", "5.1"),
    (opcode::Send::CODE, "IORING_OP_SEND", "5.6"),
    (opcode::Recv::CODE, "IORING_OP_RECV", "5.6"),
    (opcode::Connect::CODE, "IORING_OP_CONNECT", "5.5"),
    (opcode::AsyncCancel::CODE, "IORING_OP_ASYNC_CANCEL", "5.5"),
    (opcode::LinkTimeout::CODE, "IORING_OP_LINK_TIMEOUT", "5.5"),
    (opcode::Timeout::CODE, "IORING_OP_TIMEOUT", "5.4"),
    (opcode::Close::CODE, "IORING_OP_CLOSE", "5.6"),
    (opcode::Shutdown::CODE, "IORING_OP_SHUTDOWN", "5.11"),
];

/// The environment variable that picks how the ring runs completion work:
/// `cooperative`, `signal` or `auto` (the default: cooperative where the
/// kernel accepts it). For measurements and for testing the fallback.
pub const TASK_WORK_ENV: &str = "URING_SSH_TASK_WORK";

/// How the kernel runs the work that turns a ready socket into a
/// completion (the copy of a receive, the posting of its CQE).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub enum TaskWork {
    /// `IORING_SETUP_COOP_TASKRUN | TASKRUN_FLAG` (5.19): the work runs at
    /// the thread's next system call, without an interrupt (no IPI while
    /// the thread computes on another core than the sender).
    Cooperative,
    /// The default ring (5.1): the work interrupts the thread (an IPI when
    /// it runs on another core, `EINTR` from its `epoll_wait`). Also what
    /// the poll engine reports, where the question does not arise.
    #[default]
    Signal,
}

impl std::fmt::Display for TaskWork {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            TaskWork::Cooperative => "cooperative",
            TaskWork::Signal => "signal",
        })
    }
}

/// Every mode, best first.
const ALL_MODES: &[TaskWork] = &[TaskWork::Cooperative, TaskWork::Signal];

impl TaskWork {
    /// Modes to try, best first, as chosen by [`TASK_WORK_ENV`].
    fn wanted() -> Result<&'static [TaskWork], Error> {
        match std::env::var(TASK_WORK_ENV) {
            Err(std::env::VarError::NotPresent) => Ok(ALL_MODES),
            Ok(v) => Self::parse(&v),
            Err(std::env::VarError::NotUnicode(v)) => Err(Self::invalid(&v.to_string_lossy())),
        }
    }

    /// The modes a value of [`TASK_WORK_ENV`] asks for, best first.
    pub(crate) fn parse(value: &str) -> Result<&'static [TaskWork], Error> {
        Ok(match value.trim() {
            "" | "auto" => ALL_MODES,
            "cooperative" | "coop" => &ALL_MODES[..1],
            "signal" => &ALL_MODES[1..],
            other => return Err(Self::invalid(other)),
        })
    }

    fn invalid(value: &str) -> Error {
        InvalidInput::Environment {
            variable: TASK_WORK_ENV,
            value: value.to_string(),
            expected: "cooperative, signal or auto",
        }
        .into()
    }
}

/// What runs a thread's reactor, and what it supports beyond the required
/// operations.
#[derive(Debug, Clone, Copy, Default)]
pub struct Features {
    /// The engine performing the thread's socket IO.
    pub backend: super::Backend,
    /// One request cancels every op on a socket: `IORING_ASYNC_CANCEL_FD`
    /// (5.19) on the ring; always on the poll engine.
    pub cancel_by_fd: bool,
    /// How the ring runs completion work ([`TaskWork::Signal`] on the poll
    /// engine).
    pub task_work: TaskWork,
    /// `io_uring_enter` names the ring by a registered index instead of
    /// its fd (`IORING_REGISTER_RING_FDS`, 5.18): no fd lookup per call.
    pub registered_ring: bool,
    /// Which local file calls of downloads go through the ring (see
    /// [`LocalFiles`]); [`LocalFiles::Blocking`] on the poll engine and on
    /// kernels without the file opcodes.
    pub local_files: LocalFiles,
    /// The ring's kernel has the file opcodes (`IORING_OP_OPENAT`,
    /// `WRITE`, `FSYNC`, `RENAMEAT`: 5.11), so any [`LocalFiles`] mode can
    /// be set ([`super::set_local_files`]).
    pub file_opcodes: bool,
}

/// Which local file calls go through the ring instead of blocking the
/// thread that drives every session.
///
/// Measured on ext4 (`BENCHMARKS.md`, "Local files"): an `fsync` waits on
/// the device and pays on the ring; creating, writing and renaming files
/// in the page cache costs less as a blocking call than as a hand-off to
/// the kernel's io-wq workers, which is where the ring runs them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub enum LocalFiles {
    /// Every call blocks the thread (the poll engine, older kernels).
    #[default]
    Blocking,
    /// `fsync` on the ring, the rest blocking: the default on a ring.
    Sync,
    /// Creates, writes, `fsync`s and renames on the ring: for
    /// destinations where those wait on a network or a slow device.
    All,
}

/// The environment variable that picks [`LocalFiles`] for ring threads:
/// `sync` (or `auto`, the default), `all` or `blocking`.
pub const LOCAL_FILES_ENV: &str = "URING_SSH_LOCAL_FILES";

impl LocalFiles {
    /// The mode a value of [`LOCAL_FILES_ENV`] asks for.
    pub(crate) fn parse(value: &str) -> Result<LocalFiles, Error> {
        Ok(match value.trim() {
            "" | "auto" | "sync" => LocalFiles::Sync,
            "all" | "ring" => LocalFiles::All,
            "blocking" => LocalFiles::Blocking,
            other => {
                return Err(InvalidInput::Environment {
                    variable: LOCAL_FILES_ENV,
                    value: other.to_string(),
                    expected: "sync, all, blocking or auto",
                }
                .into());
            }
        })
    }

    fn wanted() -> Result<LocalFiles, Error> {
        match std::env::var(LOCAL_FILES_ENV) {
            Err(std::env::VarError::NotPresent) => Ok(LocalFiles::Sync),
            Ok(v) => Self::parse(&v),
            Err(std::env::VarError::NotUnicode(v)) => Self::parse(&v.to_string_lossy()),
        }
    }
}

/// The file opcodes, all needed for [`LocalFiles::Sync`] or [`LocalFiles::All`].
const FILE_OPCODES: &[u8] = &[
    opcode::OpenAt::CODE,
    opcode::Write::CODE,
    opcode::Fsync::CODE,
    opcode::RenameAt::CODE,
];

/// Creates a ring of `entries` submission slots, in the best task-work mode
/// the kernel accepts (or the one [`TASK_WORK_ENV`] asks for), and checks
/// every required opcode.
pub(crate) fn setup(entries: u32) -> Result<(IoUring, Features), Error> {
    setup_with(entries, TaskWork::wanted()?)
}

/// Like [`setup`], trying `modes` in order.
pub(crate) fn setup_with(entries: u32, modes: &[TaskWork]) -> Result<(IoUring, Features), Error> {
    let mut last = None;
    for &mode in modes {
        let mut b = IoUring::builder();
        b.setup_cqsize(entries * 4);
        match mode {
            TaskWork::Cooperative => {
                b.setup_coop_taskrun().setup_taskrun_flag();
            }
            TaskWork::Signal => {}
        }
        match b.build(entries) {
            Ok(ring) => return check(ring, mode),
            // An older kernel refuses flags it does not know with EINVAL:
            // try the next mode. Anything else is the same for every mode.
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) && mode != TaskWork::Signal => {
                last = Some(e)
            }
            Err(e) => return Err(unavailable(e)),
        }
    }
    Err(unavailable(last.unwrap_or_else(|| {
        std::io::Error::from_raw_os_error(libc::EINVAL)
    })))
}

fn unavailable(e: std::io::Error) -> Error {
    let why = match e.raw_os_error() {
        Some(libc::ENOSYS) => {
            "io_uring_setup is not available (ENOSYS: kernel too old or built without it, \
             or a seccomp filter)"
        }
        Some(libc::EPERM) => {
            "io_uring is forbidden here (EPERM: kernel.io_uring_disabled, or a seccomp \
             profile such as Docker's default)"
        }
        Some(libc::ENOMEM) => "the ring could not be allocated (ENOMEM: RLIMIT_MEMLOCK?)",
        _ => "io_uring_setup failed",
    };
    Error::Kernel(KernelSupportError::Unavailable {
        reason: why.to_owned(),
        source: e,
    })
}

fn check(ring: IoUring, task_work: TaskWork) -> Result<(IoUring, Features), Error> {
    let mut probe = Probe::new();
    ring.submitter().register_probe(&mut probe).map_err(|e| {
        Error::Kernel(KernelSupportError::Unavailable {
            reason: "IORING_REGISTER_PROBE failed (kernel older than 5.6?)".to_owned(),
            source: e,
        })
    })?;
    for &(code, name, since) in REQUIRED {
        if !probe.is_supported(code) {
            return Err(Error::Kernel(KernelSupportError::MissingOpcode {
                opcode: name,
                since,
            }));
        }
    }
    // The probe lists opcodes, not flags. The cancel flags (FD, ALL, ANY)
    // arrived in 5.19 together with IORING_OP_SOCKET, which serves as marker.
    let file_opcodes = FILE_OPCODES.iter().all(|&c| probe.is_supported(c));
    let features = Features {
        backend: super::Backend::IoUring,
        cancel_by_fd: probe.is_supported(opcode::Socket::CODE),
        task_work,
        registered_ring: false,
        local_files: if file_opcodes {
            LocalFiles::wanted()?
        } else {
            LocalFiles::Blocking
        },
        file_opcodes,
    };
    Ok((ring, features))
}
