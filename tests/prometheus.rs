//! The monitoring files under `deploy/` against the real tools (Debian's `prometheus` and
//! `prometheus-alertmanager`, installed by `scripts/test`): `promtool check rules`, `promtool test rules`,
//! `promtool check config`, `amtool check-config`; then a real Prometheus server scrapes a gateway under mock
//! traffic and every PromQL expression of the Grafana dashboard and of the alert rules is run against it and
//! must return data (a budget is configured, so the budget panels and alert have theirs too).

mod common;
mod obs;

use std::collections::BTreeSet;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use obs::{deploy, enc, free_port, run, tool, yaml};
use serde_json::Value;

#[test]
fn promtool_and_amtool_accept_the_rules_config_and_alertmanager_config() {
    let promtool = tool("promtool");
    let rules = deploy("prometheus/alert_rules.yml");
    let (ok, out) = run(&promtool, &["check", "rules", rules.to_str().unwrap()], None, None);
    assert!(ok, "promtool check rules:\n{out}");
    let dir = deploy("prometheus");
    let (ok, out) = run(&promtool, &["test", "rules", "alert_rules.test.yml"], None, Some(&dir));
    assert!(ok, "promtool test rules:\n{out}");
    let (ok, out) = run(&promtool, &["check", "config", "prometheus.yml"], None, Some(&dir));
    assert!(ok, "promtool check config:\n{out}");
    let am = deploy("alertmanager/alertmanager.yml");
    let (ok, out) = run(&tool("amtool"), &["check-config", am.to_str().unwrap()], None, None);
    assert!(ok, "amtool check-config:\n{out}");

    // The checks can fail: a rule with a broken expression is refused.
    let bad = tempfile::tempdir().unwrap();
    let f = bad.path().join("bad.yml");
    std::fs::write(&f, "groups:\n- name: x\n  rules:\n  - alert: X\n    expr: rate(sheepdog_requests_total[5m] > 1\n")
        .unwrap();
    assert!(!run(&promtool, &["check", "rules", f.to_str().unwrap()], None, None).0);

    // Every alert has a unit test in which it fires.
    let alerts: BTreeSet<String> = alert_rules().into_iter().map(|(name, _)| name).collect();
    let tests = &yaml("prometheus/alert_rules.test.yml")[0];
    let fired: BTreeSet<String> = tests["tests"]
        .as_sequence()
        .unwrap()
        .iter()
        .flat_map(|t| t["alert_rule_test"].as_sequence().unwrap().iter())
        .filter(|a| !a["exp_alerts"].as_sequence().unwrap().is_empty())
        .map(|a| a["alertname"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(fired, alerts, "alerts without a firing unit test");
    // And the issue's list is there.
    for a in [
        "SheepdogDown",
        "SheepdogEndpointDown",
        "SheepdogHighLatencyP95",
        "SheepdogHighErrorRate",
        "SheepdogSpendHigh",
        "SheepdogBreakerOpen",
        "SheepdogGlobalDegraded",
        "SheepdogRequestLogDropping",
        "SheepdogBudgetNearLimit",
    ] {
        assert!(alerts.contains(a), "{a} missing");
    }
}

/// (alert name, expression) of every rule in `deploy/prometheus/alert_rules.yml`.
fn alert_rules() -> Vec<(String, String)> {
    let doc = &yaml("prometheus/alert_rules.yml")[0];
    doc["groups"]
        .as_sequence()
        .unwrap()
        .iter()
        .flat_map(|g| g["rules"].as_sequence().unwrap().iter())
        .map(|r| (r["alert"].as_str().unwrap().to_string(), r["expr"].as_str().unwrap().trim().to_string()))
        .collect()
}

/// (panel title, expression) of every target of the Grafana dashboard, rows included.
fn dashboard_expressions() -> Vec<(String, String)> {
    let text = std::fs::read_to_string(deploy("grafana/dashboard.json")).unwrap();
    let dash: Value = serde_json::from_str(&text).unwrap();
    let mut out = Vec::new();
    let mut stack: Vec<&Value> = dash["panels"].as_array().unwrap().iter().collect();
    while let Some(p) = stack.pop() {
        stack.extend(p["panels"].as_array().into_iter().flatten());
        for t in p["targets"].as_array().into_iter().flatten() {
            out.push((p["title"].as_str().unwrap().to_string(), t["expr"].as_str().unwrap().to_string()));
        }
    }
    out
}

/// An expression with Grafana's variables as a dashboard with "All" models would send it.
fn substitute(expr: &str) -> String {
    let e = expr.replace("$__rate_interval", "1m").replace("$__interval", "15s").replace("$model", ".*");
    assert!(!e.contains('$'), "unknown variable in {expr}");
    e
}

/// The value part of `value <comparison> threshold` (the last comparison outside brackets and quotes).
fn value_part(expr: &str) -> &str {
    let b = expr.as_bytes();
    let (mut depth, mut quoted, mut cut) = (0i32, false, None);
    for i in 0..b.len() {
        match b[i] {
            b'"' if i == 0 || b[i - 1] != b'\\' => quoted = !quoted,
            _ if quoted => {}
            b'(' | b'[' | b'{' => depth += 1,
            b')' | b']' | b'}' => depth -= 1,
            b'>' | b'<' if depth == 0 => cut = Some(i),
            b'=' | b'!' if depth == 0 && b.get(i + 1) == Some(&b'=') => cut = Some(i),
            _ => {}
        }
    }
    let i = cut.unwrap_or_else(|| panic!("no comparison in {expr}"));
    expr[..i].trim()
}

#[test]
fn value_parts_of_comparisons() {
    assert_eq!(value_part(r#"up{job="sheepdog"} == 0"#), r#"up{job="sheepdog"}"#);
    assert_eq!(
        value_part(r#"(sum(rate(x{status=~"5.."}[5m])) / sum(rate(x[5m]))) > 0.05"#),
        r#"(sum(rate(x{status=~"5.."}[5m])) / sum(rate(x[5m])))"#
    );
    assert_eq!(value_part(r#"a{b!="c"} >= 2"#), r#"a{b!="c"}"#);
}

/// A Prometheus server, stopped on drop.
struct Prometheus {
    child: Child,
    base: String,
    _dir: tempfile::TempDir,
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Start Prometheus with `deploy/prometheus/prometheus.yml` and its rules, scraping `target` every second.
fn prometheus(target: &str) -> Prometheus {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg: serde_yaml::Value = yaml("prometheus/prometheus.yml").remove(0);
    cfg["global"]["scrape_interval"] = "1s".into();
    cfg["global"]["evaluation_interval"] = "1s".into();
    let rules = deploy("prometheus/alert_rules.yml");
    cfg["rule_files"] = serde_yaml::Value::Sequence(vec![rules.to_str().unwrap().into()]);
    cfg.as_mapping_mut().unwrap().remove("alerting");
    let job = &mut cfg["scrape_configs"][0];
    assert_eq!(job["job_name"].as_str(), Some("sheepdog"));
    job["static_configs"][0]["targets"] = serde_yaml::Value::Sequence(vec![target.into()]);
    let path = dir.path().join("prometheus.yml");
    std::fs::write(&path, serde_yaml::to_string(&cfg).unwrap()).unwrap();
    let port = free_port();
    let child = Command::new(tool("prometheus"))
        .arg(format!("--config.file={}", path.display()))
        .arg(format!("--storage.tsdb.path={}", dir.path().join("data").display()))
        .arg(format!("--web.listen-address=127.0.0.1:{port}"))
        .arg("--log.level=warn")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start prometheus");
    Prometheus { child, base: format!("http://127.0.0.1:{port}"), _dir: dir }
}

impl Prometheus {
    async fn query(&self, expr: &str) -> Value {
        get(&format!("{}/api/v1/query?query={}", self.base, enc(expr))).await.json()
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn every_dashboard_and_alert_expression_returns_data_from_a_real_prometheus() {
    let a = mock("a", "gpt-4.1,claude-sonnet-4.5,text-embedding-3-small", &["--latency-ms", "30"]);
    let b = mock("b", "gpt-4.1", &["--latency-ms", "10"]);
    let dead = mock("dead", "doomed", &[]);
    let cfg = config(
        &[
            ("a", a.addr, "models = [\"gpt-4.1\", \"claude-sonnet-4.5\", \"text-embedding-3-small\"]"),
            ("b", b.addr, "models = [\"gpt-4.1\"]\nweight = 5"),
            ("dead", dead.addr, "models = [\"doomed\"]"),
        ],
        &format!(
            "{}{}{}{}",
            model("gpt-4.1", "fallbacks = [\"claude-sonnet-4.5\"]"),
            model("claude-sonnet-4.5", "hedge_after = \"10ms\""),
            model("text-embedding-3-small", "kind = \"embeddings\""),
            model("doomed", "")
        ),
        "[retry]\nbackoff_base = \"5ms\"\n[breaker]\nfailure_threshold = 2\nrecovery_timeout = \"60s\"\n\
         [[budgets]]\nname = \"daily\"\nwarn_usd = 400\nlimit_usd = 500\n",
    );
    let gw = gateway(&cfg, &[]);
    faults(&dead, r#"{"mode": "error_500"}"#).await;
    let prom = prometheus(&gw.proc.addr.to_string());

    // Traffic while Prometheus scrapes: answers, streams, embeddings, failovers (b faulted half-way), 5xx
    // (doomed), refusals (unknown model, invalid body).
    let (url, emb) = (gw.url("/v1/chat/completions"), gw.url("/v1/embeddings"));
    let stream_body = r#"{"model":"gpt-4.1","stream":true,"stream_options":{"include_usage":true},"messages":[{"role":"user","content":"hi"}]}"#;
    let start = Instant::now();
    let mut i = 0u32;
    while start.elapsed() < Duration::from_secs(8) {
        match i % 6 {
            0 => drop(stream(&url, stream_body).await),
            1 => drop(post(&emb, r#"{"model":"text-embedding-3-small","input":"hello"}"#).await),
            2 => drop(post(&url, &chat(if i.is_multiple_of(4) { "doomed" } else { "claude-sonnet-4.5" })).await),
            3 => drop(post(&url, &chat(if i.is_multiple_of(5) { "typo" } else { "gpt-4.1" })).await),
            _ => drop(post(&url, &chat("gpt-4.1")).await),
        }
        if i == 40 {
            faults(&b, r#"{"mode": "error_500"}"#).await;
        }
        i += 1;
    }
    assert!(i > 50, "too little traffic: {i}");
    eventually(Duration::from_secs(60), "Prometheus to have scraped the gateway 5 times", || async {
        let r = prom.query(r#"count_over_time(up{job="sheepdog"}[1m]) >= 5"#).await;
        r["data"]["result"].as_array().is_some_and(|a| !a.is_empty())
    })
    .await;

    let mut checks: Vec<(String, String)> = Vec::new();
    for (title, expr) in dashboard_expressions() {
        checks.push((title, substitute(&expr)));
    }
    for (alert, expr) in alert_rules() {
        // The whole rule must be valid; its value part must have data (the comparison holds only in an outage).
        let r = prom.query(&expr).await;
        assert_eq!(r["status"], "success", "{alert}: {expr}: {r}");
        checks.push((alert, value_part(&expr).to_string()));
    }
    for (name, expr) in &checks {
        let what = format!("data for {name}: {expr}");
        eventually(Duration::from_secs(30), &what, || async {
            let r = prom.query(expr).await;
            assert_eq!(r["status"], "success", "{name}: {expr}: {r}");
            r["data"]["result"].as_array().is_some_and(|a| !a.is_empty())
        })
        .await;
    }
    assert!(checks.iter().any(|(_, e)| e.contains("sheepdog_budget_limit_usd")), "the budget panels were checked");
    eprintln!("{} expressions returned data", checks.len());

    // Prometheus loaded every rule and evaluates it without error; the outage of `dead` is pending or firing.
    let rules = get(&format!("{}/api/v1/rules", prom.base)).await.json();
    let loaded: Vec<&Value> =
        rules["data"]["groups"].as_array().unwrap().iter().flat_map(|g| g["rules"].as_array().unwrap()).collect();
    assert_eq!(loaded.len(), alert_rules().len());
    for r in &loaded {
        assert_eq!(r["health"], "ok", "{r}");
    }
    eventually(Duration::from_secs(30), "SheepdogEndpointDown pending for dead", || async {
        let r = prom.query(r#"ALERTS{alertname="SheepdogEndpointDown", endpoint="dead"}"#).await;
        r["data"]["result"].as_array().is_some_and(|a| !a.is_empty())
    })
    .await;
    // The dashboard's model variable finds the configured models.
    let models = get(&format!("{}/api/v1/label/model/values?match[]={}", prom.base, enc("sheepdog_requests_total")))
        .await
        .json();
    let models: BTreeSet<&str> = models["data"].as_array().unwrap().iter().map(|v| v.as_str().unwrap()).collect();
    assert!(models.contains("gpt-4.1") && !models.contains("typo"), "{models:?}");
}
