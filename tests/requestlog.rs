//! The persistent request log: every answered request is a row, written off the request path, and nothing
//! answered is lost across a graceful shutdown.

mod common;

use std::time::Duration;

use common::*;
use http_body_util::BodyExt;
use sheepdog::log::{open_read, read_since, Entry};

fn rows(path: &std::path::Path) -> Vec<Entry> {
    read_since(&open_read(path).unwrap(), 0).unwrap()
}

#[tokio::test]
async fn every_answer_is_logged_and_nothing_is_lost_on_graceful_shutdown() {
    let good = mock("good", "gpt-4.1", &["--tokens-per-sec", "20"]);
    let bad = mock("bad", "gpt-4.1", &[]);
    // Probes once at start, then not for an hour: `bad` fails only for live traffic, which fails over.
    let cfg = format!(
        "[health]\ninterval = \"1h\"\nidle_interval = \"1h\"\n\n\
         [[endpoints]]\nname = \"bad\"\nbase_url = \"http://{}/v1\"\napi_keys = [\"sk-log-SECRET-1\"]\n\
         priority = 0\nmodels = [\"gpt-4.1\"]\n\n\
         [[endpoints]]\nname = \"good\"\nbase_url = \"http://{}/v1\"\napi_keys = [\"sk-log-SECRET-2\"]\n\
         priority = 1\nmodels = [\"gpt-4.1\"]\n\n{}",
        bad.addr,
        good.addr,
        model("gpt-4.1", "strategy = \"priority\"")
    );
    let mut gw = gateway(&cfg, &[]);
    let db = gw.dir.path().join("sheepdog.db");
    let url = gw.url("/v1/chat/completions");
    eventually(Duration::from_secs(10), "the first probes are done", || async {
        pair_status(&gw, "bad", "gpt-4.1").await["checks"].as_u64() >= Some(1)
            && pair_status(&gw, "good", "gpt-4.1").await["checks"].as_u64() >= Some(1)
    })
    .await;
    faults(&bad, r#"{"mode":"error_500"}"#).await;

    // 1. Served after failing over from `bad` to `good`.
    let r = post(&url, &chat("gpt-4.1")).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.header("x-sheepdog-attempts").as_deref(), Some("2"));
    let usage = r.json()["usage"].clone();
    // 2. Client mistakes.
    assert_eq!(post(&url, "{not json").await.status, 400);
    assert_eq!(post(&url, &chat("no-such-model")).await.status, 404);
    // 3. A stream with usage.
    let body = r#"{"model":"gpt-4.1","stream":true,"stream_options":{"include_usage":true},"max_tokens":3,
                   "messages":[{"role":"user","content":"hi"}]}"#;
    let s = stream(&url, body).await;
    assert_eq!(s.status, 200);
    assert!(s.error.is_none(), "{:?}", s.error);
    // 4. A client that goes away mid-stream.
    {
        let req = http::Request::post(&url)
            .header("content-type", "application/json")
            .body(http_body_util::Full::new(bytes::Bytes::from(
                r#"{"model":"gpt-4.1","stream":true,"messages":[{"role":"user","content":"a long one"}]}"#,
            )))
            .unwrap();
        let resp = client().request(req).await.unwrap();
        let mut body = resp.into_body();
        body.frame().await.unwrap().unwrap();
    }
    // 5. A stream still running when SIGTERM arrives: it finishes, and its row is written before exit.
    let chats = |v: serde_json::Value| v["by_path"]["/v1/chat/completions"].as_u64().unwrap_or(0);
    let before = chats(mock_stats(&good).await);
    let last_url = url.clone();
    let last = tokio::spawn(async move {
        stream(
            &last_url,
            r#"{"model":"gpt-4.1","stream":true,"max_tokens":20,"messages":[{"role":"user","content":"x"}]}"#,
        )
        .await
    });
    // SIGTERM once the stream has reached the upstream (it runs for 2 s at the mock's 10 tokens/s).
    eventually(Duration::from_secs(10), "the last stream reached the upstream", || async {
        chats(mock_stats(&good).await) > before
    })
    .await;
    gw.proc.signal("TERM");
    let last = last.await.unwrap();
    assert!(last.error.is_none(), "{:?}", last.error);
    assert_eq!(last.status, 200);
    let status = wait_exit(&mut gw.proc, Duration::from_secs(15));
    assert!(status.success(), "{status}; stderr:\n{}", gw.proc.stderr());

    let rows = rows(&db);
    assert_eq!(rows.len(), 6, "{rows:#?}");
    let failover = &rows[0];
    assert_eq!((failover.api, failover.model.as_str(), failover.status), ("chat", "gpt-4.1", 200));
    assert_eq!(failover.endpoint.as_deref(), Some("good"));
    assert_eq!(failover.served_model.as_deref(), Some("gpt-4.1"));
    assert_eq!(failover.attempts, 2);
    assert!(!failover.stream && failover.error.is_none());
    assert_eq!(failover.prompt_tokens, usage["prompt_tokens"].as_u64());
    assert_eq!(failover.completion_tokens, usage["completion_tokens"].as_u64());
    let expected_cost =
        (usage["prompt_tokens"].as_f64().unwrap() * 2.0 + usage["completion_tokens"].as_f64().unwrap() * 8.0) / 1e6;
    assert!((failover.cost_usd.unwrap() - expected_cost).abs() < 1e-12, "{failover:?}");
    assert!(failover.duration_ms > 0.0 && failover.ttft_ms.unwrap() <= failover.duration_ms);

    assert_eq!((rows[1].status, rows[1].error.as_deref(), rows[1].model.as_str()), (400, Some("invalid_json"), ""));
    assert_eq!((rows[2].status, rows[2].error.as_deref()), (404, Some("model_not_found")));
    assert_eq!(rows[2].model, "no-such-model");

    let streamed = &rows[3];
    assert!(streamed.stream);
    assert_eq!((streamed.status, streamed.error.as_deref()), (200, None));
    assert_eq!(streamed.completion_tokens, Some(3), "{streamed:?}");
    assert!(streamed.ttft_ms.unwrap() < streamed.duration_ms, "{streamed:?}");

    let gone = &rows[4];
    assert_eq!((gone.status, gone.error.as_deref()), (499, Some("client_closed")), "{gone:?}");

    let drained = &rows[5];
    assert_eq!((drained.status, drained.error.as_deref(), drained.stream), (200, None, true), "{drained:?}");
    assert!(drained.duration_ms >= 900.0, "20 chunks at 20/s: {drained:?}");

    // No API key anywhere in the file.
    let bytes = std::fs::read(&db).unwrap();
    assert!(!bytes.windows(6).any(|w| w == b"SECRET"), "an API key reached the request log");

    // `sheepdog report` reads the same rows back.
    let report = |args: &[&str]| {
        let out = std::process::Command::new(BIN).arg("report").arg("--db").arg(&db).args(args).output().unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stdout).unwrap()
    };
    let j: serde_json::Value = serde_json::from_str(&report(&["--format", "json", "--since", "1h"])).unwrap();
    let t = &j["total"];
    assert_eq!((t["requests"].as_u64(), t["ok"].as_u64()), (Some(6), Some(3)), "{j}");
    assert_eq!(
        (t["client_errors"].as_u64(), t["failed"].as_u64(), t["failovers"].as_u64()),
        (Some(3), Some(0), Some(1))
    );
    let gpt = j["models"].as_array().unwrap().iter().find(|m| m["model"] == "gpt-4.1").unwrap();
    assert_eq!(gpt["requests"], 4);
    let good = j["endpoints"].as_array().unwrap().iter().find(|e| e["endpoint"] == "good").unwrap();
    assert_eq!(good["model"], "gpt-4.1");
    let tokens = usage["prompt_tokens"].as_u64().unwrap() + rows[3].prompt_tokens.unwrap();
    assert_eq!(
        t["prompt_tokens"].as_u64(),
        Some(tokens + rows[4].prompt_tokens.unwrap_or(0) + rows[5].prompt_tokens.unwrap_or(0))
    );
    let csv = report(&["--format", "csv"]);
    assert!(csv.lines().nth(1).unwrap().starts_with("total,,,6,3,3,0,"), "{csv}");
    let charts = gw.dir.path().join("charts");
    let table = report(&["--charts", charts.to_str().unwrap()]);
    assert!(table.contains("6 requests: 3 ok, 3 client errors, 0 failed; 1 failovers"), "{table}");
    for f in ["requests.svg", "latency.svg", "cost.svg", "success.svg", "latency_over_time.svg"] {
        let svg = std::fs::read_to_string(charts.join(f)).unwrap();
        assert!(svg.starts_with("<svg"), "{f}: {svg}");
    }
    // A missing file is an error, not an empty report.
    let out = std::process::Command::new(BIN).args(["report", "--db", "/nonexistent/x.db"]).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent/x.db"));
}

#[tokio::test]
async fn the_log_can_be_turned_off_and_its_path_set() {
    let m = mock("m", "gpt-4.1", &[]);
    let off = config(&[("m", m.addr, "models = [\"gpt-4.1\"]")], &model("gpt-4.1", ""), "[log]\nenabled = false\n");
    let gw = gateway(&off, &[]);
    assert_eq!(post(&gw.url("/v1/chat/completions"), &chat("gpt-4.1")).await.status, 200);
    let metrics = get(&gw.url("/metrics")).await.text();
    assert!(metrics.contains("sheepdog_request_log_written_total 0"), "{metrics}");
    drop(gw);

    let on = config(&[("m", m.addr, "models = [\"gpt-4.1\"]")], &model("gpt-4.1", ""), "[log]\npath = \"logs.db\"\n");
    let gw = gateway(&on, &[]);
    assert_eq!(post(&gw.url("/v1/chat/completions"), &chat("gpt-4.1")).await.status, 200);
    // Written in the background within a fraction of a second, while the gateway runs.
    let url = gw.url("/metrics");
    eventually(Duration::from_secs(5), "the row is written", || {
        let url = url.clone();
        async move { get(&url).await.text().contains("sheepdog_request_log_written_total 1") }
    })
    .await;
    assert_eq!(rows(&gw.dir.path().join("logs.db")).len(), 1);
    assert!(!gw.dir.path().join("sheepdog.db").exists());
}

#[tokio::test]
async fn every_answer_carries_its_request_id_and_a_fallback_says_so() {
    let a = mock("a", "gpt-4.1", &[]);
    let b = mock("b", "claude-sonnet-4.5", &[]);
    let cfg = quiet_config(
        &[("a", a.addr, "models = [\"gpt-4.1\"]"), ("b", b.addr, "models = [\"claude-sonnet-4.5\"]")],
        &(model("gpt-4.1", "fallbacks = [\"claude-sonnet-4.5\"]") + &model("claude-sonnet-4.5", "")),
        "",
    );
    let mut gw = gateway(&cfg, &[]);
    let url = gw.url("/v1/chat/completions");
    let direct = post(&url, &chat("gpt-4.1")).await;
    assert_eq!(direct.status, 200);
    assert_eq!(direct.header("x-sheepdog-route-reason"), None);
    faults(&a, r#"{"mode":"error_500"}"#).await;
    let fallback = post(&url, &chat("gpt-4.1")).await;
    assert_eq!(fallback.status, 200, "{}", fallback.text());
    assert_eq!(fallback.header("x-sheepdog-model").as_deref(), Some("claude-sonnet-4.5"));
    assert_eq!(fallback.header("x-sheepdog-route-reason").as_deref(), Some("fallback"));
    let refused = post(&url, &chat("no-such-model")).await;
    assert_eq!(refused.status, 404);
    let ids: Vec<String> = [&direct, &fallback, &refused].iter().map(|r| r.header("x-request-id").unwrap()).collect();
    assert!(ids.iter().all(|id| id.starts_with("req_") && id.len() == 20), "{ids:?}");
    assert!(ids[0] != ids[1] && ids[1] != ids[2]);
    gw.proc.signal("TERM");
    assert!(wait_exit(&mut gw.proc, Duration::from_secs(15)).success());
    let rows = rows(&gw.dir.path().join("sheepdog.db"));
    let logged: Vec<String> = rows.iter().map(|r| r.request_id.unwrap().to_string()).collect();
    assert_eq!(logged, ids);
    assert_eq!(rows[1].route_reason.as_deref(), Some("fallback"));
    assert_eq!((rows[0].route_reason.as_deref(), rows[2].route_reason.as_deref()), (None, None));
    assert!(rows[0].cost_nanos.is_some_and(|n| n > 0) && rows[0].cached_tokens == Some(0), "{:?}", rows[0]);
}
