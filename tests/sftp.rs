//! SFTP against a real sshd (its internal-sftp subsystem): every operation,
//! its errors, files as tokio streams, many tasks on one client, and whole
//! file and tree transfers compared byte for byte.

use std::io::{ErrorKind, SeekFrom};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncSeekExt, AsyncWriteExt};
use uring_ssh::sftp::{
    FileAttributes, LinkPolicy, OpenOptions, Sftp, TransferItem, TransferOptions, status,
};
use uring_ssh::{Error, Session};
use uring_ssh_testkit::sshd::{Sshd, TEST_USER, require_test_user};
use uring_ssh_testkit::util::{Prng, config, connect, sha256_file, write_random_file};

const MIB: usize = 1024 * 1024;

/// A scratch directory the test user can use too.
fn scratch() -> tempfile::TempDir {
    let d = tempfile::tempdir().expect("tempdir");
    std::fs::set_permissions(d.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
    d
}

async fn sftp(sshd: &Sshd) -> (Session, Sftp) {
    let s = connect(sshd).await;
    let sftp = s.sftp().await.expect("sftp");
    (s, sftp)
}

fn sftp_code(e: &Error) -> Option<u32> {
    match e {
        Error::Sftp { code, .. } => Some(*code),
        _ => None,
    }
}

#[tokio::test]
async fn init_reports_version_extensions_and_limits() {
    let sshd = Sshd::start();
    let (_s, sftp) = sftp(&sshd).await;
    assert_eq!(sftp.version(), 3);
    let ext = sftp.extensions();
    assert!(
        ext.posix_rename && ext.statvfs && ext.fsync && ext.hardlink && ext.limits,
        "{ext:?}"
    );
    let limits = sftp.limits();
    assert!(limits.max_read_length >= 32 * 1024, "{limits:?}");
    let (r, w) = sftp.io_sizes();
    assert!(r as u64 <= limits.max_read_length && w as u64 <= limits.max_write_length);
    assert!(r >= 32 * 1024 && w >= 32 * 1024);
}

#[tokio::test]
async fn path_operations_and_their_errors() {
    let sshd = Sshd::start();
    let (_s, sftp) = sftp(&sshd).await;
    let d = scratch();
    let root = d.path();

    // mkdir / stat / lstat / setstat
    sftp.mkdir(root.join("sub"), 0o750).await.unwrap();
    let a = sftp.stat(root.join("sub")).await.unwrap();
    assert!(a.is_dir());
    assert_eq!(a.permissions.unwrap() & 0o777, 0o750 & !0o022 & 0o777);
    let e = sftp.mkdir(root.join("sub"), 0o755).await.unwrap_err();
    assert_eq!(sftp_code(&e), Some(status::FAILURE), "{e}");

    std::fs::write(root.join("f"), b"hello").unwrap();
    let a = sftp.stat(root.join("f")).await.unwrap();
    assert_eq!(a.size, Some(5));
    assert!(a.is_file());
    sftp.setstat(
        root.join("f"),
        &FileAttributes {
            permissions: Some(0o600),
            atime: Some(1_000_000_000),
            mtime: Some(1_200_000_000),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let m = std::fs::metadata(root.join("f")).unwrap();
    assert_eq!(m.permissions().mode() & 0o777, 0o600);
    assert_eq!(
        m.modified().unwrap(),
        std::time::UNIX_EPOCH + Duration::from_secs(1_200_000_000)
    );
    // Truncate through setstat.
    sftp.setstat(
        root.join("f"),
        &FileAttributes {
            size: Some(2),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    assert_eq!(std::fs::read(root.join("f")).unwrap(), b"he");
    // Half of a pair is refused before anything is sent.
    let e = sftp
        .setstat(
            root.join("f"),
            &FileAttributes {
                uid: Some(0),
                ..Default::default()
            },
        )
        .await
        .unwrap_err();
    assert!(matches!(e, Error::InvalidInput(_)), "{e}");

    // Missing paths: NotFound, with the code, the message and the path.
    let e = sftp.stat(root.join("missing")).await.unwrap_err();
    assert_eq!(sftp_code(&e), Some(status::NO_SUCH_FILE));
    assert_eq!(e.kind(), ErrorKind::NotFound);
    assert!(e.to_string().contains("missing"), "{e}");
    let io: std::io::Error = e.into();
    assert_eq!(io.kind(), ErrorKind::NotFound);
    assert_eq!(
        sftp.open(root.join("missing")).await.unwrap_err().kind(),
        ErrorKind::NotFound
    );
    assert_eq!(
        sftp.unlink(root.join("missing")).await.unwrap_err().kind(),
        ErrorKind::NotFound
    );

    // symlink / readlink / lstat / realpath
    sftp.symlink("f", root.join("link")).await.unwrap();
    assert_eq!(
        sftp.readlink(root.join("link")).await.unwrap(),
        Path::new("f")
    );
    assert!(sftp.lstat(root.join("link")).await.unwrap().is_symlink());
    assert!(sftp.stat(root.join("link")).await.unwrap().is_file());
    let canon = std::fs::canonicalize(root).unwrap();
    assert_eq!(
        sftp.realpath(root.join("sub/../f")).await.unwrap(),
        canon.join("f")
    );
    assert!(sftp.realpath(".").await.unwrap().is_absolute());

    // hardlink
    sftp.hardlink(root.join("f"), root.join("hard"))
        .await
        .unwrap();
    assert_eq!(std::fs::read(root.join("hard")).unwrap(), b"he");
    use std::os::unix::fs::MetadataExt;
    assert_eq!(std::fs::metadata(root.join("f")).unwrap().nlink(), 2);

    // rename: posix-rename replaces an existing target.
    std::fs::write(root.join("g"), b"gg").unwrap();
    sftp.rename(root.join("g"), root.join("hard"))
        .await
        .unwrap();
    assert_eq!(std::fs::read(root.join("hard")).unwrap(), b"gg");
    assert!(!root.join("g").exists());
    let e = sftp
        .rename(root.join("g"), root.join("x"))
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::NotFound);

    // rmdir on a non-empty directory fails; unlink + rmdir succeed.
    std::fs::write(root.join("sub/inner"), b"").unwrap();
    let e = sftp.rmdir(root.join("sub")).await.unwrap_err();
    assert_eq!(sftp_code(&e), Some(status::FAILURE), "{e}");
    sftp.unlink(root.join("sub/inner")).await.unwrap();
    sftp.rmdir(root.join("sub")).await.unwrap();
    assert!(!root.join("sub").exists());

    // statvfs agrees with the local view of the same file system.
    let v = sftp.statvfs(root).await.unwrap();
    let local = nix_statvfs(root);
    assert_eq!(v.bsize, local.0);
    assert_eq!(v.blocks, local.1);
    assert!(v.namemax >= 255);

    // Listing
    let mut names: Vec<String> = sftp
        .read_dir_all(root)
        .await
        .unwrap()
        .iter()
        .map(|e| e.name().into_owned())
        .collect();
    names.sort();
    assert_eq!(names, ["f", "hard", "link"]);
    let e = sftp.read_dir(root.join("missing")).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::NotFound);
}

fn nix_statvfs(p: &Path) -> (u64, u64) {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(p.as_os_str().as_bytes()).unwrap();
    // SAFETY: an all-zero statvfs is a valid value; statvfs(3) gets a valid
    // C string and a pointer to it, and fills it.
    let s = unsafe {
        let mut s: libc::statvfs = std::mem::zeroed();
        assert_eq!(libc::statvfs(c.as_ptr(), &mut s), 0);
        s
    };
    (s.f_bsize as u64, s.f_blocks as u64)
}

#[tokio::test]
async fn permission_denied_as_an_unprivileged_user() {
    require_test_user();
    let sshd = Sshd::start();
    let s = Session::connect_addr(sshd.addr(), config(&sshd))
        .await
        .unwrap();
    s.auth_pubkey_file(TEST_USER, &sshd.user_key(), None)
        .await
        .expect("the test user logs in with the fixture key");
    let sftp = s.sftp().await.unwrap();
    let d = tempfile::tempdir().unwrap();
    std::fs::set_permissions(d.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::write(d.path().join("secret"), b"x").unwrap();
    std::fs::set_permissions(
        d.path().join("secret"),
        std::fs::Permissions::from_mode(0o600),
    )
    .unwrap();

    for e in [
        sftp.open(d.path().join("secret")).await.unwrap_err(),
        sftp.create(d.path().join("new")).await.unwrap_err(),
        sftp.mkdir(d.path().join("dir"), 0o755).await.unwrap_err(),
        sftp.unlink(d.path().join("secret")).await.unwrap_err(),
    ] {
        assert_eq!(sftp_code(&e), Some(status::PERMISSION_DENIED), "{e}");
        assert_eq!(e.kind(), ErrorKind::PermissionDenied);
    }
    // The client is still usable after errors.
    assert_eq!(
        sftp.stat(d.path().join("secret")).await.unwrap().size,
        Some(1)
    );
}

#[tokio::test]
async fn file_read_write_seek_and_metadata() {
    let sshd = Sshd::start();
    let (_s, sftp) = sftp(&sshd).await;
    let d = scratch();
    let p = d.path().join("data");

    // Write 3 MiB through AsyncWrite in odd-sized pieces.
    let mut data = vec![0u8; 3 * MIB + 12345];
    Prng::new(7).fill(&mut data);
    let mut f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o640)
        .open(&sftp, &p)
        .await
        .unwrap();
    for chunk in data.chunks(100_003) {
        f.write_all(chunk).await.unwrap();
    }
    f.flush().await.unwrap();
    f.fsync().await.unwrap();
    assert_eq!(f.stat().await.unwrap().size, Some(data.len() as u64));
    f.close().await.unwrap();
    assert_eq!(std::fs::read(&p).unwrap(), data);
    assert_eq!(
        std::fs::metadata(&p).unwrap().permissions().mode() & 0o777,
        0o640
    );
    // create_new refuses an existing file.
    let e = OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&sftp, &p)
        .await
        .unwrap_err();
    assert_eq!(sftp_code(&e), Some(status::FAILURE), "{e}");
    // Options that make no sense are refused locally.
    let e = OpenOptions::new()
        .create(true)
        .open(&sftp, &p)
        .await
        .unwrap_err();
    assert!(matches!(e, Error::InvalidInput(_)), "{e}");

    // Read it all back, then seek around.
    let mut f = sftp.open(&p).await.unwrap();
    let mut back = Vec::new();
    f.read_to_end(&mut back).await.unwrap();
    assert!(back == data, "read back differs");
    assert_eq!(
        f.seek(SeekFrom::End(-10)).await.unwrap(),
        data.len() as u64 - 10
    );
    let mut tail = Vec::new();
    f.read_to_end(&mut tail).await.unwrap();
    assert_eq!(tail, data[data.len() - 10..]);
    f.seek(SeekFrom::Start(1_000_000)).await.unwrap();
    let mut mid = vec![0u8; 70_000];
    f.read_exact(&mut mid).await.unwrap();
    assert_eq!(mid, data[1_000_000..1_070_000]);
    f.seek(SeekFrom::Current(-70_000)).await.unwrap();
    f.read_exact(&mut mid).await.unwrap();
    assert_eq!(mid, data[1_000_000..1_070_000]);
    assert_eq!(f.read_at(5, 10).await.unwrap(), data[5..15]);
    assert!(f.read_at(data.len() as u64, 10).await.unwrap().is_empty());
    assert!(f.seek(SeekFrom::Current(-(10 * MIB as i64))).await.is_err());
    drop(f);

    // Positional writes, append, and fsetstat.
    let f = OpenOptions::new()
        .write(true)
        .open(&sftp, &p)
        .await
        .unwrap();
    f.write_at(10, b"XYZ").await.unwrap();
    f.setstat(&FileAttributes {
        size: Some(20),
        ..Default::default()
    })
    .await
    .unwrap();
    f.close().await.unwrap();
    let got = std::fs::read(&p).unwrap();
    assert_eq!(got.len(), 20);
    assert_eq!(&got[10..13], b"XYZ");
    let mut f = OpenOptions::new()
        .append(true)
        .open(&sftp, &p)
        .await
        .unwrap();
    f.write_all(b"tail").await.unwrap();
    f.close().await.unwrap();
    assert!(std::fs::read(&p).unwrap().ends_with(b"tail"));
}

#[tokio::test]
async fn thirty_two_tasks_share_one_client() {
    let sshd = Sshd::start();
    let (_s, sftp) = sftp(&sshd).await;
    let d = scratch();
    let tasks = (0..32).map(|i| {
        let sftp = sftp.clone();
        let p = d.path().join(format!("t{i}"));
        async move {
            let mut data = vec![0u8; 200_000 + i * 1000];
            Prng::new(i as u64 + 1).fill(&mut data);
            let mut f = sftp.create(&p).await.unwrap();
            f.write_all(&data).await.unwrap();
            f.close().await.unwrap();
            let st = sftp.stat(&p).await.unwrap();
            assert_eq!(st.size, Some(data.len() as u64));
            let mut back = Vec::new();
            sftp.open(&p)
                .await
                .unwrap()
                .read_to_end(&mut back)
                .await
                .unwrap();
            assert!(back == data, "task {i} read back other bytes");
            sftp.unlink(&p).await.unwrap();
        }
    });
    let before = sftp.counts();
    futures::future::join_all(tasks).await;
    // They really ran at once: requests overlapped on the one channel.
    let after = sftp.counts();
    assert!(after.0 - before.0 >= 32 * 5);
    assert_eq!(sftp.in_flight(), 0, "dropped files' closes are answered");
}

#[tokio::test]
async fn a_dropped_request_does_not_disturb_the_next() {
    let sshd = Sshd::start();
    let (_s, sftp) = sftp(&sshd).await;
    let d = scratch();
    write_random_file(&d.path().join("a"), 4 * MIB, 1);
    std::fs::write(d.path().join("b"), b"bbbb").unwrap();
    let fa = sftp.open(d.path().join("a")).await.unwrap();
    let fb = sftp.open(d.path().join("b")).await.unwrap();
    for round in 0..50 {
        // Start a large read and drop it after one poll, with its reply
        // (or part of it) still on the way.
        let read = fa.read_at(round * 1000, 255 * 1024);
        let mut read = Box::pin(read);
        let _ = futures::poll!(&mut read);
        drop(read);
        let stat = sftp.stat(d.path().join("a"));
        let mut stat = Box::pin(stat);
        let _ = futures::poll!(&mut stat);
        drop(stat);
        // The next requests get their own replies.
        assert_eq!(fb.read_at(0, 100).await.unwrap(), b"bbbb");
        assert_eq!(sftp.stat(d.path().join("b")).await.unwrap().size, Some(4));
    }
    // An abandoned open's handle is closed when its reply arrives.
    for _ in 0..20 {
        let open = sftp.open(d.path().join("b"));
        let mut open = Box::pin(open);
        let _ = futures::poll!(&mut open);
        drop(open);
    }
    assert_eq!(sftp.stat(d.path().join("b")).await.unwrap().size, Some(4));
    tokio::time::sleep(Duration::from_millis(50)).await;
    sftp.stat(d.path()).await.unwrap();
    assert_eq!(sftp.in_flight(), 0);
    let open_handles = sshd_handles(&sshd, d.path());
    assert_eq!(
        open_handles, 2,
        "handles open in sshd besides the two files"
    );
}

#[tokio::test]
async fn an_abandoned_open_is_closed_on_an_idle_channel() {
    let sshd = Sshd::start();
    let (_s, sftp) = sftp(&sshd).await;
    let d = scratch();
    std::fs::write(d.path().join("a"), b"abc").unwrap();
    // The OPEN goes out on the first poll; its reply arrives after the
    // drop, with no other request to carry the CLOSE it owes.
    let mut open = Box::pin(sftp.open(d.path().join("a")));
    assert!(futures::poll!(&mut open).is_pending());
    drop(open);
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while (sshd_handles(&sshd, d.path()) > 0 || sftp.in_flight() > 0)
        && std::time::Instant::now() < deadline
    {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(
        sshd_handles(&sshd, d.path()),
        0,
        "the server still holds the abandoned open's handle"
    );
    assert_eq!(sftp.in_flight(), 0, "the CLOSE was never answered");
}

/// Files the session's sshd child holds open under `dir`: its SFTP
/// handles there.
fn sshd_handles(sshd: &Sshd, dir: &Path) -> usize {
    let mut n = 0;
    for pid in sshd.connection_pids() {
        let Ok(rd) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
            continue;
        };
        for fd in rd.flatten() {
            if let Ok(t) = std::fs::read_link(fd.path())
                && t.starts_with(dir)
            {
                n += 1;
            }
        }
    }
    n
}

#[tokio::test]
async fn graceful_close_closes_open_handles() {
    let sshd = Sshd::start();
    let (s, sftp) = sftp(&sshd).await;
    let d = scratch();
    std::fs::write(d.path().join("a"), b"abc").unwrap();
    let mut files = Vec::new();
    for _ in 0..10 {
        files.push(sftp.open(d.path().join("a")).await.unwrap());
    }
    let dir = sftp.read_dir(d.path()).await.unwrap();
    assert!(sshd_handles(&sshd, d.path()) >= 11);
    sftp.clone().close().await.unwrap();
    let e = files[0].read_at(0, 3).await.unwrap_err();
    assert!(matches!(e, Error::Closed(_)), "{e}");
    drop((files, dir));
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while sshd_handles(&sshd, d.path()) > 0 && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(sshd_handles(&sshd, d.path()), 0);
    // The session is fine and can open another SFTP channel.
    let again = s.sftp().await.unwrap();
    assert_eq!(again.stat(d.path().join("a")).await.unwrap().size, Some(3));
}

#[tokio::test]
async fn one_gib_download_and_upload_match() {
    let sshd = Sshd::start();
    let (_s, sftp) = sftp(&sshd).await;
    let d = scratch();
    let src = d.path().join("big");
    let want = write_random_file(&src, 1024 * MIB, 42);

    let t = std::time::Instant::now();
    let n = sftp.download(&src, d.path().join("down")).await.unwrap();
    let down = t.elapsed();
    assert_eq!(n, 1024 * MIB as u64);
    assert_eq!(sha256_file(&d.path().join("down")), want);
    std::fs::remove_file(d.path().join("down")).unwrap();

    let t = std::time::Instant::now();
    let n = sftp.upload(&src, d.path().join("up")).await.unwrap();
    let up = t.elapsed();
    assert_eq!(n, 1024 * MIB as u64);
    assert_eq!(sha256_file(&d.path().join("up")), want);
    eprintln!(
        "1 GiB: download {:.0} MB/s, upload {:.0} MB/s",
        1073.741824 / down.as_secs_f64(),
        1073.741824 / up.as_secs_f64()
    );
    // No temporary names left behind.
    let left: Vec<_> = std::fs::read_dir(d.path())
        .unwrap()
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert_eq!(left.len(), 2, "{left:?}");
}

#[tokio::test]
async fn progress_is_reported_while_one_large_file_moves() {
    let sshd = Sshd::start();
    let (_s, sftp) = sftp(&sshd).await;
    let d = scratch();
    let src = d.path().join("big");
    let size = 64 * MIB as u64;
    write_random_file(&src, 64 * MIB, 7);
    for upload in [false, true] {
        let calls = Rc::new(std::cell::RefCell::new(Vec::new()));
        let seen = calls.clone();
        let opts = TransferOptions {
            progress: Some(Rc::new(move |p| seen.borrow_mut().push(*p))),
            ..TransferOptions::default()
        };
        let dest = d.path().join(if upload { "up" } else { "down" });
        let n = if upload {
            sftp.upload_with(&src, &dest, &opts).await.unwrap()
        } else {
            sftp.download_with(&src, &dest, &opts).await.unwrap()
        };
        assert_eq!(n, size);
        let calls = calls.borrow();
        let last = calls.last().expect("progress was reported");
        assert_eq!((last.files_done, last.bytes_done), (1, size));
        // Before the file was done: reports with bytes moving forward.
        let during: Vec<u64> = calls
            .iter()
            .filter(|p| p.files_done == 0)
            .map(|p| p.bytes_done)
            .collect();
        assert!(during.len() >= 2, "upload {upload}: {calls:?}");
        assert!(
            during.windows(2).all(|w| w[0] < w[1]) && during[0] > 0,
            "upload {upload}: {during:?}"
        );
        assert!(*during.last().unwrap() <= size, "{during:?}");
        assert!(calls.iter().all(|p| p.files_total == 1));
    }
}

/// Builds a tree: `small` files of 1–8 KiB over nested directories, plus
/// a few large ones, a symlink and an empty directory.
fn build_tree(root: &Path, small: usize) -> Vec<(PathBuf, String)> {
    let mut rng = Prng::new(99);
    let mut files = Vec::new();
    for i in 0..small {
        let dir = root.join(format!("d{}/e{}", i % 10, i % 7));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join(format!("f{i}"));
        let len = 1024 + rng.below(7 * 1024) as usize;
        let h = write_random_file(&p, len, i as u64 + 1);
        files.push((p.strip_prefix(root).unwrap().to_path_buf(), h));
    }
    for (i, len) in [(0, 3 * MIB), (1, 5 * MIB + 17), (2, 0)] {
        let p = root.join(format!("large{i}"));
        let h = write_random_file(&p, len, 1000 + i);
        files.push((p.strip_prefix(root).unwrap().to_path_buf(), h));
    }
    std::fs::create_dir_all(root.join("empty")).unwrap();
    std::os::unix::fs::symlink("large0", root.join("link")).unwrap();
    files
}

/// Each local-files mode downloads a synced tree intact, and makes its
/// file calls where the mode says: on the ring engine, `Sync` one `fsync`
/// per file on the ring, `All` also the create, writes and rename,
/// `Blocking` none; on the poll engine every mode is blocking.
#[tokio::test]
async fn synced_tree_downloads_make_their_file_calls_where_the_mode_says() {
    use uring_ssh::reactor::{self, Backend, LocalFiles};
    let sshd = Sshd::start();
    let (_s, sftp) = sftp(&sshd).await;
    let d = scratch();
    let src = d.path().join("src");
    let files = build_tree(&src, 200);
    let ring = reactor::init().unwrap().backend == Backend::IoUring;
    let opts = TransferOptions {
        fsync: true,
        ..Default::default()
    };
    for (i, mode) in [LocalFiles::Sync, LocalFiles::All, LocalFiles::Blocking]
        .into_iter()
        .enumerate()
    {
        let in_effect = reactor::set_local_files(mode).unwrap();
        assert_eq!(in_effect, if ring { mode } else { LocalFiles::Blocking });
        let before = reactor::stats().unwrap().file_ops;
        let down = d.path().join(format!("down{i}"));
        let report = sftp.download_tree(&src, &down, &opts).await;
        assert!(
            report.is_complete(),
            "{mode:?}: {:?}",
            report.failed().next()
        );
        for (p, h) in &files {
            assert_eq!(&sha256_file(&down.join(p)), h, "{mode:?} {}", p.display());
        }
        // Nothing but the tree: no temporary left behind.
        for e in walk(&down) {
            let n = e.file_name().unwrap().to_string_lossy().into_owned();
            assert!(!n.ends_with(".part"), "{mode:?}: {n} left behind");
        }
        let n = files.len() as u64;
        let on_ring = reactor::stats().unwrap().file_ops - before;
        match in_effect {
            LocalFiles::Blocking => assert_eq!(on_ring, 0),
            LocalFiles::Sync => assert_eq!(on_ring, n, "one fsync per file"),
            LocalFiles::All => assert!(on_ring >= 4 * n, "{on_ring} calls for {n} files"),
        }
    }
}

/// Every entry below `dir`, recursively.
fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let p = e.path();
        if e.file_type().unwrap().is_dir() {
            out.extend(walk(&p));
        }
        out.push(p);
    }
    out
}

#[tokio::test]
async fn trees_of_two_thousand_files_both_ways() {
    let sshd = Sshd::start();
    let (_s, sftp) = sftp(&sshd).await;
    let d = scratch();
    let src = d.path().join("src");
    let files = build_tree(&src, 2000);

    let progress = Rc::new(std::cell::Cell::new((0u64, 0u64)));
    let seen = progress.clone();
    let opts = TransferOptions {
        preserve: true,
        progress: Some(Rc::new(move |p| seen.set((p.files_done, p.bytes_done)))),
        ..Default::default()
    };
    let down = d.path().join("down");
    let report = sftp.download_tree(&src, &down, &opts).await;
    assert!(report.is_complete(), "{:?}", report.failed().next());
    assert_eq!(report.files.len(), files.len());
    let total: u64 = files
        .iter()
        .map(|(p, _)| std::fs::metadata(src.join(p)).unwrap().len())
        .sum();
    assert_eq!(report.bytes(), total);
    assert_eq!(progress.get(), (files.len() as u64, total));
    for (p, h) in &files {
        assert_eq!(&sha256_file(&down.join(p)), h, "{}", p.display());
        let (a, b) = (
            std::fs::metadata(src.join(p)).unwrap(),
            std::fs::metadata(down.join(p)).unwrap(),
        );
        assert_eq!(
            a.modified()
                .unwrap()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_secs(),
            b.modified()
                .unwrap()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_secs()
        );
    }
    assert!(down.join("empty").is_dir());
    assert_eq!(
        std::fs::read_link(down.join("link")).unwrap(),
        Path::new("large0")
    );

    // A second run with skip_unchanged moves nothing.
    let again = sftp
        .download_tree(
            &src,
            &down,
            &TransferOptions {
                skip_unchanged: true,
                ..Default::default()
            },
        )
        .await;
    assert!(again.is_complete());
    assert_eq!(again.bytes(), 0);
    assert!(again.files.iter().all(|f| f.skipped));

    // Upload the downloaded tree over two channels to a new place.
    let up = d.path().join("up");
    let second = _s.sftp().await.unwrap();
    let report = uring_ssh::sftp::upload_tree_over(
        &[sftp.clone(), second],
        &down,
        &up,
        &TransferOptions::default(),
    )
    .await;
    assert!(
        report.is_complete(),
        "{:?} {:?}",
        report.failed().next(),
        report.other_errors
    );
    for (p, h) in &files {
        assert_eq!(&sha256_file(&up.join(p)), h, "{}", p.display());
    }
    assert!(up.join("empty").is_dir());
}

#[tokio::test]
async fn many_file_failures_are_reported_per_file() {
    let sshd = Sshd::start();
    let (_s, sftp) = sftp(&sshd).await;
    let d = scratch();
    let mut items = Vec::new();
    for i in 0..20 {
        let remote = d.path().join(format!("r{i}"));
        if i % 4 != 0 {
            std::fs::write(&remote, vec![i as u8; 1000 * i]).unwrap();
        }
        items.push(TransferItem::new(remote, d.path().join(format!("l{i}"))));
    }
    let report = uring_ssh::sftp::download_many(
        std::slice::from_ref(&sftp),
        items,
        &TransferOptions::default(),
    )
    .await;
    assert_eq!(report.files.len(), 20);
    assert_eq!(report.failed().count(), 5);
    for f in &report.files {
        let i: usize = f.item.remote.file_name().unwrap().to_str().unwrap()[1..]
            .parse()
            .unwrap();
        if i.is_multiple_of(4) {
            assert_eq!(f.result.as_ref().unwrap_err().kind(), ErrorKind::NotFound);
            assert!(
                !f.item.local.exists(),
                "a failed file left {}",
                f.item.local.display()
            );
        } else {
            assert_eq!(*f.result.as_ref().unwrap(), 1000 * i as u64);
            assert_eq!(
                std::fs::read(&f.item.local).unwrap(),
                vec![i as u8; 1000 * i]
            );
        }
    }
    // Nothing else (no temporary files) left in the directory.
    let n = std::fs::read_dir(d.path()).unwrap().count();
    assert_eq!(n, 15 + 15);
}

#[tokio::test]
async fn dropped_files_are_closed_in_the_background() {
    let sshd = Sshd::start();
    let (_s, sftp) = sftp(&sshd).await;
    let d = scratch();
    write_random_file(&d.path().join("a"), 2 * MIB, 3);
    for _ in 0..20 {
        let mut f = sftp.open(d.path().join("a")).await.unwrap();
        let mut buf = vec![0u8; 100_000];
        f.read_exact(&mut buf).await.unwrap();
        // Reads in flight and an open handle: dropped at once.
        let t = std::time::Instant::now();
        drop(f);
        assert!(t.elapsed() < Duration::from_millis(5));
    }
    // Nobody else uses the client: the closes still go out.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while sshd_handles(&sshd, d.path()) > 0 && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(
        sshd_handles(&sshd, d.path()),
        0,
        "handles left open by dropped files"
    );
}

#[tokio::test]
async fn files_that_changed_since_listing_arrive_whole() {
    let sshd = Sshd::start();
    let (_s, sftp) = sftp(&sshd).await;
    let d = scratch();
    let (r, w) = sftp.io_sizes();
    assert!(r == w);
    let chunk = r as usize;
    // Sizes around the request size, each listed with a stale size.
    let cases = [
        (0, 10),
        (100, 0),
        (100, 50),
        (100, 200),
        (chunk, chunk - 1),
        (chunk + 1, chunk),
        (chunk - 1, chunk),
        (3 * chunk + 7, chunk),
        (2 * chunk, 2 * chunk),
        (2 * chunk, 5 * chunk),
    ];
    let mut items = Vec::new();
    let mut want = Vec::new();
    for (i, (real, listed)) in cases.iter().enumerate() {
        let remote = d.path().join(format!("r{i}"));
        let mut data = vec![0u8; *real];
        Prng::new(i as u64 + 5).fill(&mut data);
        std::fs::write(&remote, &data).unwrap();
        want.push(data);
        items.push(TransferItem {
            remote,
            local: d.path().join(format!("l{i}")),
            attrs: Some(FileAttributes {
                size: Some(*listed as u64),
                ..Default::default()
            }),
        });
    }
    let report = uring_ssh::sftp::download_many(
        std::slice::from_ref(&sftp),
        items,
        &TransferOptions::default(),
    )
    .await;
    assert!(report.is_complete());
    for (i, data) in want.iter().enumerate() {
        let got = std::fs::read(d.path().join(format!("l{i}"))).unwrap();
        assert!(
            got == *data,
            "case {i} {:?}: {} bytes, want {}",
            cases[i],
            got.len(),
            data.len()
        );
    }
}

/// A 1 MiB tmpfs mounted for one test (the tests run as root); unmounted
/// (lazily, in case a server process still holds a file) when dropped.
struct SmallDisk(tempfile::TempDir);

impl SmallDisk {
    fn mount() -> SmallDisk {
        let d = scratch();
        let st = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", "size=1m,mode=0777", "tmpfs"])
            .arg(d.path())
            .status()
            .expect("mount(8)");
        assert!(
            st.success(),
            "mounting a small tmpfs needs root (run the tests as scripts/test.sh does)"
        );
        SmallDisk(d)
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(self.0.path())
            .status();
    }
}

#[tokio::test]
async fn a_full_disk_fails_the_upload_and_says_how_much_was_acknowledged() {
    let sshd = Sshd::start();
    let (_s, sftp) = sftp(&sshd).await;
    let disk = SmallDisk::mount();
    let d = scratch();
    let src = d.path().join("three");
    write_random_file(&src, 3 * MIB, 8);
    let small = d.path().join("small");
    std::fs::write(&small, b"fits").unwrap();
    let items = vec![TransferItem::new(disk.0.path().join("three"), &src)];
    let report = uring_ssh::sftp::upload_many(
        std::slice::from_ref(&sftp),
        items,
        &TransferOptions::default(),
    )
    .await;
    let big = &report.files[0];
    let e = big.result.as_ref().unwrap_err();
    assert_eq!(sftp_code(e), Some(status::FAILURE), "{e}");
    assert!(
        big.bytes_acknowledged > 0 && big.bytes_acknowledged <= MIB as u64,
        "acknowledged {} bytes of a 3 MiB file on a 1 MiB disk",
        big.bytes_acknowledged
    );
    // Nothing under the failed file's name, and its temporary file is gone
    // (its REMOVE was queued before this listing, and is answered first):
    // the space is free again for the next file.
    assert!(sftp.read_dir_all(disk.0.path()).await.unwrap().is_empty());
    assert_eq!(
        sftp.upload(&small, disk.0.path().join("small"))
            .await
            .unwrap(),
        4
    );
    eprintln!(
        "disk full: {e}; {} bytes acknowledged",
        big.bytes_acknowledged
    );
}

/// A tree whose links lead inside it, outside it, to `/`, and in a loop.
fn tree_with_links(root: &Path, outside: &Path) {
    std::fs::create_dir_all(root.join("dir")).unwrap();
    std::fs::write(root.join("dir/file"), b"inside").unwrap();
    std::fs::create_dir_all(outside).unwrap();
    std::fs::write(outside.join("secret"), b"outside").unwrap();
    std::os::unix::fs::symlink("dir/file", root.join("inside")).unwrap();
    std::os::unix::fs::symlink("../dir", root.join("dir/loop")).unwrap();
    std::os::unix::fs::symlink(outside.join("secret"), root.join("external")).unwrap();
    std::os::unix::fs::symlink(outside, root.join("external_dir")).unwrap();
    std::os::unix::fs::symlink("/", root.join("slash")).unwrap();
}

#[tokio::test(flavor = "current_thread")]
async fn tree_links_kept_skipped_or_kept_when_safe() {
    let sshd = Sshd::start();
    let (_s, sftp) = sftp(&sshd).await;
    let d = scratch();
    let src = d.path().join("src");
    tree_with_links(&src, &d.path().join("outside"));
    let links = |down: &Path| {
        let mut v: Vec<String> = ["inside", "dir/loop", "external", "external_dir", "slash"]
            .iter()
            .filter(|l| std::fs::symlink_metadata(down.join(l)).is_ok())
            .map(|l| l.to_string())
            .collect();
        v.sort();
        v
    };

    let keep = d.path().join("keep");
    let r = sftp
        .download_tree(&src, &keep, &TransferOptions::default())
        .await;
    assert!(
        r.is_complete(),
        "{:?} {:?}",
        r.failed().next(),
        r.other_errors
    );
    assert_eq!(links(&keep).len(), 5);
    assert_eq!(
        std::fs::read_link(keep.join("slash")).unwrap(),
        Path::new("/")
    );
    assert_eq!(std::fs::read(keep.join("dir/file")).unwrap(), b"inside");

    let skip = d.path().join("skip");
    let opts = TransferOptions {
        links: LinkPolicy::Skip,
        ..Default::default()
    };
    let r = sftp.download_tree(&src, &skip, &opts).await;
    assert!(r.is_complete(), "{:?}", r.other_errors);
    assert!(links(&skip).is_empty());
    assert_eq!(r.skipped_links.len(), 5, "{:?}", r.skipped_links);

    let safe = d.path().join("safe");
    let opts = TransferOptions {
        links: LinkPolicy::Safe,
        ..Default::default()
    };
    let r = sftp.download_tree(&src, &safe, &opts).await;
    assert!(r.is_complete(), "{:?}", r.other_errors);
    assert_eq!(links(&safe), ["dir/loop", "inside"]);
    assert_eq!(r.skipped_links.len(), 3, "{:?}", r.skipped_links);
}

#[tokio::test(flavor = "current_thread")]
async fn a_link_planted_in_the_destination_is_never_written_through() {
    let sshd = Sshd::start();
    let (_s, sftp) = sftp(&sshd).await;
    let d = scratch();
    let src = d.path().join("src");
    std::fs::create_dir_all(src.join("dir")).unwrap();
    std::fs::write(src.join("dir/file"), b"new").unwrap();
    std::fs::write(src.join("top"), b"new").unwrap();
    let outside = d.path().join("outside");
    std::fs::create_dir_all(&outside).unwrap();
    std::fs::write(outside.join("top"), b"precious").unwrap();
    // Planted before the transfer: a link where a directory goes, and a
    // link where a file goes.
    let down = d.path().join("down");
    std::fs::create_dir_all(&down).unwrap();
    std::os::unix::fs::symlink(&outside, down.join("dir")).unwrap();
    std::os::unix::fs::symlink(outside.join("top"), down.join("top")).unwrap();

    for atomic in [true, false] {
        let opts = TransferOptions {
            atomic,
            ..Default::default()
        };
        let r = sftp.download_tree(&src, &down, &opts).await;
        assert!(
            r.other_errors
                .iter()
                .any(|(_, e)| matches!(e, Error::OutsideDestination { .. })),
            "atomic {atomic}: {:?}",
            r.other_errors
        );
        assert_eq!(std::fs::read(outside.join("top")).unwrap(), b"precious");
        assert!(!outside.join("file").exists());
        assert_eq!(std::fs::read_dir(&outside).unwrap().count(), 1);
        if atomic {
            // The file's temporary was renamed over the link: the link is
            // gone, replaced by the file; its target is untouched.
            assert_eq!(std::fs::read(down.join("top")).unwrap(), b"new");
            std::os::unix::fs::symlink(outside.join("top"), down.join("top2")).unwrap();
            std::fs::rename(down.join("top2"), down.join("top")).unwrap();
        } else {
            // Not atomic: the file is opened in place, and the link refused.
            let top = r
                .files
                .iter()
                .find(|f| f.item.local.ends_with("top"))
                .unwrap();
            assert!(
                matches!(top.result, Err(Error::OutsideDestination { .. })),
                "{:?}",
                top.result
            );
        }
    }
}

#[tokio::test(flavor = "current_thread")]
async fn uploads_follow_links_inside_the_tree_only() {
    let sshd = Sshd::start();
    let (_s, sftp) = sftp(&sshd).await;
    let d = scratch();
    let src = d.path().join("src");
    tree_with_links(&src, &d.path().join("outside"));
    let up = d.path().join("up");
    let r = sftp
        .upload_tree(&src, &up, &TransferOptions::default())
        .await;
    assert!(
        r.is_complete(),
        "{:?} {:?}",
        r.failed().next(),
        r.other_errors
    );
    // `inside` leads to a file of the tree: uploaded as a file. `dir/loop`
    // leads back to `dir`: already uploaded, not again.
    assert_eq!(std::fs::read(up.join("inside")).unwrap(), b"inside");
    assert!(!up.join("dir/loop").exists());
    assert!(!up.join("external").exists() && !up.join("external_dir").exists());
    assert!(!up.join("slash").exists());
    let mut skipped: Vec<_> = r
        .skipped_links
        .iter()
        .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    skipped.sort();
    assert_eq!(skipped, ["external", "external_dir", "slash"]);

    // Asked to, it follows the external file link too.
    let up2 = d.path().join("up2");
    let opts = TransferOptions {
        follow_external_links: true,
        ..Default::default()
    };
    let r = sftp.upload_tree(&src.join("dir"), &up2, &opts).await;
    assert!(r.is_complete(), "{:?}", r.other_errors);
    assert_eq!(std::fs::read(up2.join("file")).unwrap(), b"inside");
}

/// Replies that arrive while the reactor's driver task has spent its
/// cooperative budget (on other work of the driver) are still read: the
/// receive hook that reads them polls with a waker nobody listens to, so a
/// read that yielded for the budget left them unread, and the request
/// waited for a receive that the server, with everything answered, never
/// sent (a fleet `get` stalled until the next keepalive's reply).
#[tokio::test]
async fn replies_are_read_while_the_driver_budget_is_spent() {
    // The ring engine, in the poll pass too: the poll engine gathers
    // socket events only once the driver finds nothing else to do, which
    // a task that is always ready never lets happen, whereas the ring's
    // completions come whatever the driver does.
    uring_ssh::reactor::init_with(uring_ssh::reactor::Backend::IoUring)
        .expect("this test needs the io_uring engine");
    let sshd = Sshd::start();
    let (_s, sftp) = sftp(&sshd).await;
    // A task on the driver, polled between its rounds of completions: it
    // spends the whole budget at each turn, so that most completions (the
    // receives of the replies among them) are handled with none left.
    let stop = Rc::new(std::cell::Cell::new(false));
    let stopped = stop.clone();
    uring_ssh::reactor::spawn_on_driver(std::future::poll_fn(move |cx| {
        if stopped.get() {
            return std::task::Poll::Ready(());
        }
        while let std::task::Poll::Ready(progress) = tokio::task::coop::poll_proceed(cx) {
            progress.made_progress();
        }
        // The budget's `Pending` woke this task: it runs again soon.
        std::task::Poll::Pending
    }))
    .expect("reactor");
    for i in 0..100 {
        // Any wake-up of this task reads the reply (a keepalive's reply did
        // in the fleet): the time taken shows a reply left unread.
        let started = std::time::Instant::now();
        let reply = tokio::time::timeout(Duration::from_secs(3), sftp.stat("/")).await;
        let took = started.elapsed();
        assert!(
            matches!(reply, Ok(Ok(_))) && took < Duration::from_secs(2),
            "request {i}: its reply was left unread for {took:?}: {reply:?}"
        );
    }
    stop.set(true);
}
