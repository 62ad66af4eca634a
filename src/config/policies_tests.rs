//! Tests of `[[budgets]]`, `[[routes]]`, `[[clients]]`, `[state]` and the new `[server]` / `[log]` keys.

use std::time::Duration;

use super::*;
use crate::config::parse;

const BASE: &str = r#"
[[endpoints]]
name = "a"
base_url = "http://127.0.0.1:1/v1"
models = ["gpt-4.1", "deepseek-v3.2"]

[[models]]
name = "gpt-4.1"
input_usd_per_mtok = 2.0
output_usd_per_mtok = 8.0

[[models]]
name = "deepseek-v3.2"
input_usd_per_mtok = 0.28
output_usd_per_mtok = 0.42
"#;

const HASH: &str = "sha256:9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08";

fn env(_: &str) -> Option<String> {
    None
}

fn ok(extra: &str) -> Config {
    let text = format!("{BASE}{extra}");
    parse(&text, "t.toml", &env).unwrap_or_else(|e| panic!("{e}"))
}

fn err(extra: &str) -> ConfigError {
    let text = format!("{BASE}{extra}");
    match parse(&text, "t.toml", &env) {
        Ok(_) => panic!("expected an error for {extra}"),
        Err(e) => e,
    }
}

fn line_of(extra: &str, needle: &str) -> usize {
    let text = format!("{BASE}{extra}");
    text[..text.find(needle).unwrap()].matches('\n').count() + 1
}

#[test]
fn defaults_of_the_new_keys() {
    let c = ok("");
    assert!(!c.server.allow_anonymous);
    assert_eq!(c.server.client_timeout, Duration::from_secs(30));
    assert_eq!(c.server.max_concurrent_requests, 10_000);
    assert_eq!(c.server.max_stream_duration, Duration::from_secs(1800));
    assert_eq!((c.log.url.as_ref(), c.log.bodies), (None, false));
    assert_eq!(c.state, StateConfig::default());
    assert!(c.budgets.is_empty() && c.routes.is_empty() && c.clients.is_empty());
}

#[test]
fn the_five_line_budget() {
    let c = ok("[[budgets]]\nname = \"daily\"\nwarn_usd = 400\ndowngrade_usd = 480\ndowngrade_to = \"deepseek-v3.2\"\nlimit_usd = 500\n");
    let b = &c.budgets[0];
    assert_eq!((b.name.as_str(), b.period), ("daily", Period::Day));
    assert_eq!((b.warn_usd, b.downgrade_usd, b.limit_usd), (Some(400.0), Some(480.0), Some(500.0)));
    assert_eq!(b.downgrade_to.as_deref(), Some("deepseek-v3.2"));
}

#[test]
fn budget_errors_name_key_and_line() {
    let x = "[[budgets]]\nname = \"b\"\nperiod = \"week\"\nlimit_usd = 1\n";
    let e = err(x);
    assert_eq!((e.key.as_str(), e.line), ("budgets[0].period", Some(line_of(x, "period"))), "{e}");
    let x = "[[budgets]]\nname = \"b\"\ndowngrade_usd = 1\ndowngrade_to = \"nope\"\n";
    let e = err(x);
    assert_eq!((e.key.as_str(), e.line), ("budgets[0].downgrade_to", Some(line_of(x, "downgrade_to"))), "{e}");
    assert!(err("[[budgets]]\nname = \"b\"\ndowngrade_usd = 1\n").message.contains("go together"));
    assert!(err("[[budgets]]\nname = \"b\"\n").message.contains("no threshold"));
    assert!(err("[[budgets]]\nname = \"b\"\nwarn_usd = 5\nlimit_usd = 1\n").message.contains("in order"));
    assert!(err("[[budgets]]\nname = \"b\"\nlimit_usd = -1\n").message.contains("non-negative"));
    assert!(err("[[budgets]]\nname = \"b\"\nlimit_usd = 1\nclients = [\"x\"]\n").message.contains("unknown client"));
    assert!(err("[[budgets]]\nname = \"b\"\nlimit_usd = 1\n[[budgets]]\nname = \"b\"\nlimit_usd = 2\n")
        .message
        .contains("duplicate"));
}

#[test]
fn routes_with_every_condition() {
    let c = ok(r#"
[[routes]]
name = "code"
model = "auto"
target = "deepseek-v3.2"
regex = "(?i)python|rust"
keywords = ["refund"]
min_prompt_tokens = 1
max_prompt_tokens = 2000
has_code = true
has_tools = false
headers = { "X-Team" = "search" }
metadata = { "tier" = "free" }

[[routes]]
name = "rest"
model = "auto"
target = "gpt-4.1"
default = true
"#);
    let r = &c.routes[0];
    assert_eq!(
        (r.model.as_str(), r.target.as_str(), r.regex.as_deref()),
        ("auto", "deepseek-v3.2", Some("(?i)python|rust"))
    );
    assert_eq!(
        (r.min_prompt_tokens, r.max_prompt_tokens, r.has_code, r.has_tools),
        (Some(1), Some(2000), Some(true), Some(false))
    );
    assert_eq!(r.headers, vec![("x-team".to_string(), "search".to_string())]);
    assert_eq!(r.metadata, vec![("tier".to_string(), "free".to_string())]);
    assert!(c.routes[1].default && !r.default);
    assert_eq!(c.aliases(), vec!["auto"]);
}

#[test]
fn route_errors_name_key_and_line() {
    let x = "[[routes]]\nname = \"r\"\nmodel = \"auto\"\ntarget = \"gpt-4.1\"\nregex = \"(unclosed\"\n";
    let e = err(x);
    assert_eq!((e.key.as_str(), e.line), ("routes[0].regex", Some(line_of(x, "regex"))), "{e}");
    assert!(e.message.contains("does not compile"), "{e}");
    let x = "[[routes]]\nname = \"r\"\nmodel = \"auto\"\ntarget = \"gpt-5\"\n";
    let e = err(x);
    assert_eq!((e.key.as_str(), e.line), ("routes[0].target", Some(line_of(x, "target"))), "{e}");
    assert!(e.message.contains("unknown model \"gpt-5\""), "{e}");
    assert!(err("[[routes]]\nname = \"r\"\nmodel = \"gpt-4.1\"\ntarget = \"gpt-4.1\"\n")
        .message
        .contains("alias of its own"));
    let two = "[[routes]]\nname = \"a\"\nmodel = \"auto\"\ntarget = \"gpt-4.1\"\ndefault = true\n";
    assert!(err(&format!("{two}{}", two.replace("\"a\"", "\"b\""))).message.contains("already has a default"));
    assert!(err("[[routes]]\nname = \"r\"\nmodel = \"auto\"\ntarget = \"gpt-4.1\"\nkeywords = [\"\"]\n")
        .message
        .contains("empty keyword"));
}

#[test]
fn clients_and_their_models() {
    let c = ok(&format!(
        "[[routes]]\nname = \"r\"\nmodel = \"auto\"\ntarget = \"gpt-4.1\"\ndefault = true\n\
         [[clients]]\nname = \"web-app\"\nkey_hash = \"{HASH}\"\nmodels = [\"gpt-4.1\", \"auto\"]\nrpm = 600\ntpm = 200000\nmax_parallel = 50\n"
    ));
    let cl = &c.clients[0];
    assert_eq!(cl.name, "web-app");
    assert_eq!(Some(cl.key_hash), parse_key_hash(HASH));
    assert_eq!(cl.models.as_deref(), Some(&["gpt-4.1".to_string(), "auto".to_string()][..]));
    assert_eq!((cl.rpm, cl.tpm, cl.max_parallel), (Some(600), Some(200_000), Some(50)));
    let x = "[[clients]]\nname = \"w\"\nkey_hash = \"md5:abc\"\n";
    let e = err(x);
    assert_eq!((e.key.as_str(), e.line), ("clients[0].key_hash", Some(line_of(x, "key_hash"))), "{e}");
    assert!(err("[[clients]]\nname = \"w\"\n").message.contains("sheepdog key new"));
    let e = err(&format!("[[clients]]\nname = \"w\"\nkey_hash = \"{HASH}\"\nmodels = [\"auto\"]\n"));
    assert!(e.message.contains("unknown model \"auto\""), "{e}");
    let dup =
        format!("[[clients]]\nname = \"a\"\nkey_hash = \"{HASH}\"\n[[clients]]\nname = \"b\"\nkey_hash = \"{HASH}\"\n");
    assert!(err(&dup).message.contains("same key"));
    assert!(err(&format!("[[clients]]\nname = \"a\"\nkey_hash = \"{HASH}\"\nrpm = 0\n")).message.contains("between 1"));
}

#[test]
fn server_log_and_state_keys() {
    let c = ok("[server]\nallow_anonymous = true\nclient_timeout = \"5s\"\nmax_concurrent_requests = 7\nmax_stream_duration = \"1m\"\n\
               [log]\nurl = \"postgres://127.0.0.1:5432/test\"\nbodies = true\n[state]\nbackend = \"redis\"\nredis_url = \"redis://10.0.0.1:6379\"\n");
    assert!(c.server.allow_anonymous);
    assert_eq!((c.server.client_timeout, c.server.max_concurrent_requests), (Duration::from_secs(5), 7));
    assert_eq!(c.server.max_stream_duration, Duration::from_secs(60));
    assert_eq!((c.log.url.as_ref().map(|u| u.expose()), c.log.bodies), (Some("postgres://127.0.0.1:5432/test"), true));
    assert_eq!((c.state.backend, c.state.redis_url.as_str()), (StateBackend::Redis, "redis://10.0.0.1:6379"));
    assert_eq!(err("[log]\nurl = \"mysql://x\"\n").key, "log.url");
    let both = err("[log]\npath = \"a.db\"\nurl = \"postgres://x/y\"\n");
    assert!(both.message.contains("either") && both.line.is_some(), "{both:?}");
    let secret = err("[log]\nurl = \"postgres://u:hunter2@db:notaport/x\"\n");
    assert_eq!(secret.key, "log.url");
    assert!(!secret.to_string().contains("hunter2"), "{secret}");
    assert_eq!(ok("[log]\nqueue_capacity = 10\n").log.queue_capacity, 10);
    assert_eq!(ok("").log.queue_capacity, crate::config::DEFAULT_LOG_QUEUE_CAPACITY);
    assert_eq!(err("[log]\nqueue_capacity = 0\n").key, "log.queue_capacity");
    assert_eq!(err("[state]\nbackend = \"etcd\"\n").key, "state.backend");
    assert_eq!(err("[state]\nredis_url = \"http://x\"\n").key, "state.redis_url");
    assert_eq!(err("[server]\nclient_timeout = \"0s\"\n").key, "server.client_timeout");
    assert_eq!((c.state.key_prefix.as_str(), c.state.timeout), ("sheepdog", Duration::from_millis(100)));
    let s = ok("[state]\nbackend = \"redis\"\nkey_prefix = \"fleet-a\"\ntimeout = \"50ms\"\n").state;
    assert_eq!((s.key_prefix.as_str(), s.timeout), ("fleet-a", Duration::from_millis(50)));
    assert_eq!(err("[state]\nkey_prefix = \"a b\"\n").key, "state.key_prefix");
    assert_eq!(err("[state]\ntimeout = \"0s\"\n").key, "state.timeout");
}

#[test]
fn key_hash_parsing() {
    assert!(parse_key_hash(HASH).is_some());
    assert!(parse_key_hash(&HASH.to_uppercase().replace("SHA256:", "sha256:")).is_some());
    assert!(parse_key_hash("sha256:zz").is_none());
    assert!(parse_key_hash(&HASH.replace("sha256:", "")).is_none());
    assert!(parse_key_hash(&format!("{HASH}0")).is_none());
}
