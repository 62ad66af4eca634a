//! Runtime state: an immutable snapshot ([`Runtime`]) built from a [`Config`], and the live health of every
//! (endpoint, model) [`Pair`], which is carried over to the next snapshot when the config is reloaded.
//!
//! Owns the per-pair breaker, history, latency average and status. Decisions are delegated to the pure modules
//! (`breaker`, `history`, `balance`); this module only holds state and applies outcomes. Does no network I/O.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use parking_lot::Mutex;

use crate::balance::{Balancer, Candidate, Ewma, Strategy, Tier};
use crate::breaker::{Admission, Breaker, BreakerConfig, BreakerState};
use crate::config::{Config, EndpointConfig, ModelConfig, ModelKind};
use crate::history::{Check, History, Status, StatusPolicy};
use crate::metrics::{Metrics, PairMetrics};
use crate::upstream::{self, BaseUrl, HttpClient, KeyPool};

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

/// The live health of one (endpoint, model) pair.
pub struct Pair {
    /// Endpoint name.
    pub endpoint: String,
    /// Public model name.
    pub model: String,
    /// How the model is used (and so probed).
    pub kind: ModelKind,
    base_url: String,
    breaker: Mutex<Breaker>,
    history: Mutex<History>,
    /// Latency average for `least_latency`.
    pub ewma: Ewma,
    status: AtomicU8,
    max_latency_ms: AtomicU64,
    /// Last time (ms) live traffic succeeded on this pair; a probe is skipped when it is recent.
    pub last_live_ok_ms: AtomicU64,
    /// Last time (ms) live traffic was routed to this pair (busy pairs are probed at `interval`).
    pub last_traffic_ms: AtomicU64,
    /// When (ms) the breaker last closed after being open, for slow start (0: never).
    pub recovered_at_ms: AtomicU64,
    /// When (ms) the next probe is due.
    pub next_probe_ms: AtomicU64,
    /// Live requests sent and not answered yet (streams: until they end); see [`InFlight`].
    pub in_flight: AtomicU32,
    /// Live requests sent since the endpoint last answered anything (a response head or a probe answer).
    pub unanswered: AtomicU32,
    /// When (ms) the oldest of the `unanswered` requests was sent.
    pub waiting_since_ms: AtomicU64,
    /// Metric handles.
    pub metrics: PairMetrics,
}

/// One outstanding live request on a pair: counted in [`Pair::in_flight`] from creation to drop, and in
/// [`Pair::unanswered`] until the pair answers something.
pub struct InFlight(Arc<Pair>);

impl InFlight {
    /// Count a request sent to `pair` at `now_ms` until the token is dropped.
    pub fn start(pair: &Arc<Pair>, now_ms: u64) -> InFlight {
        pair.in_flight.fetch_add(1, Ordering::Relaxed);
        if pair.unanswered.fetch_add(1, Ordering::Relaxed) == 0 {
            pair.waiting_since_ms.store(now_ms, Ordering::Relaxed);
        }
        InFlight(pair.clone())
    }
}

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
}

impl Pair {
    fn new(e: &EndpointConfig, model: &str, kind: ModelKind, history: usize, metrics: &Metrics) -> Pair {
        let m = metrics.pair(&e.name, model);
        m.up.set(1);
        Pair {
            endpoint: e.name.clone(),
            model: model.to_string(),
            kind,
            base_url: e.base_url.clone(),
            breaker: Mutex::new(Breaker::new()),
            history: Mutex::new(History::new(history)),
            ewma: Ewma::new(10_000),
            status: AtomicU8::new(0),
            max_latency_ms: AtomicU64::new(e.max_latency_ms),
            last_live_ok_ms: AtomicU64::new(0),
            last_traffic_ms: AtomicU64::new(0),
            recovered_at_ms: AtomicU64::new(0),
            next_probe_ms: AtomicU64::new(0),
            in_flight: AtomicU32::new(0),
            unanswered: AtomicU32::new(0),
            waiting_since_ms: AtomicU64::new(0),
            metrics: m,
        }
    }

    /// The endpoint answered (a response head, whatever its status): it is not stalled.
    pub fn answered(&self) {
        if self.unanswered.load(Ordering::Relaxed) != 0 {
            self.unanswered.store(0, Ordering::Relaxed);
        }
    }

    /// Whether requests pile up on the pair unanswered ([`crate::balance::stalled`]).
    pub fn stalled(&self, now_ms: u64) -> bool {
        let waiting = self.unanswered.load(Ordering::Relaxed);
        waiting != 0
            && crate::balance::stalled(
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

    /// Ask the breaker to let one attempt through.
    pub fn admit(&self, cfg: &BreakerConfig, now_ms: u64) -> Admission {
        let mut b = self.breaker.lock();
        let before = b.state();
        let a = b.admit(cfg, now_ms);
        let after = b.state();
        drop(b);
        if before != after {
            self.on_transition(before, after, now_ms);
        }
        a
    }

    /// Apply an outcome (live or probe) of an attempt admitted at `started_ms` to breaker, history, latency
    /// average, status and gauges. The breaker ignores answers to attempts that began before its current state
    /// (a slow request from before an outage cannot close or reopen a half-open breaker).
    pub fn record(
        &self,
        rt: &Runtime,
        outcome: Outcome,
        started_ms: u64,
        source: Source,
        has_usable_key: bool,
        now_ms: u64,
    ) {
        let cfg = &rt.breaker;
        let transition = {
            let mut b = self.breaker.lock();
            match outcome {
                Outcome::Success(_) => b.record_attempt(cfg, true, started_ms, now_ms),
                Outcome::Failure(_) => b.record_attempt(cfg, false, started_ms, now_ms),
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
                self.refresh_status(&rt.policy, has_usable_key);
                return;
            }
        };
        if ok {
            self.ewma.update(latency, now_ms);
            if source == Source::Live {
                self.last_live_ok_ms.store(now_ms.max(1), Ordering::Relaxed);
            }
        }
        {
            let mut h = self.history.lock();
            h.push(Check { ok, latency_ms: latency, at_ms: now_ms });
        }
        if let Some((from, to)) = transition {
            self.on_transition(from, to, now_ms);
        }
        self.refresh_status(&rt.policy, has_usable_key);
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
            crate::history::status(&h, state, has_usable_key, &policy)
        };
        let old = self.status.swap(status_code(s), Ordering::Relaxed);
        let can_serve = !matches!(s, Status::Unhealthy) && state != BreakerState::Open;
        self.metrics.up.set(i64::from(can_serve));
        if old != status_code(s) && old != 0 {
            tracing::info!(endpoint = %self.endpoint, model = %self.model, from = code_status(old).as_str(), to = s.as_str(), "health status changed");
        }
    }

    fn on_transition(&self, from: BreakerState, to: BreakerState, now_ms: u64) {
        self.metrics.breaker.set(to.gauge());
        if from != BreakerState::Closed && to == BreakerState::Closed {
            self.recovered_at_ms.store(now_ms.max(1), Ordering::Relaxed);
        }
        match to {
            BreakerState::Open => {
                tracing::warn!(endpoint = %self.endpoint, model = %self.model, from = from.as_str(), "circuit breaker opened")
            }
            _ => {
                tracing::info!(endpoint = %self.endpoint, model = %self.model, from = from.as_str(), to = to.as_str(), "circuit breaker changed")
            }
        }
    }

    /// A snapshot for `/status`.
    pub fn view(&self, cfg: &BreakerConfig, now_ms: u64) -> PairView {
        let h = self.history.lock();
        let tier = self.tier(cfg, now_ms);
        PairView {
            model: self.model.clone(),
            status: self.status().as_str(),
            breaker: self.breaker_state().as_str(),
            latency_ms: h.mean_latency_ms(),
            p50_ms: h.p50_latency_ms(),
            p95_ms: h.p95_latency_ms(),
            success_rate: h.success_rate(),
            checks: h.len(),
            can_serve: tier != Tier::Unavailable && self.status() != Status::Unhealthy,
            in_flight: self.in_flight.load(Ordering::Relaxed),
            unanswered: self.unanswered.load(Ordering::Relaxed),
        }
    }

    /// The 95th percentile latency of recent successes, ms.
    pub fn p95_ms(&self) -> Option<f64> {
        self.history.lock().p95_latency_ms()
    }
}

/// One upstream endpoint in a snapshot.
pub struct Endpoint {
    /// Its configuration.
    pub cfg: EndpointConfig,
    /// Parsed base URL.
    pub base: BaseUrl,
    /// `…/chat/completions` and `…/embeddings` under the base URL, built once.
    pub chat_uri: http::Uri,
    /// See `chat_uri`.
    pub embeddings_uri: http::Uri,
    /// The name as an `x-sheepdog-endpoint` header value.
    pub name_header: http::HeaderValue,
    /// Pooled client (kept across reloads when the connection settings are unchanged).
    pub client: HttpClient,
    /// API keys in rotation (kept across reloads when the keys are unchanged).
    pub keys: Arc<KeyPool>,
    /// False while manually drained (kept across reloads).
    pub enabled: Arc<AtomicBool>,
    /// Its pairs, in the order of `cfg.models`.
    pub pairs: Vec<Arc<Pair>>,
}

impl Endpoint {
    /// Whether the endpoint may take traffic at all: enabled and with a usable key.
    pub fn ready(&self) -> bool {
        self.enabled.load(Ordering::Relaxed) && self.keys.has_usable()
    }
}

/// One endpoint serving a model.
pub struct Member {
    /// The endpoint.
    pub endpoint: Arc<Endpoint>,
    /// The model's name upstream.
    pub upstream_model: String,
    /// Health of this pair.
    pub pair: Arc<Pair>,
}

/// A public model in a snapshot.
pub struct Model {
    /// Its configuration.
    pub cfg: ModelConfig,
    /// Endpoint selection state.
    pub balancer: Balancer,
    /// The endpoints that serve it.
    pub members: Vec<Member>,
    /// The name as an `x-sheepdog-model` header value.
    pub name_header: http::HeaderValue,
}

/// A name as a header value (names that are not valid header text become empty).
fn header_value(s: &str) -> http::HeaderValue {
    http::HeaderValue::from_str(s).unwrap_or_else(|_| http::HeaderValue::from_static(""))
}

/// An immutable snapshot of configuration plus handles to live state; swapped whole on reload.
pub struct Runtime {
    /// The configuration it was built from.
    pub config: Arc<Config>,
    /// Endpoints in file order.
    pub endpoints: Vec<Arc<Endpoint>>,
    /// Public models by name.
    pub models: HashMap<String, Arc<Model>>,
    /// `GET /v1/models` body.
    pub models_json: Bytes,
    /// Breaker parameters.
    pub breaker: BreakerConfig,
    /// Status parameters (max latency is per pair).
    pub policy: StatusPolicy,
}

impl Runtime {
    /// Build a snapshot; pairs, key pools, clients and drain flags of `old` are reused where unchanged.
    pub fn build(config: Config, old: Option<&Runtime>, metrics: &Metrics) -> Runtime {
        let kinds: HashMap<&str, ModelKind> = config.models.iter().map(|m| (m.name.as_str(), m.kind)).collect();
        let mut endpoints = Vec::with_capacity(config.endpoints.len());
        for e in &config.endpoints {
            let prev = old.and_then(|o| o.endpoints.iter().find(|p| p.cfg.name == e.name));
            let same_conn = prev.filter(|p| p.cfg.base_url == e.base_url && p.cfg.connect_timeout == e.connect_timeout);
            let client = match same_conn {
                Some(p) => p.client.clone(),
                None => upstream::client(e.connect_timeout),
            };
            let keys = match prev.filter(|p| p.keys.same_keys(&e.api_keys)) {
                Some(p) => p.keys.clone(),
                None => Arc::new(KeyPool::new(&e.api_keys)),
            };
            let enabled = prev.map(|p| p.enabled.clone()).unwrap_or_else(|| Arc::new(AtomicBool::new(true)));
            let pairs = e
                .models
                .iter()
                .map(|(public, _)| {
                    let kind = kinds.get(public.as_str()).copied().unwrap_or(ModelKind::Chat);
                    let carried = prev
                        .and_then(|p| p.pairs.iter().find(|x| &x.model == public && x.base_url == e.base_url))
                        .cloned();
                    match carried {
                        Some(p) => {
                            p.max_latency_ms.store(e.max_latency_ms, Ordering::Relaxed);
                            p
                        }
                        None => Arc::new(Pair::new(e, public, kind, config.health.history, metrics)),
                    }
                })
                .collect();
            let base = BaseUrl::parse(&e.base_url).unwrap_or_else(|| unreachable!("validated by config"));
            endpoints.push(Arc::new(Endpoint {
                cfg: e.clone(),
                chat_uri: base.join("/chat/completions"),
                embeddings_uri: base.join("/embeddings"),
                name_header: header_value(&e.name),
                base,
                client,
                keys,
                enabled,
                pairs,
            }));
        }
        if let Some(o) = old {
            for p in o.endpoints.iter().flat_map(|e| e.pairs.iter()) {
                let kept = endpoints.iter().any(|e| e.pairs.iter().any(|x| Arc::ptr_eq(x, p)));
                if !kept {
                    metrics.remove_pair(&p.endpoint, &p.model);
                }
            }
        }
        let mut models = HashMap::with_capacity(config.models.len());
        for m in &config.models {
            let members: Vec<Member> = endpoints
                .iter()
                .filter_map(|e| {
                    let i = e.cfg.models.iter().position(|(p, _)| p == &m.name)?;
                    Some(Member {
                        endpoint: e.clone(),
                        upstream_model: e.cfg.models[i].1.clone(),
                        pair: e.pairs[i].clone(),
                    })
                })
                .collect();
            let balancer = Balancer::new(m.strategy, members.len());
            models.insert(
                m.name.clone(),
                Arc::new(Model { cfg: m.clone(), balancer, members, name_header: header_value(&m.name) }),
            );
        }
        let names: Vec<&str> = config.models.iter().map(|m| m.name.as_str()).collect();
        let models_json = crate::openai::model_list(&names, 1_735_689_600);
        let breaker = BreakerConfig {
            failure_threshold: config.breaker.failure_threshold,
            recovery_timeout_ms: config.breaker.recovery_timeout.as_millis() as u64,
            max_recovery_timeout_ms: config.breaker.max_recovery_timeout.as_millis() as u64,
            success_threshold: config.breaker.success_threshold,
            half_open_max_trials: config.breaker.half_open_max_trials,
        };
        let policy =
            StatusPolicy { max_latency_ms: 2000.0, min_success_rate: config.health.min_success_rate, window: 20 };
        Runtime { config: Arc::new(config), endpoints, models, models_json, breaker, policy }
    }

    /// Every pair with its endpoint.
    pub fn pairs(&self) -> impl Iterator<Item = (&Arc<Endpoint>, &Arc<Pair>)> {
        self.endpoints.iter().flat_map(|e| e.pairs.iter().map(move |p| (e, p)))
    }

    /// Whether a pair can serve now: endpoint ready and pair not unavailable.
    pub fn can_serve(&self, e: &Endpoint, p: &Pair, now_ms: u64) -> bool {
        e.ready() && p.tier(&self.breaker, now_ms) != Tier::Unavailable
    }

    /// Fraction of pairs that can serve, and whether more than half cannot.
    pub fn availability(&self, now_ms: u64) -> (f64, bool) {
        let (mut total, mut up) = (0usize, 0usize);
        for (e, p) in self.pairs() {
            total += 1;
            if self.can_serve(e, p, now_ms) {
                up += 1;
            }
        }
        if total == 0 {
            return (0.0, true);
        }
        let ratio = up as f64 / total as f64;
        (ratio, up * 2 < total)
    }

    /// Candidates of a model for the balancer (fills `out`, reusing its allocation). Except under the
    /// priority strategy, a healthy member on which unanswered requests pile up ([`Pair::stalled`]) is offered
    /// as degraded, so that new requests go to its peers while it does not answer.
    pub fn candidates(&self, model: &Model, now_ms: u64, slow_start_ms: u64, out: &mut Vec<Candidate>) {
        out.clear();
        let stall_aware = model.balancer.strategy() != Strategy::Priority;
        for m in &model.members {
            let mut tier = if m.endpoint.ready() { m.pair.tier(&self.breaker, now_ms) } else { Tier::Unavailable };
            if tier == Tier::Healthy && stall_aware && m.pair.stalled(now_ms) {
                tier = Tier::Degraded;
            }
            let rec = m.pair.recovered_at_ms.load(Ordering::Relaxed);
            let slow_start = if rec == 0 || slow_start_ms == 0 {
                1.0
            } else {
                crate::balance::slow_start_factor(now_ms.saturating_sub(rec), slow_start_ms)
            };
            out.push(Candidate {
                weight: m.endpoint.cfg.weight,
                priority: m.endpoint.cfg.priority,
                latency_ewma_ms: m.pair.ewma.value(),
                tier,
                slow_start,
            });
        }
    }
}
