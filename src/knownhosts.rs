//! Host-key verification against an OpenSSH known_hosts file.

use std::ffi::CString;
use std::io::Write;
use std::path::{Path, PathBuf};

use crate::error::{Error, HostKeyError, InvalidInput};
use crate::ffi;

/// What to do with a server whose key is not in known_hosts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum HostKeyPolicy {
    /// Unknown and changed keys are errors (the default).
    #[default]
    Strict,
    /// Unknown keys are accepted and appended to the file; changed keys are
    /// still errors (OpenSSH's `StrictHostKeyChecking accept-new`).
    AcceptNew,
    /// No verification at all. Only for throwaway test servers: it lets
    /// anyone in the middle read and change the session.
    InsecureAcceptAny,
}

/// The key a server presented during the handshake.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostKey {
    /// The raw public-key blob.
    pub blob: Vec<u8>,
    /// Its type name: `ssh-ed25519`, `ssh-rsa`, `ecdsa-sha2-nistp256`, …
    pub key_type: &'static str,
    /// `SHA256:` followed by the unpadded base64 SHA-256 of the blob, as
    /// `ssh-keygen -l` prints it.
    pub fingerprint: String,
}

/// The default known_hosts file: `$HOME/.ssh/known_hosts`.
pub fn default_known_hosts() -> Option<PathBuf> {
    std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".ssh/known_hosts"))
}

/// Reads the host key of a session whose handshake finished.
pub(crate) fn session_host_key(raw: *mut ffi::LIBSSH2_SESSION) -> Option<HostKey> {
    let mut len = 0usize;
    let mut kind = 0i32;
    // SAFETY: `raw` is a live session; libssh2 returns a pointer into the
    // session valid until the next key exchange, copied at once.
    let (blob, hash) = unsafe {
        let p = ffi::libssh2_session_hostkey(raw, &mut len, &mut kind);
        if p.is_null() {
            return None;
        }
        let blob = std::slice::from_raw_parts(p as *const u8, len).to_vec();
        let h = ffi::libssh2_hostkey_hash(raw, ffi::LIBSSH2_HOSTKEY_HASH_SHA256);
        let hash = if h.is_null() {
            None
        } else {
            Some(std::slice::from_raw_parts(h as *const u8, 32).to_vec())
        };
        (blob, hash)
    };
    let key_type = match kind {
        ffi::LIBSSH2_HOSTKEY_TYPE_RSA => "ssh-rsa",
        ffi::LIBSSH2_HOSTKEY_TYPE_DSS => "ssh-dss",
        ffi::LIBSSH2_HOSTKEY_TYPE_ECDSA_256 => "ecdsa-sha2-nistp256",
        ffi::LIBSSH2_HOSTKEY_TYPE_ECDSA_384 => "ecdsa-sha2-nistp384",
        ffi::LIBSSH2_HOSTKEY_TYPE_ECDSA_521 => "ecdsa-sha2-nistp521",
        ffi::LIBSSH2_HOSTKEY_TYPE_ED25519 => "ssh-ed25519",
        _ => "unknown",
    };
    let fingerprint = format!("SHA256:{}", base64(&hash.unwrap_or_default()));
    Some(HostKey {
        blob,
        key_type,
        fingerprint,
    })
}

fn knownhost_key_bits(key_type: &str) -> i32 {
    match key_type {
        "ssh-rsa" => ffi::LIBSSH2_KNOWNHOST_KEY_SSHRSA,
        "ssh-dss" => ffi::LIBSSH2_KNOWNHOST_KEY_SSHDSS,
        "ecdsa-sha2-nistp256" => ffi::LIBSSH2_KNOWNHOST_KEY_ECDSA_256,
        "ecdsa-sha2-nistp384" => ffi::LIBSSH2_KNOWNHOST_KEY_ECDSA_384,
        "ecdsa-sha2-nistp521" => ffi::LIBSSH2_KNOWNHOST_KEY_ECDSA_521,
        "ssh-ed25519" => ffi::LIBSSH2_KNOWNHOST_KEY_ED25519,
        _ => ffi::LIBSSH2_KNOWNHOST_KEY_UNKNOWN,
    }
}

/// `host` for port 22, `[host]:port` otherwise, as known_hosts spells it.
pub(crate) fn host_entry_name(host: &str, port: u16) -> String {
    if port == 22 {
        host.to_owned()
    } else {
        format!("[{host}]:{port}")
    }
}

/// Checks `key` for `host:port` against `path` under `policy`.
pub(crate) fn verify(
    raw: *mut ffi::LIBSSH2_SESSION,
    host: &str,
    port: u16,
    key: &HostKey,
    path: Option<&Path>,
    policy: HostKeyPolicy,
) -> Result<(), Error> {
    if policy == HostKeyPolicy::InsecureAcceptAny {
        return Ok(());
    }
    let name = host_entry_name(host, port);
    let file_err = |path: &Path, reason: String| {
        Error::HostKey(HostKeyError::File {
            path: path.display().to_string(),
            reason,
        })
    };
    let unknown = || {
        Error::HostKey(HostKeyError::Unknown {
            host: name.clone(),
            key_type: key.key_type.to_owned(),
            fingerprint: key.fingerprint.clone(),
        })
    };
    let Some(path) = path else {
        return Err(unknown());
    };
    let c_host = CString::new(host).map_err(|_| Error::InvalidInput(InvalidInput::nul("host")))?;
    let c_path = CString::new(path.as_os_str().as_encoded_bytes())
        .map_err(|_| Error::InvalidInput(InvalidInput::nul("known_hosts path")))?;
    let exists = path.exists();
    // SAFETY: `raw` is a live session; the collection is freed below on
    // every path; the strings outlive the calls that read them.
    let check = unsafe {
        let kh = ffi::libssh2_knownhost_init(raw);
        if kh.is_null() {
            return Err(Error::Ssh {
                code: ffi::LIBSSH2_ERROR_ALLOC,
                message: "knownhost_init failed".into(),
            });
        }
        if exists {
            let rc = ffi::libssh2_knownhost_readfile(
                kh,
                c_path.as_ptr(),
                ffi::LIBSSH2_KNOWNHOST_FILE_OPENSSH,
            );
            if rc < 0 {
                ffi::libssh2_knownhost_free(kh);
                return Err(file_err(
                    path,
                    format!("cannot be parsed (libssh2 error {rc})"),
                ));
            }
        }
        let mut entry = std::ptr::null_mut();
        let check = ffi::libssh2_knownhost_checkp(
            kh,
            c_host.as_ptr(),
            port as i32,
            key.blob.as_ptr() as *const _,
            key.blob.len(),
            // With the key type given, an entry of another type for this
            // host is "not found" (a new key type), not a changed key.
            ffi::LIBSSH2_KNOWNHOST_TYPE_PLAIN
                | ffi::LIBSSH2_KNOWNHOST_KEYENC_RAW
                | knownhost_key_bits(key.key_type),
            &mut entry,
        );
        ffi::libssh2_knownhost_free(kh);
        check
    };
    match check {
        ffi::LIBSSH2_KNOWNHOST_CHECK_MATCH => Ok(()),
        ffi::LIBSSH2_KNOWNHOST_CHECK_MISMATCH => Err(Error::HostKey(HostKeyError::Changed {
            host: name,
            key_type: key.key_type.to_owned(),
            fingerprint: key.fingerprint.clone(),
        })),
        ffi::LIBSSH2_KNOWNHOST_CHECK_NOTFOUND => match policy {
            HostKeyPolicy::AcceptNew => append(path, &name, key)
                .map_err(|e| file_err(path, format!("cannot add the new key: {e}"))),
            _ => Err(unknown()),
        },
        other => Err(file_err(
            path,
            format!("check failed (libssh2 result {other})"),
        )),
    }
}

/// Key types known_hosts can hold, each with the host-key algorithms that
/// use it (in the preference order OpenSSH's client uses for RSA).
const KEY_TYPE_ALGORITHMS: [(&str, &[&str]); 5] = [
    ("ssh-ed25519", &["ssh-ed25519"]),
    ("ecdsa-sha2-nistp256", &["ecdsa-sha2-nistp256"]),
    ("ecdsa-sha2-nistp384", &["ecdsa-sha2-nistp384"]),
    ("ecdsa-sha2-nistp521", &["ecdsa-sha2-nistp521"]),
    ("ssh-rsa", &["rsa-sha2-512", "rsa-sha2-256", "ssh-rsa"]),
];

/// The host-key algorithms to offer `host:port`: those whose key type
/// known_hosts already holds for it first, then the rest of `supported`,
/// as OpenSSH's client orders them, so that a host known by its RSA key
/// only is not asked for an Ed25519 key we would then refuse. `None` when
/// the file holds no key for the host (the default order stands).
pub(crate) fn preferred_host_key_algorithms(
    raw: *mut ffi::LIBSSH2_SESSION,
    host: &str,
    port: u16,
    path: &Path,
    supported: &[String],
) -> Option<String> {
    if !path.exists() {
        return None;
    }
    let c_host = CString::new(host).ok()?;
    let c_path = CString::new(path.as_os_str().as_encoded_bytes()).ok()?;
    let mut known: Vec<&str> = Vec::new();
    // SAFETY: `raw` is a live session; the collection is freed below on
    // every path; the strings and the probe key outlive the calls.
    unsafe {
        let kh = ffi::libssh2_knownhost_init(raw);
        if kh.is_null() {
            return None;
        }
        if ffi::libssh2_knownhost_readfile(kh, c_path.as_ptr(), ffi::LIBSSH2_KNOWNHOST_FILE_OPENSSH)
            >= 0
        {
            // libssh2's own matching (plain, hashed and bracketed names)
            // answers "an entry of this type exists" as a mismatch for a
            // key that cannot be in the file.
            let probe = b"\0uring-ssh-probe";
            for (key_type, algorithms) in KEY_TYPE_ALGORITHMS {
                let mut entry = std::ptr::null_mut();
                let check = ffi::libssh2_knownhost_checkp(
                    kh,
                    c_host.as_ptr(),
                    port as i32,
                    probe.as_ptr() as *const _,
                    probe.len(),
                    ffi::LIBSSH2_KNOWNHOST_TYPE_PLAIN
                        | ffi::LIBSSH2_KNOWNHOST_KEYENC_RAW
                        | knownhost_key_bits(key_type),
                    &mut entry,
                );
                if check == ffi::LIBSSH2_KNOWNHOST_CHECK_MISMATCH
                    || check == ffi::LIBSSH2_KNOWNHOST_CHECK_MATCH
                {
                    known.extend_from_slice(algorithms);
                }
            }
        }
        ffi::libssh2_knownhost_free(kh);
    }
    if known.is_empty() {
        return None;
    }
    let first = supported.iter().filter(|a| known.contains(&a.as_str()));
    let rest = supported.iter().filter(|a| !known.contains(&a.as_str()));
    Some(first.chain(rest).cloned().collect::<Vec<_>>().join(","))
}

/// Appends one `name type base64` line, creating the file (and its
/// directory) if needed, readable by its owner only, as OpenSSH does. The
/// rest of the file is left as it is; the line goes out in one write on an
/// `O_APPEND` descriptor, so that sessions adding keys at once (threads or
/// processes) do not interleave their lines.
fn append(path: &Path, name: &str, key: &HostKey) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    if knownhost_key_bits(key.key_type) == ffi::LIBSSH2_KNOWNHOST_KEY_UNKNOWN {
        return Err(std::io::Error::other("unknown key type"));
    }
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .read(true)
        .mode(0o600)
        .open(path)?;
    // Never glue the entry onto a last line that lacks its newline.
    let len = f.metadata()?.len();
    let mut prefix = "";
    if len > 0 {
        use std::io::{Read, Seek, SeekFrom};
        let mut last = [0u8; 1];
        f.seek(SeekFrom::Start(len - 1))?;
        f.read_exact(&mut last)?;
        if last[0] != b'\n' {
            prefix = "\n";
        }
    }
    let line = format!(
        "{prefix}{name} {} {}\n",
        key.key_type,
        base64_padded(&key.blob)
    );
    f.write_all(line.as_bytes())
}

const B64: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

fn base64_padded(data: &[u8]) -> String {
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for chunk in data.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = ((b[0] as u32) << 16) | ((b[1] as u32) << 8) | b[2] as u32;
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(B64[((n >> (18 - 6 * i)) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// Unpadded base64, as SSH fingerprints are written.
fn base64(data: &[u8]) -> String {
    base64_padded(data).trim_end_matches('=').to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_matches_rfc4648_vectors() {
        assert_eq!(base64_padded(b""), "");
        assert_eq!(base64_padded(b"f"), "Zg==");
        assert_eq!(base64_padded(b"fo"), "Zm8=");
        assert_eq!(base64_padded(b"foo"), "Zm9v");
        assert_eq!(base64_padded(b"foobar"), "Zm9vYmFy");
        assert_eq!(base64(b"fo"), "Zm8");
    }

    #[test]
    fn entry_names_follow_openssh() {
        assert_eq!(host_entry_name("example", 22), "example");
        assert_eq!(host_entry_name("127.0.0.1", 2222), "[127.0.0.1]:2222");
    }
}
