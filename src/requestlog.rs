//! The persistent request log: one row per answered client request in a SQLite file (`[log]`), read by
//! `sheepdog report`.
//!
//! The request path only hands a finished [`Entry`] to a bounded queue ([`RequestLog::record`] never blocks and
//! never touches the disk); one writer thread drains the queue in batches, one transaction per batch, and prunes
//! rows older than the retention. A full queue or a failed write is counted in
//! `sheepdog_request_log_dropped_total`, never waited for. [`RequestLog::close`] writes what is queued and stops
//! the writer: the server calls it after draining connections, so answered requests survive a graceful shutdown.
//! Knows nothing of HTTP or routing; holds no API key (entries carry names and numbers only).

use std::borrow::Cow;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, SyncSender, TrySendError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use parking_lot::Mutex;
use prometheus::IntCounter;
use rusqlite::{params, Connection, OptionalExtension};

use crate::config::LogConfig;
use crate::metrics::Metrics;

/// Entries the queue holds before new ones are dropped (about 20 s of traffic at 3,000 requests/s).
pub const QUEUE_CAPACITY: usize = 65_536;

/// How often the writer wakes to write what was queued, in one transaction.
const BATCH_WINDOW: Duration = Duration::from_millis(100);

/// How often rows older than the retention are deleted.
const PRUNE_EVERY: Duration = Duration::from_secs(3600);

/// The writer thread's nice value (see [`lower_priority`]).
const WRITER_NICE: libc::c_int = 10;

/// The schema version in `PRAGMA user_version`.
const SCHEMA_VERSION: i64 = 1;

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS requests (
    id INTEGER PRIMARY KEY,
    ts_ms INTEGER NOT NULL,
    api TEXT NOT NULL,
    model TEXT NOT NULL,
    served_model TEXT,
    endpoint TEXT,
    status INTEGER NOT NULL,
    error TEXT,
    attempts INTEGER NOT NULL,
    stream INTEGER NOT NULL,
    duration_ms REAL NOT NULL,
    ttft_ms REAL,
    prompt_tokens INTEGER,
    completion_tokens INTEGER,
    cost_usd REAL
);
";

/// Rows are appended when their request ends, so `ts_ms` (arrival) is in `id` order up to the duration of a
/// request. Time windows are found by a binary search over `id` for a time this much earlier, then filtered
/// exactly: no index on `ts_ms` to keep up on every insert (it cost a third of the writer's time per row).
const ORDER_SLACK_MS: i64 = 3_600_000;

const INSERT: &str = "INSERT INTO requests (ts_ms, api, model, served_model, endpoint, status, error, attempts, \
    stream, duration_ms, ttft_ms, prompt_tokens, completion_tokens, cost_usd) \
    VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14)";

/// One answered client request, as logged.
#[derive(Debug, Clone, PartialEq)]
pub struct Entry {
    /// When the request arrived, Unix milliseconds.
    pub ts_ms: i64,
    /// `chat` or `embeddings`.
    pub api: &'static str,
    /// The model the client asked for (empty when the body named none).
    pub model: String,
    /// The public model that served (differs from `model` after a fallback).
    pub served_model: Option<String>,
    /// The endpoint that served.
    pub endpoint: Option<String>,
    /// HTTP status the client got (499: the client went away mid-stream).
    pub status: u16,
    /// The error code the client saw, or what went wrong after the answer started (`stream_broken`).
    pub error: Option<Cow<'static, str>>,
    /// Upstream attempts made.
    pub attempts: u32,
    /// `stream: true`.
    pub stream: bool,
    /// From arrival to the last byte handed to the client, ms.
    pub duration_ms: f64,
    /// From arrival to the first byte of the answer (the first chunk of a stream), ms.
    pub ttft_ms: Option<f64>,
    /// Prompt tokens, as the upstream reported them.
    pub prompt_tokens: Option<u64>,
    /// Completion tokens, as the upstream reported them.
    pub completion_tokens: Option<u64>,
    /// Cost from the pricing table, USD.
    pub cost_usd: Option<f64>,
}

impl Entry {
    /// An entry for a request that arrived now on `api`; the pipeline fills in the rest.
    pub fn begin(api: &'static str) -> Entry {
        Entry {
            ts_ms: unix_ms(),
            api,
            model: String::new(),
            served_model: None,
            endpoint: None,
            status: 0,
            error: None,
            attempts: 0,
            stream: false,
            duration_ms: 0.0,
            ttft_ms: None,
            prompt_tokens: None,
            completion_tokens: None,
            cost_usd: None,
        }
    }
}

/// The wall clock in Unix milliseconds, the time base of `ts_ms`.
pub fn unix_ms() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64)
}

/// Why the request log could not be opened: the file, or the writer thread.
#[derive(Debug, thiserror::Error)]
#[error("request log {path}: {source}")]
pub struct OpenError {
    path: String,
    source: Box<dyn std::error::Error + Send + Sync>,
}

enum Msg {
    Row(Box<Entry>),
    Close,
}

/// The handle the gateway holds: a queue to the writer thread (or nothing, when the log is off).
pub struct RequestLog {
    tx: Option<SyncSender<Msg>>,
    writer: Mutex<Option<JoinHandle<()>>>,
    dropped: IntCounter,
    /// Last time (s since `opened`, plus one) a drop was reported, to report at most one a minute.
    warned_s: AtomicU64,
    opened: Instant,
    path: Option<PathBuf>,
}

impl RequestLog {
    /// A log that records nothing.
    pub fn disabled(metrics: &Metrics) -> RequestLog {
        RequestLog {
            tx: None,
            writer: Mutex::new(None),
            dropped: metrics.log_dropped.clone(),
            warned_s: AtomicU64::new(0),
            opened: Instant::now(),
            path: None,
        }
    }

    /// Open (or create) the SQLite file of `cfg` and start the writer; disabled when `cfg.enabled` is false.
    pub fn open(cfg: &LogConfig, metrics: &Metrics) -> Result<RequestLog, OpenError> {
        if !cfg.enabled {
            return Ok(RequestLog::disabled(metrics));
        }
        let err = |source: Box<dyn std::error::Error + Send + Sync>| OpenError {
            path: cfg.path.display().to_string(),
            source,
        };
        let conn = open_db(&cfg.path).map_err(|e| err(e.into()))?;
        let (tx, rx) = mpsc::sync_channel(QUEUE_CAPACITY);
        let written = metrics.log_written.clone();
        let dropped = metrics.log_dropped.clone();
        let retention = cfg.retention;
        let writer = std::thread::Builder::new()
            .name("sheepdog-log".into())
            .spawn(move || {
                lower_priority();
                write_loop(conn, rx, written, dropped, retention)
            })
            .map_err(|e| err(e.into()))?;
        Ok(RequestLog {
            tx: Some(tx),
            writer: Mutex::new(Some(writer)),
            dropped: metrics.log_dropped.clone(),
            warned_s: AtomicU64::new(0),
            opened: Instant::now(),
            path: Some(cfg.path.clone()),
        })
    }

    /// The file rows go to, when the log is on.
    pub fn path(&self) -> Option<&Path> {
        self.path.as_deref()
    }

    /// Queue an entry for writing; never blocks. A full queue drops it (counted, and reported once a minute).
    pub fn record(&self, e: Entry) {
        let Some(tx) = &self.tx else { return };
        match tx.try_send(Msg::Row(Box::new(e))) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) => self.lost("the request log's queue is full: the disk is too slow"),
            Err(TrySendError::Disconnected(_)) => self.lost("the request log is closed"),
        }
    }

    fn lost(&self, why: &str) {
        self.dropped.inc();
        let now_s = self.opened.elapsed().as_secs() + 1;
        let last = self.warned_s.load(Ordering::Relaxed);
        if (last == 0 || now_s >= last + 60)
            && self.warned_s.compare_exchange(last, now_s, Ordering::Relaxed, Ordering::Relaxed).is_ok()
        {
            tracing::error!(dropped_total = self.dropped.get(), "request not logged: {why}");
        }
    }

    /// Write everything queued so far and stop the writer (blocks until it is done). Later entries are dropped.
    pub fn close(&self) {
        let Some(writer) = self.writer.lock().take() else { return };
        if let Some(tx) = &self.tx {
            // Blocking send: at shutdown the writer is draining the queue, so room appears.
            let _ = tx.send(Msg::Close);
        }
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

fn open_db(path: &Path) -> rusqlite::Result<Connection> {
    let conn = Connection::open(path)?;
    conn.busy_timeout(Duration::from_secs(5))?;
    // WAL: readers (`sheepdog report`) never block the writer; NORMAL: a crash of the process loses nothing
    // committed, only a power cut may lose the last batches.
    conn.pragma_update(None, "journal_mode", "WAL")?;
    conn.pragma_update(None, "synchronous", "NORMAL")?;
    conn.execute_batch(SCHEMA)?;
    let version: i64 = conn.pragma_query_value(None, "user_version", |r| r.get(0))?;
    if version == 0 {
        conn.pragma_update(None, "user_version", SCHEMA_VERSION)?;
    }
    Ok(conn)
}

fn write_loop(mut conn: Connection, rx: Receiver<Msg>, written: IntCounter, dropped: IntCounter, retention: Duration) {
    let mut batch: Vec<Box<Entry>> = Vec::with_capacity(1024);
    let mut next_prune = Instant::now();
    loop {
        if !retention.is_zero() && Instant::now() >= next_prune {
            prune(&conn, retention);
            next_prune = Instant::now() + PRUNE_EVERY;
        }
        // Wake on a timer, never on a row: the writer is never blocked in `recv`, so queueing a row costs the
        // request path no wake-up (no futex call, no context switch). `close` unparks it early.
        std::thread::park_timeout(BATCH_WINDOW);
        let mut closing = false;
        loop {
            match rx.try_recv() {
                Ok(Msg::Row(e)) => batch.push(e),
                Ok(Msg::Close) => closing = true,
                Err(mpsc::TryRecvError::Disconnected) => {
                    closing = true;
                    break;
                }
                Err(mpsc::TryRecvError::Empty) => break,
            }
        }
        if !batch.is_empty() {
            let n = batch.len() as u64;
            match write_batch(&mut conn, &batch) {
                Ok(()) => written.inc_by(n),
                Err(e) => {
                    dropped.inc_by(n);
                    tracing::error!(error = %e, rows = n, "cannot write to the request log");
                }
            }
            batch.clear();
        }
        if closing {
            return;
        }
    }
}

fn write_batch(conn: &mut Connection, batch: &[Box<Entry>]) -> rusqlite::Result<()> {
    let tx = conn.transaction()?;
    {
        let mut st = tx.prepare_cached(INSERT)?;
        for e in batch {
            st.execute(params![
                e.ts_ms,
                e.api,
                e.model,
                e.served_model,
                e.endpoint,
                e.status,
                e.error,
                e.attempts,
                e.stream,
                e.duration_ms,
                e.ttft_ms,
                e.prompt_tokens.map(|n| n as i64),
                e.completion_tokens.map(|n| n as i64),
                e.cost_usd,
            ])?;
        }
    }
    tx.commit()
}

fn prune(conn: &Connection, retention: Duration) {
    let cutoff = unix_ms() - retention.as_millis() as i64;
    let deleted = first_id_from(conn, cutoff)
        .and_then(|id| conn.execute("DELETE FROM requests WHERE id < ?1 AND ts_ms < ?2", params![id, cutoff]));
    match deleted {
        Ok(0) => {}
        Ok(n) => tracing::info!(rows = n, "request log: pruned rows older than the retention"),
        Err(e) => tracing::warn!(error = %e, "request log: pruning failed"),
    }
}

/// Open a request log file for reading (`sheepdog report`).
pub fn open_read(path: &Path) -> rusqlite::Result<Connection> {
    let conn = Connection::open_with_flags(path, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)?;
    conn.busy_timeout(Duration::from_secs(5))?;
    Ok(conn)
}

/// The first row id from which on every row with `ts_ms >= since_ms` lies (see [`ORDER_SLACK_MS`]): a
/// binary search for a row that arrived before `since_ms - ORDER_SLACK_MS` and whose successor did not. Every
/// row before such a row was appended before it, so it arrived before `since_ms`.
fn first_id_from(conn: &Connection, since_ms: i64) -> rusqlite::Result<i64> {
    let target = since_ms.saturating_sub(ORDER_SLACK_MS);
    let (min, max): (Option<i64>, Option<i64>) =
        conn.query_row("SELECT MIN(id), MAX(id) FROM requests", [], |r| Ok((r.get(0)?, r.get(1)?)))?;
    let (Some(mut lo), Some(max)) = (min, max) else { return Ok(0) };
    let mut hi = max + 1;
    let mut st = conn.prepare_cached("SELECT ts_ms FROM requests WHERE id >= ?1 ORDER BY id LIMIT 1")?;
    while lo < hi {
        let mid = lo + (hi - lo) / 2;
        let ts: Option<i64> = st.query_row(params![mid], |r| r.get(0)).optional()?;
        match ts {
            Some(ts) if ts < target => lo = mid + 1,
            _ => hi = mid,
        }
    }
    Ok(lo)
}

/// Every row of `conn` with `ts_ms >= since_ms`, in the order they were written.
pub fn read_since(conn: &Connection, since_ms: i64) -> rusqlite::Result<Vec<Entry>> {
    let first = first_id_from(conn, since_ms)?;
    let mut st = conn.prepare(
        "SELECT ts_ms, api, model, served_model, endpoint, status, error, attempts, stream, duration_ms, ttft_ms, \
         prompt_tokens, completion_tokens, cost_usd FROM requests WHERE id >= ?1 AND ts_ms >= ?2 ORDER BY id",
    )?;
    let rows = st.query_map(params![first, since_ms], |r| {
        Ok(Entry {
            ts_ms: r.get(0)?,
            api: match r.get::<_, String>(1)?.as_str() {
                "embeddings" => "embeddings",
                _ => "chat",
            },
            model: r.get(2)?,
            served_model: r.get(3)?,
            endpoint: r.get(4)?,
            status: r.get(5)?,
            error: r.get::<_, Option<String>>(6)?.map(Cow::Owned),
            attempts: r.get(7)?,
            stream: r.get(8)?,
            duration_ms: r.get(9)?,
            ttft_ms: r.get(10)?,
            prompt_tokens: r.get::<_, Option<i64>>(11)?.map(|n| n.max(0) as u64),
            completion_tokens: r.get::<_, Option<i64>>(12)?.map(|n| n.max(0) as u64),
            cost_usd: r.get(13)?,
        })
    })?;
    rows.collect()
}

#[cfg(test)]
mod tests {
    use super::*;

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
        LogConfig { enabled: true, path: dir.join("log.db"), retention: Duration::ZERO }
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
        let rows = read_since(&open_read(&dir.path().join("log.db")).unwrap(), 0).unwrap();
        assert_eq!(rows.len(), 1000);
        assert_eq!(rows[0], entry(0));
        assert_eq!(rows[999], entry(999));
        // After close, entries are counted as dropped, not lost silently.
        log.record(entry(5000));
        assert_eq!(m.log_dropped.get(), 1);
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
    fn an_unwritable_path_is_an_error_naming_it() {
        let m = Metrics::new();
        let c = LogConfig { enabled: true, path: "/nonexistent-dir/x/log.db".into(), retention: Duration::ZERO };
        let e = RequestLog::open(&c, &m).err().unwrap();
        assert!(e.to_string().contains("/nonexistent-dir/x/log.db"), "{e}");
    }
}
