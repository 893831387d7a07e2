//! A tree download's name checks, limits, link policy and confined local
//! writes on fuzzed listings: nothing outside the root, no link followed.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| uring_ssh::fuzzing::download_tree(data));
