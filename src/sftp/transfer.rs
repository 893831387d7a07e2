//! Whole-file and many-file transfers with many requests in flight.
//!
//! One file: its READs (or WRITEs) are all queued at once up to a byte
//! budget, so the server never waits for the client. Many files: opens,
//! reads, writes and closes of different files are pipelined on the same
//! channel, with at most `max_open_files` handles open per channel and at
//! most `max_bytes_in_flight` bytes requested but not yet received (or
//! sent but not yet acknowledged) over all of them.
//!
//! Nothing is reported done before it is: a downloaded file is written
//! under a temporary name next to its destination and renamed only after
//! its last byte (the remote end said EOF); an upload goes to a temporary
//! remote name, is acknowledged write by write, optionally fsynced, and
//! renamed last. A failed file leaves no file under its final name, with
//! one exception the protocol cannot avoid: an upload whose connection
//! broke after its (complete) file's RENAME was sent and before the reply
//! came may or may not have been renamed; its outcome says so
//! ([`FileOutcome::rename_in_doubt`]).

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::fs;
use std::io;
use std::os::unix::fs::{FileExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::time::{Duration, SystemTime};

use futures_util::stream::{FuturesUnordered, StreamExt};
use tokio::sync::{Semaphore, SemaphorePermit};

use super::client::{ReplyFuture, status_ok, unexpected};
use super::codec::{self, FileAttributes, Reply, fxp};
use super::file::{File, open_handle};
use super::{Sftp, wire};
use crate::error::{Error, Result};

/// Progress of a many-file transfer, as reported to the callback.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Progress {
    /// Files finished (transferred or skipped as unchanged).
    pub files_done: u64,
    /// Files that failed.
    pub files_failed: u64,
    /// Files in the transfer.
    pub files_total: u64,
    /// Bytes moved so far (data of files in progress included).
    pub bytes_done: u64,
}

/// A progress callback.
pub type ProgressFn = Rc<dyn Fn(&Progress)>;

/// How a transfer runs. The defaults suit both one large file and many
/// small ones; see the field docs for how they were chosen.
#[derive(Clone)]
pub struct TransferOptions {
    /// Files open at once per channel (capped by the server's
    /// `max-open-handles`). Default 64: enough to keep sftp-server busy
    /// with small files while it serves one request at a time.
    pub max_open_files: usize,
    /// Bytes requested but not yet received (or sent but not yet
    /// acknowledged), over all files of one channel. Default 4 MiB: twice
    /// the channel window; more only queues in the server.
    pub max_bytes_in_flight: usize,
    /// Bytes per READ or WRITE request; `None`: the server's limit, capped
    /// at 255 KiB (see [`Sftp::io_sizes`]).
    pub request_size: Option<u32>,
    /// Copy permission bits and modification/access times.
    pub preserve: bool,
    /// Write to a temporary name and rename after the last byte.
    /// Default true.
    pub atomic: bool,
    /// Upload: `fsync@openssh.com` each file before its rename (if the
    /// server offers it). Download: `fsync` each local file. Default false.
    pub fsync: bool,
    /// Skip files whose destination exists with the same size and
    /// modification time (implies `preserve`, so that a second run finds
    /// the times it set).
    pub skip_unchanged: bool,
    /// Called after each file finishes or fails.
    pub progress: Option<ProgressFn>,
}

impl Default for TransferOptions {
    fn default() -> Self {
        TransferOptions {
            max_open_files: 64,
            max_bytes_in_flight: 4 * 1024 * 1024,
            request_size: None,
            preserve: false,
            atomic: true,
            fsync: false,
            skip_unchanged: false,
            progress: None,
        }
    }
}

impl std::fmt::Debug for TransferOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TransferOptions")
            .field("max_open_files", &self.max_open_files)
            .field("max_bytes_in_flight", &self.max_bytes_in_flight)
            .field("request_size", &self.request_size)
            .field("preserve", &self.preserve)
            .field("atomic", &self.atomic)
            .field("fsync", &self.fsync)
            .field("skip_unchanged", &self.skip_unchanged)
            .field("progress", &self.progress.is_some())
            .finish()
    }
}

/// One file to move: its remote path and its local path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TransferItem {
    /// The path on the server.
    pub remote: PathBuf,
    /// The path on this machine.
    pub local: PathBuf,
    /// The source's attributes if already known (a directory listing gives
    /// them): saves a stat per file.
    pub attrs: Option<FileAttributes>,
}

impl TransferItem {
    /// An item with unknown attributes.
    pub fn new(remote: impl Into<PathBuf>, local: impl Into<PathBuf>) -> Self {
        TransferItem {
            remote: remote.into(),
            local: local.into(),
            attrs: None,
        }
    }
}

/// What happened to one file.
#[derive(Debug)]
pub struct FileOutcome {
    /// The file.
    pub item: TransferItem,
    /// Bytes moved, or why it failed. A failed file is not at its
    /// destination under its final name, unless `rename_in_doubt`.
    pub result: Result<u64>,
    /// It was skipped as unchanged.
    pub skipped: bool,
    /// Bytes that made it, even if the file failed: written locally (a
    /// download), or acknowledged by the server (an upload: a WRITE the
    /// server answered with OK). For a failed atomic transfer these bytes
    /// were in the temporary file, which is removed.
    pub bytes_acknowledged: u64,
    /// An upload that failed after every byte was acknowledged and the
    /// RENAME to the final name was sent, without an answer (the connection
    /// broke or stalled): the server may have renamed it. The file is then
    /// complete under its final name, or still under its temporary one.
    pub rename_in_doubt: bool,
}

/// What a many-file transfer did, file by file (in completion order).
#[derive(Debug, Default)]
pub struct TransferReport {
    /// Every file of the transfer.
    pub files: Vec<FileOutcome>,
    /// Problems that are not about one file (a directory that could not
    /// be listed or created), with the path concerned.
    pub other_errors: Vec<(PathBuf, Error)>,
}

impl TransferReport {
    /// Files moved or skipped as unchanged.
    pub fn succeeded(&self) -> usize {
        self.files.iter().filter(|f| f.result.is_ok()).count()
    }

    /// Files that failed.
    pub fn failed(&self) -> impl Iterator<Item = &FileOutcome> {
        self.files.iter().filter(|f| f.result.is_err())
    }

    /// Bytes moved.
    pub fn bytes(&self) -> u64 {
        self.files
            .iter()
            .filter_map(|f| f.result.as_ref().ok())
            .sum()
    }

    /// Whether every file and directory succeeded.
    pub fn is_complete(&self) -> bool {
        self.failed().next().is_none() && self.other_errors.is_empty()
    }
}

/// Per-channel limits shared by the files moving over it.
struct Lane {
    sftp: Sftp,
    /// Permits are KiB in flight.
    budget: Semaphore,
    open: Cell<usize>,
    max_open: usize,
    request_size: u32,
}

impl Lane {
    fn new(sftp: &Sftp, opts: &TransferOptions, write: bool) -> Lane {
        let (r, w) = sftp.io_sizes();
        let server = if write { w } else { r };
        let request_size = opts
            .request_size
            .unwrap_or(server)
            .clamp(1024, server.max(1024));
        let mut max_open = opts.max_open_files.max(1);
        let limit = sftp.limits().max_open_handles;
        if limit > 0 {
            // Leave room for the caller's own handles.
            max_open = max_open.min((limit as usize).saturating_sub(4).max(1));
        }
        let kib = (opts.max_bytes_in_flight / 1024).max(request_size as usize / 1024 + 1);
        Lane {
            sftp: sftp.clone(),
            budget: Semaphore::new(kib),
            open: Cell::new(0),
            max_open,
            request_size,
        }
    }

    fn permits(&self, len: u32) -> u32 {
        len.div_ceil(1024).max(1)
    }
}

/// A temporary name next to `path`.
fn temp_name(path: &Path) -> PathBuf {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let n = N.fetch_add(1, Ordering::Relaxed);
    path.with_file_name(format!(".{name}.{}-{n}.part", std::process::id()))
}

fn mtime_secs(m: &fs::Metadata) -> Option<u32> {
    m.modified()
        .ok()?
        .duration_since(SystemTime::UNIX_EPOCH)
        .ok()
        .map(|d| d.as_secs() as u32)
}

fn local_unchanged(local: &Path, a: &FileAttributes) -> bool {
    match fs::metadata(local) {
        Ok(m) => {
            m.is_file() && Some(m.len()) == a.size && a.mtime.is_some() && mtime_secs(&m) == a.mtime
        }
        Err(_) => false,
    }
}

async fn close_remote(sftp: &Sftp, handle: &[u8]) -> Result<()> {
    let r = sftp
        .inner
        .client
        .request(false, |out, id| {
            codec::Request::new(out, fxp::CLOSE, id)
                .str(handle)
                .finish();
        })
        .await?;
    status_ok(r, None)
}

/// A remote handle that is closed in the background if the transfer of its
/// file stops early (error, drop).
struct RemoteHandle<'a> {
    sftp: &'a Sftp,
    bytes: Option<Vec<u8>>,
}

impl RemoteHandle<'_> {
    async fn close(mut self) -> Result<()> {
        let h = self.bytes.take().expect("closed once");
        close_remote(self.sftp, &h).await
    }
}

impl Drop for RemoteHandle<'_> {
    fn drop(&mut self) {
        if let Some(h) = self.bytes.take() {
            self.sftp.inner.client.send_and_forget(|out, id| {
                codec::Request::new(out, fxp::CLOSE, id).str(&h).finish();
            });
        }
    }
}

/// Removes a local temporary file unless disarmed.
struct LocalTemp(Option<PathBuf>);

impl Drop for LocalTemp {
    fn drop(&mut self) {
        if let Some(p) = self.0.take() {
            let _ = fs::remove_file(p);
        }
    }
}

/// Bytes moved: of the whole transfer (for progress) and of one file.
struct Moved<'a> {
    total: &'a Cell<u64>,
    file: Cell<u64>,
    /// The final RENAME of an upload was sent.
    rename_sent: Cell<bool>,
}

impl Moved<'_> {
    fn add(&self, n: u64) {
        self.total.set(self.total.get() + n);
        self.file.set(self.file.get() + n);
    }
}

/// Downloads one file over `lane`. `progress` is credited with each chunk.
async fn download_one(
    lane: &Lane,
    item: &TransferItem,
    opts: &TransferOptions,
    progress: &Moved<'_>,
) -> Result<u64> {
    let sftp = &lane.sftp;
    let handle = open_handle(sftp, &item.remote, codec::open_flags::READ, 0).await?;
    let handle = RemoteHandle {
        sftp,
        bytes: Some(handle),
    };
    let h = handle.bytes.as_deref().expect("open");
    let attrs = match &item.attrs {
        Some(a) if a.size.is_some() => a.clone(),
        _ => {
            let r = sftp
                .inner
                .client
                .request(false, |out, id| {
                    codec::Request::new(out, fxp::FSTAT, id).str(h).finish();
                })
                .await?;
            match r {
                Reply::Attrs(a) => a,
                other => return Err(unexpected(other, Some(wire(&item.remote)))),
            }
        }
    };
    let dest = if opts.atomic {
        temp_name(&item.local)
    } else {
        item.local.clone()
    };
    let out = fs::File::create(&dest).map_err(|e| local_err(&dest, e))?;
    let mut temp = LocalTemp(Some(dest.clone()));
    let size = attrs.size.unwrap_or(0);
    let chunk = lane.request_size;
    // In flight, in offset order: (offset, asked, budget held, reply).
    let mut reads: VecDeque<(u64, u32, SemaphorePermit<'_>, ReplyFuture)> = VecDeque::new();
    let mut next = 0u64;
    let mut total = 0u64;
    loop {
        // Queue full-size reads over the announced size, up to the budget;
        // past it, one read at a time (the file grew, or the EOF proves
        // we have it all).
        while next < size || reads.is_empty() {
            let permits = lane.permits(chunk);
            let permit = if reads.is_empty() {
                lane.budget.acquire_many(permits).await
            } else {
                match lane.budget.try_acquire_many(permits) {
                    Ok(p) => Ok(p),
                    Err(_) => break,
                }
            };
            let permit = permit.map_err(|_| Error::Closed("transfer"))?;
            let f = File::read_request(&sftp.inner.client, h, next, chunk);
            reads.push_back((next, chunk, permit, f));
            next += chunk as u64;
        }
        let (off, len, _, f) = reads.front_mut().expect("one read queued");
        let (off, len) = (*off, *len);
        let r = f.await;
        reads.pop_front();
        match r? {
            Reply::Data(d) if !d.is_empty() && d.len() <= len as usize => {
                out.write_all_at(&d, off).map_err(|e| local_err(&dest, e))?;
                total += d.len() as u64;
                progress.add(d.len() as u64);
                if d.len() < len as usize {
                    let end = off + d.len() as u64;
                    if end == size && total == size {
                        // A short read that ends exactly at the size the
                        // server announced: the server's read(2) stopped at
                        // the end of the file. This saves a READ per file
                        // (a quarter of the requests for small files).
                        break;
                    }
                    // Short elsewhere: everything queued behind assumed a
                    // full read.
                    reads.clear();
                    next = end;
                }
            }
            Reply::Data(_) => {
                return Err(Error::Protocol(
                    "READ reply empty or longer than asked".into(),
                ));
            }
            Reply::Status {
                code: codec::status::EOF,
                ..
            } => {
                if off != total {
                    return Err(Error::Protocol(format!(
                        "EOF at offset {off} of {} after {total} bytes",
                        item.remote.display()
                    )));
                }
                reads.clear();
                break;
            }
            other => return Err(unexpected(other, Some(wire(&item.remote)))),
        }
    }
    handle.close().await?;
    if opts.preserve || opts.skip_unchanged {
        if let Some(p) = attrs.permissions {
            out.set_permissions(fs::Permissions::from_mode(p & 0o7777))
                .map_err(|e| local_err(&dest, e))?;
        }
        if let (Some(a), Some(m)) = (attrs.atime, attrs.mtime) {
            let t = fs::FileTimes::new()
                .set_accessed(SystemTime::UNIX_EPOCH + Duration::from_secs(a as u64))
                .set_modified(SystemTime::UNIX_EPOCH + Duration::from_secs(m as u64));
            out.set_times(t).map_err(|e| local_err(&dest, e))?;
        }
    }
    if opts.fsync {
        out.sync_all().map_err(|e| local_err(&dest, e))?;
    }
    drop(out);
    if opts.atomic {
        fs::rename(&dest, &item.local).map_err(|e| local_err(&item.local, e))?;
    }
    temp.0 = None;
    Ok(total)
}

/// Uploads one file over `lane`.
async fn upload_one(
    lane: &Lane,
    item: &TransferItem,
    opts: &TransferOptions,
    progress: &Moved<'_>,
) -> Result<u64> {
    let sftp = &lane.sftp;
    let src = fs::File::open(&item.local).map_err(|e| local_err(&item.local, e))?;
    let meta = src.metadata().map_err(|e| local_err(&item.local, e))?;
    if !meta.is_file() {
        return Err(Error::InvalidInput(format!(
            "{} is not a regular file",
            item.local.display()
        )));
    }
    let mode = meta.permissions().mode() & 0o7777;
    let dest = if opts.atomic {
        temp_name(&item.remote)
    } else {
        item.remote.clone()
    };
    let flags = codec::open_flags::WRITE | codec::open_flags::CREAT | codec::open_flags::TRUNC;
    let handle = open_handle(sftp, &dest, flags, if opts.preserve { mode } else { 0o644 }).await?;
    let handle = RemoteHandle {
        sftp,
        bytes: Some(handle),
    };
    let h = handle.bytes.as_deref().expect("open");
    let r: Result<u64> = async {
        let chunk = lane.request_size as usize;
        let mut writes: VecDeque<(SemaphorePermit<'_>, u64, ReplyFuture)> = VecDeque::new();
        let mut buf = vec![0u8; chunk];
        let mut off = 0u64;
        let mut eof = false;
        while !eof || !writes.is_empty() {
            while !eof {
                let permits = lane.permits(chunk as u32);
                let permit = if writes.is_empty() {
                    lane.budget.acquire_many(permits).await
                } else {
                    match lane.budget.try_acquire_many(permits) {
                        Ok(p) => Ok(p),
                        Err(_) => break,
                    }
                };
                let permit = permit.map_err(|_| Error::Closed("transfer"))?;
                let n = read_full_at(&src, &mut buf, off).map_err(|e| local_err(&item.local, e))?;
                if n == 0 {
                    eof = true;
                    break;
                }
                writes.push_back((
                    permit,
                    n as u64,
                    File::write_request(&sftp.inner.client, h, off, &buf[..n]),
                ));
                off += n as u64;
                if n < chunk {
                    eof = true;
                }
            }
            if let Some((_, n, f)) = writes.front_mut() {
                let n = *n;
                let r = f.await;
                writes.pop_front();
                status_ok(r?, Some(wire(&dest)))?;
                progress.add(n);
            }
        }
        if opts.preserve || opts.skip_unchanged {
            let atime = meta.accessed().ok().and_then(secs);
            let mtime = mtime_secs(&meta);
            let attrs = FileAttributes {
                permissions: Some(mode),
                atime: atime.or(mtime),
                mtime: mtime.or(atime),
                ..Default::default()
            };
            let r = sftp
                .inner
                .client
                .request(false, |out, id| {
                    codec::Request::new(out, fxp::FSETSTAT, id)
                        .str(h)
                        .attrs(&attrs)
                        .finish();
                })
                .await?;
            status_ok(r, Some(wire(&dest)))?;
        }
        if opts.fsync && sftp.extensions().fsync {
            let r = sftp
                .inner
                .client
                .request(false, |out, id| {
                    codec::Request::new(out, fxp::EXTENDED, id)
                        .str(b"fsync@openssh.com")
                        .str(h)
                        .finish();
                })
                .await?;
            status_ok(r, Some(wire(&dest)))?;
        }
        Ok(off)
    }
    .await;
    let r = match r {
        Ok(n) => handle.close().await.map(|_| n),
        Err(e) => Err(e),
    };
    match r {
        Ok(n) => {
            progress.rename_sent.set(opts.atomic);
            if opts.atomic
                && let Err(e) = sftp.rename(&dest, &item.remote).await
            {
                forget_unlink(sftp, &dest);
                return Err(e);
            }
            Ok(n)
        }
        Err(e) => {
            if opts.atomic {
                forget_unlink(sftp, &dest);
            }
            Err(e)
        }
    }
}

/// Removes a remote temporary file without waiting.
fn forget_unlink(sftp: &Sftp, path: &Path) {
    let p = wire(path);
    sftp.inner.client.send_and_forget(|out, id| {
        codec::Request::new(out, fxp::REMOVE, id).str(p).finish();
    });
}

fn secs(t: SystemTime) -> Option<u32> {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .ok()
        .map(|d| d.as_secs() as u32)
}

fn read_full_at(f: &fs::File, buf: &mut [u8], off: u64) -> io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match f.read_at(&mut buf[n..], off + n as u64) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

fn local_err(path: &Path, e: io::Error) -> Error {
    Error::Io(io::Error::new(e.kind(), format!("{}: {e}", path.display())))
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Direction {
    Download,
    Upload,
}

/// Whether the destination of `item` already matches its source.
async fn unchanged(lane: &Lane, item: &TransferItem, dir: Direction) -> bool {
    match dir {
        Direction::Download => match &item.attrs {
            Some(a) => local_unchanged(&item.local, a),
            None => match lane.sftp.stat(&item.remote).await {
                Ok(a) => local_unchanged(&item.local, &a),
                Err(_) => false,
            },
        },
        Direction::Upload => {
            let Ok(m) = fs::metadata(&item.local) else {
                return false;
            };
            match lane.sftp.stat(&item.remote).await {
                Ok(a) => a.size == Some(m.len()) && a.mtime.is_some() && a.mtime == mtime_secs(&m),
                Err(_) => false,
            }
        }
    }
}

async fn run(
    sftps: &[Sftp],
    items: Vec<TransferItem>,
    opts: &TransferOptions,
    dir: Direction,
) -> TransferReport {
    let mut report = TransferReport::default();
    if sftps.is_empty() {
        report.other_errors.push((
            PathBuf::new(),
            Error::InvalidInput("a transfer needs at least one SFTP client".into()),
        ));
        return report;
    }
    let lanes: Vec<Lane> = sftps
        .iter()
        .map(|s| Lane::new(s, opts, dir == Direction::Upload))
        .collect();
    let progress = RefCell::new(Progress {
        files_total: items.len() as u64,
        ..Default::default()
    });
    let bytes_done = Cell::new(0u64);
    let mut queue: VecDeque<TransferItem> = items.into();
    let mut running = FuturesUnordered::new();
    loop {
        // Start files while some lane has a free handle.
        while !queue.is_empty() {
            let Some(li) = (0..lanes.len())
                .filter(|&i| lanes[i].open.get() < lanes[i].max_open)
                .min_by_key(|&i| lanes[i].open.get())
            else {
                break;
            };
            let item = queue.pop_front().expect("non-empty");
            let lane = &lanes[li];
            lane.open.set(lane.open.get() + 1);
            let bytes_done = &bytes_done;
            running.push(async move {
                let moved = Moved {
                    total: bytes_done,
                    file: Cell::new(0),
                    rename_sent: Cell::new(false),
                };
                let skip = opts.skip_unchanged && unchanged(lane, &item, dir).await;
                let r = if skip {
                    Ok(0)
                } else {
                    let timeout = lane.sftp.inner.client.chan.session.config.timeout;
                    let work = async {
                        match dir {
                            Direction::Download => download_one(lane, &item, opts, &moved).await,
                            Direction::Upload => upload_one(lane, &item, opts, &moved).await,
                        }
                    };
                    // The session's timeout bounds a stall, not a file:
                    // a large file may take longer than it.
                    with_stall_timeout(timeout, bytes_done, work).await
                };
                lane.open.set(lane.open.get() - 1);
                // A status reply means the server did not rename; no reply
                // leaves it open.
                let rename_in_doubt = moved.rename_sent.get()
                    && matches!(&r, Err(e) if !matches!(e, Error::Sftp { .. }));
                FileOutcome {
                    item,
                    result: r,
                    skipped: skip,
                    bytes_acknowledged: moved.file.get(),
                    rename_in_doubt,
                }
            });
        }
        let Some(outcome) = running.next().await else {
            break;
        };
        {
            let mut p = progress.borrow_mut();
            if outcome.result.is_ok() {
                p.files_done += 1;
            } else {
                p.files_failed += 1;
            }
            p.bytes_done = bytes_done.get();
            if let Some(cb) = &opts.progress {
                cb(&p);
            }
        }
        report.files.push(outcome);
    }
    report
}

/// Runs `work`, failing with a timeout if `bytes` does not move for
/// `timeout` (no timeout: runs to the end).
async fn with_stall_timeout<T>(
    timeout: Option<Duration>,
    bytes: &Cell<u64>,
    work: impl std::future::Future<Output = Result<T>>,
) -> Result<T> {
    let Some(after) = timeout else {
        return work.await;
    };
    tokio::pin!(work);
    let mut seen = bytes.get();
    loop {
        match tokio::time::timeout(after, &mut work).await {
            Ok(r) => return r,
            Err(_) if bytes.get() != seen => seen = bytes.get(),
            Err(_) => {
                return Err(Error::Timeout {
                    operation: "SFTP transfer (no progress)",
                    after,
                });
            }
        }
    }
}

/// Downloads `items` over the given SFTP clients (one or several channels
/// or sessions to the same host; each file goes to the least busy), with
/// opens, reads and closes of many files in flight at once. Per-file
/// failures are reported without stopping the rest. Local parent
/// directories must exist.
pub async fn download_many(
    sftps: &[Sftp],
    items: Vec<TransferItem>,
    opts: &TransferOptions,
) -> TransferReport {
    run(sftps, items, opts, Direction::Download).await
}

/// Uploads `items` over the given SFTP clients; see [`download_many`].
/// Remote parent directories must exist.
pub async fn upload_many(
    sftps: &[Sftp],
    items: Vec<TransferItem>,
    opts: &TransferOptions,
) -> TransferReport {
    run(sftps, items, opts, Direction::Upload).await
}

/// Lists a remote tree: its directories (parents first) and its files
/// with their attributes, listing many directories at once.
async fn walk_remote(
    sftp: &Sftp,
    root: &Path,
    errors: &mut Vec<(PathBuf, Error)>,
) -> (Vec<PathBuf>, Vec<(PathBuf, FileAttributes)>, Vec<PathBuf>) {
    const LISTINGS_AT_ONCE: usize = 16;
    let mut dirs = vec![PathBuf::new()];
    let mut files = Vec::new();
    let mut links = Vec::new();
    let mut todo: VecDeque<PathBuf> = VecDeque::from([PathBuf::new()]);
    let mut running = FuturesUnordered::new();
    loop {
        while running.len() < LISTINGS_AT_ONCE {
            let Some(rel) = todo.pop_front() else { break };
            let full = root.join(&rel);
            running.push(async move {
                let r = sftp.read_dir_all(&full).await;
                (rel, full, r)
            });
        }
        let Some((rel, full, r)) = running.next().await else {
            break;
        };
        match r {
            Ok(entries) => {
                for e in entries {
                    let name = super::path_from(e.name_bytes().to_vec());
                    let child = rel.join(name);
                    let a = e.attrs();
                    if a.is_dir() {
                        dirs.push(child.clone());
                        todo.push_back(child);
                    } else if a.is_symlink() {
                        links.push(child);
                    } else if a.is_file() || a.permissions.is_none() {
                        files.push((child, a.clone()));
                    }
                }
            }
            Err(e) => errors.push((full, e)),
        }
    }
    (dirs, files, links)
}

impl Sftp {
    /// Downloads one file to `local` with many reads in flight; returns the
    /// bytes received. The file appears under its name only once complete.
    pub async fn download(&self, remote: impl AsRef<Path>, local: impl AsRef<Path>) -> Result<u64> {
        self.download_with(remote, local, &TransferOptions::default())
            .await
    }

    /// [`Sftp::download`] with options.
    pub async fn download_with(
        &self,
        remote: impl AsRef<Path>,
        local: impl AsRef<Path>,
        opts: &TransferOptions,
    ) -> Result<u64> {
        let item = TransferItem::new(remote.as_ref(), local.as_ref());
        let mut r = run(
            std::slice::from_ref(self),
            vec![item],
            opts,
            Direction::Download,
        )
        .await;
        single(&mut r)
    }

    /// Uploads one file from `local` with many writes in flight; returns
    /// the bytes sent. The remote file appears under its name only once
    /// every write is acknowledged.
    pub async fn upload(&self, local: impl AsRef<Path>, remote: impl AsRef<Path>) -> Result<u64> {
        self.upload_with(local, remote, &TransferOptions::default())
            .await
    }

    /// [`Sftp::upload`] with options.
    pub async fn upload_with(
        &self,
        local: impl AsRef<Path>,
        remote: impl AsRef<Path>,
        opts: &TransferOptions,
    ) -> Result<u64> {
        let item = TransferItem::new(remote.as_ref(), local.as_ref());
        let mut r = run(
            std::slice::from_ref(self),
            vec![item],
            opts,
            Direction::Upload,
        )
        .await;
        single(&mut r)
    }

    /// Downloads the tree under `remote` into `local` (created if needed):
    /// directories, regular files and symbolic links (recreated as links).
    pub async fn download_tree(
        &self,
        remote: impl AsRef<Path>,
        local: impl AsRef<Path>,
        opts: &TransferOptions,
    ) -> TransferReport {
        download_tree_over(
            std::slice::from_ref(self),
            remote.as_ref(),
            local.as_ref(),
            opts,
        )
        .await
    }

    /// Uploads the tree under `local` into `remote` (created if needed):
    /// directories and regular files; symbolic links are followed.
    pub async fn upload_tree(
        &self,
        local: impl AsRef<Path>,
        remote: impl AsRef<Path>,
        opts: &TransferOptions,
    ) -> TransferReport {
        upload_tree_over(
            std::slice::from_ref(self),
            local.as_ref(),
            remote.as_ref(),
            opts,
        )
        .await
    }
}

fn single(r: &mut TransferReport) -> Result<u64> {
    if let Some((_, e)) = r.other_errors.pop() {
        return Err(e);
    }
    match r.files.pop() {
        Some(f) => f.result,
        None => Err(Error::Protocol("transfer ended without its file".into())),
    }
}

/// [`Sftp::download_tree`] spread over several clients of the same host.
pub async fn download_tree_over(
    sftps: &[Sftp],
    remote: &Path,
    local: &Path,
    opts: &TransferOptions,
) -> TransferReport {
    let mut errors = Vec::new();
    let Some(first) = sftps.first() else {
        return run(sftps, Vec::new(), opts, Direction::Download).await;
    };
    let (dirs, files, links) = walk_remote(first, remote, &mut errors).await;
    for d in &dirs {
        let p = local.join(d);
        if let Err(e) = fs::create_dir_all(&p) {
            errors.push((p.clone(), local_err(&p, e)));
        }
    }
    for l in &links {
        match first.readlink(remote.join(l)).await {
            Ok(target) => {
                let p = local.join(l);
                let _ = fs::remove_file(&p);
                if let Err(e) = std::os::unix::fs::symlink(&target, &p) {
                    errors.push((p.clone(), local_err(&p, e)));
                }
            }
            Err(e) => errors.push((remote.join(l), e)),
        }
    }
    let items = files
        .into_iter()
        .map(|(rel, attrs)| TransferItem {
            remote: remote.join(&rel),
            local: local.join(&rel),
            attrs: Some(attrs),
        })
        .collect();
    let mut report = run(sftps, items, opts, Direction::Download).await;
    report.other_errors.extend(errors);
    report
}

/// [`Sftp::upload_tree`] spread over several clients of the same host.
pub async fn upload_tree_over(
    sftps: &[Sftp],
    local: &Path,
    remote: &Path,
    opts: &TransferOptions,
) -> TransferReport {
    let mut errors = Vec::new();
    let Some(first) = sftps.first() else {
        return run(sftps, Vec::new(), opts, Direction::Upload).await;
    };
    let mut dirs = vec![PathBuf::new()];
    let mut items = Vec::new();
    let mut i = 0;
    while i < dirs.len() {
        let rel = dirs[i].clone();
        i += 1;
        let rd = match fs::read_dir(local.join(&rel)) {
            Ok(rd) => rd,
            Err(e) => {
                let p = local.join(&rel);
                errors.push((p.clone(), local_err(&p, e)));
                continue;
            }
        };
        for entry in rd.flatten() {
            let child = rel.join(entry.file_name());
            match fs::metadata(entry.path()) {
                Ok(m) if m.is_dir() => dirs.push(child),
                Ok(m) if m.is_file() => {
                    items.push(TransferItem::new(remote.join(&child), local.join(&child)))
                }
                Ok(_) => {}
                Err(e) => errors.push((entry.path(), local_err(&entry.path(), e))),
            }
        }
    }
    // Parents before children; each level's mkdirs are in flight at once.
    let mut by_depth: Vec<Vec<&PathBuf>> = Vec::new();
    for d in &dirs {
        let depth = d.components().count();
        if by_depth.len() <= depth {
            by_depth.resize(depth + 1, Vec::new());
        }
        by_depth[depth].push(d);
    }
    for level in by_depth {
        let mut mk = FuturesUnordered::new();
        for d in level {
            let p = remote.join(d);
            mk.push(async move {
                let r = first.mkdir(&p, 0o755).await;
                (p, r)
            });
        }
        while let Some((p, r)) = mk.next().await {
            if let Err(e) = r {
                // An existing directory is fine.
                let exists = matches!(first.stat(&p).await, Ok(a) if a.is_dir());
                if !exists {
                    errors.push((p, e));
                }
            }
        }
    }
    let mut report = run(sftps, items, opts, Direction::Upload).await;
    report.other_errors.extend(errors);
    report
}
