//! Fuzz target `answer`: the invariants are in `fuzz/checks.rs`, shared with the corpus replay
//! (`tests/fuzz_corpus.rs`), so a crash found here is a regression test there.
#![no_main]

#[path = "../checks.rs"]
mod checks;

libfuzzer_sys::fuzz_target!(|data: &[u8]| checks::answer(data));
