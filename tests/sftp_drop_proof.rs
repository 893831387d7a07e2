//! The drop proof for SFTP: sessions with many SFTP files open and reads in
//! flight on all of them, dropped at random points, 200 times on one
//! thread. Inside each job, files are also dropped mid-read while the
//! client goes on, and every byte read is checked against the file it
//! came from: a reply delivered to the wrong waiter fails the test.
//! Afterwards: no libssh2 memory, no orphaned ring buffers, no fds, no
//! handles left in the server. Its own test binary, so the process-wide
//! counters it reads belong to it alone.

use std::cell::Cell;
use std::rc::Rc;
use std::time::{Duration, Instant};

use tokio::io::AsyncReadExt;
use uring_ssh::Session;
use uring_ssh::sftp::Sftp;
use uring_ssh_testkit::sshd::Sshd;
use uring_ssh_testkit::util::{Prng, config, open_fds, settle};

const DROPS: usize = 200;
const FILES: usize = 8;
const FILE_LEN: usize = 1 << 20;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    Connecting,
    Opening,
    Transferring,
}

struct Data {
    dir: tempfile::TempDir,
    files: Vec<Vec<u8>>,
}

#[tokio::test]
async fn random_drops_with_sftp_files_open_leak_nothing() {
    let sshd = Sshd::builder().extra("MaxStartups 1000:30:1000").start();
    let dir = tempfile::tempdir().unwrap();
    let files: Vec<Vec<u8>> = (0..FILES)
        .map(|i| {
            let mut v = vec![0u8; FILE_LEN];
            Prng::new(i as u64 + 11).fill(&mut v);
            std::fs::write(dir.path().join(format!("f{i}")), &v).unwrap();
            v
        })
        .collect();
    let data = Rc::new(Data { dir, files });

    // Warm up and time a session up to its SFTP channel.
    let mut setup = Duration::ZERO;
    for _ in 0..3 {
        let t = Instant::now();
        let s = uring_ssh_testkit::util::connect(&sshd).await;
        let sftp = s.sftp().await.unwrap();
        setup = setup.max(t.elapsed());
        drop(sftp);
        s.close("warm-up").await.unwrap();
    }
    let stats = settle(Duration::from_secs(10)).await;
    assert_eq!(stats.ops_in_flight, 0);
    let fds_before = open_fds();
    let bytes_before = uring_ssh::libssh2_bytes_outstanding();
    assert_eq!(
        bytes_before, 0,
        "libssh2 memory outstanding with no session"
    );

    let mut rng = Prng::new(0x5f7b);
    let mut durations = Vec::with_capacity(DROPS);
    let mut phases = [0usize; 3];
    let checked = Rc::new(Cell::new(0u64));
    for _ in 0..DROPS {
        let phase = Rc::new(Cell::new(Phase::Connecting));
        let job = job(
            &sshd,
            data.clone(),
            phase.clone(),
            rng.next_u64(),
            checked.clone(),
        );
        let mut job = Box::pin(job);
        // Most drops land mid-transfer, the rest while connecting.
        let span = (setup + Duration::from_millis(150)).as_micros() as u64;
        let delay = Duration::from_micros(span / 4 + rng.below(span));
        let outcome = tokio::time::timeout(delay, &mut job).await;
        assert!(outcome.is_err(), "the job ended by itself: {outcome:?}");
        let t = Instant::now();
        drop(job);
        durations.push(t.elapsed());
        phases[phase.get() as usize] += 1;
    }

    let stats = settle(Duration::from_secs(10)).await;
    assert_eq!(stats.orphaned_outstanding, 0, "{stats:?}");
    assert_eq!(stats.ops_in_flight, 0, "{stats:?}");
    assert_eq!(uring_ssh::libssh2_bytes_outstanding(), bytes_before);
    assert_eq!(uring_ssh::leaked_objects(), 0);
    assert_eq!(open_fds(), fds_before, "fds leaked");
    // The server's side is gone too: no sshd child holds our files.
    let deadline = Instant::now() + Duration::from_secs(10);
    while server_handles(&sshd, data.dir.path()) > 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(server_handles(&sshd, data.dir.path()), 0);

    durations.sort();
    let pct = |p: f64| durations[((durations.len() - 1) as f64 * p) as usize];
    eprintln!(
        "sftp setup {setup:?}; {DROPS} drops (connecting {}, opening {}, transferring {}), \
         {} MiB checked: p50 {:?}, p99 {:?}, max {:?}; ring after: {stats:?}",
        phases[0],
        phases[1],
        phases[2],
        checked.get() >> 20,
        pct(0.5),
        pct(0.99),
        durations[durations.len() - 1]
    );
    assert!(phases[Phase::Transferring as usize] >= 100, "{phases:?}");
    assert!(checked.get() > 0);
}

/// Connects, opens SFTP, then forever: opens every file at once, reads
/// them all at once (checking every byte), dropping some mid-read.
async fn job(
    sshd: &Sshd,
    data: Rc<Data>,
    phase: Rc<Cell<Phase>>,
    seed: u64,
    checked: Rc<Cell<u64>>,
) -> Result<(), uring_ssh::Error> {
    let s = Session::connect_addr(sshd.addr(), config(sshd)).await?;
    s.auth_pubkey_file(&sshd.user(), &sshd.user_key(), None)
        .await?;
    phase.set(Phase::Opening);
    let sftp = s.sftp().await?;
    phase.set(Phase::Transferring);
    let mut rng = Prng::new(seed);
    loop {
        let readers = (0..FILES).map(|i| {
            let stop_at = if rng.below(3) == 0 {
                rng.below(FILE_LEN as u64) as usize
            } else {
                usize::MAX
            };
            read_and_check(&sftp, &data, i, stop_at, &checked)
        });
        for r in futures::future::join_all(readers).await {
            r?;
        }
    }
}

async fn read_and_check(
    sftp: &Sftp,
    data: &Data,
    i: usize,
    stop_at: usize,
    checked: &Cell<u64>,
) -> Result<(), uring_ssh::Error> {
    let mut f = sftp.open(data.dir.path().join(format!("f{i}"))).await?;
    let want = &data.files[i];
    let mut pos = 0;
    let mut buf = vec![0u8; 50_000];
    loop {
        if pos >= stop_at {
            // Dropped mid-read, reads in flight: the client goes on.
            return Ok(());
        }
        let n = f.read(&mut buf).await?;
        if n == 0 {
            assert_eq!(pos, want.len(), "file {i} ended early");
            return Ok(());
        }
        assert!(
            buf[..n] == want[pos..pos + n],
            "file {i} at {pos}: bytes of another request"
        );
        pos += n;
        checked.set(checked.get() + n as u64);
    }
}

/// Files the sshd children hold open under `dir`.
fn server_handles(sshd: &Sshd, dir: &std::path::Path) -> usize {
    let mut n = 0;
    for pid in sshd.connection_pids() {
        let Ok(rd) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
            continue;
        };
        for fd in rd.flatten() {
            if std::fs::read_link(fd.path()).is_ok_and(|t| t.starts_with(dir)) {
                n += 1;
            }
        }
    }
    n
}
