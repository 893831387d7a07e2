//! When a session's receives are batched, and how large they are: the
//! policy alone, apart from the IO, so that it is testable without a ring.
//!
//! A batched receive (`MSG_WAITALL` with a linked timeout) waits up to
//! `wait` for its buffer to fill, so one completion and one wake-up of the
//! thread carry a burst of packets. Its cost is the wait, paid when the
//! stream pauses while a batch is open: at a burst's end, or on every
//! reply when the server answers requests. A stream that flows fills its
//! batches; a batch that ends by its wait with less than half its buffer
//! (or with less than a full smallest batch) is a pause. Each pause makes
//! the next batching wait for more plain receives first, twice as many as
//! the last time, so request/response traffic pays the wait a number of
//! times that grows with the logarithm of its receives, not with them; a
//! run of full batches halves that count again.

use std::time::Duration;

use super::{RECV_MAX, RECV_MIN};

/// A plain receive of at least this many bytes means data streams in:
/// batching may start.
pub(crate) const BATCH_ENTER: usize = 16 * 1024;

/// The smallest batched receive: a batch that cannot fill this much
/// within the wait is a pause.
pub(crate) const BATCH_MIN: usize = 64 * 1024;

/// Plain receives before batching may start again after the first pause.
const FIRST_PENALTY: u32 = 4;

/// The most plain receives a pause can impose.
const MAX_PENALTY: u32 = 4096;

/// Full batches in a row that halve the penalty.
const DECAY_RUN: u32 = 16;

/// One session's batching state.
#[derive(Debug, Clone, Copy)]
pub(crate) struct BatchPolicy {
    /// How long a batch may wait; `None`: never batch.
    wait: Option<Duration>,
    /// The largest batch (a quarter of the channel window at most, so the
    /// server never waits for a window adjust held inside a batch).
    max: usize,
    /// The next receive is batched.
    batching: bool,
    /// Plain receives still to pass before batching may start.
    skip: u32,
    /// What the next pause sets `skip` to.
    penalty: u32,
    /// Full batches in a row.
    full_run: u32,
    /// Batches that ended in a pause, for the session's life.
    pauses: u64,
}

impl Default for BatchPolicy {
    fn default() -> Self {
        BatchPolicy {
            wait: None,
            max: RECV_MAX,
            batching: false,
            skip: 0,
            penalty: FIRST_PENALTY,
            full_run: 0,
            pauses: 0,
        }
    }
}

impl BatchPolicy {
    /// Batch with at most `wait` and at most `max` bytes; `None`, a zero
    /// wait or a `max` below [`BATCH_MIN`] turn batching off.
    pub fn set(&mut self, wait: Option<Duration>, max: usize) {
        let max = max.min(RECV_MAX);
        self.wait = wait.filter(|w| !w.is_zero() && max >= BATCH_MIN);
        self.max = max;
        if self.wait.is_none() {
            self.batching = false;
        }
    }

    /// The wait of the next receive, if it is batched.
    pub fn next_wait(&self) -> Option<Duration> {
        self.wait.filter(|_| self.batching)
    }

    /// Batches that ended in a pause so far.
    pub fn pauses(&self) -> u64 {
        self.pauses
    }

    /// After a plain receive that asked for `size` and got `n` bytes: the
    /// size of the next receive.
    pub fn after_plain(&mut self, n: usize, size: usize) -> usize {
        let mut next = if n >= size {
            (size * 2).min(RECV_MAX)
        } else if n < size / 4 {
            (size / 2).max(RECV_MIN)
        } else {
            size
        };
        if self.wait.is_some() {
            if self.skip > 0 {
                self.skip -= 1;
            } else if n >= BATCH_ENTER {
                self.batching = true;
                next = next.clamp(BATCH_MIN, self.max);
            }
        }
        next
    }

    /// After a batched receive that asked for `size` and got `n` bytes
    /// (0: its wait ran out before anything arrived): the size of the next
    /// receive.
    pub fn after_batch(&mut self, n: usize, size: usize) -> usize {
        if n >= size {
            self.full_run += 1;
            if self.full_run >= DECAY_RUN {
                self.full_run = 0;
                self.penalty = (self.penalty / 2).max(FIRST_PENALTY);
            }
            return (size * 2).min(self.max);
        }
        self.full_run = 0;
        if n >= size / 2 && size > BATCH_MIN {
            // Still flowing, a little slower than this batch: smaller ones.
            return size / 2;
        }
        // A pause: receive packet by packet, and wait longer each time
        // before batching again.
        self.pauses += 1;
        self.batching = false;
        self.skip = self.penalty;
        self.penalty = (self.penalty * 2).min(MAX_PENALTY);
        (size / 2).max(RECV_MIN)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const WAIT: Option<Duration> = Some(Duration::from_millis(1));

    fn on() -> BatchPolicy {
        let mut p = BatchPolicy::default();
        p.set(WAIT, RECV_MAX);
        p
    }

    #[test]
    fn off_unless_a_wait_is_set() {
        let mut p = BatchPolicy::default();
        assert_eq!(p.after_plain(32 * 1024, 32 * 1024), 64 * 1024);
        assert_eq!(p.next_wait(), None);
        p.set(Some(Duration::ZERO), RECV_MAX);
        p.after_plain(32 * 1024, 32 * 1024);
        assert_eq!(p.next_wait(), None);
    }

    #[test]
    fn a_window_too_small_for_a_batch_turns_batching_off() {
        let mut p = BatchPolicy::default();
        p.set(WAIT, BATCH_MIN - 1);
        p.after_plain(32 * 1024, 32 * 1024);
        assert_eq!(p.next_wait(), None);
    }

    #[test]
    fn a_stream_is_batched_and_its_batches_grow_to_the_largest() {
        let mut p = on();
        let mut size = p.after_plain(20 * 1024, 32 * 1024);
        assert_eq!(p.next_wait(), WAIT);
        assert_eq!(size, BATCH_MIN);
        for _ in 0..10 {
            size = p.after_batch(size, size);
            assert_eq!(p.next_wait(), WAIT);
        }
        assert_eq!(size, RECV_MAX);
        assert_eq!(p.pauses(), 0);
    }

    #[test]
    fn batches_are_capped_by_the_window() {
        let mut p = BatchPolicy::default();
        p.set(WAIT, 128 * 1024);
        let mut size = p.after_plain(20 * 1024, 32 * 1024);
        for _ in 0..5 {
            size = p.after_batch(size, size);
        }
        assert_eq!(size, 128 * 1024);
    }

    #[test]
    fn a_stream_slower_than_its_batch_gets_smaller_batches_not_a_pause() {
        let mut p = on();
        p.after_plain(BATCH_ENTER, 32 * 1024);
        let size = p.after_batch(300 * 1024, RECV_MAX);
        assert_eq!(size, RECV_MAX / 2);
        assert_eq!(p.next_wait(), WAIT);
        assert_eq!(p.pauses(), 0);
    }

    #[test]
    fn replies_to_requests_pay_the_wait_a_logarithmic_number_of_times() {
        // Each reply is two packets (~64 KiB): a plain receive of the
        // first, then a batch that gets the second and waits out the rest.
        let mut p = on();
        let mut size = RECV_MIN;
        let mut batches = 0;
        for _ in 0..10_000 {
            for _ in 0..2 {
                let n = 32 * 1024 + 60;
                size = if p.next_wait().is_some() {
                    batches += 1;
                    p.after_batch(n.min(size), size)
                } else {
                    p.after_plain(n.min(size), size)
                };
            }
        }
        assert!(p.pauses() > 0);
        assert!(
            batches <= 30,
            "{batches} batches waited out over 10,000 replies"
        );
    }

    #[test]
    fn full_batches_forgive_earlier_pauses() {
        let mut p = on();
        for _ in 0..6 {
            p.after_plain(BATCH_ENTER, 32 * 1024);
            while p.next_wait().is_none() {
                p.after_plain(BATCH_ENTER, 32 * 1024);
            }
            p.after_batch(0, BATCH_MIN);
        }
        let raised = p.penalty;
        assert!(raised > FIRST_PENALTY);
        while p.next_wait().is_none() {
            p.after_plain(BATCH_ENTER, 32 * 1024);
        }
        let mut size = BATCH_MIN;
        for _ in 0..DECAY_RUN {
            size = p.after_batch(size, size);
        }
        assert_eq!(p.penalty, raised / 2);
    }
}
