//! How a request reaches an endpoint: over the network through its pooled keep-alive HTTP(S) client, or to an
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
use hyper_util::client::legacy::connect::{Connected, Connection, HttpConnector};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

/// The pooled HTTP(S) client of one endpoint.
pub type HttpClient = Client<Stamping<HttpsConnector<HttpConnector>>, Full<Bytes>>;

/// An error reading an upstream body.
pub type BodyError = Box<dyn std::error::Error + Send + Sync>;

/// Build the pooled keep-alive client for an endpoint with this connect timeout.
pub fn http_client(connect_timeout: Duration) -> HttpClient {
    let mut http = HttpConnector::new();
    http.enforce_http(false);
    http.set_nodelay(true);
    http.set_connect_timeout(Some(connect_timeout));
    http.set_keepalive(Some(Duration::from_secs(60)));
    let https = hyper_rustls::HttpsConnectorBuilder::new()
        .with_webpki_roots()
        .https_or_http()
        .enable_http1()
        .wrap_connector(http);
    Client::builder(TokioExecutor::new())
        .pool_idle_timeout(Duration::from_secs(90))
        .pool_max_idle_per_host(1024)
        .build(Stamping(https))
}

/// A connector that stamps each connection with the time it was opened, so that a request that failed on a
/// connection opened before it was sent is known to have met a pooled connection the upstream had closed.
#[derive(Clone)]
pub struct Stamping<C>(C);

/// When a connection was opened (kept in its `Connected` extras).
#[derive(Clone, Copy, Debug)]
struct Opened(std::time::Instant);

/// A connection with its [`Opened`] stamp.
pub struct Stamped<T> {
    io: T,
    opened: std::time::Instant,
}

impl<C> tower_service::Service<http::Uri> for Stamping<C>
where
    C: tower_service::Service<http::Uri>,
    C::Future: Send + 'static,
{
    type Response = Stamped<C::Response>;
    type Error = C::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Stamped<C::Response>, C::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), C::Error>> {
        self.0.poll_ready(cx)
    }

    fn call(&mut self, uri: http::Uri) -> Self::Future {
        let connecting = self.0.call(uri);
        Box::pin(async move { connecting.await.map(|io| Stamped { io, opened: std::time::Instant::now() }) })
    }
}

impl<T: Connection> Connection for Stamped<T> {
    fn connected(&self) -> Connected {
        self.io.connected().extra(Opened(self.opened))
    }
}

impl<T: hyper::rt::Read + Unpin> hyper::rt::Read for Stamped<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: hyper::rt::ReadBufCursor<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_read(cx, buf)
    }
}

impl<T: hyper::rt::Write + Unpin> hyper::rt::Write for Stamped<T> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write_vectored(cx, bufs)
    }
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
    /// Over the network.
    Http(HttpClient),
    /// In memory.
    Memory(Arc<dyn MemoryUpstream>),
}

impl Transport {
    /// Send a request and wait for the answer's head.
    pub async fn send(&self, req: Request<Bytes>) -> Result<Response<UpstreamBody>, TransportError> {
        match self {
            Transport::Http(c) => {
                let sent = std::time::Instant::now();
                match c.request(req.map(Full::new)).await {
                    Ok(r) => Ok(r.map(UpstreamBody::Http)),
                    Err(e) => Err(TransportError::from_client(&e, sent)),
                }
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

impl TransportError {
    fn from_client(e: &hyper_util::client::legacy::Error, sent: std::time::Instant) -> TransportError {
        let reused = e.connect_info().is_some_and(|c| {
            let mut ext = http::Extensions::new();
            c.get_extras(&mut ext);
            ext.get::<Opened>().is_some_and(|o| o.0 < sent)
        });
        let closed = closed_without_answer(e);
        let mut what = String::from(if e.is_connect() { "connection failed" } else { "connection error" });
        let mut src = std::error::Error::source(e);
        let mut depth = 0;
        while let Some(inner) = src {
            if depth == 0 || inner.source().is_none() {
                what.push_str(": ");
                what.push_str(&inner.to_string());
            }
            src = inner.source();
            depth += 1;
        }
        TransportError { what, connect: e.is_connect(), stale: reused && closed && !e.is_connect() }
    }
}

/// Whether the error is the connection closing (or being reset) before any answer came.
fn closed_without_answer(e: &(dyn std::error::Error + 'static)) -> bool {
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
    /// From the network.
    Http(Incoming),
    /// From an in-memory upstream.
    Memory(Pin<Box<dyn Body<Data = Bytes, Error = BodyError> + Send>>),
}

impl UpstreamBody {
    /// An in-memory body.
    pub fn memory(b: impl Body<Data = Bytes, Error = BodyError> + Send + 'static) -> UpstreamBody {
        UpstreamBody::Memory(Box::pin(b))
    }
}

impl Body for UpstreamBody {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        match self.get_mut() {
            UpstreamBody::Http(b) => Pin::new(b).poll_frame(cx).map_err(|e| e.into()),
            UpstreamBody::Memory(b) => b.as_mut().poll_frame(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            UpstreamBody::Http(b) => b.is_end_stream(),
            UpstreamBody::Memory(b) => b.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            UpstreamBody::Http(b) => b.size_hint(),
            UpstreamBody::Memory(b) => b.size_hint(),
        }
    }
}
