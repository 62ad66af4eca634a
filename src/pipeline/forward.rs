//! The *forward* phase: find an upstream that answers. Candidates come from each model's balancer and are
//! admitted by their breakers; a retriable failure moves to the next candidate, then to the chain's fallback
//! models; after a full pass, backoff (or Retry-After) and another pass, within `max_attempts` and the
//! deadline. A model with `hedge_after` races a second attempt when the first is late. When nothing can be
//! tried, the request waits in a bounded queue until a candidate may serve again (woken by
//! [`crate::state::Changes`], or when an open breaker's recovery time comes) or `queue_timeout` passes.
//!
//! Every attempt's metrics notes go to *finish*; the error when nothing served names every attempt.

use std::sync::Arc;
use std::time::Duration;

use http::StatusCode;
use sheepdog_policy::balance::Candidate;
use sheepdog_policy::breaker::Admission;
use sheepdog_policy::retry::Backoff;
use tokio::time::Instant;

use super::attempt::{attempt, Answer, AttemptError, AttemptResult, FailKind};
use super::finish::Finish;
use super::route::Chain;
use super::Ctx;
use crate::config::HedgeAfter;
use crate::protocol::ApiError;
use crate::state::{Member, Model};

/// What forwarding found.
pub(super) enum Forwarded {
    /// An upstream answered: the answer, the model that served and its member.
    Answer { answer: Answer, model: Arc<Model>, member: usize, attempts: u32 },
    /// Nothing served and the requested model has a static fallback answer.
    Static { attempts: u32 },
}

thread_local! {
    static CANDIDATES: std::cell::RefCell<Vec<Candidate>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Pick a member of `model` not yet tried in this pass and admit it through its breaker: its index and the
/// admission time (the breaker judges the attempt's answer against it).
fn pick(ctx: &Ctx<'_>, model: &Model, tried: &mut Vec<(usize, usize)>, mi: usize) -> Option<(usize, u64)> {
    let now = ctx.gw.now_ms();
    let slow = ctx.rt.config.health.slow_start.as_millis() as u64;
    let breaker = &ctx.rt.policy.breaker;
    loop {
        let idx = CANDIDATES.with(|c| {
            let mut c = c.borrow_mut();
            model.candidates(breaker, now, slow, &mut c);
            model.balancer.pick(&c, |i| !tried.contains(&(mi, i)), &mut rand::thread_rng())
        })?;
        tried.push((mi, idx));
        match model.members[idx].pair.admit(breaker, now) {
            Admission::Admitted | Admission::Trial => return Some((idx, now)),
            Admission::Rejected => continue,
        }
    }
}

/// Forward the request along `chain` until an upstream answers.
pub(super) async fn forward(ctx: &Ctx<'_>, chain: &Chain, fin: &mut Finish) -> Result<Forwarded, ApiError> {
    let retry_cfg = &ctx.rt.config.retry;
    let backoff = Backoff {
        base_ms: retry_cfg.backoff_base.as_millis() as u64,
        max_ms: retry_cfg.backoff_max.as_millis() as u64,
    };
    let mut attempts = 0u32;
    let mut errors: Vec<AttemptError> = Vec::new();
    let mut tried: Vec<(usize, usize)> = Vec::new();
    let mut pass = 0u32;
    let mut queued = false;
    'passes: loop {
        let before = attempts;
        for (mi, m) in chain.iter().enumerate() {
            while attempts < retry_cfg.max_attempts {
                if Instant::now() >= ctx.deadline {
                    break 'passes;
                }
                let Some((idx, admitted_ms)) = pick(ctx, m, &mut tried, mi) else { break };
                attempts += 1;
                let hedge = if attempts == 1 { hedge_delay(m, &m.members[idx]) } else { None };
                let (result, idx) = match hedge {
                    None => (attempt(ctx, m, &m.members[idx], admitted_ms).await, idx),
                    Some(delay) => {
                        let can_hedge = attempts < retry_cfg.max_attempts;
                        let h = Hedge { mi, first: (idx, admitted_ms), delay, can_hedge };
                        // Boxed: two attempts run at once there, twice an attempt's state in every request's.
                        Box::pin(hedged(ctx, m, h, &mut tried, &mut attempts, &mut errors, fin)).await
                    }
                };
                match result {
                    AttemptResult::Answered(answer, notes) => {
                        for n in notes {
                            fin.note(n);
                        }
                        return Ok(Forwarded::Answer { answer, model: m.clone(), member: idx, attempts });
                    }
                    AttemptResult::Failed(e, notes) => {
                        for n in notes {
                            fin.note(n);
                        }
                        tracing::debug!(endpoint = %e.endpoint, model = %e.model, what = %e.what, "attempt failed");
                        errors.push(e);
                    }
                }
            }
        }
        if attempts >= retry_cfg.max_attempts {
            break;
        }
        if attempts == before {
            // Nothing could be tried in this pass: wait in the bounded queue for a candidate to recover.
            if queued || !wait_for_candidate(ctx, chain).await {
                break;
            }
            queued = true;
            tried.clear();
            continue;
        }
        // Every candidate was tried once: back off, honouring Retry-After, then try again.
        let retry_after = errors.iter().rev().take((attempts - before) as usize).filter_map(|e| e.retry_after_ms).min();
        let delay = backoff.delay_ms(pass, &mut rand::thread_rng()).max(retry_after.unwrap_or(0));
        let wake = Instant::now() + Duration::from_millis(delay);
        if wake >= ctx.deadline {
            break;
        }
        tokio::time::sleep_until(wake).await;
        pass += 1;
        tried.clear();
    }
    fin.set_attempts(attempts);
    let model = &chain[0];
    if model.cfg.static_fallback.is_some() {
        return Ok(Forwarded::Static { attempts });
    }
    Err(exhausted(model, attempts, &errors, chain))
}

/// How long the first attempt may take before a hedged second one starts, if the model hedges.
fn hedge_delay(model: &Model, member: &Member) -> Option<Duration> {
    match model.cfg.hedge_after? {
        HedgeAfter::Fixed(d) => Some(d),
        HedgeAfter::P95 => member.pair.p95_ms().map(|ms| Duration::from_secs_f64(ms.max(1.0) / 1000.0)),
    }
}

/// A hedged first attempt: the model's index in the chain, the first member and its admission time, the delay
/// after which a second attempt starts, and whether one may.
struct Hedge {
    mi: usize,
    first: (usize, u64),
    delay: Duration,
    can_hedge: bool,
}

/// Run the first attempt; if it has not answered after the delay, start a second on another member. The first
/// answer wins; the other attempt is dropped, which closes its upstream connection. A failure of one waits for
/// the other. Returns the result and the member that produced it.
async fn hedged(
    ctx: &Ctx<'_>,
    m: &Model,
    h: Hedge,
    tried: &mut Vec<(usize, usize)>,
    attempts: &mut u32,
    errors: &mut Vec<AttemptError>,
    fin: &mut Finish,
) -> (AttemptResult, usize) {
    let (idx, admitted_ms) = h.first;
    let first = attempt(ctx, m, &m.members[idx], admitted_ms);
    tokio::pin!(first);
    tokio::select! {
        r = &mut first => return (r, idx),
        _ = tokio::time::sleep(h.delay), if h.can_hedge => {}
    }
    let Some((idx2, admitted2)) = pick(ctx, m, tried, h.mi) else { return (first.await, idx) };
    *attempts += 1;
    fin.hedged();
    tracing::debug!(model = %m.cfg.name, first = %m.members[idx].endpoint.cfg.name,
        second = %m.members[idx2].endpoint.cfg.name, "hedging a slow attempt");
    let second = attempt(ctx, m, &m.members[idx2], admitted2);
    tokio::pin!(second);
    let mut lost = |e: AttemptError, notes: super::attempt::Notes| {
        for n in notes {
            fin.note(n);
        }
        errors.push(e);
    };
    tokio::select! {
        r = &mut first => match r {
            AttemptResult::Failed(e, notes) => {
                lost(e, notes);
                (second.await, idx2)
            }
            r => (r, idx),
        },
        r = &mut second => match r {
            AttemptResult::Failed(e, notes) => {
                lost(e, notes);
                (first.await, idx)
            }
            r => (r, idx2),
        },
    }
}

/// Wait up to `queue_timeout` for any member of the chain to be able to serve. False when none recovered.
/// Waits on the recovery signal and on the earliest time an open breaker admits a trial: no polling.
async fn wait_for_candidate(ctx: &Ctx<'_>, chain: &Chain) -> bool {
    let timeout = ctx.rt.config.retry.queue_timeout;
    if timeout.is_zero() {
        return false;
    }
    let Ok(_permit) = ctx.gw.queue.try_acquire() else { return false };
    let _queued = Queued::enter(&ctx.gw.metrics.queued);
    let until = (Instant::now() + timeout).min(ctx.deadline);
    let members = || chain.iter().flat_map(|m| m.members.iter());
    loop {
        // Registered before the check, so a change between the check and the wait is not missed.
        let changed = ctx.gw.changes.notified();
        tokio::pin!(changed);
        changed.as_mut().enable();
        let now = ctx.gw.now_ms();
        if members().any(|x| ctx.rt.can_serve(&x.endpoint, &x.pair, now)) {
            return true;
        }
        let next_trial_ms = members().filter_map(|x| x.pair.breaker_retry_at()).filter(|&t| t > now).min();
        let wake = match next_trial_ms {
            Some(t) => (Instant::now() + Duration::from_millis(t - now)).min(until),
            None => until,
        };
        if Instant::now() >= until {
            return false;
        }
        tokio::select! {
            _ = &mut changed => {}
            _ = tokio::time::sleep_until(wake) => {}
        }
    }
}

/// One request counted in `sheepdog_requests_queued` while it waits, however the wait ends.
struct Queued<'a>(&'a prometheus::IntGauge);

impl<'a> Queued<'a> {
    fn enter(g: &'a prometheus::IntGauge) -> Queued<'a> {
        g.inc();
        Queued(g)
    }
}

impl Drop for Queued<'_> {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// The error when nothing could serve: names every attempt, or why nothing could be tried.
fn exhausted(model: &Model, attempts: u32, errors: &[AttemptError], chain: &Chain) -> ApiError {
    let name = &model.cfg.name;
    if errors.is_empty() {
        let why: Vec<String> = chain
            .iter()
            .flat_map(|m| m.members.iter())
            .map(|x| {
                let reason = if !x.endpoint.enabled() {
                    "disabled".to_string()
                } else if !x.endpoint.keys.has_usable() {
                    "no usable API key".to_string()
                } else {
                    format!("breaker {}", x.pair.breaker_state().as_str())
                };
                format!("{}/{}: {reason}", x.endpoint.cfg.name, x.pair.model())
            })
            .collect();
        return ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "service_unavailable",
            "no_upstream_available",
            format!("No upstream can serve `{name}` now ({}).", why.join("; ")),
        )
        .retry_after(1);
    }
    let list: Vec<String> = errors.iter().map(|e| format!("{}/{}: {}", e.endpoint, e.model, e.what)).collect();
    let message = format!("No upstream could serve `{name}` after {attempts} attempt(s): {}.", list.join("; "));
    let all = |k: FailKind| errors.iter().all(|e| e.kind == k);
    if all(FailKind::RateLimited) {
        ApiError::new(StatusCode::TOO_MANY_REQUESTS, "rate_limit_error", "upstream_rate_limited", message)
            .retry_after(errors.iter().filter_map(|e| e.retry_after_ms).min().unwrap_or(1000).div_ceil(1000))
    } else if all(FailKind::Timeout) {
        ApiError::new(StatusCode::GATEWAY_TIMEOUT, "timeout", "upstream_timeout", message)
    } else if all(FailKind::Garbage) {
        ApiError::bad_upstream(message)
    } else {
        ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "service_unavailable", "no_upstream_available", message)
            .retry_after(1)
    }
}
