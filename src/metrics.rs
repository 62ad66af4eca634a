//! Prometheus metrics with the names and labels of the contract.
//!
//! Families are registered once per process; each (endpoint, model) pair holds its own child handles, so the
//! hot path only increments atomics. Renders the text format for `GET /metrics`; makes no decisions.

use parking_lot::Mutex;
use prometheus::{
    Counter, CounterVec, Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

const LATENCY_BUCKETS: &[f64] =
    &[0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 120.0];

/// Every metric family of the gateway.
pub struct Metrics {
    registry: Registry,
    upstream_up: IntGaugeVec,
    breaker_state: IntGaugeVec,
    probe_duration: HistogramVec,
    request_duration: HistogramVec,
    ttft: HistogramVec,
    requests: IntCounterVec,
    failovers: IntCounterVec,
    tokens: IntCounterVec,
    cost: CounterVec,
    /// `sheepdog_global_degraded`.
    pub global_degraded: IntGauge,
    /// `sheepdog_probes_total{endpoint, model, result}` (extra: probes sent, by outcome).
    probes: IntCounterVec,
    /// `sheepdog_request_log_written_total`: rows written to the request log.
    pub log_written: IntCounter,
    /// `sheepdog_request_log_dropped_total`: requests the log could not take (queue full or write failed).
    pub log_dropped: IntCounter,
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
    probes_ok: IntCounter,
    probes_failed: IntCounter,
}

fn must<T>(r: prometheus::Result<T>) -> T {
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
        Metrics {
            registry,
            upstream_up,
            breaker_state,
            probe_duration,
            request_duration,
            ttft,
            requests,
            failovers,
            tokens,
            cost,
            global_degraded,
            probes,
            log_written,
            log_dropped,
        }
    }

    /// Child handles for one pair (created on first use, shared afterwards).
    pub fn pair(&self, endpoint: &str, model: &str) -> PairMetrics {
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
            probes_ok: self.probes.with_label_values(&[endpoint, model, "ok"]),
            probes_failed: self.probes.with_label_values(&[endpoint, model, "failed"]),
        }
    }

    /// Forget the gauges of a pair that no longer exists after a reload (counters keep their totals).
    pub fn remove_pair(&self, endpoint: &str, model: &str) {
        let l = [endpoint, model];
        let _ = self.upstream_up.remove_label_values(&l);
        let _ = self.breaker_state.remove_label_values(&l);
    }

    /// Count a request that was served after failing over.
    pub fn failover(&self, model: &str) {
        self.failovers.with_label_values(&[model]).inc();
    }

    /// The text exposition format.
    pub fn render(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(16 * 1024);
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut out);
        out
    }
}

impl PairMetrics {
    /// Count one upstream attempt by its status label (`"200"`, `"timeout"`, `"error"` …).
    pub fn request(&self, metrics: &Metrics, status: &'static str) {
        let mut cache = self.requests.lock();
        if let Some((_, c)) = cache.iter().find(|(s, _)| *s == status) {
            c.inc();
            return;
        }
        let c = metrics.requests.with_label_values(&[&self.labels[0], &self.labels[1], status]);
        c.inc();
        cache.push((status, c));
    }

    /// Count one probe.
    pub fn probe(&self, ok: bool) {
        if ok { &self.probes_ok } else { &self.probes_failed }.inc();
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
        (408, "408"),
        (409, "409"),
        (413, "413"),
        (422, "422"),
        (429, "429"),
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
        let p = m.pair("primary", "gpt-4.1");
        p.request(&m, "200");
        p.request(&m, "200");
        p.request(&m, "timeout");
        p.up.set(1);
        p.cost_probe.inc_by(0.5);
        m.failover("gpt-4.1");
        let text = String::from_utf8(m.render()).unwrap();
        assert!(
            text.contains(r#"sheepdog_requests_total{endpoint="primary",model="gpt-4.1",status="200"} 2"#),
            "{text}"
        );
        assert!(text.contains(r#"sheepdog_requests_total{endpoint="primary",model="gpt-4.1",status="timeout"} 1"#));
        assert!(text.contains(r#"sheepdog_upstream_up{endpoint="primary",model="gpt-4.1"} 1"#));
        assert!(text.contains(r#"sheepdog_cost_usd_total{endpoint="primary",model="gpt-4.1",source="probe"} 0.5"#));
        assert!(text.contains(r#"sheepdog_failovers_total{model="gpt-4.1"} 1"#));
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
    }

    #[test]
    fn status_labels() {
        assert_eq!(status_label(503), "503");
        assert_eq!(status_label(418), "4xx");
    }
}
