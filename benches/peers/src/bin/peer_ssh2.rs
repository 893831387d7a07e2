//! ssh2-rs (blocking libssh2, as libssh2-sys builds it): one session reads
//! or writes N MiB over exec.
#[path = "../common.rs"]
mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Instant;

fn main() {
    let a = common::args();
    let tcp = TcpStream::connect(("127.0.0.1", a.port)).expect("connect");
    let mut s = ssh2::Session::new().expect("session");
    s.set_tcp_stream(tcp);
    s.method_pref(ssh2::MethodType::CryptCs, &a.cipher).unwrap();
    s.method_pref(ssh2::MethodType::CryptSc, &a.cipher).unwrap();
    s.method_pref(ssh2::MethodType::Kex, "curve25519-sha256")
        .unwrap();
    s.handshake().expect("handshake");
    s.userauth_pubkey_file(&a.user, None, a.key.as_ref(), None)
        .expect("auth");
    let bytes = a.mib << 20;
    let mut ch = s.channel_session().expect("channel");
    let (t0, c0) = (Instant::now(), common::cpu());
    if a.write {
        ch.exec("cat > /dev/null").expect("exec");
        let buf = vec![0x5au8; 256 * 1024];
        let mut left = bytes;
        while left > 0 {
            let n = left.min(buf.len() as u64) as usize;
            ch.write_all(&buf[..n]).expect("write");
            left -= n as u64;
        }
        ch.send_eof().unwrap();
        ch.wait_eof().unwrap();
    } else {
        ch.exec(&format!("head -c {bytes} /dev/zero"))
            .expect("exec");
        let mut buf = vec![0u8; 256 * 1024];
        let mut got = 0u64;
        loop {
            let n = ch.read(&mut buf).expect("read");
            if n == 0 {
                break;
            }
            got += n as u64;
        }
        assert_eq!(got, bytes);
    }
    common::report(t0, c0, bytes);
    ch.wait_close().ok();
}
