//! A writer process killed (SIGKILL) in the middle of its transactions, again and
//! again, in each journal mode, writing two databases of one vault from two threads:
//! each database reopens, passes integrity_check, and holds every transaction the
//! writer reported committed, whole.
//!
//! Its own test binary: the children are this binary re-executed, and a fork copies
//! every open descriptor until the exec, including the `LOCK` of any vault another test
//! of the same process holds at that moment, which would then look locked to it.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Command, Stdio};

use common::*;
use portswitch_vault_sqlite::{register, unregister};
use rusqlite::{params, Connection, OpenFlags};

fn connect(vfs: &str, path: &str) -> Connection {
    Connection::open_with_flags_and_vfs(path, OpenFlags::default(), vfs).expect("open database")
}

fn integrity(db: &Connection) -> String {
    db.query_row("PRAGMA integrity_check", [], |r| r.get(0))
        .expect("integrity_check")
}

/// The databases the child writes, each from its own thread. A vault commit takes every
/// write made so far, so one database's durable commit also commits the other's
/// half-written transaction: only its rollback journal can undo that after a crash.
const DBS: [&str; 2] = ["one.db", "two.db"];
const ROWS_PER_TX: i64 = 200;
/// How long the child may go without reporting a commit before the test gives up.
const CHILD_SILENCE_MAX: std::time::Duration = std::time::Duration::from_secs(60);

/// The child side of `killed_writer_keeps_committed_transactions`: per database, commits
/// numbered transactions of `ROWS_PER_TX` rows and reports each on stdout once COMMIT
/// returned (`committed DB K`), until it is killed. Does nothing as an ordinary test.
#[test]
fn child_writer() {
    let Ok(dir) = std::env::var("PSV_SQLITE_CHILD_DIR") else {
        return;
    };
    let mode = std::env::var("PSV_SQLITE_CHILD_MODE").unwrap();
    let firsts: Vec<i64> = std::env::var("PSV_SQLITE_CHILD_FIRST")
        .unwrap()
        .split(',')
        .map(|k| k.parse().unwrap())
        .collect();
    let vault = open_vault(Path::new(&dir), None);
    register(vault, "child").unwrap();
    let writers: Vec<_> = DBS
        .iter()
        .zip(firsts)
        .map(|(name, first)| {
            let mode = mode.clone();
            std::thread::spawn(move || write_until_killed(name, &mode, first))
        })
        .collect();
    for w in writers {
        w.join().unwrap();
    }
}

fn write_until_killed(name: &str, mode: &str, first: i64) {
    let db = connect("child", name);
    db.busy_timeout(std::time::Duration::from_secs(10)).unwrap();
    let _: String = db
        .query_row(&format!("PRAGMA journal_mode={mode}"), [], |r| r.get(0))
        .unwrap();
    db.execute_batch(
        "PRAGMA synchronous=FULL;
         -- A tiny page cache spills pages into the database file long before COMMIT,
         -- so the other thread's commits often catch a half-written transaction.
         PRAGMA cache_size=4;
         CREATE TABLE IF NOT EXISTS t(k INTEGER NOT NULL, i INTEGER NOT NULL, body TEXT);",
    )
    .unwrap();
    // Bounded: the parent kills us long before.
    for k in first..first + 100_000 {
        let tx = db.unchecked_transaction().unwrap();
        for i in 0..ROWS_PER_TX {
            tx.execute(
                "INSERT INTO t VALUES (?1, ?2, ?3)",
                params![k, i, text((k * 1000 + i) as u64, 300)],
            )
            .unwrap();
        }
        tx.commit().unwrap();
        let mut out = std::io::stdout().lock();
        writeln!(out, "committed {name} {k}").unwrap();
        out.flush().unwrap();
    }
}

#[test]
fn killed_writer_keeps_committed_transactions() {
    let dir = TempDir::new("crash");
    create_vault(dir.path(), None).close().unwrap();
    let mut first = [1i64; DBS.len()];
    let modes = ["delete", "wal", "truncate", "persist"];
    for (cycle, mode) in modes.iter().cycle().take(16).enumerate() {
        let kill_after = 10 + fastrand::usize(0..40);
        let delay_us = fastrand::u64(0..1_500);
        let firsts: Vec<String> = first.iter().map(i64::to_string).collect();
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args(["--exact", "child_writer", "--nocapture", "--test-threads=1"])
            .env("PSV_SQLITE_CHILD_DIR", dir.path())
            .env("PSV_SQLITE_CHILD_MODE", mode)
            .env("PSV_SQLITE_CHILD_FIRST", firsts.join(","))
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        // Per database, the last transaction the child reported committed.
        let mut reported = [0i64; DBS.len()];
        let mut reports = 0;
        // A reader thread, so that a stalled child fails the test instead of hanging it.
        // It keeps the pipe open until the child is dead: a closed pipe would end the
        // child by EPIPE instead of our SIGKILL.
        let stdout = child.stdout.take().unwrap();
        let (tx, lines) = std::sync::mpsc::channel();
        let reader = std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                if tx.send(line.unwrap()).is_err() {
                    break;
                }
            }
        });
        loop {
            let line = match lines.recv_timeout(CHILD_SILENCE_MAX) {
                Ok(line) => line,
                Err(e) => {
                    child.kill().unwrap();
                    panic!("cycle {cycle}: no report from the child ({e})");
                }
            };
            let Some(rest) = line.strip_prefix("committed ") else {
                continue;
            };
            let (name, k) = rest.split_once(' ').unwrap();
            let n = DBS.iter().position(|d| *d == name).unwrap();
            reported[n] = k.parse().unwrap();
            reports += 1;
            if reports >= kill_after {
                break;
            }
        }
        // SIGKILL, somewhere inside the next transactions.
        std::thread::sleep(std::time::Duration::from_micros(delay_us));
        child.kill().unwrap();
        child.wait().unwrap();
        drop(lines);
        reader.join().unwrap();
        assert_eq!(reports, kill_after, "cycle {cycle}: child ended early");

        let vault = open_vault(dir.path(), None);
        register(vault.clone(), "it-crash").unwrap();
        for (n, name) in DBS.iter().enumerate() {
            let db = connect("it-crash", name);
            let what = format!(
                "cycle {cycle} ({mode}, {name}, killed {delay_us} us after report {kill_after})"
            );
            assert_eq!(integrity(&db), "ok", "{what}");
            let mut st = db
                .prepare("SELECT k, count(*) FROM t GROUP BY k ORDER BY k")
                .unwrap();
            let groups: Vec<(i64, i64)> = st
                .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
                .unwrap()
                .collect::<Result<_, _>>()
                .unwrap();
            drop(st);
            // Whole transactions only, numbered without a gap from 1 ...
            for (i, (k, rows)) in groups.iter().enumerate() {
                assert_eq!(*k, i as i64 + 1, "{what}: transaction missing");
                assert_eq!(*rows, ROWS_PER_TX, "{what}: torn transaction {k}");
            }
            // ... up to at least the last one the child reported.
            let last = groups.last().map_or(0, |g| g.0);
            assert!(
                last >= reported[n],
                "{what}: committed {} but found only up to {last}",
                reported[n]
            );
            first[n] = last + 1;
        }
        unregister("it-crash").unwrap();
        vault.close().unwrap();
    }
}
