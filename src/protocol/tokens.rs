//! Token counts the gateway makes itself, when an upstream did not say (a stream without `usage`) or before
//! it could (content-aware routing on prompt size): OpenAI's `o200k_base` encoding (the GPT-4o / GPT-4.1
//! family's, tiktoken-exact, through `bpe-openai`). Counts for other families' models are estimates, and
//! rows that use them say so (`estimated`).
//!
//! The encoding's tables load once, on first use (~0.1 s); [`warm`] loads them off the request path at start.

/// Tokens of `text` in the `o200k_base` encoding.
pub fn count(text: &str) -> u64 {
    if text.is_empty() {
        return 0;
    }
    bpe_openai::o200k_base().count(text) as u64
}

/// Load the encoding now, on a thread of its own, so that the first request that needs it does not wait.
pub fn warm() {
    let _ = std::thread::Builder::new().name("sheepdog-tokens".into()).spawn(|| count("warm"));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_as_tiktoken_does() {
        // tiktoken's o200k_base: "Hello, world!" is 4 tokens ("Hello", ",", " world", "!").
        assert_eq!(count("Hello, world!"), 4);
        assert_eq!(count(""), 0);
        assert!(count(&"token ".repeat(100)) >= 100);
    }
}
