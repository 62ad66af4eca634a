//! Client connections as a resource: how many may be open ([`limit`], derived from the file limit so that
//! upstream sockets, the request log and state files always find a descriptor), the gate that closes the ones
//! past it at once ([`Gate`]), the accept loop's backoff when the process runs out of descriptors anyway
//! ([`AcceptBackoff`]: no log line per attempt).
//!
//! Decides nothing about requests; counts in `sheepdog_connections_*`.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Descriptors kept back from clients, beyond a quarter of the limit: the listener, the request log, the
/// state file, the prober, stdio.
const RESERVED_FDS: usize = 64;

/// Raise the soft limit of open files to the hard limit (as servers do at start); the soft limit after it.
pub fn raise_file_limit() -> Option<usize> {
    #[cfg(unix)]
    {
        let mut l = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
        // SAFETY: getrlimit/setrlimit take a pointer to a properly initialised rlimit, which outlives the call.
        unsafe {
            if libc::getrlimit(libc::RLIMIT_NOFILE, &mut l) != 0 {
                return None;
            }
            if l.rlim_cur < l.rlim_max {
                let raised = libc::rlimit { rlim_cur: l.rlim_max, rlim_max: l.rlim_max };
                if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
                    l = raised;
                }
            }
        }
        Some(usize::try_from(l.rlim_cur).unwrap_or(usize::MAX))
    }
    #[cfg(not(unix))]
    {
        None
    }
}

/// The most client connections: `configured` when set, else three quarters of the file limit minus
/// [`RESERVED_FDS`], so that a quarter is always left for upstream connections.
pub fn limit(configured: usize, file_limit: Option<usize>) -> usize {
    if configured > 0 {
        return configured;
    }
    match file_limit {
        Some(n) => (n / 4 * 3).saturating_sub(RESERVED_FDS).max(16),
        None => 10_000,
    }
}

/// Admits connections up to the limit; a connection holds its [`OwnedSemaphorePermit`] until it closes.
pub struct Gate {
    permits: Arc<Semaphore>,
    limit: usize,
    open: Arc<AtomicUsize>,
}

/// An admitted connection: counted open until dropped.
pub struct Admitted {
    _permit: OwnedSemaphorePermit,
    open: Arc<AtomicUsize>,
}

impl Drop for Admitted {
    fn drop(&mut self) {
        self.open.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Gate {
    /// A gate for `limit` connections.
    pub fn new(limit: usize) -> Gate {
        Gate { permits: Arc::new(Semaphore::new(limit)), limit, open: Arc::new(AtomicUsize::new(0)) }
    }

    /// Admit one more connection, or `None` when `limit` are open.
    pub fn admit(&self) -> Option<Admitted> {
        let permit = self.permits.clone().try_acquire_owned().ok()?;
        self.open.fetch_add(1, Ordering::Relaxed);
        Some(Admitted { _permit: permit, open: self.open.clone() })
    }

    /// Connections open now.
    pub fn open(&self) -> usize {
        self.open.load(Ordering::Relaxed)
    }

    /// The limit.
    pub fn limit(&self) -> usize {
        self.limit
    }
}

/// The accept loop's state after errors (out of descriptors, mostly): an exponential pause from 5 ms to 1 s,
/// and one log line when a streak of errors starts and one when it ends.
#[derive(Default)]
pub struct AcceptBackoff {
    failures: u32,
}

impl AcceptBackoff {
    /// An accept failed: how long to pause before the next.
    pub fn failed(&mut self, e: &std::io::Error) -> Duration {
        if self.failures == 0 {
            tracing::warn!(error = %e, "accepting connections fails; pausing the accept loop until it works again");
        }
        self.failures = self.failures.saturating_add(1);
        Duration::from_millis(5u64.saturating_mul(1 << self.failures.min(9).saturating_sub(1)).min(1000))
    }

    /// An accept worked.
    pub fn succeeded(&mut self) {
        if self.failures > 0 {
            tracing::info!(failed_attempts = self.failures, "accepting connections works again");
            self.failures = 0;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_limit_leaves_a_quarter_of_the_descriptors() {
        assert_eq!(limit(500, Some(4096)), 500);
        assert_eq!(limit(0, Some(4096)), 3072 - 64);
        assert_eq!(limit(0, Some(1024)), 768 - 64);
        assert_eq!(limit(0, Some(40)), 16);
        assert_eq!(limit(0, None), 10_000);
    }

    #[test]
    fn the_gate_admits_up_to_the_limit() {
        let g = Gate::new(2);
        let a = g.admit().unwrap();
        let _b = g.admit().unwrap();
        assert!(g.admit().is_none());
        assert_eq!(g.open(), 2);
        drop(a);
        assert_eq!(g.open(), 1);
        assert!(g.admit().is_some());
    }

    #[test]
    fn backoff_grows_to_a_second() {
        let mut b = AcceptBackoff::default();
        let e = std::io::Error::other("EMFILE");
        let pauses: Vec<u64> = (0..10).map(|_| b.failed(&e).as_millis() as u64).collect();
        assert_eq!(pauses, vec![5, 10, 20, 40, 80, 160, 320, 640, 1000, 1000]);
        b.succeeded();
        assert_eq!(b.failed(&e).as_millis(), 5);
    }
}
