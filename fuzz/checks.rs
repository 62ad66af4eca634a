//! The invariants the fuzz targets check, one function per target, shared by the fuzz targets
//! (`fuzz/fuzz_targets/*.rs`) and the corpus replay of the normal test suite (`tests/fuzz_corpus.rs`), which runs
//! every file under `fuzz/regressions/<target>/` through the same function.
//!
//! A function panics when an invariant does not hold; it must not do I/O, keep state between calls or depend
//! on the clock, so that an input that failed once fails the same way when replayed.
#![allow(dead_code)]

use bytes::Bytes;
use serde::de::{Deserializer, IgnoredAny, MapAccess, Visitor};
use serde_json::Value;
use sheepdog::protocol::openai::{
    answer_usage, check_answer, inspect_chat, inspect_embeddings, upstream_body, usage_forced, SseScanner,
};
use sheepdog::protocol::{Api, ApiError, RequestInfo};

/// `inspect_chat`, `inspect_embeddings` and `upstream_body`: a refusal is a 400 in the OpenAI error shape; an
/// accepted body is a JSON object whose `model_span` is the model's JSON string; a rewrite changes nothing but
/// that string (and, for a stream whose client did not ask for usage, sets `stream_options.include_usage`), and
/// the rewritten body is accepted again with the new name and the same flags.
pub fn request(data: &[u8]) {
    let body = Bytes::copy_from_slice(data);
    type Inspect = fn(&[u8]) -> Result<RequestInfo, ApiError>;
    for inspect in [inspect_chat as Inspect, inspect_embeddings] {
        let info = match inspect(&body) {
            Ok(info) => info,
            Err(e) => {
                assert_eq!(e.status.as_u16(), 400, "{e}");
                let v: Value = serde_json::from_slice(&e.body()).expect("an error body is JSON");
                for field in ["message", "type", "code"] {
                    assert!(v["error"][field].is_string(), "error.{field} in {v}");
                }
                continue;
            }
        };
        assert!(!info.model.is_empty());
        let span = info.model_span.clone();
        let decoded: String = serde_json::from_slice(&body[span.clone()]).expect("the model span is a JSON string");
        assert_eq!(decoded, info.model);
        let original: Value = serde_json::from_slice(&body).expect("an accepted body is JSON");
        assert!(original.is_object());
        let tail = body.len() - span.end;
        for new in ["gpt-4.1", "openai/gpt-4.1", "a\"b\\c\u{1F600}\n\u{7f}", info.model.as_str()] {
            let out = upstream_body(&body, &info, new);
            let forced = usage_forced(&info);
            if !forced {
                assert_eq!(&out[..span.start], &body[..span.start], "bytes before the model");
                assert_eq!(&out[out.len() - tail..], &body[span.end..], "bytes after the model");
            }
            let again = inspect(&out).unwrap_or_else(|e| panic!("a rewritten request is refused: {e}"));
            assert_eq!(again.model, new);
            assert_eq!((again.stream, again.include_usage), (info.stream, info.include_usage || forced));
            let mut rewritten: Value = serde_json::from_slice(&out).expect("a rewritten body is JSON");
            let mut expected = original.clone();
            if forced {
                if !expected["stream_options"].is_object() {
                    expected["stream_options"] = Value::Object(Default::default());
                }
                expected["stream_options"]["include_usage"] = Value::Bool(true);
            }
            expected["model"] = Value::from(new);
            rewritten["model"] = Value::from(new);
            assert_eq!(rewritten, expected, "a rewrite changes only the model");
        }
    }
}

/// What a scanner made of a whole stream.
#[derive(Debug, PartialEq)]
struct Scan {
    out: Vec<u8>,
    usage: Option<sheepdog_policy::pricing::Tokens>,
    first: Option<sheepdog::protocol::openai::FirstEvent>,
    done: bool,
}

fn scan(frames: &[&[u8]]) -> Scan {
    let mut s = SseScanner::new();
    let mut out = Vec::new();
    for f in frames {
        let scanned = s.feed(Bytes::copy_from_slice(f));
        assert_eq!(scanned.done, s.done());
        out.extend_from_slice(&scanned.out);
    }
    out.extend_from_slice(&s.finish());
    assert!(s.finish().is_empty(), "finish twice gives nothing more");
    Scan { out, usage: s.usage(), first: s.first_event().cloned(), done: s.done() }
}

/// The part of `stream` a scanner hands on, by the rule stated plainly: everything up to the end of the event
/// whose line is `data: [DONE]` (the first blank line at or after that line), or all of it; and whether that
/// line came.
fn expected_out(stream: &[u8]) -> (&[u8], bool) {
    let mut at = 0;
    while at < stream.len() {
        let nl = stream[at..].iter().position(|&b| b == b'\n').map(|i| at + i);
        let line = &stream[at..nl.unwrap_or(stream.len())];
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if line.strip_prefix(b"data:").is_some_and(|d| d.trim_ascii() == b"[DONE]") {
            let Some(mut i) = nl else { return (stream, true) };
            while i < stream.len() {
                if stream[i] == b'\n' {
                    if stream.get(i + 1) == Some(&b'\n') {
                        return (&stream[..i + 2], true);
                    }
                    if stream.get(i + 1) == Some(&b'\r') && stream.get(i + 2) == Some(&b'\n') {
                        return (&stream[..i + 3], true);
                    }
                }
                i += 1;
            }
            return (stream, true);
        }
        match nl {
            Some(n) => at = n + 1,
            None => break,
        }
    }
    (stream, false)
}

/// `SseScanner`: the input is `[n, n cut positions as u16 pairs…, stream…]`. What comes out is the stream up to
/// and including the `[DONE]` event and nothing after it (so always a prefix of the input); feeding the stream
/// whole, cut at the given positions, or byte by byte gives the same output, usage, first event and end.
pub fn sse(data: &[u8]) {
    let Some((&n, rest)) = data.split_first() else { return };
    let n = usize::from(n % 8);
    if rest.len() < 2 * n {
        return;
    }
    let (spec, stream) = rest.split_at(2 * n);
    let mut cuts: Vec<usize> =
        spec.chunks(2).map(|c| usize::from(u16::from_le_bytes([c[0], c[1]])) % (stream.len() + 1)).collect();
    cuts.sort_unstable();
    let mut frames = Vec::new();
    let mut from = 0;
    for c in cuts {
        frames.push(&stream[from..c]);
        from = c;
    }
    frames.push(&stream[from..]);

    let whole = scan(&[stream]);
    let (expected, done) = expected_out(stream);
    assert_eq!(whole.out, expected, "output is the stream up to the [DONE] event");
    assert_eq!(whole.done, done);
    assert_eq!(scan(&frames), whole, "cut at {frames:?}");
    let bytes: Vec<&[u8]> = stream.chunks(1).collect();
    assert_eq!(scan(&bytes), whole, "byte by byte");
}

/// Whether the top-level JSON object in `data` has every key once (serde_json's `Value` keeps the last).
fn unique_keys(data: &[u8]) -> bool {
    struct Keys;
    impl<'de> Visitor<'de> for Keys {
        type Value = bool;
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("an object")
        }
        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<bool, A::Error> {
            let mut seen = std::collections::HashSet::new();
            let mut unique = true;
            while let Some(k) = map.next_key::<String>()? {
                unique &= seen.insert(k);
                map.next_value::<IgnoredAny>()?;
            }
            Ok(unique)
        }
    }
    let mut de = serde_json::Deserializer::from_slice(data);
    de.deserialize_map(Keys).unwrap_or(false)
}

/// `check_answer`: an accepted answer is a JSON object with a non-empty `choices` (chat) or `data`
/// (embeddings) array and no error, and its usage comes from a `usage` object; and the converse — such an
/// object, with no key twice, is never refused, whatever else it carries (an odd `usage` included).
pub fn answer(data: &[u8]) {
    let parsed: Option<Value> = serde_json::from_slice(data).ok();
    let obj = parsed.as_ref().and_then(Value::as_object);
    for (api, field) in [(Api::Chat, "choices"), (Api::Embeddings, "data")] {
        let answer = |o: &serde_json::Map<String, Value>| {
            o.get(field).and_then(Value::as_array).is_some_and(|a| !a.is_empty())
                && o.get("error").is_none_or(Value::is_null)
        };
        match check_answer(api, data) {
            Ok(usage) => {
                let o = obj.expect("an accepted answer is a JSON object");
                assert!(answer(o), "accepted without a non-empty `{field}` or with an error");
                if usage.is_some() {
                    assert!(o.get("usage").is_some_and(Value::is_object), "usage from a `usage` object");
                }
            }
            Err(e) => {
                if let Some(o) = obj {
                    assert!(!(answer(o) && unique_keys(data)), "an answer was refused: {e:?}");
                }
            }
        }
    }
    let _ = answer_usage(data);
}

/// `config::parse`: never panics, gives the same result twice; an error names a line inside the text; a valid
/// config holds what the runtime relies on (endpoints serve known models, fallbacks exist, base URLs parse,
/// and every duration can be added to the clock).
pub fn config(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else { return };
    // Variables with an even-length name are set, the others not.
    let env = |name: &str| name.len().is_multiple_of(2).then(|| format!("v-{name}"));
    let parsed = sheepdog::config::parse(text, "<fuzz>", &env);
    assert_eq!(parsed, sheepdog::config::parse(text, "<fuzz>", &env), "parsing is deterministic");
    let c = match parsed {
        Err(e) => {
            if let Some(line) = e.line {
                assert!(line >= 1 && line <= text.split('\n').count(), "line {line} of {e}");
            }
            assert!(!e.to_string().is_empty());
            return;
        }
        Ok(c) => c,
    };
    assert!(!c.endpoints.is_empty());
    let now = std::time::Instant::now();
    let mut durations = vec![
        c.health.interval,
        c.health.idle_interval,
        c.health.timeout,
        c.health.slow_start,
        c.breaker.recovery_timeout,
        c.breaker.max_recovery_timeout,
        c.retry.backoff_base,
        c.retry.backoff_max,
        c.retry.deadline,
        c.retry.queue_timeout,
        c.log.retention,
    ];
    for e in &c.endpoints {
        assert!(!e.models.is_empty());
        assert!(sheepdog::config::BaseUrl::parse(&e.base_url).is_some(), "{}", e.base_url);
        for (public, _) in &e.models {
            assert!(c.models.iter().any(|m| &m.name == public), "{public} has no [[models]]");
        }
        durations.extend([e.connect_timeout, e.first_byte_timeout, e.timeout]);
    }
    for m in &c.models {
        assert!(c.endpoints.iter().any(|e| e.models.iter().any(|(p, _)| p == &m.name)));
        for f in &m.fallbacks {
            assert!(f != &m.name && c.models.iter().any(|o| &o.name == f), "fallback {f}");
        }
        if let Some(sheepdog::config::HedgeAfter::Fixed(d)) = m.hedge_after {
            durations.push(d);
        }
    }
    for d in durations {
        assert!(now.checked_add(d).is_some(), "a duration of {d:?} overflows the clock");
    }
}
