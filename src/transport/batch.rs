//! When a session's receives are batched, and how large they are: the
//! policy alone, apart from the IO, so that it is testable without a ring.
//!
//! A batch is many packets taken in one receive, so that one completion
//! and one wake-up of the thread carry a burst. By default
//! ([`BatchMode::Delay`]) the transport waits `wait` on a timer and then
//! receives what the socket holds, sleeping through the wait; as long as
//! receives come back full it goes on at once. The other mode
//! ([`BatchMode::WaitAll`], for measurement) keeps a `MSG_WAITALL`
//! receive with a linked timeout open instead, which the kernel fills
//! packet by packet, waking the thread for each.
//!
//! The cost is the wait, paid when the stream pauses while a batch
//! waits: at a burst's end, or on every reply when the server answers
//! requests. A stream that flows fills its batches; a batch that brings
//! less than half its buffer after its wait (or less than a full smallest
//! batch) is a pause. Each pause makes the next batching wait for more
//! plain receives first, twice as many as the last time, so
//! request/response traffic pays the wait a number of times that grows
//! with the logarithm of its receives, not with them; a run of 16
//! batches without a pause halves that count again.
//!
//! Sessions of one thread wait for their batches on shared timer ticks
//! (`Reactor::at_tick`), so many streaming sessions wake the thread once
//! per tick, not once each. While [`SHARED_TICK_SESSIONS`] or more of the
//! thread's sessions stream, a batch flows as long as it brings
//! [`SHARED_FLOOR`]: each stream may be slow (many sessions share one
//! server), but the thread's wake-ups are what the batches save. Such a
//! stream arrives in bursts (its server shares a core with the others'),
//! so a tick often finds its socket empty: the drain then takes only what
//! is there ([`BatchPolicy::drain_now`]) and the session waits for the
//! next tick, rather than leave a receive armed whose completion would
//! wake the thread between ticks; [`EMPTY_TICKS`] empty ticks in a row
//! are a pause. The price: while they stream, a session of requests whose replies are a
//! packet or two each cannot be told from a slow stream, and pays up to
//! the wait on each reply; once the thread is quiet again it pauses as a
//! lone session does.

use std::time::Duration;

use super::{RECV_MAX, RECV_MIN};

/// A plain receive of at least this many bytes found more than one full
/// packet (32 KiB) waiting: the stream arrives faster than the thread
/// wakes for it, and batching may start. Streams slower than that (many
/// sessions sharing a server) gain nothing from batches and stay out.
pub(crate) const BATCH_ENTER: usize = 48 * 1024;

/// The smallest batched receive: a batch that cannot fill this much
/// within the wait is a pause.
pub(crate) const BATCH_MIN: usize = 64 * 1024;

/// Streaming sessions of a thread from which a small batch still flows.
pub(crate) const SHARED_TICK_SESSIONS: usize = 4;

/// What a batch must bring to flow while the thread has many streams,
/// and what a plain receive must find to start batching then: one full
/// packet. Smaller batches save the thread no wake-up worth their timer.
pub(crate) const SHARED_FLOOR: usize = 32 * 1024;

/// A receive this large counts its session as streaming (see
/// [`SHARED_TICK_SESSIONS`]).
pub(crate) const STREAM_MIN: usize = 8 * 1024;

/// Ticks in a row on which a streaming session among many may find its
/// socket empty before it stops batching (a pause) and waits for data.
pub(crate) const EMPTY_TICKS: u32 = 16;

/// Plain receives before batching may start again after the first pause.
const FIRST_PENALTY: u32 = 4;

/// The most plain receives a pause can impose.
const MAX_PENALTY: u32 = 4096;

/// Batches in a row without a pause that halve the penalty.
const DECAY_RUN: u32 = 16;

/// How a batch is gathered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum BatchMode {
    /// A `MSG_WAITALL` receive with a linked timeout: the kernel copies
    /// each packet as it arrives (waking the thread for its task work).
    WaitAll,
    /// A timer first, then a plain receive of what the socket holds: the
    /// thread sleeps through the wait.
    Delay,
}

/// What the transport does next to receive.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum NextRecv {
    /// A receive of what comes, as soon as it comes.
    Plain,
    /// A `MSG_WAITALL` receive ended by a timeout after this long.
    WaitAll(Duration),
    /// Nothing until a timer of this long fires (then [`NextRecv::Drain`]).
    Delay(Duration),
    /// A receive of what the socket holds, counted as a batch.
    Drain,
}

/// One session's batching state.
#[derive(Debug, Clone, Copy)]
pub(crate) struct BatchPolicy {
    mode: BatchMode,
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
    /// Batches in a row that were not a pause.
    flowing_run: u32,
    /// Batches that ended in a pause, for the session's life.
    pauses: u64,
    /// Batched receives, for the session's life.
    batches: u64,
    /// Delay mode: the last batch filled (the socket may hold more), or
    /// the delay has passed: receive at once.
    drain: bool,
    /// Delay mode: the batch in flight follows a delay (not a full batch).
    delayed: bool,
    /// Sessions of the thread streaming as of the last receive.
    streams: usize,
    /// Delayed drains in a row that found the socket empty.
    empty_ticks: u32,
}

impl Default for BatchPolicy {
    fn default() -> Self {
        BatchPolicy {
            wait: None,
            max: RECV_MAX,
            batching: false,
            skip: 0,
            penalty: FIRST_PENALTY,
            flowing_run: 0,
            pauses: 0,
            batches: 0,
            drain: false,
            delayed: false,
            streams: 0,
            empty_ticks: 0,
            mode: BatchMode::Delay,
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

    /// Gathers batches by `mode`.
    pub fn set_mode(&mut self, mode: BatchMode) {
        self.mode = mode;
    }

    /// The wait of the next receive, if it is batched.
    pub fn next_wait(&self) -> Option<Duration> {
        self.wait.filter(|_| self.batching)
    }

    /// What to do next to receive.
    pub fn next(&self) -> NextRecv {
        match (self.next_wait(), self.mode) {
            (None, _) => NextRecv::Plain,
            (Some(wait), BatchMode::WaitAll) => NextRecv::WaitAll(wait),
            (Some(_), BatchMode::Delay) if self.drain => NextRecv::Drain,
            (Some(wait), BatchMode::Delay) => NextRecv::Delay(wait),
        }
    }

    /// The delay of [`NextRecv::Delay`] has passed.
    pub fn delay_passed(&mut self) {
        self.drain = true;
        self.delayed = true;
    }

    /// `streams` of the thread's sessions are streaming (for the receive
    /// that just completed).
    pub fn set_streams(&mut self, streams: usize) {
        self.streams = streams;
    }

    /// Many sessions of the thread stream: small batches are worth it.
    fn shared(&self) -> bool {
        self.streams >= SHARED_TICK_SESSIONS
    }

    /// A drain takes only what the socket holds, never waiting for more:
    /// while many sessions stream, the thread wakes for the next tick
    /// anyway, and a receive left waiting would wake it once more.
    pub fn drain_now(&self) -> bool {
        self.mode == BatchMode::Delay && self.shared()
    }

    /// A drain of [`Self::drain_now`] found the socket empty: the next
    /// tick drains again, unless that happened [`EMPTY_TICKS`] times in a
    /// row (a pause: the stream stopped). The count of streams is the one
    /// of the last receive that brought bytes, so a session may go on
    /// draining for those ticks after the others stopped.
    pub fn after_empty(&mut self) {
        self.drain = false;
        self.delayed = false;
        self.empty_ticks += 1;
        if self.empty_ticks >= EMPTY_TICKS {
            self.pause();
        }
    }

    /// Batches that ended in a pause so far.
    pub fn pauses(&self) -> u64 {
        self.pauses
    }

    /// Batched receives so far.
    pub fn batches(&self) -> u64 {
        self.batches
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
            } else if n >= BATCH_ENTER || (self.shared() && n >= SHARED_FLOOR) {
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
        self.batches += 1;
        self.empty_ticks = 0;
        self.drain = n >= size;
        let delayed = std::mem::take(&mut self.delayed);
        if self.mode == BatchMode::Delay && !delayed && n < size {
            // The rest of what a full batch left in the socket: wait for
            // the next batch.
            return size;
        }
        let full = n >= size;
        // Not full but more than half: still flowing, a little slower
        // than this batch, so smaller ones. On a shared tick, enough to
        // be worth the thread's wake-up.
        let flowing = !full
            && ((n >= size / 2 && size > BATCH_MIN)
                || (self.shared() && delayed && n >= SHARED_FLOOR));
        if full || flowing {
            self.flowing_run += 1;
            if self.flowing_run >= DECAY_RUN {
                self.flowing_run = 0;
                self.penalty = (self.penalty / 2).max(FIRST_PENALTY);
            }
            return if full {
                (size * 2).min(self.max)
            } else {
                (size / 2).max(BATCH_MIN)
            };
        }
        self.pause();
        (size / 2).max(RECV_MIN)
    }

    /// A pause: receive packet by packet, and wait longer each time
    /// before batching again.
    fn pause(&mut self) {
        self.flowing_run = 0;
        self.empty_ticks = 0;
        self.pauses += 1;
        self.batching = false;
        self.skip = self.penalty;
        self.penalty = (self.penalty * 2).min(MAX_PENALTY);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const WAIT: Duration = Duration::from_millis(1);

    fn on(mode: BatchMode) -> BatchPolicy {
        let mut p = BatchPolicy::default();
        p.set_mode(mode);
        p.set(Some(WAIT), RECV_MAX);
        p
    }

    /// A receiver in front of a socket: each step is one receive of what
    /// `ready(size, after_wait)` says the socket holds, as the transport
    /// does it. Returns the next size and whether the receive was batched.
    fn receive(
        p: &mut BatchPolicy,
        size: usize,
        ready: &mut impl FnMut(usize, bool) -> usize,
    ) -> (usize, bool) {
        match p.next() {
            NextRecv::Plain => (p.after_plain(ready(size, false).min(size), size), false),
            NextRecv::WaitAll(w) => {
                assert_eq!(w, WAIT);
                (p.after_batch(ready(size, true).min(size), size), true)
            }
            NextRecv::Delay(w) => {
                assert_eq!(w, WAIT);
                p.delay_passed();
                assert_eq!(p.next(), NextRecv::Drain);
                drain(p, size, ready(size, true))
            }
            NextRecv::Drain => drain(p, size, ready(size, false)),
        }
    }

    /// A drain of what the socket holds, `n` bytes: one that does not wait
    /// ([`BatchPolicy::drain_now`]) finds an empty socket as `EAGAIN`.
    fn drain(p: &mut BatchPolicy, size: usize, n: usize) -> (usize, bool) {
        if n == 0 && p.drain_now() {
            p.after_empty();
            (size, true)
        } else {
            (p.after_batch(n.min(size), size), true)
        }
    }

    #[test]
    fn off_unless_a_wait_is_set() {
        let mut p = BatchPolicy::default();
        assert_eq!(p.after_plain(32 * 1024, 32 * 1024), 64 * 1024);
        assert_eq!(p.next(), NextRecv::Plain);
        p.set(Some(Duration::ZERO), RECV_MAX);
        p.after_plain(32 * 1024, 32 * 1024);
        assert_eq!(p.next(), NextRecv::Plain);
    }

    #[test]
    fn a_window_too_small_for_a_batch_turns_batching_off() {
        let mut p = BatchPolicy::default();
        p.set(Some(WAIT), BATCH_MIN - 1);
        p.after_plain(32 * 1024, 32 * 1024);
        assert_eq!(p.next(), NextRecv::Plain);
    }

    #[test]
    fn a_fast_stream_is_batched_up_to_the_largest_batch_without_waiting() {
        for mode in [BatchMode::Delay, BatchMode::WaitAll] {
            let mut p = on(mode);
            let mut size = p.after_plain(BATCH_ENTER, 64 * 1024);
            assert_eq!(size, BATCH_MIN);
            // The socket always holds more than asked for.
            for _ in 0..10 {
                size = receive(&mut p, size, &mut |_, _| usize::MAX).0;
            }
            assert_eq!(size, RECV_MAX, "{mode:?}");
            assert_eq!(p.pauses(), 0);
            assert_eq!(p.batches(), 10);
            if mode == BatchMode::Delay {
                assert_eq!(p.next(), NextRecv::Drain, "full batches: no wait");
            }
        }
    }

    #[test]
    fn a_delayed_batch_waits_again_once_the_socket_is_drained() {
        let mut p = on(BatchMode::Delay);
        let size = p.after_plain(BATCH_ENTER, 64 * 1024);
        assert_eq!(p.next(), NextRecv::Delay(WAIT));
        p.delay_passed();
        let size = p.after_batch(size, size);
        assert_eq!(p.next(), NextRecv::Drain);
        // What a full batch left behind is little: no pause, wait again.
        let size = p.after_batch(1000, size);
        assert_eq!(p.next(), NextRecv::Delay(WAIT));
        assert_eq!(size, 2 * BATCH_MIN);
        assert_eq!(p.pauses(), 0);
    }

    #[test]
    fn batches_are_capped_by_the_window() {
        let mut p = BatchPolicy::default();
        p.set(Some(WAIT), 128 * 1024);
        let mut size = p.after_plain(BATCH_ENTER, 64 * 1024);
        for _ in 0..5 {
            size = receive(&mut p, size, &mut |_, _| usize::MAX).0;
        }
        assert_eq!(size, 128 * 1024);
    }

    #[test]
    fn shrinking_batches_never_go_below_the_smallest() {
        // A quarter of a window that is no power of two.
        let mut p = BatchPolicy::default();
        p.set(Some(WAIT), 250_000);
        p.after_plain(BATCH_ENTER, 64 * 1024);
        let mut size = 250_000;
        for _ in 0..2 {
            p.delay_passed();
            size = p.after_batch(size * 3 / 4, size);
        }
        assert_eq!(size, BATCH_MIN);
        assert_eq!(p.pauses(), 0);
    }

    #[test]
    fn a_stream_slower_than_its_batch_gets_smaller_batches_not_a_pause() {
        for mode in [BatchMode::Delay, BatchMode::WaitAll] {
            let mut p = on(mode);
            let mut size = p.after_plain(BATCH_ENTER, 32 * 1024);
            // 300 KiB arrive per wait.
            for _ in 0..10 {
                size = receive(&mut p, size, &mut |_, waited| {
                    if waited { 300 * 1024 } else { 0 }
                })
                .0;
            }
            assert_eq!(size, 256 * 1024, "{mode:?}");
            assert_ne!(p.next(), NextRecv::Plain);
            assert_eq!(p.pauses(), 0);
        }
    }

    #[test]
    fn replies_to_requests_pay_the_wait_a_logarithmic_number_of_times() {
        // Each reply is three packets (~96 KiB): a receive finds the
        // first two together, the third is there for the next receive, and
        // then nothing comes until the next request.
        const PACKET: usize = 32 * 1024 + 60;
        for mode in [BatchMode::Delay, BatchMode::WaitAll] {
            let mut p = on(mode);
            let mut size = RECV_MAX;
            for _ in 0..10_000 {
                let mut left = 3 * PACKET;
                while left > 0 {
                    let (next, _) = receive(&mut p, size, &mut |size, _| {
                        let chunk = if left == 3 * PACKET {
                            2 * PACKET
                        } else {
                            PACKET
                        };
                        let n = left.min(chunk).min(size);
                        left -= n;
                        n
                    });
                    size = next;
                }
            }
            assert!(p.pauses() > 0, "{mode:?}");
            assert!(
                p.pauses() <= 30,
                "{mode:?}: {} batches waited out over 10,000 replies",
                p.pauses()
            );
        }
    }

    /// 40 KiB per wait: a stream slower than the smallest batch. Alone on
    /// its thread it is no batching stream; among many streams of the
    /// thread, its small batches flow, and it enters at a smaller receive.
    #[test]
    fn a_slow_stream_batches_only_among_many() {
        for (streams, batching) in [(1, false), (SHARED_TICK_SESSIONS, true), (64, true)] {
            let mut p = on(BatchMode::Delay);
            p.set_streams(streams);
            let mut size = p.after_plain(SHARED_FLOOR, 32 * 1024);
            let mut batched = 0;
            for _ in 0..100 {
                let (next, b) = receive(&mut p, size, &mut |_, waited| {
                    if waited { 40 * 1024 } else { 0 }
                });
                size = next;
                batched += b as u32;
            }
            if batching {
                assert_eq!(p.pauses(), 0, "{streams} streams");
                assert_eq!(batched, 100, "{streams} streams");
                assert_eq!(size, BATCH_MIN);
            } else {
                assert_eq!(batched, 0, "{streams} stream: entered below 48 KiB");
            }
        }
        // Among many streams too, a batch under a full packet is a pause.
        let mut p = on(BatchMode::Delay);
        p.set_streams(64);
        let mut size = p.after_plain(SHARED_FLOOR, 32 * 1024);
        for _ in 0..100 {
            size = receive(&mut p, size, &mut |_, w| if w { 16 * 1024 } else { 0 }).0;
        }
        assert!(p.pauses() > 0);
        // Batching alone, then the thread gets busy: the small batches
        // that were pauses now flow.
        let mut p = on(BatchMode::Delay);
        let size = p.after_plain(BATCH_ENTER, 32 * 1024);
        p.set_streams(1);
        receive(&mut p, size, &mut |_, w| if w { 40 * 1024 } else { 0 });
        assert_eq!(p.pauses(), 1);
        while p.next() == NextRecv::Plain {
            p.after_plain(BATCH_ENTER, 32 * 1024);
        }
        p.set_streams(8);
        receive(&mut p, BATCH_MIN, &mut |_, w| if w { 40 * 1024 } else { 0 });
        assert_eq!(p.pauses(), 1);
        assert_ne!(p.next(), NextRecv::Plain);
    }

    /// Among many streams a session's server sends in bursts (it shares a
    /// core with the others' servers): ticks that find the socket empty
    /// keep the session batching, up to [`EMPTY_TICKS`] in a row. Alone,
    /// or gathering the `MSG_WAITALL` way, drains wait as before.
    #[test]
    fn among_many_streams_empty_ticks_wait_for_the_next_tick() {
        let mut p = on(BatchMode::Delay);
        p.set_streams(64);
        assert!(p.drain_now());
        let mut size = p.after_plain(SHARED_FLOOR, 32 * 1024);
        let mut tick = 0;
        for _ in 0..200 {
            let (next, batched) = receive(&mut p, size, &mut |_, waited| {
                tick += waited as u32;
                // A burst every sixth tick, nothing in between.
                if waited && tick % (EMPTY_TICKS / 2 - 2) == 0 {
                    40 * 1024
                } else {
                    0
                }
            });
            assert!(batched, "a receive after {tick} ticks was not batched");
            size = next;
        }
        assert_eq!(p.pauses(), 0);
        assert!(p.batches() >= 200 / (EMPTY_TICKS / 2 - 2) as u64);
        size = receive(&mut p, size, &mut |_, _| 40 * 1024).0;
        // The stream stops: after EMPTY_TICKS empty ticks in a row, a pause.
        for i in 1..=EMPTY_TICKS {
            assert_ne!(p.next(), NextRecv::Plain, "paused after {i} empty ticks");
            receive(&mut p, size, &mut |_, _| 0);
        }
        assert_eq!(p.pauses(), 1);
        assert_eq!(p.next(), NextRecv::Plain);
        // Alone, or with `MSG_WAITALL`, a drain waits for its bytes.
        p.set_streams(1);
        assert!(!p.drain_now());
        let mut p = on(BatchMode::WaitAll);
        p.set_streams(64);
        assert!(!p.drain_now());
    }

    /// One 33 KiB reply per request: among many streams each reply is a
    /// flowing batch (the wait is paid); once the others stop, the next
    /// one is a pause and the session receives packet by packet again.
    #[test]
    fn replies_pay_the_wait_among_many_streams_only_while_they_stream() {
        let mut p = on(BatchMode::Delay);
        p.set_streams(64);
        let mut size = p.after_plain(SHARED_FLOOR, 32 * 1024);
        for _ in 0..50 {
            let (next, batched) = receive(&mut p, size, &mut |_, w| if w { 33 * 1024 } else { 0 });
            assert!(batched);
            size = next;
        }
        assert_eq!(p.pauses(), 0);
        p.set_streams(1);
        receive(&mut p, size, &mut |_, w| if w { 33 * 1024 } else { 0 });
        assert_eq!(p.pauses(), 1);
        assert_eq!(p.next(), NextRecv::Plain);
    }

    #[test]
    fn batches_without_a_pause_forgive_earlier_pauses() {
        let mut p = on(BatchMode::WaitAll);
        for _ in 0..6 {
            p.after_plain(BATCH_ENTER, 32 * 1024);
            while p.next() == NextRecv::Plain {
                p.after_plain(BATCH_ENTER, 32 * 1024);
            }
            p.after_batch(0, BATCH_MIN);
        }
        let raised = p.penalty;
        assert!(raised > FIRST_PENALTY);
        while p.next() == NextRecv::Plain {
            p.after_plain(BATCH_ENTER, 32 * 1024);
        }
        // A stream whose batches alternate between full and a little
        // short (its rate between two batch sizes) flows all along.
        let mut size = 2 * BATCH_MIN;
        for i in 0..DECAY_RUN {
            let n = if i % 2 == 0 { size } else { size * 3 / 4 };
            size = p.after_batch(n, size);
        }
        assert_eq!(p.penalty, raised / 2);
    }
}
