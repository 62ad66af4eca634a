//! The request log's SQLite file: schema, batched inserts, retention, and reading a time window back for
//! `sheepdog report`. Only the writer thread and the report open it.

use std::borrow::Cow;
use std::path::Path;
use std::time::{Duration, Instant};

use rusqlite::{params, Connection, OptionalExtension};

use super::{Entry, Sink, Written};
use crate::clock::unix_ms;

/// The writer's SQLite file: a failed write drops its batch (counted), as a full disk would anyway.
pub(super) struct SqliteSink(Connection);

impl SqliteSink {
    pub(super) fn open(path: &Path) -> rusqlite::Result<SqliteSink> {
        open_db(path).map(SqliteSink)
    }
}

impl Sink for SqliteSink {
    fn write(&mut self, rows: &[Box<Entry>], _deadline: Instant) -> Written {
        match write_batch(&mut self.0, rows) {
            Ok(()) => Written::Stored,
            Err(e) => Written::Refused(e.to_string()),
        }
    }

    fn prune(&mut self, retention: Duration) {
        prune(&self.0, retention)
    }

    fn name(&self) -> &'static str {
        "the SQLite file"
    }
}

/// The schema version in `PRAGMA user_version`: the last of [`MIGRATIONS`].
pub(crate) const SCHEMA_VERSION: i64 = 3;

/// Each schema version after the first and the statements that make it, applied in order at open: an
/// existing file upgrades in place, a new one is created at version 1 and migrated the same way.
const MIGRATIONS: &[(i64, &str)] = &[
    (
        2,
        "ALTER TABLE requests ADD COLUMN request_id INTEGER;
         ALTER TABLE requests ADD COLUMN route_reason TEXT;
         ALTER TABLE requests ADD COLUMN cached_tokens INTEGER;
         ALTER TABLE requests ADD COLUMN reasoning_tokens INTEGER;
         ALTER TABLE requests ADD COLUMN cost_nanos INTEGER;",
    ),
    (
        3,
        "ALTER TABLE requests ADD COLUMN client TEXT;
         ALTER TABLE requests ADD COLUMN estimated INTEGER NOT NULL DEFAULT 0;
         ALTER TABLE requests ADD COLUMN prompt_text TEXT;
         ALTER TABLE requests ADD COLUMN completion_text TEXT;",
    ),
];

pub(crate) const SCHEMA: &str = "
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
pub(super) const ORDER_SLACK_MS: i64 = 3_600_000;

pub(super) const INSERT: &str =
    "INSERT INTO requests (ts_ms, api, model, served_model, endpoint, status, error, attempts, \
    stream, duration_ms, ttft_ms, prompt_tokens, completion_tokens, cost_usd, request_id, route_reason, \
    cached_tokens, reasoning_tokens, cost_nanos, client, estimated, prompt_text, completion_text) \
    VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17, ?18, ?19, ?20, ?21, ?22, \
    ?23)";

pub(super) fn open_db(path: &Path) -> rusqlite::Result<Connection> {
    let mut conn = Connection::open(path)?;
    conn.busy_timeout(Duration::from_secs(5))?;
    // WAL: readers (`sheepdog report`) never block the writer; NORMAL: a crash of the process loses nothing
    // committed, only a power cut may lose the last batches.
    conn.pragma_update(None, "journal_mode", "WAL")?;
    conn.pragma_update(None, "synchronous", "NORMAL")?;
    conn.execute_batch(SCHEMA)?;
    migrate(&mut conn)?;
    Ok(conn)
}

/// Bring the file to [`SCHEMA_VERSION`], one transaction per version. A file from a newer sheepdog is refused.
fn migrate(conn: &mut Connection) -> rusqlite::Result<()> {
    let version: i64 = conn.pragma_query_value(None, "user_version", |r| r.get(0))?;
    if version > SCHEMA_VERSION {
        return Err(rusqlite::Error::InvalidParameterName(format!(
            "the request log has schema version {version}; this sheepdog knows up to {SCHEMA_VERSION}"
        )));
    }
    for (to, sql) in MIGRATIONS.iter().filter(|(to, _)| *to > version.max(1)) {
        let tx = conn.transaction()?;
        tx.execute_batch(sql)?;
        tx.pragma_update(None, "user_version", to)?;
        tx.commit()?;
        tracing::info!(version = to, "request log: schema upgraded");
    }
    Ok(())
}

pub(super) fn write_batch(conn: &mut Connection, batch: &[Box<Entry>]) -> rusqlite::Result<()> {
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
                e.request_id.map(|id| id.0 as i64),
                e.route_reason,
                e.cached_tokens.map(|n| n as i64),
                e.reasoning_tokens.map(|n| n as i64),
                e.cost_nanos.map(|n| n as i64),
                e.client.as_deref(),
                e.estimated,
                e.prompt_text,
                e.completion_text,
            ])?;
        }
    }
    tx.commit()
}

pub(super) fn prune(conn: &Connection, retention: Duration) {
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
pub(super) fn first_id_from(conn: &Connection, since_ms: i64) -> rusqlite::Result<i64> {
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

/// Spend by (served model, client) of the rows with `ts_ms >= since_ms`, nano-dollars (rows from before
/// schema 2 carry only a float cost, rounded to the nano-dollar): what budgets rebuild their period from.
pub fn spend_since(conn: &Connection, since_ms: i64) -> rusqlite::Result<Vec<Spend>> {
    let first = first_id_from(conn, since_ms)?;
    let mut st = conn.prepare(
        "SELECT served_model, client, SUM(COALESCE(cost_nanos, CAST(ROUND(cost_usd * 1e9) AS INTEGER))) \
         FROM requests WHERE id >= ?1 AND ts_ms >= ?2 AND (cost_nanos IS NOT NULL OR cost_usd IS NOT NULL) \
         GROUP BY served_model, client",
    )?;
    let rows = st.query_map(params![first, since_ms], |r| {
        Ok(Spend {
            served_model: r.get(0)?,
            client: r.get(1)?,
            nanos: r.get::<_, Option<i64>>(2)?.unwrap_or(0).max(0) as u64,
        })
    })?;
    rows.collect()
}

/// Money spent by one (served model, client) in a window of the request log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Spend {
    /// The model that served.
    pub served_model: Option<String>,
    /// The client, if any.
    pub client: Option<String>,
    /// Nano-dollars.
    pub nanos: u64,
}

/// Every row of `conn` with `ts_ms >= since_ms`, in the order they were written.
pub fn read_since(conn: &Connection, since_ms: i64) -> rusqlite::Result<Vec<Entry>> {
    let first = first_id_from(conn, since_ms)?;
    let mut st = conn.prepare(
        "SELECT ts_ms, api, model, served_model, endpoint, status, error, attempts, stream, duration_ms, ttft_ms, \
         prompt_tokens, completion_tokens, cost_usd, request_id, route_reason, cached_tokens, reasoning_tokens, \
         cost_nanos, client, estimated FROM requests WHERE id >= ?1 AND ts_ms >= ?2 ORDER BY id",
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
            request_id: r.get::<_, Option<i64>>(14)?.map(|n| super::RequestId(n as u64)),
            route_reason: r.get::<_, Option<String>>(15)?.map(Cow::Owned),
            cached_tokens: r.get::<_, Option<i64>>(16)?.map(|n| n.max(0) as u64),
            reasoning_tokens: r.get::<_, Option<i64>>(17)?.map(|n| n.max(0) as u64),
            cost_nanos: r.get::<_, Option<i64>>(18)?.map(|n| n.max(0) as u64),
            client: r.get::<_, Option<String>>(19)?.map(std::sync::Arc::from),
            estimated: r.get(20)?,
            prompt_text: None,
            completion_text: None,
        })
    })?;
    rows.collect()
}
