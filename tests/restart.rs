//! State across restarts: a graceful shutdown saves every pair's breaker and history and the manual drains
//! beside the request log; the next start takes them back, so its first requests do not go to an endpoint that
//! was down a second ago. A corrupt or foreign state file is ignored with a warning.

mod common;

use std::time::Duration;

use common::*;

const ADMIN: &str = "adm-restart-key";

fn restart_config(bad: &Proc, good: &Proc, spare: &Proc) -> String {
    format!(
        "[server]\nadmin_key = \"{ADMIN}\"\n\n\
         [health]\ninterval = \"1h\"\nidle_interval = \"1h\"\n\n\
         [breaker]\nfailure_threshold = 3\nrecovery_timeout = \"30s\"\n\n\
         [[endpoints]]\nname = \"bad\"\nbase_url = \"http://{}/v1\"\npriority = 0\nmodels = [\"gpt-4.1\"]\n\n\
         [[endpoints]]\nname = \"spare\"\nbase_url = \"http://{}/v1\"\npriority = 1\nmodels = [\"gpt-4.1\"]\n\n\
         [[endpoints]]\nname = \"good\"\nbase_url = \"http://{}/v1\"\npriority = 2\nmodels = [\"gpt-4.1\"]\n\n{}",
        bad.addr,
        spare.addr,
        good.addr,
        model("gpt-4.1", "strategy = \"priority\"")
    )
}

fn serve(dir: &std::path::Path) -> Gateway {
    let path = dir.join("sheepdog.toml");
    let p = path.to_str().unwrap().to_string();
    let proc = Proc::spawn(&["serve", "--config", &p, "--listen", "127.0.0.1:0"], &[], "sheepdog listening on ");
    // `Gateway` owns a temp dir; this one belongs to the test, so give each run an empty one of its own.
    Gateway { proc, dir: tempfile::tempdir().unwrap() }
}

/// Wait (with a deadline) for `needle` in the process's stderr, which a reader thread collects.
async fn logged(proc: &Proc, needle: &str) {
    let what = format!("{needle:?} in the log");
    eventually(Duration::from_secs(10), &what, || async { proc.stderr().contains(needle) }).await;
}

async fn endpoint_enabled(gw: &Gateway, name: &str) -> bool {
    let s = get(&gw.url("/status")).await.json();
    s["endpoints"].as_array().unwrap().iter().find(|e| e["name"] == name).unwrap()["enabled"].as_bool().unwrap()
}

#[tokio::test]
async fn an_open_breaker_and_a_drain_survive_a_graceful_restart() {
    let (bad, good, spare) = (mock("bad", "gpt-4.1", &[]), mock("good", "gpt-4.1", &[]), mock("spare", "gpt-4.1", &[]));
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("sheepdog.toml"), restart_config(&bad, &good, &spare)).unwrap();
    let state = dir.path().join("sheepdog.state");

    // First run, probing every 200 ms: `bad` fails its probes until its breaker opens (live traffic avoids it
    // after its first failure); `spare` is drained by hand.
    let config = dir.path().join("sheepdog.toml");
    let text = std::fs::read_to_string(&config).unwrap();
    std::fs::write(&config, text.replacen("interval = \"1h\"", "interval = \"200ms\"", 1)).unwrap();
    let mut first = serve(dir.path());
    let url = first.url("/v1/chat/completions");
    let drained = request(
        "POST",
        &first.url("/admin/endpoints/spare/disable"),
        &[("authorization", &format!("Bearer {ADMIN}"))],
        "",
    )
    .await;
    assert_eq!(drained.status, 200, "{}", drained.text());
    faults(&bad, r#"{"mode":"error_500"}"#).await;
    eventually(Duration::from_secs(20), "bad's breaker opens", || async {
        let r = post(&url, &chat("gpt-4.1")).await;
        assert_eq!(r.status, 200, "failed over: {}", r.text());
        pair_status(&first, "bad", "gpt-4.1").await["breaker"] == "open"
    })
    .await;
    first.proc.signal("TERM");
    assert!(wait_exit(&mut first.proc, Duration::from_secs(20)).success());
    let saved = std::fs::read_to_string(&state).expect("the state file is written at shutdown");
    assert!(saved.contains("\"open\""), "{saved}");
    logged(&first.proc, "health state saved").await;

    // `bad` answers again, but it was down a second ago: the second run keeps away from it until its recovery
    // time has passed, and keeps `spare` drained.
    faults(&bad, r#"{"mode":"ok"}"#).await;
    std::fs::write(&config, text).unwrap();
    let before = mock_stats(&bad).await["requests"].as_u64().unwrap();
    let spare_before = mock_stats(&spare).await["requests"].as_u64().unwrap();
    let second = serve(dir.path());
    logged(&second.proc, "health state from before the restart restored").await;
    let st = pair_status(&second, "bad", "gpt-4.1").await;
    assert_eq!(st["breaker"], "open", "{st}");
    assert!(st["checks"].as_u64().unwrap() >= 3, "the history came back too: {st}");
    assert!(!endpoint_enabled(&second, "spare").await);
    let url = second.url("/v1/chat/completions");
    for _ in 0..10 {
        let r = post(&url, &chat("gpt-4.1")).await;
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(r.header("x-sheepdog-endpoint").as_deref(), Some("good"));
        assert_eq!(r.header("x-sheepdog-attempts").as_deref(), Some("1"), "no attempt went to bad");
    }
    assert_eq!(mock_stats(&bad).await["requests"].as_u64().unwrap(), before, "nothing reached bad after the restart");
    // A drained endpoint is still probed (its start probe), but takes no traffic.
    assert!(mock_stats(&spare).await["requests"].as_u64().unwrap() <= spare_before + 1, "spare took no traffic");
}

#[tokio::test]
async fn a_corrupt_or_foreign_state_file_is_ignored_with_a_warning() {
    let (bad, good, spare) = (mock("bad", "gpt-4.1", &[]), mock("good", "gpt-4.1", &[]), mock("spare", "gpt-4.1", &[]));
    for (text, why) in [
        ("{\"format\": \"sheepdog-state\", \"vers", "not a sheepdog state file"),
        (r#"{"format":"sheepdog-state","version":99,"saved_unix_ms":0,"endpoints":[],"pairs":[]}"#, "version 99"),
        (
            r#"{"format":"sheepdog-state","version":1,"saved_unix_ms":1000,"endpoints":[],"pairs":[]}"#,
            "more than an hour",
        ),
    ] {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("sheepdog.toml"), restart_config(&bad, &good, &spare)).unwrap();
        std::fs::write(dir.path().join("sheepdog.state"), text).unwrap();
        let gw = serve(dir.path());
        let r = post(&gw.url("/v1/chat/completions"), &chat("gpt-4.1")).await;
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(r.header("x-sheepdog-endpoint").as_deref(), Some("bad"), "nothing was restored");
        logged(&gw.proc, "health state from before the restart ignored").await;
        logged(&gw.proc, why).await;
    }
}
