//! Answers you can trust: relays with bad habits, as in-test upstreams on real sockets, against a real gateway.
//! A moderation 403 stays with its request; a 401 only sets a key aside when a probe confirms it; a 200 that
//! is not an answer fails over; nothing after `[DONE]` reaches the client; a pooled connection the upstream
//! closed is retried for free; reloads keep `/metrics` true; a request body must be a JSON object.

mod common;

use std::time::Duration;

use common::*;

const FLAGGED: &str = "FLAGGED-BY-MODERATION";

fn chat_with(model: &str, content: &str, stream: bool) -> String {
    serde_json::json!({"model": model, "stream": stream, "messages": [{"role": "user", "content": content}]})
        .to_string()
}

fn metric(metrics: &str, line_start: &str) -> Option<f64> {
    metrics.lines().find(|l| l.starts_with(line_start)).and_then(|l| l.rsplit(' ').next()?.parse().ok())
}

/// Moderation: a relay answers 403 to one prompt. The client gets that 403 with the relay's message, once;
/// no other key or endpoint is tried, no key is set aside, the breaker never hears of it.
#[tokio::test]
async fn a_moderation_refusal_stays_with_its_request() {
    let relay = TestUpstream::start(|s| {
        if s.body.contains(FLAGGED) {
            Canned::json(
                403,
                r#"{"error":{"message":"Your prompt was flagged by moderation (key sk-relay-SECRET-1)","type":"invalid_request_error","code":"content_policy_violation"}}"#,
            )
        } else {
            Canned::completion(s, "relay")
        }
    });
    let other = TestUpstream::start(|s| Canned::completion(s, "other"));
    let cfg = config(
        &[
            (
                "relay",
                relay.addr,
                "priority = 0\napi_keys = [\"sk-relay-SECRET-1\", \"sk-relay-SECRET-2\"]\nmodels = [\"gpt-4.1\"]",
            ),
            ("other", other.addr, "priority = 1\nmodels = [\"gpt-4.1\"]"),
        ],
        &model("gpt-4.1", "strategy = \"priority\""),
        "[breaker]\nfailure_threshold = 3\n",
    );
    let gw = gateway(&cfg, &[]);
    let url = gw.url("/v1/chat/completions");
    for i in 0..6 {
        let r = post(&url, &chat_with("gpt-4.1", FLAGGED, i % 2 == 1)).await;
        assert_eq!(r.status, 403, "{}", r.text());
        let e = r.json();
        assert_eq!(e["error"]["code"], "content_policy_violation", "{e}");
        assert_eq!(e["error"]["type"], "invalid_request_error");
        assert!(e["error"]["message"].as_str().unwrap().starts_with("Your prompt was flagged by moderation"));
        assert!(!r.text().contains("SECRET"), "the relay's echo of a key was scrubbed: {}", r.text());
        assert_eq!(r.header("x-sheepdog-attempts").as_deref(), Some("1"));
        assert_eq!(r.header("x-sheepdog-endpoint").as_deref(), Some("relay"));
    }
    assert_eq!(relay.count(FLAGGED), 6, "each refused request was sent once, not retried with the other key");
    assert_eq!(other.count(FLAGGED), 0, "nor on another endpoint");
    // The endpoint keeps serving every other prompt, with both keys.
    for _ in 0..4 {
        let r = post(&url, &chat("gpt-4.1")).await;
        assert_eq!((r.status, r.header("x-sheepdog-endpoint").as_deref()), (200, Some("relay")), "{}", r.text());
    }
    let s = pair_status(&gw, "relay", "gpt-4.1").await;
    assert_eq!(s["breaker"], "closed", "{s}");
    let status = get(&gw.url("/status")).await.json();
    assert_eq!(status["endpoints"][0]["api_keys_set_aside"], 0, "{status}");
    assert!(!gw.proc.stderr().contains("SECRET"), "a key reached the log");
}

/// The same relay with a single key: six refusals in a row open no breaker (three failures would).
#[tokio::test]
async fn refusals_never_open_the_breaker_of_a_single_key_endpoint() {
    let relay = TestUpstream::start(|s| {
        if s.body.contains(FLAGGED) {
            Canned::new(403, "text/html", "<html><body>Forbidden</body></html>")
        } else {
            Canned::completion(s, "relay")
        }
    });
    let cfg = config(
        &[("relay", relay.addr, "api_keys = [\"sk-only\"]\nmodels = [\"gpt-4.1\"]")],
        &model("gpt-4.1", ""),
        "[breaker]\nfailure_threshold = 3\n",
    );
    let gw = gateway(&cfg, &[]);
    let url = gw.url("/v1/chat/completions");
    for _ in 0..6 {
        let r = post(&url, &chat_with("gpt-4.1", FLAGGED, false)).await;
        assert_eq!(r.status, 403, "{}", r.text());
        assert_eq!(r.json()["error"]["code"], "upstream_refused", "an HTML refusal in OpenAI's shape");
        assert_eq!(r.header("content-type").as_deref(), Some("application/json"));
    }
    assert_eq!(post(&url, &chat("gpt-4.1")).await.status, 200);
    assert_eq!(pair_status(&gw, "relay", "gpt-4.1").await["breaker"], "closed");
}

/// A 401 to one request makes its key suspect; the request goes on with the next key. A probe with the key
/// decides: a key refused only for some prompts stays; a key refused for everything is set aside.
#[tokio::test]
async fn a_key_is_set_aside_only_when_a_probe_confirms_the_refusal() {
    const PICKY: &str = "PICKY-PROMPT";
    let relay = TestUpstream::start(|s| {
        let auth = s.auth.as_deref().unwrap_or("");
        if auth.ends_with("sk-revoked") || (auth.ends_with("sk-good-1") && s.body.contains(PICKY)) {
            Canned::json(
                401,
                r#"{"error":{"message":"Incorrect API key provided","type":"invalid_request_error","code":"invalid_api_key"}}"#,
            )
        } else {
            Canned::completion(s, "relay")
        }
    });
    let cfg = config(
        &[("relay", relay.addr, "api_keys = [\"sk-good-1\", \"sk-good-2\", \"sk-revoked\"]\nmodels = [\"gpt-4.1\"]")],
        &model("gpt-4.1", ""),
        "",
    );
    let gw = gateway(&cfg, &[]);
    let url = gw.url("/v1/chat/completions");
    // The prompt that sk-good-1 is refused for: served each time (a refused key is followed by the next key
    // within the attempt, and a second refusal by another attempt).
    for _ in 0..6 {
        let r = post(&url, &chat_with("gpt-4.1", PICKY, false)).await;
        assert_eq!(r.status, 200, "{}", r.text());
        assert!(r.header("x-sheepdog-attempts").unwrap().parse::<u32>().unwrap() <= 2);
    }
    // The revoked key: requests that draw it go on with the next key; a probe confirms, and it is set aside.
    eventually(Duration::from_secs(10), "sk-revoked set aside after a probe", || async {
        for _ in 0..3 {
            assert_eq!(post(&url, &chat("gpt-4.1")).await.status, 200);
        }
        get(&gw.url("/status")).await.json()["endpoints"][0]["api_keys_set_aside"] == 1
    })
    .await;
    // sk-good-1 was refused for one prompt only: its probe passed, it stays in rotation.
    let before = relay.seen.lock().unwrap().len();
    for _ in 0..6 {
        assert_eq!(post(&url, &chat("gpt-4.1")).await.status, 200);
    }
    let used: Vec<String> = relay.seen.lock().unwrap()[before..].iter().filter_map(|s| s.auth.clone()).collect();
    assert!(used.iter().any(|a| a.ends_with("sk-good-1")), "{used:?}");
    assert!(!used.iter().any(|a| a.ends_with("sk-revoked")), "{used:?}");
    assert_eq!(get(&gw.url("/status")).await.json()["endpoints"][0]["api_keys_set_aside"], 1);
    assert_eq!(pair_status(&gw, "relay", "gpt-4.1").await["breaker"], "closed");
}

/// 200s that are not answers fail over like a 5xx, before the first byte reaches the client.
#[tokio::test]
async fn a_200_that_is_not_an_answer_fails_over() {
    let bad = TestUpstream::start(|s| {
        let stream = s.body.contains("\"stream\":true");
        let c = s.body.split("CASE-").nth(1).and_then(|r| r.chars().next()).unwrap_or('-');
        match (c, stream) {
            ('1', true) => Canned::new(200, "text/html", "<html>Checking your browser…</html>"),
            ('2', true) => Canned::json(200, r#"{"error":{"message":"upstream overloaded","type":"server_error"}}"#),
            ('3', true) => Canned::new(
                200,
                "text/event-stream",
                "data: {\"error\":{\"message\":\"boom\",\"type\":\"server_error\"}}\n\ndata: [DONE]\n\n",
            ),
            ('4', false) => Canned::json(200, r#"{"error":{"message":"upstream overloaded","type":"server_error"}}"#),
            ('5', false) => Canned::json(200, "{}"),
            ('6', true) => Canned::new(200, "text/event-stream", "data: [DONE]\n\n"),
            _ => Canned::completion(s, "bad"),
        }
    });
    let good = TestUpstream::start(|s| Canned::completion(s, "good"));
    // Probes (300 ms apart) bring `bad` back to healthy after each case; the breaker stays closed.
    let cfg = config(
        &[
            ("bad", bad.addr, "priority = 0\nmodels = [\"gpt-4.1\"]"),
            ("good", good.addr, "priority = 1\nmodels = [\"gpt-4.1\"]"),
        ],
        &model("gpt-4.1", "strategy = \"priority\""),
        "[breaker]\nfailure_threshold = 100\n",
    )
    .replace("[health]\n", "[health]\nmin_success_rate = 0.0\n");
    let gw = gateway(&cfg, &[]);
    let url = gw.url("/v1/chat/completions");
    for (case, stream) in [('1', true), ('2', true), ('3', true), ('4', false), ('5', false), ('6', true)] {
        eventually(Duration::from_secs(10), "bad healthy again", || async {
            pair_status(&gw, "bad", "gpt-4.1").await["status"] == "healthy"
        })
        .await;
        let body = chat_with("gpt-4.1", &format!("CASE-{case}"), stream);
        let r = if stream {
            let s = common::stream(&url, &body).await;
            assert!(s.error.is_none(), "case {case}: {:?}", s.error);
            assert!(s.content().contains("from good"), "case {case}: {}", s.text());
            assert!(!s.text().contains("error"), "case {case}: {}", s.text());
            (s.status, s.headers)
        } else {
            let r = post(&url, &body).await;
            assert_eq!(r.json()["choices"][0]["message"]["content"], "from good", "case {case}");
            (r.status, r.headers)
        };
        assert_eq!(r.0, 200, "case {case}");
        assert_eq!(r.1.get("x-sheepdog-endpoint").unwrap(), "good", "case {case}");
        assert_eq!(r.1.get("x-sheepdog-attempts").unwrap(), "2", "case {case}");
    }
    // The bad endpoint's health, metrics and the request log saw six failures.
    let s = pair_status(&gw, "bad", "gpt-4.1").await;
    assert!(s["success_rate"].as_f64().unwrap() < 1.0, "{s}");
    let metrics = get(&gw.url("/metrics")).await.text();
    let failed = metric(&metrics, r#"sheepdog_requests_total{endpoint="bad",model="gpt-4.1",status="error"}"#);
    assert_eq!(failed, Some(6.0), "{metrics}");
    assert_eq!(metric(&metrics, r#"sheepdog_failovers_total{model="gpt-4.1"}"#), Some(6.0));
}

/// When every endpoint answers 200 with something else, the client gets an OpenAI error, never a 200.
#[tokio::test]
async fn garbage_everywhere_is_a_502_not_a_200() {
    let bad = TestUpstream::start(|_| Canned::json(200, "{}"));
    let cfg = quiet_config(&[("bad", bad.addr, "models = [\"gpt-4.1\"]")], &model("gpt-4.1", ""), "");
    let gw = gateway(&cfg, &[]);
    let r = post(&gw.url("/v1/chat/completions"), &chat("gpt-4.1")).await;
    assert_eq!(r.status, 502, "{}", r.text());
    assert_eq!(r.json()["error"]["code"], "bad_upstream_response");
    assert!(r.text().contains("without `choices`"), "{}", r.text());
}

/// Events after `data: [DONE]` never reach the client.
#[tokio::test]
async fn nothing_after_done_reaches_the_client() {
    let relay = TestUpstream::start(|_| {
        Canned::new(
            200,
            "text/event-stream",
            "data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"hi\"}}]}\n\ndata: [DONE]\n\ndata: {\"ads\":\"buy now\"}\n\n",
        )
    });
    let cfg = quiet_config(&[("relay", relay.addr, "models = [\"gpt-4.1\"]")], &model("gpt-4.1", ""), "");
    let gw = gateway(&cfg, &[]);
    let s = common::stream(&gw.url("/v1/chat/completions"), &chat_with("gpt-4.1", "x", true)).await;
    assert_eq!(s.status, 200);
    assert!(s.text().ends_with("data: [DONE]\n\n"), "{}", s.text());
    assert!(!s.text().contains("buy now"), "{}", s.text());
}

/// An upstream that closes each connection when a second request comes on it: the gateway meets a pooled
/// connection closed just before reuse, sends again on a fresh one, and counts neither an attempt nor a
/// failure.
#[tokio::test]
async fn a_pooled_connection_closed_by_the_upstream_is_retried_for_free() {
    use std::io::{Read, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let answer = r#"{"id":"c","object":"chat.completion","choices":[{"index":0,"message":{"role":"assistant","content":"fresh"},"finish_reason":"stop"}]}"#;
    std::thread::spawn(move || {
        for s in listener.incoming() {
            let Ok(mut s) = s else { return };
            std::thread::spawn(move || {
                let mut requests = 0;
                let mut buf = Vec::new();
                let mut chunk = [0u8; 65536];
                loop {
                    let n = match s.read(&mut chunk) {
                        Ok(0) | Err(_) => return,
                        Ok(n) => n,
                    };
                    buf.extend_from_slice(&chunk[..n]);
                    let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else { continue };
                    let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
                    let len: usize = head
                        .lines()
                        .find_map(|l| l.strip_prefix("content-length:").map(|v| v.trim().parse().unwrap_or(0)))
                        .unwrap_or(0);
                    if buf.len() < end + 4 + len {
                        continue;
                    }
                    buf.drain(..end + 4 + len);
                    requests += 1;
                    if requests > 1 {
                        // The keep-alive connection is "closed just before reuse": no answer, just a close.
                        return;
                    }
                    let _ = write!(
                        s,
                        "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{answer}",
                        answer.len()
                    );
                }
            });
        }
    });
    let cfg = quiet_config(
        &[("closer", addr, "models = [\"gpt-4.1\"]")],
        &model("gpt-4.1", ""),
        "[breaker]\nfailure_threshold = 1\n",
    );
    let gw = gateway(&cfg, &[]);
    let url = gw.url("/v1/chat/completions");
    for _ in 0..5 {
        let r = post(&url, &chat("gpt-4.1")).await;
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(r.header("x-sheepdog-attempts").as_deref(), Some("1"));
    }
    let s = pair_status(&gw, "closer", "gpt-4.1").await;
    assert_eq!((s["breaker"].as_str(), s["success_rate"].as_f64()), (Some("closed"), Some(1.0)), "{s}");
    let metrics = get(&gw.url("/metrics")).await.text();
    assert!(!metrics.contains(r#"endpoint="closer",model="gpt-4.1",status="error""#), "{metrics}");
}

/// What describes the upstream's connection or the upstream itself stays behind: the client sees neither
/// its `server`, nor its `date` (the gateway's answer has its own), nor its cookies; other headers pass.
#[tokio::test]
async fn upstream_connection_and_identity_headers_stay_behind() {
    use std::io::Write;
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let answer = r#"{"id":"c","object":"chat.completion","choices":[{"index":0,"message":{"role":"assistant","content":"hi"},"finish_reason":"stop"}]}"#;
    std::thread::spawn(move || {
        for s in listener.incoming() {
            let Ok(mut s) = s else { return };
            std::thread::spawn(move || {
                let mut buf = Vec::new();
                while read_raw_request(&mut s, &mut buf).is_some() {
                    let _ = write!(
                        s,
                        "HTTP/1.1 200 OK\r\nserver: relay-internal/1.2\r\ndate: Thu, 01 Jan 1970 00:00:00 GMT\r\n\
                         set-cookie: relay=1\r\nx-relay-trace: t1\r\ncontent-type: application/json\r\n\
                         content-length: {}\r\n\r\n{answer}",
                        answer.len()
                    );
                }
            });
        }
    });
    let cfg = quiet_config(&[("relay", addr, "models = [\"gpt-4.1\"]")], &model("gpt-4.1", ""), "");
    let gw = gateway(&cfg, &[]);
    let r = post(&gw.url("/v1/chat/completions"), &chat("gpt-4.1")).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.header("server"), None);
    assert_eq!(r.header("set-cookie"), None);
    let date = r.header("date").expect("the gateway dates its answer");
    assert!(!date.contains("1970"), "{date}");
    assert_eq!(r.header("x-relay-trace").as_deref(), Some("t1"));
    assert_eq!(r.json()["choices"][0]["message"]["content"], "hi");
}

/// Reloads keep `/metrics` true: a pair whose endpoint moved to a new URL keeps its gauges; renamed models
/// leave no series behind.
#[tokio::test]
async fn reloads_keep_metrics_true() {
    let a = TestUpstream::start(|s| Canned::completion(s, "a"));
    let b = TestUpstream::start(|s| Canned::completion(s, "b"));
    let base = |addr: std::net::SocketAddr, name: &str| {
        quiet_config(&[("primary", addr, &format!("models = [\"{name}\"]"))], &model(name, ""), "").replacen(
            "[server]\n",
            "[server]\nadmin_key = \"adm\"\n",
            1,
        )
    };
    let gw = gateway(&base(a.addr, "m0"), &[]);
    let reload = || async {
        let r = request("POST", &gw.url("/admin/reload"), &[("authorization", "Bearer adm")], "").await;
        assert_eq!(r.status, 200, "{}", r.text());
        r.json()
    };
    assert_eq!(post(&gw.url("/v1/chat/completions"), &chat("m0")).await.status, 200);
    // The same endpoint name at another URL: its pair is new, its series stay.
    std::fs::write(gw.path(), base(b.addr, "m0")).unwrap();
    reload().await;
    let m = get(&gw.url("/metrics")).await.text();
    assert_eq!(metric(&m, r#"sheepdog_upstream_up{endpoint="primary",model="m0"}"#), Some(1.0), "{m}");
    assert_eq!(metric(&m, r#"sheepdog_breaker_state{endpoint="primary",model="m0"}"#), Some(0.0), "{m}");
    assert_eq!(post(&gw.url("/v1/chat/completions"), &chat("m0")).await.status, 200);
    let final_size = |m: &str| m.lines().filter(|l| !l.starts_with('#')).count();
    // 100 reloads, each renaming the model (with a request for it, so every kind of series exists).
    for i in 1..=100 {
        std::fs::write(gw.path(), base(b.addr, &format!("m{i}"))).unwrap();
        reload().await;
        if i % 10 == 0 {
            assert_eq!(post(&gw.url("/v1/chat/completions"), &chat(&format!("m{i}"))).await.status, 200);
        }
    }
    let m = get(&gw.url("/metrics")).await.text();
    assert!(!m.contains("model=\"m99\""), "series of a model that is gone: {m}");
    assert!(!m.contains("model=\"m0\""), "series of a model that is gone");
    // A fresh gateway with only the final config and one request: /metrics has the same size.
    let fresh = gateway(&base(b.addr, "m100"), &[]);
    assert_eq!(post(&fresh.url("/v1/chat/completions"), &chat("m100")).await.status, 200);
    let mf = get(&fresh.url("/metrics")).await.text();
    let reloads = |m: &str| m.lines().filter(|l| l.starts_with("sheepdog_config_reloads_total")).count();
    assert_eq!(final_size(&m) - reloads(&m), final_size(&mf) - reloads(&mf), "{m}\n---\n{mf}");
}

#[tokio::test]
async fn a_reload_that_changes_listen_says_it_needs_a_restart() {
    let a = TestUpstream::start(|s| Canned::completion(s, "a"));
    let cfg = quiet_config(&[("a", a.addr, "models = [\"gpt-4.1\"]")], &model("gpt-4.1", ""), "").replacen(
        "[server]\n",
        "[server]\nadmin_key = \"adm\"\n",
        1,
    );
    let gw = gateway(&cfg, &[]);
    std::fs::write(gw.path(), cfg.replace("listen = \"127.0.0.1:0\"", "listen = \"127.0.0.1:1\"")).unwrap();
    let r = request("POST", &gw.url("/admin/reload"), &[("authorization", "Bearer adm")], "").await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json(), serde_json::json!({"reloaded": true, "needs_restart": ["server.listen"]}));
    eventually(Duration::from_secs(5), "the log says so", || async {
        gw.proc.stderr().contains("takes effect only after a restart")
    })
    .await;
}

#[tokio::test]
async fn a_body_that_is_not_a_json_object_is_a_400() {
    let a = TestUpstream::start(|s| Canned::completion(s, "a"));
    let cfg = quiet_config(&[("a", a.addr, "models = [\"gpt-4.1\"]")], &model("gpt-4.1", ""), "");
    let gw = gateway(&cfg, &[]);
    let url = gw.url("/v1/chat/completions");
    for body in [r#"["gpt-4.1",[{"role":"user","content":"NOT-AN-OBJECT"}]]"#, r#""NOT-AN-OBJECT""#, "42", "null"] {
        let r = post(&url, body).await;
        assert_eq!(r.status, 400, "{body}: {}", r.text());
        assert_eq!(r.json()["error"]["type"], "invalid_request_error");
    }
    assert_eq!(a.count("NOT-AN-OBJECT"), 0, "nothing was forwarded");
}

#[tokio::test]
async fn the_header_limits_follow_max_header_bytes() {
    let a = TestUpstream::start(|s| Canned::completion(s, "a"));
    let cfg = quiet_config(&[("a", a.addr, "models = [\"gpt-4.1\"]")], &model("gpt-4.1", ""), "").replacen(
        "[server]\n",
        "[server]\nmax_header_bytes = 131072\n",
        1,
    );
    let gw = gateway(&cfg, &[]);
    let url = gw.url("/v1/chat/completions");
    let names: Vec<String> = (0..150).map(|i| format!("x-extra-{i}")).collect();
    let mut headers: Vec<(&str, &str)> = names.iter().map(|n| (n.as_str(), "1")).collect();
    headers.push(("content-type", "application/json"));
    // 150 small headers (about 2 KB): within the 128 KiB limit, so accepted (hyper's fixed default is 100).
    let r = request("POST", &url, &headers, chat("gpt-4.1")).await;
    assert_eq!(r.status, 200, "{}", r.text());
    // 200 KB of one header: past the limit. The gateway answers 431 and closes; when it closes with bytes of
    // the head still unread, the kernel resets the connection, and a loaded machine can deliver that reset
    // before the client has read the 431. Either way the request was refused and never reached the upstream.
    let big = "y".repeat(200 << 10);
    let req = http::Request::post(&url)
        .header("content-type", "application/json")
        .header("x-big", &big)
        .body(http_body_util::Full::new(bytes::Bytes::from(chat("gpt-4.1"))))
        .unwrap();
    let before = a.count("Say hello");
    match tokio::time::timeout(Duration::from_secs(30), client().request(req)).await.expect("no answer in 30 s") {
        Ok(r) => assert_eq!(r.status().as_u16(), 431),
        Err(e) => {
            let why = format!("{e:?}");
            let closed = ["ConnectionReset", "BrokenPipe", "IncompleteMessage", "closed"];
            assert!(closed.iter().any(|c| why.contains(c)), "neither a 431 nor a closed connection: {why}");
        }
    }
    assert_eq!(a.count("Say hello"), before, "the refused request reached the upstream");
}
