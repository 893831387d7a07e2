//! Local writes confined beneath one directory.
//!
//! A tree download writes where a server's names say. Names are checked as
//! single components first ([`check_name`]), and the kernel enforces the
//! rest: the destination is opened once as a directory fd, and every
//! directory below it is reached with `openat2(2)` and `RESOLVE_BENEATH |
//! RESOLVE_NO_SYMLINKS` (Linux 5.6), so neither a `..` that slipped through
//! nor a symbolic link standing in the destination — planted by this
//! transfer, an earlier one or anyone else — can take a write elsewhere.
//! Where `openat2` is missing (or filtered), the same walk is done one
//! component at a time with `openat(O_NOFOLLOW | O_DIRECTORY)`.
//!
//! Files are created inside their parent's fd: temporaries with `O_EXCL |
//! O_NOFOLLOW`, the final name by `renameat` within that fd (which replaces
//! a link standing there instead of writing through it), links with
//! `symlinkat` at a temporary name renamed over the final one.
//!
//! Paths given by the caller (the destination root itself, or a file of
//! `download_many`) are the caller's choice and are opened as given.

use std::cell::RefCell;
use std::collections::HashMap;
use std::ffi::{CStr, CString, OsStr, OsString};
use std::fs;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::sync::OnceLock;

use crate::error::{Error, Result};
use crate::reactor::files::{self, HeldFd};

/// Longest name accepted from a server (Linux's `NAME_MAX`).
pub(crate) const NAME_MAX: usize = 255;

/// Why `name` cannot be used as one local path component, if it cannot.
pub(crate) fn name_problem(name: &[u8]) -> Option<&'static str> {
    if name.is_empty() {
        Some("empty name")
    } else if name == b"." || name == b".." {
        Some("names the directory itself or its parent")
    } else if name.contains(&b'/') {
        Some("holds a '/'")
    } else if name.contains(&0) {
        Some("holds a NUL byte")
    } else if name.len() > NAME_MAX {
        Some("longer than 255 bytes")
    } else {
        None
    }
}

/// `name` escaped for messages: printable ASCII as is, every other byte
/// (and `\` and `"`) as `\xNN`; at most 200 bytes shown.
pub(crate) fn escape_name(name: &[u8]) -> String {
    let mut s = String::new();
    for &b in name.iter().take(200) {
        if (0x20..0x7f).contains(&b) && b != b'\\' && b != b'"' {
            s.push(b as char);
        } else {
            s.push_str(&format!("\\x{b:02x}"));
        }
    }
    if name.len() > 200 {
        s.push_str(&format!("… ({} bytes)", name.len()));
    }
    s
}

/// Checks a name from a server's listing of `listed_in`.
pub(crate) fn check_name(name: &[u8], listed_in: &Path) -> Result<()> {
    match name_problem(name) {
        None => Ok(()),
        Some(reason) => Err(Error::UnsafeName {
            name: escape_name(name),
            listed_in: escape_name(listed_in.as_os_str().as_bytes()),
            reason,
        }),
    }
}

/// Whether a link at depth `depth` below a tree's root (0: in the root)
/// with this target stays inside the tree: relative, and never climbing
/// above the root on the way.
pub(crate) fn link_stays_inside(target: &[u8], depth: usize) -> bool {
    if target.is_empty() || target.starts_with(b"/") {
        return false;
    }
    let mut level = depth as i64;
    for part in target.split(|&b| b == b'/') {
        match part {
            b"" | b"." => {}
            b".." => {
                level -= 1;
                if level < 0 {
                    return false;
                }
            }
            _ => level += 1,
        }
    }
    true
}

/// Whether this kernel has `openat2` (and lets us call it).
fn have_openat2() -> bool {
    static HAVE: OnceLock<bool> = OnceLock::new();
    *HAVE.get_or_init(|| match openat2_beneath(libc::AT_FDCWD, c".") {
        Ok(_) => true,
        Err(e) => !matches!(e.raw_os_error(), Some(libc::ENOSYS | libc::EPERM)),
    })
}

/// `openat2(dir, path, O_DIRECTORY, RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS |
/// RESOLVE_NO_MAGICLINKS)`.
fn openat2_beneath(dir: libc::c_int, path: &CStr) -> io::Result<OwnedFd> {
    // SAFETY: open_how is plain integers; all zeroes is a valid value.
    let mut how: libc::open_how = unsafe { std::mem::zeroed() };
    how.flags = (libc::O_RDONLY | libc::O_DIRECTORY | libc::O_CLOEXEC) as u64;
    how.resolve = libc::RESOLVE_BENEATH | libc::RESOLVE_NO_SYMLINKS | libc::RESOLVE_NO_MAGICLINKS;
    loop {
        // SAFETY: `path` is NUL-terminated and `how` a valid open_how that
        // outlives the call, whose size we pass; the kernel returns a new fd
        // or -1.
        let fd = unsafe {
            libc::syscall(
                libc::SYS_openat2,
                dir,
                path.as_ptr(),
                &how as *const libc::open_how,
                std::mem::size_of::<libc::open_how>(),
            )
        };
        if fd >= 0 {
            // SAFETY: the kernel just returned this fd; nothing else owns it.
            return Ok(unsafe { OwnedFd::from_raw_fd(fd as libc::c_int) });
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// `openat(dir, name, flags | O_CLOEXEC, mode)` for one component.
fn openat(dir: libc::c_int, name: &CStr, flags: libc::c_int, mode: u32) -> io::Result<OwnedFd> {
    loop {
        // SAFETY: `name` is NUL-terminated; the kernel returns a new fd or -1.
        let fd = unsafe { libc::openat(dir, name.as_ptr(), flags | libc::O_CLOEXEC, mode) };
        if fd >= 0 {
            // SAFETY: the kernel just returned this fd; nothing else owns it.
            return Ok(unsafe { OwnedFd::from_raw_fd(fd) });
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// Whether `name` in `dir` is a symbolic link.
fn is_link(dir: libc::c_int, name: &CStr) -> bool {
    // SAFETY: a zeroed `stat` is a valid value for the kernel to fill.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: `name` is NUL-terminated, `st` writable and ours, `dir` open.
    let r = unsafe { libc::fstatat(dir, name.as_ptr(), &mut st, libc::AT_SYMLINK_NOFOLLOW) };
    r == 0 && (st.st_mode & libc::S_IFMT) == libc::S_IFLNK
}

/// `name` as one component of this directory: checked again here, so that
/// no caller's mistake can make a create, rename or link leave it.
fn component(dir: &Path, name: &OsStr) -> Result<CString> {
    if let Some(reason) = name_problem(name.as_bytes()) {
        return Err(Error::OutsideDestination {
            path: dir.join(name),
            reason: format!("not a plain name: {reason}"),
        });
    }
    cstr(name).map_err(|e| local_error(&dir.join(name), e))
}

fn cstr(name: &OsStr) -> io::Result<CString> {
    CString::new(name.as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "a NUL byte in a name"))
}

fn check(ret: libc::c_int) -> io::Result<()> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// A relative path below a confined root: validated components.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub(crate) struct RelPath(Vec<OsString>);

impl RelPath {
    /// This path with `name` (a checked single component) appended.
    pub(crate) fn child(&self, name: &[u8]) -> RelPath {
        let mut v = self.0.clone();
        v.push(OsString::from_vec(name.to_vec()));
        RelPath(v)
    }

    /// Components below the root.
    pub(crate) fn depth(&self) -> usize {
        self.0.len()
    }

    /// The parent path and the last component (`None` for the root).
    pub(crate) fn split_last(&self) -> Option<(RelPath, &OsStr)> {
        let (last, parent) = self.0.split_last()?;
        Some((RelPath(parent.to_vec()), last.as_os_str()))
    }

    /// As a relative `PathBuf` (for joining onto display paths).
    pub(crate) fn to_path(&self) -> PathBuf {
        self.0.iter().collect()
    }
}

/// A directory opened as an fd; everything below it is reached without
/// following symbolic links and without leaving it.
#[derive(Debug)]
pub(crate) struct ConfinedDir {
    /// Shared with the ring ops that work in this directory, so that the
    /// number stays this directory's until the last of them completes.
    fd: Rc<OwnedFd>,
    /// Where it is, for messages.
    path: PathBuf,
}

fn outside(path: &Path, e: &io::Error) -> Option<Error> {
    let reason = match e.raw_os_error()? {
        libc::ELOOP => "a symbolic link stands in the way; links are never followed",
        libc::EXDEV => "the path leaves the destination directory",
        _ => return None,
    };
    Some(Error::OutsideDestination {
        path: path.to_owned(),
        reason: reason.into(),
    })
}

/// Maps an OS error on `path` to our error, naming the path.
pub(crate) fn local_error(path: &Path, e: io::Error) -> Error {
    match outside(path, &e) {
        Some(err) => err,
        None => Error::Io(io::Error::new(e.kind(), format!("{}: {e}", path.display()))),
    }
}

impl ConfinedDir {
    /// Opens the directory `path` (created with its parents if missing).
    /// The path is the caller's: links in it are followed.
    pub(crate) fn open_root(path: &Path) -> Result<ConfinedDir> {
        fs::create_dir_all(path).map_err(|e| local_error(path, e))?;
        let c = cstr(path.as_os_str()).map_err(|e| local_error(path, e))?;
        let fd = openat(libc::AT_FDCWD, &c, libc::O_RDONLY | libc::O_DIRECTORY, 0)
            .map_err(|e| local_error(path, e))?;
        Ok(ConfinedDir {
            fd: Rc::new(fd),
            path: path.to_owned(),
        })
    }

    /// Opens the existing directory `path`, the caller's choice (links
    /// followed), e.g. the parent of a file the caller named.
    pub(crate) fn open_given(path: &Path) -> Result<ConfinedDir> {
        let p = if path.as_os_str().is_empty() {
            Path::new(".")
        } else {
            path
        };
        let c = cstr(p.as_os_str()).map_err(|e| local_error(p, e))?;
        let fd = openat(libc::AT_FDCWD, &c, libc::O_RDONLY | libc::O_DIRECTORY, 0)
            .map_err(|e| local_error(p, e))?;
        Ok(ConfinedDir {
            fd: Rc::new(fd),
            path: p.to_owned(),
        })
    }

    /// Where this directory is, for messages.
    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    /// The directory at `rel` below this one, created (mode 0755, less the
    /// umask) where missing when `create`. Never follows a link and never
    /// leaves this directory: a link on the way is
    /// [`Error::OutsideDestination`].
    pub(crate) fn dir(&self, rel: &RelPath, create: bool) -> Result<ConfinedDir> {
        self.dir_with(rel, create, have_openat2())
    }

    /// [`ConfinedDir::dir`] with `openat2` or with the walk that stands in
    /// for it on kernels without it.
    fn dir_with(&self, rel: &RelPath, create: bool, use_openat2: bool) -> Result<ConfinedDir> {
        let display = self.path.join(rel.to_path());
        if rel.0.is_empty() {
            return Ok(ConfinedDir {
                fd: self.fd.clone(),
                path: display,
            });
        }
        // Fast path: the whole directory exists.
        if use_openat2 {
            let joined = cstr(rel.to_path().as_os_str()).map_err(|e| local_error(&display, e))?;
            match openat2_beneath(self.fd.as_raw_fd(), &joined) {
                Ok(fd) => {
                    return Ok(ConfinedDir {
                        fd: Rc::new(fd),
                        path: display,
                    });
                }
                Err(e) if e.raw_os_error() == Some(libc::ENOENT) && create => {}
                Err(e) => return Err(local_error(&display, e)),
            }
        }
        // One component at a time, creating what is missing.
        let mut cur: Option<OwnedFd> = None;
        for name in &rel.0 {
            if name_problem(name.as_bytes()).is_some() {
                return Err(Error::OutsideDestination {
                    path: display,
                    reason: "a component is not a plain name".into(),
                });
            }
            let parent = cur.as_ref().map_or(self.fd.as_raw_fd(), |f| f.as_raw_fd());
            let c = cstr(name).map_err(|e| local_error(&display, e))?;
            let open = || {
                if use_openat2 {
                    openat2_beneath(parent, &c)
                } else {
                    openat(
                        parent,
                        &c,
                        libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW,
                        0,
                    )
                    .map_err(|e| {
                        // With O_DIRECTORY, a link is ENOTDIR: say ELOOP,
                        // as openat2 does.
                        if e.raw_os_error() == Some(libc::ENOTDIR) && is_link(parent, &c) {
                            io::Error::from_raw_os_error(libc::ELOOP)
                        } else {
                            e
                        }
                    })
                }
            };
            let fd = match open() {
                Ok(fd) => fd,
                Err(e) if e.raw_os_error() == Some(libc::ENOENT) && create => {
                    // SAFETY: `c` is NUL-terminated and `parent` an fd we
                    // hold open; mkdirat never follows a link at `c`.
                    let r = unsafe { libc::mkdirat(parent, c.as_ptr(), 0o755) };
                    if let Err(e) = check(r)
                        && e.raw_os_error() != Some(libc::EEXIST)
                    {
                        return Err(local_error(&display, e));
                    }
                    open().map_err(|e| local_error(&display, e))?
                }
                Err(e) => return Err(local_error(&display, e)),
            };
            cur = Some(fd);
        }
        let fd = cur.expect("at least one component");
        Ok(ConfinedDir {
            fd: Rc::new(fd),
            path: display,
        })
    }

    /// Creates `name` in this directory for writing: exclusive (fails if
    /// anything stands there) when `exclusive`, else truncating an existing
    /// regular file. Never opens through a link; refuses anything but a
    /// regular file (a FIFO or device planted there). On a ring that does
    /// local files the open is an op of the reactor; a caller gone before
    /// it completes leaves the file removed.
    pub(crate) async fn create_file(
        &self,
        name: &OsStr,
        mode: u32,
        exclusive: bool,
    ) -> Result<fs::File> {
        let display = self.path.join(name);
        let c = component(&self.path, name)?;
        // O_NONBLOCK only where something may already stand at the name (a
        // FIFO would block the open), and cleared once the file is known
        // to be regular: a ring write to a file with O_NONBLOCK on a
        // filesystem that cannot write without waiting fails with EAGAIN
        // instead of waiting. O_EXCL only ever creates a regular file.
        let flags = libc::O_WRONLY
            | libc::O_CREAT
            | libc::O_NOFOLLOW
            | if exclusive {
                libc::O_EXCL
            } else {
                libc::O_TRUNC | libc::O_NONBLOCK
            };
        let (dir, created) = (self.fd.clone(), c.clone());
        let abandoned = move || {
            // SAFETY: `created` is NUL-terminated and `dir` held open by
            // this closure; unlinkat removes that name in that directory.
            unsafe { libc::unlinkat(dir.as_raw_fd(), created.as_ptr(), 0) };
        };
        let file = files::open_at(&self.held(), &c, flags, mode, abandoned)
            .await
            .map_err(|e| local_error(&display, e))?;
        // `O_CREAT | O_EXCL` succeeds only by creating a regular file: the
        // check is for a name that already stood there.
        if !exclusive {
            let meta = file.metadata().map_err(|e| local_error(&display, e))?;
            if !meta.is_file() {
                return Err(Error::OutsideDestination {
                    path: display,
                    reason: "not a regular file".into(),
                });
            }
            // SAFETY: F_SETFL on an fd `file` owns; no pointer is passed.
            let r = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_SETFL, 0) };
            check(r).map_err(|e| local_error(&display, e))?;
        }
        Ok(file)
    }

    /// This directory's fd, for the reactor's file ops to hold.
    pub(crate) fn held(&self) -> HeldFd {
        self.fd.clone()
    }

    /// `lstat` of `name` in this directory.
    pub(crate) fn stat(&self, name: &OsStr) -> io::Result<libc::stat> {
        let c = cstr(name)?;
        // SAFETY: a zeroed `stat` is a valid value for the kernel to fill.
        let mut st: libc::stat = unsafe { std::mem::zeroed() };
        // SAFETY: `c` is NUL-terminated, `st` writable and ours, the fd open.
        let r = unsafe {
            libc::fstatat(
                self.fd.as_raw_fd(),
                c.as_ptr(),
                &mut st,
                libc::AT_SYMLINK_NOFOLLOW,
            )
        };
        check(r)?;
        Ok(st)
    }

    /// Renames `from` to `to`, both in this directory. A link standing at
    /// `to` is replaced, not followed.
    pub(crate) fn rename(&self, from: &OsStr, to: &OsStr) -> Result<()> {
        let display = self.path.join(to);
        let (f, t) = (component(&self.path, from)?, component(&self.path, to)?);
        let fd = self.fd.as_raw_fd();
        // SAFETY: both names NUL-terminated, the fd open for the call.
        let r = unsafe { libc::renameat(fd, f.as_ptr(), fd, t.as_ptr()) };
        check(r).map_err(|e| local_error(&display, e))
    }

    /// [`ConfinedDir::rename`] as an op of the reactor where the ring does
    /// local files.
    pub(crate) async fn rename_file(&self, from: &OsStr, to: &OsStr) -> Result<()> {
        let display = self.path.join(to);
        let (f, t) = (component(&self.path, from)?, component(&self.path, to)?);
        files::rename_at(&self.held(), &f, &t)
            .await
            .map_err(|e| local_error(&display, e))
    }

    /// Removes the file (or link) `name` of this directory.
    pub(crate) fn unlink(&self, name: &OsStr) -> io::Result<()> {
        if name_problem(name.as_bytes()).is_some() {
            return Err(io::Error::from_raw_os_error(libc::EINVAL));
        }
        let c = cstr(name)?;
        // SAFETY: `c` NUL-terminated, the fd open for the call.
        check(unsafe { libc::unlinkat(self.fd.as_raw_fd(), c.as_ptr(), 0) })
    }

    /// Creates the link `name` -> `target` in this directory, replacing a
    /// file or link standing there (a directory stays, and is an error).
    /// The target is data: it is stored, never resolved.
    pub(crate) fn symlink(&self, target: &[u8], name: &OsStr) -> Result<()> {
        let display = self.path.join(name);
        let t = CString::new(target).map_err(|_| Error::UnsafeName {
            name: escape_name(target),
            listed_in: display.display().to_string(),
            reason: "link target holds a NUL byte",
        })?;
        component(&self.path, name)?;
        let temp = temp_name(name);
        let c = component(&self.path, &temp)?;
        // SAFETY: both strings NUL-terminated, the fd open for the call;
        // symlinkat creates the link itself at `c`, resolving nothing.
        let r = unsafe { libc::symlinkat(t.as_ptr(), self.fd.as_raw_fd(), c.as_ptr()) };
        check(r).map_err(|e| local_error(&display, e))?;
        if let Err(e) = self.rename(&temp, name) {
            let _ = self.unlink(&temp);
            return Err(e);
        }
        Ok(())
    }
}

/// The directories below one root that files are being written into,
/// each opened once (beneath the root, without following links) and kept
/// for the files that follow: a tree of many small files costs no
/// `openat2` and `close` per file.
pub(crate) struct DirCache {
    root: Rc<ConfinedDir>,
    open: RefCell<HashMap<RelPath, Rc<ConfinedDir>>>,
}

/// Directories a [`DirCache`] keeps open at most; past that it starts
/// over (files still being written keep their own directory open).
const DIRS_KEPT: usize = 64;

impl DirCache {
    /// A cache of the directories below `root`.
    pub(crate) fn new(root: Rc<ConfinedDir>) -> DirCache {
        DirCache {
            root,
            open: RefCell::default(),
        }
    }

    /// The root itself.
    pub(crate) fn root(&self) -> &Rc<ConfinedDir> {
        &self.root
    }

    /// The directory at `rel` below the root, created where missing (see
    /// [`ConfinedDir::dir`]).
    pub(crate) fn dir(&self, rel: &RelPath) -> Result<Rc<ConfinedDir>> {
        if rel.depth() == 0 {
            return Ok(self.root.clone());
        }
        if let Some(d) = self.open.borrow().get(rel) {
            return Ok(d.clone());
        }
        let d = Rc::new(self.root.dir(rel, true)?);
        let mut open = self.open.borrow_mut();
        if open.len() >= DIRS_KEPT {
            open.clear();
        }
        open.insert(rel.clone(), d.clone());
        Ok(d)
    }
}

/// A temporary name for `name` in the same directory, unique in this
/// process, within `NAME_MAX`.
pub(crate) fn temp_name(name: &OsStr) -> OsString {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    let n = N.fetch_add(1, Ordering::Relaxed);
    let bytes = name.as_bytes();
    let keep = &bytes[..bytes.len().min(NAME_MAX - 48)];
    let mut v = Vec::with_capacity(keep.len() + 48);
    v.push(b'.');
    v.extend_from_slice(keep);
    v.extend_from_slice(format!(".{}-{n}.part", std::process::id()).as_bytes());
    OsString::from_vec(v)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::reactor::files::now;
    use std::os::unix::fs::symlink;

    #[test]
    fn names_that_are_not_one_component_are_refused() {
        for bad in [
            &b""[..],
            b".",
            b"..",
            b"a/b",
            b"/etc",
            b"../x",
            b"a\0b",
            &[b'x'; 256],
        ] {
            assert!(name_problem(bad).is_some(), "{}", escape_name(bad));
        }
        for good in [
            &b"a"[..],
            b"..a",
            b"a..",
            b".hidden",
            b"\xff\xfe",
            &[b'x'; 255],
        ] {
            assert_eq!(name_problem(good), None, "{}", escape_name(good));
        }
        let e = check_name(b"../\x1b[2J", Path::new("/d")).unwrap_err();
        assert_eq!(
            e.to_string(),
            "refused name \"../\\x1b[2J\" listed in /d: holds a '/'"
        );
    }

    #[test]
    fn safe_links_stay_inside_the_tree() {
        assert!(link_stays_inside(b"a/b", 0));
        assert!(link_stays_inside(b"../x", 1));
        assert!(link_stays_inside(b"./../x/../y", 2));
        assert!(!link_stays_inside(b"../x", 0));
        assert!(!link_stays_inside(b"a/../../x", 0));
        assert!(!link_stays_inside(b"/etc/passwd", 3));
        assert!(!link_stays_inside(b"", 0));
    }

    fn rel(parts: &[&str]) -> RelPath {
        let mut r = RelPath::default();
        for p in parts {
            r = r.child(p.as_bytes());
        }
        r
    }

    #[test]
    fn directories_are_created_beneath_the_root_and_links_are_not_followed() {
        assert!(have_openat2(), "this kernel should have openat2 (5.6)");
        confinement_holds(true);
    }

    #[test]
    fn the_walk_without_openat2_confines_the_same() {
        confinement_holds(false);
    }

    fn confinement_holds(use_openat2: bool) {
        let t = tempfile::tempdir().unwrap();
        let outside = t.path().join("outside");
        fs::create_dir(&outside).unwrap();
        let root = ConfinedDir::open_root(&t.path().join("dest")).unwrap();
        let d = root
            .dir_with(&rel(&["a", "b", "c"]), true, use_openat2)
            .unwrap();
        assert!(t.path().join("dest/a/b/c").is_dir());
        now(d.create_file(OsStr::new("f"), 0o644, true)).unwrap();
        assert!(t.path().join("dest/a/b/c/f").is_file());

        // A link planted in the destination, to a directory outside.
        symlink(&outside, t.path().join("dest/a/evil")).unwrap();
        let e = root
            .dir_with(&rel(&["a", "evil"]), true, use_openat2)
            .unwrap_err();
        assert!(matches!(e, Error::OutsideDestination { .. }), "{e}");
        let e = root
            .dir_with(&rel(&["a", "evil", "deeper"]), true, use_openat2)
            .unwrap_err();
        assert!(matches!(e, Error::OutsideDestination { .. }), "{e}");
        assert_eq!(fs::read_dir(&outside).unwrap().count(), 0);

        // A link where a file goes: creating refuses it, renaming replaces it.
        let a = root.dir_with(&rel(&["a"]), false, use_openat2).unwrap();
        symlink(outside.join("target"), t.path().join("dest/a/file")).unwrap();
        let e = now(a.create_file(OsStr::new("file"), 0o644, false)).unwrap_err();
        assert!(matches!(e, Error::OutsideDestination { .. }), "{e}");
        let e = now(a.create_file(OsStr::new("file"), 0o644, true)).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::AlreadyExists, "{e}");
        now(a.create_file(OsStr::new("tmp"), 0o644, true)).unwrap();
        a.rename(OsStr::new("tmp"), OsStr::new("file")).unwrap();
        assert!(
            fs::symlink_metadata(t.path().join("dest/a/file"))
                .unwrap()
                .is_file()
        );
        assert!(!outside.join("target").exists());

        // Names that are not plain never reach the kernel, whichever call.
        for bad in ["..", "../x", "a/b", ""] {
            let bad = OsStr::new(bad);
            assert!(matches!(
                now(a.create_file(bad, 0o644, true)),
                Err(Error::OutsideDestination { .. })
            ));
            assert!(a.rename(OsStr::new("file"), bad).is_err());
            assert!(a.symlink(b"t", bad).is_err());
            assert!(a.unlink(bad).is_err());
        }
        // Components that are not plain names never reach the kernel.
        let e = root
            .dir_with(&RelPath(vec!["..".into()]), true, use_openat2)
            .unwrap_err();
        assert!(matches!(e, Error::OutsideDestination { .. }), "{e}");
    }

    #[test]
    fn a_cached_directory_is_opened_once_and_links_stay_refused() {
        let t = tempfile::tempdir().unwrap();
        let cache = DirCache::new(Rc::new(ConfinedDir::open_root(t.path()).unwrap()));
        let ab = rel(&["a", "b"]);
        let first = cache.dir(&ab).unwrap();
        assert!(t.path().join("a/b").is_dir());
        assert!(Rc::ptr_eq(&first, &cache.dir(&ab).unwrap()));
        assert!(Rc::ptr_eq(cache.root(), &cache.dir(&rel(&[])).unwrap()));
        // A link planted where a directory should be is refused through
        // the cache as through `ConfinedDir::dir`.
        let outside = tempfile::tempdir().unwrap();
        symlink(outside.path(), t.path().join("a/c")).unwrap();
        assert!(matches!(
            cache.dir(&rel(&["a", "c", "d"])),
            Err(Error::OutsideDestination { .. })
        ));
        assert_eq!(fs::read_dir(outside.path()).unwrap().count(), 0);
        // The cache holds a bounded number of directories.
        for i in 0..DIRS_KEPT + 5 {
            cache.dir(&rel(&["many", &i.to_string()])).unwrap();
            assert!(cache.open.borrow().len() <= DIRS_KEPT);
        }
        // A directory still in use stays usable after the cache let go.
        now(first.create_file(OsStr::new("f"), 0o600, true)).unwrap();
        assert!(t.path().join("a/b/f").is_file());
    }

    /// Files are created blocking (a ring write to an `O_NONBLOCK` file
    /// may fail with EAGAIN where a blocking write would wait).
    #[test]
    fn created_files_are_left_blocking() {
        let t = tempfile::tempdir().unwrap();
        let root = ConfinedDir::open_root(t.path()).unwrap();
        fs::write(t.path().join("old"), b"x").unwrap();
        for (name, exclusive) in [("new", true), ("old", false)] {
            let f = now(root.create_file(OsStr::new(name), 0o600, exclusive)).unwrap();
            // SAFETY: F_GETFL on an fd `f` owns.
            let flags = unsafe { libc::fcntl(f.as_raw_fd(), libc::F_GETFL) };
            assert!(flags >= 0);
            assert_eq!(flags & libc::O_NONBLOCK, 0, "{name}");
        }
    }

    #[test]
    fn links_are_stored_not_resolved_and_replace_what_stood_there() {
        let t = tempfile::tempdir().unwrap();
        let root = ConfinedDir::open_root(t.path()).unwrap();
        root.symlink(b"/", OsStr::new("l")).unwrap();
        assert_eq!(fs::read_link(t.path().join("l")).unwrap(), Path::new("/"));
        fs::write(t.path().join("f"), b"x").unwrap();
        root.symlink(b"../../..", OsStr::new("f")).unwrap();
        assert_eq!(
            fs::read_link(t.path().join("f")).unwrap(),
            Path::new("../../..")
        );
        fs::create_dir(t.path().join("d")).unwrap();
        assert!(root.symlink(b"x", OsStr::new("d")).is_err());
        // Nothing left behind but the three entries.
        assert_eq!(fs::read_dir(t.path()).unwrap().count(), 3);
    }

    #[test]
    fn temporary_names_fit_name_max() {
        let long = OsString::from_vec(vec![b'n'; 255]);
        assert!(temp_name(&long).len() <= NAME_MAX);
        assert_ne!(temp_name(OsStr::new("a")), temp_name(OsStr::new("a")));
    }
}
