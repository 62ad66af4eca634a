//! Upstream endpoints as the network sees them: how a request reaches one ([`Transport`]: the pooled HTTP(S)
//! client, or an in-memory upstream for tests) and with which API key ([`KeyPool`]).
//!
//! Knows how to reach an endpoint and with which key; knows nothing of health, selection or the OpenAI format.

mod keys;
mod transport;
pub mod webhook;

pub use keys::KeyPool;
pub use transport::{
    http_client, BodyError, HttpClient, MemoryUpstream, ResponseFuture, Transport, TransportError, UpstreamBody,
};

pub use crate::config::BaseUrl;
