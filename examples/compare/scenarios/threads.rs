//! Scenario 10: threads. What the `Send` session handle costs beside the
//! native API (one session reading or writing, client on core 0), then N
//! sessions on one thread (the reference row), on a pool of one and of two ring threads, and
//! through Send handles, beside russh on tokio's current-thread and
//! multi-thread runtimes. In the second case every client may use both
//! cores; sshd stays pinned to core 1, so its one core bounds MB/s and
//! client CPU per GiB is the figure that compares.

use crate::opts::Opts;
use crate::run::{Case, Ctx, Job};

/// The handle's overhead (read and write), then the thread counts.
pub fn cases(o: &Opts, ctx: &Ctx, cipher: &str) -> Vec<Case> {
    let short = super::short(cipher);
    let mut cases = Vec::new();
    let mib = o.pick(512, 16).min(o.big());
    for dir in ["read", "write"] {
        let jobs = vec![
            ctx.ours(),
            variant(
                ctx.ours(),
                "(Send handle)",
                &["--threads", "1", "--via", "handle"],
                None,
            ),
        ];
        let args = super::args(
            ctx.client_args(cipher),
            &["--scenario", dir, "--mib", &mib.to_string()],
        );
        cases.push(super::case(
            10,
            format!("{short} {dir} {mib} MiB: native vs Send handle"),
            args,
            jobs,
            o.runs,
        ));
    }
    let n = o.pick(16, 4);
    let per = o.session_mib.unwrap_or(o.pick(64, 4));
    let both = Some("0,1");
    let russh = || ctx.peer("russh 0.65", "peer_russh");
    let jobs = vec![
        Job {
            cores: both,
            ..ctx.ours()
        },
        variant(ctx.ours(), "(pool, 1 thread)", &["--threads", "1"], both),
        variant(ctx.ours(), "(pool, 2 threads)", &["--threads", "2"], both),
        variant(
            ctx.ours(),
            "(Send handles, pool of 2)",
            &["--threads", "2", "--via", "handle"],
            both,
        ),
        variant(russh(), "(current-thread)", &[], both),
        variant(
            russh(),
            "(multi-thread, 2 workers)",
            &["--threads", "2"],
            both,
        ),
    ];
    let args = super::args(
        ctx.client_args(cipher),
        &[
            "--scenario",
            "read",
            "--mib",
            &per.to_string(),
            "--sessions",
            &n.to_string(),
        ],
    );
    cases.push(super::case(
        10,
        format!("{short} {n} sessions x {per} MiB read, both cores"),
        args,
        jobs,
        o.runs,
    ));
    cases
}

/// `job` labelled with `what`, with its own options and cores.
fn variant(mut job: Job, what: &str, extra: &[&str], cores: Option<&'static str>) -> Job {
    job.client = format!("{} {what}", job.client);
    job.extra = extra.iter().map(|s| s.to_string()).collect();
    job.cores = cores;
    job
}
