//! A fault-injecting TCP proxy between a client and the real sshd fixture.
//!
//! It runs on a thread of its own (its own tokio runtime, plain sockets, no
//! io_uring), so its timing is independent of the client under test. Each
//! accepted connection is forwarded to the upstream address; the plan set
//! before the connection (or changed while it runs) says what to do in
//! each direction once a byte offset is reached.
//!
//! Offsets count from the start of the connection, or from the client's
//! KEXINIT of a rekey (see [`Rule::from_rekey`]): the packets of a
//! connection are encrypted by then, so the proxy recognises that KEXINIT
//! by its size, the first large chunk from the client after the point set
//! by [`FaultProxy::watch_rekeys`] (during a download the client sends only
//! small window adjustments and keepalives).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};

/// Which way bytes flow.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dir {
    /// From the server to the client.
    ToClient,
    /// From the client to the server.
    ToServer,
}

/// What happens when a direction reaches its trigger offset.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Fault {
    /// Forward normally.
    None,
    /// Stop forwarding; keep both sockets open.
    Stall,
    /// Close both connections cleanly (FIN both ways).
    Close,
    /// Shut down the write side towards the receiver only (half-close).
    HalfClose,
    /// Reset both connections (`SO_LINGER` 0, then close).
    Reset,
    /// Deliver a part of the bytes after the offset, then close: a packet
    /// cut in the middle.
    Truncate,
    /// Flip one bit of the byte at the offset, then forward normally.
    FlipByte,
    /// Insert these bytes at the offset, then forward normally.
    Garbage(Vec<u8>),
    /// Delay every chunk after the offset by this long.
    Delay(Duration),
    /// Forward at most this many bytes per second after the offset.
    RateLimit(u64),
}

/// A fault at a byte offset of one direction.
#[derive(Clone, Debug)]
pub struct Rule {
    /// The direction it applies to.
    pub dir: Dir,
    /// Bytes forwarded in that direction before it fires.
    pub at: u64,
    /// What happens.
    pub fault: Fault,
    /// `at` counts from the client's KEXINIT of the first rekey instead of
    /// the start: towards the server from the first byte of that KEXINIT,
    /// towards the client from the end of the server's KEXINIT (the
    /// server sends nothing else until the client answers it).
    pub from_rekey: bool,
}

/// A chunk from the client at least this long, after the watched point,
/// is its KEXINIT (libssh2's is ~1 KB; a window adjustment or a keepalive
/// is under 100 bytes).
pub const KEXINIT_MIN: usize = 400;

/// Per-connection positions, shared by its two pumps.
#[derive(Default)]
struct Conn {
    /// Bytes forwarded so far, per direction.
    pos: [AtomicU64; 2],
    /// Both directions' positions when the client's first rekey KEXINIT
    /// was seen.
    rekey: Mutex<Option<[u64; 2]>>,
    /// Bytes towards the server after which a large chunk is a rekey.
    watch_after: u64,
}

#[derive(Default)]
struct Plan {
    rules: Vec<Rule>,
    /// Connections accepted so far.
    accepted: usize,
    /// Bytes forwarded per direction, over all connections.
    forwarded: [u64; 2],
    /// Faults that fired.
    fired: Vec<Fault>,
    /// Sockets the proxy holds open (the listener included).
    sockets: usize,
    /// See [`FaultProxy::watch_rekeys`].
    watch_after: Option<u64>,
    /// Client KEXINITs of rekeys seen, over all connections.
    rekeys: usize,
    /// Per connection that rekeyed, the positions anchoring `from_rekey`.
    anchors: Vec<[u64; 2]>,
}

/// The proxy; stops with the process (its thread is detached).
pub struct FaultProxy {
    addr: SocketAddr,
    plan: Arc<Mutex<Plan>>,
}

impl FaultProxy {
    /// A proxy on 127.0.0.1 (any free port) to `upstream`.
    pub fn start(upstream: SocketAddr) -> FaultProxy {
        let plan = Arc::new(Mutex::new(Plan::default()));
        let (tx, rx) = std::sync::mpsc::channel();
        let p = plan.clone();
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("proxy runtime");
            rt.block_on(async move {
                let l = TcpListener::bind("127.0.0.1:0").await.expect("proxy bind");
                p.lock().unwrap().sockets = 1;
                tx.send(l.local_addr().unwrap()).unwrap();
                loop {
                    let Ok((client, _)) = l.accept().await else {
                        continue;
                    };
                    let p = p.clone();
                    p.lock().unwrap().sockets += 1;
                    tokio::spawn(async move {
                        let Ok(server) = TcpStream::connect(upstream).await else {
                            p.lock().unwrap().sockets -= 1;
                            return;
                        };
                        let (rules, watch_after) = {
                            let mut g = p.lock().unwrap();
                            g.accepted += 1;
                            g.sockets += 1;
                            (g.rules.clone(), g.watch_after.unwrap_or(u64::MAX))
                        };
                        serve(client, server, rules, watch_after, p.clone()).await;
                        p.lock().unwrap().sockets -= 2;
                    });
                }
            });
        });
        let addr = rx.recv().expect("proxy address");
        FaultProxy { addr, plan }
    }

    /// Where clients connect.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The faults for connections accepted from now on.
    pub fn set(&self, rules: Vec<Rule>) {
        self.plan.lock().unwrap().rules = rules;
    }

    /// Connections accepted so far.
    pub fn accepted(&self) -> usize {
        self.plan.lock().unwrap().accepted
    }

    /// Bytes forwarded towards the client and towards the server.
    pub fn forwarded(&self) -> (u64, u64) {
        let g = self.plan.lock().unwrap();
        (g.forwarded[0], g.forwarded[1])
    }

    /// Sockets the proxy holds open now (they count in this process's fds).
    pub fn sockets(&self) -> usize {
        self.plan.lock().unwrap().sockets
    }

    /// The faults that fired so far.
    pub fn fired(&self) -> Vec<Fault> {
        self.plan.lock().unwrap().fired.clone()
    }

    /// For connections accepted from now on: a chunk of at least
    /// [`KEXINIT_MIN`] bytes from the client, once `after` bytes went
    /// towards the server, is the client's KEXINIT of a rekey (counted in
    /// [`FaultProxy::rekeys`], the first one anchors `from_rekey` rules).
    pub fn watch_rekeys(&self, after: Option<u64>) {
        self.plan.lock().unwrap().watch_after = after;
    }

    /// Client KEXINITs of rekeys seen so far (see [`FaultProxy::watch_rekeys`]).
    pub fn rekeys(&self) -> usize {
        self.plan.lock().unwrap().rekeys
    }

    /// Per connection that rekeyed, the bytes forwarded towards the client
    /// and towards the server when the client's first rekey KEXINIT came.
    pub fn rekey_anchors(&self) -> Vec<[u64; 2]> {
        self.plan.lock().unwrap().anchors.clone()
    }
}

fn reset(s: &TcpStream) {
    // A zero linger never blocks: the close sends RST at once.
    #[allow(deprecated)]
    let _ = s.set_linger(Some(Duration::ZERO));
}

async fn serve(
    client: TcpStream,
    server: TcpStream,
    rules: Vec<Rule>,
    watch_after: u64,
    plan: Arc<Mutex<Plan>>,
) {
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    let client = Arc::new(client);
    let server = Arc::new(server);
    let rule = |d: Dir| {
        rules.iter().find(|r| r.dir == d).cloned().unwrap_or(Rule {
            dir: d,
            at: u64::MAX,
            fault: Fault::None,
            from_rekey: false,
        })
    };
    let conn = Arc::new(Conn {
        watch_after,
        ..Conn::default()
    });
    let (stop_tx, _) = tokio::sync::broadcast::channel::<Fault>(4);
    let a = pump(
        server.clone(),
        client.clone(),
        rule(Dir::ToClient),
        0,
        conn.clone(),
        plan.clone(),
        stop_tx.clone(),
    );
    let b = pump(
        client.clone(),
        server.clone(),
        rule(Dir::ToServer),
        1,
        conn.clone(),
        plan.clone(),
        stop_tx.clone(),
    );
    tokio::join!(a, b);
}

/// Copies `from` → `to`, applying `rule`. Either direction may end both
/// (close, reset) through `stop`.
async fn pump(
    from: Arc<TcpStream>,
    to: Arc<TcpStream>,
    rule: Rule,
    index: usize,
    conn: Arc<Conn>,
    plan: Arc<Mutex<Plan>>,
    stop: tokio::sync::broadcast::Sender<Fault>,
) {
    let mut stopped = stop.subscribe();
    let mut buf = vec![0u8; 64 * 1024];
    let mut pos = 0u64;
    let mut fired = false;
    let mut slow: Option<Fault> = None;
    loop {
        let n = tokio::select! {
            r = readable_read(&from, &mut buf) => match r {
                Some(0) | None => {
                    let _ = shutdown_write(&to);
                    return;
                }
                Some(n) => n,
            },
            f = stopped.recv() => {
                if let Ok(Fault::Reset) = f {
                    reset(&from);
                    reset(&to);
                }
                // Both handles go when both pumps return: the close sends
                // FIN, or RST after `SO_LINGER` 0.
                return;
            }
        };
        let mut chunk = buf[..n].to_vec();
        if index == 1 && pos >= conn.watch_after && n >= KEXINIT_MIN {
            let mut r = conn.rekey.lock().unwrap();
            let mut g = plan.lock().unwrap();
            if r.is_none() {
                let a = [conn.pos[0].load(Ordering::SeqCst), pos];
                *r = Some(a);
                g.anchors.push(a);
            }
            g.rekeys += 1;
        }
        // The rule's offset in this direction's stream, once known.
        let at = if rule.from_rekey {
            conn.rekey
                .lock()
                .unwrap()
                .map_or(u64::MAX, |r| r[index].saturating_add(rule.at))
        } else {
            rule.at
        };
        if !fired && pos + n as u64 > at {
            fired = true;
            plan.lock().unwrap().fired.push(rule.fault.clone());
            let k = (at - pos.min(at)) as usize;
            match &rule.fault {
                Fault::None => {}
                Fault::Stall => {
                    write_all(&to, &chunk[..k]).await;
                    std::future::pending::<()>().await;
                }
                Fault::Close => {
                    write_all(&to, &chunk[..k]).await;
                    let _ = stop.send(Fault::Close);
                    return;
                }
                Fault::HalfClose => {
                    write_all(&to, &chunk[..k]).await;
                    let _ = shutdown_write(&to);
                    std::future::pending::<()>().await;
                }
                Fault::Reset => {
                    write_all(&to, &chunk[..k]).await;
                    reset(&from);
                    reset(&to);
                    let _ = stop.send(Fault::Reset);
                    return;
                }
                Fault::Truncate => {
                    let cut = (k + 7).min(chunk.len());
                    write_all(&to, &chunk[..cut]).await;
                    let _ = stop.send(Fault::Close);
                    return;
                }
                Fault::FlipByte => chunk[k] ^= 0x20,
                Fault::Garbage(g) => {
                    let mut c = chunk[..k].to_vec();
                    c.extend_from_slice(g);
                    c.extend_from_slice(&chunk[k..]);
                    chunk = c;
                }
                Fault::Delay(_) | Fault::RateLimit(_) => slow = Some(rule.fault.clone()),
            }
        }
        pos += n as u64;
        conn.pos[index].store(pos, Ordering::SeqCst);
        plan.lock().unwrap().forwarded[index] += n as u64;
        match &slow {
            Some(Fault::Delay(d)) => tokio::time::sleep(*d).await,
            Some(Fault::RateLimit(bps)) => {
                tokio::time::sleep(Duration::from_secs_f64(chunk.len() as f64 / *bps as f64)).await
            }
            _ => {}
        }
        if !write_all(&to, &chunk).await {
            return;
        }
    }
}

async fn readable_read(s: &TcpStream, buf: &mut [u8]) -> Option<usize> {
    loop {
        s.readable().await.ok()?;
        match s.try_read(buf) {
            Ok(n) => return Some(n),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
            Err(_) => return None,
        }
    }
}

async fn write_all(s: &TcpStream, mut data: &[u8]) -> bool {
    while !data.is_empty() {
        if s.writable().await.is_err() {
            return false;
        }
        match s.try_write(data) {
            Ok(n) => data = &data[n..],
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
            Err(_) => return false,
        }
    }
    true
}

fn shutdown_write(s: &TcpStream) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    // SAFETY: shutdown(2) on a socket we own; no memory is involved.
    let rc = unsafe { shutdown(s.as_raw_fd(), 1) };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

unsafe extern "C" {
    fn shutdown(fd: i32, how: i32) -> i32;
}
