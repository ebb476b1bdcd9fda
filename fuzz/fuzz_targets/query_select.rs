//! Query statements: arbitrary bytes split into a SELECT and the rows it runs over; preparing and running never panic, every refusal is typed, and the result-row limit holds.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| portswitch_query::fuzz_select(data));
