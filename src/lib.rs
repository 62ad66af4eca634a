//! sheepdog: an OpenAI-compatible LLM API gateway.
