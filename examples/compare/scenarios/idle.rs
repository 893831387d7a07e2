//! Scenario 6: many idle authenticated sessions, for the memory each costs.

use crate::opts::Opts;
use crate::run::{Case, Ctx};

/// The one case (one run).
pub fn cases(o: &Opts, ctx: &Ctx, cipher: &str) -> Vec<Case> {
    let n = o.pick(1000usize, 50);
    let args = super::args(
        ctx.client_args(cipher),
        &["--scenario", "idle", "--sessions", &n.to_string()],
    );
    vec![super::case(
        6,
        format!("{n} idle sessions"),
        args,
        ctx.rust_clients(true),
        1,
    )]
}
