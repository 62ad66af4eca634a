//! Graceful shutdown of client connections at no cost per poll. hyper-util's `GracefulShutdown` polls a
//! shutdown future each time a connection's task wakes (for every request and every relayed chunk); here a
//! connection polls it once per waker and otherwise reads one flag, which [`Drain::shutdown`] sets before it
//! wakes them all.
//!
//! Owns the count of connections still open and the signal that tells them to finish; knows nothing of
//! requests.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll, Waker};

use hyper_util::server::graceful::GracefulConnection;
use tokio::sync::futures::OwnedNotified;
use tokio::sync::Notify;

/// The client connections a server watches for a graceful shutdown.
#[derive(Clone, Default)]
pub struct Drain {
    inner: Arc<Inner>,
}

#[derive(Default)]
struct Inner {
    shutting_down: AtomicBool,
    /// Wakes every watched connection once shutdown starts.
    signal: Arc<Notify>,
    open: AtomicUsize,
    /// Notified when the last watched connection ends.
    closed: Notify,
}

impl Drain {
    /// A drain with no connection yet.
    pub fn new() -> Drain {
        Drain::default()
    }

    /// Watch a connection: once [`Drain::shutdown`] starts, it finishes the request in progress and closes.
    pub fn watch<C: GracefulConnection>(&self, conn: C) -> Watched<C> {
        self.inner.open.fetch_add(1, Ordering::SeqCst);
        Watched {
            conn: Box::pin(conn),
            signal: Box::pin(self.inner.signal.clone().notified_owned()),
            waker: None,
            told: false,
            inner: self.inner.clone(),
        }
    }

    /// Tell every watched connection to finish, then wait until all have ended.
    pub async fn shutdown(&self) {
        self.inner.shutting_down.store(true, Ordering::SeqCst);
        self.inner.signal.notify_waiters();
        loop {
            let closed = self.inner.closed.notified();
            tokio::pin!(closed);
            closed.as_mut().enable();
            if self.inner.open.load(Ordering::SeqCst) == 0 {
                return;
            }
            closed.await;
        }
    }
}

/// A watched connection (a future that ends with it).
pub struct Watched<C> {
    conn: Pin<Box<C>>,
    signal: Pin<Box<OwnedNotified>>,
    /// The waker the signal was last polled with: while it is the same, the signal will wake it.
    waker: Option<Waker>,
    /// The connection was told to finish.
    told: bool,
    inner: Arc<Inner>,
}

impl<C: GracefulConnection> Future for Watched<C> {
    type Output = C::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<C::Output> {
        let this = self.get_mut();
        if !this.told {
            let armed = this.waker.as_ref().is_some_and(|w| w.will_wake(cx.waker()));
            if !armed || this.inner.shutting_down.load(Ordering::Acquire) {
                // Registered first, then the flag read: a shutdown in between is seen one way or the other.
                let woken = this.signal.as_mut().poll(cx).is_ready();
                if woken || this.inner.shutting_down.load(Ordering::SeqCst) {
                    this.told = true;
                    this.conn.as_mut().graceful_shutdown();
                } else {
                    this.waker = Some(cx.waker().clone());
                }
            }
        }
        this.conn.as_mut().poll(cx)
    }
}

impl<C> Drop for Watched<C> {
    fn drop(&mut self) {
        if self.inner.open.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.inner.closed.notify_waiters();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    use bytes::Bytes;
    use http_body_util::Full;
    use hyper::service::service_fn;
    use hyper_util::rt::TokioIo;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A served connection over an in-memory pipe, watched by `drain`; the client end is returned.
    fn serve(drain: &Drain) -> tokio::io::DuplexStream {
        let (client, server) = tokio::io::duplex(4096);
        let conn = hyper::server::conn::http1::Builder::new().serve_connection(
            TokioIo::new(server),
            service_fn(|_req| async {
                Ok::<_, std::convert::Infallible>(hyper::Response::new(Full::new(Bytes::from("ok"))))
            }),
        );
        let watched = drain.watch(conn);
        tokio::spawn(async move {
            let _ = watched.await;
        });
        client
    }

    #[tokio::test]
    async fn shutdown_closes_idle_connections_and_waits_for_all() {
        let drain = Drain::new();
        let mut a = serve(&drain);
        let mut b = serve(&drain);
        // One request answered on `a`: the connection stays open, idle.
        a.write_all(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n").await.unwrap();
        let mut buf = vec![0u8; 1024];
        let n = a.read(&mut buf).await.unwrap();
        assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));
        assert_eq!(drain.inner.open.load(Ordering::SeqCst), 2);
        tokio::time::timeout(Duration::from_secs(10), drain.shutdown()).await.expect("both connections close");
        assert_eq!(drain.inner.open.load(Ordering::SeqCst), 0);
        // Both clients see their connection closed.
        assert_eq!(a.read(&mut buf).await.unwrap(), 0);
        assert_eq!(b.read(&mut buf).await.unwrap(), 0);
        // A drain with nothing open is done at once.
        tokio::time::timeout(Duration::from_secs(1), Drain::new().shutdown()).await.unwrap();
    }
}
