//! Tests of the throwaway-sshd fixture itself (real sshd, real ssh client).

use std::io::{BufRead, BufReader};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use uring_ssh_testkit::sshd::{self, Sshd, SshdBuilder};

/// An OpenSSH client command that ignores every user/system config.
fn ssh(sshd: &Sshd, user: &str) -> Command {
    let mut c = Command::new("ssh");
    c.args(["-F", "/dev/null", "-o", "StrictHostKeyChecking=yes"])
        .arg("-o")
        .arg(format!(
            "UserKnownHostsFile={}",
            sshd.known_hosts().display()
        ))
        .args([
            "-o",
            "GlobalKnownHostsFile=/dev/null",
            "-o",
            "IdentityAgent=none",
        ])
        .args([
            "-o",
            "IdentitiesOnly=yes",
            "-o",
            "ConnectTimeout=10",
            "-o",
            "LogLevel=ERROR",
        ])
        .arg("-p")
        .arg(sshd.port().to_string())
        .arg(format!("{user}@127.0.0.1"))
        .stdin(Stdio::null());
    c
}

fn ssh_with_key(sshd: &Sshd, key: &Path, cmd: &str) -> Output {
    ssh(sshd, &sshd.user())
        .args(["-o", "BatchMode=yes", "-i"])
        .arg(key)
        .arg(cmd)
        .output()
        .expect("run ssh")
}

/// Logs in as TEST_USER with a password given by an SSH_ASKPASS script.
fn ssh_with_password(sshd: &Sshd, method: &str, password: &str) -> Output {
    let askpass = sshd.dir().join(format!("askpass-{method}"));
    std::fs::write(
        &askpass,
        format!("#!/bin/sh\nprintf '%s\\n' '{password}'\n"),
    )
    .unwrap();
    Command::new("chmod")
        .arg("755")
        .arg(&askpass)
        .status()
        .unwrap();
    ssh(sshd, sshd::TEST_USER)
        .args([
            "-o",
            "PubkeyAuthentication=no",
            "-o",
            "NumberOfPasswordPrompts=1",
        ])
        .arg("-o")
        .arg(format!("PreferredAuthentications={method}"))
        .env("SSH_ASKPASS", &askpass)
        .env("SSH_ASKPASS_REQUIRE", "force")
        .env("DISPLAY", ":0")
        .arg("echo hi")
        .output()
        .expect("run ssh")
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn assert_hi(o: &Output) {
    assert!(
        o.status.success() && stdout(o) == "hi\n",
        "ssh failed: {:?}\nstdout: {}\nstderr: {}",
        o.status,
        stdout(o),
        String::from_utf8_lossy(&o.stderr)
    );
}

#[test]
fn accepts_tcp_and_sends_banner() {
    let sshd = Sshd::start();
    assert_eq!(sshd.addr().port(), sshd.port());
    let s = TcpStream::connect(sshd.addr()).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    // read_line retries EINTR, which a socket read with a timeout can get when
    // another thread spawns a process (SIGCHLD while signals are blocked).
    let mut banner = String::new();
    BufReader::new(s).read_line(&mut banner).unwrap();
    assert!(banner.starts_with("SSH-2.0-OpenSSH"), "banner: {banner:?}");
    assert!(
        sshd.log().contains("Server listening on 127.0.0.1"),
        "{}",
        sshd.log()
    );
}

#[test]
fn known_hosts_contains_host_key() {
    let sshd = Sshd::start();
    let kh = std::fs::read_to_string(sshd.known_hosts()).unwrap();
    let line = format!("[127.0.0.1]:{} {}", sshd.port(), sshd.host_key_pub());
    assert!(sshd.host_key_pub().starts_with("ssh-ed25519 "));
    assert!(kh.lines().any(|l| l == line), "{kh}");
    // ssh-keygen can look the host up in it.
    let out = Command::new("ssh-keygen")
        .arg("-F")
        .arg(format!("[127.0.0.1]:{}", sshd.port()))
        .arg("-f")
        .arg(sshd.known_hosts())
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
}

#[test]
fn rsa_host_key_and_extra_config() {
    let sshd = SshdBuilder::new()
        .rsa_host_key(true)
        .log_level("DEBUG3")
        .extra("MaxAuthTries 9\nMatch User nobody\n  X11Forwarding no")
        .start();
    let kh = std::fs::read_to_string(sshd.known_hosts()).unwrap();
    assert_eq!(kh.lines().count(), 2, "{kh}");
    assert!(kh.contains(" ssh-rsa "), "{kh}");
    assert_hi(&ssh_with_key(&sshd, &sshd.user_key(), "echo hi"));
    assert!(sshd.log().contains("debug3:"), "LogLevel not applied");
    let cfg = std::fs::read_to_string(sshd.config()).unwrap();
    assert!(cfg.find("MaxAuthTries 9").unwrap() < cfg.find("Port ").unwrap());
    assert!(cfg.trim_end().ends_with("X11Forwarding no"));
}

#[test]
fn ssh_client_logs_in_with_user_keys() {
    let sshd = Sshd::start();
    assert_hi(&ssh_with_key(&sshd, &sshd.user_key(), "echo hi"));
    assert_hi(&ssh_with_key(&sshd, &sshd.rsa_user_key(), "echo hi"));
    let wrong = ssh_with_key(&sshd, &sshd.wrong_key(), "echo hi");
    assert!(!wrong.status.success(), "wrong key was accepted");
    // PEM RSA key and a passphrase-protected key that opens with KEY_PASSPHRASE.
    let rsa = std::fs::read_to_string(sshd.rsa_user_key()).unwrap();
    assert!(rsa.starts_with("-----BEGIN RSA PRIVATE KEY-----"));
    let out = Command::new("ssh-keygen")
        .args(["-y", "-P", sshd::KEY_PASSPHRASE, "-f"])
        .arg(sshd.user_key_encrypted())
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let auth = std::fs::read_to_string(sshd.dir().join("authorized_keys")).unwrap();
    let key_b64 = stdout(&out).split_whitespace().nth(1).unwrap().to_string();
    assert!(auth.contains(&key_b64));
    let out = Command::new("ssh-keygen")
        .args(["-y", "-P", "", "-f"])
        .arg(sshd.user_key_encrypted())
        .output()
        .unwrap();
    assert!(
        !out.status.success(),
        "encrypted key opened without passphrase"
    );
}

#[test]
fn kill_connections_kills_sessions_keeps_listener() {
    let sshd = Sshd::start();
    let mut client = ssh(&sshd, &sshd.user())
        .args(["-o", "BatchMode=yes", "-i"])
        .arg(sshd.user_key())
        .arg("sleep 30")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // Wait until the session's `sleep` runs under sshd.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let sleeping = sshd.connection_pids().iter().any(|p| {
            std::fs::read_to_string(format!("/proc/{p}/comm")).is_ok_and(|c| c.trim() == "sleep")
        });
        if sleeping {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "session never started\n{}",
            sshd.log()
        );
        thread::sleep(Duration::from_millis(20));
    }
    let started = Instant::now();
    sshd.kill_connections();
    assert!(sshd.connection_pids().is_empty());
    let status = loop {
        if let Some(s) = client.try_wait().unwrap() {
            break s;
        }
        if started.elapsed() > Duration::from_secs(10) {
            let _ = client.kill();
            panic!("ssh client still running 10 s after kill_connections");
        }
        thread::sleep(Duration::from_millis(20));
    };
    assert!(!status.success());
    assert!(started.elapsed() < Duration::from_secs(10));
    // The listener is still up.
    assert_hi(&ssh_with_key(&sshd, &sshd.user_key(), "echo hi"));
}

#[test]
fn stop_frees_the_port() {
    let sshd = Sshd::start();
    let (addr, pid) = (sshd.addr(), sshd.pid());
    assert_hi(&ssh_with_key(&sshd, &sshd.user_key(), "echo hi"));
    sshd.stop();
    sshd.stop(); // idempotent
    assert!(
        !Path::new(&format!("/proc/{pid}")).exists(),
        "sshd still running"
    );
    assert!(TcpStream::connect(addr).is_err(), "port still accepting");
    TcpListener::bind(addr).expect("port not freed");
}

#[test]
fn password_auth_for_test_user() {
    sshd::require_test_user();
    let sshd = SshdBuilder::new().password_auth(true).start();
    assert_hi(&ssh_with_password(&sshd, "password", sshd::TEST_PASSWORD));
    let accepted = format!("Accepted password for {}", sshd::TEST_USER);
    assert!(sshd.log().contains(&accepted), "{}", sshd.log());
    let bad = ssh_with_password(&sshd, "password", "not-the-password");
    assert!(!bad.status.success(), "wrong password accepted");
}

#[test]
fn kbd_interactive_for_test_user() {
    sshd::require_test_user();
    let sshd = SshdBuilder::new().kbd_interactive(true).start();
    assert_hi(&ssh_with_password(
        &sshd,
        "keyboard-interactive",
        sshd::TEST_PASSWORD,
    ));
    let accepted = format!("Accepted keyboard-interactive/pam for {}", sshd::TEST_USER);
    assert!(sshd.log().contains(&accepted), "{}", sshd.log());
}

#[test]
#[should_panic(expected = "sshd rejected the test config")]
fn invalid_config_panics_with_sshd_output() {
    SshdBuilder::new().extra("NoSuchOption yes").start();
}
