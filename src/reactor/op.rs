//! Operations: what each SQE owns until its completion, and the future that
//! waits for one.

use std::ffi::CString;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::os::fd::RawFd;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll};

#[cfg(test)]
use io_uring::{opcode, types};

use super::{OpId, Reactor};

/// Everything the kernel may touch while an op is in flight.
///
/// Owned by the op's slot in the reactor and dropped only after the op's own
/// CQE (or leaked if the ring goes away first).
#[derive(Default)]
pub(crate) struct Resources {
    /// Data buffer (send source or recv destination).
    pub buf: Vec<u8>,
    /// Start of the part of `buf` a send still has to move.
    pub offset: usize,
    /// The file the op works on, kept open until the op completes.
    pub fd: Option<Rc<SharedFd>>,
    /// Timespec of a timeout op (only held, for the kernel to read).
    #[allow(dead_code)]
    pub timespec: Option<Box<io_uring::types::Timespec>>,
    /// Socket address of a connect op (only held, for the kernel to read).
    #[allow(dead_code)]
    pub addr: Option<Box<(libc::sockaddr_storage, libc::socklen_t)>>,
    /// The local file or directory a file op names by number, held open
    /// until the op completes so that the number cannot be reused for
    /// another file meanwhile.
    pub file: Option<super::files::HeldFd>,
    /// The name a file op opens or renames (its first name).
    pub path: Option<CString>,
    /// The second name of a rename.
    pub path2: Option<CString>,
    /// What to do with the result when nobody takes it (the owner gave up
    /// before the completion): close the fd an open returned, remove what
    /// it created.
    pub unclaimed: Option<Unclaimed>,
}

/// What to do with an op's result (a count, an fd, or a negated errno)
/// that nobody took.
pub(crate) type Unclaimed = Box<dyn FnOnce(i32)>;

/// The result of one op, and the resources it gives back.
pub(crate) struct Completion {
    raw: i32,
    /// The op's resources, returned to the caller.
    pub resources: Resources,
}

impl Completion {
    pub(super) fn new(raw: i32, resources: Resources) -> Self {
        Completion { raw, resources }
    }

    /// The CQE's `res`: a count, or a negated errno.
    pub fn raw(&self) -> i32 {
        self.raw
    }

    /// `res` as an io result.
    pub fn result(&self) -> io::Result<u32> {
        if self.raw < 0 {
            Err(io::Error::from_raw_os_error(-self.raw))
        } else {
            Ok(self.raw as u32)
        }
    }
}

/// A future for one op's completion. Dropping it before the completion
/// cancels the op; the reactor keeps its resources until the CQE arrives.
pub(crate) struct Op {
    reactor: Rc<Reactor>,
    id: OpId,
    finished: bool,
}

impl Op {
    pub(super) fn new(reactor: Rc<Reactor>, id: OpId) -> Self {
        Op {
            reactor,
            id,
            finished: false,
        }
    }
}

impl Future for Op {
    type Output = Completion;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Completion> {
        assert!(!self.finished, "reactor op polled after completion");
        let done = self.reactor.poll_op(self.id, cx);
        if done.is_ready() {
            self.finished = true;
        }
        done
    }
}

impl Drop for Op {
    fn drop(&mut self) {
        if !self.finished {
            self.reactor.abandon(self.id);
        }
    }
}

/// A file descriptor shared by the ops that use it; closed when the last
/// holder (often an op whose completion just arrived) lets go.
pub(crate) struct SharedFd {
    fd: RawFd,
}

impl SharedFd {
    /// Takes ownership of `fd`.
    pub fn new(fd: RawFd) -> Rc<SharedFd> {
        Rc::new(SharedFd { fd })
    }

    /// The raw number, valid while this value lives.
    pub fn raw(&self) -> RawFd {
        self.fd
    }
}

impl Drop for SharedFd {
    fn drop(&mut self) {
        // Close through the reactor (batched with everything else on the
        // ring) when this thread has one; a plain close(2) during thread
        // teardown.
        let fd = self.fd;
        if Reactor::with_existing(|r| r.close_fd(fd)).is_none() {
            // SAFETY: `fd` is owned by this value and closed exactly once, here.
            unsafe { libc::close(fd) };
        }
    }
}

/// Builders of raw SQEs for the reactor's own ring tests.
#[cfg(test)]
impl Reactor {
    /// `recv(2)` into `buf[..]` (its full length).
    pub(crate) fn recv_sqe(fd: &SharedFd, buf: &mut [u8]) -> io_uring::squeue::Entry {
        opcode::Recv::new(types::Fd(fd.raw()), buf.as_mut_ptr(), buf.len() as u32).build()
    }

    /// `send(2)` of `buf[offset..]` with MSG_NOSIGNAL.
    pub(crate) fn send_sqe(fd: &SharedFd, buf: &[u8], offset: usize) -> io_uring::squeue::Entry {
        let rest = &buf[offset..];
        opcode::Send::new(types::Fd(fd.raw()), rest.as_ptr(), rest.len() as u32)
            .flags(libc::MSG_NOSIGNAL)
            .build()
    }
}

/// The socket ops the transport and the session use.
impl Reactor {
    /// `send(2)` of all of `buf[offset..]`; `callback` gets the count sent.
    pub(crate) fn send(
        &self,
        fd: Rc<SharedFd>,
        buf: Vec<u8>,
        offset: usize,
        callback: super::Callback,
    ) -> OpId {
        let resources = Resources {
            buf,
            offset,
            fd: Some(fd),
            ..Resources::default()
        };
        self.start_with_callback(super::OpKind::Send, resources, callback)
    }

    /// `recv(2)` into `buf[..len]`; `callback` gets the count received.
    pub(crate) fn recv(
        &self,
        fd: Rc<SharedFd>,
        buf: Vec<u8>,
        len: usize,
        callback: super::Callback,
    ) -> OpId {
        self.recv_as(super::OpKind::Recv(len), fd, buf, len, callback)
    }

    /// `recv(2)` into `buf[..len]` of what the socket holds now: the
    /// callback gets `-EAGAIN` at once if it holds nothing.
    pub(crate) fn recv_now(
        &self,
        fd: Rc<SharedFd>,
        buf: Vec<u8>,
        len: usize,
        callback: super::Callback,
    ) -> OpId {
        self.recv_as(super::OpKind::RecvNow(len), fd, buf, len, callback)
    }

    /// A receive of `kind` into `buf[..len]`, reported to `callback`.
    fn recv_as(
        &self,
        kind: super::OpKind,
        fd: Rc<SharedFd>,
        buf: Vec<u8>,
        len: usize,
        callback: super::Callback,
    ) -> OpId {
        assert!(len <= buf.len(), "recv of {len} bytes into {}", buf.len());
        let resources = Resources {
            buf,
            fd: Some(fd),
            ..Resources::default()
        };
        self.start_with_callback(kind, resources, callback)
    }

    /// `recv(2)` into `buf[..len]`, awaited.
    pub(crate) fn recv_awaited(self: &Rc<Self>, fd: &Rc<SharedFd>, buf: Vec<u8>, len: usize) -> Op {
        assert!(len <= buf.len(), "recv of {len} bytes into {}", buf.len());
        let resources = Resources {
            buf,
            fd: Some(fd.clone()),
            ..Resources::default()
        };
        self.start_op(super::OpKind::Recv(len), resources)
    }

    /// `send(2)` of all of `buf[offset..]`, awaited.
    pub(crate) fn send_awaited(
        self: &Rc<Self>,
        fd: &Rc<SharedFd>,
        buf: Vec<u8>,
        offset: usize,
    ) -> Op {
        let resources = Resources {
            buf,
            offset,
            fd: Some(fd.clone()),
            ..Resources::default()
        };
        self.start_op(super::OpKind::Send, resources)
    }

    /// Like [`Self::recv`], waiting (at most `wait`) for all `len` bytes:
    /// the callback gets what arrived by then, or `-ECANCELED` if nothing
    /// did. On the poll engine, a plain [`Self::recv`].
    pub(crate) fn recv_batched(
        &self,
        fd: Rc<SharedFd>,
        buf: Vec<u8>,
        len: usize,
        wait: std::time::Duration,
        callback: super::Callback,
    ) -> OpId {
        if self.features().backend != super::Backend::IoUring {
            return self.recv(fd, buf, len, callback);
        }
        assert!(len <= buf.len(), "recv of {len} bytes into {}", buf.len());
        let resources = Resources {
            buf,
            fd: Some(fd),
            ..Resources::default()
        };
        self.bump(|s| s.batched_recvs += 1);
        self.start_callback_with_timeout(super::OpKind::RecvAll(len), resources, callback, wait)
    }

    /// `shutdown(2)` with SHUT_RDWR, detached: nobody waits for it.
    pub(crate) fn shutdown_detached(&self, fd: &Rc<SharedFd>) {
        let resources = Resources {
            fd: Some(fd.clone()),
            ..Resources::default()
        };
        self.start_detached(super::OpKind::Shutdown(libc::SHUT_RDWR), resources);
    }

    /// `shutdown(2)` with `how`, awaited.
    pub(crate) fn shutdown(self: &Rc<Self>, fd: &Rc<SharedFd>, how: i32) -> Op {
        let resources = Resources {
            fd: Some(fd.clone()),
            ..Resources::default()
        };
        self.start_op(super::OpKind::Shutdown(how), resources)
    }

    /// `connect(2)` to `addr`, cancelled after `timeout` (the result is
    /// then `-ECANCELED`).
    pub(crate) fn connect(
        self: &Rc<Self>,
        fd: &Rc<SharedFd>,
        addr: SocketAddr,
        timeout: std::time::Duration,
    ) -> Op {
        let resources = Resources {
            fd: Some(fd.clone()),
            addr: Some(Box::new(sockaddr_from(addr))),
            ..Resources::default()
        };
        self.start_op_with_timeout(super::OpKind::Connect, resources, timeout)
    }
}

/// A `sockaddr_storage` holding `addr`, and its length.
fn sockaddr_from(addr: SocketAddr) -> (libc::sockaddr_storage, libc::socklen_t) {
    // SAFETY: sockaddr_storage is plain old data; all-zero is a valid value.
    let mut storage: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let len = match addr {
        SocketAddr::V4(a) => {
            let sin = libc::sockaddr_in {
                sin_family: libc::AF_INET as libc::sa_family_t,
                sin_port: a.port().to_be(),
                sin_addr: libc::in_addr {
                    s_addr: u32::from_ne_bytes(a.ip().octets()),
                },
                sin_zero: [0; 8],
            };
            // SAFETY: sockaddr_storage is larger than and aligned for sockaddr_in.
            unsafe { std::ptr::write(&mut storage as *mut _ as *mut libc::sockaddr_in, sin) };
            std::mem::size_of::<libc::sockaddr_in>()
        }
        SocketAddr::V6(a) => {
            let sin6 = libc::sockaddr_in6 {
                sin6_family: libc::AF_INET6 as libc::sa_family_t,
                sin6_port: a.port().to_be(),
                sin6_flowinfo: a.flowinfo(),
                sin6_addr: libc::in6_addr {
                    s6_addr: a.ip().octets(),
                },
                sin6_scope_id: a.scope_id(),
            };
            // SAFETY: sockaddr_storage is larger than and aligned for sockaddr_in6.
            unsafe { std::ptr::write(&mut storage as *mut _ as *mut libc::sockaddr_in6, sin6) };
            std::mem::size_of::<libc::sockaddr_in6>()
        }
    };
    (storage, len as libc::socklen_t)
}
