//! What the benchmarks that run OpenSSH's client tools share: their
//! options, the many-files tool commands, test trees and their comparison,
//! and the CPU of waited-for child processes.

use std::path::Path;
use std::process::{Command, Stdio};

/// `ssh`/`scp`/`sftp` options: batch mode, only the given key, strict host
/// keys from `known_hosts`, one cipher and curve25519-sha256.
pub fn ssh_opts(known_hosts: &Path, key: &Path, cipher: &str) -> Vec<String> {
    [
        "-o",
        "BatchMode=yes",
        "-o",
        "IdentitiesOnly=yes",
        "-o",
        "StrictHostKeyChecking=yes",
        "-o",
        &format!("UserKnownHostsFile={}", known_hosts.display()),
        "-o",
        &format!("Ciphers={cipher}"),
        "-o",
        "KexAlgorithms=curve25519-sha256",
        "-i",
        &key.display().to_string(),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

/// CPU seconds (user + sys) of this process, or of its waited-for children.
pub fn cpu(children: bool) -> f64 {
    let (u, s) = cpu_split(children);
    u + s
}

/// User and system CPU seconds of this process, or of its waited-for children.
pub fn cpu_split(children: bool) -> (f64, f64) {
    let who = if children {
        libc::RUSAGE_CHILDREN
    } else {
        libc::RUSAGE_SELF
    };
    // SAFETY: an all-zero rusage is a valid value; getrusage fills it.
    let u = unsafe {
        let mut u: libc::rusage = std::mem::zeroed();
        libc::getrusage(who, &mut u);
        u
    };
    let t = |tv: libc::timeval| tv.tv_sec as f64 + tv.tv_usec as f64 / 1e6;
    (t(u.ru_utime), t(u.ru_stime))
}

/// The median (the upper one of an even count); NaN if empty.
pub fn median(v: &[f64]) -> f64 {
    let mut v: Vec<f64> = v.iter().copied().filter(|x| !x.is_nan()).collect();
    v.sort_by(f64::total_cmp);
    if v.is_empty() {
        f64::NAN
    } else {
        v[v.len() / 2]
    }
}

/// Whether `tool` is on `PATH`.
pub fn have(tool: &str) -> bool {
    Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {tool}"))
        .stdout(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

/// Runs a shell script; panics if it fails.
pub fn sh(script: &str) {
    let st = Command::new("sh")
        .arg("-c")
        .arg(script)
        .stdout(Stdio::null())
        .status()
        .expect("sh");
    assert!(st.success(), "failed: {script}");
}

/// `files` files of `size` pseudo-random bytes in 50 subdirectories of `root`.
pub fn write_tree(root: &Path, files: usize, size: usize) {
    let mut buf = vec![0u8; size];
    for i in 0..files {
        let dir = root.join(format!("d{:02}", i % 50));
        if i < 50 {
            std::fs::create_dir_all(&dir).unwrap();
        }
        let mut x = i as u64 * 0x9e37_79b9_7f4a_7c15 + 1;
        for b in buf.chunks_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            b.copy_from_slice(&x.to_le_bytes()[..b.len()]);
        }
        std::fs::write(dir.join(format!("f{i}")), &buf).unwrap();
    }
}

/// Every file of `src` (a [`write_tree`] tree) is in `dst` with the same bytes.
pub fn same_tree(src: &Path, dst: &Path, files: usize) {
    let mut n = 0;
    for d in std::fs::read_dir(src).unwrap().flatten() {
        for f in std::fs::read_dir(d.path()).unwrap().flatten() {
            let rel = f.path().strip_prefix(src).unwrap().to_path_buf();
            let a = std::fs::read(f.path()).unwrap();
            let b = std::fs::read(dst.join(&rel))
                .unwrap_or_else(|e| panic!("{}: {e}", dst.join(&rel).display()));
            assert!(a == b, "{} differs", rel.display());
            n += 1;
        }
    }
    assert_eq!(n, files);
}

/// A file of `len` pseudo-random bytes.
pub fn write_file(path: &Path, len: usize) {
    let mut block = vec![0u8; 8 << 20];
    let mut x = 0x1234_5678_9abc_def1u64;
    for b in block.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        b.copy_from_slice(&x.to_le_bytes()[..b.len()]);
    }
    let mut f = std::fs::File::create(path).expect("create");
    let mut left = len;
    while left > 0 {
        let n = left.min(block.len());
        std::io::Write::write_all(&mut f, &block[..n]).expect("write");
        left -= n;
    }
}

/// `sftp` batch command `get`/`put` of one file.
pub fn sftp_one(cmd: &str, from: &Path, to: &Path, port: u16, opts: &str, target: &str) -> String {
    format!(
        "echo '{cmd} {} {}' | sftp -q -b - -P {port} {opts} {target}",
        from.display(),
        to.display()
    )
}

/// The OpenSSH-based ways to fetch the tree `src` (name, shell command with
/// `{dst}` for the destination), those whose tool is installed.
pub fn tree_tools(src: &Path, port: u16, opts: &str, target: &str) -> Vec<(&'static str, String)> {
    let src = src.display();
    let tools = vec![
        (
            "sftp get -r",
            format!("echo 'get -r {src} {{dst}}' | sftp -q -b - -P {port} {opts} {target}"),
        ),
        (
            "scp -r",
            format!("scp -q -r -P {port} {opts} {target}:{src} {{dst}}"),
        ),
        (
            "scp -O -r",
            format!("scp -q -O -r -P {port} {opts} {target}:{src} {{dst}}"),
        ),
        (
            "rsync -a",
            format!("rsync -a -e 'ssh -p {port} {opts}' {target}:{src}/ {{dst}}/"),
        ),
        (
            "ssh tar | tar",
            format!(
                "mkdir -p {{dst}} && ssh -p {port} {opts} {target} 'tar -C {src} -cf - .' | tar -C {{dst}} -xf -"
            ),
        ),
    ];
    tools
        .into_iter()
        .filter(|(n, _)| have(n.split(' ').next().unwrap()))
        .collect()
}
