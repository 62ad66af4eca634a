//! The built-in dashboard in a real browser: headless Chromium (driven over the DevTools protocol, `tests/cdp`)
//! opens `/dashboard` of a gateway in front of `sheepdog mock` upstreams under traffic. Faulting one upstream
//! must show that endpoint's breaker open on the page by itself (no reload) within a few seconds; faulting a
//! second one must show the global-degraded state. Screenshots at laptop and phone widths, light and dark,
//! are saved under `target/tmp/screenshots/`.

mod cdp;
mod common;

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use cdp::Browser;
use common::*;

fn screenshots() -> PathBuf {
    PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("screenshots")
}

/// A JS expression: the `data-breaker` of the row of (endpoint, model), or null.
fn breaker_of(endpoint: &str, model: &str) -> String {
    format!(
        "((document.querySelector('tr[data-pair=\"{endpoint}/{model}\"]') || {{dataset: {{}}}}).dataset.breaker || null)"
    )
}

#[test]
fn dashboard_shows_breaker_open_and_global_degraded_by_itself() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let a = mock("a", "gpt-4.1,claude-sonnet-4.5", &["--latency-ms", "30", "--jitter-ms", "20"]);
    let b = mock("b", "gpt-4.1", &["--latency-ms", "60", "--jitter-ms", "30"]);
    let c = mock("c", "claude-sonnet-4.5,text-embedding-3-small", &["--latency-ms", "40"]);
    let cfg = config(
        &[
            ("a", a.addr, "models = [\"gpt-4.1\", \"claude-sonnet-4.5\"]"),
            ("b", b.addr, "models = [\"gpt-4.1\"]"),
            ("c", c.addr, "models = [\"claude-sonnet-4.5\", \"text-embedding-3-small\"]"),
        ],
        &format!(
            "{}{}{}",
            model("gpt-4.1", "fallbacks = [\"claude-sonnet-4.5\"]"),
            model("claude-sonnet-4.5", ""),
            model("text-embedding-3-small", "kind = \"embeddings\"")
        ),
        "[breaker]\nfailure_threshold = 3\nrecovery_timeout = \"60s\"\n",
    );
    let gw = gateway(&cfg, &[]);

    // Bounded background traffic: a few requests a second until the test ends (at most 3 minutes).
    let stop = Arc::new(AtomicBool::new(false));
    let (url, halt) = (gw.url("/v1/chat/completions"), stop.clone());
    let traffic = rt.spawn(async move {
        let until = Instant::now() + Duration::from_secs(180);
        let mut i = 0u32;
        while !halt.load(Ordering::Relaxed) && Instant::now() < until {
            let m = if i % 4 == 3 { "claude-sonnet-4.5" } else { "gpt-4.1" };
            let body = if i % 17 == 16 { chat("no-such-model") } else { chat(m) };
            let _ = post(&url, &body).await;
            i += 1;
            tokio::time::sleep(Duration::from_millis(120)).await;
        }
    });

    let mut browser = Browser::launch();
    browser.navigate(&gw.url("/dashboard"));
    browser.wait_for(
        &format!("{} === 'closed'", breaker_of("b", "gpt-4.1")),
        Duration::from_secs(20),
        "the page to show b/gpt-4.1 with a closed breaker",
    );
    browser.wait_for("document.getElementById('global').dataset.degraded === 'false'", Duration::from_secs(5), "ok");
    let loaded_at = browser.eval("document.body.dataset.refreshed");

    rt.block_on(faults(&b, r#"{"mode": "error_500"}"#));
    let took = browser.wait_for(
        &format!("{} === 'open'", breaker_of("b", "gpt-4.1")),
        Duration::from_secs(8),
        "the page to show b/gpt-4.1's breaker open",
    );
    eprintln!("breaker shown open {took:?} after the fault");
    // The page was not reloaded: it refreshed itself.
    assert_eq!(browser.eval("performance.getEntriesByType('navigation').length"), serde_json::json!(1));
    assert_ne!(browser.eval("document.body.dataset.refreshed"), loaded_at);
    assert_eq!(browser.eval(&breaker_of("a", "gpt-4.1")), serde_json::json!("closed"));
    // The other panels have data: a traffic chart from samples, costs, and "no budgets" while /api/stats is absent.
    browser.wait_for("samples.length >= 6", Duration::from_secs(30), "traffic samples");
    browser.wait_for("document.querySelectorAll('#traffic polygon').length >= 1", Duration::from_secs(10), "chart");
    browser.wait_for(
        "document.getElementById('costs').textContent.includes('gpt-4.1')",
        Duration::from_secs(10),
        "costs",
    );
    assert_eq!(browser.eval("document.getElementById('budgets').textContent"), serde_json::json!("no budgets"));
    assert!(browser.eval("document.getElementById('k-rps').textContent").as_str().unwrap() != "–");
    let sparks =
        browser.eval("document.querySelectorAll('tr.pair svg.spark polyline, tr.pair svg.spark circle').length");
    assert!(sparks.as_u64().unwrap() >= 3, "sparklines drawn: {sparks}");

    let dir = screenshots();
    for (name, width, mobile, dark) in [
        ("dashboard-laptop-light.png", 1366, false, false),
        ("dashboard-laptop-dark.png", 1366, false, true),
        ("dashboard-phone-light.png", 390, true, false),
        ("dashboard-phone-dark.png", 390, true, true),
    ] {
        browser.screenshot(&dir.join(name), width, mobile, dark);
        let overflow = browser.eval("document.documentElement.scrollWidth - document.documentElement.clientWidth");
        assert!(overflow.as_i64().unwrap() <= 0, "{name}: the page is wider than the screen by {overflow} px");
        let bg = browser.eval("getComputedStyle(document.body).backgroundColor");
        let dark_bg = bg.as_str().unwrap().trim_start_matches("rgb(").split(',').next().unwrap().trim().parse::<u32>();
        assert_eq!(dark_bg.unwrap() < 100, dark, "{name}: background {bg}");
    }
    eprintln!("screenshots in {}", dir.display());

    // With /api/stats in the contract's shape, cost today and the budgets come from it.
    let shown = browser.eval(
        r#"stats = {models: [{model: "gpt-4.1", cost_usd: 12.5}, {model: "claude-sonnet-4.5", cost_usd: 3.25}],
                    budgets: [{name: "daily", period: "day", spent_usd: 450, limit_usd: 500, state: "warn"},
                              {name: "monthly", period: "month", spent_usd: 1200, limit_usd: 10000, state: "ok"}]};
           statsAt = Date.now(); renderCosts({});
           [document.querySelectorAll("[data-budget]").length, document.getElementById("k-cost").textContent,
            document.querySelector('[data-budget="daily"] .bar span').style.width]"#,
    );
    assert_eq!(shown, serde_json::json!([2, "$15.75", "90%"]));
    browser.screenshot(&dir.join("dashboard-budgets-laptop-light.png"), 1366, false, false);

    // More than half of the pairs down: the page says so.
    rt.block_on(faults(&a, r#"{"mode": "error_500"}"#));
    browser.wait_for(
        "document.getElementById('global').dataset.degraded === 'true'",
        Duration::from_secs(10),
        "the global degraded badge",
    );
    assert_eq!(browser.eval("document.getElementById('global').textContent"), serde_json::json!("GLOBAL DEGRADED"));
    browser.screenshot(&dir.join("dashboard-degraded-laptop-light.png"), 1366, false, false);

    stop.store(true, Ordering::Relaxed);
    rt.block_on(traffic).unwrap();
    drop(c);
}
