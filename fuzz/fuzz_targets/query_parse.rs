//! The query language's parser: arbitrary bytes as source; whatever parses must print back to source that parses to the same tree, and type-check and compile without a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| portswitch_query::fuzz_parse(data));
