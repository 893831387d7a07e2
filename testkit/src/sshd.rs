//! A throwaway OpenSSH server on 127.0.0.1 for integration tests.
//!
//! Every [`Sshd`] gets its own temporary directory holding its config, host
//! keys, user keys, `authorized_keys`, `known_hosts` and log, and its own free
//! port, so tests can run in parallel. Nothing under `/etc/ssh` is touched.
//! Missing prerequisites make [`SshdBuilder::start`] panic: tests never skip.

use std::fs;
use std::io::{ErrorKind, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Mutex, OnceLock};
use std::thread;
use std::time::{Duration, Instant};

use tempfile::TempDir;

/// Absolute path of the OpenSSH daemon (it must be started by absolute path).
pub const SSHD: &str = "/usr/sbin/sshd";
/// Absolute path of `ssh-keygen`.
pub const SSH_KEYGEN: &str = "/usr/bin/ssh-keygen";
/// Local user with a password, created by `scripts/test.sh`, for password tests.
pub const TEST_USER: &str = "uringssh-test";
/// Password of [`TEST_USER`] (`scripts/test.sh` reads it from this line).
pub const TEST_PASSWORD: &str = "uRing-ssh-T3st-pw";
/// Root of the Debian 13 tree holding OpenSSH 10 (`scripts/setup.sh`
/// builds it with debootstrap); `URING_SSH_TRIXIE_ROOT` overrides it.
pub const TRIXIE_ROOT: &str = "/var/cache/uring-ssh/trixie";
/// Passphrase of [`Sshd::user_key_encrypted`].
pub const KEY_PASSPHRASE: &str = "uring-ssh-key-passphrase";

const HOW_TO_RUN: &str = "run the tests the way the README says, as root: `bash scripts/test.sh` \
     (it installs openssh-server/openssh-client and creates the test user)";
const START_ATTEMPTS: usize = 5;
const READY_TIMEOUT: Duration = Duration::from_secs(10);

/// Configures and starts an [`Sshd`].
#[derive(Debug, Clone)]
pub struct SshdBuilder {
    password_auth: bool,
    kbd_interactive: bool,
    log_level: String,
    extra: String,
    rsa_host_key: bool,
    ecdsa_host_key: bool,
    sftp_subsystem: String,
    root: Option<PathBuf>,
}

impl Default for SshdBuilder {
    fn default() -> Self {
        Self::new()
    }
}

impl SshdBuilder {
    /// Public-key auth only, ed25519 host key, `LogLevel VERBOSE`.
    pub fn new() -> Self {
        SshdBuilder {
            password_auth: false,
            kbd_interactive: false,
            log_level: "VERBOSE".to_string(),
            extra: String::new(),
            rsa_host_key: false,
            ecdsa_host_key: false,
            sftp_subsystem: "internal-sftp".to_string(),
            root: None,
        }
    }

    /// `PasswordAuthentication yes` and `PermitRootLogin yes`.
    pub fn password_auth(mut self, on: bool) -> Self {
        self.password_auth = on;
        self
    }

    /// `KbdInteractiveAuthentication yes` and `UsePAM yes` (without PAM, sshd
    /// on Linux offers no keyboard-interactive devices).
    pub fn kbd_interactive(mut self, on: bool) -> Self {
        self.kbd_interactive = on;
        self
    }

    /// sshd `LogLevel`, e.g. `"DEBUG3"`.
    pub fn log_level(mut self, level: &str) -> Self {
        self.log_level = level.to_string();
        self
    }

    /// Raw config lines added to the config (may be called repeatedly).
    ///
    /// sshd keeps the first value it reads for most keywords, so lines before
    /// any `Match` go at the top (overriding the fixture's defaults); a
    /// `Match` block and everything after it goes at the end.
    pub fn extra(mut self, lines: &str) -> Self {
        self.extra.push_str(lines);
        if !self.extra.ends_with('\n') {
            self.extra.push('\n');
        }
        self
    }

    /// Also give the server an RSA host key (listed in `known_hosts` too).
    pub fn rsa_host_key(mut self, on: bool) -> Self {
        self.rsa_host_key = on;
        self
    }

    /// Also give the server an ECDSA P-256 host key (listed in `known_hosts`).
    pub fn ecdsa_host_key(mut self, on: bool) -> Self {
        self.ecdsa_host_key = on;
        self
    }

    /// Runs OpenSSH 10 from the Debian 13 tree ([`TRIXIE_ROOT`]) under
    /// `chroot` instead of the machine's sshd. The temporary directory then
    /// lives inside that tree; [`Sshd::remote_path`] maps a local path to
    /// the one the server sees.
    pub fn openssh10(mut self) -> Self {
        let root = std::env::var_os("URING_SSH_TRIXIE_ROOT")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from(TRIXIE_ROOT));
        let sshd = root.join("usr/sbin/sshd");
        if !sshd.exists() {
            panic!(
                "{} not found: the OpenSSH 10 tests need the Debian 13 tree that \
                 scripts/setup.sh builds with debootstrap; {HOW_TO_RUN}",
                sshd.display()
            );
        }
        self.root = Some(root);
        self
    }

    /// The command of `Subsystem sftp` (default `internal-sftp`). sshd runs
    /// it as the logged-in user through the user's shell (`sh -c`).
    pub fn subsystem_sftp(mut self, command: &str) -> Self {
        self.sftp_subsystem = command.to_string();
        self
    }

    /// Generates keys, writes the config, starts sshd and waits until it
    /// sends its SSH-2.0 banner. Panics (never skips) on any failure.
    pub fn start(self) -> Sshd {
        for (bin, what) in [(SSHD, "openssh-server"), (SSH_KEYGEN, "openssh-client")] {
            if !Path::new(bin).exists() {
                panic!("{bin} not found: the SSH integration tests need {what}; {HOW_TO_RUN}");
            }
        }
        if let Some(root) = &self.root {
            let run = root.join("run/sshd");
            fs::create_dir_all(&run).expect("create run/sshd in the Debian 13 tree");
            fs::set_permissions(&run, fs::Permissions::from_mode(0o755)).expect("chmod run/sshd");
        }
        if is_root() {
            let run = Path::new("/run/sshd");
            if !run.exists() {
                fs::create_dir_all(run).expect("create /run/sshd");
                fs::set_permissions(run, fs::Permissions::from_mode(0o755))
                    .expect("chmod /run/sshd");
            }
        }

        let tmp = match &self.root {
            Some(root) => root.join("tmp"),
            None => std::env::temp_dir(),
        };
        let dir = tempfile::Builder::new()
            .prefix("uring-ssh-sshd-")
            .tempdir_in(&tmp)
            .expect("create temp dir for sshd");
        // Readable by other users: sshd reads authorized_keys as the target
        // user (e.g. TEST_USER). Private keys stay 0600.
        fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o755))
            .expect("chmod sshd temp dir");
        let d = dir.path();

        keygen_ed25519(&d.join("ssh_host_ed25519_key"), "", "");
        let mut host_pubs = vec![read_pub(&d.join("ssh_host_ed25519_key.pub"))];
        if self.rsa_host_key {
            cached_rsa(&RSA_HOST, "").write_to(&d.join("ssh_host_rsa_key"));
            host_pubs.push(read_pub(&d.join("ssh_host_rsa_key.pub")));
        }
        if self.ecdsa_host_key {
            keygen(
                &["-t", "ecdsa", "-b", "256", "-N", ""],
                &d.join("ssh_host_ecdsa_key"),
            );
            host_pubs.push(read_pub(&d.join("ssh_host_ecdsa_key.pub")));
        }
        keygen_ed25519(&d.join("id_ed25519"), "", "uring-ssh-user");
        keygen_ed25519(
            &d.join("id_ed25519_encrypted"),
            KEY_PASSPHRASE,
            "uring-ssh-encrypted",
        );
        keygen_ed25519(&d.join("id_ed25519_wrong"), "", "uring-ssh-wrong");
        cached_rsa(&RSA_USER, "uring-ssh-rsa").write_to(&d.join("id_rsa"));
        let mut authorized = String::new();
        for k in ["id_ed25519.pub", "id_ed25519_encrypted.pub", "id_rsa.pub"] {
            authorized.push_str(fs::read_to_string(d.join(k)).expect("read pub key").trim());
            authorized.push('\n');
        }
        write_file(&d.join("authorized_keys"), authorized.as_bytes(), 0o644);

        let config_path = d.join("sshd_config");
        let log_path = d.join("sshd.log");
        let mut checked = false;
        for _ in 0..START_ATTEMPTS {
            let port = free_port();
            write_file(&config_path, self.config(d, port).as_bytes(), 0o644);
            let mut kh = String::new();
            for p in &host_pubs {
                kh.push_str(&format!("[127.0.0.1]:{port} {p}\n"));
            }
            write_file(&d.join("known_hosts"), kh.as_bytes(), 0o644);
            if !checked {
                check_config(self.root.as_deref(), &config_path);
                checked = true;
            }
            let pid_file = d.join("sshd.pid");
            let _ = fs::remove_file(&pid_file);
            let log = fs::File::create(&log_path).expect("create sshd log");
            let mut child = sshd_command(self.root.as_deref())
                .arg("-D")
                .arg("-e")
                .arg("-f")
                .arg(inside(self.root.as_deref(), &config_path))
                .stdin(Stdio::null())
                .stdout(log.try_clone().expect("dup log fd"))
                .stderr(log)
                .process_group(0)
                .spawn()
                .unwrap_or_else(|e| panic!("spawn {SSHD}: {e}; {HOW_TO_RUN}"));
            let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
            match wait_ready(&mut child, addr, &pid_file, &log_path) {
                Ready::Yes => {
                    return Sshd {
                        pid: child.id(),
                        child: Mutex::new(Some(child)),
                        port,
                        user: current_user(),
                        host_key_pub: host_pubs[0].clone(),
                        log_path,
                        config_path,
                        dir,
                        root: self.root.clone(),
                    };
                }
                // Port taken between picking and binding: try another one.
                Ready::PortInUse => continue,
            }
        }
        panic!(
            "sshd could not bind a free port in {START_ATTEMPTS} attempts.\n--- last sshd log ---\n{}",
            read_log(&log_path)
        );
    }

    fn config(&self, local: &Path, port: u16) -> String {
        let inner = inside(self.root.as_deref(), local);
        let d = inner.as_path();
        let yn = |b: bool| if b { "yes" } else { "no" };
        let (head, tail) = split_extra(&self.extra);
        let mut c = String::new();
        c.push_str("# Generated by uring-ssh-testkit (sshd.rs)\n");
        c.push_str(&head);
        c.push_str(&format!("Port {port}\nListenAddress 127.0.0.1\n"));
        c.push_str(&format!(
            "HostKey {}\n",
            d.join("ssh_host_ed25519_key").display()
        ));
        if self.rsa_host_key {
            c.push_str(&format!(
                "HostKey {}\n",
                d.join("ssh_host_rsa_key").display()
            ));
        }
        if self.ecdsa_host_key {
            c.push_str(&format!(
                "HostKey {}\n",
                d.join("ssh_host_ecdsa_key").display()
            ));
        }
        c.push_str(&format!("PidFile {}\n", d.join("sshd.pid").display()));
        c.push_str(&format!(
            "AuthorizedKeysFile {}\n",
            d.join("authorized_keys").display()
        ));
        c.push_str(&format!("LogLevel {}\n", self.log_level));
        c.push_str("PubkeyAuthentication yes\n");
        c.push_str(&format!(
            "PasswordAuthentication {}\n",
            yn(self.password_auth)
        ));
        c.push_str(&format!(
            "KbdInteractiveAuthentication {}\n",
            yn(self.kbd_interactive)
        ));
        let root = if self.password_auth || self.kbd_interactive {
            "yes"
        } else {
            "prohibit-password"
        };
        c.push_str(&format!("PermitRootLogin {root}\n"));
        // sshd keeps the last MaxStartups it reads (not the first, as for
        // most keywords): the default only when `extra` sets none.
        if !self.extra.contains("MaxStartups") {
            c.push_str("MaxStartups 200:30:400\n");
        }
        c.push_str("MaxSessions 64\n");
        c.push_str(&format!("UsePAM {}\n", yn(self.kbd_interactive)));
        // SHLVL=1 makes the shell that runs a command (`sh -c` by the
        // user's shell) count as nested, so bash skips the ~/.bashrc it
        // otherwise sources for sshd's commands: the tests must not depend
        // on the login user's dotfiles, which may be slow or start a tool
        // (a version manager's init) whose lock file a killed session
        // leaves behind, stalling every later command. Login shells
        // (`Channel::shell`) still read them.
        c.push_str(
            "StrictModes no\n\
             UseDNS no\n\
             PrintMotd no\n\
             PrintLastLog no\n\
             X11Forwarding no\n\
             AcceptEnv LANG LC_* URING_*\n\
             SetEnv SHLVL=1\n\
             AllowTcpForwarding yes\n\
             AllowStreamLocalForwarding yes\n\
             StreamLocalBindUnlink yes\n",
        );
        c.push_str(&format!("Subsystem sftp {}\n", self.sftp_subsystem));
        c.push_str(&tail);
        c
    }
}

/// A running sshd on 127.0.0.1; stopped (with its connections) on drop.
#[derive(Debug)]
pub struct Sshd {
    dir: TempDir,
    port: u16,
    pid: u32,
    child: Mutex<Option<Child>>,
    user: String,
    host_key_pub: String,
    log_path: PathBuf,
    config_path: PathBuf,
    root: Option<PathBuf>,
}

impl Sshd {
    /// Starts an sshd with the default [`SshdBuilder`] settings.
    pub fn start() -> Sshd {
        SshdBuilder::new().start()
    }

    /// A builder for a customised sshd.
    pub fn builder() -> SshdBuilder {
        SshdBuilder::new()
    }

    /// TCP port sshd listens on (127.0.0.1).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// `127.0.0.1:port`.
    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from((Ipv4Addr::LOCALHOST, self.port))
    }

    /// The temporary directory holding config, keys and log.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The path the server sees for the local `path` (they differ for a
    /// server run in the Debian 13 tree; `path` must lie inside it).
    pub fn remote_path(&self, path: &Path) -> PathBuf {
        inside(self.root.as_deref(), path)
    }

    /// The sshd_config file in use.
    pub fn config(&self) -> &Path {
        &self.config_path
    }

    /// Name of the current user, who can log in with the user keys.
    pub fn user(&self) -> String {
        self.user.clone()
    }

    /// Unencrypted ed25519 private key in authorized_keys (`.pub` beside it).
    pub fn user_key(&self) -> PathBuf {
        self.dir().join("id_ed25519")
    }

    /// ed25519 private key encrypted with [`KEY_PASSPHRASE`], in authorized_keys.
    pub fn user_key_encrypted(&self) -> PathBuf {
        self.dir().join("id_ed25519_encrypted")
    }

    /// ed25519 private key that is NOT in authorized_keys.
    pub fn wrong_key(&self) -> PathBuf {
        self.dir().join("id_ed25519_wrong")
    }

    /// RSA 3072 private key in PEM format (`ssh-keygen -m PEM`), in authorized_keys.
    pub fn rsa_user_key(&self) -> PathBuf {
        self.dir().join("id_rsa")
    }

    /// OpenSSH known_hosts file with the host key(s) for `[127.0.0.1]:PORT`.
    pub fn known_hosts(&self) -> PathBuf {
        self.dir().join("known_hosts")
    }

    /// The ed25519 host public key line, `ssh-ed25519 BASE64`.
    pub fn host_key_pub(&self) -> String {
        self.host_key_pub.clone()
    }

    /// sshd's stderr so far (it runs with `-D -e`).
    pub fn log(&self) -> String {
        read_log(&self.log_path)
    }

    /// Pid of the listening sshd.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// Pids of the live descendants of the listener (per-connection processes).
    pub fn connection_pids(&self) -> Vec<u32> {
        descendants(self.pid)
    }

    /// SIGKILLs every descendant of the listening sshd (the per-connection
    /// processes and their sessions); the listener stays up. Returns once none
    /// is left alive.
    pub fn kill_connections(&self) {
        let guard = self.child.lock().unwrap_or_else(|e| e.into_inner());
        if guard.is_some() {
            kill_descendants(self.pid);
        }
    }

    /// Kills the listener and all its descendants. Idempotent.
    pub fn stop(&self) {
        let mut guard = self.child.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(mut child) = guard.take() {
            kill_tree(&mut child);
        }
    }
}

impl Drop for Sshd {
    fn drop(&mut self) {
        self.stop();
        if thread::panicking() {
            eprintln!(
                "--- sshd log ({}, port {}) ---\n{}--- end of sshd log ---",
                self.config_path.display(),
                self.port,
                self.log()
            );
        }
    }
}

/// Panics with instructions unless [`TEST_USER`] exists and we are root
/// (needed for sshd to log in a different user with a password).
pub fn require_test_user() {
    let exists = Command::new("id")
        .arg(TEST_USER)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    if !exists {
        panic!("local user {TEST_USER:?} (password auth tests) does not exist; {HOW_TO_RUN}");
    }
    if !is_root() {
        panic!(
            "password tests log in as {TEST_USER:?}, which needs sshd running as root; {HOW_TO_RUN}"
        );
    }
}

enum Ready {
    Yes,
    PortInUse,
}

/// Waits until our sshd has bound its port and sends an SSH-2.0 banner.
fn wait_ready(child: &mut Child, addr: SocketAddr, pid_file: &Path, log_path: &Path) -> Ready {
    let deadline = Instant::now() + READY_TIMEOUT;
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            let log = read_log(log_path);
            if log.contains("Address already in use") || log.contains("Cannot bind any address") {
                return Ready::PortInUse;
            }
            panic!(
                "sshd exited early ({status}) on {addr}.\n--- sshd log ---\n{log}--- end ---\n\
                 If something is missing, {HOW_TO_RUN}"
            );
        }
        // sshd writes its pid file only after binding its listen socket, so
        // the banner then really comes from our sshd, not a neighbour's.
        let bound = fs::read_to_string(pid_file)
            .ok()
            .and_then(|s| s.trim().parse::<u32>().ok())
            == Some(child.id());
        if bound && banner_ok(addr) {
            return Ready::Yes;
        }
        if Instant::now() > deadline {
            kill_tree(child);
            panic!(
                "sshd (pid {}) did not send an SSH-2.0 banner on {addr} within {READY_TIMEOUT:?}.\n\
                 --- sshd log ---\n{}--- end ---",
                child.id(),
                read_log(log_path)
            );
        }
        thread::sleep(Duration::from_millis(20));
    }
}

/// Kills the listener and all its descendants, and reaps the listener.
fn kill_tree(child: &mut Child) {
    // Freeze the listener so it forks nothing new, kill its descendants
    // while the ppid chains are intact, then kill it.
    signal(&[child.id()], "STOP");
    kill_descendants(child.id());
    let _ = child.kill();
    let _ = child.wait();
}

fn read_log(path: &Path) -> String {
    String::from_utf8_lossy(&fs::read(path).unwrap_or_default()).into_owned()
}

fn split_extra(extra: &str) -> (String, String) {
    let mut head = String::new();
    let mut tail = String::new();
    let mut in_match = false;
    for line in extra.lines() {
        let first = line.split_whitespace().next().unwrap_or("");
        if first.eq_ignore_ascii_case("match") {
            in_match = true;
        }
        let out = if in_match { &mut tail } else { &mut head };
        out.push_str(line);
        out.push('\n');
    }
    (head, tail)
}

fn is_root() -> bool {
    fs::metadata("/proc/self")
        .map(|m| m.uid() == 0)
        .unwrap_or(false)
}

fn current_user() -> String {
    if let Ok(out) = Command::new("id").arg("-un").stderr(Stdio::null()).output() {
        let name = String::from_utf8_lossy(&out.stdout).trim().to_string();
        if out.status.success() && !name.is_empty() {
            return name;
        }
    }
    std::env::var("USER").expect("cannot tell the current user: `id -un` failed and $USER unset")
}

fn free_port() -> u16 {
    TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .and_then(|l| l.local_addr())
        .expect("bind 127.0.0.1:0")
        .port()
}

fn banner_ok(addr: SocketAddr) -> bool {
    let Ok(mut s) = TcpStream::connect_timeout(&addr, Duration::from_secs(1)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
    let mut buf = Vec::new();
    let mut byte = [0u8; 1];
    while buf.len() < 255 {
        match s.read(&mut byte) {
            Ok(1) if byte[0] == b'\n' => break,
            Ok(1) => buf.push(byte[0]),
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            _ => return false,
        }
    }
    buf.starts_with(b"SSH-2.0")
}

/// `sshd`, or `chroot ROOT /usr/sbin/sshd` for a server in another tree.
fn sshd_command(root: Option<&Path>) -> Command {
    match root {
        Some(root) => {
            let mut c = Command::new("chroot");
            c.arg(root).arg(SSHD);
            c
        }
        None => Command::new(SSHD),
    }
}

/// `path` as seen from inside `root` (unchanged without one).
fn inside(root: Option<&Path>, path: &Path) -> PathBuf {
    match root {
        Some(root) => Path::new("/").join(
            path.strip_prefix(root)
                .unwrap_or_else(|_| panic!("{} lies outside {}", path.display(), root.display())),
        ),
        None => path.to_path_buf(),
    }
}

fn check_config(root: Option<&Path>, config: &Path) {
    let out = sshd_command(root)
        .arg("-t")
        .arg("-f")
        .arg(inside(root, config))
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("run {SSHD} -t: {e}; {HOW_TO_RUN}"));
    if !out.status.success() {
        panic!(
            "sshd rejected the test config ({}):\n{}{}\n--- config ---\n{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            fs::read_to_string(config).unwrap_or_default()
        );
    }
}

fn keygen(args: &[&str], path: &Path) {
    let out = Command::new(SSH_KEYGEN)
        .arg("-q")
        .args(args)
        .arg("-f")
        .arg(path)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("run {SSH_KEYGEN}: {e}; {HOW_TO_RUN}"));
    if !out.status.success() {
        panic!(
            "ssh-keygen {args:?} -f {} failed ({}): {}",
            path.display(),
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

fn keygen_ed25519(path: &Path, passphrase: &str, comment: &str) {
    keygen(&["-t", "ed25519", "-N", passphrase, "-C", comment], path);
}

/// `TYPE BASE64` of a `.pub` file (comment dropped).
fn read_pub(path: &Path) -> String {
    let s = fs::read_to_string(path).expect("read public key");
    s.split_whitespace().take(2).collect::<Vec<_>>().join(" ")
}

fn write_file(path: &Path, data: &[u8], mode: u32) {
    let _ = fs::remove_file(path);
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .unwrap_or_else(|e| panic!("create {}: {e}", path.display()));
    f.write_all(data).expect("write file");
}

/// An RSA key pair generated once per test process (RSA 3072 keygen is slow).
struct KeyPair {
    private: Vec<u8>,
    public: Vec<u8>,
}

impl KeyPair {
    fn write_to(&self, path: &Path) {
        write_file(path, &self.private, 0o600);
        let mut pub_path = path.as_os_str().to_owned();
        pub_path.push(".pub");
        write_file(Path::new(&pub_path), &self.public, 0o644);
    }
}

static RSA_HOST: OnceLock<KeyPair> = OnceLock::new();
static RSA_USER: OnceLock<KeyPair> = OnceLock::new();

fn cached_rsa(cell: &'static OnceLock<KeyPair>, comment: &str) -> &'static KeyPair {
    cell.get_or_init(|| {
        let tmp = tempfile::tempdir().expect("temp dir for RSA keygen");
        let path = tmp.path().join("key");
        keygen(
            &[
                "-t", "rsa", "-b", "3072", "-m", "PEM", "-N", "", "-C", comment,
            ],
            &path,
        );
        KeyPair {
            private: fs::read(&path).expect("read RSA key"),
            public: fs::read(tmp.path().join("key.pub")).expect("read RSA pub key"),
        }
    })
}

/// Live (non-zombie) descendants of `root` (itself not included), from
/// /proc/*/stat ppid chains.
pub fn descendants(root: u32) -> Vec<u32> {
    let mut procs = Vec::new();
    let Ok(entries) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    for e in entries.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        let Ok(stat) = fs::read_to_string(e.path().join("stat")) else {
            continue;
        };
        // "pid (comm) state ppid ..."; comm may contain spaces and parens.
        let Some(rest) = stat.rfind(')').map(|i| &stat[i + 1..]) else {
            continue;
        };
        let mut f = rest.split_whitespace();
        let state = f.next().unwrap_or("");
        let Some(ppid) = f.next().and_then(|p| p.parse::<u32>().ok()) else {
            continue;
        };
        procs.push((pid, ppid, state == "Z" || state == "X"));
    }
    let mut out = Vec::new();
    let mut frontier = vec![root];
    while let Some(p) = frontier.pop() {
        for &(pid, ppid, dead) in &procs {
            if ppid == p && pid != root && !out.contains(&pid) {
                frontier.push(pid);
                if !dead {
                    out.push(pid);
                }
            }
        }
    }
    out
}

fn signal(pids: &[u32], sig: &str) {
    if pids.is_empty() {
        return;
    }
    // The shell's builtin kill: no procps needed.
    let _ = Command::new("sh")
        .arg("-c")
        .arg(format!("kill -{sig} \"$@\"", sig = sig))
        .arg("sh")
        .args(pids.iter().map(|p| p.to_string()))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
}

fn kill_descendants(root: u32) {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let pids = descendants(root);
        if pids.is_empty() || Instant::now() > deadline {
            return;
        }
        signal(&pids, "KILL");
        thread::sleep(Duration::from_millis(10));
    }
}
