//! Scenario 7: sessions dropped mid-transfer and idle (ours only): the
//! drop latency, and whether anything was left behind.

use std::net::SocketAddr;

use uring_ssh_testkit::drops;

use crate::client::{self, Args, Figures};
use crate::opts::Opts;
use crate::run::{Case, Ctx};

/// The one case (one run).
pub fn cases(o: &Opts, ctx: &Ctx, cipher: &str) -> Vec<Case> {
    let count = o.pick(300, 20);
    let args = super::args(
        ctx.client_args(cipher),
        &["--scenario", "drop", "--count", &count.to_string()],
    );
    vec![super::case(
        7,
        format!("drop mid-transfer, {count} drops"),
        args,
        vec![ctx.ours()],
        1,
    )]
}

/// Client mode: `drops::run` with `--count` drops per phase.
pub async fn figures(a: &Args) -> Figures {
    let target = drops::Target {
        addr: SocketAddr::from(([127, 0, 0, 1], a.port)),
        known_hosts: a.known_hosts.clone().into(),
        user: a.user.clone(),
        key: a.key.clone().into(),
    };
    let m = client::Meter::start(Vec::new());
    let all = drops::run(&target, a.count).await;
    let mut f = m.finish(0, Vec::new());
    let mid = &all[0];
    let us = |d: std::time::Duration| d.as_secs_f64() * 1e6;
    f.set("p50_us", us(mid.p50));
    f.set("p99_us", us(mid.p99));
    f.set("max_us", us(mid.max));
    f.set("count", a.count as f64);
    f.set("leaks", all.iter().filter(|d| !d.clean).count() as f64);
    f
}
