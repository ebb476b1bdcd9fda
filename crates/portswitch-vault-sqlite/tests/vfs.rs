//! A real SQLite database (rusqlite, bundled SQLite) kept in a real vault through the
//! VFS: rows survive reopening, rollbacks roll back, tampering is an I/O error (and is
//! repaired from a mirror), and the database takes fewer bytes than as a plain file.
//! (The killed writer is in `crash.rs`.)

mod common;

use std::path::Path;

use common::*;
use portswitch_vault::{OpenOptions, Vault};
use portswitch_vault_sqlite::{open, register, unregister, vfs_name, RegisterError};
use rusqlite::{params, Connection, ErrorCode, OpenFlags};

fn connect(vfs: &str, path: &str) -> Connection {
    Connection::open_with_flags_and_vfs(path, OpenFlags::default(), vfs).expect("open database")
}

fn integrity(db: &Connection) -> String {
    db.query_row("PRAGMA integrity_check", [], |r| r.get(0))
        .expect("integrity_check")
}

/// Fills `t` with `rows` text-heavy rows in transactions of `batch`.
fn fill(db: &Connection, rows: u64, batch: u64) {
    db.execute_batch("CREATE TABLE IF NOT EXISTS t(id INTEGER PRIMARY KEY, body TEXT NOT NULL)")
        .unwrap();
    let mut id = 0;
    while id < rows {
        let tx = db.unchecked_transaction().unwrap();
        {
            let mut st = tx
                .prepare("INSERT INTO t(id, body) VALUES (?1, ?2)")
                .unwrap();
            for _ in 0..batch.min(rows - id) {
                id += 1;
                st.execute(params![id as i64, text(id, 200 + (id as usize % 400))])
                    .unwrap();
            }
        }
        tx.commit().unwrap();
    }
}

/// Row count and total text length: what the fill put there.
fn expected(rows: u64) -> (i64, i64) {
    let len: usize = (1..=rows)
        .map(|id| text(id, 200 + (id as usize % 400)).len())
        .sum();
    (rows as i64, len as i64)
}

fn summary(db: &Connection) -> rusqlite::Result<(i64, i64)> {
    db.query_row("SELECT count(*), sum(length(body)) FROM t", [], |r| {
        Ok((r.get(0)?, r.get(1)?))
    })
}

#[test]
fn database_survives_reopening_the_vault() {
    let dir = TempDir::new("reopen");
    let vault = create_vault(dir.path(), None);
    register(vault.clone(), "it-reopen").unwrap();
    let head_before = vault.head().version;
    {
        let db = connect("it-reopen", "app.db");
        fill(&db, 5_000, 500);
        db.execute_batch("CREATE INDEX t_body ON t(body)").unwrap();
        assert_eq!(integrity(&db), "ok");
    }
    // Every durable SQLite commit is a vault version.
    assert!(vault.head().version >= head_before + 10);
    unregister("it-reopen").unwrap();
    vault.close().unwrap();

    let vault = open_vault(dir.path(), None);
    register(vault.clone(), "it-reopen").unwrap();
    let db = connect("it-reopen", "/app.db");
    assert_eq!(summary(&db).unwrap(), expected(5_000));
    assert_eq!(integrity(&db), "ok");
    let body: String = db
        .query_row("SELECT body FROM t WHERE id = 4321", [], |r| r.get(0))
        .unwrap();
    assert_eq!(body, text(4321, 200 + 4321 % 400));
    // The journal is gone, the database is a vault file.
    let names: Vec<Vec<u8>> = vault
        .list("/")
        .unwrap()
        .into_iter()
        .map(|e| e.name)
        .collect();
    assert_eq!(names, vec![b"app.db".to_vec()]);
    drop(db);
    unregister("it-reopen").unwrap();
    vault.close().unwrap();

    // A vault opened read-only serves a read-only database.
    let opts = OpenOptions {
        read_only: true,
        ..OpenOptions::default()
    };
    let vault = Vault::open(dir.path(), PASS, opts).unwrap();
    register(vault.clone(), "it-reopen").unwrap();
    let db = connect("it-reopen", "app.db");
    assert_eq!(summary(&db).unwrap(), expected(5_000));
    let err = db.execute("DELETE FROM t", []).unwrap_err();
    assert_eq!(err.sqlite_error_code(), Some(ErrorCode::ReadOnly), "{err}");
    drop(db);
    unregister("it-reopen").unwrap();
}

#[test]
fn uncommitted_transaction_rolls_back() {
    let dir = TempDir::new("rollback");
    let vault = create_vault(dir.path(), None);
    register(vault.clone(), "it-rollback").unwrap();
    {
        let db = connect("it-rollback", "app.db");
        fill(&db, 100, 100);
        db.execute_batch("BEGIN; DELETE FROM t WHERE id <= 50; UPDATE t SET body = 'x';")
            .unwrap();
        db.execute_batch("ROLLBACK").unwrap();
        assert_eq!(summary(&db).unwrap(), expected(100));
        // Left open at close: SQLite rolls it back.
        db.execute_batch("BEGIN; DELETE FROM t;").unwrap();
    }
    unregister("it-rollback").unwrap();
    vault.close().unwrap();
    let vault = open_vault(dir.path(), None);
    register(vault.clone(), "it-rollback").unwrap();
    let db = connect("it-rollback", "app.db");
    assert_eq!(summary(&db).unwrap(), expected(100));
    assert_eq!(integrity(&db), "ok");
    drop(db);
    unregister("it-rollback").unwrap();
    vault.close().unwrap();
}

#[test]
fn open_helper_registers_once() {
    let dir = TempDir::new("helper");
    let vault = create_vault(dir.path(), None);
    let a = open(&vault, "a.db").unwrap();
    let b = open(&vault, "a.db").unwrap();
    // One VFS per vault: its locks must see every connection.
    assert!(matches!(
        register(vault.clone(), "another-name"),
        Err(RegisterError::VaultRegistered(name)) if name == vfs_name(&vault)
    ));
    a.execute_batch("CREATE TABLE t(x); INSERT INTO t VALUES (7);")
        .unwrap();
    let x: i64 = b.query_row("SELECT x FROM t", [], |r| r.get(0)).unwrap();
    assert_eq!(x, 7);
    drop((a, b));
    unregister(&vfs_name(&vault)).unwrap();
    vault.close().unwrap();
}

/// `unregister` while a `:memory:` connection opened with the VFS is still alive (it
/// has no file open through the VFS, so unregistering is allowed). Before the VFS's C
/// table was retired instead of freed, the connection's `datetime('now')` called through
/// freed memory (a use-after-free valgrind reports). Now the vault clone is gone (the
/// vault closes and reopens), and the connection keeps working for what needs no file.
#[test]
fn unregister_while_a_memory_connection_lives() {
    let dir = TempDir::new("retire");
    let vault = create_vault(dir.path(), None);
    register(vault.clone(), "it-retire").unwrap();
    let mem = connect("it-retire", ":memory:");
    unregister("it-retire").unwrap();
    vault.close().unwrap();
    let vault = open_vault(dir.path(), None);
    let now: String = mem
        .query_row("SELECT datetime('now')", [], |r| r.get(0))
        .unwrap();
    assert!(now.starts_with("20"), "{now}");
    // The same name over the reopened vault: a fresh, working VFS.
    register(vault.clone(), "it-retire").unwrap();
    let db = connect("it-retire", "app.db");
    db.execute_batch("CREATE TABLE t(x); INSERT INTO t VALUES (1);")
        .unwrap();
    drop((db, mem));
    unregister("it-retire").unwrap();
    vault.close().unwrap();
}

#[test]
fn wal_mode_database_survives_reopening() {
    let dir = TempDir::new("wal");
    let vault = create_vault(dir.path(), None);
    register(vault.clone(), "it-wal").unwrap();
    {
        let db = connect("it-wal", "app.db");
        let mode: String = db
            .query_row("PRAGMA journal_mode=WAL", [], |r| r.get(0))
            .unwrap();
        assert_eq!(mode, "wal");
        fill(&db, 3_000, 300);
        let reader = connect("it-wal", "app.db");
        assert_eq!(summary(&reader).unwrap(), expected(3_000));
    }
    unregister("it-wal").unwrap();
    vault.close().unwrap();
    let vault = open_vault(dir.path(), None);
    register(vault.clone(), "it-wal").unwrap();
    let db = connect("it-wal", "app.db");
    assert_eq!(summary(&db).unwrap(), expected(3_000));
    assert_eq!(integrity(&db), "ok");
    drop(db);
    unregister("it-wal").unwrap();
    vault.close().unwrap();
}

/// Flips one byte in the sealed body of every block record of every segment of the
/// vault in `dir` (the clear frame is `body_len u32 LE | kind u8 (1 = block) | ...`,
/// 16 bytes; see docs/VAULT.md). Commit records stay intact, so the vault opens and
/// only file contents are damaged. Returns how many records were hit.
fn flip_block_records(dir: &Path) -> usize {
    const FRAME_BYTES: usize = 16;
    let mut hit = 0;
    for entry in std::fs::read_dir(dir.join("seg")).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().and_then(|e| e.to_str()) != Some("seg") {
            continue;
        }
        let mut bytes = std::fs::read(&path).unwrap();
        let mut at = 0;
        while at + FRAME_BYTES <= bytes.len() {
            let body = u32::from_le_bytes(bytes[at..at + 4].try_into().unwrap()) as usize;
            let kind = bytes[at + 4];
            if body == 0 || at + FRAME_BYTES + body > bytes.len() {
                break;
            }
            if kind == 1 {
                bytes[at + FRAME_BYTES + body / 2] ^= 0x40;
                hit += 1;
            }
            at += FRAME_BYTES + body;
        }
        std::fs::write(&path, &bytes).unwrap();
    }
    hit
}

#[test]
fn tampered_pages_are_io_errors_and_a_mirror_repairs_them() {
    let dir = TempDir::new("tamper");
    let mirror = TempDir::new("tamper-mirror");
    let vault = create_vault(dir.path(), Some(mirror.path()));
    register(vault.clone(), "it-tamper").unwrap();
    fill(&connect("it-tamper", "app.db"), 2_000, 2_000);
    unregister("it-tamper").unwrap();
    vault.close().unwrap();
    assert!(flip_block_records(dir.path()) > 0);

    // Without the mirror: an I/O error, never rows.
    let vault = open_vault(dir.path(), None);
    register(vault.clone(), "it-tamper").unwrap();
    // (SQLite may already read page 1 while opening.)
    let answer = Connection::open_with_flags_and_vfs("app.db", OpenFlags::default(), "it-tamper")
        .and_then(|db| summary(&db));
    let err = answer.expect_err("a tampered database must not answer");
    assert_eq!(
        err.sqlite_error_code(),
        Some(ErrorCode::SystemIoFailure),
        "{err}"
    );
    unregister("it-tamper").unwrap();
    vault.close().unwrap();

    // With it: every page is repaired and the database is whole.
    let vault = open_vault(dir.path(), Some(mirror.path()));
    register(vault.clone(), "it-tamper").unwrap();
    let db = connect("it-tamper", "app.db");
    assert_eq!(summary(&db).unwrap(), expected(2_000));
    assert_eq!(integrity(&db), "ok");
    assert!(vault.stats().repairs > 0);
    drop(db);
    unregister("it-tamper").unwrap();
    vault.close().unwrap();

    // Repaired in place: fine without the mirror now.
    let vault = open_vault(dir.path(), None);
    register(vault.clone(), "it-tamper").unwrap();
    let db = connect("it-tamper", "app.db");
    assert_eq!(summary(&db).unwrap(), expected(2_000));
    drop(db);
    unregister("it-tamper").unwrap();
    vault.close().unwrap();
}

/// A text-heavy table takes fewer bytes in the vault than as a plain SQLite file: pages
/// are compressed before they are sealed.
#[test]
fn text_heavy_database_takes_fewer_bytes_than_plain() {
    let dir = TempDir::new("bytes");
    let plain = TempDir::new("bytes-plain");
    let vault = create_vault(dir.path(), None);
    register(vault.clone(), "it-bytes").unwrap();
    fill(&connect("it-bytes", "app.db"), 20_000, 20_000);
    unregister("it-bytes").unwrap();
    vault.close().unwrap();
    let db = Connection::open(plain.join("app.db")).unwrap();
    fill(&db, 20_000, 20_000);
    drop(db);

    let plain_bytes = std::fs::metadata(plain.join("app.db")).unwrap().len();
    let vault_bytes = dir_bytes(dir.path());
    let ratio = vault_bytes as f64 / plain_bytes as f64;
    println!("plain {plain_bytes} B, vault {vault_bytes} B: {ratio:.2}x");
    assert!(
        ratio < 0.75,
        "vault {vault_bytes} B vs plain {plain_bytes} B"
    );
}
