//! Request dispatch: `/v1/chat/completions` and `/v1/embeddings` to the pipeline, and the operational routes
//! (`/v1/models`, `/health`, `/ready`, `/status`, `/metrics`, `/dashboard`); `/admin/*` to [`super::admin`].

use std::sync::Arc;

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use serde::Serialize;

use crate::gateway::Gateway;
use crate::pipeline::{self, error_response, Body};
use crate::protocol::{Api, ApiError};
use crate::state::PairView;

pub(super) fn json<T: Serialize>(status: StatusCode, v: &T) -> Response<Body> {
    let body = serde_json::to_vec(v).unwrap_or_default();
    let mut r = Response::new(Body::full(body));
    *r.status_mut() = status;
    r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    r
}

pub(super) fn raw(status: StatusCode, content_type: &'static str, body: impl Into<Bytes>) -> Response<Body> {
    let mut r = Response::new(Body::full(body));
    *r.status_mut() = status;
    r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    r
}

pub(super) fn not_found(path: &str) -> Response<Body> {
    error_response(&ApiError::new(
        StatusCode::NOT_FOUND,
        "invalid_request_error",
        "not_found",
        format!("Unknown route {path}"),
    ))
}

pub(super) fn method_not_allowed(method: &Method, path: &str) -> Response<Body> {
    error_response(&ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "invalid_request_error",
        "method_not_allowed",
        format!("{method} is not allowed on {path}"),
    ))
}

/// Dispatch one request.
pub async fn route(gw: Arc<Gateway>, req: Request<Incoming>) -> Response<Body> {
    let path = req.uri().path();
    let method = req.method().clone();
    let api = match path {
        "/v1/chat/completions" | "/chat/completions" => Some(Api::Chat),
        "/v1/embeddings" | "/embeddings" => Some(Api::Embeddings),
        _ => None,
    };
    if let Some(api) = api {
        if method != Method::POST {
            return method_not_allowed(&method, path);
        }
        return pipeline::handle(&gw, api, req).await;
    }
    let get = method == Method::GET || method == Method::HEAD;
    match path {
        "/v1/models" | "/models" if get => models(&gw, req.headers()),
        "/health" if get => raw(StatusCode::OK, "application/json", &b"{\"status\":\"ok\"}"[..]),
        "/ready" if get => ready(&gw),
        "/status" if get => json(StatusCode::OK, &status(&gw)),
        "/metrics" if get => raw(StatusCode::OK, "text/plain; version=0.0.4; charset=utf-8", gw.metrics.render()),
        "/api/stats" if get => api_stats(&gw, req.uri().query().unwrap_or("")).await,
        "/dashboard" | "/dashboard/" if get => raw(StatusCode::OK, "text/html; charset=utf-8", super::dashboard::PAGE),
        p if p.starts_with("/admin/") => {
            if method != Method::POST {
                return method_not_allowed(&method, p);
            }
            super::admin::admin(&gw, req).await
        }
        "/v1/models" | "/models" | "/health" | "/ready" | "/status" | "/metrics" | "/dashboard" => {
            method_not_allowed(&method, path)
        }
        _ => not_found(path),
    }
}

/// `GET /v1/models`: every public model and alias; with client keys configured, only to a client, and only
/// the models it may use.
fn models(gw: &Gateway, headers: &http::HeaderMap) -> Response<Body> {
    let rt = gw.runtime();
    match pipeline::admit::authenticate(&rt, headers) {
        Ok(None) => raw(StatusCode::OK, "application/json", rt.models_json.clone()),
        Ok(Some(client)) => {
            let names: Vec<&str> = rt
                .config
                .models
                .iter()
                .map(|m| m.name.as_str())
                .chain(rt.config.aliases())
                .filter(|m| client.allows(m))
                .collect();
            raw(
                StatusCode::OK,
                "application/json",
                crate::protocol::openai::model_list(&names, crate::protocol::openai::MODELS_CREATED),
            )
        }
        Err(e) => error_response(&e),
    }
}

/// `GET /api/stats?since=1h[&model=M]`: the request log's figures over the window (read off the request path,
/// on a blocking thread).
async fn api_stats(gw: &Gateway, query: &str) -> Response<Body> {
    let mut since = std::time::Duration::from_secs(3600);
    let mut model = None;
    for (k, v) in query.split('&').filter_map(|kv| kv.split_once('=')) {
        match k {
            "since" => match crate::config::parse_duration(v) {
                Ok(d) => since = d,
                Err(e) => return error_response(&ApiError::invalid("invalid_since", format!("`since`: {e}"))),
            },
            "model" => model = Some(v.to_string()),
            _ => {}
        }
    }
    let Some(source) = gw.log.source().cloned() else {
        return error_response(&ApiError::new(
            StatusCode::NOT_FOUND,
            "invalid_request_error",
            "request_log_off",
            "The request log is off ([log] enabled = false): there are no statistics",
        ));
    };
    let now = crate::clock::unix_ms();
    let budgets = gw
        .runtime()
        .budgets
        .iter()
        .map(|b| {
            let (spent, level) = b.state(now);
            crate::report::api::BudgetState {
                name: b.cfg.name.clone(),
                period: b.cfg.period.name(),
                spent_usd: spent.usd(),
                limit_usd: b.cfg.limit_usd,
                state: level.as_str(),
            }
        })
        .collect();
    let read = tokio::task::spawn_blocking(move || {
        let now = crate::clock::unix_ms();
        let since_ms = now - since.as_millis() as i64;
        let mut rows = source.read_since(since_ms)?;
        if let Some(m) = &model {
            rows.retain(|r| &r.model == m);
        }
        Ok::<_, crate::log::ReadError>(crate::report::api::stats(
            &crate::report::aggregate(&rows, since_ms, now + 1, crate::report::DEFAULT_SLA_MS),
            budgets,
        ))
    })
    .await;
    if let Ok(Err(e)) = &read {
        tracing::warn!(error = %e, "/api/stats: the request log could not be read");
    }
    match read {
        Ok(Ok(doc)) => json(StatusCode::OK, &doc),
        _ => error_response(&ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "service_unavailable",
            "request_log_unreadable",
            "The request log could not be read now",
        )),
    }
}

fn ready(gw: &Gateway) -> Response<Body> {
    let rt = gw.runtime();
    let now = gw.now_ms();
    let serving = rt.pairs().filter(|(e, p)| rt.can_serve(e, p, now)).count();
    let status = if serving > 0 { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    json(status, &serde_json::json!({"ready": serving > 0, "serving_pairs": serving}))
}

/// `GET /status`.
#[derive(Serialize)]
pub struct StatusDoc {
    global: Global,
    endpoints: Vec<EndpointStatus>,
    state: StateStatus,
}

/// Where health lives: `{"backend": "memory"}`, or `{"backend": "redis", "connected": …, "replica": …}`.
#[derive(Serialize)]
struct StateStatus {
    backend: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    connected: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    replica: Option<String>,
    /// Health changes the outbox dropped because it was full.
    #[serde(skip_serializing_if = "Option::is_none")]
    dropped_events: Option<u64>,
}

#[derive(Serialize)]
struct Global {
    available_ratio: f64,
    degraded: bool,
}

#[derive(Serialize)]
struct EndpointStatus {
    name: String,
    enabled: bool,
    api_keys: usize,
    api_keys_set_aside: usize,
    models: Vec<PairView>,
}

/// The `/status` document.
pub fn status(gw: &Gateway) -> StatusDoc {
    let rt = gw.runtime();
    let now = gw.now_ms();
    let (available_ratio, degraded) = rt.availability(now);
    let endpoints = rt
        .endpoints
        .iter()
        .map(|e| {
            let (n, aside) = e.keys.counts();
            let ready = e.ready();
            EndpointStatus {
                name: e.cfg.name.clone(),
                enabled: e.enabled(),
                api_keys: n,
                api_keys_set_aside: aside,
                models: e
                    .pairs
                    .iter()
                    .map(|p| {
                        let mut v = p.view(&rt.policy.breaker, now);
                        v.can_serve &= ready;
                        v
                    })
                    .collect(),
            }
        })
        .collect();
    let state = match &gw.shared {
        None => StateStatus { backend: "memory", connected: None, replica: None, dropped_events: None },
        Some(r) => StateStatus {
            backend: "redis",
            connected: Some(r.connected()),
            replica: Some(r.replica().to_owned()),
            dropped_events: Some(gw.outbox.dropped()),
        },
    };
    StatusDoc { global: Global { available_ratio, degraded }, endpoints, state }
}
