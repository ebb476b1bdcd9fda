//! The type checker: what it rejects, where it says the error is, and the types it
//! infers for what it accepts.

mod common;

use common::{compile_err_in, flight_schema, spanned};
use portswitch_query::{CompileErrorKind as K, Limits, Program, Schema, Type};

fn schema() -> Schema {
    flight_schema()
        .with("x", Type::Dyn)
        .with("n", Type::Int)
        .with("f", Type::Float)
        .with("t", Type::Time)
        .with("d", Type::Duration)
        .with("names", Type::list(Type::String))
        .with("scores", Type::map(Type::Int))
}

fn result_type(src: &str) -> String {
    match Program::compile(src, &schema(), &Limits::default()) {
        Ok(p) => p.result_type().to_string(),
        Err(e) => panic!("{src:?} does not compile:\n{e}"),
    }
}

/// Asserts that `src` fails to check with a type error containing `message`, located at
/// `at` (the text of the offending expression).
fn type_error(src: &str, message: &str, at: &str) {
    let e = compile_err_in(src, &schema());
    match e.kind() {
        K::Type(m) => assert!(m.contains(message), "{src:?}: {m:?} lacks {message:?}"),
        other => panic!("{src:?}: expected a type error, got {other:?}"),
    }
    assert_eq!(spanned(src, e.span()), at, "{src:?}: {e}");
}

#[test]
fn ill_typed_operators() {
    type_error(
        r#"1 + "a""#,
        "no overload of `+` for (int, string)",
        r#"1 + "a""#,
    );
    type_error(
        r#"n - "a""#,
        "no overload of `-` for (int, string)",
        r#"n - "a""#,
    );
    type_error(
        r#""a" < 1"#,
        "no overload of `<` for (string, int)",
        r#""a" < 1"#,
    );
    type_error("true + 1", "no overload of `+`", "true + 1");
    type_error("true + x", "no overload of `+` for (bool, dyn)", "true + x");
    type_error("1.5 % 2.0", "no overload of `%`", "1.5 % 2.0");
    type_error(
        "t + t",
        "no overload of `+` for (timestamp, timestamp)",
        "t + t",
    );
    type_error("d - t", "no overload of `-`", "d - t");
    type_error("-Country", "no overload of `-` for (string)", "-Country");
    type_error(
        "Segments == Country",
        "no overload of `==`",
        "Segments == Country",
    );
    type_error(
        r#""a" == 1"#,
        "no overload of `==` for (string, int)",
        r#""a" == 1"#,
    );
    type_error("1 in Country", "no overload of `in`", "1 in Country");
    type_error(
        "1 in names",
        "no overload of `in` for (int, list(string))",
        "1 in names",
    );
    type_error("1 in scores", "no overload of `in`", "1 in scores");
    type_error("[1] < [2]", "no overload of `<`", "[1] < [2]");
}

#[test]
fn non_bool_conditions() {
    type_error(
        "1 ? 2 : 3",
        "the condition of `?:` needs a bool, found int",
        "1",
    );
    type_error(
        "Country && true",
        "`&&` needs a bool, found string",
        "Country",
    );
    type_error("true || n", "`||` needs a bool, found int", "n");
    type_error("!1", "`!` needs a bool, found int", "1");
    type_error(
        "Segments.all(s, s.Origin)",
        "the predicate of `all` needs a bool, found string",
        "s.Origin",
    );
    type_error(
        "names.filter(s, size(s))",
        "the predicate of `filter` needs a bool, found int",
        "size(s)",
    );
}

#[test]
fn ill_typed_calls_and_selections() {
    type_error("size(1)", "no overload of `size` for (int)", "size(1)");
    type_error("n.size()", "no overload of `size` for (int)", "n.size()");
    type_error(
        "Country.contains(1)",
        "no overload of `contains`",
        "Country.contains(1)",
    );
    type_error("lower(n)", "no overload of `lower`", "lower(n)");
    type_error("int(t)", "no overload of `int` for (timestamp)", "int(t)");
    type_error("string(names)", "no overload of `string`", "string(names)");
    type_error("timestamp(1)", "no overload of `timestamp`", "timestamp(1)");
    type_error(
        "n.matches('a')",
        "no overload of `matches`",
        "n.matches('a')",
    );
    type_error("Country.Origin", "string has no fields", "Country.Origin");
    type_error("Segments['a']", "no overload of `[]` for", "Segments['a']");
    type_error("Passengers[0]", "no overload of `[]`", "Passengers[0]");
    type_error(
        "Country.all(c, true)",
        "`all` needs a list or map, found string",
        "Country",
    );
    type_error(
        "has(Country.x)",
        "`has` needs a map or record",
        "has(Country.x)",
    );
    type_error("{1: 2}", "map keys are strings, found int", "1");
    type_error("{'a': 1, 'b': 2, 'a': 3}", "duplicate map key", "'a'");
}

#[test]
fn unknown_functions_and_arity() {
    let e = compile_err_in("frobnicate(1)", &schema());
    assert_eq!(e.kind(), &K::UnknownFunction("frobnicate".into()));
    assert_eq!(e.location().map(|l| (l.line, l.column)), Some((1, 1)));
    let e = compile_err_in("Country.frobnicate()", &schema());
    assert_eq!(e.kind(), &K::UnknownFunction("frobnicate".into()));
    let e = compile_err_in("size(Country, 2)", &schema());
    assert_eq!(
        e.kind(),
        &K::WrongArity {
            name: "size".into(),
            expected: 1,
            found: 2
        }
    );
    let e = compile_err_in("Country.startsWith()", &schema());
    assert_eq!(
        e.kind(),
        &K::WrongArity {
            name: "startsWith".into(),
            expected: 2,
            found: 1
        }
    );
    let e = compile_err_in("matches('a')", &schema());
    assert!(matches!(e.kind(), K::WrongArity { expected: 2, .. }));
}

#[test]
fn regex_literals_are_checked_at_compile_time() {
    let src = "Country.matches('(unclosed') || true";
    let e = compile_err_in(src, &schema());
    assert!(
        matches!(e.kind(), K::InvalidRegex(m) if m.contains("unclosed")),
        "{e}"
    );
    assert_eq!(spanned(src, e.span()), "'(unclosed'");
    let src = "matches(Country, Country)";
    let e = compile_err_in(src, &schema());
    assert_eq!(e.kind(), &K::NonLiteralPattern);
    assert_eq!(spanned(src, e.span()), "Country");
    let e = compile_err_in("Country.matches('a' + 'b')", &schema());
    assert_eq!(e.kind(), &K::NonLiteralPattern);
}

#[test]
fn literal_conversions_that_cannot_succeed() {
    for (src, arg) in [
        (r#"timestamp("yesterday")"#, r#""yesterday""#),
        (r#"duration("1d")"#, r#""1d""#),
        (r#"int("12x")"#, r#""12x""#),
        ("int(1e300)", "1e300"),
        (r#"float("one")"#, r#""one""#),
    ] {
        let e = compile_err_in(src, &schema());
        assert!(matches!(e.kind(), K::InvalidLiteral(_)), "{src}: {e}");
        assert_eq!(spanned(src, e.span()), arg, "{src}");
    }
}

#[test]
fn undeclared_variables_in_a_strict_schema() {
    let strict = flight_schema().declared_only();
    let src = r#"Country == "RU" || Contry == "DE""#;
    let e = compile_err_in(src, &strict);
    assert_eq!(e.kind(), &K::UndeclaredVariable("Contry".into()));
    assert_eq!(spanned(src, e.span()), "Contry");
    // Loop variables are declared by their loop.
    assert!(Program::compile(
        "Segments.all(s, s.Origin != '')",
        &strict,
        &Limits::default()
    )
    .is_ok());
    // In an open schema the same name is simply `dyn`.
    assert!(Program::compile(src, &flight_schema(), &Limits::default()).is_ok());
}

#[test]
fn error_display_points_into_multi_line_source() {
    let src = "Country == 'RU' &&\n  size(n) > 0";
    let e = compile_err_in(src, &schema());
    assert_eq!(
        e.to_string(),
        "2:3: type error: no overload of `size` for (int)\n  |   size(n) > 0\n  |   ^^^^^^^"
    );
}

#[test]
fn inferred_types() {
    assert_eq!(result_type(common::PREDICATE), "bool");
    assert_eq!(result_type("Segments[0].Origin"), "string");
    assert_eq!(result_type(r#"Tickets[0].Prices["oneway"].Value"#), "int");
    assert_eq!(result_type("Tickets[0].Prices.oneway.Value * 1.5"), "float");
    assert_eq!(result_type("n / 2"), "int");
    assert_eq!(result_type("n + f"), "float");
    assert_eq!(result_type("Segments.map(s, s.Origin)"), "list(string)");
    assert_eq!(
        result_type("Segments.filter(s, s.Origin == 'MOW')"),
        "list({Origin: string, Destination: string})"
    );
    assert_eq!(
        result_type("scores.filter(k, scores[k] > 1)"),
        "list(string)"
    );
    assert_eq!(result_type("Passengers.Unknown"), "dyn");
    assert_eq!(result_type("x + 1"), "dyn");
    assert_eq!(result_type("x.y.z"), "dyn");
    assert_eq!(result_type("t + d"), "timestamp");
    assert_eq!(result_type("t - t"), "duration");
    assert_eq!(result_type("d + d"), "duration");
    assert_eq!(
        result_type(r#"timestamp("2024-01-01T00:00:00Z") + duration("1h")"#),
        "timestamp"
    );
    assert_eq!(result_type("[1, 2]"), "list(int)");
    assert_eq!(result_type("[1, 'a']"), "list(dyn)");
    assert_eq!(result_type("[]"), "list(dyn)");
    assert_eq!(result_type("{'a': 1}"), "map(string, int)");
    assert_eq!(result_type("names + ['x']"), "list(string)");
    assert_eq!(result_type("n > 0 ? 'a' : 'b'"), "string");
    assert_eq!(result_type("n > 0 ? 'a' : 1"), "dyn");
    assert_eq!(result_type("size(Country) + Country.size()"), "int");
    assert_eq!(
        result_type("null == Country && 1 == 1.0 && x == 'a'"),
        "bool"
    );
    assert_eq!(result_type("has(Passengers.Adults)"), "bool");
    assert_eq!(result_type("'MOW' in Segments.map(s, s.Origin)"), "bool");
    assert_eq!(result_type("'Adults' in Passengers"), "bool");
    assert_eq!(result_type("Country.matches('^[A-Z]{2}$')"), "bool");
    assert_eq!(result_type("string(n) + string(t) + string(d)"), "string");
}
