//! A hostile SFTP server behind a real sshd: [`EvilServer`] runs our
//! `uring-ssh-evil-sftp` (`tests/evil_sftp/`) as sshd's `sftp` subsystem
//! over a temporary directory, so that tests drive the whole client,
//! transport included, against replies that lie on purpose.
//!
//! ```text
//! let bin = Path::new(env!("CARGO_BIN_EXE_uring-ssh-evil-sftp"));
//! let server = EvilServer::start(bin, scenario::LINK_THEN_FILE, |_root| {});
//! let (_session, sftp) = server.sftp().await;
//! let dest = tempfile::tempdir().unwrap();
//! let report = bounded(
//!     "download_tree",
//!     sftp.download_tree("/evil", dest.path().join("evil"), &TransferOptions::default()),
//! )
//! .await;
//! server.assert_outside_untouched();
//! ```
//!
//! The server's root holds [`normal_tree`] under `/evil` (plus whatever
//! `root_setup` adds); the listing scenarios inject their entries into
//! READDIR replies of `/evil`. Every injected file serves [`PAYLOAD`], and
//! every hostile name or link points into [`EvilServer::outside`], an empty
//! directory that a correct client never writes to.
//!
//! Finding the binary: cargo builds it for uring-ssh's integration tests
//! and names it in `CARGO_BIN_EXE_uring-ssh-evil-sftp`, which those tests
//! pass to [`EvilServer::start`]. Another package of the workspace (`ussh`)
//! gets no such variable and cargo does not build it for that package's
//! tests: build it first (`cargo build [--release] --bin
//! uring-ssh-evil-sftp`), then take it from the profile directory, the
//! parent of the test executable's `deps/` directory:
//! `std::env::current_exe()?.parent()?.parent()?.join("uring-ssh-evil-sftp")`
//! (`target/<profile>/deps/<test>-<hash>` -> `target/<profile>/uring-ssh-evil-sftp`).

use std::future::Future;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use tempfile::TempDir;
use uring_ssh::Session;
use uring_ssh::sftp::Sftp;

use crate::sshd::Sshd;
use crate::util::connect;

/// What every injected file contains (the server's `PAYLOAD`).
pub const PAYLOAD: &[u8] = b"uring-ssh-evil-sftp payload\n";

/// How long [`bounded`] lets a hostile exchange run.
pub const BOUND: Duration = Duration::from_secs(120);

/// The scenarios, by the name the server takes, with what a correct
/// client must do against each. "The listing" is the READDIR replies of
/// `/evil`: its real entries ([`normal_tree`]) followed by injected ones.
/// `OUTSIDE` is [`EvilServer::outside`].
pub mod scenario {
    /// A plain, correct server: everything arrives intact.
    pub const NONE: &str = "none";
    /// The listing holds the file `OUTSIDE/abs-name`, an absolute name.
    /// Must refuse the name: nothing is written at that path (nor at
    /// `dest/OUTSIDE/abs-name`); the real files still arrive.
    pub const ABS_NAME: &str = "abs-name";
    /// The files `../../escape`, `..` and `.` (as regular files). Must
    /// refuse all three: nothing above the destination, no file `..`/`.`.
    pub const DOTDOT: &str = "dotdot";
    /// The files `sub/inner` (the real directory `sub` exists) and
    /// `nosub/inner`. Must refuse both names: no `sub/inner` written into
    /// the real `sub`, no directory `nosub` created.
    pub const SLASH_NAME: &str = "slash-name";
    /// The file `nul\0name`. Must refuse it (and not write it as `nul`).
    pub const NUL_NAME: &str = "nul-name";
    /// A file with an empty name. Must refuse it: it is not the directory.
    pub const EMPTY_NAME: &str = "empty-name";
    /// The file `dup` listed twice, and `both` as a file and as a
    /// directory (holding `inner`). Must report the duplicates (or keep the
    /// first) and never replace one kind by the other mid-transfer.
    pub const DUP_NAMES: &str = "dup-names";
    /// `dl` as a directory (holding `inner`), then as a symlink to
    /// `OUTSIDE` in the same reply. Must never write through the link:
    /// `OUTSIDE` stays empty whichever entry it keeps.
    pub const DIR_AND_LINK: &str = "dir-and-link";
    /// The symlink `root-link` -> `/`. May recreate it as a link
    /// (`LinkPolicy::Keep`; `Safe` skips it) but must never follow it.
    pub const LINK_TO_ROOT: &str = "link-to-root";
    /// The symlink `up` -> `../../..`: as `link-to-root`.
    pub const LINK_TO_PARENT: &str = "link-to-parent";
    /// The symlinks `a` -> `b` and `b` -> `a`. Must not loop: recreate (or
    /// skip) both and finish.
    pub const LINK_LOOP: &str = "link-loop";
    /// The symlink `x` -> `OUTSIDE`, then, in a later READDIR reply, the
    /// directory `x` holding `inner`. Must not write `x/inner` through the
    /// link it may have made: `OUTSIDE` stays empty.
    pub const LINK_THEN_FILE: &str = "link-then-file";
    /// 1,000,000 more files `m0000000`.. (100 per reply; none can be
    /// opened). Must stop at `TransferOptions::max_entries` with
    /// `LimitExceeded`, in bounded memory.
    pub const MILLION: &str = "million";
    /// The directory `deep`, each `deep` holding another, without end. Must
    /// stop at `TransferOptions::max_depth` with an error.
    pub const DEEP: &str = "deep";
    /// Each READ is first answered by a DATA reply (of [`super::PAYLOAD`])
    /// to an id never used. Must fail with a protocol error, never hand
    /// those bytes to a request, never hang.
    pub const UNKNOWN_ID: &str = "unknown-id";
    /// Each STAT is answered with a DATA packet. Must fail the call with a
    /// protocol error; the channel may stay usable.
    pub const WRONG_TYPE: &str = "wrong-type";
    /// The first request after init (after `limits@openssh.com`) gets a
    /// header claiming 2^32-1 bytes, then nothing more. Must fail at once
    /// (over its packet limit): no 4 GiB buffer, no waiting for the rest.
    pub const HUGE_LENGTH: &str = "huge-length";
    /// READ replies carry 4 KiB more than asked. Must fail the file with a
    /// protocol error; the extra bytes end up nowhere.
    pub const LONG_READ: &str = "long-read";
    /// The file `endless`: 1 MiB by its attributes, but READs return data
    /// at any offset, never EOF. A download must stop (at
    /// `TransferOptions::max_file_size` or the size it was promised).
    pub const ENDLESS_FILE: &str = "endless-file";
    /// `limits@openssh.com` of 2^64-1 for packet, read, write and open
    /// handles. Must keep its own caps (255 KiB requests, its open-file
    /// count) and work normally.
    pub const ABSURD_LIMITS: &str = "absurd-limits";
    /// Limits of 0, the extension's "no limit": must fall back to its
    /// defaults and work normally.
    pub const ABSURD_LIMITS_ZERO: &str = "absurd-limits-zero";
    /// Limits of 1: must still work (tiny requests, one open file) or
    /// refuse the server cleanly; never divide by zero or stall.
    pub const ABSURD_LIMITS_ONE: &str = "absurd-limits-one";
    /// Each file OPEN returns a 256 KiB handle (the draft allows 256
    /// bytes). Must refuse the handle and fail the open cleanly.
    pub const HUGE_HANDLE: &str = "huge-handle";
    /// The first READDIR of `/evil` gets a NAME whose count is 2^32-1,
    /// followed by one entry. Must fail the listing with a protocol error
    /// without reserving room for the count.
    pub const HUGE_NAME_COUNT: &str = "huge-name-count";
    /// A file whose name is 1 MiB long (in a NAME reply of about 2 MiB).
    /// Must refuse that name, or the whole listing, cleanly: no crash, no
    /// file written under any part of the name.
    pub const LONG_NAME: &str = "long-name";

    /// Every scenario.
    pub const ALL: &[&str] = &[
        NONE,
        ABS_NAME,
        DOTDOT,
        SLASH_NAME,
        NUL_NAME,
        EMPTY_NAME,
        DUP_NAMES,
        DIR_AND_LINK,
        LINK_TO_ROOT,
        LINK_TO_PARENT,
        LINK_LOOP,
        LINK_THEN_FILE,
        MILLION,
        DEEP,
        UNKNOWN_ID,
        WRONG_TYPE,
        HUGE_LENGTH,
        LONG_READ,
        ENDLESS_FILE,
        ABSURD_LIMITS,
        ABSURD_LIMITS_ZERO,
        ABSURD_LIMITS_ONE,
        HUGE_HANDLE,
        HUGE_NAME_COUNT,
        LONG_NAME,
    ];
}

/// The real files under the server's `/evil`: path below `/evil` and
/// contents. Besides them `/evil` holds the empty directory `empty`.
pub fn normal_tree() -> Vec<(&'static str, Vec<u8>)> {
    let data: Vec<u8> = (0..3000u32).map(|i| (i * 31 + 7) as u8).collect();
    vec![
        ("hello.txt", b"hello, world\n".to_vec()),
        ("data.bin", data),
        ("sub/inner.txt", b"inner\n".to_vec()),
        ("sub/deeper/leaf.txt", b"leaf\n".to_vec()),
    ]
}

/// Asserts that `dest` (a download of `/evil`) holds every file of
/// [`normal_tree`] byte for byte.
pub fn assert_normal_tree(dest: &Path) {
    for (rel, want) in normal_tree() {
        let p = dest.join(rel);
        let got = std::fs::read(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
        assert!(got == want, "{}: wrong contents", p.display());
    }
}

/// Runs `f`, panicking if it takes longer than [`BOUND`]: a hostile
/// server must never make the client hang.
pub async fn bounded<F: Future>(what: &str, f: F) -> F::Output {
    match tokio::time::timeout(BOUND, f).await {
        Ok(v) => v,
        Err(_) => panic!("{what} still running after {BOUND:?}"),
    }
}

/// An sshd whose `sftp` subsystem is `uring-ssh-evil-sftp` in one scenario.
/// Everything is removed and stopped on drop.
pub struct EvilServer {
    /// The sshd (its log, config and keys).
    pub sshd: Sshd,
    /// Holds the server's root (`root/`) and its log.
    base: TempDir,
    /// What hostile names and links point into.
    outside: TempDir,
}

impl EvilServer {
    /// Creates a root with [`normal_tree`], lets `root_setup` add to it
    /// (it gets the root: `/evil` is `root.join("evil")`), and starts an
    /// sshd on 127.0.0.1 serving it with `scenario` (see [`scenario`]),
    /// running the server binary `bin` (see the module's documentation).
    pub fn start(bin: &Path, scenario: &str, root_setup: impl FnOnce(&Path)) -> EvilServer {
        let list = Command::new(bin)
            .arg("--list")
            .output()
            .unwrap_or_else(|e| panic!("run {}: {e}", bin.display()));
        let known = String::from_utf8_lossy(&list.stdout).into_owned();
        assert!(
            known.lines().any(|l| l == scenario),
            "unknown scenario {scenario:?}; the server knows:\n{known}"
        );

        let base = tempfile::Builder::new()
            .prefix("uring-ssh-evil-")
            .tempdir()
            .expect("temp dir for the evil server");
        let outside = tempfile::Builder::new()
            .prefix("uring-ssh-evil-outside-")
            .tempdir()
            .expect("temp dir outside the destination");
        let root = base.path().join("root");
        let evil = root.join("evil");
        for (rel, data) in normal_tree() {
            let p = evil.join(rel);
            std::fs::create_dir_all(p.parent().unwrap()).expect("create /evil");
            std::fs::write(&p, data).expect("write /evil file");
        }
        std::fs::create_dir_all(evil.join("empty")).expect("create /evil/empty");
        root_setup(&root);

        let log = base.path().join("evil-sftp.log");
        let command = [
            bin,
            Path::new("--root"),
            &root,
            Path::new("--scenario"),
            Path::new(scenario),
            Path::new("--target"),
            outside.path(),
            Path::new("--log"),
            &log,
        ]
        .iter()
        .map(|p| shell_word(p))
        .collect::<Vec<_>>()
        .join(" ");
        let sshd = Sshd::builder().subsystem_sftp(&command).start();
        EvilServer {
            sshd,
            base,
            outside,
        }
    }

    /// The server's root directory (`/` of the SFTP paths).
    pub fn root(&self) -> PathBuf {
        self.base.path().join("root")
    }

    /// The directory hostile names and links point into; it starts empty.
    pub fn outside(&self) -> &Path {
        self.outside.path()
    }

    /// The server's log: one line per request (`TYPE id first-argument`),
    /// and one `evil: ...` line per deliberate misbehaviour.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.base.path().join("evil-sftp.log")).unwrap_or_default()
    }

    /// A session to the server and an SFTP client on it.
    pub async fn sftp(&self) -> (Session, Sftp) {
        let s = connect(&self.sshd).await;
        let sftp = s.sftp().await.expect("sftp on the evil server");
        (s, sftp)
    }

    /// Asserts that nothing was written into [`EvilServer::outside`].
    pub fn assert_outside_untouched(&self) {
        let found: Vec<_> = std::fs::read_dir(self.outside())
            .expect("read the outside directory")
            .map(|e| e.map(|e| e.file_name()))
            .collect();
        assert!(
            found.is_empty(),
            "the client wrote outside its destination: {found:?} in {}",
            self.outside().display()
        );
    }
}

impl Drop for EvilServer {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let log = self.log();
            let lines: Vec<&str> = log.lines().collect();
            let tail = &lines[lines.len().saturating_sub(40)..];
            eprintln!("--- evil sftp log (last lines) ---\n{}", tail.join("\n"));
        }
    }
}

/// `p` as one word of the `Subsystem` line (sshd_config and `sh -c` both
/// split on spaces, so only plain characters are allowed).
fn shell_word(p: &Path) -> String {
    let s = p.to_str().expect("a UTF-8 path");
    assert!(
        s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "/._-+".contains(c)),
        "{s:?} cannot go into the Subsystem line unquoted"
    );
    s.to_string()
}
