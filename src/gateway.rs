//! The gateway's shared root: the current [`Runtime`] snapshot, metrics, the clock, the recovery signal, the
//! request log, and reload.
//!
//! Everything a request handler or background task needs hangs off one `Arc<Gateway>`. Snapshots are swapped
//! atomically (`ArcSwap`): a request keeps the snapshot it started with, so a reload never drops it.

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::Arc;

use arc_swap::ArcSwap;
use sheepdog_policy::budget::Crossing;
use sheepdog_policy::pricing::Nanos;
use tokio::sync::Semaphore;

use crate::clock::Clock;
use crate::config::{self, Config, ConfigError};
use crate::log::{OpenError, RequestLog};
use crate::metrics::Metrics;
use crate::state::{Budget, Changes, Outbox, Runtime, Shared};
use crate::upstream::MemoryUpstream;

/// Requests that may wait at once for a candidate to recover (beyond this they fail at once).
pub const MAX_QUEUED: usize = 10_000;

/// Shared state of a running gateway.
pub struct Gateway {
    runtime: ArcSwap<Runtime>,
    /// Prometheus metrics.
    pub metrics: Metrics,
    /// The config file reloads read (none for the embedded demo).
    pub config_path: Option<PathBuf>,
    /// Where health is saved at shutdown and read back at start (`state::saved`); none for the demo.
    pub state_path: Option<PathBuf>,
    /// Process time.
    pub clock: Clock,
    /// Wakes requests waiting for a candidate to recover.
    pub changes: Changes,
    reload_lock: tokio::sync::Mutex<()>,
    /// Places in the recovery queue.
    pub queue: Semaphore,
    /// The persistent request log (opened at start; `[log]` changes need a restart).
    pub log: RequestLog,
    /// Where this replica's health changes go for the others (off with the memory backend).
    pub outbox: Outbox,
    /// The Redis backend (`[state] backend = "redis"`; `[state]` changes need a restart), run by
    /// `shared::run`.
    pub shared: Option<Arc<crate::shared::Redis>>,
    memory: HashMap<String, Arc<dyn MemoryUpstream>>,
}

/// What a reload did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reloaded {
    /// Settings that changed but only take effect after a restart (`server.listen`, `[log]`).
    pub needs_restart: Vec<&'static str>,
}

impl Gateway {
    /// A gateway for this config, with its request log (`[log]`) open.
    pub fn open(config: Config, config_path: Option<PathBuf>) -> Result<Arc<Gateway>, OpenError> {
        Gateway::open_with(config, config_path, HashMap::new())
    }

    /// Like [`Gateway::open`], with in-memory upstreams in place of the endpoints they are named after
    /// (pipeline tests).
    pub fn open_with(
        config: Config,
        config_path: Option<PathBuf>,
        memory: HashMap<String, Arc<dyn MemoryUpstream>>,
    ) -> Result<Arc<Gateway>, OpenError> {
        let metrics = Metrics::new();
        let log = RequestLog::open(&log_config(&config), &metrics)?;
        let changes = Changes::default();
        // The embedded demo's upstreams get new ports each start: nothing of theirs to keep.
        let state_path = config_path.as_ref().map(|_| crate::state::saved::path_for(&config.log.path));
        let (outbox, shared) = match config.state.backend {
            config::StateBackend::Memory => (Outbox::default(), None),
            config::StateBackend::Redis => {
                let (outbox, rx) = Outbox::channel();
                let redis = crate::shared::Redis::new(&config.state, rx, metrics.state_up.clone());
                (outbox, Some(Arc::new(redis)))
            }
        };
        let runtime = Runtime::build(
            config,
            None,
            &Shared { metrics: &metrics, changes: &changes, memory: &memory, outbox: &outbox },
        );
        resume_budgets(&runtime, &log);
        let clock = Clock::new();
        if let Some(p) = &state_path {
            crate::state::saved::restore(&runtime, p, clock.now_ms(), crate::clock::unix_ms());
        }
        Ok(Arc::new(Gateway {
            runtime: ArcSwap::from_pointee(runtime),
            metrics,
            config_path,
            state_path,
            clock,
            changes,
            reload_lock: tokio::sync::Mutex::new(()),
            queue: Semaphore::new(MAX_QUEUED),
            log,
            outbox,
            shared,
            memory,
        }))
    }

    /// Save every pair's breaker and history, and the manual drains, for the next start (graceful shutdown).
    pub fn save_state(&self) {
        let Some(path) = &self.state_path else { return };
        match crate::state::saved::save(&self.runtime(), path, self.now_ms(), crate::clock::unix_ms()) {
            Ok(n) => tracing::info!(file = %path.display(), pairs = n, "health state saved for the next start"),
            Err(e) => tracing::warn!(file = %path.display(), error = %e, "health state could not be saved"),
        }
    }

    /// The current snapshot.
    pub fn runtime(&self) -> Arc<Runtime> {
        self.runtime.load_full()
    }

    /// Milliseconds since the gateway started, on tokio's clock (so tests can pause it). Never 0.
    pub fn now_ms(&self) -> u64 {
        self.clock.now_ms()
    }

    /// Load the config file again and swap it in; on error the old config stays.
    pub async fn reload(&self) -> Result<Reloaded, ReloadError> {
        let Some(path) = &self.config_path else { return Err(ReloadError::NoFile) };
        let _guard = self.reload_lock.lock().await;
        let path2 = path.clone();
        let loaded =
            tokio::task::spawn_blocking(move || config::load_file(&path2)).await.map_err(|_| ReloadError::NoFile)?;
        self.metrics.reload(loaded.is_ok());
        Ok(self.apply(loaded.map_err(ReloadError::Invalid)?))
    }

    /// Swap in a new validated config, keeping live state of unchanged endpoints; series of pairs and models
    /// that no longer exist leave `/metrics`.
    pub fn apply(&self, config: Config) -> Reloaded {
        let old = self.runtime.load_full();
        let mut needs_restart = Vec::new();
        if config.server.listen != old.config.server.listen {
            needs_restart.push("server.listen");
        }
        if config.log != old.config.log {
            needs_restart.push("log");
        }
        if config.state != old.config.state {
            needs_restart.push("state");
        }
        for what in &needs_restart {
            tracing::warn!(setting = what, "changed in the file, but takes effect only after a restart");
        }
        let shared =
            Shared { metrics: &self.metrics, changes: &self.changes, memory: &self.memory, outbox: &self.outbox };
        let rt = Runtime::build(config, Some(&old), &shared);
        let pairs: HashSet<(&str, &str)> = rt.pair_labels().collect();
        for (_, p) in old.pairs() {
            if !pairs.contains(&(p.endpoint(), p.model())) {
                self.metrics.remove_pair(p.metrics());
            }
        }
        for (name, m) in &old.models {
            if !rt.models.contains_key(name) {
                self.metrics.remove_model(&m.metrics);
            }
        }
        for b in &old.budgets {
            if !rt.budgets.iter().any(|n| n.cfg.name == b.cfg.name) {
                self.metrics.budgets.remove(b.name());
            }
        }
        for c in old.clients.iter() {
            if !rt.clients.iter().any(|n| n.name == c.name) {
                for m in old.models.values().chain(rt.models.values()) {
                    m.metrics.forget_client(&c.name);
                }
            }
        }
        tracing::info!(endpoints = rt.endpoints.len(), models = rt.models.len(), "configuration loaded");
        self.runtime.store(Arc::new(rt));
        self.changes.notify();
        Reloaded { needs_restart }
    }

    /// Announce thresholds a budget's spend crossed — a warning, the crossing metric, the budget's webhook
    /// (posted off the caller's path) — for a request's settlement in *finish*, or for the fleet's total when
    /// this replica's addition carried it across (`by_fleet`).
    pub fn announce_crossings(&self, b: &Budget, crossed: &[Crossing], spent: Nanos, by_fleet: bool) {
        for c in crossed {
            let (budget, threshold, spent_usd) = (b.name(), c.as_str(), spent.usd());
            if by_fleet {
                tracing::warn!(budget, threshold, spent_usd, "budget threshold crossed by the fleet");
            } else {
                tracing::warn!(budget, threshold, spent_usd, "budget threshold crossed");
            }
            self.metrics.budgets.crossing(budget, threshold);
            if let Some(url) = &b.cfg.webhook {
                let body = serde_json::json!({
                    "budget": budget,
                    "threshold": threshold,
                    "spent_usd": spent_usd,
                    "period": b.cfg.period.name(),
                });
                crate::upstream::webhook::post(url, body.to_string(), self.metrics.webhook_failures.clone());
            }
        }
    }
}

/// The longest a budget's period needs the request log's rows kept: a month and a day.
const MONTHLY_RETENTION: std::time::Duration = std::time::Duration::from_secs(32 * 86_400);

/// The request log's settings, its retention lengthened to cover a monthly budget's period (its spend is
/// rebuilt from the rows at start).
fn log_config(config: &Config) -> config::LogConfig {
    let mut log = config.log.clone();
    let monthly = config.budgets.iter().any(|b| b.period == config::Period::Month);
    if monthly && !log.retention.is_zero() && log.retention < MONTHLY_RETENTION {
        tracing::info!(days = 32, "request log retention lengthened to cover the monthly budgets' period");
        log.retention = MONTHLY_RETENTION;
    }
    log
}

/// Rebuild the budgets' spend of the current period from the request log (a budget without a log starts
/// empty, and says so when that loses money).
fn resume_budgets(rt: &Runtime, log: &RequestLog) {
    if rt.budgets.is_empty() {
        return;
    }
    let Some(source) = log.source() else {
        tracing::warn!("budgets start from zero: the request log is off, so spend does not survive a restart");
        return;
    };
    crate::state::budgets::resume(&rt.budgets, crate::clock::unix_ms(), |since| {
        source.spend_since(since).unwrap_or_else(|e| {
            tracing::warn!(error = %e, log = %source, "budget spend could not be read from the request log");
            Vec::new()
        })
    });
}

/// Why a reload was refused.
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    /// Running the embedded demo: there is no file to read.
    #[error("no config file: the gateway runs the embedded demo")]
    NoFile,
    /// The new config is invalid; the old one stays.
    #[error("{0}")]
    Invalid(ConfigError),
}
