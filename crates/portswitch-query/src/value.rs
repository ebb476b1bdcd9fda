//! Values: what bindings hold and what evaluation returns.
//!
//! Strings, bytes, lists and maps are reference counted, so binding a large record or
//! returning a field of it never copies it. Maps are built for the evaluator's common
//! case, looking up a key that was known when the query was compiled: a [`Key`] carries
//! its hash, computed once, so a lookup hashes nothing.
//!
//! # Semantics
//!
//! * **Equality** (`==`, [`PartialEq`]): `Int` and `Float` compare numerically and exactly
//!   (`1 == 1.0`; `9007199254740993 != 9007199254740992.0`); `NaN` equals nothing, itself
//!   included. Lists are equal element by element, maps when they have the same keys with
//!   equal values (order ignored). Values of different kinds are unequal, never an error:
//!   there is no implicit conversion between strings and numbers (`"1" != 1`).
//! * **Ordering** (`<` …, [`Value::compare`]): numbers (Int and Float mixed, exactly),
//!   strings (by code point, which is byte order of UTF-8), bytes, booleans
//!   (`false < true`), times, durations. Anything else, or two different kinds, has no
//!   order: the checker rejects it, and the evaluator reports a type mismatch on `dyn`
//!   values. Comparisons with `NaN` are false.
//! * **Times** are nanoseconds since the Unix epoch, UTC (years 1678..2262);
//!   **durations** are signed nanoseconds.
//!
//! Equality and [`Display`](std::fmt::Display) recurse into nested values. The evaluator's
//! own comparison is bounded ([`crate::limits::VALUE_DEPTH_MAX`]); callers building values
//! from untrusted documents should bound their depth when decoding, as every decoder of
//! recursive data must (a value nested a million deep cannot even be dropped safely).

use std::cmp::Ordering;
use std::fmt::{self, Write as _};
use std::hash::BuildHasher;
use std::sync::{Arc, OnceLock};

use foldhash::fast::SeedableRandomState;
use hashbrown::HashTable;

/// A value.
#[derive(Clone, Debug)]
pub enum Value {
    /// `null`.
    Null,
    /// `true` or `false`.
    Bool(bool),
    /// A signed 64-bit integer. Arithmetic on it is checked: overflow is an error.
    Int(i64),
    /// A 64-bit float (IEEE 754 semantics: `1.0 / 0.0` is infinity).
    Float(f64),
    /// A UTF-8 string.
    String(Arc<str>),
    /// A byte string.
    Bytes(Arc<[u8]>),
    /// A point in time: nanoseconds since 1970-01-01T00:00:00Z.
    Time(i64),
    /// A signed span of time in nanoseconds.
    Duration(i64),
    /// A list.
    List(Arc<[Value]>),
    /// A map from string keys to values (records are maps).
    Map(Arc<Map>),
}

impl Value {
    /// The name of this value's kind, as the type checker spells it.
    pub fn kind_name(&self) -> &'static str {
        match self {
            Value::Null => "null",
            Value::Bool(_) => "bool",
            Value::Int(_) => "int",
            Value::Float(_) => "float",
            Value::String(_) => "string",
            Value::Bytes(_) => "bytes",
            Value::Time(_) => "timestamp",
            Value::Duration(_) => "duration",
            Value::List(_) => "list",
            Value::Map(_) => "map",
        }
    }

    /// A string value.
    pub fn string(s: impl Into<Arc<str>>) -> Value {
        Value::String(s.into())
    }

    /// A bytes value.
    pub fn bytes(b: impl Into<Arc<[u8]>>) -> Value {
        Value::Bytes(b.into())
    }

    /// A list of anything convertible to values.
    pub fn list<T: Into<Value>>(items: impl IntoIterator<Item = T>) -> Value {
        Value::List(items.into_iter().map(Into::into).collect())
    }

    /// A map (a record) from `(key, value)` pairs; a repeated key keeps the last value.
    pub fn map<K: Into<Arc<str>>, V: Into<Value>>(
        entries: impl IntoIterator<Item = (K, V)>,
    ) -> Value {
        Value::Map(Arc::new(entries.into_iter().collect()))
    }

    /// A time parsed from RFC 3339 (`2024-05-01T12:00:00Z`), or `None` if malformed or
    /// outside the representable years.
    pub fn timestamp(rfc3339: &str) -> Option<Value> {
        crate::time::parse_rfc3339(rfc3339).map(Value::Time)
    }

    /// A duration parsed from Go syntax (`1h30m`, `1.5s`, `-250ms`), or `None`.
    pub fn duration(text: &str) -> Option<Value> {
        crate::time::parse_duration(text).map(Value::Duration)
    }

    /// The bool, if this is one.
    pub fn as_bool(&self) -> Option<bool> {
        match self {
            Value::Bool(b) => Some(*b),
            _ => None,
        }
    }

    /// The integer, if this is one.
    pub fn as_int(&self) -> Option<i64> {
        match self {
            Value::Int(i) => Some(*i),
            _ => None,
        }
    }

    /// The string, if this is one.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::String(s) => Some(s),
            _ => None,
        }
    }

    /// The list's elements, if this is a list.
    pub fn as_list(&self) -> Option<&[Value]> {
        match self {
            Value::List(l) => Some(l),
            _ => None,
        }
    }

    /// The map, if this is one.
    pub fn as_map(&self) -> Option<&Map> {
        match self {
            Value::Map(m) => Some(m),
            _ => None,
        }
    }

    /// The order of two values, if they have one (see the module docs).
    pub fn compare(&self, other: &Value) -> Option<Ordering> {
        use Value::*;
        match (self, other) {
            (Int(a), Int(b)) => Some(a.cmp(b)),
            (Float(a), Float(b)) => a.partial_cmp(b),
            (Int(a), Float(b)) => cmp_int_float(*a, *b),
            (Float(a), Int(b)) => cmp_int_float(*b, *a).map(Ordering::reverse),
            (String(a), String(b)) => Some(a.cmp(b)),
            (Bytes(a), Bytes(b)) => Some(a.cmp(b)),
            (Bool(a), Bool(b)) => Some(a.cmp(b)),
            (Time(a), Time(b)) | (Duration(a), Duration(b)) => Some(a.cmp(b)),
            _ => None,
        }
    }
}

/// Compares an integer with a float exactly: converting the integer to `f64` would round
/// above 2^53 and make distinct numbers equal.
pub(crate) fn cmp_int_float(i: i64, f: f64) -> Option<Ordering> {
    if f.is_nan() {
        return None;
    }
    // 2^63 is exactly representable; every i64 is below it and at or above -2^63.
    const TWO_63: f64 = 9_223_372_036_854_775_808.0;
    if f >= TWO_63 {
        return Some(Ordering::Less);
    }
    if f < -TWO_63 {
        return Some(Ordering::Greater);
    }
    // Now f's integral part fits in an i64 exactly.
    let whole = f.trunc();
    match i.cmp(&(whole as i64)) {
        Ordering::Equal => 0.0.partial_cmp(&(f - whole)),
        unequal => Some(unequal),
    }
}

impl PartialEq for Value {
    fn eq(&self, other: &Value) -> bool {
        use Value::*;
        match (self, other) {
            (Null, Null) => true,
            (List(a), List(b)) => a.len() == b.len() && a.iter().zip(b.iter()).all(|(x, y)| x == y),
            (Map(a), Map(b)) => a == b,
            _ => self.compare(other) == Some(Ordering::Equal),
        }
    }
}

impl PartialOrd for Value {
    fn partial_cmp(&self, other: &Value) -> Option<Ordering> {
        self.compare(other)
    }
}

impl From<bool> for Value {
    fn from(b: bool) -> Value {
        Value::Bool(b)
    }
}

impl From<i64> for Value {
    fn from(i: i64) -> Value {
        Value::Int(i)
    }
}

impl From<i32> for Value {
    fn from(i: i32) -> Value {
        Value::Int(i.into())
    }
}

impl From<u32> for Value {
    fn from(i: u32) -> Value {
        Value::Int(i.into())
    }
}

impl From<f64> for Value {
    fn from(f: f64) -> Value {
        Value::Float(f)
    }
}

impl From<&str> for Value {
    fn from(s: &str) -> Value {
        Value::String(s.into())
    }
}

impl From<String> for Value {
    fn from(s: String) -> Value {
        Value::String(s.into())
    }
}

impl From<Arc<str>> for Value {
    fn from(s: Arc<str>) -> Value {
        Value::String(s)
    }
}

impl From<&[u8]> for Value {
    fn from(b: &[u8]) -> Value {
        Value::Bytes(b.into())
    }
}

impl From<Vec<Value>> for Value {
    fn from(items: Vec<Value>) -> Value {
        Value::List(items.into())
    }
}

impl From<Map> for Value {
    fn from(m: Map) -> Value {
        Value::Map(Arc::new(m))
    }
}

impl<T: Into<Value>> From<Option<T>> for Value {
    fn from(v: Option<T>) -> Value {
        v.map_or(Value::Null, Into::into)
    }
}

/// The hasher of every map key and every compiled field access. One random seed per
/// process: a compiled program and the maps it reads must agree on hashes, and a seed the
/// client cannot know keeps it from choosing keys that all collide.
fn hash_state() -> &'static SeedableRandomState {
    static STATE: OnceLock<SeedableRandomState> = OnceLock::new();
    STATE.get_or_init(SeedableRandomState::random)
}

pub(crate) fn hash_str(s: &str) -> u64 {
    hash_state().hash_one(s)
}

/// A map key with its hash computed once. The compiler turns every field access with a
/// constant name (`a.b`, `a["b"]`) into a `Key`, so evaluation looks it up without hashing.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Key {
    hash: u64,
    name: Arc<str>,
}

impl Key {
    /// The key `name`, hashed.
    pub fn new(name: impl Into<Arc<str>>) -> Key {
        let name = name.into();
        Key {
            hash: hash_str(&name),
            name,
        }
    }

    /// The key's text.
    pub fn name(&self) -> &str {
        &self.name
    }
}

/// String equality tuned for the short keys and literals of queries: the standard
/// comparison calls `memcmp`, whose call overhead is most of the cost at these lengths.
#[inline]
pub(crate) fn short_str_eq(a: &str, b: &str) -> bool {
    let (a, b) = (a.as_bytes(), b.as_bytes());
    if a.len() != b.len() {
        return false;
    }
    let word = |s: &[u8], at: usize| -> u64 {
        let mut w = [0u8; 8];
        w.copy_from_slice(&s[at..at + 8]);
        u64::from_le_bytes(w)
    };
    let half = |s: &[u8], at: usize| -> u32 {
        let mut w = [0u8; 4];
        w.copy_from_slice(&s[at..at + 4]);
        u32::from_le_bytes(w)
    };
    let n = a.len();
    match n {
        0 => true,
        1..=3 => a[0] == b[0] && a[n / 2] == b[n / 2] && a[n - 1] == b[n - 1],
        4..=7 => half(a, 0) == half(b, 0) && half(a, n - 4) == half(b, n - 4),
        8..=16 => word(a, 0) == word(b, 0) && word(a, n - 8) == word(b, n - 8),
        _ => a == b,
    }
}

/// Maps of at most this many entries are searched linearly, comparing the stored hashes
/// (dense, 8 bytes per entry); larger ones get a hash index. Records, the common case,
/// are small. Measured with `examples/map_lookup.rs` (release, 2-core VM, ns per
/// prehashed lookup of each key in turn, linear / indexed): 1 entry 2.9 / 5.0, 4: 3.2 /
/// 5.1, 8: 3.9 / 4.6, 12: 4.8 / 4.9, 16: 6.4 / 4.9, 64: 18.0 / 4.9. A lookup that hashes
/// its key first costs about 7.5 at any size, `std::collections::HashMap` with foldhash
/// about 6.5: prehashing saves roughly half of a small record's lookup.
const LINEAR_ENTRIES_MAX: usize = 12;

/// A map from string keys to values, in insertion order.
#[derive(Clone, Default)]
pub struct Map {
    /// `hashes[i]` is the hash of `entries[i].0`; kept apart so that a linear search reads
    /// one dense array.
    hashes: Vec<u64>,
    entries: Vec<(Arc<str>, Value)>,
    /// Indices into `entries`, present when there are more than `LINEAR_ENTRIES_MAX`.
    index: Option<HashTable<usize>>,
}

impl Map {
    /// An empty map.
    pub fn new() -> Map {
        Map::default()
    }

    /// An empty map with room for `n` entries.
    pub fn with_capacity(n: usize) -> Map {
        Map {
            hashes: Vec::with_capacity(n),
            entries: Vec::with_capacity(n),
            index: None,
        }
    }

    /// Number of entries.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether there are no entries.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Gives back spare capacity: for maps built once and kept (decoded records), where
    /// a 1-entry map would otherwise keep room for four.
    pub fn shrink_to_fit(&mut self) {
        self.hashes.shrink_to_fit();
        self.entries.shrink_to_fit();
    }

    /// Sets `key` to `value`, returning the previous value if the key was present (it
    /// keeps its place in the order).
    pub fn insert(&mut self, key: impl Into<Arc<str>>, value: impl Into<Value>) -> Option<Value> {
        let key = key.into();
        let hash = hash_str(&key);
        let value = value.into();
        if let Some(i) = self.position(hash, &key) {
            return self
                .entries
                .get_mut(i)
                .map(|slot| std::mem::replace(&mut slot.1, value));
        }
        self.hashes.push(hash);
        self.entries.push((key, value));
        let Map {
            hashes,
            entries,
            index,
        } = self;
        let len = entries.len();
        if len > LINEAR_ENTRIES_MAX {
            let table = index.get_or_insert_with(|| {
                let mut t = HashTable::with_capacity(len);
                for (i, h) in hashes[..len - 1].iter().enumerate() {
                    t.insert_unique(*h, i, |&j| hashes[j]);
                }
                t
            });
            table.insert_unique(hash, len - 1, |&j| hashes[j]);
        }
        None
    }

    fn position(&self, hash: u64, key: &str) -> Option<usize> {
        match &self.index {
            None => self
                .hashes
                .iter()
                .zip(&self.entries)
                .position(|(h, (k, _))| *h == hash && **k == *key),
            Some(table) => table
                .find(hash, |&i| self.entries.get(i).is_some_and(|e| *e.0 == *key))
                .copied(),
        }
    }

    /// The value of a prehashed key. This is the evaluator's lookup: it hashes nothing.
    #[inline(always)]
    pub fn get_key(&self, key: &Key) -> Option<&Value> {
        match &self.index {
            None => {
                for (h, (k, v)) in self.hashes.iter().zip(&self.entries) {
                    if *h == key.hash && short_str_eq(k, &key.name) {
                        return Some(v);
                    }
                }
                None
            }
            Some(table) => self.get_indexed(table, key),
        }
    }

    #[inline(never)]
    fn get_indexed(&self, table: &HashTable<usize>, key: &Key) -> Option<&Value> {
        let i = *table.find(key.hash, |&i| {
            self.entries
                .get(i)
                .is_some_and(|e| short_str_eq(&e.0, &key.name))
        })?;
        self.entries.get(i).map(|e| &e.1)
    }

    /// Sets the lookup layout regardless of size: `true` builds the hash index, `false`
    /// drops it (linear search). Only for `examples/map_lookup.rs`, which measures the two
    /// layouts at the same size to choose `LINEAR_ENTRIES_MAX`; lookups are correct either
    /// way, and the next insert past the threshold rebuilds the index.
    #[doc(hidden)]
    pub fn set_indexed_for_measurement(&mut self, indexed: bool) {
        if !indexed {
            self.index = None;
            return;
        }
        let hashes = &self.hashes;
        let mut table = HashTable::with_capacity(hashes.len());
        for (i, h) in hashes.iter().enumerate() {
            table.insert_unique(*h, i, |&j| hashes[j]);
        }
        self.index = Some(table);
    }

    /// The value of `key` (hashes it first).
    pub fn get(&self, key: &str) -> Option<&Value> {
        let i = self.position(hash_str(key), key)?;
        self.entries.get(i).map(|e| &e.1)
    }

    /// Whether `key` is present.
    pub fn contains_key(&self, key: &str) -> bool {
        self.get(key).is_some()
    }

    /// Entries in insertion order.
    pub fn iter(&self) -> impl ExactSizeIterator<Item = (&Arc<str>, &Value)> + '_ {
        self.entries.iter().map(|(k, v)| (k, v))
    }

    /// The entries, for loops over the keys.
    pub(crate) fn entries(&self) -> &[(Arc<str>, Value)] {
        &self.entries
    }

    /// Keys in insertion order.
    pub fn keys(&self) -> impl ExactSizeIterator<Item = &Arc<str>> + '_ {
        self.entries.iter().map(|(k, _)| k)
    }
}

impl<K: Into<Arc<str>>, V: Into<Value>> FromIterator<(K, V)> for Map {
    fn from_iter<I: IntoIterator<Item = (K, V)>>(iter: I) -> Map {
        let iter = iter.into_iter();
        let mut m = Map::with_capacity(iter.size_hint().0);
        for (k, v) in iter {
            m.insert(k, v);
        }
        m
    }
}

impl PartialEq for Map {
    fn eq(&self, other: &Map) -> bool {
        self.len() == other.len()
            && self.hashes.iter().zip(&self.entries).all(|(h, (k, v))| {
                other
                    .position(*h, k)
                    .and_then(|i| other.entries.get(i))
                    .is_some_and(|e| e.1 == *v)
            })
    }
}

impl fmt::Debug for Map {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_map().entries(self.iter()).finish()
    }
}

/// Writes `s` as a double-quoted literal that the lexer reads back to the same string.
pub(crate) fn write_quoted_str(out: &mut impl fmt::Write, s: &str) -> fmt::Result {
    out.write_char('"')?;
    for c in s.chars() {
        match c {
            '"' => out.write_str("\\\"")?,
            '\\' => out.write_str("\\\\")?,
            '\n' => out.write_str("\\n")?,
            '\r' => out.write_str("\\r")?,
            '\t' => out.write_str("\\t")?,
            c if c.is_control() => write!(out, "\\u{:04x}", u32::from(c))?,
            c => out.write_char(c)?,
        }
    }
    out.write_char('"')
}

/// Writes `b` as a bytes literal (`b"..."`) that the lexer reads back to the same bytes.
pub(crate) fn write_quoted_bytes(out: &mut impl fmt::Write, b: &[u8]) -> fmt::Result {
    out.write_str("b\"")?;
    for &byte in b {
        match byte {
            b'"' => out.write_str("\\\"")?,
            b'\\' => out.write_str("\\\\")?,
            0x20..=0x7e => out.write_char(char::from(byte))?,
            _ => write!(out, "\\x{byte:02x}")?,
        }
    }
    out.write_char('"')
}

/// Values print in the query language's literal syntax (times and durations as the
/// conversions that make them).
impl fmt::Display for Value {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Value::Null => f.write_str("null"),
            Value::Bool(b) => write!(f, "{b}"),
            Value::Int(i) => write!(f, "{i}"),
            Value::Float(x) => write!(f, "{x:?}"),
            Value::String(s) => write_quoted_str(f, s),
            Value::Bytes(b) => write_quoted_bytes(f, b),
            Value::Time(t) => write!(f, "timestamp(\"{}\")", crate::time::format_rfc3339(*t)),
            Value::Duration(d) => write!(f, "duration(\"{}\")", crate::time::format_duration(*d)),
            Value::List(items) => {
                f.write_char('[')?;
                for (i, v) in items.iter().enumerate() {
                    if i > 0 {
                        f.write_str(", ")?;
                    }
                    write!(f, "{v}")?;
                }
                f.write_char(']')
            }
            Value::Map(m) => {
                f.write_char('{')?;
                for (i, (k, v)) in m.iter().enumerate() {
                    if i > 0 {
                        f.write_str(", ")?;
                    }
                    write_quoted_str(f, k)?;
                    write!(f, ": {v}")?;
                }
                f.write_char('}')
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn int_float_compare_exactly() {
        assert_eq!(Value::Int(1), Value::Float(1.0));
        assert!(Value::Int(1) < Value::Float(1.5));
        assert!(Value::Int(-1) > Value::Float(-1.5));
        // 2^53 + 1 is not representable as f64: a lossy conversion would call these equal.
        assert_ne!(
            Value::Int(9_007_199_254_740_993),
            Value::Float(9_007_199_254_740_992.0)
        );
        assert!(Value::Int(i64::MAX) < Value::Float(9.3e18));
        assert!(Value::Int(i64::MIN) > Value::Float(-9.3e18));
        assert_eq!(
            Value::Int(i64::MIN),
            Value::Float(-9_223_372_036_854_775_808.0)
        );
        assert_ne!(Value::Float(f64::NAN), Value::Float(f64::NAN));
        assert_eq!(Value::Int(0).compare(&Value::Float(f64::NAN)), None);
    }

    #[test]
    fn no_implicit_string_number_conversion() {
        assert_ne!(Value::from("1"), Value::Int(1));
        assert_eq!(Value::from("1").compare(&Value::Int(1)), None);
    }

    #[test]
    fn maps_compare_by_content_not_order() {
        let a = Value::map([("x", 1), ("y", 2)]);
        let b = Value::map([("y", 2), ("x", 1)]);
        assert_eq!(a, b);
        assert_ne!(a, Value::map([("x", 1)]));
    }

    #[test]
    fn lookups_agree_across_the_linear_and_indexed_layouts() {
        for n in [0usize, 1, 7, 12, 13, 40] {
            let m: Map = (0..n).map(|i| (format!("k{i}"), i as i64)).collect();
            for i in 0..n {
                let want = Some(&Value::Int(i as i64));
                assert_eq!(m.get(&format!("k{i}")), want);
                assert_eq!(m.get_key(&Key::new(format!("k{i}"))), want);
            }
            assert_eq!(m.get("missing"), None);
            assert_eq!(m.get_key(&Key::new("missing")), None);
        }
    }

    #[test]
    fn short_str_eq_agrees_with_eq() {
        let words = [
            "",
            "a",
            "b",
            "ab",
            "ba",
            "abc",
            "abd",
            "xbc",
            "abcd",
            "abce",
            "abcdefg",
            "abcdefh",
            "bbcdefg",
            "abcdefgh",
            "abcdefgi",
            "abcdefghijklmnop",
            "abcdefghijklmnoq",
            "bbcdefghijklmnop",
            "abcdefghXjklmnop",
            "abcdefghijklmnopq",
            "abcdefghijklmnopr",
            "äöü",
            "äöv",
        ];
        for a in words {
            for b in words {
                assert_eq!(short_str_eq(a, b), a == b, "{a:?} {b:?}");
            }
        }
    }

    #[test]
    fn insert_replaces_in_place() {
        let mut m: Map = (0..20).map(|i| (format!("k{i}"), i)).collect();
        assert_eq!(m.insert("k3", 99), Some(Value::Int(3)));
        assert_eq!(m.len(), 20);
        assert_eq!(m.get("k3"), Some(&Value::Int(99)));
        assert_eq!(m.keys().nth(3).map(|k| &**k), Some("k3"));
    }

    #[test]
    fn display_is_literal_syntax() {
        let v = Value::map([
            ("s", Value::from("a\"b\n")),
            ("l", Value::list([1, 2])),
            ("b", Value::bytes(&b"\x00a"[..])),
        ]);
        assert_eq!(
            v.to_string(),
            r#"{"s": "a\"b\n", "l": [1, 2], "b": b"\x00a"}"#
        );
    }
}
