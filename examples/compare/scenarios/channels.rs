//! Scenario 3: one session, 16 channels reading at once (the Rust clients
//! only: OpenSSH's `ssh` has no such mode).

use crate::opts::Opts;
use crate::run::{Case, Ctx};

/// The one case.
pub fn cases(o: &Opts, ctx: &Ctx, cipher: &str) -> Vec<Case> {
    let short = super::short(cipher);
    let mib = (o.big() / 16).max(1);
    let args = super::args(
        ctx.client_args(cipher),
        &[
            "--scenario",
            "read",
            "--mib",
            &mib.to_string(),
            "--channels",
            "16",
        ],
    );
    vec![super::case(
        3,
        format!("{short} 1 session, 16 channels x {mib} MiB read"),
        args,
        ctx.rust_clients(false),
        o.runs,
    )]
}
