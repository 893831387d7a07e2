//! The password of `--askpass` and `--sudo`: asked for once on the
//! terminal with echo off, or taken from an environment variable named by
//! `--askpass-env`, and held in a buffer wiped when it is dropped.

use std::ffi::CString;
use std::fmt;
use std::io::Read;
use std::os::raw::c_int;
use std::sync::atomic::{AtomicBool, Ordering};

use zeroize::Zeroize;

/// The longest password taken, in bytes: the buffer is allocated once at
/// this size, so that no reallocation leaves a copy behind.
const MAX_LEN: usize = 4096;

/// A password, wiped from memory when dropped; its `Debug` shows no byte of
/// it. Always valid UTF-8 (SSH sends passwords as UTF-8).
pub struct Password(Vec<u8>);

impl Password {
    /// Takes `bytes` (wiped here if they are refused). Refused: empty, over
    /// [`MAX_LEN`] bytes, not UTF-8, or holding a NUL or a newline (sudo
    /// reads its password up to a newline).
    fn new(mut bytes: Vec<u8>) -> Result<Password, String> {
        let why = if bytes.is_empty() {
            Some("it is empty")
        } else if bytes.len() > MAX_LEN {
            Some("it is longer than 4096 bytes")
        } else if std::str::from_utf8(&bytes).is_err() {
            Some("it is not UTF-8")
        } else if bytes.iter().any(|&b| b == 0 || b == b'\n' || b == b'\r') {
            Some("it holds a NUL byte or a line break")
        } else {
            None
        };
        match why {
            Some(why) => {
                bytes.zeroize();
                Err(format!("password refused: {why}"))
            }
            None => Ok(Password(bytes)),
        }
    }

    /// The password.
    pub fn as_str(&self) -> &str {
        // Checked in `new`; an empty string if it could somehow not be.
        std::str::from_utf8(&self.0).unwrap_or_default()
    }

    /// The password's bytes.
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }
}

impl Drop for Password {
    fn drop(&mut self) {
        // Zeroes the whole allocation, with writes the compiler keeps.
        self.0.zeroize();
    }
}

impl fmt::Debug for Password {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Password(<hidden>)")
    }
}

/// Takes the password from the environment variable `name`, then wipes the
/// variable's value in this process's environment and removes it, so that
/// no child (a `ProxyCommand`) inherits it.
///
/// # Safety
///
/// Changes the process environment: call it before any other thread is
/// started.
pub unsafe fn take_from_env(name: &str) -> Result<Password, String> {
    let Some(value) = std::env::var_os(name) else {
        return Err(format!(
            "--askpass-env {name}: no such variable in the environment"
        ));
    };
    let bytes = std::os::unix::ffi::OsStringExt::into_vec(value);
    if let Ok(c_name) = CString::new(name) {
        // SAFETY: getenv's string is the environment's own, writable
        // memory, NUL-terminated; no other thread runs (this function's
        // contract), so nothing reads it while it is wiped.
        unsafe {
            let p = libc::getenv(c_name.as_ptr());
            if !p.is_null() {
                let n = libc::strlen(p);
                for i in 0..n {
                    std::ptr::write_volatile(p.add(i), b'x' as libc::c_char);
                }
            }
        }
    }
    // SAFETY: no other thread runs (this function's contract).
    unsafe { std::env::remove_var(name) };
    Password::new(bytes).map_err(|e| format!("--askpass-env {name}: {e}"))
}

/// The terminal settings to put back, and where: read by the signal
/// handler, so plain memory set before the handler is armed.
struct Saved {
    fd: std::cell::Cell<c_int>,
    termios: std::cell::UnsafeCell<std::mem::MaybeUninit<libc::termios>>,
}

// SAFETY: written only by `ask` (one call at a time, before `ARMED` is set)
// and read only while `ARMED` is set.
unsafe impl Sync for Saved {}

static SAVED: Saved = Saved {
    fd: std::cell::Cell::new(-1),
    termios: std::cell::UnsafeCell::new(std::mem::MaybeUninit::uninit()),
};
/// Whether [`SAVED`] holds settings to restore.
static ARMED: AtomicBool = AtomicBool::new(false);

/// Signals that end the process while the prompt waits: their handler puts
/// the terminal's echo back first.
const SIGNALS: [c_int; 4] = [libc::SIGINT, libc::SIGTERM, libc::SIGHUP, libc::SIGQUIT];

extern "C" fn restore_and_die(sig: c_int) {
    if ARMED.swap(false, Ordering::SeqCst) {
        // SAFETY: `SAVED` was filled before `ARMED` was set; tcsetattr,
        // signal and raise are async-signal-safe.
        unsafe {
            libc::tcsetattr(
                SAVED.fd.get(),
                libc::TCSANOW,
                (*SAVED.termios.get()).as_ptr(),
            );
        }
    }
    // SAFETY: as above.
    unsafe {
        libc::signal(sig, libc::SIG_DFL);
        libc::raise(sig);
    }
}

/// Puts back the terminal's settings and the signal dispositions on drop,
/// whichever way the prompt ends.
struct EchoOff {
    fd: c_int,
    old_actions: Vec<(c_int, libc::sigaction)>,
}

impl Drop for EchoOff {
    fn drop(&mut self) {
        if ARMED.swap(false, Ordering::SeqCst) {
            // SAFETY: `SAVED` holds the settings read from `fd`, still open.
            unsafe {
                libc::tcsetattr(self.fd, libc::TCSANOW, (*SAVED.termios.get()).as_ptr());
            }
        }
        for (sig, old) in &self.old_actions {
            // SAFETY: puts back the action read by sigaction.
            unsafe { libc::sigaction(*sig, old, std::ptr::null_mut()) };
        }
    }
}

/// Asks for the password on the controlling terminal (`/dev/tty`): writes
/// `prompt` there, reads one line with echo off, and puts the terminal back
/// as it was, on every path: an error, a panic, or a signal that ends the
/// process (Ctrl-C, which then ends ussh as it would have).
pub fn ask(prompt: &str) -> Result<Password, String> {
    use std::io::Write;
    use std::os::fd::AsRawFd;
    let no_tty = |e: std::io::Error| {
        format!(
            "--askpass: cannot ask for the password: /dev/tty: {e} (no terminal; \
             give it in an environment variable with --askpass-env VAR)"
        )
    };
    let mut tty = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/tty")
        .map_err(no_tty)?;
    let fd = tty.as_raw_fd();
    let mut old = std::mem::MaybeUninit::<libc::termios>::uninit();
    // SAFETY: tcgetattr fills the struct on success.
    if unsafe { libc::tcgetattr(fd, old.as_mut_ptr()) } != 0 {
        return Err(no_tty(std::io::Error::last_os_error()));
    }
    // SAFETY: filled by tcgetattr.
    let old = unsafe { old.assume_init() };
    SAVED.fd.set(fd);
    // SAFETY: not armed: the handler does not read it now.
    unsafe { (*SAVED.termios.get()).write(old) };
    let mut guard = EchoOff {
        fd,
        old_actions: Vec::new(),
    };
    for sig in SIGNALS {
        // SAFETY: a zeroed sigaction is valid; the handler only calls
        // async-signal-safe functions.
        unsafe {
            let mut act: libc::sigaction = std::mem::zeroed();
            act.sa_sigaction = restore_and_die as *const () as libc::sighandler_t;
            libc::sigemptyset(&mut act.sa_mask);
            let mut prev: libc::sigaction = std::mem::zeroed();
            if libc::sigaction(sig, &act, &mut prev) == 0 {
                guard.old_actions.push((sig, prev));
            }
        }
    }
    let mut quiet = old;
    quiet.c_lflag &= !(libc::ECHO | libc::ECHOE | libc::ECHOK | libc::ECHONL);
    ARMED.store(true, Ordering::SeqCst);
    // SAFETY: `quiet` is a valid termios for `fd`.
    if unsafe { libc::tcsetattr(fd, libc::TCSAFLUSH, &quiet) } != 0 {
        return Err(no_tty(std::io::Error::last_os_error()));
    }
    tty.write_all(prompt.as_bytes())
        .and_then(|()| tty.flush())
        .map_err(no_tty)?;
    let line = read_line(&mut tty);
    // The Enter typed was not echoed.
    let _ = tty.write_all(b"\n");
    drop(guard);
    Password::new(line.map_err(|e| format!("--askpass: reading the password: {e}"))?)
        .map_err(|e| format!("--askpass: {e}"))
}

/// One line from `r`, a byte at a time (nothing read past the newline),
/// into a buffer allocated once and wiped if the line is refused.
fn read_line(r: &mut impl Read) -> std::io::Result<Vec<u8>> {
    let mut line = Vec::with_capacity(MAX_LEN + 1);
    let mut byte = [0u8; 1];
    let mut too_long = false;
    loop {
        match r.read(&mut byte) {
            Ok(0) => break,
            Ok(_) if byte[0] == b'\n' => break,
            Ok(_) if line.len() < MAX_LEN + 1 => line.push(byte[0]),
            Ok(_) => too_long = true,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => {
                line.zeroize();
                byte.zeroize();
                return Err(e);
            }
        }
    }
    byte.zeroize();
    if line.last() == Some(&b'\r') {
        line.pop();
    }
    if too_long {
        // Over the limit: `new` refuses it (and wipes it).
        line.truncate(MAX_LEN + 1);
    }
    Ok(line)
}

/// A password for unit tests.
#[cfg(test)]
pub fn test_password(p: &str) -> Password {
    Password::new(p.as_bytes().to_vec()).expect("a valid password")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_are_checked_and_hidden() {
        let p = Password::new(b"s3cret pw".to_vec()).expect("fine");
        assert_eq!(p.as_str(), "s3cret pw");
        assert_eq!(format!("{p:?}"), "Password(<hidden>)");
        for bad in [
            &b""[..],
            b"a\nb",
            b"a\0b",
            b"\xff\xfe",
            &[b'a'; MAX_LEN + 1],
        ] {
            let e = Password::new(bad.to_vec()).expect_err("refused");
            assert!(e.starts_with("password refused"), "{e}");
        }
        assert!(Password::new(vec![b'a'; MAX_LEN]).is_ok());
    }

    #[test]
    fn a_line_is_read_up_to_its_newline() {
        let mut r: &[u8] = b"pw one\r\nrest";
        assert_eq!(read_line(&mut r).expect("read"), b"pw one");
        assert_eq!(r, b"rest", "nothing read past the newline");
        let mut r: &[u8] = b"no newline";
        assert_eq!(read_line(&mut r).expect("read"), b"no newline");
        let long = vec![b'a'; MAX_LEN * 2];
        let mut r: &[u8] = &long;
        assert_eq!(read_line(&mut r).expect("read").len(), MAX_LEN + 1);
    }
}
