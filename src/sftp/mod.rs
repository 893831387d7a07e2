//! SFTP (protocol version 3 with OpenSSH's extensions) over a session
//! channel, with any number of requests in flight from any number of tasks.
//!
//! libssh2's own SFTP keeps each operation's half-done state in its SFTP
//! object and so runs one operation at a time. This client speaks the
//! protocol itself over a libssh2 channel opened on the `sftp` subsystem:
//! requests carry ids, replies are matched by id, and an [`Sftp`] (cheap to
//! clone) is shared by every task on its thread.
//!
//! ```no_run
//! # async fn demo(session: &uring_ssh::Session) -> uring_ssh::Result<()> {
//! let sftp = session.sftp().await?;
//! sftp.mkdir("/tmp/out", 0o755).await?;
//! let n = sftp.download("/etc/hostname", "/tmp/hostname").await?;
//! for entry in sftp.read_dir_all("/tmp").await? {
//!     println!("{} {:?}", entry.name(), entry.attrs().size);
//! }
//! # let _ = n; Ok(()) }
//! ```

mod client;
pub mod codec;
mod dir;
mod file;
mod pipeline;
mod rope;
mod transfer;
#[cfg(test)]
pub(crate) use rope::Rope;
#[cfg(fuzzing)]
pub(crate) use transfer::fuzz_tree as transfer_fuzz_tree;

use std::path::Path;
use std::rc::Rc;

pub use codec::{FileAttributes, Limits, StatVfs, status, status_name};
pub use dir::{DirEntry, ReadDir};
pub use file::{File, OpenOptions};
pub use transfer::{
    FileOutcome, LinkPolicy, Progress, ProgressFn, TransferItem, TransferOptions, TransferReport,
    download_many, download_tree_over, is_upload_temp_name, upload_many, upload_tree_over,
};

use crate::error::{Error, InvalidInput, Result};
use crate::session::Session;
use client::{Client, ReplyFuture, status_ok, unexpected};
use codec::Reply;

/// Read and write sizes used when the server announces no limits: the
/// sizes every SFTP v3 server must accept.
const FALLBACK_IO_SIZE: u32 = 32 * 1024;

/// Our own cap on one READ or WRITE, whatever the server allows. Measured
/// on loopback against OpenSSH (see `transfer.rs`): beyond 256 KiB nothing
/// is gained, and large requests delay the replies queued behind them.
const MAX_IO_SIZE: u32 = 255 * 1024;

/// The smallest READ or WRITE we make, whatever the server announces: a
/// server announcing 1 byte would otherwise cost a round trip per byte.
const MIN_IO_SIZE: u32 = 1024;

/// Bytes of a WRITE packet besides its data, with room to spare for the
/// longest handle: what a server's packet limit must leave for the header.
const WRITE_OVERHEAD: u64 = 1024;

/// The server's limits as the client applies them (see [`Sftp::limits`]):
/// read and write lengths clamped to [`MIN_IO_SIZE`]..=[`MAX_IO_SIZE`], the
/// packet length to what a WRITE of [`MIN_IO_SIZE`]..=[`codec::MAX_PACKET`]
/// needs; 0 (not announced) stays 0, and so does everything when the
/// server announced nothing.
fn clamp_limits(announced: Limits) -> Limits {
    let clamp = |v: u64, lo: u64, hi: u64| if v == 0 { 0 } else { v.clamp(lo, hi) };
    let io = |v| clamp(v, MIN_IO_SIZE as u64, MAX_IO_SIZE as u64);
    Limits {
        max_packet_length: clamp(
            announced.max_packet_length,
            MIN_IO_SIZE as u64 + WRITE_OVERHEAD,
            codec::MAX_PACKET as u64,
        ),
        max_read_length: io(announced.max_read_length),
        max_write_length: io(announced.max_write_length),
        max_open_handles: announced.max_open_handles,
    }
}

/// Bytes per READ and per WRITE for (clamped) `limits`: the announced
/// lengths, [`FALLBACK_IO_SIZE`] where none was announced, a WRITE small
/// enough for the packet limit; always within
/// [`MIN_IO_SIZE`]..=[`MAX_IO_SIZE`].
fn io_sizes_for(limits: &Limits) -> (u32, u32) {
    let size = |announced: u64| match announced {
        0 => FALLBACK_IO_SIZE,
        n => n.clamp(MIN_IO_SIZE as u64, MAX_IO_SIZE as u64) as u32,
    };
    let read = size(limits.max_read_length);
    let mut write = size(limits.max_write_length) as u64;
    if limits.max_packet_length > 0 {
        // The whole WRITE packet must fit the server's packet limit.
        write = write.min(limits.max_packet_length.saturating_sub(WRITE_OVERHEAD));
    }
    let write = write.clamp(MIN_IO_SIZE as u64, MAX_IO_SIZE as u64) as u32;
    (read, write)
}

/// The extensions the server announced that we use.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Extensions {
    /// `posix-rename@openssh.com`: rename that replaces the target.
    pub posix_rename: bool,
    /// `statvfs@openssh.com`.
    pub statvfs: bool,
    /// `fstatvfs@openssh.com`.
    pub fstatvfs: bool,
    /// `hardlink@openssh.com`.
    pub hardlink: bool,
    /// `fsync@openssh.com`.
    pub fsync: bool,
    /// `limits@openssh.com` (its values are in [`Sftp::limits`]).
    pub limits: bool,
}

pub(crate) struct SftpInner {
    pub(crate) client: Rc<Client>,
    pub(crate) version: u32,
    pub(crate) extensions: Extensions,
    pub(crate) limits: Limits,
    /// Bytes per READ request.
    pub(crate) read_size: u32,
    /// Data bytes per WRITE request.
    pub(crate) write_size: u32,
    /// Handles of open files, for a graceful close.
    handles: std::cell::RefCell<Vec<std::rc::Weak<file::Handle>>>,
}

impl SftpInner {
    pub(crate) fn register(&self, h: &Rc<file::Handle>) {
        let mut v = self.handles.borrow_mut();
        v.retain(|w| w.strong_count() > 0);
        v.push(Rc::downgrade(h));
    }
}

/// An SFTP client on one channel of a session. Clones share the channel;
/// any number of operations may run at once from any number of tasks on
/// the session's thread.
///
/// Dropping the last clone (and every [`File`] from it) frees the channel
/// without blocking; the server then closes whatever handles were open.
/// [`Sftp::close`] closes them first and waits for the server.
#[derive(Clone)]
pub struct Sftp {
    pub(crate) inner: Rc<SftpInner>,
}

impl std::fmt::Debug for Sftp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sftp")
            .field("version", &self.inner.version)
            .field("extensions", &self.inner.extensions)
            .field("limits", &self.inner.limits)
            .field("in_flight", &self.inner.client.in_flight())
            .finish()
    }
}

/// A path as the bytes sent on the wire.
fn wire(path: &Path) -> &[u8] {
    use std::os::unix::ffi::OsStrExt;
    path.as_os_str().as_bytes()
}

impl Session {
    /// Opens an SFTP channel: a session channel on the `sftp` subsystem,
    /// initialised to protocol version 3, with the server's limits read if
    /// it announces them.
    pub async fn sftp(&self) -> Result<Sftp> {
        let mut ch = self.channel_session().await?;
        ch.subsystem("sftp").await?;
        self.inner
            .with_timeout("SFTP init", Sftp::init(ch.inner().clone()))
            .await
    }
}

impl Sftp {
    async fn init(chan: Rc<crate::channel::ChannelInner>) -> Result<Sftp> {
        let hello = Client::init_packet(3);
        let mut pos = 0;
        while pos < hello.len() {
            pos += std::future::poll_fn(|cx| chan.poll_write_raw(cx, &hello[pos..])).await?;
        }
        let mut buf = vec![0u8; 64 * 1024];
        let mut end = 0;
        let len = loop {
            // The length is checked (at most MAX_PACKET) before the buffer
            // grows for it, and it grows to one such packet at most.
            if let Some(len) = codec::frame(&buf[..end]).map_err(protocol)? {
                break len;
            }
            if end == buf.len() {
                let want = (buf.len() * 2).min(4 + codec::MAX_PACKET);
                buf.resize(want, 0);
            }
            let n = std::future::poll_fn(|cx| chan.poll_read_into(cx, 0, &mut buf[end..])).await?;
            if n == 0 {
                return Err(Error::sftp_protocol(
                    "the server closed the SFTP channel before its VERSION",
                ));
            }
            end += n;
        };
        let (version, ext) = codec::decode_version(&buf[4..len]).map_err(protocol)?;
        if version < 3 {
            return Err(Error::sftp_protocol(format!(
                "the server speaks SFTP version {version}; version 3 is needed"
            )));
        }
        let mut extensions = Extensions::default();
        for (name, _) in &ext {
            match name.as_str() {
                "posix-rename@openssh.com" => extensions.posix_rename = true,
                "statvfs@openssh.com" => extensions.statvfs = true,
                "fstatvfs@openssh.com" => extensions.fstatvfs = true,
                "hardlink@openssh.com" => extensions.hardlink = true,
                "fsync@openssh.com" => extensions.fsync = true,
                "limits@openssh.com" => extensions.limits = true,
                _ => {}
            }
        }
        let client = Client::new(chan, &buf[len..end]);
        let announced = if extensions.limits {
            let r = client.extended("limits@openssh.com", &[]).await?;
            match r {
                Reply::Extended(d) => codec::decode_limits(&d).map_err(protocol)?,
                other => return Err(unexpected(other, None)),
            }
        } else {
            Limits::default()
        };
        let limits = clamp_limits(announced);
        let (read_size, write_size) = io_sizes_for(&limits);
        Ok(Sftp {
            inner: Rc::new(SftpInner {
                client,
                version,
                extensions,
                limits,
                read_size,
                write_size,
                handles: Default::default(),
            }),
        })
    }

    /// The protocol version the server answered with (3 for OpenSSH).
    pub fn version(&self) -> u32 {
        self.inner.version
    }

    /// The extensions the server announced.
    pub fn extensions(&self) -> &Extensions {
        &self.inner.extensions
    }

    /// The server's `limits@openssh.com` values as this client applies
    /// them (all 0 if it announced none; 0 for each it left unannounced).
    /// A hostile or broken server may announce anything, so the lengths are
    /// clamped: the read and write lengths to 1 KiB..=255 KiB, the packet
    /// length to 2 KiB..=4 MiB (the largest reply this client accepts).
    ///
    /// `max_open_handles` is left as announced: it only ever lowers how
    /// many files a transfer opens at once (a few below it, at least one),
    /// so neither 1 nor 2^64−1 can make the client hold more than the
    /// caller's own `max_open_files`.
    pub fn limits(&self) -> Limits {
        self.inner.limits
    }

    /// Bytes asked for per READ and sent per WRITE: the server's limits,
    /// clamped to 1 KiB..=255 KiB; 32 KiB if it announces none. A WRITE
    /// also leaves 1 KiB of the server's packet limit for its header.
    pub fn io_sizes(&self) -> (u32, u32) {
        (self.inner.read_size, self.inner.write_size)
    }

    /// Requests queued or awaiting their reply.
    pub fn in_flight(&self) -> usize {
        self.inner.client.in_flight()
    }

    /// Requests sent and replies received on this channel so far.
    pub fn counts(&self) -> (u64, u64) {
        self.inner.client.counts()
    }

    pub(crate) async fn timed<T>(
        &self,
        operation: &'static str,
        f: impl std::future::Future<Output = Result<T>>,
    ) -> Result<T> {
        self.inner
            .client
            .chan
            .session
            .with_timeout(operation, f)
            .await
    }

    /// A request (made by `request`, given the client) whose reply is a
    /// STATUS; `path` names the file in its error.
    async fn status_op(
        &self,
        operation: &'static str,
        path: &[u8],
        request: impl FnOnce(&Rc<Client>) -> ReplyFuture,
    ) -> Result<()> {
        self.timed(operation, async {
            let r = request(&self.inner.client).await?;
            status_ok(r, Some(path))
        })
        .await
    }

    /// An OpenSSH extension request; fails with `Unsupported` if the server
    /// did not announce it.
    async fn extended(
        &self,
        operation: &'static str,
        offered: bool,
        name: &'static str,
        args: &[&[u8]],
    ) -> Result<Reply> {
        if !offered {
            return Err(Error::Io(std::io::Error::new(
                std::io::ErrorKind::Unsupported,
                format!("the SFTP server does not offer {name}"),
            )));
        }
        self.timed(operation, async {
            self.inner.client.extended(name, args).await
        })
        .await
    }

    /// A request on `path` whose reply is its attributes.
    async fn attrs_op(
        &self,
        operation: &'static str,
        path: &Path,
        request: impl FnOnce(&Rc<Client>, &[u8]) -> ReplyFuture,
    ) -> Result<FileAttributes> {
        let p = wire(path);
        self.timed(operation, async {
            match request(&self.inner.client, p).await? {
                Reply::Attrs(a) => Ok(a),
                other => Err(unexpected(other, Some(p))),
            }
        })
        .await
    }

    /// The attributes of `path`, following symbolic links.
    pub async fn stat(&self, path: impl AsRef<Path>) -> Result<FileAttributes> {
        self.attrs_op("SFTP stat", path.as_ref(), |c, p| c.stat(p))
            .await
    }

    /// The attributes of `path` itself, not following a symbolic link.
    pub async fn lstat(&self, path: impl AsRef<Path>) -> Result<FileAttributes> {
        self.attrs_op("SFTP lstat", path.as_ref(), |c, p| c.lstat(p))
            .await
    }

    /// Changes the attributes present in `attrs` (size truncates or
    /// extends; uid and gid must be given together).
    pub async fn setstat(&self, path: impl AsRef<Path>, attrs: &FileAttributes) -> Result<()> {
        check_attrs(attrs)?;
        let p = wire(path.as_ref());
        self.status_op("SFTP setstat", p, |c| c.setstat(p, attrs))
            .await
    }

    /// Creates a directory with permission bits `mode`.
    pub async fn mkdir(&self, path: impl AsRef<Path>, mode: u32) -> Result<()> {
        let p = wire(path.as_ref());
        let attrs = FileAttributes {
            permissions: Some(mode & 0o7777),
            ..Default::default()
        };
        self.status_op("SFTP mkdir", p, |c| c.mkdir(p, &attrs))
            .await
    }

    /// Removes an empty directory.
    pub async fn rmdir(&self, path: impl AsRef<Path>) -> Result<()> {
        let p = wire(path.as_ref());
        self.status_op("SFTP rmdir", p, |c| c.rmdir(p)).await
    }

    /// Removes a file (or a symbolic link).
    pub async fn unlink(&self, path: impl AsRef<Path>) -> Result<()> {
        let p = wire(path.as_ref());
        self.status_op("SFTP unlink", p, |c| c.remove(p)).await
    }

    /// Renames `from` to `to`, replacing `to` if it exists when the server
    /// offers `posix-rename@openssh.com` (plain SFTP v3 rename refuses an
    /// existing target, and is what is sent otherwise).
    pub async fn rename(&self, from: impl AsRef<Path>, to: impl AsRef<Path>) -> Result<()> {
        let (f, t) = (wire(from.as_ref()), wire(to.as_ref()));
        if self.inner.extensions.posix_rename {
            let r = self
                .extended("SFTP rename", true, "posix-rename@openssh.com", &[f, t])
                .await?;
            return status_ok(r, Some(f));
        }
        self.status_op("SFTP rename", f, |c| c.rename(f, t)).await
    }

    /// Creates a symbolic link at `link` pointing to `target`.
    pub async fn symlink(&self, target: impl AsRef<Path>, link: impl AsRef<Path>) -> Result<()> {
        let (t, l) = (wire(target.as_ref()), wire(link.as_ref()));
        self.status_op("SFTP symlink", l, |c| c.symlink(t, l)).await
    }

    /// Creates a hard link `link` to `target` (`hardlink@openssh.com`).
    pub async fn hardlink(&self, target: impl AsRef<Path>, link: impl AsRef<Path>) -> Result<()> {
        let (t, l) = (wire(target.as_ref()), wire(link.as_ref()));
        let offered = self.inner.extensions.hardlink;
        let r = self
            .extended("SFTP hardlink", offered, "hardlink@openssh.com", &[t, l])
            .await?;
        status_ok(r, Some(l))
    }

    /// A request on `path` whose reply is one name.
    async fn name_op(
        &self,
        operation: &'static str,
        path: &Path,
        request: impl FnOnce(&Rc<Client>, &[u8]) -> ReplyFuture,
    ) -> Result<Vec<u8>> {
        let p = wire(path);
        self.timed(operation, async {
            match request(&self.inner.client, p).await? {
                Reply::Name(mut n) if n.len() == 1 => Ok(n.remove(0).filename),
                other => Err(unexpected(other, Some(p))),
            }
        })
        .await
    }

    /// The target of a symbolic link.
    pub async fn readlink(&self, path: impl AsRef<Path>) -> Result<std::path::PathBuf> {
        let b = self
            .name_op("SFTP readlink", path.as_ref(), |c, p| c.readlink(p))
            .await?;
        Ok(path_from(b))
    }

    /// The canonical absolute form of `path` (`"."` gives the home
    /// directory).
    pub async fn realpath(&self, path: impl AsRef<Path>) -> Result<std::path::PathBuf> {
        let b = self
            .name_op("SFTP realpath", path.as_ref(), |c, p| c.realpath(p))
            .await?;
        Ok(path_from(b))
    }

    /// File system statistics for the file system holding `path`
    /// (`statvfs@openssh.com`).
    pub async fn statvfs(&self, path: impl AsRef<Path>) -> Result<StatVfs> {
        let p = wire(path.as_ref());
        let offered = self.inner.extensions.statvfs;
        let r = self
            .extended("SFTP statvfs", offered, "statvfs@openssh.com", &[p])
            .await?;
        match r {
            Reply::Extended(d) => codec::decode_statvfs(&d).map_err(protocol),
            other => Err(unexpected(other, Some(p))),
        }
    }

    /// Opens `path` for reading.
    pub async fn open(&self, path: impl AsRef<Path>) -> Result<File> {
        OpenOptions::new().read(true).open(self, path).await
    }

    /// Opens `path` for writing, creating it (mode 0644) or truncating it.
    pub async fn create(&self, path: impl AsRef<Path>) -> Result<File> {
        OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(self, path)
            .await
    }

    /// Opens a directory for listing.
    pub async fn read_dir(&self, path: impl AsRef<Path>) -> Result<ReadDir> {
        ReadDir::open(self, path.as_ref()).await
    }

    /// Lists a directory completely, without `.` and `..`. The whole
    /// listing is held in memory, as long as the server makes it: for a
    /// directory of unknown size, stream it with [`Sftp::read_dir`].
    pub async fn read_dir_all(&self, path: impl AsRef<Path>) -> Result<Vec<DirEntry>> {
        let mut d = self.read_dir(path).await?;
        let mut all = Vec::new();
        while let Some(e) = d.next_entry().await? {
            if e.name() != "." && e.name() != ".." {
                all.push(e);
            }
        }
        d.close().await?;
        Ok(all)
    }

    /// Closes the channel gracefully: closes every file still open from
    /// this client (the CLOSE requests pipelined), waits for every reply
    /// still owed, then closes the channel. Files still held fail with
    /// [`Error::Closed`] afterwards.
    pub async fn close(self) -> Result<()> {
        self.timed("SFTP close", async {
            let open: Vec<_> = self
                .inner
                .handles
                .borrow_mut()
                .drain(..)
                .filter_map(|w| w.upgrade())
                .filter(|h| !h.closed.replace(true))
                .collect();
            let closes: Vec<_> = open
                .iter()
                .map(|h| self.inner.client.close(&h.bytes))
                .collect();
            let mut first_err = None;
            for c in closes {
                if let Err(e) = c.await.and_then(|r| status_ok(r, None)) {
                    first_err.get_or_insert(e);
                }
            }
            if let Some(e) = first_err {
                return Err(e);
            }
            // A round trip behind everything sent so far: replies arrive in
            // order for OpenSSH, and this waits until the queue drains.
            while self.inner.client.in_flight() > 0 {
                self.inner.client.realpath(b".").await?;
            }
            self.inner.client.chan.close().await
        })
        .await
    }
}

/// The error for a reply that failed to decode: [`Error::Protocol`], or
/// [`Error::LimitExceeded`] for a field over one of the codec's bounds.
pub(crate) fn protocol(e: codec::DecodeError) -> Error {
    Error::from(e)
}

pub(crate) fn path_from(b: Vec<u8>) -> std::path::PathBuf {
    use std::os::unix::ffi::OsStringExt;
    std::path::PathBuf::from(std::ffi::OsString::from_vec(b))
}

pub(crate) fn check_attrs(a: &FileAttributes) -> Result<()> {
    if a.uid.is_some() != a.gid.is_some() {
        return Err(Error::InvalidInput(InvalidInput::Usage(
            "SFTP sets uid and gid together: give both or neither",
        )));
    }
    if a.atime.is_some() != a.mtime.is_some() {
        return Err(Error::InvalidInput(InvalidInput::Usage(
            "SFTP sets atime and mtime together: give both or neither",
        )));
    }
    Ok(())
}

#[cfg(test)]
mod limits_tests {
    use super::*;

    fn limits(packet: u64, read: u64, write: u64, handles: u64) -> Limits {
        Limits {
            max_packet_length: packet,
            max_read_length: read,
            max_write_length: write,
            max_open_handles: handles,
        }
    }

    #[test]
    fn openssh_limits_are_kept() {
        // What OpenSSH's sftp-server announces.
        let l = clamp_limits(limits(256 * 1024, 255 * 1024, 255 * 1024, 0));
        assert_eq!(l, limits(256 * 1024, 255 * 1024, 255 * 1024, 0));
        assert_eq!(io_sizes_for(&l), (255 * 1024, 255 * 1024));
        // None announced: the sizes every server accepts.
        let l = clamp_limits(Limits::default());
        assert_eq!(l, Limits::default());
        assert_eq!(io_sizes_for(&l), (32 * 1024, 32 * 1024));
    }

    #[test]
    fn hostile_limits_are_clamped() {
        let max = u64::MAX;
        let l = clamp_limits(limits(max, max, max, max));
        assert_eq!(
            l,
            limits(codec::MAX_PACKET as u64, 255 * 1024, 255 * 1024, max)
        );
        assert_eq!(io_sizes_for(&l), (255 * 1024, 255 * 1024));

        let l = clamp_limits(limits(1, 1, 1, 1));
        assert_eq!(l, limits(2048, 1024, 1024, 1));
        assert_eq!(io_sizes_for(&l), (1024, 1024));

        // A packet limit that leaves little room shrinks writes, never
        // below 1 KiB, whatever the write length says.
        let l = clamp_limits(limits(4096, 0, max, 0));
        assert_eq!(io_sizes_for(&l), (32 * 1024, 3072));
        // A packet length past u32::MAX does not wrap to a few bytes.
        let l = clamp_limits(limits((1 << 33) + 1029, 0, 0, 0));
        assert_eq!(io_sizes_for(&l), (32 * 1024, 32 * 1024));
        for v in [0, 1, 1023, 1024, 65536, 1 << 32, max] {
            for p in [0, 1, 2048, 100_000, max] {
                let (r, w) = io_sizes_for(&clamp_limits(limits(p, v, v, v)));
                for s in [r, w] {
                    assert!((1024..=255 * 1024).contains(&s), "{p} {v}: {s}");
                }
            }
        }
    }
}
