//! The response body of the gateway — a whole buffer, or an upstream stream relayed frame by frame — and the
//! OpenAI-shaped error response.

use std::convert::Infallible;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::Response;
use http_body::{Body as HttpBody, Frame, SizeHint};

use super::relay::Relay;
use crate::protocol::ApiError;

/// The response body of the gateway.
pub enum Body {
    /// A complete body.
    Full(Option<Bytes>),
    /// A relayed upstream stream.
    Relay(Box<Relay>),
}

impl Body {
    /// A complete body.
    pub fn full(b: impl Into<Bytes>) -> Body {
        Body::Full(Some(b.into()))
    }
}

impl HttpBody for Body {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        match self.get_mut() {
            Body::Full(b) => Poll::Ready(b.take().map(|b| Ok(Frame::data(b)))),
            Body::Relay(r) => r.poll_next(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        matches!(self, Body::Full(None))
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            Body::Full(Some(b)) => SizeHint::with_exact(b.len() as u64),
            Body::Full(None) => SizeHint::with_exact(0),
            Body::Relay(_) => SizeHint::default(),
        }
    }
}

/// An error response in the OpenAI shape, with `Retry-After` when the error has one.
pub fn error_response(e: &ApiError) -> Response<Body> {
    let mut r = Response::new(Body::full(e.body()));
    *r.status_mut() = e.status;
    r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    if let Some(s) = e.retry_after_s {
        r.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(s));
    }
    r
}
