//! The gateway core through real sockets: proxying, streaming, errors, key rotation, secrets, reload.

mod common;

use std::io::Write;
use std::net::TcpListener;
use std::time::Duration;

use common::*;

fn expected(name: &str, model: &str) -> String {
    sheepdog_mock::answer_pieces(name, model, None).concat()
}

#[tokio::test]
async fn chat_non_stream_stream_embeddings_and_models() {
    let m = mock("alpha", "openai/gpt-4.1,emb-1", &["--tokens-per-sec", "20"]);
    let cfg = config(
        &[("alpha", m.addr, "api_keys = [\"sk-a\"]\nmodels = { \"gpt-4.1\" = \"openai/gpt-4.1\", \"text-embedding-3-small\" = \"emb-1\" }")],
        &(model("gpt-4.1", "") + &model("text-embedding-3-small", "kind = \"embeddings\"")),
        "",
    );
    let gw = gateway(&cfg, &[]);

    let r = post(&gw.url("/v1/chat/completions"), &chat("gpt-4.1")).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let v = r.json();
    assert_eq!(v["choices"][0]["message"]["content"], expected("alpha", "openai/gpt-4.1"));
    assert!(v["usage"]["completion_tokens"].as_u64().unwrap() > 0);
    assert_eq!(r.header("x-sheepdog-endpoint").as_deref(), Some("alpha"));
    assert_eq!(r.header("x-sheepdog-model").as_deref(), Some("gpt-4.1"));
    assert_eq!(r.header("x-sheepdog-attempts").as_deref(), Some("1"));

    // Streamed: relayed chunk by chunk as the upstream produces them (20 chunks/s), never buffered whole.
    let body = serde_json::json!({"model": "gpt-4.1", "stream": true, "stream_options": {"include_usage": true},
        "messages": [{"role": "user", "content": "hi"}]})
    .to_string();
    let s = stream(&gw.url("/v1/chat/completions"), &body).await;
    assert_eq!(s.status, 200);
    assert!(s.error.is_none(), "{:?}", s.error);
    assert_eq!(s.headers.get("content-type").unwrap(), "text/event-stream");
    assert_eq!(s.content(), expected("alpha", "openai/gpt-4.1"));
    assert_eq!(s.events().last().map(String::as_str), Some("[DONE]"));
    assert!(s.events().iter().any(|e| e.contains("\"usage\"")), "usage chunk relayed");
    let (first, last) = (s.frames.first().unwrap().0, s.frames.last().unwrap().0);
    assert!(s.frames.len() >= 5, "frames: {}", s.frames.len());
    assert!(last - first >= Duration::from_millis(300), "chunks arrived together: {first:?}..{last:?}");

    let e = post(&gw.url("/v1/embeddings"), r#"{"model":"text-embedding-3-small","input":["a","b"]}"#).await;
    assert_eq!(e.status, 200, "{}", e.text());
    assert_eq!(e.json()["data"].as_array().unwrap().len(), 2);

    let l = get(&gw.url("/v1/models")).await.json();
    let ids: Vec<&str> = l["data"].as_array().unwrap().iter().map(|m| m["id"].as_str().unwrap()).collect();
    assert_eq!(ids, vec!["gpt-4.1", "text-embedding-3-small"]);

    // The upstream saw its own model names, never the public ones.
    let stats = mock_stats(&m).await;
    assert!(stats["by_model"]["openai/gpt-4.1"].as_u64().unwrap() >= 2, "{stats}");
    assert!(stats["by_model"].get("gpt-4.1").is_none(), "{stats}");
    assert_eq!(get(&gw.url("/health")).await.json(), serde_json::json!({"status": "ok"}));
}

fn assert_error(r: &Reply, status: u16, code: &str) {
    assert_eq!(r.status, status, "{}", r.text());
    let v = r.json();
    assert_eq!(v["error"]["code"], code, "{v}");
    assert!(v["error"]["message"].as_str().is_some_and(|m| !m.is_empty()));
    assert!(v["error"]["type"].is_string());
}

/// A one-shot upstream that answers every request with `answer` (raw HTTP) and keeps the bodies it received.
fn raw_upstream(answer: &'static str) -> (std::net::SocketAddr, std::sync::mpsc::Receiver<Vec<u8>>) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for s in l.incoming() {
            let Ok(mut s) = s else { break };
            let tx = tx.clone();
            std::thread::spawn(move || {
                let mut buf = Vec::new();
                while let Some(body) = read_raw_request(&mut s, &mut buf) {
                    let _ = tx.send(body);
                    let _ = s.write_all(answer.as_bytes());
                }
            });
        }
    });
    (addr, rx)
}

#[tokio::test]
async fn bad_input_gets_openai_errors() {
    let m = mock("alpha", "gpt-4.1", &[]);
    let (garbage, _) =
        raw_upstream("HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 13\r\n\r\n<html>oops</h");
    let cfg = config(
        &[("alpha", m.addr, "models = [\"gpt-4.1\"]"), ("junk", garbage, "models = [\"broken-model\"]")],
        &(model("gpt-4.1", "") + &model("broken-model", "")),
        "",
    )
    .replacen("[server]\n", "[server]\nmax_body_bytes = 2048\n", 1)
    .replacen("timeout = \"1s\"\n", "timeout = \"1s\"\nprobe = \"http\"\n", 1);
    let gw = gateway(&cfg, &[]);
    let url = gw.url("/v1/chat/completions");
    assert_error(&post(&url, "{not json").await, 400, "invalid_json");
    assert_error(&post(&url, r#"{"model":"gpt-4.1"}"#).await, 400, "missing_messages");
    assert_error(&post(&url, r#"{"model":"gpt-4.1","messages":[]}"#).await, 400, "empty_messages");
    assert_error(
        &post(&url, r#"{"model":"gpt-4.1","messages":[{"role":"pirate","content":"x"}]}"#).await,
        400,
        "invalid_role",
    );
    assert_error(&post(&url, r#"{"model":"gpt-4.1","messages":[{"content":"x"}]}"#).await, 400, "invalid_role");
    let mt = r#"{"model":"gpt-4.1","max_tokens":0,"messages":[{"role":"user","content":"x"}]}"#;
    assert_error(&post(&url, mt).await, 400, "invalid_max_tokens");
    let t = r#"{"model":"gpt-4.1","temperature":2.5,"messages":[{"role":"user","content":"x"}]}"#;
    assert_error(&post(&url, t).await, 400, "invalid_temperature");
    assert_error(&post(&url, &chat("gpt-9")).await, 404, "model_not_found");
    let big = format!(r#"{{"model":"gpt-4.1","messages":[{{"role":"user","content":"{}"}}]}}"#, "x".repeat(4096));
    assert_error(&post(&url, &big).await, 413, "body_too_large");
    let r = request("POST", &url, &[("content-type", "text/plain")], chat("gpt-4.1")).await;
    assert_error(&r, 415, "unsupported_media_type");
    assert_error(&post(&url, &chat("broken-model")).await, 502, "bad_upstream_response");
    assert_error(&get(&url).await, 405, "method_not_allowed");
    assert_error(&get(&gw.url("/v1/nope")).await, 404, "not_found");
    // Nothing above reached the good upstream, and the gateway still serves.
    assert_eq!(mock_stats(&m).await["by_path"]["/v1/chat/completions"].as_u64().unwrap_or(0), 0);
    assert_eq!(post(&url, &chat("gpt-4.1")).await.status, 200);
}

#[tokio::test]
async fn unknown_fields_pass_through_untouched() {
    let answer =
        "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 25\r\n\r\n{\"choices\":[{\"index\":0}]}";
    let (addr, bodies) = raw_upstream(answer);
    let cfg = config(&[("cap", addr, "models = { \"gpt-4.1\" = \"up/gpt-4.1\" }")], &model("gpt-4.1", ""), "");
    let gw = gateway(
        &cfg.replace("interval = \"300ms\"", "interval = \"60s\"")
            .replace("idle_interval = \"1s\"", "idle_interval = \"60s\""),
        &[],
    );
    while bodies.try_recv().is_ok() {}
    let sent = r#"{"model":"gpt-4.1","messages":[{"role":"user","content":"hi"}],"tools":[{"type":"function","function":{"name":"f","parameters":{}}}],"response_format":{"type":"json_object"},"seed":42,"x_custom":[1,2.50,"\u00e9"]}"#;
    let r = post(&gw.url("/v1/chat/completions"), sent).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let got = loop {
        let b = bodies.recv_timeout(Duration::from_secs(5)).unwrap();
        if !b.windows(4).any(|w| w == b"ping") {
            break b;
        }
    };
    assert_eq!(String::from_utf8(got).unwrap(), sent.replace("\"gpt-4.1\"", "\"up/gpt-4.1\""));
}

#[tokio::test]
async fn keys_rotate_and_a_rejected_key_is_set_aside_and_never_leaks() {
    let m = mock("alpha", "gpt-4.1", &["--require-keys", "sk-good-1,sk-good-2"]);
    let cfg = config(
        &[("alpha", m.addr, "api_keys = [\"${K1}\", \" sk-good-2 \", \"${BAD}\"]\nmodels = [\"gpt-4.1\"]")],
        &model("gpt-4.1", ""),
        "",
    );
    let gw = gateway(&cfg, &[("K1", "sk-good-1"), ("BAD", "sk-bad-secret-999"), ("RUST_LOG", "trace")]);
    // Every request is served: a request that draws the bad key goes on with the next one. A probe with the
    // bad key confirms the refusal, and it is set aside.
    eventually(Duration::from_secs(10), "the bad key set aside", || async {
        for _ in 0..3 {
            let r = post(&gw.url("/v1/chat/completions"), &chat("gpt-4.1")).await;
            assert_eq!(r.status, 200, "{}", r.text());
            assert!(!r.text().contains("sk-"), "{}", r.text());
        }
        get(&gw.url("/status")).await.json()["endpoints"][0]["api_keys_set_aside"] == 1
    })
    .await;
    let bad_before = mock_stats(&m).await["by_key"]["sk-bad-secret-999"].as_u64().unwrap_or(0);
    for _ in 0..12 {
        let r = post(&gw.url("/v1/chat/completions"), &chat("gpt-4.1")).await;
        assert_eq!(r.status, 200, "{}", r.text());
    }
    let stats = mock_stats(&m).await;
    assert!(stats["by_key"]["sk-good-1"].as_u64().unwrap() >= 3, "{stats}");
    assert!(stats["by_key"]["sk-good-2"].as_u64().unwrap() >= 3, "{stats}");
    // Set aside: out of rotation.
    assert_eq!(stats["by_key"]["sk-bad-secret-999"].as_u64().unwrap_or(0), bad_before, "{stats}");
    let status = get(&gw.url("/status")).await;
    assert_eq!(status.json()["endpoints"][0]["api_keys_set_aside"], 1);
    let metrics = get(&gw.url("/metrics")).await.text();
    for text in [status.text(), metrics, gw.proc.stderr()] {
        for key in ["sk-good-1", "sk-good-2", "sk-bad-secret-999"] {
            assert!(!text.contains(key), "{key} leaked");
        }
    }
}

#[tokio::test]
async fn failing_upstream_with_trace_logging_never_shows_the_key() {
    // alpha accepts its key, so its faults are really reached; beta refuses its key (401); dead refuses the
    // connection. Every failure path runs with trace logging on.
    let alpha = mock("alpha", "gpt-4.1", &["--require-keys", "sk-live-SECRET-1"]);
    let beta = mock("beta", "gpt-4.1", &["--require-keys", "sk-other"]);
    let dead = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let cfg = config(
        &[
            ("alpha", alpha.addr, "api_keys = [\"sk-live-SECRET-1\"]\nmodels = [\"gpt-4.1\"]"),
            ("beta", beta.addr, "api_keys = [\"sk-live-SECRET-2\"]\nmodels = [\"gpt-4.1\"]"),
            ("dead", dead, "api_keys = [\"sk-live-SECRET-3\"]\nmodels = [\"gpt-4.1\"]"),
        ],
        &model("gpt-4.1", ""),
        "[retry]\nmax_attempts = 3\nbackoff_base = \"10ms\"\n",
    );
    let gw = gateway(&cfg, &[("RUST_LOG", "trace")]);
    let url = gw.url("/v1/chat/completions");
    let mut texts = Vec::new();
    for fault in [r#"{"mode":"ok"}"#, r#"{"mode":"error_500"}"#, r#"{"mode":"error_429"}"#, r#"{"mode":"reset"}"#] {
        faults(&alpha, fault).await;
        texts.push(post(&url, &chat("gpt-4.1")).await.text());
    }
    let metrics = get(&gw.url("/metrics")).await.text();
    // The faults were reached with the key (not refused before them).
    for status in ["500", "429"] {
        let line = format!(r#"sheepdog_requests_total{{endpoint="alpha",model="gpt-4.1",status="{status}"}}"#);
        assert!(metrics.contains(&line), "alpha never answered {status}: {metrics}");
    }
    assert!(mock_stats(&alpha).await["by_key"]["sk-live-SECRET-1"].as_u64() >= Some(4));
    eventually(Duration::from_secs(10), "probes of every endpoint failed, passed or refused the key", || async {
        let s = get(&gw.url("/status")).await.json();
        let e = s["endpoints"].as_array().unwrap();
        e[0]["models"][0]["checks"].as_u64() >= Some(1)
            && e[1]["api_keys_set_aside"] == 1
            && e[2]["models"][0]["checks"].as_u64() >= Some(1)
    })
    .await;
    let everything = format!(
        "{}{}{}{}",
        texts.concat(),
        get(&gw.url("/status")).await.text(),
        get(&gw.url("/metrics")).await.text(),
        gw.proc.stderr()
    );
    assert!(gw.proc.stderr().contains("TRACE") || gw.proc.stderr().contains("DEBUG"), "trace logging is on");
    assert!(!everything.contains("SECRET"), "a key leaked");
}

#[tokio::test]
async fn reload_keeps_health_and_refuses_bad_config() {
    let a = mock("alpha", "gpt-4.1", &[]);
    let b = mock("beta", "gpt-4.1", &[]);
    // Probes at start only: from then on only live requests add checks, so the history can be counted exactly.
    let cfg = config(
        &[
            ("alpha", a.addr, "weight = 1\nmodels = [\"gpt-4.1\"]"),
            ("beta", b.addr, "weight = 1\nmodels = [\"gpt-4.1\"]"),
        ],
        &model("gpt-4.1", ""),
        "",
    )
    .replacen("[server]\n", "[server]\nadmin_key = \"${ADMIN}\"\n", 1)
    .replace("interval = \"300ms\"", "interval = \"1h\"")
    .replace("idle_interval = \"1s\"", "idle_interval = \"1h\"");
    let gw = gateway(&cfg, &[("ADMIN", "adm-123")]);
    let url = gw.url("/v1/chat/completions");
    for _ in 0..6 {
        assert_eq!(post(&url, &chat("gpt-4.1")).await.status, 200);
    }
    eventually(Duration::from_secs(10), "alpha probed and served", || async {
        pair_status(&gw, "alpha", "gpt-4.1").await["checks"].as_u64().unwrap() >= 4
    })
    .await;
    let checks_before = pair_status(&gw, "alpha", "gpt-4.1").await["checks"].as_u64().unwrap();

    // Admin routes need the key.
    assert_eq!(request("POST", &gw.url("/admin/reload"), &[], "").await.status, 401);

    // Make beta a lower priority and reload via SIGHUP.
    let new = cfg
        .replace("name = \"beta\"\nbase_url", "name = \"beta\"\npriority = 5\nbase_url")
        .replace("output_usd_per_mtok = 8.0\n", "output_usd_per_mtok = 8.0\nstrategy = \"priority\"\n");
    std::fs::write(gw.path(), &new).unwrap();
    gw.proc.signal("HUP");
    eventually(Duration::from_secs(5), "SIGHUP reload", || async { gw.proc.stderr().contains("reloaded on SIGHUP") })
        .await;
    let before_b = mock_stats(&b).await["by_path"]["/v1/chat/completions"].as_u64().unwrap_or(0);
    for _ in 0..10 {
        let r = post(&url, &chat("gpt-4.1")).await;
        assert_eq!(r.header("x-sheepdog-endpoint").as_deref(), Some("alpha"));
    }
    let after_b = mock_stats(&b).await["by_path"]["/v1/chat/completions"].as_u64().unwrap_or(0);
    assert_eq!(after_b, before_b, "beta got live traffic after becoming a lower priority");
    // The history was carried over: exactly the 10 new checks on top of the old ones (a reset history would
    // hold 10).
    let checks_after = pair_status(&gw, "alpha", "gpt-4.1").await["checks"].as_u64().unwrap();
    assert_eq!(checks_after, checks_before + 10, "health history kept across reload");

    // A broken config is refused with the reason; the old one keeps serving.
    std::fs::write(gw.path(), new.replace("weight = 1", "weight = \"heavy\"")).unwrap();
    let r = request("POST", &gw.url("/admin/reload"), &[("authorization", "Bearer adm-123")], "").await;
    assert_eq!(r.status, 422, "{}", r.text());
    assert!(r.json()["error"]["message"].as_str().unwrap().contains("sheepdog.toml:"), "{}", r.text());
    assert_eq!(post(&url, &chat("gpt-4.1")).await.status, 200);

    // Reloads while requests are in flight (the upstreams take 300 ms each, 16 clients at once): none is
    // dropped.
    std::fs::write(gw.path(), &cfg).unwrap();
    for m in [&a, &b] {
        faults(m, r#"{"mode":"slow","latency_ms":300}"#).await;
    }
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let workers: Vec<_> = (0..16)
        .map(|_| {
            let (url, stop) = (url.clone(), stop.clone());
            tokio::spawn(async move {
                let mut codes = Vec::new();
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    codes.push(post(&url, &chat("gpt-4.1")).await.status);
                }
                codes
            })
        })
        .collect();
    for _ in 0..5 {
        eventually(Duration::from_secs(10), "requests in flight", || async {
            mock_stats(&a).await["in_flight"].as_u64().unwrap_or(0)
                + mock_stats(&b).await["in_flight"].as_u64().unwrap_or(0)
                >= 8
        })
        .await;
        let r = request("POST", &gw.url("/admin/reload"), &[("authorization", "Bearer adm-123")], "").await;
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(r.json(), serde_json::json!({"reloaded": true, "needs_restart": []}));
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut codes = Vec::new();
    for w in workers {
        codes.extend(w.await.unwrap());
    }
    assert!(codes.len() >= 16, "{}", codes.len());
    assert!(codes.iter().all(|&c| c == 200), "{codes:?}");
}

#[tokio::test]
async fn graceful_shutdown_finishes_in_flight_streams() {
    let m = mock("alpha", "gpt-4.1", &["--tokens-per-sec", "10"]);
    let cfg = config(&[("alpha", m.addr, "models = [\"gpt-4.1\"]")], &model("gpt-4.1", ""), "");
    let gw = gateway(&cfg, &[]);
    let url = gw.url("/v1/chat/completions");
    let body = r#"{"model":"gpt-4.1","stream":true,"messages":[{"role":"user","content":"hi"}]}"#;
    let s = tokio::spawn(async move { stream(&url, body).await });
    eventually(Duration::from_secs(10), "the stream reached the upstream", || async {
        mock_stats(&m).await["by_path"]["/v1/chat/completions"].as_u64() >= Some(1)
    })
    .await;
    gw.proc.signal("TERM");
    let s = s.await.unwrap();
    assert!(s.error.is_none(), "{:?}", s.error);
    assert_eq!(s.content(), expected("alpha", "gpt-4.1"));
}

#[test]
fn config_check_exit_codes() {
    let dir = tempfile::tempdir().unwrap();
    let good = dir.path().join("good.toml");
    std::fs::write(
        &good,
        "[[endpoints]]\nname = \"a\"\nbase_url = \"http://127.0.0.1:1/v1\"\nmodels = [\"m\"]\n\n[[models]]\nname = \"m\"\ninput_usd_per_mtok = 1.0\noutput_usd_per_mtok = 1.0\n",
    )
    .unwrap();
    let out = std::process::Command::new(BIN).args(["config", "check", "--config"]).arg(&good).output().unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    let bad = dir.path().join("bad.toml");
    std::fs::write(
        &bad,
        std::fs::read_to_string(&good).unwrap().replace("models = [\"m\"]", "models = [\"m\"]\ntimeout = \"soon\""),
    )
    .unwrap();
    let out = std::process::Command::new(BIN).args(["config", "check", "--config"]).arg(&bad).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("bad.toml:5: endpoints[0].timeout: invalid duration"), "{err}");
}

#[tokio::test]
async fn embedded_demo_serves_with_no_config() {
    let dir = tempfile::tempdir().unwrap();
    let proc = Proc::spawn_in(Some(dir.path()), &["serve", "--listen", "127.0.0.1:0"], &[], "sheepdog listening on ");
    let r = post(&proc.url("/v1/chat/completions"), &chat("gpt-4.1")).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(r.json()["choices"][0]["message"]["content"].as_str().unwrap().contains("gpt-4.1"));
    let s = get(&proc.url("/status")).await.json();
    let names: Vec<&str> = s["endpoints"].as_array().unwrap().iter().map(|e| e["name"].as_str().unwrap()).collect();
    assert_eq!(names, vec!["primary", "secondary", "fallback"]);
    let dash = get(&proc.url("/dashboard")).await;
    assert!(dash.text().contains("<title>sheepdog</title>"));
}

#[tokio::test]
async fn stream_idle_timeout_counts_from_the_last_chunk() {
    // Chunks 100 ms apart, an idle limit of 300 ms: a 2 s stream is never idle for 300 ms and must finish.
    let m = mock("alpha", "gpt-4.1", &["--tokens-per-sec", "10"]);
    let cfg = config(
        &[("alpha", m.addr, "first_byte_timeout = \"300ms\"\nmodels = [\"gpt-4.1\"]")],
        &model("gpt-4.1", ""),
        "",
    );
    let gw = gateway(&cfg, &[]);
    let url = gw.url("/v1/chat/completions");
    let body = r#"{"model":"gpt-4.1","stream":true,"max_tokens":20,"messages":[{"role":"user","content":"hi"}]}"#;
    let s = stream(&url, body).await;
    assert!(s.error.is_none(), "{:?}", s.error);
    assert!(!s.text().contains("\"error\""), "{}", s.text());
    assert_eq!(s.content(), expected("alpha", "gpt-4.1"), "all 20 pieces");
    assert!(s.frames.last().unwrap().0 >= Duration::from_millis(1800), "the stream took its 2 s");

    // Now 400 ms between chunks: the stream is cut 300 ms after a chunk, with an SSE error event.
    faults(&m, r#"{"mode":"slow","latency_ms":0}"#).await;
    let s = stream(&url, body).await;
    assert!(s.error.is_none(), "a clean close: {:?}", s.error);
    let events = s.events();
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"), "{events:?}");
    let err: serde_json::Value = serde_json::from_str(&events[events.len() - 2]).unwrap();
    assert!(err["error"]["message"].as_str().unwrap().contains("no data within the timeout"), "{err}");
    // Cut at the first gap, long before the 8 s that 20 chunks 400 ms apart would take (the exact moment is
    // checked under a paused clock in tests/pipeline.rs).
    let (first, last) = (s.frames[0].0, s.frames.last().unwrap().0);
    assert!(last - first < Duration::from_secs(6), "not cut at the first gap: {:?}", last - first);
    assert!(s.content().len() < expected("alpha", "gpt-4.1").len(), "the stream was cut short");
}

/// The gateway keeps its upstream connections: sequential answers, and streams (which the relay stops reading
/// at `data: [DONE]`, before the body's last chunk), go over the same few connections instead of one each.
#[tokio::test]
async fn upstream_connections_are_reused() {
    let m = mock("alpha", "gpt-4.1", &["--tokens-per-sec", "0"]);
    let cfg = quiet_config(&[("alpha", m.addr, "models = [\"gpt-4.1\"]")], &model("gpt-4.1", ""), "");
    let gw = gateway(&cfg, &[]);
    let url = gw.url("/v1/chat/completions");
    assert_eq!(post(&url, &chat("gpt-4.1")).await.status, 200);
    assert_eq!(post(&m.url("/_mock/stats/reset"), "").await.status, 200);
    let streamed =
        serde_json::json!({"model": "gpt-4.1", "stream": true, "messages": [{"role": "user", "content": "hi"}]})
            .to_string();
    for _ in 0..10 {
        let r = post(&url, &chat("gpt-4.1")).await;
        assert_eq!(r.status, 200, "{}", r.text());
        let s = stream(&url, &streamed).await;
        assert_eq!(s.events().last().map(String::as_str), Some("[DONE]"), "{}", s.text());
    }
    let s = mock_stats(&m).await;
    assert_eq!(s["requests"], 20, "{s}");
    // One connection for the gateway, one for this test's own requests to the mock; a stream's connection may
    // still be finishing its last chunk when the next request comes, and then one more is opened.
    let accepted = s["accepted"].as_u64().unwrap();
    assert!(accepted <= 6, "{accepted} connections accepted for 20 requests: {s}");
}
