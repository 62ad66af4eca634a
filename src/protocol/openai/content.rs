//! The parts of a chat request that content-aware routing reads, extracted only when a rule needs them: the
//! text of the last user message (a string, or the `text` parts of a content array) and `metadata`'s string
//! entries. The spans were found by [`super::inspect_chat`]; nothing is parsed twice unless asked for.

use std::borrow::Cow;

use serde::Deserialize;

use crate::protocol::RequestInfo;

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
}
