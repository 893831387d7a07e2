//! The SFTP client against `uring-ssh-evil-sftp`, a server of ours that a
//! real sshd runs as its `sftp` subsystem and that lies on purpose in the
//! scenario asked for (see `tests/common/evil.rs`).

mod common;

use common::evil::{EvilServer, assert_normal_tree, bounded, normal_tree, scenario};
use uring_ssh::sftp::TransferOptions;

/// The benign scenario serves the real tree: the whole client path works
/// against the server, and a tree download arrives intact.
#[tokio::test]
async fn benign_server_serves_a_tree_intact() {
    let server = EvilServer::start(scenario::NONE, |_| {});
    let (_session, sftp) = server.sftp().await;
    assert_eq!(sftp.version(), 3);
    let ext = sftp.extensions();
    assert!(ext.limits && ext.posix_rename && ext.fsync, "{ext:?}");

    let dest = tempfile::tempdir().expect("tempdir");
    let local = dest.path().join("evil");
    let report = bounded(
        "download_tree",
        sftp.download_tree("/evil", &local, &TransferOptions::default()),
    )
    .await;
    assert!(
        report.is_complete(),
        "{:?} {:?}",
        report.failed().next(),
        report.other_errors
    );
    assert_eq!(report.files.len(), normal_tree().len());
    let total: usize = normal_tree().iter().map(|(_, d)| d.len()).sum();
    assert_eq!(report.bytes(), total as u64);
    assert_normal_tree(&local);
    assert!(local.join("empty").is_dir());

    let log = server.log();
    assert!(log.starts_with("start, scenario none"), "{log}");
    assert!(log.contains("READDIR") && log.contains("READ "), "{log}");
    assert!(!log.contains("evil:"), "{log}");
    server.assert_outside_untouched();
}
