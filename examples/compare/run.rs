//! Cases, their rows, and running one row once.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use uring_ssh_testkit::{sshd, tools};

use crate::client::Figures;
use crate::{CLIENT_FLAG, OURS};

/// How one row runs.
#[derive(Clone)]
pub enum How {
    /// A client program taking the common arguments, printing one JSON line.
    Client {
        program: PathBuf,
        env: Vec<(&'static str, &'static str)>,
    },
    /// A shell script (OpenSSH tools) timed from outside; what it moves.
    Shell {
        script: String,
        bytes: u64,
        count: u64,
    },
    /// Figures measured once, outside the runs (the openssl ceiling).
    Fixed(Figures),
}

/// One row of a case.
#[derive(Clone)]
pub struct Job {
    pub client: String,
    pub how: How,
    /// Client options of this row only.
    pub extra: Vec<String>,
    /// The cores the row's client may use when pinning (`taskset -c`);
    /// `None`: core 0, the sshd on core 1.
    pub cores: Option<&'static str>,
}

/// What a case checks after each run, and what it cleans before.
#[derive(Clone, Default)]
pub struct Check {
    /// Removed before each run.
    pub clear: Option<PathBuf>,
    /// A file whose size must be this after each run.
    pub file: Option<(PathBuf, u64)>,
    /// A tree (source, destination, files) compared after each run.
    pub tree: Option<(PathBuf, PathBuf, usize)>,
}

pub struct Case {
    pub scenario: u32,
    pub name: String,
    /// Client options (`--scenario` etc.) shared by its client rows.
    pub args: Vec<String>,
    pub jobs: Vec<Job>,
    pub check: Check,
    /// Count the client's system calls (once per row, under `perf`).
    pub syscalls: bool,
    /// Runs (1 for cases too slow to repeat).
    pub runs: usize,
}

pub struct Row {
    pub scenario: u32,
    pub case: String,
    pub client: String,
    pub runs: Vec<Figures>,
    pub error: Option<String>,
}

pub struct Ctx {
    pub sshd: sshd::Sshd,
    pub pin: bool,
    pub counter: Option<&'static str>,
    pub peers: PathBuf,
    pub me: PathBuf,
    pub work: tempfile::TempDir,
    pub tcp_port: u16,
}

impl Ctx {
    pub fn client_args(&self, cipher: &str) -> Vec<String> {
        let s = &self.sshd;
        vec![
            "--port".into(),
            s.port().to_string(),
            "--user".into(),
            s.user(),
            "--key".into(),
            s.user_key().display().to_string(),
            "--known-hosts".into(),
            s.known_hosts().display().to_string(),
            "--cipher".into(),
            cipher.into(),
        ]
    }

    pub fn opts(&self, cipher: &str) -> String {
        tools::ssh_opts(&self.sshd.known_hosts(), &self.sshd.user_key(), cipher).join(" ")
    }

    pub fn target(&self) -> String {
        format!("{}@127.0.0.1", self.sshd.user())
    }

    /// `ssh` to the server running `command`.
    pub fn ssh(&self, cipher: &str, command: &str) -> String {
        format!(
            "ssh -p {} {} {} '{command}'",
            self.sshd.port(),
            self.opts(cipher),
            self.target()
        )
    }

    pub fn ours(&self) -> Job {
        Job {
            client: OURS.into(),
            how: How::Client {
                program: self.me.clone(),
                env: vec![("URING_SSH_BACKEND", "io_uring")],
            },
            extra: Vec::new(),
            cores: None,
        }
    }

    pub fn ours_poll(&self) -> Job {
        Job {
            client: format!("{OURS} (poll backend)"),
            how: How::Client {
                program: self.me.clone(),
                env: vec![("URING_SSH_BACKEND", "poll")],
            },
            extra: Vec::new(),
            cores: None,
        }
    }

    /// Ours on the ring with batched receives off: what batching gains.
    pub fn ours_unbatched(&self) -> Job {
        Job {
            client: format!("{OURS} (ring, no receive batching)"),
            how: How::Client {
                program: self.me.clone(),
                env: vec![
                    ("URING_SSH_BACKEND", "io_uring"),
                    (crate::ours::RECEIVE_BATCH_ENV, "0"),
                ],
            },
            extra: Vec::new(),
            cores: None,
        }
    }

    pub fn peer(&self, client: &str, program: &str) -> Job {
        Job {
            client: client.into(),
            how: How::Client {
                program: self.peers.join(program),
                env: Vec::new(),
            },
            extra: Vec::new(),
            cores: None,
        }
    }

    /// Ours on both backends and the three Rust peers.
    pub fn rust_clients(&self, with_ssh2: bool) -> Vec<Job> {
        let mut v = vec![self.ours(), self.ours_poll()];
        if with_ssh2 {
            v.push(self.peer("ssh2-rs 0.9", "peer_ssh2"));
        }
        v.push(self.peer("async-ssh2-lite 0.5", "peer_async_ssh2_lite"));
        v.push(self.peer("russh 0.65", "peer_russh"));
        v
    }

    pub fn shell(&self, client: &str, script: String, bytes: u64, count: u64) -> Job {
        Job {
            client: client.into(),
            how: How::Shell {
                script,
                bytes,
                count,
            },
            extra: Vec::new(),
            cores: None,
        }
    }

    /// The argv that runs `job` with `args`, pinned, maybe counted.
    pub fn command(&self, job: &Job, args: &[String], counted: Option<&Path>) -> Command {
        let mut argv: Vec<String> = Vec::new();
        if self.pin {
            argv.extend(["taskset", "-c", job.cores.unwrap_or("0")].map(String::from));
        }
        if let (Some(out), Some(tool)) = (counted, self.counter) {
            match tool {
                "perf" => argv.extend(
                    [
                        "perf",
                        "stat",
                        "-x",
                        ",",
                        "-e",
                        "raw_syscalls:sys_enter",
                        "-o",
                        &out.display().to_string(),
                        "--",
                    ]
                    .map(String::from),
                ),
                _ => argv.extend(
                    ["strace", "-f", "-c", "-o", &out.display().to_string()].map(String::from),
                ),
            }
        }
        let mut env = Vec::new();
        match &job.how {
            How::Client { program, env: e } => {
                argv.push(program.display().to_string());
                if *program == self.me {
                    argv.push(CLIENT_FLAG.into());
                }
                argv.extend(args.iter().cloned());
                env.extend(e.iter().cloned());
            }
            How::Shell { script, .. } => {
                argv.extend(["sh".into(), "-c".into(), script.clone()]);
            }
            How::Fixed(_) => unreachable!("fixed rows do not run"),
        }
        let mut c = Command::new(&argv[0]);
        c.args(&argv[1..]).envs(env).stdin(Stdio::null());
        c
    }

    /// Runs one row once; its figures or what went wrong.
    pub fn run(
        &self,
        job: &Job,
        args: &[String],
        counted: Option<&Path>,
    ) -> Result<Figures, String> {
        if let How::Fixed(f) = &job.how {
            return Ok(f.clone());
        }
        let mut cmd = self.command(job, args, counted);
        let (t0, c0) = (Instant::now(), tools::cpu_split(true));
        let out = cmd.output().map_err(|e| format!("spawn: {e}"))?;
        let secs = t0.elapsed().as_secs_f64();
        let c1 = tools::cpu_split(true);
        if !out.status.success() {
            let err = String::from_utf8_lossy(&out.stderr);
            let tail: Vec<&str> = err.lines().rev().take(6).collect();
            return Err(format!("{}: {}", out.status, tail.join(" | ")));
        }
        let mut f = match &job.how {
            How::Shell { bytes, count, .. } => {
                let mut f = Figures::default();
                f.set("bytes", *bytes as f64);
                f.set("count", *count as f64);
                f.set("secs", secs);
                f.set("user", c1.0 - c0.0);
                f.set("sys", c1.1 - c0.1);
                f
            }
            _ => {
                let text = String::from_utf8_lossy(&out.stdout);
                let line = text.lines().rev().find(|l| l.starts_with('{'));
                line.and_then(Figures::parse)
                    .ok_or_else(|| format!("no figures in output: {text}"))?
            }
        };
        if let Some(path) = counted {
            f.set("syscalls", syscall_count(path).ok_or("no syscall count")?);
        }
        Ok(f)
    }
}

/// The total of a `perf stat -x,` or `strace -c` output file.
pub fn syscall_count(path: &Path) -> Option<f64> {
    let text = std::fs::read_to_string(path).ok()?;
    if let Some(l) = text.lines().find(|l| l.contains("raw_syscalls:sys_enter")) {
        return l.split(',').next()?.trim().parse().ok();
    }
    let total = text
        .lines()
        .rev()
        .find(|l| l.trim_end().ends_with("total"))?;
    total.split_whitespace().nth(3)?.parse().ok()
}

pub fn check(c: &Check) -> Result<(), String> {
    if let Some((path, len)) = &c.file {
        let got = std::fs::metadata(path)
            .map_err(|e| format!("{}: {e}", path.display()))?
            .len();
        if got != *len {
            return Err(format!("{}: {got} bytes, expected {len}", path.display()));
        }
    }
    if let Some((src, dst, files)) = &c.tree {
        let (src, dst, files) = (src.clone(), dst.clone(), *files);
        std::panic::catch_unwind(move || tools::same_tree(&src, &dst, files))
            .map_err(|_| "tree differs".to_string())?;
    }
    Ok(())
}
