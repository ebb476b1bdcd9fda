//! `portswitch query`: the query language from the command line, over JSON.
//!
//! - `query eval EXPR [--json FILE|-] [--var NAME=JSON]…` evaluates EXPR once, with the
//!   top-level fields of one JSON object (and each `--var`) as its variables, and prints
//!   the result.
//! - `query filter EXPR [FILE|-]` reads JSON Lines and prints the lines (unchanged) for
//!   which the predicate EXPR is true, like `grep` for records; a summary goes to
//!   standard error.
//!
//! - `query run SQL [--source NAME=SPEC]… [--virtual SRC.NAME=EXPR]…` runs a SELECT
//!   over JSON Lines, JSON, CSV and SQLite sources (`query_sources`) and prints the
//!   result rows as JSON Lines.
//!
//! Exit codes: 0 done (for `filter`: at least one line matched), 1 no line matched, 2
//! bad usage or an expression that does not compile (its position is shown), 3 an
//! evaluation error (`eval`, `run`) or a line that is not a JSON object (`filter`: the
//! line number is shown and the rest is still read), 4 (`run`) a source that cannot be
//! read or a query limit reached.

use std::io::{BufRead, Read, Write};
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Subcommand};
use portswitch_query::{Limits, Map, Program, Schema, Value};

#[derive(Args, Debug)]
pub struct QueryArgs {
    #[command(subcommand)]
    command: QueryCommand,
}

#[derive(Subcommand, Debug)]
enum QueryCommand {
    /// Evaluate an expression once over the fields of a JSON object.
    Eval {
        /// The expression (docs/QUERY.md), e.g. `size(items) > 2 && user.name.matches("^a")`.
        expr: String,
        /// A JSON object whose top-level fields are the variables (`-`: standard input).
        #[arg(long)]
        json: Option<PathBuf>,
        /// One more variable, as NAME=JSON (repeatable; overrides --json's).
        #[arg(long = "var", value_name = "NAME=JSON")]
        vars: Vec<String>,
    },
    /// Run a SELECT over JSON Lines, JSON, CSV files and SQLite tables; result rows are
    /// printed as JSON Lines.
    Run {
        /// The statement (docs/QUERY.md), e.g. `SELECT f.Country, count(*) FROM
        /// flights f, f.Segments s WHERE s.Origin == "MOW" GROUP BY f.Country`.
        sql: String,
        /// A source: NAME=FILE.ndjson|.jsonl|.json|.csv, or NAME=sqlite:FILE:TABLE
        /// (repeatable). A file name quoted in FROM needs none.
        #[arg(long = "source", value_name = "NAME=SPEC")]
        sources: Vec<String>,
        /// A virtual field of a source: SOURCE.NAME=EXPR over that source's fields
        /// (repeatable).
        #[arg(long = "virtual", value_name = "SOURCE.NAME=EXPR")]
        virtuals: Vec<String>,
        /// Read every source into memory first, then time the query alone (with
        /// --stats): how the query engine compares with a database's query time.
        #[arg(long)]
        preload: bool,
        /// Print a JSON line of counts and times on standard error.
        #[arg(long)]
        stats: bool,
        /// Print what each source is asked for (columns, pushed conditions, SQL) on
        /// standard error.
        #[arg(long)]
        explain: bool,
        /// For `ports("PREFIX")`: the port switch (comma-separated members of a group).
        #[arg(long, env = "PORTSWITCH_ADDR")]
        addr: Option<String>,
        /// Log in as this user; the password comes from PORTSWITCH_PASSWORD or
        /// --password-file.
        #[arg(long, env = "PORTSWITCH_USER")]
        user: Option<String>,
        /// A file whose first line is the password of --user.
        #[arg(long)]
        password_file: Option<PathBuf>,
        /// Connect with TLS, trusting the CA in this PEM file.
        #[arg(long, env = "PORTSWITCH_CA")]
        ca: Option<PathBuf>,
        /// The server name to verify in its certificate.
        #[arg(long)]
        server_name: Option<String>,
    },
    /// Print the JSON Lines records for which a predicate is true.
    Filter {
        /// The predicate; the record's top-level fields are its variables.
        expr: String,
        /// JSON Lines input (default: standard input).
        file: Option<PathBuf>,
    },
}

/// Bytes of one JSON document read (`--json`, a `--var`, or a line of `filter`).
pub const JSON_BYTES_MAX: usize = 16 << 20;

pub async fn run(args: QueryArgs) -> crate::AppResult {
    tokio::task::spawn_blocking(move || match args.command {
        QueryCommand::Eval { expr, json, vars } => eval(&expr, json, &vars),
        QueryCommand::Filter { expr, file } => filter(&expr, file),
        QueryCommand::Run {
            sql,
            sources,
            virtuals,
            preload,
            stats,
            explain,
            addr,
            user,
            password_file,
            ca,
            server_name,
        } => {
            let conn = addr.as_deref().map(|addr| crate::ctl::Connection {
                addr,
                user: user.as_deref(),
                password_file: password_file.as_deref(),
                ca: ca.as_deref(),
                server_name: server_name.as_deref(),
                cert_key: None,
            });
            let flags = RunFlags {
                preload,
                stats,
                explain,
            };
            run_select(&sql, &sources, &virtuals, conn, flags)
        }
    })
    .await?
}

fn compile(expr: &str) -> Result<Program, ExitCode> {
    Program::compile(expr, &Schema::new(), &Limits::default()).map_err(|e| {
        eprintln!("error: {e}");
        ExitCode::from(2)
    })
}

/// A JSON value as a query value: integers that fit an i64 stay integers, other
/// numbers are floats; objects are maps, arrays lists.
fn from_json(v: serde_json::Value) -> Value {
    match v {
        serde_json::Value::Null => Value::Null,
        serde_json::Value::Bool(b) => Value::Bool(b),
        serde_json::Value::Number(n) => match n.as_i64() {
            Some(i) => Value::Int(i),
            None => Value::Float(n.as_f64().unwrap_or(f64::NAN)),
        },
        serde_json::Value::String(s) => Value::from(s),
        serde_json::Value::Array(a) => Value::list(a.into_iter().map(from_json)),
        serde_json::Value::Object(o) => {
            let mut m = Map::with_capacity(o.len());
            for (k, v) in o {
                m.insert(k, from_json(v));
            }
            Value::Map(std::sync::Arc::new(m))
        }
    }
}

fn read_limited(path: &PathBuf) -> std::io::Result<Vec<u8>> {
    use std::io::Read;
    let mut buf = Vec::new();
    let src: Box<dyn Read> = if path.as_os_str() == "-" {
        Box::new(std::io::stdin().lock())
    } else {
        Box::new(
            std::fs::File::open(path)
                .map_err(|e| std::io::Error::other(format!("{}: {e}", path.display())))?,
        )
    };
    src.take(JSON_BYTES_MAX as u64 + 1).read_to_end(&mut buf)?;
    if buf.len() > JSON_BYTES_MAX {
        return Err(std::io::Error::other(format!(
            "{}: over {JSON_BYTES_MAX} bytes",
            path.display()
        )));
    }
    Ok(buf)
}

fn eval(expr: &str, json: Option<PathBuf>, vars: &[String]) -> crate::AppResult {
    let program = match compile(expr) {
        Ok(p) => p,
        Err(code) => return Ok(code),
    };
    let mut record = Map::new();
    if let Some(path) = json {
        let bytes = read_limited(&path)?;
        match serde_json::from_slice::<serde_json::Value>(&bytes) {
            Ok(serde_json::Value::Object(o)) => {
                for (k, v) in o {
                    record.insert(k, from_json(v));
                }
            }
            Ok(_) => {
                eprintln!("error: {}: not a JSON object", path.display());
                return Ok(ExitCode::from(2));
            }
            Err(e) => {
                eprintln!("error: {}: {e}", path.display());
                return Ok(ExitCode::from(2));
            }
        }
    }
    for v in vars {
        let Some((name, text)) = v.split_once('=') else {
            eprintln!("error: --var {v}: expected NAME=JSON");
            return Ok(ExitCode::from(2));
        };
        if text.len() > JSON_BYTES_MAX {
            eprintln!("error: --var {name}: over {JSON_BYTES_MAX} bytes");
            return Ok(ExitCode::from(2));
        }
        match serde_json::from_str::<serde_json::Value>(text) {
            Ok(j) => {
                record.insert(name.to_string(), from_json(j));
            }
            Err(e) => {
                eprintln!("error: --var {name}: {e}");
                return Ok(ExitCode::from(2));
            }
        }
    }
    let mut b = program.bindings();
    b.set_from_map(&record);
    match program.eval(&b) {
        Ok(v) => {
            println!("{v}");
            Ok(ExitCode::SUCCESS)
        }
        Err(e) => {
            eprintln!("error: {e}");
            Ok(ExitCode::from(3))
        }
    }
}

fn filter(expr: &str, file: Option<PathBuf>) -> crate::AppResult {
    let program = match compile(expr) {
        Ok(p) => p,
        Err(code) => return Ok(code),
    };
    let input: Box<dyn BufRead> = match &file {
        None => Box::new(std::io::stdin().lock()),
        Some(p) if p.as_os_str() == "-" => Box::new(std::io::stdin().lock()),
        Some(p) => Box::new(std::io::BufReader::new(
            std::fs::File::open(p)
                .map_err(|e| std::io::Error::other(format!("{}: {e}", p.display())))?,
        )),
    };
    let out = std::io::stdout();
    let mut out = std::io::BufWriter::new(out.lock());
    // `read` numbers lines (for messages); `records` counts the non-blank ones.
    let (mut read, mut records, mut matched, mut bad) = (0u64, 0u64, 0u64, 0u64);
    let mut line = Vec::new();
    let mut input = input;
    loop {
        line.clear();
        // One line, but no more than the limit: a longer one is reported and skipped,
        // never read into memory whole.
        let n = std::io::Read::take(input.by_ref(), JSON_BYTES_MAX as u64 + 1)
            .read_until(b'\n', &mut line)?;
        if n == 0 {
            break;
        }
        read += 1;
        if line.len() > JSON_BYTES_MAX {
            eprintln!("line {read}: over {JSON_BYTES_MAX} bytes; skipped");
            records += 1;
            bad += 1;
            let mut rest = Vec::new();
            loop {
                rest.clear();
                let k =
                    std::io::Read::take(input.by_ref(), 1 << 20).read_until(b'\n', &mut rest)?;
                if k == 0 || rest.ends_with(b"\n") {
                    break;
                }
            }
            continue;
        }
        let text = line.strip_suffix(b"\n").unwrap_or(&line);
        if text.iter().all(|c| c.is_ascii_whitespace()) {
            continue;
        }
        records += 1;
        let record = match serde_json::from_slice::<serde_json::Value>(text) {
            Ok(serde_json::Value::Object(o)) => {
                let mut m = Map::with_capacity(o.len());
                for (k, v) in o {
                    m.insert(k, from_json(v));
                }
                m
            }
            Ok(_) => {
                eprintln!("line {read}: not a JSON object; skipped");
                bad += 1;
                continue;
            }
            Err(e) => {
                eprintln!("line {read}: {e}; skipped");
                bad += 1;
                continue;
            }
        };
        let mut b = program.bindings();
        b.set_from_map(&record);
        match program.eval_bool(&b) {
            Ok(true) => {
                matched += 1;
                out.write_all(text)?;
                out.write_all(b"\n")?;
            }
            Ok(false) => {}
            Err(e) => {
                eprintln!("line {read}: {e}");
                bad += 1;
            }
        }
    }
    out.flush()?;
    eprintln!("{matched} of {records} records matched; {bad} skipped");
    Ok(if bad > 0 {
        ExitCode::from(3)
    } else if matched > 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

struct RunFlags {
    preload: bool,
    stats: bool,
    explain: bool,
}

fn run_select(
    sql: &str,
    sources: &[String],
    virtuals: &[String],
    conn: Option<crate::ctl::Connection<'_>>,
    RunFlags {
        preload,
        stats,
        explain,
    }: RunFlags,
) -> crate::AppResult {
    use portswitch_query::query::{Rows, Scan, Sources};
    use portswitch_query::{Catalog, Query, QueryError, QueryLimits, SourceInfo};

    use crate::query_sources::{ports_filter, to_json, FileSources, Spec, Switch, PORTS};

    let mut named = std::collections::HashMap::new();
    for s in sources {
        let Some((name, spec)) = s.split_once('=') else {
            eprintln!("error: --source {s}: expected NAME=SPEC");
            return Ok(ExitCode::from(2));
        };
        match Spec::parse(spec) {
            Ok(spec) => {
                named.insert(name.to_owned(), spec);
            }
            Err(e) => {
                eprintln!("error: --source {name}: {e}");
                return Ok(ExitCode::from(2));
            }
        }
    }
    let mut catalog = Catalog::open();
    let mut infos: std::collections::HashMap<String, SourceInfo> = Default::default();
    for v in virtuals {
        let Some((lhs, expr)) = v.split_once('=') else {
            eprintln!("error: --virtual {v}: expected SOURCE.NAME=EXPR");
            return Ok(ExitCode::from(2));
        };
        let Some((source, field)) = lhs.split_once('.') else {
            eprintln!("error: --virtual {v}: expected SOURCE.NAME=EXPR");
            return Ok(ExitCode::from(2));
        };
        infos
            .entry(source.to_owned())
            .or_default()
            .virtuals
            .push((field.to_owned(), expr.to_owned()));
    }
    for (name, info) in infos {
        catalog.insert(name, info);
    }
    let query = match Query::prepare(sql, &catalog, &QueryLimits::default()) {
        Ok(q) => q,
        Err(e) => {
            eprintln!("error: {e}");
            return Ok(ExitCode::from(2));
        }
    };
    let reads_ports = query
        .scans()
        .iter()
        .any(|s| s.name == PORTS && !named.contains_key(PORTS));
    let switch = match (reads_ports, conn) {
        (true, Some(conn)) => {
            let runtime = tokio::runtime::Handle::current();
            let connected = conn
                .options()
                .map_err(|e| e.to_string())
                .and_then(|(_, mut opts)| {
                    // The session ends with the command.
                    opts.end_on_disconnect = true;
                    runtime
                        .block_on(portswitch_client::Client::connect(opts))
                        .map_err(|e| e.to_string())
                });
            match connected {
                Ok(client) => Some(Switch { runtime, client }),
                Err(e) => {
                    eprintln!("error: source `ports`: {e}");
                    return Ok(ExitCode::from(4));
                }
            }
        }
        _ => None,
    };
    let files = FileSources { named, switch };
    if explain {
        for scan in query.scans() {
            let fields = scan
                .fields
                .as_ref()
                .map_or_else(|| "*".to_owned(), |f| f.join(", "));
            eprintln!("scan {} AS {}: fields [{fields}]", scan.name, scan.alias);
            for p in &scan.filters {
                eprintln!("  pushed: {} {} {}", p.field, p.op.sql(), p.value);
            }
            if let Some(q) = files.sql_for(scan) {
                eprintln!("  sql: {q}");
            }
            if scan.name == PORTS {
                if let Some(f) = ports_filter(scan) {
                    eprintln!("  server filter: {f}");
                }
            }
        }
    }

    /// Sources read whole before the query runs.
    struct Loaded(std::collections::HashMap<String, Vec<Value>>);
    impl Sources for Loaded {
        fn open(&self, scan: &Scan) -> Result<Rows<'_>, String> {
            let rows = self.0.get(&scan.name).ok_or("not loaded")?;
            Ok(Box::new(rows.iter().cloned().map(Ok)))
        }
    }
    let started = std::time::Instant::now();
    let mut loaded = None;
    if preload {
        let mut tables = std::collections::HashMap::new();
        for scan in query.scans() {
            if tables.contains_key(&scan.name) {
                continue;
            }
            // Read with no push-down: the whole source, as a database holds it.
            let whole = Scan {
                fields: None,
                filters: Vec::new(),
                ..scan.clone()
            };
            let rows: Result<Vec<Value>, String> =
                files.open(&whole).and_then(|r| r.collect::<Result<_, _>>());
            match rows {
                Ok(rows) => {
                    tables.insert(scan.name.clone(), rows);
                }
                Err(e) => {
                    eprintln!("error: source `{}`: {e}", scan.name);
                    return Ok(ExitCode::from(4));
                }
            }
        }
        loaded = Some(Loaded(tables));
    }
    let load_time = started.elapsed();
    let out = std::io::stdout();
    let mut out = std::io::BufWriter::new(out.lock());
    let columns = query.columns().to_vec();
    let mut write_error = None;
    let query_started = std::time::Instant::now();
    let mut sink = |row: Vec<Value>| {
        let obj: serde_json::Map<String, serde_json::Value> = columns
            .iter()
            .zip(&row)
            .map(|(c, v)| (c.clone(), to_json(v)))
            .collect();
        let written = serde_json::to_writer(&mut out, &serde_json::Value::Object(obj))
            .map_err(std::io::Error::from)
            .and_then(|()| out.write_all(b"\n"));
        match written {
            Ok(()) => true,
            Err(e) => {
                write_error = Some(e);
                false
            }
        }
    };
    let result = match &loaded {
        Some(l) => query.run(l, &mut sink),
        None => query.run(&files, &mut sink),
    };
    let query_time = query_started.elapsed();
    if let Some(e) = write_error {
        // A closed pipe (`| head`) is not an error of the query.
        if e.kind() != std::io::ErrorKind::BrokenPipe {
            return Err(e.into());
        }
    }
    out.flush().or_else(|e| {
        if e.kind() == std::io::ErrorKind::BrokenPipe {
            Ok(())
        } else {
            Err(e)
        }
    })?;
    match result {
        Ok(s) => {
            if stats {
                eprintln!(
                    "{}",
                    serde_json::json!({
                        "load_ms": load_time.as_secs_f64() * 1e3,
                        "query_ms": query_time.as_secs_f64() * 1e3,
                        "rows_in": s.rows_scanned,
                        "rows_examined": s.rows_examined,
                        "rows_joined": s.rows_joined,
                        "groups": s.groups,
                        "rows_out": s.rows_out,
                    })
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        Err(e @ QueryError::Eval(_)) => {
            eprintln!("error: {e}");
            Ok(ExitCode::from(3))
        }
        Err(e) => {
            eprintln!("error: {e}");
            Ok(ExitCode::from(4))
        }
    }
}
