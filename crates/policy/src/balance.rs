//! Endpoint selection for one model: which endpoint serves the next attempt.
//!
//! Owns the four strategies (smooth weighted round robin, weighted random, least
//! latency by power of two choices, priority), the health tiers that come before
//! any strategy, the slow-start ramp and the latency EWMA that feeds least latency.
//!
//! **Invariant:** selection is pure and synchronous. It does no I/O, reads no clock
//! and draws randomness only from the `rng` it is given. It does not decide health,
//! breakers or retries: the caller describes each endpoint as a [`Candidate`] and
//! vetoes endpoints (already tried, breaker open, disabled) through `allowed`.
//! A pick allocates nothing, whatever the number of endpoints (the round-robin
//! state grows once if a balancer is handed more endpoints than it was sized for);
//! `benches/select.rs` checks this with a counting allocator.
//!
//! # Tiers first, then the strategy
//! Among the candidates that are allowed, only those of the best non-empty [`Tier`]
//! compete (Healthy, else Degraded, else HalfOpen; never Unavailable). So under the
//! priority strategy a healthy emergency endpoint is preferred to a degraded primary:
//! health outranks preference.

use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};

use parking_lot::Mutex;
use serde::{Deserialize, Serialize};

/// Fixed-point scale of effective weights: weight 1 at full slow start is 1000 units.
pub const WEIGHT_SCALE: u64 = 1000;

/// The least share of its weight a recovering endpoint gets from [`slow_start_factor`].
pub const SLOW_START_FLOOR: f64 = 0.1;

/// Endpoints whose `allowed` verdict is remembered on the stack during a pick;
/// beyond this index `allowed` may be called twice for the same endpoint.
const MASK_BITS: usize = 256;

/// How a model's endpoints share its traffic.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Strategy {
    /// Smooth weighted round robin, as nginx does it.
    #[default]
    WeightedRoundRobin,
    /// Random, proportional to the effective weights.
    WeightedRandom,
    /// Power of two choices on the latency EWMA.
    LeastLatency,
    /// The lowest `priority` value wins; ties share by smooth weighted round robin.
    Priority,
}

impl Strategy {
    /// Every strategy, in declaration order.
    pub const ALL: [Strategy; 4] =
        [Strategy::WeightedRoundRobin, Strategy::WeightedRandom, Strategy::LeastLatency, Strategy::Priority];

    /// The configuration name: `weighted_round_robin`, `weighted_random`,
    /// `least_latency` or `priority`.
    pub fn as_str(self) -> &'static str {
        match self {
            Strategy::WeightedRoundRobin => "weighted_round_robin",
            Strategy::WeightedRandom => "weighted_random",
            Strategy::LeastLatency => "least_latency",
            Strategy::Priority => "priority",
        }
    }
}

impl std::fmt::Display for Strategy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A strategy name that is not one of the four.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown strategy {0:?}: expected weighted_round_robin, weighted_random, least_latency or priority")]
pub struct UnknownStrategy(pub String);

impl FromStr for Strategy {
    type Err = UnknownStrategy;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Strategy::ALL.into_iter().find(|k| k.as_str() == s).ok_or_else(|| UnknownStrategy(s.to_owned()))
    }
}

/// Health tier of a candidate; ordered best first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
#[repr(u8)]
pub enum Tier {
    /// Healthy and closed: first choice.
    #[default]
    Healthy,
    /// Serving, but slow or failing sometimes.
    Degraded,
    /// Breaker half-open: only trials go there.
    HalfOpen,
    /// Never selected.
    Unavailable,
}

impl Tier {
    /// Every tier, best first (index = discriminant).
    pub const ALL: [Tier; 4] = [Tier::Healthy, Tier::Degraded, Tier::HalfOpen, Tier::Unavailable];
}

/// What the balancer needs to know about one endpoint at pick time.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Candidate {
    /// Configured weight; 0 is treated as the least effective weight (one unit).
    pub weight: u32,
    /// Lower is preferred, for [`Strategy::Priority`].
    pub priority: i32,
    /// Latency EWMA in ms; NaN or negative means unknown.
    pub latency_ewma_ms: f64,
    /// Health tier.
    pub tier: Tier,
    /// Slow-start factor on the weight, `0.0..=1.0` (NaN means 1.0).
    pub slow_start: f64,
}

impl Default for Candidate {
    /// Weight 1, priority 0, unknown latency, healthy, fully ramped.
    fn default() -> Self {
        Candidate { weight: 1, priority: 0, latency_ewma_ms: f64::NAN, tier: Tier::Healthy, slow_start: 1.0 }
    }
}

impl Candidate {
    /// A healthy, fully ramped candidate of the given weight.
    pub fn new(weight: u32) -> Self {
        Candidate { weight, ..Candidate::default() }
    }

    fn ramp(&self) -> f64 {
        if self.slow_start.is_nan() {
            1.0
        } else {
            self.slow_start.clamp(0.0, 1.0)
        }
    }

    /// `weight × slow_start` in units of 1/[`WEIGHT_SCALE`], never below one unit.
    #[inline]
    pub fn effective_weight(&self) -> u64 {
        let full = u64::from(self.weight) * WEIGHT_SCALE;
        let s = self.slow_start;
        if s >= 1.0 || s.is_nan() {
            return full.max(1);
        }
        // Below 2^43, so the i64 conversions (single instructions) are exact; `+ 0.5`
        // then the truncating cast rounds half up, and `as` maps negatives to 0.
        let scaled = (full as i64) as f64 * s.max(0.0) + 0.5;
        (scaled as i64).max(1) as u64
    }

    /// The latency cost used by least latency: the EWMA divided by the slow-start
    /// factor, so a ramping endpoint looks slower; `None` when unknown.
    fn latency_cost(&self) -> Option<f64> {
        let l = self.latency_ewma_ms;
        if l.is_nan() || l < 0.0 {
            None
        } else {
            Some(l / self.ramp().max(1.0 / WEIGHT_SCALE as f64))
        }
    }
}

/// The allowed candidates of the best tier. For the first [`MASK_BITS`] indices
/// they are kept as an exact bit set on the stack; later indices are checked again.
struct Eligible<'a, F> {
    cands: &'a [Candidate],
    allowed: F,
    tier: Tier,
    mask: [u64; MASK_BITS / 64],
}

impl<'a, F: Fn(usize) -> bool> Eligible<'a, F> {
    /// Scans once; `None` when no candidate is allowed outside Unavailable.
    fn scan(cands: &'a [Candidate], allowed: F) -> Option<Self> {
        let mut mask = [0u64; MASK_BITS / 64];
        let unavailable = Tier::Unavailable as u8;
        let mut best = unavailable;
        // Build each 64-bit word in a register and store it once: or-ing into the
        // array per candidate chains every iteration through memory.
        for (w, chunk) in cands.chunks(64).enumerate() {
            let mut word = 0u64;
            for (k, c) in chunk.iter().enumerate() {
                // A candidate worse than the best tier seen so far can never
                // compete: skip it without asking `allowed`.
                let t = c.tier as u8;
                if t > best || t == unavailable || !allowed(w * 64 + k) {
                    continue;
                }
                if t < best {
                    // Every bit set so far belongs to a worse tier.
                    mask = [0; MASK_BITS / 64];
                    word = 0;
                    best = t;
                }
                word |= 1 << k;
            }
            if let Some(slot) = mask.get_mut(w) {
                *slot = word;
            }
        }
        let tier = Tier::ALL.get(usize::from(best)).copied()?;
        (tier != Tier::Unavailable).then_some(Eligible { cands, allowed, tier, mask })
    }

    /// Visits members in index order until `f` returns true; returns that index.
    #[inline]
    fn find(&self, mut f: impl FnMut(usize, &Candidate) -> bool) -> Option<usize> {
        for (w, &word) in self.mask.iter().enumerate() {
            let mut bits = word;
            while bits != 0 {
                let i = w * 64 + bits.trailing_zeros() as usize;
                bits &= bits - 1;
                if let Some(c) = self.cands.get(i) {
                    if f(i, c) {
                        return Some(i);
                    }
                }
            }
        }
        let tail = self.cands.get(MASK_BITS..).unwrap_or_default();
        for (k, c) in tail.iter().enumerate() {
            let i = MASK_BITS + k;
            if c.tier == self.tier && (self.allowed)(i) && f(i, c) {
                return Some(i);
            }
        }
        None
    }

    /// Visits every member in index order.
    #[inline]
    fn for_each(&self, mut f: impl FnMut(usize, &Candidate)) {
        self.find(|i, c| {
            f(i, c);
            false
        });
    }

    fn count(&self) -> usize {
        let masked: u32 = self.mask.iter().map(|w| w.count_ones()).sum();
        let mut n = masked as usize;
        if self.cands.len() > MASK_BITS {
            let tail = self.cands.get(MASK_BITS..).unwrap_or_default();
            n += tail.iter().enumerate().filter(|(k, c)| c.tier == self.tier && (self.allowed)(MASK_BITS + k)).count();
        }
        n
    }

    /// The `k`-th member (0-based) in index order.
    fn nth(&self, k: usize) -> Option<usize> {
        let mut left = k;
        self.find(|_, _| {
            let hit = left == 0;
            left = left.wrapping_sub(1);
            hit
        })
    }
}

/// Endpoint selection for one model. Cheap to share: `pick` takes `&self`.
#[derive(Debug)]
pub struct Balancer {
    strategy: Strategy,
    /// Smooth WRR current weights, one per endpoint index.
    current: Mutex<Vec<i64>>,
}

impl Balancer {
    /// A balancer for `n` endpoints (it grows, allocating once, if given more).
    pub fn new(strategy: Strategy, n: usize) -> Self {
        Balancer { strategy, current: Mutex::new(vec![0; n]) }
    }

    /// The strategy this balancer applies.
    pub fn strategy(&self) -> Strategy {
        self.strategy
    }

    /// Forgets the round-robin position (for example after the endpoint set changed).
    pub fn reset(&self) {
        self.current.lock().iter_mut().for_each(|w| *w = 0);
    }

    /// Picks the next endpoint index among candidates whose `allowed(i)` is true,
    /// using only the best non-empty tier (Healthy; if none, Degraded; then
    /// HalfOpen; never Unavailable). `None` when nothing is allowed.
    ///
    /// `allowed` is called at most once per index below 256 (not at all for
    /// candidates of a worse tier than one already allowed), and may be called
    /// again for higher indices.
    pub fn pick<R: rand::Rng + ?Sized>(
        &self,
        cands: &[Candidate],
        allowed: impl Fn(usize) -> bool,
        rng: &mut R,
    ) -> Option<usize> {
        let set = Eligible::scan(cands, allowed)?;
        match self.strategy {
            Strategy::WeightedRoundRobin => self.smooth_wrr(&set, |_| true),
            Strategy::WeightedRandom => weighted_random(&set, rng),
            Strategy::LeastLatency => two_choices(&set, rng),
            Strategy::Priority => {
                let mut top = i32::MAX;
                set.for_each(|_, c| top = top.min(c.priority));
                self.smooth_wrr(&set, |c| c.priority == top)
            }
        }
    }

    /// nginx's smooth weighted round robin over the members of `set` that pass
    /// `keep`: each one's current weight grows by its effective weight, the largest
    /// wins (the first on ties) and gives back the total.
    fn smooth_wrr<F: Fn(usize) -> bool>(
        &self,
        set: &Eligible<'_, F>,
        keep: impl Fn(&Candidate) -> bool,
    ) -> Option<usize> {
        let mut current = self.current.lock();
        if current.len() < set.cands.len() {
            current.resize(set.cands.len(), 0);
        }
        let mut total: i64 = 0;
        let (mut best, mut best_weight) = (None, i64::MIN);
        set.for_each(|i, c| {
            if !keep(c) {
                return;
            }
            let Some(cur) = current.get_mut(i) else {
                return;
            };
            // Effective weights are below 2^43 and smooth WRR keeps every current
            // weight within a few totals of zero, so these sums cannot overflow;
            // wrapping keeps the loop lean and panic-free all the same.
            let w = c.effective_weight() as i64;
            *cur = cur.wrapping_add(w);
            total = total.wrapping_add(w);
            if best.is_none() || *cur > best_weight {
                best = Some(i);
                best_weight = *cur;
            }
        });
        let chosen = best?;
        if let Some(cur) = current.get_mut(chosen) {
            *cur = cur.wrapping_sub(total);
        }
        Some(chosen)
    }
}

fn weighted_random<F, R>(set: &Eligible<'_, F>, rng: &mut R) -> Option<usize>
where
    F: Fn(usize) -> bool,
    R: rand::Rng + ?Sized,
{
    let mut total: u64 = 0;
    set.for_each(|_, c| total = total.saturating_add(c.effective_weight()));
    if total == 0 {
        return None;
    }
    let mut r = rng.gen_range(0..total);
    let mut last = None;
    set.find(|i, c| {
        let w = c.effective_weight();
        last = Some(i);
        if r < w {
            return true;
        }
        r -= w;
        false
    })
    // Only missed if the weights saturated; the last member is a fair answer.
    .or(last)
}

/// Power of two choices: two distinct random members, the lower latency cost wins;
/// unknown latency wins (to explore), ties go to the first drawn.
fn two_choices<F, R>(set: &Eligible<'_, F>, rng: &mut R) -> Option<usize>
where
    F: Fn(usize) -> bool,
    R: rand::Rng + ?Sized,
{
    let n = set.count();
    if n <= 1 {
        return set.nth(0);
    }
    let a = rng.gen_range(0..n);
    let mut b = rng.gen_range(0..n - 1);
    if b >= a {
        b += 1;
    }
    let (ia, ib) = (set.nth(a)?, set.nth(b)?);
    let (ca, cb) = (set.cands.get(ia)?, set.cands.get(ib)?);
    let pick_b = match (ca.latency_cost(), cb.latency_cost()) {
        (None, _) => false,
        (Some(_), None) => true,
        (Some(la), Some(lb)) => lb < la,
    };
    Some(if pick_b { ib } else { ia })
}

/// Requests sent to an endpoint since its last answer before [`stalled`] may call it stalled.
pub const STALL_MIN_UNANSWERED: u32 = 8;

/// How many times its usual latency an endpoint must have been silent to be stalled.
pub const STALL_FACTOR: f64 = 4.0;

/// The shortest silence that may count as a stall, ms.
pub const STALL_FLOOR_MS: f64 = 20.0;

/// Whether an endpoint looks hung: at least [`STALL_MIN_UNANSWERED`] requests went to it since it last
/// answered anything, and the oldest of them has waited longer than [`STALL_FACTOR`] times its latency EWMA
/// (at least [`STALL_FLOOR_MS`]). A hung endpoint (it accepts requests and never answers) keeps receiving its
/// share of new requests until timeouts tell its breaker, seconds later; this notices within a few requests.
/// A healthy endpoint answers all the time, so a burst of requests does not stall it, not even after a quiet
/// spell; an endpoint whose latency is not known yet is never called stalled.
pub fn stalled(unanswered: u32, oldest_waiting_ms: u64, latency_ewma_ms: f64) -> bool {
    if unanswered < STALL_MIN_UNANSWERED || latency_ewma_ms.is_nan() || latency_ewma_ms < 0.0 {
        return false;
    }
    oldest_waiting_ms as f64 > (STALL_FACTOR * latency_ewma_ms).max(STALL_FLOOR_MS)
}

/// Slow-start ramp of an endpoint that recovered `since_recovered_ms` ago: a linear
/// ramp from [`SLOW_START_FLOOR`] to 1.0 over `window_ms` (1.0 when the window is 0).
pub fn slow_start_factor(since_recovered_ms: u64, window_ms: u64) -> f64 {
    if window_ms == 0 || since_recovered_ms >= window_ms {
        return 1.0;
    }
    (since_recovered_ms as f64 / window_ms as f64).max(SLOW_START_FLOOR)
}

/// Latency EWMA with time-based decay, updated lock-free from many threads.
///
/// Each sample moves the average by `alpha = 1 - exp(-elapsed / decay)`, where
/// `elapsed` is the time since the previous sample, but by at least `min_alpha`,
/// so samples arriving in the same millisecond are not lost (at rates above about
/// one sample per `decay × min_alpha`, the floor rather than time sets the memory).
/// The first sample sets the average. Concurrent updates never block; under a race
/// both samples are applied, in some order.
#[derive(Debug)]
pub struct Ewma {
    /// f64 bits of the average; NaN when no sample yet.
    value: AtomicU64,
    /// The largest `now_ms` seen.
    last_ms: AtomicU64,
    decay_ms: f64,
    min_alpha: f64,
}

impl Ewma {
    /// Decay used by [`Ewma::default`]: 10 s.
    pub const DEFAULT_DECAY_MS: u64 = 10_000;
    /// Floor of the smoothing factor used by [`Ewma::new`].
    pub const DEFAULT_MIN_ALPHA: f64 = 0.01;

    /// An empty EWMA whose past weighs `1/e` after `decay_ms` (0 means "last sample wins").
    pub fn new(decay_ms: u64) -> Self {
        Ewma::with_min_alpha(decay_ms, Ewma::DEFAULT_MIN_ALPHA)
    }

    /// Like [`Ewma::new`] with an explicit floor on the smoothing factor (clamped to 0..=1).
    pub fn with_min_alpha(decay_ms: u64, min_alpha: f64) -> Self {
        let min_alpha = if min_alpha.is_nan() { 0.0 } else { min_alpha.clamp(0.0, 1.0) };
        Ewma {
            value: AtomicU64::new(f64::NAN.to_bits()),
            last_ms: AtomicU64::new(0),
            decay_ms: decay_ms as f64,
            min_alpha,
        }
    }

    /// Adds a sample taken at `now_ms`; non-finite or negative samples are ignored.
    pub fn update(&self, sample: f64, now_ms: u64) {
        if !sample.is_finite() || sample < 0.0 {
            return;
        }
        let prev_ms = self.last_ms.fetch_max(now_ms, Ordering::AcqRel);
        let elapsed = now_ms.saturating_sub(prev_ms) as f64;
        let alpha =
            if self.decay_ms <= 0.0 { 1.0 } else { (1.0 - (-elapsed / self.decay_ms).exp()).max(self.min_alpha) };
        let mut old = self.value.load(Ordering::Acquire);
        loop {
            let avg = f64::from_bits(old);
            let new = if avg.is_nan() { sample } else { avg + alpha * (sample - avg) };
            match self.value.compare_exchange_weak(old, new.to_bits(), Ordering::AcqRel, Ordering::Acquire) {
                Ok(_) => return,
                Err(seen) => old = seen,
            }
        }
    }

    /// The average, or `None` before the first sample.
    pub fn get(&self) -> Option<f64> {
        let v = self.value();
        (!v.is_nan()).then_some(v)
    }

    /// The average, NaN before the first sample (what [`Candidate::latency_ewma_ms`] takes).
    pub fn value(&self) -> f64 {
        f64::from_bits(self.value.load(Ordering::Acquire))
    }

    /// Forgets every sample.
    pub fn reset(&self) {
        self.value.store(f64::NAN.to_bits(), Ordering::Release);
    }
}

impl Default for Ewma {
    fn default() -> Self {
        Ewma::new(Ewma::DEFAULT_DECAY_MS)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::rngs::SmallRng;
    use rand::SeedableRng;

    fn rng() -> SmallRng {
        SmallRng::seed_from_u64(7)
    }

    fn all(_: usize) -> bool {
        true
    }

    fn weights(ws: &[u32]) -> Vec<Candidate> {
        ws.iter().map(|&w| Candidate::new(w)).collect()
    }

    fn counts(b: &Balancer, c: &[Candidate], picks: usize, r: &mut SmallRng) -> Vec<usize> {
        let mut n = vec![0; c.len()];
        for _ in 0..picks {
            n[b.pick(c, all, r).expect("some candidate")] += 1;
        }
        n
    }

    fn assert_shares(counts: &[usize], want: &[f64], tol: f64) {
        let total: usize = counts.iter().sum();
        for (i, (&c, &w)) in counts.iter().zip(want).enumerate() {
            let share = c as f64 / total as f64;
            assert!((share - w).abs() <= tol, "endpoint {i}: share {share:.4}, want {w:.4} (counts {counts:?})");
        }
    }

    #[test]
    fn strategy_names_round_trip() {
        for s in Strategy::ALL {
            assert_eq!(s.as_str().parse::<Strategy>(), Ok(s));
            assert_eq!(s.to_string(), s.as_str());
        }
        let err = "round_robin".parse::<Strategy>().unwrap_err();
        assert!(err.to_string().contains("round_robin"));
        assert_eq!(Strategy::default(), Strategy::WeightedRoundRobin);
    }

    #[test]
    fn strategy_deserializes_from_config_names() {
        use serde::de::value::{Error, StrDeserializer};
        use serde::de::IntoDeserializer;
        for s in Strategy::ALL {
            let d: StrDeserializer<'_, Error> = s.as_str().into_deserializer();
            assert_eq!(Strategy::deserialize(d), Ok(s));
        }
        let d: StrDeserializer<'_, Error> = "fastest".into_deserializer();
        assert!(Strategy::deserialize(d).is_err());
    }

    #[test]
    fn tiers_are_ordered_best_first() {
        assert!(Tier::Healthy < Tier::Degraded);
        assert!(Tier::Degraded < Tier::HalfOpen);
        assert!(Tier::HalfOpen < Tier::Unavailable);
    }

    #[test]
    fn effective_weight_scales_and_never_drops_to_zero() {
        assert_eq!(Candidate::new(3).effective_weight(), 3_000);
        let half = Candidate { slow_start: 0.5, ..Candidate::new(3) };
        assert_eq!(half.effective_weight(), 1_500);
        let zero = Candidate { slow_start: 0.0, ..Candidate::new(3) };
        assert_eq!(zero.effective_weight(), 1);
        assert_eq!(Candidate::new(0).effective_weight(), 1);
        let nan = Candidate { slow_start: f64::NAN, ..Candidate::new(2) };
        assert_eq!(nan.effective_weight(), 2_000);
        assert_eq!(Candidate::new(u32::MAX).effective_weight(), u64::from(u32::MAX) * 1_000);
    }

    #[test]
    fn wrr_follows_the_nginx_smooth_sequence() {
        // nginx smooth WRR for 3:2:1 gives a b a c b a, then repeats.
        let b = Balancer::new(Strategy::WeightedRoundRobin, 3);
        let c = weights(&[3, 2, 1]);
        let mut r = rng();
        let seq: Vec<usize> = (0..12).map(|_| b.pick(&c, all, &mut r).unwrap()).collect();
        assert_eq!(seq, [0, 1, 0, 2, 1, 0, 0, 1, 0, 2, 1, 0]);
    }

    #[test]
    fn wrr_5_1_1_interleaves() {
        let b = Balancer::new(Strategy::WeightedRoundRobin, 3);
        let c = weights(&[5, 1, 1]);
        let mut r = rng();
        let seq: Vec<usize> = (0..7).map(|_| b.pick(&c, all, &mut r).unwrap()).collect();
        assert_eq!(seq, [0, 0, 1, 0, 2, 0, 0]);
    }

    #[test]
    fn wrr_distribution_matches_weights() {
        let b = Balancer::new(Strategy::WeightedRoundRobin, 4);
        let c = weights(&[5, 3, 1, 1]);
        let n = counts(&b, &c, 10_000, &mut rng());
        assert_eq!(n, [5_000, 3_000, 1_000, 1_000]);
    }

    #[test]
    fn weighted_random_distribution_within_two_percent() {
        let b = Balancer::new(Strategy::WeightedRandom, 3);
        let c = weights(&[3, 2, 1]);
        let n = counts(&b, &c, 10_000, &mut rng());
        assert_shares(&n, &[0.5, 1.0 / 3.0, 1.0 / 6.0], 0.02);
    }

    #[test]
    fn veto_skips_endpoints_and_keeps_wrr_fair_among_the_rest() {
        let b = Balancer::new(Strategy::WeightedRoundRobin, 3);
        let c = weights(&[3, 2, 1]);
        let mut r = rng();
        let mut n = [0; 3];
        for _ in 0..3_000 {
            n[b.pick(&c, |i| i != 0, &mut r).unwrap()] += 1;
        }
        assert_eq!(n, [0, 2_000, 1_000]);
        assert_eq!(b.pick(&c, |_| false, &mut r), None);
        let wr = Balancer::new(Strategy::WeightedRandom, 3);
        for _ in 0..100 {
            assert_eq!(wr.pick(&c, |i| i == 2, &mut r), Some(2));
        }
    }

    #[test]
    fn empty_and_unavailable_give_none() {
        let mut r = rng();
        let c = [Candidate { tier: Tier::Unavailable, ..Candidate::new(1) }];
        for s in Strategy::ALL {
            let b = Balancer::new(s, 1);
            assert_eq!(b.pick(&[], all, &mut r), None, "{s}");
            assert_eq!(b.pick(&c, all, &mut r), None, "{s}");
        }
    }

    #[test]
    fn tier_fallback_healthy_then_degraded_then_half_open() {
        let mut r = rng();
        let c = [
            Candidate { tier: Tier::HalfOpen, ..Candidate::new(1) },
            Candidate { tier: Tier::Degraded, ..Candidate::new(1) },
            Candidate { tier: Tier::Healthy, ..Candidate::new(1) },
            Candidate { tier: Tier::Unavailable, ..Candidate::new(100) },
        ];
        for s in Strategy::ALL {
            let b = Balancer::new(s, 4);
            for _ in 0..50 {
                assert_eq!(b.pick(&c, all, &mut r), Some(2), "{s}: healthy first");
                assert_eq!(b.pick(&c, |i| i != 2, &mut r), Some(1), "{s}: then degraded");
                assert_eq!(b.pick(&c, |i| i == 0 || i == 3, &mut r), Some(0), "{s}: then half-open");
                assert_eq!(b.pick(&c, |i| i == 3, &mut r), None, "{s}: never unavailable");
            }
        }
    }

    #[test]
    fn tier_scan_handles_any_order() {
        // The best tier appears after worse ones that were allowed.
        let mut r = rng();
        let mut c = weights(&[1, 1, 1, 1]);
        c[0].tier = Tier::Degraded;
        c[1].tier = Tier::HalfOpen;
        c[2].tier = Tier::Healthy;
        c[3].tier = Tier::Healthy;
        let b = Balancer::new(Strategy::WeightedRoundRobin, 4);
        let n = counts(&b, &c, 100, &mut r);
        assert_eq!(n, [0, 0, 50, 50]);
    }

    #[test]
    fn allowed_is_asked_once_and_not_for_worse_tiers() {
        use std::cell::Cell;
        let mut c = weights(&[1, 1, 1, 1, 1]);
        c[1].tier = Tier::Degraded; // after a healthy one: never asked
        c[3].tier = Tier::Unavailable; // never asked
        for s in Strategy::ALL {
            let asked = [(); 5].map(|_| Cell::new(0));
            let b = Balancer::new(s, 5);
            let pick = b.pick(
                &c,
                |i| {
                    asked[i].set(asked[i].get() + 1);
                    true
                },
                &mut rng(),
            );
            assert!(matches!(pick, Some(0 | 2 | 4)), "{s}: {pick:?}");
            assert_eq!(asked.map(|a| a.get()), [1, 0, 1, 0, 1], "{s}");
        }
    }

    #[test]
    fn p2c_with_two_always_takes_the_faster() {
        let b = Balancer::new(Strategy::LeastLatency, 2);
        let c = [
            Candidate { latency_ewma_ms: 100.0, ..Candidate::new(1) },
            Candidate { latency_ewma_ms: 10.0, ..Candidate::new(1) },
        ];
        let n = counts(&b, &c, 10_000, &mut rng());
        assert_eq!(n, [0, 10_000]);
    }

    #[test]
    fn p2c_with_three_favours_the_fastest() {
        let b = Balancer::new(Strategy::LeastLatency, 3);
        let lat = [50.0, 10.0, 200.0];
        let c: Vec<Candidate> = lat.iter().map(|&l| Candidate { latency_ewma_ms: l, ..Candidate::new(1) }).collect();
        let n = counts(&b, &c, 9_000, &mut rng());
        // The fastest wins both pairs it is in (2/3), the middle one its pair with the slowest (1/3).
        assert_shares(&n, &[1.0 / 3.0, 2.0 / 3.0, 0.0], 0.02);
        assert_eq!(n[2], 0, "the slowest never wins");
    }

    #[test]
    fn p2c_explores_unknown_latency_and_handles_one() {
        let mut r = rng();
        let b = Balancer::new(Strategy::LeastLatency, 2);
        let c = [
            Candidate { latency_ewma_ms: 1.0, ..Candidate::new(1) },
            Candidate { latency_ewma_ms: -1.0, ..Candidate::new(1) },
        ];
        for _ in 0..100 {
            assert_eq!(b.pick(&c, all, &mut r), Some(1));
            assert_eq!(b.pick(&c, |i| i == 0, &mut r), Some(0));
        }
    }

    #[test]
    fn p2c_slow_start_inflates_latency_cost() {
        let mut r = rng();
        let b = Balancer::new(Strategy::LeastLatency, 2);
        let c = [
            Candidate { latency_ewma_ms: 10.0, slow_start: 0.1, ..Candidate::new(1) },
            Candidate { latency_ewma_ms: 50.0, ..Candidate::new(1) },
        ];
        assert_eq!(b.pick(&c, all, &mut r), Some(1), "10 ms at 10 % ramp costs 100 ms");
    }

    #[test]
    fn priority_chain_primary_secondary_emergency() {
        let mut r = rng();
        let b = Balancer::new(Strategy::Priority, 3);
        let mut c = weights(&[1, 5, 9]);
        c[0].priority = 0; // primary
        c[1].priority = 1; // secondary
        c[2].priority = 2; // emergency
        for _ in 0..20 {
            assert_eq!(b.pick(&c, all, &mut r), Some(0));
            assert_eq!(b.pick(&c, |i| i != 0, &mut r), Some(1), "primary vetoed");
            assert_eq!(b.pick(&c, |i| i == 2, &mut r), Some(2), "only emergency left");
        }
        // Tiers outrank priority: a degraded primary loses to a healthy secondary.
        c[0].tier = Tier::Degraded;
        assert_eq!(b.pick(&c, all, &mut r), Some(1));
        c[1].tier = Tier::HalfOpen;
        c[2].tier = Tier::Unavailable;
        assert_eq!(b.pick(&c, all, &mut r), Some(0));
    }

    #[test]
    fn priority_ties_share_by_weight() {
        let b = Balancer::new(Strategy::Priority, 4);
        let mut c = weights(&[3, 1, 7, 7]);
        c[2].priority = 5;
        c[3].priority = -1;
        c[0].priority = 1;
        c[1].priority = 1;
        let mut r = rng();
        let mut n = [0; 4];
        for _ in 0..400 {
            n[b.pick(&c, |i| i != 3, &mut r).unwrap()] += 1;
        }
        assert_eq!(n, [300, 100, 0, 0]);
    }

    #[test]
    fn slow_start_factor_ramps_linearly_with_a_floor() {
        assert_eq!(slow_start_factor(0, 10_000), SLOW_START_FLOOR);
        assert_eq!(slow_start_factor(500, 10_000), SLOW_START_FLOOR);
        assert!((slow_start_factor(2_500, 10_000) - 0.25).abs() < 1e-12);
        assert!((slow_start_factor(5_000, 10_000) - 0.5).abs() < 1e-12);
        assert_eq!(slow_start_factor(10_000, 10_000), 1.0);
        assert_eq!(slow_start_factor(99_999, 10_000), 1.0);
        assert_eq!(slow_start_factor(0, 0), 1.0);
    }

    #[test]
    fn slow_start_shares_follow_the_ramp() {
        let window = 10_000;
        let b = Balancer::new(Strategy::WeightedRoundRobin, 2);
        let mut r = rng();
        for (since, want) in [(0, 0.1), (2_500, 0.25), (5_000, 0.5), (10_000, 1.0)] {
            let mut c = weights(&[1, 1]);
            c[1].slow_start = slow_start_factor(since, window);
            b.reset();
            let n = counts(&b, &c, 10_000, &mut r);
            let share = n[1] as f64 / 10_000.0;
            let expect = want / (1.0 + want);
            assert!((share - expect).abs() < 0.001, "since {since}: {share} vs {expect}");
        }
        // Weighted random follows the ramp too.
        let wr = Balancer::new(Strategy::WeightedRandom, 2);
        let mut c = weights(&[1, 1]);
        c[1].slow_start = 0.25;
        let n = counts(&wr, &c, 10_000, &mut r);
        assert_shares(&n, &[0.8, 0.2], 0.02);
    }

    #[test]
    fn many_endpoints_past_the_mask() {
        let mut r = rng();
        let n = MASK_BITS + 44;
        let mut c = weights(&vec![1; n]);
        for cand in &mut c[..MASK_BITS + 10] {
            cand.tier = Tier::Degraded;
        }
        for s in Strategy::ALL {
            let b = Balancer::new(s, 0);
            for _ in 0..200 {
                let i = b.pick(&c, |i| i % 2 == 0, &mut r).unwrap();
                assert!(i >= MASK_BITS + 10 && i.is_multiple_of(2), "{s}: {i}");
            }
            let i = b.pick(&c, |i| i == 3, &mut r);
            assert_eq!(i, Some(3), "{s}");
        }
    }

    #[test]
    fn balancer_grows_when_given_more_candidates() {
        let b = Balancer::new(Strategy::WeightedRoundRobin, 1);
        let c = weights(&[1, 1, 1]);
        let n = counts(&b, &c, 30, &mut rng());
        assert_eq!(n, [10, 10, 10]);
    }

    #[test]
    fn ewma_first_sample_then_time_decay() {
        let e = Ewma::with_min_alpha(1_000, 0.0);
        assert_eq!(e.get(), None);
        assert!(e.value().is_nan());
        e.update(100.0, 10_000);
        assert_eq!(e.get(), Some(100.0));
        // After one decay period the old value weighs 1/e.
        e.update(200.0, 11_000);
        let want = 200.0 + (100.0 - 200.0) * (-1.0f64).exp();
        assert!((e.get().unwrap() - want).abs() < 1e-9);
        // Long silence: the new sample dominates.
        e.update(50.0, 1_000_000);
        assert!((e.get().unwrap() - 50.0).abs() < 1e-6);
        // Same millisecond with no floor: ignored.
        e.update(5_000.0, 1_000_000);
        assert!((e.get().unwrap() - 50.0).abs() < 1e-6);
        e.reset();
        assert_eq!(e.get(), None);
    }

    #[test]
    fn ewma_floor_keeps_bursts_and_ignores_bad_samples() {
        let e = Ewma::with_min_alpha(10_000, 0.5);
        e.update(100.0, 5);
        e.update(200.0, 5);
        assert_eq!(e.get(), Some(150.0));
        e.update(f64::NAN, 6);
        e.update(-3.0, 6);
        e.update(f64::INFINITY, 6);
        assert_eq!(e.get(), Some(150.0));
        // An out-of-order timestamp counts as no time passed.
        e.update(50.0, 1);
        assert_eq!(e.get(), Some(100.0));
        let last_wins = Ewma::new(0);
        last_wins.update(1.0, 1);
        last_wins.update(9.0, 1);
        assert_eq!(last_wins.get(), Some(9.0));
    }

    #[test]
    fn ewma_concurrent_updates_stay_in_range() {
        let e = std::sync::Arc::new(Ewma::new(1_000));
        let handles: Vec<_> = (0..4)
            .map(|t| {
                let e = e.clone();
                std::thread::spawn(move || {
                    for k in 0..10_000u64 {
                        e.update(if t % 2 == 0 { 10.0 } else { 20.0 }, k);
                    }
                })
            })
            .collect();
        for h in handles {
            h.join().unwrap();
        }
        let v = e.get().unwrap();
        assert!((10.0..=20.0).contains(&v), "{v}");
    }

    #[test]
    fn balancer_is_shared_across_threads() {
        let b = std::sync::Arc::new(Balancer::new(Strategy::WeightedRoundRobin, 3));
        let c = std::sync::Arc::new(weights(&[3, 2, 1]));
        let handles: Vec<_> = (0..4)
            .map(|seed| {
                let (b, c) = (b.clone(), c.clone());
                std::thread::spawn(move || {
                    let mut r = SmallRng::seed_from_u64(seed);
                    let mut n = [0usize; 3];
                    for _ in 0..600 {
                        n[b.pick(&c, all, &mut r).unwrap()] += 1;
                    }
                    n
                })
            })
            .collect();
        let mut total = [0usize; 3];
        for h in handles {
            for (t, x) in total.iter_mut().zip(h.join().unwrap()) {
                *t += x;
            }
        }
        assert_eq!(total, [1_200, 800, 400], "one shared cycle, whatever the interleaving");
    }

    #[test]
    fn an_endpoint_is_stalled_when_requests_pile_up_and_it_stays_silent() {
        // 0.3 ms usual latency: silent for 25 ms with 8 requests waiting is a hang.
        assert!(stalled(8, 25, 0.3));
        assert!(!stalled(7, 25, 0.3), "below the minimum of unanswered requests");
        assert!(!stalled(8, 15, 0.3), "below the floor of silence");
        // A 2 s upstream: 30 requests of a burst and 5 s without an answer is normal; 9 s is not.
        assert!(!stalled(30, 5_000, 2_000.0));
        assert!(stalled(30, 9_000, 2_000.0));
        // Unknown latency: no judgement.
        assert!(!stalled(1000, 60_000, f64::NAN));
    }
}
