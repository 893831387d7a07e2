//! The io_uring engine: one ring, a backlog for SQEs that did not fit, and
//! the enter/reap cycle the driver task runs.

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::io;
use std::os::fd::{AsRawFd, RawFd};

use io_uring::{IoUring, opcode, squeue, types};

use super::{Kind, OpId, Resources, Stats};
use crate::error::Error;

/// Submission queue slots per ring. Completions get four times as many.
const RING_ENTRIES: u32 = 1024;

/// A ring and the SQEs waiting for room in it.
pub(super) struct Ring {
    pub(super) ring: RefCell<IoUring>,
    /// SQE groups (a linked pair stays together) waiting for queue space.
    backlog: RefCell<VecDeque<Vec<squeue::Entry>>>,
    /// SQEs pushed into the queue since the last `io_uring_enter`.
    unsubmitted: Cell<u32>,
}

impl Ring {
    pub(super) fn new() -> Result<(Ring, super::Features), Error> {
        let (ring, features) = super::probe::setup(RING_ENTRIES)?;
        Ok((
            Ring {
                ring: RefCell::new(ring),
                backlog: RefCell::new(VecDeque::new()),
                unsubmitted: Cell::new(0),
            },
            features,
        ))
    }

    /// The ring's fd, which turns readable when completions arrive.
    pub(super) fn raw_fd(&self) -> RawFd {
        self.ring.borrow().as_raw_fd()
    }

    /// The SQE that performs `kind` on `resources`; pointers in it point
    /// into `resources`, which the reactor keeps until the op's CQE.
    pub(super) fn sqe(kind: Kind, resources: &mut Resources) -> squeue::Entry {
        let fd = || types::Fd(resources.fd.as_ref().map_or(-1, |f| f.raw()));
        match kind {
            Kind::Nop => opcode::Nop::new().build(),
            Kind::Send => {
                let rest = &resources.buf[resources.offset..];
                opcode::Send::new(fd(), rest.as_ptr(), rest.len() as u32)
                    .flags(libc::MSG_NOSIGNAL)
                    .build()
            }
            Kind::Recv(len) => {
                let fd = fd();
                let buf = &mut resources.buf[..len];
                opcode::Recv::new(fd, buf.as_mut_ptr(), len as u32).build()
            }
            Kind::Connect => {
                let fd = fd();
                let addr = resources.addr.as_mut().expect("connect without an address");
                opcode::Connect::new(
                    fd,
                    &mut addr.0 as *mut libc::sockaddr_storage as *const libc::sockaddr,
                    addr.1,
                )
                .build()
            }
            Kind::Shutdown => opcode::Shutdown::new(fd(), libc::SHUT_RDWR).build(),
            Kind::Close(raw) => opcode::Close::new(types::Fd(raw)).build(),
            Kind::Timeout(after) => {
                let ts = resources
                    .timespec
                    .insert(Box::new(types::Timespec::from(after)));
                opcode::Timeout::new(&**ts as *const types::Timespec).build()
            }
        }
    }

    /// Queues SQE groups (already tagged with their `user_data`), keeping
    /// submission order: once something waits in the backlog, everything
    /// after it waits too.
    pub(super) fn push(&self, sqes: Vec<squeue::Entry>) {
        let mut backlog = self.backlog.borrow_mut();
        if !backlog.is_empty() || !self.try_push_group(&sqes) {
            backlog.push_back(sqes);
        }
    }

    /// Pushes a group into the submission queue if it fits whole.
    fn try_push_group(&self, sqes: &[squeue::Entry]) -> bool {
        let mut ring = self.ring.borrow_mut();
        let mut sq = ring.submission();
        if sq.capacity() - sq.len() < sqes.len() {
            return false;
        }
        // SAFETY: every pointer in these SQEs (buffers, timespecs, socket
        // addresses) is owned by the op's `Resources` in the reactor's
        // slots, which are dropped only after the op's own CQE is reaped (or
        // leaked if the ring is torn down first). The reactor keeps this.
        unsafe { sq.push_multiple(sqes) }.is_ok() && {
            self.unsubmitted
                .set(self.unsubmitted.get() + sqes.len() as u32);
            true
        }
    }

    /// Moves backlogged SQEs into the queue and enters the kernel once for
    /// everything queued (more often only if the queue fills up).
    pub(super) fn flush(&self, stats: &Cell<Stats>) -> io::Result<()> {
        let bump = |f: &dyn Fn(&mut Stats)| {
            let mut s = stats.get();
            f(&mut s);
            stats.set(s);
        };
        loop {
            loop {
                let Some(group) = self.backlog.borrow_mut().pop_front() else {
                    break;
                };
                if !self.try_push_group(&group) {
                    self.backlog.borrow_mut().push_front(group);
                    break;
                }
            }
            let pending = self.unsubmitted.get();
            // Completions that overflowed the CQ ring stay in the kernel
            // until an enter with GETEVENTS (io-uring's submit adds it).
            if pending == 0 && !self.ring.borrow_mut().submission().cq_overflow() {
                return Ok(());
            }
            match self.ring.borrow().submit() {
                Ok(n) => {
                    self.unsubmitted.set(pending - n as u32);
                    bump(&|s| {
                        s.enter_calls += 1;
                        s.syscalls += 1;
                        s.sqes_submitted += n as u64;
                    });
                }
                Err(e) => {
                    bump(&|s| {
                        s.enter_calls += 1;
                        s.syscalls += 1;
                    });
                    match e.raw_os_error() {
                        Some(libc::EINTR) => continue,
                        // The completion queue is full: reap, then try again.
                        Some(libc::EBUSY) | Some(libc::EAGAIN) => return Ok(()),
                        _ => return Err(e),
                    }
                }
            }
            if self.backlog.borrow().is_empty() {
                return Ok(());
            }
        }
    }

    /// Takes every available CQE as (user_data, result).
    pub(super) fn reap(&self, out: &mut Vec<(OpId, i32)>) {
        let mut ring = self.ring.borrow_mut();
        out.extend(
            ring.completion()
                .map(|cqe| (OpId(cqe.user_data()), cqe.result())),
        );
    }

    /// Queues a cancel of the op with `user_data` `id` (its own CQE says -ECANCELED).
    pub(super) fn cancel_sqe(id: OpId) -> squeue::Entry {
        opcode::AsyncCancel::new(id.0).build()
    }

    /// A cancel of every request on `fd` (5.19+).
    pub(super) fn cancel_fd_sqe(fd: RawFd) -> squeue::Entry {
        opcode::AsyncCancel2::new(types::CancelBuilder::fd(types::Fd(fd)).all()).build()
    }

    /// A timeout linked to the SQE before it.
    pub(super) fn link_timeout_sqe(
        resources: &mut Resources,
        after: std::time::Duration,
    ) -> squeue::Entry {
        let ts = resources
            .timespec
            .insert(Box::new(types::Timespec::from(after)));
        opcode::LinkTimeout::new(&**ts as *const types::Timespec).build()
    }
}
