//! One health probe: the smallest request that shows whether an endpoint serves a model (a one-token chat
//! completion, an embedding, `GET /models` or `GET probe_path`), with its timings. The request bodies come from
//! the protocol module; the probe only sends them and classifies the answer.

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{Method, Request};
use http_body_util::{BodyExt, Limited};
use sheepdog_policy::pricing::Tokens;
use sheepdog_policy::retry::{self, Verdict};
use tokio::time::Instant;

use crate::config::{HealthConfig, ModelKind, ProbeKind};
use crate::protocol::openai;
use crate::state::Endpoint;

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
    /// Whether the key was refused (401, or 403 to the probe's harmless prompt).
    pub auth_failed: bool,
    /// Tokens the probe used.
    pub tokens: Tokens,
}

/// Send one probe for `pair` on `ep` with this `Authorization` value.
pub async fn probe(
    ep: &Endpoint,
    kind: ModelKind,
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
        tokens: Tokens::default(),
    };
    let (method, uri, body) = match (health.probe, kind) {
        (ProbeKind::Http, _) => (Method::GET, ep.base.join_absolute(&health.probe_path), Bytes::new()),
        (ProbeKind::Models, _) => (Method::GET, ep.base.join("/models"), Bytes::new()),
        (ProbeKind::Chat, ModelKind::Embeddings) => (
            Method::POST,
            ep.base.join("/embeddings"),
            openai::probe::embeddings_probe(upstream_model, &health.probe_prompt),
        ),
        (ProbeKind::Chat, ModelKind::Chat) => (
            Method::POST,
            ep.base.join("/chat/completions"),
            openai::probe::chat_probe(upstream_model, &health.probe_prompt),
        ),
    };
    let mut req = Request::builder().method(method).uri(uri).header(header::ACCEPT, "application/json");
    if !body.is_empty() {
        req = req.header(header::CONTENT_TYPE, "application/json");
    }
    if let Some(a) = auth {
        req = req.header(header::AUTHORIZATION, a);
    }
    let Ok(req) = req.body(body) else {
        res.error = Some("could not build the probe request".into());
        return res;
    };
    let deadline = started + health.timeout;
    let resp = match tokio::time::timeout_at(deadline, ep.transport.send(req)).await {
        Err(_) => {
            res.error = Some(format!("timeout after {} ms", health.timeout.as_millis()));
            res.total_ms = ms(started);
            return res;
        }
        Ok(Err(e)) => {
            res.error = Some(if e.connect { "connection failed".into() } else { "connection error".into() });
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
        // A probe's prompt is harmless: a 403 to it refuses the key, not the prompt.
        _ if status == 401 || status == 403 => {
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
        ProbeKind::Models => match openai::probe::lists_model(&body, upstream_model) {
            Some(true) => res.ok = true,
            Some(false) => res.error = Some(format!("model {upstream_model} is not listed by GET /models")),
            None => res.error = Some("GET /models answered something that is not a model list".into()),
        },
        ProbeKind::Chat => match openai::answer_usage(&body) {
            Ok(u) => {
                res.ok = true;
                res.tokens = u.unwrap_or_default();
            }
            Err(_) => res.error = Some("answered with something that is not JSON".into()),
        },
    }
    res
}

fn ms(t: Instant) -> f64 {
    t.elapsed().as_secs_f64() * 1000.0
}
