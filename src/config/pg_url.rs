//! [`PgUrl`]: the request log's PostgreSQL URL (`[log] url`), checked at load; shown only with its password
//! replaced by `***` (in the user info and in a `password=` parameter), in `Debug` and `Display` alike.

use std::fmt;

/// A `postgres://` URL that never shows its password.
#[derive(Clone, PartialEq, Eq)]
pub struct PgUrl(String);

impl PgUrl {
    /// The URL if it is a `postgres://` or `postgresql://` URL that the client accepts; else why not (the
    /// reason never repeats the URL).
    pub fn parse(s: &str) -> Result<PgUrl, String> {
        if !(s.starts_with("postgres://") || s.starts_with("postgresql://")) {
            return Err("must be a postgres:// URL".into());
        }
        s.parse::<tokio_postgres::Config>().map_err(|e| format!("is not a valid PostgreSQL URL ({e})"))?;
        Ok(PgUrl(s.to_string()))
    }

    /// The URL itself, for connecting only.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// The URL with its password replaced by `***`.
    pub fn redacted(&self) -> String {
        redact(&self.0)
    }
}

fn redact(url: &str) -> String {
    let Some(scheme_end) = url.find("://").map(|i| i + 3) else { return "***".into() };
    let (head, rest) = url.split_at(scheme_end);
    let (main, query) = match rest.find('?') {
        Some(q) => (&rest[..q], Some(&rest[q + 1..])),
        None => (rest, None),
    };
    let mut out = String::from(head);
    // The user info ends at the last `@` before the path: a password may hold an unencoded `@`.
    let authority_end = main.rfind('@').map_or(0, |at| at + 1);
    let (userinfo, after) = main.split_at(authority_end);
    match userinfo.split_once(':') {
        Some((user, _password)) => {
            out.push_str(user);
            out.push_str(":***@");
        }
        None => out.push_str(userinfo),
    }
    out.push_str(after);
    if let Some(q) = query {
        out.push('?');
        for (i, kv) in q.split('&').enumerate() {
            if i > 0 {
                out.push('&');
            }
            match kv.split_once('=') {
                Some((k, _)) if k.eq_ignore_ascii_case("password") => {
                    out.push_str(k);
                    out.push_str("=***");
                }
                _ => out.push_str(kv),
            }
        }
    }
    out
}

impl fmt::Display for PgUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.redacted())
    }
}

impl fmt::Debug for PgUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PgUrl({})", self.redacted())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_never_show() {
        let cases = [
            ("postgres://127.0.0.1:5432/test", "postgres://127.0.0.1:5432/test"),
            ("postgres://app@db:5432/x", "postgres://app@db:5432/x"),
            ("postgres://app:s3cr%40t@db:5432/x", "postgres://app:***@db:5432/x"),
            ("postgresql://app:p@ss@db/x?sslmode=disable", "postgresql://app:***@db/x?sslmode=disable"),
            (
                "postgres://db/x?user=app&password=hunter2&options=-csearch_path%3Dt",
                "postgres://db/x?user=app&password=***&options=-csearch_path%3Dt",
            ),
        ];
        for (url, want) in cases {
            let u = PgUrl::parse(url).unwrap();
            assert_eq!(u.to_string(), want);
            assert_eq!(format!("{u:?}"), format!("PgUrl({want})"));
            assert_eq!(u.expose(), url);
        }
        assert!(PgUrl::parse("mysql://x").unwrap_err().contains("postgres://"));
        let e = PgUrl::parse("postgres://u:hunter2@db:notaport/x").unwrap_err();
        assert!(!e.contains("hunter2"), "{e}");
    }
}
