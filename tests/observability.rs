//! What an operator sees of a gateway under traffic against real `sheepdog mock` upstreams: `/metrics` passes
//! `promtool check metrics`, has every metric of the contract with its type, unit buckets and OpenTelemetry
//! GenAI labels, names only configured models, and counts retries, hedges, failovers, breaker transitions and
//! rejections; `--log-format json` writes one JSON line per request and one per state change, never one per
//! request for a state.

mod common;
mod obs;

use std::collections::{BTreeMap, HashSet};
use std::time::Duration;

use common::*;
use obs::{parse, run, tool, total, Sample};

/// Every family of the contract (and the operator additions) with its type.
const FAMILIES: &[(&str, &str)] = &[
    ("sheepdog_upstream_up", "gauge"),
    ("sheepdog_breaker_state", "gauge"),
    ("sheepdog_probe_duration_seconds", "histogram"),
    ("sheepdog_request_duration_seconds", "histogram"),
    ("sheepdog_time_to_first_token_seconds", "histogram"),
    ("sheepdog_requests_total", "counter"),
    ("sheepdog_failovers_total", "counter"),
    ("sheepdog_tokens_total", "counter"),
    ("sheepdog_cost_usd_total", "counter"),
    ("sheepdog_global_degraded", "gauge"),
    ("sheepdog_state_backend_up", "gauge"),
    ("sheepdog_client_requests_total", "counter"),
    ("gen_ai_client_operation_duration_seconds", "histogram"),
    ("gen_ai_client_token_usage", "histogram"),
    ("sheepdog_rejections_total", "counter"),
    ("sheepdog_retries_total", "counter"),
    ("sheepdog_hedges_total", "counter"),
    ("sheepdog_breaker_transitions_total", "counter"),
    ("sheepdog_requests_in_flight", "gauge"),
    ("sheepdog_request_log_queue_depth", "gauge"),
    ("sheepdog_request_log_queue_capacity", "gauge"),
    ("sheepdog_request_log_written_total", "counter"),
    ("sheepdog_request_log_dropped_total", "counter"),
    ("sheepdog_log_lines_dropped_total", "counter"),
    ("sheepdog_config_reloads_total", "counter"),
    ("sheepdog_config_last_reload_successful", "gauge"),
    ("sheepdog_connections_open", "gauge"),
    ("sheepdog_build_info", "gauge"),
];

fn label_names(samples: &[Sample], name: &str) -> Vec<String> {
    let s = samples.iter().find(|s| s.name == name).unwrap_or_else(|| panic!("no {name} sample"));
    s.labels.keys().filter(|k| *k != "le").cloned().collect()
}

fn buckets(samples: &[Sample], name: &str) -> Vec<String> {
    let first = samples.iter().find(|s| s.name == name).unwrap_or_else(|| panic!("no {name}"));
    let series: Vec<_> = first.labels.iter().filter(|(k, _)| *k != "le").collect();
    samples
        .iter()
        .filter(|s| s.name == name && s.labels.iter().filter(|(k, _)| *k != "le").eq(series.iter().copied()))
        .map(|s| s.labels["le"].clone())
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn metrics_under_traffic_pass_promtool_and_name_only_configured_models() {
    let a = mock("a", "gpt-4.1,claude-sonnet-4.5,text-embedding-3-small", &["--latency-ms", "80"]);
    let b = mock("b", "gpt-4.1,claude-sonnet-4.5", &["--latency-ms", "5"]);
    let dead = mock("dead", "doomed", &[]);
    let cfg = config(
        &[
            ("a", a.addr, "models = [\"gpt-4.1\", \"claude-sonnet-4.5\", \"text-embedding-3-small\"]"),
            // gpt-4.1 goes to b first (weight); claude-sonnet-4.5 to a first (priority), hedged on b.
            ("b", b.addr, "models = [\"gpt-4.1\", \"claude-sonnet-4.5\"]\nweight = 1000\npriority = 1"),
            ("dead", dead.addr, "models = [\"doomed\"]"),
        ],
        &format!(
            "{}{}{}{}",
            model("gpt-4.1", "fallbacks = [\"claude-sonnet-4.5\"]"),
            model("claude-sonnet-4.5", "strategy = \"priority\"\nhedge_after = \"20ms\""),
            model("text-embedding-3-small", "kind = \"embeddings\""),
            model("doomed", "")
        ),
        "[retry]\nmax_attempts = 3\nbackoff_base = \"5ms\"\n[breaker]\nfailure_threshold = 2\nrecovery_timeout = \"60s\"\n",
    );
    let gw = gateway(&cfg, &[]);
    let url = gw.url("/v1/chat/completions");
    faults(&dead, r#"{"mode": "error_500"}"#).await;

    let mut sent = 0u32;
    for _ in 0..6 {
        assert_eq!(post(&url, &chat("gpt-4.1")).await.status, 200);
        sent += 1;
    }
    let s = stream(&url, r#"{"model":"gpt-4.1","stream":true,"stream_options":{"include_usage":true},"messages":[{"role":"user","content":"hi"}]}"#).await;
    assert_eq!(s.status, 200);
    sent += 1;
    let e = post(&gw.url("/v1/embeddings"), r#"{"model":"text-embedding-3-small","input":"hello"}"#).await;
    assert_eq!(e.status, 200, "{}", e.text());
    sent += 1;
    for _ in 0..3 {
        assert_eq!(post(&url, &chat("claude-sonnet-4.5")).await.status, 200);
        sent += 1;
    }
    // b fails: gpt-4.1 fails over to a (a retry), and probes open b's breakers.
    faults(&b, r#"{"mode": "error_500"}"#).await;
    for _ in 0..4 {
        assert_eq!(post(&url, &chat("gpt-4.1")).await.status, 200);
        sent += 1;
    }
    eventually(Duration::from_secs(10), "b's breaker open", || async {
        pair_status(&gw, "b", "gpt-4.1").await["breaker"] == "open"
    })
    .await;
    assert_eq!(post(&url, &chat("doomed")).await.status, 503);
    sent += 1;
    // Client input that must not become a label value, and the gateway's own refusals.
    let typos = ["gpt-4.1-typo-7f3a", "x\"}injected{", "../../etc/passwd"];
    for t in typos {
        assert_eq!(
            post(&url, &serde_json::json!({"model": t, "messages": [{"role": "user", "content": "x"}]}).to_string())
                .await
                .status,
            404
        );
        sent += 1;
    }
    assert_eq!(post(&url, "{not json").await.status, 400);
    let r = request("POST", &url, &[("content-type", "text/plain")], "hello").await;
    assert_eq!(r.status, 415);
    let big = format!(r#"{{"model":"gpt-4.1","messages":[{{"role":"user","content":"{}"}}]}}"#, "x".repeat(9 << 20));
    assert_eq!(post(&url, &big).await.status, 413);
    sent += 3;

    let metrics_url = gw.url("/metrics");
    eventually(Duration::from_secs(10), "every request counted and finished", || async {
        let (s, _) = parse(&get(&metrics_url).await.text());
        total(&s, "sheepdog_client_requests_total", &[]) == f64::from(sent)
            && total(&s, "sheepdog_requests_in_flight", &[]) == 0.0
    })
    .await;
    let text = get(&metrics_url).await.text();

    // promtool's linter accepts the scrape.
    let (ok, out) = run(&tool("promtool"), &["check", "metrics"], Some(text.as_bytes()), None);
    assert!(ok, "promtool check metrics:\n{out}");

    let (samples, types) = parse(&text);
    for (name, ty) in FAMILIES {
        assert_eq!(types.get(*name).map(String::as_str), Some(*ty), "{name}");
    }
    // Label values come from configuration only: no series names what a client typed.
    for t in typos {
        assert!(!text.contains(t), "{t} became a label value");
    }
    let models: HashSet<&str> = samples
        .iter()
        .flat_map(|s| ["model", "gen_ai_request_model", "gen_ai_response_model"].map(|k| s.labels.get(k)))
        .flatten()
        .map(String::as_str)
        .collect();
    let allowed: HashSet<&str> =
        ["gpt-4.1", "claude-sonnet-4.5", "text-embedding-3-small", "doomed", "unknown", ""].into_iter().collect();
    assert!(models.is_subset(&allowed), "{models:?}");

    // OpenTelemetry GenAI: the convention's attributes and buckets; one operation per client request.
    assert_eq!(
        label_names(&samples, "gen_ai_client_operation_duration_seconds_bucket"),
        [
            "error_type",
            "gen_ai_operation_name",
            "gen_ai_provider_name",
            "gen_ai_request_model",
            "gen_ai_response_model"
        ]
    );
    assert_eq!(
        label_names(&samples, "gen_ai_client_token_usage_bucket"),
        ["gen_ai_operation_name", "gen_ai_provider_name", "gen_ai_request_model", "gen_ai_token_type"]
    );
    let doubling: Vec<String> = (0..14).map(|i| format!("{}", 0.01 * f64::from(1u32 << i))).collect();
    let mut expect = doubling.iter().map(|s| s.trim_end_matches('0').to_string()).collect::<Vec<_>>();
    expect.push("+Inf".into());
    let got: Vec<String> = buckets(&samples, "gen_ai_client_operation_duration_seconds_bucket");
    let norm = |v: &[String]| v.iter().map(|s| s.parse::<f64>().unwrap_or(f64::INFINITY)).collect::<Vec<_>>();
    assert_eq!(norm(&got), norm(&expect));
    let tokens = buckets(&samples, "gen_ai_client_token_usage_bucket");
    assert_eq!(tokens.first().map(String::as_str), Some("1"));
    assert!(tokens.contains(&"67108864".to_string()), "{tokens:?}");
    assert_eq!(total(&samples, "gen_ai_client_operation_duration_seconds_count", &[]), f64::from(sent));
    let ok_chat = [("gen_ai_operation_name", "chat"), ("gen_ai_provider_name", "a"), ("error_type", "")];
    assert!(total(&samples, "gen_ai_client_operation_duration_seconds_count", &ok_chat) >= 1.0);
    let embeddings = [("gen_ai_operation_name", "embeddings"), ("gen_ai_request_model", "text-embedding-3-small")];
    assert_eq!(total(&samples, "gen_ai_client_operation_duration_seconds_count", &embeddings), 1.0);
    let failed = [("gen_ai_request_model", "doomed"), ("error_type", "no_upstream_available")];
    assert_eq!(total(&samples, "gen_ai_client_operation_duration_seconds_count", &failed), 1.0);
    assert!(total(&samples, "gen_ai_client_token_usage_sum", &[("gen_ai_token_type", "output")]) > 0.0);

    // The seconds histograms resolve a 10 ms probe and a 60 s completion.
    let le = buckets(&samples, "sheepdog_request_duration_seconds_bucket");
    for v in ["0.01", "0.015", "40", "60", "90"] {
        assert!(le.contains(&v.to_string()), "bucket {v} missing: {le:?}");
    }

    // Operators' counters.
    assert!(total(&samples, "sheepdog_retries_total", &[("model", "gpt-4.1")]) >= 1.0, "retries");
    assert!(total(&samples, "sheepdog_failovers_total", &[("model", "gpt-4.1")]) >= 1.0, "failovers");
    assert!(total(&samples, "sheepdog_hedges_total", &[("model", "claude-sonnet-4.5")]) >= 1.0, "hedges");
    let opened = [("endpoint", "b"), ("to", "open")];
    assert_eq!(total(&samples, "sheepdog_breaker_transitions_total", &opened), 1.0);
    let rejections: BTreeMap<&str, f64> =
        ["model_not_found", "invalid_request", "unsupported_media_type", "body_too_large", "budget_exceeded"]
            .into_iter()
            .map(|r| (r, total(&samples, "sheepdog_rejections_total", &[("reason", r)])))
            .collect();
    assert_eq!(
        rejections,
        BTreeMap::from([
            ("body_too_large", 1.0),
            ("budget_exceeded", 0.0),
            ("invalid_request", 1.0),
            ("model_not_found", 3.0),
            ("unsupported_media_type", 1.0)
        ])
    );
    assert_eq!(total(&samples, "sheepdog_request_log_queue_capacity", &[]), 65536.0);
    assert_eq!(total(&samples, "sheepdog_config_last_reload_successful", &[]), 1.0);
    drop((a, dead));
}

/// The JSON lines of a gateway's stderr (every line must be one).
fn json_lines(stderr: &str) -> Vec<serde_json::Value> {
    stderr
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not a JSON line ({e}): {l}")))
        .collect()
}

fn count(lines: &[serde_json::Value], level: &str, message_starts: &str) -> usize {
    lines
        .iter()
        .filter(|l| l["level"] == level && l["message"].as_str().unwrap_or("").starts_with(message_starts))
        .count()
}

#[tokio::test(flavor = "multi_thread")]
async fn json_logs_one_line_per_request_and_one_per_state_change() {
    let up = mock("up", "gpt-4.1", &[]);
    let cfg = config(
        &[("up", up.addr, "models = [\"gpt-4.1\"]")],
        &model("gpt-4.1", ""),
        "[retry]\nmax_attempts = 1\n[breaker]\nfailure_threshold = 2\nrecovery_timeout = \"1s\"\nmax_recovery_timeout = \"1s\"\nsuccess_threshold = 1\n",
    );
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("sheepdog.toml");
    std::fs::write(&path, &cfg).unwrap();
    let p = path.to_str().unwrap();
    let gw = Proc::spawn(
        &["serve", "--config", p, "--listen", "127.0.0.1:0", "--log-format", "json"],
        &[("SHEEPDOG_TEST_KEY", "sk-never-logged")],
        "sheepdog listening on ",
    );
    let url = gw.url("/v1/chat/completions");
    for _ in 0..5 {
        assert_eq!(post(&url, &chat("gpt-4.1")).await.status, 200);
    }
    assert_eq!(post(&url, &chat("nope")).await.status, 404);
    // Access lines only: start-up lines such as the request log's also begin with "request".
    let access_lines = |s: &str| json_lines(s).iter().filter(|l| l["target"] == "sheepdog::access").count();
    eventually(Duration::from_secs(10), "six access lines", || async { access_lines(&gw.stderr()) >= 6 }).await;
    let lines = json_lines(&gw.stderr());
    let access: Vec<_> = lines.iter().filter(|l| l["target"] == "sheepdog::access").collect();
    assert_eq!(access.len(), 6);
    let ok = access[0];
    for field in
        ["timestamp", "request_id", "client", "model", "endpoint", "attempts", "status", "latency_ms", "cost_usd"]
    {
        assert!(ok.get(field).is_some(), "{field} missing: {ok}");
    }
    assert_eq!(
        (ok["level"].as_str(), ok["model"].as_str(), ok["endpoint"].as_str()),
        (Some("INFO"), Some("gpt-4.1"), Some("up"))
    );
    assert_eq!(
        (ok["status"].as_u64(), ok["attempts"].as_u64(), ok["client"].as_str()),
        (Some(200), Some(1), Some("anonymous"))
    );
    assert!(ok["latency_ms"].as_f64().unwrap() > 0.0 && ok["cost_usd"].as_f64().unwrap() > 0.0, "{ok}");
    let ids: HashSet<&str> = access.iter().map(|l| l["request_id"].as_str().unwrap()).collect();
    assert_eq!(ids.len(), 6, "request ids are unique");
    assert!(
        ids.iter().all(|id| id.len() == 20 && id.starts_with("req_") && id[4..].chars().all(|c| c.is_ascii_hexdigit())),
        "{ids:?}"
    );
    let unknown = access.iter().find(|l| l["status"] == 404).unwrap();
    assert_eq!((unknown["model"].as_str(), unknown["error"].as_str()), (Some("unknown"), Some("model_not_found")));

    // An outage under traffic: the breaker opens and the pair and the gateway degrade once each, however many
    // requests fail meanwhile; recovery is logged once too.
    faults(&up, r#"{"mode": "error_500"}"#).await;
    let mut failed = 0;
    for _ in 0..30 {
        if post(&url, &chat("gpt-4.1")).await.status != 200 {
            failed += 1;
        }
    }
    assert!(failed >= 25, "{failed}");
    eventually(Duration::from_secs(10), "global degraded logged", || async {
        count(&json_lines(&gw.stderr()), "ERROR", "global degraded") >= 1
    })
    .await;
    faults(&up, r#"{"mode": "ok"}"#).await;
    eventually(Duration::from_secs(20), "the breaker closed and degraded cleared", || async {
        let l = json_lines(&gw.stderr());
        count(&l, "WARN", "circuit breaker closed") >= 1 && count(&l, "WARN", "fewer than half") >= 1
    })
    .await;
    let metrics = get(&gw.url("/metrics")).await.text();
    let (samples, _) = parse(&metrics);
    let lines = json_lines(&gw.stderr());
    for (to, msg) in [("open", "circuit breaker opened"), ("closed", "circuit breaker closed")] {
        let n = total(&samples, "sheepdog_breaker_transitions_total", &[("to", to)]);
        assert_eq!(count(&lines, "WARN", msg) as f64, n, "one {msg:?} line per transition to {to}");
        assert!(n >= 1.0);
    }
    // Warnings and errors follow state changes (a few per breaker cycle), not the 30 failed requests.
    let opened = total(&samples, "sheepdog_breaker_transitions_total", &[("to", "open")]) as usize;
    let state_lines = lines.iter().filter(|l| l["level"] == "WARN" || l["level"] == "ERROR").count();
    assert!(
        state_lines <= 6 * opened + 4 && state_lines < failed,
        "{state_lines} warn/error lines for {opened} breaker openings, {failed} failed requests"
    );
    assert!(count(&lines, "WARN", "endpoint health changed") >= 1, "the pair's status change is a warning");
    assert_eq!(
        count(&lines, "ERROR", "global degraded"),
        count(&lines, "WARN", "fewer than half"),
        "every degradation logged once, and its end once"
    );
    assert!(!gw.stderr().contains("sk-never-logged"));
}

/// The access line is never written on the request path: with the gateway's stderr a pipe nobody reads (a
/// stuck log collector), the pipe fills after a few hundred lines and the requests go on being answered.
/// Written on the request path, the line would block a worker in `write(2)` and, once every worker was
/// blocked, every request.
#[tokio::test]
async fn a_stuck_log_reader_does_not_stall_requests() {
    let up = mock("up", "m", &[]);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("sheepdog.toml");
    std::fs::write(&path, quiet_config(&[("a", up.addr, "models = [\"m\"]")], &model("m", ""), "")).unwrap();
    let args = ["serve", "--config", path.to_str().unwrap(), "--listen", "127.0.0.1:0"];
    let gw = Proc::spawn_stderr_unread(&args, "sheepdog listening on ");
    // ~250 bytes an access line: 2,000 of them are 500 KB, eight times what a pipe holds.
    let work = async {
        for i in 0..2000 {
            let r = post(&gw.url("/v1/chat/completions"), &chat("m")).await;
            assert_eq!(r.status, 200, "request {i}: {}", r.text());
        }
    };
    let answered = tokio::time::timeout(Duration::from_secs(120), work).await;
    assert!(answered.is_ok(), "requests stalled behind a full stderr pipe");
    let metrics = tokio::time::timeout(Duration::from_secs(10), get(&gw.url("/metrics"))).await;
    assert!(metrics.is_ok_and(|m| m.text().contains("sheepdog_log_lines_dropped_total 0")));
}
