//! `sheepdog drill`: a short drill (20 s at 100 requests/s) prints the contract's JSON, every phase ran and got
//! its share of the load, the fault phases have their timings, and the exit code agrees with `passed`.

mod common;

use std::process::Command;

use serde_json::Value;

fn keys(v: &Value) -> Vec<String> {
    let mut k: Vec<String> = v.as_object().map(|o| o.keys().cloned().collect()).unwrap_or_default();
    k.sort();
    k
}

#[test]
fn a_short_drill_reports_every_phase_in_the_contract_shape() {
    let out = Command::new(common::BIN)
        .args(["drill", "--duration", "20s", "--rate", "100", "--json"])
        .output()
        .expect("run sheepdog drill");
    let stderr = String::from_utf8_lossy(&out.stderr);
    let v: Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("not JSON ({e}): {}\n{stderr}", String::from_utf8_lossy(&out.stdout)));
    assert_eq!(keys(&v), ["duration_s", "passed", "phases", "rate", "total"], "{v}");
    assert_eq!(v["rate"], 100);
    assert_eq!(v["duration_s"], 20.0);
    assert_eq!(keys(&v["total"]), ["lost", "ok", "requests", "success_rate"]);

    let phases = v["phases"].as_array().expect("phases");
    let names: Vec<&str> = phases.iter().map(|p| p["name"].as_str().unwrap_or("")).collect();
    assert_eq!(names, ["steady", "dead", "flapping", "rate_limited", "slow", "recovered"]);
    let mut requests = 0;
    for p in phases {
        assert_eq!(
            keys(p),
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
        let n = p["requests"].as_u64().expect("requests");
        assert!(n > 0, "the phase ran: {p}");
        assert!(p["ok"].as_u64().is_some_and(|ok| ok <= n), "{p}");
        assert!(p["success_rate"].as_f64().is_some_and(|r| (0.0..=1.0).contains(&r)), "a fraction: {p}");
        assert!(p["p50_ms"].as_f64().is_some_and(|p50| p["p99_ms"].as_f64().is_some_and(|p99| p50 <= p99)), "{p}");
        let fault = !matches!(p["name"].as_str(), Some("steady" | "recovered"));
        // A fault phase always has a shift time (0 when no live request reached the primary); detect and recover
        // are null when they did not happen within the phase.
        assert_eq!(p["shift_ms"].is_u64(), fault, "{p}");
        for k in ["detect_ms", "recover_ms"] {
            assert!(p[k].is_null() || (fault && p[k].is_u64()), "{k}: {p}");
        }
        requests += n;
    }
    // Request i is due at i / rate: 2,000 requests in 20 s, each counted in one phase.
    assert_eq!(requests, 2_000);
    assert_eq!(v["total"]["requests"], 2_000);
    let passed = v["passed"].as_bool().expect("passed");
    assert_eq!(out.status.code(), Some(if passed { 0 } else { 1 }), "exit code and `passed` agree\n{stderr}");
}
