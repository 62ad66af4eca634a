//! Client requests: validate a chat or embeddings body and find what routing needs ([`RequestInfo`]) without
//! re-serialising it, and replace the `model` value for an upstream (the only change made to a body).

use std::borrow::Cow;
use std::ops::Range;

use bytes::{Bytes, BytesMut};
use serde::Deserialize;
use serde_json::value::RawValue;

use crate::protocol::{ApiError, RequestInfo};

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
    #[serde(borrow)]
    stream_options: Option<&'a RawValue>,
    n: Option<i64>,
    #[serde(borrow)]
    tools: Option<&'a RawValue>,
    #[serde(borrow)]
    functions: Option<&'a RawValue>,
    #[serde(borrow)]
    metadata: Option<&'a RawValue>,
}

#[derive(Deserialize)]
struct MessageView<'a> {
    #[serde(borrow)]
    role: Option<Cow<'a, str>>,
    #[serde(borrow)]
    content: Option<&'a RawValue>,
}

/// The byte range of `raw`, which borrows from `body`, inside `body`.
fn span_in(body: &[u8], raw: &RawValue) -> Range<usize> {
    let start = raw.get().as_ptr() as usize - body.as_ptr() as usize;
    start..start + raw.get().len()
}

/// Whether a raw JSON value is present and not `null` or an empty array.
fn non_empty(v: Option<&RawValue>) -> bool {
    v.is_some_and(|v| !matches!(v.get().trim(), "null" | "[]"))
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

/// Parse a request body that must be a JSON object (serde would read a struct from an array too). JSON is UTF-8,
/// and serde_json checks that only in the strings it keeps: the whole body is checked first, so a body that is
/// not JSON is refused here rather than forwarded.
fn object<'a, T: Deserialize<'a>>(body: &'a [u8]) -> Result<T, ApiError> {
    let text = std::str::from_utf8(body).map_err(|e| {
        ApiError::invalid("invalid_json", format!("The request body is not valid JSON: not UTF-8 ({e})"))
    })?;
    match text.trim_ascii_start().as_bytes().first() {
        Some(b'{') => serde_json::from_str(text).map_err(json_error),
        None => Err(ApiError::invalid("invalid_json", "The request body is empty; it must be a JSON object")),
        Some(_) => match serde_json::from_str::<serde::de::IgnoredAny>(text) {
            Ok(_) => Err(ApiError::invalid("invalid_request", "The request body must be a JSON object")),
            Err(e) => Err(json_error(e)),
        },
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
    Ok((model.into_owned(), span_in(body, raw)))
}

/// Validate a chat completions request and return what routing needs.
pub fn inspect_chat(body: &[u8]) -> Result<RequestInfo, ApiError> {
    let v: ChatView = object(body)?;
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
    let n = match v.n {
        None => 1,
        Some(n) if (1..=128).contains(&n) => n as u32,
        Some(n) => return Err(ApiError::invalid("invalid_n", format!("`n` must be between 1 and 128, got {n}"))),
    };
    if let Some(m) = v.metadata {
        if !matches!(m.get().trim_start().as_bytes().first(), Some(b'{') | Some(b'n')) {
            return Err(ApiError::invalid("invalid_metadata", "`metadata` must be an object"));
        }
    }
    let last_user = messages
        .iter()
        .rev()
        .find(|m| m.role.as_deref() == Some("user"))
        .and_then(|m| m.content)
        .map(|c| span_in(body, c));
    let stream_options = v.stream_options.filter(|o| o.get().trim() != "null");
    let include_usage = match stream_options {
        None => false,
        Some(o) => serde_json::from_str::<StreamOptions>(o.get())
            .map_err(|_| ApiError::invalid("invalid_stream_options", "`stream_options` must be an object"))?
            .include_usage
            .unwrap_or(false),
    };
    let (model, model_span) = model_of(body, v.model)?;
    Ok(RequestInfo {
        model,
        model_span,
        stream: v.stream.unwrap_or(false),
        include_usage,
        // `null` too: it is replaced, never duplicated, when usage is asked for.
        stream_options: v.stream_options.map(|o| span_in(body, o)),
        max_tokens: v.max_completion_tokens.or(v.max_tokens).map(|n| n as u64),
        n,
        has_tools: non_empty(v.tools) || non_empty(v.functions),
        last_user,
        metadata: v.metadata.filter(|m| m.get().trim() != "null").map(|m| span_in(body, m)),
    })
}

/// Validate an embeddings request and return what routing needs.
pub fn inspect_embeddings(body: &[u8]) -> Result<RequestInfo, ApiError> {
    let v: EmbeddingsView = object(body)?;
    match v.input {
        None => return Err(ApiError::invalid("missing_input", "`input` is required")),
        Some(i) if matches!(i.get(), "null" | "\"\"" | "[]") => {
            return Err(ApiError::invalid("invalid_input", "`input` must not be empty"))
        }
        Some(_) => {}
    }
    let (model, model_span) = model_of(body, v.model)?;
    Ok(RequestInfo { model, model_span, n: 1, ..RequestInfo::default() })
}

/// Whether the upstream is asked for a stream's usage although the client did not ask: then the relay removes
/// it again ([`super::SseScanner::hiding_usage`]), so the client sees what it would have seen.
pub fn usage_forced(info: &RequestInfo) -> bool {
    info.stream && !info.include_usage
}

/// The body as an upstream gets it: the `model` value replaced by `upstream`'s name, and for a stream whose
/// client did not ask for usage, `stream_options.include_usage` set to true so that the stream's cost is
/// known. Nothing else changes; the same bytes when neither applies.
pub fn upstream_body(body: &Bytes, info: &RequestInfo, upstream: &str) -> Bytes {
    let force = usage_forced(info);
    if upstream == info.model && !force {
        return body.clone();
    }
    let mut edits: Vec<(Range<usize>, Vec<u8>)> = Vec::with_capacity(2);
    if upstream != info.model {
        edits.push((info.model_span.clone(), serde_json::to_vec(upstream).unwrap_or_default()));
    }
    if force {
        match &info.stream_options {
            Some(span) => {
                // Keep the client's other stream options.
                let mut o: serde_json::Map<String, serde_json::Value> =
                    serde_json::from_slice(&body[span.clone()]).unwrap_or_default();
                o.insert("include_usage".into(), serde_json::Value::Bool(true));
                edits.push((span.clone(), serde_json::to_vec(&o).unwrap_or_default()));
            }
            None => {
                // A chat request is an object with at least `model` and `messages`: insert as its first member.
                let at = memchr::memchr(b'{', body).map_or(0, |i| i + 1);
                edits.push((at..at, br#""stream_options":{"include_usage":true},"#.to_vec()));
            }
        }
    }
    edits.sort_by_key(|(r, _)| r.start);
    let mut out = BytesMut::with_capacity(body.len() + 64);
    let mut at = 0;
    for (r, text) in edits {
        out.extend_from_slice(&body[at..r.start]);
        out.extend_from_slice(&text);
        at = r.end;
    }
    out.extend_from_slice(&body[at..]);
    out.freeze()
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
        let out = upstream_body(&body, &info, "openai/gpt-4.1");
        assert_eq!(
            std::str::from_utf8(&out).unwrap(),
            r#"{"model" : "openai/gpt-4.1","messages":[{"role":"user","content":"hi"}],"tools":[{"x":1}],"seed":7,"stream":true,"stream_options":{"include_usage":true}}"#
        );
        assert_eq!(upstream_body(&body, &info, "gpt-4.1").as_ptr(), body.as_ptr(), "no copy when unchanged");
    }

    #[test]
    fn a_stream_whose_client_did_not_ask_for_usage_asks_the_upstream_for_it() {
        let up = |b: &str, name: &str| {
            let body = Bytes::copy_from_slice(b.as_bytes());
            let info = inspect_chat(&body).unwrap();
            let out = upstream_body(&body, &info, name);
            let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
            (String::from_utf8(out.to_vec()).unwrap(), v)
        };
        let (text, v) =
            up(r#"{"model":"gpt-4.1","stream":true,"messages":[{"role":"user","content":"hi"}]}"#, "gpt-4.1");
        assert_eq!(v["stream_options"]["include_usage"], true, "{text}");
        // With the model renamed too, and other stream options kept.
        let (text, v) = up(
            r#"{"model":"gpt-4.1","stream":true,"stream_options":{"include_usage":false,"x":1},"messages":[]}"#
                .replace("[]", r#"[{"role":"user","content":"hi"}]"#)
                .as_str(),
            "openai/gpt-4.1",
        );
        assert_eq!(
            (v["model"].as_str(), v["stream_options"]["include_usage"].as_bool()),
            (Some("openai/gpt-4.1"), Some(true)),
            "{text}"
        );
        assert_eq!(v["stream_options"]["x"], 1);
        // Not a stream, or usage asked for: untouched.
        let (text, _) = up(r#"{"model":"gpt-4.1","messages":[{"role":"user","content":"hi"}]}"#, "gpt-4.1");
        assert!(!text.contains("stream_options"));
        assert!(
            inspect_chat(br#"{"model":"m","stream_options":3,"messages":[{"role":"user","content":"hi"}]}"#).is_err()
        );
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
        // A struct read from an array: serde would take the fields in order; a body must be an object.
        assert_eq!(err(r#"["gpt-4.1",[{"role":"user","content":"hi"}]]"#).code, "invalid_request");
        assert_eq!(err(r#""a string""#).code, "invalid_request");
        assert_eq!(err("  ").code, "invalid_json");
        // Invalid UTF-8 where nobody looks is still not JSON (found by the `request` fuzz target).
        let bad = b"{\"model\":\"m\",\"messages\":[{\"role\":\"user\",\"content\":\"\xff\"}]}";
        assert_eq!(inspect_chat(bad).unwrap_err().code, "invalid_json");
        assert_eq!(inspect_embeddings(b"{\"model\":\"e\",\"input\":\"\xc3\"}").unwrap_err().code, "invalid_json");
        assert_eq!(inspect_embeddings(br#"["e","hi"]"#).unwrap_err().code, "invalid_request");
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
    fn embeddings_validation() {
        assert!(inspect_embeddings(br#"{"model":"e","input":"hi"}"#).is_ok());
        assert_eq!(inspect_embeddings(br#"{"model":"e"}"#).unwrap_err().code, "missing_input");
        assert_eq!(inspect_embeddings(br#"{"model":"e","input":[]}"#).unwrap_err().code, "invalid_input");
    }
}
