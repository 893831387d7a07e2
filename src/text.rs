//! Strings across the FFI boundary: C strings for libssh2, secrets copied
//! for it and wiped after, and text from the server made safe to print.

use std::ffi::CString;
use std::os::raw::c_char;
use std::path::Path;

use zeroize::Zeroize;

use crate::error::{InvalidInput, Result};

/// `s` as a C string; `what` names it in the error for an inner NUL byte.
pub(crate) fn cstring(what: &str, s: &str) -> Result<CString> {
    CString::new(s).map_err(|_| InvalidInput::nul(what).into())
}

/// A secret (a password or a key passphrase) copied for libssh2 as a
/// NUL-terminated string, wiped when dropped. Its `Debug` shows nothing of it.
///
/// The buffer is allocated once at its final size and never grows, so no
/// copy of the secret is left behind by a reallocation.
pub(crate) struct SecretCString(Vec<u8>);

impl SecretCString {
    /// Copies `secret`; `what` names it in the error for an inner NUL byte
    /// (the error never holds the secret).
    pub(crate) fn new(what: &str, secret: &str) -> Result<Self> {
        if secret.as_bytes().contains(&0) {
            return Err(InvalidInput::nul(what).into());
        }
        let mut buf = Vec::with_capacity(secret.len() + 1);
        buf.extend_from_slice(secret.as_bytes());
        buf.push(0);
        Ok(SecretCString(buf))
    }

    /// The NUL-terminated copy, valid while `self` lives.
    pub(crate) fn as_ptr(&self) -> *const c_char {
        self.0.as_ptr() as *const c_char
    }

    /// Overwrites the copy with zeros, in place (the buffer keeps its
    /// length, so it stays an empty NUL-terminated string).
    fn wipe(&mut self) {
        self.0.as_mut_slice().zeroize();
    }
}

impl Drop for SecretCString {
    fn drop(&mut self) {
        self.wipe();
    }
}

impl std::fmt::Debug for SecretCString {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SecretCString(<redacted>)")
    }
}

/// A path that must exist, as a C string; `what` names it in errors.
pub(crate) fn path_cstring(what: &str, p: &Path) -> Result<CString> {
    if !p.exists() {
        return Err(InvalidInput::NotFound {
            what: what.into(),
            path: p.to_owned(),
        }
        .into());
    }
    CString::new(p.as_os_str().as_encoded_bytes())
        .map_err(|_| InvalidInput::nul(format!("{what} path")).into())
}

/// Bytes of peer-supplied text kept in an error message.
pub(crate) const REMOTE_TEXT_MAX: usize = 1024;

/// Text that may come from the server (libssh2's error text, an SFTP status
/// message, the remote scp's error line, a signal name), made safe to print:
/// at most [`REMOTE_TEXT_MAX`] bytes of it are kept (then `… (N bytes)`),
/// invalid UTF-8 becomes U+FFFD, and control and bidirectional-formatting
/// characters are escaped (`\x1b`, `\u{202e}`), so the text cannot move a
/// terminal's cursor, recolour it, or reorder what is printed around it.
pub(crate) fn remote_text(bytes: &[u8]) -> String {
    let kept = &bytes[..bytes.len().min(REMOTE_TEXT_MAX)];
    let mut out = String::with_capacity(kept.len());
    for c in String::from_utf8_lossy(kept).chars() {
        let bidi = matches!(c, '\u{200e}' | '\u{200f}' | '\u{061c}')
            || ('\u{202a}'..='\u{202e}').contains(&c)
            || ('\u{2066}'..='\u{2069}').contains(&c);
        if c.is_control() || bidi {
            use std::fmt::Write;
            if (c as u32) < 0x80 {
                let _ = write!(out, "\\x{:02x}", c as u32);
            } else {
                let _ = write!(out, "\\u{{{:x}}}", c as u32);
            }
        } else {
            out.push(c);
        }
    }
    if bytes.len() > kept.len() {
        use std::fmt::Write;
        let _ = write!(out, "… ({} bytes)", bytes.len());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &str = "correct horse battery staple";

    #[test]
    fn secret_copy_is_nul_terminated_and_wiped_in_place() {
        let mut s = SecretCString::new("password", SECRET).unwrap();
        let mut want = SECRET.as_bytes().to_vec();
        want.push(0);
        assert_eq!(s.0, want);
        // SAFETY: `s` is alive and holds a NUL-terminated copy made by `new`.
        let seen = unsafe { std::ffi::CStr::from_ptr(s.as_ptr()) };
        assert_eq!(seen.to_bytes(), SECRET.as_bytes());
        // What `drop` runs; the buffer is still allocated, so it can be read.
        s.wipe();
        assert_eq!(s.0.len(), SECRET.len() + 1, "wiped in place, not shrunk");
        assert!(s.0.iter().all(|&b| b == 0), "not wiped: {:?}", s.0);
    }

    #[test]
    fn secret_copy_refuses_a_nul_without_echoing_the_secret() {
        let bad = format!("{SECRET}\0tail");
        let e = SecretCString::new("passphrase", &bad).unwrap_err();
        for text in [e.to_string(), format!("{e:?}")] {
            assert!(text.contains("passphrase"), "{text}");
            assert!(!text.contains(SECRET), "the secret leaked: {text}");
            assert!(!text.contains("tail"), "the secret leaked: {text}");
        }
    }

    #[test]
    fn secret_copy_debug_shows_nothing_of_it() {
        let s = SecretCString::new("password", SECRET).unwrap();
        for text in [format!("{s:?}"), format!("{s:#?}")] {
            assert!(!text.contains(SECRET), "{text}");
            assert!(text.contains("redacted"), "{text}");
        }
    }

    #[test]
    fn remote_text_escapes_controls_and_caps_length() {
        assert_eq!(remote_text(b"No such file"), "No such file");
        assert_eq!(remote_text("é ü".as_bytes()), "é ü");
        assert_eq!(
            remote_text(b"\x1b[2J\x1b]0;pwned\x07a\tb\r\n"),
            "\\x1b[2J\\x1b]0;pwned\\x07a\\x09b\\x0d\\x0a"
        );
        assert_eq!(
            remote_text("x\u{202e}y\u{85}z".as_bytes()),
            "x\\u{202e}y\\u{85}z"
        );
        assert_eq!(remote_text(b"a\xffb"), "a\u{fffd}b");
        let long = vec![b'A'; 100_000];
        let t = remote_text(&long);
        assert!(t.starts_with(&"A".repeat(REMOTE_TEXT_MAX)), "{}", &t[..20]);
        assert!(t.ends_with("… (100000 bytes)"), "{}", &t[t.len() - 30..]);
        assert_eq!(t.len(), REMOTE_TEXT_MAX + "… (100000 bytes)".len());
        // Escapes at most quadruple the kept bytes: the bound holds.
        assert!(remote_text(&[0x1b; 100_000]).len() <= 4 * REMOTE_TEXT_MAX + 32);
    }
}
