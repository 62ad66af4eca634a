//! What a replica makes of health changes other replicas share (the gateway's `shared` module carries them
//! through Redis): which message is newer, how a wall-clock instant maps onto this process's clock, and how
//! long a probe lease lasts.
//!
//! **Invariant:** pure; no I/O, no clock. Versions are the wall-clock instant (Unix ms) at which the change
//! happened on the replica that made it, ties broken by the replica's id, so every replica orders the same
//! two messages the same way.

use std::cmp::Ordering;

/// The version of one shared fact (a pair's breaker, an endpoint's drain): when it changed, and where.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Version {
    /// When the change happened, Unix ms.
    pub at_unix_ms: i64,
    /// The id of the replica that made it.
    pub from: String,
}

impl Version {
    /// Whether a message at `at_unix_ms` from `from` is newer than this version (equal is not newer, so a
    /// message applied once is never applied again).
    pub fn older_than(&self, at_unix_ms: i64, from: &str) -> bool {
        match self.at_unix_ms.cmp(&at_unix_ms) {
            Ordering::Less => true,
            Ordering::Greater => false,
            Ordering::Equal => self.from.as_str() < from,
        }
    }
}

/// Whether a message at `at_unix_ms` from `from` should be applied, given the last version `seen` of the
/// same fact: never one of our own (`me`: echoes), never one not newer than what was seen (stale or
/// repeated).
pub fn accept(seen: Option<&Version>, me: &str, at_unix_ms: i64, from: &str) -> bool {
    from != me && seen.is_none_or(|v| v.older_than(at_unix_ms, from))
}

/// The instant `at_unix_ms` on this process's clock, given that `now_unix_ms` is `now_ms` here; `None` when
/// it is already past.
pub fn local_deadline(at_unix_ms: i64, now_unix_ms: i64, now_ms: u64) -> Option<u64> {
    let ahead = at_unix_ms.checked_sub(now_unix_ms)?;
    (ahead > 0).then(|| now_ms.saturating_add(ahead as u64))
}

/// The wall-clock instant of `at_ms` on this process's clock, given that `now_ms` here is `now_unix_ms`.
pub fn unix_of(at_ms: u64, now_ms: u64, now_unix_ms: i64) -> i64 {
    if at_ms >= now_ms {
        now_unix_ms.saturating_add((at_ms - now_ms).min(i64::MAX as u64) as i64)
    } else {
        now_unix_ms.saturating_sub((now_ms - at_ms).min(i64::MAX as u64) as i64)
    }
}

/// How long a probe lease taken for a pair probed every `interval_ms` lasts: the interval and a fifth, so
/// that the holder's next probe (jittered by ±10 %) renews it before it lapses, and a dead holder's lease
/// lapses within that long.
pub fn lease_ms(interval_ms: u64) -> u64 {
    interval_ms.saturating_add(interval_ms / 5).max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(at: i64, from: &str) -> Version {
        Version { at_unix_ms: at, from: from.into() }
    }

    #[test]
    fn own_messages_are_echoes_and_never_applied() {
        assert!(!accept(None, "a", 10, "a"));
        assert!(accept(None, "a", 10, "b"));
    }

    #[test]
    fn only_newer_messages_are_applied_ties_broken_by_replica() {
        let seen = v(100, "b");
        assert!(!accept(Some(&seen), "a", 99, "c"), "older");
        assert!(!accept(Some(&seen), "a", 100, "b"), "the same message again");
        assert!(accept(Some(&seen), "a", 100, "c"), "same instant, larger id");
        assert!(!accept(Some(&seen), "a", 100, "a0"), "same instant, smaller id");
        assert!(accept(Some(&seen), "a", 101, "a0"));
    }

    #[test]
    fn wall_clock_instants_map_onto_the_process_clock() {
        assert_eq!(local_deadline(1_500, 1_000, 20), Some(520));
        assert_eq!(local_deadline(1_000, 1_000, 20), None);
        assert_eq!(local_deadline(900, 1_000, 20), None);
        assert_eq!(unix_of(520, 20, 1_000), 1_500);
        assert_eq!(unix_of(10, 20, 1_000), 990);
    }

    #[test]
    fn a_lease_outlasts_the_jittered_interval() {
        assert_eq!(lease_ms(1_000), 1_200);
        assert!(lease_ms(1_000) > 1_100);
        assert_eq!(lease_ms(0), 1);
    }
}
