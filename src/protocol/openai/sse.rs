//! Server-sent events from upstreams, scanned event by event whatever the frame boundaries: an event, or a
//! single line, split across two or more frames is still seen whole.
//!
//! [`SseScanner`] sits between the upstream and the client. It hands on complete events only (an incomplete
//! one waits for the rest of its bytes: a client cannot use half an event anyway), and nothing after
//! `data: [DONE]`. On the way it classifies the first data event ([`FirstEvent`]: a chunk, an error object or
//! garbage, so a stream that is not one fails over before its first byte reaches the client) and picks up the
//! `usage` object of the last chunk. Cost per frame: a few byte searches; whole frames are passed on as they
//! came (no copy), and only the tail of an event cut by a frame boundary is copied.

use bytes::{Bytes, BytesMut};
use memchr::memmem::Finder;
use serde::Deserialize;
use serde_json::value::RawValue;
use sheepdog_policy::pricing::Tokens;

use super::error::UpstreamError;
use super::usage::UsageWire;

/// The most bytes held for one incomplete event; past it the stream is not an event stream (memory stays
/// bounded whatever an upstream sends).
pub const MAX_EVENT_BYTES: usize = 4 << 20;

static USAGE_KEY: std::sync::LazyLock<Finder<'static>> = std::sync::LazyLock::new(|| Finder::new(b"\"usage\""));

/// What happens to one event on its way to the client.
enum Edit {
    /// Handed on as it came.
    Keep,
    /// Left out (the usage chunk of a client that did not ask for it).
    Drop,
    /// Handed on as these bytes (`"usage":null` taken out).
    Rewrite(Vec<u8>),
}

/// What the first data event of a stream is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FirstEvent {
    /// A chunk (a JSON object with `choices`): the stream is one.
    Chunk,
    /// An error object in place of the first chunk.
    Error(UpstreamError),
    /// Anything else: what it is.
    Garbage(&'static str),
}

/// What one frame gave.
#[derive(Debug, Default)]
pub struct Scanned {
    /// The complete events to hand on (empty when the frame only started an event).
    pub out: Bytes,
    /// `data: [DONE]` came: the stream is over, whatever the upstream sends next.
    pub done: bool,
}

#[derive(Deserialize)]
struct ChunkView<'a> {
    #[serde(borrow, default)]
    choices: Option<&'a RawValue>,
    #[serde(borrow, default)]
    error: Option<&'a RawValue>,
    #[serde(default, deserialize_with = "super::usage::lenient")]
    usage: Option<UsageWire>,
}

/// Watches and trims an upstream SSE stream.
#[derive(Debug, Default)]
pub struct SseScanner {
    /// The start of an event that the previous frames cut.
    pending: BytesMut,
    first: Option<FirstEvent>,
    usage: Option<Tokens>,
    done: bool,
    overflow: bool,
    /// The upstream was asked for usage that the client did not ask for: take it out again.
    hide_usage: bool,
}

impl SseScanner {
    /// A scanner at the start of a stream.
    pub fn new() -> SseScanner {
        SseScanner::default()
    }

    /// A scanner that also takes out what `stream_options.include_usage` added to the stream — the final usage
    /// chunk (`"choices":[]`) and `"usage":null` on the other chunks — for a client that did not ask for it.
    /// Its usage is still read.
    pub fn hiding_usage() -> SseScanner {
        SseScanner { hide_usage: true, ..SseScanner::default() }
    }

    /// The last usage seen so far.
    pub fn usage(&self) -> Option<Tokens> {
        self.usage
    }

    /// What the first data event was, once it came.
    pub fn first_event(&self) -> Option<&FirstEvent> {
        self.first.as_ref()
    }

    /// Whether `data: [DONE]` came.
    pub fn done(&self) -> bool {
        self.done
    }

    /// Whether an event grew past [`MAX_EVENT_BYTES`] (the stream is not an event stream).
    pub fn overflowed(&self) -> bool {
        self.overflow
    }

    /// Scan the next frame: the complete events it finished, up to and including `data: [DONE]`.
    pub fn feed(&mut self, frame: Bytes) -> Scanned {
        if self.done || self.overflow {
            return Scanned { out: Bytes::new(), done: self.done };
        }
        let buf = if self.pending.is_empty() {
            frame
        } else {
            self.pending.extend_from_slice(&frame);
            self.pending.split().freeze()
        };
        let cut = last_event_end(&buf);
        let out = self.events(buf.slice(..cut));
        if !self.done && cut < buf.len() {
            if buf.len() - cut > MAX_EVENT_BYTES {
                self.overflow = true;
                self.pending = BytesMut::new();
                if self.first.is_none() {
                    self.first = Some(FirstEvent::Garbage("an event larger than 4 MB"));
                }
            } else {
                self.pending.extend_from_slice(&buf[cut..]);
            }
        }
        Scanned { out, done: self.done }
    }

    /// The upstream ended: an unterminated last event, scanned and handed on as it is.
    pub fn finish(&mut self) -> Bytes {
        if self.done || self.pending.is_empty() {
            return Bytes::new();
        }
        let rest = self.pending.split().freeze();
        match self.event(&rest, 0, rest.len()) {
            Edit::Keep => rest,
            Edit::Drop => Bytes::new(),
            Edit::Rewrite(b) => Bytes::from(b),
        }
    }

    /// Look at each event of `buf` (complete events only); returns what goes on: up to `[DONE]`, without the
    /// events left out. Unchanged events are not copied.
    fn events(&mut self, buf: Bytes) -> Bytes {
        // Past the first event, an ordinary chunk has neither `[DONE]` nor a usage object: two byte searches
        // over the whole frame, and no walk through its lines.
        // With usage forced on, every chunk carries `"usage":null`: taken out in the same pass that looks for a
        // usage object, still without walking the lines.
        if self.first.is_some() && !has_done(&buf) {
            match usage_members(&buf, self.hide_usage) {
                Members::Nulls(None) => return buf,
                Members::Nulls(Some(stripped)) => return Bytes::from(stripped),
                Members::Object => {}
            }
        }
        let (mut start, mut cut) = (0, buf.len());
        // Built only once an event is changed: what goes on, from the start of the frame.
        let mut edited: Option<BytesMut> = None;
        while start < buf.len() {
            let end = next_event_end(&buf, start).unwrap_or(buf.len());
            match (self.event(&buf, start, end), &mut edited) {
                (Edit::Keep, None) => {}
                (Edit::Keep, Some(o)) => o.extend_from_slice(&buf[start..end]),
                (edit, o) => {
                    let o = o.get_or_insert_with(|| BytesMut::from(&buf[..start]));
                    if let Edit::Rewrite(b) = edit {
                        o.extend_from_slice(&b);
                    }
                }
            }
            if self.done {
                cut = end;
                break;
            }
            start = end;
        }
        match edited {
            Some(o) => o.freeze(),
            None => buf.slice(..cut),
        }
    }

    /// One event, `buf[start..end]`: what to hand on.
    fn event(&mut self, buf: &[u8], start: usize, end: usize) -> Edit {
        let ev = &buf[start..end];
        let mut from = 0;
        while from < ev.len() {
            let to = memchr::memchr(b'\n', &ev[from..]).map_or(ev.len(), |i| from + i);
            let line = &ev[from..to];
            from = to + 1;
            let line = line.strip_suffix(b"\r").unwrap_or(line);
            let Some(data) = line.strip_prefix(b"data:") else { continue };
            let data = data.trim_ascii();
            if data == b"[DONE]" {
                self.done = true;
                if self.first.is_none() {
                    self.first = Some(FirstEvent::Garbage("a stream that ended before its first chunk"));
                }
                return Edit::Keep;
            }
            if self.first.is_none() {
                self.first = Some(classify_first(data));
            }
            if USAGE_KEY.find(data).is_some() {
                if has_usage_object(data) {
                    if let Ok(ChunkView { usage: Some(u), choices, .. }) = serde_json::from_slice::<ChunkView>(data) {
                        self.usage = Some(u.tokens());
                        if self.hide_usage && choices.is_some_and(|c| c.get().trim() == "[]") {
                            return Edit::Drop;
                        }
                    }
                } else if self.hide_usage {
                    if let Members::Nulls(Some(stripped)) = usage_members(ev, true) {
                        return Edit::Rewrite(stripped);
                    }
                }
            }
        }
        Edit::Keep
    }
}

/// The `"usage"` members of some bytes of a stream, in one pass.
enum Members {
    /// None, or only `"usage":null`: with `strip`, the bytes without them (`None` when nothing was taken out).
    Nulls(Option<Vec<u8>>),
    /// A usage object is there (it has to be read).
    Object,
}

/// Looks at every `"usage"` key of `buf`: a usage object stops the search; with `strip`, each exact
/// `"usage":null` is taken out with the comma that separated it from its neighbour. (A `"usage"` inside a
/// JSON string is escaped, `\"usage\"`, so it never matches.)
fn usage_members(buf: &[u8], strip: bool) -> Members {
    const NULL: &[u8] = b":null";
    // The byte ranges taken out, in order (a chunk has one); the rest is copied once into a buffer of its
    // exact size, which `Bytes` then takes over without another allocation.
    let mut cuts: smallvec::SmallVec<[(usize, usize); 4]> = smallvec::SmallVec::new();
    let mut at = 0;
    for i in USAGE_KEY.find_iter(buf) {
        let after = &buf[i + 7..];
        let Some(value) = after.trim_ascii_start().strip_prefix(b":") else { continue };
        if value.trim_ascii_start().first() == Some(&b'{') {
            return Members::Object;
        }
        if !strip || !after.starts_with(NULL) {
            continue;
        }
        let (mut from, mut to) = (i, i + 7 + NULL.len());
        if from > at && buf[from - 1] == b',' {
            from -= 1;
        } else if buf.get(to) == Some(&b',') {
            to += 1;
        }
        if from < at {
            continue;
        }
        cuts.push((from, to));
        at = to;
    }
    if cuts.is_empty() {
        return Members::Nulls(None);
    }
    let mut out = Vec::with_capacity(buf.len() - cuts.iter().map(|(f, t)| t - f).sum::<usize>());
    let mut at = 0;
    for (from, to) in cuts {
        out.extend_from_slice(&buf[at..from]);
        at = to;
    }
    out.extend_from_slice(&buf[at..]);
    Members::Nulls(Some(out))
}

/// Whether `[DONE]` is somewhere in `buf`. A chunk has one `[` or two (`"choices":[`), so looking at each is
/// cheaper than a substring search, whose setup costs more than the scan of a chunk-sized frame.
fn has_done(buf: &[u8]) -> bool {
    memchr::memchr_iter(b'[', buf).any(|i| buf[i + 1..].starts_with(b"DONE]"))
}

/// What a stream's first data payload is.
fn classify_first(data: &[u8]) -> FirstEvent {
    if data.first() != Some(&b'{') {
        return FirstEvent::Garbage("an event that is not a JSON object");
    }
    match serde_json::from_slice::<ChunkView>(data) {
        Err(_) => FirstEvent::Garbage("an event that is not valid JSON"),
        Ok(v) if v.error.is_some_and(|e| e.get() != "null") => {
            UpstreamError::from_body(data).map_or(FirstEvent::Garbage("an unreadable error"), FirstEvent::Error)
        }
        Ok(v) if v.choices.is_some_and(|c| c.get().starts_with('[')) => FirstEvent::Chunk,
        Ok(_) => FirstEvent::Garbage("an event without `choices`"),
    }
}

/// The end (exclusive) of the event that starts at `from`: just after its blank line.
fn next_event_end(buf: &[u8], from: usize) -> Option<usize> {
    let mut at = from;
    while let Some(i) = memchr::memchr(b'\n', &buf[at..]) {
        let nl = at + i;
        match buf.get(nl + 1) {
            Some(b'\n') => return Some(nl + 2),
            Some(b'\r') if buf.get(nl + 2) == Some(&b'\n') => return Some(nl + 3),
            _ => at = nl + 1,
        }
    }
    None
}

/// The end (exclusive) of the last complete event in `buf` (0 when none is complete).
fn last_event_end(buf: &[u8]) -> usize {
    let mut end = buf.len();
    while let Some(nl) = memchr::memrchr(b'\n', &buf[..end]) {
        // A blank line ends an event: "\n\n" or "\n\r\n".
        if nl >= 1 && buf[nl - 1] == b'\n' {
            return nl + 1;
        }
        if nl >= 2 && buf[nl - 1] == b'\r' && buf[nl - 2] == b'\n' {
            return nl + 1;
        }
        end = nl;
    }
    0
}

/// Whether `data` has a `"usage"` key followed by an object (not `"usage": null`, as OpenAI sends on every
/// chunk with `include_usage`), so ordinary chunks cost one substring search and no JSON parse.
fn has_usage_object(data: &[u8]) -> bool {
    USAGE_KEY.find_iter(data).any(|at| {
        let rest = data[at + 7..].trim_ascii_start();
        rest.strip_prefix(b":").is_some_and(|v| v.trim_ascii_start().first() == Some(&b'{'))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Feed the frames; what came out and the usage.
    fn scan(frames: &[&[u8]]) -> (Vec<u8>, Option<Tokens>, SseScanner) {
        let mut s = SseScanner::new();
        let mut out = Vec::new();
        for f in frames {
            out.extend_from_slice(&s.feed(Bytes::copy_from_slice(f)).out);
        }
        out.extend_from_slice(&s.finish());
        let u = s.usage();
        (out, u, s)
    }

    const STREAM: &[u8] = b": keep-alive comment\n\n\
data: {\"choices\":[{\"delta\":{\"content\":\"usage\"}}],\"usage\":null}\n\n\
data: {\"choices\":[],\"usage\":{\"prompt_tokens\":12,\"completion_tokens\":34,\
\"prompt_tokens_details\":{\"cached_tokens\":5},\"completion_tokens_details\":{\"reasoning_tokens\":6}}}\n\n\
data: [DONE]\n\n";

    fn expected() -> Option<Tokens> {
        Some(Tokens { prompt: 12, completion: 34, cached_prompt: 5, reasoning: 6 })
    }

    #[test]
    fn done_is_found_among_brackets() {
        assert!(has_done(b"data: {\"choices\":[]}\n\ndata: [DONE]\n\n"));
        assert!(has_done(b"[DONE]"));
        assert!(!has_done(b"data: {\"choices\":[{\"delta\":{}}],\"usage\":null}\n\n"));
        assert!(!has_done(b"[DONE"));
        assert!(!has_done(b"["));
        assert!(!has_done(b""));
    }

    #[test]
    fn usage_and_first_event_in_one_frame() {
        let (out, usage, s) = scan(&[STREAM]);
        assert_eq!(out, STREAM);
        assert_eq!(usage, expected());
        assert_eq!(s.first_event(), Some(&FirstEvent::Chunk));
        assert!(s.done());
        // `"usage": null` on ordinary chunks, and the word inside content, are not usage.
        assert_eq!(scan(&[b"data: {\"choices\":[{\"delta\":{\"content\":\"a\"}}],\"usage\": null}\n\n"]).1, None);
        assert_eq!(scan(&[b"data: {\"choices\":[{\"delta\":{\"content\":\"\\\"usage\\\"\"}}]}\n\n"]).1, None);
        let spaced = b"data: {\"choices\": [], \"usage\" : {\"prompt_tokens\": 1, \"completion_tokens\": 2}}\r\n\r\n";
        assert_eq!(scan(&[spaced]).1, Some(Tokens::new(1, 2)));
    }

    #[test]
    fn an_event_split_at_any_byte_is_still_seen_and_handed_on_whole() {
        for at in 0..=STREAM.len() {
            let (a, b) = STREAM.split_at(at);
            let (out, usage, s) = scan(&[a, b]);
            assert_eq!(usage, expected(), "split at byte {at}");
            assert_eq!(out, STREAM, "split at byte {at}");
            assert_eq!(s.first_event(), Some(&FirstEvent::Chunk), "split at byte {at}");
        }
    }

    #[test]
    fn an_event_split_into_three_frames_or_byte_by_byte_is_still_seen() {
        for at in (0..STREAM.len()).step_by(7) {
            for len in [1, 2, 13, 40] {
                let end = (at + len).min(STREAM.len());
                let (out, usage, _) = scan(&[&STREAM[..at], &STREAM[at..end], &STREAM[end..]]);
                assert_eq!((out.as_slice(), usage), (STREAM, expected()), "{at}+{len}");
            }
        }
        let bytes: Vec<&[u8]> = STREAM.chunks(1).collect();
        assert_eq!(scan(&bytes).1, expected());
    }

    #[test]
    fn usage_asked_for_the_client_is_read_and_taken_out_again_at_any_split() {
        let forced: &[u8] = b"data: {\"choices\":[{\"delta\":{\"content\":\"a\"}}],\"usage\":null}\n\n\
data: {\"usage\":null,\"choices\":[{\"delta\":{\"content\":\"b\"}}]}\n\n\
data: {\"choices\":[],\"usage\":{\"prompt_tokens\":12,\"completion_tokens\":34}}\n\n\
data: [DONE]\n\n";
        let plain: &[u8] = b"data: {\"choices\":[{\"delta\":{\"content\":\"a\"}}]}\n\n\
data: {\"choices\":[{\"delta\":{\"content\":\"b\"}}]}\n\n\
data: [DONE]\n\n";
        for at in 0..=forced.len() {
            let mut s = SseScanner::hiding_usage();
            let (a, b) = forced.split_at(at);
            let mut out = s.feed(Bytes::copy_from_slice(a)).out.to_vec();
            out.extend_from_slice(&s.feed(Bytes::copy_from_slice(b)).out);
            out.extend_from_slice(&s.finish());
            assert_eq!(String::from_utf8_lossy(&out), String::from_utf8_lossy(plain), "split at {at}");
            assert_eq!(s.usage(), Some(Tokens::new(12, 34)));
        }
        // Usage on a chunk with content stays (the content must reach the client).
        let mixed = b"data: {\"choices\":[{\"delta\":{\"content\":\"a\"}}],\"usage\":{\"prompt_tokens\":1,\"completion_tokens\":2}}\n\n";
        let mut s = SseScanner::hiding_usage();
        assert_eq!(&s.feed(Bytes::from_static(mixed)).out[..], &mixed[..]);
        assert_eq!(s.usage(), Some(Tokens::new(1, 2)));
    }

    #[test]
    fn usage_null_is_taken_out_with_its_comma_wherever_it_stands() {
        let strip = |b: &str| match usage_members(b.as_bytes(), true) {
            Members::Nulls(o) => o.map(|v| String::from_utf8(v).unwrap()),
            Members::Object => Some("object".into()),
        };
        assert_eq!(strip(r#"{"a":1,"usage":null}"#).as_deref(), Some(r#"{"a":1}"#));
        assert_eq!(strip(r#"{"usage":null,"a":1}"#).as_deref(), Some(r#"{"a":1}"#));
        assert_eq!(strip(r#"{"usage":null}"#).as_deref(), Some("{}"));
        assert_eq!(
            strip("data: {\"a\":1,\"usage\":null}\n\ndata: {\"usage\":null,\"b\":2}\n\n").as_deref(),
            Some("data: {\"a\":1}\n\ndata: {\"b\":2}\n\n")
        );
        assert_eq!(strip(r#"{"c":"say \"usage\":null"}"#), None, "text inside a string stays");
        assert_eq!(strip(r#"{"a":1}"#), None);
        assert_eq!(strip(r#"{"usage":null,"x":{"usage": {"prompt_tokens":1}}}"#).as_deref(), Some("object"));
        assert!(matches!(usage_members(br#"{"usage":null}"#, false), Members::Nulls(None)));
    }

    #[test]
    fn whole_frames_pass_without_a_copy() {
        let mut s = SseScanner::new();
        let frame = Bytes::from_static(b"data: {\"choices\":[]}\n\n");
        let out = s.feed(frame.clone()).out;
        assert_eq!(out.as_ptr(), frame.as_ptr());
        // An incomplete event is held back until its end arrives.
        assert!(s.feed(Bytes::from_static(b"data: {\"choi")).out.is_empty());
        assert_eq!(&s.feed(Bytes::from_static(b"ces\":[]}\n\n")).out[..], b"data: {\"choices\":[]}\n\n");
    }

    #[test]
    fn nothing_after_done_is_handed_on() {
        let (out, _, s) =
            scan(&[b"data: {\"choices\":[]}\n\ndata: [DONE]\n\ndata: {\"late\":1}\n\n", b"data: more\n\n"]);
        assert_eq!(out, b"data: {\"choices\":[]}\n\ndata: [DONE]\n\n");
        assert!(s.done());
    }

    #[test]
    fn the_first_event_is_classified() {
        let first = |b: &[u8]| scan(&[b]).2.first_event().cloned();
        assert_eq!(first(b"data: {\"choices\":[{\"delta\":{}}]}\n\n"), Some(FirstEvent::Chunk));
        assert!(matches!(first(b"data: {\"error\":{\"message\":\"no\",\"type\":\"server_error\"}}\n\n"),
            Some(FirstEvent::Error(e)) if e.message == "no"));
        assert_eq!(first(b"data: [DONE]\n\n"), Some(FirstEvent::Garbage("a stream that ended before its first chunk")));
        assert_eq!(first(b"data: hello\n\n"), Some(FirstEvent::Garbage("an event that is not a JSON object")));
        assert_eq!(first(b"data: {\"id\":1}\n\n"), Some(FirstEvent::Garbage("an event without `choices`")));
        assert_eq!(first(b": comment only\n\n"), None);
        assert_eq!(
            first(b"data: {\"choices\":[],\"usage\":{\"prompt_tokens\":-1}}\n\n"),
            Some(FirstEvent::Chunk),
            "odd usage"
        );
        assert_eq!(first(b"data: {\"choices\":[]}"), Some(FirstEvent::Chunk), "an unterminated last event");
    }

    #[test]
    fn an_endless_event_does_not_grow_memory() {
        let mut s = SseScanner::new();
        s.feed(Bytes::from_static(b"data: {\"x\":\""));
        let junk = Bytes::from(vec![b'a'; 64 * 1024]);
        for _ in 0..100 {
            s.feed(junk.clone());
        }
        assert!(s.overflowed());
        assert!(s.pending.capacity() <= 2 * MAX_EVENT_BYTES);
        assert_eq!(s.first_event(), Some(&FirstEvent::Garbage("an event larger than 4 MB")));
    }
}
