use std::collections::HashMap;
use std::time::Duration;

use super::*;
use crate::error::{CompileErrorKind, EvalErrorKind};
use crate::value::{Map, Value};

/// Sources held in memory, recording what each scan asked for.
#[derive(Default)]
struct Mem {
    tables: HashMap<String, Vec<Value>>,
    opened: std::cell::RefCell<Vec<Scan>>,
}

impl Sources for Mem {
    fn open(&self, scan: &Scan) -> Result<Rows<'_>, String> {
        self.opened.borrow_mut().push(scan.clone());
        let rows = self
            .tables
            .get(&scan.name)
            .ok_or_else(|| format!("no table {}", scan.name))?;
        Ok(Box::new(rows.iter().cloned().map(Ok)))
    }
}

fn record(fields: Vec<(&str, Value)>) -> Value {
    let mut m = Map::new();
    for (k, v) in fields {
        m.insert(k, v);
    }
    Value::Map(std::sync::Arc::new(m))
}

fn segment(origin: &str, minutes: i64) -> Value {
    record(vec![("Origin", origin.into()), ("Minutes", minutes.into())])
}

fn flights() -> Vec<Value> {
    let names = [
        "Иван Петров",
        "Пётр Сидоров",
        "Anna Smith",
        "иван lower",
        "Ivan",
    ];
    let countries = ["RU", "DE", "US"];
    let origins = ["MOW", "LED", "BER"];
    (0..60i64)
        .map(|i| {
            let segments: Vec<Value> = (0..(i % 4))
                .map(|k| segment(origins[((i + k) % 3) as usize], 30 + i * 10 + k))
                .collect();
            record(vec![
                ("id", i.into()),
                ("Country", countries[(i % 3) as usize].into()),
                ("Name", names[(i % 5) as usize].into()),
                ("Passengers", record(vec![("Adults", (1 + i % 3).into())])),
                ("Segments", Value::from(segments)),
                ("Price", Value::Float(50.0 + (i * 37 % 200) as f64)),
            ])
        })
        .collect()
}

fn mem() -> Mem {
    let mut m = Mem::default();
    m.tables.insert("flights".into(), flights());
    m.tables.insert(
        "airports".into(),
        vec![
            record(vec![("Code", "MOW".into()), ("City", "Москва".into())]),
            record(vec![
                ("Code", "LED".into()),
                ("City", "Санкт-Петербург".into()),
            ]),
        ],
    );
    m
}

type Outcome = (Vec<String>, Vec<Vec<Value>>, RunStats);

fn run_with(sql: &str, catalog: &Catalog, limits: &QueryLimits) -> Result<Outcome, QueryError> {
    let q = Query::prepare(sql, catalog, limits)?;
    let mut rows = Vec::new();
    let stats = q.run(&mem(), &mut |r| {
        rows.push(r);
        true
    })?;
    Ok((q.columns().to_vec(), rows, stats))
}

fn run(sql: &str) -> (Vec<String>, Vec<Vec<Value>>) {
    let (c, r, _) = run_with(sql, &Catalog::open(), &QueryLimits::default()).unwrap();
    (c, r)
}

fn compile_err(sql: &str) -> crate::CompileError {
    match Query::prepare(sql, &Catalog::open(), &QueryLimits::default()) {
        Err(QueryError::Compile(e)) => e,
        other => panic!("expected a compile error for {sql}, got {other:?}"),
    }
}

fn field<'a>(v: &'a Value, name: &str) -> &'a Value {
    v.as_map().unwrap().get(name).unwrap()
}

#[test]
fn unnest_regex_and_group_by_agree_with_a_hand_computation() {
    let (cols, rows) = run(
        r#"SELECT f.Country AS country, count(*) AS n, sum(s.Minutes) AS minutes
           FROM flights f, f.Segments s
           WHERE s.Origin == "MOW" && f.Name.matches("^(Иван|Пётр)")
           GROUP BY f.Country ORDER BY country"#,
    );
    assert_eq!(cols, ["country", "n", "minutes"]);
    let mut expected: std::collections::BTreeMap<String, (i64, i64)> = Default::default();
    for f in flights() {
        let name = field(&f, "Name").as_str().unwrap();
        if !(name.starts_with("Иван") || name.starts_with("Пётр")) {
            continue;
        }
        for s in field(&f, "Segments").as_list().unwrap() {
            if field(s, "Origin").as_str() == Some("MOW") {
                let e = expected
                    .entry(field(&f, "Country").as_str().unwrap().to_owned())
                    .or_default();
                e.0 += 1;
                e.1 += field(s, "Minutes").as_int().unwrap();
            }
        }
    }
    assert!(!expected.is_empty());
    let got: Vec<(String, i64, i64)> = rows
        .iter()
        .map(|r| {
            (
                r[0].as_str().unwrap().to_owned(),
                r[1].as_int().unwrap(),
                r[2].as_int().unwrap(),
            )
        })
        .collect();
    let want: Vec<(String, i64, i64)> = expected.into_iter().map(|(k, (n, m))| (k, n, m)).collect();
    assert_eq!(got, want);
}

#[test]
fn top_k_equals_a_full_sort() {
    let (_, rows) = run(
        r#"SELECT f.id AS id, f.Price AS price FROM flights f WHERE f.Country == "DE" ORDER BY price DESC, id LIMIT 5 OFFSET 2"#,
    );
    let mut all: Vec<(f64, i64)> = flights()
        .iter()
        .filter(|f| field(f, "Country").as_str() == Some("DE"))
        .map(|f| {
            let Value::Float(p) = field(f, "Price") else {
                panic!()
            };
            (*p, field(f, "id").as_int().unwrap())
        })
        .collect();
    all.sort_by(|a, b| b.0.partial_cmp(&a.0).unwrap().then(a.1.cmp(&b.1)));
    let want: Vec<i64> = all.iter().skip(2).take(5).map(|x| x.1).collect();
    let got: Vec<i64> = rows.iter().map(|r| r[0].as_int().unwrap()).collect();
    assert_eq!(got, want);
}

#[test]
fn limit_without_order_stops_reading() {
    let (_, rows, stats) = run_with(
        "SELECT f.id FROM flights f LIMIT 3",
        &Catalog::open(),
        &QueryLimits::default(),
    )
    .unwrap();
    assert_eq!(rows.len(), 3);
    assert_eq!(stats.rows_scanned, 3);
}

#[test]
fn hash_join_and_left_join() {
    let (_, rows) = run(
        r#"SELECT f.id AS id, a.City AS city FROM flights f, f.Segments s
           JOIN airports a ON a.Code == s.Origin WHERE f.id < 8 ORDER BY id, city"#,
    );
    let mut want = Vec::new();
    for f in flights()
        .iter()
        .filter(|f| field(f, "id").as_int().unwrap() < 8)
    {
        for s in field(f, "Segments").as_list().unwrap() {
            let city = match field(s, "Origin").as_str().unwrap() {
                "MOW" => "Москва",
                "LED" => "Санкт-Петербург",
                _ => continue,
            };
            want.push((field(f, "id").as_int().unwrap(), city.to_owned()));
        }
    }
    want.sort();
    let got: Vec<(i64, String)> = rows
        .iter()
        .map(|r| (r[0].as_int().unwrap(), r[1].as_str().unwrap().to_owned()))
        .collect();
    assert_eq!(got, want);

    // Flights with no segments still appear once, with `s` null.
    let (_, rows) = run(
        "SELECT f.id AS id, s == null ? 0 : s.Minutes AS m FROM flights f LEFT JOIN f.Segments s WHERE f.id < 4 ORDER BY id, m",
    );
    let ids: Vec<i64> = rows.iter().map(|r| r[0].as_int().unwrap()).collect();
    assert_eq!(ids, [0, 1, 2, 2, 3, 3, 3]);
    assert_eq!(rows[0][1], Value::Int(0));
}

#[test]
fn virtual_fields_read_like_stored_ones() {
    let catalog = Catalog::new().with(
        "flights",
        SourceInfo {
            row: crate::Type::Dyn,
            virtuals: vec![
                ("Legs".into(), "Segments.size()".into()),
                ("LongTrip".into(), "Legs >= 3".into()),
            ],
        },
    );
    let (_, rows, _) = run_with(
        "SELECT f.id, f.Legs FROM flights f WHERE f.LongTrip ORDER BY id LIMIT 2",
        &catalog,
        &QueryLimits::default(),
    )
    .unwrap();
    assert_eq!(
        rows,
        vec![
            vec![Value::Int(3), Value::Int(3)],
            vec![Value::Int(7), Value::Int(3)]
        ]
    );

    let cyclic = Catalog::new().with(
        "flights",
        SourceInfo {
            row: crate::Type::Dyn,
            virtuals: vec![("A".into(), "B + 1".into()), ("B".into(), "A + 1".into())],
        },
    );
    let err = Query::prepare(
        "SELECT f.A FROM flights f",
        &cyclic,
        &QueryLimits::default(),
    )
    .unwrap_err();
    let QueryError::Compile(e) = err else {
        panic!("{err:?}")
    };
    assert!(matches!(e.kind(), CompileErrorKind::VirtualCycle(_)), "{e}");
    assert_eq!(e.location().unwrap().column, 8);

    let bad = Catalog::new().with(
        "flights",
        SourceInfo {
            row: crate::Type::Dyn,
            virtuals: vec![("A".into(), "1 +".into())],
        },
    );
    let err =
        Query::prepare("SELECT f.id FROM flights f", &bad, &QueryLimits::default()).unwrap_err();
    assert!(
        matches!(err, QueryError::Virtual { ref field, .. } if field == "flights.A"),
        "{err}"
    );
}

#[test]
fn distinct_global_aggregates_and_having() {
    let (_, rows) = run("SELECT DISTINCT f.Country FROM flights f ORDER BY Country");
    assert_eq!(
        rows,
        vec![
            vec![Value::from("DE")],
            vec![Value::from("RU")],
            vec![Value::from("US")]
        ]
    );

    let (cols, rows) =
        run("SELECT count(*), sum(f.id), min(f.Price), avg(f.id) FROM flights f WHERE f.id > 1000");
    assert_eq!(cols, ["count", "sum", "min", "avg"]);
    assert_eq!(
        rows,
        vec![vec![Value::Int(0), Value::Null, Value::Null, Value::Null]]
    );

    let (_, rows) = run(
        "SELECT f.Country, count(*) AS n, max(f.id) FROM flights f GROUP BY f.Country HAVING count(*) > 19 && max(f.id) >= 59 ORDER BY n DESC",
    );
    assert_eq!(rows.len(), 1);
    assert_eq!(
        rows[0],
        vec![Value::from("US"), Value::Int(20), Value::Int(59)]
    );
}

#[test]
fn push_down_hints_name_fields_and_simple_conditions() {
    let q = Query::prepare(
        r#"SELECT f.id FROM flights f, f.Segments s WHERE f.Country == "RU" && 10 < f.id && s.Origin == "MOW" && f.Name.matches("x")"#,
        &Catalog::open(),
        &QueryLimits::default(),
    )
    .unwrap();
    let scan = &q.scans()[0];
    let mut fields = scan.fields.clone().unwrap();
    fields.sort();
    assert_eq!(fields, ["Country", "Name", "Segments", "id"]);
    assert_eq!(
        scan.filters,
        vec![
            Pushed {
                field: "Country".into(),
                op: CmpOp::Eq,
                value: "RU".into()
            },
            Pushed {
                field: "id".into(),
                op: CmpOp::Gt,
                value: Value::Int(10)
            },
        ]
    );
    let q = Query::prepare(
        "SELECT f FROM flights f",
        &Catalog::open(),
        &QueryLimits::default(),
    )
    .unwrap();
    assert_eq!(q.scans()[0].fields, None);
}

#[test]
fn statement_errors_are_typed_and_located() {
    let e = compile_err("SELECT f.Name, count(*) FROM flights f GROUP BY f.Country");
    assert!(
        matches!(e.kind(), CompileErrorKind::NotGrouped(s) if s == "f.Name"),
        "{e}"
    );
    assert_eq!(e.location().unwrap().column, 8);

    let e = compile_err("SELECT f.id FROM flights f WHERE count(*) > 1");
    assert!(
        matches!(e.kind(), CompileErrorKind::MisplacedAggregate(_)),
        "{e}"
    );

    let e = Query::prepare(
        "SELECT x.id FROM nowhere x",
        &Catalog::new(),
        &QueryLimits::default(),
    )
    .unwrap_err();
    assert!(
        matches!(e, QueryError::Compile(ref c) if matches!(c.kind(), CompileErrorKind::UnknownSource(_))),
        "{e}"
    );

    let e = compile_err("SELECT f.id FROM flights f, flights f");
    assert!(
        matches!(e.kind(), CompileErrorKind::DuplicateAlias(_)),
        "{e}"
    );

    let e = compile_err("SELECT f.id FROM flights f WHERE f.id > 1 AND f.id < 5");
    assert!(e.to_string().contains("write `&&` for AND"), "{e}");
    assert_eq!(e.location().unwrap().column, 43);

    let e = compile_err("SELECT g.id FROM flights f");
    assert!(
        matches!(e.kind(), CompileErrorKind::UndeclaredVariable(v) if v == "g"),
        "{e}"
    );

    let e = compile_err("SELECT f.id FROM flights");
    assert!(
        matches!(e.kind(), CompileErrorKind::UndeclaredVariable(v) if v == "f"),
        "{e}"
    );

    let e = compile_err("SELECT f.id FROM flights f, f.Segments");
    assert!(matches!(e.kind(), CompileErrorKind::Statement(_)), "{e}");
}

#[test]
fn evaluation_errors_name_the_row_expression() {
    let e = Query::prepare(
        "SELECT f.id FROM flights f WHERE f.Nope == 1",
        &Catalog::open(),
        &QueryLimits::default(),
    )
    .unwrap()
    .run(&mem(), &mut |_| true)
    .unwrap_err();
    let QueryError::Eval(e) = e else {
        panic!("{e:?}")
    };
    assert!(matches!(e.kind(), EvalErrorKind::NoSuchKey(k) if k == "Nope"));
    assert_eq!(e.location().unwrap().column, 34);

    let e = Query::prepare(
        "SELECT sum(f.Name) FROM flights f",
        &Catalog::open(),
        &QueryLimits::default(),
    )
    .unwrap()
    .run(&mem(), &mut |_| true)
    .unwrap_err();
    assert!(
        matches!(e, QueryError::Eval(ref x) if matches!(x.kind(), EvalErrorKind::TypeMismatch { .. })),
        "{e}"
    );
}

#[test]
fn every_limit_stops_the_query_with_its_name() {
    type Case = (&'static str, fn(&mut QueryLimits), QueryLimit);
    let cases: [Case; 4] = [
        (
            "SELECT f.id FROM flights f, f.Segments s",
            |l| l.rows_examined_max = 50,
            QueryLimit::RowsExamined,
        ),
        (
            "SELECT f.id, count(*) FROM flights f GROUP BY f.id",
            |l| l.groups_max = 10,
            QueryLimit::Groups,
        ),
        (
            "SELECT f.id FROM flights f ORDER BY f.id",
            |l| l.result_rows_max = 10,
            QueryLimit::ResultRows,
        ),
        (
            "SELECT f.id FROM flights f JOIN flights g ON f.id == g.id",
            |l| l.join_rows_max = 10,
            QueryLimit::JoinRows,
        ),
    ];
    for (sql, tweak, which) in cases {
        let mut limits = QueryLimits::default();
        tweak(&mut limits);
        match run_with(sql, &Catalog::open(), &limits) {
            Err(QueryError::Limit { limit, .. }) => assert_eq!(limit, which, "{sql}"),
            other => panic!("{sql}: {other:?}"),
        }
    }
    // Time: read every 1,024 rows examined; a cross join examines 3,600 here.
    let limits = QueryLimits {
        time_max: Duration::ZERO,
        ..QueryLimits::default()
    };
    match run_with(
        "SELECT f.id FROM flights f, flights g",
        &Catalog::open(),
        &limits,
    ) {
        Err(QueryError::Limit { limit, .. }) => assert_eq!(limit, QueryLimit::Time),
        other => panic!("{other:?}"),
    }
}

#[test]
fn a_source_error_ends_the_query_with_its_name() {
    let q = Query::prepare(
        "SELECT x.a FROM missing x",
        &Catalog::open(),
        &QueryLimits::default(),
    )
    .unwrap();
    let e = q.run(&mem(), &mut |_| true).unwrap_err();
    assert!(
        matches!(e, QueryError::Source { ref source_name, .. } if source_name == "missing"),
        "{e}"
    );
}

#[test]
fn select_star_gives_each_alias() {
    let (cols, rows) = run("SELECT * FROM flights f, f.Segments s WHERE f.id == 1");
    assert_eq!(cols, ["f", "s"]);
    assert_eq!(rows.len(), 1);
    assert_eq!(field(&rows[0][1], "Origin"), &Value::from("LED"));
}

#[test]
fn the_fuzz_entry_runs_statements_of_every_shape() {
    let statements = [
        "SELECT t.i, t.s FROM t WHERE t.i > 0 ORDER BY t.s DESC LIMIT 3",
        "SELECT u.v, count(*) FROM u GROUP BY u.v HAVING count(*) > 0",
        "SELECT DISTINCT x FROM t, t.l x",
        "SELECT a.i FROM t a JOIN u b ON a.i == b.i LEFT JOIN a.l z",
        "SELECT sum(t.f), avg(t.i), min(t.s), max(t.d) FROM t",
        "SELECT * FROM t, t.l.filter(x, x > 3) y",
        "SELECT t.r.l.map(x, x + x) FROM t OFFSET 2",
        "SELECT t.i FROM t, t, t",
        "SELECT",
    ];
    for s in statements {
        for seed in [
            &b""[..],
            b"\x01\x02abcdefgh",
            b"\x03\xff\x10zzzzzzzzzzzzzzzzzz",
        ] {
            let mut data = s.as_bytes().to_vec();
            data.push(0);
            data.extend_from_slice(seed);
            crate::fuzz_select(&data);
        }
    }
}
