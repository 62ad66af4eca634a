//! Health shared among replicas through Redis (`[state] backend = "redis"`): the thin async shell that
//! carries each replica's breaker openings and closings, manual drains and probe results to the others, and
//! the probe leases that make the fleet probe each endpoint × model once per interval.
//!
//! **What it must not do:** stand in any request's way. Pairs hand their changes to the [`Outbox`] with a
//! non-blocking `try_send`; this task (and its sibling [`counters`]) alone talk to Redis, every call under
//! `[state] timeout`. Every replica keeps its own `Pair`s and decides from them; what comes from Redis is applied to them (`Pair::
//! apply_remote_breaker`, a probe result recorded like a local one). When Redis is unreachable or slow the
//! replica goes on with its local state, says so once (log, `sheepdog_state_backend_up`, `/status`),
//! reconnects with backoff and resynchronises. Which message wins is `sheepdog_policy::shared`'s rule.
//!
//! In Redis (all keys under `key_prefix`): a hash per pair `P:pair:ENDPOINT:MODEL` and per endpoint
//! `P:drain:ENDPOINT` (fields `at`, `from`, `msg`: the last change, written only if not older than what is
//! there), the pub/sub channel `P:events` (every change and probe result, as JSON), and the probe leases
//! `P:lease:ENDPOINT:MODEL` (value: the holder's replica id, expiring). Never holds or logs the URL's
//! password.
//!
//! Budget spend and client rate limits are counted fleet-wide by the sibling task in [`counters`].

pub mod counters;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, LazyLock};
use std::time::Duration;

use futures_util::StreamExt;
use parking_lot::Mutex;
use prometheus::IntGauge;
use redis::aio::MultiplexedConnection;
use serde::{Deserialize, Serialize};
use sheepdog_policy::breaker::BreakerState;
use sheepdog_policy::shared::{accept, local_deadline, unix_of, Version};
use tokio::sync::{mpsc, watch};

use crate::config::StateConfig;
use crate::gateway::Gateway;
use crate::state::{Event, Outcome, Source};

/// Probe results older than this when they reach Redis (held up by an outage) are not shared.
const PROBE_MAX_AGE_MS: u64 = 10_000;
/// How long a connection attempt may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
/// Reconnection backoff: doubling from the first to the last.
const BACKOFF: (Duration, Duration) = (Duration::from_millis(100), Duration::from_secs(2));
/// How often a quiet connection is checked (a Redis that hangs is noticed within this and a timeout).
const PING_EVERY: Duration = Duration::from_millis(500);
/// How long a hash of a pair or drain lives without a change.
const FACT_TTL_MS: u64 = 7 * 86_400_000;

/// Writes a fact's hash unless it holds a newer one, then publishes it.
static PUBLISH: LazyLock<redis::Script> = LazyLock::new(|| {
    redis::Script::new(
        r"local cur = redis.call('HGET', KEYS[1], 'at')
if cur and tonumber(cur) > tonumber(ARGV[1]) then return 0 end
redis.call('HSET', KEYS[1], 'at', ARGV[1], 'from', ARGV[2], 'msg', ARGV[3])
redis.call('PEXPIRE', KEYS[1], ARGV[5])
redis.call('PUBLISH', ARGV[4], ARGV[3])
return 1",
    )
});

/// Takes a probe lease, or renews it for its holder.
static LEASE: LazyLock<redis::Script> = LazyLock::new(|| {
    redis::Script::new(
        r"local v = redis.call('GET', KEYS[1])
if not v then redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2]) return 1 end
if v == ARGV[1] then redis.call('PEXPIRE', KEYS[1], ARGV[2]) return 1 end
return 0",
    )
});

/// One message on the channel (and the `msg` of a hash).
#[derive(Debug, Serialize, Deserialize)]
struct Wire {
    /// The replica that made the change.
    from: String,
    /// When, Unix ms.
    at: i64,
    #[serde(flatten)]
    body: Body,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
enum Body {
    Breaker { endpoint: String, model: String, state: BreakerState, retry_at: i64 },
    Drain { endpoint: String, enabled: bool },
    Probe { endpoint: String, model: String, ok: bool, latency_ms: f64 },
}

/// What [`Redis::lease`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lease {
    /// This replica holds the pair's lease: it probes.
    Mine,
    /// Another replica holds it: skip the probe, its result comes through the channel.
    Other,
    /// Redis cannot say (unreachable, slow): probe locally, as a lone replica does.
    Local,
}

const UNKNOWN: u8 = 0;
const UP: u8 = 1;
const DOWN: u8 = 2;

/// The Redis backend of one replica: its id, the connection while there is one, and whether it is up.
pub struct Redis {
    client: Option<redis::Client>,
    prefix: String,
    timeout: Duration,
    replica: String,
    conn: Mutex<Option<MultiplexedConnection>>,
    link: AtomicU8,
    up: IntGauge,
    rx: Mutex<Option<mpsc::Receiver<Event>>>,
}

impl Redis {
    /// The backend for `cfg`, fed by the outbox's receiving end `rx`; `up` is `sheepdog_state_backend_up`.
    /// Connects nothing yet ([`run`] does).
    pub fn new(cfg: &StateConfig, rx: mpsc::Receiver<Event>, up: IntGauge) -> Redis {
        let client = match redis::Client::open(cfg.redis_url.as_str()) {
            Ok(c) => Some(c),
            Err(_) => {
                tracing::error!("state.redis_url cannot be used; the replica keeps its health to itself");
                None
            }
        };
        up.set(0);
        Redis {
            client,
            prefix: cfg.key_prefix.clone(),
            timeout: cfg.timeout,
            replica: replica_id(),
            conn: Mutex::new(None),
            link: AtomicU8::new(UNKNOWN),
            up,
            rx: Mutex::new(Some(rx)),
        }
    }

    /// This replica's id (random per start), in every message it sends and every lease it holds.
    pub fn replica(&self) -> &str {
        &self.replica
    }

    /// Whether Redis is reachable now.
    pub fn connected(&self) -> bool {
        self.link.load(Ordering::Relaxed) == UP
    }

    /// Take or renew the probe lease of a pair for `ttl_ms`; [`Lease::Local`] when Redis cannot say in time.
    pub async fn lease(&self, endpoint: &str, model: &str, ttl_ms: u64) -> Lease {
        let Some(mut conn) = self.conn.lock().clone().filter(|_| self.connected()) else { return Lease::Local };
        let key = format!("{}:lease:{endpoint}:{model}", self.prefix);
        let mut inv = LEASE.key(key);
        inv.arg(&self.replica).arg(ttl_ms);
        let call = inv.invoke_async::<i64>(&mut conn);
        match tokio::time::timeout(self.timeout, call).await {
            Ok(Ok(1)) => Lease::Mine,
            Ok(Ok(_)) => Lease::Other,
            _ => Lease::Local,
        }
    }

    fn pair_key(&self, endpoint: &str, model: &str) -> String {
        format!("{}:pair:{endpoint}:{model}", self.prefix)
    }

    fn drain_key(&self, endpoint: &str) -> String {
        format!("{}:drain:{endpoint}", self.prefix)
    }

    fn channel(&self) -> String {
        format!("{}:events", self.prefix)
    }

    /// Record the link's state: the gauge, and one log line per change (the first one too, when it is down).
    fn set_link(&self, up: bool, why: &str) {
        let new = if up { UP } else { DOWN };
        let old = self.link.swap(new, Ordering::Relaxed);
        self.up.set(i64::from(up));
        if old == new {
            return;
        }
        if up {
            tracing::info!(replica = %self.replica, "Redis reachable: health is shared with the other replicas");
        } else {
            tracing::warn!(replica = %self.replica, error = why, "Redis unreachable: serving with this replica's own health state until it returns");
        }
    }

    async fn call<T>(&self, f: impl std::future::Future<Output = redis::RedisResult<T>>) -> Result<T, String> {
        match tokio::time::timeout(self.timeout, f).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => Err(scrub(&e)),
            Err(_) => Err(format!("no answer within {} ms", self.timeout.as_millis())),
        }
    }
}

/// A Redis error as text, without anything of the URL.
fn scrub(e: &redis::RedisError) -> String {
    format!("{:?}: {}", e.kind(), e.detail().unwrap_or("")).chars().take(200).collect()
}

fn replica_id() -> String {
    use rand::Rng;
    format!("{:016x}", rand::thread_rng().gen::<u64>())
}

/// The backend's task: connect, subscribe, resynchronise, then carry changes both ways until the connection
/// is lost (then reconnect with backoff) or `shutdown` turns true. Returns at once with the memory backend.
pub async fn run(gw: Arc<Gateway>, mut shutdown: watch::Receiver<bool>) {
    let Some(sh) = gw.shared.clone() else { return };
    let Some(mut rx) = sh.rx.lock().take() else { return };
    tokio::spawn(counters::run(gw.clone(), sh.clone(), shutdown.clone()));
    let mut seen: HashMap<String, Version> = HashMap::new();
    let mut pending: Option<Event> = None;
    let mut backoff = BACKOFF.0;
    loop {
        let session = tokio::select! {
            s = connect(&sh) => s,
            _ = shutdown.changed() => return,
        };
        let why = match session {
            Err(e) => e,
            Ok((conn, pubsub)) => {
                *sh.conn.lock() = Some(conn.clone());
                let why =
                    serve(&gw, &sh, conn, pubsub, &mut rx, &mut seen, &mut pending, &mut backoff, &mut shutdown).await;
                *sh.conn.lock() = None;
                match why {
                    Some(w) => w,
                    None => return,
                }
            }
        };
        sh.set_link(false, &why);
        tokio::select! {
            _ = tokio::time::sleep(backoff) => {}
            _ = shutdown.changed() => return,
        }
        backoff = (backoff * 2).min(BACKOFF.1);
    }
}

async fn connect(sh: &Redis) -> Result<(MultiplexedConnection, redis::aio::PubSub), String> {
    let client = sh.client.as_ref().ok_or_else(|| "state.redis_url is not usable".to_owned())?;
    let open = async {
        let conn = client.get_multiplexed_async_connection().await?;
        let mut pubsub = client.get_async_pubsub().await?;
        pubsub.subscribe(sh.channel()).await?;
        Ok::<_, redis::RedisError>((conn, pubsub))
    };
    match tokio::time::timeout(CONNECT_TIMEOUT, open).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(scrub(&e)),
        Err(_) => Err("connecting took more than 1 s".to_owned()),
    }
}

/// One connected session; returns why it ended (`None`: shutdown or the outbox closed).
#[allow(clippy::too_many_arguments)]
async fn serve(
    gw: &Gateway,
    sh: &Redis,
    mut conn: MultiplexedConnection,
    pubsub: redis::aio::PubSub,
    rx: &mut mpsc::Receiver<Event>,
    seen: &mut HashMap<String, Version>,
    pending: &mut Option<Event>,
    backoff: &mut Duration,
    shutdown: &mut watch::Receiver<bool>,
) -> Option<String> {
    // Subscribed first, then read the hashes: no change can fall between the two.
    if let Err(e) = resync(gw, sh, &mut conn, seen).await {
        return Some(e);
    }
    if let Some(ev) = pending.take() {
        if let Err(e) = publish(gw, sh, &mut conn, seen, &ev).await {
            *pending = Some(ev);
            return Some(e);
        }
    }
    sh.set_link(true, "");
    *backoff = BACKOFF.0;
    let mut messages = pubsub.into_on_message();
    let mut ping = tokio::time::interval(PING_EVERY);
    ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            m = messages.next() => match m {
                Some(m) => {
                    if let Ok(text) = std::str::from_utf8(m.get_payload_bytes()) {
                        apply(gw, sh, seen, text);
                    }
                }
                None => return Some("the connection closed".to_owned()),
            },
            ev = rx.recv() => {
                let ev = ev?;
                if let Err(e) = publish(gw, sh, &mut conn, seen, &ev).await {
                    *pending = Some(ev);
                    return Some(e);
                }
            }
            _ = ping.tick() => {
                if let Err(e) = sh.call(redis::cmd("PING").query_async::<()>(&mut conn)).await {
                    return Some(e);
                }
            }
            _ = shutdown.changed() => return None,
        }
    }
}

/// Read every pair's and endpoint's hash and apply what is newer than what this replica knows.
async fn resync(
    gw: &Gateway,
    sh: &Redis,
    conn: &mut MultiplexedConnection,
    seen: &mut HashMap<String, Version>,
) -> Result<(), String> {
    let rt = gw.runtime();
    let mut pipe = redis::pipe();
    for (e, p) in rt.pairs() {
        pipe.hget(sh.pair_key(&e.cfg.name, p.model()), "msg");
    }
    for e in &rt.endpoints {
        pipe.hget(sh.drain_key(&e.cfg.name), "msg");
    }
    let msgs: Vec<Option<String>> = sh.call(pipe.query_async(conn)).await?;
    let n = msgs.iter().flatten().count();
    for m in msgs.iter().flatten() {
        apply(gw, sh, seen, m);
    }
    tracing::debug!(facts = n, "health resynchronised from Redis");
    Ok(())
}

/// Send one local change: a breaker change or drain to its hash and the channel, a probe result to the
/// channel.
async fn publish(
    gw: &Gateway,
    sh: &Redis,
    conn: &mut MultiplexedConnection,
    seen: &mut HashMap<String, Version>,
    ev: &Event,
) -> Result<(), String> {
    let (now, unix) = (gw.now_ms(), crate::clock::unix_ms());
    let (key, at, body) = match ev {
        Event::Breaker { endpoint, model, state, retry_at_ms, at_ms } => (
            Some(sh.pair_key(endpoint, model)),
            unix_of(*at_ms, now, unix),
            Body::Breaker {
                endpoint: endpoint.to_string(),
                model: model.to_string(),
                state: *state,
                retry_at: unix_of(*retry_at_ms, now, unix),
            },
        ),
        Event::Drain { endpoint, enabled, at_ms } => (
            Some(sh.drain_key(endpoint)),
            unix_of(*at_ms, now, unix),
            Body::Drain { endpoint: endpoint.to_string(), enabled: *enabled },
        ),
        Event::Probe { endpoint, model, ok, latency_ms, at_ms } => {
            if now.saturating_sub(*at_ms) > PROBE_MAX_AGE_MS {
                return Ok(());
            }
            let body = Body::Probe {
                endpoint: endpoint.to_string(),
                model: model.to_string(),
                ok: *ok,
                latency_ms: *latency_ms,
            };
            (None, unix_of(*at_ms, now, unix), body)
        }
    };
    let msg = serde_json::to_string(&Wire { from: sh.replica.clone(), at, body }).map_err(|e| e.to_string())?;
    match key {
        Some(key) => {
            seen.insert(key.clone(), Version { at_unix_ms: at, from: sh.replica.clone() });
            let mut inv = PUBLISH.key(key);
            inv.arg(at).arg(&sh.replica).arg(&msg).arg(sh.channel()).arg(FACT_TTL_MS);
            let call = inv.invoke_async::<i64>(conn);
            sh.call(call).await.map(|_| ())
        }
        None => sh.call(redis::cmd("PUBLISH").arg(sh.channel()).arg(&msg).query_async::<i64>(conn)).await.map(|_| ()),
    }
}

/// Apply one message from another replica (own messages, stale ones and unknown names are ignored).
fn apply(gw: &Gateway, sh: &Redis, seen: &mut HashMap<String, Version>, text: &str) {
    let Ok(w) = serde_json::from_str::<Wire>(text) else {
        tracing::debug!("a message on the shared channel was not understood");
        return;
    };
    if w.from == sh.replica {
        return;
    }
    let rt = gw.runtime();
    let (now, unix) = (gw.now_ms(), crate::clock::unix_ms());
    match w.body {
        Body::Breaker { endpoint, model, state, retry_at } => {
            let key = sh.pair_key(&endpoint, &model);
            if !accept(seen.get(&key), &sh.replica, w.at, &w.from) {
                return;
            }
            seen.insert(key, Version { at_unix_ms: w.at, from: w.from });
            let Some((_, pair)) = rt.pairs().find(|(e, p)| e.cfg.name == endpoint && p.model() == model) else {
                return;
            };
            match state {
                BreakerState::Open => {
                    if let Some(t) = local_deadline(retry_at, unix, now) {
                        pair.apply_remote_breaker(BreakerState::Open, t, &rt.policy, now);
                    }
                }
                BreakerState::Closed => pair.apply_remote_breaker(BreakerState::Closed, 0, &rt.policy, now),
                BreakerState::HalfOpen => {}
            }
        }
        Body::Drain { endpoint, enabled } => {
            let key = sh.drain_key(&endpoint);
            if !accept(seen.get(&key), &sh.replica, w.at, &w.from) {
                return;
            }
            seen.insert(key, Version { at_unix_ms: w.at, from: w.from });
            if let Some(e) = rt.endpoints.iter().find(|e| e.cfg.name == endpoint) {
                if e.enabled() != enabled {
                    e.set_enabled(enabled, &gw.changes);
                    tracing::warn!(endpoint = %endpoint, enabled, "endpoint {} by another replica", if enabled { "enabled" } else { "drained" });
                }
            }
        }
        Body::Probe { endpoint, model, ok, latency_ms } => {
            if unix.saturating_sub(w.at) > PROBE_MAX_AGE_MS as i64 {
                return;
            }
            let Some((e, pair)) = rt.pairs().find(|(e, p)| e.cfg.name == endpoint && p.model() == model) else {
                return;
            };
            let latency = if latency_ms.is_finite() && latency_ms >= 0.0 { latency_ms } else { 0.0 };
            let outcome = if ok { Outcome::Success(latency) } else { Outcome::Failure(latency) };
            pair.answered();
            pair.record(&rt.policy, outcome, now, Source::Probe, e.keys.has_usable(), now);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_are_tagged_json() {
        let w = Wire {
            from: "r1".into(),
            at: 5,
            body: Body::Breaker { endpoint: "e".into(), model: "m".into(), state: BreakerState::Open, retry_at: 9 },
        };
        let text = serde_json::to_string(&w).unwrap();
        assert_eq!(
            text,
            r#"{"from":"r1","at":5,"kind":"breaker","endpoint":"e","model":"m","state":"open","retry_at":9}"#
        );
        let back: Wire = serde_json::from_str(&text).unwrap();
        assert!(matches!(back.body, Body::Breaker { state: BreakerState::Open, retry_at: 9, .. }));
        let d: Wire =
            serde_json::from_str(r#"{"from":"r2","at":1,"kind":"drain","endpoint":"e","enabled":false}"#).unwrap();
        assert!(matches!(d.body, Body::Drain { enabled: false, .. }));
    }

    #[test]
    fn replica_ids_differ() {
        assert_ne!(replica_id(), replica_id());
    }
}
