//! Local file IO through the reactor: creating, writing, syncing and
//! renaming the files a transfer writes, without blocking the thread that
//! drives every session.
//!
//! A call that the thread's [`LocalFiles`] mode puts on the ring (by
//! default only `fsync`, which waits on the device) is an op like a
//! socket's: it owns its buffer, names and the
//! file or directory it works in until its own completion, and a caller
//! that gives up leaves the reactor to clean up after it (an fd opened
//! meanwhile is closed, and the caller's `abandoned` runs). The others
//! (all of them on the poll engine, on kernels without the opcodes, or
//! with `URING_SSH_LOCAL_FILES=blocking`) are made at once, blocking.

use std::ffi::{CStr, CString};
use std::fs;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, IntoRawFd, OwnedFd, RawFd};
use std::rc::Rc;

use bytes::{Buf, BufMut};

use super::{LocalFiles, OpKind, Reactor, Resources};

/// A file or directory that ops name by number, held by each op until it
/// completes.
pub(crate) type HeldFd = Rc<dyn AsRawFd>;

/// This thread's reactor, if it performs `kind` on its ring (see
/// [`LocalFiles`]).
fn ring_for(kind: OpKind) -> Option<Rc<Reactor>> {
    let mode = |r: &Rc<Reactor>| r.features().local_files;
    Reactor::with_existing(|r| r.clone()).filter(|r| match mode(r) {
        LocalFiles::Blocking => false,
        LocalFiles::Sync => matches!(kind, OpKind::Fsync),
        LocalFiles::All => true,
    })
}

/// Starts `kind` on the ring, or performs it at once: its raw result and
/// the resources given back.
async fn run(kind: OpKind, resources: Resources) -> (i32, Resources) {
    match ring_for(kind) {
        Some(r) => {
            r.bump(|s| s.file_ops += 1);
            let done = r.start_op(kind, resources).await;
            (done.raw(), done.resources)
        }
        None => (perform(kind, &resources), resources),
    }
}

fn result(raw: i32) -> io::Result<u32> {
    if raw < 0 {
        Err(io::Error::from_raw_os_error(-raw))
    } else {
        Ok(raw as u32)
    }
}

/// `openat(dir, name, flags | O_CLOEXEC, mode)`. If the caller is gone
/// when the open completes, the new fd is closed and `abandoned` runs
/// (e.g. to remove the file the open created).
pub(crate) async fn open_at(
    dir: &HeldFd,
    name: &CStr,
    flags: i32,
    mode: u32,
    abandoned: impl FnOnce() + 'static,
) -> io::Result<fs::File> {
    let resources = Resources {
        file: Some(dir.clone()),
        path: Some(name.to_owned()),
        unclaimed: Some(Box::new(move |raw| {
            if raw >= 0 {
                // SAFETY: the open just returned this fd and nobody took it.
                drop(unsafe { OwnedFd::from_raw_fd(raw) });
                abandoned();
            }
        })),
        ..Resources::default()
    };
    let (raw, _) = run(OpKind::OpenAt { flags, mode }, resources).await;
    let fd = result(raw)?;
    // SAFETY: the open returned this fd to us; nothing else owns it.
    Ok(unsafe { fs::File::from_raw_fd(fd as RawFd) })
}

/// Writes all of `buf` at offset `at` of `file`; gives `buf` back.
pub(crate) async fn write_all_at(
    file: &HeldFd,
    buf: Vec<u8>,
    at: u64,
) -> (io::Result<()>, Vec<u8>) {
    let mut resources = Resources {
        buf,
        file: Some(file.clone()),
        ..Resources::default()
    };
    while resources.offset < resources.buf.len() {
        let (raw, back) = run(OpKind::Write { at }, resources).await;
        resources = back;
        match result(raw) {
            Ok(0) => return (Err(io::ErrorKind::WriteZero.into()), resources.buf),
            Ok(n) => resources.offset += n as usize,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return (Err(e), resources.buf),
        }
    }
    (Ok(()), resources.buf)
}

/// Writes all of `data` at offset `at` of `file`, from the pieces it is
/// held in: one `pwritev` per up to [`WRITEV_PIECES`] pieces, with no
/// copy. On a ring that does local files, a write owns one buffer until
/// its completion: the pieces are copied into one first.
pub(crate) async fn write_buf_at(file: &HeldFd, mut data: impl Buf, at: u64) -> io::Result<()> {
    if ring_for(OpKind::Write { at }).is_some() {
        let len = data.remaining();
        let mut buf = super::buffers::take_within(len, 2 * len).unwrap_or_default();
        buf.clear();
        buf.put(data);
        let (r, buf) = write_all_at(file, buf, at).await;
        super::buffers::keep(buf);
        return r;
    }
    let fd = file.as_raw_fd();
    let mut at = at;
    while data.has_remaining() {
        let mut iov = [io::IoSlice::new(&[]); WRITEV_PIECES];
        let count = data.chunks_vectored(&mut iov).min(WRITEV_PIECES);
        let iov = &iov[..count];
        // SAFETY: `iov` is a slice of `IoSlice`s, which std lays out as
        // `iovec`, borrowing `data`, which outlives the call; its length
        // (at most 64, under IOV_MAX) is the count passed; `file` keeps
        // `fd` open.
        let r = unsafe {
            libc::pwritev(
                fd,
                iov.as_ptr().cast(),
                iov.len() as libc::c_int,
                at as libc::off_t,
            )
        };
        match r {
            0 => return Err(io::ErrorKind::WriteZero.into()),
            n if n > 0 => {
                data.advance(n as usize);
                at += n as u64;
            }
            _ => {
                let e = io::Error::last_os_error();
                if e.kind() != io::ErrorKind::Interrupted {
                    return Err(e);
                }
            }
        }
    }
    Ok(())
}

/// Pieces per `pwritev` of [`write_buf_at`] (a 256 KiB READ reply
/// arrives in 8 or 9).
const WRITEV_PIECES: usize = 64;

/// Appends up to `max` bytes of `file`, read from offset `at`, to `buf`:
/// straight into its spare capacity, with no zeroing of memory about to be
/// overwritten. Fewer only at the end of the file; returns the count. A
/// blocking call (the thread's uploads read this way).
pub(crate) fn read_append_at(
    file: &fs::File,
    buf: &mut Vec<u8>,
    max: usize,
    at: u64,
) -> io::Result<usize> {
    buf.reserve(max);
    let mut n = 0;
    while n < max {
        let spare = &mut buf.spare_capacity_mut()[..max - n];
        // SAFETY: `spare` is `buf`'s own writable memory for its length,
        // and `pread` writes at most that many bytes; `file` keeps the fd
        // open for the call.
        let r = unsafe {
            libc::pread(
                file.as_raw_fd(),
                spare.as_mut_ptr().cast(),
                spare.len(),
                (at + n as u64) as libc::off_t,
            )
        };
        match r {
            0 => break,
            k if k > 0 => {
                // SAFETY: `pread` initialized the `k` bytes after `len`,
                // within the capacity reserved above.
                unsafe { buf.set_len(buf.len() + k as usize) };
                n += k as usize;
            }
            _ => {
                let e = io::Error::last_os_error();
                if e.kind() != io::ErrorKind::Interrupted {
                    return Err(e);
                }
            }
        }
    }
    Ok(n)
}

/// `renameat(dir, from, dir, to)`.
pub(crate) async fn rename_at(dir: &HeldFd, from: &CStr, to: &CStr) -> io::Result<()> {
    let resources = Resources {
        file: Some(dir.clone()),
        path: Some(from.to_owned()),
        path2: Some(to.to_owned()),
        ..Resources::default()
    };
    result(run(OpKind::RenameAt, resources).await.0).map(drop)
}

/// `fsync(file)`.
pub(crate) async fn fsync(file: &HeldFd) -> io::Result<()> {
    let resources = Resources {
        file: Some(file.clone()),
        ..Resources::default()
    };
    result(run(OpKind::Fsync, resources).await.0).map(drop)
}

/// Runs a file call to its end on a thread without a ring that does local
/// files, where it never waits: polls it once.
#[cfg(any(test, fuzzing))]
pub(crate) fn now<F: std::future::Future>(f: F) -> F::Output {
    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    match std::pin::pin!(f).poll(&mut cx) {
        std::task::Poll::Ready(v) => v,
        std::task::Poll::Pending => panic!("a file call waited on a thread without a ring"),
    }
}

/// Closes `file`: on the ring (batched with the thread's other ops) when
/// it does local files, else at once.
pub(crate) fn close(file: fs::File) {
    match ring_for(OpKind::Close(-1)) {
        Some(r) => r.close_fd(file.into_raw_fd()),
        None => drop(file),
    }
}

/// The result of file op `kind` on `res` by a blocking system call, as a
/// CQE would give it (a count, an fd, or a negated errno).
pub(super) fn perform(kind: OpKind, res: &Resources) -> i32 {
    let file = res.file.as_ref().map_or(-1, |f| f.as_raw_fd());
    let path = |p: &Option<CString>| p.as_ref().map_or(std::ptr::null(), |c| c.as_ptr());
    loop {
        // SAFETY: `file` is kept open by `res` for the call; the names are
        // NUL-terminated strings owned by `res`; the buffer slice is in
        // bounds of `res.buf`, which outlives the call.
        let r = unsafe {
            match kind {
                OpKind::OpenAt { flags, mode } => {
                    libc::openat(file, path(&res.path), flags | libc::O_CLOEXEC, mode) as isize
                }
                OpKind::Write { at } => {
                    let rest = &res.buf[res.offset..];
                    let off = (at + res.offset as u64) as libc::off_t;
                    libc::pwrite(file, rest.as_ptr().cast(), rest.len(), off)
                }
                OpKind::RenameAt => {
                    libc::renameat(file, path(&res.path), file, path(&res.path2)) as isize
                }
                OpKind::Fsync => libc::fsync(file) as isize,
                _ => unreachable!("not a file op: {kind:?}"),
            }
        };
        if r >= 0 {
            return r as i32;
        }
        let e = io::Error::last_os_error()
            .raw_os_error()
            .unwrap_or(libc::EIO);
        if e != libc::EINTR {
            return -e;
        }
    }
}

#[cfg(test)]
mod tests {
    use std::cell::Cell;
    use std::future::Future;
    use std::path::Path;
    use std::task::Poll;
    use std::time::{Duration, Instant};

    use super::*;
    use crate::reactor::{Backend, Choice};

    /// This thread's ring reactor in `mode`, after a warm-up round trip.
    async fn ring_in(mode: LocalFiles) -> Rc<Reactor> {
        let r = Reactor::current_with(Choice::Only(Backend::IoUring)).expect("io_uring reactor");
        crate::reactor::nop().await.expect("warm-up nop");
        assert_eq!(crate::reactor::set_local_files(mode).unwrap(), mode);
        r
    }

    /// The open fds of this process that name something in `dir` (not
    /// `dir` itself, which the test holds).
    fn fds_under(dir: &Path) -> Vec<String> {
        std::fs::read_dir("/proc/self/fd")
            .unwrap()
            .flatten()
            .filter_map(|e| std::fs::read_link(e.path()).ok())
            .filter(|t| t.starts_with(dir) && t != dir)
            .map(|t| t.display().to_string())
            .collect()
    }

    /// Yields to the driver until `pred` holds or two seconds pass.
    async fn until(pred: impl Fn() -> bool) -> bool {
        let end = Instant::now() + Duration::from_secs(2);
        while !pred() {
            if Instant::now() > end {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        true
    }

    fn dir_of(t: &tempfile::TempDir) -> HeldFd {
        Rc::new(std::fs::File::open(t.path()).unwrap())
    }

    #[tokio::test]
    async fn each_mode_creates_writes_syncs_and_renames_the_same_file() {
        // (mode, file calls expected on the ring: open, write, fsync, rename)
        for (mode, on_ring) in [
            (LocalFiles::All, 4),
            (LocalFiles::Sync, 1),
            (LocalFiles::Blocking, 0),
        ] {
            let r = ring_in(mode).await;
            let t = tempfile::tempdir().unwrap();
            let dir = dir_of(&t);
            let before = r.stats();
            let flags = libc::O_WRONLY | libc::O_CREAT | libc::O_EXCL;
            let f = open_at(&dir, c"part", flags, 0o600, || {}).await.unwrap();
            let f: HeldFd = Rc::new(f);
            let data: Vec<u8> = (0..100_003u32).map(|i| (i % 251) as u8).collect();
            let (w, back) = write_all_at(&f, data.clone(), 7).await;
            w.unwrap();
            assert_eq!(back, data, "the buffer comes back whole");
            fsync(&f).await.unwrap();
            drop(f);
            rename_at(&dir, c"part", c"done").await.unwrap();
            let mut want = vec![0u8; 7];
            want.extend_from_slice(&data);
            assert_eq!(
                std::fs::read(t.path().join("done")).unwrap(),
                want,
                "{mode:?}"
            );
            assert!(!t.path().join("part").exists());
            assert_eq!(r.stats().file_ops - before.file_ops, on_ring, "{mode:?}");
            // An error comes back as the call's own.
            let e = open_at(&dir, c"done", flags, 0o600, || {})
                .await
                .unwrap_err();
            assert_eq!(e.raw_os_error(), Some(libc::EEXIST), "{mode:?}");
        }
    }

    #[tokio::test]
    async fn a_write_from_pieces_lands_whole_in_each_mode() {
        // More pieces than one `pwritev` takes, of uneven sizes.
        let data: Vec<u8> = (0..300_007u32).map(|i| (i % 241) as u8).collect();
        let mut pieces = crate::sftp::Rope::new();
        let mut at = 0;
        for i in 0.. {
            let n = (1 + i * 37 % 4000).min(data.len() - at);
            pieces.push(bytes::Bytes::copy_from_slice(&data[at..at + n]));
            at += n;
            if at == data.len() {
                break;
            }
        }
        assert!(pieces.pieces() > 2 * WRITEV_PIECES);
        for (mode, on_ring) in [(LocalFiles::All, 1), (LocalFiles::Blocking, 0)] {
            let r = ring_in(mode).await;
            let t = tempfile::tempdir().unwrap();
            let f = std::fs::File::create(t.path().join("f")).unwrap();
            let f: HeldFd = Rc::new(f);
            let before = r.stats();
            write_buf_at(&f, pieces.clone(), 5).await.unwrap();
            assert_eq!(r.stats().file_ops - before.file_ops, on_ring, "{mode:?}");
            let mut want = vec![0u8; 5];
            want.extend_from_slice(&data);
            assert_eq!(std::fs::read(t.path().join("f")).unwrap(), want, "{mode:?}");
            // A file that takes no writes: the call's own error.
            let ro: HeldFd = Rc::new(std::fs::File::open(t.path().join("f")).unwrap());
            let e = write_buf_at(&ro, pieces.clone(), 0).await.unwrap_err();
            assert_eq!(e.raw_os_error(), Some(libc::EBADF), "{mode:?}");
        }
    }

    #[test]
    fn reads_append_after_what_the_buffer_holds_and_stop_at_the_end() {
        let t = tempfile::tempdir().unwrap();
        let data: Vec<u8> = (0..100_003u32).map(|i| (i % 239) as u8).collect();
        std::fs::write(t.path().join("f"), &data).unwrap();
        let f = std::fs::File::open(t.path().join("f")).unwrap();
        let mut buf = b"head".to_vec();
        assert_eq!(read_append_at(&f, &mut buf, 65_536, 10).unwrap(), 65_536);
        assert_eq!(&buf[..4], b"head");
        assert_eq!(&buf[4..], &data[10..10 + 65_536]);
        // Past the end: what is left, then nothing.
        assert_eq!(
            read_append_at(&f, &mut buf, 65_536, 65_546).unwrap(),
            34_457
        );
        assert_eq!(&buf[4 + 65_536..], &data[65_546..]);
        let len = buf.len();
        assert_eq!(read_append_at(&f, &mut buf, 10, 100_003).unwrap(), 0);
        assert_eq!(buf.len(), len);
        // A file that cannot be read: the call's own error, nothing added.
        let w = std::fs::OpenOptions::new()
            .write(true)
            .open(t.path().join("f"))
            .unwrap();
        let e = read_append_at(&w, &mut buf, 10, 0).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EBADF));
        assert_eq!(buf.len(), len);
    }

    /// An open whose completion arrived but was never taken: dropping it
    /// closes the fd and runs `abandoned`.
    #[tokio::test]
    async fn a_completed_open_dropped_untaken_closes_its_fd_and_cleans_up() {
        let r = ring_in(LocalFiles::All).await;
        let t = tempfile::tempdir().unwrap();
        let dir = dir_of(&t);
        let ran = Rc::new(Cell::new(false));
        let (ran2, path) = (ran.clone(), t.path().join("f"));
        let before = r.stats();
        let mut open = Box::pin(open_at(
            &dir,
            c"f",
            libc::O_WRONLY | libc::O_CREAT | libc::O_EXCL,
            0o600,
            move || {
                std::fs::remove_file(&path).unwrap();
                ran2.set(true);
            },
        ));
        let first = std::future::poll_fn(|cx| Poll::Ready(open.as_mut().poll(cx).is_pending()));
        assert!(first.await, "the open waits for its completion");
        assert!(until(|| r.stats().cqes_reaped > before.cqes_reaped).await);
        drop(open);
        assert!(ran.get(), "abandoned ran");
        assert!(!t.path().join("f").exists());
        assert_eq!(fds_under(t.path()), Vec::<String>::new());
        assert_eq!(r.stats().ops_in_flight, before.ops_in_flight);
    }

    /// An open dropped in flight is cancelled or completes; either way no
    /// fd and no file are left, and the reactor lets go of the op.
    #[tokio::test]
    async fn an_open_dropped_in_flight_leaves_no_fd_and_no_file() {
        let r = ring_in(LocalFiles::All).await;
        let t = tempfile::tempdir().unwrap();
        let dir = dir_of(&t);
        let before = r.stats();
        for i in 0..50 {
            let name = std::ffi::CString::new(format!("f{i}")).unwrap();
            let path = t.path().join(format!("f{i}"));
            let mut open = Box::pin(open_at(
                &dir,
                &name,
                libc::O_WRONLY | libc::O_CREAT | libc::O_EXCL,
                0o600,
                move || std::fs::remove_file(&path).unwrap(),
            ));
            let pending =
                std::future::poll_fn(|cx| Poll::Ready(open.as_mut().poll(cx).is_pending()));
            assert!(pending.await);
            if i % 2 == 1 {
                // Let the open reach the kernel before it is dropped.
                crate::reactor::nop().await.unwrap();
            }
        }
        // The cancels of the orphaned opens may complete after them.
        assert!(
            until(|| {
                let s = r.stats();
                s.orphaned_outstanding == before.orphaned_outstanding
                    && s.ops_in_flight == before.ops_in_flight
            })
            .await
        );
        assert_eq!(std::fs::read_dir(t.path()).unwrap().count(), 0);
        assert_eq!(fds_under(t.path()), Vec::<String>::new());
        assert_eq!(r.stats().ops_in_flight, before.ops_in_flight);
    }

    /// Opens still queued when the thread exits: the ring's teardown
    /// cancels them, or reaps them and cleans up as for any abandoned open;
    /// either way no fd and no file are left. (On this kernel the cancels,
    /// queued right behind the opens, usually win.)
    #[test]
    fn opens_in_flight_at_thread_exit_leave_no_fd_and_no_file() {
        let t = tempfile::tempdir().unwrap();
        let path = t.path().to_owned();
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async {
                ring_in(LocalFiles::All).await;
                let dir: HeldFd = Rc::new(std::fs::File::open(&path).unwrap());
                let names: Vec<_> = (0..20)
                    .map(|i| std::ffi::CString::new(format!("f{i}")).unwrap())
                    .collect();
                for (i, name) in names.iter().enumerate() {
                    let gone = path.join(format!("f{i}"));
                    let mut open = Box::pin(open_at(
                        &dir,
                        name,
                        libc::O_WRONLY | libc::O_CREAT | libc::O_EXCL,
                        0o600,
                        move || std::fs::remove_file(&gone).unwrap(),
                    ));
                    // Queued, then dropped: block_on returns without
                    // running the driver again, so the opens and their
                    // cancels reach the kernel in the ring's teardown.
                    let pending =
                        std::future::poll_fn(|cx| Poll::Ready(open.as_mut().poll(cx).is_pending()));
                    assert!(pending.await);
                }
            });
            drop(rt);
        })
        .join()
        .unwrap();
        assert_eq!(std::fs::read_dir(t.path()).unwrap().count(), 0);
        assert_eq!(fds_under(t.path()), Vec::<String>::new());
    }
}
