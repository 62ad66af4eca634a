//! Benchmarks the per-request policy decisions of the admit and route phases: an alias of 50 routing rules
//! (49 regex / keyword rules that do not match a ~1 KB message, then the default; and a match on the first
//! rule), a client's rpm + tpm admission and settlement, and a budget's reservation and settlement.

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion};
use sheepdog_policy::budget::{Ledger, Period, Thresholds};
use sheepdog_policy::pricing::Nanos;
use sheepdog_policy::ratelimit::Limits;
use sheepdog_policy::routing::{Request, Router, RuleSpec};

struct Req(String);

impl Request for Req {
    fn last_user_text(&self) -> &str {
        &self.0
    }
    fn has_tools(&self) -> bool {
        false
    }
    fn header(&self, _: &str) -> Option<&str> {
        None
    }
    fn metadata(&self, _: &str) -> Option<&str> {
        None
    }
}

fn rules() -> Router {
    let mut specs: Vec<RuleSpec> = (0..49)
        .map(|i| {
            let mut r = RuleSpec { name: format!("rule{i}"), ..RuleSpec::default() };
            if i % 2 == 1 {
                r.keywords = vec![format!("refund{i}"), format!("invoice{i}")];
            } else {
                r.regex = Some(format!(r"(?i)\bticket-{i}\b"));
            }
            r
        })
        .collect();
    specs.push(RuleSpec { name: "rest".into(), default: true, ..RuleSpec::default() });
    Router::new(specs).expect("rules compile")
}

fn bench(c: &mut Criterion) {
    let router = rules();
    let text = "Summarise the following text in one sentence: ".to_string() + &"lorem ipsum dolor sit amet ".repeat(36);
    let miss = Req(text.clone());
    let hit = Req(text + " ticket-0");
    let words = |t: &str| t.split_whitespace().count() as u64;
    assert_eq!(router.pick(&miss, words).map(|r| r.name.as_str()), Some("rest"));
    assert_eq!(router.pick(&hit, words).map(|r| r.name.as_str()), Some("rule0"));
    c.bench_function("route/50 rules, 1 KB, default", |b| b.iter(|| black_box(router.pick(black_box(&miss), words))));
    c.bench_function("route/50 rules, 1 KB, first rule", |b| b.iter(|| black_box(router.pick(black_box(&hit), words))));

    let mut limits = Limits::new(Some(1_000_000_000), Some(1_000_000_000_000), 0);
    let mut now = 0u64;
    c.bench_function("ratelimit/admit + settle (rpm and tpm)", |b| {
        b.iter(|| {
            now += 1;
            limits.admit(black_box(400), now).expect("room");
            limits.settle(400, black_box(300), now);
        })
    });

    let t = Thresholds { warn: Some(Nanos::from_usd(400.0)), downgrade: None, limit: Some(Nanos::from_usd(1e9)) };
    let mut ledger = Ledger::new(Period::Day, 1_764_806_400_000);
    c.bench_function("budget/admit + settle", |b| {
        b.iter(|| {
            let d = ledger.admit(&t, black_box(Nanos(1_000)), false, 1_764_806_400_001);
            black_box(d);
            black_box(ledger.settle(&t, Nanos(1_000), Nanos(900), 1_764_806_400_001));
        })
    });
}

criterion_group!(benches, bench);
criterion_main!(benches);
