//! libssh2 and the bridge fed arbitrary server bytes after a valid banner.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| uring_ssh::fuzzing::server_bytes(data));
