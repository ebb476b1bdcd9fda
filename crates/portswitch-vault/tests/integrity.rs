//! Every read is authenticated: tampering is detected (a typed error, never wrong
//! bytes) and repaired from the mirror or from parity when one has a good copy.

mod common;

use common::*;
use portswitch_vault::{Cipher, Compression, CreateOptions, OpenOptions, Vault, VaultError, ROOT};

const BODY: u64 = 16 + 12; // frame + nonce: where ciphertext starts

fn no_parity() -> CreateOptions {
    CreateOptions {
        parity: None,
        ..opts()
    }
}

fn corrupt<T: std::fmt::Debug>(r: Result<T, VaultError>) {
    match r {
        Err(VaultError::Corrupt { .. }) => {}
        other => panic!("expected Corrupt, got {other:?}"),
    }
}

#[test]
fn same_plaintext_twice_gives_unrelated_ciphertext() {
    let d = TempDir::new("unrelated");
    let v = Vault::create(d.path(), PASS, no_parity()).unwrap();
    let data = noise(5, 4096);
    v.write_file("/one", &data).unwrap();
    v.write_file("/two", &data).unwrap();
    let txt = text(6, 4096);
    v.write_file("/t1", &txt).unwrap();
    v.write_file("/t2", &txt).unwrap();
    v.sync().unwrap();
    drop(v);
    let blocks = block_records(d.path());
    assert_eq!(blocks.len(), 4);
    let bodies: Vec<Vec<u8>> = blocks
        .iter()
        .map(|(p, o, l)| read_at(p, *o + 16, *l as usize - 16))
        .collect();
    // Pairwise, no 8-byte window of one body appears in another.
    for i in 0..bodies.len() {
        for j in 0..bodies.len() {
            if i != j {
                for w in bodies[i].windows(8).step_by(8) {
                    assert!(
                        !bodies[j].windows(8).any(|x| x == w),
                        "shared bytes {i} {j}"
                    );
                }
            }
        }
    }
    // Neither plaintext nor file names appear anywhere on disk.
    for seg in segments(d.path()) {
        let all = std::fs::read(seg).unwrap();
        assert!(!all.windows(16).any(|w| w == &data[..16]));
        assert!(!all.windows(16).any(|w| w == &txt[..16]));
        assert!(!all.windows(3).any(|w| w == b"one" || w == b"two"));
    }
}

#[test]
fn flipped_byte_is_detected_without_a_copy() {
    let d = TempDir::new("flip");
    let v = Vault::create(d.path(), PASS, no_parity()).unwrap();
    v.write_file("/f", &noise(1, 8192)).unwrap();
    v.sync().unwrap();
    drop(v);
    let (seg, off, _) = block_records(d.path())[1].clone();
    flip(&seg, off + BODY + 100);
    let v = open(d.path());
    corrupt(v.read_file("/f"));
    // The first block still reads.
    let ino = v.resolve("/f").unwrap().ino;
    let mut b = vec![0u8; 4096];
    assert_eq!(v.read(ino, 0, &mut b).unwrap(), 4096);
    assert_eq!(b, noise(1, 8192)[..4096]);
    assert!(v.metrics().auth_failures.get() >= 1);
    let rep = v.check(true).unwrap();
    assert!(!rep.is_clean());
    assert_eq!(rep.unrepaired, 1);
}

/// Swaps the bytes of two equally long records.
fn swap(a: &(std::path::PathBuf, u64, u32), b: &(std::path::PathBuf, u64, u32)) {
    assert_eq!(a.2, b.2);
    let x = read_at(&a.0, a.1, a.2 as usize);
    let y = read_at(&b.0, b.1, b.2 as usize);
    write_at(&a.0, a.1, &y);
    write_at(&b.0, b.1, &x);
}

#[test]
fn swapped_blocks_within_a_file_are_detected() {
    let d = TempDir::new("swap");
    let v = Vault::create(d.path(), PASS, no_parity()).unwrap();
    v.write_file("/f", &noise(2, 8192)).unwrap();
    v.sync().unwrap();
    drop(v);
    let b = block_records(d.path());
    swap(&b[0], &b[1]);
    let v = open(d.path());
    corrupt(v.read_file("/f"));
}

#[test]
fn swapped_files_are_detected() {
    let d = TempDir::new("swapfiles");
    let v = Vault::create(d.path(), PASS, no_parity()).unwrap();
    v.write_file("/x", &noise(3, 4096)).unwrap();
    v.write_file("/y", &noise(4, 4096)).unwrap();
    v.sync().unwrap();
    drop(v);
    let b = block_records(d.path());
    swap(&b[0], &b[1]);
    let v = open(d.path());
    corrupt(v.read_file("/x"));
    corrupt(v.read_file("/y"));
}

/// Writes version 1 of a block, then version 2, and copies v1's record over v2's.
fn roll_back_one_block(dir: &std::path::Path, opts: CreateOptions) -> Vec<u8> {
    let v = Vault::create(dir, PASS, opts).unwrap();
    v.write_file("/f", &noise(10, 4096)).unwrap();
    v.sync().unwrap();
    let new = noise(11, 4096);
    v.write_file("/f", &new).unwrap();
    v.sync().unwrap();
    drop(v);
    let b = block_records(dir);
    assert_eq!(b.len(), 2);
    let old = read_at(&b[0].0, b[0].1, b[0].2 as usize);
    write_at(&b[1].0, b[1].1, &old);
    new
}

#[test]
fn rolled_back_block_is_detected() {
    let d = TempDir::new("rollback");
    roll_back_one_block(d.path(), no_parity());
    let v = open(d.path());
    corrupt(v.read_file("/f"));
}

#[test]
fn every_kind_of_damage_is_repaired_from_the_mirror() {
    for case in 0..4 {
        let d = TempDir::new("mirror");
        let m = d.join("mirror");
        let v = Vault::create(
            d.join("v"),
            PASS,
            CreateOptions {
                open: OpenOptions {
                    mirror: Some(m.clone()),
                    ..OpenOptions::default()
                },
                ..no_parity()
            },
        )
        .unwrap();
        let x = noise(20, 8192);
        let y = noise(21, 4096);
        v.write_file("/x", &x).unwrap();
        v.write_file("/y", &y).unwrap();
        v.sync().unwrap();
        let x2 = noise(22, 4096);
        v.write(v.resolve("/x").unwrap().ino, 0, &x2).unwrap();
        v.sync().unwrap();
        drop(v);
        let dir = d.join("v");
        let b = block_records(&dir);
        // b: x0 x1 y (v2), x0' (v3)
        match case {
            0 => flip(&b[1].0, b[1].1 + BODY + 7),
            1 => swap(&b[1], &b[3]),
            2 => swap(&b[1], &b[2]),
            _ => {
                let old = read_at(&b[0].0, b[0].1, b[0].2 as usize);
                write_at(&b[3].0, b[3].1, &old);
            }
        }
        let v = Vault::open(
            &dir,
            PASS,
            OpenOptions {
                mirror: Some(m.clone()),
                ..OpenOptions::default()
            },
        )
        .unwrap();
        let mut want_x = x.clone();
        want_x[..4096].copy_from_slice(&x2);
        assert_eq!(v.read_file("/x").unwrap(), want_x, "case {case}");
        assert_eq!(v.read_file("/y").unwrap(), y, "case {case}");
        assert!(v.metrics().repairs_mirror.get() >= 1, "case {case}");
        // Written back in place: the primary now equals the mirror.
        for (p, q) in segments(&dir).iter().zip(segments(&m).iter()) {
            assert_eq!(
                std::fs::read(p).unwrap(),
                std::fs::read(q).unwrap(),
                "case {case}"
            );
        }
        assert!(v.check(false).unwrap().is_clean());
    }
}

#[test]
fn damage_in_a_closed_segment_is_rebuilt_from_parity() {
    let d = TempDir::new("parity");
    let v = create(d.path()); // parity on, 4 MiB segments
    let data = noise(30, 6 << 20);
    v.write_file("/big", &data).unwrap();
    v.sync().unwrap();
    drop(v);
    assert!(
        d.join("seg/00000001.par").exists(),
        "segment 1 closed with parity"
    );
    let b = block_records(d.path());
    let in_first: Vec<_> = b
        .iter()
        .filter(|(p, _, _)| p.ends_with("00000001.seg"))
        .collect();
    // Damage two blocks far apart (two stripes), and one whole 4 KiB run.
    flip(&in_first[3].0, in_first[3].1 + BODY + 1);
    flip(&in_first[700].0, in_first[700].1 + 2);
    let v = open(d.path());
    assert_eq!(v.read_file("/big").unwrap(), data);
    assert!(v.metrics().repairs_parity.get() >= 2);
    drop(v);
    // Now a record swap in the closed segment: also rebuilt.
    swap(in_first[10], in_first[11]);
    let v = open(d.path());
    assert_eq!(v.read_file("/big").unwrap(), data);
    assert!(v.check(false).unwrap().is_clean());
}

#[test]
fn check_finds_and_repairs_damage_on_either_copy() {
    let d = TempDir::new("check");
    let m = d.join("m");
    let mo = OpenOptions {
        mirror: Some(m.clone()),
        ..OpenOptions::default()
    };
    let v = Vault::create(
        d.join("v"),
        PASS,
        CreateOptions {
            open: mo.clone(),
            ..opts()
        },
    )
    .unwrap();
    v.write_file("/a", &text(1, 50_000)).unwrap();
    v.write_file("/b", &noise(2, 50_000)).unwrap();
    v.sync().unwrap();
    drop(v);
    let b = block_records(&d.join("v"));
    flip(&b[2].0, b[2].1 + BODY + 3);
    let mb = block_records(&m);
    flip(&mb[5].0, mb[5].1 + BODY + 3);
    let v = Vault::open(d.join("v"), PASS, mo).unwrap();
    let r = v.check(false).unwrap();
    assert_eq!(r.damaged.len(), 2, "{r:?}");
    assert_eq!(r.unrepaired, 2);
    let r = v.check(true).unwrap();
    assert_eq!(r.repaired, 2, "{r:?}");
    let r = v.check(false).unwrap();
    assert!(r.is_clean() && r.damaged.is_empty(), "{r:?}");
    assert_eq!(v.read_file("/a").unwrap(), text(1, 50_000));
}

#[test]
fn wrong_passphrase_and_tampered_header_are_typed_errors() {
    let d = TempDir::new("pass");
    let v = create(d.path());
    v.write_file("/f", b"secret").unwrap();
    drop(v);
    assert!(matches!(
        Vault::open(d.path(), b"wrong", OpenOptions::default()),
        Err(VaultError::WrongPassphrase)
    ));
    let h = d.join("VAULT");
    let orig = std::fs::read(&h).unwrap();
    // A flipped bit in an authenticated clear field (the segment size).
    let mut t = orig.clone();
    t[33] ^= 1;
    std::fs::write(&h, &t).unwrap();
    assert!(Vault::open(d.path(), PASS, OpenOptions::default()).is_err());
    for cut in [0, 5, 40, orig.len() - 1] {
        std::fs::write(&h, &orig[..cut]).unwrap();
        assert!(matches!(
            Vault::open(d.path(), PASS, OpenOptions::default()),
            Err(VaultError::Format { .. })
        ));
    }
    std::fs::write(&h, vec![0u8; 1 << 20]).unwrap();
    assert!(matches!(
        Vault::open(d.path(), PASS, OpenOptions::default()),
        Err(VaultError::TooLarge { .. })
    ));
    std::fs::write(&h, &orig).unwrap();
    assert_eq!(open(d.path()).read_file("/f").unwrap(), b"secret");
}

#[test]
fn every_cipher_and_compression_round_trips() {
    for cipher in [Cipher::Aes256Gcm, Cipher::ChaCha20Poly1305, Cipher::Sm4Gcm] {
        for compression in [Compression::None, Compression::Zstd, Compression::Lz4] {
            let d = TempDir::new("ciphers");
            let v = Vault::create(
                d.path(),
                PASS,
                CreateOptions {
                    cipher,
                    compression,
                    block_bytes: 16 << 10,
                    ..opts()
                },
            )
            .unwrap();
            let t = text(3, 200_000);
            let n = noise(4, 100_000);
            v.write_file("/t", &t).unwrap();
            v.write_file("/n", &n).unwrap();
            v.sync().unwrap();
            drop(v);
            let v = open(d.path());
            assert_eq!(v.read_file("/t").unwrap(), t, "{cipher:?} {compression:?}");
            assert_eq!(v.read_file("/n").unwrap(), n);
            let disk = v.stats().disk_bytes;
            if compression != Compression::None {
                assert!(disk < 200_000, "{compression:?} shrinks text: {disk}");
            }
            assert!(v.check(false).unwrap().is_clean());
        }
    }
}

#[test]
fn lock_keeps_a_second_writer_out() {
    let d = TempDir::new("lock");
    let v = create(d.path());
    assert!(matches!(
        Vault::open(d.path(), PASS, OpenOptions::default()),
        Err(VaultError::Locked)
    ));
    let ro = Vault::open(
        d.path(),
        PASS,
        OpenOptions {
            read_only: true,
            ..OpenOptions::default()
        },
    )
    .unwrap();
    assert!(matches!(
        ro.write_file("/x", b"y"),
        Err(VaultError::ReadOnly)
    ));
    assert!(matches!(
        ro.mkdir(ROOT, b"d", 0o755),
        Err(VaultError::ReadOnly)
    ));
    drop(v);
}

#[test]
fn hostile_segments_give_typed_errors_not_panics() {
    let d = TempDir::new("hostile");
    let v = create(d.path()); // 4 MiB segments, parity on
    v.write_file("/a", &noise(1, 9 << 20)).unwrap();
    v.sync().unwrap();
    drop(v);
    let segs = segments(d.path());
    assert!(segs.len() >= 3);
    let last = segs.last().unwrap().clone();
    // Garbage after the last commit (a torn write, or an attacker): cut on open.
    let len = std::fs::metadata(&last).unwrap().len();
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .open(&last)
        .unwrap();
    std::io::Write::write_all(&mut f, &noise(9, 10_000)).unwrap();
    drop(f);
    // A frame that claims a 16 MiB body past the end of the file.
    let frame = portswitch_vault::format::Frame {
        body_len: 16 << 20,
        kind: portswitch_vault::format::RecordKind::Commit,
        key_id: 1,
    };
    write_at(&last, len + 10_000, &frame.encode());
    let v = open(d.path());
    assert_eq!(v.read_file("/a").unwrap(), noise(1, 9 << 20));
    drop(v);
    assert_eq!(std::fs::metadata(&last).unwrap().len(), len);
    // A closed segment zeroed over several shards of a stripe: beyond parity.
    write_at(&segs[0], 0, &vec![0u8; 512 << 10]);
    match Vault::open(d.path(), PASS, OpenOptions::default()) {
        Err(VaultError::Corrupt { .. }) => {}
        other => panic!("expected Corrupt, got {other:?}"),
    }
    // A missing middle segment.
    let d2 = TempDir::new("hostile2");
    let v = create(d2.path());
    for i in 0..3 {
        v.write_file(&format!("/f{i}"), &noise(i, 5 << 20)).unwrap();
        v.sync().unwrap();
    }
    drop(v);
    let segs = segments(d2.path());
    std::fs::remove_file(&segs[1]).unwrap();
    match Vault::open(d2.path(), PASS, OpenOptions::default()) {
        Err(VaultError::Corrupt { .. }) => {}
        other => panic!("expected Corrupt, got {other:?}"),
    }
    // Every segment gone.
    for s in segments(d2.path()) {
        std::fs::remove_file(s).unwrap();
    }
    assert!(matches!(
        Vault::open(d2.path(), PASS, OpenOptions::default()),
        Err(VaultError::Corrupt { .. })
    ));
}

#[test]
fn a_deleted_parity_file_does_not_turn_damage_into_a_silent_cut() {
    let d = TempDir::new("nopar");
    let v = create(d.path());
    for i in 0..3 {
        v.write_file(&format!("/f{i}"), &noise(i, 5 << 20)).unwrap();
        v.sync().unwrap();
    }
    drop(v);
    let segs = segments(d.path());
    assert!(segs.len() >= 3);
    std::fs::remove_file(d.join("seg/00000001.par")).unwrap();
    write_at(&segs[0], 1 << 20, &vec![0u8; 300 << 10]);
    match Vault::open(d.path(), PASS, OpenOptions::default()) {
        Err(VaultError::Corrupt { .. }) => {}
        other => panic!("expected Corrupt, got {other:?}"),
    }
    // Nothing was cut.
    assert_eq!(segments(d.path()).len(), segs.len());
}

/// Finding 5: when the primary lost its whole open segment (every remaining segment is
/// closed, so there is no cut), the open must still ask the mirror and take its newer
/// commits, never erase them. Without the fix the open succeeds at the older version
/// and deletes the mirror's copy of the segment.
#[test]
fn lost_open_segment_is_restored_from_the_mirror() {
    let d = TempDir::new("lost-open");
    let m = d.join("mirror");
    let dir = d.join("v");
    let mopts = OpenOptions {
        mirror: Some(m.clone()),
        ..OpenOptions::default()
    };
    let v = Vault::create(
        &dir,
        PASS,
        CreateOptions {
            open: mopts.clone(),
            ..opts()
        },
    )
    .unwrap();
    v.write_file("/big", &noise(30, 5 << 20)).unwrap();
    v.sync().unwrap();
    let late = noise(31, 10_000);
    v.write_file("/late", &late).unwrap();
    v.sync().unwrap();
    drop(v);
    let segs = |d: &std::path::Path| {
        let mut v: Vec<_> = std::fs::read_dir(d.join("seg"))
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        v.sort();
        v
    };
    let names = segs(&dir);
    let last = names.iter().rev().find(|n| n.ends_with(".seg")).unwrap();
    let stem = last.trim_end_matches(".seg");
    assert!(
        !names.contains(&format!("{stem}.par")),
        "the last segment is open: {names:?}"
    );
    // Every segment before the lost one is closed.
    for n in names.iter().filter(|n| n.ends_with(".seg") && *n != last) {
        assert!(names.contains(&n.replace(".seg", ".par")), "{names:?}");
    }
    std::fs::remove_file(dir.join("seg").join(last)).unwrap();
    let v = Vault::open(&dir, PASS, mopts).unwrap();
    assert_eq!(v.read_file("/late").unwrap(), late);
    assert!(m.join("seg").join(last).exists());
}

/// Finding 3: one damaged frame in the segment not yet closed must not silently cut the
/// fsync'd commits after it: with a later commit that opens, the open answers
/// `Corrupt` (and cuts nothing); with a mirror, the frame is repaired and every commit
/// stays. Without the fix the open succeeds and `/b` (synced) is gone.
#[test]
fn damaged_frame_before_later_commits_is_corruption_not_a_tear() {
    for with_mirror in [false, true] {
        let d = TempDir::new("frame-cut");
        let dir = d.join("v");
        let m = d.join("mirror");
        let o = OpenOptions {
            mirror: with_mirror.then(|| m.clone()),
            ..OpenOptions::default()
        };
        let v = Vault::create(
            &dir,
            PASS,
            CreateOptions {
                open: o.clone(),
                ..opts()
            },
        )
        .unwrap();
        let a = noise(40, 100_000);
        let b = noise(41, 10_000);
        v.write_file("/a", &a).unwrap();
        v.sync().unwrap();
        v.write_file("/b", &b).unwrap();
        v.sync().unwrap();
        drop(v);
        // The first block record of /a, in the open segment: flip a bit of its frame.
        let (seg, off, _) = block_records(&dir)[0].clone();
        assert!(!seg.with_extension("par").exists(), "segment still open");
        let len = std::fs::metadata(&seg).unwrap().len();
        flip(&seg, off + 1);
        let r = Vault::open(&dir, PASS, o);
        if with_mirror {
            let v = r.unwrap();
            assert_eq!(v.read_file("/a").unwrap(), a);
            assert_eq!(v.read_file("/b").unwrap(), b);
        } else {
            corrupt(r);
            // Nothing was cut.
            assert_eq!(std::fs::metadata(&seg).unwrap().len(), len);
        }
    }
}

/// Finding 4 (scenario A): an older, authentic header from before a `rotate_key` put
/// back must not silently drop the commits sealed under the newer key (and a writable
/// open must not then cut them): it is `Corrupt`. Without the fix the vault opens at
/// the pre-rotation version and `/b` is gone.
#[test]
fn an_older_header_from_before_a_rotation_is_refused() {
    let d = TempDir::new("old-header");
    let v = create(d.path());
    v.write_file("/a", b"before").unwrap();
    v.sync().unwrap();
    let old = std::fs::read(d.join("VAULT")).unwrap();
    v.rotate_key().unwrap();
    v.write_file("/b", b"after").unwrap();
    v.sync().unwrap();
    drop(v);
    let new = std::fs::read(d.join("VAULT")).unwrap();
    std::fs::write(d.join("VAULT"), &old).unwrap();
    corrupt(Vault::open(d.path(), PASS, OpenOptions::default()));
    // Nothing was cut: the right header back, everything is there.
    std::fs::write(d.join("VAULT"), &new).unwrap();
    let v = open(d.path());
    assert_eq!(v.read_file("/b").unwrap(), b"after");
    assert_eq!(v.read_file("/a").unwrap(), b"before");
}

/// Finding 4 (header sequence): each commit records the sequence of the header it was
/// made under, so an older header put back (here from before a passphrase change, no
/// key rotation involved) is refused instead of opening silently. Without the fix the
/// old header opens with the old passphrase.
#[test]
fn a_header_older_than_the_commits_is_refused() {
    let d = TempDir::new("old-seq");
    let v = create(d.path());
    v.write_file("/a", b"before").unwrap();
    v.sync().unwrap();
    let old = std::fs::read(d.join("VAULT")).unwrap();
    v.change_passphrase(PASS, b"another passphrase").unwrap();
    v.write_file("/b", b"after").unwrap();
    v.sync().unwrap();
    drop(v);
    std::fs::write(d.join("VAULT"), &old).unwrap();
    corrupt(Vault::open(d.path(), PASS, OpenOptions::default()));
}

/// Review finding 10: a closed segment that lost its tail (a truncated file) is rebuilt
/// from its parity when the lost part fits in the parity's budget, instead of being
/// refused (or cut) on open.
#[test]
fn a_truncated_closed_segment_is_rebuilt_from_parity() {
    let d = TempDir::new("trunc");
    let v = create(d.path()); // parity 16+2, 4 MiB segments
    let data = noise(31, 6 << 20);
    v.write_file("/big", &data).unwrap();
    v.sync().unwrap();
    drop(v);
    assert!(d.join("seg/00000001.par").exists());
    let seg = d.join("seg/00000001.seg");
    let len = std::fs::metadata(&seg).unwrap().len();
    // 20 KiB off the end: within one 64 KiB shard of the last stripe.
    std::fs::OpenOptions::new()
        .write(true)
        .open(&seg)
        .unwrap()
        .set_len(len - (20 << 10))
        .unwrap();
    // A read-only open writes nothing, but sees the whole segment (reads past the
    // file's end rebuilt on the fly).
    let ro = Vault::open(
        d.path(),
        PASS,
        OpenOptions {
            read_only: true,
            ..OpenOptions::default()
        },
    )
    .unwrap();
    assert_eq!(ro.read_file("/big").unwrap(), data);
    drop(ro);
    assert!(std::fs::metadata(&seg).unwrap().len() < len);
    let v = open(d.path());
    assert_eq!(v.read_file("/big").unwrap(), data);
    assert!(v.metrics().repairs_parity.get() >= 1);
    let c = v.check(true).unwrap();
    drop(v);
    assert_eq!(std::fs::metadata(&seg).unwrap().len(), len, "{c:?}");
    let v = open(d.path());
    assert!(v.check(false).unwrap().is_clean());
    assert_eq!(v.read_file("/big").unwrap(), data);
    drop(v);
    // More than the parity can rebuild (whole stripes' worth): Corrupt, nothing cut.
    std::fs::OpenOptions::new()
        .write(true)
        .open(&seg)
        .unwrap()
        .set_len(len - (1 << 20))
        .unwrap();
    match Vault::open(d.path(), PASS, OpenOptions::default()) {
        Err(VaultError::Corrupt { segment: 1, .. }) => {}
        other => panic!("expected Corrupt in segment 1, got {other:?}"),
    }
    assert_eq!(std::fs::metadata(&seg).unwrap().len(), len - (1 << 20));
}

/// Every block read is verified, and the verification is counted (time and bytes) so
/// its share of read time can be measured (`vault_verify_seconds_total`).
#[test]
fn reads_are_verified_and_the_cost_is_counted() {
    let d = TempDir::new("verify-cost");
    let v = create(d.path());
    let data = noise(40, 1 << 20);
    v.write_file("/f", &data).unwrap();
    v.sync().unwrap();
    drop(v);
    let v = open(d.path());
    assert_eq!(v.metrics().verified_bytes.get(), 0);
    assert_eq!(v.read_file("/f").unwrap(), data);
    let m = v.metrics();
    assert!(
        m.verified_bytes.get() >= 1 << 20,
        "{}",
        m.verified_bytes.get()
    );
    assert!(m.verify_seconds.nanos() > 0);
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &v.metrics_registry()).unwrap();
    assert!(text.contains("vault_verify_seconds_total"), "{text}");
    assert!(text.contains("vault_verified_bytes_total"), "{text}");
}
