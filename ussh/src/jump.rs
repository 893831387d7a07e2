//! Jump hosts (`-J`, `ProxyJump`) without processes. Each thread keeps
//! authenticated sessions to the last hop of every chain its hosts use,
//! shared by the hosts behind it, at most [`PER_JUMP`] at a time per
//! session; each host's own session runs over a `direct-tcpip` channel of
//! one (`Session::connect_via`). A jump host's connect and authentication
//! are paid once per [`PER_JUMP`] hosts, not once per host, and a dead
//! jump host fails only the hosts behind it.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::rc::Rc;

use uring_ssh::{Error, Session};

use crate::engine::{self, Fail, Plan};

/// Hosts sharing one jump session at a time. One connection is one sshd
/// process (one core) on the jump host, and sshd bounds a connection's
/// sessions (`MaxSessions`, 10 by default): more hosts open more jump
/// sessions.
pub const PER_JUMP: usize = 8;

/// An authenticated session to a chain's last hop.
struct Hop {
    session: Session,
    leases: Cell<usize>,
}

/// A host's place on a jump session; dropping it frees the place (the
/// host's session keeps the channel, and so the jump session, alive as
/// long as it lives).
pub struct Lease(Rc<Hop>);

impl Drop for Lease {
    fn drop(&mut self) {
        self.0.leases.set(self.0.leases.get() - 1);
    }
}

/// The jump sessions of one chain, and a lock so that hosts arriving
/// together open one more session, not one each.
#[derive(Default)]
struct Chain {
    hops: RefCell<Vec<Rc<Hop>>>,
    opening: tokio::sync::Mutex<()>,
    /// Attempts to open a session of this chain that have ended.
    attempts: Cell<u64>,
    /// How the last attempt failed, if it did.
    failure: RefCell<Option<(String, bool)>>,
}

thread_local! {
    static CHAINS: RefCell<HashMap<String, Rc<Chain>>> = RefCell::default();
}

fn chain_key(jumps: &[Plan]) -> String {
    let hops: Vec<String> = jumps
        .iter()
        .map(|j| format!("{}@{}:{}", j.user, j.hostname, j.port))
        .collect();
    hops.join(",")
}

/// A place on the least used live session with room, if any.
fn lease(chain: &Chain) -> Option<Lease> {
    let hops = chain.hops.borrow();
    let hop = hops
        .iter()
        .filter(|h| !h.session.is_closed() && h.leases.get() < PER_JUMP)
        .min_by_key(|h| h.leases.get())?;
    hop.leases.set(hop.leases.get() + 1);
    Some(Lease(hop.clone()))
}

async fn acquire(jumps: &[Plan]) -> Result<Lease, Fail> {
    let chain = CHAINS.with(|c| c.borrow_mut().entry(chain_key(jumps)).or_default().clone());
    if let Some(l) = lease(&chain) {
        return Ok(l);
    }
    let seen = chain.attempts.get();
    let _opening = chain.opening.lock().await;
    // Another host may have opened one while this one waited.
    if let Some(l) = lease(&chain) {
        return Ok(l);
    }
    // Or failed to: its failure is this host's too. Hosts queued behind a
    // dead or stalling jump host fail together, not one timeout after
    // another, and the jump host sees one attempt, not one per host.
    if chain.attempts.get() != seen
        && let Some((msg, retry)) = chain.failure.borrow().clone()
    {
        return Err(Fail { msg, retry });
    }
    chain.hops.borrow_mut().retain(|h| !h.session.is_closed());
    let opened = open_chain(jumps).await;
    chain.attempts.set(chain.attempts.get() + 1);
    let session = match opened {
        Ok(s) => {
            chain.failure.replace(None);
            s
        }
        Err(f) => {
            chain.failure.replace(Some((f.msg.clone(), f.retry)));
            return Err(f);
        }
    };
    let hop = Rc::new(Hop {
        session,
        leases: Cell::new(1),
    });
    chain.hops.borrow_mut().push(hop.clone());
    Ok(Lease(hop))
}

/// Connects and authenticates every hop, each through the one before.
async fn open_chain(jumps: &[Plan]) -> Result<Session, Fail> {
    let mut last: Option<Session> = None;
    for hop in jumps {
        let on_hop = |f: Fail| Fail {
            msg: format!("jump host {}: {}", hop.label, f.msg),
            retry: f.retry,
        };
        let s = match &last {
            None => engine::connect(hop).await.map_err(on_hop)?,
            Some(before) => via(before, hop).await.map_err(on_hop)?,
        };
        engine::authenticate(&s, hop).await.map_err(|msg| Fail {
            msg: format!("jump host {}: {msg}", hop.label),
            retry: false,
        })?;
        // The hop before stays up: the new session's relay holds its
        // channel.
        last = Some(s);
    }
    last.ok_or_else(|| Fail {
        msg: "no jump host".into(),
        retry: false,
    })
}

/// `plan`'s host through `jump`, bounded by its connect timeout.
async fn via(jump: &Session, plan: &Plan) -> Result<Session, Fail> {
    let t = plan.connect_timeout;
    let (host, port) = (plan.hostname.as_str(), plan.port);
    let connect = Session::connect_via(jump, host, port, plan.config.clone());
    match tokio::time::timeout(t, connect).await {
        Ok(Ok(s)) => Ok(s),
        Err(_) => Err(Fail {
            msg: format!(
                "connect to {host} port {port} through the jump host: no SSH handshake within {}",
                engine::secs(t)
            ),
            retry: true,
        }),
        Ok(Err(e)) => {
            let retry = matches!(e, Error::Timeout { .. }) || engine::before_banner(&e);
            let msg = match &e {
                Error::HostKey(h) => engine::host_key_problem(h, plan),
                _ => format!(
                    "connect to {host} port {port} through the jump host: {}",
                    engine::describe(&e)
                ),
            };
            Err(Fail { msg, retry })
        }
    }
}

/// A session to `plan`'s host through its jump hosts, and its place on the
/// jump session (to be kept as long as the session).
pub async fn connect_through(plan: &Plan) -> Result<(Session, Lease), Fail> {
    let lease = acquire(&plan.jumps).await?;
    let s = via(&lease.0.session, plan).await?;
    Ok((s, lease))
}
