//! Cipher cost: one session reading and one writing N MiB over exec from a
//! throwaway loopback OpenSSH server, per cipher, repeated; prints each run
//! and the medians of MB/s and client user/sys CPU seconds per GiB.
//!
//! `cargo run --release --example cipher_bench -- [--mib N] [--runs R]
//! [--cipher NAME]... [--only read|write] [--peers DIR]` (defaults: 1024
//! MiB, 3 runs, aes128-gcm and chacha20-poly1305, both directions).
//!
//! `--peers DIR`: also run the peer programs built in `DIR` (the
//! `benches/peers` crate: `cargo build --release` there, then
//! `--peers benches/peers/target/release`): ssh2-rs and russh doing the same
//! transfer against the same server, in alternating order with ours, each
//! reporting its own CPU. Every row pins the cipher and curve25519-sha256.
//! `scripts/compare.sh` runs this and every other scenario for more peers.

#[path = "../benches/peers/src/common.rs"]
mod client;
use uring_ssh_testkit::sshd;

use std::time::Instant;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use uring_ssh::{Config, MethodType, Session};

/// User and system CPU seconds of this process so far.
fn cpu() -> (f64, f64) {
    // SAFETY: getrusage fills the struct it is given.
    let ru = unsafe {
        let mut ru: libc::rusage = std::mem::zeroed();
        libc::getrusage(libc::RUSAGE_SELF, &mut ru);
        ru
    };
    let s = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    (s(ru.ru_utime), s(ru.ru_stime))
}

/// MB/s, user s/GiB, sys s/GiB.
type Figures = (f64, f64, f64);

fn figures(start: Instant, cpu0: (f64, f64), bytes: u64) -> Figures {
    let secs = start.elapsed().as_secs_f64();
    let (u, s) = cpu();
    let gib = bytes as f64 / (1u64 << 30) as f64;
    (
        bytes as f64 / secs / 1e6,
        (u - cpu0.0) / gib,
        (s - cpu0.1) / gib,
    )
}

async fn session(sshd: &sshd::Sshd, cipher: &str) -> Session {
    let cfg = Config::new()
        .known_hosts(Some(sshd.known_hosts()))
        .ciphers(cipher);
    let s = Session::connect_addr(sshd.addr(), cfg)
        .await
        .expect("connect");
    s.auth_pubkey_file(&sshd.user(), &sshd.user_key(), None)
        .await
        .expect("auth");
    assert_eq!(
        s.negotiated(MethodType::CipherServerToClient).as_deref(),
        Some(cipher)
    );
    s
}

async fn read(s: &Session, mib: usize) -> Figures {
    let mut ch = s
        .exec(&format!("head -c {} /dev/zero", mib << 20))
        .await
        .expect("exec");
    let mut buf = vec![0u8; 256 * 1024];
    let (start, cpu0) = (Instant::now(), cpu());
    let mut n = 0u64;
    loop {
        let k = ch.read(&mut buf).await.expect("read");
        if k == 0 {
            break;
        }
        n += k as u64;
    }
    let f = figures(start, cpu0, n);
    assert_eq!(n, (mib as u64) << 20);
    assert!(ch.wait().await.expect("exit").success());
    f
}

async fn write(s: &Session, mib: usize) -> Figures {
    let mut ch = s.exec("cat > /dev/null").await.expect("exec");
    let buf = vec![0x5au8; 1 << 20];
    let (start, cpu0) = (Instant::now(), cpu());
    for _ in 0..mib {
        ch.write_all(&buf).await.expect("write");
    }
    ch.shutdown().await.expect("eof");
    assert!(ch.wait().await.expect("exit").success());
    figures(start, cpu0, (mib as u64) << 20)
}

/// Runs a peer program (see `benches/peers`) for one transfer.
fn peer(
    bin: &std::path::Path,
    sshd: &sshd::Sshd,
    cipher: &str,
    mib: usize,
    write: bool,
) -> Figures {
    let out = std::process::Command::new(bin)
        .args(["--port", &sshd.port().to_string()])
        .args(["--user", &sshd.user()])
        .args(["--key", &sshd.user_key().display().to_string()])
        .args(["--cipher", cipher, "--mib", &mib.to_string()])
        .args(["--mode", if write { "write" } else { "read" }])
        .output()
        .expect("run peer");
    assert!(
        out.status.success(),
        "{} failed: {}",
        bin.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    let f = client::Figures::parse(text.trim()).expect("peer figures");
    let gib = f.get("bytes") / (1u64 << 30) as f64;
    (
        f.get("bytes") / f.get("secs") / 1e6,
        f.get("user") / gib,
        f.get("sys") / gib,
    )
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    let mut mib = 1024;
    let mut runs = 3;
    let mut ciphers = Vec::new();
    let mut only: Option<String> = None;
    let mut peers_dir: Option<std::path::PathBuf> = None;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut value = || args.next().expect("option value");
        match a.as_str() {
            "--mib" => mib = value().parse().expect("--mib N"),
            "--runs" => runs = value().parse().expect("--runs R"),
            "--cipher" => ciphers.push(value()),
            "--only" => only = Some(value()),
            "--peers" => peers_dir = Some(value().into()),
            _ => {
                eprintln!(
                    "cipher_bench [--mib N] [--runs R] [--cipher NAME]... [--only read|write] [--peers DIR]"
                );
                std::process::exit(2);
            }
        }
    }
    if ciphers.is_empty() {
        ciphers = vec![
            "aes128-gcm@openssh.com".to_string(),
            "chacha20-poly1305@openssh.com".to_string(),
        ];
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let local = tokio::task::LocalSet::new();
    local.block_on(&rt, async move {
        let sshd = sshd::Sshd::start();
        println!(
            "libssh2 {}, {mib} MiB per run, {runs} runs",
            uring_ssh::libssh2_version()
        );
        for cipher in &ciphers {
            for (dir, is_read) in [("read", true), ("write", false)] {
                if only.as_deref().is_some_and(|o| o != dir) {
                    continue;
                }
                let peers: Vec<(&str, std::path::PathBuf)> = peers_dir
                    .iter()
                    .flat_map(|d| {
                        [("ssh2-rs", d.join("peer_ssh2")), ("russh", d.join("peer_russh"))]
                    })
                    .filter(|(_, p)| p.exists())
                    .collect();
                let mut all = Vec::new();
                let mut theirs: Vec<Vec<Figures>> = vec![Vec::new(); peers.len()];
                for run in 0..runs {
                    // Alternate: peers first on odd runs.
                    if run % 2 == 1 {
                        for (i, (_, bin)) in peers.iter().enumerate() {
                            theirs[i].push(peer(bin, &sshd, cipher, mib, !is_read));
                        }
                    }
                    let s = session(&sshd, cipher).await;
                    let f = if is_read {
                        read(&s, mib).await
                    } else {
                        write(&s, mib).await
                    };
                    s.close("done").await.expect("close");
                    println!(
                        "  {cipher} {dir}: {:.0} MB/s, {:.2} s user + {:.2} s sys per GiB",
                        f.0, f.1, f.2
                    );
                    all.push(f);
                    if run % 2 == 0 {
                        for (i, (_, bin)) in peers.iter().enumerate() {
                            theirs[i].push(peer(bin, &sshd, cipher, mib, !is_read));
                        }
                    }
                }
                let show = |who: &str, v: &[Figures]| {
                    println!(
                        "{who:<8} {cipher} {dir} median: {:.0} MB/s, {:.2} s user + {:.2} s sys per GiB",
                        median(v.iter().map(|f| f.0).collect()),
                        median(v.iter().map(|f| f.1).collect()),
                        median(v.iter().map(|f| f.2).collect()),
                    )
                };
                show("ours", &all);
                for (i, (name, _)) in peers.iter().enumerate() {
                    show(name, &theirs[i]);
                }
            }
        }
    });
}
