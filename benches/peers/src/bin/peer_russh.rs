//! russh (pure Rust, tokio): one session reads or writes N MiB over exec.
#[path = "../common.rs"]
mod common;

use std::borrow::Cow;
use std::sync::Arc;
use std::time::Instant;

use russh::keys::*;
use russh::*;

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

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let a = common::args();
    let cipher = match a.cipher.as_str() {
        "aes128-gcm@openssh.com" => cipher::AES_128_GCM,
        "aes256-gcm@openssh.com" => cipher::AES_256_GCM,
        "chacha20-poly1305@openssh.com" => cipher::CHACHA20_POLY1305,
        "aes128-ctr" => cipher::AES_128_CTR,
        other => panic!("cipher {other}"),
    };
    let config = client::Config {
        preferred: Preferred {
            kex: Cow::Owned(vec![kex::CURVE25519, kex::EXTENSION_SUPPORT_AS_CLIENT]),
            cipher: Cow::Owned(vec![cipher]),
            ..Default::default()
        },
        ..Default::default()
    };
    let key = load_secret_key(&a.key, None).expect("key");
    let mut s = client::connect(Arc::new(config), ("127.0.0.1", a.port), Client)
        .await
        .expect("connect");
    let r = s
        .authenticate_publickey(&a.user, PrivateKeyWithHashAlg::new(Arc::new(key), None))
        .await
        .expect("auth");
    assert!(r.success(), "auth refused");
    let bytes = a.mib << 20;
    let mut ch = s.channel_open_session().await.expect("channel");
    let (t0, c0) = (Instant::now(), common::cpu());
    if a.write {
        ch.exec(true, "cat > /dev/null").await.expect("exec");
        let buf = vec![0x5au8; 256 * 1024];
        let mut left = bytes;
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
    } else {
        ch.exec(true, format!("head -c {bytes} /dev/zero"))
            .await
            .expect("exec");
        let mut got = 0u64;
        while let Some(m) = ch.wait().await {
            match m {
                ChannelMsg::Data { data } => got += data.len() as u64,
                ChannelMsg::Eof | ChannelMsg::Close => break,
                _ => {}
            }
        }
        assert_eq!(got, bytes);
    }
    common::report(t0, c0, bytes);
}
