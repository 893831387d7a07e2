//! One nop round trip through this thread's ring, and 64 nops awaited
//! together (submitted in one `io_uring_enter`), on a tokio current-thread
//! runtime built once.

use std::cell::Cell;
use std::future::Future;
use std::time::Duration;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use uring_ssh::reactor::{self, Stats, nop};

const BATCH: usize = 64;

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
}

/// Awaits every future on this task; panics on the first error.
async fn join_all<F: Future<Output = Result<(), uring_ssh::Error>>>(futs: Vec<F>) {
    for r in futures::future::join_all(futs).await {
        r.expect("nop");
    }
}

fn per_nop(label: &str, before: Stats, after: Stats, nops: u64) {
    let n = nops.max(1) as f64;
    println!(
        "{label}: {nops} nops, {:.4} io_uring_enter per nop, {:.3} SQEs per nop, {:.3} CQEs per nop \
         (ops in flight after: {})",
        (after.enter_calls - before.enter_calls) as f64 / n,
        (after.sqes_submitted - before.sqes_submitted) as f64 / n,
        (after.cqes_reaped - before.cqes_reaped) as f64 / n,
        after.ops_in_flight,
    );
}

fn bench_nop(c: &mut Criterion) {
    let rt = runtime();
    rt.block_on(async { reactor::init() }).expect("io_uring");
    // Warm the ring and the driver task once outside the measurement.
    rt.block_on(nop()).expect("nop");

    let mut group = c.benchmark_group("reactor");

    let done = Cell::new(0u64);
    let before = reactor::stats().expect("ring");
    group.throughput(Throughput::Elements(1));
    group.bench_function("nop round trip", |b| {
        b.iter(|| {
            rt.block_on(nop()).expect("nop");
            done.set(done.get() + 1);
        })
    });
    per_nop(
        "single",
        before,
        reactor::stats().expect("ring"),
        done.get(),
    );

    let done = Cell::new(0u64);
    let before = reactor::stats().expect("ring");
    group.throughput(Throughput::Elements(BATCH as u64));
    group.bench_function("64 nops joined", |b| {
        b.iter(|| {
            rt.block_on(join_all((0..BATCH).map(|_| nop()).collect()));
            done.set(done.get() + BATCH as u64);
        })
    });
    per_nop(
        "batch of 64",
        before,
        reactor::stats().expect("ring"),
        done.get(),
    );

    group.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .sample_size(20)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2));
    targets = bench_nop
}
criterion_main!(benches);
