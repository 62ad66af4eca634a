//! Active health checks: one deadline-driven background loop that probes every (endpoint, model) pair with
//! jitter, at an interval that adapts to traffic and health, plus re-tests of API keys set aside.
//!
//! Scheduling is a pure function ([`next_interval`], [`probe_plan`]); the loop and the probe are thin async
//! shells. Outcomes go to `state::Pair`, the same place live traffic reports to.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{Method, Request};
use http_body_util::{BodyExt, Full, Limited};
use rand::Rng;
use tokio::sync::{watch, Semaphore};
use tokio::time::Instant;

use crate::breaker::{Admission, BreakerState};
use crate::config::{HealthConfig, ModelKind, ProbeKind};
use crate::gateway::Gateway;
use crate::history::Status;
use crate::openai::Usage;
use crate::retry::{self, Verdict};
use crate::state::{Endpoint, Outcome, Pair, Runtime, Source};
use crate::upstream::HttpClient;

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

/// The result of one probe, with timings for `sheepdog check`.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ProbeResult {
    /// Whether the pair answered well.
    pub ok: bool,
    /// HTTP status, if an answer came.
    pub status: Option<u16>,
    /// Time to the answer's head, ms.
    pub ttfb_ms: f64,
    /// Time to the whole answer, ms.
    pub total_ms: f64,
    /// What went wrong, if anything (never contains a key).
    pub error: Option<String>,
    /// Whether the key was refused (401/403).
    pub auth_failed: bool,
    /// Tokens the probe used (prompt, completion).
    pub tokens: (u64, u64),
}

/// Send one probe for `pair` on `ep` with this `Authorization` value.
pub async fn probe(
    client: &HttpClient,
    ep: &Endpoint,
    pair: &Pair,
    upstream_model: &str,
    health: &HealthConfig,
    auth: Option<HeaderValue>,
) -> ProbeResult {
    let started = Instant::now();
    let mut res = ProbeResult {
        ok: false,
        status: None,
        ttfb_ms: 0.0,
        total_ms: 0.0,
        error: None,
        auth_failed: false,
        tokens: (0, 0),
    };
    let (method, uri, body) = match (health.probe, pair.kind) {
        (ProbeKind::Http, _) => (Method::GET, ep.base.join_absolute(&health.probe_path), Bytes::new()),
        (ProbeKind::Models, _) => (Method::GET, ep.base.join("/models"), Bytes::new()),
        (ProbeKind::Chat, ModelKind::Embeddings) => {
            let b = serde_json::json!({"model": upstream_model, "input": health.probe_prompt});
            (Method::POST, ep.base.join("/embeddings"), Bytes::from(b.to_string()))
        }
        (ProbeKind::Chat, ModelKind::Chat) => {
            let b = serde_json::json!({
                "model": upstream_model,
                "messages": [{"role": "user", "content": health.probe_prompt}],
                "max_tokens": 1,
            });
            (Method::POST, ep.base.join("/chat/completions"), Bytes::from(b.to_string()))
        }
    };
    let mut req = Request::builder().method(method).uri(uri).header(header::ACCEPT, "application/json");
    if !body.is_empty() {
        req = req.header(header::CONTENT_TYPE, "application/json");
    }
    if let Some(a) = auth {
        req = req.header(header::AUTHORIZATION, a);
    }
    let Ok(req) = req.body(Full::new(body)) else {
        res.error = Some("could not build the probe request".into());
        return res;
    };
    let deadline = started + health.timeout;
    let resp = match tokio::time::timeout_at(deadline, client.request(req)).await {
        Err(_) => {
            res.error = Some(format!("timeout after {} ms", health.timeout.as_millis()));
            res.total_ms = ms(started);
            return res;
        }
        Ok(Err(e)) => {
            res.error = Some(if e.is_connect() { "connection failed".into() } else { "connection error".into() });
            res.total_ms = ms(started);
            return res;
        }
        Ok(Ok(r)) => r,
    };
    res.ttfb_ms = ms(started);
    let status = resp.status().as_u16();
    res.status = Some(status);
    let body = match tokio::time::timeout_at(deadline, Limited::new(resp.into_body(), 4 << 20).collect()).await {
        Ok(Ok(c)) => c.to_bytes(),
        Ok(Err(_)) => {
            res.error = Some("connection broke while reading the answer".into());
            res.total_ms = ms(started);
            return res;
        }
        Err(_) => {
            res.error = Some(format!("timeout after {} ms reading the answer", health.timeout.as_millis()));
            res.total_ms = ms(started);
            return res;
        }
    };
    res.total_ms = ms(started);
    match retry::classify_status(status) {
        Verdict::Success => {}
        Verdict::AuthError => {
            res.auth_failed = true;
            res.error = Some(format!("HTTP {status}: API key refused"));
            return res;
        }
        _ => {
            res.error = Some(format!("HTTP {status}"));
            return res;
        }
    }
    match health.probe {
        ProbeKind::Http => res.ok = true,
        ProbeKind::Models => match serde_json::from_slice::<ModelList>(&body) {
            Ok(l) if l.data.iter().any(|m| m.id == upstream_model) => res.ok = true,
            Ok(_) => res.error = Some(format!("model {upstream_model} is not listed by GET /models")),
            Err(_) => res.error = Some("GET /models answered something that is not a model list".into()),
        },
        ProbeKind::Chat => match crate::openai::answer_usage(&body) {
            Ok(u) => {
                res.ok = true;
                if let Some(u) = u {
                    res.tokens = (u.prompt_tokens, u.completion_tokens);
                }
            }
            Err(_) => res.error = Some("answered with something that is not JSON".into()),
        },
    }
    res
}

#[derive(serde::Deserialize)]
struct ModelList {
    data: Vec<ModelId>,
}

#[derive(serde::Deserialize)]
struct ModelId {
    id: String,
}

fn ms(t: Instant) -> f64 {
    t.elapsed().as_secs_f64() * 1000.0
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
            tracing::error!(available_ratio = ratio, "more than half of all endpoint/model pairs cannot serve");
        } else if !degraded && was_degraded {
            tracing::info!(available_ratio = ratio, "fewer than half of all pairs are down again");
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
            let due = pair.next_probe_ms.load(Ordering::Relaxed);
            if due > now {
                next_wake = next_wake.min(due);
                continue;
            }
            let state = pair.breaker_state();
            let busy = now.saturating_sub(pair.last_traffic_ms.load(Ordering::Relaxed)) < idle
                && pair.last_traffic_ms.load(Ordering::Relaxed) != 0;
            let every = next_interval(pair.status(), state, busy, interval, idle);
            let plan =
                probe_plan(pair.last_live_ok_ms.load(Ordering::Relaxed), state, pair.breaker_retry_at(), now, every);
            let next = match plan {
                Plan::WaitBreaker(t) => t,
                Plan::SkipLiveOk => now + jittered(every, &mut rng),
                Plan::Probe => {
                    match state {
                        BreakerState::Closed => {}
                        _ => match pair.admit(&rt.breaker, now) {
                            Admission::Trial | Admission::Admitted => {}
                            // Live trials are in flight: they decide; check again soon.
                            Admission::Rejected => {
                                pair.next_probe_ms.store(now + 200, Ordering::Relaxed);
                                continue;
                            }
                        },
                    }
                    let Ok(permit) = limit.clone().try_acquire_owned() else {
                        pair.record(rt, Outcome::Neutral, now, Source::Probe, e.keys.has_usable(), now);
                        continue;
                    };
                    let (gw, rt, e, pair) = (gw.clone(), rt.clone(), e.clone(), pair.clone());
                    let upstream_model = e.cfg.models[i].1.clone();
                    tokio::spawn(async move {
                        let _permit = permit;
                        let auth = match e.keys.next() {
                            Ok(k) => k.map(|(_, h)| h.clone()),
                            Err(()) => {
                                // No usable key: the key re-test decides; nothing to probe with.
                                pair.record(&rt, Outcome::Neutral, now, Source::Probe, false, gw.now_ms());
                                return;
                            }
                        };
                        let r = probe(&e.client, &e, &pair, &upstream_model, &rt.config.health, auth).await;
                        apply_probe(&gw, &rt, &e, &pair, &r, now);
                    });
                    now + jittered(every, &mut rng)
                }
            };
            pair.next_probe_ms.store(next, Ordering::Relaxed);
            next_wake = next_wake.min(next);
        }
        retest_keys(gw, rt, e, now, idle);
    }
    next_wake
}

fn apply_probe(gw: &Gateway, rt: &Runtime, e: &Endpoint, pair: &Pair, r: &ProbeResult, started_ms: u64) {
    let now = gw.now_ms();
    pair.metrics.probe_duration.observe(r.total_ms / 1000.0);
    pair.metrics.probe(r.ok);
    let (p, c) = r.tokens;
    if p + c > 0 {
        let price = rt.config.model(&pair.model);
        if let Some(m) = price {
            let cost =
                Usage { prompt_tokens: p, completion_tokens: c }.cost_usd(m.input_usd_per_mtok, m.output_usd_per_mtok);
            pair.metrics.cost_probe.inc_by(cost);
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
    if !r.ok {
        tracing::debug!(endpoint = %e.cfg.name, model = %pair.model, error = r.error.as_deref().unwrap_or(""), "probe failed");
    }
    pair.record(rt, outcome, started_ms, Source::Probe, e.keys.has_usable(), now);
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
        let (gw, rt, e) = (gw.clone(), rt.clone(), e.clone());
        tokio::spawn(async move {
            let upstream_model = e.cfg.models[0].1.clone();
            let r = probe(&e.client, &e, &pair, &upstream_model, &rt.config.health, Some(header)).await;
            if !r.auth_failed && r.status.is_some() && e.keys.restore(idx) {
                tracing::info!(endpoint = %e.cfg.name, key_index = idx, "API key works again; back in rotation");
                for p in &e.pairs {
                    p.refresh_status(&rt.policy, true);
                }
            }
            let _ = gw;
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
