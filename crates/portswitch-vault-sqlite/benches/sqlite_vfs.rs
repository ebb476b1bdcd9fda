//! SQLite through the vault VFS against plain SQLite on the host file system: inserts/s
//! (text-heavy rows in batched transactions), point selects/s by primary key, bytes on
//! disk. One JSON object per engine on stdout.
//!
//! The workload is the one of `peers-vault` (the peer benchmark's SQLite and SQLCipher
//! runs), compiled in from there so every system stores the same rows: the same table,
//! generator, pragmas and timed loops; only the way the connection is opened differs.
//!
//! ```text
//! cargo bench -p portswitch-vault-sqlite --bench sqlite_vfs -- \
//!     [--engine vault|sqlite|both (both)] [--dir DIR (a fresh temp dir, removed)] \
//!     [--cipher aes-256-gcm|chacha20-poly1305|sm4-gcm] [--compression zstd|lz4|none] \
//!     [--no-parity] [--zstd-level N (1)] [--block-bytes N (4096)] [--cache-mib N (64)] \
//!     [--rows N] [--batch N] [--selects N] [--journal-mode MODE] \
//!     [--synchronous full|normal|off] [--page-size BYTES] [--seed N]
//! ```

#[path = "../../../peers-vault/common/src/lib.rs"]
#[allow(dead_code, unused_imports, clippy::all)]
mod workload;

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

use portswitch_vault::{Cipher, Compression, CreateOptions, Retention, Vault};
use rusqlite::{params, Connection, OpenFlags};
use serde_json::{json, Value};
use workload::{person, Options, Person, Rng};

const PASSPHRASE: &[u8] = b"benchmark passphrase";

#[derive(Debug)]
struct Args {
    engines: Vec<&'static str>,
    dir: Option<PathBuf>,
    vault: CreateOptions,
    work: Options,
}

fn parse() -> Result<Args, String> {
    let mut engines = vec!["sqlite", "vault"];
    let mut dir = None;
    let mut vault = CreateOptions::default();
    let mut rest = Vec::new();
    let mut db_given = false;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut value = || args.next().ok_or(format!("{a} needs a value"));
        match a.as_str() {
            // What `cargo bench` adds to a harness-less bench's command line.
            "--bench" => {}
            "--engine" => {
                engines = match value()?.as_str() {
                    "vault" => vec!["vault"],
                    "sqlite" => vec!["sqlite"],
                    "both" => vec!["sqlite", "vault"],
                    v => return Err(format!("--engine {v}: vault, sqlite or both")),
                }
            }
            "--dir" => dir = Some(PathBuf::from(value()?)),
            "--cipher" => {
                vault.cipher = match value()?.as_str() {
                    "aes-256-gcm" => Cipher::Aes256Gcm,
                    "chacha20-poly1305" => Cipher::ChaCha20Poly1305,
                    "sm4-gcm" => Cipher::Sm4Gcm,
                    v => return Err(format!("--cipher {v}?")),
                }
            }
            "--compression" => {
                vault.compression = match value()?.as_str() {
                    "zstd" => Compression::Zstd,
                    "lz4" => Compression::Lz4,
                    "none" => Compression::None,
                    v => return Err(format!("--compression {v}?")),
                }
            }
            "--no-parity" => vault.parity = None,
            "--cache-mib" => {
                let mib: u64 = value()?.parse().map_err(|e| format!("--cache-mib: {e}"))?;
                vault.open.cache_bytes = mib << 20;
            }
            "--zstd-level" => {
                vault.zstd_level = value()?.parse().map_err(|e| format!("--zstd-level: {e}"))?
            }
            "--block-bytes" => {
                vault.block_bytes = value()?
                    .parse()
                    .map_err(|e| format!("--block-bytes: {e}"))?
            }
            _ => {
                db_given |= a == "--db";
                rest.push(a);
            }
        }
    }
    if !db_given {
        rest.extend(["--db".to_string(), "bench.db".to_string()]);
    }
    let work = Options::parse(rest)?;
    Ok(Args {
        engines,
        dir,
        vault,
        work,
    })
}

fn main() -> ExitCode {
    let args = match parse() {
        Ok(a) => a,
        Err(msg) => {
            eprintln!("{msg}\nsee the header of benches/sqlite_vfs.rs for the options");
            return ExitCode::from(2);
        }
    };
    let (dir, remove) = match &args.dir {
        Some(d) => (d.clone(), false),
        None => (
            std::env::temp_dir().join(format!("psv-sqlite-bench-{}", std::process::id())),
            true,
        ),
    };
    let mut status = ExitCode::SUCCESS;
    for engine in &args.engines {
        let result = match *engine {
            "sqlite" => run_plain(&dir.join("plain"), &args.work),
            _ => run_vault(&dir.join("vault"), &args),
        };
        match result {
            Ok(v) => println!("{v}"),
            Err(msg) => {
                eprintln!("{engine}: {msg}");
                status = ExitCode::FAILURE;
            }
        }
    }
    if remove {
        let _ = std::fs::remove_dir_all(&dir);
    }
    status
}

/// A fresh, empty directory, refusing to empty one that holds something other than a
/// previous run (a vault, or the database file `marker`).
fn fresh_dir(dir: &Path, marker: &Path) -> Result<(), String> {
    if dir.exists() {
        let vault_or_bench = dir.join("VAULT").exists() || dir.join(marker).exists();
        let empty = std::fs::read_dir(dir)
            .map_err(|e| e.to_string())?
            .next()
            .is_none();
        if !empty && !vault_or_bench {
            return Err(format!(
                "{} exists and is not a benchmark directory",
                dir.display()
            ));
        }
        std::fs::remove_dir_all(dir).map_err(|e| e.to_string())?;
    }
    std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))
}

fn dir_bytes(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| match e.metadata() {
            Ok(m) if m.is_dir() => dir_bytes(&e.path()),
            Ok(m) => m.len(),
            Err(_) => 0,
        })
        .sum()
}

fn run_plain(dir: &Path, o: &Options) -> Result<Value, String> {
    let name = o.db.file_name().ok_or("--db needs a file name")?;
    fresh_dir(dir, Path::new(name))?;
    let path = dir.join(name);
    let open = || Connection::open(&path);
    let mut v = workload_run(o, &open)?;
    v["engine"] = json!("sqlite");
    v["disk_bytes"] = json!(dir_bytes(dir));
    Ok(v)
}

fn run_vault(dir: &Path, args: &Args) -> Result<Value, String> {
    fresh_dir(dir, Path::new("VAULT"))?;
    let e = |what: &'static str| move |err: portswitch_vault::VaultError| format!("{what}: {err}");
    let vault = Vault::create(dir, PASSPHRASE, args.vault.clone()).map_err(e("create"))?;
    let name = "psv-bench";
    portswitch_vault_sqlite::register(vault.clone(), name).map_err(|err| err.to_string())?;
    let db_path = args.work.db.to_string_lossy().into_owned();
    let open = || Connection::open_with_flags_and_vfs(&db_path, OpenFlags::default(), name);
    let result = workload_run(&args.work, &open);
    let stats = vault.stats();
    portswitch_vault_sqlite::unregister(name).map_err(|err| err.to_string())?;
    let mut v = result?;
    vault.close().map_err(e("close"))?;
    let disk_bytes = dir_bytes(dir);
    // What the same database takes once the history of its pages is dropped.
    let vault = Vault::open(dir, PASSPHRASE, args.vault.open.clone()).map_err(e("reopen"))?;
    let gc = vault.gc(Retention {
        keep_last: Some(1),
        keep_within: None,
    });
    vault.close().map_err(e("close"))?;
    v["engine"] = json!("vault-vfs");
    v["disk_bytes"] = json!(disk_bytes);
    v["disk_bytes_after_gc"] = match gc {
        Ok(_) => json!(dir_bytes(dir)),
        Err(err) => json!(format!("gc failed: {err}")),
    };
    v["vault"] = json!({
        "cipher": format!("{:?}", args.vault.cipher),
        "compression": format!("{:?}", args.vault.compression),
        "block_bytes": args.vault.block_bytes,
        "zstd_level": args.vault.zstd_level,
        "cache_bytes": args.vault.open.cache_bytes,
        "parity": args.vault.parity.map(|p| format!("{}+{}", p.data_shards, p.parity_shards)),
        "commits": stats.commits,
        "cache_hits": stats.cache_hits,
        "cache_misses": stats.cache_misses,
    });
    Ok(v)
}

/// The loops of `peers-vault`'s `run`, with the connection opened by `open`.
fn workload_run(
    o: &Options,
    open: &dyn Fn() -> rusqlite::Result<Connection>,
) -> Result<Value, String> {
    let e = |what: &'static str| move |err: rusqlite::Error| format!("{what}: {err}");
    let rows: Vec<Person> = (1..=o.rows as i64).map(|id| person(o.seed, id)).collect();
    let mut c = open().map_err(e("open"))?;
    c.pragma_update(None, "page_size", o.page_size)
        .map_err(e("page_size"))?;
    c.pragma_update(None, "journal_mode", &o.journal_mode)
        .map_err(e("journal_mode"))?;
    c.pragma_update(None, "synchronous", &o.synchronous)
        .map_err(e("synchronous"))?;
    c.execute_batch(
        "CREATE TABLE people (
            id INTEGER PRIMARY KEY,
            first_name TEXT NOT NULL,
            last_name TEXT NOT NULL,
            email TEXT NOT NULL,
            phone TEXT NOT NULL,
            street TEXT NOT NULL,
            city TEXT NOT NULL,
            postcode TEXT NOT NULL,
            country TEXT NOT NULL,
            created_at TEXT NOT NULL,
            notes TEXT NOT NULL
        )",
    )
    .map_err(e("create table"))?;
    let text = |q: &str| match c.query_row(q, [], |r| r.get::<_, rusqlite::types::Value>(0)) {
        Ok(rusqlite::types::Value::Text(t)) => t,
        Ok(rusqlite::types::Value::Integer(i)) => i.to_string(),
        Ok(other) => format!("{other:?}"),
        Err(err) => format!("{err}"),
    };
    let (journal_mode, synchronous) = (text("PRAGMA journal_mode"), text("PRAGMA synchronous"));

    let start = Instant::now();
    for chunk in rows.chunks(o.batch as usize) {
        let tx = c.transaction().map_err(e("begin"))?;
        {
            let mut st = tx
                .prepare_cached(
                    "INSERT INTO people (id, first_name, last_name, email, phone, street, city,
                        postcode, country, created_at, notes)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)",
                )
                .map_err(e("prepare insert"))?;
            for p in chunk {
                st.execute(params![
                    p.id,
                    p.first_name,
                    p.last_name,
                    p.email,
                    p.phone,
                    p.street,
                    p.city,
                    p.postcode,
                    p.country,
                    p.created_at,
                    p.notes
                ])
                .map_err(e("insert"))?;
            }
        }
        tx.commit().map_err(e("commit"))?;
    }
    let insert_s = start.elapsed().as_secs_f64();
    drop(rows);
    c.close().map_err(|(_, err)| format!("close: {err}"))?;

    let c = open().map_err(e("reopen"))?;
    let mut st = c
        .prepare("SELECT * FROM people WHERE id = ?1")
        .map_err(e("prepare select"))?;
    let mut r = Rng::new(o.seed ^ 0x005e_1ec7);
    let mut read_bytes = 0usize;
    let start = Instant::now();
    for _ in 0..o.selects {
        let id = 1 + r.below(o.rows.max(1)) as i64;
        read_bytes += st
            .query_row([id], |row| {
                let mut n = 0usize;
                for i in 1..11 {
                    n += row.get_ref(i)?.as_str().map(str::len).unwrap_or(0);
                }
                Ok(n)
            })
            .map_err(e("select"))?;
    }
    let select_s = start.elapsed().as_secs_f64();
    if o.selects > 0 && read_bytes == 0 {
        return Err("the selects read nothing".into());
    }
    drop(st);
    let count: i64 = c
        .query_row("SELECT count(*) FROM people", [], |r| r.get(0))
        .map_err(e("count"))?;
    if count as u64 != o.rows {
        return Err(format!("{count} rows in the table, {} inserted", o.rows));
    }
    let db_bytes: i64 = c
        .query_row(
            "SELECT page_count * page_size FROM pragma_page_count, pragma_page_size",
            [],
            |r| r.get(0),
        )
        .map_err(e("size"))?;
    c.close().map_err(|(_, err)| format!("close: {err}"))?;
    let per_s = |n: u64, s: f64| if s > 0.0 { (n as f64 / s).round() } else { 0.0 };
    Ok(json!({
        "sqlite_version": rusqlite::version(),
        "rows": o.rows,
        "batch": o.batch,
        "journal_mode": journal_mode,
        "synchronous": synchronous,
        "page_size": o.page_size,
        "insert_s": insert_s,
        "inserts_per_s": per_s(o.rows, insert_s),
        "selects": o.selects,
        "select_s": select_s,
        "selects_per_s": per_s(o.selects, select_s),
        "db_bytes": db_bytes,
    }))
}
