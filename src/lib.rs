//! sheepdog: an OpenAI-compatible LLM API gateway with health checks, circuit breakers, load balancing and
//! failover. See `ARCHITECTURE.md` for the map; the pure decisions live in the `sheepdog-policy` crate, the
//! simulated upstream in `sheepdog-mock`.
//!
//! Layers, in the direction data flows: [`config`] → [`state`] (with [`upstream`]) → [`pipeline`] (with
//! [`protocol`]) → [`metrics`] and [`log`]; [`health`] feeds [`state`], and [`shared`] carries it between replicas; [`http`] serves it all; [`report`] reads
//! the log back; [`cli`] starts the commands.

pub mod cli;
pub mod clock;
pub mod config;
pub mod drill;
pub mod gateway;
pub mod health;
pub mod http;
pub mod log;
pub mod metrics;
pub mod pipeline;
pub mod protocol;
pub mod report;
pub mod shared;
pub mod state;
pub mod upstream;
