//! Configuration: `sheepdog.toml` parsed into raw serde types, then validated into [`Config`].
//!
//! Owns the file format, `${VAR}` interpolation, defaults and validation errors that name the key and the line.
//! Does no I/O beyond reading the file and the environment; builds no runtime state.

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use sheepdog_policy::balance::Strategy;
use sheepdog_policy::pricing::{Multiplier, Pricing, Rate};

mod base_url;
mod pg_url;
mod policies;
mod raw;
mod secret;
#[cfg(test)]
mod tests;
mod validate;

pub use base_url::BaseUrl;
pub use pg_url::PgUrl;
pub use policies::{parse_key_hash, BudgetConfig, ClientConfig, Period, RouteConfig, StateBackend, StateConfig};
pub use secret::{format_key_hash, hash_client_key, hashes_equal, secret_matches, Secret};

/// A configuration mistake: the file, the line (when known), the key path and what is wrong.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// The file the mistake is in (`<embedded demo>` or `<string>` when not from a file).
    pub file: String,
    /// 1-based line of the offending value, when known.
    pub line: Option<usize>,
    /// Key path such as `endpoints[1].api_keys` (empty for a syntax error).
    pub key: String,
    /// What is wrong.
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.line {
            Some(l) => write!(f, "{}:{}: ", self.file, l)?,
            None => write!(f, "{}: ", self.file)?,
        }
        if !self.key.is_empty() {
            write!(f, "{}: ", self.key)?;
        }
        f.write_str(&self.message)
    }
}

impl std::error::Error for ConfigError {}

/// The validated configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// `[server]`.
    pub server: ServerConfig,
    /// `[health]`.
    pub health: HealthConfig,
    /// `[breaker]`.
    pub breaker: BreakerSettings,
    /// `[retry]`.
    pub retry: RetryConfig,
    /// `[log]`: the persistent request log.
    pub log: LogConfig,
    /// `[[endpoints]]`, in file order.
    pub endpoints: Vec<EndpointConfig>,
    /// `[[models]]`, in file order.
    pub models: Vec<ModelConfig>,
    /// `[[budgets]]`, in file order.
    pub budgets: Vec<BudgetConfig>,
    /// `[[routes]]`, in file order (the order rules are tried in).
    pub routes: Vec<RouteConfig>,
    /// `[[clients]]`; none: anonymous requests (on a loopback address, or with `allow_anonymous`).
    pub clients: Vec<ClientConfig>,
    /// `[state]`.
    pub state: StateConfig,
}

/// `[server]`.
#[derive(Debug, Clone, PartialEq)]
pub struct ServerConfig {
    /// Address to listen on.
    pub listen: String,
    /// Protects `/admin/*` when set.
    pub admin_key: Option<Secret>,
    /// Largest accepted request body (413 above).
    pub max_body_bytes: usize,
    /// Largest request head (request line and headers); the header count limit follows from it.
    pub max_header_bytes: usize,
    /// Open client connections at most; 0: derived from the process's file limit at start.
    pub max_connections: usize,
    /// Serve requests without a client key on a non-loopback address.
    pub allow_anonymous: bool,
    /// Time to receive a whole request (head and body); then 408.
    pub client_timeout: Duration,
    /// `/v1/*` requests in flight at most, open streams included; past it 503 `overloaded`.
    pub max_concurrent_requests: usize,
    /// A stream is ended after this long.
    pub max_stream_duration: Duration,
}

/// `[log]`: the persistent request log (one row per answered client request, in SQLite or PostgreSQL).
#[derive(Debug, Clone, PartialEq)]
pub struct LogConfig {
    /// Whether requests are logged.
    pub enabled: bool,
    /// The SQLite file; a relative path is taken from the config file's directory.
    pub path: PathBuf,
    /// Rows older than this are deleted (zero keeps everything).
    pub retention: Duration,
    /// A PostgreSQL URL: the log goes there instead of the SQLite file.
    pub url: Option<PgUrl>,
    /// Rows the queue to the writer holds before new ones are dropped.
    pub queue_capacity: usize,
    /// Keep prompt and completion text in the log.
    pub bodies: bool,
}

/// How an endpoint is probed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ProbeKind {
    /// A tiny completion (or embedding, for embedding models).
    Chat,
    /// `GET /models`; the model must be listed.
    Models,
    /// `GET probe_path`; any 2xx.
    Http,
}

/// `[health]`.
#[derive(Debug, Clone, PartialEq)]
pub struct HealthConfig {
    /// Probe interval while traffic flows or an endpoint is unwell.
    pub interval: Duration,
    /// Probe interval when idle and healthy.
    pub idle_interval: Duration,
    /// Timeout of one probe.
    pub timeout: Duration,
    /// Kind of probe.
    pub probe: ProbeKind,
    /// Path for `probe = "http"`, relative to the endpoint's host.
    pub probe_path: String,
    /// Prompt of chat probes.
    pub probe_prompt: String,
    /// Checks kept per endpoint and model.
    pub history: usize,
    /// Success rate over the recent window below which a pair is degraded.
    pub min_success_rate: f64,
    /// Window over which a recovered endpoint's share ramps up to its full weight.
    pub slow_start: Duration,
}

/// `[breaker]`.
#[derive(Debug, Clone, PartialEq)]
pub struct BreakerSettings {
    /// Consecutive failures that open the breaker.
    pub failure_threshold: u32,
    /// Open -> half-open after this long (grows while it keeps failing).
    pub recovery_timeout: Duration,
    /// Cap of the growing recovery timeout.
    pub max_recovery_timeout: Duration,
    /// Consecutive successes in half-open that close it.
    pub success_threshold: u32,
    /// Trial requests admitted at once in half-open.
    pub half_open_max_trials: u32,
}

/// `[retry]`.
#[derive(Debug, Clone, PartialEq)]
pub struct RetryConfig {
    /// Upstream attempts per request, fallback models included.
    pub max_attempts: u32,
    /// Base of the exponential backoff.
    pub backoff_base: Duration,
    /// Cap of the backoff.
    pub backoff_max: Duration,
    /// A request gives up after this.
    pub deadline: Duration,
    /// How long a request may wait for a candidate to recover when none can serve.
    pub queue_timeout: Duration,
}

/// One `[[endpoints]]` entry.
#[derive(Debug, Clone, PartialEq)]
pub struct EndpointConfig {
    /// Unique name.
    pub name: String,
    /// Base URL including the API prefix, e.g. `https://api.example.com/v1`.
    pub base_url: String,
    /// Keys used in rotation (may be empty for keyless upstreams).
    pub api_keys: Vec<Secret>,
    /// Weight for the weighted strategies.
    pub weight: u32,
    /// Lower is preferred, for `strategy = "priority"`.
    pub priority: i32,
    /// Above this a success counts as degraded.
    pub max_latency_ms: u64,
    /// What this endpoint bills relative to the list price (a relay at 15 % of list: 0.15).
    pub price_multiplier: f64,
    /// TCP (and TLS) connect timeout.
    pub connect_timeout: Duration,
    /// Until the first byte of the answer.
    pub first_byte_timeout: Duration,
    /// Whole request.
    pub timeout: Duration,
    /// Public model name -> upstream model name, in file order.
    pub models: Vec<(String, String)>,
}

/// What a model serves, which decides how it is probed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ModelKind {
    /// Chat completions.
    Chat,
    /// Embeddings.
    Embeddings,
}

/// When a hedged second attempt starts.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum HedgeAfter {
    /// After a fixed delay.
    Fixed(Duration),
    /// After the 95th percentile latency of the first endpoint (no hedge until it has history).
    P95,
}

/// One `[[models]]` entry.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelConfig {
    /// Public model name.
    pub name: String,
    /// Price of input tokens, USD per million.
    pub input_usd_per_mtok: f64,
    /// Price of output tokens, USD per million.
    pub output_usd_per_mtok: f64,
    /// Price of prompt tokens served from the upstream's cache, USD per million (default: the input price).
    pub cached_input_usd_per_mtok: Option<f64>,
    /// Load-balancing strategy.
    pub strategy: Strategy,
    /// Models tried, in order, when no endpoint of this one can serve.
    pub fallbacks: Vec<String>,
    /// Chat or embeddings.
    pub kind: ModelKind,
    /// A static answer given, marked as such, when nothing can serve.
    pub static_fallback: Option<String>,
    /// Hedged requests: start a second attempt elsewhere when the first is this late.
    pub hedge_after: Option<HedgeAfter>,
}

impl ModelConfig {
    /// The prices of this model as exact integers (validated at load: finite and non-negative).
    pub fn pricing(&self) -> Pricing {
        let rate = |usd: f64| Rate::from_usd_per_mtok(usd).unwrap_or_default();
        let input = rate(self.input_usd_per_mtok);
        Pricing {
            input,
            output: rate(self.output_usd_per_mtok),
            cached_input: self.cached_input_usd_per_mtok.map_or(input, rate),
        }
    }
}

impl EndpointConfig {
    /// What this endpoint bills relative to list price, as an exact integer (validated at load).
    pub fn multiplier(&self) -> Multiplier {
        Multiplier::from_factor(self.price_multiplier).unwrap_or_default()
    }
}

impl Config {
    /// The model entry named `name`.
    pub fn model(&self, name: &str) -> Option<&ModelConfig> {
        self.models.iter().find(|m| m.name == name)
    }

    /// The route aliases (the `model` of `[[routes]]`), each once, in file order.
    pub fn aliases(&self) -> Vec<&str> {
        let mut out: Vec<&str> = Vec::new();
        for r in &self.routes {
            if !out.contains(&r.model.as_str()) {
                out.push(&r.model);
            }
        }
        out
    }
}

/// Where to read the environment from (the process's, or a map in tests).
pub trait Env {
    /// The value of variable `name`, if set.
    fn var(&self, name: &str) -> Option<String>;
}

/// The process environment.
pub struct ProcessEnv;

impl Env for ProcessEnv {
    fn var(&self, name: &str) -> Option<String> {
        std::env::var(name).ok()
    }
}

impl<F: Fn(&str) -> Option<String>> Env for F {
    fn var(&self, name: &str) -> Option<String> {
        self(name)
    }
}

/// Read and validate a config file with the process environment.
pub fn load_file(path: &Path) -> Result<Config, ConfigError> {
    let file = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
        file: file.clone(),
        line: None,
        key: String::new(),
        message: format!("cannot read: {e}"),
    })?;
    let mut config = parse(&text, &file, &ProcessEnv)?;
    if config.log.path.is_relative() {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            config.log.path = dir.join(&config.log.path);
        }
    }
    Ok(config)
}

/// The config file to use: `--config`, else `./sheepdog.toml` when it exists, else none (embedded demo).
pub fn locate(explicit: Option<&Path>) -> Option<PathBuf> {
    if let Some(p) = explicit {
        return Some(p.to_path_buf());
    }
    let default = PathBuf::from("sheepdog.toml");
    default.exists().then_some(default)
}

/// Parse and validate config text; `file` names it in errors.
pub fn parse(text: &str, file: &str, env: &dyn Env) -> Result<Config, ConfigError> {
    let raw: raw::RawConfig = toml::from_str(text).map_err(|e| ConfigError {
        file: file.to_string(),
        line: e.span().map(|s| line_of(text, s.start)),
        key: String::new(),
        message: e.message().trim().to_string(),
    })?;
    validate::Validator { text, file, env }.config(raw)
}

pub(crate) fn line_of(text: &str, offset: usize) -> usize {
    let end = offset.min(text.len());
    text.as_bytes()[..end].iter().filter(|&&b| b == b'\n').count() + 1
}

/// Replace every `${VAR}` in `s` with the variable's value; an unset variable is an error naming it.
pub fn interpolate(s: &str, env: &dyn Env) -> Result<String, String> {
    if !s.contains("${") {
        return Ok(s.to_string());
    }
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(start) = rest.find("${") {
        out.push_str(&rest[..start]);
        let after = &rest[start + 2..];
        let Some(end) = after.find('}') else {
            return Err("unterminated `${` (write `${NAME}`)".to_string());
        };
        let name = &after[..end];
        if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
            return Err(format!("invalid variable name {name:?} in `${{…}}`"));
        }
        match env.var(name) {
            Some(v) => out.push_str(&v),
            None => return Err(format!("environment variable {name} is not set")),
        }
        rest = &after[end + 1..];
    }
    out.push_str(rest);
    Ok(out)
}

/// The request log's file when `log.path` is not set (and `sheepdog report`'s default).
pub const DEFAULT_LOG_PATH: &str = "sheepdog.db";

/// `[log] queue_capacity` by default: about 20 s of traffic at 3,000 requests/s.
pub const DEFAULT_LOG_QUEUE_CAPACITY: usize = 65_536;

/// Parse a duration such as `500ms`, `5s`, `2m`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let t = s.trim();
    if t == "0" {
        return Ok(Duration::ZERO);
    }
    humantime::parse_duration(t)
        .map_err(|e| format!("invalid duration {s:?} ({e}); write e.g. \"500ms\", \"5s\", \"2m\""))
}
