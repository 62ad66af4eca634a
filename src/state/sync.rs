//! The outbox of health changes a replica shares with the others (`[state] backend = "redis"`): breaker
//! openings and closings, manual drains and probe results, as [`Event`]s handed to the `shared` task.
//!
//! Sending is a non-blocking `try_send` into a bounded channel — the only cost the shared backend adds to
//! the request path, and only on a state change. A full channel drops the event (counted): the next
//! resynchronisation or change carries the state again. With the memory backend the outbox is off and
//! sending does nothing. Does no I/O and reads no clock: events carry the process time they happened at.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use sheepdog_policy::breaker::BreakerState;
use tokio::sync::mpsc;

/// Events the channel holds while the shared task is busy or reconnecting.
pub const CAPACITY: usize = 4096;

/// One health change made by this replica.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// A pair's breaker opened (until `retry_at_ms`) or closed, at `at_ms` (process time).
    Breaker {
        /// Endpoint name.
        endpoint: Arc<str>,
        /// Public model name.
        model: Arc<str>,
        /// `Open` or `Closed` (half-open is every replica's own business: it follows from the retry time).
        state: BreakerState,
        /// For an opening: when it may turn half-open (process time).
        retry_at_ms: u64,
        /// When it happened (process time).
        at_ms: u64,
    },
    /// An endpoint was drained (`enabled = false`) or enabled by hand.
    Drain {
        /// Endpoint name.
        endpoint: Arc<str>,
        /// The new setting.
        enabled: bool,
        /// When (process time).
        at_ms: u64,
    },
    /// This replica probed a pair (it held the pair's probe lease): the others record the result.
    Probe {
        /// Endpoint name.
        endpoint: Arc<str>,
        /// Public model name.
        model: Arc<str>,
        /// Whether the probe succeeded.
        ok: bool,
        /// Its latency, ms.
        latency_ms: f64,
        /// When it ended (process time).
        at_ms: u64,
    },
}

/// Where health changes go: a bounded channel to the shared task, or nowhere (memory backend).
#[derive(Clone, Default)]
pub struct Outbox {
    tx: Option<mpsc::Sender<Event>>,
    dropped: Arc<AtomicU64>,
}

impl Outbox {
    /// An outbox and the receiving end for the shared task.
    pub fn channel() -> (Outbox, mpsc::Receiver<Event>) {
        let (tx, rx) = mpsc::channel(CAPACITY);
        (Outbox { tx: Some(tx), dropped: Arc::default() }, rx)
    }

    /// Whether events go anywhere.
    pub fn is_on(&self) -> bool {
        self.tx.is_some()
    }

    /// Hand over an event without waiting; a full channel drops it.
    pub fn send(&self, ev: Event) {
        if let Some(tx) = &self.tx {
            if tx.try_send(ev).is_err() {
                self.dropped.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// Events dropped because the channel was full.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_outbox_that_is_off_takes_everything_and_sends_nothing() {
        let o = Outbox::default();
        assert!(!o.is_on());
        o.send(Event::Drain { endpoint: "e".into(), enabled: false, at_ms: 1 });
        assert_eq!(o.dropped(), 0);
    }

    #[test]
    fn a_full_outbox_drops_and_counts_without_waiting() {
        let (o, mut rx) = Outbox::channel();
        for i in 0..CAPACITY as u64 + 3 {
            o.send(Event::Drain { endpoint: "e".into(), enabled: true, at_ms: i });
        }
        assert_eq!(o.dropped(), 3);
        assert!(matches!(rx.try_recv(), Ok(Event::Drain { at_ms: 0, .. })));
    }
}
