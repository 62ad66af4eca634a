//! The embedded demo: three simulated upstreams in-process (`primary`, `secondary`, `fallback`) and the
//! `sheepdog.toml` text that points at them, so `sheepdog` with no config shows failover at work with no keys
//! and no services. The gateway parses that text like any config file.

use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::{self as mock, MockHandle, MockOptions};

/// The running demo upstreams and the config that uses them.
pub struct Demo {
    /// The config file text pointing at the three mocks.
    pub config_toml: String,
    mocks: Vec<MockHandle>,
}

const MODELS: [&str; 5] =
    ["gpt-4.1", "claude-sonnet-4.5", "gemini-2.5-flash", "deepseek-v3.2", "text-embedding-3-small"];

impl Demo {
    /// Start the three mocks on free loopback ports.
    pub async fn start() -> std::io::Result<Demo> {
        let mut mocks = Vec::new();
        let mut urls = Vec::new();
        for (name, latency_ms, jitter_ms, tps, seed) in
            [("primary", 120, 60, 60.0, 1), ("secondary", 250, 120, 40.0, 2), ("fallback", 400, 200, 30.0, 3)]
        {
            let listener = TcpListener::bind("127.0.0.1:0").await?;
            let opts = MockOptions {
                name: name.to_string(),
                models: MODELS.iter().map(|m| m.to_string()).collect(),
                latency_ms,
                jitter_ms,
                tokens_per_sec: tps,
                seed,
                ..MockOptions::default()
            };
            let h = mock::spawn(listener, opts)?;
            urls.push(format!("http://{}/v1", h.local_addr()));
            mocks.push(h);
        }
        let config_toml = config_toml(&urls[0], &urls[1], &urls[2]);
        Ok(Demo { config_toml, mocks })
    }

    /// Let `secondary` misbehave now and then (errors, then slowness), so breakers and failover show.
    pub fn misbehave(&self, mut shutdown: watch::Receiver<bool>) {
        let Some(secondary) = self.mocks.get(1).cloned() else { return };
        tokio::spawn(async move {
            use mock::FaultMode::{Error500, Ok, Slow};
            let script = [(40, Error500, "error_500"), (15, Ok, "ok"), (40, Slow, "slow"), (15, Ok, "ok")];
            loop {
                for (secs, mode, name) in script {
                    tokio::select! {
                        _ = tokio::time::sleep(Duration::from_secs(secs)) => {}
                        _ = shutdown.changed() => return,
                    }
                    let faults = mock::Faults { mode: Some(mode), latency_ms: Some(2500), ..Default::default() };
                    secondary.set_faults(faults);
                    tracing::info!(endpoint = "secondary", mode = name, "demo: simulated upstream changes behaviour");
                }
            }
        });
    }
}

impl Drop for Demo {
    fn drop(&mut self) {
        for m in &self.mocks {
            m.shutdown();
        }
    }
}

/// The demo's `sheepdog.toml` for the base URLs of the three mocks.
pub fn config_toml(primary: &str, secondary: &str, fallback: &str) -> String {
    format!(
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
    )
}
