//! The request pipeline for `/v1/chat/completions` and `/v1/embeddings`, in named phases, with one context
//! per request flowing through them:
//!
//! ```text
//!  admit ──► route ──► forward ──► relay ──► finish
//!  body,      chain of   candidates,   JSON or SSE     metrics, cost,
//!  validity   models     attempts,     to the client   request-log row
//!  (keys,     (rules,    failover,     (usage)         (exactly once,
//!   limits)   budgets)   hedging,                       however it ends)
//!                        queue
//! ```
//!
//! Each phase is a module: [`admit`], [`route`], [`forward`] (with [`attempt`]), [`relay`], [`finish`]. A policy
//! that decides who may ask, which model answers or what is charged plugs into its phase without touching the
//! others. *Finish* runs exactly once: [`Finish`] travels with the request (into the stream relay when there is
//! one) and ends it when the answer ends or, on drop, when the client went away.
//!
//! Decisions come from the policy crate; outcomes go to `state::Pair`. No lock is held across an `.await`; the
//! request body is forwarded as received (only the `model` value may be replaced).

pub mod admit;
mod attempt;
mod body;
pub mod finish;
mod forward;
mod relay;
pub mod route;

use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use bytes::Bytes;
use http::header::{self, HeaderName, HeaderValue};
use http::{Request, Response};
use http_body::Body as HttpBody;
use tokio::time::Instant;

pub use body::{error_response, Body};
pub use finish::{Finish, ACCESS_TARGET};
pub use relay::Relay;

use std::borrow::Cow;

use crate::clock::{unix_ms, unix_s};
use crate::gateway::Gateway;
use crate::protocol::{openai, Api, ApiError, RequestInfo};
use crate::state::{Model, Runtime};
use attempt::Answer;
use finish::{Ending, Served};
use forward::Forwarded;

/// Response header: the endpoint that served.
pub const H_ENDPOINT: HeaderName = HeaderName::from_static("x-sheepdog-endpoint");
/// Response header: the public model that served.
pub const H_MODEL: HeaderName = HeaderName::from_static("x-sheepdog-model");
/// Response header: upstream attempts made.
pub const H_ATTEMPTS: HeaderName = HeaderName::from_static("x-sheepdog-attempts");
/// Response header on a static fallback answer.
pub const H_STATIC: HeaderName = HeaderName::from_static("x-sheepdog-static-fallback");
/// Response header: the request's id (the request log's).
pub const H_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
/// Response header: why another model than the requested one served (`fallback`).
pub const H_ROUTE_REASON: HeaderName = HeaderName::from_static("x-sheepdog-route-reason");

/// What the phases after *admit* share about a request.
pub(crate) struct Ctx<'a> {
    gw: &'a Arc<Gateway>,
    rt: &'a Arc<Runtime>,
    api: Api,
    body: &'a Bytes,
    info: &'a RequestInfo,
    deadline: Instant,
    /// Whether this request already made a key suspect (one request never makes two).
    suspected: AtomicBool,
}

/// Handle one `/v1/chat/completions` or `/v1/embeddings` request through every phase. The request body is a
/// socket's (`hyper::body::Incoming`) in the server, a buffer in pipeline tests.
pub async fn handle<B>(gw: &Arc<Gateway>, api: Api, req: Request<B>) -> Response<Body>
where
    B: HttpBody<Data = Bytes>,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let mut fin = Finish::begin(gw, api);
    let id = HeaderValue::from_bytes(&fin.request_id().text()).ok();
    let mut reply = serve(gw, api, req, &mut fin).await.unwrap_or_else(|e| {
        fin.error(&e);
        Reply::Whole(error_response(&e))
    });
    let headers = match &mut reply {
        Reply::Whole(r) => r.headers_mut(),
        Reply::Stream(parts, _) => &mut parts.headers,
    };
    if let Some(id) = id {
        headers.insert(H_REQUEST_ID, id);
    }
    if let Some(client) = fin.client() {
        admit::ratelimit_headers(client, gw.now_ms(), headers);
    }
    match reply {
        Reply::Stream(parts, start) => Response::from_parts(parts, Body::Relay(Box::new(Relay::new(*start, fin)))),
        Reply::Whole(resp) => {
            fin.end(resp.status().as_u16(), Ending::Complete);
            resp
        }
    }
}

/// A response before *relay*: whole, or the head of a stream and where it starts.
enum Reply {
    Whole(Response<Body>),
    Stream(http::response::Parts, Box<attempt::StreamStart>),
}

/// *Admit*, *route* and *forward*; the caller relays and finishes.
async fn serve<B>(gw: &Arc<Gateway>, api: Api, req: Request<B>, fin: &mut Finish) -> Result<Reply, ApiError>
where
    B: HttpBody<Data = Bytes>,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let rt = gw.runtime();
    let server = &rt.config.server;
    let (head, body) = req.into_parts();
    // admit: room for one more, who asks (before the body is read), what, and whether the client's limits
    // allow it
    admit::overload(gw.metrics.in_flight.get(), server.max_concurrent_requests)?;
    let client = admit::authenticate(&rt, &head.headers)?;
    if let Some(c) = &client {
        fin.from_client(c);
    }
    let read = admit::read_body(&head.headers, body, server.max_body_bytes);
    let body = tokio::time::timeout_at(fin.arrived() + server.client_timeout, read)
        .await
        .map_err(|_| admit::request_timeout(server.client_timeout))??;
    let info = admit::inspect(api, &body)?;
    fin.requested(&info.model, info.stream);
    if let Some(c) = &client {
        admit::allow(c, &info.model)?;
    }
    // route: the alias's rule, then the client's limits, then budgets
    let (model, rule) = route::resolve(&rt, api, &info, &body, &head.headers)?;
    fin.model(&model);
    let tokens = admit::estimate(api, &info, body.len());
    if let Some(c) = &client {
        fin.granted(admit::limit(c, tokens.total(), gw.now_ms())?);
    }
    let client_name = client.as_ref().map(|c| &*c.name);
    // The wall clock is read only when there are budgets to date spend by.
    let now = if rt.budgets.is_empty() { 0 } else { unix_ms() };
    let route::Budgeted { model, reason, held } = route::budgets(&rt, model, client_name, &tokens, now)?;
    fin.reserved(held);
    let reason = reason.map(|b| Cow::Owned(b.to_string())).or(rule);
    fin.routed(&model, reason);
    let chain = route::chain(&rt, &model);
    // forward
    let mut deadline = fin.arrived() + rt.config.retry.deadline;
    if info.stream {
        deadline = deadline.min(fin.arrived() + server.max_stream_duration);
    }
    let ctx = Ctx { gw, rt: &rt, api, body: &body, info: &info, deadline, suspected: AtomicBool::new(false) };
    let (answer, served_model, member, attempts) = match forward::forward(&ctx, &chain, fin).await? {
        Forwarded::Answer { answer, model, member, attempts } => (answer, model, member, attempts),
        Forwarded::Static { attempts } => {
            fin.static_fallback(&model.cfg.name);
            return Ok(Reply::Whole(static_fallback(&info, &model, attempts)));
        }
    };
    let m = &served_model.members[member];
    let route_reason = fin.route_reason_after(&served_model);
    let headers = |h: &mut http::HeaderMap| {
        h.insert(H_ENDPOINT, m.endpoint.name_header.clone());
        h.insert(H_MODEL, served_model.name_header.clone());
        h.insert(H_ATTEMPTS, attempt::header_number(attempts.into()));
        if let Some(v) = route_reason.as_deref().and_then(|r| HeaderValue::from_str(r).ok()) {
            h.insert(H_ROUTE_REASON, v);
        }
    };
    let served = |usage| Served {
        rt: rt.clone(),
        model: served_model.clone(),
        endpoint: m.endpoint.clone(),
        pair: m.pair.clone(),
        attempts,
        usage,
    };
    // relay
    match answer {
        Answer::Whole { mut parts, body: answer, usage } => {
            headers(&mut parts.headers);
            fin.served(served(usage));
            if usage.is_none() && api == Api::Chat && parts.status.is_success() {
                fin.estimated_answer_usage(&body, &answer);
            }
            Ok(Reply::Whole(Response::from_parts(parts, Body::full(answer))))
        }
        Answer::Stream { mut parts, open, start } => {
            headers(&mut parts.headers);
            fin.served(served(None));
            fin.stream(open);
            fin.stream_body(body.clone());
            Ok(Reply::Stream(parts, start))
        }
    }
}

/// The static answer of a model that has one, when nothing could serve.
fn static_fallback(info: &RequestInfo, model: &Model, attempts: u32) -> Response<Body> {
    let (name, text) = (&model.cfg.name, model.cfg.static_fallback.as_deref().unwrap_or_default());
    let (body, ct) = if info.stream {
        (openai::static_stream(name, text, unix_s()), "text/event-stream")
    } else {
        (openai::static_answer(name, text, unix_s()), "application/json")
    };
    let mut r = Response::new(Body::full(body));
    let h = r.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(ct));
    h.insert(H_STATIC, HeaderValue::from_static("true"));
    h.insert(H_ENDPOINT, HeaderValue::from_static("static"));
    h.insert(H_MODEL, model.name_header.clone());
    h.insert(H_ATTEMPTS, attempt::header_number(attempts.into()));
    r
}
