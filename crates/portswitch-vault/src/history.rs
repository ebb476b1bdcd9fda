//! Versions: building the state as of a version (from the latest checkpoint and the
//! commits after it), listing a path's versions, restoring.

use std::time::SystemTime;

use crate::engine::{EntryLoc, Inner, Log};
use crate::error::{Result, VaultError};
use crate::format::{Changes, CheckpointEntry, Entry, RecordKind};
use crate::tree::{from_ns, time_ns, Tree};
use crate::types::{Version, VersionInfo, VersionSpec};
use crate::vault::split_path;

pub(crate) fn history(inner: &Inner) -> Vec<VersionInfo> {
    let st = inner.lock_state();
    st.history
        .iter()
        .map(|c| VersionInfo {
            version: c.version,
            time: from_ns(c.time),
            writer_token: c.writer_token,
            size: None,
            snapshot: c.snapshot.clone(),
        })
        .collect()
}

/// The version `spec` names.
pub(crate) fn resolve_spec(inner: &Inner, spec: &VersionSpec) -> Result<Version> {
    let st = inner.lock_state();
    let base = st.base();
    let v = match spec {
        VersionSpec::Latest => st.head.version,
        VersionSpec::Version(v) => *v,
        VersionSpec::Snapshot(name) => {
            st.snapshots
                .get(name)
                .ok_or_else(|| VaultError::NoVersion(format!("no snapshot {name:?}")))?
                .version
        }
        VersionSpec::Time(t) => {
            let t = time_ns(*t);
            let in_history = st
                .history
                .iter()
                .rev()
                .find(|c| c.time <= t)
                .map(|c| c.version);
            let older_snapshot = st
                .snapshots
                .values()
                .filter(|s| s.version < base && time_ns(s.time) <= t)
                .map(|s| s.version)
                .max();
            in_history.or(older_snapshot).ok_or_else(|| {
                VaultError::NoVersion(format!("nothing retained at or before {t} ns"))
            })?
        }
    };
    let known =
        (base..=st.head.version).contains(&v) || st.snapshots.values().any(|s| s.version == v);
    if !known {
        return Err(VaultError::NoVersion(format!(
            "version {v} (retained: {base}..={} and snapshots)",
            st.head.version
        )));
    }
    Ok(v)
}

pub(crate) fn read_checkpoint(inner: &Inner) -> Result<CheckpointEntry> {
    let locs = inner.lock_state().checkpoint.clone();
    match inner.read_entry(RecordKind::Checkpoint, &locs)?.0 {
        Entry::Checkpoint(cp) => Ok(cp),
        Entry::Commit(_) => Err(VaultError::format("checkpoint", "holds a commit")),
    }
}

/// Calls `f` with the tree after each retained version up to `until`, base first, and
/// that version's change list (`None` for the base). The caller holds the log lock, so
/// no gc removes records under it.
pub(crate) fn replay_to(
    inner: &Inner,
    _log: &Log,
    until: Version,
    mut f: impl FnMut(&Tree, Version, i64, Option<&Changes>) -> Result<()>,
) -> Result<Tree> {
    let cp = read_checkpoint(inner)?;
    if until < cp.base {
        let s = cp
            .snapshots
            .iter()
            .find(|s| s.version == until && s.diff.is_some())
            .ok_or_else(|| {
                VaultError::NoVersion(format!("version {until} is older than the horizon"))
            })?;
        let mut t = Tree::from_checkpoint(&cp)?;
        t.apply(s.diff.as_ref().expect("checked"))?;
        f(&t, until, s.time, None)?;
        return Ok(t);
    }
    let mut t = Tree::from_checkpoint(&cp)?;
    f(&t, cp.base, cp.base_time, None)?;
    let mut done = cp.base;
    for c in &cp.carried {
        if c.entry.version > until {
            return Ok(t);
        }
        t.apply(&c.entry.changes)?;
        done = c.entry.version;
        f(&t, done, c.entry.time, Some(&c.entry.changes))?;
    }
    let hist = inner.lock_state().history.clone();
    for c in hist {
        if c.version <= done || c.version > until {
            continue;
        }
        let EntryLoc::Log(locs) = &c.loc else {
            continue;
        };
        let Entry::Commit(e) = inner.read_entry(RecordKind::Commit, locs)?.0 else {
            return Err(VaultError::format("commit", "holds a checkpoint"));
        };
        t.apply(&e.changes)?;
        f(&t, e.version, e.time, Some(&e.changes))?;
    }
    Ok(t)
}

pub(crate) fn state_at(inner: &Inner, spec: &VersionSpec) -> Result<(Tree, Version, SystemTime)> {
    let log = inner.lock_log();
    state_at_locked(inner, &log, spec)
}

pub(crate) fn state_at_locked(
    inner: &Inner,
    log: &Log,
    spec: &VersionSpec,
) -> Result<(Tree, Version, SystemTime)> {
    let v = resolve_spec(inner, spec)?;
    let mut time = 0;
    let t = replay_to(inner, log, v, |_, ver, t, _| {
        if ver == v {
            time = t;
        }
        Ok(())
    })?;
    Ok((t, v, from_ns(time)))
}

pub(crate) fn versions(inner: &Inner, path: &str) -> Result<Vec<VersionInfo>> {
    let log = inner.lock_log();
    let head = inner.lock_state().head.version;
    let mut out: Vec<VersionInfo> = Vec::new();
    let mut prev: Option<(u64, crate::format::InodeRec)> = None;
    let tokens: std::collections::HashMap<Version, (u64, Option<String>)> = inner
        .lock_state()
        .history
        .iter()
        .map(|c| (c.version, (c.writer_token, c.snapshot.clone())))
        .collect();
    replay_to(inner, &log, head, |t, v, time, changes| {
        let cur = t
            .resolve(path, false)
            .ok()
            .and_then(|ino| t.nodes.get(&ino).map(|n| (ino, n.rec.clone())));
        let touched = match changes {
            None => cur.is_some(),
            Some(c) => {
                let ino = cur.as_ref().map(|(i, _)| *i);
                cur.as_ref().map(|(i, r)| (*i, r)) != prev.as_ref().map(|(i, r)| (*i, r))
                    || ino.is_some_and(|i| {
                        c.inodes.iter().any(|(r, _)| r.ino == i)
                            || c.blocks.iter().any(|(b, _)| *b == i)
                            || c.removed.contains(&i)
                    })
            }
        };
        if touched {
            let (writer_token, snapshot) = tokens.get(&v).cloned().unwrap_or((0, None));
            out.push(VersionInfo {
                version: v,
                time: from_ns(time),
                writer_token,
                size: cur.as_ref().map(|(_, r)| r.size),
                snapshot,
            });
        }
        prev = cur;
        Ok(())
    })?;
    if out.is_empty() {
        return Err(VaultError::NotFound);
    }
    Ok(out)
}

/// Restores `path` (or everything) as of `spec` as a new, durable version.
pub(crate) fn restore(inner: &Inner, path: Option<&str>, spec: &VersionSpec) -> Result<Version> {
    let mut log = inner.lock_log();
    inner.commit_locked(&mut log, Vec::new(), None, false, false)?;
    let (old, _, _) = state_at_locked(inner, &log, spec)?;
    let mut f = |live: &Tree| -> Result<Changes> {
        let target = match path {
            None => old.clone(),
            Some(p) => restore_subtree(live, &old, p)?,
        };
        Ok(Tree::diff(live, &target))
    };
    inner.commit_locked(&mut log, Vec::new(), Some(&mut f), true, true)
}

/// `live` with the subtree at `path` replaced by `old`'s. Inodes of that subtree that
/// moved elsewhere since are moved back (with what they hold now dropped).
fn restore_subtree(live: &Tree, old: &Tree, path: &str) -> Result<Tree> {
    let old_ino = old
        .resolve(path, false)
        .map_err(|_| VaultError::NoVersion(format!("{path} did not exist at that version")))?;
    let (dir, name) = split_path(path)?;
    let mut target = live.clone();
    let parent = target.resolve(dir, true)?;
    target.dir(parent)?;
    let drop_subtree = |t: &mut Tree, ino: u64| {
        for i in t.subtree(ino) {
            if let Some(n) = t.nodes.remove(&i) {
                if let Some(p) = t.nodes.get_mut(&n.rec.parent) {
                    if p.children.get(&n.rec.name[..]) == Some(&i) {
                        p.children.remove(&n.rec.name[..]);
                    }
                }
            }
        }
    };
    if let Ok(cur) = target.lookup(parent, name) {
        drop_subtree(&mut target, cur);
    }
    let old_sub = old.subtree(old_ino);
    for i in &old_sub {
        if target.nodes.contains_key(i) {
            drop_subtree(&mut target, *i);
        }
    }
    for i in &old_sub {
        let mut n = old.nodes[i].clone();
        if *i == old_ino {
            n.rec.parent = parent;
            n.rec.name = name.to_vec();
        }
        target.nodes.insert(*i, n);
    }
    target
        .nodes
        .get_mut(&parent)
        .ok_or(VaultError::Invalid(
            "restore would move a directory under itself",
        ))?
        .children
        .insert(name.to_vec().into_boxed_slice(), old_ino);
    Ok(target)
}
