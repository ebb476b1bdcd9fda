//! Measures map lookups, to choose how large a map is searched linearly before it gets a
//! hash index (`LINEAR_ENTRIES_MAX` in `src/value.rs`).
//!
//! ```text
//! cargo run --release --example map_lookup
//! ```
//!
//! For each size: a prehashed lookup ([`Map::get_key`], what compiled field access does)
//! with the linear layout and with the index, a lookup that hashes the key first
//! ([`Map::get`]), and `std::collections::HashMap` with foldhash for reference. Keys are
//! record-like names (`Field0`, `Field1`, …); every key of the map is looked up in turn.

use std::collections::HashMap;
use std::hint::black_box;
use std::sync::Arc;
use std::time::Instant;

use portswitch_query::{Key, Map, Value};

const LOOKUPS: usize = 20_000_000;

fn time(mut f: impl FnMut(usize) -> bool) -> f64 {
    let start = Instant::now();
    let mut hits = 0usize;
    for i in 0..LOOKUPS {
        hits += usize::from(f(i));
    }
    assert_eq!(hits, LOOKUPS);
    start.elapsed().as_nanos() as f64 / LOOKUPS as f64
}

fn main() {
    println!("entries  linear  indexed  get(&str)  std HashMap   (ns per lookup)");
    for n in [1usize, 2, 4, 6, 8, 12, 16, 32, 64] {
        let names: Vec<String> = (0..n).map(|i| format!("Field{i}")).collect();
        let keys: Vec<Key> = names.iter().map(|s| Key::new(s.as_str())).collect();
        let mut map: Map = names.iter().map(|s| (s.as_str(), Value::Int(1))).collect();
        let std_map: HashMap<Arc<str>, Value, foldhash::fast::RandomState> = names
            .iter()
            .map(|s| (Arc::from(s.as_str()), Value::Int(1)))
            .collect();

        map.set_indexed_for_measurement(false);
        let linear = time(|i| black_box(&map).get_key(black_box(&keys[i % n])).is_some());
        map.set_indexed_for_measurement(true);
        let indexed = time(|i| black_box(&map).get_key(black_box(&keys[i % n])).is_some());
        let hashing = time(|i| black_box(&map).get(black_box(&names[i % n])).is_some());
        let std = time(|i| {
            black_box(&std_map)
                .get(black_box(names[i % n].as_str()))
                .is_some()
        });
        println!("{n:7}  {linear:6.2}  {indexed:7.2}  {hashing:9.2}  {std:11.2}");
    }
}
