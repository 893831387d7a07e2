//! SFTP throughput and many-file rates beside the OpenSSH client and the
//! tools fleet operators use today, against one throwaway OpenSSH server
//! on loopback (its internal-sftp), chacha20-poly1305 and
//! curve25519-sha256 for every row.
//!
//! * One file of `BIG_MIB` MiB (default 1024): [`Sftp::download`] /
//!   [`Sftp::upload`] on a connected session, and OpenSSH `sftp` `get` /
//!   `put` (its process timed whole, a ~0.1 s handshake included).
//! * `FILES` files of `FILE_KIB` KiB (default 10,000 × 4): fetched as a
//!   tree with [`Sftp::download_tree`] over one session and over
//!   `SESSIONS` sessions (default 4), and with `sftp get -r`, `scp -r`,
//!   `scp -O -r`, `rsync -a` over ssh and `ssh host tar c | tar x`. Every
//!   file is compared with its source after each row.
//!
//! Each row reports MB/s or files/s and the client's CPU seconds (user +
//! sys; for OpenSSH rows, the child processes'). Rows run in alternating
//! order over `ROUNDS` rounds (default 2); the median is printed.
//!
//! Files live in `BENCH_DIR` (default `/dev/shm`, a tmpfs), so that the
//! local file system does not decide the many-files rows.
//!
//! Run: `cargo bench --bench sftp_vs_openssh` (as root: the fixture's
//! sshd). Set `BIG_MIB=0` or `FILES=0` to skip a part, `ONLY_OURS=1` to
//! skip the OpenSSH rows of the many-files part (for profiling).

#[path = "../tests/common/sshd.rs"]
#[allow(dead_code)]
mod sshd;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Instant;

use uring_ssh::sftp::{Sftp, TransferOptions, download_tree_over};
use uring_ssh::{Config, MethodType, Session};

const MIB: usize = 1 << 20;
const CIPHER: &str = "chacha20-poly1305@openssh.com";
const KEX: &str = "curve25519-sha256";

fn env(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .map(|v| {
            v.parse()
                .unwrap_or_else(|_| panic!("{name} must be a number"))
        })
        .unwrap_or(default)
}

fn main() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(run());
}

async fn connect(sshd: &sshd::Sshd) -> Session {
    let cfg = Config::new()
        .known_hosts(Some(sshd.known_hosts()))
        .ciphers(CIPHER)
        .method(MethodType::Kex, KEX);
    let s = Session::connect_addr(sshd.addr(), cfg)
        .await
        .expect("connect");
    s.auth_pubkey_file(&sshd.user(), &sshd.user_key(), None)
        .await
        .expect("auth");
    s
}

fn ssh_opts(sshd: &sshd::Sshd) -> Vec<String> {
    [
        "-o",
        "BatchMode=yes",
        "-o",
        "IdentitiesOnly=yes",
        "-o",
        "StrictHostKeyChecking=yes",
        "-o",
        &format!("UserKnownHostsFile={}", sshd.known_hosts().display()),
        "-o",
        &format!("Ciphers={CIPHER}"),
        "-o",
        &format!("KexAlgorithms={KEX}"),
        "-i",
        &sshd.user_key().display().to_string(),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

/// CPU seconds (user + sys) of this process, or of its waited-for children.
fn cpu(children: bool) -> f64 {
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
    t(u.ru_utime) + t(u.ru_stime)
}

struct Row {
    name: String,
    secs: Vec<f64>,
    cpu: Vec<f64>,
}

fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    if v.is_empty() {
        f64::NAN
    } else {
        v[v.len() / 2]
    }
}

fn have(tool: &str) -> bool {
    Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {tool}"))
        .stdout(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

fn sh(script: &str) {
    let st = Command::new("sh")
        .arg("-c")
        .arg(script)
        .stdout(Stdio::null())
        .status()
        .expect("sh");
    assert!(st.success(), "failed: {script}");
}

fn write_tree(root: &Path, files: usize, size: usize) {
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

/// Every file of `src` is in `dst` with the same bytes.
fn same_tree(src: &Path, dst: &Path, files: usize) {
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

async fn run() {
    let big = env("BIG_MIB", 1024);
    let files = env("FILES", 10_000);
    let file_kib = env("FILE_KIB", 4);
    let sessions = env("SESSIONS", 4).max(1);
    let rounds = env("ROUNDS", 2).max(1);
    let sshd = sshd::Sshd::start();
    // tmpfs by default: on a disk file system, creating 10,000 files right
    // after deleting 10,000 (ext4's recently-deleted inode scan) costs more
    // than any of the SSH clients and hides the differences between them.
    let base = std::env::var("BENCH_DIR").unwrap_or_else(|_| "/dev/shm".into());
    let dir = tempfile::tempdir_in(&base).expect("temp dir");
    let d = dir.path();
    let target = format!("{}@127.0.0.1", sshd.user());
    let port = sshd.port().to_string();
    let opts = ssh_opts(&sshd).join(" ");
    println!(
        "sftp_vs_openssh: OpenSSH on 127.0.0.1:{port} (throwaway, internal-sftp), {CIPHER}, {KEX}, libssh2 {}",
        uring_ssh::libssh2_version()
    );

    if big > 0 {
        let src = d.join("big.bin");
        write_tree_file(&src, big * MIB);
        let s = connect(&sshd).await;
        let sftp = s.sftp().await.expect("sftp");
        println!("request sizes (read, write): {:?}", sftp.io_sizes());
        let mut rows: Vec<Row> = ["ours download", "sftp get", "ours upload", "sftp put"]
            .iter()
            .map(|n| Row {
                name: n.to_string(),
                secs: vec![],
                cpu: vec![],
            })
            .collect();
        for round in 0..rounds {
            let order: Vec<usize> = if round % 2 == 0 {
                vec![0, 1, 2, 3]
            } else {
                vec![1, 0, 3, 2]
            };
            for i in order {
                let out = d.join("big.out");
                let _ = std::fs::remove_file(&out);
                let (c0, cc0, t) = (cpu(false), cpu(true), Instant::now());
                match i {
                    0 => {
                        sftp.download(&src, &out).await.expect("download");
                    }
                    2 => {
                        sftp.upload(&src, &out).await.expect("upload");
                    }
                    1 | 3 => {
                        let cmd = if i == 1 { "get" } else { "put" };
                        sh(&format!(
                            "echo '{cmd} {} {}' | sftp -q -b - -P {port} {opts} {target}",
                            src.display(),
                            out.display()
                        ));
                    }
                    _ => unreachable!(),
                }
                let secs = t.elapsed().as_secs_f64();
                let c = if i % 2 == 0 {
                    cpu(false) - c0
                } else {
                    cpu(true) - cc0
                };
                assert_eq!(std::fs::metadata(&out).unwrap().len(), (big * MIB) as u64);
                rows[i].secs.push(secs);
                rows[i].cpu.push(c);
            }
        }
        println!("\n{big} MiB file          MB/s   client CPU s/GiB");
        for r in &rows {
            let s = median(&r.secs);
            println!(
                "{:<18} {:>7.0}   {:>6.2}",
                r.name,
                (big * MIB) as f64 / s / 1e6,
                median(&r.cpu) / (big as f64 / 1024.0)
            );
        }
        drop(sftp);
        s.close("done").await.ok();
        std::fs::remove_file(&src).ok();
        std::fs::remove_file(d.join("big.out")).ok();
    }

    if files > 0 {
        let src = d.join("tree");
        write_tree(&src, files, file_kib * 1024);
        sh("sync");
        let mut names = vec![
            "ours 1 session".to_string(),
            format!("ours {sessions} sessions"),
        ];
        let tools: Vec<(&str, String)> = vec![
            (
                "sftp get -r",
                format!(
                    "echo 'get -r {} {{dst}}' | sftp -q -b - -P {port} {opts} {target}",
                    src.display()
                ),
            ),
            (
                "scp -r",
                format!(
                    "scp -q -r -P {port} {opts} {target}:{} {{dst}}",
                    src.display()
                ),
            ),
            (
                "scp -O -r",
                format!(
                    "scp -q -O -r -P {port} {opts} {target}:{} {{dst}}",
                    src.display()
                ),
            ),
            (
                "rsync -a",
                format!(
                    "rsync -a -e 'ssh -p {port} {opts}' {target}:{}/ {{dst}}/",
                    src.display()
                ),
            ),
            (
                "ssh tar | tar",
                format!(
                    "mkdir -p {{dst}} && ssh -p {port} {opts} {target} 'tar -C {} -cf - .' | tar -C {{dst}} -xf -",
                    src.display()
                ),
            ),
        ];
        let tools: Vec<_> = tools
            .into_iter()
            .filter(|(n, _)| have(n.split(' ').next().unwrap()))
            .collect();
        names.extend(tools.iter().map(|(n, _)| n.to_string()));
        let mut rows: Vec<Row> = names
            .iter()
            .map(|n| Row {
                name: n.clone(),
                secs: vec![],
                cpu: vec![],
            })
            .collect();
        let ours: Vec<Session> = {
            let mut v = Vec::new();
            for _ in 0..sessions {
                v.push(connect(&sshd).await);
            }
            v
        };
        let mut clients: Vec<Sftp> = Vec::new();
        for s in &ours {
            clients.push(s.sftp().await.expect("sftp"));
        }
        for round in 0..rounds {
            let mut order: Vec<usize> = (0..rows.len()).collect();
            if round % 2 == 1 {
                order.reverse();
            }
            for i in order {
                let dst = d.join("dst");
                let _ = std::fs::remove_dir_all(&dst);
                let (c0, cc0, t) = (cpu(false), cpu(true), Instant::now());
                if i < 2 {
                    let over = if i == 0 { &clients[..1] } else { &clients[..] };
                    let r = download_tree_over(over, &src, &dst, &TransferOptions::default()).await;
                    assert!(r.is_complete(), "{:?}", r.failed().next());
                } else {
                    sh(&tools[i - 2].1.replace("{dst}", &dst.display().to_string()));
                }
                let secs = t.elapsed().as_secs_f64();
                let c = if i < 2 {
                    cpu(false) - c0
                } else {
                    cpu(true) - cc0
                };
                same_tree(&src, &dst, files);
                rows[i].secs.push(secs);
                rows[i].cpu.push(c);
            }
        }
        println!("\n{files} files of {file_kib} KiB   files/s    MB/s   client CPU s");
        for r in &rows {
            let s = median(&r.secs);
            println!(
                "{:<22} {:>8.0} {:>7.1}   {:>6.2}",
                r.name,
                files as f64 / s,
                (files * file_kib * 1024) as f64 / s / 1e6,
                median(&r.cpu)
            );
        }
    }
}

fn write_tree_file(path: &Path, len: usize) {
    let mut block = vec![0u8; 8 * MIB];
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
