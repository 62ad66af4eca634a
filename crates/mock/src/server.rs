//! The mock's server: its shared state, the accept loop and the connections.
//!
//! Owns: [`Shared`] (options, fault state, random number generators, stats, shutdown signal) and the
//! derived timing of an answer (error draws, latency with jitter, stream pacing), the accept loop, one task
//! per connection serving HTTP/1.1, shutdown, and [`AbortableStream`], which lets a request end its
//! connection with a TCP reset.
//! Must not: answer requests (that is `routes`), spawn anything per request or per stream, or hold a lock
//! across an `.await`.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use hyper::header::HeaderValue;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use parking_lot::Mutex;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use serde_json::json;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

use crate::faults::{FaultMode, FaultState};
use crate::options::MockOptions;
use crate::routes;
use crate::stats::{GaugeGuard, Stats};

/// `created` of every entry of `GET /v1/models` (fixed, so answers are reproducible).
const MODELS_CREATED: u64 = 1_700_000_000;
/// Stream chunk interval in `slow` mode when `--tokens-per-sec` is 0 (no pacing otherwise).
const SLOW_UNPACED_INTERVAL: Duration = Duration::from_millis(100);
/// Factor by which `slow` mode stretches the stream chunk interval.
const SLOW_PACING_FACTOR: u32 = 4;

/// The state of one mock, shared by its accept loop, its connections, its requests and its [`MockHandle`]s.
///
/// [`MockHandle`]: crate::MockHandle
pub(crate) struct Shared {
    pub(crate) opts: MockOptions,
    pub(crate) addr: SocketAddr,
    /// The `x-mock-name` header of every answer (absent when the name is not a valid header value).
    pub(crate) name_header: Option<HeaderValue>,
    /// The `GET /v1/models` answer, built once.
    pub(crate) models_body: Bytes,
    pub(crate) faults: Mutex<FaultState>,
    error_rng: Mutex<SmallRng>,
    jitter_rng: Mutex<SmallRng>,
    pub(crate) stats: Arc<Stats>,
    /// Number of the next chat completion id.
    pub(crate) next_id: AtomicU64,
    pub(crate) shutdown: watch::Sender<bool>,
    http: http1::Builder,
}

impl Shared {
    pub(crate) fn new(opts: MockOptions, addr: SocketAddr) -> Self {
        let models = json!({
            "object": "list",
            "data": opts.models.iter().map(|m| json!({
                "id": m, "object": "model", "created": MODELS_CREATED, "owned_by": opts.name,
            })).collect::<Vec<_>>(),
        });
        let mut http = http1::Builder::new();
        // Idle keep-alive connections stay open as long as the client wants them (like a patient upstream).
        http.timer(TokioTimer::new()).header_read_timeout(None::<Duration>);
        Self {
            name_header: HeaderValue::from_str(&opts.name).ok(),
            models_body: Bytes::from(models.to_string()),
            faults: Mutex::new(FaultState::initial(opts.error_rate)),
            error_rng: Mutex::new(SmallRng::seed_from_u64(opts.seed)),
            jitter_rng: Mutex::new(SmallRng::seed_from_u64(opts.seed ^ 0x5eed_7177_e400_0001)),
            stats: Arc::default(),
            next_id: AtomicU64::new(1),
            shutdown: watch::Sender::new(false),
            http,
            opts,
            addr,
        }
    }

    /// Draws whether this request fails under `error_rate` (draws only when the rate is above 0).
    pub(crate) fn draw_error(&self, rate: f64) -> bool {
        rate > 0.0 && self.error_rng.lock().gen::<f64>() < rate
    }

    /// The delay before an answer: latency ± jitter, plus the `slow` mode delay.
    pub(crate) fn answer_delay(&self, faults: &FaultState) -> Duration {
        let jitter = self.opts.jitter_ms;
        let mut ms = self.opts.latency_ms;
        if jitter > 0 {
            let offset = self.jitter_rng.lock().gen_range(0..=jitter.saturating_mul(2));
            ms = ms.saturating_add(offset).saturating_sub(jitter);
        }
        if faults.mode == FaultMode::Slow {
            ms = ms.saturating_add(faults.latency_ms);
        }
        Duration::from_millis(ms)
    }

    /// Interval between stream chunks; `None` = no pacing.
    pub(crate) fn chunk_interval(&self, faults: &FaultState) -> Option<Duration> {
        let tps = self.opts.tokens_per_sec;
        let base = (tps > 0.0).then(|| Duration::from_secs_f64(1.0 / tps));
        if faults.mode == FaultMode::Slow {
            Some(base.map_or(SLOW_UNPACED_INTERVAL, |d| d * SLOW_PACING_FACTOR))
        } else {
            base
        }
    }
}

/// Accepts connections until the mock is shut down, one task per connection.
pub(crate) async fn accept_loop(listener: TcpListener, shared: Arc<Shared>) {
    let mut stop = shared.shutdown.subscribe();
    loop {
        let accepted = tokio::select! {
            r = listener.accept() => r,
            _ = stop.wait_for(|s| *s) => break,
        };
        match accepted {
            Ok((stream, _)) => {
                // Streams must leave chunk by chunk; a failure here only costs latency.
                let _ = stream.set_nodelay(true);
                tokio::spawn(serve_connection(stream, shared.clone()));
            }
            Err(e) => {
                // Out of file descriptors and the like: back off instead of spinning.
                tracing::warn!(error = %e, "mock accept failed");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }
}

async fn serve_connection(stream: TcpStream, shared: Arc<Shared>) {
    let _open = GaugeGuard::connection(&shared.stats);
    let abort = Arc::new(AtomicBool::new(false));
    let io = TokioIo::new(AbortableStream { inner: stream, abort: abort.clone() });
    let svc_shared = shared.clone();
    let service = hyper::service::service_fn(move |req| routes::handle(svc_shared.clone(), abort.clone(), req));
    let conn = shared.http.serve_connection(io, service);
    let mut stop = shared.shutdown.subscribe();
    tokio::select! {
        res = conn => {
            if let Err(e) = res {
                tracing::debug!(error = %e, "mock connection ended with an error");
            }
        }
        _ = stop.wait_for(|s| *s) => {}
    }
}

/// A TCP stream that, when told to, closes with a reset (SO_LINGER 0) instead of an orderly FIN.
struct AbortableStream {
    inner: TcpStream,
    abort: Arc<AtomicBool>,
}

impl Drop for AbortableStream {
    fn drop(&mut self) {
        if self.abort.load(Ordering::Relaxed) {
            // Best effort: if it fails, the peer sees a FIN, still a connection without an answer.
            let _ = self.inner.set_zero_linger();
        }
    }
}

impl AsyncRead for AbortableStream {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for AbortableStream {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}
