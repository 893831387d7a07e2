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

use uring_ssh_testkit::sshd;
use uring_ssh_testkit::tools;

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

struct Row {
    name: String,
    secs: Vec<f64>,
    cpu: Vec<f64>,
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
    let opts = tools::ssh_opts(&sshd.known_hosts(), &sshd.user_key(), CIPHER).join(" ");
    println!(
        "sftp_vs_openssh: OpenSSH on 127.0.0.1:{port} (throwaway, internal-sftp), {CIPHER}, {KEX}, libssh2 {}",
        uring_ssh::libssh2_version()
    );

    if big > 0 {
        let src = d.join("big.bin");
        tools::write_file(&src, big * MIB);
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
                let (c0, cc0, t) = (tools::cpu(false), tools::cpu(true), Instant::now());
                match i {
                    0 => {
                        sftp.download(&src, &out).await.expect("download");
                    }
                    2 => {
                        sftp.upload(&src, &out).await.expect("upload");
                    }
                    1 | 3 => {
                        let cmd = if i == 1 { "get" } else { "put" };
                        let port = sshd.port();
                        tools::sh(&tools::sftp_one(cmd, &src, &out, port, &opts, &target));
                    }
                    _ => unreachable!(),
                }
                let secs = t.elapsed().as_secs_f64();
                let c = if i % 2 == 0 {
                    tools::cpu(false) - c0
                } else {
                    tools::cpu(true) - cc0
                };
                assert_eq!(std::fs::metadata(&out).unwrap().len(), (big * MIB) as u64);
                rows[i].secs.push(secs);
                rows[i].cpu.push(c);
            }
        }
        println!("\n{big} MiB file          MB/s   client CPU s/GiB");
        for r in &rows {
            let s = tools::median(&r.secs);
            println!(
                "{:<18} {:>7.0}   {:>6.2}",
                r.name,
                (big * MIB) as f64 / s / 1e6,
                tools::median(&r.cpu) / (big as f64 / 1024.0)
            );
        }
        drop(sftp);
        s.close("done").await.ok();
        std::fs::remove_file(&src).ok();
        std::fs::remove_file(d.join("big.out")).ok();
    }

    if files > 0 {
        let src = d.join("tree");
        tools::write_tree(&src, files, file_kib * 1024);
        tools::sh("sync");
        let mut names = vec![
            "ours 1 session".to_string(),
            format!("ours {sessions} sessions"),
        ];
        let commands = tools::tree_tools(&src, sshd.port(), &opts, &target);
        names.extend(commands.iter().map(|(n, _)| n.to_string()));
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
                let (c0, cc0, t) = (tools::cpu(false), tools::cpu(true), Instant::now());
                if i < 2 {
                    let over = if i == 0 { &clients[..1] } else { &clients[..] };
                    let r = download_tree_over(over, &src, &dst, &TransferOptions::default()).await;
                    assert!(r.is_complete(), "{:?}", r.failed().next());
                } else {
                    tools::sh(
                        &commands[i - 2]
                            .1
                            .replace("{dst}", &dst.display().to_string()),
                    );
                }
                let secs = t.elapsed().as_secs_f64();
                let c = if i < 2 {
                    tools::cpu(false) - c0
                } else {
                    tools::cpu(true) - cc0
                };
                tools::same_tree(&src, &dst, files);
                rows[i].secs.push(secs);
                rows[i].cpu.push(c);
            }
        }
        println!("\n{files} files of {file_kib} KiB   files/s    MB/s   client CPU s");
        for r in &rows {
            let s = tools::median(&r.secs);
            println!(
                "{:<22} {:>8.0} {:>7.1}   {:>6.2}",
                r.name,
                files as f64 / s,
                (files * file_kib * 1024) as f64 / s / 1e6,
                tools::median(&r.cpu)
            );
        }
    }
}
