//! Upstream endpoints as the network sees them: how a request reaches one ([`Transport`]: the endpoint's own
//! keep-alive connections, [`Pool`], or an in-memory upstream for tests) and with which API key ([`KeyPool`]).
//!
//! Knows how to reach an endpoint and with which key; knows nothing of health, selection or the OpenAI format.

mod keys;
mod pool;
mod transport;
pub mod webhook;

pub use keys::KeyPool;
pub use pool::{Lease, Pool};
pub use transport::{
    http_client, BodyError, HttpClient, MemoryUpstream, ResponseFuture, Transport, TransportError, UpstreamBody,
};

pub use crate::config::BaseUrl;
