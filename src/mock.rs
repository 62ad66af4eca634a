//! `sheepdog mock`: a simulated OpenAI-compatible upstream for demos, tests and benchmarks, with switchable
//! faults (`POST /_mock/faults`) and request counts (`GET /_mock/stats`).
//!
//! Answers are deterministic (see [`answer_pieces`]) so tests can compare them. Independent of the gateway:
//! it shares no state with the rest of the crate.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use parking_lot::Mutex;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};
use serde_json::json;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};

/// CLI arguments of `sheepdog mock`.
#[derive(clap::Args, Debug, Clone)]
pub struct MockArgs {
    /// Address to listen on (port 0: a free port; the line printed on start tells which).
    #[arg(long)]
    pub listen: String,
    /// Name used in answers.
    #[arg(long, default_value = "mock")]
    pub name: String,
    /// Models served (comma-separated).
    #[arg(long, value_delimiter = ',', default_value = "gpt-4.1")]
    pub models: Vec<String>,
    /// Latency before the answer (the first chunk of a stream), ms.
    #[arg(long, default_value_t = 0)]
    pub latency_ms: u64,
    /// Uniform jitter added to or removed from the latency, ms.
    #[arg(long, default_value_t = 0)]
    pub jitter_ms: u64,
    /// Stream chunks per second (0: as fast as possible).
    #[arg(long, default_value_t = 50.0)]
    pub tokens_per_sec: f64,
    /// Fraction of requests answered with 500 in `ok` mode.
    #[arg(long, default_value_t = 0.0)]
    pub error_rate: f64,
    /// Seed of the random source (jitter, error rate).
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// When set, `/v1/*` requires `Authorization: Bearer K` with one of these keys (else 401).
    #[arg(long, value_delimiter = ',')]
    pub require_keys: Vec<String>,
}

/// Options of a mock (the CLI arguments less the address).
#[derive(Debug, Clone, Default)]
pub struct MockOptions {
    /// Name used in answers.
    pub name: String,
    /// Models served.
    pub models: Vec<String>,
    /// Latency before the answer, ms.
    pub latency_ms: u64,
    /// Jitter on the latency, ms.
    pub jitter_ms: u64,
    /// Stream chunks per second (0: no pacing).
    pub tokens_per_sec: f64,
    /// Fraction of requests answered with 500 in `ok` mode.
    pub error_rate: f64,
    /// Seed of the random source.
    pub seed: u64,
    /// Accepted bearer keys (empty: any).
    pub require_keys: Vec<String>,
}

impl From<&MockArgs> for MockOptions {
    fn from(a: &MockArgs) -> Self {
        MockOptions {
            name: a.name.clone(),
            models: a.models.clone(),
            latency_ms: a.latency_ms,
            jitter_ms: a.jitter_ms,
            tokens_per_sec: a.tokens_per_sec,
            error_rate: a.error_rate,
            seed: a.seed,
            require_keys: a.require_keys.clone(),
        }
    }
}

/// Behaviour of the mock, switched with `POST /_mock/faults`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    /// Normal answers (with `error_rate`).
    #[default]
    Ok,
    /// Every request: 500 with an OpenAI error body.
    #[serde(rename = "error_500")]
    Error500,
    /// Every request: 429 with `Retry-After`.
    #[serde(rename = "error_429")]
    Error429,
    /// Accept the request and never answer.
    Hang,
    /// Close the connection without an answer.
    Reset,
    /// Add `latency_ms` to every answer and slow streams down.
    Slow,
    /// Streams break after a few chunks; other requests behave as `reset`.
    BreakStream,
}

impl std::str::FromStr for Mode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        serde_json::from_value(serde_json::Value::String(s.to_string())).map_err(|_| format!("unknown mode {s:?}"))
    }
}

/// The body of `POST /_mock/faults`: every field optional; a field left out keeps its value.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Faults {
    /// Behaviour.
    pub mode: Option<Mode>,
    /// Extra latency in `slow` mode, ms.
    pub latency_ms: Option<u64>,
    /// Fraction of requests failing with 500 in `ok` mode.
    pub error_rate: Option<f64>,
    /// `Retry-After` seconds sent with 429.
    pub retry_after_s: Option<u64>,
}

#[derive(Debug, Clone, Serialize)]
struct FaultState {
    mode: Mode,
    latency_ms: u64,
    error_rate: f64,
    retry_after_s: u64,
}

/// What reached the mock (every path but `/_mock/*`).
#[derive(Debug, Clone, Default, Serialize)]
pub struct MockStats {
    /// Requests in all.
    pub requests: u64,
    /// By path.
    pub by_path: BTreeMap<String, u64>,
    /// By requested model.
    pub by_model: BTreeMap<String, u64>,
    /// By bearer key.
    pub by_key: BTreeMap<String, u64>,
}

struct Shared {
    opts: MockOptions,
    faults: Mutex<FaultState>,
    stats: Mutex<MockStats>,
    rng: Mutex<SmallRng>,
    stop: watch::Sender<bool>,
    addr: SocketAddr,
}

/// A running mock.
#[derive(Clone)]
pub struct MockHandle(Arc<Shared>);

impl MockHandle {
    /// Where it listens.
    pub fn local_addr(&self) -> SocketAddr {
        self.0.addr
    }
    /// Change its behaviour.
    pub fn set_faults(&self, f: Faults) {
        self.0.apply(&f);
    }
    /// What reached it so far.
    pub fn stats(&self) -> MockStats {
        self.0.stats.lock().clone()
    }
    /// Stop accepting connections.
    pub fn shutdown(&self) {
        let _ = self.0.stop.send(true);
    }
}

impl Shared {
    fn apply(&self, f: &Faults) {
        let mut s = self.faults.lock();
        if let Some(m) = f.mode {
            s.mode = m;
        }
        if let Some(l) = f.latency_ms {
            s.latency_ms = l;
        }
        if let Some(r) = f.error_rate {
            s.error_rate = r.clamp(0.0, 1.0);
        }
        if let Some(r) = f.retry_after_s {
            s.retry_after_s = r;
        }
    }
}

type MockBody = BoxBody<Bytes, std::io::Error>;

fn full(b: impl Into<Bytes>) -> MockBody {
    Full::new(b.into()).map_err(|never: Infallible| match never {}).boxed()
}

fn json_response(status: StatusCode, v: &serde_json::Value) -> Response<MockBody> {
    let mut r = Response::new(full(serde_json::to_vec(v).unwrap_or_default()));
    *r.status_mut() = status;
    r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    r
}

fn error(status: StatusCode, kind: &str, code: &str, message: &str) -> Response<MockBody> {
    json_response(status, &json!({"error": {"message": message, "type": kind, "param": null, "code": code}}))
}

/// The deterministic answer pieces (one per stream chunk) for (mock name, model, max_tokens); the non-streaming
/// answer's content is their concatenation.
pub fn answer_pieces(name: &str, model: &str, max_tokens: Option<u32>) -> Vec<String> {
    let text = format!("Hello! This is {name} serving {model}. The gateway works and this answer is simulated.");
    let mut pieces: Vec<String> = Vec::new();
    for (i, w) in text.split(' ').enumerate() {
        pieces.push(if i == 0 { w.to_string() } else { format!(" {w}") });
    }
    if let Some(m) = max_tokens {
        pieces.truncate(m.max(1) as usize);
    }
    pieces
}

/// Prompt tokens of a chat request, deterministically: a quarter of the characters, plus 3 per message.
pub fn prompt_tokens(messages: &[serde_json::Value]) -> u64 {
    let mut chars = 0usize;
    for m in messages {
        match &m["content"] {
            serde_json::Value::String(s) => chars += s.chars().count(),
            serde_json::Value::Array(parts) => {
                chars += parts.iter().filter_map(|p| p["text"].as_str()).map(|s| s.chars().count()).sum::<usize>()
            }
            _ => {}
        }
    }
    chars.div_ceil(4) as u64 + 3 * messages.len() as u64
}

/// Standard base64 (with padding).
pub fn base64(bytes: &[u8]) -> String {
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for c in bytes.chunks(3) {
        let b = [c[0], *c.get(1).unwrap_or(&0), *c.get(2).unwrap_or(&0)];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        out.push(T[(n >> 18) as usize & 63] as char);
        out.push(T[(n >> 12) as usize & 63] as char);
        out.push(if c.len() > 1 { T[(n >> 6) as usize & 63] as char } else { '=' });
        out.push(if c.len() > 2 { T[n as usize & 63] as char } else { '=' });
    }
    out
}

/// A deterministic 8-dimensional embedding of `text`.
pub fn embedding(text: &str) -> Vec<f32> {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in text.bytes() {
        h = (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
    }
    (0..8)
        .map(|i| {
            let x = h.rotate_left(i * 8) ^ u64::from(i).wrapping_mul(0x9e37_79b9_7f4a_7c15);
            ((x % 2000) as f32 / 1000.0) - 1.0
        })
        .collect()
}

fn unix_now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

/// Start a mock on a bound listener; it serves on spawned tasks until [`MockHandle::shutdown`].
pub fn spawn(listener: TcpListener, opts: MockOptions) -> std::io::Result<MockHandle> {
    let addr = listener.local_addr()?;
    let (stop, mut stopped) = watch::channel(false);
    let shared = Arc::new(Shared {
        faults: Mutex::new(FaultState {
            mode: Mode::Ok,
            latency_ms: 1000,
            error_rate: opts.error_rate,
            retry_after_s: 1,
        }),
        stats: Mutex::new(MockStats::default()),
        rng: Mutex::new(SmallRng::seed_from_u64(opts.seed)),
        opts,
        stop,
        addr,
    });
    let s = shared.clone();
    tokio::spawn(async move {
        loop {
            let (stream, _) = tokio::select! {
                a = listener.accept() => match a {
                    Ok(x) => x,
                    Err(_) => {
                        tokio::time::sleep(Duration::from_millis(20)).await;
                        continue;
                    }
                },
                _ = stopped.changed() => return,
            };
            let _ = stream.set_nodelay(true);
            let s = s.clone();
            tokio::spawn(async move {
                let svc = service_fn(move |req| {
                    let s = s.clone();
                    async move { handle(s, req).await }
                });
                let _ = hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(stream), svc).await;
            });
        }
    });
    Ok(MockHandle(shared))
}

/// `sheepdog mock`: serve until SIGINT or SIGTERM.
pub async fn run(args: MockArgs) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let listener = TcpListener::bind(&args.listen).await?;
    let h = spawn(listener, MockOptions::from(&args))?;
    // Install the handlers before announcing readiness: a SIGTERM right after the line must stop it cleanly.
    #[cfg(unix)]
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let ctrl_c = tokio::signal::ctrl_c();
    {
        use std::io::Write;
        let mut out = std::io::stdout().lock();
        writeln!(out, "sheepdog mock {} listening on {}", args.name, h.local_addr())?;
        out.flush()?;
    }
    #[cfg(unix)]
    tokio::select! {
        _ = ctrl_c => {}
        _ = term.recv() => {}
    }
    #[cfg(not(unix))]
    ctrl_c.await?;
    h.shutdown();
    Ok(())
}

/// The error a handler returns to make hyper drop the connection without an answer.
#[derive(Debug)]
struct Dropped;
impl std::fmt::Display for Dropped {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("connection dropped on purpose")
    }
}
impl std::error::Error for Dropped {}

async fn handle(s: Arc<Shared>, req: Request<Incoming>) -> Result<Response<MockBody>, Dropped> {
    let path = req.uri().path().to_string();
    if let Some(ctl) = path.strip_prefix("/_mock/") {
        return Ok(control(&s, ctl, req).await);
    }
    let key = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::to_string);
    let method = req.method().clone();
    let body = req.into_body().collect().await.map(|c| c.to_bytes()).unwrap_or_default();
    let parsed: Option<serde_json::Value> = serde_json::from_slice(&body).ok();
    let model = parsed.as_ref().and_then(|v| v["model"].as_str()).map(str::to_string);
    {
        let mut st = s.stats.lock();
        st.requests += 1;
        *st.by_path.entry(path.clone()).or_default() += 1;
        if let Some(m) = &model {
            *st.by_model.entry(m.clone()).or_default() += 1;
        }
        if let Some(k) = &key {
            *st.by_key.entry(k.clone()).or_default() += 1;
        }
    }
    let faults = s.faults.lock().clone();
    let stream = parsed.as_ref().and_then(|v| v["stream"].as_bool()).unwrap_or(false);
    match faults.mode {
        Mode::Error500 => {
            return Ok(error(StatusCode::INTERNAL_SERVER_ERROR, "server_error", "internal_error", "simulated failure"))
        }
        Mode::Error429 => {
            let mut r =
                error(StatusCode::TOO_MANY_REQUESTS, "rate_limit_error", "rate_limit_exceeded", "simulated rate limit");
            r.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(faults.retry_after_s));
            return Ok(r);
        }
        Mode::Hang => {
            tokio::time::sleep(Duration::from_secs(600)).await;
            return Err(Dropped);
        }
        Mode::Reset => return Err(Dropped),
        Mode::BreakStream if !stream => return Err(Dropped),
        Mode::Ok if faults.error_rate > 0.0 && s.rng.lock().gen_bool(faults.error_rate) => {
            return Ok(error(
                StatusCode::INTERNAL_SERVER_ERROR,
                "server_error",
                "internal_error",
                "simulated random failure",
            ))
        }
        _ => {}
    }
    let key_ok = key.as_ref().is_some_and(|k| s.opts.require_keys.contains(k));
    if !s.opts.require_keys.is_empty() && path.starts_with("/v1/") && !key_ok {
        let msg = "Incorrect API key provided";
        return Ok(error(StatusCode::UNAUTHORIZED, "invalid_request_error", "invalid_api_key", msg));
    }
    let get = method == Method::GET;
    match path.as_str() {
        "/health" if get => return Ok(json_response(StatusCode::OK, &json!({"status": "ok"}))),
        "/v1/models" if get => {
            let data: Vec<_> = s
                .opts
                .models
                .iter()
                .map(|m| json!({"id": m, "object": "model", "created": 1_735_689_600u64, "owned_by": s.opts.name}))
                .collect();
            return Ok(json_response(StatusCode::OK, &json!({"object": "list", "data": data})));
        }
        "/v1/chat/completions" | "/v1/embeddings" if method == Method::POST => {}
        "/health" | "/v1/models" | "/v1/chat/completions" | "/v1/embeddings" => {
            return Ok(error(
                StatusCode::METHOD_NOT_ALLOWED,
                "invalid_request_error",
                "method_not_allowed",
                "method not allowed",
            ))
        }
        _ => return Ok(error(StatusCode::NOT_FOUND, "invalid_request_error", "not_found", "unknown route")),
    }
    let Some(v) = parsed else {
        return Ok(error(StatusCode::BAD_REQUEST, "invalid_request_error", "invalid_json", "body is not JSON"));
    };
    let Some(model) = model else {
        return Ok(error(StatusCode::BAD_REQUEST, "invalid_request_error", "missing_model", "`model` is required"));
    };
    if !s.opts.models.contains(&model) {
        let msg = format!("The model `{model}` does not exist");
        return Ok(error(StatusCode::NOT_FOUND, "invalid_request_error", "model_not_found", &msg));
    }
    let mut delay = s.opts.latency_ms;
    if s.opts.jitter_ms > 0 {
        let j = s.rng.lock().gen_range(0..=2 * s.opts.jitter_ms);
        delay = (delay + j).saturating_sub(s.opts.jitter_ms);
    }
    if faults.mode == Mode::Slow {
        delay += faults.latency_ms;
    }
    if path == "/v1/embeddings" {
        sleep_ms(delay).await;
        return Ok(embeddings(&v, &model));
    }
    let Some(messages) = v["messages"].as_array() else {
        return Ok(error(
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            "missing_messages",
            "`messages` is required",
        ));
    };
    let max_tokens =
        v["max_completion_tokens"].as_u64().or(v["max_tokens"].as_u64()).map(|n| n.min(u32::MAX as u64) as u32);
    let pieces = answer_pieces(&s.opts.name, &model, max_tokens);
    let full_len = answer_pieces(&s.opts.name, &model, None).len();
    let finish = if pieces.len() < full_len { "length" } else { "stop" };
    let prompt = prompt_tokens(messages);
    let completion = pieces.len() as u64;
    let usage = json!({"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion});
    let id = format!("chatcmpl-{}-{}", s.opts.name, s.rng.lock().gen::<u32>());
    if !stream {
        sleep_ms(delay).await;
        let answer = json!({
            "id": id, "object": "chat.completion", "created": unix_now(), "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": pieces.concat()}, "finish_reason": finish}],
            "usage": usage,
        });
        return Ok(json_response(StatusCode::OK, &answer));
    }
    let include_usage = v["stream_options"]["include_usage"].as_bool().unwrap_or(false);
    let mut gap = if s.opts.tokens_per_sec > 0.0 { 1000.0 / s.opts.tokens_per_sec } else { 0.0 };
    if faults.mode == Mode::Slow {
        gap = gap * 2.0 + 10.0;
    }
    let break_after = (faults.mode == Mode::BreakStream).then_some(3usize);
    let (tx, mut rx) = mpsc::channel::<Result<Frame<Bytes>, std::io::Error>>(8);
    tokio::spawn(async move {
        sleep_ms(delay).await;
        let created = unix_now();
        let chunk = |delta: serde_json::Value, finish: Option<&str>| {
            let c = json!({"id": id, "object": "chat.completion.chunk", "created": created, "model": model,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]});
            Bytes::from(format!("data: {c}\n\n"))
        };
        let mut events = vec![chunk(json!({"role": "assistant", "content": ""}), None)];
        events.extend(pieces.iter().map(|p| chunk(json!({"content": p}), None)));
        events.push(chunk(json!({}), Some(finish)));
        if include_usage {
            let c = json!({"id": id, "object": "chat.completion.chunk", "created": created, "model": model,
                "choices": [], "usage": usage});
            events.push(Bytes::from(format!("data: {c}\n\n")));
        }
        events.push(Bytes::from_static(b"data: [DONE]\n\n"));
        for (i, e) in events.into_iter().enumerate() {
            if break_after == Some(i) {
                let _ = tx.send(Err(std::io::Error::other("simulated broken stream"))).await;
                return;
            }
            if i > 1 && gap > 0.0 {
                tokio::time::sleep(Duration::from_secs_f64(gap / 1000.0)).await;
            }
            if tx.send(Ok(Frame::data(e))).await.is_err() {
                return;
            }
        }
    });
    let body = StreamBody::new(futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx)));
    let mut r = Response::new(BodyExt::boxed(body));
    r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("text/event-stream"));
    r.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    Ok(r)
}

async fn sleep_ms(ms: u64) {
    if ms > 0 {
        tokio::time::sleep(Duration::from_millis(ms)).await;
    }
}

fn embeddings(v: &serde_json::Value, model: &str) -> Response<MockBody> {
    let inputs: Vec<String> = match &v["input"] {
        serde_json::Value::String(s) => vec![s.clone()],
        serde_json::Value::Array(a) => {
            a.iter().map(|x| x.as_str().map(str::to_string).unwrap_or_else(|| x.to_string())).collect()
        }
        _ => return error(StatusCode::BAD_REQUEST, "invalid_request_error", "missing_input", "`input` is required"),
    };
    let b64 = v["encoding_format"].as_str() == Some("base64");
    let mut tokens = 0u64;
    let data: Vec<_> = inputs
        .iter()
        .enumerate()
        .map(|(i, text)| {
            tokens += (text.chars().count() as u64).div_ceil(4).max(1);
            let e = embedding(text);
            let value = if b64 {
                let bytes: Vec<u8> = e.iter().flat_map(|f| f.to_le_bytes()).collect();
                json!(base64(&bytes))
            } else {
                json!(e)
            };
            json!({"object": "embedding", "index": i, "embedding": value})
        })
        .collect();
    json_response(
        StatusCode::OK,
        &json!({"object": "list", "data": data, "model": model, "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}),
    )
}

async fn control(s: &Shared, ctl: &str, req: Request<Incoming>) -> Response<MockBody> {
    match (req.method().clone(), ctl) {
        (Method::GET, "stats") => json_response(StatusCode::OK, &json!(*s.stats.lock())),
        (Method::POST, "stats/reset") => {
            *s.stats.lock() = MockStats::default();
            json_response(StatusCode::OK, &json!({"reset": true}))
        }
        (Method::GET, "faults") => json_response(StatusCode::OK, &json!(*s.faults.lock())),
        (Method::POST, "faults") => {
            let body = req.into_body().collect().await.map(|c| c.to_bytes()).unwrap_or_default();
            match serde_json::from_slice::<Faults>(&body) {
                Ok(f) => {
                    s.apply(&f);
                    json_response(StatusCode::OK, &json!(*s.faults.lock()))
                }
                Err(e) => error(StatusCode::BAD_REQUEST, "invalid_request_error", "invalid_faults", &e.to_string()),
            }
        }
        _ => error(StatusCode::NOT_FOUND, "invalid_request_error", "not_found", "unknown control route"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_are_deterministic_and_truncated() {
        let a = answer_pieces("alpha", "gpt-4.1", None);
        assert_eq!(a, answer_pieces("alpha", "gpt-4.1", None));
        assert!(a.concat().contains("alpha serving gpt-4.1"));
        assert_eq!(answer_pieces("alpha", "gpt-4.1", Some(3)).concat(), "Hello! This is");
    }

    #[test]
    fn prompt_tokens_count_text_parts() {
        let m = vec![
            json!({"role": "user", "content": "abcdefgh"}),
            json!({"role": "user", "content": [{"type": "text", "text": "abcd"}]}),
        ];
        assert_eq!(prompt_tokens(&m), 3 + 6);
    }

    #[test]
    fn base64_matches_rfc4648() {
        assert_eq!(base64(b""), "");
        assert_eq!(base64(b"f"), "Zg==");
        assert_eq!(base64(b"fo"), "Zm8=");
        assert_eq!(base64(b"foobar"), "Zm9vYmFy");
    }

    #[test]
    fn faults_update_partially() {
        let f: Faults = serde_json::from_str(r#"{"mode":"error_429","retry_after_s":3}"#).unwrap();
        assert_eq!(f.mode, Some(Mode::Error429));
        assert!(f.latency_ms.is_none());
        assert!(serde_json::from_str::<Faults>(r#"{"mode":"explode"}"#).is_err());
        assert_eq!("break_stream".parse::<Mode>(), Ok(Mode::BreakStream));
    }
}
