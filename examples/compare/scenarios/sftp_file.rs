//! Scenario 4: one `--big-mib` MiB file downloaded and uploaded over SFTP;
//! beside OpenSSH's `sftp`.

use uring_ssh_testkit::tools;

use crate::MIB;
use crate::opts::Opts;
use crate::run::{Case, Check, Ctx};

/// Download, then upload; writes the source file into the work directory.
pub fn cases(o: &Opts, ctx: &Ctx, cipher: &str) -> Vec<Case> {
    let d = ctx.work.path();
    let opts = ctx.opts(cipher);
    let port = ctx.sshd.port();
    let target = ctx.target();
    let mib = o.big();
    let src = d.join("big.bin");
    tools::write_file(&src, (mib * MIB) as usize);
    let out = d.join("big.out");
    let mut cases = Vec::new();
    for (dir, cmd) in [("download", "get"), ("upload", "put")] {
        let mut jobs = ctx.rust_clients(true);
        jobs.push(ctx.shell(
            "OpenSSH sftp",
            tools::sftp_one(cmd, &src, &out, port, &opts, &target),
            mib * MIB,
            1,
        ));
        let (remote, local) = if cmd == "get" {
            (&src, &out)
        } else {
            (&out, &src)
        };
        let args = super::args(
            ctx.client_args(cipher),
            &[
                "--scenario",
                &format!("sftp-{cmd}"),
                "--remote",
                &remote.display().to_string(),
                "--local",
                &local.display().to_string(),
            ],
        );
        let mut c = super::case(
            4,
            format!("chacha20-poly1305 SFTP {dir} {mib} MiB"),
            args,
            jobs,
            o.runs,
        );
        c.check = Check {
            clear: Some(out.clone()),
            file: Some((out.clone(), mib * MIB)),
            tree: None,
        };
        cases.push(c);
    }
    cases
}
