//! The gateway's HTTP server: accept loop, graceful shutdown, SIGHUP reload; [`routes`] dispatches requests
//! (`/v1/*` to the pipeline, the operational routes here), [`admin`] serves `/admin/*`.
//!
//! Holds no request state of its own.

pub mod admin;
pub mod connections;
pub mod dashboard;
pub mod drain;
pub mod heap;
pub mod routes;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::gateway::Gateway;

/// How long a connection may take to send a request head (the first, or the next on a kept-alive connection) is
/// `server.client_timeout`; this for connections accepted while three quarters of `max_connections` are open.
pub const PRESSED_HEADER_READ_TIMEOUT: Duration = Duration::from_secs(2);

/// How long in-flight requests may take to finish after a shutdown signal.
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(30);

/// Serve on `listener` until `shutdown` turns true, then finish in-flight requests (up to [`DRAIN_TIMEOUT`]).
/// At most `max_connections` client connections are open at once (see [`connections::limit`]); past it a new
/// connection is closed at once and counted.
pub async fn serve(gw: Arc<Gateway>, listener: TcpListener, mut shutdown: watch::Receiver<bool>) {
    let graceful = drain::Drain::new();
    let server = gw.runtime().config.server.clone();
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(server.client_timeout.max(PRESSED_HEADER_READ_TIMEOUT))
        .max_buf_size(server.max_header_bytes.max(8192));
    // The header count follows the byte limit: hyper's default of 100 headers at the default 64 KiB, scaled
    // with it (above 100 hyper allocates the header slots per request, so only when the byte limit asks).
    let max_headers = server.max_header_bytes * 100 / (64 << 10);
    if max_headers != 100 {
        http.max_headers(max_headers.max(8));
    }
    // Under pressure (three quarters of the connections open), a new connection must send its request head
    // quickly: a flood of idle connections then clears itself within seconds.
    let mut pressed = http.clone();
    pressed.header_read_timeout(PRESSED_HEADER_READ_TIMEOUT);
    let gate = connections::Gate::new(connections::limit(server.max_connections, connections::raise_file_limit()));
    tracing::debug!(max_connections = gate.limit(), "client connection limit");
    let mut backoff = connections::AcceptBackoff::default();
    let trimmer = Arc::new(parking_lot::Mutex::new(heap::Trimmer::new()));
    // SHEEPDOG_NO_TRIM=1 leaves the heap as the allocator keeps it (for `bench/flood.sh`'s comparison).
    let trim_heap = std::env::var_os("SHEEPDOG_NO_TRIM").is_none();
    let mut trim_check = tokio::time::interval(heap::Trimmer::EVERY);
    trim_check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let m = &gw.metrics;
    let mut rejected_warned: Option<tokio::time::Instant> = None;
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let stream = match accepted {
                    Ok((s, _)) => {
                        backoff.succeeded();
                        s
                    }
                    Err(e) => {
                        m.accept_errors.inc();
                        tokio::time::sleep(backoff.failed(&e)).await;
                        continue;
                    }
                };
                let Some(admitted) = gate.admit() else {
                    // Closed at once: the client sees a reset, the descriptor is free again.
                    drop(stream);
                    m.connections_rejected.inc();
                    m.rejections.inc(crate::metrics::Reason::ConnectionLimit);
                    if rejected_warned.is_none_or(|t| t.elapsed() >= Duration::from_secs(60)) {
                        rejected_warned = Some(tokio::time::Instant::now());
                        tracing::warn!(max_connections = gate.limit(), rejected_total = m.connections_rejected.get(), "client connections closed at once: too many open");
                    }
                    continue;
                };
                m.connections_open.set(gate.open() as i64);
                let _ = stream.set_nodelay(true);
                let gw = gw.clone();
                let builder = if gate.open() * 4 >= gate.limit() * 3 { &pressed } else { &http };
                let conn = builder.serve_connection(
                    TokioIo::new(stream),
                    // hyper keeps a connection's service future in a box for the connection's whole life, sized
                    // for the future; boxed here, a kept-alive connection or an open stream holds a pointer, and
                    // the request's state (a few KiB) is freed once its answer's head is out.
                    service_fn(move |req| {
                        let gw = gw.clone();
                        Box::pin(async move { Ok::<_, Infallible>(routes::route(gw, req).await) })
                    }),
                );
                let conn = graceful.watch(conn);
                let open = m.connections_open.clone();
                tokio::spawn(async move {
                    let _ = conn.await;
                    drop(admitted);
                    open.dec();
                });
            }
            _ = trim_check.tick() => {
                if trim_heap {
                    let trimmer = trimmer.clone();
                    tokio::task::spawn_blocking(move || heap::check(&trimmer));
                }
            }
            _ = shutdown.changed() => break,
        }
    }
    drop(listener);
    tracing::info!("shutting down: finishing in-flight requests");
    tokio::select! {
        _ = graceful.shutdown() => tracing::info!("all connections closed"),
        _ = tokio::time::sleep(DRAIN_TIMEOUT) => tracing::warn!("drain timeout: closing remaining connections"),
    }
}

/// Pending connections the kernel queues for accept. The default of 128 drops SYNs when a thousand clients
/// connect at once (a burst of streams), which they only retry a second later.
pub const LISTEN_BACKLOG: u32 = 4096;

/// Bind the listen address with a deep accept queue ([`LISTEN_BACKLOG`]).
pub async fn bind(addr: &str) -> std::io::Result<(TcpListener, SocketAddr)> {
    let mut last = None;
    for a in tokio::net::lookup_host(addr).await? {
        let socket = if a.is_ipv4() { tokio::net::TcpSocket::new_v4()? } else { tokio::net::TcpSocket::new_v6()? };
        socket.set_reuseaddr(true)?;
        match socket.bind(a).and_then(|()| socket.listen(LISTEN_BACKLOG)) {
            Ok(l) => {
                let local = l.local_addr()?;
                return Ok((l, local));
            }
            Err(e) => last = Some(e),
        }
    }
    Err(last.unwrap_or_else(|| std::io::Error::new(std::io::ErrorKind::InvalidInput, "no address to listen on")))
}

/// A watch that turns true on SIGINT or SIGTERM; SIGHUP reloads the config.
pub fn signals(gw: Arc<Gateway>) -> watch::Receiver<bool> {
    let (tx, rx) = watch::channel(false);
    // Registered before this returns (and so before the ready line): an early SIGTERM stops it gracefully.
    #[cfg(unix)]
    let handlers = {
        use tokio::signal::unix::{signal, SignalKind};
        (signal(SignalKind::terminate()), signal(SignalKind::hangup()))
    };
    tokio::spawn(async move {
        #[cfg(unix)]
        {
            let (Ok(mut term), Ok(mut hup)) = handlers else {
                tracing::error!("cannot install signal handlers");
                return;
            };
            loop {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => break,
                    _ = term.recv() => break,
                    _ = hup.recv() => {
                        match gw.reload().await {
                            Ok(r) => tracing::info!(needs_restart = ?r.needs_restart, "reloaded on SIGHUP"),
                            Err(e) => tracing::error!(error = %e, "SIGHUP reload refused: the old configuration stays"),
                        }
                    }
                }
            }
        }
        #[cfg(not(unix))]
        {
            let _ = gw;
            let _ = tokio::signal::ctrl_c().await;
        }
        let _ = tx.send(true);
    });
    rx
}
