//! Channel throughput and the handshake against a throwaway loopback
//! OpenSSH server: `N` bytes read over exec (`head -c N /dev/zero`) on one
//! authenticated session, at 64 KiB, 1 MiB and 16 MiB; and one connect +
//! key exchange + public-key auth (session dropped after). chacha20-poly1305
//! and curve25519-sha256 pinned; one current-thread runtime. The client is
//! the one the comparison harness runs (`benches/common/ours.rs`).

#[path = "peers/src/common.rs"]
mod client;
#[path = "common/ours.rs"]
#[allow(dead_code)]
mod ours;
use uring_ssh_testkit::sshd;

use std::time::Duration;

use client::AsyncPeer;
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use ours::Ours;

const SIZES: [(&str, u64); 3] = [
    ("64 KiB", 64 << 10),
    ("1 MiB", 1 << 20),
    ("16 MiB", 16 << 20),
];

fn bench_channel(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let sshd = sshd::Sshd::builder().log_level("ERROR").start();
    let args = client::parse_args(
        [
            "--port",
            &sshd.port().to_string(),
            "--user",
            &sshd.user(),
            "--key",
            &sshd.user_key().display().to_string(),
            "--known-hosts",
            &sshd.known_hosts().display().to_string(),
            "--cipher",
            "chacha20-poly1305@openssh.com",
        ]
        .map(String::from)
        .into_iter(),
    );
    let conn = rt.block_on(Ours::connect(&args));

    let mut group = c.benchmark_group("channel read over exec");
    for (label, bytes) in SIZES {
        group.throughput(Throughput::Bytes(bytes));
        let cmd = format!("head -c {bytes} /dev/zero");
        group.bench_function(label, |b| {
            b.iter(|| rt.block_on(Ours::read_command(&conn, &cmd, bytes, true)))
        });
        group.bench_function(format!("{label}, chunks"), |b| {
            b.iter(|| rt.block_on(Ours::read_command(&conn, &cmd, bytes, false)))
        });
    }
    group.finish();

    let mut group = c.benchmark_group("session");
    group.throughput(Throughput::Elements(1));
    group.bench_function("connect + kex + pubkey auth", |b| {
        b.iter(|| drop(rt.block_on(Ours::connect(&args))))
    });
    group.finish();
    rt.block_on(conn.s.close("done")).expect("close");
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .sample_size(10)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(3));
    targets = bench_channel
}
criterion_main!(benches);
