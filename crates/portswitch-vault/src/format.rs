//! The on-disk format, version 1, as pure encode/decode functions (no I/O, no crypto:
//! sealing happens in `crypto`). docs/VAULT.md describes every byte.
//!
//! - [`HeaderClear`]: the clear part of the `VAULT` file, and [`KeyTable`], its sealed
//!   part;
//! - [`Frame`]: the 16-byte clear frame before every record's sealed body;
//! - [`aad`]: what each seal authenticates besides its body;
//! - [`Entry`]: what commit and checkpoint records carry once opened and reassembled
//!   from their chunks; [`Changes`] is the change list both use.

use crate::codec::{Reader, Writer};
/// The decoder of an opened block record's plaintext (codec byte, then raw or
/// compressed bytes): what a block record holds once its seal opened.
pub use crate::compress::decode_block;
use crate::error::{Result, VaultError};
use crate::limits::*;
use crate::types::{Cipher, Compression, FileKind, Ino, KdfParams, Parity, Version};

pub const MAGIC: &[u8; 8] = b"PSVAULT1";
pub const FORMAT_VERSION: u16 = 1;
/// Bytes of the header before the sealed key table (all of it is the table's AAD).
pub const HEADER_CLEAR_BYTES: usize = 96;
pub const KDF_ARGON2ID: u8 = 1;
pub const KEY_BYTES: usize = 32;
pub const SALT_BYTES: usize = 16;
pub const VAULT_ID_BYTES: usize = 16;

/// The clear fields of the header. Everything here is authenticated (it is the key
/// table's AAD) but readable without the passphrase.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HeaderClear {
    pub vault_id: [u8; VAULT_ID_BYTES],
    pub cipher: Cipher,
    pub compression: Compression,
    pub block_bytes: u32,
    pub zstd_level: i8,
    pub segment_bytes: u64,
    pub parity: Option<Parity>,
    pub kdf: KdfParams,
    pub salt: [u8; SALT_BYTES],
    /// +1 at each rewrite of the header.
    pub sequence: u64,
    pub nonce: [u8; NONCE_BYTES],
    /// Bytes of the sealed key table that follows (ciphertext and tag).
    pub sealed_len: u32,
}

pub fn cipher_code(c: Cipher) -> u8 {
    match c {
        Cipher::Aes256Gcm => 1,
        Cipher::ChaCha20Poly1305 => 2,
        Cipher::Sm4Gcm => 3,
    }
}

fn cipher_from(code: u8) -> Result<Cipher> {
    Ok(match code {
        1 => Cipher::Aes256Gcm,
        2 => Cipher::ChaCha20Poly1305,
        3 => Cipher::Sm4Gcm,
        _ => {
            return Err(VaultError::format(
                "header",
                format!("unknown cipher {code}"),
            ))
        }
    })
}

fn compression_code(c: Compression) -> u8 {
    match c {
        Compression::None => 0,
        Compression::Zstd => 1,
        Compression::Lz4 => 2,
    }
}

fn compression_from(code: u8) -> Result<Compression> {
    Ok(match code {
        0 => Compression::None,
        1 => Compression::Zstd,
        2 => Compression::Lz4,
        _ => {
            return Err(VaultError::format(
                "header",
                format!("unknown compression {code}"),
            ))
        }
    })
}

/// Checks options a header may hold (on create, and on every decode).
pub fn check_params(
    block_bytes: u32,
    segment_bytes: u64,
    kdf: &KdfParams,
    parity: Option<Parity>,
) -> Result<()> {
    let bad = |why: String| Err(VaultError::format("header", why));
    if !block_bytes.is_power_of_two() || !(BLOCK_BYTES_MIN..=BLOCK_BYTES_MAX).contains(&block_bytes)
    {
        return bad(format!("block size {block_bytes}"));
    }
    if !(SEGMENT_BYTES_MIN..=SEGMENT_BYTES_MAX).contains(&segment_bytes) {
        return bad(format!("segment size {segment_bytes}"));
    }
    if kdf.memory_kib > KDF_MEMORY_KIB_MAX
        || kdf.passes > KDF_PASSES_MAX
        || kdf.lanes > KDF_LANES_MAX
        || kdf.passes == 0
        || kdf.lanes == 0
        || kdf.memory_kib < 8 * kdf.lanes
    {
        return bad(format!("kdf parameters {kdf:?}"));
    }
    if let Some(p) = parity {
        if p.data_shards == 0
            || p.parity_shards == 0
            || p.data_shards > PARITY_DATA_SHARDS_MAX
            || p.parity_shards > PARITY_SHARDS_MAX
        {
            return bad(format!("parity {p:?}"));
        }
    }
    Ok(())
}

impl HeaderClear {
    pub fn encode(&self) -> [u8; HEADER_CLEAR_BYTES] {
        let mut w = Writer::with_capacity(HEADER_CLEAR_BYTES);
        w.bytes(MAGIC);
        w.u16(FORMAT_VERSION);
        w.u16(HEADER_CLEAR_BYTES as u16);
        w.bytes(&self.vault_id);
        w.u8(cipher_code(self.cipher));
        w.u8(compression_code(self.compression));
        w.u8(self.block_bytes.trailing_zeros() as u8);
        w.u8(self.zstd_level as u8);
        w.u64(self.segment_bytes);
        let (d, p) = self
            .parity
            .map(|p| (p.data_shards, p.parity_shards))
            .unwrap_or((0, 0));
        w.u8(d);
        w.u8(p);
        w.u8(KDF_ARGON2ID);
        w.u8(0);
        w.u32(self.kdf.memory_kib);
        w.u32(self.kdf.passes);
        w.u32(self.kdf.lanes);
        w.bytes(&self.salt);
        w.u64(self.sequence);
        w.bytes(&self.nonce);
        w.u32(self.sealed_len);
        assert_eq!(w.buf.len(), HEADER_CLEAR_BYTES);
        let mut out = [0u8; HEADER_CLEAR_BYTES];
        out.copy_from_slice(&w.buf);
        out
    }

    /// Decodes the clear part of a header file; `file` is the whole file. Returns the
    /// header and the sealed key table.
    pub fn decode(file: &[u8]) -> Result<(HeaderClear, &[u8])> {
        if file.len() > HEADER_BYTES_MAX {
            return Err(VaultError::TooLarge {
                what: "header",
                limit: HEADER_BYTES_MAX as u64,
            });
        }
        let mut r = Reader::new(file, "header");
        if r.take(8)? != MAGIC {
            return Err(VaultError::format("header", "not a vault (bad magic)"));
        }
        let version = r.u16()?;
        if version != FORMAT_VERSION {
            return Err(VaultError::format(
                "header",
                format!("format version {version}, this build reads {FORMAT_VERSION}"),
            ));
        }
        let clear_len = r.u16()? as usize;
        if clear_len != HEADER_CLEAR_BYTES {
            return Err(VaultError::format(
                "header",
                format!("clear length {clear_len}"),
            ));
        }
        let vault_id = r.array()?;
        let cipher = cipher_from(r.u8()?)?;
        let compression = compression_from(r.u8()?)?;
        let log2 = r.u8()?;
        if log2 >= 32 {
            return Err(VaultError::format("header", format!("block size 2^{log2}")));
        }
        let block_bytes = 1u32 << log2;
        let zstd_level = r.u8()? as i8;
        let segment_bytes = r.u64()?;
        let (d, p) = (r.u8()?, r.u8()?);
        let parity = if d == 0 && p == 0 {
            None
        } else {
            Some(Parity {
                data_shards: d,
                parity_shards: p,
            })
        };
        let kdf_alg = r.u8()?;
        if kdf_alg != KDF_ARGON2ID {
            return Err(VaultError::format(
                "header",
                format!("unknown kdf {kdf_alg}"),
            ));
        }
        if r.u8()? != 0 {
            return Err(VaultError::format("header", "reserved byte set"));
        }
        let kdf = KdfParams {
            memory_kib: r.u32()?,
            passes: r.u32()?,
            lanes: r.u32()?,
        };
        let salt = r.array()?;
        let sequence = r.u64()?;
        let nonce = r.array()?;
        let sealed_len = r.u32()?;
        check_params(block_bytes, segment_bytes, &kdf, parity)?;
        let sealed = r.take(sealed_len as usize)?;
        r.finish()?;
        Ok((
            HeaderClear {
                vault_id,
                cipher,
                compression,
                block_bytes,
                zstd_level,
                segment_bytes,
                parity,
                kdf,
                salt,
                sequence,
                nonce,
                sealed_len,
            },
            sealed,
        ))
    }
}

/// One data key.
#[derive(Clone, PartialEq, Eq)]
pub struct KeyEntry {
    pub id: u32,
    /// The version that was head when the key was made.
    pub created: Version,
    /// Seals made under this key, as of the header's writing.
    pub seals: u64,
    pub key: [u8; KEY_BYTES],
}

/// A data key is wiped from memory when its entry goes (every copy of a key table).
impl Drop for KeyEntry {
    fn drop(&mut self) {
        zeroize::Zeroize::zeroize(&mut self.key);
    }
}

impl std::fmt::Debug for KeyEntry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyEntry")
            .field("id", &self.id)
            .field("created", &self.created)
            .field("seals", &self.seals)
            .finish_non_exhaustive()
    }
}

/// The sealed part of the header: the data keys.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeyTable {
    pub active: u32,
    pub keys: Vec<KeyEntry>,
}

impl KeyTable {
    pub fn encode(&self) -> Vec<u8> {
        assert!(self.keys.len() <= KEYS_MAX);
        let mut w = Writer::with_capacity(8 + self.keys.len() * 52);
        w.u32(self.active);
        w.u16(self.keys.len() as u16);
        for k in &self.keys {
            w.u32(k.id);
            w.u64(k.created);
            w.u64(k.seals);
            w.bytes(&k.key);
        }
        w.buf
    }

    pub fn decode(b: &[u8]) -> Result<KeyTable> {
        let mut r = Reader::new(b, "key table");
        let active = r.u32()?;
        let n = r.u16()? as usize;
        if n > KEYS_MAX || n == 0 {
            return Err(VaultError::format("key table", format!("{n} keys")));
        }
        let mut keys = Vec::with_capacity(n);
        for _ in 0..n {
            keys.push(KeyEntry {
                id: r.u32()?,
                created: r.u64()?,
                seals: r.u64()?,
                key: r.array()?,
            });
        }
        r.finish()?;
        if !keys.iter().any(|k| k.id == active) {
            return Err(VaultError::format("key table", "active key missing"));
        }
        Ok(KeyTable { active, keys })
    }
}

/// What a record holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum RecordKind {
    Block,
    Commit,
    Checkpoint,
}

impl RecordKind {
    pub fn code(self) -> u8 {
        match self {
            RecordKind::Block => 1,
            RecordKind::Commit => 2,
            RecordKind::Checkpoint => 3,
        }
    }
    fn from(code: u8) -> Option<RecordKind> {
        match code {
            1 => Some(RecordKind::Block),
            2 => Some(RecordKind::Commit),
            3 => Some(RecordKind::Checkpoint),
            _ => None,
        }
    }
}

/// The clear frame before a record's sealed body:
/// `body_len u32 | kind u8 | 0 u8 | 0 u16 | key_id u32 | crc32c(bytes 0..12) u32`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Frame {
    /// Bytes of the sealed body: nonce, ciphertext, tag.
    pub body_len: u32,
    pub kind: RecordKind,
    pub key_id: u32,
}

impl Frame {
    pub fn encode(&self) -> [u8; FRAME_BYTES] {
        let mut b = [0u8; FRAME_BYTES];
        b[0..4].copy_from_slice(&self.body_len.to_le_bytes());
        b[4] = self.kind.code();
        b[8..12].copy_from_slice(&self.key_id.to_le_bytes());
        let crc = crc32c::crc32c(&b[..12]);
        b[12..16].copy_from_slice(&crc.to_le_bytes());
        b
    }

    /// `None` when the frame is not a valid frame (torn, zeroed, or damaged).
    pub fn decode(b: &[u8]) -> Option<Frame> {
        if b.len() < FRAME_BYTES {
            return None;
        }
        let crc = u32::from_le_bytes(b[12..16].try_into().ok()?);
        if crc32c::crc32c(&b[..12]) != crc || b[5] != 0 || b[6] != 0 || b[7] != 0 {
            return None;
        }
        let body_len = u32::from_le_bytes(b[0..4].try_into().ok()?);
        if !((NONCE_BYTES + TAG_BYTES) as u32..=RECORD_BODY_BYTES_MAX).contains(&body_len) {
            return None;
        }
        Some(Frame {
            body_len,
            kind: RecordKind::from(b[4])?,
            key_id: u32::from_le_bytes(b[8..12].try_into().ok()?),
        })
    }

    /// Bytes of the whole record: frame and body.
    pub fn record_len(&self) -> u32 {
        FRAME_BYTES as u32 + self.body_len
    }
}

/// Where a record sits, and for a block record which block of which file at which
/// version it is: all of it bound into the seal.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Place {
    pub kind: RecordKind,
    pub key_id: u32,
    pub segment: u32,
    pub offset: u32,
    pub ino: Ino,
    pub index: u64,
    pub version: Version,
}

pub const AAD_BYTES: usize = VAULT_ID_BYTES + 1 + 4 + 4 + 4 + 8 + 8 + 8;

/// The associated data of a record's seal.
pub fn aad(vault_id: &[u8; VAULT_ID_BYTES], p: &Place) -> [u8; AAD_BYTES] {
    let mut a = [0u8; AAD_BYTES];
    a[..16].copy_from_slice(vault_id);
    a[16] = p.kind.code();
    a[17..21].copy_from_slice(&p.key_id.to_le_bytes());
    a[21..25].copy_from_slice(&p.segment.to_le_bytes());
    a[25..29].copy_from_slice(&p.offset.to_le_bytes());
    a[29..37].copy_from_slice(&p.ino.to_le_bytes());
    a[37..45].copy_from_slice(&p.index.to_le_bytes());
    a[45..53].copy_from_slice(&p.version.to_le_bytes());
    a
}

/// Where a block's record is: the pointer a commit stores.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct BlockPtr {
    pub segment: u32,
    pub offset: u32,
    /// Bytes of the whole record (frame and body).
    pub len: u32,
    /// The version whose commit wrote the block (bound into its seal).
    pub version: Version,
}

impl BlockPtr {
    fn encode(&self, w: &mut Writer) {
        w.u32(self.segment);
        w.u32(self.offset);
        w.u32(self.len);
        w.u64(self.version);
    }
    const BYTES: usize = 20;
    fn decode(r: &mut Reader) -> Result<BlockPtr> {
        let p = BlockPtr {
            segment: r.u32()?,
            offset: r.u32()?,
            len: r.u32()?,
            version: r.u64()?,
        };
        if p.len <= (FRAME_BYTES + NONCE_BYTES + TAG_BYTES) as u32
            || p.len > FRAME_BYTES as u32 + RECORD_BODY_BYTES_MAX
        {
            return Err(VaultError::format(
                "block pointer",
                format!("length {}", p.len),
            ));
        }
        Ok(p)
    }
}

/// Block plaintext codecs (first byte of an opened block record).
pub const BLOCK_RAW: u8 = 0;
pub const BLOCK_ZSTD: u8 = 1;
pub const BLOCK_LZ4: u8 = 2;

fn kind_code(k: FileKind) -> u8 {
    match k {
        FileKind::File => 1,
        FileKind::Dir => 2,
        FileKind::Symlink => 3,
    }
}

fn kind_from(c: u8) -> Result<FileKind> {
    Ok(match c {
        1 => FileKind::File,
        2 => FileKind::Dir,
        3 => FileKind::Symlink,
        _ => return Err(VaultError::format("inode", format!("kind {c}"))),
    })
}

/// An inode's metadata, as commits and checkpoints carry it. The directory entry is
/// `(parent, name)`: an inode has one name (no hard links).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InodeRec {
    pub ino: Ino,
    pub kind: FileKind,
    /// 0 for the root.
    pub parent: Ino,
    pub name: Vec<u8>,
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    /// Nanoseconds since the Unix epoch.
    pub atime: i64,
    pub mtime: i64,
    pub ctime: i64,
    pub size: u64,
    pub target: Vec<u8>,
}

impl InodeRec {
    const MIN_BYTES: usize = 8 + 1 + 8 + 2 + 12 + 24 + 8 + 2;

    fn encode(&self, w: &mut Writer) {
        w.u64(self.ino);
        w.u8(kind_code(self.kind));
        w.u64(self.parent);
        w.short_bytes(&self.name);
        w.u32(self.mode);
        w.u32(self.uid);
        w.u32(self.gid);
        w.i64(self.atime);
        w.i64(self.mtime);
        w.i64(self.ctime);
        w.u64(self.size);
        w.short_bytes(&self.target);
    }

    fn decode(r: &mut Reader) -> Result<InodeRec> {
        let rec = InodeRec {
            ino: r.u64()?,
            kind: kind_from(r.u8()?)?,
            parent: r.u64()?,
            name: r.short_bytes(NAME_BYTES_MAX)?.to_vec(),
            mode: r.u32()?,
            uid: r.u32()?,
            gid: r.u32()?,
            atime: r.i64()?,
            mtime: r.i64()?,
            ctime: r.i64()?,
            size: r.u64()?,
            target: r.short_bytes(SYMLINK_BYTES_MAX)?.to_vec(),
        };
        if rec.ino == 0 || rec.size > FILE_BYTES_MAX {
            return Err(VaultError::format(
                "inode",
                format!("ino {} size {}", rec.ino, rec.size),
            ));
        }
        Ok(rec)
    }
}

/// A change list: what one commit changed, or the difference between two states.
/// Applied in this order: removals, inode records (with their truncations), blocks.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Changes {
    pub removed: Vec<Ino>,
    /// An inode's new metadata, and, when it was truncated since the last commit, the
    /// number of blocks it kept (blocks from there on are dropped before `blocks` apply).
    pub inodes: Vec<(InodeRec, Option<u64>)>,
    pub blocks: Vec<(Ino, Vec<(u64, BlockPtr)>)>,
}

impl Changes {
    pub fn is_empty(&self) -> bool {
        self.removed.is_empty() && self.inodes.is_empty() && self.blocks.is_empty()
    }

    fn encode(&self, w: &mut Writer) {
        w.u32(self.removed.len() as u32);
        for ino in &self.removed {
            w.u64(*ino);
        }
        w.u32(self.inodes.len() as u32);
        for (rec, trunc) in &self.inodes {
            rec.encode(w);
            match trunc {
                Some(t) => {
                    w.u8(1);
                    w.u64(*t);
                }
                None => w.u8(0),
            }
        }
        w.u32(self.blocks.len() as u32);
        for (ino, list) in &self.blocks {
            w.u64(*ino);
            w.u32(list.len() as u32);
            for (idx, ptr) in list {
                w.u64(*idx);
                ptr.encode(w);
            }
        }
    }

    fn decode(r: &mut Reader) -> Result<Changes> {
        let n = r.count(8)?;
        let mut removed = Vec::with_capacity(n);
        for _ in 0..n {
            removed.push(r.u64()?);
        }
        let n = r.count(InodeRec::MIN_BYTES + 1)?;
        let mut inodes = Vec::with_capacity(n);
        for _ in 0..n {
            let rec = InodeRec::decode(r)?;
            let trunc = match r.u8()? {
                0 => None,
                1 => Some(r.u64()?),
                t => {
                    return Err(VaultError::format(
                        "changes",
                        format!("truncation flag {t}"),
                    ))
                }
            };
            inodes.push((rec, trunc));
        }
        let n = r.count(12)?;
        let mut blocks = Vec::with_capacity(n);
        for _ in 0..n {
            let ino = r.u64()?;
            let m = r.count(8 + BlockPtr::BYTES)?;
            let mut list = Vec::with_capacity(m);
            for _ in 0..m {
                list.push((r.u64()?, BlockPtr::decode(r)?));
            }
            blocks.push((ino, list));
        }
        Ok(Changes {
            removed,
            inodes,
            blocks,
        })
    }
}

/// A snapshot created or deleted by a commit.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SnapshotOp {
    /// Names the version this commit makes.
    Create(String),
    Delete(String),
}

/// What a commit record carries.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CommitEntry {
    pub version: Version,
    /// Nanoseconds since the Unix epoch.
    pub time: i64,
    pub writer_token: u64,
    /// SHA-256 of the previous commit's encoded entry (zeros before the first).
    pub prev_hash: [u8; 32],
    /// The active key and its seal count when this commit was made.
    pub key_id: u32,
    pub seals: u64,
    /// The sequence of the header this commit was made under: an older header found
    /// with it (a rollback of the header file) is refused on open.
    pub header_sequence: u64,
    pub next_ino: Ino,
    pub snapshot_ops: Vec<SnapshotOp>,
    pub changes: Changes,
}

fn encode_snapshot_ops(ops: &[SnapshotOp], w: &mut Writer) {
    w.u32(ops.len() as u32);
    for op in ops {
        let (code, name) = match op {
            SnapshotOp::Create(n) => (1, n),
            SnapshotOp::Delete(n) => (2, n),
        };
        w.u8(code);
        w.short_bytes(name.as_bytes());
    }
}

fn decode_name(r: &mut Reader) -> Result<String> {
    let b = r.short_bytes(SNAPSHOT_NAME_BYTES_MAX)?;
    String::from_utf8(b.to_vec()).map_err(|_| VaultError::format("snapshot", "name not UTF-8"))
}

fn decode_snapshot_ops(r: &mut Reader) -> Result<Vec<SnapshotOp>> {
    let n = r.count(3)?;
    let mut ops = Vec::with_capacity(n);
    for _ in 0..n {
        let code = r.u8()?;
        let name = decode_name(r)?;
        ops.push(match code {
            1 => SnapshotOp::Create(name),
            2 => SnapshotOp::Delete(name),
            c => return Err(VaultError::format("snapshot", format!("op {c}"))),
        });
    }
    Ok(ops)
}

impl CommitEntry {
    fn encode_into(&self, w: &mut Writer) {
        w.u64(self.version);
        w.i64(self.time);
        w.u64(self.writer_token);
        w.bytes(&self.prev_hash);
        w.u32(self.key_id);
        w.u64(self.seals);
        w.u64(self.header_sequence);
        w.u64(self.next_ino);
        encode_snapshot_ops(&self.snapshot_ops, w);
        self.changes.encode(w);
    }

    fn decode_from(r: &mut Reader) -> Result<CommitEntry> {
        Ok(CommitEntry {
            version: r.u64()?,
            time: r.i64()?,
            writer_token: r.u64()?,
            prev_hash: r.array()?,
            key_id: r.u32()?,
            seals: r.u64()?,
            header_sequence: r.u64()?,
            next_ino: r.u64()?,
            snapshot_ops: decode_snapshot_ops(r)?,
            changes: Changes::decode(r)?,
        })
    }
}

/// A snapshot a checkpoint keeps. Snapshots older than the checkpoint's base carry
/// their state as the difference from the base state.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CheckpointSnapshot {
    pub name: String,
    pub version: Version,
    pub time: i64,
    pub diff: Option<Changes>,
}

/// An inode of a checkpoint's base state, with its block pointers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CheckpointInode {
    pub rec: InodeRec,
    pub blocks: Vec<(u64, BlockPtr)>,
}

/// A commit carried by a checkpoint (moved off segments that gc or reseal deleted),
/// with the hash it had when first written.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CarriedCommit {
    pub hash: [u8; 32],
    pub entry: CommitEntry,
}

/// What a checkpoint record carries: the full state at `base`, the snapshots, and the
/// commits after `base` up to `carried_to` that it carries. Replay loads the latest
/// checkpoint and then applies the log's commits after `carried_to`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CheckpointEntry {
    pub base: Version,
    pub base_hash: [u8; 32],
    pub base_time: i64,
    pub base_writer_token: u64,
    pub next_ino: Ino,
    pub key_id: u32,
    pub seals: u64,
    pub inodes: Vec<CheckpointInode>,
    pub snapshots: Vec<CheckpointSnapshot>,
    pub carried: Vec<CarriedCommit>,
}

impl CheckpointEntry {
    pub fn carried_to(&self) -> Version {
        self.carried
            .last()
            .map(|c| c.entry.version)
            .unwrap_or(self.base)
    }

    fn encode_into(&self, w: &mut Writer) {
        w.u64(self.base);
        w.bytes(&self.base_hash);
        w.i64(self.base_time);
        w.u64(self.base_writer_token);
        w.u64(self.next_ino);
        w.u32(self.key_id);
        w.u64(self.seals);
        w.u32(self.inodes.len() as u32);
        for i in &self.inodes {
            i.rec.encode(w);
            w.u32(i.blocks.len() as u32);
            for (idx, p) in &i.blocks {
                w.u64(*idx);
                p.encode(w);
            }
        }
        w.u32(self.snapshots.len() as u32);
        for s in &self.snapshots {
            w.short_bytes(s.name.as_bytes());
            w.u64(s.version);
            w.i64(s.time);
            match &s.diff {
                Some(d) => {
                    w.u8(1);
                    d.encode(w);
                }
                None => w.u8(0),
            }
        }
        w.u32(self.carried.len() as u32);
        for c in &self.carried {
            w.bytes(&c.hash);
            c.entry.encode_into(w);
        }
    }

    fn decode_from(r: &mut Reader) -> Result<CheckpointEntry> {
        let base = r.u64()?;
        let base_hash = r.array()?;
        let base_time = r.i64()?;
        let base_writer_token = r.u64()?;
        let next_ino = r.u64()?;
        let key_id = r.u32()?;
        let seals = r.u64()?;
        let n = r.count(InodeRec::MIN_BYTES + 4)?;
        let mut inodes = Vec::with_capacity(n);
        for _ in 0..n {
            let rec = InodeRec::decode(r)?;
            let m = r.count(8 + BlockPtr::BYTES)?;
            let mut blocks = Vec::with_capacity(m);
            for _ in 0..m {
                blocks.push((r.u64()?, BlockPtr::decode(r)?));
            }
            inodes.push(CheckpointInode { rec, blocks });
        }
        let n = r.count(2 + 8 + 8 + 1)?;
        let mut snapshots = Vec::with_capacity(n);
        for _ in 0..n {
            let name = decode_name(r)?;
            let version = r.u64()?;
            let time = r.i64()?;
            let diff = match r.u8()? {
                0 => None,
                1 => Some(Changes::decode(r)?),
                c => return Err(VaultError::format("checkpoint", format!("diff flag {c}"))),
            };
            snapshots.push(CheckpointSnapshot {
                name,
                version,
                time,
                diff,
            });
        }
        let n = r.count(32 + 8)?;
        let mut carried = Vec::with_capacity(n);
        for _ in 0..n {
            carried.push(CarriedCommit {
                hash: r.array()?,
                entry: CommitEntry::decode_from(r)?,
            });
        }
        Ok(CheckpointEntry {
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
        })
    }
}

/// What commit and checkpoint records carry, reassembled from their chunks.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Entry {
    Commit(CommitEntry),
    Checkpoint(CheckpointEntry),
}

const ENTRY_COMMIT: u8 = 1;
const ENTRY_CHECKPOINT: u8 = 2;

impl Entry {
    /// The plain encoding (what a commit's hash covers).
    pub fn encode(&self) -> Vec<u8> {
        let mut w = Writer::with_capacity(256);
        match self {
            Entry::Commit(c) => {
                w.u8(ENTRY_COMMIT);
                c.encode_into(&mut w);
            }
            Entry::Checkpoint(c) => {
                w.u8(ENTRY_CHECKPOINT);
                c.encode_into(&mut w);
            }
        }
        w.buf
    }

    pub fn decode(b: &[u8]) -> Result<Entry> {
        let mut r = Reader::new(b, "entry");
        let e = match r.u8()? {
            ENTRY_COMMIT => Entry::Commit(CommitEntry::decode_from(&mut r)?),
            ENTRY_CHECKPOINT => Entry::Checkpoint(CheckpointEntry::decode_from(&mut r)?),
            t => return Err(VaultError::format("entry", format!("type {t}"))),
        };
        r.finish()?;
        Ok(e)
    }
}

/// Bytes of an encoded entry before compression. A checkpoint of 256 MiB holds about
/// ten million block pointers (40 GiB of 4 KiB blocks) or more inodes than
/// [`INODES_MAX`] makes practical; a hostile declared size beyond it is refused.
pub const ENTRY_BYTES_MAX: usize = 256 << 20;
/// Bytes of a chunk's clear-inside-the-seal header: entry kind, chunk index and count,
/// and (in chunk 0 only, but always present) the entry's stored codec and raw length.
pub const CHUNK_HEADER_BYTES: usize = 1 + 4 + 4 + 1 + 4;

/// The header inside each sealed chunk of an entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ChunkHeader {
    pub kind: RecordKind,
    pub index: u32,
    pub count: u32,
    /// 0: the entry is stored raw; 1: zstd.
    pub codec: u8,
    /// Bytes of the entry once decompressed.
    pub raw_len: u32,
}

impl ChunkHeader {
    pub fn encode(&self) -> [u8; CHUNK_HEADER_BYTES] {
        let mut b = [0u8; CHUNK_HEADER_BYTES];
        b[0] = self.kind.code();
        b[1..5].copy_from_slice(&self.index.to_le_bytes());
        b[5..9].copy_from_slice(&self.count.to_le_bytes());
        b[9] = self.codec;
        b[10..14].copy_from_slice(&self.raw_len.to_le_bytes());
        b
    }

    pub fn decode(b: &[u8]) -> Result<ChunkHeader> {
        let mut r = Reader::new(b, "chunk");
        let kind =
            RecordKind::from(r.u8()?).ok_or_else(|| VaultError::format("chunk", "bad kind"))?;
        let h = ChunkHeader {
            kind,
            index: r.u32()?,
            count: r.u32()?,
            codec: r.u8()?,
            raw_len: r.u32()?,
        };
        if h.count == 0 || h.count > COMMIT_CHUNKS_MAX || h.index >= h.count {
            return Err(VaultError::format(
                "chunk",
                format!("chunk {} of {}", h.index, h.count),
            ));
        }
        if h.codec > 1 || h.raw_len as usize > ENTRY_BYTES_MAX || kind == RecordKind::Block {
            return Err(VaultError::format("chunk", "bad codec, length or kind"));
        }
        Ok(h)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frame_round_trip_and_damage() {
        let f = Frame {
            body_len: 4096 + 28,
            kind: RecordKind::Block,
            key_id: 7,
        };
        let b = f.encode();
        assert_eq!(Frame::decode(&b), Some(f));
        for i in 0..FRAME_BYTES {
            let mut d = b;
            d[i] ^= 0x10;
            assert_eq!(Frame::decode(&d), None, "flip at {i}");
        }
        assert_eq!(Frame::decode(&[0u8; FRAME_BYTES]), None);
    }
}
