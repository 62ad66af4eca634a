//! [`Secret`]: an API key (upstream or admin) that never shows itself in `Debug`, `Display`, logs or errors.

use std::fmt;

/// An upstream API key. Its `Debug` and `Display` never show the value.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(pub(super) String);

impl Secret {
    /// Wrap a secret value.
    pub fn new(s: impl Into<String>) -> Self {
        Secret(s.into())
    }
    /// The secret itself, for the `Authorization` header only.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(***)")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

/// SHA-256 of a client key, as `[[clients]] key_hash` stores it (the key itself is never kept).
pub fn hash_client_key(key: &str) -> [u8; 32] {
    use sha2::Digest;
    sha2::Sha256::digest(key.trim().as_bytes()).into()
}

/// Whether two hashes are equal, in time that does not depend on where they differ.
pub fn hashes_equal(a: &[u8; 32], b: &[u8; 32]) -> bool {
    let mut diff = 0u8;
    for (x, y) in a.iter().zip(b) {
        diff |= x ^ y;
    }
    // black_box: keep the compiler from turning the fold into an early exit.
    std::hint::black_box(diff) == 0
}

/// Whether a presented secret is `expected`, in time that tells neither where they differ nor how long
/// `expected` is (both are hashed first).
pub fn secret_matches(presented: &str, expected: &str) -> bool {
    hashes_equal(&hash_client_key(presented), &hash_client_key(expected))
}

/// `sha256:` and 64 lower-case hex digits, the form of `key_hash` in the config.
pub fn format_key_hash(hash: &[u8; 32]) -> String {
    let mut s = String::with_capacity(71);
    s.push_str("sha256:");
    for b in hash {
        s.push_str(&format!("{b:02x}"));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_key_hash_round_trips_through_the_config_form() {
        // SHA-256("test"), a published test vector.
        let h = hash_client_key("test");
        let text = format_key_hash(&h);
        assert_eq!(text, "sha256:9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08");
        assert_eq!(crate::config::parse_key_hash(&text), Some(h));
        assert_eq!(hash_client_key(" test\n"), h, "surrounding white space is not part of a key");
    }
}
