//! The TCP ceiling: a plain loopback TCP stream read or written through
//! tokio-uring (client mode), against a sink/source server of the
//! orchestrator.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener};

use crate::client::{self, Args, Figures};

/// The TCP ceiling: `--mib` MiB read from (or written to) the sink server
/// of the orchestrator over a tokio-uring `TcpStream`.
pub fn tcp_client(a: &Args) -> Figures {
    let write = a.scenario == "tcp-write";
    tokio_uring::start(async {
        let addr = SocketAddr::from(([127, 0, 0, 1], a.port));
        let s = tokio_uring::net::TcpStream::connect(addr)
            .await
            .expect("connect");
        let header = a.bytes() | if write { 1 << 63 } else { 0 };
        let (r, _) = s.write_all(header.to_le_bytes().to_vec()).await;
        r.expect("header");
        let m = client::Meter::start(Vec::new());
        let mut buf = vec![0x5au8; client::BUF];
        let mut done = 0u64;
        while done < a.bytes() {
            if write {
                let n = (a.bytes() - done).min(buf.len() as u64) as usize;
                buf.truncate(n);
                let (r, b) = s.write_all(buf).await;
                r.expect("write");
                buf = b;
                done += n as u64;
            } else {
                let (r, b) = s.read(buf).await;
                let n = r.expect("read");
                assert!(n > 0, "early EOF");
                buf = b;
                done += n as u64;
            }
        }
        let f = m.finish(done, Vec::new());
        s.shutdown(std::net::Shutdown::Both).ok();
        f
    })
}

/// The orchestrator's sink/source for the TCP ceiling: reads an 8-byte
/// header (length, top bit set: the client writes), then sends that many
/// zero bytes or reads until EOF. Runs on `core` if given.
pub fn tcp_server(core: Option<usize>) -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = l.local_addr().expect("addr").port();
    std::thread::spawn(move || {
        if let Some(c) = core {
            pin_this_thread(c);
        }
        for conn in l.incoming().flatten() {
            let mut conn = conn;
            let mut h = [0u8; 8];
            if conn.read_exact(&mut h).is_err() {
                continue;
            }
            let h = u64::from_le_bytes(h);
            let len = h & !(1 << 63);
            if h >> 63 == 1 {
                std::io::copy(&mut conn, &mut std::io::sink()).ok();
            } else {
                let zeros = vec![0u8; 1 << 20];
                let mut left = len;
                while left > 0 {
                    let n = left.min(zeros.len() as u64) as usize;
                    if conn.write_all(&zeros[..n]).is_err() {
                        break;
                    }
                    left -= n as u64;
                }
            }
        }
    });
    port
}

pub fn pin_this_thread(core: usize) {
    // SAFETY: a zeroed cpu_set_t is an empty set; CPU_SET writes inside it,
    // and sched_setaffinity(0, ...) applies to the calling thread.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(core, &mut set);
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
    }
}
