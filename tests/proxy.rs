//! Sessions over a stream the caller hands in (`Session::connect_stream`)
//! against a real sshd: a plain TCP stream, and a `ProxyCommand` — the
//! OpenSSH client's `ssh -W host:port`, a bastion hop through the same
//! sshd, holding one end of a socketpair as its stdin and stdout. Its own
//! test binary: the leak counters it reads are process-wide.

use std::os::fd::OwnedFd;
use std::os::unix::net::UnixStream;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use sha2::{Digest, Sha256};
use tokio::io::AsyncReadExt;
use uring_ssh::{Error, Session};
use uring_ssh_testkit::sshd::Sshd;
use uring_ssh_testkit::tools::ssh_opts;
use uring_ssh_testkit::util::{assert_fds_back_to, config, fd_baseline, hex, settle};

use uring_ssh_testkit::util::serial;

use uring_ssh_testkit::util::current_thread_runtime as runtime;

const MIB: usize = 1 << 20;

/// Authenticates `s`, runs a command printing 8 MiB of a fixed pattern and
/// checks its SHA-256 against the same bytes made here.
async fn exec_checked(sshd: &Sshd, s: &Session) {
    s.auth_pubkey_file(&sshd.user(), &sshd.user_key(), None)
        .await
        .expect("auth");
    let mut ch = s
        .exec(&format!("yes 0123456789abcdef | head -c {}", 8 * MIB))
        .await
        .expect("exec");
    let mut out = Vec::new();
    ch.read_to_end(&mut out).await.expect("read");
    assert!(ch.wait().await.expect("exit").success());
    let want: Vec<u8> = b"0123456789abcdef\n"
        .iter()
        .copied()
        .cycle()
        .take(8 * MIB)
        .collect();
    assert_eq!(out.len(), want.len());
    assert_eq!(hex(&Sha256::digest(&out)), hex(&Sha256::digest(&want)));
}

/// `ssh -W 127.0.0.1:<port>` through the fixture's sshd, its stdin and
/// stdout one end of a socketpair; the other end is returned.
fn proxy_command(sshd: &Sshd) -> (OwnedFd, Child) {
    let (ours, theirs) = UnixStream::pair().expect("socketpair");
    let theirs = OwnedFd::from(theirs);
    let mut cmd = Command::new("ssh");
    cmd.args(ssh_opts(
        &sshd.known_hosts(),
        &sshd.user_key(),
        "aes128-gcm@openssh.com",
    ))
    .args(["-p", &sshd.port().to_string(), "-W"])
    .arg(format!("127.0.0.1:{}", sshd.port()))
    .arg(format!("{}@127.0.0.1", sshd.user()))
    .stdin(Stdio::from(theirs.try_clone().expect("dup")))
    .stdout(Stdio::from(theirs))
    .stderr(Stdio::inherit());
    let child = cmd.spawn().expect("ssh (openssh-client) must be installed");
    (OwnedFd::from(ours), child)
}

#[test]
fn a_session_runs_over_a_tcp_stream_handed_in() {
    let _g = serial();
    let sshd = Sshd::start();
    runtime().block_on(async {
        let tcp = std::net::TcpStream::connect(sshd.addr()).expect("tcp");
        tcp.set_nonblocking(true).expect("nonblocking");
        let s =
            Session::connect_stream(OwnedFd::from(tcp), "127.0.0.1", sshd.port(), config(&sshd))
                .await
                .expect("handshake over the stream");
        exec_checked(&sshd, &s).await;
        s.close("done").await.expect("close");
    });
}

#[test]
fn a_proxy_command_carries_the_session_and_leaves_nothing_behind() {
    let _g = serial();
    let sshd = Sshd::start();
    let rt = runtime();
    let fds = rt.block_on(fd_baseline(&sshd));
    let (stream, mut child) = proxy_command(&sshd);
    rt.block_on(async {
        let s = Session::connect_stream(stream, "127.0.0.1", sshd.port(), config(&sshd))
            .await
            .expect("handshake through ssh -W");
        exec_checked(&sshd, &s).await;
        // Dropped, not closed: the proxy sees its stdin end and exits.
        drop(s);
        let stats = settle(Duration::from_secs(10)).await;
        assert_eq!(stats.ops_in_flight, 0, "{stats:?}");
        assert_eq!(stats.orphaned_outstanding, 0, "{stats:?}");
    });
    let status = child.wait().expect("wait for ssh -W");
    assert!(
        status.code().is_some(),
        "ssh -W ended by a signal: {status:?}"
    );
    assert_eq!(uring_ssh::libssh2_bytes_outstanding(), 0);
    assert_fds_back_to(fds);
}

#[test]
fn a_host_key_is_checked_under_the_name_given() {
    let _g = serial();
    let sshd = Sshd::start();
    let (stream, mut child) = proxy_command(&sshd);
    runtime().block_on(async {
        // known_hosts holds [127.0.0.1]:port; another name is unknown.
        let e =
            Session::connect_stream(stream, "bastion-hidden.example", sshd.port(), config(&sshd))
                .await
                .expect_err("an unknown host name must fail the host-key check");
        assert!(matches!(e, Error::HostKey(_)), "{e:?}");
    });
    let _ = child.kill();
    let _ = child.wait();
}

#[test]
fn what_is_not_a_stream_socket_is_refused() {
    let _g = serial();
    runtime().block_on(async {
        let file = std::fs::File::open("/dev/null").expect("/dev/null");
        let e = Session::connect_stream(OwnedFd::from(file), "h", 22, uring_ssh::Config::new())
            .await
            .expect_err("a file is not a socket");
        assert!(e.to_string().contains("not a socket"), "{e}");
        let udp = std::net::UdpSocket::bind("127.0.0.1:0").expect("udp");
        let e = Session::connect_stream(OwnedFd::from(udp), "h", 22, uring_ssh::Config::new())
            .await
            .expect_err("a datagram socket is not a stream");
        assert!(e.to_string().contains("not a stream socket"), "{e}");
    });
}
