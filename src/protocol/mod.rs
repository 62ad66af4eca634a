//! Wire protocols. The gateway speaks OpenAI's API to clients and to upstreams today; [`openai`] is the only
//! module that knows its field names (Anthropic or Gemini upstreams would be modules beside it).
//!
//! This file holds the protocol-neutral types the pipeline works with: which [`Api`] a request is for, what the
//! gateway needs to know of it ([`RequestInfo`]) and an error as the client will see it ([`ApiError`]).
//! Nothing here does I/O.

pub mod openai;
pub mod tokens;

use std::ops::Range;

use bytes::Bytes;
use http::StatusCode;

/// Which API a request is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Api {
    /// `POST /v1/chat/completions`.
    Chat,
    /// `POST /v1/embeddings`.
    Embeddings,
}

impl Api {
    /// `chat` or `embeddings`, as in the request log.
    pub fn name(self) -> &'static str {
        match self {
            Api::Chat => "chat",
            Api::Embeddings => "embeddings",
        }
    }
}

/// What the gateway needs to know of a chat or embeddings request; the body itself is forwarded untouched.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RequestInfo {
    /// The requested public model.
    pub model: String,
    /// Byte range of the `model` value (with its quotes) in the body, for rewriting.
    pub model_span: Range<usize>,
    /// `stream: true`.
    pub stream: bool,
    /// `stream_options.include_usage: true`.
    pub include_usage: bool,
    /// Byte range of the `stream_options` object, when there is one.
    pub stream_options: Option<Range<usize>>,
    /// `max_completion_tokens`, else `max_tokens`: the most the answer may use.
    pub max_tokens: Option<u64>,
    /// `n`: answers asked for (1 by default).
    pub n: u32,
    /// The request carries tools (or legacy functions).
    pub has_tools: bool,
    /// Byte range of the last user message's `content` value, for content-aware routing.
    pub last_user: Option<Range<usize>>,
    /// Byte range of the `metadata` object, for routing on it.
    pub metadata: Option<Range<usize>>,
}

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

impl ApiError {
    /// A new error.
    pub fn new(status: StatusCode, kind: &'static str, code: &'static str, message: impl Into<String>) -> Self {
        ApiError { status, kind, code, message: message.into(), retry_after_s: None }
    }
    /// The same error, telling the client to retry after `seconds` (`Retry-After`).
    pub fn retry_after(mut self, seconds: u64) -> Self {
        self.retry_after_s = Some(seconds);
        self
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
    /// The JSON body, in the client protocol's error shape.
    pub fn body(&self) -> Bytes {
        openai::error_body(self)
    }
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}: {}", self.status.as_u16(), self.code, self.message)
    }
}
