//! The file as serde reads it: every key optional and spanned, unknown keys refused. [`super::validate`] turns
//! these into the validated types of [`super`].

use serde::Deserialize;
use toml::Spanned;

use super::{ModelKind, ProbeKind};

pub(super) type S = Spanned<String>;

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawConfig {
    #[serde(default)]
    pub(super) server: RawServer,
    #[serde(default)]
    pub(super) health: RawHealth,
    #[serde(default)]
    pub(super) breaker: RawBreaker,
    #[serde(default)]
    pub(super) retry: RawRetry,
    #[serde(default)]
    pub(super) log: RawLog,
    #[serde(default)]
    pub(super) endpoints: Vec<RawEndpoint>,
    #[serde(default)]
    pub(super) models: Vec<RawModel>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawServer {
    pub(super) listen: Option<S>,
    pub(super) admin_key: Option<S>,
    pub(super) max_body_bytes: Option<Spanned<i64>>,
    pub(super) max_header_bytes: Option<Spanned<i64>>,
    pub(super) max_connections: Option<Spanned<i64>>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawHealth {
    pub(super) interval: Option<S>,
    pub(super) idle_interval: Option<S>,
    pub(super) timeout: Option<S>,
    pub(super) probe: Option<ProbeKind>,
    pub(super) probe_path: Option<S>,
    pub(super) probe_prompt: Option<S>,
    pub(super) history: Option<Spanned<i64>>,
    pub(super) min_success_rate: Option<Spanned<f64>>,
    pub(super) slow_start: Option<S>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawBreaker {
    pub(super) failure_threshold: Option<Spanned<i64>>,
    pub(super) recovery_timeout: Option<S>,
    pub(super) max_recovery_timeout: Option<S>,
    pub(super) success_threshold: Option<Spanned<i64>>,
    pub(super) half_open_max_trials: Option<Spanned<i64>>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawRetry {
    pub(super) max_attempts: Option<Spanned<i64>>,
    pub(super) backoff_base: Option<S>,
    pub(super) backoff_max: Option<S>,
    pub(super) deadline: Option<S>,
    pub(super) queue_timeout: Option<S>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawLog {
    pub(super) enabled: Option<bool>,
    pub(super) path: Option<S>,
    pub(super) retention: Option<S>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawEndpoint {
    pub(super) name: Option<S>,
    pub(super) base_url: Option<S>,
    #[serde(default)]
    pub(super) api_keys: Vec<S>,
    pub(super) weight: Option<Spanned<i64>>,
    pub(super) priority: Option<Spanned<i64>>,
    pub(super) max_latency_ms: Option<Spanned<i64>>,
    pub(super) price_multiplier: Option<Spanned<f64>>,
    pub(super) connect_timeout: Option<S>,
    pub(super) first_byte_timeout: Option<S>,
    pub(super) timeout: Option<S>,
    pub(super) models: Option<Spanned<toml::Value>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawModel {
    pub(super) name: Option<S>,
    pub(super) input_usd_per_mtok: Option<Spanned<f64>>,
    pub(super) output_usd_per_mtok: Option<Spanned<f64>>,
    pub(super) cached_input_usd_per_mtok: Option<Spanned<f64>>,
    pub(super) strategy: Option<S>,
    #[serde(default)]
    pub(super) fallbacks: Vec<S>,
    pub(super) kind: Option<ModelKind>,
    pub(super) static_fallback: Option<S>,
    pub(super) hedge_after: Option<S>,
}
