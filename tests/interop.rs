//! Interop with the servers our users reach: OpenSSH 9.2, OpenSSH 10.0
//! (from a Debian 13 tree, run under chroot) and Dropbear 2022.83.

mod common;

use common::sshd::Sshd;
use common::util::{config, connect_with};
use uring_ssh::MethodType;

#[tokio::test]
async fn openssh10_negotiates_mlkem768x25519() {
    let sshd = Sshd::builder().log_level("DEBUG1").openssh10().start();
    let s = connect_with(&sshd, config(&sshd)).await;
    assert_eq!(
        s.negotiated(MethodType::Kex).as_deref(),
        Some("mlkem768x25519-sha256")
    );
    println!("{}", sshd.log());
}
