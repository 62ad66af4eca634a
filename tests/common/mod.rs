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

/// A child process killed on drop, with its stderr collected.
pub struct Proc {
    pub child: Child,
    pub addr: SocketAddr,
    pub stderr: Arc<Mutex<String>>,
}

impl Proc {
    /// Spawn `args`, wait for a stdout line containing `marker` followed by an address, return it.
    pub fn spawn(args: &[&str], envs: &[(&str, &str)], marker: &str) -> Proc {
        Self::spawn_in(None, args, envs, marker)
    }

    /// Like [`Proc::spawn`], in working directory `cwd`.
    pub fn spawn_in(cwd: Option<&std::path::Path>, args: &[&str], envs: &[(&str, &str)], marker: &str) -> Proc {
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
        Proc { child, addr, stderr }
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
