//! The text inside chat requests and answers, read only when needed: for content-aware routing the last user
//! message (a string, or the `text` parts of a content array) and `metadata`'s string entries (spans found by
//! [`super::inspect_chat`]); for an answer whose upstream reported no usage, the token counts of the prompt
//! and of the streamed completion ([`estimate_prompt`], [`estimate_stream_completion`]).

use std::borrow::Cow;

use serde::Deserialize;

use crate::protocol::{tokens, RequestInfo};

#[derive(Deserialize)]
struct Part<'a> {
    #[serde(borrow, rename = "type")]
    kind: Option<Cow<'a, str>>,
    #[serde(borrow)]
    text: Option<Cow<'a, str>>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum Content<'a> {
    Text(#[serde(borrow)] Cow<'a, str>),
    Parts(#[serde(borrow)] Vec<Part<'a>>),
}

/// The text of the last user message: its string content, or its text parts joined by newlines ("" when it
/// has none).
pub fn last_user_text<'a>(body: &'a [u8], info: &RequestInfo) -> Cow<'a, str> {
    let Some(raw) = info.last_user.as_ref().and_then(|r| body.get(r.clone())) else { return Cow::Borrowed("") };
    match serde_json::from_slice::<Content>(raw) {
        Ok(Content::Text(t)) => t,
        Ok(Content::Parts(parts)) => {
            let texts: Vec<Cow<str>> = parts
                .into_iter()
                .filter(|p| p.kind.as_deref().is_none_or(|k| k == "text"))
                .filter_map(|p| p.text)
                .collect();
            match texts.len() {
                0 => Cow::Borrowed(""),
                1 => texts.into_iter().next().unwrap_or_default(),
                _ => Cow::Owned(texts.join("\n")),
            }
        }
        Err(_) => Cow::Borrowed(""),
    }
}

/// The string entries of the request's `metadata` object (other values are skipped).
pub fn metadata(body: &[u8], info: &RequestInfo) -> Vec<(String, String)> {
    let Some(raw) = info.metadata.as_ref().and_then(|r| body.get(r.clone())) else { return Vec::new() };
    let Ok(map) = serde_json::from_slice::<serde_json::Map<String, serde_json::Value>>(raw) else {
        return Vec::new();
    };
    map.into_iter().filter_map(|(k, v)| v.as_str().map(|s| (k, s.to_string()))).collect()
}

#[derive(Deserialize)]
struct Message<'a> {
    #[serde(borrow)]
    content: Option<Content<'a>>,
    #[serde(borrow)]
    name: Option<Cow<'a, str>>,
}

#[derive(Deserialize)]
struct Messages<'a> {
    #[serde(borrow)]
    messages: Vec<Message<'a>>,
}

/// Tokens OpenAI's chat format adds per message (role and separators), and once to prime the answer.
const PER_MESSAGE: u64 = 3;

/// Prompt tokens of a chat request, counted as OpenAI's cookbook does: each message's text in the encoding,
/// plus three tokens per message and three for the reply's start. Images and tools are not counted.
pub fn estimate_prompt(body: &[u8]) -> u64 {
    let Ok(m) = serde_json::from_slice::<Messages>(body) else { return 0 };
    let mut n = PER_MESSAGE;
    for msg in &m.messages {
        n += PER_MESSAGE;
        match &msg.content {
            Some(Content::Text(t)) => n += tokens::count(t),
            Some(Content::Parts(parts)) => {
                n += parts.iter().filter_map(|p| p.text.as_deref()).map(tokens::count).sum::<u64>();
            }
            None => {}
        }
        n += msg.name.as_deref().map_or(0, |x| tokens::count(x) + 1);
    }
    n
}

#[derive(Deserialize)]
struct ChunkChoices<'a> {
    #[serde(borrow, default)]
    choices: Vec<ChunkChoice<'a>>,
}

#[derive(Deserialize)]
struct ChunkChoice<'a> {
    #[serde(borrow, default)]
    delta: Option<Delta<'a>>,
}

#[derive(Deserialize)]
struct Delta<'a> {
    #[serde(borrow, default)]
    content: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    reasoning_content: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    tool_calls: Option<Vec<ToolCallDelta<'a>>>,
}

#[derive(Deserialize)]
struct ToolCallDelta<'a> {
    #[serde(borrow, default)]
    function: Option<FunctionDelta<'a>>,
}

#[derive(Deserialize)]
struct FunctionDelta<'a> {
    #[serde(borrow, default)]
    name: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    arguments: Option<Cow<'a, str>>,
}

#[derive(Deserialize)]
struct AnswerChoices<'a> {
    #[serde(borrow, default)]
    choices: Vec<AnswerChoice<'a>>,
}

#[derive(Deserialize)]
struct AnswerChoice<'a> {
    #[serde(borrow, default)]
    message: Option<Delta<'a>>,
}

/// The text a chat message or a stream delta carries: content, reasoning, tool-call names and arguments.
fn push_text(d: Delta<'_>, text: &mut String) {
    for part in [d.content, d.reasoning_content].into_iter().flatten() {
        text.push_str(&part);
    }
    for f in d.tool_calls.into_iter().flatten().filter_map(|t| t.function) {
        for part in [f.name, f.arguments].into_iter().flatten() {
            text.push_str(&part);
        }
    }
}

/// Completion tokens of a chat completion that came without `usage`: the text of every choice's message,
/// counted once in the encoding (0 when the body is not a chat completion).
pub fn estimate_answer_completion(answer: &[u8]) -> u64 {
    let Ok(a) = serde_json::from_slice::<AnswerChoices>(answer) else { return 0 };
    let mut text = String::new();
    for m in a.choices.into_iter().filter_map(|c| c.message) {
        push_text(m, &mut text);
    }
    tokens::count(&text)
}

/// Completion tokens of a relayed SSE stream (its frames as the client got them): the text of every delta —
/// content, reasoning, tool-call names and arguments — joined and counted once in the encoding.
pub fn estimate_stream_completion(frames: &[bytes::Bytes]) -> u64 {
    let mut text = String::new();
    let mut pending: Vec<u8> = Vec::new();
    for f in frames {
        pending.extend_from_slice(f);
    }
    for line in pending.split(|b| *b == b'\n') {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        let Some(data) = line.strip_prefix(b"data:") else { continue };
        let Ok(c) = serde_json::from_slice::<ChunkChoices>(data.trim_ascii()) else { continue };
        for d in c.choices.into_iter().filter_map(|c| c.delta) {
            push_text(d, &mut text);
        }
    }
    tokens::count(&text)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::openai::inspect_chat;

    #[test]
    fn last_user_message_string_or_parts_and_metadata() {
        let body = br#"{"model":"auto","metadata":{"tier":"free","n":3},"tools":[{"type":"function"}],"max_tokens":50,"n":2,
            "messages":[{"role":"user","content":"first"},{"role":"assistant","content":"ok"},
                        {"role":"user","content":[{"type":"text","text":"write \"rust\""},{"type":"image_url","image_url":{"url":"x"}},{"type":"text","text":"now"}]}]}"#;
        let info = inspect_chat(body).unwrap();
        assert_eq!(last_user_text(body, &info), "write \"rust\"\nnow");
        assert_eq!(metadata(body, &info), vec![("tier".to_string(), "free".to_string())]);
        assert!(info.has_tools);
        assert_eq!((info.max_tokens, info.n), (Some(50), 2));
        let body = br#"{"model":"auto","messages":[{"role":"system","content":"s"},{"role":"user","content":"plain \u00e9"}],"tools":[]}"#;
        let info = inspect_chat(body).unwrap();
        assert_eq!(last_user_text(body, &info), "plain é");
        assert!(!info.has_tools && metadata(body, &info).is_empty());
        assert_eq!((info.max_tokens, info.n), (None, 1));
        let body = br#"{"model":"auto","messages":[{"role":"system","content":"only system"}]}"#;
        assert_eq!(last_user_text(body, &inspect_chat(body).unwrap()), "");
        let body = br#"{"model":"m","messages":[{"role":"user"}],"metadata":[1]}"#;
        assert_eq!(inspect_chat(body).unwrap_err().code, "invalid_metadata");
        let body = br#"{"model":"m","messages":[{"role":"user"}],"n":0}"#;
        assert_eq!(inspect_chat(body).unwrap_err().code, "invalid_n");
    }

    #[test]
    fn estimates_count_text_in_the_encoding() {
        // "Hello, world!" is 4 tokens; 3 per message and 3 for the reply.
        let body = br#"{"model":"m","messages":[{"role":"user","content":"Hello, world!"},{"role":"user","content":[{"type":"text","text":"Hello, world!"}]}]}"#;
        assert_eq!(estimate_prompt(body), 3 + (3 + 4) * 2);
        let frames = [
            bytes::Bytes::from_static(b"data: {\"choices\":[{\"delta\":{\"content\":\"Hello,\"}}]}\n\ndata: {\"choi"),
            bytes::Bytes::from_static(b"ces\":[{\"delta\":{\"content\":\" world!\"}}]}\n\ndata: [DONE]\n\n"),
        ];
        assert_eq!(estimate_stream_completion(&frames), 4);
        assert_eq!(estimate_stream_completion(&[]), 0);
    }
}
