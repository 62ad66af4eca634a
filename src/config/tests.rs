//! Tests of the config loader: defaults, interpolation, every error with its key and line.

use super::*;

fn env(name: &str) -> Option<String> {
    match name {
        "PRIMARY_KEY" => Some("  sk-primary \n".into()),
        "EMPTY" => Some("   ".into()),
        "HOST" => Some("127.0.0.1".into()),
        _ => None,
    }
}

const GOOD: &str = r#"
[server]
listen = "127.0.0.1:9090"

[health]
interval = "2s"

[[endpoints]]
name = "primary"
base_url = "http://${HOST}:19001/v1/"
api_keys = ["${PRIMARY_KEY}"]
weight = 3
models = { "gpt-4.1" = "openai/gpt-4.1" }

[[models]]
name = "gpt-4.1"
input_usd_per_mtok = 2.0
output_usd_per_mtok = 8.0
"#;

fn parse_err(text: &str) -> ConfigError {
    match parse(text, "t.toml", &env) {
        Ok(_) => panic!("expected an error"),
        Err(e) => e,
    }
}

#[test]
fn good_config_interpolates_trims_and_defaults() {
    let c = parse(GOOD, "t.toml", &env).unwrap();
    assert_eq!(c.server.listen, "127.0.0.1:9090");
    assert_eq!(c.health.interval, Duration::from_secs(2));
    assert_eq!(c.health.idle_interval, Duration::from_secs(30));
    assert_eq!(c.breaker.failure_threshold, 3);
    assert_eq!(c.retry.max_attempts, 3);
    let e = &c.endpoints[0];
    assert_eq!(e.base_url, "http://127.0.0.1:19001/v1");
    assert_eq!(e.api_keys[0].expose(), "sk-primary");
    assert_eq!(e.models, vec![("gpt-4.1".to_string(), "openai/gpt-4.1".to_string())]);
    assert_eq!(c.server.max_body_bytes, 8 << 20);
    assert_eq!((c.server.max_header_bytes, c.server.max_connections), (64 << 10, 0));
    assert!(!format!("{c:?}").contains("sk-primary"), "Debug must not show keys");
}

#[test]
fn unknown_key_names_key_and_line() {
    let e = parse_err(&GOOD.replace("weight = 3", "weight = 3\nwieght = 4"));
    assert_eq!(e.line, Some(13), "{e}");
    assert!(e.message.contains("wieght"), "{e}");
}

#[test]
fn unset_variable_is_named_with_line() {
    let e = parse_err(&GOOD.replace("${PRIMARY_KEY}", "${NOPE}"));
    assert_eq!(e.line, Some(11));
    assert_eq!(e.key, "endpoints[0].api_keys[0]");
    assert!(e.message.contains("NOPE"), "{e}");
}

#[test]
fn empty_key_after_trim() {
    let e = parse_err(&GOOD.replace("${PRIMARY_KEY}", "${EMPTY}"));
    assert_eq!(e.line, Some(11));
    assert!(e.message.contains("empty"), "{e}");
}

#[test]
fn bad_duration() {
    let e = parse_err(&GOOD.replace("\"2s\"", "\"2 parsecs\""));
    assert_eq!((e.line, e.key.as_str()), (Some(6), "health.interval"));
    assert!(e.to_string().starts_with("t.toml:6: health.interval: invalid duration"), "{e}");
}

#[test]
fn endpoint_without_models() {
    let e = parse_err(&GOOD.replace("models = { \"gpt-4.1\" = \"openai/gpt-4.1\" }", "models = []"));
    assert_eq!((e.line, e.key.as_str()), (Some(13), "endpoints[0].models"));
}

#[test]
fn model_without_pricing() {
    let e = parse_err(&GOOD.replace("output_usd_per_mtok = 8.0\n", ""));
    assert_eq!(e.line, Some(16));
    assert!(e.message.contains("output_usd_per_mtok"), "{e}");
    let e = parse_err(&GOOD.replace("name = \"gpt-4.1\"", "name = \"gpt-5\""));
    assert!(e.message.contains("no [[models]] entry"), "{e}");
    assert_eq!(e.line, Some(13));
}

#[test]
fn duplicate_names() {
    let dup = GOOD.replace(
        "[[models]]",
        "[[endpoints]]\nname = \"primary\"\nbase_url = \"http://x/v1\"\nmodels = [\"gpt-4.1\"]\n\n[[models]]",
    );
    let e = parse_err(&dup);
    assert_eq!((e.line, e.key.as_str()), (Some(16), "endpoints[1].name"));
    let dup = format!("{GOOD}\n[[models]]\nname = \"gpt-4.1\"\ninput_usd_per_mtok = 1.0\noutput_usd_per_mtok = 1.0\n");
    let e = parse_err(&dup);
    assert_eq!((e.line, e.key.as_str()), (Some(21), "models[1].name"));
}

#[test]
fn syntax_error_has_line() {
    let e = parse_err("[server\nlisten = 1");
    assert_eq!(e.line, Some(1));
    let e = parse_err(&GOOD.replace("weight = 3", "weight = \"three\""));
    assert_eq!(e.line, Some(12));
}

#[test]
fn unknown_strategy_and_fallback() {
    let e = parse_err(&GOOD.replace("output_usd_per_mtok = 8.0", "output_usd_per_mtok = 8.0\nstrategy = \"fastest\""));
    assert_eq!((e.line, e.key.as_str()), (Some(19), "models[0].strategy"));
    let e = parse_err(&GOOD.replace("output_usd_per_mtok = 8.0", "output_usd_per_mtok = 8.0\nfallbacks = [\"nope\"]"));
    assert_eq!((e.line, e.key.as_str()), (Some(19), "models[0].fallbacks"));
}

#[test]
fn interpolation_rules() {
    assert_eq!(interpolate("a${HOST}b${HOST}", &env).unwrap(), "a127.0.0.1b127.0.0.1");
    assert!(interpolate("${HOST", &env).is_err());
    assert!(interpolate("${}", &env).is_err());
    assert_eq!(interpolate("no vars $HOST", &env).unwrap(), "no vars $HOST");
}

#[test]
fn embedded_demo_is_valid() {
    let text =
        sheepdog_mock::demo::config_toml("http://127.0.0.1:1/v1", "http://127.0.0.1:2/v1", "http://127.0.0.1:3/v1");
    let c = parse(&text, "<embedded demo>", &env).unwrap();
    assert_eq!(c.endpoints.len(), 3);
    assert_eq!(c.models.len(), 5);
}

#[test]
fn request_log_settings() {
    let c = parse(GOOD, "t.toml", &env).unwrap();
    assert_eq!(
        c.log,
        LogConfig {
            enabled: true,
            path: "sheepdog.db".into(),
            retention: Duration::from_secs(7 * 86_400),
            url: None,
            bodies: false,
            queue_capacity: 65_536,
        }
    );
    let c = parse(
        &format!("[log]\nenabled = false\npath = \"logs/${{HOST}}.db\"\nretention = \"0\"\n{GOOD}"),
        "t.toml",
        &env,
    )
    .unwrap();
    assert_eq!(
        c.log,
        LogConfig {
            enabled: false,
            path: "logs/127.0.0.1.db".into(),
            retention: Duration::ZERO,
            url: None,
            bodies: false,
            queue_capacity: 65_536,
        }
    );
    let e = parse_err(&format!("[log]\npath = \"\"\n{GOOD}"));
    assert_eq!((e.line, e.key.as_str()), (Some(2), "log.path"), "{e}");
    let e = parse_err(&format!("[log]\nretention = \"a week\"\n{GOOD}"));
    assert_eq!((e.line, e.key.as_str()), (Some(2), "log.retention"), "{e}");
}

#[test]
fn a_relative_log_path_is_taken_from_the_config_files_directory() {
    let dir = tempfile::tempdir().unwrap();
    let text = GOOD.replace("${HOST}", "127.0.0.1").replace("${PRIMARY_KEY}", "sk-1");
    std::fs::write(dir.path().join("a.toml"), &text).unwrap();
    std::fs::write(dir.path().join("b.toml"), format!("[log]\npath = \"/var/tmp/x.db\"\n{text}")).unwrap();
    assert_eq!(load_file(&dir.path().join("a.toml")).unwrap().log.path, dir.path().join("sheepdog.db"));
    assert_eq!(load_file(&dir.path().join("b.toml")).unwrap().log.path, PathBuf::from("/var/tmp/x.db"));
}

#[test]
fn cached_prices_and_relay_multipliers() {
    let c = parse(
        &GOOD
            .replace("output_usd_per_mtok = 8.0", "output_usd_per_mtok = 8.0\ncached_input_usd_per_mtok = 0.5")
            .replace("weight = 3", "weight = 3\nprice_multiplier = 0.15"),
        "t.toml",
        &env,
    )
    .unwrap();
    assert_eq!(c.models[0].cached_input_usd_per_mtok, Some(0.5));
    assert_eq!(c.endpoints[0].price_multiplier, 0.15);
    let c = parse(GOOD, "t.toml", &env).unwrap();
    assert_eq!((c.models[0].cached_input_usd_per_mtok, c.endpoints[0].price_multiplier), (None, 1.0));
    let e = parse_err(&GOOD.replace("weight = 3", "weight = 3\nprice_multiplier = -1"));
    assert_eq!((e.key.as_str(), e.line), ("endpoints[0].price_multiplier", Some(13)), "{e}");
    let e = parse_err(
        &GOOD.replace("output_usd_per_mtok = 8.0", "output_usd_per_mtok = 8.0\ncached_input_usd_per_mtok = -2"),
    );
    assert_eq!(e.key, "models[0].cached_input_usd_per_mtok", "{e}");
}
