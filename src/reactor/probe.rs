//! Checks, once per ring, that the kernel offers what the reactor submits.

use io_uring::{IoUring, Probe, opcode};

use crate::error::{Error, KernelSupportError};

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

/// What runs a thread's reactor, and what it supports beyond the required
/// operations.
#[derive(Debug, Clone, Copy, Default)]
pub struct Features {
    /// The engine performing the thread's socket IO.
    pub backend: super::Backend,
    /// One request cancels every op on a socket: `IORING_ASYNC_CANCEL_FD`
    /// (5.19) on the ring; always on the poll engine.
    pub cancel_by_fd: bool,
}

/// Creates a ring of `entries` submission slots and checks every required opcode.
pub(crate) fn setup(entries: u32) -> Result<(IoUring, Features), Error> {
    let ring = IoUring::builder()
        .setup_cqsize(entries * 4)
        .build(entries)
        .map_err(|e| {
            let why = match e.raw_os_error() {
                Some(libc::ENOSYS) => "io_uring_setup is not available (ENOSYS: kernel too old or built without it, or a seccomp filter)",
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
        })?;
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
    let features = Features {
        backend: super::Backend::IoUring,
        cancel_by_fd: probe.is_supported(opcode::Socket::CODE),
    };
    Ok((ring, features))
}
