//! Channel throughput and the handshake against a throwaway loopback
//! OpenSSH server: `N` bytes read over exec (`head -c N /dev/zero`) on one
//! authenticated session, at 64 KiB, 1 MiB and 16 MiB; and one connect +
//! key exchange + public-key auth (session dropped after). chacha20-poly1305
//! and curve25519-sha256 pinned; one current-thread runtime.

#[path = "../tests/common/sshd.rs"]
#[allow(dead_code)]
mod sshd;

use std::time::Duration;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use tokio::io::AsyncReadExt;
use uring_ssh::{Config, MethodType, Session};

const SIZES: [(&str, u64); 3] = [
    ("64 KiB", 64 << 10),
    ("1 MiB", 1 << 20),
    ("16 MiB", 16 << 20),
];

async fn connect(sshd: &sshd::Sshd) -> Session {
    let cfg = Config::new()
        .known_hosts(Some(sshd.known_hosts()))
        .ciphers("chacha20-poly1305@openssh.com")
        .method(MethodType::Kex, "curve25519-sha256");
    let s = Session::connect_addr(sshd.addr(), cfg)
        .await
        .expect("connect");
    s.auth_pubkey_file(&sshd.user(), &sshd.user_key(), None)
        .await
        .expect("auth");
    s
}

async fn read(s: &Session, bytes: u64, buf: &mut [u8]) {
    let mut ch = s
        .exec(&format!("head -c {bytes} /dev/zero"))
        .await
        .expect("exec");
    let mut got = 0u64;
    loop {
        let n = ch.read(buf).await.expect("read");
        if n == 0 {
            break;
        }
        got += n as u64;
    }
    assert_eq!(got, bytes);
    ch.wait().await.expect("exit");
}

fn bench_channel(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let sshd = sshd::Sshd::builder().log_level("ERROR").start();
    let session = rt.block_on(connect(&sshd));
    let mut buf = vec![0u8; 256 * 1024];

    let mut group = c.benchmark_group("channel read over exec");
    for (label, bytes) in SIZES {
        group.throughput(Throughput::Bytes(bytes));
        group.bench_function(label, |b| {
            b.iter(|| rt.block_on(read(&session, bytes, &mut buf)))
        });
    }
    group.finish();

    let mut group = c.benchmark_group("session");
    group.throughput(Throughput::Elements(1));
    group.bench_function("connect + kex + pubkey auth", |b| {
        b.iter(|| drop(rt.block_on(connect(&sshd))))
    });
    group.finish();
    rt.block_on(session.close("done")).expect("close");
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
