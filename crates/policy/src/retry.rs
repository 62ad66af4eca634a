//! Retry decisions: what an upstream status means, how long to wait before the next
//! attempt, and what an upstream's `Retry-After` asks for.
//!
//! **Invariant:** pure and synchronous. It does no I/O, never sleeps and reads no
//! clock: the current time and the random source are arguments. It decides nothing
//! about which endpoint comes next (that is `balance`) nor about breaker state
//! (that is `breaker`; [`counts_as_failure`] is the bridge).

use rand::Rng;

/// What an upstream HTTP status means for the gateway.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Verdict {
    /// 2xx: the answer goes to the client.
    Success,
    /// A 4xx other than 401, 408 and 429 (403 included: relays answer it to one prompt their moderation
    /// flags): the request's fault, returned at once, not retried, no verdict on the key or the endpoint.
    ClientError,
    /// 401: the API key is refused; the key is suspect (a probe with it confirms before it is set aside) and
    /// the request may try another key or endpoint.
    AuthError,
    /// 429: the upstream sheds load; try elsewhere, honour `Retry-After`.
    RateLimited,
    /// 408, 5xx and anything unexpected (1xx, 3xx, out of range): the endpoint's fault; retry.
    Retriable,
}

impl Verdict {
    /// A low-cardinality label: `success`, `client_error`, `auth_error`, `rate_limited`, `retriable`.
    pub fn as_str(self) -> &'static str {
        match self {
            Verdict::Success => "success",
            Verdict::ClientError => "client_error",
            Verdict::AuthError => "auth_error",
            Verdict::RateLimited => "rate_limited",
            Verdict::Retriable => "retriable",
        }
    }
}

/// Classifies an upstream HTTP status.
///
/// 2xx → Success; 401 → AuthError; 429 → RateLimited; 408 and 5xx → Retriable;
/// every other 4xx (400, 403, 404, 409, 413, 422, …) → ClientError. Statuses an API
/// should never answer with (1xx, 3xx, outside 100..=599) are treated as the
/// endpoint misbehaving → Retriable.
pub fn classify_status(status: u16) -> Verdict {
    match status {
        200..=299 => Verdict::Success,
        401 => Verdict::AuthError,
        408 => Verdict::Retriable,
        429 => Verdict::RateLimited,
        400..=499 => Verdict::ClientError,
        _ => Verdict::Retriable,
    }
}

/// Whether the verdict counts as a failure for the endpoint's circuit breaker:
/// RateLimited and Retriable do; Success and ClientError do not; AuthError does not
/// either (the key pool handles it, the endpoint itself is fine).
pub fn counts_as_failure(v: Verdict) -> bool {
    matches!(v, Verdict::RateLimited | Verdict::Retriable)
}

/// Whether another attempt (another key, endpoint or fallback model) may help:
/// AuthError, RateLimited and Retriable. A ClientError goes back to the client as it is.
pub fn may_try_elsewhere(v: Verdict) -> bool {
    matches!(v, Verdict::AuthError | Verdict::RateLimited | Verdict::Retriable)
}

/// Exponential backoff with "equal jitter" between attempts on the same endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    /// Delay ceiling of the first retry, in milliseconds.
    pub base_ms: u64,
    /// Cap of every delay, in milliseconds.
    pub max_ms: u64,
}

impl Default for Backoff {
    /// The contract defaults: 50 ms base, 2 s cap.
    fn default() -> Self {
        Backoff { base_ms: 50, max_ms: 2_000 }
    }
}

impl Backoff {
    /// The ceiling before jitter for retry `retry_index` (0 = first retry):
    /// `min(base × 2^retry_index, max)`.
    pub fn ceiling_ms(&self, retry_index: u32) -> u64 {
        let factor = 1u64.checked_shl(retry_index).unwrap_or(u64::MAX);
        self.base_ms.saturating_mul(factor).min(self.max_ms)
    }

    /// The delay before retry `retry_index` (0 = first retry): with `c` the
    /// [`Backoff::ceiling_ms`], half of `c` is fixed and the other half uniform
    /// random, so the delay lies in `[c - c/2, c]`.
    pub fn delay_ms<R: Rng + ?Sized>(&self, retry_index: u32, rng: &mut R) -> u64 {
        let ceiling = self.ceiling_ms(retry_index);
        let fixed = ceiling - ceiling / 2;
        fixed + rng.gen_range(0..=ceiling / 2)
    }
}

/// Parses a `Retry-After` value into milliseconds from now.
///
/// Accepts delta-seconds (`"120"`, also fractional `"1.5"`) and an HTTP-date in
/// IMF-fixdate form (`"Wed, 21 Oct 2015 07:28:00 GMT"`) or the obsolete RFC 850
/// and asctime forms that HTTP recipients must accept. A date at or before
/// `now_unix_secs` gives 0. Anything else, negative numbers included, gives `None`.
/// Huge values saturate.
pub fn parse_retry_after(value: &str, now_unix_secs: u64) -> Option<u64> {
    let value = value.trim();
    if let Some(ms) = parse_delta_seconds(value) {
        return Some(ms);
    }
    let at = parse_http_date(value)?;
    let now = i64::try_from(now_unix_secs).unwrap_or(i64::MAX);
    let secs = at.saturating_sub(now).max(0);
    Some(u64::try_from(secs).unwrap_or(0).saturating_mul(1_000))
}

/// `DIGITS [ "." DIGITS ]` seconds → milliseconds (fraction rounded down to the ms).
fn parse_delta_seconds(s: &str) -> Option<u64> {
    let (int, frac) = match s.split_once('.') {
        Some((i, f)) => (i, Some(f)),
        None => (s, None),
    };
    if int.is_empty() || !int.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let mut ms: u64 = 0;
    for b in int.bytes() {
        ms = ms.saturating_mul(10).saturating_add(u64::from(b - b'0'));
    }
    ms = ms.saturating_mul(1_000);
    if let Some(frac) = frac {
        if frac.is_empty() || !frac.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        let mut scale = 100;
        for b in frac.bytes().take(3) {
            ms = ms.saturating_add(u64::from(b - b'0') * scale);
            scale /= 10;
        }
    }
    Some(ms)
}

const MONTHS: [&str; 12] = ["Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"];
const DAYS: [&str; 7] = ["Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun"];
const LONG_DAYS: [&str; 7] = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"];

/// An HTTP-date → seconds since the Unix epoch (may be negative before 1970).
/// The day name must be valid but is not checked against the date.
fn parse_http_date(s: &str) -> Option<i64> {
    let (day_name, rest) = match s.split_once(", ") {
        Some(parts) => parts,
        None => return parse_asctime(s),
    };
    let fields: Vec<&str> = rest.split(' ').collect();
    if DAYS.contains(&day_name) {
        // IMF-fixdate: "21 Oct 2015 07:28:00 GMT"
        let [day, month, year, time, "GMT"] = fields.as_slice() else {
            return None;
        };
        let year = number(year, 4)?;
        timestamp(year, month, number(day, 2)?, time)
    } else if LONG_DAYS.contains(&day_name) {
        // RFC 850: "21-Oct-15 07:28:00 GMT"; two-digit years that look more than
        // 50 years in the future are taken as the past century (RFC 9110 §5.6.7).
        let [date, time, "GMT"] = fields.as_slice() else {
            return None;
        };
        let mut parts = date.split('-');
        let (Some(day), Some(month), Some(yy), None) = (parts.next(), parts.next(), parts.next(), parts.next()) else {
            return None;
        };
        let yy = number(yy, 2)?;
        let year = if yy < 70 { 2000 + yy } else { 1900 + yy };
        timestamp(year, month, number(day, 2)?, time)
    } else {
        None
    }
}

/// asctime: "Wed Oct 21 07:28:00 2015" (a one-digit day is padded with a space).
fn parse_asctime(s: &str) -> Option<i64> {
    let (day_name, rest) = s.split_once(' ')?;
    if !DAYS.contains(&day_name) {
        return None;
    }
    let (month, rest) = rest.split_once(' ')?;
    let rest = rest.strip_prefix(' ').unwrap_or(rest);
    let [day, time, year] = rest.split(' ').collect::<Vec<_>>()[..] else {
        return None;
    };
    if day.is_empty() || day.len() > 2 {
        return None;
    }
    timestamp(number(year, 4)?, month, number(day, day.len())?, time)
}

/// Exactly `len` ASCII digits → their value.
fn number(s: &str, len: usize) -> Option<i64> {
    if s.len() != len || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse().ok()
}

/// Validated calendar fields and "HH:MM:SS" → Unix seconds.
fn timestamp(year: i64, month: &str, day: i64, time: &str) -> Option<i64> {
    let month = MONTHS.iter().position(|m| *m == month)? as i64 + 1;
    if day < 1 || day > days_in_month(year, month) {
        return None;
    }
    let mut hms = time.split(':');
    let (Some(h), Some(m), Some(sec), None) = (hms.next(), hms.next(), hms.next(), hms.next()) else {
        return None;
    };
    let (h, m, sec) = (number(h, 2)?, number(m, 2)?, number(sec, 2)?);
    // 60 allows a leap second.
    if h > 23 || m > 59 || sec > 60 {
        return None;
    }
    Some(days_since_epoch(year, month, day) * 86_400 + h * 3_600 + m * 60 + sec)
}

fn is_leap(year: i64) -> bool {
    (year % 4 == 0 && year % 100 != 0) || year % 400 == 0
}

fn days_in_month(year: i64, month: i64) -> i64 {
    match month {
        2 if is_leap(year) => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    }
}

/// Days from 1970-01-01 to the given proleptic Gregorian date.
fn days_since_epoch(year: i64, month: i64, day: i64) -> i64 {
    // Count days from 0000-03-01 so that February, with its leap day, ends each year.
    let (y, m) = if month <= 2 { (year - 1, month + 9) } else { (year, month - 3) };
    let day_of_year = (153 * m + 2) / 5 + day - 1;
    let days = 365 * y + y.div_euclid(4) - y.div_euclid(100) + y.div_euclid(400) + day_of_year;
    // 719_468 days separate 0000-03-01 from 1970-01-01.
    days - 719_468
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::rngs::SmallRng;
    use rand::SeedableRng;

    #[test]
    fn classify_every_status_family() {
        for s in [200, 201, 204, 299] {
            assert_eq!(classify_status(s), Verdict::Success, "{s}");
        }
        for s in [400, 404, 409, 413, 422, 418, 499] {
            assert_eq!(classify_status(s), Verdict::ClientError, "{s}");
        }
        assert_eq!(classify_status(401), Verdict::AuthError);
        assert_eq!(classify_status(403), Verdict::ClientError);
        assert_eq!(classify_status(429), Verdict::RateLimited);
        for s in [408, 500, 502, 503, 504, 529, 599] {
            assert_eq!(classify_status(s), Verdict::Retriable, "{s}");
        }
        for s in [0, 100, 101, 301, 304, 600, u16::MAX] {
            assert_eq!(classify_status(s), Verdict::Retriable, "{s}");
        }
    }

    #[test]
    fn breaker_and_failover_views_of_verdicts() {
        use Verdict::*;
        let table = [
            (Success, false, false, "success"),
            (ClientError, false, false, "client_error"),
            (AuthError, false, true, "auth_error"),
            (RateLimited, true, true, "rate_limited"),
            (Retriable, true, true, "retriable"),
        ];
        for (v, failure, elsewhere, label) in table {
            assert_eq!(counts_as_failure(v), failure, "{v:?}");
            assert_eq!(may_try_elsewhere(v), elsewhere, "{v:?}");
            assert_eq!(v.as_str(), label);
        }
    }

    #[test]
    fn backoff_ceiling_doubles_and_caps() {
        let b = Backoff { base_ms: 50, max_ms: 2_000 };
        let c: Vec<u64> = (0..8).map(|i| b.ceiling_ms(i)).collect();
        assert_eq!(c, [50, 100, 200, 400, 800, 1_600, 2_000, 2_000]);
        assert_eq!(b.ceiling_ms(63), 2_000);
        assert_eq!(b.ceiling_ms(64), 2_000);
        assert_eq!(b.ceiling_ms(u32::MAX), 2_000);
        assert_eq!(Backoff::default(), b);
    }

    #[test]
    fn backoff_jitter_stays_within_equal_jitter_bounds() {
        let b = Backoff::default();
        for seed in 0..200 {
            let mut rng = SmallRng::seed_from_u64(seed);
            for i in 0..10 {
                let c = b.ceiling_ms(i);
                let d = b.delay_ms(i, &mut rng);
                assert!(d >= c - c / 2 && d <= c, "retry {i}: {d} not in [{}, {c}]", c - c / 2);
            }
        }
    }

    #[test]
    fn backoff_jitter_covers_the_range() {
        let b = Backoff { base_ms: 1_000, max_ms: 1_000 };
        let mut rng = SmallRng::seed_from_u64(1);
        let ds: Vec<u64> = (0..10_000).map(|_| b.delay_ms(0, &mut rng)).collect();
        let (lo, hi) = (ds.iter().min().copied(), ds.iter().max().copied());
        assert_eq!((lo, hi), (Some(500), Some(1_000)));
        let mean = ds.iter().sum::<u64>() as f64 / ds.len() as f64;
        assert!((mean - 750.0).abs() < 10.0, "{mean}");
    }

    #[test]
    fn backoff_degenerate_values() {
        let mut rng = SmallRng::seed_from_u64(3);
        let zero = Backoff { base_ms: 0, max_ms: 0 };
        assert_eq!(zero.delay_ms(5, &mut rng), 0);
        let one = Backoff { base_ms: 1, max_ms: 10 };
        assert_eq!(one.delay_ms(0, &mut rng), 1);
        let huge = Backoff { base_ms: u64::MAX, max_ms: u64::MAX };
        assert!(huge.delay_ms(3, &mut rng) >= u64::MAX / 2);
    }

    #[test]
    fn retry_after_delta_seconds() {
        assert_eq!(parse_retry_after("120", 0), Some(120_000));
        assert_eq!(parse_retry_after(" 0 ", 0), Some(0));
        assert_eq!(parse_retry_after("1.5", 0), Some(1_500));
        assert_eq!(parse_retry_after("0.25", 0), Some(250));
        assert_eq!(parse_retry_after("2.0009", 0), Some(2_000));
        assert_eq!(parse_retry_after("99999999999999999999999", 0), Some(u64::MAX));
        for bad in ["", "-1", "+1", "1.", ".5", "1e3", "inf", "NaN", "1 2", "0x10"] {
            assert_eq!(parse_retry_after(bad, 0), None, "{bad:?}");
        }
    }

    #[test]
    fn retry_after_imf_fixdate() {
        // 2015-10-21T07:28:00Z is 1_445_412_480.
        let at: u64 = 1_445_412_480;
        let date = "Wed, 21 Oct 2015 07:28:00 GMT";
        assert_eq!(parse_http_date(date), Some(1_445_412_480));
        assert_eq!(parse_retry_after(date, at - 90), Some(90_000));
        assert_eq!(parse_retry_after(date, at), Some(0));
        assert_eq!(parse_retry_after(date, at + 3_600), Some(0), "past dates are 0");
    }

    #[test]
    fn http_date_calendar_math() {
        let cases = [
            ("Thu, 01 Jan 1970 00:00:00 GMT", 0),
            ("Wed, 31 Dec 1969 23:59:59 GMT", -1),
            ("Tue, 29 Feb 2000 12:00:00 GMT", 951_825_600),
            ("Sat, 01 Mar 2100 00:00:00 GMT", 4_107_542_400),
            ("Sun, 06 Nov 1994 08:49:37 GMT", 784_111_777),
            ("Fri, 31 Dec 2038 23:59:60 GMT", 2_177_452_800),
        ];
        for (s, want) in cases {
            assert_eq!(parse_http_date(s), Some(want), "{s}");
        }
    }

    #[test]
    fn http_date_obsolete_forms() {
        let want = Some(784_111_777);
        assert_eq!(parse_http_date("Sunday, 06-Nov-94 08:49:37 GMT"), want);
        assert_eq!(parse_http_date("Sun Nov  6 08:49:37 1994"), want);
        assert_eq!(parse_http_date("Sun Nov 06 08:49:37 1994"), want);
        assert_eq!(parse_http_date("Thursday, 01-Jan-26 00:00:00 GMT"), Some(1_767_225_600));
    }

    #[test]
    fn http_date_rejects_malformed() {
        for bad in [
            "Wed, 21 Oct 2015 07:28:00 UTC",
            "Wed, 21 Oct 2015 07:28 GMT",
            "Wed, 21 October 2015 07:28:00 GMT",
            "Wed, 32 Oct 2015 07:28:00 GMT",
            "Wed, 29 Feb 2015 07:28:00 GMT",
            "Wed, 21 Oct 2015 24:00:00 GMT",
            "Wed, 21 Oct 2015 07:60:00 GMT",
            "Wed, 21 Oct 2015 07:28:61 GMT",
            "Wed, 1 Oct 2015 07:28:00 GMT",
            "Wed, 21 Oct 15 07:28:00 GMT",
            "Xyz, 21 Oct 2015 07:28:00 GMT",
            "Wed,21 Oct 2015 07:28:00 GMT",
            "Wed, 21 Oct 2015 07:28:00 GMT extra",
            "Wednesday, 21-Oct-2015 07:28:00 GMT",
            "Wed Oct 21 07:28:00",
            "tomorrow",
        ] {
            assert_eq!(parse_retry_after(bad, 0), None, "{bad:?}");
        }
    }
}
