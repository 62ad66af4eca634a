//! Upstream endpoints as the network sees them: base URLs, the pooled HTTP client, and API key pools.
//!
//! Knows how to reach an endpoint and with which key; knows nothing of health, selection or the OpenAI format.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http::uri::{Authority, Scheme};
use http::{HeaderValue, Uri};
use http_body_util::Full;
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

use crate::config::Secret;

/// The pooled HTTP(S) client of one endpoint.
pub type HttpClient = Client<HttpsConnector<HttpConnector>, Full<Bytes>>;

/// Build the pooled keep-alive client for an endpoint with this connect timeout.
pub fn client(connect_timeout: Duration) -> HttpClient {
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
        .build(https)
}

/// A parsed base URL: scheme, authority and path prefix (such as `/v1`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BaseUrl {
    scheme: Scheme,
    authority: Authority,
    prefix: String,
    host: HeaderValue,
}

impl BaseUrl {
    /// Parse `http(s)://host[:port][/prefix]`; `None` when it is not such a URL.
    pub fn parse(s: &str) -> Option<BaseUrl> {
        let uri: Uri = s.parse().ok()?;
        let scheme = uri.scheme()?.clone();
        if scheme != Scheme::HTTP && scheme != Scheme::HTTPS {
            return None;
        }
        if uri.query().is_some() {
            return None;
        }
        let authority = uri.authority()?.clone();
        let prefix = uri.path().trim_end_matches('/').to_string();
        // The `Host` header, computed once: the authority without a port that is the scheme's default.
        let default_port = if scheme == Scheme::HTTPS { 443 } else { 80 };
        let host = match authority.port_u16() {
            Some(p) if p == default_port => HeaderValue::from_str(authority.host()).ok()?,
            _ => HeaderValue::from_str(authority.as_str()).ok()?,
        };
        Some(BaseUrl { scheme, authority, prefix, host })
    }

    /// The `Host` header value for requests to this endpoint.
    pub fn host(&self) -> &HeaderValue {
        &self.host
    }

    /// The URI of `path` (which starts with `/`) under the prefix: `/chat/completions` -> `…/v1/chat/completions`.
    pub fn join(&self, path: &str) -> Uri {
        let mut pq = String::with_capacity(self.prefix.len() + path.len());
        pq.push_str(&self.prefix);
        pq.push_str(path);
        Uri::builder()
            .scheme(self.scheme.clone())
            .authority(self.authority.clone())
            .path_and_query(pq)
            .build()
            .unwrap_or_default()
    }

    /// The URI of an absolute `path` on the same host, ignoring the prefix (for `probe_path`).
    pub fn join_absolute(&self, path: &str) -> Uri {
        Uri::builder()
            .scheme(self.scheme.clone())
            .authority(self.authority.clone())
            .path_and_query(path)
            .build()
            .unwrap_or_default()
    }

    /// `host:port` of the endpoint (for connect-time measurements).
    pub fn host_port(&self) -> (String, u16) {
        let default = if self.scheme == Scheme::HTTPS { 443 } else { 80 };
        (self.authority.host().trim_matches(['[', ']']).to_string(), self.authority.port_u16().unwrap_or(default))
    }

    /// Whether the scheme is https.
    pub fn is_https(&self) -> bool {
        self.scheme == Scheme::HTTPS
    }
}

/// One key of a pool, ready to be sent.
pub struct PoolKey {
    secret: Secret,
    header: HeaderValue,
    /// 0 when usable, else the time (ms) it was set aside after a 401/403.
    set_aside_at: AtomicU64,
}

/// The API keys of one endpoint, used in rotation; a key answered 401/403 is set aside until it works again.
pub struct KeyPool {
    keys: Vec<PoolKey>,
    next: AtomicUsize,
}

impl KeyPool {
    /// A pool of these keys (none: the endpoint needs no key).
    pub fn new(keys: &[Secret]) -> KeyPool {
        let keys = keys
            .iter()
            .filter_map(|k| {
                let mut header = HeaderValue::from_str(&format!("Bearer {}", k.expose())).ok()?;
                header.set_sensitive(true);
                Some(PoolKey { secret: k.clone(), header, set_aside_at: AtomicU64::new(0) })
            })
            .collect();
        KeyPool { keys, next: AtomicUsize::new(0) }
    }

    /// Whether the pool holds the same keys as `keys` (so its state can be kept across a reload).
    pub fn same_keys(&self, keys: &[Secret]) -> bool {
        self.keys.len() == keys.len() && self.keys.iter().zip(keys).all(|(a, b)| &a.secret == b)
    }

    /// Whether the endpoint needs no key at all.
    pub fn keyless(&self) -> bool {
        self.keys.is_empty()
    }

    /// Whether at least one key is usable (always true for a keyless endpoint).
    pub fn has_usable(&self) -> bool {
        self.keys.is_empty() || self.keys.iter().any(|k| k.set_aside_at.load(Ordering::Relaxed) == 0)
    }

    /// The next usable key in rotation: its index and `Authorization` value. `Ok(None)` for a keyless endpoint,
    /// `Err(())` when every key is set aside.
    #[allow(clippy::result_unit_err)]
    pub fn next(&self) -> Result<Option<(usize, &HeaderValue)>, ()> {
        let n = self.keys.len();
        if n == 0 {
            return Ok(None);
        }
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        for i in 0..n {
            let idx = (start + i) % n;
            let k = &self.keys[idx];
            if k.set_aside_at.load(Ordering::Relaxed) == 0 {
                return Ok(Some((idx, &k.header)));
            }
        }
        Err(())
    }

    /// Set key `idx` aside (it was answered 401/403). Returns true when this changed it.
    pub fn set_aside(&self, idx: usize, now_ms: u64) -> bool {
        self.keys.get(idx).is_some_and(|k| {
            k.set_aside_at.compare_exchange(0, now_ms.max(1), Ordering::Relaxed, Ordering::Relaxed).is_ok()
        })
    }

    /// Bring key `idx` back into rotation (it worked again). Returns true when this changed it.
    pub fn restore(&self, idx: usize) -> bool {
        self.keys.get(idx).is_some_and(|k| k.set_aside_at.swap(0, Ordering::Relaxed) != 0)
    }

    /// Keys set aside at least `after_ms` ago, due for a re-test: index and `Authorization` value.
    pub fn due_for_retest(&self, now_ms: u64, after_ms: u64) -> Vec<(usize, HeaderValue)> {
        self.keys
            .iter()
            .enumerate()
            .filter(|(_, k)| {
                let t = k.set_aside_at.load(Ordering::Relaxed);
                t != 0 && now_ms.saturating_sub(t) >= after_ms
            })
            .map(|(i, k)| (i, k.header.clone()))
            .collect()
    }

    /// Note that a set-aside key was just re-tested (and failed), so the next re-test waits a full period.
    pub fn retested(&self, idx: usize, now_ms: u64) {
        if let Some(k) = self.keys.get(idx) {
            // Only a key still set aside gets a new timestamp; a restored one stays usable.
            let _ = k
                .set_aside_at
                .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |t| (t != 0).then_some(now_ms.max(1)));
        }
    }

    /// Number of keys, and of those set aside.
    pub fn counts(&self) -> (usize, usize) {
        (self.keys.len(), self.keys.iter().filter(|k| k.set_aside_at.load(Ordering::Relaxed) != 0).count())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base_url_join() {
        let b = BaseUrl::parse("https://api.example.com/api/v1").unwrap();
        assert_eq!(b.join("/chat/completions").to_string(), "https://api.example.com/api/v1/chat/completions");
        assert_eq!(b.join_absolute("/health").to_string(), "https://api.example.com/health");
        assert_eq!(b.host_port(), ("api.example.com".to_string(), 443));
        let b = BaseUrl::parse("http://127.0.0.1:9000").unwrap();
        assert_eq!(b.join("/models").to_string(), "http://127.0.0.1:9000/models");
        assert_eq!(b.host(), "127.0.0.1:9000");
        assert_eq!(BaseUrl::parse("https://api.example.com:443/v1").unwrap().host(), "api.example.com");
        assert_eq!(BaseUrl::parse("http://[::1]:8080/v1").unwrap().host(), "[::1]:8080");
        assert!(BaseUrl::parse("ftp://x").is_none());
        assert!(BaseUrl::parse("not a url").is_none());
    }

    #[test]
    fn key_pool_rotates_and_sets_aside() {
        let pool = KeyPool::new(&[Secret::new("a"), Secret::new("b"), Secret::new("c")]);
        let picks: Vec<usize> = (0..6).map(|_| pool.next().unwrap().unwrap().0).collect();
        assert_eq!(picks, vec![0, 1, 2, 0, 1, 2]);
        assert!(pool.set_aside(1, 100));
        assert!(!pool.set_aside(1, 200), "already aside");
        let picks: Vec<usize> = (0..4).map(|_| pool.next().unwrap().unwrap().0).collect();
        assert!(!picks.contains(&1));
        assert!(pool.due_for_retest(150, 100).is_empty());
        assert_eq!(pool.due_for_retest(200, 100).len(), 1);
        pool.set_aside(0, 1);
        pool.set_aside(2, 1);
        assert!(pool.next().is_err());
        assert!(!pool.has_usable());
        assert!(pool.restore(2));
        assert_eq!(pool.next().unwrap().unwrap().0, 2);
        assert!(KeyPool::new(&[]).next().unwrap().is_none());
    }

    #[test]
    fn headers_are_sensitive() {
        let pool = KeyPool::new(&[Secret::new("sk-secret")]);
        let (_, h) = pool.next().unwrap().unwrap();
        assert!(h.is_sensitive());
        assert!(!format!("{h:?}").contains("sk-secret"));
    }
}
