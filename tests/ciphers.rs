//! Our libssh2 build against a real sshd: it is the patched build, every
//! cipher and MAC pair it offers moves data both ways intact (also with the
//! server rekeying every 8 MiB), and corrupted or cut encrypted input from
//! the server ends the session with an error instead of bad data or a hang.

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::thread;
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use uring_ssh::{Config, MethodType, Session};
use uring_ssh_testkit::sshd::Sshd;
use uring_ssh_testkit::util::{Prng, config, connect_with, hex, sha256_stream};

const MIB: usize = 1024 * 1024;
/// Bytes moved each way per cipher and MAC pair.
const EACH_WAY: usize = 64 * MIB;

/// The MACs our libssh2 offers (AEAD ciphers ignore them). libssh2 1.11
/// leaves the SHA-1 MACs out unless built with `LIBSSH2_HMAC_SHA1_ENABLE`,
/// and so does our build, like `libssh2-sys`'s.
const MACS: &[&str] = &[
    "hmac-sha2-256",
    "hmac-sha2-512",
    "hmac-sha2-256-etm@openssh.com",
    "hmac-sha2-512-etm@openssh.com",
];

/// sshd's default cipher list leaves CBC out.
const SERVER_CBC: &str = "Ciphers +aes128-cbc,aes192-cbc,aes256-cbc";

#[test]
fn linked_libssh2_is_the_patched_build() {
    let v = uring_ssh::libssh2_version();
    assert!(
        v.starts_with("1.11.") && v.contains("+uring-ssh."),
        "the linked libssh2 reports {v:?}: not the build from libssh2-patches/ \
         (libssh2-sys's own copy was linked instead)"
    );
}

/// Reads one clear-text binary packet: its type and its random padding.
fn clear_packet(s: &mut TcpStream) -> (u8, Vec<u8>) {
    let mut len = [0u8; 4];
    s.read_exact(&mut len).expect("packet length");
    let len = u32::from_be_bytes(len) as usize;
    assert!((16..35_000).contains(&len), "packet length {len}");
    let mut packet = vec![0u8; len];
    s.read_exact(&mut packet).expect("packet");
    let padding = packet[0] as usize;
    assert!(
        (4..len - 1).contains(&padding),
        "padding length {padding} of {len}"
    );
    (packet[1], packet[len - padding..].to_vec())
}

/// A clear-text SSH name-list.
fn name_list(out: &mut Vec<u8>, names: &str) {
    out.extend_from_slice(&(names.len() as u32).to_be_bytes());
    out.extend_from_slice(names.as_bytes());
}

/// The random padding of the client's first two packets (KEXINIT and
/// the key-exchange init, both sent before any key exists, so in clear),
/// read by a listener that plays a server up to its own KEXINIT.
fn first_paddings(listener: &TcpListener) -> [Vec<u8>; 2] {
    let (mut s, _) = listener.accept().expect("accept");
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(b"SSH-2.0-padding-probe\r\n").unwrap();
    // The client's identification line.
    let mut byte = [0u8; 1];
    let mut line = Vec::new();
    while byte[0] != b'\n' {
        s.read_exact(&mut byte).expect("client banner");
        line.push(byte[0]);
        assert!(line.len() < 256, "no client banner");
    }
    let (kind, first) = clear_packet(&mut s);
    assert_eq!(kind, 20, "the first packet is not a KEXINIT");
    // Our KEXINIT: the client answers with its curve25519 public key.
    let mut payload = vec![20u8];
    payload.extend_from_slice(&[0x5a; 16]);
    for names in [
        "curve25519-sha256",
        "ssh-ed25519",
        "aes128-ctr",
        "aes128-ctr",
        "hmac-sha2-256",
        "hmac-sha2-256",
        "none",
        "none",
        "",
        "",
    ] {
        name_list(&mut payload, names);
    }
    payload.extend_from_slice(&[0, 0, 0, 0, 0]);
    let padding = 8 - (payload.len() + 5) % 8 + 8;
    let mut packet = ((payload.len() + padding + 1) as u32)
        .to_be_bytes()
        .to_vec();
    packet.push(padding as u8);
    packet.extend_from_slice(&payload);
    packet.extend(std::iter::repeat_n(0u8, padding));
    s.write_all(&packet).unwrap();
    let (kind, second) = clear_packet(&mut s);
    assert_eq!(kind, 30, "the second packet is not SSH_MSG_KEX_ECDH_INIT");
    [first, second]
}

#[tokio::test(flavor = "current_thread")]
async fn packet_padding_is_random_and_never_repeats() {
    // Patch 0013 takes padding from a per-session pool of random bytes:
    // each must still be random (not the cleared pool) and used once,
    // within a session (two packets from one pool) and across sessions.
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().unwrap();
    let probe = thread::spawn(move || {
        (0..6)
            .flat_map(|_| first_paddings(&listener))
            .collect::<Vec<_>>()
    });
    for _ in 0..6 {
        let cfg = Config::new()
            .known_hosts(None::<std::path::PathBuf>)
            .method(MethodType::Kex, "curve25519-sha256")
            .timeout(Some(Duration::from_secs(2)));
        // The probe never completes the key exchange: every connect fails.
        assert!(Session::connect_addr(addr, cfg).await.is_err());
    }
    let paddings = probe.join().expect("probe");
    assert_eq!(paddings.len(), 12);
    let mut all = Vec::new();
    for p in &paddings {
        assert!(p.iter().any(|&b| b != 0), "padding of zeros: {p:02x?}");
        all.extend_from_slice(p);
    }
    for (i, a) in paddings.iter().enumerate() {
        for b in &paddings[i + 1..] {
            // At least 4 bytes each: equal first 4 bytes are a repeat.
            assert_ne!(a[..4], b[..4], "two packets carried the same padding");
        }
    }
    // Random bytes: about 1 in 256 of them zero, and many distinct values.
    let zeros = all.iter().filter(|&&b| b == 0).count();
    let distinct = all.iter().collect::<std::collections::BTreeSet<_>>().len();
    assert!(
        zeros * 8 <= all.len(),
        "{zeros} zeros in {} bytes",
        all.len()
    );
    assert!(
        distinct * 2 >= all.len().min(256),
        "{distinct} values in {} bytes",
        all.len()
    );
}

#[tokio::test]
async fn default_order_puts_the_cheapest_cipher_for_this_cpu_first() {
    let sshd = Sshd::start();
    let s = connect_with(&sshd, config(&sshd)).await;
    let first = uring_ssh::default_ciphers().split(',').next().unwrap();
    for kind in [
        MethodType::CipherClientToServer,
        MethodType::CipherServerToClient,
    ] {
        assert_eq!(s.negotiated(kind).as_deref(), Some(first));
    }
    #[cfg(target_arch = "x86_64")]
    {
        let aes = std::arch::is_x86_feature_detected!("aes")
            && std::arch::is_x86_feature_detected!("pclmulqdq");
        assert_eq!(first.starts_with("aes128-gcm"), aes, "{first}");
    }
}

#[tokio::test]
async fn sha1_macs_are_not_offered() {
    let sshd = Sshd::start();
    for mac in ["hmac-sha1", "hmac-sha1-etm@openssh.com"] {
        let cfg = pinned(&sshd, "aes128-ctr", mac);
        match Session::connect_addr(sshd.addr(), cfg).await {
            Err(uring_ssh::Error::InvalidInput(
                e @ uring_ssh::InvalidInput::Algorithm {
                    unsupported: Some(_),
                    ..
                },
            )) => {
                let m = e.to_string();
                assert!(
                    m.contains(&format!("{mac:?}")),
                    "{mac}: error names it: {m}"
                )
            }
            Err(e) => panic!("{mac}: unexpected error {e}"),
            Ok(_) => panic!("{mac} was accepted: the build enables SHA-1 MACs"),
        }
    }
}

/// Client config offering exactly `cipher` and `mac` in both directions.
fn pinned(sshd: &Sshd, cipher: &str, mac: &str) -> Config {
    config(sshd)
        .ciphers(cipher)
        .method(MethodType::MacClientToServer, mac)
        .method(MethodType::MacServerToClient, mac)
}

/// Sends `len` pseudo-random bytes through `cat` on the server while reading
/// them back; returns the SHA-256 of what was sent and of what came back.
async fn round_trip(s: &Session, len: usize, seed: u64) -> (String, String) {
    let ch = s.exec("cat").await.expect("exec cat");
    let (mut r, mut w) = tokio::io::split(ch);
    let writer = async {
        let mut rng = Prng::new(seed);
        let mut h = Sha256::new();
        let mut buf = vec![0u8; MIB + 4321]; // odd size: packets of every length
        let mut left = len;
        while left > 0 {
            let n = left.min(buf.len());
            rng.fill(&mut buf[..n]);
            h.update(&buf[..n]);
            w.write_all(&buf[..n]).await.expect("write");
            left -= n;
        }
        w.shutdown().await.expect("EOF to cat");
        (w, hex(&h.finalize()))
    };
    let reader = sha256_stream(&mut r);
    let ((w, sent), (total, got)) = tokio::join!(writer, reader);
    assert_eq!(total, len, "bytes back from cat");
    let mut ch = r.unsplit(w);
    assert!(ch.wait().await.expect("exit status").success());
    (sent, got)
}

/// One session per MAC (one for an AEAD cipher), each moving
/// [`EACH_WAY`] bytes up and down; checks negotiation and SHA-256.
async fn interop(cipher: &str, macs: &[&str], rekey: bool) {
    let mut b = Sshd::builder().extra(SERVER_CBC);
    if rekey {
        b = b.extra("RekeyLimit 8M").log_level("DEBUG1");
    }
    let sshd = b.start();
    for (i, mac) in macs.iter().enumerate() {
        let s = connect_with(&sshd, pinned(&sshd, cipher, mac)).await;
        for kind in [
            MethodType::CipherClientToServer,
            MethodType::CipherServerToClient,
        ] {
            assert_eq!(s.negotiated(kind).as_deref(), Some(cipher));
        }
        if !cipher.contains("gcm") && !cipher.starts_with("chacha") {
            for kind in [MethodType::MacClientToServer, MethodType::MacServerToClient] {
                assert_eq!(s.negotiated(kind).as_deref(), Some(*mac));
            }
        }
        let start = Instant::now();
        let (sent, got) = round_trip(&s, EACH_WAY, 0xc1fe + i as u64).await;
        assert_eq!(sent, got, "{cipher} + {mac}: bytes came back different");
        eprintln!(
            "{cipher} + {mac}{}: {} MiB each way in {:.2} s",
            if rekey { " (RekeyLimit 8M)" } else { "" },
            EACH_WAY / MIB,
            start.elapsed().as_secs_f64()
        );
        s.close("done").await.expect("close");
    }
    if rekey {
        // Each direction crosses 8 MiB at least 8 times per session.
        let kexinits = sshd.log().matches("SSH2_MSG_KEXINIT sent").count();
        let want = 1 + 8 * macs.len();
        assert!(
            kexinits >= want,
            "{cipher}: sshd sent {kexinits} KEXINITs, expected >= {want} with RekeyLimit 8M"
        );
    }
}

#[tokio::test]
async fn aes128_ctr_every_mac() {
    interop("aes128-ctr", MACS, false).await;
}

#[tokio::test]
async fn aes192_ctr_every_mac() {
    interop("aes192-ctr", MACS, false).await;
}

#[tokio::test]
async fn aes256_ctr_every_mac() {
    interop("aes256-ctr", MACS, false).await;
}

#[tokio::test]
async fn aes128_cbc_every_mac() {
    interop("aes128-cbc", MACS, false).await;
}

#[tokio::test]
async fn aes192_cbc_every_mac() {
    interop("aes192-cbc", MACS, false).await;
}

#[tokio::test]
async fn aes256_cbc_every_mac() {
    interop("aes256-cbc", MACS, false).await;
}

#[tokio::test]
async fn aead_ciphers() {
    for cipher in [
        "aes128-gcm@openssh.com",
        "aes256-gcm@openssh.com",
        "chacha20-poly1305@openssh.com",
    ] {
        // The MAC list is ignored for AEAD ciphers; offer one anyway.
        interop(cipher, &["hmac-sha2-256"], false).await;
    }
}

/// With the `aws-lc` feature (the default), AES-GCM packets run on AWS-LC
/// (patch 0022, `src/aes_gcm.rs`): a session with AES-GCM keys holds two
/// of its cipher states (one each way) and still holds two after the
/// server rekeys; chacha20-poly1305 holds none; every state is freed with
/// its session. Alone in its process, so that no other test's sessions
/// move the count.
#[cfg(feature = "aws-lc")]
#[tokio::test]
async fn aes_gcm_runs_on_aws_lc_and_frees_its_states() {
    if !uring_ssh_testkit::util::alone_in_own_process("aes_gcm_runs_on_aws_lc_and_frees_its_states")
    {
        return;
    }
    let held = uring_ssh::aes_gcm_states_outstanding;
    let sshd = Sshd::builder().extra("RekeyLimit 8M").start();
    assert_eq!(held(), 0);
    let gcm = connect_with(
        &sshd,
        pinned(&sshd, "aes128-gcm@openssh.com", "hmac-sha2-256"),
    )
    .await;
    assert_eq!(held(), 2, "AES-GCM states of one session");
    // 32 MiB each way: the server rekeys about 8 times on the way.
    let (sent, got) = round_trip(&gcm, 32 * MIB, 0x0021).await;
    assert_eq!(sent, got);
    assert_eq!(held(), 2, "after rekeys");
    let chacha = connect_with(
        &sshd,
        pinned(&sshd, "chacha20-poly1305@openssh.com", "hmac-sha2-256"),
    )
    .await;
    let (sent, got) = round_trip(&chacha, MIB, 0x0022).await;
    assert_eq!(sent, got);
    assert_eq!(held(), 2, "chacha20-poly1305 holds no AES-GCM state");
    let gcm256 = connect_with(
        &sshd,
        pinned(&sshd, "aes256-gcm@openssh.com", "hmac-sha2-256"),
    )
    .await;
    assert_eq!(held(), 4);
    drop(gcm);
    drop(gcm256);
    drop(chacha);
    assert_eq!(held(), 0, "states outlived their sessions");
}

/// Connects with `first`, then prefers only `then` for later exchanges,
/// and echoes 8 MiB through `cat` while the server rekeys every MiB: the
/// bytes echoed, or the error.
async fn echo_after_changing(sshd: &Sshd, first: &str, then: &str) -> std::io::Result<usize> {
    let s = connect_with(sshd, config(sshd).ciphers(first)).await;
    for kind in [
        MethodType::CipherClientToServer,
        MethodType::CipherServerToClient,
    ] {
        s.set_method_pref(kind, then).expect("method preference");
    }
    let ch = s.exec("cat").await.expect("exec cat");
    let (mut r, mut w) = tokio::io::split(ch);
    let writer = async {
        let block = vec![0x5au8; MIB];
        for _ in 0..8 {
            w.write_all(&block).await?;
        }
        w.shutdown().await
    };
    let reader = async {
        let mut got = 0;
        let mut buf = vec![0u8; 256 * 1024];
        loop {
            match r.read(&mut buf).await? {
                0 => return Ok(got),
                n => got += n,
            }
        }
    };
    let (w, r) = tokio::join!(writer, reader);
    w.and(r)
}

/// A key re-exchange that would change the cipher is refused (patch
/// 0021): libssh2 would run the new cipher's code on the old cipher's
/// context until the new keys took over, and free it with the new one's
/// (AES-GCM and chacha20-poly1305 contexts differ). What a server that
/// offers another cipher only at its re-exchange brings about is made here
/// by our side's new preferences against a real sshd that rekeys every
/// MiB.
#[tokio::test]
async fn a_rekey_that_would_change_the_cipher_fails_cleanly() {
    let sshd = Sshd::builder().extra("RekeyLimit 1M").start();
    let gcm = "aes128-gcm@openssh.com";
    let chacha = "chacha20-poly1305@openssh.com";
    // The same cipher again: every rekey passes.
    assert_eq!(echo_after_changing(&sshd, gcm, gcm).await.unwrap(), 8 * MIB);
    // Another cipher, each way round: the session fails at that rekey
    // (libssh2 marks it disconnected: LIBSSH2_ERROR_SOCKET_DISCONNECT,
    // -13), not with garbage, a crash, or a hang until keepalive gives up
    // (which is what happened before the session was marked).
    for (first, then) in [(gcm, chacha), (chacha, gcm), (gcm, "aes256-ctr")] {
        let started = Instant::now();
        let e = echo_after_changing(&sshd, first, then)
            .await
            .expect_err("the rekey changed the cipher");
        assert!(
            e.to_string().contains("error -13"),
            "{first} then {then}: {e}"
        );
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "{first} then {then}: failed only after {:?}",
            started.elapsed()
        );
    }
}

/// Patches 0018 and 0019 encrypt a written payload from the caller's
/// buffer: AES the whole cipher blocks it covers (copying in only the
/// bytes around them, which depend on the payload's length modulo the
/// block size), chacha20-poly1305 all of it, between the header and the
/// padding. Writes of every length around the edges (the 1 KiB threshold,
/// a block more or less, a full 32 KiB packet and a byte more) must reach
/// the server intact with each cipher that takes that path (AES-GCM,
/// chacha20-poly1305, and AES-CTR / AES-CBC with an encrypt-then-MAC MAC)
/// and with one that does not (MAC over the plaintext).
#[tokio::test]
async fn written_payloads_of_every_edge_length_arrive_intact() {
    let sshd = Sshd::builder().extra(SERVER_CBC).start();
    let lengths: Vec<usize> = (1..40)
        .chain(1000..1060)
        .chain(16_370..16_400)
        .chain(32_700..32_800)
        .chain([65_536, 100_003])
        .collect();
    for (cipher, mac) in [
        ("aes128-gcm@openssh.com", "hmac-sha2-256"),
        ("aes256-gcm@openssh.com", "hmac-sha2-256"),
        ("chacha20-poly1305@openssh.com", "hmac-sha2-256"),
        ("aes128-ctr", "hmac-sha2-256-etm@openssh.com"),
        ("aes256-cbc", "hmac-sha2-512-etm@openssh.com"),
        ("aes128-ctr", "hmac-sha2-256"),
    ] {
        let s = connect_with(&sshd, pinned(&sshd, cipher, mac)).await;
        let ch = s.exec("sha256sum").await.expect("exec sha256sum");
        let (mut r, mut w) = tokio::io::split(ch);
        let mut rng = Prng::new(0x0018);
        let mut h = Sha256::new();
        let mut buf = vec![0u8; 100_010];
        for &n in &lengths {
            // From odd offsets too: the source need not be aligned.
            let data = &mut buf[n % 7..n % 7 + n];
            rng.fill(data);
            h.update(&*data);
            w.write_all(data).await.expect("write");
            w.flush().await.expect("flush");
        }
        w.shutdown().await.expect("EOF");
        let mut out = String::new();
        r.read_to_string(&mut out).await.expect("sha256sum output");
        let want = hex(&h.finalize());
        assert!(
            out.starts_with(&want),
            "{cipher} + {mac}: the server hashed {out:?}, we sent {want}"
        );
        let mut ch = r.unsplit(w);
        assert!(ch.wait().await.expect("exit status").success());
        s.close("done").await.expect("close");
    }
}

/// Every cipher our libssh2 offers (libssh2 1.11 leaves 3DES, Blowfish,
/// CAST and RC4 out unless asked to), except `rijndael-cbc@lysator.liu.se`,
/// the old name of aes256-cbc, which OpenSSH no longer speaks.
const ALL_CIPHERS: &[&str] = &[
    "aes128-ctr",
    "aes192-ctr",
    "aes256-ctr",
    "aes128-cbc",
    "aes192-cbc",
    "aes256-cbc",
    "aes128-gcm@openssh.com",
    "aes256-gcm@openssh.com",
    "chacha20-poly1305@openssh.com",
];

#[tokio::test]
async fn every_cipher_with_server_rekeying_every_8_mib() {
    for (i, cipher) in ALL_CIPHERS.iter().enumerate() {
        // MACs in turn, so every MAC also sees rekeying.
        interop(cipher, &[MACS[i % MACS.len()]], true).await;
    }
}

/// Every cipher with packets of every small length: one write per length
/// from 1 to 300 bytes, echoed by `cat`, so the first-block, middle-block
/// and last-block split of both directions sees every alignment.
#[tokio::test]
async fn every_cipher_with_every_small_packet_length() {
    let sshd = Sshd::builder().extra(SERVER_CBC).start();
    for (i, cipher) in ALL_CIPHERS.iter().enumerate() {
        let mac = MACS[i % MACS.len()];
        let s = connect_with(&sshd, pinned(&sshd, cipher, mac)).await;
        let ch = s.exec("cat").await.expect("exec cat");
        let (mut r, mut w) = tokio::io::split(ch);
        let mut sent = Vec::new();
        let writer = async {
            let mut rng = Prng::new(7 + i as u64);
            for len in 1..=300usize {
                let mut chunk = vec![0u8; len];
                rng.fill(&mut chunk);
                w.write_all(&chunk).await.expect("write");
                w.flush().await.expect("flush");
                sent.extend_from_slice(&chunk);
            }
            w.shutdown().await.expect("EOF to cat");
            w
        };
        let reader = async {
            let mut back = Vec::new();
            r.read_to_end(&mut back).await.expect("read");
            back
        };
        let (w, back) = tokio::join!(writer, reader);
        assert!(
            back == sent,
            "{cipher} + {mac}: small packets came back different"
        );
        let mut ch = r.unsplit(w);
        assert!(ch.wait().await.expect("exit status").success());
        s.close("done").await.expect("close");
    }
}

/// What the proxy does to the server's encrypted stream.
#[derive(Debug, Clone, Copy)]
enum Damage {
    /// Flips one bit of the byte this far past the server's NEWKEYS.
    FlipBit(usize),
    /// Forwards this many bytes past NEWKEYS, then closes both ways.
    CutAt(usize),
    /// AES-GCM only (its lengths are in clear): in the first packet longer
    /// than 1000 bytes, flips the last bit of the tag.
    GcmTag,
    /// AES-GCM only: subtracts 1 from that packet's length (no longer a
    /// multiple of the block size).
    GcmLengthMinusOne,
    /// AES-GCM only: forwards half of that packet, then closes both ways.
    GcmTruncate,
}

/// A one-connection TCP proxy to `server` that damages the server-to-client
/// stream as `damage` says once the server's NEWKEYS has passed.
fn damaging_proxy(server: SocketAddr, damage: Damage) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind proxy");
    let addr = listener.local_addr().unwrap();
    thread::spawn(move || {
        let (client, _) = listener.accept().expect("accept");
        let upstream = TcpStream::connect(server).expect("connect to sshd");
        let (mut c_in, mut u_out) = (client.try_clone().unwrap(), upstream.try_clone().unwrap());
        thread::spawn(move || {
            let mut buf = vec![0u8; 64 * 1024];
            while let Ok(n) = c_in.read(&mut buf) {
                if n == 0 || u_out.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
            let _ = u_out.shutdown(Shutdown::Write);
        });
        server_to_client(upstream, client, damage);
    });
    addr
}

fn read_exact_or_end(from: &mut TcpStream, buf: &mut [u8]) -> bool {
    from.read_exact(buf).is_ok()
}

fn close_both(a: &TcpStream, b: &TcpStream) {
    let _ = a.shutdown(Shutdown::Both);
    let _ = b.shutdown(Shutdown::Both);
}

/// Copies the server's stream to the client: banner, clear-text packets up
/// to and including NEWKEYS, then the encrypted rest with `damage` applied.
fn server_to_client(mut server: TcpStream, mut client: TcpStream, damage: Damage) {
    // Banner line.
    let mut byte = [0u8; 1];
    loop {
        if !read_exact_or_end(&mut server, &mut byte) || client.write_all(&byte).is_err() {
            return close_both(&server, &client);
        }
        if byte[0] == b'\n' {
            break;
        }
    }
    // Clear-text binary packets (no MAC) until SSH_MSG_NEWKEYS.
    loop {
        let mut len = [0u8; 4];
        if !read_exact_or_end(&mut server, &mut len) {
            return close_both(&server, &client);
        }
        let mut body = vec![0u8; u32::from_be_bytes(len) as usize];
        if !read_exact_or_end(&mut server, &mut body) {
            return close_both(&server, &client);
        }
        if client
            .write_all(&len)
            .and_then(|_| client.write_all(&body))
            .is_err()
        {
            return close_both(&server, &client);
        }
        if body.get(1) == Some(&21) {
            break;
        }
    }
    match damage {
        Damage::FlipBit(at) | Damage::CutAt(at) => {
            let mut passed = 0usize;
            let mut buf = vec![0u8; 64 * 1024];
            loop {
                let n = match server.read(&mut buf) {
                    Ok(0) | Err(_) => return close_both(&server, &client),
                    Ok(n) => n,
                };
                let chunk = &mut buf[..n];
                if (passed..passed + n).contains(&at) {
                    match damage {
                        Damage::FlipBit(_) => chunk[at - passed] ^= 0x10,
                        _ => {
                            let _ = client.write_all(&chunk[..at - passed]);
                            return close_both(&server, &client);
                        }
                    }
                }
                passed += n;
                if client.write_all(chunk).is_err() {
                    return close_both(&server, &client);
                }
            }
        }
        Damage::GcmTag | Damage::GcmLengthMinusOne | Damage::GcmTruncate => {
            let mut done = false;
            loop {
                let mut len = [0u8; 4];
                if !read_exact_or_end(&mut server, &mut len) {
                    return close_both(&server, &client);
                }
                let n = u32::from_be_bytes(len) as usize;
                let mut rest = vec![0u8; n + 16];
                if !read_exact_or_end(&mut server, &mut rest) {
                    return close_both(&server, &client);
                }
                if !done && n > 1000 {
                    done = true;
                    match damage {
                        Damage::GcmTag => *rest.last_mut().unwrap() ^= 1,
                        Damage::GcmLengthMinusOne => len = (n as u32 - 1).to_be_bytes(),
                        _ => {
                            let _ = client.write_all(&len);
                            let _ = client.write_all(&rest[..rest.len() / 2]);
                            return close_both(&server, &client);
                        }
                    }
                }
                if client
                    .write_all(&len)
                    .and_then(|_| client.write_all(&rest))
                    .is_err()
                {
                    return close_both(&server, &client);
                }
            }
        }
    }
}

/// Reads a large stream through a damaging proxy: the read must fail with
/// libssh2's or the transport's error (not a timeout) before all the data
/// arrived.
async fn damaged_read(cipher: &str, mac: &str, damage: Damage) {
    let sshd = Sshd::builder().extra(SERVER_CBC).start();
    let proxy = damaging_proxy(sshd.addr(), damage);
    // The server's host key, known under the proxy's port too.
    let known = sshd.dir().join(format!("known_hosts_{}", proxy.port()));
    std::fs::write(
        &known,
        format!("[127.0.0.1]:{} {}\n", proxy.port(), sshd.host_key_pub()),
    )
    .expect("write known_hosts");
    let cfg = pinned(&sshd, cipher, mac)
        .known_hosts(Some(known))
        .timeout(Some(Duration::from_secs(60)));
    let s = Session::connect_addr(proxy, cfg)
        .await
        .expect("handshake via proxy");
    s.auth_pubkey_file(&sshd.user(), &sshd.user_key(), None)
        .await
        .expect("auth via proxy");
    assert_eq!(
        s.negotiated(MethodType::CipherServerToClient).as_deref(),
        Some(cipher)
    );
    let total = 32 * MIB;
    let mut ch = s
        .exec(&format!("head -c {total} /dev/zero"))
        .await
        .expect("exec");
    let start = Instant::now();
    let mut buf = vec![0u8; 256 * 1024];
    let mut got = 0usize;
    let err = loop {
        match ch.read(&mut buf).await {
            Ok(0) => panic!("{cipher}/{mac} {damage:?}: stream ended cleanly after {got} bytes"),
            Ok(n) => {
                assert!(
                    buf[..n].iter().all(|&b| b == 0),
                    "{cipher} {damage:?}: bad bytes delivered"
                );
                got += n;
            }
            Err(e) => break e,
        }
    };
    let msg = err.to_string();
    eprintln!("{cipher}/{mac} {damage:?}: error after {got} bytes: {msg}");
    assert!(
        got < total,
        "{cipher} {damage:?}: all data arrived despite the damage"
    );
    // A hang would end in the session's timeout instead; the error kinds
    // below exclude that. (No bound on the elapsed time: on a loaded
    // machine the read itself can take seconds.)
    assert!(
        !msg.contains("timed out"),
        "{cipher} {damage:?}: the error took a timeout ({:.1} s): {msg}",
        start.elapsed().as_secs_f64()
    );
    match damage {
        // Cut streams: the transport reports the closed connection. The
        // proxy's close comes as a FIN, or as a reset when bytes the
        // client sent (a window adjust) were still unread in the proxy's
        // socket; a reset that arrives before the client read the FIN
        // discards it.
        Damage::CutAt(_) | Damage::GcmTruncate => assert!(
            msg.contains("closed") || msg.contains("reset by peer"),
            "{cipher} {damage:?}: {msg}"
        ),
        // Damaged bytes: LIBSSH2_ERROR_DECRYPT (AEAD tags) or
        // LIBSSH2_ERROR_INVALID_MAC.
        _ => assert!(
            msg.contains("error -12:") || msg.contains("error -4:"),
            "{cipher} {damage:?}: not a decrypt or MAC error: {msg}"
        ),
    }
    drop(ch);
    drop(s);
}

#[tokio::test]
async fn gcm_bad_tag_bad_length_and_truncation_fail_cleanly() {
    for damage in [
        Damage::GcmTag,
        Damage::GcmLengthMinusOne,
        Damage::GcmTruncate,
    ] {
        damaged_read("aes128-gcm@openssh.com", "hmac-sha2-256", damage).await;
        damaged_read("aes256-gcm@openssh.com", "hmac-sha2-256", damage).await;
    }
}

#[tokio::test]
async fn flipped_bits_and_cut_streams_fail_cleanly_for_every_construction() {
    let cases = [
        ("chacha20-poly1305@openssh.com", "hmac-sha2-256"),
        ("aes128-ctr", "hmac-sha2-256"),
        ("aes256-ctr", "hmac-sha2-512-etm@openssh.com"),
        ("aes128-cbc", "hmac-sha2-512"),
        ("aes256-cbc", "hmac-sha2-256-etm@openssh.com"),
        ("aes128-gcm@openssh.com", "hmac-sha2-256"),
    ];
    for (cipher, mac) in cases {
        for damage in [
            // In the middle of the first data packets, at a tag, and a cut
            // inside a packet.
            Damage::FlipBit(300_000),
            Damage::FlipBit(1_000_003),
            Damage::CutAt(777_777),
        ] {
            damaged_read(cipher, mac, damage).await;
        }
    }
}
