//! The policy sections of `sheepdog.toml`, validated: `[[budgets]]`, `[[routes]]`, `[[clients]]` and `[state]`.
//! Cross-references (a budget's `downgrade_to`, a route's `target`, a client's `models`) are checked against
//! the models of the same file, and every error names the key and the line. Builds no runtime state: the
//! compiled forms (regex sets, rate limiters, budget counters) are made from these by `state`.

use std::collections::HashSet;

use toml::Spanned;

use super::raw::*;
use super::validate::Validator;
use super::*;

/// A budget's accounting period, on the UTC calendar.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Period {
    /// From 00:00 UTC to the next.
    Day,
    /// From the first of the month, 00:00 UTC, to the next.
    Month,
}

impl Period {
    /// `day` or `month`, as configured.
    pub fn name(self) -> &'static str {
        match self {
            Period::Day => "day",
            Period::Month => "month",
        }
    }
}

/// One `[[budgets]]` entry.
#[derive(Debug, Clone, PartialEq)]
pub struct BudgetConfig {
    /// Unique name (in `budget:NAME`, metrics and `/api/stats`).
    pub name: String,
    /// `day` or `month`.
    pub period: Period,
    /// Spend at which a warning is logged, counted and posted (once per crossing).
    pub warn_usd: Option<f64>,
    /// Spend from which requests for costlier models are served by `downgrade_to`.
    pub downgrade_usd: Option<f64>,
    /// The cheaper model of a downgrade.
    pub downgrade_to: Option<String>,
    /// Spend from which requests get 429 `budget_exceeded`.
    pub limit_usd: Option<f64>,
    /// Only these models count and are acted on (empty: all).
    pub models: Vec<String>,
    /// Only these clients count and are acted on (empty: all).
    pub clients: Vec<String>,
    /// POSTed `{budget, threshold, spent_usd, period}` at each crossing.
    pub webhook: Option<String>,
}

/// One `[[routes]]` rule: when its conditions hold for a request to `model` (an alias), `target` serves.
#[derive(Debug, Clone, PartialEq)]
pub struct RouteConfig {
    /// Unique name, reported in `x-sheepdog-route-reason`.
    pub name: String,
    /// The public alias the rule belongs to.
    pub model: String,
    /// The model that serves when the rule matches (its fallbacks apply).
    pub target: String,
    /// The last user message matches this regular expression (compiled once; checked here).
    pub regex: Option<String>,
    /// The last user message contains one of these (case-insensitive).
    pub keywords: Vec<String>,
    /// Estimated tokens of the last user message at least this.
    pub min_prompt_tokens: Option<u64>,
    /// Estimated tokens of the last user message at most this.
    pub max_prompt_tokens: Option<u64>,
    /// The last user message contains code (true) or does not (false).
    pub has_code: Option<bool>,
    /// The request carries tools (true) or does not (false).
    pub has_tools: Option<bool>,
    /// Request headers that must have these values (names lower-cased).
    pub headers: Vec<(String, String)>,
    /// Request `metadata` entries that must have these values.
    pub metadata: Vec<(String, String)>,
    /// Serves the alias when no rule matches.
    pub default: bool,
}

/// One `[[clients]]` entry: who may use the gateway, at which rates.
#[derive(Debug, Clone, PartialEq)]
pub struct ClientConfig {
    /// Unique name (request log, metrics, budgets).
    pub name: String,
    /// SHA-256 of the client's key.
    pub key_hash: [u8; 32],
    /// Models (or aliases) it may ask for; `None`: all.
    pub models: Option<Vec<String>>,
    /// Requests per minute.
    pub rpm: Option<u32>,
    /// Tokens per minute (prompt and completion).
    pub tpm: Option<u64>,
    /// Requests in flight at once.
    pub max_parallel: Option<u32>,
}

/// Where health, breakers and shared counters live.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StateBackend {
    /// In this process only.
    Memory,
    /// Shared among replicas through Redis.
    Redis,
}

/// `[state]`.
#[derive(Debug, Clone, PartialEq)]
pub struct StateConfig {
    /// `memory` (default) or `redis`.
    pub backend: StateBackend,
    /// The Redis server for `backend = "redis"` (may hold a password: never logged).
    pub redis_url: String,
    /// Prefix of every Redis key and channel (several fleets can share one Redis).
    pub key_prefix: String,
    /// The longest any one Redis call may take; then Redis counts as unreachable.
    pub timeout: std::time::Duration,
}

impl Default for StateConfig {
    fn default() -> Self {
        StateConfig {
            backend: StateBackend::Memory,
            redis_url: "redis://127.0.0.1:6379".into(),
            key_prefix: "sheepdog".into(),
            timeout: std::time::Duration::from_millis(100),
        }
    }
}

/// Parse `sha256:` and 64 hex digits.
pub fn parse_key_hash(s: &str) -> Option<[u8; 32]> {
    let hex = s.trim().strip_prefix("sha256:")?;
    if hex.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, b) in out.iter_mut().enumerate() {
        *b = u8::from_str_radix(hex.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}

impl Validator<'_> {
    fn usd(&self, v: &Option<Spanned<f64>>, key: &str) -> Result<Option<f64>, ConfigError> {
        match v {
            None => Ok(None),
            Some(x) if !x.get_ref().is_finite() || *x.get_ref() < 0.0 => {
                Err(self.err(Some(x.span()), key, "must be a non-negative number of US dollars"))
            }
            Some(x) => Ok(Some(*x.get_ref())),
        }
    }

    fn names(&self, list: &[S], key: &str) -> Result<Vec<String>, ConfigError> {
        list.iter().map(|s| self.string(s, key)).collect()
    }

    fn check_model(
        &self,
        models: &[ModelConfig],
        aliases: &HashSet<String>,
        s: &S,
        name: &str,
        key: &str,
    ) -> Result<(), ConfigError> {
        if models.iter().any(|m| m.name == name) || aliases.contains(name) {
            Ok(())
        } else {
            Err(self.err(Some(s.span()), key, format!("unknown model {name:?}")))
        }
    }

    pub(super) fn budgets(
        &self,
        raw: &[RawBudget],
        models: &[ModelConfig],
        clients: &[ClientConfig],
    ) -> Result<Vec<BudgetConfig>, ConfigError> {
        let mut out: Vec<BudgetConfig> = Vec::with_capacity(raw.len());
        let none = HashSet::new();
        for (i, b) in raw.iter().enumerate() {
            let k = |f: &str| format!("budgets[{i}].{f}");
            let name = match &b.name {
                Some(s) => self.name(s, &k("name"))?,
                None => return Err(self.err(None, format!("budgets[{i}]"), "missing key `name`")),
            };
            if out.iter().any(|o| o.name == name) {
                return Err(self.err(
                    b.name.as_ref().map(|s| s.span()),
                    k("name"),
                    format!("duplicate budget name {name:?}"),
                ));
            }
            let period = match &b.period {
                None => Period::Day,
                Some(s) => match self.string(s, &k("period"))?.as_str() {
                    "day" => Period::Day,
                    "month" => Period::Month,
                    other => {
                        return Err(self.err(
                            Some(s.span()),
                            k("period"),
                            format!("unknown period {other:?}; use day or month"),
                        ))
                    }
                },
            };
            let warn_usd = self.usd(&b.warn_usd, &k("warn_usd"))?;
            let downgrade_usd = self.usd(&b.downgrade_usd, &k("downgrade_usd"))?;
            let limit_usd = self.usd(&b.limit_usd, &k("limit_usd"))?;
            let downgrade_to = match &b.downgrade_to {
                None => None,
                Some(s) => {
                    let m = self.string(s, &k("downgrade_to"))?;
                    self.check_model(models, &none, s, &m, &k("downgrade_to"))?;
                    Some(m)
                }
            };
            if downgrade_usd.is_some() != downgrade_to.is_some() {
                let span = b.downgrade_usd.as_ref().map(|v| v.span()).or(b.downgrade_to.as_ref().map(|s| s.span()));
                return Err(self.err(span, format!("budgets[{i}]"), "downgrade_usd and downgrade_to go together"));
            }
            if warn_usd.is_none() && downgrade_usd.is_none() && limit_usd.is_none() {
                return Err(self.err(
                    b.name.as_ref().map(|s| s.span()),
                    format!("budgets[{i}]"),
                    format!("budget {name:?} has no threshold: set warn_usd, downgrade_usd or limit_usd"),
                ));
            }
            // Thresholds in order: warn <= downgrade <= limit.
            let ordered = [warn_usd, downgrade_usd, limit_usd];
            let set: Vec<f64> = ordered.iter().flatten().copied().collect();
            if set.windows(2).any(|w| w[0] > w[1]) {
                let span = b.limit_usd.as_ref().or(b.downgrade_usd.as_ref()).map(|v| v.span());
                return Err(self.err(
                    span,
                    format!("budgets[{i}]"),
                    "thresholds must be in order: warn_usd <= downgrade_usd <= limit_usd",
                ));
            }
            let bm = self.names(&b.models, &k("models"))?;
            for (j, m) in bm.iter().enumerate() {
                self.check_model(models, &none, &b.models[j], m, &k("models"))?;
            }
            let bc = self.names(&b.clients, &k("clients"))?;
            for (j, c) in bc.iter().enumerate() {
                if !clients.iter().any(|o| &o.name == c) {
                    return Err(self.err(Some(b.clients[j].span()), k("clients"), format!("unknown client {c:?}")));
                }
            }
            let webhook = match &b.webhook {
                None => None,
                Some(s) => {
                    let u = self.string(s, &k("webhook"))?;
                    if BaseUrl::parse(&u).is_none() {
                        return Err(self.err(Some(s.span()), k("webhook"), "must be an http:// or https:// URL"));
                    }
                    Some(u)
                }
            };
            out.push(BudgetConfig {
                name,
                period,
                warn_usd,
                downgrade_usd,
                downgrade_to,
                limit_usd,
                models: bm,
                clients: bc,
                webhook,
            });
        }
        Ok(out)
    }

    pub(super) fn routes(&self, raw: &[RawRoute], models: &[ModelConfig]) -> Result<Vec<RouteConfig>, ConfigError> {
        let mut out: Vec<RouteConfig> = Vec::with_capacity(raw.len());
        let none = HashSet::new();
        for (i, r) in raw.iter().enumerate() {
            let k = |f: &str| format!("routes[{i}].{f}");
            let name = match &r.name {
                Some(s) => self.name(s, &k("name"))?,
                None => return Err(self.err(None, format!("routes[{i}]"), "missing key `name`")),
            };
            if out.iter().any(|o| o.name == name) {
                return Err(self.err(
                    r.name.as_ref().map(|s| s.span()),
                    k("name"),
                    format!("duplicate route name {name:?}"),
                ));
            }
            let model = match &r.model {
                Some(s) => self.name(s, &k("model"))?,
                None => {
                    return Err(self.err(
                        r.name.as_ref().map(|s| s.span()),
                        k("model"),
                        format!("route {name:?}: missing key `model` (the alias it belongs to)"),
                    ))
                }
            };
            if models.iter().any(|m| m.name == model) {
                return Err(self.err(
                    r.model.as_ref().map(|s| s.span()),
                    k("model"),
                    format!("{model:?} is a configured model; a route's model is an alias of its own (e.g. \"auto\")"),
                ));
            }
            let target = match &r.target {
                Some(s) => {
                    let t = self.string(s, &k("target"))?;
                    self.check_model(models, &none, s, &t, &k("target"))?;
                    t
                }
                None => {
                    return Err(self.err(
                        r.name.as_ref().map(|s| s.span()),
                        k("target"),
                        format!("route {name:?}: missing key `target`"),
                    ))
                }
            };
            let regex = match &r.regex {
                None => None,
                Some(s) => {
                    let re = self.string(s, &k("regex"))?;
                    if let Err(e) = regex::Regex::new(&re) {
                        let msg = e.to_string();
                        let last = msg.lines().last().unwrap_or("invalid").trim().to_string();
                        return Err(self.err(Some(s.span()), k("regex"), format!("does not compile: {last}")));
                    }
                    Some(re)
                }
            };
            let tokens = |v: &Option<Spanned<i64>>, f: &str| -> Result<Option<u64>, ConfigError> {
                v.as_ref().map(|_| self.int(v, &k(f), 0, 0, 100_000_000).map(|n| n as u64)).transpose()
            };
            let min_prompt_tokens = tokens(&r.min_prompt_tokens, "min_prompt_tokens")?;
            let max_prompt_tokens = tokens(&r.max_prompt_tokens, "max_prompt_tokens")?;
            if let (Some(a), Some(b)) = (min_prompt_tokens, max_prompt_tokens) {
                if a > b {
                    return Err(self.err(
                        r.max_prompt_tokens.as_ref().map(|v| v.span()),
                        k("max_prompt_tokens"),
                        "is below min_prompt_tokens",
                    ));
                }
            }
            let table = |t: &Option<Spanned<toml::Table>>,
                         f: &str,
                         lower: bool|
             -> Result<Vec<(String, String)>, ConfigError> {
                let Some(t) = t else { return Ok(Vec::new()) };
                t.get_ref()
                    .iter()
                    .map(|(key, v)| {
                        let v = v
                            .as_str()
                            .ok_or_else(|| self.err(Some(t.span()), k(f), format!("{key:?} must be a string")))?;
                        let v = interpolate(v, self.env).map_err(|m| self.err(Some(t.span()), k(f), m))?;
                        Ok((if lower { key.to_ascii_lowercase() } else { key.clone() }, v))
                    })
                    .collect()
            };
            let keywords = self.names(&r.keywords, &k("keywords"))?;
            if let Some(j) = keywords.iter().position(|w| w.trim().is_empty()) {
                return Err(self.err(Some(r.keywords[j].span()), k("keywords"), "an empty keyword matches everything"));
            }
            let route = RouteConfig {
                name,
                model,
                target,
                regex,
                keywords,
                min_prompt_tokens,
                max_prompt_tokens,
                has_code: r.has_code,
                has_tools: r.has_tools,
                headers: table(&r.headers, "headers", true)?,
                metadata: table(&r.metadata, "metadata", false)?,
                default: r.default.unwrap_or(false),
            };
            if route.default && out.iter().any(|o| o.default && o.model == route.model) {
                return Err(self.err(
                    r.name.as_ref().map(|s| s.span()),
                    k("default"),
                    format!("alias {:?} already has a default route", route.model),
                ));
            }
            out.push(route);
        }
        Ok(out)
    }

    pub(super) fn clients(
        &self,
        raw: &[RawClient],
        models: &[ModelConfig],
        aliases: &HashSet<String>,
    ) -> Result<Vec<ClientConfig>, ConfigError> {
        let mut out: Vec<ClientConfig> = Vec::with_capacity(raw.len());
        for (i, c) in raw.iter().enumerate() {
            let k = |f: &str| format!("clients[{i}].{f}");
            let name = match &c.name {
                Some(s) => self.name(s, &k("name"))?,
                None => return Err(self.err(None, format!("clients[{i}]"), "missing key `name`")),
            };
            if out.iter().any(|o| o.name == name) {
                return Err(self.err(
                    c.name.as_ref().map(|s| s.span()),
                    k("name"),
                    format!("duplicate client name {name:?}"),
                ));
            }
            let key_hash = match &c.key_hash {
                Some(s) => parse_key_hash(&self.string(s, &k("key_hash"))?).ok_or_else(|| {
                    self.err(
                        Some(s.span()),
                        k("key_hash"),
                        "must be \"sha256:\" and 64 hex digits (from `sheepdog key new`)",
                    )
                })?,
                None => {
                    return Err(self.err(
                        c.name.as_ref().map(|s| s.span()),
                        k("key_hash"),
                        format!("client {name:?}: missing key `key_hash` (run `sheepdog key new --name {name}`)"),
                    ))
                }
            };
            if let Some(j) = out.iter().position(|o| o.key_hash == key_hash) {
                return Err(self.err(
                    c.key_hash.as_ref().map(|s| s.span()),
                    k("key_hash"),
                    format!("the same key as client {:?}", out[j].name),
                ));
            }
            let allowed = match &c.models {
                None => None,
                Some(list) => {
                    let names = self.names(list, &k("models"))?;
                    for (j, m) in names.iter().enumerate() {
                        self.check_model(models, aliases, &list[j], m, &k("models"))?;
                    }
                    Some(names)
                }
            };
            let lim = |v: &Option<Spanned<i64>>, f: &str, max: i64| -> Result<Option<i64>, ConfigError> {
                v.as_ref().map(|_| self.int(v, &k(f), 1, 1, max)).transpose()
            };
            out.push(ClientConfig {
                name,
                key_hash,
                models: allowed,
                rpm: lim(&c.rpm, "rpm", 100_000_000)?.map(|n| n as u32),
                tpm: lim(&c.tpm, "tpm", i64::MAX / 2)?.map(|n| n as u64),
                max_parallel: lim(&c.max_parallel, "max_parallel", 1_000_000)?.map(|n| n as u32),
            });
        }
        Ok(out)
    }

    pub(super) fn state(&self, raw: &RawState) -> Result<StateConfig, ConfigError> {
        let backend = match &raw.backend {
            None => StateBackend::Memory,
            Some(s) => match self.string(s, "state.backend")?.as_str() {
                "memory" => StateBackend::Memory,
                "redis" => StateBackend::Redis,
                other => {
                    return Err(self.err(
                        Some(s.span()),
                        "state.backend",
                        format!("unknown backend {other:?}; use memory or redis"),
                    ))
                }
            },
        };
        let redis_url = self.opt_string(&raw.redis_url, "state.redis_url", "redis://127.0.0.1:6379")?;
        if let Some(s) = &raw.redis_url {
            if !(redis_url.starts_with("redis://") || redis_url.starts_with("rediss://")) {
                return Err(self.err(Some(s.span()), "state.redis_url", "must be a redis:// or rediss:// URL"));
            }
        }
        let key_prefix = match &raw.key_prefix {
            None => "sheepdog".to_owned(),
            Some(s) => self.name(s, "state.key_prefix")?,
        };
        let timeout = self.duration(&raw.timeout, "state.timeout", std::time::Duration::from_millis(100))?;
        if timeout.is_zero() {
            return Err(self.err(raw.timeout.as_ref().map(|s| s.span()), "state.timeout", "must be more than 0"));
        }
        Ok(StateConfig { backend, redis_url, key_prefix, timeout })
    }

    /// A name used as a label value and in headers: letters, digits, `-`, `_`, `.`.
    fn name(&self, s: &S, key: &str) -> Result<String, ConfigError> {
        let n = self.string(s, key)?;
        if n.is_empty() || !n.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c)) {
            return Err(self.err(
                Some(s.span()),
                key,
                "must be non-empty and use only letters, digits, '-', '_' and '.'",
            ));
        }
        Ok(n)
    }
}

#[cfg(test)]
#[path = "policies_tests.rs"]
mod tests;
