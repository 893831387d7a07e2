//! How long dropping a session takes, and what it leaves behind: against a
//! throwaway OpenSSH server on loopback, on one current-thread runtime,
//! `DROPS` times (default 300) a session is connected, authenticated, and
//! either mid-transfer (`exec("cat /dev/zero")` with at least 1 MiB read) or
//! idle (right after auth), then dropped; only the drop itself is timed.
//! Exits non-zero if anything leaked.

use uring_ssh_testkit::drops;
use uring_ssh_testkit::sshd;

fn main() {
    // `cargo bench` passes `--bench`; nothing else is expected.
    let drops: usize = std::env::var("DROPS")
        .ok()
        .map(|v| v.parse().expect("DROPS must be a number"))
        .unwrap_or(300);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let ok = rt.block_on(async {
        let sshd = sshd::Sshd::builder()
            .extra("MaxStartups 1000:30:1000")
            .start();
        println!(
            "drop_latency: OpenSSH on 127.0.0.1:{} (throwaway), libssh2 {}, one thread, {drops} drops each",
            sshd.port(),
            uring_ssh::libssh2_version()
        );
        let target = drops::Target {
            addr: sshd.addr(),
            known_hosts: sshd.known_hosts(),
            user: sshd.user(),
            key: sshd.user_key(),
        };
        drops::run(&target, drops).await.iter().all(|d| d.clean)
    });
    if !ok {
        std::process::exit(1);
    }
}
