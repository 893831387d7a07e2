//! Helpers shared by the integration tests, benches and examples: a
//! connected session, a fast deterministic byte generator, hashing, leak
//! probes, waits for a condition under a deadline, and for measurements
//! pinning a thread to a core, a thread's CPU time and the open-file
//! limit.

use std::time::Duration;

use sha2::{Digest, Sha256};
use uring_ssh::{Config, Session, SessionStats};

use crate::sshd::Sshd;

/// One test at a time, within the test binary that takes this guard: for
/// tests that read process-wide counters (libssh2 bytes, fds).
pub fn serial() -> std::sync::MutexGuard<'static, ()> {
    static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());
    SERIAL.lock().unwrap_or_else(|p| p.into_inner())
}

/// A current-thread tokio runtime with IO and timers, as the reactor needs.
pub fn current_thread_runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
}

/// Waits, bounded, until this process has at most `baseline` fds open
/// (another test's thread may still be closing its reactor's), then
/// asserts it, naming what is open if not.
pub fn assert_fds_back_to(baseline: usize) {
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    let now = loop {
        let now = open_fds();
        if now <= baseline || std::time::Instant::now() > deadline {
            break now;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let open: Vec<String> = std::fs::read_dir("/proc/self/fd")
        .map(|d| {
            d.flatten()
                .map(|e| format!("{:?}", std::fs::read_link(e.path()).ok()))
                .collect()
        })
        .unwrap_or_default();
    assert!(
        now <= baseline,
        "fds: {now} open, {baseline} at the baseline: {open:?}"
    );
}

/// The fds this process holds once what lives for the whole process (the
/// dummy fd libssh2 is handed at the first handshake) and this thread's
/// reactor exist: one session to `sshd` is opened, closed and settled
/// first, so a leak check against the count does not depend on which test
/// of a binary happens to handshake first.
pub async fn fd_baseline(sshd: &Sshd) -> usize {
    connect(sshd)
        .await
        .close("warm-up")
        .await
        .expect("warm-up close");
    let stats = settle(Duration::from_secs(10)).await;
    assert_eq!(
        stats.ops_in_flight, 0,
        "warm-up left IO in flight: {stats:?}"
    );
    open_fds()
}

/// What a session needs to log in to a fixture's sshd, all of it `Send`:
/// for tasks on pool threads, which cannot take the `Sshd` itself.
#[derive(Clone, Debug)]
pub struct Login {
    /// The server's address.
    pub addr: std::net::SocketAddr,
    /// The fixture's known_hosts.
    pub known_hosts: std::path::PathBuf,
    /// The user to log in as.
    pub user: String,
    /// The user's private key.
    pub key: std::path::PathBuf,
}

impl Login {
    /// The login of `sshd`'s user with its key.
    pub fn of(sshd: &Sshd) -> Login {
        Login {
            addr: sshd.addr(),
            known_hosts: sshd.known_hosts(),
            user: sshd.user(),
            key: sshd.user_key(),
        }
    }

    /// Strict host-key checking against the fixture's known_hosts.
    pub fn config(&self) -> Config {
        Config::new().known_hosts(Some(&self.known_hosts))
    }

    /// A session on this thread, connected and authenticated.
    pub async fn session(&self) -> Session {
        let s = Session::connect_addr(self.addr, self.config())
            .await
            .expect("connect");
        s.auth_pubkey_file(&self.user, &self.key, None)
            .await
            .expect("auth");
        s
    }
}

/// Strict host-key checking against the fixture's known_hosts.
pub fn config(sshd: &Sshd) -> Config {
    Config::new().known_hosts(Some(sshd.known_hosts()))
}

/// A session to `sshd`, authenticated with the fixture's user key.
pub async fn connect(sshd: &Sshd) -> Session {
    connect_with(sshd, config(sshd)).await
}

/// Like [`connect`] with a custom config.
pub async fn connect_with(sshd: &Sshd, config: Config) -> Session {
    let s = Session::connect_addr(sshd.addr(), config)
        .await
        .expect("connect + handshake");
    s.auth_pubkey_file(&sshd.user(), &sshd.user_key(), None)
        .await
        .expect("public-key auth");
    s
}

/// xorshift64*: deterministic, fast, good enough to make every byte matter.
pub struct Prng(u64);

impl Prng {
    /// A generator from a non-zero seed.
    pub fn new(seed: u64) -> Self {
        Prng(seed.max(1))
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// A number in `0..n`.
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n.max(1)
    }

    /// Fills `buf` with random bytes.
    pub fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            let v = self.next_u64().to_le_bytes();
            chunk.copy_from_slice(&v[..chunk.len()]);
        }
    }
}

/// Writes `len` pseudo-random bytes from `seed` to `path`; returns their SHA-256.
pub fn write_random_file(path: &std::path::Path, len: usize, seed: u64) -> String {
    use std::io::Write;
    let mut f = std::io::BufWriter::new(std::fs::File::create(path).expect("create file"));
    let mut rng = Prng::new(seed);
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut left = len;
    while left > 0 {
        let n = left.min(buf.len());
        rng.fill(&mut buf[..n]);
        h.update(&buf[..n]);
        f.write_all(&buf[..n]).expect("write file");
        left -= n;
    }
    f.flush().expect("flush file");
    hex(&h.finalize())
}

/// Reads `r` to its end: bytes read and their SHA-256 (hex).
pub async fn sha256_stream(mut r: impl tokio::io::AsyncRead + Unpin) -> (usize, String) {
    use tokio::io::AsyncReadExt;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut total = 0;
    loop {
        let n = r.read(&mut buf).await.expect("read");
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
        total += n;
    }
    (total, hex(&h.finalize()))
}

/// Writes `len` pseudo-random bytes from `seed` to `w`; returns their SHA-256.
pub async fn write_prng(
    mut w: impl tokio::io::AsyncWrite + Unpin,
    len: usize,
    seed: u64,
) -> String {
    use tokio::io::AsyncWriteExt;
    let mut rng = Prng::new(seed);
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut left = len;
    while left > 0 {
        let n = left.min(buf.len());
        rng.fill(&mut buf[..n]);
        h.update(&buf[..n]);
        w.write_all(&buf[..n]).await.expect("write");
        left -= n;
    }
    hex(&h.finalize())
}

/// SHA-256 of a file, hex.
pub fn sha256_file(path: &std::path::Path) -> String {
    use std::io::Read;
    let mut f = std::fs::File::open(path).expect("open file");
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).expect("read file");
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    hex(&h.finalize())
}

/// Lower-case hex.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Open file descriptors of this process.
pub fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd")
        .expect("/proc/self/fd")
        .count()
}

/// Waits (bounded) until the ring has reaped the completions of every op
/// whose owner is gone; returns the last counters.
pub async fn settle_orphans(limit: Duration) -> uring_ssh::reactor::Stats {
    settle_until(limit, |s| s.orphaned_outstanding == 0).await
}

/// Waits (bounded by `limit`) until the ring has nothing in flight and no
/// orphaned completion outstanding; returns the last counters. Panics on
/// a thread without a ring.
pub async fn settle(limit: Duration) -> uring_ssh::reactor::Stats {
    settle_until(limit, |s| {
        s.ops_in_flight == 0 && s.orphaned_outstanding == 0
    })
    .await
}

/// Polls this thread's reactor counters until `done` holds or `limit` passes.
async fn settle_until(
    limit: Duration,
    done: impl Fn(&uring_ssh::reactor::Stats) -> bool,
) -> uring_ssh::reactor::Stats {
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        let s = uring_ssh::reactor::stats().expect("this thread has a ring");
        if done(&s) || tokio::time::Instant::now() >= deadline {
            return s;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Polls `cond` every few milliseconds until it holds, letting the
/// runtime's other tasks (the sessions' drivers) run in between; panics
/// naming `what` if it still does not hold after `limit`. Returns how long
/// it took.
pub async fn wait_until(limit: Duration, what: &str, mut cond: impl FnMut() -> bool) -> Duration {
    let start = tokio::time::Instant::now();
    loop {
        if cond() {
            return start.elapsed();
        }
        if start.elapsed() >= limit {
            panic!("{what}: did not settle within {limit:?}");
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Like [`wait_until`] for a value that must come back to `want`; the
/// panic names `what` and the last value seen.
pub async fn wait_for_value<T: PartialEq + std::fmt::Debug>(
    limit: Duration,
    what: &str,
    want: T,
    mut value: impl FnMut() -> T,
) -> Duration {
    let start = tokio::time::Instant::now();
    loop {
        let now = value();
        if now == want {
            return start.elapsed();
        }
        if start.elapsed() >= limit {
            panic!("{what}: still {now:?} after {limit:?}, want {want:?}");
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Waits (at most `limit`) until `session` holds less libssh2 memory, in
/// bytes and in blocks, than `held`: its stats taken while a channel or
/// listener it has since dropped was still alive. The drop hands the free
/// to the session's driver; this returns once the free has run, with the
/// session's stats then. `what` names what was dropped.
pub async fn wait_freed(
    session: &Session,
    held: SessionStats,
    limit: Duration,
    what: &str,
) -> SessionStats {
    wait_until(
        limit,
        &format!(
            "the libssh2 memory of {what} to be freed (held {} bytes in {} blocks with it)",
            held.libssh2_bytes, held.libssh2_blocks
        ),
        || {
            let now = session.stats();
            now.libssh2_bytes < held.libssh2_bytes && now.libssh2_blocks < held.libssh2_blocks
        },
    )
    .await;
    session.stats()
}

/// A `kB` field of `/proc/self/status` (`VmRSS`, `VmHWM`), in bytes.
pub fn proc_status(field: &str) -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status
        .lines()
        .find(|l| l.starts_with(field) && l[field.len()..].starts_with(':'))
        .unwrap_or_else(|| panic!("no {field} in /proc/self/status"));
    let kib: u64 = line[field.len() + 1..]
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .unwrap();
    kib * 1024
}

/// Runs the test `name` alone in a fresh process of this test binary, so
/// that the process's memory is that test's own: `true` inside that
/// process (run the test's body), `false` in the caller, after checking
/// that the body ran and passed there.
pub fn alone_in_own_process(name: &str) -> bool {
    const VAR: &str = "URING_SSH_TEST_ALONE";
    if std::env::var_os(VAR).is_some() {
        return true;
    }
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .args([name, "--exact", "--test-threads=1", "--nocapture"])
        .env(VAR, name)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && stdout.contains("1 passed"),
        "{name} in its own process:\n{stdout}\n{stderr}"
    );
    eprint!("{stderr}");
    false
}

/// Pins the calling thread to CPU `core`. Panics if the kernel refuses
/// (no such core, or outside the process's allowed set), so that a
/// measurement never runs unpinned without saying so; also panics for a
/// `core` of 1024 or more, which a `cpu_set_t` cannot name.
pub fn pin_this_thread(core: usize) {
    // SAFETY: a zeroed cpu_set_t is an empty set; CPU_SET writes inside
    // it, and sched_setaffinity(0, ...) reads it for the calling thread.
    let r = unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(core, &mut set);
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set)
    };
    assert_eq!(
        r,
        0,
        "cannot pin to core {core}: {}",
        std::io::Error::last_os_error()
    );
}

/// The calling thread's user and system CPU time so far
/// (`getrusage(RUSAGE_THREAD)`).
pub fn thread_cpu() -> (Duration, Duration) {
    // SAFETY: `ru` is written by the call and read only after it.
    let ru = unsafe {
        let mut ru: libc::rusage = std::mem::zeroed();
        libc::getrusage(libc::RUSAGE_THREAD, &mut ru);
        ru
    };
    let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    (tv(ru.ru_utime), tv(ru.ru_stime))
}

/// Raises the soft limit on open files to the hard one; returns the soft
/// limit now in force. A failure to raise it is not reported; the limit
/// returned says what the caller got.
pub fn raise_nofile() -> u64 {
    // SAFETY: getrlimit/setrlimit fill and read the struct they are given.
    unsafe {
        let mut l: libc::rlimit = std::mem::zeroed();
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut l);
        l.rlim_cur = l.rlim_max;
        libc::setrlimit(libc::RLIMIT_NOFILE, &l);
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut l);
        l.rlim_cur
    }
}
