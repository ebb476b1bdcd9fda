//! Evaluation: the reference predicate, every operator and function, loops, times,
//! Unicode regexes, and typed run-time errors with their positions.

mod common;

use common::{eval, eval_err, eval_in, eval_vars, flight, flight_schema, spanned, PREDICATE};
use portswitch_query::{Cost, EvalErrorKind as E, Limits, Map, Program, Schema, Type, Value};

fn int(i: i64) -> Value {
    Value::Int(i)
}

fn b(v: bool) -> Value {
    Value::Bool(v)
}

#[test]
fn reference_predicate_truth_table() {
    let typed = Program::compile(PREDICATE, &flight_schema(), &Limits::default()).unwrap();
    let untyped = Program::compile(PREDICATE, &Schema::new(), &Limits::default()).unwrap();
    for origin in ["MOW", "LED"] {
        for country in ["RU", "DE"] {
            for price in [99, 100, 250] {
                for adults in [1, 2] {
                    let want =
                        (origin == "MOW" || country == "RU") && (price >= 100 || adults == 1);
                    let record = flight(origin, country, price, adults);
                    for program in [&typed, &untyped] {
                        let mut bindings = program.bindings();
                        assert_eq!(bindings.set_from_map(&record), 4);
                        assert_eq!(
                            program.eval_bool(&bindings),
                            Ok(want),
                            "{origin} {country} {price} {adults}"
                        );
                        assert_eq!(program.eval(&bindings), Ok(Value::Bool(want)));
                    }
                }
            }
        }
    }
}

#[test]
fn reference_predicate_short_circuits() {
    // Country == "RU" is never read when the origin matches, nor Passengers when the
    // price does: missing fields there are not errors.
    let program = Program::compile(PREDICATE, &flight_schema(), &Limits::default()).unwrap();
    let record = flight("MOW", "DE", 150, 1);
    let segments = record.get("Segments").unwrap();
    let tickets = record.get("Tickets").unwrap();
    let mut bindings = program.bindings();
    bindings.set("Segments", segments);
    bindings.set("Tickets", tickets);
    assert_eq!(program.eval_bool(&bindings), Ok(true));
    // ...but an unbound variable that is read is an error naming it.
    let mut bindings = program.bindings();
    bindings.set("Segments", segments);
    let e = program.eval_bool(&bindings).unwrap_err();
    assert_eq!(e.kind(), &E::Unbound("Tickets".into()));
    assert_eq!(spanned(PREDICATE, e.span()), "Tickets");
}

#[test]
fn bindings_api() {
    let program = Program::compile("a + b", &Schema::new(), &Limits::default()).unwrap();
    assert_eq!(program.variables().collect::<Vec<_>>(), ["a", "b"]);
    let (one, two) = (int(1), int(2));
    let mut bindings = program.bindings();
    assert!(bindings.set("a", &one));
    assert!(!bindings.set("unused", &one));
    let b_slot = program.slot("b").unwrap();
    assert!(bindings.set_slot(b_slot, &two));
    assert_eq!(program.eval(&bindings), Ok(int(3)));
    bindings.clear();
    assert_eq!(
        program.eval(&bindings).unwrap_err().kind(),
        &E::Unbound("a".into())
    );
    assert_eq!(program.slot("c"), None);

    // Bindings and slots of another program are refused.
    let other = Program::compile("a + b", &Schema::new(), &Limits::default()).unwrap();
    let mut foreign = other.bindings();
    foreign.set("a", &one);
    foreign.set("b", &two);
    assert_eq!(
        program.eval(&foreign).unwrap_err().kind(),
        &E::ForeignBindings
    );
    let mut bindings = program.bindings();
    assert!(!bindings.set_slot(other.slot("b").unwrap(), &two));

    // A root record binds the variables it has keys for.
    let record: Map = [("a", int(40)), ("b", int(2)), ("c", int(0))]
        .into_iter()
        .collect();
    let mut bindings = program.bindings();
    assert_eq!(bindings.set_from_map(&record), 2);
    assert_eq!(program.eval(&bindings), Ok(int(42)));
}

#[test]
fn many_variables_spill_to_the_heap() {
    let names: Vec<String> = (0..20).map(|i| format!("v{i}")).collect();
    let program = Program::compile(&names.join(" + "), &Schema::new(), &Limits::default()).unwrap();
    let values: Vec<Value> = (0..20).map(int).collect();
    let mut bindings = program.bindings();
    for (n, v) in names.iter().zip(&values) {
        assert!(bindings.set(n, v));
    }
    assert_eq!(program.eval(&bindings), Ok(int(190)));
}

#[test]
fn integer_arithmetic() {
    assert_eq!(eval("1 + 2 * 3 - 4"), int(3));
    assert_eq!(eval("7 / 2"), int(3));
    assert_eq!(eval("-7 / 2"), int(-3));
    assert_eq!(eval("7 % 3"), int(1));
    assert_eq!(eval("-7 % 3"), int(-1));
    assert_eq!(eval("-(3)"), int(-3));
    assert_eq!(eval("0x10 + 1"), int(17));
    let big = [("x", int(i64::MAX)), ("y", int(i64::MIN)), ("z", int(0))];
    for (src, kind) in [
        ("x + 1", E::Overflow),
        ("y - 1", E::Overflow),
        ("x * 2", E::Overflow),
        ("-y", E::Overflow),
        ("y / -1", E::Overflow),
        ("y % -1", E::Overflow),
        ("1 / z", E::DivisionByZero),
        ("1 % z", E::DivisionByZero),
    ] {
        let e = eval_err(src, &big);
        assert_eq!(e.kind(), &kind, "{src}");
        assert_eq!(spanned(src, e.span()), src);
    }
}

#[test]
fn constant_errors_stay_where_they_are() {
    // `1 / 0` is not folded into a compile error: it fails only if reached.
    assert_eq!(eval("false && 1 / 0 == 1"), b(false));
    assert_eq!(eval("true ? 1 : 1 / 0"), int(1));
    let e = eval_err("1 + 1 / 0", &[]);
    assert_eq!(e.kind(), &E::DivisionByZero);
    assert_eq!(spanned("1 + 1 / 0", e.span()), "1 / 0");
}

#[test]
fn float_and_mixed_arithmetic() {
    assert_eq!(eval("1.5 + 2.25"), Value::Float(3.75));
    assert_eq!(eval("1 + 0.5"), Value::Float(1.5));
    assert_eq!(eval("3 / 2.0"), Value::Float(1.5));
    assert_eq!(eval("-1.5 * 2"), Value::Float(-3.0));
    assert_eq!(eval("1.0 / 0.0"), Value::Float(f64::INFINITY));
    assert_eq!(eval("2 * 3.0 == 6"), b(true));
}

#[test]
fn comparisons() {
    for (src, want) in [
        ("1 < 2", true),
        ("2 <= 2", true),
        ("3 > 4", false),
        ("1 == 1.0", true),
        ("1 < 1.5", true),
        ("9007199254740993 == 9007199254740992.0", false),
        ("9007199254740993 > 9007199254740992.0", true),
        ("'a' < 'b'", true),
        ("'Z' < 'a'", true),
        ("'ä' > 'z'", true),
        ("b'\\x01' < b'\\x02'", true),
        ("false < true", true),
        ("null == null", true),
        ("[1, [2, 'x']] == [1, [2, 'x']]", true),
        ("[1, 2] == [1, 2, 3]", false),
        ("[1] != [1.0]", false),
        ("{'a': 1, 'b': 2} == {'b': 2, 'a': 1}", true),
        ("{'a': 1} == {'a': 2}", false),
        (
            "timestamp('2024-01-01T00:00:00Z') < timestamp('2024-01-01T00:00:01Z')",
            true,
        ),
        ("duration('1h') == duration('60m')", true),
        ("duration('1h') > duration('59m59s')", true),
    ] {
        assert_eq!(eval(src), b(want), "{src}");
    }
    // NaN is unordered and unequal, even to itself.
    let nan = [("x", Value::Float(f64::NAN))];
    for src in ["x == x", "x < 1", "x >= 1", "x > x"] {
        assert_eq!(eval_vars(src, &nan), Ok(b(false)), "{src}");
    }
    assert_eq!(eval_vars("x != x", &nan), Ok(b(true)));
}

#[test]
fn dyn_values_of_different_kinds() {
    let vars = [("x", int(1)), ("s", Value::from("1"))];
    // Equality across kinds is false, not an error; there is no implicit conversion.
    assert_eq!(eval_vars("x == s", &vars), Ok(b(false)));
    assert_eq!(eval_vars("x != s", &vars), Ok(b(true)));
    assert_eq!(eval_vars("x == null", &vars), Ok(b(false)));
    // Ordering across kinds is a typed error at the comparison.
    let e = eval_err("x < s", &vars);
    assert_eq!(
        e.kind(),
        &E::NoOverload {
            operator: "<",
            operands: vec!["int", "string"]
        }
    );
    let e = eval_err("s + x", &vars);
    assert!(matches!(e.kind(), E::NoOverload { operator: "+", .. }));
    let e = eval_err("x && true", &vars);
    assert_eq!(
        e.kind(),
        &E::TypeMismatch {
            expected: "bool",
            found: "int"
        }
    );
    assert_eq!(spanned("x && true", e.span()), "x");
    let e = eval_err("x.field", &vars);
    assert_eq!(
        e.kind(),
        &E::TypeMismatch {
            expected: "map",
            found: "int"
        }
    );
}

#[test]
fn bindings_that_do_not_match_the_schema_fail_at_run_time() {
    let schema = Schema::new().with("n", Type::Int);
    let e = eval_in("n + 1 > 2", &schema, &[("n", Value::from("two"))]).unwrap_err();
    assert!(
        matches!(e.kind(), E::NoOverload { operator: "+", .. }),
        "{e}"
    );
    let e = eval_in("n > 2", &schema, &[("n", Value::from("two"))]).unwrap_err();
    assert!(
        matches!(e.kind(), E::NoOverload { operator: ">", .. }),
        "{e}"
    );
}

#[test]
fn strings() {
    assert_eq!(eval("'ab' + 'cd'"), Value::from("abcd"));
    assert_eq!(eval("size('äöü')"), int(3));
    assert_eq!(eval("'äöü'.size()"), int(3));
    assert_eq!(eval("size(b'\\xc3\\xa4')"), int(2));
    assert_eq!(eval("'hello'.contains('ell')"), b(true));
    assert_eq!(eval("'hello'.startsWith('he')"), b(true));
    assert_eq!(eval("'hello'.endsWith('lo')"), b(true));
    assert_eq!(eval("contains('hello', 'xyz')"), b(false));
    assert_eq!(eval("'ÄÖÜ Straße'.lower()"), Value::from("äöü straße"));
    assert_eq!(eval("'äöü straße'.upper()"), Value::from("ÄÖÜ STRASSE"));
    assert_eq!(eval("b'ab' + b'c'"), Value::bytes(&b"abc"[..]));
    let vars = [("s", Value::from("Москва"))];
    assert_eq!(
        eval_vars("s.startsWith('Мос') && size(s) == 6", &vars),
        Ok(b(true))
    );
}

#[test]
fn conversions() {
    assert_eq!(eval("int('42') + int(3.9) + int(-3.9)"), int(42));
    assert_eq!(eval("float('1.5') + float(1)"), Value::Float(2.5));
    assert_eq!(eval("string(1.5)"), Value::from("1.5"));
    assert_eq!(eval("string(-7)"), Value::from("-7"));
    assert_eq!(eval("string(true)"), Value::from("true"));
    assert_eq!(eval("string(b'abc')"), Value::from("abc"));
    assert_eq!(eval("bytes('ä')"), Value::bytes(&b"\xc3\xa4"[..]));
    assert_eq!(
        eval("string(timestamp('2024-05-01T12:00:00.250+02:00'))"),
        Value::from("2024-05-01T10:00:00.25Z")
    );
    assert_eq!(eval("string(duration('1h30m'))"), Value::from("5400s"));
    let vars = [("s", Value::from("4x2")), ("b", Value::bytes(&b"\xff"[..]))];
    for (src, fragment) in [
        ("int(s)", "is not an int"),
        ("float(s)", "is not a float"),
        ("timestamp(s)", "RFC 3339"),
        ("duration(s)", "is not a duration"),
        ("string(b)", "not UTF-8"),
    ] {
        let e = eval_err(src, &vars);
        assert!(
            matches!(e.kind(), E::InvalidArgument(m) if m.contains(fragment)),
            "{src}: {e}"
        );
    }
    let e = eval_err("int(x)", &[("x", Value::Float(1e19))]);
    assert!(matches!(e.kind(), E::InvalidArgument(_)), "{e}");
}

#[test]
fn times_and_durations() {
    let t = Value::timestamp("2024-02-28T23:30:00Z").unwrap();
    let vars = [("t", t)];
    for (src, want) in [
        (
            "t + duration('1h') == timestamp('2024-02-29T00:30:00Z')",
            true,
        ),
        (
            "t - duration('30m') == timestamp('2024-02-28T23:00:00Z')",
            true,
        ),
        (
            "timestamp('2024-03-01T00:00:00Z') - t == duration('24h30m')",
            true,
        ),
        ("duration('1h') + duration('30m') == duration('90m')", true),
        ("-duration('1s') < duration('0')", true),
        ("t > timestamp('1999-12-31T23:59:59Z')", true),
    ] {
        assert_eq!(eval_vars(src, &vars), Ok(b(want)), "{src}");
    }
    let e = eval_err(
        "t + duration('2562047h')",
        &[("t", Value::Time(i64::MAX - 1))],
    );
    assert_eq!(e.kind(), &E::Overflow);
}

#[test]
fn lists_and_membership() {
    let vars = [("l", Value::list([1, 2, 3])), ("i", int(5))];
    assert_eq!(eval_vars("l[0] + l[2]", &vars), Ok(int(4)));
    assert_eq!(eval_vars("l + [4]", &vars), Ok(Value::list([1, 2, 3, 4])));
    assert_eq!(eval_vars("size(l)", &vars), Ok(int(3)));
    assert_eq!(eval_vars("2 in l", &vars), Ok(b(true)));
    assert_eq!(eval_vars("2.0 in l", &vars), Ok(b(true)));
    assert_eq!(eval_vars("'2' in l", &vars), Ok(b(false)));
    assert_eq!(eval_vars("i in l", &vars), Ok(b(false)));
    assert_eq!(eval_vars("[i, 6][0]", &vars), Ok(int(5)));
    assert_eq!(eval_vars("[l, [i]][1][0]", &vars), Ok(int(5)));
    for src in ["l[3]", "l[i]", "l[-1]", "[i][1]"] {
        let e = eval_err(src, &vars);
        assert!(
            matches!(e.kind(), E::IndexOutOfRange { len: _, .. }),
            "{src}: {e}"
        );
        assert_eq!(spanned(src, e.span()), src);
    }
}

#[test]
fn maps_fields_and_has() {
    let record = Value::map([
        ("name", Value::from("x")),
        ("inner", Value::map([("n", 1)])),
    ]);
    let vars = [("r", record), ("k", Value::from("name"))];
    assert_eq!(eval_vars("r.name", &vars), Ok(Value::from("x")));
    assert_eq!(eval_vars("r['name']", &vars), Ok(Value::from("x")));
    assert_eq!(eval_vars("r[k]", &vars), Ok(Value::from("x")));
    assert_eq!(eval_vars("r.inner.n", &vars), Ok(int(1)));
    assert_eq!(
        eval_vars("'name' in r && !('nope' in r)", &vars),
        Ok(b(true))
    );
    assert_eq!(
        eval_vars("has(r.inner) && !has(r.nope)", &vars),
        Ok(b(true))
    );
    assert_eq!(eval_vars("has(r.inner.n)", &vars), Ok(b(true)));
    assert_eq!(eval_vars("size(r)", &vars), Ok(int(2)));
    assert_eq!(eval_vars("{k: 1, 'other': 2}.name", &vars), Ok(int(1)));
    assert_eq!(eval_vars("{'a': {'b': r.inner.n}}.a.b", &vars), Ok(int(1)));

    let src = "r.inner.missing + 1";
    let e = eval_err(src, &vars);
    assert_eq!(e.kind(), &E::NoSuchKey("missing".into()));
    assert_eq!(spanned(src, e.span()), "r.inner.missing");
    assert_eq!(
        e.to_string(),
        "1:1: no such key `missing`\n  | r.inner.missing + 1\n  | ^^^^^^^^^^^^^^^"
    );
    let e = eval_err("r[k + 'x']", &vars);
    assert_eq!(e.kind(), &E::NoSuchKey("namex".into()));
    let e = eval_err("{k: 1, 'name': 2}", &vars);
    assert_eq!(e.kind(), &E::DuplicateKey("name".into()));
}

#[test]
fn comprehensions() {
    let vars = [
        ("l", Value::list([1, 2, 3, 4])),
        ("m", Value::map([("a", 1), ("b", 2)])),
        ("e", Value::list(Vec::<Value>::new())),
        ("limit", int(2)),
    ];
    for (src, want) in [
        ("l.all(x, x > 0)", b(true)),
        ("l.all(x, x > 1)", b(false)),
        ("l.exists(x, x == 3)", b(true)),
        ("l.exists(x, x > 4)", b(false)),
        ("e.all(x, false)", b(true)),
        ("e.exists(x, true)", b(false)),
        ("l.map(x, x * 10)", Value::list([10, 20, 30, 40])),
        ("l.filter(x, x % 2 == 0)", Value::list([2, 4])),
        (
            "l.filter(x, x > limit).map(y, y - limit)",
            Value::list([1, 2]),
        ),
        ("m.map(k, k + '!')", Value::list(["a!", "b!"])),
        ("m.filter(k, m[k] > 1)", Value::list(["b"])),
        ("m.all(k, k in m)", b(true)),
        ("l.exists(x, l.exists(y, x + y == 7))", b(true)),
        ("l.all(x, l.filter(y, y == x).size() == 1)", b(true)),
        // The inner `x` shadows the outer one.
        ("l.all(x, [x * 2].all(x, x % 2 == 0))", b(true)),
        (
            "[[1, 2], [3]].map(p, p.map(q, q + 1))",
            Value::list([Value::list([2, 3]), Value::list([4])]),
        ),
        (
            "[{'n': 1}, {'n': 2}].map(r, r.n).filter(n, n > 1)",
            Value::list([2]),
        ),
        ("['a', 'bb'].map(s, size(s))", Value::list([1, 2])),
    ] {
        assert_eq!(eval_vars(src, &vars), Ok(want), "{src}");
    }
    // Short-circuit: the element after the decisive one is never evaluated.
    assert_eq!(
        eval_vars("[1, 0].all(x, x != 1 && 1 / x > 0)", &vars),
        Ok(b(false))
    );
    let e = eval_err("[1, 0].all(x, 1 / x > 0)", &vars);
    assert_eq!(e.kind(), &E::DivisionByZero);
    let e = eval_err("x.all(y, y)", &[("x", int(1))]);
    assert!(matches!(
        e.kind(),
        E::TypeMismatch {
            expected: "list or map",
            ..
        }
    ));
    let e = eval_err("x.all(y, y)", &[("x", Value::list([1]))]);
    assert!(matches!(
        e.kind(),
        E::TypeMismatch {
            expected: "bool",
            ..
        }
    ));
}

#[test]
fn ternary() {
    assert_eq!(eval("1 < 2 ? 'yes' : 'no'"), Value::from("yes"));
    assert_eq!(eval_vars("x ? 1 : 2", &[("x", b(false))]), Ok(int(2)));
    let e = eval_err("x ? 1 : 2", &[("x", int(0))]);
    assert!(matches!(
        e.kind(),
        E::TypeMismatch {
            expected: "bool",
            ..
        }
    ));
}

#[test]
fn unicode_regexes() {
    let vars = [
        ("greek", Value::from("αβγ")),
        ("mixed", Value::from("abc αβγ")),
        ("upper", Value::from("ÄÖÜ")),
        ("word", Value::from("Straße")),
        ("cyrillic", Value::from("Москва")),
    ];
    for (src, want) in [
        (r"greek.matches(r'^\p{Greek}+$')", true),
        (r"mixed.matches(r'^\p{Greek}+$')", false),
        (r"mixed.matches(r'\p{Greek}')", true),
        (r"upper.matches('(?i)^äöü$')", true),
        (r"upper.matches('^äöü$')", false),
        (r"word.matches(r'^\w+$')", true),
        (r"cyrillic.matches(r'^\p{Cyrillic}+$')", true),
        (r"cyrillic.matches('(?i)^москва$')", true),
        (r"matches(word, '^Stra(ß|ss)e$')", true),
        (r"'k'.matches('(?i)K')", true),
        // Case folding includes the Kelvin sign.
        (r"'\u212A'.matches('(?i)^k$')", true),
    ] {
        assert_eq!(eval_vars(src, &vars), Ok(b(want)), "{src}");
    }
    let e = eval_err("x.matches('a')", &[("x", int(1))]);
    assert!(matches!(
        e.kind(),
        E::NoOverload {
            operator: "matches",
            ..
        }
    ));
}

#[test]
fn eval_bool_requires_a_bool() {
    let program = Program::compile("1 + 1", &Schema::new(), &Limits::default()).unwrap();
    let e = program.eval_bool(&program.bindings()).unwrap_err();
    assert_eq!(
        e.kind(),
        &E::TypeMismatch {
            expected: "bool",
            found: "int"
        }
    );
}

#[test]
fn results_own_their_values() {
    let program = Program::compile("r.inner", &Schema::new(), &Limits::default()).unwrap();
    let result = {
        let record = Value::map([("inner", Value::list([1, 2]))]);
        let mut bindings = program.bindings();
        bindings.set("r", &record);
        program.eval(&bindings).unwrap()
    };
    assert_eq!(result, Value::list([1, 2]));
}

#[test]
fn programs_are_shareable_between_threads() {
    fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<Program>();
    let program = std::sync::Arc::new(
        Program::compile(PREDICATE, &flight_schema(), &Limits::default()).unwrap(),
    );
    let handles: Vec<_> = (0..4)
        .map(|i| {
            let program = program.clone();
            std::thread::spawn(move || {
                let record = flight(if i % 2 == 0 { "MOW" } else { "LED" }, "DE", 150, 2);
                let mut bindings = program.bindings();
                bindings.set_from_map(&record);
                (0..1000).all(|_| program.eval_bool(&bindings) == Ok(i % 2 == 0))
            })
        })
        .collect();
    for h in handles {
        assert!(h.join().unwrap());
    }
}

#[test]
fn memory_budget_error_is_typed() {
    let program = Program::compile(
        "s + s",
        &Schema::new(),
        &Limits {
            memory_bytes_max: 100,
            ..Limits::default()
        },
    )
    .unwrap();
    let s = Value::from("x".repeat(60));
    let mut bindings = program.bindings();
    bindings.set("s", &s);
    assert_eq!(
        program.eval(&bindings).unwrap_err().kind(),
        &E::CostExceeded(Cost::Memory)
    );
}

/// Arithmetic over numbers takes a fast path (plain numbers through the chain); over
/// anything else, or for integer division, the general one. Both must give the same
/// values and the same errors at the same spans.
#[test]
fn arithmetic_fast_and_general_paths_agree() {
    let vars = [
        ("x", int(7)),
        ("f", Value::Float(2.5)),
        ("s", Value::from("ab")),
        ("l", Value::list([1, 2])),
        ("m", Value::map([("n", 3)])),
    ];
    for (src, want) in [
        ("x * 2 + m.n - 1", int(16)),
        ("x * f + m.n", Value::Float(20.5)),
        ("(x + 1) / 2 * f", Value::Float(10.0)),
        ("x / 2 + x % 4", int(6)),
        ("s + \"c\" + s", Value::from("abcab")),
        ("l + [3]", Value::list([1, 2, 3])),
        ("size(s) * 3 + x", int(13)),
        ("-x * 2 + 1", int(-13)),
        ("x * 2 > 13 && f * 4.0 == 10.0", b(true)),
    ] {
        assert_eq!(eval_vars(src, &vars), Ok(want), "{src}");
    }
    for (src, kind, span) in [
        ("x * 2 + s", "no overload", "x * 2 + s"),
        ("m.n + m.k", "no such key", "m.k"),
        ("f % m.n", "no overload", "f % m.n"),
        ("x + x / (m.n - m.n)", "division by zero", "x / (m.n - m.n"),
    ] {
        let e = eval_err(src, &vars);
        assert!(e.to_string().contains(kind), "{src}: {e}");
        assert_eq!(spanned(src, e.span()), span, "{src}");
    }
}
