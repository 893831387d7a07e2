//! ussh's OpenSSH client-config parser on arbitrary text, then a lookup
//! of a few host names: errors are fine, panics and unbounded memory are
//! not.
#![no_main]

use ussh::sshconfig::{SshConfig, wildmatch};

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    if let Ok(c) = SshConfig::parse(&text, "fuzz") {
        for alias in ["web01", "db1", "", "a.example.org", "*"] {
            let _ = c.resolve(alias);
        }
        // The first line's words as host names too.
        for w in text.split_whitespace().take(4) {
            let _ = c.resolve(w);
        }
    }
    // Glob matching on both halves of the input.
    let mid = (text.len() / 2..=text.len())
        .find(|&i| text.is_char_boundary(i))
        .expect("the end is a boundary");
    let (p, t) = text.split_at(mid);
    let _ = wildmatch(p, t);
});
