//! The servers our users reach, each started on loopback by the fixture:
//! OpenSSH 9.2 (this machine's), OpenSSH 10.0 (a Debian 13 tree run under
//! chroot) and Dropbear 2022.83. Against each: the default key exchange
//! (post-quantum where the server has it), exec, 64 MiB each way and SFTP
//! both ways checked with SHA-256, a forwarded TCP connection, every
//! combination of key exchange × host-key algorithm × cipher the two sides
//! share and every shared MAC, and (OpenSSH, whose rekey interval can be
//! set) a write rekeyed many times.
//!
//! What was chosen is asserted from our side (`Session::negotiated`) and,
//! for OpenSSH, from the server's own log (`LogLevel DEBUG1` prints
//! `kex: algorithm: …`). Dropbear logs no algorithms without a debug build.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::thread;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use uring_ssh::{Config, MethodType, Session, supported_methods};
use uring_ssh_testkit::dropbear::Dropbear;
use uring_ssh_testkit::sshd::Sshd;
use uring_ssh_testkit::util::{sha256_file, sha256_stream, write_prng, write_random_file};

const MIB: usize = 1024 * 1024;

/// One server under test.
enum Server {
    OpenSsh(Sshd),
    Dropbear(Dropbear),
}

impl Server {
    fn openssh92() -> Server {
        Server::OpenSsh(host_keys(Sshd::builder()).start())
    }

    fn openssh10() -> Server {
        Server::OpenSsh(host_keys(Sshd::builder()).openssh10().start())
    }

    fn dropbear() -> Server {
        Server::Dropbear(Dropbear::start())
    }

    fn name(&self) -> &'static str {
        match self {
            Server::OpenSsh(s) if s.remote_path(s.dir()) != s.dir() => "OpenSSH 10.0",
            Server::OpenSsh(_) => "OpenSSH 9.2",
            Server::Dropbear(_) => "Dropbear 2022.83",
        }
    }

    fn addr(&self) -> SocketAddr {
        match self {
            Server::OpenSsh(s) => s.addr(),
            Server::Dropbear(d) => d.addr(),
        }
    }

    fn config(&self) -> Config {
        let kh = match self {
            Server::OpenSsh(s) => s.known_hosts(),
            Server::Dropbear(d) => d.known_hosts(),
        };
        Config::new().known_hosts(Some(kh))
    }

    async fn connect(&self, config: Config) -> Session {
        let (user, key) = match self {
            Server::OpenSsh(s) => (s.user(), s.user_key()),
            Server::Dropbear(d) => (d.user(), d.user_key()),
        };
        let s = Session::connect_addr(self.addr(), config)
            .await
            .unwrap_or_else(|e| panic!("connect to {}: {e}", self.addr()));
        s.auth_pubkey_file(&user, &key, None)
            .await
            .expect("public-key auth");
        s
    }

    /// A directory the login user may write, as a local path.
    fn data_dir(&self) -> PathBuf {
        match self {
            Server::OpenSsh(s) => {
                let d = s.dir().join("data");
                std::fs::create_dir_all(&d).expect("data dir");
                d
            }
            Server::Dropbear(d) => d.data_dir(),
        }
    }

    /// The path the server sees for a local one.
    fn remote(&self, local: &Path) -> String {
        match self {
            Server::OpenSsh(s) => s.remote_path(local),
            Server::Dropbear(_) => local.to_path_buf(),
        }
        .to_str()
        .expect("UTF-8 path")
        .to_string()
    }

    /// Times the server logged `line` (OpenSSH only; `None` for Dropbear).
    fn logged(&self, line: &str) -> Option<usize> {
        match self {
            Server::OpenSsh(s) => Some(s.log().matches(line).count()),
            Server::Dropbear(_) => None,
        }
    }
}

/// Ed25519, ECDSA and RSA host keys, and a log that names the algorithms.
fn host_keys(b: uring_ssh_testkit::sshd::SshdBuilder) -> uring_ssh_testkit::sshd::SshdBuilder {
    b.log_level("DEBUG1")
        .rsa_host_key(true)
        .ecdsa_host_key(true)
}

/// The server's algorithm offer, read from the KEXINIT it sends in clear
/// right after its banner: ten name-lists (kex, host key, ciphers c→s and
/// s→c, MACs c→s and s→c, compression c→s and s→c, languages).
fn server_offer(addr: SocketAddr) -> Vec<Vec<String>> {
    let mut s = TcpStream::connect(addr).expect("connect for KEXINIT");
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(b"SSH-2.0-uring-ssh-interop-probe\r\n").unwrap();
    // The banner line (servers may send other lines before it).
    let mut line = Vec::new();
    loop {
        let mut b = [0u8; 1];
        s.read_exact(&mut b).expect("read banner");
        line.push(b[0]);
        if b[0] == b'\n' {
            if line.starts_with(b"SSH-") {
                break;
            }
            line.clear();
        }
    }
    let mut len = [0u8; 4];
    s.read_exact(&mut len).unwrap();
    let len = u32::from_be_bytes(len) as usize;
    assert!(len < 64 * 1024, "KEXINIT of {len} bytes");
    let mut packet = vec![0u8; len];
    s.read_exact(&mut packet).unwrap();
    let padding = packet[0] as usize;
    let payload = &packet[1..len - padding];
    assert_eq!(payload[0], 20, "first packet is KEXINIT");
    let mut at = 17;
    let mut lists = Vec::new();
    for _ in 0..10 {
        let n = u32::from_be_bytes(payload[at..at + 4].try_into().unwrap()) as usize;
        let text = std::str::from_utf8(&payload[at + 4..at + 4 + n]).unwrap();
        lists.push(
            text.split(',')
                .filter(|t| !t.is_empty())
                .map(String::from)
                .collect(),
        );
        at += 4 + n;
    }
    lists
}

/// Our algorithms of `kind` that the server offers too, in our order.
fn shared(kind: MethodType, theirs: &[String]) -> Vec<String> {
    supported_methods(kind)
        .iter()
        .filter(|m| theirs.contains(m))
        .cloned()
        .collect()
}

/// Runs `true` and asserts its exit status.
async fn run_true(s: &Session) {
    let mut ch = s.exec("true").await.expect("exec true");
    let mut sink = Vec::new();
    ch.read_to_end(&mut sink).await.unwrap();
    assert!(ch.wait().await.unwrap().success());
}

/// Output and exit status of `command`.
async fn output(s: &Session, command: &str) -> Vec<u8> {
    let mut ch = s.exec(command).await.expect("exec");
    let mut out = Vec::new();
    ch.read_to_end(&mut out).await.unwrap();
    let st = ch.wait().await.unwrap();
    assert!(st.success(), "{command}: {st:?}");
    out
}

/// Streams `len` bytes of `seed` into `cat > remote`; returns their SHA-256.
async fn write_through_cat(s: &Session, remote: &str, len: usize, seed: u64) -> String {
    let mut ch = s
        .exec(&format!("cat > '{remote}'"))
        .await
        .expect("exec cat");
    let sum = write_prng(&mut ch, len, seed).await;
    ch.send_eof().await.unwrap();
    let mut sink = Vec::new();
    ch.read_to_end(&mut sink).await.unwrap();
    assert!(ch.wait().await.unwrap().success());
    sum
}

/// The core matrix against one server.
async fn core(server: Server, expected_kex: &str) {
    // Default configuration: the key exchange we prefer that it has.
    let s = server.connect(server.config()).await;
    assert_eq!(s.negotiated(MethodType::Kex).as_deref(), Some(expected_kex));
    let all = s.algorithms().expect("an open session");
    assert_eq!(all.kex, expected_kex);
    assert_eq!(all.post_quantum(), expected_kex.starts_with("mlkem"));
    assert_eq!(Some(all.host_key), s.negotiated(MethodType::HostKey));
    if let Some(n) = server.logged(&format!("kex: algorithm: {expected_kex}")) {
        assert_eq!(n, 1, "the server's log names the key exchange");
    }
    assert_eq!(output(&s, "echo interop").await, b"interop\n");

    // 64 MiB each way over exec, checked with SHA-256.
    let dir = server.data_dir();
    let written = dir.join("written");
    let sum = write_through_cat(&s, &server.remote(&written), 64 * MIB, 1).await;
    assert_eq!(sha256_file(&written), sum, "64 MiB written intact");
    let source = dir.join("source");
    let sum = write_random_file(&source, 64 * MIB, 2);
    let mut ch = s
        .exec(&format!("cat '{}'", server.remote(&source)))
        .await
        .unwrap();
    let (total, got) = sha256_stream(&mut ch).await;
    assert!(ch.wait().await.unwrap().success());
    assert_eq!((total, got), (64 * MIB, sum), "64 MiB read intact");

    // SFTP both ways.
    let sftp = s.sftp().await.expect("sftp");
    let up = dir.join("sftp-up");
    let n = sftp
        .upload(&source, server.remote(&up))
        .await
        .expect("upload");
    assert_eq!(n, 64 * MIB as u64);
    assert_eq!(sha256_file(&up), sha256_file(&source));
    let down = dir.join("sftp-down");
    let n = sftp
        .download(server.remote(&written), &down)
        .await
        .expect("download");
    assert_eq!(n, 64 * MIB as u64);
    assert_eq!(sha256_file(&down), sha256_file(&written));
    sftp.close().await.unwrap();

    // A forwarded TCP connection to an echo server beside us.
    let echo = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
    let port = echo.local_addr().unwrap().port();
    let echoer = thread::spawn(move || {
        let (mut c, _) = echo.accept().unwrap();
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = c.read(&mut buf).unwrap();
            if n == 0 {
                break;
            }
            c.write_all(&buf[..n]).unwrap();
        }
    });
    let mut ch = s
        .channel_direct_tcpip("127.0.0.1", port, "127.0.0.1", 0)
        .await
        .expect("direct-tcpip");
    let payload: Vec<u8> = (0..MIB).map(|i| (i * 7 % 251) as u8).collect();
    let (mut r, mut w) = tokio::io::split(&mut ch);
    let send = async {
        w.write_all(&payload).await.unwrap();
        w.flush().await.unwrap();
    };
    let mut back = vec![0u8; payload.len()];
    let recv = r.read_exact(&mut back);
    let (_, got) = tokio::join!(send, recv);
    got.unwrap();
    assert!(back == payload, "1 MiB echoed intact through the forward");
    drop(r);
    drop(w);
    ch.send_eof().await.unwrap();
    drop(ch);
    echoer.join().unwrap();
    s.close("done").await.unwrap();
}

/// Every key exchange × host-key algorithm × cipher both sides have, then
/// every MAC both have under a cipher that uses one: a session pinned to
/// the combination connects, authenticates and runs a command, and both
/// sides agree on what was chosen.
async fn every_shared_algorithm(server: Server) {
    let offer = server_offer(server.addr());
    let kexes = shared(MethodType::Kex, &offer[0]);
    let host_keys = shared(MethodType::HostKey, &offer[1]);
    let ciphers = shared(MethodType::CipherClientToServer, &offer[2]);
    for (what, list) in [
        ("kex", &kexes),
        ("host key", &host_keys),
        ("cipher", &ciphers),
    ] {
        assert!(!list.is_empty(), "no {what} in common: {offer:?}");
    }
    let mut combinations = 0;
    for kex in &kexes {
        for host_key in &host_keys {
            for cipher in &ciphers {
                let config = server
                    .config()
                    .method(MethodType::Kex, kex)
                    .method(MethodType::HostKey, host_key)
                    .ciphers(cipher);
                let line = format!("kex: algorithm: {kex}");
                let before = server.logged(&line);
                let s = server.connect(config).await;
                let what = format!("{kex} / {host_key} / {cipher}");
                assert_eq!(
                    s.negotiated(MethodType::Kex).as_deref(),
                    Some(kex.as_str()),
                    "{what}"
                );
                assert_eq!(
                    s.negotiated(MethodType::HostKey).as_deref(),
                    Some(host_key.as_str()),
                    "{what}"
                );
                for kind in [
                    MethodType::CipherClientToServer,
                    MethodType::CipherServerToClient,
                ] {
                    assert_eq!(
                        s.negotiated(kind).as_deref(),
                        Some(cipher.as_str()),
                        "{what}"
                    );
                }
                run_true(&s).await;
                s.close("done").await.unwrap();
                if let (Some(b), Some(a)) = (before, server.logged(&line)) {
                    assert_eq!(a, b + 1, "the server's log names the key exchange: {what}");
                    let chosen = format!("kex: host key algorithm: {host_key}");
                    assert!(server.logged(&chosen).unwrap() > 0, "{what}");
                    let chosen = format!("kex: client->server cipher: {cipher} ");
                    assert!(server.logged(&chosen).unwrap() > 0, "{what}");
                }
                combinations += 1;
            }
        }
    }
    let macs = shared(MethodType::MacClientToServer, &offer[4]);
    for mac in &macs {
        let config = server
            .config()
            .ciphers("aes128-ctr")
            .method(MethodType::MacClientToServer, mac)
            .method(MethodType::MacServerToClient, mac);
        let s = server.connect(config).await;
        for kind in [MethodType::MacClientToServer, MethodType::MacServerToClient] {
            assert_eq!(s.negotiated(kind).as_deref(), Some(mac.as_str()));
        }
        let line = format!("cipher: aes128-ctr MAC: {mac} ");
        assert!(server.logged(&line).is_none_or(|n| n > 0), "{line}");
        run_true(&s).await;
        s.close("done").await.unwrap();
    }
    // The matrix as run, for the record (`--nocapture`).
    eprintln!(
        "{}: {combinations} combinations of kex [{}] × host key [{}] × cipher [{}]; MACs [{}]",
        server.name(),
        kexes.join(" "),
        host_keys.join(" "),
        ciphers.join(" "),
        macs.join(" ")
    );
}

/// A 64 MiB write while the server rekeys every 1 MiB: intact, and the
/// server's log shows the key exchanges happened after authentication.
async fn rekey_mid_write(sshd: Sshd) {
    let server = Server::OpenSsh(sshd);
    let s = server.connect(server.config()).await;
    let written = server.data_dir().join("rekeyed");
    let sum = write_through_cat(&s, &server.remote(&written), 64 * MIB, 3).await;
    assert_eq!(sha256_file(&written), sum);
    let rekeys = server.logged("SSH2_MSG_KEXINIT received").unwrap();
    assert!(
        rekeys >= 16,
        "only {rekeys} key exchanges for 64 MiB at RekeyLimit 1M"
    );
    s.close("done").await.unwrap();
}

fn rekeying(b: uring_ssh_testkit::sshd::SshdBuilder) -> Sshd {
    b.log_level("DEBUG1").extra("RekeyLimit 1M").start()
}

#[tokio::test]
async fn openssh92_core() {
    core(Server::openssh92(), "curve25519-sha256").await;
}

#[tokio::test]
async fn openssh10_core_uses_mlkem768x25519() {
    core(Server::openssh10(), "mlkem768x25519-sha256").await;
}

#[tokio::test]
async fn dropbear_core() {
    core(Server::dropbear(), "curve25519-sha256").await;
}

#[tokio::test]
async fn openssh92_every_shared_algorithm() {
    every_shared_algorithm(Server::openssh92()).await;
}

#[tokio::test]
async fn openssh10_every_shared_algorithm() {
    every_shared_algorithm(Server::openssh10()).await;
}

#[tokio::test]
async fn dropbear_every_shared_algorithm() {
    every_shared_algorithm(Server::dropbear()).await;
}

#[tokio::test]
async fn openssh92_rekey_mid_write() {
    rekey_mid_write(rekeying(Sshd::builder())).await;
}

#[tokio::test]
async fn openssh10_rekey_mid_write() {
    rekey_mid_write(rekeying(Sshd::builder().openssh10())).await;
}

/// The configuration the issue met in the field: a server that allows
/// only post-quantum key exchanges. Ours connects with ML-KEM.
#[tokio::test]
async fn openssh10_with_only_post_quantum_kex_connects() {
    let sshd = Sshd::builder()
        .log_level("DEBUG1")
        .extra("KexAlgorithms mlkem768x25519-sha256,sntrup761x25519-sha512")
        .openssh10()
        .start();
    let server = Server::OpenSsh(sshd);
    let s = server.connect(server.config()).await;
    assert_eq!(
        s.negotiated(MethodType::Kex).as_deref(),
        Some("mlkem768x25519-sha256")
    );
    run_true(&s).await;
}

/// Nothing in common: the error names the class and both offers, as
/// OpenSSH's "no matching key exchange method found. Their offer: …".
#[tokio::test]
async fn no_common_algorithm_names_the_class_and_both_offers() {
    let cases = [
        (
            "KexAlgorithms sntrup761x25519-sha512@openssh.com",
            MethodType::Kex,
            "sntrup761x25519-sha512@openssh.com",
        ),
        (
            "Ciphers aes128-cbc",
            MethodType::CipherClientToServer,
            "aes128-cbc",
        ),
        (
            "HostKeyAlgorithms ssh-ed25519\nCiphers aes128-ctr\nMACs hmac-sha1",
            MethodType::MacClientToServer,
            "hmac-sha1",
        ),
    ];
    for (line, kind, theirs_has) in cases {
        let sshd = Sshd::builder().extra(line).start();
        let err = Session::connect_addr(
            sshd.addr(),
            Config::new().known_hosts(Some(sshd.known_hosts())),
        )
        .await
        .err()
        .unwrap_or_else(|| panic!("{line}: connected"));
        match &err {
            uring_ssh::Error::NoCommonAlgorithm {
                kind: k,
                ours,
                theirs,
            } => {
                assert_eq!(*k, kind, "{line}: {err}");
                assert!(theirs.iter().any(|t| t == theirs_has), "{line}: {err}");
                assert!(!ours.is_empty(), "{line}: {err}");
                if kind == MethodType::Kex {
                    assert_eq!(ours.as_slice(), supported_methods(kind), "what we sent");
                }
            }
            other => panic!("{line}: {other:?}"),
        }
        eprintln!("{line:?} -> {err}");
    }
}
