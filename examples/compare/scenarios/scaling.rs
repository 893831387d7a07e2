//! Scenario 9: a fixed total read by more and more sessions; ours at every
//! count, the peers up to `--max-sessions`.

use crate::opts::Opts;
use crate::run::{Case, Ctx};

/// One case per session count.
pub fn cases(o: &Opts, ctx: &Ctx, cipher: &str) -> Vec<Case> {
    let mut cases = Vec::new();
    for &n in o.pick(&[1usize, 16, 64, 256, 1000][..], &[1, 32]) {
        let total = o.scaling_mib.unwrap_or(o.big());
        let mib = (total / n as u64).max(1);
        let args = super::args(
            ctx.client_args(cipher),
            &[
                "--scenario",
                "read",
                "--mib",
                &mib.to_string(),
                "--sessions",
                &n.to_string(),
            ],
        );
        let (jobs, runs) = if n <= o.max_sessions {
            (ctx.rust_clients(true), o.runs)
        } else {
            (vec![ctx.ours()], 1)
        };
        cases.push(super::case(
            9,
            format!("chacha20-poly1305 scaling: {n} sessions x {mib} MiB read"),
            args,
            jobs,
            if n >= 1000 { 1 } else { runs },
        ));
    }
    cases
}
