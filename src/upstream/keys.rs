//! API key pools: an endpoint's keys in rotation. A key a live request saw refused (401) becomes *suspect*; it
//! is set aside only when a probe with it is refused too (the prober confirms suspects), so one client request
//! cannot take a key out of rotation; a key set aside comes back when a re-test shows it works again.
//! Key values live only in sensitive header values and [`Secret`]s: never in logs or errors.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};

use http::HeaderValue;

use crate::config::Secret;

/// One key of a pool, ready to be sent.
pub struct PoolKey {
    secret: Secret,
    header: HeaderValue,
    /// 0 when usable, else the time (ms) it was set aside after a 401/403.
    set_aside_at: AtomicU64,
    /// A live request saw it refused; a probe with it is due.
    suspect: AtomicBool,
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
                Some(PoolKey {
                    secret: k.clone(),
                    header,
                    set_aside_at: AtomicU64::new(0),
                    suspect: AtomicBool::new(false),
                })
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

    /// Number of keys.
    pub fn len(&self) -> usize {
        self.keys.len()
    }

    /// Whether the pool has no key.
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// A live request saw key `idx` refused: mark it for a confirming probe. Returns true when it was not
    /// suspect yet.
    pub fn suspect(&self, idx: usize) -> bool {
        self.keys.get(idx).is_some_and(|k| !k.suspect.swap(true, Ordering::Relaxed))
    }

    /// Suspect keys still in rotation, for the caller to probe: index and `Authorization` value. Each is handed
    /// out once: it is suspect again only when a request sees it refused again.
    pub fn take_suspects(&self) -> Vec<(usize, HeaderValue)> {
        if !self.keys.iter().any(|k| k.suspect.load(Ordering::Relaxed)) {
            return Vec::new();
        }
        self.keys
            .iter()
            .enumerate()
            .filter(|(_, k)| k.suspect.swap(false, Ordering::Relaxed) && k.set_aside_at.load(Ordering::Relaxed) == 0)
            .map(|(i, k)| (i, k.header.clone()))
            .collect()
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
    fn a_suspect_key_is_handed_out_once_for_a_probe() {
        let pool = KeyPool::new(&[Secret::new("a"), Secret::new("b")]);
        assert!(pool.take_suspects().is_empty());
        assert!(pool.suspect(1));
        assert!(!pool.suspect(1), "already suspect");
        let s = pool.take_suspects();
        assert_eq!(s.iter().map(|(i, _)| *i).collect::<Vec<_>>(), vec![1]);
        assert!(pool.take_suspects().is_empty(), "handed out once");
        assert!(pool.has_usable() && pool.counts() == (2, 0), "suspect is not set aside");
        pool.suspect(0);
        pool.set_aside(0, 5);
        assert!(pool.take_suspects().is_empty(), "a key already set aside needs no probe");
    }

    #[test]
    fn headers_are_sensitive() {
        let pool = KeyPool::new(&[Secret::new("sk-secret")]);
        let (_, h) = pool.next().unwrap().unwrap();
        assert!(h.is_sensitive());
        assert!(!format!("{h:?}").contains("sk-secret"));
    }
}
