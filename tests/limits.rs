//! Limits against slow and greedy clients, through real sockets: a body that trickles past `client_timeout`
//! gets 408, a request head that never ends is closed, requests past `max_concurrent_requests` get 503
//! `overloaded` with `Retry-After`, and a stream longer than `max_stream_duration` is ended with an error
//! event — each counted and in the request log.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use common::*;

fn limited(up: &Proc, server: &str) -> Gateway {
    let cfg = quiet_config(&[("up", up.addr, "models = [\"gpt-4.1\"]")], &model("gpt-4.1", ""), "").replacen(
        "[server]\n",
        &format!("[server]\n{server}\n"),
        1,
    );
    gateway(&cfg, &[])
}

/// Read from `s` until the peer closes or `limit` passes; what came.
fn read_all(s: &mut TcpStream, limit: Duration) -> (String, Duration) {
    let start = Instant::now();
    s.set_read_timeout(Some(limit)).unwrap();
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => out.extend_from_slice(&buf[..n]),
        }
    }
    (String::from_utf8_lossy(&out).into_owned(), start.elapsed())
}

#[tokio::test]
async fn slow_clients_get_408_or_are_closed_at_client_timeout() {
    let up = mock("up", "gpt-4.1", &[]);
    let gw = limited(&up, "client_timeout = \"1s\"");
    // A body that stops arriving: 408 at the timeout.
    let mut s = TcpStream::connect(gw.proc.addr).unwrap();
    s.write_all(
        b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: 500\r\n\r\n{\"model\":",
    )
    .unwrap();
    let (text, took) = tokio::task::spawn_blocking(move || read_all(&mut s, Duration::from_secs(20))).await.unwrap();
    assert!(text.starts_with("HTTP/1.1 408"), "{text}");
    assert!(text.contains("request_timeout"), "{text}");
    assert!(took >= Duration::from_millis(900), "answered after {took:?}, before the timeout");
    // A request head that never ends: the connection is closed.
    let mut s = TcpStream::connect(gw.proc.addr).unwrap();
    s.write_all(b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\nx-slow: ").unwrap();
    let (_, took) = tokio::task::spawn_blocking(move || read_all(&mut s, Duration::from_secs(20))).await.unwrap();
    assert!(took < Duration::from_secs(15), "still open after {took:?}");
    let m = get(&gw.url("/metrics")).await.text();
    assert!(m.contains("sheepdog_rejections_total{reason=\"request_timeout\"} 1"), "{m}");
}

#[tokio::test]
async fn past_max_concurrent_requests_503_overloaded_and_long_streams_are_cut() {
    let up = mock("up", "gpt-4.1", &["--latency-ms", "600", "--tokens-per-sec", "4"]);
    let gw = limited(&up, "max_concurrent_requests = 1\nmax_stream_duration = \"2s\"");
    let url = gw.url("/v1/chat/completions");
    let first = {
        let url = url.clone();
        tokio::spawn(async move { post(&url, &chat("gpt-4.1")).await.status })
    };
    eventually(Duration::from_secs(10), "one request in flight", || async {
        get(&gw.url("/metrics")).await.text().lines().any(|l| l == "sheepdog_requests_in_flight 1")
    })
    .await;
    let r = post(&url, &chat("gpt-4.1")).await;
    assert_eq!((r.status, r.json()["error"]["code"].as_str()), (503, Some("overloaded")), "{}", r.text());
    assert_eq!(r.header("retry-after").as_deref(), Some("1"));
    assert_eq!(first.await.unwrap(), 200);
    // A stream of many chunks at 4 a second, cut at 2 s with an error event.
    let body = serde_json::json!({"model": "gpt-4.1", "stream": true, "messages": [{"role": "user", "content": "hi"}]});
    let start = Instant::now();
    let s = stream(&url, &body.to_string()).await;
    assert_eq!(s.status, 200);
    assert!(start.elapsed() < Duration::from_secs(10), "{:?}", start.elapsed());
    assert!(s.text().contains("\"error\""), "{}", s.text());
    assert!(!s.content().is_empty(), "the chunks before the cut reached the client");
    let m = get(&gw.url("/metrics")).await.text();
    assert!(m.contains("sheepdog_rejections_total{reason=\"overloaded\"} 1"), "{m}");
    eventually(Duration::from_secs(10), "the cut stream in the request log", || async {
        let rows = sheepdog::log::open_read(&gw.dir.path().join("sheepdog.db"))
            .and_then(|c| sheepdog::log::read_since(&c, 0))
            .unwrap_or_default();
        rows.iter().any(|r| r.error.as_deref() == Some("stream_timeout"))
    })
    .await;
}
