//! The in-memory state of one version: inodes, directory entries, block pointers. Built
//! from a checkpoint plus commits, changed by applying [`Changes`], compared by
//! [`Tree::diff`]. No I/O.

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::error::{Result, VaultError};
use crate::format::{BlockPtr, Changes, CheckpointEntry, CheckpointInode, InodeRec};
use crate::limits::{NAME_BYTES_MAX, SYMLINK_HOPS_MAX};
use crate::types::{Attr, DirEntry, FileKind, Ino, ROOT};

pub(crate) type Map<K, V> = HashMap<K, V, foldhash::fast::RandomState>;

#[derive(Clone, Debug)]
pub(crate) struct Node {
    pub rec: InodeRec,
    pub blocks: BTreeMap<u64, BlockPtr>,
    pub children: BTreeMap<Box<[u8]>, Ino>,
}

impl Node {
    pub fn new(rec: InodeRec) -> Node {
        Node {
            rec,
            blocks: BTreeMap::new(),
            children: BTreeMap::new(),
        }
    }
}

#[derive(Clone, Debug)]
pub(crate) struct Tree {
    pub nodes: Map<Ino, Node>,
    pub next_ino: Ino,
}

pub(crate) fn time_ns(t: SystemTime) -> i64 {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => d.as_nanos().min(i64::MAX as u128) as i64,
        Err(e) => -(e.duration().as_nanos().min(i64::MAX as u128) as i64),
    }
}

pub(crate) fn from_ns(ns: i64) -> SystemTime {
    if ns >= 0 {
        UNIX_EPOCH + Duration::from_nanos(ns as u64)
    } else {
        UNIX_EPOCH - Duration::from_nanos(ns.unsigned_abs())
    }
}

pub(crate) fn now_ns() -> i64 {
    time_ns(SystemTime::now())
}

/// A name a directory may hold.
pub(crate) fn check_name(name: &[u8]) -> Result<()> {
    if name.len() > NAME_BYTES_MAX {
        return Err(VaultError::TooLarge {
            what: "name",
            limit: NAME_BYTES_MAX as u64,
        });
    }
    if name.is_empty() || name == b"." || name == b".." || name.contains(&b'/') || name.contains(&0)
    {
        return Err(VaultError::InvalidName);
    }
    Ok(())
}

/// Splits a path helper's path into names ("/a/b", "a/b" and "a//b/" alike).
pub(crate) fn components(path: &str) -> impl Iterator<Item = &[u8]> {
    path.split('/')
        .filter(|c| !c.is_empty() && *c != ".")
        .map(str::as_bytes)
}

impl Tree {
    pub fn new_root(now: i64) -> Tree {
        let mut nodes = Map::default();
        nodes.insert(
            ROOT,
            Node::new(InodeRec {
                ino: ROOT,
                kind: FileKind::Dir,
                parent: 0,
                name: Vec::new(),
                mode: 0o755,
                uid: 0,
                gid: 0,
                atime: now,
                mtime: now,
                ctime: now,
                size: 0,
                target: Vec::new(),
            }),
        );
        Tree {
            nodes,
            next_ino: ROOT + 1,
        }
    }

    pub fn from_checkpoint(cp: &CheckpointEntry) -> Result<Tree> {
        let mut t = Tree {
            nodes: Map::default(),
            next_ino: cp.next_ino,
        };
        let changes = Changes {
            removed: Vec::new(),
            inodes: cp.inodes.iter().map(|i| (i.rec.clone(), None)).collect(),
            blocks: cp
                .inodes
                .iter()
                .filter(|i| !i.blocks.is_empty())
                .map(|i| (i.rec.ino, i.blocks.clone()))
                .collect(),
        };
        t.apply(&changes)?;
        t.check_root()?;
        Ok(t)
    }

    fn check_root(&self) -> Result<()> {
        match self.nodes.get(&ROOT) {
            Some(n) if n.rec.kind == FileKind::Dir => Ok(()),
            _ => Err(VaultError::format("tree", "no root directory")),
        }
    }

    pub fn checkpoint_inodes(&self) -> Vec<CheckpointInode> {
        let mut v: Vec<_> = self
            .nodes
            .values()
            .map(|n| CheckpointInode {
                rec: n.rec.clone(),
                blocks: n.blocks.iter().map(|(i, p)| (*i, *p)).collect(),
            })
            .collect();
        v.sort_by_key(|i| i.rec.ino);
        v
    }

    fn unlink_entry(&mut self, ino: Ino) {
        let (parent, name) = match self.nodes.get(&ino) {
            Some(n) => (n.rec.parent, n.rec.name.clone()),
            None => return,
        };
        if let Some(p) = self.nodes.get_mut(&parent) {
            if p.children.get(&name[..]) == Some(&ino) {
                p.children.remove(&name[..]);
            }
        }
    }

    /// Applies a change list: removals, then inode records (unlinking moved entries
    /// first, linking them after, so renames within one list never collide), then
    /// truncations and block pointers. Errors (never panics) on a list that breaks the
    /// tree: such a list authenticated, so it is a bug or a forged key, reported as
    /// `Format`.
    pub fn apply(&mut self, c: &Changes) -> Result<()> {
        for ino in &c.removed {
            if *ino == ROOT {
                return Err(VaultError::format("changes", "removes the root"));
            }
            self.unlink_entry(*ino);
            self.nodes.remove(ino);
        }
        for (rec, _) in &c.inodes {
            if let Some(old) = self.nodes.get(&rec.ino) {
                if old.rec.kind != rec.kind {
                    return Err(VaultError::format("changes", "changes an inode's kind"));
                }
                if old.rec.parent != rec.parent || old.rec.name != rec.name {
                    self.unlink_entry(rec.ino);
                }
            }
        }
        for (rec, trunc) in &c.inodes {
            let node = self
                .nodes
                .entry(rec.ino)
                .or_insert_with(|| Node::new(rec.clone()));
            node.rec = rec.clone();
            if let Some(t) = trunc {
                node.blocks.split_off(t);
            }
            self.next_ino = self.next_ino.max(rec.ino + 1);
        }
        for (rec, _) in &c.inodes {
            if rec.ino == ROOT {
                continue;
            }
            let parent = self
                .nodes
                .get_mut(&rec.parent)
                .filter(|p| p.rec.kind == FileKind::Dir)
                .ok_or_else(|| VaultError::format("changes", "entry under a missing directory"))?;
            match parent.children.get(&rec.name[..]) {
                Some(&other) if other != rec.ino => {
                    return Err(VaultError::format("changes", "two inodes under one name"))
                }
                _ => {
                    parent
                        .children
                        .insert(rec.name.clone().into_boxed_slice(), rec.ino);
                }
            }
        }
        for (ino, list) in &c.blocks {
            let node = self
                .nodes
                .get_mut(ino)
                .ok_or_else(|| VaultError::format("changes", "blocks of a missing inode"))?;
            for (idx, ptr) in list {
                node.blocks.insert(*idx, *ptr);
            }
        }
        Ok(())
    }

    /// The change list that turns `from` into `to`. Inode numbers are kept, so block
    /// pointers (whose seals bind the inode) stay valid.
    pub fn diff(from: &Tree, to: &Tree) -> Changes {
        let mut c = Changes::default();
        for ino in from.nodes.keys() {
            if !to.nodes.contains_key(ino) {
                c.removed.push(*ino);
            }
        }
        c.removed.sort_unstable();
        let mut inos: Vec<_> = to.nodes.keys().copied().collect();
        inos.sort_unstable();
        for ino in inos {
            let t = &to.nodes[&ino];
            let f = from.nodes.get(&ino).filter(|f| f.rec.kind == t.rec.kind);
            if f.is_none() {
                if from.nodes.contains_key(&ino) {
                    // Same number, other kind: remove first (cannot happen with numbers
                    // never reused, but stay correct).
                    c.removed.push(ino);
                }
                c.inodes.push((t.rec.clone(), Some(0)));
                if !t.blocks.is_empty() {
                    c.blocks
                        .push((ino, t.blocks.iter().map(|(i, p)| (*i, *p)).collect()));
                }
                continue;
            }
            let f = f.expect("checked");
            // The first index where the two block maps differ by a removal: truncate
            // there and re-add what `to` holds from it on.
            let mut trunc = None;
            for (idx, p) in &f.blocks {
                if t.blocks.get(idx) != Some(p) && !t.blocks.contains_key(idx) {
                    trunc = Some(*idx);
                    break;
                }
            }
            let blocks: Vec<(u64, BlockPtr)> = t
                .blocks
                .iter()
                .filter(|(i, p)| trunc.is_some_and(|tr| **i >= tr) || f.blocks.get(i) != Some(p))
                .map(|(i, p)| (*i, *p))
                .collect();
            if f.rec != t.rec || trunc.is_some() {
                c.inodes.push((t.rec.clone(), trunc));
            }
            if !blocks.is_empty() {
                c.blocks.push((ino, blocks));
            }
        }
        c
    }

    pub fn node(&self, ino: Ino) -> Result<&Node> {
        self.nodes.get(&ino).ok_or(VaultError::NotFound)
    }

    pub fn dir(&self, ino: Ino) -> Result<&Node> {
        let n = self.node(ino)?;
        if n.rec.kind != FileKind::Dir {
            return Err(VaultError::NotDir);
        }
        Ok(n)
    }

    pub fn lookup(&self, parent: Ino, name: &[u8]) -> Result<Ino> {
        let d = self.dir(parent)?;
        if name == b"." {
            return Ok(parent);
        }
        if name == b".." {
            return Ok(if parent == ROOT { ROOT } else { d.rec.parent });
        }
        d.children.get(name).copied().ok_or(VaultError::NotFound)
    }

    /// Resolves a path, following symlinks in every component but the last when
    /// `follow_last` is false.
    pub fn resolve(&self, path: &str, follow_last: bool) -> Result<Ino> {
        let mut hops = 0;
        let names: Vec<Vec<u8>> = components(path).map(|c| c.to_vec()).collect();
        self.resolve_names(ROOT, &names, follow_last, &mut hops)
    }

    fn resolve_names(
        &self,
        start: Ino,
        names: &[Vec<u8>],
        follow_last: bool,
        hops: &mut usize,
    ) -> Result<Ino> {
        let mut cur = start;
        for (i, name) in names.iter().enumerate() {
            let next = self.lookup(cur, name)?;
            let n = self.node(next)?;
            let last = i + 1 == names.len();
            if n.rec.kind == FileKind::Symlink && (!last || follow_last) {
                *hops += 1;
                if *hops > SYMLINK_HOPS_MAX {
                    return Err(VaultError::Invalid("too many symbolic links"));
                }
                let target = String::from_utf8_lossy(&n.rec.target).into_owned();
                let base = if target.starts_with('/') { ROOT } else { cur };
                let tnames: Vec<Vec<u8>> = components(&target).map(|c| c.to_vec()).collect();
                cur = self.resolve_names(base, &tnames, true, hops)?;
            } else {
                cur = next;
            }
        }
        Ok(cur)
    }

    pub fn attr(&self, ino: Ino, blksize: u32) -> Result<Attr> {
        let n = self.node(ino)?;
        Ok(attr_of(&n.rec, blksize))
    }

    pub fn readdir(&self, ino: Ino) -> Result<Vec<DirEntry>> {
        let d = self.dir(ino)?;
        let mut out = Vec::with_capacity(d.children.len());
        for (name, child) in &d.children {
            let kind = self
                .nodes
                .get(child)
                .map(|n| n.rec.kind)
                .unwrap_or(FileKind::File);
            out.push(DirEntry {
                ino: *child,
                name: name.to_vec(),
                kind,
            });
        }
        Ok(out)
    }

    /// Every inode under `ino` (itself included), parents before children.
    pub fn subtree(&self, ino: Ino) -> Vec<Ino> {
        let mut out = vec![ino];
        let mut i = 0;
        while i < out.len() {
            if let Some(n) = self.nodes.get(&out[i]) {
                out.extend(n.children.values().copied());
            }
            i += 1;
        }
        out
    }
}

pub(crate) fn attr_of(rec: &InodeRec, blksize: u32) -> Attr {
    Attr {
        ino: rec.ino,
        kind: rec.kind,
        size: rec.size,
        mode: rec.mode,
        uid: rec.uid,
        gid: rec.gid,
        atime: from_ns(rec.atime),
        mtime: from_ns(rec.mtime),
        ctime: from_ns(rec.ctime),
        nlink: if rec.kind == FileKind::Dir { 2 } else { 1 },
        blocks: rec.size.div_ceil(512),
        blksize,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(ino: Ino, parent: Ino, name: &str) -> InodeRec {
        InodeRec {
            ino,
            kind: FileKind::File,
            parent,
            name: name.as_bytes().to_vec(),
            mode: 0o644,
            uid: 0,
            gid: 0,
            atime: 0,
            mtime: 0,
            ctime: 0,
            size: 0,
            target: vec![],
        }
    }

    fn ptr(v: u64) -> BlockPtr {
        BlockPtr {
            segment: 1,
            offset: v as u32 * 100,
            len: 100,
            version: v,
        }
    }

    #[test]
    fn diff_then_apply_reaches_the_target() {
        let mut a = Tree::new_root(0);
        a.apply(&Changes {
            inodes: vec![(file(2, 1, "a"), None), (file(3, 1, "b"), None)],
            blocks: vec![(2, vec![(0, ptr(1)), (1, ptr(2)), (5, ptr(3))])],
            ..Default::default()
        })
        .unwrap();
        let mut b = a.clone();
        // Rename b over a, hole in the middle, new file named b.
        b.apply(&Changes {
            removed: vec![2],
            inodes: vec![(file(3, 1, "a"), None), (file(4, 1, "b"), None)],
            blocks: vec![(3, vec![(2, ptr(9))])],
        })
        .unwrap();
        let mut c = b.clone();
        c.apply(&Changes {
            inodes: vec![(file(3, 1, "a"), Some(0))],
            blocks: vec![(3, vec![(7, ptr(10))])],
            ..Default::default()
        })
        .unwrap();
        for (from, to) in [(&a, &b), (&b, &a), (&a, &c), (&c, &a), (&b, &c), (&c, &b)] {
            let d = Tree::diff(from, to);
            let mut x = from.clone();
            x.apply(&d).unwrap();
            let mut k1: Vec<_> = x.nodes.keys().collect();
            let mut k2: Vec<_> = to.nodes.keys().collect();
            k1.sort();
            k2.sort();
            assert_eq!(k1, k2);
            for (ino, n) in &to.nodes {
                assert_eq!(x.nodes[ino].rec, n.rec);
                assert_eq!(x.nodes[ino].blocks, n.blocks);
                assert_eq!(x.nodes[ino].children, n.children);
            }
            assert!(Tree::diff(&x, to).is_empty());
        }
    }

    #[test]
    fn names_are_checked() {
        assert!(check_name(b"ok").is_ok());
        for bad in [&b""[..], b".", b"..", b"a/b", b"a\0b"] {
            assert!(matches!(check_name(bad), Err(VaultError::InvalidName)));
        }
        assert!(matches!(
            check_name(&[b'x'; 256]),
            Err(VaultError::TooLarge { .. })
        ));
    }
}
