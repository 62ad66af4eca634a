//! The request log in PostgreSQL (`[log] url`): the `requests` table and its versioned schema, batched
//! inserts for the writer thread, retention, and the reads of `sheepdog report`, `/api/stats` and the budgets.
//!
//! The writer's [`PgSink`] owns a small current-thread tokio runtime and one connection; it runs only on the
//! writer thread (so the gateway's runtime never waits for PostgreSQL). A batch is one
//! `INSERT … SELECT FROM UNNEST(…)` statement (atomic), `ON CONFLICT (request_id) DO NOTHING`, so a batch whose
//! commit outcome was lost with the connection can be sent again without doubling a row. A lost connection
//! is re-opened with backoff by the writer loop (`super::write_loop`). Schema changes run at connect in one
//! transaction under `pg_advisory_xact_lock`, so replicas starting together are safe. No TLS (plain TCP or a
//! Unix socket): run the database on the same host or network. The URL is shown only redacted
//! ([`PgUrl`]); no error of this module repeats it. Knows nothing of HTTP.

use std::borrow::Cow;
use std::time::{Duration, Instant};

use tokio::runtime::Runtime;
use tokio_postgres::{Client, NoTls, Statement};

use super::sqlite::Spend;
use super::{Entry, RequestId, Sink, Written};
use crate::clock::unix_ms;
use crate::config::PgUrl;

/// The schema version this sheepdog writes (table `sheepdog_schema_version`), the last of [`MIGRATIONS`].
/// Version 1 has the columns of the SQLite schema version 3.
pub(super) const PG_SCHEMA_VERSION: i32 = 1;

/// Each schema version and the statements that make it, applied in order at connect.
const MIGRATIONS: &[(i32, &str)] = &[(
    1,
    "CREATE TABLE IF NOT EXISTS requests (
        id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        ts_ms bigint NOT NULL,
        api text NOT NULL,
        model text NOT NULL,
        served_model text,
        endpoint text,
        status integer NOT NULL,
        error text,
        attempts integer NOT NULL,
        stream boolean NOT NULL,
        duration_ms double precision NOT NULL,
        ttft_ms double precision,
        prompt_tokens bigint,
        completion_tokens bigint,
        cost_usd double precision,
        request_id bigint,
        route_reason text,
        cached_tokens bigint,
        reasoning_tokens bigint,
        cost_nanos bigint,
        client text,
        estimated boolean NOT NULL DEFAULT false,
        prompt_text text,
        completion_text text
    );
    CREATE INDEX IF NOT EXISTS requests_ts_ms ON requests (ts_ms);
    CREATE INDEX IF NOT EXISTS requests_model_ts_ms ON requests (model, ts_ms);
    CREATE UNIQUE INDEX IF NOT EXISTS requests_request_id ON requests (request_id);",
)];

/// The advisory lock taken while the schema is checked and upgraded ("sheepdog" in ASCII).
const MIGRATION_LOCK: i64 = 0x7368_6565_7064_6f67;

const INSERT: &str = "INSERT INTO requests (ts_ms, api, model, served_model, endpoint, status, error, attempts, \
    stream, duration_ms, ttft_ms, prompt_tokens, completion_tokens, cost_usd, request_id, route_reason, \
    cached_tokens, reasoning_tokens, cost_nanos, client, estimated, prompt_text, completion_text) \
    SELECT * FROM UNNEST($1::bigint[], $2::text[], $3::text[], $4::text[], $5::text[], $6::integer[], \
    $7::text[], $8::integer[], $9::boolean[], $10::float8[], $11::float8[], $12::bigint[], $13::bigint[], \
    $14::float8[], $15::bigint[], $16::text[], $17::bigint[], $18::bigint[], $19::bigint[], $20::text[], \
    $21::boolean[], $22::text[], $23::text[]) \
    ON CONFLICT (request_id) DO NOTHING";

const SELECT: &str = "SELECT ts_ms, api, model, served_model, endpoint, status, error, attempts, stream, \
    duration_ms, ttft_ms, prompt_tokens, completion_tokens, cost_usd, request_id, route_reason, cached_tokens, \
    reasoning_tokens, cost_nanos, client, estimated FROM requests WHERE ts_ms >= $1 ORDER BY id";

const SPEND: &str = "SELECT served_model, client, \
    SUM(COALESCE(cost_nanos, ROUND(cost_usd * 1e9)::bigint))::bigint FROM requests \
    WHERE ts_ms >= $1 AND (cost_nanos IS NOT NULL OR cost_usd IS NOT NULL) GROUP BY served_model, client";

/// Rows deleted per statement when pruning, so a large backlog never holds one long transaction.
const PRUNE_CHUNK: i64 = 10_000;

/// How long a connection attempt may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// How long the first connection attempt at start may hold up the gateway's start.
const START_TIMEOUT: Duration = Duration::from_secs(3);

/// How long a read (`sheepdog report`, `/api/stats`, the budgets at start) may take.
const READ_TIMEOUT: Duration = Duration::from_secs(30);

/// What went wrong talking to PostgreSQL (never names the URL).
#[derive(Debug, thiserror::Error)]
pub enum PgError {
    /// The server or the connection.
    #[error("{}", describe(.0))]
    Db(#[from] tokio_postgres::Error),
    /// No answer in time.
    #[error("PostgreSQL did not answer within {0:?}")]
    Timeout(Duration),
    /// The table was made by a newer sheepdog.
    #[error("the request log has schema version {0}; this sheepdog knows up to {PG_SCHEMA_VERSION}")]
    Newer(i32),
    /// The async runtime could not be built.
    #[error("cannot start the PostgreSQL client's runtime: {0}")]
    Runtime(std::io::Error),
}

impl PgError {
    /// Whether the server refused the rows themselves (SQLSTATE classes 22, data, and 23, integrity): sending
    /// them again would fail again.
    fn is_refusal(&self) -> bool {
        match self {
            PgError::Db(e) => e.code().is_some_and(|c| matches!(&c.code()[..2], "22" | "23")),
            _ => false,
        }
    }
}

/// The error and its causes, one after the other (tokio-postgres shows only the kind).
fn describe(e: &tokio_postgres::Error) -> String {
    let mut s = e.to_string();
    let mut cause = std::error::Error::source(e);
    while let Some(c) = cause {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cause = c.source();
    }
    s
}

fn client_config(url: &PgUrl) -> Result<tokio_postgres::Config, PgError> {
    let mut cfg: tokio_postgres::Config = url.expose().parse()?;
    if cfg.get_connect_timeout().is_none() {
        cfg.connect_timeout(CONNECT_TIMEOUT);
    }
    cfg.application_name("sheepdog");
    Ok(cfg)
}

fn runtime() -> Result<Runtime, PgError> {
    tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(PgError::Runtime)
}

async fn within<T>(limit: Duration, f: impl std::future::Future<Output = Result<T, PgError>>) -> Result<T, PgError> {
    tokio::time::timeout(limit, f).await.unwrap_or(Err(PgError::Timeout(limit)))
}

/// Connect (the connection is driven by a task on the current runtime) and bring the schema up to date.
async fn connect(cfg: &tokio_postgres::Config) -> Result<(Client, tokio::task::JoinHandle<()>), PgError> {
    let (mut client, conn) = cfg.connect(NoTls).await?;
    let task = tokio::spawn(async move {
        if let Err(e) = conn.await {
            tracing::debug!(error = %describe(&e), "request log: PostgreSQL connection ended");
        }
    });
    match migrate(&mut client).await {
        Ok(()) => Ok((client, task)),
        Err(e) => {
            task.abort();
            Err(e)
        }
    }
}

/// Bring the tables to [`PG_SCHEMA_VERSION`] in one transaction under an advisory lock (released at commit,
/// or by the server when the connection drops). A schema from a newer sheepdog is refused.
async fn migrate(client: &mut Client) -> Result<(), PgError> {
    let tx = client.transaction().await?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK]).await?;
    tx.batch_execute(
        "CREATE TABLE IF NOT EXISTS sheepdog_schema_version (version integer PRIMARY KEY, \
         applied_at timestamptz NOT NULL DEFAULT now())",
    )
    .await?;
    let version: i32 = tx.query_one("SELECT COALESCE(MAX(version), 0) FROM sheepdog_schema_version", &[]).await?.get(0);
    if version > PG_SCHEMA_VERSION {
        return Err(PgError::Newer(version));
    }
    for (to, sql) in MIGRATIONS.iter().filter(|(to, _)| *to > version) {
        tx.batch_execute(sql).await?;
        tx.execute("INSERT INTO sheepdog_schema_version (version) VALUES ($1)", &[to]).await?;
        tracing::info!(version = to, "request log: PostgreSQL schema upgraded");
    }
    tx.commit().await?;
    Ok(())
}

/// One open connection of the writer and its prepared insert.
struct Conn {
    client: Client,
    insert: Statement,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Conn {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The writer's PostgreSQL: a runtime of its own and a connection, opened again when lost.
pub(super) struct PgSink {
    rt: Runtime,
    cfg: tokio_postgres::Config,
    conn: Option<Conn>,
}

impl PgSink {
    /// A sink for `url`, connected if the server answers within [`START_TIMEOUT`] (an unreachable server is
    /// no error: the writer connects later); a schema from a newer sheepdog is an error. Safe to call from
    /// inside an async runtime (the first connection is made on a thread of its own).
    pub(super) fn open(url: &PgUrl) -> Result<PgSink, PgError> {
        let mut sink = PgSink { rt: runtime()?, cfg: client_config(url)?, conn: None };
        let first = std::thread::scope(|s| {
            s.spawn(|| sink.rt.block_on(within(START_TIMEOUT, Self::open_conn(&sink.cfg))))
                .join()
                .unwrap_or(Err(PgError::Timeout(START_TIMEOUT)))
        });
        match first {
            Ok(c) => sink.conn = Some(c),
            Err(e @ PgError::Newer(_)) => return Err(e),
            Err(e) => tracing::warn!(
                error = %e,
                url = %url,
                "request log: PostgreSQL is unreachable; the gateway serves, rows wait in the queue"
            ),
        }
        Ok(sink)
    }

    async fn open_conn(cfg: &tokio_postgres::Config) -> Result<Conn, PgError> {
        let (client, task) = connect(cfg).await?;
        let insert = client.prepare(INSERT).await?;
        Ok(Conn { client, insert, task })
    }

    fn try_write(&mut self, rows: &[Box<Entry>], deadline: Instant) -> Result<(), PgError> {
        let limit = deadline.saturating_duration_since(Instant::now());
        let conn = &mut self.conn;
        let cfg = &self.cfg;
        self.rt.block_on(within(limit, async {
            if conn.is_none() {
                *conn = Some(Self::open_conn(cfg).await?);
            }
            let Some(c) = conn.as_ref() else { return Ok(()) };
            insert(&c.client, &c.insert, rows).await
        }))
    }
}

impl Sink for PgSink {
    fn write(&mut self, rows: &[Box<Entry>], deadline: Instant) -> Written {
        match self.try_write(rows, deadline) {
            Ok(()) => Written::Stored,
            Err(e) if e.is_refusal() => Written::Refused(e.to_string()),
            Err(e) => {
                // The connection may be broken, or the statement's outcome unknown: start afresh. A batch that
                // did commit is deduplicated by request_id when it is sent again.
                self.conn = None;
                Written::Retry(e.to_string())
            }
        }
    }

    fn prune(&mut self, retention: Duration) {
        let cutoff = unix_ms() - retention.as_millis() as i64;
        let Some(c) = &self.conn else { return };
        let deleted = self.rt.block_on(within(READ_TIMEOUT, async {
            let mut total = 0u64;
            loop {
                let n = c
                    .client
                    .execute(
                        "DELETE FROM requests WHERE id IN (SELECT id FROM requests WHERE ts_ms < $1 LIMIT $2)",
                        &[&cutoff, &PRUNE_CHUNK],
                    )
                    .await?;
                total += n;
                if n < PRUNE_CHUNK as u64 {
                    return Ok(total);
                }
            }
        }));
        match deleted {
            Ok(0) => {}
            Ok(n) => tracing::info!(rows = n, "request log: pruned rows older than the retention"),
            Err(e) => tracing::warn!(error = %e, "request log: pruning failed"),
        }
    }

    fn name(&self) -> &'static str {
        "PostgreSQL"
    }
}

/// Text as PostgreSQL takes it: a NUL character (which a client can put in a model name) becomes U+FFFD.
fn text(s: &str) -> Cow<'_, str> {
    if s.contains('\0') {
        Cow::Owned(s.replace('\0', "\u{fffd}"))
    } else {
        Cow::Borrowed(s)
    }
}

fn opt_text(s: Option<&str>) -> Option<Cow<'_, str>> {
    s.map(text)
}

fn opt_i64(n: Option<u64>) -> Option<i64> {
    n.map(|n| n as i64)
}

/// Insert `rows` in one statement: one array per column.
async fn insert(client: &Client, st: &Statement, rows: &[Box<Entry>]) -> Result<(), PgError> {
    let col = |f: &dyn Fn(&Entry) -> Option<Cow<'_, str>>| rows.iter().map(|e| f(e)).collect::<Vec<_>>();
    let ts: Vec<i64> = rows.iter().map(|e| e.ts_ms).collect();
    let api: Vec<&str> = rows.iter().map(|e| e.api).collect();
    let model: Vec<Cow<'_, str>> = rows.iter().map(|e| text(&e.model)).collect();
    let served_model = col(&|e| opt_text(e.served_model.as_deref()));
    let endpoint = col(&|e| opt_text(e.endpoint.as_deref()));
    let status: Vec<i32> = rows.iter().map(|e| i32::from(e.status)).collect();
    let error = col(&|e| opt_text(e.error.as_deref()));
    let attempts: Vec<i32> = rows.iter().map(|e| e.attempts.min(i32::MAX as u32) as i32).collect();
    let stream: Vec<bool> = rows.iter().map(|e| e.stream).collect();
    let duration: Vec<f64> = rows.iter().map(|e| e.duration_ms).collect();
    let ttft: Vec<Option<f64>> = rows.iter().map(|e| e.ttft_ms).collect();
    let prompt: Vec<Option<i64>> = rows.iter().map(|e| opt_i64(e.prompt_tokens)).collect();
    let completion: Vec<Option<i64>> = rows.iter().map(|e| opt_i64(e.completion_tokens)).collect();
    let cost: Vec<Option<f64>> = rows.iter().map(|e| e.cost_usd).collect();
    let request_id: Vec<Option<i64>> = rows.iter().map(|e| e.request_id.map(|id| id.0 as i64)).collect();
    let route_reason = col(&|e| opt_text(e.route_reason.as_deref()));
    let cached: Vec<Option<i64>> = rows.iter().map(|e| opt_i64(e.cached_tokens)).collect();
    let reasoning: Vec<Option<i64>> = rows.iter().map(|e| opt_i64(e.reasoning_tokens)).collect();
    let nanos: Vec<Option<i64>> = rows.iter().map(|e| opt_i64(e.cost_nanos)).collect();
    let client_name = col(&|e| opt_text(e.client.as_deref()));
    let estimated: Vec<bool> = rows.iter().map(|e| e.estimated).collect();
    let prompt_text = col(&|e| opt_text(e.prompt_text.as_deref()));
    let completion_text = col(&|e| opt_text(e.completion_text.as_deref()));
    client
        .execute(
            st,
            &[
                &ts,
                &api,
                &model,
                &served_model,
                &endpoint,
                &status,
                &error,
                &attempts,
                &stream,
                &duration,
                &ttft,
                &prompt,
                &completion,
                &cost,
                &request_id,
                &route_reason,
                &cached,
                &reasoning,
                &nanos,
                &client_name,
                &estimated,
                &prompt_text,
                &completion_text,
            ],
        )
        .await?;
    Ok(())
}

/// Run `f` on a fresh connection to `url`, on a runtime and thread of its own (callable from anywhere,
/// async code included, which it blocks: call it from a blocking thread there).
fn with_client<T: Send>(
    url: &PgUrl,
    f: impl for<'c> FnOnce(&'c Client) -> futures_util::future::BoxFuture<'c, Result<T, PgError>> + Send,
) -> Result<T, PgError> {
    let cfg = client_config(url)?;
    std::thread::scope(|s| {
        s.spawn(move || {
            let rt = runtime()?;
            rt.block_on(within(READ_TIMEOUT, async {
                let (client, conn) = cfg.connect(NoTls).await?;
                let task = tokio::spawn(async move {
                    let _ = conn.await;
                });
                let out = f(&client).await;
                drop(client);
                task.abort();
                out
            }))
        })
        .join()
        .unwrap_or(Err(PgError::Timeout(READ_TIMEOUT)))
    })
}

/// Every row with `ts_ms >= since_ms`, in the order they were written.
pub(super) fn read_since(url: &PgUrl, since_ms: i64) -> Result<Vec<Entry>, PgError> {
    with_client(url, |c| {
        Box::pin(async move {
            let rows = c.query(SELECT, &[&since_ms]).await?;
            rows.iter().map(|r| row_entry(r).map_err(PgError::from)).collect()
        })
    })
}

fn u64_col(r: &tokio_postgres::Row, i: usize) -> Result<Option<u64>, tokio_postgres::Error> {
    Ok(r.try_get::<_, Option<i64>>(i)?.map(|n| n.max(0) as u64))
}

fn row_entry(r: &tokio_postgres::Row) -> Result<Entry, tokio_postgres::Error> {
    Ok(Entry {
        ts_ms: r.try_get(0)?,
        api: match r.try_get::<_, &str>(1)? {
            "embeddings" => "embeddings",
            _ => "chat",
        },
        model: r.try_get(2)?,
        served_model: r.try_get::<_, Option<&str>>(3)?.map(std::sync::Arc::from),
        endpoint: r.try_get::<_, Option<&str>>(4)?.map(std::sync::Arc::from),
        status: r.try_get::<_, i32>(5)?.clamp(0, i32::from(u16::MAX)) as u16,
        error: r.try_get::<_, Option<String>>(6)?.map(Cow::Owned),
        attempts: r.try_get::<_, i32>(7)?.max(0) as u32,
        stream: r.try_get(8)?,
        duration_ms: r.try_get(9)?,
        ttft_ms: r.try_get(10)?,
        prompt_tokens: u64_col(r, 11)?,
        completion_tokens: u64_col(r, 12)?,
        cost_usd: r.try_get(13)?,
        request_id: r.try_get::<_, Option<i64>>(14)?.map(|n| RequestId(n as u64)),
        route_reason: r.try_get::<_, Option<String>>(15)?.map(Cow::Owned),
        cached_tokens: u64_col(r, 16)?,
        reasoning_tokens: u64_col(r, 17)?,
        cost_nanos: u64_col(r, 18)?,
        client: r.try_get::<_, Option<String>>(19)?.map(std::sync::Arc::from),
        estimated: r.try_get(20)?,
        prompt_text: None,
        completion_text: None,
    })
}

/// Spend by (served model, client) of the rows with `ts_ms >= since_ms` (see [`super::spend_since`]).
pub(super) fn spend_since(url: &PgUrl, since_ms: i64) -> Result<Vec<Spend>, PgError> {
    with_client(url, |c| {
        Box::pin(async move {
            let rows = c.query(SPEND, &[&since_ms]).await?;
            rows.iter()
                .map(|r| {
                    Ok(Spend {
                        served_model: r.try_get(0)?,
                        client: r.try_get(1)?,
                        nanos: r.try_get::<_, Option<i64>>(2)?.unwrap_or(0).max(0) as u64,
                    })
                })
                .collect()
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The test database, or `None` (the test is skipped) when it is not reachable.
    fn test_db() -> Option<(PgUrl, String)> {
        let base =
            std::env::var("SHEEPDOG_TEST_PG").unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into());
        let schema = format!("t_unit_{:016x}", rand::random::<u64>());
        let made = with_client(&PgUrl::parse(&base).ok()?, |c| {
            let sql = format!("CREATE SCHEMA {schema}");
            Box::pin(async move { Ok(c.batch_execute(&sql).await?) })
        });
        if let Err(e) = made {
            assert!(std::env::var("SHEEPDOG_REQUIRE_PG").is_err(), "PostgreSQL is required: {e}");
            eprintln!("skipped: PostgreSQL not reachable ({e})");
            return None;
        }
        let sep = if base.contains('?') { '&' } else { '?' };
        Some((PgUrl::parse(&format!("{base}{sep}options=-csearch_path%3D{schema}")).ok()?, base))
    }

    fn drop_schema(base: &str, url: &PgUrl) {
        let schema = url.expose().rsplit("%3D").next().unwrap_or_default().to_string();
        let _ = with_client(&PgUrl::parse(base).unwrap(), |c| {
            let sql = format!("DROP SCHEMA {schema} CASCADE");
            Box::pin(async move { Ok(c.batch_execute(&sql).await?) })
        });
    }

    fn entry(i: u64) -> Box<Entry> {
        Box::new(Entry {
            ts_ms: unix_ms(),
            model: "gpt\u{0}4.1".into(),
            status: 200,
            attempts: 1,
            request_id: Some(RequestId(i)),
            cost_nanos: Some(1_000),
            ..Entry::empty("chat")
        })
    }

    #[test]
    fn a_batch_sent_twice_is_stored_once_and_refusals_are_told_apart() {
        let Some((url, base)) = test_db() else { return };
        let mut sink = PgSink::open(&url).unwrap();
        let batch: Vec<Box<Entry>> = (0..10).map(entry).collect();
        let deadline = Instant::now() + Duration::from_secs(10);
        assert!(matches!(sink.write(&batch, deadline), Written::Stored));
        // As after a connection lost before the commit was confirmed: the same rows again, and one new one.
        sink.conn = None;
        let again: Vec<Box<Entry>> = (0..11).map(entry).collect();
        assert!(matches!(sink.write(&again, deadline), Written::Stored));
        let rows = read_since(&url, 0).unwrap();
        assert_eq!(rows.len(), 11);
        assert_eq!(rows[0].model, "gpt\u{fffd}4.1");
        let spend = spend_since(&url, 0).unwrap();
        assert_eq!(spend.iter().map(|s| s.nanos).sum::<u64>(), 11_000);
        // A schema from a newer sheepdog is refused at start.
        with_client(&url, |c| {
            Box::pin(async move { Ok(c.batch_execute("INSERT INTO sheepdog_schema_version VALUES (99)").await?) })
        })
        .unwrap();
        let e = PgSink::open(&url).err().unwrap();
        assert!(e.to_string().contains("schema version 99"), "{e}");
        drop_schema(&base, &url);
    }

    #[test]
    fn rows_older_than_the_retention_are_pruned() {
        let Some((url, base)) = test_db() else { return };
        let mut sink = PgSink::open(&url).unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        let old = |i| Box::new(Entry { ts_ms: 1_000 + i as i64, ..*entry(i) });
        let batch: Vec<Box<Entry>> = (0..3).map(old).chain((3..5).map(entry)).collect();
        assert!(matches!(sink.write(&batch, deadline), Written::Stored));
        sink.prune(Duration::from_secs(3600));
        let rows = read_since(&url, 0).unwrap();
        assert_eq!(rows.iter().map(|r| r.request_id.unwrap().0).collect::<Vec<_>>(), vec![3, 4]);
        drop_schema(&base, &url);
    }
}
