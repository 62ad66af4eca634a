//! Token pricing with exact money: what a request's tokens cost from the pricing table.
//!
//! Owns the one token-price formula of sheepdog, used by live accounting, the request log, probe cost and
//! (next) budgets. Money is integer nano-dollars ([`Nanos`]); prices are integer micro-dollars per million
//! tokens ([`Rate`], which is the same as pico-dollars per token), so a cost is an exact integer product,
//! rounded once to the nano-dollar. Sums of [`Nanos`] never drift the way float sums do.
//!
//! Token counts follow OpenAI's `usage`: `prompt` includes `cached_prompt`, `completion` includes `reasoning`.
//! Pure: no I/O, no clock.

use serde::{Deserialize, Serialize};

/// Nano-dollars in one US dollar.
pub const NANOS_PER_USD: u64 = 1_000_000_000;

/// An amount of money in nano-dollars (10⁻⁹ USD). `u64` holds up to 18 billion dollars.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Nanos(pub u64);

impl Nanos {
    /// Zero dollars.
    pub const ZERO: Nanos = Nanos(0);

    /// Whole dollars and fractions from a float such as a configured threshold (`warn_usd = 400`), rounded to
    /// the nano-dollar; negative or NaN is zero, huge values saturate.
    pub fn from_usd(usd: f64) -> Nanos {
        if usd.is_nan() || usd <= 0.0 {
            return Nanos(0);
        }
        let n = (usd * NANOS_PER_USD as f64).round();
        Nanos(if n >= u64::MAX as f64 { u64::MAX } else { n as u64 })
    }

    /// The amount in US dollars, for display and for Prometheus (which only has floats).
    pub fn usd(self) -> f64 {
        self.0 as f64 / NANOS_PER_USD as f64
    }

    /// `self + other`, saturating.
    pub fn saturating_add(self, other: Nanos) -> Nanos {
        Nanos(self.0.saturating_add(other.0))
    }

    /// `self - other`, saturating at zero.
    pub fn saturating_sub(self, other: Nanos) -> Nanos {
        Nanos(self.0.saturating_sub(other.0))
    }
}

impl std::iter::Sum for Nanos {
    fn sum<I: Iterator<Item = Nanos>>(iter: I) -> Nanos {
        iter.fold(Nanos::ZERO, Nanos::saturating_add)
    }
}

/// A token price in micro-dollars per million tokens — numerically the same as pico-dollars per token. Exact
/// for configured prices with up to six decimals of a dollar per million tokens (`0.0375` is `37_500`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Rate(pub u64);

impl Rate {
    /// A price in USD per million tokens, as configured; `None` when negative, NaN or infinite.
    pub fn from_usd_per_mtok(usd: f64) -> Option<Rate> {
        if !usd.is_finite() || usd < 0.0 {
            return None;
        }
        let micro = (usd * 1e6).round();
        (micro < u64::MAX as f64).then_some(Rate(micro as u64))
    }

    /// The price in USD per million tokens.
    pub fn usd_per_mtok(self) -> f64 {
        self.0 as f64 / 1e6
    }
}

/// What this endpoint bills relative to the list price, in parts per million (1.0 = `1_000_000`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Multiplier(pub u32);

impl Multiplier {
    /// The list price.
    pub const ONE: Multiplier = Multiplier(1_000_000);

    /// From a configured factor such as `0.15`; `None` when negative, NaN or above 1000.
    pub fn from_factor(f: f64) -> Option<Multiplier> {
        if !f.is_finite() || !(0.0..=1000.0).contains(&f) {
            return None;
        }
        Some(Multiplier((f * 1e6).round() as u32))
    }

    /// The factor.
    pub fn factor(self) -> f64 {
        f64::from(self.0) / 1e6
    }
}

impl Default for Multiplier {
    fn default() -> Self {
        Multiplier::ONE
    }
}

/// The prices of one model.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct Pricing {
    /// Prompt tokens that were not served from the upstream's cache.
    pub input: Rate,
    /// Completion tokens (reasoning tokens included).
    pub output: Rate,
    /// Prompt tokens served from the upstream's cache (default: the input price).
    pub cached_input: Rate,
}

impl Pricing {
    /// Prices with no cache discount.
    pub fn new(input: Rate, output: Rate) -> Pricing {
        Pricing { input, output, cached_input: input }
    }

    /// Whether every token is free (a model whose price is zero is never blocked by a budget).
    pub fn is_free(&self) -> bool {
        self.input.0 == 0 && self.output.0 == 0 && self.cached_input.0 == 0
    }
}

/// Token counts of one answer, as OpenAI's `usage` reports them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Tokens {
    /// Prompt tokens, cached ones included.
    pub prompt: u64,
    /// Completion tokens, reasoning ones included.
    pub completion: u64,
    /// Of `prompt`, those served from the upstream's prompt cache.
    pub cached_prompt: u64,
    /// Of `completion`, those spent on reasoning.
    pub reasoning: u64,
}

impl Tokens {
    /// Plain prompt and completion counts.
    pub fn new(prompt: u64, completion: u64) -> Tokens {
        Tokens { prompt, completion, cached_prompt: 0, reasoning: 0 }
    }

    /// Prompt plus completion.
    pub fn total(&self) -> u64 {
        self.prompt.saturating_add(self.completion)
    }
}

/// What `tokens` cost at `pricing` on an endpoint billing `multiplier` of the list price, rounded to the
/// nearest nano-dollar. Cached prompt tokens are billed at the cached price and only once (they are part of
/// `prompt`); reasoning tokens are billed once, inside `completion`.
pub fn cost(pricing: &Pricing, tokens: &Tokens, multiplier: Multiplier) -> Nanos {
    let cached = tokens.cached_prompt.min(tokens.prompt);
    let uncached = tokens.prompt - cached;
    // Pico-dollars: tokens × (pico-dollars per token). u128 cannot overflow for u64 counts and prices.
    let pico = u128::from(uncached) * u128::from(pricing.input.0)
        + u128::from(cached) * u128::from(pricing.cached_input.0)
        + u128::from(tokens.completion) * u128::from(pricing.output.0);
    // × multiplier (ppm) / 10⁶, then pico -> nano / 10³: one rounding, half up.
    let scaled = pico * u128::from(multiplier.0);
    let nanos = (scaled + 500_000_000) / 1_000_000_000;
    Nanos(u64::try_from(nanos).unwrap_or(u64::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rate(usd: f64) -> Rate {
        Rate::from_usd_per_mtok(usd).unwrap()
    }

    #[test]
    fn prices_are_exact_integers() {
        assert_eq!(rate(0.28), Rate(280_000));
        assert_eq!(rate(0.0375), Rate(37_500));
        assert_eq!(rate(2.0).usd_per_mtok(), 2.0);
        assert!(Rate::from_usd_per_mtok(-1.0).is_none());
        assert!(Rate::from_usd_per_mtok(f64::NAN).is_none());
    }

    #[test]
    fn one_deepseek_input_token_costs_280_nano_dollars() {
        let p = Pricing::new(rate(0.28), rate(0.42));
        assert_eq!(cost(&p, &Tokens::new(1, 0), Multiplier::ONE), Nanos(280));
        assert_eq!(cost(&p, &Tokens::new(1_000_000, 1_000_000), Multiplier::ONE), Nanos::from_usd(0.70));
    }

    #[test]
    fn cached_tokens_are_billed_once_at_the_cached_price() {
        let p = Pricing { input: rate(2.0), output: rate(8.0), cached_input: rate(0.5) };
        // 1000 prompt tokens of which 800 cached, 100 completion tokens of which 40 reasoning.
        let t = Tokens { prompt: 1000, completion: 100, cached_prompt: 800, reasoning: 40 };
        // (200 × 2.0 + 800 × 0.5 + 100 × 8.0) / 10⁶ USD = 1600 / 10⁶ USD = 1,600,000 nano-dollars.
        assert_eq!(cost(&p, &t, Multiplier::ONE), Nanos(1_600_000));
        // More cached tokens than prompt tokens (a confused relay) cannot make the cost negative.
        let odd = Tokens { prompt: 10, completion: 0, cached_prompt: 50, reasoning: 0 };
        assert_eq!(cost(&p, &odd, Multiplier::ONE), Nanos(5_000));
    }

    #[test]
    fn a_relay_multiplier_scales_the_list_price() {
        let p = Pricing::new(rate(2.0), rate(8.0));
        let t = Tokens::new(1_000_000, 1_000_000);
        assert_eq!(cost(&p, &t, Multiplier::ONE), Nanos::from_usd(10.0));
        assert_eq!(cost(&p, &t, Multiplier::from_factor(0.15).unwrap()), Nanos::from_usd(1.5));
        assert!(Multiplier::from_factor(-0.1).is_none());
    }

    #[test]
    fn sums_do_not_drift() {
        let p = Pricing::new(rate(0.1), rate(0.3));
        let one = cost(&p, &Tokens::new(10, 20), Multiplier::ONE);
        let total: Nanos = std::iter::repeat_n(one, 1_000_000).sum();
        assert_eq!(total, Nanos(one.0 * 1_000_000));
        assert_eq!(total.usd(), 7.0);
    }

    #[test]
    fn from_usd_rounds_and_saturates() {
        assert_eq!(Nanos::from_usd(400.0), Nanos(400 * NANOS_PER_USD));
        assert_eq!(Nanos::from_usd(-3.0), Nanos(0));
        assert_eq!(Nanos::from_usd(f64::INFINITY), Nanos(u64::MAX));
        assert!(Pricing::default().is_free());
    }
}
