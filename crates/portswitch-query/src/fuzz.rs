//! Entry points for fuzzers. A cargo-fuzz target is one line:
//!
//! ```text
//! fuzz_target!(|data: &[u8]| portswitch_query::fuzz_parse(data));
//! ```
//!
//! Both functions return normally on every input the library handles correctly; they
//! panic only when an invariant is broken, which is what a fuzzer looks for.

use crate::limits::{Limits, DEPTH_CEILING};
use crate::parser::parse;
use crate::program::Program;
use crate::types::{Schema, Type};
use crate::value::{Map, Value};

/// Parses `data` as a query. If it parses, prints the tree back to source, parses that,
/// and asserts the same tree comes back; then type-checks and compiles it.
pub fn fuzz_parse(data: &[u8]) {
    let Ok(source) = std::str::from_utf8(data) else {
        return;
    };
    let limits = Limits::default();
    let Ok(expr) = parse(source, &limits) else {
        return;
    };
    let printed = expr.to_string();
    // The printed form is fully parenthesised, so it may be longer and nest a little
    // deeper than the original; the tree is the same size.
    let relaxed = Limits {
        source_bytes_max: usize::MAX,
        depth_max: DEPTH_CEILING,
        ..Limits::default()
    };
    match parse(&printed, &relaxed) {
        Ok(again) => assert_eq!(
            again.without_spans(),
            expr.without_spans(),
            "round trip changed the tree: {source:?} printed as {printed:?}"
        ),
        Err(e) => panic!("printed form of {source:?} does not parse: {printed:?}: {e}"),
    }
    let _ = Program::compile(source, &Schema::new(), &limits);
    let _ = Program::compile(source, &fuzz_schema(), &limits);
}

/// Compiles the query before the first 0 byte of `data` against a small schema, binds
/// values derived from the bytes after it (sometimes of the wrong type on purpose, to
/// exercise run-time type errors), and evaluates with small budgets.
pub fn fuzz_eval(data: &[u8]) {
    let split = data.iter().position(|&b| b == 0).unwrap_or(data.len());
    let (query, seed) = data.split_at(split);
    let Ok(source) = std::str::from_utf8(query) else {
        return;
    };
    let limits = Limits {
        steps_max: 50_000,
        memory_bytes_max: 1 << 20,
        ..Limits::default()
    };
    let schema = if seed.first().is_some_and(|b| b & 1 == 1) {
        Schema::new()
    } else {
        fuzz_schema()
    };
    let Ok(program) = Program::compile(source, &schema, &limits) else {
        return;
    };
    let values = fuzz_values(seed);
    let mut bindings = program.bindings();
    for (name, value) in &values {
        bindings.set(name, value);
    }
    let _ = program.eval(&bindings);
    let _ = program.eval_bool(&bindings);
}

/// The schema `fuzz_eval` compiles against; `d` is left `dyn`.
pub fn fuzz_schema() -> Schema {
    Schema::new()
        .with("i", Type::Int)
        .with("f", Type::Float)
        .with("s", Type::String)
        .with("b", Type::Bool)
        .with("l", Type::list(Type::Int))
        .with("m", Type::map(Type::String))
        .with(
            "r",
            Type::record([
                ("n", Type::Int),
                ("s", Type::String),
                ("l", Type::list(Type::String)),
            ]),
        )
}

/// Deterministic values for the fuzz schema's variables, chosen by `seed`.
pub fn fuzz_values(seed: &[u8]) -> Vec<(&'static str, Value)> {
    let byte = |i: usize| seed.get(i).copied().unwrap_or(0);
    let int = i64::from(byte(1) as i8)
        .wrapping_mul(i64::from(byte(2)).wrapping_pow(u32::from(byte(3) % 9)));
    let text: String = seed
        .iter()
        .skip(4)
        .take(16)
        .map(|&b| char::from(b'a' + b % 26))
        .collect();
    let list = Value::list(seed.iter().take(8).map(|&b| i64::from(b)));
    let map: Map = seed
        .iter()
        .take(4)
        .enumerate()
        .map(|(i, &b)| (format!("k{i}"), Value::from(format!("{b}"))))
        .collect();
    let record = Value::map([
        ("n", Value::Int(int)),
        ("s", Value::from(text.as_str())),
        ("l", Value::list(["x", "y"])),
    ]);
    // With the wrong-types bit set, every variable gets a value of another kind.
    let wrong = byte(0) & 2 == 2;
    let pick = |right: Value, other: Value| if wrong { other } else { right };
    vec![
        ("i", pick(Value::Int(int), Value::from(text.as_str()))),
        ("f", pick(Value::Float(int as f64 / 3.0), Value::Null)),
        ("s", pick(Value::from(text.as_str()), Value::Int(int))),
        ("b", pick(Value::Bool(int % 2 == 0), list.clone())),
        ("l", pick(list.clone(), Value::Map(map.clone().into()))),
        ("m", pick(Value::Map(map.into()), Value::Bool(true))),
        ("r", pick(record, Value::Float(f64::NAN))),
        ("d", if wrong { list } else { Value::Int(int) }),
    ]
}

/// Prepares the statement before the first 0 byte of `data` against sources `t` and `u`
/// (`u` with a virtual field), and runs it over a few rows derived from the bytes after
/// it, under small limits. Preparing and running never panic; every refusal is typed.
pub fn fuzz_select(data: &[u8]) {
    use crate::query::{Catalog, Query, QueryLimits, Rows, Scan, SourceInfo, Sources};

    let split = data.iter().position(|&b| b == 0).unwrap_or(data.len());
    let (text, seed) = data.split_at(split);
    let Ok(text) = std::str::from_utf8(text) else {
        return;
    };
    let catalog = Catalog::new().with("t", SourceInfo::default()).with(
        "u",
        SourceInfo {
            row: Type::Dyn,
            virtuals: vec![("v".into(), "size(l) + n".into())],
        },
    );
    let limits = QueryLimits {
        expr: Limits {
            steps_max: 20_000,
            memory_bytes_max: 1 << 20,
            ..Limits::default()
        },
        rows_examined_max: 20_000,
        result_rows_max: 1_000,
        groups_max: 1_000,
        join_rows_max: 1_000,
        time_max: std::time::Duration::from_secs(1),
    };
    let Ok(query) = Query::prepare(text, &catalog, &limits) else {
        return;
    };
    struct Few(Vec<Value>);
    impl Sources for Few {
        fn open(&self, _scan: &Scan) -> Result<Rows<'_>, String> {
            Ok(Box::new(self.0.iter().cloned().map(Ok)))
        }
    }
    let rows: Vec<Value> = (0..seed.len().min(6))
        .map(|i| {
            let record: Map = fuzz_values(&seed[i..]).into_iter().collect();
            Value::Map(record.into())
        })
        .collect();
    let mut produced = 0usize;
    let _ = query.run(&Few(rows), &mut |_| {
        produced += 1;
        true
    });
    assert!(produced as u64 <= limits.result_rows_max);
}
