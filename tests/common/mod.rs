#![allow(dead_code)]
//! Shared helpers for the integration tests.

pub mod dropbear;
pub mod evil;
pub mod seccomp;
pub mod sshd;
pub mod util;
