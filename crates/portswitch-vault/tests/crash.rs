//! Crash consistency with a real process killed by SIGKILL during heavy writes.
//!
//! The parent test re-executes this test binary as the writer (the child test acts only
//! when `PSVAULT_CRASH_DIR` is set). The writer rewrites and deletes files, commits and
//! syncs at random, and prints each operation before it starts and `SYNCED n` after a
//! sync covering the first `n` operations returned. The parent kills it at a random
//! moment, reopens the vault, and checks that every file is exactly at one of the states
//! the writer gave it, no older than its last reported sync, and that `check` is clean.
//! Rounds accumulate on one vault (cut tails, segment rolls, parity, gc and a mirror all
//! get crashed into). `PSVAULT_CRASH_ROUNDS` sets the number of rounds (default 20).

mod common;

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use portswitch_vault::{CreateOptions, OpenOptions, Retention, Vault, VaultError};

const FILES: u64 = 8;

/// The content of file `f` at generation `g`: self-describing (its first 16 bytes name
/// `f` and `g`), part text part noise, up to 160 KiB.
fn content(f: u64, g: u64) -> Vec<u8> {
    let seed = f.wrapping_mul(1_000_003) ^ g.wrapping_mul(0x9E37_79B9);
    let mut rng = fastrand::Rng::with_seed(seed);
    let len = 16 + rng.usize(..160 << 10);
    let mut out = Vec::with_capacity(len);
    out.extend_from_slice(&f.to_le_bytes());
    out.extend_from_slice(&g.to_le_bytes());
    let t = text(seed, (len - 16) / 2);
    out.extend_from_slice(&t);
    out.extend_from_slice(&noise(seed ^ 1, len - out.len()));
    out
}

fn mirror_of(dir: &Path) -> std::path::PathBuf {
    dir.with_extension("mirror")
}

fn open_opts(dir: &Path, mirror: bool) -> OpenOptions {
    OpenOptions {
        mirror: mirror.then(|| mirror_of(dir)),
        dirty_bytes: 8 << 20,
        ..OpenOptions::default()
    }
}

#[test]
fn crash_writer_child() {
    let Ok(dir) = std::env::var("PSVAULT_CRASH_DIR") else {
        return;
    };
    let dir = Path::new(&dir);
    let mirror = std::env::var("PSVAULT_CRASH_MIRROR").is_ok();
    let base: u64 = std::env::var("PSVAULT_CRASH_GEN").unwrap().parse().unwrap();
    let v = Vault::open(dir, PASS, open_opts(dir, mirror)).unwrap();
    println!("READY");
    let mut rng = fastrand::Rng::with_seed(base);
    let mut g = base;
    let mut ops = 0u64;
    loop {
        let f = rng.u64(..FILES);
        let path = format!("/f{f}");
        g += 1;
        if rng.u8(..8) == 0 {
            println!("OP {f} 0");
            match v.remove(&path) {
                Ok(()) | Err(VaultError::NotFound) => {}
                Err(e) => panic!("{e}"),
            }
        } else {
            println!("OP {f} {g}");
            v.write_file(&path, &content(f, g)).unwrap();
        }
        ops += 1;
        match rng.u8(..10) {
            0..=2 => {
                v.sync().unwrap();
                println!("SYNCED {ops}");
            }
            3 => {
                v.commit().unwrap();
            }
            _ => {}
        }
        if rng.u16(..200) == 0 {
            v.gc(Retention {
                keep_last: Some(3),
                keep_within: None,
            })
            .unwrap();
        }
    }
}

/// One file's states in a round: the one it started with, then each operation's.
/// `None` is "absent".
type States = Vec<Option<u64>>;

#[test]
fn killed_writer_leaves_a_consistent_vault() {
    if std::env::var("PSVAULT_CRASH_DIR").is_ok() {
        return; // we are the child of another run
    }
    let rounds: usize = std::env::var("PSVAULT_CRASH_ROUNDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(20);
    let t = TempDir::new("crash");
    let dir = t.join("vault");
    Vault::create(
        &dir,
        PASS,
        CreateOptions {
            open: open_opts(&dir, true),
            ..opts() // 4 MiB segments, parity on
        },
    )
    .unwrap();
    let exe = std::env::current_exe().unwrap();
    let mut current: Vec<Option<u64>> = vec![None; FILES as usize];
    let mut rng = fastrand::Rng::new();
    let started = Instant::now();
    for round in 0..rounds {
        let mirror = round % 2 == 0;
        let mut child = Command::new(&exe)
            .args([
                "--exact",
                "crash_writer_child",
                "--nocapture",
                "--test-threads=1",
            ])
            .env("PSVAULT_CRASH_DIR", &dir)
            .env(
                "PSVAULT_CRASH_GEN",
                ((round as u64 + 1) * 1_000_000).to_string(),
            )
            .envs(mirror.then_some(("PSVAULT_CRASH_MIRROR", "1")))
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel::<String>();
        let reader = std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        // Wait for the writer to open the vault, then let it run a while.
        loop {
            let l = rx
                .recv_timeout(Duration::from_secs(60))
                .expect("writer never started");
            if l.contains("READY") {
                break;
            }
        }
        std::thread::sleep(Duration::from_millis(rng.u64(50..400)));
        child.kill().unwrap(); // SIGKILL
        let status = child.wait().unwrap();
        assert!(!status.success());
        reader.join().unwrap();
        let lines: Vec<String> = rx.try_iter().collect();
        // Per file: states in order, and the index of the last one a sync covers.
        let mut states: Vec<States> = current.iter().map(|s| vec![*s]).collect();
        let mut synced: Vec<usize> = vec![0; FILES as usize];
        let mut op_files: Vec<(usize, usize)> = Vec::new(); // op -> (file, state index)
        for l in &lines {
            let w: Vec<&str> = l.split_whitespace().collect();
            match w.as_slice() {
                ["OP", f, g] => {
                    let (f, g): (usize, u64) = (f.parse().unwrap(), g.parse().unwrap());
                    states[f].push((g != 0).then_some(g));
                    op_files.push((f, states[f].len() - 1));
                }
                ["SYNCED", n] => {
                    let n: usize = n.parse().unwrap();
                    for &(f, idx) in &op_files[..n] {
                        synced[f] = synced[f].max(idx);
                    }
                }
                _ => {}
            }
        }
        // Reopen (alternating with and without the mirror) and check every file.
        let v = Vault::open(&dir, PASS, open_opts(&dir, mirror))
            .unwrap_or_else(|e| panic!("round {round}: reopen failed: {e}"));
        for f in 0..FILES as usize {
            let got = match v.read_file(&format!("/f{f}")) {
                Ok(bytes) => {
                    assert!(
                        bytes.len() >= 16,
                        "round {round} f{f}: {} bytes",
                        bytes.len()
                    );
                    let g = u64::from_le_bytes(bytes[8..16].try_into().unwrap());
                    assert_eq!(
                        bytes,
                        content(f as u64, g),
                        "round {round} f{f} g{g}: torn content"
                    );
                    Some(g)
                }
                Err(VaultError::NotFound) => None,
                Err(e) => panic!("round {round} f{f}: {e}"),
            };
            let ok = states[f][synced[f]..].contains(&got);
            assert!(
                ok,
                "round {round} f{f}: state {got:?} is not among {:?} (synced up to {})",
                states[f], synced[f]
            );
            current[f] = got;
        }
        let rep = v.check(false).unwrap();
        assert!(rep.is_clean(), "round {round}: {rep:?}");
        eprintln!(
            "round {round}: {} operations, {} syncs, vault at version {}, {} segments",
            op_files.len(),
            lines.iter().filter(|l| l.starts_with("SYNCED")).count(),
            v.head().version,
            rep.segments
        );
        drop(v);
        if started.elapsed() > Duration::from_secs(240) {
            eprintln!(
                "crash test: stopping after {} rounds (time bound)",
                round + 1
            );
            break;
        }
    }
}

/// A commit torn by a crash at the end of the last segment: a read-only open (what
/// `check` beside a mount uses) leaves it in place and out of its view — not damage —
/// and a writable open cuts it.
#[test]
fn a_read_only_open_ignores_a_torn_tail_that_a_writable_open_cuts() {
    let t = TempDir::new("torn");
    let dir = t.join("v");
    let v = create(&dir);
    v.write_file("/a", &text(1, 100_000)).unwrap();
    v.sync().unwrap();
    drop(v);
    let seg = segments(&dir).pop().unwrap();
    let len = |p: &Path| std::fs::metadata(p).unwrap().len();
    let committed = len(&seg);
    // The next commit, written whole, then torn in the middle of its commit record.
    let v = open(&dir);
    v.write_file("/b", &noise(2, 50_000)).unwrap();
    v.sync().unwrap();
    drop(v);
    let (_, off, frame) = records(&dir).pop().unwrap();
    assert_eq!(frame.kind, portswitch_vault::format::RecordKind::Commit);
    let torn_at = off + frame.record_len() as u64 / 2;
    std::fs::OpenOptions::new()
        .write(true)
        .open(&seg)
        .unwrap()
        .set_len(torn_at)
        .unwrap();

    let ro = Vault::open(
        &dir,
        PASS,
        OpenOptions {
            read_only: true,
            ..OpenOptions::default()
        },
    )
    .unwrap();
    assert_eq!(ro.read_file("/a").unwrap(), text(1, 100_000));
    assert!(matches!(ro.read_file("/b"), Err(VaultError::NotFound)));
    let rep = ro.check(false).unwrap();
    assert!(rep.is_clean(), "{rep:?}");
    assert!(rep.damaged.is_empty(), "a torn tail is not damage: {rep:?}");
    assert_eq!(rep.torn_tail_bytes, torn_at - committed, "{rep:?}");
    // A backup from the read-only view ships the committed log only.
    let backup = t.join("backup");
    ro.backup_to(&backup).unwrap();
    drop(ro);
    assert_eq!(len(&seg), torn_at, "a read-only open wrote to the vault");
    assert_eq!(len(&segments(&backup).pop().unwrap()), committed);
    let b = open(&backup);
    assert!(b.check(false).unwrap().is_clean());
    assert_eq!(b.read_file("/a").unwrap(), text(1, 100_000));
    drop(b);

    // A writable open cuts the tail; after it there is nothing to ignore.
    let v = open(&dir);
    assert_eq!(len(&seg), committed);
    let rep = v.check(false).unwrap();
    assert!(rep.is_clean() && rep.torn_tail_bytes == 0, "{rep:?}");
    assert!(matches!(v.read_file("/b"), Err(VaultError::NotFound)));
}
