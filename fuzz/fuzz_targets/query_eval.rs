//! The query language's evaluator: arbitrary bytes split into an expression and the values it is evaluated against; compiling and evaluating never panics, and every error is typed.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| portswitch_query::fuzz_eval(data));
