//! Rolling health history of one (endpoint, model) pair and the status decision
//! derived from it.
//!
//! Owns the ring buffer of recent checks, the statistics over it (success rate,
//! mean and percentile latency) and the pure rule that turns history, breaker
//! state and key availability into a [`Status`].
//!
//! **Invariant:** pure and synchronous. It does no I/O and reads no clock (each
//! [`Check`] carries its own `at_ms`); it runs no probes and changes no breaker.
//! The caller owns synchronisation.

use std::collections::VecDeque;

use serde::{Deserialize, Serialize};

use crate::breaker::BreakerState;
use crate::stats::percentile;

/// Default number of checks kept (`[health] history`).
pub const DEFAULT_CAPACITY: usize = 100;

/// One health check (or one observed request) of an endpoint and model.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Check {
    /// Whether the check succeeded.
    pub ok: bool,
    /// Total latency in milliseconds (only successful checks enter latency statistics).
    pub latency_ms: f64,
    /// When the check finished, on the caller's monotonic clock.
    pub at_ms: u64,
}

/// Latency statistics over the successful checks of a [`History`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LatencyStats {
    /// Successful checks with a usable latency.
    pub count: usize,
    /// Arithmetic mean, ms.
    pub mean_ms: f64,
    /// Median, ms.
    pub p50_ms: f64,
    /// 95th percentile, ms.
    pub p95_ms: f64,
}

/// Ring buffer of the most recent checks, oldest first.
#[derive(Debug, Clone, PartialEq)]
pub struct History {
    cap: usize,
    checks: VecDeque<Check>,
}

impl Default for History {
    fn default() -> Self {
        History::new(DEFAULT_CAPACITY)
    }
}

impl History {
    /// An empty history keeping the last `cap` checks (a capacity of 0 keeps one).
    pub fn new(cap: usize) -> Self {
        let cap = cap.max(1);
        History { cap, checks: VecDeque::with_capacity(cap) }
    }

    /// How many checks it keeps at most.
    pub fn capacity(&self) -> usize {
        self.cap
    }

    /// Adds a check, dropping the oldest when full.
    pub fn push(&mut self, c: Check) {
        if self.checks.len() == self.cap {
            self.checks.pop_front();
        }
        self.checks.push_back(c);
    }

    /// Checks currently kept.
    pub fn len(&self) -> usize {
        self.checks.len()
    }

    /// True when no check was recorded yet.
    pub fn is_empty(&self) -> bool {
        self.checks.is_empty()
    }

    /// Forgets every check.
    pub fn clear(&mut self) {
        self.checks.clear();
    }

    /// The checks, oldest first.
    pub fn iter(&self) -> impl DoubleEndedIterator<Item = &Check> + ExactSizeIterator + '_ {
        self.checks.iter()
    }

    /// The latest check.
    pub fn last(&self) -> Option<&Check> {
        self.checks.back()
    }

    /// The latest successful check.
    pub fn last_success(&self) -> Option<&Check> {
        self.checks.iter().rev().find(|c| c.ok)
    }

    /// Failed checks since the latest success (all of them if none succeeded).
    pub fn consecutive_failures(&self) -> usize {
        self.checks.iter().rev().take_while(|c| !c.ok).count()
    }

    /// Share of successful checks over the whole history; `None` when empty.
    pub fn success_rate(&self) -> Option<f64> {
        self.success_rate_last(self.cap)
    }

    /// Share of successful checks among the last `n` (all if fewer; `n` = 0 means all).
    pub fn success_rate_last(&self, n: usize) -> Option<f64> {
        let n = if n == 0 { self.len() } else { n.min(self.len()) };
        if n == 0 {
            return None;
        }
        let ok = self.checks.iter().rev().take(n).filter(|c| c.ok).count();
        Some(ok as f64 / n as f64)
    }

    /// Latencies of successful checks; non-finite or negative ones are left out.
    fn ok_latencies(&self) -> impl Iterator<Item = f64> + '_ {
        self.checks.iter().filter(|c| c.ok && c.latency_ms.is_finite() && c.latency_ms >= 0.0).map(|c| c.latency_ms)
    }

    /// Mean latency of successful checks; `None` when there is none.
    pub fn mean_latency_ms(&self) -> Option<f64> {
        let (n, sum) = self.ok_latencies().fold((0usize, 0.0f64), |(n, s), l| (n + 1, s + l));
        (n > 0).then(|| sum / n as f64)
    }

    /// Median latency of successful checks (see [`History::percentile_latency_ms`]).
    pub fn p50_latency_ms(&self) -> Option<f64> {
        self.percentile_latency_ms(0.5)
    }

    /// 95th percentile latency of successful checks (see [`History::percentile_latency_ms`]).
    pub fn p95_latency_ms(&self) -> Option<f64> {
        self.percentile_latency_ms(0.95)
    }

    /// The `q`-quantile (`q` clamped to 0..=1) of successful latencies, interpolated
    /// linearly between the two nearest ranks (`rank = q × (n − 1)`, as numpy's
    /// default). `None` when no successful check. Sorts a copy: O(n log n), one allocation.
    pub fn percentile_latency_ms(&self, q: f64) -> Option<f64> {
        let sorted = self.sorted_ok_latencies();
        percentile(&sorted, q)
    }

    /// Count, mean, p50 and p95 with a single sort; `None` when no successful check.
    pub fn latency_stats(&self) -> Option<LatencyStats> {
        let sorted = self.sorted_ok_latencies();
        let count = sorted.len();
        Some(LatencyStats {
            count,
            mean_ms: sorted.iter().sum::<f64>() / count as f64,
            p50_ms: percentile(&sorted, 0.5)?,
            p95_ms: percentile(&sorted, 0.95)?,
        })
    }

    fn sorted_ok_latencies(&self) -> Vec<f64> {
        let mut v: Vec<f64> = self.ok_latencies().collect();
        v.sort_by(f64::total_cmp);
        v
    }
}

/// Health of one endpoint and model, as shown in `/status`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    /// Serving normally.
    Healthy,
    /// Serving, but slow, failing sometimes or recovering.
    Degraded,
    /// Cannot serve.
    Unhealthy,
    /// Never checked.
    Unknown,
}

impl Status {
    /// The stable name: `healthy`, `degraded`, `unhealthy` or `unknown`.
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Healthy => "healthy",
            Status::Degraded => "degraded",
            Status::Unhealthy => "unhealthy",
            Status::Unknown => "unknown",
        }
    }

    /// Value of the `sheepdog_upstream_up` gauge: 1 for healthy or degraded, else 0.
    pub fn up(self) -> i64 {
        match self {
            Status::Healthy | Status::Degraded => 1,
            Status::Unhealthy | Status::Unknown => 0,
        }
    }
}

impl std::fmt::Display for Status {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Thresholds of the status decision.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StatusPolicy {
    /// A latest success slower than this (ms) is degraded; NaN or infinite disables the rule.
    pub max_latency_ms: f64,
    /// Success rate over the window below which the pair is degraded (e.g. 0.9).
    pub min_success_rate: f64,
    /// Recent checks considered for the success rate (e.g. 20); 0 means the whole history.
    pub window: usize,
}

impl Default for StatusPolicy {
    /// 2000 ms, 0.9, 20 checks.
    fn default() -> Self {
        StatusPolicy { max_latency_ms: 2_000.0, min_success_rate: 0.9, window: 20 }
    }
}

/// Pure status decision. Rules, first match wins:
/// 1. **Unhealthy** when the breaker is open, or when no API key is usable
///    (`has_usable_key == false`): the pair cannot serve, whatever its history;
/// 2. **Unknown** when never checked (empty history);
/// 3. **Degraded** when the breaker is half-open (recovering, trials only);
/// 4. **Degraded** when the latest check failed (a failure below the breaker's
///    threshold: still serving, not reliably);
/// 5. **Degraded** when the latest *successful* check was slower than
///    `max_latency_ms` (strictly);
/// 6. **Degraded** when the success rate over the last `window` checks is below
///    `min_success_rate` (strictly);
/// 7. else **Healthy**.
pub fn status(h: &History, breaker: BreakerState, has_usable_key: bool, policy: &StatusPolicy) -> Status {
    if breaker == BreakerState::Open || !has_usable_key {
        return Status::Unhealthy;
    }
    let Some(last) = h.last() else {
        return Status::Unknown;
    };
    if breaker == BreakerState::HalfOpen || !last.ok {
        return Status::Degraded;
    }
    let slow = h.last_success().is_some_and(|c| c.latency_ms > policy.max_latency_ms);
    let flaky = h.success_rate_last(policy.window).is_some_and(|r| r < policy.min_success_rate);
    if slow || flaky {
        Status::Degraded
    } else {
        Status::Healthy
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use BreakerState::{Closed, HalfOpen, Open};

    fn ok(latency_ms: f64) -> Check {
        Check { ok: true, latency_ms, at_ms: 0 }
    }

    fn fail() -> Check {
        Check { ok: false, latency_ms: 3_000.0, at_ms: 0 }
    }

    fn history(checks: &[Check]) -> History {
        let mut h = History::new(100);
        checks.iter().for_each(|&c| h.push(c));
        h
    }

    fn policy() -> StatusPolicy {
        StatusPolicy { max_latency_ms: 1_000.0, min_success_rate: 0.9, window: 10 }
    }

    #[test]
    fn ring_buffer_keeps_the_latest() {
        let mut h = History::new(3);
        assert!(h.is_empty());
        assert_eq!(h.last(), None);
        for t in 0..5 {
            h.push(Check { ok: true, latency_ms: t as f64, at_ms: t });
        }
        assert_eq!(h.len(), 3);
        assert_eq!(h.capacity(), 3);
        let at: Vec<u64> = h.iter().map(|c| c.at_ms).collect();
        assert_eq!(at, [2, 3, 4]);
        assert_eq!(h.iter().next_back().map(|c| c.at_ms), Some(4));
        assert_eq!(h.last().map(|c| c.at_ms), Some(4));
        assert_eq!(History::new(0).capacity(), 1);
        assert_eq!(History::default().capacity(), DEFAULT_CAPACITY);
        h.clear();
        assert!(h.is_empty());
    }

    #[test]
    fn success_rates() {
        let h = history(&[fail(), ok(1.0), ok(1.0), fail(), ok(1.0)]);
        assert_eq!(h.success_rate(), Some(0.6));
        assert_eq!(h.success_rate_last(2), Some(0.5));
        assert_eq!(h.success_rate_last(1), Some(1.0));
        assert_eq!(h.success_rate_last(50), Some(0.6));
        assert_eq!(h.success_rate_last(0), Some(0.6));
        assert_eq!(History::new(5).success_rate(), None);
        assert_eq!(h.consecutive_failures(), 0);
        let h = history(&[ok(1.0), fail(), fail()]);
        assert_eq!(h.consecutive_failures(), 2);
        assert_eq!(h.last_success(), Some(&ok(1.0)));
    }

    #[test]
    fn latency_stats_over_successes_only() {
        let mut checks: Vec<Check> = (1..=10).map(|i| ok(i as f64 * 10.0)).collect();
        checks.push(fail()); // 3000 ms failure: ignored
        checks.push(ok(f64::NAN)); // unusable: ignored
        checks.push(ok(-5.0));
        let h = history(&checks);
        assert_eq!(h.mean_latency_ms(), Some(55.0));
        // Sorted 10..100: rank 0.5 × 9 = 4.5 → 50 + 0.5 × 10.
        assert_eq!(h.p50_latency_ms(), Some(55.0));
        // rank 0.95 × 9 = 8.55 → 90 + 0.55 × 10.
        assert!((h.p95_latency_ms().unwrap() - 95.5).abs() < 1e-9);
        let s = h.latency_stats().unwrap();
        assert_eq!(s.count, 10);
        assert_eq!(s.mean_ms, 55.0);
        assert_eq!(s.p50_ms, 55.0);
        assert!((s.p95_ms - 95.5).abs() < 1e-9);
    }

    #[test]
    fn percentile_edges() {
        assert_eq!(percentile(&[], 0.5), None);
        assert_eq!(percentile(&[7.0], 0.95), Some(7.0));
        let v = [1.0, 2.0, 3.0, 4.0];
        assert_eq!(percentile(&v, 0.0), Some(1.0));
        assert_eq!(percentile(&v, 1.0), Some(4.0));
        assert_eq!(percentile(&v, 2.0), Some(4.0));
        assert_eq!(percentile(&v, -1.0), Some(1.0));
        assert_eq!(percentile(&v, 0.5), Some(2.5));
        assert_eq!(percentile(&v, f64::NAN), Some(2.5));
        // Unsorted input order does not matter to the History methods.
        let h = history(&[ok(40.0), ok(10.0), ok(30.0), ok(20.0)]);
        assert_eq!(h.p50_latency_ms(), Some(25.0));
        assert_eq!(h.percentile_latency_ms(1.0 / 3.0), Some(20.0));
        let none = history(&[fail(), fail()]);
        assert_eq!(none.mean_latency_ms(), None);
        assert_eq!(none.p95_latency_ms(), None);
        assert_eq!(none.latency_stats(), None);
    }

    #[test]
    fn status_names() {
        assert_eq!(Status::Healthy.as_str(), "healthy");
        assert_eq!(Status::Degraded.as_str(), "degraded");
        assert_eq!(Status::Unhealthy.as_str(), "unhealthy");
        assert_eq!(Status::Unknown.to_string(), "unknown");
        assert_eq!(
            [Status::Healthy, Status::Degraded, Status::Unhealthy, Status::Unknown].map(Status::up),
            [1, 1, 0, 0]
        );
    }

    #[test]
    fn status_deserializes_from_its_names() {
        use serde::de::value::{Error, StrDeserializer};
        use serde::de::IntoDeserializer;
        for s in [Status::Healthy, Status::Degraded, Status::Unhealthy, Status::Unknown] {
            let d: StrDeserializer<'_, Error> = s.as_str().into_deserializer();
            assert_eq!(Status::deserialize(d), Ok(s));
        }
    }

    #[test]
    fn status_unknown_when_never_checked() {
        let p = policy();
        assert_eq!(status(&History::new(10), Closed, true, &p), Status::Unknown);
        assert_eq!(status(&History::new(10), HalfOpen, true, &p), Status::Unknown);
    }

    #[test]
    fn status_unhealthy_when_open_or_keyless() {
        let p = policy();
        let good = history(&[ok(10.0); 20]);
        assert_eq!(status(&good, Open, true, &p), Status::Unhealthy);
        assert_eq!(status(&good, Closed, false, &p), Status::Unhealthy);
        assert_eq!(status(&History::new(10), Open, true, &p), Status::Unhealthy);
        assert_eq!(status(&History::new(10), Closed, false, &p), Status::Unhealthy);
    }

    #[test]
    fn status_degraded_when_half_open() {
        let good = history(&[ok(10.0); 20]);
        assert_eq!(status(&good, HalfOpen, true, &policy()), Status::Degraded);
    }

    #[test]
    fn status_degraded_when_last_check_failed() {
        let mut checks = [ok(10.0); 20];
        checks[19] = fail();
        let h = history(&checks);
        assert_eq!(h.success_rate_last(10), Some(0.9), "rate alone would be healthy");
        assert_eq!(status(&h, Closed, true, &policy()), Status::Degraded);
    }

    #[test]
    fn status_degraded_when_latest_success_slow() {
        let p = policy();
        let h = history(&[ok(10.0), ok(1_000.0)]);
        assert_eq!(status(&h, Closed, true, &p), Status::Healthy, "at the limit");
        let h = history(&[ok(10.0), ok(1_000.5)]);
        assert_eq!(status(&h, Closed, true, &p), Status::Degraded);
        // Only the latest success counts, not older slow ones.
        let h = history(&[ok(5_000.0), ok(10.0)]);
        assert_eq!(status(&h, Closed, true, &p), Status::Healthy);
        let off = StatusPolicy { max_latency_ms: f64::NAN, ..p };
        let h = history(&[ok(1e9)]);
        assert_eq!(status(&h, Closed, true, &off), Status::Healthy);
    }

    #[test]
    fn status_degraded_when_success_rate_low_in_window() {
        let p = policy();
        // 2 failures in the last 10 → 0.8 < 0.9.
        let mut checks = vec![ok(10.0); 30];
        checks[22] = fail();
        checks[25] = fail();
        assert_eq!(status(&history(&checks), Closed, true, &p), Status::Degraded);
        // The same failures outside the window no longer count.
        checks.extend([ok(10.0); 8]);
        assert_eq!(status(&history(&checks), Closed, true, &p), Status::Healthy);
        // Exactly at the threshold is healthy.
        let mut checks = vec![ok(10.0); 10];
        checks[3] = fail();
        assert_eq!(status(&history(&checks), Closed, true, &p), Status::Healthy);
        // Window 0 means the whole history.
        let all = StatusPolicy { window: 0, ..p };
        let mut checks = vec![ok(10.0); 40];
        for i in [1, 5, 9, 13, 17] {
            checks[i] = fail();
        }
        assert_eq!(status(&history(&checks), Closed, true, &all), Status::Degraded);
        assert_eq!(status(&history(&checks), Closed, true, &p), Status::Healthy);
    }

    #[test]
    fn status_healthy() {
        let h = history(&[ok(100.0); 5]);
        assert_eq!(status(&h, Closed, true, &policy()), Status::Healthy);
        assert_eq!(status(&h, Closed, true, &StatusPolicy::default()), Status::Healthy);
    }
}
