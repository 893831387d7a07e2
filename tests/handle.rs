//! `SessionHandle` against a real sshd: 64 tasks of a multi-thread runtime
//! sharing Send handles for exec and SFTP (SHA-256 checked on both sides),
//! handles dropped from another thread mid-transfer leaving no libssh2
//! memory, ring buffer or fd behind, bounded exec buffering against a
//! reader that does not read, and the errors of a closed session and of a
//! pool that shut down. Its own test binary, so the process-wide counters
//! it reads belong to it alone; its tests run one at a time.

use std::time::{Duration, Instant};

use bytes::Bytes;
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use uring_ssh::{Config, EXEC_MAX_BUFFERED, Error, Pool, PoolConfig, RuntimeError, SessionHandle};
use uring_ssh_testkit::sshd::{Sshd, TEST_PASSWORD, TEST_USER, require_test_user};
use uring_ssh_testkit::util::{Prng, hex, open_fds, sha256_file, write_random_file};

use uring_ssh_testkit::util::serial;

/// A multi-thread tokio runtime: what handles are for.
fn multi_thread() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(4)
        .enable_all()
        .build()
        .unwrap()
}

fn config(sshd: &Sshd) -> Config {
    Config::new().known_hosts(Some(sshd.known_hosts()))
}

async fn login(pool: &Pool, sshd: &Sshd) -> SessionHandle {
    let h = pool
        .connect_addr(sshd.addr(), config(sshd))
        .await
        .expect("connect");
    h.auth_pubkey_file(&sshd.user(), sshd.user_key(), None)
        .await
        .expect("auth");
    h
}

fn sha256(data: &[u8]) -> String {
    hex(&Sha256::digest(data))
}

fn random(len: usize, seed: u64) -> Vec<u8> {
    let mut v = vec![0u8; len];
    Prng::new(seed).fill(&mut v);
    v
}

/// The hash `sha256sum` printed: its first word.
fn first_word(out: &[u8]) -> String {
    String::from_utf8_lossy(out)
        .split_whitespace()
        .next()
        .unwrap_or("")
        .to_string()
}

/// Feeds `data` to the remote `sha256sum` while reading its answer.
async fn exec_stdin_sha(ssh: &SessionHandle, data: Vec<u8>) {
    let want = sha256(&data);
    let mut p = ssh.exec("sha256sum").await.expect("exec");
    // Unaligned writes: the handle cuts them into its chunks. Nothing
    // comes back before stdin ends.
    for piece in data.chunks(100_003) {
        p.write_all(piece).await.expect("write stdin");
    }
    p.flush().await.expect("flush");
    p.send_eof().await.expect("send_eof");
    let mut stdout = Vec::new();
    p.read_to_end(&mut stdout).await.expect("read stdout");
    let status = p.wait().await.expect("wait");
    assert_eq!(status.code, 0);
    assert_eq!(first_word(&stdout), want, "remote hash of what we sent");
}

/// Reads random bytes whose remote hash arrives on stderr, both streams at
/// once, stderr from a task of its own.
async fn exec_stdout_sha(ssh: &SessionHandle, len: usize) {
    let cmd = format!("bash -c 'head -c {len} /dev/urandom | tee >(sha256sum >&2)'");
    let mut p = ssh.exec(&cmd).await.expect("exec");
    let mut stderr = p.stderr().expect("stderr");
    let err_task = tokio::spawn(async move {
        let mut e = Vec::new();
        stderr.read_to_end(&mut e).await.map(|_| e)
    });
    let mut h = Sha256::new();
    let mut got = 0usize;
    while let Some(chunk) = p.read_chunk().await.expect("read stdout") {
        assert!(chunk.len() <= uring_ssh::EXEC_CHUNK);
        got += chunk.len();
        h.update(&chunk);
    }
    let err = err_task.await.unwrap().expect("read stderr");
    assert_eq!(p.wait().await.expect("wait").code, 0);
    assert_eq!(got, len);
    assert_eq!(
        first_word(&err),
        hex(&h.finalize()),
        "remote hash of what we read"
    );
}

/// Upload then download of a file through the pool thread; checked
/// locally and by the remote `sha256sum`.
async fn sftp_files(ssh: &SessionHandle, dir: &std::path::Path, i: usize) {
    let src = dir.join(format!("src-{i}"));
    let remote = dir.join(format!("remote-{i}"));
    let back = dir.join(format!("back-{i}"));
    let len = 300_000 + i * 7_919;
    let want = write_random_file(&src, len, i as u64);
    let sftp = ssh.sftp();
    assert_eq!(
        sftp.upload(&src, &remote).await.expect("upload"),
        len as u64
    );
    assert_eq!(
        sftp.download(&remote, &back).await.expect("download"),
        len as u64
    );
    assert_eq!(sha256_file(&back), want);
    let (out, status) = ssh
        .exec(&format!("sha256sum {}", remote.display()))
        .await
        .expect("exec")
        .output()
        .await
        .expect("output");
    assert_eq!(status.code, 0);
    assert_eq!(first_word(&out), want, "remote hash of the upload");
}

/// Whole-file write and read as `Bytes`, and the small calls.
async fn sftp_calls(ssh: &SessionHandle, dir: &std::path::Path, i: usize) {
    let sftp = ssh.sftp();
    let sub = dir.join(format!("dir-{i}"));
    sftp.mkdir(&sub, 0o755).await.expect("mkdir");
    let data = Bytes::from(random(200_000 + i, 1000 + i as u64));
    let a = sub.join("a");
    sftp.write(&a, data.clone()).await.expect("write");
    assert_eq!(
        sftp.stat(&a).await.expect("stat").size,
        Some(data.len() as u64)
    );
    let b = sub.join("b");
    sftp.rename(&a, &b).await.expect("rename");
    let names: Vec<String> = sftp
        .read_dir(&sub)
        .await
        .expect("read_dir")
        .iter()
        .map(|e| e.name().into_owned())
        .collect();
    assert_eq!(names, ["b"]);
    let read = sftp.read(&b).await.expect("read");
    assert_eq!(sha256(&read), sha256(&data));
    // The bound holds whatever the file's size.
    match sftp.read_limited(&b, 1000).await {
        Err(Error::LimitExceeded { limit: 1000, .. }) => {}
        other => panic!("expected LimitExceeded, got {other:?}"),
    }
    sftp.unlink(&b).await.expect("unlink");
    assert!(sftp.stat(&b).await.is_err());
    sftp.rmdir(&sub).await.expect("rmdir");
}

#[test]
fn sixty_four_tasks_of_a_multi_thread_runtime_share_send_handles() {
    let _serial = serial();
    require_test_user();
    let sshd = Sshd::builder().password_auth(true).start();
    let dir = tempfile::tempdir().unwrap();
    let pool = Pool::new(PoolConfig::new().threads(2)).expect("pool");
    let rt = multi_thread();
    rt.block_on(async {
        let mut sessions = vec![login(&pool, &sshd).await, login(&pool, &sshd).await];
        let by_password = pool
            .connect_addr(sshd.addr(), config(&sshd))
            .await
            .expect("connect");
        match by_password
            .auth_password(TEST_USER, "not-the-password")
            .await
        {
            Err(e) => assert!(e.is_auth_failure(), "{e}"),
            Ok(()) => panic!("a wrong password was accepted"),
        }
        by_password
            .auth_password(TEST_USER, TEST_PASSWORD)
            .await
            .expect("password auth");
        assert!(by_password.authenticated().await.unwrap());
        let (whoami, _) = by_password
            .exec("whoami")
            .await
            .unwrap()
            .output()
            .await
            .unwrap();
        assert_eq!(String::from_utf8_lossy(&whoami).trim(), TEST_USER);
        sessions.push(by_password);

        let tasks: Vec<_> = (0..64)
            .map(|i| {
                // Files are written by the key user only (the password
                // user has no right to the directory).
                let ssh = sessions[i % 3].clone();
                let files = sessions[i % 2].clone();
                let dir = dir.path().to_path_buf();
                tokio::spawn(async move {
                    match i % 4 {
                        0 => exec_stdin_sha(&ssh, random(256 * 1024 + i * 997, i as u64)).await,
                        1 => exec_stdout_sha(&ssh, 512 * 1024 + i * 1021).await,
                        2 => sftp_files(&files, &dir, i).await,
                        _ => sftp_calls(&files, &dir, i).await,
                    }
                })
            })
            .collect();
        for t in tasks {
            t.await.expect("task");
        }
        for s in &sessions {
            s.close("done").await.expect("close");
        }
    });
    pool.shutdown();
}

/// Waits (bounded) until `done` holds; panics with `what` otherwise.
fn wait_for(what: &str, limit: Duration, mut done: impl FnMut() -> bool) -> Duration {
    let t = Instant::now();
    while !done() {
        assert!(t.elapsed() < limit, "{what} within {limit:?}");
        std::thread::sleep(Duration::from_millis(5));
    }
    t.elapsed()
}

#[test]
fn handles_dropped_from_another_thread_mid_transfer_leak_nothing() {
    let _serial = serial();
    let sshd = Sshd::builder().extra("MaxStartups 100:30:100").start();
    let rt = multi_thread();
    // Warm up what lives for the process (the dummy fd libssh2 is handed).
    let warm = Pool::new(PoolConfig::new().threads(1)).expect("pool");
    rt.block_on(async { login(&warm, &sshd).await.close("warm").await })
        .expect("close");
    warm.shutdown();
    let fds_before = open_fds();
    let leaked_before = uring_ssh::leaked_objects();
    let ring_leaks_before = uring_ssh::reactor::leaked_at_teardown();

    let pool = Pool::new(PoolConfig::new().threads(2)).expect("pool");
    let (kept, dropped) = rt.block_on(async {
        let kept = login(&pool, &sshd).await;
        let other = login(&pool, &sshd).await;
        // Each session streams 256 MiB; both processes are mid-stream.
        let mut a = kept.exec("head -c 256M /dev/zero").await.expect("exec");
        let mut b = other.exec("head -c 256M /dev/zero").await.expect("exec");
        let mut buf = vec![0u8; 256 * 1024];
        for p in [&mut a, &mut b] {
            let mut n = 0;
            while n < 16 << 20 {
                let k = p.read(&mut buf).await.expect("read");
                assert!(k > 0, "the stream ended early");
                n += k;
            }
        }
        (kept, (a, b, other))
    });
    // From a thread of no runtime: one exec handle alone, then a session
    // handle together with its exec handle.
    let (a, b, other) = dropped;
    std::thread::spawn(move || drop(a)).join().unwrap();
    rt.block_on(async {
        // The session whose process was dropped goes on.
        let (out, status) = kept
            .exec("echo still")
            .await
            .unwrap()
            .output()
            .await
            .unwrap();
        assert_eq!((out.as_slice(), status.code), (&b"still\n"[..], 0));
    });
    std::thread::spawn(move || drop((b, other))).join().unwrap();
    // Only `kept` is left: its session's libssh2 memory alone.
    let one = rt.block_on(async {
        let p = kept.exec("true").await.unwrap();
        p.wait().await.unwrap();
        uring_ssh::libssh2_bytes_outstanding()
    });
    assert!(one > 0, "a live session holds libssh2 memory");
    std::thread::spawn(move || drop(kept)).join().unwrap();
    let took = wait_for("libssh2 memory freed", Duration::from_secs(10), || {
        uring_ssh::libssh2_bytes_outstanding() == 0
    });
    eprintln!("last handle dropped to libssh2 memory freed: {took:?}");
    let stats = rt.block_on(async {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let s = pool.stats().await;
            if (s.ops_in_flight == 0 && s.orphaned_outstanding == 0) || Instant::now() > deadline {
                break s;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    });
    assert_eq!(
        stats.orphaned_outstanding, 0,
        "orphaned ring buffers: {stats:?}"
    );
    assert_eq!(stats.ops_in_flight, 0, "ops in flight: {stats:?}");
    pool.shutdown();
    assert_eq!(
        uring_ssh::libssh2_bytes_outstanding(),
        0,
        "libssh2 bytes left"
    );
    assert_eq!(
        uring_ssh::libssh2_blocks_outstanding(),
        0,
        "libssh2 blocks left"
    );
    assert_eq!(uring_ssh::leaked_objects(), leaked_before, "objects leaked");
    assert_eq!(
        uring_ssh::reactor::leaked_at_teardown(),
        ring_leaks_before,
        "ring buffers leaked at thread exit"
    );
    // (The runtime's own fds were counted in both.)
    assert_eq!(open_fds(), fds_before, "fds left open");
}

#[test]
fn a_reader_that_does_not_read_keeps_the_pump_bounded() {
    let _serial = serial();
    let sshd = Sshd::start();
    let pool = Pool::new(PoolConfig::new().threads(1)).expect("pool");
    multi_thread().block_on(async {
        let ssh = login(&pool, &sshd).await;
        let len: usize = 64 << 20;
        let mut p = ssh
            .exec(&format!("head -c {len} /dev/zero; echo done >&2"))
            .await
            .expect("exec");
        // Far more than the bound would arrive in this time if the pump
        // buffered without one (loopback moves 64 MiB in well under it).
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let held = p.buffered_bytes();
        assert!(held > 0, "the pump queued nothing");
        assert!(held <= EXEC_MAX_BUFFERED, "{held} bytes buffered");
        // Stderr waits its turn too, and is read last.
        let mut stderr = p.stderr().unwrap();
        let mut n = 0usize;
        while let Some(c) = p.read_chunk().await.unwrap() {
            assert!(c.iter().all(|&b| b == 0));
            n += c.len();
        }
        assert_eq!(n, len);
        let mut e = String::new();
        stderr.read_to_string(&mut e).await.unwrap();
        assert_eq!(e, "done\n");
        let peak = p.peak_buffered_bytes();
        assert!(peak <= EXEC_MAX_BUFFERED, "peak {peak} bytes buffered");
        assert_eq!(p.wait().await.unwrap().code, 0);
        ssh.close("done").await.unwrap();
    });
    pool.shutdown();
}

#[test]
fn a_closed_session_and_a_shut_down_pool_give_clear_errors() {
    let _serial = serial();
    let sshd = Sshd::start();
    let pool = Pool::new(PoolConfig::new().threads(1)).expect("pool");
    let rt = multi_thread();
    let (open, mut streaming) = rt.block_on(async {
        let closed = login(&pool, &sshd).await;
        let sftp = closed.sftp();
        sftp.stat("/").await.expect("stat before close");
        closed.close("bye").await.expect("close");
        assert!(closed.is_closed().await.unwrap());
        match closed.exec("true").await {
            Err(Error::Closed(_)) => {}
            other => panic!("exec after close: {other:?}"),
        }
        // The SFTP channel went with the session.
        match sftp.stat("/").await {
            Err(e) => assert_eq!(e.kind(), std::io::ErrorKind::NotConnected, "{e}"),
            Ok(_) => panic!("stat after close succeeded"),
        }
        // Closing twice is fine, as for a Session.
        closed.close("again").await.expect("second close");

        let open = login(&pool, &sshd).await;
        // A taken stderr outlives its process: once the process is
        // dropped, it ends in an error that says so, not that the pool
        // is closed.
        let mut p = open.exec("yes to-stderr >&2").await.unwrap();
        let mut stderr = p.stderr().expect("stderr not taken yet");
        let mut line = [0u8; 10];
        stderr.read_exact(&mut line).await.unwrap();
        assert_eq!(&line, b"to-stderr\n");
        drop(p);
        let mut buf = vec![0u8; 1 << 20];
        let err = loop {
            match stderr.read(&mut buf).await {
                Ok(0) => panic!("the stderr of a dropped process looked complete"),
                Ok(_) => continue,
                Err(e) => break e,
            }
        };
        let inner = err.get_ref().and_then(|e| e.downcast_ref::<Error>());
        assert!(matches!(inner, Some(Error::Closed(_))), "{err:?}");
        assert!(err.to_string().contains("RemoteProcess is gone"), "{err}");

        let mut p = open.exec("cat /dev/zero").await.unwrap();
        let mut buf = [0u8; 1024];
        p.read_exact(&mut buf).await.unwrap();
        (open, p)
    });
    pool.shutdown();
    rt.block_on(async {
        match open.exec("true").await {
            Err(Error::Runtime(RuntimeError::PoolClosed)) => {}
            other => panic!("exec on a shut-down pool: {other:?}"),
        }
        match open.sftp().stat("/").await {
            Err(e @ Error::Runtime(RuntimeError::PoolClosed)) => {
                assert_eq!(e.kind(), std::io::ErrorKind::NotConnected)
            }
            other => panic!("stat on a shut-down pool: {other:?}"),
        }
        // The stream ends in the same error once what was queued is read.
        let mut buf = vec![0u8; 1 << 20];
        let err = loop {
            match streaming.read(&mut buf).await {
                Ok(0) => panic!("a dropped stream looked complete"),
                Ok(_) => continue,
                Err(e) => break e,
            }
        };
        let inner = err.get_ref().and_then(|e| e.downcast_ref::<Error>());
        assert!(
            matches!(inner, Some(Error::Runtime(RuntimeError::PoolClosed))),
            "{err:?}"
        );
        assert!(streaming.write_all(b"x").await.is_err());
        match streaming.wait().await {
            Err(Error::Runtime(RuntimeError::PoolClosed)) => {}
            other => panic!("wait on a shut-down pool: {other:?}"),
        }
    });
}

/// Past its limit, `output_limited` fails at once (with the other stream
/// still open and full), instead of waiting for a process blocked on the
/// stream it gave up.
#[test]
fn output_past_its_limit_fails_promptly() {
    let _serial = serial();
    let sshd = Sshd::start();
    let pool = Pool::new(PoolConfig::new().threads(1)).expect("pool");
    multi_thread().block_on(async {
        let ssh = login(&pool, &sshd).await;
        for (out, err) in [
            ("/dev/stdout", "/dev/stderr"),
            ("/dev/stderr", "/dev/stdout"),
        ] {
            let p = ssh
                .exec(&format!(
                    "head -c 4194304 /dev/zero > {out}; head -c 4194304 /dev/zero > {err}"
                ))
                .await
                .expect("exec");
            let r = tokio::time::timeout(Duration::from_secs(20), p.output_limited(1 << 20))
                .await
                .expect("output_limited must not hang past its limit");
            assert!(
                matches!(r, Err(uring_ssh::Error::LimitExceeded { .. })),
                "{out}: {r:?}"
            );
        }
        // The session is unharmed.
        let (o, status) = ssh.exec("echo ok").await.unwrap().output().await.unwrap();
        assert_eq!((o.as_slice(), status.code), (&b"ok\n"[..], 0));
        ssh.close("done").await.unwrap();
    });
    pool.shutdown();
}

/// A panic inside one call (here the caller's options builder, run on the
/// pool thread) reaches that caller only; the session and its other calls
/// go on.
#[test]
fn a_panic_in_one_call_reaches_its_caller_and_spares_the_session() {
    let _serial = serial();
    let sshd = Sshd::start();
    let pool = Pool::new(PoolConfig::new().threads(1)).expect("pool");
    multi_thread().block_on(async {
        let ssh = login(&pool, &sshd).await;
        let sftp = ssh.sftp();
        let failing = tokio::spawn(async move {
            sftp.download_tree("/nonexistent", "/nonexistent", || {
                panic!("options builder failed")
            })
            .await
        });
        let e = failing
            .await
            .expect_err("the call's panic reaches its task");
        let msg = e.into_panic();
        assert_eq!(
            msg.downcast_ref::<&str>().copied(),
            Some("options builder failed")
        );
        let (o, status) = ssh.exec("echo ok").await.unwrap().output().await.unwrap();
        assert_eq!((o.as_slice(), status.code), (&b"ok\n"[..], 0));
        ssh.close("done").await.unwrap();
    });
    pool.shutdown();
}
