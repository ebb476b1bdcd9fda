//! `portswitch query`: the query language from the command line, over JSON.
//!
//! - `query eval EXPR [--json FILE|-] [--var NAME=JSON]…` evaluates EXPR once, with the
//!   top-level fields of one JSON object (and each `--var`) as its variables, and prints
//!   the result.
//! - `query filter EXPR [FILE|-]` reads JSON Lines and prints the lines (unchanged) for
//!   which the predicate EXPR is true, like `grep` for records; a summary goes to
//!   standard error.
//!
//! Exit codes: 0 done (for `filter`: at least one line matched), 1 no line matched, 2
//! bad usage or an expression that does not compile (its position is shown), 3 an
//! evaluation error (`eval`) or a line that is not a JSON object (`filter`: the line
//! number is shown and the rest is still read).

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
