//! The gateway's one clock module: process time for decisions and wall time for records.
//!
//! Process time ([`Clock::now_ms`]) runs on tokio's clock, so tests that pause tokio control every timeout,
//! backoff, breaker and probe schedule. Wall time ([`unix_ms`], [`unix_s`]) is only for what leaves the
//! process: request-log timestamps, `created` fields, HTTP dates. Nothing else in the gateway reads a clock of
//! its own; the policy crate reads none at all.

use tokio::time::Instant;

/// Milliseconds since the gateway started, on tokio's clock.
#[derive(Debug, Clone, Copy)]
pub struct Clock {
    start: Instant,
}

impl Default for Clock {
    fn default() -> Self {
        Clock::new()
    }
}

impl Clock {
    /// A clock starting now.
    pub fn new() -> Clock {
        Clock { start: Instant::now() }
    }

    /// Milliseconds since start; never 0 (0 means "never" in the state that stores these times).
    pub fn now_ms(&self) -> u64 {
        self.ms_at(Instant::now())
    }

    /// The process time of instant `t` (0 … before start counts as 1).
    pub fn ms_at(&self, t: Instant) -> u64 {
        t.saturating_duration_since(self.start).as_millis() as u64 + 1
    }
}

/// Milliseconds elapsed since `t`, as a float (latencies).
pub fn ms_since(t: Instant) -> f64 {
    t.elapsed().as_secs_f64() * 1000.0
}

/// The wall clock in Unix milliseconds.
pub fn unix_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64)
}

/// The wall clock in Unix seconds.
pub fn unix_s() -> u64 {
    (unix_ms() / 1000).max(0) as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn process_time_follows_tokio_and_is_never_zero() {
        let c = Clock::new();
        assert_eq!(c.now_ms(), 1);
        tokio::time::advance(std::time::Duration::from_millis(2500)).await;
        assert_eq!(c.now_ms(), 2501);
        assert!(unix_ms() > 1_700_000_000_000);
        assert_eq!(unix_s(), (unix_ms() / 1000) as u64);
    }
}
