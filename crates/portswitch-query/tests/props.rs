//! Property tests: printing and parsing round-trip; no input makes the parser or the
//! evaluator panic; well-typed expressions never fail with a type error at run time.

use portswitch_query::ast::{BinaryOp, Expr, ExprKind, Macro, UnaryOp};
use portswitch_query::{
    fuzz_eval, fuzz_parse, fuzz_schema, fuzz_values, parse, CompileErrorKind, EvalErrorKind as E,
    Limits, Program, Span,
};
use proptest::prelude::*;

fn node(kind: ExprKind) -> Expr {
    Expr {
        kind,
        span: Span::default(),
    }
}

fn name(pool: &'static [&'static str]) -> impl Strategy<Value = String> {
    prop::sample::select(pool).prop_map(str::to_owned)
}

// No keywords, no macro names where the parser would read a macro.
const IDENTS: &[&str] = &["a", "b", "x", "Country", "_y1", "r2d2", "all", "has"];
const FUNCTIONS: &[&str] = &["f", "size", "int", "matches", "g_1"];
const METHODS: &[&str] = &["f", "size", "contains", "lower", "exists_one"];
const FIELDS: &[&str] = &["a", "b", "Origin", "_z", "map"];

fn leaf() -> impl Strategy<Value = Expr> {
    prop_oneof![
        Just(ExprKind::Null),
        any::<bool>().prop_map(ExprKind::Bool),
        any::<i64>().prop_map(ExprKind::Int),
        any::<f64>()
            .prop_filter("finite", |f| f.is_finite())
            .prop_map(ExprKind::Float),
        any::<String>().prop_map(ExprKind::String),
        "[a-z'\"\\\\\n\u{0}-\u{1f}é😀]{0,8}".prop_map(ExprKind::String),
        any::<Vec<u8>>().prop_map(ExprKind::Bytes),
        name(IDENTS).prop_map(ExprKind::Ident),
    ]
    .prop_map(node)
}

fn binary_op() -> impl Strategy<Value = BinaryOp> {
    prop::sample::select(
        &[
            BinaryOp::Mul,
            BinaryOp::Div,
            BinaryOp::Rem,
            BinaryOp::Add,
            BinaryOp::Sub,
            BinaryOp::Lt,
            BinaryOp::Le,
            BinaryOp::Gt,
            BinaryOp::Ge,
            BinaryOp::Eq,
            BinaryOp::Ne,
            BinaryOp::In,
            BinaryOp::And,
            BinaryOp::Or,
        ][..],
    )
}

/// Arbitrary syntax trees of every kind of node.
fn expr() -> impl Strategy<Value = Expr> {
    leaf().prop_recursive(6, 64, 4, |inner| {
        let boxed = inner.clone().prop_map(Box::new);
        prop_oneof![
            (boxed.clone(), name(FIELDS))
                .prop_map(|(target, field)| ExprKind::Member { target, field }),
            (boxed.clone(), boxed.clone())
                .prop_map(|(target, index)| ExprKind::Index { target, index }),
            (name(FUNCTIONS), prop::collection::vec(inner.clone(), 0..3))
                .prop_map(|(function, args)| ExprKind::Call { function, args }),
            (
                boxed.clone(),
                name(METHODS),
                prop::collection::vec(inner.clone(), 0..3)
            )
                .prop_map(|(target, method, args)| ExprKind::Method {
                    target,
                    method,
                    args
                }),
            (prop::bool::ANY, boxed.clone()).prop_map(|(not, operand)| ExprKind::Unary {
                op: if not { UnaryOp::Not } else { UnaryOp::Neg },
                operand
            }),
            (binary_op(), boxed.clone(), boxed.clone())
                .prop_map(|(op, lhs, rhs)| ExprKind::Binary { op, lhs, rhs }),
            (boxed.clone(), boxed.clone(), boxed.clone()).prop_map(|(cond, then, otherwise)| {
                ExprKind::Ternary {
                    cond,
                    then,
                    otherwise,
                }
            }),
            prop::collection::vec(inner.clone(), 0..4).prop_map(ExprKind::List),
            prop::collection::vec((inner.clone(), inner.clone()), 0..3).prop_map(ExprKind::Map),
            (
                prop::sample::select(&[Macro::All, Macro::Exists, Macro::Map, Macro::Filter][..]),
                boxed.clone(),
                name(IDENTS),
                boxed.clone()
            )
                .prop_map(|(kind, range, var, body)| ExprKind::Comprehension {
                    kind,
                    range,
                    var,
                    body
                }),
            (boxed, name(FIELDS)).prop_map(|(target, field)| ExprKind::Has { target, field }),
        ]
        .prop_map(node)
    })
}

// Typed expressions over `fuzz_schema()`: i int, f float, s string, b bool, l list(int),
// m map(string, string), r {n: int, s: string, l: list(string)}.

fn int_expr(depth: u32) -> BoxedStrategy<String> {
    let leaf = prop_oneof![
        any::<i64>().prop_map(|i| i.to_string()),
        (-5i64..5).prop_map(|i| i.to_string()),
        Just("i".to_owned()),
        Just("r.n".to_owned()),
        Just("size(s)".to_owned()),
        Just("l.size()".to_owned()),
        Just("size(r.l)".to_owned()),
    ];
    if depth == 0 {
        return leaf.boxed();
    }
    let d = depth - 1;
    prop_oneof![
        3 => leaf,
        2 => (int_expr(d), int_expr(d), prop::sample::select(&["+", "-", "*", "/", "%"][..]))
            .prop_map(|(a, b, op)| format!("({a} {op} {b})")),
        1 => int_expr(d).prop_map(|a| format!("-({a})")),
        1 => (bool_expr(d), int_expr(d), int_expr(d))
            .prop_map(|(c, a, b)| format!("({c} ? {a} : {b})")),
        1 => float_expr(d).prop_map(|a| format!("int({a})")),
        1 => (list_expr(d), int_expr(d)).prop_map(|(l, i)| format!("{l}[{i}]")),
        1 => string_expr(d).prop_map(|s| format!("{s}.size()")),
        1 => list_expr(d).prop_map(|l| format!("size({l}.map(x, x * 2))")),
    ]
    .boxed()
}

fn float_expr(depth: u32) -> BoxedStrategy<String> {
    let leaf = prop_oneof![
        any::<f64>()
            .prop_filter("finite", |f| f.is_finite())
            .prop_map(|f| format!("{f:?}")),
        Just("f".to_owned()),
        Just("1.5".to_owned()),
    ];
    if depth == 0 {
        return leaf.boxed();
    }
    let d = depth - 1;
    prop_oneof![
        2 => leaf,
        2 => (float_expr(d), float_expr(d), prop::sample::select(&["+", "-", "*", "/"][..]))
            .prop_map(|(a, b, op)| format!("({a} {op} {b})")),
        1 => (int_expr(d), float_expr(d)).prop_map(|(a, b)| format!("({a} * {b})")),
        1 => int_expr(d).prop_map(|a| format!("float({a})")),
    ]
    .boxed()
}

fn string_expr(depth: u32) -> BoxedStrategy<String> {
    let leaf = prop_oneof![
        Just("s".to_owned()),
        Just("r.s".to_owned()),
        Just("'lit'".to_owned()),
        Just("'ÄÖÜ'".to_owned()),
        Just("m['k0']".to_owned()),
        Just("m.k1".to_owned()),
        Just("r.l[0]".to_owned()),
    ];
    if depth == 0 {
        return leaf.boxed();
    }
    let d = depth - 1;
    prop_oneof![
        3 => leaf,
        2 => (string_expr(d), string_expr(d)).prop_map(|(a, b)| format!("({a} + {b})")),
        1 => string_expr(d).prop_map(|a| format!("{a}.lower()")),
        1 => string_expr(d).prop_map(|a| format!("upper({a})")),
        1 => int_expr(d).prop_map(|a| format!("string({a})")),
        1 => float_expr(d).prop_map(|a| format!("string({a})")),
        1 => (bool_expr(d), string_expr(d), string_expr(d))
            .prop_map(|(c, a, b)| format!("({c} ? {a} : {b})")),
    ]
    .boxed()
}

fn list_expr(depth: u32) -> BoxedStrategy<String> {
    let leaf = prop_oneof![Just("l".to_owned()), Just("[1, 2, 3]".to_owned())];
    if depth == 0 {
        return leaf.boxed();
    }
    let d = depth - 1;
    prop_oneof![
        2 => leaf,
        1 => (int_expr(d), int_expr(d)).prop_map(|(a, b)| format!("[{a}, {b}]")),
        1 => (list_expr(d), list_expr(d)).prop_map(|(a, b)| format!("({a} + {b})")),
        1 => (list_expr(d), int_expr(d)).prop_map(|(l, e)| format!("{l}.map(x, x + {e})")),
        1 => (list_expr(d), int_expr(d)).prop_map(|(l, e)| format!("{l}.filter(x, x > {e})")),
    ]
    .boxed()
}

fn bool_expr(depth: u32) -> BoxedStrategy<String> {
    let leaf = prop_oneof![
        Just("b".to_owned()),
        Just("true".to_owned()),
        Just("has(r.n)".to_owned()),
        Just("('k0' in m)".to_owned()),
        Just("s.matches('(?i)^[a-zä]+$')".to_owned()),
    ];
    if depth == 0 {
        return leaf.boxed();
    }
    let d = depth - 1;
    prop_oneof![
        2 => leaf,
        2 => (int_expr(d), int_expr(d), prop::sample::select(&["<", "<=", ">", ">=", "==", "!="][..]))
            .prop_map(|(a, b, op)| format!("({a} {op} {b})")),
        1 => (float_expr(d), int_expr(d)).prop_map(|(a, b)| format!("({a} >= {b})")),
        1 => (string_expr(d), string_expr(d), prop::sample::select(&["<", "==", "!="][..]))
            .prop_map(|(a, b, op)| format!("({a} {op} {b})")),
        1 => (bool_expr(d), bool_expr(d), prop::sample::select(&["&&", "||", "==", "!="][..]))
            .prop_map(|(a, b, op)| format!("({a} {op} {b})")),
        1 => bool_expr(d).prop_map(|a| format!("!({a})")),
        1 => (int_expr(d), list_expr(d)).prop_map(|(a, l)| format!("({a} in {l})")),
        1 => (list_expr(d), int_expr(d)).prop_map(|(l, e)| format!("{l}.all(x, x > {e})")),
        1 => (list_expr(d), int_expr(d)).prop_map(|(l, e)| format!("{l}.exists(x, x == {e})")),
        1 => (string_expr(d), string_expr(d), prop::sample::select(&["contains", "startsWith", "endsWith"][..]))
            .prop_map(|(a, b, f)| format!("{a}.{f}({b})")),
        1 => string_expr(d).prop_map(|a| format!("{a}.matches(r'\\p{{L}}')")),
    ]
    .boxed()
}

fn typed_expr() -> impl Strategy<Value = String> {
    prop_oneof![
        int_expr(3),
        float_expr(3),
        string_expr(3),
        list_expr(3),
        bool_expr(3),
    ]
}

/// Query-like text: fragments of the language in random order, to get past the lexer
/// more often than random bytes do.
fn token_soup() -> impl Strategy<Value = String> {
    let fragments = &[
        "(",
        ")",
        "[",
        "]",
        "{",
        "}",
        ",",
        ".",
        ":",
        "?",
        "a",
        "i",
        "s",
        "l",
        "m",
        "r",
        "1",
        "0",
        "2.5",
        "-",
        "'s'",
        "b'x'",
        "+",
        "*",
        "/",
        "%",
        "!",
        "==",
        "<",
        "&&",
        "||",
        "in",
        "all",
        "map",
        "filter",
        "exists",
        "has",
        "size",
        "matches",
        "x",
        " ",
        "'(a+)+'",
        "timestamp",
        "duration",
        "'1h'",
    ][..];
    prop::collection::vec(prop::sample::select(fragments), 0..40).prop_map(|v| v.concat())
}

/// 512 cases by default; `PROPTEST_CASES` sets more for a longer campaign.
fn config() -> ProptestConfig {
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(512);
    ProptestConfig {
        cases,
        ..ProptestConfig::default()
    }
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn printed_trees_parse_back_to_themselves(e in expr()) {
        let printed = e.to_string();
        let parsed = parse(&printed, &Limits::default())
            .map_err(|err| TestCaseError::fail(format!("{printed:?}: {err}")))?;
        prop_assert_eq!(parsed.without_spans(), e.without_spans(), "{}", printed);
    }

    #[test]
    fn random_bytes_never_panic(data in prop::collection::vec(any::<u8>(), 0..200)) {
        fuzz_parse(&data);
        fuzz_eval(&data);
    }

    #[test]
    fn random_token_soup_never_panics(src in token_soup(), seed in prop::collection::vec(any::<u8>(), 0..24)) {
        fuzz_parse(src.as_bytes());
        let mut data = src.into_bytes();
        data.push(0);
        data.extend(seed);
        fuzz_eval(&data);
    }

    #[test]
    fn well_typed_expressions_evaluate_without_type_errors(
        src in typed_expr(),
        seed in prop::collection::vec(any::<u8>(), 0..24),
    ) {
        let limits = Limits { steps_max: 100_000, ..Limits::default() };
        let program = match Program::compile(&src, &fuzz_schema(), &limits) {
            Ok(p) => p,
            // A conversion of a literal that cannot succeed (`int(1e300)`) is refused at
            // compile time, by design; any other compile error is a checker bug.
            Err(e) if matches!(e.kind(), CompileErrorKind::InvalidLiteral(_)) => return Ok(()),
            Err(e) => return Err(TestCaseError::fail(format!("{src:?} does not compile:\n{e}"))),
        };
        // Values of the declared types (the seed's wrong-type bit cleared).
        let mut seed = seed;
        if let Some(first) = seed.first_mut() {
            *first &= !2;
        }
        let values = fuzz_values(&seed);
        let mut bindings = program.bindings();
        for (name, value) in &values {
            bindings.set(name, value);
        }
        if let Err(e) = program.eval(&bindings) {
            // What the data can cause; never a type the checker should have caught.
            let data_dependent = matches!(
                e.kind(),
                E::Overflow
                    | E::DivisionByZero
                    | E::IndexOutOfRange { .. }
                    | E::NoSuchKey(_)
                    | E::InvalidArgument(_)
                    | E::CostExceeded(_)
            );
            prop_assert!(data_dependent, "{:?}: {}", src, e);
        }
    }
}
