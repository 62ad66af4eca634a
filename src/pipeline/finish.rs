//! The *finish* phase: runs exactly once per request, however it ends — answered, every upstream failed,
//! deadline, the client gone before the answer or mid-stream, graceful shutdown — and is the only place that
//! writes the request's metrics, its cost and its request-log row.
//!
//! [`Finish`] is created when a request arrives and travels with it: the handler owns it, then the stream
//! relay does. Whoever holds it calls [`Finish::end`]; if it is dropped instead (hyper drops the handler future
//! or the body when the client leaves, or when a drain times out), `Drop` ends it as `ClientGone`, so no
//! request escapes the log. It never waits: the log row is queued, metrics are atomics.
//!
//! It also writes the request's one access-log line (`tracing` target `sheepdog::access`, at info) and its
//! OpenTelemetry GenAI metrics; state changes are logged where they happen (`state::Pair`, the prober), never
//! per request.

use std::borrow::Cow;
use std::sync::Arc;

use sheepdog_policy::pricing::{self, Nanos, Tokens};
use smallvec::SmallVec;
use tokio::time::Instant;

use super::admit::Grant;
use super::route::{Reason as RouteReason, Reservations};
use crate::clock::{ms_since, unix_ms};
use crate::gateway::Gateway;
use crate::log::{Entry, RequestId};
use crate::metrics::{status_label, ModelMetrics, Operation, Reason, ANONYMOUS};
use crate::protocol::{Api, ApiError};
use crate::state::{Budget, Client, Endpoint, InFlight, Model, Outcome, Pair, Runtime, Source};

/// The `tracing` target of the one access-log line per request (written fast by `cli::log_format`).
pub const ACCESS_TARGET: &str = "sheepdog::access";

/// The route reason of an answer served by a fallback model.
pub const FALLBACK: &str = "fallback";

/// What one upstream attempt contributes to the metrics: its pair and status label (`"200"`, `"503"`,
/// `"timeout"`, `"error"` …), and for an answered one its duration.
pub struct AttemptNote {
    /// The pair the attempt went to.
    pub pair: Arc<Pair>,
    /// Its `status` label in `sheepdog_requests_total`.
    pub label: &'static str,
    /// Seconds from sending to the whole answer, for answers read in full.
    pub duration_s: Option<f64>,
    /// Seconds from sending to the first byte of the answer, for answers.
    pub ttft_s: Option<f64>,
}

/// The attempt that served the request.
pub struct Served {
    /// Its snapshot (for the breaker's parameters).
    pub rt: Arc<Runtime>,
    /// The model that served (a fallback differs from the requested one).
    pub model: Arc<Model>,
    /// The endpoint that served.
    pub endpoint: Arc<Endpoint>,
    /// Its pair.
    pub pair: Arc<Pair>,
    /// Upstream attempts made, this one included.
    pub attempts: u32,
    /// Token usage, once known.
    pub usage: Option<Tokens>,
}

/// A stream that is still being relayed: its verdict on the pair is given when it ends.
pub struct OpenStream {
    /// When the pair's breaker admitted the attempt.
    pub admitted_ms: u64,
    /// When the attempt was sent.
    pub started: Instant,
    /// Time to its first chunk, ms.
    pub ttfb_ms: f64,
    /// Counts the stream as in flight on the pair until it ends.
    pub in_flight: InFlight,
}

/// How a request ended, as far as its answer goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ending {
    /// The whole answer (a JSON body, or a stream to its end) was handed to the client.
    Complete,
    /// A stream broke after its first byte reached the client; `label`: `error` or `timeout`.
    StreamBroken(&'static str),
    /// The client went away before the end of the answer (or the server stopped waiting for it).
    ClientGone,
}

/// A request's accounting, ended exactly once.
pub struct Finish {
    gw: Arc<Gateway>,
    arrived: Instant,
    entry: Entry,
    /// Request-level metrics of the requested model, once it is known to be configured.
    model: Option<Arc<Model>>,
    notes: SmallVec<[AttemptNote; 4]>,
    served: Option<Served>,
    stream: Option<OpenStream>,
    /// A hedged second attempt was started.
    hedged: bool,
    /// The client that asks (none: anonymous).
    client: Option<Arc<Client>>,
    /// Its admission: tokens to settle, its place among its parallel requests.
    grant: Option<Grant>,
    /// Budget reservations to settle.
    reservations: Reservations,
    /// The model routing chose (the alias's target, a budget's downgrade), before fallbacks.
    routed: Option<Arc<Model>>,
    /// The request body of a stream, to count its prompt should the upstream report no usage.
    stream_body: Option<bytes::Bytes>,
    done: bool,
}

impl Finish {
    /// The accounting of a request that arrives now, with a fresh request id.
    pub fn begin(gw: &Arc<Gateway>, api: Api) -> Finish {
        gw.metrics.in_flight.inc();
        let mut entry = Entry::begin(api.name());
        entry.request_id = Some(RequestId::new());
        Finish {
            gw: gw.clone(),
            arrived: Instant::now(),
            entry,
            model: None,
            notes: SmallVec::new(),
            served: None,
            stream: None,
            hedged: false,
            client: None,
            grant: None,
            reservations: Reservations::new(),
            routed: None,
            stream_body: None,
            done: false,
        }
    }

    /// The request's id (`x-request-id`, and the request log's).
    pub fn request_id(&self) -> RequestId {
        self.entry.request_id.unwrap_or(RequestId(0))
    }

    /// When the request arrived.
    pub fn arrived(&self) -> Instant {
        self.arrived
    }

    /// The request names `model` (configured or not) and asks for a stream or not.
    pub fn requested(&mut self, model: &str, stream: bool) {
        self.entry.model.clear();
        self.entry.model.push_str(model);
        self.entry.stream = stream;
    }

    /// The requested model is configured (or the alias's rule chose it): its metrics count the request.
    pub fn model(&mut self, model: &Arc<Model>) {
        self.model = Some(model.clone());
    }

    /// The request comes from `client`.
    pub fn from_client(&mut self, client: &Arc<Client>) {
        self.entry.client = Some(client.name.clone());
        self.client = Some(client.clone());
    }

    /// The client that asks, once known.
    pub fn client(&self) -> Option<&Arc<Client>> {
        self.client.as_ref()
    }

    /// The client's limits admitted the request.
    pub fn granted(&mut self, grant: Grant) {
        self.grant = Some(grant);
    }

    /// Budgets reserved money for the request.
    pub fn reserved(&mut self, reservations: Reservations) {
        self.reservations = reservations;
    }

    /// Routing chose `model`, for `reason` when that is not the model the request named.
    pub fn routed(&mut self, model: &Arc<Model>, reason: RouteReason) {
        self.routed = Some(model.clone());
        self.entry.route_reason = reason;
    }

    /// The route reason of an answer by `served`: `fallback` when it is not the model routing chose (the last
    /// change wins), else routing's own.
    pub fn route_reason_after(&self, served: &Arc<Model>) -> RouteReason {
        match &self.routed {
            Some(r) if !Arc::ptr_eq(r, served) => Some(Cow::Borrowed(FALLBACK)),
            _ => self.entry.route_reason.clone(),
        }
    }

    /// One more upstream attempt to count.
    pub fn note(&mut self, note: AttemptNote) {
        self.notes.push(note);
    }

    /// A hedged second attempt started.
    pub fn hedged(&mut self) {
        self.hedged = true;
    }

    /// Set the number of attempts made.
    pub fn set_attempts(&mut self, n: u32) {
        self.entry.attempts = n;
    }

    /// An upstream answered: who, and what the answer used if already known.
    pub fn served(&mut self, served: Served) {
        self.entry.endpoint = Some(served.endpoint.name.clone());
        self.entry.served_model = Some(served.model.name.clone());
        self.entry.attempts = served.attempts;
        self.entry.ttft_ms = Some(ms_since(self.arrived));
        self.entry.route_reason = self.route_reason_after(&served.model);
        self.served = Some(served);
    }

    /// The answer is a stream still being relayed; `usage` comes later through [`Finish::usage`].
    pub fn stream(&mut self, stream: OpenStream) {
        self.stream = Some(stream);
    }

    /// The usage of the answer, once known.
    pub fn usage(&mut self, usage: Tokens) {
        if let Some(s) = &mut self.served {
            s.usage = Some(usage);
        }
    }

    /// The answer is a stream of this request body (kept for [`Finish::estimated_usage`]).
    pub fn stream_body(&mut self, body: bytes::Bytes) {
        self.stream_body = Some(body);
    }

    /// Whether the endpoint serving the stream has not yet shown that it reports usage: then the relay keeps
    /// the stream's text to count its tokens.
    pub fn may_need_estimate(&self) -> bool {
        self.served.as_ref().is_some_and(|s| !s.endpoint.stream_usage.load(std::sync::atomic::Ordering::Relaxed))
    }

    /// The stream reported its usage: its endpoint does.
    pub fn stream_usage(&mut self, usage: Tokens) {
        if let Some(s) = &self.served {
            s.endpoint.stream_usage.store(true, std::sync::atomic::Ordering::Relaxed);
        }
        self.usage(usage);
    }

    /// The upstream reported no usage: the gateway's own count of `completion` tokens and of the prompt, marked
    /// as estimated in the request log.
    pub fn estimated_usage(&mut self, completion: u64) {
        let prompt = self.stream_body.as_deref().map_or(0, crate::protocol::openai::content::estimate_prompt);
        self.entry.estimated = true;
        self.usage(Tokens::new(prompt, completion));
    }

    /// A whole chat answer came without usage: the gateway counts its prompt (`request`) and completion
    /// (`answer`) tokens, marked as estimated in the request log.
    pub fn estimated_answer_usage(&mut self, request: &[u8], answer: &[u8]) {
        let completion = crate::protocol::openai::content::estimate_answer_completion(answer);
        let prompt = crate::protocol::openai::content::estimate_prompt(request);
        self.entry.estimated = true;
        self.usage(Tokens::new(prompt, completion));
    }

    /// The gateway answered with a static fallback for `model` instead of an upstream.
    pub fn static_fallback(&mut self, model: &str) {
        self.entry.served_model = Some(model.into());
        self.entry.error = Some(Cow::Borrowed("static_fallback"));
    }

    /// The client gets this error.
    pub fn error(&mut self, e: &ApiError) {
        self.entry.error = Some(Cow::Borrowed(e.code));
    }

    /// The name of the endpoint that served a stream (for its error event).
    pub fn endpoint_name(&self) -> &str {
        self.served.as_ref().map_or("", |s| s.endpoint.cfg.name.as_str())
    }

    /// Time to the first chunk of the stream being relayed, ms.
    pub fn ttfb_ms(&self) -> f64 {
        self.stream.as_ref().map_or(0.0, |s| s.ttfb_ms)
    }

    /// End the request: the client got `status` and the answer ended as `ending`. Only the first call counts.
    pub fn end(&mut self, status: u16, ending: Ending) {
        if std::mem::replace(&mut self.done, true) {
            return;
        }
        let status = if ending == Ending::ClientGone { 499 } else { status };
        let request_id = self.request_id();
        let (mut spent, mut used_tokens) = (Nanos::ZERO, 0u64);
        let mut entry = std::mem::replace(&mut self.entry, Entry::empty(""));
        entry.status = status;
        entry.duration_ms = ms_since(self.arrived);
        match ending {
            Ending::Complete => {}
            Ending::ClientGone => entry.error = Some(Cow::Borrowed("client_closed")),
            Ending::StreamBroken("timeout") => entry.error = Some(Cow::Borrowed("stream_timeout")),
            Ending::StreamBroken(_) => entry.error = Some(Cow::Borrowed("stream_broken")),
        }
        for n in &self.notes {
            let m = n.pair.metrics();
            m.request(n.label);
            if let Some(d) = n.duration_s {
                m.request_duration.observe(d);
            }
            if let Some(t) = n.ttft_s {
                m.ttft.observe(t);
            }
        }
        if let Some(s) = &self.served {
            if let Some(open) = self.stream.take() {
                self.end_stream(s, open, ending);
            }
            if s.attempts > 1 + u32::from(self.hedged) {
                // Counted for the model the client asked for, whichever model served (a won hedge is not a
                // failover).
                self.model_metrics().failover();
            }
            if let Some(u) = s.usage {
                let cost = pricing::cost(&s.model.pricing, &u, s.endpoint.price_multiplier);
                spent = cost;
                used_tokens = u.total();
                let m = s.pair.metrics();
                m.prompt_tokens.inc_by(u.prompt);
                m.completion_tokens.inc_by(u.completion);
                if cost.0 > 0 {
                    m.cost_request.inc_by(cost.usd());
                }
                entry.prompt_tokens = Some(u.prompt);
                entry.completion_tokens = Some(u.completion);
                entry.cached_tokens = Some(u.cached_prompt);
                entry.reasoning_tokens = Some(u.reasoning);
                entry.cost_usd = Some(cost.usd());
                entry.cost_nanos = Some(cost.0);
            }
        }
        if let Some(g) = self.grant.take() {
            g.client.live.limits.lock().settle(g.tokens, used_tokens, self.gw.now_ms());
        }
        self.settle_budgets(spent);
        let client = self.client.as_ref().map_or(ANONYMOUS, |c| &*c.name);
        let model = self.model_metrics();
        model.client_request(client, status_label(status));
        model.forwarded(entry.attempts.saturating_sub(1 + u32::from(self.hedged)), self.hedged);
        let error = error_type(&entry);
        if self.served.is_none() {
            if let Some(r) = Reason::of_error(error, status) {
                self.gw.metrics.rejections.inc(r);
            }
        }
        let served = self.served.as_ref().map(|s| (&*s.endpoint.cfg.name, &*s.model.cfg.name, s));
        self.gw.metrics.genai.record(&Operation {
            op: entry.api,
            request_model: model.name(),
            served: served.map(|(e, m, s)| (e, m, &s.pair.metrics().genai)),
            error,
            duration_s: entry.duration_ms / 1000.0,
            tokens: served.and_then(|(_, _, s)| s.usage).map(|u| (u.prompt, u.completion)),
        });
        tracing::info!(
            target: ACCESS_TARGET,
            request_id = %request_id,
            client,
            api = entry.api,
            model = model.name(),
            served_model = served.map_or("", |(_, m, _)| m),
            endpoint = served.map_or("", |(e, _, _)| e),
            attempts = entry.attempts,
            status,
            latency_ms = round2(entry.duration_ms),
            ttft_ms = round2(entry.ttft_ms.unwrap_or(0.0)),
            prompt_tokens = entry.prompt_tokens.unwrap_or(0),
            completion_tokens = entry.completion_tokens.unwrap_or(0),
            cost_usd = entry.cost_usd.unwrap_or(0.0),
            stream = entry.stream,
            error,
            "request"
        );
        self.gw.metrics.in_flight.dec();
        self.gw.log.record(entry);
    }

    /// The verdict of a relayed stream on its pair, and its attempt's metrics.
    fn end_stream(&self, s: &Served, open: OpenStream, ending: Ending) {
        let (outcome, label) = match ending {
            Ending::Complete => (Outcome::Success(open.ttfb_ms), "200"),
            Ending::StreamBroken(label) => (Outcome::Failure(open.ttfb_ms), label),
            // The client went away mid-stream: no verdict on the endpoint.
            Ending::ClientGone => (Outcome::Neutral, "499"),
        };
        let m = s.pair.metrics();
        m.request(label);
        m.ttft.observe(open.ttfb_ms / 1000.0);
        m.request_duration.observe(open.started.elapsed().as_secs_f64());
        let usable = s.endpoint.keys.has_usable();
        s.pair.record(&s.rt.policy, outcome, open.admitted_ms, Source::Live, usable, self.gw.now_ms());
        drop(open.in_flight);
    }

    /// Settle the budgets: each reservation with the request's cost when its budget counts the model that
    /// served (else nothing), and every other budget that counts it is charged the cost.
    fn settle_budgets(&mut self, cost: Nanos) {
        let now = unix_ms();
        let client = self.client.as_ref().map(|c| &*c.name);
        let served = self.served.as_ref().map(|s| (&*s.model.cfg.name, &s.rt));
        let counts = |b: &Budget| served.is_some_and(|(m, _)| b.applies(m, client));
        for r in &self.reservations {
            let c = if counts(&r.budget) { cost } else { Nanos::ZERO };
            let (crossed, total) = r.budget.settle(r.amount, c, now);
            self.gw.announce_crossings(&r.budget, &crossed, total, false);
        }
        if cost == Nanos::ZERO {
            return;
        }
        if let Some((_, rt)) = served {
            for b in rt.budgets.iter().filter(|b| counts(b)) {
                if !self.reservations.iter().any(|r| Arc::ptr_eq(&r.budget.ledger, &b.ledger)) {
                    let (crossed, total) = b.settle(Nanos::ZERO, cost, now);
                    self.gw.announce_crossings(b, &crossed, total, false);
                }
            }
        }
    }

    fn model_metrics(&self) -> &ModelMetrics {
        self.model.as_ref().map_or(&self.gw.metrics.unknown_model, |m| &m.metrics)
    }
}

/// The `error_type` of a finished request: the error code the client got (or what broke after the answer
/// started), its status for an error without a code, empty for a success. Codes are constants of the code.
fn error_type(entry: &Entry) -> &'static str {
    match &entry.error {
        Some(Cow::Borrowed(code)) => code,
        Some(Cow::Owned(_)) => "error",
        None if entry.status >= 400 => status_label(entry.status),
        None => "",
    }
}

fn round2(ms: f64) -> f64 {
    (ms * 100.0).round() / 100.0
}

impl Drop for Finish {
    fn drop(&mut self) {
        self.end(499, Ending::ClientGone);
    }
}
