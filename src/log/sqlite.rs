//! The request log's SQLite file: schema, batched inserts, retention, and reading a time window back for
//! `sheepdog report`. Only the writer thread and the report open it.

use std::borrow::Cow;
use std::path::Path;
use std::sync::LazyLock;
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

/// The request log's columns, in the order [`bind_row`] binds them.
const COLUMNS: &str = "ts_ms, api, model, served_model, endpoint, status, error, attempts, stream, duration_ms, \
    ttft_ms, prompt_tokens, completion_tokens, cost_usd, request_id, route_reason, cached_tokens, reasoning_tokens, \
    cost_nanos, client, estimated, prompt_text, completion_text";
/// How many there are: the parameters one row takes.
const PER_ROW: usize = 23;
/// Rows per multi-row `INSERT`: one statement step for this many rows instead of one each (a batch's rest goes
/// row by row). 16 × 23 parameters stay far below SQLite's limit of 32,766.
const ROWS_PER_INSERT: usize = 16;

/// `INSERT INTO requests (…) VALUES (?, …), …` for `rows` rows.
fn insert_sql(rows: usize) -> String {
    let one = format!("({})", vec!["?"; PER_ROW].join(", "));
    format!("INSERT INTO requests ({COLUMNS}) VALUES {}", vec![one; rows].join(", "))
}

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
    static SQL: LazyLock<(String, String)> = LazyLock::new(|| (insert_sql(ROWS_PER_INSERT), insert_sql(1)));
    let (many, one) = &*SQL;
    let tx = conn.transaction()?;
    {
        let mut chunks = batch.chunks_exact(ROWS_PER_INSERT);
        if chunks.len() > 0 {
            let mut st = tx.prepare_cached(many)?;
            for chunk in &mut chunks {
                for (i, e) in chunk.iter().enumerate() {
                    bind_row(&mut st, i * PER_ROW, e)?;
                }
                st.raw_execute()?;
            }
        }
        if !chunks.remainder().is_empty() {
            let mut st = tx.prepare_cached(one)?;
            for e in chunks.remainder() {
                bind_row(&mut st, 0, e)?;
                st.raw_execute()?;
            }
        }
    }
    tx.commit()
}

/// Bind one row's values to parameters `offset + 1 ..= offset + PER_ROW`, in the order of [`COLUMNS`].
fn bind_row(st: &mut rusqlite::CachedStatement<'_>, offset: usize, e: &Entry) -> rusqlite::Result<()> {
    let at = |n: usize| offset + n;
    st.raw_bind_parameter(at(1), e.ts_ms)?;
    st.raw_bind_parameter(at(2), e.api)?;
    st.raw_bind_parameter(at(3), &e.model)?;
    st.raw_bind_parameter(at(4), &e.served_model)?;
    st.raw_bind_parameter(at(5), &e.endpoint)?;
    st.raw_bind_parameter(at(6), e.status)?;
    st.raw_bind_parameter(at(7), &e.error)?;
    st.raw_bind_parameter(at(8), e.attempts)?;
    st.raw_bind_parameter(at(9), e.stream)?;
    st.raw_bind_parameter(at(10), e.duration_ms)?;
    st.raw_bind_parameter(at(11), e.ttft_ms)?;
    st.raw_bind_parameter(at(12), e.prompt_tokens.map(|n| n as i64))?;
    st.raw_bind_parameter(at(13), e.completion_tokens.map(|n| n as i64))?;
    st.raw_bind_parameter(at(14), e.cost_usd)?;
    st.raw_bind_parameter(at(15), e.request_id.map(|id| id.0 as i64))?;
    st.raw_bind_parameter(at(16), &e.route_reason)?;
    st.raw_bind_parameter(at(17), e.cached_tokens.map(|n| n as i64))?;
    st.raw_bind_parameter(at(18), e.reasoning_tokens.map(|n| n as i64))?;
    st.raw_bind_parameter(at(19), e.cost_nanos.map(|n| n as i64))?;
    st.raw_bind_parameter(at(20), e.client.as_deref())?;
    st.raw_bind_parameter(at(21), e.estimated)?;
    st.raw_bind_parameter(at(22), &e.prompt_text)?;
    st.raw_bind_parameter(at(23), &e.completion_text)
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::log::RequestId;
    use std::sync::Arc;

    /// A row with every column set, each to a value that differs from row to row.
    fn row(i: u64) -> Box<Entry> {
        Box::new(Entry {
            ts_ms: 1_700_000_000_000 + i as i64,
            model: format!("model-{i}"),
            served_model: Some(Arc::from(format!("served-{i}"))),
            endpoint: Some(Arc::from(format!("endpoint-{i}"))),
            status: 200 + i as u16,
            error: i.is_multiple_of(3).then(|| Cow::Owned(format!("error-{i}"))),
            attempts: 1 + i as u32,
            stream: i.is_multiple_of(2),
            duration_ms: 1.5 + i as f64,
            ttft_ms: (!i.is_multiple_of(4)).then_some(0.5 + i as f64),
            prompt_tokens: Some(10 + i),
            completion_tokens: (!i.is_multiple_of(5)).then_some(20 + i),
            cost_usd: Some(0.001 * i as f64),
            request_id: Some(RequestId(1_000 + i)),
            route_reason: (i % 2 == 1).then(|| Cow::Owned(format!("route-{i}"))),
            cached_tokens: Some(i),
            reasoning_tokens: Some(2 * i),
            cost_nanos: Some(1_000_000 * i),
            client: (i % 3 == 1).then(|| Arc::from(format!("client-{i}"))),
            estimated: i.is_multiple_of(7),
            prompt_text: i.is_multiple_of(2).then(|| format!("prompt-{i}")),
            completion_text: i.is_multiple_of(2).then(|| format!("completion-{i}")),
            ..Entry::begin(if i.is_multiple_of(2) { "chat" } else { "embeddings" })
        })
    }

    #[test]
    fn a_batch_goes_in_multi_row_inserts_and_the_rest_row_by_row_with_every_column_in_place() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("log.db");
        assert_eq!(COLUMNS.split(',').count(), PER_ROW);
        let mut conn = open_db(&path).unwrap();
        // Two multi-row statements and five rows alone; then a batch smaller than one statement.
        let first: Vec<Box<Entry>> = (0..2 * ROWS_PER_INSERT as u64 + 5).map(row).collect();
        write_batch(&mut conn, &first).unwrap();
        let second: Vec<Box<Entry>> = (100..103).map(row).collect();
        write_batch(&mut conn, &second).unwrap();
        let back = read_since(&open_read(&path).unwrap(), 0).unwrap();
        let want: Vec<&Entry> = first.iter().chain(&second).map(|e| &**e).collect();
        assert_eq!(back.len(), want.len());
        // `read_since` leaves the texts out (the report never reads them): compared on their own below.
        for (got, want) in back.iter().zip(&want) {
            let without_texts = Entry { prompt_text: None, completion_text: None, ..(*want).clone() };
            assert_eq!(got, &without_texts);
        }
        let read = open_read(&path).unwrap();
        let mut st = read.prepare("SELECT prompt_text, completion_text FROM requests ORDER BY id").unwrap();
        let texts: Vec<(Option<String>, Option<String>)> =
            st.query_map([], |r| Ok((r.get(0)?, r.get(1)?))).unwrap().map(Result::unwrap).collect();
        let want_texts: Vec<_> = want.iter().map(|e| (e.prompt_text.clone(), e.completion_text.clone())).collect();
        assert_eq!(texts, want_texts);
    }
}
