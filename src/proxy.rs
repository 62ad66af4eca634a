//! The request pipeline for `/v1/chat/completions` and `/v1/embeddings`: read and inspect the body, pick a
//! candidate, forward, fail over, and relay the answer (streams chunk by chunk).
//!
//! Decisions come from `balance`, `breaker` and `retry`; outcomes go to `state::Pair`. No lock is held across an
//! `.await`; the request body is forwarded as received (only the `model` value may be replaced).

use std::borrow::Cow;
use std::convert::Infallible;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Request, Response, StatusCode};
use http_body::{Body as HttpBody, Frame, SizeHint};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use tokio::time::{Instant, Sleep};

use crate::balance::Candidate;
use crate::breaker::Admission;
use crate::config::{HedgeAfter, ModelKind};
use crate::gateway::Gateway;
use crate::openai::{self, ApiError, RequestInfo, Usage};
use crate::requestlog::Entry;
use crate::retry::{self, Backoff, Verdict};
use crate::state::{Endpoint, InFlight, Member, Model, Outcome, Pair, Runtime, Source};

/// Response header: the endpoint that served.
pub const H_ENDPOINT: HeaderName = HeaderName::from_static("x-sheepdog-endpoint");
/// Response header: the public model that served.
pub const H_MODEL: HeaderName = HeaderName::from_static("x-sheepdog-model");
/// Response header: upstream attempts made.
pub const H_ATTEMPTS: HeaderName = HeaderName::from_static("x-sheepdog-attempts");
/// Response header on a static fallback answer.
pub const H_STATIC: HeaderName = HeaderName::from_static("x-sheepdog-static-fallback");

/// Largest upstream answer accepted for a non-streaming request.
const MAX_ANSWER_BYTES: usize = 64 << 20;

/// Which OpenAI API a request is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Api {
    /// `POST /v1/chat/completions`.
    Chat,
    /// `POST /v1/embeddings`.
    Embeddings,
}

impl Api {
    /// `chat` or `embeddings`, as in the request log.
    pub fn name(self) -> &'static str {
        match self {
            Api::Chat => "chat",
            Api::Embeddings => "embeddings",
        }
    }
}

/// The response body of the gateway: a whole buffer, or an upstream stream relayed frame by frame.
pub enum Body {
    /// A complete body.
    Full(Option<Bytes>),
    /// A relayed upstream stream.
    Relay(Box<Relay>),
}

impl Body {
    /// A complete body.
    pub fn full(b: impl Into<Bytes>) -> Body {
        Body::Full(Some(b.into()))
    }
}

impl HttpBody for Body {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        match self.get_mut() {
            Body::Full(b) => Poll::Ready(b.take().map(|b| Ok(Frame::data(b)))),
            Body::Relay(r) => r.poll_next(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        matches!(self, Body::Full(None))
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            Body::Full(Some(b)) => SizeHint::with_exact(b.len() as u64),
            Body::Full(None) => SizeHint::with_exact(0),
            Body::Relay(_) => SizeHint::default(),
        }
    }
}

/// An error response in the OpenAI shape.
pub fn error_response(e: &ApiError) -> Response<Body> {
    let mut r = Response::new(Body::full(e.body()));
    *r.status_mut() = e.status;
    r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    if let Some(s) = e.retry_after_s {
        r.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(s));
    }
    r
}

/// Handle one `/v1/chat/completions` or `/v1/embeddings` request; it goes to the request log once answered
/// (a stream when it ends).
pub async fn handle(gw: &Arc<Gateway>, api: Api, req: Request<Incoming>) -> Response<Body> {
    let arrived = Instant::now();
    let mut entry = Entry::begin(api.name());
    let mut resp = match serve(gw, api, req, arrived, &mut entry).await {
        Ok(r) => r,
        Err(e) => {
            entry.error = Some(Cow::Borrowed(e.code));
            error_response(&e)
        }
    };
    entry.status = resp.status().as_u16();
    match resp.body_mut() {
        Body::Relay(relay) => relay.acct.log = Some((entry, arrived)),
        Body::Full(_) => {
            entry.duration_ms = ms_since(arrived);
            gw.log.record(entry);
        }
    }
    resp
}

async fn read_body(req: Request<Incoming>, limit: usize) -> Result<Bytes, ApiError> {
    let too_large = || {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "invalid_request_error",
            "body_too_large",
            format!("The request body is larger than the limit of {limit} bytes"),
        )
    };
    if let Some(ct) = req.headers().get(header::CONTENT_TYPE) {
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
    let declared = req.headers().get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        return Err(too_large());
    }
    match Limited::new(req.into_body(), limit).collect().await {
        Ok(c) => Ok(c.to_bytes()),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => Err(too_large()),
        Err(_) => Err(ApiError::invalid("body_read_error", "The request body could not be read")),
    }
}

/// Why one attempt failed.
#[derive(Debug)]
struct AttemptError {
    endpoint: String,
    model: String,
    what: String,
    kind: FailKind,
    retry_after_ms: Option<u64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum FailKind {
    Timeout,
    RateLimited,
    Garbage,
    Other,
}

enum AttemptResult {
    /// An answer, with its usage when it was read (not for streams: their relay accounts for it).
    Served(Response<Body>, Option<Usage>),
    /// The upstream refused the request itself (4xx): passed through, not retried.
    ClientError(Response<Body>),
    Failed(AttemptError),
}

/// Per-request context shared by its attempts.
struct Ctx<'a> {
    gw: &'a Arc<Gateway>,
    rt: &'a Arc<Runtime>,
    api: Api,
    body: &'a Bytes,
    info: &'a RequestInfo,
    deadline: Instant,
    arrived: Instant,
}

async fn serve(
    gw: &Arc<Gateway>,
    api: Api,
    req: Request<Incoming>,
    arrived: Instant,
    entry: &mut Entry,
) -> Result<Response<Body>, ApiError> {
    let rt = gw.runtime();
    let body = read_body(req, rt.config.server.max_body_bytes).await?;
    let info = match api {
        Api::Chat => openai::inspect_chat(&body)?,
        Api::Embeddings => openai::inspect_embeddings(&body)?,
    };
    entry.model.clone_from(&info.model);
    entry.stream = info.stream;
    let model = rt.models.get(&info.model).ok_or_else(|| ApiError::model_not_found(&info.model))?;
    let wanted = match api {
        Api::Chat => ModelKind::Chat,
        Api::Embeddings => ModelKind::Embeddings,
    };
    if model.cfg.kind != wanted {
        return Err(ApiError::invalid(
            "wrong_model_kind",
            format!(
                "The model `{}` is not a {} model",
                info.model,
                if api == Api::Chat { "chat" } else { "embeddings" }
            ),
        ));
    }
    let deadline = arrived + rt.config.retry.deadline;
    let ctx = Ctx { gw, rt: &rt, api, body: &body, info: &info, deadline, arrived };
    failover(&ctx, model, entry).await
}

/// The models tried for a request: the requested one, then its fallbacks in order (each once).
fn chain<'a>(rt: &'a Runtime, model: &'a Arc<Model>) -> Vec<&'a Arc<Model>> {
    let mut out = vec![model];
    for f in &model.cfg.fallbacks {
        if let Some(m) = rt.models.get(f) {
            if !out.iter().any(|x| Arc::ptr_eq(x, m)) {
                out.push(m);
            }
        }
    }
    out
}

thread_local! {
    static CANDIDATES: std::cell::RefCell<Vec<Candidate>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Pick a member of `model` not yet tried in this pass and admit it through its breaker: its index and the
/// admission time (the breaker judges the attempt's answer against it).
fn pick(ctx: &Ctx<'_>, model: &Model, tried: &mut Vec<(usize, usize)>, mi: usize) -> Option<(usize, u64)> {
    let now = ctx.gw.now_ms();
    let slow = ctx.rt.config.health.slow_start.as_millis() as u64;
    loop {
        let idx = CANDIDATES.with(|c| {
            let mut c = c.borrow_mut();
            ctx.rt.candidates(model, now, slow, &mut c);
            model.balancer.pick(&c, |i| !tried.contains(&(mi, i)), &mut rand::thread_rng())
        })?;
        tried.push((mi, idx));
        let pair = &model.members[idx].pair;
        match pair.admit(&ctx.rt.breaker, now) {
            Admission::Admitted | Admission::Trial => return Some((idx, now)),
            Admission::Rejected => continue,
        }
    }
}

async fn failover(ctx: &Ctx<'_>, model: &Arc<Model>, entry: &mut Entry) -> Result<Response<Body>, ApiError> {
    let chain = chain(ctx.rt, model);
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
                        hedged(ctx, m, mi, (idx, admitted_ms), delay, can_hedge, &mut tried, &mut attempts, &mut errors)
                            .await
                    }
                };
                let member = &m.members[idx];
                match result {
                    AttemptResult::Served(mut resp, usage) => {
                        finish_headers(&mut resp, &member.endpoint.name_header, &m.name_header, attempts);
                        if attempts > 1 {
                            ctx.gw.metrics.failover(&model.cfg.name);
                        }
                        served(entry, member, m, attempts);
                        entry.ttft_ms = Some(ms_since(ctx.arrived));
                        if let Some(u) = usage {
                            log_usage(entry, u, m.cfg.input_usd_per_mtok, m.cfg.output_usd_per_mtok);
                        }
                        return Ok(resp);
                    }
                    AttemptResult::ClientError(mut resp) => {
                        finish_headers(&mut resp, &member.endpoint.name_header, &m.name_header, attempts);
                        served(entry, member, m, attempts);
                        return Ok(resp);
                    }
                    AttemptResult::Failed(e) => {
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
            if queued || !wait_for_candidate(ctx, &chain).await {
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
    entry.attempts = attempts;
    if let Some(text) = &model.cfg.static_fallback {
        entry.served_model = Some(model.cfg.name.clone());
        entry.error = Some(Cow::Borrowed("static_fallback"));
        return Ok(static_fallback(ctx, model, text, attempts));
    }
    Err(exhausted(ctx, model, attempts, &errors, &chain))
}

/// Who served, for the request log.
fn served(entry: &mut Entry, member: &Member, model: &Model, attempts: u32) {
    entry.endpoint = Some(member.endpoint.cfg.name.clone());
    entry.served_model = Some(model.cfg.name.clone());
    entry.attempts = attempts;
}

fn log_usage(entry: &mut Entry, u: Usage, input_price: f64, output_price: f64) {
    entry.prompt_tokens = Some(u.prompt_tokens);
    entry.completion_tokens = Some(u.completion_tokens);
    entry.cost_usd = Some(u.cost_usd(input_price, output_price));
}

/// How long the first attempt may take before a hedged second one starts, if the model hedges.
fn hedge_delay(model: &Model, member: &Member) -> Option<Duration> {
    match model.cfg.hedge_after? {
        HedgeAfter::Fixed(d) => Some(d),
        HedgeAfter::P95 => member.pair.p95_ms().map(|ms| Duration::from_secs_f64(ms.max(1.0) / 1000.0)),
    }
}

/// Run the first attempt; if it has not answered after `delay`, start a second on another member. The first
/// answer wins; the other attempt is dropped, which closes its upstream connection. A failure of one waits for
/// the other. Returns the result and the member that produced it.
#[allow(clippy::too_many_arguments)]
async fn hedged(
    ctx: &Ctx<'_>,
    m: &Model,
    mi: usize,
    (idx, admitted_ms): (usize, u64),
    delay: Duration,
    can_hedge: bool,
    tried: &mut Vec<(usize, usize)>,
    attempts: &mut u32,
    errors: &mut Vec<AttemptError>,
) -> (AttemptResult, usize) {
    let first = attempt(ctx, m, &m.members[idx], admitted_ms);
    tokio::pin!(first);
    tokio::select! {
        r = &mut first => return (r, idx),
        _ = tokio::time::sleep(delay), if can_hedge => {}
    }
    let Some((idx2, admitted2)) = pick(ctx, m, tried, mi) else { return (first.await, idx) };
    *attempts += 1;
    tracing::debug!(model = %m.cfg.name, first = %m.members[idx].endpoint.cfg.name,
        second = %m.members[idx2].endpoint.cfg.name, "hedging a slow attempt");
    let second = attempt(ctx, m, &m.members[idx2], admitted2);
    tokio::pin!(second);
    tokio::select! {
        r = &mut first => match r {
            AttemptResult::Failed(e) => {
                errors.push(e);
                (second.await, idx2)
            }
            r => (r, idx),
        },
        r = &mut second => match r {
            AttemptResult::Failed(e) => {
                errors.push(e);
                (first.await, idx)
            }
            r => (r, idx2),
        },
    }
}

/// Wait up to `queue_timeout` for any member of the chain to be able to serve. False when none recovered.
async fn wait_for_candidate(ctx: &Ctx<'_>, chain: &[&Arc<Model>]) -> bool {
    let timeout = ctx.rt.config.retry.queue_timeout;
    if timeout.is_zero() {
        return false;
    }
    let Ok(_permit) = ctx.gw.queue.try_acquire() else { return false };
    let until = (Instant::now() + timeout).min(ctx.deadline);
    loop {
        let now = ctx.gw.now_ms();
        let any = chain.iter().any(|m| m.members.iter().any(|x| ctx.rt.can_serve(&x.endpoint, &x.pair, now)));
        if any {
            return true;
        }
        if Instant::now() >= until {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(25).min(until - Instant::now())).await;
    }
}

fn finish_headers(resp: &mut Response<Body>, endpoint: &HeaderValue, model: &HeaderValue, attempts: u32) {
    let h = resp.headers_mut();
    h.insert(H_ENDPOINT, endpoint.clone());
    h.insert(H_MODEL, model.clone());
    h.insert(H_ATTEMPTS, HeaderValue::from(attempts));
}

fn unix_now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

fn static_fallback(ctx: &Ctx<'_>, model: &Model, text: &str, attempts: u32) -> Response<Body> {
    let (body, ct) = if ctx.info.stream {
        (openai::static_stream(&model.cfg.name, text, unix_now()), "text/event-stream")
    } else {
        (openai::static_answer(&model.cfg.name, text, unix_now()), "application/json")
    };
    let mut r = Response::new(Body::full(body));
    r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static(ct));
    r.headers_mut().insert(H_STATIC, HeaderValue::from_static("true"));
    finish_headers(&mut r, &HeaderValue::from_static("static"), &model.name_header, attempts);
    r
}

/// The error when nothing could serve: names every attempt, or why nothing could be tried.
fn exhausted(ctx: &Ctx<'_>, model: &Model, attempts: u32, errors: &[AttemptError], chain: &[&Arc<Model>]) -> ApiError {
    let name = &model.cfg.name;
    if errors.is_empty() {
        let now = ctx.gw.now_ms();
        let why: Vec<String> = chain
            .iter()
            .flat_map(|m| m.members.iter())
            .map(|x| {
                let reason = if !x.endpoint.enabled.load(Ordering::Relaxed) {
                    "disabled".to_string()
                } else if !x.endpoint.keys.has_usable() {
                    "no usable API key".to_string()
                } else {
                    format!("breaker {}", x.pair.breaker_state().as_str())
                };
                let _ = now;
                format!("{}/{}: {reason}", x.endpoint.cfg.name, x.pair.model)
            })
            .collect();
        let mut e = ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "service_unavailable",
            "no_upstream_available",
            format!("No upstream can serve `{name}` now ({}).", why.join("; ")),
        );
        e.retry_after_s = Some(1);
        return e;
    }
    let list: Vec<String> = errors.iter().map(|e| format!("{}/{}: {}", e.endpoint, e.model, e.what)).collect();
    let message = format!("No upstream could serve `{name}` after {attempts} attempt(s): {}.", list.join("; "));
    let all = |k: FailKind| errors.iter().all(|e| e.kind == k);
    if all(FailKind::RateLimited) {
        let mut e = ApiError::new(StatusCode::TOO_MANY_REQUESTS, "rate_limit_error", "upstream_rate_limited", message);
        e.retry_after_s = Some(errors.iter().filter_map(|e| e.retry_after_ms).min().unwrap_or(1000).div_ceil(1000));
        e
    } else if all(FailKind::Timeout) {
        ApiError::new(StatusCode::GATEWAY_TIMEOUT, "timeout", "upstream_timeout", message)
    } else if all(FailKind::Garbage) {
        ApiError::bad_upstream(message)
    } else {
        let mut e =
            ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "service_unavailable", "no_upstream_available", message);
        e.retry_after_s = Some(1);
        e
    }
}

/// Hop-by-hop and framing headers that are not relayed from upstream answers.
/// The upstream request: every header value was built once (Host too, so the client does not format it).
fn upstream_request(
    uri: http::Uri,
    host: &HeaderValue,
    stream: bool,
    key: Option<&HeaderValue>,
    body: Bytes,
) -> Request<Full<Bytes>> {
    let mut req = Request::new(Full::new(body));
    *req.method_mut() = http::Method::POST;
    *req.uri_mut() = uri;
    let h = req.headers_mut();
    h.reserve(4);
    h.insert(header::HOST, host.clone());
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    h.insert(header::ACCEPT, HeaderValue::from_static(if stream { "text/event-stream" } else { "application/json" }));
    if let Some(k) = key {
        h.insert(header::AUTHORIZATION, k.clone());
    }
    req
}

fn strip_headers(h: &mut HeaderMap) {
    // Upstream answers carry a handful of headers, so scanning them again after each removal is cheap.
    while let Some(name) = h.keys().find(|k| is_hop_by_hop(k.as_str())).cloned() {
        h.remove(&name);
    }
}

/// Headers that describe one connection (or set upstream cookies) and are not passed on to the client.
fn is_hop_by_hop(name: &str) -> bool {
    matches!(
        name,
        "connection"
            | "transfer-encoding"
            | "content-length"
            | "upgrade"
            | "te"
            | "trailer"
            | "proxy-authenticate"
            | "set-cookie"
            | "keep-alive"
    )
}

/// Remove any of the endpoint's keys from text that came from upstream (an error body may echo them).
fn scrub(text: &[u8], member: &Member) -> Bytes {
    let mut s = String::from_utf8_lossy(text).into_owned();
    for k in member.endpoint.cfg.api_keys.iter() {
        if !k.expose().is_empty() && s.contains(k.expose()) {
            s = s.replace(k.expose(), "***");
        }
    }
    Bytes::from(s)
}

fn ms_since(t: Instant) -> f64 {
    t.elapsed().as_secs_f64() * 1000.0
}

/// One attempt on one member: send, wait for the first byte, classify, and build the client's response.
async fn attempt(ctx: &Ctx<'_>, model: &Model, member: &Member, admitted_ms: u64) -> AttemptResult {
    let ep = &member.endpoint;
    let pair = &member.pair;
    let now = ctx.gw.now_ms();
    pair.last_traffic_ms.store(now, Ordering::Relaxed);
    let fail = |what: String, kind: FailKind, retry_after_ms: Option<u64>| {
        AttemptResult::Failed(AttemptError {
            endpoint: ep.cfg.name.clone(),
            model: model.cfg.name.clone(),
            what,
            kind,
            retry_after_ms,
        })
    };
    let guard = AttemptGuard { ctx, pair, ep, admitted_ms, done: AtomicBool::new(false) };
    // Counted until the answer is read (a stream: until it ends), however the attempt ends.
    let in_flight = InFlight::start(&member.pair, now);
    let record = |o: Outcome| guard.record(o);
    let body = openai::rewrite_model(ctx.body, ctx.info, &member.upstream_model);
    let started = Instant::now();
    // A failure that is the endpoint's fault: count its status label, tell the breaker, describe it.
    let failed = |label: &'static str, what: String, kind: FailKind, retry_after_ms: Option<u64>| {
        pair.metrics.request(&ctx.gw.metrics, label);
        record(Outcome::Failure(ms_since(started)));
        fail(what, kind, retry_after_ms)
    };
    let first_byte_by = (started + ep.cfg.first_byte_timeout).min(ctx.deadline);
    let end_by = (started + ep.cfg.timeout).min(ctx.deadline);
    // 401/403 set the key aside and the same endpoint is tried at once with the next key.
    let resp = loop {
        let key = match ep.keys.next() {
            Ok(k) => k,
            Err(()) => {
                record(Outcome::Neutral);
                return fail("no usable API key (all answered 401/403)".into(), FailKind::Other, None);
            }
        };
        let uri = match ctx.api {
            Api::Chat => ep.chat_uri.clone(),
            Api::Embeddings => ep.embeddings_uri.clone(),
        };
        let req = upstream_request(uri, ep.base.host(), ctx.info.stream, key.map(|(_, h)| h), body.clone());
        let resp = match tokio::time::timeout_at(first_byte_by, ep.client.request(req)).await {
            Err(_) => {
                let what = format!("timeout: no answer within {} ms", (first_byte_by - started).as_millis());
                return failed("timeout", what, FailKind::Timeout, None);
            }
            Ok(Err(e)) => {
                return failed("error", connect_error_text(&e), FailKind::Other, None);
            }
            Ok(Ok(r)) => r,
        };
        pair.answered();
        let status = resp.status().as_u16();
        if retry::classify_status(status) == Verdict::AuthError {
            pair.metrics.request(&ctx.gw.metrics, crate::metrics::status_label(status));
            if let Some((idx, _)) = key {
                if ep.keys.set_aside(idx, ctx.gw.now_ms()) {
                    let (n, aside) = ep.keys.counts();
                    tracing::warn!(endpoint = %ep.cfg.name, key_index = idx, status, keys = n, set_aside = aside, "upstream rejected an API key; set aside");
                }
                continue;
            }
            record(Outcome::Failure(ms_since(started)));
            return fail(format!("HTTP {status}: upstream refused the request without a key"), FailKind::Other, None);
        }
        break resp;
    };
    let status = resp.status();
    let verdict = retry::classify_status(status.as_u16());
    let label = crate::metrics::status_label(status.as_u16());
    match verdict {
        Verdict::Success => {}
        Verdict::ClientError => {
            pair.metrics.request(&ctx.gw.metrics, label);
            record(Outcome::Neutral);
            let (mut parts, body) = resp.into_parts();
            let bytes = match tokio::time::timeout_at(end_by, Limited::new(body, 1 << 20).collect()).await {
                Ok(Ok(c)) => scrub(&c.to_bytes(), member),
                _ => ApiError::new(
                    status,
                    "invalid_request_error",
                    "upstream_client_error",
                    "upstream refused the request",
                )
                .body(),
            };
            strip_headers(&mut parts.headers);
            return AttemptResult::ClientError(Response::from_parts(parts, Body::full(bytes)));
        }
        Verdict::RateLimited | Verdict::Retriable | Verdict::AuthError => {
            let retry_after = resp
                .headers()
                .get(header::RETRY_AFTER)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| retry::parse_retry_after(v, unix_now()));
            let kind = if verdict == Verdict::RateLimited { FailKind::RateLimited } else { FailKind::Other };
            return failed(label, format!("HTTP {}", status.as_u16()), kind, retry_after);
        }
    }
    let (mut parts, mut upstream) = resp.into_parts();
    strip_headers(&mut parts.headers);
    if ctx.info.stream {
        // Wait for the first chunk before answering, so a stream that dies before it fails over transparently.
        let first = loop {
            match tokio::time::timeout_at(first_byte_by, upstream.frame()).await {
                Err(_) => {
                    return failed("timeout", "timeout: stream sent no chunk in time".into(), FailKind::Timeout, None);
                }
                Ok(None) => {
                    return failed("error", "stream ended before its first chunk".into(), FailKind::Garbage, None);
                }
                Ok(Some(Err(_))) => {
                    return failed("error", "stream broke before its first chunk".into(), FailKind::Other, None);
                }
                Ok(Some(Ok(f))) => match f.into_data() {
                    Ok(d) if !d.is_empty() => break d,
                    _ => continue,
                },
            }
        };
        let ttfb = started.elapsed();
        pair.metrics.ttft.observe(ttfb.as_secs_f64());
        guard.hand_over();
        let acct = Accounting {
            gw: ctx.gw.clone(),
            rt: ctx.rt.clone(),
            pair: pair.clone(),
            endpoint: ep.clone(),
            admitted_ms,
            started,
            ttfb_ms: ttfb.as_secs_f64() * 1000.0,
            input_price: model.cfg.input_usd_per_mtok,
            output_price: model.cfg.output_usd_per_mtok,
            usage: openai::stream_usage(&first),
            done: false,
            log: None,
            _in_flight: in_flight,
        };
        let idle = ep.cfg.first_byte_timeout;
        let relay = Relay {
            first: Some(first),
            upstream,
            idle,
            end_by,
            last_data: Instant::now(),
            timer: Box::pin(tokio::time::sleep_until((Instant::now() + idle).min(end_by))),
            acct,
            finished: false,
        };
        return AttemptResult::Served(Response::from_parts(parts, Body::Relay(Box::new(relay))), None);
    }
    let collected = match tokio::time::timeout_at(end_by, Limited::new(upstream, MAX_ANSWER_BYTES).collect()).await {
        Err(_) => {
            return failed("timeout", "timeout while reading the answer".into(), FailKind::Timeout, None);
        }
        Ok(Err(_)) => {
            return failed("error", "connection broke while reading the answer".into(), FailKind::Other, None);
        }
        Ok(Ok(c)) => c.to_bytes(),
    };
    let elapsed = started.elapsed();
    match openai::answer_usage(&collected) {
        Err(_) => failed("502", "answered with something that is not JSON".into(), FailKind::Garbage, None),
        Ok(usage) => {
            pair.metrics.request(&ctx.gw.metrics, label);
            pair.metrics.request_duration.observe(elapsed.as_secs_f64());
            pair.metrics.ttft.observe(elapsed.as_secs_f64());
            if let Some(u) = usage {
                account_tokens(pair, model.cfg.input_usd_per_mtok, model.cfg.output_usd_per_mtok, u);
            }
            record(Outcome::Success(elapsed.as_secs_f64() * 1000.0));
            AttemptResult::Served(Response::from_parts(parts, Body::full(collected)), usage)
        }
    }
}

/// Reports an attempt's outcome exactly once; an attempt dropped before its verdict (the loser of a hedge, a
/// client that went away) releases its breaker trial instead of holding it.
struct AttemptGuard<'a> {
    ctx: &'a Ctx<'a>,
    pair: &'a Pair,
    ep: &'a Endpoint,
    admitted_ms: u64,
    done: AtomicBool,
}

impl AttemptGuard<'_> {
    fn record(&self, o: Outcome) {
        if !self.done.swap(true, Ordering::Relaxed) {
            let now = self.ctx.gw.now_ms();
            self.pair.record(self.ctx.rt, o, self.admitted_ms, Source::Live, self.ep.keys.has_usable(), now);
        }
    }

    /// The stream relay's accounting reports from here on.
    fn hand_over(&self) {
        self.done.store(true, Ordering::Relaxed);
    }
}

impl Drop for AttemptGuard<'_> {
    fn drop(&mut self) {
        self.record(Outcome::Neutral);
    }
}

fn connect_error_text(e: &hyper_util::client::legacy::Error) -> String {
    let mut s = String::from(if e.is_connect() { "connection failed" } else { "connection error" });
    let mut src = std::error::Error::source(e);
    let mut depth = 0;
    while let Some(inner) = src {
        if depth == 0 || inner.source().is_none() {
            s.push_str(": ");
            s.push_str(&inner.to_string());
        }
        src = inner.source();
        depth += 1;
    }
    s
}

fn account_tokens(pair: &Pair, input_price: f64, output_price: f64, u: Usage) {
    pair.metrics.prompt_tokens.inc_by(u.prompt_tokens);
    pair.metrics.completion_tokens.inc_by(u.completion_tokens);
    let cost = u.cost_usd(input_price, output_price);
    if cost > 0.0 {
        pair.metrics.cost_request.inc_by(cost);
    }
}

/// What a relayed stream reports when it ends, however it ends (exactly once).
struct Accounting {
    gw: Arc<Gateway>,
    rt: Arc<Runtime>,
    pair: Arc<Pair>,
    endpoint: Arc<Endpoint>,
    admitted_ms: u64,
    started: Instant,
    ttfb_ms: f64,
    input_price: f64,
    output_price: f64,
    usage: Option<Usage>,
    done: bool,
    /// The request's log entry and arrival time, written when the stream ends.
    log: Option<(Entry, Instant)>,
    _in_flight: InFlight,
}

impl Accounting {
    fn finish(&mut self, outcome: Outcome, label: &'static str) {
        if std::mem::replace(&mut self.done, true) {
            return;
        }
        let m = &self.pair.metrics;
        m.request(&self.gw.metrics, label);
        m.request_duration.observe(self.started.elapsed().as_secs_f64());
        if let Some(u) = self.usage {
            account_tokens(&self.pair, self.input_price, self.output_price, u);
        }
        let usable = self.endpoint.keys.has_usable();
        self.pair.record(&self.rt, outcome, self.admitted_ms, Source::Live, usable, self.gw.now_ms());
        if let Some((mut entry, arrived)) = self.log.take() {
            entry.duration_ms = ms_since(arrived);
            if let Some(u) = self.usage {
                log_usage(&mut entry, u, self.input_price, self.output_price);
            }
            match label {
                "200" => {}
                "499" => {
                    entry.status = 499;
                    entry.error = Some(Cow::Borrowed("client_closed"));
                }
                "timeout" => entry.error = Some(Cow::Borrowed("stream_timeout")),
                _ => entry.error = Some(Cow::Borrowed("stream_broken")),
            }
            self.gw.log.record(entry);
        }
    }
}

impl Drop for Accounting {
    fn drop(&mut self) {
        // The client went away mid-stream: no verdict on the endpoint.
        self.finish(Outcome::Neutral, "499");
    }
}

/// An upstream SSE stream relayed frame by frame; a failure after the first byte ends it with an SSE error
/// event and a clean close; an idle gap longer than the first-byte timeout or the total timeout ends it too.
pub struct Relay {
    first: Option<Bytes>,
    upstream: Incoming,
    idle: Duration,
    end_by: Instant,
    /// When the last chunk arrived: the idle deadline is `last_data + idle` (capped by `end_by`).
    last_data: Instant,
    timer: Pin<Box<Sleep>>,
    acct: Accounting,
    finished: bool,
}

impl Relay {
    fn fail(&mut self, message: &str, label: &'static str) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        self.finished = true;
        self.acct.finish(Outcome::Failure(self.acct.ttfb_ms), label);
        let e = ApiError::bad_upstream(format!(
            "The upstream stream from endpoint `{}` broke: {message}",
            self.acct.pair.endpoint
        ));
        Poll::Ready(Some(Ok(Frame::data(openai::sse_error_event(&e)))))
    }

    fn poll_next(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        if self.finished {
            return Poll::Ready(None);
        }
        if let Some(first) = self.first.take() {
            return Poll::Ready(Some(Ok(Frame::data(first))));
        }
        loop {
            match Pin::new(&mut self.upstream).poll_frame(cx) {
                Poll::Ready(Some(Ok(frame))) => {
                    let Ok(data) = frame.into_data() else { continue };
                    if let Some(u) = openai::stream_usage(&data) {
                        self.acct.usage = Some(u);
                    }
                    // The idle timer is pushed back lazily, when it fires (see below): not once per chunk.
                    self.last_data = Instant::now();
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                Poll::Ready(Some(Err(_))) => return self.fail("connection lost mid-stream", "error"),
                Poll::Ready(None) => {
                    self.finished = true;
                    let ttfb = self.acct.ttfb_ms;
                    self.acct.finish(Outcome::Success(ttfb), "200");
                    return Poll::Ready(None);
                }
                Poll::Pending => {
                    while self.timer.as_mut().poll(cx).is_ready() {
                        let due = (self.last_data + self.idle).min(self.end_by);
                        if Instant::now() >= due {
                            return self.fail("no data within the timeout", "timeout");
                        }
                        self.timer.as_mut().reset(due);
                    }
                    return Poll::Pending;
                }
            }
        }
    }
}

use std::future::Future;
