//! The request log in PostgreSQL (`[log] url`), against the real server on 127.0.0.1:5432 (database `test`;
//! `SHEEPDOG_TEST_PG` overrides the URL): each test writes into a schema of its own (`t_<random>`, through
//! `options=-csearch_path%3D…` in the URL) and drops it after. Without a reachable server the tests are
//! skipped with a message, unless `SHEEPDOG_REQUIRE_PG=1` (then they fail).

mod common;

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::*;
use sheepdog::log::{Entry, Source};

/// A schema of the test database, dropped on drop.
struct Pg {
    base: String,
    schema: String,
}

fn base_url() -> String {
    std::env::var("SHEEPDOG_TEST_PG").unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into())
}

/// Run one SQL batch on the test database from a thread of its own (callable from any test).
fn sql(url: &str, text: &str) -> Result<(), String> {
    let (url, text) = (url.to_string(), text.to_string());
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async {
            let (client, conn) =
                tokio_postgres::connect(&url, tokio_postgres::NoTls).await.map_err(|e| format!("{e:?}"))?;
            tokio::spawn(conn);
            client.batch_execute(&text).await.map_err(|e| format!("{e:?}"))
        })
    })
    .join()
    .unwrap()
}

/// A fresh schema, or `None` (skip) when PostgreSQL is not reachable and not required.
fn pg() -> Option<Pg> {
    let base = base_url();
    let schema = format!("t_{:016x}", rand::random::<u64>());
    if let Err(e) = sql(&base, &format!("CREATE SCHEMA {schema}")) {
        assert!(std::env::var_os("SHEEPDOG_REQUIRE_PG").is_none(), "PostgreSQL is required but unreachable: {e}");
        eprintln!("skipped: PostgreSQL at {base} is not reachable ({e}); set SHEEPDOG_REQUIRE_PG=1 to fail instead");
        return None;
    }
    Some(Pg { base, schema })
}

impl Pg {
    /// The URL of the schema, on `port` instead of the server's when given (the test's proxy).
    fn url_via(&self, port: Option<u16>, password: Option<&str>) -> String {
        let mut url = self.base.clone();
        if let Some(p) = port {
            url = url.replace(":5432", &format!(":{p}"));
        }
        if let Some(pw) = password {
            url = url.replacen("@", &format!(":{pw}@"), 1);
        }
        let sep = if url.contains('?') { '&' } else { '?' };
        format!("{url}{sep}options=-csearch_path%3D{}", self.schema)
    }

    fn url(&self) -> String {
        self.url_via(None, None)
    }

    fn rows(&self) -> Vec<Entry> {
        Source::parse(&self.url()).unwrap().read_since(0).unwrap()
    }
}

impl Drop for Pg {
    fn drop(&mut self) {
        let _ = sql(&self.base, &format!("DROP SCHEMA {} CASCADE", self.schema));
    }
}

fn log_cfg(url: &str, extra: &str) -> String {
    format!("[log]\nurl = \"{url}\"\n{extra}\n")
}

fn metric(text: &str, name: &str) -> Option<f64> {
    text.lines().find(|l| l.starts_with(name) && l[name.len()..].starts_with(' '))?.rsplit(' ').next()?.parse().ok()
}

async fn log_metric(gw: &Gateway, name: &str) -> f64 {
    metric(&get(&gw.url("/metrics")).await.text(), name).unwrap_or(-1.0)
}

fn report(args: &[&str]) -> serde_json::Value {
    let out = std::process::Command::new(BIN).arg("report").args(args).output().unwrap();
    assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
    let mut j: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    // The window's ends are "now", and the timeline's buckets with them: the only fields that differ between
    // two runs.
    for k in ["since_ms", "until_ms", "timeline"] {
        j.as_object_mut().unwrap().remove(k);
    }
    j
}

async fn sigterm(gw: &mut Gateway) {
    gw.proc.signal("TERM");
    let status = wait_exit(&mut gw.proc, Duration::from_secs(25));
    assert!(status.success(), "{status}; stderr:\n{}", gw.proc.stderr());
}

const STREAM: &str = r#"{"model":"gpt-4.1","stream":true,"stream_options":{"include_usage":true},"max_tokens":3,
    "messages":[{"role":"user","content":"hi"}]}"#;

#[tokio::test]
async fn rows_land_with_their_columns_and_report_reads_them_as_from_sqlite() {
    let Some(pg) = pg() else { return };
    let m = mock("m", "gpt-4.1", &["--tokens-per-sec", "200"]);
    let cfg = quiet_config(&[("m", m.addr, "models = [\"gpt-4.1\"]")], &model("gpt-4.1", ""), &log_cfg(&pg.url(), ""));
    let mut gw = gateway(&cfg, &[]);
    let url = gw.url("/v1/chat/completions");
    let json = post(&url, &chat("gpt-4.1")).await;
    assert_eq!(json.status, 200, "{}", json.text());
    let usage = json.json()["usage"].clone();
    let s = stream(&url, STREAM).await;
    assert_eq!((s.status, s.error.as_deref()), (200, None));
    let missing = post(&url, &chat("no-such-model")).await;
    assert_eq!(missing.status, 404);
    sigterm(&mut gw).await;

    let rows = pg.rows();
    assert_eq!(rows.len(), 3, "{rows:#?}");
    let ids: Vec<String> = rows.iter().map(|r| r.request_id.unwrap().to_string()).collect();
    assert_eq!(ids[0], json.header("x-request-id").unwrap());
    assert_eq!(ids[2], missing.header("x-request-id").unwrap());
    let j = &rows[0];
    assert_eq!((j.api, j.model.as_str(), j.status, j.attempts, j.stream), ("chat", "gpt-4.1", 200, 1, false));
    assert_eq!((j.endpoint.as_deref(), j.served_model.as_deref()), (Some("m"), Some("gpt-4.1")));
    assert_eq!(
        (j.prompt_tokens, j.completion_tokens),
        (usage["prompt_tokens"].as_u64(), usage["completion_tokens"].as_u64())
    );
    let cost = (j.prompt_tokens.unwrap() as f64 * 2.0 + j.completion_tokens.unwrap() as f64 * 8.0) / 1e6;
    assert!((j.cost_usd.unwrap() - cost).abs() < 1e-12, "{j:?}");
    assert_eq!(j.cost_nanos, Some((cost * 1e9).round() as u64));
    assert!(j.duration_ms > 0.0 && j.ttft_ms.unwrap() <= j.duration_ms && !j.estimated, "{j:?}");
    let st = &rows[1];
    assert!(st.stream && st.error.is_none() && st.status == 200, "{st:?}");
    assert_eq!(st.completion_tokens, Some(3));
    assert!(st.ttft_ms.unwrap() < st.duration_ms, "{st:?}");
    let nf = &rows[2];
    assert_eq!(
        (nf.status, nf.error.as_deref(), nf.model.as_str(), nf.endpoint.as_deref()),
        (404, Some("model_not_found"), "no-such-model", None)
    );

    // The same rows in a SQLite file give the same report, figure for figure.
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("copy.db");
    let lc = sheepdog::config::LogConfig {
        enabled: true,
        path: file.clone(),
        retention: Duration::ZERO,
        url: None,
        bodies: false,
        queue_capacity: 1000,
    };
    let copy = sheepdog::log::RequestLog::open(&lc, &sheepdog::metrics::Metrics::new()).unwrap();
    for r in &rows {
        copy.record(r.clone());
    }
    copy.close();
    let args = ["--format", "json", "--since", "1h"];
    let from_sqlite = report(&[&["--db", file.to_str().unwrap()][..], &args].concat());
    let from_pg = report(&[&["--db", &pg.url()][..], &args].concat());
    assert_eq!(from_pg, from_sqlite);
    assert_eq!(from_pg["total"]["requests"], 3);
    // With no --db, the config's [log] is read.
    let from_config = report(&[&["--config", gw.path().to_str().unwrap()][..], &args].concat());
    assert_eq!(from_config, from_pg);
    // An unreachable server is an error naming the URL without its password.
    let out = std::process::Command::new(BIN)
        .args(["report", "--db", "postgres://postgres:pw-SECRET@127.0.0.1:1/test"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("postgres://postgres:***@127.0.0.1:1/test") && !err.contains("SECRET"), "{err}");
}

#[tokio::test]
async fn api_stats_and_budget_spend_come_from_postgres_across_a_restart() {
    let Some(pg) = pg() else { return };
    let m = mock("m", "gpt-4.1", &[]);
    let extra = log_cfg(&pg.url(), "\n[[budgets]]\nname = \"daily\"\nperiod = \"day\"\nlimit_usd = 100\n");
    let cfg = quiet_config(&[("m", m.addr, "models = [\"gpt-4.1\"]")], &model("gpt-4.1", ""), &extra);
    let mut gw = gateway(&cfg, &[]);
    for _ in 0..4 {
        assert_eq!(post(&gw.url("/v1/chat/completions"), &chat("gpt-4.1")).await.status, 200);
    }
    let stats_url = gw.url("/api/stats?since=1h&model=gpt-4.1");
    eventually(Duration::from_secs(10), "/api/stats counts the 4 rows from PostgreSQL", || async {
        get(&stats_url).await.json()["total"]["requests"] == 4
    })
    .await;
    let stats = get(&stats_url).await.json();
    let cost = stats["total"]["cost_usd"].as_f64().unwrap();
    assert!(cost > 0.0, "{stats}");
    assert_eq!(stats["models"][0]["model"], "gpt-4.1");
    let spent = stats["budgets"][0]["spent_usd"].as_f64().unwrap();
    assert!((spent - cost).abs() < 1e-9, "{stats}");
    sigterm(&mut gw).await;

    let gw = gateway(&cfg, &[]);
    let b = get(&gw.url("/api/stats?since=1h")).await.json();
    let resumed = b["budgets"][0]["spent_usd"].as_f64().unwrap();
    assert!((resumed - spent).abs() < 1e-9, "spend before {spent}, after the restart {b}");
    let m = get(&gw.url("/metrics")).await.text();
    assert!((metric(&m, "sheepdog_budget_spent_usd{budget=\"daily\"}").unwrap() - spent).abs() < 1e-9, "{m}");
}

/// A TCP proxy to PostgreSQL that can be closed (connections refused at once, open ones cut) and opened.
struct Proxy {
    port: u16,
    open: Arc<AtomicBool>,
    cut: tokio::sync::watch::Sender<u64>,
}

impl Proxy {
    async fn start() -> Proxy {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let open = Arc::new(AtomicBool::new(false));
        let (cut, _) = tokio::sync::watch::channel(0u64);
        let (open2, cut2) = (open.clone(), cut.clone());
        tokio::spawn(async move {
            loop {
                let Ok((mut client, _)) = listener.accept().await else { return };
                if !open2.load(Ordering::SeqCst) {
                    drop(client);
                    continue;
                }
                let mut cut = cut2.subscribe();
                tokio::spawn(async move {
                    let Ok(mut server) = tokio::net::TcpStream::connect("127.0.0.1:5432").await else { return };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut client, &mut server) => {}
                        _ = cut.changed() => {}
                    }
                });
            }
        });
        Proxy { port, open, cut }
    }

    fn set(&self, open: bool) {
        self.open.store(open, Ordering::SeqCst);
        if !open {
            self.cut.send_modify(|n| *n += 1);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_postgres_holds_rows_in_the_queue_until_it_answers() {
    let Some(pg) = pg() else { return };
    let proxy = Proxy::start().await;
    let m = mock("m", "gpt-4.1", &[]);
    let url = pg.url_via(Some(proxy.port), Some("pw-SECRET-9"));
    let cfg = quiet_config(
        &[("m", m.addr, "models = [\"gpt-4.1\"]")],
        &model("gpt-4.1", ""),
        &log_cfg(&url, "queue_capacity = 8"),
    );
    // Closed at start: the gateway starts and serves anyway.
    let mut gw = gateway(&cfg, &[]);
    let chat_url = gw.url("/v1/chat/completions");
    let mut ids = HashSet::new();
    for _ in 0..5 {
        let r = post(&chat_url, &chat("gpt-4.1")).await;
        assert_eq!(r.status, 200);
        ids.insert(r.header("x-request-id").unwrap());
    }
    eventually(Duration::from_secs(5), "5 rows wait", || async {
        log_metric(&gw, "sheepdog_request_log_queue_depth").await == 5.0
    })
    .await;
    assert_eq!(log_metric(&gw, "sheepdog_request_log_written_total").await, 0.0);
    assert!(gw.proc.stderr().contains("PostgreSQL is unreachable"), "{}", gw.proc.stderr());

    proxy.set(true);
    eventually(Duration::from_secs(15), "the 5 rows are written once PostgreSQL answers", || async {
        log_metric(&gw, "sheepdog_request_log_written_total").await == 5.0
    })
    .await;
    assert_eq!(log_metric(&gw, "sheepdog_request_log_queue_depth").await, 0.0);

    // An outage while running: the open connection is cut; 10 answers, of which the queue holds 8.
    proxy.set(false);
    for _ in 0..10 {
        let r = post(&chat_url, &chat("gpt-4.1")).await;
        assert_eq!(r.status, 200);
        ids.insert(r.header("x-request-id").unwrap());
    }
    eventually(Duration::from_secs(5), "8 rows wait, 2 are counted as dropped", || async {
        log_metric(&gw, "sheepdog_request_log_queue_depth").await == 8.0
            && log_metric(&gw, "sheepdog_request_log_dropped_total").await == 2.0
    })
    .await;
    proxy.set(true);
    eventually(Duration::from_secs(15), "the 8 queued rows are written", || async {
        log_metric(&gw, "sheepdog_request_log_written_total").await == 13.0
    })
    .await;
    let rows = pg.rows();
    let logged: HashSet<String> = rows.iter().map(|r| r.request_id.unwrap().to_string()).collect();
    assert_eq!((rows.len(), logged.len()), (13, 13), "no row twice");
    assert!(logged.is_subset(&ids));

    // Closed at shutdown: the writer tries for 10 s, then says how many rows it could not write.
    proxy.set(false);
    for _ in 0..2 {
        assert_eq!(post(&chat_url, &chat("gpt-4.1")).await.status, 200);
    }
    eventually(Duration::from_secs(5), "2 rows wait", || async {
        log_metric(&gw, "sheepdog_request_log_queue_depth").await == 2.0
    })
    .await;
    sigterm(&mut gw).await;
    let err = gw.proc.stderr();
    assert!(err.contains("2 rows could not be written to PostgreSQL"), "{err}");
    assert!(!err.contains("SECRET") && err.contains(":***@"), "{err}");
    assert_eq!(pg.rows().len(), 13);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_shutdown_writes_every_answered_row() {
    let Some(pg) = pg() else { return };
    let m = mock("m", "gpt-4.1", &["--tokens-per-sec", "50"]);
    let cfg = quiet_config(&[("m", m.addr, "models = [\"gpt-4.1\"]")], &model("gpt-4.1", ""), &log_cfg(&pg.url(), ""));
    let mut gw = gateway(&cfg, &[]);
    let url = gw.url("/v1/chat/completions");
    let mut tasks = Vec::new();
    for i in 0..200 {
        let url = url.clone();
        tasks.push(tokio::spawn(async move {
            if i % 4 == 0 {
                stream(&url, STREAM).await.status
            } else {
                post(&url, &chat("gpt-4.1")).await.status
            }
        }));
    }
    for t in tasks {
        assert_eq!(t.await.unwrap(), 200);
    }
    // A stream still running when SIGTERM arrives is finished and logged too.
    let last_url = url.clone();
    let last = tokio::spawn(async move {
        stream(
            &last_url,
            r#"{"model":"gpt-4.1","stream":true,"max_tokens":20,"messages":[{"role":"user","content":"x"}]}"#,
        )
        .await
    });
    eventually(Duration::from_secs(5), "the last stream has begun", || async {
        log_metric(&gw, "sheepdog_requests_in_flight").await >= 1.0
    })
    .await;
    gw.proc.signal("TERM");
    let last = last.await.unwrap();
    assert_eq!((last.status, last.error.as_deref()), (200, None));
    let status = wait_exit(&mut gw.proc, Duration::from_secs(25));
    assert!(status.success(), "{status}; stderr:\n{}", gw.proc.stderr());
    let rows = pg.rows();
    assert_eq!(rows.len(), 201);
    assert_eq!(rows.iter().filter(|r| r.stream).count(), 51);
    assert!(rows.iter().all(|r| r.status == 200));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_gateways_write_into_one_table_read_back_by_report() {
    let Some(pg) = pg() else { return };
    let m = mock("m", "gpt-4.1", &[]);
    let url = pg.url();
    // Started at once into an empty schema: their migrations race under the advisory lock.
    let mut gws: Vec<Gateway> = std::thread::scope(|s| {
        let hs: Vec<_> = ["a", "b", "c"]
            .iter()
            .map(|name| {
                let cfg = quiet_config(
                    &[(*name, m.addr, "models = [\"gpt-4.1\"]")],
                    &model("gpt-4.1", ""),
                    &log_cfg(&url, ""),
                );
                s.spawn(move || gateway(&cfg, &[]))
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let mut ids = HashSet::new();
    for round in 0..20 {
        for gw in &gws {
            let r = post(&gw.url("/v1/chat/completions"), &chat("gpt-4.1")).await;
            assert_eq!(r.status, 200, "round {round}: {}", r.text());
            ids.insert(r.header("x-request-id").unwrap());
        }
    }
    for gw in &mut gws {
        sigterm(gw).await;
        assert!(!gw.proc.stderr().contains("ERROR"), "{}", gw.proc.stderr());
    }
    let j = report(&["--db", &url, "--format", "json", "--since", "1h"]);
    assert_eq!((j["total"]["requests"].as_u64(), j["total"]["ok"].as_u64()), (Some(60), Some(60)), "{j}");
    let endpoints: Vec<(String, u64)> = j["endpoints"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| (e["endpoint"].as_str().unwrap().to_string(), e["requests"].as_u64().unwrap()))
        .collect();
    assert_eq!(endpoints.len(), 3, "{j}");
    assert!(endpoints.iter().all(|(_, n)| *n == 20), "{endpoints:?}");
    let logged: HashSet<String> = pg.rows().iter().map(|r| r.request_id.unwrap().to_string()).collect();
    assert_eq!(logged, ids);
}

/// The figures in BENCHMARKS.md: what `record` costs the request path per row, and how many rows a second
/// the writer puts into PostgreSQL (and, for comparison, into SQLite). Run with
/// `cargo test --release --test requestlog_pg -- --ignored --nocapture`.
#[test]
#[ignore]
fn measure_enqueue_cost_and_rows_written_per_second() {
    const ROWS: usize = 100_000;
    let Some(pg) = pg() else { return };
    let dir = tempfile::tempdir().unwrap();
    for (what, url) in [("PostgreSQL", Some(pg.url())), ("SQLite", None)] {
        let lc = sheepdog::config::LogConfig {
            enabled: true,
            path: dir.path().join("bench.db"),
            retention: Duration::ZERO,
            url: url.map(|u| sheepdog::config::PgUrl::parse(&u).unwrap()),
            bodies: false,
            queue_capacity: ROWS,
        };
        let metrics = sheepdog::metrics::Metrics::new();
        let log = sheepdog::log::RequestLog::open(&lc, &metrics).unwrap();
        let client: Arc<str> = Arc::from("web-app");
        let rows: Vec<Entry> = (0..ROWS)
            .map(|i| Entry {
                model: "gpt-4.1".into(),
                served_model: Some("gpt-4.1".into()),
                endpoint: Some("primary".into()),
                status: 200,
                attempts: 1,
                duration_ms: 120.5,
                ttft_ms: Some(80.25),
                prompt_tokens: Some(1200 + i as u64 % 100),
                completion_tokens: Some(340),
                cached_tokens: Some(0),
                reasoning_tokens: Some(0),
                cost_usd: Some(0.00512),
                cost_nanos: Some(5_120_000),
                request_id: Some(sheepdog::log::RequestId::new()),
                client: Some(client.clone()),
                ..Entry::begin("chat")
            })
            .collect();
        let start = std::time::Instant::now();
        let mut enqueue = Duration::ZERO;
        for chunk in rows.chunks(1000) {
            let t = std::time::Instant::now();
            for r in chunk {
                log.record(r.clone());
            }
            enqueue += t.elapsed();
        }
        log.close();
        let total = start.elapsed();
        assert_eq!((metrics.log_written.get(), metrics.log_dropped.get()), (ROWS as u64, 0));
        // The clone of the prepared row is part of the measured loop: measure it alone and take it out.
        let t = std::time::Instant::now();
        let mut n = 0;
        for r in &rows {
            n += std::hint::black_box(r.clone()).status as usize;
        }
        let clone = t.elapsed();
        assert_eq!(n, 200 * ROWS);
        println!(
            "{what}: record {:.0} ns/row (of which cloning the test row {:.0} ns), {ROWS} rows written in {:.2} s: \
             {:.0} rows/s",
            enqueue.as_nanos() as f64 / ROWS as f64,
            clone.as_nanos() as f64 / ROWS as f64,
            total.as_secs_f64(),
            ROWS as f64 / total.as_secs_f64()
        );
    }
}
