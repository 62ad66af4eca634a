//! Budget metrics: `sheepdog_budget_spent_usd{budget}` (contract), and `sheepdog_budget_limit_usd`,
//! `sheepdog_budget_remaining_usd`, `sheepdog_budget_reserved_usd` and
//! `sheepdog_budget_threshold_crossings_total{budget, threshold}`. Budget names come from configuration
//! only. Makes no decisions.

use prometheus::{Gauge, GaugeVec, IntCounterVec, Opts, Registry};

use super::must;

/// The budget families.
pub struct BudgetMetrics {
    spent: GaugeVec,
    reserved: GaugeVec,
    limit: GaugeVec,
    remaining: GaugeVec,
    crossings: IntCounterVec,
}

/// One budget's gauges.
pub struct BudgetGauges {
    /// Spent this period, USD.
    pub spent: Gauge,
    /// Reserved by requests in flight, USD.
    pub reserved: Gauge,
    /// `limit_usd − spent` (only for budgets with a limit), USD.
    pub remaining: Option<Gauge>,
}

impl BudgetMetrics {
    /// Register the families.
    pub fn new(registry: &Registry) -> BudgetMetrics {
        let g = |name: &str, help: &str| {
            let v = must(GaugeVec::new(Opts::new(name, help), &["budget"]));
            must(registry.register(Box::new(v.clone())));
            v
        };
        let crossings = must(IntCounterVec::new(
            Opts::new(
                "sheepdog_budget_threshold_crossings_total",
                "Budget thresholds crossed (warn, downgrade, limit), once per crossing and period.",
            ),
            &["budget", "threshold"],
        ));
        must(registry.register(Box::new(crossings.clone())));
        BudgetMetrics {
            spent: g("sheepdog_budget_spent_usd", "Spent in the budget's current period (UTC day or month), USD."),
            reserved: g("sheepdog_budget_reserved_usd", "Reserved by requests in flight against the budget, USD."),
            limit: g("sheepdog_budget_limit_usd", "The budget's limit_usd (requests get 429 budget_exceeded past it)."),
            remaining: g("sheepdog_budget_remaining_usd", "limit_usd minus what was spent this period, USD."),
            crossings,
        }
    }

    /// The gauges of budget `name` (with limit `limit_usd`), created on first use.
    pub fn gauges(&self, name: &str, limit_usd: Option<f64>) -> BudgetGauges {
        let l = [name];
        match limit_usd {
            Some(x) => self.limit.with_label_values(&l).set(x),
            None => {
                let _ = self.limit.remove_label_values(&l);
                let _ = self.remaining.remove_label_values(&l);
            }
        }
        for t in ["warn", "downgrade", "limit"] {
            self.crossings.with_label_values(&[name, t]);
        }
        BudgetGauges {
            spent: self.spent.with_label_values(&l),
            reserved: self.reserved.with_label_values(&l),
            remaining: limit_usd.map(|_| self.remaining.with_label_values(&l)),
        }
    }

    /// Count a crossing of `threshold` (`warn`, `downgrade` or `limit`).
    pub fn crossing(&self, name: &str, threshold: &str) {
        self.crossings.with_label_values(&[name, threshold]).inc();
    }

    /// Remove every series of a budget a reload removed.
    pub fn remove(&self, name: &str) {
        let l = [name];
        for v in [&self.spent, &self.reserved, &self.limit, &self.remaining] {
            let _ = v.remove_label_values(&l);
        }
        for t in ["warn", "downgrade", "limit"] {
            let _ = self.crossings.remove_label_values(&[name, t]);
        }
    }
}
