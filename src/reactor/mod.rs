//! One reactor per thread, driven from a tokio current-thread runtime.
//!
//! The reactor knows nothing of SSH. It owns a slab of in-flight
//! operations keyed by `user_data` and an engine that performs them: an
//! io_uring ring ([`Backend::IoUring`]), or, where io_uring is forbidden or
//! too old, plain non-blocking socket calls on epoll readiness
//! ([`Backend::Poll`]). Every operation owns its buffer, its file reference
//! and any kernel-visible argument (timespec, socket address) until **its
//! own** completion arrives, also when whoever asked for it is gone: an
//! abandoned operation is cancelled and then reaped, never freed early.
//!
//! Submission is batched: operations only queue work and wake the driver
//! task; the driver makes one `io_uring_enter` for everything queued in the
//! same scheduler tick (or, on the poll engine, the socket calls of that
//! tick), then reaps completions, wakes futures and runs completion
//! callbacks. It waits for more by polling one fd (the ring's, or the
//! epoll set's) through [`tokio::io::unix::AsyncFd`], so the reactor works
//! in any current-thread runtime: `#[tokio::main(flavor = "current_thread")]`,
//! a `LocalSet`, or `tokio_uring::start`.

pub(crate) mod buffers;
#[cfg(test)]
pub(crate) mod engine_tests;
pub(crate) mod files;
mod local;
mod op;
mod poll;
mod probe;
mod ring;
#[cfg(test)]
mod tests;

use std::cell::{Cell, RefCell};
use std::os::fd::RawFd;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll, Waker};
use std::thread::ThreadId;
use std::time::{Duration, Instant};

#[cfg(test)]
use io_uring::squeue;
use slab::Slab;
use tokio::io::unix::AsyncFd;

use crate::error::{Error, InvalidInput, RuntimeError};

pub(crate) use op::{Completion, Op, Resources, SharedFd};
pub use probe::{Features, LOCAL_FILES_ENV, LocalFiles, TASK_WORK_ENV, TaskWork};

/// Iterations of submit + reap in one driver poll before yielding.
const DRIVER_BUDGET: usize = 64;

/// The environment variable that picks the engine of threads whose reactor
/// is created without [`init_with`]: `io_uring`, `poll` or `auto` (the
/// default).
pub const BACKEND_ENV: &str = "URING_SSH_BACKEND";

/// What performs a thread's socket IO.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub enum Backend {
    /// An io_uring ring (kernel 5.11+): batched submissions, one
    /// `io_uring_enter` per scheduler tick.
    #[default]
    IoUring,
    /// Plain non-blocking `send`/`recv`/`connect` on epoll readiness: the
    /// fallback where io_uring is forbidden (Docker's default seccomp
    /// profile, `kernel.io_uring_disabled`) or too old. Same library, same
    /// libssh2 callbacks, same teardown guarantees; more system calls.
    Poll,
}

impl std::fmt::Display for Backend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Backend::IoUring => "io_uring",
            Backend::Poll => "poll",
        })
    }
}

/// How a thread's engine is chosen.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Choice {
    /// io_uring, or the poll engine if the ring cannot be set up.
    Auto,
    /// This engine or an error.
    Only(Backend),
}

impl Choice {
    /// From [`BACKEND_ENV`].
    fn from_env() -> Result<Choice, Error> {
        match std::env::var(BACKEND_ENV) {
            Err(std::env::VarError::NotPresent) => Ok(Choice::Auto),
            Ok(v) => Self::parse(&v),
            Err(std::env::VarError::NotUnicode(v)) => Err(Self::invalid(&v.to_string_lossy())),
        }
    }

    fn parse(value: &str) -> Result<Choice, Error> {
        match value.trim() {
            "" | "auto" => Ok(Choice::Auto),
            "io_uring" | "io-uring" | "uring" => Ok(Choice::Only(Backend::IoUring)),
            "poll" | "epoll" => Ok(Choice::Only(Backend::Poll)),
            other => Err(Self::invalid(other)),
        }
    }

    fn invalid(value: &str) -> Error {
        InvalidInput::Environment {
            variable: BACKEND_ENV,
            value: value.to_string(),
            expected: "io_uring, poll or auto",
        }
        .into()
    }
}

/// Counters of one thread's reactor, for tests and benchmarks.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stats {
    /// SQEs handed to the kernel (io_uring engine).
    pub sqes_submitted: u64,
    /// `io_uring_enter` system calls made (io_uring engine).
    pub enter_calls: u64,
    /// CQEs taken from the completion queue (io_uring engine).
    pub cqes_reaped: u64,
    /// Operations submitted (or queued) whose completion has not been reaped.
    pub ops_in_flight: u64,
    /// `MSG_WAITALL` receives bounded by a linked timeout started (io_uring
    /// engine): batches gathered the `waitall` way (see
    /// `RECEIVE_BATCH_MODE_ENV`); the default way counts in
    /// `SessionStats::batches`.
    pub batched_recvs: u64,
    /// Operations whose owner is gone and whose buffers the reactor still
    /// holds until their completion arrives.
    pub orphaned_outstanding: u64,
    /// Linked timeouts and cancels that missed the op they were to end
    /// (the kernel found it nowhere: it was between two tries) while the
    /// op stayed in flight; the reactor cancelled it again (io_uring
    /// engine; `kernel-notes/io_uring.md`).
    pub cancels_missed: u64,
    /// System calls the reactor made: `io_uring_enter` on the ring engine;
    /// socket calls, `epoll_wait`, `epoll_ctl` and timer calls on the poll
    /// engine. (The runtime's own wait for the reactor's fd is not counted.)
    pub syscalls: u64,
    /// Background tasks the reactor runs (the relays of sessions through
    /// a jump session).
    pub background_tasks: u64,
    /// Local file calls (create, write, `fsync`, rename) made on the ring
    /// rather than blocking (see [`LocalFiles`]).
    pub file_ops: u64,
}

impl std::ops::Add for Stats {
    type Output = Stats;

    /// Field by field: the counters of several threads together.
    fn add(self, o: Stats) -> Stats {
        Stats {
            sqes_submitted: self.sqes_submitted + o.sqes_submitted,
            enter_calls: self.enter_calls + o.enter_calls,
            cqes_reaped: self.cqes_reaped + o.cqes_reaped,
            ops_in_flight: self.ops_in_flight + o.ops_in_flight,
            batched_recvs: self.batched_recvs + o.batched_recvs,
            orphaned_outstanding: self.orphaned_outstanding + o.orphaned_outstanding,
            cancels_missed: self.cancels_missed + o.cancels_missed,
            syscalls: self.syscalls + o.syscalls,
            background_tasks: self.background_tasks + o.background_tasks,
            file_ops: self.file_ops + o.file_ops,
        }
    }
}

/// A completion callback: runs on the driver task, after the ring borrow is released.
pub(crate) type Callback = Box<dyn FnOnce(Completion)>;

/// A callback of [`Reactor::at_tick`]: gets the number of callbacks due
/// at its tick (itself included).
pub(crate) type TickCallback = Box<dyn FnOnce(usize)>;

/// What an operation does; its buffer, fd and address are in its [`Resources`].
#[derive(Debug, Clone, Copy)]
pub(crate) enum OpKind {
    /// Nothing: a round trip through the driver.
    Nop,
    /// `send(2)` of `buf[offset..]`, all of it (MSG_NOSIGNAL).
    Send,
    /// `recv(2)` into `buf[..len]`.
    Recv(usize),
    /// `recv(2)` into `buf[..len]` with `MSG_WAITALL`, bounded by a linked
    /// timeout: completes when the buffer is full, or when the timeout ends
    /// it with what arrived (`-ECANCELED` if nothing did). Ring engine; the
    /// poll engine performs a plain [`OpKind::Recv`].
    RecvAll(usize),
    /// `recv(2)` into `buf[..len]` with `MSG_DONTWAIT`: completes at once,
    /// with `-EAGAIN` if the socket holds nothing. Never armed, so it never
    /// wakes the thread later.
    RecvNow(usize),
    /// `connect(2)` to `addr`.
    Connect,
    /// `shutdown(2)` with this `how` (`SHUT_RDWR`, or `SHUT_WR` to send a
    /// FIN while still receiving).
    Shutdown(i32),
    /// `close(2)` of this fd.
    Close(std::os::fd::RawFd),
    /// A timer: completes with `-ETIME` after this long.
    Timeout(Duration),
    /// `openat(file, path, flags | O_CLOEXEC, mode)`: a new fd, which the
    /// op's `unclaimed` closes if its owner is gone.
    OpenAt { flags: i32, mode: u32 },
    /// `pwrite(file, buf[offset..], at + offset)`.
    Write { at: u64 },
    /// `renameat(file, path, file, path2)`: both names in one directory.
    RenameAt,
    /// `fsync(file)`.
    Fsync,
}

/// Where an op stands between its start and the moment its slot is freed,
/// and who gets its result.
enum Lifecycle {
    /// A future waits for the result.
    Waiting(Option<Waker>),
    /// The result arrived; the future has not taken it yet.
    Completed(i32),
    /// Run this when the result arrives.
    Callback(Callback),
    /// Fire and forget: nobody waits, resources are dropped on completion.
    Detached,
    /// The owner gave up; resources are dropped on completion.
    Orphaned,
    /// The reactor's own op that is to end another one (ring engine):
    /// resources are dropped on completion, and if it did not end that op
    /// and the op is still in flight, the reactor cancels it again.
    Ends(OpId, Ender),
}

/// How an op of the reactor's own ends another one (see
/// [`Lifecycle::Ends`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ender {
    /// Its linked timeout. `-ETIME`: it fired and found the op (or the op
    /// had completed); `-ECANCELED`: the op completed first. Anything else
    /// (`-ENOENT`) means the kernel did not find the op when the timeout
    /// fired; the op then runs unbounded.
    LinkTimeout,
    /// A cancel: `0` if it found the op.
    Cancel,
    /// A pause of [`RECANCEL_PAUSE`] before another cancel, so that an op
    /// that keeps escaping cancels costs one cancel per pause, not a loop.
    Pause,
}

impl Ender {
    /// Whether this ender, completing with `result`, missed its op.
    fn missed(self, result: i32) -> bool {
        match self {
            Ender::LinkTimeout | Ender::Cancel => {
                !(result == 0 || result == -libc::ETIME || result == -libc::ECANCELED)
            }
            Ender::Pause => true,
        }
    }
}

/// Between two cancels of an op that the first one missed.
const RECANCEL_PAUSE: Duration = Duration::from_millis(1);

/// One in-flight op in the reactor's slab.
struct Slot {
    /// Told apart from earlier ops of the same slab key.
    generation: u32,
    lifecycle: Lifecycle,
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

/// What an engine does for the reactor, which keeps the slots, the
/// lifecycles and the driver task.
///
/// A trait rather than `match` arms in the reactor, so that each engine's
/// half of every step (start, cancel, close, tick, teardown) reads in its
/// own file and the reactor's code says nothing engine-specific. Both
/// engines implement it and the reactor calls it through [`AnyEngine`],
/// whose `match` keeps every call static: no `Box<dyn>`, no vtable on the
/// hot path.
trait Engine {
    /// The fd the driver waits on: readable when the engine has work.
    fn raw_fd(&self) -> RawFd;
    /// Gives the op a slot of `reactor` and starts it; with `timeout`, it
    /// is cancelled (result `-ECANCELED`) if it has not completed by then.
    fn start(
        &self,
        reactor: &Reactor,
        kind: OpKind,
        resources: Resources,
        lifecycle: Lifecycle,
        timeout: Option<Duration>,
    ) -> OpId;
    /// Cancels `id` (its owner is gone, or its time is up); its
    /// completion still arrives.
    fn cancel(&self, reactor: &Reactor, id: OpId);
    /// Cancels every op on `fd`.
    fn cancel_fd(&self, reactor: &Reactor, fd: &Rc<SharedFd>);
    /// Closes `fd`, whose last holder let go.
    fn close(&self, reactor: &Reactor, fd: RawFd);
    /// Submits what is queued and adds what completed to `done`.
    fn tick(&self, reactor: &Reactor, done: &mut Vec<(OpId, i32)>);
    /// The driver saw [`Self::raw_fd`] readable.
    fn note_readable(&self);
    /// No driver task will tick again (its runtime is gone): hands what is
    /// queued to the kernel now.
    fn submit_now(&self, reactor: &Reactor);
    /// Thread teardown with `slots` still in flight: frees what it safely
    /// can and returns how many ops' resources it had to leak.
    fn teardown(&self, slots: &mut Slab<Slot>, stats: &Cell<Stats>) -> usize;
}

/// The engine a reactor runs: a closed choice of two, so a `match` instead
/// of a vtable.
enum AnyEngine {
    Ring(ring::RingEngine),
    Poll(poll::PollEngine),
}

/// Calls the same method on whichever engine `$any` holds.
macro_rules! dispatch {
    ($any:expr, $e:ident => $call:expr) => {
        match $any {
            AnyEngine::Ring($e) => $call,
            AnyEngine::Poll($e) => $call,
        }
    };
}

impl Engine for AnyEngine {
    fn raw_fd(&self) -> RawFd {
        dispatch!(self, e => e.raw_fd())
    }
    fn start(
        &self,
        reactor: &Reactor,
        kind: OpKind,
        resources: Resources,
        lifecycle: Lifecycle,
        timeout: Option<Duration>,
    ) -> OpId {
        dispatch!(self, e => e.start(reactor, kind, resources, lifecycle, timeout))
    }
    fn cancel(&self, reactor: &Reactor, id: OpId) {
        dispatch!(self, e => e.cancel(reactor, id))
    }
    fn cancel_fd(&self, reactor: &Reactor, fd: &Rc<SharedFd>) {
        dispatch!(self, e => e.cancel_fd(reactor, fd))
    }
    fn close(&self, reactor: &Reactor, fd: RawFd) {
        dispatch!(self, e => e.close(reactor, fd))
    }
    fn tick(&self, reactor: &Reactor, done: &mut Vec<(OpId, i32)>) {
        dispatch!(self, e => e.tick(reactor, done))
    }
    fn note_readable(&self) {
        dispatch!(self, e => e.note_readable())
    }
    fn submit_now(&self, reactor: &Reactor) {
        dispatch!(self, e => e.submit_now(reactor))
    }
    fn teardown(&self, slots: &mut Slab<Slot>, stats: &Cell<Stats>) -> usize {
        dispatch!(self, e => e.teardown(slots, stats))
    }
}

/// A thread's engine, its in-flight operations and its counters.
pub struct Reactor {
    engine: AnyEngine,
    slots: RefCell<Slab<Slot>>,
    next_generation: Cell<u32>,
    driver_waker: RefCell<Option<Waker>>,
    driver_scheduled: Cell<bool>,
    /// The runtime whose task drives the engine now, if any.
    driver_runtime: Cell<Option<tokio::runtime::Id>>,
    /// Bumped for each new driver task; an older one stops.
    driver_epoch: Cell<u64>,
    features: Cell<Features>,
    stats: Cell<Stats>,
    thread: ThreadId,
    /// Background tasks the driver polls.
    tasks: local::LocalTasks,
    /// Callbacks waiting for a tick ([`Reactor::at_tick`]): each tick's
    /// time and what runs then, on one timer per tick.
    ticks: RefCell<Vec<(Instant, Vec<TickCallback>)>>,
}

impl std::fmt::Debug for Reactor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reactor")
            .field("stats", &self.stats())
            .field("features", &self.features.get())
            .finish()
    }
}

/// The slot of a thread's reactor. On thread exit it drops the reactor's
/// background tasks first: a task may hold a session, which holds the
/// reactor, and the reactor would otherwise never be dropped.
struct CurrentSlot(RefCell<Option<Rc<Reactor>>>);

impl std::ops::Deref for CurrentSlot {
    type Target = RefCell<Option<Rc<Reactor>>>;
    fn deref(&self) -> &Self::Target {
        &self.0
    }
}

impl Drop for CurrentSlot {
    fn drop(&mut self) {
        if let Some(r) = self.0.get_mut().take() {
            r.tasks.clear();
        }
    }
}

thread_local! {
    static CURRENT: CurrentSlot = const { CurrentSlot(RefCell::new(None)) };
}

/// Creates this thread's reactor now (it is otherwise created on first use)
/// and reports what runs it. The engine is chosen by [`BACKEND_ENV`]: by
/// default io_uring, or the poll engine if the kernel refuses the ring.
///
/// Must be called inside a tokio current-thread runtime.
pub fn init() -> Result<Features, Error> {
    Reactor::current().map(|r| r.features())
}

/// Creates this thread's reactor on `backend`, or checks that the existing
/// one runs on it. Fails with [`Error::Kernel`] if io_uring is asked for
/// and the kernel cannot run it, and with [`Error::Runtime`] if the thread
/// already has a reactor on the other engine.
///
/// Must be called inside a tokio current-thread runtime.
pub fn init_with(backend: Backend) -> Result<Features, Error> {
    let r = Reactor::current_with(Choice::Only(backend))?;
    if r.features().backend != backend {
        return Err(Error::Runtime(RuntimeError::BackendMismatch {
            running: r.features().backend,
            asked: backend,
        }));
    }
    Ok(r.features())
}

/// Sets which local file calls of transfers this thread's reactor makes on
/// its ring (see [`LocalFiles`]): e.g. [`LocalFiles::All`] for a
/// destination on a network filesystem, where creating or renaming a file
/// waits on the network. Returns the mode in effect, which is
/// [`LocalFiles::Blocking`] where the engine cannot do better (the poll
/// engine, a kernel without the file opcodes).
///
/// Must be called inside a tokio current-thread runtime.
pub fn set_local_files(mode: LocalFiles) -> Result<LocalFiles, Error> {
    let r = Reactor::current()?;
    let f = r.features();
    let mode = if f.file_opcodes {
        mode
    } else {
        LocalFiles::Blocking
    };
    r.features.set(Features {
        local_files: mode,
        ..f
    });
    Ok(mode)
}

/// Counters of this thread's reactor, or `None` if the thread has none yet.
pub fn stats() -> Option<Stats> {
    CURRENT
        .try_with(|c| c.borrow().as_ref().map(|r| r.stats()))
        .ok()
        .flatten()
}

/// Runs `task` on the driver task of this thread's reactor, beside the
/// completions it handles (sharing that task's cooperative budget); public
/// only so that tests can load the driver. Not part of the API.
#[doc(hidden)]
pub fn spawn_on_driver(task: impl std::future::Future<Output = ()> + 'static) -> Result<(), Error> {
    Reactor::current()?.spawn_local(task);
    Ok(())
}

/// Performs a no-op and waits for its completion: one full trip through
/// the reactor.
pub async fn nop() -> Result<(), Error> {
    let reactor = Reactor::current()?;
    let op = reactor.start_op(OpKind::Nop, Resources::default());
    let done = op.await;
    done.result().map(drop).map_err(Error::Io)
}

impl Reactor {
    /// This thread's reactor, created on first use (engine from
    /// [`BACKEND_ENV`]), with a driver task on the current tokio runtime.
    pub(crate) fn current() -> Result<Rc<Reactor>, Error> {
        Self::current_with_env()
    }

    fn current_with_env() -> Result<Rc<Reactor>, Error> {
        if let Some(r) = Self::with_existing(|r| r.clone()) {
            r.ensure_driver(&current_thread_runtime()?)?;
            return Ok(r);
        }
        Self::current_with(Choice::from_env()?)
    }

    fn current_with(choice: Choice) -> Result<Rc<Reactor>, Error> {
        let handle = current_thread_runtime()?;
        let reactor = CURRENT.with(|c| -> Result<Rc<Reactor>, Error> {
            if let Some(r) = c.borrow().as_ref() {
                return Ok(r.clone());
            }
            let r = Rc::new(Reactor::new(choice)?);
            *c.borrow_mut() = Some(r.clone());
            Ok(r)
        })?;
        reactor.ensure_driver(&handle)?;
        Ok(reactor)
    }

    /// Runs `f` with this thread's reactor if it exists (used from Drop paths,
    /// which must never create a reactor or panic during thread teardown).
    pub(crate) fn with_existing<R>(f: impl FnOnce(&Rc<Reactor>) -> R) -> Option<R> {
        CURRENT
            .try_with(|c| c.try_borrow().ok().and_then(|c| c.as_ref().map(f)))
            .ok()
            .flatten()
    }

    fn new(choice: Choice) -> Result<Reactor, Error> {
        let (engine, features) = match choice {
            Choice::Only(Backend::Poll) => Self::poll_engine()?,
            Choice::Only(Backend::IoUring) => {
                let (ring, f) = ring::RingEngine::new()?;
                (AnyEngine::Ring(ring), f)
            }
            Choice::Auto => match ring::RingEngine::new() {
                Ok((ring, f)) => (AnyEngine::Ring(ring), f),
                Err(Error::Kernel(_)) => Self::poll_engine()?,
                Err(e) => return Err(e),
            },
        };
        Ok(Self::with_engine(engine, features))
    }

    fn with_engine(engine: AnyEngine, features: Features) -> Reactor {
        Reactor {
            engine,
            slots: RefCell::new(Slab::with_capacity(256)),
            next_generation: Cell::new(1),
            driver_waker: RefCell::new(None),
            driver_scheduled: Cell::new(false),
            driver_runtime: Cell::new(None),
            driver_epoch: Cell::new(0),
            features: Cell::new(features),
            stats: Cell::new(Stats::default()),
            thread: std::thread::current().id(),
            tasks: local::LocalTasks::default(),
            ticks: RefCell::new(Vec::new()),
        }
    }

    /// Makes this thread's reactor a ring in the first of `modes` the
    /// kernel accepts (tests of each task-work mode), entered through a
    /// registered ring fd if `register`, else by its fd. Fails if the
    /// thread already has a reactor.
    #[cfg(test)]
    pub(crate) fn install_ring_with(
        modes: &[TaskWork],
        register: bool,
    ) -> Result<Rc<Reactor>, Error> {
        let (ring, features) = ring::RingEngine::with_modes(modes, register)?;
        let r = Rc::new(Reactor::with_engine(AnyEngine::Ring(ring), features));
        CURRENT.with(|c| {
            let mut c = c.borrow_mut();
            if c.is_some() {
                return Err(Error::Runtime(RuntimeError::ReactorExists));
            }
            *c = Some(r.clone());
            Ok(())
        })?;
        r.ensure_driver(&current_thread_runtime()?)?;
        Ok(r)
    }

    fn poll_engine() -> Result<(AnyEngine, Features), Error> {
        let poll = poll::PollEngine::new().map_err(Error::Io)?;
        let features = Features {
            backend: Backend::Poll,
            cancel_by_fd: true,
            task_work: TaskWork::Signal,
            registered_ring: false,
            local_files: LocalFiles::Blocking,
            file_opcodes: false,
        };
        Ok((AnyEngine::Poll(poll), features))
    }

    /// What runs this reactor, and what it supports.
    pub fn features(&self) -> Features {
        self.features.get()
    }

    /// A snapshot of the counters.
    pub fn stats(&self) -> Stats {
        Stats {
            background_tasks: self.tasks.len() as u64,
            ..self.stats.get()
        }
    }

    pub(crate) fn bump(&self, f: impl FnOnce(&mut Stats)) {
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
        use std::os::fd::BorrowedFd;
        // The driver task may outlive this reactor (runtime and thread-local
        // teardown order is not ours to choose): give it a duplicate of the
        // engine's fd that it owns.
        // SAFETY: the engine's fd is open while `self` lives, which covers this call.
        let engine_fd = unsafe { BorrowedFd::borrow_raw(self.engine.raw_fd()) };
        let owned = engine_fd.try_clone_to_owned().map_err(Error::Io)?;
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
        self.tasks.set_driver(None);
        let _task = handle.spawn(Driver {
            fd,
            thread: self.thread,
            epoch,
        });
        Ok(())
    }

    /// Starts `kind`; a future awaits its result.
    pub(crate) fn start_op(self: &Rc<Self>, kind: OpKind, resources: Resources) -> Op {
        let id = self
            .engine
            .start(self, kind, resources, Lifecycle::Waiting(None), None);
        Op::new(self.clone(), id)
    }

    /// Starts `kind`; its completion runs `callback` on the driver task.
    pub(crate) fn start_with_callback(
        &self,
        kind: OpKind,
        resources: Resources,
        callback: Callback,
    ) -> OpId {
        self.engine
            .start(self, kind, resources, Lifecycle::Callback(callback), None)
    }

    /// Starts `kind`, cancelled by a linked timeout after `timeout`; its
    /// completion runs `callback` on the driver task.
    pub(crate) fn start_callback_with_timeout(
        &self,
        kind: OpKind,
        resources: Resources,
        callback: Callback,
        timeout: Duration,
    ) -> OpId {
        self.engine.start(
            self,
            kind,
            resources,
            Lifecycle::Callback(callback),
            Some(timeout),
        )
    }

    /// Starts `kind`; nobody waits, its resources are dropped on completion.
    pub(crate) fn start_detached(&self, kind: OpKind, resources: Resources) -> OpId {
        self.engine
            .start(self, kind, resources, Lifecycle::Detached, None)
    }

    /// Runs `callback` on the driver task soon (after a no-op's round trip,
    /// batched with everything else): work moved off a caller's path.
    pub(crate) fn run_soon(&self, callback: Callback) {
        self.start_with_callback(OpKind::Nop, Resources::default(), callback);
    }

    /// Runs `task` in the background on this thread: the driver task
    /// polls it whenever its waker is called, in whichever current-thread
    /// runtime drives the reactor, until it finishes. Tasks still running
    /// when the thread exits are dropped then.
    pub(crate) fn spawn_local(&self, task: impl std::future::Future<Output = ()> + 'static) {
        self.tasks.spawn(Box::pin(task));
        self.wake_driver();
    }

    /// Starts `kind`, cancelled if it has not completed within `timeout`
    /// (it then completes with `-ECANCELED`).
    pub(crate) fn start_op_with_timeout(
        self: &Rc<Self>,
        kind: OpKind,
        resources: Resources,
        timeout: Duration,
    ) -> Op {
        let id = self.engine.start(
            self,
            kind,
            resources,
            Lifecycle::Waiting(None),
            Some(timeout),
        );
        Op::new(self.clone(), id)
    }

    /// A standalone timer that runs `callback` when it fires (result
    /// `-ETIME`) or is cancelled (`-ECANCELED`).
    pub(crate) fn submit_timer(&self, after: Duration, callback: Callback) -> OpId {
        self.start_with_callback(OpKind::Timeout(after), Resources::default(), callback)
    }

    /// Runs `callback` on the driver task after between `wait / 2` and
    /// `wait`, together with the other callbacks due then, on one timer:
    /// many sessions waiting to batch their receives wake the thread once
    /// per tick, not once each. There is no cancel: a callback whose
    /// owner is gone does nothing (it holds a weak reference).
    pub(crate) fn at_tick(self: &Rc<Self>, wait: Duration, callback: TickCallback) {
        let now = Instant::now();
        let mut ticks = self.ticks.borrow_mut();
        let due = ticks
            .iter_mut()
            .find(|(at, _)| *at >= now + wait / 2 && *at <= now + wait);
        if let Some((_, callbacks)) = due {
            callbacks.push(callback);
            return;
        }
        let at = now + wait;
        ticks.push((at, vec![callback]));
        drop(ticks);
        let reactor = Rc::downgrade(self);
        self.submit_timer(
            wait,
            Box::new(move |_| {
                let Some(r) = reactor.upgrade() else {
                    return;
                };
                let callbacks = {
                    let mut ticks = r.ticks.borrow_mut();
                    match ticks.iter().position(|(t, _)| *t == at) {
                        Some(i) => ticks.swap_remove(i).1,
                        None => return,
                    }
                };
                let due = callbacks.len();
                // As `deliver` does: a panicking callback must not cost
                // the others their turn.
                let mut panic = None;
                for cb in callbacks {
                    if let Err(p) =
                        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| cb(due)))
                    {
                        panic.get_or_insert(p);
                    }
                }
                if let Some(p) = panic {
                    std::panic::resume_unwind(p);
                }
            }),
        );
    }

    /// Asks the engine to cancel every request on `fd`. Only where
    /// [`Features::cancel_by_fd`] holds.
    pub(crate) fn cancel_fd(&self, fd: &Rc<SharedFd>) {
        debug_assert!(self.features.get().cancel_by_fd);
        self.engine.cancel_fd(self, fd);
    }

    /// Closes `fd` (the last holder let go): through the ring, batched with
    /// everything else, or at once on the poll engine.
    pub(crate) fn close_fd(&self, fd: RawFd) {
        self.engine.close(self, fd);
    }

    /// Gives an op a slot in `slots` (the reactor's, borrowed by the
    /// caller) and counts it in flight: its id.
    fn new_op(&self, slots: &mut Slab<Slot>, lifecycle: Lifecycle, resources: Resources) -> OpId {
        let generation = self.next_generation.get();
        self.next_generation.set(generation.wrapping_add(1).max(1));
        let key = slots.insert(Slot {
            generation,
            lifecycle,
            resources,
        });
        self.bump(|s| s.ops_in_flight += 1);
        OpId(((generation as u64) << 32) | key as u64)
    }

    /// Queues one raw SQE whose result a future will await (ring engine;
    /// the reactor's own tests).
    #[cfg(test)]
    pub(crate) fn submit_op(self: &Rc<Self>, sqe: squeue::Entry, resources: Resources) -> Op {
        let AnyEngine::Ring(ring) = &self.engine else {
            unreachable!("SQEs on the poll engine");
        };
        let id = ring.push_ops(self, vec![(sqe, resources, Lifecycle::Waiting(None))])[0];
        Op::new(self.clone(), id)
    }

    fn wake_driver(&self) {
        if self.driver_runtime.get().is_some() {
            self.schedule_driver();
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

    /// One round of the engine: submits what is queued, takes what
    /// completed and delivers it. Returns how many completions it delivered.
    fn tick(&self) -> usize {
        let mut done = Vec::new();
        self.engine.tick(self, &mut done);
        let count = done.len();
        if count > 0 {
            self.deliver(done);
        }
        count
    }

    /// Hands results to their ops: wakes futures, drops the resources of
    /// detached and orphaned ops, runs callbacks.
    fn deliver(&self, done: Vec<(OpId, i32)>) {
        let mut callbacks: Vec<(Callback, Completion)> = Vec::new();
        let mut dead: Vec<Resources> = Vec::new();
        // Results nobody takes, with what to do about them.
        let mut unclaimed: Vec<(op::Unclaimed, i32)> = Vec::new();
        let mut wakers: Vec<Waker> = Vec::new();
        let mut finished = 0u64;
        let mut orphans_done = 0u64;
        // Ops whose linked timeout, cancel or pause came back without
        // having ended them: (op, that ender).
        let mut again: Vec<(OpId, Ender)> = Vec::new();
        {
            let mut slots = self.slots.borrow_mut();
            for (id, result) in done {
                let Some(slot) = slots.get_mut(id.key()) else {
                    continue;
                };
                if slot.generation != id.generation() {
                    continue;
                }
                match std::mem::replace(&mut slot.lifecycle, Lifecycle::Completed(result)) {
                    Lifecycle::Waiting(w) => wakers.extend(w),
                    Lifecycle::Completed(_) => {}
                    Lifecycle::Callback(cb) => {
                        finished += 1;
                        let slot = slots.remove(id.key());
                        callbacks.push((cb, Completion::new(result, slot.resources)));
                    }
                    Lifecycle::Detached => {
                        finished += 1;
                        let mut resources = slots.remove(id.key()).resources;
                        unclaimed.extend(resources.unclaimed.take().map(|f| (f, result)));
                        dead.push(resources);
                    }
                    Lifecycle::Orphaned => {
                        finished += 1;
                        orphans_done += 1;
                        let mut resources = slots.remove(id.key()).resources;
                        unclaimed.extend(resources.unclaimed.take().map(|f| (f, result)));
                        // Its owner is gone: the buffer serves the thread's
                        // next ops rather than going back to malloc.
                        buffers::keep(std::mem::take(&mut resources.buf));
                        dead.push(resources);
                    }
                    Lifecycle::Ends(op, ender) => {
                        finished += 1;
                        dead.push(slots.remove(id.key()).resources);
                        if ender.missed(result) {
                            again.push((op, ender));
                        }
                    }
                }
            }
            // Judged after the whole batch: the op's own completion may
            // come after its ender's.
            again.retain(|&(op, _)| {
                slots.get(op.key()).is_some_and(|s| {
                    s.generation == op.generation()
                        && !matches!(s.lifecycle, Lifecycle::Completed(_))
                })
            });
        }
        let missed = again.iter().filter(|(_, e)| *e != Ender::Pause).count() as u64;
        self.bump(|s| {
            s.cancels_missed += missed;
            s.orphaned_outstanding -= orphans_done;
            // Ops awaited by a future leave the slab when the future takes
            // the result; everything else is finished now.
            s.ops_in_flight -= finished;
        });
        // A missed linked timeout is followed by a cancel at once (by the
        // time its completion is reaped, the op's next try has been queued
        // where a cancel finds it), a missed cancel by a pause first.
        for (op, ender) in again {
            match ender {
                Ender::LinkTimeout | Ender::Pause => self.engine.cancel(self, op),
                Ender::Cancel => {
                    let pause = OpKind::Timeout(RECANCEL_PAUSE);
                    let ends = Lifecycle::Ends(op, Ender::Pause);
                    self.engine
                        .start(self, pause, Resources::default(), ends, None);
                }
            }
        }
        for w in wakers {
            w.wake();
        }
        drop(dead);
        for (f, result) in unclaimed {
            f(result);
        }
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
    }

    /// Polls a future-owned op: its result once the completion arrived.
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
        match &mut slot.lifecycle {
            Lifecycle::Completed(result) => {
                let result = *result;
                let slot = slots.remove(id.key());
                drop(slots);
                self.bump(|s| s.ops_in_flight -= 1);
                Poll::Ready(Completion::new(result, slot.resources))
            }
            Lifecycle::Waiting(w) => {
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
    /// let the reactor keep its resources until its own completion arrives.
    pub(crate) fn abandon(&self, id: OpId) {
        if self.orphan(id) {
            self.engine.cancel(self, id);
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
        match slot.lifecycle {
            Lifecycle::Completed(result) => {
                let mut slot = slots.remove(id.key());
                drop(slots);
                self.bump(|s| s.ops_in_flight -= 1);
                if let Some(f) = slot.resources.unclaimed.take() {
                    f(result);
                }
                drop(slot);
                false
            }
            Lifecycle::Waiting(_) | Lifecycle::Callback(_) => {
                let old = std::mem::replace(&mut slot.lifecycle, Lifecycle::Orphaned);
                drop(slots);
                drop(old);
                self.bump(|s| s.orphaned_outstanding += 1);
                true
            }
            Lifecycle::Detached | Lifecycle::Orphaned | Lifecycle::Ends(..) => false,
        }
    }
}

impl Drop for Reactor {
    fn drop(&mut self) {
        let leaked = self.engine.teardown(self.slots.get_mut(), &self.stats);
        GLOBAL_LEAKED_AT_TEARDOWN.fetch_add(leaked as u64, std::sync::atomic::Ordering::Relaxed);
    }
}

/// The current tokio runtime, if it is a current-thread one.
fn current_thread_runtime() -> Result<tokio::runtime::Handle, Error> {
    let handle = tokio::runtime::Handle::try_current()
        .map_err(|_| Error::Runtime(RuntimeError::NoRuntime))?;
    if handle.runtime_flavor() != tokio::runtime::RuntimeFlavor::CurrentThread {
        return Err(Error::Runtime(RuntimeError::MultiThread));
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

/// The task that submits, reaps and waits on the engine's fd.
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
        reactor.tasks.set_driver(Some(cx.waker()));
        for _ in 0..DRIVER_BUDGET {
            reactor.driver_scheduled.set(false);
            let delivered = reactor.tick();
            let polled = reactor.tasks.run_ready();
            if delivered > 0
                || polled > 0
                || reactor.driver_scheduled.get()
                || reactor.tasks.has_ready()
            {
                continue;
            }
            match self.fd.poll_read_ready(cx) {
                Poll::Ready(Ok(mut guard)) => {
                    guard.clear_ready();
                    reactor.engine.note_readable();
                }
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
                    r.tasks.set_driver(None);
                    // What was queued in this runtime's last tick (a drop's
                    // cancel, shutdown and close) still reaches the kernel.
                    r.engine.submit_now(r);
                }
            });
        }
    }
}
