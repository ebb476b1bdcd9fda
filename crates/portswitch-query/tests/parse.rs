//! The parser: every construct, precedence, spans, error positions, and input that must
//! be refused without overflowing the stack.

use portswitch_query::ast::{BinaryOp, Expr, ExprKind, Macro, UnaryOp};
use portswitch_query::{parse, CompileErrorKind, Limits, Span};

/// A compact rendering of a tree's shape, spans left out.
fn sx(e: &Expr) -> String {
    let list = |items: &[Expr]| items.iter().map(sx).collect::<Vec<_>>().join(" ");
    match &e.kind {
        ExprKind::Null => "null".into(),
        ExprKind::Bool(b) => b.to_string(),
        ExprKind::Int(i) => i.to_string(),
        ExprKind::Float(f) => format!("{f:?}"),
        ExprKind::String(s) => format!("{s:?}"),
        ExprKind::Bytes(b) => format!("b{b:?}"),
        ExprKind::Ident(name) => name.clone(),
        ExprKind::Member { target, field } => format!("(. {} {field})", sx(target)),
        ExprKind::Index { target, index } => format!("([] {} {})", sx(target), sx(index)),
        ExprKind::Call { function, args } => format!("({function} {})", list(args)),
        ExprKind::Method {
            target,
            method,
            args,
        } => format!("(.{method} {} {})", sx(target), list(args)),
        ExprKind::Unary { op, operand } => {
            let op = match op {
                UnaryOp::Not => "!",
                UnaryOp::Neg => "neg",
            };
            format!("({op} {})", sx(operand))
        }
        ExprKind::Binary { op, lhs, rhs } => {
            format!("({} {} {})", op.symbol(), sx(lhs), sx(rhs))
        }
        ExprKind::Ternary {
            cond,
            then,
            otherwise,
        } => format!("(? {} {} {})", sx(cond), sx(then), sx(otherwise)),
        ExprKind::List(items) => format!("[{}]", list(items)),
        ExprKind::Map(entries) => {
            let entries: Vec<String> = entries
                .iter()
                .map(|(k, v)| format!("{}:{}", sx(k), sx(v)))
                .collect();
            format!("{{{}}}", entries.join(" "))
        }
        ExprKind::Comprehension {
            kind,
            range,
            var,
            body,
        } => format!("({} {var} {} {})", kind.name(), sx(range), sx(body)),
        ExprKind::Has { target, field } => format!("(has {} {field})", sx(target)),
    }
}

fn p(src: &str) -> String {
    match parse(src, &Limits::default()) {
        Ok(e) => sx(&e),
        Err(e) => panic!("{src:?} does not parse:\n{e}"),
    }
}

fn err(src: &str) -> portswitch_query::CompileError {
    match parse(src, &Limits::default()) {
        Ok(e) => panic!("{src:?} parsed as {}", sx(&e)),
        Err(e) => e,
    }
}

#[test]
fn literals() {
    assert_eq!(p("null"), "null");
    assert_eq!(p("true"), "true");
    assert_eq!(p("false"), "false");
    assert_eq!(p("42"), "42");
    assert_eq!(p("0x2a"), "42");
    assert_eq!(p("-7"), "-7");
    assert_eq!(p("-9223372036854775808"), "-9223372036854775808");
    assert_eq!(p("1.5"), "1.5");
    assert_eq!(p("-2.5e3"), "-2500.0");
    assert_eq!(p(r#""a\"b""#), r#""a\"b""#);
    assert_eq!(p("'single'"), r#""single""#);
    assert_eq!(p(r#"r"\d+""#), r#""\\d+""#);
    assert_eq!(p(r#"b"\x00\xff""#), "b[0, 255]");
    assert_eq!(p("\"\\u00e4\""), "\"ä\"");
}

#[test]
fn out_of_range_integers() {
    assert!(matches!(
        err("9223372036854775808").kind(),
        CompileErrorKind::InvalidNumber(_)
    ));
    assert!(matches!(
        err("-9223372036854775809").kind(),
        CompileErrorKind::InvalidNumber(_)
    ));
    // The magnitude of i64::MIN is only valid directly after a minus.
    assert!(matches!(
        err("1 - 9223372036854775808").kind(),
        CompileErrorKind::InvalidNumber(_)
    ));
}

#[test]
fn names_fields_indexes_calls() {
    assert_eq!(p("a"), "a");
    assert_eq!(p("a.b.c"), "(. (. a b) c)");
    assert_eq!(p("a[0]['k']"), r#"([] ([] a 0) "k")"#);
    assert_eq!(p("f()"), "(f )");
    assert_eq!(p("f(1, x)"), "(f 1 x)");
    assert_eq!(p("s.startsWith('a')"), r#"(.startsWith s "a")"#);
    assert_eq!(p("a.b(1).c[2]"), "([] (. (.b a 1) c) 2)");
    assert_eq!(p("(a + b).size()"), "(.size (+ a b) )");
    assert_eq!(p("'x'.size()"), r#"(.size "x" )"#);
    assert_eq!(p("1.5.x"), "(. 1.5 x)");
}

#[test]
fn unary_operators() {
    assert_eq!(p("!a"), "(! a)");
    assert_eq!(p("!!a"), "(! (! a))");
    assert_eq!(p("-a"), "(neg a)");
    assert_eq!(p("--5"), "(neg -5)");
    assert_eq!(p("-(5)"), "(neg 5)");
    // Postfix binds tighter than prefix: the minus negates the field.
    assert_eq!(p("-a.b"), "(neg (. a b))");
    assert_eq!(p("-5.size()"), "(neg (.size 5 ))");
    assert_eq!(p("!a.b"), "(! (. a b))");
}

#[test]
fn precedence_and_associativity() {
    assert_eq!(p("1 + 2 * 3"), "(+ 1 (* 2 3))");
    assert_eq!(p("1 * 2 + 3"), "(+ (* 1 2) 3)");
    assert_eq!(p("1 - 2 - 3"), "(- (- 1 2) 3)");
    assert_eq!(p("8 / 4 / 2"), "(/ (/ 8 4) 2)");
    assert_eq!(p("7 % 4 * 2"), "(* (% 7 4) 2)");
    assert_eq!(p("1 - -2"), "(- 1 -2)");
    assert_eq!(p("a + b < c * d"), "(< (+ a b) (* c d))");
    assert_eq!(p("a < b == c"), "(== (< a b) c)");
    assert_eq!(p("a in l && b"), "(&& (in a l) b)");
    assert_eq!(p("a || b && c"), "(|| a (&& b c))");
    assert_eq!(p("a && b || c"), "(|| (&& a b) c)");
    assert_eq!(p("a || b || c"), "(|| (|| a b) c)");
    assert_eq!(p("!a && b"), "(&& (! a) b)");
    assert_eq!(p("-a * b"), "(* (neg a) b)");
    assert_eq!(p("(1 + 2) * 3"), "(* (+ 1 2) 3)");
    assert_eq!(p("a ? b : c"), "(? a b c)");
    assert_eq!(p("a ? b : c ? d : e"), "(? a b (? c d e))");
    assert_eq!(p("a || b ? c + 1 : d"), "(? (|| a b) (+ c 1) d)");
    assert_eq!(
        p("a <= b != c >= d"),
        "(>= (!= (<= a b) c) d)",
        "relations share one level and associate left"
    );
}

#[test]
fn list_and_map_literals() {
    assert_eq!(p("[]"), "[]");
    assert_eq!(p("[1, 'a', [2]]"), r#"[1 "a" [2]]"#);
    assert_eq!(p("[1, 2,]"), "[1 2]");
    assert_eq!(p("{}"), "{}");
    assert_eq!(p("{'a': 1, 'b': [2],}"), r#"{"a":1 "b":[2]}"#);
    assert_eq!(p("{k: v}.k"), "(. {k:v} k)");
}

#[test]
fn macros() {
    assert_eq!(p("l.all(x, x > 0)"), "(all x l (> x 0))");
    assert_eq!(p("l.exists(x, x == 1)"), "(exists x l (== x 1))");
    assert_eq!(p("l.map(x, x * 2)"), "(map x l (* x 2))");
    assert_eq!(p("l.filter(x, x % 2 == 0)"), "(filter x l (== (% x 2) 0))");
    assert_eq!(
        p("a.b.all(x, x.c.exists(y, y))"),
        "(all x (. a b) (exists y (. x c) y))"
    );
    assert_eq!(p("has(a.b)"), "(has a b)");
    assert_eq!(p("has(a.b.c)"), "(has (. a b) c)");
    assert_eq!(p("[1, 2].all(x, true)"), "(all x [1 2] true)");
    for bad in [
        "l.all(1, x)",
        "l.all(x)",
        "l.map(x, y, z)",
        "has(a)",
        "has(a[0])",
        "has(a.b, c)",
    ] {
        assert!(
            matches!(err(bad).kind(), CompileErrorKind::BadMacro(_)),
            "{bad}"
        );
    }
    let e = parse("l.all(x, x)", &Limits::default()).unwrap();
    assert!(matches!(
        e.kind,
        ExprKind::Comprehension {
            kind: Macro::All,
            ..
        }
    ));
}

#[test]
fn comments_and_whitespace() {
    assert_eq!(p("a // the first\n+ b // and the second"), "(+ a b)");
    assert_eq!(p(" \t\r\n a \n"), "a");
}

#[test]
fn spans_cover_source() {
    let src = "a.b + f(cd, 'é') * 2";
    let e = parse(src, &Limits::default()).unwrap();
    assert_eq!(e.span, Span::new(0, src.len() as u32));
    let ExprKind::Binary {
        op: BinaryOp::Add,
        lhs,
        rhs,
    } = &e.kind
    else {
        panic!("{}", sx(&e))
    };
    assert_eq!(&src[lhs.span.range()], "a.b");
    assert_eq!(&src[rhs.span.range()], "f(cd, 'é') * 2");
    let ExprKind::Binary { lhs: call, .. } = &rhs.kind else {
        panic!()
    };
    let ExprKind::Call { args, .. } = &call.kind else {
        panic!()
    };
    assert_eq!(&src[args[0].span.range()], "cd");
    assert_eq!(&src[args[1].span.range()], "'é'");
}

#[test]
fn error_positions() {
    let cases: &[(&str, &str, (u32, u32))] = &[
        ("1 +", "", (1, 4)),
        ("a +\n  * 2", "*", (2, 3)),
        ("f(1 2)", "2", (1, 5)),
        ("[1, 2", "", (1, 6)),
        ("{'a' 1}", "1", (1, 6)),
        ("a.1", ".1", (1, 2)),
        ("a.+", "+", (1, 3)),
        ("a ? b", "", (1, 6)),
        ("(a", "", (1, 3)),
        ("a b", "b", (1, 3)),
        ("'abc", "'abc", (1, 1)),
        ("x == 'ä' #", "#", (1, 10)),
        ("'\\q'", "\\q", (1, 2)),
    ];
    for &(src, token, (line, column)) in cases {
        let e = err(src);
        let loc = e.location().expect("located");
        assert_eq!((loc.line, loc.column), (line, column), "{src:?}: {e}");
        assert_eq!(&src[e.span().range()], token, "{src:?}: {e}");
    }
}

#[test]
fn errors_display_line_column_and_caret() {
    let e = err("a +\n  * 2");
    assert_eq!(
        e.to_string(),
        "2:3: expected an expression, found `*`\n  |   * 2\n  |   ^"
    );
    let e = err("size(x) + 'abc");
    assert_eq!(
        e.to_string(),
        "1:11: unterminated string literal\n  | size(x) + 'abc\n  |           ^^^^"
    );
}

#[test]
fn deep_nesting_is_refused_not_overflowed() {
    let depth = 100_000;
    let cases = [
        format!("{}1{}", "(".repeat(depth), ")".repeat(depth)),
        format!("{}1", "(".repeat(depth)),
        format!("{}true", "!".repeat(depth)),
        format!("{}x", "-".repeat(depth)),
        format!("{}1{}", "[".repeat(depth), "]".repeat(depth)),
        format!("{}1", "{'a': ".repeat(depth)),
        format!("f({}", "f(".repeat(depth)),
        format!("a{}", ".b".repeat(depth)),
        format!("a{}", "[0]".repeat(depth)),
        format!("a{}", ".f()".repeat(depth)),
        format!("1{}", " + 1".repeat(depth / 4)),
        format!("x{}", " ? x : x".repeat(depth / 4)),
        format!("l{}", ".all(x, x".repeat(depth / 4)),
    ];
    for src in &cases {
        let limits = Limits {
            source_bytes_max: usize::MAX,
            nodes_max: usize::MAX,
            ..Limits::default()
        };
        match parse(src, &limits) {
            Err(e) if matches!(e.kind(), CompileErrorKind::TooDeep { .. }) => {}
            other => panic!("{}…: {other:?}", &src[..20]),
        }
    }
}

#[test]
fn size_limits() {
    let limits = Limits {
        source_bytes_max: 10,
        ..Limits::default()
    };
    let e = parse("1 + 2 + 3 + 4", &limits).unwrap_err();
    assert!(matches!(
        e.kind(),
        CompileErrorKind::SourceTooLong { len: 13, max: 10 }
    ));
    let limits = Limits {
        nodes_max: 5,
        ..Limits::default()
    };
    assert!(parse("[1, 2, 3, 4]", &limits).is_ok());
    let e = parse("[1, 2, 3, 4, 5]", &limits).unwrap_err();
    assert!(matches!(
        e.kind(),
        CompileErrorKind::TooManyNodes { max: 5 }
    ));
}

#[test]
fn round_trip_of_tricky_spellings() {
    for src in [
        "-(5)",
        "--5",
        "-5.size()",
        "(-5).size()",
        "-a.b",
        "!(a && b)",
        "a - -1",
        "-9223372036854775808",
        "1.0e100",
        "'a\\u0001\\n\"'",
        "b'\\x00\\xff\"'",
        "[-1.5, -0.0][0]",
        "{'k': -1}.k",
        "x.all(y, y).exists(z, !z)",
        "has((-a).b)",
    ] {
        let e = parse(src, &Limits::default()).unwrap();
        let printed = e.to_string();
        let again = parse(&printed, &Limits::default())
            .unwrap_or_else(|err| panic!("{src:?} printed as {printed:?}: {err}"));
        assert_eq!(
            again.without_spans(),
            e.without_spans(),
            "{src:?} -> {printed:?}"
        );
    }
}
