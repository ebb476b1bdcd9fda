//! Filters: `portswitch-query` expressions over port records, for LIST_WHERE and
//! prefix WATCHes with the WHERE flag.
//!
//! A filter is compiled once — per LIST_WHERE request, or per watch registration —
//! against a fixed, strict schema (a misspelt field is a compile error) and under
//! [`limits`], which are far below the query language's defaults: the core evaluates
//! filters under its one lock, so a hostile filter must cost microseconds, not
//! milliseconds. Compiling checks the static cost of loops over literals; evaluating
//! meters steps and memory.
//!
//! A port record, as a filter sees it (variables, all declared):
//!
//! | variable | type | what |
//! |---|---|---|
//! | `name` | string | the port's name (bytes that are not UTF-8 read as U+FFFD) |
//! | `value` | bytes | the port's value |
//! | `text` | string | the value as text (bytes that are not UTF-8 read as U+FFFD) |
//! | `session` | string | the owner's session id, 16 lowercase hex digits (as `ctl` prints it) |
//! | `node` | string | the owner's node name |
//! | `token` | int | the grant's fencing token |
//! | `json` | dyn | the value parsed as JSON (`null` if it is not JSON) |
//! | `event` | string | WATCH only: `"claimed"` or `"released"` |
//!
//! For a RELEASED event the record is the port as it was just before the release (its
//! last owner, value and token). Only the variables a filter reads are built for each
//! record, so `name.startsWith("a")` costs one string per record and nothing for the
//! value.

use portswitch_proto::limits::QUERY_BYTES_MAX;
use portswitch_query::{EvalError, Limits, Program, Schema, Slot, Type, Value};

/// Step budget of one evaluation of a filter (a step is one node evaluated, or 64
/// bytes of a scan: some tens of microseconds at most). A filter that needs more on a
/// record fails on that record (skipped and counted), never holds the server.
pub const FILTER_STEPS_MAX: u64 = 10_000;
/// Bytes one evaluation of a filter may allocate (`lower`, concatenations, lists).
pub const FILTER_MEMORY_BYTES_MAX: u64 = 256 << 10;
/// Most regex literals in one filter (each compiled once, when the filter is).
pub const FILTER_REGEXES_MAX: usize = 4;
/// Largest compiled regex of a filter, in bytes (and its lazy DFA cache).
pub const FILTER_REGEX_BYTES_MAX: usize = 256 << 10;
/// Deepest nesting of a filter: the core runs on the server's worker threads, below
/// their own frames, so it keeps a margin under the language's default.
pub const FILTER_DEPTH_MAX: usize = 64;

/// The limits every filter is compiled and evaluated under.
pub fn limits() -> Limits {
    Limits {
        source_bytes_max: QUERY_BYTES_MAX,
        depth_max: FILTER_DEPTH_MAX,
        regex_bytes_max: FILTER_REGEX_BYTES_MAX,
        regexes_max: FILTER_REGEXES_MAX,
        steps_max: FILTER_STEPS_MAX,
        memory_bytes_max: FILTER_MEMORY_BYTES_MAX,
        ..Limits::default()
    }
}

/// What a filter selects: ports (LIST_WHERE) or events (WATCH), whose records have
/// `event` as well.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    List,
    Watch,
}

/// The variables of a port record, in slot order.
const FIELDS: [(&str, Type); 8] = [
    ("name", Type::String),
    ("value", Type::Bytes),
    ("text", Type::String),
    ("session", Type::String),
    ("node", Type::String),
    ("token", Type::Int),
    ("json", Type::Dyn),
    ("event", Type::String),
];
const EVENT: usize = 7;

/// The schema filters of `scope` are compiled against (strict: only these names).
pub fn schema(scope: Scope) -> Schema {
    let n = match scope {
        Scope::List => EVENT,
        Scope::Watch => FIELDS.len(),
    };
    let mut s = Schema::new().declared_only();
    for (name, ty) in FIELDS.iter().take(n) {
        s.insert(*name, ty.clone());
    }
    s
}

/// A compiled filter, with the slot of each record field it reads.
#[derive(Debug)]
pub struct Filter {
    program: Program,
    slots: [Option<Slot>; FIELDS.len()],
}

/// A port (or an event about one) as a filter sees it.
#[derive(Debug, Clone, Copy)]
pub struct Record<'a> {
    pub name: &'a [u8],
    pub value: &'a [u8],
    pub session: u64,
    pub node: &'a [u8],
    pub token: u64,
    /// `Some` for events: `"claimed"` or `"released"`.
    pub event: Option<&'static str>,
}

impl Filter {
    /// Compiles `source` for `scope`. The error is the message for a `query_invalid`
    /// reply: what went wrong and where (`line:column`, the line, a caret).
    pub fn compile(source: &[u8], scope: Scope) -> Result<Filter, String> {
        let source = std::str::from_utf8(source)
            .map_err(|e| format!("filter is not UTF-8 (at byte {})", e.valid_up_to()))?;
        let program =
            Program::compile(source, &schema(scope), &limits()).map_err(|e| e.to_string())?;
        match program.result_type() {
            Type::Bool | Type::Dyn => {}
            other => {
                return Err(format!(
                    "1:1: a filter must be a bool expression; this one is {other}"
                ))
            }
        }
        let slots = std::array::from_fn(|i| program.slot(FIELDS[i].0));
        Ok(Filter { program, slots })
    }

    /// The source it was compiled from.
    pub fn source(&self) -> &str {
        self.program.source()
    }

    /// Whether the filter selects `r`. Builds only the variables the filter reads.
    pub fn matches(&self, r: &Record<'_>) -> Result<bool, EvalError> {
        let mut values: [Option<Value>; FIELDS.len()] = Default::default();
        for (i, slot) in self.slots.iter().enumerate() {
            if slot.is_none() {
                continue;
            }
            values[i] = Some(match i {
                0 => Value::from(String::from_utf8_lossy(r.name).as_ref()),
                1 => Value::bytes(r.value),
                2 => Value::from(String::from_utf8_lossy(r.value).as_ref()),
                3 => Value::from(format!("{:016x}", r.session)),
                4 => Value::from(String::from_utf8_lossy(r.node).as_ref()),
                // Tokens are `epoch << 32 | sequence` with epochs far below 2^31.
                5 => Value::Int(r.token as i64),
                6 => json(r.value),
                _ => match r.event {
                    Some(e) => Value::from(e),
                    None => Value::Null,
                },
            });
        }
        let mut b = self.program.bindings();
        for (slot, v) in self.slots.iter().zip(&values) {
            if let (Some(slot), Some(v)) = (slot, v) {
                b.set_slot(*slot, v);
            }
        }
        self.program.eval_bool(&b)
    }
}

/// A value parsed as JSON, as a query value: objects are maps, arrays lists, integers
/// that fit an i64 `int`, other numbers `float`. `null` if it is not JSON (or nests
/// deeper than serde_json's limit of 128). Values are at most `VALUE_BYTES_MAX` bytes,
/// so this is bounded work, done only for filters that read `json`.
fn json(value: &[u8]) -> Value {
    match serde_json::from_slice::<serde_json::Value>(value) {
        Ok(v) => from_json(v),
        Err(_) => Value::Null,
    }
}

fn from_json(v: serde_json::Value) -> Value {
    use serde_json::Value as J;
    match v {
        J::Null => Value::Null,
        J::Bool(b) => Value::Bool(b),
        J::Number(n) => match n.as_i64() {
            Some(i) => Value::Int(i),
            None => Value::Float(n.as_f64().unwrap_or(f64::NAN)),
        },
        J::String(s) => Value::from(s),
        J::Array(items) => Value::from(items.into_iter().map(from_json).collect::<Vec<_>>()),
        J::Object(fields) => {
            let mut m = portswitch_query::Map::with_capacity(fields.len());
            for (k, v) in fields {
                m.insert(k, from_json(v));
            }
            Value::from(m)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use portswitch_query::{CompileErrorKind, Cost, EvalErrorKind};

    fn rec<'a>(name: &'a [u8], value: &'a [u8]) -> Record<'a> {
        Record {
            name,
            value,
            session: 0xab,
            node: b"n1",
            token: (7 << 32) | 3,
            event: None,
        }
    }

    #[test]
    fn every_field_is_bound() {
        let f = Filter::compile(
            br#"name.startsWith("svc/") && value == b"v1" && text == "v1"
               && session == "00000000000000ab" && node == "n1" && token == 30064771075"#,
            Scope::List,
        )
        .unwrap();
        assert!(f.matches(&rec(b"svc/a", b"v1")).unwrap());
        assert!(!f.matches(&rec(b"svc/a", b"v2")).unwrap());
        assert!(!f.matches(&rec(b"other", b"v1")).unwrap());
    }

    #[test]
    fn event_only_for_watches() {
        let e = Filter::compile(br#"event == "claimed""#, Scope::List).unwrap_err();
        assert!(e.contains("1:1") && e.contains("event"), "{e}");
        let f = Filter::compile(br#"event == "claimed""#, Scope::Watch).unwrap();
        let mut r = rec(b"a", b"");
        r.event = Some("claimed");
        assert!(f.matches(&r).unwrap());
        r.event = Some("released");
        assert!(!f.matches(&r).unwrap());
    }

    #[test]
    fn compile_errors_carry_the_position() {
        let e = Filter::compile(b"name == \"a\" && $", Scope::List).unwrap_err();
        assert!(e.starts_with("1:16:"), "{e}");
        assert!(e.contains('^'), "{e}");
        // Misspelt fields are errors (strict schema).
        let e = Filter::compile(b"nmae == \"a\"", Scope::List).unwrap_err();
        assert!(e.contains("nmae"), "{e}");
        // Type errors.
        assert!(Filter::compile(b"token + \"x\" == 1", Scope::List).is_err());
        // Not bool.
        let e = Filter::compile(b"token + 1", Scope::List).unwrap_err();
        assert!(e.contains("bool"), "{e}");
        // Not UTF-8.
        assert!(Filter::compile(b"name == \"\xff\"", Scope::List).is_err());
        // Too long.
        let long = vec![b' '; QUERY_BYTES_MAX + 1];
        assert!(Filter::compile(&long, Scope::List).is_err());
    }

    #[test]
    fn hostile_filters_are_refused_or_stopped() {
        // A comprehension over literal lists is costed before it runs: refused.
        let src = "[1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20]\
            .all(a, [1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20]\
            .all(b, [1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20]\
            .all(c, a + b + c > 0)))";
        let e = Program::compile(src, &schema(Scope::List), &limits()).unwrap_err();
        assert!(
            matches!(e.kind(), CompileErrorKind::CostTooHigh { .. }),
            "{e}"
        );
        // One over bound data runs out of steps on a large value: an evaluation error.
        assert!(Filter::compile(br#"text.split_is_not_a_function == 1"#, Scope::List).is_err());
        let f = Filter::compile(
            br#"[text, text, text, text, text, text, text, text].exists(a,
                [text, text, text, text, text, text, text, text].exists(b,
                [text, text, text, text, text, text, text, text].exists(c,
                (a + b + c).contains("needle"))))"#,
            Scope::List,
        )
        .unwrap();
        let big = vec![b'x'; 4_096];
        let e = f.matches(&rec(b"a", &big)).unwrap_err();
        assert!(
            matches!(
                e.kind(),
                EvalErrorKind::CostExceeded(Cost::Steps | Cost::Memory)
            ),
            "{e}"
        );
        // The same filter on a small value is fine.
        assert!(!f.matches(&rec(b"a", b"x")).unwrap());
        // Too deep.
        let deep = format!("{}true{}", "(".repeat(100), ")".repeat(100));
        assert!(Filter::compile(deep.as_bytes(), Scope::List).is_err());
    }

    #[test]
    fn json_values_are_records() {
        let f = Filter::compile(
            br#"json != null && json.role == "leader" && json.weight >= 2 && "eu" in json.zones"#,
            Scope::List,
        )
        .unwrap();
        let yes = br#"{"role":"leader","weight":2.5,"zones":["us","eu"]}"#;
        assert!(f.matches(&rec(b"a", yes)).unwrap());
        let no = br#"{"role":"follower","weight":3,"zones":["eu"]}"#;
        assert!(!f.matches(&rec(b"a", no)).unwrap());
        // Not JSON: null, so the guard keeps it an ordinary non-match.
        assert!(!f.matches(&rec(b"a", b"10.0.0.1:80")).unwrap());
        // Without the guard a field of null is an evaluation error (skipped, counted).
        let g = Filter::compile(br#"json.role == "leader""#, Scope::List).unwrap();
        assert!(g.matches(&rec(b"a", b"not json")).is_err());
        // Deeper than serde_json goes: null, not a crash.
        let deep = format!("{}{}", "[".repeat(200), "]".repeat(200));
        assert!(!f.matches(&rec(b"a", deep.as_bytes())).unwrap());
    }

    #[test]
    fn not_utf8_reads_as_replacement() {
        let f = Filter::compile("text == \"a\u{fffd}\"".as_bytes(), Scope::List).unwrap();
        assert!(f.matches(&rec(b"n", b"a\xff")).unwrap());
        let f = Filter::compile(b"size(value) == 2", Scope::List).unwrap();
        assert!(f.matches(&rec(b"n", b"a\xff")).unwrap());
    }
}
