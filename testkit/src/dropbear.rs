//! A throwaway Dropbear server on 127.0.0.1 for the interop tests.
//!
//! Dropbear has no option for the authorized_keys file: it reads
//! `~/.ssh/authorized_keys` of the user logging in. The fixture logs in as
//! [`TEST_USER`] (created by `scripts/test.sh`), appends its fresh user key
//! to that user's file, and removes the line again on drop. Host keys,
//! client key, known_hosts, log and a data directory the user may write
//! live in a temporary directory of its own.

use std::fs;
use std::io::Write;
use std::net::{Ipv4Addr, SocketAddr};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::thread;
use std::time::{Duration, Instant};

use tempfile::TempDir;

use crate::sshd::{TEST_USER, require_test_user};

/// The Dropbear server binary (Debian's `dropbear-bin`).
pub const DROPBEAR: &str = "/usr/sbin/dropbear";
/// Its key generator.
pub const DROPBEARKEY: &str = "/usr/bin/dropbearkey";
const HOW_TO_RUN: &str = "run the tests the way the README says, as root: `bash scripts/test.sh` \
     (it installs dropbear-bin and creates the test user)";

/// Serialises edits of the test user's authorized_keys within a process.
static AUTHORIZED: Mutex<()> = Mutex::new(());

/// A running Dropbear on 127.0.0.1; stopped on drop.
#[derive(Debug)]
pub struct Dropbear {
    dir: TempDir,
    port: u16,
    child: Mutex<Option<Child>>,
    key_line: String,
    authorized_keys: PathBuf,
}

impl Dropbear {
    /// Ed25519, ECDSA P-256 and RSA host keys, public-key auth only
    /// (`-s`), logging to its stderr (`-E`). Panics (never skips) when
    /// something is missing.
    pub fn start() -> Dropbear {
        for bin in [DROPBEAR, DROPBEARKEY] {
            if !Path::new(bin).exists() {
                panic!("{bin} not found: the interop tests need dropbear-bin; {HOW_TO_RUN}");
            }
        }
        require_test_user();
        let dir = tempfile::Builder::new()
            .prefix("uring-ssh-dropbear-")
            .tempdir()
            .expect("temp dir for dropbear");
        let d = dir.path();
        fs::set_permissions(d, fs::Permissions::from_mode(0o755)).expect("chmod");
        let data = d.join("data");
        fs::create_dir(&data).expect("data dir");
        chown(&data, TEST_USER);

        let mut known = Vec::new();
        let mut host_args = Vec::new();
        for (kind, bits) in [
            ("ed25519", None),
            ("ecdsa", Some("256")),
            ("rsa", Some("2048")),
        ] {
            let path = d.join(format!("host_{kind}"));
            let mut cmd = Command::new(DROPBEARKEY);
            cmd.arg("-t").arg(kind).arg("-f").arg(&path);
            if let Some(b) = bits {
                cmd.arg("-s").arg(b);
            }
            let out = cmd.output().expect("run dropbearkey");
            assert!(out.status.success(), "dropbearkey -t {kind}: {out:?}");
            known.push(public_line(&String::from_utf8_lossy(&out.stdout)));
            host_args.push(path);
        }

        // The client key, in OpenSSH format, for our library.
        let key = d.join("id_ed25519");
        let out = Command::new("ssh-keygen")
            .args([
                "-q",
                "-t",
                "ed25519",
                "-N",
                "",
                "-C",
                "uring-ssh-dropbear",
                "-f",
            ])
            .arg(&key)
            .output()
            .expect("run ssh-keygen");
        assert!(out.status.success(), "ssh-keygen: {out:?}");
        let key_line = fs::read_to_string(key.with_extension("pub"))
            .expect("read user pub key")
            .trim()
            .to_string();
        let authorized_keys = authorize(&key_line);

        let log_path = d.join("dropbear.log");
        for _ in 0..5 {
            let port = free_port();
            let mut kh = String::new();
            for k in &known {
                kh.push_str(&format!("[127.0.0.1]:{port} {k}\n"));
            }
            fs::write(d.join("known_hosts"), kh).expect("write known_hosts");
            let log = fs::File::create(&log_path).expect("create log");
            let mut cmd = Command::new(DROPBEAR);
            cmd.args(["-F", "-E", "-s", "-p"])
                .arg(format!("127.0.0.1:{port}"))
                .arg("-P")
                .arg(d.join("dropbear.pid"));
            for h in &host_args {
                cmd.arg("-r").arg(h);
            }
            let mut child = cmd
                .stdin(Stdio::null())
                .stdout(log.try_clone().expect("dup"))
                .stderr(log)
                .process_group(0)
                .spawn()
                .unwrap_or_else(|e| panic!("spawn {DROPBEAR}: {e}; {HOW_TO_RUN}"));
            let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
            let deadline = Instant::now() + Duration::from_secs(10);
            loop {
                if let Ok(Some(_)) = child.try_wait() {
                    break;
                }
                if banner_ok(addr) {
                    return Dropbear {
                        dir,
                        port,
                        child: Mutex::new(Some(child)),
                        key_line,
                        authorized_keys,
                    };
                }
                if Instant::now() > deadline {
                    let _ = child.kill();
                    panic!(
                        "dropbear sent no banner on {addr}:\n{}",
                        fs::read_to_string(&log_path).unwrap_or_default()
                    );
                }
                thread::sleep(Duration::from_millis(20));
            }
            // Exited: most likely the port was taken; try another one.
        }
        panic!(
            "dropbear could not start:\n{}",
            fs::read_to_string(&log_path).unwrap_or_default()
        );
    }

    /// `127.0.0.1:port`.
    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from((Ipv4Addr::LOCALHOST, self.port))
    }

    /// The temporary directory (keys, log, known_hosts).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// A directory the login user may write.
    pub fn data_dir(&self) -> PathBuf {
        self.dir().join("data")
    }

    /// known_hosts with the three host keys for `[127.0.0.1]:PORT`.
    pub fn known_hosts(&self) -> PathBuf {
        self.dir().join("known_hosts")
    }

    /// The user to log in as.
    pub fn user(&self) -> String {
        TEST_USER.to_string()
    }

    /// The client's ed25519 key (OpenSSH format), authorized for [`Self::user`].
    pub fn user_key(&self) -> PathBuf {
        self.dir().join("id_ed25519")
    }

    /// Dropbear's stderr so far.
    pub fn log(&self) -> String {
        fs::read_to_string(self.dir().join("dropbear.log")).unwrap_or_default()
    }
}

impl Drop for Dropbear {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.lock().unwrap_or_else(|e| e.into_inner()).take() {
            // Its process group: the listener and every connection.
            // SAFETY: kill(2) on a process group we started.
            unsafe { libc::kill(-(child.id() as i32), libc::SIGKILL) };
            let _ = child.wait();
        }
        let _guard = AUTHORIZED.lock().unwrap_or_else(|e| e.into_inner());
        if let Ok(text) = fs::read_to_string(&self.authorized_keys) {
            let kept: String = text
                .lines()
                .filter(|l| l.trim() != self.key_line)
                .map(|l| format!("{l}\n"))
                .collect();
            let _ = fs::write(&self.authorized_keys, kept);
        }
        if thread::panicking() {
            eprintln!("--- dropbear log ---\n{}--- end ---", self.log());
        }
    }
}

/// The `ssh-… BASE64` part of dropbearkey's output.
fn public_line(out: &str) -> String {
    out.lines()
        .find(|l| l.starts_with("ssh-") || l.starts_with("ecdsa-"))
        .map(|l| l.split_whitespace().take(2).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|| panic!("no public key in dropbearkey's output: {out}"))
}

/// Appends `line` to the test user's `~/.ssh/authorized_keys`.
fn authorize(line: &str) -> PathBuf {
    let home = home_of(TEST_USER);
    let ssh = home.join(".ssh");
    let _guard = AUTHORIZED.lock().unwrap_or_else(|e| e.into_inner());
    fs::create_dir_all(&ssh).expect("create ~/.ssh of the test user");
    fs::set_permissions(&ssh, fs::Permissions::from_mode(0o700)).expect("chmod ~/.ssh");
    chown(&ssh, TEST_USER);
    let path = ssh.join("authorized_keys");
    let mut f = fs::OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(&path)
        .expect("open authorized_keys");
    writeln!(f, "{line}").expect("append to authorized_keys");
    chown(&path, TEST_USER);
    path
}

fn home_of(user: &str) -> PathBuf {
    let out = Command::new("getent")
        .args(["passwd", user])
        .output()
        .expect("getent");
    let line = String::from_utf8_lossy(&out.stdout);
    PathBuf::from(
        line.trim()
            .split(':')
            .nth(5)
            .unwrap_or_else(|| panic!("no home for {user}; {HOW_TO_RUN}")),
    )
}

fn chown(path: &Path, user: &str) {
    let status = Command::new("chown")
        .arg(format!("{user}:"))
        .arg(path)
        .status()
        .expect("run chown");
    assert!(status.success(), "chown {user} {}", path.display());
}

fn free_port() -> u16 {
    std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port()
}

fn banner_ok(addr: SocketAddr) -> bool {
    use std::io::Read;
    let Ok(mut s) = std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_millis(500)));
    let mut buf = [0u8; 7];
    s.read_exact(&mut buf).is_ok() && &buf == b"SSH-2.0"
}
