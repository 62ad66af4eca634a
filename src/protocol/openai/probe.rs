//! Health probes in OpenAI's format: the smallest chat completion or embedding request for a model, and the
//! check of a `GET /models` answer. The prober sends them; it does not know their fields.

use bytes::Bytes;
use serde::Deserialize;

/// The body of a one-token chat completion probe.
pub fn chat_probe(upstream_model: &str, prompt: &str) -> Bytes {
    let b = serde_json::json!({
        "model": upstream_model,
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": 1,
    });
    Bytes::from(b.to_string())
}

/// The body of an embeddings probe.
pub fn embeddings_probe(upstream_model: &str, input: &str) -> Bytes {
    Bytes::from(serde_json::json!({"model": upstream_model, "input": input}).to_string())
}

#[derive(Deserialize)]
struct ModelList {
    data: Vec<ModelId>,
}

#[derive(Deserialize)]
struct ModelId {
    id: String,
}

/// Whether a `GET /models` answer lists `upstream_model`; `None` when it is not a model list.
pub fn lists_model(body: &[u8], upstream_model: &str) -> Option<bool> {
    let l: ModelList = serde_json::from_slice(body).ok()?;
    Some(l.data.iter().any(|m| m.id == upstream_model))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn probes_are_minimal_requests() {
        let v: serde_json::Value = serde_json::from_slice(&chat_probe("openai/gpt-4.1", "ping")).unwrap();
        assert_eq!(v["model"], "openai/gpt-4.1");
        assert_eq!(v["max_tokens"], 1);
        assert_eq!(v["messages"][0]["content"], "ping");
        let v: serde_json::Value = serde_json::from_slice(&embeddings_probe("e", "ping")).unwrap();
        assert_eq!(v["input"], "ping");
        assert_eq!(lists_model(br#"{"object":"list","data":[{"id":"a"},{"id":"b"}]}"#, "b"), Some(true));
        assert_eq!(lists_model(br#"{"data":[]}"#, "b"), Some(false));
        assert!(lists_model(b"<html>", "b").is_none());
    }
}
