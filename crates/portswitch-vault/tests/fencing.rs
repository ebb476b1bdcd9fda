//! Fencing with the port switch's tokens: a writer with a lower token than one the log
//! recorded is refused, a revoked fence stops every change at once, and a backup
//! target refuses a stale writer's vault.

mod common;

use std::path::Path;

use common::*;
use portswitch_vault::{Fence, OpenOptions, Retention, Vault, VaultError};

fn open_fenced(dir: &Path, token: u64) -> Result<Vault, VaultError> {
    Vault::open(
        dir,
        PASS,
        OpenOptions {
            fence: Some(Fence::new(token)),
            ..OpenOptions::default()
        },
    )
}

fn fenced<T: std::fmt::Debug>(r: Result<T, VaultError>, ours: u64, theirs: u64) {
    match r {
        Err(VaultError::Fenced { ours: o, theirs: t }) if (o, t) == (ours, theirs) => {}
        other => panic!("expected Fenced {{ {ours}, {theirs} }}, got {other:?}"),
    }
}

/// Copies a vault directory (header and segments), as a stale copy would be.
fn copy_vault(from: &Path, to: &Path) {
    std::fs::create_dir_all(to.join("seg")).unwrap();
    std::fs::copy(from.join("VAULT"), to.join("VAULT")).unwrap();
    for seg in std::fs::read_dir(from.join("seg")).unwrap() {
        let p = seg.unwrap().path();
        std::fs::copy(&p, to.join("seg").join(p.file_name().unwrap())).unwrap();
    }
}

#[test]
fn a_writer_with_a_lower_token_than_the_log_recorded_is_refused() {
    let t = TempDir::new("fence-open");
    let dir = t.join("v");
    drop(create(&dir));
    let v = open_fenced(&dir, 5).unwrap();
    v.write_file("/a", b"by 5").unwrap();
    v.close().unwrap();
    assert_eq!(
        open(&dir).history().unwrap().last().unwrap().writer_token,
        5
    );

    fenced(open_fenced(&dir, 3), 3, 5);
    // Equal or higher is admitted; a higher one that commits raises the bar.
    drop(open_fenced(&dir, 5).unwrap());
    let v = open_fenced(&dir, 7).unwrap();
    v.write_file("/a", b"by 7").unwrap();
    v.close().unwrap();
    fenced(open_fenced(&dir, 5), 5, 7);
    // Read-only opens and unfenced writers (token 0, the LOCK file alone) are not
    // refused; an unfenced commit records 0 and lowers nothing.
    let ro = Vault::open(
        &dir,
        PASS,
        OpenOptions {
            read_only: true,
            ..OpenOptions::default()
        },
    )
    .unwrap();
    assert_eq!(ro.read_file("/a").unwrap(), b"by 7");
    drop(ro);
    let v = open(&dir);
    v.write_file("/a", b"unfenced").unwrap();
    // gc drops the commits made with 7: the checkpoint keeps the highest token.
    v.gc(Retention {
        keep_last: Some(1),
        keep_within: None,
    })
    .unwrap();
    v.close().unwrap();
    fenced(open_fenced(&dir, 5), 5, 7);
    // A token mismatch between the fence and writer_token is a caller's mistake.
    let r = Vault::open(
        &dir,
        PASS,
        OpenOptions {
            fence: Some(Fence::new(9)),
            writer_token: 8,
            ..OpenOptions::default()
        },
    );
    assert!(matches!(r, Err(VaultError::Invalid(_))), "{r:?}");
}

#[test]
fn a_revoked_fence_stops_every_change_at_once() {
    let t = TempDir::new("fence-lost");
    let dir = t.join("v");
    drop(create(&dir));
    let fence = Fence::new(11);
    let v = Vault::open(
        &dir,
        PASS,
        OpenOptions {
            fence: Some(fence.clone()),
            ..OpenOptions::default()
        },
    )
    .unwrap();
    v.write_file("/kept", b"committed while owning the port")
        .unwrap();
    v.sync().unwrap();
    let ino = v.resolve("/kept").unwrap().ino;
    v.write(ino, 0, b"COMMITTED").unwrap(); // dirty, not committed
    fence.revoke("session expired");
    let lost = |r: Result<_, VaultError>| match r {
        Err(e @ VaultError::FenceLost { token: 11, .. }) => {
            assert_eq!(e.errno(), rustix_erofs());
        }
        other => panic!("expected FenceLost, got {other:?}"),
    };
    lost(v.write(ino, 0, b"x").map(|_| ()));
    lost(v.commit().map(|_| ()));
    lost(v.sync().map(|_| ()));
    lost(v.write_file("/new", b"x"));
    lost(v.mkdir_all("/d").map(|_| ()));
    lost(v.snapshot("s").map(|_| ()));
    // Reads go on.
    assert_eq!(
        v.read_file("/kept").unwrap(),
        b"COMMITTED while owning the port"
    );
    lost(v.close());
    // Nothing after the revocation reached the log (the drop made no final commit).
    let v = open(&dir);
    assert_eq!(
        v.read_file("/kept").unwrap(),
        b"committed while owning the port"
    );
    assert!(v.check(false).unwrap().is_clean());
}

fn rustix_erofs() -> i32 {
    30 // EROFS on Linux
}

#[test]
fn a_backup_target_refuses_a_stale_writer() {
    let t = TempDir::new("fence-backup");
    let dir = t.join("v");
    let target = t.join("backup");
    drop(create(&dir));
    // Writer A (token 3) ships to the target.
    let a = open_fenced(&dir, 3).unwrap();
    a.write_file("/f", b"by A").unwrap();
    a.backup_to(&target).unwrap();
    a.close().unwrap();
    // A's state as a stale copy would hold it (A partitioned away, still running).
    let stale = t.join("stale");
    copy_vault(&dir, &stale);
    // Writer B (token 5) takes over and ships.
    let b = open_fenced(&dir, 5).unwrap();
    b.write_file("/f", b"by B").unwrap();
    b.backup_to(&target).unwrap();
    b.close().unwrap();
    // A's vault (highest token 3) may not ship over B's, fenced or not.
    let a = open_fenced(&stale, 3).unwrap();
    a.write_file("/f", b"A again").unwrap();
    fenced(a.backup_to(&target), 3, 5);
    drop(a);
    fenced(open(&stale).backup_to(&target), 3, 5);
    // The target still holds B's state, whole.
    let r = open(&target);
    assert_eq!(r.read_file("/f").unwrap(), b"by B");
    assert!(r.check(false).unwrap().is_clean());
    drop(r);
    // B ships again (incremental) without trouble.
    let b = open_fenced(&dir, 5).unwrap();
    b.write_file("/g", b"more").unwrap();
    assert!(b.backup_to(&target).unwrap().bytes_shipped > 0);
}
