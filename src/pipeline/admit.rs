//! The *admit* phase: receive the request and decide whether it may go on — the body within its limit and of
//! the right content type, a valid OpenAI request. Client keys, rate limits and budgets plug in here.

use bytes::Bytes;
use http::header;
use http::{Request, StatusCode};
use http_body::Body as HttpBody;
use http_body_util::{BodyExt, Limited};

use crate::protocol::{openai, Api, ApiError, RequestInfo};

/// Read the body of `req` up to `limit` bytes: 413 above it, 415 for a content type that is not JSON.
pub async fn read_body<B>(req: Request<B>, limit: usize) -> Result<Bytes, ApiError>
where
    B: HttpBody<Data = Bytes>,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let too_large = || {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "invalid_request_error",
            "body_too_large",
            format!("The request body is larger than the limit of {limit} bytes"),
        )
    };
    if let Some(ct) = req.headers().get(header::CONTENT_TYPE) {
        let ok = ct.to_str().map(|s| s.trim().to_ascii_lowercase().starts_with("application/json")).unwrap_or(false);
        if !ok {
            return Err(ApiError::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "invalid_request_error",
                "unsupported_media_type",
                "Content-Type must be application/json",
            ));
        }
    }
    let declared = req.headers().get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        return Err(too_large());
    }
    match Limited::new(req.into_body(), limit).collect().await {
        Ok(c) => Ok(c.to_bytes()),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => Err(too_large()),
        Err(_) => Err(ApiError::invalid("body_read_error", "The request body could not be read")),
    }
}

/// Validate the body for `api` and find what routing needs.
pub fn inspect(api: Api, body: &[u8]) -> Result<RequestInfo, ApiError> {
    match api {
        Api::Chat => openai::inspect_chat(body),
        Api::Embeddings => openai::inspect_embeddings(body),
    }
}
