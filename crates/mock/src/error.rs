//! The one error type of the mock's service and bodies: why it ends a connection without (or in the middle of)
//! an answer.
//!
//! Owns: [`MockError`] and its messages (hyper logs them at debug level as the reason a connection ended).
//! Must not: describe an HTTP error answer. A 4xx or 5xx the mock sends is an answer, built by the server;
//! this type is only for the cases where no complete answer goes out.

/// Why the mock ends a connection without (or in the middle of) an answer.
#[derive(Debug, thiserror::Error)]
pub(crate) enum MockError {
    #[error("connection reset on purpose (fault mode `reset`)")]
    Reset,
    #[error("stream cut on purpose (fault mode `break_stream`)")]
    StreamBroken,
    #[error("reading the request body failed: {0}")]
    RequestBody(String),
    #[error("encoding a stream chunk failed: {0}")]
    Encode(#[from] serde_json::Error),
}
