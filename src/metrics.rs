//! Prometheus metrics with the names and labels of the contract.
//!
//! Families are registered once per process; each (endpoint, model) pair holds its own child handles, so the
//! hot path only increments atomics. Renders the text format for `GET /metrics`; makes no decisions.
//! The OpenTelemetry GenAI families are in [`genai`], the fixed-reason rejection counters in [`rejections`].

mod budgets;
mod genai;
mod rejections;

use parking_lot::Mutex;
use prometheus::{
    Counter, CounterVec, Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

pub use budgets::{BudgetGauges, BudgetMetrics};
pub use genai::{GenAi, Operation, PairGenAi};
pub use rejections::{Reason, Rejections};

use crate::config::ModelKind;

/// Where the count of dropped log lines comes from (the process's log writer, set once at start).
static LOG_LINES_DROPPED: std::sync::OnceLock<Box<dyn Fn() -> u64 + Send + Sync>> = std::sync::OnceLock::new();

/// Name the source of `sheepdog_log_lines_dropped_total` (the first call wins).
pub fn set_log_lines_dropped(count: impl Fn() -> u64 + Send + Sync + 'static) {
    let _ = LOG_LINES_DROPPED.set(Box::new(count));
}

/// Buckets of the `sheepdog_*_seconds` histograms: each bound at most about 1.5 times the one below from
/// 5 ms to 2 min, so both a 10 ms probe and a 60 s completion fall in a narrow bucket.
pub const LATENCY_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.025, 0.04, 0.06, 0.1, 0.15, 0.25, 0.4, 0.6, 1.0, 1.5, 2.5, 4.0, 6.0,
    10.0, 15.0, 25.0, 40.0, 60.0, 90.0, 120.0, 300.0,
];

/// Every metric family of the gateway.
pub struct Metrics {
    registry: Registry,
    upstream_up: IntGaugeVec,
    breaker_state: IntGaugeVec,
    probe_duration: HistogramVec,
    request_duration: HistogramVec,
    ttft: HistogramVec,
    requests: IntCounterVec,
    tokens: IntCounterVec,
    cost: CounterVec,
    /// `sheepdog_global_degraded`.
    pub global_degraded: IntGauge,
    /// `sheepdog_state_backend_up`: 1 while the state backend is reachable (always, for `memory`).
    pub state_up: IntGauge,
    /// `sheepdog_probes_total{endpoint, model, result}` (extra: probes sent, by outcome).
    probes: IntCounterVec,
    /// `sheepdog_request_log_written_total`: rows written to the request log.
    pub log_written: IntCounter,
    /// `sheepdog_request_log_dropped_total`: requests the log could not take (queue full or write failed).
    pub log_dropped: IntCounter,
    /// `sheepdog_log_lines_dropped_total`: log lines (the access line and others) dropped because the writer
    /// thread fell behind; read from [`set_log_lines_dropped`]'s source at each scrape.
    log_lines_dropped: IntCounter,
    client_requests: IntCounterVec,
    /// `sheepdog_connections_open`: client connections open now.
    pub connections_open: IntGauge,
    /// `sheepdog_connections_rejected_total`: client connections closed at once, past `max_connections`.
    pub connections_rejected: IntCounter,
    /// `sheepdog_accept_errors_total`: failed accepts (mostly: out of file descriptors).
    pub accept_errors: IntCounter,
    /// `sheepdog_config_reloads_total{result}`.
    reloads: IntCounterVec,
    /// Request-level handles for a model name that is not configured (label value `unknown`).
    pub unknown_model: ModelMetrics,
    /// `gen_ai_client_operation_duration_seconds` and `gen_ai_client_token_usage`.
    pub genai: GenAi,
    /// `sheepdog_rejections_total{reason}`.
    pub rejections: Rejections,
    /// `sheepdog_budget_*`.
    pub budgets: BudgetMetrics,
    /// `sheepdog_budget_webhook_failures_total`: budget webhook POSTs that failed or timed out.
    pub webhook_failures: IntCounter,
    /// `sheepdog_requests_in_flight`: client requests on `/v1/*` not finished yet (open streams included).
    pub in_flight: IntGauge,
    /// `sheepdog_requests_queued`: client requests waiting in the recovery queue for a candidate.
    pub queued: IntGauge,
    /// `sheepdog_request_log_queue_depth`: finished requests queued for the request log's writer.
    pub log_queue_depth: IntGauge,
    /// `sheepdog_request_log_queue_capacity`: rows the queue holds before it drops.
    pub log_queue_capacity: IntGauge,
    /// `sheepdog_config_last_reload_successful`: 0 after a refused reload until the next good one.
    reload_ok: IntGauge,
    per_model: ModelFamilies,
    transitions: IntCounterVec,
}

/// Families labelled by configured model only.
#[derive(Clone)]
struct ModelFamilies {
    failovers: IntCounterVec,
    retries: IntCounterVec,
    hedges: IntCounterVec,
}

/// The `model` label of a request for a model that is not configured: label values come from configuration
/// only, so a typo cannot create a series.
pub const UNKNOWN_MODEL: &str = "unknown";

/// The `client` label of a request without a client key.
pub const ANONYMOUS: &str = "anonymous";

/// Request-level handles of one configured model (and one for unknown models).
pub struct ModelMetrics {
    model: String,
    client_requests: IntCounterVec,
    /// Cached `sheepdog_client_requests_total{client, model, status}` children by client and status.
    by_status: Mutex<Vec<(Box<str>, &'static str, IntCounter)>>,
    /// `sheepdog_failovers_total`, `sheepdog_retries_total`, `sheepdog_hedges_total` of the model (none for
    /// unknown models: they are never forwarded).
    forwarding: Option<[IntCounter; 3]>,
}

/// Child handles of one (endpoint, model) pair.
pub struct PairMetrics {
    labels: [String; 2],
    /// `sheepdog_upstream_up`.
    pub up: IntGauge,
    /// `sheepdog_breaker_state`.
    pub breaker: IntGauge,
    /// `sheepdog_probe_duration_seconds`.
    pub probe_duration: Histogram,
    /// `sheepdog_request_duration_seconds`.
    pub request_duration: Histogram,
    /// `sheepdog_time_to_first_token_seconds`.
    pub ttft: Histogram,
    /// `sheepdog_tokens_total{kind="prompt"}`.
    pub prompt_tokens: IntCounter,
    /// `sheepdog_tokens_total{kind="completion"}`.
    pub completion_tokens: IntCounter,
    /// `sheepdog_cost_usd_total{source="request"}`.
    pub cost_request: Counter,
    /// `sheepdog_cost_usd_total{source="probe"}`.
    pub cost_probe: Counter,
    requests: Mutex<Vec<(&'static str, IntCounter)>>,
    requests_vec: IntCounterVec,
    probes_ok: IntCounter,
    probes_failed: IntCounter,
    /// `sheepdog_breaker_transitions_total{to}` by the breaker gauge's value (closed, half_open, open).
    transitions: [IntCounter; 3],
    /// The GenAI handles of a success served by this pair for its own model.
    pub genai: PairGenAi,
}

pub(crate) fn must<T>(r: prometheus::Result<T>) -> T {
    match r {
        Ok(v) => v,
        // Names and labels are constants of this file and covered by tests: an error here is a bug.
        Err(e) => unreachable!("invalid metric definition: {e}"),
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Register every family in a fresh registry.
    pub fn new() -> Metrics {
        let registry = Registry::new();
        let pair = &["endpoint", "model"];
        let gauge = |name: &str, help: &str| {
            let g = must(IntGaugeVec::new(Opts::new(name, help), pair));
            must(registry.register(Box::new(g.clone())));
            g
        };
        let hist = |name: &str, help: &str| {
            let h = must(HistogramVec::new(HistogramOpts::new(name, help).buckets(LATENCY_BUCKETS.to_vec()), pair));
            must(registry.register(Box::new(h.clone())));
            h
        };
        let counter = |name: &str, help: &str, labels: &[&str]| {
            let c = must(IntCounterVec::new(Opts::new(name, help), labels));
            must(registry.register(Box::new(c.clone())));
            c
        };
        let upstream_up = gauge("sheepdog_upstream_up", "1 when the endpoint can serve the model, else 0.");
        let breaker_state = gauge("sheepdog_breaker_state", "Circuit breaker: 0 closed, 1 half-open, 2 open.");
        let probe_duration = hist("sheepdog_probe_duration_seconds", "Duration of active health probes.");
        let request_duration = hist("sheepdog_request_duration_seconds", "Duration of upstream requests.");
        let ttft = hist("sheepdog_time_to_first_token_seconds", "Time to the first byte of the upstream answer.");
        let requests = counter(
            "sheepdog_requests_total",
            "Upstream attempts by HTTP status (or timeout / error).",
            &["endpoint", "model", "status"],
        );
        let failovers = counter("sheepdog_failovers_total", "Requests served after failing over.", &["model"]);
        let tokens = counter("sheepdog_tokens_total", "Tokens by kind.", &["endpoint", "model", "kind"]);
        let cost = must(CounterVec::new(
            Opts::new("sheepdog_cost_usd_total", "Cost in USD from the pricing table."),
            &["endpoint", "model", "source"],
        ));
        must(registry.register(Box::new(cost.clone())));
        let probes =
            counter("sheepdog_probes_total", "Active health probes by result.", &["endpoint", "model", "result"]);
        let global_degraded = must(IntGauge::new(
            "sheepdog_global_degraded",
            "1 when more than half of all (endpoint, model) pairs cannot serve.",
        ));
        must(registry.register(Box::new(global_degraded.clone())));
        let state_up = must(IntGauge::new(
            "sheepdog_state_backend_up",
            "1 while the [state] backend is reachable (always 1 for memory); 0: this replica serves with its own state.",
        ));
        state_up.set(1);
        must(registry.register(Box::new(state_up.clone())));
        let plain = |name: &str, help: &str| {
            let c = must(IntCounter::new(name, help));
            must(registry.register(Box::new(c.clone())));
            c
        };
        let log_written = plain("sheepdog_request_log_written_total", "Rows written to the request log.");
        let log_dropped = plain(
            "sheepdog_request_log_dropped_total",
            "Requests missing from the request log: its queue was full or a write failed.",
        );
        let log_lines_dropped = plain(
            "sheepdog_log_lines_dropped_total",
            "Log lines dropped because the log's writer thread fell behind (the request path never waits for it).",
        );
        let client_requests = counter(
            "sheepdog_client_requests_total",
            "Client requests by the HTTP status the client got (499: it went away first).",
            &["client", "model", "status"],
        );
        let unknown_model = ModelMetrics::new(UNKNOWN_MODEL, &client_requests, None);
        let per_model = ModelFamilies {
            failovers,
            retries: counter(
                "sheepdog_retries_total",
                "Upstream attempts after the first of a request (hedges not included), by requested model.",
                &["model"],
            ),
            hedges: counter("sheepdog_hedges_total", "Hedged second attempts started, by requested model.", &["model"]),
        };
        let transitions = counter(
            "sheepdog_breaker_transitions_total",
            "Circuit breaker transitions by the state entered (closed, half_open, open).",
            &["endpoint", "model", "to"],
        );
        let int_gauge = |name: &str, help: &str| {
            let g = must(IntGauge::new(name, help));
            must(registry.register(Box::new(g.clone())));
            g
        };
        let in_flight = int_gauge(
            "sheepdog_requests_in_flight",
            "Client requests on /v1/* not finished yet, open streams included.",
        );
        let queued = int_gauge(
            "sheepdog_requests_queued",
            "Client requests waiting in the recovery queue for an endpoint to recover ([retry] queue_timeout).",
        );
        let log_queue_depth =
            int_gauge("sheepdog_request_log_queue_depth", "Finished requests queued for the request log's writer.");
        let log_queue_capacity = int_gauge(
            "sheepdog_request_log_queue_capacity",
            "Requests the request log's queue holds before it drops them (0: the log is off).",
        );
        let reload_ok = int_gauge(
            "sheepdog_config_last_reload_successful",
            "1 unless the last reload of the config file was refused.",
        );
        reload_ok.set(1);
        let build_info = must(IntGaugeVec::new(
            Opts::new("sheepdog_build_info", "Always 1; the version of the running binary in its label."),
            &["version"],
        ));
        must(registry.register(Box::new(build_info.clone())));
        build_info.with_label_values(&[env!("CARGO_PKG_VERSION")]).set(1);
        let genai = GenAi::new(&registry);
        let rejections = Rejections::new(&registry);
        let budgets = BudgetMetrics::new(&registry);
        let connections_open = must(IntGauge::new("sheepdog_connections_open", "Client connections open now."));
        must(registry.register(Box::new(connections_open.clone())));
        let connections_rejected = plain(
            "sheepdog_connections_rejected_total",
            "Client connections closed at once because max_connections were open.",
        );
        let accept_errors = plain(
            "sheepdog_accept_errors_total",
            "Failed accepts of client connections (mostly: out of file descriptors).",
        );
        let webhook_failures =
            plain("sheepdog_budget_webhook_failures_total", "Budget webhook POSTs that failed or timed out.");
        let reloads = counter("sheepdog_config_reloads_total", "Configuration reloads by result.", &["result"]);
        for result in ["ok", "refused"] {
            // Both series from the start, so that rates and alerts over them have data before a first reload.
            reloads.with_label_values(&[result]);
        }
        Metrics {
            registry,
            upstream_up,
            breaker_state,
            probe_duration,
            request_duration,
            ttft,
            requests,
            tokens,
            cost,
            global_degraded,
            state_up,
            probes,
            log_written,
            log_dropped,
            log_lines_dropped,
            client_requests,
            connections_open,
            connections_rejected,
            accept_errors,
            reloads,
            unknown_model,
            genai,
            rejections,
            budgets,
            webhook_failures,
            in_flight,
            queued,
            log_queue_depth,
            log_queue_capacity,
            reload_ok,
            per_model,
            transitions,
        }
    }

    /// Count a reload: `ok` or `refused`.
    pub fn reload(&self, ok: bool) {
        self.reloads.with_label_values(&[if ok { "ok" } else { "refused" }]).inc();
        self.reload_ok.set(i64::from(ok));
    }

    /// Request-level handles of a configured model.
    pub fn model(&self, model: &str) -> ModelMetrics {
        ModelMetrics::new(model, &self.client_requests, Some(&self.per_model))
    }

    /// Child handles for one pair of a model of this kind (created on first use, shared afterwards).
    pub fn pair(&self, endpoint: &str, model: &str, kind: ModelKind) -> PairMetrics {
        let l = [endpoint, model];
        PairMetrics {
            labels: [endpoint.to_string(), model.to_string()],
            up: self.upstream_up.with_label_values(&l),
            breaker: self.breaker_state.with_label_values(&l),
            probe_duration: self.probe_duration.with_label_values(&l),
            request_duration: self.request_duration.with_label_values(&l),
            ttft: self.ttft.with_label_values(&l),
            prompt_tokens: self.tokens.with_label_values(&[endpoint, model, "prompt"]),
            completion_tokens: self.tokens.with_label_values(&[endpoint, model, "completion"]),
            cost_request: self.cost.with_label_values(&[endpoint, model, "request"]),
            cost_probe: self.cost.with_label_values(&[endpoint, model, "probe"]),
            requests: Mutex::new(Vec::new()),
            requests_vec: self.requests.clone(),
            probes_ok: self.probes.with_label_values(&[endpoint, model, "ok"]),
            probes_failed: self.probes.with_label_values(&[endpoint, model, "failed"]),
            transitions: TRANSITIONS.map(|to| self.transitions.with_label_values(&[endpoint, model, to])),
            genai: self.genai.pair(endpoint, model, kind),
        }
    }

    /// Remove every series of a pair that no longer exists after a reload (the caller checks that no pair of
    /// the new snapshot has the same labels: series are shared by label values).
    pub fn remove_pair(&self, pair: &PairMetrics) {
        let [e, m] = &pair.labels;
        let l = [e.as_str(), m.as_str()];
        let _ = self.upstream_up.remove_label_values(&l);
        let _ = self.breaker_state.remove_label_values(&l);
        let _ = self.probe_duration.remove_label_values(&l);
        let _ = self.request_duration.remove_label_values(&l);
        let _ = self.ttft.remove_label_values(&l);
        for kind in ["prompt", "completion"] {
            let _ = self.tokens.remove_label_values(&[e.as_str(), m.as_str(), kind]);
        }
        for source in ["request", "probe"] {
            let _ = self.cost.remove_label_values(&[e.as_str(), m.as_str(), source]);
        }
        for result in ["ok", "failed"] {
            let _ = self.probes.remove_label_values(&[e.as_str(), m.as_str(), result]);
        }
        for (status, _) in pair.requests.lock().iter() {
            let _ = self.requests.remove_label_values(&[e.as_str(), m.as_str(), status]);
        }
        for to in TRANSITIONS {
            let _ = self.transitions.remove_label_values(&[e.as_str(), m.as_str(), to]);
        }
        self.genai.remove_pair(e, m);
    }

    /// Remove every series of a model that no longer exists after a reload.
    pub fn remove_model(&self, model: &ModelMetrics) {
        let m = model.model.as_str();
        let f = &self.per_model;
        for family in [&f.failovers, &f.retries, &f.hedges] {
            let _ = family.remove_label_values(&[m]);
        }
        for (client, status, _) in model.by_status.lock().iter() {
            let _ = self.client_requests.remove_label_values(&[client, m, status]);
        }
        self.genai.remove_model(m);
    }

    /// The text exposition format.
    pub fn render(&self) -> Vec<u8> {
        let dropped = LOG_LINES_DROPPED.get().map_or(0, |f| f());
        if let Some(more) = dropped.checked_sub(self.log_lines_dropped.get()).filter(|&n| n > 0) {
            self.log_lines_dropped.inc_by(more);
        }
        let mut out = Vec::with_capacity(16 * 1024);
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut out);
        out
    }
}

impl PairMetrics {
    /// Count one upstream attempt by its status label (`"200"`, `"timeout"`, `"error"` …).
    pub fn request(&self, status: &'static str) {
        let mut cache = self.requests.lock();
        if let Some((_, c)) = cache.iter().find(|(s, _)| *s == status) {
            c.inc();
            return;
        }
        let c = self.requests_vec.with_label_values(&[&self.labels[0], &self.labels[1], status]);
        c.inc();
        cache.push((status, c));
    }

    /// Count one probe.
    pub fn probe(&self, ok: bool) {
        if ok { &self.probes_ok } else { &self.probes_failed }.inc();
    }

    /// Count a breaker transition into the state whose `sheepdog_breaker_state` value is `gauge` (0 closed,
    /// 1 half-open, 2 open).
    pub fn transition(&self, gauge: i64) {
        if let Some(c) = usize::try_from(gauge).ok().and_then(|i| self.transitions.get(i)) {
            c.inc();
        }
    }
}

/// The `to` labels of `sheepdog_breaker_transitions_total`, indexed by the `sheepdog_breaker_state` value.
const TRANSITIONS: [&str; 3] = ["closed", "half_open", "open"];

impl ModelMetrics {
    fn new(model: &str, client_requests: &IntCounterVec, families: Option<&ModelFamilies>) -> ModelMetrics {
        ModelMetrics {
            model: model.to_string(),
            client_requests: client_requests.clone(),
            by_status: Mutex::new(Vec::new()),
            forwarding: families.map(|f| [&f.failovers, &f.retries, &f.hedges].map(|v| v.with_label_values(&[model]))),
        }
    }

    /// Count a request that was served after failing over.
    pub fn failover(&self) {
        if let Some([f, _, _]) = &self.forwarding {
            f.inc();
        }
    }

    /// Count the upstream attempts of a request beyond its first, `retries` of them, and whether it hedged.
    pub fn forwarded(&self, retries: u32, hedged: bool) {
        if let Some([_, r, h]) = &self.forwarding {
            if retries > 0 {
                r.inc_by(u64::from(retries));
            }
            if hedged {
                h.inc();
            }
        }
    }

    /// Count one request of `client` (a configured client's name, or [`ANONYMOUS`]) that ended with `status`
    /// (its HTTP status label).
    pub fn client_request(&self, client: &str, status: &'static str) {
        let mut cache = self.by_status.lock();
        if let Some((_, _, c)) = cache.iter().find(|(cl, s, _)| *s == status && &**cl == client) {
            c.inc();
            return;
        }
        let c = self.client_requests.with_label_values(&[client, &self.model, status]);
        c.inc();
        cache.push((client.into(), status, c));
    }

    /// Remove the series of a client that a reload removed.
    pub fn forget_client(&self, client: &str) {
        self.by_status.lock().retain(|(cl, status, _)| {
            let gone = &**cl == client;
            if gone {
                let _ = self.client_requests.remove_label_values(&[client, &self.model, status]);
            }
            !gone
        });
    }

    /// The model label.
    pub fn name(&self) -> &str {
        &self.model
    }
}

impl std::fmt::Debug for ModelMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ModelMetrics({})", self.model)
    }
}

/// The `status` label of an HTTP status code, without allocating.
pub fn status_label(code: u16) -> &'static str {
    const CODES: &[(u16, &str)] = &[
        (200, "200"),
        (201, "201"),
        (400, "400"),
        (401, "401"),
        (403, "403"),
        (404, "404"),
        (405, "405"),
        (408, "408"),
        (409, "409"),
        (413, "413"),
        (415, "415"),
        (422, "422"),
        (429, "429"),
        (499, "499"),
        (500, "500"),
        (501, "501"),
        (502, "502"),
        (503, "503"),
        (504, "504"),
        (529, "529"),
    ];
    match CODES.iter().find(|(c, _)| *c == code) {
        Some((_, s)) => s,
        None => match code {
            200..=299 => "2xx",
            400..=499 => "4xx",
            500..=599 => "5xx",
            _ => "other",
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_contract_names() {
        let m = Metrics::new();
        let p = m.pair("primary", "gpt-4.1", ModelKind::Chat);
        p.request("200");
        p.request("200");
        p.request("timeout");
        p.up.set(1);
        p.cost_probe.inc_by(0.5);
        let model = m.model("gpt-4.1");
        model.failover();
        model.client_request(ANONYMOUS, "200");
        m.unknown_model.client_request(ANONYMOUS, "404");
        let text = String::from_utf8(m.render()).unwrap();
        assert!(
            text.contains(r#"sheepdog_requests_total{endpoint="primary",model="gpt-4.1",status="200"} 2"#),
            "{text}"
        );
        assert!(text.contains(r#"sheepdog_requests_total{endpoint="primary",model="gpt-4.1",status="timeout"} 1"#));
        assert!(text.contains(r#"sheepdog_upstream_up{endpoint="primary",model="gpt-4.1"} 1"#));
        assert!(text.contains(r#"sheepdog_cost_usd_total{endpoint="primary",model="gpt-4.1",source="probe"} 0.5"#));
        assert!(text.contains(r#"sheepdog_failovers_total{model="gpt-4.1"} 1"#));
        assert!(text.contains(r#"sheepdog_client_requests_total{client="anonymous",model="gpt-4.1",status="200"} 1"#));
        assert!(text.contains(r#"sheepdog_client_requests_total{client="anonymous",model="unknown",status="404"} 1"#));
        for name in [
            "sheepdog_breaker_state",
            "sheepdog_probe_duration_seconds_bucket",
            "sheepdog_request_duration_seconds_bucket",
            "sheepdog_time_to_first_token_seconds_bucket",
            "sheepdog_tokens_total",
            "sheepdog_global_degraded 0",
        ] {
            assert!(text.contains(name), "{name} missing");
        }
        // Removing a pair and a model removes every one of their series.
        m.remove_pair(&p);
        m.remove_model(&model);
        let text = String::from_utf8(m.render()).unwrap();
        assert!(!text.contains(r#"endpoint="primary""#), "{text}");
        assert!(!text.contains(r#"model="gpt-4.1""#), "{text}");
    }

    #[test]
    fn operator_families_render_from_the_start() {
        let m = Metrics::new();
        let p = m.pair("primary", "gpt-4.1", ModelKind::Chat);
        p.transition(2);
        let model = m.model("gpt-4.1");
        model.forwarded(2, true);
        m.unknown_model.forwarded(5, true);
        m.rejections.inc(Reason::BodyTooLarge);
        m.reload(false);
        let text = String::from_utf8(m.render()).unwrap();
        for line in [
            r#"sheepdog_breaker_transitions_total{endpoint="primary",model="gpt-4.1",to="open"} 1"#,
            r#"sheepdog_breaker_transitions_total{endpoint="primary",model="gpt-4.1",to="closed"} 0"#,
            r#"sheepdog_retries_total{model="gpt-4.1"} 2"#,
            r#"sheepdog_hedges_total{model="gpt-4.1"} 1"#,
            r#"sheepdog_rejections_total{reason="body_too_large"} 1"#,
            r#"sheepdog_rejections_total{reason="budget_exceeded"} 0"#,
            "sheepdog_requests_in_flight 0",
            "sheepdog_requests_queued 0",
            "sheepdog_request_log_queue_depth 0",
            "sheepdog_config_last_reload_successful 0",
            r#"sheepdog_config_reloads_total{result="refused"} 1"#,
            "# TYPE gen_ai_client_operation_duration_seconds histogram",
            "# TYPE gen_ai_client_token_usage histogram",
        ] {
            assert!(text.contains(line), "{line} missing:\n{text}");
        }
        // Unknown models are never forwarded: no retry series for them.
        assert!(!text.contains(r#"sheepdog_retries_total{model="unknown"}"#));
        m.reload(true);
        assert!(String::from_utf8(m.render()).unwrap().contains("sheepdog_config_last_reload_successful 1"));
        m.remove_pair(&p);
        m.remove_model(&model);
        let text = String::from_utf8(m.render()).unwrap();
        assert!(!text.contains("gpt-4.1"), "{text}");
    }

    /// A 10 ms probe and a 60 s completion each fall in a bucket at most 1.6 times as wide as its lower bound,
    /// so `histogram_quantile` tells 10 ms from 15 ms and 60 s from 90 s.
    #[test]
    fn latency_buckets_resolve_a_probe_and_a_long_completion() {
        for v in [0.01, 0.012, 60.0, 50.0, 75.0] {
            let hi = LATENCY_BUCKETS.iter().copied().find(|b| *b >= v).unwrap();
            let lo = LATENCY_BUCKETS.iter().copied().rfind(|b| *b < v).unwrap();
            assert!(hi / lo <= 1.6, "{v}: bucket ({lo}, {hi}] too wide");
        }
        assert!(LATENCY_BUCKETS.contains(&0.01) && LATENCY_BUCKETS.contains(&60.0));
        assert!(LATENCY_BUCKETS.windows(2).all(|w| w[0] < w[1]));
    }

    #[test]
    fn status_labels() {
        assert_eq!(status_label(503), "503");
        assert_eq!(status_label(418), "4xx");
    }
}
