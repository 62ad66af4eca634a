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
    #[serde(default)]
    pub(super) budgets: Vec<RawBudget>,
    #[serde(default)]
    pub(super) routes: Vec<RawRoute>,
    #[serde(default)]
    pub(super) clients: Vec<RawClient>,
    #[serde(default)]
    pub(super) state: RawState,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawServer {
    pub(super) listen: Option<S>,
    pub(super) admin_key: Option<S>,
    pub(super) max_body_bytes: Option<Spanned<i64>>,
    pub(super) max_header_bytes: Option<Spanned<i64>>,
    pub(super) max_connections: Option<Spanned<i64>>,
    pub(super) allow_anonymous: Option<bool>,
    pub(super) client_timeout: Option<S>,
    pub(super) max_concurrent_requests: Option<Spanned<i64>>,
    pub(super) max_stream_duration: Option<S>,
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
    pub(super) url: Option<S>,
    pub(super) bodies: Option<bool>,
    pub(super) queue_capacity: Option<Spanned<i64>>,
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

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawBudget {
    pub(super) name: Option<S>,
    pub(super) period: Option<S>,
    pub(super) warn_usd: Option<Spanned<f64>>,
    pub(super) downgrade_usd: Option<Spanned<f64>>,
    pub(super) downgrade_to: Option<S>,
    pub(super) limit_usd: Option<Spanned<f64>>,
    #[serde(default)]
    pub(super) models: Vec<S>,
    #[serde(default)]
    pub(super) clients: Vec<S>,
    pub(super) webhook: Option<S>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawRoute {
    pub(super) name: Option<S>,
    pub(super) model: Option<S>,
    pub(super) target: Option<S>,
    pub(super) regex: Option<S>,
    #[serde(default)]
    pub(super) keywords: Vec<S>,
    pub(super) min_prompt_tokens: Option<Spanned<i64>>,
    pub(super) max_prompt_tokens: Option<Spanned<i64>>,
    pub(super) has_code: Option<bool>,
    pub(super) has_tools: Option<bool>,
    pub(super) headers: Option<Spanned<toml::Table>>,
    pub(super) metadata: Option<Spanned<toml::Table>>,
    pub(super) default: Option<bool>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawClient {
    pub(super) name: Option<S>,
    pub(super) key_hash: Option<S>,
    pub(super) models: Option<Vec<S>>,
    pub(super) rpm: Option<Spanned<i64>>,
    pub(super) tpm: Option<Spanned<i64>>,
    pub(super) max_parallel: Option<Spanned<i64>>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawState {
    pub(super) backend: Option<S>,
    pub(super) redis_url: Option<S>,
    pub(super) key_prefix: Option<S>,
    pub(super) timeout: Option<S>,
}
