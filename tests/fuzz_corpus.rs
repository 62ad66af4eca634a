//! Replays the fuzzers' inputs in the normal test run: every file under `fuzz/regressions/<target>/` (inputs
//! that once broke an invariant, kept after the fix) and `fuzz/seeds/<target>/` goes through the same check
//! as the fuzz target (`fuzz/checks.rs`). Fuzzing itself runs with `cargo fuzz` (see `fuzz/README.md`).

#[path = "../fuzz/checks.rs"]
mod checks;

use std::path::Path;

fn replay(target: &str, check: fn(&[u8])) {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz");
    let mut n = 0;
    for dir in ["regressions", "seeds"] {
        let Ok(entries) = std::fs::read_dir(root.join(dir).join(target)) else { continue };
        let mut files: Vec<_> = entries.map(|e| e.unwrap().path()).collect();
        files.sort();
        for f in files {
            let data = std::fs::read(&f).unwrap();
            let r = std::panic::catch_unwind(|| check(&data));
            assert!(r.is_ok(), "{target}: {} breaks an invariant", f.display());
            n += 1;
        }
    }
    assert!(n > 0, "no inputs for {target}");
}

#[test]
fn request() {
    replay("request", checks::request);
}

#[test]
fn sse() {
    replay("sse", checks::sse);
}

#[test]
fn answer() {
    replay("answer", checks::answer);
}

#[test]
fn config() {
    replay("config", checks::config);
}
