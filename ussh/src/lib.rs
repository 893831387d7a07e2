//! The pieces of the `ussh` fleet tool that are plain parsing: host lists
//! (nodeset ranges, hosts files, shards) and the honoured subset of the
//! OpenSSH client configuration. The binary (`src/main.rs`) runs sessions
//! of the `uring-ssh` library over them, many hosts on each thread.
#![warn(missing_docs, missing_debug_implementations)]

pub mod hosts;
pub mod sshconfig;
