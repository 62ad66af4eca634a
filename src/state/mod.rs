//! Runtime state: an immutable snapshot ([`Runtime`]) built from a [`Config`], and the live health of every
//! (endpoint, model) [`Pair`], which is carried over to the next snapshot when the config is reloaded.
//!
//! Owns endpoints (transport, key pool, manual drain) and models (members, balancer) of a snapshot, and the
//! [`Changes`] signal that wakes requests waiting for a candidate to recover. Decisions are the policy crate's;
//! this module only holds state and applies outcomes. Does no network I/O.

pub mod budgets;
pub mod clients;
mod pair;
pub mod routes;
pub mod saved;
pub mod sync;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use sheepdog_policy::balance::{Balancer, Candidate, Strategy, Tier};
use sheepdog_policy::breaker::BreakerConfig;
use sheepdog_policy::history::StatusPolicy;
use sheepdog_policy::pricing::{Multiplier, Pricing};
use tokio::sync::Notify;

pub use budgets::Budget;
pub use clients::{Client, Clients, ParallelGuard};
pub use pair::{InFlight, Outcome, Pair, PairPolicy, PairSpec, PairView, SavedPair, Source};
pub use routes::Alias;
pub use sync::{Event, Outbox};

use crate::config::{Config, EndpointConfig, ModelConfig, ModelKind};
use crate::metrics::{Metrics, ModelMetrics};
use crate::upstream::{self, BaseUrl, KeyPool, MemoryUpstream, Transport};

/// Wakes requests that wait for a candidate to recover, whenever something that decides whether a pair can
/// serve changes: a breaker transition, a status change, a manual enable, a restored key, a reload. Shared by
/// every snapshot of a gateway.
#[derive(Clone, Default)]
pub struct Changes(pub(crate) Arc<Notify>);

impl Changes {
    /// Wake every current waiter.
    pub fn notify(&self) {
        self.0.notify_waiters();
    }

    /// A future that completes at the next [`Changes::notify`] after it was enabled.
    pub fn notified(&self) -> tokio::sync::futures::Notified<'_> {
        self.0.notified()
    }
}

/// One upstream endpoint in a snapshot.
pub struct Endpoint {
    /// Its configuration.
    pub cfg: EndpointConfig,
    /// Its name, shared (request-log rows carry it without copying).
    pub name: Arc<str>,
    /// Parsed base URL.
    pub base: BaseUrl,
    /// `…/chat/completions` and `…/embeddings` under the base URL, built once.
    pub chat_uri: http::Uri,
    /// See `chat_uri`.
    pub embeddings_uri: http::Uri,
    /// The name as an `x-sheepdog-endpoint` header value.
    pub name_header: http::HeaderValue,
    /// How requests reach it (the pooled client is kept across reloads when the connection settings are
    /// unchanged).
    pub transport: Transport,
    /// API keys in rotation (kept across reloads when the keys are unchanged).
    pub keys: Arc<KeyPool>,
    /// False while manually drained (kept across reloads).
    enabled: Arc<AtomicBool>,
    /// What this endpoint bills relative to the list price.
    pub price_multiplier: Multiplier,
    /// Its pairs, in the order of `cfg.models`.
    pub pairs: Vec<Arc<Pair>>,
    /// Its streams were seen to report usage (when asked): the relay need not keep a stream's text to count
    /// its tokens. Learned per snapshot.
    pub stream_usage: AtomicBool,
}

impl Endpoint {
    /// Whether the endpoint may take traffic at all: enabled and with a usable key.
    pub fn ready(&self) -> bool {
        self.enabled() && self.keys.has_usable()
    }

    /// False while manually drained.
    pub fn enabled(&self) -> bool {
        self.enabled.load(Ordering::Relaxed)
    }

    /// Drain (false) or undrain (true) the endpoint by hand; probes never change this.
    pub fn set_enabled(&self, enabled: bool, changes: &Changes) {
        if self.enabled.swap(enabled, Ordering::Relaxed) != enabled && enabled {
            changes.notify();
        }
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
    /// Its name, shared (request-log rows carry it without copying).
    pub name: Arc<str>,
    /// Its token prices.
    pub pricing: Pricing,
    /// Endpoint selection state.
    pub balancer: Balancer,
    /// The endpoints that serve it.
    pub members: Vec<Member>,
    /// The name as an `x-sheepdog-model` header value.
    pub name_header: http::HeaderValue,
    /// Request-level metric handles of the model.
    pub metrics: ModelMetrics,
}

impl Model {
    /// Its candidates for the balancer at `now_ms` (fills `out`, reusing its allocation). Except under the
    /// priority strategy, a stalled member is offered as degraded ([`Pair::candidate`]).
    pub fn candidates(&self, breaker: &BreakerConfig, now_ms: u64, slow_start_ms: u64, out: &mut Vec<Candidate>) {
        out.clear();
        let stall_aware = self.balancer.strategy() != Strategy::Priority;
        out.extend(self.members.iter().map(|m| {
            let e = &m.endpoint;
            m.pair.candidate(breaker, now_ms, e.ready(), stall_aware, slow_start_ms, (e.cfg.weight, e.cfg.priority))
        }));
    }
}

/// A name as a header value (names that are not valid header text become empty).
fn header_value(s: &str) -> http::HeaderValue {
    http::HeaderValue::from_str(s).unwrap_or_else(|_| http::HeaderValue::from_static(""))
}

/// Live state that outlives snapshots and the in-memory upstreams tests put in place of URLs.
pub struct Shared<'a> {
    /// Metric families.
    pub metrics: &'a Metrics,
    /// The recovery signal.
    pub changes: &'a Changes,
    /// In-memory upstreams by endpoint name (tests).
    pub memory: &'a HashMap<String, Arc<dyn MemoryUpstream>>,
    /// Where pairs share their breaker changes (off: memory backend).
    pub outbox: &'a Outbox,
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
    /// Breaker and status parameters.
    pub policy: PairPolicy,
    /// Client keys and their live limits (none: anonymous requests).
    pub clients: Clients,
    /// Budgets, in file order, with their live ledgers.
    pub budgets: Vec<Arc<Budget>>,
    /// Route aliases by name.
    pub aliases: HashMap<String, Alias>,
}

impl Runtime {
    /// Build a snapshot; pairs, key pools, clients and drain flags of `old` are reused where unchanged.
    pub fn build(config: Config, old: Option<&Runtime>, shared: &Shared<'_>) -> Runtime {
        let kinds: HashMap<&str, ModelKind> = config.models.iter().map(|m| (m.name.as_str(), m.kind)).collect();
        let mut endpoints = Vec::with_capacity(config.endpoints.len());
        for e in &config.endpoints {
            let prev = old.and_then(|o| o.endpoints.iter().find(|p| p.cfg.name == e.name));
            let same_conn = prev.filter(|p| p.cfg.base_url == e.base_url && p.cfg.connect_timeout == e.connect_timeout);
            let base = BaseUrl::parse(&e.base_url).unwrap_or_else(|| unreachable!("validated by config"));
            let transport = match (shared.memory.get(&e.name), same_conn) {
                (Some(m), _) => Transport::Memory(m.clone()),
                (None, Some(p)) => p.transport.clone(),
                (None, None) => Transport::Http(upstream::Pool::new(&base.join("/"), e.connect_timeout)),
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
                    let carried = prev.and_then(|p| p.pairs.iter().find(|x| x.same(&e.base_url, public))).cloned();
                    match carried {
                        Some(p) => {
                            p.set_max_latency_ms(e.max_latency_ms);
                            p
                        }
                        None => {
                            let spec = PairSpec {
                                endpoint: &e.name,
                                base_url: &e.base_url,
                                max_latency_ms: e.max_latency_ms,
                                model: public,
                                kind: kinds.get(public.as_str()).copied().unwrap_or(ModelKind::Chat),
                                history: config.health.history,
                            };
                            let metrics = shared.metrics.pair(&e.name, public, spec.kind);
                            Arc::new(Pair::new(&spec, metrics, shared.changes.clone(), shared.outbox.clone()))
                        }
                    }
                })
                .collect();
            endpoints.push(Arc::new(Endpoint {
                cfg: e.clone(),
                chat_uri: base.join("/chat/completions"),
                embeddings_uri: base.join("/embeddings"),
                name: Arc::from(e.name.as_str()),
                name_header: header_value(&e.name),
                base,
                transport,
                keys,
                enabled,
                price_multiplier: e.multiplier(),
                pairs,
                stream_usage: AtomicBool::new(prev.is_some_and(|p| p.stream_usage.load(Ordering::Relaxed))),
            }));
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
            let model = Model {
                cfg: m.clone(),
                pricing: m.pricing(),
                balancer: Balancer::new(m.strategy, members.len()),
                members,
                name: Arc::from(m.name.as_str()),
                name_header: header_value(&m.name),
                metrics: shared.metrics.model(&m.name),
            };
            models.insert(m.name.clone(), Arc::new(model));
        }
        let mut names: Vec<&str> = config.models.iter().map(|m| m.name.as_str()).collect();
        names.extend(config.aliases());
        let models_json = crate::protocol::openai::model_list(&names, crate::protocol::openai::MODELS_CREATED);
        let policy = PairPolicy {
            breaker: BreakerConfig {
                failure_threshold: config.breaker.failure_threshold,
                recovery_timeout_ms: config.breaker.recovery_timeout.as_millis() as u64,
                max_recovery_timeout_ms: config.breaker.max_recovery_timeout.as_millis() as u64,
                success_threshold: config.breaker.success_threshold,
                half_open_max_trials: config.breaker.half_open_max_trials,
            },
            status: StatusPolicy {
                max_latency_ms: 2000.0,
                min_success_rate: config.health.min_success_rate,
                window: 20,
            },
        };
        let clients = Clients::build(&config.clients, old.map(|o| &o.clients));
        let budgets = budgets::build(
            &config.budgets,
            old.map_or(&[][..], |o| &o.budgets[..]),
            crate::clock::unix_ms(),
            &shared.metrics.budgets,
        );
        let aliases = routes::build(&config.routes);
        Runtime { config: Arc::new(config), endpoints, models, models_json, policy, clients, budgets, aliases }
    }

    /// Every pair with its endpoint.
    pub fn pairs(&self) -> impl Iterator<Item = (&Arc<Endpoint>, &Arc<Pair>)> {
        self.endpoints.iter().flat_map(|e| e.pairs.iter().map(move |p| (e, p)))
    }

    /// Whether a pair can serve now: endpoint ready and pair not unavailable.
    pub fn can_serve(&self, e: &Endpoint, p: &Pair, now_ms: u64) -> bool {
        e.ready() && p.tier(&self.policy.breaker, now_ms) != Tier::Unavailable
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

    /// The (endpoint, model) label pairs of this snapshot, for pruning metrics of pairs that are gone.
    pub fn pair_labels(&self) -> impl Iterator<Item = (&str, &str)> {
        self.pairs().map(|(_, p)| (p.endpoint(), p.model()))
    }
}
