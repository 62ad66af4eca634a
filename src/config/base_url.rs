//! [`BaseUrl`]: an endpoint's `base_url`, parsed and checked once at load; `upstream` builds request URIs
//! from it.

use http::uri::{Authority, Scheme};
use http::{HeaderValue, Uri};

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
}
