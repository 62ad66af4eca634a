//! The gateway's shared state: the current [`Runtime`] snapshot, metrics, the clock, and reload.
//!
//! Everything a request handler or background task needs hangs off one `Arc<Gateway>`. Snapshots are swapped
//! atomically (`ArcSwap`): a request keeps the snapshot it started with, so a reload never drops it.

use std::path::PathBuf;
use std::sync::Arc;

use arc_swap::ArcSwap;
use tokio::sync::Semaphore;
use tokio::time::Instant;

use crate::config::{self, Config, ConfigError};
use crate::metrics::Metrics;
use crate::requestlog::{OpenError, RequestLog};
use crate::state::Runtime;

/// Requests that may wait at once for a candidate to recover (beyond this they fail at once).
pub const MAX_QUEUED: usize = 10_000;

/// Shared state of a running gateway.
pub struct Gateway {
    runtime: ArcSwap<Runtime>,
    /// Prometheus metrics.
    pub metrics: Metrics,
    /// The config file reloads read (none for the embedded demo).
    pub config_path: Option<PathBuf>,
    start: Instant,
    reload_lock: tokio::sync::Mutex<()>,
    /// Places in the recovery queue.
    pub queue: Semaphore,
    /// The persistent request log (opened at start; `[log]` changes need a restart).
    pub log: RequestLog,
}

impl Gateway {
    /// A gateway for this config, with its request log (`[log]`) open.
    pub fn open(config: Config, config_path: Option<PathBuf>) -> Result<Arc<Gateway>, OpenError> {
        let metrics = Metrics::new();
        let log = RequestLog::open(&config.log, &metrics)?;
        let runtime = Runtime::build(config, None, &metrics);
        Ok(Arc::new(Gateway {
            runtime: ArcSwap::from_pointee(runtime),
            metrics,
            config_path,
            start: Instant::now(),
            reload_lock: tokio::sync::Mutex::new(()),
            queue: Semaphore::new(MAX_QUEUED),
            log,
        }))
    }

    /// The current snapshot.
    pub fn runtime(&self) -> Arc<Runtime> {
        self.runtime.load_full()
    }

    /// Milliseconds since the gateway started, on tokio's clock (so tests can pause it). Never 0.
    pub fn now_ms(&self) -> u64 {
        self.start.elapsed().as_millis() as u64 + 1
    }

    /// Load the config file again and swap it in; on error the old config stays.
    pub async fn reload(&self) -> Result<(), ReloadError> {
        let Some(path) = &self.config_path else { return Err(ReloadError::NoFile) };
        let _guard = self.reload_lock.lock().await;
        let path2 = path.clone();
        let config = tokio::task::spawn_blocking(move || config::load_file(&path2))
            .await
            .map_err(|_| ReloadError::NoFile)?
            .map_err(ReloadError::Invalid)?;
        self.apply(config);
        Ok(())
    }

    /// Swap in a new validated config, keeping live state of unchanged endpoints.
    pub fn apply(&self, config: Config) {
        let old = self.runtime.load_full();
        if config.log != old.config.log {
            tracing::warn!("[log] changed: the request log keeps its old settings until a restart");
        }
        let rt = Runtime::build(config, Some(&old), &self.metrics);
        tracing::info!(endpoints = rt.endpoints.len(), models = rt.models.len(), "configuration loaded");
        self.runtime.store(Arc::new(rt));
    }
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
