//! Selectors: a consumer group's filter over a partition's records, in the platform's
//! query language (`portswitch-query`, docs/QUERY.md), the way a JetStream consumer has
//! a `filter_subject` and a JMS subscriber a message selector. docs/MQ.md, "Selectors".
//!
//! A selector is compiled once ([`Selector::compile`]) against the record schema below
//! and evaluated per message ([`Selector::matches`]). Only the variables the program
//! reads are built per message: `offset` and `timestamp` cost nothing; `key`, `key_str`
//! `payload` and `payload_str` copy those bytes once (the language's values own their bytes);
//! `headers` parses the broker's `name=value` lines (an empty header block binds one
//! shared empty map); `json` parses the payload, only if the program reads it.
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

use std::sync::Arc;

use portswitch_query::{
    Bindings, CompileError, EvalError, Limits, Map, Program, Schema, Type, Value,
};

/// Longest selector accepted, in bytes: far beyond a filter written by hand, small
/// enough that a selector travels in a SUBSCRIBE and a control record cheaply.
pub const SELECTOR_BYTES_MAX: usize = 4096;
/// Steps one evaluation may take (the query library's default is 1,000,000): a
/// selector runs once per message and group inside the partition's turn, so it is held
/// to a fraction of a millisecond. A scan of a 1 MiB payload costs 16,384 steps.
pub const SELECTOR_STEPS_MAX: u64 = 50_000;
/// Bytes one evaluation may allocate for the values it builds.
pub const SELECTOR_MEMORY_BYTES_MAX: u64 = 2 << 20;
/// Regex literals per selector, and the size of each compiled regex.
pub const SELECTOR_REGEXES_MAX: usize = 4;
pub const SELECTOR_REGEX_BYTES_MAX: usize = 256 << 10;

/// The limits a selector is compiled and evaluated under.
pub fn limits() -> Limits {
    Limits {
        source_bytes_max: SELECTOR_BYTES_MAX,
        steps_max: SELECTOR_STEPS_MAX,
        memory_bytes_max: SELECTOR_MEMORY_BYTES_MAX,
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

impl Selector {
    /// Compiles `source` under [`limits`] against [`schema`]; the result must be a bool.
    pub fn compile(source: &str) -> Result<Selector, SelectorError> {
        if source.len() > SELECTOR_BYTES_MAX {
            return Err(SelectorError::TooLong { len: source.len() });
        }
        let program =
            Program::compile(source, &schema(), &limits()).map_err(SelectorError::Compile)?;
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
        let reads = self.reads;
        let key = if reads.key {
            Value::bytes(r.key)
        } else {
            Value::Null
        };
        let key_str = if reads.key_str {
            Value::from(String::from_utf8_lossy(r.key).as_ref())
        } else {
            Value::Null
        };
        let headers = if !reads.headers || r.headers.is_empty() {
            Value::Null
        } else {
            parse_headers(r.headers)
        };
        let payload = if reads.payload {
            Value::bytes(r.payload)
        } else {
            Value::Null
        };
        let payload_str = if reads.payload_str {
            Value::from(String::from_utf8_lossy(r.payload).as_ref())
        } else {
            Value::Null
        };
        let json = if reads.json {
            json_object(r.payload)
        } else {
            Value::Null
        };
        let timestamp = Value::Time(
            i64::try_from(r.timestamp_ms)
                .unwrap_or(i64::MAX)
                .saturating_mul(1_000_000),
        );
        let offset = Value::Int(i64::try_from(r.offset).unwrap_or(i64::MAX));
        let mut b: Bindings<'_> = self.program.bindings();
        if reads.key {
            b.set("key", &key);
        }
        if reads.key_str {
            b.set("key_str", &key_str);
        }
        if reads.headers {
            if r.headers.is_empty() {
                b.set("headers", &self.empty_headers);
            } else {
                b.set("headers", &headers);
            }
        }
        if reads.payload {
            b.set("payload", &payload);
        }
        if reads.payload_str {
            b.set("payload_str", &payload_str);
        }
        if reads.json {
            b.set("json", &json);
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

/// The payload as a query value if it is a JSON object, else an empty map (so that
/// `has(json.field)` is false and `json.field` a missing-key evaluation error).
/// serde_json refuses nesting past 128 levels, which bounds the conversion's depth.
pub fn json_object(payload: &[u8]) -> Value {
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
        let m = |src: &str, r: &RecordView<'_>| Selector::compile(src).unwrap().matches(r);
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
        let e = Selector::compile("offset == ").unwrap_err();
        let SelectorError::Compile(c) = &e else {
            panic!("{e}")
        };
        assert!(c.location().is_some());
        assert!(describe(&e).contains("1:"), "{}", describe(&e));
        assert!(matches!(
            Selector::compile("ofset == 1"),
            Err(SelectorError::Compile(_))
        ));
        assert!(matches!(
            Selector::compile("offset + 1"),
            Err(SelectorError::NotBool(_))
        ));
        let long = "true && ".repeat(600) + "true";
        assert!(matches!(
            Selector::compile(&long),
            Err(SelectorError::TooLong { .. })
        ));
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
