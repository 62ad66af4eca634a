//! The settings of a mock: the `sheepdog mock` command line ([`MockArgs`]), the options of a mock started in
//! process ([`MockOptions`]) and their validation.
//!
//! Owns: every knob a user sets before the mock starts, its default and its limits.
//! Must not: change at run time (that is the fault state, `faults`), read a clock or touch the network; the
//! server reads these values, this module never acts on them.

use crate::answers::DEFAULT_ANSWER_TOKENS;

/// Largest accepted `--answer-tokens` (every answer is built in memory).
const MAX_ANSWER_TOKENS: usize = 1_000_000;

/// CLI arguments of `sheepdog mock`.
#[derive(clap::Args, Debug, Clone)]
pub struct MockArgs {
    /// Address to listen on, e.g. 127.0.0.1:19001 (port 0 picks a free port; the printed line tells it).
    #[arg(long)]
    pub listen: String,
    /// Name of this mock; it appears in every answer and as `owned_by` of its models.
    #[arg(long, default_value = "mock")]
    pub name: String,
    /// Models served (comma separated); others get 404 `model_not_found`.
    #[arg(long, value_delimiter = ',', default_value = "gpt-4.1")]
    pub models: Vec<String>,
    /// Delay before every answer (before the first chunk of a stream).
    #[arg(long, default_value_t = 0)]
    pub latency_ms: u64,
    /// Uniform jitter added to the latency: latency ± jitter.
    #[arg(long, default_value_t = 0)]
    pub jitter_ms: u64,
    /// Stream chunks per second; 0 sends them as fast as possible.
    #[arg(long, default_value_t = 50.0)]
    pub tokens_per_sec: f64,
    /// Pieces (stream chunks, completion tokens) of every answer: the answer template repeated cyclically;
    /// `max_tokens` of a request cuts it shorter.
    #[arg(long, default_value_t = DEFAULT_ANSWER_TOKENS)]
    pub answer_tokens: usize,
    /// Fraction (0..=1) of requests answered 500 in `ok` and `slow` modes.
    #[arg(long, default_value_t = 0.0)]
    pub error_rate: f64,
    /// Seed of the random numbers (error draws, jitter): the same seed gives the same sequence.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// API keys accepted on /v1/* as `Authorization: Bearer KEY` (comma separated); empty = no check.
    #[arg(long, value_delimiter = ',')]
    pub require_keys: Vec<String>,
    /// Stamp every stream chunk with `"sent_at_us"`: the Unix time in microseconds when it was written, so a
    /// client on the same machine can measure each chunk's transit time (benchmarks).
    #[arg(long)]
    pub stamp: bool,
}

/// Settings of a mock started with [`spawn`](crate::spawn): the fields of [`MockArgs`] except the address.
#[derive(Debug, Clone, PartialEq)]
pub struct MockOptions {
    /// Name that appears in every answer and as `owned_by` of the models.
    pub name: String,
    /// Models served; others get 404 `model_not_found`.
    pub models: Vec<String>,
    /// Delay before every answer (before the first chunk of a stream).
    pub latency_ms: u64,
    /// Uniform jitter added to the latency: latency ± jitter.
    pub jitter_ms: u64,
    /// Stream chunks per second; 0 = no pacing.
    pub tokens_per_sec: f64,
    /// Pieces of every answer before `max_tokens` (the template repeated cyclically).
    pub answer_tokens: usize,
    /// Initial fraction of requests answered 500 (the `error_rate` of the fault state).
    pub error_rate: f64,
    /// Seed of the random numbers.
    pub seed: u64,
    /// Accepted bearer tokens on /v1/*; empty = no check.
    pub require_keys: Vec<String>,
    /// Stamp stream chunks with `sent_at_us`.
    pub stamp: bool,
}

impl Default for MockOptions {
    fn default() -> Self {
        Self {
            name: "mock".to_owned(),
            models: vec!["gpt-4.1".to_owned()],
            latency_ms: 0,
            jitter_ms: 0,
            tokens_per_sec: 50.0,
            answer_tokens: DEFAULT_ANSWER_TOKENS,
            error_rate: 0.0,
            seed: 1,
            require_keys: Vec::new(),
            stamp: false,
        }
    }
}

impl From<&MockArgs> for MockOptions {
    fn from(args: &MockArgs) -> Self {
        let non_empty =
            |v: &[String]| -> Vec<String> { v.iter().map(|s| s.trim().to_owned()).filter(|s| !s.is_empty()).collect() };
        Self {
            name: args.name.clone(),
            models: non_empty(&args.models),
            latency_ms: args.latency_ms,
            jitter_ms: args.jitter_ms,
            tokens_per_sec: args.tokens_per_sec,
            answer_tokens: args.answer_tokens,
            error_rate: args.error_rate,
            seed: args.seed,
            require_keys: non_empty(&args.require_keys),
            stamp: args.stamp,
        }
    }
}

impl MockOptions {
    /// Checks the values a user can get wrong: `error_rate` within 0..=1, `tokens_per_sec` finite and >= 0,
    /// `answer_tokens` at most a million.
    pub fn validate(&self) -> Result<(), String> {
        if !(0.0..=1.0).contains(&self.error_rate) {
            return Err(format!("error rate must be between 0 and 1, got {}", self.error_rate));
        }
        if !self.tokens_per_sec.is_finite() || self.tokens_per_sec < 0.0 {
            return Err(format!("tokens per second must be a number >= 0, got {}", self.tokens_per_sec));
        }
        if self.answer_tokens > MAX_ANSWER_TOKENS {
            return Err(format!("answer tokens must be at most {MAX_ANSWER_TOKENS}, got {}", self.answer_tokens));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options_validate() {
        assert!(MockOptions::default().validate().is_ok());
        let bad_rate = MockOptions { error_rate: 2.0, ..MockOptions::default() };
        assert!(bad_rate.validate().is_err());
        let bad_tps = MockOptions { tokens_per_sec: -1.0, ..MockOptions::default() };
        assert!(bad_tps.validate().is_err());
        let too_long = MockOptions { answer_tokens: MAX_ANSWER_TOKENS + 1, ..MockOptions::default() };
        assert!(too_long.validate().is_err());
    }
}
