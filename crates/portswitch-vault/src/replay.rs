//! Opening a vault's log: scanning segments for record frames, finding the latest
//! checkpoint, replaying the commits after it (each one authenticated and chained to the
//! one before), and finding the torn tail a crash left.

use std::collections::BTreeMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;

use crate::engine::{entry_place, CommitInfo, EntryLoc, Inner, RecLoc};
use crate::error::{Result, VaultError};
use crate::format::{
    ChunkHeader, CommitEntry, Entry, Frame, RecordKind, SnapshotOp, CHUNK_HEADER_BYTES,
};
use crate::limits::FRAME_BYTES;
use crate::parity;
use crate::store::seg_path;
use crate::tree::{from_ns, Tree};
use crate::types::{Head, SnapshotInfo, Version};

/// One commit or checkpoint entry found in the log: its kind and chunk records.
#[derive(Clone, Debug)]
pub(crate) struct Group {
    pub kind: RecordKind,
    pub locs: Vec<RecLoc>,
}

/// What a scan of the log found.
pub(crate) struct Scan {
    /// Complete entries, in log order.
    pub groups: Vec<Group>,
    /// Where the committed log ends, when segments not yet closed follow: the segment
    /// is cut there and every later one removed.
    pub cut: Option<(u32, u64)>,
    /// Records (of any kind) scanned.
    #[allow(dead_code)]
    pub records: u64,
}

/// A frame read from the primary, repaired from the mirror or parity when it does not
/// decode. `None`: no good frame here.
fn frame_at(inner: &Inner, id: u32, off: u64, len: u64) -> Result<Option<Frame>> {
    let fits = |f: &Frame| off + f.record_len() as u64 <= len;
    let mut b = [0u8; FRAME_BYTES];
    if off + FRAME_BYTES as u64 <= len {
        // A read error (EIO from a bad sector, ...) is damage to this copy like a bad
        // checksum: the mirror or parity may hold a good frame.
        match inner.store.read(id, off, &mut b) {
            Ok(()) => {
                if let Some(f) = Frame::decode(&b).filter(fits) {
                    return Ok(Some(f));
                }
            }
            Err(e) if e.is_missing_segment() => return Err(e),
            Err(e) => tracing::warn!(
                segment = id,
                offset = off,
                error = %e,
                "vault: read of a frame failed"
            ),
        }
    }
    // A frame checksum only detects; the mirror or parity may hold a good one. The
    // record body it announces is authenticated when read.
    if inner.store.read_mirror(id, off, &mut b).is_some() {
        if let Some(f) = Frame::decode(&b).filter(fits) {
            write_back_or_warn(inner, id, off, &b);
            tracing::warn!(
                segment = id,
                offset = off,
                "vault: damaged frame repaired from the mirror"
            );
            inner.metrics.repairs_mirror.inc();
            return Ok(Some(f));
        }
    }
    if off + FRAME_BYTES as u64 <= len && parity::exists(&inner.dir, id) {
        if let Some(r) = parity::rebuild(&inner.dir, id, off, FRAME_BYTES)? {
            if let Some(f) = Frame::decode(&r).filter(fits) {
                write_back_or_warn(inner, id, off, &r);
                tracing::warn!(
                    segment = id,
                    offset = off,
                    "vault: damaged frame rebuilt from parity"
                );
                inner.metrics.repairs_parity.inc();
                return Ok(Some(f));
            }
        }
    }
    Ok(None)
}

/// The offset of the first record at or after `from` in segment `id` (any byte
/// offset: the frames before it may be unreadable) whose frame decodes as a commit or
/// checkpoint under a known key and whose seal opens at that place.
fn later_entry(inner: &Inner, id: u32, from: u64) -> Result<Option<u64>> {
    const WINDOW: usize = 1 << 20;
    let len = inner.store.len(id)?;
    let mut buf = vec![0u8; WINDOW];
    let mut start = from;
    while start + FRAME_BYTES as u64 <= len {
        let n = ((len - start) as usize).min(WINDOW);
        if inner.store.read(id, start, &mut buf[..n]).is_err() {
            // Unreadable here: step over this window (minus a frame's overlap).
            start += (n - FRAME_BYTES + 1) as u64;
            continue;
        }
        for p in 0..=n - FRAME_BYTES {
            let Some(f) = Frame::decode(&buf[p..p + FRAME_BYTES]) else {
                continue;
            };
            let off = start + p as u64;
            if f.kind == RecordKind::Block
                || inner.crypt.key(f.key_id).is_none()
                || off + f.record_len() as u64 > len
                || off > u32::MAX as u64
            {
                continue;
            }
            let loc = RecLoc {
                seg: id,
                off: off as u32,
                len: f.record_len(),
            };
            let mut rec = vec![0u8; loc.len as usize];
            if inner.store.read(id, off, &mut rec).is_ok()
                && inner
                    .crypt
                    .open(f.kind, &entry_place(f.kind, loc), &mut rec)
                    .is_ok()
            {
                return Ok(Some(off));
            }
        }
        start += (n - FRAME_BYTES + 1) as u64;
    }
    Ok(None)
}

/// Writes a repaired frame back; a failure is logged (the scan goes on with the good
/// copy).
fn write_back_or_warn(inner: &Inner, id: u32, off: u64, bytes: &[u8]) {
    if let Err(e) = inner.store.write_back(id, off, bytes, false) {
        tracing::warn!(
            segment = id,
            offset = off,
            error = %e,
            "vault: writing a repaired frame back failed"
        );
    }
}

/// Reads the chunk header of an entry record (authenticating, repairing if it can).
fn chunk_header(inner: &Inner, kind: RecordKind, loc: RecLoc) -> Result<ChunkHeader> {
    inner.with_record(kind, &entry_place(kind, loc), loc, |plain| {
        if plain.len() < CHUNK_HEADER_BYTES {
            return Err(Inner::corrupt("short chunk", loc));
        }
        ChunkHeader::decode(&plain[..CHUNK_HEADER_BYTES])
    })
}

/// Scans every segment. A segment with a `.par` file is closed and was durable before
/// any later commit was acknowledged: damage there is repaired or is an error. From the
/// first segment without one on, the first record that does not read is where a crash
/// tore the log; everything after the last complete entry before it is reported as
/// `cut` (uncommitted or torn), and so is the uncommitted tail after the last entry.
/// Closed segments shorter than their parity says (a lost tail: a truncated file)
/// get the tail back before the scan reads them: from the mirror when it holds it,
/// else rebuilt from the parity, then written back. A tail that cannot be restored is
/// `Corrupt`: a closed segment is durable history, never cut.
pub(crate) fn restore_truncated(inner: &Inner, ids: &[u32]) -> Result<()> {
    for &id in ids {
        let Some(want) = parity::covered_len(&inner.dir, id) else {
            continue;
        };
        let have = inner.store.len(id)?;
        if have >= want {
            continue;
        }
        let missing = (want - have) as usize;
        let lost = || VaultError::Corrupt {
            what: "closed segment shorter than its parity, with no copy of the tail",
            segment: id,
            offset: have,
        };
        let mut tail = vec![0u8; missing];
        if inner.read_only {
            // Nothing is written: the scan reads the segment to the length its parity
            // covers, and each read past the file's end is repaired on the fly.
            let obtainable = inner.store.read_mirror(id, have, &mut tail).is_some()
                || parity::rebuild(&inner.dir, id, have, missing)?.is_some();
            if !obtainable {
                return Err(lost());
            }
            continue;
        }
        let from_mirror = inner.store.read_mirror(id, have, &mut tail).is_some();
        let source = if from_mirror {
            inner.metrics.repairs_mirror.inc();
            "mirror"
        } else {
            match parity::rebuild(&inner.dir, id, have, missing)? {
                Some(b) => {
                    tail = b;
                    inner.metrics.repairs_parity.inc();
                    "parity"
                }
                None => return Err(lost()),
            }
        };
        inner.store.write_back(id, have, &tail, false)?;
        tracing::warn!(
            segment = id,
            offset = have,
            bytes = missing,
            source,
            "vault: the lost tail of a closed segment was restored"
        );
    }
    Ok(())
}

pub(crate) fn scan(inner: &Inner, ids: &[u32]) -> Result<Scan> {
    // Segments close in order, so the closed ones are a prefix: one without `.par`
    // before one with it lost its `.par` (it is still closed, and damage there is not a
    // tear).
    let closed_upto = ids
        .iter()
        .rev()
        .find(|id| parity::exists(&inner.dir, **id))
        .copied();
    let durable = |id: u32| closed_upto.is_some_and(|c| id <= c);
    let mut entry_recs: Vec<(RecordKind, RecLoc)> = Vec::new();
    let mut records = 0u64;
    'segments: for &id in ids {
        let mut len = inner.store.len(id)?;
        if inner.read_only {
            // A closed segment that lost its tail (`restore_truncated` found a copy).
            len = len.max(parity::covered_len(&inner.dir, id).unwrap_or(0));
        }
        let mut off = 0u64;
        while off < len {
            match frame_at(inner, id, off, len)? {
                Some(f) => {
                    records += 1;
                    // An entry under a key id this header never issued (above its
                    // highest): an older header put back (from before a rotation), or
                    // a forged frame. Never skipped: that would silently drop commits.
                    if f.kind != RecordKind::Block
                        && inner.crypt.key(f.key_id).is_none()
                        && inner.crypt.max_key_id().is_some_and(|m| f.key_id > m)
                    {
                        return Err(VaultError::Corrupt {
                            what: "entry under a key the header does not know",
                            segment: id,
                            offset: off,
                        });
                    }
                    // Records under keys a reseal dropped are superseded history.
                    if f.kind != RecordKind::Block && inner.crypt.key(f.key_id).is_some() {
                        entry_recs.push((
                            f.kind,
                            RecLoc {
                                seg: id,
                                off: off as u32,
                                len: f.record_len(),
                            },
                        ));
                    }
                    off += f.record_len() as u64;
                }
                // In a segment not yet closed, a frame that does not read may be where
                // a crash tore the log, but only if no commit or checkpoint follows it:
                // a later one that opens was written after it (and may have been
                // acknowledged by a sync), so this is damage, never a cut.
                None if !durable(id) => {
                    let later = ids.iter().copied().filter(|l| *l >= id);
                    for l in later {
                        let from = if l == id { off + 1 } else { 0 };
                        if let Some(at) = later_entry(inner, l, from)? {
                            tracing::error!(
                                segment = id,
                                offset = off,
                                entry_segment = l,
                                entry_offset = at,
                                "vault: damaged record frame before a later commit"
                            );
                            return Err(VaultError::Corrupt {
                                what: "record frame",
                                segment: id,
                                offset: off,
                            });
                        }
                    }
                    break 'segments;
                }
                None => {
                    return Err(VaultError::Corrupt {
                        what: "record frame",
                        segment: id,
                        offset: off,
                    })
                }
            }
        }
    }
    // Group entry records by their chunk headers.
    let mut groups: Vec<Group> = Vec::new();
    let mut i = 0;
    while i < entry_recs.len() {
        let (kind, loc) = entry_recs[i];
        let ok = (|| -> Result<Option<Group>> {
            let h = chunk_header(inner, kind, loc)?;
            if h.index != 0 {
                return Err(Inner::corrupt("chunk order", loc));
            }
            let mut g = Group {
                kind,
                locs: vec![loc],
            };
            for k in 1..h.count as usize {
                let Some(&(kk, l)) = entry_recs.get(i + k) else {
                    return Ok(None); // incomplete at the end of the log
                };
                let hk = chunk_header(inner, kk, l)?;
                if kk != kind || hk.index as usize != k || hk.count != h.count {
                    return Err(Inner::corrupt("chunk order", l));
                }
                g.locs.push(l);
            }
            Ok(Some(g))
        })();
        match ok {
            Ok(Some(g)) => {
                i += g.locs.len();
                groups.push(g);
            }
            Ok(None) => break,
            Err(e) => {
                // A damaged entry in a segment not yet closed, with nothing valid after
                // it, is a torn write; anywhere else it is corruption.
                let torn = e.is_corrupt()
                    && !durable(loc.seg)
                    && !entry_recs[i + 1..]
                        .iter()
                        .any(|(k, l)| chunk_header(inner, *k, *l).is_ok());
                if torn {
                    break;
                }
                return Err(e);
            }
        }
    }
    let cut = ids
        .iter()
        .copied()
        .find(|id| !durable(*id))
        .map(
            |first_open| match groups.last().and_then(|g| g.locs.last()) {
                Some(l) if l.seg >= first_open => (l.seg, l.off as u64 + l.len as u64),
                _ => (first_open, 0),
            },
        );
    Ok(Scan {
        groups,
        cut,
        records,
    })
}

/// A commit made under a newer header than the one this open read: the header file was
/// rolled back (an older copy put in place, or a failover to a mirror whose header
/// write a crash cut). Refused rather than replayed under the wrong key table.
fn check_header_sequence(c: &CommitEntry, header_seq: u64, loc: RecLoc) -> Result<()> {
    if c.header_sequence > header_seq {
        tracing::error!(
            commit_header = c.header_sequence,
            header = header_seq,
            "vault: the header is older than the log"
        );
        return Err(Inner::corrupt("header older than the log", loc));
    }
    Ok(())
}

/// The state replay builds.
pub(crate) struct Replayed {
    pub tree: Tree,
    pub head: Head,
    pub history: Vec<CommitInfo>,
    pub snapshots: BTreeMap<String, SnapshotInfo>,
    pub checkpoint: Vec<RecLoc>,
    /// The last commit's active key and seal count.
    pub last_key: Option<(u32, u64)>,
    /// The highest writer token recorded: the checkpoint's (the highest up to its
    /// base) and every later commit's.
    pub max_token: u64,
}

/// Loads the latest checkpoint and applies every later commit, checking the chain.
pub(crate) fn replay(inner: &Inner, groups: &[Group]) -> Result<Replayed> {
    let cp_idx = groups
        .iter()
        .rposition(|g| g.kind == RecordKind::Checkpoint)
        .ok_or(VaultError::Corrupt {
            what: "no checkpoint in the log",
            segment: 0,
            offset: 0,
        })?;
    let cp_group = &groups[cp_idx];
    let (entry, _) = inner.read_entry(RecordKind::Checkpoint, &cp_group.locs)?;
    let Entry::Checkpoint(cp) = entry else {
        return Err(Inner::corrupt("checkpoint kind", cp_group.locs[0]));
    };
    let mut tree = Tree::from_checkpoint(&cp)?;
    let mut history = vec![CommitInfo {
        version: cp.base,
        time: cp.base_time,
        writer_token: cp.base_writer_token,
        hash: cp.base_hash,
        snapshot: None,
        loc: EntryLoc::Base,
    }];
    let mut snapshots = BTreeMap::new();
    for s in &cp.snapshots {
        snapshots.insert(
            s.name.clone(),
            SnapshotInfo {
                name: s.name.clone(),
                version: s.version,
                time: from_ns(s.time),
            },
        );
    }
    let mut head = Head {
        version: cp.base,
        hash: cp.base_hash,
    };
    let mut last_key = Some((cp.key_id, cp.seals));
    let mut max_token = cp.base_writer_token;
    let header_seq = inner
        .header_sequence
        .load(std::sync::atomic::Ordering::Acquire);
    for c in &cp.carried {
        check_header_sequence(&c.entry, header_seq, cp_group.locs[0])?;
        check_chain(&head, &c.entry, c.hash, cp_group.locs[0])?;
        tree.apply(&c.entry.changes)?;
        tree.next_ino = tree.next_ino.max(c.entry.next_ino);
        max_token = max_token.max(c.entry.writer_token);
        head = Head {
            version: c.entry.version,
            hash: c.hash,
        };
        history.push(info(&c.entry, c.hash, EntryLoc::Carried));
    }
    let carried_to = head.version;
    for g in groups.iter().filter(|g| g.kind == RecordKind::Commit) {
        let (entry, hash) = inner.read_entry(RecordKind::Commit, &g.locs)?;
        let Entry::Commit(c) = entry else {
            return Err(Inner::corrupt("commit kind", g.locs[0]));
        };
        if c.version <= carried_to {
            continue;
        }
        check_header_sequence(&c, header_seq, g.locs[0])?;
        check_chain(&head, &c, sha_or(hash), g.locs[0])?;
        tree.apply(&c.changes)
            .map_err(|_| Inner::corrupt("commit changes", g.locs[0]))?;
        tree.next_ino = tree.next_ino.max(c.next_ino);
        for op in &c.snapshot_ops {
            match op {
                SnapshotOp::Create(name) => {
                    snapshots.insert(
                        name.clone(),
                        SnapshotInfo {
                            name: name.clone(),
                            version: c.version,
                            time: from_ns(c.time),
                        },
                    );
                }
                SnapshotOp::Delete(name) => {
                    snapshots.remove(name);
                }
            }
        }
        head = Head {
            version: c.version,
            hash,
        };
        last_key = Some((c.key_id, c.seals));
        max_token = max_token.max(c.writer_token);
        history.push(info(&c, hash, EntryLoc::Log(g.locs.clone())));
    }
    Ok(Replayed {
        tree,
        head,
        history,
        snapshots,
        checkpoint: cp_group.locs.clone(),
        last_key,
        max_token,
    })
}

fn sha_or(h: [u8; 32]) -> [u8; 32] {
    h
}

fn check_chain(head: &Head, c: &CommitEntry, _hash: [u8; 32], at: RecLoc) -> Result<()> {
    if c.version != head.version + 1 {
        return Err(VaultError::Corrupt {
            what: if c.version > head.version + 1 {
                "commit chain: a commit is missing"
            } else {
                "commit chain: version out of order"
            },
            segment: at.seg,
            offset: at.off as u64,
        });
    }
    if c.prev_hash != head.hash {
        return Err(Inner::corrupt("commit chain: previous hash differs", at));
    }
    Ok(())
}

pub(crate) fn info(c: &CommitEntry, hash: [u8; 32], loc: EntryLoc) -> CommitInfo {
    CommitInfo {
        version: c.version,
        time: c.time,
        writer_token: c.writer_token,
        hash,
        snapshot: c.snapshot_ops.iter().find_map(|op| match op {
            SnapshotOp::Create(n) => Some(n.clone()),
            SnapshotOp::Delete(_) => None,
        }),
        loc,
    }
}

/// Copies `src`'s segment files (and parity, and header) onto `dst` so that `dst` holds
/// the same bytes: missing files copied, shorter files extended from `src`, longer ones
/// cut, files `src` does not have removed. Returns bytes copied.
pub(crate) fn mirror_sync(src: &Path, dst: &Path) -> Result<u64> {
    use crate::store::{list_segments, par_path, sync_dir, SEG_DIR};
    std::fs::create_dir_all(dst.join(SEG_DIR))?;
    let mut copied = 0u64;
    let src_ids = list_segments(src)?;
    for &id in &src_ids {
        let s = File::open(seg_path(src, id))?;
        let slen = s.metadata()?.len();
        let d = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(seg_path(dst, id))?;
        let dlen = d.metadata()?.len();
        if dlen > slen {
            d.set_len(slen)?;
            d.sync_data()?;
        } else if dlen < slen {
            copied += copy_range(&s, &d, dlen, slen)?;
            d.sync_data()?;
        }
        let sp = par_path(src, id);
        if sp.exists() {
            let dp = par_path(dst, id);
            let need = match std::fs::metadata(&dp) {
                Ok(m) => m.len() != std::fs::metadata(&sp)?.len(),
                Err(_) => true,
            };
            if need {
                std::fs::copy(&sp, &dp)?;
                File::open(&dp)?.sync_all()?;
            }
        }
    }
    for id in list_segments(dst)? {
        if !src_ids.contains(&id) {
            let _ = std::fs::remove_file(seg_path(dst, id));
            let _ = std::fs::remove_file(par_path(dst, id));
        }
    }
    sync_dir(&dst.join(SEG_DIR))?;
    let h = crate::header::read_file(src)?;
    if crate::header::read_file(dst).ok().as_deref() != Some(&h[..]) {
        crate::header::write_file(dst, &h)?;
    }
    Ok(copied)
}

/// Takes the mirror's bytes from `(id, from)` on (and its later segments) over the
/// primary's: the mirror holds commits the primary lost.
pub(crate) fn heal_from_mirror(dir: &Path, mirror: &Path, id: u32, from: u64) -> Result<u64> {
    use crate::store::{list_segments, sync_dir, SEG_DIR};
    let mut copied = 0;
    for mid in list_segments(mirror)? {
        if mid < id {
            continue;
        }
        let s = File::open(seg_path(mirror, mid))?;
        let slen = s.metadata()?.len();
        let d = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(seg_path(dir, mid))?;
        let start = if mid == id { from.min(slen) } else { 0 };
        copied += copy_range(&s, &d, start, slen)?;
        d.set_len(slen)?;
        d.sync_all()?;
    }
    sync_dir(&dir.join(SEG_DIR))?;
    Ok(copied)
}

/// Copies bytes `[from, to)` of `s` to the same offsets of `d`.
pub(crate) fn copy_range(s: &File, d: &File, from: u64, to: u64) -> Result<u64> {
    let mut buf = vec![0u8; (1 << 20).min((to - from) as usize)];
    let mut off = from;
    while off < to {
        let n = ((to - off) as usize).min(buf.len());
        s.read_exact_at(&mut buf[..n], off)?;
        d.write_all_at(&buf[..n], off)?;
        off += n as u64;
    }
    Ok(to - from)
}

/// Whether a segment range of the mirror beyond the primary's end holds a commit that
/// opens: the primary lost (or had cut) committed data that the mirror still has.
pub(crate) fn mirror_is_ahead(inner: &Inner, mirror: &Path, id: u32, from: u64) -> bool {
    let Ok(f) = File::open(seg_path(mirror, id)) else {
        return false;
    };
    let Ok(len) = f.metadata().map(|m| m.len()) else {
        return false;
    };
    let mut off = from;
    let mut b = [0u8; FRAME_BYTES];
    while off + FRAME_BYTES as u64 <= len {
        if f.read_exact_at(&mut b, off).is_err() {
            return false;
        }
        let Some(fr) = Frame::decode(&b) else {
            return false;
        };
        if off + fr.record_len() as u64 > len {
            return false;
        }
        if fr.kind == RecordKind::Commit {
            let loc = RecLoc {
                seg: id,
                off: off as u32,
                len: fr.record_len(),
            };
            let mut rec = vec![0u8; fr.record_len() as usize];
            if f.read_exact_at(&mut rec, off).is_ok()
                && inner
                    .crypt
                    .open(
                        RecordKind::Commit,
                        &entry_place(RecordKind::Commit, loc),
                        &mut rec,
                    )
                    .is_ok()
            {
                return true;
            }
        }
        off += fr.record_len() as u64;
    }
    false
}

#[allow(dead_code)]
pub(crate) fn version_of(h: &[CommitInfo], v: Version) -> Option<&CommitInfo> {
    h.iter().find(|c| c.version == v)
}
