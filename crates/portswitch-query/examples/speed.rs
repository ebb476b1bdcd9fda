//! Times evaluations of the reference predicate with fresh bindings per evaluation.
//!
//! ```text
//! cargo run --release --example speed [-- EVALUATIONS]
//! ```
//!
//! Four prebuilt records (two true, two false, exercising both sides of each `||`) are
//! bound in turn; every evaluation makes new bindings and sets all four variables. This
//! is a rough figure for development, not a benchmark: criterion will measure it later.

use std::hint::black_box;
use std::time::Instant;

use portswitch_query::{Limits, Map, Program, Schema, Type, Value};

const PREDICATE: &str = r#"(Segments[0].Origin == "MOW" || Country == "RU") && (Tickets[0].Prices["oneway"].Value >= 100 || Passengers.Adults == 1)"#;

struct Record {
    segments: Value,
    country: Value,
    tickets: Value,
    passengers: Value,
    as_map: Map,
}

fn record(origin: &str, country: &str, price: i64, adults: i64) -> Record {
    let segments = Value::list([Value::map([
        ("Origin", Value::from(origin)),
        ("Destination", Value::from("LED")),
        ("Carrier", Value::from("SU")),
    ])]);
    let country = Value::from(country);
    let tickets = Value::list([Value::map([(
        "Prices",
        Value::map([
            (
                "oneway",
                Value::map([("Value", Value::Int(price)), ("Currency", "RUB".into())]),
            ),
            (
                "roundtrip",
                Value::map([("Value", Value::Int(price * 2)), ("Currency", "RUB".into())]),
            ),
        ]),
    )])]);
    let passengers = Value::map([("Adults", adults), ("Children", 0), ("Infants", 0)]);
    let as_map: Map = [
        ("Segments", segments.clone()),
        ("Country", country.clone()),
        ("Tickets", tickets.clone()),
        ("Passengers", passengers.clone()),
    ]
    .into_iter()
    .collect();
    Record {
        segments,
        country,
        tickets,
        passengers,
        as_map,
    }
}

fn schema() -> Schema {
    let price = Type::record([("Value", Type::Int), ("Currency", Type::String)]);
    Schema::new()
        .with(
            "Segments",
            Type::list(Type::record([("Origin", Type::String)])),
        )
        .with("Country", Type::String)
        .with(
            "Tickets",
            Type::list(Type::record([("Prices", Type::map(price))])),
        )
        .with("Passengers", Type::record([("Adults", Type::Int)]))
}

fn report(label: &str, n: u64, elapsed: std::time::Duration, trues: u64) {
    let ns = elapsed.as_nanos() as f64 / n as f64;
    println!(
        "{label:<28} {ns:6.1} ns/eval  {:6.1} M evals/s  ({trues} true of {n})",
        1e3 / ns
    );
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let n: u64 = match std::env::args().nth(1) {
        Some(arg) => arg.parse()?,
        None => 10_000_000,
    };
    let program = Program::compile(PREDICATE, &schema(), &Limits::default())?;
    let records = [
        record("MOW", "DE", 150, 2), // true: origin, price
        record("LED", "DE", 150, 1), // false: neither origin nor country
        record("LED", "RU", 50, 1),  // true: country, adults
        record("MOW", "RU", 50, 3),  // false: price and adults fail
    ];
    let slots = ["Segments", "Country", "Tickets", "Passengers"]
        .map(|name| program.slot(name).ok_or(format!("{name} not in program")));
    let [segments, country, tickets, passengers] = slots;
    let (segments, country, tickets, passengers) = (segments?, country?, tickets?, passengers?);

    // Warm up, and check the answers.
    for (i, r) in records.iter().enumerate() {
        let mut b = program.bindings();
        b.set_from_map(&r.as_map);
        let want = i % 2 == 0;
        assert_eq!(program.eval_bool(&b)?, want, "record {i}");
    }

    let start = Instant::now();
    let mut trues = 0u64;
    for i in 0..n {
        let r = black_box(&records[(i & 3) as usize]);
        let mut b = program.bindings();
        b.set_slot(segments, &r.segments);
        b.set_slot(country, &r.country);
        b.set_slot(tickets, &r.tickets);
        b.set_slot(passengers, &r.passengers);
        trues += u64::from(program.eval_bool(black_box(&b))?);
    }
    report("bind by slot", n, start.elapsed(), trues);

    let start = Instant::now();
    let mut trues = 0u64;
    for i in 0..n {
        let r = black_box(&records[(i & 3) as usize]);
        let mut b = program.bindings();
        b.set("Segments", &r.segments);
        b.set("Country", &r.country);
        b.set("Tickets", &r.tickets);
        b.set("Passengers", &r.passengers);
        trues += u64::from(program.eval_bool(black_box(&b))?);
    }
    report("bind by name", n, start.elapsed(), trues);

    let start = Instant::now();
    let mut trues = 0u64;
    for i in 0..n {
        let r = black_box(&records[(i & 3) as usize]);
        let mut b = program.bindings();
        b.set_from_map(&r.as_map);
        trues += u64::from(program.eval_bool(black_box(&b))?);
    }
    report("bind from a root record", n, start.elapsed(), trues);
    Ok(())
}
