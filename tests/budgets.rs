//! Budgets through real sockets: warn, downgrade and block in that order, one webhook POST per crossing, a
//! free model never blocked, spend rebuilt from the request log after a restart, and 50 concurrent requests at
//! the edge of a nearly spent budget held by reservations.
//!
//! The in-test upstream reports 3 prompt + 2 completion tokens for every answer, so with the prices below a
//! gpt-4.1 answer costs exactly $1.00 and a deepseek-v3.2 answer $0.10.

mod common;

use std::time::Duration;

use common::*;

/// $0.20 a token in and out: 5 tokens = $1.00.
const PRICES: &str = "input_usd_per_mtok = 200000.0\noutput_usd_per_mtok = 200000.0\n";
/// $0.02 a token: 5 tokens = $0.10.
const CHEAP: &str = "input_usd_per_mtok = 20000.0\noutput_usd_per_mtok = 20000.0\n";

fn models() -> String {
    format!(
        "[[models]]\nname = \"gpt-4.1\"\n{PRICES}\n[[models]]\nname = \"deepseek-v3.2\"\n{CHEAP}\n\
         [[models]]\nname = \"free\"\ninput_usd_per_mtok = 0.0\noutput_usd_per_mtok = 0.0\n\n"
    )
}

fn upstream() -> TestUpstream {
    TestUpstream::start(|s| Canned::completion(s, "up"))
}

fn body(model: &str) -> String {
    serde_json::json!({"model": model, "max_tokens": 2, "messages": [{"role": "user", "content": "Say hello"}]})
        .to_string()
}

fn cfg(up: &TestUpstream, extra: &str) -> String {
    quiet_config(&[("up", up.addr, "models = [\"gpt-4.1\", \"deepseek-v3.2\", \"free\"]")], &models(), extra)
        .replace("[health]\n", "[health]\nprobe = \"models\"\n")
}

async fn budget_state(gw: &Gateway) -> serde_json::Value {
    let s = get(&gw.url("/api/stats?since=1h")).await.json();
    s["budgets"][0].clone()
}

fn metric(text: &str, start: &str) -> Option<f64> {
    text.lines().find(|l| l.starts_with(start)).and_then(|l| l.rsplit(' ').next()?.parse().ok())
}

/// Seconds from now to the next 00:00 UTC.
fn to_midnight_s() -> u64 {
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs();
    86_400 - now % 86_400
}

#[tokio::test]
async fn warn_then_downgrade_then_block_with_one_webhook_per_crossing() {
    let up = upstream();
    let hook = TestUpstream::start(|_| Canned::json(200, "{}"));
    let budget = format!(
        "[[budgets]]\nname = \"daily\"\nperiod = \"day\"\nwarn_usd = 2\ndowngrade_usd = 4\ndowngrade_to = \
         \"deepseek-v3.2\"\nlimit_usd = 10\nwebhook = \"http://{}/hook\"\n",
        hook.addr
    );
    let gw = gateway(&cfg(&up, &budget), &[]);
    let url = gw.url("/v1/chat/completions");
    let mut served = Vec::new();
    let mut refused = None;
    for _ in 0..200 {
        let r = post(&url, &body("gpt-4.1")).await;
        if r.status == 429 {
            refused = Some(r);
            break;
        }
        assert_eq!(r.status, 200, "{}", r.text());
        served.push((r.header("x-sheepdog-model").unwrap(), r.header("x-sheepdog-route-reason")));
    }
    let refused = refused.expect("the budget blocked at its limit");
    // $1.00 each until $4.00 is spent, then every request goes to the cheaper model, saying why.
    assert!(served[..4].iter().all(|(m, reason)| m == "gpt-4.1" && reason.is_none()), "{served:?}");
    assert!(served.len() > 4, "{served:?}");
    for (m, reason) in &served[4..] {
        assert_eq!((m.as_str(), reason.as_deref()), ("deepseek-v3.2", Some("budget:daily")));
    }
    let spent = 4.0 + 0.1 * (served.len() - 4) as f64;
    assert!(spent <= 10.0 + 1e-9 && spent > 9.0, "blocked at ${spent}, limit $10");
    // The refusal: OpenAI-shaped, names the budget, Retry-After until the period ends (midnight UTC).
    let e = refused.json();
    assert_eq!(e["error"]["code"], "budget_exceeded", "{e}");
    assert!(e["error"]["message"].as_str().unwrap().contains("`daily`"), "{e}");
    let retry: u64 = refused.header("retry-after").unwrap().parse().unwrap();
    assert!(retry.abs_diff(to_midnight_s()) <= 5, "Retry-After {retry}, midnight in {}", to_midnight_s());
    // Still refused; a model that costs nothing is never blocked.
    assert_eq!(post(&url, &body("deepseek-v3.2")).await.status, 429);
    assert_eq!(post(&url, &body("free")).await.status, 200);
    // One webhook per crossing (warn at $2, downgrade at $4; the limit was never reached).
    eventually(Duration::from_secs(10), "two webhook POSTs", || async { hook.seen.lock().unwrap().len() >= 2 }).await;
    let hooks: Vec<serde_json::Value> =
        hook.seen.lock().unwrap().iter().map(|s| serde_json::from_str(&s.body).unwrap()).collect();
    assert_eq!(hooks.len(), 2, "{hooks:?}");
    for (threshold, at_least) in [("warn", 2.0), ("downgrade", 4.0)] {
        let h = hooks.iter().find(|h| h["threshold"] == threshold).unwrap_or_else(|| panic!("{hooks:?}"));
        assert_eq!((h["budget"].as_str(), h["period"].as_str()), (Some("daily"), Some("day")), "{h}");
        assert!(h["spent_usd"].as_f64().unwrap() >= at_least - 1e-9, "{h}");
    }
    // Spend in /api/stats and /metrics (settled spend: what answered requests cost).
    eventually(Duration::from_secs(10), "the request log has every row", || async {
        get(&gw.url("/api/stats?since=1h")).await.json()["total"]["requests"].as_u64() >= Some(served.len() as u64 + 3)
    })
    .await;
    let b = budget_state(&gw).await;
    assert_eq!(
        (b["name"].as_str(), b["period"].as_str(), b["state"].as_str()),
        (Some("daily"), Some("day"), Some("downgrade"))
    );
    assert!((b["spent_usd"].as_f64().unwrap() - spent).abs() < 1e-6, "{b} vs {spent}");
    let m = get(&gw.url("/metrics")).await.text();
    assert!((metric(&m, "sheepdog_budget_spent_usd{budget=\"daily\"}").unwrap() - spent).abs() < 1e-6);
    assert!(metric(&m, "sheepdog_rejections_total{reason=\"budget_exceeded\"}").unwrap() >= 2.0);
    assert!(gw.proc.stderr().contains("budget threshold crossed"), "{}", gw.proc.stderr());
}

#[tokio::test]
async fn spend_survives_a_restart_and_thresholds_are_not_announced_twice() {
    let up = upstream();
    let hook = TestUpstream::start(|_| Canned::json(200, "{}"));
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("log.db");
    let extra = format!(
        "[log]\npath = \"{}\"\n\n[[budgets]]\nname = \"daily\"\nperiod = \"day\"\nwarn_usd = 2\nlimit_usd = 100\n\
         webhook = \"http://{}/hook\"\n",
        db.display(),
        hook.addr
    );
    let config = cfg(&up, &extra);
    let mut gw = gateway(&config, &[]);
    for _ in 0..3 {
        assert_eq!(post(&gw.url("/v1/chat/completions"), &body("gpt-4.1")).await.status, 200);
    }
    eventually(Duration::from_secs(10), "the warn webhook", || async { hook.seen.lock().unwrap().len() == 1 }).await;
    gw.proc.signal("TERM");
    assert!(wait_exit(&mut gw.proc, Duration::from_secs(15)).success());
    let gw = gateway(&config, &[]);
    let b = budget_state(&gw).await;
    assert!((b["spent_usd"].as_f64().unwrap() - 3.0).abs() < 1e-6, "{b}");
    assert_eq!(b["state"], "warn");
    let m = get(&gw.url("/metrics")).await.text();
    assert!((metric(&m, "sheepdog_budget_spent_usd{budget=\"daily\"}").unwrap() - 3.0).abs() < 1e-6, "{m}");
    assert_eq!(post(&gw.url("/v1/chat/completions"), &body("gpt-4.1")).await.status, 200);
    assert!((budget_state(&gw).await["spent_usd"].as_f64().unwrap() - 4.0).abs() < 1e-6);
    // The warn threshold was crossed before the restart: not announced again. Settling the spend (seen
    // above) and announcing a crossing (log line, counter, webhook spawned) happen in one call, so the
    // counter tells without waiting.
    let m = get(&gw.url("/metrics")).await.text();
    let warned = metric(&m, "sheepdog_budget_threshold_crossings_total{budget=\"daily\",threshold=\"warn\"}");
    assert!(warned.unwrap_or(0.0) == 0.0, "announced again after the restart: {m}");
    assert!(!gw.proc.stderr().contains("budget threshold crossed"), "{}", gw.proc.stderr());
    assert_eq!(hook.seen.lock().unwrap().len(), 1);
}

#[tokio::test]
async fn fifty_concurrent_requests_cannot_slip_past_a_nearly_spent_budget() {
    let up = upstream();
    let gw = gateway(&cfg(&up, "[[budgets]]\nname = \"edge\"\nperiod = \"day\"\nlimit_usd = 20\n"), &[]);
    let url = gw.url("/v1/chat/completions");
    // Spend $13 of $20, one request at a time.
    for _ in 0..13 {
        assert_eq!(post(&url, &body("gpt-4.1")).await.status, 200);
    }
    // $7 left: a check against settled spend alone would let all 50 through ($63). Each reserves its
    // estimate (prompt bytes / 3 + max_tokens, about 31 tokens at $0.20: $6.20) until it settles at $1.00.
    let tasks: Vec<_> = (0..50)
        .map(|_| {
            let (url, b) = (url.clone(), body("gpt-4.1"));
            tokio::spawn(async move { post(&url, &b).await.status })
        })
        .collect();
    let mut ok = 0;
    for t in tasks {
        match t.await.unwrap() {
            200 => ok += 1,
            429 => {}
            s => panic!("status {s}"),
        }
    }
    assert!(ok >= 1, "the budget had room for at least one more request");
    let spent = budget_state(&gw).await["spent_usd"].as_f64().unwrap();
    assert!((spent - (13.0 + ok as f64)).abs() < 1e-6, "spent {spent}, {ok} admitted");
    // The documented bound: no overshoot when requests set max_tokens.
    assert!(spent <= 20.0 + 1e-9, "spent ${spent} of a $20 budget");
}
