//! The *admit* phase: receive the request and decide whether it may go on — who asks (the client's key), the
//! body within its limit and of the right content type, a valid OpenAI request, the client's model list, its
//! rate limits and parallel requests. Budgets decide in *route* (they depend on the model that will serve).
//!
//! Does no I/O beyond reading the request body; decisions are the policy crate's, client state is
//! `state::clients`'.

use std::sync::Arc;

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::StatusCode;
use http_body::Body as HttpBody;
use http_body_util::BodyExt;
use sheepdog_policy::pricing::Tokens;
use sheepdog_policy::ratelimit::{format_reset, write_reset, Which};

use crate::protocol::{openai, Api, ApiError, RequestInfo};
use crate::state::{Client, ParallelGuard, Runtime};

/// Read a request body up to `limit` bytes: 413 above it, 415 for a content type that is not JSON.
pub async fn read_body<B>(headers: &HeaderMap, body: B, limit: usize) -> Result<Bytes, ApiError>
where
    B: HttpBody<Data = Bytes>,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let too_large = || {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "invalid_request_error",
            "body_too_large",
            format!("The request body is larger than the limit of {limit} bytes"),
        )
    };
    if let Some(ct) = headers.get(header::CONTENT_TYPE) {
        let ok = ct.to_str().map(|s| s.trim().to_ascii_lowercase().starts_with("application/json")).unwrap_or(false);
        if !ok {
            return Err(ApiError::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "invalid_request_error",
                "unsupported_media_type",
                "Content-Type must be application/json",
            ));
        }
    }
    let declared = headers.get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
    let mut body = std::pin::pin!(body);
    if declared.is_some_and(|n| n > limit as u64) {
        drain(body.as_mut()).await;
        return Err(too_large());
    }
    // A body that came in one frame is kept as it came (a slice of the connection's read buffer: no copy, and
    // clones of it share it); one in several is put together.
    let mut first: Option<Bytes> = None;
    let mut buf = bytes::BytesMut::new();
    while let Some(frame) = body.as_mut().frame().await {
        let Ok(frame) = frame else {
            return Err(ApiError::invalid("body_read_error", "The request body could not be read"));
        };
        if let Ok(data) = frame.into_data() {
            if first.as_ref().map_or(0, Bytes::len) + buf.len() + data.len() > limit {
                drain(body.as_mut()).await;
                return Err(too_large());
            }
            if first.is_none() && buf.is_empty() {
                first = Some(data);
            } else {
                if let Some(f) = first.take() {
                    buf.extend_from_slice(&f);
                }
                buf.extend_from_slice(&data);
            }
        }
    }
    Ok(first.unwrap_or_else(|| buf.freeze()))
}

/// At most this much of a refused body is read and thrown away before the 413 goes out.
const DRAIN_BYTES: usize = 32 << 20;
/// … and for at most this long.
const DRAIN_TIME: std::time::Duration = std::time::Duration::from_secs(2);

/// Read and discard what is left of a body that is too large (bounded in bytes and time), so that a client still
/// sending it reads the 413 instead of a connection reset; past the bounds the connection is closed anyway.
async fn drain<B>(mut body: std::pin::Pin<&mut B>)
where
    B: HttpBody<Data = Bytes>,
{
    let read = async {
        let mut seen = 0usize;
        while let Some(Ok(frame)) = body.as_mut().frame().await {
            seen += frame.data_ref().map_or(0, |d| d.len());
            if seen > DRAIN_BYTES {
                break;
            }
        }
    };
    let _ = tokio::time::timeout(DRAIN_TIME, read).await;
}

/// Validate the body for `api` and find what routing needs.
pub fn inspect(api: Api, body: &[u8]) -> Result<RequestInfo, ApiError> {
    match api {
        Api::Chat => openai::inspect_chat(body),
        Api::Embeddings => openai::inspect_embeddings(body),
    }
}

/// 503 `overloaded` (with `Retry-After: 1`) when more than `max` requests are in flight, this one counted.
pub fn overload(in_flight: i64, max: usize) -> Result<(), ApiError> {
    if usize::try_from(in_flight).unwrap_or(0) <= max {
        return Ok(());
    }
    let e = ApiError::new(
        StatusCode::SERVICE_UNAVAILABLE,
        "server_error",
        "overloaded",
        format!("The gateway has {max} requests in flight, its max_concurrent_requests. Retry in a moment."),
    )
    .retry_after(1);
    Err(e)
}

/// 408 `request_timeout`: the whole request did not arrive within `client_timeout`.
pub fn request_timeout(limit: std::time::Duration) -> ApiError {
    ApiError::new(
        StatusCode::REQUEST_TIMEOUT,
        "invalid_request_error",
        "request_timeout",
        format!("The request was not received within {}s (server.client_timeout)", limit.as_secs_f64()),
    )
}

/// Completion tokens reserved for a request that does not say how many it may use (`max_tokens`).
pub const DEFAULT_COMPLETION_RESERVE: u64 = 1024;

/// What admission reserves for a request before its usage is known: the prompt as a third of the body's
/// bytes (JSON and message framing make that an overestimate for English text, about right for CJK), the
/// completion as `max_tokens` (else [`DEFAULT_COMPLETION_RESERVE`]) times `n`; embeddings complete nothing.
pub fn estimate(api: Api, info: &RequestInfo, body_len: usize) -> Tokens {
    let prompt = (body_len as u64).div_ceil(3);
    let completion = match api {
        Api::Chat => info.max_tokens.unwrap_or(DEFAULT_COMPLETION_RESERVE).saturating_mul(u64::from(info.n.max(1))),
        Api::Embeddings => 0,
    };
    Tokens::new(prompt, completion)
}

/// The key a request presents: `Authorization: Bearer KEY`, else `x-api-key: KEY`.
fn presented_key(headers: &HeaderMap) -> Option<&str> {
    let bearer = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer ").or_else(|| v.strip_prefix("bearer ")));
    bearer.or_else(|| headers.get("x-api-key").and_then(|v| v.to_str().ok())).map(str::trim)
}

/// The client a request comes from; `None` when no clients are configured (anonymous requests). With
/// clients, a missing or unknown key is 401 `invalid_api_key` (the key is never echoed).
pub fn authenticate(rt: &Runtime, headers: &HeaderMap) -> Result<Option<Arc<Client>>, ApiError> {
    if rt.clients.is_empty() {
        return Ok(None);
    }
    let refused = |message: &str| {
        ApiError::new(StatusCode::UNAUTHORIZED, "invalid_request_error", "invalid_api_key", message.to_string())
    };
    let key = presented_key(headers).filter(|k| !k.is_empty()).ok_or_else(|| {
        refused("No API key provided: send it as `Authorization: Bearer <key>` (or `x-api-key: <key>`).")
    })?;
    rt.clients.authenticate(key).map(Some).ok_or_else(|| refused("Incorrect API key provided."))
}

/// 403 `model_not_allowed` unless `client` may ask for `model` (a model or an alias, as requested).
pub fn allow(client: &Client, model: &str) -> Result<(), ApiError> {
    if client.allows(model) {
        return Ok(());
    }
    Err(ApiError::new(
        StatusCode::FORBIDDEN,
        "permission_error",
        "model_not_allowed",
        format!("The client `{}` may not use the model `{model}`.", client.name),
    ))
}

/// A client's admission: its place among its parallel requests and the tokens it reserved.
pub struct Grant {
    /// The client.
    pub client: Arc<Client>,
    /// Tokens reserved from its per-minute allowance (settled at *finish* with the real usage).
    pub tokens: u64,
    /// Counts the request in flight for `max_parallel` until it finishes.
    _parallel: ParallelGuard,
}

/// Admit a request of `client` that reserves `tokens`, or refuse it with 429 `rate_limit_exceeded` (its
/// `type` says which limit: `requests` or `tokens`, as OpenAI's) and `Retry-After`.
pub fn limit(client: &Arc<Client>, tokens: u64, now_ms: u64) -> Result<Grant, ApiError> {
    let name = &client.name;
    let Some(parallel) = client.enter() else {
        let max = client.cfg.max_parallel.unwrap_or_default();
        let e = ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            "requests",
            "rate_limit_exceeded",
            format!("The client `{name}` has {max} requests in flight, its max_parallel. Retry when one finishes."),
        )
        .retry_after(1);
        return Err(e);
    };
    if let Err((which, l)) = client.live.limits.lock().admit(tokens, now_ms) {
        let (kind, what, limit) = match which {
            Which::Requests => ("requests", "requests", client.cfg.rpm.map_or(0, u64::from)),
            Which::Tokens => ("tokens", "tokens", client.cfg.tpm.unwrap_or_default()),
        };
        let e = ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            kind,
            "rate_limit_exceeded",
            format!(
                "Rate limit reached for client `{name}` on {what} per minute: limit {limit}, this request needs \
                 {}. Please try again in {}.",
                if which == Which::Requests { 1 } else { tokens },
                format_reset(l.retry_after_ms)
            ),
        )
        .retry_after(l.retry_after_ms.div_ceil(1000).max(1));
        return Err(e);
    }
    Ok(Grant { client: client.clone(), tokens, _parallel: parallel })
}

/// OpenAI's `x-ratelimit-{limit,remaining,reset}-{requests,tokens}` for `client` now (a limit it does not
/// have is left out).
pub fn ratelimit_headers(client: &Client, now_ms: u64, h: &mut HeaderMap) {
    let snap = client.live.limits.lock().snapshot(now_ms);
    // Room for all six at once: the map grows (and rehashes) once, not header by header.
    h.reserve(6);
    let mut reset_text = String::with_capacity(16);
    let mut put = |h: &mut HeaderMap, names: &[HeaderName; 3], fig: Option<(u64, u64, u64)>| {
        if let Some((limit, remaining, reset)) = fig {
            h.insert(names[0].clone(), HeaderValue::from(limit));
            h.insert(names[1].clone(), HeaderValue::from(remaining));
            reset_text.clear();
            write_reset(reset, &mut reset_text);
            if let Ok(v) = HeaderValue::from_str(&reset_text) {
                h.insert(names[2].clone(), v);
            }
        }
    };
    put(h, &REQUESTS_HEADERS, snap.requests);
    put(h, &TOKENS_HEADERS, snap.tokens);
}

const REQUESTS_HEADERS: [HeaderName; 3] = [
    HeaderName::from_static("x-ratelimit-limit-requests"),
    HeaderName::from_static("x-ratelimit-remaining-requests"),
    HeaderName::from_static("x-ratelimit-reset-requests"),
];
const TOKENS_HEADERS: [HeaderName; 3] = [
    HeaderName::from_static("x-ratelimit-limit-tokens"),
    HeaderName::from_static("x-ratelimit-remaining-tokens"),
    HeaderName::from_static("x-ratelimit-reset-tokens"),
];
