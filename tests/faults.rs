//! Faults between us and a real sshd: stalls, closes, resets, cut packets,
//! flipped bytes and garbage, in each phase (version exchange, key
//! exchange, authentication, transfer, and a rekey the server starts in
//! the middle of a transfer) and in both directions. Each must
//! surface as a typed error within the configured timeout — never a hang,
//! a panic or a silent success — leave nothing behind once the session is
//! dropped, and leave a healthy session on the same thread untouched.

use std::cell::Cell;
use std::io::ErrorKind;
use std::rc::Rc;
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};
use tokio::io::AsyncReadExt;
use uring_ssh::sftp::{TransferItem, TransferOptions, download_many, upload_many};
use uring_ssh::{Config, Error, Session};
use uring_ssh_testkit::fault_proxy::{Dir, Fault, FaultProxy, Rule};
use uring_ssh_testkit::sshd::Sshd;
use uring_ssh_testkit::util::{
    config, connect, open_fds, settle_orphans, sha256_file, wait_for_value, write_random_file,
};

const TIMEOUT: Duration = Duration::from_secs(2);

/// The tests of this binary count the process's fds and libssh2 memory:
/// they run one at a time.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    Version,
    Kex,
    Auth,
    Transfer,
    /// Just after the server's KEXINIT of a rekey (sshd `RekeyLimit 1M`,
    /// in the middle of the 4 MiB download): towards the client inside
    /// the server's next packet (its key exchange reply), towards the
    /// server inside the client's KEXINIT.
    Rekey,
}

/// Bytes each direction has carried when each phase begins, measured on a
/// clean connection through the proxy.
struct Marks {
    after_handshake: (u64, u64),
    after_auth: (u64, u64),
}

/// The fixture's known_hosts, for the proxy's port.
fn proxy_known_hosts(sshd: &Sshd, proxy: &FaultProxy) -> std::path::PathBuf {
    let text = std::fs::read_to_string(sshd.known_hosts())
        .unwrap()
        .replace(
            &format!("[127.0.0.1]:{}", sshd.port()),
            &format!("[127.0.0.1]:{}", proxy.addr().port()),
        );
    let p = sshd
        .dir()
        .join(format!("known_hosts_proxy_{}", proxy.addr().port()));
    std::fs::write(&p, text).unwrap();
    p
}

fn fault_config(sshd: &Sshd, proxy: &FaultProxy) -> Config {
    config(sshd)
        .known_hosts(Some(proxy_known_hosts(sshd, proxy)))
        .timeout(Some(TIMEOUT))
        .connect_timeout(TIMEOUT)
        .keepalive(Some(Duration::from_secs(1)), 2)
}

/// Connect, authenticate, run `cat` of a 4 MiB file and read it all.
async fn job(sshd: &Sshd, proxy: &FaultProxy, file: &std::path::Path) -> Result<(), Error> {
    let s = Session::connect_addr(proxy.addr(), fault_config(sshd, proxy)).await?;
    s.auth_pubkey_file(&sshd.user(), &sshd.user_key(), None)
        .await?;
    let mut ch = s.exec(&format!("cat {}", file.display())).await?;
    let mut buf = vec![0u8; 64 * 1024];
    let mut n = 0;
    loop {
        let k = ch.read(&mut buf).await.map_err(Error::Io)?;
        if k == 0 {
            break;
        }
        n += k;
    }
    ch.wait().await?;
    assert_eq!(
        n,
        4 << 20,
        "a faulty link delivered a short stream as success"
    );
    Ok(())
}

async fn measure(sshd: &Sshd, proxy: &FaultProxy) -> Marks {
    proxy.set(vec![]);
    let s = Session::connect_addr(proxy.addr(), fault_config(sshd, proxy))
        .await
        .unwrap();
    let after_handshake = proxy.forwarded();
    s.auth_pubkey_file(&sshd.user(), &sshd.user_key(), None)
        .await
        .unwrap();
    // Let the last auth bytes land in the proxy's counters.
    tokio::time::sleep(Duration::from_millis(50)).await;
    let after_auth = proxy.forwarded();
    s.close("measured").await.unwrap();
    Marks {
        after_handshake,
        after_auth,
    }
}

fn offset(m: &Marks, phase: Phase, dir: Dir) -> u64 {
    let pick = |p: (u64, u64)| if dir == Dir::ToClient { p.0 } else { p.1 };
    match phase {
        Phase::Version => 5,
        // Inside the peer's KEXINIT (the banner is ~40 bytes, KEXINIT ~1 KB).
        Phase::Kex => 300,
        Phase::Auth => pick(m.after_handshake) + 20,
        Phase::Transfer => {
            pick(m.after_auth) + (1 << 20).min(if dir == Dir::ToClient { 1 << 20 } else { 200 })
        }
        // Counted from the rekey (`Rule::from_rekey`).
        Phase::Rekey => 20,
    }
}

/// The error kinds a fault may surface as.
fn acceptable(fault: &Fault, e: &Error) -> bool {
    let k = e.kind();
    match fault {
        Fault::Stall => k == ErrorKind::TimedOut,
        // Anything but a timeout (these are seen at once), and never a
        // verdict on the credentials: the link broke, not the key.
        _ => k != ErrorKind::TimedOut && !e.is_auth_failure() && k != ErrorKind::PermissionDenied,
    }
}

/// The faults of the matrix: every kind towards the client, the ones that
/// differ in kind towards the server.
fn cases() -> Vec<(Dir, Fault)> {
    vec![
        (Dir::ToClient, Fault::Stall),
        (Dir::ToClient, Fault::Close),
        (Dir::ToClient, Fault::HalfClose),
        (Dir::ToClient, Fault::Reset),
        (Dir::ToClient, Fault::Truncate),
        (Dir::ToClient, Fault::FlipByte),
        (
            Dir::ToClient,
            Fault::Garbage(b"\x00\xffgarbage\x13\x37".to_vec()),
        ),
        (Dir::ToServer, Fault::Stall),
        (Dir::ToServer, Fault::Reset),
        (Dir::ToServer, Fault::FlipByte),
    ]
}

#[tokio::test]
async fn every_fault_in_every_phase_is_a_prompt_typed_error() {
    let _serial = SERIAL.lock().await;
    let sshd = Sshd::start();
    let proxy = FaultProxy::start(sshd.addr());
    let marks = measure(&sshd, &proxy).await;
    matrix(
        &sshd,
        &proxy,
        &marks,
        &[Phase::Version, Phase::Kex, Phase::Auth, Phase::Transfer],
        77,
    )
    .await;
}

/// sshd rekeys every 1 MiB; each fault lands just after the server's
/// KEXINIT of the first rekey of the download.
#[tokio::test]
async fn every_fault_during_a_rekey_is_a_prompt_typed_error() {
    let _serial = SERIAL.lock().await;
    let sshd = Sshd::builder()
        .extra("RekeyLimit 1M")
        .log_level("DEBUG1")
        .start();
    let proxy = FaultProxy::start(sshd.addr());
    let marks = measure(&sshd, &proxy).await;
    // Everything towards the server after authentication is small, but
    // for the client's KEXINITs of the rekeys.
    proxy.watch_rekeys(Some(marks.after_auth.1));
    // Calibrate on a clean download: the proxy must see exactly the rekeys
    // sshd starts (its log counts the first key exchange too).
    let data = tempfile::tempdir().unwrap();
    let file = data.path().join("4m");
    write_random_file(&file, 4 << 20, 79);
    let kexinits = || sshd.log().matches("SSH2_MSG_KEXINIT sent").count();
    let before = kexinits();
    job(&sshd, &proxy, &file).await.expect("clean download");
    let deadline = Instant::now() + Duration::from_secs(2);
    while kexinits() == before && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let server_rekeys = kexinits() - before - 1;
    eprintln!(
        "clean 4 MiB download: sshd sent {server_rekeys} rekey KEXINITs, the proxy saw {} \
         client KEXINITs, the first at {:?} bytes (to client, to server)",
        proxy.rekeys(),
        proxy.rekey_anchors().first()
    );
    assert!(server_rekeys >= 3, "RekeyLimit 1M: {server_rekeys} rekeys");
    assert_eq!(
        proxy.rekeys(),
        server_rekeys,
        "the proxy must recognise each rekey and nothing else"
    );
    matrix(&sshd, &proxy, &marks, &[Phase::Rekey], 80).await;
    let anchors = proxy.rekey_anchors();
    // The calibration run plus one per case.
    assert_eq!(anchors.len(), 1 + cases().len(), "{anchors:?}");
}

/// The healthy session's own libssh2 memory, after each file, does not
/// grow: the least it holds over its last files is within the most it
/// held over its first ones. A leak of even a block per file puts the
/// former above the latter; a moment's extra packet (a keepalive, a window
/// adjust in flight when a file ends) does neither, as it would fail a
/// fixed ceiling. The first file is left out: under `RekeyLimit 1M` it
/// ends two blocks lower than every later one.
fn healthy_memory_does_not_grow(held: &[(i64, i64)]) {
    eprintln!("healthy session: {} files", held.len());
    let v = &held[1.min(held.len())..];
    assert!(v.len() >= 4, "too few files to tell: {held:?}");
    let q = (v.len() / 4).max(2);
    let early = v[..q]
        .iter()
        .fold((i64::MIN, i64::MIN), |m, x| (m.0.max(x.0), m.1.max(x.1)));
    let late = v[v.len() - q..]
        .iter()
        .fold((i64::MAX, i64::MAX), |m, x| (m.0.min(x.0), m.1.min(x.1)));
    assert!(
        late.0 <= early.0 && late.1 <= early.1,
        "the healthy session's libssh2 (bytes, blocks) grew: at least {late:?} over its last \
         {q} files, at most {early:?} over its first {q}; all: {held:?}"
    );
}

/// Runs every case of [`cases`] in each phase of `phases` through `proxy`,
/// beside a healthy session; asserts what the module promises.
async fn matrix(sshd: &Sshd, proxy: &FaultProxy, marks: &Marks, phases: &[Phase], seed: u64) {
    let data = tempfile::tempdir().unwrap();
    let file = data.path().join("4m");
    let want = write_random_file(&file, 4 << 20, seed);

    // A healthy session on the same thread, transferring all along.
    let healthy_ok = Rc::new(Cell::new(0u32));
    let stop = Rc::new(Cell::new(false));
    let s = connect(sshd).await;
    // Counts the healthy session's libssh2 memory apart from the rest.
    let healthy_probe = s.clone();
    // What the healthy session holds after each file.
    let held: Rc<std::cell::RefCell<Vec<(i64, i64)>>> = Rc::default();
    let healthy = {
        let (ok, stop, file, want) = (healthy_ok.clone(), stop.clone(), file.clone(), want.clone());
        let held = held.clone();
        async move {
            while !stop.get() {
                let mut ch = s
                    .exec(&format!("cat {}", file.display()))
                    .await
                    .expect("healthy exec");
                let mut h = Sha256::new();
                let mut buf = vec![0u8; 64 * 1024];
                loop {
                    let n = ch.read(&mut buf).await.expect("healthy read");
                    if n == 0 {
                        break;
                    }
                    h.update(&buf[..n]);
                }
                assert_eq!(
                    uring_ssh_testkit::util::hex(&h.finalize()),
                    want,
                    "healthy session corrupted"
                );
                ch.wait().await.expect("healthy wait");
                let st = s.stats();
                held.borrow_mut()
                    .push((st.libssh2_bytes, st.libssh2_blocks));
                ok.set(ok.get() + 1);
            }
            s.close("healthy done").await.expect("healthy close");
        }
    };

    let faults = async {
        settle_orphans(Duration::from_secs(5)).await;
        // The proxy's sockets are in this process too.
        let ours = |proxy: &FaultProxy| open_fds() - proxy.sockets();
        let fds = ours(proxy);
        // libssh2 memory held by anything but the healthy session: the
        // allocator counts each session apart, so this excludes whatever
        // the healthy session holds at any moment, exactly.
        let others = || {
            let h = healthy_probe.stats();
            (
                uring_ssh::libssh2_bytes_outstanding() - h.libssh2_bytes,
                uring_ssh::libssh2_blocks_outstanding() - h.libssh2_blocks,
            )
        };
        let baseline = others();
        let mut table = Vec::new();
        let cases = cases();
        for &phase in phases {
            for (dir, fault) in &cases {
                let at = offset(marks, phase, *dir);
                proxy.set(vec![Rule {
                    dir: *dir,
                    at,
                    fault: fault.clone(),
                    from_rekey: phase == Phase::Rekey,
                }]);
                let t = Instant::now();
                // A stall surfaces after the operation timeout (2 s) or two
                // unanswered keepalives (libssh2 sends them at most every
                // 2 s): a few seconds. Ten times the timeout means a hang,
                // even on a loaded machine.
                let r = tokio::time::timeout(TIMEOUT * 10, job(sshd, proxy, &file)).await;
                let took = t.elapsed();
                assert_eq!(
                    proxy.fired().last(),
                    Some(fault),
                    "{phase:?} {dir:?}: the fault never fired"
                );
                let r =
                    r.unwrap_or_else(|_| panic!("{phase:?} {dir:?} {fault:?}: hung for {took:?}"));
                let e = match r {
                    Ok(()) => panic!("{phase:?} {dir:?} {fault:?}: success through a broken link"),
                    Err(e) => e,
                };
                assert!(
                    acceptable(fault, &e),
                    "{phase:?} {dir:?} {fault:?}: unexpected error after {took:?}: {e} ({:?})",
                    e.kind()
                );
                table.push(format!(
                    "{phase:?}\t{dir:?}\t{fault:?}\t{:?}\t{took:.2?}\t{e}",
                    e.kind()
                ));
                // Everything of the failed session is gone.
                let st = settle_orphans(Duration::from_secs(5)).await;
                assert_eq!(st.orphaned_outstanding, 0, "{phase:?} {fault:?}: {st:?}");
                // The failed session's libssh2 memory is all freed.
                wait_for_value(
                    Duration::from_secs(10),
                    &format!(
                        "{phase:?} {dir:?} {fault:?}: libssh2 (bytes, blocks) held \
                         besides the healthy session"
                    ),
                    baseline,
                    others,
                )
                .await;
                let deadline = Instant::now() + Duration::from_secs(2);
                while ours(proxy) != fds && Instant::now() < deadline {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                assert_eq!(ours(proxy), fds, "{phase:?} {dir:?} {fault:?}: fds leaked");
            }
        }
        table
    };

    let (table, ()) = tokio::join!(
        async {
            let t = faults.await;
            stop.set(true);
            t
        },
        healthy
    );
    drop(healthy_probe);
    for line in &table {
        eprintln!("{line}");
    }
    assert!(
        healthy_ok.get() >= 3,
        "the healthy session moved {} files",
        healthy_ok.get()
    );
    healthy_memory_does_not_grow(&held.borrow());
    assert!(proxy.accepted() >= table.len());
    let st = settle_orphans(Duration::from_secs(5)).await;
    assert_eq!(st.orphaned_outstanding, 0);
    assert_eq!(
        uring_ssh::libssh2_bytes_outstanding(),
        0,
        "libssh2 memory left"
    );
    assert_eq!(uring_ssh::leaked_objects(), 0);
}

fn signal(pids: &[u32], sig: &str) {
    for pid in pids {
        let _ = std::process::Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(pid.to_string())
            .status();
    }
}

/// Reads from `ch` until an error; returns it and how long it took from
/// `since`. Panics on a clean end (a killed server is not a success).
async fn read_until_error(
    ch: &mut uring_ssh::Channel,
    since: Instant,
) -> (std::io::Error, Duration) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match ch.read(&mut buf).await {
            Ok(0) => panic!("clean EOF from a server that was killed or stopped"),
            Ok(_) => {}
            Err(e) => return (e, since.elapsed()),
        }
    }
}

#[tokio::test]
async fn sigstop_of_the_servers_process_fires_the_keepalive() {
    let _serial = SERIAL.lock().await;
    let sshd = Sshd::start();
    let cfg = config(&sshd)
        .timeout(Some(Duration::from_secs(30)))
        .keepalive(Some(Duration::from_secs(1)), 2);
    let other = connect(&sshd).await;
    let before: Vec<u32> = sshd.connection_pids();
    let s = uring_ssh_testkit::util::connect_with(&sshd, cfg).await;
    let mut ch = s.exec("cat /dev/zero").await.unwrap();
    let mut buf = vec![0u8; 1 << 20];
    ch.read_exact(&mut buf).await.unwrap();
    // Stop every process serving this session (the other session's
    // processes started earlier and are left running).
    let mine: Vec<u32> = sshd
        .connection_pids()
        .into_iter()
        .filter(|p| !before.contains(p))
        .collect();
    assert!(!mine.is_empty());
    let t = Instant::now();
    signal(&mine, "STOP");
    let r = tokio::time::timeout(Duration::from_secs(20), read_until_error(&mut ch, t)).await;
    signal(&mine, "CONT");
    let (e, took) = r.expect("a stopped server hung the reader");
    assert_eq!(e.kind(), ErrorKind::TimedOut, "{e}");
    // Keepalive every 1 s, two unanswered: a few seconds, not the 30 s timeout.
    assert!(took < Duration::from_secs(10), "took {took:?}");
    eprintln!("SIGSTOP mid-transfer: {e} after {took:.2?}");
    drop((ch, s));
    // The other session is unaffected.
    let mut ch = other.exec("echo fine").await.unwrap();
    let mut out = String::new();
    ch.read_to_string(&mut out).await.unwrap();
    assert_eq!(out, "fine\n");
}

#[tokio::test]
async fn sigkill_of_the_servers_process_is_a_prompt_error() {
    let _serial = SERIAL.lock().await;
    let sshd = Sshd::start();
    let s = connect(&sshd).await;
    let mut ch = s.exec("cat /dev/zero").await.unwrap();
    let mut buf = vec![0u8; 1 << 20];
    ch.read_exact(&mut buf).await.unwrap();
    let t = Instant::now();
    sshd.kill_connections();
    let (e, took) = tokio::time::timeout(Duration::from_secs(10), read_until_error(&mut ch, t))
        .await
        .expect("a killed server hung the reader");
    assert!(
        matches!(
            e.kind(),
            ErrorKind::ConnectionReset | ErrorKind::ConnectionAborted | ErrorKind::BrokenPipe
        ),
        "{e} ({:?})",
        e.kind()
    );
    assert!(took < Duration::from_secs(2), "took {took:?}");
    eprintln!("SIGKILL mid-transfer: {e} after {took:.2?}");
    // A new session to the same server works.
    let s2 = connect(&sshd).await;
    s2.exec("true").await.unwrap().wait().await.unwrap();
}

#[tokio::test]
async fn a_slow_or_laggy_link_is_not_a_failure() {
    let _serial = SERIAL.lock().await;
    let sshd = Sshd::start();
    let proxy = FaultProxy::start(sshd.addr());
    let data = tempfile::tempdir().unwrap();
    let file = data.path().join("4m");
    write_random_file(&file, 4 << 20, 78);
    let marks = measure(&sshd, &proxy).await;
    for fault in [
        Fault::RateLimit(2_000_000),
        Fault::Delay(Duration::from_millis(30)),
    ] {
        proxy.set(vec![Rule {
            dir: Dir::ToClient,
            at: marks.after_auth.0 + 100,
            fault: fault.clone(),
            from_rekey: false,
        }]);
        let t = Instant::now();
        // Slower than the 2 s operation timeout and than two keepalive
        // intervals: bytes keep arriving, so neither fires.
        job(&sshd, &proxy, &file)
            .await
            .unwrap_or_else(|e| panic!("{fault:?}: {e}"));
        assert!(
            t.elapsed() > Duration::from_secs(2),
            "{fault:?} was not slow: {:?}",
            t.elapsed()
        );
    }
}

#[tokio::test]
async fn a_connection_storm_gets_clear_errors_and_leaks_nothing() {
    let _serial = SERIAL.lock().await;
    // At most 10 unauthenticated connections; beyond that sshd drops new
    // ones at once.
    let sshd = Sshd::builder().extra("MaxStartups 10:100:10").start();
    // Warm up: the ring and the process-wide dummy fd stay.
    connect(&sshd).await.close("warm-up").await.unwrap();
    settle_orphans(Duration::from_secs(5)).await;
    let fds = open_fds();
    let t = Instant::now();
    let attempts = (0..500).map(|_| async {
        let cfg = config(&sshd).timeout(Some(Duration::from_secs(20)));
        let s = Session::connect_addr(sshd.addr(), cfg).await?;
        s.auth_pubkey_file(&sshd.user(), &sshd.user_key(), None)
            .await?;
        Ok::<_, Error>(s)
    });
    let results =
        tokio::time::timeout(Duration::from_secs(60), futures::future::join_all(attempts))
            .await
            .expect("a connection storm hung");
    let took = t.elapsed();
    let mut ok = 0;
    let mut kinds = std::collections::BTreeMap::new();
    for r in &results {
        match r {
            Ok(_) => ok += 1,
            Err(e) => {
                // Refused by the server: a connection-level error that names
                // what happened, never a timeout or an auth verdict.
                assert!(
                    matches!(
                        e.kind(),
                        ErrorKind::ConnectionReset
                            | ErrorKind::ConnectionAborted
                            | ErrorKind::ConnectionRefused
                    ),
                    "{e} ({:?})",
                    e.kind()
                );
                *kinds.entry(format!("{:?}", e.kind())).or_insert(0) += 1;
            }
        }
    }
    eprintln!("storm: 500 connects in {took:.2?}: {ok} authenticated, refused {kinds:?}");
    assert!(ok >= 10, "only {ok} of 500 got through");
    assert!(ok < 500, "MaxStartups refused nothing");
    drop(results);
    let deadline = Instant::now() + Duration::from_secs(10);
    let st = loop {
        let st = settle_orphans(Duration::from_secs(5)).await;
        if st.ops_in_flight == 0 || Instant::now() > deadline {
            break st;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    assert_eq!(st.orphaned_outstanding, 0, "{st:?}");
    assert_eq!(st.ops_in_flight, 0, "{st:?}");
    assert_eq!(
        uring_ssh::libssh2_bytes_outstanding(),
        0,
        "libssh2 memory left"
    );
    let deadline = Instant::now() + Duration::from_secs(2);
    while open_fds() != fds && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(open_fds(), fds, "fds leaked");
}

/// Which way an SFTP many-file transfer goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Way {
    Download,
    Upload,
}

/// Files of each SFTP fault case: 8 × 512 KiB.
const SFTP_FILES: usize = 8;
const SFTP_FILE_LEN: usize = 512 << 10;

/// Every fault of the matrix in the middle of a many-file SFTP download
/// and upload (one channel, files pipelined): the call returns with the
/// failed files reported, a file is under its final name only if it is
/// complete and byte-identical (reported done, or failed with its final
/// rename in doubt), no local temporary file is left, a remote one only
/// for a file reported failed; a graceful close afterwards
/// returns within its timeout; nothing leaks.
#[tokio::test]
async fn sftp_transfers_under_every_fault() {
    let _serial = SERIAL.lock().await;
    let sshd = Sshd::start();
    let proxy = FaultProxy::start(sshd.addr());
    // Bytes each way once the SFTP channel is up, on a clean connection.
    proxy.set(vec![]);
    let s = Session::connect_addr(proxy.addr(), fault_config(&sshd, &proxy))
        .await
        .unwrap();
    s.auth_pubkey_file(&sshd.user(), &sshd.user_key(), None)
        .await
        .unwrap();
    let sftp = s.sftp().await.unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await;
    let after_sftp = proxy.forwarded();
    drop(sftp);
    s.close("measured").await.unwrap();
    settle_orphans(Duration::from_secs(5)).await;
    let ours = |proxy: &FaultProxy| open_fds() - proxy.sockets();
    let fds = ours(&proxy);

    let mut table = Vec::new();
    for way in [Way::Download, Way::Upload] {
        for (dir, fault) in cases() {
            // In the data: 2.5 MiB into the stream that carries it (about
            // four files done, two in flight, two not started), or a few
            // requests (download) or replies (upload) into the other.
            let data_dir = if way == Way::Download {
                Dir::ToClient
            } else {
                Dir::ToServer
            };
            let base = if dir == Dir::ToClient {
                after_sftp.0
            } else {
                after_sftp.1
            };
            let at = base + if dir == data_dir { 5 << 19 } else { 300 };
            proxy.set(vec![Rule {
                dir,
                at,
                fault: fault.clone(),
                from_rekey: false,
            }]);
            let line = sftp_case(&sshd, &proxy, way, dir, &fault).await;
            assert_eq!(
                proxy.fired().last(),
                Some(&fault),
                "{way:?} {dir:?}: the fault never fired"
            );
            table.push(line);
            let st = settle_orphans(Duration::from_secs(5)).await;
            assert_eq!(st.orphaned_outstanding, 0, "{way:?} {fault:?}: {st:?}");
            let deadline = Instant::now() + Duration::from_secs(2);
            while ours(&proxy) != fds && Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            assert_eq!(ours(&proxy), fds, "{way:?} {dir:?} {fault:?}: fds leaked");
            assert_eq!(
                uring_ssh::libssh2_bytes_outstanding(),
                0,
                "{way:?} {dir:?} {fault:?}: libssh2 memory left"
            );
        }
    }
    for line in &table {
        eprintln!("{line}");
    }
    assert_eq!(uring_ssh::leaked_objects(), 0);
}

/// One SFTP fault case; returns its line of the results table.
async fn sftp_case(sshd: &Sshd, proxy: &FaultProxy, way: Way, dir: Dir, fault: &Fault) -> String {
    let src = scratch_dir();
    let dst = scratch_dir();
    let mut want = Vec::new();
    let mut items = Vec::new();
    for i in 0..SFTP_FILES {
        let name = format!("f{i}");
        want.push(write_random_file(
            &src.path().join(&name),
            SFTP_FILE_LEN,
            100 + i as u64,
        ));
        items.push(match way {
            Way::Download => TransferItem::new(src.path().join(&name), dst.path().join(&name)),
            Way::Upload => TransferItem::new(dst.path().join(&name), src.path().join(&name)),
        });
    }
    let s = Session::connect_addr(proxy.addr(), fault_config(sshd, proxy))
        .await
        .expect("the fault comes after the SFTP channel is up");
    s.auth_pubkey_file(&sshd.user(), &sshd.user_key(), None)
        .await
        .expect("auth");
    let sftp = s.sftp().await.expect("sftp");
    let t = Instant::now();
    // Two files at a time: some are complete before the fault, some are
    // in flight, some not started.
    let opts = TransferOptions {
        max_open_files: 2,
        ..TransferOptions::default()
    };
    let run = async {
        let one = std::slice::from_ref(&sftp);
        match way {
            Way::Download => download_many(one, items, &opts).await,
            Way::Upload => upload_many(one, items, &opts).await,
        }
    };
    let report = tokio::time::timeout(TIMEOUT * 10, run)
        .await
        .unwrap_or_else(|_| panic!("{way:?} {dir:?} {fault:?}: the transfer hung"));
    let took = t.elapsed();
    let case = format!("{way:?} {dir:?} {fault:?}");
    // Every file reported once.
    assert_eq!(report.files.len(), SFTP_FILES, "{case}");
    let mut seen: Vec<String> = report
        .files
        .iter()
        .map(|f| f.item.remote.file_name().unwrap().to_string_lossy().into())
        .collect();
    seen.sort();
    seen.dedup();
    assert_eq!(seen.len(), SFTP_FILES, "{case}: a file reported twice");
    assert!(
        !report.is_complete(),
        "{case}: every file succeeded through a broken link"
    );
    let mut kinds = std::collections::BTreeSet::new();
    let mut ok = 0;
    let mut in_doubt = 0;
    for f in &report.files {
        let name = f.item.remote.file_name().unwrap().to_string_lossy();
        let i: usize = name[1..].parse().unwrap();
        let dest = dst.path().join(&*name);
        assert!(
            f.bytes_acknowledged <= SFTP_FILE_LEN as u64,
            "{case}: {f:?}"
        );
        match &f.result {
            Ok(n) => {
                ok += 1;
                assert!(!f.rename_in_doubt, "{case}: {name}");
                assert_eq!(*n, SFTP_FILE_LEN as u64, "{case}: {name}");
                assert_eq!(sha256_file(&dest), want[i], "{case}: {name} differs");
            }
            Err(e) => {
                if f.rename_in_doubt {
                    // Complete and renamed, the reply lost: possible only
                    // for an upload, and then it is whole.
                    assert_eq!(way, Way::Upload, "{case}: {name}");
                    assert_eq!(f.bytes_acknowledged, SFTP_FILE_LEN as u64, "{case}");
                    in_doubt += 1;
                    if dest.exists() {
                        assert_eq!(sha256_file(&dest), want[i], "{case}: {name} differs");
                    }
                } else {
                    assert!(
                        !dest.exists(),
                        "{case}: failed {name} is under its final name ({e})"
                    );
                }
                assert!(
                    !e.is_auth_failure() && e.kind() != ErrorKind::PermissionDenied,
                    "{case}: {name}: {e}"
                );
                kinds.insert(format!("{:?}", e.kind()));
            }
        }
    }
    // A stall is a timeout; anything else is seen at once, never as one.
    if *fault == Fault::Stall {
        assert!(kinds.contains("TimedOut"), "{case}: {kinds:?}");
    } else {
        assert!(!kinds.contains("TimedOut"), "{case}: {kinds:?}");
    }
    // Nothing else in the destination: no temporary file left locally; on
    // the server, a temporary file only for a file reported failed.
    for e in std::fs::read_dir(dst.path()).unwrap() {
        let name = e.unwrap().file_name().to_string_lossy().into_owned();
        if let Some(final_name) = name.strip_prefix('.').and_then(|n| n.split('.').next()) {
            assert_eq!(way, Way::Upload, "{case}: local temporary file {name} left");
            let failed = report.failed().any(|f| f.item.remote.ends_with(final_name));
            assert!(failed, "{case}: temporary {name} of a file reported done");
        } else {
            let done = report
                .files
                .iter()
                .any(|f| (f.result.is_ok() || f.rename_in_doubt) && f.item.remote.ends_with(&name));
            assert!(done, "{case}: unexpected {name} in the destination");
        }
    }
    // A graceful close after the fault returns within its timeout.
    drop(sftp);
    let t2 = Instant::now();
    let closed = tokio::time::timeout(TIMEOUT * 2, s.close("after a fault")).await;
    let close_took = t2.elapsed();
    assert!(
        closed.is_ok(),
        "{case}: close hung for {close_took:?} (timeout {TIMEOUT:?})"
    );
    drop(s);
    format!(
        "{case}\t{ok}/{SFTP_FILES} ok, {in_doubt} in doubt\t{kinds:?}\t{took:.2?}\tclose {:?} in {close_took:.2?}",
        closed.unwrap().err().map(|e| e.kind())
    )
}

/// A temporary directory the server's user can write (the tests run as
/// root, sshd's session as the fixture's user, the same here).
fn scratch_dir() -> tempfile::TempDir {
    use std::os::unix::fs::PermissionsExt;
    let d = tempfile::tempdir().expect("tempdir");
    std::fs::set_permissions(d.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
    d
}
