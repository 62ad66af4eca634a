//! `GET /api/stats`: the report's figures in the contract's shape (the same numbers as
//! `sheepdog report --format json`, grouped as the contract names them). Pure: a [`Report`] in, JSON out.

use serde::Serialize;

use super::{rfc3339, Report, Stats};

/// Latency figures, ms.
#[derive(Debug, Serialize)]
struct Latency {
    mean: Option<f64>,
    p50: Option<f64>,
    p95: Option<f64>,
    p99: Option<f64>,
}

/// Time-to-first-token figures, ms.
#[derive(Debug, Serialize)]
struct Ttft {
    p50: Option<f64>,
}

/// The figures of one group.
#[derive(Debug, Serialize)]
struct Figures {
    requests: u64,
    ok: u64,
    errors: u64,
    success_rate: f64,
    latency_ms: Latency,
    ttft_ms: Ttft,
    prompt_tokens: u64,
    completion_tokens: u64,
    cost_usd: f64,
    cost_per_1k_tokens_usd: f64,
    /// Share of requests whose tokens the gateway counted itself (the upstream reported no usage).
    estimated_share: f64,
}

impl From<&Stats> for Figures {
    fn from(s: &Stats) -> Figures {
        let tokens = s.prompt_tokens + s.completion_tokens;
        Figures {
            requests: s.requests,
            ok: s.ok,
            errors: s.requests - s.ok,
            success_rate: if s.requests == 0 { 1.0 } else { s.ok as f64 / s.requests as f64 },
            latency_ms: Latency {
                mean: s.latency_mean_ms,
                p50: s.latency_p50_ms,
                p95: s.latency_p95_ms,
                p99: s.latency_p99_ms,
            },
            ttft_ms: Ttft { p50: s.ttft_p50_ms },
            prompt_tokens: s.prompt_tokens,
            completion_tokens: s.completion_tokens,
            cost_usd: s.cost_usd,
            cost_per_1k_tokens_usd: if tokens == 0 { 0.0 } else { s.cost_usd * 1000.0 / tokens as f64 },
            estimated_share: if s.requests == 0 { 0.0 } else { s.estimated as f64 / s.requests as f64 },
        }
    }
}

#[derive(Debug, Serialize)]
struct ModelFigures {
    model: String,
    #[serde(flatten)]
    figures: Figures,
}

#[derive(Debug, Serialize)]
struct ClientFigures {
    client: String,
    #[serde(flatten)]
    figures: Figures,
}

/// One budget's state now, as `/api/stats` shows it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct BudgetState {
    /// Its name.
    pub name: String,
    /// `day` or `month`.
    pub period: &'static str,
    /// Settled spend this period, USD.
    pub spent_usd: f64,
    /// Its limit, if it has one.
    pub limit_usd: Option<f64>,
    /// `ok`, `warn`, `downgrade` or `block`.
    pub state: &'static str,
}

#[derive(Debug, Serialize)]
struct EndpointFigures {
    endpoint: String,
    model: String,
    #[serde(flatten)]
    figures: Figures,
}

/// The `/api/stats` document.
#[derive(Debug, Serialize)]
pub struct ApiStats {
    since: String,
    until: String,
    total: Figures,
    models: Vec<ModelFigures>,
    endpoints: Vec<EndpointFigures>,
    /// Per client key.
    clients: Vec<ClientFigures>,
    /// Per budget, now (not over the window).
    budgets: Vec<BudgetState>,
}

/// The document for a report, with the budgets' state now.
pub fn stats(r: &Report, budgets: Vec<BudgetState>) -> ApiStats {
    ApiStats {
        since: rfc3339(r.since_ms),
        until: rfc3339(r.until_ms),
        total: (&r.total).into(),
        models: r.models.iter().map(|m| ModelFigures { model: m.model.clone(), figures: (&m.stats).into() }).collect(),
        endpoints: r
            .endpoints
            .iter()
            .map(|e| EndpointFigures {
                endpoint: e.endpoint.clone(),
                model: e.model.clone(),
                figures: (&e.stats).into(),
            })
            .collect(),
        clients: r
            .clients
            .iter()
            .map(|c| ClientFigures { client: c.client.clone(), figures: (&c.stats).into() })
            .collect(),
        budgets,
    }
}
