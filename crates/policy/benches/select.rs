//! Benchmarks `Balancer::pick` for every strategy with 3 and 100 candidates, and
//! checks first that picks allocate nothing (a counting global allocator).

use std::alloc::{GlobalAlloc, Layout, System};
use std::hint::black_box;
use std::sync::atomic::{AtomicUsize, Ordering};

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use rand::rngs::SmallRng;
use rand::SeedableRng;
use sheepdog_policy::balance::{Balancer, Candidate, Strategy, Tier};

/// Counts allocations so the bench can prove a pick allocates nothing.
struct Counting;

static ALLOCATIONS: AtomicUsize = AtomicUsize::new(0);

// SAFETY: defers every call to the system allocator unchanged; only counts.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: same contract as the caller's.
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: same contract as the caller's.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

/// `n` candidates with varied weights, priorities and latencies; one in ten
/// degraded so the tier scan has work to do.
fn candidates(n: usize) -> Vec<Candidate> {
    (0..n)
        .map(|i| Candidate {
            weight: 1 + (i as u32 % 5),
            priority: (i % 3) as i32,
            latency_ewma_ms: 20.0 + (i * 37 % 200) as f64,
            tier: if i % 10 == 9 { Tier::Degraded } else { Tier::Healthy },
            slow_start: if i % 7 == 0 { 0.5 } else { 1.0 },
        })
        .collect()
}

/// Vetoes one endpoint, as failover does after a first attempt.
fn allowed(i: usize) -> bool {
    i != 1
}

fn assert_no_allocation() {
    for n in [3, 100] {
        let cands = candidates(n);
        for s in Strategy::ALL {
            let b = Balancer::new(s, n);
            let mut rng = SmallRng::seed_from_u64(1);
            let before = ALLOCATIONS.load(Ordering::Relaxed);
            for _ in 0..10_000 {
                black_box(b.pick(black_box(&cands), allowed, &mut rng));
            }
            let allocs = ALLOCATIONS.load(Ordering::Relaxed) - before;
            assert_eq!(allocs, 0, "{s} with {n} candidates allocated {allocs} times");
        }
    }
    eprintln!("select: 10,000 picks per strategy and size allocated nothing");
}

fn bench_pick(c: &mut Criterion) {
    assert_no_allocation();
    let mut group = c.benchmark_group("pick");
    for n in [3, 100] {
        let cands = candidates(n);
        for s in Strategy::ALL {
            let b = Balancer::new(s, n);
            let mut rng = SmallRng::seed_from_u64(42);
            group.bench_with_input(BenchmarkId::new(s.as_str(), n), &cands, |bench, cands| {
                bench.iter(|| b.pick(black_box(cands), allowed, &mut rng))
            });
        }
    }
    group.finish();
}

criterion_group!(benches, bench_pick);
criterion_main!(benches);
