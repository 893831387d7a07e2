//! Scenario 5: connect + key exchange + authentication, one at a time and
//! 16 at once; beside OpenSSH's `ssh` running `true`.

use crate::opts::Opts;
use crate::run::{Case, Ctx};

/// One at a time, then 16 at once.
pub fn cases(o: &Opts, ctx: &Ctx, cipher: &str) -> Vec<Case> {
    let mut cases = Vec::new();
    for (at_once, count) in [(1usize, o.pick(50usize, 5)), (16, o.pick(160, 32))] {
        let mut jobs = ctx.rust_clients(true);
        let one = ctx.ssh(cipher, "true");
        let script = if at_once == 1 {
            format!("for i in $(seq {count}); do {one}; done")
        } else {
            format!("seq {count} | xargs -P {at_once} -I{{}} {one}")
        };
        jobs.push(ctx.shell("OpenSSH ssh (+ exec true)", script, 0, count as u64));
        let args = super::args(
            ctx.client_args(cipher),
            &[
                "--scenario",
                "connect",
                "--count",
                &count.to_string(),
                "--sessions",
                &at_once.to_string(),
            ],
        );
        cases.push(super::case(
            5,
            format!("connect+kex+auth, {at_once} at once, {count} in all"),
            args,
            jobs,
            o.runs,
        ));
    }
    cases
}
