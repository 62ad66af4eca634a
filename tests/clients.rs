//! Client keys and rate limits through real sockets: `sheepdog key new`, 401 / 403 / 429 as OpenAI writes
//! them, OpenAI's `x-ratelimit-*` headers, streamed tokens counted against `tpm`, `max_parallel`, refusals
//! that do not count, client names (never keys) in metrics, logs and `/api/stats`; and the secure defaults:
//! admin routes off without an admin key, no anonymous service on a non-loopback address.

mod common;

use std::process::Command;
use std::time::Duration;

use common::*;

/// A fresh key and its `[[clients]]` lines, from the real command.
fn key_new(name: &str) -> (String, String) {
    let out = Command::new(BIN).args(["key", "new", "--name", name]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8(out.stdout).unwrap();
    let mut lines = text.lines();
    let key = lines.next().unwrap().to_string();
    let rest: String = lines.collect::<Vec<_>>().join("\n");
    (key, rest)
}

fn body(model: &str, stream: bool) -> String {
    serde_json::json!({"model": model, "stream": stream, "max_tokens": 2,
        "messages": [{"role": "user", "content": "Say hello"}]})
    .to_string()
}

async fn ask(gw: &Gateway, key: Option<&str>, b: &str) -> Reply {
    let auth = key.map(|k| format!("Bearer {k}"));
    let mut h = vec![("content-type", "application/json")];
    if let Some(a) = &auth {
        h.push(("authorization", a.as_str()));
    }
    request("POST", &gw.url("/v1/chat/completions"), &h, b.to_string()).await
}

#[tokio::test]
async fn keys_models_and_limits_as_openai_writes_them() {
    let (web_key, web_lines) = key_new("web-app");
    let (batch_key, batch_lines) = key_new("batch");
    let (slow_key, slow_lines) = key_new("slowpoke");
    assert!(web_key.starts_with("sk-") && web_key.len() >= 40, "{web_key}");
    assert!(web_lines.contains("[[clients]]") && web_lines.contains("name = \"web-app\""), "{web_lines}");
    assert!(web_lines.contains("key_hash = \"sha256:") && !web_lines.contains(&web_key), "{web_lines}");
    assert_ne!(web_key, batch_key);
    let up = TestUpstream::start(|s| Canned::completion(s, "up"));
    let slow = mock("slow", "slow-model", &["--latency-ms", "400"]);
    let clients = format!(
        "{web_lines}\nmodels = [\"gpt-4.1\"]\nrpm = 3\ntpm = 100000\n\n{batch_lines}\ntpm = 60\n\n\
         {slow_lines}\nmax_parallel = 1\n\n"
    );
    let cfg = quiet_config(
        &[
            ("up", up.addr, "models = [\"gpt-4.1\", \"deepseek-v3.2\"]"),
            ("slow", slow.addr, "models = [\"slow-model\"]"),
        ],
        &(model("gpt-4.1", "") + &model("deepseek-v3.2", "") + &model("slow-model", "")),
        "",
    ) + "\n"
        + &clients;
    let gw = gateway(&cfg, &[]);
    let chat = body("gpt-4.1", false);

    // 401 without a key or with a wrong one; the key is never echoed.
    let r = ask(&gw, None, &chat).await;
    assert_eq!((r.status, r.json()["error"]["code"].as_str()), (401, Some("invalid_api_key")), "{}", r.text());
    let wrong = "sk-not-a-real-key-0123456789";
    let r = ask(&gw, Some(wrong), &chat).await;
    assert_eq!(r.status, 401);
    assert!(!r.text().contains(wrong), "{}", r.text());
    let r = request(
        "POST",
        &gw.url("/v1/chat/completions"),
        &[("content-type", "application/json"), ("x-api-key", &web_key)],
        chat.clone(),
    )
    .await;
    assert_eq!(r.status, 200, "x-api-key works too: {}", r.text());
    // 403 for a model outside the client's list (does not count against its limits).
    let r = ask(&gw, Some(&web_key), &body("deepseek-v3.2", false)).await;
    assert_eq!((r.status, r.json()["error"]["code"].as_str()), (403, Some("model_not_allowed")), "{}", r.text());
    // /v1/models: only to a client, only its models.
    assert_eq!(get(&gw.url("/v1/models")).await.status, 401);
    let m = request("GET", &gw.url("/v1/models"), &[("authorization", &format!("Bearer {web_key}"))], "").await;
    let ids: Vec<String> =
        m.json()["data"].as_array().unwrap().iter().map(|d| d["id"].as_str().unwrap().into()).collect();
    assert_eq!(ids, vec!["gpt-4.1".to_string()]);

    // rpm = 3: the x-api-key request took one; two more, with OpenAI's headers, then 429.
    let r = ask(&gw, Some(&web_key), &chat).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.header("x-ratelimit-limit-requests").as_deref(), Some("3"));
    assert_eq!(r.header("x-ratelimit-remaining-requests").as_deref(), Some("1"));
    assert!(r.header("x-ratelimit-reset-requests").unwrap().ends_with('s'), "{:?}", r.headers);
    assert_eq!(r.header("x-ratelimit-limit-tokens").as_deref(), Some("100000"));
    let remaining: u64 = r.header("x-ratelimit-remaining-tokens").unwrap().parse().unwrap();
    assert!(remaining < 100000 && remaining > 99000, "{remaining}");
    assert!(r.header("x-ratelimit-reset-tokens").is_some());
    assert_eq!(ask(&gw, Some(&web_key), &chat).await.status, 200);
    let r = ask(&gw, Some(&web_key), &chat).await;
    assert_eq!(r.status, 429, "{}", r.text());
    let e = r.json();
    assert_eq!(
        (e["error"]["code"].as_str(), e["error"]["type"].as_str()),
        (Some("rate_limit_exceeded"), Some("requests"))
    );
    let retry: u64 = r.header("retry-after").unwrap().parse().unwrap();
    assert!((1..=20).contains(&retry), "one request comes back every 20 s: {retry}");
    assert_eq!(r.header("x-ratelimit-remaining-requests").as_deref(), Some("0"));

    // tpm = 60, one token a second back: each streamed request reserves ~33 tokens and settles at the 5 its
    // usage chunk reports. Were streamed tokens forgotten, the bucket would never run dry.
    let mut streamed = 0;
    let refusal = loop {
        let r = ask(&gw, Some(&batch_key), &body("gpt-4.1", true)).await;
        if r.status == 429 {
            break r;
        }
        assert_eq!(r.status, 200, "{}", r.text());
        assert!(r.text().contains("[DONE]"));
        streamed += 1;
        assert!(streamed < 20, "streamed tokens are not counted");
    };
    assert!(streamed >= 3, "refused after {streamed}");
    assert_eq!(refusal.json()["error"]["type"], "tokens", "{}", refusal.text());
    assert!(refusal.header("x-ratelimit-limit-requests").is_none(), "no rpm configured, no rpm headers");
    assert_eq!(refusal.header("x-ratelimit-limit-tokens").as_deref(), Some("60"));

    // max_parallel = 1: a second request while the first waits on the slow upstream is refused.
    let first = {
        let (url, k, b) = (gw.url("/v1/chat/completions"), slow_key.clone(), body("slow-model", false));
        tokio::spawn(async move {
            let auth = format!("Bearer {k}");
            request("POST", &url, &[("content-type", "application/json"), ("authorization", &auth)], b).await.status
        })
    };
    eventually(Duration::from_secs(10), "the slow request in flight", || async {
        get(&gw.url("/metrics")).await.text().lines().any(|l| l == "sheepdog_requests_in_flight 1")
    })
    .await;
    let r = ask(&gw, Some(&slow_key), &body("slow-model", false)).await;
    assert_eq!(r.status, 429, "{}", r.text());
    assert!(r.json()["error"]["message"].as_str().unwrap().contains("max_parallel"));
    assert_eq!(first.await.unwrap(), 200);
    assert_eq!(ask(&gw, Some(&slow_key), &body("slow-model", false)).await.status, 200, "its place is free again");

    // Names, never keys: metrics, the access log, the request log.
    let metrics = get(&gw.url("/metrics")).await.text();
    assert!(metrics.contains("sheepdog_client_requests_total{client=\"web-app\",model=\"gpt-4.1\",status=\"200\"} 3"));
    assert!(metrics.contains("sheepdog_client_requests_total{client=\"web-app\",model=\"gpt-4.1\",status=\"429\"} 1"));
    assert!(metrics.contains("sheepdog_rejections_total{reason=\"invalid_api_key\"} 2"), "{metrics}");
    assert!(metrics.contains("sheepdog_rejections_total{reason=\"model_not_allowed\"} 1"));
    eventually(Duration::from_secs(10), "client rows in the request log", || async {
        let s = get(&gw.url("/api/stats?since=1h")).await.json();
        s["clients"].as_array().is_some_and(|c| c.iter().any(|c| c["client"] == "web-app" && c["requests"] == 5))
    })
    .await;
    let logs = gw.proc.stderr();
    assert!(
        ["client=web-app", "client=\"web-app\"", "\"client\":\"web-app\""].iter().any(|c| logs.contains(c)),
        "{logs}"
    );
    for secret in [&web_key, &batch_key, &slow_key, &wrong.to_string()] {
        assert!(!metrics.contains(secret.as_str()) && !logs.contains(secret.as_str()), "a key leaked");
    }
    let db = std::fs::read(gw.dir.path().join("sheepdog.db")).unwrap_or_default();
    assert!(!db.windows(web_key.len()).any(|w| w == web_key.as_bytes()), "a key in the request log");
}

#[tokio::test]
async fn secure_defaults_admin_off_without_a_key_and_no_anonymous_service_off_loopback() {
    let up = TestUpstream::start(|s| Canned::completion(s, "up"));
    let cfg = quiet_config(&[("up", up.addr, "models = [\"gpt-4.1\"]")], &model("gpt-4.1", ""), "");
    // No admin key: the admin routes do not exist.
    let gw = gateway(&cfg, &[]);
    let r = request("POST", &gw.url("/admin/reload"), &[], "").await;
    assert_eq!((r.status, r.json()["error"]["code"].as_str()), (404, Some("not_found")));
    assert_eq!(request("POST", &gw.url("/admin/endpoints/up/disable"), &[], "").await.status, 404);
    drop(gw);
    // No clients, a non-loopback address: refused at start, saying how to fix it.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("sheepdog.toml");
    std::fs::write(&path, &cfg).unwrap();
    let out = Command::new(BIN)
        .args(["serve", "--config", path.to_str().unwrap(), "--listen", "0.0.0.0:0"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("server.allow_anonymous") && err.contains("sheepdog key new"), "{err}");
    // allow_anonymous = true says it is meant.
    std::fs::write(&path, cfg.replacen("[server]\n", "[server]\nallow_anonymous = true\n", 1)).unwrap();
    let p = Proc::spawn(
        &["serve", "--config", path.to_str().unwrap(), "--listen", "0.0.0.0:0"],
        &[],
        "sheepdog listening on ",
    );
    let port = p.addr.port();
    let r = post(&format!("http://127.0.0.1:{port}/v1/chat/completions"), &chat("gpt-4.1")).await;
    assert_eq!(r.status, 200, "{}", r.text());
}
