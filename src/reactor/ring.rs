//! The io_uring engine: one ring, a backlog for SQEs that did not fit, and
//! the enter/reap cycle the driver task runs.

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::rc::Rc;
use std::time::Duration;

use io_uring::{IoUring, opcode, squeue, types};
use slab::Slab;

use super::probe::TaskWork;
use super::{Ender, Engine, Lifecycle, OpId, OpKind, Reactor, Resources, SharedFd, Slot, Stats};
use crate::error::Error;

/// Submission queue slots per ring. Completions get four times as many.
const RING_ENTRIES: u32 = 1024;

// From <linux/io_uring.h> (the io-uring crate keeps its copies private).
const IORING_ENTER_GETEVENTS: u32 = 1 << 0;
const IORING_ENTER_REGISTERED_RING: u32 = 1 << 4;
const IORING_REGISTER_RING_FDS: u32 = 20;
const IORING_UNREGISTER_RING_FDS: u32 = 21;

/// `struct io_uring_rsrc_update`.
#[repr(C)]
struct RsrcUpdate {
    offset: u32,
    resv: u32,
    data: u64,
}

/// A ring and the SQEs waiting for room in it.
pub(super) struct RingEngine {
    ring: RefCell<IoUring>,
    /// SQE groups (a linked pair stays together) waiting for queue space.
    backlog: RefCell<VecDeque<Vec<squeue::Entry>>>,
    /// SQEs pushed into the queue since the last `io_uring_enter`.
    unsubmitted: Cell<u32>,
    task_work: TaskWork,
    /// The ring's index among the thread's registered ring fds.
    registered: Option<u32>,
}

impl RingEngine {
    pub(super) fn new() -> Result<(RingEngine, super::Features), Error> {
        let (ring, features) = super::probe::setup(RING_ENTRIES)?;
        Self::from_parts(ring, features, true)
    }

    /// A ring in one of `modes` (the reactor's tests of each mode); with
    /// `register` false it is entered by its fd, as where
    /// `IORING_REGISTER_RING_FDS` fails (kernels before 5.18).
    #[cfg(test)]
    pub(super) fn with_modes(
        modes: &[TaskWork],
        register: bool,
    ) -> Result<(RingEngine, super::Features), Error> {
        let (ring, features) = super::probe::setup_with(RING_ENTRIES, modes)?;
        Self::from_parts(ring, features, register)
    }

    fn from_parts(
        ring: IoUring,
        mut features: super::Features,
        register: bool,
    ) -> Result<(RingEngine, super::Features), Error> {
        let registered = if register {
            register_ring_fd(&ring)
        } else {
            None
        };
        features.registered_ring = registered.is_some();
        Ok((
            RingEngine {
                ring: RefCell::new(ring),
                backlog: RefCell::new(VecDeque::new()),
                unsubmitted: Cell::new(0),
                task_work: features.task_work,
                registered,
            },
            features,
        ))
    }

    /// Whether an enter would find completion work the kernel holds for us:
    /// cooperative task work not yet run, or CQEs that overflowed the ring.
    fn kernel_has_work(&self) -> bool {
        let mut ring = self.ring.borrow_mut();
        let sq = ring.submission();
        sq.cq_overflow() || (self.task_work != TaskWork::Signal && sq.taskrun())
    }

    /// `io_uring_enter`: submits `to_submit` SQEs and, with `getevents`,
    /// runs the task work pending for this ring (which posts its CQEs).
    /// Waits for nothing.
    fn enter(&self, to_submit: u32, getevents: bool) -> io::Result<usize> {
        let mut flags = 0;
        if getevents {
            flags |= IORING_ENTER_GETEVENTS;
        }
        let fd = match self.registered {
            Some(index) => {
                flags |= IORING_ENTER_REGISTERED_RING;
                index as libc::c_long
            }
            None => self.ring.borrow().as_raw_fd() as libc::c_long,
        };
        // SAFETY: io_uring_enter on our ring (by fd or by the index the
        // kernel gave us) with no argument pointer. The SQEs it submits were
        // pushed by `try_push_group`, whose pointers the reactor keeps valid.
        let n = unsafe {
            libc::syscall(
                libc::SYS_io_uring_enter,
                fd,
                to_submit as libc::c_long,
                0 as libc::c_long,
                flags as libc::c_long,
                std::ptr::null::<libc::c_void>(),
                0 as libc::c_long,
            )
        };
        if n < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(n as usize)
        }
    }

    /// The SQE that performs `kind` on `resources`; pointers in it point
    /// into `resources`, which the reactor keeps until the op's CQE.
    fn sqe(kind: OpKind, resources: &mut Resources) -> squeue::Entry {
        let file = |r: &Resources| types::Fd(r.file.as_ref().map_or(-1, |f| f.as_raw_fd()));
        let fd = || types::Fd(resources.fd.as_ref().map_or(-1, |f| f.raw()));
        match kind {
            OpKind::Nop => opcode::Nop::new().build(),
            OpKind::Send => {
                let rest = &resources.buf[resources.offset..];
                opcode::Send::new(fd(), rest.as_ptr(), rest.len() as u32)
                    .flags(libc::MSG_NOSIGNAL)
                    .build()
            }
            OpKind::Recv(len) | OpKind::RecvNow(len) | OpKind::RecvAll(len) => {
                let flags = match kind {
                    OpKind::RecvNow(_) => libc::MSG_DONTWAIT,
                    OpKind::RecvAll(_) => libc::MSG_WAITALL,
                    _ => 0,
                };
                let fd = fd();
                let buf = &mut resources.buf[..len];
                opcode::Recv::new(fd, buf.as_mut_ptr(), len as u32)
                    .flags(flags)
                    .build()
            }
            OpKind::Connect => {
                let fd = fd();
                let addr = resources.addr.as_mut().expect("connect without an address");
                opcode::Connect::new(
                    fd,
                    &mut addr.0 as *mut libc::sockaddr_storage as *const libc::sockaddr,
                    addr.1,
                )
                .build()
            }
            OpKind::Shutdown(how) => opcode::Shutdown::new(fd(), how).build(),
            OpKind::Close(raw) => opcode::Close::new(types::Fd(raw)).build(),
            OpKind::Timeout(after) => {
                let ts = resources
                    .timespec
                    .insert(Box::new(types::Timespec::from(after)));
                opcode::Timeout::new(&**ts as *const types::Timespec).build()
            }
            OpKind::OpenAt { flags, mode } => {
                let path = resources.path.as_ref().expect("open without a name");
                opcode::OpenAt::new(file(resources), path.as_ptr())
                    .flags(flags | libc::O_CLOEXEC)
                    .mode(mode)
                    .build()
            }
            OpKind::Write { at } => {
                let rest = &resources.buf[resources.offset..];
                opcode::Write::new(file(resources), rest.as_ptr(), rest.len() as u32)
                    .offset(at + resources.offset as u64)
                    .build()
            }
            OpKind::RenameAt => {
                let dir = file(resources);
                let from = resources.path.as_ref().expect("rename without a name");
                let to = resources.path2.as_ref().expect("rename without a new name");
                opcode::RenameAt::new(dir, from.as_ptr(), dir, to.as_ptr()).build()
            }
            OpKind::Fsync => opcode::Fsync::new(file(resources)).build(),
        }
    }

    /// Gives each SQE of `group` a slot of `reactor` (with its resources
    /// and lifecycle) and queues them together: their ids, in order.
    pub(super) fn push_ops(
        &self,
        reactor: &Reactor,
        group: Vec<(squeue::Entry, Resources, Lifecycle)>,
    ) -> Vec<OpId> {
        let mut ids = Vec::with_capacity(group.len());
        let mut sqes = Vec::with_capacity(group.len());
        {
            let mut slots = reactor.slots.borrow_mut();
            for (sqe, resources, lifecycle) in group {
                let id = reactor.new_op(&mut slots, lifecycle, resources);
                ids.push(id);
                sqes.push(sqe.user_data(id.0));
            }
        }
        self.push(sqes);
        if reactor.driver_runtime.get().is_none() {
            // No task will submit (a drop after the runtime is gone):
            // enter the kernel now so cancels, shutdowns and closes happen.
            let _ = self.flush(&reactor.stats);
        } else {
            reactor.schedule_driver();
        }
        ids
    }

    /// Queues SQE groups (already tagged with their `user_data`), keeping
    /// submission order: once something waits in the backlog, everything
    /// after it waits too.
    fn push(&self, sqes: Vec<squeue::Entry>) {
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
    fn flush(&self, stats: &Cell<Stats>) -> io::Result<()> {
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
            // Completions that overflowed the CQ ring, and cooperative task
            // work not yet run, stay in the kernel until an enter with
            // GETEVENTS.
            let kernel_work = self.kernel_has_work();
            if pending == 0 && !kernel_work {
                return Ok(());
            }
            match self.enter(pending, kernel_work) {
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

    /// Enters with GETEVENTS whatever the flags say (teardown's reaping loop:
    /// runs cooperative task work the flags may not show yet).
    fn enter_getevents(&self, stats: &Cell<Stats>) {
        let pending = self.unsubmitted.replace(0);
        let mut s = stats.get();
        s.enter_calls += 1;
        s.syscalls += 1;
        stats.set(s);
        if let Ok(n) = self.enter(pending, true) {
            self.unsubmitted.set(pending - n as u32);
        } else {
            self.unsubmitted.set(pending);
        }
    }

    /// Takes every available CQE as (user_data, result).
    fn reap(&self, out: &mut Vec<(OpId, i32)>) {
        let mut ring = self.ring.borrow_mut();
        out.extend(
            ring.completion()
                .map(|cqe| (OpId(cqe.user_data()), cqe.result())),
        );
    }

    /// A cancel of the op with `user_data` `id` (its own CQE says -ECANCELED).
    fn cancel_sqe(id: OpId) -> squeue::Entry {
        opcode::AsyncCancel::new(id.0).build()
    }

    /// A cancel of every request on `fd` (5.19+).
    fn cancel_fd_sqe(fd: RawFd) -> squeue::Entry {
        opcode::AsyncCancel2::new(types::CancelBuilder::fd(types::Fd(fd)).all()).build()
    }

    /// A timeout linked to the SQE before it.
    fn link_timeout_sqe(resources: &mut Resources, after: Duration) -> squeue::Entry {
        let ts = resources
            .timespec
            .insert(Box::new(types::Timespec::from(after)));
        opcode::LinkTimeout::new(&**ts as *const types::Timespec).build()
    }
}

impl Engine for RingEngine {
    /// The ring's fd, which turns readable when completions arrive.
    fn raw_fd(&self) -> RawFd {
        self.ring.borrow().as_raw_fd()
    }

    fn start(
        &self,
        reactor: &Reactor,
        kind: OpKind,
        mut resources: Resources,
        lifecycle: Lifecycle,
        timeout: Option<Duration>,
    ) -> OpId {
        let sqe = Self::sqe(kind, &mut resources);
        let Some(after) = timeout else {
            return self.push_ops(reactor, vec![(sqe, resources, lifecycle)])[0];
        };
        let mut link_resources = Resources::default();
        let link = Self::link_timeout_sqe(&mut link_resources, after);
        let group = vec![
            (sqe.flags(squeue::Flags::IO_LINK), resources, lifecycle),
            (link, link_resources, Lifecycle::Detached),
        ];
        let ids = self.push_ops(reactor, group);
        // The timeout's completion names the op it was to end (known only
        // now); nothing is reaped before the driver's next tick.
        reactor.slots.borrow_mut()[ids[1].key()].lifecycle =
            Lifecycle::Ends(ids[0], Ender::LinkTimeout);
        ids[0]
    }

    fn cancel(&self, reactor: &Reactor, id: OpId) {
        // A cancel can miss an op that is between two tries (the kernel
        // found it nowhere); its completion then makes the reactor try
        // again while the op is in flight.
        let cancel = Self::cancel_sqe(id);
        let ends = Lifecycle::Ends(id, Ender::Cancel);
        self.push_ops(reactor, vec![(cancel, Resources::default(), ends)]);
    }

    fn cancel_fd(&self, reactor: &Reactor, fd: &Rc<SharedFd>) {
        let cancel = Self::cancel_fd_sqe(fd.raw());
        let resources = Resources {
            fd: Some(fd.clone()),
            ..Resources::default()
        };
        self.push_ops(reactor, vec![(cancel, resources, Lifecycle::Detached)]);
    }

    fn close(&self, reactor: &Reactor, fd: RawFd) {
        // An op like any other, batched with everything else on the ring.
        let kind = OpKind::Close(fd);
        self.start(
            reactor,
            kind,
            Resources::default(),
            Lifecycle::Detached,
            None,
        );
    }

    fn tick(&self, reactor: &Reactor, done: &mut Vec<(OpId, i32)>) {
        // An enter error other than EINTR/EBUSY means the ring is unusable:
        // its ops stay in flight and their owners time out.
        let _ = self.flush(&reactor.stats);
        let before = done.len();
        self.reap(done);
        let n = (done.len() - before) as u64;
        reactor.bump(|s| s.cqes_reaped += n);
    }

    fn note_readable(&self) {
        // The CQEs are in the ring, or held by the kernel until the next
        // tick's enter asks for them: nothing to remember.
    }

    fn submit_now(&self, reactor: &Reactor) {
        let _ = self.flush(&reactor.stats);
    }

    fn teardown(&self, slots: &mut Slab<Slot>, stats: &Cell<Stats>) -> usize {
        // Cancel what is in flight, give the kernel a short while to
        // complete it, and leak the buffers of whatever remains (the kernel
        // may still write into them after the ring is gone).
        let ids: Vec<u64> = slots
            .iter()
            .filter(|(_, s)| !matches!(s.lifecycle, Lifecycle::Completed(_)))
            .map(|(k, s)| ((s.generation as u64) << 32) | k as u64)
            .collect();
        for id in ids {
            // A cancel SQE carries no pointer; user_data 0 is no slot's.
            self.push(vec![Self::cancel_sqe(OpId(id)).user_data(0)]);
        }
        let mut done = Vec::new();
        for _ in 0..100 {
            // Then with GETEVENTS, whatever the flags say: cooperative task
            // work not yet run posts its CQEs only in an enter.
            let _ = self.flush(stats);
            self.enter_getevents(stats);
            done.clear();
            self.reap(&mut done);
            for &(id, result) in &done {
                if id.0 != 0
                    && slots
                        .get(id.key())
                        .is_some_and(|s| s.generation == id.generation())
                {
                    // Nobody takes results now: an open's fd is closed
                    // and what it created removed.
                    let mut slot = slots.remove(id.key());
                    if let Some(f) = slot.resources.unclaimed.take() {
                        f(result);
                    }
                }
            }
            if slots
                .iter()
                .all(|(_, s)| matches!(s.lifecycle, Lifecycle::Completed(_)))
            {
                break;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        slots
            .drain()
            .filter_map(|mut s| match s.lifecycle {
                Lifecycle::Completed(result) => {
                    if let Some(f) = s.resources.unclaimed.take() {
                        f(result);
                    }
                    None
                }
                _ => {
                    std::mem::forget(s.resources);
                    Some(())
                }
            })
            .count()
    }
}

impl Drop for RingEngine {
    fn drop(&mut self) {
        // The registration holds a reference to the ring's file: let go of
        // it, or the ring would live until the thread exits.
        if let Some(index) = self.registered {
            let mut update = RsrcUpdate {
                offset: index,
                resv: 0,
                data: 0,
            };
            // SAFETY: as in `register_ring_fd`.
            unsafe {
                libc::syscall(
                    libc::SYS_io_uring_register,
                    self.ring.get_mut().as_raw_fd() as libc::c_long,
                    IORING_UNREGISTER_RING_FDS as libc::c_long,
                    &mut update as *mut RsrcUpdate,
                    1 as libc::c_long,
                )
            };
        }
    }
}

/// Registers the ring's fd with the kernel (`IORING_REGISTER_RING_FDS`,
/// 5.18) and returns its index, or `None` where the kernel refuses.
fn register_ring_fd(ring: &IoUring) -> Option<u32> {
    let mut update = RsrcUpdate {
        offset: u32::MAX,
        resv: 0,
        data: ring.as_raw_fd() as u64,
    };
    // SAFETY: IORING_REGISTER_RING_FDS reads and writes one
    // `io_uring_rsrc_update` that lives on this stack frame for the call.
    let r = unsafe {
        libc::syscall(
            libc::SYS_io_uring_register,
            ring.as_raw_fd() as libc::c_long,
            IORING_REGISTER_RING_FDS as libc::c_long,
            &mut update as *mut RsrcUpdate,
            1 as libc::c_long,
        )
    };
    (r == 1).then_some(update.offset)
}
