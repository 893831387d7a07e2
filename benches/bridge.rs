//! The bridge's copy path with no ring: what libssh2's send and recv
//! callbacks cost per byte.

use std::time::Duration;

use criterion::{BatchSize, Criterion, Throughput, criterion_group, criterion_main};
use std::hint::black_box;
use uring_ssh::Bridge;

const PACKET: usize = 32 * 1024;
const DELIVERY: usize = 512 * 1024;
const READ: usize = 35_000;

fn bench_bridge(c: &mut Criterion) {
    let mut group = c.benchmark_group("bridge");

    // Send: libssh2 hands a packet to the send callback, the transport takes
    // the whole outbound queue for a ring send (the spare vector recycles).
    let bridge = Bridge::new();
    let packet = vec![0x5au8; PACKET];
    let mut spare = Vec::with_capacity(PACKET);
    group.throughput(Throughput::Bytes(PACKET as u64));
    group.bench_function("send 32 KiB: on_send + take_outbound", |b| {
        b.iter(|| {
            let n = bridge.on_send(black_box(&packet));
            debug_assert_eq!(n, PACKET as isize);
            let out = bridge.take_outbound(std::mem::take(&mut spare));
            black_box(&out);
            spare = out;
        })
    });

    // Recv: a ring recv filled 512 KiB (setup, not timed); the transport
    // delivers it and libssh2 reads it in 35000-byte pieces until empty.
    let bridge = Bridge::new();
    let mut out = vec![0u8; READ];
    group.throughput(Throughput::Bytes(DELIVERY as u64));
    group.bench_function("recv 512 KiB: deliver + on_recv x 35000 B", |b| {
        b.iter_batched(
            || vec![0xa5u8; DELIVERY],
            |buf| {
                let back = bridge.deliver(buf, DELIVERY);
                let mut got = 0usize;
                loop {
                    let n = bridge.on_recv(black_box(&mut out));
                    if n <= 0 {
                        break;
                    }
                    got += n as usize;
                }
                debug_assert_eq!(got, DELIVERY);
                bridge.clear_wants_recv();
                // Returned so its deallocation is not timed.
                back
            },
            BatchSize::LargeInput,
        )
    });

    group.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .sample_size(20)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2));
    targets = bench_bridge
}
criterion_main!(benches);
