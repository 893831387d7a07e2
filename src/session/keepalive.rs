//! Keepalive: probes a silent peer as OpenSSH's `ServerAliveInterval` and
//! `ServerAliveCountMax` do, on a reactor timer, and fails the session
//! when the probes go unanswered.

use std::os::raw::{c_int, c_uint};
use std::rc::Rc;
use std::time::{Duration, Instant};

use super::{SessionInner, State};
use crate::ffi;
use crate::transport::Link;

impl SessionInner {
    pub(super) fn start_keepalive(this: &Rc<Self>) {
        let Some(interval) = this.config.keepalive else {
            return;
        };
        if let Ok(s) = this.raw() {
            // SAFETY: live session.
            unsafe { ffi::libssh2_keepalive_config(s, 1, interval.as_secs().max(1) as c_uint) };
        }
        Self::arm_keepalive(this, interval);
    }

    fn arm_keepalive(this: &Rc<Self>, after: Duration) {
        let weak = Rc::downgrade(this);
        let id = this.reactor.submit_timer(
            after,
            Box::new(move |done| {
                if done.raw() != -libc::ETIME {
                    return;
                }
                if let Some(s) = weak.upgrade() {
                    s.keepalive_op.set(None);
                    Self::keepalive_tick(&s);
                }
            }),
        );
        this.keepalive_op.set(Some(id));
    }

    /// One keepalive timer expiry: probe the peer, or re-arm for later, or
    /// fail the session after `count_max` unanswered probes.
    fn keepalive_tick(this: &Rc<Self>) {
        let (Some(interval), Ok(s)) = (this.config.keepalive, this.raw()) else {
            return;
        };
        if this.state.get() != State::Open || !matches!(this.transport.bridge().link(), Link::Open)
        {
            return;
        }
        let last_rx = this.transport.last_rx();
        if this
            .keepalive_sent_at
            .get()
            .is_some_and(|sent| last_rx >= sent)
        {
            // Bytes came after the last probe: it was answered, however
            // late this tick runs.
            this.keepalives_unanswered.set(0);
        }
        let silent = Instant::now().duration_since(last_rx);
        if silent < interval {
            // Bytes arrived within the interval: the peer is alive and no
            // keepalive is needed (each reply stays in libssh2's packet list,
            // which nothing empties).
            this.keepalives_unanswered.set(0);
            Self::arm_keepalive(this, interval - silent);
            return;
        }
        // Silent for an interval: probe, unless `count_max` probes in a row
        // went unanswered (as OpenSSH's ServerAliveCountMax).
        let unanswered = this.keepalives_unanswered.get();
        if unanswered >= this.config.keepalive_count_max {
            this.transport.fail(libc::ETIMEDOUT);
            return;
        }
        // While a key exchange is under way libssh2 sends no keepalive
        // (`keepalive_send` resumes the exchange, which returns EAGAIN,
        // and reports nothing sent), so a peer that goes silent in the
        // middle of a rekey is never probed. Silence as long as the
        // unanswered probes would have taken (plus libssh2's whole-second
        // clock) ends the session all the same.
        if silent >= interval * (this.config.keepalive_count_max + 1) + Duration::from_secs(2) {
            this.transport.fail(libc::ETIMEDOUT);
            return;
        }
        let sent_before = this.transport.bridge().stats().packets_sent;
        let mut next: c_int = 0;
        // SAFETY: live session; no libssh2 call is running (single thread,
        // and completions never run inside one).
        unsafe { ffi::libssh2_keepalive_send(s, &mut next) };
        this.transport.pump();
        this.retry_deferred();
        if this.transport.bridge().stats().packets_sent > sent_before {
            this.keepalives_unanswered.set(unanswered + 1);
            this.keepalive_sent_at.set(Some(Instant::now()));
            // Its reply stays in libssh2's packet list, where the next
            // `forward_listen` would take it for its own.
            this.forwards.note_stale_reply();
            Self::arm_keepalive(this, interval);
        } else {
            // libssh2 throttles on its own clock (whole seconds, 2 s at
            // least): come back when it will send.
            Self::arm_keepalive(this, Duration::from_secs(next.max(1) as u64));
        }
    }
}
