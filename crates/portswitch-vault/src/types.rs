//! The public value types of the API: attributes, options, reports.

use std::path::PathBuf;
use std::time::{Duration, SystemTime};

use crate::limits;

/// An inode number. Never reused within one vault.
pub type Ino = u64;
/// The root directory.
pub const ROOT: Ino = 1;
/// A commit's number: +1 per commit, from 1 (the empty root at creation).
pub type Version = u64;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum FileKind {
    File,
    Dir,
    Symlink,
}

/// What `getattr` answers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Attr {
    pub ino: Ino,
    pub kind: FileKind,
    /// Logical bytes (for a symlink: the target's length).
    pub size: u64,
    /// Permission bits only (the kind is `kind`).
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub atime: SystemTime,
    pub mtime: SystemTime,
    pub ctime: SystemTime,
    pub nlink: u32,
    /// 512-byte units of logical size, rounded up (what `st_blocks` answers).
    pub blocks: u64,
    /// The vault's block size.
    pub blksize: u32,
}

/// What `setattr` changes: `None` leaves a field as it is.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SetAttr {
    pub size: Option<u64>,
    pub mode: Option<u32>,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    pub atime: Option<SystemTime>,
    pub mtime: Option<SystemTime>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DirEntry {
    pub ino: Ino,
    pub name: Vec<u8>,
    pub kind: FileKind,
}

/// What `statfs` answers: the host file system's space, the vault's inode count.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct StatFs {
    pub blocks: u64,
    pub bfree: u64,
    pub bavail: u64,
    pub files: u64,
    pub ffree: u64,
    pub bsize: u32,
    pub frsize: u32,
    pub namelen: u32,
}

/// Which state of the vault a view, a restore or `at` refers to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum VersionSpec {
    /// The latest committed version.
    Latest,
    Version(Version),
    Snapshot(String),
    /// The latest version committed at or before this time.
    Time(SystemTime),
}

/// One version, as `versions(path)` and `history()` list it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VersionInfo {
    pub version: Version,
    pub time: SystemTime,
    /// The port-switch fencing token of the writer (0 when not used).
    pub writer_token: u64,
    /// For `versions(path)`: the path's size at this version, `None` when the path did
    /// not exist then (it was removed by this version). For `history()`: `None`.
    pub size: Option<u64>,
    /// A snapshot created by this commit, if any.
    pub snapshot: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SnapshotInfo {
    pub name: String,
    /// The version the snapshot names.
    pub version: Version,
    pub time: SystemTime,
}

/// The head of the commit chain: keep it somewhere else and give it back in
/// [`OpenOptions::expect_head`] to detect a whole-vault rollback.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Head {
    pub version: Version,
    /// SHA-256 of the head commit's sealed record (the chain links these).
    pub hash: [u8; 32],
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum Cipher {
    #[default]
    Aes256Gcm,
    ChaCha20Poly1305,
    Sm4Gcm,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum Compression {
    None,
    /// zstd at `CreateOptions::zstd_level` (1 by default).
    #[default]
    Zstd,
    Lz4,
}

/// Argon2id parameters of the passphrase.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KdfParams {
    pub memory_kib: u32,
    pub passes: u32,
    pub lanes: u32,
}

impl Default for KdfParams {
    fn default() -> Self {
        KdfParams {
            memory_kib: limits::KDF_MEMORY_KIB_DEFAULT,
            passes: limits::KDF_PASSES_DEFAULT,
            lanes: limits::KDF_LANES_DEFAULT,
        }
    }
}

impl KdfParams {
    /// Cheap parameters for tests only: a vault made with them falls to a brute-force
    /// search of its passphrase far sooner.
    pub fn danger_insecure_fast() -> KdfParams {
        KdfParams {
            memory_kib: 64,
            passes: 1,
            lanes: 1,
        }
    }
}

/// Reed-Solomon parity of closed segments: stripes of `data_shards` x 64 KiB, each with
/// `parity_shards` parity shards; any `parity_shards` damaged shards of a stripe are
/// rebuilt.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Parity {
    pub data_shards: u8,
    pub parity_shards: u8,
}

impl Default for Parity {
    fn default() -> Self {
        Parity {
            data_shards: limits::PARITY_DATA_SHARDS_DEFAULT,
            parity_shards: limits::PARITY_SHARDS_DEFAULT,
        }
    }
}

#[derive(Clone, Debug)]
pub struct CreateOptions {
    pub cipher: Cipher,
    pub compression: Compression,
    pub zstd_level: i32,
    /// Plaintext bytes per block: a power of two, 4 KiB..1 MiB.
    pub block_bytes: u32,
    pub segment_bytes: u64,
    pub kdf: KdfParams,
    /// `None`: no parity files.
    pub parity: Option<Parity>,
    /// Everything else as when opening (mirror, cache, ...).
    pub open: OpenOptions,
}

impl Default for CreateOptions {
    fn default() -> Self {
        CreateOptions {
            cipher: Cipher::default(),
            compression: Compression::default(),
            zstd_level: 1,
            block_bytes: limits::BLOCK_BYTES_DEFAULT,
            segment_bytes: limits::SEGMENT_BYTES_DEFAULT,
            kdf: KdfParams::default(),
            parity: Some(Parity::default()),
            open: OpenOptions::default(),
        }
    }
}

#[derive(Clone, Debug)]
pub struct OpenOptions {
    /// A second directory written synchronously with the same bytes at the same offsets.
    /// An empty or missing directory is filled from the vault on open.
    pub mirror: Option<PathBuf>,
    /// Opens without the write lock; every change answers `ReadOnly`. A read-only open
    /// repairs nothing on disk and truncates no torn tail (it ignores it).
    pub read_only: bool,
    /// Bytes of decrypted blocks kept in memory.
    pub cache_bytes: u64,
    /// Uncommitted block bytes held in memory before an automatic commit.
    pub dirty_bytes: u64,
    /// Refuse to open unless the commit chain reaches this head (detects a rollback of
    /// the whole vault to an older copy).
    pub expect_head: Option<Head>,
    /// The writer's port-switch fencing token, recorded in each commit (0: none, not
    /// fenced). Opening for writing with a token lower than the highest one recorded
    /// in the log is refused with [`crate::VaultError::Fenced`].
    pub writer_token: u64,
    /// The writer's claim from the port switch ([`crate::fencing`]): its token is the
    /// writer token (set `writer_token` to 0 or the same value), and once it is revoked
    /// every change and commit fails with [`crate::VaultError::FenceLost`].
    pub fence: Option<crate::fencing::Fence>,
}

impl Default for OpenOptions {
    fn default() -> Self {
        OpenOptions {
            mirror: None,
            read_only: false,
            cache_bytes: limits::CACHE_BYTES_DEFAULT,
            dirty_bytes: limits::DIRTY_BYTES_DEFAULT,
            expect_head: None,
            writer_token: 0,
            fence: None,
        }
    }
}

/// Which versions `gc` keeps. A version is kept when it is among the last `keep_last`,
/// or committed within `keep_within` of now, or named by a snapshot. `None` in both keeps
/// everything (gc then only compacts).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Retention {
    pub keep_last: Option<u64>,
    pub keep_within: Option<Duration>,
}

/// One damaged record `check` found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Damage {
    pub segment: u32,
    pub offset: u64,
    /// "block", "commit", "checkpoint", "frame", "parity", "mirror".
    pub what: &'static str,
    /// Which copy: "primary" or "mirror".
    pub copy: &'static str,
    pub repaired: bool,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CheckReport {
    pub segments: u64,
    pub records: u64,
    pub blocks: u64,
    pub commits: u64,
    pub bytes: u64,
    /// Referenced blocks that are live in the current version and in retained versions.
    pub live_blocks: u64,
    pub damaged: Vec<Damage>,
    pub repaired: u64,
    pub unrepaired: u64,
    /// Parity files checked against their segments.
    pub parity_checked: u64,
    pub mirror_checked: bool,
    /// Bytes after the last complete commit in the segments not yet closed (a write
    /// torn by a crash, or blocks never committed) that a read-only open left in place
    /// and ignored: not damage; the next writable open cuts them.
    pub torn_tail_bytes: u64,
}

impl CheckReport {
    /// Nothing damaged, or everything damaged was repaired.
    pub fn is_clean(&self) -> bool {
        self.unrepaired == 0
    }
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct BackupReport {
    /// Segment bytes copied by this call (the incremental part).
    pub bytes_shipped: u64,
    /// Bytes read back and compared (SHA-256) with the source.
    pub bytes_verified: u64,
    pub segments_shipped: u64,
    /// Segments the backup held that the vault no longer has (removed by gc).
    pub segments_removed: u64,
    pub header_shipped: bool,
    /// The version the backup now holds.
    pub version: Version,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct GcReport {
    /// The oldest version still readable by `at` (older ones are gone, except snapshots).
    pub horizon: Version,
    pub versions_dropped: u64,
    pub segments_deleted: u64,
    pub records_copied: u64,
    pub bytes_copied: u64,
    pub bytes_freed: u64,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ResealReport {
    pub records_resealed: u64,
    pub keys_dropped: u64,
    pub segments_deleted: u64,
}

/// A point-in-time summary (the metrics hold the counters too).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    pub version: Version,
    pub files: u64,
    pub dirs: u64,
    pub symlinks: u64,
    /// Sum of file sizes.
    pub logical_bytes: u64,
    /// Bytes of segment (and parity) files in the vault directory.
    pub disk_bytes: u64,
    pub segments: u64,
    pub dirty_bytes: u64,
    pub cache_bytes: u64,
    pub cache_hits: u64,
    pub cache_misses: u64,
    pub reads: u64,
    pub writes: u64,
    pub commits: u64,
    pub repairs: u64,
    pub auth_failures: u64,
    pub active_key: u32,
    pub keys: u64,
    pub seals: u64,
    pub horizon: Version,
}
