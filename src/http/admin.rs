//! `/admin/*`: reload and manual drain, behind the admin key (compared in constant time). Without an admin
//! key the admin routes are off: they answer 404, as if they did not exist.

use std::sync::Arc;

use http::header;
use http::{Request, Response, StatusCode};
use hyper::body::Incoming;

use super::routes::{json, not_found};
use crate::gateway::{Gateway, ReloadError};
use crate::pipeline::{error_response, Body};
use crate::protocol::ApiError;

fn admin_allowed(key: &crate::config::Secret, req: &Request<Incoming>) -> bool {
    let given = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .or_else(|| req.headers().get("x-admin-key").and_then(|v| v.to_str().ok()));
    // Constant-time comparison of hashes: neither the key nor its length leaks through timing.
    given.is_some_and(|g| crate::config::secret_matches(g, key.expose()))
}

pub(super) async fn admin(gw: &Arc<Gateway>, req: Request<Incoming>) -> Response<Body> {
    let Some(key) = gw.runtime().config.server.admin_key.clone() else {
        return not_found(req.uri().path());
    };
    if !admin_allowed(&key, &req) {
        return error_response(&ApiError::new(
            StatusCode::UNAUTHORIZED,
            "authentication_error",
            "invalid_admin_key",
            "This route needs the admin key: Authorization: Bearer <admin_key>",
        ));
    }
    let path = req.uri().path().to_string();
    if path == "/admin/reload" {
        return match gw.reload().await {
            Ok(r) => json(StatusCode::OK, &serde_json::json!({"reloaded": true, "needs_restart": r.needs_restart})),
            Err(ReloadError::NoFile) => error_response(&ApiError::new(
                StatusCode::CONFLICT,
                "invalid_request_error",
                "no_config_file",
                "The gateway runs the embedded demo; there is no config file to reload",
            )),
            Err(ReloadError::Invalid(e)) => {
                tracing::error!(error = %e, "reload refused: the old configuration stays");
                error_response(&ApiError::new(
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
                return error_response(&ApiError::new(
                    StatusCode::NOT_FOUND,
                    "invalid_request_error",
                    "endpoint_not_found",
                    format!("No endpoint named `{name}`"),
                ));
            };
            ep.set_enabled(enable, &gw.changes);
            let at_ms = gw.now_ms();
            gw.outbox.send(crate::state::Event::Drain { endpoint: name.into(), enabled: enable, at_ms });
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
