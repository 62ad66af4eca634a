//! How a request reaches an endpoint: over the network on its keep-alive connections ([`Pool`]), or to an
//! in-memory upstream ([`MemoryUpstream`]) so that pipeline tests run without sockets under tokio's paused
//! clock. Both give an answer whose body is an [`UpstreamBody`].

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body::{Body, Frame, SizeHint};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

use super::pool::{Lease, Pool};

/// A pooled HTTP(S) client for requests to any host (budget webhooks, `sheepdog healthcheck`); endpoints
/// have a [`Pool`] of their own.
pub type HttpClient = Client<HttpsConnector<HttpConnector>, Full<Bytes>>;

/// An error reading an upstream body.
pub type BodyError = Box<dyn std::error::Error + Send + Sync>;

/// Build a pooled keep-alive client with this connect timeout.
pub fn http_client(connect_timeout: Duration) -> HttpClient {
    let mut http = HttpConnector::new();
    http.enforce_http(false);
    http.set_nodelay(true);
    http.set_connect_timeout(Some(connect_timeout));
    let https = hyper_rustls::HttpsConnectorBuilder::new()
        .with_webpki_roots()
        .https_or_http()
        .enable_http1()
        .wrap_connector(http);
    Client::builder(TokioExecutor::new()).build(https)
}

/// A future of an upstream answer's head.
pub type ResponseFuture = Pin<Box<dyn Future<Output = Result<Response<UpstreamBody>, TransportError>> + Send>>;

/// An upstream that lives in the process: tests and simulations hand one to the gateway in place of a URL.
pub trait MemoryUpstream: Send + Sync + 'static {
    /// Answer one request (its body is complete).
    fn call(&self, req: Request<Bytes>) -> ResponseFuture;
}

/// How requests reach one endpoint.
#[derive(Clone)]
pub enum Transport {
    /// Over the network, on the endpoint's keep-alive connections.
    Http(Pool),
    /// In memory.
    Memory(Arc<dyn MemoryUpstream>),
}

impl Transport {
    /// Send a request and wait for the answer's head.
    pub async fn send(&self, req: Request<Bytes>) -> Result<Response<UpstreamBody>, TransportError> {
        match self {
            Transport::Http(p) => {
                let (resp, lease) = p.send(req).await?;
                Ok(resp.map(|body| UpstreamBody::Http { body, lease: Some(lease) }))
            }
            Transport::Memory(m) => m.call(req).await,
        }
    }
}

/// Why a request got no answer head: a description without any key, whether it failed to connect, and
/// whether it met a pooled connection that the upstream had closed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TransportError {
    /// What went wrong (never contains a key: request headers are not part of it).
    pub what: String,
    /// The connection could not be established (nothing was sent).
    pub connect: bool,
    /// The request went out on a pooled connection opened before it was sent, and that connection closed
    /// without an answer: the upstream closed it just before reuse. Sending again on a fresh connection is
    /// safe to try; it says nothing about the upstream's health.
    pub stale: bool,
}

/// `prefix`, then the error's own description and that of its innermost cause (never a key: request headers
/// are not part of errors).
pub(super) fn describe(prefix: &str, e: &(dyn std::error::Error + 'static)) -> String {
    let mut what = String::from(prefix);
    what.push_str(": ");
    what.push_str(&e.to_string());
    let mut src = e.source();
    while let Some(inner) = src {
        if inner.source().is_none() {
            what.push_str(": ");
            what.push_str(&inner.to_string());
        }
        src = inner.source();
    }
    what
}

/// Whether the error is the connection closing (or being reset) before any answer came.
pub(super) fn closed_without_answer(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut src = Some(e);
    while let Some(err) = src {
        if let Some(h) = err.downcast_ref::<hyper::Error>() {
            if h.is_incomplete_message() || h.is_canceled() {
                return true;
            }
        }
        if let Some(io) = err.downcast_ref::<std::io::Error>() {
            use std::io::ErrorKind::{BrokenPipe, ConnectionAborted, ConnectionReset, UnexpectedEof};
            if matches!(io.kind(), ConnectionReset | ConnectionAborted | BrokenPipe | UnexpectedEof) {
                return true;
            }
        }
        src = err.source();
    }
    false
}

/// The body of an upstream answer.
pub enum UpstreamBody {
    /// From the network, with the connection it arrives on until it has been read to its end.
    Http {
        /// The body.
        body: Incoming,
        /// The connection, given back to its pool when the body ends.
        lease: Option<Lease>,
    },
    /// From an in-memory upstream.
    Memory(Pin<Box<dyn Body<Data = Bytes, Error = BodyError> + Send>>),
    /// Nothing (more): a body handed on by [`UpstreamBody::finish`].
    Ended,
}

impl UpstreamBody {
    /// An in-memory body.
    pub fn memory(b: impl Body<Data = Bytes, Error = BodyError> + Send + 'static) -> UpstreamBody {
        UpstreamBody::Memory(Box::pin(b))
    }

    /// The answer is complete (a stream sent `data: [DONE]`) and nothing more of it is wanted: read what is
    /// left of the body, its framing, and give the connection back. The last chunk of a chunked body has
    /// usually arrived with the event before it; if it has not, it is awaited on a task of its own for up to
    /// [`DRAIN_TIMEOUT`] (a body that goes on is cut and its connection closed).
    pub fn finish(mut self) {
        let UpstreamBody::Http { lease: Some(_), .. } = &self else { return };
        let mut cx = Context::from_waker(std::task::Waker::noop());
        let mut left = DRAIN_BYTES;
        loop {
            match Pin::new(&mut self).poll_frame(&mut cx) {
                Poll::Ready(Some(Ok(f))) => {
                    left = left.saturating_sub(f.data_ref().map_or(0, |d| d.len()));
                    if left == 0 {
                        return;
                    }
                }
                Poll::Ready(_) => return,
                Poll::Pending => break,
            }
        }
        let Ok(rt) = tokio::runtime::Handle::try_current() else { return };
        rt.spawn(async move {
            let drain = async {
                while let Some(Ok(f)) = http_body_util::BodyExt::frame(&mut self).await {
                    left = left.saturating_sub(f.data_ref().map_or(0, |d| d.len()));
                    if left == 0 {
                        return;
                    }
                }
            };
            let _ = tokio::time::timeout(DRAIN_TIMEOUT, drain).await;
        });
    }
}

/// How long [`UpstreamBody::finish`] waits for the rest of a complete answer's body.
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(1);
/// How much of it may be read (more, and the connection is closed instead).
const DRAIN_BYTES: usize = 64 << 10;

impl Body for UpstreamBody {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        match self.get_mut() {
            UpstreamBody::Http { body, lease } => {
                let polled = Pin::new(&mut *body).poll_frame(cx);
                match &polled {
                    Poll::Ready(None) => release(lease),
                    Poll::Ready(Some(Ok(_))) if body.is_end_stream() => release(lease),
                    // A broken body's connection is not reused.
                    Poll::Ready(Some(Err(_))) => drop(lease.take()),
                    _ => {}
                }
                polled.map_err(|e| e.into())
            }
            UpstreamBody::Memory(b) => b.as_mut().poll_frame(cx),
            UpstreamBody::Ended => Poll::Ready(None),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            UpstreamBody::Http { body, .. } => body.is_end_stream(),
            UpstreamBody::Memory(b) => b.is_end_stream(),
            UpstreamBody::Ended => true,
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            UpstreamBody::Http { body, .. } => body.size_hint(),
            UpstreamBody::Memory(b) => b.size_hint(),
            UpstreamBody::Ended => SizeHint::with_exact(0),
        }
    }
}

/// An answer with nothing left to read gives its connection back however it is dropped (one without a body is
/// never polled); any other closes it with its body.
impl Drop for UpstreamBody {
    fn drop(&mut self) {
        if let UpstreamBody::Http { body, lease } = self {
            if body.is_end_stream() {
                release(lease);
            }
        }
    }
}

fn release(lease: &mut Option<Lease>) {
    if let Some(l) = lease.take() {
        l.release();
    }
}
