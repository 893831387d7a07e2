#![allow(dead_code)]
//! Shared helpers for the integration tests.

pub mod sshd;
pub mod util;
