//! Channels against a real sshd: exec, stdio, exit status, big transfers with
//! SHA-256 end to end, many sessions and many channels on one thread.

use std::time::Duration;

use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use uring_ssh_testkit::sshd::Sshd;
use uring_ssh_testkit::util::{
    Prng, alone_in_own_process, connect, hex, proc_status, sha256_file, write_random_file,
};

const MIB: usize = 1024 * 1024;

#[tokio::test]
async fn exec_reports_stdout_stderr_and_exit_status() {
    let sshd = Sshd::start();
    let s = connect(&sshd).await;
    let mut ch = s
        .exec("echo out; echo err >&2; exit 7")
        .await
        .expect("exec");
    let mut out = String::new();
    ch.read_to_string(&mut out).await.unwrap();
    let mut err = String::new();
    ch.stderr().read_to_string(&mut err).await.unwrap();
    let status = ch.wait().await.unwrap();
    assert_eq!(out, "out\n");
    assert_eq!(err, "err\n");
    assert_eq!(status.code, 7);
    assert!(status.signal.is_none());
    assert!(!status.success());
}

#[tokio::test]
async fn exit_signal_is_reported() {
    let sshd = Sshd::start();
    let s = connect(&sshd).await;
    let mut ch = s.exec("kill -TERM $$").await.unwrap();
    let mut out = Vec::new();
    ch.read_to_end(&mut out).await.unwrap();
    let status = ch.wait().await.unwrap();
    assert_eq!(status.signal.as_deref(), Some("TERM"));
    assert!(!status.success());
}

#[tokio::test]
async fn stdin_round_trip_through_cat() {
    let sshd = Sshd::start();
    let s = connect(&sshd).await;
    let ch = s.exec("cat").await.unwrap();
    let mut data = vec![0u8; 3 * MIB + 12345];
    Prng::new(1).fill(&mut data);
    // Write and read at once: cat's output window must be drained while we write.
    let mut reader = ch.stderr(); // keep stderr drained too (it stays empty)
    let (mut r, mut w) = tokio::io::split(ch);
    let writer = async {
        w.write_all(&data).await.unwrap();
        w.shutdown().await.unwrap(); // EOF to cat
        w
    };
    let read = async {
        let mut back = Vec::new();
        r.read_to_end(&mut back).await.unwrap();
        back
    };
    let (w, back) = tokio::join!(writer, read);
    let mut err = Vec::new();
    reader.read_to_end(&mut err).await.unwrap();
    assert_eq!(back.len(), data.len());
    assert!(back == data, "cat returned different bytes");
    assert!(err.is_empty());
    let mut ch = r.unsplit(w);
    assert!(ch.wait().await.unwrap().success());
}

#[tokio::test]
async fn pty_env_and_subsystem_requests() {
    let sshd = Sshd::start();
    let s = connect(&sshd).await;

    let mut ch = s.channel_session().await.unwrap();
    ch.setenv("URING_TEST", "forty-two").await.unwrap();
    ch.request_pty("xterm", 100, 40).await.unwrap();
    ch.exec("echo $URING_TEST; stty size; test -t 0 && echo tty")
        .await
        .unwrap();
    let mut out = String::new();
    ch.read_to_string(&mut out).await.unwrap();
    assert!(out.contains("forty-two"), "{out:?}");
    assert!(out.contains("40 100"), "{out:?}");
    assert!(out.contains("tty"), "{out:?}");
    ch.wait().await.unwrap();

    // The sftp subsystem answers an SSH_FXP_INIT with SSH_FXP_VERSION.
    let mut ch = s.channel_session().await.unwrap();
    ch.subsystem("sftp").await.unwrap();
    ch.write_all(&[0, 0, 0, 5, 1, 0, 0, 0, 3]).await.unwrap();
    ch.flush().await.unwrap();
    let mut head = [0u8; 5];
    ch.read_exact(&mut head).await.unwrap();
    assert_eq!(head[4], 2, "SSH_FXP_VERSION");
}

#[tokio::test]
async fn shell_runs_commands_from_stdin() {
    let sshd = Sshd::start();
    let s = connect(&sshd).await;
    let mut ch = s.channel_session().await.unwrap();
    ch.shell().await.unwrap();
    ch.write_all(b"echo from-shell\nexit 3\n").await.unwrap();
    ch.flush().await.unwrap();
    let mut out = String::new();
    ch.read_to_string(&mut out).await.unwrap();
    assert!(out.contains("from-shell"), "{out:?}");
    assert_eq!(ch.wait().await.unwrap().code, 3);
}

#[tokio::test]
async fn read_256_mib_sha256_matches() {
    let sshd = Sshd::start();
    let path = sshd.dir().join("big-read");
    let want = write_random_file(&path, 256 * MIB, 0x5eed);
    let s = connect(&sshd).await;
    let mut ch = s.exec(&format!("cat {}", path.display())).await.unwrap();
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 256 * 1024];
    let mut total = 0usize;
    let start = std::time::Instant::now();
    loop {
        let n = ch.read(&mut buf).await.unwrap();
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
        total += n;
    }
    let secs = start.elapsed().as_secs_f64();
    assert_eq!(total, 256 * MIB);
    assert_eq!(hex(&h.finalize()), want);
    assert!(ch.wait().await.unwrap().success());
    let st = uring_ssh::reactor::stats().unwrap();
    let b = s.stats().bridge;
    eprintln!(
        "read 256 MiB: {:.0} MB/s, {} io_uring_enter, {} SQEs; {} of {} bytes lent to libssh2",
        total as f64 / secs / 1e6,
        st.enter_calls,
        st.sqes_submitted,
        b.bytes_lent,
        b.bytes_received,
    );
    // libssh2 decrypted most bytes where the ring received them (patch
    // 0016); only packets cut by the end of a receive were copied.
    assert!(b.bytes_received >= total as u64, "{b:?}");
    assert!(b.bytes_lent * 2 > b.bytes_received, "{b:?}");
}

#[tokio::test]
async fn chunk_reads_hand_over_every_byte_and_outlive_their_session() {
    if !alone_in_own_process("chunk_reads_hand_over_every_byte_and_outlive_their_session") {
        return;
    }
    let sshd = Sshd::start();
    let path = sshd.dir().join("chunk-read");
    let want = write_random_file(&path, 64 * MIB, 0xc4u64);
    let before = (
        uring_ssh::libssh2_bytes_outstanding(),
        uring_ssh::libssh2_blocks_outstanding(),
    );
    let s = connect(&sshd).await;
    let mut ch = s.exec(&format!("cat {}", path.display())).await.unwrap();
    let mut h = Sha256::new();
    // A partial read through `AsyncRead` first: the chunks go on from the
    // byte after it, in the middle of a packet.
    let mut head = [0u8; 1000];
    ch.read_exact(&mut head).await.unwrap();
    h.update(head);
    let mut total = head.len();
    let mut kept = Vec::new();
    let mut chunks = 0usize;
    while let Some(chunk) = ch.read_chunk().await.unwrap() {
        assert!(
            !chunk.is_empty() && chunk.len() <= 64 * 1024,
            "{}",
            chunk.len()
        );
        h.update(&chunk);
        total += chunk.len();
        chunks += 1;
        if chunks.is_multiple_of(100) {
            kept.push(chunk);
        }
    }
    assert_eq!(total, 64 * MIB);
    assert_eq!(hex(&h.finalize()), want);
    assert!(ch.wait().await.unwrap().success());
    assert!(!kept.is_empty());
    // The kept chunks left the session's counts but not the process's.
    let kept_bytes: usize = kept.iter().map(|c| c.len()).sum();
    drop(ch);
    s.close("done").await.unwrap();
    drop(s);
    let held = uring_ssh::libssh2_bytes_outstanding() - before.0;
    let blocks = uring_ssh::libssh2_blocks_outstanding() - before.1;
    assert_eq!(blocks, kept.len() as i64, "only the kept chunks are alive");
    // Each kept chunk holds its packet's block: its data plus at most the
    // block's rounding (under 4 KiB) and the message header.
    assert!(held >= kept_bytes as i64, "{held} < {kept_bytes}");
    assert!(
        held < (kept_bytes + kept.len() * 4200) as i64,
        "{held} bytes for {kept_bytes} in {} chunks",
        kept.len()
    );
    // Their bytes are intact after the session is gone, and they are freed
    // on another thread.
    let copies: Vec<Vec<u8>> = kept.iter().map(|c| c.to_vec()).collect();
    let expected = std::fs::read(&path).unwrap();
    let mut at = 0;
    for c in &copies {
        let found = expected.windows(c.len()).skip(at).position(|w| w == &c[..]);
        let found = found.expect("a kept chunk's bytes are in the file");
        at += found + c.len();
    }
    std::thread::spawn(move || drop(kept)).join().unwrap();
    assert_eq!(
        (
            uring_ssh::libssh2_bytes_outstanding(),
            uring_ssh::libssh2_blocks_outstanding()
        ),
        before,
        "nothing left once the chunks are dropped"
    );
}

#[tokio::test]
async fn stderr_chunk_reads_and_stdout_chunks_stay_apart() {
    let sshd = Sshd::start();
    let s = connect(&sshd).await;
    let mut ch = s
        .exec("head -c 300000 /dev/zero >&2; head -c 200000 /dev/zero | tr '\\0' x")
        .await
        .unwrap();
    let mut err = ch.stderr();
    let mut err_total = 0;
    while let Some(chunk) = err.read_chunk().await.unwrap() {
        assert!(chunk.iter().all(|&b| b == 0));
        err_total += chunk.len();
    }
    let mut out_total = 0;
    while let Some(chunk) = ch.read_chunk().await.unwrap() {
        assert!(chunk.iter().all(|&b| b == b'x'));
        out_total += chunk.len();
    }
    assert_eq!((err_total, out_total), (300_000, 200_000));
    assert!(ch.wait().await.unwrap().success());
    assert!(ch.read_chunk().await.unwrap().is_none(), "still the end");

    // Discarded stderr: a flood past the window does not stall stdout's
    // chunks, and tiny outputs come whole.
    let mut ch = s
        .exec("head -c 5000000 /dev/zero >&2; echo out")
        .await
        .unwrap();
    ch.discard_stderr();
    let mut out = Vec::new();
    while let Some(chunk) = ch.read_chunk().await.unwrap() {
        out.extend_from_slice(&chunk);
    }
    assert_eq!(out, b"out\n");
    assert!(ch.wait().await.unwrap().success());
    assert_eq!(ch.stderr_discarded(), 5_000_000);
}

#[tokio::test]
async fn write_256_mib_sha256_matches() {
    let sshd = Sshd::start();
    let path = sshd.dir().join("big-write");
    let s = connect(&sshd).await;
    let mut ch = s.exec(&format!("cat > {}", path.display())).await.unwrap();
    let mut rng = Prng::new(0xfeed);
    let mut h = Sha256::new();
    let mut buf = vec![0u8; MIB];
    for _ in 0..256 {
        rng.fill(&mut buf);
        h.update(&buf);
        ch.write_all(&buf).await.unwrap();
    }
    ch.shutdown().await.unwrap();
    let status = ch.wait().await.unwrap();
    assert!(status.success());
    assert_eq!(std::fs::metadata(&path).unwrap().len(), 256 * MIB as u64);
    assert_eq!(sha256_file(&path), hex(&h.finalize()));
    // Every packet, the handshake's too, was built where the ring sends
    // it from (patch 0014): none was copied out of libssh2's buffer. The
    // one send that is no packet is the identification line.
    let b = s.stats().bridge;
    assert!(b.packets_sent > 8000, "{b:?}");
    assert_eq!(b.packets_sent - b.packets_built_in_place, 1, "{b:?}");
}

#[tokio::test]
async fn sixty_four_sessions_on_one_thread_each_move_data() {
    const SESSIONS: usize = 64;
    const EACH: usize = 4 * MIB;
    let sshd = Sshd::start();
    let before = {
        uring_ssh::reactor::init().unwrap();
        uring_ssh::reactor::stats().unwrap()
    };
    let local = tokio::task::LocalSet::new();
    let sshd = &sshd;
    let results = local
        .run_until(async move {
            let mut tasks = Vec::new();
            for i in 0..SESSIONS {
                let seed = i as u64 + 1;
                let sshd_addr = sshd.addr();
                let known = sshd.known_hosts();
                let user = sshd.user();
                let key = sshd.user_key();
                tasks.push(tokio::task::spawn_local(async move {
                    let cfg = uring_ssh::Config::new().known_hosts(Some(known));
                    let s = uring_ssh::Session::connect_addr(sshd_addr, cfg)
                        .await
                        .unwrap();
                    s.auth_pubkey_file(&user, &key, None).await.unwrap();
                    // Each session pushes its own bytes through cat and checks them.
                    let ch = s.exec("cat").await.unwrap();
                    let (mut r, mut w) = tokio::io::split(ch);
                    let mut data = vec![0u8; EACH];
                    Prng::new(seed).fill(&mut data);
                    let expect = hex(&Sha256::digest(&data));
                    let writer = async {
                        w.write_all(&data).await.unwrap();
                        w.shutdown().await.unwrap();
                    };
                    let reader = async {
                        let mut h = Sha256::new();
                        let mut buf = vec![0u8; 64 * 1024];
                        let mut n_total = 0;
                        loop {
                            let n = r.read(&mut buf).await.unwrap();
                            if n == 0 {
                                break;
                            }
                            n_total += n;
                            h.update(&buf[..n]);
                        }
                        (n_total, hex(&h.finalize()))
                    };
                    let ((), (n, got)) = tokio::join!(writer, reader);
                    assert_eq!(n, EACH);
                    assert_eq!(got, expect, "session {i} corrupted its data");
                    s.close("done").await.unwrap();
                    n
                }));
            }
            let mut moved = 0;
            for t in tasks {
                moved += t.await.expect("session task");
            }
            moved
        })
        .await;
    assert_eq!(results, SESSIONS * EACH);
    let after = uring_ssh::reactor::stats().unwrap();
    let sqes = after.sqes_submitted - before.sqes_submitted;
    let enters = after.enter_calls - before.enter_calls;
    let syscalls = after.syscalls - before.syscalls;
    eprintln!("64 sessions: {sqes} SQEs in {enters} io_uring_enter, {syscalls} reactor syscalls");
    if uring_ssh::reactor::init().unwrap().backend == uring_ssh::reactor::Backend::IoUring {
        // Batching: sessions share io_uring_enter calls.
        assert!(sqes > enters, "{sqes} SQEs in {enters} enters: no batching");
        assert_eq!(syscalls, enters);
    } else {
        // The poll engine counts its socket calls; 64 × 2 MiB each way
        // cannot move in fewer than one call per 512 KiB.
        assert!(
            syscalls > SESSIONS as u64 * 8,
            "{syscalls} syscalls counted"
        );
    }
}

#[tokio::test]
async fn channels_of_one_session_progress_concurrently() {
    let sshd = Sshd::start();
    let s = connect(&sshd).await;

    // A channel whose output nobody reads: its window fills and the server
    // stops sending on it, but must keep sending on the others.
    let stalled = s.exec("cat /dev/zero").await.unwrap();

    let mut tasks = Vec::new();
    for i in 0..8u64 {
        let s = s.clone();
        tasks.push(async move {
            let n = 2_000_000 + i * 1000;
            let mut ch = s.exec(&format!("seq 1 {n}")).await.unwrap();
            let mut out = Vec::new();
            ch.read_to_end(&mut out).await.unwrap();
            let expect: Vec<u8> = (1..=n)
                .flat_map(|k| format!("{k}\n").into_bytes())
                .collect();
            assert!(out == expect, "channel {i} output differs");
            assert!(ch.wait().await.unwrap().success());
            out.len()
        });
    }
    let lens = tokio::time::timeout(Duration::from_secs(120), futures::future::join_all(tasks))
        .await
        .expect("channels blocked each other");
    assert_eq!(lens.len(), 8);
    drop(stalled);
    // The session still works after the stalled channel was dropped.
    let mut ch = s.exec("echo alive").await.unwrap();
    let mut out = String::new();
    ch.read_to_string(&mut out).await.unwrap();
    assert_eq!(out, "alive\n");
}

/// Bytes the remote command writes to stderr in the flood tests.
const FLOOD: u64 = 200_000_000;

/// Most the process's resident memory may grow while the flood runs: far
/// below the flood, whatever the allocator keeps around.
const RSS_GROWTH_BOUND: u64 = 64 * MIB as u64;

/// Most libssh2 may hold for the session while unread stderr fills the
/// window: twice the default 2 MiB window (reads are capped at the
/// window, see `Channel`) plus per-packet overhead and slack.
const HELD_BOUND: i64 = 6 * MIB as i64;

/// A session that has run one command (so that what one channel costs is
/// already allocated), with this process's RSS and the session's libssh2
/// bytes as baselines.
async fn warmed_session(sshd: &Sshd) -> (uring_ssh::Session, u64, i64) {
    let s = connect(sshd).await;
    let mut ch = s.exec("true").await.unwrap();
    ch.wait().await.unwrap();
    drop(ch);
    tokio::time::sleep(Duration::from_millis(100)).await;
    let rss = proc_status("VmRSS");
    let held = s.stats().libssh2_bytes;
    (s, rss, held)
}

#[tokio::test]
async fn unread_stderr_flood_is_held_to_the_window() {
    if !alone_in_own_process("unread_stderr_flood_is_held_to_the_window") {
        return;
    }
    let sshd = Sshd::start();
    let (s, rss_before, held_before) = warmed_session(&sshd).await;

    let mut ch = s
        .exec(&format!(
            "echo start; head -c {FLOOD} /dev/zero >&2; echo end"
        ))
        .await
        .unwrap();
    let mut start = [0u8; 6];
    ch.read_exact(&mut start).await.unwrap();
    assert_eq!(&start, b"start\n");
    // Reading only stdout: the flood fills the window and stops there, so
    // `end` cannot come.
    let mut more = [0u8; 64];
    let r = tokio::time::timeout(Duration::from_secs(3), ch.read(&mut more)).await;
    assert!(r.is_err(), "stdout went on past the stderr flood: {r:?}");
    let held = s.stats().libssh2_bytes - held_before;
    eprintln!("libssh2 holds {held} bytes of unread stderr");
    assert!(
        held > MIB as i64 && held < HELD_BOUND,
        "libssh2 holds {held} bytes (window-bounded: under {HELD_BOUND})"
    );
    // A huge stdout read does not open the window by its size (libssh2
    // would, for the whole buffer): the bound stays.
    let mut huge = vec![0u8; 64 * MIB];
    let r = tokio::time::timeout(Duration::from_secs(2), ch.read(&mut huge)).await;
    assert!(r.is_err(), "stdout went on past the stderr flood: {r:?}");
    drop(huge);
    let held = s.stats().libssh2_bytes - held_before;
    assert!(
        held < HELD_BOUND,
        "after a 64 MiB read libssh2 holds {held} bytes (bound {HELD_BOUND})"
    );

    // Reading stderr reopens the window: every byte arrives, then stdout's
    // last line, then the exit status.
    let mut err = ch.stderr();
    let mut buf = vec![0u8; 256 * 1024];
    let mut total = 0u64;
    loop {
        let n = err.read(&mut buf).await.unwrap();
        if n == 0 {
            break;
        }
        assert!(buf[..n].iter().all(|&b| b == 0));
        total += n as u64;
    }
    assert_eq!(total, FLOOD);
    let mut rest = String::new();
    ch.read_to_string(&mut rest).await.unwrap();
    assert_eq!(rest, "end\n");
    assert!(ch.wait().await.unwrap().success());
    let growth = proc_status("VmHWM").saturating_sub(rss_before);
    eprintln!("peak RSS growth: {} KiB", growth / 1024);
    assert!(
        growth < RSS_GROWTH_BOUND,
        "RSS grew by {growth} bytes (bound {RSS_GROWTH_BOUND})"
    );
}

#[tokio::test]
async fn discarded_stderr_flood_lets_the_command_finish_in_bounded_memory() {
    if !alone_in_own_process("discarded_stderr_flood_lets_the_command_finish_in_bounded_memory") {
        return;
    }
    let sshd = Sshd::start();
    let (s, rss_before, held_before) = warmed_session(&sshd).await;

    let mut ch = s.channel_session().await.unwrap();
    ch.discard_stderr();
    ch.exec(&format!("head -c {FLOOD} /dev/zero >&2; echo end; exit 3"))
        .await
        .unwrap();
    // Only stdout is read, in small reads, sampling what libssh2 holds.
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    let mut held_max = 0;
    loop {
        let n = tokio::time::timeout(Duration::from_secs(60), ch.read(&mut buf))
            .await
            .expect("stdout stalled: stderr was not discarded")
            .unwrap();
        held_max = held_max.max(s.stats().libssh2_bytes - held_before);
        if n == 0 {
            break;
        }
        out.extend_from_slice(&buf[..n]);
    }
    assert_eq!(out, b"end\n");
    assert_eq!(ch.wait().await.unwrap().code, 3, "the exit status arrives");
    assert_eq!(
        ch.stderr_discarded(),
        FLOOD,
        "every stderr byte was dropped"
    );
    assert!(held_max < HELD_BOUND, "libssh2 held up to {held_max} bytes");
    let growth = proc_status("VmHWM").saturating_sub(rss_before);
    eprintln!(
        "libssh2 held at most {held_max} bytes; peak RSS growth: {} KiB",
        growth / 1024
    );
    assert!(
        growth < RSS_GROWTH_BOUND,
        "RSS grew by {growth} bytes (bound {RSS_GROWTH_BOUND})"
    );
}

/// On the ring, a streaming read is received in batches (by default),
/// every byte intact, including the last ones that end a batch by its
/// wait; with batching off, no receive is batched.
#[tokio::test]
async fn streaming_reads_are_received_in_batches_on_the_ring() {
    uring_ssh::reactor::init_with(uring_ssh::reactor::Backend::IoUring).expect("io_uring");
    let sshd = Sshd::start();
    for wait in [Some(uring_ssh::DEFAULT_RECEIVE_BATCH_WAIT), None] {
        let mut cfg = uring_ssh_testkit::util::config(&sshd);
        if wait.is_none() {
            cfg = cfg.receive_batch_wait(None);
        }
        let s = uring_ssh_testkit::util::connect_with(&sshd, cfg).await;
        let mut ch = s
            .exec("head -c 33554432 /dev/zero; sleep 0.1; echo end")
            .await
            .unwrap();
        let mut buf = vec![0u8; 256 * 1024];
        let mut got = 0usize;
        let mut tail = Vec::new();
        loop {
            let n = ch.read(&mut buf).await.unwrap();
            if n == 0 {
                break;
            }
            let zeros = buf[..n].iter().take_while(|&&b| b == 0).count();
            got += zeros;
            tail.extend_from_slice(&buf[zeros..n]);
        }
        let batched = s.stats().batches;
        eprintln!("wait {wait:?}: {batched} batched receives");
        assert_eq!(got, 32 * MIB);
        assert_eq!(tail, b"end\n");
        if wait.is_some() {
            assert!(batched > 0, "no receive was batched");
        } else {
            assert_eq!(batched, 0, "receives batched with batching off");
        }
        s.close("done").await.unwrap();
    }
}

/// Requests and replies (64 KiB echoed by `cat`, one at a time) on the
/// default config: every reply ends a batch early, but the session pays
/// the batch wait a few times, not once per reply, and every byte comes
/// back intact. With batching off nothing is batched (the time of both
/// is printed, not asserted).
#[tokio::test]
async fn replies_to_requests_pay_the_batch_wait_only_a_few_times() {
    uring_ssh::reactor::init_with(uring_ssh::reactor::Backend::IoUring).expect("io_uring");
    const REPLIES: usize = 300;
    const SIZE: usize = 64 * 1024;
    let sshd = Sshd::start();
    for batching in [true, false] {
        let mut cfg = uring_ssh_testkit::util::config(&sshd);
        if !batching {
            cfg = cfg.receive_batch_wait(None);
        }
        let s = uring_ssh_testkit::util::connect_with(&sshd, cfg).await;
        let mut ch = s.exec("cat").await.unwrap();
        let mut back = vec![0u8; SIZE];
        let start = std::time::Instant::now();
        for i in 0..REPLIES {
            let request: Vec<u8> = (0..SIZE).map(|j| (i * 31 + j * 7) as u8).collect();
            ch.write_all(&request).await.unwrap();
            ch.flush().await.unwrap();
            ch.read_exact(&mut back).await.unwrap();
            assert!(back == request, "reply {i} differs from its request");
        }
        let took = start.elapsed();
        ch.send_eof().await.unwrap();
        assert_eq!(ch.read(&mut back).await.unwrap(), 0);
        assert_eq!(ch.wait().await.unwrap().code, 0);
        let stats = s.stats();
        let (batched, pauses) = (stats.batches, stats.batch_pauses);
        eprintln!(
            "batching {batching}: {REPLIES} replies in {took:?}, {batched} batched receives, {pauses} pauses"
        );
        if batching {
            assert!(batched > 0, "no receive was batched");
            assert!(
                pauses <= 20,
                "{pauses} of {REPLIES} replies waited out a batch"
            );
        } else {
            assert_eq!(batched, 0, "receives batched with batching off");
        }
        s.close("done").await.unwrap();
    }
}
