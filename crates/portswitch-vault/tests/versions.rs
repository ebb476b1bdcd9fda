//! Versions, snapshots, `at`, restore, retention and gc, backups, keys.

mod common;

use std::time::{Duration, SystemTime};

use common::*;
use portswitch_vault::{OpenOptions, Retention, Vault, VaultError, VersionSpec};

#[test]
fn every_commit_is_a_version_and_at_reads_it() {
    let d = TempDir::new("versions");
    let v = create(d.path());
    let v1 = v.head().version;
    v.write_file("/f", b"one").unwrap();
    let v2 = v.commit().unwrap();
    v.write_file("/f", b"two!").unwrap();
    v.write_file("/g", b"gee").unwrap();
    let v3 = v.commit().unwrap();
    let t3 = SystemTime::now();
    std::thread::sleep(Duration::from_millis(5));
    v.remove("/f").unwrap();
    let v4 = v.sync().unwrap();
    assert_eq!((v2, v3, v4), (v1 + 1, v1 + 2, v1 + 3));
    // Nothing pending: no new version.
    assert_eq!(v.commit().unwrap(), v4);
    assert_eq!(
        v.at(VersionSpec::Version(v2))
            .unwrap()
            .read_file("/f")
            .unwrap(),
        b"one"
    );
    assert_eq!(
        v.at(VersionSpec::Version(v3))
            .unwrap()
            .read_file("/f")
            .unwrap(),
        b"two!"
    );
    assert!(matches!(
        v.at(VersionSpec::Version(v4)).unwrap().read_file("/f"),
        Err(VaultError::NotFound)
    ));
    assert_eq!(v.at(VersionSpec::Time(t3)).unwrap().version(), v3);
    assert!(matches!(
        v.at(VersionSpec::Version(v4 + 1)),
        Err(VaultError::NoVersion(_))
    ));
    let vs = v.versions("/f").unwrap();
    let got: Vec<_> = vs.iter().map(|i| (i.version, i.size)).collect();
    assert_eq!(got, vec![(v2, Some(3)), (v3, Some(4)), (v4, None)]);
    // The same after reopening (history comes from the log).
    drop(v);
    let v = open(d.path());
    assert_eq!(
        v.at(VersionSpec::Version(v2))
            .unwrap()
            .read_file("/f")
            .unwrap(),
        b"one"
    );
    assert_eq!(v.versions("/f").unwrap().len(), 3);
    assert_eq!(v.history().unwrap().len(), 4);
}

#[test]
fn snapshots_restore_and_restore_all() {
    let d = TempDir::new("snap");
    let v = create(d.path());
    v.mkdir_all("/docs/deep").unwrap();
    v.write_file("/docs/a", &text(1, 30_000)).unwrap();
    v.write_file("/docs/deep/b", &noise(2, 10_000)).unwrap();
    let s = v.snapshot("before").unwrap();
    assert!(matches!(v.snapshot("before"), Err(VaultError::Exists)));
    v.write_file("/docs/a", b"changed").unwrap();
    v.remove("/docs/deep/b").unwrap();
    v.write_file("/docs/new", b"new").unwrap();
    v.commit().unwrap();
    let view = v.at(VersionSpec::Snapshot("before".into())).unwrap();
    assert_eq!(view.version(), s);
    assert_eq!(view.read_file("/docs/a").unwrap(), text(1, 30_000));
    // A view keeps the vault open (and locked) until it is dropped.
    drop(view);
    // Restore one file: a new version, history intact.
    let r = v
        .restore("/docs/a", VersionSpec::Snapshot("before".into()))
        .unwrap();
    assert!(r > s);
    assert_eq!(v.read_file("/docs/a").unwrap(), text(1, 30_000));
    assert!(matches!(
        v.read_file("/docs/deep/b"),
        Err(VaultError::NotFound)
    ));
    assert_eq!(
        v.at(VersionSpec::Version(r - 1))
            .unwrap()
            .read_file("/docs/a")
            .unwrap(),
        b"changed"
    );
    // Restore a directory: its subtree as it was (the deleted file back, the new one gone).
    v.write_file("/docs/a", b"again").unwrap();
    v.restore("/docs", VersionSpec::Snapshot("before".into()))
        .unwrap();
    assert_eq!(v.read_file("/docs/deep/b").unwrap(), noise(2, 10_000));
    assert!(matches!(
        v.read_file("/docs/new"),
        Err(VaultError::NotFound)
    ));
    assert_eq!(v.read_file("/docs/a").unwrap(), text(1, 30_000));
    // Restore everything to before the snapshot's changes were undone: the latest
    // version with "/docs/new".
    let with_new = v
        .versions("/docs/new")
        .unwrap()
        .into_iter()
        .find(|i| i.size.is_some())
        .unwrap()
        .version;
    v.write_file("/other", b"x").unwrap();
    v.restore_all(VersionSpec::Version(with_new)).unwrap();
    assert_eq!(v.read_file("/docs/new").unwrap(), b"new");
    assert_eq!(v.read_file("/docs/a").unwrap(), b"changed");
    assert!(matches!(v.read_file("/other"), Err(VaultError::NotFound)));
    v.sync().unwrap();
    drop(v);
    let v = open(d.path());
    assert_eq!(v.read_file("/docs/new").unwrap(), b"new");
    assert_eq!(v.snapshots().unwrap().len(), 1);
    assert!(v.check(false).unwrap().is_clean());
    v.delete_snapshot("before").unwrap();
    assert!(v.snapshots().unwrap().is_empty());
}

#[test]
fn gc_drops_old_versions_keeps_snapshots_and_frees_space() {
    let d = TempDir::new("gc");
    let v = create(d.path()); // 4 MiB segments
    v.write_file("/keep", &noise(1, 100_000)).unwrap();
    let snap = v.snapshot("s").unwrap();
    let mut last = Vec::new();
    for i in 0..12 {
        last = noise(100 + i, 1 << 20);
        v.write_file("/churn", &last).unwrap();
        v.commit().unwrap();
    }
    v.remove("/keep").unwrap();
    v.sync().unwrap();
    let before = v.stats();
    let head = v.head().version;
    let r = v
        .gc(Retention {
            keep_last: Some(2),
            keep_within: None,
        })
        .unwrap();
    assert_eq!(r.horizon, head - 1);
    assert!(r.segments_deleted >= 1, "{r:?}");
    let after = v.stats();
    assert!(
        after.disk_bytes < before.disk_bytes / 2,
        "{before:?} -> {after:?}"
    );
    // Pruned versions are gone, the snapshot and the retained ones stay.
    assert!(matches!(
        v.at(VersionSpec::Version(head - 3)),
        Err(VaultError::NoVersion(_))
    ));
    assert_eq!(
        v.at(VersionSpec::Snapshot("s".into()))
            .unwrap()
            .read_file("/keep")
            .unwrap(),
        noise(1, 100_000)
    );
    assert_eq!(v.at(VersionSpec::Version(snap)).unwrap().version(), snap);
    assert!(v.at(VersionSpec::Version(head - 1)).is_ok());
    assert_eq!(v.read_file("/churn").unwrap(), last);
    assert!(v.check(false).unwrap().is_clean());
    // New writes after gc, then reopen: the checkpoint carries everything.
    v.write_file("/after", b"gc").unwrap();
    v.sync().unwrap();
    drop(v);
    let v = open(d.path());
    assert_eq!(v.read_file("/churn").unwrap(), last);
    assert_eq!(v.read_file("/after").unwrap(), b"gc");
    assert_eq!(
        v.at(VersionSpec::Snapshot("s".into()))
            .unwrap()
            .read_file("/keep")
            .unwrap(),
        noise(1, 100_000)
    );
    assert!(v.check(false).unwrap().is_clean());
    // gc again with everything kept for an hour: nothing dropped, still consistent.
    let r = v
        .gc(Retention {
            keep_last: None,
            keep_within: Some(Duration::from_secs(3600)),
        })
        .unwrap();
    assert_eq!(r.versions_dropped, 0);
    drop(v);
    let v = open(d.path());
    assert_eq!(v.read_file("/churn").unwrap(), last);
    assert!(v.check(false).unwrap().is_clean());
}

#[test]
fn backup_is_incremental_verified_and_opens() {
    let d = TempDir::new("backup");
    let b = d.join("backup");
    let v = Vault::create(d.join("v"), PASS, opts()).unwrap();
    v.write_file("/a", &noise(1, 5 << 20)).unwrap();
    let r1 = v.backup_to(&b).unwrap();
    assert!(r1.bytes_shipped >= 5 << 20, "{r1:?}");
    assert_eq!(r1.bytes_verified, r1.bytes_shipped);
    assert!(r1.header_shipped);
    let r2 = v.backup_to(&b).unwrap();
    assert_eq!(r2.bytes_shipped, 0, "nothing new: {r2:?}");
    v.write_file("/b", &noise(2, 100_000)).unwrap();
    let r3 = v.backup_to(&b).unwrap();
    assert!(
        r3.bytes_shipped > 100_000 && r3.bytes_shipped < 200_000,
        "{r3:?}"
    );
    assert!(!r3.header_shipped);
    let head = v.head();
    drop(v);
    let bv = Vault::open(
        &b,
        PASS,
        OpenOptions {
            read_only: true,
            expect_head: Some(head),
            ..OpenOptions::default()
        },
    )
    .unwrap();
    assert_eq!(bv.read_file("/a").unwrap(), noise(1, 5 << 20));
    assert_eq!(bv.read_file("/b").unwrap(), noise(2, 100_000));
    assert!(bv.check(false).unwrap().is_clean());
}

#[test]
fn continuous_backup_follows_commits() {
    let d = TempDir::new("cbackup");
    let b = d.join("backup");
    let v = Vault::create(d.join("v"), PASS, opts()).unwrap();
    v.continuous_backup(&b).unwrap();
    v.write_file("/x", b"shipped").unwrap();
    v.sync().unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let ok = Vault::open(
            &b,
            PASS,
            OpenOptions {
                read_only: true,
                ..Default::default()
            },
        )
        .ok()
        .and_then(|bv| bv.read_file("/x").ok());
        if ok.as_deref() == Some(b"shipped") {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "backup never caught up"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn whole_vault_rollback_is_detected_against_a_kept_head() {
    let d = TempDir::new("head");
    let old = d.join("old");
    let v = Vault::create(d.join("v"), PASS, opts()).unwrap();
    v.write_file("/f", b"1").unwrap();
    v.backup_to(&old).unwrap();
    v.write_file("/f", b"2").unwrap();
    v.sync().unwrap();
    let head = v.head();
    drop(v);
    // Replace the vault with the older copy.
    std::fs::remove_dir_all(d.join("v")).unwrap();
    std::fs::rename(&old, d.join("v")).unwrap();
    let got = Vault::open(
        d.join("v"),
        PASS,
        OpenOptions {
            expect_head: Some(head),
            ..OpenOptions::default()
        },
    );
    assert!(matches!(got, Err(VaultError::RolledBack { .. })), "{got:?}");
}

#[test]
fn mirror_holding_more_commits_heals_a_cut_primary() {
    let d = TempDir::new("ahead");
    let m = d.join("m");
    let mo = OpenOptions {
        mirror: Some(m.clone()),
        ..OpenOptions::default()
    };
    let v = Vault::create(
        d.join("v"),
        PASS,
        portswitch_vault::CreateOptions {
            open: mo.clone(),
            ..opts()
        },
    )
    .unwrap();
    v.write_file("/f", b"first").unwrap();
    v.sync().unwrap();
    let cut = std::fs::metadata(&segments(&d.join("v"))[0]).unwrap().len();
    v.write_file("/f", b"second").unwrap();
    v.sync().unwrap();
    drop(v);
    // An attacker (or a lost write) cuts the primary back to the first commit.
    let seg = segments(&d.join("v"))[0].clone();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&seg)
        .unwrap()
        .set_len(cut)
        .unwrap();
    let v = Vault::open(d.join("v"), PASS, mo.clone()).unwrap();
    assert_eq!(v.read_file("/f").unwrap(), b"second");
    drop(v);
    // Same length, but the last commit's bytes are gone (zeroed) on the primary only.
    let len = std::fs::metadata(&seg).unwrap().len();
    write_at(&seg, cut, &vec![0u8; (len - cut) as usize]);
    let v = Vault::open(d.join("v"), PASS, mo).unwrap();
    assert_eq!(v.read_file("/f").unwrap(), b"second");
    drop(v);
    assert_eq!(
        std::fs::read(&seg).unwrap(),
        std::fs::read(&segments(&m)[0]).unwrap()
    );
}

#[test]
fn passphrase_change_and_key_rotation() {
    let d = TempDir::new("keys");
    let v = create(d.path());
    let data = noise(1, 300_000);
    v.write_file("/a", &data).unwrap();
    v.snapshot("s").unwrap();
    v.write_file("/b", &text(2, 100_000)).unwrap();
    v.sync().unwrap();
    assert!(matches!(
        v.change_passphrase(b"nope", b"new"),
        Err(VaultError::WrongPassphrase)
    ));
    v.change_passphrase(PASS, b"new pass").unwrap();
    drop(v);
    assert!(matches!(
        Vault::open(d.path(), PASS, OpenOptions::default()),
        Err(VaultError::WrongPassphrase)
    ));
    let v = Vault::open(d.path(), b"new pass", OpenOptions::default()).unwrap();
    assert_eq!(v.read_file("/a").unwrap(), data);
    let old_key = v.stats().active_key;
    let new_key = v.rotate_key().unwrap();
    assert_ne!(old_key, new_key);
    v.write_file("/c", b"under the new key").unwrap();
    v.sync().unwrap();
    assert_eq!(v.stats().keys, 2);
    let r = v.reseal().unwrap();
    assert_eq!(r.keys_dropped, 1);
    assert!(r.records_resealed > 0);
    assert_eq!(v.stats().keys, 1);
    // No record on disk is under the old key any more.
    for (_, _, f) in records(d.path()) {
        assert_eq!(f.key_id, new_key);
    }
    assert_eq!(v.read_file("/a").unwrap(), data);
    assert_eq!(
        v.at(VersionSpec::Snapshot("s".into()))
            .unwrap()
            .read_file("/a")
            .unwrap(),
        data
    );
    drop(v);
    let v = Vault::open(d.path(), b"new pass", OpenOptions::default()).unwrap();
    assert_eq!(v.read_file("/a").unwrap(), data);
    assert_eq!(v.read_file("/b").unwrap(), text(2, 100_000));
    assert_eq!(v.read_file("/c").unwrap(), b"under the new key");
    assert_eq!(v.history().unwrap().len() as u64, v.head().version);
    assert!(v.check(false).unwrap().is_clean());
}

/// gc compacts the open segment too: old versions of a file rewritten in place (a
/// database's pages) all sit in the segment being written.
#[test]
fn gc_compacts_the_open_segment() {
    let d = TempDir::new("gc-open");
    let v = create(d.path()); // 4 MiB segments
    let last = noise(9, 1 << 20);
    for i in 0..2 {
        v.write_file("/db", &noise(i, 1 << 20)).unwrap();
        v.sync().unwrap();
    }
    v.write_file("/db", &last).unwrap();
    v.sync().unwrap();
    let before = v.stats();
    assert_eq!(before.segments, 1, "everything in the open segment");
    let r = v
        .gc(Retention {
            keep_last: Some(1),
            ..Default::default()
        })
        .unwrap();
    let after = v.stats();
    assert!(r.segments_deleted >= 1, "{r:?}");
    assert!(
        after.disk_bytes * 2 < before.disk_bytes,
        "{} -> {} bytes",
        before.disk_bytes,
        after.disk_bytes
    );
    assert_eq!(v.read_file("/db").unwrap(), last);
    v.write_file("/more", b"after gc").unwrap();
    v.sync().unwrap();
    drop(v);
    let v = open(d.path());
    assert!(v.check(false).unwrap().is_clean());
    assert_eq!(v.read_file("/db").unwrap(), last);
    assert_eq!(v.read_file("/more").unwrap(), b"after gc");
}

/// Review finding: a backup whose target's tail differs from the vault's because the
/// *vault's* copy is damaged must not ship the damage over the good copy. It fails
/// with `Corrupt` and leaves the target alone; with the backup named as the copy to
/// repair from, the vault heals itself from it and the next backup goes through.
#[test]
fn a_backup_never_ships_local_damage_over_the_good_copy() {
    let (d, b) = (TempDir::new("bk-damage"), TempDir::new("bk-damage-target"));
    let o = portswitch_vault::CreateOptions {
        parity: None,
        segment_bytes: 64 << 20,
        ..opts()
    };
    let v = Vault::create(d.path(), PASS, o).unwrap();
    let data = noise(11, 1 << 20);
    v.write_file("/f", &data).unwrap();
    v.sync().unwrap();
    v.backup_to(b.path()).unwrap();
    drop(v);
    // Bit rot in a block just before the backup's end (within its overlap check).
    let seg = d.join("seg/00000001.seg");
    let held = std::fs::metadata(b.join("seg/00000001.seg")).unwrap().len();
    flip(&seg, held - (40 << 10));
    let v = open(d.path());
    v.write_file("/g", b"later").unwrap();
    v.sync().unwrap();
    match v.backup_to(b.path()) {
        Err(VaultError::Corrupt { segment: 1, .. }) => {}
        other => panic!("expected Corrupt, got {other:?}"),
    }
    // The target still holds the good copy.
    let t = open(b.path());
    assert!(t.check(false).unwrap().is_clean());
    assert_eq!(t.read_file("/f").unwrap(), data);
    drop(t);
    // Named as the copy to repair from, the backup heals the vault.
    v.set_remote_copy(Some(Box::new(portswitch_vault::target::DirTarget::new(
        b.path(),
    ))));
    v.backup_to(b.path()).unwrap();
    assert!(v.metrics().repairs_remote.get() >= 1);
    assert_eq!(v.read_file("/f").unwrap(), data);
    assert!(v.check(false).unwrap().is_clean());
    drop(v);
    let t = open(b.path());
    assert_eq!(t.read_file("/g").unwrap(), b"later");
    assert_eq!(t.read_file("/f").unwrap(), data);
}
