//! uring-ssh as a benchmark client: the scenarios of
//! `benches/peers/src/common.rs` on our API, shared by the comparison
//! harness (`examples/compare/`) and the criterion benches.

use std::net::SocketAddr;
use std::path::Path;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use uring_ssh::sftp::{Sftp, TransferOptions, download_tree_over};
use uring_ssh::{Config, MethodType, Session};

use crate::client::{self, Args, AsyncPeer};

/// uring-ssh as a benchmark client.
pub struct Ours;

/// Microseconds of `Config::receive_batch_wait` for the benchmark client
/// (unset: the default; 0: no batching).
pub const RECEIVE_BATCH_ENV: &str = "URING_SSH_RECEIVE_BATCH_US";

/// A session and, once needed, its SFTP client.
pub struct Conn {
    /// The authenticated session.
    pub s: Session,
    sftp: tokio::sync::OnceCell<Sftp>,
}

impl Conn {
    async fn sftp(&self) -> &Sftp {
        self.sftp
            .get_or_init(|| async { self.s.sftp().await.expect("sftp") })
            .await
    }
}

impl Ours {
    /// Runs `command` on one channel and reads its output, which must be
    /// `bytes` long: in chunks with no copy, or with `into_buffer` through
    /// `AsyncRead` into one buffer.
    pub async fn read_command(c: &Conn, command: &str, bytes: u64, into_buffer: bool) {
        let mut ch = c.s.exec(command).await.expect("exec");
        let mut got = 0u64;
        if into_buffer {
            let mut buf = vec![0u8; client::BUF];
            loop {
                let n = ch.read(&mut buf).await.expect("read");
                if n == 0 {
                    break;
                }
                got += n as u64;
            }
        } else {
            while let Some(chunk) = ch.read_chunk().await.expect("read") {
                got += chunk.len() as u64;
            }
        }
        assert_eq!(got, bytes);
        assert!(ch.wait().await.expect("exit").success());
    }
}

impl AsyncPeer for Ours {
    type Session = Conn;

    async fn connect(a: &Args) -> Conn {
        let mut cfg = Config::new()
            .known_hosts(Some(&a.known_hosts))
            .ciphers(&a.cipher)
            .method(MethodType::Kex, &a.kex);
        // Batched receives are on by default: URING_SSH_RECEIVE_BATCH_US=0
        // measures without them (`Config::receive_batch_wait`).
        if let Some(us) = std::env::var(RECEIVE_BATCH_ENV)
            .ok()
            .and_then(|v| v.parse::<u64>().ok())
        {
            cfg = cfg.receive_batch_wait(Some(std::time::Duration::from_micros(us)));
        }
        let addr = SocketAddr::from(([127, 0, 0, 1], a.port));
        let s = Session::connect_addr(addr, cfg).await.expect("connect");
        s.auth_pubkey_file(&a.user, Path::new(&a.key), None)
            .await
            .expect("auth");
        Conn {
            s,
            sftp: Default::default(),
        }
    }

    async fn read(c: &Conn, a: &Args) {
        Ours::read_command(c, &a.read_command(), a.bytes(), a.read_api == "buffer").await
    }

    async fn write(c: &Conn, a: &Args) {
        let mut ch = c.s.exec(client::WRITE_COMMAND).await.expect("exec");
        let buf = vec![0x5au8; client::BUF];
        let mut left = a.bytes();
        while left > 0 {
            let n = left.min(buf.len() as u64) as usize;
            ch.write_all(&buf[..n]).await.expect("write");
            left -= n as u64;
        }
        ch.shutdown().await.expect("eof");
        assert!(ch.wait().await.expect("exit").success());
    }

    async fn sftp_get(c: &Conn, remote: &str, local: &Path) -> u64 {
        c.sftp()
            .await
            .download(remote, local)
            .await
            .expect("download")
    }

    async fn sftp_put(c: &Conn, local: &Path, remote: &str) -> u64 {
        c.sftp().await.upload(local, remote).await.expect("upload")
    }

    async fn list(c: &Conn, dir: &str) -> Vec<(String, bool)> {
        let entries = c.sftp().await.read_dir_all(dir).await.expect("readdir");
        entries
            .iter()
            .map(|e| (e.name().into_owned(), e.attrs().is_dir()))
            .collect()
    }

    /// `download_tree_over` the SFTP clients of every session.
    async fn tree(sessions: &[Conn], remote: &str, local: &Path, fsync: bool) -> (u64, u64) {
        let mut clients = Vec::new();
        for c in sessions {
            clients.push(c.sftp().await.clone());
        }
        let r = download_tree_over(
            &clients,
            Path::new(remote),
            local,
            &TransferOptions {
                fsync,
                ..TransferOptions::default()
            },
        )
        .await;
        assert!(r.is_complete(), "{:?}", r.failed().next());
        (r.succeeded() as u64, r.bytes())
    }

    fn counters() -> Vec<(&'static str, f64)> {
        uring_ssh::reactor::stats()
            .map(|s| {
                vec![
                    ("ring_enters", s.enter_calls as f64),
                    ("ring_sqes", s.sqes_submitted as f64),
                ]
            })
            .unwrap_or_default()
    }
}
