//! ProxyJump in-process: a session over a `direct-tcpip` channel of
//! another session.
//!
//! The inner session runs over one end of a `socketpair`, exactly as over
//! TCP; a relay task on the reactor copies between the other end and the
//! channel. The inner transport stays unchanged (its receive path, its
//! teardown), at the cost of one copy through the kernel per direction.

use std::future::poll_fn;
use std::os::fd::{FromRawFd, OwnedFd};
use std::rc::Rc;
use std::time::Duration;

use super::{Config, LINGER_LIMIT, Session, check_config, stream_socket};
use crate::channel::ChannelInner;
use crate::error::{Error, Result};
use crate::reactor::{Reactor, SharedFd};

/// Bytes moved per step in each direction of the relay.
const RELAY_BUF: usize = 64 * 1024;

impl Session {
    /// Connects to `host:port` through `jump`, an authenticated session
    /// (like OpenSSH's `ProxyJump`, without a process): the jump server
    /// opens a `direct-tcpip` connection to `host:port`, and a new session
    /// runs its handshake and host-key check over it under `config`. `host`
    /// is both what the jump server connects to and what known_hosts is
    /// searched for. Chains work: `jump` may itself run through another.
    ///
    /// The bytes are relayed by a task of the thread's reactor, which runs
    /// as long as the new session does without anyone polling it. The relay
    /// holds the channel, and with it `jump`: the jump session stays
    /// connected while sessions run through it, even if its own handles are
    /// dropped. When the jump connection fails or is closed
    /// ([`Session::close`]), every session through it fails at once (its
    /// calls return errors, none hangs); dropping a session through it
    /// closes its channel and affects nothing else.
    ///
    /// Fails like [`Session::channel_direct_tcpip`] if the jump server
    /// refuses the connection, and like [`Session::connect_stream`] after.
    pub async fn connect_via(
        jump: &Session,
        host: &str,
        port: u16,
        config: Config,
    ) -> Result<Session> {
        check_config(&config)?;
        let reactor = Reactor::current()?;
        let (ours, theirs) = socketpair()?;
        let channel = jump
            .channel_direct_tcpip(host, port, "127.0.0.1", 0)
            .await?;
        let relay_fd = stream_socket(theirs)?;
        let ours = stream_socket(ours)?;
        reactor.spawn_local(relay(reactor.clone(), channel.inner().clone(), relay_fd));
        drop(channel);
        Self::connect_over(reactor, ours, host, port, config).await
    }
}

/// A connected pair of Unix stream sockets.
fn socketpair() -> Result<(OwnedFd, OwnedFd)> {
    let mut fds = [-1; 2];
    // SAFETY: `fds` is an array of two ints, as socketpair(2) writes.
    let rc = unsafe {
        libc::socketpair(
            libc::AF_UNIX,
            libc::SOCK_STREAM | libc::SOCK_CLOEXEC,
            0,
            fds.as_mut_ptr(),
        )
    };
    if rc != 0 {
        return Err(Error::Io(std::io::Error::last_os_error()));
    }
    // SAFETY: both fds were just created by socketpair(2) and are owned
    // by nothing else.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// How long the relay keeps carrying the far end's bytes after the inner
/// session's half-close: the inner session's own linger, and a second more
/// for the far end's close to come back through the jump.
const RELAY_LINGER: Duration = LINGER_LIMIT.saturating_add(Duration::from_secs(1));

/// Copies between `fd` (the relay's end of the socketpair) and `channel`
/// until the inner session is gone or the channel fails, then shuts the
/// socket down: an inner session whose jump failed sees its peer close.
async fn relay(reactor: Rc<Reactor>, channel: Rc<ChannelInner>, fd: Rc<SharedFd>) {
    // The far end closed: the inner session reads EOF, and may still send
    // until it notices.
    let far_end_closed = || {
        // SAFETY: `fd` is open while the relay holds it; shutdown(2) does
        // not block.
        unsafe { libc::shutdown(fd.raw(), libc::SHUT_WR) };
    };
    let mut up = std::pin::pin!(to_channel(&reactor, &channel, &fd));
    let mut down = std::pin::pin!(from_channel(&reactor, &channel, &fd));
    tokio::select! {
        biased;
        () = &mut up => {
            // The inner session's end: after a graceful close it lingers
            // until the far end closes. Until then (bounded), the far end's
            // bytes still reach it, so that the far end reads the
            // DISCONNECT and the EOF behind it before any close of ours
            // could reset it. A session dropped or killed is gone at once.
            if !hung_up(&fd)
                && let Ok(true) = tokio::time::timeout(RELAY_LINGER, down).await
            {
                far_end_closed();
            }
        }
        eof = &mut down => {
            if eof {
                far_end_closed();
                up.await;
            }
        }
    }
    reactor.shutdown_detached(&fd);
    // Dropping the channel hands its close to the jump session.
}

/// Whether the inner session's end of the socketpair is shut down both
/// ways or closed (a drop or a kill), rather than only for sending (a
/// graceful close that lingers).
fn hung_up(fd: &SharedFd) -> bool {
    let mut p = libc::pollfd {
        fd: fd.raw(),
        events: 0,
        revents: 0,
    };
    // SAFETY: one pollfd that lives on this stack frame for the call; a
    // timeout of 0 never blocks.
    let n = unsafe { libc::poll(&mut p, 1, 0) };
    n < 0 || (n == 1 && p.revents & (libc::POLLHUP | libc::POLLERR) != 0)
}

/// Inner session → channel, until the inner session shuts down its
/// sending side (its end, after a graceful close's DISCONNECT) or either
/// side fails.
async fn to_channel(reactor: &Rc<Reactor>, channel: &ChannelInner, fd: &Rc<SharedFd>) {
    let mut buf = vec![0u8; RELAY_BUF];
    loop {
        let done = reactor.recv_awaited(fd, buf, RELAY_BUF).await;
        let n = match done.result() {
            Ok(n) => n as usize,
            Err(_) => 0,
        };
        buf = done.resources.buf;
        if n == 0 {
            break;
        }
        let mut off = 0;
        while off < n {
            match poll_fn(|cx| channel.poll_write(cx, &buf[off..n])).await {
                Ok(k) => off += k,
                Err(_) => return,
            }
        }
        // A write the window or a key exchange held back is only a copy
        // until driven: drive it before waiting on the socket again, or a
        // request the inner session waits on would sit here.
        if poll_fn(|cx| channel.poll_drive_pending(cx)).await.is_err() {
            return;
        }
    }
    // What the inner session sent last (its DISCONNECT) leaves before the EOF.
    let _ = poll_fn(|cx| channel.poll_send_eof(cx)).await;
}

/// Channel → inner session. Returns `true` at the channel's EOF, `false`
/// when either side failed.
async fn from_channel(reactor: &Rc<Reactor>, channel: &ChannelInner, fd: &Rc<SharedFd>) -> bool {
    let mut buf = vec![0u8; RELAY_BUF];
    loop {
        let n = match poll_fn(|cx| channel.poll_read_into(cx, 0, &mut buf)).await {
            Ok(0) => return true,
            Ok(n) => n,
            Err(_) => return false,
        };
        let mut off = 0;
        while off < n {
            // The op sends from `buf[off..]`; only the first `n` bytes count.
            buf.truncate(n);
            let done = reactor.send_awaited(fd, buf, off).await;
            let sent = done.result();
            buf = done.resources.buf;
            match sent {
                Ok(k) if k > 0 => off += k as usize,
                _ => return false,
            }
        }
        buf.resize(RELAY_BUF, 0);
    }
}
