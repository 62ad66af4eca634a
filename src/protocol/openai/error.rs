//! OpenAI's error shape: `{"error": {"message", "type", "param", "code"}}`, for answers and for the SSE error
//! event that ends a stream broken after its first byte.

use bytes::{Bytes, BytesMut};
use serde::Serialize;

use crate::protocol::ApiError;

/// What an error object from an upstream means for the gateway.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorClass {
    /// Rate limited or out of quota: try elsewhere, counts against the endpoint.
    RateLimited,
    /// The request itself was refused (invalid, too long, flagged by moderation): back to the client, no
    /// retry, no verdict on the key or the endpoint.
    Request,
    /// The API key was refused: try another key; the key becomes suspect.
    Auth,
    /// Anything else: the endpoint's failure; try elsewhere.
    Server,
}

/// An error object an upstream sent in place of an answer (`{"error": {...}}`, with any status).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpstreamError {
    /// What it means.
    pub class: ErrorClass,
    /// `error.message` (or the error when it is a bare string); not yet scrubbed of keys.
    pub message: String,
    /// `error.type`, when given.
    pub kind: Option<String>,
    /// `error.code`, when given (numbers as text).
    pub code: Option<String>,
}

impl UpstreamError {
    /// Read an `error` value (an object, or a bare message string) and classify it.
    pub fn from_value(v: &serde_json::Value) -> UpstreamError {
        let text = |x: &serde_json::Value| match x {
            serde_json::Value::String(s) => Some(s.clone()),
            serde_json::Value::Number(n) => Some(n.to_string()),
            _ => None,
        };
        let (message, kind, code) = match v {
            serde_json::Value::Object(o) => (
                o.get("message").and_then(text).unwrap_or_default(),
                o.get("type").and_then(text),
                o.get("code").and_then(text).or_else(|| o.get("status").and_then(text)),
            ),
            other => (text(other).unwrap_or_default(), None, None),
        };
        let class = classify(kind.as_deref(), code.as_deref());
        UpstreamError { class, message, kind, code }
    }

    /// The error object of a JSON body, if it is `{"error": …}` with a non-null error.
    pub fn from_body(body: &[u8]) -> Option<UpstreamError> {
        let v: serde_json::Value = serde_json::from_slice(body).ok()?;
        let e = v.get("error").filter(|e| !e.is_null())?;
        Some(UpstreamError::from_value(e))
    }
}

/// Classify an error by its `type` and `code` (OpenAI's names, and the common ones of other providers).
fn classify(kind: Option<&str>, code: Option<&str>) -> ErrorClass {
    let has = |needles: &[&str]| {
        [kind, code].iter().flatten().any(|s| {
            let s = s.to_ascii_lowercase();
            needles.iter().any(|n| s.contains(n))
        })
    };
    if has(&["rate_limit", "insufficient_quota", "429"]) {
        ErrorClass::RateLimited
    } else if has(&["authentication", "invalid_api_key", "401"]) {
        ErrorClass::Auth
    } else if has(&[
        "invalid_request",
        "context_length",
        "content_filter",
        "content_policy",
        "moderation",
        "permission",
        "not_found",
        "400",
        "403",
        "404",
        "413",
        "422",
    ]) {
        ErrorClass::Request
    } else {
        ErrorClass::Server
    }
}

/// The body the client gets for an upstream's refusal of its request: the upstream's message (already
/// scrubbed), type and code, in OpenAI's shape.
pub fn refusal_body(message: &str, kind: Option<&str>, code: Option<&str>) -> Bytes {
    let b = serde_json::json!({"error": {
        "message": message,
        "type": kind.unwrap_or("invalid_request_error"),
        "param": null,
        "code": code.unwrap_or("upstream_refused"),
    }});
    Bytes::from(b.to_string())
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

/// The JSON body of `e`.
pub fn error_body(e: &ApiError) -> Bytes {
    let b = ErrorBody { error: ErrorInner { message: &e.message, kind: e.kind, param: None, code: e.code } };
    // Serialising a struct of strings cannot fail.
    Bytes::from(serde_json::to_vec(&b).unwrap_or_default())
}

/// An SSE event carrying an error, sent when a stream breaks after its first byte reached the client.
pub fn sse_error_event(err: &ApiError) -> Bytes {
    let mut out = BytesMut::with_capacity(err.message.len() + 96);
    out.extend_from_slice(b"data: ");
    out.extend_from_slice(&error_body(err));
    out.extend_from_slice(b"\n\ndata: [DONE]\n\n");
    out.freeze()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_body_shape() {
        let e = ApiError::model_not_found("x");
        let v: serde_json::Value = serde_json::from_slice(&e.body()).unwrap();
        assert_eq!(v["error"]["code"], "model_not_found");
        assert_eq!(v["error"]["type"], "invalid_request_error");
        assert!(v["error"]["message"].as_str().unwrap().contains("`x`"));
        let ev = sse_error_event(&e);
        assert!(ev.len() > 20);
        assert!(ev.starts_with(b"data: {\"error\":"));
        assert!(ev.ends_with(b"\n\ndata: [DONE]\n\n"));
    }

    #[test]
    fn upstream_error_objects_are_classified() {
        let class = |body: &str| UpstreamError::from_body(body.as_bytes()).map(|e| e.class);
        assert_eq!(
            class(r#"{"error":{"message":"slow down","type":"rate_limit_error"}}"#),
            Some(ErrorClass::RateLimited)
        );
        assert_eq!(
            class(r#"{"error":{"message":"quota","type":"insufficient_quota"}}"#),
            Some(ErrorClass::RateLimited)
        );
        assert_eq!(class(r#"{"error":{"message":"x","code":"invalid_api_key"}}"#), Some(ErrorClass::Auth));
        assert_eq!(
            class(r#"{"error":{"message":"flagged","type":"invalid_request_error","code":"content_filter"}}"#),
            Some(ErrorClass::Request)
        );
        assert_eq!(
            class(r#"{"error":{"message":"too long","code":"context_length_exceeded"}}"#),
            Some(ErrorClass::Request)
        );
        assert_eq!(class(r#"{"error":{"message":"boom","code":500}}"#), Some(ErrorClass::Server));
        assert_eq!(class(r#"{"error":"upstream exploded"}"#), Some(ErrorClass::Server));
        assert_eq!(class(r#"{"error":null,"choices":[]}"#), None);
        assert_eq!(class("<html>"), None);
        let e = UpstreamError::from_body(br#"{"error":{"message":"m","type":"t","code":42}}"#).unwrap();
        assert_eq!((e.message.as_str(), e.kind.as_deref(), e.code.as_deref()), ("m", Some("t"), Some("42")));
        let v: serde_json::Value = serde_json::from_slice(&refusal_body("m", None, Some("c"))).unwrap();
        assert_eq!(v["error"]["type"], "invalid_request_error");
        assert_eq!(v["error"]["code"], "c");
    }
}
