//! Client CPU per handshake with the post-quantum key exchange
//! (`mlkem768x25519-sha256`) and with `curve25519-sha256`: uring-ssh,
//! russh and OpenSSH 10.0's `ssh`, against one OpenSSH 10.0 server, in one
//! run. Started by `bash scripts/handshake-bench.sh`, which builds the
//! clients first.
//!
//! Each row is one client process doing `--count` sequential handshakes
//! (TCP connect, key exchange, Ed25519 public-key auth) pinned to core 0,
//! the server pinned to core 1; CPU is the process's user + system time
//! divided by the count. OpenSSH's `ssh` cannot stop after auth, so its
//! row runs `ssh host true` (one exec more) per handshake, each a new
//! process (its exec and dynamic loading included, as a user pays them).
//! Rows alternate order between runs; the table shows medians.
//!
//! Options (after `--`): `--count N` (default 100), `--runs R` (default 5).

use uring_ssh_testkit::sshd;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

const KEXES: [&str; 2] = ["mlkem768x25519-sha256", "curve25519-sha256"];

fn main() {
    let mut count = 100usize;
    let mut runs = 5usize;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut num = || args.next().and_then(|v| v.parse().ok()).expect("a number");
        match a.as_str() {
            "--count" => count = num(),
            "--runs" => runs = num(),
            "--bench" => {}
            other => panic!("unknown option {other}"),
        }
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let ours = root.join("target/release/examples/compare");
    let russh = root.join("benches/peers/target/release/peer_russh");
    for bin in [&ours, &russh] {
        assert!(
            bin.exists(),
            "{} missing: run `bash scripts/handshake-bench.sh`, which builds it",
            bin.display()
        );
    }
    let sshd = sshd::Sshd::builder().openssh10().start();
    pin(sshd.pid(), "1");
    let user = sshd.user();
    let key = sshd.user_key();
    let kh = sshd.known_hosts();
    let port = sshd.port().to_string();

    // (client, kex) -> CPU ms per handshake, one per run.
    let mut figures: Vec<((&str, &str), Vec<f64>)> = Vec::new();
    let mut record = |client: &'static str, kex: &'static str, ms: f64| match figures
        .iter_mut()
        .find(|(k, _)| *k == (client, kex))
    {
        Some((_, v)) => v.push(ms),
        None => figures.push(((client, kex), vec![ms])),
    };
    for run in 0..runs {
        let mut rows: Vec<(&'static str, &'static str)> = Vec::new();
        for kex in KEXES {
            for client in ["uring-ssh", "russh", "OpenSSH 10.0 ssh"] {
                rows.push((client, kex));
            }
        }
        if run % 2 == 1 {
            rows.reverse();
        }
        for (client, kex) in rows {
            let ms = match client {
                "uring-ssh" | "russh" => {
                    let bin = if client == "russh" { &russh } else { &ours };
                    let mut c = Command::new("taskset");
                    c.arg("-c").arg("0").arg(bin);
                    if client == "uring-ssh" {
                        c.arg("--client");
                    }
                    c.args(["--scenario", "connect", "--sessions", "1", "--count"])
                        .arg(count.to_string())
                        .args(["--port", &port, "--user", &user, "--kex", kex])
                        .arg("--key")
                        .arg(&key)
                        .arg("--known-hosts")
                        .arg(&kh);
                    let out = c.stderr(Stdio::inherit()).output().expect("run client");
                    assert!(out.status.success(), "{client} {kex}: {out:?}");
                    let line = String::from_utf8_lossy(&out.stdout);
                    (figure(&line, "user") + figure(&line, "sys")) / figure(&line, "count") * 1e3
                }
                _ => openssh(&sshd, kex, count),
            };
            record(client, kex, ms);
        }
    }
    println!(
        "\nclient CPU per handshake, ms (median of {runs} runs of {count}; OpenSSH 10.0 server)"
    );
    println!(
        "{:<18} {:>24} {:>20} {:>8}",
        "client", KEXES[0], KEXES[1], "ratio"
    );
    let median = |v: &Vec<f64>| {
        let mut v = v.clone();
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let get = |client: &str, kex: &str| {
        figures
            .iter()
            .find(|(k, _)| *k == (client, kex))
            .map(|(_, v)| median(v))
            .unwrap_or(f64::NAN)
    };
    for client in ["uring-ssh", "russh", "OpenSSH 10.0 ssh"] {
        let (pq, classic) = (get(client, KEXES[0]), get(client, KEXES[1]));
        println!(
            "{client:<18} {pq:>24.2} {classic:>20.2} {:>8.3}",
            pq / classic
        );
    }
    println!(
        "uring-ssh with ML-KEM ÷ russh with ML-KEM: {:.3}",
        get("uring-ssh", KEXES[0]) / get("russh", KEXES[0])
    );
}

/// A number from the client's one JSON line.
fn figure(line: &str, key: &str) -> f64 {
    let at = line
        .find(&format!("\"{key}\":"))
        .unwrap_or_else(|| panic!("no {key} in {line}"));
    line[at + key.len() + 3..]
        .split([',', '}'])
        .next()
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("bad {key} in {line}"))
}

/// Pins a process and its future children to `cpus`.
fn pin(pid: u32, cpus: &str) {
    let _ = Command::new("taskset")
        .args(["-a", "-p", "-c", cpus, &pid.to_string()])
        .stdout(Stdio::null())
        .status();
}

/// `count` runs of OpenSSH 10.0's `ssh host true` from the Debian 13 tree,
/// CPU from the children's rusage.
fn openssh(sshd: &sshd::Sshd, kex: &str, count: usize) -> f64 {
    let inner = |p: PathBuf| sshd.remote_path(&p).display().to_string();
    let one = format!(
        "ssh -F none -i {} -o UserKnownHostsFile={} -o KexAlgorithms={kex} -o BatchMode=yes \
         -o LogLevel=ERROR -p {} {}@127.0.0.1 true",
        inner(sshd.user_key()),
        inner(sshd.known_hosts()),
        sshd.port(),
        sshd.user()
    );
    let root = sshd
        .dir()
        .ancestors()
        .find(|a| a.join("usr/bin/ssh").exists())
        .expect("the Debian 13 tree");
    let before = children_cpu();
    let status = Command::new("taskset")
        .args(["-c", "0", "chroot"])
        .arg(root)
        .args([
            "sh",
            "-c",
            &format!("for i in $(seq {count}); do {one} || exit 1; done"),
        ])
        .status()
        .expect("run ssh");
    assert!(status.success(), "OpenSSH ssh {kex}");
    (children_cpu() - before) / count as f64 * 1e3
}

/// User + system seconds of reaped children so far.
fn children_cpu() -> f64 {
    // SAFETY: getrusage fills the struct it is given.
    let ru = unsafe {
        let mut ru: libc::rusage = std::mem::zeroed();
        libc::getrusage(libc::RUSAGE_CHILDREN, &mut ru);
        ru
    };
    let t = |tv: libc::timeval| tv.tv_sec as f64 + tv.tv_usec as f64 / 1e6;
    t(ru.ru_utime) + t(ru.ru_stime)
}
