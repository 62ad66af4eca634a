//! sheepdog's policies: every decision the gateway makes about where a request goes and what an outcome
//! means, as pure functions and small state machines.
//!
//! Owns: the circuit breaker ([`breaker`]), endpoint selection with tiers, slow start, EWMA and the stall rule
//! ([`balance`]), retry decisions and backoff ([`retry`]), the rolling check history and the health status rule
//! ([`history`]), the one percentile definition ([`stats`]), token pricing ([`pricing`]), budgets with reservations
//! ([`budget`]), client rate limits ([`ratelimit`]) content-aware routing rules ([`routing`]) and the rules by which replicas take each other's health changes ([`shared`]).
//!
//! **Invariant:** nothing here does I/O, reads a clock or draws randomness of its own. Time comes in as
//! `now_ms`, randomness as an [`rand::Rng`]. The crate depends on no async runtime and no HTTP crate, so the
//! compiler enforces it; the gateway's async shells call in and apply the results.

pub mod balance;
pub mod breaker;
pub mod budget;
pub mod history;
pub mod pricing;
pub mod ratelimit;
pub mod retry;
pub mod routing;
pub mod shared;
pub mod stats;
