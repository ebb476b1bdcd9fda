//! Evaluation of comparisons, boolean logic and field access allocates nothing, with
//! fresh bindings per evaluation. Counted by a global allocator, per thread (tests run
//! in parallel threads of one process).

// The only unsafe code of the crate: a `GlobalAlloc` implementation is unsafe by
// definition. It forwards to the system allocator and counts.
#![allow(unsafe_code)]

mod common;

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

use common::{flight, flight_schema, PREDICATE};
use portswitch_query::{Limits, Map, Program, Schema, Value};

struct Counting;

thread_local! {
    // Const-initialised and without a destructor: touching it never allocates.
    static ALLOCATIONS: Cell<u64> = const { Cell::new(0) };
}

fn count() {
    // `try_with`: the local is gone while a thread is torn down.
    let _ = ALLOCATIONS.try_with(|c| c.set(c.get() + 1));
}

// SAFETY: every method forwards to `System` with the arguments it was given, which
// upholds `GlobalAlloc`'s contract exactly as `System` does; counting has no effect on
// the memory handed out.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        count();
        // SAFETY: the caller's guarantees for `layout` are passed on unchanged.
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        count();
        // SAFETY: as above.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        count();
        // SAFETY: `ptr` came from this allocator, that is from `System`.
        unsafe { System.realloc(ptr, layout, new_size) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` came from this allocator, that is from `System`.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

fn allocations_during(f: impl FnOnce()) -> u64 {
    let before = ALLOCATIONS.with(Cell::get);
    f();
    ALLOCATIONS.with(Cell::get) - before
}

fn records() -> Vec<Map> {
    vec![
        flight("MOW", "DE", 150, 2),
        flight("LED", "DE", 150, 1),
        flight("LED", "RU", 50, 1),
        flight("MOW", "RU", 50, 3),
    ]
}

#[test]
fn the_reference_predicate_allocates_nothing() {
    let records = records();
    for schema in [flight_schema(), Schema::new()] {
        let program = Program::compile(PREDICATE, &schema, &Limits::default()).unwrap();
        let slots = ["Segments", "Country", "Tickets", "Passengers"]
            .map(|name| program.slot(name).unwrap());
        // Values bound one by one, as a caller holding them separately would.
        let values: Vec<[&Value; 4]> = records
            .iter()
            .map(|r| ["Segments", "Country", "Tickets", "Passengers"].map(|k| r.get(k).unwrap()))
            .collect();
        let mut trues = 0;
        let allocations = allocations_during(|| {
            for i in 0..1_000 {
                let vs = &values[i % 4];
                // By slot.
                let mut b = program.bindings();
                for (slot, v) in slots.iter().zip(vs) {
                    b.set_slot(*slot, v);
                }
                trues += usize::from(program.eval_bool(&b).unwrap());
                // By name.
                let mut b = program.bindings();
                for (name, v) in ["Segments", "Country", "Tickets", "Passengers"]
                    .iter()
                    .zip(vs)
                {
                    b.set(name, v);
                }
                trues += usize::from(program.eval_bool(&b).unwrap());
                // From a root record.
                let mut b = program.bindings();
                b.set_from_map(&records[i % 4]);
                trues += usize::from(program.eval_bool(&b).unwrap());
            }
        });
        assert_eq!(allocations, 0);
        assert_eq!(trues, 1_500, "half the records match");
    }
}

#[test]
fn other_non_building_expressions_allocate_nothing() {
    let records = records();
    let cases = [
        "Segments.exists(s, s.Origin == 'MOW') || Segments.all(s, s.Destination != 'MOW')",
        "Country in ['RU', 'DE', 'FR']",
        "size(Country) == 2 && Country.startsWith('R') || Country.endsWith('E')",
        "Passengers.Adults + Passengers.Children * 2 > 1",
        "Tickets[0].Prices['oneway'].Value * 1.5 >= 100.0",
        "'oneway' in Tickets[0].Prices && has(Passengers.Adults)",
        "Passengers.Adults > 1 ? Country == 'RU' : Country != 'RU'",
        "Tickets.map(t, t.Prices.size()).size() > 0 || true",
        "Country.matches('^(RU|DE)$')",
        "Country.contains('U') == !Country.contains('E')",
    ];
    for src in cases {
        let program = Program::compile(src, &flight_schema(), &Limits::default()).unwrap();
        // One warm-up evaluation per record: the regex crate makes its per-thread search
        // cache on first use.
        for r in &records {
            let mut b = program.bindings();
            b.set_from_map(r);
            program.eval_bool(&b).unwrap();
        }
        let allocations = allocations_during(|| {
            for i in 0..200 {
                let mut b = program.bindings();
                b.set_from_map(&records[i % 4]);
                program.eval_bool(&b).unwrap();
            }
        });
        // `map` builds a list; every other case builds nothing.
        let expected = if src.contains(".map(") { 200 * 2 } else { 0 };
        assert_eq!(allocations, expected, "{src}");
    }
}

#[test]
fn returning_a_field_allocates_nothing() {
    let records = records();
    let program =
        Program::compile("Segments[0].Origin", &flight_schema(), &Limits::default()).unwrap();
    let mut results = Vec::with_capacity(100);
    let allocations = allocations_during(|| {
        for i in 0..100 {
            let mut b = program.bindings();
            b.set_from_map(&records[i % 4]);
            // The result shares the bound string (a reference count, not a copy).
            results.push(program.eval(&b).unwrap());
        }
    });
    assert_eq!(allocations, 0);
    assert_eq!(results[0], Value::from("MOW"));
}
