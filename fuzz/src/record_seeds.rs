//! Records seed inputs from real OpenSSH programs:
//!
//! - `seeds/server_bytes/`: what `sshd -i` sends after its banner (its
//!   KEXINIT), answering a client banner on stdin;
//! - `seeds/sftp_reply/`: `sftp-server`'s raw replies (VERSION, ATTRS,
//!   HANDLE, NAME, DATA, STATUS) to a scripted session on stdin.
//!
//! Run as root from `fuzz/`: `cargo run --bin record_seeds`.

use std::io::{Read, Write};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

fn main() {
    let dir = std::env::temp_dir().join(format!("uring-ssh-seeds-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    record_sshd(&dir);
    record_sftp(&dir);
    let _ = std::fs::remove_dir_all(&dir);
}

fn record_sshd(dir: &Path) {
    let key = dir.join("host_key");
    let st = Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-f"])
        .arg(&key)
        .status()
        .unwrap();
    assert!(st.success());
    let cfg = dir.join("sshd_config");
    std::fs::write(
        &cfg,
        format!("HostKey {}\nUsePAM no\nLogLevel QUIET\n", key.display()),
    )
    .unwrap();
    let mut child = Command::new("/usr/sbin/sshd")
        .args(["-i", "-f"])
        .arg(&cfg)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("sshd");
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(b"SSH-2.0-seed_1.0\r\n").unwrap();
    let mut out = child.stdout.take().unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    // The banner line, then one KEXINIT packet (length-prefixed).
    while !kexinit_complete(&got) {
        let n = out.read(&mut buf).unwrap();
        assert!(n > 0, "sshd closed after {} bytes", got.len());
        got.extend_from_slice(&buf[..n]);
    }
    let _ = child.kill();
    let _ = child.wait();
    let line_end = got.windows(2).position(|w| w == b"\r\n").unwrap() + 2;
    save("server_bytes", "sshd_kexinit", &got[line_end..]);
}

fn kexinit_complete(b: &[u8]) -> bool {
    let Some(i) = b.windows(2).position(|w| w == b"\r\n") else {
        return false;
    };
    let rest = &b[i + 2..];
    rest.len() >= 4
        && rest.len() >= 4 + u32::from_be_bytes([rest[0], rest[1], rest[2], rest[3]]) as usize
}

fn packet(kind: u8, id: Option<u32>, body: &[u8]) -> Vec<u8> {
    let mut p = vec![kind];
    if let Some(id) = id {
        p.extend_from_slice(&id.to_be_bytes());
    }
    p.extend_from_slice(body);
    let mut v = (p.len() as u32).to_be_bytes().to_vec();
    v.extend_from_slice(&p);
    v
}

fn string(s: &[u8]) -> Vec<u8> {
    let mut v = (s.len() as u32).to_be_bytes().to_vec();
    v.extend_from_slice(s);
    v
}

/// Reads one SFTP packet (with its length) from `r`.
fn reply(r: &mut impl Read) -> Vec<u8> {
    let mut len = [0u8; 4];
    r.read_exact(&mut len).unwrap();
    let mut body = vec![0u8; u32::from_be_bytes(len) as usize];
    r.read_exact(&mut body).unwrap();
    [&len[..], &body].concat()
}

fn record_sftp(dir: &Path) {
    let data = dir.join("file");
    std::fs::write(&data, b"seed file contents\n".repeat(40)).unwrap();
    let mut child = Command::new("/usr/lib/openssh/sftp-server")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("sftp-server");
    let mut w = child.stdin.take().unwrap();
    let mut r = child.stdout.take().unwrap();
    let path = data.to_str().unwrap().as_bytes();
    let dirp = dir.to_str().unwrap().as_bytes();
    w.write_all(&packet(1, None, &3u32.to_be_bytes())).unwrap();
    save("sftp_reply", "version", &reply(&mut r));
    // limits@openssh.com
    w.write_all(&packet(200, Some(1), &string(b"limits@openssh.com")))
        .unwrap();
    save("sftp_reply", "limits", &reply(&mut r));
    w.write_all(&packet(
        200,
        Some(2),
        &[string(b"statvfs@openssh.com"), string(dirp)].concat(),
    ))
    .unwrap();
    save("sftp_reply", "statvfs", &reply(&mut r));
    w.write_all(&packet(17, Some(3), &string(path))).unwrap();
    save("sftp_reply", "attrs", &reply(&mut r));
    w.write_all(&packet(17, Some(4), &string(b"/nonexistent/x")))
        .unwrap();
    save("sftp_reply", "status_no_such_file", &reply(&mut r));
    w.write_all(&packet(
        3,
        Some(5),
        &[
            string(path),
            1u32.to_be_bytes().to_vec(),
            0u32.to_be_bytes().to_vec(),
        ]
        .concat(),
    ))
    .unwrap();
    let handle = reply(&mut r);
    save("sftp_reply", "handle", &handle);
    let h = &handle[13..];
    w.write_all(&packet(
        5,
        Some(6),
        &[
            string(h),
            0u64.to_be_bytes().to_vec(),
            512u32.to_be_bytes().to_vec(),
        ]
        .concat(),
    ))
    .unwrap();
    save("sftp_reply", "data", &reply(&mut r));
    w.write_all(&packet(
        5,
        Some(7),
        &[
            string(h),
            100_000u64.to_be_bytes().to_vec(),
            512u32.to_be_bytes().to_vec(),
        ]
        .concat(),
    ))
    .unwrap();
    save("sftp_reply", "status_eof", &reply(&mut r));
    w.write_all(&packet(11, Some(8), &string(dirp))).unwrap();
    let dh = reply(&mut r);
    w.write_all(&packet(12, Some(9), &string(&dh[13..])))
        .unwrap();
    save("sftp_reply", "name", &reply(&mut r));
    w.write_all(&packet(16, Some(10), &string(b"."))).unwrap();
    save("sftp_reply", "realpath", &reply(&mut r));
    // End of input ends sftp-server.
    drop(w);
    std::thread::sleep(Duration::from_millis(50));
    let _ = child.kill();
    let _ = child.wait();
}

fn save(target: &str, name: &str, bytes: &[u8]) {
    let d = Path::new("seeds").join(target);
    std::fs::create_dir_all(&d).unwrap();
    std::fs::write(d.join(name), bytes).unwrap();
    println!("{target}/{name}: {} bytes", bytes.len());
}
