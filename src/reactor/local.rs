//! Background tasks of a thread's reactor: `!Send` futures polled by the
//! reactor's driver task, so that work such as a relay between two
//! sockets runs without the caller polling anything and without a tokio
//! `LocalSet`.
//!
//! A task's waker may be called from any thread (tokio requires wakers to
//! be `Send + Sync`): it only pushes the task's key onto a mutex-guarded
//! ready list and wakes the driver. The futures themselves never leave
//! the reactor's thread.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Wake, Waker};

use slab::Slab;

type Task = Pin<Box<dyn Future<Output = ()>>>;

/// What wakers share with the driver.
#[derive(Default)]
struct Ready {
    /// Keys of the tasks to poll on the driver's next round.
    keys: Vec<usize>,
    /// The driver task's waker, once it has been polled.
    driver: Option<Waker>,
}

struct TaskWaker {
    key: usize,
    ready: Arc<Mutex<Ready>>,
}

impl Wake for TaskWaker {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        let driver = {
            let mut r = self.ready.lock().unwrap_or_else(|p| p.into_inner());
            r.keys.push(self.key);
            r.driver.clone()
        };
        if let Some(w) = driver {
            w.wake();
        }
    }
}

/// A task and its waker, made once when it is spawned.
struct Entry {
    /// `None` while the task is being polled (it may spawn others then).
    task: Option<Task>,
    waker: Waker,
}

/// The tasks of one reactor.
#[derive(Default)]
pub(super) struct LocalTasks {
    tasks: std::cell::RefCell<Slab<Entry>>,
    ready: Arc<Mutex<Ready>>,
}

impl LocalTasks {
    fn lock(&self) -> std::sync::MutexGuard<'_, Ready> {
        self.ready.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Adds `task`, ready to be polled on the driver's next round.
    pub(super) fn spawn(&self, task: Task) {
        let key = {
            let mut tasks = self.tasks.borrow_mut();
            let slot = tasks.vacant_entry();
            let key = slot.key();
            let waker = Waker::from(Arc::new(TaskWaker {
                key,
                ready: self.ready.clone(),
            }));
            slot.insert(Entry {
                task: Some(task),
                waker,
            });
            key
        };
        self.lock().keys.push(key);
    }

    /// Tells wakers which driver task to wake.
    pub(super) fn set_driver(&self, waker: Option<&Waker>) {
        let mut r = self.lock();
        match (waker, &r.driver) {
            (Some(w), Some(old)) if old.will_wake(w) => {}
            (w, _) => r.driver = w.cloned(),
        }
    }

    /// Whether a task was woken since the last round.
    pub(super) fn has_ready(&self) -> bool {
        !self.lock().keys.is_empty()
    }

    /// Tasks alive.
    pub(super) fn len(&self) -> usize {
        self.tasks.borrow().len()
    }

    /// Polls every task woken since the last round once; returns how many
    /// it polled. A task woken while it runs is polled on the next round.
    pub(super) fn run_ready(&self) -> usize {
        let mut keys = std::mem::take(&mut self.lock().keys);
        keys.sort_unstable();
        keys.dedup();
        let mut polled = 0;
        let mut panic = None;
        for key in keys {
            let taken = match self.tasks.borrow_mut().get_mut(key) {
                Some(e) => e.task.take().map(|t| (t, e.waker.clone())),
                None => None,
            };
            // Gone, or a stale wake of a key reused since: nothing to do
            // (a spurious poll of the new task would be harmless too).
            let Some((mut task, waker)) = taken else {
                continue;
            };
            polled += 1;
            // A panicking task is dropped and, once the others have run,
            // its panic goes on to the driver, as a panicking completion
            // callback's does.
            let done = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                task.as_mut().poll(&mut Context::from_waker(&waker))
            }));
            match done {
                Ok(Poll::Pending) => {
                    if let Some(e) = self.tasks.borrow_mut().get_mut(key) {
                        e.task = Some(task);
                    }
                }
                Ok(Poll::Ready(())) => {
                    self.tasks.borrow_mut().remove(key);
                    // Dropped outside the borrow: its drop may spawn.
                    drop(task);
                }
                Err(p) => {
                    self.tasks.borrow_mut().remove(key);
                    drop(task);
                    panic.get_or_insert(p);
                }
            }
        }
        if let Some(p) = panic {
            std::panic::resume_unwind(p);
        }
        polled
    }

    /// Drops every task (thread teardown): their futures may hold the
    /// reactor, which could then never be dropped.
    pub(super) fn clear(&self) {
        let tasks = std::mem::take(&mut *self.tasks.borrow_mut());
        self.lock().keys.clear();
        // Dropped outside the borrow: a task's drop may spawn or drop others.
        drop(tasks);
        let later = std::mem::take(&mut *self.tasks.borrow_mut());
        drop(later);
    }
}
