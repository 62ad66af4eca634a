//! A small load generator for the benchmark harness and CI: `cargo run --release --example loadgen -- --help`.
//!
//! - `stream`: N concurrent chat streams opened at once; time to first token and how late every later chunk
//!   arrives against the server's pacing, as JSON. A thousand streams need a thousand file descriptors: the
//!   harness runs `ulimit -n 65536` first (loadgen warns when the soft limit is too low).
//! - `send`: exactly N requests of one body over C kept-alive connections, closed loop; fails on any answer
//!   but 200 (`bench/instructions.sh` counts the instructions they cost the server).
//! - `smoke`: the CI overhead check. Closed-loop load straight to a `sheepdog mock` and through `sheepdog serve`
//!   in alternating rounds; fails when sheepdog's added median latency exceeds `--max-ratio` times the direct
//!   median, a ratio measured within one run, never an absolute time.
//!
//! Plain HTTP/1.1 only: one connection per worker or stream, kept alive, with TCP_NODELAY.

use std::collections::BTreeMap;
use std::error::Error;
use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use clap::{Args, Parser, Subcommand};
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1;
use hyper::header::{HeaderName, HeaderValue, CONTENT_TYPE, HOST};
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use serde::{Deserialize, Serialize};
use serde_json::json;
use tokio::net::TcpStream;
use tokio::sync::Notify;

type BoxError = Box<dyn Error + Send + Sync>;
type Sender = http1::SendRequest<Full<Bytes>>;

/// Load generator for sheepdog benchmarks and the CI overhead check.
#[derive(Parser, Debug)]
#[command(name = "loadgen")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Open N streaming chat requests at once; report TTFT and chunk lateness as JSON.
    Stream(StreamArgs),
    /// Send exactly N requests of one body over C connections; fail on any answer but 200.
    Send(SendArgs),
    /// CI overhead check: sheepdog's added p50 latency against a direct mock, as a ratio.
    Smoke(SmokeArgs),
}

#[derive(Args, Debug)]
struct SendArgs {
    /// URL to POST to, e.g. http://127.0.0.1:18180/v1/chat/completions.
    #[arg(long)]
    url: String,
    /// Requests in all.
    #[arg(long)]
    requests: usize,
    /// Concurrent kept-alive connections (closed loop).
    #[arg(long, default_value_t = 4)]
    connections: usize,
    /// File holding the request body (JSON).
    #[arg(long)]
    body: PathBuf,
    /// Extra request header `name: value` (repeatable).
    #[arg(long = "header")]
    headers: Vec<String>,
}

#[derive(Args, Debug)]
struct StreamArgs {
    /// Chat completions URL, e.g. http://127.0.0.1:18200/v1/chat/completions.
    #[arg(long)]
    url: String,
    /// Concurrent streams, all opened at once, each on its own connection.
    #[arg(long)]
    streams: usize,
    /// The server's interval between chunks (1000 / tokens per second): the baseline of lateness.
    #[arg(long)]
    interval_ms: f64,
    /// `max_tokens` of every request, i.e. content chunks per stream.
    #[arg(long, default_value_t = 200)]
    chunks: u32,
    /// Model of every request.
    #[arg(long, default_value = "gpt-4.1")]
    model: String,
    /// Extra request header `name: value` (repeatable).
    #[arg(long = "header")]
    headers: Vec<String>,
    /// Also write the JSON result to this file.
    #[arg(long)]
    out: Option<PathBuf>,
    /// Once every stream has its first chunk, read VmRSS of this process (the server under test).
    #[arg(long)]
    hold_pid: Option<u32>,
    /// Ask for the stream's usage (`stream_options.include_usage`), so the gateway hides nothing.
    #[arg(long)]
    include_usage: bool,
    /// Give up on a stream after this many seconds.
    #[arg(long, default_value_t = 300.0)]
    timeout_s: f64,
}

#[derive(Args, Debug)]
struct SmokeArgs {
    /// The sheepdog binary under test, e.g. target/release/sheepdog.
    #[arg(long)]
    sheepdog: PathBuf,
    /// Seconds of load per round and side.
    #[arg(long, default_value_t = 2.0)]
    seconds: f64,
    /// Measured rounds (direct, then through sheepdog); the medians across rounds are compared.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Concurrent connections of the closed loop.
    #[arg(long, default_value_t = 8)]
    connections: usize,
    /// Fail when sheepdog's added p50 exceeds this many times the direct p50.
    #[arg(long, default_value_t = 3.0)]
    max_ratio: f64,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let rt = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("loadgen: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = rt.block_on(async {
        match cli.command {
            Cmd::Stream(a) => stream_cmd(a).await,
            Cmd::Send(a) => send_cmd(a).await,
            Cmd::Smoke(a) => until_signal(smoke_cmd(a)).await,
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("loadgen: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Runs `work` until it ends or SIGINT/SIGTERM arrives; either way its locals (child guards) are dropped.
async fn until_signal(work: impl std::future::Future<Output = Result<(), BoxError>>) -> Result<(), BoxError> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    tokio::select! {
        r = work => r,
        _ = term.recv() => Err("interrupted (SIGTERM)".into()),
        _ = int.recv() => Err("interrupted (SIGINT)".into()),
    }
}

// ---------------------------------------------------------------------------------------------------------
// HTTP

/// Where requests go: the address to connect to, the `Host` header and the request path.
#[derive(Debug, Clone)]
struct Target {
    addr: String,
    host: String,
    path: String,
}

impl Target {
    fn parse(url: &str) -> Result<Target, BoxError> {
        let uri: hyper::Uri = url.parse().map_err(|e| format!("bad URL {url}: {e}"))?;
        if uri.scheme_str() != Some("http") {
            return Err(format!("only http:// URLs are supported, got {url}").into());
        }
        let authority = uri.authority().ok_or_else(|| format!("no host in {url}"))?;
        Ok(Target {
            addr: format!("{}:{}", authority.host(), authority.port_u16().unwrap_or(80)),
            host: authority.as_str().to_owned(),
            path: uri.path_and_query().map_or("/", |p| p.as_str()).to_owned(),
        })
    }

    fn request(&self, method: Method, headers: &[(HeaderName, HeaderValue)], body: Bytes) -> Request<Full<Bytes>> {
        let mut req = Request::new(Full::new(body));
        *req.method_mut() = method;
        // Origin-form: hyper writes the URI as given.
        if let Ok(uri) = self.path.parse() {
            *req.uri_mut() = uri;
        }
        let h = req.headers_mut();
        if let Ok(host) = HeaderValue::from_str(&self.host) {
            h.insert(HOST, host);
        }
        h.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        for (k, v) in headers {
            h.insert(k.clone(), v.clone());
        }
        req
    }
}

/// One HTTP/1.1 keep-alive connection with TCP_NODELAY; its driver runs on a spawned task.
async fn connect(addr: &str) -> Result<Sender, String> {
    let tcp = TcpStream::connect(addr).await.map_err(|e| connect_error(addr, &e))?;
    tcp.set_nodelay(true).map_err(|e| format!("TCP_NODELAY on {addr}: {e}"))?;
    let (sender, conn) =
        http1::handshake(TokioIo::new(tcp)).await.map_err(|e| format!("HTTP handshake with {addr}: {e}"))?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(sender)
}

/// A connect error in words, with the fix for the usual limits.
fn connect_error(addr: &str, e: &io::Error) -> String {
    match e.raw_os_error() {
        // EMFILE / ENFILE
        Some(23 | 24) => format!(
            "connect to {addr}: too many open files (soft limit {}); run `ulimit -n 65536` before loadgen",
            nofile_soft_limit().map_or_else(|| "unknown".to_owned(), |n| n.to_string())
        ),
        // EADDRNOTAVAIL
        Some(99) => format!("connect to {addr}: no free local port left ({e})"),
        _ => format!("connect to {addr}: {e}"),
    }
}

/// The soft limit of open files of this process (`None` = unknown or unlimited), read once: when the limit
/// is hit, reading /proc needs a file descriptor too.
fn nofile_soft_limit() -> Option<u64> {
    static LIMIT: OnceLock<Option<u64>> = OnceLock::new();
    *LIMIT.get_or_init(read_nofile_soft_limit)
}

fn read_nofile_soft_limit() -> Option<u64> {
    let limits = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    line.split_whitespace().nth(3)?.parse().ok()
}

/// Sends one request on `sender` and reads the whole answer: (status, body).
async fn exchange(sender: &mut Sender, req: Request<Full<Bytes>>) -> Result<(StatusCode, Bytes), String> {
    sender.ready().await.map_err(|e| format!("connection closed: {e}"))?;
    let resp = sender.send_request(req).await.map_err(|e| format!("request failed: {e}"))?;
    let status = resp.status();
    let body = resp.into_body().collect().await.map_err(|e| format!("reading the answer failed: {e}"))?;
    Ok((status, body.to_bytes()))
}

/// The start of a body, for error messages.
fn snippet(body: &[u8]) -> String {
    let text = String::from_utf8_lossy(body);
    let mut s: String = text.chars().take(200).collect();
    if text.chars().count() > 200 {
        s.push('…');
    }
    s
}

/// Parses `name: value` headers.
fn parse_headers(raw: &[String]) -> Result<Vec<(HeaderName, HeaderValue)>, BoxError> {
    raw.iter()
        .map(|h| {
            let (k, v) = h.split_once(':').ok_or_else(|| format!("header {h:?} is not `name: value`"))?;
            let name = HeaderName::from_bytes(k.trim().as_bytes()).map_err(|e| format!("header {h:?}: {e}"))?;
            let value = HeaderValue::from_str(v.trim()).map_err(|e| format!("header {h:?}: {e}"))?;
            Ok((name, value))
        })
        .collect()
}

// ---------------------------------------------------------------------------------------------------------
// Statistics

/// Nearest-rank percentile `q` (0..=1) of sorted values.
fn percentile(sorted: &[f64], q: f64) -> Option<f64> {
    if sorted.is_empty() {
        return None;
    }
    let rank = (q * sorted.len() as f64).ceil() as usize;
    Some(sorted[rank.clamp(1, sorted.len()) - 1])
}

fn median(values: &[f64]) -> Option<f64> {
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    let n = v.len();
    match n {
        0 => None,
        _ if n % 2 == 1 => Some(v[n / 2]),
        _ => Some((v[n / 2 - 1] + v[n / 2]) / 2.0),
    }
}

/// A number rounded to 3 decimals (`None` becomes `null` in the JSON).
fn round3(v: Option<f64>) -> Option<f64> {
    v.map(|x| (x * 1000.0).round() / 1000.0)
}

fn millis(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

// ---------------------------------------------------------------------------------------------------------
// stream

/// What every stream task shares.
struct StreamPlan {
    target: Target,
    headers: Vec<(HeaderName, HeaderValue)>,
    body: Bytes,
    interval: Duration,
    timeout: Duration,
}

/// Counts streams that got their first chunk (or ended without one); wakes the RSS reader when all have.
struct Progress {
    settled: AtomicUsize,
    total: usize,
    all: Notify,
}

impl Progress {
    async fn wait_all(&self) {
        while self.settled.load(Ordering::Acquire) < self.total {
            self.all.notified().await;
        }
    }
}

/// Marks one stream settled exactly once: at its first chunk, or when dropped.
struct Settle {
    progress: Arc<Progress>,
    done: bool,
}

impl Settle {
    fn now(&mut self) {
        if !self.done {
            self.done = true;
            if self.progress.settled.fetch_add(1, Ordering::AcqRel) + 1 >= self.progress.total {
                self.progress.all.notify_one();
            }
        }
    }
}

impl Drop for Settle {
    fn drop(&mut self) {
        self.now();
    }
}

/// The JSON result of `stream` (fields in this order).
#[derive(Serialize)]
struct StreamReport {
    streams: usize,
    ok: usize,
    errors: usize,
    /// Content events received, all streams together.
    chunks: usize,
    /// TCP connect time per stream (not part of TTFT); 1 s and more means dropped SYNs (a full listen queue).
    connect_ms: TailReport,
    ttft_ms: TtftReport,
    lateness_ms: TailReport,
    /// Per-chunk transit time, upstream write to client read (only with an upstream that stamps its chunks,
    /// `sheepdog mock --stamp`; same machine, same clock).
    #[serde(skip_serializing_if = "Option::is_none")]
    transit_ms: Option<TailReport>,
    wall_s: Option<f64>,
    /// VmRSS of `--hold-pid` once every stream had its first chunk.
    #[serde(skip_serializing_if = "Option::is_none")]
    rss_kb_at_full_concurrency: Option<u64>,
}

#[derive(Serialize)]
struct TtftReport {
    p50: Option<f64>,
    p90: Option<f64>,
    p99: Option<f64>,
    max: Option<f64>,
}

/// Percentiles of `stream` for many samples (lateness, connect time).
#[derive(Serialize)]
struct TailReport {
    p50: Option<f64>,
    p99: Option<f64>,
    p999: Option<f64>,
    max: Option<f64>,
}

/// What one stream measured.
#[derive(Default)]
struct StreamOutcome {
    connect_ms: Option<f64>,
    ttft_ms: Option<f64>,
    lateness_ms: Vec<f64>,
    transit_ms: Vec<f64>,
    content: usize,
    error: Option<String>,
}

#[derive(Deserialize)]
struct ChunkIn {
    #[serde(default)]
    choices: Vec<ChoiceIn>,
    /// `sheepdog mock --stamp`: when the upstream wrote the chunk, Unix microseconds.
    #[serde(default)]
    sent_at_us: Option<u64>,
}

#[derive(Deserialize)]
struct ChoiceIn {
    #[serde(default)]
    delta: Option<DeltaIn>,
}

#[derive(Deserialize)]
struct DeltaIn {
    #[serde(default)]
    content: Option<String>,
}

/// For an SSE event (without its blank line) that is a `data:` chunk with non-empty delta content: its
/// `sent_at_us` stamp, if it has one. `None` for any other event.
fn content_event(event: &[u8]) -> Option<Option<u64>> {
    event.split(|b| *b == b'\n').find_map(|line| {
        let data = line.strip_prefix(b"data:")?.trim_ascii();
        if data == b"[DONE]" {
            return None;
        }
        let c = serde_json::from_slice::<ChunkIn>(data).ok()?;
        c.choices
            .iter()
            .any(|ch| ch.delta.as_ref().and_then(|d| d.content.as_deref()).is_some_and(|s| !s.is_empty()))
            .then_some(c.sent_at_us)
    })
}

fn unix_us() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_micros() as u64)
}

async fn stream_cmd(a: StreamArgs) -> Result<(), BoxError> {
    if a.streams == 0 {
        return Err("--streams must be at least 1".into());
    }
    if !a.interval_ms.is_finite() || a.interval_ms < 0.0 {
        return Err("--interval-ms must be a number >= 0".into());
    }
    if !a.timeout_s.is_finite() || a.timeout_s <= 0.0 {
        return Err("--timeout-s must be a number > 0".into());
    }
    // Read now, while file descriptors are free.
    let needed = a.streams as u64 + 64;
    if let Some(limit) = nofile_soft_limit().filter(|l| *l < needed) {
        eprintln!(
            "loadgen: warning: the soft limit of open files is {limit}, {} streams need about {needed}; \
             run `ulimit -n 65536` first or connections beyond the limit fail",
            a.streams
        );
    }
    let mut body = json!({
        "model": a.model,
        "stream": true,
        "max_tokens": a.chunks,
        "messages": [{"role": "user", "content": "Tell me a long story, piece by piece."}],
    });
    if a.include_usage {
        body["stream_options"] = json!({"include_usage": true});
    }
    let plan = Arc::new(StreamPlan {
        target: Target::parse(&a.url)?,
        headers: parse_headers(&a.headers)?,
        body: Bytes::from(body.to_string()),
        interval: Duration::from_secs_f64(a.interval_ms / 1000.0),
        timeout: Duration::from_secs_f64(a.timeout_s),
    });
    let progress = Arc::new(Progress { settled: AtomicUsize::new(0), total: a.streams, all: Notify::new() });

    let started = Instant::now();
    let rss = a.hold_pid.map(|pid| {
        let progress = progress.clone();
        tokio::spawn(async move {
            progress.wait_all().await;
            let rss = read_rss_kb(pid);
            eprintln!(
                "loadgen: all streams started after {:.2} s; VmRSS of {pid}: {}",
                started.elapsed().as_secs_f64(),
                rss.as_ref().map_or_else(Clone::clone, |kb| format!("{kb} kB"))
            );
            rss
        })
    });
    let tasks: Vec<_> = (0..a.streams).map(|_| tokio::spawn(one_stream(plan.clone(), progress.clone()))).collect();
    let mut outcomes = Vec::with_capacity(tasks.len());
    for t in tasks {
        outcomes.push(t.await?);
    }
    let wall = started.elapsed();
    let rss = match rss {
        Some(task) => Some(task.await?.map_err(|e| format!("--hold-pid: {e}"))?),
        None => None,
    };

    let mut connect: Vec<f64> = outcomes.iter().filter_map(|o| o.connect_ms).collect();
    let mut ttft: Vec<f64> = outcomes.iter().filter_map(|o| o.ttft_ms).collect();
    connect.sort_by(f64::total_cmp);
    let mut lateness: Vec<f64> = outcomes.iter().flat_map(|o| o.lateness_ms.iter().copied()).collect();
    let mut transit: Vec<f64> = outcomes.iter().flat_map(|o| o.transit_ms.iter().copied()).collect();
    ttft.sort_by(f64::total_cmp);
    lateness.sort_by(f64::total_cmp);
    transit.sort_by(f64::total_cmp);
    let mut errors: BTreeMap<&str, usize> = BTreeMap::new();
    for e in outcomes.iter().filter_map(|o| o.error.as_deref()) {
        *errors.entry(e).or_default() += 1;
    }
    for (e, n) in &errors {
        eprintln!("loadgen: {n} stream(s) failed: {e}");
    }
    let n_err: usize = errors.values().sum();
    let report = StreamReport {
        streams: a.streams,
        ok: a.streams - n_err,
        errors: n_err,
        chunks: outcomes.iter().map(|o| o.content).sum(),
        connect_ms: TailReport {
            p50: round3(percentile(&connect, 0.5)),
            p99: round3(percentile(&connect, 0.99)),
            p999: round3(percentile(&connect, 0.999)),
            max: round3(connect.last().copied()),
        },
        ttft_ms: TtftReport {
            p50: round3(percentile(&ttft, 0.5)),
            p90: round3(percentile(&ttft, 0.9)),
            p99: round3(percentile(&ttft, 0.99)),
            max: round3(ttft.last().copied()),
        },
        lateness_ms: TailReport {
            p50: round3(percentile(&lateness, 0.5)),
            p99: round3(percentile(&lateness, 0.99)),
            p999: round3(percentile(&lateness, 0.999)),
            max: round3(lateness.last().copied()),
        },
        transit_ms: (!transit.is_empty()).then(|| TailReport {
            p50: round3(percentile(&transit, 0.5)),
            p99: round3(percentile(&transit, 0.99)),
            p999: round3(percentile(&transit, 0.999)),
            max: round3(transit.last().copied()),
        }),
        wall_s: round3(Some(wall.as_secs_f64())),
        rss_kb_at_full_concurrency: rss,
    };
    let text = serde_json::to_string(&report)?;
    println!("{text}");
    if let Some(path) = &a.out {
        std::fs::write(path, format!("{text}\n")).map_err(|e| format!("cannot write {}: {e}", path.display()))?;
    }
    Ok(())
}

/// VmRSS of a process in kB, from /proc/PID/status.
fn read_rss_kb(pid: u32) -> Result<u64, String> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .map_err(|e| format!("cannot read /proc/{pid}/status: {e}"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| format!("no VmRSS in /proc/{pid}/status"))
}

async fn one_stream(plan: Arc<StreamPlan>, progress: Arc<Progress>) -> StreamOutcome {
    let mut settle = Settle { progress, done: false };
    let mut out = StreamOutcome::default();
    let result = tokio::time::timeout(plan.timeout, run_stream(&plan, &mut out, &mut settle)).await;
    out.error = match result {
        Ok(Ok(())) => None,
        Ok(Err(e)) => Some(e),
        Err(_) => Some(format!("stream not finished after {:?}", plan.timeout)),
    };
    out
}

async fn run_stream(plan: &StreamPlan, out: &mut StreamOutcome, settle: &mut Settle) -> Result<(), String> {
    let connecting = Instant::now();
    let mut sender = connect(&plan.target.addr).await?;
    out.connect_ms = Some(millis(connecting.elapsed()));
    let req = plan.target.request(Method::POST, &plan.headers, plan.body.clone());
    let sent = Instant::now();
    let resp = sender.send_request(req).await.map_err(|e| format!("request failed: {e}"))?;
    let status = resp.status();
    let mut body = resp.into_body();
    if status != StatusCode::OK {
        let text = body.collect().await.map(|b| snippet(&b.to_bytes())).unwrap_or_default();
        return Err(format!("status {status}: {text}"));
    }
    let mut pending: Vec<u8> = Vec::new();
    let mut first: Option<Instant> = None;
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| format!("stream cut after {} content chunks: {e}", out.content))?;
        // Events that arrive in one read share its arrival time.
        let arrived = Instant::now();
        let arrived_us = unix_us();
        let Ok(data) = frame.into_data() else { continue };
        pending.extend_from_slice(&data);
        let mut consumed = 0;
        while let Some(end) = pending[consumed..].windows(2).position(|w| w == b"\n\n") {
            let event = &pending[consumed..consumed + end];
            consumed += end + 2;
            let Some(stamp) = content_event(event) else { continue };
            if let Some(sent) = stamp {
                out.transit_ms.push(arrived_us.saturating_sub(sent) as f64 / 1000.0);
            }
            out.content += 1;
            match first {
                None => {
                    first = Some(arrived);
                    out.ttft_ms = Some(millis(arrived - sent));
                    settle.now();
                }
                Some(t1) => {
                    let gaps = u32::try_from(out.content - 1).unwrap_or(u32::MAX);
                    let due = t1 + plan.interval * gaps;
                    let late = if arrived >= due { millis(arrived - due) } else { -millis(due - arrived) };
                    out.lateness_ms.push(late);
                }
            }
        }
        pending.drain(..consumed);
    }
    if out.content == 0 {
        return Err("stream ended without any content chunk".to_owned());
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------------------
// smoke

/// Child processes and a scratch directory: killed, waited for and removed when dropped, on every exit path.
struct Scratch {
    dir: PathBuf,
    children: Vec<(&'static str, Child)>,
}

impl Scratch {
    fn new() -> io::Result<Scratch> {
        let nanos = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.subsec_nanos());
        let dir = std::env::temp_dir().join(format!("sheepdog-smoke-{}-{nanos}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        Ok(Scratch { dir, children: Vec::new() })
    }

    /// Starts `program args` with stdout and stderr in `DIR/name.log`.
    fn spawn(&mut self, name: &'static str, program: &Path, args: &[&str]) -> Result<(), BoxError> {
        let log = File::create(self.log_path(name))?;
        let child = Command::new(program)
            .args(args)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .map_err(|e| format!("cannot start {}: {e}", program.display()))?;
        self.children.push((name, child));
        Ok(())
    }

    fn log_path(&self, name: &str) -> PathBuf {
        self.dir.join(format!("{name}.log"))
    }

    /// The last lines of a child's output.
    fn log_tail(&self, name: &str) -> String {
        let text = std::fs::read_to_string(self.log_path(name)).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }

    /// Fails when a child has exited.
    fn check_alive(&mut self) -> Result<(), BoxError> {
        let mut exited = None;
        for (name, child) in &mut self.children {
            if let Some(status) = child.try_wait()? {
                exited = Some((*name, status));
                break;
            }
        }
        match exited {
            Some((name, status)) => {
                Err(format!("{name} exited ({status}); its output:\n{}", self.log_tail(name)).into())
            }
            None => Ok(()),
        }
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        for (_, child) in &mut self.children {
            let _ = child.kill();
            let _ = child.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A free loopback port (bound, read, released; a tiny race is acceptable here).
fn free_ports() -> io::Result<(u16, u16)> {
    let a = std::net::TcpListener::bind("127.0.0.1:0")?;
    let b = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok((a.local_addr()?.port(), b.local_addr()?.port()))
}

/// Polls `GET /health` on `addr` until it answers 200, a child dies, or `patience` runs out.
async fn wait_healthy(scratch: &mut Scratch, name: &str, addr: &str, patience: Duration) -> Result<(), BoxError> {
    let target = Target { addr: addr.to_owned(), host: addr.to_owned(), path: "/health".to_owned() };
    let deadline = Instant::now() + patience;
    loop {
        scratch.check_alive()?;
        let attempt = async {
            let mut sender = connect(addr).await?;
            exchange(&mut sender, target.request(Method::GET, &[], Bytes::new())).await
        };
        let last = match tokio::time::timeout(Duration::from_secs(1), attempt).await {
            Ok(Ok((StatusCode::OK, _))) => return Ok(()),
            Ok(Ok((status, body))) => format!("status {status}: {}", snippet(&body)),
            Ok(Err(e)) => e,
            Err(_) => "no answer within 1 s".to_owned(),
        };
        if Instant::now() > deadline {
            return Err(format!("{name} on {addr} not healthy after {patience:?}: {last}").into());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// What one closed-loop phase measured.
struct Phase {
    /// Latency of every successful request, in microseconds, sorted.
    latencies_us: Vec<f64>,
    failures: usize,
    first_failure: Option<String>,
    elapsed: Duration,
}

impl Phase {
    fn rps(&self) -> f64 {
        self.latencies_us.len() as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }
}

/// `connections` workers send requests back to back to `target` for `duration`.
async fn closed_loop(target: &Target, body: &Bytes, connections: usize, duration: Duration) -> Phase {
    let mut senders = Vec::with_capacity(connections);
    let mut failures = 0;
    let mut first_failure = None;
    for _ in 0..connections {
        match connect(&target.addr).await {
            Ok(s) => senders.push(s),
            Err(e) => {
                failures += 1;
                first_failure.get_or_insert(e);
            }
        }
    }
    let started = Instant::now();
    let end = started + duration;
    let workers: Vec<_> = senders
        .into_iter()
        .map(|mut sender| {
            let target = target.clone();
            let body = body.clone();
            tokio::spawn(async move {
                let mut latencies = Vec::new();
                let mut failures = 0usize;
                let mut first_failure = None;
                while Instant::now() < end {
                    let req = target.request(Method::POST, &[], body.clone());
                    let t0 = Instant::now();
                    match exchange(&mut sender, req).await {
                        Ok((StatusCode::OK, _)) => latencies.push(t0.elapsed().as_secs_f64() * 1e6),
                        Ok((status, body)) => {
                            failures += 1;
                            first_failure.get_or_insert_with(|| format!("status {status}: {}", snippet(&body)));
                        }
                        Err(e) => {
                            failures += 1;
                            first_failure.get_or_insert(e);
                            break;
                        }
                    }
                }
                (latencies, failures, first_failure)
            })
        })
        .collect();
    let mut latencies_us = Vec::new();
    for w in workers {
        match w.await {
            Ok((l, f, first)) => {
                latencies_us.extend(l);
                failures += f;
                if let Some(e) = first {
                    first_failure.get_or_insert(e);
                }
            }
            Err(e) => {
                failures += 1;
                first_failure.get_or_insert(format!("worker failed: {e}"));
            }
        }
    }
    let elapsed = started.elapsed();
    latencies_us.sort_by(f64::total_cmp);
    Phase { latencies_us, failures, first_failure, elapsed }
}

async fn send_cmd(a: SendArgs) -> Result<(), BoxError> {
    let target = Target::parse(&a.url)?;
    let headers = Arc::new(parse_headers(&a.headers)?);
    let body = Bytes::from(std::fs::read(&a.body).map_err(|e| format!("{}: {e}", a.body.display()))?);
    let left = Arc::new(AtomicUsize::new(a.requests));
    let mut workers = Vec::new();
    for _ in 0..a.connections.max(1) {
        let mut sender = connect(&target.addr).await?;
        let (target, headers, body, left) = (target.clone(), headers.clone(), body.clone(), left.clone());
        workers.push(tokio::spawn(async move {
            while left.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1)).is_ok() {
                match exchange(&mut sender, target.request(Method::POST, &headers, body.clone())).await? {
                    (StatusCode::OK, _) => {}
                    (status, body) => return Err(format!("status {status}: {}", snippet(&body))),
                }
            }
            Ok::<(), String>(())
        }));
    }
    for w in workers {
        w.await.map_err(|e| format!("worker failed: {e}"))??;
    }
    Ok(())
}

/// The ~1 KB chat request of the benchmark harness (bench/run.sh).
fn smoke_body() -> Bytes {
    let body = json!({
        "model": "gpt-4.1",
        "max_tokens": 64,
        "messages": [
            {"role": "system", "content": "You are a helpful assistant. ".repeat(8)},
            {"role": "user", "content": format!(
                "Summarise the following text in one sentence: {}",
                "lorem ipsum dolor sit amet ".repeat(22)
            )},
        ],
    });
    Bytes::from(body.to_string())
}

/// Per-side results across rounds.
#[derive(Default)]
struct Side {
    p50: Vec<f64>,
    p99: Vec<f64>,
    rps: Vec<f64>,
    failures: usize,
    first_failure: Option<String>,
}

impl Side {
    fn add(&mut self, phase: &Phase) {
        if let (Some(p50), Some(p99)) = (percentile(&phase.latencies_us, 0.5), percentile(&phase.latencies_us, 0.99)) {
            self.p50.push(p50);
            self.p99.push(p99);
        }
        self.rps.push(phase.rps());
        self.count_failures(phase);
    }

    fn count_failures(&mut self, phase: &Phase) {
        self.failures += phase.failures;
        if let Some(e) = &phase.first_failure {
            self.first_failure.get_or_insert_with(|| e.clone());
        }
    }
}

async fn smoke_cmd(a: SmokeArgs) -> Result<(), BoxError> {
    if !a.seconds.is_finite() || a.seconds <= 0.0 {
        return Err("--seconds must be a number > 0".into());
    }
    if a.rounds == 0 || a.connections == 0 {
        return Err("--rounds and --connections must be at least 1".into());
    }
    let mut scratch = Scratch::new()?;
    let (mock_port, gw_port) = free_ports()?;
    let mock_addr = format!("127.0.0.1:{mock_port}");
    let gw_addr = format!("127.0.0.1:{gw_port}");
    let config_path = scratch.dir.join("sheepdog.toml");
    let mut config = format!("[server]\nlisten = \"{gw_addr}\"\n\n");
    for name in ["a", "b", "c"] {
        config.push_str(&format!(
            "[[endpoints]]\nname = \"{name}\"\nbase_url = \"http://{mock_addr}/v1\"\napi_keys = [\"sk-smoke\"]\n\
             models = [\"gpt-4.1\"]\n\n"
        ));
    }
    config.push_str("[[models]]\nname = \"gpt-4.1\"\ninput_usd_per_mtok = 2.0\noutput_usd_per_mtok = 8.0\n");
    std::fs::write(&config_path, config)?;
    let config_arg = config_path.to_str().ok_or("temporary directory path is not UTF-8")?;

    let mock_args = ["mock", "--listen", &mock_addr, "--models", "gpt-4.1", "--tokens-per-sec", "0"];
    scratch.spawn("mock", &a.sheepdog, &mock_args)?;
    wait_healthy(&mut scratch, "mock", &mock_addr, Duration::from_secs(20)).await?;
    scratch.spawn("sheepdog", &a.sheepdog, &["serve", "--config", config_arg])?;
    wait_healthy(&mut scratch, "sheepdog", &gw_addr, Duration::from_secs(20)).await?;

    let path = "/v1/chat/completions".to_owned();
    let direct_target = Target { addr: mock_addr.clone(), host: mock_addr.clone(), path: path.clone() };
    let via_target = Target { addr: gw_addr.clone(), host: gw_addr.clone(), path };
    let body = smoke_body();
    let c = a.connections;
    let seconds = Duration::from_secs_f64(a.seconds);
    let (mut direct, mut via) = (Side::default(), Side::default());

    // Warm-up: connection pools, caches, the allocator.
    direct.count_failures(&closed_loop(&direct_target, &body, c, Duration::from_secs(1)).await);
    via.count_failures(&closed_loop(&via_target, &body, c, Duration::from_secs(1)).await);
    println!(
        "smoke: {} rounds of {:.1} s per side, {c} connections, ~{} byte requests",
        a.rounds,
        a.seconds,
        body.len()
    );
    for round in 1..=a.rounds {
        let d = closed_loop(&direct_target, &body, c, seconds).await;
        let v = closed_loop(&via_target, &body, c, seconds).await;
        scratch.check_alive()?;
        let show = |p: &Phase| {
            format!(
                "p50 {:>7.1} µs  p99 {:>7.1} µs  {:>7.0} req/s",
                percentile(&p.latencies_us, 0.5).unwrap_or(f64::NAN),
                percentile(&p.latencies_us, 0.99).unwrap_or(f64::NAN),
                p.rps()
            )
        };
        println!("  round {round}: direct {} | sheepdog {}", show(&d), show(&v));
        direct.add(&d);
        via.add(&v);
    }

    let failures = direct.failures + via.failures;
    if failures > 0 {
        let first = direct.first_failure.or(via.first_failure).unwrap_or_default();
        return Err(format!("{failures} request(s) failed; first: {first}").into());
    }
    let (Some(d50), Some(d99), Some(v50), Some(v99)) =
        (median(&direct.p50), median(&direct.p99), median(&via.p50), median(&via.p99))
    else {
        return Err("no request completed".into());
    };
    let (d_rps, v_rps) = (median(&direct.rps).unwrap_or(0.0), median(&via.rps).unwrap_or(0.0));
    let ratio = (v50 - d50) / d50;
    println!();
    println!("  median of rounds   p50 (µs)   p99 (µs)      req/s");
    println!("  direct            {d50:>9.1}  {d99:>9.1}  {d_rps:>9.0}");
    println!("  sheepdog          {v50:>9.1}  {v99:>9.1}  {v_rps:>9.0}");
    println!("  added             {:>9.1}  {:>9.1}", v50 - d50, v99 - d99);
    println!("  added p50 / direct p50 = {ratio:.2} (limit {:.2})", a.max_ratio);
    if ratio > a.max_ratio {
        return Err(format!(
            "overhead regression: sheepdog adds {:.1} µs at p50, {ratio:.2} times the direct p50 of {d50:.1} µs \
             (limit {:.2})",
            v50 - d50,
            a.max_ratio
        )
        .into());
    }
    println!("smoke: OK");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_use_nearest_rank() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&v, 0.5), Some(50.0));
        assert_eq!(percentile(&v, 0.99), Some(99.0));
        assert_eq!(percentile(&v, 1.0), Some(100.0));
        assert_eq!(percentile(&v, 0.0), Some(1.0));
        assert_eq!(percentile(&[], 0.5), None);
        assert_eq!(median(&[3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), Some(2.5));
    }

    fn is_content(event: &[u8]) -> bool {
        content_event(event).is_some()
    }

    #[test]
    fn content_events_are_recognised() {
        assert!(is_content(br#"data: {"choices":[{"delta":{"content":"Hi"}}]}"#));
        assert!(!is_content(br#"data: {"choices":[{"delta":{"role":"assistant","content":""}}]}"#));
        assert!(!is_content(br#"data: {"choices":[{"delta":{},"finish_reason":"stop"}]}"#));
        assert!(!is_content(br#"data: {"choices":[],"usage":{"completion_tokens":3}}"#));
        assert!(!is_content(b"data: [DONE]"));
        assert!(!is_content(b": keep-alive"));
        assert_eq!(content_event(br#"data: {"choices":[{"delta":{"content":"Hi"}}]}"#), Some(None));
        assert_eq!(content_event(br#"data: {"choices":[{"delta":{"content":"Hi"}}],"sent_at_us":42}"#), Some(Some(42)));
    }

    #[test]
    fn urls_become_targets() {
        let t = Target::parse("http://127.0.0.1:18200/v1/chat/completions").unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(t.addr, "127.0.0.1:18200");
        assert_eq!(t.path, "/v1/chat/completions");
        assert!(Target::parse("https://example.com/").is_err());
    }
}
