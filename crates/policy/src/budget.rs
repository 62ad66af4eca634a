//! Budgets: how much a period may spend, and what a request meets when it arrives.
//!
//! A [`Ledger`] holds one budget's money for the current UTC period: what finished requests `spent`, and what
//! requests in flight `reserved` at admission (an estimate of their cost). A request is decided against
//! `spent + reserved`, so concurrent requests see each other before any of them is settled: the answer to
//! "50 requests arrive at once at $499.99 of $500" is one or two admitted, not fifty.
//!
//! **Worst-case overshoot** of `limit_usd`: a request is admitted only when `spent + reserved + estimate <=
//! limit`, and settled at its real cost, so the limit is passed only by what requests in flight cost *beyond
//! their estimate*. The estimate of a chat request is its prompt (estimated tokens at the input price) plus its
//! `max_tokens` (or the gateway's default completion reservation when it sets none) at the output price, so a
//! request that sets `max_tokens` cannot exceed it by more than the prompt estimate's error; one that does not
//! can exceed it by its completion beyond the default. The bound is therefore
//! `Σ over requests in flight of max(0, cost − estimate)` — zero when every client sets `max_tokens` and the
//! prompt estimate is not below the real count.
//!
//! Thresholds are crossed once per period: [`Ledger::settle`] reports each threshold that the *spent* amount
//! crossed upward (for the log line, the metric and the webhook), and a new period starts from zero.
//!
//! Shared among replicas (`[state] backend = "redis"`), a ledger hands its newly settled spend to the fleet
//! ([`Ledger::take_unshared`]) and takes the fleet's total back ([`Ledger::sync_fleet`]); reservations stay local.
//!
//! Pure: the caller passes the wall clock (`unix_ms`) for periods and holds the ledger behind its own lock.

use crate::pricing::Nanos;

/// A budget's accounting period on the UTC calendar.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Period {
    /// 00:00 UTC to 00:00 UTC.
    Day,
    /// The first of the month 00:00 UTC to the first of the next.
    Month,
}

const DAY_MS: i64 = 86_400_000;

/// Days since 1970-01-01 of a civil date (proleptic Gregorian; Howard Hinnant's algorithm).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = if y >= 0 { y } else { y - 399 } / 400;
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// The civil (year, month) of a day number.
fn civil_from_days(z: i64) -> (i64, i64) {
    let z = z + 719_468;
    let era = if z >= 0 { z } else { z - 146_096 } / 146_097;
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m)
}

impl Period {
    /// The period containing `unix_ms`: its start and end (exclusive), Unix milliseconds.
    pub fn bounds(self, unix_ms: i64) -> (i64, i64) {
        let day = unix_ms.div_euclid(DAY_MS);
        match self {
            Period::Day => (day * DAY_MS, (day + 1) * DAY_MS),
            Period::Month => {
                let (y, m) = civil_from_days(day);
                let start = days_from_civil(y, m, 1);
                let (ny, nm) = if m == 12 { (y + 1, 1) } else { (y, m + 1) };
                (start * DAY_MS, days_from_civil(ny, nm, 1) * DAY_MS)
            }
        }
    }
}

/// A budget's thresholds (each optional; validated in order warn <= downgrade <= limit).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Thresholds {
    /// Log, count and post once when spent crosses it.
    pub warn: Option<Nanos>,
    /// From here on, costlier models are served by the downgrade model.
    pub downgrade: Option<Nanos>,
    /// From here on, requests are refused.
    pub limit: Option<Nanos>,
}

/// Where a budget stands, as `/api/stats` reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Level {
    /// Below every threshold.
    Ok,
    /// At or past `warn`.
    Warn,
    /// At or past `downgrade`.
    Downgrade,
    /// At or past `limit`.
    Block,
}

impl Level {
    /// `ok`, `warn`, `downgrade` or `block`.
    pub fn as_str(self) -> &'static str {
        match self {
            Level::Ok => "ok",
            Level::Warn => "warn",
            Level::Downgrade => "downgrade",
            Level::Block => "block",
        }
    }
}

impl Thresholds {
    /// The level of an amount.
    pub fn level(&self, amount: Nanos) -> Level {
        let past = |t: Option<Nanos>| t.is_some_and(|t| amount >= t);
        if past(self.limit) {
            Level::Block
        } else if past(self.downgrade) {
            Level::Downgrade
        } else if past(self.warn) {
            Level::Warn
        } else {
            Level::Ok
        }
    }
}

/// A threshold that spend crossed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Crossing {
    /// `warn_usd`.
    Warn,
    /// `downgrade_usd`.
    Downgrade,
    /// `limit_usd`.
    Limit,
}

impl Crossing {
    /// `warn`, `downgrade` or `limit` (the webhook's `threshold`).
    pub fn as_str(self) -> &'static str {
        match self {
            Crossing::Warn => "warn",
            Crossing::Downgrade => "downgrade",
            Crossing::Limit => "limit",
        }
    }
}

/// What a budget says to a request that would cost about `estimate`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Go on; `estimate` is now reserved (settle it with [`Ledger::settle`]).
    Admit,
    /// Serve it with the cheaper model instead (decide again with that model's estimate).
    Downgrade,
    /// Refuse it until the period ends, `retry_after_s` from now.
    Block {
        /// Seconds until the period resets.
        retry_after_s: u64,
    },
}

/// One budget's money in the current period.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ledger {
    period: Period,
    /// Start of the current period (Unix ms).
    start_ms: i64,
    end_ms: i64,
    spent: Nanos,
    reserved: Nanos,
    /// Thresholds already crossed by `spent` this period.
    crossed: [bool; 3],
    /// Spend settled here this period and not yet handed to the fleet ([`Ledger::take_unshared`]).
    unshared: Nanos,
}

impl Ledger {
    /// An empty ledger for the period containing `unix_ms`.
    pub fn new(period: Period, unix_ms: i64) -> Ledger {
        let (start_ms, end_ms) = period.bounds(unix_ms);
        Ledger {
            period,
            start_ms,
            end_ms,
            spent: Nanos::ZERO,
            reserved: Nanos::ZERO,
            crossed: [false; 3],
            unshared: Nanos::ZERO,
        }
    }

    /// A ledger that already spent `spent` this period (rebuilt from the request log at start), with the
    /// thresholds it is past marked as crossed, so a restart does not announce them again.
    pub fn resumed(period: Period, unix_ms: i64, spent: Nanos, t: &Thresholds) -> Ledger {
        let mut l = Ledger::new(period, unix_ms);
        l.spent = spent;
        l.crossed = [t.warn, t.downgrade, t.limit].map(|x| x.is_some_and(|x| spent >= x));
        l
    }

    /// Start a new period when `unix_ms` is past this one. Reservations of requests still in flight are kept:
    /// they settle into the period they finish in.
    fn roll(&mut self, unix_ms: i64) {
        if unix_ms >= self.end_ms || unix_ms < self.start_ms {
            let (s, e) = self.period.bounds(unix_ms);
            self.start_ms = s;
            self.end_ms = e;
            self.spent = Nanos::ZERO;
            self.unshared = Nanos::ZERO;
            self.crossed = [false; 3];
        }
    }

    /// Money settled this period.
    pub fn spent(&mut self, unix_ms: i64) -> Nanos {
        self.roll(unix_ms);
        self.spent
    }

    /// Money reserved by requests in flight.
    pub fn reserved(&self) -> Nanos {
        self.reserved
    }

    /// Start of the current period, Unix ms.
    pub fn period_start_ms(&self) -> i64 {
        self.start_ms
    }

    /// The level of settled spend (what `/api/stats` shows).
    pub fn level(&mut self, t: &Thresholds, unix_ms: i64) -> Level {
        self.roll(unix_ms);
        t.level(self.spent)
    }

    /// Decide a request that would cost about `estimate`, given whether a cheaper model could serve it
    /// (`can_downgrade`: the budget has a downgrade model and the request's model costs more). On
    /// [`Decision::Admit`] the estimate is reserved. A request that costs nothing is always admitted.
    pub fn admit(&mut self, t: &Thresholds, estimate: Nanos, can_downgrade: bool, unix_ms: i64) -> Decision {
        self.roll(unix_ms);
        if estimate == Nanos::ZERO {
            return Decision::Admit;
        }
        let committed = self.spent.saturating_add(self.reserved);
        let over_limit = t.limit.is_some_and(|l| committed.saturating_add(estimate) > l);
        // A request that would pass the limit on its model is better served by the cheaper one than refused.
        if can_downgrade && (over_limit || t.downgrade.is_some_and(|d| committed >= d)) {
            return Decision::Downgrade;
        }
        if over_limit {
            let retry_after_s = ((self.end_ms - unix_ms).max(0) as u64).div_ceil(1000).max(1);
            return Decision::Block { retry_after_s };
        }
        self.reserved = self.reserved.saturating_add(estimate);
        Decision::Admit
    }

    /// Add a cost that was never reserved (a request this budget did not decide, e.g. a fallback model the
    /// budget counts). Returns the thresholds newly crossed.
    pub fn charge(&mut self, t: &Thresholds, cost: Nanos, unix_ms: i64) -> Vec<Crossing> {
        self.settle(t, Nanos::ZERO, cost, unix_ms)
    }

    /// A request that reserved `reserved` at admission finished having cost `cost` (zero if it failed). Returns
    /// the thresholds that settled spend crossed upward, each once per period.
    pub fn settle(&mut self, t: &Thresholds, reserved: Nanos, cost: Nanos, unix_ms: i64) -> Vec<Crossing> {
        self.roll(unix_ms);
        self.reserved = self.reserved.saturating_sub(reserved);
        self.spent = self.spent.saturating_add(cost);
        self.unshared = self.unshared.saturating_add(cost);
        let mut out = Vec::new();
        for (i, (thr, c)) in Self::levels(t).iter().enumerate() {
            if !self.crossed[i] && thr.is_some_and(|x| self.spent >= x) {
                self.crossed[i] = true;
                out.push(*c);
            }
        }
        out
    }

    fn levels(t: &Thresholds) -> [(Option<Nanos>, Crossing); 3] {
        [(t.warn, Crossing::Warn), (t.downgrade, Crossing::Downgrade), (t.limit, Crossing::Limit)]
    }

    /// Hand the spend settled here since the last call to the fleet (`[state] backend = "redis"`): the
    /// period it belongs to (its start, Unix ms) and the amount, which this ledger forgets.
    pub fn take_unshared(&mut self, unix_ms: i64) -> (i64, Nanos) {
        self.roll(unix_ms);
        (self.start_ms, std::mem::replace(&mut self.unshared, Nanos::ZERO))
    }

    /// The fleet's settled spend of the period starting `start_ms` is `total`, after this replica added
    /// `own` to it (what [`Ledger::take_unshared`] gave, perhaps over several calls while Redis was away).
    /// Spend becomes `total` plus what settled here since (reservations stay as they are). Thresholds the
    /// total is past are marked crossed; the ones returned are those that this replica's own addition carried
    /// the fleet across and that it had not announced yet — so the fleet announces each crossing about once.
    /// A total of another period (the ledger rolled meanwhile) is ignored.
    pub fn sync_fleet(
        &mut self,
        t: &Thresholds,
        start_ms: i64,
        total: Nanos,
        own: Nanos,
        unix_ms: i64,
    ) -> Vec<Crossing> {
        self.roll(unix_ms);
        if start_ms != self.start_ms {
            return Vec::new();
        }
        self.spent = total.saturating_add(self.unshared);
        let before = total.saturating_sub(own);
        let mut out = Vec::new();
        for (i, (thr, c)) in Self::levels(t).iter().enumerate() {
            let Some(x) = *thr else { continue };
            if self.crossed[i] || self.spent < x {
                continue;
            }
            self.crossed[i] = true;
            if before < x && total >= x {
                out.push(*c);
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T0: i64 = 1_764_800_000_000; // 2025-12-03T22:13:20Z

    fn usd(x: f64) -> Nanos {
        Nanos::from_usd(x)
    }

    fn thresholds() -> Thresholds {
        Thresholds { warn: Some(usd(400.0)), downgrade: Some(usd(480.0)), limit: Some(usd(500.0)) }
    }

    #[test]
    fn utc_periods() {
        // 2025-12-03T22:13:20Z: the day is the 3rd, the month December.
        let (s, e) = Period::Day.bounds(T0);
        assert_eq!((s, e), (1_764_720_000_000, 1_764_806_400_000));
        let (s, e) = Period::Month.bounds(T0);
        assert_eq!((s, e), (1_764_547_200_000, 1_767_225_600_000)); // 2025-12-01 .. 2026-01-01
                                                                    // February of a leap year, and the last millisecond of a month.
        let feb = days_from_civil(2028, 2, 10) * DAY_MS;
        let (s, e) = Period::Month.bounds(feb);
        assert_eq!(((e - s) / DAY_MS), 29);
        assert_eq!(Period::Month.bounds(e - 1), (s, e));
        assert_eq!(Period::Month.bounds(e).0, e);
        assert_eq!(days_from_civil(1970, 1, 1), 0);
        assert_eq!(civil_from_days(0), (1970, 1));
    }

    #[test]
    fn thresholds_in_order_and_the_level_of_spend() {
        let t = thresholds();
        assert_eq!(t.level(usd(399.99)), Level::Ok);
        assert_eq!(t.level(usd(400.0)), Level::Warn);
        assert_eq!(t.level(usd(480.0)), Level::Downgrade);
        assert_eq!(t.level(usd(500.0)), Level::Block);
        assert_eq!(Thresholds::default().level(usd(1e9)), Level::Ok);
    }

    #[test]
    fn reservations_stop_concurrent_requests_at_the_limit() {
        let t = Thresholds { limit: Some(usd(1.0)), ..Default::default() };
        let mut l = Ledger::new(Period::Day, T0);
        l.settle(&t, Nanos::ZERO, usd(0.95), T0);
        // 50 requests of $0.01 each arrive before any settles: exactly five fit.
        let admitted = (0..50).filter(|_| l.admit(&t, usd(0.01), false, T0) == Decision::Admit).count();
        assert_eq!(admitted, 5);
        assert_eq!(l.reserved(), usd(0.05));
        // They settle at their real cost; the limit is reached, not passed.
        for _ in 0..5 {
            l.settle(&t, usd(0.01), usd(0.01), T0);
        }
        assert_eq!((l.spent(T0), l.reserved()), (usd(1.0), Nanos::ZERO));
        match l.admit(&t, usd(0.001), false, T0) {
            Decision::Block { retry_after_s } => assert_eq!(retry_after_s, 6_400), // to midnight UTC
            d => panic!("{d:?}"),
        }
        // A free request is never blocked.
        assert_eq!(l.admit(&t, Nanos::ZERO, false, T0), Decision::Admit);
    }

    #[test]
    fn downgrade_before_block_and_only_when_a_cheaper_model_exists() {
        let t = thresholds();
        let mut l = Ledger::resumed(Period::Day, T0, usd(480.0), &t);
        assert_eq!(l.admit(&t, usd(1.0), true, T0), Decision::Downgrade);
        // The cheaper model's request is admitted and reserved.
        assert_eq!(l.admit(&t, usd(0.1), false, T0), Decision::Admit);
        assert_eq!(l.reserved(), usd(0.1));
        let mut l = Ledger::resumed(Period::Day, T0, usd(499.95), &t);
        assert!(matches!(l.admit(&t, usd(0.1), false, T0), Decision::Block { .. }));
        // Below the downgrade threshold, a request that would pass the limit goes to the cheaper model.
        let t2 = Thresholds { warn: None, downgrade: Some(usd(480.0)), limit: Some(usd(479.0)) };
        let mut l = Ledger::resumed(Period::Day, T0, usd(478.5), &t2);
        assert_eq!(l.admit(&t2, usd(1.0), true, T0), Decision::Downgrade);
        assert!(matches!(l.admit(&t2, usd(1.0), false, T0), Decision::Block { .. }));
    }

    #[test]
    fn each_threshold_is_crossed_once_per_period() {
        let t = thresholds();
        let mut l = Ledger::new(Period::Day, T0);
        assert!(l.settle(&t, Nanos::ZERO, usd(399.0), T0).is_empty());
        assert_eq!(l.settle(&t, Nanos::ZERO, usd(1.0), T0), vec![Crossing::Warn]);
        assert!(l.settle(&t, Nanos::ZERO, usd(1.0), T0).is_empty());
        // One big request crosses two at once, in order.
        assert_eq!(l.settle(&t, Nanos::ZERO, usd(200.0), T0), vec![Crossing::Downgrade, Crossing::Limit]);
        // The next day starts from zero and re-arms.
        let tomorrow = T0 + DAY_MS;
        assert_eq!(l.spent(tomorrow), Nanos::ZERO);
        assert_eq!(l.level(&t, tomorrow), Level::Ok);
        assert_eq!(l.charge(&t, usd(450.0), tomorrow), vec![Crossing::Warn]);
        // A ledger resumed past warn does not announce it again.
        let mut r = Ledger::resumed(Period::Day, T0, usd(450.0), &t);
        assert_eq!(r.charge(&t, usd(40.0), T0), vec![Crossing::Downgrade]);
    }

    #[test]
    fn fleet_spend_replaces_local_spend_and_keeps_reservations() {
        let t = Thresholds { warn: Some(usd(5.0)), downgrade: None, limit: Some(usd(10.0)) };
        let mut l = Ledger::new(Period::Day, T0);
        assert_eq!(l.admit(&t, usd(1.0), false, T0), Decision::Admit);
        l.settle(&t, usd(1.0), usd(1.0), T0);
        assert_eq!(l.admit(&t, usd(1.0), false, T0), Decision::Admit);
        let (start, own) = l.take_unshared(T0);
        assert_eq!((start, own), (Period::Day.bounds(T0).0, usd(1.0)));
        assert_eq!(l.take_unshared(T0).1, Nanos::ZERO, "handed over once");
        // Meanwhile another request settles here; then Redis answers: the fleet spent $4 with our $1.
        l.settle(&t, Nanos::ZERO, usd(0.5), T0);
        assert!(l.sync_fleet(&t, start, usd(4.0), own, T0).is_empty());
        assert_eq!((l.spent(T0), l.reserved()), (usd(4.5), usd(1.0)));
        // The reservation counts against the fleet's spend: $4.5 + $1 reserved + $5 > $10.
        assert!(matches!(l.admit(&t, usd(5.0), false, T0), Decision::Block { .. }));
        assert_eq!(l.take_unshared(T0).1, usd(0.5), "what settled after the take goes next time");
    }

    #[test]
    fn a_crossing_reached_by_the_fleet_is_announced_once_by_the_replica_that_carried_it() {
        let t = Thresholds { warn: Some(usd(5.0)), downgrade: None, limit: Some(usd(10.0)) };
        let start = Period::Day.bounds(T0).0;
        // Replica A's $1 carried the fleet from $4.5 to $5.5: A announces warn, once.
        let mut a = Ledger::new(Period::Day, T0);
        assert_eq!(a.sync_fleet(&t, start, usd(5.5), usd(1.0), T0), vec![Crossing::Warn]);
        assert!(a.sync_fleet(&t, start, usd(6.0), usd(0.5), T0).is_empty());
        assert!(a.settle(&t, Nanos::ZERO, usd(0.1), T0).is_empty(), "already crossed");
        // Replica B learns of it without adding anything: marked, not announced.
        let mut b = Ledger::new(Period::Day, T0);
        assert!(b.sync_fleet(&t, start, usd(5.5), Nanos::ZERO, T0).is_empty());
        assert!(b.settle(&t, Nanos::ZERO, usd(0.1), T0).is_empty());
        // A crossing announced locally (settled here first) is not announced again by the sync.
        let mut c = Ledger::new(Period::Day, T0);
        assert_eq!(c.settle(&t, Nanos::ZERO, usd(10.0), T0), vec![Crossing::Warn, Crossing::Limit]);
        let (_, own) = c.take_unshared(T0);
        assert!(c.sync_fleet(&t, start, usd(10.0), own, T0).is_empty());
        // A total of a period that is over is ignored.
        let mut d = Ledger::new(Period::Day, T0 + DAY_MS);
        assert!(d.sync_fleet(&t, start, usd(50.0), usd(1.0), T0 + DAY_MS).is_empty());
        assert_eq!(d.spent(T0 + DAY_MS), Nanos::ZERO);
    }

    #[test]
    fn a_reservation_outlives_a_period_change() {
        let t = Thresholds { limit: Some(usd(1.0)), ..Default::default() };
        let mut l = Ledger::new(Period::Day, T0);
        assert_eq!(l.admit(&t, usd(0.5), false, T0), Decision::Admit);
        let tomorrow = T0 + DAY_MS;
        l.settle(&t, usd(0.5), usd(0.4), tomorrow);
        assert_eq!((l.spent(tomorrow), l.reserved()), (usd(0.4), Nanos::ZERO));
    }
}
