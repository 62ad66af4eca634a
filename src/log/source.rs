//! [`Source`]: where the request log lives — a SQLite file or a PostgreSQL URL — and the reads every user of
//! the log shares (`sheepdog report`, `/api/stats`, the budgets at start). Reads block: call them from a
//! blocking thread in async code. Shown (`Display`) as the path, or the URL without its password.

use std::fmt;
use std::path::PathBuf;

use super::{postgres, sqlite, Entry, Spend};
use crate::config::{LogConfig, PgUrl};

/// The request log's database.
#[derive(Debug, Clone, PartialEq)]
pub enum Source {
    /// A SQLite file (`[log] path`).
    Sqlite(PathBuf),
    /// A PostgreSQL database (`[log] url`).
    Postgres(PgUrl),
}

/// Why the request log could not be read.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    /// The SQLite file.
    #[error("{0}")]
    Sqlite(#[from] rusqlite::Error),
    /// PostgreSQL (the message never holds the URL).
    #[error("{0}")]
    Postgres(#[from] postgres::PgError),
}

impl Source {
    /// The log `cfg` writes to.
    pub fn of(cfg: &LogConfig) -> Source {
        match &cfg.url {
            Some(url) => Source::Postgres(url.clone()),
            None => Source::Sqlite(cfg.path.clone()),
        }
    }

    /// `sheepdog report --db`: a `postgres://` URL, else a file path.
    pub fn parse(arg: &str) -> Result<Source, String> {
        if arg.starts_with("postgres://") || arg.starts_with("postgresql://") {
            PgUrl::parse(arg).map(Source::Postgres)
        } else {
            Ok(Source::Sqlite(PathBuf::from(arg)))
        }
    }

    /// Every row with `ts_ms >= since_ms`, in the order they were written.
    pub fn read_since(&self, since_ms: i64) -> Result<Vec<Entry>, ReadError> {
        Ok(match self {
            Source::Sqlite(path) => sqlite::read_since(&sqlite::open_read(path)?, since_ms)?,
            Source::Postgres(url) => postgres::read_since(url, since_ms)?,
        })
    }

    /// Spend by (served model, client) of the rows with `ts_ms >= since_ms` (see [`sqlite::spend_since`]).
    pub fn spend_since(&self, since_ms: i64) -> Result<Vec<Spend>, ReadError> {
        Ok(match self {
            Source::Sqlite(path) => sqlite::spend_since(&sqlite::open_read(path)?, since_ms)?,
            Source::Postgres(url) => postgres::spend_since(url, since_ms)?,
        })
    }
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Source::Sqlite(p) => write!(f, "{}", p.display()),
            Source::Postgres(u) => write!(f, "{u}"),
        }
    }
}
