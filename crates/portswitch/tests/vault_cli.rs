//! `portswitch vault` as users run it, with the real binary: init/put/get/ls/rm,
//! versions, snapshots and restore, check and repair, backup, gc, passphrases and keys,
//! exit codes; and `vault mount` as a real FUSE mount in a child process — written
//! through with std::fs, unmounted cleanly by SIGTERM (metrics served meanwhile), and
//! killed with SIGKILL mid-write many times, after which the vault opens, checks clean
//! and holds every file at least as new as its last fsync.
//!
//! The mount tests need /dev/fuse and root (or fusermount3): they install `fuse3`
//! through scripts/need-debian.sh. Every mount is unmounted by a drop guard.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Once};
use std::time::{Duration, Instant};

use portswitch_vault::format::{Frame, RecordKind};

const BIN: &str = env!("CARGO_BIN_EXE_portswitch");
const PASS: &str = "tr0ub4dor&3";

fn vault(args: &[&str]) -> Command {
    let mut c = Command::new(BIN);
    c.arg("vault")
        .args(args)
        .env("PORTSWITCH_VAULT_PASSPHRASE", PASS)
        .env_remove("PORTSWITCH_VAULT_NEW_PASSPHRASE")
        .stdin(Stdio::null());
    c
}

/// Runs `portswitch vault args…`; returns (exit code, stdout, stderr).
fn run(args: &[&str]) -> (i32, String, String) {
    outcome(vault(args).output().expect("run portswitch"))
}

fn outcome(o: Output) -> (i32, String, String) {
    (
        o.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

/// Runs and expects success; returns stdout.
fn ok(args: &[&str]) -> String {
    let (code, out, err) = run(args);
    assert_eq!(code, 0, "vault {args:?} failed: {err}");
    out
}

fn put(dir: &Path, path: &str, data: &[u8]) -> u64 {
    let mut child = vault(&["put", s(dir), path, "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(data).unwrap();
    let (code, out, err) = outcome(child.wait_with_output().unwrap());
    assert_eq!(code, 0, "put {path}: {err}");
    version_of(&out)
}

fn get(dir: &Path, path: &str, at: Option<&str>) -> Vec<u8> {
    let mut args = vec!["get", s(dir), path];
    if let Some(at) = at {
        args.extend(["--at", at]);
    }
    let o = vault(&args).output().unwrap();
    assert!(
        o.status.success(),
        "get {path}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    o.stdout
}

fn version_of(out: &str) -> u64 {
    out.trim()
        .strip_prefix("version ")
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no version in {out:?}"))
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn init(dir: &Path, extra: &[&str]) {
    let mut args = vec!["init", s(dir), "--danger-insecure-fast-kdf"];
    args.extend(extra);
    let out = ok(&args);
    assert!(out.starts_with("created vault"), "{out}");
}

/// Flips a byte in the middle of the `n`th block record.
fn damage_block(vault_dir: &Path, n: usize) {
    let mut blocks = Vec::new();
    let mut segs: Vec<PathBuf> = std::fs::read_dir(vault_dir.join("seg"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "seg"))
        .collect();
    segs.sort();
    for seg in segs {
        let bytes = std::fs::read(&seg).unwrap();
        let mut off = 0usize;
        while off + 16 <= bytes.len() {
            let Some(f) = Frame::decode(&bytes[off..off + 16]) else {
                break;
            };
            if f.kind == RecordKind::Block {
                blocks.push((seg.clone(), off + 16 + f.body_len as usize / 2));
            }
            off += f.record_len() as usize;
        }
    }
    let (seg, at) = blocks[n].clone();
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(seg)
        .unwrap();
    let mut b = [0u8];
    f.read_exact_at(&mut b, at as u64).unwrap();
    f.write_all_at(&[b[0] ^ 0x20], at as u64).unwrap();
    f.sync_all().unwrap();
}

fn noise(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

#[test]
fn files_versions_snapshots_and_restore() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("v");
    init(
        &dir,
        &["--cipher", "chacha20-poly1305", "--block-size", "16K"],
    );

    let v1 = put(&dir, "/docs/plan.txt", b"first plan\n");
    let v2 = put(&dir, "/docs/plan.txt", b"second plan\n");
    assert!(v2 > v1);
    assert_eq!(get(&dir, "/docs/plan.txt", None), b"second plan\n");
    assert_eq!(
        get(&dir, "/docs/plan.txt", Some(&v1.to_string())),
        b"first plan\n"
    );

    // A file from a local file too, and the listing.
    let local = tmp.path().join("local.bin");
    let data = noise(1, 100_000);
    std::fs::write(&local, &data).unwrap();
    ok(&["put", s(&dir), "/docs/local.bin", s(&local)]);
    assert!(get(&dir, "/docs/local.bin", None) == data);
    let ls = ok(&["ls", s(&dir), "/docs"]);
    let lines: Vec<&str> = ls.lines().collect();
    assert_eq!(lines.len(), 2, "{ls}");
    assert!(
        lines[0].ends_with(" local.bin") && lines[0].contains(" 100000 "),
        "{ls}"
    );
    assert!(lines[1].ends_with(" plan.txt"), "{ls}");
    assert!(ok(&["ls", s(&dir)])
        .lines()
        .any(|l| l.starts_with('d') && l.ends_with(" docs")));

    // Versions of a path: version, time, size.
    let versions = ok(&["versions", s(&dir), "/docs/plan.txt"]);
    let listed: Vec<u64> = versions
        .lines()
        .map(|l| l.split(' ').next().unwrap().parse().unwrap())
        .collect();
    assert_eq!(listed, [v1, v2], "{versions}");
    assert!(
        versions.lines().next().unwrap().ends_with(" 11"),
        "{versions}"
    );

    // A snapshot, a removal, an older view, a restore.
    let snap = ok(&["snapshot", s(&dir), "before-rm"]);
    assert!(snap.starts_with("snapshot before-rm = version "), "{snap}");
    let snaps = ok(&["snapshots", s(&dir)]);
    assert!(snaps.starts_with("before-rm "), "{snaps}");
    ok(&["rm", s(&dir), "/docs/plan.txt"]);
    let (code, _, err) = run(&["get", s(&dir), "/docs/plan.txt"]);
    assert_eq!(code, 6, "a missing path exits 6: {err}");
    assert!(ok(&["versions", s(&dir), "/docs/plan.txt"])
        .lines()
        .last()
        .unwrap()
        .ends_with(" removed"));
    assert_eq!(
        get(&dir, "/docs/plan.txt", Some("before-rm")),
        b"second plan\n"
    );
    assert!(ok(&["ls", s(&dir), "/docs", "--at", "before-rm"]).contains(" plan.txt"));
    let restored = version_of(&ok(&[
        "restore",
        s(&dir),
        "/docs/plan.txt",
        "--at",
        &v1.to_string(),
    ]));
    assert_eq!(get(&dir, "/docs/plan.txt", None), b"first plan\n");
    // The whole vault as of the snapshot.
    ok(&["restore", s(&dir), "--at", "snapshot:before-rm"]);
    assert_eq!(get(&dir, "/docs/plan.txt", None), b"second plan\n");
    assert!(version_of(&ok(&["rm", s(&dir), "/docs/local.bin"])) > restored);
    // No such version.
    let (code, _, _) = run(&["get", s(&dir), "/docs/plan.txt", "--at", "999999"]);
    assert_eq!(code, 6);
    // Times: a minute from now is the head.
    assert_eq!(
        get(&dir, "/docs/plan.txt", Some("2999-01-01T00:00:00Z")),
        b"second plan\n"
    );
}

#[test]
fn passphrases_keys_and_exit_codes() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("v");
    init(&dir, &["--cipher", "sm4-gcm"]);
    put(&dir, "/a", b"alpha");

    // Wrong passphrase: exit 3, a clear message, never garbage.
    let o = vault(&["get", s(&dir), "/a"])
        .env("PORTSWITCH_VAULT_PASSPHRASE", "wrong")
        .output()
        .unwrap();
    let (code, out, err) = outcome(o);
    assert_eq!(code, 3);
    assert!(out.is_empty());
    assert!(err.contains("wrong passphrase"), "{err}");

    // From a file, and from standard input.
    let pf = tmp.path().join("pass");
    std::fs::write(&pf, format!("{PASS}\n")).unwrap();
    let o = vault(&["get", s(&dir), "/a", "--passphrase-file", s(&pf)])
        .env_remove("PORTSWITCH_VAULT_PASSPHRASE")
        .output()
        .unwrap();
    assert_eq!(o.stdout, b"alpha");
    let mut c = vault(&["get", s(&dir), "/a"])
        .env_remove("PORTSWITCH_VAULT_PASSPHRASE")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    c.stdin
        .take()
        .unwrap()
        .write_all(format!("{PASS}\n").as_bytes())
        .unwrap();
    assert_eq!(c.wait_with_output().unwrap().stdout, b"alpha");
    // No passphrase anywhere: a usage error.
    let (code, _, err) = outcome(
        vault(&["get", s(&dir), "/a"])
            .env_remove("PORTSWITCH_VAULT_PASSPHRASE")
            .output()
            .unwrap(),
    );
    assert_eq!(code, 2, "{err}");

    // passwd: the old passphrase stops working, the new one works.
    let o = vault(&["passwd", s(&dir)])
        .env("PORTSWITCH_VAULT_NEW_PASSPHRASE", "new secret")
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(run(&["get", s(&dir), "/a"]).0, 3);
    let o = vault(&["get", s(&dir), "/a"])
        .env("PORTSWITCH_VAULT_PASSPHRASE", "new secret")
        .output()
        .unwrap();
    assert_eq!(o.stdout, b"alpha");
    let o = vault(&["passwd", s(&dir)])
        .env("PORTSWITCH_VAULT_PASSPHRASE", "new secret")
        .env("PORTSWITCH_VAULT_NEW_PASSPHRASE", PASS)
        .output()
        .unwrap();
    assert!(o.status.success());

    // rotate-key, then everything still reads and checks clean.
    let out = ok(&["rotate-key", s(&dir)]);
    assert!(
        out.contains("is active") && out.contains("re-sealed"),
        "{out}"
    );
    assert_eq!(get(&dir, "/a", None), b"alpha");
    ok(&["check", s(&dir)]);

    // Usage errors: exit 2.
    assert_eq!(
        run(&["init", s(&tmp.path().join("w")), "--block-size", "3K"]).0,
        2
    );
    assert_eq!(
        run(&["init", s(&tmp.path().join("w")), "--parity", "x"]).0,
        2
    );
    assert_eq!(run(&["get", s(&dir), "/a", "--at", "-5y"]).0, 2);
}

#[test]
fn check_finds_damage_and_repairs_it_from_the_mirror() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("v");
    let mirror = tmp.path().join("m");
    init(&dir, &["--mirror", s(&mirror), "--parity", "none"]);
    let data = noise(2, 200_000);
    let local = tmp.path().join("data");
    std::fs::write(&local, &data).unwrap();
    ok(&["put", s(&dir), "/data", s(&local), "--mirror", s(&mirror)]);
    let out = ok(&["check", s(&dir), "--mirror", s(&mirror)]);
    assert!(
        out.ends_with("0 damaged, 0 repaired, 0 not repaired\n"),
        "{out}"
    );

    damage_block(&dir, 10);
    // Without the mirror: found, not repaired, exit 4; a read of it fails the same way.
    let (code, out, _) = run(&["check", s(&dir)]);
    assert_eq!(code, 4, "{out}");
    assert!(
        out.contains("damaged block in segment") && out.contains("NOT repaired"),
        "{out}"
    );
    let (code, out, err) = run(&["get", s(&dir), "/data"]);
    assert_eq!(code, 4, "{err}");
    assert!(out.is_empty(), "no bytes of a damaged file");
    // With it: repaired in place, and clean from then on.
    let (code, out, err) = run(&["check", s(&dir), "--mirror", s(&mirror), "--repair"]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("1 repaired, 0 not repaired"), "{out}");
    ok(&["check", s(&dir)]);
    assert!(get(&dir, "/data", None) == data);
}

#[test]
fn backup_and_gc() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("v");
    let backup = tmp.path().join("b");
    init(&dir, &[]);
    for i in 0..5 {
        put(&dir, "/f", format!("v{i}").as_bytes());
    }
    let out = ok(&["backup", s(&dir), "--to", s(&backup)]);
    assert!(out.starts_with("shipped "), "{out}");
    // Incremental: nothing new, nothing shipped.
    let out = ok(&["backup", s(&dir), "--to", s(&backup)]);
    assert!(out.starts_with("shipped 0 bytes"), "{out}");
    // The backup is a vault of its own.
    ok(&["check", s(&backup)]);
    assert_eq!(get(&backup, "/f", None), b"v4");

    let out = ok(&["gc", s(&dir), "--keep-last", "1"]);
    assert!(out.starts_with("horizon version "), "{out}");
    assert_eq!(get(&dir, "/f", None), b"v4");
    ok(&["check", s(&dir)]);
    assert_eq!(run(&["gc", s(&dir), "--keep-within", "3 days"]).0, 2);
}

/// `vault backup-serve` on "another node" (a separate process on loopback): backups
/// ship to it over the PSK channel, a wrong key is refused, `vault pull` brings the
/// backup back and it opens and checks clean.
#[test]
fn backup_to_a_server_and_pull_it_back() {
    let tmp = tempfile::tempdir().unwrap();
    let (dir, root, key) = (
        tmp.path().join("v"),
        tmp.path().join("root"),
        tmp.path().join("key"),
    );
    init(&dir, &[]);
    put(&dir, "/a", b"first");
    put(&dir, "/big", &noise(3, 3 << 20));
    let out = ok(&["backup-key", s(&key)]);
    assert!(out.starts_with("wrote a new backup key"), "{out}");
    // A key file is never overwritten.
    assert_ne!(run(&["backup-key", s(&key)]).0, 0);
    let mut server = vault(&[
        "backup-serve",
        s(&root),
        "--listen",
        "127.0.0.1:0",
        "--key-file",
        s(&key),
        "--metrics-listen",
        "127.0.0.1:0",
    ])
    .stdout(Stdio::piped())
    .stderr(Stdio::piped())
    .spawn()
    .unwrap();
    struct Kill(Child);
    impl Drop for Kill {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let mut line = String::new();
    let mut metrics = String::new();
    let mut lines = BufReader::new(server.stdout.take().unwrap());
    lines.read_line(&mut line).unwrap();
    lines.read_line(&mut metrics).unwrap();
    let _server = Kill(server);
    let metrics = metrics
        .trim()
        .strip_prefix("metrics on http://")
        .and_then(|m| m.strip_suffix("/metrics"))
        .unwrap_or_else(|| panic!("{metrics}"))
        .to_string();
    let addr = line
        .strip_prefix("backup server listening on ")
        .and_then(|r| r.split(',').next())
        .unwrap_or_else(|| panic!("{line}"))
        .to_string();
    let out = ok(&["backup", s(&dir), "--server", &addr, "--key-file", s(&key)]);
    assert!(out.starts_with("shipped "), "{out}");
    let id = out.trim().rsplit(' ').next().unwrap().to_string();
    assert_eq!(id.len(), 32, "{out}");
    // Incremental.
    put(&dir, "/a", b"second");
    let out = ok(&["backup", s(&dir), "--server", &addr, "--key-file", s(&key)]);
    let shipped: u64 = out.split(' ').nth(1).unwrap().parse().unwrap();
    assert!(shipped > 0 && shipped < 1 << 20, "{out}");
    // A wrong key: refused in the handshake, a clear error, exit code not 0.
    let wrong = tmp.path().join("wrong");
    ok(&["backup-key", s(&wrong)]);
    let m = http_get(&metrics, "/metrics");
    let written = m
        .lines()
        .find_map(|l| l.strip_prefix("vault_backup_server_written_bytes_total "))
        .unwrap_or_else(|| panic!("{m}"));
    assert!(written.parse::<f64>().unwrap() >= (3 << 20) as f64, "{m}");
    let (code, _, err) = run(&[
        "backup",
        s(&dir),
        "--server",
        &addr,
        "--key-file",
        s(&wrong),
    ]);
    assert_ne!(code, 0);
    assert!(err.contains("handshake"), "{err}");
    // Pulled back: a vault that opens with the passphrase and holds the last version.
    let back = tmp.path().join("back");
    let out = ok(&[
        "pull",
        "--server",
        &addr,
        "--key-file",
        s(&key),
        "--vault-id",
        &id,
        s(&back),
    ]);
    assert!(out.starts_with("pulled "), "{out}");
    ok(&["check", s(&back)]);
    assert_eq!(get(&back, "/a", None), b"second");
    assert_eq!(get(&back, "/big", None), noise(3, 3 << 20));

    // The server's copy repairs a damaged block that the parity cannot (a vault
    // without parity) through `check --repair --repair-server`.
    let np = tmp.path().join("np");
    init(&np, &["--parity", "none"]);
    let data = noise(4, 1 << 20);
    put(&np, "/data", &data);
    let out = ok(&["backup", s(&np), "--server", &addr, "--key-file", s(&key)]);
    assert!(out.starts_with("shipped "), "{out}");
    damage_block(&np, 10);
    assert_eq!(run(&["check", s(&np)]).0, 4);
    let (code, out, err) = run(&[
        "check",
        s(&np),
        "--repair",
        "--repair-server",
        &addr,
        "--repair-key-file",
        s(&key),
    ]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("1 repaired, 0 not repaired"), "{out}");
    ok(&["check", s(&np)]);
    assert_eq!(get(&np, "/data", None), data);

    // A mount backs up continuously to the server: a file written and fsynced
    // through the mount reaches the server without an unmount.
    let mnt = tmp.path().join("mnt");
    let mut m = MountProc::start(
        &dir,
        &mnt,
        &["--backup-server", &addr, "--backup-key-file", s(&key)],
    );
    write_synced(&mnt.join("mounted.txt"), b"shipped while mounted");
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut n = 0;
    loop {
        n += 1;
        let to = tmp.path().join(format!("pulled-{n}"));
        // A pull may meet the mount's backup run holding the lock: try again.
        let (code, _, _) = run(&[
            "pull",
            "--server",
            &addr,
            "--key-file",
            s(&key),
            "--vault-id",
            &id,
            s(&to),
        ]);
        if code == 0
            && get_maybe(&to, "/mounted.txt").as_deref() == Some(&b"shipped while mounted"[..])
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the mount's commit never reached the server"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    m.signal(nix::sys::signal::Signal::SIGTERM);
    assert_eq!(m.wait(Duration::from_secs(60)), Some(0));
}

/// A `vault backup-serve` process registered in the port switch as NAME; returns it
/// (killed on drop) once it says it registered.
fn backup_server_in_switch(root: &Path, key: &Path, switch: &str, name: &str) -> MountLike {
    let mut child = vault(&[
        "backup-serve",
        s(root),
        "--listen",
        "127.0.0.1:0",
        "--key-file",
        s(key),
        "--switch",
        switch,
        "--name",
        name,
    ])
    .stdout(Stdio::null())
    .stderr(Stdio::piped())
    .spawn()
    .unwrap();
    let err = Arc::new(Mutex::new(String::new()));
    collect(child.stderr.take().unwrap(), err.clone());
    let deadline = Instant::now() + Duration::from_secs(30);
    while !err.lock().unwrap().contains("registered as vault-backup/") {
        assert!(
            Instant::now() < deadline,
            "not registered: {}",
            err.lock().unwrap()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    MountLike(child)
}

/// A child process killed (SIGKILL) and reaped on drop.
struct MountLike(Child);

impl Drop for MountLike {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Backup servers found through the port switch: a vault backs up to "the servers
/// named office"; when that server is killed (-9) its registration goes with its
/// session, and the next backup finds the one that registered since.
#[test]
fn backup_servers_are_found_through_the_port_switch() {
    let tmp = tempfile::tempdir().unwrap();
    let switch = Switch::start(&tmp.path().join("switch"));
    let (dir, key) = (tmp.path().join("v"), tmp.path().join("key"));
    init(&dir, &[]);
    put(&dir, "/f", b"one");
    ok(&["backup-key", s(&key)]);
    let spec = format!("switch://{}/office", switch.addr);
    // Nothing registered yet: a clear error.
    let (code, _, err) = run(&["backup", s(&dir), "--server", &spec, "--key-file", s(&key)]);
    assert_ne!(code, 0);
    assert!(err.contains("no backup server registered"), "{err}");
    let (r1, r2) = (tmp.path().join("r1"), tmp.path().join("r2"));
    let first = backup_server_in_switch(&r1, &key, &switch.addr, "office");
    let out = ok(&["backup", s(&dir), "--server", &spec, "--key-file", s(&key)]);
    assert!(out.starts_with("shipped "), "{out}");
    assert!(std::fs::read_dir(&r1).unwrap().count() == 1);
    drop(first);
    let _second = backup_server_in_switch(&r2, &key, &switch.addr, "office");
    put(&dir, "/f", b"two");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        // The first server's registration may still be listed for a moment.
        let (code, out, err) = run(&["backup", s(&dir), "--server", &spec, "--key-file", s(&key)]);
        if code == 0 {
            assert!(out.starts_with("shipped "), "{out}");
            break;
        }
        assert!(Instant::now() < deadline, "{err}");
        std::thread::sleep(Duration::from_millis(100));
    }
    let id = std::fs::read_dir(&r2)
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .file_name();
    let back = tmp.path().join("back");
    ok(&[
        "pull",
        "--server",
        &spec,
        "--key-file",
        s(&key),
        "--vault-id",
        id.to_str().unwrap(),
        s(&back),
    ]);
    assert_eq!(get(&back, "/f", None), b"two");
}

/// `get`, or `None` when the file (or the vault) is not there.
fn get_maybe(dir: &Path, path: &str) -> Option<Vec<u8>> {
    let o = vault(&["get", s(dir), path]).output().unwrap();
    o.status.success().then_some(o.stdout)
}

#[test]
fn sql_through_the_sqlite_vfs() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("v");
    init(&dir, &[]);
    ok(&[
        "sql",
        s(&dir),
        "app.db",
        "CREATE TABLE t (id INTEGER PRIMARY KEY, name TEXT, data BLOB);
         INSERT INTO t (name, data) VALUES ('alpha', x'00ff'), ('beta', NULL);",
    ]);
    let out = ok(&[
        "sql",
        s(&dir),
        "app.db",
        "SELECT id, name, data FROM t ORDER BY id; SELECT count(*) FROM t;",
    ]);
    assert_eq!(out, "1|alpha|x'00ff'\n2|beta|NULL\n2\n");
    // SQL from standard input, after the passphrase line.
    let mut c = vault(&["sql", s(&dir), "app.db"])
        .env_remove("PORTSWITCH_VAULT_PASSPHRASE")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    c.stdin
        .take()
        .unwrap()
        .write_all(format!("{PASS}\nSELECT name FROM t WHERE id = 2;\n").as_bytes())
        .unwrap();
    assert_eq!(c.wait_with_output().unwrap().stdout, b"beta\n");
    // The database is a file of the vault, with versions.
    assert!(!ok(&["versions", s(&dir), "/app.db"]).is_empty());
    let (code, _, err) = run(&["sql", s(&dir), "app.db", "SELEKT 1"]);
    assert_eq!(code, 1);
    assert!(
        err.contains("sql: ") && err.contains("syntax error"),
        "{err}"
    );
}

// ---- mounts ----

fn need_fuse() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scripts/need-debian.sh");
        let st = Command::new("bash")
            .arg(&script)
            .arg("fuse3")
            .status()
            .expect("run scripts/need-debian.sh");
        assert!(st.success(), "scripts/need-debian.sh fuse3 failed");
        assert!(
            Path::new("/dev/fuse").exists(),
            "the mount tests need /dev/fuse (modprobe fuse)"
        );
    });
}

/// A `portswitch vault mount` child process. Dropping it kills the process and
/// unmounts (lazily), so a failing test leaves no stale mount.
struct MountProc {
    child: Child,
    mnt: PathBuf,
    stdout: Arc<Mutex<String>>,
    stderr: Arc<Mutex<String>>,
}

/// Collects what `r` prints into `into`, line by line, from a thread.
fn collect(r: impl Read + Send + 'static, into: Arc<Mutex<String>>) {
    let mut r = BufReader::new(r);
    std::thread::spawn(move || {
        let mut line = String::new();
        while r.read_line(&mut line).is_ok_and(|n| n > 0) {
            into.lock().unwrap().push_str(&line);
            line.clear();
        }
    });
}

impl MountProc {
    /// Starts a mount and waits until it serves.
    fn start(dir: &Path, mnt: &Path, extra: &[&str]) -> MountProc {
        let mut p = MountProc::spawn(dir, mnt, extra);
        p.wait_mounted(Duration::from_secs(60));
        p
    }

    /// Starts a mount without waiting for it.
    fn spawn(dir: &Path, mnt: &Path, extra: &[&str]) -> MountProc {
        need_fuse();
        std::fs::create_dir_all(mnt).unwrap();
        let mut args = vec!["mount", s(dir), s(mnt)];
        args.extend(extra);
        let mut child = vault(&args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stdout = Arc::new(Mutex::new(String::new()));
        let stderr = Arc::new(Mutex::new(String::new()));
        collect(child.stderr.take().unwrap(), stderr.clone());
        collect(child.stdout.take().unwrap(), stdout.clone());
        MountProc {
            child,
            mnt: mnt.to_path_buf(),
            stdout,
            stderr,
        }
    }

    /// Waits for "mounted …" (panics when the process ends first or at `limit`).
    fn wait_mounted(&mut self, limit: Duration) {
        let deadline = Instant::now() + limit;
        while !self.stdout.lock().unwrap().starts_with("mounted ") {
            let ended = self.child.try_wait().unwrap();
            assert!(
                ended.is_none() && Instant::now() < deadline,
                "mount did not start ({ended:?}): {}{}",
                self.stdout.lock().unwrap(),
                self.stderr.lock().unwrap()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits until standard error holds `what`; returns it all.
    fn wait_stderr(&self, what: &str, limit: Duration) -> String {
        let deadline = Instant::now() + limit;
        loop {
            let e = self.stderr.lock().unwrap().clone();
            if e.contains(what) {
                return e;
            }
            assert!(Instant::now() < deadline, "no {what:?} from the mount: {e}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The fencing token the mount owns its port with.
    fn token(&self) -> u64 {
        let e = self.wait_stderr(" with token ", Duration::from_secs(30));
        e.split(" with token ")
            .nth(1)
            .and_then(|t| t.split_whitespace().next())
            .and_then(|t| t.parse().ok())
            .unwrap_or_else(|| panic!("no token in {e}"))
    }

    fn pid(&self) -> nix::unistd::Pid {
        nix::unistd::Pid::from_raw(self.child.id() as i32)
    }

    fn signal(&self, sig: nix::sys::signal::Signal) {
        nix::sys::signal::kill(self.pid(), sig).unwrap();
    }

    /// Waits for the process to end; its exit code.
    fn wait(&mut self, limit: Duration) -> Option<i32> {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                return Some(st.code().unwrap_or(-1));
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn mounted(&self) -> bool {
        let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap();
        let mnt = self.mnt.canonicalize().unwrap_or(self.mnt.clone());
        mounts.lines().any(|l| l.split(' ').nth(1) == Some(s(&mnt)))
    }

    fn lazy_unmount(&self) {
        let _ = Command::new("fusermount3")
            .arg("-uz")
            .arg(&self.mnt)
            .stderr(Stdio::null())
            .status();
    }
}

impl Drop for MountProc {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        self.lazy_unmount();
    }
}

fn http_get(addr: &str, path: &str) -> String {
    let mut c = std::net::TcpStream::connect(addr).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(
        c,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut body = String::new();
    c.read_to_string(&mut body).unwrap();
    body
}

#[test]
fn mount_serves_files_and_metrics_and_unmounts_on_sigterm() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("v");
    let mnt = tmp.path().join("mnt");
    init(&dir, &[]);
    put(&dir, "/hello.txt", b"hello from put\n");
    let backup = tmp.path().join("backup");
    let mut m = MountProc::start(
        &dir,
        &mnt,
        &["--metrics-listen", "127.0.0.1:0", "--backup", s(&backup)],
    );
    assert_eq!(
        std::fs::read(mnt.join("hello.txt")).unwrap(),
        b"hello from put\n"
    );
    std::fs::create_dir(mnt.join("sub")).unwrap();
    let data = noise(3, 3 << 20);
    std::fs::write(mnt.join("sub/data.bin"), &data).unwrap();
    assert!(std::fs::read(mnt.join("sub/data.bin")).unwrap() == data);

    // The vault is locked while mounted: a writer gets exit 5.
    let (code, _, err) = run(&["put", s(&dir), "/x", s(&mnt.join("hello.txt"))]);
    assert_eq!(code, 5, "{err}");

    // Metrics over HTTP.
    let addr = {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let e = m.stderr.lock().unwrap().clone();
            if let Some(rest) = e.split("metrics on http://").nth(1) {
                break rest.split('/').next().unwrap().to_string();
            }
            assert!(Instant::now() < deadline, "no metrics address: {e}");
            std::thread::sleep(Duration::from_millis(20));
        }
    };
    let metrics = http_get(&addr, "/metrics");
    assert!(
        metrics.contains("vault_fuse_requests_total{op=\"write\"}"),
        "{metrics}"
    );
    assert!(
        metrics.contains("vault_fuse_commits_total{reason=\"close\"}"),
        "{metrics}"
    );
    assert!(metrics.contains("vault_commits_total"), "{metrics}");
    assert!(http_get(&addr, "/health").ends_with("ok\n"));

    // SIGTERM: unmounted, exit 0, everything written is in the vault.
    m.signal(nix::sys::signal::Signal::SIGTERM);
    assert_eq!(
        m.wait(Duration::from_secs(30)),
        Some(0),
        "{}",
        m.stderr.lock().unwrap()
    );
    assert!(!m.mounted(), "still mounted after SIGTERM");
    assert!(get(&dir, "/sub/data.bin", None) == data);
    ok(&["check", s(&dir)]);
    // The continuous backup holds it too.
    assert!(get(&backup, "/sub/data.bin", None) == data);

    // SIGINT works the same.
    let mut m = MountProc::start(&dir, &mnt, &[]);
    std::fs::write(mnt.join("after.txt"), b"sigint").unwrap();
    m.signal(nix::sys::signal::Signal::SIGINT);
    assert_eq!(m.wait(Duration::from_secs(30)), Some(0));
    assert!(!m.mounted());
    assert_eq!(get(&dir, "/after.txt", None), b"sigint");
}

/// A writer that replaces files atomically (write a temporary file, fsync it, rename
/// it over the file, fsync the directory) and remembers, per file, the last generation
/// that fsync acknowledged; beside it, a bulk writer that never fsyncs.
fn writer(mnt: PathBuf, files: usize, stop: Arc<AtomicBool>, acked: Arc<Mutex<Vec<u64>>>) {
    let body = |gen: u64, f: usize| -> Vec<u8> {
        format!("file {f} generation {gen}\n")
            .repeat(1000)
            .into_bytes()
    };
    let mut gen = acked.lock().unwrap().iter().copied().max().unwrap_or(0);
    let dirh = match std::fs::File::open(&mnt) {
        Ok(d) => d,
        Err(_) => return,
    };
    while !stop.load(Ordering::Relaxed) {
        gen += 1;
        for f in 0..files {
            let tmp = mnt.join(format!("f{f}.tmp"));
            let res = (|| -> std::io::Result<()> {
                let mut t = std::fs::File::create(&tmp)?;
                t.write_all(&body(gen, f))?;
                t.sync_all()?;
                drop(t);
                std::fs::rename(&tmp, mnt.join(format!("f{f}")))?;
                dirh.sync_all()?;
                Ok(())
            })();
            if res.is_err() {
                return; // the mount is gone
            }
            acked.lock().unwrap()[f] = gen;
        }
    }
}

#[test]
fn kill_9_mid_write_then_reopen_many_times() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("v");
    let mnt = tmp.path().join("mnt");
    init(&dir, &[]);
    const FILES: usize = 3;
    let acked = Arc::new(Mutex::new(vec![0u64; FILES]));
    for round in 0..4u64 {
        let m = MountProc::start(&dir, &mnt, &["--commit-interval-ms", "20"]);
        let stop = Arc::new(AtomicBool::new(false));
        let w = {
            let (mnt, stop, acked) = (mnt.clone(), stop.clone(), acked.clone());
            std::thread::spawn(move || writer(mnt, FILES, stop, acked))
        };
        // Heavy writes that are never fsynced: what the kill cuts through.
        let bulk = {
            let (mnt, stop) = (mnt.clone(), stop.clone());
            std::thread::spawn(move || {
                let chunk = noise(round, 256 << 10);
                let Ok(mut f) = std::fs::File::create(mnt.join(format!("bulk{round}"))) else {
                    return;
                };
                // 24 MiB at full speed, then small overwrites (bounded disk use).
                let mut written = 0usize;
                let mut i = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    let r = if written < 24 << 20 {
                        written += chunk.len();
                        f.write_all(&chunk)
                    } else {
                        i += 1;
                        std::thread::sleep(Duration::from_millis(1));
                        f.write_all_at(&chunk[..4096], (i * 40_961) % (24 << 20))
                    };
                    if r.is_err() {
                        return;
                    }
                }
            })
        };
        // Kill once the writer has had every file acknowledged in this round (an
        // fsync is a commit plus fdatasync of all the bulk bytes before it), at a
        // different moment each round.
        let before = acked.lock().unwrap().iter().copied().max().unwrap_or(0);
        let deadline = Instant::now() + Duration::from_secs(60);
        while acked.lock().unwrap().iter().any(|&g| g <= before) {
            assert!(
                Instant::now() < deadline,
                "round {round}: no fsync acknowledged in 60 s"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        std::thread::sleep(Duration::from_millis(50 + 97 * round));
        m.signal(nix::sys::signal::Signal::SIGKILL);
        stop.store(true, Ordering::Relaxed);
        // The dead mount answers ENOTCONN; detach it so the threads finish.
        m.lazy_unmount();
        w.join().unwrap();
        bulk.join().unwrap();
        drop(m);

        // The vault opens, every record authenticates — the torn tail the kill left
        // is no damage, even to a read-only check that leaves it in place (the next
        // mount's writable open cuts it) — and every file is a whole generation at
        // least as new as the last one fsync acknowledged.
        let (code, out, err) = run(&["check", s(&dir)]);
        assert_eq!(code, 0, "round {round}: {out}{err}");
        assert!(
            !out.contains("damaged ") && out.contains("\n0 damaged, 0 repaired"),
            "round {round}: {out}"
        );
        let torn = out.lines().find(|l| l.starts_with("torn tail: "));
        eprintln!(
            "round {round}: {} {}",
            out.lines().next().unwrap_or(""),
            torn.unwrap_or("(no torn tail)")
        );
        let acked_now = acked.lock().unwrap().clone();
        assert!(
            acked_now.iter().all(|&g| g > 0),
            "round {round}: the writer made no progress"
        );
        for (f, &want) in acked_now.iter().enumerate() {
            let got = get(&dir, &format!("/f{f}"), None);
            let text = String::from_utf8(got).unwrap();
            let first = text.lines().next().unwrap_or("");
            let gen: u64 = first
                .strip_prefix(&format!("file {f} generation "))
                .and_then(|g| g.parse().ok())
                .unwrap_or_else(|| panic!("round {round}: f{f} holds {first:?}"));
            assert!(
                gen >= want,
                "round {round}: f{f} at generation {gen}, fsync acked {want}"
            );
            assert_eq!(
                text,
                format!("file {f} generation {gen}\n").repeat(1000),
                "round {round}: f{f} is not one whole generation"
            );
        }
    }
}

// ---- the port switch: one writer at a time, fencing ----

/// `portswitch serve` on an ephemeral loopback port; killed on drop.
struct Switch {
    child: Child,
    addr: String,
}

impl Switch {
    fn start(data: &Path) -> Switch {
        let mut child = Command::new(BIN)
            .args([
                "serve",
                "--listen",
                "127.0.0.1:0",
                "--no-http",
                "--data-dir",
                s(data),
            ])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let err = Arc::new(Mutex::new(String::new()));
        collect(child.stderr.take().unwrap(), err.clone());
        let mut out = BufReader::new(child.stdout.take().unwrap());
        let mut line = String::new();
        out.read_line(&mut line).unwrap();
        let addr = line
            .strip_prefix("listening on ")
            .unwrap_or_else(|| panic!("serve printed {line:?}: {}", err.lock().unwrap()))
            .trim()
            .to_string();
        // Keep draining what it prints, so it never blocks on a full pipe.
        collect(out.into_inner(), Arc::default());
        Switch { child, addr }
    }
}

impl Drop for Switch {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `--switch` on the writing commands: `put` owns the vault's port while it runs (its
/// token goes into the commit), is refused with exit 5 while a mount owns it, and
/// works again once the mount is gone.
#[test]
fn writing_commands_own_the_port_with_switch() {
    need_fuse();
    let tmp = tempfile::tempdir().unwrap();
    let switch = Switch::start(&tmp.path().join("switch"));
    let addr = switch.addr.as_str();
    let dir = tmp.path().join("v");
    init(&dir, &[]);
    let put_switch = |data: &[u8]| {
        let mut child = vault(&["put", s(&dir), "/f", "-", "--switch", addr])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        child.stdin.take().unwrap().write_all(data).unwrap();
        outcome(child.wait_with_output().unwrap())
    };
    let (code, _, err) = put_switch(b"one");
    assert_eq!(code, 0, "{err}");
    assert!(
        err.contains("owns vault/") && err.contains(" with token "),
        "{err}"
    );
    let mnt = tmp.path().join("mnt");
    let mut m = MountProc::start(&dir, &mnt, &["--switch", addr]);
    let t = m.token();
    let (code, _, err) = put_switch(b"two");
    assert_eq!(code, 5, "{err}");
    assert!(err.contains("another writer has the vault"), "{err}");
    m.signal(nix::sys::signal::Signal::SIGTERM);
    assert_eq!(m.wait(Duration::from_secs(60)), Some(0));
    let (code, _, err) = put_switch(b"three");
    assert_eq!(code, 0, "{err}");
    let later: u64 = err
        .split(" with token ")
        .nth(1)
        .and_then(|t| t.split_whitespace().next())
        .and_then(|t| t.parse().ok())
        .unwrap_or_else(|| panic!("{err}"));
    assert!(later > t, "tokens only grow: {t} then {later}");
    assert_eq!(get(&dir, "/f", None), b"three");
}

/// Copies a vault directory (header and segments): a stale writer's state.
fn copy_vault(from: &Path, to: &Path) {
    std::fs::create_dir_all(to.join("seg")).unwrap();
    std::fs::copy(from.join("VAULT"), to.join("VAULT")).unwrap();
    for seg in std::fs::read_dir(from.join("seg")).unwrap() {
        let p = seg.unwrap().path();
        std::fs::copy(&p, to.join("seg").join(p.file_name().unwrap())).unwrap();
    }
}

fn write_synced(path: &Path, data: &[u8]) {
    let mut f = std::fs::File::create(path).unwrap();
    f.write_all(data).unwrap();
    f.sync_all().unwrap();
}

/// Two `vault mount --switch` on one vault: the second is refused (exit 5) or waits
/// (`--wait`); the first is killed with SIGKILL and the second takes over with a
/// higher fencing token, which its commits record; a backup shipped from the first
/// writer's (stale) state into the target the second ships to is refused (exit 7).
/// Then a writer paused past its lease loses the port, stops and exits 7.
#[test]
fn mount_switch_one_writer_at_a_time_and_stale_writers_are_fenced() {
    need_fuse();
    let tmp = tempfile::tempdir().unwrap();
    let switch = Switch::start(&tmp.path().join("switch"));
    let addr = switch.addr.as_str();
    let dir = tmp.path().join("v");
    let backup = tmp.path().join("backup");
    let (mnt1, mnt2) = (tmp.path().join("mnt1"), tmp.path().join("mnt2"));
    init(&dir, &[]);

    let mut m1 = MountProc::start(&dir, &mnt1, &["--switch", addr, "--backup", s(&backup)]);
    let t1 = m1.token();
    write_synced(&mnt1.join("f"), b"one");
    // The first writer's state, as a machine cut off with it would keep it.
    let stale = tmp.path().join("stale");
    copy_vault(&dir, &stale);

    // A second writer is refused at once...
    std::fs::create_dir_all(&mnt2).unwrap();
    let (code, _, err) = run(&["mount", s(&dir), s(&mnt2), "--switch", addr]);
    assert_eq!(code, 5, "{err}");
    assert!(
        err.contains("is owned by") && err.contains("--wait"),
        "{err}"
    );
    // ...or waits for the port with --wait.
    let mut m2 = MountProc::spawn(
        &dir,
        &mnt2,
        &["--switch", addr, "--wait", "--backup", s(&backup)],
    );
    m2.wait_stderr("waiting for it", Duration::from_secs(30));
    std::thread::sleep(Duration::from_millis(300));
    assert!(m2.stdout.lock().unwrap().is_empty(), "mounted while owned");

    // kill -9 the first: its connection closes, the port goes to the second at once.
    m1.signal(nix::sys::signal::Signal::SIGKILL);
    assert!(m1.wait(Duration::from_secs(10)).is_some());
    m1.lazy_unmount();
    m2.wait_mounted(Duration::from_secs(60));
    let t2 = m2.token();
    assert!(t2 > t1, "takeover token {t2} not above {t1}");
    assert_eq!(std::fs::read(mnt2.join("f")).unwrap(), b"one");
    write_synced(&mnt2.join("f"), b"two");
    // Each version records the token of the writer that made it.
    let out = ok(&["versions", s(&dir), "/f"]);
    assert!(
        out.contains(&format!(" token={t1}")) && out.contains(&format!(" token={t2}")),
        "{out}"
    );
    // Unmounted: the last backup run has shipped the second writer's commits.
    m2.signal(nix::sys::signal::Signal::SIGTERM);
    assert_eq!(
        m2.wait(Duration::from_secs(30)),
        Some(0),
        "{}",
        m2.stderr.lock().unwrap()
    );
    assert_eq!(get(&backup, "/f", None), b"two");

    // The first writer's state may not be shipped over the newer writer's backup.
    let (code, out, err) = run(&["backup", s(&stale), "--to", s(&backup)]);
    assert_eq!(code, 7, "{out}{err}");
    assert!(err.contains("fenced"), "{err}");
    assert_eq!(get(&backup, "/f", None), b"two");
    ok(&["check", s(&backup)]);
    ok(&["check", s(&dir)]);
    drop(m1);
    drop(m2);

    // A writer that stops answering (SIGSTOP) loses the port after its lease; when it
    // runs again its fence is revoked before anything else, it commits nothing more
    // and exits 7; the next writer, which got the port and waited for the vault's
    // lock, takes over with a higher token.
    let mut m3 = MountProc::start(&dir, &mnt1, &["--switch", addr, "--lease-ms", "1000"]);
    let t3 = m3.token();
    assert!(t3 > t2, "{t3} after {t2}");
    write_synced(&mnt1.join("f"), b"three");
    m3.signal(nix::sys::signal::Signal::SIGSTOP);
    let mut m4 = MountProc::spawn(&dir, &mnt2, &["--switch", addr, "--wait"]);
    m4.wait_stderr("locked by another process", Duration::from_secs(30));
    let t4 = m4.token();
    assert!(t4 > t3, "{t4} after {t3}");
    m3.signal(nix::sys::signal::Signal::SIGCONT);
    assert_eq!(
        m3.wait(Duration::from_secs(30)),
        Some(7),
        "{}",
        m3.stderr.lock().unwrap()
    );
    let e = m3.stderr.lock().unwrap().clone();
    assert!(
        e.contains("lost vault/") && e.contains("no more commits"),
        "{e}"
    );
    m4.wait_mounted(Duration::from_secs(60));
    assert_eq!(std::fs::read(mnt2.join("f")).unwrap(), b"three");
    write_synced(&mnt2.join("f"), b"four");
    m4.signal(nix::sys::signal::Signal::SIGTERM);
    assert_eq!(m4.wait(Duration::from_secs(30)), Some(0));
    let out = ok(&["versions", s(&dir), "/f"]);
    assert!(out.contains(&format!(" token={t4}")), "{out}");
    ok(&["check", s(&dir)]);
}
