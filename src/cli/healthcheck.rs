//! `sheepdog healthcheck [--url URL]`: one GET, exit 0 on a 2xx answer within the timeout, else 1. For a
//! container's `HEALTHCHECK` (the runtime image has no curl). Knows nothing of the gateway but the URL.

use std::process::ExitCode;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;

/// GET `url` and tell whether it answered 2xx within `timeout`.
pub async fn run(url: &str, timeout: Duration) -> ExitCode {
    let uri: http::Uri = match url.parse() {
        Ok(u) => u,
        Err(e) => {
            eprintln!("error: --url {url}: {e}");
            return ExitCode::from(2);
        }
    };
    let client = crate::upstream::http_client(timeout);
    let req = match http::Request::get(uri).body(Full::new(Bytes::new())) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: --url {url}: {e}");
            return ExitCode::from(2);
        }
    };
    match tokio::time::timeout(timeout, client.request(req)).await {
        Ok(Ok(resp)) if resp.status().is_success() => ExitCode::SUCCESS,
        Ok(Ok(resp)) => {
            eprintln!("unhealthy: {url} answered {}", resp.status());
            ExitCode::from(1)
        }
        Ok(Err(e)) => {
            eprintln!("unhealthy: {url}: {e}");
            ExitCode::from(1)
        }
        Err(_) => {
            eprintln!("unhealthy: {url}: no answer within {} ms", timeout.as_millis());
            ExitCode::from(1)
        }
    }
}
