//! async-ssh2-lite 0.5 (libssh2 through ssh2-rs, made async on tokio
//! readiness) with tokio, as its documentation shows: see `common.rs`.
#[path = "../common.rs"]
mod common;

use std::path::Path;

use async_ssh2_lite::ssh2::MethodType;
use async_ssh2_lite::{AsyncSession, AsyncSftp, TokioTcpStream};
use common::{Args, AsyncPeer, BUF};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::OnceCell;
use tokio_util::compat::{FuturesAsyncReadCompatExt, FuturesAsyncWriteCompatExt};

/// A session and, once a scenario needs one, its SFTP channel.
struct Conn {
    s: AsyncSession<TokioTcpStream>,
    sftp: OnceCell<AsyncSftp<TokioTcpStream>>,
}

impl Conn {
    async fn sftp(&self) -> &AsyncSftp<TokioTcpStream> {
        self.sftp
            .get_or_init(|| async { self.s.sftp().await.expect("sftp") })
            .await
    }
}

struct Lite;

impl AsyncPeer for Lite {
    type Session = Conn;

    async fn connect(a: &Args) -> Conn {
        let addr = std::net::SocketAddr::from(([127, 0, 0, 1], a.port));
        let mut s = AsyncSession::<TokioTcpStream>::connect(addr, None)
            .await
            .expect("connect");
        for (t, pref) in [
            (MethodType::CryptCs, a.cipher.as_str()),
            (MethodType::CryptSc, a.cipher.as_str()),
            (MethodType::Kex, a.kex.as_str()),
        ] {
            s.method_pref(t, pref).await.expect("method_pref");
        }
        s.handshake().await.expect("handshake");
        s.userauth_pubkey_file(&a.user, None, Path::new(&a.key), None)
            .await
            .expect("auth");
        Conn {
            s,
            sftp: OnceCell::new(),
        }
    }

    async fn read(c: &Conn, a: &Args) {
        let mut ch = c.s.channel_session().await.expect("channel");
        ch.exec(&a.read_command()).await.expect("exec");
        let mut buf = vec![0u8; BUF];
        let mut got = 0u64;
        loop {
            let n = ch.read(&mut buf).await.expect("read");
            if n == 0 {
                break;
            }
            got += n as u64;
        }
        assert_eq!(got, a.bytes());
        ch.close().await.ok();
    }

    async fn write(c: &Conn, a: &Args) {
        let mut ch = c.s.channel_session().await.expect("channel");
        ch.exec(common::WRITE_COMMAND).await.expect("exec");
        let buf = vec![0x5au8; BUF];
        let mut left = a.bytes();
        while left > 0 {
            let n = left.min(buf.len() as u64) as usize;
            ch.write_all(&buf[..n]).await.expect("write");
            left -= n as u64;
        }
        ch.send_eof().await.unwrap();
        ch.wait_eof().await.unwrap();
        ch.close().await.ok();
    }

    async fn sftp_get(c: &Conn, remote: &str, local: &Path) -> u64 {
        let from = c.sftp().await.open(Path::new(remote)).await.expect("open");
        let mut to = std::fs::File::create(local).expect("create local");
        // SFTP files implement only the futures-io traits.
        common::download(&mut from.compat(), &mut to).await
    }

    async fn sftp_put(c: &Conn, local: &Path, remote: &str) -> u64 {
        let to = c
            .sftp()
            .await
            .create(Path::new(remote))
            .await
            .expect("create");
        let mut from = std::fs::File::open(local).expect("open local");
        common::upload(&mut from, &mut to.compat_write()).await
    }

    async fn list(c: &Conn, dir: &str) -> Vec<(String, bool)> {
        c.sftp()
            .await
            .readdir(Path::new(dir))
            .await
            .expect("readdir")
            .into_iter()
            .map(|(p, st)| {
                let name = p.file_name().unwrap().to_string_lossy().into_owned();
                (name, st.is_dir())
            })
            .collect()
    }
}

#[tokio::main]
async fn main() {
    common::raise_nofile();
    common::report(&common::run_async::<Lite>(&common::args()).await);
}
