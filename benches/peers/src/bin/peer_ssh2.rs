//! ssh2-rs 0.9 (blocking libssh2, as libssh2-sys builds it), one OS thread
//! per session: see `common.rs` for the scenarios.
#[path = "../common.rs"]
mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;

use common::{Args, BUF, BlockingPeer};

struct Ssh2;

/// A session and, once a scenario needs one, its SFTP channel.
struct Conn {
    s: ssh2::Session,
    sftp: std::cell::OnceCell<ssh2::Sftp>,
}

impl Conn {
    fn sftp(&self) -> &ssh2::Sftp {
        self.sftp.get_or_init(|| self.s.sftp().expect("sftp"))
    }
}

/// Copies `from` to `to` in `BUF`-sized pieces; returns the bytes moved.
fn copy(from: &mut impl Read, to: &mut impl Write) -> u64 {
    let mut buf = vec![0u8; BUF];
    let mut n = 0u64;
    loop {
        let k = from.read(&mut buf).expect("read");
        if k == 0 {
            return n;
        }
        to.write_all(&buf[..k]).expect("write");
        n += k as u64;
    }
}

impl BlockingPeer for Ssh2 {
    type Session = Conn;

    fn connect(a: &Args) -> Conn {
        let tcp = TcpStream::connect(("127.0.0.1", a.port)).expect("connect");
        let mut s = ssh2::Session::new().expect("session");
        s.set_tcp_stream(tcp);
        s.method_pref(ssh2::MethodType::CryptCs, &a.cipher).unwrap();
        s.method_pref(ssh2::MethodType::CryptSc, &a.cipher).unwrap();
        s.method_pref(ssh2::MethodType::Kex, &a.kex).unwrap();
        s.handshake().expect("handshake");
        s.userauth_pubkey_file(&a.user, None, a.key.as_ref(), None)
            .expect("auth");
        Conn {
            s,
            sftp: Default::default(),
        }
    }

    fn read(c: &Conn, a: &Args) {
        let mut ch = c.s.channel_session().expect("channel");
        ch.exec(&a.read_command()).expect("exec");
        assert_eq!(copy(&mut ch, &mut std::io::sink()), a.bytes());
        ch.wait_close().ok();
    }

    fn write(c: &Conn, a: &Args) {
        let mut ch = c.s.channel_session().expect("channel");
        ch.exec(common::WRITE_COMMAND).expect("exec");
        let mut zeros = std::io::repeat(0x5a).take(a.bytes());
        copy(&mut zeros, &mut ch);
        ch.send_eof().unwrap();
        ch.wait_eof().unwrap();
        ch.wait_close().ok();
    }

    fn sftp_get(c: &Conn, remote: &str, local: &Path) -> u64 {
        let mut from = c.sftp().open(Path::new(remote)).expect("open");
        let mut to = std::fs::File::create(local).expect("create local");
        copy(&mut from, &mut to)
    }

    fn sftp_put(c: &Conn, local: &Path, remote: &str) -> u64 {
        let mut to = c.sftp().create(Path::new(remote)).expect("create");
        let mut from = std::fs::File::open(local).expect("open local");
        copy(&mut from, &mut to)
    }

    fn list(c: &Conn, dir: &str) -> Vec<(String, bool)> {
        c.sftp()
            .readdir(Path::new(dir))
            .expect("readdir")
            .into_iter()
            .map(|(p, st)| {
                let name = p.file_name().unwrap().to_string_lossy().into_owned();
                (name, st.is_dir())
            })
            .collect()
    }
}

fn main() {
    common::raise_nofile();
    common::report(&common::run_threads::<Ssh2>(&common::args()));
}
