//! The pure on-disk codec: encode/decode round trips, and decoding arbitrary or
//! hostile bytes never panics, never allocates beyond the input, and answers typed
//! errors.

use portswitch_vault::format::*;
use portswitch_vault::{Cipher, Compression, FileKind, KdfParams, Parity, VaultError};
use proptest::prelude::*;

fn kind() -> impl Strategy<Value = FileKind> {
    prop_oneof![
        Just(FileKind::File),
        Just(FileKind::Dir),
        Just(FileKind::Symlink)
    ]
}

fn inode() -> impl Strategy<Value = InodeRec> {
    (
        (
            1u64..u64::MAX,
            kind(),
            any::<u64>(),
            proptest::collection::vec(any::<u8>(), 0..40),
        ),
        (any::<u32>(), any::<u32>(), any::<u32>()),
        (any::<i64>(), any::<i64>(), any::<i64>()),
        0u64..(1 << 48),
        proptest::collection::vec(any::<u8>(), 0..40),
    )
        .prop_map(
            |((ino, kind, parent, name), (mode, uid, gid), (atime, mtime, ctime), size, target)| {
                InodeRec {
                    ino,
                    kind,
                    parent,
                    name,
                    mode,
                    uid,
                    gid,
                    atime,
                    mtime,
                    ctime,
                    size,
                    target,
                }
            },
        )
}

fn ptr() -> impl Strategy<Value = BlockPtr> {
    (any::<u32>(), any::<u32>(), 61u32..(1 << 20), any::<u64>()).prop_map(
        |(segment, offset, len, version)| BlockPtr {
            segment,
            offset,
            len,
            version,
        },
    )
}

fn changes() -> impl Strategy<Value = Changes> {
    (
        proptest::collection::vec(any::<u64>(), 0..5),
        proptest::collection::vec((inode(), proptest::option::of(any::<u64>())), 0..5),
        proptest::collection::vec(
            (
                any::<u64>(),
                proptest::collection::vec((any::<u64>(), ptr()), 0..6),
            ),
            0..4,
        ),
    )
        .prop_map(|(removed, inodes, blocks)| Changes {
            removed,
            inodes,
            blocks,
        })
}

fn name() -> impl Strategy<Value = String> {
    "[a-z0-9 _-]{0,20}"
}

fn commit() -> impl Strategy<Value = CommitEntry> {
    (
        (any::<u64>(), any::<i64>(), any::<u64>(), any::<[u8; 32]>()),
        (any::<u32>(), any::<u64>(), any::<u64>()),
        proptest::collection::vec(
            prop_oneof![
                name().prop_map(SnapshotOp::Create),
                name().prop_map(SnapshotOp::Delete)
            ],
            0..3,
        ),
        changes(),
    )
        .prop_map(
            |(
                (version, time, writer_token, prev_hash),
                (key_id, seals, next_ino),
                snapshot_ops,
                changes,
            )| {
                CommitEntry {
                    version,
                    time,
                    writer_token,
                    prev_hash,
                    key_id,
                    seals,
                    header_sequence: seals ^ version,
                    next_ino,
                    snapshot_ops,
                    changes,
                }
            },
        )
}

fn checkpoint() -> impl Strategy<Value = CheckpointEntry> {
    (
        (any::<u64>(), any::<[u8; 32]>(), any::<i64>(), any::<u64>()),
        (any::<u64>(), any::<u32>(), any::<u64>()),
        proptest::collection::vec(
            (
                inode(),
                proptest::collection::vec((any::<u64>(), ptr()), 0..4),
            )
                .prop_map(|(rec, blocks)| CheckpointInode { rec, blocks }),
            0..4,
        ),
        proptest::collection::vec(
            (
                name(),
                any::<u64>(),
                any::<i64>(),
                proptest::option::of(changes()),
            )
                .prop_map(|(name, version, time, diff)| CheckpointSnapshot {
                    name,
                    version,
                    time,
                    diff,
                }),
            0..3,
        ),
        proptest::collection::vec(
            (any::<[u8; 32]>(), commit()).prop_map(|(hash, entry)| CarriedCommit { hash, entry }),
            0..3,
        ),
    )
        .prop_map(
            |(
                (base, base_hash, base_time, base_writer_token),
                (next_ino, key_id, seals),
                inodes,
                snapshots,
                carried,
            )| {
                CheckpointEntry {
                    base,
                    base_hash,
                    base_time,
                    base_writer_token,
                    next_ino,
                    key_id,
                    seals,
                    inodes,
                    snapshots,
                    carried,
                }
            },
        )
}

proptest! {
    #[test]
    fn commit_entries_round_trip(c in commit()) {
        let e = Entry::Commit(c);
        prop_assert_eq!(Entry::decode(&e.encode()).unwrap(), e);
    }

    #[test]
    fn checkpoint_entries_round_trip(c in checkpoint()) {
        let e = Entry::Checkpoint(c);
        prop_assert_eq!(Entry::decode(&e.encode()).unwrap(), e);
    }

    #[test]
    fn truncated_or_extended_entries_are_errors(c in commit(), cut in any::<prop::sample::Index>(), extra in 1usize..8) {
        let b = Entry::Commit(c).encode();
        let at = cut.index(b.len());
        prop_assert!(Entry::decode(&b[..at]).is_err());
        let mut longer = b.clone();
        longer.extend(std::iter::repeat_n(0u8, extra));
        prop_assert!(Entry::decode(&longer).is_err());
    }

    #[test]
    fn arbitrary_bytes_never_panic(b in proptest::collection::vec(any::<u8>(), 0..2048)) {
        let _ = Entry::decode(&b);
        let _ = HeaderClear::decode(&b);
        let _ = KeyTable::decode(&b);
        let _ = Frame::decode(&b);
        let _ = ChunkHeader::decode(&b);
    }

    #[test]
    fn frames_round_trip(len in 28u32..=(16 << 20), k in 0u8..3, key in any::<u32>()) {
        let kind = [RecordKind::Block, RecordKind::Commit, RecordKind::Checkpoint][k as usize];
        let f = Frame { body_len: len, kind, key_id: key };
        prop_assert_eq!(Frame::decode(&f.encode()), Some(f));
    }

    #[test]
    fn headers_round_trip(id in any::<[u8; 16]>(), salt in any::<[u8; 16]>(), seq in any::<u64>(), nonce in any::<[u8; 12]>(), sealed in proptest::collection::vec(any::<u8>(), 0..200)) {
        let h = HeaderClear {
            vault_id: id,
            cipher: Cipher::Sm4Gcm,
            compression: Compression::Lz4,
            block_bytes: 64 << 10,
            zstd_level: 3,
            segment_bytes: 64 << 20,
            parity: Some(Parity { data_shards: 10, parity_shards: 4 }),
            kdf: KdfParams::default(),
            salt,
            sequence: seq,
            nonce,
            sealed_len: sealed.len() as u32,
        };
        let mut file = h.encode().to_vec();
        file.extend_from_slice(&sealed);
        let (back, rest) = HeaderClear::decode(&file).unwrap();
        prop_assert_eq!(back, h);
        prop_assert_eq!(rest, &sealed[..]);
    }
}

#[test]
fn hostile_counts_do_not_allocate() {
    // A commit entry whose first count claims four billion removals.
    let mut b = vec![1u8]; // entry type: commit
    b.extend_from_slice(&[0u8; 8 + 8 + 8 + 32 + 4 + 8 + 8]);
    b.extend_from_slice(&0u32.to_le_bytes()); // no snapshot ops
    b.extend_from_slice(&u32::MAX.to_le_bytes()); // removals
    assert!(matches!(Entry::decode(&b), Err(VaultError::Format { .. })));
    // A chunk claiming a 4 GiB entry, or 2^32 chunks.
    let mut h = ChunkHeader {
        kind: RecordKind::Commit,
        index: 0,
        count: 1,
        codec: 1,
        raw_len: u32::MAX,
    }
    .encode();
    assert!(ChunkHeader::decode(&h).is_err());
    h[5..9].copy_from_slice(&u32::MAX.to_le_bytes());
    assert!(ChunkHeader::decode(&h).is_err());
    // A frame announcing a body past the record limit.
    let f = Frame {
        body_len: 64,
        kind: RecordKind::Block,
        key_id: 1,
    };
    let mut fb = f.encode();
    fb[0..4].copy_from_slice(&u32::MAX.to_le_bytes());
    let crc = crc32(&fb[..12]);
    fb[12..16].copy_from_slice(&crc.to_le_bytes());
    assert_eq!(Frame::decode(&fb), None);
    // A key table claiming 65535 keys.
    let mut k = 1u32.to_le_bytes().to_vec();
    k.extend_from_slice(&u16::MAX.to_le_bytes());
    assert!(KeyTable::decode(&k).is_err());
}

/// CRC32C (Castagnoli), bitwise: the frame checksum, kept independent of the crate.
fn crc32(b: &[u8]) -> u32 {
    let mut c = !0u32;
    for &x in b {
        c ^= x as u32;
        for _ in 0..8 {
            c = if c & 1 != 0 {
                (c >> 1) ^ 0x82F6_3B78
            } else {
                c >> 1
            };
        }
    }
    !c
}
