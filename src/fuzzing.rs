//! Entry points for the cargo-fuzz targets in `fuzz/`; compiled only with
//! `--cfg fuzzing`, which cargo-fuzz sets.

use crate::sftp::codec;

/// Every SFTP reply decoder on `data`: framing, a reply packet, the
/// VERSION packet, and the extension replies. None may panic.
pub fn sftp_reply(data: &[u8]) {
    if let Ok(Some(len)) = codec::frame(data) {
        assert!(len <= data.len() && len >= 5);
        let _ = codec::decode_reply(&data[4..len]);
    }
    let _ = codec::decode_reply(data);
    let _ = codec::decode_version(data);
    let _ = codec::decode_statvfs(data);
    let _ = codec::decode_limits(data);
}

/// The bridge and libssh2 fed `data` as a server's bytes after a valid
/// banner, in pieces; see the fake peer.
pub fn server_bytes(data: &[u8]) {
    crate::transport::fake_peer::fuzz_server_bytes(data);
}

/// libssh2's known_hosts parser (what `Session` uses to check host keys)
/// on `data`, then a lookup.
pub fn known_hosts(data: &[u8]) {
    crate::transport::fake_peer::fuzz_known_hosts(data);
}

/// A tree download's rules and local writes on a fuzzed listing, in a
/// sandbox with planted links: nothing may be written outside its root or
/// through a link.
pub fn download_tree(data: &[u8]) {
    crate::sftp::transfer_fuzz_tree(data);
}
