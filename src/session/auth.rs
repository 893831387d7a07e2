//! Authentication: the methods the server offers, public keys (files,
//! memory), passwords and keyboard-interactive, one attempt at a time.

use std::os::raw::{c_char, c_int, c_uint};
use std::path::Path;

use super::call::{Abandon, code};
use super::{Session, SessionInner};
use crate::error::{Error, Result};
use crate::ffi;
use crate::text::{SecretCString, cstring, path_cstring};
use crate::transport::callbacks::{self, KbdResponder};
use zeroize::Zeroize;

impl Session {
    /// The authentication methods the server offers `user`, or an empty list
    /// if `none` authentication succeeded.
    pub async fn auth_methods(&self, user: &str) -> Result<Vec<String>> {
        let c_user = cstring("user name", user)?;
        let inner = &self.inner;
        inner
            .auth("auth methods", |s| {
                // SAFETY: live session; `c_user` outlives the call.
                let p =
                    unsafe { ffi::libssh2_userauth_list(s, c_user.as_ptr(), user.len() as c_uint) };
                if p.is_null() {
                    // SAFETY: live session.
                    if unsafe { ffi::libssh2_userauth_authenticated(s) } != 0 {
                        return Ok(Vec::new());
                    }
                    // SAFETY: live session.
                    return Err(unsafe { ffi::libssh2_session_last_errno(s) });
                }
                // SAFETY: libssh2 returned a NUL-terminated string it owns.
                let list = unsafe { std::ffi::CStr::from_ptr(p) }.to_string_lossy();
                Ok(list.split(',').map(str::to_owned).collect())
            })
            .await
    }

    /// Whether authentication has succeeded.
    pub fn authenticated(&self) -> bool {
        self.inner
            .raw()
            // SAFETY: live session.
            .map(|s| unsafe { ffi::libssh2_userauth_authenticated(s) } != 0)
            .unwrap_or(false)
    }

    /// Authenticates with a private key file (OpenSSH or PEM format); the
    /// public key is derived from it. `passphrase` decrypts an encrypted key.
    ///
    /// The copy of `passphrase` made for libssh2 is wiped when the call
    /// returns; no error holds it.
    pub async fn auth_pubkey_file(
        &self,
        user: &str,
        private_key: &Path,
        passphrase: Option<&str>,
    ) -> Result<()> {
        let c_user = cstring("user name", user)?;
        let c_key = path_cstring("private key", private_key)?;
        let c_pass = passphrase
            .map(|p| SecretCString::new("passphrase", p))
            .transpose()?;
        self.inner
            .auth("public-key authentication", |s| {
                // SAFETY: live session; every string (`c_pass` included,
                // wiped only when dropped after the call) outlives the call.
                code(unsafe {
                    ffi::libssh2_userauth_publickey_fromfile_ex(
                        s,
                        c_user.as_ptr(),
                        user.len() as c_uint,
                        std::ptr::null(),
                        c_key.as_ptr(),
                        c_pass.as_ref().map_or(std::ptr::null(), |p| p.as_ptr()),
                    )
                })
            })
            .await
            .map_err(|e| {
                let which = private_key.display().to_string();
                let encrypted = passphrase.is_none()
                    && std::fs::read(private_key).is_ok_and(|mut k| {
                        let encrypted = key_is_encrypted(&k);
                        k.zeroize();
                        encrypted
                    });
                key_error(e, &which, encrypted)
            })
    }

    /// Authenticates with a private key held in memory (PEM or OpenSSH text).
    ///
    /// `private_key` is handed to libssh2 as it is (no copy is made here);
    /// the copy of `passphrase` made for libssh2 is wiped when the call
    /// returns. No error holds either.
    pub async fn auth_pubkey_memory(
        &self,
        user: &str,
        private_key: &str,
        passphrase: Option<&str>,
    ) -> Result<()> {
        let c_pass = passphrase
            .map(|p| SecretCString::new("passphrase", p))
            .transpose()?;
        self.inner
            .auth("public-key authentication", |s| {
                // SAFETY: live session; the buffers (`c_pass` included,
                // wiped only when dropped after the call) outlive the call.
                code(unsafe {
                    ffi::libssh2_userauth_publickey_frommemory(
                        s,
                        user.as_ptr() as *const c_char,
                        user.len(),
                        std::ptr::null(),
                        0,
                        private_key.as_ptr() as *const c_char,
                        private_key.len(),
                        c_pass.as_ref().map_or(std::ptr::null(), |p| p.as_ptr()),
                    )
                })
            })
            .await
            .map_err(|e| {
                let encrypted = passphrase.is_none() && key_is_encrypted(private_key.as_bytes());
                key_error(e, "the key in memory", encrypted)
            })
    }

    /// Authenticates with a password.
    ///
    /// `password` is handed to libssh2 by pointer and length (no copy is
    /// made here); no error holds it.
    pub async fn auth_password(&self, user: &str, password: &str) -> Result<()> {
        self.inner
            .auth("password authentication", |s| {
                // SAFETY: live session; the buffers outlive the call.
                code(unsafe {
                    ffi::libssh2_userauth_password_ex(
                        s,
                        user.as_ptr() as *const c_char,
                        user.len() as c_uint,
                        password.as_ptr() as *const c_char,
                        password.len() as c_uint,
                        None,
                    )
                })
            })
            .await
    }

    /// Keyboard-interactive authentication: `respond(name, instruction,
    /// prompts)` returns one answer per prompt (a prompt is its text and
    /// whether the answer may be echoed). No error holds an answer.
    pub async fn auth_keyboard_interactive<F>(&self, user: &str, mut respond: F) -> Result<()>
    where
        F: FnMut(&str, &str, &[(String, bool)]) -> Vec<String>,
    {
        let shared = &self.inner.transport.context;
        let responder: &mut KbdResponder<'_> = &mut respond;
        // SAFETY: only the lifetime is erased; the pointer is cleared below
        // before `respond` goes out of scope, on every path (guard).
        let ptr: *mut KbdResponder<'static> = unsafe { std::mem::transmute(responder) };
        self.inner
            .auth("keyboard-interactive authentication", |s| {
                *shared.kbd.borrow_mut() = Some(ptr);
                // SAFETY: live session; the callback reads `shared.kbd`.
                let rc = unsafe {
                    ffi::libssh2_userauth_keyboard_interactive_ex(
                        s,
                        user.as_ptr() as *const c_char,
                        user.len() as c_uint,
                        Some(callbacks::kbd_cb),
                    )
                };
                *shared.kbd.borrow_mut() = None;
                code(rc)
            })
            .await
    }
}

impl SessionInner {
    /// An authentication call: one at a time per session, under the timeout.
    pub(crate) async fn auth<T>(
        &self,
        operation: &'static str,
        f: impl FnMut(*mut ffi::LIBSSH2_SESSION) -> std::result::Result<T, c_int>,
    ) -> Result<T> {
        self.with_timeout(operation, async {
            let _lock = self.auth_lock.lock().await;
            if self.auth_abandoned.get() {
                return Err(Error::Poisoned("session authentication"));
            }
            let guard = Abandon::new(&self.auth_abandoned);
            let r = self.call(f).await;
            guard.done();
            r
        })
        .await
    }
}

/// libssh2 reports an undecryptable key as a file error: say what it means.
fn key_error(e: Error, which: &str, encrypted: bool) -> Error {
    match e {
        Error::Ssh { code, .. } if code == ffi::LIBSSH2_ERROR_FILE && encrypted => {
            Error::KeyEncrypted {
                key: which.to_string(),
            }
        }
        Error::Ssh { code, message } if code == ffi::LIBSSH2_ERROR_FILE => Error::Ssh {
            code,
            message: format!(
                "cannot use private key {which}: wrong passphrase or unsupported format ({message})"
            ),
        },
        e => e,
    }
}

/// Whether a private key (OpenSSH or PEM text) is protected by a
/// passphrase: PEM's `ENCRYPTED` markers, or an OpenSSH key whose cipher
/// is not `none`.
fn key_is_encrypted(key: &[u8]) -> bool {
    // Searched in place, and only the key's first 64 base64 characters
    // decoded (magic, cipher and KDF names): no copy of key material is made.
    let find = |needle: &[u8]| key.windows(needle.len()).position(|w| w == needle);
    if find(b"-----BEGIN ENCRYPTED PRIVATE KEY-----").is_some()
        || find(b"Proc-Type: 4,ENCRYPTED").is_some()
    {
        return true;
    }
    let begin = b"-----BEGIN OPENSSH PRIVATE KEY-----";
    let Some(at) = find(begin) else {
        return false;
    };
    let head: String = key[at + begin.len()..]
        .iter()
        .take_while(|&&b| b != b'-')
        .filter(|b| !b.is_ascii_whitespace())
        .take(64)
        .map(|&b| b as char)
        .collect();
    let Some(raw) = base64_decode(&head) else {
        return false;
    };
    // "openssh-key-v1\0", then the cipher name as an SSH string.
    let magic = b"openssh-key-v1\0";
    let Some(rest) = raw.strip_prefix(magic.as_slice()) else {
        return false;
    };
    let Some(len) = rest.get(..4) else {
        return false;
    };
    let len = u32::from_be_bytes(len.try_into().expect("4 bytes")) as usize;
    rest.get(4..4 + len).is_some_and(|cipher| cipher != b"none")
}

/// Standard base64 (padding optional); `None` on a character outside it.
fn base64_decode(s: &str) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(s.len() * 3 / 4);
    let (mut acc, mut bits) = (0u32, 0);
    for c in s.bytes().take_while(|&c| c != b'=') {
        let v = match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => return None,
        } as u32;
        acc = (acc << 6) | v;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
        }
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encrypted_keys_are_told_apart_from_plain_and_unreadable_ones() {
        let openssh = |body: &str| {
            format!(
                "-----BEGIN OPENSSH PRIVATE KEY-----\n{}\n-----END OPENSSH PRIVATE KEY-----\n",
                body.as_bytes()
                    .chunks(20)
                    .map(|c| std::str::from_utf8(c).unwrap())
                    .collect::<Vec<_>>()
                    .join("\n")
            )
        };
        let none = "b3BlbnNzaC1rZXktdjEAAAAABG5vbmUAAAAGYmNyeXB0";
        let aes = "b3BlbnNzaC1rZXktdjEAAAAACmFlczI1Ni1jdHIAAAAGYmNyeXB0";
        let chacha =
            "b3BlbnNzaC1rZXktdjEAAAAAHWNoYWNoYTIwLXBvbHkxMzA1QG9wZW5zc2guY29tAAAABmJjcnlwdA==";
        assert!(!key_is_encrypted(openssh(none).as_bytes()));
        assert!(key_is_encrypted(openssh(aes).as_bytes()));
        assert!(key_is_encrypted(openssh(chacha).as_bytes()));
        assert!(!key_is_encrypted(openssh("not*base64").as_bytes()));
        assert!(!key_is_encrypted(b"-----BEGIN OPENSSH PRIVATE KEY-----"));
        assert!(key_is_encrypted(
            b"-----BEGIN RSA PRIVATE KEY-----\nProc-Type: 4,ENCRYPTED\nDEK-Info: AES-128-CBC,00\n"
        ));
        assert!(key_is_encrypted(
            b"-----BEGIN ENCRYPTED PRIVATE KEY-----\nMIIB\n"
        ));
        assert!(!key_is_encrypted(b"-----BEGIN PRIVATE KEY-----\nMIIB\n"));
        assert!(!key_is_encrypted(b""));
    }
}
