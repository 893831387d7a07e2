//! Host-key verification tests (`Config::known_hosts`, `HostKeyPolicy`)
//! against a real sshd.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use uring_ssh::{Config, Error, HostKeyError, HostKeyPolicy, MethodType, Session};
use uring_ssh_testkit::sshd::*;

const HANG_GUARD: Duration = Duration::from_secs(60);

fn config(known_hosts: Option<PathBuf>, policy: HostKeyPolicy) -> Config {
    Config::new()
        .known_hosts(known_hosts)
        .host_key_policy(policy)
        .timeout(Some(Duration::from_secs(20)))
}

async fn try_connect(sshd: &Sshd, cfg: Config) -> Result<Session, Error> {
    tokio::time::timeout(HANG_GUARD, Session::connect_addr(sshd.addr(), cfg))
        .await
        .unwrap_or_else(|_| panic!("connect to {} hung for {HANG_GUARD:?}", sshd.addr()))
}

/// Connects, and proves the session works by authenticating.
async fn connect_ok(sshd: &Sshd, cfg: Config, what: &str) -> Session {
    let session = try_connect(sshd, cfg)
        .await
        .unwrap_or_else(|e| panic!("{what}: connect failed: {e} ({e:?})"));
    session
        .auth_pubkey_file(&sshd.user(), &sshd.user_key(), None)
        .await
        .unwrap_or_else(|e| panic!("{what}: auth failed: {e} ({e:?})"));
    assert!(session.authenticated());
    session
}

fn expected_host(sshd: &Sshd) -> String {
    format!("[127.0.0.1]:{}", sshd.port())
}

/// The `SHA256:...` field of `ssh-keygen -lf <pub>`.
fn keygen_fingerprint(pub_file: &Path) -> String {
    let out = Command::new(SSH_KEYGEN)
        .arg("-lf")
        .arg(pub_file)
        .stdin(Stdio::null())
        .output()
        .expect("run ssh-keygen -lf");
    assert!(
        out.status.success(),
        "ssh-keygen -lf {}: {}",
        pub_file.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).expect("utf-8 fingerprint");
    text.split_whitespace()
        .find(|f| f.starts_with("SHA256:"))
        .unwrap_or_else(|| panic!("no SHA256 field in {text:?}"))
        .to_owned()
}

fn server_fingerprint(sshd: &Sshd) -> String {
    keygen_fingerprint(&sshd.dir().join("ssh_host_ed25519_key.pub"))
}

/// A fresh ed25519 public key line (`ssh-ed25519 BASE64`) unrelated to the server.
fn other_ed25519_pub() -> String {
    let dir = tempfile::tempdir().expect("temp dir");
    let key = dir.path().join("other");
    let out = Command::new(SSH_KEYGEN)
        .args(["-q", "-t", "ed25519", "-N", "", "-C", "other", "-f"])
        .arg(&key)
        .stdin(Stdio::null())
        .output()
        .expect("run ssh-keygen");
    assert!(
        out.status.success(),
        "ssh-keygen: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let line = std::fs::read_to_string(dir.path().join("other.pub")).expect("read other.pub");
    line.split_whitespace()
        .take(2)
        .collect::<Vec<_>>()
        .join(" ")
}

/// Standard base64 with padding, enough for public-key blobs.
fn base64_decode(s: &str) -> Vec<u8> {
    fn val(c: u8) -> u32 {
        match c {
            b'A'..=b'Z' => (c - b'A') as u32,
            b'a'..=b'z' => (c - b'a') as u32 + 26,
            b'0'..=b'9' => (c - b'0') as u32 + 52,
            b'+' => 62,
            b'/' => 63,
            _ => panic!("not base64: {:?}", c as char),
        }
    }
    let bytes: Vec<u8> = s.bytes().filter(|&c| c != b'=').collect();
    let mut out = Vec::with_capacity(bytes.len() * 3 / 4);
    for chunk in bytes.chunks(4) {
        let mut n = 0u32;
        for (i, &c) in chunk.iter().enumerate() {
            n |= val(c) << (18 - 6 * i);
        }
        let produced = chunk.len() * 6 / 8;
        for i in 0..produced {
            out.push((n >> (16 - 8 * i)) as u8);
        }
    }
    out
}

#[test]
fn base64_decode_matches_rfc4648_vectors() {
    assert_eq!(base64_decode(""), b"");
    assert_eq!(base64_decode("Zg=="), b"f");
    assert_eq!(base64_decode("Zm8="), b"fo");
    assert_eq!(base64_decode("Zm9v"), b"foo");
    assert_eq!(base64_decode("Zm9vYmE="), b"fooba");
    assert_eq!(base64_decode("Zm9vYmFy"), b"foobar");
}

#[tokio::test(flavor = "current_thread")]
async fn fixture_known_hosts_connects_strict() {
    let sshd = Sshd::start();
    let session = connect_ok(
        &sshd,
        config(Some(sshd.known_hosts()), HostKeyPolicy::Strict),
        "strict with the fixture's known_hosts",
    )
    .await;
    let key = session.host_key().expect("host key after connect");
    assert_eq!(key.key_type, "ssh-ed25519");
    assert_eq!(key.fingerprint, server_fingerprint(&sshd));
    session.close("bye").await.expect("close");
}

#[tokio::test(flavor = "current_thread")]
async fn strict_is_the_default_policy() {
    let sshd = Sshd::start();
    let dir = tempfile::tempdir().unwrap();
    let empty = dir.path().join("known_hosts");
    std::fs::write(&empty, "").unwrap();
    let cfg = Config::new().known_hosts(Some(&empty));
    let err = try_connect(&sshd, cfg)
        .await
        .expect_err("the default policy must refuse an unknown host");
    assert!(
        matches!(err, Error::HostKey(HostKeyError::Unknown { .. })),
        "{err:?}"
    );
}

#[tokio::test(flavor = "current_thread")]
async fn empty_known_hosts_is_unknown() {
    let sshd = Sshd::start();
    let dir = tempfile::tempdir().unwrap();
    let empty = dir.path().join("known_hosts");
    std::fs::write(&empty, "").unwrap();
    let err = try_connect(&sshd, config(Some(empty.clone()), HostKeyPolicy::Strict))
        .await
        .expect_err("an unknown host must be refused under Strict");
    println!("empty known_hosts -> {err} ({err:?})");
    let want_fp = server_fingerprint(&sshd);
    match &err {
        Error::HostKey(HostKeyError::Unknown {
            host,
            key_type,
            fingerprint,
        }) => {
            assert_eq!(host, &expected_host(&sshd));
            assert_eq!(key_type, "ssh-ed25519");
            assert_eq!(
                fingerprint, &want_fp,
                "fingerprint differs from ssh-keygen -lf"
            );
        }
        other => panic!("expected HostKeyError::Unknown, got {other:?}"),
    }
    let shown = err.to_string();
    assert!(
        shown.contains(&want_fp),
        "Display lacks the fingerprint: {shown}"
    );
    assert!(
        shown.contains(&expected_host(&sshd)),
        "Display lacks the host: {shown}"
    );
    assert_eq!(err.kind(), std::io::ErrorKind::PermissionDenied);
    assert_eq!(
        std::fs::read_to_string(&empty).unwrap(),
        "",
        "Strict must not write to known_hosts"
    );
}

#[tokio::test(flavor = "current_thread")]
async fn changed_key_is_refused() {
    let sshd = Sshd::start();
    let dir = tempfile::tempdir().unwrap();
    let kh = dir.path().join("known_hosts");
    let content = format!("{} {}\n", expected_host(&sshd), other_ed25519_pub());
    std::fs::write(&kh, &content).unwrap();
    let err = try_connect(&sshd, config(Some(kh.clone()), HostKeyPolicy::Strict))
        .await
        .expect_err("a changed host key must be refused");
    println!("changed key -> {err} ({err:?})");
    let want_fp = server_fingerprint(&sshd);
    match &err {
        Error::HostKey(HostKeyError::Changed {
            host,
            key_type,
            fingerprint,
        }) => {
            assert_eq!(host, &expected_host(&sshd));
            assert_eq!(key_type, "ssh-ed25519");
            assert_eq!(fingerprint, &want_fp, "must name the server's fingerprint");
        }
        other => panic!("expected HostKeyError::Changed, got {other:?}"),
    }
    assert_eq!(err.kind(), std::io::ErrorKind::PermissionDenied);
    assert!(err.to_string().contains(&want_fp), "{err}");
    assert_eq!(std::fs::read_to_string(&kh).unwrap(), content);
}

#[tokio::test(flavor = "current_thread")]
async fn accept_new_records_the_key_for_strict() {
    let sshd = Sshd::start();
    let dir = tempfile::tempdir().unwrap();
    let kh = dir.path().join("nested").join("deeper").join("known_hosts");
    assert!(!kh.exists());
    let session = connect_ok(
        &sshd,
        config(Some(kh.clone()), HostKeyPolicy::AcceptNew),
        "AcceptNew with a missing file",
    )
    .await;
    drop(session);
    let written = std::fs::read_to_string(&kh)
        .unwrap_or_else(|e| panic!("AcceptNew did not create {}: {e}", kh.display()));
    println!("AcceptNew wrote: {written:?}");
    let lines: Vec<&str> = written.lines().collect();
    assert_eq!(lines.len(), 1, "expected exactly one line: {written:?}");
    assert_eq!(
        lines[0],
        format!("{} {}", expected_host(&sshd), sshd.host_key_pub()),
        "the recorded line differs from the server's key"
    );
    assert!(written.ends_with('\n'), "line not terminated: {written:?}");

    // Strict now accepts the server from that file.
    let session = connect_ok(
        &sshd,
        config(Some(kh.clone()), HostKeyPolicy::Strict),
        "Strict with the file AcceptNew wrote",
    )
    .await;
    drop(session);

    // A second AcceptNew connect finds the key and appends nothing.
    let session = connect_ok(
        &sshd,
        config(Some(kh.clone()), HostKeyPolicy::AcceptNew),
        "AcceptNew with a known key",
    )
    .await;
    drop(session);
    assert_eq!(std::fs::read_to_string(&kh).unwrap(), written);
}

#[tokio::test(flavor = "current_thread")]
async fn accept_new_still_refuses_a_changed_key() {
    let sshd = Sshd::start();
    let dir = tempfile::tempdir().unwrap();
    let kh = dir.path().join("known_hosts");
    let content = format!("{} {}\n", expected_host(&sshd), other_ed25519_pub());
    std::fs::write(&kh, &content).unwrap();
    let err = try_connect(&sshd, config(Some(kh.clone()), HostKeyPolicy::AcceptNew))
        .await
        .expect_err("AcceptNew must refuse a changed key");
    println!("AcceptNew + changed key -> {err} ({err:?})");
    match &err {
        Error::HostKey(HostKeyError::Changed { fingerprint, .. }) => {
            assert_eq!(fingerprint, &server_fingerprint(&sshd));
        }
        other => panic!("expected HostKeyError::Changed, got {other:?}"),
    }
    assert_eq!(
        std::fs::read_to_string(&kh).unwrap(),
        content,
        "AcceptNew must not touch the file when the key changed"
    );
}

#[tokio::test(flavor = "current_thread")]
async fn insecure_accept_any_without_file_connects() {
    let sshd = Sshd::start();
    let session = connect_ok(
        &sshd,
        config(None, HostKeyPolicy::InsecureAcceptAny),
        "InsecureAcceptAny without a file",
    )
    .await;
    assert_eq!(
        session.host_key().expect("host key").fingerprint,
        server_fingerprint(&sshd)
    );
}

#[tokio::test(flavor = "current_thread")]
async fn strict_without_file_is_unknown() {
    let sshd = Sshd::start();
    let err = try_connect(&sshd, config(None, HostKeyPolicy::Strict))
        .await
        .expect_err("Strict without a known_hosts file must refuse");
    println!("strict without file -> {err} ({err:?})");
    match &err {
        Error::HostKey(HostKeyError::Unknown {
            host,
            key_type,
            fingerprint,
        }) => {
            assert_eq!(host, &expected_host(&sshd));
            assert_eq!(key_type, "ssh-ed25519");
            assert_eq!(fingerprint, &server_fingerprint(&sshd));
        }
        other => panic!("expected HostKeyError::Unknown, got {other:?}"),
    }
}

#[tokio::test(flavor = "current_thread")]
async fn host_key_blob_matches_pub_file() {
    let sshd = Sshd::start();
    let session = connect_ok(
        &sshd,
        config(Some(sshd.known_hosts()), HostKeyPolicy::Strict),
        "host key blob",
    )
    .await;
    let key = session.host_key().expect("host key after connect");
    let pub_line =
        std::fs::read_to_string(sshd.dir().join("ssh_host_ed25519_key.pub")).expect("read pub");
    let mut fields = pub_line.split_whitespace();
    assert_eq!(fields.next(), Some("ssh-ed25519"));
    let want = base64_decode(fields.next().expect("base64 field"));
    assert_eq!(key.blob, want, "host key blob differs from the .pub file");
    assert_eq!(key.key_type, "ssh-ed25519");
    // An ed25519 blob: string "ssh-ed25519" then a 32-byte key.
    assert_eq!(key.blob.len(), 4 + 11 + 4 + 32);
}

#[tokio::test(flavor = "current_thread")]
async fn hashed_known_hosts_connects_strict() {
    let sshd = Sshd::start();
    let dir = tempfile::tempdir().unwrap();
    let kh = dir.path().join("known_hosts");
    std::fs::copy(sshd.known_hosts(), &kh).unwrap();
    let out = Command::new(SSH_KEYGEN)
        .arg("-H")
        .arg("-f")
        .arg(&kh)
        .stdin(Stdio::null())
        .output()
        .expect("run ssh-keygen -H");
    assert!(
        out.status.success(),
        "ssh-keygen -H: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let hashed = std::fs::read_to_string(&kh).unwrap();
    assert!(hashed.starts_with("|1|"), "not hashed: {hashed:?}");
    assert!(
        !hashed.contains("127.0.0.1"),
        "host name left in clear: {hashed:?}"
    );
    let session = connect_ok(
        &sshd,
        config(Some(kh), HostKeyPolicy::Strict),
        "Strict with a hashed known_hosts",
    )
    .await;
    drop(session);
}

#[tokio::test(flavor = "current_thread")]
async fn accept_new_appends_after_a_last_line_without_newline() {
    let sshd = Sshd::start();
    let dir = tempfile::tempdir().unwrap();
    let kh = dir.path().join("known_hosts");
    // A hand-edited file whose last line lacks its newline.
    let other = format!("other.example {}", other_ed25519_pub());
    std::fs::write(&kh, &other).unwrap();
    let session = connect_ok(
        &sshd,
        config(Some(kh.clone()), HostKeyPolicy::AcceptNew),
        "AcceptNew after an unterminated line",
    )
    .await;
    drop(session);
    let written = std::fs::read_to_string(&kh).unwrap();
    println!("known_hosts now: {written:?}");
    let lines: Vec<&str> = written.lines().collect();
    assert_eq!(
        lines,
        vec![
            other.as_str(),
            &format!("{} {}", expected_host(&sshd), sshd.host_key_pub())
        ],
        "the existing entry must stay intact and the new one be on its own line"
    );
    connect_ok(
        &sshd,
        config(Some(kh), HostKeyPolicy::Strict),
        "Strict with the file AcceptNew appended to",
    )
    .await;
}

/// The server has an RSA and an ed25519 host key; known_hosts lists only its
/// (still valid) RSA key. OpenSSH calls a key of a type not on file "new"
/// ("keys of different type are already known"), never "changed": nothing
/// the file knows was contradicted. Whether the library then reports
/// `Unknown` or negotiates the known RSA key, it must not cry `Changed`,
/// and `AcceptNew` must connect.
#[tokio::test(flavor = "current_thread")]
async fn key_of_another_type_is_not_reported_as_changed() {
    let sshd = Sshd::builder().rsa_host_key(true).start();
    let all = std::fs::read_to_string(sshd.known_hosts()).unwrap();
    let rsa_only: String = all
        .lines()
        .filter(|l| l.contains(" ssh-rsa "))
        .map(|l| format!("{l}\n"))
        .collect();
    assert_eq!(rsa_only.lines().count(), 1, "{all:?}");
    let dir = tempfile::tempdir().unwrap();
    let kh = dir.path().join("known_hosts");
    std::fs::write(&kh, &rsa_only).unwrap();

    let r = try_connect(&sshd, config(Some(kh.clone()), HostKeyPolicy::Strict)).await;
    match &r {
        Ok(s) => println!(
            "Strict, RSA-only known_hosts: connected with {:?}",
            s.host_key()
        ),
        Err(e) => println!("Strict, RSA-only known_hosts -> {e} ({e:?})"),
    }
    if let Err(e @ Error::HostKey(HostKeyError::Changed { .. })) = &r {
        panic!("the server's RSA key on file is still valid, yet: {e}");
    }
    drop(r);

    connect_ok(
        &sshd,
        config(Some(kh.clone()), HostKeyPolicy::AcceptNew),
        "AcceptNew with only the server's RSA key on file",
    )
    .await;
}

/// A host known by its RSA key only (what `ssh-keyscan -t rsa` writes),
/// serving Ed25519, ECDSA and RSA keys: the RSA algorithms are offered
/// first, as OpenSSH's client does, and the session connects. A host-key
/// order set in the configuration wins over known_hosts.
#[tokio::test]
async fn host_key_algorithms_follow_what_known_hosts_holds() {
    let sshd = Sshd::builder()
        .rsa_host_key(true)
        .ecdsa_host_key(true)
        .start();
    let all = std::fs::read_to_string(sshd.known_hosts()).unwrap();
    let only = |kind: &str| -> std::path::PathBuf {
        let path = sshd.dir().join(format!("known_hosts.{kind}"));
        let lines: String = all
            .lines()
            .filter(|l| l.split_whitespace().nth(1) == Some(kind))
            .map(|l| format!("{l}\n"))
            .collect();
        assert!(!lines.is_empty(), "{kind} in {all}");
        std::fs::write(&path, lines).unwrap();
        path
    };
    for (kind, want) in [
        ("ssh-rsa", "rsa-sha2-512"),
        ("ecdsa-sha2-nistp256", "ecdsa-sha2-nistp256"),
        ("ssh-ed25519", "ssh-ed25519"),
    ] {
        let config = Config::new().known_hosts(Some(only(kind)));
        let s = Session::connect_addr(sshd.addr(), config)
            .await
            .unwrap_or_else(|e| panic!("known by {kind} only: {e}"));
        assert_eq!(s.negotiated(MethodType::HostKey).as_deref(), Some(want));
        assert_eq!(s.host_key().unwrap().key_type, kind);
    }
    // Hashed entries (`ssh-keygen -H`) count too.
    let hashed = only("ssh-rsa");
    let out = std::process::Command::new("ssh-keygen")
        .arg("-H")
        .arg("-f")
        .arg(&hashed)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    assert!(std::fs::read_to_string(&hashed).unwrap().starts_with("|1|"));
    let s = Session::connect_addr(sshd.addr(), Config::new().known_hosts(Some(&hashed)))
        .await
        .expect("hashed RSA entry");
    assert_eq!(
        s.negotiated(MethodType::HostKey).as_deref(),
        Some("rsa-sha2-512")
    );
    // The user's order wins: Ed25519 asked for, RSA known: refused as unknown.
    let config = Config::new()
        .known_hosts(Some(only("ssh-rsa")))
        .method(MethodType::HostKey, "ssh-ed25519");
    match Session::connect_addr(sshd.addr(), config).await {
        Err(Error::HostKey(HostKeyError::Unknown { key_type, .. })) => {
            assert_eq!(key_type, "ssh-ed25519")
        }
        Err(e) => panic!("{e:?}"),
        Ok(_) => panic!("connected with an unknown Ed25519 key"),
    }
}
