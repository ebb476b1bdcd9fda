//! The invariant cel-go lost a 60x slowdown to when it broke silently: a regex literal is
//! compiled once, when the program is compiled, and never during evaluation.

mod common;

use common::{flight, flight_schema};
use portswitch_query::{regex_compilations, Limits, Program};

#[test]
fn evaluation_compiles_no_regex() {
    let src = "Country.matches('^(RU|BY)$') || Segments.exists(s, s.Origin.matches('(?i)^mow$'))";
    let before = regex_compilations();
    let program = Program::compile(src, &flight_schema(), &Limits::default()).unwrap();
    assert_eq!(regex_compilations() - before, 2, "one per literal");
    assert_eq!(program.regexes_compiled(), 2);

    let compiled = regex_compilations();
    let records = [
        flight("MOW", "DE", 100, 1),
        flight("LED", "RU", 100, 1),
        flight("LED", "DE", 100, 1),
        flight("mow", "FR", 100, 1),
    ];
    let mut matched = 0;
    for i in 0..1_000 {
        let mut b = program.bindings();
        b.set_from_map(&records[i % 4]);
        matched += usize::from(program.eval_bool(&b).unwrap());
    }
    assert_eq!(matched, 750);
    assert_eq!(
        regex_compilations(),
        compiled,
        "evaluation compiled a regex"
    );
}

#[test]
fn a_regex_in_a_loop_body_is_compiled_once_not_per_iteration() {
    let before = regex_compilations();
    let program = Program::compile(
        "names.all(n, n.matches(r'^\\p{Lu}\\p{Ll}+$'))",
        &portswitch_query::Schema::new(),
        &Limits::default(),
    )
    .unwrap();
    assert_eq!(regex_compilations() - before, 1);
    let names = portswitch_query::Value::list(["Anna", "Émile", "Ωmega", "Zoë"]);
    let compiled = regex_compilations();
    let mut b = program.bindings();
    b.set("names", &names);
    assert_eq!(program.eval_bool(&b), Ok(true));
    assert_eq!(regex_compilations(), compiled);
}

#[test]
fn constant_folding_does_not_hide_a_compilation() {
    // A match on a literal is folded at compile time: still one compilation, made while
    // compiling.
    let before = regex_compilations();
    let program =
        Program::compile("'abc'.matches('b')", &flight_schema(), &Limits::default()).unwrap();
    assert_eq!(regex_compilations() - before, 1);
    let compiled = regex_compilations();
    assert_eq!(program.eval_bool(&program.bindings()), Ok(true));
    assert_eq!(regex_compilations(), compiled);
}
