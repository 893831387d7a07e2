//! The SFTP reply codec on arbitrary bytes.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| uring_ssh::fuzzing::sftp_reply(data));
