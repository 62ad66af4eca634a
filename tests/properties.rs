//! Property: whatever a client sends to a real gateway (valid chat and embeddings requests, requests with one
//! thing wrong, wrong content types, random bytes, random JSON), it gets a 2xx with an answer or an
//! OpenAI-shaped error (`{"error":{"message","type","code"}}`) with a fitting 4xx/5xx status — nothing else.
//! A few dozen cases against one `sheepdog mock` and one `sheepdog serve`, so it runs in seconds.

mod common;

use common::*;
use proptest::prelude::*;
use proptest::test_runner::{Config, TestCaseError, TestRunner};
use serde_json::{json, Value};

const CHAT: &str = "/v1/chat/completions";
const EMBEDDINGS: &str = "/v1/embeddings";

/// What the gateway must answer.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Expect {
    /// A 2xx with an answer.
    Answer,
    /// This error status.
    Status(u16),
    /// A 2xx with an answer or any OpenAI-shaped error.
    Any,
}

#[derive(Clone)]
struct Case {
    path: &'static str,
    content_type: Option<&'static str>,
    body: Vec<u8>,
    expect: Expect,
}

impl std::fmt::Debug for Case {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let body = String::from_utf8_lossy(&self.body);
        write!(f, "POST {} ({:?}) {body:?}, expect {:?}", self.path, self.content_type, self.expect)
    }
}

const ROLES: [&str; 6] = ["system", "user", "assistant", "tool", "function", "developer"];

fn valid_chat() -> impl Strategy<Value = Value> {
    let message =
        (prop::sample::select(&ROLES[..]), any::<String>()).prop_map(|(r, c)| json!({"role": r, "content": c}));
    (
        prop::collection::vec(message, 1..4),
        prop::option::of(1i64..40),
        prop::option::of(0.0f64..=2.0),
        any::<bool>(),
        prop::option::of(any::<bool>()),
        prop::option::of(any::<u32>()),
    )
        .prop_map(|(messages, max_tokens, temperature, stream, usage, seed)| {
            let mut v = json!({"model": "gpt-4.1", "messages": messages, "stream": stream});
            if let Some(n) = max_tokens {
                v["max_tokens"] = n.into();
            }
            if let Some(t) = temperature {
                v["temperature"] = t.into();
            }
            if let Some(u) = usage {
                v["stream_options"] = json!({"include_usage": u});
            }
            if let Some(s) = seed {
                v["seed"] = s.into();
            }
            v
        })
}

/// A valid chat request with one thing wrong, and the status that fits.
fn broken_chat() -> impl Strategy<Value = (Vec<u8>, u16)> {
    (valid_chat(), 0usize..12, any::<prop::sample::Index>(), -5i64..=0, prop_oneof![-3.0f64..-0.001, 2.001f64..9.0])
        .prop_map(|(mut v, what, cut, tokens, temp)| {
            let status = match what {
                0 => {
                    v.as_object_mut().map(|o| o.remove("model"));
                    400
                }
                1 => {
                    v["model"] = json!(42);
                    400
                }
                2 => {
                    v["model"] = json!("");
                    400
                }
                3 => {
                    v["model"] = json!("no-such-model");
                    404
                }
                4 => {
                    v["messages"] = json!([]);
                    400
                }
                5 => {
                    v["messages"] = json!("hi");
                    400
                }
                6 => {
                    v["messages"][0]["role"] = json!("wizard");
                    400
                }
                7 => {
                    v["messages"][0].as_object_mut().map(|o| o.remove("role"));
                    400
                }
                8 => {
                    v["max_tokens"] = json!(tokens);
                    400
                }
                9 => {
                    v["temperature"] = json!(temp);
                    400
                }
                10 => return (serde_json::to_vec(&json!([v])).unwrap_or_default(), 400),
                _ => {
                    // Any proper prefix of a JSON object is not JSON.
                    let text = serde_json::to_vec(&v).unwrap_or_default();
                    let at = cut.index(text.len());
                    return (text[..at].to_vec(), 400);
                }
            };
            (serde_json::to_vec(&v).unwrap_or_default(), status)
        })
}

const KEYS: [&str; 9] = ["model", "messages", "role", "content", "stream", "max_tokens", "temperature", "input", "x"];

fn random_json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        (-1e3f64..1e3).prop_map(Value::from),
        "[a-z ]{0,6}".prop_map(Value::from),
        prop::sample::select(&["gpt-4.1", "text-embedding-3-small", "user", "wizard"][..]).prop_map(Value::from),
    ];
    leaf.prop_recursive(3, 24, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
            prop::collection::vec((prop::sample::select(&KEYS[..]), inner), 0..5)
                .prop_map(|kv| Value::Object(kv.into_iter().map(|(k, v)| (k.to_string(), v)).collect())),
        ]
    })
}

fn case() -> impl Strategy<Value = Case> {
    let json_body = |v: Value| serde_json::to_vec(&v).unwrap_or_default();
    let ct = Some("application/json");
    prop_oneof![
        3 => valid_chat().prop_map(move |v| Case { path: CHAT, content_type: ct, body: json_body(v), expect: Expect::Answer }),
        3 => broken_chat().prop_map(move |(body, s)| Case { path: CHAT, content_type: ct, body, expect: Expect::Status(s) }),
        1 => prop_oneof![any::<String>().prop_filter("non-empty", |s| !s.is_empty()).prop_map(Value::from), prop::collection::vec("[a-z]{1,5}", 1..3).prop_map(Value::from)]
            .prop_map(move |input| Case {
                path: EMBEDDINGS,
                content_type: ct,
                body: json_body(json!({"model": "text-embedding-3-small", "input": input})),
                expect: Expect::Answer,
            }),
        1 => valid_chat().prop_map(|v| Case {
            path: CHAT,
            content_type: Some("text/plain"),
            body: serde_json::to_vec(&v).unwrap_or_default(),
            expect: Expect::Status(415),
        }),
        1 => prop::collection::vec(any::<u8>(), 0..200)
            .prop_map(move |body| Case { path: CHAT, content_type: ct, body, expect: Expect::Status(400) }),
        2 => (random_json(), prop::sample::select(&[CHAT, EMBEDDINGS][..]), prop::option::of(Just("application/json")))
            .prop_map(|(v, path, content_type)| Case { path, content_type, body: serde_json::to_vec(&v).unwrap_or_default(), expect: Expect::Any }),
    ]
}

/// The property for one answer.
fn judge(case: &Case, r: &Reply) -> Result<(), TestCaseError> {
    let stream = case.path == CHAT && serde_json::from_slice::<Value>(&case.body).is_ok_and(|v| v["stream"] == true);
    if (200..300).contains(&r.status) {
        prop_assert!(case.expect != Expect::Status(r.status), "{case:?}");
        prop_assert!(matches!(case.expect, Expect::Answer | Expect::Any), "2xx for {case:?}: {}", r.text());
        if stream {
            prop_assert!(r.text().ends_with("data: [DONE]\n\n"), "stream: {}", r.text());
        } else {
            let v: Value =
                serde_json::from_slice(&r.body).map_err(|e| TestCaseError::fail(format!("{e}: {}", r.text())))?;
            let field = if case.path == CHAT { "choices" } else { "data" };
            prop_assert!(v[field].as_array().is_some_and(|a| !a.is_empty()), "answer: {v}");
        }
        return Ok(());
    }
    prop_assert!((400..600).contains(&r.status), "status {} for {case:?}", r.status);
    let v: Value = serde_json::from_slice(&r.body).map_err(|e| TestCaseError::fail(format!("{e}: {}", r.text())))?;
    let keys: Vec<&String> = v.as_object().map(|o| o.keys().collect()).unwrap_or_default();
    prop_assert_eq!(keys, vec!["error"], "{}", v);
    for field in ["message", "type", "code"] {
        prop_assert!(v["error"][field].is_string(), "error.{} in {}", field, v);
    }
    match case.expect {
        Expect::Answer => prop_assert!(false, "{} for a valid request {case:?}: {v}", r.status),
        Expect::Status(s) => prop_assert_eq!(r.status, s, "{:?}: {}", case, v),
        // Whatever the random request was, the client's mistake is a 4xx: the upstream is healthy.
        Expect::Any => prop_assert!(r.status < 500, "{} for {case:?}: {v}", r.status),
    }
    Ok(())
}

#[test]
fn every_request_gets_an_answer_or_an_openai_error() {
    let up = mock("m", "gpt-4.1,text-embedding-3-small", &["--tokens-per-sec", "0"]);
    let models = model("gpt-4.1", "") + &model("text-embedding-3-small", "kind = \"embeddings\"");
    let endpoints = [("m", up.addr, "models = [\"gpt-4.1\", \"text-embedding-3-small\"]")];
    let gw = gateway(&config(&endpoints, &models, "[log]\nenabled = false\n"), &[]);
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let mut runner = TestRunner::new(Config { cases: 256, failure_persistence: None, ..Config::default() });
    let seen = std::sync::Mutex::new(std::collections::BTreeMap::<u16, u32>::new());
    let result = runner.run(&case(), |case| {
        let headers: Vec<(&str, &str)> = case.content_type.map(|ct| ("content-type", ct)).into_iter().collect();
        let r = rt.block_on(request("POST", &gw.url(case.path), &headers, case.body.clone()));
        *seen.lock().unwrap().entry(r.status).or_default() += 1;
        judge(&case, &r)
    });
    eprintln!("statuses seen: {:?}", seen.lock().unwrap());
    if let Err(e) = result {
        panic!("{e}\ngateway stderr:\n{}", gw.proc.stderr());
    }
}
