//! One host's job: connect (with retries), authenticate, run the command or
//! move the files, and say what happened. Every failure ends up in the
//! host's [`Outcome`]; nothing here stops another host.

use std::cell::Cell;
use std::cell::RefCell;
use std::collections::HashMap;
use std::fs::File;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::sync::Semaphore;
use uring_ssh::sftp::{
    self, LinkPolicy, Progress, Sftp, TransferItem, TransferOptions, TransferReport,
    download_tree_over, upload_tree_over,
};
use uring_ssh::{Config, Error, HostKeyError, MethodType, Session};

use crate::secret::Password;
use crate::ui::HostUi;

/// Everything needed to reach one host.
#[derive(Debug, Clone)]
pub struct Plan {
    /// The host as the operator named it; also its directory name.
    pub label: String,
    /// What to connect to (after the config's HostName).
    pub hostname: String,
    /// TCP port.
    pub port: u16,
    /// Remote user.
    pub user: String,
    /// Session settings.
    pub config: Config,
    /// Bound of TCP connect plus handshake.
    pub connect_timeout: Duration,
    /// Keys to try, in order.
    pub identities: Vec<PathBuf>,
    /// The agent: `None` not used, `Some(None)` `$SSH_AUTH_SOCK`,
    /// `Some(Some(path))` that socket.
    pub agent: Option<Option<PathBuf>>,
    /// Why this host must not be connected to directly (it needs a proxy
    /// we do not support).
    pub blocked: Option<String>,
    /// The known_hosts file its key is checked against (and, with
    /// accept-new, added to).
    pub known_hosts: PathBuf,
    /// `ProxyCommand`, tokens expanded: run by `sh -c` with one end of a
    /// socketpair as its stdin and stdout, the session over the other.
    pub proxy_command: Option<String>,
    /// Jump hosts, the first reached directly, this host through the last
    /// (`-J`, `ProxyJump`); empty: none.
    pub jumps: Vec<Plan>,
    /// The password of `--askpass`: tried after the agent and the keys,
    /// for password then keyboard-interactive authentication.
    pub password: Option<Arc<Password>>,
}

/// What to do on every host.
#[derive(Debug, Clone)]
pub enum Op {
    /// Run a command.
    Exec {
        /// The command line.
        command: String,
        /// Collect output (gathered mode or JSON) instead of streaming it.
        collect: bool,
        /// Caps and per-host output files.
        output: ExecOutput,
        /// `--sudo`: the command is wrapped in `sudo -S`, which is fed the
        /// password.
        sudo: Option<Sudo>,
    },
    /// Fetch `remotes` into `dest` (a directory; `{host}` replaced, or
    /// `<host>/` appended).
    Get {
        /// Remote paths.
        remotes: Vec<PathBuf>,
        /// Local destination pattern.
        dest: String,
    },
    /// Push `locals` into the remote directory `dest` (`{host}` replaced).
    Put {
        /// Local paths.
        locals: Vec<PathBuf>,
        /// Remote directory pattern.
        dest: String,
    },
}

/// How `--sudo` runs a command: under `sudo -S`, whose prompt is a marker
/// no output holds by chance, taken out of the command's stderr.
#[derive(Debug, Clone)]
pub struct Sudo {
    /// The prompt sudo is given (`-p`): no `%`, unique to this run.
    pub marker: String,
    /// What sudo reads on its standard input, followed by a newline.
    pub password: Arc<Password>,
}

impl Sudo {
    /// A marker unique to this run, from the kernel's random numbers (the
    /// time and process id if they cannot be read).
    pub fn new(password: Arc<Password>) -> Sudo {
        let mut nonce = [0u8; 8];
        let random = File::open("/dev/urandom")
            .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut nonce))
            .is_ok();
        if !random {
            let t = SystemTime::now()
                .duration_since(SystemTime::UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(0);
            nonce = (t ^ (u64::from(std::process::id()) << 40)).to_le_bytes();
        }
        let hex: String = nonce.iter().map(|b| format!("{b:02x}")).collect();
        Sudo {
            marker: format!("[ussh-sudo-{hex}]"),
            password,
        }
    }

    /// `command` as the remote shell is given it under `--sudo`: sudo
    /// reads the password on its standard input (`-S`), asks for it even
    /// with credentials cached (`-k`), and runs `command` with `sh -c`,
    /// whose standard input is then `/dev/null`: what is left of the
    /// password's line, if sudo did not ask for it, never reaches the
    /// command.
    pub fn wrap(&self, command: &str) -> String {
        format!(
            "sudo -k -S -p {} -- sh -c {}",
            shell_word(&self.marker),
            shell_word(&format!("exec </dev/null; {command}"))
        )
    }
}

/// Takes the prompt marker of `--sudo` out of a byte stream, however its
/// bytes are split between reads, and counts how often it came: sudo
/// prompts again after a wrong password.
#[derive(Debug)]
pub struct PromptFilter {
    marker: Vec<u8>,
    /// The end of what came so far that may be the start of a marker.
    held: Vec<u8>,
    /// A marker after the first came last: the newline sudo writes when it
    /// finds no second password is taken out too.
    after_retry: bool,
    /// Markers taken out.
    pub seen: usize,
}

impl PromptFilter {
    /// A filter taking out `marker` (not empty).
    pub fn new(marker: &str) -> PromptFilter {
        PromptFilter {
            marker: marker.as_bytes().to_vec(),
            held: Vec::new(),
            after_retry: false,
            seen: 0,
        }
    }

    /// Appends to `out` what of `data` is sure not to be part of a marker.
    pub fn feed(&mut self, data: &[u8], out: &mut Vec<u8>) {
        let mut all = std::mem::take(&mut self.held);
        all.extend_from_slice(data);
        let m = self.marker.len();
        let mut i = 0;
        while i < all.len() {
            if all[i..].starts_with(&self.marker) {
                self.seen += 1;
                self.after_retry = self.seen > 1;
                i += m;
            } else if self.marker.starts_with(&all[i..]) {
                // A marker's start at the end: held for the next read.
                self.held = all[i..].to_vec();
                return;
            } else {
                if !std::mem::take(&mut self.after_retry) || all[i] != b'\n' {
                    out.push(all[i]);
                }
                i += 1;
            }
        }
    }

    /// Appends what was held back: the stream ended.
    pub fn finish(&mut self, out: &mut Vec<u8>) {
        out.append(&mut self.held);
    }
}

/// Where a command's output goes, and how much of it is held in memory.
#[derive(Debug, Clone)]
pub struct ExecOutput {
    /// Bytes of each collected stream (stdout, stderr) kept per host; what
    /// comes after is read and discarded, and counted.
    pub max_output: usize,
    /// The longest piece of a streamed line printed at once: a longer line
    /// is printed in pieces, each but the last ending in
    /// [`LINE_CONTINUES`].
    pub line_cap: usize,
    /// Each host's stdout goes, whole, to the file `outdir/<host>`.
    pub outdir: Option<PathBuf>,
    /// Each host's stderr goes, whole, to the file `errdir/<host>`.
    pub errdir: Option<PathBuf>,
    /// Stderr is collected with stdout, in one buffer, as it arrives (`-B`).
    pub merge_stderr: bool,
}

/// Default of [`ExecOutput::max_output`]: 8 MiB.
pub const DEFAULT_MAX_OUTPUT: usize = 8 << 20;
/// Longest piece of a streamed line (unless the output cap is lower).
pub const STREAM_LINE_CAP: usize = 64 << 10;
/// What ends each piece of a streamed line that was cut.
pub const LINE_CONTINUES: &[u8] = b" [line continues]";

/// Settings shared by every host, on whichever thread it runs.
#[derive(Debug, Clone)]
pub struct Job {
    /// The work.
    pub op: Op,
    /// Transfer settings.
    pub transfer: Transfer,
    /// Retries after connection-level failures.
    pub retries: u32,
    /// Bound of a host's whole job.
    pub timeout: Option<Duration>,
    /// Bounds the unauthenticated connections per server address, over
    /// all threads.
    pub pacing: Arc<Pacing>,
    /// When the run started: `put` removes upload temporary files last
    /// written before it.
    pub started: SystemTime,
}

/// The transfer settings of `get` and `put`: each host builds its
/// [`TransferOptions`] from them on its own thread, since their progress
/// callback cannot cross threads.
#[derive(Debug, Clone, Copy)]
pub struct Transfer {
    /// Skip files whose size and modification time match.
    pub skip_unchanged: bool,
    /// Keep times and permission bits.
    pub preserve: bool,
    /// Symbolic links in remote trees.
    pub links: LinkPolicy,
    /// Follow local links leading out of a pushed directory.
    pub follow_external_links: bool,
    /// Local files open at once per host.
    pub max_open_files: usize,
}

impl Default for Transfer {
    fn default() -> Self {
        let o = TransferOptions::default();
        Transfer {
            skip_unchanged: o.skip_unchanged,
            preserve: o.preserve,
            links: o.links,
            follow_external_links: o.follow_external_links,
            max_open_files: o.max_open_files,
        }
    }
}

/// One gate per server address: at most `per_address` connections of ours
/// to it between TCP connect and the end of authentication, so that a
/// server's limit on unauthenticated connections (Dropbear: 5 per client
/// address; sshd: `MaxStartups`) is not what fails the many aliases of
/// one host a fleet may list.
#[derive(Debug)]
pub struct Pacing {
    per_address: usize,
    gates: Mutex<HashMap<(String, u16), Arc<Semaphore>>>,
}

impl Pacing {
    /// Gates of `per_address` (at least 1).
    pub fn new(per_address: usize) -> Pacing {
        Pacing {
            per_address: per_address.max(1),
            gates: Mutex::new(HashMap::new()),
        }
    }

    /// Waits for a turn to connect to `host:port`.
    async fn enter(&self, host: &str, port: u16) -> Turn {
        let gate = self
            .gates
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry((host.to_string(), port))
            .or_insert_with(|| Arc::new(Semaphore::new(self.per_address)))
            .clone();
        // The gates' semaphores are never closed: acquire cannot fail.
        let permit = gate.acquire().await.expect("gate never closed");
        permit.forget();
        Turn(gate)
    }
}

/// A turn at a [`Pacing`] gate, given back on drop.
pub struct Turn(Arc<Semaphore>);

impl Drop for Turn {
    fn drop(&mut self) {
        self.0.add_permits(1);
    }
}

/// How a host ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Status {
    /// Everything succeeded.
    Ok,
    /// Reached, but the command failed or some files did.
    Failed,
    /// Not reached, not authenticated, or the job broke off.
    Error,
    /// Stopped by Ctrl-C.
    Interrupted,
}

impl Status {
    /// The word used in tables and JSON.
    pub fn word(self) -> &'static str {
        match self {
            Status::Ok => "ok",
            Status::Failed => "failed",
            Status::Error => "error",
            Status::Interrupted => "interrupted",
        }
    }
}

/// What happened on one host.
#[derive(Debug, Clone)]
pub struct Outcome {
    /// The host.
    pub label: String,
    /// How it ended.
    pub status: Status,
    /// The command's exit code: `None` when a signal ended it (the code a
    /// server reports then means nothing) or it did not end.
    pub exit_code: Option<i32>,
    /// The signal that killed the command.
    pub signal: Option<String>,
    /// Bytes moved.
    pub bytes: u64,
    /// Files moved.
    pub files: u64,
    /// Files skipped as unchanged.
    pub skipped: u64,
    /// Symbolic links left out by the link policy (`get`) or because they
    /// lead outside the pushed directory (`put`).
    pub links_skipped: u64,
    /// Files that failed.
    pub failed_files: u64,
    /// `put`: temporary files of interrupted uploads removed.
    pub stale_parts_removed: u64,
    /// From start to end, retries included.
    pub duration: Duration,
    /// One line saying what went wrong.
    pub error: Option<String>,
    /// Connection attempts.
    pub attempts: u32,
    /// The key exchange negotiated, once connected.
    pub kex: Option<String>,
    /// Collected stdout (exec; shared between hosts of identical output
    /// once they are done).
    pub stdout: Arc<Captured>,
    /// Collected stderr (exec, JSON).
    pub stderr: Captured,
    /// The file stdout went to (exec with an output directory).
    pub stdout_file: Option<PathBuf>,
    /// The file stderr went to (exec with an error directory).
    pub stderr_file: Option<PathBuf>,
    /// The pool thread the host ran on (`None`: it never started).
    pub thread: Option<usize>,
}

/// The start of one output stream of a command, up to a cap.
#[derive(Debug, Clone, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Captured {
    /// The bytes kept: at most the cap.
    pub data: Vec<u8>,
    /// Bytes read past the cap and discarded.
    pub dropped: u64,
}

impl Captured {
    /// Keeps what fits of `bytes` under `cap` and counts the rest. The
    /// buffer never holds more than `cap` bytes of capacity.
    pub fn keep(&mut self, bytes: &[u8], cap: usize) {
        let take = cap.saturating_sub(self.data.len()).min(bytes.len());
        if take > 0 {
            let need = self.data.len() + take;
            if need > self.data.capacity() {
                let want = self.data.capacity().saturating_mul(2).clamp(need, cap);
                self.data.reserve_exact(want - self.data.len());
            }
            self.data.extend_from_slice(&bytes[..take]);
        }
        self.dropped += (bytes.len() - take) as u64;
    }

    /// Whether anything was discarded.
    pub fn truncated(&self) -> bool {
        self.dropped > 0
    }
}

impl Outcome {
    /// A blank outcome for `label`.
    pub fn new(label: &str, status: Status) -> Outcome {
        Outcome {
            label: label.to_string(),
            status,
            exit_code: None,
            signal: None,
            bytes: 0,
            files: 0,
            skipped: 0,
            links_skipped: 0,
            failed_files: 0,
            stale_parts_removed: 0,
            duration: Duration::ZERO,
            error: None,
            attempts: 0,
            kex: None,
            stdout: Arc::default(),
            stderr: Captured::default(),
            stdout_file: None,
            stderr_file: None,
            thread: None,
        }
    }

    /// Whether the command ran to its end (an exit code or a signal).
    pub fn ended(&self) -> bool {
        self.exit_code.is_some() || self.signal.is_some()
    }
}

/// A failure to reach a host, and whether trying again may help.
pub(crate) struct Fail {
    pub(crate) msg: String,
    pub(crate) retry: bool,
}

/// One line for a library error, without the OS error number.
pub fn describe(e: &Error) -> String {
    let s = e.to_string();
    match s.find(" (os error") {
        Some(i) => s[..i].to_string(),
        None => s,
    }
}

pub(crate) fn secs(d: Duration) -> String {
    let s = d.as_secs_f64();
    if s.fract() == 0.0 {
        format!("{s:.0} s")
    } else {
        format!("{s:.1} s")
    }
}

/// Runs `job` on the host of `plan`; never fails, the outcome says how it
/// went. `phase` tells a whole-job timeout what was going on.
pub async fn run_host(plan: &Plan, job: &Job, ui: &HostUi) -> Outcome {
    let start = Instant::now();
    let phase = Cell::new("connecting");
    let mut out = Outcome::new(&plan.label, Status::Error);
    if let Some(why) = &plan.blocked {
        out.error = Some(why.clone());
        return out;
    }
    let work = run_inner(plan, job, ui, &phase, &mut out);
    let r = match job.timeout {
        Some(t) => match tokio::time::timeout(t, work).await {
            Ok(r) => r,
            Err(_) => Err(format!("timed out after {} while {}", secs(t), phase.get())),
        },
        None => work.await,
    };
    if let Err(e) = r {
        out.status = Status::Error;
        out.error = Some(e);
    }
    out.duration = start.elapsed();
    out
}

async fn run_inner(
    plan: &Plan,
    job: &Job,
    ui: &HostUi,
    phase: &Cell<&'static str>,
    out: &mut Outcome,
) -> Result<(), String> {
    // Output files first: a host whose output has nowhere to go is not
    // connected to.
    let mut sinks = match &job.op {
        Op::Exec {
            collect, output, ..
        } => Some(exec_sinks(plan, *collect, output, ui, out)?),
        _ => None,
    };
    let turn = job.pacing.enter(&plan.hostname, plan.port).await;
    // What the session went through (a proxy command, a jump lease) is
    // let go after the session, at the end.
    let (session, via) = connect_with_retries(plan, job.retries, phase, out).await?;
    out.kex = session.negotiated(MethodType::Kex);
    phase.set("authenticating");
    authenticate(&session, plan).await?;
    drop(turn);
    match &job.op {
        Op::Exec { command, sudo, .. } => {
            phase.set("running the command");
            if let Some((so, se)) = sinks.take() {
                exec(&session, command, sudo.as_ref(), so, se, out).await?;
            }
        }
        Op::Get { remotes, dest } => {
            phase.set("transferring");
            let sftp = session.sftp().await.map_err(|e| sftp_err(&e))?;
            let root = local_root(dest, &plan.label);
            let report = get(&sftp, remotes, &root, job, ui).await;
            tally(out, &report);
        }
        Op::Put { locals, dest } => {
            phase.set("transferring");
            let sftp = session.sftp().await.map_err(|e| sftp_err(&e))?;
            let root = PathBuf::from(dest.replace("{host}", &plan.label));
            mkdir_p(&sftp, &root).await?;
            let dirs = put_dirs(locals, &root);
            out.stale_parts_removed = remove_stale_parts(&sftp, &dirs, job.started).await;
            let report = put(&sftp, locals, &root, job, ui).await;
            tally(out, &report);
        }
    }
    phase.set("closing");
    // The work is done: a slow goodbye is not a failure.
    let _ = tokio::time::timeout(Duration::from_secs(2), session.close("done")).await;
    drop(session);
    drop(via);
    Ok(())
}

fn sftp_err(e: &Error) -> String {
    format!("cannot start SFTP: {}", describe(e))
}

async fn connect_with_retries(
    plan: &Plan,
    retries: u32,
    phase: &Cell<&'static str>,
    out: &mut Outcome,
) -> Result<(Session, Option<Via>), String> {
    let mut attempt = 0u32;
    loop {
        attempt += 1;
        out.attempts = attempt;
        phase.set("connecting");
        let connected = match plan.proxy_command.as_deref() {
            _ if !plan.jumps.is_empty() => crate::jump::connect_through(plan)
                .await
                .map(|(s, lease)| (s, Some(Via::Jump(lease)))),
            Some(command) if !command.is_empty() => connect_proxied(plan, command)
                .await
                .map(|(s, p)| (s, Some(Via::Command(p)))),
            _ => connect(plan).await.map(|s| (s, None)),
        };
        match connected {
            Ok(s) => return Ok(s),
            Err(f) if f.retry && attempt <= retries => {
                phase.set("waiting to retry");
                tokio::time::sleep(backoff(&plan.label, attempt)).await;
            }
            Err(f) => {
                return Err(if attempt > 1 {
                    format!("{} (after {attempt} attempts)", f.msg)
                } else {
                    f.msg
                });
            }
        }
    }
}

/// 0.5 s, 1 s, 2 s, … up to 8 s, each stretched by up to a quarter
/// (different per host, so that retries do not arrive together).
fn backoff(label: &str, attempt: u32) -> Duration {
    let base = 500u64 << (attempt - 1).min(4);
    let h = label
        .bytes()
        .fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
            (h ^ b as u64).wrapping_mul(0x100_0000_01b3)
        })
        .wrapping_add(attempt as u64);
    Duration::from_millis(base + (h % (base / 4 + 1)))
}

pub(crate) async fn connect(plan: &Plan) -> Result<Session, Fail> {
    let host = plan.hostname.as_str();
    if host.parse::<std::net::IpAddr>().is_err() {
        // Resolve first, so that an unknown name gets a line of its own
        // (and no retries).
        if let Err(e) = tokio::net::lookup_host((host, plan.port)).await {
            return Err(Fail {
                msg: format!("unknown host {host}: {e}"),
                retry: false,
            });
        }
    }
    let t = plan.connect_timeout;
    match tokio::time::timeout(t, Session::connect(host, plan.port, plan.config.clone())).await {
        Err(_) => Err(Fail {
            msg: format!(
                "connect to {host} port {}: no SSH handshake within {}",
                plan.port,
                secs(t)
            ),
            retry: true,
        }),
        Ok(Ok(s)) => Ok(s),
        Ok(Err(e)) => {
            let retry = matches!(e, Error::Io(_) | Error::Timeout { .. }) || before_banner(&e);
            let msg = match &e {
                Error::Io(io) if io.kind() == std::io::ErrorKind::ConnectionRefused => {
                    format!("connection refused by {host} port {}", plan.port)
                }
                Error::Timeout { .. } => format!(
                    "connect to {host} port {} timed out after {}",
                    plan.port,
                    secs(t)
                ),
                Error::HostKey(h) => host_key_problem(h, plan),
                _ if before_banner(&e) => format!(
                    "connect to {host} port {}: {} (the server closed the connection \
                     before its banner: it may limit unauthenticated connections per \
                     client address, as Dropbear (5) and sshd's MaxStartups do: lower \
                     --per-address; or, OpenSSH 9.8 and later, refuse this address for a \
                     while after failed or unauthenticated connections (PerSourcePenalties, \
                     15 s to 10 min): retry later or raise --retries)",
                    plan.port,
                    describe(&e)
                ),
                _ => format!("connect to {host} port {}: {}", plan.port, describe(&e)),
            };
            Err(Fail { msg, retry })
        }
    }
}

/// What a session reached its host through, kept as long as the session.
#[expect(dead_code, reason = "held for what its drop does")]
pub enum Via {
    /// A `ProxyCommand`.
    Command(Proxy),
    /// A jump session's lease.
    Jump(crate::jump::Lease),
}

/// A running `ProxyCommand`. Dropped, it is left a moment to end by itself
/// (the session's end closes its stdin), then killed; a reaper thread
/// waits for it, so no host waits and no zombie stays.
pub struct Proxy(Option<std::process::Child>);

impl Drop for Proxy {
    fn drop(&mut self) {
        if let Some(mut child) = self.0.take()
            && !matches!(child.try_wait(), Ok(Some(_)))
        {
            reap(child);
        }
    }
}

/// Proxy commands still running after their session, with when they were
/// handed over.
static REAPING: Mutex<Vec<(std::process::Child, Instant)>> = Mutex::new(Vec::new());

/// Hands `child` to the one reaper thread: children get a second to exit
/// after their session, then are killed; all are waited for.
fn reap(child: std::process::Child) {
    static REAPER: std::sync::Once = std::sync::Once::new();
    let mut waiting = REAPING.lock().unwrap_or_else(|p| p.into_inner());
    waiting.push((child, Instant::now()));
    drop(waiting);
    REAPER.call_once(|| {
        std::thread::spawn(|| {
            loop {
                std::thread::sleep(Duration::from_millis(50));
                let mut waiting = REAPING.lock().unwrap_or_else(|p| p.into_inner());
                waiting.retain_mut(|(c, since)| {
                    if since.elapsed() > Duration::from_secs(1) {
                        let _ = c.kill();
                        let _ = c.wait();
                        return false;
                    }
                    !matches!(c.try_wait(), Ok(Some(_)) | Err(_))
                });
            }
        });
    });
}

/// Kills and waits for every proxy command still running: called before
/// ussh exits, so that none outlives it.
pub fn reap_all() {
    let mut waiting = REAPING.lock().unwrap_or_else(|p| p.into_inner());
    for (c, _) in waiting.iter_mut() {
        let _ = c.kill();
        let _ = c.wait();
    }
    waiting.clear();
}

/// Connects through `command` (`ProxyCommand`, tokens expanded): `sh -c`
/// with one end of a socketpair as its stdin and stdout, its stderr ours,
/// as `ssh` runs it.
async fn connect_proxied(plan: &Plan, command: &str) -> Result<(Session, Proxy), Fail> {
    use std::os::fd::OwnedFd;
    use std::process::{Command, Stdio};
    let fail = |what: &str, e: std::io::Error| Fail {
        msg: format!("ProxyCommand {command:?}: {what}: {e}"),
        retry: false,
    };
    let (ours, theirs) =
        std::os::unix::net::UnixStream::pair().map_err(|e| fail("socketpair", e))?;
    let theirs = OwnedFd::from(theirs);
    let stdin = theirs.try_clone().map_err(|e| fail("dup", e))?;
    let child = Command::new("/bin/sh")
        .arg("-c")
        .arg(command)
        .stdin(Stdio::from(stdin))
        .stdout(Stdio::from(theirs))
        .spawn()
        .map_err(|e| fail("cannot start", e))?;
    let proxy = Proxy(Some(child));
    let t = plan.connect_timeout;
    let connect = Session::connect_stream(
        OwnedFd::from(ours),
        &plan.hostname,
        plan.port,
        plan.config.clone(),
    );
    match tokio::time::timeout(t, connect).await {
        Ok(Ok(s)) => Ok((s, proxy)),
        Err(_) => Err(Fail {
            msg: format!(
                "through ProxyCommand {command:?}: no SSH handshake within {}",
                secs(t)
            ),
            retry: true,
        }),
        Ok(Err(e)) => {
            let retry = matches!(e, Error::Io(_) | Error::Timeout { .. }) || before_banner(&e);
            let msg = match &e {
                Error::HostKey(h) => host_key_problem(h, plan),
                _ => format!(
                    "through ProxyCommand {command:?}: {} (the command's own messages, if any, are above)",
                    describe(&e)
                ),
            };
            Err(Fail { msg, retry })
        }
    }
}

/// A host-key failure, with the file checked and what to do about it.
pub(crate) fn host_key_problem(e: &HostKeyError, plan: &Plan) -> String {
    let file = shell_word(&plan.known_hosts.to_string_lossy());
    match e {
        HostKeyError::Unknown { .. } => format!(
            "{e}; checked {file}; to trust the key on first contact: \
             -o StrictHostKeyChecking=accept-new, or add it once its fingerprint \
             is checked: ssh-keyscan -p {} {} >> {file}",
            plan.port,
            shell_word(&plan.hostname)
        ),
        HostKeyError::Changed { .. } => {
            let name = if plan.port == 22 {
                plan.hostname.clone()
            } else {
                format!("[{}]:{}", plan.hostname, plan.port)
            };
            format!(
                "{e} {file}; refused under StrictHostKeyChecking yes and accept-new \
                 alike (accept-new only adds unknown hosts); if the server's key was replaced on purpose: \
                 ssh-keygen -R {} -f {file}",
                shell_word(&name)
            )
        }
        _ => format!("{e} (port {})", plan.port),
    }
}

/// `s` as one shell word: as it is when it needs no quoting.
fn shell_word(s: &str) -> String {
    let plain = |c: char| c.is_ascii_alphanumeric() || "@%+=:,./_-".contains(c);
    if !s.is_empty() && s.chars().all(plain) {
        s.to_string()
    } else {
        format!("'{}'", s.replace('\'', "'\\''"))
    }
}

/// A connection reset or closed before the server's identification line.
pub(crate) fn before_banner(e: &Error) -> bool {
    let text = e.to_string();
    text.contains("banner")
        || matches!(e, Error::Io(io) if io.kind() == std::io::ErrorKind::ConnectionReset)
}

/// Whether no further authentication attempt can succeed on the session:
/// the server disconnected, or the connection is gone.
fn session_gone(e: &Error) -> bool {
    matches!(
        e,
        Error::Disconnected { .. } | Error::Closed(_) | Error::Io(_)
    )
}

pub(crate) async fn authenticate(session: &Session, plan: &Plan) -> Result<(), String> {
    let user = plan.user.as_str();
    let mut tried = Vec::new();
    if let Some(sock) = &plan.agent {
        match session.auth_agent_at(user, sock.as_deref()).await {
            Ok(()) => return Ok(()),
            Err(e) if e.is_auth_failure() => tried.push("agent keys refused".to_string()),
            Err(e) if session_gone(&e) => return Err(auth_failed(user, &tried, &e)),
            Err(e) => tried.push(format!("agent: {}", describe(&e))),
        }
    }
    for key in &plan.identities {
        if let Err(e) = std::fs::File::open(key) {
            tried.push(format!("key {}: {e}", key.display()));
            continue;
        }
        match session.auth_pubkey_file(user, key, None).await {
            Ok(()) => return Ok(()),
            Err(e) if e.is_auth_failure() => tried.push(format!("key {} refused", key.display())),
            Err(e) if session_gone(&e) => return Err(auth_failed(user, &tried, &e)),
            Err(Error::KeyEncrypted { .. }) => tried.push(format!(
                "key {} is encrypted and no passphrase was given (load it into ssh-agent)",
                key.display()
            )),
            Err(e) => tried.push(format!("key {}: {}", key.display(), describe(&e))),
        }
    }
    if let Some(password) = &plan.password {
        match with_password(session, user, password, &mut tried).await {
            Ok(true) => return Ok(()),
            Ok(false) => {}
            Err(e) => return Err(auth_failed(user, &tried, &e)),
        }
    }
    if tried.is_empty() {
        tried.push("no agent and no key files".into());
    }
    Err(format!(
        "authentication as {user} failed: {}",
        tried.join("; ")
    ))
}

/// Prompts of keyboard-interactive rounds answered with the password: a
/// server asking again after that has refused it.
const KBD_ROUNDS: usize = 3;

/// Password authentication, then keyboard-interactive answering every
/// prompt whose answer is not echoed with the password (and the others
/// with nothing), each if the server offers it. `Ok(true)`: in; `Ok(false)`:
/// refused, why in `tried`; `Err`: the session is gone. No message holds
/// the password.
async fn with_password(
    session: &Session,
    user: &str,
    password: &Password,
    tried: &mut Vec<String>,
) -> Result<bool, Error> {
    let methods = match session.auth_methods(user).await {
        // `none` authentication succeeded.
        Ok(m) if m.is_empty() => return Ok(session.authenticated()),
        Ok(m) => m,
        Err(e) if session_gone(&e) => return Err(e),
        Err(e) => {
            tried.push(format!("cannot list the methods: {}", describe(&e)));
            return Ok(false);
        }
    };
    let offered = |m: &str| methods.iter().any(|o| o == m);
    if offered("password") {
        match session.auth_password(user, password.as_str()).await {
            Ok(()) => return Ok(true),
            Err(e) if e.is_auth_failure() => tried.push("password refused".into()),
            Err(e) if session_gone(&e) => return Err(e),
            Err(e) => tried.push(format!("password: {}", describe(&e))),
        }
    }
    if offered("keyboard-interactive") {
        let mut rounds = 0;
        let answer = |_: &str, _: &str, prompts: &[(String, bool)]| {
            rounds += 1;
            prompts
                .iter()
                .map(|(_, echo)| {
                    if *echo || rounds > KBD_ROUNDS {
                        String::new()
                    } else {
                        password.as_str().to_string()
                    }
                })
                .collect()
        };
        match session.auth_keyboard_interactive(user, answer).await {
            Ok(()) => return Ok(true),
            Err(e) if e.is_auth_failure() => {
                tried.push("password refused (keyboard-interactive)".into())
            }
            Err(e) if session_gone(&e) => return Err(e),
            Err(e) => tried.push(format!("keyboard-interactive: {}", describe(&e))),
        }
    }
    if !offered("password") && !offered("keyboard-interactive") {
        tried.push(format!(
            "the server offers no password authentication (only {})",
            methods.join(",")
        ));
    }
    Ok(false)
}

/// The line for an authentication that ended because the session did.
fn auth_failed(user: &str, tried: &[String], e: &Error) -> String {
    let before = if tried.is_empty() {
        String::new()
    } else {
        format!(" after {}", tried.join("; "))
    };
    format!("authentication as {user} stopped{before}: {}", describe(e))
}

/// Why `label` cannot name a file in an output directory, if it cannot:
/// it must be one plain path component.
pub fn file_name_problem(label: &str) -> Option<&'static str> {
    if label.is_empty() {
        Some("it is empty")
    } else if label == "." || label == ".." {
        Some("it names a directory")
    } else if label.contains('/') {
        Some("it contains '/'")
    } else if label.contains('\0') {
        Some("it contains a NUL byte")
    } else {
        None
    }
}

/// Creates or empties `dir/<label>` for writing; a symbolic link standing
/// there is not followed (an error instead), nor is anything but a regular
/// file written to.
pub fn create_output_file(dir: &Path, label: &str) -> Result<(File, PathBuf), String> {
    let path = dir.join(label);
    if let Some(why) = file_name_problem(label) {
        return Err(format!("cannot write {}: {why}", path.display()));
    }
    let f = File::options()
        .write(true)
        .create(true)
        .truncate(true)
        // O_NONBLOCK: a FIFO without a reader fails instead of blocking
        // every host; it changes nothing for a regular file.
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(&path)
        .map_err(|e| {
            if e.raw_os_error() == Some(libc::ELOOP) {
                format!(
                    "cannot write {}: it is a symbolic link (not followed)",
                    path.display()
                )
            } else {
                format!("cannot write {}: {e}", path.display())
            }
        })?;
    match f.metadata() {
        Ok(m) if m.is_file() => Ok((f, path)),
        Ok(_) => Err(format!(
            "cannot write {}: not a regular file",
            path.display()
        )),
        Err(e) => Err(format!("cannot write {}: {e}", path.display())),
    }
}

/// Cuts a byte stream into lines of at most `cap` bytes (newline not
/// counted): a longer line comes out in pieces, each but the last ending in
/// [`LINE_CONTINUES`]. Holds at most `cap` bytes between calls.
#[derive(Debug)]
pub struct LineSplitter {
    cap: usize,
    partial: Vec<u8>,
}

impl LineSplitter {
    /// A splitter for pieces of at most `cap` bytes (at least 1).
    pub fn new(cap: usize) -> LineSplitter {
        LineSplitter {
            cap: cap.max(1),
            partial: Vec::new(),
        }
    }

    /// Appends to `out` every line (or piece) that `data` completes, each
    /// ending in a newline.
    pub fn feed(&mut self, mut data: &[u8], out: &mut Vec<u8>) {
        while !data.is_empty() {
            // Invariant: partial.len() <= cap.
            let room = self.cap - self.partial.len();
            let look = &data[..data.len().min(room + 1)];
            match look.iter().position(|&b| b == b'\n') {
                Some(i) => {
                    out.extend_from_slice(&self.partial);
                    out.extend_from_slice(&data[..=i]);
                    self.partial.clear();
                    data = &data[i + 1..];
                }
                None if data.len() <= room => {
                    self.partial.extend_from_slice(data);
                    data = &[];
                }
                None => {
                    // More than `cap` bytes without a newline: cut.
                    self.partial.extend_from_slice(&data[..room]);
                    data = &data[room..];
                    let cut = utf8_cut(&self.partial);
                    out.extend_from_slice(&self.partial[..cut]);
                    out.extend_from_slice(LINE_CONTINUES);
                    out.push(b'\n');
                    self.partial.drain(..cut);
                }
            }
        }
    }

    /// Appends what is left (a last line without its newline), newline
    /// added.
    pub fn finish(&mut self, out: &mut Vec<u8>) {
        if !self.partial.is_empty() {
            out.extend_from_slice(&self.partial);
            out.push(b'\n');
            self.partial.clear();
        }
    }
}

/// Where to cut the full buffer `b` so as not to split a UTF-8 character:
/// before a character that the end of `b` would cut, if `b` holds
/// anything before it; else at its end.
fn utf8_cut(b: &[u8]) -> usize {
    let n = b.len();
    // The start of the last character: at most three continuation bytes
    // back.
    let Some(start) = (n.saturating_sub(4)..n)
        .rev()
        .find(|&i| b[i] & 0xc0 != 0x80)
    else {
        return n;
    };
    let want = match b[start] {
        0x00..=0x7f => 1,
        0xc0..=0xdf => 2,
        0xe0..=0xef => 3,
        0xf0..=0xf7 => 4,
        _ => 1,
    };
    if start + want > n && start > 0 {
        start
    } else {
        n
    }
}

/// Where one output stream of a command goes.
enum Sink<'a> {
    /// Printed as `host: line`, long lines in pieces.
    Lines {
        ui: &'a HostUi,
        stderr: bool,
        split: LineSplitter,
        text: Vec<u8>,
    },
    /// Kept up to `cap` bytes; the rest counted and discarded.
    Keep { cap: usize, got: Captured },
    /// As `Keep`, into a buffer both streams share.
    Shared {
        cap: usize,
        got: Rc<RefCell<Captured>>,
    },
    /// Written to a file as it arrives.
    File { file: File, path: PathBuf },
}

impl Sink<'_> {
    async fn feed(&mut self, data: &[u8]) -> Result<(), String> {
        match self {
            Sink::Lines {
                ui,
                stderr,
                split,
                text,
            } => {
                split.feed(data, text);
                if !text.is_empty() {
                    ui.host_lines(text, *stderr).await;
                    text.clear();
                }
            }
            Sink::Keep { cap, got } => got.keep(data, *cap),
            Sink::Shared { cap, got } => got.borrow_mut().keep(data, *cap),
            Sink::File { file, path } => file
                .write_all(data)
                .map_err(|e| format!("writing {}: {e}", path.display()))?,
        }
        Ok(())
    }

    /// Flushes the last line; what was kept (a shared buffer is taken by
    /// its owner instead).
    async fn finish(self) -> Captured {
        match self {
            Sink::Lines {
                ui,
                stderr,
                mut split,
                mut text,
            } => {
                split.finish(&mut text);
                if !text.is_empty() {
                    ui.host_lines(&text, stderr).await;
                }
                Captured::default()
            }
            Sink::Keep { got, .. } => got,
            Sink::Shared { .. } | Sink::File { .. } => Captured::default(),
        }
    }
}

/// Reads `r` to its end into `sink`, through `filter` if given; `what`
/// names the stream in errors.
async fn pump<R: AsyncRead + Unpin>(
    mut r: R,
    mut sink: Sink<'_>,
    mut filter: Option<&mut PromptFilter>,
    what: &str,
) -> Result<Captured, String> {
    let mut buf = vec![0u8; 32 * 1024];
    let mut clean = Vec::new();
    loop {
        let n = r
            .read(&mut buf)
            .await
            .map_err(|e| format!("{what}: {}", describe(&Error::Io(e))))?;
        if n == 0 {
            break;
        }
        match filter.as_deref_mut() {
            Some(f) => {
                clean.clear();
                f.feed(&buf[..n], &mut clean);
                if !clean.is_empty() {
                    sink.feed(&clean).await?;
                }
            }
            None => sink.feed(&buf[..n]).await?,
        }
    }
    if let Some(f) = filter {
        clean.clear();
        f.finish(&mut clean);
        if !clean.is_empty() {
            sink.feed(&clean).await?;
        }
    }
    Ok(sink.finish().await)
}

/// Where a host's stdout and stderr go: files when the output directories
/// say so (created now, their paths noted in `out`), else kept (stdout
/// when `collect`, stderr with JSON) or streamed. In gathered mode stderr
/// still streams, as clush -b does.
fn exec_sinks<'a>(
    plan: &'a Plan,
    collect: bool,
    output: &ExecOutput,
    ui: &'a HostUi,
    out: &mut Outcome,
) -> Result<(Sink<'a>, Sink<'a>), String> {
    let sink = |dir: &Option<PathBuf>, keep: bool, is_err: bool| -> Result<Sink<'a>, String> {
        Ok(match dir {
            Some(dir) => {
                let (file, path) = create_output_file(dir, &plan.label)?;
                Sink::File { file, path }
            }
            None if keep => Sink::Keep {
                cap: output.max_output,
                got: Captured::default(),
            },
            None => Sink::Lines {
                ui,
                stderr: is_err,
                split: LineSplitter::new(output.line_cap),
                text: Vec::new(),
            },
        })
    };
    if output.merge_stderr {
        let got = Rc::new(RefCell::new(Captured::default()));
        let shared = || Sink::Shared {
            cap: output.max_output,
            got: got.clone(),
        };
        return Ok((shared(), shared()));
    }
    let so = sink(&output.outdir, collect, false)?;
    let se = sink(&output.errdir, ui.json(), true)?;
    for (s, file) in [(&so, &mut out.stdout_file), (&se, &mut out.stderr_file)] {
        if let Sink::File { path, .. } = s {
            *file = Some(path.clone());
        }
    }
    Ok((so, se))
}

/// Runs `command` (under `sudo -S` with `sudo`), its output into `so` and
/// `se`; how it ended into `out`.
async fn exec(
    session: &Session,
    command: &str,
    sudo: Option<&Sudo>,
    so: Sink<'_>,
    se: Sink<'_>,
    out: &mut Outcome,
) -> Result<(), String> {
    let fail = |what: &str, e: Error| format!("{what}: {}", describe(&e));
    // The buffer both streams share (-B), taken once both have ended.
    let merged = match &so {
        Sink::Shared { got, .. } => Some(got.clone()),
        _ => None,
    };
    let wrapped;
    let command = match sudo {
        Some(s) => {
            wrapped = s.wrap(command);
            wrapped.as_str()
        }
        None => command,
    };
    let mut ch = session
        .exec(command)
        .await
        .map_err(|e| fail("cannot run the command", e))?;
    if let Some(s) = sudo {
        // The password's line on sudo's stdin. A command that ended
        // already (sudo missing) closed it: what matters is then its exit.
        use tokio::io::AsyncWriteExt;
        if ch.write_all(s.password.as_bytes()).await.is_ok() {
            let _ = ch.write_all(b"\n").await;
        }
    }
    // Nothing (more) on stdin, as `ssh host cmd < /dev/null`: a sudo that
    // was refused the password finds the end of its input, and gives up.
    let _ = ch.send_eof().await;
    let stderr = ch.stderr();
    let mut filter = sudo.map(|s| PromptFilter::new(&s.marker));
    let (ro, re) = futures_util::future::join(
        pump(&mut ch, so, None, "reading output"),
        pump(stderr, se, filter.as_mut(), "reading error output"),
    )
    .await;
    let (mut o, e) = (ro?, re?);
    // sudo prompts again after a wrong password.
    let refused = filter.is_some_and(|f| f.seen > 1);
    if let Some(got) = merged {
        o = got.take();
    }
    let st = ch.wait().await.map_err(|e| fail("waiting for exit", e))?;
    out.stdout = Arc::new(o);
    out.stderr = e;
    out.exit_code = st.signal.is_none().then_some(st.code);
    out.signal = st.signal.clone();
    if refused {
        out.status = Status::Failed;
        out.error = Some("sudo refused the password".into());
    } else if st.success() {
        out.status = Status::Ok;
    } else {
        out.status = Status::Failed;
        out.error = Some(match &st.signal {
            Some(s) => format!("killed by signal {s}"),
            None => format!("exit code {}", st.code),
        });
    }
    Ok(())
}

/// Where a host's files go: `dest` with `{host}` replaced, else
/// `dest/<host>`.
pub fn local_root(dest: &str, label: &str) -> PathBuf {
    if dest.contains("{host}") {
        PathBuf::from(dest.replace("{host}", label))
    } else {
        Path::new(dest).join(label)
    }
}

/// The name a fetched or pushed path takes in its destination directory.
pub fn base_name(p: &Path) -> PathBuf {
    match p.file_name() {
        Some(n) => PathBuf::from(n),
        None => PathBuf::from("root"),
    }
}

/// Transfer options for one host, with its progress feeding the totals.
fn host_options(job: &Job, ui: &HostUi) -> TransferOptions {
    let t = &job.transfer;
    let bytes = ui.bytes();
    let last = Cell::new(0u64);
    TransferOptions {
        skip_unchanged: t.skip_unchanged,
        preserve: t.preserve,
        links: t.links,
        follow_external_links: t.follow_external_links,
        max_open_files: t.max_open_files,
        progress: Some(Rc::new(move |p: &Progress| {
            let prev = last.replace(p.bytes_done);
            bytes.fetch_add(p.bytes_done.saturating_sub(prev), Ordering::Relaxed);
        })),
        ..TransferOptions::default()
    }
}

async fn get(
    sftp: &Sftp,
    remotes: &[PathBuf],
    root: &Path,
    job: &Job,
    ui: &HostUi,
) -> TransferReport {
    let mut total = TransferReport::default();
    if let Err(e) = std::fs::create_dir_all(root) {
        total.other_errors.push((
            root.to_path_buf(),
            Error::Io(std::io::Error::new(
                e.kind(),
                format!("cannot create {}: {e}", root.display()),
            )),
        ));
        return total;
    }
    let mut items = Vec::new();
    for remote in remotes {
        let local = root.join(base_name(remote));
        match sftp.stat(remote).await {
            Ok(a) if a.is_dir() => {
                let r = download_tree_over(
                    std::slice::from_ref(sftp),
                    remote,
                    &local,
                    &host_options(job, ui),
                )
                .await;
                merge(&mut total, r);
            }
            Ok(a) => items.push(TransferItem {
                remote: remote.clone(),
                local,
                attrs: Some(a),
            }),
            Err(e) => total.other_errors.push((remote.clone(), e)),
        }
    }
    if !items.is_empty() {
        let r =
            sftp::download_many(std::slice::from_ref(sftp), items, &host_options(job, ui)).await;
        merge(&mut total, r);
    }
    total
}

async fn put(
    sftp: &Sftp,
    locals: &[PathBuf],
    root: &Path,
    job: &Job,
    ui: &HostUi,
) -> TransferReport {
    let mut total = TransferReport::default();
    let mut items = Vec::new();
    for local in locals {
        let remote = root.join(base_name(local));
        if local.is_dir() {
            let r = upload_tree_over(
                std::slice::from_ref(sftp),
                local,
                &remote,
                &host_options(job, ui),
            )
            .await;
            merge(&mut total, r);
        } else {
            items.push(TransferItem::new(remote, local.clone()));
        }
    }
    if !items.is_empty() {
        let r = sftp::upload_many(std::slice::from_ref(sftp), items, &host_options(job, ui)).await;
        merge(&mut total, r);
    }
    total
}

/// The remote directories `put` writes files into: `root`, and for each
/// local directory pushed, its counterpart and those of its
/// subdirectories (reached without following links).
fn put_dirs(locals: &[PathBuf], root: &Path) -> Vec<PathBuf> {
    let mut dirs = vec![root.to_path_buf()];
    for local in locals {
        let mut todo = vec![(local.clone(), root.join(base_name(local)))];
        while let Some((l, r)) = todo.pop() {
            if !l.is_dir() {
                continue;
            }
            if let Ok(rd) = std::fs::read_dir(&l) {
                for e in rd.flatten() {
                    if e.file_type().is_ok_and(|t| t.is_dir()) {
                        todo.push((e.path(), r.join(e.file_name())));
                    }
                }
            }
            dirs.push(r);
        }
    }
    dirs
}

/// Entries of one directory looked at for stale temporary files: a server
/// listing without end stops there.
const MAX_SCANNED: usize = 1_000_000;

/// Removes from `dirs` the temporary files of interrupted uploads
/// (`.NAME.PID-N.part`, regular files) last written before `before`, the
/// run's start: an upload in flight from another run keeps writing its
/// file, so it is newer. Nothing else is touched; a directory that is
/// missing or unreadable, or a file that will not go, is left as it is
/// (the upload itself reports real problems). Returns how many went.
async fn remove_stale_parts(sftp: &Sftp, dirs: &[PathBuf], before: SystemTime) -> u64 {
    use futures_util::stream::{self, StreamExt};
    let Some(before) = before
        .duration_since(SystemTime::UNIX_EPOCH)
        .ok()
        .map(|d| d.as_secs())
    else {
        return 0;
    };
    let stale: Vec<PathBuf> = stream::iter(dirs)
        .map(|d| stale_in(sftp, d, before))
        .buffer_unordered(8)
        .flat_map(stream::iter)
        .collect()
        .await;
    let mut removed = 0;
    for r in stream::iter(&stale)
        .map(|p| sftp.unlink(p))
        .buffer_unordered(16)
        .collect::<Vec<_>>()
        .await
    {
        removed += u64::from(r.is_ok());
    }
    removed
}

/// The stale temporary files of `dir` (see [`remove_stale_parts`]);
/// `before` in seconds since the epoch.
async fn stale_in(sftp: &Sftp, dir: &Path, before: u64) -> Vec<PathBuf> {
    use std::os::unix::ffi::OsStrExt;
    let mut stale = Vec::new();
    let Ok(mut rd) = sftp.read_dir(dir).await else {
        return stale;
    };
    let mut seen = 0;
    while let Ok(Some(e)) = rd.next_entry().await {
        let a = e.attrs();
        if sftp::is_upload_temp_name(e.name_bytes())
            && a.is_file()
            && a.mtime.is_some_and(|m| u64::from(m) < before)
        {
            stale.push(dir.join(std::ffi::OsStr::from_bytes(e.name_bytes())));
        }
        seen += 1;
        if seen >= MAX_SCANNED {
            break;
        }
    }
    stale
}

fn merge(into: &mut TransferReport, r: TransferReport) {
    into.files.extend(r.files);
    into.other_errors.extend(r.other_errors);
    into.skipped_links.extend(r.skipped_links);
}

/// `mkdir -p` over SFTP.
async fn mkdir_p(sftp: &Sftp, dir: &Path) -> Result<(), String> {
    if matches!(sftp.stat(dir).await, Ok(a) if a.is_dir()) {
        return Ok(());
    }
    let mut p = PathBuf::new();
    for c in dir.components() {
        p.push(c);
        if matches!(c, std::path::Component::RootDir) {
            continue;
        }
        let _ = sftp.mkdir(&p, 0o755).await;
    }
    match sftp.stat(dir).await {
        Ok(a) if a.is_dir() => Ok(()),
        Ok(_) => Err(format!("remote {} is not a directory", dir.display())),
        Err(e) => Err(format!(
            "cannot create remote directory {}: {}",
            dir.display(),
            describe(&e)
        )),
    }
}

fn tally(out: &mut Outcome, r: &TransferReport) {
    out.links_skipped += r.skipped_links.len() as u64;
    for f in &r.files {
        match &f.result {
            Ok(_) if f.skipped => out.skipped += 1,
            Ok(n) => {
                out.files += 1;
                out.bytes += n;
            }
            Err(_) => out.failed_files += 1,
        }
    }
    let mut errors: Vec<String> = r
        .failed()
        .map(|f| {
            let e = describe(f.result.as_ref().expect_err("failed"));
            if f.rename_in_doubt {
                format!(
                    "{e} (after its final rename was sent: {} may be complete under its name)",
                    f.item.remote.display()
                )
            } else {
                e
            }
        })
        .collect();
    errors.extend(
        r.other_errors
            .iter()
            .map(|(p, e)| format!("{}: {}", p.display(), describe(e))),
    );
    if errors.is_empty() {
        out.status = Status::Ok;
    } else {
        out.status = Status::Failed;
        let n = errors.len();
        let first = errors.swap_remove(0);
        out.error = Some(if n == 1 {
            first
        } else {
            let s = if n == 2 { "" } else { "s" };
            format!("{first} (and {} more problem{s})", n - 1)
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn split_all(cap: usize, chunks: &[&[u8]]) -> Vec<u8> {
        let mut s = LineSplitter::new(cap);
        let mut out = Vec::new();
        for c in chunks {
            s.feed(c, &mut out);
            assert!(s.partial.len() <= cap, "holds {} bytes", s.partial.len());
        }
        s.finish(&mut out);
        out
    }

    #[test]
    fn short_lines_pass_whole() {
        assert_eq!(split_all(8, &[b"ab\ncd", b"e\n", b"\n"]), b"ab\ncde\n\n");
        // Exactly the cap is not cut.
        assert_eq!(split_all(4, &[b"abcd\nx"]), b"abcd\nx\n");
        assert_eq!(split_all(4, &[b"ab", b"cd", b"\n"]), b"abcd\n");
    }

    #[test]
    fn long_lines_come_out_in_pieces() {
        assert_eq!(
            split_all(4, &[b"abcdefghij\nk"]),
            b"abcd [line continues]\nefgh [line continues]\nij\nk\n"
        );
        // The same, fed a byte at a time.
        let bytes = b"abcdefghij\nk";
        let chunks: Vec<&[u8]> = bytes.chunks(1).collect();
        assert_eq!(
            split_all(4, &chunks),
            b"abcd [line continues]\nefgh [line continues]\nij\nk\n"
        );
        // A line with no newline at all, far beyond the cap.
        let big = vec![b'a'; 100_000];
        let out = split_all(65536, &[&big[..40_000], &big[40_000..]]);
        let lines: Vec<&[u8]> = out.split(|&b| b == b'\n').collect();
        assert_eq!(lines.len(), 3, "two pieces and the empty tail");
        assert_eq!(lines[0].len(), 65536 + LINE_CONTINUES.len());
        assert!(lines[0].ends_with(LINE_CONTINUES));
        assert_eq!(lines[1], &big[..100_000 - 65536]);
    }

    #[test]
    fn pieces_do_not_split_characters() {
        // "é" is two bytes: a cut after 5 bytes would split the third one.
        let text = "ééééé".as_bytes();
        let out = split_all(5, &[text]);
        assert_eq!(
            String::from_utf8(out).expect("whole characters"),
            "éé [line continues]\néé [line continues]\né\n"
        );
        // Bytes that are not UTF-8 are cut at the cap.
        assert_eq!(
            split_all(2, &[&[0xff, 0xfe, 0xfd]]),
            b"\xff\xfe [line continues]\n\xfd\n"
        );
    }

    #[test]
    fn keep_stops_at_the_cap_and_counts_the_rest() {
        let mut c = Captured::default();
        for _ in 0..10 {
            c.keep(&[7u8; 1000], 2500);
        }
        assert_eq!(c.data.len(), 2500);
        assert!(c.data.capacity() <= 2500, "{}", c.data.capacity());
        assert_eq!(c.dropped, 7500);
        assert!(c.truncated());
        let mut c = Captured::default();
        c.keep(b"hello", 5);
        assert_eq!((c.data.as_slice(), c.dropped), (&b"hello"[..], 0));
        assert!(!c.truncated());
    }

    fn filtered(marker: &str, chunks: &[&[u8]]) -> (Vec<u8>, usize) {
        let mut f = PromptFilter::new(marker);
        let mut out = Vec::new();
        for c in chunks {
            f.feed(c, &mut out);
        }
        f.finish(&mut out);
        (out, f.seen)
    }

    #[test]
    fn sudo_prompts_are_taken_out_however_they_are_split() {
        let m = "[ussh-sudo-0123]";
        let text = b"[ussh-sudo-0123]err\n[ussh-sud\n[ussh-sudo-0123]";
        let want = (b"err\n[ussh-sud\n".to_vec(), 2);
        assert_eq!(filtered(m, &[text]), want);
        // Every split of the stream gives the same.
        for cut in 0..=text.len() {
            assert_eq!(filtered(m, &[&text[..cut], &text[cut..]]), want, "{cut}");
        }
        let bytes: Vec<&[u8]> = text.chunks(1).collect();
        assert_eq!(filtered(m, &bytes), want);
        // A marker's start left at the end is output after all.
        assert_eq!(filtered(m, &[b"x[ussh-su"]), (b"x[ussh-su".to_vec(), 0));
        // sudo's retry: the newline it writes at the end of its input goes.
        assert_eq!(
            filtered(
                m,
                &[
                    b"[ussh-sudo-0123]Sorry, try again.\n[ussh-sudo-0123]",
                    b"\nsudo: 1 incorrect password attempt\n"
                ]
            ),
            (
                b"Sorry, try again.\nsudo: 1 incorrect password attempt\n".to_vec(),
                2
            )
        );
        // After the first prompt a newline is the command's: kept.
        assert_eq!(
            filtered(m, &[b"[ussh-sudo-0123]\nx\n"]),
            (b"\nx\n".to_vec(), 1)
        );
    }

    #[test]
    fn sudo_commands_quote_the_command() {
        let p = Arc::new(crate::secret::test_password("pw"));
        let s = Sudo::new(p);
        assert!(s.marker.starts_with("[ussh-sudo-") && !s.marker.contains('%'));
        assert_eq!(s.marker.len(), "[ussh-sudo-]".len() + 16);
        let w = s.wrap("echo 'a b' $HOME");
        assert_eq!(
            w,
            format!(
                "sudo -k -S -p '{}' -- sh -c 'exec </dev/null; echo '\\''a b'\\'' $HOME'",
                s.marker
            )
        );
        assert!(!w.contains("pw"));
        assert_ne!(Sudo::new(s.password.clone()).marker, s.marker);
    }

    #[test]
    fn output_file_names_are_one_component() {
        for bad in ["", ".", "..", "a/b", "../x", "/etc/passwd", "a\0b"] {
            assert!(file_name_problem(bad).is_some(), "{bad:?}");
        }
        for good in ["web01", "ops@db1:2222", "[::1]:22", "...", "a b"] {
            assert_eq!(file_name_problem(good), None, "{good:?}");
        }
    }

    #[test]
    fn output_files_refuse_symbolic_links() {
        let dir = tempfile::tempdir().expect("temp dir");
        let victim = dir.path().join("victim");
        std::fs::write(&victim, b"keep me").expect("write");
        std::fs::create_dir(dir.path().join("out")).expect("mkdir");
        std::os::unix::fs::symlink(&victim, dir.path().join("out/h1")).expect("symlink");
        let e = create_output_file(&dir.path().join("out"), "h1").expect_err("link followed");
        assert!(e.contains("symbolic link"), "{e}");
        assert_eq!(std::fs::read(&victim).expect("read"), b"keep me");
        // An existing file is emptied.
        std::fs::write(dir.path().join("out/h2"), b"old").expect("write");
        let (_, path) = create_output_file(&dir.path().join("out"), "h2").expect("create");
        assert_eq!(std::fs::read(path).expect("read"), b"");
        let e = create_output_file(&dir.path().join("out"), "../victim").expect_err("escaped");
        assert!(e.contains("'/'"), "{e}");
    }
}
