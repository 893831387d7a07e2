//! Fixtures shared by the tests, benches and examples of uring-ssh and
//! ussh (a dev-dependency of both, never published).
//!
//! - [`sshd`] and [`dropbear`]: throwaway servers on 127.0.0.1.
//! - [`evil`]: a hostile SFTP server behind a real sshd.
//! - [`fault_proxy`]: a TCP proxy that stalls, cuts and corrupts.
//! - [`seccomp`]: a thread on which io_uring cannot be used.
//! - [`util`]: connected sessions, deterministic bytes, hashing, leak
//!   probes and bounded waits.
//! - [`drops`] and [`tools`]: what the benchmarks and the comparison
//!   harness share.

#![warn(missing_docs)]

pub mod dropbear;
pub mod drops;
pub mod evil;
pub mod fault_proxy;
pub mod seccomp;
pub mod sshd;
pub mod tools;
pub mod util;
