//! The comparison harness: uring-ssh beside every peer client, every
//! scenario, one run, one table. Normally started by `bash
//! scripts/compare.sh [--smoke] [--json FILE]`, which installs what is
//! missing, builds the peer programs (`benches/peers`, a workspace of its
//! own) and this example, and pins this process to core 0.
//!
//! It starts a throwaway OpenSSH server on loopback (pinned to core 1 with
//! `taskset` when there are two cores) and runs each scenario for each
//! client as a separate process pinned to core 0: uring-ssh (this program
//! again, in client mode), uring-ssh with `URING_SSH_BACKEND=poll`, ssh2-rs,
//! async-ssh2-lite, russh (+ russh-sftp), and the OpenSSH tools (`ssh`,
//! `sftp`, `scp`, `rsync`, `tar`), plus two ceilings: `openssl speed -evp`
//! for the cipher, and a plain loopback TCP stream read through tokio-uring
//! (uring-ssh's reactor has no public TCP API). Each client prints one JSON
//! line of figures (see `benches/peers/src/common.rs`); OpenSSH tools are
//! timed from outside, their CPU from `getrusage(RUSAGE_CHILDREN)`.
//!
//! Rows of one case run in alternating order (reversed every other run);
//! the table shows medians and the ratios uring-ssh ÷ row. Any failed row
//! makes the exit status non-zero.
//!
//! Options: `--smoke` (1 run, small sizes), `--runs R`, `--json FILE`,
//! `--peers DIR` (the peer programs), `--only 1,4,8` (scenario numbers),
//! `--big-mib N` (size of scenarios 1 and 4, the total of 3 and 9, and the
//! count of 1 MiB files in 8; default 1024), `--session-mib N` (per session
//! in scenario 2; default 16), `--scaling-mib N` (total of scenario 9;
//! default: `--big-mib`), `--files N` (4 KiB files in scenario 8; default
//! 10,000), `--max-sessions N` (session counts of scenario 2 up to N; in
//! scenario 9 the peers stop there and uring-ssh goes on alone, one run),
//! `--cipher NAME` (repeat; scenarios 1 to 3 run for each, the others for
//! chacha20-poly1305).
//!
//! Layout: [`scenarios`] builds the cases (one module per scenario, and
//! the table of them), [`orchestrate`] runs them, [`run`] runs one row,
//! [`report`] prints the results; [`tcp`] is the TCP ceiling and
//! [`opts`] the command line.

#[path = "../../benches/peers/src/common.rs"]
mod client;
#[path = "../../benches/common/ours.rs"]
mod ours;

mod opts;
mod orchestrate;
mod report;
mod run;
mod scenarios;
mod tcp;
mod threads;

use client::Args;
use opts::Opts;

const MIB: u64 = 1 << 20;
const GIB: f64 = (1u64 << 30) as f64;
/// The label of our row, the reference of every ratio.
const OURS: &str = "uring-ssh";
/// Client mode: this program run as one of the clients.
const CLIENT_FLAG: &str = "--client";
/// The label of the raw TCP ceiling row.
const TCP_CEILING: &str = "ceiling: loopback TCP (tokio-uring)";

fn main() {
    let mut argv = std::env::args().skip(1).peekable();
    if argv.peek().map(String::as_str) == Some(CLIENT_FLAG) {
        argv.next();
        client_main(client::parse_args(argv));
    } else {
        std::process::exit(orchestrate::orchestrate(Opts::parse(argv)));
    }
}

/// Client mode: uring-ssh doing one scenario, one JSON line out.
fn client_main(a: Args) {
    client::raise_nofile();
    let f = match a.scenario.as_str() {
        "tcp-read" | "tcp-write" => tcp::tcp_client(&a),
        _ if a.threads > 0 && a.via == "handle" => threads::via_handle(&a),
        _ if a.threads > 0 => threads::on_pool(&a),
        _ => {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            tokio::task::LocalSet::new().block_on(&rt, async {
                if a.scenario == "drop" {
                    scenarios::drop::figures(&a).await
                } else {
                    client::run_async::<ours::Ours>(&a).await
                }
            })
        }
    };
    client::report(&f);
}
