//! One host's job: connect (with retries), authenticate, run the command or
//! move the files, and say what happened. Every failure ends up in the
//! host's [`Outcome`]; nothing here stops another host.

use std::cell::Cell;
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncReadExt};
use uring_ssh::sftp::{
    self, Progress, Sftp, TransferItem, TransferOptions, TransferReport, download_tree_over,
    upload_tree_over,
};
use uring_ssh::{Config, Error, Session};

use crate::ui::Ui;

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

/// Settings shared by every host.
#[derive(Clone)]
pub struct Job {
    /// The work.
    pub op: Op,
    /// Transfer settings (progress callback set per host).
    pub transfer: TransferOptions,
    /// Retries after connection-level failures.
    pub retries: u32,
    /// Bound of a host's whole job.
    pub timeout: Option<Duration>,
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
    /// The command's exit code.
    pub exit_code: Option<i32>,
    /// The signal that killed the command.
    pub signal: Option<String>,
    /// Bytes moved.
    pub bytes: u64,
    /// Files moved.
    pub files: u64,
    /// Files skipped as unchanged.
    pub skipped: u64,
    /// Files that failed.
    pub failed_files: u64,
    /// From start to end, retries included.
    pub duration: Duration,
    /// One line saying what went wrong.
    pub error: Option<String>,
    /// Connection attempts.
    pub attempts: u32,
    /// Collected stdout (exec).
    pub stdout: Vec<u8>,
    /// Collected stderr (exec).
    pub stderr: Vec<u8>,
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
            failed_files: 0,
            duration: Duration::ZERO,
            error: None,
            attempts: 0,
            stdout: Vec::new(),
            stderr: Vec::new(),
        }
    }
}

/// A failure to reach a host, and whether trying again may help.
struct Fail {
    msg: String,
    retry: bool,
}

/// One line for a library error, without the OS error number.
pub fn describe(e: &Error) -> String {
    let s = e.to_string();
    match s.find(" (os error") {
        Some(i) => s[..i].to_string(),
        None => s,
    }
}

fn secs(d: Duration) -> String {
    let s = d.as_secs_f64();
    if s.fract() == 0.0 {
        format!("{s:.0} s")
    } else {
        format!("{s:.1} s")
    }
}

/// Runs `job` on the host of `plan`; never fails, the outcome says how it
/// went. `phase` tells a whole-job timeout what was going on.
pub async fn run_host(plan: &Plan, job: &Job, ui: &Rc<Ui>) -> Outcome {
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
    ui: &Rc<Ui>,
    phase: &Cell<&'static str>,
    out: &mut Outcome,
) -> Result<(), String> {
    let session = connect_with_retries(plan, job.retries, phase, out).await?;
    phase.set("authenticating");
    authenticate(&session, plan).await?;
    match &job.op {
        Op::Exec { command, collect } => {
            phase.set("running the command");
            exec(&session, plan, command, *collect, ui, out).await?;
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
            let report = put(&sftp, locals, &root, job, ui).await;
            tally(out, &report);
        }
    }
    phase.set("closing");
    // The work is done: a slow goodbye is not a failure.
    let _ = tokio::time::timeout(Duration::from_secs(2), session.close("done")).await;
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
) -> Result<Session, String> {
    let mut attempt = 0u32;
    loop {
        attempt += 1;
        out.attempts = attempt;
        phase.set("connecting");
        match connect(plan).await {
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

async fn connect(plan: &Plan) -> Result<Session, Fail> {
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
            let retry = matches!(e, Error::Io(_) | Error::Timeout { .. });
            let msg = match &e {
                Error::Io(io) if io.kind() == std::io::ErrorKind::ConnectionRefused => {
                    format!("connection refused by {host} port {}", plan.port)
                }
                Error::Timeout { .. } => format!(
                    "connect to {host} port {} timed out after {}",
                    plan.port,
                    secs(t)
                ),
                Error::HostKey(_) => format!("{} (port {})", describe(&e), plan.port),
                _ => format!("connect to {host} port {}: {}", plan.port, describe(&e)),
            };
            Err(Fail { msg, retry })
        }
    }
}

async fn authenticate(session: &Session, plan: &Plan) -> Result<(), String> {
    let user = plan.user.as_str();
    let mut tried = Vec::new();
    if let Some(sock) = &plan.agent {
        match session.auth_agent_at(user, sock.as_deref()).await {
            Ok(()) => return Ok(()),
            Err(e) if e.is_auth_failure() => tried.push("agent keys refused".to_string()),
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
            Err(e) => tried.push(format!("key {}: {}", key.display(), describe(&e))),
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

/// Reads `r` to its end, streaming `host: line` or collecting.
async fn pump<R: AsyncRead + Unpin>(
    mut r: R,
    label: &str,
    stderr: bool,
    stream: bool,
    ui: &Ui,
    collected: &mut Vec<u8>,
) -> Result<(), Error> {
    let mut buf = vec![0u8; 32 * 1024];
    let mut partial: Vec<u8> = Vec::new();
    loop {
        let n = r.read(&mut buf).await.map_err(Error::Io)?;
        if n == 0 {
            break;
        }
        if !stream {
            collected.extend_from_slice(&buf[..n]);
            continue;
        }
        partial.extend_from_slice(&buf[..n]);
        if let Some(last) = partial.iter().rposition(|&b| b == b'\n') {
            ui.host_lines(label, &partial[..=last], stderr);
            partial.drain(..=last);
        }
    }
    if stream && !partial.is_empty() {
        partial.push(b'\n');
        ui.host_lines(label, &partial, stderr);
    }
    Ok(())
}

async fn exec(
    session: &Session,
    plan: &Plan,
    command: &str,
    collect: bool,
    ui: &Rc<Ui>,
    out: &mut Outcome,
) -> Result<(), String> {
    let fail = |what: &str, e: Error| format!("{what}: {}", describe(&e));
    let mut ch = session
        .exec(command)
        .await
        .map_err(|e| fail("cannot run the command", e))?;
    // Nothing on stdin, as `ssh host cmd < /dev/null`.
    let _ = ch.send_eof().await;
    let stderr = ch.stderr();
    let (mut o, mut e) = (Vec::new(), Vec::new());
    // In gathered mode stderr still streams, as clush -b does.
    let stream_err = !ui.json();
    let (ro, re) = futures_util::future::join(
        pump(&mut ch, &plan.label, false, !collect, ui, &mut o),
        pump(stderr, &plan.label, true, stream_err, ui, &mut e),
    )
    .await;
    ro.map_err(|e| fail("reading output", e))?;
    re.map_err(|e| fail("reading error output", e))?;
    let st = ch.wait().await.map_err(|e| fail("waiting for exit", e))?;
    out.stdout = o;
    out.stderr = e;
    out.exit_code = Some(st.code);
    out.signal = st.signal.clone();
    if st.success() {
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

fn base_name(p: &Path) -> PathBuf {
    match p.file_name() {
        Some(n) => PathBuf::from(n),
        None => PathBuf::from("root"),
    }
}

/// Transfer options for one host, with its progress feeding the totals.
fn host_options(job: &Job, ui: &Rc<Ui>) -> TransferOptions {
    let mut o = job.transfer.clone();
    let ui = ui.clone();
    let last = Cell::new(0u64);
    o.progress = Some(Rc::new(move |p: &Progress| {
        let prev = last.replace(p.bytes_done);
        ui.add_bytes(p.bytes_done.saturating_sub(prev));
    }));
    o
}

async fn get(
    sftp: &Sftp,
    remotes: &[PathBuf],
    root: &Path,
    job: &Job,
    ui: &Rc<Ui>,
) -> TransferReport {
    let mut total = TransferReport::default();
    if let Err(e) = std::fs::create_dir_all(root) {
        total.other_errors.push((
            root.to_path_buf(),
            Error::InvalidInput(format!("cannot create {}: {e}", root.display())),
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
    ui: &Rc<Ui>,
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

fn merge(into: &mut TransferReport, r: TransferReport) {
    into.files.extend(r.files);
    into.other_errors.extend(r.other_errors);
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
            format!("{first} (and {} more problems)", n - 1)
        });
    }
}
