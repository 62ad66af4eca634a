//! The drill's load generator: open loop at a fixed rate over a pooled keep-alive HTTP/1.1 client on real
//! loopback sockets. Request `i` is due at `i / rate` seconds; each is its own task, so a slow answer never
//! delays the next request, and its latency counts from when it was due (the generator's own lateness
//! included, so a backlog shows instead of hiding).
//!
//! Owns sending and timing requests; must not judge them (that is `report`).

use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tokio::sync::mpsc;
use tokio::time::Instant;

use super::report::Record;

/// How long one request may take before it counts as failed (the gateway's own deadline is shorter).
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

type HttpClient = Client<HttpConnector, Full<Bytes>>;

fn client() -> HttpClient {
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    Client::builder(TokioExecutor::new())
        .pool_idle_timeout(Duration::from_secs(30))
        .pool_max_idle_per_host(usize::MAX)
        .build(connector)
}

/// Send `rate` chat requests per second to `url` for `duration`, the first at `start`; every request's record,
/// once all have ended.
pub async fn run(url: http::Uri, model: &str, rate: u32, duration: Duration, start: Instant) -> Vec<Record> {
    let client = client();
    let count = (f64::from(rate) * duration.as_secs_f64()).floor() as u64;
    let (tx, mut rx) = mpsc::unbounded_channel();
    for i in 0..count {
        let due = Duration::from_secs_f64(i as f64 / f64::from(rate));
        tokio::time::sleep_until(start + due).await;
        let body = serde_json::json!({
            "model": model,
            "messages": [{"role": "user", "content": format!("Black Friday order {i}: where is my parcel?")}],
            "max_tokens": 16,
        });
        let (client, url, tx) = (client.clone(), url.clone(), tx.clone());
        tokio::spawn(async move {
            let ok =
                matches!(tokio::time::timeout(REQUEST_TIMEOUT, one(&client, url, body.to_string())).await, Ok(true));
            let latency_ms = (Instant::now() - (start + due)).as_secs_f64() * 1000.0;
            let _ = tx.send(Record { at_ms: due.as_secs_f64() * 1000.0, latency_ms, ok });
        });
    }
    drop(tx);
    let mut records = Vec::with_capacity(count as usize);
    while let Some(r) = rx.recv().await {
        records.push(r);
    }
    records
}

/// One request: a 2xx whose whole body arrived.
async fn one(client: &HttpClient, url: http::Uri, body: String) -> bool {
    let req =
        match http::Request::post(url).header("content-type", "application/json").body(Full::new(Bytes::from(body))) {
            Ok(r) => r,
            Err(_) => return false,
        };
    let Ok(resp) = client.request(req).await else { return false };
    let ok = resp.status().is_success();
    resp.into_body().collect().await.is_ok() && ok
}
