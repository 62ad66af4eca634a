//! A small Chrome DevTools Protocol client for browser tests: headless Chromium (Debian's `chromium`, installed
//! by `scripts/test`) driven over `--remote-debugging-pipe` (fd 3 in, fd 4 out, NUL-terminated JSON), so the
//! tests need no WebDriver, no websocket crate and no network. One page per [`Browser`].
#![allow(dead_code)]

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

/// Where Chromium is: `$SHEEPDOG_CHROMIUM`, else Debian's `/usr/bin/chromium`.
pub fn chromium_path() -> PathBuf {
    let p = std::env::var_os("SHEEPDOG_CHROMIUM").map(PathBuf::from).unwrap_or_else(|| "/usr/bin/chromium".into());
    assert!(p.exists(), "{} not found: run scripts/test (it installs Debian's chromium)", p.display());
    p
}

type Replies = Arc<(Mutex<HashMap<u64, Value>>, Condvar)>;

/// A headless Chromium with one page, killed on drop.
pub struct Browser {
    child: Child,
    to: std::io::PipeWriter,
    replies: Replies,
    next_id: u64,
    session: String,
    _profile: tempfile::TempDir,
}

impl Browser {
    /// Start Chromium and open a blank page.
    pub fn launch() -> Browser {
        let profile = tempfile::tempdir().unwrap();
        let (their_in, to) = std::io::pipe().unwrap();
        let (from, their_out) = std::io::pipe().unwrap();
        let (r, w) = (their_in.as_raw_fd(), their_out.as_raw_fd());
        let mut cmd = Command::new(chromium_path());
        cmd.args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--no-default-browser-check",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--disable-extensions",
            "--disable-dev-shm-usage",
            "--hide-scrollbars",
            "--mute-audio",
            "--remote-debugging-pipe",
        ])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .arg("about:blank")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
        // SAFETY: only async-signal-safe calls (dup, dup2) between fork and exec. The copies made first keep
        // the pipe ends alive whichever descriptor numbers they had; dup2's results have no close-on-exec flag.
        unsafe {
            cmd.pre_exec(move || {
                let (r2, w2) = (libc::dup(r), libc::dup(w));
                if r2 < 0 || w2 < 0 || libc::dup2(r2, 3) < 0 || libc::dup2(w2, 4) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd.spawn().expect("start chromium");
        drop((their_in, their_out));
        let replies: Replies = Arc::default();
        let sink = replies.clone();
        std::thread::spawn(move || {
            let mut reader = BufReader::new(from);
            let mut buf = Vec::new();
            while reader.read_until(0, &mut buf).map(|n| n > 0).unwrap_or(false) {
                if buf.last() == Some(&0) {
                    buf.pop();
                }
                if let Ok(v) = serde_json::from_slice::<Value>(&buf) {
                    if let Some(id) = v["id"].as_u64() {
                        sink.0.lock().unwrap().insert(id, v);
                        sink.1.notify_all();
                    }
                }
                buf.clear();
            }
        });
        let mut b = Browser { child, to, replies, next_id: 0, session: String::new(), _profile: profile };
        let target = b.call("Target.createTarget", json!({"url": "about:blank"}));
        let target_id = target["targetId"].as_str().expect("targetId").to_string();
        let attached = b.call("Target.attachToTarget", json!({"targetId": target_id, "flatten": true}));
        b.session = attached["sessionId"].as_str().expect("sessionId").to_string();
        b
    }

    fn send(&mut self, method: &str, params: Value, session: bool) -> Value {
        self.next_id += 1;
        let id = self.next_id;
        let mut msg = json!({"id": id, "method": method, "params": params});
        if session {
            msg["sessionId"] = json!(self.session);
        }
        let mut bytes = serde_json::to_vec(&msg).unwrap();
        bytes.push(0);
        self.to.write_all(&bytes).expect("write to chromium");
        let (lock, cv) = &*self.replies;
        let until = Instant::now() + Duration::from_secs(60);
        let mut map = lock.lock().unwrap();
        loop {
            if let Some(v) = map.remove(&id) {
                assert!(v.get("error").is_none(), "{method}: {v}");
                return v["result"].clone();
            }
            let left = until.checked_duration_since(Instant::now()).unwrap_or_else(|| panic!("{method}: no answer"));
            map = cv.wait_timeout(map, left).unwrap().0;
        }
    }

    /// A browser-level command.
    pub fn call(&mut self, method: &str, params: Value) -> Value {
        self.send(method, params, false)
    }

    /// A command to the page.
    pub fn page(&mut self, method: &str, params: Value) -> Value {
        self.send(method, params, true)
    }

    /// Load `url` in the page.
    pub fn navigate(&mut self, url: &str) {
        self.page("Page.navigate", json!({"url": url}));
    }

    /// The value of a JavaScript expression in the page (promises awaited).
    pub fn eval(&mut self, expr: &str) -> Value {
        let r = self.page("Runtime.evaluate", json!({"expression": expr, "returnByValue": true, "awaitPromise": true}));
        assert!(r.get("exceptionDetails").is_none(), "{expr}: {r}");
        r["result"]["value"].clone()
    }

    /// Evaluate `expr` until it is true; panics with `what` after `timeout`.
    pub fn wait_for(&mut self, expr: &str, timeout: Duration, what: &str) -> Duration {
        let start = Instant::now();
        loop {
            if self.eval(expr) == json!(true) {
                return start.elapsed();
            }
            assert!(start.elapsed() < timeout, "timed out after {timeout:?} waiting for {what} ({expr})");
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Lay the page out `width` CSS pixels wide (a phone when `mobile`), in light or dark, and save the whole
    /// page as a PNG.
    pub fn screenshot(&mut self, path: &Path, width: u32, mobile: bool, dark: bool) {
        let scheme = if dark { "dark" } else { "light" };
        self.page(
            "Emulation.setEmulatedMedia",
            json!({"features": [{"name": "prefers-color-scheme", "value": scheme}]}),
        );
        let metrics = |h: u64| json!({"width": width, "height": h, "deviceScaleFactor": 1, "mobile": mobile});
        self.page("Emulation.setDeviceMetricsOverride", metrics(if mobile { 800 } else { 900 }));
        let height =
            self.eval("new Promise(r => requestAnimationFrame(() => r(document.documentElement.scrollHeight)))");
        let height = height.as_u64().unwrap_or(900).clamp(400, 6000);
        self.page("Emulation.setDeviceMetricsOverride", metrics(height));
        self.eval("new Promise(r => requestAnimationFrame(() => requestAnimationFrame(() => r(true))))");
        let shot = self.page("Page.captureScreenshot", json!({"format": "png"}));
        let png = base64_decode(shot["data"].as_str().expect("screenshot data"));
        assert!(png.starts_with(b"\x89PNG"), "not a PNG");
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, png).unwrap();
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Standard base64 (with padding) to bytes.
fn base64_decode(s: &str) -> Vec<u8> {
    let val = |c: u8| match c {
        b'A'..=b'Z' => c - b'A',
        b'a'..=b'z' => c - b'a' + 26,
        b'0'..=b'9' => c - b'0' + 52,
        b'+' => 62,
        b'/' => 63,
        _ => panic!("not base64: {c}"),
    };
    let clean: Vec<u8> = s.bytes().filter(|c| !c.is_ascii_whitespace() && *c != b'=').collect();
    let mut out = Vec::with_capacity(clean.len() * 3 / 4);
    for chunk in clean.chunks(4) {
        let mut n = 0u32;
        for (i, c) in chunk.iter().enumerate() {
            n |= u32::from(val(*c)) << (18 - 6 * i);
        }
        let bytes = n.to_be_bytes();
        out.extend_from_slice(&bytes[1..chunk.len()]);
    }
    out
}

#[test]
fn base64_round_trip() {
    assert_eq!(base64_decode("aGVsbG8="), b"hello");
    assert_eq!(base64_decode("aGk="), b"hi");
    assert_eq!(base64_decode("YWJj"), b"abc");
}
