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

/// The gateway's flush interval (`shared::counters::FLUSH_EVERY`) plus a round trip, generously: the window in
/// which one replica does not yet know what the others admitted.
const BLIND_S: f64 = 0.1 + 0.2;
/// Requests are sent one at a time, this far apart (a steady rate, so the bound is a number).
const PACE: Duration = Duration::from_millis(30);

fn body() -> String {
    serde_json::json!({"model": "gpt-4.1", "max_tokens": 2, "messages": [{"role": "user", "content": "Say hello"}]})
        .to_string()
}

fn cfg(up: &TestUpstream, extra: &str) -> String {
    let models = "[[models]]\nname = \"gpt-4.1\"\ninput_usd_per_mtok = 200000.0\noutput_usd_per_mtok = 200000.0\n";
    quiet_config(&[("up", up.addr, "models = [\"gpt-4.1\"]")], models, extra)
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
    let cfg = cfg(&up, &format!("{budget}{}", redis_state(REDIS)));
    let fleet = [gateway(&cfg, &[]), gateway(&cfg, &[]), gateway(&cfg, &[])];
    for g in &fleet {
        redis_connected(g).await;
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
    let cfg = cfg(&up, &format!("{lines}\nrpm = 30\n\n{}", redis_state(REDIS)));
    let fleet = [gateway(&cfg, &[]), gateway(&cfg, &[]), gateway(&cfg, &[])];
    for g in &fleet {
        redis_connected(g).await;
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

/// A redis-server of the test's own (on a free port), killed on drop.
struct OwnRedis(std::process::Child);

impl OwnRedis {
    fn start(port: u16) -> OwnRedis {
        let child = Command::new("redis-server")
            .args(["--port", &port.to_string(), "--save", "", "--appendonly", "no", "--bind", "127.0.0.1"])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("redis-server");
        let until = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < until, "redis-server did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
        OwnRedis(child)
    }
}

impl Drop for OwnRedis {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spend_during_a_hung_redis_counts_locally_and_reaches_the_fleet_once_when_it_resumes() {
    if Command::new("redis-server").arg("--version").stdout(std::process::Stdio::null()).status().is_err() {
        assert!(std::env::var("SHEEPDOG_REQUIRE_REDIS").as_deref() != Ok("1"), "redis-server is not installed");
        eprintln!("skipped: redis-server is not installed");
        return;
    }
    let port = free_port();
    let redis = OwnRedis::start(port);
    let up = TestUpstream::start(|s| Canned::completion(s, "up"));
    let budget = "[[budgets]]\nname = \"daily\"\nperiod = \"day\"\nlimit_usd = 100\n";
    let state = redis_state(&format!("redis://127.0.0.1:{port}"));
    let cfg = cfg(&up, &format!("{budget}{state}"));
    let (a, b) = (gateway(&cfg, &[]), gateway(&cfg, &[]));
    redis_connected(&a).await;
    redis_connected(&b).await;
    for _ in 0..2 {
        assert_eq!(post(&a.url("/v1/chat/completions"), &body()).await.status, 200);
    }
    eventually(Duration::from_secs(5), "B sees A's $2", || async { (spent(&b).await - 2.0).abs() < 1e-6 }).await;
    // Redis hangs: A goes on serving and counting by itself; a flush may time out after reaching Redis.
    let pid = redis.0.id().to_string();
    Command::new("kill").args(["-STOP", &pid]).status().unwrap();
    for _ in 0..3 {
        assert_eq!(post(&a.url("/v1/chat/completions"), &body()).await.status, 200);
    }
    eventually(Duration::from_secs(5), "A notices the hung Redis", || async {
        get(&a.url("/status")).await.json()["state"]["connected"] == false
    })
    .await;
    assert!((spent(&a).await - 5.0).abs() < 1e-6, "A counts locally meanwhile");
    Command::new("kill").args(["-CONT", &pid]).status().unwrap();
    redis_connected(&a).await;
    // The $3 reach the fleet, once.
    eventually(Duration::from_secs(5), "B sees A's $5", || async { (spent(&b).await - 5.0).abs() < 1e-6 }).await;
    let prefix = cfg.split("key_prefix = \"").nth(1).unwrap().split('"').next().unwrap().to_owned();
    let day = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as i64
        / 86_400_000
        * 86_400_000;
    let mut conn = redis::Client::open(format!("redis://127.0.0.1:{port}")).unwrap().get_connection().unwrap();
    let stored: i64 = redis::cmd("GET").arg(format!("{prefix}:budget:daily:{day}")).query(&mut conn).unwrap();
    assert_eq!(stored, 5_000_000_000, "$5 in nano-dollars, nothing counted twice");
    assert!((spent(&a).await - 5.0).abs() < 1e-6);
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}
