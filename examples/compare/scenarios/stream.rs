//! Scenario 1: one session reading (or writing) `--big-mib` MiB over
//! exec, then a smaller run with the system calls counted; beside the
//! OpenSSH `ssh` and the two ceilings (loopback TCP, `openssl speed`).

use std::process::{Command, Stdio};

use crate::client::{self, Figures};
use crate::opts::Opts;
use crate::run::{Case, Ctx, How, Job};
use crate::{GIB, MIB, TCP_CEILING};

/// Read and write, at full size and counted.
pub fn cases(o: &Opts, ctx: &Ctx, cipher: &str) -> Vec<Case> {
    let short = super::short(cipher);
    let ceiling = openssl_speed(cipher).map(|f| Job {
        client: format!("ceiling: openssl speed -evp {short}"),
        how: How::Fixed(f),
        extra: Vec::new(),
        cores: None,
    });
    let mut cases = Vec::new();
    for (mib, counted) in [(o.big(), false), (o.pick(256, 16).min(o.big()), true)] {
        for write in [false, true] {
            let dir = if write { "write" } else { "read" };
            let mut jobs = ctx.rust_clients(true);
            jobs.insert(1, ctx.ours_unbatched());
            let bytes = mib * MIB;
            let script = if write {
                format!(
                    "head -c {bytes} /dev/zero | {}",
                    ctx.ssh(cipher, client::WRITE_COMMAND)
                )
            } else {
                format!(
                    "{} > /dev/null",
                    ctx.ssh(cipher, &format!("head -c {bytes} /dev/zero"))
                )
            };
            jobs.push(ctx.shell("OpenSSH ssh", script, bytes, 1));
            let mut tcp = ctx.ours();
            tcp.client = TCP_CEILING.into();
            jobs.push(tcp);
            if let (Some(c), false) = (&ceiling, counted) {
                jobs.push(c.clone());
            }
            let args = super::args(
                ctx.client_args(cipher),
                &["--scenario", dir, "--mib", &mib.to_string()],
            );
            let what = if counted { ", syscalls" } else { "" };
            let mut c = super::case(
                1,
                format!("{short} {dir} {mib} MiB{what}"),
                args,
                jobs,
                if counted { 1 } else { o.runs },
            );
            c.syscalls = counted;
            cases.push(c);
        }
    }
    cases
}

/// `openssl speed -evp` for the cipher, 16 KiB blocks: bytes per second.
fn openssl_speed(cipher: &str) -> Option<Figures> {
    let evp = match cipher {
        "aes128-gcm@openssh.com" => "aes-128-gcm",
        "aes256-gcm@openssh.com" => "aes-256-gcm",
        "chacha20-poly1305@openssh.com" => "chacha20-poly1305",
        _ => return None,
    };
    let out = Command::new("openssl")
        .args(["speed", "-seconds", "2", "-bytes", "16384", "-evp", evp])
        .stderr(Stdio::null())
        .output()
        .ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let last = text.lines().rev().find(|l| l.trim_end().ends_with('k'))?;
    let kbps: f64 = last
        .split_whitespace()
        .last()?
        .trim_end_matches('k')
        .parse()
        .ok()?;
    let mut f = Figures::default();
    f.set("bytes", GIB);
    f.set("secs", GIB / (kbps * 1000.0));
    f.set("user", GIB / (kbps * 1000.0));
    f.set("sys", 0.0);
    Some(f)
}
