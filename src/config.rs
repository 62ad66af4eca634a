//! Configuration: `sheepdog.toml` parsed into raw serde types, then validated into [`Config`].
//!
//! Owns the file format, `${VAR}` interpolation, defaults and validation errors that name the key and the line.
//! Does no I/O beyond reading the file and the environment; builds no runtime state.

use std::collections::HashSet;
use std::fmt;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use toml::Spanned;

use crate::balance::Strategy;

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

/// An upstream API key. Its `Debug` and `Display` never show the value.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// Wrap a secret value.
    pub fn new(s: impl Into<String>) -> Self {
        Secret(s.into())
    }
    /// The secret itself, for the `Authorization` header only.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(***)")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

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
}

/// `[log]`: the persistent request log (one SQLite row per answered client request).
#[derive(Debug, Clone, PartialEq)]
pub struct LogConfig {
    /// Whether requests are logged.
    pub enabled: bool,
    /// The SQLite file; a relative path is taken from the config file's directory.
    pub path: PathBuf,
    /// Rows older than this are deleted (zero keeps everything).
    pub retention: Duration,
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

impl Config {
    /// The model entry named `name`.
    pub fn model(&self, name: &str) -> Option<&ModelConfig> {
        self.models.iter().find(|m| m.name == name)
    }
}

// ---------------------------------------------------------------------------------------------
// Raw file types.

type S = Spanned<String>;

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    #[serde(default)]
    server: RawServer,
    #[serde(default)]
    health: RawHealth,
    #[serde(default)]
    breaker: RawBreaker,
    #[serde(default)]
    retry: RawRetry,
    #[serde(default)]
    log: RawLog,
    #[serde(default)]
    endpoints: Vec<RawEndpoint>,
    #[serde(default)]
    models: Vec<RawModel>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawServer {
    listen: Option<S>,
    admin_key: Option<S>,
    max_body_bytes: Option<Spanned<i64>>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawHealth {
    interval: Option<S>,
    idle_interval: Option<S>,
    timeout: Option<S>,
    probe: Option<ProbeKind>,
    probe_path: Option<S>,
    probe_prompt: Option<S>,
    history: Option<Spanned<i64>>,
    min_success_rate: Option<Spanned<f64>>,
    slow_start: Option<S>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawBreaker {
    failure_threshold: Option<Spanned<i64>>,
    recovery_timeout: Option<S>,
    max_recovery_timeout: Option<S>,
    success_threshold: Option<Spanned<i64>>,
    half_open_max_trials: Option<Spanned<i64>>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawRetry {
    max_attempts: Option<Spanned<i64>>,
    backoff_base: Option<S>,
    backoff_max: Option<S>,
    deadline: Option<S>,
    queue_timeout: Option<S>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawLog {
    enabled: Option<bool>,
    path: Option<S>,
    retention: Option<S>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawEndpoint {
    name: Option<S>,
    base_url: Option<S>,
    #[serde(default)]
    api_keys: Vec<S>,
    weight: Option<Spanned<i64>>,
    priority: Option<Spanned<i64>>,
    max_latency_ms: Option<Spanned<i64>>,
    connect_timeout: Option<S>,
    first_byte_timeout: Option<S>,
    timeout: Option<S>,
    models: Option<Spanned<toml::Value>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawModel {
    name: Option<S>,
    input_usd_per_mtok: Option<Spanned<f64>>,
    output_usd_per_mtok: Option<Spanned<f64>>,
    strategy: Option<S>,
    #[serde(default)]
    fallbacks: Vec<S>,
    kind: Option<ModelKind>,
    static_fallback: Option<S>,
    hedge_after: Option<S>,
}

// ---------------------------------------------------------------------------------------------
// Loading.

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
    let raw: RawConfig = toml::from_str(text).map_err(|e| ConfigError {
        file: file.to_string(),
        line: e.span().map(|s| line_of(text, s.start)),
        key: String::new(),
        message: e.message().trim().to_string(),
    })?;
    Validator { text, file, env }.config(raw)
}

fn line_of(text: &str, offset: usize) -> usize {
    let end = offset.min(text.len());
    text.as_bytes()[..end].iter().filter(|&&b| b == b'\n').count() + 1
}

struct Validator<'a> {
    text: &'a str,
    file: &'a str,
    env: &'a dyn Env,
}

impl Validator<'_> {
    fn err(&self, span: Option<Range<usize>>, key: impl Into<String>, msg: impl Into<String>) -> ConfigError {
        ConfigError {
            file: self.file.to_string(),
            line: span.map(|s| line_of(self.text, s.start)),
            key: key.into(),
            message: msg.into(),
        }
    }

    /// `${VAR}` interpolation of one string value.
    fn string(&self, s: &S, key: &str) -> Result<String, ConfigError> {
        interpolate(s.get_ref(), self.env).map_err(|m| self.err(Some(s.span()), key, m))
    }

    fn opt_string(&self, s: &Option<S>, key: &str, default: &str) -> Result<String, ConfigError> {
        match s {
            Some(s) => self.string(s, key),
            None => Ok(default.to_string()),
        }
    }

    fn duration(&self, s: &Option<S>, key: &str, default: Duration) -> Result<Duration, ConfigError> {
        let Some(s) = s else { return Ok(default) };
        let v = self.string(s, key)?;
        parse_duration(&v).map_err(|m| self.err(Some(s.span()), key, m))
    }

    fn int(&self, v: &Option<Spanned<i64>>, key: &str, default: i64, min: i64, max: i64) -> Result<i64, ConfigError> {
        let Some(v) = v else { return Ok(default) };
        let n = *v.get_ref();
        if n < min || n > max {
            return Err(self.err(Some(v.span()), key, format!("must be between {min} and {max}, got {n}")));
        }
        Ok(n)
    }

    fn config(&self, raw: RawConfig) -> Result<Config, ConfigError> {
        let server = ServerConfig {
            listen: self.opt_string(&raw.server.listen, "server.listen", "127.0.0.1:8080")?,
            admin_key: match &raw.server.admin_key {
                Some(s) => {
                    let k = self.string(s, "server.admin_key")?.trim().to_string();
                    if k.is_empty() {
                        return Err(self.err(Some(s.span()), "server.admin_key", "is empty"));
                    }
                    Some(Secret(k))
                }
                None => None,
            },
            max_body_bytes: self.int(&raw.server.max_body_bytes, "server.max_body_bytes", 8 << 20, 1024, 1 << 30)?
                as usize,
        };
        if let Some(s) = &raw.server.listen {
            if server.listen.parse::<std::net::SocketAddr>().is_err() {
                return Err(self.err(Some(s.span()), "server.listen", "must be an address such as 127.0.0.1:8080"));
            }
        }

        let h = &raw.health;
        let health = HealthConfig {
            interval: self.duration(&h.interval, "health.interval", Duration::from_secs(5))?,
            idle_interval: self.duration(&h.idle_interval, "health.idle_interval", Duration::from_secs(30))?,
            timeout: self.duration(&h.timeout, "health.timeout", Duration::from_secs(3))?,
            probe: h.probe.unwrap_or(ProbeKind::Chat),
            probe_path: self.opt_string(&h.probe_path, "health.probe_path", "/health")?,
            probe_prompt: self.opt_string(&h.probe_prompt, "health.probe_prompt", "ping")?,
            history: self.int(&h.history, "health.history", 100, 1, 100_000)? as usize,
            min_success_rate: match &h.min_success_rate {
                Some(v) if !(0.0..=1.0).contains(v.get_ref()) => {
                    return Err(self.err(Some(v.span()), "health.min_success_rate", "must be between 0 and 1"))
                }
                Some(v) => *v.get_ref(),
                None => 0.9,
            },
            slow_start: self.duration(&h.slow_start, "health.slow_start", Duration::from_secs(30))?,
        };
        for (d, key) in [(health.interval, "health.interval"), (health.idle_interval, "health.idle_interval")] {
            if d < Duration::from_millis(100) {
                let span = if key == "health.interval" { &h.interval } else { &h.idle_interval };
                return Err(self.err(span.as_ref().map(|s| s.span()), key, "must be at least 100ms"));
            }
        }

        let b = &raw.breaker;
        let breaker = BreakerSettings {
            failure_threshold: self.int(&b.failure_threshold, "breaker.failure_threshold", 3, 1, 1000)? as u32,
            recovery_timeout: self.duration(
                &b.recovery_timeout,
                "breaker.recovery_timeout",
                Duration::from_secs(30),
            )?,
            max_recovery_timeout: self.duration(
                &b.max_recovery_timeout,
                "breaker.max_recovery_timeout",
                Duration::from_secs(300),
            )?,
            success_threshold: self.int(&b.success_threshold, "breaker.success_threshold", 2, 1, 1000)? as u32,
            half_open_max_trials: self.int(&b.half_open_max_trials, "breaker.half_open_max_trials", 1, 1, 1000)? as u32,
        };

        let r = &raw.retry;
        let retry = RetryConfig {
            max_attempts: self.int(&r.max_attempts, "retry.max_attempts", 3, 1, 100)? as u32,
            backoff_base: self.duration(&r.backoff_base, "retry.backoff_base", Duration::from_millis(50))?,
            backoff_max: self.duration(&r.backoff_max, "retry.backoff_max", Duration::from_secs(2))?,
            deadline: self.duration(&r.deadline, "retry.deadline", Duration::from_secs(60))?,
            queue_timeout: self.duration(&r.queue_timeout, "retry.queue_timeout", Duration::ZERO)?,
        };

        let l = &raw.log;
        let log = LogConfig {
            enabled: l.enabled.unwrap_or(true),
            path: PathBuf::from(self.opt_string(&l.path, "log.path", DEFAULT_LOG_PATH)?),
            retention: self.duration(&l.retention, "log.retention", Duration::from_secs(7 * 86_400))?,
        };
        if let Some(p) = &l.path {
            if log.path.as_os_str().is_empty() {
                return Err(self.err(
                    Some(p.span()),
                    "log.path",
                    "is empty (set `enabled = false` to turn the log off)",
                ));
            }
        }

        let mut endpoints = Vec::with_capacity(raw.endpoints.len());
        let mut seen = HashSet::new();
        for (i, e) in raw.endpoints.iter().enumerate() {
            let ep = self.endpoint(i, e)?;
            if !seen.insert(ep.name.clone()) {
                let span = e.name.as_ref().map(|s| s.span());
                return Err(self.err(
                    span,
                    format!("endpoints[{i}].name"),
                    format!("duplicate endpoint name {:?}", ep.name),
                ));
            }
            endpoints.push(ep);
        }

        let mut models = Vec::with_capacity(raw.models.len());
        let mut seen = HashSet::new();
        for (i, m) in raw.models.iter().enumerate() {
            let model = self.model(i, m)?;
            if !seen.insert(model.name.clone()) {
                let span = m.name.as_ref().map(|s| s.span());
                return Err(self.err(
                    span,
                    format!("models[{i}].name"),
                    format!("duplicate model name {:?}", model.name),
                ));
            }
            models.push(model);
        }

        // Every model an endpoint serves needs a [[models]] entry with pricing.
        for (i, (e, raw_e)) in endpoints.iter().zip(&raw.endpoints).enumerate() {
            for (public, _) in &e.models {
                if !models.iter().any(|m| &m.name == public) {
                    let span = raw_e.models.as_ref().map(|m| m.span());
                    return Err(self.err(
                        span,
                        format!("endpoints[{i}].models"),
                        format!(
                            "model {public:?} has no [[models]] entry with input_usd_per_mtok and output_usd_per_mtok"
                        ),
                    ));
                }
            }
        }
        for (i, (m, raw_m)) in models.iter().zip(&raw.models).enumerate() {
            if !endpoints.iter().any(|e| e.models.iter().any(|(p, _)| p == &m.name)) {
                let span = raw_m.name.as_ref().map(|s| s.span());
                return Err(self.err(
                    span,
                    format!("models[{i}]"),
                    format!("model {:?} is served by no endpoint", m.name),
                ));
            }
            for (j, f) in m.fallbacks.iter().enumerate() {
                let span = raw_m.fallbacks.get(j).map(|s| s.span());
                if f == &m.name {
                    return Err(self.err(span, format!("models[{i}].fallbacks"), "a model cannot be its own fallback"));
                }
                if !models.iter().any(|o| &o.name == f) {
                    return Err(self.err(span, format!("models[{i}].fallbacks"), format!("unknown model {f:?}")));
                }
            }
        }
        if endpoints.is_empty() {
            return Err(self.err(None, "endpoints", "at least one [[endpoints]] entry is needed"));
        }

        Ok(Config { server, health, breaker, retry, log, endpoints, models })
    }

    fn endpoint(&self, i: usize, e: &RawEndpoint) -> Result<EndpointConfig, ConfigError> {
        let k = |f: &str| format!("endpoints[{i}].{f}");
        let name = match &e.name {
            Some(s) => self.string(s, &k("name"))?,
            None => return Err(self.err(None, format!("endpoints[{i}]"), "missing key `name`")),
        };
        if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c)) {
            return Err(self.err(
                e.name.as_ref().map(|s| s.span()),
                k("name"),
                "must be non-empty and use only letters, digits, '-', '_' and '.'",
            ));
        }
        let base_url = match &e.base_url {
            Some(s) => {
                let u = self.string(s, &k("base_url"))?;
                let u = u.trim_end_matches('/').to_string();
                if crate::upstream::BaseUrl::parse(&u).is_none() {
                    return Err(self.err(Some(s.span()), k("base_url"), "must be an http:// or https:// URL"));
                }
                u
            }
            None => {
                return Err(self.err(
                    None,
                    format!("endpoints[{i}]"),
                    format!("endpoint {name:?}: missing key `base_url`"),
                ))
            }
        };
        let mut api_keys = Vec::with_capacity(e.api_keys.len());
        for (j, s) in e.api_keys.iter().enumerate() {
            let v = self.string(s, &format!("endpoints[{i}].api_keys[{j}]"))?;
            let v = v.trim();
            if v.is_empty() {
                return Err(self.err(
                    Some(s.span()),
                    format!("endpoints[{i}].api_keys[{j}]"),
                    "is empty after trimming",
                ));
            }
            api_keys.push(Secret(v.to_string()));
        }
        let models = match &e.models {
            None => Vec::new(),
            Some(m) => self.models(m, &k("models"))?,
        };
        if models.is_empty() {
            let span = e.models.as_ref().map(|m| m.span()).or(e.name.as_ref().map(|s| s.span()));
            return Err(self.err(span, k("models"), format!("endpoint {name:?} serves no models")));
        }
        let mut seen = HashSet::new();
        for (p, _) in &models {
            if !seen.insert(p) {
                return Err(self.err(
                    e.models.as_ref().map(|m| m.span()),
                    k("models"),
                    format!("model {p:?} listed twice"),
                ));
            }
        }
        Ok(EndpointConfig {
            name,
            base_url,
            api_keys,
            weight: self.int(&e.weight, &k("weight"), 1, 0, 1_000_000)? as u32,
            priority: self.int(&e.priority, &k("priority"), 0, -1_000_000, 1_000_000)? as i32,
            max_latency_ms: self.int(&e.max_latency_ms, &k("max_latency_ms"), 2000, 1, 3_600_000)? as u64,
            connect_timeout: self.duration(&e.connect_timeout, &k("connect_timeout"), Duration::from_secs(2))?,
            first_byte_timeout: self.duration(
                &e.first_byte_timeout,
                &k("first_byte_timeout"),
                Duration::from_secs(30),
            )?,
            timeout: self.duration(&e.timeout, &k("timeout"), Duration::from_secs(120))?,
            models,
        })
    }

    /// `models = ["a", "b"]` or `models = { "public" = "upstream" }`.
    fn models(&self, m: &Spanned<toml::Value>, key: &str) -> Result<Vec<(String, String)>, ConfigError> {
        let bad =
            || self.err(Some(m.span()), key, "must be a list of model names or a table public name -> upstream name");
        let one = |v: &toml::Value| -> Result<String, ConfigError> {
            let s = v.as_str().ok_or_else(bad)?;
            interpolate(s, self.env).map_err(|msg| self.err(Some(m.span()), key, msg))
        };
        match m.get_ref() {
            toml::Value::Array(a) => a.iter().map(|v| one(v).map(|s| (s.clone(), s))).collect(),
            toml::Value::Table(t) => t.iter().map(|(p, v)| one(v).map(|s| (p.clone(), s))).collect(),
            _ => Err(bad()),
        }
    }

    fn model(&self, i: usize, m: &RawModel) -> Result<ModelConfig, ConfigError> {
        let k = |f: &str| format!("models[{i}].{f}");
        let name = match &m.name {
            Some(s) => self.string(s, &k("name"))?,
            None => return Err(self.err(None, format!("models[{i}]"), "missing key `name`")),
        };
        let name_span = m.name.as_ref().map(|s| s.span());
        let price = |v: &Option<Spanned<f64>>, key: &str| -> Result<f64, ConfigError> {
            match v {
                None => {
                    Err(self.err(name_span.clone(), k(key), format!("model {name:?} has no pricing: missing `{key}`")))
                }
                Some(v) if *v.get_ref() < 0.0 || !v.get_ref().is_finite() => {
                    Err(self.err(Some(v.span()), k(key), "must be a non-negative number"))
                }
                Some(v) => Ok(*v.get_ref()),
            }
        };
        let input_usd_per_mtok = price(&m.input_usd_per_mtok, "input_usd_per_mtok")?;
        let output_usd_per_mtok = price(&m.output_usd_per_mtok, "output_usd_per_mtok")?;
        let strategy = match &m.strategy {
            None => Strategy::WeightedRoundRobin,
            Some(s) => {
                let v = self.string(s, &k("strategy"))?;
                v.parse::<Strategy>().map_err(|_| {
                    self.err(
                        Some(s.span()),
                        k("strategy"),
                        format!("unknown strategy {v:?}; use weighted_round_robin, weighted_random, least_latency or priority"),
                    )
                })?
            }
        };
        let fallbacks = m.fallbacks.iter().map(|s| self.string(s, &k("fallbacks"))).collect::<Result<_, _>>()?;
        let hedge_after = match &m.hedge_after {
            None => None,
            Some(s) => {
                let v = self.string(s, &k("hedge_after"))?;
                if v.trim() == "p95" {
                    Some(HedgeAfter::P95)
                } else {
                    let d = parse_duration(&v)
                        .map_err(|e| self.err(Some(s.span()), k("hedge_after"), format!("{e} (or \"p95\")")))?;
                    Some(HedgeAfter::Fixed(d))
                }
            }
        };
        let static_fallback = m.static_fallback.as_ref().map(|s| self.string(s, &k("static_fallback"))).transpose()?;
        Ok(ModelConfig {
            name,
            input_usd_per_mtok,
            output_usd_per_mtok,
            strategy,
            fallbacks,
            kind: m.kind.unwrap_or(ModelKind::Chat),
            static_fallback,
            hedge_after,
        })
    }
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

/// Parse a duration such as `500ms`, `5s`, `2m`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let t = s.trim();
    if t == "0" {
        return Ok(Duration::ZERO);
    }
    humantime::parse_duration(t)
        .map_err(|e| format!("invalid duration {s:?} ({e}); write e.g. \"500ms\", \"5s\", \"2m\""))
}

/// The embedded demo's config, for `upstream_base` = the base URLs of the three in-process mocks.
pub fn demo(primary: &str, secondary: &str, fallback: &str) -> Config {
    let text = format!(
        r#"
[server]
listen = "127.0.0.1:8080"

[health]
interval = "2s"
idle_interval = "10s"
timeout = "2s"
slow_start = "10s"

[breaker]
failure_threshold = 3
recovery_timeout = "10s"
success_threshold = 2

[retry]
max_attempts = 3
queue_timeout = "2s"

[[endpoints]]
name = "primary"
base_url = "{primary}"
api_keys = ["demo-primary-key"]
weight = 3
priority = 0
max_latency_ms = 1500
models = ["gpt-4.1", "claude-sonnet-4.5", "gemini-2.5-flash", "deepseek-v3.2", "text-embedding-3-small"]

[[endpoints]]
name = "secondary"
base_url = "{secondary}"
api_keys = ["demo-secondary-key"]
weight = 2
priority = 1
max_latency_ms = 1500
models = ["gpt-4.1", "claude-sonnet-4.5", "deepseek-v3.2", "text-embedding-3-small"]

[[endpoints]]
name = "fallback"
base_url = "{fallback}"
api_keys = ["demo-fallback-key"]
weight = 1
priority = 2
max_latency_ms = 2500
models = ["gemini-2.5-flash", "deepseek-v3.2"]

[[models]]
name = "gpt-4.1"
input_usd_per_mtok = 2.00
output_usd_per_mtok = 8.00
fallbacks = ["claude-sonnet-4.5", "gemini-2.5-flash"]

[[models]]
name = "claude-sonnet-4.5"
input_usd_per_mtok = 3.00
output_usd_per_mtok = 15.00
strategy = "least_latency"
fallbacks = ["gpt-4.1", "gemini-2.5-flash"]

[[models]]
name = "gemini-2.5-flash"
input_usd_per_mtok = 0.30
output_usd_per_mtok = 2.50
strategy = "priority"
fallbacks = ["deepseek-v3.2"]

[[models]]
name = "deepseek-v3.2"
input_usd_per_mtok = 0.28
output_usd_per_mtok = 0.42
strategy = "weighted_random"

[[models]]
name = "text-embedding-3-small"
kind = "embeddings"
input_usd_per_mtok = 0.02
output_usd_per_mtok = 0.0
"#
    );
    match parse(&text, "<embedded demo>", &ProcessEnv) {
        Ok(c) => c,
        // The demo text is fixed and covered by a unit test; failing here is a bug in this file.
        Err(e) => unreachable!("embedded demo config is invalid: {e}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(name: &str) -> Option<String> {
        match name {
            "PRIMARY_KEY" => Some("  sk-primary \n".into()),
            "EMPTY" => Some("   ".into()),
            "HOST" => Some("127.0.0.1".into()),
            _ => None,
        }
    }

    const GOOD: &str = r#"
[server]
listen = "127.0.0.1:9090"

[health]
interval = "2s"

[[endpoints]]
name = "primary"
base_url = "http://${HOST}:19001/v1/"
api_keys = ["${PRIMARY_KEY}"]
weight = 3
models = { "gpt-4.1" = "openai/gpt-4.1" }

[[models]]
name = "gpt-4.1"
input_usd_per_mtok = 2.0
output_usd_per_mtok = 8.0
"#;

    fn parse_err(text: &str) -> ConfigError {
        match parse(text, "t.toml", &env) {
            Ok(_) => panic!("expected an error"),
            Err(e) => e,
        }
    }

    #[test]
    fn good_config_interpolates_trims_and_defaults() {
        let c = parse(GOOD, "t.toml", &env).unwrap();
        assert_eq!(c.server.listen, "127.0.0.1:9090");
        assert_eq!(c.health.interval, Duration::from_secs(2));
        assert_eq!(c.health.idle_interval, Duration::from_secs(30));
        assert_eq!(c.breaker.failure_threshold, 3);
        assert_eq!(c.retry.max_attempts, 3);
        let e = &c.endpoints[0];
        assert_eq!(e.base_url, "http://127.0.0.1:19001/v1");
        assert_eq!(e.api_keys[0].expose(), "sk-primary");
        assert_eq!(e.models, vec![("gpt-4.1".to_string(), "openai/gpt-4.1".to_string())]);
        assert_eq!(c.server.max_body_bytes, 8 << 20);
        assert!(!format!("{c:?}").contains("sk-primary"), "Debug must not show keys");
    }

    #[test]
    fn unknown_key_names_key_and_line() {
        let e = parse_err(&GOOD.replace("weight = 3", "weight = 3\nwieght = 4"));
        assert_eq!(e.line, Some(13), "{e}");
        assert!(e.message.contains("wieght"), "{e}");
    }

    #[test]
    fn unset_variable_is_named_with_line() {
        let e = parse_err(&GOOD.replace("${PRIMARY_KEY}", "${NOPE}"));
        assert_eq!(e.line, Some(11));
        assert_eq!(e.key, "endpoints[0].api_keys[0]");
        assert!(e.message.contains("NOPE"), "{e}");
    }

    #[test]
    fn empty_key_after_trim() {
        let e = parse_err(&GOOD.replace("${PRIMARY_KEY}", "${EMPTY}"));
        assert_eq!(e.line, Some(11));
        assert!(e.message.contains("empty"), "{e}");
    }

    #[test]
    fn bad_duration() {
        let e = parse_err(&GOOD.replace("\"2s\"", "\"2 parsecs\""));
        assert_eq!((e.line, e.key.as_str()), (Some(6), "health.interval"));
        assert!(e.to_string().starts_with("t.toml:6: health.interval: invalid duration"), "{e}");
    }

    #[test]
    fn endpoint_without_models() {
        let e = parse_err(&GOOD.replace("models = { \"gpt-4.1\" = \"openai/gpt-4.1\" }", "models = []"));
        assert_eq!((e.line, e.key.as_str()), (Some(13), "endpoints[0].models"));
    }

    #[test]
    fn model_without_pricing() {
        let e = parse_err(&GOOD.replace("output_usd_per_mtok = 8.0\n", ""));
        assert_eq!(e.line, Some(16));
        assert!(e.message.contains("output_usd_per_mtok"), "{e}");
        let e = parse_err(&GOOD.replace("name = \"gpt-4.1\"", "name = \"gpt-5\""));
        assert!(e.message.contains("no [[models]] entry"), "{e}");
        assert_eq!(e.line, Some(13));
    }

    #[test]
    fn duplicate_names() {
        let dup = GOOD.replace(
            "[[models]]",
            "[[endpoints]]\nname = \"primary\"\nbase_url = \"http://x/v1\"\nmodels = [\"gpt-4.1\"]\n\n[[models]]",
        );
        let e = parse_err(&dup);
        assert_eq!((e.line, e.key.as_str()), (Some(16), "endpoints[1].name"));
        let dup =
            format!("{GOOD}\n[[models]]\nname = \"gpt-4.1\"\ninput_usd_per_mtok = 1.0\noutput_usd_per_mtok = 1.0\n");
        let e = parse_err(&dup);
        assert_eq!((e.line, e.key.as_str()), (Some(21), "models[1].name"));
    }

    #[test]
    fn syntax_error_has_line() {
        let e = parse_err("[server\nlisten = 1");
        assert_eq!(e.line, Some(1));
        let e = parse_err(&GOOD.replace("weight = 3", "weight = \"three\""));
        assert_eq!(e.line, Some(12));
    }

    #[test]
    fn unknown_strategy_and_fallback() {
        let e =
            parse_err(&GOOD.replace("output_usd_per_mtok = 8.0", "output_usd_per_mtok = 8.0\nstrategy = \"fastest\""));
        assert_eq!((e.line, e.key.as_str()), (Some(19), "models[0].strategy"));
        let e =
            parse_err(&GOOD.replace("output_usd_per_mtok = 8.0", "output_usd_per_mtok = 8.0\nfallbacks = [\"nope\"]"));
        assert_eq!((e.line, e.key.as_str()), (Some(19), "models[0].fallbacks"));
    }

    #[test]
    fn interpolation_rules() {
        assert_eq!(interpolate("a${HOST}b${HOST}", &env).unwrap(), "a127.0.0.1b127.0.0.1");
        assert!(interpolate("${HOST", &env).is_err());
        assert!(interpolate("${}", &env).is_err());
        assert_eq!(interpolate("no vars $HOST", &env).unwrap(), "no vars $HOST");
    }

    #[test]
    fn embedded_demo_is_valid() {
        let c = demo("http://127.0.0.1:1/v1", "http://127.0.0.1:2/v1", "http://127.0.0.1:3/v1");
        assert_eq!(c.endpoints.len(), 3);
        assert_eq!(c.models.len(), 5);
    }

    #[test]
    fn request_log_settings() {
        let c = parse(GOOD, "t.toml", &env).unwrap();
        assert_eq!(
            c.log,
            LogConfig { enabled: true, path: "sheepdog.db".into(), retention: Duration::from_secs(7 * 86_400) }
        );
        let c = parse(
            &format!("[log]\nenabled = false\npath = \"logs/${{HOST}}.db\"\nretention = \"0\"\n{GOOD}"),
            "t.toml",
            &env,
        )
        .unwrap();
        assert_eq!(c.log, LogConfig { enabled: false, path: "logs/127.0.0.1.db".into(), retention: Duration::ZERO });
        let e = parse_err(&format!("[log]\npath = \"\"\n{GOOD}"));
        assert_eq!((e.line, e.key.as_str()), (Some(2), "log.path"), "{e}");
        let e = parse_err(&format!("[log]\nretention = \"a week\"\n{GOOD}"));
        assert_eq!((e.line, e.key.as_str()), (Some(2), "log.retention"), "{e}");
    }

    #[test]
    fn a_relative_log_path_is_taken_from_the_config_files_directory() {
        let dir = tempfile::tempdir().unwrap();
        let text = GOOD.replace("${HOST}", "127.0.0.1").replace("${PRIMARY_KEY}", "sk-1");
        std::fs::write(dir.path().join("a.toml"), &text).unwrap();
        std::fs::write(dir.path().join("b.toml"), format!("[log]\npath = \"/var/tmp/x.db\"\n{text}")).unwrap();
        assert_eq!(load_file(&dir.path().join("a.toml")).unwrap().log.path, dir.path().join("sheepdog.db"));
        assert_eq!(load_file(&dir.path().join("b.toml")).unwrap().log.path, PathBuf::from("/var/tmp/x.db"));
    }
}
