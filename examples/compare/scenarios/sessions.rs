//! Scenario 2: N sessions at once, each reading `--session-mib` MiB over
//! exec; beside one OpenSSH `ssh` process per session.

use crate::MIB;
use crate::opts::Opts;
use crate::run::{Case, Ctx};

/// One case per session count up to `--max-sessions`.
pub fn cases(o: &Opts, ctx: &Ctx, cipher: &str) -> Vec<Case> {
    let short = super::short(cipher);
    let mib = o.session_mib.unwrap_or(o.pick(16, 4));
    let mut cases = Vec::new();
    for n in o.sessions(&[1, 16, 64, 256], &[1, 16]) {
        let mut jobs = ctx.rust_clients(true);
        jobs.insert(1, ctx.ours_unbatched());
        let one = ctx.ssh(cipher, &format!("head -c {} /dev/zero", mib * MIB));
        jobs.push(ctx.shell(
            "OpenSSH ssh (one process each)",
            format!("for i in $(seq {n}); do {one} > /dev/null & done; wait"),
            n as u64 * mib * MIB,
            n as u64,
        ));
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
        cases.push(super::case(
            2,
            format!("{short} {n} sessions x {mib} MiB read"),
            args,
            jobs,
            o.runs,
        ));
    }
    cases
}
