//! Budget webhooks: one JSON POST per threshold crossing, sent on a task of its own so that no request ever
//! waits for it. A webhook that fails or takes longer than [`TIMEOUT`] is logged and counted, never retried
//! (the crossing is also in the log and the metrics).

use std::sync::OnceLock;
use std::time::Duration;

use bytes::Bytes;
use http::{header, Method, Request};
use http_body_util::{BodyExt, Full};
use prometheus::IntCounter;

use super::{http_client, HttpClient};

/// The longest a webhook may take, connection included.
pub const TIMEOUT: Duration = Duration::from_secs(5);

fn client() -> &'static HttpClient {
    static CLIENT: OnceLock<HttpClient> = OnceLock::new();
    CLIENT.get_or_init(|| http_client(TIMEOUT))
}

/// POST `body` (JSON) to `url` in the background; a failure increments `failures`. Outside a tokio runtime
/// (never the case in the gateway) it is counted as failed.
pub fn post(url: &str, body: String, failures: IntCounter) {
    let req = Request::builder()
        .method(Method::POST)
        .uri(url)
        .header(header::CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::from(body)));
    let (Ok(req), Ok(rt)) = (req, tokio::runtime::Handle::try_current()) else {
        tracing::warn!("budget webhook: not sent (bad URL or no runtime)");
        failures.inc();
        return;
    };
    rt.spawn(async move {
        let sent = tokio::time::timeout(TIMEOUT, async {
            let resp = client().request(req).await.map_err(|e| e.to_string())?;
            let status = resp.status();
            let _ = resp.into_body().collect().await;
            if status.is_success() {
                Ok(())
            } else {
                Err(format!("answered {status}"))
            }
        })
        .await;
        let err = match sent {
            Ok(Ok(())) => return,
            Ok(Err(e)) => e,
            Err(_) => format!("no answer within {TIMEOUT:?}"),
        };
        tracing::warn!(error = %err, "budget webhook failed");
        failures.inc();
    });
}
