//! portswitch-query against cel (cel-rust), evalexpr, rhai and jaq (jq) on three
//! predicates over the same records, one thread.
//!
//! * The records: `RECORDS` flight searches made by a fixed linear congruential
//!   generator, the same for every library, each converted to the library's own value
//!   type before anything is timed. Evaluation `i` reads record `i % RECORDS`.
//! * Before timing, every library evaluates every predicate on every record and must give
//!   our answer (a mismatch is a bug in the translation and stops the run).
//! * Compiled once, outside the timing, for every library: the program (parsed, checked,
//!   compiled) and every regex that the library lets its user compile once.
//! * Per evaluation, what each library is given (the cheapest way it offers to bind the
//!   variables of one record):
//!   - ours: new `Bindings` (on the stack), each variable the program reads set by slot to
//!     a reference into the prebuilt record (no clone, no reference count);
//!   - cel: a new `Context` on the shared `Env` (one `Arc` clone), with a
//!     `VariableResolver` that hands out borrowed prebuilt values by name;
//!   - evalexpr: a new context struct (implementing `evalexpr::Context`) that returns
//!     references into the prebuilt record by name; evalexpr has no maps or lists, so the
//!     record's fields it needs are flattened into scalar variables
//!     (`Tickets_0_Prices_oneway_Value`): no path is walked, which favours it;
//!   - rhai: one `Scope` made once with the variables' names; each variable the predicate
//!     reads is overwritten with the record's shared value (a reference-count increment:
//!     a fresh `Scope` would allocate names, and an unshared map would be deep-copied);
//!   - jaq: a new `Ctx` and the record as the filter's input (one reference-count
//!     increment).
//! * Regex: cel-rust's `matches` and evalexpr's `str::regex_matches` compile the pattern
//!   on every call; their `*-precompiled` rows call the same regex crate through a
//!   function the caller registers, compiled once. rhai has no regex; jaq's (`test`, by
//!   regex-bites) has no Unicode classes or case folding: both are left out of that row.

use std::hint::black_box;
use std::sync::Arc;
use std::time::Duration;

use criterion::measurement::WallTime;
use criterion::{criterion_group, criterion_main, BenchmarkGroup, Criterion};

/// Records, cycled.
const RECORDS: usize = 1024;

/// The three predicates in our language.
const COMPARISON: &str = r#"(Segments[0].Origin == "MOW" || Country == "RU") && (Tickets[0].Prices["oneway"].Value >= 100 || Passengers.Adults == 1)"#;
const REGEX: &str = r#"Name.matches("(?i)^иван\\p{L}*$")"#;
const ARITHMETIC: &str = r#"Passengers.Adults * 2 + Passengers.Children * 1.5 - Tickets[0].Prices["oneway"].Value / 10.0 > -5.0"#;

/// The regex, as the regex crate reads it: a Unicode letter class and Unicode case
/// folding (`ИВАН` matches, `Иван-Грозный` does not).
const PATTERN: &str = r"(?i)^иван\p{L}*$";

/// One record, in plain Rust, from which every library's value is made.
struct Record {
    name: String,
    country: String,
    /// Origins of the segments (one or two).
    origins: Vec<String>,
    /// Price of the one-way fare; the round trip is twice it.
    price: i64,
    adults: i64,
    children: i64,
    infants: i64,
}

fn records() -> Vec<Record> {
    const NAMES: [&str; 12] = [
        "Иван",
        "ИВАН",
        "иванов",
        "Иванович",
        "ИВАНОВА",
        "Иван-Грозный",
        "Ivan",
        "Пётр",
        "Ivanov",
        "иван2",
        "Мария",
        "ИВАНЁ",
    ];
    const COUNTRIES: [&str; 4] = ["RU", "DE", "KZ", "AM"];
    const AIRPORTS: [&str; 5] = ["MOW", "LED", "AER", "KZN", "SVX"];
    let mut state: u64 = 0x2545_f491_4f6c_dd1d;
    let mut next = |n: u64| {
        state = state
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        ((state >> 33) % n) as usize
    };
    (0..RECORDS)
        .map(|_| {
            let segments = 1 + next(2);
            Record {
                name: NAMES[next(NAMES.len() as u64)].to_owned(),
                country: COUNTRIES[next(4)].to_owned(),
                origins: (0..segments)
                    .map(|_| AIRPORTS[next(5)].to_owned())
                    .collect(),
                price: 20 + next(281) as i64,
                adults: 1 + next(4) as i64,
                children: next(4) as i64,
                infants: next(2) as i64,
            }
        })
        .collect()
}

/// Which predicate.
#[derive(Clone, Copy, PartialEq)]
enum Pred {
    Comparison,
    Regex,
    Arithmetic,
}

const PREDS: [(Pred, &str); 3] = [
    (Pred::Comparison, "comparison"),
    (Pred::Regex, "regex"),
    (Pred::Arithmetic, "arithmetic"),
];

/// What is done with each library's evaluator of a predicate: checked, or timed.
/// `visit(lib, eval)` gets `eval(i)`, which evaluates the predicate on record `i`
/// (already converted); ours comes first.
trait Visit {
    fn visit<F: FnMut(usize) -> bool>(&mut self, lib: &str, eval: F);
    /// A library that cannot express the predicate, and why.
    fn missing(&mut self, why: String);
}

mod ours {
    use portswitch_query::{Limits, Program, Schema, Slot, Type, Value};

    use super::{Pred, Record};

    /// A record as our values, by variable.
    pub struct Rec {
        vars: [Value; 5],
    }

    pub const NAMES: [&str; 5] = ["Segments", "Country", "Tickets", "Passengers", "Name"];

    pub fn convert(r: &Record) -> Rec {
        let segments = Value::list(r.origins.iter().map(|o| {
            Value::map([
                ("Origin", Value::from(o.as_str())),
                ("Destination", Value::from("LED")),
                ("Carrier", Value::from("SU")),
            ])
        }));
        let price = |v: i64| Value::map([("Value", Value::Int(v)), ("Currency", "RUB".into())]);
        let tickets = Value::list([Value::map([(
            "Prices",
            Value::map([
                ("oneway", price(r.price)),
                ("roundtrip", price(r.price * 2)),
            ]),
        )])]);
        let passengers = Value::map([
            ("Adults", r.adults),
            ("Children", r.children),
            ("Infants", r.infants),
        ]);
        Rec {
            vars: [
                segments,
                Value::from(r.country.as_str()),
                tickets,
                passengers,
                Value::from(r.name.as_str()),
            ],
        }
    }

    /// The schema a caller who knows the records declares.
    pub fn typed() -> Schema {
        let price = Type::record([("Value", Type::Int), ("Currency", Type::String)]);
        Schema::new()
            .with(
                "Segments",
                Type::list(Type::record([
                    ("Origin", Type::String),
                    ("Destination", Type::String),
                    ("Carrier", Type::String),
                ])),
            )
            .with("Country", Type::String)
            .with(
                "Tickets",
                Type::list(Type::record([("Prices", Type::map(price))])),
            )
            .with(
                "Passengers",
                Type::record([
                    ("Adults", Type::Int),
                    ("Children", Type::Int),
                    ("Infants", Type::Int),
                ]),
            )
            .with("Name", Type::String)
            .declared_only()
    }

    /// Nothing declared: every variable is `dyn`, checked while evaluating.
    pub fn dynamic() -> Schema {
        Schema::new()
    }

    pub fn source(p: Pred) -> &'static str {
        match p {
            Pred::Comparison => super::COMPARISON,
            Pred::Regex => super::REGEX,
            Pred::Arithmetic => super::ARITHMETIC,
        }
    }

    pub fn compile(p: Pred, schema: &Schema) -> (Program, Vec<(Slot, usize)>) {
        let program = Program::compile(source(p), schema, &Limits::default())
            .unwrap_or_else(|e| panic!("ours: {e}"));
        let slots = NAMES
            .iter()
            .enumerate()
            .filter_map(|(i, n)| program.slot(n).map(|s| (s, i)))
            .collect();
        (program, slots)
    }

    #[inline]
    pub fn eval(program: &Program, slots: &[(Slot, usize)], r: &Rec) -> bool {
        let mut b = program.bindings();
        for &(slot, i) in slots {
            b.set_slot(slot, &r.vars[i]);
        }
        program.eval_bool(&b).expect("ours: evaluation failed")
    }
}

mod cel_peer {
    use std::collections::HashMap;
    use std::sync::{Arc, LazyLock};

    use cel::common::types::{CelBool, CelString, STRING_TYPE};
    use cel::common::value::{CowVal, Val};
    use cel::context::VariableResolver;
    use cel::{Context, Env, ExecutionError, Program, Value};

    use super::{Pred, Record};

    /// A record as cel values, by variable, resolved by name and lent out.
    pub struct Rec {
        segments: Box<dyn Val>,
        country: Box<dyn Val>,
        tickets: Box<dyn Val>,
        passengers: Box<dyn Val>,
        name: Box<dyn Val>,
    }

    impl VariableResolver for Rec {
        fn resolve<'b>(&'b self, variable: &str) -> Option<CowVal<'b, 'b>> {
            let v = match variable {
                "Segments" => &self.segments,
                "Country" => &self.country,
                "Tickets" => &self.tickets,
                "Passengers" => &self.passengers,
                "Name" => &self.name,
                _ => return None,
            };
            Some(CowVal::Borrowed(v.as_ref()))
        }
    }

    fn val(v: Value) -> Box<dyn Val> {
        Box::<dyn Val>::try_from(v).expect("cel: value conversion")
    }

    fn map(entries: impl IntoIterator<Item = (&'static str, Value)>) -> Value {
        Value::from(entries.into_iter().collect::<HashMap<_, _>>())
    }

    pub fn convert(r: &Record) -> Rec {
        let segments: Vec<Value> = r
            .origins
            .iter()
            .map(|o| {
                map([
                    ("Origin", Value::from(o.as_str())),
                    ("Destination", Value::from("LED")),
                    ("Carrier", Value::from("SU")),
                ])
            })
            .collect();
        let price = |v: i64| map([("Value", Value::Int(v)), ("Currency", Value::from("RUB"))]);
        let tickets = vec![map([(
            "Prices",
            map([
                ("oneway", price(r.price)),
                ("roundtrip", price(r.price * 2)),
            ]),
        )])];
        let passengers = map([
            ("Adults", Value::Int(r.adults)),
            ("Children", Value::Int(r.children)),
            ("Infants", Value::Int(r.infants)),
        ]);
        Rec {
            segments: val(Value::from(segments)),
            country: val(Value::from(r.country.as_str())),
            tickets: val(Value::from(tickets)),
            passengers: val(passengers),
            name: val(Value::from(r.name.as_str())),
        }
    }

    static NAME_RE: LazyLock<regex::Regex> =
        LazyLock::new(|| regex::Regex::new(super::PATTERN).expect("regex"));

    /// `nameMatches(s)`: the predicate's regex, compiled once (CEL's own `matches`
    /// compiles its pattern on every call in cel-rust).
    fn name_matches<'b, 'v>(args: Vec<CowVal<'b, 'v>>) -> Result<CowVal<'b, 'v>, ExecutionError> {
        let s = args
            .first()
            .and_then(|a| a.downcast_ref::<CelString>())
            .ok_or_else(|| ExecutionError::function_error("nameMatches", "not a string"))?;
        Ok(CowVal::owned(CelBool::from(NAME_RE.is_match(s.inner()))))
    }

    pub fn env() -> Arc<Env> {
        let mut env = Env::stdlib();
        env.add_overload(
            "nameMatches",
            "nameMatches_string",
            vec![STRING_TYPE],
            name_matches,
        )
        .expect("cel: overload");
        Arc::new(env)
    }

    /// CEL has no implicit int/double conversion: the arithmetic converts explicitly.
    pub fn source(p: Pred, builtin_regex: bool) -> &'static str {
        match p {
            Pred::Comparison => super::COMPARISON,
            Pred::Regex if builtin_regex => super::REGEX,
            Pred::Regex => "nameMatches(Name)",
            Pred::Arithmetic => {
                r#"double(Passengers.Adults) * 2.0 + double(Passengers.Children) * 1.5 - double(Tickets[0].Prices["oneway"].Value) / 10.0 > -5.0"#
            }
        }
    }

    pub fn compile(env: &Env, src: &str) -> Program {
        env.compile(src).unwrap_or_else(|e| panic!("cel: {e}"))
    }

    #[inline]
    pub fn eval(env: &Arc<Env>, program: &Program, r: &Rec) -> bool {
        let mut ctx = Context::with_env(Arc::clone(env));
        ctx.set_variable_resolver(r);
        match program.execute(&ctx) {
            Ok(Value::Bool(b)) => b,
            other => panic!("cel: {other:?}"),
        }
    }
}

mod evalexpr_peer {
    use evalexpr::{
        build_operator_tree, Context, DefaultNumericTypes, EvalexprError, EvalexprResult, Node,
        Value,
    };

    use super::{Pred, Record};

    /// A record as evalexpr values. evalexpr has no maps and no lists: the fields the
    /// predicates read are flattened into variables.
    pub struct Rec {
        segments_0_origin: Value,
        country: Value,
        tickets_0_prices_oneway_value: Value,
        passengers_adults: Value,
        passengers_children: Value,
        name: Value,
    }

    pub fn convert(r: &Record) -> Rec {
        Rec {
            segments_0_origin: Value::from(r.origins[0].as_str()),
            country: Value::from(r.country.as_str()),
            tickets_0_prices_oneway_value: Value::from_int(r.price),
            passengers_adults: Value::from_int(r.adults),
            passengers_children: Value::from_int(r.children),
            name: Value::from(r.name.as_str()),
        }
    }

    /// The context of one evaluation: lends the record's values by name; knows one
    /// function of its own, `name_matches`, with the regex compiled once.
    pub struct Ctx<'a> {
        pub rec: &'a Rec,
        pub re: &'a regex::Regex,
    }

    impl Context for Ctx<'_> {
        type NumericTypes = DefaultNumericTypes;

        fn get_value(&self, identifier: &str) -> Option<&Value> {
            let r = self.rec;
            Some(match identifier {
                "Segments_0_Origin" => &r.segments_0_origin,
                "Country" => &r.country,
                "Tickets_0_Prices_oneway_Value" => &r.tickets_0_prices_oneway_value,
                "Passengers_Adults" => &r.passengers_adults,
                "Passengers_Children" => &r.passengers_children,
                "Name" => &r.name,
                _ => return None,
            })
        }

        fn call_function(&self, identifier: &str, argument: &Value) -> EvalexprResult<Value> {
            match (identifier, argument) {
                ("name_matches", Value::String(s)) => Ok(Value::Boolean(self.re.is_match(s))),
                _ => Err(EvalexprError::FunctionIdentifierNotFound(
                    identifier.to_owned(),
                )),
            }
        }

        fn are_builtin_functions_disabled(&self) -> bool {
            false
        }

        fn set_builtin_functions_disabled(&mut self, _: bool) -> EvalexprResult<()> {
            Err(EvalexprError::ContextNotMutable)
        }
    }

    pub fn source(p: Pred, builtin_regex: bool) -> &'static str {
        match p {
            Pred::Comparison => {
                r#"(Segments_0_Origin == "MOW" || Country == "RU") && (Tickets_0_Prices_oneway_Value >= 100 || Passengers_Adults == 1)"#
            }
            Pred::Regex if builtin_regex => r#"str::regex_matches(Name, "(?i)^иван\\p{L}*$")"#,
            Pred::Regex => "name_matches(Name)",
            Pred::Arithmetic => {
                "Passengers_Adults * 2 + Passengers_Children * 1.5 - Tickets_0_Prices_oneway_Value / 10.0 > -5.0"
            }
        }
    }

    pub fn compile(src: &str) -> Node {
        build_operator_tree(src).unwrap_or_else(|e| panic!("evalexpr: {e}"))
    }

    #[inline]
    pub fn eval(node: &Node, ctx: &Ctx<'_>) -> bool {
        node.eval_boolean_with_context(ctx)
            .unwrap_or_else(|e| panic!("evalexpr: {e}"))
    }
}

mod rhai_peer {
    use rhai::{Array, Dynamic, Engine, Map, Scope, AST};

    use super::{Pred, Record};

    /// A record as shared rhai values (cloning one is a reference-count increment).
    pub struct Rec {
        vars: [Dynamic; 4],
    }

    pub const NAMES: [&str; 4] = ["Segments", "Country", "Tickets", "Passengers"];

    fn map(entries: impl IntoIterator<Item = (&'static str, Dynamic)>) -> Dynamic {
        Dynamic::from_map(
            entries
                .into_iter()
                .map(|(k, v)| (k.into(), v))
                .collect::<Map>(),
        )
    }

    pub fn convert(r: &Record) -> Rec {
        let segments: Array = r
            .origins
            .iter()
            .map(|o| {
                map([
                    ("Origin", Dynamic::from(o.clone())),
                    ("Destination", Dynamic::from("LED")),
                    ("Carrier", Dynamic::from("SU")),
                ])
            })
            .collect();
        let price = |v: i64| {
            map([
                ("Value", Dynamic::from_int(v)),
                ("Currency", Dynamic::from("RUB")),
            ])
        };
        let tickets: Array = vec![map([(
            "Prices",
            map([
                ("oneway", price(r.price)),
                ("roundtrip", price(r.price * 2)),
            ]),
        )])];
        let passengers = map([
            ("Adults", Dynamic::from_int(r.adults)),
            ("Children", Dynamic::from_int(r.children)),
            ("Infants", Dynamic::from_int(r.infants)),
        ]);
        Rec {
            vars: [
                Dynamic::from_array(segments).into_shared(),
                Dynamic::from(r.country.clone()).into_shared(),
                Dynamic::from_array(tickets).into_shared(),
                passengers.into_shared(),
            ],
        }
    }

    /// rhai has no regular expressions: no regex predicate.
    pub fn source(p: Pred) -> Option<&'static str> {
        match p {
            Pred::Comparison => Some(super::COMPARISON),
            Pred::Regex => None,
            Pred::Arithmetic => Some(super::ARITHMETIC),
        }
    }

    pub struct Compiled {
        pub ast: AST,
        /// Indices into `NAMES` of the variables the predicate reads.
        pub reads: Vec<usize>,
    }

    pub fn compile(engine: &Engine, src: &str) -> Compiled {
        let ast = engine
            .compile_expression(src)
            .unwrap_or_else(|e| panic!("rhai: {e}"));
        let reads = (0..NAMES.len())
            .filter(|&i| src.contains(NAMES[i]))
            .collect();
        Compiled { ast, reads }
    }

    /// The scope, made once, with every variable present.
    pub fn scope() -> Scope<'static> {
        let mut s = Scope::new();
        for n in NAMES {
            s.push_dynamic(n, Dynamic::UNIT);
        }
        s
    }

    #[inline]
    pub fn eval(engine: &Engine, c: &Compiled, scope: &mut Scope<'_>, r: &Rec) -> bool {
        for &i in &c.reads {
            *scope.get_mut(NAMES[i]).expect("rhai: scope") = r.vars[i].clone();
        }
        engine
            .eval_ast_with_scope::<bool>(scope, &c.ast)
            .unwrap_or_else(|e| panic!("rhai: {e}"))
    }
}

mod jaq_peer {
    use jaq_core::load::{Arena, File, Loader};
    use jaq_core::{data, unwrap_valr, Compiler, Ctx, Filter, Vars};
    use jaq_json::{Map, Val};

    use super::{Pred, Record};

    pub type Data = data::JustLut<Val>;

    fn s(s: &str) -> Val {
        Val::from(s.to_owned())
    }

    fn obj(entries: impl IntoIterator<Item = (&'static str, Val)>) -> Val {
        let mut m = Map::default();
        for (k, v) in entries {
            m.insert(s(k), v);
        }
        Val::obj(m)
    }

    fn int(i: i64) -> Val {
        Val::from(isize::try_from(i).expect("jaq: int"))
    }

    /// A record as one jq object, the filter's input.
    pub fn convert(r: &Record) -> Val {
        let segments: Val = r
            .origins
            .iter()
            .map(|o| {
                obj([
                    ("Origin", s(o)),
                    ("Destination", s("LED")),
                    ("Carrier", s("SU")),
                ])
            })
            .collect();
        let price = |v: i64| obj([("Value", int(v)), ("Currency", s("RUB"))]);
        let tickets: Val = [obj([(
            "Prices",
            obj([
                ("oneway", price(r.price)),
                ("roundtrip", price(r.price * 2)),
            ]),
        )])]
        .into_iter()
        .collect();
        obj([
            ("Segments", segments),
            ("Country", s(&r.country)),
            ("Tickets", tickets),
            (
                "Passengers",
                obj([
                    ("Adults", int(r.adults)),
                    ("Children", int(r.children)),
                    ("Infants", int(r.infants)),
                ]),
            ),
            ("Name", s(&r.name)),
        ])
    }

    pub fn source(p: Pred) -> &'static str {
        match p {
            Pred::Comparison => {
                r#"(.Segments[0].Origin == "MOW" or .Country == "RU") and (.Tickets[0].Prices.oneway.Value >= 100 or .Passengers.Adults == 1)"#
            }
            Pred::Regex => r#".Name | test("^иван\\p{L}*$"; "i")"#,
            Pred::Arithmetic => {
                ".Passengers.Adults * 2 + .Passengers.Children * 1.5 - .Tickets[0].Prices.oneway.Value / 10.0 > -5.0"
            }
        }
    }

    pub fn compile(src: &str) -> Filter<Data> {
        let defs = jaq_core::defs()
            .chain(jaq_std::defs())
            .chain(jaq_json::defs());
        let funs = jaq_core::funs()
            .chain(jaq_std::funs())
            .chain(jaq_json::funs());
        let loader = Loader::new(defs);
        let arena = Arena::default();
        let modules = loader
            .load(
                &arena,
                File {
                    code: src,
                    path: (),
                },
            )
            .unwrap_or_else(|e| panic!("jaq: {e:?}"));
        Compiler::default()
            .with_funs(funs)
            .compile(modules)
            .unwrap_or_else(|e| panic!("jaq: {e:?}"))
    }

    /// Runs the filter on `input`: its first output, which must be a boolean.
    #[inline]
    pub fn try_eval(filter: &Filter<Data>, input: &Val) -> Result<bool, String> {
        let ctx = Ctx::<Data>::new(&filter.lut, Vars::new([]));
        match filter.id.run((ctx, input.clone())).map(unwrap_valr).next() {
            Some(Ok(Val::Bool(b))) => Ok(b),
            other => Err(format!("{other:?}")),
        }
    }
}

/// Hands every library's evaluator of predicate `p` to `v`, ours first.
fn evaluators(p: Pred, w: &World, v: &mut impl Visit) {
    let n = RECORDS;

    let (prog, slots) = ours::compile(p, &ours::typed());
    v.visit("ours", |i| ours::eval(&prog, &slots, &w.ours[i % n]));
    let (prog, slots) = ours::compile(p, &ours::dynamic());
    v.visit("ours-dyn", |i| ours::eval(&prog, &slots, &w.ours[i % n]));

    let env = &w.cel_env;
    let builtin = cel_peer::compile(env, cel_peer::source(p, true));
    v.visit("cel", |i| cel_peer::eval(env, &builtin, &w.cel[i % n]));
    if p == Pred::Regex {
        let custom = cel_peer::compile(env, cel_peer::source(p, false));
        v.visit("cel-precompiled", |i| {
            cel_peer::eval(env, &custom, &w.cel[i % n])
        });
    }

    let re = &w.regex;
    let node = evalexpr_peer::compile(evalexpr_peer::source(p, true));
    v.visit("evalexpr", |i| {
        let ctx = evalexpr_peer::Ctx {
            rec: &w.evalexpr[i % n],
            re,
        };
        evalexpr_peer::eval(&node, &ctx)
    });
    if p == Pred::Regex {
        let node = evalexpr_peer::compile(evalexpr_peer::source(p, false));
        v.visit("evalexpr-precompiled", |i| {
            let ctx = evalexpr_peer::Ctx {
                rec: &w.evalexpr[i % n],
                re,
            };
            evalexpr_peer::eval(&node, &ctx)
        });
    }

    match rhai_peer::source(p) {
        Some(src) => {
            let engine = &w.rhai_engine;
            let compiled = rhai_peer::compile(engine, src);
            let mut scope = rhai_peer::scope();
            v.visit("rhai", |i| {
                rhai_peer::eval(engine, &compiled, &mut scope, &w.rhai[i % n])
            });
        }
        None => v.missing("rhai: no regular expressions in the language or its packages".into()),
    }

    let filter = jaq_peer::compile(jaq_peer::source(p));
    match jaq_peer::try_eval(&filter, &w.jaq[0]) {
        Ok(_) => v.visit("jaq", |i| {
            jaq_peer::try_eval(&filter, &w.jaq[i % n]).unwrap_or_else(|e| panic!("jaq: {e}"))
        }),
        Err(e) => v.missing(format!(
            "jaq: `{}` fails: {e} (jaq-std's regex engine, regex-bites, has no \\p{{..}} \
             classes and no Unicode case folding)",
            jaq_peer::source(p)
        )),
    }
}

/// Every library's records, converted before anything is timed.
struct World {
    ours: Vec<ours::Rec>,
    cel: Vec<cel_peer::Rec>,
    cel_env: Arc<cel::Env>,
    evalexpr: Vec<evalexpr_peer::Rec>,
    regex: regex::Regex,
    rhai: Vec<rhai_peer::Rec>,
    rhai_engine: rhai::Engine,
    jaq: Vec<jaq_json::Val>,
}

fn world() -> World {
    let records = records();
    World {
        ours: records.iter().map(ours::convert).collect(),
        cel: records.iter().map(cel_peer::convert).collect(),
        cel_env: cel_peer::env(),
        evalexpr: records.iter().map(evalexpr_peer::convert).collect(),
        regex: regex::Regex::new(PATTERN).expect("regex"),
        rhai: records.iter().map(rhai_peer::convert).collect(),
        rhai_engine: rhai::Engine::new(),
        jaq: records.iter().map(jaq_peer::convert).collect(),
    }
}

/// Every evaluator must give our answer on every record.
struct Check {
    name: &'static str,
    want: Option<Vec<bool>>,
    agree: Vec<String>,
}

impl Visit for Check {
    fn visit<F: FnMut(usize) -> bool>(&mut self, lib: &str, mut eval: F) {
        let got: Vec<bool> = (0..RECORDS).map(&mut eval).collect();
        match &self.want {
            None => self.want = Some(got),
            Some(want) => {
                if let Some(i) = (0..RECORDS).find(|&i| got[i] != want[i]) {
                    panic!(
                        "{}: {lib} says {} on record {i}, ours {}",
                        self.name, got[i], want[i]
                    );
                }
            }
        }
        self.agree.push(lib.to_owned());
    }

    fn missing(&mut self, why: String) {
        eprintln!("check {}: left out: {why}", self.name);
    }
}

/// Times every evaluator.
struct Time<'c, 'g>(&'g mut BenchmarkGroup<'c, WallTime>);

impl Visit for Time<'_, '_> {
    fn visit<F: FnMut(usize) -> bool>(&mut self, lib: &str, mut eval: F) {
        let mut i = 0usize;
        self.0.bench_function(lib, |b| {
            b.iter(|| {
                i = i.wrapping_add(1);
                eval(black_box(i))
            })
        });
    }

    fn missing(&mut self, _: String) {}
}

fn bench(c: &mut Criterion) {
    let w = &world();
    // Every check before any timing.
    for (p, name) in PREDS {
        let mut check = Check {
            name,
            want: None,
            agree: Vec::new(),
        };
        evaluators(p, w, &mut check);
        let trues = check.want.iter().flatten().filter(|&&b| b).count();
        eprintln!(
            "check {name}: {} agree on all {RECORDS} records ({trues} true)",
            check.agree.join(", ")
        );
    }
    for (p, name) in PREDS {
        let mut group = c.benchmark_group(name);
        evaluators(p, w, &mut Time(&mut group));
        group.finish();
    }
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .sample_size(30)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3));
    targets = bench
}
criterion_main!(benches);
