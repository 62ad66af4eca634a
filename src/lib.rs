//! sheepdog: an OpenAI-compatible LLM API gateway.

pub mod balance;
pub mod breaker;
pub mod history;
pub mod retry;
