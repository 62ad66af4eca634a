//! `sheepdog report --project-tokens N`: what N tokens a month would cost on each model and on each endpoint,
//! from the pricing table, the endpoints' price multipliers and the token mix seen in the log (the share of
//! prompt tokens, and of those the share served from a cache).
//!
//! Pure: a [`Report`] and the config in, exact nano-dollars out (through the policy crate's `pricing::cost`,
//! the same function that prices live requests). Reads no file and no clock.

use serde::Serialize;

use sheepdog_policy::pricing::{cost, Nanos, Tokens};

use super::Report;
use crate::config::{Config, ModelKind};

/// The prompt : completion : cached split the projection assumes.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Mix {
    /// Prompt tokens per token.
    pub prompt_share: f64,
    /// Of the prompt tokens, those served from a cache.
    pub cached_share: f64,
    /// `log` when the window had tokens, else `assumed` (1:1, nothing cached).
    pub source: &'static str,
}

/// One model at list price.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ModelCost {
    /// Public model name.
    pub model: String,
    /// Its list prices, USD per million tokens.
    pub input_usd_per_mtok: f64,
    /// See `input_usd_per_mtok`.
    pub output_usd_per_mtok: f64,
    /// See `input_usd_per_mtok`.
    pub cached_input_usd_per_mtok: f64,
    /// What the projected tokens cost a month.
    pub cost_usd: f64,
}

/// One model on one endpoint, at what that endpoint bills.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct EndpointCost {
    /// Endpoint name.
    pub endpoint: String,
    /// Public model name.
    pub model: String,
    /// The endpoint's share of list price.
    pub price_multiplier: f64,
    /// What the projected tokens cost a month there.
    pub cost_usd: f64,
}

/// The whole projection.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Projection {
    /// Tokens a month.
    pub tokens: u64,
    /// Of them, prompt tokens (cached included).
    pub prompt_tokens: u64,
    /// Of them, completion tokens.
    pub completion_tokens: u64,
    /// Of the prompt tokens, cached ones.
    pub cached_prompt_tokens: u64,
    /// Where the split came from.
    pub mix: Mix,
    /// Every chat model of the pricing table, cheapest first.
    pub models: Vec<ModelCost>,
    /// Every endpoint × chat model it serves, cheapest first.
    pub endpoints: Vec<EndpointCost>,
    /// What the tokens would cost at the window's model mix and the prices actually paid (its cost per token ×
    /// `tokens`); `None` when the window had no tokens.
    pub at_current_mix_usd: Option<f64>,
}

/// The split seen in the report's window, or 1:1 with no cache when it had no tokens.
pub fn mix(r: &Report) -> Mix {
    let (p, c) = (r.total.prompt_tokens, r.total.completion_tokens);
    if p + c == 0 {
        return Mix { prompt_share: 0.5, cached_share: 0.0, source: "assumed" };
    }
    let cached_share = if p == 0 { 0.0 } else { r.total.cached_prompt_tokens.min(p) as f64 / p as f64 };
    Mix { prompt_share: p as f64 / (p + c) as f64, cached_share, source: "log" }
}

/// `tokens` split by `mix`, in whole tokens that add up to `tokens`.
pub fn split(tokens: u64, mix: &Mix) -> Tokens {
    let prompt = ((tokens as f64) * mix.prompt_share).round().min(tokens as f64) as u64;
    let cached = ((prompt as f64) * mix.cached_share).round().min(prompt as f64) as u64;
    Tokens { prompt, completion: tokens - prompt, cached_prompt: cached, reasoning: 0 }
}

/// What `tokens` a month would cost on each chat model of `config` and on each endpoint serving it.
pub fn project(r: &Report, config: &Config, tokens: u64) -> Projection {
    let mix = mix(r);
    let t = split(tokens, &mix);
    let chat = |name: &str| config.model(name).filter(|m| m.kind == ModelKind::Chat);
    let mut models: Vec<(Nanos, ModelCost)> = config
        .models
        .iter()
        .filter(|m| m.kind == ModelKind::Chat)
        .map(|m| {
            let p = m.pricing();
            let n = cost(&p, &t, Default::default());
            let row = ModelCost {
                model: m.name.clone(),
                input_usd_per_mtok: p.input.usd_per_mtok(),
                output_usd_per_mtok: p.output.usd_per_mtok(),
                cached_input_usd_per_mtok: p.cached_input.usd_per_mtok(),
                cost_usd: n.usd(),
            };
            (n, row)
        })
        .collect();
    models.sort_by(|a, b| a.0.cmp(&b.0).then_with(|| a.1.model.cmp(&b.1.model)));
    let mut endpoints: Vec<(Nanos, EndpointCost)> = Vec::new();
    for e in &config.endpoints {
        for (public, _) in &e.models {
            let Some(m) = chat(public) else { continue };
            let multiplier = e.multiplier();
            let n = cost(&m.pricing(), &t, multiplier);
            let row = EndpointCost {
                endpoint: e.name.clone(),
                model: public.clone(),
                price_multiplier: multiplier.factor(),
                cost_usd: n.usd(),
            };
            endpoints.push((n, row));
        }
    }
    endpoints.sort_by(|a, b| a.0.cmp(&b.0).then_with(|| (&a.1.endpoint, &a.1.model).cmp(&(&b.1.endpoint, &b.1.model))));
    let seen = r.total.prompt_tokens + r.total.completion_tokens;
    let at_current_mix_usd = (seen > 0).then(|| r.total.cost_usd * tokens as f64 / seen as f64);
    Projection {
        tokens,
        prompt_tokens: t.prompt,
        completion_tokens: t.completion,
        cached_prompt_tokens: t.cached_prompt,
        mix,
        models: models.into_iter().map(|m| m.1).collect(),
        endpoints: endpoints.into_iter().map(|e| e.1).collect(),
        at_current_mix_usd,
    }
}

/// A token count as people write it: `10M`, `2.5k`, `1B`, `1_000_000` or plain digits; more than zero.
pub fn parse_tokens(s: &str) -> Result<u64, String> {
    let t = s.trim().replace('_', "");
    let (num, factor) = match t.char_indices().last() {
        Some((i, 'k' | 'K')) => (&t[..i], 1e3),
        Some((i, 'm' | 'M')) => (&t[..i], 1e6),
        Some((i, 'b' | 'B' | 'g' | 'G')) => (&t[..i], 1e9),
        _ => (t.as_str(), 1.0),
    };
    let bad = || format!("{s:?} is not a token count (e.g. 10M, 500k, 2000000)");
    let v: f64 = num.parse().map_err(|_| bad())?;
    let n = (v * factor).round();
    if !(n.is_finite() && (1.0..=1e15).contains(&n)) {
        return Err(bad());
    }
    Ok(n as u64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::report::aggregate;

    #[test]
    fn token_counts_parse_like_people_write_them() {
        assert_eq!(parse_tokens("10M"), Ok(10_000_000));
        assert_eq!(parse_tokens("2.5k"), Ok(2_500));
        assert_eq!(parse_tokens("1B"), Ok(1_000_000_000));
        assert_eq!(parse_tokens("1_000_000"), Ok(1_000_000));
        assert_eq!(parse_tokens(" 42 "), Ok(42));
        for bad in ["", "M", "0", "-5M", "ten", "1e30", "NaN"] {
            assert!(parse_tokens(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_split_adds_up_and_never_exceeds_its_parts() {
        let m = Mix { prompt_share: 5.0 / 6.0, cached_share: 0.8, source: "log" };
        let t = split(12_000_000, &m);
        assert_eq!((t.prompt, t.completion, t.cached_prompt), (10_000_000, 2_000_000, 8_000_000));
        let t = split(7, &Mix { prompt_share: 1.0, cached_share: 1.0, source: "log" });
        assert_eq!((t.prompt, t.completion, t.cached_prompt), (7, 0, 7));
    }

    fn config() -> Config {
        let toml = r#"
[[endpoints]]
name = "list"
base_url = "http://127.0.0.1:1/v1"
models = ["gpt-4.1", "deepseek-v3.2", "embed"]
[[endpoints]]
name = "relay"
base_url = "http://127.0.0.1:2/v1"
price_multiplier = 0.15
models = ["gpt-4.1"]
[[models]]
name = "gpt-4.1"
input_usd_per_mtok = 2.0
output_usd_per_mtok = 8.0
cached_input_usd_per_mtok = 0.5
[[models]]
name = "deepseek-v3.2"
input_usd_per_mtok = 0.28
output_usd_per_mtok = 0.42
[[models]]
name = "embed"
kind = "embeddings"
input_usd_per_mtok = 0.02
output_usd_per_mtok = 0
"#;
        crate::config::parse(toml, "t.toml", &crate::config::ProcessEnv).unwrap()
    }

    #[test]
    fn ten_million_tokens_cost_what_the_pricing_table_and_the_multipliers_say() {
        // A log of 5 prompt tokens to 1 completion token, 80 % of the prompt cached, $5.52 for 4.8 M tokens.
        let mut r = aggregate(&[], 0, 1, 2000.0);
        r.total.prompt_tokens = 4_000_000;
        r.total.completion_tokens = 800_000;
        r.total.cached_prompt_tokens = 3_200_000;
        r.total.cost_usd = 5.52;
        let p = project(&r, &config(), 12_000_000);
        assert_eq!((p.prompt_tokens, p.completion_tokens, p.cached_prompt_tokens), (10_000_000, 2_000_000, 8_000_000));
        assert_eq!(p.mix.source, "log");
        // gpt-4.1: 2 M uncached × $2 + 8 M cached × $0.50 + 2 M out × $8 = $24; deepseek (no cache price):
        // 10 M × $0.28 + 2 M × $0.42 = $3.64. Embeddings are not chat models: left out.
        let models: Vec<(&str, f64)> = p.models.iter().map(|m| (m.model.as_str(), m.cost_usd)).collect();
        assert_eq!(models, vec![("deepseek-v3.2", 3.64), ("gpt-4.1", 24.0)]);
        let eps: Vec<(&str, &str, f64)> =
            p.endpoints.iter().map(|e| (e.endpoint.as_str(), e.model.as_str(), e.cost_usd)).collect();
        // The relay bills 15 % of $24: gpt-4.1 there is cheaper than deepseek at list price.
        assert_eq!(eps, vec![("relay", "gpt-4.1", 3.6), ("list", "deepseek-v3.2", 3.64), ("list", "gpt-4.1", 24.0)]);
        // At the window's own cost per token: $5.52 / 4.8 M × 12 M.
        assert!((p.at_current_mix_usd.unwrap() - 13.8).abs() < 1e-9);
    }

    #[test]
    fn an_empty_window_assumes_an_even_split_and_says_so() {
        let p = project(&aggregate(&[], 0, 1, 2000.0), &config(), 10_000_000);
        assert_eq!(p.mix.source, "assumed");
        assert_eq!((p.prompt_tokens, p.completion_tokens, p.cached_prompt_tokens), (5_000_000, 5_000_000, 0));
        // 5 M × $2 + 5 M × $8.
        assert_eq!(p.models.iter().find(|m| m.model == "gpt-4.1").unwrap().cost_usd, 50.0);
        assert_eq!(p.at_current_mix_usd, None);
    }
}
