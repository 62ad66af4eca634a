//! The drill's figures, pure: what the load generator and the monitor recorded, turned into the per-phase
//! report (success rate, p50 / p99, time to detect, to shift and to recover, requests lost), the verdict, and
//! the report as JSON (the contract's shape) or as a table.
//!
//! Definitions, for a fault phase (fault from the phase's start until the primary is repaired):
//! - **detect**: from the start of the fault to the first sample showing the primary's breaker open or its pair
//!   degraded or unhealthy — out of the balancer's first tier, so new requests go to it only when no healthy
//!   endpoint is left (0 when it still was so from before); none when none of that happened before the repair.
//! - **shift**: from the start of the fault to the last sample in the fault window at which the primary's own
//!   count of live requests had grown (0 when none reached it): after it, no live request reached it.
//! - **recover**: from the repair to the first sample at which a live request had reached the primary again;
//!   none when that did not happen within the phase.
//! - **lost**: a request that got no 2xx although at least one endpoint could serve when it was sent.
//!
//! Must not do I/O or read a clock: times come in as milliseconds from the start of the load.

use serde::Serialize;
use sheepdog_policy::stats::{percentile, sort_finite};

use super::plan::Phase;

/// The success rate a drill must reach, as a fraction.
pub const MIN_SUCCESS: f64 = 0.999;

/// One request of the load: when it was due (ms from the start), how long it took and whether it got a 2xx.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Record {
    /// When it was scheduled to be sent.
    pub at_ms: f64,
    /// From then until its answer was read (or it failed).
    pub latency_ms: f64,
    /// It got a 2xx with its whole body.
    pub ok: bool,
}

/// One look at the primary: when, whether the gateway had it out of its first tier (breaker open, pair degraded
/// or unhealthy), and how many live requests had reached it so far (its own count).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Sample {
    /// When (ms from the start).
    pub at_ms: f64,
    /// Its breaker was open or its pair degraded or unhealthy.
    pub out: bool,
    /// Live requests it had received so far.
    pub hits: u64,
}

/// One phase of the report (the contract's field names).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PhaseReport {
    /// Phase name.
    pub name: &'static str,
    /// Requests due in the phase.
    pub requests: u64,
    /// Of them, answered with a 2xx.
    pub ok: u64,
    /// `ok / requests` (1 when there were none).
    pub success_rate: f64,
    /// Median latency, ms.
    pub p50_ms: Option<f64>,
    /// 99th percentile latency, ms.
    pub p99_ms: Option<f64>,
    /// Time to detect the fault, ms.
    pub detect_ms: Option<u64>,
    /// Time until no live request reached the faulted upstream, ms.
    pub shift_ms: Option<u64>,
    /// Time from the repair until a live request reached it again, ms.
    pub recover_ms: Option<u64>,
    /// Requests lost.
    pub lost: u64,
}

/// The whole drill.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Total {
    /// Requests sent.
    pub requests: u64,
    /// Answered with a 2xx.
    pub ok: u64,
    /// `ok / requests`.
    pub success_rate: f64,
    /// Requests lost.
    pub lost: u64,
}

/// The drill's report: `sheepdog drill --json` prints exactly this.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Report {
    /// Requests per second.
    pub rate: u32,
    /// Length of the load, seconds.
    pub duration_s: f64,
    /// Per phase, in order.
    pub phases: Vec<PhaseReport>,
    /// All phases.
    pub total: Total,
    /// Success at least [`MIN_SUCCESS`] and nothing lost.
    pub passed: bool,
}

fn rate(ok: u64, requests: u64) -> f64 {
    if requests == 0 {
        return 1.0;
    }
    (ok as f64 / requests as f64 * 1e6).round() / 1e6
}

fn tenth(ms: f64) -> f64 {
    (ms * 10.0).round() / 10.0
}

fn ms(d: std::time::Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// The report of a drill: `records` of the load, `samples` of the primary in time order, and whether any
/// endpoint could serve at a given time (ms).
pub fn build(
    rate_rps: u32,
    phases: &[Phase],
    records: &[Record],
    samples: &[Sample],
    could_serve: &dyn Fn(f64) -> bool,
) -> Report {
    let lost = |r: &&&Record| !r.ok && could_serve(r.at_ms);
    let mut out = Vec::with_capacity(phases.len());
    for p in phases {
        let (start, end) = (ms(p.start), ms(p.end));
        let mine: Vec<&Record> = records.iter().filter(|r| start <= r.at_ms && r.at_ms < end).collect();
        let ok = mine.iter().filter(|r| r.ok).count() as u64;
        let mut lat: Vec<f64> = mine.iter().map(|r| r.latency_ms).collect();
        sort_finite(&mut lat);
        let (detect_ms, shift_ms, recover_ms) = match p.fault {
            Some(_) => timings(samples, start, ms(p.repaired), end),
            None => (None, None, None),
        };
        out.push(PhaseReport {
            name: p.name,
            requests: mine.len() as u64,
            ok,
            success_rate: rate(ok, mine.len() as u64),
            p50_ms: percentile(&lat, 0.5).map(tenth),
            p99_ms: percentile(&lat, 0.99).map(tenth),
            detect_ms,
            shift_ms,
            recover_ms,
            lost: mine.iter().filter(lost).count() as u64,
        });
    }
    let requests = out.iter().map(|p| p.requests).sum();
    let ok = out.iter().map(|p| p.ok).sum();
    let total = Total { requests, ok, success_rate: rate(ok, requests), lost: out.iter().map(|p| p.lost).sum() };
    let passed = requests > 0 && total.success_rate >= MIN_SUCCESS && total.lost == 0;
    let duration_s = phases.last().map_or(0.0, |p| p.end.as_secs_f64());
    Report { rate: rate_rps, duration_s, phases: out, total, passed }
}

/// Detect, shift and recover of a fault from `start` to `repaired` in a phase ending at `end` (see the module
/// header).
fn timings(samples: &[Sample], start: f64, repaired: f64, end: f64) -> (Option<u64>, Option<u64>, Option<u64>) {
    let since = |t: f64, from: f64| Some((t - from).max(0.0).round() as u64);
    let fault: Vec<&Sample> = samples.iter().filter(|s| start <= s.at_ms && s.at_ms < repaired).collect();
    let detect = fault.iter().find(|s| s.out).and_then(|s| since(s.at_ms, start));
    let shift = fault.windows(2).rfind(|w| w[1].hits > w[0].hits).map_or(Some(0), |w| since(w[1].at_ms, start));
    let before = samples.iter().rfind(|s| s.at_ms <= repaired).map_or(0, |s| s.hits);
    let recover = samples
        .iter()
        .find(|s| repaired < s.at_ms && s.at_ms < end && s.hits > before)
        .and_then(|s| since(s.at_ms, repaired));
    (detect, shift, recover)
}

/// The report as one JSON object (the contract's shape).
pub fn json(r: &Report) -> String {
    serde_json::to_string_pretty(r).unwrap_or_default()
}

/// The report as a table, after `header` lines.
pub fn table(r: &Report, header: &str, phases: &[Phase]) -> String {
    use std::fmt::Write;
    let opt = |v: Option<u64>| v.map_or("–".to_string(), |v| v.to_string());
    let optf = |v: Option<f64>| v.map_or("–".to_string(), |v| format!("{v:.1}"));
    let mut s = String::from(header);
    let _ = writeln!(
        s,
        "\n{:<13} {:>15} {:>13} {:>8} {:>8} {:>9} {:>8} {:>8} {:>9} {:>8} {:>10} {:>5}",
        "phase",
        "window s",
        "fault until s",
        "requests",
        "ok",
        "success",
        "p50 ms",
        "p99 ms",
        "detect ms",
        "shift ms",
        "recover ms",
        "lost"
    );
    for (p, plan) in r.phases.iter().zip(phases) {
        let window = format!("{:.1}–{:.1}", plan.start.as_secs_f64(), plan.end.as_secs_f64());
        let until = plan.fault.map_or("–".to_string(), |_| format!("{:.1}", plan.repaired.as_secs_f64()));
        let _ = writeln!(
            s,
            "{:<13} {:>15} {:>13} {:>8} {:>8} {:>8.3}% {:>8} {:>8} {:>9} {:>8} {:>10} {:>5}",
            p.name,
            window,
            until,
            p.requests,
            p.ok,
            p.success_rate * 100.0,
            optf(p.p50_ms),
            optf(p.p99_ms),
            opt(p.detect_ms),
            opt(p.shift_ms),
            opt(p.recover_ms),
            p.lost
        );
    }
    let t = &r.total;
    let _ = writeln!(
        s,
        "{:<13} {:>15} {:>13} {:>8} {:>8} {:>8.3}% {:>8} {:>8} {:>9} {:>8} {:>10} {:>5}",
        "total",
        "",
        "",
        t.requests,
        t.ok,
        t.success_rate * 100.0,
        "",
        "",
        "",
        "",
        "",
        t.lost
    );
    let _ = writeln!(
        s,
        "\n{}: success {:.3} % (needs >= {:.1} %), {} lost while an endpoint could serve",
        if r.passed { "PASSED" } else { "FAILED" },
        t.success_rate * 100.0,
        MIN_SUCCESS * 100.0,
        t.lost
    );
    s
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::drill::plan::phases;

    fn sample(at_ms: f64, out: bool, hits: u64) -> Sample {
        Sample { at_ms, out, hits }
    }

    #[test]
    fn timings_of_a_fault() {
        // Fault 1000..2000 ms, phase ends at 3000 ms; samples every 100 ms.
        let mut s = Vec::new();
        for i in 0..30 {
            let t = f64::from(i) * 100.0;
            // In rotation until 1200, hits grow until 1300 (requests already on their way), then not until 2400.
            let out = (1200.0..2300.0).contains(&t);
            let hits = if t < 1300.0 {
                i as u64
            } else if t < 2400.0 {
                13
            } else {
                13 + (i as u64 - 23)
            };
            s.push(sample(t, out, hits));
        }
        assert_eq!(timings(&s, 1000.0, 2000.0, 3000.0), (Some(200), Some(300), Some(400)));
        // Never out, still hit at the end of the window, never back: detect none, shift = the window, no recover.
        let busy: Vec<Sample> = (0..30).map(|i| sample(f64::from(i) * 100.0, false, i as u64)).collect();
        assert_eq!(timings(&busy, 1000.0, 2000.0, 3000.0), (None, Some(900), Some(100)));
        // Out from before the fault and never reached: detect 0, shift 0.
        let idle: Vec<Sample> = (0..30).map(|i| sample(f64::from(i) * 100.0, true, 5)).collect();
        assert_eq!(timings(&idle, 1000.0, 2000.0, 3000.0), (Some(0), Some(0), None));
        assert_eq!(timings(&[], 1000.0, 2000.0, 3000.0), (None, Some(0), None));
    }

    fn records(n: u32, every_ms: f64, ok: impl Fn(u32) -> bool) -> Vec<Record> {
        (0..n).map(|i| Record { at_ms: f64::from(i) * every_ms, latency_ms: f64::from(i % 100), ok: ok(i) }).collect()
    }

    #[test]
    fn phases_totals_and_the_verdict() {
        let p = phases(Duration::from_secs(10));
        // One request every 10 ms: 1000 requests, 100 in the steady first second.
        let all_ok = build(100, &p, &records(1000, 10.0, |_| true), &[], &|_| true);
        assert_eq!(all_ok.phases.len(), 6);
        assert_eq!(all_ok.phases[0].requests, 100);
        assert_eq!(all_ok.phases.iter().map(|p| p.requests).sum::<u64>(), 1000);
        assert_eq!(all_ok.total, Total { requests: 1000, ok: 1000, success_rate: 1.0, lost: 0 });
        assert_eq!(all_ok.phases[0].p50_ms, Some(49.5));
        assert_eq!(all_ok.phases[0].p99_ms, Some(98.0));
        assert_eq!((all_ok.phases[0].detect_ms, all_ok.phases[0].recover_ms), (None, None));
        assert_eq!(all_ok.phases[1].shift_ms, Some(0), "a fault phase has timings");
        assert!(all_ok.passed);
        assert_eq!(all_ok.duration_s, 10.0);

        // One failure in 1000 while something could serve: 99.9 % but one lost.
        let one = build(100, &p, &records(1000, 10.0, |i| i != 500), &[], &|_| true);
        assert_eq!((one.total.success_rate, one.total.lost), (0.999, 1));
        assert!(!one.passed);
        // The same failure when nothing could serve: not lost, and 99.9 % passes.
        let none = build(100, &p, &records(1000, 10.0, |i| i != 500), &[], &|t| t != 5000.0);
        assert_eq!(none.total.lost, 0);
        assert!(none.passed);
        // Two such failures: below 99.9 %.
        let two = build(100, &p, &records(1000, 10.0, |i| i != 500 && i != 501), &[], &|_| false);
        assert!(!two.passed);
        assert!(!build(100, &p, &[], &[], &|_| true).passed, "no requests: not a pass");
    }

    #[test]
    fn json_has_the_contract_shape() {
        let p = phases(Duration::from_secs(10));
        let r = build(100, &p, &records(1000, 10.0, |_| true), &[], &|_| true);
        let v: serde_json::Value = serde_json::from_str(&json(&r)).unwrap();
        let keys = |v: &serde_json::Value| v.as_object().unwrap().keys().cloned().collect::<Vec<_>>();
        let mut top = keys(&v);
        top.sort();
        assert_eq!(top, ["duration_s", "passed", "phases", "rate", "total"]);
        let mut phase = keys(&v["phases"][1]);
        phase.sort();
        assert_eq!(
            phase,
            [
                "detect_ms",
                "lost",
                "name",
                "ok",
                "p50_ms",
                "p99_ms",
                "recover_ms",
                "requests",
                "shift_ms",
                "success_rate"
            ]
        );
        let mut total = keys(&v["total"]);
        total.sort();
        assert_eq!(total, ["lost", "ok", "requests", "success_rate"]);
        assert_eq!(v["phases"][0]["detect_ms"], serde_json::Value::Null);
        assert_eq!(v["total"]["success_rate"], 1.0);
        let t = table(&r, "drill\n", &p);
        assert!(t.contains("rate_limited") && t.contains("PASSED"), "{t}");
    }
}
