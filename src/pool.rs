//! [`Pool`]: threads that each run a current-thread tokio runtime with its
//! own reactor, for using every core from one process.
//!
//! Sessions, channels and SFTP handles are `!Send`: each lives on the
//! thread whose reactor does its IO. A pool places work on a thread and
//! keeps it there: [`Pool::spawn`] sends a `Send` closure to the thread
//! with the fewest live tasks, the closure builds the `!Send` future there,
//! and a `Send` [`JoinHandle`] brings back its output (or its panic).
//! Nothing crosses threads on the hot path. For code that cannot live on a
//! pool thread (tasks of a multi-thread runtime), [`Pool::connect`] gives a
//! `Send` [`SessionHandle`](crate::SessionHandle) instead, at one hop
//! between threads per call.
//!
//! [`Pool::shutdown`] (and dropping the pool) drops every task on its own
//! thread, so each session torn down there keeps the usual Drop
//! guarantees; the thread's reactor reaps the cancelled ops as it exits.

use std::any::Any;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::thread::JoinHandle as ThreadHandle;

use tokio::sync::{mpsc, oneshot};

use crate::error::{Error, InvalidInput, Result};
use crate::reactor::{self, Backend, Stats};

/// A job for a pool thread: builds its future there.
type Job = Box<dyn FnOnce() -> Pin<Box<dyn Future<Output = ()>>> + Send>;

/// What a pool thread is asked to do.
enum Message {
    Run(Job),
    Stats(oneshot::Sender<Option<Stats>>),
}

/// How a [`Pool`] is built.
#[derive(Debug, Clone)]
pub struct PoolConfig {
    threads: usize,
    pin: bool,
    backend: Option<Backend>,
}

impl Default for PoolConfig {
    fn default() -> Self {
        PoolConfig {
            threads: available_cpus().len().max(1),
            pin: false,
            backend: None,
        }
    }
}

impl PoolConfig {
    /// One thread per CPU this process may run on, not pinned, each
    /// reactor choosing its engine as [`reactor::init`] does.
    pub fn new() -> Self {
        Self::default()
    }

    /// The number of threads (at least 1).
    pub fn threads(mut self, n: usize) -> Self {
        self.threads = n;
        self
    }

    /// Pins thread `i` to the `i`-th CPU this process may run on (modulo
    /// their count).
    pub fn pin(mut self, pin: bool) -> Self {
        self.pin = pin;
        self
    }

    /// Runs every thread's reactor on `backend`.
    pub fn backend(mut self, backend: Backend) -> Self {
        self.backend = Some(backend);
        self
    }
}

/// One pool thread, as the pool sees it.
struct Worker {
    tx: mpsc::UnboundedSender<Message>,
    /// Tasks spawned on it and not finished.
    live: Arc<AtomicUsize>,
    thread: Option<ThreadHandle<()>>,
}

/// Threads that each run a current-thread runtime with its own reactor.
///
/// ```no_run
/// use uring_ssh::{Config, Pool, PoolConfig, Session};
///
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let pool = Pool::new(PoolConfig::new())?;
/// let handle = pool.spawn(|| async {
///     let s = Session::connect("127.0.0.1", 22, Config::new()).await?;
///     s.close("bye").await
/// });
/// // From any thread, in any runtime:
/// let rt = tokio::runtime::Builder::new_current_thread().build()?;
/// rt.block_on(handle)??;
/// pool.shutdown();
/// # Ok(())
/// # }
/// ```
pub struct Pool {
    workers: Vec<Worker>,
}

impl std::fmt::Debug for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let live: Vec<usize> = self
            .workers
            .iter()
            .map(|w| w.live.load(Ordering::Relaxed))
            .collect();
        f.debug_struct("Pool").field("live_tasks", &live).finish()
    }
}

/// Why a pool task produced no output.
#[derive(Debug)]
#[non_exhaustive]
pub enum JoinError {
    /// The task panicked; the payload is the panic's.
    Panicked(Box<dyn Any + Send>),
    /// The pool shut down before the task finished; the task was dropped.
    Cancelled,
}

impl std::fmt::Display for JoinError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            JoinError::Panicked(p) => {
                let msg = p
                    .downcast_ref::<&str>()
                    .copied()
                    .or_else(|| p.downcast_ref::<String>().map(String::as_str))
                    .unwrap_or("(not a string)");
                write!(f, "the pool task panicked: {msg}")
            }
            JoinError::Cancelled => f.write_str("the pool shut down before the task finished"),
        }
    }
}

impl std::error::Error for JoinError {}

impl JoinError {
    /// Resumes the task's panic on the caller's thread; a cancelled task
    /// panics with this error's text.
    pub fn resume(self) -> ! {
        match self {
            JoinError::Panicked(p) => std::panic::resume_unwind(p),
            JoinError::Cancelled => panic!("{}", JoinError::Cancelled),
        }
    }
}

/// The output of a task spawned on a [`Pool`]: a `Send` future that any
/// runtime (or none) may await. Dropping it detaches the task.
#[derive(Debug)]
pub struct JoinHandle<T> {
    rx: oneshot::Receiver<std::thread::Result<T>>,
}

impl<T> Future for JoinHandle<T> {
    type Output = std::result::Result<T, JoinError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        Pin::new(&mut self.rx).poll(cx).map(|r| match r {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(panic)) => Err(JoinError::Panicked(panic)),
            Err(_) => Err(JoinError::Cancelled),
        })
    }
}

impl Pool {
    /// Starts the threads; fails if one cannot start its runtime or reactor
    /// (the threads already started are stopped).
    pub fn new(config: PoolConfig) -> Result<Pool> {
        if config.threads == 0 {
            return Err(InvalidInput::Usage("a pool needs at least one thread").into());
        }
        let cpus = available_cpus();
        let mut pool = Pool {
            workers: Vec::with_capacity(config.threads),
        };
        for i in 0..config.threads {
            let cpu = (config.pin && !cpus.is_empty()).then(|| cpus[i % cpus.len()]);
            pool.workers.push(start_worker(i, cpu, config.backend)?);
        }
        Ok(pool)
    }

    /// Threads in the pool.
    pub fn threads(&self) -> usize {
        self.workers.len()
    }

    /// Runs the future `make` builds on the thread with the fewest live
    /// tasks (the first such thread on a tie).
    pub fn spawn<F, Fut, T>(&self, make: F) -> JoinHandle<T>
    where
        F: FnOnce() -> Fut + Send + 'static,
        Fut: Future<Output = T> + 'static,
        T: Send + 'static,
    {
        let i = self
            .workers
            .iter()
            .enumerate()
            .min_by_key(|(_, w)| w.live.load(Ordering::Relaxed))
            .map_or(0, |(i, _)| i);
        self.spawn_on(i, make)
    }

    /// Runs the future `make` builds on thread `thread` (modulo the number
    /// of threads).
    pub fn spawn_on<F, Fut, T>(&self, thread: usize, make: F) -> JoinHandle<T>
    where
        F: FnOnce() -> Fut + Send + 'static,
        Fut: Future<Output = T> + 'static,
        T: Send + 'static,
    {
        let worker = &self.workers[thread % self.workers.len()];
        let (tx, rx) = oneshot::channel();
        let live = worker.live.clone();
        live.fetch_add(1, Ordering::Relaxed);
        let job: Job = Box::new(move || {
            Box::pin(async move {
                // A panic while building the future counts as the task's.
                let out = match std::panic::catch_unwind(std::panic::AssertUnwindSafe(make)) {
                    Ok(fut) => CatchUnwind(Box::pin(fut)).await,
                    Err(panic) => Err(panic),
                };
                let _ = tx.send(out);
                live.fetch_sub(1, Ordering::Relaxed);
            })
        });
        if worker.tx.send(Message::Run(job)).is_err() {
            // The thread is gone: the job (and its sender) is dropped, and
            // the handle reports `Cancelled`.
            worker.live.fetch_sub(1, Ordering::Relaxed);
        }
        JoinHandle { rx }
    }

    /// The reactor counters of every thread, summed.
    pub async fn stats(&self) -> Stats {
        let mut total = Stats::default();
        for w in &self.workers {
            let (tx, rx) = oneshot::channel();
            if w.tx.send(Message::Stats(tx)).is_err() {
                continue;
            }
            if let Ok(Some(s)) = rx.await {
                total = total + s;
            }
        }
        total
    }

    /// Drops every task on its own thread (sessions tear down as on drop)
    /// and joins the threads.
    pub fn shutdown(mut self) {
        self.stop();
    }

    fn stop(&mut self) {
        // Closing every channel first lets the threads stop in parallel.
        for w in &mut self.workers {
            let (closed, _) = mpsc::unbounded_channel();
            w.tx = closed;
        }
        for w in &mut self.workers {
            if let Some(t) = w.thread.take() {
                let _ = t.join();
            }
        }
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Polls a future under `catch_unwind`: its panic becomes its output.
struct CatchUnwind<F>(Pin<Box<F>>);

impl<F: Future> Future for CatchUnwind<F> {
    type Output = std::thread::Result<F::Output>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let fut = self.0.as_mut();
        match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| fut.poll(cx))) {
            Ok(Poll::Pending) => Poll::Pending,
            Ok(Poll::Ready(v)) => Poll::Ready(Ok(v)),
            Err(panic) => Poll::Ready(Err(panic)),
        }
    }
}

/// Starts pool thread `index`, its runtime and its reactor; returns once
/// the reactor runs (or failed to start).
fn start_worker(index: usize, cpu: Option<usize>, backend: Option<Backend>) -> Result<Worker> {
    let (tx, mut rx) = mpsc::unbounded_channel::<Message>();
    let (ready_tx, ready_rx) = std::sync::mpsc::channel::<Result<()>>();
    let thread = std::thread::Builder::new()
        .name(format!("uring-ssh-{index}"))
        .spawn(move || {
            if let Some(cpu) = cpu {
                pin_to(cpu);
            }
            let rt = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    let _ = ready_tx.send(Err(Error::Io(e)));
                    return;
                }
            };
            let local = tokio::task::LocalSet::new();
            let started = local.block_on(&rt, async {
                match backend {
                    Some(b) => reactor::init_with(b).map(|_| ()),
                    None => reactor::init().map(|_| ()),
                }
            });
            let ok = started.is_ok();
            let _ = ready_tx.send(started);
            if !ok {
                return;
            }
            local.block_on(&rt, async {
                while let Some(msg) = rx.recv().await {
                    match msg {
                        Message::Run(job) => {
                            tokio::task::spawn_local(job());
                        }
                        Message::Stats(reply) => {
                            let _ = reply.send(reactor::stats());
                        }
                    }
                }
            });
            // The pool let go: drop every task here, inside the runtime,
            // so sessions tear down on the thread whose reactor they use.
            // The reactor's own teardown at thread exit then reaps the
            // cancelled ops (`reactor::leaked_at_teardown` counts any it
            // could not).
            let _enter = rt.enter();
            drop(local);
        })
        .map_err(Error::Io)?;
    match ready_rx.recv() {
        Ok(Ok(())) => Ok(Worker {
            tx,
            live: Arc::new(AtomicUsize::new(0)),
            thread: Some(thread),
        }),
        Ok(Err(e)) => {
            let _ = thread.join();
            Err(e)
        }
        Err(_) => {
            let _ = thread.join();
            Err(Error::Closed("pool thread"))
        }
    }
}

/// The CPUs this process may run on.
fn available_cpus() -> Vec<usize> {
    // SAFETY: a zeroed cpu_set_t is a valid empty set; the kernel writes at
    // most its size.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        if libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) != 0 {
            return Vec::new();
        }
        (0..libc::CPU_SETSIZE as usize)
            .filter(|&c| libc::CPU_ISSET(c, &set))
            .collect()
    }
}

/// Pins the calling thread to `cpu` (best effort: a refused pin leaves the
/// thread free).
fn pin_to(cpu: usize) {
    // SAFETY: a zeroed cpu_set_t is a valid empty set; `cpu` is below
    // CPU_SETSIZE (it came from `available_cpus`).
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
    }
}
