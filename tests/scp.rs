//! SCP against a real sshd: 32 MiB each way with SHA-256, mode, size and
//! times checked on both sides; the remote scp's errors; transfers dropped
//! half-way leave nothing behind.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::time::{Duration, Instant, UNIX_EPOCH};

use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use uring_ssh_testkit::sshd::{Sshd, TEST_PASSWORD, TEST_USER, require_test_user};
use uring_ssh_testkit::util::{
    Prng, connect, hex, open_fds, proc_status, settle_orphans, sha256_file, wait_freed,
    write_random_file,
};

const MIB: usize = 1024 * 1024;

/// One test at a time in this binary: the drop test counts the process's
/// file descriptors, which parallel tests would change under it.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

#[tokio::test]
async fn scp_send_32_mib_with_mode_and_times() {
    let _serial = SERIAL.lock().await;
    let sshd = Sshd::start();
    let dir = tempfile::tempdir().unwrap();
    let remote = dir.path().join("sent.bin");
    let s = connect(&sshd).await;
    let len = 32 * MIB;
    let (mtime, atime) = (1_600_000_000u64, 1_600_000_123u64);
    let t = Instant::now();
    let mut w = s
        .scp_send(
            remote.to_str().unwrap(),
            0o640,
            len as u64,
            Some((mtime, atime)),
        )
        .await
        .expect("scp_send");
    let mut rng = Prng::new(11);
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 256 * 1024];
    let mut left = len;
    while left > 0 {
        let n = left.min(buf.len());
        rng.fill(&mut buf[..n]);
        h.update(&buf[..n]);
        w.write_all(&buf[..n]).await.unwrap();
        left -= n;
    }
    assert_eq!(w.remaining(), 0);
    w.finish()
        .await
        .expect("finish: the remote scp acknowledged the file");
    let secs = t.elapsed().as_secs_f64();
    eprintln!(
        "scp_send 32 MiB: {secs:.2} s, {:.0} MB/s",
        len as f64 / secs / 1e6
    );
    // Checked as soon as finish returns: the file is complete on the server.
    let meta = std::fs::metadata(&remote).unwrap();
    assert_eq!(meta.len(), len as u64);
    assert_eq!(meta.permissions().mode() & 0o7777, 0o640);
    assert_eq!(meta.mtime() as u64, mtime);
    assert_eq!(meta.atime() as u64, atime);
    assert_eq!(sha256_file(&remote), hex(&h.finalize()));
}

#[tokio::test]
async fn scp_recv_32_mib_reports_its_stat() {
    let _serial = SERIAL.lock().await;
    let sshd = Sshd::start();
    let dir = tempfile::tempdir().unwrap();
    let remote = dir.path().join("to-fetch.bin");
    let len = 32 * MIB + 12345;
    let sum = write_random_file(&remote, len, 22);
    std::fs::set_permissions(&remote, std::fs::Permissions::from_mode(0o604)).unwrap();
    let (mtime, atime) = (1_500_000_000u64, 1_500_000_456u64);
    let f = std::fs::File::options().write(true).open(&remote).unwrap();
    f.set_times(
        std::fs::FileTimes::new()
            .set_modified(UNIX_EPOCH + Duration::from_secs(mtime))
            .set_accessed(UNIX_EPOCH + Duration::from_secs(atime)),
    )
    .unwrap();
    drop(f);
    let s = connect(&sshd).await;
    let t = Instant::now();
    let (mut r, stat) = s
        .scp_recv(remote.to_str().unwrap())
        .await
        .expect("scp_recv");
    assert_eq!(stat.size, len as u64);
    assert_eq!(stat.mode, 0o604);
    assert_eq!(stat.mtime, mtime);
    assert_eq!(stat.atime, atime);
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 256 * 1024];
    let mut got = 0usize;
    loop {
        let n = r.read(&mut buf).await.unwrap();
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
        got += n;
    }
    let secs = t.elapsed().as_secs_f64();
    eprintln!(
        "scp_recv 32 MiB: {secs:.2} s, {:.0} MB/s",
        len as f64 / secs / 1e6
    );
    assert_eq!(got, len);
    assert_eq!(r.remaining(), 0);
    assert_eq!(hex(&h.finalize()), sum);
    r.finish().await.expect("the remote scp exits 0");
}

#[tokio::test]
async fn scp_round_trip_of_an_empty_file_and_an_odd_name() {
    let _serial = SERIAL.lock().await;
    let sshd = Sshd::start();
    let dir = tempfile::tempdir().unwrap();
    let remote = dir.path().join("it's a file");
    let s = connect(&sshd).await;
    let w = s
        .scp_send(remote.to_str().unwrap(), 0o600, 0, None)
        .await
        .unwrap();
    w.finish().await.unwrap();
    assert_eq!(std::fs::metadata(&remote).unwrap().len(), 0);
    let (mut r, stat) = s.scp_recv(remote.to_str().unwrap()).await.unwrap();
    assert_eq!(stat.size, 0);
    let mut out = Vec::new();
    r.read_to_end(&mut out).await.unwrap();
    assert!(out.is_empty());
    r.finish().await.unwrap();
}

#[tokio::test]
async fn missing_remote_paths_give_the_remote_scp_message() {
    let _serial = SERIAL.lock().await;
    let sshd = Sshd::start();
    let s = connect(&sshd).await;
    let e = s
        .scp_recv("/nonexistent-uring-ssh/file")
        .await
        .expect_err("a missing file must fail");
    assert_eq!(e.kind(), std::io::ErrorKind::NotFound, "{e}");
    assert!(
        e.to_string()
            .contains("/nonexistent-uring-ssh/file: No such file or directory"),
        "{e}"
    );
    let e = s
        .scp_send("/nonexistent-uring-ssh/file", 0o644, 10, None)
        .await
        .expect_err("a missing directory must fail");
    assert_eq!(e.kind(), std::io::ErrorKind::NotFound, "{e}");
    assert!(e.to_string().contains("No such file or directory"), "{e}");
    let e = s
        .scp_recv("/tmp")
        .await
        .expect_err("a directory is not a file");
    assert!(e.to_string().contains("not a regular file"), "{e}");
    // Wrong byte counts are the caller's error, caught before the server sees them.
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("short");
    let mut w = s
        .scp_send(p.to_str().unwrap(), 0o644, 10, None)
        .await
        .unwrap();
    let e = w
        .write_all(&[1u8; 11])
        .await
        .expect_err("more than announced");
    assert_eq!(e.kind(), std::io::ErrorKind::InvalidInput);
    assert_eq!(w.remaining(), 0, "the first 10 bytes were taken");
    w.finish().await.unwrap();
    let mut w = s
        .scp_send(p.to_str().unwrap(), 0o644, 10, None)
        .await
        .unwrap();
    w.write_all(&[1u8; 5]).await.unwrap();
    let e = w.finish().await.expect_err("fewer than announced");
    assert!(
        e.to_string().contains("5 bytes fewer than announced"),
        "{e}"
    );
    // The session is fine after all of these.
    let mut ch = s.exec("echo alive").await.unwrap();
    let mut out = String::new();
    ch.read_to_string(&mut out).await.unwrap();
    assert_eq!(out, "alive\n");
}

#[tokio::test]
async fn scp_transfers_dropped_midway_leak_nothing() {
    let _serial = SERIAL.lock().await;
    let sshd = Sshd::start();
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src.bin");
    write_random_file(&src, 32 * MIB, 33);
    // The thread's ring and its fds come with the first session.
    connect(&sshd).await.close("warm-up").await.unwrap();
    settle_orphans(Duration::from_secs(2)).await;
    let fds_before = open_fds();
    let s = connect(&sshd).await;
    // Warm-up: what libssh2 holds for an idle session once a channel has
    // come and gone.
    let mut ch = s.exec("true").await.unwrap();
    ch.wait().await.unwrap();
    let held = s.stats();
    drop(ch);
    let bytes_before = wait_freed(&s, held, Duration::from_secs(10), "the warm-up channel")
        .await
        .libssh2_bytes;

    for round in 0..3 {
        let dst = dir.path().join(format!("dst{round}.bin"));
        let mut w = s
            .scp_send(dst.to_str().unwrap(), 0o644, 32 * MIB as u64, None)
            .await
            .unwrap();
        let chunk = vec![round as u8; MIB];
        for _ in 0..8 {
            w.write_all(&chunk).await.unwrap();
        }
        let t = Instant::now();
        drop(w);
        assert!(
            t.elapsed() < Duration::from_millis(50),
            "writer drop blocked"
        );

        let (mut r, _) = s.scp_recv(src.to_str().unwrap()).await.unwrap();
        let mut buf = vec![0u8; MIB];
        let mut got = 0;
        while got < 4 * MIB {
            got += r.read(&mut buf).await.unwrap();
        }
        let t = Instant::now();
        drop(r);
        assert!(
            t.elapsed() < Duration::from_millis(50),
            "reader drop blocked"
        );
    }
    // The session finishes the dropped channels' closes in the background.
    let deadline = Instant::now() + Duration::from_secs(10);
    while s.stats().libssh2_bytes != bytes_before && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(
        s.stats().libssh2_bytes,
        bytes_before,
        "libssh2 memory left behind"
    );
    // Still usable, then closed cleanly.
    let (mut r, stat) = s.scp_recv(src.to_str().unwrap()).await.unwrap();
    let mut all = Vec::new();
    r.read_to_end(&mut all).await.unwrap();
    assert_eq!(all.len() as u64, stat.size);
    r.finish().await.unwrap();
    s.close("bye").await.unwrap();
    drop(s);
    let st = settle_orphans(Duration::from_secs(2)).await;
    assert_eq!(st.orphaned_outstanding, 0, "{st:?}");
    assert_eq!(open_fds(), fds_before, "fds leaked");
}

#[tokio::test]
async fn permission_denied_is_reported_as_such() {
    let _serial = SERIAL.lock().await;
    require_test_user();
    let sshd = Sshd::builder().password_auth(true).start();
    // A root-only directory: the test user may not enter.
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o700)).unwrap();
    let secret = dir.path().join("secret");
    std::fs::write(&secret, b"x").unwrap();
    let s = uring_ssh::Session::connect_addr(sshd.addr(), uring_ssh_testkit::util::config(&sshd))
        .await
        .unwrap();
    s.auth_password(TEST_USER, TEST_PASSWORD).await.unwrap();
    let e = s
        .scp_recv(secret.to_str().unwrap())
        .await
        .expect_err("the test user cannot read it");
    assert_eq!(e.kind(), std::io::ErrorKind::PermissionDenied, "{e}");
    let e = s
        .scp_send(dir.path().join("new").to_str().unwrap(), 0o644, 1, None)
        .await
        .expect_err("the test user cannot write there");
    assert_eq!(e.kind(), std::io::ErrorKind::PermissionDenied, "{e}");
}

#[tokio::test]
async fn many_scp_transfers_run_at_once_on_one_session() {
    let _serial = SERIAL.lock().await;
    let sshd = Sshd::start();
    let dir = tempfile::tempdir().unwrap();
    let s = connect(&sshd).await;
    const N: usize = 8;
    const LEN: usize = 4 * MIB;
    let sends = (0..N).map(|i| {
        let s = &s;
        let path = dir.path().join(format!("up{i}"));
        async move {
            let mut data = vec![0u8; LEN];
            Prng::new(500 + i as u64).fill(&mut data);
            let mut w = s
                .scp_send(path.to_str().unwrap(), 0o600, LEN as u64, None)
                .await
                .unwrap();
            w.write_all(&data).await.unwrap();
            w.finish().await.unwrap();
            (path, hex(&Sha256::digest(&data)))
        }
    });
    let sent = futures::future::join_all(sends).await;
    for (path, sum) in &sent {
        assert_eq!(&sha256_file(path), sum);
    }
    let recvs = sent.iter().map(|(path, sum)| {
        let s = &s;
        async move {
            let (mut r, stat) = s.scp_recv(path.to_str().unwrap()).await.unwrap();
            assert_eq!(stat.size, LEN as u64);
            let mut all = Vec::new();
            r.read_to_end(&mut all).await.unwrap();
            r.finish().await.unwrap();
            assert_eq!(&hex(&Sha256::digest(&all)), sum);
        }
    });
    futures::future::join_all(recvs).await;
}

/// A stand-in for the remote scp, run by sshd's `ForceCommand` in place of
/// every command: it answers `scp -f` for the paths below with a hostile
/// header, and runs any other command as given.
const HOSTILE_SCP: &str = r#"#!/bin/sh
case "$SSH_ORIGINAL_COMMAND" in
*bounds-huge-size*) printf 'C0644 9223372036854775808 f\n' ;;
*bounds-max-size*) printf 'C0644 9223372036854775807 f\n'; head -c 2 >/dev/null; printf abc ;;
*bounds-long-line*) head -c 1048576 /dev/zero | tr '\0' C ;;
*bounds-escapes*) printf '\001scp: \033[2J\033]0;owned\007/x: No such file or directory\n' ;;
*bounds-two-times*) printf 'T1 0 2 0\nT3 0 4 0\nC0644 1 f\nx' ;;
*) exec /bin/sh -c "$SSH_ORIGINAL_COMMAND" ;;
esac
"#;

/// An sshd whose remote scp is [`HOSTILE_SCP`] (the directory holding the
/// script must outlive the server).
fn hostile_scp_sshd(dir: &std::path::Path) -> Sshd {
    let script = dir.join("hostile-scp");
    std::fs::write(&script, HOSTILE_SCP).unwrap();
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    Sshd::builder()
        .extra(&format!("ForceCommand {}", script.display()))
        .start()
}

#[tokio::test]
async fn hostile_scp_headers_are_bounded() {
    let _serial = SERIAL.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let sshd = hostile_scp_sshd(dir.path());
    let s = connect(&sshd).await;

    // A size past off_t: refused before anything is sized by it.
    match s.scp_recv("/bounds-huge-size").await {
        Err(uring_ssh::Error::LimitExceeded { what, limit }) => {
            assert_eq!(limit, i64::MAX as u64);
            assert!(what.contains("size"), "{what}");
        }
        other => panic!("a size of 2^63 was accepted: {other:?}"),
    }

    // The largest size is accepted and only counted down: no allocation
    // follows it, the reader hands out what comes and then reports the
    // shortfall.
    let rss = proc_status("VmRSS");
    let (mut r, stat) = s.scp_recv("/bounds-max-size").await.unwrap();
    assert_eq!(stat.size, i64::MAX as u64);
    let mut got = Vec::new();
    let e = r
        .read_to_end(&mut got)
        .await
        .expect_err("the file is short");
    assert_eq!(got, b"abc");
    assert_eq!(e.kind(), std::io::ErrorKind::UnexpectedEof, "{e}");
    drop(r);
    let growth = proc_status("VmRSS").saturating_sub(rss);
    assert!(growth < 16 * MIB as u64, "RSS grew by {growth} bytes");

    // A header line without end: cut off at the line bound.
    match s.scp_recv("/bounds-long-line").await {
        Err(uring_ssh::Error::LimitExceeded { limit, .. }) => {
            assert_eq!(limit, 8 * 1024)
        }
        other => panic!("an endless header line was accepted: {other:?}"),
    }

    // Terminal escapes in the remote scp's error reach the caller escaped.
    let e = s
        .scp_recv("/bounds-escapes")
        .await
        .expect_err("the remote scp reported an error");
    assert_eq!(e.kind(), std::io::ErrorKind::NotFound, "{e}");
    let msg = e.to_string();
    assert!(!msg.chars().any(|c| c.is_control()), "{msg:?}");
    assert!(msg.contains(r"\x1b[2J\x1b]0;owned\x07/x"), "{msg}");

    // One T line at most before the C line.
    let e = s
        .scp_recv("/bounds-two-times")
        .await
        .expect_err("two T lines");
    assert!(e.to_string().contains("T3 0 4 0"), "{e}");

    // The session is fine after all of these.
    let mut ch = s.exec("echo alive").await.unwrap();
    let mut out = String::new();
    ch.read_to_string(&mut out).await.unwrap();
    assert_eq!(out, "alive\n");
}
