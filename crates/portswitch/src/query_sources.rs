//! The sources of `portswitch query run`: the I/O edge of the query engine.
//!
//! - JSON Lines (`.ndjson`, `.jsonl`): streamed, one record per line.
//! - JSON (`.json`): one array of records (or one record), read whole, at most
//!   [`JSON_FILE_BYTES_MAX`].
//! - CSV (`.csv`): a header row, then records; a field is an int if it reads as one, a
//!   float if it reads as one, null if empty, a string otherwise.
//! - SQLite (`sqlite:FILE:TABLE`): the table's rows, read on a thread of their own and
//!   streamed; the query's simple conditions and the columns it reads are pushed into the
//!   SQL. A column declared `JSON` is parsed into nested values.
//!
//! - PostgreSQL (`postgres:TABLE:CONNINFO`): the table's rows through a cursor, in
//!   batches, on a thread of their own; the columns read and the simple comparisons go
//!   into the SQL (strings compared in the "C" collation, bytewise as the engine does).
//!   `json`/`jsonb` columns are parsed into nested values.
//! - MariaDB/MySQL (`mysql:TABLE:URL`): the table's rows streamed on a thread of their
//!   own; columns and comparisons pushed (strings compared as binary on UTF-8 columns).
//! - The port switch (`ports("PREFIX")`): the owned ports under a prefix, listed from
//!   a running server (`--addr`); the query's simple conditions on the port record go to
//!   the server as a LIST_WHERE filter, so only matching ports travel.
//!
//! Every record is converted straight from the parser's events into the engine's values
//! (no intermediate `serde_json::Value`).

use std::collections::HashMap;
use std::fmt;
use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::sync::{mpsc, Arc};

use portswitch_query::query::{Pushed, Rows, Scan, Sources};
use portswitch_query::{Map, Value};
use serde::de::{DeserializeSeed, Deserializer, MapAccess, SeqAccess, Visitor};

/// Largest `.json` file read whole.
pub const JSON_FILE_BYTES_MAX: u64 = 4 << 30;
/// Longest line of a JSON Lines file.
pub const LINE_BYTES_MAX: usize = 16 << 20;
/// Deepest nesting of a JSON record: deeper documents are refused, not recursed into
/// (serde_json's own guard stops at 128).
pub const JSON_DEPTH_MAX: usize = 100;
/// Rows a SQLite reader thread may run ahead of the query.
const SQLITE_AHEAD: usize = 4096;

/// How a source name given with `--source NAME=SPEC` (or quoted in FROM) is read.
#[derive(Clone, Debug, PartialEq)]
pub enum Spec {
    JsonLines(PathBuf),
    Json(PathBuf),
    Csv(PathBuf),
    Sqlite { file: PathBuf, table: String },
    Postgres { table: String, conninfo: String },
    Mysql { table: String, url: String },
}

impl Spec {
    /// `sqlite:FILE:TABLE`, or a file whose extension says its format.
    pub fn parse(spec: &str) -> Result<Spec, String> {
        if let Some(rest) = spec.strip_prefix("postgres:") {
            let (table, conninfo) = rest
                .split_once(':')
                .ok_or_else(|| format!("{spec}: expected postgres:TABLE:CONNINFO"))?;
            if table.is_empty() || conninfo.is_empty() {
                return Err(format!("{spec}: expected postgres:TABLE:CONNINFO"));
            }
            return Ok(Spec::Postgres {
                table: table.into(),
                conninfo: conninfo.into(),
            });
        }
        if let Some(rest) = spec.strip_prefix("mysql:") {
            let (table, url) = rest
                .split_once(':')
                .ok_or_else(|| format!("{spec}: expected mysql:TABLE:URL"))?;
            if table.is_empty() || url.is_empty() {
                return Err(format!("{spec}: expected mysql:TABLE:URL"));
            }
            return Ok(Spec::Mysql {
                table: table.into(),
                url: url.into(),
            });
        }
        if let Some(rest) = spec.strip_prefix("sqlite:") {
            let (file, table) = rest
                .rsplit_once(':')
                .ok_or_else(|| format!("{spec}: expected sqlite:FILE:TABLE"))?;
            if table.is_empty() {
                return Err(format!("{spec}: no table name"));
            }
            return Ok(Spec::Sqlite {
                file: file.into(),
                table: table.into(),
            });
        }
        let path = PathBuf::from(spec);
        match path.extension().and_then(|e| e.to_str()) {
            Some("ndjson" | "jsonl") => Ok(Spec::JsonLines(path)),
            Some("json") => Ok(Spec::Json(path)),
            Some("csv") => Ok(Spec::Csv(path)),
            _ => Err(format!(
                "{spec}: not a known source (.ndjson, .jsonl, .json, .csv or sqlite:FILE:TABLE)"
            )),
        }
    }
}

/// The sources of one run: names bound with `--source`, file names quoted in FROM,
/// and `ports(…)` on a port switch when connected.
pub struct FileSources {
    pub named: HashMap<String, Spec>,
    pub switch: Option<Switch>,
}

/// A session on a port switch, for `ports(…)`; `open` runs on a blocking thread and
/// waits on the runtime for each listing.
pub struct Switch {
    pub runtime: tokio::runtime::Handle,
    pub client: portswitch_client::Client,
}

/// The name under which FROM reads a port switch's ports.
pub const PORTS: &str = "ports";

/// The filter expression sent to the server for a `ports` scan: the pushed comparisons
/// on the fields the server's port record has, joined with `&&`.
pub fn ports_filter(scan: &Scan) -> Option<String> {
    const SERVER_FIELDS: [&str; 5] = ["name", "text", "session", "node", "token"];
    let parts: Vec<String> = scan
        .filters
        .iter()
        .filter(|p| SERVER_FIELDS.contains(&p.field.as_str()))
        .filter(|p| match (&p.value, p.field.as_str()) {
            (Value::Int(_), "token") => true,
            (Value::String(_), f) => f != "token",
            _ => false,
        })
        .map(|p| {
            let op = match p.op {
                portswitch_query::query::CmpOp::Eq => "==",
                other => other.sql(),
            };
            format!("{} {op} {}", p.field, p.value)
        })
        .collect();
    (!parts.is_empty()).then(|| parts.join(" && "))
}

fn port_record(o: &portswitch_client::Owner) -> Value {
    let mut m = Map::with_capacity(7);
    m.insert(
        "name",
        Value::from(String::from_utf8_lossy(&o.port).as_ref()),
    );
    m.insert("value", Value::from(&o.value[..]));
    m.insert(
        "text",
        Value::from(String::from_utf8_lossy(&o.value).as_ref()),
    );
    m.insert("session", Value::from(format!("{:016x}", o.session)));
    m.insert(
        "node",
        Value::from(String::from_utf8_lossy(&o.node).as_ref()),
    );
    m.insert(
        "token",
        Value::Int(i64::try_from(o.token).unwrap_or(i64::MAX)),
    );
    m.insert("json", parse_json(&o.value).unwrap_or(Value::Null));
    Value::Map(Arc::new(m))
}

impl FileSources {
    fn ports(&self, scan: &Scan) -> Result<Rows<'_>, String> {
        let Some(switch) = &self.switch else {
            return Err("ports(…) needs a port switch: pass --addr".into());
        };
        let prefix = match scan.args.as_slice() {
            [] => String::new(),
            [Value::String(p)] => p.to_string(),
            _ => return Err("ports takes one argument, a prefix string: ports(\"svc/\")".into()),
        };
        let client = &switch.client;
        let listed = switch.runtime.block_on(async {
            match ports_filter(scan) {
                Some(filter) => client.list_all_where(prefix.as_bytes(), &filter).await,
                None => client.list_all(prefix.as_bytes()).await,
            }
        });
        let owners = listed.map_err(|e| e.to_string())?;
        Ok(Box::new(owners.into_iter().map(|o| Ok(port_record(&o)))))
    }
}

impl FileSources {
    fn spec(&self, name: &str) -> Result<Spec, String> {
        match self.named.get(name) {
            None if name == PORTS => Err("ports is read from a port switch".into()),
            Some(s) => Ok(s.clone()),
            None => {
                Spec::parse(name).map_err(|e| format!("{e}; bind a name with --source {name}=FILE"))
            }
        }
    }

    /// The SQL a SQLite scan sends (for `--explain` and tests).
    pub fn sql_for(&self, scan: &Scan) -> Option<String> {
        match self.spec(&scan.name) {
            Ok(Spec::Sqlite { table, .. }) => Some(sqlite_sql(&table, scan).0),
            _ => None,
        }
    }
}

impl Sources for FileSources {
    fn open(&self, scan: &Scan) -> Result<Rows<'_>, String> {
        if scan.name == PORTS && !self.named.contains_key(PORTS) {
            return self.ports(scan);
        }
        if !scan.args.is_empty() {
            return Err("file sources take no arguments".into());
        }
        match self.spec(&scan.name)? {
            Spec::JsonLines(path) => json_lines(&path),
            Spec::Json(path) => json_file(&path),
            Spec::Csv(path) => csv_file(&path),
            Spec::Sqlite { file, table } => sqlite(&file, &table, scan),
            Spec::Postgres { table, conninfo } => postgres(&conninfo, &table, scan),
            Spec::Mysql { table, url } => mysql(&url, &table, scan),
        }
    }
}

fn open_file(path: &Path) -> Result<std::fs::File, String> {
    std::fs::File::open(path).map_err(|e| format!("{}: {e}", path.display()))
}

fn json_lines(path: &Path) -> Result<Rows<'static>, String> {
    let mut input = std::io::BufReader::with_capacity(1 << 20, open_file(path)?);
    let shown = path.display().to_string();
    let mut line = Vec::new();
    let mut number = 0u64;
    Ok(Box::new(std::iter::from_fn(move || loop {
        line.clear();
        let read =
            std::io::Read::take(&mut input, LINE_BYTES_MAX as u64 + 1).read_until(b'\n', &mut line);
        match read {
            Err(e) => return Some(Err(format!("{shown}: {e}"))),
            Ok(0) => return None,
            Ok(_) => {}
        }
        number += 1;
        if line.len() > LINE_BYTES_MAX {
            return Some(Err(format!(
                "{shown}:{number}: line longer than {LINE_BYTES_MAX} bytes"
            )));
        }
        if line.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        return Some(parse_json(&line).map_err(|e| format!("{shown}:{number}: {e}")));
    })))
}

fn json_file(path: &Path) -> Result<Rows<'static>, String> {
    let file = open_file(path)?;
    let len = file.metadata().map(|m| m.len()).unwrap_or(0);
    if len > JSON_FILE_BYTES_MAX {
        return Err(format!(
            "{}: {len} bytes, more than {JSON_FILE_BYTES_MAX}; use JSON Lines to stream",
            path.display()
        ));
    }
    let bytes = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let doc = parse_json(&bytes).map_err(|e| format!("{}: {e}", path.display()))?;
    let rows: Vec<Value> = match doc {
        Value::List(items) => items.to_vec(),
        other => vec![other],
    };
    Ok(Box::new(rows.into_iter().map(Ok)))
}

fn csv_file(path: &Path) -> Result<Rows<'static>, String> {
    let shown = path.display().to_string();
    let mut reader = csv::ReaderBuilder::new()
        .has_headers(true)
        .from_reader(std::io::BufReader::new(open_file(path)?));
    let headers: Vec<Arc<str>> = reader
        .headers()
        .map_err(|e| format!("{shown}: {e}"))?
        .iter()
        .map(Arc::from)
        .collect();
    let mut records = reader.into_records();
    Ok(Box::new(std::iter::from_fn(move || {
        let record = match records.next()? {
            Ok(r) => r,
            Err(e) => return Some(Err(format!("{shown}: {e}"))),
        };
        let mut m = Map::with_capacity(headers.len());
        for (name, text) in headers.iter().zip(record.iter()) {
            m.insert(name.clone(), csv_value(text));
        }
        Some(Ok(Value::Map(Arc::new(m))))
    })))
}

fn csv_value(text: &str) -> Value {
    if text.is_empty() {
        Value::Null
    } else if let Ok(i) = text.parse::<i64>() {
        Value::Int(i)
    } else if let Some(f) = text.parse::<f64>().ok().filter(|f| f.is_finite()) {
        Value::Float(f)
    } else {
        Value::from(text)
    }
}

fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// The SQL for a scan and its parameters: the columns the query reads and the pushed
/// comparisons, bound as parameters.
fn sqlite_sql(table: &str, scan: &Scan) -> (String, Vec<rusqlite::types::Value>) {
    let columns = match &scan.fields {
        Some(f) if !f.is_empty() => f
            .iter()
            .map(|c| quote_ident(c))
            .collect::<Vec<_>>()
            .join(", "),
        _ => "*".to_owned(),
    };
    let mut sql = format!("SELECT {columns} FROM {}", quote_ident(table));
    let mut params = Vec::new();
    for (i, Pushed { field, op, value }) in scan.filters.iter().enumerate() {
        let param = match value {
            Value::Int(n) => rusqlite::types::Value::Integer(*n),
            Value::Float(x) => rusqlite::types::Value::Real(*x),
            Value::String(s) => rusqlite::types::Value::Text(s.to_string()),
            // SQLite has no booleans: a stored 1 is no `true` to the engine.
            _ => continue,
        };
        sql.push_str(if params.is_empty() {
            " WHERE "
        } else {
            " AND "
        });
        // A column that holds another type than the literal compares differently in
        // SQL than in the engine: push only what SQLite compares the same way, by
        // checking the stored type too.
        let kind = match value {
            Value::String(_) => "'text'",
            _ => "'integer','real'",
        };
        let col = quote_ident(field);
        sql.push_str(&format!(
            "({col} {} ?{} OR typeof({col}) NOT IN ({kind}))",
            op.sql(),
            i + 1
        ));
        params.push(param);
    }
    (sql, params)
}

/// Reads a SQLite table on a thread of its own (its rows borrow its statement) and
/// streams them through a bounded channel.
fn sqlite(file: &Path, table: &str, scan: &Scan) -> Result<Rows<'static>, String> {
    let (sql, params) = sqlite_sql(table, scan);
    let file = file.to_owned();
    let table = table.to_owned();
    let shown = file.display().to_string();
    let (tx, rx) = mpsc::sync_channel::<Result<Value, String>>(SQLITE_AHEAD);
    let (ready_tx, ready_rx) = mpsc::sync_channel::<Result<(), String>>(1);
    std::thread::Builder::new()
        .name("query-sqlite".into())
        .spawn(move || {
            let result = (|| -> Result<(), String> {
                let conn = rusqlite::Connection::open_with_flags(
                    &file,
                    rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY
                        | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX,
                )
                .map_err(|e| format!("{shown}: {e}"))?;
                // Columns declared `JSON` hold documents to parse.
                let mut declared = conn
                    .prepare(
                        "SELECT name FROM pragma_table_info(?1) WHERE type = 'JSON' COLLATE NOCASE",
                    )
                    .map_err(|e| format!("{shown}: {e}"))?;
                let json_names: Vec<String> = declared
                    .query_map([&table], |r| r.get::<_, String>(0))
                    .and_then(|rows| rows.collect())
                    .map_err(|e| format!("{shown}: {e}"))?;
                drop(declared);
                let mut stmt = conn.prepare(&sql).map_err(|e| format!("{shown}: {e}"))?;
                let names: Vec<Arc<str>> = stmt.column_names().into_iter().map(Arc::from).collect();
                let json_cols: Vec<bool> = names
                    .iter()
                    .map(|n| json_names.iter().any(|j| j.as_str() == n.as_ref()))
                    .collect();
                let mut rows = stmt
                    .query(rusqlite::params_from_iter(params.iter()))
                    .map_err(|e| format!("{shown}: {e}"))?;
                let _ = ready_tx.send(Ok(()));
                while let Some(row) = rows.next().map_err(|e| format!("{shown}: {e}"))? {
                    let mut m = Map::with_capacity(names.len());
                    for (i, name) in names.iter().enumerate() {
                        let v = match row.get_ref(i).map_err(|e| format!("{shown}: {e}"))? {
                            rusqlite::types::ValueRef::Null => Value::Null,
                            rusqlite::types::ValueRef::Integer(n) => Value::Int(n),
                            rusqlite::types::ValueRef::Real(x) => Value::Float(x),
                            rusqlite::types::ValueRef::Text(t) if json_cols[i] => {
                                parse_json(t).map_err(|e| format!("{shown}: column {name}: {e}"))?
                            }
                            rusqlite::types::ValueRef::Text(t) => {
                                Value::from(String::from_utf8_lossy(t).as_ref())
                            }
                            rusqlite::types::ValueRef::Blob(b) => Value::from(b),
                        };
                        m.insert(name.clone(), v);
                    }
                    if tx.send(Ok(Value::Map(Arc::new(m)))).is_err() {
                        return Ok(()); // the query stopped reading
                    }
                }
                Ok(())
            })();
            if let Err(e) = result {
                let _ = ready_tx.send(Err(e.clone()));
                let _ = tx.send(Err(e));
            }
        })
        .map_err(|e| format!("cannot start a reader thread: {e}"))?;
    // The thread says whether the statement started; if it died first, its error (or
    // the end of rows) comes through the row channel.
    if let Ok(Err(e)) = ready_rx.recv() {
        return Err(e);
    }
    Ok(Box::new(rx.into_iter()))
}

/// Rows fetched from a PostgreSQL cursor at a time.
const POSTGRES_BATCH: usize = 10_000;

/// A PostgreSQL column's type, as the source decodes it.
#[derive(Clone, Copy, Debug, PartialEq)]
enum PgKind {
    Int,
    Float,
    Bool,
    Json,
    Bytes,
    Text,
}

fn pg_kind(data_type: &str) -> PgKind {
    match data_type {
        "smallint" | "integer" | "bigint" => PgKind::Int,
        "real" | "double precision" | "numeric" => PgKind::Float,
        "boolean" => PgKind::Bool,
        "json" | "jsonb" => PgKind::Json,
        "bytea" => PgKind::Bytes,
        _ => PgKind::Text,
    }
}

fn pg_quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// A literal as SQL text, or `None` when it is not pushed (NaN, infinities, NUL).
fn pg_literal(v: &Value) -> Option<String> {
    match v {
        Value::Int(i) => Some(i.to_string()),
        Value::Float(f) if f.is_finite() => Some(format!("{f:?}")),
        Value::String(s) if !s.contains('\0') => Some(format!("'{}'", s.replace('\'', "''"))),
        _ => None,
    }
}

/// The SELECT for a scan of `table` whose columns are `columns` (name, kind): the
/// columns the query reads, each cast to text (decoded here by kind), and the pushed
/// comparisons a column of the right kind can take. Strings compare in the "C"
/// collation (bytewise, as the engine compares); numbers numerically.
fn postgres_sql(table: &str, columns: &[(String, PgKind)], scan: &Scan) -> String {
    let wanted = pg_wanted(columns, scan);
    let list = if wanted.is_empty() {
        "1".to_owned()
    } else {
        wanted
            .iter()
            .map(|(c, _)| format!("{}::text", pg_quote_ident(c)))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let mut sql = format!("SELECT {list} FROM {}", pg_quote_ident(table));
    let mut first = true;
    for Pushed { field, op, value } in &scan.filters {
        let Some(kind) = columns.iter().find(|(c, _)| c == field).map(|(_, k)| *k) else {
            continue;
        };
        let Some(literal) = pg_literal(value) else {
            continue;
        };
        let col = pg_quote_ident(field);
        let condition = match (kind, value) {
            (PgKind::Int | PgKind::Float, Value::Int(_) | Value::Float(_)) => {
                format!("{col} {} {literal}", op.sql())
            }
            (PgKind::Text, Value::String(_)) => {
                format!("{col} COLLATE \"C\" {} {literal}", op.sql())
            }
            _ => continue,
        };
        sql.push_str(if first { " WHERE " } else { " AND " });
        first = false;
        sql.push_str(&condition);
    }
    sql
}

/// The columns a scan reads, in the table's order.
fn pg_wanted<'c>(columns: &'c [(String, PgKind)], scan: &Scan) -> Vec<&'c (String, PgKind)> {
    match &scan.fields {
        Some(f) => columns.iter().filter(|(c, _)| f.contains(c)).collect(),
        None => columns.iter().collect(),
    }
}

fn pg_value(kind: PgKind, text: Option<&str>) -> Result<Value, String> {
    let Some(t) = text else {
        return Ok(Value::Null);
    };
    Ok(match kind {
        PgKind::Int => Value::Int(t.parse().map_err(|e| format!("{t:?}: {e}"))?),
        PgKind::Float => match t {
            "NaN" => Value::Float(f64::NAN),
            "Infinity" => Value::Float(f64::INFINITY),
            "-Infinity" => Value::Float(f64::NEG_INFINITY),
            _ => Value::Float(t.parse().map_err(|e| format!("{t:?}: {e}"))?),
        },
        PgKind::Bool => Value::Bool(t == "true" || t == "t"),
        PgKind::Json => parse_json(t.as_bytes())?,
        PgKind::Bytes => {
            let hex = t.strip_prefix("\\x").ok_or("bytea not in hex format")?;
            if hex.len() % 2 != 0 || !hex.is_ascii() {
                return Err("bytea: odd or non-hex text".into());
            }
            let bytes: Result<Vec<u8>, String> = (0..hex.len() / 2)
                .map(|i| u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).map_err(|e| e.to_string()))
                .collect();
            Value::from(&bytes?[..])
        }
        PgKind::Text => Value::from(t),
    })
}

/// Reads a PostgreSQL table on a thread of its own (the synchronous client runs a
/// runtime of its own, which must not be inside ours) through a cursor, streaming rows
/// through a bounded channel.
fn postgres(conninfo: &str, table: &str, scan: &Scan) -> Result<Rows<'static>, String> {
    let (conninfo, table, scan) = (conninfo.to_owned(), table.to_owned(), scan.clone());
    let (tx, rx) = mpsc::sync_channel::<Result<Value, String>>(SQLITE_AHEAD);
    let (ready_tx, ready_rx) = mpsc::sync_channel::<Result<(), String>>(1);
    std::thread::Builder::new()
        .name("query-postgres".into())
        .spawn(move || {
            let result = (|| -> Result<(), String> {
                let e = |e: postgres::Error| format!("{table}: {e}");
                let mut client =
                    postgres::Client::connect(&conninfo, postgres::NoTls).map_err(e)?;
                let columns: Vec<(String, PgKind)> = client
                    .query(
                        "SELECT column_name::text, data_type::text FROM information_schema.columns \
                         WHERE table_name = $1 AND table_schema = current_schema() \
                         ORDER BY ordinal_position",
                        &[&table],
                    )
                    .map_err(e)?
                    .iter()
                    .map(|r| (r.get::<_, String>(0), pg_kind(&r.get::<_, String>(1))))
                    .collect();
                if columns.is_empty() {
                    return Err(format!(
                        "{table}: no such table (or no columns) in the current schema"
                    ));
                }
                let sql = postgres_sql(&table, &columns, &scan);
                let wanted: Vec<(Arc<str>, PgKind)> = pg_wanted(&columns, &scan)
                    .into_iter()
                    .map(|(c, k)| (Arc::from(c.as_str()), *k))
                    .collect();
                let mut txn = client.transaction().map_err(e)?;
                txn.batch_execute(&format!(
                    "DECLARE portswitch_scan NO SCROLL CURSOR FOR {sql}"
                ))
                .map_err(e)?;
                let _ = ready_tx.send(Ok(()));
                loop {
                    let messages = txn
                        .simple_query(&format!("FETCH {POSTGRES_BATCH} FROM portswitch_scan"))
                        .map_err(e)?;
                    let mut rows = 0usize;
                    for m in messages {
                        let postgres::SimpleQueryMessage::Row(row) = m else {
                            continue;
                        };
                        rows += 1;
                        let mut map = Map::with_capacity(wanted.len());
                        for (i, (name, kind)) in wanted.iter().enumerate() {
                            let v = pg_value(*kind, row.get(i))
                                .map_err(|err| format!("{table}.{name}: {err}"))?;
                            map.insert(name.clone(), v);
                        }
                        if tx.send(Ok(Value::Map(Arc::new(map)))).is_err() {
                            return Ok(()); // the query stopped reading
                        }
                    }
                    if rows < POSTGRES_BATCH {
                        return Ok(());
                    }
                }
            })();
            if let Err(e) = result {
                let _ = ready_tx.send(Err(e.clone()));
                let _ = tx.send(Err(e));
            }
        })
        .map_err(|e| format!("cannot start a reader thread: {e}"))?;
    if let Ok(Err(e)) = ready_rx.recv() {
        return Err(e);
    }
    Ok(Box::new(rx.into_iter()))
}

/// A MariaDB/MySQL column's type, as the source decodes it (the text protocol gives
/// every value as text).
fn my_kind(data_type: &str, json: bool) -> PgKind {
    match data_type {
        _ if json => PgKind::Json,
        "tinyint" | "smallint" | "mediumint" | "int" | "bigint" | "year" => PgKind::Int,
        "float" | "double" | "decimal" => PgKind::Float,
        "json" => PgKind::Json,
        "binary" | "varbinary" | "tinyblob" | "blob" | "mediumblob" | "longblob" => PgKind::Bytes,
        _ => PgKind::Text,
    }
}

/// The SELECT for a MariaDB/MySQL scan (the session runs with ANSI_QUOTES and
/// NO_BACKSLASH_ESCAPES, so quoting is as in PostgreSQL): the columns the query reads,
/// and the comparisons a column of the right kind can take — strings only on UTF-8
/// columns, compared as binary (bytewise, as the engine compares, where the default
/// collations ignore case).
fn mysql_sql(table: &str, columns: &[(String, PgKind, bool)], scan: &Scan) -> String {
    let plain: Vec<(String, PgKind)> = columns.iter().map(|(c, k, _)| (c.clone(), *k)).collect();
    let wanted = pg_wanted(&plain, scan);
    let list = if wanted.is_empty() {
        "1".to_owned()
    } else {
        wanted
            .iter()
            .map(|(c, _)| pg_quote_ident(c))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let mut sql = format!("SELECT {list} FROM {}", pg_quote_ident(table));
    let mut first = true;
    for Pushed { field, op, value } in &scan.filters {
        let Some((_, kind, utf8)) = columns.iter().find(|(c, _, _)| c == field) else {
            continue;
        };
        let Some(literal) = pg_literal(value) else {
            continue;
        };
        let col = pg_quote_ident(field);
        let condition = match (kind, value) {
            (PgKind::Int | PgKind::Float, Value::Int(_) | Value::Float(_)) => {
                format!("{col} {} {literal}", op.sql())
            }
            (PgKind::Text, Value::String(_)) if *utf8 => {
                format!(
                    "CAST({col} AS BINARY) {} CAST({literal} AS BINARY)",
                    op.sql()
                )
            }
            _ => continue,
        };
        sql.push_str(if first { " WHERE " } else { " AND " });
        first = false;
        sql.push_str(&condition);
    }
    sql
}

/// Reads a MariaDB/MySQL table on a thread of its own, streaming rows (the driver's
/// text-protocol result set is read row by row) through a bounded channel.
fn mysql(url: &str, table: &str, scan: &Scan) -> Result<Rows<'static>, String> {
    use mysql::prelude::Queryable;
    let (url, table, scan) = (url.to_owned(), table.to_owned(), scan.clone());
    let (tx, rx) = mpsc::sync_channel::<Result<Value, String>>(SQLITE_AHEAD);
    let (ready_tx, ready_rx) = mpsc::sync_channel::<Result<(), String>>(1);
    std::thread::Builder::new()
        .name("query-mysql".into())
        .spawn(move || {
            let result = (|| -> Result<(), String> {
                let e = |e: mysql::Error| format!("{table}: {e}");
                let opts = mysql::Opts::from_url(&url).map_err(|e| format!("{url}: {e}"))?;
                let mut conn = mysql::Conn::new(opts).map_err(e)?;
                conn.query_drop(
                    "SET SESSION sql_mode = CONCAT(@@sql_mode, ',ANSI_QUOTES,NO_BACKSLASH_ESCAPES')",
                )
                .map_err(e)?;
                // MariaDB's JSON is LONGTEXT with a json_valid() check named after the
                // column; MySQL's has its own type.
                let json_checked: Vec<String> = conn
                    .exec(
                        "SELECT CONSTRAINT_NAME FROM information_schema.CHECK_CONSTRAINTS \
                         WHERE CONSTRAINT_SCHEMA = DATABASE() AND TABLE_NAME = ? \
                         AND CHECK_CLAUSE LIKE 'json_valid(%'",
                        (table.as_str(),),
                    )
                    .unwrap_or_default();
                let rows: Vec<(String, String, Option<String>)> = conn
                    .exec(
                        "SELECT COLUMN_NAME, DATA_TYPE, CHARACTER_SET_NAME FROM information_schema.COLUMNS \
                         WHERE TABLE_SCHEMA = DATABASE() AND TABLE_NAME = ? ORDER BY ORDINAL_POSITION",
                        (table.as_str(),),
                    )
                    .map_err(e)?;
                if rows.is_empty() {
                    return Err(format!("{table}: no such table (or no columns) in the current database"));
                }
                let columns: Vec<(String, PgKind, bool)> = rows
                    .into_iter()
                    .map(|(name, data_type, charset)| {
                        let kind = my_kind(&data_type.to_ascii_lowercase(), json_checked.contains(&name));
                        let utf8 = charset.is_some_and(|c| c.starts_with("utf8"));
                        (name, kind, utf8)
                    })
                    .collect();
                let sql = mysql_sql(&table, &columns, &scan);
                let plain: Vec<(String, PgKind)> =
                    columns.iter().map(|(c, k, _)| (c.clone(), *k)).collect();
                let wanted: Vec<(Arc<str>, PgKind)> = pg_wanted(&plain, &scan)
                    .into_iter()
                    .map(|(c, k)| (Arc::from(c.as_str()), *k))
                    .collect();
                let result = conn.query_iter(sql).map_err(e)?;
                let _ = ready_tx.send(Ok(()));
                for row in result {
                    let row = row.map_err(e)?;
                    let mut map = Map::with_capacity(wanted.len());
                    for (i, (name, kind)) in wanted.iter().enumerate() {
                        let v = match row.as_ref(i) {
                            None | Some(mysql::Value::NULL) => Value::Null,
                            Some(mysql::Value::Bytes(b)) => my_value(*kind, b)
                                .map_err(|err| format!("{table}.{name}: {err}"))?,
                            Some(mysql::Value::Int(n)) => Value::Int(*n),
                            Some(mysql::Value::UInt(n)) => i64::try_from(*n).map_or(Value::Float(*n as f64), Value::Int),
                            Some(mysql::Value::Float(x)) => Value::Float(f64::from(*x)),
                            Some(mysql::Value::Double(x)) => Value::Float(*x),
                            Some(other) => Value::from(other.as_sql(true).as_str()),
                        };
                        map.insert(name.clone(), v);
                    }
                    if tx.send(Ok(Value::Map(Arc::new(map)))).is_err() {
                        return Ok(()); // the query stopped reading
                    }
                }
                Ok(())
            })();
            if let Err(e) = result {
                let _ = ready_tx.send(Err(e.clone()));
                let _ = tx.send(Err(e));
            }
        })
        .map_err(|e| format!("cannot start a reader thread: {e}"))?;
    if let Ok(Err(e)) = ready_rx.recv() {
        return Err(e);
    }
    Ok(Box::new(rx.into_iter()))
}

/// A text-protocol value decoded by its column's kind.
fn my_value(kind: PgKind, bytes: &[u8]) -> Result<Value, String> {
    match kind {
        PgKind::Bytes => Ok(Value::from(bytes)),
        PgKind::Json => parse_json(bytes),
        _ => {
            let text = std::str::from_utf8(bytes).map_err(|e| e.to_string())?;
            match kind {
                PgKind::Bool => Ok(Value::Bool(text == "1")),
                _ => pg_value(kind, Some(text)),
            }
        }
    }
}

/// Parses one JSON document straight into a query value: integers that fit an i64 stay
/// integers, other numbers are floats; nesting deeper than [`JSON_DEPTH_MAX`] is refused.
pub fn parse_json(bytes: &[u8]) -> Result<Value, String> {
    KEYS.with(|keys| {
        let mut de = serde_json::Deserializer::from_slice(bytes);
        let v = Seed { depth: 0, keys }
            .deserialize(&mut de)
            .map_err(|e| e.to_string())?;
        de.end().map_err(|e| e.to_string())?;
        Ok(v)
    })
}

/// Distinct object keys shared between records, per thread: a million records with the
/// same ten field names hold ten strings, not ten million.
const INTERNED_KEYS_MAX: usize = 4096;

/// Object keys seen so far (at most [`INTERNED_KEYS_MAX`]; later new keys are not shared).
#[derive(Default)]
struct Keys(std::cell::RefCell<std::collections::HashSet<Arc<str>>>);

impl Keys {
    fn get(&self, key: &str) -> Arc<str> {
        let mut set = self.0.borrow_mut();
        if let Some(k) = set.get(key) {
            return k.clone();
        }
        let k: Arc<str> = Arc::from(key);
        if set.len() < INTERNED_KEYS_MAX {
            set.insert(k.clone());
        }
        k
    }
}

thread_local! {
    static KEYS: Keys = Keys::default();
}

#[derive(Clone, Copy)]
struct Seed<'k> {
    depth: usize,
    keys: &'k Keys,
}

impl<'de> DeserializeSeed<'de> for Seed<'_> {
    type Value = Value;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Value, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Seed<'_> {
    type Value = Value;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON value")
    }
    fn visit_unit<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }
    fn visit_bool<E>(self, b: bool) -> Result<Value, E> {
        Ok(Value::Bool(b))
    }
    fn visit_i64<E>(self, i: i64) -> Result<Value, E> {
        Ok(Value::Int(i))
    }
    fn visit_u64<E>(self, u: u64) -> Result<Value, E> {
        Ok(i64::try_from(u).map_or(Value::Float(u as f64), Value::Int))
    }
    fn visit_f64<E>(self, x: f64) -> Result<Value, E> {
        Ok(Value::Float(x))
    }
    fn visit_str<E>(self, s: &str) -> Result<Value, E> {
        Ok(Value::from(s))
    }
    fn visit_string<E>(self, s: String) -> Result<Value, E> {
        Ok(Value::from(s))
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        let inner = self.deeper::<A::Error>()?;
        let mut items = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(4096));
        while let Some(v) = seq.next_element_seed(inner)? {
            items.push(v);
        }
        Ok(Value::from(items))
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        let inner = self.deeper::<A::Error>()?;
        let mut m = Map::with_capacity(map.size_hint().unwrap_or(0).min(4096));
        while let Some(k) = map.next_key::<std::borrow::Cow<'de, str>>()? {
            let v = map.next_value_seed(inner)?;
            m.insert(self.keys.get(&k), v);
        }
        m.shrink_to_fit();
        Ok(Value::Map(Arc::new(m)))
    }
}

impl Seed<'_> {
    fn deeper<E: serde::de::Error>(self) -> Result<Self, E> {
        if self.depth >= JSON_DEPTH_MAX {
            return Err(E::custom(format!("nested deeper than {JSON_DEPTH_MAX}")));
        }
        Ok(Seed {
            depth: self.depth + 1,
            keys: self.keys,
        })
    }
}

/// A query value as JSON: timestamps and durations as their text, bytes as an array of
/// numbers, NaN and infinities as null.
pub fn to_json(v: &Value) -> serde_json::Value {
    match v {
        Value::Null => serde_json::Value::Null,
        Value::Bool(b) => serde_json::Value::Bool(*b),
        Value::Int(i) => serde_json::Value::from(*i),
        Value::Float(x) => serde_json::Number::from_f64(*x)
            .map_or(serde_json::Value::Null, serde_json::Value::Number),
        Value::String(s) => serde_json::Value::String(s.to_string()),
        Value::Bytes(b) => {
            serde_json::Value::Array(b.iter().map(|&x| serde_json::Value::from(x)).collect())
        }
        Value::Time(_) | Value::Duration(_) => {
            // `timestamp("…")` / `duration("…")`: the text inside the quotes.
            let shown = v.to_string();
            let inner = shown
                .split_once("(\"")
                .and_then(|(_, rest)| rest.strip_suffix("\")"))
                .unwrap_or(&shown);
            serde_json::Value::String(inner.to_owned())
        }
        Value::List(items) => serde_json::Value::Array(items.iter().map(to_json).collect()),
        Value::Map(m) => {
            serde_json::Value::Object(m.iter().map(|(k, v)| (k.to_string(), to_json(v))).collect())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_converts_directly_and_refuses_deep_documents() {
        let v =
            parse_json(br#"{"a": [1, 2.5, "x", null, true], "b": {"c": 18446744073709551615}}"#)
                .unwrap();
        assert_eq!(
            v.to_string(),
            r#"{"a": [1, 2.5, "x", null, true], "b": {"c": 1.8446744073709552e19}}"#
        );
        let deep = "[".repeat(JSON_DEPTH_MAX + 2) + &"]".repeat(JSON_DEPTH_MAX + 2);
        assert!(parse_json(deep.as_bytes())
            .unwrap_err()
            .contains("nested deeper"));
        assert!(parse_json(b"{} x").is_err());
    }

    #[test]
    fn sql_pushes_columns_and_type_guarded_comparisons() {
        let scan = Scan {
            name: "t".into(),
            args: vec![],
            alias: "t".into(),
            fields: Some(vec!["id".into(), "na\"me".into()]),
            filters: vec![Pushed {
                field: "id".into(),
                op: portswitch_query::query::CmpOp::Gt,
                value: Value::Int(3),
            }],
        };
        let (sql, params) = sqlite_sql("my table", &scan);
        assert_eq!(
            sql,
            r#"SELECT "id", "na""me" FROM "my table" WHERE ("id" > ?1 OR typeof("id") NOT IN ('integer','real'))"#
        );
        assert_eq!(params, vec![rusqlite::types::Value::Integer(3)]);
    }

    #[test]
    fn postgres_sql_pushes_only_comparisons_of_matching_kinds() {
        use portswitch_query::query::CmpOp;
        let columns = vec![
            ("id".to_owned(), PgKind::Int),
            ("Name".to_owned(), PgKind::Text),
            ("doc".to_owned(), PgKind::Json),
        ];
        let pushed = |field: &str, op, value: Value| Pushed {
            field: field.into(),
            op,
            value,
        };
        let scan = Scan {
            name: "t".into(),
            args: vec![],
            alias: "t".into(),
            fields: Some(vec!["id".into(), "doc".into()]),
            filters: vec![
                pushed("id", CmpOp::Ge, Value::Int(10)),
                pushed("Name", CmpOp::Eq, Value::from("O'Brien")),
                pushed("id", CmpOp::Eq, Value::from("10")),
                pushed("doc", CmpOp::Eq, Value::Int(1)),
                pushed("id", CmpOp::Lt, Value::Float(f64::NAN)),
            ],
        };
        assert_eq!(
            postgres_sql("my \"t\"", &columns, &scan),
            r#"SELECT "id"::text, "doc"::text FROM "my ""t""" WHERE "id" >= 10 AND "Name" COLLATE "C" = 'O''Brien'"#
        );
        assert_eq!(
            pg_value(PgKind::Bytes, Some("\\x00ff")).unwrap(),
            Value::from(&[0u8, 255][..])
        );
        assert!(pg_value(PgKind::Bytes, Some("\\x0")).is_err());
        assert_eq!(
            pg_value(PgKind::Float, Some("2.5")).unwrap(),
            Value::Float(2.5)
        );
        assert_eq!(pg_value(PgKind::Int, None).unwrap(), Value::Null);
    }

    #[test]
    fn csv_fields_take_the_narrowest_type() {
        assert_eq!(csv_value("12"), Value::Int(12));
        assert_eq!(csv_value("1.5"), Value::Float(1.5));
        assert_eq!(csv_value(""), Value::Null);
        assert_eq!(csv_value("inf"), Value::from("inf"));
        assert_eq!(csv_value("MOW"), Value::from("MOW"));
    }
}
