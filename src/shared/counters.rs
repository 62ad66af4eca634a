//! Counters shared among replicas through Redis (`[state] backend = "redis"`): budget spend and client rpm /
//! tpm, so N replicas together hold one budget's `limit_usd` and one client's limits.
//!
//! **What it must not do:** stand in any request's way. Every replica keeps deciding from its own
//! [`Ledger`](sheepdog_policy::budget::Ledger)s and token buckets; this task, every [`FLUSH_EVERY`], takes what
//! settled or was admitted here since the last flush (`take_unshared`, under the same short locks the request
//! path uses, never across an await), adds it to the fleet's counters in one pipelined, atomic round trip
//! under `[state] timeout`, and applies the answer: a budget's spend becomes the fleet's total
//! (`Ledger::sync_fleet`), and a client's buckets are charged with what the *other* replicas used since the
//! last flush (`Limits::charge_remote`). While Redis is unreachable the deltas accumulate here and counting
//! stays local; they are sent when it returns.
//!
//! In Redis (under `key_prefix` P): `P:budget:NAME:PERIODSTART` (settled nano-dollars of the period, expiring
//! a day after it ends) and `P:rl:CLIENT:req:MINUTE` / `P:rl:CLIENT:tok:MINUTE` (requests and net tokens
//! admitted in the Unix minute, expiring after 120 s).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use sheepdog_policy::budget::Crossing;
use sheepdog_policy::pricing::Nanos;
use tokio::sync::watch;

use super::Redis;
use crate::gateway::Gateway;
use crate::state::budgets::{period, Budget};

/// How often the counters are flushed (the overshoot bound of ARCHITECTURE.md is in these).
pub const FLUSH_EVERY: Duration = Duration::from_millis(100);
/// How long a rate-limit window's counter lives.
const WINDOW_TTL_S: i64 = 120;
const DAY_MS: i64 = 86_400_000;

/// What one replica has not yet had acknowledged by Redis, and what it last saw there.
#[derive(Default)]
struct Unsent {
    /// Settled spend by (budget, period start): (nano-dollars, period end).
    budgets: HashMap<(String, i64), (u64, i64)>,
    /// By client name.
    clients: HashMap<String, ClientCount>,
}

#[derive(Default)]
struct ClientCount {
    /// Requests and net tokens taken here and not yet counted in Redis.
    pending: (i64, i64),
    /// The fleet's totals last read: (minute, requests, tokens).
    seen: Option<(i64, i64, i64)>,
}

/// The flusher's task (started by `shared::run`); ends when `shutdown` turns true.
pub async fn run(gw: Arc<Gateway>, sh: Arc<Redis>, mut shutdown: watch::Receiver<bool>) {
    let mut unsent = Unsent::default();
    let mut tick = tokio::time::interval(FLUSH_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = shutdown.changed() => return,
        }
        flush(&gw, &sh, &mut unsent).await;
    }
}

/// One flush: collect local deltas, and when Redis is reachable send them and apply the fleet's totals.
async fn flush(gw: &Gateway, sh: &Redis, unsent: &mut Unsent) {
    let rt = gw.runtime();
    let unix = crate::clock::unix_ms();
    for b in &rt.budgets {
        let (start, d) = b.ledger.lock().take_unshared(unix);
        let end = period(b.cfg.period).bounds(start).1;
        unsent.budgets.entry((b.cfg.name.clone(), start)).or_insert((0, end)).0 += d.0;
    }
    let mut limited = Vec::new();
    for c in rt.clients.iter() {
        let mut l = c.live.limits.lock();
        if !l.is_limited() {
            continue;
        }
        let (r, t) = l.take_unshared();
        drop(l);
        let e = unsent.clients.entry(c.cfg.name.clone()).or_default();
        e.pending = (e.pending.0 + r, e.pending.1 + t);
        limited.push(c.clone());
    }
    if unsent.budgets.is_empty() && limited.is_empty() {
        return;
    }
    let Some(mut conn) = sh.conn.lock().clone().filter(|_| sh.connected()) else { return };
    let budgets: Vec<((String, i64), (u64, i64))> = unsent.budgets.iter().map(|(k, v)| (k.clone(), *v)).collect();
    let minute = unix.div_euclid(60_000);
    let mut pipe = redis::pipe();
    pipe.atomic();
    for ((name, start), (delta, end)) in &budgets {
        let key = format!("{}:budget:{name}:{start}", sh.prefix);
        let ttl = (end - unix).max(0) + DAY_MS;
        pipe.cmd("INCRBY").arg(&key).arg(i64::try_from(*delta).unwrap_or(i64::MAX));
        pipe.cmd("PEXPIRE").arg(&key).arg(ttl).ignore();
    }
    for c in &limited {
        let pending = unsent.clients.get(c.cfg.name.as_str()).map(|e| e.pending).unwrap_or_default();
        for (what, n) in [("req", pending.0), ("tok", pending.1)] {
            let key = format!("{}:rl:{}:{what}:{minute}", sh.prefix, c.cfg.name);
            pipe.cmd("INCRBY").arg(&key).arg(n);
            pipe.cmd("EXPIRE").arg(&key).arg(WINDOW_TTL_S).ignore();
        }
    }
    let totals: Vec<i64> = match sh.call(pipe.query_async(&mut conn)).await {
        Ok(t) => t,
        Err(e) => {
            tracing::debug!(error = %e, "shared counters not flushed; they stay local until Redis answers");
            return;
        }
    };
    if totals.len() != budgets.len() + 2 * limited.len() {
        return;
    }
    // Counted in Redis: what was pending is not sent again.
    let unix = crate::clock::unix_ms();
    for (i, ((name, start), (delta, _))) in budgets.iter().enumerate() {
        let key = (name.clone(), *start);
        if let Some(v) = unsent.budgets.get_mut(&key) {
            v.0 -= delta;
        }
        let Some(b) = rt.budgets.iter().find(|b| &b.cfg.name == name) else { continue };
        let total = Nanos(u64::try_from(totals[i]).unwrap_or(0));
        let mut l = b.ledger.lock();
        let crossed = l.sync_fleet(&b.thresholds, *start, total, Nanos(*delta), unix);
        b.publish(&mut l, unix);
        let spent = l.spent(unix);
        drop(l);
        announce(gw, b, &crossed, spent);
    }
    // Entries of periods that are over (or budgets removed) go once they are sent.
    unsent.budgets.retain(|(name, start), (d, _)| {
        *d > 0 || rt.budgets.iter().any(|b| &b.cfg.name == name && b.ledger.lock().period_start_ms() == *start)
    });
    let now = gw.now_ms();
    for (j, c) in limited.iter().enumerate() {
        let (req, tok) = (totals[budgets.len() + 2 * j], totals[budgets.len() + 2 * j + 1]);
        let Some(e) = unsent.clients.get_mut(c.cfg.name.as_str()) else { continue };
        let own = e.pending;
        let (seen_req, seen_tok) = match e.seen {
            Some((m, r, t)) if m == minute => (r, t),
            _ => (0, 0),
        };
        let others = ((req - seen_req - own.0).max(0), tok - seen_tok - own.1);
        e.pending = (0, 0);
        e.seen = Some((minute, req, tok));
        if others != (0, 0) {
            c.live.limits.lock().charge_remote(others.0, others.1, now);
        }
    }
}

/// Announce thresholds the fleet's spend crossed through this replica's addition (as the pipeline does for a
/// crossing it sees first): a warning, the metric and the webhook.
fn announce(gw: &Gateway, b: &Budget, crossed: &[Crossing], spent: Nanos) {
    for c in crossed {
        tracing::warn!(
            budget = b.name(),
            threshold = c.as_str(),
            spent_usd = spent.usd(),
            "budget threshold crossed by the fleet"
        );
        gw.metrics.budgets.crossing(b.name(), c.as_str());
        if let Some(url) = &b.cfg.webhook {
            let body = serde_json::json!({
                "budget": b.name(),
                "threshold": c.as_str(),
                "spent_usd": spent.usd(),
                "period": b.cfg.period.name(),
            });
            crate::upstream::webhook::post(url, body.to_string(), gw.metrics.webhook_failures.clone());
        }
    }
}
