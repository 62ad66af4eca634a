//! The layout of the process's log lines: tracing-subscriber's own, except for the access line (target
//! [`ACCESS_TARGET`], one per request), which is written here field by field in the very same layout —
//! integers by `itoa`, floats by `zmij`, names copied as they are when they need no escaping, the timestamp's
//! seconds kept from the line before — for a fraction of what the generic formatter spends on it.
//!
//! It owns no policy of what is logged (the access line's fields are chosen in `pipeline::finish`) and must
//! not change what a line says: the tests below compare its lines with tracing-subscriber's, byte for byte.
//! A terminal with colours gets tracing-subscriber's styled lines.

use std::cell::RefCell;
use std::fmt::{self, Write as _};
use std::time::{SystemTime, UNIX_EPOCH};

use tracing::field::{Field, Visit};
use tracing::{Event, Subscriber};
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::registry::LookupSpan;

use crate::pipeline::ACCESS_TARGET;

/// An event formatter that writes access lines itself and hands every other event to `inner`.
pub struct AccessFast<F> {
    inner: F,
    json: bool,
}

/// The fields of a plain-text line: `message name=value …`, each value as `{:?}` writes it, without the styling
/// machinery tracing-subscriber's default field formatter runs even when colours are off.
pub fn text_fields() -> impl for<'w> FormatFields<'w> + 'static {
    use tracing_subscriber::field::MakeExt;
    tracing_subscriber::fmt::format::debug_fn(|w, field, value| match field.name() {
        "message" => write!(w, "{value:?}"),
        name => write!(w, "{name}={value:?}"),
    })
    .delimited(" ")
}

impl<F> AccessFast<F> {
    /// Plain text `timestamp  LEVEL target: message name=value …`, as tracing-subscriber's full format
    /// with `debug_fn(name=value)` fields delimited by spaces.
    pub fn text(inner: F) -> Self {
        AccessFast { inner, json: false }
    }

    /// One JSON object per line with the fields flattened beside `timestamp`, `level` and `target`, as
    /// tracing-subscriber's `json().flatten_event(true)` without span lists.
    pub fn json(inner: F) -> Self {
        AccessFast { inner, json: true }
    }
}

impl<S, N, F> FormatEvent<S, N> for AccessFast<F>
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
    F: FormatEvent<S, N>,
{
    fn format_event(&self, ctx: &FmtContext<'_, S, N>, mut w: Writer<'_>, event: &Event<'_>) -> fmt::Result {
        let meta = event.metadata();
        if meta.target() != ACCESS_TARGET || w.has_ansi_escapes() {
            return self.inner.format_event(ctx, w, event);
        }
        #[cfg(test)]
        tests::FAST_LINES.with(|n| n.set(n.get() + 1));
        LINE.with(|buf| {
            // One buffer per thread, reused: the writer copies the line out before the next one starts.
            let mut buf = buf.borrow_mut();
            buf.clear();
            let mut line = Line { out: &mut buf, json: self.json, first: true };
            let level = meta.level().as_str();
            if self.json {
                line.out.push_str("{\"timestamp\":\"");
                timestamp(line.out);
                line.out.push_str("\",\"level\":\"");
                line.out.push_str(level);
                line.out.push('"');
                line.first = false;
            } else {
                timestamp(line.out);
                // A space, then the level right-aligned in five columns.
                for _ in level.len()..6 {
                    line.out.push(' ');
                }
                line.out.push_str(level);
                line.out.push(' ');
                line.out.push_str(ACCESS_TARGET);
                line.out.push_str(": ");
            }
            event.record(&mut line);
            if self.json {
                line.out.push_str(",\"target\":\"");
                line.out.push_str(ACCESS_TARGET);
                line.out.push_str("\"}");
            }
            line.out.push('\n');
            w.write_str(&buf)
        })
    }
}

thread_local! {
    static LINE: RefCell<String> = const { RefCell::new(String::new()) };
    /// The Unix second of the last timestamp written on this thread and its text up to the seconds.
    static SECOND: RefCell<(u64, String)> = const { RefCell::new((u64::MAX, String::new())) };
}

/// RFC 3339 UTC with microseconds (`2026-12-07T01:09:15.072170Z`), as tracing-subscriber writes it.
fn timestamp(out: &mut String) {
    timestamp_at(out, SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default());
}

fn timestamp_at(out: &mut String, now: std::time::Duration) {
    let secs = now.as_secs();
    SECOND.with(|s| {
        let mut s = s.borrow_mut();
        if s.0 != secs {
            s.1.clear();
            let _ =
                write!(s.1, "{}", humantime::format_rfc3339_seconds(UNIX_EPOCH + std::time::Duration::from_secs(secs)));
            s.1.pop(); // the `Z`
            s.0 = secs;
        }
        out.push_str(&s.1);
    });
    let micros = now.subsec_micros();
    let mut digits = itoa::Buffer::new();
    let d = digits.format(micros);
    out.push('.');
    for _ in d.len()..6 {
        out.push('0');
    }
    out.push_str(d);
    out.push('Z');
}

/// The fields of one access line being written.
struct Line<'a> {
    out: &'a mut String,
    json: bool,
    /// No field written yet (text: no delimiter before it).
    first: bool,
}

impl Line<'_> {
    /// The field's name and separator, so that its value comes next.
    fn name(&mut self, field: &Field) {
        if self.json {
            self.out.push_str(",\"");
            self.out.push_str(field.name());
            self.out.push_str("\":");
        } else {
            if !self.first {
                self.out.push(' ');
            }
            if field.name() != "message" {
                self.out.push_str(field.name());
                self.out.push('=');
            }
        }
        self.first = false;
    }

    /// A string value quoted: as `{:?}` writes it (text) or as JSON (json). Printable ASCII without quotes or
    /// backslashes reads the same in both and is copied as it is.
    fn quoted(&mut self, s: &str) {
        if s.bytes().all(|b| (0x20..0x7f).contains(&b) && b != b'"' && b != b'\\') {
            self.out.push('"');
            self.out.push_str(s);
            self.out.push('"');
        } else if self.json {
            // Rare (a name with quotes, backslashes, control or non-ASCII characters): serde_json's escaping.
            self.out.push_str(&serde_json::to_string(s).unwrap_or_default());
        } else {
            let _ = write!(self.out, "{s:?}");
        }
    }

    fn unsigned(&mut self, n: u64) {
        self.out.push_str(itoa::Buffer::new().format(n));
    }
}

impl Visit for Line<'_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        self.name(field);
        self.quoted(value);
    }

    fn record_u64(&mut self, field: &Field, value: u64) {
        self.name(field);
        self.unsigned(value);
    }

    fn record_i64(&mut self, field: &Field, value: i64) {
        self.name(field);
        if value < 0 {
            self.out.push('-');
        }
        self.unsigned(value.unsigned_abs());
    }

    fn record_bool(&mut self, field: &Field, value: bool) {
        self.name(field);
        self.out.push_str(if value { "true" } else { "false" });
    }

    fn record_f64(&mut self, field: &Field, value: f64) {
        self.name(field);
        if self.json {
            // As serde_json writes a float (zmij); JSON has no NaN or infinity: null.
            match value.is_finite() {
                true => self.out.push_str(zmij::Buffer::new().format_finite(value)),
                false => self.out.push_str("null"),
            }
        } else if (1e-4..1e9).contains(&value.abs()) {
            // `{:?}` writes the shortest decimal that reads back, without an exponent in this range: so does
            // zmij (compared over many values below). Far above it the two break ties between two shortest
            // decimals differently (`…315.2` and `…315.3` for `…315.25`).
            self.out.push_str(zmij::Buffer::new().format_finite(value));
        } else {
            let _ = write!(self.out, "{value:?}");
        }
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.name(field);
        let start = self.out.len();
        let _ = write!(self.out, "{value:?}");
        if self.json {
            // A JSON string of what `{:?}` wrote.
            let text = self.out.split_off(start);
            self.quoted(&text);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use tracing_subscriber::fmt::format::{self, JsonFields};

    use super::*;

    thread_local! {
        /// Access lines this thread wrote by the fast path.
        pub(super) static FAST_LINES: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
    }

    /// Everything written by a subscriber built by `build` while `f` ran.
    fn capture(build: impl FnOnce(Writes) -> Box<dyn Subscriber + Send + Sync>, f: impl Fn()) -> String {
        let w = Writes::default();
        tracing::subscriber::with_default(build(w.clone()), f);
        let out = w.0.lock().unwrap().clone();
        String::from_utf8(out).unwrap()
    }

    #[derive(Clone, Default)]
    struct Writes(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Writes {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    type Builder = tracing_subscriber::fmt::SubscriberBuilder<
        format::DefaultFields,
        format::Format,
        tracing::level_filters::LevelFilter,
        Box<dyn Fn() -> Writes + Send + Sync>,
    >;

    fn builder(w: Writes) -> Builder {
        tracing_subscriber::fmt().with_ansi(false).with_writer(Box::new(move || w.clone()))
    }

    fn generic_text(w: Writes) -> Box<dyn Subscriber + Send + Sync> {
        Box::new(builder(w).fmt_fields(text_fields()).finish())
    }

    fn fast_text(w: Writes) -> Box<dyn Subscriber + Send + Sync> {
        Box::new(builder(w).fmt_fields(text_fields()).event_format(AccessFast::text(format::format())).finish())
    }

    fn json_format() -> format::Format<format::Json> {
        format::format().json().flatten_event(true).with_current_span(false).with_span_list(false)
    }

    fn generic_json(w: Writes) -> Box<dyn Subscriber + Send + Sync> {
        Box::new(builder(w).fmt_fields(JsonFields::new()).event_format(json_format()).finish())
    }

    fn fast_json(w: Writes) -> Box<dyn Subscriber + Send + Sync> {
        Box::new(builder(w).fmt_fields(JsonFields::new()).event_format(AccessFast::json(json_format())).finish())
    }

    /// The lines without their timestamps (which differ by the time between two runs).
    fn untimed(s: &str) -> Vec<String> {
        s.lines()
            .map(|l| match l.strip_prefix("{\"timestamp\":\"") {
                Some(rest) => rest[rest.find('"').unwrap()..].to_string(),
                None => l[l.find(' ').unwrap()..].to_string(),
            })
            .collect()
    }

    fn events() {
        let id = crate::log::RequestId(0x0123_4567_89ab_cdef);
        for (name, latency, cost, attempts) in [
            ("gpt-4.1", 36.63, 0.000596, 1u32),
            ("say \"hi\"\\ \n\ttab", 34.0, 0.0, 3),
            ("größe-模型", 1e-7, 5.96e-5, 0),
            ("\u{7f}\u{1b}", 1e16, 123456.789, 7),
            ("", -2.5, f64::NAN, 2),
            ("x", f64::INFINITY, -0.0, 1),
        ] {
            tracing::info!(
                target: ACCESS_TARGET,
                request_id = %id,
                client = name,
                attempts,
                status = 200u16,
                delta = -42i64,
                latency_ms = latency,
                cost_usd = cost,
                stream = attempts % 2 == 0,
                debug = ?(name, attempts),
                "request"
            );
        }
        tracing::warn!(endpoint = "primary", status = 503, "circuit breaker opened");
    }

    #[test]
    fn access_lines_read_exactly_as_the_generic_formatter_writes_them() {
        for (generic, fast) in [
            (generic_text as fn(Writes) -> Box<dyn Subscriber + Send + Sync>, fast_text as fn(Writes) -> _),
            (generic_json, fast_json),
        ] {
            let before = FAST_LINES.with(|n| n.get());
            let (want, got) = (capture(generic, events), capture(fast, events));
            assert_eq!(FAST_LINES.with(|n| n.get()) - before, 6, "the access lines took the fast path");
            assert_eq!(untimed(&got), untimed(&want), "\n{got}\n{want}");
            assert_eq!(got.lines().count(), 7);
        }
        // The JSON lines are JSON objects with the fields at the top level.
        let json = capture(fast_json, events);
        let first: serde_json::Value = serde_json::from_str(json.lines().next().unwrap()).unwrap();
        assert_eq!(first["request_id"], "req_0123456789abcdef");
        assert_eq!(first["target"], ACCESS_TARGET);
        assert_eq!(first["latency_ms"], 36.63);
    }

    #[test]
    fn floats_read_as_debug_writes_them() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::SmallRng::seed_from_u64(7);
        let field = tracing::field::FieldSet::new(&["x"], tracing::callsite::Identifier(&CALLSITE));
        let x = field.field("x").unwrap();
        for i in 0..200_000 {
            let v = match i % 5 {
                0 => f64::from_bits(rng.gen()),
                1 => rng.gen_range(0.0..1e6),
                2 => (rng.gen_range(0.0..1e6f64) * 100.0).round() / 100.0,
                3 => rng.gen_range(0.0..1e-3),
                // Every magnitude from 1e-6 to 1e12.
                _ => 10f64.powf(rng.gen_range(-6.0..12.0)),
            };
            let mut out = String::new();
            Line { out: &mut out, json: false, first: true }.record_f64(&x, v);
            assert_eq!(out, format!("x={v:?}"));
            out.clear();
            Line { out: &mut out, json: true, first: false }.record_f64(&x, v);
            let want = serde_json::to_string(&v).unwrap();
            assert_eq!(out, format!(",\"x\":{want}"));
        }
    }

    struct Callsite;
    static CALLSITE: Callsite = Callsite;
    impl tracing::callsite::Callsite for Callsite {
        fn set_interest(&self, _: tracing::subscriber::Interest) {}
        fn metadata(&self) -> &tracing::Metadata<'_> {
            unreachable!()
        }
    }

    #[test]
    fn timestamps_are_rfc3339_with_microseconds() {
        for (s, us) in [(0u64, 0u32), (1_796_605_755, 72_170), (1_796_605_755, 999_999), (4_102_444_800, 5)] {
            let mut out = String::new();
            let d = std::time::Duration::new(s, us * 1000 + 999);
            timestamp_at(&mut out, d);
            let want = humantime::format_rfc3339_micros(UNIX_EPOCH + d).to_string();
            assert_eq!(out, want);
        }
    }
}
