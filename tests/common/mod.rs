//! Test harness: real `sheepdog mock` and `sheepdog serve` processes on free ports, and a small HTTP client.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

pub const BIN: &str = env!("CARGO_BIN_EXE_sheepdog");

/// A child process killed on drop, with its stderr collected (or, for [`Proc::spawn_stderr_unread`], held open
/// and never read).
pub struct Proc {
    pub child: Child,
    pub addr: SocketAddr,
    pub stderr: Arc<Mutex<String>>,
    unread_stderr: Option<std::process::ChildStderr>,
}

impl Proc {
    /// Spawn `args`, wait for a stdout line containing `marker` followed by an address, return it.
    pub fn spawn(args: &[&str], envs: &[(&str, &str)], marker: &str) -> Proc {
        Self::spawn_in(None, args, envs, marker)
    }

    /// Like [`Proc::spawn`], in working directory `cwd`.
    pub fn spawn_in(cwd: Option<&std::path::Path>, args: &[&str], envs: &[(&str, &str)], marker: &str) -> Proc {
        Self::start(cwd, args, envs, marker, true)
    }

    /// Like [`Proc::spawn`], with its stderr a pipe that nobody reads (a stuck log collector): once the pipe's
    /// buffer is full, every write to it blocks.
    pub fn spawn_stderr_unread(args: &[&str], marker: &str) -> Proc {
        Self::start(None, args, &[], marker, false)
    }

    fn start(
        cwd: Option<&std::path::Path>,
        args: &[&str],
        envs: &[(&str, &str)],
        marker: &str,
        read_stderr: bool,
    ) -> Proc {
        let mut cmd = Command::new(BIN);
        if let Some(d) = cwd {
            cmd.current_dir(d);
        }
        cmd.args(args).stdout(Stdio::piped()).stderr(Stdio::piped()).stdin(Stdio::null());
        for (k, v) in envs {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("spawn sheepdog");
        let stderr = Arc::new(Mutex::new(String::new()));
        let mut err = child.stderr.take().unwrap();
        let mut unread_stderr = None;
        if read_stderr {
            let sink = stderr.clone();
            std::thread::spawn(move || {
                let mut buf = [0u8; 8192];
                loop {
                    match err.read(&mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => sink.lock().unwrap().push_str(&String::from_utf8_lossy(&buf[..n])),
                    }
                }
            });
        } else {
            unread_stderr = Some(err);
        }
        let out = child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let marker = marker.to_string();
        std::thread::spawn(move || {
            let mut sent = false;
            for line in BufReader::new(out).lines() {
                let Ok(line) = line else { break };
                if !sent {
                    if let Some(rest) = line.split(&marker).nth(1) {
                        let addr = rest.trim().trim_start_matches("http://");
                        let addr = addr.split_whitespace().next().unwrap_or("").to_string();
                        let _ = tx.send(addr);
                        sent = true;
                    }
                }
            }
        });
        let addr = match rx.recv_timeout(Duration::from_secs(20)) {
            Ok(a) => a.parse().unwrap_or_else(|_| panic!("bad address {a:?}")),
            Err(_) => {
                let _ = child.kill();
                panic!("{args:?} did not start; stderr:\n{}", stderr.lock().unwrap());
            }
        };
        Proc { child, addr, stderr, unread_stderr }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    pub fn stderr(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }

    /// Send SIGTERM (graceful shutdown) or SIGHUP.
    pub fn signal(&self, sig: &str) {
        Command::new("kill").args([&format!("-{sig}"), &self.child.id().to_string()]).status().unwrap();
    }

    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Wait for the process to exit (after SIGTERM), at most `timeout`.
pub fn wait_exit(proc: &mut Proc, timeout: Duration) -> std::process::ExitStatus {
    let until = Instant::now() + timeout;
    loop {
        if let Some(s) = proc.child.try_wait().unwrap() {
            return s;
        }
        assert!(Instant::now() < until, "the process did not exit; stderr:\n{}", proc.stderr());
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Read the next whole HTTP/1.1 request (head and `content-length` body) from a raw socket into `buf`;
/// its body, or `None` when the peer closed.
pub fn read_raw_request(s: &mut std::net::TcpStream, buf: &mut Vec<u8>) -> Option<Vec<u8>> {
    let mut chunk = [0u8; 65536];
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
            let len: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:").map(|v| v.trim().parse().unwrap_or(0)))
                .unwrap_or(0);
            if buf.len() >= end + 4 + len {
                let body = buf[end + 4..end + 4 + len].to_vec();
                buf.drain(..end + 4 + len);
                return Some(body);
            }
        }
        match s.read(&mut chunk) {
            Ok(0) | Err(_) => return None,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
}

/// Start `sheepdog mock`.
pub fn mock(name: &str, models: &str, extra: &[&str]) -> Proc {
    let mut args = vec!["mock", "--listen", "127.0.0.1:0", "--name", name, "--models", models];
    args.extend_from_slice(extra);
    Proc::spawn(&args, &[], "listening on ")
}

/// A config file in a temp dir, kept alive with the gateway.
pub struct Gateway {
    pub proc: Proc,
    pub dir: tempfile::TempDir,
}

impl Gateway {
    pub fn path(&self) -> PathBuf {
        self.dir.path().join("sheepdog.toml")
    }
    pub fn url(&self, p: &str) -> String {
        self.proc.url(p)
    }
}

/// Start `sheepdog serve` with this config text on a free port.
pub fn gateway(config: &str, envs: &[(&str, &str)]) -> Gateway {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("sheepdog.toml");
    std::fs::write(&path, config).unwrap();
    let p = path.to_str().unwrap().to_string();
    let proc = Proc::spawn(&["serve", "--config", &p, "--listen", "127.0.0.1:0"], envs, "sheepdog listening on ");
    Gateway { proc, dir }
}

/// A config with these endpoints `(name, mock address, extra toml lines)` serving `models`.
pub fn config(endpoints: &[(&str, SocketAddr, &str)], models: &str, extra: &str) -> String {
    let mut s = String::from(
        "[server]\nlisten = \"127.0.0.1:0\"\n\n[health]\ninterval = \"300ms\"\nidle_interval = \"1s\"\ntimeout = \"1s\"\n\n",
    );
    s.push_str(extra);
    s.push('\n');
    for (name, addr, more) in endpoints {
        s.push_str(&format!("[[endpoints]]\nname = \"{name}\"\nbase_url = \"http://{addr}/v1\"\n{more}\n\n"));
    }
    s.push_str(models);
    s
}

/// Like [`config`], probing once at start only (then every hour): only live requests move the pairs.
pub fn quiet_config(endpoints: &[(&str, SocketAddr, &str)], models: &str, extra: &str) -> String {
    config(endpoints, models, extra)
        .replace("interval = \"300ms\"", "interval = \"1h\"")
        .replace("idle_interval = \"1s\"", "idle_interval = \"1h\"")
}

pub fn model(name: &str, more: &str) -> String {
    format!("[[models]]\nname = \"{name}\"\ninput_usd_per_mtok = 2.0\noutput_usd_per_mtok = 8.0\n{more}\n\n")
}

pub struct Reply {
    pub status: u16,
    pub headers: http::HeaderMap,
    pub body: Bytes,
}

impl Reply {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.text()))
    }
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
    pub fn header(&self, name: &str) -> Option<String> {
        self.headers.get(name).map(|v| v.to_str().unwrap().to_string())
    }
}

pub type TestClient = Client<hyper_util::client::legacy::connect::HttpConnector, Full<Bytes>>;

pub fn client() -> TestClient {
    Client::builder(TokioExecutor::new()).build_http()
}

pub async fn request(method: &str, url: &str, headers: &[(&str, &str)], body: impl Into<Bytes>) -> Reply {
    let mut b = http::Request::builder().method(method).uri(url);
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    let req = b.body(Full::new(body.into())).unwrap();
    let resp = tokio::time::timeout(Duration::from_secs(30), client().request(req))
        .await
        .expect("request timed out")
        .expect("request failed");
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let body = resp.into_body().collect().await.map(|c| c.to_bytes()).unwrap_or_default();
    Reply { status, headers, body }
}

pub async fn post(url: &str, body: &str) -> Reply {
    request("POST", url, &[("content-type", "application/json")], body.to_string()).await
}

pub async fn get(url: &str) -> Reply {
    request("GET", url, &[], Bytes::new()).await
}

pub fn chat(model: &str) -> String {
    serde_json::json!({"model": model, "messages": [{"role": "user", "content": "Say hello"}]}).to_string()
}

/// A streamed answer: each body frame with the time it arrived.
pub struct Streamed {
    pub status: u16,
    pub headers: http::HeaderMap,
    pub frames: Vec<(Duration, Bytes)>,
    pub error: Option<String>,
}

impl Streamed {
    pub fn text(&self) -> String {
        self.frames.iter().map(|(_, b)| String::from_utf8_lossy(b).into_owned()).collect()
    }
    /// The `data:` payloads of the SSE stream.
    pub fn events(&self) -> Vec<String> {
        self.text().split("\n\n").filter_map(|e| e.trim().strip_prefix("data:").map(|d| d.trim().to_string())).collect()
    }
    /// Joined `delta.content` of the chunks.
    pub fn content(&self) -> String {
        self.events()
            .iter()
            .filter(|e| *e != "[DONE]")
            .filter_map(|e| serde_json::from_str::<serde_json::Value>(e).ok())
            .filter_map(|v| v["choices"][0]["delta"]["content"].as_str().map(str::to_string))
            .collect()
    }
}

pub async fn stream(url: &str, body: &str) -> Streamed {
    let req = http::Request::post(url)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body.to_string())))
        .unwrap();
    let start = Instant::now();
    let resp = tokio::time::timeout(Duration::from_secs(30), client().request(req)).await.unwrap().unwrap();
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let mut body = resp.into_body();
    let mut frames = Vec::new();
    let mut error = None;
    loop {
        match tokio::time::timeout(Duration::from_secs(30), body.frame()).await {
            Err(_) => {
                error = Some("stream hung".into());
                break;
            }
            Ok(None) => break,
            Ok(Some(Err(e))) => {
                error = Some(e.to_string());
                break;
            }
            Ok(Some(Ok(f))) => {
                if let Ok(d) = f.into_data() {
                    frames.push((start.elapsed(), d));
                }
            }
        }
    }
    Streamed { status, headers, frames, error }
}

/// Set the faults of a mock.
pub async fn faults(mock: &Proc, body: &str) {
    let r = post(&mock.url("/_mock/faults"), body).await;
    assert_eq!(r.status, 200, "{}", r.text());
}

/// The mock's stats.
pub async fn mock_stats(mock: &Proc) -> serde_json::Value {
    get(&mock.url("/_mock/stats")).await.json()
}

/// Poll `f` until it returns true or `timeout` passes.
pub async fn eventually<F, Fut>(timeout: Duration, what: &str, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let until = Instant::now() + timeout;
    loop {
        if f().await {
            return;
        }
        if Instant::now() > until {
            panic!("timed out waiting for: {what}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The status entry of (endpoint, model) in `/status`.
pub async fn pair_status(gw: &Gateway, endpoint: &str, model: &str) -> serde_json::Value {
    let s = get(&gw.url("/status")).await.json();
    for e in s["endpoints"].as_array().unwrap() {
        if e["name"] == endpoint {
            for m in e["models"].as_array().unwrap() {
                if m["model"] == model {
                    return m.clone();
                }
            }
        }
    }
    panic!("no status for {endpoint}/{model}: {s}");
}

/// What an in-test upstream received.
#[derive(Debug, Clone)]
pub struct Seen {
    pub path: String,
    pub auth: Option<String>,
    pub body: String,
}

/// What an in-test upstream answers: status, content type, body.
pub struct Canned {
    pub status: u16,
    pub content_type: &'static str,
    pub body: String,
}

impl Canned {
    pub fn new(status: u16, content_type: &'static str, body: impl Into<String>) -> Canned {
        Canned { status, content_type, body: body.into() }
    }
    pub fn json(status: u16, body: impl Into<String>) -> Canned {
        Canned::new(status, "application/json", body)
    }
    /// A normal chat completion (with usage), or an SSE stream of two chunks, a usage chunk and [DONE].
    pub fn completion(seen: &Seen, name: &str) -> Canned {
        let stream = seen.body.contains("\"stream\":true");
        if stream {
            let chunk = |c: &str| {
                format!(
                    r#"data: {{"id":"c","object":"chat.completion.chunk","choices":[{{"index":0,"delta":{{"content":"{c}"}}}}]}}"#
                )
            };
            let body = format!(
                "{}\n\n{}\n\ndata: {{\"id\":\"c\",\"choices\":[],\"usage\":{{\"prompt_tokens\":3,\"completion_tokens\":2}}}}\n\ndata: [DONE]\n\n",
                chunk("from "),
                chunk(name)
            );
            Canned::new(200, "text/event-stream", body)
        } else {
            Canned::json(
                200,
                format!(
                    r#"{{"id":"c","object":"chat.completion","choices":[{{"index":0,"message":{{"role":"assistant","content":"from {name}"}},"finish_reason":"stop"}}],"usage":{{"prompt_tokens":3,"completion_tokens":2,"total_tokens":5}}}}"#
                ),
            )
        }
    }
}

/// An upstream inside the test process, on a real socket, that answers with `handler` and records what it saw:
/// the relays with bad habits of issue reports.
pub struct TestUpstream {
    pub addr: SocketAddr,
    pub seen: Arc<Mutex<Vec<Seen>>>,
}

impl TestUpstream {
    pub fn start(handler: impl Fn(&Seen) -> Canned + Send + Sync + 'static) -> TestUpstream {
        let std_listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = std_listener.local_addr().unwrap();
        std_listener.set_nonblocking(true).unwrap();
        let seen: Arc<Mutex<Vec<Seen>>> = Arc::default();
        let (log, handler) = (seen.clone(), Arc::new(handler));
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            rt.block_on(async move {
                let listener = tokio::net::TcpListener::from_std(std_listener).unwrap();
                loop {
                    let Ok((stream, _)) = listener.accept().await else { return };
                    let (log, handler) = (log.clone(), handler.clone());
                    tokio::spawn(async move {
                        let service = hyper::service::service_fn(move |req: http::Request<hyper::body::Incoming>| {
                            let (log, handler) = (log.clone(), handler.clone());
                            async move {
                                let path = req.uri().path().to_string();
                                let auth =
                                    req.headers().get("authorization").map(|v| v.to_str().unwrap_or("").to_string());
                                let body = req.into_body().collect().await.map(|c| c.to_bytes()).unwrap_or_default();
                                let s = Seen { path, auth, body: String::from_utf8_lossy(&body).into_owned() };
                                let c = handler(&s);
                                log.lock().unwrap().push(s);
                                let resp = http::Response::builder()
                                    .status(c.status)
                                    .header("content-type", c.content_type)
                                    .body(Full::new(Bytes::from(c.body)))
                                    .unwrap();
                                Ok::<_, std::convert::Infallible>(resp)
                            }
                        });
                        let _ = hyper::server::conn::http1::Builder::new()
                            .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                            .await;
                    });
                }
            });
        });
        TestUpstream { addr, seen }
    }

    /// Chat requests seen (probes and live requests) whose body contains `needle`.
    pub fn count(&self, needle: &str) -> usize {
        self.seen
            .lock()
            .unwrap()
            .iter()
            .filter(|s| s.path.ends_with("/chat/completions") && s.body.contains(needle))
            .count()
    }
}

// Redis-backed state (tests/shared_state.rs, tests/shared_counters.rs).

/// The Redis every machine of the project runs.
pub const REDIS: &str = "redis://127.0.0.1:6379";

/// Whether Redis runs on 127.0.0.1:6379; without it a test skips with a message, unless
/// `SHEEPDOG_REQUIRE_REDIS=1` (CI), where that is a failure.
pub fn redis_up() -> bool {
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

/// A `[state]` section for the Redis at `url`, under a key prefix of this test alone.
pub fn redis_state(url: &str) -> String {
    let prefix = format!("t{:x}", rand::random::<u64>());
    format!("[state]\nbackend = \"redis\"\nredis_url = \"{url}\"\nkey_prefix = \"{prefix}\"\n")
}

/// Wait until the replica's `/status` says it reached Redis.
pub async fn redis_connected(gw: &Gateway) {
    eventually(Duration::from_secs(10), "the replica reaches Redis", || async {
        get(&gw.url("/status")).await.json()["state"]["connected"] == true
    })
    .await;
}
