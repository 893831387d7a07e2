//! The SFTP client against `uring-ssh-evil-sftp`, a server of ours that a
//! real sshd runs as its `sftp` subsystem and that lies on purpose in the
//! scenario asked for (see `testkit/src/evil.rs`).
//!
//! Every hostile tree download goes into a [`Sandbox`]: the destination
//! `T/dest/evil` stands beside sentinels (`T/dest/sentinel.txt`,
//! `T/dest/other-host/…`, whose names are those a stray write would use)
//! and, before the download, symbolic links to those sentinels are
//! planted inside it (`planted`, `planted-file`, and the names the
//! scenario lists wherever one can collide). After the download:
//!
//! * everything under `T` but the destination is as it was: the same
//!   entries, contents, modes and modification times (a file created and
//!   removed again beside the destination still changes its directory's
//!   time);
//! * the server's `OUTSIDE` directory is empty;
//! * the destination holds exactly the entries expected: the real files
//!   byte for byte, planted links not replaced by a download still in
//!   place, and no temporary file left behind.
//!
//! The memory-heavy scenarios each run alone in a process of their own
//! (see [`alone_in_own_process`]) and bound that process's peak RSS growth.

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::{MetadataExt, symlink};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use tempfile::TempDir;
use uring_ssh::Error;
use uring_ssh::sftp::{LinkPolicy, Sftp, TransferOptions, TransferReport, status};
use uring_ssh_testkit::evil::{
    EvilServer, PAYLOAD, assert_normal_tree, bounded, normal_tree, scenario,
};
use uring_ssh_testkit::util::{alone_in_own_process, proc_status};

const MIB: u64 = 1024 * 1024;

/// The hostile server's binary, as cargo built it for this package's tests.
fn evil_sftp() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_uring-ssh-evil-sftp"))
}

/// How fast a failure that needs no waiting must come back.
const AT_ONCE: Duration = Duration::from_secs(10);

// ---------------------------------------------------------------------
// What a directory holds.

/// One entry of a directory tree, as compared.
#[derive(Clone, PartialEq, Eq)]
enum Node {
    File {
        len: u64,
        digest: u64,
    },
    Dir,
    Link(PathBuf),
    /// A FIFO, socket or device: never expected anywhere.
    Other,
}

impl Node {
    fn file(data: &[u8]) -> Node {
        // FNV-1a: enough to tell contents apart in a comparison.
        let digest = data.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| {
            (h ^ b as u64).wrapping_mul(0x0100_0000_01b3)
        });
        Node::File {
            len: data.len() as u64,
            digest,
        }
    }

    fn link(target: impl Into<PathBuf>) -> Node {
        Node::Link(target.into())
    }

    fn read(path: &Path) -> Node {
        let m = fs::symlink_metadata(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let t = m.file_type();
        if t.is_symlink() {
            Node::Link(fs::read_link(path).expect("read link"))
        } else if t.is_dir() {
            Node::Dir
        } else if t.is_file() {
            Node::file(&fs::read(path).expect("read file"))
        } else {
            Node::Other
        }
    }
}

impl std::fmt::Debug for Node {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            n if *n == Node::file(PAYLOAD) => write!(f, "file(PAYLOAD)"),
            Node::File { len, digest } => write!(f, "file({len} bytes, {digest:016x})"),
            Node::Dir => write!(f, "dir"),
            Node::Link(t) => write!(f, "link -> {}", t.display()),
            Node::Other => write!(f, "special file"),
        }
    }
}

/// Every entry below `dir` (links not followed), by relative path.
fn tree(dir: &Path) -> BTreeMap<String, Node> {
    fn walk(base: &Path, dir: &Path, out: &mut BTreeMap<String, Node>) {
        for e in fs::read_dir(dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
            let p = e.expect("directory entry").path();
            let rel = p.strip_prefix(base).unwrap().to_string_lossy().into_owned();
            let node = Node::read(&p);
            if node == Node::Dir {
                walk(base, &p, out);
            }
            out.insert(rel, node);
        }
    }
    let mut out = BTreeMap::new();
    walk(dir, dir, &mut out);
    out
}

/// The entries of [`normal_tree`] (files and directories) below `/evil`.
fn normal_entries() -> BTreeMap<String, Node> {
    let mut m = BTreeMap::new();
    for (rel, data) in normal_tree() {
        m.insert(rel.to_string(), Node::file(&data));
        let mut parent = Path::new(rel).parent();
        while let Some(d) = parent.filter(|d| !d.as_os_str().is_empty()) {
            m.insert(d.to_string_lossy().into_owned(), Node::Dir);
            parent = d.parent();
        }
    }
    m.insert("empty".into(), Node::Dir);
    m
}

/// The directories of [`normal_entries`].
fn normal_dirs() -> BTreeMap<String, Node> {
    normal_entries()
        .into_iter()
        .filter(|(_, n)| *n == Node::Dir)
        .collect()
}

/// What the snapshot keeps of an entry beside the destination.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Stamp {
    node: Node,
    mode: u32,
    mtime: (i64, i64),
}

// ---------------------------------------------------------------------
// The sandbox around a destination.

const SENTINEL: &[u8] = b"sentinel beside the destination\n";

/// What a link planted in the destination points at.
#[derive(Debug, Clone, Copy)]
enum To {
    /// `T/dest/other-host`, a directory holding `hello.txt`, `inner` and
    /// `sub/inner.txt` (the names a write through the link would use).
    OtherHost,
    /// `T/dest/sentinel.txt`.
    Sentinel,
}

/// A destination among sentinels, with links planted in it; see the
/// module's documentation.
struct Sandbox {
    tmp: TempDir,
    /// Planted links by name, with their targets.
    planted: BTreeMap<String, Node>,
    before: BTreeMap<PathBuf, Stamp>,
}

impl Sandbox {
    /// A sandbox with `planted -> other-host`, `planted-file ->
    /// sentinel.txt`, and a link for each of `collisions` (names the
    /// server lists).
    fn new(collisions: &[(&str, To)]) -> Sandbox {
        let tmp = tempfile::Builder::new()
            .prefix("uring-ssh-hostile-")
            .tempdir()
            .expect("temp dir");
        let parent = tmp.path().join("dest");
        let other = parent.join("other-host");
        fs::create_dir_all(other.join("sub")).unwrap();
        fs::write(parent.join("sentinel.txt"), SENTINEL).unwrap();
        fs::write(other.join("hello.txt"), b"other host's hello\n").unwrap();
        fs::write(other.join("inner"), b"other host's inner\n").unwrap();
        fs::write(other.join("sub/inner.txt"), b"other host's sub/inner.txt\n").unwrap();
        fs::create_dir(parent.join("evil")).unwrap();
        let mut sb = Sandbox {
            tmp,
            planted: BTreeMap::new(),
            before: BTreeMap::new(),
        };
        let mut links = vec![("planted", To::OtherHost), ("planted-file", To::Sentinel)];
        links.extend_from_slice(collisions);
        for (name, to) in links {
            let target = sb.target(to);
            symlink(&target, sb.dest().join(name)).unwrap();
            sb.planted.insert(name.to_string(), Node::link(target));
        }
        sb.before = sb.snapshot();
        sb
    }

    /// The destination, `T/dest/evil`.
    fn dest(&self) -> PathBuf {
        self.tmp.path().join("dest/evil")
    }

    fn target(&self, to: To) -> PathBuf {
        let parent = self.tmp.path().join("dest");
        match to {
            To::OtherHost => parent.join("other-host"),
            To::Sentinel => parent.join("sentinel.txt"),
        }
    }

    /// Everything under `T` but the destination.
    fn snapshot(&self) -> BTreeMap<PathBuf, Stamp> {
        fn walk(dir: &Path, skip: &Path, out: &mut BTreeMap<PathBuf, Stamp>) {
            for e in fs::read_dir(dir).unwrap() {
                let p = e.unwrap().path();
                if p == skip {
                    continue;
                }
                let m = fs::symlink_metadata(&p).unwrap();
                let node = Node::read(&p);
                if node == Node::Dir {
                    walk(&p, skip, out);
                }
                let stamp = Stamp {
                    node,
                    mode: m.mode(),
                    mtime: (m.mtime(), m.mtime_nsec()),
                };
                out.insert(p, stamp);
            }
        }
        let mut out = BTreeMap::new();
        let root = self.tmp.path();
        let m = fs::symlink_metadata(root).unwrap();
        out.insert(
            root.to_owned(),
            Stamp {
                node: Node::Dir,
                mode: m.mode(),
                mtime: (m.mtime(), m.mtime_nsec()),
            },
        );
        walk(root, &self.dest(), &mut out);
        out
    }

    /// The destination as expected: the planted links, the real tree if
    /// `normal`, then `extra` (which replaces entries of the same name).
    fn expect(&self, normal: bool, extra: &[(&str, Node)]) -> BTreeMap<String, Node> {
        let mut m = self.planted.clone();
        if normal {
            m.extend(normal_entries());
        }
        for (name, node) in extra {
            m.insert(name.to_string(), node.clone());
        }
        m
    }

    /// Nothing beside the destination changed, nothing went into the
    /// server's `OUTSIDE`, and the destination holds exactly `want`.
    fn check(&self, server: &EvilServer, want: &BTreeMap<String, Node>) {
        self.assert_sentinels_intact();
        server.assert_outside_untouched();
        let got = tree(&self.dest());
        assert!(
            got == *want,
            "the destination differs from what was expected\n got: {got:#?}\nwant: {want:#?}"
        );
    }

    fn assert_sentinels_intact(&self) {
        let after = self.snapshot();
        if after != self.before {
            let mut diff = String::new();
            for (p, s) in &after {
                match self.before.get(p) {
                    None => diff += &format!("  created {}: {s:?}\n", p.display()),
                    Some(b) if b != s => {
                        diff += &format!("  changed {}: {b:?} -> {s:?}\n", p.display())
                    }
                    _ => {}
                }
            }
            for p in self.before.keys().filter(|p| !after.contains_key(*p)) {
                diff += &format!("  removed {}\n", p.display());
            }
            panic!("the client wrote beside its destination:\n{diff}");
        }
    }
}

async fn download(sftp: &Sftp, sb: &Sandbox, opts: &TransferOptions) -> TransferReport {
    bounded(
        "download_tree",
        sftp.download_tree("/evil", sb.dest(), opts),
    )
    .await
}

fn opts(atomic: bool) -> TransferOptions {
    TransferOptions {
        atomic,
        ..Default::default()
    }
}

// ---------------------------------------------------------------------
// What a report says.

/// Every error of a report, one a line, for messages.
fn errors(r: &TransferReport) -> String {
    let files = r
        .failed()
        .map(|f| (&f.item.remote, f.result.as_ref().unwrap_err()));
    let others = r.other_errors.iter().map(|(p, e)| (p, e));
    files
        .chain(others)
        .map(|(p, e)| format!("  {}: {e:?}\n", p.display()))
        .collect()
}

/// Checks that the report's refused names are exactly `want` (escaped
/// name, reason), each naming `/evil` and showing its escaped name; returns
/// the report's other non-file errors.
fn assert_refusals<'r>(r: &'r TransferReport, want: &[(&str, &str)]) -> Vec<&'r (PathBuf, Error)> {
    let mut got = Vec::new();
    let mut rest = Vec::new();
    for entry in &r.other_errors {
        match &entry.1 {
            e @ Error::UnsafeName {
                name,
                listed_in,
                reason,
            } => {
                assert_eq!(listed_in.trim_end_matches('/'), "/evil", "{e}");
                let shown = e.to_string();
                assert!(shown.contains(&format!("\"{name}\"")), "{shown}");
                got.push((name.clone(), *reason));
            }
            _ => rest.push(entry),
        }
    }
    got.sort();
    let mut want: Vec<(String, &str)> = want.iter().map(|(n, r)| (n.to_string(), *r)).collect();
    want.sort();
    assert_eq!(got, want, "refused names; every error:\n{}", errors(r));
    rest
}

/// The report moved exactly the files of [`normal_tree`] plus `extra`
/// (remote paths) and nothing failed.
fn assert_files_ok(r: &TransferReport, extra: &[&str]) {
    assert!(r.failed().next().is_none(), "files failed:\n{}", errors(r));
    let mut got: Vec<String> = r
        .files
        .iter()
        .map(|f| f.item.remote.to_string_lossy().into_owned())
        .collect();
    got.sort();
    let mut want: Vec<String> = normal_tree()
        .iter()
        .map(|(rel, _)| format!("/evil/{rel}"))
        .chain(extra.iter().map(|s| s.to_string()))
        .collect();
    want.sort();
    assert_eq!(got, want);
}

/// Request lines of `kind` (`READ`, `READDIR`, …) in the server's log.
fn requests(log: &str, kind: &str) -> usize {
    let prefix = format!("{kind} ");
    log.lines().filter(|l| l.starts_with(&prefix)).count()
}

// ---------------------------------------------------------------------
// Memory.

// Peaks are measured with the test alone in its own process
// (`alone_in_own_process`): the tests of one binary share a process, and
// the kernel keeps one high-water mark (`VmHWM`) per process.

/// Peak RSS growth of this process from the moment it is made.
struct Peak {
    base: u64,
}

impl Peak {
    fn start() -> Peak {
        Peak {
            base: proc_status("VmRSS"),
        }
    }

    /// Asserts that the growth stayed under `bound` (MiB); returns it.
    fn assert_under(&self, what: &str, bound: u64) -> u64 {
        let growth = proc_status("VmHWM").saturating_sub(self.base);
        eprintln!(
            "{what}: peak RSS growth {:.1} MiB (bound {bound} MiB)",
            growth as f64 / MIB as f64
        );
        assert!(
            growth < bound * MIB,
            "{what}: peak RSS grew by {:.1} MiB, over the bound of {bound} MiB",
            growth as f64 / MIB as f64
        );
        growth
    }
}

// ---------------------------------------------------------------------
// The benign server.

/// The benign scenario serves the real tree: the whole client path works
/// against the server, and a tree download arrives intact.
#[tokio::test(flavor = "current_thread")]
async fn benign_server_serves_a_tree_intact() {
    let server = EvilServer::start(evil_sftp(), scenario::NONE, |_| {});
    let (_session, sftp) = server.sftp().await;
    assert_eq!(sftp.version(), 3);
    let ext = sftp.extensions();
    assert!(ext.limits && ext.posix_rename && ext.fsync, "{ext:?}");

    let dest = tempfile::tempdir().expect("tempdir");
    let local = dest.path().join("evil");
    let report = bounded(
        "download_tree",
        sftp.download_tree("/evil", &local, &TransferOptions::default()),
    )
    .await;
    assert!(
        report.is_complete(),
        "{:?} {:?}",
        report.failed().next(),
        report.other_errors
    );
    assert_eq!(report.files.len(), normal_tree().len());
    let total: usize = normal_tree().iter().map(|(_, d)| d.len()).sum();
    assert_eq!(report.bytes(), total as u64);
    assert_normal_tree(&local);
    assert!(local.join("empty").is_dir());

    let log = server.log();
    assert!(log.starts_with("start, scenario none"), "{log}");
    assert!(log.contains("READDIR") && log.contains("READ "), "{log}");
    assert!(!log.contains("evil:"), "{log}");
    server.assert_outside_untouched();
}

// ---------------------------------------------------------------------
// Names.

/// Downloads `/evil` twice into fresh sandboxes (writing in place, where a
/// name that got through would be opened as given, then atomically) with
/// `collisions` planted: exactly `want` is refused, the real files arrive,
/// the planted links stay, nothing lands anywhere else.
async fn refused_names(server: &EvilServer, collisions: &[(&str, To)], want: &[(&str, &str)]) {
    let (_session, sftp) = server.sftp().await;
    for atomic in [false, true] {
        let sb = Sandbox::new(collisions);
        let report = download(&sftp, &sb, &opts(atomic)).await;
        // Where the bytes went first: an escape is the worst failure.
        sb.check(server, &sb.expect(true, &[]));
        let rest = assert_refusals(&report, want);
        assert!(rest.is_empty(), "atomic {atomic}:\n{}", errors(&report));
        assert_files_ok(&report, &[]);
        assert_normal_tree(&sb.dest());
    }
}

/// `abs-name`: the name `OUTSIDE/abs-name` is refused; nothing is written
/// there, nor at `dest/OUTSIDE/abs-name`.
#[tokio::test(flavor = "current_thread")]
async fn absolute_name_is_refused_and_nothing_is_written_there() {
    let server = EvilServer::start(evil_sftp(), scenario::ABS_NAME, |_| {});
    let name = format!("{}/abs-name", server.outside().display());
    refused_names(&server, &[], &[(&name, "holds a '/'")]).await;
}

/// `dotdot`: `../../escape` is refused (it would land in `T/`, beside the
/// sentinels); the extra `..` and `.` entries are skipped like every
/// listing's own.
#[tokio::test(flavor = "current_thread")]
async fn dotdot_names_are_refused_and_nothing_lands_above_the_destination() {
    let server = EvilServer::start(evil_sftp(), scenario::DOTDOT, |_| {});
    refused_names(&server, &[], &[("../../escape", "holds a '/'")]).await;
}

/// `slash-name`: `sub/inner` and `nosub/inner` are refused; with `nosub`
/// planted as a link to `other-host`, a client taking the name as a path
/// would write `other-host/inner`.
#[tokio::test(flavor = "current_thread")]
async fn names_with_a_slash_are_refused_even_past_a_planted_link() {
    let server = EvilServer::start(evil_sftp(), scenario::SLASH_NAME, |_| {});
    refused_names(
        &server,
        &[("nosub", To::OtherHost)],
        &[("sub/inner", "holds a '/'"), ("nosub/inner", "holds a '/'")],
    )
    .await;
}

/// `nul-name`: `nul\0name` is refused, not cut at the NUL: the link
/// planted at `nul` stays and its target is not written.
#[tokio::test(flavor = "current_thread")]
async fn name_with_a_nul_byte_is_refused_not_cut_short() {
    let server = EvilServer::start(evil_sftp(), scenario::NUL_NAME, |_| {});
    refused_names(
        &server,
        &[("nul", To::Sentinel)],
        &[("nul\\x00name", "holds a NUL byte")],
    )
    .await;
}

/// `empty-name`: the empty name is refused; it is not the directory.
#[tokio::test(flavor = "current_thread")]
async fn empty_name_is_refused() {
    let server = EvilServer::start(evil_sftp(), scenario::EMPTY_NAME, |_| {});
    refused_names(&server, &[], &[("", "empty name")]).await;
}

/// `dup-names`: the second `dup` and the directory `both` (listed after
/// the file `both`) are refused; the first of each is kept. With links
/// planted at both names, an atomic download renames over them; one in
/// place refuses to open through them.
#[tokio::test(flavor = "current_thread")]
async fn duplicate_names_keep_the_first_and_are_reported() {
    let server = EvilServer::start(evil_sftp(), scenario::DUP_NAMES, |_| {});
    let (_session, sftp) = server.sftp().await;
    let collisions = [("dup", To::Sentinel), ("both", To::OtherHost)];
    let refused = [
        ("dup", "listed more than once"),
        ("both", "listed more than once"),
    ];
    let extra = ["/evil/dup", "/evil/both"];

    let sb = Sandbox::new(&collisions);
    let report = download(&sftp, &sb, &opts(true)).await;
    assert!(assert_refusals(&report, &refused).is_empty());
    assert_files_ok(&report, &extra);
    let payload = Node::file(PAYLOAD);
    sb.check(
        &server,
        &sb.expect(true, &[("dup", payload.clone()), ("both", payload)]),
    );

    let sb = Sandbox::new(&collisions);
    let report = download(&sftp, &sb, &opts(false)).await;
    assert!(assert_refusals(&report, &refused).is_empty());
    let mut failed: Vec<_> = report
        .failed()
        .map(|f| match f.result.as_ref().unwrap_err() {
            Error::OutsideDestination { path, .. } => path.clone(),
            e => panic!("{}: {e:?}", f.item.remote.display()),
        })
        .collect();
    failed.sort();
    assert_eq!(failed, [sb.dest().join("both"), sb.dest().join("dup")]);
    assert_eq!(report.succeeded(), normal_tree().len());
    sb.check(&server, &sb.expect(true, &[]));
}

/// `dir-and-link`: `dl` is a directory, then a link to `OUTSIDE` in the
/// same reply. The directory is kept (with its file), the link refused as
/// a duplicate. With `dl` planted as a link to `other-host`, the directory
/// is refused by the kernel and nothing is written through it.
#[tokio::test(flavor = "current_thread")]
async fn directory_then_link_of_one_name_never_writes_through_a_link() {
    let server = EvilServer::start(evil_sftp(), scenario::DIR_AND_LINK, |_| {});
    let (_session, sftp) = server.sftp().await;
    let refused = [("dl", "listed more than once")];

    let sb = Sandbox::new(&[]);
    let report = download(&sftp, &sb, &opts(true)).await;
    assert!(assert_refusals(&report, &refused).is_empty());
    assert_files_ok(&report, &["/evil/dl/inner"]);
    sb.check(
        &server,
        &sb.expect(
            true,
            &[("dl", Node::Dir), ("dl/inner", Node::file(PAYLOAD))],
        ),
    );

    let sb = Sandbox::new(&[("dl", To::OtherHost)]);
    let report = download(&sftp, &sb, &opts(false)).await;
    let rest = assert_refusals(&report, &refused);
    assert!(
        matches!(&rest[..], [(_, Error::OutsideDestination { path, .. })] if *path == sb.dest().join("dl")),
        "{}",
        errors(&report)
    );
    assert_files_ok(&report, &[]);
    sb.check(&server, &sb.expect(true, &[]));
}

// ---------------------------------------------------------------------
// Links.

/// `link-to-root` and `link-to-parent`: kept as links by `Keep` (replacing
/// the link planted at that name, never following either), skipped by
/// `Safe` and `Skip` (the planted link stays).
#[tokio::test(flavor = "current_thread")]
async fn links_to_root_and_parent_are_kept_or_skipped_never_followed() {
    for (scen, name, target) in [
        (scenario::LINK_TO_ROOT, "root-link", "/"),
        (scenario::LINK_TO_PARENT, "up", "../../.."),
    ] {
        let server = EvilServer::start(evil_sftp(), scen, |_| {});
        let (_session, sftp) = server.sftp().await;
        for links in [LinkPolicy::Keep, LinkPolicy::Safe, LinkPolicy::Skip] {
            let sb = Sandbox::new(&[(name, To::OtherHost)]);
            let o = TransferOptions {
                links,
                ..Default::default()
            };
            let report = download(&sftp, &sb, &o).await;
            assert!(
                report.other_errors.is_empty(),
                "{scen} {links:?}:\n{}",
                errors(&report)
            );
            assert_files_ok(&report, &[]);
            let remote = PathBuf::from(format!("/evil/{name}"));
            let want = if links == LinkPolicy::Keep {
                assert!(
                    report.skipped_links.is_empty(),
                    "{:?}",
                    report.skipped_links
                );
                sb.expect(true, &[(name, Node::link(target))])
            } else {
                assert_eq!(report.skipped_links, [remote], "{scen} {links:?}");
                sb.expect(true, &[])
            };
            sb.check(&server, &want);
        }
    }
}

/// `link-loop`: `a -> b` and `b -> a` are recreated (both stay inside the
/// tree, so `Safe` keeps them too) or skipped, and the download finishes.
#[tokio::test(flavor = "current_thread")]
async fn link_loop_is_recreated_and_the_download_finishes() {
    let server = EvilServer::start(evil_sftp(), scenario::LINK_LOOP, |_| {});
    let (_session, sftp) = server.sftp().await;
    for links in [LinkPolicy::Keep, LinkPolicy::Safe, LinkPolicy::Skip] {
        let sb = Sandbox::new(&[("a", To::OtherHost)]);
        let o = TransferOptions {
            links,
            ..Default::default()
        };
        let report = download(&sftp, &sb, &o).await;
        assert!(
            report.other_errors.is_empty(),
            "{links:?}:\n{}",
            errors(&report)
        );
        assert_files_ok(&report, &[]);
        let want = if links == LinkPolicy::Skip {
            let mut skipped = report.skipped_links.clone();
            skipped.sort();
            assert_eq!(skipped, [Path::new("/evil/a"), Path::new("/evil/b")]);
            sb.expect(true, &[])
        } else {
            assert!(
                report.skipped_links.is_empty(),
                "{:?}",
                report.skipped_links
            );
            sb.expect(true, &[("a", Node::link("b")), ("b", Node::link("a"))])
        };
        sb.check(&server, &want);
    }
}

/// `link-then-file`: `x -> OUTSIDE`, then the directory `x` in a later
/// reply. The directory is refused as a duplicate: `x/inner` is never
/// written through the link (`Keep` makes it, over the planted one) nor
/// through the planted link (`Safe` skips the absolute link).
#[tokio::test(flavor = "current_thread")]
async fn link_then_directory_of_one_name_never_writes_through_a_link() {
    let server = EvilServer::start(evil_sftp(), scenario::LINK_THEN_FILE, |_| {});
    let (_session, sftp) = server.sftp().await;
    for links in [LinkPolicy::Keep, LinkPolicy::Safe] {
        let sb = Sandbox::new(&[("x", To::OtherHost)]);
        let o = TransferOptions {
            links,
            ..Default::default()
        };
        let report = download(&sftp, &sb, &o).await;
        let rest = assert_refusals(&report, &[("x", "listed more than once")]);
        assert!(rest.is_empty(), "{links:?}:\n{}", errors(&report));
        assert_files_ok(&report, &[]);
        let want = if links == LinkPolicy::Keep {
            assert!(report.skipped_links.is_empty());
            sb.expect(true, &[("x", Node::link(server.outside()))])
        } else {
            assert_eq!(report.skipped_links, [Path::new("/evil/x")]);
            sb.expect(true, &[])
        };
        sb.check(&server, &want);
    }
}

// ---------------------------------------------------------------------
// Limits.

/// `million` with `max_entries`: stops there with `LimitExceeded`, having
/// read about that many names of the listing (not the million), keeps the
/// real files found before the limit, and stays under `bound` MiB.
async fn million_entries(max_entries: u64, bound: u64) {
    let server = EvilServer::start(evil_sftp(), scenario::MILLION, |_| {});
    let (_session, sftp) = server.sftp().await;
    // The first generated name is planted: it must stay as it is.
    let sb = Sandbox::new(&[("m0000000", To::Sentinel)]);
    let o = TransferOptions {
        max_entries,
        ..Default::default()
    };
    let peak = Peak::start();
    let start = Instant::now();
    let report = download(&sftp, &sb, &o).await;
    let took = start.elapsed();
    let growth = peak.assert_under(&format!("million, max_entries {max_entries}"), bound);

    match &report.other_errors[..] {
        [(p, Error::LimitExceeded { what, limit })] => {
            assert_eq!(p, Path::new("/evil/"));
            assert_eq!(*what, "entries in the tree");
            assert_eq!(*limit, max_entries);
        }
        _ => panic!("{}", errors(&report)),
    }
    assert!(report.files.len() as u64 <= max_entries);
    for f in report.failed() {
        let name = f.item.remote.file_name().unwrap().to_string_lossy();
        assert!(name.starts_with('m'), "{}", f.item.remote.display());
        assert!(
            matches!(
                f.result,
                Err(Error::Sftp {
                    code: status::NO_SUCH_FILE,
                    ..
                })
            ),
            "{:?}",
            f.result
        );
    }
    // The two real files of `/evil` come first in the listing; `sub` is
    // made, but its listing may come after the limit.
    let dest = sb.dest();
    for (rel, data) in normal_tree() {
        match fs::read(dest.join(rel)) {
            Ok(got) => assert!(got == data, "{rel}: wrong contents"),
            Err(_) => assert!(rel.starts_with("sub/"), "{rel} is missing"),
        }
    }
    let got = tree(&dest);
    let normal = sb.expect(true, &[]);
    for (name, node) in &got {
        assert_eq!(normal.get(name), Some(node), "unexpected {name}: {node:?}");
    }
    sb.check(&server, &got);

    let readdirs = requests(&server.log(), "READDIR");
    eprintln!(
        "million, max_entries {max_entries}: {took:?}, {} files, {readdirs} READDIRs, \
         {:.1} MiB",
        report.files.len(),
        growth as f64 / MIB as f64
    );
    // 100 names a reply: the listing was left once the limit was reached.
    assert!(
        (readdirs as u64) < max_entries / 100 + 20,
        "{readdirs} READDIRs for a limit of {max_entries} entries"
    );
}

/// `million` with `max_entries` 20,000: peak RSS growth under 32 MiB
/// (some 9 MiB measured: the report keeps one outcome per file, the
/// listing itself is never held; holding the million names would take
/// well over 100 MiB).
#[tokio::test(flavor = "current_thread")]
async fn million_entries_stop_at_max_entries_in_bounded_memory() {
    if !alone_in_own_process("million_entries_stop_at_max_entries_in_bounded_memory") {
        return;
    }
    million_entries(20_000, 32).await;
}

/// `million` with the default `max_entries` (1,000,000, which the listing
/// exceeds by its real entries): the report then keeps a million failed
/// outcomes, some 400 bytes each; peak RSS growth under 640 MiB.
#[tokio::test(flavor = "current_thread")]
async fn million_entries_stop_at_the_default_limit_in_bounded_memory() {
    if !alone_in_own_process("million_entries_stop_at_the_default_limit_in_bounded_memory") {
        return;
    }
    million_entries(TransferOptions::default().max_entries, 640).await;
}

/// `deep`: the endless nesting stops at the default `max_depth` (256) with
/// `LimitExceeded`, after making exactly 256 levels; with `deep` planted as
/// a link, the kernel refuses the first level and nothing is listed below.
#[tokio::test(flavor = "current_thread")]
async fn endless_nesting_stops_at_max_depth() {
    let server = EvilServer::start(evil_sftp(), scenario::DEEP, |_| {});
    let (_session, sftp) = server.sftp().await;
    let max = TransferOptions::default().max_depth;

    let sb = Sandbox::new(&[]);
    let report = download(&sftp, &sb, &opts(true)).await;
    let too_deep = format!("/evil{}", "/deep".repeat(max + 1));
    match &report.other_errors[..] {
        [(p, Error::LimitExceeded { what, limit })] => {
            assert_eq!(p, Path::new(&too_deep));
            assert_eq!(*what, "directory depth of the tree");
            assert_eq!(*limit, max as u64);
        }
        _ => panic!("{}", errors(&report)),
    }
    assert_files_ok(&report, &[]);
    let chain: Vec<String> = (1..=max).map(|n| vec!["deep"; n].join("/")).collect();
    let extra: Vec<(&str, Node)> = chain.iter().map(|p| (p.as_str(), Node::Dir)).collect();
    sb.check(&server, &sb.expect(true, &extra));

    let sb = Sandbox::new(&[("deep", To::OtherHost)]);
    let opendirs_before = requests(&server.log(), "OPENDIR");
    let report = download(&sftp, &sb, &opts(true)).await;
    assert!(
        matches!(&report.other_errors[..], [(_, Error::OutsideDestination { path, .. })] if *path == sb.dest().join("deep")),
        "{}",
        errors(&report)
    );
    assert_files_ok(&report, &[]);
    sb.check(&server, &sb.expect(true, &[]));
    // `/evil`, `sub`, `sub/deeper`, `empty`: `deep` was never listed.
    assert_eq!(requests(&server.log(), "OPENDIR") - opendirs_before, 4);
}

/// `endless-file` with `max_file_size` 8 MiB: the file fails with
/// `LimitExceeded` at 8 MiB (its temporary removed, the link planted at its
/// name kept), the real files arrive, a bounded number of READs was made,
/// and peak RSS growth stays under 16 MiB (at most 4 MiB of reads in
/// flight and one reply of at most 4 MiB being received).
#[tokio::test(flavor = "current_thread")]
async fn endless_file_stops_at_max_file_size_in_bounded_memory() {
    if !alone_in_own_process("endless_file_stops_at_max_file_size_in_bounded_memory") {
        return;
    }
    const MAX: u64 = 8 * MIB;
    let server = EvilServer::start(evil_sftp(), scenario::ENDLESS_FILE, |_| {});
    let (_session, sftp) = server.sftp().await;
    let sb = Sandbox::new(&[("endless", To::Sentinel)]);
    let o = TransferOptions {
        max_file_size: Some(MAX),
        ..Default::default()
    };
    let peak = Peak::start();
    let report = download(&sftp, &sb, &o).await;
    peak.assert_under("endless-file, max_file_size 8 MiB", 16);

    assert!(report.other_errors.is_empty(), "{}", errors(&report));
    let failed: Vec<_> = report.failed().collect();
    match &failed[..] {
        [f] => {
            assert_eq!(f.item.remote, Path::new("/evil/endless"));
            assert!(
                matches!(
                    f.result,
                    Err(Error::LimitExceeded {
                        what: "a downloaded file's size",
                        limit: MAX
                    })
                ),
                "{:?}",
                f.result
            );
            assert!(f.bytes_acknowledged <= MAX, "{}", f.bytes_acknowledged);
        }
        _ => panic!("{}", errors(&report)),
    }
    assert_eq!(report.succeeded(), normal_tree().len());
    sb.check(&server, &sb.expect(true, &[]));
    let reads = requests(&server.log(), "READ");
    // 8 MiB in 255 KiB reads is 33, plus up to 4 MiB in flight (17) and
    // one for each real file.
    assert!(reads < 60, "{reads} READs for an 8 MiB limit");
    sftp.stat("/evil/hello.txt")
        .await
        .expect("the channel still works");
}

/// `endless-file` with the default options: the file may grow 64 MiB past
/// the 1 MiB it was announced with, then fails; the rest arrives.
#[tokio::test(flavor = "current_thread")]
async fn endless_file_stops_at_the_default_growth_bound() {
    if !alone_in_own_process("endless_file_stops_at_the_default_growth_bound") {
        return;
    }
    let server = EvilServer::start(evil_sftp(), scenario::ENDLESS_FILE, |_| {});
    let (_session, sftp) = server.sftp().await;
    let sb = Sandbox::new(&[]);
    let o = TransferOptions::default();
    let peak = Peak::start();
    let report = download(&sftp, &sb, &o).await;
    peak.assert_under("endless-file, default growth bound", 16);
    let failed: Vec<_> = report.failed().collect();
    match &failed[..] {
        [f] => {
            assert!(
                matches!(
                    f.result,
                    Err(Error::LimitExceeded {
                        what: "a downloaded file's growth past its announced size",
                        limit
                    }) if limit == o.max_growth
                ),
                "{:?}",
                f.result
            );
            assert!(f.bytes_acknowledged <= MIB + o.max_growth);
        }
        _ => panic!("{}", errors(&report)),
    }
    assert_eq!(report.succeeded(), normal_tree().len());
    sb.check(&server, &sb.expect(true, &[]));
}

// ---------------------------------------------------------------------
// Protocol.

/// `unknown-id`: the stray DATA before each READ's reply fails the channel
/// with `Protocol` for every request in flight and after; no file gets the
/// stray bytes (no file is written at all), the planted link at
/// `hello.txt` stays, no temporary is left.
#[tokio::test(flavor = "current_thread")]
async fn reply_to_an_unknown_id_fails_the_channel_and_its_bytes_go_nowhere() {
    let server = EvilServer::start(evil_sftp(), scenario::UNKNOWN_ID, |_| {});
    let stray = |e: &Error| matches!(e, Error::Protocol { protocol: uring_ssh::RemoteProtocol::Sftp, message: m } if m.contains("answers no request in flight"));
    for (atomic, collisions) in [(true, &[("hello.txt", To::Sentinel)][..]), (false, &[][..])] {
        // The first failure poisons the channel: a new one each time.
        let (_session, sftp) = server.sftp().await;
        let sb = Sandbox::new(collisions);
        let start = Instant::now();
        let report = download(&sftp, &sb, &opts(atomic)).await;
        let took = start.elapsed();
        assert!(took < AT_ONCE, "took {took:?} to give up on a dead channel");
        assert_eq!(report.succeeded(), 0, "{}", errors(&report));
        assert!(report.failed().next().is_some(), "no file was tried");
        for f in report.failed() {
            assert!(stray(f.result.as_ref().unwrap_err()), "{}", errors(&report));
        }
        for (_, e) in &report.other_errors {
            assert!(stray(e), "{}", errors(&report));
        }
        // Directories are made as they are found (how many, depends on
        // when the channel died); files and temporaries: none.
        let got = tree(&sb.dest());
        let dirs = normal_dirs();
        for (name, node) in &got {
            assert!(
                sb.planted.get(name) == Some(node) || dirs.get(name) == Some(node),
                "atomic {atomic}: unexpected {name}: {node:?}"
            );
        }
        sb.check(&server, &got);
        let e = bounded("stat", sftp.stat("/evil/hello.txt"))
            .await
            .unwrap_err();
        assert!(stray(&e), "{e:?}");
    }
    assert!(server.log().contains("evil: DATA to an unknown id"));
}

/// `wrong-type`: a DATA reply to STAT fails that call with `Protocol`; the
/// channel carries on and a tree download over it arrives intact.
#[tokio::test(flavor = "current_thread")]
async fn wrong_reply_type_fails_the_call_and_the_channel_stays_usable() {
    let server = EvilServer::start(evil_sftp(), scenario::WRONG_TYPE, |_| {});
    let (_session, sftp) = server.sftp().await;
    let e = bounded("stat", sftp.stat("/evil/hello.txt"))
        .await
        .unwrap_err();
    assert!(
        matches!(&e, Error::Protocol { protocol: uring_ssh::RemoteProtocol::Sftp, message: m } if m.contains("DATA")),
        "{e:?}"
    );
    let a = sftp.lstat("/evil/hello.txt").await.expect("lstat");
    assert_eq!(a.size, Some(13));
    let sb = Sandbox::new(&[("hello.txt", To::Sentinel)]);
    let report = download(&sftp, &sb, &opts(true)).await;
    assert!(report.is_complete(), "{}", errors(&report));
    assert_files_ok(&report, &[]);
    sb.check(&server, &sb.expect(true, &[]));
    assert!(server.log().contains("evil: DATA for a STAT"));
}

/// `huge-length`: a header claiming 2^32-1 bytes fails the channel at
/// once with `Protocol` naming the length; no buffer is made for it (peak
/// RSS growth under 32 MiB) and nothing is written.
#[tokio::test(flavor = "current_thread")]
async fn huge_packet_length_fails_at_once_in_bounded_memory() {
    if !alone_in_own_process("huge_packet_length_fails_at_once_in_bounded_memory") {
        return;
    }
    let server = EvilServer::start(evil_sftp(), scenario::HUGE_LENGTH, |_| {});
    let (_session, sftp) = server.sftp().await;
    let sb = Sandbox::new(&[]);
    let peak = Peak::start();
    let start = Instant::now();
    let report = download(&sftp, &sb, &opts(true)).await;
    let took = start.elapsed();
    peak.assert_under("huge-length", 32);
    assert!(took < AT_ONCE, "took {took:?}: waited for the 4 GiB packet");

    let huge = |e: &Error| matches!(e, Error::Protocol { protocol: uring_ssh::RemoteProtocol::Sftp, message: m } if m.contains("4294967295"));
    assert!(report.files.is_empty(), "{}", errors(&report));
    match &report.other_errors[..] {
        [(p, e)] => {
            assert_eq!(p, Path::new("/evil/"));
            assert!(huge(e), "{e:?}");
        }
        _ => panic!("{}", errors(&report)),
    }
    sb.check(&server, &sb.expect(false, &[]));
    let e = bounded("stat", sftp.stat("/evil")).await.unwrap_err();
    assert!(huge(&e), "{e:?}");
    assert!(
        server
            .log()
            .contains("evil: reply header claiming 2^32-1 bytes")
    );
}

/// `long-read`: READ replies longer than asked fail each file with
/// `Protocol`; the extra bytes (and the rest) end up nowhere: no file, no
/// temporary. Written in place, the link planted at `hello.txt` is refused
/// before any byte comes. The channel carries on.
#[tokio::test(flavor = "current_thread")]
async fn read_replies_longer_than_asked_fail_the_files_and_leave_nothing() {
    let server = EvilServer::start(evil_sftp(), scenario::LONG_READ, |_| {});
    let (_session, sftp) = server.sftp().await;
    for atomic in [true, false] {
        let sb = Sandbox::new(&[("hello.txt", To::Sentinel)]);
        let report = download(&sftp, &sb, &opts(atomic)).await;
        assert!(report.other_errors.is_empty(), "{}", errors(&report));
        assert_eq!(report.files.len(), normal_tree().len());
        for f in &report.files {
            let e = f.result.as_ref().expect_err("a long read was accepted");
            let planted = f.item.remote == Path::new("/evil/hello.txt") && !atomic;
            let ok = if planted {
                matches!(e, Error::OutsideDestination { path, .. } if *path == sb.dest().join("hello.txt"))
            } else {
                matches!(e, Error::Protocol { protocol: uring_ssh::RemoteProtocol::Sftp, message: m } if m.contains("longer than asked"))
            };
            assert!(ok, "atomic {atomic}: {}: {e:?}", f.item.remote.display());
        }
        sb.check(&server, &sb.expect(false, &dirs_as_extra()));
    }
    sftp.stat("/evil/hello.txt")
        .await
        .expect("the channel still works");
    assert!(server.log().contains("evil: READ reply longer than asked"));
}

/// The directories of the real tree, as `extra` entries of
/// [`Sandbox::expect`].
fn dirs_as_extra() -> Vec<(&'static str, Node)> {
    vec![
        ("empty", Node::Dir),
        ("sub", Node::Dir),
        ("sub/deeper", Node::Dir),
    ]
}

/// `absurd-limits`, `-zero` and `-one`: the announced limits are clamped
/// (2^64-1 to 4 MiB packets and 255 KiB requests; 0 means none announced;
/// 1 to 1 KiB requests and one open file), and the tree arrives.
#[tokio::test(flavor = "current_thread")]
async fn absurd_limits_are_clamped_and_the_tree_arrives() {
    for (scen, io, packet) in [
        (scenario::ABSURD_LIMITS, 255 * 1024, 4 * MIB),
        (scenario::ABSURD_LIMITS_ZERO, 32 * 1024, 0),
        (scenario::ABSURD_LIMITS_ONE, 1024, 2048),
    ] {
        let server = EvilServer::start(evil_sftp(), scen, |_| {});
        let (_session, sftp) = server.sftp().await;
        assert_eq!(sftp.io_sizes(), (io, io), "{scen}");
        assert_eq!(sftp.limits().max_packet_length, packet, "{scen}");
        let sb = Sandbox::new(&[("hello.txt", To::Sentinel)]);
        let report = download(&sftp, &sb, &opts(true)).await;
        assert!(report.is_complete(), "{scen}:\n{}", errors(&report));
        assert_files_ok(&report, &[]);
        sb.check(&server, &sb.expect(true, &[]));
        if scen == scenario::ABSURD_LIMITS_ONE {
            // 1 KiB reads: `data.bin` (3000 bytes) takes three.
            let reads = requests(&server.log(), "READ");
            assert!(reads >= normal_tree().len() + 2, "{reads} READs");
        }
    }
}

/// `huge-handle`: a 256 KiB handle fails its OPEN with `Protocol`; nothing
/// is created for the file, the channel carries on, peak RSS growth stays
/// under 32 MiB.
#[tokio::test(flavor = "current_thread")]
async fn huge_handle_is_refused_in_bounded_memory() {
    if !alone_in_own_process("huge_handle_is_refused_in_bounded_memory") {
        return;
    }
    let server = EvilServer::start(evil_sftp(), scenario::HUGE_HANDLE, |_| {});
    let (_session, sftp) = server.sftp().await;
    let sb = Sandbox::new(&[("hello.txt", To::Sentinel)]);
    let peak = Peak::start();
    let report = download(&sftp, &sb, &opts(false)).await;
    peak.assert_under("huge-handle", 32);

    assert!(report.other_errors.is_empty(), "{}", errors(&report));
    assert_eq!(report.files.len(), normal_tree().len());
    for f in &report.files {
        assert!(
            matches!(&f.result, Err(Error::Protocol { protocol: uring_ssh::RemoteProtocol::Sftp, message: m }) if m.contains("handle longer than 256 bytes")),
            "{}: {:?}",
            f.item.remote.display(),
            f.result
        );
    }
    sb.check(&server, &sb.expect(false, &dirs_as_extra()));
    sftp.stat("/evil/hello.txt")
        .await
        .expect("the channel still works");
    assert!(server.log().contains("evil: a 256 KiB handle"));
}

/// `huge-name-count`: a NAME claiming 2^32-1 entries fails the listing
/// with `Protocol` (nothing reserved for the count: peak RSS growth under
/// 32 MiB); nothing is written and the channel carries on.
#[tokio::test(flavor = "current_thread")]
async fn huge_name_count_fails_the_listing_in_bounded_memory() {
    if !alone_in_own_process("huge_name_count_fails_the_listing_in_bounded_memory") {
        return;
    }
    let server = EvilServer::start(evil_sftp(), scenario::HUGE_NAME_COUNT, |_| {});
    let (_session, sftp) = server.sftp().await;
    let sb = Sandbox::new(&[]);
    let peak = Peak::start();
    let report = download(&sftp, &sb, &opts(true)).await;
    peak.assert_under("huge-name-count", 32);

    assert!(report.files.is_empty(), "{}", errors(&report));
    match &report.other_errors[..] {
        [
            (
                p,
                Error::Protocol {
                    protocol: uring_ssh::RemoteProtocol::Sftp,
                    message: m,
                },
            ),
        ] => {
            assert_eq!(p, Path::new("/evil/"));
            assert!(m.contains("name count"), "{m}");
        }
        _ => panic!("{}", errors(&report)),
    }
    sb.check(&server, &sb.expect(false, &[]));
    sftp.stat("/evil/hello.txt")
        .await
        .expect("the channel still works");
    assert!(server.log().contains("evil: NAME count 2^32-1"));
}

/// `long-name`: a 1 MiB name fails the listing that carries it with
/// `LimitExceeded` (names are bounded at 4096 bytes; were the reply
/// accepted, the name would be refused as longer than 255 bytes). No file
/// under any part of the name, peak RSS growth under 32 MiB, and the
/// channel carries on.
#[tokio::test(flavor = "current_thread")]
async fn long_name_is_refused_in_bounded_memory() {
    if !alone_in_own_process("long_name_is_refused_in_bounded_memory") {
        return;
    }
    let server = EvilServer::start(evil_sftp(), scenario::LONG_NAME, |_| {});
    let (_session, sftp) = server.sftp().await;
    let sb = Sandbox::new(&[]);
    let peak = Peak::start();
    let report = download(&sftp, &sb, &opts(true)).await;
    peak.assert_under("long-name", 32);

    let limit = uring_ssh::sftp::codec::MAX_NAME_LEN as u64;
    let refused = [(
        format!("{}… ({} bytes)", "n".repeat(200), 1 << 20),
        "longer than 255 bytes",
    )];
    let refused: Vec<(&str, &str)> = refused.iter().map(|(n, r)| (n.as_str(), *r)).collect();
    match &report.other_errors[..] {
        // The whole listing refused by the codec.
        [(p, Error::LimitExceeded { what, limit: l })] => {
            assert_eq!(p, Path::new("/evil/"));
            assert!(what.contains("file name"), "{what}");
            assert_eq!(*l, limit);
            assert!(report.files.is_empty(), "{}", errors(&report));
            sb.check(&server, &sb.expect(false, &[]));
        }
        // Or only the name.
        _ => {
            assert!(assert_refusals(&report, &refused).is_empty());
            assert_files_ok(&report, &[]);
            sb.check(&server, &sb.expect(true, &[]));
        }
    }
    sftp.stat("/evil/hello.txt")
        .await
        .expect("the channel still works");
}
