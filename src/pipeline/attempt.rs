//! One upstream attempt, part of the *forward* phase: build the upstream request (the client's bytes with only
//! the `model` value replaced), send it with the endpoint's next key, wait for the first byte within the
//! endpoint's timeouts, and check the answer before it counts as one — then hand back an answer, the
//! upstream's refusal of the request, or why the attempt failed.
//!
//! Where each upstream answer counts is the table in ARCHITECTURE.md ("What an upstream answer means"): a
//! request-specific refusal (a 4xx but 401, 408 and 429, or an error object of that kind) goes back to the
//! client and counts against neither key nor endpoint; a 401 makes the key suspect (the prober confirms before
//! setting it aside) and tries the next key once; a 2xx that is not an answer fails over like a 5xx.
//!
//! The attempt reports its verdict to the pair's breaker at once (failover decisions depend on it) through an
//! [`AttemptGuard`] that reports exactly once; its metrics travel back in [`AttemptNote`]s for *finish*.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http::header::{self, HeaderMap, HeaderValue};
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Limited};
use sheepdog_policy::pricing::Tokens;
use sheepdog_policy::retry::{self, Verdict};
use smallvec::SmallVec;
use tokio::time::Instant;

use super::finish::{AttemptNote, OpenStream};
use super::Ctx;
use crate::clock::{ms_since, unix_s};
use crate::metrics::status_label;
use crate::protocol::openai::{self, BadAnswer, ErrorClass, FirstEvent, SseScanner, UpstreamError};
use crate::protocol::Api;
use crate::state::{Endpoint, Member, Model, Outcome, Pair, Source};
use crate::upstream::UpstreamBody;

/// Largest upstream answer accepted for a non-streaming request.
const MAX_ANSWER_BYTES: usize = 64 << 20;

/// How often one attempt sends again after meeting a pooled connection the upstream had closed (each time the
/// pool hands out another connection, or opens a fresh one).
const MAX_STALE_RETRIES: u32 = 2;

/// Largest upstream refusal (or JSON body in place of a stream) read to pass its message on.
const MAX_ERROR_BYTES: usize = 1 << 20;

/// Why one attempt failed.
#[derive(Debug)]
pub(super) struct AttemptError {
    pub endpoint: String,
    pub model: String,
    pub what: String,
    pub kind: FailKind,
    pub retry_after_ms: Option<u64>,
}

/// What kind of failure, for the error the client gets when every attempt failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum FailKind {
    Timeout,
    RateLimited,
    Garbage,
    Other,
}

/// An upstream answer.
pub(super) enum Answer {
    /// A whole answer read into memory: a success, or the upstream's refusal of the request.
    Whole { parts: http::response::Parts, body: Bytes, usage: Option<Tokens> },
    /// A stream whose first chunk arrived; the relay sends the rest.
    Stream { parts: http::response::Parts, open: OpenStream, start: Box<StreamStart> },
}

/// A stream at its first chunk, for the relay.
pub(super) struct StreamStart {
    /// What was read before the first chunk was known to be one, the first chunk included.
    pub first: Bytes,
    pub upstream: UpstreamBody,
    pub scanner: SseScanner,
    /// The longest gap between two chunks.
    pub idle: Duration,
    /// When the whole stream must have ended.
    pub end_by: Instant,
}

/// The metrics notes of one attempt: one per upstream answer or failure (a key refused with 401 and the
/// retry with the next key are two), none for a stream's answer (its *finish* accounts for it).
pub(super) type Notes = SmallVec<[AttemptNote; 2]>;

/// The result of one attempt, with its metrics notes.
pub(super) enum AttemptResult {
    Answered(Answer, Notes),
    Failed(AttemptError, Notes),
}

/// Reports an attempt's outcome to its pair exactly once; an attempt dropped before its verdict (the loser of a
/// hedge, a client that went away) releases its breaker trial instead of holding it.
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
            self.pair.record(&self.ctx.rt.policy, o, self.admitted_ms, Source::Live, self.ep.keys.has_usable(), now);
        }
    }

    /// The stream's *finish* reports from here on.
    fn hand_over(&self) {
        self.done.store(true, Ordering::Relaxed);
    }
}

impl Drop for AttemptGuard<'_> {
    fn drop(&mut self) {
        self.record(Outcome::Neutral);
    }
}

/// One attempt in progress: what every way of ending it needs.
struct Run<'a> {
    ctx: &'a Ctx<'a>,
    model: &'a Model,
    member: &'a Member,
    guard: AttemptGuard<'a>,
    notes: Notes,
    started: Instant,
    /// The key of the last request sent.
    key: Option<usize>,
}

impl Run<'_> {
    fn note(&self, label: &'static str) -> AttemptNote {
        AttemptNote { pair: self.member.pair.clone(), label, duration_s: None, ttft_s: None }
    }

    fn error(&self, what: String, kind: FailKind, retry_after_ms: Option<u64>) -> AttemptError {
        AttemptError {
            endpoint: self.member.endpoint.cfg.name.clone(),
            model: self.model.cfg.name.clone(),
            what,
            kind,
            retry_after_ms,
        }
    }

    /// The endpoint failed: tell the breaker, note the status label, describe it.
    fn failed(
        mut self,
        label: &'static str,
        what: String,
        kind: FailKind,
        retry_after_ms: Option<u64>,
    ) -> AttemptResult {
        self.guard.record(Outcome::Failure(ms_since(self.started)));
        let n = self.note(label);
        self.notes.push(n);
        let e = self.error(what, kind, retry_after_ms);
        AttemptResult::Failed(e, self.notes)
    }

    /// The attempt ended without a verdict on the endpoint (its key was refused).
    fn neutral(self, what: String) -> AttemptResult {
        self.guard.record(Outcome::Neutral);
        let e = self.error(what, FailKind::Other, None);
        AttemptResult::Failed(e, self.notes)
    }

    /// The upstream refused the request itself: its message goes back to the client, nothing is retried and
    /// neither the key nor the endpoint is blamed.
    fn refused(mut self, status: StatusCode, label: &'static str, body: Bytes) -> AttemptResult {
        self.guard.record(Outcome::Neutral);
        let n = self.note(label);
        self.notes.push(n);
        let mut parts = http::Response::new(()).into_parts().0;
        parts.status = status;
        parts.headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
        AttemptResult::Answered(Answer::Whole { parts, body, usage: None }, self.notes)
    }

    /// An error object in place of an answer, with the HTTP `status` it came with.
    fn error_object(self, e: UpstreamError, status: StatusCode) -> AttemptResult {
        let message = scrub(&e.message, self.member);
        match e.class {
            ErrorClass::Request => {
                let body = openai::refusal_body(&message, e.kind.as_deref(), e.code.as_deref());
                let status = if status.is_success() { StatusCode::BAD_REQUEST } else { status };
                self.refused(status, status_label(status.as_u16()), body)
            }
            ErrorClass::Auth => {
                self.suspect_key();
                self.neutral(format!("HTTP {} with an authentication error: {message}", status.as_u16()))
            }
            ErrorClass::RateLimited => {
                let what = format!("HTTP {} with a rate-limit error: {message}", status.as_u16());
                self.failed("error", what, FailKind::RateLimited, None)
            }
            ErrorClass::Server => {
                let what = format!("HTTP {} with an error: {message}", status.as_u16());
                self.failed("error", what, FailKind::Other, None)
            }
        }
    }

    /// A key the endpoint refused: suspect (the prober confirms before setting it aside), at most one per
    /// client request.
    fn suspect_key(&self) {
        let Some(idx) = self.key else { return };
        if !self.ctx.suspected.swap(true, Ordering::Relaxed) && self.member.endpoint.keys.suspect(idx) {
            tracing::warn!(endpoint = %self.member.endpoint.cfg.name, key_index = idx, "upstream refused an API key; a probe will confirm before it is set aside");
        }
    }
}

/// One attempt on one member, admitted by its breaker at `admitted_ms`.
pub(super) async fn attempt(ctx: &Ctx<'_>, model: &Model, member: &Member, admitted_ms: u64) -> AttemptResult {
    let ep = &member.endpoint;
    let pair = &member.pair;
    let guard = AttemptGuard { ctx, pair, ep, admitted_ms, done: AtomicBool::new(false) };
    // Counted until the answer is read (a stream: until it ends), however the attempt ends.
    let in_flight = pair.start_request(ctx.gw.now_ms());
    let body = openai::upstream_body(ctx.body, ctx.info, &member.upstream_model);
    let mut run = Run { ctx, model, member, guard, notes: Notes::new(), started: Instant::now(), key: None };
    let started = run.started;
    let first_byte_by = (started + ep.cfg.first_byte_timeout).min(ctx.deadline);
    let end_by = (started + ep.cfg.timeout).min(ctx.deadline);
    let uri = match ctx.api {
        Api::Chat => &ep.chat_uri,
        Api::Embeddings => &ep.embeddings_uri,
    };
    // A 401 makes the key suspect; the same endpoint is tried once more with the next key.
    let mut refused_key = None;
    // A pooled connection the upstream closed just before reuse: sent again, not counted against anyone.
    let mut stale_retries = 0;
    let resp = loop {
        let key = match ep.keys.next() {
            Ok(k) => k,
            Err(()) => return run.neutral("no usable API key (all set aside after 401s)".into()),
        };
        let idx = key.map(|(i, _)| i);
        if refused_key.is_some() && idx == refused_key {
            return run.neutral("HTTP 401: the endpoint refused its API key".into());
        }
        run.key = idx;
        let req = upstream_request(uri.clone(), ep.base.host(), ctx.info.stream, key.map(|(_, h)| h), body.clone());
        let resp = match tokio::time::timeout_at(first_byte_by, ep.transport.send(req)).await {
            Err(_) => {
                let what = format!("timeout: no answer within {} ms", (first_byte_by - started).as_millis());
                return run.failed("timeout", what, FailKind::Timeout, None);
            }
            Ok(Err(e)) if e.stale && stale_retries < MAX_STALE_RETRIES => {
                stale_retries += 1;
                tracing::debug!(endpoint = %ep.cfg.name, what = %e.what, "a pooled connection was closed by the upstream; sending again");
                continue;
            }
            Ok(Err(e)) => return run.failed("error", e.what, FailKind::Other, None),
            Ok(Ok(r)) => r,
        };
        pair.answered();
        if retry::classify_status(resp.status().as_u16()) != Verdict::AuthError {
            break resp;
        }
        let n = run.note("401");
        run.notes.push(n);
        match idx {
            None => return run.failed("401", "HTTP 401: the endpoint wants an API key".into(), FailKind::Other, None),
            Some(i) => {
                run.suspect_key();
                if refused_key.is_some() || ep.keys.len() < 2 {
                    return run.neutral("HTTP 401: the endpoint refused its API key".into());
                }
                refused_key = Some(i);
            }
        }
    };
    let status = resp.status();
    let label = status_label(status.as_u16());
    match retry::classify_status(status.as_u16()) {
        Verdict::Success => {}
        Verdict::ClientError => {
            let body = read_limited(resp.into_body(), end_by, MAX_ERROR_BYTES).await.unwrap_or_default();
            return match UpstreamError::from_body(&body) {
                // An error object of another kind (a 404 saying "rate limited") is still this request's.
                Some(e) => {
                    let message = scrub(&e.message, member);
                    run.refused(status, label, openai::refusal_body(&message, e.kind.as_deref(), e.code.as_deref()))
                }
                None => {
                    let message =
                        format!("The upstream `{}` refused the request (HTTP {})", ep.cfg.name, status.as_u16());
                    run.refused(status, label, openai::refusal_body(&message, None, Some("upstream_refused")))
                }
            };
        }
        Verdict::RateLimited | Verdict::Retriable | Verdict::AuthError => {
            let retry_after = resp
                .headers()
                .get(header::RETRY_AFTER)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| retry::parse_retry_after(v, unix_s()));
            let kind = if status == StatusCode::TOO_MANY_REQUESTS { FailKind::RateLimited } else { FailKind::Other };
            return run.failed(label, format!("HTTP {}", status.as_u16()), kind, retry_after);
        }
    }
    let (mut parts, mut upstream) = resp.into_parts();
    strip_headers(&mut parts.headers);
    if ctx.info.stream {
        let content_type = parts.headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or("");
        if !content_type.trim_start().to_ascii_lowercase().starts_with("text/event-stream") {
            let what = format!("HTTP {} with `{content_type}` instead of an event stream", status.as_u16());
            let body = read_limited(upstream, first_byte_by, MAX_ERROR_BYTES).await.unwrap_or_default();
            return match UpstreamError::from_body(&body) {
                Some(e) => run.error_object(e, status),
                None => run.failed("error", what, FailKind::Garbage, None),
            };
        }
        // Hold the answer until its first event is known to be a chunk, so a stream that is not one, or dies
        // before it, fails over transparently.
        let mut scanner = if openai::usage_forced(ctx.info) { SseScanner::hiding_usage() } else { SseScanner::new() };
        let mut first = BytesMut::new();
        let verdict = loop {
            if let Some(v) = scanner.first_event() {
                break v.clone();
            }
            match tokio::time::timeout_at(first_byte_by, upstream.frame()).await {
                Err(_) => {
                    let what = "timeout: the stream sent no chunk in time".into();
                    return run.failed("timeout", what, FailKind::Timeout, None);
                }
                Ok(None) => {
                    first.extend_from_slice(&scanner.finish());
                    match scanner.first_event() {
                        Some(v) => break v.clone(),
                        None => {
                            let what = "the stream ended before its first chunk".into();
                            return run.failed("error", what, FailKind::Garbage, None);
                        }
                    }
                }
                Ok(Some(Err(_))) => {
                    let what = "the stream broke before its first chunk".into();
                    return run.failed("error", what, FailKind::Other, None);
                }
                Ok(Some(Ok(f))) => {
                    if let Ok(d) = f.into_data() {
                        first.extend_from_slice(&scanner.feed(d).out);
                    }
                }
            }
        };
        match verdict {
            FirstEvent::Chunk => {}
            FirstEvent::Error(e) => return run.error_object(e, status),
            FirstEvent::Garbage(what) => {
                return run.failed("error", format!("HTTP {} with {what}", status.as_u16()), FailKind::Garbage, None)
            }
        }
        run.guard.hand_over();
        let open = OpenStream { admitted_ms, started, ttfb_ms: ms_since(started), in_flight };
        let idle = ep.cfg.first_byte_timeout;
        let start = Box::new(StreamStart { first: first.freeze(), upstream, scanner, idle, end_by });
        return AttemptResult::Answered(Answer::Stream { parts, open, start }, run.notes);
    }
    let collected = match tokio::time::timeout_at(end_by, Limited::new(upstream, MAX_ANSWER_BYTES).collect()).await {
        Err(_) => return run.failed("timeout", "timeout while reading the answer".into(), FailKind::Timeout, None),
        Ok(Err(_)) => {
            return run.failed("error", "connection broke while reading the answer".into(), FailKind::Other, None)
        }
        Ok(Ok(c)) => c.to_bytes(),
    };
    let elapsed = started.elapsed().as_secs_f64();
    match openai::check_answer(ctx.api, &collected) {
        Err(BadAnswer::Error(e)) => run.error_object(e, status),
        Err(BadAnswer::Garbage(what)) => {
            run.failed("error", format!("HTTP {} with {what}", status.as_u16()), FailKind::Garbage, None)
        }
        Ok(usage) => {
            run.guard.record(Outcome::Success(elapsed * 1000.0));
            drop(in_flight);
            let n = AttemptNote { duration_s: Some(elapsed), ttft_s: Some(elapsed), ..run.note(label) };
            run.notes.push(n);
            AttemptResult::Answered(Answer::Whole { parts, body: collected, usage }, run.notes)
        }
    }
}

/// Up to `limit` bytes of a body, read by `until`; `None` when it broke or took too long.
async fn read_limited(body: UpstreamBody, until: Instant, limit: usize) -> Option<Bytes> {
    match tokio::time::timeout_at(until, Limited::new(body, limit).collect()).await {
        Ok(Ok(c)) => Some(c.to_bytes()),
        _ => None,
    }
}

/// The upstream request: every header value was built once (Host too, so the client does not format it).
fn upstream_request(
    uri: http::Uri,
    host: &HeaderValue,
    stream: bool,
    key: Option<&HeaderValue>,
    body: Bytes,
) -> Request<Bytes> {
    let length = header_number(body.len() as u64);
    let mut req = Request::new(body);
    *req.method_mut() = http::Method::POST;
    *req.uri_mut() = uri;
    let h = req.headers_mut();
    h.reserve(5);
    h.insert(header::HOST, host.clone());
    // Set here, hyper would format it into a `HeaderValue` of its own through a `fmt::Write`.
    h.insert(header::CONTENT_LENGTH, length);
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    h.insert(header::ACCEPT, HeaderValue::from_static(if stream { "text/event-stream" } else { "application/json" }));
    if let Some(k) = key {
        h.insert(header::AUTHORIZATION, k.clone());
    }
    req
}

/// Remove from an upstream answer the headers that describe its connection and framing, the upstream itself
/// (`server`; `date`, which the gateway's answer gets anew) and upstream cookies. (With fewer of them, the map
/// hyper parsed the answer's head into has room for the gateway's own headers without growing.)
fn strip_headers(h: &mut HeaderMap) {
    // Upstream answers carry a handful of headers, so scanning them again after each removal is cheap.
    while let Some(name) = h.keys().find(|k| is_hop_by_hop(k.as_str())).cloned() {
        h.remove(&name);
    }
}

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
            | "server"
            | "date"
    )
}

/// A number as a header value.
pub(super) fn header_number(n: u64) -> HeaderValue {
    const SMALL: [&str; 10] = ["0", "1", "2", "3", "4", "5", "6", "7", "8", "9"];
    match SMALL.get(n as usize) {
        // Attempts, mostly: no allocation.
        Some(s) => HeaderValue::from_static(s),
        None => HeaderValue::from_bytes(itoa::Buffer::new().format(n).as_bytes())
            .unwrap_or_else(|_| unreachable!("digits are a valid header value")),
    }
}

/// Remove any of the endpoint's keys from text that came from upstream (an error message may echo them).
fn scrub(text: &str, member: &Member) -> String {
    let mut s = text.to_string();
    for k in member.endpoint.cfg.api_keys.iter() {
        if !k.expose().is_empty() && s.contains(k.expose()) {
            s = s.replace(k.expose(), "***");
        }
    }
    s
}
