//! An endpoint's keep-alive HTTP/1 connections. One connection carries one request at a time; a connection
//! goes back to the pool when its answer's body has been read to the end (a body dropped before that closes
//! its connection: what is left of it cannot be reused). Idle connections form a stack, the most recently used
//! on top, so that under light traffic the ones below age out: an idle connection older than [`IDLE_TIMEOUT`]
//! is closed when the pool is next used, and no more than [`MAX_IDLE`] are kept.
//!
//! One endpoint has one host, so the pool is a plain stack behind a mutex held for a push or a pop, never
//! across an await: no map keyed by host, no hashing, no task per request. A request sent on a reused
//! connection that closes without an answer is reported as stale ([`TransportError::stale`]): the upstream
//! closed it just before reuse, and sending again on another connection is safe.
//!
//! Owns connecting (TCP, TLS), handshakes and connection reuse; knows nothing of keys, health or the OpenAI
//! format.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::task::Context;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{header, HeaderValue, Request, Response, Uri};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::client::conn::http1::{self, SendRequest};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use tower_service::Service;

use super::transport::{closed_without_answer, describe, TransportError};

/// How long an unused connection is kept (upstreams commonly close theirs after 60 to 75 s).
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(90);
/// The most idle connections kept per endpoint.
pub const MAX_IDLE: usize = 1024;
/// The largest a connection's read buffer grows.
const READ_BUFFER_MAX: usize = 64 << 10;

type Sender = SendRequest<Full<Bytes>>;

/// The keep-alive connections of one endpoint (cheap to clone: clones share the connections).
#[derive(Clone)]
pub struct Pool {
    inner: Arc<Inner>,
}

struct Inner {
    connector: HttpsConnector<HttpConnector>,
    /// `scheme://authority/` of the endpoint: what the connector is given.
    target: Uri,
    /// The `Host` header for requests that carry none.
    host: HeaderValue,
    idle: Mutex<VecDeque<Idle>>,
}

struct Idle {
    sender: Sender,
    since: Instant,
}

/// A connection lent to one request, until its answer's body has been read.
pub struct Lease {
    pool: Arc<Inner>,
    sender: Sender,
}

impl Lease {
    /// Give the connection back: the answer was read to its end.
    pub fn release(self) {
        self.pool.put(self.sender, Instant::now());
    }
}

impl Pool {
    /// A pool for the endpoint at `target` (scheme and authority are used), connecting within `connect_timeout`.
    pub fn new(target: &Uri, connect_timeout: Duration) -> Pool {
        let mut http = HttpConnector::new();
        http.enforce_http(false);
        http.set_nodelay(true);
        http.set_connect_timeout(Some(connect_timeout));
        http.set_keepalive(Some(Duration::from_secs(60)));
        let connector = hyper_rustls::HttpsConnectorBuilder::new()
            .with_webpki_roots()
            .https_or_http()
            .enable_http1()
            .wrap_connector(http);
        let authority = target.authority().map(|a| a.as_str()).unwrap_or_default();
        let target = Uri::builder()
            .scheme(target.scheme_str().unwrap_or("http"))
            .authority(authority)
            .path_and_query("/")
            .build()
            .unwrap_or_default();
        let host = HeaderValue::from_str(authority).unwrap_or_else(|_| HeaderValue::from_static("localhost"));
        Pool { inner: Arc::new(Inner { connector, target, host, idle: Mutex::new(VecDeque::new()) }) }
    }

    /// Send a request (its URI absolute or origin-form) and wait for the answer's head; the connection comes
    /// with the answer, to be released when its body has been read.
    pub async fn send(&self, req: Request<Bytes>) -> Result<(Response<Incoming>, Lease), TransportError> {
        let (mut parts, body) = req.into_parts();
        if parts.uri.scheme().is_some() {
            parts.uri = parts.uri.path_and_query().map_or_else(|| Uri::from_static("/"), |pq| Uri::from(pq.clone()));
        }
        if !parts.headers.contains_key(header::HOST) {
            parts.headers.insert(header::HOST, self.inner.host.clone());
        }
        let req = Request::from_parts(parts, Full::new(body));
        let (mut sender, reused) = loop {
            match self.inner.take(Instant::now()) {
                // An idle connection whose last answer the connection task has not quite finished with yet is
                // ready in a moment; one that closes meanwhile is dropped and the next one tried.
                Some(mut s) => {
                    if s.ready().await.is_ok() {
                        break (s, true);
                    }
                }
                // Boxed: the connect's state (the TLS stream, the handshake) is no part of every request's.
                None => break (Box::pin(self.connect()).await?, false),
            }
        };
        match sender.send_request(req).await {
            Ok(resp) => Ok((resp, Lease { pool: self.inner.clone(), sender })),
            Err(e) => Err(TransportError {
                what: describe("connection error", &e),
                connect: false,
                stale: reused && closed_without_answer(&e),
            }),
        }
    }

    /// Open a new connection and start its task.
    async fn connect(&self) -> Result<Sender, TransportError> {
        let failed = |e: &(dyn std::error::Error + 'static)| TransportError {
            what: describe("connection failed", e),
            connect: true,
            stale: false,
        };
        let mut connector = self.inner.connector.clone();
        std::future::poll_fn(|cx: &mut Context<'_>| connector.poll_ready(cx)).await.map_err(|e| failed(&*e))?;
        let io = connector.call(self.inner.target.clone()).await.map_err(|e| failed(&*e))?;
        // The read buffer grows while a stream fills it and keeps its size for the connection's life; capped, an
        // idle connection holds at most this much (a body larger than it is read in several turns).
        let (sender, conn) =
            http1::Builder::new().max_buf_size(READ_BUFFER_MAX).handshake(io).await.map_err(|e| failed(&e))?;
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "upstream connection closed with an error");
            }
        });
        Ok(sender)
    }

    /// How many connections are idle (for tests).
    pub fn idle(&self) -> usize {
        self.inner.idle.lock().unwrap_or_else(|p| p.into_inner()).len()
    }
}

impl Inner {
    /// The most recently used idle connection that is still open and young enough, if any.
    fn take(&self, now: Instant) -> Option<Sender> {
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        while let Some(c) = idle.pop_back() {
            if now.saturating_duration_since(c.since) > IDLE_TIMEOUT {
                // The stack is ordered by age: everything below is older still.
                idle.clear();
                return None;
            }
            if !c.sender.is_closed() {
                return Some(c.sender);
            }
        }
        None
    }

    /// Put a connection back on top, closing those that have been idle too long or are too many.
    fn put(&self, sender: Sender, now: Instant) {
        if sender.is_closed() {
            return;
        }
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        while idle.front().is_some_and(|c| now.saturating_duration_since(c.since) > IDLE_TIMEOUT) {
            idle.pop_front();
        }
        if idle.len() >= MAX_IDLE {
            idle.pop_front();
        }
        idle.push_back(Idle { sender, since: now });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hyper_util::rt::TokioIo;

    /// A sender whose connection task runs against one end of an in-memory pipe (kept open by `peers`).
    async fn sender(peers: &mut Vec<tokio::io::DuplexStream>) -> Sender {
        let (a, b) = tokio::io::duplex(1024);
        peers.push(b);
        let (s, conn) = http1::handshake::<_, Full<Bytes>>(TokioIo::new(a)).await.unwrap();
        tokio::spawn(conn);
        s
    }

    fn pool() -> Arc<Inner> {
        Pool::new(&Uri::from_static("http://127.0.0.1:9/v1"), Duration::from_secs(1)).inner
    }

    #[tokio::test]
    async fn the_most_recent_connection_is_taken_first_and_old_ones_expire() {
        let (p, mut peers, t0) = (pool(), Vec::new(), Instant::now());
        assert_eq!(p.host, "127.0.0.1:9");
        assert_eq!(p.target, "http://127.0.0.1:9/");
        let (a, b) = (sender(&mut peers).await, sender(&mut peers).await);
        p.put(a, t0);
        p.put(b, t0 + Duration::from_secs(30));
        // The younger one comes first; the older one, still young enough, next.
        let later = t0 + Duration::from_secs(60);
        let first = p.take(later).unwrap();
        assert_eq!(p.idle.lock().unwrap().iter().map(|c| c.since).collect::<Vec<_>>(), [t0]);
        p.put(first, later);
        // 100 s after the first put: that one is past IDLE_TIMEOUT and goes when a connection is put back.
        let c = sender(&mut peers).await;
        p.put(c, t0 + Duration::from_secs(100));
        assert_eq!(p.idle.lock().unwrap().len(), 2);
        // Long after: every idle connection is too old and none is handed out.
        assert!(p.take(t0 + Duration::from_secs(300)).is_none());
        assert_eq!(p.idle.lock().unwrap().len(), 0);
    }

    #[tokio::test]
    async fn closed_connections_are_skipped_and_no_more_than_max_idle_are_kept() {
        let (p, mut peers, now) = (pool(), Vec::new(), Instant::now());
        let open = sender(&mut peers).await;
        p.put(open, now);
        // A connection whose peer went away: its task ends and the sender reports closed.
        let closed = sender(&mut peers).await;
        peers.pop();
        tokio::time::timeout(Duration::from_secs(10), async {
            while !closed.is_closed() {
                tokio::task::yield_now().await;
            }
        })
        .await
        .expect("the connection closes when its peer does");
        p.idle.lock().unwrap().push_back(Idle { sender: closed, since: now });
        assert!(p.take(now).is_some_and(|s| !s.is_closed()), "the closed one on top is skipped");
        for _ in 0..MAX_IDLE + 3 {
            let s = sender(&mut peers).await;
            p.put(s, now);
        }
        assert_eq!(p.idle.lock().unwrap().len(), MAX_IDLE);
    }

    #[test]
    fn a_send_does_not_carry_the_state_of_a_connect() {
        let pool = Pool::new(&Uri::from_static("http://127.0.0.1:9/v1"), Duration::from_secs(1));
        let send = pool.send(Request::new(Bytes::new()));
        let size = std::mem::size_of_val(&send);
        drop(send);
        // The connect (connector, TLS stream, handshake) is boxed when it happens; inline it doubles this.
        assert!(size <= 1536, "a send's state is {size} bytes");
    }
}
