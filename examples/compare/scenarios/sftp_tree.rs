//! Scenario 8: a tree of many small files, then of 1 MiB files, downloaded
//! over SFTP (ours with 1 and 4 sessions); beside OpenSSH's tools
//! (`sftp`, `scp`, `rsync`, `tar` over `ssh`) and the peers' SFTP.

use uring_ssh_testkit::tools;

use crate::OURS;
use crate::opts::Opts;
use crate::run::{Case, Check, Ctx};

/// 4 KiB files, then 1 MiB files; writes the trees into the work directory.
pub fn cases(o: &Opts, ctx: &Ctx, cipher: &str) -> Vec<Case> {
    let d = ctx.work.path();
    let opts = ctx.opts(cipher);
    let port = ctx.sshd.port();
    let target = ctx.target();
    let small = o.files.unwrap_or(o.pick(10_000, 200));
    let big = (o.big() as usize).min(1000);
    let mut cases = Vec::new();
    for (files, kib) in [(small, 4usize), (big, 1024)] {
        let src = d.join(format!("tree{kib}"));
        tools::write_tree(&src, files, kib * 1024);
        let dst = d.join("dst");
        let bytes = (files * kib * 1024) as u64;
        let mut jobs = vec![ctx.ours()];
        let mut four = ctx.ours();
        four.client = format!("{OURS}, 4 sessions");
        four.extra = vec!["--sessions".into(), "4".into()];
        jobs.push(four);
        for (name, cmd) in tools::tree_tools(&src, port, &opts, &target) {
            jobs.push(ctx.shell(
                name,
                cmd.replace("{dst}", &dst.display().to_string()),
                bytes,
                files as u64,
            ));
        }
        jobs.push(ctx.peer("ssh2-rs 0.9 sftp", "peer_ssh2"));
        jobs.push(ctx.peer("async-ssh2-lite 0.5 sftp", "peer_async_ssh2_lite"));
        jobs.push(ctx.peer("russh-sftp 2", "peer_russh"));
        let args = super::args(
            ctx.client_args(cipher),
            &[
                "--scenario",
                "tree",
                "--remote",
                &src.display().to_string(),
                "--local",
                &dst.display().to_string(),
            ],
        );
        let mut c = super::case(8, format!("{files} files x {kib} KiB"), args, jobs, o.runs);
        c.check = Check {
            clear: Some(dst.clone()),
            file: None,
            tree: Some((src, dst, files)),
        };
        cases.push(c);
    }
    cases
}
