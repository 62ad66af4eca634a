//! Routing and answering: what the mock does with one request.
//!
//! Owns: the routes (`/v1/chat/completions`, `/v1/embeddings`, `/v1/models`, `/health` and the `/_mock/*`
//! control routes), the order in which a request meets accounting, faults, the key check and the latency,
//! request validation, and the OpenAI-shaped answers and errors.
//! Must not: hold a lock across an `.await` (the fault state is copied out first), wait inside a stream
//! (a stream's latency and pacing belong to its body, `sse`), or count or fault the `/_mock/*` routes.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, LengthLimitError, Limited};
use hyper::body::Incoming;
use hyper::header::{HeaderMap, HeaderName, HeaderValue, ALLOW, AUTHORIZATION, CACHE_CONTROL, CONTENT_TYPE};
use hyper::{Method, Request, Response, StatusCode};
use serde::Serialize;
use serde_json::{json, Value};
use tokio::time::Instant;

use crate::answers::{answer_pieces_of, base64_encode, embedding_inputs, embedding_vector, prompt_tokens, Usage};
use crate::error::MockError;
use crate::faults::{FaultMode, FaultState, Faults};
use crate::server::Shared;
use crate::sse::{MockBody, SseBody, SsePlan};
use crate::stats::GaugeGuard;
use crate::unix_now_us;

/// Largest request body the mock reads; bigger ones get 413.
const MAX_BODY_BYTES: usize = 8 * 1024 * 1024;
/// Chunks a `break_stream` stream sends before the connection is cut.
const BREAK_AFTER_CHUNKS: usize = 3;

type Reply = Response<MockBody>;

/// Answers one request of a connection; `abort` set means: close the connection with a reset.
pub(crate) async fn handle(
    shared: Arc<Shared>,
    abort: Arc<AtomicBool>,
    req: Request<Incoming>,
) -> Result<Reply, MockError> {
    if req.uri().path().starts_with("/_mock/") {
        return control(&shared, req).await;
    }
    let _in_flight = GaugeGuard::in_flight(&shared.stats);
    let (parts, body) = req.into_parts();
    let path = parts.uri.path();
    let key = bearer_token(&parts.headers);
    shared.stats.record_arrival(path, key);

    let body = match read_body(body).await? {
        Ok(b) => b,
        Err(reply) => return Ok(reply),
    };
    let json = (parts.method == Method::POST).then(|| serde_json::from_slice::<Value>(&body));
    if let Some(Ok(v)) = &json {
        if let Some(model) = v.get("model").and_then(Value::as_str) {
            shared.stats.record_model(model);
        }
    }

    let faults = *shared.faults.lock();
    let wants_stream = path == "/v1/chat/completions"
        && matches!(&json, Some(Ok(v)) if v.get("stream").and_then(Value::as_bool) == Some(true));
    match faults.mode {
        FaultMode::Reset => return Err(reset(&abort)),
        FaultMode::BreakStream if !wants_stream => return Err(reset(&abort)),
        FaultMode::Hang => return std::future::pending().await,
        FaultMode::Error500 => return Ok(server_error(&shared)),
        FaultMode::Error429 => return Ok(rate_limited(&shared, faults.retry_after_s)),
        FaultMode::Ok | FaultMode::Slow => {
            if shared.draw_error(faults.error_rate) {
                return Ok(server_error(&shared));
            }
        }
        FaultMode::BreakStream => {}
    }

    let delay = shared.answer_delay(&faults);
    if path.starts_with("/v1/") && !shared.opts.require_keys.is_empty() {
        let known = key.is_some_and(|k| shared.opts.require_keys.iter().any(|r| r == k));
        if !known {
            pause(delay).await;
            let reply = openai_error(
                StatusCode::UNAUTHORIZED,
                "Incorrect API key provided",
                "invalid_request_error",
                "invalid_api_key",
            );
            return Ok(with_name(&shared, reply));
        }
    }

    let method = &parts.method;
    let reply = match path {
        "/v1/chat/completions" if method == Method::POST => match chat(&shared, json, &faults, delay) {
            Answer::Now(reply) => reply,
            Answer::Streaming(reply) => return Ok(with_name(&shared, reply)),
        },
        "/v1/embeddings" if method == Method::POST => embeddings(&shared, json),
        "/v1/models" if method == Method::GET => json_reply(StatusCode::OK, shared.models_body.clone()),
        "/health" if method == Method::GET => json_reply(StatusCode::OK, Bytes::from_static(br#"{"status":"ok"}"#)),
        "/v1/chat/completions" | "/v1/embeddings" => method_not_allowed(method, path, "POST"),
        "/v1/models" | "/health" => method_not_allowed(method, path, "GET"),
        _ => openai_error(
            StatusCode::NOT_FOUND,
            &format!("Unknown request URL: {method} {path}."),
            "invalid_request_error",
            "unknown_url",
        ),
    };
    pause(delay).await;
    Ok(with_name(&shared, reply))
}

/// Sleeps for `delay`; a zero delay does not touch the timer.
async fn pause(delay: Duration) {
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
}

fn reset(abort: &AtomicBool) -> MockError {
    abort.store(true, Ordering::Relaxed);
    MockError::Reset
}

fn bearer_token(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim()).filter(|t| !t.is_empty())
}

/// Reads the whole request body: `Ok(Err(reply))` when it is too large, `Err` when the client failed.
async fn read_body(body: Incoming) -> Result<Result<Bytes, Reply>, MockError> {
    match Limited::new(body, MAX_BODY_BYTES).collect().await {
        Ok(collected) => Ok(Ok(collected.to_bytes())),
        Err(e) if e.downcast_ref::<LengthLimitError>().is_some() => Ok(Err(openai_error(
            StatusCode::PAYLOAD_TOO_LARGE,
            &format!("Request body larger than {MAX_BODY_BYTES} bytes."),
            "invalid_request_error",
            "request_too_large",
        ))),
        Err(e) => Err(MockError::RequestBody(e.to_string())),
    }
}

/// The `/_mock/*` control routes: never counted, never faulted.
async fn control(shared: &Arc<Shared>, req: Request<Incoming>) -> Result<Reply, MockError> {
    let (parts, body) = req.into_parts();
    let path = parts.uri.path();
    let method = &parts.method;
    let body = match read_body(body).await? {
        Ok(b) => b,
        Err(reply) => return Ok(reply),
    };
    Ok(match (path, method) {
        ("/_mock/faults", &Method::GET) => ok_json(&*shared.faults.lock()),
        ("/_mock/faults", &Method::POST) => {
            let change = if body.iter().all(u8::is_ascii_whitespace) {
                Ok(Faults::default())
            } else {
                serde_json::from_slice::<Faults>(&body).map_err(|e| e.to_string())
            };
            match change.and_then(|f| f.validate().map(|()| f)) {
                Ok(f) => {
                    let mut state = shared.faults.lock();
                    state.apply(&f);
                    ok_json(&*state)
                }
                Err(e) => openai_error(
                    StatusCode::BAD_REQUEST,
                    &format!("Invalid faults: {e}"),
                    "invalid_request_error",
                    "invalid_faults",
                ),
            }
        }
        ("/_mock/stats", &Method::GET) => ok_json(&shared.stats.snapshot()),
        ("/_mock/stats/reset", &Method::POST) => {
            shared.stats.reset();
            ok_json(&shared.stats.snapshot())
        }
        ("/_mock/faults", _) => method_not_allowed(method, path, "GET, POST"),
        ("/_mock/stats", _) => method_not_allowed(method, path, "GET"),
        ("/_mock/stats/reset", _) => method_not_allowed(method, path, "POST"),
        _ => openai_error(
            StatusCode::NOT_FOUND,
            &format!("Unknown request URL: {method} {path}."),
            "invalid_request_error",
            "unknown_url",
        ),
    })
}

/// A 200 JSON answer of a serializable value.
fn ok_json<T: Serialize>(value: &T) -> Reply {
    // Serializing plain structs of numbers, strings and string-keyed maps cannot fail.
    let text = serde_json::to_string(value).unwrap_or_else(|_| "null".to_owned());
    json_reply(StatusCode::OK, Bytes::from(text))
}

enum Answer {
    /// A complete answer, to be sent after the latency.
    Now(Reply),
    /// A stream whose body applies the latency itself, before its first chunk.
    Streaming(Reply),
}

/// An OpenAI-shaped error answer before it becomes a response (small, so it travels in `Result`s).
struct ApiError {
    status: StatusCode,
    message: String,
    code: &'static str,
}

impl ApiError {
    fn invalid(message: impl Into<String>, code: &'static str) -> Self {
        Self { status: StatusCode::BAD_REQUEST, message: message.into(), code }
    }

    fn into_reply(self) -> Reply {
        openai_error(self.status, &self.message, "invalid_request_error", self.code)
    }
}

fn requested_model<'a>(shared: &Shared, v: &'a Value) -> Result<&'a str, ApiError> {
    let model = v
        .get("model")
        .and_then(Value::as_str)
        .ok_or_else(|| ApiError::invalid("you must provide a model parameter", "missing_required_parameter"))?;
    if shared.opts.models.iter().any(|m| m == model) {
        Ok(model)
    } else {
        Err(ApiError {
            status: StatusCode::NOT_FOUND,
            message: format!("The model `{model}` does not exist or you do not have access to it."),
            code: "model_not_found",
        })
    }
}

fn parsed_body(json: Option<Result<Value, serde_json::Error>>) -> Result<Value, ApiError> {
    match json {
        Some(Ok(v)) if v.is_object() => Ok(v),
        Some(Ok(_)) => Err(ApiError::invalid("The request body must be a JSON object.", "invalid_json")),
        Some(Err(e)) => {
            Err(ApiError::invalid(format!("We could not parse the JSON body of your request: {e}"), "invalid_json"))
        }
        None => Err(ApiError::invalid("A JSON request body is required.", "invalid_json")),
    }
}

fn chat(
    shared: &Arc<Shared>,
    json: Option<Result<Value, serde_json::Error>>,
    faults: &FaultState,
    delay: Duration,
) -> Answer {
    let v = match parsed_body(json) {
        Ok(v) => v,
        Err(e) => return Answer::Now(e.into_reply()),
    };
    let model = match requested_model(shared, &v) {
        Ok(m) => m,
        Err(e) => return Answer::Now(e.into_reply()),
    };
    let Some(messages) = v.get("messages").and_then(Value::as_array) else {
        return Answer::Now(
            ApiError::invalid("you must provide a messages parameter (an array)", "missing_required_parameter")
                .into_reply(),
        );
    };
    let max_tokens = v
        .get("max_completion_tokens")
        .and_then(Value::as_u64)
        .or_else(|| v.get("max_tokens").and_then(Value::as_u64))
        .map(|n| u32::try_from(n).unwrap_or(u32::MAX));
    let answer_tokens = shared.opts.answer_tokens;
    let pieces = answer_pieces_of(&shared.opts.name, model, answer_tokens, max_tokens);
    let finish_reason = if pieces.len() < answer_tokens { "length" } else { "stop" };
    let prompt = prompt_tokens(messages);
    let completion = u32::try_from(pieces.len()).unwrap_or(u32::MAX);
    let usage =
        Usage { prompt_tokens: prompt, completion_tokens: completion, total_tokens: prompt.saturating_add(completion) };
    let id = format!("chatcmpl-sheepdog{:012}", shared.next_id.fetch_add(1, Ordering::Relaxed));
    let created = unix_now_us() / 1_000_000;

    if v.get("stream").and_then(Value::as_bool) == Some(true) {
        let include_usage = v.pointer("/stream_options/include_usage").and_then(Value::as_bool) == Some(true);
        let body = SseBody::new(
            SsePlan {
                id,
                created,
                model: model.to_owned(),
                pieces,
                finish_reason,
                usage,
                include_usage,
                stamp: shared.opts.stamp,
            },
            Instant::now() + delay,
            shared.chunk_interval(faults),
            (faults.mode == FaultMode::BreakStream).then_some(BREAK_AFTER_CHUNKS),
            GaugeGuard::in_flight(&shared.stats),
        );
        let mut reply = Response::new(MockBody::stream(body));
        let headers = reply.headers_mut();
        headers.insert(CONTENT_TYPE, HeaderValue::from_static("text/event-stream"));
        headers.insert(CACHE_CONTROL, HeaderValue::from_static("no-cache"));
        return Answer::Streaming(reply);
    }

    let body = json!({
        "id": id,
        "object": "chat.completion",
        "created": created,
        "model": model,
        "choices": [{
            "index": 0,
            "message": {"role": "assistant", "content": pieces.concat(), "refusal": null},
            "logprobs": null,
            "finish_reason": finish_reason,
        }],
        "usage": usage,
        "system_fingerprint": "fp_sheepdog_mock",
    });
    Answer::Now(json_reply(StatusCode::OK, Bytes::from(body.to_string())))
}

fn embeddings(shared: &Shared, json: Option<Result<Value, serde_json::Error>>) -> Reply {
    let v = match parsed_body(json) {
        Ok(v) => v,
        Err(e) => return e.into_reply(),
    };
    let model = match requested_model(shared, &v) {
        Ok(m) => m,
        Err(e) => return e.into_reply(),
    };
    let Some(inputs) = v.get("input").and_then(embedding_inputs) else {
        return ApiError::invalid(
            "'input' must be a non-empty string, array of strings, or array of token arrays",
            "invalid_input",
        )
        .into_reply();
    };
    let base64 = match v.get("encoding_format").and_then(Value::as_str) {
        None | Some("float") => false,
        Some("base64") => true,
        Some(other) => {
            return ApiError::invalid(
                format!("encoding_format must be 'float' or 'base64', got '{other}'"),
                "invalid_encoding_format",
            )
            .into_reply()
        }
    };
    let mut tokens = 0u32;
    let data: Vec<Value> = inputs
        .iter()
        .enumerate()
        .map(|(index, input)| {
            tokens = tokens.saturating_add(input.tokens);
            let vector = embedding_vector(&input.key);
            let embedding = if base64 {
                let bytes: Vec<u8> = vector.iter().flat_map(|f| f.to_le_bytes()).collect();
                Value::String(base64_encode(&bytes))
            } else {
                json!(vector)
            };
            json!({"object": "embedding", "index": index, "embedding": embedding})
        })
        .collect();
    let body = json!({
        "object": "list",
        "data": data,
        "model": model,
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    });
    json_reply(StatusCode::OK, Bytes::from(body.to_string()))
}

// ---------------------------------------------------------------------------------------------------------
// Replies

fn json_reply(status: StatusCode, body: Bytes) -> Reply {
    let mut reply = Response::new(MockBody::full(body));
    *reply.status_mut() = status;
    reply.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    reply
}

fn with_name(shared: &Shared, mut reply: Reply) -> Reply {
    if let Some(name) = &shared.name_header {
        reply.headers_mut().insert(HeaderName::from_static("x-mock-name"), name.clone());
    }
    reply
}

fn openai_error(status: StatusCode, message: &str, kind: &str, code: &str) -> Reply {
    let body = json!({"error": {"message": message, "type": kind, "param": null, "code": code}});
    json_reply(status, Bytes::from(body.to_string()))
}

fn method_not_allowed(method: &Method, path: &str, allow: &'static str) -> Reply {
    let mut reply = openai_error(
        StatusCode::METHOD_NOT_ALLOWED,
        &format!("Method {method} is not allowed for {path}; use {allow}."),
        "invalid_request_error",
        "method_not_allowed",
    );
    reply.headers_mut().insert(ALLOW, HeaderValue::from_static(allow));
    reply
}

fn server_error(shared: &Shared) -> Reply {
    with_name(
        shared,
        openai_error(
            StatusCode::INTERNAL_SERVER_ERROR,
            &format!("The server had an error while processing your request (simulated by mock {}).", shared.opts.name),
            "server_error",
            "server_error",
        ),
    )
}

fn rate_limited(shared: &Shared, retry_after_s: u64) -> Reply {
    let mut reply = openai_error(
        StatusCode::TOO_MANY_REQUESTS,
        &format!("Rate limit reached (simulated by mock {}). Please try again in {retry_after_s}s.", shared.opts.name),
        "requests",
        "rate_limit_exceeded",
    );
    reply.headers_mut().insert(hyper::header::RETRY_AFTER, HeaderValue::from(retry_after_s));
    with_name(shared, reply)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bearer_tokens_are_read_case_insensitively() {
        let mut h = HeaderMap::new();
        assert_eq!(bearer_token(&h), None);
        h.insert(AUTHORIZATION, HeaderValue::from_static("bearer k1"));
        assert_eq!(bearer_token(&h), Some("k1"));
        h.insert(AUTHORIZATION, HeaderValue::from_static("Basic abc"));
        assert_eq!(bearer_token(&h), None);
        h.insert(AUTHORIZATION, HeaderValue::from_static("Bearer "));
        assert_eq!(bearer_token(&h), None);
    }
}
