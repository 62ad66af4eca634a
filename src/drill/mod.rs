//! `sheepdog drill`: the Black Friday outage drill, in-process, on this machine. Three simulated upstreams
//! (`sheepdog-mock`), a real gateway on a loopback port (the same `Gateway`, prober and HTTP server as
//! `sheepdog serve`), and an open-loop load of chat requests; the primary upstream dies, flaps, answers 429s,
//! slows to seconds and recovers, and the report says per phase what the clients saw and how fast the gateway
//! moved traffic away and back.
//!
//! Layout: [`plan`] (phases, the primary's fault script, the gateway config — pure), [`report`] (figures,
//! verdict, JSON and table — pure), [`load`] (the load generator); this file is the thin I/O shell that starts
//! everything, runs the script and a monitor of the primary, and stops it all.
//!
//! Owns the drill; must not change how the gateway works: it only configures one and watches it from outside
//! (the primary's own request count) and through its pair state (breaker and status).

pub mod load;
pub mod plan;
pub mod report;

use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use sheepdog_mock::{FaultMode, Faults, MockHandle, MockOptions};
use sheepdog_policy::breaker::BreakerState;
use sheepdog_policy::history::Status;
use tokio::sync::watch;
use tokio::time::Instant;

use crate::config;
use crate::gateway::Gateway;
use plan::{Mode, Phase};
use report::{Report, Sample};

/// The three upstreams, primary first.
pub const UPSTREAMS: [&str; 3] = ["primary", "secondary", "tertiary"];

/// How often the monitor looks at the primary.
const SAMPLE_EVERY: Duration = Duration::from_millis(5);

/// What a drill needs: the load and its length.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Options {
    /// Requests per second.
    pub rate: u32,
    /// Length of the whole drill.
    pub duration: Duration,
}

impl Options {
    /// Check the options against this machine: a duration within the drill's limits and a rate it can serve.
    pub fn validate(&self, cores: u32) -> Result<(), String> {
        let max_rate = plan::RATE_PER_CORE * cores.max(1);
        if self.rate == 0 || self.rate > max_rate {
            return Err(format!(
                "--rate must be between 1 and {max_rate} requests/s on this machine ({cores} cores), got {}",
                self.rate
            ));
        }
        if self.duration < plan::MIN_DURATION || self.duration > plan::MAX_DURATION {
            return Err(format!(
                "--duration must be between {}s and {}s, got {:?}",
                plan::MIN_DURATION.as_secs(),
                plan::MAX_DURATION.as_secs(),
                self.duration
            ));
        }
        Ok(())
    }
}

/// Why a drill could not run.
#[derive(Debug, thiserror::Error)]
pub enum DrillError {
    /// An upstream or the gateway could not start.
    #[error("cannot start the drill: {0}")]
    Start(String),
}

/// `sheepdog drill`: run it, print the report, exit 0 when it passed, 1 when not, 2 on bad options.
pub async fn command(rate: u32, duration: &str, json: bool) -> ExitCode {
    let duration = match config::parse_duration(duration) {
        Ok(d) => d,
        Err(e) => {
            eprintln!("error: --duration: {e}");
            return ExitCode::from(2);
        }
    };
    let opts = Options { rate, duration };
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get() as u32);
    if let Err(e) = opts.validate(cores) {
        eprintln!("error: {e}");
        return ExitCode::from(2);
    }
    let (report, phases) = match run(opts).await {
        Ok(x) => x,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(1);
        }
    };
    let text = if json { report::json(&report) + "\n" } else { report::table(&report, &header(opts), &phases) };
    use std::io::Write;
    let _ = std::io::stdout().lock().write_all(text.as_bytes());
    if report.passed {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    }
}

/// What the table says before the figures: the scenario, the gateway's settings, the definitions.
fn header(opts: Options) -> String {
    let recovery = plan::recovery_timeout(opts.duration);
    format!(
        "sheepdog drill: {} requests/s for {:.0} s over 3 simulated upstreams ({} weight 2, {} and {} weight 1; \
         {} ± {} ms each)\n\
         scenario: the primary dies (connections reset), flaps, answers 429s, slows to {} s, each for the first \
         {}% of its phase, then is repaired; then all is well\n\
         gateway: HTTP probe every 2 s (timeout 1 s), degraded below 50 % of the last 20 checks; breaker opens after 3 failures, recovery {} ms doubling to \
         {} ms, closes after 2 successes; 3 attempts, first byte within 1 s, queue 1 s, no hedging\n\
         detect = fault → breaker open or pair degraded/unhealthy; shift = fault → last live request reaching the primary; \
         recover = repair → first live request reaching it again\n",
        opts.rate,
        opts.duration.as_secs_f64(),
        UPSTREAMS[0],
        UPSTREAMS[1],
        UPSTREAMS[2],
        plan::UPSTREAM_LATENCY_MS,
        plan::UPSTREAM_JITTER_MS,
        plan::SLOW_MS / 1000,
        plan::FAULT_PERCENT,
        recovery.as_millis(),
        recovery.as_millis() * 2,
    )
}

/// Run a drill: start the upstreams and the gateway, run the load, the fault script and the monitor, stop
/// everything; the report and the phases it covers.
pub async fn run(opts: Options) -> Result<(Report, Vec<Phase>), DrillError> {
    let mut mocks = Vec::with_capacity(UPSTREAMS.len());
    for (i, name) in UPSTREAMS.iter().enumerate() {
        mocks.push(upstream(name, i as u64 + 1).await?);
    }
    let upstreams: Vec<(&str, String)> =
        UPSTREAMS.iter().zip(&mocks).map(|(n, m)| (*n, format!("http://{}/v1", m.local_addr()))).collect();
    let text = plan::gateway_config(&upstreams, opts.duration);
    let cfg =
        config::parse(&text, "<drill>", &|_: &str| None::<String>).map_err(|e| DrillError::Start(e.to_string()))?;
    let (listener, addr) =
        crate::http::bind(&cfg.server.listen).await.map_err(|e| DrillError::Start(format!("gateway: {e}")))?;
    let gw = Gateway::open(cfg, None).map_err(|e| DrillError::Start(format!("gateway: {e}")))?;
    let (stop, stopped) = watch::channel(false);
    tokio::spawn(crate::health::run(gw.clone(), stopped.clone()));
    let server = tokio::spawn(crate::http::serve(gw.clone(), listener, stopped.clone()));

    let phases = plan::phases(opts.duration);
    let start = Instant::now();
    let primary = mocks[0].clone();
    let script = tokio::spawn(run_script(primary.clone(), plan::script(&phases), start, stopped.clone()));
    let monitor = tokio::spawn(watch_primary(gw.clone(), primary, start, stopped));
    let url: http::Uri = format!("http://{addr}/v1/chat/completions")
        .parse()
        .map_err(|e: http::uri::InvalidUri| DrillError::Start(e.to_string()))?;
    let records = load::run(url, plan::MODEL, opts.rate, opts.duration, start).await;

    stop.send_replace(true);
    let samples = monitor.await.unwrap_or_default();
    let _ = script.await;
    let _ = server.await;
    for m in &mocks {
        m.shutdown();
    }
    // The secondary and tertiary are never faulted: something could always serve, so every failure is lost.
    let others = UPSTREAMS.len() - 1;
    let could_serve = |t_ms: f64| others > 0 || !plan::faulted(&phases, Duration::from_secs_f64(t_ms / 1000.0));
    Ok((report::build(opts.rate, &phases, &records, &samples, &could_serve), phases))
}

/// Start one simulated upstream on a free loopback port.
async fn upstream(name: &str, seed: u64) -> Result<MockHandle, DrillError> {
    let err = |e: std::io::Error| DrillError::Start(format!("upstream {name}: {e}"));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.map_err(err)?;
    let opts = MockOptions {
        name: name.to_string(),
        models: vec![plan::MODEL.to_string()],
        latency_ms: plan::UPSTREAM_LATENCY_MS,
        jitter_ms: plan::UPSTREAM_JITTER_MS,
        seed,
        ..MockOptions::default()
    };
    sheepdog_mock::spawn(listener, opts).map_err(err)
}

/// Put the primary into each mode of the script when its time comes.
async fn run_script(
    primary: MockHandle,
    script: Vec<(Duration, Mode)>,
    start: Instant,
    mut stop: watch::Receiver<bool>,
) {
    for (at, mode) in script {
        tokio::select! {
            _ = tokio::time::sleep_until(start + at) => {}
            _ = stop.changed() => return,
        }
        let (mode, latency_ms) = match mode {
            Mode::Ok => (FaultMode::Ok, None),
            Mode::Reset => (FaultMode::Reset, None),
            Mode::RateLimited => (FaultMode::Error429, None),
            Mode::Slow(ms) => (FaultMode::Slow, Some(ms)),
        };
        tracing::debug!(?mode, at_ms = at.as_millis() as u64, "drill: the primary changes");
        primary.set_faults(Faults { mode: Some(mode), latency_ms, retry_after_s: Some(1), ..Faults::default() });
    }
}

/// Sample the primary every [`SAMPLE_EVERY`] until stopped: whether the gateway has taken it out of the first
/// tier (its breaker open, or its pair degraded or unhealthy: new requests then go to it only when no healthy
/// endpoint is left) and how many live chat requests reached it (its own count; probes go to `/health`).
async fn watch_primary(
    gw: Arc<Gateway>,
    primary: MockHandle,
    start: Instant,
    stop: watch::Receiver<bool>,
) -> Vec<Sample> {
    let mut samples = Vec::new();
    let mut tick = tokio::time::interval(SAMPLE_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    while !*stop.borrow() {
        tick.tick().await;
        let rt = gw.runtime();
        let pair = rt.pairs().find(|(e, _)| e.cfg.name == UPSTREAMS[0]).map(|(_, p)| p.clone());
        let out = pair.is_some_and(|p| {
            p.breaker_state() == BreakerState::Open || matches!(p.status(), Status::Degraded | Status::Unhealthy)
        });
        let hits = primary.stats().by_path.get("/v1/chat/completions").copied().unwrap_or(0);
        samples.push(Sample { at_ms: (Instant::now() - start).as_secs_f64() * 1000.0, out, hits });
    }
    samples
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options_are_checked_against_the_machine() {
        let ok = Options { rate: 500, duration: Duration::from_secs(60) };
        assert!(ok.validate(2).is_ok());
        assert!(Options { rate: 4_000, ..ok }.validate(2).is_ok());
        assert!(Options { rate: 4_001, ..ok }.validate(2).is_err());
        assert!(Options { rate: 0, ..ok }.validate(2).is_err());
        assert!(Options { duration: Duration::from_secs(9), ..ok }.validate(2).is_err());
        assert!(Options { duration: Duration::from_secs(3_601), ..ok }.validate(2).is_err());
    }
}
