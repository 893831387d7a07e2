//! The orchestrator: the server, the environment checks, every case's
//! rows in alternating order, then the table (and JSON).

use std::io::Write;
use std::process::{Command, Stdio};
use std::time::Instant;

use uring_ssh_testkit::{sshd, tools};

use crate::TCP_CEILING;
use crate::opts::Opts;
use crate::report::{json, print_case, table};
use crate::run::{Case, Ctx, Row, check};
use crate::scenarios;
use crate::tcp::tcp_server;

/// Runs every case; the exit status (1 if a row failed or something the
/// run needs is missing).
pub fn orchestrate(o: Opts) -> i32 {
    let started = Instant::now();
    let (ctx, notes) = setup(&o);
    if let Err(e) = preflight(&ctx) {
        eprintln!("compare: {e}");
        return 1;
    }
    println!(
        "compare: {} mode, {} run(s) per case, libssh2 {}, OpenSSH sshd on 127.0.0.1:{}; {}",
        if o.smoke { "smoke" } else { "full" },
        o.runs,
        uring_ssh::libssh2_version(),
        ctx.sshd.port(),
        notes.join("; ")
    );
    let cases = scenarios::cases(&o, &ctx);
    let mut rows: Vec<Row> = Vec::new();
    for case in &cases {
        let t = Instant::now();
        let first = rows.len();
        run_case(&ctx, case, &mut rows);
        print_case(&rows[first..]);
        println!("  ({:.1} s)", t.elapsed().as_secs_f64());
    }
    let table = table(&rows);
    println!("\n{table}");
    let failed = rows.iter().filter(|r| r.error.is_some()).count();
    println!(
        "compare: {} rows, {failed} failed, {:.0} s in all",
        rows.len(),
        started.elapsed().as_secs_f64()
    );
    if let Some(path) = &o.json {
        let mut f = std::fs::File::create(path).expect("create JSON file");
        f.write_all(json(&o, &notes, &rows).as_bytes())
            .expect("write JSON");
        println!("compare: JSON in {}", path.display());
    }
    i32::from(failed > 0)
}

/// Starts sshd (pinned to core 1 when there are two cores), picks the
/// syscall counter and the TCP sink; the context and the run's notes.
fn setup(o: &Opts) -> (Ctx, Vec<String>) {
    // Online CPUs, not this process's affinity (scripts/compare.sh pins us).
    // SAFETY: sysconf has no preconditions.
    let two_cores = unsafe { libc::sysconf(libc::_SC_NPROCESSORS_ONLN) } >= 2;
    let pin = two_cores && tools::have("taskset");
    let sshd = sshd::Sshd::builder()
        .log_level("ERROR")
        .extra("MaxStartups 2000:30:2000")
        .start();
    let mut notes = Vec::new();
    if pin {
        let ok = Command::new("taskset")
            .args(["-a", "-c", "-p", "1", &sshd.pid().to_string()])
            .stdout(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        notes.push(if ok {
            "sshd pinned to core 1, clients to core 0 (taskset)".to_string()
        } else {
            "taskset of sshd failed: not pinned".to_string()
        });
    } else {
        notes.push("not pinned (one core or no taskset)".to_string());
    }
    let counter = syscall_counter();
    notes.push(format!(
        "syscalls counted with {}",
        match counter {
            Some("perf") => "perf stat -e raw_syscalls:sys_enter (whole client process tree)",
            Some(_) => "strace -f -c (whole client process tree)",
            None => "nothing (neither perf nor strace works): column empty",
        }
    ));
    let base = std::env::var("BENCH_DIR").unwrap_or_else(|_| "/dev/shm".into());
    let ctx = Ctx {
        pin,
        counter,
        peers: o.peers.clone(),
        me: std::env::current_exe().expect("current exe"),
        work: tempfile::tempdir_in(&base).expect("work dir"),
        tcp_port: tcp_server(pin.then_some(1)),
        sshd,
    };
    (ctx, notes)
}

/// `perf` if it can count system calls here, else `strace` if present.
fn syscall_counter() -> Option<&'static str> {
    if Command::new("perf")
        .args([
            "stat",
            "-e",
            "raw_syscalls:sys_enter",
            "-o",
            "/dev/null",
            "--",
            "true",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
    {
        Some("perf")
    } else if tools::have("strace") {
        Some("strace")
    } else {
        None
    }
}

/// A missing tool or peer program would drop rows: fail instead.
fn preflight(ctx: &Ctx) -> Result<(), String> {
    let missing: Vec<&str> = ["ssh", "sftp", "scp", "rsync", "tar", "openssl"]
        .into_iter()
        .filter(|t| !tools::have(t))
        .collect();
    if !missing.is_empty() {
        return Err(format!(
            "missing {}: run as root (scripts/compare.sh installs them)",
            missing.join(", ")
        ));
    }
    for p in ["peer_ssh2", "peer_russh", "peer_async_ssh2_lite"] {
        if !ctx.peers.join(p).exists() {
            return Err(format!(
                "{} missing: build benches/peers first (scripts/compare.sh does)",
                ctx.peers.join(p).display()
            ));
        }
    }
    Ok(())
}

/// Appends the case's rows to `rows` and runs them `case.runs` times, in
/// reversed order every other run; a row that failed once is not run again.
fn run_case(ctx: &Ctx, case: &Case, rows: &mut Vec<Row>) {
    let first = rows.len();
    let args = &case.args;
    for j in &case.jobs {
        rows.push(Row {
            scenario: case.scenario,
            case: case.name.clone(),
            client: j.client.clone(),
            runs: Vec::new(),
            error: None,
        });
    }
    // The TCP ceiling talks to the sink server, not sshd.
    let tcp_args = {
        let mut a = args.clone();
        if let Some(i) = a.iter().position(|x| x == "--port") {
            a[i + 1] = ctx.tcp_port.to_string();
        }
        if let Some(i) = a.iter().position(|x| x == "--scenario") {
            a[i + 1] = format!("tcp-{}", a[i + 1]);
        }
        a
    };
    for run in 0..case.runs {
        let mut order: Vec<usize> = (0..case.jobs.len()).collect();
        if run % 2 == 1 {
            order.reverse();
        }
        for i in order {
            let job = &case.jobs[i];
            let row = &mut rows[first + i];
            if row.error.is_some() {
                continue;
            }
            if let Some(p) = &case.check.clear {
                let _ = std::fs::remove_dir_all(p);
                let _ = std::fs::remove_file(p);
            }
            let mut job_args = if job.client == TCP_CEILING {
                tcp_args.clone()
            } else {
                args.clone()
            };
            job_args.extend(job.extra.iter().cloned());
            let counted = case.syscalls.then(|| ctx.work.path().join("syscalls.txt"));
            let r = ctx.run(job, &job_args, counted.as_deref()).and_then(|f| {
                check(&case.check)?;
                Ok(f)
            });
            match r {
                Ok(f) => row.runs.push(f),
                Err(e) => {
                    eprintln!(
                        "FAILED: [{}] {} / {}: {e}",
                        case.scenario, case.name, job.client
                    );
                    row.error = Some(e);
                }
            }
        }
    }
}
