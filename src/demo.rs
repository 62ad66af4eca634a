//! The embedded demo: three simulated upstreams in-process (`primary`, `secondary`, `fallback`) and a config
//! that points at them, so `sheepdog` with no config shows failover at work with no keys and no services.

use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::config::{self, Config};
use crate::mock::{self, MockHandle, MockOptions};

/// The running demo upstreams and the config that uses them.
pub struct Demo {
    /// Config pointing at the three mocks.
    pub config: Config,
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
        let config = config::demo(&urls[0], &urls[1], &urls[2]);
        Ok(Demo { config, mocks })
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
