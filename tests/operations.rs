//! What the person on call uses: `sheepdog check`, manual drain, the static fallback answer.

mod common;

use std::time::Duration;

use common::*;

fn check(args: &[&str]) -> (i32, String) {
    let out = std::process::Command::new(BIN).arg("check").args(args).output().unwrap();
    (out.status.code().unwrap_or(-1), String::from_utf8_lossy(&out.stdout).into_owned())
}

#[tokio::test]
async fn check_reports_each_pair_with_timings_and_exit_codes() {
    let a = mock("a", "gpt-4.1", &[]);
    let b = mock("b", "gpt-4.1", &[]);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("sheepdog.toml");
    let cfg = config(
        &[
            ("a", a.addr, "api_keys = [\"sk-check-SECRET\"]\nmodels = [\"gpt-4.1\"]"),
            ("b", b.addr, "models = [\"gpt-4.1\"]"),
        ],
        &model("gpt-4.1", ""),
        "",
    );
    std::fs::write(&path, &cfg).unwrap();
    let p = path.to_str().unwrap();
    let log = dir.path().join("check.log");
    let l = log.to_str().unwrap();

    let (code, out) = check(&["--config", p, "--log", l]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("CONNECT_MS") && out.contains("TTFB_MS"), "{out}");
    assert_eq!(out.lines().filter(|l| l.contains("healthy")).count(), 2, "{out}");

    faults(&b, r#"{"mode":"error_500"}"#).await;
    let (code, out) = check(&["--config", p, "--json", "--log", l]);
    assert_eq!(code, 1, "{out}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let rows = v.as_array().unwrap();
    let row = |ep: &str| rows.iter().find(|r| r["endpoint"] == ep).unwrap().clone();
    assert_eq!(row("a")["status"], "healthy");
    assert!(row("a")["connect_ms"].as_f64().is_some() && row("a")["ttfb_ms"].as_f64().is_some());
    assert_eq!(row("b")["status"], "unhealthy");
    assert_eq!(row("b")["http_status"], 500);
    assert!(!out.contains("SECRET"));

    let logged = std::fs::read_to_string(&log).unwrap();
    assert_eq!(logged.lines().count(), 4, "one line per result per run");
    assert!(!logged.contains("SECRET"));

    std::fs::write(&path, cfg.replace("[[models]]", "[[models]]\nbogus = 1")).unwrap();
    assert_eq!(check(&["--config", p]).0, 2);
}

#[tokio::test]
async fn manual_drain_holds_until_enabled_and_needs_the_admin_key() {
    let a = mock("a", "gpt-4.1", &[]);
    let b = mock("b", "gpt-4.1", &[]);
    let cfg = config(
        &[("a", a.addr, "models = [\"gpt-4.1\"]"), ("b", b.addr, "models = [\"gpt-4.1\"]")],
        &model("gpt-4.1", ""),
        "",
    )
    .replacen("[server]\n", "[server]\nadmin_key = \"adm\"\n", 1);
    let gw = gateway(&cfg, &[]);
    let auth = [("authorization", "Bearer adm")];
    assert_eq!(request("POST", &gw.url("/admin/endpoints/a/disable"), &[], "").await.status, 401);
    assert_eq!(request("POST", &gw.url("/admin/endpoints/zzz/disable"), &auth, "").await.status, 404);
    let r = request("POST", &gw.url("/admin/endpoints/a/disable"), &auth, "").await;
    assert_eq!(r.status, 200, "{}", r.text());
    let before = mock_stats(&a).await["by_path"]["/v1/chat/completions"].as_u64().unwrap_or(0);
    // Probes keep running (interval 300 ms) and succeed, but must not re-enable it.
    for _ in 0..20 {
        let r = post(&gw.url("/v1/chat/completions"), &chat("gpt-4.1")).await;
        assert_eq!(r.header("x-sheepdog-endpoint").as_deref(), Some("b"));
        tokio::time::sleep(Duration::from_millis(40)).await;
    }
    let s = get(&gw.url("/status")).await.json();
    assert_eq!(s["endpoints"][0]["enabled"], false);
    let after = mock_stats(&a).await;
    let live = after["by_path"]["/v1/chat/completions"].as_u64().unwrap_or(0) - before;
    assert!(live <= 3, "only probes may reach a drained endpoint: {after}");
    assert_eq!(request("POST", &gw.url("/admin/endpoints/a/enable"), &auth, "").await.status, 200);
    let mut served_by_a = false;
    for _ in 0..10 {
        served_by_a |=
            post(&gw.url("/v1/chat/completions"), &chat("gpt-4.1")).await.header("x-sheepdog-endpoint").as_deref()
                == Some("a");
    }
    assert!(served_by_a);
}

#[tokio::test]
async fn static_fallback_answers_when_nothing_can_serve() {
    let a = mock("a", "gpt-4.1", &[]);
    let cfg = config(
        &[("a", a.addr, "models = [\"gpt-4.1\"]")],
        &model("gpt-4.1", "static_fallback = \"We are busy, please retry shortly.\""),
        "",
    );
    let gw = gateway(&cfg, &[]);
    faults(&a, r#"{"mode":"error_500"}"#).await;
    let r = post(&gw.url("/v1/chat/completions"), &chat("gpt-4.1")).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.header("x-sheepdog-static-fallback").as_deref(), Some("true"));
    assert_eq!(r.json()["choices"][0]["message"]["content"], "We are busy, please retry shortly.");
    let s = stream(
        &gw.url("/v1/chat/completions"),
        r#"{"model":"gpt-4.1","stream":true,"messages":[{"role":"user","content":"x"}]}"#,
    )
    .await;
    assert_eq!(s.content(), "We are busy, please retry shortly.");
    assert_eq!(s.events().last().map(String::as_str), Some("[DONE]"));
}

#[tokio::test]
async fn an_endpoint_without_a_usable_key_is_unhealthy_and_not_ready() {
    let a = mock("a", "gpt-4.1", &["--require-keys", "sk-right"]);
    let cfg = config(&[("a", a.addr, "api_keys = [\"sk-wrong\"]\nmodels = [\"gpt-4.1\"]")], &model("gpt-4.1", ""), "");
    let gw = gateway(&cfg, &[]);
    // The key is refused; a probe with it confirms, and it is set aside: the endpoint cannot serve.
    eventually(Duration::from_secs(5), "status unhealthy", || async {
        let p = pair_status(&gw, "a", "gpt-4.1").await;
        p["status"] == "unhealthy" && p["can_serve"] == false
    })
    .await;
    assert_eq!(get(&gw.url("/ready")).await.status, 503);
    let s = get(&gw.url("/status")).await.json();
    assert_eq!(s["endpoints"][0]["api_keys_set_aside"], 1);
    let r = post(&gw.url("/v1/chat/completions"), &chat("gpt-4.1")).await;
    assert_eq!(r.status, 503, "{}", r.text());
    assert!(r.json()["error"]["message"].as_str().unwrap().contains("no usable API key"), "{}", r.text());
}
