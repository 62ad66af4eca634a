//! [`Pair`]: the live health of one (endpoint, model) — breaker, check history, latency average, cached status,
//! in-flight and unanswered requests, probe schedule — behind methods. Live requests and probes report to the
//! same pair, so the breaker does not wait for a probe to learn that an endpoint fails.
//!
//! Decisions are the policy crate's (`breaker`, `history`, `balance`); a pair only holds state, applies
//! outcomes under short `parking_lot` sections (never across an `.await`), publishes its gauges and wakes
//! requests waiting for a recovery ([`Changes`]). Does no I/O and reads no clock: times come in as `now_ms`.

use std::sync::atomic::{AtomicU32, AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;

use parking_lot::Mutex;
use sheepdog_policy::balance::{self, Candidate, Ewma, Tier};
use sheepdog_policy::breaker::{Admission, Breaker, BreakerConfig, BreakerState};
use sheepdog_policy::history::{self, Check, History, Status, StatusPolicy};

use super::sync::{Event, Outbox};
use super::Changes;
use crate::config::ModelKind;
use crate::metrics::PairMetrics;

/// Where an outcome came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// A live client request.
    Live,
    /// An active health probe.
    Probe,
}

/// What one upstream attempt or probe showed about a pair.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Outcome {
    /// It answered well, after this many milliseconds (to the first byte).
    Success(f64),
    /// It failed in a way that is the endpoint's fault (5xx, 429, timeout, connection error, broken stream).
    Failure(f64),
    /// The attempt ended without a verdict on the endpoint (client error, cancelled).
    Neutral,
}

/// The parameters a pair applies outcomes with (from the config snapshot).
#[derive(Debug, Clone, PartialEq)]
pub struct PairPolicy {
    /// Breaker thresholds and timeouts.
    pub breaker: BreakerConfig,
    /// Status thresholds (the max latency is per pair).
    pub status: StatusPolicy,
}

/// The live health of one (endpoint, model) pair.
pub struct Pair {
    endpoint: String,
    model: String,
    kind: ModelKind,
    base_url: String,
    breaker: Mutex<Breaker>,
    history: Mutex<History>,
    ewma: Ewma,
    status: AtomicU8,
    max_latency_ms: AtomicU64,
    /// Last time (ms) live traffic succeeded on this pair; a probe is skipped when it is recent.
    last_live_ok_ms: AtomicU64,
    /// Last time (ms) live traffic was routed to this pair (busy pairs are probed at `interval`).
    last_traffic_ms: AtomicU64,
    /// When (ms) the breaker last closed after being open, for slow start (0: never).
    recovered_at_ms: AtomicU64,
    /// When (ms) the next probe is due.
    next_probe_ms: AtomicU64,
    /// Live requests sent and not answered yet (streams: until they end); see [`InFlight`].
    in_flight: AtomicU32,
    /// Live requests sent since the endpoint last answered anything (a response head or a probe answer).
    unanswered: AtomicU32,
    /// When (ms) the oldest of the `unanswered` requests was sent.
    waiting_since_ms: AtomicU64,
    metrics: PairMetrics,
    changes: Changes,
    /// Where this pair's own breaker changes and probe results go for the other replicas (off: memory backend).
    outbox: Outbox,
}

/// One outstanding live request on a pair: counted in the pair's in-flight requests from creation to drop, and
/// in its unanswered ones until the pair answers something.
pub struct InFlight(Arc<Pair>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

fn status_code(s: Status) -> u8 {
    match s {
        Status::Unknown => 0,
        Status::Healthy => 1,
        Status::Degraded => 2,
        Status::Unhealthy => 3,
    }
}

fn code_status(c: u8) -> Status {
    match c {
        1 => Status::Healthy,
        2 => Status::Degraded,
        3 => Status::Unhealthy,
        _ => Status::Unknown,
    }
}

/// A point-in-time view of a pair, for `/status`, the dashboard and `check`.
#[derive(Debug, Clone, serde::Serialize)]
pub struct PairView {
    /// Public model name.
    pub model: String,
    /// healthy | degraded | unhealthy | unknown.
    pub status: &'static str,
    /// closed | open | half_open.
    pub breaker: &'static str,
    /// Mean latency of recent successful checks, ms.
    pub latency_ms: Option<f64>,
    /// Median latency, ms.
    pub p50_ms: Option<f64>,
    /// 95th percentile latency, ms.
    pub p95_ms: Option<f64>,
    /// Success rate over the history.
    pub success_rate: Option<f64>,
    /// Checks in the history.
    pub checks: usize,
    /// Whether the pair can take traffic now.
    pub can_serve: bool,
    /// Live requests outstanding.
    pub in_flight: u32,
    /// Live requests sent since the endpoint last answered.
    pub unanswered: u32,
    /// Latency of the last checks (live requests and probes), oldest first; `null` for a failure. For the
    /// dashboard's sparklines.
    pub recent_ms: Vec<Option<f64>>,
}

/// Checks in [`PairView::recent_ms`].
pub const RECENT_CHECKS: usize = 30;

/// Where a pair was built from: its endpoint's name, base URL and latency bound, and the model.
pub struct PairSpec<'a> {
    /// Endpoint name.
    pub endpoint: &'a str,
    /// Endpoint base URL (a pair is only carried over a reload to the same URL).
    pub base_url: &'a str,
    /// Above this a success counts as degraded.
    pub max_latency_ms: u64,
    /// Public model name.
    pub model: &'a str,
    /// How the model is used (and so probed).
    pub kind: ModelKind,
    /// Checks kept.
    pub history: usize,
}

impl Pair {
    /// A new pair of unknown health; its `up` gauge starts at 1.
    pub fn new(spec: &PairSpec<'_>, metrics: PairMetrics, changes: Changes, outbox: Outbox) -> Pair {
        metrics.up.set(1);
        metrics.breaker.set(0);
        Pair {
            endpoint: spec.endpoint.to_string(),
            model: spec.model.to_string(),
            kind: spec.kind,
            base_url: spec.base_url.to_string(),
            breaker: Mutex::new(Breaker::new()),
            history: Mutex::new(History::new(spec.history)),
            ewma: Ewma::new(10_000),
            status: AtomicU8::new(0),
            max_latency_ms: AtomicU64::new(spec.max_latency_ms),
            last_live_ok_ms: AtomicU64::new(0),
            last_traffic_ms: AtomicU64::new(0),
            recovered_at_ms: AtomicU64::new(0),
            next_probe_ms: AtomicU64::new(0),
            in_flight: AtomicU32::new(0),
            unanswered: AtomicU32::new(0),
            waiting_since_ms: AtomicU64::new(0),
            metrics,
            changes,
            outbox,
        }
    }

    /// Endpoint name.
    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    /// Public model name.
    pub fn model(&self) -> &str {
        &self.model
    }

    /// How the model is used (and so probed).
    pub fn kind(&self) -> ModelKind {
        self.kind
    }

    /// Metric handles of the pair.
    pub fn metrics(&self) -> &PairMetrics {
        &self.metrics
    }

    /// Whether this pair can be carried over a reload to an endpoint at `base_url` serving `model`.
    pub fn same(&self, base_url: &str, model: &str) -> bool {
        self.base_url == base_url && self.model == model
    }

    /// Carry a new latency bound over a reload.
    pub fn set_max_latency_ms(&self, ms: u64) {
        self.max_latency_ms.store(ms, Ordering::Relaxed);
    }

    /// A live request is sent to the pair at `now_ms`: counted until the token is dropped.
    pub fn start_request(self: &Arc<Self>, now_ms: u64) -> InFlight {
        self.last_traffic_ms.store(now_ms, Ordering::Relaxed);
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        if self.unanswered.fetch_add(1, Ordering::Relaxed) == 0 {
            self.waiting_since_ms.store(now_ms, Ordering::Relaxed);
        }
        InFlight(self.clone())
    }

    /// The endpoint answered (a response head, whatever its status): it is not stalled.
    pub fn answered(&self) {
        if self.unanswered.load(Ordering::Relaxed) != 0 {
            self.unanswered.store(0, Ordering::Relaxed);
        }
    }

    /// Whether requests pile up on the pair unanswered ([`balance::stalled`]).
    pub fn stalled(&self, now_ms: u64) -> bool {
        let waiting = self.unanswered.load(Ordering::Relaxed);
        waiting != 0
            && balance::stalled(
                waiting,
                now_ms.saturating_sub(self.waiting_since_ms.load(Ordering::Relaxed)),
                self.ewma.value(),
            )
    }

    /// The cached health status.
    pub fn status(&self) -> Status {
        code_status(self.status.load(Ordering::Relaxed))
    }

    /// The breaker's state.
    pub fn breaker_state(&self) -> BreakerState {
        self.breaker.lock().state()
    }

    /// When an open breaker becomes half-open (ms), if it is open.
    pub fn breaker_retry_at(&self) -> Option<u64> {
        self.breaker.lock().retry_at_ms()
    }

    /// Last time (ms) live traffic was routed to the pair (0: never).
    pub fn last_traffic_ms(&self) -> u64 {
        self.last_traffic_ms.load(Ordering::Relaxed)
    }

    /// Last time (ms) live traffic succeeded on the pair (0: never).
    pub fn last_live_ok_ms(&self) -> u64 {
        self.last_live_ok_ms.load(Ordering::Relaxed)
    }

    /// When (ms) the next probe is due.
    pub fn next_probe_ms(&self) -> u64 {
        self.next_probe_ms.load(Ordering::Relaxed)
    }

    /// Schedule the next probe.
    pub fn set_next_probe_ms(&self, at_ms: u64) {
        self.next_probe_ms.store(at_ms, Ordering::Relaxed);
    }

    /// The selection tier of this pair now (without admitting anything).
    pub fn tier(&self, cfg: &BreakerConfig, now_ms: u64) -> Tier {
        let b = self.breaker.lock();
        match b.state() {
            BreakerState::Closed => match self.status() {
                Status::Degraded => Tier::Degraded,
                _ => Tier::Healthy,
            },
            _ if b.would_admit(cfg, now_ms) => Tier::HalfOpen,
            _ => Tier::Unavailable,
        }
    }

    /// This pair as a balancer candidate at `now_ms`. A healthy pair on which unanswered requests pile up is
    /// offered as degraded when `stall_aware`, so new requests go to its peers while it does not answer; a
    /// pair of an endpoint that is not `ready` is unavailable.
    pub fn candidate(
        &self,
        cfg: &BreakerConfig,
        now_ms: u64,
        ready: bool,
        stall_aware: bool,
        slow_start_ms: u64,
        (weight, priority): (u32, i32),
    ) -> Candidate {
        let mut tier = if ready { self.tier(cfg, now_ms) } else { Tier::Unavailable };
        if tier == Tier::Healthy && stall_aware && self.stalled(now_ms) {
            tier = Tier::Degraded;
        }
        let rec = self.recovered_at_ms.load(Ordering::Relaxed);
        let slow_start = if rec == 0 || slow_start_ms == 0 {
            1.0
        } else {
            balance::slow_start_factor(now_ms.saturating_sub(rec), slow_start_ms)
        };
        Candidate { weight, priority, latency_ewma_ms: self.ewma.value(), tier, slow_start }
    }

    /// Ask the breaker to let one attempt through.
    pub fn admit(&self, cfg: &BreakerConfig, now_ms: u64) -> Admission {
        let mut b = self.breaker.lock();
        let before = b.state();
        let a = b.admit(cfg, now_ms);
        let after = b.state();
        drop(b);
        if before != after {
            self.on_transition(before, after, now_ms, true);
        }
        a
    }

    /// Apply an outcome (live or probe) of an attempt admitted at `started_ms` to breaker, history, latency
    /// average, status and gauges. The breaker ignores answers to attempts that began before its current state
    /// (a slow request from before an outage cannot close or reopen a half-open breaker).
    pub fn record(
        &self,
        policy: &PairPolicy,
        outcome: Outcome,
        started_ms: u64,
        source: Source,
        has_usable_key: bool,
        now_ms: u64,
    ) {
        let transition = {
            let mut b = self.breaker.lock();
            match outcome {
                Outcome::Success(_) => b.record_attempt(&policy.breaker, true, started_ms, now_ms),
                Outcome::Failure(_) => b.record_attempt(&policy.breaker, false, started_ms, now_ms),
                Outcome::Neutral => {
                    b.release_attempt(started_ms);
                    None
                }
            }
        };
        let (ok, latency) = match outcome {
            Outcome::Success(l) => (true, l),
            Outcome::Failure(l) => (false, l),
            Outcome::Neutral => {
                self.refresh_status(&policy.status, has_usable_key);
                return;
            }
        };
        if ok {
            self.ewma.update(latency, now_ms);
            if source == Source::Live {
                self.last_live_ok_ms.store(now_ms.max(1), Ordering::Relaxed);
            }
        }
        self.history.lock().push(Check { ok, latency_ms: latency, at_ms: now_ms });
        if let Some((from, to)) = transition {
            self.on_transition(from, to, now_ms, true);
        }
        self.refresh_status(&policy.status, has_usable_key);
    }

    /// Apply another replica's breaker change at `now_ms`: `Open` forces the breaker open until `retry_at_ms`
    /// (process time; the later of the two when it is open already), `Closed` closes an open or half-open one.
    /// A change applied here is not shared again (no echo).
    pub fn apply_remote_breaker(&self, state: BreakerState, retry_at_ms: u64, policy: &PairPolicy, now_ms: u64) {
        let transition = {
            let mut b = self.breaker.lock();
            match state {
                BreakerState::Open => b.force_open(retry_at_ms, now_ms),
                BreakerState::Closed => b.force_closed(now_ms),
                BreakerState::HalfOpen => None,
            }
        };
        if let Some((from, to)) = transition {
            self.on_transition(from, to, now_ms, false);
            self.refresh_status(&policy.status, true);
        }
    }

    /// Share the result of a probe this replica sent (as the pair's lease holder) with the others.
    pub fn share_probe(&self, ok: bool, latency_ms: f64, at_ms: u64) {
        if self.outbox.is_on() {
            let (endpoint, model) = (self.endpoint.as_str().into(), self.model.as_str().into());
            self.outbox.send(Event::Probe { endpoint, model, ok, latency_ms, at_ms });
        }
    }

    /// Recompute the cached status from history and breaker.
    pub fn refresh_status(&self, policy: &StatusPolicy, has_usable_key: bool) {
        let state = self.breaker_state();
        let mut policy = StatusPolicy { max_latency_ms: self.max_latency_ms.load(Ordering::Relaxed) as f64, ..*policy };
        let s = {
            let h = self.history.lock();
            // A breaker that closed after successful trials proves recovery: failures from before it no
            // longer count against the success rate.
            let recovered = self.recovered_at_ms.load(Ordering::Relaxed);
            if recovered != 0 {
                let since = h.iter().rev().take_while(|c| c.at_ms >= recovered).count().max(1);
                if policy.window == 0 || since < policy.window {
                    policy.window = since;
                }
            }
            history::status(&h, state, has_usable_key, &policy)
        };
        let old = self.status.swap(status_code(s), Ordering::Relaxed);
        let can_serve = !matches!(s, Status::Unhealthy) && state != BreakerState::Open;
        self.metrics.up.set(i64::from(can_serve));
        if old != status_code(s) {
            if old != 0 {
                tracing::warn!(endpoint = %self.endpoint, model = %self.model, from = code_status(old).as_str(), to = s.as_str(), "endpoint health changed");
            }
            self.changes.notify();
        }
    }

    /// Called once per transition: the gauge, the transition counter and one log line (open and closed at warn;
    /// half-open, a trial, at info); a `local` opening or closing goes to the outbox for the other replicas.
    fn on_transition(&self, from: BreakerState, to: BreakerState, now_ms: u64, local: bool) {
        if local && self.outbox.is_on() && to != BreakerState::HalfOpen {
            let retry_at_ms = self.breaker.lock().retry_at_ms().unwrap_or(0);
            let (endpoint, model) = (self.endpoint.as_str().into(), self.model.as_str().into());
            self.outbox.send(Event::Breaker { endpoint, model, state: to, retry_at_ms, at_ms: now_ms });
        }
        self.metrics.breaker.set(to.gauge());
        self.metrics.transition(to.gauge());
        if from != BreakerState::Closed && to == BreakerState::Closed {
            self.recovered_at_ms.store(now_ms.max(1), Ordering::Relaxed);
        }
        let (endpoint, model, from_s) = (&self.endpoint, &self.model, from.as_str());
        match to {
            BreakerState::Open => {
                tracing::warn!(endpoint = %endpoint, model = %model, from = from_s, remote = !local, "circuit breaker opened")
            }
            BreakerState::Closed => {
                tracing::warn!(endpoint = %endpoint, model = %model, from = from_s, remote = !local, "circuit breaker closed")
            }
            BreakerState::HalfOpen => {
                tracing::info!(endpoint = %endpoint, model = %model, from = from_s, "circuit breaker half-open: trial requests")
            }
        }
        self.changes.notify();
    }

    /// A snapshot for `/status`.
    pub fn view(&self, cfg: &BreakerConfig, now_ms: u64) -> PairView {
        let tier = self.tier(cfg, now_ms);
        let h = self.history.lock();
        let latency = h.latency_stats();
        let skip = h.len().saturating_sub(RECENT_CHECKS);
        let recent_ms = h.iter().skip(skip).map(|c| c.ok.then_some((c.latency_ms * 10.0).round() / 10.0)).collect();
        PairView {
            model: self.model.clone(),
            status: self.status().as_str(),
            breaker: self.breaker_state().as_str(),
            latency_ms: latency.as_ref().map(|l| l.mean_ms),
            p50_ms: latency.as_ref().map(|l| l.p50_ms),
            p95_ms: latency.as_ref().map(|l| l.p95_ms),
            success_rate: h.success_rate(),
            checks: h.len(),
            can_serve: tier != Tier::Unavailable && self.status() != Status::Unhealthy,
            in_flight: self.in_flight.load(Ordering::Relaxed),
            unanswered: self.unanswered.load(Ordering::Relaxed),
            recent_ms,
        }
    }

    /// The 95th percentile latency of recent successes, ms.
    pub fn p95_ms(&self) -> Option<f64> {
        self.history.lock().p95_latency_ms()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::Metrics;

    /// A pair `e` × `m` that publishes to `outbox`.
    fn pair_with(outbox: Outbox) -> Pair {
        let spec = PairSpec {
            endpoint: "e",
            base_url: "http://x/v1",
            max_latency_ms: 1000,
            model: "m",
            kind: ModelKind::Chat,
            history: 10,
        };
        Pair::new(&spec, Metrics::new().pair("e", "m", ModelKind::Chat), Changes::default(), outbox)
    }

    fn pair() -> Arc<Pair> {
        Arc::new(pair_with(Outbox::default()))
    }

    fn policy() -> PairPolicy {
        PairPolicy {
            breaker: BreakerConfig {
                failure_threshold: 2,
                recovery_timeout_ms: 1000,
                max_recovery_timeout_ms: 1000,
                success_threshold: 1,
                half_open_max_trials: 1,
            },
            status: StatusPolicy { max_latency_ms: 1000.0, min_success_rate: 0.9, window: 20 },
        }
    }

    #[test]
    fn failures_open_the_breaker_and_wake_waiters() {
        let p = pair();
        let pol = policy();
        let changes = p.changes.clone();
        let waiter = changes.0.notified();
        tokio::pin!(waiter);
        waiter.as_mut().enable();
        for t in [10, 20] {
            p.admit(&pol.breaker, t);
            p.record(&pol, Outcome::Failure(5.0), t, Source::Live, true, t + 1);
        }
        assert_eq!(p.breaker_state(), BreakerState::Open);
        assert_eq!(p.tier(&pol.breaker, 100), Tier::Unavailable);
        assert_eq!(p.tier(&pol.breaker, 1100), Tier::HalfOpen);
        assert!(futures_util::FutureExt::now_or_never(waiter).is_some(), "a waiter was woken");
        assert_eq!(p.metrics().breaker.get(), 2);
        assert_eq!(p.view(&pol.breaker, 100).recent_ms, vec![None, None], "failures, oldest first");
    }

    #[test]
    fn local_openings_and_closings_go_to_the_outbox_remote_ones_do_not() {
        let (outbox, mut rx) = Outbox::channel();
        let p = pair_with(outbox);
        let pol = policy();
        for t in [10, 20] {
            p.admit(&pol.breaker, t);
            p.record(&pol, Outcome::Failure(5.0), t, Source::Live, true, t + 1);
        }
        let ev = rx.try_recv().expect("the opening is shared");
        assert!(matches!(ev, Event::Breaker { state: BreakerState::Open, retry_at_ms: 1021, at_ms: 21, .. }), "{ev:?}");
        // Another replica's close closes it here and is not sent back.
        p.apply_remote_breaker(BreakerState::Closed, 0, &pol, 30);
        assert_eq!(p.breaker_state(), BreakerState::Closed);
        p.apply_remote_breaker(BreakerState::Open, 5_000, &pol, 40);
        assert_eq!((p.breaker_state(), p.breaker_retry_at()), (BreakerState::Open, Some(5_000)));
        assert!(rx.try_recv().is_err(), "remote changes are not echoed");
        assert_eq!(p.metrics().breaker.get(), 2);
    }

    #[test]
    fn in_flight_tokens_count_until_dropped_and_stall_until_answered() {
        let p = pair();
        let a = p.start_request(10);
        let b = p.start_request(20);
        assert_eq!(p.view(&policy().breaker, 30).in_flight, 2);
        assert_eq!(p.last_traffic_ms(), 20);
        drop(a);
        assert_eq!(p.view(&policy().breaker, 30).unanswered, 2);
        p.answered();
        assert_eq!(p.view(&policy().breaker, 30).unanswered, 0);
        drop(b);
        assert_eq!(p.view(&policy().breaker, 30).in_flight, 0);
    }
}

/// What of a pair survives a restart ([`Pair::saved`], [`Pair::restore`]); see `state::saved`.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct SavedPair {
    /// Endpoint name.
    pub endpoint: String,
    /// Endpoint base URL: state is only restored to the same endpoint.
    pub base_url: String,
    /// Public model name.
    pub model: String,
    /// The breaker, its times relative to the save.
    pub breaker: sheepdog_policy::breaker::SavedBreaker,
    /// The check history, oldest first: (ok, latency ms, age in ms at the save).
    pub checks: Vec<(bool, f64, u64)>,
    /// The latency average, ms.
    pub latency_ewma_ms: Option<f64>,
}

impl Pair {
    /// The pair's breaker and history as they are at `now_ms`.
    pub fn saved(&self, now_ms: u64) -> SavedPair {
        let breaker = self.breaker.lock().saved(now_ms);
        let checks = self.history.lock().iter().map(|c| (c.ok, c.latency_ms, now_ms.saturating_sub(c.at_ms))).collect();
        let ewma = self.ewma.value();
        SavedPair {
            endpoint: self.endpoint.clone(),
            base_url: self.base_url.clone(),
            model: self.model.clone(),
            breaker,
            checks,
            latency_ewma_ms: ewma.is_finite().then_some(ewma),
        }
    }

    /// Take over what `saved` kept, `offline_ms` after it was saved; the caller checked that it is this pair
    /// ([`Pair::same`]). Publishes the breaker gauge and recomputes the status.
    pub fn restore(&self, saved: &SavedPair, offline_ms: u64, policy: &PairPolicy, now_ms: u64) {
        let state = {
            let mut b = self.breaker.lock();
            *b = Breaker::restored(&saved.breaker, offline_ms, now_ms);
            b.state()
        };
        {
            let mut h = self.history.lock();
            h.clear();
            let skip = saved.checks.len().saturating_sub(h.capacity());
            for &(ok, latency_ms, age_ms) in &saved.checks[skip..] {
                let at_ms = now_ms.saturating_sub(age_ms.saturating_add(offline_ms)).max(1);
                h.push(Check { ok, latency_ms: if latency_ms.is_finite() { latency_ms } else { 0.0 }, at_ms });
            }
        }
        if let Some(ms) = saved.latency_ewma_ms.filter(|v| v.is_finite() && *v >= 0.0) {
            self.ewma.update(ms, now_ms);
        }
        self.metrics.breaker.set(state.gauge());
        self.refresh_status(&policy.status, true);
        self.changes.notify();
    }
}
