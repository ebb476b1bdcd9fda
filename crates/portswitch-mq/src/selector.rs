//! Selectors: a consumer group's filter over a partition's records, in the platform's
//! query language (`portswitch-query`, docs/QUERY.md), the way a JetStream consumer has
//! a `filter_subject` and a JMS subscriber a message selector. docs/MQ.md, "Selectors".
//!
//! A selector is compiled once ([`Selector::compile`]) against the record schema below
//! and evaluated per message ([`Selector::matches`]). Only the variables the program
//! reads are built per message: `offset` and `timestamp` cost nothing; `key`, `key_str`
//! `payload` and `payload_str` copy those bytes once (the language's values own their bytes);
//! `headers` parses the broker's `name=value` lines (an empty header block binds one
//! shared empty map); `json` parses the payload (up to [`SELECTOR_JSON_BYTES_MAX`]),
//! only if the program reads it. A [`Memo`] builds each of these at most once per
//! message, however many groups' selectors read it.
//!
//! | variable | type | what |
//! |---|---|---|
//! | `key` | `bytes` | the message's key |
//! | `key_str` | `string` | the key as UTF-8 (invalid sequences become U+FFFD) |
//! | `headers` | `map(string, string)` | the headers the broker added (dead letters: `reason`, `queue`, …) |
//! | `payload` | `bytes` | the payload |
//! | `payload_str` | `string` | the payload as UTF-8 (invalid sequences become U+FFFD) |
//! | `json` | `dyn` | the payload parsed as JSON if it is a JSON object, else `{}` |
//! | `timestamp` | `timestamp` | when the broker accepted the message |
//! | `offset` | `int` | the message's offset in its partition |

use std::cell::OnceCell;
use std::sync::Arc;

use portswitch_query::{
    Bindings, CompileError, EvalError, Limits, Map, Program, Schema, Type, Value,
};

/// Longest selector accepted, in bytes: far beyond a filter written by hand, small
/// enough that a selector travels in a SUBSCRIBE and a control record cheaply.
pub const SELECTOR_BYTES_MAX: usize = 4096;
/// Steps one evaluation may take for the expression's own work (the query library's
/// default is 1,000,000): a selector runs once per message and group inside the
/// partition's turn, so this part is held to a fraction of a millisecond. Scans of the
/// message come on top, sized by the largest message the queue accepts
/// ([`steps_for`]), so that no message is refused for being large.
pub const SELECTOR_STEPS_MAX: u64 = 50_000;
/// Full scans of the largest message one evaluation may make on top of
/// [`SELECTOR_STEPS_MAX`] (a scan costs one step per 64 bytes; `matches` charges four
/// scans, so this is four regex matches over the whole payload, or sixteen `contains`).
pub const SELECTOR_SCANS_MAX: u64 = 16;
/// Bytes one evaluation may allocate for the values it builds, at least (a queue with
/// larger messages gets twice its `message_bytes_max`: [`memory_for`]).
pub const SELECTOR_MEMORY_BYTES_MAX: u64 = 2 << 20;
/// Regex literals per selector, and the size of each compiled regex.
pub const SELECTOR_REGEXES_MAX: usize = 4;
pub const SELECTOR_REGEX_BYTES_MAX: usize = 256 << 10;
/// Largest payload `json` is parsed from: a larger one binds `json` to `{}` without
/// parsing it (so `has(json.f)` is false and `json.f` an evaluation error, counted in
/// `selector_errors`). Parsing is not metered by the step budget, so this is what
/// bounds its cost (about 1.3 ms at the limit).
pub const SELECTOR_JSON_BYTES_MAX: usize = 64 << 10;

/// The step budget of one evaluation on a queue whose messages are at most
/// `message_bytes_max` bytes: [`SELECTOR_STEPS_MAX`] plus [`SELECTOR_SCANS_MAX`] scans
/// of the largest message (312,144 for the default 1 MiB; 2,147,152 for 8 MiB).
pub fn steps_for(message_bytes_max: u64) -> u64 {
    let scan = message_bytes_max.div_ceil(portswitch_query::limits::SCAN_BYTES_PER_STEP);
    SELECTOR_STEPS_MAX.saturating_add(SELECTOR_SCANS_MAX.saturating_mul(scan))
}

/// The memory budget of one evaluation on such a queue: enough to build a value as
/// large as the message twice (`lower(payload_str)`, a concatenation).
pub fn memory_for(message_bytes_max: u64) -> u64 {
    SELECTOR_MEMORY_BYTES_MAX.max(message_bytes_max.saturating_mul(2))
}

/// The limits a selector is compiled and evaluated under on a queue whose messages
/// are at most `message_bytes_max` bytes.
pub fn limits(message_bytes_max: u64) -> Limits {
    Limits {
        source_bytes_max: SELECTOR_BYTES_MAX,
        steps_max: steps_for(message_bytes_max),
        memory_bytes_max: memory_for(message_bytes_max),
        regexes_max: SELECTOR_REGEXES_MAX,
        regex_bytes_max: SELECTOR_REGEX_BYTES_MAX,
        ..Limits::default()
    }
}

/// The record a selector sees. Strict: a variable not listed is a compile error, so
/// that a misspelt name is refused at SUBSCRIBE rather than skipping every message.
pub fn schema() -> Schema {
    Schema::new()
        .with("key", Type::Bytes)
        .with("key_str", Type::String)
        .with("headers", Type::map(Type::String))
        .with("payload", Type::Bytes)
        .with("payload_str", Type::String)
        .with("json", Type::Dyn)
        .with("timestamp", Type::Time)
        .with("offset", Type::Int)
        .declared_only()
}

/// A selector refused at SUBSCRIBE.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum SelectorError {
    #[error("a selector of {len} bytes is longer than the limit of {SELECTOR_BYTES_MAX}")]
    TooLong { len: usize },
    #[error("the selector does not compile: {0}")]
    Compile(CompileError),
    #[error("a selector must be a bool expression; this one is {0}")]
    NotBool(String),
}

/// One message as a selector sees it (borrowed from the log or the broker's window).
#[derive(Debug, Clone, Copy)]
pub struct RecordView<'a> {
    pub offset: u64,
    pub timestamp_ms: u64,
    pub key: &'a [u8],
    pub headers: &'a [u8],
    pub payload: &'a [u8],
}

/// A compiled selector. Immutable, `Send + Sync`: shared by every partition of a group.
#[derive(Debug)]
pub struct Selector {
    program: Program,
    /// Which variables the program reads (only those are built per message).
    reads: Reads,
    empty_headers: Value,
}

#[derive(Debug, Default, Clone, Copy)]
struct Reads {
    key: bool,
    key_str: bool,
    headers: bool,
    payload: bool,
    payload_str: bool,
    json: bool,
    timestamp: bool,
    offset: bool,
}

/// What a selector decided for one message.
#[derive(Debug, Clone, PartialEq)]
pub enum Verdict {
    Match,
    /// Not for this group: settled for it without delivery.
    Skip,
    /// The selector failed on this message (skipped too, and counted apart).
    Error(EvalError),
}

/// The values of one message that selectors read, built at most once per message
/// however many groups' selectors read them (the JSON parse above all).
#[derive(Debug, Default)]
pub struct Memo {
    key: OnceCell<Value>,
    key_str: OnceCell<Value>,
    headers: OnceCell<Value>,
    payload: OnceCell<Value>,
    payload_str: OnceCell<Value>,
    json: OnceCell<Value>,
}

impl Memo {
    /// Whether `json` was built for this message (it is built at most once).
    pub fn json_parsed(&self) -> bool {
        self.json.get().is_some()
    }
}

impl Selector {
    /// Compiles `source` against [`schema`] for a queue whose messages are at most
    /// `message_bytes_max` bytes (its budget: [`limits`]); the result must be a bool.
    pub fn compile(source: &str, message_bytes_max: u64) -> Result<Selector, SelectorError> {
        if source.len() > SELECTOR_BYTES_MAX {
            return Err(SelectorError::TooLong { len: source.len() });
        }
        let program = Program::compile(source, &schema(), &limits(message_bytes_max))
            .map_err(SelectorError::Compile)?;
        if !matches!(program.result_type(), Type::Bool | Type::Dyn) {
            return Err(SelectorError::NotBool(program.result_type().to_string()));
        }
        let mut reads = Reads::default();
        for v in program.variables() {
            match v {
                "key" => reads.key = true,
                "key_str" => reads.key_str = true,
                "headers" => reads.headers = true,
                "payload" => reads.payload = true,
                "payload_str" => reads.payload_str = true,
                "json" => reads.json = true,
                "timestamp" => reads.timestamp = true,
                "offset" => reads.offset = true,
                _ => {}
            }
        }
        Ok(Selector {
            program,
            reads,
            empty_headers: Value::Map(Arc::new(Map::new())),
        })
    }

    /// The source it was compiled from (what the group keeps and compares).
    pub fn source(&self) -> &str {
        self.program.source()
    }

    /// Whether the message is for the group. Evaluation is bounded by [`limits`].
    pub fn matches(&self, r: &RecordView<'_>) -> Verdict {
        self.matches_with(r, &Memo::default())
    }

    /// [`Selector::matches`], taking the message's values from `memo` (built there by
    /// the first selector that reads them): one memo per message, shared by the groups.
    pub fn matches_with(&self, r: &RecordView<'_>, memo: &Memo) -> Verdict {
        let reads = self.reads;
        let timestamp = Value::Time(
            i64::try_from(r.timestamp_ms)
                .unwrap_or(i64::MAX)
                .saturating_mul(1_000_000),
        );
        let offset = Value::Int(i64::try_from(r.offset).unwrap_or(i64::MAX));
        let mut b: Bindings<'_> = self.program.bindings();
        if reads.key {
            b.set("key", memo.key.get_or_init(|| Value::bytes(r.key)));
        }
        if reads.key_str {
            b.set(
                "key_str",
                memo.key_str
                    .get_or_init(|| Value::from(String::from_utf8_lossy(r.key).as_ref())),
            );
        }
        if reads.headers {
            if r.headers.is_empty() {
                b.set("headers", &self.empty_headers);
            } else {
                b.set(
                    "headers",
                    memo.headers.get_or_init(|| parse_headers(r.headers)),
                );
            }
        }
        if reads.payload {
            b.set(
                "payload",
                memo.payload.get_or_init(|| Value::bytes(r.payload)),
            );
        }
        if reads.payload_str {
            b.set(
                "payload_str",
                memo.payload_str
                    .get_or_init(|| Value::from(String::from_utf8_lossy(r.payload).as_ref())),
            );
        }
        if reads.json {
            b.set("json", memo.json.get_or_init(|| json_object(r.payload)));
        }
        if reads.timestamp {
            b.set("timestamp", &timestamp);
        }
        if reads.offset {
            b.set("offset", &offset);
        }
        match self.program.eval_bool(&b) {
            Ok(true) => Verdict::Match,
            Ok(false) => Verdict::Skip,
            Err(e) => Verdict::Error(e),
        }
    }
}

/// The broker's header block, `name=value` lines, as a map (a line without `=` is a
/// name with an empty value; a repeated name keeps its last value; bytes that are not
/// UTF-8 become U+FFFD).
pub fn parse_headers(h: &[u8]) -> Value {
    let mut m = Map::new();
    for line in h.split(|&b| b == b'\n').filter(|l| !l.is_empty()) {
        let (name, value) = match line.iter().position(|&b| b == b'=') {
            Some(i) => (&line[..i], &line[i + 1..]),
            None => (line, &line[line.len()..]),
        };
        m.insert(
            String::from_utf8_lossy(name).as_ref(),
            Value::from(String::from_utf8_lossy(value).as_ref()),
        );
    }
    Value::Map(Arc::new(m))
}

/// The payload as a query value if it is a JSON object of at most
/// [`SELECTOR_JSON_BYTES_MAX`] bytes, else an empty map (so that `has(json.field)` is
/// false and `json.field` a missing-key evaluation error). serde_json refuses nesting
/// past 128 levels, which bounds the conversion's depth.
pub fn json_object(payload: &[u8]) -> Value {
    if payload.len() > SELECTOR_JSON_BYTES_MAX {
        return Value::Map(Arc::new(Map::new()));
    }
    match serde_json::from_slice::<serde_json::Value>(payload) {
        Ok(v @ serde_json::Value::Object(_)) => from_json(v),
        _ => Value::Map(Arc::new(Map::new())),
    }
}

fn from_json(v: serde_json::Value) -> Value {
    match v {
        serde_json::Value::Null => Value::Null,
        serde_json::Value::Bool(b) => Value::Bool(b),
        serde_json::Value::Number(n) => match n.as_i64() {
            Some(i) => Value::Int(i),
            None => Value::Float(n.as_f64().unwrap_or(f64::NAN)),
        },
        serde_json::Value::String(s) => Value::from(s),
        serde_json::Value::Array(a) => Value::list(a.into_iter().map(from_json)),
        serde_json::Value::Object(o) => {
            let mut m = Map::with_capacity(o.len());
            for (k, v) in o {
                m.insert(k, from_json(v));
            }
            Value::Map(Arc::new(m))
        }
    }
}

/// A compile error as one line for a reply: `line:column: what` (the excerpt and caret
/// follow on further lines of the message).
pub fn describe(e: &SelectorError) -> String {
    match e {
        SelectorError::TooLong { .. } | SelectorError::NotBool(_) => e.to_string(),
        SelectorError::Compile(c) => format!("selector: {c}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec<'a>(key: &'a [u8], headers: &'a [u8], payload: &'a [u8]) -> RecordView<'a> {
        RecordView {
            offset: 7,
            timestamp_ms: 1_700_000_000_000,
            key,
            headers,
            payload,
        }
    }

    #[test]
    fn each_variable_is_bound() {
        let m = |src: &str, r: &RecordView<'_>| Selector::compile(src, 1 << 20).unwrap().matches(r);
        let r = rec(
            b"k1",
            b"reason=expired\nqueue=q\n",
            br#"{"a": {"b": 3}, "t": "x"}"#,
        );
        assert_eq!(m(r#"key == b"k1""#, &r), Verdict::Match);
        assert_eq!(m(r#"key_str.startsWith("k")"#, &r), Verdict::Match);
        assert_eq!(m(r#"headers.reason == "expired""#, &r), Verdict::Match);
        assert_eq!(m(r#"payload_str.contains("\"t\"")"#, &r), Verdict::Match);
        assert_eq!(
            m(r#"size(payload) > 10 && payload != b"x""#, &r),
            Verdict::Match
        );
        assert_eq!(m(r#"json.a.b == 3 && json.t == "x""#, &r), Verdict::Match);
        assert_eq!(
            m(r#"timestamp > timestamp("2023-01-01T00:00:00Z")"#, &r),
            Verdict::Match
        );
        assert_eq!(m("offset == 7", &r), Verdict::Match);
        assert_eq!(m("offset == 8", &r), Verdict::Skip);
        assert_eq!(
            m(r#""reason" in headers"#, &rec(b"", b"", b"")),
            Verdict::Skip
        );
        assert_eq!(m("has(json.a)", &rec(b"", b"", b"not json")), Verdict::Skip);
        assert!(matches!(
            m("json.a == 1", &rec(b"", b"", b"[1]")),
            Verdict::Error(_)
        ));
    }

    #[test]
    fn bad_selectors_are_typed_errors_with_a_position() {
        let e = Selector::compile("offset == ", 1 << 20).unwrap_err();
        let SelectorError::Compile(c) = &e else {
            panic!("{e}")
        };
        assert!(c.location().is_some());
        assert!(describe(&e).contains("1:"), "{}", describe(&e));
        assert!(matches!(
            Selector::compile("ofset == 1", 1 << 20),
            Err(SelectorError::Compile(_))
        ));
        assert!(matches!(
            Selector::compile("offset + 1", 1 << 20),
            Err(SelectorError::NotBool(_))
        ));
        let long = "true && ".repeat(600) + "true";
        assert!(matches!(
            Selector::compile(&long, 1 << 20),
            Err(SelectorError::TooLong { .. })
        ));
    }

    /// The budget scales with the queue's largest message: a regex match and scans over
    /// a payload at the limit fit (they did not under a fixed 50,000 steps).
    #[test]
    fn scans_of_the_largest_message_fit_the_budget() {
        for max in [1u64 << 20, 8 << 20] {
            let mut payload = vec![b'a'; max as usize - 8];
            payload.extend_from_slice(b"urgent!!");
            let r = rec(b"", b"", &payload);
            let src = r#"payload_str.matches("urgent!+$") && payload_str.contains("urgent") && size(payload_str) > 10"#;
            let s = Selector::compile(src, max).unwrap();
            assert_eq!(s.matches(&r), Verdict::Match, "a message of {max} bytes");
        }
        assert_eq!(steps_for(1 << 20), 312_144);
        // A hostile selector still runs out (the budget is finite).
        let s = Selector::compile(
            "[1,2,3,4,5,6,7,8,9,10].all(a, [1,2,3,4,5,6,7,8,9,10].all(b, [1,2,3,4,5,6,7,8,9,10].all(c, [1,2,3,4,5,6,7,8,9,10].all(d, [1,2,3,4,5,6,7,8,9,10].all(e, payload_str.contains(\"z\"))))))",
            1 << 20,
        );
        if let Ok(s) = s {
            let payload = vec![b'a'; 1 << 16];
            assert!(matches!(
                s.matches(&rec(b"", b"", &payload)),
                Verdict::Error(_)
            ));
        }
    }

    /// `json` is parsed once per message for every selector that reads it, and not at
    /// all beyond the limit (where it is `{}`).
    #[test]
    fn json_is_parsed_once_per_message_and_not_past_its_limit() {
        let a = Selector::compile("json.n == 1", 1 << 20).unwrap();
        let b = Selector::compile("has(json.n) && json.n > 0", 1 << 20).unwrap();
        let r = rec(b"", b"", br#"{"n": 1}"#);
        let memo = Memo::default();
        assert!(!memo.json_parsed());
        assert_eq!(a.matches_with(&r, &memo), Verdict::Match);
        assert!(memo.json_parsed());
        let parsed = memo.json.get().unwrap() as *const Value;
        assert_eq!(b.matches_with(&r, &memo), Verdict::Match);
        assert!(std::ptr::eq(parsed, memo.json.get().unwrap()));
        let mut big = br#"{"n": 1, "pad": ""#.to_vec();
        big.extend(std::iter::repeat_n(b'x', SELECTOR_JSON_BYTES_MAX));
        big.extend_from_slice(br#""}"#);
        let r = rec(b"", b"", &big);
        assert_eq!(b.matches(&r), Verdict::Skip);
        assert!(matches!(a.matches(&r), Verdict::Error(_)));
    }

    #[test]
    fn headers_parse_like_the_broker_writes_them() {
        let v = parse_headers(b"a=1\nb\nc=x=y\na=2\n\xff=z\n");
        let m = v.as_map().unwrap();
        assert_eq!(m.get("a").and_then(Value::as_str), Some("2"));
        assert_eq!(m.get("b").and_then(Value::as_str), Some(""));
        assert_eq!(m.get("c").and_then(Value::as_str), Some("x=y"));
        assert_eq!(m.get("\u{fffd}").and_then(Value::as_str), Some("z"));
    }
}
