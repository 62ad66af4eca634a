//! Circuit breaker for one (endpoint, model) pair: the state machine only.
//!
//! Owns the transitions closed → open → half-open → closed/open, the exponential
//! recovery timeout and the bound on half-open trials in flight.
//!
//! **Invariant:** this module is pure and synchronous. It does no I/O, reads no
//! clock and holds no lock: time enters as `now_ms` (milliseconds on a monotonic
//! clock chosen by the caller) and the caller owns synchronisation (for example a
//! `parking_lot::Mutex<Breaker>` per pair). It knows nothing about HTTP; callers
//! classify outcomes first (see `retry::counts_as_failure`).
//!
//! # Semantics
//! * **Closed**: every request is admitted. `failure_threshold` consecutive
//!   failures open the breaker; a success resets the count.
//! * **Open**: nothing is admitted until `retry_at_ms`. The first [`Breaker::admit`]
//!   (or [`Breaker::tick`]) at or after that instant moves it to half-open.
//! * **HalfOpen**: at most `half_open_max_trials` trials are in flight.
//!   `success_threshold` consecutive successes close it; one failure reopens it
//!   with the recovery timeout doubled (capped at `max_recovery_timeout_ms`).
//!   Closing resets the timeout to `recovery_timeout_ms`.
//!
//! # Late and stale results
//! Every state change remembers when it happened ([`Breaker::since_ms`]). A result
//! belongs to the state in which its attempt *started*:
//! * results that arrive while **open** are ignored (no attempt is admitted while
//!   open, so they are late answers of requests started earlier): they neither
//!   extend the timeout nor count towards recovery;
//! * [`Breaker::record_attempt`] takes the attempt's start time and ignores results
//!   of attempts that started before the current state began, in every state, so a
//!   request that began before an outage cannot reopen a half-open breaker, and a
//!   trial of an earlier half-open episode cannot consume a slot of the current one;
//! * the short forms [`Breaker::record_success`] / [`Breaker::record_failure`] assume
//!   the attempt started in the current state (true for probes and for callers that
//!   went through [`Breaker::admit`] in the same state).
//!
//! A trial that is never reported would hold its slot forever; as a safety net,
//! when all slots are taken and no trial was admitted for the current recovery
//! timeout, the slots are considered lost and freed.

use serde::{Deserialize, Serialize};

/// The three states of a circuit breaker.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BreakerState {
    /// Requests flow; failures are counted.
    Closed,
    /// Requests are rejected until the recovery timeout has passed.
    Open,
    /// A bounded number of trial requests decide whether to close or reopen.
    HalfOpen,
}

impl BreakerState {
    /// The stable name used in `/status` and logs: `closed`, `open` or `half_open`.
    pub fn as_str(self) -> &'static str {
        match self {
            BreakerState::Closed => "closed",
            BreakerState::Open => "open",
            BreakerState::HalfOpen => "half_open",
        }
    }

    /// The value of the `sheepdog_breaker_state` gauge: 0 closed, 1 half-open, 2 open.
    pub fn gauge(self) -> i64 {
        match self {
            BreakerState::Closed => 0,
            BreakerState::HalfOpen => 1,
            BreakerState::Open => 2,
        }
    }
}

impl std::fmt::Display for BreakerState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A state change `(from, to)` reported by the recording methods.
pub type Transition = (BreakerState, BreakerState);

/// Tuning of a breaker. Zero thresholds and trial counts are treated as 1.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BreakerConfig {
    /// Consecutive failures (while closed) that open the breaker.
    pub failure_threshold: u32,
    /// Time spent open before the first trial, in milliseconds.
    pub recovery_timeout_ms: u64,
    /// Cap of the doubled recovery timeout; a value below the base means the base.
    pub max_recovery_timeout_ms: u64,
    /// Consecutive half-open successes that close the breaker.
    pub success_threshold: u32,
    /// Trials allowed in flight at once while half-open.
    pub half_open_max_trials: u32,
}

impl Default for BreakerConfig {
    /// The contract defaults: 3 failures, 30 s recovery (capped at 5 min), 2 successes, 1 trial.
    fn default() -> Self {
        BreakerConfig {
            failure_threshold: 3,
            recovery_timeout_ms: 30_000,
            max_recovery_timeout_ms: 300_000,
            success_threshold: 2,
            half_open_max_trials: 1,
        }
    }
}

impl BreakerConfig {
    fn failures_needed(&self) -> u32 {
        self.failure_threshold.max(1)
    }

    fn successes_needed(&self) -> u32 {
        self.success_threshold.max(1)
    }

    fn max_trials(&self) -> u32 {
        self.half_open_max_trials.max(1)
    }

    /// The recovery timeout after `reopens` consecutive failed half-open episodes:
    /// `recovery_timeout_ms × 2^reopens`, capped at `max_recovery_timeout_ms`.
    pub fn timeout_for(&self, reopens: u32) -> u64 {
        let base = self.recovery_timeout_ms;
        let cap = self.max_recovery_timeout_ms.max(base);
        let factor = 1u64.checked_shl(reopens).unwrap_or(u64::MAX);
        base.saturating_mul(factor).min(cap)
    }
}

/// What [`Breaker::admit`] decided for one attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    /// The breaker is closed: go ahead.
    Admitted,
    /// Admitted as a half-open trial: the caller must report its outcome
    /// (`record_*`) or give the slot back with [`Breaker::release_trial`].
    Trial,
    /// The breaker is open, or half-open with every trial slot taken.
    Rejected,
}

impl Admission {
    /// True for [`Admission::Admitted`] and [`Admission::Trial`].
    pub fn is_admitted(self) -> bool {
        !matches!(self, Admission::Rejected)
    }
}

/// The breaker of one (endpoint, model) pair. Cheap to clone; not synchronised.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Breaker {
    state: BreakerState,
    /// When the current state was entered.
    since_ms: u64,
    /// Consecutive failures while closed.
    failures: u32,
    /// Consecutive successes while half-open.
    successes: u32,
    /// Trials admitted and not yet reported while half-open.
    trials_in_flight: u32,
    /// When the last trial was admitted (slot-leak safety net).
    last_trial_ms: u64,
    /// Failed half-open episodes since the breaker last closed (timeout exponent).
    reopens: u32,
    /// Timeout of the current (or last) open period.
    open_timeout_ms: u64,
    /// When an open breaker may turn half-open.
    retry_at_ms: u64,
    /// Times the breaker has opened, reopenings included.
    open_count: u64,
}

/// What of a breaker survives a restart ([`Breaker::saved`], [`Breaker::restored`]). Times are durations
/// relative to the moment it was saved, so they survive the change of clock a restart is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct SavedBreaker {
    /// The state when saved.
    pub state: BreakerState,
    /// Consecutive failures counted while closed.
    pub failures: u32,
    /// Consecutive successes counted while half-open.
    pub successes: u32,
    /// Failed half-open episodes since it last closed (the timeout exponent).
    pub reopens: u32,
    /// Timeout of the current (or last) open period.
    pub open_timeout_ms: u64,
    /// For an open breaker: how long after saving it may turn half-open.
    pub retry_in_ms: u64,
    /// Times it has opened.
    pub open_count: u64,
}

impl Default for Breaker {
    fn default() -> Self {
        Breaker::new()
    }
}

impl Breaker {
    /// A closed breaker with no history.
    pub fn new() -> Self {
        Breaker {
            state: BreakerState::Closed,
            since_ms: 0,
            failures: 0,
            successes: 0,
            trials_in_flight: 0,
            last_trial_ms: 0,
            reopens: 0,
            open_timeout_ms: 0,
            retry_at_ms: 0,
            open_count: 0,
        }
    }

    /// What survives a restart, saved at `now_ms`.
    pub fn saved(&self, now_ms: u64) -> SavedBreaker {
        SavedBreaker {
            state: self.state,
            failures: self.failures,
            successes: self.successes,
            reopens: self.reopens,
            open_timeout_ms: self.open_timeout_ms,
            retry_in_ms: match self.state {
                BreakerState::Open => self.retry_at_ms.saturating_sub(now_ms),
                BreakerState::Closed | BreakerState::HalfOpen => 0,
            },
            open_count: self.open_count,
        }
    }

    /// A breaker restored at `now_ms` from `saved`, `offline_ms` after it was saved: an open breaker stays
    /// open for what was left of its recovery timeout (then turns half-open as usual), a half-open one is
    /// half-open with no trial in flight, a closed one keeps its count of consecutive failures. The state
    /// counts as entered at `now_ms`, so no result of an attempt from before the restart can count.
    pub fn restored(saved: &SavedBreaker, offline_ms: u64, now_ms: u64) -> Breaker {
        Breaker {
            state: saved.state,
            since_ms: now_ms,
            failures: saved.failures,
            successes: saved.successes,
            trials_in_flight: 0,
            last_trial_ms: 0,
            reopens: saved.reopens,
            open_timeout_ms: saved.open_timeout_ms,
            retry_at_ms: now_ms.saturating_add(saved.retry_in_ms.saturating_sub(offline_ms)),
            open_count: saved.open_count,
        }
    }

    /// The current state (an open breaker whose timeout has passed still reads
    /// `Open` until [`Breaker::admit`] or [`Breaker::tick`] is called).
    pub fn state(&self) -> BreakerState {
        self.state
    }

    /// When the current state was entered (`0` for a breaker that never changed).
    pub fn since_ms(&self) -> u64 {
        self.since_ms
    }

    /// Consecutive failures counted while closed.
    pub fn consecutive_failures(&self) -> u32 {
        self.failures
    }

    /// Consecutive successes counted while half-open.
    pub fn consecutive_successes(&self) -> u32 {
        self.successes
    }

    /// Half-open trials admitted and not yet reported or released.
    pub fn trials_in_flight(&self) -> u32 {
        self.trials_in_flight
    }

    /// How many times the breaker has opened, reopenings included.
    pub fn open_count(&self) -> u64 {
        self.open_count
    }

    /// The timeout of the current open period; when not open, of the last one
    /// (`0` if it never opened).
    pub fn current_timeout_ms(&self) -> u64 {
        self.open_timeout_ms
    }

    /// The timeout the next opening would use under `cfg`.
    pub fn next_timeout_ms(&self, cfg: &BreakerConfig) -> u64 {
        match self.state {
            BreakerState::HalfOpen => cfg.timeout_for(self.reopens.saturating_add(1)),
            BreakerState::Closed | BreakerState::Open => cfg.timeout_for(self.reopens),
        }
    }

    /// When an open breaker becomes half-open; `None` unless open.
    pub fn retry_at_ms(&self) -> Option<u64> {
        match self.state {
            BreakerState::Open => Some(self.retry_at_ms),
            BreakerState::Closed | BreakerState::HalfOpen => None,
        }
    }

    /// Moves an open breaker whose timeout has passed to half-open. Returns the
    /// transition if one happened. [`Breaker::admit`] does this by itself.
    pub fn tick(&mut self, now_ms: u64) -> Option<Transition> {
        if self.state == BreakerState::Open && now_ms >= self.retry_at_ms {
            Some(self.enter(BreakerState::HalfOpen, now_ms))
        } else {
            None
        }
    }

    /// Decides whether one attempt may go to this endpoint now. An open breaker
    /// whose timeout passed turns half-open and admits a trial; a half-open one
    /// admits at most `half_open_max_trials` trials in flight.
    pub fn admit(&mut self, cfg: &BreakerConfig, now_ms: u64) -> Admission {
        self.tick(now_ms);
        match self.state {
            BreakerState::Closed => Admission::Admitted,
            BreakerState::Open => Admission::Rejected,
            BreakerState::HalfOpen => {
                if self.trials_in_flight >= cfg.max_trials() && self.trial_slots_lost(cfg, now_ms) {
                    self.trials_in_flight = 0;
                }
                if self.trials_in_flight < cfg.max_trials() {
                    self.trials_in_flight += 1;
                    self.last_trial_ms = now_ms;
                    Admission::Trial
                } else {
                    Admission::Rejected
                }
            }
        }
    }

    /// Read-only peek: would [`Breaker::admit`] admit an attempt now?
    pub fn would_admit(&self, cfg: &BreakerConfig, now_ms: u64) -> bool {
        match self.state {
            BreakerState::Closed => true,
            BreakerState::Open => now_ms >= self.retry_at_ms,
            BreakerState::HalfOpen => self.trials_in_flight < cfg.max_trials() || self.trial_slots_lost(cfg, now_ms),
        }
    }

    /// Records a success of an attempt that started in the current state.
    pub fn record_success(&mut self, cfg: &BreakerConfig, now_ms: u64) -> Option<Transition> {
        self.record_attempt(cfg, true, self.since_ms, now_ms)
    }

    /// Records a failure of an attempt that started in the current state.
    pub fn record_failure(&mut self, cfg: &BreakerConfig, now_ms: u64) -> Option<Transition> {
        self.record_attempt(cfg, false, self.since_ms, now_ms)
    }

    /// Records the outcome of an attempt that started at `started_ms` (the `now_ms`
    /// given to [`Breaker::admit`]). Results of attempts started before the current
    /// state began, and every result while open, are ignored.
    pub fn record_attempt(
        &mut self,
        cfg: &BreakerConfig,
        success: bool,
        started_ms: u64,
        now_ms: u64,
    ) -> Option<Transition> {
        if started_ms < self.since_ms {
            return None;
        }
        match (self.state, success) {
            (BreakerState::Open, _) => None,
            (BreakerState::Closed, true) => {
                self.failures = 0;
                None
            }
            (BreakerState::Closed, false) => {
                self.failures = self.failures.saturating_add(1);
                if self.failures >= cfg.failures_needed() {
                    Some(self.open(cfg, now_ms))
                } else {
                    None
                }
            }
            (BreakerState::HalfOpen, true) => {
                self.trials_in_flight = self.trials_in_flight.saturating_sub(1);
                self.successes = self.successes.saturating_add(1);
                if self.successes >= cfg.successes_needed() {
                    self.reopens = 0;
                    Some(self.enter(BreakerState::Closed, now_ms))
                } else {
                    None
                }
            }
            (BreakerState::HalfOpen, false) => {
                self.reopens = self.reopens.saturating_add(1);
                Some(self.open(cfg, now_ms))
            }
        }
    }

    /// Gives back a half-open trial slot for a trial that ended without a verdict
    /// (cancelled, client error). Does nothing unless half-open.
    pub fn release_trial(&mut self) {
        if self.state == BreakerState::HalfOpen {
            self.trials_in_flight = self.trials_in_flight.saturating_sub(1);
        }
    }

    /// Like [`Breaker::release_trial`] for a trial admitted at `started_ms`; a trial
    /// of an earlier half-open episode holds no slot and releases nothing.
    pub fn release_attempt(&mut self, started_ms: u64) {
        if started_ms >= self.since_ms {
            self.release_trial();
        }
    }

    /// Applies another replica's "opened, retry at `retry_at_ms`" (on this process's clock) at `now_ms`: a
    /// breaker that is not open opens until then (counting as an opening, entered at `now_ms`, so results of
    /// attempts admitted before are ignored); an open one keeps the later of the two retry times. A retry time
    /// already past enforces nothing. Returns the transition if one happened.
    pub fn force_open(&mut self, retry_at_ms: u64, now_ms: u64) -> Option<Transition> {
        if retry_at_ms <= now_ms {
            return None;
        }
        if self.state == BreakerState::Open {
            self.retry_at_ms = self.retry_at_ms.max(retry_at_ms);
            return None;
        }
        self.open_timeout_ms = retry_at_ms - now_ms;
        self.retry_at_ms = retry_at_ms;
        self.open_count = self.open_count.saturating_add(1);
        Some(self.enter(BreakerState::Open, now_ms))
    }

    /// Applies another replica's "closed after successful trials" at `now_ms`: an open or half-open breaker
    /// closes (its recovery timeout back to the base); a closed one is left alone, its failure count too.
    pub fn force_closed(&mut self, now_ms: u64) -> Option<Transition> {
        if self.state == BreakerState::Closed {
            return None;
        }
        self.reopens = 0;
        Some(self.enter(BreakerState::Closed, now_ms))
    }

    fn trial_slots_lost(&self, cfg: &BreakerConfig, now_ms: u64) -> bool {
        let lease = self.open_timeout_ms.max(cfg.recovery_timeout_ms).max(1);
        now_ms.saturating_sub(self.last_trial_ms) >= lease
    }

    fn open(&mut self, cfg: &BreakerConfig, now_ms: u64) -> Transition {
        self.open_timeout_ms = cfg.timeout_for(self.reopens);
        self.retry_at_ms = now_ms.saturating_add(self.open_timeout_ms);
        self.open_count = self.open_count.saturating_add(1);
        self.enter(BreakerState::Open, now_ms)
    }

    fn enter(&mut self, to: BreakerState, now_ms: u64) -> Transition {
        let from = self.state;
        self.state = to;
        // A clock that goes backwards must not make `since_ms` move back.
        self.since_ms = self.since_ms.max(now_ms);
        self.failures = 0;
        self.successes = 0;
        self.trials_in_flight = 0;
        (from, to)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_restored_open_breaker_stays_open_for_the_rest_of_its_timeout() {
        let cfg = BreakerConfig::default();
        let mut b = Breaker::new();
        for _ in 0..cfg.failure_threshold {
            b.record_failure(&cfg, 1_000);
        }
        assert_eq!(b.state(), BreakerState::Open);
        let saved = b.saved(11_000); // 10 s into its recovery timeout
        assert_eq!(saved.retry_in_ms, cfg.recovery_timeout_ms - 10_000);
        // Restarted 2 s later, on a clock that starts again near zero.
        let mut r = Breaker::restored(&saved, 2_000, 5);
        assert_eq!(r.state(), BreakerState::Open);
        assert_eq!(r.retry_at_ms(), Some(5 + cfg.recovery_timeout_ms - 12_000));
        assert_eq!(r.admit(&cfg, 5 + cfg.recovery_timeout_ms - 12_001), Admission::Rejected);
        assert_eq!(r.admit(&cfg, 5 + cfg.recovery_timeout_ms - 12_000), Admission::Trial);
        assert_eq!(r.open_count(), 1);
    }

    #[test]
    fn a_breaker_restored_after_its_timeout_admits_a_trial_at_once() {
        let cfg = BreakerConfig::default();
        let mut b = Breaker::new();
        for _ in 0..cfg.failure_threshold {
            b.record_failure(&cfg, 1_000);
        }
        let saved = b.saved(2_000);
        let mut r = Breaker::restored(&saved, cfg.recovery_timeout_ms, 7);
        assert_eq!(r.admit(&cfg, 7), Admission::Trial);
    }

    #[test]
    fn restored_state_ignores_results_of_attempts_from_before_the_restart() {
        let cfg = BreakerConfig::default();
        let mut b = Breaker::new();
        b.record_failure(&cfg, 100);
        b.record_failure(&cfg, 200);
        let saved = b.saved(300);
        assert_eq!((saved.state, saved.failures), (BreakerState::Closed, 2));
        let mut r = Breaker::restored(&saved, 50, 10);
        assert_eq!(r.record_attempt(&cfg, false, 9, 20), None, "started before the restart");
        assert_eq!(r.consecutive_failures(), 2);
        assert!(r.record_attempt(&cfg, false, 10, 20).is_some(), "the third failure opens it");
    }

    #[test]
    fn a_remote_open_forces_the_breaker_open_until_its_retry_time() {
        let c = cfg();
        let mut b = Breaker::new();
        b.record_failure(&c, 10);
        assert_eq!(b.force_open(5_000, 1_000), Some((Closed, Open)));
        assert_eq!(b.retry_at_ms(), Some(5_000));
        assert_eq!(b.open_count(), 1);
        assert_eq!(b.admit(&c, 4_999), Admission::Rejected);
        // A result of an attempt admitted before the remote open does not count.
        assert_eq!(b.record_attempt(&c, true, 900, 1_100), None);
        assert_eq!(b.admit(&c, 5_000), Admission::Trial, "half-open at the remote retry time");
    }

    #[test]
    fn a_remote_open_on_an_open_breaker_keeps_the_later_retry_time_and_is_no_transition() {
        let mut b = opened_at(100); // retry at 1_100
        assert_eq!(b.force_open(900, 200), None);
        assert_eq!(b.retry_at_ms(), Some(1_100));
        assert_eq!(b.force_open(3_000, 200), None);
        assert_eq!(b.retry_at_ms(), Some(3_000));
        assert_eq!(b.open_count(), 1);
    }

    #[test]
    fn a_remote_open_whose_retry_time_passed_enforces_nothing() {
        let mut b = Breaker::new();
        assert_eq!(b.force_open(1_000, 1_000), None);
        assert_eq!(b.state(), Closed);
    }

    #[test]
    fn a_remote_close_closes_an_open_or_half_open_breaker_only() {
        let c = cfg();
        let mut b = opened_at(100);
        assert_eq!(b.force_closed(500), Some((Open, Closed)));
        assert_eq!(b.admit(&c, 501), Admission::Admitted);
        let mut h = opened_at(100);
        h.tick(2_000);
        assert_eq!(h.state(), HalfOpen);
        assert_eq!(h.force_closed(2_001), Some((HalfOpen, Closed)));
        let mut k = Breaker::new();
        k.record_failure(&c, 1);
        assert_eq!(k.force_closed(2), None);
        assert_eq!(k.consecutive_failures(), 1, "a closed breaker keeps its count");
    }

    #[test]
    fn saved_breakers_round_trip_through_json() {
        let saved = SavedBreaker {
            state: BreakerState::HalfOpen,
            failures: 0,
            successes: 1,
            reopens: 2,
            open_timeout_ms: 120_000,
            retry_in_ms: 0,
            open_count: 3,
        };
        let text = serde_json::to_string(&saved).unwrap();
        assert!(text.contains("\"half_open\""), "{text}");
        assert_eq!(serde_json::from_str::<SavedBreaker>(&text).unwrap(), saved);
    }
    use BreakerState::{Closed, HalfOpen, Open};

    fn cfg() -> BreakerConfig {
        BreakerConfig {
            failure_threshold: 3,
            recovery_timeout_ms: 1_000,
            max_recovery_timeout_ms: 8_000,
            success_threshold: 2,
            half_open_max_trials: 1,
        }
    }

    /// A breaker opened at `t` with the test config.
    fn opened_at(t: u64) -> Breaker {
        let c = cfg();
        let mut b = Breaker::new();
        b.record_failure(&c, t);
        b.record_failure(&c, t);
        assert_eq!(b.record_failure(&c, t), Some((Closed, Open)));
        b
    }

    #[test]
    fn names_and_gauges() {
        assert_eq!(Closed.as_str(), "closed");
        assert_eq!(Open.as_str(), "open");
        assert_eq!(HalfOpen.as_str(), "half_open");
        assert_eq!((Closed.gauge(), HalfOpen.gauge(), Open.gauge()), (0, 1, 2));
        assert_eq!(HalfOpen.to_string(), "half_open");
    }

    #[test]
    fn state_deserializes_from_status_names() {
        use serde::de::value::{Error, StrDeserializer};
        use serde::de::IntoDeserializer;
        for s in [Closed, Open, HalfOpen] {
            let d: StrDeserializer<'_, Error> = s.as_str().into_deserializer();
            assert_eq!(BreakerState::deserialize(d), Ok(s));
        }
    }

    #[test]
    fn closed_admits_and_counts_consecutive_failures() {
        let c = cfg();
        let mut b = Breaker::new();
        assert_eq!(b.state(), Closed);
        assert_eq!(b.admit(&c, 0), Admission::Admitted);
        assert_eq!(b.record_failure(&c, 1), None);
        assert_eq!(b.record_failure(&c, 2), None);
        assert_eq!(b.consecutive_failures(), 2);
        // A success resets the streak.
        assert_eq!(b.record_success(&c, 3), None);
        assert_eq!(b.consecutive_failures(), 0);
        assert_eq!(b.record_failure(&c, 4), None);
        assert_eq!(b.record_failure(&c, 5), None);
        assert_eq!(b.record_failure(&c, 6), Some((Closed, Open)));
        assert_eq!(b.state(), Open);
        assert_eq!(b.open_count(), 1);
        assert_eq!(b.retry_at_ms(), Some(1_006));
        assert_eq!(b.current_timeout_ms(), 1_000);
    }

    #[test]
    fn open_rejects_until_timeout_then_half_open_trial() {
        let c = cfg();
        let mut b = opened_at(100);
        assert_eq!(b.admit(&c, 100), Admission::Rejected);
        assert!(!b.would_admit(&c, 1_099));
        assert_eq!(b.admit(&c, 1_099), Admission::Rejected);
        assert_eq!(b.state(), Open);
        assert!(b.would_admit(&c, 1_100));
        assert_eq!(b.state(), Open, "would_admit does not change state");
        assert_eq!(b.admit(&c, 1_100), Admission::Trial);
        assert_eq!(b.state(), HalfOpen);
        assert_eq!(b.retry_at_ms(), None);
        assert_eq!(b.since_ms(), 1_100);
    }

    #[test]
    fn tick_reports_the_open_to_half_open_transition() {
        let mut b = opened_at(0);
        assert_eq!(b.tick(999), None);
        assert_eq!(b.tick(1_000), Some((Open, HalfOpen)));
        assert_eq!(b.tick(1_001), None);
    }

    #[test]
    fn half_open_closes_after_success_threshold() {
        let c = cfg();
        let mut b = opened_at(0);
        assert_eq!(b.admit(&c, 1_000), Admission::Trial);
        assert_eq!(b.record_success(&c, 1_010), None);
        assert_eq!(b.state(), HalfOpen);
        assert_eq!(b.admit(&c, 1_020), Admission::Trial);
        assert_eq!(b.record_success(&c, 1_030), Some((HalfOpen, Closed)));
        assert_eq!(b.state(), Closed);
        assert_eq!(b.admit(&c, 1_040), Admission::Admitted);
        assert_eq!(b.trials_in_flight(), 0);
    }

    #[test]
    fn half_open_failure_reopens() {
        let c = cfg();
        let mut b = opened_at(0);
        assert_eq!(b.admit(&c, 1_000), Admission::Trial);
        assert_eq!(b.record_success(&c, 1_001), None);
        assert_eq!(b.admit(&c, 1_002), Admission::Trial);
        assert_eq!(b.record_failure(&c, 1_003), Some((HalfOpen, Open)));
        assert_eq!(b.state(), Open);
        assert_eq!(b.open_count(), 2);
        assert_eq!(b.retry_at_ms(), Some(1_003 + 2_000));
    }

    #[test]
    fn full_state_table() {
        // (state, event) -> expected state, for every pair.
        let c = cfg();
        let closed = Breaker::new();
        let open = opened_at(0);
        let mut half = opened_at(0);
        half.tick(1_000);
        let t = 1_500;
        type Step = fn(&mut Breaker, &BreakerConfig, u64);
        let cases: [(&str, &Breaker, Step, BreakerState); 9] = [
            (
                "closed+success",
                &closed,
                |b, c, t| {
                    let _ = b.record_success(c, t);
                },
                Closed,
            ),
            (
                "closed+failure",
                &closed,
                |b, c, t| {
                    let _ = b.record_failure(c, t);
                },
                Closed,
            ),
            (
                "closed+admit",
                &closed,
                |b, c, t| {
                    let _ = b.admit(c, t);
                },
                Closed,
            ),
            (
                "open+success",
                &open,
                |b, c, t| {
                    let _ = b.record_success(c, t);
                },
                Open,
            ),
            (
                "open+failure",
                &open,
                |b, c, t| {
                    let _ = b.record_failure(c, t);
                },
                Open,
            ),
            (
                "open+admit due",
                &open,
                |b, c, t| {
                    let _ = b.admit(c, t);
                },
                HalfOpen,
            ),
            (
                "half+success",
                &half,
                |b, c, t| {
                    let _ = b.record_success(c, t);
                },
                HalfOpen,
            ),
            (
                "half+failure",
                &half,
                |b, c, t| {
                    let _ = b.record_failure(c, t);
                },
                Open,
            ),
            (
                "half+admit",
                &half,
                |b, c, t| {
                    let _ = b.admit(c, t);
                },
                HalfOpen,
            ),
        ];
        for (name, start, step, want) in cases {
            let mut b = start.clone();
            step(&mut b, &c, t);
            assert_eq!(b.state(), want, "{name}");
        }
    }

    #[test]
    fn timeout_doubles_per_reopen_and_is_capped() {
        let c = cfg();
        let mut b = opened_at(0);
        let mut now = 0;
        let mut seen = vec![b.current_timeout_ms()];
        for _ in 0..6 {
            now = b.retry_at_ms().unwrap_or(now);
            assert_eq!(b.admit(&c, now), Admission::Trial);
            assert_eq!(b.record_failure(&c, now + 1), Some((HalfOpen, Open)));
            assert_eq!(b.retry_at_ms(), Some(now + 1 + b.current_timeout_ms()));
            seen.push(b.current_timeout_ms());
        }
        assert_eq!(seen, [1_000, 2_000, 4_000, 8_000, 8_000, 8_000, 8_000]);
        assert_eq!(b.open_count(), 7);
    }

    #[test]
    fn timeout_resets_to_base_when_closed() {
        let c = cfg();
        let mut b = opened_at(0);
        b.admit(&c, 1_000);
        b.record_failure(&c, 1_000); // reopen: 2 s
        assert_eq!(b.current_timeout_ms(), 2_000);
        assert_eq!(b.next_timeout_ms(&c), 2_000);
        b.admit(&c, 3_000);
        assert_eq!(b.next_timeout_ms(&c), 4_000, "a failing trial would double it");
        b.record_success(&c, 3_001);
        b.admit(&c, 3_002);
        assert_eq!(b.record_success(&c, 3_003), Some((HalfOpen, Closed)));
        assert_eq!(b.next_timeout_ms(&c), 1_000);
        for t in 0..3 {
            b.record_failure(&c, 4_000 + t);
        }
        assert_eq!(b.state(), Open);
        assert_eq!(b.current_timeout_ms(), 1_000);
    }

    #[test]
    fn timeout_math_saturates() {
        let c = BreakerConfig { recovery_timeout_ms: u64::MAX / 2, max_recovery_timeout_ms: u64::MAX, ..cfg() };
        assert_eq!(c.timeout_for(0), u64::MAX / 2);
        assert_eq!(c.timeout_for(5), u64::MAX);
        assert_eq!(c.timeout_for(200), u64::MAX);
        // A cap below the base means the base.
        let c = BreakerConfig { max_recovery_timeout_ms: 10, ..cfg() };
        assert_eq!(c.timeout_for(3), 1_000);
    }

    #[test]
    fn half_open_bounds_trials_in_flight() {
        let c = BreakerConfig { half_open_max_trials: 2, success_threshold: 3, ..cfg() };
        let mut b = Breaker::new();
        for _ in 0..3 {
            b.record_failure(&c, 0);
        }
        assert_eq!(b.admit(&c, 1_000), Admission::Trial);
        assert_eq!(b.admit(&c, 1_000), Admission::Trial);
        assert_eq!(b.trials_in_flight(), 2);
        assert!(!b.would_admit(&c, 1_001));
        assert_eq!(b.admit(&c, 1_001), Admission::Rejected);
        // A reported trial frees its slot.
        assert_eq!(b.record_success(&c, 1_002), None);
        assert_eq!(b.trials_in_flight(), 1);
        assert!(b.would_admit(&c, 1_002));
        assert_eq!(b.admit(&c, 1_002), Admission::Trial);
        assert_eq!(b.admit(&c, 1_002), Admission::Rejected);
    }

    #[test]
    fn release_trial_frees_a_slot_without_a_verdict() {
        let c = cfg();
        let mut b = opened_at(0);
        assert_eq!(b.admit(&c, 1_000), Admission::Trial);
        assert_eq!(b.admit(&c, 1_000), Admission::Rejected);
        b.release_trial();
        assert_eq!(b.state(), HalfOpen);
        assert_eq!(b.consecutive_successes(), 0);
        assert_eq!(b.admit(&c, 1_001), Admission::Trial);
        // Releasing more than was taken saturates at zero.
        b.release_trial();
        b.release_trial();
        assert_eq!(b.trials_in_flight(), 0);
        // Releasing does nothing when not half-open.
        let mut closed = Breaker::new();
        closed.release_trial();
        assert_eq!(closed, Breaker::new());
    }

    #[test]
    fn zero_config_values_mean_one() {
        let c = BreakerConfig {
            failure_threshold: 0,
            recovery_timeout_ms: 0,
            max_recovery_timeout_ms: 0,
            success_threshold: 0,
            half_open_max_trials: 0,
        };
        let mut b = Breaker::new();
        assert_eq!(b.record_failure(&c, 5), Some((Closed, Open)));
        assert_eq!(b.admit(&c, 5), Admission::Trial);
        assert_eq!(b.admit(&c, 5), Admission::Rejected);
        assert_eq!(b.record_success(&c, 6), Some((HalfOpen, Closed)));
    }

    #[test]
    fn late_results_while_open_are_ignored() {
        let c = cfg();
        let mut b = opened_at(100);
        let before = b.clone();
        // Late answers of requests started before the breaker opened.
        for t in [150, 500, 1_099] {
            assert_eq!(b.record_failure(&c, t), None);
            assert_eq!(b.record_success(&c, t), None);
        }
        assert_eq!(b, before, "neither extended nor shortened");
        assert_eq!(b.retry_at_ms(), Some(1_100));
        // Even after the timeout, a late result does not move it; admit does.
        assert_eq!(b.record_failure(&c, 2_000), None);
        assert_eq!(b.state(), Open);
        assert_eq!(b.admit(&c, 2_000), Admission::Trial);
    }

    #[test]
    fn stale_results_in_half_open_are_ignored() {
        let c = cfg();
        let mut b = Breaker::new();
        // A long request starts while closed...
        let long_started = 10;
        assert_eq!(b.admit(&c, long_started), Admission::Admitted);
        // ...the breaker opens at 20 and turns half-open at 1_020.
        for _ in 0..3 {
            b.record_failure(&c, 20);
        }
        assert_eq!(b.admit(&c, 1_020), Admission::Trial);
        // The long request fails late: it must not reopen the breaker nor free the trial slot.
        assert_eq!(b.record_attempt(&c, false, long_started, 1_030), None);
        assert_eq!(b.state(), HalfOpen);
        assert_eq!(b.trials_in_flight(), 1);
        // Nor does a late success count toward closing.
        assert_eq!(b.record_attempt(&c, true, long_started, 1_031), None);
        assert_eq!(b.consecutive_successes(), 0);
        // The real trial does count.
        assert_eq!(b.record_attempt(&c, true, 1_020, 1_040), None);
        assert_eq!(b.consecutive_successes(), 1);
    }

    #[test]
    fn stale_trial_of_an_earlier_episode_holds_no_slot() {
        let c = BreakerConfig { half_open_max_trials: 2, ..cfg() };
        let mut b = opened_at(0);
        assert_eq!(b.admit(&c, 1_000), Admission::Trial); // trial A
        assert_eq!(b.admit(&c, 1_000), Admission::Trial); // trial B
        assert_eq!(b.record_attempt(&c, false, 1_000, 1_005), Some((HalfOpen, Open)));
        // Next episode starts at 3_005.
        assert_eq!(b.admit(&c, 3_005), Admission::Trial);
        // Trial B of the old episode finally ends: its result and release are stale.
        assert_eq!(b.record_attempt(&c, false, 1_000, 3_006), None);
        b.release_attempt(1_000);
        assert_eq!(b.state(), HalfOpen);
        assert_eq!(b.trials_in_flight(), 1);
        b.release_attempt(3_005);
        assert_eq!(b.trials_in_flight(), 0);
    }

    #[test]
    fn stale_failure_in_closed_does_not_count() {
        let c = cfg();
        let mut b = opened_at(0);
        b.admit(&c, 1_000);
        b.record_success(&c, 1_001);
        b.admit(&c, 1_002);
        b.admit(&c, 1_002); // rejected: one trial at a time
        assert_eq!(b.record_attempt(&c, true, 1_002, 1_003), Some((HalfOpen, Closed)));
        // A trial started during half-open (before the close) failing late.
        assert_eq!(b.record_attempt(&c, false, 1_001, 1_010), None);
        assert_eq!(b.consecutive_failures(), 0);
        assert_eq!(b.record_attempt(&c, false, 1_003, 1_010), None);
        assert_eq!(b.consecutive_failures(), 1);
    }

    #[test]
    fn lost_trial_slots_are_reclaimed_after_a_timeout() {
        let c = cfg();
        let mut b = opened_at(0);
        assert_eq!(b.admit(&c, 1_000), Admission::Trial);
        // The trial is never reported.
        assert_eq!(b.admit(&c, 1_999), Admission::Rejected);
        assert!(!b.would_admit(&c, 1_999));
        assert!(b.would_admit(&c, 2_000));
        assert_eq!(b.admit(&c, 2_000), Admission::Trial);
        assert_eq!(b.trials_in_flight(), 1);
    }

    #[test]
    fn probes_drive_recovery() {
        // The prober asks for a trial when due, probes, and reports.
        let c = cfg();
        let mut b = opened_at(0);
        let mut now = 0;
        let mut transitions = Vec::new();
        while b.state() != Closed {
            now += 250;
            if b.admit(&c, now) == Admission::Trial {
                transitions.extend(b.record_success(&c, now + 10));
            }
        }
        assert_eq!(transitions, [(HalfOpen, Closed)]);
        assert_eq!(now, 1_250);
    }

    #[test]
    fn clock_going_backwards_does_not_corrupt() {
        let c = cfg();
        let mut b = opened_at(5_000);
        assert_eq!(b.admit(&c, 4_000), Admission::Rejected);
        assert_eq!(b.admit(&c, 6_000), Admission::Trial);
        assert_eq!(b.record_failure(&c, 100), Some((HalfOpen, Open)));
        assert_eq!(b.since_ms(), 6_000);
        assert!(b.retry_at_ms().is_some());
    }
}
