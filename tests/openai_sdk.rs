//! The official `openai` Python SDK as a client (installed into .venv by scripts/test).

mod common;

use std::path::PathBuf;

use common::*;

fn python() -> PathBuf {
    if let Ok(p) = std::env::var("SHEEPDOG_PYTHON") {
        return PathBuf::from(p);
    }
    let venv = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(".venv/bin/python");
    assert!(venv.exists(), "no Python with the openai SDK: run scripts/test (it creates .venv) or set SHEEPDOG_PYTHON");
    venv
}

#[tokio::test]
async fn official_openai_sdk_talks_to_sheepdog() {
    let m = mock("alpha", "gpt-4.1,text-embedding-3-small", &["--tokens-per-sec", "200"]);
    let cfg = config(
        &[("alpha", m.addr, "models = [\"gpt-4.1\", \"text-embedding-3-small\"]")],
        &(model("gpt-4.1", "") + &model("text-embedding-3-small", "kind = \"embeddings\"")),
        "",
    );
    let gw = gateway(&cfg, &[]);
    let expected = sheepdog_mock::answer_pieces("alpha", "gpt-4.1", None).concat();
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/sdk/test_openai_sdk.py");
    // The gateway and the mock are other processes, so blocking this test's thread is fine.
    let out = std::process::Command::new(python())
        .arg(script)
        .env("SHEEPDOG_BASE_URL", gw.url("/v1"))
        .env("EXPECTED_ANSWER", &expected)
        .output()
        .expect("run python");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "SDK test failed:\n{stdout}\n{stderr}");
    assert!(stdout.contains("9 passed, 0 failed"), "{stdout}");
}
