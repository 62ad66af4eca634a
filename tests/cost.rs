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
}
