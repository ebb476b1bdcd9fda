//! `portswitch query run` as users run it: one query suite over the same records held
//! as JSON Lines, as a SQLite table (flat columns plus a `JSON` column) and, for flat
//! data, as CSV must give the same answers; push-down reaches the SQL; errors have
//! their exit codes.

use std::path::Path;
use std::process::Command;

const BIN: &str = env!("CARGO_BIN_EXE_portswitch");

fn run(args: &[&str]) -> (i32, String, String) {
    let o = Command::new(BIN)
        .arg("query")
        .arg("run")
        .args(args)
        .output()
        .unwrap();
    (
        o.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

const COUNTRIES: [&str; 4] = ["RU", "DE", "KZ", "US"];
const NAMES: [&str; 5] = [
    "Иванов Пётр",
    "Петров Иван",
    "Smith Anna",
    "Пётрова Ольга",
    "Müller Jörg",
];
const CITIES: [&str; 4] = ["MOW", "LED", "BER", "NYC"];

/// Deterministic nested records: (id, country, name, adults, segments [(origin, minutes)]).
type Flight = (
    i64,
    &'static str,
    &'static str,
    i64,
    Vec<(&'static str, i64)>,
);

fn flights() -> Vec<Flight> {
    (0..500i64)
        .map(|i| {
            let segs = (0..(i * 7 % 4))
                .map(|k| {
                    (
                        CITIES[((i * 3 + k) % 4) as usize],
                        30 + (i * 13 + k * 7) % 600,
                    )
                })
                .collect();
            (
                i,
                COUNTRIES[(i * 5 % 4) as usize],
                NAMES[(i % 5) as usize],
                1 + i % 3,
                segs,
            )
        })
        .collect()
}

fn segments_json(segs: &[(&str, i64)]) -> String {
    let parts: Vec<String> = segs
        .iter()
        .map(|(o, m)| format!(r#"{{"Origin":"{o}","Minutes":{m}}}"#))
        .collect();
    format!("[{}]", parts.join(","))
}

fn write_sources(dir: &Path) {
    let mut ndjson = String::new();
    let mut csv = String::from("id,Country,Name,Adults\n");
    for (id, country, name, adults, segs) in flights() {
        ndjson.push_str(&format!(
            r#"{{"id":{id},"Country":"{country}","Name":"{name}","Adults":{adults},"Segments":{}}}"#,
            segments_json(&segs)
        ));
        ndjson.push('\n');
        csv.push_str(&format!("{id},{country},{name},{adults}\n"));
    }
    std::fs::write(dir.join("flights.ndjson"), ndjson).unwrap();
    std::fs::write(dir.join("flights.csv"), csv).unwrap();
    std::fs::write(
        dir.join("cities.csv"),
        "Code,City\nMOW,Москва\nLED,Санкт-Петербург\nBER,Berlin\n",
    )
    .unwrap();
    let db = rusqlite::Connection::open(dir.join("flights.db")).unwrap();
    db.execute_batch(
        "CREATE TABLE flights (id INTEGER PRIMARY KEY, Country TEXT, Name TEXT, Adults INTEGER, Segments JSON);",
    )
    .unwrap();
    let mut insert = db
        .prepare("INSERT INTO flights VALUES (?1, ?2, ?3, ?4, ?5)")
        .unwrap();
    for (id, country, name, adults, segs) in flights() {
        insert
            .execute(rusqlite::params![
                id,
                country,
                name,
                adults,
                segments_json(&segs)
            ])
            .unwrap();
    }
}

/// The suite: nested (unnest) queries need the `Segments` list; flat ones run on CSV too.
const NESTED: &[&str] = &[
    r#"SELECT f.Country AS country, count(*) AS n, sum(s.Minutes) AS minutes FROM flights f, f.Segments s WHERE s.Origin == "MOW" && f.Name.matches("^(Иван|Пётр)") GROUP BY f.Country ORDER BY country"#,
    r#"SELECT f.id AS id, s.Origin AS origin, c.City AS city FROM flights f, f.Segments s JOIN cities c ON c.Code == s.Origin WHERE f.id < 40 && s.Minutes > 100 ORDER BY id, origin, city"#,
    r#"SELECT f.id AS id, size(f.Segments) AS legs FROM flights f WHERE f.Segments.exists(s, s.Minutes >= 500) ORDER BY legs DESC, id LIMIT 7 OFFSET 3"#,
];
const FLAT: &[&str] = &[
    r#"SELECT count(*) AS n, min(f.id) AS lo, max(f.id) AS hi, avg(f.Adults) AS adults FROM flights f WHERE f.Country == "DE" && f.id >= 100"#,
    r#"SELECT DISTINCT f.Name AS name FROM flights f WHERE f.Name.matches("(?i)^\\p{Cyrillic}+ ИВАН") ORDER BY name"#,
    r#"SELECT f.Country AS country, f.Adults AS adults, count(*) AS n FROM flights f GROUP BY f.Country, f.Adults HAVING count(*) > 40 ORDER BY n DESC, country, adults"#,
];

fn answer(dir: &Path, flights: &str, sql: &str) -> String {
    let (code, out, err) = run(&[
        "--source",
        &format!("flights={flights}"),
        "--source",
        &format!("cities={}", dir.join("cities.csv").display()),
        sql,
    ]);
    assert_eq!(code, 0, "{flights}: {sql}: {err}");
    assert!(!out.trim().is_empty(), "{flights}: {sql}: no rows");
    out
}

#[test]
fn the_suite_answers_alike_on_json_lines_sqlite_and_csv() {
    let dir = tempfile::tempdir().unwrap();
    write_sources(dir.path());
    let ndjson = dir.path().join("flights.ndjson").display().to_string();
    let sqlite = format!("sqlite:{}:flights", dir.path().join("flights.db").display());
    let csv = dir.path().join("flights.csv").display().to_string();
    for sql in NESTED {
        assert_eq!(
            answer(dir.path(), &ndjson, sql),
            answer(dir.path(), &sqlite, sql),
            "{sql}"
        );
    }
    for sql in FLAT {
        let a = answer(dir.path(), &ndjson, sql);
        assert_eq!(a, answer(dir.path(), &sqlite, sql), "{sql}");
        assert_eq!(a, answer(dir.path(), &csv, sql), "{sql}");
    }
}

#[test]
fn the_first_query_agrees_with_a_hand_computation() {
    let dir = tempfile::tempdir().unwrap();
    write_sources(dir.path());
    let ndjson = dir.path().join("flights.ndjson").display().to_string();
    let out = answer(dir.path(), &ndjson, NESTED[0]);
    let mut want: std::collections::BTreeMap<&str, (i64, i64)> = Default::default();
    for (_, country, name, _, segs) in flights() {
        if !(name.starts_with("Иван") || name.starts_with("Пётр")) {
            continue;
        }
        for (origin, minutes) in segs {
            if origin == "MOW" {
                let e = want.entry(country).or_default();
                e.0 += 1;
                e.1 += minutes;
            }
        }
    }
    let want: String = want
        .iter()
        .map(|(c, (n, m))| format!("{{\"country\":\"{c}\",\"minutes\":{m},\"n\":{n}}}\n"))
        .collect();
    assert_eq!(out, want);
}

#[test]
fn push_down_reaches_the_sql_and_virtual_fields_work() {
    let dir = tempfile::tempdir().unwrap();
    write_sources(dir.path());
    let sqlite = format!("sqlite:{}:flights", dir.path().join("flights.db").display());
    let (code, out, err) = run(&[
        "--explain",
        "--stats",
        "--source",
        &format!("flights={sqlite}"),
        "--virtual",
        "flights.Legs=Segments.size()",
        r#"SELECT f.id AS id, f.Legs AS legs FROM flights f WHERE f.Country == "DE" && f.id < 50 && f.Legs == 3 ORDER BY id"#,
    ]);
    assert_eq!(code, 0, "{err}");
    assert!(
        err.contains(
            r#"sql: SELECT "id", "Segments", "Country" FROM "flights" WHERE ("Country" = ?1"#
        ),
        "{err}"
    );
    assert!(err.contains(r#"AND ("id" < ?2"#), "{err}");
    let want: Vec<i64> = flights()
        .iter()
        .filter(|f| f.1 == "DE" && f.0 < 50 && f.4.len() == 3)
        .map(|f| f.0)
        .collect();
    assert!(!want.is_empty());
    let got: Vec<i64> = out
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            assert_eq!(v["legs"], 3);
            v["id"].as_i64().unwrap()
        })
        .collect();
    assert_eq!(got, want);
    // The SQL only sent rows that could match: fewer than the table.
    let stats: serde_json::Value = serde_json::from_str(err.lines().last().unwrap()).unwrap();
    assert!(stats["rows_in"].as_u64().unwrap() < 100, "{stats}");
}

#[test]
fn errors_have_their_exit_codes() {
    let dir = tempfile::tempdir().unwrap();
    write_sources(dir.path());
    let ndjson = format!("flights={}", dir.path().join("flights.ndjson").display());
    // A statement that does not compile: 2, with its position.
    let (code, _, err) = run(&[
        "--source",
        &ndjson,
        "SELECT f.id FROM flights f WHERE f.id > 1 AND f.id < 3",
    ]);
    assert_eq!(code, 2);
    assert!(err.contains("1:43") && err.contains("`&&`"), "{err}");
    // An evaluation error: 3, with the expression's position.
    let (code, _, err) = run(&[
        "--source",
        &ndjson,
        "SELECT f.id FROM flights f WHERE f.Nope == 1",
    ]);
    assert_eq!(code, 3);
    assert!(err.contains("no such key `Nope`"), "{err}");
    // A source that cannot be read: 4.
    let (code, _, err) = run(&[
        "--source",
        "flights=/nonexistent/x.ndjson",
        "SELECT f.id FROM flights f",
    ]);
    assert_eq!(code, 4);
    assert!(err.contains("source `flights`"), "{err}");
    // An unbound name that is no file: 4, saying how to bind it.
    let (code, _, err) = run(&["SELECT f.id FROM flights f"]);
    assert_eq!(code, 4);
    assert!(err.contains("--source flights="), "{err}");
    // A bad line in JSON Lines: 4, with its line number.
    let bad = dir.path().join("bad.ndjson");
    std::fs::write(&bad, "{\"id\":1}\n{\"id\":\n").unwrap();
    let (code, out, err) = run(&[
        "--source",
        &format!("b={}", bad.display()),
        "SELECT b.id FROM b",
    ]);
    assert_eq!(code, 4);
    assert_eq!(out, "{\"id\":1}\n");
    assert!(err.contains("bad.ndjson:2"), "{err}");
}

/// A private PostgreSQL cluster from Debian's packages (installed by the project's
/// script when missing), on a free loopback port, stopped and deleted when dropped.
/// initdb and postgres refuse to run as root: as root, the cluster runs as Debian's
/// `postgres` user.
struct Postgres {
    bin: std::path::PathBuf,
    data: tempfile::TempDir,
    as_user: Vec<String>,
    port: u16,
}

impl Postgres {
    fn start() -> Postgres {
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../../scripts/need-debian.sh");
        let ok = Command::new("bash")
            .args([script, "postgresql"])
            .status()
            .unwrap();
        assert!(ok.success(), "installing postgresql failed");
        let mut versions: Vec<std::path::PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
            .unwrap()
            .map(|e| e.unwrap().path().join("bin"))
            .filter(|p| p.join("initdb").exists())
            .collect();
        versions.sort();
        let bin = versions.pop().expect("a PostgreSQL with initdb");
        let data = tempfile::tempdir().unwrap();
        let root = Command::new("id").arg("-u").output().unwrap().stdout == b"0\n";
        let as_user: Vec<String> = if root {
            let ok = Command::new("chown")
                .args(["-R", "postgres:postgres"])
                .arg(data.path())
                .status()
                .unwrap();
            assert!(ok.success());
            ["runuser", "-u", "postgres", "--"]
                .map(String::from)
                .to_vec()
        } else {
            Vec::new()
        };
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let pg = Postgres {
            bin,
            data,
            as_user,
            port,
        };
        let cluster = pg.data.path().join("cluster");
        pg.run(&[
            "initdb",
            "-D",
            cluster.to_str().unwrap(),
            "-U",
            "test",
            "-A",
            "trust",
            "-E",
            "UTF8",
            "--no-locale",
        ]);
        let options = format!(
            "-p {port} -c listen_addresses=127.0.0.1 -k {} -c fsync=off",
            pg.data.path().display()
        );
        let log = pg.data.path().join("log");
        pg.run(&[
            "pg_ctl",
            "-D",
            cluster.to_str().unwrap(),
            "-l",
            log.to_str().unwrap(),
            "-o",
            &options,
            "-w",
            "start",
        ]);
        pg
    }

    fn run(&self, args: &[&str]) {
        let mut cmd = match self.as_user.split_first() {
            Some((first, rest)) => {
                let mut c = Command::new(first);
                c.args(rest);
                c.arg(self.bin.join(args[0]));
                c
            }
            None => Command::new(self.bin.join(args[0])),
        };
        let out = cmd.args(&args[1..]).output().unwrap();
        assert!(
            out.status.success(),
            "{args:?}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    fn conninfo(&self) -> String {
        format!(
            "host=127.0.0.1 port={} user=test dbname=postgres",
            self.port
        )
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        let cluster = self.data.path().join("cluster");
        let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            self.run(&[
                "pg_ctl",
                "-D",
                cluster.to_str().unwrap(),
                "-m",
                "immediate",
                "stop",
            ])
        }));
    }
}

#[test]
fn the_suite_answers_alike_on_postgresql() {
    let dir = tempfile::tempdir().unwrap();
    write_sources(dir.path());
    let pg = Postgres::start();
    let mut db = postgres::Client::connect(&pg.conninfo(), postgres::NoTls).unwrap();
    db.batch_execute(
        "CREATE TABLE flights (id bigint PRIMARY KEY, \"Country\" text, \"Name\" text, \
         \"Adults\" integer, \"Segments\" jsonb)",
    )
    .unwrap();
    for (id, country, name, adults, segs) in flights() {
        db.execute(
            "INSERT INTO flights VALUES ($1, $2, $3, $4, $5::text::jsonb)",
            &[
                &id,
                &country,
                &name,
                &(adults as i32),
                &segments_json(&segs),
            ],
        )
        .unwrap();
    }
    let ndjson = dir.path().join("flights.ndjson").display().to_string();
    let postgres = format!("postgres:flights:{}", pg.conninfo());
    for sql in NESTED.iter().chain(FLAT) {
        assert_eq!(
            answer(dir.path(), &ndjson, sql),
            answer(dir.path(), &postgres, sql),
            "{sql}"
        );
    }
    // Push-down: the comparisons reach PostgreSQL, so only matching rows come back.
    let (code, out, err) = run(&[
        "--stats",
        "--source",
        &format!("flights={postgres}"),
        r#"SELECT f.id AS id FROM flights f WHERE f.Country == "DE" && f.id < 50 ORDER BY id"#,
    ]);
    assert_eq!(code, 0, "{err}");
    let want = flights().iter().filter(|f| f.1 == "DE" && f.0 < 50).count();
    assert_eq!(out.lines().count(), want);
    let stats: serde_json::Value = serde_json::from_str(err.lines().last().unwrap()).unwrap();
    assert_eq!(stats["rows_in"].as_u64().unwrap(), want as u64, "{stats}");
    // A missing table is a source error.
    let (code, _, err) = run(&[
        "--source",
        &format!("t=postgres:nope:{}", pg.conninfo()),
        "SELECT t.id FROM t",
    ]);
    assert_eq!(code, 4);
    assert!(err.contains("no such table"), "{err}");
}

/// A private MariaDB server from Debian's packages (installed by the project's script
/// when missing), on a free loopback port, killed when dropped; grant tables skipped, so
/// any user connects. As root it runs as Debian's `mysql` user.
struct Mariadb {
    child: std::process::Child,
    _data: tempfile::TempDir,
    port: u16,
}

impl Mariadb {
    fn start() -> Mariadb {
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../../scripts/need-debian.sh");
        let ok = Command::new("bash")
            .args([script, "mariadb-server"])
            .status()
            .unwrap();
        assert!(ok.success(), "installing mariadb-server failed");
        let data = tempfile::tempdir().unwrap();
        let dir = data.path().to_str().unwrap().to_owned();
        let root = Command::new("id").arg("-u").output().unwrap().stdout == b"0\n";
        let user: &[&str] = if root { &["--user=mysql"] } else { &[] };
        if root {
            let ok = Command::new("chown")
                .args(["-R", "mysql:mysql", &dir])
                .status()
                .unwrap();
            assert!(ok.success());
        }
        let out = Command::new("mariadb-install-db")
            .args([
                "--no-defaults",
                &format!("--datadir={dir}/db"),
                "--skip-test-db",
            ])
            .args(user)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let child = Command::new("mariadbd")
            .args([
                "--no-defaults",
                &format!("--datadir={dir}/db"),
                &format!("--port={port}"),
                "--bind-address=127.0.0.1",
                &format!("--socket={dir}/sock"),
                &format!("--pid-file={dir}/pid"),
                &format!("--log-error={dir}/err"),
                "--skip-grant-tables",
                "--innodb-flush-log-at-trx-commit=0",
            ])
            .args(user)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let db = Mariadb {
            child,
            _data: data,
            port,
        };
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        loop {
            match mysql::Conn::new(mysql::Opts::from_url(&db.url("mysql")).unwrap()) {
                Ok(_) => return db,
                Err(e) if std::time::Instant::now() > deadline => {
                    panic!("mariadbd did not start: {e}")
                }
                Err(_) => std::thread::sleep(std::time::Duration::from_millis(200)),
            }
        }
    }

    fn url(&self, database: &str) -> String {
        format!("mysql://root@127.0.0.1:{}/{database}", self.port)
    }
}

impl Drop for Mariadb {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn the_suite_answers_alike_on_mariadb() {
    use mysql::prelude::Queryable;
    let dir = tempfile::tempdir().unwrap();
    write_sources(dir.path());
    let server = Mariadb::start();
    let mut db = mysql::Conn::new(mysql::Opts::from_url(&server.url("mysql")).unwrap()).unwrap();
    db.query_drop("CREATE DATABASE q CHARACTER SET utf8mb4")
        .unwrap();
    db.query_drop(
        "CREATE TABLE q.flights (id BIGINT PRIMARY KEY, Country VARCHAR(8), Name VARCHAR(64), \
         Adults INT, Segments JSON) CHARACTER SET utf8mb4",
    )
    .unwrap();
    let rows: Vec<(i64, String, String, i64, String)> = flights()
        .into_iter()
        .map(|(id, c, n, a, s)| (id, c.to_owned(), n.to_owned(), a, segments_json(&s)))
        .collect();
    db.exec_batch("INSERT INTO q.flights VALUES (?, ?, ?, ?, ?)", rows)
        .unwrap();
    let ndjson = dir.path().join("flights.ndjson").display().to_string();
    let mariadb = format!("mysql:flights:{}", server.url("q"));
    for sql in NESTED.iter().chain(FLAT) {
        assert_eq!(
            answer(dir.path(), &ndjson, sql),
            answer(dir.path(), &mariadb, sql),
            "{sql}"
        );
    }
    // Push-down: the comparisons reach MariaDB, bytewise for strings (its default
    // collation ignores case: "de" must not match "DE").
    let (code, out, err) = run(&[
        "--stats",
        "--source",
        &format!("flights={mariadb}"),
        r#"SELECT f.id AS id FROM flights f WHERE f.Country == "de" || f.id < 0"#,
    ]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(out, "");
    let (code, out, err) = run(&[
        "--stats",
        "--source",
        &format!("flights={mariadb}"),
        r#"SELECT f.id AS id FROM flights f WHERE f.Country == "DE" && f.id < 50 ORDER BY id"#,
    ]);
    assert_eq!(code, 0, "{err}");
    let want = flights().iter().filter(|f| f.1 == "DE" && f.0 < 50).count();
    assert_eq!(out.lines().count(), want);
    let stats: serde_json::Value = serde_json::from_str(err.lines().last().unwrap()).unwrap();
    assert_eq!(stats["rows_in"].as_u64().unwrap(), want as u64, "{stats}");
}
