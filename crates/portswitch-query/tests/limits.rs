//! Hostile input: every limit refuses with a typed error, before evaluation where it
//! can and during it otherwise; nothing hangs, exhausts memory or overflows the stack.

mod common;

use common::{compile_err, eval_vars};
use portswitch_query::limits::{DEPTH_MAX, STEPS_MAX};
use portswitch_query::{
    CompileErrorKind as K, Cost, EvalErrorKind as E, Limits, Program, Schema, Value,
};

fn hundred() -> String {
    let items: Vec<String> = (1..=100).map(|i| i.to_string()).collect();
    format!("[{}]", items.join(", "))
}

#[test]
fn nested_loops_over_literal_lists_are_refused_before_evaluation() {
    let l = hundred();
    for body in ["true", "a + b + c > 0"] {
        let src = format!("{l}.all(a, {l}.all(b, {l}.all(c, {body})))");
        let e = compile_err(&src);
        match e.kind() {
            K::CostTooHigh { estimate, max } => {
                assert!(*estimate > 1_000_000 && *max == STEPS_MAX, "{e}");
            }
            other => panic!("{other:?}"),
        }
    }
    // Two levels fit.
    let src = format!("{l}.all(a, {l}.all(b, a + b > 0))");
    assert_eq!(eval_vars(&src, &[]), Ok(Value::Bool(true)));
}

#[test]
fn nested_loops_over_bound_lists_are_cut_while_running() {
    let xs = Value::list(1..=100);
    let src = "xs.all(a, xs.all(b, xs.all(c, a + b + c > 0)))";
    let e = eval_vars(src, &[("xs", xs.clone())]).unwrap_err();
    assert_eq!(e.kind(), &E::CostExceeded(Cost::Steps));
    assert_eq!(common::spanned(src, e.span()), "xs.all(c, a + b + c > 0)");
    // The same loops over smaller lists fit.
    assert_eq!(
        eval_vars(src, &[("xs", Value::list(1..=20))]),
        Ok(Value::Bool(true))
    );
    // exists stops at the first hit, so its cost is what it actually did.
    assert_eq!(
        eval_vars(
            "xs.exists(a, xs.exists(b, xs.exists(c, c == 1)))",
            &[("xs", xs)]
        ),
        Ok(Value::Bool(true))
    );
}

#[test]
fn step_budget_is_exact_enough_to_configure() {
    let limits = Limits {
        steps_max: 1_000,
        ..Limits::default()
    };
    let program = Program::compile("xs.all(x, x >= 0)", &Schema::new(), &limits).unwrap();
    let run = |n: i64| {
        let xs = Value::list(0..n);
        let mut b = program.bindings();
        b.set("xs", &xs);
        program.eval(&b)
    };
    // Each iteration costs the nodes of its body (`x`, `0`, `>=`) plus one: 250
    // iterations fit in 1000 steps, less what the loop itself and its range cost.
    assert_eq!(run(240), Ok(Value::Bool(true)));
    assert_eq!(run(260).unwrap_err().kind(), &E::CostExceeded(Cost::Steps));
}

#[test]
fn long_scans_cost_steps() {
    let limits = Limits {
        steps_max: 1_000,
        ..Limits::default()
    };
    let program = Program::compile("s.contains('needle')", &Schema::new(), &limits).unwrap();
    let short = Value::from("x".repeat(10_000));
    let long = Value::from("x".repeat(1_000_000));
    let mut b = program.bindings();
    b.set("s", &short);
    assert_eq!(program.eval(&b), Ok(Value::Bool(false)));
    b.set("s", &long);
    assert_eq!(
        program.eval(&b).unwrap_err().kind(),
        &E::CostExceeded(Cost::Steps)
    );
}

#[test]
fn memory_is_bounded_per_evaluation() {
    let s = Value::from("x".repeat(1 << 20));
    let l = Value::list(0..100);
    // 100 strings of 2 MiB would be 200 MiB: refused at the first one past 16 MiB.
    let e = eval_vars("l.map(i, s + s)", &[("s", s.clone()), ("l", l)]).unwrap_err();
    assert_eq!(e.kind(), &E::CostExceeded(Cost::Memory));
    // Doubling a string repeatedly runs into the budget, not out of memory.
    let doubling = "[s].map(a, a + a).map(b, b + b).map(c, c + c).map(d, d + d).map(e, e + e)";
    let e = eval_vars(doubling, &[("s", s)]).unwrap_err();
    assert_eq!(e.kind(), &E::CostExceeded(Cost::Memory));
}

#[test]
fn pathological_regexes() {
    // Catastrophic backtracking in other engines; linear in the regex crate.
    let input = Value::from(format!("{}b", "a".repeat(100_000)));
    for (pattern, want) in [
        ("(a+)+$", false),
        ("^(a+)+$", false),
        ("(a+)+b$", true),
        ("(a|aa)+c", false),
    ] {
        let src = format!("s.matches('{pattern}')");
        assert_eq!(
            eval_vars(&src, &[("s", input.clone())]),
            Ok(Value::Bool(want)),
            "{pattern}"
        );
    }
    // A program too large to compile is refused with a typed error at the pattern.
    let src = "s.matches('a{1000}{1000}')";
    let e = compile_err(src);
    assert_eq!(
        e.kind(),
        &K::RegexTooBig {
            max: portswitch_query::limits::REGEX_BYTES_MAX
        }
    );
    assert_eq!(common::spanned(src, e.span()), "'a{1000}{1000}'");
    let e = compile_err(r"s.matches(r'\w{500}')");
    assert!(matches!(e.kind(), K::RegexTooBig { .. }), "{e}");
    // The limit is the caller's to lower.
    let small = Limits {
        regex_bytes_max: 10_000,
        ..Limits::default()
    };
    assert!(Program::compile("s.matches('a{100}')", &Schema::new(), &Limits::default()).is_ok());
    let e = Program::compile("s.matches('a{1000}')", &Schema::new(), &small).unwrap_err();
    assert!(matches!(e.kind(), K::RegexTooBig { max: 10_000 }));
}

#[test]
fn regex_count_is_bounded() {
    let limits = Limits {
        regexes_max: 3,
        ..Limits::default()
    };
    let three = "s.matches('a') || s.matches('b') || s.matches('c')";
    assert!(Program::compile(three, &Schema::new(), &limits).is_ok());
    let four = format!("{three} || s.matches('d')");
    let e = Program::compile(&four, &Schema::new(), &limits).unwrap_err();
    assert_eq!(e.kind(), &K::TooManyRegexes { max: 3 });
}

#[test]
fn source_and_node_limits() {
    let long = format!(
        "'{}'",
        "x".repeat(portswitch_query::limits::SOURCE_BYTES_MAX)
    );
    assert!(matches!(compile_err(&long).kind(), K::SourceTooLong { .. }));
    let many = format!("[{}]", vec!["1"; 20_000].join(","));
    assert!(matches!(compile_err(&many).kind(), K::TooManyNodes { .. }));
}

/// A shape of nesting, its source, and the variables it needs.
type Shape = (&'static str, String, Vec<(&'static str, Value)>);

/// Expressions whose tree is `height` deep, of every shape that nests, with values that
/// make them evaluate without error.
fn nested(height: usize) -> Vec<Shape> {
    let n = height - 1;
    let mut record = Value::Int(1);
    let mut list = Value::Int(1);
    for _ in 0..n {
        record = Value::map([("a", record)]);
        list = Value::list([list]);
    }
    vec![
        (
            "parens",
            format!("{}1{}", "(".repeat(n), ")".repeat(n)),
            vec![],
        ),
        ("not", format!("{}true", "!".repeat(n)), vec![]),
        (
            "neg",
            format!("{}x", "-".repeat(n)),
            vec![("x", Value::Int(1))],
        ),
        (
            "list",
            format!("{}1{}", "[".repeat(n), "]".repeat(n)),
            vec![],
        ),
        (
            "map",
            format!("{}1{}", "{'a': ".repeat(n), "}".repeat(n)),
            vec![],
        ),
        (
            "call",
            format!("{}'x'{}", "string(".repeat(n), ")".repeat(n)),
            vec![],
        ),
        (
            "method",
            format!("s{}", ".lower()".repeat(n)),
            vec![("s", Value::from("X"))],
        ),
        (
            "member",
            format!("r{}", ".a".repeat(n)),
            vec![("r", record)],
        ),
        ("index", format!("l{}", "[0]".repeat(n)), vec![("l", list)]),
        (
            "add",
            format!("x{}", " + x".repeat(n)),
            vec![("x", Value::Int(1))],
        ),
        (
            "and",
            format!("x{}", " && x".repeat(n)),
            vec![("x", Value::Bool(true))],
        ),
        (
            "ternary",
            format!("{}1", "x ? 1 : ".repeat(n)),
            vec![("x", Value::Bool(false))],
        ),
        (
            "loops",
            format!("{}true{}", "l.all(x, ".repeat(n), ")".repeat(n)),
            vec![("l", Value::list([1]))],
        ),
    ]
}

#[test]
fn deepest_accepted_expression_fits_a_small_stack() {
    // Every recursive pass at its deepest, in a thread with a 2 MiB stack (the default
    // for spawned threads, and what test threads get): in an unoptimised build too.
    std::thread::Builder::new()
        .stack_size(2 << 20)
        .spawn(|| {
            for (shape, src, vars) in nested(DEPTH_MAX) {
                let program = Program::compile(&src, &Schema::new(), &Limits::default())
                    .unwrap_or_else(|e| panic!("{shape}: {e}"));
                let mut bindings = program.bindings();
                for (name, value) in &vars {
                    bindings.set(name, value);
                }
                if let Err(e) = program.eval(&bindings) {
                    panic!("{shape}: {e}");
                }
                // The printer and the round trip recurse too.
                let printed = portswitch_query::parse(&src, &Limits::default())
                    .unwrap()
                    .to_string();
                assert!(!printed.is_empty());
            }
        })
        .unwrap()
        .join()
        .unwrap();
}

#[test]
fn one_level_deeper_is_refused() {
    for (shape, src, _) in nested(DEPTH_MAX + 2) {
        if shape == "loops" || shape == "and" {
            continue; // these gain two levels per step; covered below
        }
        let e = compile_err(&src);
        assert!(
            matches!(e.kind(), K::TooDeep { max: DEPTH_MAX }),
            "{shape}: {e}"
        );
    }
    let e = compile_err(&format!(
        "{}true{}",
        "l.all(x, ".repeat(DEPTH_MAX),
        ")".repeat(DEPTH_MAX)
    ));
    assert!(matches!(e.kind(), K::TooDeep { .. }));
}

#[test]
fn configured_depth_is_capped_at_the_ceiling() {
    let limits = Limits {
        depth_max: usize::MAX,
        ..Limits::default()
    };
    let src = format!("{}1{}", "[".repeat(10_000), "]".repeat(10_000));
    let e = Program::compile(&src, &Schema::new(), &limits).unwrap_err();
    assert_eq!(
        e.kind(),
        &K::TooDeep {
            max: portswitch_query::limits::DEPTH_CEILING
        }
    );
}

#[test]
fn deeply_nested_values_are_compared_within_bounds() {
    let mut a = Value::Int(1);
    for _ in 0..1_000 {
        a = Value::list([a]);
    }
    let e = eval_vars("a == b", &[("a", a.clone()), ("b", a)]).unwrap_err();
    assert_eq!(e.kind(), &E::CostExceeded(Cost::ValueDepth));
}

#[test]
fn fuzz_entry_points_accept_anything() {
    let inputs: &[&[u8]] = &[
        b"",
        b"\xff\xfe",
        b"1 + ",
        b"((((((((((",
        b"l.all(x, l.all(y, x + y > i))\x00\x01\x02\x03abcdef",
        b"s.matches('(a+)+$') && r.l.exists(x, x == s)\x00\x02",
        b"m.filter(k, m[k] + s > '')\x00\x01",
        b"d + d * d\x00\xff\xff\xff",
    ];
    for data in inputs {
        portswitch_query::fuzz_parse(data);
        portswitch_query::fuzz_eval(data);
    }
}
