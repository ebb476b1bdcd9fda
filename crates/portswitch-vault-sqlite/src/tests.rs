//! The VFS over an in-memory store: SQLite's own behaviour (journals, locks between
//! connections, WAL) through our C tables, apart from the vault's format. The
//! integration tests in `tests/` run the same through a real vault.

use std::sync::Arc;

use rusqlite::{Connection, ErrorCode, OpenFlags};

use crate::store::mem::MemStore;
use crate::*;

/// Registers a fresh in-memory store under a name unique to the test.
fn mem_vfs(name: &str) -> Arc<MemStore> {
    let store = Arc::new(MemStore::default());
    register_store(store.clone(), None, name).unwrap();
    store
}

fn connect(vfs: &str, path: &str) -> Connection {
    let c = Connection::open_with_flags_and_vfs(path, OpenFlags::default(), vfs).unwrap();
    c.busy_timeout(std::time::Duration::from_secs(5)).unwrap();
    c
}

#[test]
fn tables_rows_and_reopen() {
    let _store = mem_vfs("t-basic");
    {
        let db = connect("t-basic", "app.db");
        db.execute_batch("CREATE TABLE t(id INTEGER PRIMARY KEY, body TEXT);")
            .unwrap();
        let tx = db.unchecked_transaction().unwrap();
        for i in 0..5_000 {
            tx.execute(
                "INSERT INTO t(body) VALUES (?1)",
                [format!("row {i} {}", "x".repeat(i % 300))],
            )
            .unwrap();
        }
        tx.commit().unwrap();
    }
    let db = connect("t-basic", "/app.db");
    let n: i64 = db
        .query_row("SELECT count(*) FROM t", [], |r| r.get(0))
        .unwrap();
    assert_eq!(n, 5_000);
    let ok: String = db
        .query_row("PRAGMA integrity_check", [], |r| r.get(0))
        .unwrap();
    assert_eq!(ok, "ok");
    drop(db);
    unregister("t-basic").unwrap();
}

#[test]
fn rollback_and_temp_tables() {
    let _store = mem_vfs("t-rollback");
    let db = connect("t-rollback", "app.db");
    db.execute_batch(
        "CREATE TABLE t(x); INSERT INTO t VALUES (1);
         CREATE TEMP TABLE scratch(y); INSERT INTO scratch VALUES (2);",
    )
    .unwrap();
    db.execute_batch("BEGIN; INSERT INTO t VALUES (2); DELETE FROM t WHERE x = 1; ROLLBACK;")
        .unwrap();
    let xs: Vec<i64> = db
        .prepare("SELECT x FROM t")
        .unwrap()
        .query_map([], |r| r.get(0))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    assert_eq!(xs, vec![1]);
    let y: i64 = db
        .query_row("SELECT y FROM scratch", [], |r| r.get(0))
        .unwrap();
    assert_eq!(y, 2);
    // Time and randomness come from the unix VFS's functions.
    let (now, random): (String, Vec<u8>) = db
        .query_row("SELECT datetime('now'), randomblob(16)", [], |r| {
            Ok((r.get(0)?, r.get(1)?))
        })
        .unwrap();
    assert!(now.starts_with("20"), "{now}");
    assert_ne!(random, vec![0; 16]);
    drop(db);
    unregister("t-rollback").unwrap();
}

/// One durable sync per transaction: the journal's sync is skipped (IOCAP_SEQUENTIAL),
/// the database's is the commit point.
#[test]
fn one_sync_per_transaction() {
    let store = mem_vfs("t-syncs");
    let db = connect("t-syncs", "app.db");
    db.execute_batch("CREATE TABLE t(x);").unwrap();
    let before = store.syncs();
    for i in 0..10 {
        db.execute("INSERT INTO t VALUES (?1)", [i]).unwrap();
    }
    assert_eq!(store.syncs() - before, 10);
    drop(db);
    unregister("t-syncs").unwrap();
}

#[test]
fn writers_exclude_each_other() {
    let _store = mem_vfs("t-locks");
    let a = connect("t-locks", "app.db");
    let b = Connection::open_with_flags_and_vfs("app.db", OpenFlags::default(), "t-locks").unwrap();
    a.execute_batch("CREATE TABLE t(x);").unwrap();
    a.execute_batch("BEGIN IMMEDIATE; INSERT INTO t VALUES (1);")
        .unwrap();
    // b (no busy timeout: rusqlite's default is 5 s) cannot write while a holds
    // RESERVED, but it can read.
    b.busy_timeout(std::time::Duration::ZERO).unwrap();
    let err = b.execute("INSERT INTO t VALUES (2)", []).unwrap_err();
    assert_eq!(err.sqlite_error_code(), Some(ErrorCode::DatabaseBusy));
    let n: i64 = b
        .query_row("SELECT count(*) FROM t", [], |r| r.get(0))
        .unwrap();
    assert_eq!(n, 0);
    a.execute_batch("COMMIT;").unwrap();
    b.execute("INSERT INTO t VALUES (2)", []).unwrap();
    let n: i64 = a
        .query_row("SELECT count(*) FROM t", [], |r| r.get(0))
        .unwrap();
    assert_eq!(n, 2);
    drop((a, b));
    unregister("t-locks").unwrap();
}

#[test]
fn threads_share_a_database() {
    let _store = mem_vfs("t-threads");
    connect("t-threads", "app.db")
        .execute_batch("CREATE TABLE t(who, i);")
        .unwrap();
    let workers: Vec<_> = (0..4)
        .map(|who| {
            std::thread::spawn(move || {
                let db = connect("t-threads", "app.db");
                for i in 0..50 {
                    db.execute("INSERT INTO t VALUES (?1, ?2)", [who, i])
                        .unwrap();
                }
            })
        })
        .collect();
    for w in workers {
        w.join().unwrap();
    }
    let db = connect("t-threads", "app.db");
    let n: i64 = db
        .query_row("SELECT count(*) FROM t", [], |r| r.get(0))
        .unwrap();
    assert_eq!(n, 200);
    drop(db);
    unregister("t-threads").unwrap();
}

#[test]
fn wal_mode_with_two_connections() {
    let store = mem_vfs("t-wal");
    let a = connect("t-wal", "app.db");
    let mode: String = a
        .query_row("PRAGMA journal_mode=WAL", [], |r| r.get(0))
        .unwrap();
    assert_eq!(mode, "wal");
    a.execute_batch("CREATE TABLE t(x); INSERT INTO t VALUES (1);")
        .unwrap();
    let b = connect("t-wal", "app.db");
    // A reader keeps its snapshot while a writer commits.
    b.execute_batch("BEGIN; SELECT * FROM t;").unwrap();
    a.execute("INSERT INTO t VALUES (2)", []).unwrap();
    let n: i64 = b
        .query_row("SELECT count(*) FROM t", [], |r| r.get(0))
        .unwrap();
    assert_eq!(n, 1);
    b.execute_batch("COMMIT;").unwrap();
    let n: i64 = b
        .query_row("SELECT count(*) FROM t", [], |r| r.get(0))
        .unwrap();
    assert_eq!(n, 2);
    assert!(store.resolve("/app.db-wal").is_ok());
    drop((a, b));
    // The last connection checkpoints and removes the WAL.
    assert!(store.resolve("/app.db-wal").is_err());
    let c = connect("t-wal", "app.db");
    let n: i64 = c
        .query_row("SELECT count(*) FROM t", [], |r| r.get(0))
        .unwrap();
    assert_eq!(n, 2);
    drop(c);
    unregister("t-wal").unwrap();
}

#[test]
fn registration_rules() {
    let _store = mem_vfs("t-reg");
    assert!(matches!(
        register_store(Arc::new(MemStore::default()), None, "t-reg"),
        Err(RegisterError::NameTaken(_))
    ));
    assert!(matches!(
        register_store(Arc::new(MemStore::default()), None, "bad\0name"),
        Err(RegisterError::InvalidName(_))
    ));
    // SQLite's own VFS is not ours to remove.
    assert!(matches!(
        unregister("unix"),
        Err(RegisterError::NotRegistered(_))
    ));
    let db = connect("t-reg", "app.db");
    assert!(matches!(
        unregister("t-reg"),
        Err(RegisterError::Busy { .. })
    ));
    drop(db);
    unregister("t-reg").unwrap();
    // The name is free again.
    let _again = mem_vfs("t-reg");
    unregister("t-reg").unwrap();
}

#[test]
fn missing_directory_cannot_open() {
    let _store = mem_vfs("t-nodir");
    let err = Connection::open_with_flags_and_vfs("nodir/app.db", OpenFlags::default(), "t-nodir")
        .unwrap_err();
    assert_eq!(err.sqlite_error_code(), Some(ErrorCode::CannotOpen));
    unregister("t-nodir").unwrap();
}

#[test]
fn short_reads_are_zero_filled() {
    use crate::vfs::VaultVfs;
    use rusqlite::ffi;
    let vfs = VaultVfs::new(Arc::new(MemStore::default()));
    let flags = ffi::SQLITE_OPEN_READWRITE | ffi::SQLITE_OPEN_CREATE | ffi::SQLITE_OPEN_MAIN_DB;
    for name in [Some("f.db"), None] {
        let (mut h, _) = vfs.open(name, flags).unwrap();
        vfs.write(&mut h, 0, b"abc").unwrap();
        let mut buf = [0xff_u8; 8];
        assert_eq!(
            vfs.read(&mut h, 1, &mut buf),
            Err(ffi::SQLITE_IOERR_SHORT_READ)
        );
        assert_eq!(&buf, b"bc\0\0\0\0\0\0");
        assert_eq!(
            vfs.read(&mut h, 100, &mut buf),
            Err(ffi::SQLITE_IOERR_SHORT_READ)
        );
        assert_eq!(buf, [0; 8]);
        vfs.truncate(&mut h, 1).unwrap();
        assert_eq!(vfs.file_size(&mut h), Ok(1));
        vfs.close(h).unwrap();
    }
    assert_eq!(vfs.open_files(), 0);
}

/// Finding: `unregister` used to free the VFS's C table once no *file* was open through
/// it, but a connection keeps pointing to its VFS without any file (a `:memory:`
/// database never calls xOpen). Its `SELECT datetime('now')` then called
/// xCurrentTimeInt64 through freed memory: a use-after-free from safe code, which
/// crashed or read garbage depending on what reused the allocation. Now the table is
/// retired, not freed: time keeps working, file operations fail cleanly, the store (the
/// vault clone) is dropped, and the name can be registered again.
#[test]
fn unregister_with_a_memory_connection_still_open() {
    let store = mem_vfs("t-retire");
    let mem =
        Connection::open_with_flags_and_vfs(":memory:", OpenFlags::default(), "t-retire").unwrap();
    mem.execute_batch("CREATE TABLE t(x); INSERT INTO t VALUES (1);")
        .unwrap();
    unregister("t-retire").unwrap();
    // The VFS let go of its store (for a real vault: `Vault::close` + reopen work).
    assert_eq!(Arc::strong_count(&store), 1);
    // Churn the allocator, as the freed table would have been reused.
    let registered: Vec<_> = (0..32)
        .map(|i| {
            let name = format!("t-retire-churn-{i}");
            register_store(Arc::new(MemStore::default()), None, &name).unwrap();
            name
        })
        .collect();
    let _garbage: Vec<Vec<u8>> = (0..256).map(|i| vec![0xa5; 64 + i]).collect();
    let (now, random, x): (String, Vec<u8>, i64) = mem
        .query_row(
            "SELECT datetime('now'), randomblob(16), (SELECT x FROM t)",
            [],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
        )
        .unwrap();
    assert!(now.starts_with("20"), "{now}");
    assert_ne!(random, vec![0; 16]);
    assert_eq!(x, 1);
    // A file through the retired VFS: a temp table spilling out of a 2-page cache
    // opens its temp file with the connection's VFS. An error, not a crash.
    let err = mem
        .execute_batch(
            "PRAGMA temp.cache_size = 2; CREATE TEMP TABLE s(b);
             WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 500)
             INSERT INTO s SELECT randomblob(1000) FROM n;",
        )
        .unwrap_err();
    assert_eq!(
        err.sqlite_error_code(),
        Some(ErrorCode::CannotOpen),
        "{err}"
    );
    // ATTACH looks its VFS up by name, which SQLite no longer lists.
    let err = mem.execute_batch("ATTACH 'other.db' AS other").unwrap_err();
    assert!(err.to_string().contains("no such vfs"), "{err}");
    // The name is free again, for a new VFS that works.
    let _again = mem_vfs("t-retire");
    let db = connect("t-retire", "app.db");
    db.execute_batch("CREATE TABLE t(x);").unwrap();
    drop((db, mem));
    unregister("t-retire").unwrap();
    for name in registered {
        unregister(&name).unwrap();
    }
}

/// A panic inside a VFS callback must not unwind into SQLite nor abort the process:
/// SQLite gets an I/O error, and the connection works again once the cause is gone.
/// (Before `ffi.rs` caught panics, the first one aborted at the `extern "C"` boundary,
/// taking this whole test binary down.)
#[test]
fn panic_in_a_callback_is_an_io_error() {
    let store = mem_vfs("t-panic");
    let db = connect("t-panic", "app.db");
    db.execute_batch("CREATE TABLE t(x); INSERT INTO t VALUES (1), (2);")
        .unwrap();
    drop(db);

    // xRead (the first read of a fresh connection).
    let db = connect("t-panic", "app.db");
    store.panic_in(Some("read"));
    let err = db
        .query_row("SELECT count(*) FROM t", [], |r| r.get::<_, i64>(0))
        .unwrap_err();
    assert_eq!(
        err.sqlite_error_code(),
        Some(ErrorCode::SystemIoFailure),
        "{err}"
    );
    store.panic_in(None);
    let n: i64 = db
        .query_row("SELECT count(*) FROM t", [], |r| r.get(0))
        .unwrap();
    assert_eq!(n, 2);

    // xSync (the commit point): the transaction fails and is rolled back.
    store.panic_in(Some("fsync"));
    let err = db.execute("INSERT INTO t VALUES (3)", []).unwrap_err();
    assert_eq!(
        err.sqlite_error_code(),
        Some(ErrorCode::SystemIoFailure),
        "{err}"
    );
    store.panic_in(None);
    db.execute("INSERT INTO t VALUES (4)", []).unwrap();
    let xs: Vec<i64> = db
        .prepare("SELECT x FROM t ORDER BY x")
        .unwrap()
        .query_map([], |r| r.get(0))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    assert_eq!(xs, vec![1, 2, 4]);
    let ok: String = db
        .query_row("PRAGMA integrity_check", [], |r| r.get(0))
        .unwrap();
    assert_eq!(ok, "ok");
    drop(db);
    // Every file was closed (no count lost to a panic): unregister is not Busy.
    unregister("t-panic").unwrap();
}
