//! Request accounting: what reached the mock, served by `GET /_mock/stats`.
//!
//! Owns: the counters ([`MockStats`] is their snapshot), how an arrival is counted (per path, model and key),
//! the reset of `/_mock/stats/reset`, and the gauges of requests in flight and open connections, which count
//! through guards so that a dropped connection or stream can never leave them off.
//! Must not: decide anything about a request, hold its lock across an `.await`, or know about the server
//! (it is handed a [`Stats`] and nothing else).

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use parking_lot::Mutex;
use serde::{Deserialize, Serialize};

/// What reached the mock (`GET /_mock/stats`); `/_mock/*` requests are not counted.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
pub struct MockStats {
    /// Requests received, whatever their answer (faults included).
    pub requests: u64,
    /// Requests per path.
    pub by_path: BTreeMap<String, u64>,
    /// Requests per `model` of the JSON body.
    pub by_model: BTreeMap<String, u64>,
    /// Requests per bearer token.
    pub by_key: BTreeMap<String, u64>,
    /// Requests being handled right now, streams until their last chunk (a gauge: not reset).
    pub in_flight: u64,
    /// Open client connections (a gauge: not reset).
    pub connections: u64,
    /// Client connections accepted (a client that reuses its connections opens few).
    #[serde(default)]
    pub accepted: u64,
}

/// The live counters of one mock.
#[derive(Default)]
pub(crate) struct Stats {
    requests: AtomicU64,
    maps: Mutex<StatMaps>,
    in_flight: AtomicU64,
    connections: AtomicU64,
    accepted: AtomicU64,
}

#[derive(Default)]
struct StatMaps {
    by_path: HashMap<String, u64>,
    by_model: HashMap<String, u64>,
    by_key: HashMap<String, u64>,
}

fn bump(map: &mut HashMap<String, u64>, key: &str) {
    match map.get_mut(key) {
        Some(n) => *n += 1,
        None => {
            map.insert(key.to_owned(), 1);
        }
    }
}

impl Stats {
    pub(crate) fn record_arrival(&self, path: &str, key: Option<&str>) {
        self.requests.fetch_add(1, Ordering::Relaxed);
        let mut maps = self.maps.lock();
        bump(&mut maps.by_path, path);
        if let Some(key) = key {
            bump(&mut maps.by_key, key);
        }
    }

    pub(crate) fn record_model(&self, model: &str) {
        bump(&mut self.maps.lock().by_model, model);
    }

    pub(crate) fn reset(&self) {
        let mut maps = self.maps.lock();
        self.requests.store(0, Ordering::Relaxed);
        self.accepted.store(0, Ordering::Relaxed);
        *maps = StatMaps::default();
    }

    pub(crate) fn snapshot(&self) -> MockStats {
        let maps = self.maps.lock();
        let sorted = |m: &HashMap<String, u64>| m.iter().map(|(k, v)| (k.clone(), *v)).collect();
        MockStats {
            requests: self.requests.load(Ordering::Relaxed),
            by_path: sorted(&maps.by_path),
            by_model: sorted(&maps.by_model),
            by_key: sorted(&maps.by_key),
            in_flight: self.in_flight.load(Ordering::Relaxed),
            connections: self.connections.load(Ordering::Relaxed),
            accepted: self.accepted.load(Ordering::Relaxed),
        }
    }
}

/// Counts one unit of a gauge while alive.
pub(crate) struct GaugeGuard {
    stats: Arc<Stats>,
    which: fn(&Stats) -> &AtomicU64,
}

impl GaugeGuard {
    /// One request (or stream, until its last chunk) in flight.
    pub(crate) fn in_flight(stats: &Arc<Stats>) -> Self {
        Self::new(stats, |s| &s.in_flight)
    }

    /// One open client connection (and one more accepted).
    pub(crate) fn connection(stats: &Arc<Stats>) -> Self {
        stats.accepted.fetch_add(1, Ordering::Relaxed);
        Self::new(stats, |s| &s.connections)
    }

    fn new(stats: &Arc<Stats>, which: fn(&Stats) -> &AtomicU64) -> Self {
        which(stats).fetch_add(1, Ordering::Relaxed);
        Self { stats: stats.clone(), which }
    }
}

impl Drop for GaugeGuard {
    fn drop(&mut self) {
        (self.which)(&self.stats).fetch_sub(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gauges_count_while_their_guards_live_and_survive_a_reset() {
        let stats = Arc::new(Stats::default());
        stats.record_arrival("/v1/models", Some("k1"));
        stats.record_arrival("/v1/models", None);
        stats.record_model("gpt-4.1");
        let connection = GaugeGuard::connection(&stats);
        let request = GaugeGuard::in_flight(&stats);
        let s = stats.snapshot();
        assert_eq!((s.requests, s.in_flight, s.connections, s.accepted), (2, 1, 1, 1));
        assert_eq!(s.by_path, BTreeMap::from([("/v1/models".to_owned(), 2)]));
        assert_eq!(s.by_model, BTreeMap::from([("gpt-4.1".to_owned(), 1)]));
        assert_eq!(s.by_key, BTreeMap::from([("k1".to_owned(), 1)]));

        stats.reset();
        assert_eq!(stats.snapshot(), MockStats { in_flight: 1, connections: 1, ..MockStats::default() });
        drop(request);
        drop(connection);
        assert_eq!(stats.snapshot(), MockStats::default());
    }
}
