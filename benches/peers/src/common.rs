//! What every benchmark client shares: the peer programs of this crate and
//! uring-ssh's own client in `examples/compare/`, which includes this file
//! by path. Arguments, the scenario drivers (one for async clients, whose
//! sessions all run on one thread, one for blocking clients, one OS thread
//! per session), and the one JSON line each run prints.
//!
//! Scenarios (`--scenario`):
//! * `read` / `write`: `--sessions N` sessions, each with `--channels C`
//!   channels, each channel reading (`head -c`) or writing (`cat >
//!   /dev/null`) `--mib M` MiB over exec. Timed once every session is
//!   authenticated.
//! * `connect`: `--count K` connects (TCP + key exchange + public-key auth),
//!   `--sessions N` at once.
//! * `idle`: `--sessions N` authenticated sessions held open; reports the
//!   resident memory they added, per session.
//! * `sftp-get` / `sftp-put`: one file, `--remote` and `--local` paths.
//! * `tree`: every file under the remote directory `--remote` fetched into
//!   `--local`, over `--sessions N` sessions where the client can share
//!   work between sessions (else one).
//!
//! `--threads T` (async clients, `read`/`write` only): the sessions spread
//! over T threads instead of one — a multi-thread runtime with T workers
//! for the peers, a pool of T ring threads for uring-ssh. `--via handle`
//! (uring-ssh only): every channel driven through the `Send` session
//! handle from tasks of a multi-thread runtime.
#![allow(dead_code, async_fn_in_trait)]

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Instant;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Command-line options of every client.
#[derive(Debug, Clone)]
pub struct Args {
    /// See the module docs.
    pub scenario: String,
    /// sshd port on 127.0.0.1.
    pub port: u16,
    /// User to log in as.
    pub user: String,
    /// Unencrypted private key file.
    pub key: String,
    /// OpenSSH known_hosts file (clients that check host keys).
    pub known_hosts: String,
    /// The one cipher offered.
    pub cipher: String,
    /// The one key exchange offered (default [`KEX`]).
    pub kex: String,
    /// MiB per channel.
    pub mib: u64,
    /// Sessions (or, for `connect`, connects at once).
    pub sessions: usize,
    /// Channels per session.
    pub channels: usize,
    /// Connects in all (`connect`).
    pub count: usize,
    /// Remote path (`sftp-*`, `tree`).
    pub remote: String,
    /// Local path (`sftp-*`, `tree`).
    pub local: String,
    /// Threads the sessions spread over; 0: one current-thread runtime.
    pub threads: usize,
    /// How uring-ssh drives its sessions: `native` or `handle`.
    pub via: String,
    /// `tree`: sync each local file before its rename (`--fsync 1`;
    /// uring-ssh only, the peers' walks ignore it).
    pub fsync: bool,
    /// `read`: how uring-ssh takes the output: `chunk` (the default:
    /// `Channel::read_chunk`, no copy) or `buffer` (`AsyncRead` into a
    /// [`BUF`] buffer per session, one copy more). The peers ignore it.
    pub read_api: String,
}

/// The key exchange every client pins unless `--kex` says otherwise.
pub const KEX: &str = "curve25519-sha256";

/// Parses the process arguments (`--mode` is an alias of `--scenario`).
pub fn args() -> Args {
    parse_args(std::env::args().skip(1))
}

/// Parses client options (see [`Args`]).
pub fn parse_args(mut it: impl Iterator<Item = String>) -> Args {
    let mut a = Args {
        scenario: "read".into(),
        port: 22,
        user: "root".into(),
        key: String::new(),
        known_hosts: String::new(),
        cipher: "chacha20-poly1305@openssh.com".into(),
        kex: KEX.into(),
        mib: 1024,
        sessions: 1,
        channels: 1,
        count: 1,
        remote: String::new(),
        local: String::new(),
        threads: 0,
        via: "native".into(),
        fsync: false,
        read_api: "chunk".into(),
    };
    while let Some(k) = it.next() {
        let v = it.next().unwrap_or_else(|| panic!("{k} needs a value"));
        let num = |v: &str| v.parse::<usize>().unwrap_or_else(|_| panic!("{k} {v}"));
        match k.as_str() {
            "--scenario" | "--mode" => a.scenario = v,
            "--port" => a.port = num(&v) as u16,
            "--user" => a.user = v,
            "--key" => a.key = v,
            "--known-hosts" => a.known_hosts = v,
            "--cipher" => a.cipher = v,
            "--kex" => a.kex = v,
            "--mib" => a.mib = num(&v) as u64,
            "--sessions" => a.sessions = num(&v).max(1),
            "--channels" => a.channels = num(&v).max(1),
            "--count" => a.count = num(&v).max(1),
            "--remote" => a.remote = v,
            "--local" => a.local = v,
            "--threads" => a.threads = num(&v),
            "--via" => a.via = v,
            "--fsync" => a.fsync = num(&v) != 0,
            "--read-api" => {
                assert!(
                    v == "chunk" || v == "buffer",
                    "--read-api {v}: chunk or buffer"
                );
                a.read_api = v
            }
            other => panic!("unknown option {other}"),
        }
    }
    a
}

impl Args {
    /// Bytes each channel moves.
    pub fn bytes(&self) -> u64 {
        self.mib << 20
    }

    /// The command a `read` channel runs.
    pub fn read_command(&self) -> String {
        format!("head -c {} /dev/zero", self.bytes())
    }
}

/// The command a `write` channel runs.
pub const WRITE_COMMAND: &str = "cat > /dev/null";

/// The buffer size clients read and write with.
pub const BUF: usize = 256 * 1024;

/// Flat figures of one run: numbers by name, printed as one JSON object.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Figures(pub BTreeMap<String, f64>);

impl Figures {
    /// A figure, NaN if absent.
    pub fn get(&self, key: &str) -> f64 {
        self.0.get(key).copied().unwrap_or(f64::NAN)
    }

    /// Sets a figure.
    pub fn set(&mut self, key: &str, v: f64) {
        self.0.insert(key.to_string(), v);
    }

    /// `{"key":value,...}`; non-finite values as `null`.
    pub fn to_json(&self) -> String {
        let body: Vec<String> = self
            .0
            .iter()
            .map(|(k, v)| {
                if v.is_finite() {
                    format!("\"{k}\":{v}")
                } else {
                    format!("\"{k}\":null")
                }
            })
            .collect();
        format!("{{{}}}", body.join(","))
    }

    /// Parses what [`Figures::to_json`] printed (a flat object of numbers).
    pub fn parse(line: &str) -> Option<Figures> {
        let body = line.trim().strip_prefix('{')?.strip_suffix('}')?;
        let mut f = Figures::default();
        for pair in body.split(',').filter(|p| !p.trim().is_empty()) {
            let (k, v) = pair.split_once(':')?;
            let k = k.trim().trim_matches('"');
            let v = match v.trim() {
                "null" => f64::NAN,
                v => v.parse().ok()?,
            };
            f.set(k, v);
        }
        Some(f)
    }
}

/// User and system CPU seconds of this process (all its threads).
pub fn cpu() -> (f64, f64) {
    // SAFETY: an all-zero rusage is a valid value; getrusage fills it.
    let ru = unsafe {
        let mut ru: libc::rusage = std::mem::zeroed();
        libc::getrusage(libc::RUSAGE_SELF, &mut ru);
        ru
    };
    let s = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    (s(ru.ru_utime), s(ru.ru_stime))
}

/// Resident memory of this process, KiB (`/proc/self/statm`).
pub fn rss_kib() -> f64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    let pages: f64 = statm
        .split_whitespace()
        .nth(1)
        .and_then(|p| p.parse().ok())
        .unwrap_or(f64::NAN);
    // SAFETY: sysconf has no preconditions.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) } as f64;
    pages * page / 1024.0
}

/// Raises the open-file limit to its hard limit (1,000 sessions need more
/// than the usual 1,024 descriptors).
pub fn raise_nofile() {
    // SAFETY: getrlimit/setrlimit read and write the struct given.
    unsafe {
        let mut r: libc::rlimit = std::mem::zeroed();
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) == 0 {
            r.rlim_cur = r.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &r);
        }
    }
}

/// Wall time and CPU from a start point.
pub struct Meter {
    t0: Instant,
    cpu0: (f64, f64),
    counters0: Vec<(&'static str, f64)>,
}

impl Meter {
    /// Starts measuring; `counters` are client-specific counters (e.g. the
    /// reactor's) whose increase is reported.
    pub fn start(counters: Vec<(&'static str, f64)>) -> Meter {
        Meter {
            t0: Instant::now(),
            cpu0: cpu(),
            counters0: counters,
        }
    }

    /// `bytes`, `secs`, `user`, `sys` and each counter's increase.
    pub fn finish(&self, bytes: u64, counters: Vec<(&'static str, f64)>) -> Figures {
        let secs = self.t0.elapsed().as_secs_f64();
        let (u, s) = cpu();
        let mut f = Figures::default();
        f.set("bytes", bytes as f64);
        f.set("secs", secs);
        f.set("user", u - self.cpu0.0);
        f.set("sys", s - self.cpu0.1);
        for (k, v) in counters {
            let before = self
                .counters0
                .iter()
                .find(|(n, _)| *n == k)
                .map_or(0.0, |(_, v)| *v);
            f.set(k, v - before);
        }
        f
    }
}

/// Sessions connected at once when a scenario opens many (sshd's
/// `MaxStartups` and its one core set the pace anyway).
pub const CONNECT_BATCH: usize = 32;

/// An async SSH client whose sessions all run on one thread.
pub trait AsyncPeer {
    /// An authenticated session.
    type Session;
    /// TCP connect, key exchange with the pinned cipher and kex, public-key auth.
    async fn connect(a: &Args) -> Self::Session;
    /// One channel reading `a.bytes()` over exec; checks the count.
    async fn read(s: &Self::Session, a: &Args);
    /// One channel writing `a.bytes()` over exec.
    async fn write(s: &Self::Session, a: &Args);
    /// SFTP download of one file; returns its size.
    async fn sftp_get(s: &Self::Session, remote: &str, local: &Path) -> u64;
    /// SFTP upload of one file; returns its size.
    async fn sftp_put(s: &Self::Session, local: &Path, remote: &str) -> u64;
    /// Names and is-directory flags of a remote directory (for `tree`).
    async fn list(s: &Self::Session, dir: &str) -> Vec<(String, bool)>;
    /// Fetches every file under `remote` into `local`, syncing each if
    /// `fsync` (where the client can); returns (files, bytes). The default
    /// walks the tree one file at a time on the first session.
    async fn tree(
        sessions: &[Self::Session],
        remote: &str,
        local: &Path,
        fsync: bool,
    ) -> (u64, u64) {
        let _ = fsync;
        let s = &sessions[0];
        walk_tree(
            remote,
            local,
            async |dir| Self::list(s, dir).await,
            async |r, l| Self::sftp_get(s, r, l).await,
        )
        .await
    }
    /// Client counters reported as increases over the measured phase.
    fn counters() -> Vec<(&'static str, f64)> {
        Vec::new()
    }
}

/// `n` authenticated sessions, connected `CONNECT_BATCH` at a time.
pub async fn connect_many<P: AsyncPeer>(a: &Args, n: usize) -> Vec<P::Session> {
    let mut v = Vec::with_capacity(n);
    while v.len() < n {
        let k = CONNECT_BATCH.min(n - v.len());
        v.extend(futures::future::join_all((0..k).map(|_| P::connect(a))).await);
    }
    v
}

/// Fetches every file under `remote` into `local`, one at a time, depth
/// first, with `list` (names and is-directory flags of a directory) and
/// `get` (one file; its size). Returns (files, bytes).
pub async fn walk_tree(
    remote: &str,
    local: &Path,
    mut list: impl AsyncFnMut(&str) -> Vec<(String, bool)>,
    mut get: impl AsyncFnMut(&str, &Path) -> u64,
) -> (u64, u64) {
    let mut todo = vec![(remote.to_string(), local.to_path_buf())];
    let (mut files, mut bytes) = (0, 0);
    while let Some((r, l)) = todo.pop() {
        std::fs::create_dir_all(&l).expect("create local dir");
        for (name, dir) in list(&r).await {
            let (rr, ll) = (format!("{r}/{name}"), l.join(&name));
            if dir {
                todo.push((rr, ll));
            } else {
                bytes += get(&rr, &ll).await;
                files += 1;
            }
        }
    }
    (files, bytes)
}

/// Runs `a.scenario` with an async client; the caller provides the runtime.
pub async fn run_async<P: AsyncPeer>(a: &Args) -> Figures {
    match a.scenario.as_str() {
        "read" | "write" => {
            let sessions = connect_many::<P>(a, a.sessions).await;
            let m = Meter::start(P::counters());
            let write = a.scenario == "write";
            let jobs = sessions.iter().flat_map(|s| {
                (0..a.channels).map(move |_| async move {
                    if write {
                        P::write(s, a).await
                    } else {
                        P::read(s, a).await
                    }
                })
            });
            futures::future::join_all(jobs).await;
            let total = a.bytes() * (a.sessions * a.channels) as u64;
            m.finish(total, P::counters())
        }
        "connect" => {
            let m = Meter::start(P::counters());
            let mut done = 0;
            while done < a.count {
                let k = a.sessions.min(a.count - done);
                drop(futures::future::join_all((0..k).map(|_| P::connect(a))).await);
                done += k;
            }
            let mut f = m.finish(0, P::counters());
            f.set("count", done as f64);
            f
        }
        "idle" => idle(a, connect_many::<P>(a, a.sessions)).await,
        "sftp-get" | "sftp-put" => {
            let s = P::connect(a).await;
            let m = Meter::start(P::counters());
            let n = if a.scenario == "sftp-get" {
                P::sftp_get(&s, &a.remote, Path::new(&a.local)).await
            } else {
                P::sftp_put(&s, Path::new(&a.local), &a.remote).await
            };
            m.finish(n, P::counters())
        }
        "tree" => {
            let sessions = connect_many::<P>(a, a.sessions).await;
            let m = Meter::start(P::counters());
            let (files, bytes) = P::tree(&sessions, &a.remote, Path::new(&a.local), a.fsync).await;
            let mut f = m.finish(bytes, P::counters());
            f.set("count", files as f64);
            f
        }
        other => panic!("scenario {other} not supported by this client"),
    }
}

/// `read`/`write` with `a.sessions` sessions on a multi-thread runtime of
/// `a.threads` workers, one task per channel: `connect` makes a session on
/// a worker, `transfer(session, args, write)` moves one channel's bytes.
/// Timed, like [`run_async`], once every session is authenticated.
pub fn run_multi_thread<S, C, CF, T, TF>(a: &Args, connect: C, transfer: T) -> Figures
where
    S: Send + Sync + 'static,
    C: Fn(Args) -> CF,
    CF: std::future::Future<Output = S> + Send + 'static,
    T: Fn(std::sync::Arc<S>, Args, bool) -> TF,
    TF: std::future::Future<Output = ()> + Send + 'static,
{
    assert!(
        matches!(a.scenario.as_str(), "read" | "write"),
        "--threads runs read or write only"
    );
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(a.threads.max(1))
        .enable_all()
        .build()
        .expect("multi-thread runtime");
    rt.block_on(async {
        let mut sessions = Vec::with_capacity(a.sessions);
        while sessions.len() < a.sessions {
            let k = CONNECT_BATCH.min(a.sessions - sessions.len());
            let batch: Vec<_> = (0..k).map(|_| tokio::spawn(connect(a.clone()))).collect();
            for t in batch {
                sessions.push(std::sync::Arc::new(t.await.expect("connect task")));
            }
        }
        let m = Meter::start(Vec::new());
        let write = a.scenario == "write";
        let tasks: Vec<_> = sessions
            .iter()
            .flat_map(|s| {
                (0..a.channels).map(|_| tokio::spawn(transfer(s.clone(), a.clone(), write)))
            })
            .collect();
        for t in tasks {
            t.await.expect("transfer task");
        }
        let total = a.bytes() * (a.sessions * a.channels) as u64;
        m.finish(total, Vec::new())
    })
}

async fn idle<S>(a: &Args, connect: impl std::future::Future<Output = Vec<S>>) -> Figures {
    let r0 = rss_kib();
    let m = Meter::start(Vec::new());
    let sessions = connect.await;
    let mut f = m.finish(0, Vec::new());
    f.set("count", sessions.len() as f64);
    f.set("rss_kib_per_session", (rss_kib() - r0) / a.sessions as f64);
    f
}

/// A blocking SSH client: one OS thread per session.
pub trait BlockingPeer {
    /// An authenticated session.
    type Session: Send;
    /// TCP connect, key exchange with the pinned cipher and kex, public-key auth.
    fn connect(a: &Args) -> Self::Session;
    /// One channel reading `a.bytes()` over exec; checks the count.
    fn read(s: &Self::Session, a: &Args);
    /// One channel writing `a.bytes()` over exec.
    fn write(s: &Self::Session, a: &Args);
    /// SFTP download of one file; returns its size.
    fn sftp_get(s: &Self::Session, remote: &str, local: &Path) -> u64;
    /// SFTP upload of one file; returns its size.
    fn sftp_put(s: &Self::Session, local: &Path, remote: &str) -> u64;
    /// Names and is-directory flags of a remote directory (for `tree`).
    fn list(s: &Self::Session, dir: &str) -> Vec<(String, bool)>;
}

/// Runs `a.scenario` with a blocking client, one thread per session.
pub fn run_threads<P: BlockingPeer>(a: &Args) -> Figures {
    use std::sync::Barrier;
    match a.scenario.as_str() {
        "read" | "write" => {
            assert_eq!(
                a.channels, 1,
                "one channel per session on a blocking client"
            );
            let connected = Barrier::new(a.sessions + 1);
            let go = Barrier::new(a.sessions + 1);
            std::thread::scope(|scope| {
                for _ in 0..a.sessions {
                    scope.spawn(|| {
                        let s = P::connect(a);
                        connected.wait();
                        go.wait();
                        if a.scenario == "write" {
                            P::write(&s, a)
                        } else {
                            P::read(&s, a)
                        }
                    });
                }
                connected.wait();
                let m = Meter::start(Vec::new());
                go.wait();
                // Leaving the scope joins every thread.
                m
            })
            .finish(a.bytes() * a.sessions as u64, Vec::new())
        }
        "connect" => {
            let m = Meter::start(Vec::new());
            let per = a.count.div_ceil(a.sessions);
            std::thread::scope(|scope| {
                for t in 0..a.sessions {
                    let n = per.min(a.count.saturating_sub(t * per));
                    scope.spawn(move || (0..n).for_each(|_| drop(P::connect(a))));
                }
            });
            let mut f = m.finish(0, Vec::new());
            f.set("count", a.count as f64);
            f
        }
        "idle" => {
            let connected = Barrier::new(a.sessions + 1);
            let measured = Barrier::new(a.sessions + 1);
            let r0 = rss_kib();
            let m = Meter::start(Vec::new());
            std::thread::scope(|scope| {
                for _ in 0..a.sessions {
                    scope.spawn(|| {
                        let s = P::connect(a);
                        connected.wait();
                        measured.wait();
                        drop(s);
                    });
                }
                connected.wait();
                let mut f = m.finish(0, Vec::new());
                f.set("count", a.sessions as f64);
                f.set("rss_kib_per_session", (rss_kib() - r0) / a.sessions as f64);
                measured.wait();
                f
            })
        }
        "sftp-get" | "sftp-put" => {
            let s = P::connect(a);
            let m = Meter::start(Vec::new());
            let n = if a.scenario == "sftp-get" {
                P::sftp_get(&s, &a.remote, Path::new(&a.local))
            } else {
                P::sftp_put(&s, Path::new(&a.local), &a.remote)
            };
            m.finish(n, Vec::new())
        }
        "tree" => {
            let s = P::connect(a);
            let m = Meter::start(Vec::new());
            // The blocking calls run inside the walk's closures.
            let (files, bytes) = futures::executor::block_on(walk_tree(
                &a.remote,
                Path::new(&a.local),
                async |dir| P::list(&s, dir),
                async |r, l| P::sftp_get(&s, r, l),
            ));
            let mut f = m.finish(bytes, Vec::new());
            f.set("count", files as f64);
            f
        }
        other => panic!("scenario {other} not supported by this client"),
    }
}

/// Copies a remote file to a local one in `BUF`-sized pieces; returns the
/// bytes moved.
pub async fn download(
    from: &mut (impl tokio::io::AsyncRead + Unpin),
    to: &mut impl std::io::Write,
) -> u64 {
    let mut buf = vec![0u8; BUF];
    let mut n = 0u64;
    loop {
        let k = from.read(&mut buf).await.expect("read");
        if k == 0 {
            return n;
        }
        to.write_all(&buf[..k]).expect("write");
        n += k as u64;
    }
}

/// Copies a local file to a remote one in `BUF`-sized pieces; returns the
/// bytes moved.
pub async fn upload(
    from: &mut impl std::io::Read,
    to: &mut (impl tokio::io::AsyncWrite + Unpin),
) -> u64 {
    let mut buf = vec![0u8; BUF];
    let mut n = 0u64;
    loop {
        let k = from.read(&mut buf).expect("read");
        if k == 0 {
            to.shutdown().await.expect("close");
            return n;
        }
        to.write_all(&buf[..k]).await.expect("write");
        n += k as u64;
    }
}

/// Prints the figures as the program's one line of output.
pub fn report(f: &Figures) {
    println!("{}", f.to_json());
}
