//! Every limit of the vault, named once. Unit and qualifier last. Relations between them
//! are checked at compile time below, with the reason.

/// Bytes of one name in a directory (POSIX NAME_MAX).
pub const NAME_BYTES_MAX: usize = 255;
/// Bytes of a symbolic link's target (POSIX PATH_MAX).
pub const SYMLINK_BYTES_MAX: usize = 4096;
/// Bytes of a snapshot's name.
pub const SNAPSHOT_NAME_BYTES_MAX: usize = 255;
/// Bytes of one file: 2^48 (256 TiB). Block indexes stay below 2^36 even at 4 KiB.
pub const FILE_BYTES_MAX: u64 = 1 << 48;

/// Plaintext bytes of a block: a power of two in this range.
pub const BLOCK_BYTES_MIN: u32 = 4 << 10;
pub const BLOCK_BYTES_MAX: u32 = 1 << 20;
pub const BLOCK_BYTES_DEFAULT: u32 = 4 << 10;

/// Bytes of a segment before it is closed and a new one begun.
/// A soft cap: a record that does not fit in what is left begins a new segment, and
/// one larger than the cap (a big commit chunk) makes its segment exceed it once.
pub const SEGMENT_BYTES_MIN: u64 = 4 << 20;
pub const SEGMENT_BYTES_MAX: u64 = 1 << 30;
pub const SEGMENT_BYTES_DEFAULT: u64 = 64 << 20;
// A block record (plus a frame) fits in an empty segment of the smallest size.
const _: () = assert!(SEGMENT_BYTES_MIN >= 2 * BLOCK_BYTES_MAX as u64);

/// Bytes of a record's clear frame.
pub const FRAME_BYTES: usize = 16;
/// AEAD nonce and tag bytes (all three ciphers).
pub const NONCE_BYTES: usize = 12;
pub const TAG_BYTES: usize = 16;
/// Body bytes of one record as declared by its frame. A hostile length beyond this is
/// refused before anything is allocated: 16 MiB holds the largest block (1 MiB) with room,
/// and a commit or checkpoint chunk is cut to [`COMMIT_BODY_BYTES_MAX`].
pub const RECORD_BODY_BYTES_MAX: u32 = 16 << 20;
/// Plaintext bytes of one commit or checkpoint record: larger change lists are split over
/// several chunk records of one commit.
pub const COMMIT_BODY_BYTES_MAX: usize = 8 << 20;
const _: () = assert!(
    (COMMIT_BODY_BYTES_MAX + NONCE_BYTES + TAG_BYTES) as u64 <= RECORD_BODY_BYTES_MAX as u64
);
const _: () = assert!(
    (BLOCK_BYTES_MAX as usize + NONCE_BYTES + TAG_BYTES + 1) as u64 <= RECORD_BODY_BYTES_MAX as u64
);
/// Chunk records of one commit (a bound on one commit's change list: 256 x 8 MiB).
pub const COMMIT_CHUNKS_MAX: u32 = 256;

/// Bytes of the VAULT header file.
pub const HEADER_BYTES_MAX: usize = 64 << 10;
/// Data keys the header holds at once (active plus old ones awaiting a reseal).
pub const KEYS_MAX: usize = 64;
/// Seals under one data key before it is rotated automatically. Random 96-bit nonces
/// stay within NIST SP 800-38D's 2^-32 collision bound up to 2^32 seals; we stop at 2^30
/// so that seals lost from the count by a crash (at most the uncommitted ones) never
/// matter.
pub const SEALS_PER_KEY_MAX: u64 = 1 << 30;

/// Argon2id defaults: 64 MiB, 3 passes, 1 lane (the RFC 9106 second recommendation).
pub const KDF_MEMORY_KIB_DEFAULT: u32 = 64 << 10;
pub const KDF_PASSES_DEFAULT: u32 = 3;
pub const KDF_LANES_DEFAULT: u32 = 1;
/// A hostile header must not make open allocate or spin for ever: 4 GiB, 64 passes.
pub const KDF_MEMORY_KIB_MAX: u32 = 4 << 20;
pub const KDF_PASSES_MAX: u32 = 64;
pub const KDF_LANES_MAX: u32 = 64;

/// Decrypted blocks kept in memory (bounded LRU), bytes.
pub const CACHE_BYTES_DEFAULT: u64 = 64 << 20;
/// Uncommitted (dirty) block bytes held in memory before an automatic commit.
pub const DIRTY_BYTES_DEFAULT: u64 = 64 << 20;
pub const DIRTY_BYTES_MIN: u64 = 1 << 20;
const _: () = assert!(DIRTY_BYTES_MIN >= BLOCK_BYTES_MAX as u64);

/// Inodes of one vault (a bound on the in-memory index).
pub const INODES_MAX: u64 = 1 << 32;
/// Entries of one directory.
pub const DIR_ENTRIES_MAX: usize = 1 << 24;
/// Symlinks followed while resolving a path helper's path.
pub const SYMLINK_HOPS_MAX: usize = 40;

/// Reed-Solomon stripes: `data` shards of this many bytes each, plus `parity` shards.
pub const PARITY_SHARD_BYTES: usize = 64 << 10;
pub const PARITY_DATA_SHARDS_DEFAULT: u8 = 16;
pub const PARITY_SHARDS_DEFAULT: u8 = 2;
pub const PARITY_DATA_SHARDS_MAX: u8 = 64;
pub const PARITY_SHARDS_MAX: u8 = 32;
// reed-solomon-simd wants even shard sizes.
const _: () = assert!(PARITY_SHARD_BYTES.is_multiple_of(64));
