//! Cost you can trust: prices from the pricing table, cached prompt tokens at the cached price and billed once,
//! reasoning tokens inside the output, a relay's price multiplier — for JSON answers and streams, through real
//! sockets, to the cent against hand-computed values, in `/metrics` and in the request log.

mod common;

use std::time::Duration;

use common::*;
use sheepdog::log::{open_read, read_since};

/// 1,000,000 prompt tokens of which 800,000 cached; 200,000 completion tokens of which 50,000 reasoning.
const USAGE: &str = r#"{"prompt_tokens":1000000,"completion_tokens":200000,"total_tokens":1200000,"prompt_tokens_details":{"cached_tokens":800000},"completion_tokens_details":{"reasoning_tokens":50000}}"#;

fn upstream() -> TestUpstream {
    TestUpstream::start(|s| {
        if s.body.contains("\"stream\":true") {
            let body = format!(
                "data: {{\"choices\":[{{\"index\":0,\"delta\":{{\"content\":\"hi\"}}}}]}}\n\ndata: {{\"choices\":[],\"usage\":{USAGE}}}\n\ndata: [DONE]\n\n"
            );
            Canned::new(200, "text/event-stream", body)
        } else {
            Canned::json(
                200,
                format!(
                    r#"{{"choices":[{{"index":0,"message":{{"role":"assistant","content":"hi"}}}}],"usage":{USAGE}}}"#
                ),
            )
        }
    })
}

fn metric(metrics: &str, line_start: &str) -> Option<f64> {
    metrics.lines().find(|l| l.starts_with(line_start)).and_then(|l| l.rsplit(' ').next()?.parse().ok())
}

#[tokio::test]
async fn costs_follow_the_pricing_table_the_cache_and_the_relay_multiplier() {
    let list = upstream();
    let relay = upstream();
    let cfg = quiet_config(
        &[
            ("list", list.addr, "models = [\"gpt-4.1\"]"),
            ("relay", relay.addr, "price_multiplier = 0.15\nmodels = [\"gpt-4.1-relay\"]"),
        ],
        &(model("gpt-4.1", "cached_input_usd_per_mtok = 0.5")
            + &model("gpt-4.1-relay", "cached_input_usd_per_mtok = 0.5")),
        "",
    )
    // No probe may add cost: probes are priced under source="probe", but keep the figures exact.
    .replace("[health]\n", "[health]\nprobe = \"models\"\n");
    let gw = gateway(&cfg, &[]);
    let url = gw.url("/v1/chat/completions");
    for (model, stream) in [("gpt-4.1", false), ("gpt-4.1", true), ("gpt-4.1-relay", false), ("gpt-4.1-relay", true)] {
        let body =
            serde_json::json!({"model": model, "stream": stream, "messages": [{"role": "user", "content": "x"}]});
        let status = if stream {
            let s = common::stream(&url, &body.to_string()).await;
            assert!(s.error.is_none(), "{:?}", s.error);
            s.status
        } else {
            post(&url, &body.to_string()).await.status
        };
        assert_eq!(status, 200, "{model} stream={stream}");
    }
    // List price: 200,000 uncached × $2 + 800,000 cached × $0.50 + 200,000 output × $8 (reasoning inside) per
    // million = $0.40 + $0.40 + $1.60 = $2.40 a request, two requests. The relay bills 15 % of that.
    let m = get(&gw.url("/metrics")).await.text();
    let list_cost = metric(&m, r#"sheepdog_cost_usd_total{endpoint="list",model="gpt-4.1",source="request"}"#);
    let relay_cost = metric(&m, r#"sheepdog_cost_usd_total{endpoint="relay",model="gpt-4.1-relay",source="request"}"#);
    assert!((list_cost.unwrap() - 4.80).abs() < 1e-9, "{m}");
    assert!((relay_cost.unwrap() - 0.72).abs() < 1e-9, "{m}");
    assert_eq!(
        metric(&m, r#"sheepdog_tokens_total{endpoint="list",kind="prompt",model="gpt-4.1"}"#),
        Some(2_000_000.0)
    );
    assert_eq!(
        metric(&m, r#"sheepdog_tokens_total{endpoint="list",kind="completion",model="gpt-4.1"}"#),
        Some(400_000.0)
    );

    let db = gw.dir.path().join("sheepdog.db");
    eventually(Duration::from_secs(10), "four rows", || async {
        open_read(&db).and_then(|c| read_since(&c, 0)).map(|r| r.len() >= 4).unwrap_or(false)
    })
    .await;
    let rows = read_since(&open_read(&db).unwrap(), 0).unwrap();
    let costs: Vec<f64> = rows.iter().map(|r| r.cost_usd.unwrap()).collect();
    for (got, want) in costs.iter().zip([2.40, 2.40, 0.36, 0.36]) {
        assert!((got - want).abs() < 1e-12, "{costs:?}");
    }

    // GET /api/stats: the same figures in the contract's shape, summed in exact nano-dollars.
    let s = get(&gw.url("/api/stats?since=1h")).await.json();
    let t = &s["total"];
    assert_eq!((t["requests"].as_u64(), t["ok"].as_u64(), t["errors"].as_u64()), (Some(4), Some(4), Some(0)), "{s}");
    assert_eq!(t["success_rate"], 1.0);
    assert!((t["cost_usd"].as_f64().unwrap() - 5.52).abs() < 1e-12, "{s}");
    assert_eq!((t["prompt_tokens"].as_u64(), t["completion_tokens"].as_u64()), (Some(4_000_000), Some(800_000)));
    // $5.52 for 4.8 M tokens.
    assert!((t["cost_per_1k_tokens_usd"].as_f64().unwrap() - 0.00115).abs() < 1e-12, "{s}");
    for k in ["mean", "p50", "p95", "p99"] {
        assert!(t["latency_ms"][k].as_f64().is_some_and(|v| v > 0.0), "{k}: {s}");
    }
    assert!(t["ttft_ms"]["p50"].as_f64().is_some());
    assert_eq!(t["estimated_share"], 0.0);
    assert_eq!(s["models"].as_array().unwrap().len(), 2);
    let e = s["endpoints"].as_array().unwrap().iter().find(|e| e["endpoint"] == "relay").unwrap();
    assert_eq!(e["model"], "gpt-4.1-relay");
    assert!((e["cost_usd"].as_f64().unwrap() - 0.72).abs() < 1e-12, "{e}");
    assert!(s["since"].as_str().unwrap().ends_with('Z') && s["until"].as_str().unwrap().ends_with('Z'));
    let relay_only = get(&gw.url("/api/stats?since=1h&model=gpt-4.1-relay")).await.json();
    assert_eq!(relay_only["total"]["requests"], 2);
    assert_eq!(get(&gw.url("/api/stats?since=soon")).await.status, 400);

    // `sheepdog report --project-tokens`: what 12 M tokens a month would cost, from the config's prices and
    // multipliers and the log's mix (4 M prompt : 0.8 M completion, 80 % of the prompt cached).
    let charts = gw.dir.path().join("charts");
    let cfg_path = gw.path();
    let out = std::process::Command::new(BIN)
        .args(["report", "--config", cfg_path.to_str().unwrap(), "--project-tokens", "12M", "--format", "json"])
        .args(["--sla-ms", "1500", "--charts", charts.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let r: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let p = &r["projection"];
    assert_eq!((p["prompt_tokens"].as_u64(), p["completion_tokens"].as_u64()), (Some(10_000_000), Some(2_000_000)));
    assert_eq!(p["cached_prompt_tokens"], 8_000_000);
    // List price: 2 M uncached × $2 + 8 M cached × $0.50 + 2 M out × $8 = $24 on either model; the relay
    // bills 15 % of it: $3.60. At the window's own cost per token: $5.52 / 4.8 M × 12 M = $13.80.
    let models: Vec<f64> = p["models"].as_array().unwrap().iter().map(|m| m["cost_usd"].as_f64().unwrap()).collect();
    assert_eq!(models, vec![24.0, 24.0], "{p}");
    let eps: Vec<(&str, f64)> = p["endpoints"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| (e["endpoint"].as_str().unwrap(), e["cost_usd"].as_f64().unwrap()))
        .collect();
    assert_eq!(eps, vec![("relay", 3.6), ("list", 24.0)], "{p}");
    assert!((p["at_current_mix_usd"].as_f64().unwrap() - 13.8).abs() < 1e-9, "{p}");
    assert_eq!((r["sla_ms"].as_f64(), r["total"]["over_sla"].as_u64()), (Some(1500.0), Some(0)));
    for f in ["cost.svg", "latency.svg", "success.svg", "requests.svg"] {
        let svg = std::fs::read_to_string(charts.join(f)).unwrap();
        assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"), "{f}");
    }
    assert!(std::fs::read_to_string(charts.join("latency.svg")).unwrap().contains("SLA 1500 ms"));
    // Each model's share of the $5.52: $4.80 and $0.72.
    let cost = std::fs::read_to_string(charts.join("cost.svg")).unwrap();
    assert!(cost.contains("$4.80 · 87.0 %") && cost.contains("$0.7200 · 13.0 %"), "{cost}");

    // Without prices there is nothing to project from: a clear error, exit 2.
    let db = gw.dir.path().join("sheepdog.db");
    let out = std::process::Command::new(BIN)
        .current_dir(gw.dir.path().join("charts"))
        .args(["report", "--db", db.to_str().unwrap(), "--project-tokens", "10M"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--project-tokens needs the pricing table"));
    let out = std::process::Command::new(BIN)
        .args(["report", "--db", db.to_str().unwrap(), "--project-tokens", "lots"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("not a token count"), "{out:?}");
}

/// A stream as OpenAI sends it: with `include_usage`, `"usage":null` on every chunk and a usage chunk last.
fn openai_like(seen: &Seen) -> Canned {
    let asked = seen.body.contains("\"include_usage\":true");
    let null = if asked { r#","usage":null"# } else { "" };
    let mut body = String::new();
    for c in ["Hello", ", world!"] {
        body += &format!(
            "data: {{\"id\":\"c\",\"choices\":[{{\"index\":0,\"delta\":{{\"content\":\"{c}\"}}}}]{null}}}\n\n"
        );
    }
    if asked {
        body += "data: {\"id\":\"c\",\"choices\":[],\"usage\":{\"prompt_tokens\":11,\"completion_tokens\":4}}\n\n";
    }
    body += "data: [DONE]\n\n";
    Canned::new(200, "text/event-stream", body)
}

/// A stream that never reports usage, as llama.cpp's server does.
fn no_usage(_: &Seen) -> Canned {
    Canned::new(
        200,
        "text/event-stream",
        "data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"Hello\"}}]}\n\n\
         data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\", world!\"}}]}\n\ndata: [DONE]\n\n",
    )
}

#[tokio::test]
async fn every_stream_is_costed_and_the_client_sees_what_it_asked_for() {
    let honest = TestUpstream::start(openai_like);
    let llama = TestUpstream::start(no_usage);
    let cfg = quiet_config(
        &[("honest", honest.addr, "models = [\"gpt-4.1\"]"), ("llama", llama.addr, "models = [\"local\"]")],
        &(model("gpt-4.1", "") + &model("local", "")),
        "",
    )
    .replace("[health]\n", "[health]\nprobe = \"models\"\n");
    let gw = gateway(&cfg, &[]);
    let url = gw.url("/v1/chat/completions");
    let ask = |model: &str, usage: bool| {
        let mut b = serde_json::json!({"model": model, "stream": true, "messages": [{"role": "user", "content": "Hello, world!"}]});
        if usage {
            b["stream_options"] = serde_json::json!({"include_usage": true});
        }
        b.to_string()
    };
    // The client did not ask for usage: the upstream was asked, the client sees none of it.
    let s = common::stream(&url, &ask("gpt-4.1", false)).await;
    assert_eq!((s.status, s.content().as_str()), (200, "Hello, world!"));
    assert!(!s.text().contains("usage"), "{}", s.text());
    assert!(s.text().ends_with("data: [DONE]\n\n"));
    assert_eq!(honest.count("\"include_usage\":true"), 1);
    // A client that asked gets it as the upstream sent it.
    let s = common::stream(&url, &ask("gpt-4.1", true)).await;
    assert!(s.text().contains("\"usage\":{\"prompt_tokens\":11"), "{}", s.text());
    // No usage at all: counted by the gateway, marked as estimated.
    let s = common::stream(&url, &ask("local", false)).await;
    assert_eq!((s.status, s.content().as_str()), (200, "Hello, world!"));
    let db = gw.dir.path().join("sheepdog.db");
    eventually(Duration::from_secs(10), "three rows", || async {
        open_read(&db).and_then(|c| read_since(&c, 0)).map(|r| r.len() >= 3).unwrap_or(false)
    })
    .await;
    let rows = read_since(&open_read(&db).unwrap(), 0).unwrap();
    let got: Vec<(Option<u64>, Option<u64>, bool)> =
        rows.iter().map(|r| (r.prompt_tokens, r.completion_tokens, r.estimated)).collect();
    // o200k_base: "Hello, world!" is 4 tokens; the prompt adds 3 per message and 3 for the reply.
    assert_eq!(got, vec![(Some(11), Some(4), false), (Some(11), Some(4), false), (Some(10), Some(4), true)]);
    // $2 in, $8 out per million: the estimated row is priced like the others.
    let want = (10.0 * 2.0 + 4.0 * 8.0) / 1e6;
    assert!((rows[2].cost_usd.unwrap() - want).abs() < 1e-12, "{:?}", rows[2].cost_usd);
    let stats = get(&gw.url("/api/stats?since=1h")).await.json();
    assert!((stats["total"]["estimated_share"].as_f64().unwrap() - 1.0 / 3.0).abs() < 1e-9, "{stats}");
}

#[tokio::test]
async fn a_json_answer_without_usage_is_counted_by_the_gateway_and_marked_estimated() {
    let up = TestUpstream::start(|_| {
        Canned::json(
            200,
            r#"{"id":"c","object":"chat.completion","choices":[{"index":0,"message":{"role":"assistant","content":"Hello, world!"},"finish_reason":"stop"}]}"#,
        )
    });
    let cfg = quiet_config(&[("bare", up.addr, "models = [\"local\"]")], &model("local", ""), "")
        .replace("[health]\n", "[health]\nprobe = \"models\"\n");
    let gw = gateway(&cfg, &[]);
    let r = post(
        &gw.url("/v1/chat/completions"),
        r#"{"model":"local","messages":[{"role":"user","content":"Hello, world!"}]}"#,
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(r.json().get("usage").is_none(), "the answer is passed on as it came: {}", r.text());
    let db = gw.dir.path().join("sheepdog.db");
    eventually(Duration::from_secs(10), "the row", || async {
        open_read(&db).and_then(|c| read_since(&c, 0)).map(|r| !r.is_empty()).unwrap_or(false)
    })
    .await;
    let rows = read_since(&open_read(&db).unwrap(), 0).unwrap();
    // o200k_base: "Hello, world!" is 4 tokens; the prompt adds 3 per message and 3 for the reply.
    assert_eq!(
        (rows[0].prompt_tokens, rows[0].completion_tokens, rows[0].estimated),
        (Some(10), Some(4), true),
        "{rows:?}"
    );
    let want = (10.0 * 2.0 + 4.0 * 8.0) / 1e6;
    assert!((rows[0].cost_usd.unwrap() - want).abs() < 1e-12, "{:?}", rows[0].cost_usd);
}
