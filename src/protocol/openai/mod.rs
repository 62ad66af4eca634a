//! The OpenAI wire format, the only place that knows its field names: request inspection and the model
//! rewrite ([`request`]), answers and usage ([`answer`], [`usage`]), stream scanning ([`sse`]), the error shape
//! ([`error`]) and health probes ([`probe`]).
//!
//! Requests are inspected without re-serialising them (unknown fields pass through byte for byte). Does no I/O.

pub mod answer;
pub mod content;
pub mod error;
pub mod probe;
pub mod request;
pub mod sse;
mod usage;

pub use answer::{answer_usage, check_answer, model_list, static_answer, static_stream, BadAnswer, MODELS_CREATED};
pub use content::{last_user_text, metadata};
pub use error::{error_body, refusal_body, sse_error_event, ErrorClass, UpstreamError};
pub use request::{inspect_chat, inspect_embeddings, upstream_body, usage_forced};
pub use sse::{FirstEvent, Scanned, SseScanner};
