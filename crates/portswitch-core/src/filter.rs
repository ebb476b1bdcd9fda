//! Filters: `portswitch-query` expressions over port records, for LIST_WHERE and
//! prefix WATCHes with the WHERE flag.
//!
//! A filter is compiled once — per LIST_WHERE request, or per watch registration,
//! and kept a while in a small [`FilterCache`] by its source — against a fixed, strict schema (a misspelt field is a compile error) and under
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
//! | `json` | dyn | the value parsed as JSON (`null` if it is not JSON, or longer than [`FILTER_JSON_BYTES_MAX`]) |
//! | `event` | string | WATCH only: `"claimed"` or `"released"` |
//!
//! For a RELEASED event the record is the port as it was just before the release (its
//! last owner, value and token). Only the variables a filter reads are built for each
//! record, so `name.startsWith("a")` costs one string per record and nothing for the
//! value; the filters of one event share what they build ([`Derived`]), so `json` is
//! parsed at most once per event, and only for values of at most
//! [`FILTER_JSON_BYTES_MAX`] bytes.

use std::sync::Arc;

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
        self.matches_derived(&mut Derived::new(*r))
    }

    /// Whether the filter selects `d`'s record, building into `d` the variables it
    /// reads that no earlier filter on the same record has built: the filters of one
    /// event share one `text`, one `session` and one parse of `json`.
    pub fn matches_derived(&self, d: &mut Derived<'_>) -> Result<bool, EvalError> {
        for (i, slot) in self.slots.iter().enumerate() {
            if slot.is_some() {
                d.build(i);
            }
        }
        let mut b = self.program.bindings();
        for (slot, v) in self.slots.iter().zip(&d.values) {
            if let (Some(slot), Some(v)) = (slot, v) {
                b.set_slot(*slot, v);
            }
        }
        self.program.eval_bool(&b)
    }
}

/// A record and the variables built from it so far, shared by every filter that is
/// evaluated on it: each variable is built at most once per record, and only if some
/// filter reads it.
#[derive(Debug)]
pub struct Derived<'a> {
    record: Record<'a>,
    values: [Option<Value>; FIELDS.len()],
}

impl<'a> Derived<'a> {
    pub fn new(record: Record<'a>) -> Derived<'a> {
        Derived {
            record,
            values: Default::default(),
        }
    }

    fn build(&mut self, i: usize) {
        if self.values[i].is_some() {
            return;
        }
        let r = &self.record;
        self.values[i] = Some(match i {
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
}

/// Compiled filters a core keeps, by source text and scope.
pub const FILTER_CACHE_ENTRIES: usize = 16;

/// The last [`FILTER_CACHE_ENTRIES`] filters compiled (and the messages of those that
/// did not compile), least recently used first: a frame of identical LIST_WHEREs, or
/// a client paging through one listing, compiles its filter once.
#[derive(Debug, Default)]
pub struct FilterCache {
    entries: Vec<Cached>,
}

type Compiled = Result<Arc<Filter>, Arc<str>>;

#[derive(Debug)]
struct Cached {
    scope: Scope,
    source: Box<[u8]>,
    compiled: Compiled,
}

impl FilterCache {
    /// `source` compiled for `scope`: from the cache, or compiled now and kept (the
    /// least recently used entry goes when the cache is full).
    pub fn compile(&mut self, source: &[u8], scope: Scope) -> Compiled {
        if let Some(i) = self
            .entries
            .iter()
            .position(|c| c.scope == scope && *c.source == *source)
        {
            let hit = self.entries.remove(i);
            let compiled = hit.compiled.clone();
            self.entries.push(hit);
            return compiled;
        }
        let compiled: Compiled = Filter::compile(source, scope)
            .map(Arc::new)
            .map_err(Arc::from);
        if self.entries.len() >= FILTER_CACHE_ENTRIES {
            self.entries.remove(0);
        }
        self.entries.push(Cached {
            scope,
            source: source.into(),
            compiled: compiled.clone(),
        });
        compiled
    }

    /// How many filters it holds.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

/// Longest value a filter's `json` parses: a longer one reads as `null`. Parsing and
/// converting a value is not metered by the step budget, so this bounds it.
pub const FILTER_JSON_BYTES_MAX: usize = 4_096;

/// A value parsed as JSON, as a query value: objects are maps, arrays lists, integers
/// that fit an i64 `int`, other numbers `float`. `null` if it is not JSON (or nests
/// deeper than serde_json's limit of 128), or is longer than [`FILTER_JSON_BYTES_MAX`]
/// bytes, so this is bounded work, done at most once per record and only if some
/// filter reads `json`.
fn json(value: &[u8]) -> Value {
    if value.len() > FILTER_JSON_BYTES_MAX {
        return Value::Null;
    }
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
        // Longer than FILTER_JSON_BYTES_MAX: null, not parsed.
        let n = Filter::compile(b"json == null", Scope::List).unwrap();
        let mut long = br#"{"role":"leader","pad":""#.to_vec();
        long.resize(FILTER_JSON_BYTES_MAX - 2, b'x');
        long.extend_from_slice(b"\"}");
        assert_eq!(long.len(), FILTER_JSON_BYTES_MAX);
        assert!(!n.matches(&rec(b"a", &long)).unwrap());
        long.insert(1, b' ');
        assert!(n.matches(&rec(b"a", &long)).unwrap());
    }

    #[test]
    fn the_cache_compiles_a_source_once_and_keeps_the_latest() {
        let mut c = FilterCache::default();
        let a = c.compile(b"true", Scope::List).unwrap();
        let again = c.compile(b"true", Scope::List).unwrap();
        assert!(Arc::ptr_eq(&a, &again));
        // Another scope is another filter; errors are kept too.
        let w = c.compile(b"true", Scope::Watch).unwrap();
        assert!(!Arc::ptr_eq(&a, &w));
        let e = c.compile(b"(((", Scope::List).unwrap_err();
        assert_eq!(e, c.compile(b"(((", Scope::List).unwrap_err());
        assert_eq!(c.len(), 3);
        // Use "true" (List) again, then fill the cache: the two least recently used
        // entries go.
        c.compile(b"true", Scope::List).unwrap();
        for i in 0..FILTER_CACHE_ENTRIES - 1 {
            c.compile(format!("token > {i}").as_bytes(), Scope::List)
                .unwrap();
        }
        assert_eq!(c.len(), FILTER_CACHE_ENTRIES);
        // "true" (List) was the most recently used of the first three: still there.
        assert!(Arc::ptr_eq(&a, &c.compile(b"true", Scope::List).unwrap()));
        // "true" (Watch) was the least recent: compiled again.
        assert!(!Arc::ptr_eq(&w, &c.compile(b"true", Scope::Watch).unwrap()));
    }

    #[test]
    fn filters_of_one_record_share_what_they_build() {
        let a = Filter::compile(br#"json != null && json.zone == "eu""#, Scope::Watch).unwrap();
        let b = Filter::compile(
            br#"text.contains("eu") && event == "claimed""#,
            Scope::Watch,
        )
        .unwrap();
        let mut r = rec(b"a", br#"{"zone":"eu"}"#);
        r.event = Some("claimed");
        let mut d = Derived::new(r);
        assert!(a.matches_derived(&mut d).unwrap());
        assert!(d.values[6].is_some() && d.values[2].is_none());
        assert!(b.matches_derived(&mut d).unwrap());
        assert!(d.values[2].is_some() && d.values[1].is_none() && d.values[3].is_none());
    }

    #[test]
    fn not_utf8_reads_as_replacement() {
        let f = Filter::compile("text == \"a\u{fffd}\"".as_bytes(), Scope::List).unwrap();
        assert!(f.matches(&rec(b"n", b"a\xff")).unwrap());
        let f = Filter::compile(b"size(value) == 2", Scope::List).unwrap();
        assert!(f.matches(&rec(b"n", b"a\xff")).unwrap());
    }
}
