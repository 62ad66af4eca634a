//! sheepdog: an OpenAI-compatible LLM API gateway with health checks, circuit breakers, load balancing and
//! failover. See `ARCHITECTURE.md` for the map.

pub mod balance;
pub mod breaker;
pub mod chart;
pub mod check;
pub mod cli;
pub mod config;
pub mod dashboard;
pub mod demo;
pub mod gateway;
pub mod health;
pub mod history;
pub mod metrics;
pub mod mock;
pub mod openai;
pub mod proxy;
pub mod report;
pub mod requestlog;
pub mod retry;
pub mod server;
pub mod state;
pub mod upstream;
