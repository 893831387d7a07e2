//! ussh's host-list parsers (nodeset expressions, hosts files, `--shard`,
//! folding names back) on arbitrary text: errors are fine, panics and
//! unbounded memory are not.
#![no_main]

use ussh::hosts::{self, Limits};

/// Small bounds keep each input fast; the same code enforces the default
/// ones (ussh's unit tests check those).
const LIMITS: Limits = Limits {
    hosts: 500,
    bytes: 64 << 10,
};

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let _ = hosts::Target::parse(&text);
    let _ = hosts::Shard::parse(&text);
    // Scheduler variables are as untrusted as the value itself.
    let _ = hosts::Shard::from_spec(&text, |_| Some(text.to_string()));
    let _ = hosts::Shard::from_spec("auto", |_| Some(text.to_string()));
    if let Ok(targets) = hosts::expand_with(&text, LIMITS) {
        assert!(targets.len() <= LIMITS.hosts);
        check_fold(&targets);
    }
    if let Ok(targets) = hosts::parse_hosts_file_with(&text, "fuzz", LIMITS) {
        assert!(targets.len() <= LIMITS.hosts);
        let bytes: usize = targets.iter().map(|t| t.host.len()).sum();
        assert!(bytes <= LIMITS.bytes);
        let targets = hosts::dedup(targets);
        if let Ok(s) = hosts::Shard::parse("2/3") {
            let _ = s.select(targets);
        }
    }
});

/// Folding the names back must not panic either.
fn check_fold(targets: &[hosts::Target]) {
    let names: Vec<String> = targets.iter().map(|t| t.host.clone()).collect();
    let _ = hosts::fold(&names);
}
