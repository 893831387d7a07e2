//! libssh2's known_hosts parser, as the session uses it, on arbitrary lines.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| uring_ssh::fuzzing::known_hosts(data));
