//! `uring-ssh-evil-sftp`: a small SFTP version 3 server
//! (draft-ietf-secsh-filexfer-02 with OpenSSH's `limits@openssh.com`,
//! `posix-rename@openssh.com` and `fsync@openssh.com`) that a real sshd runs
//! as its `sftp` subsystem, so that tests drive the whole client path,
//! transport included, against a server that lies on purpose.
//!
//! ```text
//! uring-ssh-evil-sftp --root DIR [--scenario NAME] [--target DIR] [--log FILE]
//! uring-ssh-evil-sftp --list
//! ```
//!
//! Packets come on stdin and go to stdout: `uint32 length, byte type,
//! uint32 id, payload`. Without a scenario (`none`) it is a plain, correct
//! server of the real directory `--root`: every path, absolute or relative,
//! is taken below it (`..` stops at the root). A scenario then alters some
//! replies. `--target` is a directory outside the client's destination that
//! hostile names and links point into (default `/tmp/uring-ssh-evil-target`;
//! the server never touches it). `--log` appends one line per request and
//! one per deliberate misbehaviour. End of input ends the server (status 0);
//! malformed requests get a `BAD_MESSAGE` status, never a panic.
//!
//! # Scenarios
//!
//! The listing scenarios change only the READDIR replies of the directory
//! `/evil`: its real entries, then the injected ones. An injected file
//! opened by the path a client would form (`/evil/` + name, or the name
//! itself when absolute) serves [`PAYLOAD`], so a client that accepted the
//! name would write those bytes somewhere; an injected directory holds one
//! such file, `inner`.
//!
//! | name | what the server does |
//! |---|---|
//! | `none` | nothing unusual |
//! | `abs-name` | lists the file `TARGET/abs-name` (an absolute name) |
//! | `dotdot` | lists the files `../../escape`, `..` and `.` |
//! | `slash-name` | lists the files `sub/inner` (`sub` exists) and `nosub/inner` |
//! | `nul-name` | lists the file `nul\0name` |
//! | `empty-name` | lists a file with an empty name |
//! | `dup-names` | lists the file `dup` twice, and `both` as a file and as a directory |
//! | `dir-and-link` | lists `dl` as a directory, then as a symlink to `TARGET` |
//! | `link-to-root` | lists the symlink `root-link` -> `/` |
//! | `link-to-parent` | lists the symlink `up` -> `../../..` |
//! | `link-loop` | lists the symlinks `a` -> `b` and `b` -> `a` |
//! | `link-then-file` | lists the symlink `x` -> `TARGET`, then, in a later READDIR reply, the directory `x` |
//! | `million` | lists 1,000,000 more files `m0000000`.. (100 per reply; none can be opened) |
//! | `deep` | lists the directory `deep`; every `deep` holds one more `deep`, without end |
//! | `unknown-id` | answers each READ first with a DATA reply to an id never used (id + 2^24) |
//! | `wrong-type` | answers each STAT with a DATA reply |
//! | `huge-length` | answers the first request after the limits with a header claiming 2^32-1 bytes, then stays silent |
//! | `long-read` | answers each READ with 4 KiB more data than asked |
//! | `endless-file` | lists the file `endless`, 1 MiB by its attributes, whose READs return data at any offset and never EOF |
//! | `absurd-limits` | announces limits of 2^64-1 (packet, read, write, open handles) |
//! | `absurd-limits-zero` | announces limits of 0 (the extension's "no limit") |
//! | `absurd-limits-one` | announces limits of 1 |
//! | `huge-handle` | answers each file OPEN with a 256 KiB handle (the draft allows 256 bytes) |
//! | `huge-name-count` | answers the first READDIR of `/evil` with a NAME whose count is 2^32-1, followed by one entry |
//! | `long-name` | lists a file whose name is 1 MiB long |
//!
//! What a correct client must do against each is written beside the
//! scenario names in the tests' helper (`testkit/src/evil.rs`).

mod wire;

use std::collections::VecDeque;
use std::ffi::{CString, OsStr};
use std::fs::{self, File, FileTimes, OpenOptions};
use std::io::{self, BufWriter, Read, Write};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::fs::{DirBuilderExt, FileExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, UNIX_EPOCH};

use wire::{Attrs, Entry, Packet, Reader, Reply, S_IFDIR, S_IFLNK, S_IFREG, SetAttrs, fxp, st};

/// What every injected file contains.
const PAYLOAD: &[u8] = b"uring-ssh-evil-sftp payload\n";
/// Names per READDIR reply (as OpenSSH's sftp-server).
const BATCH: usize = 100;
/// The longest request accepted; a longer one ends the server.
const MAX_REQUEST: usize = 8 << 20;
/// The most data one READ returns (the announced `max_read_length`).
const MAX_READ: usize = 255 * 1024;
/// Symbolic links followed in one path before giving up.
const MAX_HOPS: usize = 16;
const MILLION: u32 = 1_000_000;
const ENDLESS_SIZE: u64 = 1 << 20;
const HUGE_HANDLE: usize = 256 * 1024;
const LONG_NAME: usize = 1 << 20;
/// Added to a READ's id for the stray reply of `unknown-id`.
const STRAY_ID: u32 = 1 << 24;

/// Declares [`Scenario`] and [`SCENARIOS`], its command-line names.
macro_rules! scenarios {
    ($($name:literal => $variant:ident,)*) => {
        #[derive(Debug, Clone, Copy, PartialEq, Eq)]
        enum Scenario { $($variant,)* }
        const SCENARIOS: &[(&str, Scenario)] = &[$(($name, Scenario::$variant),)*];
    };
}

scenarios! {
    "none" => None,
    "abs-name" => AbsName,
    "dotdot" => DotDot,
    "slash-name" => SlashName,
    "nul-name" => NulName,
    "empty-name" => EmptyName,
    "dup-names" => DupNames,
    "dir-and-link" => DirAndLink,
    "link-to-root" => LinkToRoot,
    "link-to-parent" => LinkToParent,
    "link-loop" => LinkLoop,
    "link-then-file" => LinkThenFile,
    "million" => Million,
    "deep" => Deep,
    "unknown-id" => UnknownId,
    "wrong-type" => WrongType,
    "huge-length" => HugeLength,
    "long-read" => LongRead,
    "endless-file" => EndlessFile,
    "absurd-limits" => AbsurdLimits,
    "absurd-limits-zero" => AbsurdLimitsZero,
    "absurd-limits-one" => AbsurdLimitsOne,
    "huge-handle" => HugeHandle,
    "huge-name-count" => HugeNameCount,
    "long-name" => LongName,
}

/// Something made up: what an injected path is.
#[derive(Debug, Clone)]
enum Node {
    File(Vec<u8>),
    /// A file whose data never ends.
    Endless,
    Dir(Vec<Entry>),
    Link(Vec<u8>),
}

impl Node {
    fn attrs(&self) -> Attrs {
        match self {
            Node::File(c) => Attrs::made_up(S_IFREG | 0o644, c.len() as u64),
            Node::Endless => Attrs::made_up(S_IFREG | 0o644, ENDLESS_SIZE),
            Node::Dir(_) => Attrs::made_up(S_IFDIR | 0o755, 4096),
            Node::Link(t) => Attrs::made_up(S_IFLNK | 0o777, t.len() as u64),
        }
    }
}

/// Which kind of node an operation looks for.
#[derive(Debug, Clone, Copy)]
enum Want {
    Any,
    File,
    Dir,
    Link,
}

impl Want {
    fn accepts(self, n: &Node) -> bool {
        match self {
            Want::Any => true,
            Want::File => matches!(n, Node::File(_) | Node::Endless),
            Want::Dir => matches!(n, Node::Dir(_)),
            Want::Link => matches!(n, Node::Link(_)),
        }
    }
}

/// The injected part of a scenario.
#[derive(Default)]
struct World {
    /// Made-up nodes by the exact path a client asks for, first match wins.
    nodes: Vec<(Vec<u8>, Node)>,
    /// Entries added to `/evil`'s listing: batch 0 comes with the real
    /// entries, each later batch in a READDIR reply of its own.
    extra: Vec<Vec<Entry>>,
}

impl World {
    fn build(s: Scenario, target: &[u8]) -> World {
        let mut w = World::default();
        match s {
            Scenario::AbsName => w.file(0, &[target, b"/abs-name"].concat()),
            Scenario::DotDot => {
                for name in [&b"../../escape"[..], b"..", b"."] {
                    w.file(0, name);
                }
            }
            Scenario::SlashName => {
                w.file(0, b"sub/inner");
                w.file(0, b"nosub/inner");
            }
            Scenario::NulName => w.file(0, b"nul\0name"),
            Scenario::EmptyName => w.file(0, b""),
            Scenario::DupNames => {
                w.file(0, b"dup");
                w.file(0, b"dup");
                w.file(0, b"both");
                w.dir(0, b"both");
            }
            Scenario::DirAndLink => {
                w.dir(0, b"dl");
                w.add(0, b"dl", Node::Link(target.to_vec()));
            }
            Scenario::LinkToRoot => w.add(0, b"root-link", Node::Link(b"/".to_vec())),
            Scenario::LinkToParent => w.add(0, b"up", Node::Link(b"../../..".to_vec())),
            Scenario::LinkLoop => {
                w.add(0, b"a", Node::Link(b"b".to_vec()));
                w.add(0, b"b", Node::Link(b"a".to_vec()));
            }
            Scenario::LinkThenFile => {
                w.add(0, b"x", Node::Link(target.to_vec()));
                w.dir(1, b"x");
            }
            Scenario::EndlessFile => w.add(0, b"endless", Node::Endless),
            // Only the entry: the endless directories are made up on demand.
            Scenario::Deep => w.list(0, deep_entry()),
            Scenario::LongName => w.file(0, &vec![b'n'; LONG_NAME]),
            _ => {}
        }
        w
    }

    fn list(&mut self, batch: usize, e: Entry) {
        while self.extra.len() <= batch {
            self.extra.push(Vec::new());
        }
        self.extra[batch].push(e);
    }

    /// Lists `name` in `/evil` and makes it exist as `node`.
    fn add(&mut self, batch: usize, name: &[u8], node: Node) {
        self.list(batch, Entry::new(name, node.attrs()));
        if name.starts_with(b"/") {
            self.nodes.push((name.to_vec(), node.clone()));
        }
        self.nodes.push(([b"/evil/", name].concat(), node));
    }

    fn file(&mut self, batch: usize, name: &[u8]) {
        self.add(batch, name, Node::File(PAYLOAD.to_vec()));
    }

    /// A directory holding the file `inner`.
    fn dir(&mut self, batch: usize, name: &[u8]) {
        let inner = Node::File(PAYLOAD.to_vec());
        let listing = vec![Entry::new(b"inner", inner.attrs())];
        self.nodes
            .push(([b"/evil/", name, b"/inner"].concat(), inner));
        self.add(batch, name, Node::Dir(listing));
    }

    fn has_links(&self) -> bool {
        self.nodes.iter().any(|(_, n)| matches!(n, Node::Link(_)))
    }
}

fn deep_entry() -> Entry {
    Entry::new(b"deep", Node::Dir(Vec::new()).attrs())
}

/// Where a client's path leads.
enum Found {
    Virtual(Node),
    /// A real path below the root, and whether it is `/evil`.
    Real(PathBuf, bool),
}

/// What a handle is open on.
enum Handle {
    File(File),
    Virtual(Node),
    Dir(Listing),
}

/// An open directory: the replies still to give.
struct Listing {
    batches: VecDeque<Vec<Entry>>,
    /// `million`: the next generated name.
    generated: Option<u32>,
    /// `huge-name-count`: the lying reply is still to come.
    huge_count: bool,
}

struct Server {
    root: PathBuf,
    scenario: Scenario,
    world: World,
    handles: Vec<Option<Handle>>,
    log: Option<File>,
    out: BufWriter<io::Stdout>,
    /// `huge-length`: the broken header is out; nothing more is answered.
    silenced: bool,
}

fn main() {
    let mut server = match Server::from_args() {
        Ok(s) => s,
        Err(msg) => {
            eprintln!(
                "uring-ssh-evil-sftp: {msg}\n\
                 usage: uring-ssh-evil-sftp --root DIR [--scenario NAME] [--target DIR] [--log FILE]"
            );
            std::process::exit(2);
        }
    };
    server.run();
}

impl Server {
    fn from_args() -> Result<Server, String> {
        let mut args = std::env::args_os().skip(1);
        let mut root = None;
        let mut scenario = Scenario::None;
        let mut target = b"/tmp/uring-ssh-evil-target".to_vec();
        let mut log = None;
        while let Some(flag) = args.next() {
            if flag == "--list" {
                for (name, _) in SCENARIOS {
                    println!("{name}");
                }
                std::process::exit(0);
            }
            let value = args
                .next()
                .ok_or_else(|| format!("{} needs a value", flag.to_string_lossy()))?;
            match flag.to_str() {
                Some("--root") => root = Some(PathBuf::from(value)),
                Some("--target") => target = value.into_vec(),
                Some("--log") => log = Some(PathBuf::from(value)),
                Some("--scenario") => {
                    scenario = SCENARIOS
                        .iter()
                        .find(|(name, _)| value == *name)
                        .map(|(_, s)| *s)
                        .ok_or_else(|| {
                            let names: Vec<&str> = SCENARIOS.iter().map(|(n, _)| *n).collect();
                            format!("unknown scenario {value:?}; known: {}", names.join(" "))
                        })?;
                }
                _ => return Err(format!("unknown argument {flag:?}")),
            }
        }
        let root = root.ok_or("--root is required")?;
        if !root.is_dir() {
            return Err(format!("--root {}: not a directory", root.display()));
        }
        let log = match log {
            Some(p) => Some(
                OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(&p)
                    .map_err(|e| format!("--log {}: {e}", p.display()))?,
            ),
            None => None,
        };
        Ok(Server {
            root,
            scenario,
            world: World::build(scenario, &target),
            handles: Vec::new(),
            log,
            out: BufWriter::with_capacity(256 * 1024, io::stdout()),
            silenced: false,
        })
    }

    /// Serves requests until end of input (or a write fails).
    fn run(&mut self) {
        let name = SCENARIOS.iter().find(|(_, s)| *s == self.scenario);
        self.note(&format!("start, scenario {}", name.map_or("?", |n| n.0)));
        let mut input = io::stdin().lock();
        let mut body = Vec::new();
        loop {
            let mut len = [0u8; 4];
            if input.read_exact(&mut len).is_err() {
                break;
            }
            let len = u32::from_be_bytes(len) as usize;
            if !(5..=MAX_REQUEST).contains(&len) {
                self.note(&format!("request of {len} bytes: giving up"));
                break;
            }
            body.resize(len, 0);
            if input.read_exact(&mut body).is_err() {
                break;
            }
            self.dispatch(&body);
            if self.out.flush().is_err() {
                break;
            }
        }
        self.note("end of input");
    }

    fn note(&mut self, line: &str) {
        if let Some(f) = &mut self.log {
            let _ = writeln!(f, "{line}");
        }
    }

    fn send(&mut self, packet: &[u8]) {
        // A failed write shows again at the flush, which ends the server.
        let _ = self.out.write_all(packet);
    }

    fn dispatch(&mut self, body: &[u8]) {
        let kind = body[0];
        let mut r = Reader::new(&body[1..]);
        if kind == fxp::INIT {
            self.note("INIT");
            let mut p = Packet::new();
            p.byte(fxp::VERSION).u32(3);
            for ext in [
                "posix-rename@openssh.com",
                "fsync@openssh.com",
                "limits@openssh.com",
            ] {
                p.string(ext.as_bytes()).string(b"1");
            }
            let v = p.finish();
            self.send(&v);
            return;
        }
        let Ok(id) = r.u32() else { return };
        let first = Reader::new(&body[5..]).string().unwrap_or_default();
        self.note(&format!(
            "{} {id} {}",
            type_name(kind),
            wire::escape(first, 200)
        ));
        if self.silenced {
            return;
        }
        if self.scenario == Scenario::HugeLength && kind != fxp::EXTENDED {
            self.silenced = true;
            self.note("evil: reply header claiming 2^32-1 bytes");
            let mut raw = u32::MAX.to_be_bytes().to_vec();
            raw.push(fxp::STATUS);
            raw.extend_from_slice(&id.to_be_bytes());
            raw.extend_from_slice(&st::OK.to_be_bytes());
            self.send(&raw);
            return;
        }
        let reply = self.serve(kind, id, &mut r).unwrap_or_else(|e| e);
        let packet = wire::encode(reply, id);
        self.send(&packet);
    }

    fn serve(&mut self, kind: u8, id: u32, r: &mut Reader<'_>) -> Result<Reply, Reply> {
        match kind {
            fxp::OPEN => self.open(r),
            fxp::CLOSE => {
                let h = self.handle_index(r.string()?)?;
                self.handles[h] = None;
                Ok(Reply::ok())
            }
            fxp::READ => self.read(id, r),
            fxp::WRITE => {
                let h = self.handle_index(r.string()?)?;
                let (off, data) = (r.u64()?, r.string()?);
                match &self.handles[h] {
                    Some(Handle::File(f)) => f.write_all_at(data, off)?,
                    _ => return Err(Reply::fail(st::PERMISSION_DENIED, "not writable")),
                }
                Ok(Reply::ok())
            }
            fxp::STAT if self.scenario == Scenario::WrongType => {
                self.note("evil: DATA for a STAT");
                Ok(Reply::Data(PAYLOAD.to_vec()))
            }
            fxp::STAT => self.stat(r.string()?, true),
            fxp::LSTAT => self.stat(r.string()?, false),
            fxp::FSTAT => {
                let h = self.handle_index(r.string()?)?;
                match &self.handles[h] {
                    Some(Handle::File(f)) => Ok(Reply::Attrs((&f.metadata()?).into())),
                    Some(Handle::Virtual(n)) => Ok(Reply::Attrs(n.attrs())),
                    _ => Err(Reply::fail(st::FAILURE, "not a file handle")),
                }
            }
            fxp::SETSTAT => {
                let p = self.real(r.string()?);
                set_path_attrs(&p, &r.attrs()?)?;
                Ok(Reply::ok())
            }
            fxp::FSETSTAT => {
                let h = self.handle_index(r.string()?)?;
                let a = r.attrs()?;
                match &self.handles[h] {
                    Some(Handle::File(f)) => set_file_attrs(f, &a)?,
                    _ => return Err(Reply::fail(st::PERMISSION_DENIED, "not a real file")),
                }
                Ok(Reply::ok())
            }
            fxp::OPENDIR => self.opendir(r.string()?),
            fxp::READDIR => self.readdir(id, r.string()?),
            fxp::REMOVE => {
                fs::remove_file(self.real(r.string()?))?;
                Ok(Reply::ok())
            }
            fxp::MKDIR => {
                let p = self.real(r.string()?);
                let mode = r.attrs()?.mode.unwrap_or(0o777) & 0o7777;
                fs::DirBuilder::new().mode(mode).create(p)?;
                Ok(Reply::ok())
            }
            fxp::RMDIR => {
                fs::remove_dir(self.real(r.string()?))?;
                Ok(Reply::ok())
            }
            fxp::REALPATH => {
                let mut p = b"/".to_vec();
                p.extend_from_slice(&normalize(r.string()?).join(&b'/'));
                Ok(Reply::Name(vec![Entry::bare(&p)]))
            }
            fxp::RENAME => {
                let (from, to) = (self.real(r.string()?), self.real(r.string()?));
                // Version 3 renames never replace (posix-rename does).
                if fs::symlink_metadata(&to).is_ok() {
                    return Err(Reply::fail(st::FAILURE, "the target exists"));
                }
                fs::rename(from, to)?;
                Ok(Reply::ok())
            }
            fxp::READLINK => self.readlink(r.string()?),
            fxp::SYMLINK => {
                // OpenSSH's order: the link's target first, then its path.
                let target = r.string()?;
                let link = self.real(r.string()?);
                std::os::unix::fs::symlink(OsStr::from_bytes(target), link)?;
                Ok(Reply::ok())
            }
            fxp::EXTENDED => self.extended(r),
            _ => Err(Reply::fail(st::OP_UNSUPPORTED, "unsupported request")),
        }
    }

    /// The real path below the root for a client's path.
    fn real(&self, path: &[u8]) -> PathBuf {
        let mut p = self.root.clone();
        for c in normalize(path) {
            p.push(OsStr::from_bytes(c));
        }
        p
    }

    /// The node injected at exactly `path` that `want` accepts.
    fn lookup(&self, path: &[u8], want: Want) -> Option<Node> {
        let found = self
            .world
            .nodes
            .iter()
            .find(|(k, n)| k == path && want.accepts(n));
        if let Some((_, n)) = found {
            return Some(n.clone());
        }
        if self.scenario == Scenario::Deep && matches!(want, Want::Any | Want::Dir) {
            let c = normalize(path);
            if c.len() >= 2 && c[0] == b"evil" && c[1..].iter().all(|c| *c == b"deep") {
                return Some(Node::Dir(vec![deep_entry()]));
            }
        }
        None
    }

    /// Follows injected symbolic links in `path` (the last component's
    /// only if `follow`) to an injected node or a real path.
    fn resolve(&self, path: &[u8], want: Want, follow: bool) -> Result<Found, Reply> {
        let mut p = path.to_vec();
        for _ in 0..MAX_HOPS {
            match self
                .lookup(&p, want)
                .or_else(|| self.lookup(&p, Want::Link))
            {
                Some(Node::Link(t)) if follow => {
                    p = join_link(&p, &t);
                    continue;
                }
                Some(n) => return Ok(Found::Virtual(n)),
                None => {}
            }
            if let Some(next) = self.through_link(&p) {
                p = next;
                continue;
            }
            let evil = normalize(&p) == [b"evil"];
            return Ok(Found::Real(self.real(&p), evil));
        }
        Err(Reply::fail(
            st::FAILURE,
            "too many levels of symbolic links",
        ))
    }

    /// `path` with its first injected link among the directories replaced.
    fn through_link(&self, p: &[u8]) -> Option<Vec<u8>> {
        if !self.world.has_links() {
            return None;
        }
        for i in (1..p.len()).filter(|&i| p[i] == b'/') {
            let prefix = &p[..i];
            if self.lookup(prefix, Want::Dir).is_some() {
                continue;
            }
            if let Some(Node::Link(t)) = self.lookup(prefix, Want::Link) {
                return Some([join_link(prefix, &t), p[i..].to_vec()].concat());
            }
        }
        None
    }

    fn handle_index(&self, h: &[u8]) -> Result<usize, Reply> {
        let digits = h.split(|&b| b == b':').next().unwrap_or_default();
        std::str::from_utf8(digits)
            .ok()
            .and_then(|s| s.parse::<usize>().ok())
            .filter(|&i| matches!(self.handles.get(i), Some(Some(_))))
            .ok_or_else(|| Reply::fail(st::FAILURE, "invalid handle"))
    }

    fn new_handle(&mut self, h: Handle) -> Vec<u8> {
        let i = match self.handles.iter().position(Option::is_none) {
            Some(i) => i,
            None => {
                self.handles.push(None);
                self.handles.len() - 1
            }
        };
        let huge = self.scenario == Scenario::HugeHandle && !matches!(h, Handle::Dir(_));
        self.handles[i] = Some(h);
        let mut bytes = i.to_string().into_bytes();
        if huge {
            self.note("evil: a 256 KiB handle");
            bytes.push(b':');
            bytes.resize(HUGE_HANDLE, b'h');
        }
        bytes
    }

    fn open(&mut self, r: &mut Reader<'_>) -> Result<Reply, Reply> {
        use wire::pflags::*;
        let (path, flags, attrs) = (r.string()?, r.u32()?, r.attrs()?);
        let h = match self.resolve(path, Want::File, true)? {
            Found::Virtual(n @ (Node::File(_) | Node::Endless)) => {
                if flags & (WRITE | APPEND | CREAT | TRUNC) != 0 {
                    return Err(Reply::fail(st::PERMISSION_DENIED, "read-only file"));
                }
                Handle::Virtual(n)
            }
            Found::Virtual(_) => return Err(Reply::fail(st::FAILURE, "not a regular file")),
            Found::Real(p, _) => Handle::File(
                OpenOptions::new()
                    .read(flags & READ != 0)
                    .write(flags & WRITE != 0)
                    .append(flags & APPEND != 0)
                    .create(flags & CREAT != 0)
                    .truncate(flags & TRUNC != 0)
                    .create_new(flags & (CREAT | EXCL) == CREAT | EXCL)
                    .mode(attrs.mode.unwrap_or(0o666) & 0o7777)
                    .open(p)?,
            ),
        };
        Ok(Reply::Handle(self.new_handle(h)))
    }

    fn read(&mut self, id: u32, r: &mut Reader<'_>) -> Result<Reply, Reply> {
        let h = self.handle_index(r.string()?)?;
        let (off, len) = (r.u64()?, (r.u32()? as usize).min(MAX_READ));
        if self.scenario == Scenario::UnknownId {
            self.note("evil: DATA to an unknown id");
            let stray = wire::encode(Reply::Data(PAYLOAD.to_vec()), id.wrapping_add(STRAY_ID));
            self.send(&stray);
        }
        let mut data = match &self.handles[h] {
            Some(Handle::File(f)) => read_at(f, off, len)?,
            Some(Handle::Virtual(Node::File(c))) => usize::try_from(off)
                .ok()
                .and_then(|o| c.get(o..))
                .map(|rest| rest[..len.min(rest.len())].to_vec())
                .unwrap_or_default(),
            Some(Handle::Virtual(Node::Endless)) => {
                let d = (0..len as u64).map(|i| (off.wrapping_add(i) % 251) as u8);
                return Ok(Reply::Data(d.collect()));
            }
            _ => return Err(Reply::fail(st::FAILURE, "not a file handle")),
        };
        if data.is_empty() {
            return Ok(Reply::fail(st::EOF, "End of file"));
        }
        if self.scenario == Scenario::LongRead {
            self.note("evil: READ reply longer than asked");
            data.resize(len + 4096, b'!');
        }
        Ok(Reply::Data(data))
    }

    fn stat(&self, path: &[u8], follow: bool) -> Result<Reply, Reply> {
        Ok(Reply::Attrs(
            match self.resolve(path, Want::Any, follow)? {
                Found::Virtual(n) => n.attrs(),
                Found::Real(p, _) if follow => (&fs::metadata(p)?).into(),
                Found::Real(p, _) => (&fs::symlink_metadata(p)?).into(),
            },
        ))
    }

    fn readlink(&self, path: &[u8]) -> Result<Reply, Reply> {
        match self.resolve(path, Want::Link, false)? {
            Found::Virtual(Node::Link(t)) => Ok(Reply::Name(vec![Entry::bare(&t)])),
            Found::Virtual(_) => Err(Reply::fail(st::FAILURE, "not a symbolic link")),
            Found::Real(p, _) => {
                let t = fs::read_link(p)?;
                Ok(Reply::Name(vec![Entry::bare(t.as_os_str().as_bytes())]))
            }
        }
    }

    fn opendir(&mut self, path: &[u8]) -> Result<Reply, Reply> {
        let mut listing = Listing {
            batches: VecDeque::new(),
            generated: None,
            huge_count: false,
        };
        match self.resolve(path, Want::Dir, true)? {
            Found::Virtual(Node::Dir(entries)) => listing.batches.push_back(entries),
            Found::Virtual(_) => return Err(Reply::fail(st::FAILURE, "not a directory")),
            Found::Real(p, evil) => {
                let mut first = real_listing(&p)?;
                if evil {
                    let mut extra = self.world.extra.iter().cloned();
                    first.extend(extra.next().unwrap_or_default());
                    listing.batches.extend(extra);
                    if self.scenario == Scenario::Million {
                        listing.generated = Some(0);
                    }
                    listing.huge_count = self.scenario == Scenario::HugeNameCount;
                }
                listing.batches.push_front(first);
            }
        }
        Ok(Reply::Handle(self.new_handle(Handle::Dir(listing))))
    }

    fn readdir(&mut self, id: u32, handle: &[u8]) -> Result<Reply, Reply> {
        let h = self.handle_index(handle)?;
        let Some(Handle::Dir(l)) = &mut self.handles[h] else {
            return Err(Reply::fail(st::FAILURE, "not a directory handle"));
        };
        if std::mem::take(&mut l.huge_count) {
            let mut p = Packet::new();
            p.byte(fxp::NAME).u32(id).u32(u32::MAX);
            p.entry(&Entry::new(b"count-lies", Node::File(Vec::new()).attrs()));
            let raw = p.finish();
            self.note("evil: NAME count 2^32-1");
            return Ok(Reply::Raw(raw));
        }
        while let Some(b) = l.batches.front_mut() {
            if b.is_empty() {
                l.batches.pop_front();
                continue;
            }
            let n = b.len().min(BATCH);
            return Ok(Reply::Name(b.drain(..n).collect()));
        }
        if let Some(next) = l.generated.filter(|&n| n < MILLION) {
            let end = (next + BATCH as u32).min(MILLION);
            l.generated = Some(end);
            let attrs = Node::File(Vec::new()).attrs();
            let names = (next..end).map(|i| Entry::new(format!("m{i:07}").as_bytes(), attrs));
            return Ok(Reply::Name(names.collect()));
        }
        Ok(Reply::fail(st::EOF, "End of directory"))
    }

    fn extended(&mut self, r: &mut Reader<'_>) -> Result<Reply, Reply> {
        match r.string()? {
            b"limits@openssh.com" => {
                let limits = match self.scenario {
                    Scenario::AbsurdLimits => [u64::MAX; 4],
                    Scenario::AbsurdLimitsZero => [0; 4],
                    Scenario::AbsurdLimitsOne => [1; 4],
                    _ => [256 * 1024, MAX_READ as u64, MAX_READ as u64, 1024],
                };
                let data = limits.iter().flat_map(|v| v.to_be_bytes()).collect();
                Ok(Reply::Extended(data))
            }
            b"posix-rename@openssh.com" => {
                let (from, to) = (self.real(r.string()?), self.real(r.string()?));
                fs::rename(from, to)?;
                Ok(Reply::ok())
            }
            b"fsync@openssh.com" => {
                let h = self.handle_index(r.string()?)?;
                match &self.handles[h] {
                    Some(Handle::File(f)) => f.sync_all()?,
                    _ => return Err(Reply::fail(st::FAILURE, "not a real file")),
                }
                Ok(Reply::ok())
            }
            _ => Err(Reply::fail(st::OP_UNSUPPORTED, "unsupported extension")),
        }
    }
}

/// The components of `path` with `.` dropped and `..` applied, never
/// climbing above the root.
fn normalize(path: &[u8]) -> Vec<&[u8]> {
    let mut out = Vec::new();
    for c in path.split(|&b| b == b'/') {
        match c {
            b"" | b"." => {}
            b".." => {
                out.pop();
            }
            c => out.push(c),
        }
    }
    out
}

/// Where the link at `link` with target `target` leads.
fn join_link(link: &[u8], target: &[u8]) -> Vec<u8> {
    if target.starts_with(b"/") {
        return target.to_vec();
    }
    match link.iter().rposition(|&b| b == b'/') {
        Some(i) => [&link[..=i], target].concat(),
        None => target.to_vec(),
    }
}

/// A real directory's entries: `.` and `..` first (as OpenSSH's server
/// lists them), then the rest by name, each with its `lstat` attributes.
fn real_listing(dir: &Path) -> io::Result<Vec<Entry>> {
    let mut out = Vec::new();
    for (name, p) in [(&b"."[..], dir.to_path_buf()), (b"..", dir.join(".."))] {
        out.push(Entry::new(name, (&fs::symlink_metadata(p)?).into()));
    }
    let mut rest = Vec::new();
    for e in fs::read_dir(dir)? {
        let e = e?;
        let Ok(m) = e.metadata() else { continue };
        rest.push(Entry::new(e.file_name().as_bytes(), (&m).into()));
    }
    rest.sort_by(|a, b| a.name.cmp(&b.name));
    out.extend(rest);
    Ok(out)
}

fn read_at(f: &File, off: u64, len: usize) -> io::Result<Vec<u8>> {
    let mut buf = vec![0; len];
    let mut got = 0;
    while got < len {
        match f.read_at(&mut buf[got..], off.saturating_add(got as u64)) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    buf.truncate(got);
    Ok(buf)
}

fn times(a: &SetAttrs) -> Option<FileTimes> {
    let t = |s: u32| UNIX_EPOCH + Duration::from_secs(s as u64);
    a.times
        .map(|(at, mt)| FileTimes::new().set_accessed(t(at)).set_modified(t(mt)))
}

fn set_file_attrs(f: &File, a: &SetAttrs) -> io::Result<()> {
    if let Some(size) = a.size {
        f.set_len(size)?;
    }
    if let Some((uid, gid)) = a.owner {
        std::os::unix::fs::fchown(f, Some(uid), Some(gid))?;
    }
    if let Some(mode) = a.mode {
        f.set_permissions(fs::Permissions::from_mode(mode & 0o7777))?;
    }
    if let Some(t) = times(a) {
        f.set_times(t)?;
    }
    Ok(())
}

fn set_path_attrs(p: &Path, a: &SetAttrs) -> io::Result<()> {
    if let Some(size) = a.size {
        OpenOptions::new().write(true).open(p)?.set_len(size)?;
    }
    if let Some((uid, gid)) = a.owner {
        std::os::unix::fs::chown(p, Some(uid), Some(gid))?;
    }
    if let Some(mode) = a.mode {
        fs::set_permissions(p, fs::Permissions::from_mode(mode & 0o7777))?;
    }
    if let Some((at, mt)) = a.times {
        let c = CString::new(p.as_os_str().as_bytes())
            .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        let tv = |s: u32| libc::timeval {
            tv_sec: s as libc::time_t,
            tv_usec: 0,
        };
        let tvs = [tv(at), tv(mt)];
        // SAFETY: a NUL-terminated path and an array of two timevals.
        if unsafe { libc::utimes(c.as_ptr(), tvs.as_ptr()) } != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Request types by number, for the log.
const TYPE_NAMES: [&str; 21] = [
    "?", "INIT", "VERSION", "OPEN", "CLOSE", "READ", "WRITE", "LSTAT", "FSTAT", "SETSTAT",
    "FSETSTAT", "OPENDIR", "READDIR", "REMOVE", "MKDIR", "RMDIR", "REALPATH", "STAT", "RENAME",
    "READLINK", "SYMLINK",
];

fn type_name(kind: u8) -> &'static str {
    match kind {
        fxp::EXTENDED => "EXTENDED",
        k => TYPE_NAMES.get(k as usize).copied().unwrap_or("?"),
    }
}
