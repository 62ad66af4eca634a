//! Content-aware routing through real sockets: each condition of a `[[routes]]` rule picks its model for the
//! alias, the answer says which rule in `x-sheepdog-route-reason`, the default rule catches the rest, an alias
//! without a default answers 404, the alias is listed in `/v1/models`, and `config check` names a bad rule.

mod common;

use std::process::Command;

use common::*;
use serde_json::json;

const ROUTES: &str = r#"
[[routes]]
name = "code"
model = "auto"
target = "deepseek-v3.2"
has_code = true

[[routes]]
name = "billing"
model = "auto"
target = "claude-sonnet-4.5"
keywords = ["refund", "invoice"]

[[routes]]
name = "translate"
model = "auto"
target = "gemini-2.5-flash"
regex = "(?i)\\btranslate\\b"

[[routes]]
name = "long"
model = "auto"
target = "gemini-2.5-flash"
min_prompt_tokens = 200

[[routes]]
name = "agents"
model = "auto"
target = "gpt-4.1"
has_tools = true

[[routes]]
name = "search-team"
model = "auto"
target = "claude-sonnet-4.5"
headers = { "x-team" = "search" }

[[routes]]
name = "free-tier"
model = "auto"
target = "deepseek-v3.2"
metadata = { "tier" = "free" }

[[routes]]
name = "everything-else"
model = "auto"
target = "gpt-4.1"
default = true

[[routes]]
name = "only-refunds"
model = "strict"
target = "claude-sonnet-4.5"
keywords = ["refund"]
"#;

const MODELS: [&str; 4] = ["gpt-4.1", "deepseek-v3.2", "claude-sonnet-4.5", "gemini-2.5-flash"];

fn cfg(up: &TestUpstream) -> String {
    let models: String = MODELS.iter().map(|m| model(m, "")).collect();
    let list = MODELS.map(|m| format!("\"{m}\"")).join(", ");
    quiet_config(&[("up", up.addr, &format!("models = [{list}]"))], &models, "") + ROUTES
}

async fn route(
    gw: &Gateway,
    body: serde_json::Value,
    headers: &[(&str, &str)],
) -> (u16, Option<String>, Option<String>) {
    let mut h = vec![("content-type", "application/json")];
    h.extend_from_slice(headers);
    let r = request("POST", &gw.url("/v1/chat/completions"), &h, body.to_string()).await;
    (r.status, r.header("x-sheepdog-model"), r.header("x-sheepdog-route-reason"))
}

fn ask(text: &str) -> serde_json::Value {
    json!({"model": "auto", "messages": [{"role": "system", "content": "refund policy: none"}, {"role": "user", "content": text}]})
}

#[tokio::test]
async fn each_condition_picks_its_model_and_the_answer_says_why() {
    let up = TestUpstream::start(|s| Canned::completion(s, "up"));
    let gw = gateway(&cfg(&up), &[]);
    let s = |m: &str, r: &str| (200u16, Some(m.to_string()), Some(r.to_string()));
    let code = "Why does this fail?\n```rust\nfn main() { let x: u32 = -1; }\n```";
    assert_eq!(route(&gw, ask(code), &[]).await, s("deepseek-v3.2", "code"));
    // Only the last user message counts (the system message mentions a refund).
    assert_eq!(route(&gw, ask("Where is my INVOICE?"), &[]).await, s("claude-sonnet-4.5", "billing"));
    assert_eq!(route(&gw, ask("Please translate this to French"), &[]).await, s("gemini-2.5-flash", "translate"));
    assert_eq!(route(&gw, ask(&"many words here ".repeat(100)), &[]).await, s("gemini-2.5-flash", "long"));
    let tools = json!({"model": "auto", "messages": [{"role": "user", "content": "weather?"}],
        "tools": [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]});
    assert_eq!(route(&gw, tools, &[]).await, s("gpt-4.1", "agents"));
    assert_eq!(route(&gw, ask("hello"), &[("x-team", "search")]).await, s("claude-sonnet-4.5", "search-team"));
    let meta = json!({"model": "auto", "metadata": {"tier": "free"}, "messages": [{"role": "user", "content": "hi"}]});
    assert_eq!(route(&gw, meta, &[]).await, s("deepseek-v3.2", "free-tier"));
    // Content parts are read too.
    let parts = json!({"model": "auto", "messages": [{"role": "user", "content": [{"type": "text", "text": "a refund please"}]}]});
    assert_eq!(route(&gw, parts, &[]).await, s("claude-sonnet-4.5", "billing"));
    // Nothing matches: the default rule.
    assert_eq!(route(&gw, ask("hello"), &[]).await, s("gpt-4.1", "default"));
    // An alias without a default: 404 when no rule matches, served when one does.
    let strict = |t: &str| json!({"model": "strict", "messages": [{"role": "user", "content": t}]});
    let r = post(&gw.url("/v1/chat/completions"), &strict("hello").to_string()).await;
    assert_eq!((r.status, r.json()["error"]["code"].as_str()), (404, Some("model_not_found")), "{}", r.text());
    assert_eq!(route(&gw, strict("refund?"), &[]).await, s("claude-sonnet-4.5", "only-refunds"));
    // A model asked for by name is not routed.
    assert_eq!(
        route(&gw, json!({"model": "gpt-4.1", "messages": [{"role": "user", "content": "refund"}]}), &[]).await,
        (200, Some("gpt-4.1".into()), None)
    );
    // The upstream got the target's name, never the alias.
    assert!(up.count("\"model\":\"auto\"") == 0 && up.count("\"model\":\"strict\"") == 0);
    // The aliases are models to clients.
    let ids: Vec<String> = get(&gw.url("/v1/models")).await.json()["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["id"].as_str().unwrap().to_string())
        .collect();
    assert!(ids.contains(&"auto".to_string()) && ids.contains(&"strict".to_string()), "{ids:?}");
}

#[test]
fn config_check_names_a_bad_rule() {
    let up_addr: std::net::SocketAddr = "127.0.0.1:9".parse().unwrap();
    let base = config(&[("up", up_addr, "models = [\"gpt-4.1\"]")], &model("gpt-4.1", ""), "");
    let dir = tempfile::tempdir().unwrap();
    let check = |text: &str| {
        let p = dir.path().join("sheepdog.toml");
        std::fs::write(&p, text).unwrap();
        let out = Command::new(BIN).args(["config", "check", "--config", p.to_str().unwrap()]).output().unwrap();
        (out.status.code(), String::from_utf8_lossy(&out.stderr).into_owned() + &String::from_utf8_lossy(&out.stdout))
    };
    let good = base.clone() + "\n[[routes]]\nname = \"r\"\nmodel = \"auto\"\ntarget = \"gpt-4.1\"\ndefault = true\n";
    assert_eq!(check(&good).0, Some(0), "{}", check(&good).1);
    let bad_regex =
        base.clone() + "\n[[routes]]\nname = \"r\"\nmodel = \"auto\"\ntarget = \"gpt-4.1\"\nregex = \"(unclosed\"\n";
    let (code, text) = check(&bad_regex);
    assert_eq!(code, Some(2), "{text}");
    // FILE:LINE: key: what is wrong.
    let line =
        text.split("sheepdog.toml:").nth(1).and_then(|r| r.split(':').next()).and_then(|n| n.parse::<u32>().ok());
    assert!(line.is_some_and(|n| n > 1) && text.contains("routes[0].regex") && text.contains("unclosed"), "{text}");
    let bad_target = base + "\n[[routes]]\nname = \"r\"\nmodel = \"auto\"\ntarget = \"nope\"\n";
    let (code, text) = check(&bad_target);
    assert_eq!(code, Some(2), "{text}");
    assert!(text.contains("routes[0].target") && text.contains("nope"), "{text}");
}
