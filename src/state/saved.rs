//! Health saved across a restart: at graceful shutdown every pair's breaker and check history, and every
//! endpoint's manual drain, go to a JSON file beside the request log (`sheepdog.db` → `sheepdog.state`); at
//! start they are read back, so a restart does not send its first requests to an endpoint that was down a
//! second ago — an open breaker stays open for the rest of its recovery time.
//!
//! A missing file is normal (first start). A corrupt, foreign or other-version file, or one saved longer ago
//! than [`MAX_AGE_MS`], is ignored with one warning, never fatal. State is only taken over by the same
//! endpoint (name and base URL) and model. The file is written atomically (a temporary file, then a rename).
//! Holds no key: names, URLs and numbers only. Does no network I/O; reads no clock (times come in).

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::pair::SavedPair;
use super::Runtime;

/// The file's format tag.
const FORMAT: &str = "sheepdog-state";

/// The version written; files of another version are ignored.
pub const VERSION: u32 = 1;

/// A file saved longer ago than this (one hour) says nothing about the endpoints now: ignored.
pub const MAX_AGE_MS: i64 = 3_600_000;

#[derive(Debug, Serialize, Deserialize)]
struct StateFile {
    format: String,
    version: u32,
    /// When it was saved, Unix ms.
    saved_unix_ms: i64,
    endpoints: Vec<SavedEndpoint>,
    pairs: Vec<SavedPair>,
}

#[derive(Debug, Serialize, Deserialize)]
struct SavedEndpoint {
    name: String,
    base_url: String,
    enabled: bool,
}

/// Why a state file was not used.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// It could not be read.
    #[error("cannot read it: {0}")]
    Read(std::io::Error),
    /// It is not JSON of the expected shape.
    #[error("it is not a sheepdog state file: {0}")]
    Corrupt(serde_json::Error),
    /// Another format or version.
    #[error("it is a {0} file of version {1}, this sheepdog reads {FORMAT} version {VERSION}")]
    Version(String, u32),
    /// Saved too long ago (or in the future: the clock moved).
    #[error("it was saved {0} s ago, more than an hour: it says nothing about the endpoints now")]
    Stale(i64),
}

/// The state file that belongs to the request log at `log_path`.
pub fn path_for(log_path: &Path) -> PathBuf {
    log_path.with_extension("state")
}

/// Write the health of `rt` at `now_ms` (process time; `unix_ms` is the same instant on the wall clock) to
/// `path`. Returns the number of pairs saved.
pub fn save(rt: &Runtime, path: &Path, now_ms: u64, unix_ms: i64) -> std::io::Result<usize> {
    let file = StateFile {
        format: FORMAT.to_owned(),
        version: VERSION,
        saved_unix_ms: unix_ms,
        endpoints: rt
            .endpoints
            .iter()
            .map(|e| SavedEndpoint { name: e.cfg.name.clone(), base_url: e.cfg.base_url.clone(), enabled: e.enabled() })
            .collect(),
        pairs: rt.pairs().map(|(_, p)| p.saved(now_ms)).collect(),
    };
    let text = serde_json::to_vec(&file).map_err(std::io::Error::other)?;
    let tmp = path.with_extension("state.tmp");
    std::fs::write(&tmp, text)?;
    std::fs::rename(&tmp, path)?;
    Ok(file.pairs.len())
}

fn read(path: &Path, unix_ms: i64) -> Result<Option<StateFile>, LoadError> {
    let text = match std::fs::read(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(LoadError::Read(e)),
    };
    let file: StateFile = serde_json::from_slice(&text).map_err(LoadError::Corrupt)?;
    if file.format != FORMAT || file.version != VERSION {
        return Err(LoadError::Version(file.format, file.version));
    }
    let age = unix_ms - file.saved_unix_ms;
    if !(0..=MAX_AGE_MS).contains(&age) {
        return Err(LoadError::Stale(age / 1000));
    }
    Ok(Some(file))
}

/// What [`restore`] took over.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Restored {
    /// Pairs whose breaker and history were taken over.
    pub pairs: usize,
    /// Endpoints that stay drained.
    pub drained: usize,
}

/// Read `path` and hand its state to the matching pairs and endpoints of `rt`, at `now_ms` (process time) and
/// `unix_ms` (the same instant, wall clock). An unusable file is ignored with one warning.
pub fn restore(rt: &Runtime, path: &Path, now_ms: u64, unix_ms: i64) -> Restored {
    let file = match read(path, unix_ms) {
        Ok(Some(f)) => f,
        Ok(None) => return Restored::default(),
        Err(e) => {
            tracing::warn!(file = %path.display(), "health state from before the restart ignored: {e}");
            return Restored::default();
        }
    };
    let offline_ms = (unix_ms - file.saved_unix_ms).max(0) as u64;
    let mut done = Restored::default();
    for saved in &file.pairs {
        let found = rt.pairs().find(|(e, p)| e.cfg.name == saved.endpoint && p.same(&saved.base_url, &saved.model));
        if let Some((_, pair)) = found {
            pair.restore(saved, offline_ms, &rt.policy, now_ms);
            done.pairs += 1;
        }
    }
    for saved in file.endpoints.iter().filter(|s| !s.enabled) {
        if let Some(e) = rt.endpoints.iter().find(|e| e.cfg.name == saved.name && e.cfg.base_url == saved.base_url) {
            e.enabled.store(false, std::sync::atomic::Ordering::Relaxed);
            tracing::warn!(endpoint = %e.cfg.name, "endpoint stays drained, as it was before the restart (POST /admin/endpoints/{}/enable)", e.cfg.name);
            done.drained += 1;
        }
    }
    tracing::info!(
        pairs = done.pairs,
        drained = done.drained,
        offline_s = offline_ms / 1000,
        "health state from before the restart restored"
    );
    done
}
