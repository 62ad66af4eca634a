//! The gateway's HTTP server: accept loop, routing, the operational routes (`/health`, `/ready`, `/status`,
//! `/metrics`, `/dashboard`, `/admin/*`), SIGHUP reload and graceful shutdown.
//!
//! Routes `/v1/*` to `proxy`; holds no request state of its own.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use hyper_util::server::graceful::GracefulShutdown;
use serde::Serialize;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::gateway::{Gateway, ReloadError};
use crate::openai::ApiError;
use crate::proxy::{self, Api, Body};
use crate::state::PairView;

/// How long in-flight requests may take to finish after a shutdown signal.
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(30);

/// Serve on `listener` until `shutdown` turns true, then finish in-flight requests (up to [`DRAIN_TIMEOUT`]).
pub async fn serve(gw: Arc<Gateway>, listener: TcpListener, mut shutdown: watch::Receiver<bool>) {
    let graceful = GracefulShutdown::new();
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(hyper_util::rt::TokioTimer::new()).header_read_timeout(Duration::from_secs(30));
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let (stream, _) = match accepted {
                    Ok(s) => s,
                    Err(e) => {
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let _ = stream.set_nodelay(true);
                let gw = gw.clone();
                let conn = http.serve_connection(
                    TokioIo::new(stream),
                    service_fn(move |req| {
                        let gw = gw.clone();
                        async move { Ok::<_, Infallible>(route(gw, req).await) }
                    }),
                );
                let conn = graceful.watch(conn);
                tokio::spawn(async move {
                    let _ = conn.await;
                });
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

fn json<T: Serialize>(status: StatusCode, v: &T) -> Response<Body> {
    let body = serde_json::to_vec(v).unwrap_or_default();
    let mut r = Response::new(Body::full(body));
    *r.status_mut() = status;
    r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    r
}

fn raw(status: StatusCode, content_type: &'static str, body: impl Into<Bytes>) -> Response<Body> {
    let mut r = Response::new(Body::full(body));
    *r.status_mut() = status;
    r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    r
}

fn not_found(path: &str) -> Response<Body> {
    proxy::error_response(&ApiError::new(
        StatusCode::NOT_FOUND,
        "invalid_request_error",
        "not_found",
        format!("Unknown route {path}"),
    ))
}

fn method_not_allowed(method: &Method, path: &str) -> Response<Body> {
    proxy::error_response(&ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "invalid_request_error",
        "method_not_allowed",
        format!("{method} is not allowed on {path}"),
    ))
}

/// Dispatch one request.
pub async fn route(gw: Arc<Gateway>, req: Request<Incoming>) -> Response<Body> {
    let path = req.uri().path();
    let method = req.method().clone();
    let api = match path {
        "/v1/chat/completions" | "/chat/completions" => Some(Api::Chat),
        "/v1/embeddings" | "/embeddings" => Some(Api::Embeddings),
        _ => None,
    };
    if let Some(api) = api {
        if method != Method::POST {
            return method_not_allowed(&method, path);
        }
        return proxy::handle(&gw, api, req).await;
    }
    let get = method == Method::GET || method == Method::HEAD;
    match path {
        "/v1/models" | "/models" if get => raw(StatusCode::OK, "application/json", gw.runtime().models_json.clone()),
        "/health" if get => raw(StatusCode::OK, "application/json", &b"{\"status\":\"ok\"}"[..]),
        "/ready" if get => ready(&gw),
        "/status" if get => json(StatusCode::OK, &status(&gw)),
        "/metrics" if get => raw(StatusCode::OK, "text/plain; version=0.0.4; charset=utf-8", gw.metrics.render()),
        "/dashboard" | "/dashboard/" if get => raw(StatusCode::OK, "text/html; charset=utf-8", crate::dashboard::PAGE),
        p if p.starts_with("/admin/") => {
            if method != Method::POST {
                return method_not_allowed(&method, p);
            }
            admin(&gw, req).await
        }
        "/v1/models" | "/models" | "/health" | "/ready" | "/status" | "/metrics" | "/dashboard" => {
            method_not_allowed(&method, path)
        }
        _ => not_found(path),
    }
}

fn ready(gw: &Gateway) -> Response<Body> {
    let rt = gw.runtime();
    let now = gw.now_ms();
    let serving = rt.pairs().filter(|(e, p)| rt.can_serve(e, p, now)).count();
    let status = if serving > 0 { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    json(status, &serde_json::json!({"ready": serving > 0, "serving_pairs": serving}))
}

/// `GET /status`.
#[derive(Serialize)]
pub struct StatusDoc {
    global: Global,
    endpoints: Vec<EndpointStatus>,
}

#[derive(Serialize)]
struct Global {
    available_ratio: f64,
    degraded: bool,
}

#[derive(Serialize)]
struct EndpointStatus {
    name: String,
    enabled: bool,
    api_keys: usize,
    api_keys_set_aside: usize,
    models: Vec<PairView>,
}

/// The `/status` document.
pub fn status(gw: &Gateway) -> StatusDoc {
    let rt = gw.runtime();
    let now = gw.now_ms();
    let (available_ratio, degraded) = rt.availability(now);
    let endpoints = rt
        .endpoints
        .iter()
        .map(|e| {
            let (n, aside) = e.keys.counts();
            let ready = e.ready();
            EndpointStatus {
                name: e.cfg.name.clone(),
                enabled: e.enabled.load(Ordering::Relaxed),
                api_keys: n,
                api_keys_set_aside: aside,
                models: e
                    .pairs
                    .iter()
                    .map(|p| {
                        let mut v = p.view(&rt.breaker, now);
                        v.can_serve &= ready;
                        v
                    })
                    .collect(),
            }
        })
        .collect();
    StatusDoc { global: Global { available_ratio, degraded }, endpoints }
}

fn admin_allowed(gw: &Gateway, req: &Request<Incoming>) -> bool {
    let rt = gw.runtime();
    let Some(key) = &rt.config.server.admin_key else { return true };
    let given = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .or_else(|| req.headers().get("x-admin-key").and_then(|v| v.to_str().ok()));
    // Constant-time comparison: the admin key must not leak through timing.
    given.is_some_and(|g| {
        let (a, b) = (g.trim().as_bytes(), key.expose().as_bytes());
        a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
    })
}

async fn admin(gw: &Arc<Gateway>, req: Request<Incoming>) -> Response<Body> {
    if !admin_allowed(gw, &req) {
        return proxy::error_response(&ApiError::new(
            StatusCode::UNAUTHORIZED,
            "authentication_error",
            "invalid_admin_key",
            "This route needs the admin key: Authorization: Bearer <admin_key>",
        ));
    }
    let path = req.uri().path().to_string();
    if path == "/admin/reload" {
        return match gw.reload().await {
            Ok(()) => json(StatusCode::OK, &serde_json::json!({"reloaded": true})),
            Err(ReloadError::NoFile) => proxy::error_response(&ApiError::new(
                StatusCode::CONFLICT,
                "invalid_request_error",
                "no_config_file",
                "The gateway runs the embedded demo; there is no config file to reload",
            )),
            Err(ReloadError::Invalid(e)) => {
                tracing::error!(error = %e, "reload refused: the old configuration stays");
                proxy::error_response(&ApiError::new(
                    StatusCode::UNPROCESSABLE_ENTITY,
                    "invalid_request_error",
                    "invalid_config",
                    format!("Reload refused, the old configuration stays: {e}"),
                ))
            }
        };
    }
    let rest = path.trim_start_matches("/admin/endpoints/");
    if rest.len() != path.len() {
        if let Some((name, action)) = rest.rsplit_once('/') {
            let enable = match action {
                "enable" => true,
                "disable" => false,
                _ => return not_found(&path),
            };
            let rt = gw.runtime();
            let Some(ep) = rt.endpoints.iter().find(|e| e.cfg.name == name) else {
                return proxy::error_response(&ApiError::new(
                    StatusCode::NOT_FOUND,
                    "invalid_request_error",
                    "endpoint_not_found",
                    format!("No endpoint named `{name}`"),
                ));
            };
            ep.enabled.store(enable, Ordering::Relaxed);
            tracing::warn!(
                endpoint = name,
                enabled = enable,
                "endpoint manually {}",
                if enable { "enabled" } else { "disabled" }
            );
            return json(StatusCode::OK, &serde_json::json!({"endpoint": name, "enabled": enable}));
        }
    }
    not_found(&path)
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
                            Ok(()) => tracing::info!("reloaded on SIGHUP"),
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
