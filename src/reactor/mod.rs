//! One io_uring ring per thread, driven from a tokio current-thread runtime.
//!
//! The reactor knows nothing of SSH. It owns a ring and a slab of in-flight
//! operations keyed by `user_data`. Every operation owns its buffer, its
//! file reference and any kernel-visible argument (timespec, socket address)
//! until **its own** completion arrives, also when whoever asked for it is
//! gone: an abandoned operation is cancelled and then reaped, never freed
//! early.
//!
//! Submission is batched: operations only push SQEs into the submission
//! queue and wake the driver task; the driver makes one `io_uring_enter` for
//! everything queued in the same scheduler tick, then reaps completions,
//! wakes futures and runs completion callbacks. It waits for more by polling
//! the ring fd through [`tokio::io::unix::AsyncFd`], so the reactor works in
//! any current-thread runtime: `#[tokio::main(flavor = "current_thread")]`,
//! a `LocalSet`, or `tokio_uring::start`.

mod op;
mod probe;
#[cfg(test)]
mod tests;

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::io;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll, Waker};
use std::thread::ThreadId;

use io_uring::{IoUring, opcode, squeue, types};
use slab::Slab;
use tokio::io::unix::AsyncFd;

use crate::error::{Error, KernelSupportError};

pub(crate) use op::{Completion, Op, Resources, SharedFd};
pub use probe::Features;

/// Submission queue slots per ring. Completions get four times as many.
const RING_ENTRIES: u32 = 1024;

/// Iterations of submit + reap in one driver poll before yielding.
const DRIVER_BUDGET: usize = 64;

/// Counters of one thread's ring, for tests and benchmarks.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stats {
    /// SQEs handed to the kernel.
    pub sqes_submitted: u64,
    /// `io_uring_enter` system calls made.
    pub enter_calls: u64,
    /// CQEs taken from the completion queue.
    pub cqes_reaped: u64,
    /// Operations submitted (or queued) whose completion has not been reaped.
    pub ops_in_flight: u64,
    /// Operations whose owner is gone and whose buffers the ring still holds
    /// until their completion arrives.
    pub orphaned_outstanding: u64,
}

/// A completion callback: runs on the driver task, after the ring borrow is released.
pub(crate) type Callback = Box<dyn FnOnce(Completion)>;

enum Notify {
    /// A future waits for the result.
    Waiting(Option<Waker>),
    /// The result arrived; the future has not taken it yet.
    Done(i32),
    /// Run this when the result arrives.
    Callback(Callback),
    /// Fire and forget: nobody waits, resources are dropped on completion.
    Detached,
    /// The owner gave up; resources are dropped on completion.
    Orphaned,
}

struct Slot {
    generation: u32,
    notify: Notify,
    resources: Resources,
}

/// Identifies one in-flight operation: the `user_data` of its SQE.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct OpId(u64);

impl OpId {
    fn key(self) -> usize {
        (self.0 & 0xffff_ffff) as usize
    }
    fn generation(self) -> u32 {
        (self.0 >> 32) as u32
    }
}

/// A thread's ring, its in-flight operations and its counters.
pub struct Reactor {
    ring: RefCell<IoUring>,
    slots: RefCell<Slab<Slot>>,
    /// SQE groups (a linked pair stays together) waiting for queue space.
    backlog: RefCell<VecDeque<Vec<squeue::Entry>>>,
    /// SQEs pushed into the queue since the last `io_uring_enter`.
    unsubmitted: Cell<u32>,
    next_generation: Cell<u32>,
    driver_waker: RefCell<Option<Waker>>,
    driver_scheduled: Cell<bool>,
    /// The runtime whose task drives the ring now, if any.
    driver_runtime: Cell<Option<tokio::runtime::Id>>,
    /// Bumped for each new driver task; an older one stops.
    driver_epoch: Cell<u64>,
    features: Features,
    stats: Cell<Stats>,
    thread: ThreadId,
}

impl std::fmt::Debug for Reactor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reactor")
            .field("stats", &self.stats())
            .field("features", &self.features)
            .finish()
    }
}

thread_local! {
    static CURRENT: RefCell<Option<Rc<Reactor>>> = const { RefCell::new(None) };
}

/// Creates this thread's ring now (it is otherwise created on first use) and
/// reports what the kernel supports.
///
/// Must be called inside a tokio current-thread runtime.
pub fn init() -> Result<Features, Error> {
    Reactor::current().map(|r| r.features)
}

/// Counters of this thread's ring, or `None` if the thread has none yet.
pub fn stats() -> Option<Stats> {
    CURRENT
        .try_with(|c| c.borrow().as_ref().map(|r| r.stats()))
        .ok()
        .flatten()
}

/// Submits a no-op and waits for its completion: one full trip through the ring.
pub async fn nop() -> Result<(), Error> {
    let reactor = Reactor::current()?;
    let op = reactor.submit_op(opcode::Nop::new().build(), Resources::default());
    let done = op.await;
    done.result().map(drop).map_err(Error::Io)
}

impl Reactor {
    /// This thread's reactor, created on first use, with a driver task on the
    /// current tokio runtime.
    pub(crate) fn current() -> Result<Rc<Reactor>, Error> {
        let handle = current_thread_runtime()?;
        let reactor = CURRENT.with(|c| -> Result<Rc<Reactor>, Error> {
            if let Some(r) = c.borrow().as_ref() {
                return Ok(r.clone());
            }
            let r = Rc::new(Reactor::new()?);
            *c.borrow_mut() = Some(r.clone());
            Ok(r)
        })?;
        reactor.ensure_driver(&handle)?;
        Ok(reactor)
    }

    /// Runs `f` with this thread's reactor if it exists (used from Drop paths,
    /// which must never create a ring or panic during thread teardown).
    pub(crate) fn with_existing<R>(f: impl FnOnce(&Rc<Reactor>) -> R) -> Option<R> {
        CURRENT
            .try_with(|c| c.try_borrow().ok().and_then(|c| c.as_ref().map(f)))
            .ok()
            .flatten()
    }

    fn new() -> Result<Reactor, Error> {
        let (ring, features) = probe::setup(RING_ENTRIES)?;
        Ok(Reactor {
            ring: RefCell::new(ring),
            slots: RefCell::new(Slab::with_capacity(256)),
            backlog: RefCell::new(VecDeque::new()),
            unsubmitted: Cell::new(0),
            next_generation: Cell::new(1),
            driver_waker: RefCell::new(None),
            driver_scheduled: Cell::new(false),
            driver_runtime: Cell::new(None),
            driver_epoch: Cell::new(0),
            features,
            stats: Cell::new(Stats::default()),
            thread: std::thread::current().id(),
        })
    }

    /// What the kernel supports beyond the required opcodes.
    pub fn features(&self) -> Features {
        self.features
    }

    /// A snapshot of the counters.
    pub fn stats(&self) -> Stats {
        self.stats.get()
    }

    fn bump(&self, f: impl FnOnce(&mut Stats)) {
        let mut s = self.stats.get();
        f(&mut s);
        self.stats.set(s);
    }

    /// Makes sure a driver runs in the current runtime (if there is a
    /// current-thread one): sessions made in one runtime of a thread keep
    /// working when used from another.
    pub(crate) fn ensure_driver_here(&self) {
        if let Ok(handle) = current_thread_runtime() {
            let _ = self.ensure_driver(&handle);
        }
    }

    fn ensure_driver(&self, handle: &tokio::runtime::Handle) -> Result<(), Error> {
        if self.driver_runtime.get() == Some(handle.id()) {
            return Ok(());
        }
        use std::os::fd::{AsRawFd, BorrowedFd};
        // The driver task may outlive this reactor (runtime and thread-local
        // teardown order is not ours to choose): give it a duplicate of the
        // ring fd that it owns.
        // SAFETY: the ring fd is open while `self` lives, which covers this call.
        let ring_fd = unsafe { BorrowedFd::borrow_raw(self.ring.borrow().as_raw_fd()) };
        let owned = ring_fd.try_clone_to_owned().map_err(Error::Io)?;
        // SAFETY: `owned` is a valid fd owned by the AsyncFd from here on, so
        // it stays open and the same for the AsyncFd's whole lifetime.
        let fd = unsafe { AsyncFd::register_with_interest(owned, tokio::io::Interest::READABLE) }
            .map_err(|e| Error::Io(e.into()))?;
        // A driver in another runtime of this thread (idle while this one
        // runs) stops at its next poll; this runtime's driver takes over.
        let epoch = self.driver_epoch.get() + 1;
        self.driver_epoch.set(epoch);
        self.driver_runtime.set(Some(handle.id()));
        self.driver_scheduled.set(false);
        *self.driver_waker.borrow_mut() = None;
        let _task = handle.spawn(Driver {
            fd,
            thread: self.thread,
            epoch,
        });
        Ok(())
    }

    /// Queues one SQE whose result a future will await.
    pub(crate) fn submit_op(self: &Rc<Self>, sqe: squeue::Entry, resources: Resources) -> Op {
        let id = self.push(vec![(sqe, resources, Notify::Waiting(None))])[0];
        Op::new(self.clone(), id)
    }

    /// Queues one SQE whose completion runs `callback` on the driver task.
    pub(crate) fn submit_with_callback(
        &self,
        sqe: squeue::Entry,
        resources: Resources,
        callback: Callback,
    ) -> OpId {
        self.push(vec![(sqe, resources, Notify::Callback(callback))])[0]
    }

    /// Runs `callback` on the driver task soon (after a no-op's round trip,
    /// batched with everything else): work moved off a caller's path.
    pub(crate) fn run_soon(&self, callback: Callback) {
        self.submit_with_callback(opcode::Nop::new().build(), Resources::default(), callback);
    }

    /// Queues one SQE that nobody waits for; its resources are dropped on completion.
    pub(crate) fn submit_detached(&self, sqe: squeue::Entry, resources: Resources) -> OpId {
        self.push(vec![(sqe, resources, Notify::Detached)])[0]
    }

    /// Queues `sqe` linked to a timeout: if it has not completed within
    /// `timeout`, the kernel cancels it (it then completes with `-ECANCELED`).
    pub(crate) fn submit_op_with_timeout(
        self: &Rc<Self>,
        sqe: squeue::Entry,
        resources: Resources,
        timeout: std::time::Duration,
    ) -> Op {
        let ts = Box::new(types::Timespec::from(timeout));
        let link = opcode::LinkTimeout::new(&*ts as *const types::Timespec).build();
        let ids = self.push(vec![
            (
                sqe.flags(squeue::Flags::IO_LINK),
                resources,
                Notify::Waiting(None),
            ),
            (
                link,
                Resources {
                    timespec: Some(ts),
                    ..Resources::default()
                },
                Notify::Detached,
            ),
        ]);
        Op::new(self.clone(), ids[0])
    }

    /// Queues a standalone timer that runs `callback` when it fires (result
    /// `-ETIME`) or is cancelled (`-ECANCELED`).
    pub(crate) fn submit_timer(&self, after: std::time::Duration, callback: Callback) -> OpId {
        let ts = Box::new(types::Timespec::from(after));
        let sqe = opcode::Timeout::new(&*ts as *const types::Timespec).build();
        let resources = Resources {
            timespec: Some(ts),
            ..Resources::default()
        };
        self.submit_with_callback(sqe, resources, callback)
    }

    /// Asks the kernel to cancel every request on `fd`. Only on kernels with
    /// `IORING_ASYNC_CANCEL_FD` (see [`Features::cancel_by_fd`]).
    pub(crate) fn cancel_fd(&self, fd: &Rc<SharedFd>) {
        debug_assert!(self.features.cancel_by_fd);
        let sqe =
            opcode::AsyncCancel2::new(types::CancelBuilder::fd(types::Fd(fd.raw())).all()).build();
        let resources = Resources {
            fd: Some(fd.clone()),
            ..Resources::default()
        };
        self.submit_detached(sqe, resources);
    }

    fn push(&self, group: Vec<(squeue::Entry, Resources, Notify)>) -> Vec<OpId> {
        let mut ids = Vec::with_capacity(group.len());
        let mut sqes = Vec::with_capacity(group.len());
        {
            let mut slots = self.slots.borrow_mut();
            for (sqe, resources, notify) in group {
                let generation = self.next_generation.get();
                self.next_generation.set(generation.wrapping_add(1).max(1));
                let key = slots.insert(Slot {
                    generation,
                    notify,
                    resources,
                });
                let id = OpId(((generation as u64) << 32) | key as u64);
                ids.push(id);
                sqes.push(sqe.user_data(id.0));
            }
        }
        let n = sqes.len() as u64;
        self.bump(|s| s.ops_in_flight += n);
        // Keep submission order: once something waits in the backlog,
        // everything after it waits too.
        let mut backlog = self.backlog.borrow_mut();
        if !backlog.is_empty() || !self.try_push_group(&sqes) {
            backlog.push_back(sqes);
        }
        drop(backlog);
        if self.driver_runtime.get().is_none() {
            // No task will submit (a drop after the runtime is gone):
            // enter the kernel now so cancels, shutdowns and closes happen.
            let _ = self.flush();
        } else {
            self.schedule_driver();
        }
        ids
    }

    /// Pushes a group into the submission queue if it fits whole.
    fn try_push_group(&self, sqes: &[squeue::Entry]) -> bool {
        let mut ring = self.ring.borrow_mut();
        let mut sq = ring.submission();
        if sq.capacity() - sq.len() < sqes.len() {
            return false;
        }
        // SAFETY: every pointer in these SQEs (buffers, timespecs, socket
        // addresses) is owned by the op's `Resources` in `slots`, which is
        // dropped only after the op's own CQE is reaped (or leaked if the ring
        // is torn down first). The reactor keeps this invariant.
        unsafe { sq.push_multiple(sqes) }.is_ok() && {
            self.unsubmitted
                .set(self.unsubmitted.get() + sqes.len() as u32);
            true
        }
    }

    fn schedule_driver(&self) {
        if self.driver_scheduled.replace(true) {
            return;
        }
        if let Some(w) = self.driver_waker.borrow().as_ref() {
            w.wake_by_ref();
        }
    }

    /// Moves backlogged SQEs into the queue and enters the kernel once for
    /// everything queued (more often only if the queue fills up).
    fn flush(&self) -> io::Result<()> {
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
                    self.bump(|s| {
                        s.enter_calls += 1;
                        s.sqes_submitted += n as u64;
                    });
                }
                Err(e) => {
                    self.bump(|s| s.enter_calls += 1);
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

    /// Takes every available CQE; returns how many.
    fn reap(&self) -> usize {
        let mut callbacks: Vec<(Callback, Completion)> = Vec::new();
        let mut dead: Vec<Resources> = Vec::new();
        let mut wakers: Vec<Waker> = Vec::new();
        let mut count = 0usize;
        let mut finished = 0u64;
        let mut orphans_done = 0u64;
        {
            let mut ring = self.ring.borrow_mut();
            let mut slots = self.slots.borrow_mut();
            for cqe in ring.completion() {
                count += 1;
                let id = OpId(cqe.user_data());
                let result = cqe.result();
                let Some(slot) = slots.get_mut(id.key()) else {
                    continue;
                };
                if slot.generation != id.generation() {
                    continue;
                }
                match std::mem::replace(&mut slot.notify, Notify::Done(result)) {
                    Notify::Waiting(w) => wakers.extend(w),
                    Notify::Done(_) => {}
                    Notify::Callback(cb) => {
                        finished += 1;
                        let slot = slots.remove(id.key());
                        callbacks.push((cb, Completion::new(result, slot.resources)));
                    }
                    Notify::Detached => {
                        finished += 1;
                        dead.push(slots.remove(id.key()).resources);
                    }
                    Notify::Orphaned => {
                        finished += 1;
                        orphans_done += 1;
                        dead.push(slots.remove(id.key()).resources);
                    }
                }
            }
        }
        if count > 0 {
            self.bump(|s| {
                s.cqes_reaped += count as u64;
                s.orphaned_outstanding -= orphans_done;
                // Ops awaited by a future leave the slab when the future takes
                // the result; everything else is finished now.
                s.ops_in_flight -= finished;
            });
        }
        for w in wakers {
            w.wake();
        }
        drop(dead);
        // A panicking callback must not cost the others their completion:
        // run them all, then re-raise the first panic.
        let mut panic = None;
        for (cb, completion) in callbacks {
            if let Err(p) =
                std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| cb(completion)))
            {
                panic.get_or_insert(p);
            }
        }
        if let Some(p) = panic {
            std::panic::resume_unwind(p);
        }
        count
    }

    /// Polls a future-owned op: its result once the CQE arrived.
    pub(crate) fn poll_op(&self, id: OpId, cx: &mut Context<'_>) -> Poll<Completion> {
        let mut slots = self.slots.borrow_mut();
        let slot = &mut slots[id.key()];
        // An `Op` is polled only until it completes (Op::poll checks), so
        // its slot cannot have been reused.
        assert_eq!(
            slot.generation,
            id.generation(),
            "op polled after completion"
        );
        match &mut slot.notify {
            Notify::Done(result) => {
                let result = *result;
                let slot = slots.remove(id.key());
                drop(slots);
                self.bump(|s| s.ops_in_flight -= 1);
                Poll::Ready(Completion::new(result, slot.resources))
            }
            Notify::Waiting(w) => {
                match w {
                    Some(w) if w.will_wake(cx.waker()) => {}
                    _ => *w = Some(cx.waker().clone()),
                }
                Poll::Pending
            }
            _ => unreachable!("a future polled an op it does not own"),
        }
    }

    /// The owner of `id` is gone: cancel the op if it is still in flight and
    /// let the ring keep its resources until its own CQE arrives.
    pub(crate) fn abandon(&self, id: OpId) {
        if self.orphan(id) {
            self.submit_detached(opcode::AsyncCancel::new(id.0).build(), Resources::default());
        }
    }

    /// Like [`Self::abandon`] without the cancel (the caller cancels by
    /// other means, e.g. [`Self::cancel_fd`]). Returns whether the op is
    /// still in flight.
    pub(crate) fn orphan(&self, id: OpId) -> bool {
        let mut slots = self.slots.borrow_mut();
        let Some(slot) = slots.get_mut(id.key()) else {
            return false;
        };
        if slot.generation != id.generation() {
            return false;
        }
        match slot.notify {
            Notify::Done(_) => {
                let slot = slots.remove(id.key());
                drop(slots);
                self.bump(|s| s.ops_in_flight -= 1);
                drop(slot);
                false
            }
            Notify::Waiting(_) | Notify::Callback(_) => {
                let old = std::mem::replace(&mut slot.notify, Notify::Orphaned);
                drop(slots);
                drop(old);
                self.bump(|s| s.orphaned_outstanding += 1);
                true
            }
            Notify::Detached | Notify::Orphaned => false,
        }
    }
}

impl Drop for Reactor {
    fn drop(&mut self) {
        // Thread teardown: cancel what is in flight, give the kernel a short
        // while to complete it, and leak the buffers of whatever remains
        // (the kernel may still write into them after the ring is gone).
        let ids: Vec<u64> = self
            .slots
            .get_mut()
            .iter()
            .filter(|(_, s)| !matches!(s.notify, Notify::Done(_)))
            .map(|(k, s)| ((s.generation as u64) << 32) | k as u64)
            .collect();
        let ring = self.ring.get_mut();
        for id in ids {
            let sqe = opcode::AsyncCancel::new(id).build().user_data(0);
            // SAFETY: a cancel SQE carries no pointer.
            while unsafe { ring.submission().push(&sqe) }.is_err() {
                if ring.submit().is_err() {
                    break;
                }
            }
        }
        let slots = self.slots.get_mut();
        for _ in 0..100 {
            let _ = ring.submit();
            for cqe in ring.completion() {
                let id = OpId(cqe.user_data());
                if cqe.user_data() != 0
                    && slots
                        .get(id.key())
                        .is_some_and(|s| s.generation == id.generation())
                {
                    slots.remove(id.key());
                }
            }
            if slots
                .iter()
                .all(|(_, s)| matches!(s.notify, Notify::Done(_)))
            {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        let leaked = slots
            .drain()
            .filter(|s| !matches!(s.notify, Notify::Done(_)))
            .map(|s| std::mem::forget(s.resources))
            .count();
        GLOBAL_LEAKED_AT_TEARDOWN.fetch_add(leaked as u64, std::sync::atomic::Ordering::Relaxed);
    }
}

/// The current tokio runtime, if it is a current-thread one.
fn current_thread_runtime() -> Result<tokio::runtime::Handle, Error> {
    let handle = tokio::runtime::Handle::try_current().map_err(|_| {
        Error::Runtime("uring-ssh must be used inside a tokio current-thread runtime".into())
    })?;
    if handle.runtime_flavor() != tokio::runtime::RuntimeFlavor::CurrentThread {
        return Err(Error::Runtime(
            "uring-ssh keeps one ring per thread and needs a current-thread runtime \
             (run one per thread instead of a multi-thread runtime)"
                .into(),
        ));
    }
    Ok(handle)
}

/// Ops leaked on purpose by rings torn down with requests still in flight.
pub(crate) static GLOBAL_LEAKED_AT_TEARDOWN: std::sync::atomic::AtomicU64 =
    std::sync::atomic::AtomicU64::new(0);

/// Operations leaked on purpose, over all threads, because their ring was
/// torn down (thread exit) while the kernel still held their buffers.
pub fn leaked_at_teardown() -> u64 {
    GLOBAL_LEAKED_AT_TEARDOWN.load(std::sync::atomic::Ordering::Relaxed)
}

/// The task that submits, reaps and waits on the ring fd.
struct Driver {
    fd: AsyncFd<std::os::fd::OwnedFd>,
    thread: ThreadId,
    epoch: u64,
}

impl std::future::Future for Driver {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        if std::thread::current().id() != self.thread {
            // A runtime moved us to another thread: that thread's ops belong
            // to another ring. Nothing sensible is left to do here.
            return Poll::Ready(());
        }
        let Some(reactor) = Reactor::with_existing(|r| r.clone()) else {
            return Poll::Ready(());
        };
        if reactor.driver_epoch.get() != self.epoch {
            // A newer driver (in another runtime of this thread) took over.
            return Poll::Ready(());
        }
        {
            let mut w = reactor.driver_waker.borrow_mut();
            if !w.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
                *w = Some(cx.waker().clone());
            }
        }
        for _ in 0..DRIVER_BUDGET {
            reactor.driver_scheduled.set(false);
            // An enter error other than EINTR/EBUSY means the ring is
            // unusable: its ops stay in flight and their owners time out.
            let _ = reactor.flush();
            let reaped = reactor.reap();
            if reaped > 0 || reactor.driver_scheduled.get() {
                continue;
            }
            match self.fd.poll_read_ready(cx) {
                Poll::Ready(Ok(mut guard)) => guard.clear_ready(),
                Poll::Ready(Err(_)) => return Poll::Ready(()),
                Poll::Pending => return Poll::Pending,
            }
        }
        cx.waker().wake_by_ref();
        Poll::Pending
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        // Dropped on another thread (a runtime dropped elsewhere): that
        // thread's reactor is not ours. Ours notices the dead runtime on
        // its next `current()` through the runtime id.
        if std::thread::current().id() == self.thread {
            Reactor::with_existing(|r| {
                if r.driver_epoch.get() == self.epoch {
                    r.driver_runtime.set(None);
                    *r.driver_waker.borrow_mut() = None;
                    // What was queued in this runtime's last tick (a drop's
                    // cancel, shutdown and close) still reaches the kernel.
                    let _ = r.flush();
                }
            });
        }
    }
}

/// Kernel-support failures are errors of their own kind.
impl From<KernelSupportError> for Error {
    fn from(e: KernelSupportError) -> Self {
        Error::Kernel(e)
    }
}
