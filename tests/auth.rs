//! Authentication and connection-failure tests against a real sshd.
//!
//! Every test that needs sshd starts its own through the fixture, which
//! panics (never skips) when sshd or the test user is missing.

use std::io::Write;
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tokio::io::AsyncReadExt;
use uring_ssh::{Config, Error, ExitStatus, Session};
use uring_ssh_testkit::sshd::*;

/// Upper bound on any single test body: a hang fails the test instead of
/// blocking the run.
const HANG_GUARD: Duration = Duration::from_secs(60);

/// Strict host-key checking against the fixture's known_hosts.
fn config(sshd: &Sshd) -> Config {
    Config::new()
        .known_hosts(Some(sshd.known_hosts()))
        .timeout(Some(Duration::from_secs(20)))
}

async fn connect(sshd: &Sshd) -> Session {
    Session::connect_addr(sshd.addr(), config(sshd))
        .await
        .unwrap_or_else(|e| panic!("connect to {}: {e} ({e:?})", sshd.addr()))
}

/// Runs `cmd`, reads stdout to its end and returns it with the exit status.
async fn run(session: &Session, cmd: &str) -> (String, ExitStatus) {
    let mut ch = session
        .exec(cmd)
        .await
        .unwrap_or_else(|e| panic!("exec {cmd:?}: {e} ({e:?})"));
    let mut out = String::new();
    ch.read_to_string(&mut out)
        .await
        .unwrap_or_else(|e| panic!("read stdout of {cmd:?}: {e}"));
    let status = ch
        .wait()
        .await
        .unwrap_or_else(|e| panic!("wait for {cmd:?}: {e} ({e:?})"));
    (out, status)
}

/// Asserts `echo ok` runs and exits 0 on an authenticated session.
async fn assert_echo_ok(session: &Session) {
    let (out, status) = run(session, "echo ok").await;
    assert_eq!(out, "ok\n", "stdout of `echo ok`");
    assert!(status.success(), "exit status of `echo ok`: {status:?}");
}

async fn guarded<F: std::future::Future<Output = T>, T>(what: &str, f: F) -> T {
    tokio::time::timeout(HANG_GUARD, f)
        .await
        .unwrap_or_else(|_| panic!("{what}: no result within {HANG_GUARD:?} (hang)"))
}

fn assert_auth_failure(err: &Error, what: &str) {
    assert!(
        err.is_auth_failure(),
        "{what}: expected an authentication failure, got {err} ({err:?})"
    );
    assert_eq!(
        err.kind(),
        std::io::ErrorKind::PermissionDenied,
        "{what}: kind of {err:?}"
    );
}

// ---------------------------------------------------------------- public key

#[tokio::test(flavor = "current_thread")]
async fn pubkey_file_succeeds_and_exec_works() {
    let sshd = Sshd::start();
    guarded("pubkey file", async {
        let session = connect(&sshd).await;
        assert!(
            !session.authenticated(),
            "authenticated before any auth call"
        );
        session
            .auth_pubkey_file(&sshd.user(), &sshd.user_key(), None)
            .await
            .unwrap_or_else(|e| panic!("auth_pubkey_file: {e} ({e:?})"));
        assert!(session.authenticated(), "not authenticated after success");
        assert_echo_ok(&session).await;
        let (_, status) = run(&session, "exit 7").await;
        assert_eq!(status.code, 7, "exit status of `exit 7`: {status:?}");
        session.close("bye").await.expect("close");
    })
    .await;
}

#[tokio::test(flavor = "current_thread")]
async fn encrypted_key_with_right_passphrase_succeeds() {
    let sshd = Sshd::start();
    guarded("encrypted key", async {
        let session = connect(&sshd).await;
        session
            .auth_pubkey_file(
                &sshd.user(),
                &sshd.user_key_encrypted(),
                Some(KEY_PASSPHRASE),
            )
            .await
            .unwrap_or_else(|e| panic!("auth with the right passphrase: {e} ({e:?})"));
        assert!(session.authenticated());
        assert_echo_ok(&session).await;
    })
    .await;
}

#[tokio::test(flavor = "current_thread")]
async fn encrypted_key_with_wrong_passphrase_fails() {
    let sshd = Sshd::start();
    guarded("wrong passphrase", async {
        let session = connect(&sshd).await;
        let err = session
            .auth_pubkey_file(
                &sshd.user(),
                &sshd.user_key_encrypted(),
                Some("not-the-passphrase"),
            )
            .await
            .expect_err("a wrong passphrase must not authenticate");
        println!("wrong passphrase -> {err} ({err:?}), kind {:?}", err.kind());
        assert!(!session.authenticated(), "authenticated after a failure");
        // libssh2 cannot decrypt the key, so nothing reaches the server: it
        // reports LIBSSH2_ERROR_FILE (-16), "Unable to extract public key
        // from private key: Unsupported private key format".
        assert!(
            matches!(&err, Error::Ssh { code, .. } if *code == libssh2_sys::LIBSSH2_ERROR_FILE),
            "wrong passphrase: expected Error::Ssh {{ code: LIBSSH2_ERROR_FILE }}, got {err:?}"
        );
        assert_ne!(err.kind(), std::io::ErrorKind::Other, "kind of {err:?}");
        // The session stays usable: the right passphrase still works.
        session
            .auth_pubkey_file(
                &sshd.user(),
                &sshd.user_key_encrypted(),
                Some(KEY_PASSPHRASE),
            )
            .await
            .unwrap_or_else(|e| panic!("retry with the right passphrase: {e} ({e:?})"));
        assert!(session.authenticated());
    })
    .await;
}

#[tokio::test(flavor = "current_thread")]
async fn pubkey_memory_ed25519_succeeds() {
    let sshd = Sshd::start();
    guarded("pubkey memory ed25519", async {
        let key = std::fs::read_to_string(sshd.user_key()).expect("read user key");
        let session = connect(&sshd).await;
        session
            .auth_pubkey_memory(&sshd.user(), &key, None)
            .await
            .unwrap_or_else(|e| panic!("auth_pubkey_memory (ed25519): {e} ({e:?})"));
        assert!(session.authenticated());
        assert_echo_ok(&session).await;
    })
    .await;
}

#[tokio::test(flavor = "current_thread")]
async fn pubkey_memory_rsa_pem_succeeds() {
    let sshd = Sshd::start();
    guarded("pubkey memory rsa", async {
        let key = std::fs::read_to_string(sshd.rsa_user_key()).expect("read RSA key");
        assert!(
            key.starts_with("-----BEGIN RSA PRIVATE KEY-----"),
            "fixture RSA key is not PEM: {:?}",
            key.lines().next()
        );
        let session = connect(&sshd).await;
        session
            .auth_pubkey_memory(&sshd.user(), &key, None)
            .await
            .unwrap_or_else(|e| panic!("auth_pubkey_memory (RSA PEM): {e} ({e:?})"));
        assert!(session.authenticated());
        assert_echo_ok(&session).await;
    })
    .await;
}

#[tokio::test(flavor = "current_thread")]
async fn pubkey_file_rsa_pem_succeeds() {
    let sshd = Sshd::start();
    guarded("pubkey file rsa", async {
        let session = connect(&sshd).await;
        session
            .auth_pubkey_file(&sshd.user(), &sshd.rsa_user_key(), None)
            .await
            .unwrap_or_else(|e| panic!("auth_pubkey_file (RSA PEM): {e} ({e:?})"));
        assert!(session.authenticated());
        assert_echo_ok(&session).await;
    })
    .await;
}

#[tokio::test(flavor = "current_thread")]
async fn key_not_in_authorized_keys_is_denied() {
    let sshd = Sshd::start();
    guarded("wrong key", async {
        let session = connect(&sshd).await;
        let err = session
            .auth_pubkey_file(&sshd.user(), &sshd.wrong_key(), None)
            .await
            .expect_err("a key not in authorized_keys must be refused");
        println!("wrong key -> {err} ({err:?})");
        assert_auth_failure(&err, "wrong key");
        assert!(!session.authenticated());
        // Still usable: the right key is accepted afterwards.
        session
            .auth_pubkey_file(&sshd.user(), &sshd.user_key(), None)
            .await
            .unwrap_or_else(|e| panic!("right key after a refused one: {e} ({e:?})"));
        assert!(session.authenticated());
    })
    .await;
}

#[tokio::test(flavor = "current_thread")]
async fn missing_key_file_is_invalid_input_naming_the_path() {
    let sshd = Sshd::start();
    guarded("missing key file", async {
        let session = connect(&sshd).await;
        let missing = sshd.dir().join("no-such-key-file");
        let err = session
            .auth_pubkey_file(&sshd.user(), &missing, None)
            .await
            .expect_err("a missing key file must fail");
        println!("missing key -> {err} ({err:?})");
        match &err {
            Error::InvalidInput(e @ uring_ssh::InvalidInput::NotFound { path, .. }) => {
                assert_eq!(path, &missing);
                assert!(
                    e.to_string().contains(&missing.display().to_string()),
                    "message does not name {}: {e}",
                    missing.display()
                )
            }
            other => panic!("expected Error::InvalidInput, got {other:?}"),
        }
        assert_eq!(err.kind(), std::io::ErrorKind::InvalidInput);
        assert!(
            err.to_string().contains(&missing.display().to_string()),
            "Display does not name the path: {err}"
        );
        assert!(!session.authenticated());
    })
    .await;
}

#[tokio::test(flavor = "current_thread")]
async fn auth_methods_lists_publickey() {
    let sshd = Sshd::start();
    guarded("auth methods", async {
        let session = connect(&sshd).await;
        let methods = session
            .auth_methods(&sshd.user())
            .await
            .unwrap_or_else(|e| panic!("auth_methods: {e} ({e:?})"));
        println!("auth methods: {methods:?}");
        assert!(
            methods.iter().any(|m| m == "publickey"),
            "publickey not offered: {methods:?}"
        );
        assert!(
            !methods.iter().any(|m| m == "password"),
            "password offered though disabled: {methods:?}"
        );
        assert!(!session.authenticated());
        // Listing the methods does not spoil a later authentication.
        session
            .auth_pubkey_file(&sshd.user(), &sshd.user_key(), None)
            .await
            .unwrap_or_else(|e| panic!("auth after auth_methods: {e} ({e:?})"));
        assert!(session.authenticated());
    })
    .await;
}

// ------------------------------------------------------------------ password

#[tokio::test(flavor = "current_thread")]
async fn password_auth_succeeds_as_test_user() {
    require_test_user();
    let sshd = Sshd::builder().password_auth(true).start();
    guarded("password", async {
        let session = connect(&sshd).await;
        let methods = session.auth_methods(TEST_USER).await.expect("auth_methods");
        assert!(
            methods.iter().any(|m| m == "password"),
            "password not offered: {methods:?}"
        );
        session
            .auth_password(TEST_USER, TEST_PASSWORD)
            .await
            .unwrap_or_else(|e| panic!("auth_password: {e} ({e:?})"));
        assert!(session.authenticated());
        let (out, status) = run(&session, "id -un").await;
        assert_eq!(out.trim(), TEST_USER, "logged in as the wrong user");
        assert!(status.success(), "{status:?}");
        session.close("bye").await.expect("close");
    })
    .await;
}

#[tokio::test(flavor = "current_thread")]
async fn wrong_password_is_denied() {
    require_test_user();
    let sshd = Sshd::builder().password_auth(true).start();
    guarded("wrong password", async {
        let session = connect(&sshd).await;
        let err = session
            .auth_password(TEST_USER, "definitely-not-the-password")
            .await
            .expect_err("a wrong password must be refused");
        println!("wrong password -> {err} ({err:?})");
        assert_auth_failure(&err, "wrong password");
        assert!(!session.authenticated());
    })
    .await;
}

// ------------------------------------------------------- keyboard-interactive

#[tokio::test(flavor = "current_thread")]
async fn keyboard_interactive_succeeds() {
    require_test_user();
    let sshd = Sshd::builder().kbd_interactive(true).start();
    guarded("keyboard-interactive", async {
        let session = connect(&sshd).await;
        // (name, instruction, prompts) of each call.
        type Call = (String, String, Vec<(String, bool)>);
        let mut calls: Vec<Call> = Vec::new();
        session
            .auth_keyboard_interactive(TEST_USER, |name, instr, prompts| {
                calls.push((name.to_owned(), instr.to_owned(), prompts.to_vec()));
                vec![TEST_PASSWORD.to_owned(); prompts.len()]
            })
            .await
            .unwrap_or_else(|e| panic!("keyboard-interactive: {e} ({e:?}); calls {calls:?}"));
        println!("responder calls: {calls:?}");
        assert!(
            calls.iter().any(|(_, _, p)| !p.is_empty()),
            "the responder was never asked a prompt: {calls:?}"
        );
        assert!(
            calls
                .iter()
                .flat_map(|(_, _, p)| p)
                .any(|(text, echo)| text.to_lowercase().contains("password") && !echo),
            "expected a non-echoed password prompt: {calls:?}"
        );
        assert!(session.authenticated());
        let (out, status) = run(&session, "id -un").await;
        assert_eq!(out.trim(), TEST_USER);
        assert!(status.success(), "{status:?}");
    })
    .await;
}

#[tokio::test(flavor = "current_thread")]
async fn keyboard_interactive_wrong_answer_fails() {
    require_test_user();
    let sshd = Sshd::builder().kbd_interactive(true).start();
    guarded("keyboard-interactive wrong answer", async {
        let session = connect(&sshd).await;
        let mut prompts_seen = 0usize;
        let err = session
            .auth_keyboard_interactive(TEST_USER, |_, _, prompts| {
                prompts_seen += prompts.len();
                vec!["wrong-answer".to_owned(); prompts.len()]
            })
            .await
            .expect_err("a wrong answer must be refused");
        println!("kbd wrong answer -> {err} ({err:?}); prompts seen {prompts_seen}");
        assert!(prompts_seen >= 1, "the responder was never asked a prompt");
        assert_auth_failure(&err, "keyboard-interactive wrong answer");
        assert!(!session.authenticated());
    })
    .await;
}

// --------------------------------------------------------------------- agent

/// An `ssh-agent -D` child, killed and reaped on drop.
struct Agent {
    child: Child,
    sock: PathBuf,
    _dir: tempfile::TempDir,
}

impl Agent {
    fn start() -> Agent {
        let dir = tempfile::tempdir().expect("temp dir for the agent");
        let sock = dir.path().join("agent.sock");
        let child = Command::new("ssh-agent")
            .arg("-D")
            .arg("-a")
            .arg(&sock)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap_or_else(|e| panic!("spawn ssh-agent (openssh-client): {e}"));
        let mut agent = Agent {
            child,
            sock,
            _dir: dir,
        };
        // Until the agent accepts: it creates the socket file at bind(),
        // before listen(), and a connect in between is refused.
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::os::unix::net::UnixStream::connect(&agent.sock).is_err() {
            if let Ok(Some(status)) = agent.child.try_wait() {
                panic!("ssh-agent exited early: {status}");
            }
            assert!(
                Instant::now() < deadline,
                "ssh-agent did not listen on {}",
                agent.sock.display()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        agent
    }

    fn add(&self, key: &Path) {
        let out = Command::new("ssh-add")
            .arg(key)
            .env("SSH_AUTH_SOCK", &self.sock)
            .stdin(Stdio::null())
            .output()
            .expect("run ssh-add");
        assert!(
            out.status.success(),
            "ssh-add {} failed ({}): {}",
            key.display(),
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test(flavor = "current_thread")]
async fn agent_auth_succeeds() {
    let sshd = Sshd::start();
    let agent = Agent::start();
    // One key the server refuses first, then the accepted one: the loop over
    // identities must move on past a refusal.
    agent.add(&sshd.wrong_key());
    agent.add(&sshd.user_key());
    guarded("agent", async {
        let session = connect(&sshd).await;
        session
            .auth_agent_at(&sshd.user(), Some(&agent.sock))
            .await
            .unwrap_or_else(|e| panic!("auth_agent_at: {e} ({e:?})"));
        assert!(session.authenticated());
        assert_echo_ok(&session).await;
    })
    .await;
}

#[tokio::test(flavor = "current_thread")]
async fn agent_without_identities_fails() {
    let sshd = Sshd::start();
    let agent = Agent::start();
    guarded("empty agent", async {
        let session = connect(&sshd).await;
        let err = session
            .auth_agent_at(&sshd.user(), Some(&agent.sock))
            .await
            .expect_err("an empty agent must not authenticate");
        println!("empty agent -> {err} ({err:?})");
        assert_auth_failure(&err, "empty agent");
        assert!(!session.authenticated());
    })
    .await;
}

#[tokio::test(flavor = "current_thread")]
async fn agent_with_only_wrong_key_fails() {
    let sshd = Sshd::start();
    let agent = Agent::start();
    agent.add(&sshd.wrong_key());
    guarded("agent wrong key", async {
        let session = connect(&sshd).await;
        let err = session
            .auth_agent_at(&sshd.user(), Some(&agent.sock))
            .await
            .expect_err("an agent holding only a refused key must not authenticate");
        println!("agent with wrong key -> {err} ({err:?})");
        assert_auth_failure(&err, "agent with wrong key");
        assert!(!session.authenticated());
    })
    .await;
}

// ------------------------------------------------------- connection failures

fn no_host_keys() -> Config {
    Config::new().known_hosts(None::<PathBuf>)
}

#[tokio::test(flavor = "current_thread")]
async fn connection_refused_is_io_error() {
    let port = {
        let l = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind");
        l.local_addr().unwrap().port()
    };
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let r = guarded("refused", Session::connect_addr(addr, no_host_keys())).await;
    let err = r.expect_err("connect to a closed port must fail");
    println!("refused -> {err} ({err:?})");
    match &err {
        Error::Io(e) => assert_eq!(e.kind(), std::io::ErrorKind::ConnectionRefused, "{e:?}"),
        other => panic!("expected Error::Io(ConnectionRefused), got {other:?}"),
    }
    assert_eq!(err.kind(), std::io::ErrorKind::ConnectionRefused);
}

/// A listening socket with backlog 0 that never accepts.
fn raw_listener() -> (OwnedFd, SocketAddr) {
    // SAFETY: plain syscalls on a descriptor owned by the returned OwnedFd;
    // the sockaddr structs are fully initialised and sized correctly.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
        assert!(fd >= 0, "socket: {}", std::io::Error::last_os_error());
        let fd = OwnedFd::from_raw_fd(fd);
        let mut sa: libc::sockaddr_in = std::mem::zeroed();
        sa.sin_family = libc::AF_INET as libc::sa_family_t;
        sa.sin_port = 0;
        sa.sin_addr.s_addr = u32::from(Ipv4Addr::LOCALHOST).to_be();
        let len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
        let rc = libc::bind(
            fd.as_raw_fd(),
            &sa as *const libc::sockaddr_in as *const libc::sockaddr,
            len,
        );
        assert_eq!(rc, 0, "bind: {}", std::io::Error::last_os_error());
        let rc = libc::listen(fd.as_raw_fd(), 0);
        assert_eq!(rc, 0, "listen: {}", std::io::Error::last_os_error());
        let mut bound: libc::sockaddr_in = std::mem::zeroed();
        let mut blen = len;
        let rc = libc::getsockname(
            fd.as_raw_fd(),
            &mut bound as *mut libc::sockaddr_in as *mut libc::sockaddr,
            &mut blen,
        );
        assert_eq!(rc, 0, "getsockname: {}", std::io::Error::last_os_error());
        let port = u16::from_be(bound.sin_port);
        (fd, SocketAddr::from((Ipv4Addr::LOCALHOST, port)))
    }
}

#[tokio::test(flavor = "current_thread")]
async fn connect_timeout_is_reported() {
    let (_listener, addr) = raw_listener();
    // Fill the accept queue: once it is full the kernel drops further SYNs,
    // so the next connect can only time out.
    let mut held = Vec::new();
    let mut queue_full = false;
    for _ in 0..8 {
        match TcpStream::connect_timeout(&addr, Duration::from_millis(200)) {
            Ok(s) => held.push(s),
            Err(e) if e.kind() == std::io::ErrorKind::TimedOut => {
                queue_full = true;
                break;
            }
            Err(e) => panic!("filling the accept queue: {e}"),
        }
    }
    assert!(
        queue_full,
        "the accept queue of a backlog-0 listener never filled ({} connects succeeded)",
        held.len()
    );
    let timeout = Duration::from_millis(300);
    let start = Instant::now();
    let r = tokio::time::timeout(
        Duration::from_secs(10),
        Session::connect_addr(addr, no_host_keys().connect_timeout(timeout)),
    )
    .await
    .expect("connect with a 300 ms connect timeout hung for 10 s");
    let elapsed = start.elapsed();
    let err = r.expect_err("connect to a full accept queue must fail");
    println!("connect timeout -> {err} ({err:?}) after {elapsed:?}");
    match &err {
        Error::Timeout { operation, after } => {
            assert_eq!(*operation, "connect", "{err:?}");
            assert_eq!(*after, timeout, "{err:?}");
        }
        other => panic!("expected Error::Timeout {{ operation: \"connect\" }}, got {other:?}"),
    }
    assert_eq!(err.kind(), std::io::ErrorKind::TimedOut);
    assert!(
        elapsed >= Duration::from_millis(250),
        "timed out before the configured 300 ms: {elapsed:?}"
    );
    drop(held);
}

/// Accepts one connection in a background thread and hands it to `serve`.
fn one_shot_server(serve: impl FnOnce(TcpStream) + Send + 'static) -> SocketAddr {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind");
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        if let Ok((s, _)) = listener.accept() {
            serve(s);
        }
    });
    addr
}

#[tokio::test(flavor = "current_thread")]
async fn handshake_timeout_is_reported() {
    let addr = one_shot_server(|s| {
        std::thread::sleep(Duration::from_secs(10));
        drop(s);
    });
    let timeout = Duration::from_millis(500);
    let start = Instant::now();
    let r = tokio::time::timeout(
        Duration::from_secs(10),
        Session::connect_addr(addr, no_host_keys().timeout(Some(timeout))),
    )
    .await
    .expect("connect to a silent server hung for 10 s");
    let elapsed = start.elapsed();
    let err = r.expect_err("a silent server must fail the handshake");
    println!("silent server -> {err} ({err:?}) after {elapsed:?}");
    match &err {
        Error::Timeout { operation, after } => {
            assert_eq!(*operation, "handshake", "{err:?}");
            assert_eq!(*after, timeout);
        }
        other => panic!("expected Error::Timeout {{ operation: \"handshake\" }}, got {other:?}"),
    }
    assert!(elapsed >= Duration::from_millis(450), "{elapsed:?}");
}

/// Pseudo-random bytes (xorshift64*), no extra crates.
fn pseudo_random(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        out.extend_from_slice(&x.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes());
    }
    out.truncate(len);
    out
}

#[tokio::test(flavor = "current_thread")]
async fn garbage_server_fails_without_hanging() {
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64;
    println!("garbage seed {seed:#x}");
    let garbage = pseudo_random(seed, 4096);
    let addr = one_shot_server(move |mut s| {
        let _ = s.write_all(b"SSH-2.0-fake\r\n");
        let _ = s.write_all(&garbage);
        std::thread::sleep(Duration::from_secs(10));
    });
    let start = Instant::now();
    let r = tokio::time::timeout(
        Duration::from_secs(10),
        Session::connect_addr(addr, no_host_keys().timeout(Some(Duration::from_secs(2)))),
    )
    .await
    .expect("connect to a garbage server hung for 10 s");
    let elapsed = start.elapsed();
    let err = r.expect_err("a garbage server must not yield a session");
    println!(
        "garbage server -> {err} ({err:?}), kind {:?}, after {elapsed:?}",
        err.kind(),
    );
    assert!(
        elapsed < Duration::from_secs(5),
        "the 2 s operation timeout was not honoured: {elapsed:?}"
    );
}

#[tokio::test(flavor = "current_thread")]
async fn server_closing_at_once_is_an_error() {
    let addr = one_shot_server(drop);
    let r = tokio::time::timeout(
        Duration::from_secs(10),
        Session::connect_addr(addr, no_host_keys().timeout(Some(Duration::from_secs(5)))),
    )
    .await
    .expect("connect to a closing server hung for 10 s");
    let err = r.expect_err("a server that closes at once must fail the handshake");
    println!("closing server -> {err} ({err:?}), kind {:?}", err.kind());
    assert!(
        matches!(err, Error::Io(_) | Error::Ssh { .. }),
        "expected Error::Io or Error::Ssh, got {err:?}"
    );
}

#[tokio::test(flavor = "current_thread")]
async fn pubkey_memory_encrypted_key_with_passphrase_succeeds() {
    let sshd = Sshd::start();
    guarded("pubkey memory encrypted", async {
        let key = std::fs::read_to_string(sshd.user_key_encrypted()).expect("read key");
        let session = connect(&sshd).await;
        let err = session
            .auth_pubkey_memory(&sshd.user(), &key, Some("not-the-passphrase"))
            .await
            .expect_err("a wrong passphrase must not authenticate");
        println!("memory key, wrong passphrase -> {err} ({err:?})");
        assert_eq!(
            err.ssh_code(),
            Some(libssh2_sys::LIBSSH2_ERROR_FILE),
            "wrong passphrase (memory): {err:?}"
        );
        assert!(!session.authenticated());
        session
            .auth_pubkey_memory(&sshd.user(), &key, Some(KEY_PASSPHRASE))
            .await
            .unwrap_or_else(|e| panic!("auth_pubkey_memory (encrypted): {e} ({e:?})"));
        assert!(session.authenticated());
        assert_echo_ok(&session).await;
    })
    .await;
}

#[tokio::test(flavor = "current_thread")]
async fn server_banner_is_available_after_auth_methods() {
    let dir = tempfile::tempdir().expect("tempdir");
    let banner_path = dir.path().join("banner.txt");
    std::fs::write(&banner_path, "Authorized use only: uring-ssh tests\n").expect("write banner");
    let sshd = Sshd::builder()
        .extra(&format!("Banner {}", banner_path.display()))
        .start();
    let session = connect(&sshd).await;
    assert_eq!(
        session.auth_banner(),
        None,
        "no banner before authentication"
    );
    let methods = session.auth_methods(&sshd.user()).await.expect("methods");
    assert!(methods.iter().any(|m| m == "publickey"), "{methods:?}");
    let banner = session.auth_banner().expect("the server sent a banner");
    session
        .auth_pubkey_file(&sshd.user(), &sshd.user_key(), None)
        .await
        .expect("auth");
    assert!(
        banner.contains("Authorized use only: uring-ssh tests"),
        "{banner:?}"
    );
    let remote = session.remote_banner().expect("identification string");
    assert!(remote.starts_with("SSH-2.0-OpenSSH"), "{remote}");
}

#[tokio::test(flavor = "current_thread")]
async fn encrypted_key_without_passphrase_says_it_is_encrypted() {
    let sshd = Sshd::start();
    guarded("encrypted key, no passphrase", async {
        let session = connect(&sshd).await;
        let path = sshd.user_key_encrypted();
        let err = session
            .auth_pubkey_file(&sshd.user(), &path, None)
            .await
            .expect_err("an encrypted key without its passphrase");
        match &err {
            Error::KeyEncrypted { key } => assert_eq!(key, &path.display().to_string()),
            other => panic!("{other:?}"),
        }
        assert!(
            err.to_string()
                .contains("is encrypted and no passphrase was given"),
            "{err}"
        );
        let text = std::fs::read_to_string(&path).unwrap();
        let err = session
            .auth_pubkey_memory(&sshd.user(), &text, None)
            .await
            .expect_err("the same key in memory");
        assert!(matches!(err, Error::KeyEncrypted { .. }), "{err:?}");
        // A key that is merely unreadable is not called encrypted.
        let garbled = text.replace('A', "B");
        let err = session
            .auth_pubkey_memory(&sshd.user(), &garbled, None)
            .await
            .expect_err("a garbled key");
        assert!(!matches!(err, Error::KeyEncrypted { .. }), "{err:?}");
        assert!(!session.authenticated());
    })
    .await;
}

/// `MaxAuthTries 1`: after one failed key sshd disconnects with "Too many
/// authentication failures". That reason reaches the caller, and the next
/// attempt fails at once with it instead of talking to a dead session.
#[tokio::test(flavor = "current_thread")]
async fn the_servers_disconnect_reason_reaches_the_error() {
    let sshd = Sshd::builder().extra("MaxAuthTries 1").start();
    guarded("disconnect reason", async {
        let session = connect(&sshd).await;
        let first = session
            .auth_pubkey_file(&sshd.user(), &sshd.wrong_key(), None)
            .await
            .expect_err("a key not in authorized_keys");
        let second = session
            .auth_pubkey_file(&sshd.user(), &sshd.user_key(), None)
            .await
            .expect_err("the session is gone");
        println!("first: {first}\nsecond: {second}");
        let disconnected = |e: &Error| {
            matches!(e, Error::Disconnected { reason: 2, description }
                if description.contains("Too many authentication failures"))
        };
        assert!(
            disconnected(&first) || disconnected(&second),
            "{first:?} / {second:?}"
        );
        assert!(disconnected(&second), "{second:?}");
        assert_eq!(second.kind(), std::io::ErrorKind::ConnectionAborted);
        assert!(second.to_string().contains("protocol error"), "{second}");
    })
    .await;
}
