//! Maintenance: retention and compaction (gc), reseal after a key rotation, scrubbing
//! (check), backups, passphrase changes, stats.
//!
//! gc and reseal share one operation, *relocate*: pick segments to empty, copy the live
//! block records out of them (re-sealed under the active key at their new place), write
//! a checkpoint holding the base state, the snapshots older than it and every commit
//! that lived in (or pointed into) those segments, make it durable, then delete the
//! segments.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fs::{self, File};
use std::os::unix::fs::FileExt;
use std::sync::{mpsc, Arc, Weak};
use std::time::SystemTime;

use crate::crypto::{derive_kek, random_array, sha256};
use crate::engine::{entry_place, CommitInfo, EntryLoc, Inner, Log, RecLoc};
use crate::error::{Result, VaultError};
use crate::format::{
    BlockPtr, CarriedCommit, CheckpointEntry, CheckpointSnapshot, CommitEntry, Entry, Frame, Place,
    RecordKind,
};
use crate::history::{read_checkpoint, replay_to};
use crate::limits::{FRAME_BYTES, TAG_BYTES};
use crate::parity;
use crate::record::{PLAIN_START, RECORD_OVERHEAD_BYTES};
use crate::store::{par_path, seg_path};
use crate::target::{BackupTarget, TargetEntry, TargetFile, TARGET_IO_BYTES_MAX};
use crate::tree::{now_ns, time_ns, Tree};
use crate::types::*;

pub(crate) fn stats(inner: &Inner) -> Stats {
    let mut s = Stats::default();
    {
        let st = inner.lock_state();
        s.version = st.head.version;
        s.horizon = st.base();
        s.dirty_bytes = st.dirty_bytes;
        for n in st.tree.nodes.values() {
            match n.rec.kind {
                FileKind::File => {
                    s.files += 1;
                    s.logical_bytes += n.rec.size;
                }
                FileKind::Dir => s.dirs += 1,
                FileKind::Symlink => s.symlinks += 1,
            }
        }
    }
    for id in inner.store.ids() {
        s.segments += 1;
        s.disk_bytes += fs::metadata(seg_path(&inner.dir, id))
            .map(|m| m.len())
            .unwrap_or(0);
        s.disk_bytes += fs::metadata(par_path(&inner.dir, id))
            .map(|m| m.len())
            .unwrap_or(0);
    }
    s.cache_bytes = inner.cache.bytes();
    let m = &inner.metrics;
    s.cache_hits = m.cache_hits.get();
    s.cache_misses = m.cache_misses.get();
    s.reads = m.reads.get();
    s.writes = m.writes.get();
    s.commits = m.commits.get();
    s.repairs = m.repairs_mirror.get() + m.repairs_parity.get() + m.repairs_remote.get();
    s.auth_failures = m.auth_failures.get();
    let log = inner.lock_log();
    s.active_key = log.key_id;
    s.seals = log.seals;
    s.keys = inner.header.lock().expect("header lock").table.keys.len() as u64;
    inner.metrics.cache_bytes.set(s.cache_bytes as i64);
    s
}

// ---- passphrase ------------------------------------------------------------------------

pub(crate) fn change_passphrase(inner: &Inner, old: &[u8], new: &[u8]) -> Result<()> {
    let log = inner.lock_log();
    let mut h = inner.header.lock().expect("header lock");
    let file = crate::header::read_file(&inner.dir)?;
    let (clear, sealed) = crate::format::HeaderClear::decode(&file)?;
    let kek_old = derive_kek(old, &clear.salt, &clear.kdf)?;
    crate::header::open_with_kek(&clear, sealed, &kek_old)?;
    let salt: [u8; 16] = random_array();
    h.kek = derive_kek(new, &salt, &h.clear.kdf)?;
    h.clear.salt = salt;
    let (key, seals) = (log.key_id, log.seals);
    if let Some(k) = h.table.keys.iter_mut().find(|k| k.id == key) {
        k.seals = seals;
    }
    inner.write_header_locked(&mut h)
}

// ---- what is live ------------------------------------------------------------------------

/// Every version from a base on, as gc, reseal and check see it.
struct Retained {
    base: CommitInfo,
    base_tree: Tree,
    /// Snapshots older than the base, with their full state.
    old_snapshots: Vec<(SnapshotInfo, Tree)>,
    /// Commits after the base, in order, with where each one lives in the log (`None`:
    /// carried by the current checkpoint).
    commits: Vec<(CommitEntry, [u8; 32], Option<Vec<RecLoc>>)>,
}

/// A block record that some retained version points at.
#[derive(Clone, Copy)]
struct LiveBlock {
    ino: Ino,
    index: u64,
    ptr: BlockPtr,
}

fn retained(inner: &Inner, log: &Log, base: Version) -> Result<Retained> {
    let base_tree = replay_to(inner, log, base, |_, _, _, _| Ok(()))?;
    let (history, snapshots) = {
        let st = inner.lock_state();
        (st.history.clone(), st.snapshots.clone())
    };
    let base_info = history
        .iter()
        .find(|c| c.version == base)
        .cloned()
        .ok_or_else(|| VaultError::NoVersion(format!("base {base}")))?;
    let cp = read_checkpoint(inner)?;
    let mut commits = Vec::new();
    for c in &cp.carried {
        if c.entry.version > base {
            commits.push((c.entry.clone(), c.hash, None));
        }
    }
    let carried_to = cp.carried_to();
    for c in &history {
        if c.version <= base || c.version <= carried_to {
            continue;
        }
        if let EntryLoc::Log(locs) = &c.loc {
            let (e, hash) = inner.read_entry(RecordKind::Commit, locs)?;
            let Entry::Commit(e) = e else {
                return Err(VaultError::format("commit", "holds a checkpoint"));
            };
            commits.push((e, hash, Some(locs.clone())));
        }
    }
    let mut old_snapshots = Vec::new();
    for s in snapshots.values() {
        if s.version < base {
            let t = replay_to(inner, log, s.version, |_, _, _, _| Ok(()))?;
            old_snapshots.push((s.clone(), t));
        }
    }
    Ok(Retained {
        base: base_info,
        base_tree,
        old_snapshots,
        commits,
    })
}

fn live_blocks(r: &Retained) -> HashMap<(u32, u32), LiveBlock> {
    let mut live = HashMap::new();
    let mut add = |ino: Ino, index: u64, ptr: &BlockPtr| {
        live.insert(
            (ptr.segment, ptr.offset),
            LiveBlock {
                ino,
                index,
                ptr: *ptr,
            },
        );
    };
    for t in std::iter::once(&r.base_tree).chain(r.old_snapshots.iter().map(|(_, t)| t)) {
        for (ino, n) in &t.nodes {
            for (idx, p) in &n.blocks {
                add(*ino, *idx, p);
            }
        }
    }
    for (c, _, _) in &r.commits {
        for (ino, list) in &c.changes.blocks {
            for (idx, p) in list {
                add(*ino, *idx, p);
            }
        }
    }
    live
}

// ---- relocate (gc, reseal) -----------------------------------------------------------------

struct Relocated {
    segments_deleted: u64,
    records_copied: u64,
    bytes_copied: u64,
    bytes_freed: u64,
}

/// Key ids of the records in a segment (frames only).
fn segment_keys(inner: &Inner, id: u32) -> Result<BTreeSet<u32>> {
    let len = inner.store.len(id)?;
    let mut keys = BTreeSet::new();
    let mut off = 0u64;
    let mut b = [0u8; FRAME_BYTES];
    while off + FRAME_BYTES as u64 <= len {
        inner.store.read(id, off, &mut b)?;
        let Some(f) = Frame::decode(&b) else { break };
        keys.insert(f.key_id);
        off += f.record_len() as u64;
    }
    Ok(keys)
}

/// The open segment is considered by gc once it holds at least this share of a
/// segment (1/`OPEN_SEGMENT_GC_SHARE`): smaller ones are not worth closing early.
const OPEN_SEGMENT_GC_SHARE: u64 = 4;

fn relocate(
    inner: &Inner,
    log: &mut Log,
    base: Version,
    include_open: bool,
    select: &mut dyn FnMut(u32, u64, u64) -> Result<bool>,
) -> Result<Relocated> {
    inner.join_closers(log)?;
    let r = retained(inner, log, base)?;
    let live = live_blocks(&r);
    let current = log
        .app
        .as_ref()
        .map(|a| a.seg)
        .ok_or(VaultError::ReadOnly)?;
    // Live bytes per segment: blocks and the log's retained commit records.
    let mut live_bytes: BTreeMap<u32, u64> = BTreeMap::new();
    for b in live.values() {
        *live_bytes.entry(b.ptr.segment).or_default() += b.ptr.len as u64;
    }
    for (_, _, locs) in &r.commits {
        for l in locs.iter().flatten() {
            *live_bytes.entry(l.seg).or_default() += l.len as u64;
        }
    }
    // The current checkpoint counts as live: this relocation writes a new one of about
    // the same size, so its bytes are not freed by moving (without this, every gc of
    // an idle vault would close and rewrite the open segment for its checkpoint).
    for l in &inner.lock_state().checkpoint {
        *live_bytes.entry(l.seg).or_default() += l.len as u64;
    }
    let mut evacuate = BTreeSet::new();
    for id in inner.store.ids() {
        if id == current {
            continue;
        }
        let len = inner.store.len(id)?;
        if select(id, live_bytes.get(&id).copied().unwrap_or(0), len)? {
            evacuate.insert(id);
        }
    }
    // The open segment too (gc): a store whose old versions all sit in the segment
    // being written (a database rewriting its pages) is otherwise never compacted.
    // It is closed first, so its live records move to the next one like any other.
    if include_open {
        let len = log.app.as_ref().map(|a| a.offset()).unwrap_or(0);
        if len >= inner.segment_bytes / OPEN_SEGMENT_GC_SHARE
            && select(current, live_bytes.get(&current).copied().unwrap_or(0), len)?
        {
            inner.roll(log)?;
            inner.join_closers(log)?;
            evacuate.insert(current);
        }
    }
    // The old checkpoint is replaced in every case; commits it carried must be carried
    // again, and so must every commit living in (or pointing into) an evacuated segment,
    // and all commits before those (a checkpoint carries a run from its base).
    let mut carry_to = base;
    for (c, _, locs) in &r.commits {
        let in_evacuated = match locs {
            None => true,
            Some(ls) => ls.iter().any(|l| evacuate.contains(&l.seg)),
        };
        let points_in = c
            .changes
            .blocks
            .iter()
            .any(|(_, list)| list.iter().any(|(_, p)| evacuate.contains(&p.segment)));
        if in_evacuated || points_in {
            carry_to = carry_to.max(c.version);
        }
    }
    // Copy live blocks out of the evacuated segments.
    let mut moving: Vec<&LiveBlock> = live
        .values()
        .filter(|b| evacuate.contains(&b.ptr.segment))
        .collect();
    moving.sort_by_key(|b| (b.ptr.segment, b.ptr.offset));
    let aead = log.aead.clone().ok_or(VaultError::ReadOnly)?;
    let mut remap: HashMap<(u32, u32), BlockPtr> = HashMap::new();
    let mut bytes_copied = 0u64;
    for b in &moving {
        let loc = RecLoc {
            seg: b.ptr.segment,
            off: b.ptr.offset,
            len: b.ptr.len,
        };
        let place = Place {
            kind: RecordKind::Block,
            key_id: 0,
            segment: loc.seg,
            offset: loc.off,
            ino: b.ino,
            index: b.index,
            version: b.ptr.version,
        };
        let plain = inner.with_record(RecordKind::Block, &place, loc, |p| Ok(p.to_vec()))?;
        let len = RECORD_OVERHEAD_BYTES + plain.len();
        let mut buf = vec![0u8; len];
        buf[PLAIN_START..len - TAG_BYTES].copy_from_slice(&plain);
        let (seg, off) = inner.reserve(log, len)?;
        let new_place = Place {
            key_id: log.key_id,
            segment: seg,
            offset: off,
            ..place
        };
        inner.crypt.seal(&aead, &new_place, &mut buf);
        log.seals += 1;
        log.app.as_mut().expect("writable").append(&buf)?;
        remap.insert(
            (loc.seg, loc.off),
            BlockPtr {
                segment: seg,
                offset: off,
                len: len as u32,
                version: b.ptr.version,
            },
        );
        bytes_copied += len as u64;
    }
    let fix = |p: &mut BlockPtr| {
        if let Some(n) = remap.get(&(p.segment, p.offset)) {
            *p = *n;
        }
    };
    // The checkpoint.
    let mut base_tree = r.base_tree;
    for n in base_tree.nodes.values_mut() {
        for p in n.blocks.values_mut() {
            fix(p);
        }
    }
    let next_ino = inner.lock_state().tree.next_ino.max(base_tree.next_ino);
    let mut snapshots = Vec::new();
    let all_snapshots = inner.lock_state().snapshots.clone();
    for s in all_snapshots.values() {
        let diff = match r.old_snapshots.iter().find(|(o, _)| o.name == s.name) {
            Some((_, t)) => {
                let mut t = t.clone();
                for n in t.nodes.values_mut() {
                    for p in n.blocks.values_mut() {
                        fix(p);
                    }
                }
                Some(Tree::diff(&base_tree, &t))
            }
            None => None,
        };
        snapshots.push(CheckpointSnapshot {
            name: s.name.clone(),
            version: s.version,
            time: time_ns(s.time),
            diff,
        });
    }
    let mut carried = Vec::new();
    for (c, hash, _) in &r.commits {
        if c.version > carry_to {
            break;
        }
        let mut e = c.clone();
        for (_, list) in e.changes.blocks.iter_mut() {
            for (_, p) in list.iter_mut() {
                fix(p);
            }
        }
        carried.push(CarriedCommit {
            hash: *hash,
            entry: e,
        });
    }
    let cp = CheckpointEntry {
        base,
        base_hash: r.base.hash,
        base_time: r.base.time,
        // The highest token up to the base, so that the fencing rule outlives the
        // commits gc drops.
        base_writer_token: inner
            .lock_state()
            .history
            .iter()
            .filter(|c| c.version <= base)
            .map(|c| c.writer_token)
            .max()
            .unwrap_or(0)
            .max(r.base.writer_token),
        next_ino,
        key_id: log.key_id,
        seals: log.seals,
        inodes: base_tree.checkpoint_inodes(),
        snapshots,
        carried,
    };
    let raw = Entry::Checkpoint(cp).encode();
    let cp_locs = inner.write_entry(log, RecordKind::Checkpoint, &raw)?;
    inner.sync_log(log)?;
    // Install the new pointers and history before the old segments go.
    {
        let mut st = inner.lock_state();
        let st = &mut *st;
        for n in st.tree.nodes.values_mut() {
            for p in n.blocks.values_mut() {
                fix(p);
            }
        }
        st.checkpoint = cp_locs;
        st.history.retain(|c| c.version >= base);
        for c in st.history.iter_mut() {
            if c.version == base {
                c.loc = EntryLoc::Base;
            } else if c.version <= carry_to {
                c.loc = EntryLoc::Carried;
            }
        }
    }
    let mut bytes_freed = 0u64;
    for id in &evacuate {
        bytes_freed += inner.store.len(*id).unwrap_or(0);
        bytes_freed += fs::metadata(par_path(&inner.dir, *id))
            .map(|m| m.len())
            .unwrap_or(0);
        inner.store.remove(*id)?;
    }
    inner.store.sync_dirs()?;
    inner.metrics.segments.set(inner.store.ids().len() as i64);
    Ok(Relocated {
        segments_deleted: evacuate.len() as u64,
        records_copied: moving.len() as u64,
        bytes_copied,
        bytes_freed,
    })
}

pub(crate) fn gc(inner: &Inner, ret: &Retention) -> Result<GcReport> {
    let mut log = inner.lock_log();
    inner.commit_locked(&mut log, Vec::new(), None, false, true)?;
    let (old_base, head, history_times) = {
        let st = inner.lock_state();
        let times: Vec<(Version, i64)> = st.history.iter().map(|c| (c.version, c.time)).collect();
        (st.base(), st.head.version, times)
    };
    let mut base = old_base;
    if ret.keep_last.is_some() || ret.keep_within.is_some() {
        let mut b = head;
        if let Some(k) = ret.keep_last {
            b = b.min(head.saturating_sub(k.max(1) - 1));
        }
        if let Some(d) = ret.keep_within {
            let since = time_ns(SystemTime::now() - d);
            if let Some((v, _)) = history_times.iter().find(|(_, t)| *t >= since) {
                b = b.min(*v);
            }
        }
        base = b.max(old_base);
    }
    let rel = relocate(inner, &mut log, base, true, &mut |_, live, len| {
        Ok(live * 2 < len)
    })?;
    inner.metrics.gc_runs.inc();
    Ok(GcReport {
        horizon: base,
        versions_dropped: base - old_base,
        segments_deleted: rel.segments_deleted,
        records_copied: rel.records_copied,
        bytes_copied: rel.bytes_copied,
        bytes_freed: rel.bytes_freed.saturating_sub(rel.bytes_copied),
    })
}

pub(crate) fn reseal(inner: &Inner) -> Result<ResealReport> {
    let mut log = inner.lock_log();
    inner.commit_locked(&mut log, Vec::new(), None, false, true)?;
    // Every record under an old key is then in a closed segment.
    let off = log.app.as_ref().map(|a| a.offset()).unwrap_or(0);
    if off > 0 {
        inner.roll(&mut log)?;
    }
    let active = log.key_id;
    let base = inner.lock_state().base();
    let rel = relocate(inner, &mut log, base, false, &mut |id, _, _| {
        Ok(segment_keys(inner, id)?.iter().any(|k| *k != active))
    })?;
    // Every remaining record is under the active key: drop the others.
    let mut h = inner.header.lock().expect("header lock");
    let before = h.table.keys.len();
    h.table.keys.retain(|k| k.id == active);
    let dropped = before - h.table.keys.len();
    if let Some(k) = h.table.keys.iter_mut().find(|k| k.id == active) {
        k.seals = log.seals;
    }
    if dropped > 0 {
        inner.write_header_locked(&mut h)?;
        inner
            .crypt
            .set_keys(h.table.keys.iter().map(|k| (k.id, &k.key)));
    }
    Ok(ResealReport {
        records_resealed: rel.records_copied,
        keys_dropped: dropped as u64,
        segments_deleted: rel.segments_deleted,
    })
}

// ---- check -------------------------------------------------------------------------------

pub(crate) fn check(inner: &Inner, repair: bool) -> Result<CheckReport> {
    let repair = repair && !inner.read_only;
    let mut log = inner.lock_log();
    inner.join_closers(&mut log)?;
    if let Some(app) = log.app.as_mut() {
        app.flush()?;
    }
    let base = inner.lock_state().base();
    let r = retained(inner, &log, base)?;
    let live = live_blocks(&r);
    let mut rep = CheckReport {
        live_blocks: live.len() as u64,
        mirror_checked: inner.store.mirror.is_some(),
        torn_tail_bytes: inner.torn_tail_bytes,
        ..Default::default()
    };
    let mut seen_live = 0u64;
    for id in inner.store.ids() {
        check_segment(inner, &live, id, repair, &mut rep, &mut seen_live)?;
    }
    if seen_live < live.len() as u64 {
        // A pointer into a segment or offset with no record there.
        rep.damaged.push(Damage {
            segment: 0,
            offset: 0,
            what: "missing block records",
            copy: "primary",
            repaired: false,
        });
        rep.unrepaired += live.len() as u64 - seen_live;
    }
    Ok(rep)
}

/// Scrubs segment `id` into `rep` (every frame; every record that can be checked: live
/// blocks and entries; the mirror's length; the parity), repairing with `repair`.
fn check_segment(
    inner: &Inner,
    live: &HashMap<(u32, u32), LiveBlock>,
    id: u32,
    repair: bool,
    rep: &mut CheckReport,
    seen_live: &mut u64,
) -> Result<()> {
    rep.segments += 1;
    let len = inner.store.len(id)?;
    let mut off = 0u64;
    let mut segment_clean = true;
    let mut b = [0u8; FRAME_BYTES];
    while off < len {
        let loc_frame = RecLoc {
            seg: id,
            off: off as u32,
            len: FRAME_BYTES as u32,
        };
        let mut frame = None;
        if off + FRAME_BYTES as u64 <= len {
            // A read error is damage to this copy (repaired below like a bad frame).
            match inner.store.read(id, off, &mut b) {
                Ok(()) => frame = Frame::decode(&b).filter(|f| off + f.record_len() as u64 <= len),
                Err(e) if e.is_missing_segment() => return Err(e),
                Err(_) => {}
            }
        }
        let frame = match frame {
            Some(f) => f,
            None => {
                // A frame only has its checksum: take the mirror's or parity's if it
                // decodes (the body is authenticated below).
                let mut other = None;
                let mut mb = [0u8; FRAME_BYTES];
                if inner.store.read_mirror(id, off, &mut mb).is_some() {
                    other = Frame::decode(&mb).map(|f| (f, mb));
                }
                if other.is_none() && off + FRAME_BYTES as u64 <= len {
                    if let Some(pb) = parity::rebuild(&inner.dir, id, off, FRAME_BYTES)? {
                        let mut a = [0u8; FRAME_BYTES];
                        a.copy_from_slice(&pb);
                        other = Frame::decode(&a).map(|f| (f, a));
                    }
                }
                let repaired = match other {
                    Some((_, bytes)) if repair => {
                        inner.store.write_back(id, off, &bytes, false)?;
                        true
                    }
                    _ => false,
                };
                rep.damaged.push(Damage {
                    segment: id,
                    offset: off,
                    what: "frame",
                    copy: "primary",
                    repaired,
                });
                if repaired {
                    rep.repaired += 1;
                } else {
                    rep.unrepaired += 1;
                    segment_clean = false;
                }
                match other {
                    Some((f, _)) if off + f.record_len() as u64 <= len => f,
                    _ => {
                        let _ = loc_frame;
                        break; // cannot find the next record in this segment
                    }
                }
            }
        };
        rep.records += 1;
        let loc = RecLoc {
            seg: id,
            off: off as u32,
            len: frame.record_len(),
        };
        rep.bytes += loc.len as u64;
        let place = match frame.kind {
            RecordKind::Block => match live.get(&(id, off as u32)) {
                Some(lb) => {
                    rep.blocks += 1;
                    *seen_live += 1;
                    Some(Place {
                        kind: RecordKind::Block,
                        key_id: 0,
                        segment: id,
                        offset: off as u32,
                        ino: lb.ino,
                        index: lb.index,
                        version: lb.ptr.version,
                    })
                }
                // Unreferenced (old versions, uncommitted): its seal binds a place
                // nothing names any more, so there is nothing to check it against.
                None => None,
            },
            k => {
                if k == RecordKind::Commit {
                    rep.commits += 1;
                }
                // Records under dropped keys are superseded history.
                inner.crypt.key(frame.key_id).map(|_| entry_place(k, loc))
            }
        };
        if let Some(place) = place {
            check_record(
                inner,
                rep,
                frame.kind,
                &place,
                loc,
                repair,
                &mut segment_clean,
            )?;
        }
        off += loc.len as u64;
    }
    if let Some(mirror_dir) = &inner.store.mirror {
        let mlen = inner
            .store
            .get(id)?
            .mirror
            .as_ref()
            .and_then(|m| m.metadata().ok())
            .map(|m| m.len());
        // A read-only open's view ends before a torn tail, which the mirror may
        // hold too: only a mirror shorter than the view is short.
        let in_view = match inner.store.view_end {
            Some((last, _)) if last == id => mlen.is_some_and(|m| m >= len),
            _ => mlen == Some(len),
        };
        if !in_view {
            let repaired = repair && crate::replay::mirror_sync(&inner.dir, mirror_dir).is_ok();
            if repaired {
                inner.store.load()?;
            }
            rep.damaged.push(Damage {
                segment: id,
                offset: mlen.unwrap_or(0),
                what: "mirror length",
                copy: "mirror",
                repaired,
            });
            if repaired {
                rep.repaired += 1;
            } else {
                rep.unrepaired += 1;
            }
        }
    }
    if parity::exists(&inner.dir, id) {
        rep.parity_checked += 1;
        if !parity::verify(&inner.dir, id)? {
            let repaired =
                repair && segment_clean && { parity::write(&inner.dir, id, inner.parity).is_ok() };
            rep.damaged.push(Damage {
                segment: id,
                offset: 0,
                what: "parity",
                copy: "primary",
                repaired,
            });
            if repaired {
                rep.repaired += 1;
            } else {
                rep.unrepaired += 1;
            }
        }
    }
    Ok(())
}

fn check_record(
    inner: &Inner,
    rep: &mut CheckReport,
    kind: RecordKind,
    place: &Place,
    loc: RecLoc,
    repair: bool,
    segment_clean: &mut bool,
) -> Result<()> {
    let mut buf = vec![0u8; loc.len as usize];
    // A read error (EIO, short read) is damage to the primary copy, like a bad seal.
    let primary_ok = match inner.store.read(loc.seg, loc.off as u64, &mut buf) {
        Ok(()) => true,
        Err(e) if e.is_missing_segment() => return Err(e),
        Err(_) => false,
    };
    let primary = buf.clone();
    let primary_ok = primary_ok && inner.crypt.open(kind, place, &mut buf).is_ok();
    let mut good: Option<Vec<u8>> = primary_ok.then_some(primary);
    if !primary_ok {
        inner.metrics.auth_failures.inc();
        let fixed = if repair {
            inner.repair(kind, place, loc)?
        } else {
            None
        };
        let repaired = fixed.is_some();
        note_damage(rep, loc.seg, loc.off as u64, kind, "primary", repaired);
        if !repaired {
            *segment_clean = false;
        }
        good = fixed;
    }
    if inner.store.mirror.is_some() {
        let mut m = vec![0u8; loc.len as usize];
        let same = inner
            .store
            .read_mirror(loc.seg, loc.off as u64, &mut m)
            .is_some()
            && good.as_ref().is_some_and(|g| *g == m);
        if !same {
            let mut t = m.clone();
            let mirror_ok = inner.crypt.open(kind, place, &mut t).is_ok();
            if !mirror_ok {
                let repaired = repair
                    && match &good {
                        Some(g) => {
                            inner.store.write_back(loc.seg, loc.off as u64, g, true)?;
                            true
                        }
                        None => false,
                    };
                note_damage(rep, loc.seg, loc.off as u64, kind, "mirror", repaired);
            }
        }
    }
    Ok(())
}

/// Records one damaged copy of a record in a check's report, and counts it.
fn note_damage(
    rep: &mut CheckReport,
    segment: u32,
    offset: u64,
    kind: RecordKind,
    copy: &'static str,
    repaired: bool,
) {
    rep.damaged.push(Damage {
        segment,
        offset,
        what: crate::engine::what_of(kind),
        copy,
        repaired,
    });
    if repaired {
        rep.repaired += 1;
    } else {
        rep.unrepaired += 1;
    }
}

// ---- backup ------------------------------------------------------------------------------

/// Bytes before a backup target's end compared with the source before appending.
const BACKUP_OVERLAP_BYTES: u64 = 64 << 10;

pub(crate) fn hash_range(f: &File, from: u64, to: u64) -> Result<[u8; 32]> {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    let mut buf = vec![0u8; (1 << 20).min((to - from) as usize).max(1)];
    let mut off = from;
    while off < to {
        let n = ((to - off) as usize).min(buf.len());
        f.read_exact_at(&mut buf[..n], off)?;
        ctx.update(&buf[..n]);
        off += n as u64;
    }
    let mut out = [0u8; 32];
    out.copy_from_slice(ctx.finish().as_ref());
    Ok(out)
}

pub(crate) fn backup_to(inner: &Inner, dst: &mut dyn BackupTarget) -> Result<BackupReport> {
    backup(inner, dst, true)
}

fn backup(inner: &Inner, dst: &mut dyn BackupTarget, commit_first: bool) -> Result<BackupReport> {
    let r = backup_once(inner, dst, commit_first);
    // The target's lock is held for one backup only.
    dst.end();
    r
}

fn backup_once(
    inner: &Inner,
    dst: &mut dyn BackupTarget,
    commit_first: bool,
) -> Result<BackupReport> {
    let mut log = inner.lock_log();
    // After a failed commit the log may end in blocks no commit names, which the next
    // open cuts (and then overwrites): shipping them would make the target diverge.
    if let Some(why) = &log.poisoned {
        return Err(VaultError::Io(std::io::Error::other(format!(
            "vault refuses to back up after a failed commit ({why}); reopen it"
        ))));
    }
    if !inner.read_only {
        if commit_first {
            inner.commit_locked(&mut log, Vec::new(), None, false, true)?;
        } else if log.app.is_some() {
            inner.sync_log(&mut log)?;
        }
    }
    let mut rep = BackupReport {
        version: inner.lock_state().head.version,
        ..Default::default()
    };
    if let Some(d) = dst.local_dir() {
        if d.canonicalize().ok() == inner.dir.canonicalize().ok() {
            return Err(VaultError::Invalid("backup onto the vault itself"));
        }
    }
    // One backup (or writer) of the target at a time (`begin` takes its lock, and
    // refuses a target holding another vault); then the fencing rule: a vault whose
    // highest writer token is lower than one the target already took is a stale
    // writer's, and shipping it would mix its log into the newer one's.
    let vault_id = inner.crypt.vault_id;
    dst.begin(&vault_id)?;
    let ours = inner.max_token.load(std::sync::atomic::Ordering::Acquire);
    let theirs = dst.fence()?;
    crate::fencing::admit(ours, theirs)?;
    let header = crate::header::read_file(&inner.dir)?;
    // The header first: a backup cut short then still has every key its records need
    // (records under keys a reseal dropped are superseded and skipped on open).
    if dst.header()?.as_deref() != Some(&header[..]) {
        dst.set_header(&header)?;
        rep.header_shipped = true;
    }
    let held: HashMap<u32, TargetEntry> = dst.list()?.into_iter().map(|e| (e.id, e)).collect();
    let ids = inner.store.ids();
    for &id in &ids {
        let src = File::open(seg_path(&inner.dir, id))?;
        // The segment's length in this open's view (a read-only open leaves a torn
        // tail out).
        let len = inner.store.len(id)?;
        let seg = TargetFile::Segment(id);
        let mut have = held.get(&id).map(|e| e.segment_len).unwrap_or(0);
        // A closed segment the target holds whole, with its parity, was verified when
        // it was shipped and never changes: no round trip for it (a backup of a vault
        // of many segments costs the same as one of a few).
        let local_par = fs::metadata(par_path(&inner.dir, id)).map(|m| m.len()).ok();
        if have == len
            && local_par.is_some()
            && held.get(&id).and_then(|e| e.parity_len) == local_par
        {
            continue;
        }
        // The target's bytes are a prefix of the source's only if nothing was cut and
        // rewritten since (a cut torn tail, a poisoned commit's blocks): compare the
        // bytes just before the target's end, and ship the whole segment again when
        // they differ.
        let mut reshipped = false;
        if have > 0 && have <= len {
            let from = have.saturating_sub(BACKUP_OVERLAP_BYTES);
            let mut differs = hash_range(&src, from, have)? != dst.hash(seg, from, have)?;
            if differs {
                // Damage in the vault's own copy looks the same as a rewritten tail:
                // scrub the segment first (repairing from the mirror, parity or a copy
                // on another node), and never ship records that do not authenticate
                // over the target's copy, which may be the only good one.
                let base = inner.lock_state().base();
                let r = retained(inner, &log, base)?;
                let live = live_blocks(&r);
                let mut scrub = CheckReport::default();
                let mut seen = 0;
                check_segment(inner, &live, id, !inner.read_only, &mut scrub, &mut seen)?;
                if let Some(d) = scrub.damaged.iter().find(|d| !d.repaired) {
                    return Err(VaultError::Corrupt {
                        what: "damaged record in the vault, not shipped over its backup",
                        segment: d.segment,
                        offset: d.offset,
                    });
                }
                differs = hash_range(&src, from, have)? != dst.hash(seg, from, have)?;
            }
            if differs {
                tracing::warn!(
                    segment = id,
                    offset = from,
                    "vault: the backup's copy of a segment is not a prefix of the vault's; shipping it again"
                );
                have = 0;
                reshipped = true;
            }
        }
        if have > len {
            return Err(VaultError::format(
                "backup",
                format!("segment {id} of the backup is longer than the vault's"),
            ));
        }
        if !held.contains_key(&id) {
            dst.set_len(seg, 0)?;
        }
        if have < len || !held.contains_key(&id) {
            rep.bytes_shipped += ship_range(&src, dst, seg, have, len)?;
            rep.segments_shipped += 1;
            if reshipped {
                dst.set_len(seg, len)?;
            }
            dst.sync(seg)?;
            if hash_range(&src, have, len)? != dst.hash(seg, have, len)? {
                return Err(VaultError::Corrupt {
                    what: "backup copy differs from the vault",
                    segment: id,
                    offset: have,
                });
            }
            rep.bytes_verified += len - have;
        }
        let sp = par_path(&inner.dir, id);
        if sp.exists() {
            let par = TargetFile::Parity(id);
            let slen = fs::metadata(&sp)?.len();
            let theirs = held.get(&id).and_then(|e| e.parity_len);
            if reshipped || theirs != Some(slen) {
                let psrc = File::open(&sp)?;
                dst.set_len(par, 0)?;
                ship_range(&psrc, dst, par, 0, slen)?;
                dst.sync(par)?;
                if hash_range(&psrc, 0, slen)? != dst.hash(par, 0, slen)? {
                    return Err(VaultError::Corrupt {
                        what: "backup parity differs from the vault",
                        segment: id,
                        offset: 0,
                    });
                }
                rep.bytes_shipped += slen;
                rep.bytes_verified += slen;
            }
        }
    }
    dst.sync_dir()?;
    for id in held.keys() {
        if !ids.contains(id) {
            dst.remove(*id)?;
            rep.segments_removed += 1;
        }
    }
    dst.sync_dir()?;
    if ours > theirs {
        dst.set_fence(ours)?;
    }
    inner.metrics.backup_bytes.inc_by(rep.bytes_shipped);
    drop(log);
    Ok(rep)
}

/// Writes bytes `from..to` of `src` to the same place of `f` in the target.
fn ship_range(
    src: &File,
    dst: &mut dyn BackupTarget,
    f: TargetFile,
    from: u64,
    to: u64,
) -> Result<u64> {
    let mut buf = vec![0u8; TARGET_IO_BYTES_MAX.min((to - from) as usize)];
    let mut off = from;
    while off < to {
        let n = ((to - off) as usize).min(buf.len());
        src.read_exact_at(&mut buf[..n], off)?;
        dst.write(f, off, &buf[..n])?;
        off += n as u64;
    }
    Ok(to - from)
}

/// Starts the background thread of a continuous backup.
pub(crate) fn continuous_backup_thread(
    weak: Weak<Inner>,
    mut dst: Box<dyn BackupTarget>,
    rx: mpsc::Receiver<()>,
) {
    while rx.recv().is_ok() {
        let Some(inner) = weak.upgrade() else { return };
        match backup(&inner, &mut *dst, false) {
            Ok(r) => tracing::debug!(bytes = r.bytes_shipped, "vault: continuous backup shipped"),
            Err(e) => {
                inner.metrics.backup_failures.inc();
                tracing::error!(error = %e, target = %dst.describe(), "vault: continuous backup failed");
            }
        }
    }
}

pub(crate) fn continuous_backup(inner: &Arc<Inner>, mut dst: Box<dyn BackupTarget>) -> Result<()> {
    // One full pass now, so a bad target is an error here rather than in the log.
    backup(inner, &mut *dst, true)?;
    let (tx, rx) = mpsc::sync_channel(1);
    let weak = Arc::downgrade(inner);
    std::thread::Builder::new()
        .name("vault-backup".into())
        .spawn(move || continuous_backup_thread(weak, dst, rx))?;
    *inner.backup_tx.lock().expect("backup lock") = Some(tx);
    Ok(())
}

/// Wakes the continuous backup, if any (coalescing: one pending wake-up is enough).
pub(crate) fn after_commit(inner: &Inner) {
    if let Some(tx) = inner.backup_tx.lock().expect("backup lock").as_ref() {
        let _ = tx.try_send(());
    }
}

#[allow(dead_code)]
fn unused() -> ([u8; 32], i64) {
    (sha256(&[]), now_ns())
}
