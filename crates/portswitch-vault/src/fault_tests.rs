//! Tests that need to inject faults inside the crate: primary read errors (EIO from a
//! bad sector) and a gc landing between planning a read and reading.

use std::path::{Path, PathBuf};

use crate::error::VaultError;
use crate::store::faults;
use crate::types::{CreateOptions, KdfParams, OpenOptions, Retention};
use crate::vault::{Vault, AFTER_PLAN, TEST_DIR_ENTRIES_MAX};

const PASS: &[u8] = b"fault tests";

struct Dir(PathBuf);

impl Dir {
    fn new(tag: &str) -> Dir {
        let p = std::env::temp_dir().join(format!(
            "psvault-unit-{tag}-{}-{}",
            std::process::id(),
            fastrand::u64(..)
        ));
        std::fs::create_dir_all(&p).unwrap();
        Dir(p)
    }
}

impl Drop for Dir {
    fn drop(&mut self) {
        faults::heal(&self.0.join("v"));
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn noise(seed: u64, len: usize) -> Vec<u8> {
    let mut rng = fastrand::Rng::with_seed(seed);
    (0..len).map(|_| rng.u8(..)).collect()
}

fn opts(mirror: Option<&Path>, parity: bool) -> CreateOptions {
    let mut o = CreateOptions {
        kdf: KdfParams::danger_insecure_fast(),
        segment_bytes: 4 << 20,
        ..CreateOptions::default()
    };
    if !parity {
        o.parity = None;
    }
    o.open.mirror = mirror.map(Path::to_path_buf);
    o
}

fn reopen(dir: &Path, mirror: Option<&Path>) -> Vault {
    Vault::open(
        dir,
        PASS,
        OpenOptions {
            mirror: mirror.map(Path::to_path_buf),
            ..OpenOptions::default()
        },
    )
    .unwrap()
}

/// Finding 1: an EIO reading the primary (not only a short read) must go through
/// repair, for single-block reads, multi-record (run) reads and open's frame scan.
/// Without the fix, each read below fails with `Io` although the mirror is good. The
/// write-back of the good copy fails too (the bad sector): the read still succeeds.
#[test]
fn eio_on_the_primary_is_repaired_from_the_mirror() {
    let d = Dir::new("eio-mirror");
    let (v_dir, m_dir) = (d.0.join("v"), d.0.join("m"));
    let data = noise(1, 3 << 20);
    {
        let v = Vault::create(&v_dir, PASS, opts(Some(&m_dir), false)).unwrap();
        v.write_file("/f", &data).unwrap();
        v.write_file("/later", &noise(2, 6 << 20)).unwrap();
        v.sync().unwrap();
    }
    // Every primary read of the first segment fails, from the open on.
    faults::fail_reads(&v_dir, 1);
    let v = reopen(&v_dir, Some(&m_dir));
    // A multi-record (run) read of the whole file.
    assert_eq!(v.read_file("/f").unwrap(), data);
    // Single-block reads (cache is cold for these after a reopen).
    drop(v);
    let v = reopen(&v_dir, Some(&m_dir));
    let ino = v.resolve("/f").unwrap().ino;
    let mut buf = vec![0u8; 100];
    assert_eq!(v.read(ino, 70_000, &mut buf).unwrap(), 100);
    assert_eq!(buf, data[70_000..70_100]);
    assert!(v.metrics().repairs_mirror.get() > 0);
    assert_eq!(v.metrics().unrepaired.get(), 0);
}

/// Finding 1, without a mirror: parity rebuilds what the primary read cannot return.
#[test]
fn eio_on_the_primary_is_rebuilt_from_parity() {
    let d = Dir::new("eio-parity");
    let v_dir = d.0.join("v");
    let data = noise(3, 2 << 20);
    {
        let v = Vault::create(&v_dir, PASS, opts(None, true)).unwrap();
        v.write_file("/f", &data).unwrap();
        v.write_file("/later", &noise(4, 6 << 20)).unwrap();
        v.sync().unwrap();
    }
    let v = reopen(&v_dir, None);
    faults::fail_reads(&v_dir, 1);
    let ino = v.resolve("/f").unwrap().ino;
    let mut buf = vec![0u8; 10];
    assert_eq!(v.read(ino, 5, &mut buf).unwrap(), 10);
    assert_eq!(buf, data[5..15]);
    assert_eq!(v.read_file("/f").unwrap(), data);
    assert!(v.metrics().repairs_parity.get() > 0);
}

/// Finding 2: a single-block read planned before a gc that deletes the block's segment
/// must plan again and return the right bytes, not `Corrupt` (and must not count or
/// log a damaged record). Without the fix the read fails with `Corrupt { "block" }`.
#[test]
fn read_racing_gc_replans() {
    let d = Dir::new("gc-race");
    let v_dir = d.0.join("v");
    let small = noise(5, 1000);
    {
        let v = Vault::create(&v_dir, PASS, opts(None, true)).unwrap();
        v.write_file("/small", &small).unwrap();
        v.commit().unwrap();
        for i in 0..6 {
            v.write_file("/churn", &noise(10 + i, 2 << 20)).unwrap();
            v.commit().unwrap();
        }
        v.sync().unwrap();
    }
    let v = reopen(&v_dir, None);
    let ino = v.resolve("/small").unwrap().ino;
    let deleted = std::rc::Rc::new(std::cell::Cell::new(0));
    let seen = deleted.clone();
    AFTER_PLAN.with(|h| {
        *h.borrow_mut() = Some(Box::new(move |v: &Vault| {
            let r = v
                .gc(Retention {
                    keep_last: Some(1),
                    keep_within: None,
                })
                .unwrap();
            seen.set(r.segments_deleted);
        }))
    });
    let mut buf = vec![0u8; 1000];
    assert_eq!(v.read(ino, 0, &mut buf).unwrap(), 1000);
    assert_eq!(buf, small);
    assert!(deleted.get() >= 1, "the gc must delete the planned segment");
    assert_eq!(v.metrics().unrepaired.get(), 0);
    assert_eq!(v.metrics().auth_failures.get(), 0);
}

/// Finding 13: rename into a full directory is refused like a create there (the limit
/// is lowered for the test). Without the fix the rename succeeds past the limit.
#[test]
fn rename_respects_the_directory_entry_limit() {
    let d = Dir::new("dir-limit");
    let v = Vault::create(d.0.join("v"), PASS, opts(None, false)).unwrap();
    TEST_DIR_ENTRIES_MAX.with(|c| c.set(Some(3)));
    let root = v.resolve("/").unwrap().ino;
    let full = v.mkdir(root, b"full", 0o755).unwrap().ino;
    for n in [b"a", b"b", b"c"] {
        v.create_file(full, n, 0o644).unwrap();
    }
    assert!(matches!(
        v.create_file(full, b"d", 0o644),
        Err(VaultError::TooLarge { .. })
    ));
    v.create_file(root, b"x", 0o644).unwrap();
    assert!(matches!(
        v.rename(root, b"x", full, b"x"),
        Err(VaultError::TooLarge { .. })
    ));
    // Nothing moved; replacing an existing entry and renaming in place still work.
    assert!(v.resolve("/x").is_ok());
    v.rename(root, b"x", full, b"a").unwrap();
    v.rename(full, b"a", full, b"z").unwrap();
    assert!(v.resolve("/full/z").is_ok());
    TEST_DIR_ENTRIES_MAX.with(|c| c.set(None));
}

/// Finding 6: a commit over the entry limit (lowered for the test) is refused with
/// `TooLarge` before any block is appended, without poisoning the vault: the pending
/// changes stay pending, and once they fit again (here: the limit is restored) they
/// commit. Without the fix the blocks are appended first and the vault is poisoned
/// (every later commit fails until reopened).
#[test]
fn too_large_commit_is_refused_without_poisoning() {
    use crate::engine::TEST_COMMIT_BYTES_MAX;
    let d = Dir::new("too-large");
    let v_dir = d.0.join("v");
    let v = Vault::create(&v_dir, PASS, opts(None, false)).unwrap();
    v.write_file("/small", b"kept").unwrap();
    v.commit().unwrap();
    let head = v.head();
    let disk = v.stats().disk_bytes;
    let big = noise(6, 1 << 20);
    v.write_file("/big", &big).unwrap();
    TEST_COMMIT_BYTES_MAX.with(|c| c.set(Some(2000)));
    match v.commit() {
        Err(VaultError::TooLarge { what: "commit", .. }) => {}
        other => panic!("expected TooLarge, got {other:?}"),
    }
    assert_eq!(v.head(), head);
    assert_eq!(v.stats().disk_bytes, disk, "nothing appended");
    // Still usable: the data is pending and readable, and commits once it fits.
    assert_eq!(v.read_file("/big").unwrap(), big);
    TEST_COMMIT_BYTES_MAX.with(|c| c.set(None));
    v.commit().unwrap();
    v.sync().unwrap();
    drop(v);
    let v = reopen(&v_dir, None);
    assert_eq!(v.read_file("/big").unwrap(), big);
    assert_eq!(v.read_file("/small").unwrap(), b"kept");
}

/// Finding 9: a backup target whose bytes just before its end differ from the source
/// (the source cut a tail and wrote other records at the same offsets) gets the segment
/// shipped again instead of a tail appended to foreign bytes; and a poisoned vault is
/// not backed up. Without the fix the second backup "verifies" only the new tail and
/// the backup then fails to read `/a`.
#[test]
fn backup_reships_a_segment_that_is_not_a_prefix() {
    use std::os::unix::fs::FileExt;
    let d = Dir::new("backup-prefix");
    let (v_dir, b_dir) = (d.0.join("v"), d.0.join("b"));
    let v = Vault::create(&v_dir, PASS, opts(None, false)).unwrap();
    let a = noise(7, 200_000);
    v.write_file("/a", &a).unwrap();
    v.backup_to(&b_dir).unwrap();
    // The target's last bytes diverge from the source's (as after a cut and rewrite).
    let seg = crate::store::seg_path(&b_dir, 1);
    let f = std::fs::OpenOptions::new().write(true).open(&seg).unwrap();
    let len = f.metadata().unwrap().len();
    f.write_all_at(&[0x5a; 300], len - 300).unwrap();
    drop(f);
    let b = noise(8, 50_000);
    v.write_file("/b", &b).unwrap();
    v.backup_to(&b_dir).unwrap();
    {
        let bv = Vault::open(
            &b_dir,
            PASS,
            OpenOptions {
                read_only: true,
                ..OpenOptions::default()
            },
        )
        .unwrap();
        assert_eq!(bv.read_file("/a").unwrap(), a);
        assert_eq!(bv.read_file("/b").unwrap(), b);
        assert!(bv.check(false).unwrap().is_clean());
    }
    // A poisoned vault refuses to back up.
    v.inner.lock_log().poisoned = Some("test".into());
    assert!(v.backup_to(&b_dir).is_err());
}
