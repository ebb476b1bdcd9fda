//! The shared core behind [`crate::Vault`] and [`crate::View`]: the live state, the
//! log writer (block records, commit and checkpoint entries, segment rolls with
//! parity), and reading records back with verification and repair.
//!
//! Locks, always taken in this order: `log` (one writer of the log at a time: commits,
//! gc, reseal, backup, check), then `state` (the live tree; held only for in-memory
//! work, never across disk I/O or crypto on the hot paths), then `header`. Readers
//! take `state` briefly and the cache's shard locks.

use std::cell::RefCell;
use std::collections::{BTreeMap, HashSet};
use std::fs::File;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};

use zeroize::Zeroizing;

use crate::cache::BlockCache;
use crate::compress::{
    compress_entry, decode_block, decompress_entry, encode_block, BLOCK_OVERHEAD_BYTES,
};
use crate::crypto::{sha256, Aead};
use crate::error::{Result, VaultError};
use crate::format::{
    BlockPtr, Changes, ChunkHeader, CommitEntry, Entry, HeaderClear, KeyTable, Place, RecordKind,
    SnapshotOp, CHUNK_HEADER_BYTES, KEY_BYTES,
};
use crate::limits::*;
use crate::metrics::Metrics;
use crate::parity;
use crate::record::{Crypt, PLAIN_START, RECORD_OVERHEAD_BYTES};
use crate::store::{Appender, Store};
use crate::tree::{now_ns, Map, Tree};
use crate::types::{Compression, Head, Ino, Parity, SnapshotInfo, Version};

/// Where one record is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct RecLoc {
    pub seg: u32,
    pub off: u32,
    pub len: u32,
}

/// Where a retained version's change list can be read from.
#[derive(Clone, Debug)]
pub(crate) enum EntryLoc {
    /// The base state of the latest checkpoint.
    Base,
    /// A commit the latest checkpoint carries.
    Carried,
    /// A commit entry in the log.
    Log(Vec<RecLoc>),
}

#[derive(Clone, Debug)]
pub(crate) struct CommitInfo {
    pub version: Version,
    pub time: i64,
    pub writer_token: u64,
    pub hash: [u8; 32],
    pub snapshot: Option<String>,
    pub loc: EntryLoc,
}

/// The live state: the tree as of the head plus everything not yet committed.
pub(crate) struct State {
    /// Metadata is live (uncommitted changes included); block pointers are committed
    /// ones. Dirty blocks override them.
    pub tree: Tree,
    pub dirty: Map<Ino, BTreeMap<u64, Arc<Vec<u8>>>>,
    pub dirty_bytes: u64,
    /// Inodes whose metadata changed (or that were removed) since the last commit.
    pub changed: HashSet<Ino>,
    /// Blocks an inode kept at its smallest truncation since the last commit.
    pub trunc: Map<Ino, u64>,
    pub head: Head,
    /// Versions readable by `at`: the checkpoint's base first, then every later one.
    pub history: Vec<CommitInfo>,
    /// Every snapshot, by name.
    pub snapshots: BTreeMap<String, SnapshotInfo>,
    /// The chunk records of the latest checkpoint.
    pub checkpoint: Vec<RecLoc>,
}

impl State {
    pub fn base(&self) -> Version {
        self.history.first().map(|c| c.version).unwrap_or(0)
    }
}

/// The writer's side of the log.
pub(crate) struct Log {
    /// `None` when the vault is read-only.
    pub app: Option<Appender>,
    pub key_id: u32,
    pub aead: Option<Arc<Aead>>,
    /// Seals made under the active key.
    pub seals: u64,
    /// Set when a commit failed half-way: the in-memory state no longer matches the
    /// log, so every later change is refused until the vault is reopened.
    pub poisoned: Option<String>,
    /// The last of the segments being closed in the background (each closer waits
    /// for the one before), and how many are pending.
    pub closing: Option<std::thread::JoinHandle<Result<()>>>,
    pub closing_pending: usize,
}

pub(crate) struct HeaderState {
    pub clear: HeaderClear,
    pub table: KeyTable,
    pub kek: Zeroizing<[u8; KEY_BYTES]>,
}

pub(crate) struct Inner {
    pub dir: PathBuf,
    pub crypt: Crypt,
    pub store: Store,
    pub cache: BlockCache,
    pub metrics: Metrics,
    pub block_bytes: u32,
    pub compression: Compression,
    pub zstd_level: i32,
    pub segment_bytes: u64,
    pub parity: Option<Parity>,
    pub read_only: bool,
    pub dirty_limit: u64,
    pub writer_token: u64,
    /// The writer's claim from the port switch; revoked: no more changes or commits.
    pub fence: Option<crate::fencing::Fence>,
    /// The highest writer token recorded in the log (replayed, then each commit's).
    pub max_token: std::sync::atomic::AtomicU64,
    /// The sequence of the header on disk (recorded in each commit: a header older
    /// than a commit that names a newer one is refused on open).
    pub header_sequence: std::sync::atomic::AtomicU64,
    /// Read-only opens: bytes after the last complete entry that the open ignored (a
    /// torn or uncommitted tail, cut by the next writable open).
    pub torn_tail_bytes: u64,
    pub header: Mutex<HeaderState>,
    pub state: Mutex<State>,
    pub log: Mutex<Log>,
    /// Wakes the continuous backup thread after each commit.
    pub backup_tx: Mutex<Option<std::sync::mpsc::SyncSender<()>>>,
    /// A copy on another node (a backup server) that damaged records are repaired
    /// from when neither the mirror nor the parity has a good copy.
    pub remote: Mutex<Option<Box<dyn crate::target::BackupTarget>>>,
    /// Held (flock'd) for as long as the vault is open for writing.
    pub _lock: Option<File>,
}

/// Further changes a commit computes from the live tree under the state lock (a
/// restore).
pub(crate) type ExtraChanges<'a> = &'a mut dyn FnMut(&Tree) -> Result<Changes>;

/// Blocks in a row that did not shrink before compression is skipped for a while, and
/// how often it is tried again then.
const COMPRESS_FAILS_BEFORE_SKIP: u32 = 4;
const COMPRESS_PROBE_EVERY: u32 = 16;

/// Bytes one `pread` of a run of block records may cover.
const READ_RUN_BYTES_MAX: u64 = 1 << 20;

/// What a read of one block comes from.
pub(crate) enum Source {
    Dirty(Arc<Vec<u8>>),
    Ptr(BlockPtr),
    Hole,
}

/// A block waiting to be sealed: which block of which inode, and its plaintext.
pub(crate) struct BlockJob {
    pub ino: Ino,
    pub index: u64,
    pub data: Arc<Vec<u8>>,
}

thread_local! {
    static SCRATCH: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
    /// Records being built, sealed and written by one thread of `write_blocks`.
    static STAGE: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

/// Bytes of records one thread of `write_blocks` builds before writing them: small
/// enough to stay in the CPU's cache between sealing and the write's copy.
const STAGE_BYTES: usize = 1 << 20;

/// The largest raw commit entry ([`crate::format::ENTRY_BYTES_MAX`]; tests lower it).
fn commit_bytes_max() -> usize {
    #[cfg(test)]
    if let Some(n) = TEST_COMMIT_BYTES_MAX.with(|c| c.get()) {
        return n;
    }
    crate::format::ENTRY_BYTES_MAX
}

#[cfg(test)]
thread_local! {
    /// Test override of the commit entry limit (256 MiB of pointers is too slow to fill).
    pub(crate) static TEST_COMMIT_BYTES_MAX: std::cell::Cell<Option<usize>> =
        const { std::cell::Cell::new(None) };
}

/// A commit's block pointers, grouped by inode (jobs are sorted by inode).
fn group_ptrs(jobs: &[BlockJob], ptrs: &[BlockPtr]) -> Vec<(Ino, Vec<(u64, BlockPtr)>)> {
    let mut groups: Vec<(Ino, Vec<(u64, BlockPtr)>)> = Vec::new();
    for (job, ptr) in jobs.iter().zip(ptrs) {
        match groups.last_mut() {
            Some((ino, list)) if *ino == job.ino => list.push((job.index, *ptr)),
            _ => groups.push((job.ino, vec![(job.index, *ptr)])),
        }
    }
    groups
}

/// Runs `f` over contiguous chunks of `items`, one per thread (up to four), when there
/// are at least `min` items to pay for the spawns.
fn par_chunks<T: Send>(items: &mut [T], min: usize, f: impl Fn(&mut [T]) + Sync) {
    let threads = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
        .min(4);
    if items.len() < min.max(2) || threads < 2 {
        f(items);
        return;
    }
    let per = items.len().div_ceil(threads);
    std::thread::scope(|s| {
        let f = &f;
        let mut parts = items.chunks_mut(per);
        let first = parts.next();
        for part in parts {
            s.spawn(move || f(part));
        }
        if let Some(p) = first {
            f(p);
        }
    });
}

impl Inner {
    /// `Ok` unless the writer's fence was revoked (its port lost).
    pub fn fence_check(&self) -> Result<()> {
        match &self.fence {
            Some(f) => f.check(),
            None => Ok(()),
        }
    }

    pub fn lock_state(&self) -> MutexGuard<'_, State> {
        self.state.lock().expect("state lock poisoned")
    }

    pub fn lock_log(&self) -> MutexGuard<'_, Log> {
        self.log.lock().expect("log lock poisoned")
    }

    pub fn corrupt(what: &'static str, loc: RecLoc) -> VaultError {
        VaultError::Corrupt {
            what,
            segment: loc.seg,
            offset: loc.off as u64,
        }
    }

    // ---- reading records ------------------------------------------------------------

    /// Reads the record at `loc`, opens it as `kind` at `place`, repairs it from the
    /// mirror or parity when it does not open, and hands the plaintext to `f`.
    pub fn with_record<T>(
        &self,
        kind: RecordKind,
        place: &Place,
        loc: RecLoc,
        f: impl FnOnce(&[u8]) -> Result<T>,
    ) -> Result<T> {
        let mut own = Vec::new();
        SCRATCH.with(|s| {
            let mut guard = s.try_borrow_mut();
            let buf: &mut Vec<u8> = match guard.as_mut() {
                Ok(b) => b,
                Err(_) => &mut own,
            };
            buf.resize(loc.len as usize, 0);
            match self.store.read(loc.seg, loc.off as u64, buf) {
                Ok(()) => {
                    if let Ok(r) = self.crypt.open(kind, place, buf) {
                        return f(&buf[r]);
                    }
                }
                // A segment a gc removed after the caller planned this read is not
                // damage: the caller plans again (and must not count or log it).
                Err(e) if e.is_missing_segment() => return Err(e),
                // Any other read error (a short read, EIO from a bad sector, ...) is
                // damage to this copy: the mirror or parity may hold a good one.
                Err(e) => {
                    tracing::warn!(
                        segment = loc.seg,
                        offset = loc.off,
                        error = %e,
                        "vault: read of a record failed"
                    );
                }
            }
            self.metrics.auth_failures.inc();
            match self.repair(kind, place, loc)? {
                Some(mut good) => {
                    let r = self
                        .crypt
                        .open(kind, place, &mut good)
                        .map_err(|_| Self::corrupt(what_of(kind), loc))?;
                    f(&good[r])
                }
                None => Err(Self::corrupt(what_of(kind), loc)),
            }
        })
    }

    /// Writes a good copy back in place. A failure (the sector that failed to read may
    /// fail to write too) is logged: the read still gets the good copy.
    fn write_back_or_warn(&self, loc: RecLoc, bytes: &[u8], to_mirror: bool) {
        if let Err(e) = self
            .store
            .write_back(loc.seg, loc.off as u64, bytes, to_mirror)
        {
            tracing::warn!(
                segment = loc.seg,
                offset = loc.off,
                mirror = to_mirror,
                error = %e,
                "vault: writing a repaired record back failed"
            );
        }
    }

    /// Finds a good copy of a damaged record: the mirror's, then one rebuilt from the
    /// segment's parity. A copy counts only once its seal opens; it is written back in
    /// place (primary and, when its copy is bad too, mirror), logged and counted.
    pub fn repair(&self, kind: RecordKind, place: &Place, loc: RecLoc) -> Result<Option<Vec<u8>>> {
        let len = loc.len as usize;
        if self.store.mirror.is_some() {
            let mut m = vec![0u8; len];
            if self
                .store
                .read_mirror(loc.seg, loc.off as u64, &mut m)
                .is_some()
            {
                // The mirror's own copy is good: only the primary is written back.
                let how = "vault: damaged record repaired from the mirror";
                if let Some(m) = self.accept_copy(kind, place, loc, m, false, how) {
                    self.metrics.repairs_mirror.inc();
                    return Ok(Some(m));
                }
            }
        }
        if parity::exists(&self.dir, loc.seg) {
            if let Some(b) = parity::rebuild(&self.dir, loc.seg, loc.off as u64, len)? {
                let how = "vault: damaged record rebuilt from parity";
                if let Some(b) = self.accept_copy(kind, place, loc, b, true, how) {
                    self.metrics.repairs_parity.inc();
                    return Ok(Some(b));
                }
            }
        }
        if let Some(b) = self.read_remote(loc) {
            let how = "vault: damaged record repaired from the copy on another node";
            if let Some(b) = self.accept_copy(kind, place, loc, b, true, how) {
                self.metrics.repairs_remote.inc();
                return Ok(Some(b));
            }
        }
        tracing::error!(
            segment = loc.seg,
            offset = loc.off,
            what = what_of(kind),
            "vault: damaged record with no good copy"
        );
        self.metrics.unrepaired.inc();
        Ok(None)
    }

    /// A candidate copy of the damaged record at `loc`: kept only if its seal opens at
    /// the record's place; then written back in place (the primary, and the mirror
    /// too with `to_mirror`, unless read-only) and logged as `how`.
    fn accept_copy(
        &self,
        kind: RecordKind,
        place: &Place,
        loc: RecLoc,
        bytes: Vec<u8>,
        to_mirror: bool,
        how: &'static str,
    ) -> Option<Vec<u8>> {
        let mut t = bytes.clone();
        self.crypt.open(kind, place, &mut t).ok()?;
        if !self.read_only {
            self.write_back_or_warn(loc, &bytes, false);
            if to_mirror && self.store.mirror.is_some() {
                self.write_back_or_warn(loc, &bytes, true);
            }
        }
        tracing::warn!(
            segment = loc.seg,
            offset = loc.off,
            what = what_of(kind),
            "{how}"
        );
        Some(bytes)
    }

    /// The bytes at `loc` in the remote copy, if one is set and holds them. A backup
    /// is a prefix of the log, so a record it holds has the same bytes at the same
    /// place; the caller still opens the seal before trusting them.
    fn read_remote(&self, loc: RecLoc) -> Option<Vec<u8>> {
        let mut g = self.remote.lock().unwrap_or_else(|p| p.into_inner());
        let t = g.as_mut()?;
        let r = t.begin_read(&self.crypt.vault_id).and_then(|()| {
            // In pieces a target serves (an entry record may be up to 8 MiB).
            let mut out = Vec::with_capacity(loc.len as usize);
            while out.len() < loc.len as usize {
                let n = (loc.len as usize - out.len()).min(crate::target::TARGET_IO_BYTES_MAX);
                out.extend(t.read(
                    crate::target::TargetFile::Segment(loc.seg),
                    loc.off as u64 + out.len() as u64,
                    n,
                )?);
            }
            Ok(out)
        });
        t.end();
        match r {
            Ok(b) => Some(b),
            Err(e) => {
                tracing::warn!(
                    segment = loc.seg,
                    offset = loc.off,
                    target = %t.describe(),
                    error = %e,
                    "vault: the copy on another node could not be read"
                );
                None
            }
        }
    }

    /// A block's plaintext (its logical bytes), from the cache or from disk.
    pub fn fetch_block(&self, ino: Ino, index: u64, ptr: &BlockPtr) -> Result<Arc<Vec<u8>>> {
        let key = (ptr.segment, ptr.offset);
        if let Some(b) = self.cache.get(key) {
            self.metrics.cache_hits.inc();
            return Ok(b);
        }
        self.metrics.cache_misses.inc();
        let place = Place {
            kind: RecordKind::Block,
            key_id: 0,
            segment: ptr.segment,
            offset: ptr.offset,
            ino,
            index,
            version: ptr.version,
        };
        let loc = RecLoc {
            seg: ptr.segment,
            off: ptr.offset,
            len: ptr.len,
        };
        let bs = self.block_bytes as usize;
        let data = self.with_record(RecordKind::Block, &place, loc, |plain| {
            let mut out = vec![0u8; bs];
            let n = decode_block(plain, &mut out).map_err(|_| Self::corrupt("block", loc))?;
            out.truncate(n);
            Ok(out)
        })?;
        self.metrics.blocks_opened.inc();
        let data = Arc::new(data);
        self.cache.insert(key, data.clone());
        Ok(data)
    }

    /// Fills `out` (the bytes of a file from `offset`) from block sources, reading runs
    /// of uncached records that sit back to back on disk with one `pread` each.
    pub fn read_plan(
        &self,
        ino: Ino,
        offset: u64,
        plan: &[(u64, Source)],
        out: &mut [u8],
    ) -> Result<()> {
        let bs = self.block_bytes as u64;
        let n = out.len() as u64;
        let dst_range = |idx: u64| {
            let bstart = idx * bs;
            let from = offset.max(bstart);
            let to = (offset + n).min(bstart + bs);
            (
                (from - offset) as usize..(to - offset) as usize,
                (from - bstart) as usize,
            )
        };
        let copy = |out: &mut [u8], idx: u64, data: &[u8]| {
            let (r, in_block) = dst_range(idx);
            let dst = &mut out[r];
            let have = data.len().saturating_sub(in_block).min(dst.len());
            dst[..have].copy_from_slice(&data[in_block..in_block + have]);
            dst[have..].fill(0);
        };
        let mut i = 0;
        while i < plan.len() {
            let (idx, src) = &plan[i];
            match src {
                Source::Hole => {
                    let (r, _) = dst_range(*idx);
                    out[r].fill(0);
                    i += 1;
                }
                Source::Dirty(b) => {
                    copy(out, *idx, b);
                    i += 1;
                }
                Source::Ptr(p) => {
                    if let Some(b) = self.cache.get((p.segment, p.offset)) {
                        self.metrics.cache_hits.inc();
                        copy(out, *idx, &b);
                        i += 1;
                        continue;
                    }
                    // A run of uncached records, back to back in one segment.
                    let mut j = i + 1;
                    let mut end = p.offset as u64 + p.len as u64;
                    while j < plan.len() && end - (p.offset as u64) < READ_RUN_BYTES_MAX {
                        match &plan[j].1 {
                            Source::Ptr(q)
                                if q.segment == p.segment
                                    && q.offset as u64 == end
                                    && self.cache.get((q.segment, q.offset)).is_none() =>
                            {
                                end += q.len as u64;
                                j += 1;
                            }
                            _ => break,
                        }
                    }
                    if j == i + 1 {
                        let b = self.fetch_block(ino, *idx, p)?;
                        copy(out, *idx, &b);
                        i += 1;
                        continue;
                    }
                    let mut run = vec![0u8; (end - p.offset as u64) as usize];
                    match self.store.read(p.segment, p.offset as u64, &mut run) {
                        Ok(()) => {}
                        Err(e) if e.is_missing_segment() => return Err(e),
                        // The run read failed (EIO, short): one record at a time, each
                        // through the repairing single-record path.
                        Err(_) => {
                            for (idx, src) in &plan[i..j] {
                                let Source::Ptr(q) = src else {
                                    unreachable!("run holds pointers")
                                };
                                let data = self.fetch_block(ino, *idx, q)?;
                                copy(out, *idx, &data);
                            }
                            i = j;
                            continue;
                        }
                    }
                    let mut at = 0usize;
                    for (idx, src) in &plan[i..j] {
                        let Source::Ptr(q) = src else {
                            unreachable!("run holds pointers")
                        };
                        let rec = &mut run[at..at + q.len as usize];
                        at += q.len as usize;
                        let place = Place {
                            kind: RecordKind::Block,
                            key_id: 0,
                            segment: q.segment,
                            offset: q.offset,
                            ino,
                            index: *idx,
                            version: q.version,
                        };
                        // A run is a sequential read: blocks it covers whole are decoded
                        // straight into `out` and not cached (a scan would only evict
                        // what random readers reuse); partial ones go through a buffer.
                        let (range, in_block) = dst_range(*idx);
                        let whole = in_block == 0 && range.len() as u64 == bs;
                        let opened = match self.crypt.open(RecordKind::Block, &place, rec) {
                            Ok(r) if whole => decode_block(&rec[r], &mut out[range.clone()])
                                .ok()
                                .map(|n| out[range.start + n..range.end].fill(0)),
                            Ok(r) => {
                                let mut data = vec![0u8; bs as usize];
                                decode_block(&rec[r], &mut data).ok().map(|n| {
                                    data.truncate(n);
                                    copy(out, *idx, &data)
                                })
                            }
                            Err(_) => None,
                        };
                        match opened {
                            Some(()) => {
                                self.metrics.cache_misses.inc();
                                self.metrics.blocks_opened.inc();
                            }
                            // Damaged: the single-record path repairs (or fails typed).
                            None => {
                                let data = self.fetch_block(ino, *idx, q)?;
                                copy(out, *idx, &data);
                            }
                        }
                    }
                    i = j;
                }
            }
        }
        Ok(())
    }

    /// Reads and decodes a commit or checkpoint entry from its chunk records.
    pub fn read_entry(&self, kind: RecordKind, locs: &[RecLoc]) -> Result<(Entry, [u8; 32])> {
        let mut stored = Vec::new();
        let mut first: Option<ChunkHeader> = None;
        for (i, loc) in locs.iter().enumerate() {
            let place = entry_place(kind, *loc);
            let h = self.with_record(kind, &place, *loc, |plain| {
                if plain.len() < CHUNK_HEADER_BYTES {
                    return Err(Self::corrupt("short chunk", *loc));
                }
                let h = ChunkHeader::decode(&plain[..CHUNK_HEADER_BYTES])?;
                stored.extend_from_slice(&plain[CHUNK_HEADER_BYTES..]);
                Ok(h)
            })?;
            if h.kind != kind || h.index as usize != i || h.count as usize != locs.len() {
                return Err(Self::corrupt("chunk order", *loc));
            }
            if let Some(f) = first {
                if f.codec != h.codec || f.raw_len != h.raw_len {
                    return Err(Self::corrupt("chunk header", *loc));
                }
            }
            first = Some(h);
        }
        let h = first.ok_or_else(|| VaultError::format("entry", "no chunks"))?;
        let raw = decompress_entry(h.codec, &stored, h.raw_len as usize)?;
        let hash = sha256(&[&raw]);
        Ok((Entry::decode(&raw)?, hash))
    }

    // ---- writing the log --------------------------------------------------------------

    fn app<'a>(&self, log: &'a mut Log) -> Result<&'a mut Appender> {
        log.app.as_mut().ok_or(VaultError::ReadOnly)
    }

    /// Where a record of `len` bytes will land, closing the segment first when it would
    /// pass the segment size (a record never straddles two segments).
    pub fn reserve(&self, log: &mut Log, len: usize) -> Result<(u32, u32)> {
        let off = self.app(log)?.offset();
        if off > 0 && off + len as u64 > self.segment_bytes {
            self.roll(log)?;
        }
        let app = self.app(log)?;
        Ok((app.seg, app.offset() as u32))
    }

    /// Closes the open segment and opens the next. The closed one is made durable and
    /// gets its `.par` file on a background thread (`close_segment`), segments strictly
    /// in order (each closer first waits for the one before), so `.par` files always
    /// mark a prefix of the log. A durable commit waits for them first
    /// (`join_closers`), so a segment without `.par` never precedes an acknowledged
    /// durable commit. At most two closes run behind the writer.
    pub fn roll(&self, log: &mut Log) -> Result<()> {
        if log.closing_pending >= 2 {
            self.join_closers(log)?;
        }
        let app = self.app(log)?;
        app.flush()?;
        let id = app.seg;
        let file = app.file();
        let dir = self.dir.clone();
        let mirror = self.store.mirror.clone();
        let parity = self.parity;
        let before = log.closing.take();
        let handle = std::thread::Builder::new()
            .name("vault-close".into())
            .spawn(move || {
                if let Some(h) = before {
                    h.join().map_err(|_| {
                        VaultError::Io(std::io::Error::other("segment closer panicked"))
                    })??;
                }
                close_segment(&dir, mirror.as_deref(), id, &file, parity)
            })?;
        log.closing = Some(handle);
        log.closing_pending += 1;
        let next = id.checked_add(1).ok_or(VaultError::TooLarge {
            what: "segment id",
            limit: u32::MAX as u64,
        })?;
        let file = self.store.create(next)?;
        log.app = Some(Appender::new(next, file, 0));
        self.metrics.segments.set(self.store.ids().len() as i64);
        Ok(())
    }

    /// Waits for every segment being closed (synced, `.par` written).
    pub fn join_closers(&self, log: &mut Log) -> Result<()> {
        log.closing_pending = 0;
        if let Some(h) = log.closing.take() {
            let r = h
                .join()
                .map_err(|_| VaultError::Io(std::io::Error::other("segment closer panicked")))
                .and_then(|r| r);
            if let Err(e) = r {
                log.poisoned = Some(format!("closing a segment failed: {e}"));
                return Err(e);
            }
        }
        Ok(())
    }

    /// Syncs the log durably: closed segments first, then the open one.
    pub fn sync_log(&self, log: &mut Log) -> Result<()> {
        self.join_closers(log)?;
        self.app(log)?.sync(&self.store)
    }

    fn active_aead(&self, log: &Log) -> Result<Arc<Aead>> {
        log.aead.clone().ok_or(VaultError::ReadOnly)
    }

    /// Seals and appends a commit or checkpoint entry (split into chunk records).
    pub fn write_entry(&self, log: &mut Log, kind: RecordKind, raw: &[u8]) -> Result<Vec<RecLoc>> {
        // The last moment to stop: blocks without the entry that names them are
        // garbage, the entry is what makes them a version.
        self.fence_check()?;
        let (codec, stored) = compress_entry(raw);
        let payload_max = COMMIT_BODY_BYTES_MAX - CHUNK_HEADER_BYTES;
        let count = stored.len().div_ceil(payload_max).max(1);
        if count > COMMIT_CHUNKS_MAX as usize || raw.len() > crate::format::ENTRY_BYTES_MAX {
            return Err(VaultError::TooLarge {
                what: "commit or checkpoint",
                limit: crate::format::ENTRY_BYTES_MAX as u64,
            });
        }
        let aead = self.active_aead(log)?;
        let mut locs = Vec::with_capacity(count);
        for i in 0..count {
            let chunk = &stored
                [(i * payload_max).min(stored.len())..((i + 1) * payload_max).min(stored.len())];
            let h = ChunkHeader {
                kind,
                index: i as u32,
                count: count as u32,
                codec,
                raw_len: raw.len() as u32,
            };
            let len = RECORD_OVERHEAD_BYTES + CHUNK_HEADER_BYTES + chunk.len();
            let mut buf = vec![0u8; len];
            buf[PLAIN_START..PLAIN_START + CHUNK_HEADER_BYTES].copy_from_slice(&h.encode());
            buf[PLAIN_START + CHUNK_HEADER_BYTES..len - TAG_BYTES].copy_from_slice(chunk);
            let (seg, off) = self.reserve(log, len)?;
            let loc = RecLoc {
                seg,
                off,
                len: len as u32,
            };
            let mut place = entry_place(kind, loc);
            place.key_id = log.key_id;
            self.crypt.seal(&aead, &place, &mut buf);
            log.seals += 1;
            self.app(log)?.append(&buf)?;
            self.metrics.appended_bytes.inc_by(len as u64);
            locs.push(loc);
        }
        Ok(locs)
    }

    /// Compresses, seals and appends blocks of `version`; returns their pointers.
    ///
    /// Three passes: compress (in parallel; only blocks that shrink keep a buffer),
    /// lay out (sequentially: a record's place depends on the sizes before it), then
    /// build, seal and write (in parallel, a stage of up to `STAGE_BYTES` at a time:
    /// each thread copies its records into one reused buffer, seals them in place,
    /// and writes the stage at its offset while it is still in the CPU's cache).
    pub fn write_blocks(
        &self,
        log: &mut Log,
        version: Version,
        jobs: &[BlockJob],
    ) -> Result<Vec<BlockPtr>> {
        if jobs.is_empty() {
            return Ok(Vec::new());
        }
        let aead = self.active_aead(log)?;
        let key_id = log.key_id;
        let (comp, level) = (self.compression, self.zstd_level);
        struct Work<'a> {
            job: &'a BlockJob,
            /// The block's plaintext when compressing shrank it (codec byte included).
            packed: Option<Vec<u8>>,
            len: u32,
            seg: u32,
            off: u32,
        }
        let mut work: Vec<Work> = jobs
            .iter()
            .map(|job| Work {
                job,
                packed: None,
                len: 0,
                seg: 0,
                off: 0,
            })
            .collect();
        // Neighbouring blocks of one file tend to be alike: after a few blocks in a row
        // that did not shrink, the next ones are stored without trying (one in
        // `COMPRESS_PROBE_EVERY` still tries, to notice when the data changes).
        par_chunks(&mut work, 64, |chunk| {
            let mut fails = 0u32;
            let mut skip = 0u32;
            SCRATCH.with(|scratch| {
                let mut scratch = scratch.borrow_mut();
                for w in chunk.iter_mut() {
                    let data = &w.job.data[..];
                    let mut plain = 1 + data.len();
                    if comp != Compression::None && skip == 0 {
                        scratch.resize(data.len() + BLOCK_OVERHEAD_BYTES, 0);
                        let n = encode_block(comp, level, data, &mut scratch[..]);
                        if scratch[0] != crate::format::BLOCK_RAW {
                            w.packed = Some(scratch[..n].to_vec());
                            plain = n;
                            fails = 0;
                        } else {
                            fails += 1;
                            if fails >= COMPRESS_FAILS_BEFORE_SKIP {
                                skip = COMPRESS_PROBE_EVERY - 1;
                            }
                        }
                    } else {
                        skip = skip.saturating_sub(1);
                    }
                    w.len = (PLAIN_START + plain + TAG_BYTES) as u32;
                }
            });
        });
        let (mut seg, mut off) = {
            let app = self.app(log)?;
            (app.seg, app.offset())
        };
        for w in work.iter_mut() {
            let len = w.len as u64;
            if off > 0 && off + len > self.segment_bytes {
                seg += 1;
                off = 0;
            }
            w.seg = seg;
            w.off = off as u32;
            off += len;
        }
        let crypt = &self.crypt;
        // A segment's run at a time: the appender rolls to the next segment first.
        let mut start = 0;
        while start < work.len() {
            let at = self.reserve(log, work[start].len as usize)?;
            assert_eq!(
                at,
                (work[start].seg, work[start].off),
                "block layout diverged from the appender"
            );
            let mut end = start + 1;
            while end < work.len() && work[end].seg == work[start].seg {
                end += 1;
            }
            let app = self.app(log)?;
            app.flush()?;
            let file = app.file();
            // Stages: runs of records of at most STAGE_BYTES (or one larger record).
            let mut stages: Vec<&[Work]> = Vec::new();
            let mut s = start;
            while s < end {
                let mut e = s + 1;
                let mut bytes = work[s].len as usize;
                while e < end && bytes + work[e].len as usize <= STAGE_BYTES {
                    bytes += work[e].len as usize;
                    e += 1;
                }
                stages.push(&work[s..e]);
                s = e;
            }
            let failed: Mutex<Option<std::io::Error>> = Mutex::new(None);
            par_chunks(&mut stages, 2, |mine| {
                STAGE.with(|stage| {
                    let mut stage = stage.borrow_mut();
                    for recs in mine.iter() {
                        if failed.lock().map(|f| f.is_some()).unwrap_or(true) {
                            return;
                        }
                        stage.clear();
                        for w in recs.iter() {
                            let at = stage.len();
                            stage.resize(at + PLAIN_START, 0);
                            match &w.packed {
                                Some(p) => stage.extend_from_slice(p),
                                None => {
                                    stage.push(crate::format::BLOCK_RAW);
                                    stage.extend_from_slice(&w.job.data);
                                }
                            }
                            stage.resize(at + w.len as usize, 0);
                            let place = Place {
                                kind: RecordKind::Block,
                                key_id,
                                segment: w.seg,
                                offset: w.off,
                                ino: w.job.ino,
                                index: w.job.index,
                                version,
                            };
                            crypt.seal(&aead, &place, &mut stage[at..]);
                        }
                        let at = recs[0].off as u64;
                        let r = std::iter::once(&file.file)
                            .chain(file.mirror.as_ref())
                            .try_for_each(|f| {
                                std::os::unix::fs::FileExt::write_all_at(f, &stage, at)
                            });
                        if let Err(e) = r {
                            if let Ok(mut f) = failed.lock() {
                                f.get_or_insert(e);
                            }
                            return;
                        }
                    }
                });
            });
            if let Some(e) = failed.into_inner().unwrap_or_else(|p| p.into_inner()) {
                return Err(e.into());
            }
            let total: u64 = work[start..end].iter().map(|w| w.len as u64).sum();
            self.app(log)?.advance(total);
            start = end;
        }
        let mut ptrs = Vec::with_capacity(work.len());
        for w in &work {
            ptrs.push(BlockPtr {
                segment: w.seg,
                offset: w.off,
                len: w.len,
                version,
            });
            self.metrics
                .block_logical_bytes
                .inc_by(w.job.data.len() as u64);
            self.metrics.block_disk_bytes.inc_by(w.len as u64);
            self.metrics.appended_bytes.inc_by(w.len as u64);
            if w.packed.is_some() {
                self.metrics.blocks_compressed.inc();
            }
        }
        log.seals += work.len() as u64;
        self.metrics.blocks_sealed.inc_by(work.len() as u64);
        Ok(ptrs)
    }

    /// Commits what is pending (and `snapshot_ops`) as the next version; `force` makes
    /// a commit even with nothing pending; `durable` syncs the log (and mirror) too.
    /// `extra` computes further changes from the live tree under the state lock (a
    /// restore): they are applied to the live tree and committed with what is pending.
    /// The caller holds the log lock.
    pub fn commit_locked(
        &self,
        log: &mut Log,
        snapshot_ops: Vec<SnapshotOp>,
        extra: Option<ExtraChanges<'_>>,
        force: bool,
        durable: bool,
    ) -> Result<Version> {
        if self.read_only {
            return Err(VaultError::ReadOnly);
        }
        self.fence_check()?;
        if let Some(why) = &log.poisoned {
            return Err(VaultError::Io(std::io::Error::other(format!(
                "vault refuses changes after a failed commit ({why}); reopen it"
            ))));
        }
        if log.seals >= SEALS_PER_KEY_MAX {
            self.rotate_locked(log)?;
        }
        let had_extra = extra.is_some();
        // 1. Take what is pending.
        let (version, prev_hash, next_ino, jobs, mut changes) = {
            let mut guard = self.lock_state();
            let st = &mut *guard;
            let mut changes = Changes::default();
            if let Some(f) = extra {
                let c = f(&st.tree)?;
                st.tree.apply(&c)?;
                let mut touched: Vec<Ino> = c.removed.clone();
                for (rec, t) in &c.inodes {
                    touched.push(rec.ino);
                    if let Some(t) = t {
                        let e = st.trunc.entry(rec.ino).or_insert(*t);
                        *e = (*e).min(*t);
                    }
                }
                touched.extend(c.blocks.iter().map(|(ino, _)| *ino));
                for ino in touched {
                    st.changed.insert(ino);
                    if let Some(d) = st.dirty.remove(&ino) {
                        st.dirty_bytes -= d.values().map(|b| b.len() as u64).sum::<u64>();
                    }
                }
                changes.blocks = c.blocks;
            }
            let nothing = st.changed.is_empty() && st.dirty.is_empty() && changes.blocks.is_empty();
            if nothing && !force && snapshot_ops.is_empty() {
                drop(guard);
                if durable {
                    self.sync_log(log)?;
                    self.metrics.fsyncs.inc();
                }
                return Ok(self.lock_state().head.version);
            }
            let version = st.head.version + 1;
            let mut changed: Vec<Ino> = st.changed.drain().collect();
            changed.sort_unstable();
            for ino in changed {
                match st.tree.nodes.get(&ino) {
                    Some(n) => changes
                        .inodes
                        .push((n.rec.clone(), st.trunc.get(&ino).copied())),
                    None => changes.removed.push(ino),
                }
            }
            // Blocks of removed inodes (a restore's pointers) cannot apply.
            changes
                .blocks
                .retain(|(ino, _)| st.tree.nodes.contains_key(ino));
            st.trunc.clear();
            let mut jobs = Vec::new();
            let mut inos: Vec<Ino> = st.dirty.keys().copied().collect();
            inos.sort_unstable();
            for ino in inos {
                for (idx, data) in &st.dirty[&ino] {
                    jobs.push(BlockJob {
                        ino,
                        index: *idx,
                        data: data.clone(),
                    });
                }
            }
            (version, st.head.hash, st.tree.next_ino, jobs, changes)
        };
        // 2. The entry's size is known before any block is written (pointers have a
        // fixed size): a commit over the entry limit is refused here, before anything
        // is appended, and leaves the pending changes pending (no poisoning).
        {
            let mut probe = changes.clone();
            let dummy = BlockPtr {
                segment: 0,
                offset: 0,
                len: 0,
                version: 0,
            };
            probe
                .blocks
                .extend(group_ptrs(&jobs, &vec![dummy; jobs.len()]));
            let raw_len = Entry::Commit(CommitEntry {
                version,
                time: 0,
                writer_token: self.writer_token,
                prev_hash,
                key_id: log.key_id,
                seals: log.seals,
                header_sequence: self
                    .header_sequence
                    .load(std::sync::atomic::Ordering::Acquire),
                next_ino,
                snapshot_ops: snapshot_ops.clone(),
                changes: probe,
            })
            .encode()
            .len();
            if raw_len > commit_bytes_max() {
                let e = VaultError::TooLarge {
                    what: "commit",
                    limit: commit_bytes_max() as u64,
                };
                if had_extra {
                    // The tree already holds the extra changes: they cannot be put back.
                    tracing::error!(error = %e, "vault: commit failed; refusing changes until reopened");
                    log.poisoned = Some(e.to_string());
                    return Err(e);
                }
                let mut st = self.lock_state();
                let st = &mut *st;
                for (rec, t) in &changes.inodes {
                    st.changed.insert(rec.ino);
                    if let Some(t) = t {
                        let cur = st.trunc.entry(rec.ino).or_insert(*t);
                        *cur = (*cur).min(*t);
                    }
                }
                st.changed.extend(changes.removed.iter().copied());
                return Err(e);
            }
        }
        type Written = (Vec<BlockPtr>, [u8; 32], i64, Vec<RecLoc>);
        let result = (|| -> Result<Written> {
            let ptrs = self.write_blocks(log, version, &jobs)?;
            changes.blocks.extend(group_ptrs(&jobs, &ptrs));
            let time = now_ns();
            let entry = CommitEntry {
                version,
                time,
                writer_token: self.writer_token,
                prev_hash,
                key_id: log.key_id,
                seals: log.seals,
                header_sequence: self
                    .header_sequence
                    .load(std::sync::atomic::Ordering::Acquire),
                next_ino,
                snapshot_ops: snapshot_ops.clone(),
                changes: std::mem::take(&mut changes),
            };
            let raw = Entry::Commit(entry).encode();
            let hash = sha256(&[&raw]);
            let locs = self.write_entry(log, RecordKind::Commit, &raw)?;
            if durable {
                self.sync_log(log)?;
            } else {
                self.app(log)?.flush()?;
            }
            Ok((ptrs, hash, time, locs))
        })();
        let (ptrs, hash, time, locs) = match result {
            Ok(r) => r,
            Err(e) => {
                tracing::error!(error = %e, "vault: commit failed; refusing changes until reopened");
                log.poisoned = Some(e.to_string());
                return Err(e);
            }
        };
        // 4. Install: committed pointers, head, history, snapshots.
        let mut st = self.lock_state();
        let st = &mut *st;
        for (job, ptr) in jobs.iter().zip(&ptrs) {
            let dropped_since = st.trunc.get(&job.ino).is_some_and(|t| job.index >= *t);
            if let Some(d) = st.dirty.get_mut(&job.ino) {
                if d.get(&job.index)
                    .is_some_and(|cur| Arc::ptr_eq(cur, &job.data))
                {
                    d.remove(&job.index);
                    st.dirty_bytes -= job.data.len() as u64;
                    if d.is_empty() {
                        st.dirty.remove(&job.ino);
                    }
                }
            }
            if let Some(node) = st.tree.nodes.get_mut(&job.ino) {
                if !dropped_since {
                    node.blocks.insert(job.index, *ptr);
                }
            }
        }
        st.head = Head { version, hash };
        let mut snapshot = None;
        for op in &snapshot_ops {
            match op {
                SnapshotOp::Create(name) => {
                    st.snapshots.insert(
                        name.clone(),
                        SnapshotInfo {
                            name: name.clone(),
                            version,
                            time: crate::tree::from_ns(time),
                        },
                    );
                    snapshot = Some(name.clone());
                }
                SnapshotOp::Delete(name) => {
                    st.snapshots.remove(name);
                }
            }
        }
        st.history.push(CommitInfo {
            version,
            time,
            writer_token: self.writer_token,
            hash,
            snapshot,
            loc: EntryLoc::Log(locs),
        });
        self.max_token
            .fetch_max(self.writer_token, std::sync::atomic::Ordering::AcqRel);
        self.metrics.commits.inc();
        if durable {
            self.metrics.fsyncs.inc();
        }
        self.metrics.version.set(version as i64);
        self.metrics.dirty_bytes.set(st.dirty_bytes as i64);
        Ok(version)
    }

    /// Makes a new data key active (the old ones stay until a reseal drops them).
    pub fn rotate_locked(&self, log: &mut Log) -> Result<u32> {
        if self.read_only {
            return Err(VaultError::ReadOnly);
        }
        let version = self.lock_state().head.version;
        let mut h = self.header.lock().expect("header lock");
        if h.table.keys.len() >= KEYS_MAX {
            return Err(VaultError::TooLarge {
                what: "data keys (reseal to drop old ones)",
                limit: KEYS_MAX as u64,
            });
        }
        let id = h.table.keys.iter().map(|k| k.id).max().unwrap_or(0) + 1;
        let mut key: [u8; KEY_BYTES] = crate::crypto::random_array();
        if let Some(k) = h.table.keys.iter_mut().find(|k| k.id == log.key_id) {
            k.seals = log.seals;
        }
        h.table.keys.push(crate::format::KeyEntry {
            id,
            created: version,
            seals: 0,
            key,
        });
        // The entry holds its own copy (wiped when dropped); wipe this one.
        zeroize::Zeroize::zeroize(&mut key);
        h.table.active = id;
        self.write_header_locked(&mut h)?;
        self.crypt
            .set_keys(h.table.keys.iter().map(|k| (k.id, &k.key)));
        log.key_id = id;
        log.aead = self.crypt.key(id);
        log.seals = 0;
        self.metrics.key_rotations.inc();
        tracing::info!(key = id, "vault: data key rotated");
        Ok(id)
    }

    /// Rewrites the header (primary and mirror) from `h`, with a fresh nonce.
    pub fn write_header_locked(&self, h: &mut HeaderState) -> Result<()> {
        h.clear.sequence += 1;
        let bytes = crate::header::seal(&mut h.clear, &h.table, &h.kek);
        crate::header::write_file(&self.dir, &bytes)?;
        if let Some(m) = &self.store.mirror {
            crate::header::write_file(m, &bytes)?;
        }
        self.header_sequence
            .store(h.clear.sequence, std::sync::atomic::Ordering::Release);
        Ok(())
    }
}

/// Makes a closed segment durable (both copies) and writes its `.par` file.
pub(crate) fn close_segment(
    dir: &std::path::Path,
    mirror: Option<&std::path::Path>,
    id: u32,
    file: &crate::store::SegFile,
    parity: Option<Parity>,
) -> Result<()> {
    file.file.sync_data()?;
    if let Some(m) = &file.mirror {
        m.sync_data()?;
    }
    parity::write(dir, id, parity)?;
    if let Some(m) = mirror {
        let to = crate::store::par_path(m, id);
        std::fs::copy(crate::store::par_path(dir, id), &to)?;
        File::open(&to)?.sync_all()?;
        crate::store::sync_dir(&m.join(crate::store::SEG_DIR))?;
    }
    Ok(())
}

pub(crate) fn what_of(kind: RecordKind) -> &'static str {
    match kind {
        RecordKind::Block => "block",
        RecordKind::Commit => "commit",
        RecordKind::Checkpoint => "checkpoint",
    }
}

pub(crate) fn entry_place(kind: RecordKind, loc: RecLoc) -> Place {
    Place {
        kind,
        key_id: 0,
        segment: loc.seg,
        offset: loc.off,
        ino: 0,
        index: 0,
        version: 0,
    }
}
