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
use std::ffi::{OsStr, OsString};
use std::fs;
use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::time::{Duration, SystemTime};

use futures_util::stream::{FuturesUnordered, StreamExt};
use tokio::sync::{Notify, Semaphore, SemaphorePermit};

use super::client::{status_ok, unexpected};
use super::codec::{self, FileAttributes, Reply};
use super::file::open_handle;
use super::pipeline::{Chunk, ReadPipeline, WritePipeline};
use super::rope::Rope;
use super::{Sftp, wire};
use crate::error::{Error, InvalidInput, Result};
use crate::localdir::{self, ConfinedDir, DirCache, RelPath, check_name, escape_name};
use crate::reactor::files::{self, HeldFd};

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

/// What a tree transfer does with symbolic links (rsync's `--links`,
/// `--safe-links`). A link is never followed when writing, whatever the
/// policy: files and directories are created beneath the destination with
/// symbolic links refused by the kernel.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum LinkPolicy {
    /// Recreate each link as a link with the same target (the default).
    #[default]
    Keep,
    /// Skip links.
    Skip,
    /// Recreate links whose target stays inside the tree (relative, and
    /// never climbing above the tree's root); skip the others.
    Safe,
}

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
    /// Called after each file finishes or fails, and while files are in
    /// flight every 100 ms in which bytes moved and every 16 MiB (so that
    /// one large file shows progress before its end). `bytes_done` never
    /// decreases.
    pub progress: Option<ProgressFn>,
    /// Symbolic links in a tree: kept as links (default), skipped, or kept
    /// only when they stay inside the tree.
    pub links: LinkPolicy,
    /// Uploads: follow local symbolic links that point outside the source
    /// tree. Default false: such links are skipped and reported (links
    /// inside the tree are followed).
    pub follow_external_links: bool,
    /// Entries (files, directories and links) a tree may hold. Default
    /// 1,000,000; a larger tree fails with [`Error::LimitExceeded`] past it,
    /// keeping what was transferred.
    pub max_entries: u64,
    /// Directory depth below the root of a tree. Default 256.
    pub max_depth: usize,
    /// Downloads: bytes one file may have. `None` (default): no limit
    /// besides `max_growth`.
    pub max_file_size: Option<u64>,
    /// Downloads: bytes a file may grow past the size the server announced
    /// for it while it is read (a log being written). A file is read until
    /// the server says EOF, so without this bound a server could send one
    /// file without end. Default 64 MiB; past it the file fails with
    /// [`Error::LimitExceeded`].
    pub max_growth: u64,
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
            links: LinkPolicy::Keep,
            follow_external_links: false,
            max_entries: 1_000_000,
            max_depth: 256,
            max_file_size: None,
            max_growth: 64 * 1024 * 1024,
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
            .field("links", &self.links)
            .field("follow_external_links", &self.follow_external_links)
            .field("max_entries", &self.max_entries)
            .field("max_depth", &self.max_depth)
            .field("max_file_size", &self.max_file_size)
            .field("max_growth", &self.max_growth)
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
    /// be listed or created, a name refused, a limit reached), with the
    /// path concerned.
    pub other_errors: Vec<(PathBuf, Error)>,
    /// Symbolic links skipped by [`TransferOptions::links`] (or, uploading,
    /// because they lead outside the tree).
    pub skipped_links: Vec<PathBuf>,
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
    /// `reserved`: handles the transfer keeps open besides its files (a
    /// tree walk's directory listings on this channel).
    fn new(sftp: &Sftp, opts: &TransferOptions, write: bool, reserved: usize) -> Lane {
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
            let usable = usize::try_from(limit).unwrap_or(usize::MAX);
            max_open = max_open.min(usable.saturating_sub(4 + reserved).max(1));
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

    /// Budget for a request of `len` bytes: waited for if `wait` (the
    /// file has nothing in flight, so it must get some), else `None` when
    /// the budget is spent.
    async fn reserve(&self, len: u32, wait: bool) -> Result<Option<SemaphorePermit<'_>>> {
        let permits = len.div_ceil(1024).max(1);
        let permit = if wait {
            self.budget.acquire_many(permits).await
        } else {
            match self.budget.try_acquire_many(permits) {
                Ok(p) => Ok(p),
                Err(_) => return Ok(None),
            }
        };
        permit.map(Some).map_err(|_| Error::Closed("transfer"))
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

/// Whether `name` is one of the temporary names an atomic upload writes
/// to before its rename, `.NAME.PID-N.part` (PID and N in decimal, NAME not
/// empty, without `/`), as an interrupted upload leaves them. Nothing else matches:
/// not `.NAME.part`, not `NAME.PID-N.part`, not `.NAME.12a-0.part`.
pub fn is_upload_temp_name(name: &[u8]) -> bool {
    let digits = |b: &[u8]| !b.is_empty() && b.iter().all(u8::is_ascii_digit);
    let Some(inner) = name
        .strip_prefix(b".")
        .and_then(|n| n.strip_suffix(b".part"))
    else {
        return false;
    };
    let Some(dot) = inner.iter().rposition(|&b| b == b'.') else {
        return false;
    };
    let (base, ids) = (&inner[..dot], &inner[dot + 1..]);
    let Some(dash) = ids.iter().position(|&b| b == b'-') else {
        return false;
    };
    // A name from a listing is the server's: one with `/` would reach
    // into another directory, and is never one of ours.
    let plain = !base.is_empty() && !base.iter().any(|&b| b == b'/' || b == 0);
    plain && digits(&ids[..dash]) && digits(&ids[dash + 1..])
}

fn mtime_secs(m: &fs::Metadata) -> Option<u32> {
    m.modified()
        .ok()?
        .duration_since(SystemTime::UNIX_EPOCH)
        .ok()
        .map(|d| d.as_secs() as u32)
}

/// Whether the regular file `name` of `dir` (a link is never followed)
/// has the size and modification time in `a`.
fn local_unchanged(dir: &ConfinedDir, name: &OsStr, a: &FileAttributes) -> bool {
    match dir.stat(name) {
        Ok(st) => {
            (st.st_mode & libc::S_IFMT) == libc::S_IFREG
                && a.size == Some(st.st_size as u64)
                && a.mtime.is_some()
                && a.mtime == u32::try_from(st.st_mtime).ok()
        }
        Err(_) => false,
    }
}

async fn close_remote(sftp: &Sftp, handle: &[u8]) -> Result<()> {
    status_ok(sftp.inner.client.close(handle).await?, None)
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
            self.sftp.inner.client.close_in_background(&h);
        }
    }
}

/// Removes a local temporary file (in its directory's fd) unless disarmed.
struct LocalTemp<'a> {
    dir: &'a ConfinedDir,
    name: Option<OsString>,
}

impl Drop for LocalTemp<'_> {
    fn drop(&mut self) {
        if let Some(n) = self.name.take() {
            let _ = self.dir.unlink(&n);
        }
    }
}

/// A downloaded file being written in its directory: under a temporary
/// name or, not atomic, its own; removed if dropped unfinished. Its
/// create, writes, sync, close and rename are the reactor's file ops.
struct LocalFile<'a> {
    file: Rc<fs::File>,
    /// The name written, for messages.
    path: PathBuf,
    name: &'a OsStr,
    atomic: bool,
    temp: LocalTemp<'a>,
}

impl<'a> LocalFile<'a> {
    async fn create(dir: &'a ConfinedDir, name: &'a OsStr, atomic: bool) -> Result<LocalFile<'a>> {
        let written = if atomic {
            localdir::temp_name(name)
        } else {
            name.to_owned()
        };
        // Not exclusive only without a temporary: then an existing regular
        // file of that name is overwritten, but never a link's target.
        let file = dir.create_file(&written, 0o666, atomic).await?;
        Ok(LocalFile {
            file: Rc::new(file),
            path: dir.path().join(&written),
            name,
            atomic,
            temp: LocalTemp {
                dir,
                name: Some(written),
            },
        })
    }

    /// Writes `data` at `at`, from the pieces it arrived in.
    async fn write_at(&self, data: Rope, at: u64) -> Result<()> {
        files::write_buf_at(&(self.file.clone() as HeldFd), data, at)
            .await
            .map_err(|e| local_err(&self.path, e))
    }

    /// `fsync` of the file.
    async fn sync(&self) -> Result<()> {
        files::fsync(&(self.file.clone() as HeldFd))
            .await
            .map_err(|e| local_err(&self.path, e))
    }

    /// Closes the file and gives it its final name.
    async fn finish(self) -> Result<()> {
        let LocalFile {
            file,
            name,
            atomic,
            mut temp,
            ..
        } = self;
        // No op holds the file any more: every write has completed.
        if let Ok(file) = Rc::try_unwrap(file) {
            files::close(file);
        }
        let written = temp.name.clone().expect("named until finished");
        if atomic {
            // Named until renamed: if this is dropped meanwhile, the
            // temporary is removed (and the rename, still queued, fails).
            temp.dir.rename_file(&written, name).await?;
        }
        temp.name = None;
        Ok(())
    }
}

/// Where a downloaded file goes on this machine.
#[derive(Clone)]
enum Place {
    /// The item's own `local` path, the caller's choice (its parent is
    /// opened as given; the file itself is never opened through a link).
    Given,
    /// `rel` beneath `root`, from a server's listing: reached without
    /// following links and without leaving `root`.
    Beneath { dirs: Rc<DirCache>, rel: RelPath },
}

/// A file to move and where it goes.
struct Job {
    item: TransferItem,
    place: Place,
}

impl Job {
    fn given(item: TransferItem) -> Job {
        Job {
            item,
            place: Place::Given,
        }
    }

    /// The local directory a download writes into and the file's name.
    fn local_target(&self) -> Result<(Rc<ConfinedDir>, OsString)> {
        match &self.place {
            Place::Given => {
                let local = &self.item.local;
                let name = local.file_name().ok_or_else(|| {
                    Error::InvalidInput(InvalidInput::Path {
                        path: local.display().to_string(),
                        problem: "does not name a file",
                    })
                })?;
                let parent = local.parent().unwrap_or(Path::new(""));
                Ok((Rc::new(ConfinedDir::open_given(parent)?), name.to_owned()))
            }
            Place::Beneath { dirs, rel } => {
                let (parent, name) =
                    rel.split_last()
                        .ok_or(Error::InvalidInput(InvalidInput::Usage(
                            "a tree's root is not a file",
                        )))?;
                Ok((dirs.dir(&parent)?, name.to_owned()))
            }
        }
    }
}

/// Bytes moved: of the whole transfer (for progress) and of one file.
struct Moved<'a> {
    total: &'a Cell<u64>,
    /// Told once `total` reaches [`ProgressMark::at`].
    mark: &'a ProgressMark,
    file: Cell<u64>,
    /// The final RENAME of an upload was sent.
    rename_sent: Cell<bool>,
}

impl Moved<'_> {
    fn add(&self, n: u64) {
        let total = self.total.get() + n;
        self.total.set(total);
        self.file.set(self.file.get() + n);
        if total >= self.mark.at.get() {
            self.mark.at.set(u64::MAX);
            self.mark.reached.notify_one();
        }
    }
}

/// The byte count at which progress is next reported whatever the time
/// ([`PROGRESS_BYTES`] past the last report; never without a callback).
struct ProgressMark {
    at: Cell<u64>,
    reached: Notify,
}

/// Downloads one file over `lane`. `progress` is credited with each chunk.
async fn download_one(
    lane: &Lane,
    item: &TransferItem,
    target: &(Rc<ConfinedDir>, OsString),
    opts: &TransferOptions,
    progress: &Moved<'_>,
) -> Result<u64> {
    let sftp = &lane.sftp;
    let (dir, name) = target;
    let handle = open_handle(sftp, &item.remote, codec::open_flags::READ, 0).await?;
    let handle = RemoteHandle {
        sftp,
        bytes: Some(handle),
    };
    let h = handle.bytes.as_deref().expect("open");
    let attrs = match &item.attrs {
        Some(a) if a.size.is_some() => a.clone(),
        _ => match sftp.inner.client.fstat(h).await? {
            Reply::Attrs(a) => a,
            other => return Err(unexpected(other, Some(wire(&item.remote)))),
        },
    };
    let size = SizeCheck::new(attrs.size.unwrap_or(0), opts);
    size.check(size.announced)?;
    let local = LocalFile::create(dir, name, opts.atomic).await?;
    let total = receive(lane, h, &item.remote, &size, &local, progress).await?;
    handle.close().await?;
    if opts.preserve || opts.skip_unchanged {
        set_local_attrs(&local.file, &attrs).map_err(|e| local_err(&local.path, e))?;
    }
    if opts.fsync {
        local.sync().await?;
    }
    local.finish().await?;
    Ok(total)
}

/// The bounds on a downloaded file's size (see
/// [`TransferOptions::max_file_size`] and [`TransferOptions::max_growth`]).
struct SizeCheck {
    /// The size the server announced.
    announced: u64,
    max_file_size: Option<u64>,
    max_growth: u64,
}

impl SizeCheck {
    fn new(announced: u64, opts: &TransferOptions) -> SizeCheck {
        SizeCheck {
            announced,
            max_file_size: opts.max_file_size,
            max_growth: opts.max_growth,
        }
    }

    /// Fails if the file reaching `n` bytes is over a bound.
    fn check(&self, n: u64) -> Result<()> {
        match self.max_file_size {
            Some(max) if n > max => Err(Error::LimitExceeded {
                what: "a downloaded file's size",
                limit: max,
            }),
            _ if n > self.announced.saturating_add(self.max_growth) => Err(Error::LimitExceeded {
                what: "a downloaded file's growth past its announced size",
                limit: self.max_growth,
            }),
            _ => Ok(()),
        }
    }
}

/// Reads the remote file open as `h` into `local` until the server says
/// EOF (or a short read ends at the announced size); returns its length.
async fn receive(
    lane: &Lane,
    h: &[u8],
    remote: &Path,
    size: &SizeCheck,
    local: &LocalFile<'_>,
    progress: &Moved<'_>,
) -> Result<u64> {
    let client = &lane.sftp.inner.client;
    let chunk = lane.request_size;
    let mut reads = ReadPipeline::default();
    let mut total = 0u64;
    loop {
        // Queue full-size reads over the announced size, up to the budget;
        // past it, one read at a time (the file grew, or the EOF proves
        // we have it all).
        while reads.next_offset() < size.announced || reads.is_empty() {
            let Some(permit) = lane.reserve(chunk, reads.is_empty()).await? else {
                break;
            };
            reads.push(client, h, chunk, permit);
        }
        let path = Some(wire(remote));
        match std::future::poll_fn(|cx| reads.poll_front(cx, path)).await? {
            Chunk::Data { at, data, short } => {
                let end = at + data.len() as u64;
                size.check(end)?;
                let n = data.len() as u64;
                local.write_at(data, at).await?;
                total += n;
                progress.add(n);
                // A short read that ends exactly at the size the server
                // announced: the server's read(2) stopped at the end of
                // the file. This saves a READ per file (a quarter of the
                // requests for small files). Short elsewhere, the reads
                // behind it were asked again from its end.
                if short && end == size.announced && total == size.announced {
                    return Ok(total);
                }
            }
            Chunk::Eof { at } => {
                if at != total {
                    return Err(Error::sftp_protocol(format!(
                        "EOF at offset {at} of {} after {total} bytes",
                        remote.display()
                    )));
                }
                return Ok(total);
            }
        }
    }
}

/// Gives a downloaded file the permission bits and times of `attrs`.
fn set_local_attrs(out: &fs::File, attrs: &FileAttributes) -> io::Result<()> {
    if let Some(p) = attrs.permissions {
        out.set_permissions(fs::Permissions::from_mode(p & 0o7777))?;
    }
    if let (Some(a), Some(m)) = (attrs.atime, attrs.mtime) {
        let t = fs::FileTimes::new()
            .set_accessed(SystemTime::UNIX_EPOCH + Duration::from_secs(a as u64))
            .set_modified(SystemTime::UNIX_EPOCH + Duration::from_secs(m as u64));
        out.set_times(t)?;
    }
    Ok(())
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
        return Err(Error::InvalidInput(InvalidInput::Path {
            path: item.local.display().to_string(),
            problem: "is not a regular file",
        }));
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
    let r = async {
        let n = send(lane, &src, &item.local, h, &dest, progress).await?;
        finish_remote(sftp, h, &dest, &meta, opts).await?;
        Ok(n)
    }
    .await;
    // On failure the handle is closed in the background when dropped,
    // after the temporary's REMOVE below.
    let r = match r {
        Ok(n) => handle.close().await.map(|()| n),
        Err(e) => Err(e),
    };
    if r.is_ok() {
        progress.rename_sent.set(opts.atomic);
    }
    let r = match r {
        Ok(n) if opts.atomic => sftp.rename(&dest, &item.remote).await.map(|()| n),
        r => r,
    };
    if r.is_err() && opts.atomic {
        forget_unlink(sftp, &dest);
    }
    r
}

/// Writes the local file `src` to the remote file open as `h` (at `dest`),
/// each WRITE acknowledged; returns its length.
async fn send(
    lane: &Lane,
    src: &fs::File,
    local: &Path,
    h: &[u8],
    dest: &Path,
    progress: &Moved<'_>,
) -> Result<u64> {
    let client = &lane.sftp.inner.client;
    let chunk = lane.request_size as usize;
    let mut writes = WritePipeline::default();
    let mut off = 0u64;
    let mut eof = false;
    while !eof || !writes.is_empty() {
        while !eof {
            let Some(permit) = lane.reserve(chunk as u32, writes.is_empty()).await? else {
                break;
            };
            // Read straight into the request: no copy of the file's bytes
            // on our side.
            let n = writes
                .push_from_file(client, h, off, chunk, src, permit)
                .map_err(|e| local_err(local, e))?;
            off += n as u64;
            eof = n < chunk;
        }
        let path = Some(wire(dest));
        if let Some(r) = std::future::poll_fn(|cx| writes.poll_front(cx, path)).await {
            progress.add(r? as u64);
        }
    }
    Ok(off)
}

/// After an upload's last WRITE: its permission bits and times (with
/// `preserve`) and an fsync (if asked and offered).
async fn finish_remote(
    sftp: &Sftp,
    h: &[u8],
    dest: &Path,
    meta: &fs::Metadata,
    opts: &TransferOptions,
) -> Result<()> {
    if opts.preserve || opts.skip_unchanged {
        let atime = meta.accessed().ok().and_then(secs);
        let mtime = mtime_secs(meta);
        let attrs = FileAttributes {
            permissions: Some(meta.permissions().mode() & 0o7777),
            atime: atime.or(mtime),
            mtime: mtime.or(atime),
            ..Default::default()
        };
        let r = sftp.inner.client.fsetstat(h, &attrs).await?;
        status_ok(r, Some(wire(dest)))?;
    }
    if opts.fsync && sftp.extensions().fsync {
        let r = sftp
            .inner
            .client
            .extended("fsync@openssh.com", &[h])
            .await?;
        status_ok(r, Some(wire(dest)))?;
    }
    Ok(())
}

/// Removes a remote temporary file without waiting.
fn forget_unlink(sftp: &Sftp, path: &Path) {
    sftp.inner.client.remove_in_background(wire(path));
}

fn secs(t: SystemTime) -> Option<u32> {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .ok()
        .map(|d| d.as_secs() as u32)
}

fn local_err(path: &Path, e: io::Error) -> Error {
    localdir::local_error(path, e)
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Direction {
    Download,
    Upload,
}

/// Whether the destination of `job` already matches its source. For a
/// download, `target` is where it goes.
async fn unchanged(
    lane: &Lane,
    item: &TransferItem,
    target: Option<&(Rc<ConfinedDir>, OsString)>,
    dir: Direction,
) -> bool {
    match dir {
        Direction::Download => {
            let Some((d, name)) = target else {
                return false;
            };
            match &item.attrs {
                Some(a) => local_unchanged(d, name, a),
                None => match lane.sftp.stat(&item.remote).await {
                    Ok(a) => local_unchanged(d, name, &a),
                    Err(_) => false,
                },
            }
        }
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

/// Files found but not started are held here, at most this many: a
/// listing of a million files streams through instead of piling up.
const FEED_MAX: usize = 4096;

/// The files of a transfer, fed by a tree walk while earlier ones move.
#[derive(Default)]
struct Feed {
    jobs: RefCell<VecDeque<Job>>,
    /// Files added (the walk found them).
    added: Cell<u64>,
    /// A job was pushed.
    pushed: Notify,
    /// A job was taken.
    taken: Notify,
}

impl Feed {
    fn preloaded(jobs: Vec<Job>) -> Feed {
        let feed = Feed::default();
        feed.added.set(jobs.len() as u64);
        *feed.jobs.borrow_mut() = jobs.into();
        feed
    }

    /// Adds a job once fewer than [`FEED_MAX`] wait.
    async fn push(&self, job: Job) {
        while self.jobs.borrow().len() >= FEED_MAX {
            self.taken.notified().await;
        }
        self.jobs.borrow_mut().push_back(job);
        self.added.set(self.added.get() + 1);
        self.pushed.notify_one();
    }

    fn pop(&self) -> Option<Job> {
        let job = self.jobs.borrow_mut().pop_front();
        if job.is_some() {
            self.taken.notify_one();
        }
        job
    }

    fn is_empty(&self) -> bool {
        self.jobs.borrow().is_empty()
    }
}

async fn run(
    sftps: &[Sftp],
    items: Vec<Job>,
    opts: &TransferOptions,
    dir: Direction,
) -> TransferReport {
    let feed = Feed::preloaded(items);
    run_fed(sftps, &feed, std::future::ready(()), 0, opts, dir).await
}

/// Moves the files of `feed` while `walk` (which pushes into it, holding
/// up to `walk_handles` handles of the first client) runs.
async fn run_fed(
    sftps: &[Sftp],
    feed: &Feed,
    walk: impl std::future::Future<Output = ()>,
    walk_handles: usize,
    opts: &TransferOptions,
    dir: Direction,
) -> TransferReport {
    let mut report = TransferReport::default();
    if sftps.is_empty() {
        report.other_errors.push((
            PathBuf::new(),
            Error::InvalidInput(InvalidInput::Usage(
                "a transfer needs at least one SFTP client",
            )),
        ));
        return report;
    }
    let lanes: Vec<Lane> = sftps
        .iter()
        .enumerate()
        .map(|(i, s)| {
            let reserved = if i == 0 { walk_handles } else { 0 };
            Lane::new(s, opts, dir == Direction::Upload, reserved)
        })
        .collect();
    let progress = RefCell::new(Progress::default());
    let bytes_done = Cell::new(0u64);
    // Bytes are also reported while files are in flight (a large file
    // would otherwise show nothing until its end): every PROGRESS_EVERY in
    // which bytes moved, or sooner once PROGRESS_BYTES more moved. A chunk
    // costs one comparison, not a callback.
    let mut tick = tokio::time::interval(PROGRESS_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut reported = 0u64;
    let mark = ProgressMark {
        at: Cell::new(if opts.progress.is_some() {
            PROGRESS_BYTES
        } else {
            u64::MAX
        }),
        reached: Notify::new(),
    };
    // Reports `p` (bytes as of now), and sets the next mark.
    let report_now = |p: &mut Progress, reported: &mut u64| {
        p.files_total = feed.added.get();
        p.bytes_done = bytes_done.get();
        *reported = p.bytes_done;
        if let Some(cb) = &opts.progress {
            mark.at.set(p.bytes_done.saturating_add(PROGRESS_BYTES));
            cb(p);
        }
    };
    let mut running = FuturesUnordered::new();
    tokio::pin!(walk);
    let mut walking = true;
    loop {
        // Start files while some lane has a free handle.
        while !feed.is_empty() {
            let Some(li) = (0..lanes.len())
                .filter(|&i| lanes[i].open.get() < lanes[i].max_open)
                .min_by_key(|&i| lanes[i].open.get())
            else {
                break;
            };
            let job = feed.pop().expect("non-empty");
            let lane = &lanes[li];
            lane.open.set(lane.open.get() + 1);
            let bytes_done = &bytes_done;
            let mark = &mark;
            running.push(async move {
                let moved = Moved {
                    total: bytes_done,
                    mark,
                    file: Cell::new(0),
                    rename_sent: Cell::new(false),
                };
                let item = &job.item;
                let target = match dir {
                    Direction::Download => job.local_target().map(Some),
                    Direction::Upload => Ok(None),
                };
                let r = match target {
                    Err(e) => Err(e),
                    Ok(target) => {
                        let target = target.as_ref();
                        let skip = opts.skip_unchanged && unchanged(lane, item, target, dir).await;
                        if skip {
                            Ok(None)
                        } else {
                            let timeout = lane.sftp.inner.client.chan.session.config.timeout;
                            let work = async {
                                match (dir, target) {
                                    (Direction::Download, Some(t)) => {
                                        download_one(lane, item, t, opts, &moved).await
                                    }
                                    _ => upload_one(lane, item, opts, &moved).await,
                                }
                            };
                            // The session's timeout bounds a stall, not a
                            // file: a large file may take longer than it.
                            with_stall_timeout(timeout, bytes_done, work)
                                .await
                                .map(Some)
                        }
                    }
                };
                lane.open.set(lane.open.get() - 1);
                let skipped = matches!(r, Ok(None));
                let r = r.map(|n| n.unwrap_or(0));
                // A status reply means the server did not rename; no reply
                // leaves it open.
                let rename_in_doubt = moved.rename_sent.get()
                    && matches!(&r, Err(e) if !matches!(e, Error::Sftp { .. }));
                FileOutcome {
                    item: job.item,
                    result: r,
                    skipped,
                    bytes_acknowledged: moved.file.get(),
                    rename_in_doubt,
                }
            });
        }
        if !walking && running.is_empty() && feed.is_empty() {
            break;
        }
        tokio::select! {
            Some(outcome) = running.next(), if !running.is_empty() => {
                let mut p = progress.borrow_mut();
                if outcome.result.is_ok() {
                    p.files_done += 1;
                } else {
                    p.files_failed += 1;
                }
                report_now(&mut p, &mut reported);
                drop(p);
                report.files.push(outcome);
            }
            _ = tick.tick(), if opts.progress.is_some() && !running.is_empty() => {
                if bytes_done.get() != reported {
                    report_now(&mut progress.borrow_mut(), &mut reported);
                }
            }
            // The wake-up may be left over from before a later report:
            // only new bytes are reported.
            _ = mark.reached.notified(), if opts.progress.is_some() => {
                if bytes_done.get() != reported {
                    report_now(&mut progress.borrow_mut(), &mut reported);
                }
            }
            _ = &mut walk, if walking => walking = false,
            _ = feed.pushed.notified(), if walking => {}
        }
    }
    report
}

/// How often a transfer reports bytes moved while files are in flight.
const PROGRESS_EVERY: Duration = Duration::from_millis(100);
/// Bytes after which a transfer reports progress sooner than
/// [`PROGRESS_EVERY`] (a fast link moves many of them in 100 ms).
const PROGRESS_BYTES: u64 = 16 << 20;

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
    let jobs = items.into_iter().map(Job::given).collect();
    run(sftps, jobs, opts, Direction::Download).await
}

/// Uploads `items` over the given SFTP clients; see [`download_many`].
/// Remote parent directories must exist.
pub async fn upload_many(
    sftps: &[Sftp],
    items: Vec<TransferItem>,
    opts: &TransferOptions,
) -> TransferReport {
    let jobs = items.into_iter().map(Job::given).collect();
    run(sftps, jobs, opts, Direction::Upload).await
}

/// Names already seen in one listing, by hash: a name listed twice fails.
struct Seen {
    hasher: std::collections::hash_map::RandomState,
    hashes: std::collections::HashSet<u64>,
}

impl Seen {
    fn new() -> Seen {
        Seen {
            hasher: Default::default(),
            hashes: Default::default(),
        }
    }

    fn first_time(&mut self, name: &[u8]) -> bool {
        let h = std::hash::BuildHasher::hash_one(&self.hasher, name);
        self.hashes.insert(h)
    }
}

/// What one entry of a listing turned out to be.
enum Found {
    /// A directory, created locally: list it next.
    Dir(RelPath),
    /// A link to recreate (its target still to be read).
    Link(RelPath),
    /// A file to download.
    File(Job),
    /// Refused, skipped or not a kind we copy.
    Nothing,
}

/// The decisions of a tree download, apart from the SFTP requests that
/// feed it: which names are accepted, where they go locally, which links
/// are made. Every refusal is recorded as an error of its own.
struct TreeRules<'a> {
    remote: &'a Path,
    /// The destination and the directories opened below it.
    dirs: Rc<DirCache>,
    opts: &'a TransferOptions,
    /// Entries accepted so far (files, directories, links).
    entries: Cell<u64>,
    /// The entry limit was reached: accept no more.
    stopped: Cell<bool>,
    errors: RefCell<Vec<(PathBuf, Error)>>,
    skipped_links: RefCell<Vec<PathBuf>>,
}

impl TreeRules<'_> {
    fn error(&self, path: PathBuf, e: Error) {
        self.errors.borrow_mut().push((path, e));
    }

    fn remote_path(&self, rel: &RelPath) -> PathBuf {
        if rel.depth() == 0 {
            // `join` of an empty path would add a trailing '/'.
            return self.remote.to_owned();
        }
        self.remote.join(rel.to_path())
    }

    fn local_path(&self, rel: &RelPath) -> PathBuf {
        self.dirs.root().path().join(rel.to_path())
    }

    /// One entry of the listing of `rel`: checked, counted, and for a
    /// directory created beneath the root.
    fn entry(&self, rel: &RelPath, seen: &mut Seen, name: &[u8], a: &FileAttributes) -> Found {
        // Every listing holds these two; they are not entries.
        if name == b"." || name == b".." || self.stopped.get() {
            return Found::Nothing;
        }
        let full = self.remote_path(rel);
        if let Err(e) = check_name(name, &full) {
            self.error(full, e);
            return Found::Nothing;
        }
        if !seen.first_time(name) {
            let e = Error::UnsafeName {
                name: escape_name(name),
                listed_in: escape_name(full.as_os_str().as_encoded_bytes()),
                reason: "listed more than once",
            };
            self.error(full, e);
            return Found::Nothing;
        }
        self.entries.set(self.entries.get() + 1);
        if self.entries.get() > self.opts.max_entries {
            self.stopped.set(true);
            let e = Error::LimitExceeded {
                what: "entries in the tree",
                limit: self.opts.max_entries,
            };
            self.error(full, e);
            return Found::Nothing;
        }
        let child = rel.child(name);
        if a.is_dir() {
            if child.depth() > self.opts.max_depth {
                let e = Error::LimitExceeded {
                    what: "directory depth of the tree",
                    limit: self.opts.max_depth as u64,
                };
                self.error(self.remote_path(&child), e);
                return Found::Nothing;
            }
            match self.dirs.dir(&child) {
                Ok(_) => Found::Dir(child),
                Err(e) => {
                    self.error(self.local_path(&child), e);
                    Found::Nothing
                }
            }
        } else if a.is_symlink() {
            if self.opts.links == LinkPolicy::Skip {
                self.skipped_links
                    .borrow_mut()
                    .push(self.remote_path(&child));
                return Found::Nothing;
            }
            Found::Link(child)
        } else if a.is_file() || a.permissions.is_none() {
            let item = TransferItem {
                remote: self.remote_path(&child),
                local: self.local_path(&child),
                attrs: Some(a.clone()),
            };
            let place = Place::Beneath {
                dirs: self.dirs.clone(),
                rel: child,
            };
            Found::File(Job { item, place })
        } else {
            Found::Nothing
        }
    }

    /// Recreates the link `rel` with `target` (data: stored, never
    /// resolved), unless the policy skips it.
    fn link(&self, rel: &RelPath, target: &[u8]) {
        let (parent, name) = rel.split_last().expect("a link is below the root");
        if self.opts.links == LinkPolicy::Skip
            || (self.opts.links == LinkPolicy::Safe
                && !localdir::link_stays_inside(target, parent.depth()))
        {
            self.skipped_links.borrow_mut().push(self.remote_path(rel));
            return;
        }
        let made = self.dirs.dir(&parent).and_then(|d| d.symlink(target, name));
        if let Err(e) = made {
            self.error(self.local_path(rel), e);
        }
    }
}

/// A tree download's walk: lists directories and reads links over SFTP,
/// decides with [`TreeRules`], feeds files to the transfer.
struct Walk<'a> {
    sftp: &'a Sftp,
    rules: TreeRules<'a>,
    feed: &'a Feed,
    /// Directories found and created, not yet listed.
    dirs: RefCell<VecDeque<RelPath>>,
    /// Links found, not yet made.
    links: RefCell<VecDeque<RelPath>>,
    /// A directory or link was found.
    found: Notify,
    /// Listings (each an open handle) and link reads at once.
    tasks_at_once: usize,
}

impl Walk<'_> {
    /// Lists many directories (and reads links) at once until the tree is
    /// done; directories are created as found, files fed as found.
    async fn run(&self) {
        type Task<'t> = std::pin::Pin<Box<dyn std::future::Future<Output = ()> + 't>>;
        let mut running: FuturesUnordered<Task<'_>> = FuturesUnordered::new();
        self.dirs.borrow_mut().push_back(RelPath::default());
        loop {
            while running.len() < self.tasks_at_once {
                let dir = self.dirs.borrow_mut().pop_front();
                if let Some(rel) = dir {
                    running.push(Box::pin(self.list(rel)));
                    continue;
                }
                let link = self.links.borrow_mut().pop_front();
                match link {
                    Some(rel) => running.push(Box::pin(self.link(rel))),
                    None => break,
                }
            }
            // Also wake when a listing finds a directory or link: a long
            // listing must not hold back the ones it finds.
            tokio::select! {
                done = running.next() => if done.is_none() {
                    break;
                },
                _ = self.found.notified() => {}
            }
        }
    }

    /// Lists one directory, streaming its entries.
    async fn list(&self, rel: RelPath) {
        let full = self.rules.remote_path(&rel);
        let mut rd = match self.sftp.read_dir(&full).await {
            Ok(rd) => rd,
            Err(e) => return self.rules.error(full, e),
        };
        let mut seen = Seen::new();
        loop {
            let entry = match rd.next_entry().await {
                Ok(Some(e)) => e,
                Ok(None) => break,
                Err(e) => {
                    self.rules.error(full.clone(), e);
                    break;
                }
            };
            if self.rules.stopped.get() {
                break;
            }
            match self
                .rules
                .entry(&rel, &mut seen, entry.name_bytes(), entry.attrs())
            {
                Found::Dir(d) => {
                    self.dirs.borrow_mut().push_back(d);
                    self.found.notify_one();
                }
                Found::Link(l) => {
                    self.links.borrow_mut().push_back(l);
                    self.found.notify_one();
                }
                Found::File(job) => self.feed.push(job).await,
                Found::Nothing => {}
            }
        }
        if let Err(e) = rd.close().await {
            self.rules.error(full, e);
        }
    }

    /// Reads one link's target and hands it to the rules.
    async fn link(&self, rel: RelPath) {
        let remote = self.rules.remote_path(&rel);
        match self.sftp.readlink(&remote).await {
            Ok(t) => self.rules.link(&rel, t.as_os_str().as_encoded_bytes()),
            Err(e) => self.rules.error(remote, e),
        }
    }
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
            vec![Job::given(item)],
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
            vec![Job::given(item)],
            opts,
            Direction::Upload,
        )
        .await;
        single(&mut r)
    }

    /// Downloads the tree under `remote` into `local` (created if needed):
    /// directories, regular files and symbolic links (recreated as links by
    /// default; see [`TransferOptions::links`]). Nothing is written outside
    /// `local`, whatever the server lists: see [`download_tree_over`].
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
    /// directories and regular files; symbolic links inside the tree are
    /// followed, those leading outside it skipped unless asked (see
    /// [`upload_tree_over`]).
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
        None => Err(Error::sftp_protocol("transfer ended without its file")),
    }
}

/// [`Sftp::download_tree`] spread over several clients of the same host.
///
/// Every name in a listing must be one plain component (see
/// [`Error::UnsafeName`]); files, directories and links are created beneath
/// `local` through a directory fd that no link and no `..` can leave
/// ([`Error::OutsideDestination`]). A bad entry fails alone. Files start
/// moving while the tree is still being listed, and at most a few thousand
/// found-but-not-started files are held in memory.
pub async fn download_tree_over(
    sftps: &[Sftp],
    remote: &Path,
    local: &Path,
    opts: &TransferOptions,
) -> TransferReport {
    let Some(first) = sftps.first() else {
        return run(sftps, Vec::new(), opts, Direction::Download).await;
    };
    let root = match ConfinedDir::open_root(local) {
        Ok(r) => Rc::new(r),
        Err(e) => {
            let mut report = TransferReport::default();
            report.other_errors.push((local.to_owned(), e));
            return report;
        }
    };
    // Listings hold handles while files are moving: 16 at once, fewer
    // where the server announces a small handle limit.
    let walk_tasks = match first.limits().max_open_handles {
        0 => 16,
        l => usize::try_from(l / 4).unwrap_or(16).clamp(1, 16),
    };
    let feed = Feed::default();
    let walk = Walk {
        sftp: first,
        rules: TreeRules {
            remote,
            dirs: Rc::new(DirCache::new(root)),
            opts,
            entries: Cell::new(0),
            stopped: Cell::new(false),
            errors: RefCell::default(),
            skipped_links: RefCell::default(),
        },
        feed: &feed,
        dirs: RefCell::default(),
        links: RefCell::default(),
        found: Notify::new(),
        tasks_at_once: walk_tasks,
    };
    let mut report = run_fed(
        sftps,
        &feed,
        walk.run(),
        walk_tasks,
        opts,
        Direction::Download,
    )
    .await;
    report.other_errors.extend(walk.rules.errors.take());
    report.skipped_links.extend(walk.rules.skipped_links.take());
    report
}

/// [`Sftp::upload_tree`] spread over several clients of the same host.
///
/// Local links are followed when they lead to a file or directory inside
/// `local`, skipped (and listed in [`TransferReport::skipped_links`]) when
/// they lead outside it unless [`TransferOptions::follow_external_links`],
/// and all skipped with [`LinkPolicy::Skip`]. A directory reached twice
/// (a link loop) is uploaded once.
pub async fn upload_tree_over(
    sftps: &[Sftp],
    local: &Path,
    remote: &Path,
    opts: &TransferOptions,
) -> TransferReport {
    use std::os::unix::fs::MetadataExt;
    let mut errors = Vec::new();
    let mut skipped_links = Vec::new();
    let Some(first) = sftps.first() else {
        return run(sftps, Vec::new(), opts, Direction::Upload).await;
    };
    let canonical_root = match fs::canonicalize(local) {
        Ok(p) => p,
        Err(e) => {
            let mut report = TransferReport::default();
            report
                .other_errors
                .push((local.to_owned(), local_err(local, e)));
            return report;
        }
    };
    let mut visited = std::collections::HashSet::new();
    if let Ok(m) = fs::metadata(local) {
        visited.insert((m.dev(), m.ino()));
    }
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
            let path = entry.path();
            let is_link = entry.file_type().map(|t| t.is_symlink()).unwrap_or(false);
            if is_link {
                let inside = fs::canonicalize(&path)
                    .map(|t| t.starts_with(&canonical_root))
                    .unwrap_or(false);
                let follow = match opts.links {
                    LinkPolicy::Skip => false,
                    _ => inside || opts.follow_external_links,
                };
                if !follow {
                    skipped_links.push(path);
                    continue;
                }
            }
            match fs::metadata(&path) {
                Ok(m) if m.is_dir() => {
                    if visited.insert((m.dev(), m.ino())) {
                        dirs.push(child);
                    }
                }
                Ok(m) if m.is_file() => items.push(Job::given(TransferItem::new(
                    remote.join(&child),
                    local.join(&child),
                ))),
                Ok(_) => {}
                Err(e) => errors.push((path.clone(), local_err(&path, e))),
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
    report.skipped_links.extend(skipped_links);
    report
}

/// The fuzzed tree download: a structured listing decoded from `data`
/// goes through the same rules and local writes as [`download_tree_over`]
/// (names, limits, link policy, directories and files beneath a
/// directory fd), into a fresh directory whose neighbours are sentinels and
/// in which links to them were planted first. Panics if anything was
/// written outside the root or through a link.
#[cfg(any(fuzzing, test))]
pub(crate) fn fuzz_tree(data: &[u8]) {
    use std::os::unix::fs::symlink;
    use std::sync::atomic::{AtomicU64, Ordering};

    /// Names a hostile server would pick, besides arbitrary bytes.
    const NAMES: &[&[u8]] = &[
        b"planted",
        b"planted_file",
        b"a",
        b"..",
        b".",
        b"",
        b"a/b",
        b"../outside/x",
        b"/tmp/uring-ssh-fuzz-canary",
        b"x\0y",
        b"outside",
    ];
    const TARGETS: &[&[u8]] = &[b"/", b"..", b"../..", b"../outside", b"a", b"planted", b"."];
    const CANARY: &str = "/tmp/uring-ssh-fuzz-canary";

    struct Input<'d>(&'d [u8]);
    impl Input<'_> {
        fn byte(&mut self) -> Option<u8> {
            let (&b, rest) = self.0.split_first()?;
            self.0 = rest;
            Some(b)
        }
        fn bytes(&mut self, len: usize) -> Vec<u8> {
            let n = len.min(self.0.len());
            let (a, b) = self.0.split_at(n);
            self.0 = b;
            a.to_vec()
        }
        fn name(&mut self, dict: &[&[u8]]) -> Vec<u8> {
            match self.byte().unwrap_or(0) {
                b if (b as usize) < dict.len() => dict[b as usize].to_vec(),
                b if b >= 0xf0 => vec![b'n'; 250 + (b as usize & 0xf)],
                b => {
                    let len = (b & 0x1f) as usize;
                    self.bytes(len)
                }
            }
        }
    }

    static N: AtomicU64 = AtomicU64::new(0);
    // tmpfs where there is one: a sandbox per input is made and removed.
    let base = match Path::new("/dev/shm") {
        shm if shm.is_dir() => shm.to_owned(),
        _ => std::env::temp_dir(),
    };
    let sandbox = base.join(format!(
        "uring-ssh-fuzz-tree-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    let root_path = sandbox.join("root");
    let outside = sandbox.join("outside");
    fs::create_dir_all(&root_path).expect("sandbox");
    fs::create_dir_all(&outside).expect("sandbox");
    fs::write(outside.join("sentinel"), b"sentinel").expect("sandbox");
    symlink(&outside, root_path.join("planted")).expect("sandbox");
    symlink(outside.join("sentinel"), root_path.join("planted_file")).expect("sandbox");

    let mut input = Input(data);
    let flags = input.byte().unwrap_or(0);
    let opts = TransferOptions {
        links: match flags & 3 {
            0 => LinkPolicy::Keep,
            1 => LinkPolicy::Skip,
            _ => LinkPolicy::Safe,
        },
        atomic: flags & 4 == 0,
        max_entries: 1 + (input.byte().unwrap_or(255) as u64),
        max_depth: 1 + (flags >> 4) as usize,
        ..Default::default()
    };
    let root = Rc::new(ConfinedDir::open_root(&root_path).expect("sandbox root"));
    let rules = TreeRules {
        remote: Path::new("/srv"),
        dirs: Rc::new(DirCache::new(root)),
        opts: &opts,
        entries: Cell::new(0),
        stopped: Cell::new(false),
        errors: RefCell::default(),
        skipped_links: RefCell::default(),
    };
    // Listings in breadth-first order, as the walk asks for them; a
    // listing is entries until an end marker or the end of the input.
    let mut dirs = VecDeque::from([RelPath::default()]);
    while let Some(rel) = dirs.pop_front() {
        let mut seen = Seen::new();
        while let Some(op) = input.byte() {
            let kind = op & 7;
            if kind == 7 {
                break;
            }
            let name = input.name(NAMES);
            let permissions = match kind {
                0 | 1 => 0o100644,
                2 => 0o040755,
                3 => 0o120777,
                4 => 0o010644, // a FIFO: not copied
                _ => 0,
            };
            let attrs = FileAttributes {
                permissions: (kind != 5).then_some(permissions),
                size: Some(op as u64 >> 3),
                ..Default::default()
            };
            match rules.entry(&rel, &mut seen, &name, &attrs) {
                Found::Dir(d) => dirs.push_back(d),
                Found::Link(l) => {
                    let target = input.name(TARGETS);
                    rules.link(&l, &target);
                }
                Found::File(job) => {
                    let written = job.local_target().and_then(|t| {
                        files::now(async {
                            let f = LocalFile::create(&t.0, &t.1, opts.atomic).await?;
                            f.write_at(Rope::from(&b"from the server"[..]), 0).await?;
                            f.finish().await
                        })
                    });
                    // A file may fail (a link or directory planted at its
                    // name); it must not have been written elsewhere.
                    let _ = written;
                }
                Found::Nothing => {}
            }
        }
    }

    // Outside the root: exactly what was there.
    let mut names: Vec<_> = fs::read_dir(&sandbox)
        .expect("sandbox")
        .map(|e| e.expect("entry").file_name())
        .collect();
    names.sort();
    assert_eq!(
        names,
        ["outside", "root"],
        "something was created beside the root"
    );
    let outside_names: Vec<_> = fs::read_dir(&outside)
        .expect("outside")
        .map(|e| e.expect("entry").file_name())
        .collect();
    assert_eq!(
        outside_names,
        ["sentinel"],
        "something was written outside the root"
    );
    assert_eq!(
        fs::read(outside.join("sentinel")).expect("sentinel"),
        b"sentinel"
    );
    assert!(
        fs::symlink_metadata(CANARY).is_err(),
        "{CANARY} was created"
    );
    // Inside: directories, regular files and links only, and no temporary
    // file left behind.
    let mut todo = vec![root_path.clone()];
    while let Some(d) = todo.pop() {
        for e in fs::read_dir(&d).expect("dir") {
            let e = e.expect("entry");
            let t = e.file_type().expect("type");
            let n = e.file_name();
            // Ours are `.NAME.PID-N.part`; a server may name a file
            // `x.part` itself.
            let ours = format!(".{}-", std::process::id());
            let b = n.as_encoded_bytes();
            assert!(
                !(b.starts_with(b".")
                    && b.ends_with(b".part")
                    && b.windows(ours.len()).any(|w| w == ours.as_bytes())),
                "a temporary file was left: {}",
                e.path().display()
            );
            if t.is_dir() {
                todo.push(e.path());
            } else {
                assert!(t.is_file() || t.is_symlink(), "{}", e.path().display());
            }
        }
    }
    fs::remove_dir_all(&sandbox).expect("sandbox removal");
}

#[cfg(test)]
mod tests {
    use super::{fuzz_tree, is_upload_temp_name, temp_name};

    #[test]
    fn upload_temp_names_are_recognised_exactly() {
        for dest in ["f", "a.tar.gz", ".hidden", "x-1.part", "1234-0"] {
            let t = temp_name(std::path::Path::new("/srv").join(dest).as_path());
            let n = t.file_name().expect("a name").as_encoded_bytes();
            assert!(is_upload_temp_name(n), "{}", t.display());
        }
        for ok in [".f.1234-0.part", ".a.b.1-22.part", ".-.1-2.part"] {
            assert!(is_upload_temp_name(ok.as_bytes()), "{ok}");
        }
        for not in [
            ".f.part",
            "f.1234-0.part",
            ".f.12a-0.part",
            ".f.1234-.part",
            ".f.-0.part",
            ".f.1234-0.part~",
            ".f.1234-0-1.part",
            ".f.1234.part",
            "..part",
            ".1234-0.part",
            ".f.1234-0.PART",
            ".f.+1-0.part",
            "..1-2.part",
            ".a/../../x.1-2.part",
            ".a\0.1-2.part",
            "",
        ] {
            assert!(!is_upload_temp_name(not.as_bytes()), "{not:?}");
        }
    }

    #[test]
    fn hostile_listings_write_nothing_outside_the_root() {
        // Each: flags, max entries, then (kind, name[, link target])... with
        // 7 ending a listing. Names 0..=10 are from the dictionary.
        let cases: &[&[u8]] = &[
            // A file through the planted link's name, a directory of that
            // name, a link replacing it, then a file in a directory "a".
            &[0, 50, 0, 0, 2, 0, 3, 1, 0, 2, 2, 7, 0, 2, 7],
            // Every dictionary name as a file, then as a directory.
            &[
                4, 255, 0, 0, 0, 1, 0, 2, 0, 3, 0, 4, 0, 5, 0, 6, 0, 7, 0, 8, 0, 9, 0, 10,
            ],
            &[0, 255, 2, 0, 2, 1, 2, 3, 2, 6, 2, 7, 2, 8, 2, 10, 7],
            // Links with every target, under each policy.
            &[0, 255, 3, 2, 0, 3, 0x22, 3, 1, 7],
            &[2, 255, 3, 2, 0, 3, 0x22, 3, 1, 2, 0x23, 7, 3, 0x24, 3],
            // Deep, and a long name.
            &[0x30, 255, 2, 2, 7, 2, 2, 7, 2, 2, 7, 2, 2, 7, 0, 0xff],
        ];
        for c in cases {
            fuzz_tree(c);
        }
    }
}
