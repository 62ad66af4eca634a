//! `sheepdog check`: one round of probes against every endpoint and model, with connect time, time to first
//! byte and total latency, as a table or JSON, for cron and for the person on call.

use std::collections::HashMap;
use std::io::Write;
use std::path::Path;
use std::process::ExitCode;
use std::time::Duration;

use serde::Serialize;
use tokio::time::Instant;

use crate::config::Config;
use crate::metrics::Metrics;
use crate::state::{Changes, Runtime, Shared};

/// One row of the check.
#[derive(Debug, Clone, Serialize)]
pub struct CheckResult {
    /// Endpoint name.
    pub endpoint: String,
    /// Public model name.
    pub model: String,
    /// healthy | degraded | unhealthy.
    pub status: &'static str,
    /// TCP connect time (DNS included), ms.
    pub connect_ms: Option<f64>,
    /// Time to the answer's head, ms.
    pub ttfb_ms: Option<f64>,
    /// Time to the whole answer, ms.
    pub total_ms: f64,
    /// HTTP status, if an answer came.
    pub http_status: Option<u16>,
    /// What went wrong (never contains a key).
    pub error: Option<String>,
}

async fn connect_ms(host: &str, port: u16, timeout: Duration) -> Result<f64, String> {
    let t = Instant::now();
    match tokio::time::timeout(timeout, tokio::net::TcpStream::connect((host, port))).await {
        Ok(Ok(_)) => Ok(t.elapsed().as_secs_f64() * 1000.0),
        Ok(Err(e)) => Err(format!("connect failed: {e}")),
        Err(_) => Err(format!("connect timeout after {} ms", timeout.as_millis())),
    }
}

/// Probe every pair once, concurrently.
pub async fn run(config: Config) -> Vec<CheckResult> {
    let metrics = Metrics::new();
    let shared = Shared {
        metrics: &metrics,
        changes: &Changes::default(),
        memory: &HashMap::new(),
        outbox: &Default::default(),
    };
    let rt = Runtime::build(config, None, &shared);
    let mut tasks = Vec::new();
    for e in &rt.endpoints {
        for (i, pair) in e.pairs.iter().enumerate() {
            let (e, pair, health) = (e.clone(), pair.clone(), rt.config.health.clone());
            tasks.push(tokio::spawn(async move {
                let (host, port) = e.base.host_port();
                let connect = connect_ms(&host, port, e.cfg.connect_timeout).await;
                let auth = e.keys.next().ok().flatten().map(|(_, h)| h.clone());
                let base = CheckResult {
                    endpoint: e.cfg.name.clone(),
                    model: pair.model().to_string(),
                    status: "unhealthy",
                    connect_ms: connect.as_ref().ok().copied(),
                    ttfb_ms: None,
                    total_ms: 0.0,
                    http_status: None,
                    error: None,
                };
                if let Err(err) = connect {
                    return CheckResult { error: Some(err), ..base };
                }
                let r = crate::health::probe(&e, pair.kind(), &e.cfg.models[i].1, &health, auth).await;
                let status = if !r.ok {
                    "unhealthy"
                } else if r.ttfb_ms > e.cfg.max_latency_ms as f64 {
                    "degraded"
                } else {
                    "healthy"
                };
                CheckResult {
                    status,
                    ttfb_ms: r.status.map(|_| r.ttfb_ms),
                    total_ms: r.total_ms,
                    http_status: r.status,
                    error: r.error,
                    ..base
                }
            }));
        }
    }
    let mut out = Vec::with_capacity(tasks.len());
    for t in tasks {
        if let Ok(r) = t.await {
            out.push(r);
        }
    }
    out
}

fn opt(v: Option<f64>) -> String {
    v.map(|x| format!("{x:.1}")).unwrap_or_else(|| "-".into())
}

/// Print the results (table or JSON), append to `--log`, and give the exit code.
pub fn report(results: &[CheckResult], json: bool, log: Option<&Path>) -> ExitCode {
    let mut out = std::io::stdout().lock();
    if json {
        let _ = writeln!(out, "{}", serde_json::to_string_pretty(results).unwrap_or_default());
    } else {
        let _ = writeln!(
            out,
            "{:<16} {:<24} {:<10} {:>10} {:>10} {:>10}  DETAIL",
            "ENDPOINT", "MODEL", "STATUS", "CONNECT_MS", "TTFB_MS", "TOTAL_MS"
        );
        for r in results {
            let _ = writeln!(
                out,
                "{:<16} {:<24} {:<10} {:>10} {:>10} {:>10.1}  {}",
                r.endpoint,
                r.model,
                r.status,
                opt(r.connect_ms),
                opt(r.ttfb_ms),
                r.total_ms,
                r.error.as_deref().unwrap_or("")
            );
        }
    }
    if let Some(path) = log {
        let ts = crate::clock::unix_s();
        let lines: String = results
            .iter()
            .map(|r| {
                let mut v = serde_json::to_value(r).unwrap_or_default();
                v["ts"] = ts.into();
                format!("{v}\n")
            })
            .collect();
        let written = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .and_then(|mut f| f.write_all(lines.as_bytes()));
        if let Err(e) = written {
            eprintln!("error: cannot append to {}: {e}", path.display());
            return ExitCode::from(2);
        }
    }
    if results.iter().all(|r| r.status == "healthy") && !results.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    }
}
