//! The libssh2 call driver: a libssh2 call that says EAGAIN waits for the
//! session's next socket event and is resumed; a call abandoned half-way
//! is marked so that nothing resumes it with other arguments.

use std::cell::Cell;
use std::future::Future;
use std::os::raw::{c_char, c_int};
use std::task::{Context, Poll};

use super::SessionInner;
use crate::error::{Error, Result};
use crate::ffi;
use crate::text::remote_text;
use crate::transport::Link;

/// Times a libssh2 call is repeated at once while it has input to process.
const MAX_REPEATS: usize = 64;

/// Sets a flag if dropped before `done()`: marks half-done libssh2 calls.
pub(crate) struct Abandon<'a>(Option<&'a Cell<bool>>);

impl<'a> Abandon<'a> {
    pub(crate) fn new(flag: &'a Cell<bool>) -> Self {
        Abandon(Some(flag))
    }
    pub(crate) fn done(mut self) {
        self.0 = None;
    }
}

impl Drop for Abandon<'_> {
    fn drop(&mut self) {
        if let Some(f) = self.0 {
            f.set(true);
        }
    }
}

/// A libssh2 return code as a result.
pub(crate) fn code(rc: c_int) -> std::result::Result<(), c_int> {
    if rc < 0 { Err(rc) } else { Ok(()) }
}

impl SessionInner {
    /// libssh2's last error for `rc`, or the transport failure behind it.
    pub(crate) fn error(&self, rc: c_int) -> Error {
        if let Some((reason, description)) = self.transport.context.disconnect.borrow().clone() {
            return Error::Disconnected {
                reason,
                description,
            };
        }
        let message = self
            .raw()
            .ok()
            .map(|s| {
                let mut msg: *mut c_char = std::ptr::null_mut();
                let mut len: c_int = 0;
                // SAFETY: live session; the message is copied at once (it
                // points into a session buffer reused by the next error).
                unsafe {
                    ffi::libssh2_session_last_error(s, &mut msg, &mut len, 0);
                    if msg.is_null() || len <= 0 {
                        String::new()
                    } else {
                        remote_text(std::slice::from_raw_parts(msg as *const u8, len as usize))
                    }
                }
            })
            .unwrap_or_default();
        match self.transport.bridge().link() {
            Link::PeerClosed => Error::Io(std::io::Error::new(
                std::io::ErrorKind::ConnectionReset,
                format!("connection closed by the server ({message})"),
            )),
            Link::Failed(errno) => {
                let e = std::io::Error::from_raw_os_error(errno);
                Error::Io(std::io::Error::new(e.kind(), format!("{e} ({message})")))
            }
            Link::Dead => Error::Closed("session"),
            Link::Open | Link::Disconnected => Error::Ssh { code: rc, message },
        }
    }

    /// Runs `fut` under the per-operation timeout.
    pub(crate) async fn with_timeout<T>(
        &self,
        operation: &'static str,
        fut: impl Future<Output = Result<T>>,
    ) -> Result<T> {
        match self.config.timeout {
            Some(after) => tokio::time::timeout(after, fut)
                .await
                .map_err(|_| Error::Timeout { operation, after })?,
            None => fut.await,
        }
    }

    /// Runs a libssh2 call: `Pending` (with the waker registered for this
    /// session's next socket event) while it says EAGAIN for want of input.
    ///
    /// libssh2 also says EAGAIN with input still buffered: it stops after
    /// decrypting the first block of a packet whose rest it has not read yet
    /// (AEAD ciphers), without asking for more. No socket event would come
    /// for that, so such a call is simply repeated.
    pub(crate) fn poll_call<T>(
        &self,
        cx: &mut Context<'_>,
        f: &mut impl FnMut(*mut ffi::LIBSSH2_SESSION) -> std::result::Result<T, c_int>,
    ) -> Poll<Result<T>> {
        let raw = match self.raw() {
            Ok(r) => r,
            Err(e) => return Poll::Ready(Err(e)),
        };
        self.reactor.ensure_driver_here();
        let bridge = self.transport.bridge();
        let mut stalls = 0;
        for _ in 0..MAX_REPEATS {
            bridge.clear_wants_recv();
            let taken = bridge.stats().bytes_received;
            let r = f(raw);
            if let Some(panic) = self.transport.context.take_panic() {
                // A callback (the keyboard-interactive responder) panicked
                // inside libssh2; it was caught there, resume it here.
                std::panic::resume_unwind(panic);
            }
            self.transport.pump();
            match r {
                Ok(v) => return Poll::Ready(Ok(v)),
                Err(ffi::LIBSSH2_ERROR_EAGAIN) => {
                    // Bytes that arrived before an EOF or a failure are still
                    // valid (an exit status, the server's DISCONNECT reason):
                    // let libssh2 read them before reporting the link. Repeat
                    // only while libssh2 makes progress through them.
                    if bridge.stats().bytes_received != taken {
                        stalls = 0;
                    } else {
                        stalls += 1;
                    }
                    // One repeat without input is allowed in a row (libssh2
                    // stops once after decrypting a packet's first block from
                    // bytes it holds); a second means it waits for something else.
                    if !bridge.wants_recv()
                        && bridge.inbound_len() > 0
                        && bridge.link() != Link::Dead
                        && stalls <= 1
                    {
                        continue;
                    }
                    if !matches!(bridge.link(), Link::Open | Link::Disconnected) {
                        return Poll::Ready(Err(self.error(ffi::LIBSSH2_ERROR_SOCKET_RECV)));
                    }
                    self.transport.register(cx.waker());
                    return Poll::Pending;
                }
                Err(rc) => return Poll::Ready(Err(self.error(rc))),
            }
        }
        // Progress without end: let other tasks run, then continue.
        cx.waker().wake_by_ref();
        Poll::Pending
    }

    /// Repeats a libssh2 call until it stops saying EAGAIN.
    pub(crate) async fn call<T>(
        &self,
        mut f: impl FnMut(*mut ffi::LIBSSH2_SESSION) -> std::result::Result<T, c_int>,
    ) -> Result<T> {
        std::future::poll_fn(|cx| self.poll_call(cx, &mut f)).await
    }
}
