//! What the mock says: the deterministic answer of a chat completion, the tokens it bills, and embeddings.
//!
//! Owns: the answer template and its expansion into pieces ([`answer_pieces`], [`answer_pieces_of`]), the
//! prompt token count ([`prompt_tokens`]), the `usage` object, embedding inputs and vectors, and base64.
//! Must not: read a clock, draw randomness or do I/O. The same request must always get the same answer,
//! because tests elsewhere compare against these functions.

use serde::Serialize;
use serde_json::Value;

/// Number of floats in every embedding vector.
const EMBEDDING_DIMS: usize = 8;
/// Pieces of an answer by default: the template once.
pub const DEFAULT_ANSWER_TOKENS: usize = ANSWER_TEMPLATE.len();

/// The answer template; `{name}` and `{model}` are replaced by the mock's name and the requested model.
const ANSWER_TEMPLATE: [&str; 20] = [
    "Hello",
    " from",
    " {name}",
    ",",
    " a",
    " simulated",
    " upstream",
    " serving",
    " {model}",
    ".",
    " This",
    " answer",
    " is",
    " deterministic",
    " and",
    " streams",
    " piece",
    " by",
    " piece",
    ".",
];

/// The deterministic answer pieces (one per stream chunk) for (mock name, model, max_tokens) of a mock with the
/// default answer length; the non-streaming answer's content is their concatenation. `max_tokens` keeps only the
/// first pieces.
pub fn answer_pieces(name: &str, model: &str, max_tokens: Option<u32>) -> Vec<String> {
    answer_pieces_of(name, model, DEFAULT_ANSWER_TOKENS, max_tokens)
}

/// Like [`answer_pieces`] for a mock started with `--answer-tokens answer_tokens`: the template repeated
/// cyclically up to `answer_tokens` pieces, then cut to `max_tokens`.
pub fn answer_pieces_of(name: &str, model: &str, answer_tokens: usize, max_tokens: Option<u32>) -> Vec<String> {
    let keep = max_tokens.map_or(answer_tokens, |n| usize::try_from(n).map_or(answer_tokens, |n| n.min(answer_tokens)));
    ANSWER_TEMPLATE
        .iter()
        .cycle()
        .take(keep)
        .map(|p| match *p {
            " {name}" => format!(" {name}"),
            " {model}" => format!(" {model}"),
            other => other.to_owned(),
        })
        .collect()
}

/// Prompt tokens the mock bills for chat `messages`: ceil(characters of all text contents / 4) + 3 per message.
/// A content is a string or an array of parts whose `text` fields count.
pub fn prompt_tokens(messages: &[Value]) -> u32 {
    let chars: usize = messages
        .iter()
        .map(|m| match m.get("content") {
            Some(Value::String(s)) => s.chars().count(),
            Some(Value::Array(parts)) => {
                parts.iter().filter_map(|p| p.get("text").and_then(Value::as_str)).map(|t| t.chars().count()).sum()
            }
            _ => 0,
        })
        .sum();
    let tokens = chars.div_ceil(4).saturating_add(messages.len().saturating_mul(3));
    u32::try_from(tokens).unwrap_or(u32::MAX)
}

/// Standard base64 (RFC 4648, with padding).
pub fn base64_encode(data: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for chunk in data.chunks(3) {
        let b0 = u32::from(chunk[0]);
        let b1 = u32::from(chunk.get(1).copied().unwrap_or(0));
        let b2 = u32::from(chunk.get(2).copied().unwrap_or(0));
        let n = (b0 << 16) | (b1 << 8) | b2;
        let sextet = |shift: u32| char::from(ALPHABET[((n >> shift) & 63) as usize]);
        out.push(sextet(18));
        out.push(sextet(12));
        out.push(if chunk.len() > 1 { sextet(6) } else { '=' });
        out.push(if chunk.len() > 2 { sextet(0) } else { '=' });
    }
    out
}

/// A unit-length vector of [`EMBEDDING_DIMS`] floats derived from `bytes` (FNV-1a, then splitmix64).
pub(crate) fn embedding_vector(bytes: &[u8]) -> [f32; EMBEDDING_DIMS] {
    let mut state =
        bytes.iter().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3));
    let mut raw = [0f64; EMBEDDING_DIMS];
    for v in &mut raw {
        state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^= z >> 31;
        *v = (z >> 11) as f64 / (1u64 << 53) as f64 * 2.0 - 1.0;
    }
    let norm = raw.iter().map(|v| v * v).sum::<f64>().sqrt();
    let norm = if norm > 0.0 { norm } else { 1.0 };
    raw.map(|v| (v / norm) as f32)
}

/// One embedding input: the bytes its vector derives from, and the tokens it bills.
pub(crate) struct EmbeddingInput {
    pub(crate) key: Vec<u8>,
    pub(crate) tokens: u32,
}

fn text_tokens(s: &str) -> u32 {
    u32::try_from(s.chars().count().div_ceil(4)).unwrap_or(u32::MAX)
}

fn token_array(v: &[Value]) -> Option<EmbeddingInput> {
    let mut key = Vec::with_capacity(v.len() * 4);
    for t in v {
        let t = u32::try_from(t.as_u64()?).ok()?;
        key.extend_from_slice(&t.to_le_bytes());
    }
    Some(EmbeddingInput { key, tokens: u32::try_from(v.len()).unwrap_or(u32::MAX) })
}

/// Reads `input` of an embeddings request: a string, strings, a token array or token arrays.
pub(crate) fn embedding_inputs(input: &Value) -> Option<Vec<EmbeddingInput>> {
    match input {
        Value::String(s) => Some(vec![EmbeddingInput { key: s.as_bytes().to_vec(), tokens: text_tokens(s) }]),
        Value::Array(items) if items.is_empty() => None,
        Value::Array(items) if items.iter().all(Value::is_number) => Some(vec![token_array(items)?]),
        Value::Array(items) => items
            .iter()
            .map(|item| match item {
                Value::String(s) => Some(EmbeddingInput { key: s.as_bytes().to_vec(), tokens: text_tokens(s) }),
                Value::Array(tokens) if !tokens.is_empty() => token_array(tokens),
                _ => None,
            })
            .collect(),
        _ => None,
    }
}

/// The `usage` of a chat completion: prompt and completion tokens as the mock bills them.
#[derive(Serialize, Clone, Copy, Debug, PartialEq)]
pub(crate) struct Usage {
    pub(crate) prompt_tokens: u32,
    pub(crate) completion_tokens: u32,
    pub(crate) total_tokens: u32,
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn answer_pieces_are_deterministic_and_name_mock_and_model() {
        let a = answer_pieces("alpha", "gpt-4.1", None);
        assert_eq!(a, answer_pieces("alpha", "gpt-4.1", None));
        assert_eq!(a.len(), ANSWER_TEMPLATE.len());
        let text = a.concat();
        assert!(text.starts_with("Hello from alpha,"), "{text}");
        assert!(text.contains(" serving gpt-4.1."), "{text}");
        assert_ne!(a, answer_pieces("beta", "gpt-4.1", None));
        assert_ne!(a, answer_pieces("alpha", "other", None));
    }

    #[test]
    fn answer_pieces_truncate_to_max_tokens() {
        let full = answer_pieces("m", "x", None);
        assert_eq!(answer_pieces("m", "x", Some(3)), full[..3].to_vec());
        assert!(answer_pieces("m", "x", Some(0)).is_empty());
        assert_eq!(answer_pieces("m", "x", Some(1000)), full);
        assert_eq!(answer_pieces("m", "x", Some(u32::MAX)), full);
    }

    #[test]
    fn answer_pieces_repeat_the_template_cyclically() {
        let once = answer_pieces("m", "x", None);
        let long = answer_pieces_of("m", "x", 45, None);
        assert_eq!(long.len(), 45);
        assert_eq!(long[..20], once[..]);
        assert_eq!(long[20..40], once[..]);
        assert_eq!(long[40..], once[..5]);
        assert_eq!(answer_pieces_of("m", "x", 45, Some(30)), long[..30].to_vec());
        assert_eq!(answer_pieces_of("m", "x", 7, None), once[..7].to_vec());
        assert!(answer_pieces_of("m", "x", 0, None).is_empty());
        assert_eq!(answer_pieces_of("m", "x", DEFAULT_ANSWER_TOKENS, Some(3)), answer_pieces("m", "x", Some(3)));
    }

    #[test]
    fn prompt_tokens_count_strings_and_text_parts() {
        let msgs = json!([
            {"role": "system", "content": "abcd"},          // 4 chars
            {"role": "user", "content": [
                {"type": "text", "text": "hello"},            // 5 chars
                {"type": "image_url", "image_url": {"url": "http://x"}},
                {"type": "text", "text": "é"},                // 1 char, 2 bytes
            ]},
            {"role": "assistant", "content": null},
        ]);
        let msgs = msgs.as_array().cloned().unwrap_or_default();
        // ceil(10 / 4) + 3 * 3
        assert_eq!(prompt_tokens(&msgs), 3 + 9);
        assert_eq!(prompt_tokens(&[]), 0);
        assert_eq!(prompt_tokens(&[json!({"role": "user", "content": "a"})]), 1 + 3);
    }

    #[test]
    fn base64_matches_rfc4648_vectors() {
        let cases = [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foob", "Zm9vYg=="),
            ("fooba", "Zm9vYmE="),
            ("foobar", "Zm9vYmFy"),
        ];
        for (plain, encoded) in cases {
            assert_eq!(base64_encode(plain.as_bytes()), encoded, "{plain}");
        }
        assert_eq!(base64_encode(&[0xfb, 0xff, 0xbf]), "+/+/");
    }

    #[test]
    fn embeddings_are_deterministic_unit_vectors() {
        let a = embedding_vector(b"hello");
        assert_eq!(a, embedding_vector(b"hello"));
        assert_ne!(a, embedding_vector(b"hellp"));
        let norm: f32 = a.iter().map(|v| v * v).sum::<f32>().sqrt();
        assert!((norm - 1.0).abs() < 1e-5, "{norm}");
        assert!(a.iter().all(|v| v.abs() <= 1.0));
    }

    #[test]
    fn embedding_inputs_accept_the_openai_shapes() {
        let count = |v: Value| embedding_inputs(&v).map(|i| i.len());
        assert_eq!(count(json!("abc")), Some(1));
        assert_eq!(count(json!(["a", "b", "c"])), Some(3));
        assert_eq!(count(json!([1, 2, 3])), Some(1));
        assert_eq!(count(json!([[1, 2], [3]])), Some(2));
        assert_eq!(count(json!([])), None);
        assert_eq!(count(json!([["a"]])), None);
        assert_eq!(count(json!(42)), None);
        let tokens: Vec<u32> =
            embedding_inputs(&json!(["abcde", [7, 8, 9]])).unwrap_or_default().iter().map(|i| i.tokens).collect();
        assert_eq!(tokens, vec![2, 3]);
    }
}
