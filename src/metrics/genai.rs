//! The OpenTelemetry GenAI semantic-convention metrics, so that dashboards built for that convention work
//! unchanged: `gen_ai_client_operation_duration_seconds` and `gen_ai_client_token_usage`, with the
//! convention's recommended buckets and attributes (dots become underscores in Prometheus).
//!
//! sheepdog is the convention's *client* of its upstreams; one operation is one client request, recorded by
//! *finish* once it ends. `gen_ai_provider_name` is the endpoint that served (every upstream speaks OpenAI's
//! protocol, so the endpoint is what tells providers apart), `gen_ai_request_model` the model the client asked
//! for (`unknown` when it is not configured), `gen_ai_response_model` the model that served, `error_type` the
//! error code the client got (empty, i.e. absent, on success). Every value comes from configuration or from
//! a constant of the code, never from client input.
//!
//! The common case — a success served by the requested model — uses handles cached on the pair; the rest
//! (errors, fallbacks) looks its series up in a short list kept under a lock, which is also how the series of a
//! pair or model removed by a reload are found and removed. Makes no decisions.

use parking_lot::Mutex;
use prometheus::{Histogram, HistogramOpts, HistogramVec, Registry};

use super::must;
use crate::config::ModelKind;

/// `gen_ai.client.operation.duration` buckets (seconds): 10 ms doubling to 81.92 s.
pub const DURATION_BUCKETS: &[f64] =
    &[0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24, 20.48, 40.96, 81.92];

/// `gen_ai.client.token.usage` buckets (tokens): 1, then ×4 to 67,108,864.
pub const TOKEN_BUCKETS: &[f64] = &[
    1.0, 4.0, 16.0, 64.0, 256.0, 1024.0, 4096.0, 16384.0, 65536.0, 262144.0, 1048576.0, 4194304.0, 16777216.0,
    67108864.0,
];

const DURATION_LABELS: [&str; 5] =
    ["gen_ai_operation_name", "gen_ai_provider_name", "gen_ai_request_model", "gen_ai_response_model", "error_type"];
const TOKEN_LABELS: [&str; 4] =
    ["gen_ai_operation_name", "gen_ai_provider_name", "gen_ai_request_model", "gen_ai_token_type"];

/// `gen_ai.operation.name` of a model of this kind (`chat` / `embeddings`, as the convention names them).
pub fn operation(kind: ModelKind) -> &'static str {
    match kind {
        ModelKind::Chat => "chat",
        ModelKind::Embeddings => "embeddings",
    }
}

/// Both families and every series created so far.
pub struct GenAi {
    duration: HistogramVec,
    tokens: HistogramVec,
    durations: Mutex<Vec<([String; 5], Histogram)>>,
    token_series: Mutex<Vec<([String; 4], Histogram)>>,
}

/// Handles of one (endpoint, model) pair for a success served by the requested model.
pub struct PairGenAi {
    op: &'static str,
    ok: Histogram,
    input: Histogram,
    output: Histogram,
}

/// One finished operation, as *finish* saw it.
pub struct Operation<'a> {
    /// `chat` or `embeddings`.
    pub op: &'static str,
    /// The requested model's label (`unknown` when not configured).
    pub request_model: &'a str,
    /// The pair that served (its endpoint and model names, and its cached handles), if one did.
    pub served: Option<(&'a str, &'a str, &'a PairGenAi)>,
    /// The error code the client got, empty on success.
    pub error: &'static str,
    /// From arrival to the end of the answer, seconds.
    pub duration_s: f64,
    /// Prompt and completion tokens, when the answer reported them.
    pub tokens: Option<(u64, u64)>,
}

impl GenAi {
    /// Register both families.
    pub fn new(registry: &Registry) -> GenAi {
        let duration = must(HistogramVec::new(
            HistogramOpts::new("gen_ai_client_operation_duration_seconds", "GenAI operation duration.")
                .buckets(DURATION_BUCKETS.to_vec()),
            &DURATION_LABELS,
        ));
        let tokens = must(HistogramVec::new(
            HistogramOpts::new("gen_ai_client_token_usage", "Number of input and output tokens used.")
                .buckets(TOKEN_BUCKETS.to_vec()),
            &TOKEN_LABELS,
        ));
        must(registry.register(Box::new(duration.clone())));
        must(registry.register(Box::new(tokens.clone())));
        GenAi { duration, tokens, durations: Mutex::new(Vec::new()), token_series: Mutex::new(Vec::new()) }
    }

    fn duration_series(&self, l: [&str; 5]) -> Histogram {
        let mut all = self.durations.lock();
        if let Some((_, h)) = all.iter().find(|(k, _)| k.iter().zip(l).all(|(a, b)| a == b)) {
            return h.clone();
        }
        let h = self.duration.with_label_values(&l);
        all.push((l.map(str::to_string), h.clone()));
        h
    }

    fn token_series(&self, l: [&str; 4]) -> Histogram {
        let mut all = self.token_series.lock();
        if let Some((_, h)) = all.iter().find(|(k, _)| k.iter().zip(l).all(|(a, b)| a == b)) {
            return h.clone();
        }
        let h = self.tokens.with_label_values(&l);
        all.push((l.map(str::to_string), h.clone()));
        h
    }

    /// The cached handles of a pair.
    pub fn pair(&self, endpoint: &str, model: &str, kind: ModelKind) -> PairGenAi {
        let op = operation(kind);
        PairGenAi {
            op,
            ok: self.duration_series([op, endpoint, model, model, ""]),
            input: self.token_series([op, endpoint, model, "input"]),
            output: self.token_series([op, endpoint, model, "output"]),
        }
    }

    /// Record one operation: the common case on the pair's handles, the rest through the list.
    pub fn record(&self, o: &Operation<'_>) {
        let (provider, response_model) = o.served.map_or(("", ""), |(e, m, _)| (e, m));
        // The pair's handles fit when the requested model served, through the API its handles are for.
        let pair = o.served.map(|(_, _, p)| p).filter(|p| p.op == o.op && o.request_model == response_model);
        match pair {
            Some(p) if o.error.is_empty() => p.ok.observe(o.duration_s),
            _ => self.duration_series([o.op, provider, o.request_model, response_model, o.error]).observe(o.duration_s),
        }
        let Some((input, output)) = o.tokens else { return };
        match pair {
            Some(p) => {
                p.input.observe(input as f64);
                p.output.observe(output as f64);
            }
            None => {
                self.token_series([o.op, provider, o.request_model, "input"]).observe(input as f64);
                self.token_series([o.op, provider, o.request_model, "output"]).observe(output as f64);
            }
        }
    }

    /// Remove the series of a pair that a reload removed: served by `endpoint` as `model`, or asked of
    /// `endpoint` for `model`.
    pub fn remove_pair(&self, endpoint: &str, model: &str) {
        self.durations.lock().retain(|(l, _)| {
            let gone = l[1] == endpoint && l[3] == model;
            if gone {
                let _ = self.duration.remove_label_values(&l.each_ref().map(String::as_str));
            }
            !gone
        });
        self.token_series.lock().retain(|(l, _)| {
            let gone = l[1] == endpoint && l[2] == model;
            if gone {
                let _ = self.tokens.remove_label_values(&l.each_ref().map(String::as_str));
            }
            !gone
        });
    }

    /// Remove every series naming a model that a reload removed.
    pub fn remove_model(&self, model: &str) {
        self.durations.lock().retain(|(l, _)| {
            let gone = l[2] == model || l[3] == model;
            if gone {
                let _ = self.duration.remove_label_values(&l.each_ref().map(String::as_str));
            }
            !gone
        });
        self.token_series.lock().retain(|(l, _)| {
            let gone = l[2] == model;
            if gone {
                let _ = self.tokens.remove_label_values(&l.each_ref().map(String::as_str));
            }
            !gone
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(r: &Registry) -> String {
        let mut out = Vec::new();
        prometheus::Encoder::encode(&prometheus::TextEncoder::new(), &r.gather(), &mut out).unwrap();
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn buckets_follow_the_convention() {
        assert_eq!(DURATION_BUCKETS.len(), 14);
        for w in DURATION_BUCKETS.windows(2) {
            assert!((w[1] / w[0] - 2.0).abs() < 1e-9, "{w:?}");
        }
        assert_eq!(TOKEN_BUCKETS.len(), 14);
        for w in TOKEN_BUCKETS.windows(2) {
            assert_eq!(w[1], w[0] * 4.0);
        }
    }

    #[test]
    fn success_errors_fallbacks_and_removal() {
        let r = Registry::new();
        let g = GenAi::new(&r);
        let p = g.pair("primary", "gpt-4.1", ModelKind::Chat);
        let ok = Operation {
            op: "chat",
            request_model: "gpt-4.1",
            served: Some(("primary", "gpt-4.1", &p)),
            error: "",
            duration_s: 0.5,
            tokens: Some((10, 20)),
        };
        g.record(&ok);
        g.record(&Operation { error: "upstream_timeout", served: None, tokens: None, ..ok });
        let q = g.pair("backup", "claude", ModelKind::Chat);
        g.record(&Operation { served: Some(("backup", "claude", &q)), ..ok });
        let t = text(&r);
        let ok_series = r#"gen_ai_client_operation_duration_seconds_count{error_type="",gen_ai_operation_name="chat",gen_ai_provider_name="primary",gen_ai_request_model="gpt-4.1",gen_ai_response_model="gpt-4.1"} 1"#;
        assert!(t.contains(ok_series), "{t}");
        assert!(t.contains(r#"gen_ai_client_operation_duration_seconds_count{error_type="upstream_timeout",gen_ai_operation_name="chat",gen_ai_provider_name="",gen_ai_request_model="gpt-4.1",gen_ai_response_model=""} 1"#), "{t}");
        assert!(t.contains(r#"gen_ai_client_operation_duration_seconds_count{error_type="",gen_ai_operation_name="chat",gen_ai_provider_name="backup",gen_ai_request_model="gpt-4.1",gen_ai_response_model="claude"} 1"#), "{t}");
        assert!(t.contains(r#"gen_ai_client_token_usage_sum{gen_ai_operation_name="chat",gen_ai_provider_name="primary",gen_ai_request_model="gpt-4.1",gen_ai_token_type="output"} 20"#), "{t}");
        assert!(t.contains(r#"gen_ai_client_token_usage_sum{gen_ai_operation_name="chat",gen_ai_provider_name="backup",gen_ai_request_model="gpt-4.1",gen_ai_token_type="input"} 10"#), "{t}");
        g.remove_pair("backup", "claude");
        g.remove_model("claude");
        let t = text(&r);
        assert!(!t.contains("claude"), "{t}");
        assert!(t.contains(ok_series), "{t}");
        g.remove_model("gpt-4.1");
        assert!(!text(&r).contains("gpt-4.1"));
    }
}
