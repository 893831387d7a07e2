//! The scenarios, one module each, and the table that says in which order
//! their cases run and which run once per `--cipher`.

pub mod channels;
pub mod connect;
pub mod drop;
pub mod idle;
pub mod scaling;
pub mod sessions;
pub mod sftp_file;
pub mod sftp_tree;
pub mod stream;
pub mod threads;

use crate::opts::Opts;
use crate::run::{Case, Check, Ctx, Job};

/// The cipher of the scenarios that do not run per `--cipher`.
const CHACHA: &str = "chacha20-poly1305@openssh.com";

/// One scenario: its number (`--only`), whether its cases repeat for each
/// `--cipher` (else they use chacha20-poly1305), and what builds them.
struct Scenario {
    number: u32,
    per_cipher: bool,
    cases: fn(&Opts, &Ctx, &str) -> Vec<Case>,
}

/// In the order the cases run: the per-cipher ones for each cipher in
/// turn, then the others.
const SCENARIOS: &[Scenario] = &[
    Scenario {
        number: 1,
        per_cipher: true,
        cases: stream::cases,
    },
    Scenario {
        number: 2,
        per_cipher: true,
        cases: sessions::cases,
    },
    Scenario {
        number: 3,
        per_cipher: true,
        cases: channels::cases,
    },
    Scenario {
        number: 10,
        per_cipher: true,
        cases: threads::cases,
    },
    Scenario {
        number: 9,
        per_cipher: false,
        cases: scaling::cases,
    },
    Scenario {
        number: 4,
        per_cipher: false,
        cases: sftp_file::cases,
    },
    Scenario {
        number: 5,
        per_cipher: false,
        cases: connect::cases,
    },
    Scenario {
        number: 6,
        per_cipher: false,
        cases: idle::cases,
    },
    Scenario {
        number: 7,
        per_cipher: false,
        cases: drop::cases,
    },
    Scenario {
        number: 8,
        per_cipher: false,
        cases: sftp_tree::cases,
    },
];

/// Every case of the run, in order.
pub fn cases(o: &Opts, ctx: &Ctx) -> Vec<Case> {
    let wanted = |per_cipher: bool| {
        SCENARIOS
            .iter()
            .filter(move |s| s.per_cipher == per_cipher && o.wants(s.number))
    };
    let mut cases = Vec::new();
    for cipher in &o.ciphers {
        for s in wanted(true) {
            cases.extend((s.cases)(o, ctx, cipher));
        }
    }
    for s in wanted(false) {
        cases.extend((s.cases)(o, ctx, CHACHA));
    }
    cases
}

/// A case with nothing to check and no syscall count.
fn case(scenario: u32, name: String, args: Vec<String>, jobs: Vec<Job>, runs: usize) -> Case {
    Case {
        scenario,
        name,
        args,
        jobs,
        check: Check::default(),
        syscalls: false,
        runs,
    }
}

/// `base` (the common client arguments) followed by `more`.
fn args(base: Vec<String>, more: &[&str]) -> Vec<String> {
    let mut args = base;
    args.extend(more.iter().map(|s| s.to_string()));
    args
}

/// The cipher's name without `@openssh.com`.
fn short(cipher: &str) -> &str {
    cipher.split('@').next().unwrap_or(cipher)
}
