//! The readiness engine: the same operations as the ring, performed with
//! plain non-blocking socket calls when an epoll instance of our own says a
//! socket is ready. It is the fallback where io_uring is forbidden or too
//! old (Docker's default seccomp profile, `kernel.io_uring_disabled`).
//!
//! Like the ring, it completes operations in the driver task's tick: an op
//! only queues work and wakes the driver, so the calls of a tick are made
//! together and completions run where the ring's run. Sockets are
//! registered edge-triggered once, at their first op; a socket is assumed
//! ready until a call says `EAGAIN`. Timers live in one `timerfd` in the
//! same epoll set, so the driver waits on one fd whichever engine runs.

use std::cell::{Cell, RefCell};
use std::collections::{BTreeMap, HashMap};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::rc::Rc;
use std::time::{Duration, Instant};

use slab::Slab;

use super::{Engine, Lifecycle, OpId, OpKind, Reactor, Resources, SharedFd, Slot, Stats};

/// epoll `data` of the timerfd (sockets use their fd number).
const TIMER_TOKEN: u64 = u64::MAX;

/// Events taken per `epoll_wait`.
const EVENTS_PER_WAIT: usize = 256;

/// What a deadline does when it passes.
#[derive(Clone, Copy)]
enum Expiry {
    /// A timer op: completes with `-ETIME`.
    Fire,
    /// A connect's timeout: the connect completes with `-ECANCELED`.
    CancelConnect(RawFd),
}

/// What an op waits for, so that a cancel can find it.
#[derive(Clone, Copy)]
enum WaitsOn {
    Socket(RawFd),
    Timer((Instant, u64)),
}

#[derive(Default)]
struct Socket {
    readable: bool,
    writable: bool,
    /// Listed in `runnable`.
    queued: bool,
    connect: Option<(OpId, Option<(Instant, u64)>)>,
    /// The send op and the bytes of it sent so far.
    send: Option<(OpId, usize)>,
    /// The recv op, its length, and whether it is a [`OpKind::RecvNow`]
    /// (which ends with `-EAGAIN` rather than wait for the socket).
    recv: Option<(OpId, usize, bool)>,
}

/// The epoll set, the sockets in it, the timers, and results waiting for
/// the next tick.
pub(super) struct PollEngine {
    epoll: OwnedFd,
    timerfd: OwnedFd,
    sockets: RefCell<HashMap<RawFd, Socket>>,
    runnable: RefCell<Vec<RawFd>>,
    ready: RefCell<Vec<(OpId, i32)>>,
    timers: RefCell<BTreeMap<(Instant, u64), (OpId, Expiry)>>,
    waiting: RefCell<HashMap<u64, WaitsOn>>,
    /// The deadline the timerfd is set to.
    armed: Cell<Option<Instant>>,
    next_seq: Cell<u64>,
    /// The driver saw the epoll fd readable: events are waiting.
    events_pending: Cell<bool>,
    /// System calls made (added to the reactor's stats each tick).
    syscalls: Cell<u64>,
}

fn errno() -> i32 {
    std::io::Error::last_os_error()
        .raw_os_error()
        .unwrap_or(libc::EIO)
}

impl PollEngine {
    pub(super) fn new() -> std::io::Result<PollEngine> {
        // SAFETY: plain syscalls creating descriptors that are owned at once.
        let (epoll, timerfd) = unsafe {
            let ep = libc::epoll_create1(libc::EPOLL_CLOEXEC);
            if ep < 0 {
                return Err(std::io::Error::last_os_error());
            }
            let epoll = OwnedFd::from_raw_fd(ep);
            let tf = libc::timerfd_create(
                libc::CLOCK_MONOTONIC,
                libc::TFD_NONBLOCK | libc::TFD_CLOEXEC,
            );
            if tf < 0 {
                return Err(std::io::Error::last_os_error());
            }
            (epoll, OwnedFd::from_raw_fd(tf))
        };
        let poll = PollEngine {
            epoll,
            timerfd,
            sockets: RefCell::new(HashMap::new()),
            runnable: RefCell::new(Vec::new()),
            ready: RefCell::new(Vec::new()),
            timers: RefCell::new(BTreeMap::new()),
            waiting: RefCell::new(HashMap::new()),
            armed: Cell::new(None),
            next_seq: Cell::new(0),
            events_pending: Cell::new(true),
            syscalls: Cell::new(0),
        };
        poll.epoll_add(poll.timerfd.as_raw_fd(), libc::EPOLLIN as u32, TIMER_TOKEN)?;
        Ok(poll)
    }

    fn count_syscalls(&self, n: u64) {
        self.syscalls.set(self.syscalls.get() + n);
    }

    fn epoll_add(&self, fd: RawFd, events: u32, token: u64) -> std::io::Result<()> {
        let mut ev = libc::epoll_event { events, u64: token };
        self.count_syscalls(1);
        // SAFETY: `ev` is a valid epoll_event for the duration of the call.
        if unsafe { libc::epoll_ctl(self.epoll.as_raw_fd(), libc::EPOLL_CTL_ADD, fd, &mut ev) } < 0
        {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    }

    /// Registers `fd` (non-blocking, edge-triggered) on its first op.
    /// Returns an errno if that fails.
    fn register(&self, fd: RawFd) -> Result<(), i32> {
        if self.sockets.borrow().contains_key(&fd) {
            return Ok(());
        }
        let on: libc::c_int = 1;
        self.count_syscalls(1);
        // SAFETY: FIONBIO reads one int from the pointer, valid for the call.
        if unsafe { libc::ioctl(fd, libc::FIONBIO, &on) } < 0 {
            return Err(errno());
        }
        let events = (libc::EPOLLIN | libc::EPOLLOUT | libc::EPOLLRDHUP | libc::EPOLLET) as u32;
        self.epoll_add(fd, events, fd as u64)
            .map_err(|e| e.raw_os_error().unwrap_or(libc::EIO))?;
        self.sockets.borrow_mut().insert(
            fd,
            Socket {
                readable: true,
                writable: true,
                ..Socket::default()
            },
        );
        Ok(())
    }

    fn mark_runnable(&self, fd: RawFd) {
        let mut sockets = self.sockets.borrow_mut();
        if let Some(s) = sockets.get_mut(&fd)
            && !s.queued
        {
            s.queued = true;
            self.runnable.borrow_mut().push(fd);
        }
    }

    fn add_timer(&self, at: Instant, id: OpId, expiry: Expiry) -> (Instant, u64) {
        let seq = self.next_seq.get();
        self.next_seq.set(seq + 1);
        self.timers.borrow_mut().insert((at, seq), (id, expiry));
        (at, seq)
    }

    /// Starts `kind` for op `id`. Work that needs a ready socket or a
    /// passing deadline waits; results are delivered by a tick.
    fn begin(&self, id: OpId, kind: OpKind, res: &Resources, timeout: Option<Duration>) {
        let fd = res.fd.as_ref().map_or(-1, |f| f.raw());
        let ready = |r: i32| self.ready.borrow_mut().push((id, r));
        match kind {
            OpKind::Nop => ready(0),
            OpKind::Timeout(after) => {
                let key = self.add_timer(Instant::now() + after, id, Expiry::Fire);
                self.waiting.borrow_mut().insert(id.0, WaitsOn::Timer(key));
            }
            OpKind::Shutdown(how) => {
                self.count_syscalls(1);
                // SAFETY: `fd` is kept open by the op's resources.
                let r = unsafe { libc::shutdown(fd, how) };
                ready(if r < 0 { -errno() } else { 0 });
            }
            OpKind::Close(raw) => {
                self.close_now(raw);
                ready(0);
            }
            OpKind::OpenAt { .. } | OpKind::Write { .. } | OpKind::RenameAt | OpKind::Fsync => {
                self.count_syscalls(1);
                ready(super::files::perform(kind, res));
            }
            OpKind::Send
            | OpKind::Recv(_)
            | OpKind::RecvAll(_)
            | OpKind::RecvNow(_)
            | OpKind::Connect => {
                if let Err(e) = self.register(fd) {
                    ready(-e);
                    return;
                }
                if let OpKind::Connect = kind {
                    match self.connect_call(fd, res) {
                        Some(r) => ready(r),
                        None => {
                            let deadline = timeout.map(|t| {
                                self.add_timer(Instant::now() + t, id, Expiry::CancelConnect(fd))
                            });
                            let mut sockets = self.sockets.borrow_mut();
                            let s = sockets.get_mut(&fd).expect("registered");
                            s.writable = false;
                            s.connect = Some((id, deadline));
                            self.waiting.borrow_mut().insert(id.0, WaitsOn::Socket(fd));
                        }
                    }
                    return;
                }
                {
                    let mut sockets = self.sockets.borrow_mut();
                    let s = sockets.get_mut(&fd).expect("registered");
                    match kind {
                        OpKind::Send => s.send = Some((id, 0)),
                        OpKind::Recv(len) | OpKind::RecvAll(len) => s.recv = Some((id, len, false)),
                        OpKind::RecvNow(len) => s.recv = Some((id, len, true)),
                        _ => unreachable!(),
                    }
                }
                self.waiting.borrow_mut().insert(id.0, WaitsOn::Socket(fd));
                self.mark_runnable(fd);
            }
        }
    }

    /// One `connect(2)`: `Some(result)` once it finished (0 or -errno),
    /// `None` while it is in progress.
    fn connect_call(&self, fd: RawFd, res: &Resources) -> Option<i32> {
        let Some(addr) = res.addr.as_ref() else {
            return Some(-libc::EINVAL);
        };
        self.count_syscalls(1);
        // SAFETY: `addr` holds a socket address of length `addr.1`, alive
        // for the call; `fd` is kept open by the op's resources.
        let r = unsafe {
            libc::connect(
                fd,
                &addr.0 as *const libc::sockaddr_storage as *const libc::sockaddr,
                addr.1,
            )
        };
        if r == 0 {
            return Some(0);
        }
        match errno() {
            libc::EINPROGRESS | libc::EALREADY | libc::EINTR => None,
            // A second call on a socket whose connect finished.
            libc::EISCONN => Some(0),
            e => Some(-e),
        }
    }

    /// Cancels op `id` if it still waits; it completes with `-ECANCELED`
    /// at the next tick. Returns whether it was waiting.
    fn cancel_op(&self, id: OpId) -> bool {
        let Some(place) = self.waiting.borrow_mut().remove(&id.0) else {
            return false;
        };
        match place {
            WaitsOn::Timer(key) => {
                self.timers.borrow_mut().remove(&key);
            }
            WaitsOn::Socket(fd) => {
                let mut sockets = self.sockets.borrow_mut();
                if let Some(s) = sockets.get_mut(&fd) {
                    if s.send.is_some_and(|(op, _)| op == id) {
                        s.send = None;
                    }
                    if s.recv.is_some_and(|(op, _, _)| op == id) {
                        s.recv = None;
                    }
                    if let Some((op, deadline)) = s.connect
                        && op == id
                    {
                        s.connect = None;
                        if let Some(key) = deadline {
                            self.timers.borrow_mut().remove(&key);
                        }
                    }
                }
            }
        }
        self.ready.borrow_mut().push((id, -libc::ECANCELED));
        true
    }

    /// Cancels every op waiting on `fd`.
    fn cancel_ops_on(&self, fd: RawFd) {
        let ids: Vec<OpId> = {
            let sockets = self.sockets.borrow();
            let Some(s) = sockets.get(&fd) else {
                return;
            };
            s.connect
                .map(|(id, _)| id)
                .into_iter()
                .chain(s.send.map(|(id, _)| id))
                .chain(s.recv.map(|(id, _, _)| id))
                .collect()
        };
        for id in ids {
            self.cancel_op(id);
        }
    }

    /// Closes `fd` now (closing removes it from the epoll set).
    fn close_now(&self, fd: RawFd) {
        let removed = self.sockets.borrow_mut().remove(&fd);
        debug_assert!(
            removed.is_none_or(|s| s.send.is_none() && s.recv.is_none() && s.connect.is_none()),
            "closing a socket with ops waiting"
        );
        self.count_syscalls(1);
        // SAFETY: the caller owns `fd` and closes it exactly once, here.
        unsafe { libc::close(fd) };
    }

    fn take_events(&self) {
        // SAFETY: epoll_event is plain old data; all-zero is a valid value.
        let mut events: [libc::epoll_event; EVENTS_PER_WAIT] = unsafe { std::mem::zeroed() };
        loop {
            self.count_syscalls(1);
            // SAFETY: `events` has room for EVENTS_PER_WAIT entries; timeout 0.
            let n = unsafe {
                libc::epoll_wait(
                    self.epoll.as_raw_fd(),
                    events.as_mut_ptr(),
                    EVENTS_PER_WAIT as i32,
                    0,
                )
            };
            if n < 0 {
                if errno() == libc::EINTR {
                    continue;
                }
                return;
            }
            for ev in &events[..n as usize] {
                let (token, bits) = (ev.u64, ev.events);
                if token == TIMER_TOKEN {
                    let mut expirations = 0u64;
                    self.count_syscalls(1);
                    // SAFETY: reads 8 bytes into `expirations`; non-blocking.
                    unsafe {
                        libc::read(
                            self.timerfd.as_raw_fd(),
                            &mut expirations as *mut u64 as *mut libc::c_void,
                            8,
                        )
                    };
                    self.armed.set(None);
                    continue;
                }
                let fd = token as RawFd;
                let any_of = |mask: i32| bits & mask as u32 != 0;
                {
                    let mut sockets = self.sockets.borrow_mut();
                    let Some(s) = sockets.get_mut(&fd) else {
                        continue;
                    };
                    let gone = libc::EPOLLHUP | libc::EPOLLERR;
                    if any_of(libc::EPOLLIN | libc::EPOLLRDHUP | gone) {
                        s.readable = true;
                    }
                    if any_of(libc::EPOLLOUT | gone) {
                        s.writable = true;
                    }
                }
                self.mark_runnable(fd);
            }
            if (n as usize) < EVENTS_PER_WAIT {
                return;
            }
        }
    }

    fn fire_deadlines(&self, out: &mut Vec<(OpId, i32)>) {
        let now = Instant::now();
        loop {
            let entry = {
                let mut timers = self.timers.borrow_mut();
                match timers.first_key_value() {
                    Some((&key, _)) if key.0 <= now => timers.remove(&key).map(|v| (key, v)),
                    _ => None,
                }
            };
            let Some((_, (id, expiry))) = entry else {
                return;
            };
            self.waiting.borrow_mut().remove(&id.0);
            match expiry {
                Expiry::Fire => out.push((id, -libc::ETIME)),
                Expiry::CancelConnect(fd) => {
                    if let Some(s) = self.sockets.borrow_mut().get_mut(&fd) {
                        s.connect = None;
                    }
                    out.push((id, -libc::ECANCELED));
                }
            }
        }
    }

    /// Sets the timerfd to the earliest deadline, if that changed.
    fn rearm_timer(&self) {
        let first = self.timers.borrow().first_key_value().map(|(k, _)| k.0);
        if first == self.armed.get() {
            return;
        }
        self.armed.set(first);
        let after = first.map_or(Duration::ZERO, |at| {
            // Zero would disarm: a passed deadline fires in a nanosecond.
            at.saturating_duration_since(Instant::now())
                .max(Duration::from_nanos(1))
        });
        let spec = libc::itimerspec {
            it_interval: libc::timespec {
                tv_sec: 0,
                tv_nsec: 0,
            },
            it_value: libc::timespec {
                tv_sec: after.as_secs() as libc::time_t,
                tv_nsec: after.subsec_nanos() as libc::c_long,
            },
        };
        self.count_syscalls(1);
        // SAFETY: `spec` is valid for the call; the old value is not asked for.
        unsafe { libc::timerfd_settime(self.timerfd.as_raw_fd(), 0, &spec, std::ptr::null_mut()) };
    }

    /// Makes every call `fd`'s waiting ops can make now.
    fn run_socket(&self, fd: RawFd, slots: &RefCell<Slab<Slot>>, out: &mut Vec<(OpId, i32)>) {
        let mut sockets = self.sockets.borrow_mut();
        let Some(s) = sockets.get_mut(&fd) else {
            return;
        };
        s.queued = false;
        let mut slots = slots.borrow_mut();
        let mut finished = Vec::new();
        if let (true, Some((id, deadline))) = (s.writable, s.connect) {
            match slots
                .get(id.key())
                .map(|slot| self.connect_call(fd, &slot.resources))
            {
                None => s.connect = None,
                Some(None) => s.writable = false,
                Some(Some(r)) => {
                    s.connect = None;
                    if let Some(key) = deadline {
                        self.timers.borrow_mut().remove(&key);
                    }
                    finished.push((id, r));
                }
            }
        }
        while let (true, Some((id, sent))) = (s.writable, s.send) {
            let Some(slot) = slots.get(id.key()) else {
                s.send = None;
                break;
            };
            let rest = &slot.resources.buf[slot.resources.offset + sent..];
            if rest.is_empty() {
                s.send = None;
                finished.push((id, sent as i32));
                break;
            }
            self.count_syscalls(1);
            // SAFETY: `rest` is valid for reads of its length for the call.
            let n = unsafe {
                libc::send(
                    fd,
                    rest.as_ptr().cast(),
                    rest.len(),
                    libc::MSG_NOSIGNAL | libc::MSG_DONTWAIT,
                )
            };
            if n >= 0 {
                s.send = Some((id, sent + n as usize));
                continue;
            }
            match errno() {
                libc::EINTR => {}
                libc::EAGAIN => s.writable = false,
                e => {
                    s.send = None;
                    finished.push((id, -e));
                }
            }
        }
        while let (true, Some((id, len, _))) = (s.readable, s.recv) {
            let Some(slot) = slots.get_mut(id.key()) else {
                s.recv = None;
                break;
            };
            let buf = &mut slot.resources.buf[..len];
            self.count_syscalls(1);
            // SAFETY: `buf` is valid for writes of its length for the call.
            let n =
                unsafe { libc::recv(fd, buf.as_mut_ptr().cast(), buf.len(), libc::MSG_DONTWAIT) };
            if n >= 0 {
                s.recv = None;
                finished.push((id, n as i32));
                break;
            }
            match errno() {
                libc::EINTR => {}
                libc::EAGAIN => s.readable = false,
                e => {
                    s.recv = None;
                    finished.push((id, -e));
                }
            }
        }
        if let (false, Some((id, _, true))) = (s.readable, s.recv) {
            // Nothing to take now, and this receive does not wait.
            s.recv = None;
            finished.push((id, -libc::EAGAIN));
        }
        let mut waiting = self.waiting.borrow_mut();
        for (id, _) in &finished {
            waiting.remove(&id.0);
        }
        out.extend(finished);
    }
}

impl Engine for PollEngine {
    /// The epoll fd, which turns readable when a socket or the timer is ready.
    fn raw_fd(&self) -> RawFd {
        self.epoll.as_raw_fd()
    }

    fn start(
        &self,
        reactor: &Reactor,
        kind: OpKind,
        resources: Resources,
        lifecycle: Lifecycle,
        timeout: Option<Duration>,
    ) -> OpId {
        let id = reactor.new_op(&mut reactor.slots.borrow_mut(), lifecycle, resources);
        self.begin(
            id,
            kind,
            &reactor.slots.borrow()[id.key()].resources,
            timeout,
        );
        reactor.wake_driver();
        id
    }

    fn cancel(&self, reactor: &Reactor, id: OpId) {
        self.cancel_op(id);
        reactor.wake_driver();
    }

    fn cancel_fd(&self, reactor: &Reactor, fd: &Rc<SharedFd>) {
        self.cancel_ops_on(fd.raw());
        reactor.wake_driver();
    }

    fn close(&self, _: &Reactor, fd: RawFd) {
        // At once: the engine holds no request on it that a later close
        // would have to wait for.
        self.close_now(fd);
    }

    /// Gathers ready events, runs the calls of every socket that can make
    /// progress and fires passed deadlines; the system calls made go into
    /// the reactor's counters.
    fn tick(&self, reactor: &Reactor, done: &mut Vec<(OpId, i32)>) {
        done.append(&mut self.ready.borrow_mut());
        if self.events_pending.replace(false) {
            self.take_events();
        }
        self.fire_deadlines(done);
        let runnable = std::mem::take(&mut *self.runnable.borrow_mut());
        for fd in runnable {
            self.run_socket(fd, &reactor.slots, done);
        }
        self.rearm_timer();
        let syscalls = self.syscalls.replace(0);
        reactor.bump(|s| s.syscalls += syscalls);
    }

    fn note_readable(&self) {
        self.events_pending.set(true);
    }

    fn submit_now(&self, _: &Reactor) {
        // Nothing waits for the kernel: the engine makes its calls in ticks.
    }

    fn teardown(&self, _: &mut Slab<Slot>, _: &Cell<Stats>) -> usize {
        // Nothing of the poll engine is in the kernel's hands: the slots'
        // buffers and fds go with the reactor.
        0
    }
}
