//! The algorithm classes a session negotiates, what this build supports of
//! each, and why a negotiation found nothing in common.

use std::os::raw::{c_char, c_int};
use std::sync::OnceLock;

use crate::error::{Error, InvalidInput, Result};
use crate::ffi;
use crate::transport::kexinit::Offer;

/// A class of algorithms whose preference order can be set.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum MethodType {
    /// Key exchange.
    Kex,
    /// Host-key algorithms.
    HostKey,
    /// Ciphers, client to server.
    CipherClientToServer,
    /// Ciphers, server to client.
    CipherServerToClient,
    /// MACs, client to server.
    MacClientToServer,
    /// MACs, server to client.
    MacServerToClient,
    /// Compression, client to server.
    CompressionClientToServer,
    /// Compression, server to client.
    CompressionServerToClient,
}

impl MethodType {
    pub(crate) fn raw(self) -> c_int {
        match self {
            MethodType::Kex => ffi::LIBSSH2_METHOD_KEX,
            MethodType::HostKey => ffi::LIBSSH2_METHOD_HOSTKEY,
            MethodType::CipherClientToServer => ffi::LIBSSH2_METHOD_CRYPT_CS,
            MethodType::CipherServerToClient => ffi::LIBSSH2_METHOD_CRYPT_SC,
            MethodType::MacClientToServer => ffi::LIBSSH2_METHOD_MAC_CS,
            MethodType::MacServerToClient => ffi::LIBSSH2_METHOD_MAC_SC,
            MethodType::CompressionClientToServer => ffi::LIBSSH2_METHOD_COMP_CS,
            MethodType::CompressionServerToClient => ffi::LIBSSH2_METHOD_COMP_SC,
        }
    }
}

impl std::fmt::Display for MethodType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            MethodType::Kex => "key exchange",
            MethodType::HostKey => "host key",
            MethodType::CipherClientToServer => "cipher (client to server)",
            MethodType::CipherServerToClient => "cipher (server to client)",
            MethodType::MacClientToServer => "MAC (client to server)",
            MethodType::MacServerToClient => "MAC (server to client)",
            MethodType::CompressionClientToServer => "compression (client to server)",
            MethodType::CompressionServerToClient => "compression (server to client)",
        })
    }
}

/// What a session negotiated, every class at once ([`crate::Session::algorithms`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Negotiated {
    /// Key exchange (`mlkem768x25519-sha256`, …).
    pub kex: String,
    /// Host-key algorithm (`ssh-ed25519`, `rsa-sha2-512`, …).
    pub host_key: String,
    /// Cipher, client to server.
    pub cipher_client_to_server: String,
    /// Cipher, server to client.
    pub cipher_server_to_client: String,
    /// MAC, client to server (the cipher's own for AEAD ciphers).
    pub mac_client_to_server: String,
    /// MAC, server to client.
    pub mac_server_to_client: String,
}

impl Negotiated {
    /// Whether the key exchange resists a recording broken later by a
    /// quantum computer: the ML-KEM and NTRU Prime hybrids.
    pub fn post_quantum(&self) -> bool {
        is_post_quantum(&self.kex)
    }
}

/// Whether the key exchange `kex` is one of the post-quantum hybrids
/// (ML-KEM or NTRU Prime with X25519 or an ECDH curve).
pub fn is_post_quantum(kex: &str) -> bool {
    kex.starts_with("mlkem") || kex.starts_with("sntrup")
}

/// The algorithms of `kind` this build can negotiate, in its default order
/// of preference (for [`MethodType::Kex`], without the pseudo-methods
/// `ext-info-c` and `kex-strict-c-v00@openssh.com`, which it always sends).
pub fn supported_methods(kind: MethodType) -> &'static [String] {
    static LISTS: [OnceLock<Vec<String>>; 8] = [const { OnceLock::new() }; 8];
    let index = kind as usize;
    LISTS[index].get_or_init(|| {
        ffi::init();
        crate::mlkem::register();
        #[cfg(feature = "aws-lc")]
        crate::aes_gcm::register();
        let mut names = Vec::new();
        // SAFETY: a session with libssh2's default allocator that does no
        // IO, freed below; each name list is freed with libssh2_free as
        // libssh2_session_supported_algs requires, after the names are
        // copied.
        unsafe {
            let raw = ffi::libssh2_session_init_ex(None, None, None, std::ptr::null_mut());
            if raw.is_null() {
                return names;
            }
            let mut list: *mut *const c_char = std::ptr::null_mut();
            let n = ffi::libssh2_session_supported_algs(raw, kind.raw(), &mut list);
            if n > 0 && !list.is_null() {
                for i in 0..n as usize {
                    let p = *list.add(i);
                    if !p.is_null() {
                        names.push(std::ffi::CStr::from_ptr(p).to_string_lossy().into_owned());
                    }
                }
                ffi::libssh2_free(raw, list as *mut libc::c_void);
            }
            ffi::libssh2_session_free(raw);
        }
        names.retain(|n| !is_pseudo(n));
        names
    })
}

/// Refuses a preference list that is empty or names an algorithm this
/// build cannot negotiate (libssh2 would drop it silently).
pub(crate) fn check_methods(kind: MethodType, prefs: &str) -> Result<()> {
    let known = supported_methods(kind);
    if prefs.split(',').all(|n| n.trim().is_empty()) {
        return Err(InvalidInput::Algorithm {
            kind,
            unsupported: None,
            supported: known.to_vec(),
        }
        .into());
    }
    if let Some(unknown) = prefs
        .split(',')
        .map(str::trim)
        .find(|n| !known.iter().any(|k| k == n))
    {
        return Err(InvalidInput::Algorithm {
            kind,
            unsupported: Some(unknown.to_string()),
            supported: known.to_vec(),
        }
        .into());
    }
    Ok(())
}

/// Names in a KEXINIT's key exchange list that signal an extension rather
/// than name an algorithm (RFC 8308's ext-info, OpenSSH's strict kex).
fn is_pseudo(name: &str) -> bool {
    matches!(
        name,
        "ext-info-c"
            | "ext-info-s"
            | "kex-strict-c-v00@openssh.com"
            | "kex-strict-s-v00@openssh.com"
    )
}

/// The classes in KEXINIT order: the index of each is its name-list's.
const KEXINIT_ORDER: [MethodType; 8] = [
    MethodType::Kex,
    MethodType::HostKey,
    MethodType::CipherClientToServer,
    MethodType::CipherServerToClient,
    MethodType::MacClientToServer,
    MethodType::MacServerToClient,
    MethodType::CompressionClientToServer,
    MethodType::CompressionServerToClient,
];

/// The first class in which the two offers share nothing, as the error
/// that says so. A MAC list is not needed, so not checked, when the first
/// shared cipher of its direction is an AEAD cipher.
pub(crate) fn no_common_algorithm(ours: &Offer, theirs: &Offer) -> Option<Error> {
    let first_common = |i: usize| {
        ours.lists[i]
            .iter()
            .find(|name| theirs.lists[i].contains(name))
            .cloned()
    };
    for (i, kind) in KEXINIT_ORDER.into_iter().enumerate() {
        if i == 4 || i == 5 {
            let cipher = first_common(i - 2).unwrap_or_default();
            if cipher.contains("gcm") || cipher.starts_with("chacha20-poly1305") {
                continue;
            }
        }
        if first_common(i).is_none() {
            let real = |list: &[String]| -> Vec<String> {
                list.iter().filter(|n| !is_pseudo(n)).cloned().collect()
            };
            return Some(Error::NoCommonAlgorithm {
                kind,
                ours: real(&ours.lists[i]),
                theirs: real(&theirs.lists[i]),
            });
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn offer(lists: [&str; 8]) -> Offer {
        Offer {
            lists: lists.map(|l| {
                l.split(',')
                    .filter(|n| !n.is_empty())
                    .map(String::from)
                    .collect()
            }),
        }
    }

    const OURS: [&str; 8] = [
        "mlkem768x25519-sha256,curve25519-sha256,ext-info-c",
        "ssh-ed25519,rsa-sha2-256",
        "aes128-gcm@openssh.com,aes128-ctr",
        "aes128-gcm@openssh.com,aes128-ctr",
        "hmac-sha2-256",
        "hmac-sha2-256",
        "none",
        "none",
    ];

    #[test]
    fn the_post_quantum_kex_is_offered_first_and_unknown_names_are_refused() {
        let kex = supported_methods(MethodType::Kex);
        assert_eq!(
            kex.first().map(String::as_str),
            Some("mlkem768x25519-sha256"),
            "{kex:?}"
        );
        assert!(kex.iter().any(|k| k == "curve25519-sha256"), "{kex:?}");
        assert!(
            !kex.iter().any(|k| k == "ext-info-c"),
            "pseudo-methods are not listed"
        );
        assert!(check_methods(MethodType::Kex, "mlkem768x25519-sha256,curve25519-sha256").is_ok());
        match check_methods(
            MethodType::Kex,
            "curve25519-sha256,sntrup761x25519-sha512@openssh.com",
        ) {
            Err(Error::InvalidInput(
                e @ InvalidInput::Algorithm {
                    kind: MethodType::Kex,
                    unsupported: Some(_),
                    ..
                },
            )) => {
                let m = e.to_string();
                assert!(
                    m.contains("key exchange algorithm \"sntrup761x25519-sha512@openssh.com\""),
                    "{m}"
                );
                assert!(
                    m.contains("mlkem768x25519-sha256"),
                    "lists what the build has: {m}"
                );
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            check_methods(MethodType::HostKey, " , "),
            Err(Error::InvalidInput(InvalidInput::Algorithm {
                unsupported: None,
                ..
            }))
        ));
        for kind in [
            MethodType::HostKey,
            MethodType::CipherClientToServer,
            MethodType::MacServerToClient,
        ] {
            assert!(!supported_methods(kind).is_empty(), "{kind}");
        }
    }

    #[test]
    fn names_the_first_class_without_a_common_algorithm() {
        let mut theirs = OURS;
        assert!(no_common_algorithm(&offer(OURS), &offer(theirs)).is_none());
        theirs[0] = "sntrup761x25519-sha512,mlkem1024nistp384-sha384,kex-strict-s-v00@openssh.com";
        match no_common_algorithm(&offer(OURS), &offer(theirs)) {
            Some(Error::NoCommonAlgorithm { kind, ours, theirs }) => {
                assert_eq!(kind, MethodType::Kex);
                assert_eq!(
                    ours,
                    ["mlkem768x25519-sha256", "curve25519-sha256"],
                    "pseudo-methods dropped"
                );
                assert_eq!(
                    theirs,
                    ["sntrup761x25519-sha512", "mlkem1024nistp384-sha384"]
                );
            }
            other => panic!("{other:?}"),
        }
        let mut theirs = OURS;
        theirs[3] = "aes256-cbc";
        let e = no_common_algorithm(&offer(OURS), &offer(theirs)).unwrap();
        assert!(matches!(
            e,
            Error::NoCommonAlgorithm {
                kind: MethodType::CipherServerToClient,
                ..
            }
        ));
        assert_eq!(
            e.to_string(),
            "no matching cipher (server to client) algorithm: we offered \
             aes128-gcm@openssh.com,aes128-ctr; the server offered aes256-cbc"
        );
    }

    #[test]
    fn macs_count_only_under_a_cipher_that_uses_one() {
        let mut theirs = OURS;
        theirs[4] = "hmac-sha1";
        theirs[5] = "hmac-sha1";
        // AES-GCM is shared first: no MAC is negotiated.
        assert!(no_common_algorithm(&offer(OURS), &offer(theirs)).is_none());
        theirs[2] = "aes128-ctr";
        let e = no_common_algorithm(&offer(OURS), &offer(theirs)).unwrap();
        assert!(matches!(
            e,
            Error::NoCommonAlgorithm {
                kind: MethodType::MacClientToServer,
                ..
            }
        ));
    }
}
