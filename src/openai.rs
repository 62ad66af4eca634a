//! The OpenAI wire format: request inspection, model rewriting, usage extraction and the error shape.
//!
//! Only this module knows field names of the OpenAI API. It inspects requests without re-serialising them
//! (unknown fields pass through byte for byte) and does no I/O.

use std::borrow::Cow;
use std::ops::Range;

use bytes::{Bytes, BytesMut};
use http::StatusCode;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

/// An error as the client sees it: an HTTP status and the OpenAI error body.
#[derive(Debug, Clone, PartialEq)]
pub struct ApiError {
    /// HTTP status.
    pub status: StatusCode,
    /// `error.type`.
    pub kind: &'static str,
    /// `error.code`.
    pub code: &'static str,
    /// `error.message`: never contains an upstream API key.
    pub message: String,
    /// `Retry-After` seconds to send, if any.
    pub retry_after_s: Option<u64>,
}

#[derive(Serialize)]
struct ErrorBody<'a> {
    error: ErrorInner<'a>,
}

#[derive(Serialize)]
struct ErrorInner<'a> {
    message: &'a str,
    #[serde(rename = "type")]
    kind: &'a str,
    param: Option<&'a str>,
    code: &'a str,
}

impl ApiError {
    /// A new error.
    pub fn new(status: StatusCode, kind: &'static str, code: &'static str, message: impl Into<String>) -> Self {
        ApiError { status, kind, code, message: message.into(), retry_after_s: None }
    }
    /// 400 `invalid_request_error`.
    pub fn invalid(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "invalid_request_error", code, message)
    }
    /// 404 `model_not_found`.
    pub fn model_not_found(model: &str) -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            "invalid_request_error",
            "model_not_found",
            format!(
                "The model `{model}` does not exist or is not served by this gateway. GET /v1/models lists the models."
            ),
        )
    }
    /// 502: an upstream answered something that is not a valid OpenAI answer.
    pub fn bad_upstream(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_GATEWAY, "upstream_error", "bad_upstream_response", message)
    }
    /// The JSON body.
    pub fn body(&self) -> Bytes {
        let b =
            ErrorBody { error: ErrorInner { message: &self.message, kind: self.kind, param: None, code: self.code } };
        // Serialising a struct of strings cannot fail.
        Bytes::from(serde_json::to_vec(&b).unwrap_or_default())
    }
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}: {}", self.status.as_u16(), self.code, self.message)
    }
}

/// What the gateway needs to know of a chat or embeddings request; the body itself is forwarded untouched.
#[derive(Debug, Clone, PartialEq)]
pub struct RequestInfo {
    /// The requested public model.
    pub model: String,
    /// Byte range of the `model` value (with its quotes) in the body, for rewriting.
    pub model_span: Range<usize>,
    /// `stream: true`.
    pub stream: bool,
    /// `stream_options.include_usage: true`.
    pub include_usage: bool,
}

const ROLES: [&str; 6] = ["system", "user", "assistant", "tool", "function", "developer"];

#[derive(Deserialize)]
struct ChatView<'a> {
    #[serde(borrow)]
    model: Option<&'a RawValue>,
    #[serde(borrow)]
    messages: Option<Vec<MessageView<'a>>>,
    max_tokens: Option<i64>,
    max_completion_tokens: Option<i64>,
    temperature: Option<f64>,
    stream: Option<bool>,
    stream_options: Option<StreamOptions>,
}

#[derive(Deserialize)]
struct MessageView<'a> {
    #[serde(borrow)]
    role: Option<Cow<'a, str>>,
}

#[derive(Deserialize)]
struct StreamOptions {
    include_usage: Option<bool>,
}

#[derive(Deserialize)]
struct EmbeddingsView<'a> {
    #[serde(borrow)]
    model: Option<&'a RawValue>,
    #[serde(borrow)]
    input: Option<&'a RawValue>,
}

fn json_error(e: serde_json::Error) -> ApiError {
    if e.is_data() {
        ApiError::invalid("invalid_request", format!("Invalid request body: {e}"))
    } else {
        ApiError::invalid("invalid_json", format!("The request body is not valid JSON: {e}"))
    }
}

fn model_of(body: &[u8], raw: Option<&RawValue>) -> Result<(String, Range<usize>), ApiError> {
    let raw = raw.ok_or_else(|| ApiError::invalid("missing_model", "`model` is required"))?;
    let model: Cow<str> =
        serde_json::from_str(raw.get()).map_err(|_| ApiError::invalid("invalid_model", "`model` must be a string"))?;
    if model.is_empty() {
        return Err(ApiError::invalid("invalid_model", "`model` must not be empty"));
    }
    // `raw` borrows from `body`, so its position inside it is a pointer difference.
    let start = raw.get().as_ptr() as usize - body.as_ptr() as usize;
    Ok((model.into_owned(), start..start + raw.get().len()))
}

/// Validate a chat completions request and return what routing needs.
pub fn inspect_chat(body: &[u8]) -> Result<RequestInfo, ApiError> {
    let v: ChatView = serde_json::from_slice(body).map_err(json_error)?;
    let messages = v.messages.ok_or_else(|| ApiError::invalid("missing_messages", "`messages` is required"))?;
    if messages.is_empty() {
        return Err(ApiError::invalid("empty_messages", "`messages` must contain at least one message"));
    }
    for (i, m) in messages.iter().enumerate() {
        match &m.role {
            Some(r) if ROLES.contains(&r.as_ref()) => {}
            Some(r) => {
                return Err(ApiError::invalid(
                    "invalid_role",
                    format!(
                        "messages[{i}].role {r:?} is not one of system, user, assistant, tool, function, developer"
                    ),
                ))
            }
            None => return Err(ApiError::invalid("invalid_role", format!("messages[{i}].role is required"))),
        }
    }
    for (name, v) in [("max_tokens", v.max_tokens), ("max_completion_tokens", v.max_completion_tokens)] {
        if let Some(n) = v {
            if n < 1 {
                return Err(ApiError::invalid("invalid_max_tokens", format!("`{name}` must be at least 1, got {n}")));
            }
        }
    }
    if let Some(t) = v.temperature {
        if !(0.0..=2.0).contains(&t) {
            return Err(ApiError::invalid(
                "invalid_temperature",
                format!("`temperature` must be between 0 and 2, got {t}"),
            ));
        }
    }
    let (model, model_span) = model_of(body, v.model)?;
    Ok(RequestInfo {
        model,
        model_span,
        stream: v.stream.unwrap_or(false),
        include_usage: v.stream_options.and_then(|o| o.include_usage).unwrap_or(false),
    })
}

/// Validate an embeddings request and return what routing needs.
pub fn inspect_embeddings(body: &[u8]) -> Result<RequestInfo, ApiError> {
    let v: EmbeddingsView = serde_json::from_slice(body).map_err(json_error)?;
    match v.input {
        None => return Err(ApiError::invalid("missing_input", "`input` is required")),
        Some(i) if matches!(i.get(), "null" | "\"\"" | "[]") => {
            return Err(ApiError::invalid("invalid_input", "`input` must not be empty"))
        }
        Some(_) => {}
    }
    let (model, model_span) = model_of(body, v.model)?;
    Ok(RequestInfo { model, model_span, stream: false, include_usage: false })
}

/// The body with the `model` value replaced by `upstream` (the same bytes when the name is unchanged).
pub fn rewrite_model(body: &Bytes, info: &RequestInfo, upstream: &str) -> Bytes {
    if upstream == info.model {
        return body.clone();
    }
    let quoted = serde_json::to_string(upstream).unwrap_or_default();
    let mut out = BytesMut::with_capacity(body.len() + quoted.len());
    out.extend_from_slice(&body[..info.model_span.start]);
    out.extend_from_slice(quoted.as_bytes());
    out.extend_from_slice(&body[info.model_span.end..]);
    out.freeze()
}

/// Token usage of an answer.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
pub struct Usage {
    /// Prompt (input) tokens.
    #[serde(default)]
    pub prompt_tokens: u64,
    /// Completion (output) tokens.
    #[serde(default)]
    pub completion_tokens: u64,
}

impl Usage {
    /// The price of these tokens in USD, for prices in USD per million tokens.
    pub fn cost_usd(self, input_usd_per_mtok: f64, output_usd_per_mtok: f64) -> f64 {
        (self.prompt_tokens as f64 * input_usd_per_mtok + self.completion_tokens as f64 * output_usd_per_mtok) / 1e6
    }
}

#[derive(Deserialize)]
struct UsageView {
    usage: Option<Usage>,
}

/// Check that a non-streaming answer is a JSON object and return its usage, if any. `Err` means garbage.
pub fn answer_usage(body: &[u8]) -> Result<Option<Usage>, String> {
    let v: UsageView = serde_json::from_slice(body).map_err(|e| e.to_string())?;
    Ok(v.usage)
}

/// Usage carried by one SSE payload chunk (`data: {...}` lines), if any. Only a chunk with a `"usage"` key
/// followed by an object is parsed, so ordinary delta chunks (also those with `"usage":null`, as OpenAI sends
/// with `include_usage`) cost one substring search.
pub fn stream_usage(chunk: &[u8]) -> Option<Usage> {
    let key = memchr::memmem::Finder::new(b"\"usage\"");
    let has_object = key.find_iter(chunk).any(|at| {
        let rest = chunk[at + 7..].trim_ascii_start();
        rest.strip_prefix(b":").is_some_and(|v| v.trim_ascii_start().first() == Some(&b'{'))
    });
    if !has_object {
        return None;
    }
    let mut found = None;
    for line in chunk.split(|&b| b == b'\n') {
        let Some(data) = line.strip_prefix(b"data:") else { continue };
        if let Ok(UsageView { usage: Some(u) }) = serde_json::from_slice::<UsageView>(data.trim_ascii()) {
            found = Some(u);
        }
    }
    found
}

/// An SSE event carrying an error, sent when a stream breaks after its first byte reached the client.
pub fn sse_error_event(err: &ApiError) -> Bytes {
    let mut out = BytesMut::with_capacity(err.message.len() + 96);
    out.extend_from_slice(b"data: ");
    out.extend_from_slice(&err.body());
    out.extend_from_slice(b"\n\ndata: [DONE]\n\n");
    out.freeze()
}

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

    fn err(body: &str) -> ApiError {
        inspect_chat(body.as_bytes()).unwrap_err()
    }

    #[test]
    fn inspects_and_rewrites_without_touching_other_fields() {
        let body = Bytes::from_static(
            br#"{"model" : "gpt-4.1","messages":[{"role":"user","content":"hi"}],"tools":[{"x":1}],"seed":7,"stream":true,"stream_options":{"include_usage":true}}"#,
        );
        let info = inspect_chat(&body).unwrap();
        assert_eq!(info.model, "gpt-4.1");
        assert!(info.stream && info.include_usage);
        assert_eq!(&body[info.model_span.clone()], b"\"gpt-4.1\"");
        let out = rewrite_model(&body, &info, "openai/gpt-4.1");
        assert_eq!(
            std::str::from_utf8(&out).unwrap(),
            r#"{"model" : "openai/gpt-4.1","messages":[{"role":"user","content":"hi"}],"tools":[{"x":1}],"seed":7,"stream":true,"stream_options":{"include_usage":true}}"#
        );
        assert_eq!(rewrite_model(&body, &info, "gpt-4.1").as_ptr(), body.as_ptr(), "no copy when unchanged");
    }

    #[test]
    fn escaped_model_name() {
        let body = br#"{"model":"gpt\u002d4.1","messages":[{"role":"user","content":"hi"}]}"#;
        assert_eq!(inspect_chat(body).unwrap().model, "gpt-4.1");
    }

    #[test]
    fn rejects_bad_requests_with_codes() {
        assert_eq!(err("not json").code, "invalid_json");
        assert_eq!(err("[1,2]").code, "invalid_request");
        assert_eq!(err(r#"{"model":"m"}"#).code, "missing_messages");
        assert_eq!(err(r#"{"model":"m","messages":[]}"#).code, "empty_messages");
        assert_eq!(err(r#"{"model":"m","messages":[{"content":"x"}]}"#).code, "invalid_role");
        assert_eq!(err(r#"{"model":"m","messages":[{"role":"wizard"}]}"#).code, "invalid_role");
        assert_eq!(err(r#"{"model":"m","messages":[{"role":"user"}],"max_tokens":0}"#).code, "invalid_max_tokens");
        assert_eq!(err(r#"{"model":"m","messages":[{"role":"user"}],"temperature":2.5}"#).code, "invalid_temperature");
        assert_eq!(err(r#"{"model":"m","messages":[{"role":"user"}],"temperature":-0.1}"#).code, "invalid_temperature");
        assert_eq!(err(r#"{"messages":[{"role":"user"}]}"#).code, "missing_model");
        assert_eq!(err(r#"{"model":3,"messages":[{"role":"user"}]}"#).code, "invalid_model");
        assert_eq!(err(r#"{"model":"m","messages":"hi"}"#).code, "invalid_request");
        assert!(inspect_chat(br#"{"model":"m","messages":[{"role":"user"}],"temperature":2}"#).is_ok());
    }

    #[test]
    fn error_body_shape() {
        let e = ApiError::model_not_found("x");
        let v: serde_json::Value = serde_json::from_slice(&e.body()).unwrap();
        assert_eq!(v["error"]["code"], "model_not_found");
        assert_eq!(v["error"]["type"], "invalid_request_error");
        assert!(v["error"]["message"].as_str().unwrap().contains("`x`"));
    }

    #[test]
    fn usage_from_answer_and_stream() {
        assert_eq!(
            answer_usage(br#"{"usage":{"prompt_tokens":3,"completion_tokens":5,"total_tokens":8}}"#).unwrap(),
            Some(Usage { prompt_tokens: 3, completion_tokens: 5 })
        );
        assert!(answer_usage(b"<html>").is_err());
        let chunk =
            b"data: {\"choices\":[],\"usage\":{\"prompt_tokens\":2,\"completion_tokens\":9}}\n\ndata: [DONE]\n\n";
        assert_eq!(stream_usage(chunk), Some(Usage { prompt_tokens: 2, completion_tokens: 9 }));
        assert_eq!(stream_usage(b"data: {\"choices\":[{\"delta\":{\"content\":\"a\"}}]}\n\n"), None);
        // `"usage": null` on ordinary chunks (OpenAI with include_usage), and the word in the content.
        assert_eq!(stream_usage(b"data: {\"choices\":[{\"delta\":{\"content\":\"a\"}}],\"usage\": null}\n\n"), None);
        assert_eq!(stream_usage(b"data: {\"choices\":[{\"delta\":{\"content\":\"\\\"usage\\\"\"}}]}\n\n"), None);
        let spaced = b"data: {\"choices\": [], \"usage\" : {\"prompt_tokens\": 1, \"completion_tokens\": 2}}\n\n";
        assert_eq!(stream_usage(spaced), Some(Usage { prompt_tokens: 1, completion_tokens: 2 }));
    }

    #[test]
    fn embeddings_validation() {
        assert!(inspect_embeddings(br#"{"model":"e","input":"hi"}"#).is_ok());
        assert_eq!(inspect_embeddings(br#"{"model":"e"}"#).unwrap_err().code, "missing_input");
        assert_eq!(inspect_embeddings(br#"{"model":"e","input":[]}"#).unwrap_err().code, "invalid_input");
    }
}
