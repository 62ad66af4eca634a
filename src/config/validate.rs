//! Raw file types -> validated [`Config`]: defaults, bounds, cross-references, `${VAR}` interpolation, and
//! errors that name the key path and the line.

use std::collections::HashSet;
use std::ops::Range;
use std::path::PathBuf;
use std::time::Duration;

use sheepdog_policy::balance::Strategy;
use toml::Spanned;

use super::raw::*;
use super::*;

pub(super) struct Validator<'a> {
    pub(super) text: &'a str,
    pub(super) file: &'a str,
    pub(super) env: &'a dyn Env,
}

impl Validator<'_> {
    pub(super) fn err(
        &self,
        span: Option<Range<usize>>,
        key: impl Into<String>,
        msg: impl Into<String>,
    ) -> ConfigError {
        ConfigError {
            file: self.file.to_string(),
            line: span.map(|s| line_of(self.text, s.start)),
            key: key.into(),
            message: msg.into(),
        }
    }

    /// `${VAR}` interpolation of one string value.
    pub(super) fn string(&self, s: &S, key: &str) -> Result<String, ConfigError> {
        interpolate(s.get_ref(), self.env).map_err(|m| self.err(Some(s.span()), key, m))
    }

    pub(super) fn opt_string(&self, s: &Option<S>, key: &str, default: &str) -> Result<String, ConfigError> {
        match s {
            Some(s) => self.string(s, key),
            None => Ok(default.to_string()),
        }
    }

    pub(super) fn duration(&self, s: &Option<S>, key: &str, default: Duration) -> Result<Duration, ConfigError> {
        let Some(s) = s else { return Ok(default) };
        let v = self.string(s, key)?;
        parse_duration(&v).map_err(|m| self.err(Some(s.span()), key, m))
    }

    pub(super) fn int(
        &self,
        v: &Option<Spanned<i64>>,
        key: &str,
        default: i64,
        min: i64,
        max: i64,
    ) -> Result<i64, ConfigError> {
        let Some(v) = v else { return Ok(default) };
        let n = *v.get_ref();
        if n < min || n > max {
            return Err(self.err(Some(v.span()), key, format!("must be between {min} and {max}, got {n}")));
        }
        Ok(n)
    }

    pub(super) fn config(&self, raw: RawConfig) -> Result<Config, ConfigError> {
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
            max_header_bytes: self.int(
                &raw.server.max_header_bytes,
                "server.max_header_bytes",
                64 << 10,
                8 << 10,
                1 << 20,
            )? as usize,
            max_connections: self.int(&raw.server.max_connections, "server.max_connections", 0, 0, 10_000_000)?
                as usize,
            allow_anonymous: raw.server.allow_anonymous.unwrap_or(false),
            client_timeout: self.duration(
                &raw.server.client_timeout,
                "server.client_timeout",
                Duration::from_secs(30),
            )?,
            max_concurrent_requests: self.int(
                &raw.server.max_concurrent_requests,
                "server.max_concurrent_requests",
                10_000,
                1,
                10_000_000,
            )? as usize,
            max_stream_duration: self.duration(
                &raw.server.max_stream_duration,
                "server.max_stream_duration",
                Duration::from_secs(30 * 60),
            )?,
        };
        if server.client_timeout.is_zero() {
            let span = raw.server.client_timeout.as_ref().map(|s| s.span());
            return Err(self.err(span, "server.client_timeout", "must be more than zero"));
        }
        if server.max_stream_duration.is_zero() {
            let span = raw.server.max_stream_duration.as_ref().map(|s| s.span());
            return Err(self.err(span, "server.max_stream_duration", "must be more than zero"));
        }
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
        let url = match &l.url {
            Some(s) => {
                let u = self.string(s, "log.url")?;
                let url = PgUrl::parse(&u).map_err(|m| self.err(Some(s.span()), "log.url", &m))?;
                if l.path.is_some() {
                    return Err(self.err(
                        Some(s.span()),
                        "log.url",
                        "set either log.path (SQLite) or log.url (PostgreSQL)",
                    ));
                }
                Some(url)
            }
            None => None,
        };
        let log = LogConfig {
            enabled: l.enabled.unwrap_or(true),
            path: PathBuf::from(self.opt_string(&l.path, "log.path", DEFAULT_LOG_PATH)?),
            retention: self.duration(&l.retention, "log.retention", Duration::from_secs(7 * 86_400))?,
            url,
            bodies: l.bodies.unwrap_or(false),
            queue_capacity: self.int(
                &l.queue_capacity,
                "log.queue_capacity",
                DEFAULT_LOG_QUEUE_CAPACITY as i64,
                1,
                10_000_000,
            )? as usize,
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

        let aliases: HashSet<String> =
            raw.routes.iter().filter_map(|r| r.model.as_ref().map(|m| m.get_ref().clone())).collect();
        let routes = self.routes(&raw.routes, &models)?;
        let clients = self.clients(&raw.clients, &models, &aliases)?;
        let budgets = self.budgets(&raw.budgets, &models, &clients)?;
        let state = self.state(&raw.state)?;

        Ok(Config { server, health, breaker, retry, log, endpoints, models, budgets, routes, clients, state })
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
                if BaseUrl::parse(&u).is_none() {
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
            price_multiplier: match &e.price_multiplier {
                None => 1.0,
                Some(v) if !v.get_ref().is_finite() || !(0.0..=1000.0).contains(v.get_ref()) => {
                    return Err(self.err(Some(v.span()), k("price_multiplier"), "must be a number from 0 to 1000"))
                }
                Some(v) => *v.get_ref(),
            },
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
        let cached_input_usd_per_mtok = match &m.cached_input_usd_per_mtok {
            None => None,
            some => Some(price(some, "cached_input_usd_per_mtok")?),
        };
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
            cached_input_usd_per_mtok,
            strategy,
            fallbacks,
            kind: m.kind.unwrap_or(ModelKind::Chat),
            static_fallback,
            hedge_after,
        })
    }
}
