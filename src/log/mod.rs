//! The persistent request log: one row per answered client request in a SQLite file (`[log] path`) or a
//! PostgreSQL table (`[log] url`), read by `sheepdog report`, `/api/stats` and the budgets at start
//! ([`Source`]).
//!
//! The request path only hands a finished [`Entry`] to a bounded queue ([`RequestLog::record`] never blocks and
//! never touches the disk or the network); one writer thread drains the queue in batches (at most
//! [`MAX_BATCH`] rows, one transaction each) through a [`Sink`] and prunes rows older than the retention. A
//! full queue, or a batch the database refuses for good, is counted in `sheepdog_request_log_dropped_total`,
//! never waited for; a batch PostgreSQL cannot take now stays with the writer and is tried again with backoff
//! while the queue fills. `sheepdog_request_log_queue_depth` counts the rows not yet written.
//! [`RequestLog::close`] writes what is queued (within [`CLOSE_DEADLINE`]) and stops the writer: the server
//! calls it after draining connections, so answered requests survive a graceful shutdown.
//! Knows nothing of HTTP or routing; holds no API key (entries carry names and numbers only).

mod entry;
mod postgres;
mod source;
mod sqlite;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, SyncSender, TrySendError};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use prometheus::{IntCounter, IntGauge};

pub use entry::{Entry, RequestId};
pub use source::{ReadError, Source};
pub use sqlite::{open_read, read_since, spend_since, Spend};

use crate::config::LogConfig;
use crate::metrics::Metrics;

/// Entries the queue holds by default before new ones are dropped (`[log] queue_capacity`; about 20 s of
/// traffic at 3,000 requests/s).
pub const QUEUE_CAPACITY: usize = crate::config::DEFAULT_LOG_QUEUE_CAPACITY;

/// How often the writer wakes to write what was queued, in one transaction.
const BATCH_WINDOW: Duration = Duration::from_millis(100);

/// Rows written in one transaction (one statement for PostgreSQL) at most.
const MAX_BATCH: usize = 5_000;

/// How often rows older than the retention are deleted.
const PRUNE_EVERY: Duration = Duration::from_secs(3600);

/// How long [`RequestLog::close`] keeps trying to write what is queued when the database does not take it.
pub const CLOSE_DEADLINE: Duration = Duration::from_secs(10);

/// How long one write may take outside of a shutdown before it counts as failed (and is tried again).
const WRITE_TIMEOUT: Duration = Duration::from_secs(30);

/// The writer thread's nice value (see [`lower_priority`]).
const WRITER_NICE: libc::c_int = 10;

/// Why the request log could not be opened: the file or database, or the writer thread.
#[derive(Debug, thiserror::Error)]
#[error("request log {path}: {source}")]
pub struct OpenError {
    path: String,
    source: Box<dyn std::error::Error + Send + Sync>,
}

/// What became of a batch handed to a [`Sink`].
pub(crate) enum Written {
    /// Every row is stored.
    Stored,
    /// The rows were refused for good (a broken file, rows the database rejects): they are dropped, counted.
    Refused(String),
    /// Not written now (the database is unreachable): the writer keeps the rows and tries again later.
    Retry(String),
}

/// Where the writer thread puts rows: the SQLite file or PostgreSQL.
pub(crate) trait Sink {
    /// Write `rows` in one transaction, giving up at `deadline`.
    fn write(&mut self, rows: &[Box<Entry>], deadline: Instant) -> Written;
    /// Delete rows older than `retention`.
    fn prune(&mut self, retention: Duration);
    /// What to call the rows' destination in log lines.
    fn name(&self) -> &'static str;
}

/// The handle the gateway holds: a queue to the writer thread (or nothing, when the log is off).
pub struct RequestLog {
    tx: Option<SyncSender<Box<Entry>>>,
    writer: Mutex<Option<JoinHandle<()>>>,
    closing: Arc<AtomicBool>,
    dropped: IntCounter,
    /// Rows queued and not yet written (or dropped).
    depth: IntGauge,
    /// Rows that may wait unwritten (`[log] queue_capacity`).
    capacity: i64,
    /// Last time (s since `opened`, plus one) a drop was reported, to report at most one a minute.
    warned_s: AtomicU64,
    opened: Instant,
    source: Option<Source>,
}

impl RequestLog {
    /// A log that records nothing.
    pub fn disabled(metrics: &Metrics) -> RequestLog {
        RequestLog {
            tx: None,
            writer: Mutex::new(None),
            closing: Arc::new(AtomicBool::new(false)),
            dropped: metrics.log_dropped.clone(),
            depth: metrics.log_queue_depth.clone(),
            capacity: 0,
            warned_s: AtomicU64::new(0),
            opened: Instant::now(),
            source: None,
        }
    }

    /// Open (or create) the SQLite file or the PostgreSQL table of `cfg` and start the writer; disabled when
    /// `cfg.enabled` is false. An unreachable PostgreSQL is no error: rows wait in the queue until it answers.
    pub fn open(cfg: &LogConfig, metrics: &Metrics) -> Result<RequestLog, OpenError> {
        if !cfg.enabled {
            return Ok(RequestLog::disabled(metrics));
        }
        let source = Source::of(cfg);
        let err =
            |source: Box<dyn std::error::Error + Send + Sync>| OpenError { path: Source::of(cfg).to_string(), source };
        let sink: Box<dyn Sink + Send> = match &source {
            Source::Sqlite(path) => Box::new(sqlite::SqliteSink::open(path).map_err(|e| err(e.into()))?),
            Source::Postgres(url) => Box::new(postgres::PgSink::open(url).map_err(|e| err(e.into()))?),
        };
        let (tx, rx) = mpsc::sync_channel(cfg.queue_capacity);
        let counters = Counters {
            written: metrics.log_written.clone(),
            dropped: metrics.log_dropped.clone(),
            depth: metrics.log_queue_depth.clone(),
        };
        let retention = cfg.retention;
        metrics.log_queue_capacity.set(cfg.queue_capacity as i64);
        let closing = Arc::new(AtomicBool::new(false));
        let closing2 = closing.clone();
        let writer = std::thread::Builder::new()
            .name("sheepdog-log".into())
            .spawn(move || {
                lower_priority();
                write_loop(sink, rx, counters, retention, &closing2)
            })
            .map_err(|e| err(e.into()))?;
        Ok(RequestLog {
            tx: Some(tx),
            writer: Mutex::new(Some(writer)),
            closing,
            dropped: metrics.log_dropped.clone(),
            depth: metrics.log_queue_depth.clone(),
            capacity: cfg.queue_capacity as i64,
            warned_s: AtomicU64::new(0),
            opened: Instant::now(),
            source: Some(source),
        })
    }

    /// Where rows go, when the log is on.
    pub fn source(&self) -> Option<&Source> {
        self.source.as_ref()
    }

    /// Queue an entry for writing; never blocks. When `queue_capacity` rows already wait unwritten (in the
    /// queue or in the writer's batch), it is dropped (counted, and reported once a minute).
    pub fn record(&self, e: Entry) {
        let Some(tx) = &self.tx else { return };
        if self.depth.get() >= self.capacity {
            self.depth.inc();
            return self.lost("the request log's queue is full: the database does not keep up or is unreachable");
        }
        self.depth.inc();
        match tx.try_send(Box::new(e)) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) => {
                self.lost("the request log's queue is full: the database does not keep up or is unreachable")
            }
            Err(TrySendError::Disconnected(_)) => self.lost("the request log is closed"),
        }
    }

    fn lost(&self, why: &str) {
        self.depth.dec();
        self.dropped.inc();
        let now_s = self.opened.elapsed().as_secs() + 1;
        let last = self.warned_s.load(Ordering::Relaxed);
        if (last == 0 || now_s >= last + 60)
            && self.warned_s.compare_exchange(last, now_s, Ordering::Relaxed, Ordering::Relaxed).is_ok()
        {
            tracing::error!(dropped_total = self.dropped.get(), "request not logged: {why}");
        }
    }

    /// Write everything queued so far (trying for at most [`CLOSE_DEADLINE`] when the database does not take
    /// it, then saying in one line how many rows were lost) and stop the writer; blocks until it is done.
    /// Later entries are dropped.
    pub fn close(&self) {
        let Some(writer) = self.writer.lock().take() else { return };
        self.closing.store(true, Ordering::Release);
        writer.thread().unpark();
        if writer.join().is_err() {
            tracing::error!("the request log writer panicked");
        }
    }
}

impl Drop for RequestLog {
    fn drop(&mut self) {
        self.close();
    }
}

/// Run the calling thread at a low priority (nice 10): when the gateway shares a core with the writer, a
/// request that arrives while a batch is being written preempts the writer instead of waiting for its time
/// slice. Nice 10 still leaves the writer about a tenth of a saturated core, several times what it needs
/// (about 1.2 µs per row) to keep up with the most requests one core can proxy; nice 19 (a seventieth) did
/// not, and rows were dropped at saturation.
fn lower_priority() {
    #[cfg(target_os = "linux")]
    {
        // SAFETY: setpriority takes no pointers; on Linux, `who = 0` with PRIO_PROCESS names the calling thread.
        let r = unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, WRITER_NICE) };
        if r != 0 {
            tracing::debug!(error = %std::io::Error::last_os_error(), "request log writer: cannot lower its priority");
        }
    }
}

/// The writer's metrics.
struct Counters {
    written: IntCounter,
    dropped: IntCounter,
    /// Rows queued and not yet written or dropped.
    depth: IntGauge,
}

/// Waits between attempts to write while the database does not answer: 200 ms, doubling, up to 5 s.
struct Backoff(Duration);

impl Backoff {
    const FIRST: Duration = Duration::from_millis(200);
    const MAX: Duration = Duration::from_secs(5);

    fn next(&mut self) -> Duration {
        let d = self.0;
        self.0 = (self.0 * 2).min(Self::MAX);
        d
    }
}

/// The writer: takes rows off the queue in batches of at most [`MAX_BATCH`] and hands them to `sink`. A batch
/// the sink cannot write now is kept (the rest wait in the queue) and tried again with backoff; at `closing`,
/// what is queued is written within [`CLOSE_DEADLINE`].
fn write_loop(
    mut sink: Box<dyn Sink + Send>,
    rx: Receiver<Box<Entry>>,
    c: Counters,
    retention: Duration,
    closing: &AtomicBool,
) {
    let mut batch: Vec<Box<Entry>> = Vec::with_capacity(1024);
    if !retention.is_zero() {
        sink.prune(retention);
    }
    let mut next_prune = Instant::now() + PRUNE_EVERY;
    let mut backoff = Backoff(Backoff::FIRST);
    let mut retry_at: Option<Instant> = None;
    let mut failing_since: Option<Instant> = None;
    let mut close_by: Option<Instant> = None;
    let mut written_at_close = 0u64;
    loop {
        let now = Instant::now();
        if close_by.is_none() && closing.load(Ordering::Acquire) {
            close_by = Some(now + CLOSE_DEADLINE);
            // Try again at once rather than at the end of the current backoff.
            retry_at = None;
        }
        if !retention.is_zero() && now >= next_prune && failing_since.is_none() && close_by.is_none() {
            sink.prune(retention);
            next_prune = Instant::now() + PRUNE_EVERY;
        }
        let mut disconnected = false;
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(e) => batch.push(e),
                Err(mpsc::TryRecvError::Empty) => break,
                Err(mpsc::TryRecvError::Disconnected) => {
                    disconnected = true;
                    break;
                }
            }
        }
        let more = batch.len() >= MAX_BATCH;
        if !batch.is_empty() && retry_at.is_none_or(|t| now >= t) {
            let n = batch.len() as u64;
            match sink.write(&batch, close_by.unwrap_or_else(|| Instant::now() + WRITE_TIMEOUT)) {
                Written::Stored => {
                    c.written.inc_by(n);
                    c.depth.sub(n as i64);
                    if close_by.is_some() {
                        written_at_close += n;
                    }
                    batch.clear();
                    retry_at = None;
                    backoff = Backoff(Backoff::FIRST);
                    if let Some(since) = failing_since.take() {
                        tracing::warn!(
                            down_s = since.elapsed().as_secs(),
                            waiting = c.depth.get(),
                            "request log: {} takes rows again",
                            sink.name()
                        );
                    }
                }
                Written::Refused(e) => {
                    c.dropped.inc_by(n);
                    c.depth.sub(n as i64);
                    tracing::error!(error = %e, rows = n, "cannot write to the request log");
                    batch.clear();
                }
                Written::Retry(e) => {
                    let wait = backoff.next();
                    retry_at = Some(Instant::now() + wait);
                    if failing_since.is_none() {
                        failing_since = Some(Instant::now());
                        tracing::warn!(error = %e, waiting = c.depth.get(),
                            "request log: cannot write to {}; rows wait in the queue and are tried again",
                            sink.name());
                    } else {
                        tracing::debug!(error = %e, retry_in_ms = wait.as_millis() as u64, "request log: still failing");
                    }
                }
            }
        }
        if let Some(by) = close_by {
            let done = batch.is_empty() && !more;
            if done || disconnected && batch.is_empty() {
                break;
            }
            if Instant::now() >= by {
                break;
            }
        } else if disconnected && batch.is_empty() {
            break;
        }
        if more && retry_at.is_none() {
            continue;
        }
        // Wake on a timer, never on a row: the writer is never blocked in `recv`, so queueing a row costs the
        // request path no wake-up (no futex call, no context switch). `close` unparks it early.
        let now = Instant::now();
        let mut wake = now + if close_by.is_some() { Duration::ZERO } else { BATCH_WINDOW };
        if let Some(t) = retry_at {
            wake = wake.max(t);
        }
        if let Some(by) = close_by {
            wake = wake.min(by);
        }
        std::thread::park_timeout(wake.saturating_duration_since(now));
    }
    // What is still here could not be written in time (or arrived after the close).
    let mut lost = batch.len() as u64;
    drop(batch);
    while rx.try_recv().is_ok() {
        lost += 1;
    }
    drop(rx);
    c.dropped.inc_by(lost);
    c.depth.sub(lost as i64);
    if close_by.is_some() {
        if lost > 0 {
            tracing::error!(
                written = written_at_close,
                lost,
                "request log closed: {lost} rows could not be written to {} within {} s",
                sink.name(),
                CLOSE_DEADLINE.as_secs()
            );
        } else {
            tracing::info!(written = written_at_close, "request log closed: every queued row written");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::sqlite::{first_id_from, open_read, read_since};
    use super::*;
    use crate::clock::unix_ms;
    use rusqlite::Connection;
    use std::path::Path;

    fn entry(i: i64) -> Entry {
        Entry {
            ts_ms: 1_700_000_000_000 + i,
            model: "gpt-4.1".into(),
            served_model: Some("gpt-4.1".into()),
            endpoint: Some("primary".into()),
            status: 200,
            attempts: 1,
            duration_ms: 1.5,
            ttft_ms: Some(1.0),
            prompt_tokens: Some(10),
            completion_tokens: Some(5),
            cost_usd: Some(0.00006),
            ..Entry::begin("chat")
        }
    }

    fn cfg(dir: &Path) -> LogConfig {
        LogConfig {
            enabled: true,
            path: dir.join("log.db"),
            retention: Duration::ZERO,
            url: None,
            bodies: false,
            queue_capacity: QUEUE_CAPACITY,
        }
    }

    #[test]
    fn entries_are_written_and_read_back_after_close() {
        let dir = tempfile::tempdir().unwrap();
        let m = Metrics::new();
        let log = RequestLog::open(&cfg(dir.path()), &m).unwrap();
        for i in 0..1000 {
            log.record(entry(i));
        }
        log.close();
        assert_eq!(m.log_written.get(), 1000);
        assert_eq!(m.log_dropped.get(), 0);
        assert_eq!(m.log_queue_depth.get(), 0, "every queued row was taken");
        assert_eq!(m.log_queue_capacity.get(), QUEUE_CAPACITY as i64);
        let rows = read_since(&open_read(&dir.path().join("log.db")).unwrap(), 0).unwrap();
        assert_eq!(rows.len(), 1000);
        assert_eq!(rows[0], entry(0));
        assert_eq!(rows[999], entry(999));
        // After close, entries are counted as dropped, not lost silently.
        log.record(entry(5000));
        assert_eq!(m.log_dropped.get(), 1);
        assert_eq!(m.log_queue_depth.get(), 0);
    }

    #[test]
    fn time_windows_are_found_without_an_index_even_when_rows_are_out_of_order() {
        let dir = tempfile::tempdir().unwrap();
        let m = Metrics::new();
        let log = RequestLog::open(&cfg(dir.path()), &m).unwrap();
        let hour = 3_600_000;
        // Ten hours of one row a minute, appended in order; every tenth row is a request that took 30 minutes,
        // so it arrived half an hour before its neighbours.
        let arrival = |i: i64| i * 60_000 - if i % 10 == 0 { hour / 2 } else { 0 };
        for i in 0..600i64 {
            log.record(Entry { ts_ms: arrival(i), ..entry(0) });
        }
        log.close();
        let conn = open_read(&dir.path().join("log.db")).unwrap();
        for since in [-hour, 0, 1, hour, 5 * hour + 12_345, 9 * hour, 10 * hour, 20 * hour] {
            let want = (0..600i64).map(arrival).filter(|ts| *ts >= since).count();
            assert_eq!(read_since(&conn, since).unwrap().len(), want, "since {since}");
        }
        // The search starts near the window instead of at the first row.
        assert!(first_id_from(&conn, 9 * hour).unwrap() > 400);
    }

    #[test]
    fn a_disabled_log_records_nothing_and_creates_no_file() {
        let dir = tempfile::tempdir().unwrap();
        let m = Metrics::new();
        let log = RequestLog::open(&LogConfig { enabled: false, ..cfg(dir.path()) }, &m).unwrap();
        log.record(entry(0));
        log.close();
        assert!(!dir.path().join("log.db").exists());
        assert_eq!(m.log_dropped.get(), 0);
    }

    #[test]
    fn rows_older_than_the_retention_are_pruned_at_start() {
        let dir = tempfile::tempdir().unwrap();
        let m = Metrics::new();
        let log = RequestLog::open(&cfg(dir.path()), &m).unwrap();
        let old = Entry { ts_ms: 1000, ..entry(0) };
        log.record(old);
        log.record(Entry { ts_ms: unix_ms(), ..entry(0) });
        log.close();
        let c = LogConfig { retention: Duration::from_secs(3600), ..cfg(dir.path()) };
        RequestLog::open(&c, &m).unwrap().close();
        let rows = read_since(&open_read(&c.path).unwrap(), 0).unwrap();
        assert_eq!(rows.len(), 1, "{rows:?}");
        assert!(rows[0].ts_ms > 1000);
    }

    #[test]
    fn a_version_1_file_is_upgraded_in_place_and_a_newer_one_refused() {
        let dir = tempfile::tempdir().unwrap();
        let c = cfg(dir.path());
        {
            // A request log as sheepdog wrote it before schema 2.
            let conn = Connection::open(&c.path).unwrap();
            conn.execute_batch(sqlite::SCHEMA).unwrap();
            conn.pragma_update(None, "user_version", 1).unwrap();
            conn.execute(
                "INSERT INTO requests (ts_ms, api, model, status, attempts, stream, duration_ms, cost_usd) \
                 VALUES (5, 'chat', 'gpt-4.1', 200, 1, 0, 1.5, 0.25)",
                [],
            )
            .unwrap();
        }
        let m = Metrics::new();
        let log = RequestLog::open(&c, &m).unwrap();
        let new = Entry {
            request_id: Some(RequestId(0x0123_4567_89ab_cdef)),
            route_reason: Some("fallback".into()),
            cached_tokens: Some(4),
            reasoning_tokens: Some(2),
            cost_nanos: Some(60_000),
            client: Some("web-app".into()),
            estimated: true,
            ..entry(1)
        };
        log.record(new.clone());
        log.close();
        let conn = open_read(&c.path).unwrap();
        let version: i64 = conn.pragma_query_value(None, "user_version", |r| r.get(0)).unwrap();
        assert_eq!(version, sqlite::SCHEMA_VERSION);
        let rows = read_since(&conn, 0).unwrap();
        assert_eq!(rows.len(), 2);
        assert_eq!((rows[0].model.as_str(), rows[0].cost_usd, rows[0].request_id), ("gpt-4.1", Some(0.25), None));
        assert_eq!((rows[0].cost_nanos, rows[0].client.as_deref(), rows[0].estimated), (None, None, false));
        assert_eq!(rows[1], new);
        // Opening it again changes nothing; a file from a newer sheepdog is refused with the reason.
        RequestLog::open(&c, &m).unwrap().close();
        Connection::open(&c.path).unwrap().pragma_update(None, "user_version", 99).unwrap();
        let e = RequestLog::open(&c, &m).err().unwrap();
        assert!(e.to_string().contains("schema version 99"), "{e}");
    }

    #[test]
    fn request_ids_are_distinct_and_shown_in_hex() {
        assert_eq!(RequestId(0x0123_4567_89ab_cdef).to_string(), "req_0123456789abcdef");
        let ids: std::collections::HashSet<u64> = (0..10_000).map(|_| RequestId::new().0).collect();
        assert_eq!(ids.len(), 10_000);
    }

    #[test]
    fn an_unwritable_path_is_an_error_naming_it() {
        let m = Metrics::new();
        let c = LogConfig {
            enabled: true,
            path: "/nonexistent-dir/x/log.db".into(),
            retention: Duration::ZERO,
            url: None,
            bodies: false,
            queue_capacity: QUEUE_CAPACITY,
        };
        let e = RequestLog::open(&c, &m).err().unwrap();
        assert!(e.to_string().contains("/nonexistent-dir/x/log.db"), "{e}");
    }
}
