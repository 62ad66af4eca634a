//! Counters shared among replicas through Redis (`[state] backend = "redis"`): budget spend and client rpm /
//! tpm, so N replicas together hold one budget's `limit_usd` and one client's limits.
//!
//! **What it must not do:** stand in any request's way. Every replica keeps deciding from its own
//! [`Ledger`](sheepdog_policy::budget::Ledger)s and token buckets; this task, every [`FLUSH_EVERY`], takes what
//! settled or was admitted here since the last flush (`take_unshared`, under the same short locks the request
//! path uses, never across an await), adds it to the fleet's counters in one pipelined, atomic round trip
//! under `[state] timeout`, and applies the answer: a budget's spend becomes the fleet's total
//! (`Ledger::sync_fleet`), and a client's buckets are charged with what the *other* replicas used since the
//! last flush (`Limits::charge_remote`). While Redis is unreachable the deltas stay in the ledgers and
//! buckets, counting locally, and are sent when it returns. A flush that timed out may have reached Redis
//! all the same: it is sent again unchanged under its sequence number, and a script applies each number
//! once.
//!
//! In Redis (under `key_prefix` P): `P:budget:NAME:PERIODSTART` (settled nano-dollars of the period, expiring
//! a day after it ends) and `P:rl:CLIENT:req:MINUTE` / `P:rl:CLIENT:tok:MINUTE` (requests and net tokens
//! admitted in the Unix minute, expiring after 120 s), and `P:flushed:REPLICA` (the last flush applied).

use std::collections::HashMap;
use std::sync::{Arc, LazyLock};
use std::time::Duration;

use sheepdog_policy::pricing::Nanos;
use tokio::sync::watch;

use super::Redis;
use crate::gateway::Gateway;
use crate::state::budgets::period;

/// How often the counters are flushed (the overshoot bound of ARCHITECTURE.md is in these).
pub const FLUSH_EVERY: Duration = Duration::from_millis(100);
/// How long a rate-limit window's counter lives.
const WINDOW_TTL_S: i64 = 120;
const DAY_MS: i64 = 86_400_000;

/// Adds one flush's deltas unless this replica's flush of that sequence number was applied already (a call
/// that timed out may still have reached Redis: sent again, it must not count twice); returns the totals.
/// KEYS: the replica's last-applied key, then the counters; ARGV: sequence, its ttl, then delta and ttl (ms)
/// per counter.
static ADD: LazyLock<redis::Script> = LazyLock::new(|| {
    redis::Script::new(
        r"local last = tonumber(redis.call('GET', KEYS[1]) or '0')
local fresh = tonumber(ARGV[1]) > last
if fresh then redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2]) end
local out = {}
for i = 2, #KEYS do
  if fresh then
    out[i - 1] = redis.call('INCRBY', KEYS[i], ARGV[2 * i - 1])
    redis.call('PEXPIRE', KEYS[i], ARGV[2 * i])
  else
    out[i - 1] = tonumber(redis.call('GET', KEYS[i]) or '0')
  end
end
return out",
    )
});

/// One flush's deltas, kept (and sent again, unchanged) until Redis has answered for them.
struct Batch {
    seq: u64,
    /// (budget, period start, nano-dollars, key, ttl ms).
    budgets: Vec<(String, i64, u64, String, i64)>,
    /// (client, minute, requests, tokens).
    clients: Vec<(String, i64, i64, i64)>,
}

/// The flusher's state: the batch Redis has not answered for, and the fleet's rate-limit totals last read
/// (client → (minute, requests, tokens)).
#[derive(Default)]
struct Flusher {
    seq: u64,
    batch: Option<Batch>,
    seen: HashMap<String, (i64, i64, i64)>,
}

/// The flusher's task (started by `shared::run`); ends when `shutdown` turns true.
pub async fn run(gw: Arc<Gateway>, sh: Arc<Redis>, mut shutdown: watch::Receiver<bool>) {
    let mut f = Flusher::default();
    let mut tick = tokio::time::interval(FLUSH_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = shutdown.changed() => return,
        }
        if sh.connected() {
            flush(&gw, &sh, &mut f).await;
        }
    }
}

/// Take this replica's deltas since the last batch out of the ledgers and buckets.
fn collect(gw: &Gateway, sh: &Redis, seq: u64) -> Batch {
    let rt = gw.runtime();
    let unix = crate::clock::unix_ms();
    let minute = unix.div_euclid(60_000);
    let mut batch = Batch { seq, budgets: Vec::new(), clients: Vec::new() };
    for b in &rt.budgets {
        let (start, d) = b.ledger.lock().take_unshared(unix);
        let end = period(b.cfg.period).bounds(start).1;
        let key = format!("{}:budget:{}:{start}", sh.prefix, b.cfg.name);
        batch.budgets.push((b.cfg.name.clone(), start, d.0, key, (end - unix).max(0) + DAY_MS));
    }
    for c in rt.clients.iter() {
        let mut l = c.live.limits.lock();
        if l.is_limited() {
            let (r, t) = l.take_unshared();
            batch.clients.push((c.cfg.name.clone(), minute, r, t));
        }
    }
    batch
}

/// One flush: the batch still unanswered, or a new one (while a batch is unanswered, new deltas stay in the
/// ledgers and buckets, where they count locally); then apply the fleet's totals.
async fn flush(gw: &Gateway, sh: &Redis, f: &mut Flusher) {
    if f.batch.is_none() {
        f.seq += 1;
        let b = collect(gw, sh, f.seq);
        if b.budgets.is_empty() && b.clients.is_empty() {
            return;
        }
        f.batch = Some(b);
    }
    let Some(batch) = f.batch.as_ref() else { return };
    let Some(mut conn) = sh.conn.lock().clone() else { return };
    let mut inv = ADD.prepare_invoke();
    inv.key(format!("{}:flushed:{}", sh.prefix, sh.replica)).arg(batch.seq).arg(DAY_MS);
    for (_, _, delta, key, ttl) in &batch.budgets {
        inv.key(key).arg(i64::try_from(*delta).unwrap_or(i64::MAX)).arg(*ttl);
    }
    for (name, minute, r, t) in &batch.clients {
        for (what, n) in [("req", r), ("tok", t)] {
            inv.key(format!("{}:rl:{name}:{what}:{minute}", sh.prefix)).arg(*n).arg(WINDOW_TTL_S * 1000);
        }
    }
    let totals: Vec<i64> = match sh.call(inv.invoke_async(&mut conn)).await {
        Ok(t) => t,
        Err(e) => {
            tracing::debug!(error = %e, "shared counters not flushed; they stay local until Redis answers");
            return;
        }
    };
    let Some(batch) = f.batch.take() else { return };
    if totals.len() != batch.budgets.len() + 2 * batch.clients.len() {
        return;
    }
    let rt = gw.runtime();
    let unix = crate::clock::unix_ms();
    for (i, (name, start, delta, _, _)) in batch.budgets.iter().enumerate() {
        let Some(b) = rt.budgets.iter().find(|b| &b.cfg.name == name) else { continue };
        let total = Nanos(u64::try_from(totals[i]).unwrap_or(0));
        let mut l = b.ledger.lock();
        let crossed = l.sync_fleet(&b.thresholds, *start, total, Nanos(*delta), unix);
        b.publish(&mut l, unix);
        let spent = l.spent(unix);
        drop(l);
        gw.announce_crossings(b, &crossed, spent, true);
    }
    let now = gw.now_ms();
    let n = batch.budgets.len();
    for (j, (name, minute, r, t)) in batch.clients.iter().enumerate() {
        let (req, tok) = (totals[n + 2 * j], totals[n + 2 * j + 1]);
        let (seen_req, seen_tok) = match f.seen.get(name.as_str()) {
            Some((m, r, t)) if m == minute => (*r, *t),
            _ => (0, 0),
        };
        f.seen.insert(name.clone(), (*minute, req, tok));
        let others = ((req - seen_req - r).max(0), tok - seen_tok - t);
        if others == (0, 0) {
            continue;
        }
        if let Some(c) = rt.clients.iter().find(|c| &c.cfg.name == name) {
            c.live.limits.lock().charge_remote(others.0, others.1, now);
        }
    }
}
