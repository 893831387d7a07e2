//! [`Agent`]: an ssh-agent's identities, and authentication with one.
//!
//! libssh2 talks to the agent's unix socket through the session's own send
//! and recv callbacks, passing the agent's fd; ours serve any fd but the
//! session's with plain `poll(2)` + `send(2)`/`recv(2)`, each exchange
//! bounded by the session's timeout (see `transport::callbacks`). Talking
//! to a local agent is quick, so listing identities is a plain call;
//! authentication talks to the server and is async.

use std::cell::Cell;
use std::ffi::CStr;
use std::path::Path;
use std::rc::Rc;

use crate::error::{Error, InvalidInput, Result};
use crate::ffi;
use crate::session::children::Release;
use crate::session::{Session, SessionInner, code, cstring};

/// One identity the agent holds: its public key and comment.
#[derive(Clone, PartialEq, Eq)]
pub struct AgentIdentity {
    /// The public key in SSH wire format (as in `authorized_keys`, before
    /// base64).
    pub blob: Vec<u8>,
    /// The comment the key was added with (often a file name or user@host).
    pub comment: String,
}

impl AgentIdentity {
    /// The key type named at the start of the blob (`ssh-ed25519`, `ssh-rsa`, …).
    pub fn key_type(&self) -> Option<&str> {
        let len = u32::from_be_bytes(self.blob.get(..4)?.try_into().ok()?) as usize;
        std::str::from_utf8(self.blob.get(4..4usize.checked_add(len)?)?).ok()
    }

    /// The key as an OpenSSH public-key line without comment:
    /// `TYPE BASE64`, as in `authorized_keys` or a `.pub` file.
    pub fn to_openssh(&self) -> String {
        format!(
            "{} {}",
            self.key_type().unwrap_or("unknown"),
            base64(&self.blob)
        )
    }
}

impl std::fmt::Debug for AgentIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AgentIdentity")
            .field("key_type", &self.key_type())
            .field("comment", &self.comment)
            .field("blob_len", &self.blob.len())
            .finish()
    }
}

/// Standard base64 with padding.
fn base64(data: &[u8]) -> String {
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for chunk in data.chunks(3) {
        let b = [
            chunk[0],
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        out.push(A[(n >> 18) as usize & 63] as char);
        out.push(A[(n >> 12) as usize & 63] as char);
        out.push(if chunk.len() > 1 {
            A[(n >> 6) as usize & 63] as char
        } else {
            '='
        });
        out.push(if chunk.len() > 2 {
            A[n as usize & 63] as char
        } else {
            '='
        });
    }
    out
}

/// A connection to an ssh-agent, for one session.
///
/// libssh2 ties an agent to a session (it allocates through it and signs
/// through it): the agent keeps its session alive, and if the session is
/// closed first the agent is freed with it (later calls fail with
/// [`Error::Closed`]). Methods take `&mut self`: libssh2 keeps one request
/// in progress per agent, and the identity list it hands out is replaced
/// by each listing.
pub struct Agent {
    inner: Rc<AgentInner>,
}

pub(crate) struct AgentInner {
    session: Rc<SessionInner>,
    raw: Cell<*mut ffi::LIBSSH2_AGENT>,
    connected: Cell<bool>,
}

impl AgentInner {
    fn raw(&self) -> Result<*mut ffi::LIBSSH2_AGENT> {
        let raw = self.raw.get();
        if raw.is_null() || self.session.raw().is_err() {
            Err(Error::Closed("agent"))
        } else {
            Ok(raw)
        }
    }
}

impl Release for AgentInner {
    /// Frees the libssh2 agent (closing its socket); called before the
    /// session is freed, or on drop.
    fn release(&self) {
        let raw = self.raw.replace(std::ptr::null_mut());
        if !raw.is_null() {
            // SAFETY: the agent came from `libssh2_agent_init` on this
            // session, which is still allocated (the session frees its
            // agents first, in `free_now`); it is freed once (the pointer
            // was just taken). It closes only the local agent socket.
            unsafe { ffi::libssh2_agent_free(raw) };
        }
    }
}

impl Drop for AgentInner {
    fn drop(&mut self) {
        self.release();
        self.session.children.agents.prune();
    }
}

impl Agent {
    /// An agent handle for `session`, not yet connected.
    pub fn new(session: &Session) -> Result<Agent> {
        let s = session.inner.raw()?;
        // SAFETY: live session; the agent is freed by `AgentInner::release`
        // before the session (see `SessionInner::free_now`).
        let raw = unsafe { ffi::libssh2_agent_init(s) };
        if raw.is_null() {
            return Err(session.inner.error(ffi::LIBSSH2_ERROR_ALLOC));
        }
        let inner = Rc::new(AgentInner {
            session: session.inner.clone(),
            raw: Cell::new(raw),
            connected: Cell::new(false),
        });
        session.inner.children.agents.add(Rc::downgrade(&inner));
        Ok(Agent { inner })
    }

    /// Connects to the agent at `$SSH_AUTH_SOCK`.
    pub fn connect(&mut self) -> Result<()> {
        self.connect_inner(None)
    }

    /// Connects to the agent listening on the unix socket `path`.
    pub fn connect_to(&mut self, path: &Path) -> Result<()> {
        self.connect_inner(Some(path))
    }

    fn connect_inner(&mut self, path: Option<&Path>) -> Result<()> {
        let raw = self.inner.raw()?;
        if self.inner.connected.get() {
            self.disconnect();
        }
        if let Some(p) = path {
            if !p.exists() {
                return Err(Error::InvalidInput(InvalidInput::NotFound {
                    what: "agent socket".into(),
                    path: p.to_owned(),
                }));
            }
            let c = std::ffi::CString::new(p.as_os_str().as_encoded_bytes())
                .map_err(|_| Error::InvalidInput(InvalidInput::nul("agent socket path")))?;
            // SAFETY: live agent; libssh2 copies the path.
            unsafe { ffi::libssh2_agent_set_identity_path(raw, c.as_ptr()) };
        } else if std::env::var_os("SSH_AUTH_SOCK").is_none() {
            return Err(Error::InvalidInput(InvalidInput::Usage(
                "SSH_AUTH_SOCK is not set: no agent to connect to",
            )));
        }
        // SAFETY: live agent; the connect is a local unix-socket connect.
        let rc = unsafe { ffi::libssh2_agent_connect(raw) };
        if rc != 0 {
            return Err(self.inner.session.error(rc));
        }
        self.inner.connected.set(true);
        Ok(())
    }

    /// Closes the connection to the agent (the handle may connect again).
    pub fn disconnect(&mut self) {
        if let Ok(raw) = self.inner.raw() {
            // SAFETY: live agent; disconnecting an unconnected one is a no-op.
            unsafe { ffi::libssh2_agent_disconnect(raw) };
        }
        self.inner.connected.set(false);
    }

    /// Asks the agent for its identities.
    pub fn identities(&mut self) -> Result<Vec<AgentIdentity>> {
        let raw = self.connected_raw()?;
        // SAFETY: live, connected agent.
        let rc = unsafe { ffi::libssh2_agent_list_identities(raw) };
        if rc != 0 {
            return Err(self.inner.session.error(rc));
        }
        let mut out = Vec::new();
        self.each_identity(|id| {
            out.push(id.clone());
            false
        })?;
        Ok(out)
    }

    fn connected_raw(&self) -> Result<*mut ffi::LIBSSH2_AGENT> {
        let raw = self.inner.raw()?;
        if !self.inner.connected.get() {
            return Err(Error::InvalidInput(InvalidInput::Usage(
                "the agent is not connected: call connect first",
            )));
        }
        Ok(raw)
    }

    /// Walks libssh2's current identity list until `f` says stop; returns
    /// the libssh2 identity it stopped at.
    fn each_identity(
        &self,
        mut f: impl FnMut(&AgentIdentity) -> bool,
    ) -> Result<Option<*mut ffi::libssh2_agent_publickey>> {
        let raw = self.inner.raw()?;
        let mut prev: *mut ffi::libssh2_agent_publickey = std::ptr::null_mut();
        loop {
            let mut id = std::ptr::null_mut();
            // SAFETY: live agent; `prev` is null or an identity of its
            // current list (nothing replaced the list meanwhile: `&self`
            // methods never list).
            let rc = unsafe { ffi::libssh2_agent_get_identity(raw, &mut id, prev) };
            if rc == 1 {
                return Ok(None);
            }
            if rc < 0 {
                return Err(self.inner.session.error(rc));
            }
            // SAFETY: libssh2 returned a live identity whose blob has
            // `blob_len` bytes and whose comment is NUL-terminated (or null).
            let ident = unsafe {
                let p = &*id;
                AgentIdentity {
                    blob: if p.blob.is_null() {
                        Vec::new()
                    } else {
                        std::slice::from_raw_parts(p.blob, p.blob_len).to_vec()
                    },
                    comment: if p.comment.is_null() {
                        String::new()
                    } else {
                        CStr::from_ptr(p.comment).to_string_lossy().into_owned()
                    },
                }
            };
            if f(&ident) {
                return Ok(Some(id));
            }
            prev = id;
        }
    }

    /// Authenticates the session as `user` with `identity` (one of
    /// [`Agent::identities`]): the agent signs, the server checks. Queued
    /// with the session's other authentication calls, under its timeout.
    /// A key the server does not accept is an error for which
    /// [`Error::is_auth_failure`] holds.
    pub async fn authenticate(&mut self, user: &str, identity: &AgentIdentity) -> Result<()> {
        let raw = self.connected_raw()?;
        let c_user = cstring("user name", user)?;
        let find = |me: &Self| me.each_identity(|id| id.blob == identity.blob);
        let id = match find(self)? {
            Some(id) => id,
            None => {
                // Not in the list libssh2 holds (never listed, or the
                // agent changed): list again.
                self.identities()?;
                find(self)?.ok_or_else(|| Error::Ssh {
                    code: ffi::LIBSSH2_ERROR_AUTHENTICATION_FAILED,
                    message: format!(
                        "the agent does not hold {} ({})",
                        identity.key_type().unwrap_or("the key"),
                        identity.comment
                    ),
                })?
            }
        };
        self.inner
            .session
            .auth("agent authentication", |_| {
                // SAFETY: live agent and one of its identities (the list
                // is not replaced while this `&mut self` call runs);
                // `c_user` outlives the call.
                code(unsafe { ffi::libssh2_agent_userauth(raw, c_user.as_ptr(), id) })
            })
            .await
    }
}

impl std::fmt::Debug for Agent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Agent")
            .field("open", &!self.inner.raw.get().is_null())
            .field("connected", &self.inner.connected.get())
            .finish()
    }
}

impl Session {
    /// Authenticates with each identity of the ssh-agent at `$SSH_AUTH_SOCK`
    /// in turn until one is accepted.
    pub async fn auth_agent(&self, user: &str) -> Result<()> {
        self.auth_agent_at(user, None).await
    }

    /// Like [`Session::auth_agent`], with the agent's socket given
    /// explicitly (`None`: `$SSH_AUTH_SOCK`).
    pub async fn auth_agent_at(&self, user: &str, socket: Option<&Path>) -> Result<()> {
        cstring("user name", user)?;
        let mut agent = Agent::new(self)?;
        match socket {
            Some(p) => agent.connect_to(p)?,
            None => agent.connect()?,
        }
        let mut last_err = None;
        for id in agent.identities()? {
            match agent.authenticate(user, &id).await {
                Ok(()) => return Ok(()),
                Err(e) if e.is_auth_failure() => last_err = Some(e),
                Err(e) => return Err(e),
            }
        }
        Err(last_err.unwrap_or_else(|| Error::Ssh {
            code: ffi::LIBSSH2_ERROR_AUTHENTICATION_FAILED,
            message: "the agent holds no identity".into(),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_matches_the_standard_vectors() {
        for (i, o) in [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foob", "Zm9vYg=="),
            ("fooba", "Zm9vYmE="),
            ("foobar", "Zm9vYmFy"),
        ] {
            assert_eq!(base64(i.as_bytes()), o);
        }
    }

    #[test]
    fn key_type_reads_the_blob_and_rejects_short_ones() {
        let mut blob = vec![0, 0, 0, 11];
        blob.extend_from_slice(b"ssh-ed25519");
        blob.extend_from_slice(&[0, 0, 0, 1, 7]);
        let id = AgentIdentity {
            blob,
            comment: "c".into(),
        };
        assert_eq!(id.key_type(), Some("ssh-ed25519"));
        let short = AgentIdentity {
            blob: vec![0, 0, 0, 40, b'x'],
            comment: String::new(),
        };
        assert_eq!(short.key_type(), None);
        let huge = AgentIdentity {
            blob: vec![0xff, 0xff, 0xff, 0xff, b'x'],
            comment: String::new(),
        };
        assert_eq!(huge.key_type(), None);
        assert_eq!(
            AgentIdentity {
                blob: vec![],
                comment: String::new()
            }
            .key_type(),
            None
        );
    }
}
