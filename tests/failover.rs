//! Fault drills: three `sheepdog mock` upstreams under steady client load; one fails in each way; clients see no
//! error, the breaker opens and the bad endpoint gets no live traffic, and it comes back after the fault clears.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;

/// Drills run one at a time: each measures timing on a 2-core machine.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

const RECOVERY_MS: u64 = 1000;
const INTERVAL_MS: u64 = 300;

fn drill_config(addrs: &[(&str, std::net::SocketAddr)], strategy: &str) -> String {
    let eps: Vec<(&str, std::net::SocketAddr, &str)> = addrs
        .iter()
        .map(|(n, a)| (*n, *a, "models = [\"gpt-4.1\"]\nfirst_byte_timeout = \"500ms\"\ntimeout = \"3s\""))
        .collect();
    let extra = format!(
        "[breaker]\nfailure_threshold = 3\nrecovery_timeout = \"{RECOVERY_MS}ms\"\nsuccess_threshold = 2\n\n\
         [retry]\nmax_attempts = 3\nbackoff_base = \"10ms\"\ndeadline = \"10s\"\n"
    );
    // Probes use GET /v1/models so that the mocks' chat counters show live traffic only.
    config(&eps, &model("gpt-4.1", &format!("strategy = \"{strategy}\"")), &extra)
        .replace("timeout = \"1s\"\n\n[breaker]", "timeout = \"1s\"\nprobe = \"models\"\n\n[breaker]")
}

/// Probes once at start only, so that they cannot open a breaker before the request under test.
fn quiet(cfg: String) -> String {
    cfg.replace("interval = \"300ms\"", "interval = \"60s\"")
        .replace("idle_interval = \"1s\"", "idle_interval = \"60s\"")
}

fn chat_count(stats: &serde_json::Value) -> u64 {
    stats["by_path"]["/v1/chat/completions"].as_u64().unwrap_or(0)
}

struct Load {
    stop: Arc<AtomicBool>,
    tasks: Vec<tokio::task::JoinHandle<Vec<u16>>>,
}

fn load(url: String, workers: usize) -> Load {
    let stop = Arc::new(AtomicBool::new(false));
    let tasks = (0..workers)
        .map(|_| {
            let (url, stop) = (url.clone(), stop.clone());
            tokio::spawn(async move {
                let mut codes = Vec::new();
                while !stop.load(Ordering::Relaxed) {
                    let r = post(&url, &chat("gpt-4.1")).await;
                    if r.status != 200 {
                        eprintln!("client error {}: {}", r.status, r.text());
                    }
                    codes.push(r.status);
                }
                codes
            })
        })
        .collect();
    Load { stop, tasks }
}

impl Load {
    async fn finish(self) -> Vec<u16> {
        self.stop.store(true, Ordering::Relaxed);
        let mut all = Vec::new();
        for t in self.tasks {
            all.extend(t.await.unwrap());
        }
        all
    }
}

async fn breaker(gw: &Gateway, ep: &str) -> String {
    pair_status(gw, ep, "gpt-4.1").await["breaker"].as_str().unwrap().to_string()
}

/// The drill: `inject` breaks endpoint `a`, `clear` repairs it (returning the repaired mock if it was replaced).
async fn drill(mode: &str) {
    let _serial = SERIAL.lock().await;
    let mut a = mock("a", "gpt-4.1", &["--latency-ms", "5"]);
    let b = mock("b", "gpt-4.1", &["--latency-ms", "5"]);
    let c = mock("c", "gpt-4.1", &["--latency-ms", "5"]);
    let gw = gateway(&drill_config(&[("a", a.addr), ("b", b.addr), ("c", c.addr)], "weighted_round_robin"), &[]);
    eventually(Duration::from_secs(10), "all pairs probed", || async {
        let s = get(&gw.url("/status")).await.json();
        s["endpoints"].as_array().unwrap().iter().all(|e| e["models"][0]["checks"].as_u64().unwrap() >= 1)
    })
    .await;
    let traffic = load(gw.url("/v1/chat/completions"), 4);
    eventually(Duration::from_secs(5), "a serves live traffic", || async { chat_count(&mock_stats(&a).await) > 5 })
        .await;

    // Break it.
    let a_addr = a.addr;
    if mode == "kill" {
        a.kill();
    } else {
        faults(&a, &format!(r#"{{"mode":"{mode}"}}"#)).await;
    }
    eventually(Duration::from_secs(10), "a's breaker opens", || async { breaker(&gw, "a").await == "open" }).await;

    // While open: no live traffic to a, only probes.
    if mode != "kill" {
        let s0 = mock_stats(&a).await;
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let s1 = mock_stats(&a).await;
        // At most the requests already in flight when it opened.
        assert!(chat_count(&s1) - chat_count(&s0) <= 4, "{mode}: live traffic reached a while open: {s0} -> {s1}");
        let probes = |s: &serde_json::Value| s["by_path"]["/v1/models"].as_u64().unwrap_or(0);
        assert!(probes(&s1) > probes(&s0), "{mode}: a was not probed while open");
    } else {
        tokio::time::sleep(Duration::from_millis(1500)).await;
    }

    // Repair it and time its return to rotation.
    let cleared = Instant::now();
    let a = if mode == "kill" {
        Proc::spawn(
            &["mock", "--listen", &a_addr.to_string(), "--name", "a", "--models", "gpt-4.1", "--latency-ms", "5"],
            &[],
            "listening on ",
        )
    } else {
        faults(&a, r#"{"mode":"ok"}"#).await;
        a
    };
    let base = chat_count(&mock_stats(&a).await);
    eventually(Duration::from_secs(10), "a back in rotation", || async {
        breaker(&gw, "a").await == "closed" && chat_count(&mock_stats(&a).await) > base
    })
    .await;
    let back = cleared.elapsed();
    let codes = traffic.finish().await;
    let failed = codes.iter().filter(|&&c| c != 200).count();
    assert_eq!(failed, 0, "{mode}: {failed} of {} client requests failed", codes.len());
    assert!(codes.len() > 50, "{mode}: too little load: {}", codes.len());
    // The breaker's timeout doubles after each failed half-open trial (at most twice here), plus two probe
    // intervals, plus slack for a loaded 2-core machine.
    let bound = Duration::from_millis(4 * RECOVERY_MS + 2 * INTERVAL_MS + 1500);
    if back > bound {
        let log = gw.proc.stderr();
        for l in log.lines().filter(|l| l.contains("breaker") || l.contains("status")) {
            eprintln!("{l}");
        }
    }
    assert!(back <= bound, "{mode}: back after {back:?}, bound {bound:?}");
    eprintln!("{mode}: {} requests, 0 failed, back in rotation after {back:?}", codes.len());
}

#[tokio::test]
async fn drill_error_500() {
    drill("error_500").await;
}

#[tokio::test]
async fn drill_error_429() {
    drill("error_429").await;
}

#[tokio::test]
async fn drill_reset() {
    drill("reset").await;
}

#[tokio::test]
async fn drill_hang() {
    drill("hang").await;
}

#[tokio::test]
async fn drill_killed_process() {
    drill("kill").await;
}

#[tokio::test]
async fn stream_failing_before_first_chunk_fails_over_transparently() {
    let _serial = SERIAL.lock().await;
    let a = mock("a", "gpt-4.1", &[]);
    let b = mock("b", "gpt-4.1", &[]);
    // Probes only once at start: a probe seeing the fault first would (rightly) steer the request away from `a`.
    let cfg = drill_config(&[("a", a.addr), ("b", b.addr)], "priority")
        .replace("name = \"b\"\n", "name = \"b\"\npriority = 1\n");
    let cfg = quiet(cfg);
    let gw = gateway(&cfg, &[]);
    eventually(Duration::from_secs(5), "a probed", || async {
        pair_status(&gw, "a", "gpt-4.1").await["status"] == "healthy"
    })
    .await;
    faults(&a, r#"{"mode":"reset"}"#).await;
    let body = r#"{"model":"gpt-4.1","stream":true,"messages":[{"role":"user","content":"hi"}]}"#;
    let s = stream(&gw.url("/v1/chat/completions"), body).await;
    assert_eq!(s.status, 200);
    assert!(s.error.is_none(), "{:?}", s.error);
    assert_eq!(s.headers.get("x-sheepdog-endpoint").unwrap(), "b");
    assert_eq!(s.headers.get("x-sheepdog-attempts").unwrap(), "2");
    assert_eq!(s.content(), sheepdog_mock::answer_pieces("b", "gpt-4.1", None).concat());
    assert!(!s.text().contains("\"error\""));
}

#[tokio::test]
async fn stream_breaking_mid_way_ends_with_an_sse_error_event() {
    let _serial = SERIAL.lock().await;
    let a = mock("a", "gpt-4.1", &["--tokens-per-sec", "50"]);
    let gw = gateway(&quiet(drill_config(&[("a", a.addr)], "priority")), &[]);
    faults(&a, r#"{"mode":"break_stream"}"#).await;
    let body = r#"{"model":"gpt-4.1","stream":true,"messages":[{"role":"user","content":"hi"}]}"#;
    let started = Instant::now();
    let s = stream(&gw.url("/v1/chat/completions"), body).await;
    assert_eq!(s.status, 200);
    assert!(s.error.is_none(), "the client's stream must close cleanly: {:?}", s.error);
    assert!(started.elapsed() < Duration::from_secs(5), "hung");
    let events = s.events();
    assert!(events.len() >= 3, "{events:?}");
    let err = &events[events.len() - 2];
    let v: serde_json::Value = serde_json::from_str(err).unwrap();
    assert_eq!(v["error"]["code"], "bad_upstream_response", "{v}");
    assert_eq!(events.last().unwrap(), "[DONE]");
}

#[tokio::test]
async fn nothing_can_serve_gives_503_naming_every_attempt() {
    let _serial = SERIAL.lock().await;
    let a = mock("a", "gpt-4.1", &[]);
    let b = mock("b", "gpt-4.1", &[]);
    let gw = gateway(&quiet(drill_config(&[("a", a.addr), ("b", b.addr)], "weighted_round_robin")), &[]);
    faults(&a, r#"{"mode":"error_500"}"#).await;
    faults(&b, r#"{"mode":"error_500"}"#).await;
    let r = post(&gw.url("/v1/chat/completions"), &chat("gpt-4.1")).await;
    assert_eq!(r.status, 503, "{}", r.text());
    let msg = r.json()["error"]["message"].as_str().unwrap().to_string();
    assert!(msg.contains("a/gpt-4.1: HTTP 500") && msg.contains("b/gpt-4.1: HTTP 500"), "{msg}");
    assert!(r.header("retry-after").is_some());
}

#[tokio::test]
async fn hedged_request_takes_the_first_answer_and_cancels_the_other() {
    let _serial = SERIAL.lock().await;
    let slow = mock("slow", "gpt-4.1", &[]);
    let fast = mock("fast", "gpt-4.1", &["--latency-ms", "5"]);
    let cfg = config(
        &[
            ("slow", slow.addr, "priority = 0\nmodels = [\"gpt-4.1\"]"),
            ("fast", fast.addr, "priority = 1\nmodels = [\"gpt-4.1\"]"),
        ],
        &model("gpt-4.1", "strategy = \"priority\"\nhedge_after = \"100ms\""),
        "",
    )
    .replace("interval = \"300ms\"", "interval = \"60s\"")
    .replace("idle_interval = \"1s\"", "idle_interval = \"60s\"")
    .replace("timeout = \"1s\"", "timeout = \"15s\"");
    let gw = gateway(&cfg, &[]);
    eventually(Duration::from_secs(5), "slow probed healthy", || async {
        pair_status(&gw, "slow", "gpt-4.1").await["status"] == "healthy"
    })
    .await;
    // From now on the slow upstream takes 10 s: an answer well before that can only come from the hedge.
    faults(&slow, r#"{"mode":"slow","latency_ms":10000}"#).await;
    let started = Instant::now();
    let r = post(&gw.url("/v1/chat/completions"), &chat("gpt-4.1")).await;
    let took = started.elapsed();
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.header("x-sheepdog-endpoint").as_deref(), Some("fast"));
    assert_eq!(r.header("x-sheepdog-attempts").as_deref(), Some("2"));
    // The exact hedge delay is checked under a paused clock in tests/pipeline.rs; here: long before 10 s.
    assert!(took < Duration::from_secs(5), "hedge did not cut the wait: {took:?}");
    // The slow attempt reached its upstream and was cancelled: its connection closed long before its answer.
    assert!(chat_count(&mock_stats(&slow).await) >= 1);
    eventually(Duration::from_secs(5), "slow attempt cancelled", || async {
        mock_stats(&slow).await["in_flight"].as_u64() == Some(0)
    })
    .await;
    assert!(started.elapsed() < Duration::from_secs(10), "cancelled only when it would have finished anyway");
    // A cancelled attempt is no verdict on the endpoint.
    assert_eq!(breaker(&gw, "slow").await, "closed");
}

#[tokio::test]
async fn fallback_model_serves_when_the_model_cannot_and_client_errors_are_not_retried() {
    let _serial = SERIAL.lock().await;
    let a = mock("a", "gpt-4.1", &[]);
    let b = mock("b", "claude-sonnet-4.5", &[]);
    let cfg = quiet(config(
        &[("a", a.addr, "models = [\"gpt-4.1\"]"), ("b", b.addr, "models = [\"claude-sonnet-4.5\"]")],
        &(model("gpt-4.1", "fallbacks = [\"claude-sonnet-4.5\"]") + &model("claude-sonnet-4.5", "")),
        "",
    ));
    let gw = gateway(&cfg, &[]);
    faults(&a, r#"{"mode":"error_500"}"#).await;
    let r = post(&gw.url("/v1/chat/completions"), &chat("gpt-4.1")).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.header("x-sheepdog-model").as_deref(), Some("claude-sonnet-4.5"));
    assert_eq!(r.header("x-sheepdog-endpoint").as_deref(), Some("b"));
    assert_eq!(r.header("x-sheepdog-attempts").as_deref(), Some("2"));
    let metrics = get(&gw.url("/metrics")).await.text();
    assert!(metrics.contains("sheepdog_failovers_total{model=\"gpt-4.1\"} 1"), "{metrics}");

    // The upstream refuses the request itself (its model is unknown there: 404): returned at once, not retried.
    faults(&a, r#"{"mode":"ok"}"#).await;
    let cfg2 = cfg.replace("models = [\"gpt-4.1\"]", "models = { \"gpt-4.1\" = \"not-served-upstream\" }");
    let gw2 = gateway(&cfg2, &[]);
    eventually(Duration::from_secs(5), "gw2's start-up probes done", || async {
        pair_status(&gw2, "a", "gpt-4.1").await["checks"].as_u64() >= Some(1)
            && pair_status(&gw2, "b", "claude-sonnet-4.5").await["checks"].as_u64() >= Some(1)
    })
    .await;
    let before = chat_count(&mock_stats(&a).await);
    let before_b = chat_count(&mock_stats(&b).await);
    let r = post(&gw2.url("/v1/chat/completions"), &chat("gpt-4.1")).await;
    assert_eq!(r.status, 404, "{}", r.text());
    assert_eq!(r.json()["error"]["code"], "model_not_found");
    assert_eq!(r.header("x-sheepdog-attempts").as_deref(), Some("1"));
    assert_eq!(chat_count(&mock_stats(&a).await) - before, 1, "a client error must not be retried");
    assert_eq!(chat_count(&mock_stats(&b).await), before_b, "nor sent to a fallback");
}

#[tokio::test]
async fn a_request_waits_in_the_queue_for_a_short_outage_instead_of_failing() {
    let _serial = SERIAL.lock().await;
    let a = mock("a", "gpt-4.1", &[]);
    let cfg = drill_config(&[("a", a.addr)], "priority")
        .replace("deadline = \"10s\"", "deadline = \"10s\"\nqueue_timeout = \"5s\"");
    let gw = gateway(&cfg, &[]);
    faults(&a, r#"{"mode":"error_500"}"#).await;
    eventually(Duration::from_secs(10), "breaker open", || async { breaker(&gw, "a").await == "open" }).await;
    let url = gw.url("/v1/chat/completions");
    let waiting = tokio::spawn(async move {
        let t = Instant::now();
        (post(&url, &chat("gpt-4.1")).await, t.elapsed())
    });
    eventually(Duration::from_secs(10), "the request waits in the recovery queue", || async {
        get(&gw.url("/metrics")).await.text().contains("\nsheepdog_requests_queued 1\n")
    })
    .await;
    faults(&a, r#"{"mode":"ok"}"#).await;
    let (r, _) = waiting.await.unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    let m = get(&gw.url("/metrics")).await.text();
    assert!(m.contains("\nsheepdog_requests_queued 0\n"), "the queue is empty again: {m}");
}

#[tokio::test]
async fn probes_are_priced_and_global_degraded_turns_on_when_most_pairs_are_down() {
    let _serial = SERIAL.lock().await;
    let a = mock("a", "gpt-4.1", &[]);
    let b = mock("b", "gpt-4.1", &[]);
    let c = mock("c", "gpt-4.1", &[]);
    // Chat probes (the default), so they use tokens.
    let cfg = drill_config(&[("a", a.addr), ("b", b.addr), ("c", c.addr)], "weighted_round_robin")
        .replace("probe = \"models\"\n", "");
    let gw = gateway(&cfg, &[]);
    eventually(Duration::from_secs(5), "probe cost counted", || async {
        let m = get(&gw.url("/metrics")).await.text();
        m.lines().any(|l| {
            l.starts_with("sheepdog_cost_usd_total{endpoint=\"a\",model=\"gpt-4.1\",source=\"probe\"}")
                && l.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok()).is_some_and(|v| v > 0.0)
        })
    })
    .await;
    assert!(get(&gw.url("/metrics")).await.text().contains("sheepdog_global_degraded 0"));
    faults(&a, r#"{"mode":"error_500"}"#).await;
    faults(&b, r#"{"mode":"error_500"}"#).await;
    eventually(Duration::from_secs(10), "global degraded", || async {
        get(&gw.url("/metrics")).await.text().contains("sheepdog_global_degraded 1")
            && get(&gw.url("/status")).await.json()["global"]["degraded"] == true
    })
    .await;
    eventually(Duration::from_secs(2), "an error is logged", || async {
        gw.proc.stderr().contains("more than half of all endpoint/model pairs cannot serve")
    })
    .await;
    // The remaining endpoint still serves.
    assert_eq!(post(&gw.url("/v1/chat/completions"), &chat("gpt-4.1")).await.status, 200);
}

#[tokio::test]
async fn requests_stop_piling_up_on_a_hung_endpoint_before_any_timeout() {
    let _serial = SERIAL.lock().await;
    let a = mock("a", "gpt-4.1", &[]);
    let b = mock("b", "gpt-4.1", &[]);
    let c = mock("c", "gpt-4.1", &[]);
    // A 3 s first-byte timeout: the breaker cannot learn of the hang in the first 1.5 s.
    let eps: Vec<(&str, std::net::SocketAddr, &str)> = [("a", a.addr), ("b", b.addr), ("c", c.addr)]
        .iter()
        .map(|(n, addr)| (*n, *addr, "models = [\"gpt-4.1\"]\nfirst_byte_timeout = \"3s\""))
        .collect();
    let cfg = quiet(
        config(&eps, &model("gpt-4.1", ""), "").replace("timeout = \"1s\"\n", "timeout = \"1s\"\nprobe = \"models\"\n"),
    );
    let gw = gateway(&cfg, &[]);
    for ep in ["a", "b", "c"] {
        let gw = &gw;
        eventually(Duration::from_secs(10), "first probes", || async move {
            pair_status(gw, ep, "gpt-4.1").await["checks"].as_u64() >= Some(1)
        })
        .await;
    }
    faults(&c, r#"{"mode":"hang"}"#).await;

    // 200 requests/s for 1.5 s, each from its own client (open loop, as independent users send): round robin
    // would leave a third of them, about 100, waiting on `c` for the timeout.
    let url = gw.url("/v1/chat/completions");
    let mut sent = Vec::new();
    let started = Instant::now();
    while started.elapsed() < Duration::from_millis(1500) {
        let url = url.clone();
        sent.push(tokio::spawn(async move { post(&url, &chat("gpt-4.1")).await.status }));
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // Let the last requests to the healthy endpoints finish (the stuck ones wait until 3 s).
    tokio::time::sleep(Duration::from_millis(300)).await;
    let c_status = pair_status(&gw, "c", "gpt-4.1").await;
    let stuck = c_status["in_flight"].as_u64().unwrap();
    let served = chat_count(&mock_stats(&a).await) + chat_count(&mock_stats(&b).await);
    // At least the stall rule's minimum reached c; far fewer than the ~100 that round robin would leave there
    // (the exact count is checked under a paused clock in tests/pipeline.rs).
    assert!((8..=40).contains(&stuck), "requests outstanding on the hung endpoint: {c_status}");
    assert_eq!(c_status["unanswered"], c_status["in_flight"], "{c_status}");
    assert!(served + stuck >= sent.len() as u64, "the healthy endpoints served the rest: {served} of {}", sent.len());
    assert_eq!(c_status["breaker"], "closed", "no timeout has told the breaker yet");
    // The few stuck requests time out after 3 s and fail over: nothing failed.
    for t in sent {
        let status = tokio::time::timeout(Duration::from_secs(10), t).await.expect("answered").unwrap();
        assert_eq!(status, 200);
    }
}
