//! The *admit* phase: receive the request and decide whether it may go on — the body within its limit and of
//! the right content type, a valid OpenAI request. Client keys, rate limits and budgets plug in here.

use bytes::Bytes;
use http::header;
use http::{Request, StatusCode};
use http_body::Body as HttpBody;
use http_body_util::BodyExt;

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
    let mut body = std::pin::pin!(req.into_body());
    if declared.is_some_and(|n| n > limit as u64) {
        drain(body.as_mut()).await;
        return Err(too_large());
    }
    let mut buf = bytes::BytesMut::new();
    while let Some(frame) = body.as_mut().frame().await {
        let Ok(frame) = frame else {
            return Err(ApiError::invalid("body_read_error", "The request body could not be read"));
        };
        if let Ok(data) = frame.into_data() {
            if buf.len() + data.len() > limit {
                drain(body.as_mut()).await;
                return Err(too_large());
            }
            buf.extend_from_slice(&data);
        }
    }
    Ok(buf.freeze())
}

/// At most this much of a refused body is read and thrown away before the 413 goes out.
const DRAIN_BYTES: usize = 32 << 20;
/// … and for at most this long.
const DRAIN_TIME: std::time::Duration = std::time::Duration::from_secs(2);

/// Read and discard what is left of a body that is too large (bounded in bytes and time), so that a client still
/// sending it reads the 413 instead of a connection reset; past the bounds the connection is closed anyway.
async fn drain<B>(mut body: std::pin::Pin<&mut B>)
where
    B: HttpBody<Data = Bytes>,
{
    let read = async {
        let mut seen = 0usize;
        while let Some(Ok(frame)) = body.as_mut().frame().await {
            seen += frame.data_ref().map_or(0, |d| d.len());
            if seen > DRAIN_BYTES {
                break;
            }
        }
    };
    let _ = tokio::time::timeout(DRAIN_TIME, read).await;
}

/// Validate the body for `api` and find what routing needs.
pub fn inspect(api: Api, body: &[u8]) -> Result<RequestInfo, ApiError> {
    match api {
        Api::Chat => openai::inspect_chat(body),
        Api::Embeddings => openai::inspect_embeddings(body),
    }
}
