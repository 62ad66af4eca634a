//! Budgets of a snapshot: each budget's thresholds, filters and live [`Ledger`] (spend and reservations of the
//! current UTC period), carried over a reload while its name and period stay.
//!
//! The decisions are the policy crate's ([`sheepdog_policy::budget`]); this module holds ledgers under short
//! locks, applies a budget's model and client filters, and rebuilds spend from the request log at start. It
//! does no network I/O (crossings are announced, webhook included, by `Gateway::announce_crossings`).

use std::sync::Arc;

use parking_lot::Mutex;
use sheepdog_policy::budget::{Crossing, Decision, Ledger, Level, Period, Thresholds};
use sheepdog_policy::pricing::Nanos;

use crate::config::{self, BudgetConfig};
use crate::metrics::{BudgetGauges, BudgetMetrics};

/// One budget in a snapshot.
pub struct Budget {
    /// Its configuration.
    pub cfg: BudgetConfig,
    /// Its thresholds in nano-dollars.
    pub thresholds: Thresholds,
    /// The period's money (shared with the previous snapshot's budget of the same name and period).
    pub ledger: Arc<Mutex<Ledger>>,
    /// `budget:NAME`, the route reason of a downgrade.
    pub reason: Arc<str>,
    /// Its gauges.
    gauges: BudgetGauges,
}

/// The policy crate's period of a configured one.
pub fn period(p: config::Period) -> Period {
    match p {
        config::Period::Day => Period::Day,
        config::Period::Month => Period::Month,
    }
}

impl Budget {
    /// Whether a request for (or served by) `model`, from `client`, counts in this budget.
    pub fn applies(&self, model: &str, client: Option<&str>) -> bool {
        (self.cfg.models.is_empty() || self.cfg.models.iter().any(|m| m == model))
            && (self.cfg.clients.is_empty() || client.is_some_and(|c| self.cfg.clients.iter().any(|x| x == c)))
    }

    /// Decide a request estimated at `estimate` ([`Ledger::admit`]); the gauges follow.
    pub fn admit(&self, estimate: Nanos, can_downgrade: bool, unix_ms: i64) -> Decision {
        let mut l = self.ledger.lock();
        let d = l.admit(&self.thresholds, estimate, can_downgrade, unix_ms);
        self.publish(&mut l, unix_ms);
        d
    }

    /// Settle a request that reserved `reserved` and cost `cost` ([`Ledger::settle`]): the thresholds newly
    /// crossed, and the period's spend after it.
    pub fn settle(&self, reserved: Nanos, cost: Nanos, unix_ms: i64) -> (Vec<Crossing>, Nanos) {
        let mut l = self.ledger.lock();
        let crossed = l.settle(&self.thresholds, reserved, cost, unix_ms);
        self.publish(&mut l, unix_ms);
        (crossed, l.spent(unix_ms))
    }

    /// Settled spend this period and its level (for `/api/stats` and the dashboard).
    pub fn state(&self, unix_ms: i64) -> (Nanos, Level) {
        let mut l = self.ledger.lock();
        (l.spent(unix_ms), l.level(&self.thresholds, unix_ms))
    }

    /// The gauges' budget label.
    pub fn name(&self) -> &str {
        &self.cfg.name
    }

    /// Refresh the spend gauges from the ledger.
    pub fn publish(&self, ledger: &mut Ledger, unix_ms: i64) {
        let spent = ledger.spent(unix_ms);
        self.gauges.spent.set(spent.usd());
        self.gauges.reserved.set(ledger.reserved().usd());
        if let (Some(r), Some(l)) = (&self.gauges.remaining, self.thresholds.limit) {
            r.set(l.saturating_sub(spent).usd());
        }
    }
}

/// The thresholds of a configured budget.
pub fn thresholds(b: &BudgetConfig) -> Thresholds {
    Thresholds {
        warn: b.warn_usd.map(Nanos::from_usd),
        downgrade: b.downgrade_usd.map(Nanos::from_usd),
        limit: b.limit_usd.map(Nanos::from_usd),
    }
}

/// Build a snapshot's budgets: ledgers of budgets whose name and period stay are carried over.
pub fn build(cfgs: &[BudgetConfig], old: &[Arc<Budget>], unix_ms: i64, metrics: &BudgetMetrics) -> Vec<Arc<Budget>> {
    cfgs.iter()
        .map(|b| {
            let ledger = old
                .iter()
                .find(|o| o.cfg.name == b.name && o.cfg.period == b.period)
                .map(|o| o.ledger.clone())
                .unwrap_or_else(|| Arc::new(Mutex::new(Ledger::new(period(b.period), unix_ms))));
            let budget = Budget {
                cfg: b.clone(),
                thresholds: thresholds(b),
                ledger,
                reason: Arc::from(format!("budget:{}", b.name)),
                gauges: metrics.gauges(&b.name, b.limit_usd),
            };
            let mut l = budget.ledger.lock();
            budget.publish(&mut l, unix_ms);
            drop(l);
            Arc::new(budget)
        })
        .collect()
}

/// Resume every budget's period from the request log: `spend(start_ms)` gives the spend by (served model,
/// client) since a period start (read once per distinct start). Thresholds already past are not announced
/// again.
pub fn resume(budgets: &[Arc<Budget>], unix_ms: i64, mut spend: impl FnMut(i64) -> Vec<crate::log::Spend>) {
    let mut read: Vec<(i64, Vec<crate::log::Spend>)> = Vec::new();
    for b in budgets {
        let p = period(b.cfg.period);
        let (start, _) = p.bounds(unix_ms);
        if !read.iter().any(|(s, _)| *s == start) {
            read.push((start, spend(start)));
        }
        let rows = &read.iter().find(|(s, _)| *s == start).map(|(_, r)| r).expect("just read");
        let spent: u64 = rows
            .iter()
            .filter(|r| r.served_model.as_deref().is_some_and(|m| b.applies(m, r.client.as_deref())))
            .map(|r| r.nanos)
            .sum();
        let mut l = b.ledger.lock();
        *l = Ledger::resumed(p, unix_ms, Nanos(spent), &b.thresholds);
        b.publish(&mut l, unix_ms);
        drop(l);
        if spent > 0 {
            tracing::info!(budget = b.name(), spent_usd = Nanos(spent).usd(), "budget resumed from the request log");
        }
    }
}
