//! portswitch query: one typed expression language over the platform's records.
//!
//! Queries are side-effect-free expressions in the style of CEL over nested values
//! (maps, lists, strings, numbers, bytes, times): arithmetic, comparison, boolean logic,
//! membership, list comprehensions, string functions and Unicode regular expressions. A
//! query is compiled once — parsed, type-checked against a [`Schema`], folded, its
//! regexes compiled — into a [`Program`] that evaluates many times, from any thread,
//! without allocating on the common path.
//!
//! ```
//! use portswitch_query::{Limits, Program, Schema, Type, Value};
//!
//! let schema = Schema::new()
//!     .with("Country", Type::String)
//!     .with("Passengers", Type::record([("Adults", Type::Int)]));
//! let program = Program::compile(
//!     r#"Country == "RU" || Passengers.Adults == 1"#,
//!     &schema,
//!     &Limits::default(),
//! )?;
//!
//! let country = Value::from("DE");
//! let passengers = Value::map([("Adults", 1)]);
//! let mut bindings = program.bindings();
//! bindings.set("Country", &country);
//! bindings.set("Passengers", &passengers);
//! assert!(program.eval_bool(&bindings)?);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! # The language
//!
//! * Literals: `null`, `true`, `42`, `0x2a`, `1.5e3`, `"text"`, `'text'` (C escapes),
//!   `r"raw"`, `b"bytes"`, lists `[a, b]`, maps `{"k": v}`.
//! * Operators, loosest first: `?:`; `||`; `&&`; `< <= > >= == != in`; `+ -`; `* / %`;
//!   `! -` (prefix); `.field`, `[index]`, `.method(…)`.
//! * Functions (also callable as methods on their first argument): `size`, `contains`,
//!   `startsWith`, `endsWith`, `matches` (Unicode regex; literal pattern), `lower`,
//!   `upper`, `int`, `float`, `string`, `bytes`, `timestamp` (RFC 3339), `duration`
//!   (`"1h30m"`).
//! * Macros: `list.all(x, p)`, `list.exists(x, p)`, `list.map(x, e)`,
//!   `list.filter(x, p)` (over a map, `x` ranges over its keys), and `has(a.b)`.
//!
//! # Layout
//!
//! A query goes through `lexer` and `parser` to an [`ast::Expr`]; `check` types it and
//! resolves names; `compile` lowers it to the evaluable tree of `eval`, which [`Program`]
//! runs with [`Bindings`]. [`limits`] names every bound, [`value`] the data model and its
//! equality and ordering rules.
//!
//! # Hostile input
//!
//! Queries may come from any client. Nothing a query can say makes the library panic,
//! recurse without bound, or run without bound: source length, nodes, nesting depth and
//! regex program size are limited when compiling; steps and memory while evaluating.
//! Each refusal is a typed error ([`CompileErrorKind`], [`EvalErrorKind`]) with the
//! position in the source. [`fuzz_parse`] and [`fuzz_eval`] are the fuzzers' entry points.
//!
//! # Differences from CEL
//!
//! No unsigned integers, no `?.`, no message types; `int` and `float` mix in arithmetic
//! (giving `float`) and compare exactly; `&&`, `||`, `all` and `exists` evaluate left to
//! right and stop at the first deciding operand (an error before it is an error — CEL
//! would absorb it); the pattern of `matches` must be a literal, so that no regex is
//! compiled during evaluation.

#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod ast;
mod check;
mod compile;
mod error;
mod eval;
mod fuzz;
mod lexer;
pub mod limits;
mod parser;
mod program;
pub mod query;
mod time;
mod types;
pub mod value;

pub use compile::regex_compilations;
pub use error::{CompileError, CompileErrorKind, Cost, EvalError, EvalErrorKind, Location, Span};
pub use fuzz::{fuzz_eval, fuzz_parse, fuzz_schema, fuzz_select, fuzz_values};
pub use limits::Limits;
pub use program::{Bindings, Program, Slot, INLINE_SLOTS};
pub use query::{Catalog, Query, QueryError, QueryLimits, SourceInfo};
pub use types::{Record, Schema, Type};
pub use value::{Key, Map, Value};

/// Parses `source` into a syntax tree without checking it: for tools and tests. Errors
/// carry their location.
pub fn parse(source: &str, limits: &Limits) -> Result<ast::Expr, CompileError> {
    parser::parse(source, limits).map_err(|e| e.locate(source))
}
