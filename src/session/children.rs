//! What a session owns besides its connection: its live children
//! (channels, agents, listeners), held weakly because each child keeps
//! the session alive and not the reverse, and the libssh2 objects dropped
//! while their free still owed the peer a message.

use std::cell::RefCell;
use std::os::raw::c_int;
use std::rc::{Rc, Weak};

use super::SessionInner;
use super::call::code;
use crate::agent::AgentInner;
use crate::channel::ChannelInner;
use crate::ffi;
use crate::forward::ListenerInner;

/// A child's hook for a session freed without IO: let go of the libssh2
/// object at once (libssh2 frees what the session still holds).
pub(crate) trait Release {
    /// Gives up the libssh2 object; later calls on the child fail as closed.
    fn release(&self);
}

/// Weak references to live objects of one kind, pruned as they go.
pub(crate) struct Registry<T: ?Sized> {
    entries: RefCell<Vec<Weak<T>>>,
}

impl<T: ?Sized> Registry<T> {
    /// An empty registry.
    pub(crate) fn new() -> Self {
        Registry {
            entries: RefCell::new(Vec::new()),
        }
    }

    /// Adds `item`, first dropping the entries of objects that are gone.
    pub(crate) fn add(&self, item: Weak<T>) {
        let mut entries = self.entries.borrow_mut();
        entries.retain(|w| w.strong_count() > 0);
        entries.push(item);
    }

    /// Drops the entries of objects that are gone.
    pub(crate) fn prune(&self) {
        self.entries.borrow_mut().retain(|w| w.strong_count() > 0);
    }

    /// The objects alive now, in the order they were added. The registry
    /// is not borrowed while the caller uses them (one may add another).
    pub(crate) fn live(&self) -> Vec<Rc<T>> {
        self.entries
            .borrow()
            .iter()
            .filter_map(Weak::upgrade)
            .collect()
    }

    /// Empties the registry, returning the objects still alive.
    pub(crate) fn take_live(&self) -> Vec<Rc<T>> {
        let entries = std::mem::take(&mut *self.entries.borrow_mut());
        entries.iter().filter_map(Weak::upgrade).collect()
    }

    /// Entries held (some may be gone since the last prune).
    pub(crate) fn len(&self) -> usize {
        self.entries.borrow().len()
    }
}

impl<T: ?Sized> std::fmt::Debug for Registry<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Registry({})", self.len())
    }
}

/// A session's live children.
#[derive(Debug)]
pub(crate) struct Children {
    /// Open channels (session, direct-tcpip, streamlocal, accepted).
    pub(crate) channels: Registry<ChannelInner>,
    /// Agents: libssh2 frees an agent through its session.
    pub(crate) agents: Registry<AgentInner>,
    /// Remote-forward listeners.
    pub(crate) listeners: Registry<ListenerInner>,
}

impl Children {
    pub(crate) fn new() -> Self {
        Children {
            channels: Registry::new(),
            agents: Registry::new(),
            listeners: Registry::new(),
        }
    }

    /// The session is being freed without IO: every child lets go of its
    /// libssh2 object. Agents first (freed through the session, which
    /// must still exist), then listeners (`libssh2_session_free` cancels
    /// and frees them), then channels.
    pub(crate) fn release_all(&self) {
        fn release<T: Release + ?Sized>(registry: &Registry<T>) {
            for child in registry.take_live() {
                child.release();
            }
        }
        release(&self.agents);
        release(&self.listeners);
        release(&self.channels);
    }
}

/// libssh2 objects dropped while freeing them still owed the peer a
/// message (a channel's EOF and CLOSE, a listener's cancel): each stays
/// listed until a libssh2 free function has returned anything but EAGAIN
/// for it, after which libssh2 has freed it and it is never touched again.
pub(crate) struct Deferred<P> {
    list: RefCell<Vec<*mut P>>,
}

impl<P> Deferred<P> {
    pub(crate) fn new() -> Self {
        Deferred {
            list: RefCell::new(Vec::new()),
        }
    }

    pub(crate) fn push(&self, raw: *mut P) {
        self.list.borrow_mut().push(raw);
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.list.borrow().is_empty()
    }

    pub(crate) fn len(&self) -> usize {
        self.list.borrow().len()
    }

    /// Empties the list, returning what was on it.
    pub(crate) fn take_all(&self) -> Vec<*mut P> {
        std::mem::take(&mut *self.list.borrow_mut())
    }

    /// Tries `free` once on each, without waiting; keeps those it says
    /// EAGAIN for.
    pub(crate) fn retry(&self, mut free: impl FnMut(*mut P) -> c_int) {
        for raw in self.take_all() {
            if free(raw) == ffi::LIBSSH2_ERROR_EAGAIN {
                self.push(raw);
            }
        }
    }

    /// Frees each with `free`, waiting for the peer where libssh2 must (the
    /// graceful close). An object leaves the list only once freed, so a
    /// close abandoned half-way leaves the rest to the teardown.
    pub(crate) async fn finish(
        &self,
        session: &SessionInner,
        mut free: impl FnMut(*mut P) -> c_int,
    ) {
        loop {
            let Some(raw) = self.list.borrow().last().copied() else {
                break;
            };
            // `call` repeats only on EAGAIN: any other result means
            // libssh2 freed it, or the link failed and `session_free` will.
            let _ = session.call(|_| code(free(raw))).await;
            self.list.borrow_mut().retain(|&r| r != raw);
        }
    }
}

impl<P> std::fmt::Debug for Deferred<P> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Deferred({})", self.len())
    }
}
