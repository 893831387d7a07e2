//! The orchestrator's command line.

use std::path::PathBuf;

pub struct Opts {
    pub smoke: bool,
    pub runs: usize,
    pub json: Option<PathBuf>,
    pub peers: PathBuf,
    pub only: Vec<u32>,
    pub big_mib: Option<u64>,
    pub session_mib: Option<u64>,
    pub scaling_mib: Option<u64>,
    pub files: Option<usize>,
    pub max_sessions: usize,
    pub ciphers: Vec<String>,
}

impl Opts {
    pub fn parse(mut it: impl Iterator<Item = String>) -> Opts {
        let mut o = Opts {
            smoke: false,
            runs: 0,
            json: None,
            peers: PathBuf::from("benches/peers/target/release"),
            only: Vec::new(),
            big_mib: None,
            session_mib: None,
            scaling_mib: None,
            files: None,
            max_sessions: usize::MAX,
            ciphers: Vec::new(),
        };
        while let Some(a) = it.next() {
            let mut value = || it.next().unwrap_or_else(|| panic!("{a} needs a value"));
            match a.as_str() {
                "--smoke" => o.smoke = true,
                "--runs" => o.runs = value().parse().expect("--runs R"),
                "--json" => o.json = Some(value().into()),
                "--peers" => o.peers = value().into(),
                "--only" => {
                    o.only = value()
                        .split(',')
                        .map(|n| n.trim().parse().expect("--only 1,2,..."))
                        .collect()
                }
                "--big-mib" => o.big_mib = Some(value().parse().expect("--big-mib N")),
                "--session-mib" => o.session_mib = Some(value().parse().expect("--session-mib N")),
                "--scaling-mib" => o.scaling_mib = Some(value().parse().expect("--scaling-mib N")),
                "--files" => o.files = Some(value().parse().expect("--files N")),
                "--max-sessions" => o.max_sessions = value().parse().expect("--max-sessions N"),
                "--cipher" => o.ciphers.push(value()),
                _ => {
                    eprintln!(
                        "compare [--smoke] [--runs R] [--json FILE] [--peers DIR] [--only 1,2,..] \
                         [--big-mib N] [--session-mib N] [--scaling-mib N] [--files N] [--max-sessions N] [--cipher NAME]..."
                    );
                    std::process::exit(2);
                }
            }
        }
        if o.runs == 0 {
            o.runs = if o.smoke { 1 } else { 3 };
        }
        if o.ciphers.is_empty() {
            o.ciphers = vec![
                "aes128-gcm@openssh.com".into(),
                "chacha20-poly1305@openssh.com".into(),
            ];
        }
        o
    }

    pub fn wants(&self, scenario: u32) -> bool {
        self.only.is_empty() || self.only.contains(&scenario)
    }

    /// `full` in full mode, `smoke` in smoke mode.
    pub fn pick<T>(&self, full: T, smoke: T) -> T {
        if self.smoke { smoke } else { full }
    }

    pub fn big(&self) -> u64 {
        self.big_mib.unwrap_or(self.pick(1024, 32))
    }

    pub fn sessions(&self, full: &[usize], smoke: &[usize]) -> Vec<usize> {
        self.pick(full, smoke)
            .iter()
            .copied()
            .filter(|&n| n <= self.max_sessions)
            .collect()
    }
}
