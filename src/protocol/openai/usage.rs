//! OpenAI's `usage` object as sheepdog counts it: prompt and completion tokens, with
//! `prompt_tokens_details.cached_tokens` and `completion_tokens_details.reasoning_tokens` (both already inside
//! the two totals, as OpenAI reports them).

use serde::{Deserialize, Deserializer};
use serde_json::value::RawValue;
use sheepdog_policy::pricing::Tokens;

/// `usage` as it comes on the wire; missing or `null` counts are zero.
#[derive(Debug, Default, Deserialize)]
pub(super) struct UsageWire {
    #[serde(default)]
    prompt_tokens: Option<u64>,
    #[serde(default)]
    completion_tokens: Option<u64>,
    #[serde(default)]
    prompt_tokens_details: Option<PromptDetails>,
    #[serde(default)]
    completion_tokens_details: Option<CompletionDetails>,
}

#[derive(Debug, Default, Deserialize)]
struct PromptDetails {
    #[serde(default)]
    cached_tokens: Option<u64>,
}

#[derive(Debug, Default, Deserialize)]
struct CompletionDetails {
    #[serde(default)]
    reasoning_tokens: Option<u64>,
}

/// `usage` read leniently (`#[serde(deserialize_with = "lenient")]` on an `Option<UsageWire>`): a `usage` that
/// cannot be read — a negative or fractional count, a key twice — counts as none, like a missing one, instead of
/// making the answer or chunk that carries it unreadable.
pub(super) fn lenient<'de, D: Deserializer<'de>>(d: D) -> Result<Option<UsageWire>, D::Error> {
    let raw = <&RawValue>::deserialize(d)?;
    Ok(serde_json::from_str::<Option<UsageWire>>(raw.get()).ok().flatten())
}

impl UsageWire {
    /// The counts sheepdog prices.
    pub(super) fn tokens(&self) -> Tokens {
        Tokens {
            prompt: self.prompt_tokens.unwrap_or(0),
            completion: self.completion_tokens.unwrap_or(0),
            cached_prompt: self.prompt_tokens_details.as_ref().and_then(|d| d.cached_tokens).unwrap_or(0),
            reasoning: self.completion_tokens_details.as_ref().and_then(|d| d.reasoning_tokens).unwrap_or(0),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn details_are_read_and_default_to_zero() {
        let u: UsageWire = serde_json::from_str(
            r#"{"prompt_tokens":1000,"completion_tokens":100,"total_tokens":1100,
               "prompt_tokens_details":{"cached_tokens":800,"audio_tokens":0},
               "completion_tokens_details":{"reasoning_tokens":40}}"#,
        )
        .unwrap();
        assert_eq!(u.tokens(), Tokens { prompt: 1000, completion: 100, cached_prompt: 800, reasoning: 40 });
        let u: UsageWire =
            serde_json::from_str(r#"{"prompt_tokens":3,"completion_tokens":null,"prompt_tokens_details":null}"#)
                .unwrap();
        assert_eq!(u.tokens(), Tokens::new(3, 0));
    }
}
