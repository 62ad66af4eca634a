//! Client rate limits: requests per minute and tokens per minute, each a token bucket that holds a minute's
//! allowance and refills continuously (so a client at its limit gets one more request every `60 / rpm` s,
//! not a burst at the top of each minute).
//!
//! Tokens are reserved at admission — the prompt estimate plus `max_tokens` — and settled when the request
//! finishes with the real usage ([`Bucket::settle`]): a stream's tokens count like any other. A bucket may go
//! below zero when a request used more than it reserved; later requests then wait until it refills.
//!
//! Shared among replicas, [`Limits::take_unshared`] gives what was admitted here to the fleet's counters and
//! [`Limits::charge_remote`] charges the buckets with what the other replicas admitted.
//!
//! Integer arithmetic in units of 1/60,000 of a token (a minute is 60,000 ms), so refilling `per_minute` units
//! per millisecond is exact and decisions repeat bit for bit. Pure: the caller passes `now_ms` and holds the
//! bucket behind its own lock.

/// Scale of the bucket's internal units: one request or token is this many units.
const SCALE: i128 = 60_000;

/// A token bucket of `per_minute` units a minute.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bucket {
    per_minute: u64,
    /// Available allowance, scaled; at most `per_minute * SCALE`, may be negative.
    level: i128,
    last_ms: u64,
}

/// A refusal: what was short and when to come back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limited {
    /// Milliseconds until the request would fit.
    pub retry_after_ms: u64,
}

impl Bucket {
    /// A full bucket of `per_minute` (at least 1) at `now_ms`.
    pub fn new(per_minute: u64, now_ms: u64) -> Bucket {
        let per_minute = per_minute.max(1);
        Bucket { per_minute, level: i128::from(per_minute) * SCALE, last_ms: now_ms }
    }

    fn capacity(&self) -> i128 {
        i128::from(self.per_minute) * SCALE
    }

    fn refill(&mut self, now_ms: u64) {
        if now_ms > self.last_ms {
            let add = i128::from(now_ms - self.last_ms) * i128::from(self.per_minute);
            self.level = (self.level + add).min(self.capacity());
            self.last_ms = now_ms;
        }
    }

    /// The configured allowance per minute.
    pub fn limit(&self) -> u64 {
        self.per_minute
    }

    /// Take `amount` if the bucket holds it (an amount above the whole allowance needs a full bucket, so one
    /// big request is not refused forever); otherwise when it will.
    pub fn take(&mut self, amount: u64, now_ms: u64) -> Result<(), Limited> {
        self.refill(now_ms);
        let need = (i128::from(amount) * SCALE).min(self.capacity());
        if self.level >= need {
            self.level -= i128::from(amount) * SCALE;
            return Ok(());
        }
        let per_ms = i128::from(self.per_minute);
        let wait = (need - self.level + per_ms - 1) / per_ms;
        Err(Limited { retry_after_ms: u64::try_from(wait).unwrap_or(u64::MAX).max(1) })
    }

    /// Give back `reserved - used` (or take the excess when the request used more than it reserved).
    pub fn settle(&mut self, reserved: u64, used: u64, now_ms: u64) {
        self.refill(now_ms);
        let delta = (i128::from(reserved) - i128::from(used)) * SCALE;
        self.level = (self.level + delta).min(self.capacity());
    }

    /// Take `amount` (negative: give back) whatever the bucket holds: what other replicas used.
    pub fn charge(&mut self, amount: i64, now_ms: u64) {
        self.refill(now_ms);
        self.level = (self.level - i128::from(amount) * SCALE).min(self.capacity());
    }

    /// Whole units available now (0 when below zero).
    pub fn remaining(&mut self, now_ms: u64) -> u64 {
        self.refill(now_ms);
        u64::try_from(self.level.max(0) / SCALE).unwrap_or(0)
    }

    /// Milliseconds until the bucket is full again (OpenAI's `x-ratelimit-reset-*`).
    pub fn reset_ms(&mut self, now_ms: u64) -> u64 {
        self.refill(now_ms);
        let missing = self.capacity() - self.level;
        let per_ms = i128::from(self.per_minute);
        u64::try_from((missing + per_ms - 1) / per_ms).unwrap_or(u64::MAX)
    }
}

/// What a client's limits allow a request that reserves `tokens`: both buckets, or neither.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// Requests per minute, if limited.
    pub requests: Option<Bucket>,
    /// Tokens per minute, if limited.
    pub tokens: Option<Bucket>,
    /// Requests and tokens taken here and not yet handed to the fleet ([`Limits::take_unshared`]).
    unshared: (i64, i64),
}

/// Which limit refused a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Which {
    /// `rpm`.
    Requests,
    /// `tpm`.
    Tokens,
}

/// A snapshot for the `x-ratelimit-*` headers: (limit, remaining, reset ms) per limit that exists.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Snapshot {
    /// Requests per minute: limit, remaining, ms until full.
    pub requests: Option<(u64, u64, u64)>,
    /// Tokens per minute: limit, remaining, ms until full.
    pub tokens: Option<(u64, u64, u64)>,
}

impl Limits {
    /// Limits of `rpm` requests and `tpm` tokens a minute, full at `now_ms`.
    pub fn new(rpm: Option<u64>, tpm: Option<u64>, now_ms: u64) -> Limits {
        Limits {
            requests: rpm.map(|n| Bucket::new(n, now_ms)),
            tokens: tpm.map(|n| Bucket::new(n, now_ms)),
            unshared: (0, 0),
        }
    }

    /// Admit one request reserving `tokens`, taking from both buckets, or from neither when either refuses.
    pub fn admit(&mut self, tokens: u64, now_ms: u64) -> Result<(), (Which, Limited)> {
        if let Some(r) = &mut self.requests {
            r.take(1, now_ms).map_err(|l| (Which::Requests, l))?;
        }
        if let Some(t) = &mut self.tokens {
            if let Err(l) = t.take(tokens, now_ms) {
                if let Some(r) = &mut self.requests {
                    r.settle(1, 0, now_ms);
                }
                return Err((Which::Tokens, l));
            }
        }
        self.unshared.0 += 1;
        self.unshared.1 += i64::try_from(tokens).unwrap_or(i64::MAX);
        Ok(())
    }

    /// Whether any limit is set (only then is there anything to share).
    pub fn is_limited(&self) -> bool {
        self.requests.is_some() || self.tokens.is_some()
    }

    /// Requests and tokens (net of what settling gave back) taken here since the last call, for the fleet's
    /// counters (`[state] backend = "redis"`); this state forgets them.
    pub fn take_unshared(&mut self) -> (i64, i64) {
        std::mem::take(&mut self.unshared)
    }

    /// Charge what the *other* replicas used since the last flush: `requests` and `tokens` leave the buckets
    /// whatever they hold (they may go below zero; negative figures give back), so this replica admits only
    /// what the fleet together has left.
    pub fn charge_remote(&mut self, requests: i64, tokens: i64, now_ms: u64) {
        if let Some(r) = &mut self.requests {
            r.charge(requests, now_ms);
        }
        if let Some(t) = &mut self.tokens {
            t.charge(tokens, now_ms);
        }
    }

    /// A request that reserved `reserved` tokens finished having used `used`.
    pub fn settle(&mut self, reserved: u64, used: u64, now_ms: u64) {
        if let Some(t) = &mut self.tokens {
            t.settle(reserved, used, now_ms);
        }
        self.unshared.1 += i64::try_from(used).unwrap_or(i64::MAX) - i64::try_from(reserved).unwrap_or(i64::MAX);
    }

    /// The header figures now.
    pub fn snapshot(&mut self, now_ms: u64) -> Snapshot {
        let f = |b: &mut Option<Bucket>| b.as_mut().map(|b| (b.limit(), b.remaining(now_ms), b.reset_ms(now_ms)));
        Snapshot { requests: f(&mut self.requests), tokens: f(&mut self.tokens) }
    }
}

/// A duration as OpenAI writes it in `x-ratelimit-reset-*`: `20ms`, `1s`, `6.5s`, `6m0s`, `1h2m3s`.
pub fn format_reset(ms: u64) -> String {
    let mut s = String::with_capacity(16);
    write_reset(ms, &mut s);
    s
}

/// [`format_reset`] appended to `out`, without formatting machinery (it is written on every answer to a
/// client with limits, twice).
pub fn write_reset(ms: u64, out: &mut String) {
    if ms < 1000 {
        out.push_str(itoa::Buffer::new().format(ms));
        out.push_str("ms");
        return;
    }
    let (h, rest) = (ms / 3_600_000, ms % 3_600_000);
    let (m, rest) = (rest / 60_000, rest % 60_000);
    if h > 0 {
        out.push_str(itoa::Buffer::new().format(h));
        out.push('h');
    }
    if h > 0 || m > 0 {
        out.push_str(itoa::Buffer::new().format(m));
        out.push('m');
    }
    out.push_str(itoa::Buffer::new().format(rest / 1000));
    if rest % 1000 != 0 {
        // Three digits (1000 + frac without its leading 1), without the trailing zeros.
        let mut digits = itoa::Buffer::new();
        out.push('.');
        out.push_str(digits.format(1000 + rest % 1000)[1..].trim_end_matches('0'));
    }
    out.push('s');
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rpm_refills_continuously() {
        let mut b = Bucket::new(60, 0);
        for _ in 0..60 {
            assert!(b.take(1, 0).is_ok());
        }
        // Empty: one more each second.
        assert_eq!(b.take(1, 0), Err(Limited { retry_after_ms: 1000 }));
        assert_eq!(b.take(1, 400), Err(Limited { retry_after_ms: 600 }));
        assert!(b.take(1, 1000).is_ok());
        assert_eq!((b.remaining(1000), b.reset_ms(1000)), (0, 60_000));
        assert_eq!(b.remaining(31_000), 30);
        assert_eq!(b.remaining(10_000_000), 60, "never above a minute's allowance");
    }

    #[test]
    fn tokens_reserved_then_settled_and_a_bucket_below_zero() {
        let mut l = Limits::new(None, Some(1000), 0);
        assert!(l.admit(600, 0).is_ok());
        assert_eq!(l.admit(600, 0).map_err(|e| e.0), Err(Which::Tokens));
        // The first used only 100: 500 come back.
        l.settle(600, 100, 0);
        assert!(l.admit(600, 0).is_ok());
        // A stream that reserved 300 used 2,000: the bucket goes below zero and later requests wait.
        let mut l = Limits::new(None, Some(1000), 0);
        assert!(l.admit(300, 0).is_ok());
        l.settle(300, 2000, 0);
        assert_eq!(l.snapshot(0).tokens, Some((1000, 0, 120_000)));
        let (w, lim) = l.admit(10, 0).unwrap_err();
        assert_eq!((w, lim.retry_after_ms), (Which::Tokens, 60_600));
    }

    #[test]
    fn a_refusal_takes_nothing_from_the_other_limit() {
        let mut l = Limits::new(Some(10), Some(100), 0);
        assert!(l.admit(100, 0).is_ok());
        assert_eq!(l.admit(1, 0).map_err(|e| e.0), Err(Which::Tokens));
        assert_eq!(l.snapshot(0).requests.map(|r| r.1), Some(9), "the refused request did not count");
        // A request bigger than the whole allowance passes on a full bucket, then drains it.
        let mut l = Limits::new(None, Some(100), 0);
        assert!(l.admit(500, 0).is_ok());
        assert!(l.admit(1, 0).is_err());
    }

    #[test]
    fn what_others_used_is_charged_and_what_was_taken_here_is_handed_over_once() {
        let mut l = Limits::new(Some(10), Some(1000), 0);
        assert!(l.admit(100, 0).is_ok());
        assert!(l.admit(100, 0).is_ok());
        l.settle(100, 40, 0);
        assert!(l.admit(5000, 0).is_err(), "a refusal is not counted");
        assert_eq!(l.take_unshared(), (2, 140));
        assert_eq!(l.take_unshared(), (0, 0));
        // The other replicas used 8 requests and 900 tokens: 0 requests left here, tokens below zero.
        l.charge_remote(8, 900, 0);
        assert_eq!(l.snapshot(0).requests.map(|r| r.1), Some(0));
        assert_eq!(l.admit(1, 0).map_err(|e| e.0), Err(Which::Requests));
        assert_eq!(l.take_unshared(), (0, 0), "remote use is not handed back to the fleet");
        // The buckets refill as usual: one request every 6 s at 10 rpm.
        assert!(l.admit(0, 6_000).is_ok());
        // Negative figures give back, never above a minute's allowance.
        l.charge_remote(-100, -100_000, 6_000);
        assert_eq!(l.snapshot(6_000).requests.map(|r| r.1), Some(10));
        assert!(!Limits::new(None, None, 0).is_limited() && l.is_limited());
    }

    #[test]
    fn reset_format_as_openai_writes_it() {
        assert_eq!(format_reset(20), "20ms");
        assert_eq!(format_reset(1000), "1s");
        assert_eq!(format_reset(6500), "6.5s");
        assert_eq!(format_reset(360_000), "6m0s");
        assert_eq!(format_reset(3_723_000), "1h2m3s");
        assert_eq!(format_reset(61_250), "1m1.25s");
        assert_eq!(format_reset(0), "0ms");
        assert_eq!(format_reset(999), "999ms");
        assert_eq!(format_reset(1_001), "1.001s");
        assert_eq!(format_reset(1_010), "1.01s");
        assert_eq!(format_reset(7_200_000), "2h0m0s");
        // As it was written with `format!`, for every value up to a few hours.
        let reference = |ms: u64| {
            if ms < 1000 {
                return format!("{ms}ms");
            }
            let (h, rest) = (ms / 3_600_000, ms % 3_600_000);
            let (m, rest) = (rest / 60_000, rest % 60_000);
            let s = if rest % 1000 == 0 {
                format!("{}s", rest / 1000)
            } else {
                format!("{}s", format!("{}.{:03}", rest / 1000, rest % 1000).trim_end_matches('0'))
            };
            match (h, m) {
                (0, 0) => s,
                (0, m) => format!("{m}m{s}"),
                (h, m) => format!("{h}h{m}m{s}"),
            }
        };
        assert_eq!(format_reset(u64::MAX), reference(u64::MAX));
        for ms in (0..20_000).chain((0..4_000_000).step_by(997)) {
            assert_eq!(format_reset(ms), reference(ms), "{ms}");
        }
    }
}
