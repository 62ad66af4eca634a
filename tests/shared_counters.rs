//! `[state] backend = "redis"`: three gateway processes share one budget's `limit_usd` and one client's rpm —
//! requests spread across the replicas are refused once the *fleet* reaches the limit, within the documented
//! overshoot (what the fleet admits in one flush interval plus a round trip), far below what three
//! independent replicas would admit. Against the real Redis on 127.0.0.1:6379 (skipped, with a message, when
//! it is not running, unless SHEEPDOG_REQUIRE_REDIS=1).
//!
//! The in-test upstream reports 3 prompt + 2 completion tokens for every answer; at $0.20 a token each
//! answer costs exactly $1.00.

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::*;

const REDIS: &str = "redis://127.0.0.1:6379";
/// The gateway's flush interval (`shared::counters::FLUSH_EVERY`) plus a round trip, generously: the window in
/// which one replica does not yet know what the others admitted.
const BLIND_S: f64 = 0.1 + 0.2;
/// Requests are sent one at a time, this far apart (a steady rate, so the bound is a number).
const PACE: Duration = Duration::from_millis(30);

fn redis_up() -> bool {
    let up = std::net::TcpStream::connect_timeout(&"127.0.0.1:6379".parse().unwrap(), Duration::from_secs(1)).is_ok();
    if !up {
        assert!(
            std::env::var("SHEEPDOG_REQUIRE_REDIS").as_deref() != Ok("1"),
            "Redis is not running on 127.0.0.1:6379 and SHEEPDOG_REQUIRE_REDIS=1"
        );
        eprintln!("skipped: Redis is not running on 127.0.0.1:6379 (set SHEEPDOG_REQUIRE_REDIS=1 to fail instead)");
    }
    up
}

fn state() -> String {
    let prefix = format!("t{:x}", rand::random::<u64>());
    format!("[state]\nbackend = \"redis\"\nredis_url = \"{REDIS}\"\nkey_prefix = \"{prefix}\"\n")
}

fn body() -> String {
    serde_json::json!({"model": "gpt-4.1", "max_tokens": 2, "messages": [{"role": "user", "content": "Say hello"}]})
        .to_string()
}

fn cfg(up: &TestUpstream, extra: &str) -> String {
    let models = "[[models]]\nname = \"gpt-4.1\"\ninput_usd_per_mtok = 200000.0\noutput_usd_per_mtok = 200000.0\n";
    quiet_config(&[("up", up.addr, "models = [\"gpt-4.1\"]")], models, extra)
}

async fn connected(gw: &Gateway) {
    eventually(Duration::from_secs(10), "the replica reaches Redis", || async {
        get(&gw.url("/status")).await.json()["state"]["connected"] == true
    })
    .await;
}

async fn spent(gw: &Gateway) -> f64 {
    get(&gw.url("/api/stats?since=1h")).await.json()["budgets"][0]["spent_usd"].as_f64().unwrap_or(-1.0)
}

/// The overshoot bound for requests sent at `rate` per second across the fleet: what it admits while one
/// replica is blind to the others, plus one request in flight per replica.
fn bound(rate: f64, replicas: usize) -> usize {
    (rate * BLIND_S).ceil() as usize + replicas
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_replicas_hold_one_budget_limit_together() {
    if !redis_up() {
        return;
    }
    let up = TestUpstream::start(|s| Canned::completion(s, "up"));
    let budget = "[[budgets]]\nname = \"daily\"\nperiod = \"day\"\nlimit_usd = 20\n";
    let cfg = cfg(&up, &format!("{budget}{}", state()));
    let fleet = [gateway(&cfg, &[]), gateway(&cfg, &[]), gateway(&cfg, &[])];
    for g in &fleet {
        connected(g).await;
    }
    let (mut admitted, mut refused_in_a_row, mut sent) = (0usize, 0, 0usize);
    let started = Instant::now();
    let mut pace = tokio::time::interval(PACE);
    while refused_in_a_row < fleet.len() {
        pace.tick().await;
        let r = post(&fleet[sent % fleet.len()].url("/v1/chat/completions"), &body()).await;
        sent += 1;
        match r.status {
            200 => {
                admitted += 1;
                refused_in_a_row = 0;
            }
            429 => {
                assert_eq!(r.json()["error"]["code"], "budget_exceeded", "{}", r.text());
                refused_in_a_row += 1;
            }
            s => panic!("{s}: {}", r.text()),
        }
        assert!(sent < 200, "the fleet never refused: {admitted} admitted");
    }
    let rate = sent as f64 / started.elapsed().as_secs_f64();
    let b = bound(rate, fleet.len());
    eprintln!("budget $20 at $1 a request, 3 replicas: {admitted} admitted at {rate:.0}/s (bound 20 + {b})");
    assert!(admitted <= 20 + b, "{admitted} admitted, more than 20 + {b}");
    assert!(admitted < 40, "{admitted} admitted: three independent replicas would admit 60");
    // A request is admitted only while spend + its estimate (prompt estimate and `max_tokens`, a few dollars
    // at these prices) fits, so the fleet, like a lone replica, stops a few dollars short.
    assert!(admitted >= 12, "{admitted} admitted: the limit is $20");
    // Every replica ends up with the fleet's spend, exactly what was admitted.
    for g in &fleet {
        eventually(Duration::from_secs(5), "the replica shows the fleet's spend", || async {
            (spent(g).await - admitted as f64).abs() < 1e-6
        })
        .await;
    }
    // And every one of them refuses.
    for g in &fleet {
        let r = post(&g.url("/v1/chat/completions"), &body()).await;
        assert_eq!(r.status, 429, "{}", r.text());
    }
}

/// A fresh client key and its `[[clients]]` lines, from the real command.
fn key_new(name: &str) -> (String, String) {
    let out = Command::new(BIN).args(["key", "new", "--name", name]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8(out.stdout).unwrap();
    let mut lines = text.lines();
    let key = lines.next().unwrap().to_string();
    (key, lines.collect::<Vec<_>>().join("\n"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_replicas_hold_one_client_rpm_together() {
    if !redis_up() {
        return;
    }
    let up = TestUpstream::start(|s| Canned::completion(s, "up"));
    let (key, lines) = key_new("web-app");
    let cfg = cfg(&up, &format!("{lines}\nrpm = 30\n\n{}", state()));
    let fleet = [gateway(&cfg, &[]), gateway(&cfg, &[]), gateway(&cfg, &[])];
    for g in &fleet {
        connected(g).await;
    }
    let auth = format!("Bearer {key}");
    let headers = [("content-type", "application/json"), ("authorization", auth.as_str())];
    let (mut admitted, mut sent, mut last_refusals) = (0usize, 0usize, Vec::new());
    let started = Instant::now();
    let mut pace = tokio::time::interval(PACE);
    // About three seconds of requests spread across the replicas.
    while sent < 100 {
        pace.tick().await;
        let g = &fleet[sent % fleet.len()];
        let r = request("POST", &g.url("/v1/chat/completions"), &headers, body()).await;
        sent += 1;
        match r.status {
            200 => admitted += 1,
            429 => {
                assert_eq!(r.json()["error"]["code"], "rate_limit_exceeded", "{}", r.text());
                last_refusals.push(sent);
            }
            s => panic!("{s}: {}", r.text()),
        }
    }
    let elapsed = started.elapsed().as_secs_f64();
    let rate = sent as f64 / elapsed;
    // One replica's bucket refills 30 a minute; every replica's bucket is charged with what the fleet used.
    let refill = (30.0 * elapsed / 60.0).ceil() as usize;
    let b = bound(rate, fleet.len());
    eprintln!("rpm 30, 3 replicas, {sent} requests in {elapsed:.1} s: {admitted} admitted (bound 30 + {refill} + {b})");
    assert!(admitted >= 30, "{admitted} admitted: the fleet may serve 30 a minute");
    assert!(admitted <= 30 + refill + b, "{admitted} admitted, more than 30 + {refill} refilled + {b}");
    assert!(admitted < 60, "{admitted} admitted: three independent replicas would admit 90");
    // The last requests, on every replica, were refused.
    for n in sent - 3..sent {
        assert!(last_refusals.contains(&(n + 1)), "request {} was admitted: {last_refusals:?}", n + 1);
    }
}
