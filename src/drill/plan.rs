//! The drill's plan, pure: the phases of the Black Friday scenario scaled to `--duration`, the fault script of
//! the primary upstream (what mode it is in from when), and the gateway config the drill runs.
//!
//! Owns the timing and the settings; must not do I/O or read a clock (offsets are durations from the start of
//! the load).

use std::time::Duration;

/// What the primary upstream does at some point of the drill.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Answers normally.
    Ok,
    /// Dead: every connection is reset after the request is read.
    Reset,
    /// Answers 429 with `Retry-After`.
    RateLimited,
    /// Answers after this many extra milliseconds.
    Slow(u64),
}

/// The fault of one phase.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// The primary dies.
    Dead,
    /// The primary goes down and up in turns.
    Flapping,
    /// The primary answers 429s.
    RateLimited,
    /// The primary slows to seconds.
    Slow,
}

/// One phase: its name, its window and, for a fault phase, when the primary is repaired.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Phase {
    /// The name in the report.
    pub name: &'static str,
    /// Start offset.
    pub start: Duration,
    /// End offset (exclusive).
    pub end: Duration,
    /// The fault, from `start` until `repaired`.
    pub fault: Option<Fault>,
    /// When the primary answers normally again (a fault phase: the rest of the phase shows the take-back).
    pub repaired: Duration,
}

/// The slow primary's added latency: "slows to seconds".
pub const SLOW_MS: u64 = 3_000;
/// The breaker's recovery time of the user's reference (reached by drills of 30 minutes and longer).
pub const REFERENCE_RECOVERY: Duration = Duration::from_secs(30);
/// How long each upstream takes to answer normally, ± [`UPSTREAM_JITTER_MS`].
pub const UPSTREAM_LATENCY_MS: u64 = 20;
/// See [`UPSTREAM_LATENCY_MS`].
pub const UPSTREAM_JITTER_MS: u64 = 5;
/// The shortest drill: every phase must be long enough for a few breaker decisions.
pub const MIN_DURATION: Duration = Duration::from_secs(10);
/// The longest drill.
pub const MAX_DURATION: Duration = Duration::from_secs(3_600);
/// Requests per second per core the drill can generate and serve on one machine (load generator, gateway and
/// three upstreams share it): `--rate` is capped at this times the cores.
pub const RATE_PER_CORE: u32 = 2_000;

/// Share of the duration of each phase: steady, four fault phases, recovered.
const SHARES: [(&str, Option<Fault>, u32); 6] = [
    ("steady", None, 10),
    ("dead", Some(Fault::Dead), 20),
    ("flapping", Some(Fault::Flapping), 20),
    ("rate_limited", Some(Fault::RateLimited), 20),
    ("slow", Some(Fault::Slow), 20),
    ("recovered", None, 10),
];

/// Percent of a fault phase during which the fault lasts; the rest shows the take-back.
pub const FAULT_PERCENT: u32 = 45;

/// Turns of a flapping primary: down, up, down, up, down, up.
const FLAPS: u32 = 6;

/// The phases of a drill of `duration`, back to back from 0 to `duration`.
pub fn phases(duration: Duration) -> Vec<Phase> {
    let total: u32 = SHARES.iter().map(|s| s.2).sum();
    let mut at = Duration::ZERO;
    let mut out = Vec::with_capacity(SHARES.len());
    for (i, (name, fault, share)) in SHARES.into_iter().enumerate() {
        let end = if i + 1 == SHARES.len() { duration } else { at + duration * share / total };
        let repaired = match fault {
            Some(_) => at + (end - at) * FAULT_PERCENT / 100,
            None => at,
        };
        out.push(Phase { name, start: at, end, fault, repaired });
        at = end;
    }
    out
}

/// The primary's mode changes, in time order: at each offset, the mode from then on.
pub fn script(phases: &[Phase]) -> Vec<(Duration, Mode)> {
    let mut out = vec![(Duration::ZERO, Mode::Ok)];
    for p in phases {
        let Some(fault) = p.fault else { continue };
        match fault {
            Fault::Dead => out.push((p.start, Mode::Reset)),
            Fault::RateLimited => out.push((p.start, Mode::RateLimited)),
            Fault::Slow => out.push((p.start, Mode::Slow(SLOW_MS))),
            Fault::Flapping => {
                let turn = (p.repaired - p.start) / FLAPS;
                for k in 0..FLAPS {
                    out.push((p.start + turn * k, if k % 2 == 0 { Mode::Reset } else { Mode::Ok }));
                }
            }
        }
        out.push((p.repaired, Mode::Ok));
    }
    out
}

/// Whether the primary is faulted at `t` (in a fault window; an up turn of a flapping primary counts as
/// faulted: it cannot be trusted yet).
pub fn faulted(phases: &[Phase], t: Duration) -> bool {
    phases.iter().any(|p| p.fault.is_some() && p.start <= t && t < p.repaired)
}

/// The breaker's recovery time for a drill of `duration`: the reference 30 s when the phases are long enough
/// for it, else scaled down (a sixtieth of the duration) so that each repair window sees a trial.
pub fn recovery_timeout(duration: Duration) -> Duration {
    Duration::from_millis((duration / 60).as_millis() as u64).clamp(Duration::from_millis(250), REFERENCE_RECOVERY)
}

/// The gateway config of the drill, pointing at the three upstreams `(name, base URL)`, primary first.
///
/// - Health: an HTTP probe of `/health` every 2 s (the low end of the reference 2–30 s), timeout 1 s: probes
///   stay apart from live requests in the upstreams' own counts, which is how the drill sees where live traffic
///   goes.
/// - Status: degraded below 50 % success over the last 20 checks (the default is 90 %). A degraded pair gets new
///   requests only when no healthy one is left, so with 90 % a repaired primary would wait for 18 good checks of
///   20 — some 40 s of probes at 2 s — before it gets traffic again: longer than a repair window of the drill.
/// - Breaker: 3 failures open it, 2 successes close it; recovery [`recovery_timeout`], doubling to twice that.
/// - Retries: 3 attempts (one per endpoint), a 1 s first-byte timeout per attempt, so a slow primary costs a
///   request at most about a second (under the 2 s p99 target) and times out into the breaker. No hedging: a
///   hedge's losing attempt has no verdict, so hedging would keep a slow primary's breaker closed.
/// - `queue_timeout` 1 s: a request that finds every breaker open waits that long for one to recover.
pub fn gateway_config(upstreams: &[(&str, String)], duration: Duration) -> String {
    let recovery = recovery_timeout(duration).as_millis();
    let mut s = format!(
        r#"[server]
listen = "127.0.0.1:0"

[health]
interval = "2s"
idle_interval = "30s"
timeout = "1s"
probe = "http"
probe_path = "/health"
min_success_rate = 0.5

[breaker]
failure_threshold = 3
recovery_timeout = "{recovery}ms"
max_recovery_timeout = "{max}ms"
success_threshold = 2

[retry]
max_attempts = 3
backoff_base = "50ms"
deadline = "10s"
queue_timeout = "1s"

[log]
enabled = false
"#,
        max = recovery * 2
    );
    for (i, (name, url)) in upstreams.iter().enumerate() {
        let weight = if i == 0 { 2 } else { 1 };
        s.push_str(&format!(
            "\n[[endpoints]]\nname = \"{name}\"\nbase_url = \"{url}\"\nweight = {weight}\nconnect_timeout = \"500ms\"\n\
             first_byte_timeout = \"1s\"\ntimeout = \"10s\"\nmodels = [\"{MODEL}\"]\n"
        ));
    }
    s.push_str(&format!(
        "\n[[models]]\nname = \"{MODEL}\"\ninput_usd_per_mtok = 2.0\noutput_usd_per_mtok = 8.0\n\
         strategy = \"weighted_round_robin\"\n"
    ));
    s
}

/// The model every drill request asks for.
pub const MODEL: &str = "gpt-4.1";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn phases_cover_the_duration_back_to_back() {
        for secs in [10, 20, 60, 61, 3_600] {
            let d = Duration::from_secs(secs);
            let p = phases(d);
            let names: Vec<_> = p.iter().map(|p| p.name).collect();
            assert_eq!(names, ["steady", "dead", "flapping", "rate_limited", "slow", "recovered"]);
            assert_eq!(p[0].start, Duration::ZERO);
            assert_eq!(p[5].end, d);
            for w in p.windows(2) {
                assert_eq!(w[0].end, w[1].start);
            }
            for ph in &p {
                assert!(ph.start < ph.end);
                assert!(ph.start <= ph.repaired && ph.repaired < ph.end);
                assert_eq!(ph.fault.is_none(), ph.repaired == ph.start);
            }
        }
        let p = phases(Duration::from_secs(60));
        assert_eq!(
            (p[1].start, p[1].repaired, p[1].end),
            (Duration::from_secs(6), Duration::from_millis(11_400), Duration::from_secs(18))
        );
    }

    #[test]
    fn the_script_faults_the_primary_in_each_fault_window_only() {
        let p = phases(Duration::from_secs(60));
        let s = script(&p);
        assert!(s.windows(2).all(|w| w[0].0 <= w[1].0), "in time order");
        let mode_at = |t: Duration| s.iter().rev().find(|(at, _)| *at <= t).map(|x| x.1);
        assert_eq!(mode_at(Duration::from_secs(3)), Some(Mode::Ok));
        assert_eq!(mode_at(Duration::from_secs(7)), Some(Mode::Reset));
        assert_eq!(mode_at(Duration::from_secs(12)), Some(Mode::Ok));
        // Flapping from 18 s: turns of 0.9 s, down first.
        assert_eq!(mode_at(Duration::from_millis(18_100)), Some(Mode::Reset));
        assert_eq!(mode_at(Duration::from_millis(19_000)), Some(Mode::Ok));
        assert_eq!(mode_at(Duration::from_millis(19_900)), Some(Mode::Reset));
        assert_eq!(mode_at(Duration::from_millis(31_000)), Some(Mode::RateLimited));
        assert_eq!(mode_at(Duration::from_millis(43_000)), Some(Mode::Slow(SLOW_MS)));
        assert_eq!(mode_at(Duration::from_millis(50_000)), Some(Mode::Ok));
        assert_eq!(mode_at(Duration::from_secs(59)), Some(Mode::Ok));
        assert!(faulted(&p, Duration::from_millis(19_000)), "an up turn of a flapping primary is still a fault");
        assert!(!faulted(&p, Duration::from_secs(12)));
        assert!(!faulted(&p, Duration::from_secs(3)));
    }

    #[test]
    fn recovery_is_the_reference_when_phases_are_long_enough() {
        assert_eq!(recovery_timeout(Duration::from_secs(60)), Duration::from_secs(1));
        assert_eq!(recovery_timeout(Duration::from_secs(10)), Duration::from_millis(250));
        assert_eq!(recovery_timeout(Duration::from_secs(1_800)), REFERENCE_RECOVERY);
        assert_eq!(recovery_timeout(Duration::from_secs(3_600)), REFERENCE_RECOVERY);
    }

    #[test]
    fn the_config_is_valid() {
        let ups = [("primary", "http://127.0.0.1:1/v1".to_string()), ("secondary", "http://127.0.0.1:2/v1".into())];
        let text = gateway_config(&ups, Duration::from_secs(60));
        let c =
            crate::config::parse(&text, "<drill>", &|_: &str| None::<String>).unwrap_or_else(|e| panic!("{e}\n{text}"));
        assert_eq!(c.endpoints.len(), 2);
        assert_eq!(c.endpoints[0].weight, 2);
        assert_eq!(c.breaker.failure_threshold, 3);
        assert_eq!(c.breaker.recovery_timeout, Duration::from_secs(1));
        assert_eq!(c.breaker.max_recovery_timeout, Duration::from_secs(2));
        assert_eq!(c.health.interval, Duration::from_secs(2));
        assert!(!c.log.enabled);
        assert_eq!(c.health.min_success_rate, 0.5);
    }
}
