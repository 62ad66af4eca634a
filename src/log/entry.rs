//! [`Entry`]: one answered client request as the request log keeps it — names and numbers, never a key.

use std::borrow::Cow;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// A request's id: unique in the process, unpredictable across processes (a random start, a counter, and a
/// bijective mix), shown as `req_` and 16 hex digits (`x-request-id`), stored as an integer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct RequestId(pub u64);

static NEXT_ID: AtomicU64 = AtomicU64::new(0);
static ID_SEED: std::sync::LazyLock<u64> = std::sync::LazyLock::new(rand::random);

impl RequestId {
    /// A fresh id.
    pub fn new() -> RequestId {
        // splitmix64 of seed + counter: a bijection, so ids never repeat within a process.
        let mut z = ID_SEED.wrapping_add(NEXT_ID.fetch_add(1, Ordering::Relaxed).wrapping_mul(0x9E37_79B9_7F4A_7C15));
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        RequestId(z ^ (z >> 31))
    }

    /// `req_` and 16 hex digits, without allocating.
    pub fn text(self) -> [u8; 20] {
        const HEX: &[u8; 16] = b"0123456789abcdef";
        let mut out = *b"req_0000000000000000";
        for (i, b) in out[4..].iter_mut().enumerate() {
            *b = HEX[((self.0 >> (60 - 4 * i)) & 0xf) as usize];
        }
        out
    }
}

impl Default for RequestId {
    fn default() -> Self {
        RequestId::new()
    }
}

impl std::fmt::Display for RequestId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(std::str::from_utf8(&self.text()).unwrap_or_default())
    }
}

/// One answered client request, as logged.
#[derive(Debug, Clone, PartialEq)]
pub struct Entry {
    /// When the request arrived, Unix milliseconds.
    pub ts_ms: i64,
    /// `chat` or `embeddings`.
    pub api: &'static str,
    /// The model the client asked for (empty when the body named none).
    pub model: String,
    /// The public model that served (differs from `model` after a fallback).
    pub served_model: Option<Arc<str>>,
    /// The endpoint that served.
    pub endpoint: Option<Arc<str>>,
    /// HTTP status the client got (499: the client went away mid-stream).
    pub status: u16,
    /// The error code the client saw, or what went wrong after the answer started (`stream_broken`).
    pub error: Option<Cow<'static, str>>,
    /// Upstream attempts made.
    pub attempts: u32,
    /// `stream: true`.
    pub stream: bool,
    /// From arrival to the last byte handed to the client, ms.
    pub duration_ms: f64,
    /// From arrival to the first byte of the answer (the first chunk of a stream), ms.
    pub ttft_ms: Option<f64>,
    /// Prompt tokens, as the upstream reported them.
    pub prompt_tokens: Option<u64>,
    /// Completion tokens, as the upstream reported them.
    pub completion_tokens: Option<u64>,
    /// Cost from the pricing table, USD.
    pub cost_usd: Option<f64>,
    /// The request's id, also sent to the client as `x-request-id` (none in rows from before schema 2).
    pub request_id: Option<RequestId>,
    /// Why another model than the requested one served (`fallback`), as in `x-sheepdog-route-reason`.
    pub route_reason: Option<Cow<'static, str>>,
    /// Of the prompt tokens, those served from the upstream's cache.
    pub cached_tokens: Option<u64>,
    /// Of the completion tokens, those spent on reasoning.
    pub reasoning_tokens: Option<u64>,
    /// Cost from the pricing table, exact, in nano-dollars.
    pub cost_nanos: Option<u64>,
    /// The client that asked (a configured client's name; `None` for anonymous requests).
    pub client: Option<std::sync::Arc<str>>,
    /// The token counts are the gateway's own estimate (the upstream reported no usage).
    pub estimated: bool,
    /// The prompt as sent (the request body), only with `[log] bodies = true`.
    pub prompt_text: Option<String>,
    /// The completion text handed to the client, only with `[log] bodies = true`.
    pub completion_text: Option<String>,
}

impl Entry {
    /// An entry for a request that arrived now on `api`; the pipeline fills in the rest.
    pub fn begin(api: &'static str) -> Entry {
        Entry { ts_ms: crate::clock::unix_ms(), ..Entry::empty(api) }
    }

    /// An entry with nothing filled in (`ts_ms` 0).
    pub const fn empty(api: &'static str) -> Entry {
        Entry {
            ts_ms: 0,
            api,
            model: String::new(),
            served_model: None,
            endpoint: None,
            status: 0,
            error: None,
            attempts: 0,
            stream: false,
            duration_ms: 0.0,
            ttft_ms: None,
            prompt_tokens: None,
            completion_tokens: None,
            cost_usd: None,
            request_id: None,
            route_reason: None,
            cached_tokens: None,
            reasoning_tokens: None,
            cost_nanos: None,
            client: None,
            estimated: false,
            prompt_text: None,
            completion_text: None,
        }
    }
}
