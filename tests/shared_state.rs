//! `[state] backend = "redis"`: three gateway processes on one config act as one — a breaker opened by one
//! replica's traffic protects the others, drains are shared, probes do not multiply, a dead lease holder is
//! replaced, and a Redis outage fails no request. Against the real Redis on 127.0.0.1:6379 (skipped, with a
//! message, when it is not running, unless SHEEPDOG_REQUIRE_REDIS=1) and, for the outage, a redis-server of
//! the test's own.

mod common;

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

async fn shows(gw: &Gateway, endpoint: &str, model: &str, breaker: &str) -> bool {
    pair_status(gw, endpoint, model).await["breaker"] == breaker
}

async fn state_doc(gw: &Gateway) -> serde_json::Value {
    get(&gw.url("/status")).await.json()["state"].clone()
}

async fn enabled(gw: &Gateway, endpoint: &str) -> bool {
    let s = get(&gw.url("/status")).await.json();
    s["endpoints"].as_array().unwrap().iter().find(|e| e["name"] == endpoint).unwrap()["enabled"] == true
}

async fn chat_requests(mock: &common::Proc) -> u64 {
    mock_stats(mock).await["by_path"]["/v1/chat/completions"].as_u64().unwrap_or(0)
}

fn two_endpoints(a: SocketAddr, b: SocketAddr, extra: &str) -> String {
    quiet_config(&[("a", a, "models = [\"gpt\"]"), ("b", b, "models = [\"gpt\"]")], &model("gpt", ""), extra).replacen(
        "[server]\n",
        "[server]\nadmin_key = \"adm\"\n",
        1,
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_breaker_opened_by_one_replica_protects_the_others() {
    if !redis_up() {
        return;
    }
    let (ma, mb) = (mock("a", "gpt", &[]), mock("b", "gpt", &[]));
    let breaker = "[breaker]\nfailure_threshold = 1\nrecovery_timeout = \"60s\"\n";
    let cfg = two_endpoints(ma.addr, mb.addr, &format!("{breaker}{}", redis_state(REDIS)));
    let (ra, rb, rc) = (gateway(&cfg, &[]), gateway(&cfg, &[]), gateway(&cfg, &[]));
    for g in [&ra, &rb, &rc] {
        redis_connected(g).await;
    }
    faults(&ma, r#"{"mode":"error_500"}"#).await;
    // Traffic through A only, until A's breaker of a/gpt opens.
    let deadline = Instant::now() + Duration::from_secs(10);
    let opened = loop {
        let r = post(&ra.url("/v1/chat/completions"), &chat("gpt")).await;
        assert_eq!(r.status, 200, "b serves what a fails: {}", r.text());
        if shows(&ra, "a", "gpt", "open").await {
            break Instant::now();
        }
        assert!(Instant::now() < deadline, "A's breaker never opened");
    };
    // B sees it: poll as fast as /status answers.
    loop {
        if shows(&rb, "a", "gpt", "open").await {
            break;
        }
        assert!(
            opened.elapsed() < Duration::from_secs(1),
            "B did not see the breaker open within 1 s: {}\nA: {}\nB: {}",
            get(&rb.url("/status")).await.text(),
            ra.proc.stderr(),
            rb.proc.stderr()
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let propagation = opened.elapsed();
    eprintln!("propagation A opens -> B reports open: {:.1} ms", propagation.as_secs_f64() * 1000.0);
    eventually(Duration::from_secs(1), "C reports the breaker open", || shows(&rc, "a", "gpt", "open")).await;
    // B and C send a/gpt nothing more, though they never sent it a request themselves.
    let before = chat_requests(&ma).await;
    for g in [&rb, &rc] {
        for _ in 0..10 {
            let r = post(&g.url("/v1/chat/completions"), &chat("gpt")).await;
            assert_eq!(r.status, 200);
            assert_eq!(r.header("x-sheepdog-endpoint").as_deref(), Some("b"));
        }
    }
    assert_eq!(chat_requests(&ma).await, before, "no request reached the faulted upstream from B or C");
    // A replica that starts now reads the open breaker from Redis at once.
    let rd = gateway(&cfg, &[]);
    redis_connected(&rd).await;
    assert!(shows(&rd, "a", "gpt", "open").await, "a new replica resynchronises at start");
    let log = rb.proc.stderr();
    assert_eq!(log.matches("circuit breaker opened").count(), 1, "applied once, nothing echoed back: {log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drain_on_one_replica_holds_on_all() {
    if !redis_up() {
        return;
    }
    let (ma, mb) = (mock("a", "gpt", &[]), mock("b", "gpt", &[]));
    let cfg = two_endpoints(ma.addr, mb.addr, &redis_state(REDIS));
    let (ra, rb, rc) = (gateway(&cfg, &[]), gateway(&cfg, &[]), gateway(&cfg, &[]));
    for g in [&ra, &rb, &rc] {
        redis_connected(g).await;
    }
    let auth = [("authorization", "Bearer adm")];
    assert_eq!(request("POST", &ra.url("/admin/endpoints/a/disable"), &auth, "").await.status, 200);
    for g in [&rb, &rc] {
        eventually(Duration::from_secs(1), "the drain reaches the replica", || async { !enabled(g, "a").await }).await;
    }
    let before = chat_requests(&ma).await;
    for _ in 0..6 {
        let r = post(&rc.url("/v1/chat/completions"), &chat("gpt")).await;
        assert_eq!(r.header("x-sheepdog-endpoint").as_deref(), Some("b"));
    }
    assert_eq!(chat_requests(&ma).await, before);
    assert_eq!(request("POST", &rb.url("/admin/endpoints/a/enable"), &auth, "").await.status, 200);
    for g in [&ra, &rc] {
        eventually(Duration::from_secs(1), "the enable reaches the replica", || enabled(g, "a")).await;
    }
}

fn probing(m: SocketAddr, extra: &str) -> String {
    config(&[("a", m, "models = [\"gpt\"]")], &model("gpt", ""), extra)
        .replace("interval = \"300ms\"", "interval = \"200ms\"")
        .replace("idle_interval = \"1s\"", "idle_interval = \"200ms\"")
}

/// Chat requests (all probes: no client traffic) the mock gets in `window`.
async fn probes_in(m: &common::Proc, window: Duration) -> u64 {
    let before = chat_requests(m).await;
    tokio::time::sleep(window).await;
    chat_requests(m).await - before
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_replicas_probe_as_often_as_one_and_a_dead_lease_holder_is_replaced() {
    if !redis_up() {
        return;
    }
    let m = mock("a", "gpt", &[]);
    let window = Duration::from_secs(3);
    let one = {
        let cfg = probing(m.addr, &redis_state(REDIS));
        let g = gateway(&cfg, &[]);
        redis_connected(&g).await;
        tokio::time::sleep(Duration::from_millis(500)).await;
        probes_in(&m, window).await
    };
    let cfg = probing(m.addr, &redis_state(REDIS));
    let mut replicas = vec![gateway(&cfg, &[]), gateway(&cfg, &[]), gateway(&cfg, &[])];
    for g in &replicas {
        redis_connected(g).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let three = probes_in(&m, window).await;
    eprintln!("probes in {window:?}: 1 replica {one}, 3 replicas {three}");
    assert!(one >= 5, "one replica probes every 200 ms: {one}");
    assert!(three <= one + one / 2 + 2, "probes do not multiply with replicas: 1 → {one}, 3 → {three}");
    // Every replica knows the pair's health from the shared probes.
    for g in &replicas {
        assert_eq!(pair_status(g, "a", "gpt").await["status"], "healthy");
    }
    // SIGKILL the lease holder: another replica takes over within one interval or so.
    let prefix = cfg.split("key_prefix = \"").nth(1).unwrap().split('"').next().unwrap().to_owned();
    let mut conn = redis::Client::open(REDIS).unwrap().get_connection().unwrap();
    let holder: String = redis::cmd("GET").arg(format!("{prefix}:lease:a:gpt")).query(&mut conn).unwrap();
    let mut ids = Vec::new();
    for g in &replicas {
        ids.push(state_doc(g).await["replica"].as_str().unwrap().to_owned());
    }
    let i = ids.iter().position(|id| *id == holder).expect("the lease holder is one of the replicas");
    replicas[i].proc.signal("KILL");
    let _ = replicas[i].proc.child.wait();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let after = probes_in(&m, window).await;
    eprintln!("probes in {window:?} after the holder died: {after}");
    assert!(after >= one / 2, "probing goes on after the holder died: {after} (one replica: {one})");
    let new_holder: String = redis::cmd("GET").arg(format!("{prefix}:lease:a:gpt")).query(&mut conn).unwrap();
    assert_ne!(new_holder, holder);
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// A redis-server of the test's own, killed on drop.
struct OwnRedis(Child);

impl OwnRedis {
    fn start(port: u16) -> OwnRedis {
        let child = Command::new("redis-server")
            .args(["--port", &port.to_string(), "--save", "", "--appendonly", "no", "--bind", "127.0.0.1"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server");
        let until = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < until, "redis-server did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
        OwnRedis(child)
    }

    fn kill(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Drop for OwnRedis {
    fn drop(&mut self) {
        self.kill();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_outage_fails_no_request_and_the_replica_resynchronises_when_it_returns() {
    if Command::new("redis-server").arg("--version").stdout(Stdio::null()).status().is_err() {
        assert!(std::env::var("SHEEPDOG_REQUIRE_REDIS").as_deref() != Ok("1"), "redis-server is not installed");
        eprintln!("skipped: redis-server is not installed");
        return;
    }
    let port = free_port();
    let url = format!("redis://127.0.0.1:{port}");
    let (ma, mb) = (mock("a", "gpt", &[]), mock("b", "gpt", &[]));
    let cfg = two_endpoints(ma.addr, mb.addr, &redis_state(&url));
    // A replica starts while its Redis is down, and serves.
    let early = gateway(&cfg, &[]);
    assert_eq!(post(&early.url("/v1/chat/completions"), &chat("gpt")).await.status, 200);
    assert_eq!(state_doc(&early).await["connected"], false);
    let metrics = get(&early.url("/metrics")).await.text();
    assert!(metrics.contains("sheepdog_state_backend_up 0"), "{metrics}");
    let mut redis = OwnRedis::start(port);
    redis_connected(&early).await;
    let g = gateway(&cfg, &[]);
    redis_connected(&g).await;
    // Load through a replica; Redis dies in the middle.
    let load = {
        let url = g.url("/v1/chat/completions");
        tokio::spawn(async move {
            let mut statuses = Vec::new();
            for _ in 0..150 {
                statuses.push(post(&url, &chat("gpt")).await.status);
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            statuses
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    redis.kill();
    eventually(Duration::from_secs(5), "the replica says Redis is gone", || async {
        state_doc(&g).await["connected"] == false
    })
    .await;
    let statuses = load.await.unwrap();
    assert!(statuses.iter().all(|s| *s == 200), "no client error during the outage: {statuses:?}");
    assert!(get(&g.url("/metrics")).await.text().contains("sheepdog_state_backend_up 0"));
    // A drain made during the outage stays local until Redis returns, then reaches the other replica.
    let auth = [("authorization", "Bearer adm")];
    assert_eq!(request("POST", &g.url("/admin/endpoints/a/disable"), &auth, "").await.status, 200);
    let _redis = OwnRedis::start(port);
    redis_connected(&g).await;
    redis_connected(&early).await;
    eventually(Duration::from_secs(3), "the drain made during the outage is shared", || async {
        !enabled(&early, "a").await
    })
    .await;
    let log = g.proc.stderr();
    assert_eq!(log.matches("Redis unreachable").count(), 1, "one line per change: {log}");
    assert!(!log.contains(&url), "the Redis URL is not logged");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_that_hangs_is_timed_out_and_requests_do_not_wait_for_it() {
    if Command::new("redis-server").arg("--version").stdout(Stdio::null()).status().is_err() {
        assert!(std::env::var("SHEEPDOG_REQUIRE_REDIS").as_deref() != Ok("1"), "redis-server is not installed");
        eprintln!("skipped: redis-server is not installed");
        return;
    }
    let port = free_port();
    let redis = OwnRedis::start(port);
    let (ma, mb) = (mock("a", "gpt", &[]), mock("b", "gpt", &[]));
    let cfg = two_endpoints(ma.addr, mb.addr, &redis_state(&format!("redis://127.0.0.1:{port}")));
    let g = gateway(&cfg, &[]);
    redis_connected(&g).await;
    let pid = redis.0.id().to_string();
    Command::new("kill").args(["-STOP", &pid]).status().unwrap();
    // A drain now must not wait for Redis either.
    let auth = [("authorization", "Bearer adm")];
    assert_eq!(request("POST", &g.url("/admin/endpoints/a/disable"), &auth, "").await.status, 200);
    let started = Instant::now();
    for _ in 0..20 {
        let r = post(&g.url("/v1/chat/completions"), &chat("gpt")).await;
        assert_eq!(r.status, 200);
    }
    assert!(started.elapsed() < Duration::from_secs(5), "requests did not wait for the hung Redis");
    eventually(Duration::from_secs(5), "the hung Redis is noticed", || async {
        state_doc(&g).await["connected"] == false
    })
    .await;
    Command::new("kill").args(["-CONT", &pid]).status().unwrap();
    redis_connected(&g).await;
    let mut conn = redis::Client::open(format!("redis://127.0.0.1:{port}")).unwrap().get_connection().unwrap();
    let p = cfg.split("key_prefix = \"").nth(1).unwrap().split('"').next().unwrap().to_owned();
    let key = format!("{p}:drain:a");
    let mut msg: Option<String> = None;
    for _ in 0..100 {
        msg = redis::cmd("HGET").arg(&key).arg("msg").query(&mut conn).unwrap();
        if msg.is_some() {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(msg.unwrap_or_default().contains("\"enabled\":false"), "the drain made while Redis hung reaches it");
}
