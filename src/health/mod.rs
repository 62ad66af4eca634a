//! Active health checks: the prober loop (one per process; adaptive interval with jitter; skipped while live
//! traffic shows a pair healthy; open breakers probed when their recovery time comes) and the re-test of keys
//! set aside. [`probe`] sends one probe.
//!
//! With the Redis backend a replica probes a pair only while it holds the pair's lease (`shared::Redis::
//! lease`) and shares the result; the others skip and record that result; when Redis cannot say, it probes.
//!
//! The loop sleeps until the next probe is due and stops on the shutdown signal. Probes report to the same
//! pairs as live traffic; their cost goes to `sheepdog_cost_usd_total{source="probe"}`, never to the request
//! log.

mod probe;

use std::sync::Arc;
use std::time::Duration;

use rand::Rng;
use sheepdog_policy::breaker::{Admission, BreakerState};
use sheepdog_policy::history::Status;
use sheepdog_policy::pricing;
use tokio::sync::{watch, Semaphore};

pub use probe::{probe, ProbeResult};

use crate::gateway::Gateway;
use crate::shared::Lease;
use crate::state::{Endpoint, Outcome, Pair, Runtime, Source};

/// The interval until the next probe of a pair: `interval` while it carries traffic or is unwell, else
/// `idle_interval`.
pub fn next_interval(status: Status, breaker: BreakerState, busy: bool, interval_ms: u64, idle_ms: u64) -> u64 {
    if busy || breaker != BreakerState::Closed || !matches!(status, Status::Healthy) {
        interval_ms
    } else {
        idle_ms
    }
}

/// What to do with a pair whose probe is due.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Plan {
    /// Probe it now.
    Probe,
    /// Live traffic showed it healthy within the interval: skip this probe.
    SkipLiveOk,
    /// Breaker open and not yet due for a trial: wait until then.
    WaitBreaker(u64),
}

/// Decide whether a due pair is probed (pure).
pub fn probe_plan(
    last_live_ok_ms: u64,
    breaker: BreakerState,
    retry_at_ms: Option<u64>,
    now_ms: u64,
    interval_ms: u64,
) -> Plan {
    match breaker {
        BreakerState::Open => match retry_at_ms {
            Some(t) if t > now_ms => Plan::WaitBreaker(t),
            _ => Plan::Probe,
        },
        BreakerState::HalfOpen => Plan::Probe,
        BreakerState::Closed => {
            if last_live_ok_ms != 0 && now_ms.saturating_sub(last_live_ok_ms) < interval_ms {
                Plan::SkipLiveOk
            } else {
                Plan::Probe
            }
        }
    }
}

/// Spread probes: ±10 % of the interval.
fn jittered(ms: u64, rng: &mut impl Rng) -> u64 {
    let spread = ms / 10;
    if spread == 0 {
        return ms;
    }
    ms - spread + rng.gen_range(0..=2 * spread)
}

/// Probes in flight at once.
const MAX_CONCURRENT_PROBES: usize = 64;

/// The prober: runs until `shutdown` turns true.
pub async fn run(gw: Arc<Gateway>, mut shutdown: watch::Receiver<bool>) {
    let limit = Arc::new(Semaphore::new(MAX_CONCURRENT_PROBES));
    let mut was_degraded = false;
    loop {
        let rt = gw.runtime();
        let now = gw.now_ms();
        let next_wake = tick(&gw, &rt, &limit, now);
        let (ratio, degraded) = rt.availability(now);
        gw.metrics.global_degraded.set(i64::from(degraded));
        if degraded && !was_degraded {
            tracing::error!(
                available_ratio = ratio,
                "global degraded: more than half of all endpoint/model pairs cannot serve"
            );
        } else if !degraded && was_degraded {
            tracing::warn!(
                available_ratio = ratio,
                "fewer than half of all pairs are down again: global degraded cleared"
            );
        }
        was_degraded = degraded;
        let sleep = Duration::from_millis(next_wake.saturating_sub(gw.now_ms()).clamp(10, 250));
        tokio::select! {
            _ = tokio::time::sleep(sleep) => {}
            _ = shutdown.changed() => return,
        }
    }
}

/// One pass: start the probes that are due; returns when (ms) the next one is.
fn tick(gw: &Arc<Gateway>, rt: &Arc<Runtime>, limit: &Arc<Semaphore>, now: u64) -> u64 {
    let h = &rt.config.health;
    let interval = h.interval.as_millis() as u64;
    let idle = h.idle_interval.as_millis() as u64;
    let mut next_wake = now + 250;
    let mut rng = rand::thread_rng();
    for e in &rt.endpoints {
        for (i, pair) in e.pairs.iter().enumerate() {
            let due = pair.next_probe_ms();
            if due > now {
                next_wake = next_wake.min(due);
                continue;
            }
            let state = pair.breaker_state();
            let last_traffic = pair.last_traffic_ms();
            let busy = last_traffic != 0 && now.saturating_sub(last_traffic) < idle;
            let every = next_interval(pair.status(), state, busy, interval, idle);
            let plan = probe_plan(pair.last_live_ok_ms(), state, pair.breaker_retry_at(), now, every);
            let next = match plan {
                Plan::WaitBreaker(t) => t,
                Plan::SkipLiveOk => now + jittered(every, &mut rng),
                Plan::Probe => {
                    match state {
                        BreakerState::Closed => {}
                        _ => match pair.admit(&rt.policy.breaker, now) {
                            Admission::Trial | Admission::Admitted => {}
                            // Live trials are in flight: they decide; check again soon.
                            Admission::Rejected => {
                                pair.set_next_probe_ms(now + 200);
                                continue;
                            }
                        },
                    }
                    let Ok(permit) = limit.clone().try_acquire_owned() else {
                        pair.record(&rt.policy, Outcome::Neutral, now, Source::Probe, e.keys.has_usable(), now);
                        continue;
                    };
                    let (gw, rt, e, pair) = (gw.clone(), rt.clone(), e.clone(), pair.clone());
                    let upstream_model = e.cfg.models[i].1.clone();
                    tokio::spawn(async move {
                        let _permit = permit;
                        if let Some(shared) = &gw.shared {
                            let ttl = sheepdog_policy::shared::lease_ms(every);
                            if shared.lease(pair.endpoint(), pair.model(), ttl).await == Lease::Other {
                                // Another replica probes this pair: its result comes through Redis.
                                pair.record(&rt.policy, Outcome::Neutral, now, Source::Probe, true, gw.now_ms());
                                return;
                            }
                        }
                        let (key, auth) = match e.keys.next() {
                            Ok(k) => (k.map(|(i, _)| i), k.map(|(_, h)| h.clone())),
                            Err(()) => {
                                // No usable key: the key re-test decides; nothing to probe with.
                                pair.record(&rt.policy, Outcome::Neutral, now, Source::Probe, false, gw.now_ms());
                                return;
                            }
                        };
                        let r = probe(&e, pair.kind(), &upstream_model, &rt.config.health, auth).await;
                        if r.auth_failed {
                            if let Some(idx) = key {
                                set_aside(&gw, &rt, &e, idx);
                            }
                        }
                        apply_probe(&gw, &rt, &e, &pair, &r, now);
                    });
                    now + jittered(every, &mut rng)
                }
            };
            pair.set_next_probe_ms(next);
            next_wake = next_wake.min(next);
        }
        retest_keys(gw, rt, e, now, idle);
        confirm_suspects(gw, rt, e);
    }
    next_wake
}

fn apply_probe(gw: &Gateway, rt: &Runtime, e: &Endpoint, pair: &Pair, r: &ProbeResult, started_ms: u64) {
    let now = gw.now_ms();
    let m = pair.metrics();
    m.probe_duration.observe(r.total_ms / 1000.0);
    m.probe(r.ok);
    if r.tokens.total() > 0 {
        if let Some(model) = rt.models.get(pair.model()) {
            let cost = pricing::cost(&model.pricing, &r.tokens, e.price_multiplier);
            m.cost_probe.inc_by(cost.usd());
        }
    }
    if r.status.is_some() {
        pair.answered();
    }
    let outcome = if r.ok {
        Outcome::Success(r.ttfb_ms)
    } else if r.auth_failed {
        Outcome::Neutral
    } else {
        Outcome::Failure(r.total_ms)
    };
    match outcome {
        Outcome::Success(l) | Outcome::Failure(l) => pair.share_probe(r.ok, l, now),
        Outcome::Neutral => {}
    }
    if !r.ok {
        tracing::debug!(endpoint = %e.cfg.name, model = %pair.model(), error = r.error.as_deref().unwrap_or(""), "probe failed");
    }
    pair.record(&rt.policy, outcome, started_ms, Source::Probe, e.keys.has_usable(), now);
}

/// Re-test keys set aside for 401/403 once per idle interval; a key that works again comes back.
fn retest_keys(gw: &Arc<Gateway>, rt: &Arc<Runtime>, e: &Arc<Endpoint>, now: u64, idle: u64) {
    let due = e.keys.due_for_retest(now, idle);
    if due.is_empty() {
        return;
    }
    for (idx, header) in due {
        e.keys.retested(idx, now);
        let Some(pair) = e.pairs.first().cloned() else { return };
        let (changes, rt, e) = (gw.changes.clone(), rt.clone(), e.clone());
        tokio::spawn(async move {
            let upstream_model = e.cfg.models[0].1.clone();
            let r = probe(&e, pair.kind(), &upstream_model, &rt.config.health, Some(header)).await;
            if !r.auth_failed && r.status.is_some() && e.keys.restore(idx) {
                tracing::info!(endpoint = %e.cfg.name, key_index = idx, "API key works again; back in rotation");
                for p in &e.pairs {
                    p.refresh_status(&rt.policy.status, true);
                }
                changes.notify();
            }
        });
    }
}

/// A probe with key `idx` was refused: set the key aside (once), and tell the pairs and waiting requests.
fn set_aside(gw: &Gateway, rt: &Runtime, e: &Endpoint, idx: usize) {
    if e.keys.set_aside(idx, gw.now_ms()) {
        let (n, aside) = e.keys.counts();
        tracing::warn!(endpoint = %e.cfg.name, key_index = idx, keys = n, set_aside = aside, "a probe confirmed that the upstream refuses an API key; set aside");
        for p in &e.pairs {
            p.refresh_status(&rt.policy.status, e.keys.has_usable());
        }
        gw.changes.notify();
    }
}

/// Probe keys that live requests saw refused: a key is set aside only when a probe with it is refused too, so a
/// refusal of one request's prompt never takes a key (or, with its last key, an endpoint) out of service.
fn confirm_suspects(gw: &Arc<Gateway>, rt: &Arc<Runtime>, e: &Arc<Endpoint>) {
    for (idx, header) in e.keys.take_suspects() {
        let Some(pair) = e.pairs.first().cloned() else { return };
        let (gw, rt, e) = (gw.clone(), rt.clone(), e.clone());
        tokio::spawn(async move {
            let upstream_model = e.cfg.models[0].1.clone();
            let r = probe(&e, pair.kind(), &upstream_model, &rt.config.health, Some(header)).await;
            if r.auth_failed {
                set_aside(&gw, &rt, &e, idx);
            } else {
                tracing::info!(endpoint = %e.cfg.name, key_index = idx, "a probe with a suspect API key was accepted; the key stays in rotation");
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interval_adapts() {
        assert_eq!(next_interval(Status::Healthy, BreakerState::Closed, false, 5, 30), 30);
        assert_eq!(next_interval(Status::Healthy, BreakerState::Closed, true, 5, 30), 5);
        assert_eq!(next_interval(Status::Degraded, BreakerState::Closed, false, 5, 30), 5);
        assert_eq!(next_interval(Status::Unknown, BreakerState::Closed, false, 5, 30), 5);
        assert_eq!(next_interval(Status::Healthy, BreakerState::Open, false, 5, 30), 5);
    }

    #[test]
    fn plan_skips_busy_healthy_pairs_and_waits_for_open_breakers() {
        assert_eq!(probe_plan(900, BreakerState::Closed, None, 1000, 500), Plan::SkipLiveOk);
        assert_eq!(probe_plan(400, BreakerState::Closed, None, 1000, 500), Plan::Probe);
        assert_eq!(probe_plan(0, BreakerState::Closed, None, 1000, 500), Plan::Probe);
        assert_eq!(probe_plan(999, BreakerState::Open, Some(5000), 1000, 500), Plan::WaitBreaker(5000));
        assert_eq!(probe_plan(999, BreakerState::Open, Some(900), 1000, 500), Plan::Probe);
        assert_eq!(probe_plan(999, BreakerState::HalfOpen, None, 1000, 500), Plan::Probe);
    }

    #[test]
    fn jitter_stays_within_ten_percent() {
        use rand::SeedableRng;
        let mut rng = rand::rngs::SmallRng::seed_from_u64(7);
        for _ in 0..1000 {
            let j = jittered(1000, &mut rng);
            assert!((900..=1100).contains(&j));
        }
    }
}
