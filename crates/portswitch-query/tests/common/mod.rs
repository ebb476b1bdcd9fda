//! Helpers shared by the integration tests.
#![allow(dead_code)]

use portswitch_query::{CompileError, EvalError, Limits, Map, Program, Schema, Type, Value};

/// The reference predicate of the issue.
pub const PREDICATE: &str = r#"(Segments[0].Origin == "MOW" || Country == "RU") && (Tickets[0].Prices["oneway"].Value >= 100 || Passengers.Adults == 1)"#;

/// A schema for the flight records of the reference predicate.
pub fn flight_schema() -> Schema {
    let price = Type::record([("Value", Type::Int), ("Currency", Type::String)]);
    Schema::new()
        .with(
            "Segments",
            Type::list(Type::record([
                ("Origin", Type::String),
                ("Destination", Type::String),
            ])),
        )
        .with("Country", Type::String)
        .with(
            "Tickets",
            Type::list(Type::record([("Prices", Type::map(price))])),
        )
        .with(
            "Passengers",
            Type::record([("Adults", Type::Int), ("Children", Type::Int)]),
        )
}

/// One flight record, as a root map whose keys are the predicate's variables.
pub fn flight(origin: &str, country: &str, price: i64, adults: i64) -> Map {
    let segments = Value::list([Value::map([
        ("Origin", Value::from(origin)),
        ("Destination", Value::from("LED")),
    ])]);
    let tickets = Value::list([Value::map([(
        "Prices",
        Value::map([
            (
                "oneway",
                Value::map([("Value", Value::Int(price)), ("Currency", "RUB".into())]),
            ),
            (
                "roundtrip",
                Value::map([("Value", Value::Int(price * 2)), ("Currency", "RUB".into())]),
            ),
        ]),
    )])]);
    let passengers = Value::map([("Adults", adults), ("Children", 0)]);
    [
        ("Segments", segments),
        ("Country", Value::from(country)),
        ("Tickets", tickets),
        ("Passengers", passengers),
    ]
    .into_iter()
    .collect()
}

/// Compiles with `schema`, binds `vars`, evaluates.
pub fn eval_in(src: &str, schema: &Schema, vars: &[(&str, Value)]) -> Result<Value, EvalError> {
    let program = Program::compile(src, schema, &Limits::default())
        .unwrap_or_else(|e| panic!("{src:?} does not compile:\n{e}"));
    let mut bindings = program.bindings();
    for (name, value) in vars {
        bindings.set(name, value);
    }
    program.eval(&bindings)
}

/// Evaluates an expression without variables (or with `dyn` ones bound from `vars`).
pub fn eval_vars(src: &str, vars: &[(&str, Value)]) -> Result<Value, EvalError> {
    eval_in(src, &Schema::new(), vars)
}

/// Evaluates an expression that must succeed.
pub fn eval(src: &str) -> Value {
    eval_vars(src, &[]).unwrap_or_else(|e| panic!("{src:?} failed:\n{e}"))
}

/// The compile error of `src` under `schema`.
pub fn compile_err_in(src: &str, schema: &Schema) -> CompileError {
    match Program::compile(src, schema, &Limits::default()) {
        Ok(_) => panic!("{src:?} compiled"),
        Err(e) => e,
    }
}

/// The compile error of `src` with every variable `dyn`.
pub fn compile_err(src: &str) -> CompileError {
    compile_err_in(src, &Schema::new())
}

/// The evaluation error of `src`.
pub fn eval_err(src: &str, vars: &[(&str, Value)]) -> EvalError {
    match eval_vars(src, vars) {
        Ok(v) => panic!("{src:?} evaluated to {v}"),
        Err(e) => e,
    }
}

/// The source text a span covers.
pub fn spanned(src: &str, span: portswitch_query::Span) -> &str {
    &src[span.range()]
}
