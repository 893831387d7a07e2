//! Many TCP streams over loopback read by one thread, through epoll or
//! an io_uring: what each way of receiving costs that thread per GiB,
//! apart from SSH. The measurements behind `kernel-notes/io_uring.md`
//! ("Many streams without SSH").
//!
//! ```sh
//! cargo run --release --example many_streams -- --streams 1000 --mib 1 --rate 200 --rounds 7
//! ```
//!
//! The reading thread runs on core 0. Writer threads on core 1 write to
//! their streams in turn, `--burst` bytes at a time, on blocking sockets;
//! with `--rate` they keep to that many MB/s together, as servers slower
//! than the client do (without it they write as fast as they can).
//! Defaults: `--streams 1000 --mib 2 --burst 32768 --writers 4 --buf
//! 65536 --provided 1024 --rounds 3`, every mode. Modes (`--modes a,b`),
//! run in turn round by round:
//!
//! - `epoll`: non-blocking sockets in an edge-triggered epoll set; each
//!   ready socket is read with `recv(2)` until `EAGAIN`;
//! - `ring`: one RECV of `--buf` bytes in flight per stream into its own
//!   buffer, submitted again after each completion (what the reactor
//!   does), the thread waiting in `io_uring_enter`;
//! - `ring-via-epoll`: the same, the thread waiting in `epoll_wait` on the
//!   ring's fd, as the reactor does under tokio;
//! - `multishot`: one multishot RECV per stream, each completion in a
//!   buffer the kernel picks from a ring of `--provided` buffers shared by
//!   every stream; the buffers a wake-up's completions used go back to
//!   the kernel together before the next wait;
//! - `ring-defer`, `multishot-defer`: the two ring modes on a ring with
//!   deferred task work (`SINGLE_ISSUER | DEFER_TASKRUN`), which only a
//!   thread waiting in `io_uring_enter` can use.
//!
//! The other rings use cooperative task work (`COOP_TASKRUN |
//! TASKRUN_FLAG`), as the reactor does. Prints the reading thread's user
//! and system CPU seconds per GiB, MB/s and wake-ups per MiB (returns
//! from the wait, whether it slept or not), medians over the rounds.
//!
//! Any panic aborts the process: ring modes have receives in flight into
//! buffers that unwinding would free.

use io_uring::{IoUring, cqueue, opcode, types};
use std::io::Write;
use std::net::{TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU16, Ordering};
use std::time::{Duration, Instant};
use uring_ssh_testkit::util::{pin_this_thread, raise_nofile, thread_cpu};

const MODES: [&str; 6] = [
    "epoll",
    "ring",
    "ring-via-epoll",
    "multishot",
    "ring-defer",
    "multishot-defer",
];

/// Buffer group of the provided buffers.
const GROUP: u16 = 7;

struct Options {
    streams: usize,
    bytes: u64,
    burst: usize,
    writers: usize,
    buf: usize,
    provided: u16,
    /// MB/s of all writers together (0: as fast as they can).
    rate: f64,
}

struct Run {
    user: f64,
    sys: f64,
    secs: f64,
    wakeups: u64,
}

/// Connected pairs: the reader's ends and the writers' ends.
fn connect(n: usize) -> (Vec<TcpStream>, Vec<TcpStream>) {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr");
    let mut ours = Vec::with_capacity(n);
    let mut theirs = Vec::with_capacity(n);
    for _ in 0..n {
        ours.push(TcpStream::connect(addr).expect("connect"));
        theirs.push(listener.accept().expect("accept").0);
    }
    (ours, theirs)
}

fn start_writers(o: &Options, theirs: Vec<TcpStream>) -> Vec<std::thread::JoinHandle<()>> {
    let mut sets: Vec<Vec<TcpStream>> = (0..o.writers).map(|_| Vec::new()).collect();
    for (i, s) in theirs.into_iter().enumerate() {
        sets[i % o.writers].push(s);
    }
    let (bytes, burst) = (o.bytes, o.burst);
    // Each writer's share of the rate: the time one burst takes at it.
    let every = (o.rate > 0.0)
        .then(|| Duration::from_secs_f64(burst as f64 * o.writers as f64 / (o.rate * 1e6)));
    sets.into_iter()
        .map(|mut set| {
            std::thread::spawn(move || {
                pin_this_thread(1);
                let data = vec![0x5au8; burst];
                let mut left = bytes;
                let mut next = Instant::now();
                while left > 0 {
                    let n = (left as usize).min(burst);
                    for s in &mut set {
                        if let Some(every) = every {
                            next += every;
                            if let Some(d) = next.checked_duration_since(Instant::now()) {
                                std::thread::sleep(d);
                            }
                        }
                        s.write_all(&data[..n]).expect("writer");
                    }
                    left -= n as u64;
                }
            })
        })
        .collect()
}

fn run(mode: &str, o: &Options) -> Run {
    let (ours, theirs) = connect(o.streams);
    pin_this_thread(0);
    let writers = start_writers(o, theirs);
    let (u0, s0) = thread_cpu();
    let start = Instant::now();
    let wakeups = match mode {
        "epoll" => read_epoll(o, &ours),
        "ring" | "ring-defer" => read_ring(o, &ours, mode.ends_with("-defer"), false),
        "ring-via-epoll" => read_ring(o, &ours, false, true),
        _ => read_multishot(o, &ours, mode.ends_with("-defer")),
    };
    let secs = start.elapsed().as_secs_f64();
    let (u1, s1) = thread_cpu();
    for w in writers {
        w.join().expect("writer");
    }
    Run {
        user: (u1 - u0).as_secs_f64(),
        sys: (s1 - s0).as_secs_f64(),
        secs,
        wakeups,
    }
}

fn read_epoll(o: &Options, ours: &[TcpStream]) -> u64 {
    // SAFETY: takes no pointers.
    let ep = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
    assert!(ep >= 0, "epoll_create1");
    for (i, s) in ours.iter().enumerate() {
        s.set_nonblocking(true).expect("nonblocking");
        let mut ev = libc::epoll_event {
            events: (libc::EPOLLIN | libc::EPOLLET) as u32,
            u64: i as u64,
        };
        // SAFETY: `ev` is valid for the call; the fds are open.
        let r = unsafe { libc::epoll_ctl(ep, libc::EPOLL_CTL_ADD, s.as_raw_fd(), &mut ev) };
        assert_eq!(r, 0, "epoll_ctl");
    }
    let mut bufs: Vec<Vec<u8>> = (0..ours.len()).map(|_| vec![0u8; o.buf]).collect();
    let mut left: Vec<u64> = vec![o.bytes; ours.len()];
    let mut open = ours.len();
    let mut events = vec![libc::epoll_event { events: 0, u64: 0 }; 256];
    let mut wakeups = 0;
    while open > 0 {
        // SAFETY: `events` has room for the count passed.
        let n = unsafe { libc::epoll_wait(ep, events.as_mut_ptr(), events.len() as i32, -1) };
        if n < 0 {
            assert_eq!(
                std::io::Error::last_os_error().raw_os_error(),
                Some(libc::EINTR)
            );
            continue;
        }
        wakeups += 1;
        for ev in &events[..n as usize] {
            let i = ev.u64 as usize;
            // A finished stream's last edge (its writer closing) is not read.
            while left[i] > 0 {
                let b = &mut bufs[i];
                // SAFETY: `b` is writable for its length.
                let r =
                    unsafe { libc::recv(ours[i].as_raw_fd(), b.as_mut_ptr().cast(), b.len(), 0) };
                if r > 0 {
                    left[i] -= r as u64;
                    if left[i] == 0 {
                        open -= 1;
                    }
                } else {
                    let e = std::io::Error::last_os_error().raw_os_error();
                    assert!(r < 0 && e == Some(libc::EAGAIN), "recv: {r} {e:?}");
                    break;
                }
            }
        }
    }
    // SAFETY: our own epoll fd.
    unsafe { libc::close(ep) };
    wakeups
}

fn new_ring(o: &Options, defer: bool) -> IoUring {
    // Past 4,096 SQEs a full queue is submitted and refilled (`push`);
    // completions beyond the CQ wait in the kernel (`IORING_FEAT_NODROP`).
    let entries = o.streams.next_power_of_two().clamp(64, 4096) as u32;
    let mut b = IoUring::builder();
    if defer {
        b.setup_single_issuer().setup_defer_taskrun();
    } else {
        b.setup_coop_taskrun().setup_taskrun_flag();
    }
    b.setup_cqsize(4 * entries).build(entries).expect("ring")
}

/// Waits for at least one CQE; aborts if the ring fails, rather than
/// unwind past ops the kernel may still write into.
fn wait(ring: &IoUring) {
    loop {
        match ring.submit_and_wait(1) {
            Ok(_) => return,
            Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
            Err(e) => {
                eprintln!("io_uring_enter: {e}");
                std::process::abort();
            }
        }
    }
}

/// The ring failed: abort rather than unwind past ops the kernel may
/// still write into (their buffers would be freed on the way out).
fn or_abort<T>(r: std::io::Result<T>, what: &str) -> T {
    r.unwrap_or_else(|e| {
        eprintln!("{what}: {e}");
        std::process::abort()
    })
}

/// Queues `sqe`, submitting what is queued first if the queue is full.
///
/// # Safety
///
/// Every pointer in `sqe` (a buffer, the buffer ring) must stay valid
/// until the op's last CQE. The callers declare them before the ring and
/// reap every op before returning; a panic aborts (see `main`).
unsafe fn push(ring: &mut IoUring, sqe: &io_uring::squeue::Entry) {
    // SAFETY: the caller keeps the SQE's pointers valid (see above).
    while unsafe { ring.submission().push(sqe) }.is_err() {
        or_abort(ring.submit(), "io_uring_enter");
    }
}

/// With `via_epoll`, the thread sleeps in `epoll_wait` on the ring's fd,
/// as under a tokio runtime, and enters the ring only to submit and to
/// run task work the ring's flags announce.
fn read_ring(o: &Options, ours: &[TcpStream], defer: bool, via_epoll: bool) -> u64 {
    // Declared before the ring: dropped after it.
    let mut bufs: Vec<Vec<u8>> = (0..ours.len()).map(|_| vec![0u8; o.buf]).collect();
    let mut ring = new_ring(o, defer);
    let mut left: Vec<u64> = vec![o.bytes; ours.len()];
    let recv = |bufs: &mut Vec<Vec<u8>>, i: usize| {
        let b = &mut bufs[i];
        opcode::Recv::new(
            types::Fd(ours[i].as_raw_fd()),
            b.as_mut_ptr(),
            b.len() as u32,
        )
        .build()
        .user_data(i as u64)
    };
    for i in 0..ours.len() {
        let sqe = recv(&mut bufs, i);
        // SAFETY: `bufs` is declared before the ring and never resized;
        // no buffer with a receive in flight is accessed, and every
        // receive is reaped below.
        unsafe { push(&mut ring, &sqe) };
    }
    let waiter = via_epoll.then(|| EpollWaiter::new(ring.as_raw_fd()));
    let mut open = ours.len();
    let mut wakeups = 0;
    let mut done = Vec::new();
    while open > 0 {
        match &waiter {
            Some(w) => w.wait(&mut ring),
            None => wait(&ring),
        }
        wakeups += 1;
        done.extend(
            ring.completion()
                .map(|c| (c.user_data() as usize, c.result())),
        );
        for (i, r) in done.drain(..) {
            assert!(r > 0, "recv: {r}");
            left[i] -= r as u64;
            if left[i] == 0 {
                open -= 1;
            } else {
                let sqe = recv(&mut bufs, i);
                // SAFETY: as above; stream `i` has no receive in flight.
                unsafe { push(&mut ring, &sqe) };
            }
        }
    }
    wakeups
}

/// Sleeps in `epoll_wait` on a ring's fd, as the reactor does under tokio.
struct EpollWaiter {
    ep: i32,
}

impl EpollWaiter {
    fn new(ring_fd: i32) -> EpollWaiter {
        // SAFETY: takes no pointers.
        let ep = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        assert!(ep >= 0, "epoll_create1");
        let mut ev = libc::epoll_event {
            events: libc::EPOLLIN as u32,
            u64: 0,
        };
        // SAFETY: `ev` is valid for the call; the ring outlives the waiter.
        let r = unsafe { libc::epoll_ctl(ep, libc::EPOLL_CTL_ADD, ring_fd, &mut ev) };
        assert_eq!(r, 0, "epoll_ctl");
        EpollWaiter { ep }
    }

    /// Submits what is queued, sleeps until the ring's fd is readable (an
    /// `EINTR` from task work run on the way out counts as a wake-up too),
    /// then enters again only if the ring says task work is pending.
    fn wait(&self, ring: &mut IoUring) {
        or_abort(ring.submit(), "io_uring_enter");
        let mut ev = libc::epoll_event { events: 0, u64: 0 };
        loop {
            if !ring.completion().is_empty() {
                return;
            }
            // SAFETY: `ev` has room for one event.
            let n = unsafe { libc::epoll_wait(self.ep, &mut ev, 1, -1) };
            if n < 0 {
                let e = std::io::Error::last_os_error().raw_os_error();
                assert_eq!(e, Some(libc::EINTR), "epoll_wait");
            }
            if ring.submission().taskrun() {
                // SAFETY: no SQE is pushed here; GETEVENTS only.
                let r = unsafe { ring.submitter().enter::<libc::sigset_t>(0, 0, 1, None) };
                if !matches!(&r, Err(e) if e.raw_os_error() == Some(libc::EINTR)) {
                    or_abort(r, "io_uring_enter");
                }
            }
        }
    }
}

impl Drop for EpollWaiter {
    fn drop(&mut self) {
        // SAFETY: our own epoll fd.
        unsafe { libc::close(self.ep) };
    }
}

/// A ring of provided buffers (`struct io_uring_buf` entries, the tail in
/// the first entry's last two bytes) and the memory they point at.
struct BufRing {
    entries: *mut u8,
    map_len: usize,
    mask: u16,
    tail: u16,
    data: Vec<u8>,
    size: usize,
}

impl BufRing {
    fn new(count: u16, size: usize) -> BufRing {
        assert!(count.is_power_of_two(), "--provided must be a power of two");
        let map_len = count as usize * 16;
        // SAFETY: an anonymous private mapping, owned by the BufRing.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                map_len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        assert_ne!(p, libc::MAP_FAILED, "mmap");
        let mut r = BufRing {
            entries: p.cast(),
            map_len,
            mask: count - 1,
            tail: 0,
            data: vec![0u8; count as usize * size],
            size,
        };
        for bid in 0..count {
            r.put(bid);
        }
        r.publish();
        r
    }

    /// Queues buffer `bid` for the kernel (seen once published).
    fn put(&mut self, bid: u16) {
        let slot = (self.tail & self.mask) as usize;
        let addr = self.data.as_ptr() as u64 + bid as u64 * self.size as u64;
        // SAFETY: `slot` is within the mapping; the kernel reads an entry
        // only below the published tail, which this one is not yet.
        unsafe {
            let e = self.entries.add(slot * 16);
            (e as *mut u64).write(addr);
            (e.add(8) as *mut u32).write(self.size as u32);
            (e.add(12) as *mut u16).write(bid);
        }
        self.tail = self.tail.wrapping_add(1);
    }

    fn publish(&self) {
        // SAFETY: the tail is the u16 at offset 14 of the mapping, shared
        // with the kernel, which reads it with acquire ordering.
        let tail = unsafe { &*(self.entries.add(14) as *const AtomicU16) };
        tail.store(self.tail, Ordering::Release);
    }
}

impl Drop for BufRing {
    fn drop(&mut self) {
        // SAFETY: our own mapping; the ring that used it is gone.
        unsafe { libc::munmap(self.entries.cast(), self.map_len) };
    }
}

fn read_multishot(o: &Options, ours: &[TcpStream], defer: bool) -> u64 {
    // Declared before the ring: dropped after it.
    let mut provided = BufRing::new(o.provided, o.buf);
    let mut ring = new_ring(o, defer);
    // SAFETY: the mapping outlives the ring (declared before it).
    unsafe {
        ring.submitter()
            .register_buf_ring_with_flags(provided.entries as u64, o.provided, GROUP, 0)
            .expect("register_buf_ring (6.0+)");
    }
    let arm = |i: usize| {
        opcode::RecvMulti::new(types::Fd(ours[i].as_raw_fd()), GROUP)
            .build()
            .user_data(i as u64)
    };
    for i in 0..ours.len() {
        // SAFETY: no pointer in the SQE; the buffer ring it draws from is
        // declared before the ring, and every multishot ends (cancelled
        // and reaped) before this function returns.
        unsafe { push(&mut ring, &arm(i)) };
    }
    let mut left: Vec<u64> = vec![o.bytes; ours.len()];
    let mut open = ours.len();
    let mut wakeups = 0;
    let mut done = Vec::new();
    let mut armed = vec![true; ours.len()];
    while open > 0 {
        wait(&ring);
        wakeups += 1;
        done.extend(
            ring.completion()
                .map(|c| (c.user_data() as usize, c.result(), c.flags())),
        );
        for (i, r, flags) in done.drain(..) {
            if let Some(bid) = cqueue::buffer_select(flags) {
                provided.put(bid);
            }
            if !cqueue::more(flags) {
                armed[i] = false;
            }
            if r > 0 {
                left[i] -= r as u64;
                if left[i] == 0 {
                    open -= 1;
                }
            } else if r == 0 {
                // The writer closed after its last byte.
                assert_eq!(left[i], 0, "stream {i} ended early");
            } else {
                // Out of buffers: the stream's multishot ended; armed again below.
                assert_eq!(r, -libc::ENOBUFS, "recv multishot: {r}");
            }
        }
        provided.publish();
        for i in 0..ours.len() {
            if !armed[i] && left[i] > 0 {
                armed[i] = true;
                // SAFETY: as above.
                unsafe { push(&mut ring, &arm(i)) };
            }
        }
    }
    // Every stream has ended: cancel the multishots still armed and reap
    // them before the buffers go.
    for i in (0..ours.len()).filter(|&i| armed[i]) {
        let cancel = opcode::AsyncCancel::new(i as u64)
            .build()
            .user_data(u64::MAX);
        // SAFETY: a cancel points at nothing.
        unsafe { push(&mut ring, &cancel) };
    }
    let mut pending = armed.iter().filter(|&&a| a).count();
    while pending > 0 {
        wait(&ring);
        for c in ring.completion() {
            if c.user_data() != u64::MAX && !cqueue::more(c.flags()) {
                pending -= 1;
            }
        }
    }
    wakeups
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    let mut o = Options {
        streams: 1000,
        bytes: 2 << 20,
        burst: 32 * 1024,
        writers: 4,
        buf: 64 * 1024,
        provided: 1024,
        rate: 0.0,
    };
    let mut rounds = 3usize;
    let mut modes: Vec<String> = MODES.iter().map(|m| m.to_string()).collect();
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut val = || args.next().unwrap_or_else(|| panic!("{a} needs a value"));
        match a.as_str() {
            "--streams" => o.streams = val().parse().expect("--streams"),
            "--mib" => o.bytes = (val().parse::<f64>().expect("--mib") * (1 << 20) as f64) as u64,
            "--burst" => o.burst = val().parse().expect("--burst"),
            "--writers" => o.writers = val().parse().expect("--writers"),
            "--buf" => o.buf = val().parse().expect("--buf"),
            "--provided" => o.provided = val().parse().expect("--provided"),
            "--rate" => o.rate = val().parse().expect("--rate"),
            "--rounds" => rounds = val().parse().expect("--rounds"),
            "--modes" => modes = val().split(',').map(str::to_string).collect(),
            _ => panic!(
                "unknown argument {a}: --streams N --mib M --burst B --writers W --buf B \
                 --provided N --rate MBPS --rounds R --modes a,b"
            ),
        }
    }
    // A ring mode that panics has receives in flight into buffers that
    // unwinding would free: end the process instead.
    let report = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        report(info);
        std::process::abort();
    }));
    assert!(
        o.streams > 0 && o.writers > 0 && rounds > 0,
        "counts must be at least 1"
    );
    assert!(
        o.rate >= 0.0 && o.rate.is_finite(),
        "--rate must be 0 or more MB/s"
    );
    assert!(
        // Every u16 power of two is a valid buffer ring size (up to 32768).
        o.provided.is_power_of_two(),
        "--provided must be a power of two up to 32768"
    );
    assert!(o.buf <= 1 << 30, "--buf must be at most 1 GiB");
    // Two sockets per stream, plus a few.
    let need = 2 * o.streams as u64 + 32;
    let nofile = raise_nofile();
    assert!(
        nofile >= need,
        "{} streams need {need} open files; the limit is {nofile}",
        o.streams
    );
    assert!(
        o.bytes > 0 && o.burst > 0 && o.buf > 0,
        "sizes must be at least 1"
    );
    for m in &modes {
        assert!(MODES.contains(&m.as_str()), "unknown mode {m}: {MODES:?}");
    }
    let total = o.bytes * o.streams as u64;
    let per_gib = (1u64 << 30) as f64 / total as f64;
    let mib = total as f64 / (1 << 20) as f64;
    let mut results: Vec<Vec<Run>> = modes.iter().map(|_| Vec::new()).collect();
    for _ in 0..rounds {
        for (i, m) in modes.iter().enumerate() {
            results[i].push(run(m, &o));
        }
    }
    println!("mode             user s/GiB  sys s/GiB  cpu s/GiB     MB/s  wake-ups/MiB");
    for (m, runs) in modes.iter().zip(results) {
        let user = median(runs.iter().map(|r| r.user * per_gib).collect());
        let sys = median(runs.iter().map(|r| r.sys * per_gib).collect());
        let cpu = median(runs.iter().map(|r| (r.user + r.sys) * per_gib).collect());
        let mbs = median(runs.iter().map(|r| total as f64 / r.secs / 1e6).collect());
        let wakes = median(runs.iter().map(|r| r.wakeups as f64 / mib).collect());
        println!("{m:<16} {user:>10.3} {sys:>10.3} {cpu:>10.3} {mbs:>8.0} {wakes:>13.1}");
    }
}
