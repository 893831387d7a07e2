//! Builds the libssh2 this crate links: the sources the `libssh2-sys` crate
//! ships, with the patch series in `libssh2-patches/` applied, compiled with
//! the defines `libssh2-sys` uses on Unix (OpenSSL backend, zlib).
//!
//! The result is linked as a whole archive from this crate, so every libssh2
//! symbol is defined before the linker reaches `libssh2-sys`'s own copy, and
//! nothing of that copy is pulled in. A test checks the version string that
//! the series sets (`libssh2_version()` ends in `+uring-ssh.N`).
//!
//! Steps: find the `libssh2-sys` package (the version pinned in Cargo.toml)
//! and check it is the copy `libssh2-sys` built (its `libssh2.h` matches the
//! one `libssh2-sys` exported as `DEP_SSH2_INCLUDE`); copy `libssh2/src` and
//! `libssh2/include` into `OUT_DIR`; apply every `libssh2-patches/*.patch` in
//! name order (a patch that does not apply fails the build, naming it);
//! compile with `cc`.
//!
//! `URING_SSH_LIBSSH2_SYS_DIR` may name the `libssh2-sys` package directory
//! explicitly (for vendored or unusual registry layouts).
//! `URING_SSH_LIBSSH2_PATCHES_UPTO=NNNN` applies only the patches whose
//! names sort up to `NNNN` (for measuring the series patch by patch; `0001`
//! gives libssh2 as `libssh2-sys` builds it, plus the version tag).

use std::env;
use std::fs;
use std::path::{Path, PathBuf};

/// The `libssh2-sys` version the patch series is written against; Cargo.toml
/// pins the same version with `=`.
const LIBSSH2_SYS_VERSION: &str = "0.3.4";

/// libssh2's C files, as `libssh2-sys` compiles them (the files of other
/// crypto backends compile to nothing with `LIBSSH2_OPENSSL`).
const SOURCES: &[&str] = &[
    "agent.c",
    "bcrypt_pbkdf.c",
    "blowfish.c",
    "chacha.c",
    "channel.c",
    "cipher-chachapoly.c",
    "comp.c",
    "crypt.c",
    "global.c",
    "hostkey.c",
    "keepalive.c",
    "kex.c",
    "knownhost.c",
    "libgcrypt.c",
    "mac.c",
    "mbedtls.c",
    "misc.c",
    "openssl.c",
    "os400qc3.c",
    "packet.c",
    "pem.c",
    "poly1305.c",
    "publickey.c",
    "scp.c",
    "session.c",
    "sftp.c",
    "transport.c",
    "userauth.c",
    "userauth_kbd_packet.c",
    "version.c",
    "wincng.c",
];

fn main() {
    let manifest_dir = PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").unwrap());
    let out_dir = PathBuf::from(env::var_os("OUT_DIR").unwrap());
    let patches_dir = manifest_dir.join("libssh2-patches");

    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed=libssh2-patches");
    println!("cargo:rerun-if-env-changed=URING_SSH_LIBSSH2_SYS_DIR");
    println!("cargo:rerun-if-env-changed=URING_SSH_LIBSSH2_PATCHES_UPTO");
    println!("cargo:rerun-if-env-changed=DEP_SSH2_INCLUDE");
    println!("cargo:rerun-if-env-changed=DEP_Z_INCLUDE");
    println!("cargo:rerun-if-env-changed=DEP_OPENSSL_INCLUDE");

    let target = env::var("TARGET").unwrap();
    if target.contains("windows") {
        panic!("uring-ssh builds its libssh2 for Unix targets only (io_uring is Linux-only)");
    }

    let sys_dir = find_libssh2_sys();
    let upstream = sys_dir.join("libssh2");

    // A fresh copy every time: patches are applied to pristine sources.
    let tree = out_dir.join("libssh2");
    if tree.exists() {
        fs::remove_dir_all(&tree).expect("remove the old libssh2 copy in OUT_DIR");
    }
    copy_dir(&upstream.join("src"), &tree.join("src"));
    copy_dir(&upstream.join("include"), &tree.join("include"));

    let mut patches: Vec<PathBuf> = fs::read_dir(&patches_dir)
        .unwrap_or_else(|e| panic!("read {}: {e}", patches_dir.display()))
        .map(|e| e.expect("read libssh2-patches").path())
        .filter(|p| p.extension().is_some_and(|x| x == "patch"))
        .collect();
    patches.sort();
    if let Ok(upto) = env::var("URING_SSH_LIBSSH2_PATCHES_UPTO") {
        patches.retain(|p| {
            let name = p.file_name().unwrap().to_string_lossy();
            name.get(..upto.len()).is_some_and(|n| n <= upto.as_str())
        });
        println!("cargo:warning=libssh2 patches applied up to {upto} only");
    }
    for patch in &patches {
        println!("cargo:rerun-if-changed={}", patch.display());
        let name = patch
            .strip_prefix(&manifest_dir)
            .unwrap_or(patch)
            .display()
            .to_string();
        let text = fs::read_to_string(patch).unwrap_or_else(|e| panic!("read {name}: {e}"));
        if let Err(e) = apply_patch(&tree, &text) {
            panic!(
                "{name} does not apply to the libssh2 sources of libssh2-sys {LIBSSH2_SYS_VERSION} \
                 in {}: {e}",
                upstream.display()
            );
        }
    }

    compile(&tree, &out_dir);
}

/// The `libssh2-sys` package directory: the explicit override, else the
/// pinned version in Cargo's registry sources. Checked against the header
/// `libssh2-sys` itself exported.
fn find_libssh2_sys() -> PathBuf {
    let exported = env::var_os("DEP_SSH2_INCLUDE").map(|p| PathBuf::from(p).join("libssh2.h"));
    let exported_header = exported.as_ref().map(|p| {
        fs::read(p).unwrap_or_else(|e| panic!("read {} (from libssh2-sys): {e}", p.display()))
    });
    let matches = |dir: &Path| -> bool {
        let header = dir.join("libssh2/include/libssh2.h");
        let Ok(bytes) = fs::read(&header) else {
            return false;
        };
        dir.join("libssh2/src/transport.c").is_file()
            && exported_header.as_ref().is_none_or(|h| *h == bytes)
    };

    if let Some(dir) = env::var_os("URING_SSH_LIBSSH2_SYS_DIR") {
        let dir = PathBuf::from(dir);
        if !matches(&dir) {
            panic!(
                "URING_SSH_LIBSSH2_SYS_DIR={} is not the libssh2-sys {LIBSSH2_SYS_VERSION} \
                 package this build uses (no libssh2/src, or its libssh2.h differs from \
                 the one libssh2-sys exported)",
                dir.display()
            );
        }
        return dir;
    }

    let cargo_home = env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo")))
        .expect("neither CARGO_HOME nor HOME is set");
    let package = format!("libssh2-sys-{LIBSSH2_SYS_VERSION}");
    let mut candidates = Vec::new();
    if let Ok(registries) = fs::read_dir(cargo_home.join("registry/src")) {
        for registry in registries.flatten() {
            candidates.push(registry.path().join(&package));
        }
    }
    // `cargo vendor` layouts next to the workspace.
    let manifest_dir = PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").unwrap());
    for up in manifest_dir.ancestors().take(3) {
        candidates.push(up.join("vendor/libssh2-sys"));
    }
    candidates.sort();
    candidates
        .into_iter()
        .find(|dir| matches(dir))
        .unwrap_or_else(|| {
            panic!(
                "could not find the sources of libssh2-sys {LIBSSH2_SYS_VERSION} under \
                 {}/registry/src/*/{package} (or a vendor/ directory); set \
                 URING_SSH_LIBSSH2_SYS_DIR to the package directory",
                cargo_home.display()
            )
        })
}

fn copy_dir(from: &Path, to: &Path) {
    fs::create_dir_all(to).unwrap_or_else(|e| panic!("create {}: {e}", to.display()));
    for entry in fs::read_dir(from).unwrap_or_else(|e| panic!("read {}: {e}", from.display())) {
        let entry = entry.expect("read dir entry");
        let path = entry.path();
        let dest = to.join(entry.file_name());
        if entry.file_type().expect("file type").is_dir() {
            copy_dir(&path, &dest);
        } else {
            fs::copy(&path, &dest)
                .unwrap_or_else(|e| panic!("copy {} to {}: {e}", path.display(), dest.display()));
        }
    }
}

/// Compiles the patched tree like `libssh2-sys` does on Unix, and links it
/// as a whole archive.
fn compile(tree: &Path, out_dir: &Path) {
    let src = tree.join("src");
    let include = tree.join("include");
    let build = out_dir.join("build");
    fs::create_dir_all(&build).expect("create OUT_DIR/build");

    // libssh2_config.h as libssh2-sys makes it: the cmake template without
    // its #cmakedefine lines (everything is defined on the command line).
    let template = fs::read_to_string(src.join("libssh2_config_cmake.h.in"))
        .expect("read libssh2_config_cmake.h.in");
    let config: Vec<&str> = template
        .lines()
        .filter(|l| !l.contains("#cmakedefine"))
        .collect();
    fs::write(build.join("libssh2_config.h"), config.join("\n")).expect("write libssh2_config.h");

    let mut cfg = cc::Build::new();
    for file in SOURCES {
        cfg.file(src.join(file));
    }
    cfg.include(&include)
        .include(&src)
        .include(&build)
        .out_dir(&build);
    for define in [
        "HAVE_LONGLONG",
        "HAVE_SNPRINTF",
        "HAVE_UNISTD_H",
        "HAVE_INTTYPES_H",
        "HAVE_STDLIB_H",
        "HAVE_SYS_SELECT_H",
        "HAVE_SYS_SOCKET_H",
        "HAVE_SYS_IOCTL_H",
        "HAVE_SYS_TIME_H",
        "HAVE_SYS_UN_H",
        "HAVE_O_NONBLOCK",
        "LIBSSH2_OPENSSL",
        "HAVE_LIBCRYPT32",
        "HAVE_EVP_AES_128_CTR",
        "HAVE_POLL",
        "HAVE_GETTIMEOFDAY",
        "LIBSSH2_DH_GEX_NEW",
        "LIBSSH2_HAVE_ZLIB",
        // ML-KEM from src/mlkem.rs (patch 0012): OpenSSL 3.0 has none.
        "LIBSSH2_MLKEM_EXTERNAL",
    ] {
        cfg.define(define, None);
    }
    cfg.flag("-fvisibility=hidden");
    if env::var("PROFILE").unwrap().contains("debug") {
        cfg.define("LIBSSH2DEBUG", None);
    }
    if let Some(path) = env::var_os("DEP_Z_INCLUDE") {
        cfg.include(path);
    }
    if let Some(paths) = env::var_os("DEP_OPENSSL_INCLUDE") {
        for path in env::split_paths(&paths) {
            if !path.as_os_str().is_empty() {
                cfg.include(path);
            }
        }
    }
    cfg.warnings(false);
    // Linking is ours: whole archive, so no member of libssh2-sys's copy is
    // ever needed (and none can be picked instead of ours).
    cfg.cargo_metadata(false);
    cfg.compile("uring_ssh_libssh2");
    println!("cargo:rustc-link-search=native={}", build.display());
    println!("cargo:rustc-link-lib=static:+whole-archive=uring_ssh_libssh2");
}

/// One hunk of a unified diff.
struct Hunk {
    old_start: usize,
    old: Vec<String>,
    new: Vec<String>,
}

/// Applies a unified diff (as `git diff` writes it) to the files under
/// `root`. Context must match exactly; a hunk may sit at another line than
/// it says (the nearest exact match wins). Text before the first `--- `
/// line is the patch's header and is ignored.
fn apply_patch(root: &Path, text: &str) -> Result<(), String> {
    let lines: Vec<&str> = text.lines().collect();
    let mut i = 0;
    let mut files = 0;
    while i < lines.len() {
        if !(lines[i].starts_with("--- ")
            && i + 1 < lines.len()
            && lines[i + 1].starts_with("+++ "))
        {
            i += 1;
            continue;
        }
        let old_path = diff_path(lines[i]);
        let new_path = diff_path(lines[i + 1]);
        i += 2;
        let mut hunks = Vec::new();
        while i < lines.len() && lines[i].starts_with("@@ ") {
            let (old_start, old_len, new_len) = parse_hunk_header(lines[i])?;
            i += 1;
            let mut hunk = Hunk {
                old_start,
                old: Vec::new(),
                new: Vec::new(),
            };
            while hunk.old.len() < old_len || hunk.new.len() < new_len {
                let line = lines
                    .get(i)
                    .ok_or_else(|| format!("{new_path}: hunk at line {old_start} is cut short"))?;
                i += 1;
                match line.chars().next() {
                    Some(' ') | None => {
                        let body = line.get(1..).unwrap_or("").to_string();
                        hunk.old.push(body.clone());
                        hunk.new.push(body);
                    }
                    Some('-') => hunk.old.push(line[1..].to_string()),
                    Some('+') => hunk.new.push(line[1..].to_string()),
                    Some('\\') => {}
                    _ => return Err(format!("{new_path}: bad line in hunk: {line:?}")),
                }
            }
            while i < lines.len() && lines[i].starts_with('\\') {
                i += 1;
            }
            hunks.push(hunk);
        }
        apply_file(root, old_path, new_path, &hunks)?;
        files += 1;
    }
    if files == 0 {
        return Err("no file changes found in the patch".to_string());
    }
    Ok(())
}

/// `src/transport.c` from `--- a/src/transport.c` (or `/dev/null`).
fn diff_path(line: &str) -> &str {
    let path = line[4..].split('\t').next().unwrap_or("").trim_end();
    path.strip_prefix("a/")
        .or_else(|| path.strip_prefix("b/"))
        .unwrap_or(path)
}

/// `@@ -l,s +l,s @@` to (old start, old length, new length).
fn parse_hunk_header(line: &str) -> Result<(usize, usize, usize), String> {
    let bad = || format!("bad hunk header {line:?}");
    let mut parts = line.split_whitespace().skip(1);
    let range = |part: Option<&str>, sign: char| -> Result<(usize, usize), String> {
        let part = part.and_then(|p| p.strip_prefix(sign)).ok_or_else(bad)?;
        let (start, len) = part.split_once(',').unwrap_or((part, "1"));
        Ok((
            start.parse().map_err(|_| bad())?,
            len.parse().map_err(|_| bad())?,
        ))
    };
    let (old_start, old_len) = range(parts.next(), '-')?;
    let (_, new_len) = range(parts.next(), '+')?;
    Ok((old_start, old_len, new_len))
}

fn apply_file(root: &Path, old_path: &str, new_path: &str, hunks: &[Hunk]) -> Result<(), String> {
    let target = root.join(new_path);
    let mut content: Vec<String> = if old_path == "/dev/null" {
        Vec::new()
    } else {
        let text = fs::read_to_string(root.join(old_path))
            .map_err(|e| format!("{old_path}: cannot read it: {e}"))?;
        text.lines().map(str::to_string).collect()
    };
    // Hunks are in file order; `shift` is how far earlier hunks moved lines.
    let mut shift: isize = 0;
    let mut floor = 0usize;
    for (n, hunk) in hunks.iter().enumerate() {
        let expected = (hunk.old_start.saturating_sub(1) as isize + shift).max(0) as usize;
        let at = find_block(&content, &hunk.old, expected, floor).ok_or_else(|| {
            format!(
                "{new_path}: hunk #{} (at line {}) does not match the source",
                n + 1,
                hunk.old_start
            )
        })?;
        content.splice(at..at + hunk.old.len(), hunk.new.iter().cloned());
        shift += hunk.new.len() as isize - hunk.old.len() as isize;
        shift += at as isize - expected as isize;
        floor = at + hunk.new.len();
    }
    if new_path == "/dev/null" {
        return fs::remove_file(root.join(old_path)).map_err(|e| format!("{old_path}: {e}"));
    }
    let mut text = content.join("\n");
    text.push('\n');
    if let Some(parent) = target.parent() {
        fs::create_dir_all(parent).map_err(|e| format!("{new_path}: {e}"))?;
    }
    fs::write(&target, text).map_err(|e| format!("{new_path}: cannot write it: {e}"))
}

/// The start of `block` in `content` at or after `floor` nearest to
/// `expected`, matching exactly.
fn find_block(
    content: &[String],
    block: &[String],
    expected: usize,
    floor: usize,
) -> Option<usize> {
    if block.is_empty() {
        return Some(expected.clamp(floor, content.len()));
    }
    let last = content.len().checked_sub(block.len())?;
    let fits = |at: usize| at >= floor && at <= last && content[at..at + block.len()] == *block;
    (0..=content.len()).find_map(|d| {
        [expected.checked_sub(d), expected.checked_add(d)]
            .into_iter()
            .flatten()
            .find(|&at| fits(at))
    })
}
