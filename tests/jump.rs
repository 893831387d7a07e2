//! Sessions through jump sessions (`Session::connect_via`) against real
//! sshds: many sessions through one jump, a chain of two jumps, a session
//! dropped mid-transfer, a jump host that dies. Its own test binary: the
//! leak counters it reads are process-wide.

use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};
use tokio::io::AsyncReadExt;
use uring_ssh::Session;
use uring_ssh_testkit::sshd::Sshd;
use uring_ssh_testkit::util::{
    assert_fds_back_to, config, connect, fd_baseline, hex, settle, wait_until,
};

use uring_ssh_testkit::util::serial;

use uring_ssh_testkit::util::current_thread_runtime as runtime;

const MIB: usize = 1 << 20;

/// How long a failure may take to reach the sessions behind a jump.
const PROMPT: Duration = Duration::from_secs(10);

/// A session to `target` through `jump`, authenticated.
async fn through(jump: &Session, target: &Sshd) -> Session {
    let s = Session::connect_via(jump, "127.0.0.1", target.port(), config(target))
        .await
        .expect("handshake through the jump session");
    s.auth_pubkey_file(&target.user(), &target.user_key(), None)
        .await
        .expect("auth through the jump session");
    s
}

/// Runs a command printing `len` bytes of a fixed pattern and checks
/// their SHA-256 against the same bytes made here.
async fn exec_checked(s: &Session, len: usize) {
    let mut ch = s
        .exec(&format!("yes 0123456789abcdef | head -c {len}"))
        .await
        .expect("exec");
    let mut out = Vec::new();
    ch.read_to_end(&mut out).await.expect("read");
    assert!(ch.wait().await.expect("exit").success());
    let want: Vec<u8> = b"0123456789abcdef\n"
        .iter()
        .copied()
        .cycle()
        .take(len)
        .collect();
    assert_eq!(out.len(), want.len());
    assert_eq!(hex(&Sha256::digest(&out)), hex(&Sha256::digest(&want)));
}

/// Runs `echo` on `s`, within [`PROMPT`].
async fn echo_ok(s: &Session) {
    tokio::time::timeout(PROMPT, async {
        let mut ch = s.exec("echo ok").await.expect("exec");
        let mut out = String::new();
        ch.read_to_string(&mut out).await.expect("read");
        assert_eq!(out, "ok\n");
        assert!(ch.wait().await.expect("exit").success());
    })
    .await
    .expect("a command on the session must not hang");
}

/// Waits until the relays of dropped sessions have ended, ops have
/// settled and libssh2 holds no memory (every session is gone).
async fn settled_empty() {
    wait_until(PROMPT, "relays to end", || {
        uring_ssh::reactor::stats().is_some_and(|s| s.background_tasks == 0)
    })
    .await;
    let stats = settle(PROMPT).await;
    assert_eq!(stats.ops_in_flight, 0, "{stats:?}");
    assert_eq!(stats.orphaned_outstanding, 0, "{stats:?}");
    wait_until(PROMPT, "libssh2 memory to be freed", || {
        uring_ssh::libssh2_bytes_outstanding() == 0
    })
    .await;
    assert_eq!(uring_ssh::leaked_objects(), 0);
}

#[test]
fn eight_sessions_through_one_jump_move_their_bytes_intact() {
    let _g = serial();
    let sshd = Sshd::start();
    runtime().block_on(async {
        let jump = connect(&sshd).await;
        let runs = (0..8).map(|_| async {
            let s = through(&jump, &sshd).await;
            exec_checked(&s, 8 * MIB).await;
            s
        });
        let sessions = futures::future::join_all(runs).await;
        assert_eq!(
            uring_ssh::reactor::stats().unwrap().background_tasks,
            8,
            "one relay per session through the jump"
        );
        for s in &sessions {
            s.close("done").await.expect("close");
        }
        drop(sessions);
        echo_ok(&jump).await;
        jump.close("done").await.expect("close the jump");
        drop(jump);
        settled_empty().await;
    });
}

#[test]
fn a_chain_of_two_jumps_carries_a_session() {
    let _g = serial();
    let sshd = Sshd::start();
    runtime().block_on(async {
        let jump1 = connect(&sshd).await;
        let jump2 = through(&jump1, &sshd).await;
        let inner = through(&jump2, &sshd).await;
        assert!(inner.host_key().is_some());
        exec_checked(&inner, 8 * MIB).await;
        // Dropped innermost first or not: the relays keep what they need.
        drop(jump1);
        drop(jump2);
        echo_ok(&inner).await;
        drop(inner);
        settled_empty().await;
    });
}

#[test]
fn a_session_dropped_mid_transfer_is_freed_and_spares_its_jump() {
    let _g = serial();
    let sshd = Sshd::start();
    let rt = runtime();
    let fds = rt.block_on(fd_baseline(&sshd));
    rt.block_on(async {
        let jump = connect(&sshd).await;
        let keep = through(&jump, &sshd).await;
        let gone = through(&jump, &sshd).await;
        let mut ch = gone
            .exec("yes 0123456789abcdef | head -c 1000000000")
            .await
            .expect("exec");
        let mut buf = vec![0u8; 4 * MIB];
        ch.read_exact(&mut buf).await.expect("read 4 MiB");
        let started = Instant::now();
        drop(ch);
        drop(gone);
        let took = started.elapsed();
        assert!(took < Duration::from_millis(100), "drop took {took:?}");
        // Its relay ends; the jump and the other session go on.
        wait_until(PROMPT, "the dropped session's relay to end", || {
            uring_ssh::reactor::stats().is_some_and(|s| s.background_tasks == 1)
        })
        .await;
        echo_ok(&jump).await;
        exec_checked(&keep, MIB).await;
        drop(keep);
        drop(jump);
        settled_empty().await;
    });
    assert_fds_back_to(fds);
}

#[test]
fn a_jump_that_dies_fails_only_the_sessions_behind_it() {
    let _g = serial();
    let target = Sshd::start();
    let doomed_host = Sshd::start();
    let rt = runtime();
    rt.block_on(async {
        let jump = connect(&target).await;
        let doomed_jump = connect(&doomed_host).await;
        let spared = through(&jump, &target).await;
        let doomed = through(&doomed_jump, &target).await;
        // A command that would run for a minute, mid-output.
        let mut ch = doomed.exec("echo started; sleep 60").await.expect("exec");
        let mut line = [0u8; 8];
        ch.read_exact(&mut line).await.expect("first line");
        drop(doomed_host);
        let started = Instant::now();
        let mut rest = Vec::new();
        let r = tokio::time::timeout(PROMPT, ch.read_to_end(&mut rest))
            .await
            .expect("the session behind a dead jump must fail, not hang");
        assert!(r.is_err(), "read after the jump died: {r:?}");
        assert!(started.elapsed() < PROMPT);
        assert!(doomed.is_closed());
        assert!(doomed_jump.is_closed());
        let e = tokio::time::timeout(PROMPT, doomed.exec("true"))
            .await
            .expect("no hang")
            .expect_err("a new command behind a dead jump fails");
        eprintln!("behind the dead jump: {e}");
        // The session through the other jump does not notice.
        exec_checked(&spared, MIB).await;
        echo_ok(&jump).await;
        drop((ch, doomed, doomed_jump, spared, jump));
        settled_empty().await;
    });
}

#[test]
fn closing_a_jump_fails_the_sessions_behind_it() {
    let _g = serial();
    let sshd = Sshd::start();
    runtime().block_on(async {
        let jump = connect(&sshd).await;
        let inner = through(&jump, &sshd).await;
        echo_ok(&inner).await;
        tokio::time::timeout(PROMPT, jump.close("done"))
            .await
            .expect("close of a jump must not hang")
            .expect("close");
        wait_until(PROMPT, "the session behind to fail", || inner.is_closed()).await;
        let e = tokio::time::timeout(PROMPT, inner.exec("true"))
            .await
            .expect("no hang")
            .expect_err("a command behind a closed jump fails");
        eprintln!("behind the closed jump: {e}");
        drop((inner, jump));
        settled_empty().await;
    });
}

/// The relay's writing direction under load: an SFTP upload through a
/// jump (writes far past the jump channel's window, each answered) ends
/// within its bound, and the file arrives intact.
#[test]
fn an_upload_through_a_jump_arrives_intact() {
    let _g = serial();
    let sshd = Sshd::start();
    let dir = tempfile::tempdir().expect("temp dir");
    // The test user writes the upload.
    std::fs::set_permissions(
        dir.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o777),
    )
    .expect("chmod");
    let local = dir.path().join("up");
    let data: Vec<u8> = (0..48 * MIB as u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8)
        .collect();
    std::fs::write(&local, &data).expect("write");
    let remote = sshd.remote_path(&dir.path().join("up.remote"));
    runtime().block_on(async {
        let jump = connect(&sshd).await;
        let s = through(&jump, &sshd).await;
        let sftp = s.sftp().await.expect("sftp");
        let n = tokio::time::timeout(Duration::from_secs(60), sftp.upload(&local, &remote))
            .await
            .expect("the upload must not stall")
            .expect("upload");
        assert_eq!(n, data.len() as u64);
        sftp.close().await.expect("sftp close");
        s.close("done").await.expect("close");
        drop(s);
        jump.close("done").await.expect("close the jump");
    });
    let back = std::fs::read(dir.path().join("up.remote")).expect("uploaded file");
    assert_eq!(hex(&Sha256::digest(&back)), hex(&Sha256::digest(&data)));
}

/// A graceful close behind a jump while the target still streams: the
/// target reads the DISCONNECT (its log says so) and meets no reset. The
/// relay keeps carrying what the target sends after the inner session's
/// half-close, until the target closes, as a direct session's linger does.
#[test]
fn a_graceful_close_through_a_jump_reaches_a_target_still_writing() {
    let _g = serial();
    let jump_sshd = Sshd::start();
    let target = Sshd::start();
    runtime().block_on(async {
        let jump = connect(&jump_sshd).await;
        for round in 0..3 {
            let s = through(&jump, &target).await;
            let mut streaming = s.exec("cat /dev/zero").await.expect("exec");
            let mut buf = vec![0u8; 256 * 1024];
            let mut got = 0;
            while got < 4 * MIB {
                got += streaming.read(&mut buf).await.expect("read");
            }
            let note = format!("jump round {round}");
            tokio::time::timeout(PROMPT, s.close(&note))
                .await
                .expect("the close must not hang")
                .expect("graceful close");
            assert_eq!(s.stats().bridge.sends_after_disconnect, 0);
            drop((streaming, s));
            wait_until(PROMPT, "the target to log the DISCONNECT", || {
                target.log().contains(&note)
            })
            .await;
        }
        let log = target.log();
        for bad in ["Broken pipe", "Connection reset", "Bad packet length"] {
            assert!(!log.contains(bad), "the target logged {bad:?}:\n{log}");
        }
        echo_ok(&jump).await;
        jump.close("done").await.expect("close the jump");
        drop(jump);
        settled_empty().await;
    });
}
