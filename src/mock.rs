//! The simulated OpenAI-compatible upstream behind `sheepdog mock`.
//!
//! Owns: the mock HTTP/1.1 server (chat completions with and without streaming, embeddings, the model list,
//! `/health`), its deterministic answers ([`answer_pieces`], [`prompt_tokens`]), fault injection
//! (`/_mock/faults`, [`MockHandle::set_faults`]) and request accounting (`/_mock/stats`).
//!
//! It is the test double of every other module, so it must stay faithful to the OpenAI wire format and cheap
//! enough to feed a thousand concurrent streams: one task per connection, streams are a body state machine
//! (no task, no channel per stream), and no lock is ever held across an `.await`.
//! It knows nothing about the gateway: no config file, no metrics, no imports from other sheepdog modules.

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use http_body_util::{BodyExt, LengthLimitError, Limited};
use hyper::body::Incoming;
use hyper::header::{HeaderMap, HeaderName, HeaderValue, ALLOW, AUTHORIZATION, CACHE_CONTROL, CONTENT_TYPE};
use hyper::server::conn::http1;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use parking_lot::Mutex;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::time::{Instant, Sleep};

/// Largest request body the mock reads; bigger ones get 413.
const MAX_BODY_BYTES: usize = 8 * 1024 * 1024;
/// Number of floats in every embedding vector.
const EMBEDDING_DIMS: usize = 8;
/// `created` of every entry of `GET /v1/models` (fixed, so answers are reproducible).
const MODELS_CREATED: u64 = 1_700_000_000;
/// Stream chunk interval in `slow` mode when `--tokens-per-sec` is 0 (no pacing otherwise).
const SLOW_UNPACED_INTERVAL: Duration = Duration::from_millis(100);
/// Factor by which `slow` mode stretches the stream chunk interval.
const SLOW_PACING_FACTOR: u32 = 4;
/// Chunks a `break_stream` stream sends before the connection is cut.
const BREAK_AFTER_CHUNKS: usize = 3;
/// Pause before a `break_stream` cut, so the chunks before it are flushed to the client first.
const BREAK_FLUSH_PAUSE: Duration = Duration::from_millis(30);
/// `latency_ms` of the fault state at start: the added delay of `slow` mode.
const DEFAULT_SLOW_LATENCY_MS: u64 = 1000;
/// `retry_after_s` of the fault state at start: the `Retry-After` of `error_429` mode.
const DEFAULT_RETRY_AFTER_S: u64 = 1;
/// Pieces of an answer by default: the template once.
pub const DEFAULT_ANSWER_TOKENS: usize = ANSWER_TEMPLATE.len();
/// Largest accepted `--answer-tokens` (every answer is built in memory).
const MAX_ANSWER_TOKENS: usize = 1_000_000;

/// The answer template; `{name}` and `{model}` are replaced by the mock's name and the requested model.
const ANSWER_TEMPLATE: [&str; 20] = [
    "Hello",
    " from",
    " {name}",
    ",",
    " a",
    " simulated",
    " upstream",
    " serving",
    " {model}",
    ".",
    " This",
    " answer",
    " is",
    " deterministic",
    " and",
    " streams",
    " piece",
    " by",
    " piece",
    ".",
];

/// CLI arguments of `sheepdog mock`.
#[derive(clap::Args, Debug, Clone)]
pub struct MockArgs {
    /// Address to listen on, e.g. 127.0.0.1:19001 (port 0 picks a free port; the printed line tells it).
    #[arg(long)]
    pub listen: String,
    /// Name of this mock; it appears in every answer and as `owned_by` of its models.
    #[arg(long, default_value = "mock")]
    pub name: String,
    /// Models served (comma separated); others get 404 `model_not_found`.
    #[arg(long, value_delimiter = ',', default_value = "gpt-4.1")]
    pub models: Vec<String>,
    /// Delay before every answer (before the first chunk of a stream).
    #[arg(long, default_value_t = 0)]
    pub latency_ms: u64,
    /// Uniform jitter added to the latency: latency ± jitter.
    #[arg(long, default_value_t = 0)]
    pub jitter_ms: u64,
    /// Stream chunks per second; 0 sends them as fast as possible.
    #[arg(long, default_value_t = 50.0)]
    pub tokens_per_sec: f64,
    /// Pieces (stream chunks, completion tokens) of every answer: the answer template repeated cyclically;
    /// `max_tokens` of a request cuts it shorter.
    #[arg(long, default_value_t = DEFAULT_ANSWER_TOKENS)]
    pub answer_tokens: usize,
    /// Fraction (0..=1) of requests answered 500 in `ok` and `slow` modes.
    #[arg(long, default_value_t = 0.0)]
    pub error_rate: f64,
    /// Seed of the random numbers (error draws, jitter): the same seed gives the same sequence.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// API keys accepted on /v1/* as `Authorization: Bearer KEY` (comma separated); empty = no check.
    #[arg(long, value_delimiter = ',')]
    pub require_keys: Vec<String>,
    /// Stamp every stream chunk with `"sent_at_us"`: the Unix time in microseconds when it was written, so a
    /// client on the same machine can measure each chunk's transit time (benchmarks).
    #[arg(long)]
    pub stamp: bool,
}

/// Settings of a mock started with [`spawn`]: the fields of [`MockArgs`] except the address.
#[derive(Debug, Clone, PartialEq)]
pub struct MockOptions {
    /// Name that appears in every answer and as `owned_by` of the models.
    pub name: String,
    /// Models served; others get 404 `model_not_found`.
    pub models: Vec<String>,
    /// Delay before every answer (before the first chunk of a stream).
    pub latency_ms: u64,
    /// Uniform jitter added to the latency: latency ± jitter.
    pub jitter_ms: u64,
    /// Stream chunks per second; 0 = no pacing.
    pub tokens_per_sec: f64,
    /// Pieces of every answer before `max_tokens` (the template repeated cyclically).
    pub answer_tokens: usize,
    /// Initial fraction of requests answered 500 (the `error_rate` of the fault state).
    pub error_rate: f64,
    /// Seed of the random numbers.
    pub seed: u64,
    /// Accepted bearer tokens on /v1/*; empty = no check.
    pub require_keys: Vec<String>,
    /// Stamp stream chunks with `sent_at_us`.
    pub stamp: bool,
}

impl Default for MockOptions {
    fn default() -> Self {
        Self {
            name: "mock".to_owned(),
            models: vec!["gpt-4.1".to_owned()],
            latency_ms: 0,
            jitter_ms: 0,
            tokens_per_sec: 50.0,
            answer_tokens: DEFAULT_ANSWER_TOKENS,
            error_rate: 0.0,
            seed: 1,
            require_keys: Vec::new(),
            stamp: false,
        }
    }
}

impl From<&MockArgs> for MockOptions {
    fn from(args: &MockArgs) -> Self {
        let non_empty =
            |v: &[String]| -> Vec<String> { v.iter().map(|s| s.trim().to_owned()).filter(|s| !s.is_empty()).collect() };
        Self {
            name: args.name.clone(),
            models: non_empty(&args.models),
            latency_ms: args.latency_ms,
            jitter_ms: args.jitter_ms,
            tokens_per_sec: args.tokens_per_sec,
            answer_tokens: args.answer_tokens,
            error_rate: args.error_rate,
            seed: args.seed,
            require_keys: non_empty(&args.require_keys),
            stamp: args.stamp,
        }
    }
}

impl MockOptions {
    /// Checks the values a user can get wrong: `error_rate` within 0..=1, `tokens_per_sec` finite and >= 0,
    /// `answer_tokens` at most a million.
    pub fn validate(&self) -> Result<(), String> {
        if !(0.0..=1.0).contains(&self.error_rate) {
            return Err(format!("error rate must be between 0 and 1, got {}", self.error_rate));
        }
        if !self.tokens_per_sec.is_finite() || self.tokens_per_sec < 0.0 {
            return Err(format!("tokens per second must be a number >= 0, got {}", self.tokens_per_sec));
        }
        if self.answer_tokens > MAX_ANSWER_TOKENS {
            return Err(format!("answer tokens must be at most {MAX_ANSWER_TOKENS}, got {}", self.answer_tokens));
        }
        Ok(())
    }
}

/// Behaviour of the mock for every path but `/_mock/*`.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum FaultMode {
    /// Normal answers (`error_rate` still applies).
    #[default]
    #[serde(rename = "ok")]
    Ok,
    /// Every request gets 500 with an OpenAI `server_error` body.
    #[serde(rename = "error_500")]
    Error500,
    /// Every request gets 429 with `Retry-After` and an OpenAI rate-limit body.
    #[serde(rename = "error_429")]
    Error429,
    /// Requests are read and never answered, until the client (or the mock) closes the connection.
    #[serde(rename = "hang")]
    Hang,
    /// The connection is reset (TCP RST) after the request is read; no HTTP answer.
    #[serde(rename = "reset")]
    Reset,
    /// Normal answers delayed by `latency_ms` more, with stream chunks four times slower.
    #[serde(rename = "slow")]
    Slow,
    /// Streams send a few chunks and then the connection is cut mid-body; other requests as `reset`.
    #[serde(rename = "break_stream")]
    BreakStream,
}

/// A change of the fault state: the JSON body of `POST /_mock/faults`. A field left out keeps its value.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Faults {
    /// New mode.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<FaultMode>,
    /// Delay added to every answer in `slow` mode (milliseconds).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub latency_ms: Option<u64>,
    /// Fraction (0..=1) of requests answered 500 in `ok` and `slow` modes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error_rate: Option<f64>,
    /// `Retry-After` seconds of `error_429` answers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_after_s: Option<u64>,
}

impl Faults {
    /// Checks the values: `error_rate` within 0..=1.
    pub fn validate(&self) -> Result<(), String> {
        match self.error_rate {
            Some(r) if !(0.0..=1.0).contains(&r) => Err(format!("error_rate must be between 0 and 1, got {r}")),
            _ => Ok(()),
        }
    }
}

/// The complete fault state in force (`GET /_mock/faults`).
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq)]
pub struct FaultState {
    /// Current mode.
    pub mode: FaultMode,
    /// Delay added to every answer in `slow` mode (milliseconds); 1000 at start.
    pub latency_ms: u64,
    /// Fraction of requests answered 500 in `ok` and `slow` modes; `--error-rate` at start.
    pub error_rate: f64,
    /// `Retry-After` seconds of `error_429` answers; 1 at start.
    pub retry_after_s: u64,
}

impl FaultState {
    fn initial(error_rate: f64) -> Self {
        Self {
            mode: FaultMode::Ok,
            latency_ms: DEFAULT_SLOW_LATENCY_MS,
            error_rate: clamp_rate(error_rate),
            retry_after_s: DEFAULT_RETRY_AFTER_S,
        }
    }

    /// Applies a change: fields set in `f` replace the current ones; `error_rate` is clamped to 0..=1.
    pub fn apply(&mut self, f: &Faults) {
        if let Some(mode) = f.mode {
            self.mode = mode;
        }
        if let Some(ms) = f.latency_ms {
            self.latency_ms = ms;
        }
        if let Some(rate) = f.error_rate {
            self.error_rate = clamp_rate(rate);
        }
        if let Some(s) = f.retry_after_s {
            self.retry_after_s = s;
        }
    }
}

fn clamp_rate(rate: f64) -> f64 {
    if rate.is_nan() {
        0.0
    } else {
        rate.clamp(0.0, 1.0)
    }
}

/// What reached the mock (`GET /_mock/stats`); `/_mock/*` requests are not counted.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
pub struct MockStats {
    /// Requests received, whatever their answer (faults included).
    pub requests: u64,
    /// Requests per path.
    pub by_path: BTreeMap<String, u64>,
    /// Requests per `model` of the JSON body.
    pub by_model: BTreeMap<String, u64>,
    /// Requests per bearer token.
    pub by_key: BTreeMap<String, u64>,
    /// Requests being handled right now, streams until their last chunk (a gauge: not reset).
    pub in_flight: u64,
    /// Open client connections (a gauge: not reset).
    pub connections: u64,
}

/// Handle to a running mock: change its faults, read its stats, stop it. Cheap to clone.
#[derive(Clone)]
pub struct MockHandle {
    shared: Arc<Shared>,
}

impl MockHandle {
    /// The address the mock listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.shared.addr
    }

    /// Changes the fault state at once, exactly as `POST /_mock/faults` does.
    pub fn set_faults(&self, f: Faults) {
        self.shared.faults.lock().apply(&f);
    }

    /// The fault state in force.
    pub fn faults(&self) -> FaultState {
        *self.shared.faults.lock()
    }

    /// What reached the mock so far.
    pub fn stats(&self) -> MockStats {
        self.shared.stats.snapshot()
    }

    /// Stops accepting connections and closes the open ones (requests in progress are cut).
    pub fn shutdown(&self) {
        self.shared.shutdown.send_replace(true);
    }
}

/// Starts a mock on an already-bound listener and returns at once; it serves on spawned tasks, so this must
/// be called inside a Tokio runtime. Fails on invalid options or when the listener has no local address.
pub fn spawn(listener: TcpListener, opts: MockOptions) -> io::Result<MockHandle> {
    opts.validate().map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    let addr = listener.local_addr()?;
    let shared = Arc::new(Shared::new(opts, addr));
    tokio::spawn(accept_loop(listener, shared.clone()));
    Ok(MockHandle { shared })
}

/// `sheepdog mock`: binds, prints `sheepdog mock NAME listening on ADDR` to stdout, serves until SIGINT/SIGTERM.
pub async fn run(args: MockArgs) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    use std::io::Write as _;

    let opts = MockOptions::from(&args);
    opts.validate()?;
    let (listener, _) =
        crate::server::bind(&args.listen).await.map_err(|e| format!("cannot listen on {}: {e}", args.listen))?;
    let name = opts.name.clone();
    let handle = spawn(listener, opts)?;
    // Handlers go in before the ready line: whoever reads it may signal at once.
    let stop = shutdown_signal()?;
    {
        let mut out = io::stdout().lock();
        writeln!(out, "sheepdog mock {name} listening on {}", handle.local_addr())?;
        out.flush()?;
    }
    stop.await;
    handle.shutdown();
    Ok(())
}

/// Installs the SIGINT and SIGTERM handlers at once; the returned future ends at the first signal.
fn shutdown_signal() -> io::Result<impl Future<Output = ()>> {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let mut term = signal(SignalKind::terminate())?;
        let mut int = signal(SignalKind::interrupt())?;
        Ok(async move {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
        })
    }
    #[cfg(not(unix))]
    {
        Ok(async {
            // Without a handler there is nothing to wait for: stop as if signalled.
            let _ = tokio::signal::ctrl_c().await;
        })
    }
}

/// The deterministic answer pieces (one per stream chunk) for (mock name, model, max_tokens) of a mock with the
/// default answer length; the non-streaming answer's content is their concatenation. `max_tokens` keeps only the
/// first pieces.
pub fn answer_pieces(name: &str, model: &str, max_tokens: Option<u32>) -> Vec<String> {
    answer_pieces_of(name, model, DEFAULT_ANSWER_TOKENS, max_tokens)
}

/// Like [`answer_pieces`] for a mock started with `--answer-tokens answer_tokens`: the template repeated
/// cyclically up to `answer_tokens` pieces, then cut to `max_tokens`.
pub fn answer_pieces_of(name: &str, model: &str, answer_tokens: usize, max_tokens: Option<u32>) -> Vec<String> {
    let keep = max_tokens.map_or(answer_tokens, |n| usize::try_from(n).map_or(answer_tokens, |n| n.min(answer_tokens)));
    ANSWER_TEMPLATE
        .iter()
        .cycle()
        .take(keep)
        .map(|p| match *p {
            " {name}" => format!(" {name}"),
            " {model}" => format!(" {model}"),
            other => other.to_owned(),
        })
        .collect()
}

/// Prompt tokens the mock bills for chat `messages`: ceil(characters of all text contents / 4) + 3 per message.
/// A content is a string or an array of parts whose `text` fields count.
pub fn prompt_tokens(messages: &[Value]) -> u32 {
    let chars: usize = messages
        .iter()
        .map(|m| match m.get("content") {
            Some(Value::String(s)) => s.chars().count(),
            Some(Value::Array(parts)) => {
                parts.iter().filter_map(|p| p.get("text").and_then(Value::as_str)).map(|t| t.chars().count()).sum()
            }
            _ => 0,
        })
        .sum();
    let tokens = chars.div_ceil(4).saturating_add(messages.len().saturating_mul(3));
    u32::try_from(tokens).unwrap_or(u32::MAX)
}

/// Standard base64 (RFC 4648, with padding).
pub fn base64_encode(data: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for chunk in data.chunks(3) {
        let b0 = u32::from(chunk[0]);
        let b1 = u32::from(chunk.get(1).copied().unwrap_or(0));
        let b2 = u32::from(chunk.get(2).copied().unwrap_or(0));
        let n = (b0 << 16) | (b1 << 8) | b2;
        let sextet = |shift: u32| char::from(ALPHABET[((n >> shift) & 63) as usize]);
        out.push(sextet(18));
        out.push(sextet(12));
        out.push(if chunk.len() > 1 { sextet(6) } else { '=' });
        out.push(if chunk.len() > 2 { sextet(0) } else { '=' });
    }
    out
}

/// A unit-length vector of [`EMBEDDING_DIMS`] floats derived from `bytes` (FNV-1a, then splitmix64).
fn embedding_vector(bytes: &[u8]) -> [f32; EMBEDDING_DIMS] {
    let mut state =
        bytes.iter().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3));
    let mut raw = [0f64; EMBEDDING_DIMS];
    for v in &mut raw {
        state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^= z >> 31;
        *v = (z >> 11) as f64 / (1u64 << 53) as f64 * 2.0 - 1.0;
    }
    let norm = raw.iter().map(|v| v * v).sum::<f64>().sqrt();
    let norm = if norm > 0.0 { norm } else { 1.0 };
    raw.map(|v| (v / norm) as f32)
}

/// One embedding input: the bytes its vector derives from, and the tokens it bills.
struct EmbeddingInput {
    key: Vec<u8>,
    tokens: u32,
}

fn text_tokens(s: &str) -> u32 {
    u32::try_from(s.chars().count().div_ceil(4)).unwrap_or(u32::MAX)
}

fn token_array(v: &[Value]) -> Option<EmbeddingInput> {
    let mut key = Vec::with_capacity(v.len() * 4);
    for t in v {
        let t = u32::try_from(t.as_u64()?).ok()?;
        key.extend_from_slice(&t.to_le_bytes());
    }
    Some(EmbeddingInput { key, tokens: u32::try_from(v.len()).unwrap_or(u32::MAX) })
}

/// Reads `input` of an embeddings request: a string, strings, a token array or token arrays.
fn embedding_inputs(input: &Value) -> Option<Vec<EmbeddingInput>> {
    match input {
        Value::String(s) => Some(vec![EmbeddingInput { key: s.as_bytes().to_vec(), tokens: text_tokens(s) }]),
        Value::Array(items) if items.is_empty() => None,
        Value::Array(items) if items.iter().all(Value::is_number) => Some(vec![token_array(items)?]),
        Value::Array(items) => items
            .iter()
            .map(|item| match item {
                Value::String(s) => Some(EmbeddingInput { key: s.as_bytes().to_vec(), tokens: text_tokens(s) }),
                Value::Array(tokens) if !tokens.is_empty() => token_array(tokens),
                _ => None,
            })
            .collect(),
        _ => None,
    }
}

// ---------------------------------------------------------------------------------------------------------
// Server state

struct Shared {
    opts: MockOptions,
    addr: SocketAddr,
    name_header: Option<HeaderValue>,
    models_body: Bytes,
    faults: Mutex<FaultState>,
    error_rng: Mutex<SmallRng>,
    jitter_rng: Mutex<SmallRng>,
    stats: Stats,
    next_id: AtomicU64,
    shutdown: watch::Sender<bool>,
    http: http1::Builder,
}

impl Shared {
    fn new(opts: MockOptions, addr: SocketAddr) -> Self {
        let models = json!({
            "object": "list",
            "data": opts.models.iter().map(|m| json!({
                "id": m, "object": "model", "created": MODELS_CREATED, "owned_by": opts.name,
            })).collect::<Vec<_>>(),
        });
        let mut http = http1::Builder::new();
        // Idle keep-alive connections stay open as long as the client wants them (like a patient upstream).
        http.timer(TokioTimer::new()).header_read_timeout(None::<Duration>);
        Self {
            name_header: HeaderValue::from_str(&opts.name).ok(),
            models_body: Bytes::from(models.to_string()),
            faults: Mutex::new(FaultState::initial(opts.error_rate)),
            error_rng: Mutex::new(SmallRng::seed_from_u64(opts.seed)),
            jitter_rng: Mutex::new(SmallRng::seed_from_u64(opts.seed ^ 0x5eed_7177_e400_0001)),
            stats: Stats::default(),
            next_id: AtomicU64::new(1),
            shutdown: watch::Sender::new(false),
            http,
            opts,
            addr,
        }
    }

    /// Draws whether this request fails under `error_rate` (draws only when the rate is above 0).
    fn draw_error(&self, rate: f64) -> bool {
        rate > 0.0 && self.error_rng.lock().gen::<f64>() < rate
    }

    /// The delay before an answer: latency ± jitter, plus the `slow` mode delay.
    fn answer_delay(&self, faults: &FaultState) -> Duration {
        let jitter = self.opts.jitter_ms;
        let mut ms = self.opts.latency_ms;
        if jitter > 0 {
            let offset = self.jitter_rng.lock().gen_range(0..=jitter.saturating_mul(2));
            ms = ms.saturating_add(offset).saturating_sub(jitter);
        }
        if faults.mode == FaultMode::Slow {
            ms = ms.saturating_add(faults.latency_ms);
        }
        Duration::from_millis(ms)
    }

    /// Interval between stream chunks; `None` = no pacing.
    fn chunk_interval(&self, faults: &FaultState) -> Option<Duration> {
        let tps = self.opts.tokens_per_sec;
        let base = (tps > 0.0).then(|| Duration::from_secs_f64(1.0 / tps));
        if faults.mode == FaultMode::Slow {
            Some(base.map_or(SLOW_UNPACED_INTERVAL, |d| d * SLOW_PACING_FACTOR))
        } else {
            base
        }
    }
}

#[derive(Default)]
struct Stats {
    requests: AtomicU64,
    maps: Mutex<StatMaps>,
    in_flight: AtomicU64,
    connections: AtomicU64,
}

#[derive(Default)]
struct StatMaps {
    by_path: HashMap<String, u64>,
    by_model: HashMap<String, u64>,
    by_key: HashMap<String, u64>,
}

fn bump(map: &mut HashMap<String, u64>, key: &str) {
    match map.get_mut(key) {
        Some(n) => *n += 1,
        None => {
            map.insert(key.to_owned(), 1);
        }
    }
}

impl Stats {
    fn record_arrival(&self, path: &str, key: Option<&str>) {
        self.requests.fetch_add(1, Ordering::Relaxed);
        let mut maps = self.maps.lock();
        bump(&mut maps.by_path, path);
        if let Some(key) = key {
            bump(&mut maps.by_key, key);
        }
    }

    fn record_model(&self, model: &str) {
        bump(&mut self.maps.lock().by_model, model);
    }

    fn reset(&self) {
        let mut maps = self.maps.lock();
        self.requests.store(0, Ordering::Relaxed);
        *maps = StatMaps::default();
    }

    fn snapshot(&self) -> MockStats {
        let maps = self.maps.lock();
        let sorted = |m: &HashMap<String, u64>| m.iter().map(|(k, v)| (k.clone(), *v)).collect();
        MockStats {
            requests: self.requests.load(Ordering::Relaxed),
            by_path: sorted(&maps.by_path),
            by_model: sorted(&maps.by_model),
            by_key: sorted(&maps.by_key),
            in_flight: self.in_flight.load(Ordering::Relaxed),
            connections: self.connections.load(Ordering::Relaxed),
        }
    }
}

/// Counts one unit of a gauge while alive.
struct GaugeGuard {
    shared: Arc<Shared>,
    which: fn(&Stats) -> &AtomicU64,
}

impl GaugeGuard {
    fn new(shared: &Arc<Shared>, which: fn(&Stats) -> &AtomicU64) -> Self {
        which(&shared.stats).fetch_add(1, Ordering::Relaxed);
        Self { shared: shared.clone(), which }
    }
}

impl Drop for GaugeGuard {
    fn drop(&mut self) {
        (self.which)(&self.shared.stats).fetch_sub(1, Ordering::Relaxed);
    }
}

// ---------------------------------------------------------------------------------------------------------
// Connections

async fn accept_loop(listener: TcpListener, shared: Arc<Shared>) {
    let mut stop = shared.shutdown.subscribe();
    loop {
        let accepted = tokio::select! {
            r = listener.accept() => r,
            _ = stop.wait_for(|s| *s) => break,
        };
        match accepted {
            Ok((stream, _)) => {
                // Streams must leave chunk by chunk; a failure here only costs latency.
                let _ = stream.set_nodelay(true);
                tokio::spawn(serve_connection(stream, shared.clone()));
            }
            Err(e) => {
                // Out of file descriptors and the like: back off instead of spinning.
                tracing::warn!(error = %e, "mock accept failed");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }
}

async fn serve_connection(stream: TcpStream, shared: Arc<Shared>) {
    let _open = GaugeGuard::new(&shared, |s| &s.connections);
    let abort = Arc::new(AtomicBool::new(false));
    let io = TokioIo::new(AbortableStream { inner: stream, abort: abort.clone() });
    let svc_shared = shared.clone();
    let service = hyper::service::service_fn(move |req| handle(svc_shared.clone(), abort.clone(), req));
    let conn = shared.http.serve_connection(io, service);
    let mut stop = shared.shutdown.subscribe();
    tokio::select! {
        res = conn => {
            if let Err(e) = res {
                tracing::debug!(error = %e, "mock connection ended with an error");
            }
        }
        _ = stop.wait_for(|s| *s) => {}
    }
}

/// A TCP stream that, when told to, closes with a reset (SO_LINGER 0) instead of an orderly FIN.
struct AbortableStream {
    inner: TcpStream,
    abort: Arc<AtomicBool>,
}

impl Drop for AbortableStream {
    fn drop(&mut self) {
        if self.abort.load(Ordering::Relaxed) {
            // Best effort: if it fails, the peer sees a FIN, still a connection without an answer.
            let _ = self.inner.set_zero_linger();
        }
    }
}

impl AsyncRead for AbortableStream {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for AbortableStream {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Why the mock ends a connection without (or in the middle of) an answer.
#[derive(Debug, thiserror::Error)]
enum MockError {
    #[error("connection reset on purpose (fault mode `reset`)")]
    Reset,
    #[error("stream cut on purpose (fault mode `break_stream`)")]
    StreamBroken,
    #[error("reading the request body failed: {0}")]
    RequestBody(String),
    #[error("encoding a stream chunk failed: {0}")]
    Encode(#[from] serde_json::Error),
}

// ---------------------------------------------------------------------------------------------------------
// Requests

type Reply = Response<MockBody>;

async fn handle(shared: Arc<Shared>, abort: Arc<AtomicBool>, req: Request<Incoming>) -> Result<Reply, MockError> {
    if req.uri().path().starts_with("/_mock/") {
        return control(&shared, req).await;
    }
    let _in_flight = GaugeGuard::new(&shared, |s| &s.in_flight);
    let (parts, body) = req.into_parts();
    let path = parts.uri.path();
    let key = bearer_token(&parts.headers);
    shared.stats.record_arrival(path, key);

    let body = match read_body(body).await? {
        Ok(b) => b,
        Err(reply) => return Ok(reply),
    };
    let json = (parts.method == Method::POST).then(|| serde_json::from_slice::<Value>(&body));
    if let Some(Ok(v)) = &json {
        if let Some(model) = v.get("model").and_then(Value::as_str) {
            shared.stats.record_model(model);
        }
    }

    let faults = *shared.faults.lock();
    let wants_stream = path == "/v1/chat/completions"
        && matches!(&json, Some(Ok(v)) if v.get("stream").and_then(Value::as_bool) == Some(true));
    match faults.mode {
        FaultMode::Reset => return Err(reset(&abort)),
        FaultMode::BreakStream if !wants_stream => return Err(reset(&abort)),
        FaultMode::Hang => return std::future::pending().await,
        FaultMode::Error500 => return Ok(server_error(&shared)),
        FaultMode::Error429 => return Ok(rate_limited(&shared, faults.retry_after_s)),
        FaultMode::Ok | FaultMode::Slow => {
            if shared.draw_error(faults.error_rate) {
                return Ok(server_error(&shared));
            }
        }
        FaultMode::BreakStream => {}
    }

    let delay = shared.answer_delay(&faults);
    if path.starts_with("/v1/") && !shared.opts.require_keys.is_empty() {
        let known = key.is_some_and(|k| shared.opts.require_keys.iter().any(|r| r == k));
        if !known {
            pause(delay).await;
            let reply = openai_error(
                StatusCode::UNAUTHORIZED,
                "Incorrect API key provided",
                "invalid_request_error",
                "invalid_api_key",
            );
            return Ok(with_name(&shared, reply));
        }
    }

    let method = &parts.method;
    let reply = match path {
        "/v1/chat/completions" if method == Method::POST => match chat(&shared, json, &faults, delay) {
            Answer::Now(reply) => reply,
            Answer::Streaming(reply) => return Ok(with_name(&shared, reply)),
        },
        "/v1/embeddings" if method == Method::POST => embeddings(&shared, json),
        "/v1/models" if method == Method::GET => json_reply(StatusCode::OK, shared.models_body.clone()),
        "/health" if method == Method::GET => json_reply(StatusCode::OK, Bytes::from_static(br#"{"status":"ok"}"#)),
        "/v1/chat/completions" | "/v1/embeddings" => method_not_allowed(method, path, "POST"),
        "/v1/models" | "/health" => method_not_allowed(method, path, "GET"),
        _ => openai_error(
            StatusCode::NOT_FOUND,
            &format!("Unknown request URL: {method} {path}."),
            "invalid_request_error",
            "unknown_url",
        ),
    };
    pause(delay).await;
    Ok(with_name(&shared, reply))
}

/// Sleeps for `delay`; a zero delay does not touch the timer.
async fn pause(delay: Duration) {
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
}

fn reset(abort: &AtomicBool) -> MockError {
    abort.store(true, Ordering::Relaxed);
    MockError::Reset
}

fn bearer_token(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim()).filter(|t| !t.is_empty())
}

/// Reads the whole request body: `Ok(Err(reply))` when it is too large, `Err` when the client failed.
async fn read_body(body: Incoming) -> Result<Result<Bytes, Reply>, MockError> {
    match Limited::new(body, MAX_BODY_BYTES).collect().await {
        Ok(collected) => Ok(Ok(collected.to_bytes())),
        Err(e) if e.downcast_ref::<LengthLimitError>().is_some() => Ok(Err(openai_error(
            StatusCode::PAYLOAD_TOO_LARGE,
            &format!("Request body larger than {MAX_BODY_BYTES} bytes."),
            "invalid_request_error",
            "request_too_large",
        ))),
        Err(e) => Err(MockError::RequestBody(e.to_string())),
    }
}

/// The `/_mock/*` control routes: never counted, never faulted.
async fn control(shared: &Arc<Shared>, req: Request<Incoming>) -> Result<Reply, MockError> {
    let (parts, body) = req.into_parts();
    let path = parts.uri.path();
    let method = &parts.method;
    let body = match read_body(body).await? {
        Ok(b) => b,
        Err(reply) => return Ok(reply),
    };
    Ok(match (path, method) {
        ("/_mock/faults", &Method::GET) => ok_json(&*shared.faults.lock()),
        ("/_mock/faults", &Method::POST) => {
            let change = if body.iter().all(u8::is_ascii_whitespace) {
                Ok(Faults::default())
            } else {
                serde_json::from_slice::<Faults>(&body).map_err(|e| e.to_string())
            };
            match change.and_then(|f| f.validate().map(|()| f)) {
                Ok(f) => {
                    let mut state = shared.faults.lock();
                    state.apply(&f);
                    ok_json(&*state)
                }
                Err(e) => openai_error(
                    StatusCode::BAD_REQUEST,
                    &format!("Invalid faults: {e}"),
                    "invalid_request_error",
                    "invalid_faults",
                ),
            }
        }
        ("/_mock/stats", &Method::GET) => ok_json(&shared.stats.snapshot()),
        ("/_mock/stats/reset", &Method::POST) => {
            shared.stats.reset();
            ok_json(&shared.stats.snapshot())
        }
        ("/_mock/faults", _) => method_not_allowed(method, path, "GET, POST"),
        ("/_mock/stats", _) => method_not_allowed(method, path, "GET"),
        ("/_mock/stats/reset", _) => method_not_allowed(method, path, "POST"),
        _ => openai_error(
            StatusCode::NOT_FOUND,
            &format!("Unknown request URL: {method} {path}."),
            "invalid_request_error",
            "unknown_url",
        ),
    })
}

/// A 200 JSON answer of a serializable value.
fn ok_json<T: Serialize>(value: &T) -> Reply {
    // Serializing plain structs of numbers, strings and string-keyed maps cannot fail.
    let text = serde_json::to_string(value).unwrap_or_else(|_| "null".to_owned());
    json_reply(StatusCode::OK, Bytes::from(text))
}

enum Answer {
    /// A complete answer, to be sent after the latency.
    Now(Reply),
    /// A stream whose body applies the latency itself, before its first chunk.
    Streaming(Reply),
}

/// An OpenAI-shaped error answer before it becomes a response (small, so it travels in `Result`s).
struct ApiError {
    status: StatusCode,
    message: String,
    code: &'static str,
}

impl ApiError {
    fn invalid(message: impl Into<String>, code: &'static str) -> Self {
        Self { status: StatusCode::BAD_REQUEST, message: message.into(), code }
    }

    fn into_reply(self) -> Reply {
        openai_error(self.status, &self.message, "invalid_request_error", self.code)
    }
}

fn requested_model<'a>(shared: &Shared, v: &'a Value) -> Result<&'a str, ApiError> {
    let model = v
        .get("model")
        .and_then(Value::as_str)
        .ok_or_else(|| ApiError::invalid("you must provide a model parameter", "missing_required_parameter"))?;
    if shared.opts.models.iter().any(|m| m == model) {
        Ok(model)
    } else {
        Err(ApiError {
            status: StatusCode::NOT_FOUND,
            message: format!("The model `{model}` does not exist or you do not have access to it."),
            code: "model_not_found",
        })
    }
}

fn parsed_body(json: Option<Result<Value, serde_json::Error>>) -> Result<Value, ApiError> {
    match json {
        Some(Ok(v)) if v.is_object() => Ok(v),
        Some(Ok(_)) => Err(ApiError::invalid("The request body must be a JSON object.", "invalid_json")),
        Some(Err(e)) => {
            Err(ApiError::invalid(format!("We could not parse the JSON body of your request: {e}"), "invalid_json"))
        }
        None => Err(ApiError::invalid("A JSON request body is required.", "invalid_json")),
    }
}

fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

fn unix_now_us() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_micros() as u64)
}

#[derive(Serialize, Clone, Copy, Debug, PartialEq)]
struct Usage {
    prompt_tokens: u32,
    completion_tokens: u32,
    total_tokens: u32,
}

fn chat(
    shared: &Arc<Shared>,
    json: Option<Result<Value, serde_json::Error>>,
    faults: &FaultState,
    delay: Duration,
) -> Answer {
    let v = match parsed_body(json) {
        Ok(v) => v,
        Err(e) => return Answer::Now(e.into_reply()),
    };
    let model = match requested_model(shared, &v) {
        Ok(m) => m,
        Err(e) => return Answer::Now(e.into_reply()),
    };
    let Some(messages) = v.get("messages").and_then(Value::as_array) else {
        return Answer::Now(
            ApiError::invalid("you must provide a messages parameter (an array)", "missing_required_parameter")
                .into_reply(),
        );
    };
    let max_tokens = v
        .get("max_completion_tokens")
        .and_then(Value::as_u64)
        .or_else(|| v.get("max_tokens").and_then(Value::as_u64))
        .map(|n| u32::try_from(n).unwrap_or(u32::MAX));
    let answer_tokens = shared.opts.answer_tokens;
    let pieces = answer_pieces_of(&shared.opts.name, model, answer_tokens, max_tokens);
    let finish_reason = if pieces.len() < answer_tokens { "length" } else { "stop" };
    let prompt = prompt_tokens(messages);
    let completion = u32::try_from(pieces.len()).unwrap_or(u32::MAX);
    let usage =
        Usage { prompt_tokens: prompt, completion_tokens: completion, total_tokens: prompt.saturating_add(completion) };
    let id = format!("chatcmpl-sheepdog{:012}", shared.next_id.fetch_add(1, Ordering::Relaxed));
    let created = unix_now();

    if v.get("stream").and_then(Value::as_bool) == Some(true) {
        let include_usage = v.pointer("/stream_options/include_usage").and_then(Value::as_bool) == Some(true);
        let body = SseBody::new(
            SsePlan {
                id,
                created,
                model: model.to_owned(),
                pieces,
                finish_reason,
                usage,
                include_usage,
                stamp: shared.opts.stamp,
            },
            Instant::now() + delay,
            shared.chunk_interval(faults),
            (faults.mode == FaultMode::BreakStream).then_some(BREAK_AFTER_CHUNKS),
            GaugeGuard::new(shared, |s| &s.in_flight),
        );
        let mut reply = Response::new(MockBody(BodyKind::Sse(Box::new(body))));
        let headers = reply.headers_mut();
        headers.insert(CONTENT_TYPE, HeaderValue::from_static("text/event-stream"));
        headers.insert(CACHE_CONTROL, HeaderValue::from_static("no-cache"));
        return Answer::Streaming(reply);
    }

    let body = json!({
        "id": id,
        "object": "chat.completion",
        "created": created,
        "model": model,
        "choices": [{
            "index": 0,
            "message": {"role": "assistant", "content": pieces.concat(), "refusal": null},
            "logprobs": null,
            "finish_reason": finish_reason,
        }],
        "usage": usage,
        "system_fingerprint": "fp_sheepdog_mock",
    });
    Answer::Now(json_reply(StatusCode::OK, Bytes::from(body.to_string())))
}

fn embeddings(shared: &Shared, json: Option<Result<Value, serde_json::Error>>) -> Reply {
    let v = match parsed_body(json) {
        Ok(v) => v,
        Err(e) => return e.into_reply(),
    };
    let model = match requested_model(shared, &v) {
        Ok(m) => m,
        Err(e) => return e.into_reply(),
    };
    let Some(inputs) = v.get("input").and_then(embedding_inputs) else {
        return ApiError::invalid(
            "'input' must be a non-empty string, array of strings, or array of token arrays",
            "invalid_input",
        )
        .into_reply();
    };
    let base64 = match v.get("encoding_format").and_then(Value::as_str) {
        None | Some("float") => false,
        Some("base64") => true,
        Some(other) => {
            return ApiError::invalid(
                format!("encoding_format must be 'float' or 'base64', got '{other}'"),
                "invalid_encoding_format",
            )
            .into_reply()
        }
    };
    let mut tokens = 0u32;
    let data: Vec<Value> = inputs
        .iter()
        .enumerate()
        .map(|(index, input)| {
            tokens = tokens.saturating_add(input.tokens);
            let vector = embedding_vector(&input.key);
            let embedding = if base64 {
                let bytes: Vec<u8> = vector.iter().flat_map(|f| f.to_le_bytes()).collect();
                Value::String(base64_encode(&bytes))
            } else {
                json!(vector)
            };
            json!({"object": "embedding", "index": index, "embedding": embedding})
        })
        .collect();
    let body = json!({
        "object": "list",
        "data": data,
        "model": model,
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    });
    json_reply(StatusCode::OK, Bytes::from(body.to_string()))
}

// ---------------------------------------------------------------------------------------------------------
// Replies

fn json_reply(status: StatusCode, body: Bytes) -> Reply {
    let mut reply = Response::new(MockBody(BodyKind::Full(Some(body))));
    *reply.status_mut() = status;
    reply.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    reply
}

fn with_name(shared: &Shared, mut reply: Reply) -> Reply {
    if let Some(name) = &shared.name_header {
        reply.headers_mut().insert(HeaderName::from_static("x-mock-name"), name.clone());
    }
    reply
}

fn openai_error(status: StatusCode, message: &str, kind: &str, code: &str) -> Reply {
    let body = json!({"error": {"message": message, "type": kind, "param": null, "code": code}});
    json_reply(status, Bytes::from(body.to_string()))
}

fn method_not_allowed(method: &Method, path: &str, allow: &'static str) -> Reply {
    let mut reply = openai_error(
        StatusCode::METHOD_NOT_ALLOWED,
        &format!("Method {method} is not allowed for {path}; use {allow}."),
        "invalid_request_error",
        "method_not_allowed",
    );
    reply.headers_mut().insert(ALLOW, HeaderValue::from_static(allow));
    reply
}

fn server_error(shared: &Shared) -> Reply {
    with_name(
        shared,
        openai_error(
            StatusCode::INTERNAL_SERVER_ERROR,
            &format!("The server had an error while processing your request (simulated by mock {}).", shared.opts.name),
            "server_error",
            "server_error",
        ),
    )
}

fn rate_limited(shared: &Shared, retry_after_s: u64) -> Reply {
    let mut reply = openai_error(
        StatusCode::TOO_MANY_REQUESTS,
        &format!("Rate limit reached (simulated by mock {}). Please try again in {retry_after_s}s.", shared.opts.name),
        "requests",
        "rate_limit_exceeded",
    );
    reply.headers_mut().insert(hyper::header::RETRY_AFTER, HeaderValue::from(retry_after_s));
    with_name(shared, reply)
}

// ---------------------------------------------------------------------------------------------------------
// Bodies

/// The response body of the mock: a complete buffer or a paced SSE stream.
struct MockBody(BodyKind);

enum BodyKind {
    Full(Option<Bytes>),
    Sse(Box<SseBody>),
}

impl Body for MockBody {
    type Data = Bytes;
    type Error = MockError;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, MockError>>> {
        match &mut self.0 {
            BodyKind::Full(data) => Poll::Ready(data.take().map(|d| Ok(Frame::data(d)))),
            BodyKind::Sse(sse) => sse.poll_next(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.0 {
            BodyKind::Full(data) => data.is_none(),
            BodyKind::Sse(sse) => sse.done,
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.0 {
            BodyKind::Full(Some(d)) => SizeHint::with_exact(d.len() as u64),
            BodyKind::Full(None) => SizeHint::with_exact(0),
            BodyKind::Sse(_) => SizeHint::default(),
        }
    }
}

/// Everything a stream will say.
struct SsePlan {
    id: String,
    created: u64,
    model: String,
    pieces: Vec<String>,
    finish_reason: &'static str,
    usage: Usage,
    include_usage: bool,
    stamp: bool,
}

#[derive(Serialize)]
struct ChunkOut<'a> {
    id: &'a str,
    object: &'static str,
    created: u64,
    model: &'a str,
    system_fingerprint: &'static str,
    choices: &'a [ChunkChoice<'a>],
    /// Absent without `include_usage`; `null` on every chunk but the last with it.
    #[serde(skip_serializing_if = "Option::is_none")]
    usage: Option<Option<Usage>>,
    /// With `--stamp`: when the chunk was written, Unix microseconds.
    #[serde(skip_serializing_if = "Option::is_none")]
    sent_at_us: Option<u64>,
}

#[derive(Serialize)]
struct ChunkChoice<'a> {
    index: u32,
    delta: Delta<'a>,
    logprobs: Option<()>,
    finish_reason: Option<&'a str>,
}

#[derive(Serialize, Default)]
struct Delta<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    role: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    content: Option<&'a str>,
}

/// A chat completion stream as a state machine polled by hyper. Step 0 is the role chunk, steps 1..=n the
/// pieces, then the finish chunk, the usage chunk (with `include_usage`) and `[DONE]`. The role chunk waits for
/// `start`; piece k waits for `start + (k-1) * interval`. Dropped with the connection, so nothing leaks.
struct SseBody {
    plan: SsePlan,
    step: usize,
    start: Instant,
    interval: Option<Duration>,
    break_after: Option<usize>,
    sleep: Pin<Box<Sleep>>,
    armed: bool,
    done: bool,
    _in_flight: GaugeGuard,
}

impl SseBody {
    fn new(
        plan: SsePlan,
        start: Instant,
        interval: Option<Duration>,
        break_after: Option<usize>,
        in_flight: GaugeGuard,
    ) -> Self {
        Self {
            plan,
            step: 0,
            start,
            interval,
            break_after,
            sleep: Box::pin(tokio::time::sleep_until(start)),
            armed: false,
            done: false,
            _in_flight: in_flight,
        }
    }

    /// When the chunk of `step` may go out (`None` = right after the previous one).
    fn deadline(&self, step: usize) -> Option<Instant> {
        match step {
            0 => Some(self.start),
            k if k >= 2 && k <= self.plan.pieces.len() => {
                let gaps = u32::try_from(k - 1).unwrap_or(u32::MAX);
                self.interval.map(|i| self.start + i * gaps)
            }
            _ => None,
        }
    }

    /// Whether `step` is where a `break_stream` stream is cut (before the finish chunk at the latest).
    fn is_break_step(&self, step: usize) -> bool {
        self.break_after.is_some_and(|b| step == b.min(self.plan.pieces.len() + 1))
    }

    fn poll_next(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, MockError>>> {
        if self.done {
            return Poll::Ready(None);
        }
        if self.is_break_step(self.step) {
            // Always pause once: hyper flushes what it holds while the body is pending, so the chunks
            // before the cut reach the client before the connection goes.
            if !self.armed {
                self.sleep.as_mut().reset(Instant::now() + BREAK_FLUSH_PAUSE);
                self.armed = true;
            }
            ready!(self.sleep.as_mut().poll(cx));
            self.done = true;
            return Poll::Ready(Some(Err(MockError::StreamBroken)));
        }
        if let Some(deadline) = self.deadline(self.step) {
            if deadline > Instant::now() {
                if !self.armed {
                    self.sleep.as_mut().reset(deadline);
                    self.armed = true;
                }
                ready!(self.sleep.as_mut().poll(cx));
            }
            self.armed = false;
        }
        let frame = match self.render(self.step) {
            Ok(Some(bytes)) => bytes,
            Ok(None) => {
                self.done = true;
                return Poll::Ready(None);
            }
            Err(e) => {
                self.done = true;
                return Poll::Ready(Some(Err(e)));
            }
        };
        self.step += 1;
        Poll::Ready(Some(Ok(Frame::data(frame))))
    }

    /// The SSE event of `step`, or `None` after `[DONE]`.
    fn render(&self, step: usize) -> Result<Option<Bytes>, MockError> {
        let plan = &self.plan;
        let n = plan.pieces.len();
        let usage_step = plan.include_usage.then_some(n + 2);
        let done_step = n + 2 + usize::from(plan.include_usage);
        if step == done_step {
            return Ok(Some(Bytes::from_static(b"data: [DONE]\n\n")));
        }
        if step > done_step {
            return Ok(None);
        }
        let null_usage = plan.include_usage.then_some(None);
        let (choices, usage) = if Some(step) == usage_step {
            (Vec::new(), Some(Some(plan.usage)))
        } else if step == 0 {
            let delta = Delta { role: Some("assistant"), content: Some("") };
            (one_choice(delta, None), null_usage)
        } else if step <= n {
            let delta = Delta { role: None, content: Some(&plan.pieces[step - 1]) };
            (one_choice(delta, None), null_usage)
        } else {
            (one_choice(Delta::default(), Some(plan.finish_reason)), null_usage)
        };
        let chunk = ChunkOut {
            id: &plan.id,
            object: "chat.completion.chunk",
            created: plan.created,
            model: &plan.model,
            system_fingerprint: "fp_sheepdog_mock",
            choices: &choices,
            usage,
            sent_at_us: plan.stamp.then(unix_now_us),
        };
        let mut out = Vec::with_capacity(256);
        out.extend_from_slice(b"data: ");
        serde_json::to_writer(&mut out, &chunk)?;
        out.extend_from_slice(b"\n\n");
        Ok(Some(Bytes::from(out)))
    }
}

fn one_choice<'a>(delta: Delta<'a>, finish_reason: Option<&'a str>) -> Vec<ChunkChoice<'a>> {
    vec![ChunkChoice { index: 0, delta, logprobs: None, finish_reason }]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answer_pieces_are_deterministic_and_name_mock_and_model() {
        let a = answer_pieces("alpha", "gpt-4.1", None);
        assert_eq!(a, answer_pieces("alpha", "gpt-4.1", None));
        assert_eq!(a.len(), ANSWER_TEMPLATE.len());
        let text = a.concat();
        assert!(text.starts_with("Hello from alpha,"), "{text}");
        assert!(text.contains(" serving gpt-4.1."), "{text}");
        assert_ne!(a, answer_pieces("beta", "gpt-4.1", None));
        assert_ne!(a, answer_pieces("alpha", "other", None));
    }

    #[test]
    fn answer_pieces_truncate_to_max_tokens() {
        let full = answer_pieces("m", "x", None);
        assert_eq!(answer_pieces("m", "x", Some(3)), full[..3].to_vec());
        assert!(answer_pieces("m", "x", Some(0)).is_empty());
        assert_eq!(answer_pieces("m", "x", Some(1000)), full);
        assert_eq!(answer_pieces("m", "x", Some(u32::MAX)), full);
    }

    #[test]
    fn answer_pieces_repeat_the_template_cyclically() {
        let once = answer_pieces("m", "x", None);
        let long = answer_pieces_of("m", "x", 45, None);
        assert_eq!(long.len(), 45);
        assert_eq!(long[..20], once[..]);
        assert_eq!(long[20..40], once[..]);
        assert_eq!(long[40..], once[..5]);
        assert_eq!(answer_pieces_of("m", "x", 45, Some(30)), long[..30].to_vec());
        assert_eq!(answer_pieces_of("m", "x", 7, None), once[..7].to_vec());
        assert!(answer_pieces_of("m", "x", 0, None).is_empty());
        assert_eq!(answer_pieces_of("m", "x", DEFAULT_ANSWER_TOKENS, Some(3)), answer_pieces("m", "x", Some(3)));
    }

    #[test]
    fn prompt_tokens_count_strings_and_text_parts() {
        let msgs = json!([
            {"role": "system", "content": "abcd"},          // 4 chars
            {"role": "user", "content": [
                {"type": "text", "text": "hello"},            // 5 chars
                {"type": "image_url", "image_url": {"url": "http://x"}},
                {"type": "text", "text": "é"},                // 1 char, 2 bytes
            ]},
            {"role": "assistant", "content": null},
        ]);
        let msgs = msgs.as_array().cloned().unwrap_or_default();
        // ceil(10 / 4) + 3 * 3
        assert_eq!(prompt_tokens(&msgs), 3 + 9);
        assert_eq!(prompt_tokens(&[]), 0);
        assert_eq!(prompt_tokens(&[json!({"role": "user", "content": "a"})]), 1 + 3);
    }

    #[test]
    fn base64_matches_rfc4648_vectors() {
        let cases = [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foob", "Zm9vYg=="),
            ("fooba", "Zm9vYmE="),
            ("foobar", "Zm9vYmFy"),
        ];
        for (plain, encoded) in cases {
            assert_eq!(base64_encode(plain.as_bytes()), encoded, "{plain}");
        }
        assert_eq!(base64_encode(&[0xfb, 0xff, 0xbf]), "+/+/");
    }

    #[test]
    fn fault_changes_keep_fields_left_out() {
        let mut state = FaultState::initial(0.25);
        assert_eq!(state.mode, FaultMode::Ok);
        assert_eq!(state.latency_ms, DEFAULT_SLOW_LATENCY_MS);
        assert_eq!(state.retry_after_s, DEFAULT_RETRY_AFTER_S);

        let f: Faults =
            serde_json::from_str(r#"{"mode": "error_429", "retry_after_s": 9}"#).unwrap_or_else(|e| panic!("{e}"));
        state.apply(&f);
        assert_eq!(state.mode, FaultMode::Error429);
        assert_eq!(state.retry_after_s, 9);
        assert_eq!(state.error_rate, 0.25);

        let f: Faults = serde_json::from_str(r#"{"latency_ms": 250}"#).unwrap_or_else(|e| panic!("{e}"));
        state.apply(&f);
        assert_eq!(state.mode, FaultMode::Error429);
        assert_eq!(state.latency_ms, 250);

        state.apply(&Faults::default());
        assert_eq!(state.latency_ms, 250);

        for (text, mode) in [
            ("ok", FaultMode::Ok),
            ("error_500", FaultMode::Error500),
            ("error_429", FaultMode::Error429),
            ("hang", FaultMode::Hang),
            ("reset", FaultMode::Reset),
            ("slow", FaultMode::Slow),
            ("break_stream", FaultMode::BreakStream),
        ] {
            let f: Faults =
                serde_json::from_str(&format!(r#"{{"mode": "{text}"}}"#)).unwrap_or_else(|e| panic!("{text}: {e}"));
            assert_eq!(f.mode, Some(mode));
            assert_eq!(serde_json::to_value(mode).ok(), Some(json!(text)));
        }
    }

    #[test]
    fn fault_changes_reject_bad_input() {
        assert!(serde_json::from_str::<Faults>(r#"{"mode": "broken"}"#).is_err());
        assert!(serde_json::from_str::<Faults>(r#"{"latency": 5}"#).is_err());
        assert!(serde_json::from_str::<Faults>(r#"{"latency_ms": -5}"#).is_err());
        let f: Faults = serde_json::from_str(r#"{"error_rate": 1.5}"#).unwrap_or_else(|e| panic!("{e}"));
        assert!(f.validate().is_err());
        let mut state = FaultState::initial(0.0);
        state.apply(&f);
        assert_eq!(state.error_rate, 1.0, "programmatic changes are clamped");
    }

    #[test]
    fn embeddings_are_deterministic_unit_vectors() {
        let a = embedding_vector(b"hello");
        assert_eq!(a, embedding_vector(b"hello"));
        assert_ne!(a, embedding_vector(b"hellp"));
        let norm: f32 = a.iter().map(|v| v * v).sum::<f32>().sqrt();
        assert!((norm - 1.0).abs() < 1e-5, "{norm}");
        assert!(a.iter().all(|v| v.abs() <= 1.0));
    }

    #[test]
    fn embedding_inputs_accept_the_openai_shapes() {
        let count = |v: Value| embedding_inputs(&v).map(|i| i.len());
        assert_eq!(count(json!("abc")), Some(1));
        assert_eq!(count(json!(["a", "b", "c"])), Some(3));
        assert_eq!(count(json!([1, 2, 3])), Some(1));
        assert_eq!(count(json!([[1, 2], [3]])), Some(2));
        assert_eq!(count(json!([])), None);
        assert_eq!(count(json!([["a"]])), None);
        assert_eq!(count(json!(42)), None);
        let tokens: Vec<u32> =
            embedding_inputs(&json!(["abcde", [7, 8, 9]])).unwrap_or_default().iter().map(|i| i.tokens).collect();
        assert_eq!(tokens, vec![2, 3]);
    }

    #[test]
    fn bearer_tokens_are_read_case_insensitively() {
        let mut h = HeaderMap::new();
        assert_eq!(bearer_token(&h), None);
        h.insert(AUTHORIZATION, HeaderValue::from_static("bearer k1"));
        assert_eq!(bearer_token(&h), Some("k1"));
        h.insert(AUTHORIZATION, HeaderValue::from_static("Basic abc"));
        assert_eq!(bearer_token(&h), None);
        h.insert(AUTHORIZATION, HeaderValue::from_static("Bearer "));
        assert_eq!(bearer_token(&h), None);
    }

    #[test]
    fn options_validate() {
        assert!(MockOptions::default().validate().is_ok());
        let bad_rate = MockOptions { error_rate: 2.0, ..MockOptions::default() };
        assert!(bad_rate.validate().is_err());
        let bad_tps = MockOptions { tokens_per_sec: -1.0, ..MockOptions::default() };
        assert!(bad_tps.validate().is_err());
        let too_long = MockOptions { answer_tokens: MAX_ANSWER_TOKENS + 1, ..MockOptions::default() };
        assert!(too_long.validate().is_err());
    }
}
