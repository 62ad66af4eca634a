//! The pipeline with its clock under control: in-memory upstreams (`upstream::MemoryUpstream`) in place of
//! sockets, tokio's clock paused, so failover order, deadlines, Retry-After, hedging and the recovery queue are
//! checked to the millisecond of virtual time and never sleep for real.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body::{Body, Frame};
use http_body_util::{BodyExt, Full};
use sheepdog::config;
use sheepdog::gateway::Gateway;
use sheepdog::pipeline;
use sheepdog::protocol::Api;
use sheepdog::upstream::{BodyError, MemoryUpstream, ResponseFuture, UpstreamBody};
use tokio::time::Instant;

/// What an in-memory upstream does with its n-th call (counted from 0).
#[derive(Clone)]
enum Act {
    /// 200 with a chat completion after this delay.
    Ok(u64),
    /// This status (and `Retry-After` value) after this delay.
    Status(u16, Option<&'static str>, u64),
    /// Never answers.
    Hang,
    /// A 200 SSE stream: these events, the first at once, each next one after this gap.
    Stream(Vec<&'static str>, u64),
}

type Script = Box<dyn Fn(usize) -> Act + Send + Sync>;

/// An in-memory upstream that records when (virtual ms since the test began) each call arrived.
struct Up {
    name: &'static str,
    t0: Instant,
    calls: Mutex<Vec<u64>>,
    n: AtomicUsize,
    script: Script,
}

impl Up {
    fn new(name: &'static str, script: impl Fn(usize) -> Act + Send + Sync + 'static) -> Arc<Up> {
        Arc::new(Up {
            name,
            t0: Instant::now(),
            calls: Mutex::new(Vec::new()),
            n: AtomicUsize::new(0),
            script: Box::new(script),
        })
    }
    fn always(name: &'static str, act: Act) -> Arc<Up> {
        Up::new(name, move |_| act.clone())
    }
    fn calls(&self) -> Vec<u64> {
        self.calls.lock().unwrap().clone()
    }
}

fn completion(name: &str) -> Bytes {
    Bytes::from(
        serde_json::json!({
            "id": "c", "object": "chat.completion", "created": 1, "model": "m",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": format!("from {name}")}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15},
        })
        .to_string(),
    )
}

/// A body fed by a channel (stream chunks with gaps).
struct ChanBody(tokio::sync::mpsc::Receiver<Bytes>);

impl Body for ChanBody {
    type Data = Bytes;
    type Error = BodyError;
    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        self.0.poll_recv(cx).map(|o| o.map(|b| Ok(Frame::data(b))))
    }
}

impl MemoryUpstream for Up {
    fn call(&self, _req: Request<Bytes>) -> ResponseFuture {
        self.calls.lock().unwrap().push(self.t0.elapsed().as_millis() as u64);
        let act = (self.script)(self.n.fetch_add(1, Ordering::SeqCst));
        let name = self.name;
        Box::pin(async move {
            let json = |status: u16, body: Bytes, retry_after: Option<&str>| {
                let mut r = Response::builder().status(status).header("content-type", "application/json");
                if let Some(s) = retry_after {
                    r = r.header("retry-after", s);
                }
                Ok(r.body(UpstreamBody::memory(Full::new(body).map_err(|e| match e {}))).unwrap())
            };
            match act {
                Act::Ok(ms) => {
                    tokio::time::sleep(Duration::from_millis(ms)).await;
                    json(200, completion(name), None)
                }
                Act::Status(code, retry_after, ms) => {
                    tokio::time::sleep(Duration::from_millis(ms)).await;
                    json(code, Bytes::from_static(br#"{"error":{"message":"no","type":"x","code":"x"}}"#), retry_after)
                }
                Act::Hang => std::future::pending().await,
                Act::Stream(events, gap) => {
                    let (tx, rx) = tokio::sync::mpsc::channel(4);
                    tokio::spawn(async move {
                        for (i, e) in events.into_iter().enumerate() {
                            if i > 0 {
                                tokio::time::sleep(Duration::from_millis(gap)).await;
                            }
                            if tx.send(Bytes::from(format!("data: {e}\n\n"))).await.is_err() {
                                return;
                            }
                        }
                    });
                    let r = Response::builder().status(200).header("content-type", "text/event-stream");
                    Ok(r.body(UpstreamBody::memory(ChanBody(rx))).unwrap())
                }
            }
        })
    }
}

/// A gateway with these in-memory upstreams in place of the endpoints of the same names; no prober runs, so
/// only requests move the pairs' state.
fn gateway(endpoints: &str, models: &str, extra: &str, ups: &[&Arc<Up>]) -> Arc<Gateway> {
    let text = format!("[log]\nenabled = false\n{extra}\n{endpoints}\n{models}");
    let cfg = config::parse(&text, "test.toml", &|_: &str| None).unwrap_or_else(|e| panic!("{e}\n{text}"));
    let memory: HashMap<String, Arc<dyn MemoryUpstream>> =
        ups.iter().map(|u| (u.name.to_string(), (*u).clone() as Arc<dyn MemoryUpstream>)).collect();
    Gateway::open_with(cfg, None, memory).unwrap()
}

fn endpoint(name: &str, models: &str, extra: &str) -> String {
    format!("[[endpoints]]\nname = \"{name}\"\nbase_url = \"http://{name}.invalid/v1\"\nmodels = [{models}]\n{extra}\n")
}

fn model(name: &str, extra: &str) -> String {
    format!("[[models]]\nname = \"{name}\"\ninput_usd_per_mtok = 1.0\noutput_usd_per_mtok = 2.0\n{extra}\n")
}

struct Answer {
    status: StatusCode,
    headers: http::HeaderMap,
    body: String,
    ms: u64,
}

impl Answer {
    fn header(&self, name: &str) -> &str {
        self.headers.get(name).map(|v| v.to_str().unwrap()).unwrap_or("")
    }
    fn code(&self) -> String {
        let v: serde_json::Value = serde_json::from_str(&self.body).unwrap_or_default();
        v["error"]["code"].as_str().unwrap_or("").to_string()
    }
}

/// Send a chat request for `model` through the pipeline; the answer and the virtual ms it took.
async fn chat(gw: &Arc<Gateway>, model: &str, stream: bool) -> Answer {
    let body = serde_json::json!({"model": model, "stream": stream, "messages": [{"role": "user", "content": "hi"}]});
    let req = Request::post("/v1/chat/completions")
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body.to_string())))
        .unwrap();
    let t = Instant::now();
    let resp = pipeline::handle(gw, Api::Chat, req).await;
    let (parts, body) = resp.into_parts();
    let body = body.collect().await.unwrap().to_bytes();
    Answer {
        status: parts.status,
        headers: parts.headers,
        body: String::from_utf8_lossy(&body).into_owned(),
        ms: t.elapsed().as_millis() as u64,
    }
}

const FAST_RETRY: &str = "[retry]\nmax_attempts = 3\nbackoff_base = \"10ms\"\nbackoff_max = \"10ms\"\n";

#[tokio::test(start_paused = true)]
async fn failover_walks_the_endpoints_in_priority_order_then_the_fallback_model() {
    let a = Up::always("a", Act::Status(500, None, 5));
    let b = Up::always("b", Act::Status(503, None, 5));
    let c = Up::always("c", Act::Ok(5));
    let eps =
        endpoint("a", "\"m\"", "priority = 0") + &endpoint("b", "\"m\"", "priority = 1") + &endpoint("c", "\"y\"", "");
    let models = model("m", "strategy = \"priority\"\nfallbacks = [\"y\"]") + &model("y", "");
    let gw = gateway(&eps, &models, FAST_RETRY, &[&a, &b, &c]);
    let r = chat(&gw, "m", false).await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.header("x-sheepdog-endpoint"), "c");
    assert_eq!(r.header("x-sheepdog-model"), "y");
    assert_eq!(r.header("x-sheepdog-attempts"), "3");
    // One pass, no backoff inside it: a at 0, b when a failed (5 ms), c when b failed (10 ms).
    assert_eq!((a.calls(), b.calls(), c.calls()), (vec![0], vec![5], vec![10]));
    assert_eq!(r.ms, 15);
}

#[tokio::test(start_paused = true)]
async fn the_deadline_ends_a_request_whose_upstream_hangs() {
    let a = Up::always("a", Act::Hang);
    let gw = gateway(
        &endpoint("a", "\"m\"", "first_byte_timeout = \"30s\""),
        &model("m", ""),
        "[retry]\ndeadline = \"2s\"\n",
        &[&a],
    );
    let r = chat(&gw, "m", false).await;
    assert_eq!(r.status, 504, "{}", r.body);
    assert_eq!(r.code(), "upstream_timeout");
    assert_eq!(r.ms, 2000, "the deadline, not the 30 s first-byte timeout");
}

#[tokio::test(start_paused = true)]
async fn retry_after_is_honoured_before_the_next_pass() {
    let a = Up::new("a", |n| if n == 0 { Act::Status(429, Some("3"), 0) } else { Act::Ok(0) });
    let gw = gateway(&endpoint("a", "\"m\"", ""), &model("m", ""), FAST_RETRY, &[&a]);
    let r = chat(&gw, "m", false).await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.header("x-sheepdog-attempts"), "2");
    // The backoff is 10 ms; Retry-After asked for 3 s, and got it.
    assert_eq!(a.calls(), vec![0, 3000]);
}

#[tokio::test(start_paused = true)]
async fn every_attempt_rate_limited_gives_429_with_retry_after() {
    let a = Up::always("a", Act::Status(429, Some("7"), 0));
    let b = Up::always("b", Act::Status(429, Some("2"), 0));
    let eps = endpoint("a", "\"m\"", "") + &endpoint("b", "\"m\"", "");
    let gw = gateway(&eps, &model("m", ""), "[retry]\nmax_attempts = 2\n", &[&a, &b]);
    let r = chat(&gw, "m", false).await;
    assert_eq!(r.status, 429, "{}", r.body);
    assert_eq!(r.code(), "upstream_rate_limited");
    assert_eq!(r.header("retry-after"), "2", "the earliest an upstream said it takes requests again");
    assert_eq!(r.ms, 0);
}

#[tokio::test(start_paused = true)]
async fn every_attempt_timed_out_gives_504() {
    let a = Up::always("a", Act::Hang);
    let b = Up::always("b", Act::Hang);
    let eps = endpoint("a", "\"m\"", "first_byte_timeout = \"500ms\"")
        + &endpoint("b", "\"m\"", "first_byte_timeout = \"500ms\"");
    let gw = gateway(&eps, &model("m", ""), "[retry]\nmax_attempts = 2\n", &[&a, &b]);
    let r = chat(&gw, "m", false).await;
    assert_eq!(r.status, 504, "{}", r.body);
    assert_eq!(r.code(), "upstream_timeout");
    assert!(r.body.contains("a/m: timeout") && r.body.contains("b/m: timeout"), "{}", r.body);
    assert_eq!(r.ms, 1000);
}

#[tokio::test(start_paused = true)]
async fn hedge_after_p95_starts_the_second_attempt_at_the_first_endpoints_p95() {
    // a answers 20 warm-up requests in 100, 99, … 81 ms: each is faster than every earlier one, so no warm-up
    // request reaches its hedge delay. Then a hangs; b answers in 10 ms.
    let a = Up::new("a", |n| if n < 20 { Act::Ok(100 - n as u64) } else { Act::Hang });
    let b = Up::always("b", Act::Ok(10));
    let eps = endpoint("a", "\"m\"", "priority = 0") + &endpoint("b", "\"m\"", "priority = 1");
    let gw = gateway(&eps, &model("m", "strategy = \"priority\"\nhedge_after = \"p95\""), FAST_RETRY, &[&a, &b]);
    for _ in 0..20 {
        let r = chat(&gw, "m", false).await;
        assert_eq!(r.header("x-sheepdog-endpoint"), "a");
    }
    assert!(b.calls().is_empty(), "no hedge while a answered within its p95");
    let r = chat(&gw, "m", false).await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.header("x-sheepdog-endpoint"), "b");
    assert_eq!(r.header("x-sheepdog-attempts"), "2");
    // p95 of 81..=100 ms, interpolated: 99.05 ms, which tokio's millisecond timer rounds up to 100; then b's
    // 10 ms.
    assert_eq!(r.ms, 110);
}

#[tokio::test(start_paused = true)]
async fn a_hedge_whose_first_attempt_fails_waits_for_the_second() {
    let a = Up::always("a", Act::Status(500, None, 300));
    let b = Up::always("b", Act::Ok(400));
    let eps = endpoint("a", "\"m\"", "priority = 0") + &endpoint("b", "\"m\"", "priority = 1");
    let gw = gateway(&eps, &model("m", "strategy = \"priority\"\nhedge_after = \"100ms\""), FAST_RETRY, &[&a, &b]);
    let r = chat(&gw, "m", false).await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.header("x-sheepdog-endpoint"), "b");
    assert_eq!(r.header("x-sheepdog-attempts"), "2");
    assert_eq!((a.calls(), b.calls()), (vec![0], vec![100]));
    assert_eq!(r.ms, 500, "b's answer, started at the hedge delay");
}

#[tokio::test(start_paused = true)]
async fn a_hedge_that_fails_leaves_the_first_attempt_to_answer() {
    let a = Up::always("a", Act::Ok(300));
    let b = Up::always("b", Act::Status(502, None, 50));
    let eps = endpoint("a", "\"m\"", "priority = 0") + &endpoint("b", "\"m\"", "priority = 1");
    let gw = gateway(&eps, &model("m", "strategy = \"priority\"\nhedge_after = \"100ms\""), FAST_RETRY, &[&a, &b]);
    let r = chat(&gw, "m", false).await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.header("x-sheepdog-endpoint"), "a");
    assert_eq!(r.ms, 300);
}

const QUEUE: &str = "[breaker]\nfailure_threshold = 1\nrecovery_timeout = \"2s\"\n\n\
                     [retry]\nmax_attempts = 1\nqueue_timeout = \"5s\"\n";

#[tokio::test(start_paused = true)]
async fn a_queued_request_is_served_when_the_open_breaker_admits_a_trial() {
    let a = Up::new("a", |n| if n == 0 { Act::Status(500, None, 0) } else { Act::Ok(0) });
    let gw = gateway(&endpoint("a", "\"m\"", ""), &model("m", ""), QUEUE, &[&a]);
    let r = chat(&gw, "m", false).await;
    assert_eq!(r.status, 503, "{}", r.body);
    // The breaker is open for 2 s: the next request waits in the queue for exactly that long, then is served.
    let r = chat(&gw, "m", false).await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(a.calls(), vec![0, 2000]);
    assert_eq!(r.ms, 2000);
}

#[tokio::test(start_paused = true)]
async fn a_queued_request_wakes_the_moment_an_endpoint_is_enabled() {
    let a = Up::always("a", Act::Ok(0));
    let gw = gateway(&endpoint("a", "\"m\"", ""), &model("m", ""), QUEUE, &[&a]);
    gw.runtime().endpoints[0].set_enabled(false, &gw.changes);
    let g = gw.clone();
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(730)).await;
        g.runtime().endpoints[0].set_enabled(true, &g.changes);
    });
    let r = chat(&gw, "m", false).await;
    assert_eq!(r.status, 200, "{}", r.body);
    // Woken by the change itself, not by a poll that would land on a multiple of its period.
    assert_eq!(r.ms, 730);
}

#[tokio::test(start_paused = true)]
async fn a_queued_request_gives_up_after_queue_timeout() {
    let a = Up::always("a", Act::Ok(0));
    let gw = gateway(&endpoint("a", "\"m\"", ""), &model("m", ""), QUEUE, &[&a]);
    gw.runtime().endpoints[0].set_enabled(false, &gw.changes);
    let r = chat(&gw, "m", false).await;
    assert_eq!(r.status, 503, "{}", r.body);
    assert_eq!(r.code(), "no_upstream_available");
    assert!(r.body.contains("a/m: disabled"), "{}", r.body);
    assert_eq!(r.ms, 5000);
}

#[tokio::test(start_paused = true)]
async fn a_stream_is_relayed_chunk_by_chunk_and_its_usage_counted() {
    let usage = r#"{"choices":[],"usage":{"prompt_tokens":1000000,"completion_tokens":1000000}}"#;
    let a = Up::always("a", Act::Stream(vec![r#"{"choices":[{"delta":{"content":"x"}}]}"#, usage, "[DONE]"], 100));
    let gw = gateway(&endpoint("a", "\"m\"", ""), &model("m", ""), "", &[&a]);
    let r = chat(&gw, "m", true).await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert!(r.body.ends_with("data: [DONE]\n\n"), "{}", r.body);
    assert_eq!(r.ms, 200);
    let metrics = String::from_utf8(gw.metrics.render()).unwrap();
    // 1 M prompt tokens at $1 + 1 M completion tokens at $2.
    assert!(metrics.contains(r#"sheepdog_cost_usd_total{endpoint="a",model="m",source="request"} 3"#), "{metrics}");
    assert!(metrics.contains(r#"sheepdog_requests_total{endpoint="a",model="m",status="200"} 1"#), "{metrics}");
}

#[tokio::test(start_paused = true)]
async fn requests_stop_going_to_a_hung_endpoint_after_the_stall_rule_minimum() {
    let a = Up::always("a", Act::Ok(1));
    let b = Up::always("b", Act::Ok(1));
    // c answers once (so it has a usual latency, as a probe would give it), then hangs.
    let c = Up::new("c", |n| if n == 0 { Act::Ok(1) } else { Act::Hang });
    let ep = |n| endpoint(n, "\"m\"", "first_byte_timeout = \"3s\"");
    let gw = gateway(&(ep("a") + &ep("b") + &ep("c")), &model("m", ""), "", &[&a, &b, &c]);
    for _ in 0..3 {
        assert_eq!(chat(&gw, "m", false).await.status, 200);
    }
    // 200 requests/s for 1.5 s, each from its own client; round robin alone would leave 100 of them on c.
    let mut sent = Vec::new();
    for _ in 0..300 {
        let gw = gw.clone();
        sent.push(tokio::spawn(async move { chat(&gw, "m", false).await }));
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let c_now = gw.runtime().endpoints[2].pairs[0].view(&gw.runtime().policy.breaker, gw.now_ms());
    assert_eq!(c.calls().len(), 1 + 8, "the stall rule's minimum of unanswered requests, then no more");
    assert_eq!((c_now.in_flight, c_now.unanswered, c_now.breaker), (8, 8, "closed"));
    for t in sent {
        let r = t.await.unwrap();
        assert_eq!(r.status, 200, "{}", r.body);
    }
}

#[tokio::test(start_paused = true)]
async fn a_stream_is_cut_when_no_chunk_comes_within_the_idle_timeout() {
    let events = || vec![r#"{"choices":[{"delta":{"content":"x"}}]}"#; 20];
    // 250 ms between chunks, an idle limit of 300 ms: the stream (4.75 s in all) is never idle that long.
    let a = Up::new("a", move |n| if n == 0 { Act::Stream(events(), 250) } else { Act::Stream(events(), 400) });
    let gw = gateway(&endpoint("a", "\"m\"", "first_byte_timeout = \"300ms\""), &model("m", ""), "", &[&a]);
    let r = chat(&gw, "m", true).await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert!(!r.body.contains("error"), "{}", r.body);
    assert_eq!(r.body.matches("data: ").count(), 20);
    assert_eq!(r.ms, 4750);
    // 400 ms between chunks: the stream is cut 300 ms after its first chunk, with an SSE error event.
    let r = chat(&gw, "m", true).await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert!(r.body.contains("no data within the timeout"), "{}", r.body);
    assert!(r.body.ends_with("data: [DONE]\n\n"), "{}", r.body);
    assert_eq!(r.ms, 300);
}

/// A request's whole state is one future, allocated for each request; 1,000 open streams and 10,000 kept-alive
/// connections multiply whatever of it is alive. The cold paths (a new upstream connection, the two attempts of
/// a hedge) are boxed where they start, so that every request does not carry their state: before that, this
/// future was twice its size.
#[tokio::test]
async fn a_request_s_state_stays_small() {
    let a = Up::always("a", Act::Ok(0));
    let gw = gateway(&endpoint("a", "\"m\"", ""), &model("m", ""), "", &[&a]);
    let req = Request::post("/v1/chat/completions").body(Full::new(Bytes::new())).unwrap();
    let request = pipeline::handle(&gw, Api::Chat, req);
    let size = std::mem::size_of_val(&request);
    drop(request);
    assert!(size <= 6 * 1024, "a request's state is {size} bytes");
}
