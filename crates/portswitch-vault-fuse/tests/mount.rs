//! A real FUSE mount of a real vault, in this process: POSIX semantics through std::fs,
//! versions made by close, the periodic commit and fsync, a real SQLite database
//! (rusqlite) on the mount, and a damaged block read through the mount (EIO without a
//! good copy, the right bytes with a mirror).
//!
//! Needs /dev/fuse and root (or fusermount3): installs `fuse3` through
//! scripts/need-debian.sh. Every mount is unmounted by a drop guard, lazily if a
//! failing test left a file open.

use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{FileExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Once;
use std::time::{Duration, SystemTime};

use portswitch_vault::format::{Frame, RecordKind};
use portswitch_vault::{CreateOptions, KdfParams, OpenOptions, Vault};
use portswitch_vault_fuse::{mount, MountOptions, MountedVault};

const PASS: &[u8] = b"correct horse battery staple";

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
            "these tests need /dev/fuse (modprobe fuse)"
        );
    });
}

/// A temporary vault and mount point, unmounted and removed on drop.
struct Fixture {
    tmp: tempfile::TempDir,
    mounted: Option<MountedVault>,
}

impl Fixture {
    fn new(create: impl FnOnce(&mut CreateOptions)) -> Fixture {
        need_fuse();
        let tmp = tempfile::tempdir().unwrap();
        std::fs::create_dir(tmp.path().join("mnt")).unwrap();
        let mut opts = CreateOptions {
            kdf: KdfParams::danger_insecure_fast(),
            parity: None,
            ..CreateOptions::default()
        };
        create(&mut opts);
        Vault::create(tmp.path().join("vault"), PASS, opts)
            .unwrap()
            .close()
            .unwrap();
        Fixture { tmp, mounted: None }
    }

    fn vault_dir(&self) -> PathBuf {
        self.tmp.path().join("vault")
    }

    fn mirror_dir(&self) -> PathBuf {
        self.tmp.path().join("mirror")
    }

    fn mnt(&self) -> PathBuf {
        self.tmp.path().join("mnt")
    }

    fn p(&self, name: &str) -> PathBuf {
        self.mnt().join(name)
    }

    fn open(&self, opts: OpenOptions) -> Vault {
        Vault::open(self.vault_dir(), PASS, opts).unwrap()
    }

    fn mount(&mut self, vault: Vault, opts: MountOptions) -> &MountedVault {
        assert!(self.mounted.is_none());
        self.mounted = Some(mount(vault, self.mnt(), opts).expect("mount"));
        self.mounted.as_ref().unwrap()
    }

    fn mounted(&self) -> &MountedVault {
        self.mounted.as_ref().unwrap()
    }

    fn unmount(&mut self) {
        self.mounted.take().unwrap().unmount().expect("unmount");
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        if let Some(m) = self.mounted.take() {
            let _ = m.unmount();
        }
        // Whatever is left (a panic inside unmount): detach it so the temporary
        // directory can go.
        let _ = Command::new("fusermount3")
            .arg("-uz")
            .arg(self.mnt())
            .stderr(std::process::Stdio::null())
            .status();
    }
}

/// Never commits by itself: only close, fsync and unmount do.
fn no_timer() -> MountOptions {
    MountOptions {
        commit_interval: Duration::from_secs(3600),
        ..MountOptions::default()
    }
}

fn errno(r: std::io::Result<impl Sized>) -> i32 {
    match r {
        Ok(_) => panic!("expected an error"),
        Err(e) => e.raw_os_error().expect("an OS error"),
    }
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
fn posix_semantics_through_std_fs() {
    let mut fx = Fixture::new(|_| {});
    let v = fx.open(OpenOptions::default());
    fx.mount(v, MountOptions::default());

    // Files: create, write, read back, append, truncate, overwrite in the middle.
    std::fs::write(fx.p("a.txt"), b"hello").unwrap();
    assert_eq!(std::fs::read(fx.p("a.txt")).unwrap(), b"hello");
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .open(fx.p("a.txt"))
        .unwrap();
    f.write_all(b" world").unwrap();
    drop(f);
    assert_eq!(std::fs::read(fx.p("a.txt")).unwrap(), b"hello world");
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(fx.p("a.txt"))
        .unwrap();
    f.write_all_at(b"J", 0).unwrap();
    f.set_len(5).unwrap();
    drop(f);
    assert_eq!(std::fs::read(fx.p("a.txt")).unwrap(), b"Jello");
    assert_eq!(std::fs::metadata(fx.p("a.txt")).unwrap().len(), 5);

    // A large file written at scattered offsets, checked against a model.
    let mut model = vec![0u8; 3 << 20];
    let mut f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(fx.p("big.bin"))
        .unwrap();
    f.set_len(model.len() as u64).unwrap();
    for (i, off) in [0usize, 4095, 4096, 1 << 20, (3 << 20) - 10, 777_777]
        .into_iter()
        .enumerate()
    {
        let len = (10 + i * 20_000).min(model.len() - off);
        let chunk = noise(i as u64, len);
        f.write_all_at(&chunk, off as u64).unwrap();
        model[off..off + len].copy_from_slice(&chunk);
    }
    f.seek(SeekFrom::Start(0)).unwrap();
    let mut back = Vec::new();
    f.read_to_end(&mut back).unwrap();
    assert!(back == model, "big.bin differs from its model");
    drop(f);

    // Directories and names.
    std::fs::create_dir(fx.p("d")).unwrap();
    assert_eq!(errno(std::fs::create_dir(fx.p("d"))), 17); // EEXIST
    std::fs::write(fx.p("d/x"), b"x").unwrap();
    assert_eq!(errno(std::fs::remove_dir(fx.p("d"))), 39); // ENOTEMPTY
    assert_eq!(errno(std::fs::read(fx.p("missing"))), 2); // ENOENT
    assert_eq!(errno(std::fs::read_dir(fx.p("a.txt"))), 20); // ENOTDIR
    assert_eq!(errno(std::fs::remove_file(fx.p("d"))), 21); // EISDIR
    let long = "n".repeat(256);
    assert_eq!(errno(std::fs::write(fx.p(&long), b"")), 36); // ENAMETOOLONG
                                                             // No hard links in the format.
    assert_eq!(errno(std::fs::hard_link(fx.p("a.txt"), fx.p("h"))), 1); // EPERM

    // Rename: into a directory, over an existing file (replaced atomically).
    std::fs::rename(fx.p("a.txt"), fx.p("d/a.txt")).unwrap();
    std::fs::write(fx.p("d/x"), b"old x").unwrap();
    std::fs::rename(fx.p("d/a.txt"), fx.p("d/x")).unwrap();
    assert_eq!(std::fs::read(fx.p("d/x")).unwrap(), b"Jello");
    assert_eq!(errno(std::fs::metadata(fx.p("d/a.txt"))), 2);

    // Symbolic links.
    std::os::unix::fs::symlink("d/x", fx.p("link")).unwrap();
    assert_eq!(
        std::fs::read_link(fx.p("link")).unwrap(),
        PathBuf::from("d/x")
    );
    assert_eq!(std::fs::read(fx.p("link")).unwrap(), b"Jello");
    assert!(std::fs::symlink_metadata(fx.p("link"))
        .unwrap()
        .file_type()
        .is_symlink());

    // Modes and times.
    std::fs::set_permissions(fx.p("d/x"), std::fs::Permissions::from_mode(0o600)).unwrap();
    assert_eq!(
        std::fs::metadata(fx.p("d/x")).unwrap().permissions().mode() & 0o7777,
        0o600
    );
    let t = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000_000);
    std::fs::File::options()
        .write(true)
        .open(fx.p("d/x"))
        .unwrap()
        .set_modified(t)
        .unwrap();
    assert_eq!(
        std::fs::metadata(fx.p("d/x")).unwrap().modified().unwrap(),
        t
    );

    // readdir: exactly these names, also while the directory is emptied.
    let mut names: Vec<String> = std::fs::read_dir(fx.mnt())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    assert_eq!(names, ["big.bin", "d", "link"]);
    for i in 0..300 {
        std::fs::write(fx.p(&format!("d/f{i:03}")), [i as u8]).unwrap();
    }
    let mut seen = 0;
    for e in std::fs::read_dir(fx.p("d")).unwrap() {
        std::fs::remove_file(e.unwrap().path()).unwrap();
        seen += 1;
    }
    assert_eq!(seen, 301);
    std::fs::remove_dir(fx.p("d")).unwrap();
    std::fs::remove_file(fx.p("link")).unwrap();

    // Everything above is in the vault after unmount.
    fx.unmount();
    let v = fx.open(OpenOptions::default());
    assert_eq!(v.read_file("/big.bin").unwrap(), model);
    assert!(v.resolve("/d").is_err());
    let m = v.list("/").unwrap();
    assert_eq!(m.len(), 1);
}

#[test]
fn closing_a_written_file_commits_one_version() {
    let mut fx = Fixture::new(|_| {});
    let v = fx.open(OpenOptions::default());
    fx.mount(v, no_timer());
    for i in 0..3 {
        std::fs::write(fx.p("notes.txt"), format!("draft {i}")).unwrap();
    }
    let vault = fx.mounted().vault().clone();
    let versions = vault.versions("/notes.txt").unwrap();
    assert_eq!(versions.len(), 3, "{versions:?}");
    assert_eq!(fx.mounted().metrics().commits_of("close"), 3);
    // Each version holds its draft.
    for (i, info) in versions.iter().enumerate() {
        let view = vault
            .at(portswitch_vault::VersionSpec::Version(info.version))
            .unwrap();
        assert_eq!(
            view.read_file("/notes.txt").unwrap(),
            format!("draft {i}").as_bytes()
        );
    }
    // A file only read does not commit.
    let head = vault.head().version;
    let _ = std::fs::read(fx.p("notes.txt")).unwrap();
    assert_eq!(vault.head().version, head);
}

#[test]
fn metadata_changes_are_committed_by_the_timer() {
    let mut fx = Fixture::new(|_| {});
    let v = fx.open(OpenOptions::default());
    fx.mount(
        v,
        MountOptions {
            commit_interval: Duration::from_millis(50),
            ..MountOptions::default()
        },
    );
    let vault = fx.mounted().vault().clone();
    let head = vault.head().version;
    std::fs::create_dir(fx.p("made")).unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while vault.head().version == head {
        assert!(std::time::Instant::now() < deadline, "no timer commit");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(fx.mounted().metrics().commits_of("timer") >= 1);
}

#[test]
fn fsync_commits_and_is_durable_before_close() {
    let mut fx = Fixture::new(|_| {});
    let v = fx.open(OpenOptions::default());
    fx.mount(v, no_timer());
    let vault = fx.mounted().vault().clone();
    let head = vault.head().version;
    let mut f = std::fs::File::create(fx.p("journal")).unwrap();
    f.write_all(b"entry 1\n").unwrap();
    f.sync_all().unwrap();
    assert!(vault.head().version > head);
    assert_eq!(fx.mounted().metrics().commits_of("fsync"), 1);
    // What fsync made durable is in the vault now, while the file is still open.
    let committed = vault.head().version;
    let view = vault
        .at(portswitch_vault::VersionSpec::Version(committed))
        .unwrap();
    assert_eq!(view.read_file("/journal").unwrap(), b"entry 1\n");
    f.write_all(b"entry 2\n").unwrap();
    f.sync_data().unwrap();
    assert_eq!(fx.mounted().metrics().commits_of("fsync"), 2);
    // fsync of a directory too.
    std::fs::File::open(fx.mnt()).unwrap().sync_all().unwrap();
    drop(f);
}

fn sqlite_rows(conn: &rusqlite::Connection) -> i64 {
    conn.query_row("SELECT count(*) FROM notes", [], |r| r.get(0))
        .unwrap()
}

#[test]
fn sqlite_database_on_the_mount() {
    let mut fx = Fixture::new(|_| {});
    let v = fx.open(OpenOptions::default());
    fx.mount(v, MountOptions::default());
    for (db, mode) in [("rollback.db", "DELETE"), ("wal.db", "WAL")] {
        let conn = rusqlite::Connection::open(fx.p(db)).unwrap();
        let got: String = conn
            .query_row(&format!("PRAGMA journal_mode={mode}"), [], |r| r.get(0))
            .unwrap();
        assert_eq!(got.to_uppercase(), mode);
        conn.execute_batch(
            "CREATE TABLE notes (id INTEGER PRIMARY KEY, who TEXT NOT NULL, body TEXT NOT NULL);
             CREATE INDEX notes_who ON notes(who);",
        )
        .unwrap();
        for batch in 0..20 {
            let tx = conn.unchecked_transaction().unwrap();
            {
                let mut ins = tx
                    .prepare("INSERT INTO notes (who, body) VALUES (?1, ?2)")
                    .unwrap();
                for i in 0..250 {
                    ins.execute(rusqlite::params![
                        format!("user{}", (batch * 250 + i) % 97),
                        format!("note {batch}/{i}: the quick brown fox jumps over the lazy dog")
                    ])
                    .unwrap();
                }
            }
            tx.commit().unwrap();
        }
        // A transaction rolled back leaves nothing.
        {
            let tx = conn.unchecked_transaction().unwrap();
            tx.execute("DELETE FROM notes", []).unwrap();
            tx.rollback().unwrap();
        }
        assert_eq!(sqlite_rows(&conn), 5000);
        let body: String = conn
            .query_row("SELECT body FROM notes WHERE id = 4321", [], |r| r.get(0))
            .unwrap();
        assert!(body.starts_with("note 17/70:"), "{body}");
        let ok: String = conn
            .query_row("PRAGMA integrity_check", [], |r| r.get(0))
            .unwrap();
        assert_eq!(ok, "ok");
    }
    // Remount: the databases are in the vault.
    fx.unmount();
    let v = fx.open(OpenOptions::default());
    fx.mount(v, MountOptions::default());
    for db in ["rollback.db", "wal.db"] {
        let conn = rusqlite::Connection::open(fx.p(db)).unwrap();
        assert_eq!(sqlite_rows(&conn), 5000, "{db}");
        let ok: String = conn
            .query_row("PRAGMA integrity_check", [], |r| r.get(0))
            .unwrap();
        assert_eq!(ok, "ok");
    }
}

/// Flips one byte in the middle of the `n`th block record of the vault's segments.
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
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(seg)
        .unwrap();
    let mut b = [0u8];
    file.read_exact_at(&mut b, at as u64).unwrap();
    file.write_all_at(&[b[0] ^ 0x40], at as u64).unwrap();
    file.sync_all().unwrap();
}

#[test]
fn a_damaged_block_reads_as_eio_never_wrong_bytes() {
    let mut fx = Fixture::new(|_| {});
    let data = noise(7, 64 << 10);
    let v = fx.open(OpenOptions::default());
    v.write_file("/data.bin", &data).unwrap();
    v.close().unwrap();
    damage_block(&fx.vault_dir(), 3);

    let v = fx.open(OpenOptions::default());
    fx.mount(v, MountOptions::default());
    // The block before the damage reads fine; the damaged one is EIO.
    let f = std::fs::File::open(fx.p("data.bin")).unwrap();
    let mut first = vec![0u8; 4096];
    f.read_exact_at(&mut first, 0).unwrap();
    assert_eq!(first, data[..4096]);
    let mut buf = vec![0u8; 4096];
    assert_eq!(errno(f.read_exact_at(&mut buf, 3 * 4096)), 5); // EIO
    assert_eq!(errno(std::fs::read(fx.p("data.bin"))), 5);
    assert!(fx.mounted().metrics().corrupt_reads.get() >= 1);
    drop(f);
}

#[test]
fn a_damaged_block_is_repaired_from_the_mirror() {
    let mut fx = Fixture::new(|_| {});
    let mirror = fx.mirror_dir();
    let with_mirror = || OpenOptions {
        mirror: Some(mirror.clone()),
        ..OpenOptions::default()
    };
    let data = noise(8, 64 << 10);
    let v = fx.open(with_mirror());
    v.write_file("/data.bin", &data).unwrap();
    v.close().unwrap();
    damage_block(&fx.vault_dir(), 5);

    let v = fx.open(with_mirror());
    let vault_metrics = v.metrics();
    fx.mount(v, MountOptions::default());
    assert!(std::fs::read(fx.p("data.bin")).unwrap() == data);
    assert!(vault_metrics.repairs_mirror.get() >= 1);
    fx.unmount();
    // Written back in place: the primary alone is whole again.
    let v = fx.open(OpenOptions::default());
    assert!(v.check(false).unwrap().is_clean());
    assert!(v.read_file("/data.bin").unwrap() == data);
}

#[test]
fn an_unlinked_open_file_lives_until_closed() {
    let mut fx = Fixture::new(|_| {});
    let v = fx.open(OpenOptions::default());
    fx.mount(v, MountOptions::default());
    let mut f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(fx.p("scratch"))
        .unwrap();
    f.write_all(b"still here").unwrap();
    std::fs::remove_file(fx.p("scratch")).unwrap();
    assert_eq!(errno(std::fs::metadata(fx.p("scratch"))), 2);
    // Neither the name nor the place it waits in shows.
    assert_eq!(std::fs::read_dir(fx.mnt()).unwrap().count(), 0);
    assert_eq!(
        errno(std::fs::metadata(fx.p(".portswitch-vault-unlinked"))),
        2
    );
    f.write_all(b", and more").unwrap();
    f.seek(SeekFrom::Start(0)).unwrap();
    let mut back = String::new();
    f.read_to_string(&mut back).unwrap();
    assert_eq!(back, "still here, and more");
    drop(f);
    fx.unmount();
    let v = fx.open(OpenOptions::default());
    assert!(v.list("/").unwrap().is_empty());
}

fn is_mounted(path: &Path) -> bool {
    let path = path.canonicalize().unwrap();
    std::fs::read_to_string("/proc/self/mounts")
        .unwrap()
        .lines()
        .any(|l| l.split(' ').nth(1) == path.to_str())
}

#[test]
fn unmount_while_busy_detaches_and_ends_at_the_last_close() {
    let mut fx = Fixture::new(|_| {});
    let v = fx.open(OpenOptions::default());
    fx.mount(v, MountOptions::default());
    let mut f = std::fs::File::create(fx.p("held")).unwrap();
    f.write_all(b"held open").unwrap();
    let m = fx.mounted.take().unwrap();
    let unmounting = std::thread::spawn(move || m.unmount());
    // Busy: retried, then detached from the tree; the open file is still served.
    let deadline = std::time::Instant::now()
        + portswitch_vault_fuse::limits::UNMOUNT_BUSY_RETRY
        + Duration::from_secs(5);
    while is_mounted(&fx.mnt()) {
        assert!(std::time::Instant::now() < deadline, "never detached");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(!unmounting.is_finished());
    f.write_all(b", still").unwrap();
    drop(f);
    unmounting.join().unwrap().expect("unmount");
    let v = fx.open(OpenOptions::default());
    assert_eq!(v.read_file("/held").unwrap(), b"held open, still");
}

/// A writer whose port was lost (its fence revoked, as `vault mount --switch` does the
/// moment the port switch session is lost): every change through the mount answers
/// EROFS at once, reads go on, and the unmount's final commit is refused with the typed
/// error. What was committed while the port was held stays, with its token.
#[test]
fn a_revoked_fence_makes_every_change_erofs_at_once() {
    let mut fx = Fixture::new(|_| {});
    let fence = portswitch_vault::Fence::new(42);
    let v = fx.open(OpenOptions {
        fence: Some(fence.clone()),
        ..OpenOptions::default()
    });
    fx.mount(v, no_timer());
    std::fs::write(fx.p("a.txt"), b"before").unwrap(); // closed: committed
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(fx.p("a.txt"))
        .unwrap();
    fence.revoke("the test took the port away");
    assert_eq!(errno(f.write_all_at(b"after", 0)), 30); // EROFS
    assert_eq!(errno(std::fs::write(fx.p("b.txt"), b"x")), 30);
    assert_eq!(errno(std::fs::create_dir(fx.p("d"))), 30);
    assert_eq!(errno(std::fs::remove_file(fx.p("a.txt"))), 30);
    assert_eq!(std::fs::read(fx.p("a.txt")).unwrap(), b"before");
    drop(f);
    match fx.mounted.take().unwrap().unmount() {
        Err(portswitch_vault_fuse::MountError::Vault(e)) if e.is_fenced() => {}
        other => panic!("expected a fencing error, got {other:?}"),
    }
    let v = fx.open(OpenOptions::default());
    assert_eq!(v.read_file("/a.txt").unwrap(), b"before");
    let versions = v.versions("/a.txt").unwrap();
    assert_eq!(versions.last().unwrap().writer_token, 42, "{versions:?}");
}
