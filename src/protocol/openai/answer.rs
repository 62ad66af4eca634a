//! Answers: what a non-streaming upstream answer carries (its usage), and the answers the gateway makes itself
//! (the model list, a static fallback as JSON or as a stream).

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use sheepdog_policy::pricing::Tokens;

use super::error::UpstreamError;
use super::usage::UsageWire;
use crate::protocol::Api;

/// Why a 2xx upstream answer is not an answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BadAnswer {
    /// It carries an error object.
    Error(UpstreamError),
    /// It is something else: what it is.
    Garbage(&'static str),
}

#[derive(Deserialize)]
struct AnswerView<'a> {
    #[serde(borrow, default)]
    choices: Option<&'a RawValue>,
    #[serde(borrow, default)]
    data: Option<&'a RawValue>,
    #[serde(borrow, default)]
    error: Option<&'a RawValue>,
    #[serde(default, deserialize_with = "super::usage::lenient")]
    usage: Option<UsageWire>,
}

/// Whether a raw JSON value is a non-empty array.
fn non_empty_array(v: Option<&RawValue>) -> bool {
    v.is_some_and(|v| {
        let s = v.get().as_bytes();
        s.first() == Some(&b'[') && s[1..].iter().find(|b| !b.is_ascii_whitespace()) != Some(&b']')
    })
}

/// Check that a non-streaming 2xx answer is an answer — a JSON object with `choices` (chat) or `data`
/// (embeddings) and no error — and return its usage, if any.
pub fn check_answer(api: Api, body: &[u8]) -> Result<Option<Tokens>, BadAnswer> {
    if body.trim_ascii_start().first() != Some(&b'{') {
        return Err(BadAnswer::Garbage(if body.trim_ascii().is_empty() {
            "an empty body"
        } else {
            "something that is not a JSON object"
        }));
    }
    // JSON is UTF-8, and serde_json checks it only in the strings it keeps: an answer that is not would reach the
    // client as a 200 it cannot parse.
    let text = std::str::from_utf8(body).map_err(|_| BadAnswer::Garbage("invalid UTF-8"))?;
    let v: AnswerView = serde_json::from_str(text).map_err(|_| BadAnswer::Garbage("invalid JSON"))?;
    if v.error.is_some_and(|e| e.get() != "null") {
        return Err(UpstreamError::from_body(body).map_or(BadAnswer::Garbage("an unreadable error"), BadAnswer::Error));
    }
    let ok = match api {
        Api::Chat => non_empty_array(v.choices),
        Api::Embeddings => non_empty_array(v.data),
    };
    if !ok {
        return Err(BadAnswer::Garbage(match api {
            Api::Chat => "a JSON object without `choices`",
            Api::Embeddings => "a JSON object without `data`",
        }));
    }
    Ok(v.usage.map(|u| u.tokens()))
}

/// The usage of an answer already known to be one (health probes read no more than this).
pub fn answer_usage(body: &[u8]) -> Result<Option<Tokens>, BadAnswer> {
    check_answer(Api::Chat, body).or_else(|e| match e {
        // Embedding probes answer with `data`.
        BadAnswer::Garbage(_) => check_answer(Api::Embeddings, body),
        e => Err(e),
    })
}

/// `created` of every model in `/v1/models` (a fixed date: the list describes configuration, not history).
pub const MODELS_CREATED: u64 = 1_735_689_600;

/// The `/v1/models` list for these public model names.
pub fn model_list(names: &[&str], created: u64) -> Bytes {
    #[derive(Serialize)]
    struct Model<'a> {
        id: &'a str,
        object: &'static str,
        created: u64,
        owned_by: &'static str,
    }
    #[derive(Serialize)]
    struct List<'a> {
        object: &'static str,
        data: Vec<Model<'a>>,
    }
    let list = List {
        object: "list",
        data: names.iter().map(|id| Model { id, object: "model", created, owned_by: "sheepdog" }).collect(),
    };
    Bytes::from(serde_json::to_vec(&list).unwrap_or_default())
}

/// A static answer in the chat completion shape, marked as such, for a model configured with one.
pub fn static_answer(model: &str, content: &str, created: u64) -> Bytes {
    let v = serde_json::json!({
        "id": "chatcmpl-sheepdog-static",
        "object": "chat.completion",
        "created": created,
        "model": model,
        "system_fingerprint": "sheepdog-static-fallback",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0},
    });
    Bytes::from(serde_json::to_vec(&v).unwrap_or_default())
}

/// The same answer as one SSE stream, for streaming requests.
pub fn static_stream(model: &str, content: &str, created: u64) -> Bytes {
    let chunk = |delta: serde_json::Value, finish: Option<&str>| {
        serde_json::json!({
            "id": "chatcmpl-sheepdog-static", "object": "chat.completion.chunk", "created": created, "model": model,
            "system_fingerprint": "sheepdog-static-fallback",
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
        })
    };
    let mut out = String::new();
    for c in [
        chunk(serde_json::json!({"role": "assistant", "content": content}), None),
        chunk(serde_json::json!({}), Some("stop")),
    ] {
        out.push_str("data: ");
        out.push_str(&c.to_string());
        out.push_str("\n\n");
    }
    out.push_str("data: [DONE]\n\n");
    Bytes::from(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_answer_must_be_an_object_with_choices_or_data() {
        let chat = |b: &str| check_answer(Api::Chat, b.as_bytes());
        assert_eq!(
            chat(r#"{"choices":[{"index":0}],"usage":{"prompt_tokens":3,"completion_tokens":5,"total_tokens":8}}"#),
            Ok(Some(Tokens::new(3, 5)))
        );
        assert_eq!(chat(r#" {"choices": [ {} ], "error": null}"#), Ok(None));
        assert_eq!(chat("{}"), Err(BadAnswer::Garbage("a JSON object without `choices`")));
        assert_eq!(chat(r#"{"choices":[ ]}"#), Err(BadAnswer::Garbage("a JSON object without `choices`")));
        assert_eq!(chat(r#"{"choices":null}"#), Err(BadAnswer::Garbage("a JSON object without `choices`")));
        assert_eq!(chat("<html>challenge</html>"), Err(BadAnswer::Garbage("something that is not a JSON object")));
        assert_eq!(chat(r#"[{"choices":[1]}]"#), Err(BadAnswer::Garbage("something that is not a JSON object")));
        assert_eq!(chat(""), Err(BadAnswer::Garbage("an empty body")));
        // An odd `usage` is no usage, not a refusal of the answer (found by the `answer` fuzz target).
        let odd =
            [r#""usage":{"prompt_tokens":3,"prompt_tokens":3}"#, r#""usage":{"prompt_tokens":-1}"#, r#""usage":7"#];
        for u in odd {
            assert_eq!(chat(&format!(r#"{{"choices":[{{}}],{u}}}"#)), Ok(None), "{u}");
        }
        assert_eq!(chat(r#"{"choices":[{}],"usage":null}"#), Ok(None));
        // Invalid UTF-8 in a field nobody reads is still not JSON (found by the `answer` fuzz target).
        let bad = b"{\"object\":\"lis\xff\",\"choices\":[{}]}";
        assert_eq!(check_answer(Api::Chat, bad), Err(BadAnswer::Garbage("invalid UTF-8")));
        assert!(matches!(chat(r#"{"error":{"message":"no","type":"server_error"}}"#), Err(BadAnswer::Error(_))));
        let emb = |b: &str| check_answer(Api::Embeddings, b.as_bytes());
        assert_eq!(emb(r#"{"data":[{"embedding":[0.1]}]}"#), Ok(None));
        assert!(emb(r#"{"choices":[{}]}"#).is_err());
        assert_eq!(
            answer_usage(r#"{"data":[{}],"usage":{"prompt_tokens":2}}"#.as_bytes()),
            Ok(Some(Tokens::new(2, 0)))
        );
    }

    #[test]
    fn static_answers_are_valid_openai() {
        let v: serde_json::Value = serde_json::from_slice(&static_answer("m", "busy", 1)).unwrap();
        assert_eq!(v["choices"][0]["message"]["content"], "busy");
        let s = String::from_utf8(static_stream("m", "busy", 1).to_vec()).unwrap();
        assert!(s.ends_with("data: [DONE]\n\n"), "{s}");
        let l: serde_json::Value = serde_json::from_slice(&model_list(&["a", "b"], 1)).unwrap();
        assert_eq!(l["data"][1]["id"], "b");
    }
}
