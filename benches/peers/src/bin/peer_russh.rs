//! russh 0.65 (pure Rust, tokio) with russh-sftp for the SFTP scenarios;
//! every session on one current-thread runtime (or, with `--threads`, a
//! multi-thread one): see `common.rs`.
#[path = "../common.rs"]
mod common;

use std::borrow::Cow;
use std::path::Path;
use std::sync::Arc;

use common::{Args, AsyncPeer, BUF};
use russh::keys::*;
use russh::*;
use russh_sftp::client::SftpSession;

struct Client;

impl client::Handler for Client {
    type Error = russh::Error;

    async fn check_server_key(
        &mut self,
        _key: &PublicKeyOrCertificate,
    ) -> Result<bool, Self::Error> {
        Ok(true)
    }
}

/// A session and, once a scenario needs one, its SFTP client.
struct Conn {
    h: client::Handle<Client>,
    sftp: tokio::sync::OnceCell<Arc<SftpSession>>,
}

impl Conn {
    async fn sftp(&self) -> Arc<SftpSession> {
        self.sftp
            .get_or_init(|| async {
                let ch = self.h.channel_open_session().await.expect("channel");
                ch.request_subsystem(true, "sftp").await.expect("subsystem");
                Arc::new(SftpSession::new(ch.into_stream()).await.expect("sftp"))
            })
            .await
            .clone()
    }
}

struct Russh;

impl AsyncPeer for Russh {
    type Session = Conn;

    async fn connect(a: &Args) -> Conn {
        let cipher = match a.cipher.as_str() {
            "aes128-gcm@openssh.com" => cipher::AES_128_GCM,
            "aes256-gcm@openssh.com" => cipher::AES_256_GCM,
            "chacha20-poly1305@openssh.com" => cipher::CHACHA20_POLY1305,
            "aes128-ctr" => cipher::AES_128_CTR,
            other => panic!("cipher {other}"),
        };
        let kex = match a.kex.as_str() {
            "curve25519-sha256" => kex::CURVE25519,
            "mlkem768x25519-sha256" => kex::MLKEM768X25519_SHA256,
            other => panic!("kex {other}"),
        };
        let config = client::Config {
            preferred: Preferred {
                kex: Cow::Owned(vec![kex, kex::EXTENSION_SUPPORT_AS_CLIENT]),
                cipher: Cow::Owned(vec![cipher]),
                ..Default::default()
            },
            ..Default::default()
        };
        let key = load_secret_key(&a.key, None).expect("key");
        let mut h = client::connect(Arc::new(config), ("127.0.0.1", a.port), Client)
            .await
            .expect("connect");
        let r = h
            .authenticate_publickey(&a.user, PrivateKeyWithHashAlg::new(Arc::new(key), None))
            .await
            .expect("auth");
        assert!(r.success(), "auth refused");
        Conn {
            h,
            sftp: Default::default(),
        }
    }

    async fn read(c: &Conn, a: &Args) {
        let mut ch = c.h.channel_open_session().await.expect("channel");
        ch.exec(true, a.read_command()).await.expect("exec");
        let mut got = 0u64;
        while let Some(m) = ch.wait().await {
            match m {
                ChannelMsg::Data { data } => got += data.len() as u64,
                ChannelMsg::Eof | ChannelMsg::Close => break,
                _ => {}
            }
        }
        assert_eq!(got, a.bytes());
    }

    async fn write(c: &Conn, a: &Args) {
        let mut ch = c.h.channel_open_session().await.expect("channel");
        ch.exec(true, common::WRITE_COMMAND).await.expect("exec");
        let buf = vec![0x5au8; BUF];
        let mut left = a.bytes();
        while left > 0 {
            let n = left.min(buf.len() as u64) as usize;
            ch.data(&buf[..n]).await.expect("write");
            left -= n as u64;
        }
        ch.eof().await.unwrap();
        while let Some(m) = ch.wait().await {
            if matches!(m, ChannelMsg::Eof | ChannelMsg::Close) {
                break;
            }
        }
    }

    async fn sftp_get(c: &Conn, remote: &str, local: &Path) -> u64 {
        let mut from = c.sftp().await.open(remote).await.expect("open");
        let mut to = std::fs::File::create(local).expect("create local");
        common::download(&mut from, &mut to).await
    }

    async fn sftp_put(c: &Conn, local: &Path, remote: &str) -> u64 {
        let mut to = c.sftp().await.create(remote).await.expect("create");
        let mut from = std::fs::File::open(local).expect("open local");
        common::upload(&mut from, &mut to).await
    }

    async fn list(c: &Conn, dir: &str) -> Vec<(String, bool)> {
        c.sftp()
            .await
            .read_dir(dir)
            .await
            .expect("readdir")
            .map(|e| (e.file_name(), e.file_type().is_dir()))
            .collect()
    }
}

fn main() {
    common::raise_nofile();
    let a = common::args();
    let f = if a.threads > 0 {
        common::run_multi_thread(
            &a,
            |a| async move { Russh::connect(&a).await },
            |s, a, write| async move {
                if write {
                    Russh::write(&s, &a).await
                } else {
                    Russh::read(&s, &a).await
                }
            },
        )
    } else {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime")
            .block_on(common::run_async::<Russh>(&a))
    };
    common::report(&f);
}
