//! SCP and port-forwarding throughput beside the OpenSSH client, against
//! the same throwaway OpenSSH server on loopback, chacha20-poly1305 both.
//!
//! * SCP: `MIB` MiB (default 256) sent and fetched with `scp_send` /
//!   `scp_recv`, and with `scp -O` (the same protocol); each timed from
//!   connect to the file complete, so both include a handshake.
//! * Local forwarding: `CONNS` connections (default 32) each pushing
//!   `EACH_MIB` MiB (default 4) to a loopback echo server and reading them
//!   back, through `channel_direct_tcpip` on one session and through
//!   `ssh -N -L`; timed from the first connect to the last byte back.
//!
//! Run: `cargo bench --bench transfer_vs_openssh` (as root: the fixture's
//! sshd). The machine is shared: repeat and compare within one run.

use uring_ssh_testkit::sshd;

use std::net::{Ipv4Addr, SocketAddr};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use uring_ssh::{Config, Session};

const MIB: usize = 1 << 20;
const CIPHER: &str = "chacha20-poly1305@openssh.com";

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
        .ciphers(CIPHER);
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
        "-i",
        &sshd.user_key().display().to_string(),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

fn mbps(bytes: usize, d: Duration) -> f64 {
    bytes as f64 / d.as_secs_f64() / 1e6
}

async fn run() {
    let mib = env("MIB", 256);
    let conns = env("CONNS", 32);
    let each = env("EACH_MIB", 4) * MIB;
    let sshd = sshd::Sshd::start();
    let dir = tempfile::tempdir().expect("temp dir");
    let len = mib * MIB;
    println!(
        "transfer_vs_openssh: OpenSSH on 127.0.0.1:{} (throwaway), {CIPHER}, libssh2 {}",
        sshd.port(),
        uring_ssh::libssh2_version()
    );

    // --- SCP -------------------------------------------------------------
    let src = dir.path().join("src.bin");
    {
        let mut block = vec![0u8; 8 * MIB];
        fill(&mut block, 5);
        let mut f = std::fs::File::create(&src).expect("create");
        for _ in 0..len.div_ceil(block.len()) {
            std::io::Write::write_all(&mut f, &block).expect("write");
        }
        f.set_len(len as u64).expect("truncate");
    }
    let mut block = vec![0u8; 256 * 1024];
    fill(&mut block, 6);
    for round in 1..=2 {
        let dst = dir.path().join("dst.bin");
        let t = Instant::now();
        let s = connect(&sshd).await;
        let mut w = s
            .scp_send(dst.to_str().unwrap(), 0o644, len as u64, None)
            .await
            .expect("scp_send");
        let mut left = len;
        while left > 0 {
            let n = left.min(block.len());
            w.write_all(&block[..n]).await.expect("write");
            left -= n;
        }
        w.finish().await.expect("finish");
        let ours_send = t.elapsed();
        s.close("done").await.expect("close");

        let t = Instant::now();
        let s = connect(&sshd).await;
        let (mut r, stat) = s.scp_recv(src.to_str().unwrap()).await.expect("scp_recv");
        let mut buf = vec![0u8; 256 * 1024];
        let mut got = 0;
        loop {
            let n = r.read(&mut buf).await.expect("read");
            if n == 0 {
                break;
            }
            got += n;
        }
        assert_eq!(got as u64, stat.size);
        r.finish().await.expect("finish");
        let ours_recv = t.elapsed();
        s.close("done").await.expect("close");

        let scp = |args: Vec<String>| {
            let t = Instant::now();
            let st = Command::new("scp")
                .arg("-O")
                .arg("-P")
                .arg(sshd.port().to_string())
                .args(ssh_opts(&sshd))
                .args(args)
                .stdin(Stdio::null())
                .status()
                .expect("run scp");
            assert!(st.success(), "scp failed");
            t.elapsed()
        };
        let remote = |p: &std::path::Path| format!("{}@127.0.0.1:{}", sshd.user(), p.display());
        let theirs_send = scp(vec![src.display().to_string(), remote(&dst)]);
        let back = dir.path().join("back.bin");
        let theirs_recv = scp(vec![remote(&src), back.display().to_string()]);
        println!(
            "round {round}: scp {mib} MiB send: uring-ssh {:.0} MB/s ({:.2} s), scp -O {:.0} MB/s ({:.2} s)",
            mbps(len, ours_send),
            ours_send.as_secs_f64(),
            mbps(len, theirs_send),
            theirs_send.as_secs_f64()
        );
        println!(
            "round {round}: scp {mib} MiB recv: uring-ssh {:.0} MB/s ({:.2} s), scp -O {:.0} MB/s ({:.2} s)",
            mbps(len, ours_recv),
            ours_recv.as_secs_f64(),
            mbps(len, theirs_recv),
            theirs_recv.as_secs_f64()
        );
    }

    // --- Local forwarding ------------------------------------------------
    let echo = echo_server();
    for round in 1..=2 {
        let s = connect(&sshd).await;
        let t = Instant::now();
        let tasks = (0..conns).map(|i| {
            let s = &s;
            async move {
                let ch = s
                    .channel_direct_tcpip("127.0.0.1", echo.port(), "127.0.0.1", 1)
                    .await
                    .expect("direct-tcpip");
                push(ch, each, i as u64).await
            }
        });
        let moved: usize = futures::future::join_all(tasks).await.into_iter().sum();
        let ours = t.elapsed();
        s.close("done").await.expect("close");

        let lport = {
            let l = std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
            l.local_addr().unwrap().port()
        };
        let mut ssh = Command::new("ssh")
            .arg("-N")
            .arg("-p")
            .arg(sshd.port().to_string())
            .args(ssh_opts(&sshd))
            .arg("-L")
            .arg(format!("127.0.0.1:{lport}:127.0.0.1:{}", echo.port()))
            .arg(format!("{}@127.0.0.1", sshd.user()))
            .stdin(Stdio::null())
            .spawn()
            .expect("spawn ssh -L");
        let local = SocketAddr::from((Ipv4Addr::LOCALHOST, lport));
        let deadline = Instant::now() + Duration::from_secs(10);
        while tokio::net::TcpStream::connect(local).await.is_err() {
            assert!(Instant::now() < deadline, "ssh -L did not listen");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let t = Instant::now();
        let tasks = (0..conns).map(|i| async move {
            let c = tokio::net::TcpStream::connect(local)
                .await
                .expect("connect");
            c.set_nodelay(true).ok();
            push(c, each, i as u64).await
        });
        let moved2: usize = futures::future::join_all(tasks).await.into_iter().sum();
        let theirs = t.elapsed();
        let _ = ssh.kill();
        let _ = ssh.wait();
        assert_eq!(moved, moved2);
        println!(
            "round {round}: forwarding {conns} conns x {} MiB each way: uring-ssh {:.0} MB/s ({:.2} s), ssh -L {:.0} MB/s ({:.2} s) (both directions counted)",
            each / MIB,
            mbps(2 * moved, ours),
            ours.as_secs_f64(),
            mbps(2 * moved2, theirs),
            theirs.as_secs_f64()
        );
    }
}

fn fill(buf: &mut [u8], seed: u64) {
    let mut x = seed.max(1);
    for chunk in buf.chunks_mut(8) {
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        let v = x.wrapping_mul(0x2545_f491_4f6c_dd1d).to_le_bytes();
        chunk.copy_from_slice(&v[..chunk.len()]);
    }
}

/// Writes `len` bytes, half-closes, reads the echo back; returns `len`.
async fn push<S: AsyncRead + AsyncWrite>(s: S, len: usize, seed: u64) -> usize {
    let mut data = vec![0u8; 256 * 1024];
    fill(&mut data, seed + 1);
    let (mut r, mut w) = tokio::io::split(s);
    let writer = async {
        let mut left = len;
        while left > 0 {
            let n = left.min(data.len());
            w.write_all(&data[..n]).await.expect("write");
            left -= n;
        }
        w.shutdown().await.expect("shutdown");
    };
    let reader = async {
        let mut buf = vec![0u8; 256 * 1024];
        let mut got = 0;
        loop {
            let n = r.read(&mut buf).await.expect("read");
            if n == 0 {
                return got;
            }
            got += n;
        }
    };
    let ((), got) = tokio::join!(writer, reader);
    assert_eq!(got, len, "echo returned a different length");
    len
}

/// A TCP echo server in a thread of its own.
fn echo_server() -> SocketAddr {
    let std = std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind");
    let addr = std.local_addr().unwrap();
    std.set_nonblocking(true).unwrap();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let l = tokio::net::TcpListener::from_std(std).unwrap();
            loop {
                let Ok((s, _)) = l.accept().await else { return };
                s.set_nodelay(true).ok();
                tokio::spawn(async move {
                    let (mut r, mut w) = s.into_split();
                    let _ = tokio::io::copy(&mut r, &mut w).await;
                    let _ = w.shutdown().await;
                });
            }
        });
    });
    addr
}
