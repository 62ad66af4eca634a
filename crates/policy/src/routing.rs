//! Content-aware routing: which rule of an alias (`model = "auto"`) serves a request.
//!
//! The rules of one alias are compiled once into a [`Router`]: every `regex` and every rule's `keywords`
//! (escaped, case-insensitive) become patterns of one multi-pattern regex, so the last user message is scanned
//! once whatever the number of rules — and only once more, to tell which patterns matched, when one did (most
//! messages match none, and the pass that stops at the first match costs a third of the one that finds them
//! all). A literal prefilter is used only when it is a fast one (memchr, memmem, Teddy): the case-insensitive
//! keywords of many rules expand into more literals than those take, and the automaton left then costs three
//! times the lazy DFA it was meant to spare. The cheap conditions (tools, headers, metadata) are checked first,
//! the message is only looked at when a rule needs it, and tokens are only counted when a rule has a bound.
//! Rules are tried in file order; the first whose conditions all hold wins, else the alias's default rule.
//!
//! Pure: the caller extracts the message, headers and metadata from the request (the wire format is not known
//! here) and counts tokens with the function it passes.

use regex_automata::meta;
use regex_automata::util::prefilter::Prefilter;
use regex_automata::{Input, MatchKind, PatternID, PatternSet};

/// One rule as configured.
#[derive(Debug, Clone, Default)]
pub struct RuleSpec {
    /// Its name (the route reason).
    pub name: String,
    /// The last user message matches this.
    pub regex: Option<String>,
    /// The last user message contains one of these, ignoring case.
    pub keywords: Vec<String>,
    /// Estimated tokens of the last user message, at least.
    pub min_tokens: Option<u64>,
    /// … at most.
    pub max_tokens: Option<u64>,
    /// The message contains code (or does not).
    pub has_code: Option<bool>,
    /// The request carries tools (or does not).
    pub has_tools: Option<bool>,
    /// Request headers (lower-case names) that must have these values.
    pub headers: Vec<(String, String)>,
    /// `metadata` entries that must have these values.
    pub metadata: Vec<(String, String)>,
    /// The alias's default rule (used when no rule matches; its conditions are not checked).
    pub default: bool,
}

struct Rule {
    spec: RuleSpec,
    regex: Option<usize>,
    keywords: Option<usize>,
    needs_text: bool,
}

/// What the router needs to know of a request.
pub trait Request {
    /// The text of the last user message (called at most once, only when a rule needs it).
    fn last_user_text(&self) -> &str;
    /// Whether the request carries tools.
    fn has_tools(&self) -> bool;
    /// A request header's value by lower-case name.
    fn header(&self, name: &str) -> Option<&str>;
    /// A `metadata` entry's value.
    fn metadata(&self, key: &str) -> Option<&str>;
}

/// The compiled rules of one alias.
pub struct Router {
    rules: Vec<Rule>,
    /// Every pattern of the rules, matched with "all matches" semantics (a set, not leftmost-first).
    set: meta::Regex,
    default: Option<usize>,
}

/// A rule that could not be compiled (the config check reports these before they get here).
#[derive(Debug, thiserror::Error)]
#[error("route {rule:?}: {message}")]
pub struct RouteError {
    /// The rule's name.
    pub rule: String,
    /// What is wrong.
    pub message: String,
}

impl Router {
    /// Compile an alias's rules, in order.
    pub fn new(specs: Vec<RuleSpec>) -> Result<Router, RouteError> {
        let mut patterns = Vec::new();
        let mut rules = Vec::with_capacity(specs.len());
        let mut default = None;
        for spec in specs {
            let regex = spec.regex.as_ref().map(|r| {
                patterns.push(r.clone());
                patterns.len() - 1
            });
            let keywords = (!spec.keywords.is_empty()).then(|| {
                patterns.push(keyword_pattern(&spec.keywords));
                patterns.len() - 1
            });
            if spec.default && default.is_none() {
                default = Some(rules.len());
            }
            let needs_text = regex.is_some()
                || keywords.is_some()
                || spec.has_code.is_some()
                || spec.min_tokens.is_some()
                || spec.max_tokens.is_some();
            rules.push(Rule { spec, regex, keywords, needs_text });
        }
        let set = compile(&patterns).map_err(|message| {
            // Name the rule whose pattern failed: compile them one by one to find it.
            let rule = rules
                .iter()
                .find(|r| r.spec.regex.as_ref().is_some_and(|p| compile(std::slice::from_ref(p)).is_err()))
                .map_or_else(String::new, |r| r.spec.name.clone());
            RouteError { rule, message }
        })?;
        Ok(Router { rules, set, default })
    }

    /// The rule that serves `req`: the first whose conditions hold, else the default; `None` when neither.
    /// `count_tokens` estimates the tokens of a text (called at most once).
    pub fn pick(&self, req: &impl Request, count_tokens: impl Fn(&str) -> u64) -> Option<&RuleSpec> {
        let mut matches: Option<Option<PatternSet>> = None;
        let mut tokens: Option<u64> = None;
        let mut code: Option<bool> = None;
        for rule in &self.rules {
            let s = &rule.spec;
            if s.default && !rule.needs_text && s.has_tools.is_none() && s.headers.is_empty() && s.metadata.is_empty() {
                // A bare default rule: only as the fallback, never as a match ahead of later rules.
                continue;
            }
            if s.has_tools.is_some_and(|t| t != req.has_tools()) {
                continue;
            }
            if !s.headers.iter().all(|(k, v)| req.header(k) == Some(v.as_str())) {
                continue;
            }
            if !s.metadata.iter().all(|(k, v)| req.metadata(k) == Some(v.as_str())) {
                continue;
            }
            if rule.needs_text {
                let text = req.last_user_text();
                let m = matches.get_or_insert_with(|| self.matching(text));
                let matched = |i: usize| m.as_ref().is_some_and(|m| m.contains(PatternID::new_unchecked(i)));
                if rule.regex.is_some_and(|i| !matched(i)) || rule.keywords.is_some_and(|i| !matched(i)) {
                    continue;
                }
                if let Some(want) = s.has_code {
                    if *code.get_or_insert_with(|| looks_like_code(text)) != want {
                        continue;
                    }
                }
                if s.min_tokens.is_some() || s.max_tokens.is_some() {
                    let n = *tokens.get_or_insert_with(|| count_tokens(text));
                    if s.min_tokens.is_some_and(|min| n < min) || s.max_tokens.is_some_and(|max| n > max) {
                        continue;
                    }
                }
            }
            return Some(s);
        }
        self.default.map(|i| &self.rules[i].spec)
    }

    /// The patterns that match `text`; `None` when none does, found by the pass that stops at the first match.
    fn matching(&self, text: &str) -> Option<PatternSet> {
        if !self.set.is_match(text) {
            return None;
        }
        let mut found = PatternSet::new(self.set.pattern_len());
        self.set.which_overlapping_matches(&Input::new(text), &mut found);
        Some(found)
    }

    /// Whether the alias has a default rule.
    pub fn has_default(&self) -> bool {
        self.default.is_some()
    }
}

/// A rule's keywords as one pattern: any of them, literally, ignoring case. ASCII keywords ignore ASCII case
/// only: Unicode case folding would add look-alikes (the Kelvin sign for `k`, the long s for `s`) to its
/// automaton.
fn keyword_pattern(keywords: &[String]) -> String {
    let alts: Vec<String> = keywords.iter().map(|k| regex::escape(k)).collect();
    let flags = if keywords.iter().all(|k| k.is_ascii()) { "i-u" } else { "i" };
    format!("(?{flags}:{})", alts.join("|"))
}

/// The rules' patterns as one regex, with the syntax of the `regex` crate; the error says what is wrong.
fn compile(patterns: &[String]) -> Result<meta::Regex, String> {
    let hirs = regex_automata::util::syntax::parse_many(patterns).map_err(|e| e.to_string())?;
    let prefilter = Prefilter::from_hirs_prefix(MatchKind::All, &hirs).filter(Prefilter::is_fast);
    meta::Builder::new()
        .configure(meta::Config::new().match_kind(MatchKind::All).auto_prefilter(false).prefilter(prefilter))
        .build_many_from_hir(&hirs)
        .map_err(|e| e.to_string())
}

/// Whether a message contains code: a fenced block, or at least two lines that read like code (a keyword of a
/// common language at the start, or ending in `;`, `{` or `}`).
pub fn looks_like_code(text: &str) -> bool {
    if text.contains("```") {
        return true;
    }
    const STARTS: &[&str] = &[
        "def ",
        "fn ",
        "class ",
        "import ",
        "from ",
        "#include",
        "function ",
        "const ",
        "let ",
        "var ",
        "public ",
        "private ",
        "return ",
        "if (",
        "for (",
        "while (",
        "SELECT ",
        "func ",
        "package ",
        "using ",
        "pub fn ",
        "async ",
        "impl ",
        "struct ",
        "#!/",
    ];
    let mut codeish = 0;
    for line in text.lines() {
        let t = line.trim();
        if t.is_empty() {
            continue;
        }
        let ends = t.ends_with(';') || t.ends_with('{') || t.ends_with('}');
        if ends || STARTS.iter().any(|s| t.starts_with(s)) {
            codeish += 1;
            if codeish >= 2 {
                return true;
            }
        }
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Default)]
    struct Req {
        text: String,
        tools: bool,
        headers: Vec<(&'static str, &'static str)>,
        metadata: Vec<(&'static str, &'static str)>,
        reads: std::cell::Cell<u32>,
    }

    impl Request for Req {
        fn last_user_text(&self) -> &str {
            self.reads.set(self.reads.get() + 1);
            &self.text
        }
        fn has_tools(&self) -> bool {
            self.tools
        }
        fn header(&self, name: &str) -> Option<&str> {
            self.headers.iter().find(|(k, _)| *k == name).map(|(_, v)| *v)
        }
        fn metadata(&self, key: &str) -> Option<&str> {
            self.metadata.iter().find(|(k, _)| *k == key).map(|(_, v)| *v)
        }
    }

    fn req(text: &str) -> Req {
        Req { text: text.into(), ..Default::default() }
    }

    fn rule(name: &str) -> RuleSpec {
        RuleSpec { name: name.into(), ..Default::default() }
    }

    fn words(s: &str) -> u64 {
        s.split_whitespace().count() as u64
    }

    fn pick<'a>(r: &'a Router, q: &Req) -> Option<&'a str> {
        r.pick(q, words).map(|s| s.name.as_str())
    }

    fn router() -> Router {
        Router::new(vec![
            RuleSpec { headers: vec![("x-team".into(), "search".into())], ..rule("search") },
            RuleSpec { metadata: vec![("tier".into(), "free".into())], ..rule("free") },
            RuleSpec { has_tools: Some(true), ..rule("tools") },
            RuleSpec { regex: Some("(?i)python|rust".into()), ..rule("lang") },
            RuleSpec { keywords: vec!["Refund".into(), "a+b".into()], ..rule("billing") },
            RuleSpec { keywords: vec!["Rückerstattung".into()], ..rule("billing-de") },
            RuleSpec { has_code: Some(true), ..rule("code") },
            RuleSpec { min_tokens: Some(50), ..rule("long") },
            RuleSpec { max_tokens: Some(3), ..rule("short") },
            RuleSpec { default: true, ..rule("rest") },
        ])
        .unwrap()
    }

    #[test]
    fn each_condition_in_order_then_the_default() {
        let r = router();
        let headers = Req { headers: vec![("x-team", "search")], ..req("write python") };
        assert_eq!(pick(&r, &headers), Some("search"));
        assert_eq!(pick(&r, &Req { metadata: vec![("tier", "free")], ..req("x") }), Some("free"));
        assert_eq!(pick(&r, &Req { tools: true, ..req("x") }), Some("tools"));
        assert_eq!(pick(&r, &req("How do I write RUST macros today")), Some("lang"));
        assert_eq!(pick(&r, &req("I want a REFUND for this order")), Some("billing"));
        assert_eq!(pick(&r, &req("is a+b ok here or not")), Some("billing"), "keywords are literal, not regex");
        assert_eq!(pick(&r, &req("Bitte um RÜCKERSTATTUNG heute")), Some("billing-de"), "Unicode case too");
        assert_eq!(pick(&r, &req("fix this:\n```\nx = 1\n```")), Some("code"));
        assert_eq!(pick(&r, &req(&"word ".repeat(60))), Some("long"));
        assert_eq!(pick(&r, &req("hi there")), Some("short"));
        assert_eq!(pick(&r, &req("a medium question of some words")), Some("rest"));
    }

    #[test]
    fn no_match_and_no_default_is_none_and_the_text_is_read_once() {
        let r = Router::new(vec![
            RuleSpec { regex: Some("x".into()), ..rule("x") },
            RuleSpec { keywords: vec!["y".into()], ..rule("y") },
        ])
        .unwrap();
        let q = req("zzz");
        assert_eq!(pick(&r, &q), None);
        assert!(!r.has_default());
        assert_eq!(q.reads.get(), 2, "once per rule that needs it, scanned once");
        let r = Router::new(vec![RuleSpec { has_tools: Some(true), ..rule("t") }]).unwrap();
        let q = req("anything");
        assert_eq!(pick(&r, &q), None);
        assert_eq!(q.reads.get(), 0, "no rule needs the text: it is never extracted");
    }

    #[test]
    fn all_conditions_of_a_rule_must_hold() {
        let r = Router::new(vec![RuleSpec {
            regex: Some("sql".into()),
            has_code: Some(true),
            max_tokens: Some(10),
            ..rule("sql")
        }])
        .unwrap();
        assert_eq!(pick(&r, &req("sql:\nSELECT 1;\nSELECT 2;")), Some("sql"));
        assert_eq!(pick(&r, &req("sql is a language")), None);
    }

    #[test]
    fn code_detection() {
        assert!(looks_like_code("```rust\nfn main() {}\n```"));
        assert!(looks_like_code("why does this fail?\ndef f(x):\n    return x + 1"));
        assert!(looks_like_code("int x = 1;\nx++;"));
        assert!(!looks_like_code("Please write me a poem about the sea; make it short."));
        assert!(!looks_like_code("hello"));
    }

    #[test]
    fn a_bad_pattern_is_named() {
        let e = Router::new(vec![rule("ok"), RuleSpec { regex: Some("(".into()), ..rule("bad") }]).err().unwrap();
        assert_eq!(e.rule, "bad");
    }

    /// The rules' patterns match exactly where the `regex` crate's `RegexSet` says they do, with a fast
    /// prefilter (case-sensitive literals) and without one (many case-insensitive keywords, `\b`, classes).
    #[test]
    fn patterns_match_as_a_regex_set_says() {
        use rand::{Rng, SeedableRng};
        let words = ["refund", "Invoice", "ticket-7", "größe", "sql", "a+b", "x"];
        let regexes = [r"(?i)\bticket-\d+\b", "sql|SQL", r"[0-9]{3}", "^hello", "world$", r"(?i)straße"];
        let mut rng = rand::rngs::SmallRng::seed_from_u64(11);
        for round in 0..300 {
            let specs: Vec<RuleSpec> = (0..rng.gen_range(1..12))
                .map(|i| {
                    let mut r = rule(&format!("r{i}"));
                    if rng.gen_bool(0.5) {
                        r.regex = Some(regexes[rng.gen_range(0..regexes.len())].into());
                    } else {
                        let n = rng.gen_range(1..4);
                        r.keywords = (0..n).map(|_| words[rng.gen_range(0..words.len())].to_string()).collect();
                    }
                    r
                })
                .collect();
            let router = Router::new(specs.clone()).unwrap();
            let reference = regex::RegexSet::new(router.rules.iter().flat_map(|r| {
                let kw = (!r.spec.keywords.is_empty()).then(|| keyword_pattern(&r.spec.keywords));
                r.spec.regex.clone().into_iter().chain(kw)
            }))
            .unwrap();
            for _ in 0..20 {
                let mut text = String::new();
                for _ in 0..rng.gen_range(0..8) {
                    let w = match rng.gen_range(0..4) {
                        0 => words[rng.gen_range(0..words.len())].to_uppercase(),
                        1 => words[rng.gen_range(0..words.len())].to_string(),
                        2 => rng.gen_range(0..5000).to_string(),
                        _ => ["hello", "world", "STRASSE", "Ticket-12", "lorem ipsum"][rng.gen_range(0..5)].into(),
                    };
                    text.push_str(&w);
                    text.push_str([" ", "", "\n", "-"][rng.gen_range(0..4)]);
                }
                let want = reference.matches(&text);
                let got = router.matching(&text);
                for i in 0..reference.len() {
                    let g = got.as_ref().is_some_and(|m| m.contains(PatternID::new_unchecked(i)));
                    assert_eq!(
                        g,
                        want.matched(i),
                        "round {round}, pattern {i} of {:?}, text {text:?}",
                        reference.patterns()
                    );
                }
            }
        }
    }
}
