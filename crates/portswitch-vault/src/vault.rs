//! [`Vault`]: the inode-level API (for FUSE and the SQLite VFS) and the path helpers.
//! [`View`]: a read-only state as of one version.

use std::path::Path;
use std::sync::Arc;

use crate::engine::{Inner, Source, State};
use crate::error::{Result, VaultError};
use crate::format::{InodeRec, SnapshotOp};
use crate::limits::*;
use crate::tree::{attr_of, check_name, components, now_ns, time_ns, Node, Tree};
use crate::types::*;

/// An open vault. Cheap to clone; every clone is the same vault. All methods block
/// (call them from `spawn_blocking` in async code).
///
/// Changes are visible at once to every reader of this process; `commit` makes them a
/// version, `sync` (or `fsync`) a durable one. Dropping the last clone commits and
/// syncs (errors are logged): call [`Vault::close`] to see them.
#[derive(Clone)]
pub struct Vault {
    pub(crate) inner: Arc<Inner>,
}

impl std::fmt::Debug for Vault {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vault")
            .field("dir", &self.inner.dir)
            .finish_non_exhaustive()
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        if self.read_only {
            return;
        }
        let Ok(mut log) = self.log.lock() else { return };
        if let Err(e) = self.fence_check() {
            tracing::warn!(error = %e, "vault: closing without a final commit");
        } else if log.app.is_some() && log.poisoned.is_none() {
            if let Err(e) = self.commit_locked(&mut log, Vec::new(), None, false, true) {
                tracing::error!(error = %e, "vault: final commit on close failed");
            }
        }
        if let Err(e) = self.join_closers(&mut log) {
            tracing::error!(error = %e, "vault: closing a segment failed");
        }
    }
}

impl Vault {
    /// Creates a vault in `dir` (created if missing; it must not hold a vault).
    pub fn create(dir: impl AsRef<Path>, passphrase: &[u8], opts: CreateOptions) -> Result<Vault> {
        let inner = crate::open::create(dir.as_ref(), passphrase, &opts)?;
        Ok(Vault {
            inner: Arc::new(inner),
        })
    }

    /// Opens the vault in `dir`: checks the passphrase, replays the log, cuts a torn
    /// tail, brings the mirror up to date.
    pub fn open(dir: impl AsRef<Path>, passphrase: &[u8], opts: OpenOptions) -> Result<Vault> {
        let inner = crate::open::open(dir.as_ref(), passphrase, &opts)?;
        Ok(Vault {
            inner: Arc::new(inner),
        })
    }

    fn writable(&self) -> Result<()> {
        if self.inner.read_only {
            return Err(VaultError::ReadOnly);
        }
        self.inner.fence_check()
    }

    fn bs(&self) -> u32 {
        self.inner.block_bytes
    }

    // ---- inode operations -----------------------------------------------------------

    pub fn lookup(&self, parent: Ino, name: &[u8]) -> Result<Attr> {
        let st = self.inner.lock_state();
        let ino = st.tree.lookup(parent, name)?;
        st.tree.attr(ino, self.bs())
    }

    pub fn getattr(&self, ino: Ino) -> Result<Attr> {
        self.inner.lock_state().tree.attr(ino, self.bs())
    }

    /// Changes what `set` names; a size change truncates or extends (with zeros).
    pub fn setattr(&self, ino: Ino, set: SetAttr) -> Result<Attr> {
        self.writable()?;
        if let Some(size) = set.size {
            self.truncate(ino, size)?;
        }
        let mut st = self.inner.lock_state();
        let st = &mut *st;
        let node = st.tree.nodes.get_mut(&ino).ok_or(VaultError::NotFound)?;
        let r = &mut node.rec;
        if let Some(m) = set.mode {
            r.mode = m & 0o7777;
        }
        if let Some(u) = set.uid {
            r.uid = u;
        }
        if let Some(g) = set.gid {
            r.gid = g;
        }
        if let Some(t) = set.atime {
            r.atime = time_ns(t);
        }
        if let Some(t) = set.mtime {
            r.mtime = time_ns(t);
        }
        r.ctime = now_ns();
        st.changed.insert(ino);
        Ok(attr_of(&node.rec, self.bs()))
    }

    fn truncate(&self, ino: Ino, size: u64) -> Result<()> {
        if size > FILE_BYTES_MAX {
            return Err(VaultError::TooLarge {
                what: "file size",
                limit: FILE_BYTES_MAX,
            });
        }
        let bs = self.bs() as u64;
        let mut retries = 0;
        loop {
            // A cut inside a block keeps that block's head: read it first (outside the
            // lock) when only its committed copy has it.
            let peek = {
                let st = self.inner.lock_state();
                let n = st.tree.node(ino)?;
                match n.rec.kind {
                    FileKind::Dir => return Err(VaultError::IsDir),
                    FileKind::Symlink => return Err(VaultError::Invalid("truncate of a symlink")),
                    FileKind::File => {}
                }
                let idx = size / bs;
                let dirty = st.dirty.get(&ino).is_some_and(|d| d.contains_key(&idx));
                if size < n.rec.size && !size.is_multiple_of(bs) && !dirty {
                    n.blocks.get(&idx).copied()
                } else {
                    None
                }
            };
            let head = match &peek {
                Some(p) => match self.inner.fetch_block(ino, size / bs, p) {
                    Ok(b) => Some(b),
                    Err(e) if is_moved(&e) && retries < 3 => {
                        retries += 1;
                        continue;
                    }
                    Err(e) => return Err(e),
                },
                None => None,
            };
            let mut guard = self.inner.lock_state();
            let st = &mut *guard;
            let node = st.tree.nodes.get_mut(&ino).ok_or(VaultError::NotFound)?;
            let idx = size / bs;
            if peek.is_some() && node.blocks.get(&idx).copied() != peek {
                continue; // a commit moved it meanwhile
            }
            let old = node.rec.size;
            if size < old {
                let keep = size.div_ceil(bs);
                node.blocks.split_off(&keep);
                let t = st.trunc.entry(ino).or_insert(keep);
                *t = (*t).min(keep);
                if let Some(d) = st.dirty.get_mut(&ino) {
                    let gone = d.split_off(&keep);
                    st.dirty_bytes -= gone.values().map(|b| b.len() as u64).sum::<u64>();
                }
                let cut = (size % bs) as usize;
                if cut != 0 {
                    let d = st.dirty.entry(ino).or_default();
                    if let Some(b) = d.get_mut(&idx) {
                        if b.len() > cut {
                            st.dirty_bytes -= (b.len() - cut) as u64;
                            Arc::make_mut(b).truncate(cut);
                        }
                    } else if let Some(h) = head {
                        let data = h[..h.len().min(cut)].to_vec();
                        st.dirty_bytes += data.len() as u64;
                        d.insert(idx, Arc::new(data));
                        // The committed copy is superseded by the dirty one.
                    }
                    if d.is_empty() {
                        st.dirty.remove(&ino);
                    }
                }
            }
            node.rec.size = size;
            let now = now_ns();
            node.rec.mtime = now;
            node.rec.ctime = now;
            st.changed.insert(ino);
            return Ok(());
        }
    }

    fn new_inode(
        &self,
        parent: Ino,
        name: &[u8],
        kind: FileKind,
        mode: u32,
        target: &[u8],
    ) -> Result<Attr> {
        self.writable()?;
        check_name(name)?;
        if target.len() > SYMLINK_BYTES_MAX {
            return Err(VaultError::TooLarge {
                what: "symlink target",
                limit: SYMLINK_BYTES_MAX as u64,
            });
        }
        let mut guard = self.inner.lock_state();
        let st = &mut *guard;
        let p = st.tree.dir(parent)?;
        if p.children.contains_key(name) {
            return Err(VaultError::Exists);
        }
        if p.children.len() >= dir_entries_max() {
            return Err(VaultError::TooLarge {
                what: "directory entries",
                limit: DIR_ENTRIES_MAX as u64,
            });
        }
        if st.tree.nodes.len() as u64 >= INODES_MAX {
            return Err(VaultError::TooLarge {
                what: "inodes",
                limit: INODES_MAX,
            });
        }
        let ino = st.tree.next_ino;
        st.tree.next_ino += 1;
        let now = now_ns();
        let rec = InodeRec {
            ino,
            kind,
            parent,
            name: name.to_vec(),
            mode: mode & 0o7777,
            uid: 0,
            gid: 0,
            atime: now,
            mtime: now,
            ctime: now,
            size: target.len() as u64,
            target: target.to_vec(),
        };
        let attr = attr_of(&rec, self.bs());
        st.tree.nodes.insert(ino, Node::new(rec));
        let p = st.tree.nodes.get_mut(&parent).expect("parent checked");
        p.children.insert(name.to_vec().into_boxed_slice(), ino);
        p.rec.mtime = now;
        p.rec.ctime = now;
        st.changed.insert(ino);
        st.changed.insert(parent);
        Ok(attr)
    }

    /// Creates an empty regular file (the FUSE `create`; named so beside the
    /// constructor [`Vault::create`]).
    pub fn create_file(&self, parent: Ino, name: &[u8], mode: u32) -> Result<Attr> {
        self.new_inode(parent, name, FileKind::File, mode, b"")
    }

    pub fn mkdir(&self, parent: Ino, name: &[u8], mode: u32) -> Result<Attr> {
        self.new_inode(parent, name, FileKind::Dir, mode, b"")
    }

    pub fn symlink(&self, parent: Ino, name: &[u8], target: &[u8]) -> Result<Attr> {
        if target.is_empty() {
            return Err(VaultError::Invalid("empty symlink target"));
        }
        self.new_inode(parent, name, FileKind::Symlink, 0o777, target)
    }

    pub fn readlink(&self, ino: Ino) -> Result<Vec<u8>> {
        let st = self.inner.lock_state();
        let n = st.tree.node(ino)?;
        if n.rec.kind != FileKind::Symlink {
            return Err(VaultError::Invalid("not a symbolic link"));
        }
        Ok(n.rec.target.clone())
    }

    fn remove_entry(st: &mut State, parent: Ino, name: &[u8], dir: bool) -> Result<()> {
        let ino = st.tree.lookup(parent, name)?;
        if name == b"." || name == b".." {
            return Err(VaultError::InvalidName);
        }
        let n = st.tree.node(ino)?;
        match (n.rec.kind == FileKind::Dir, dir) {
            (true, false) => return Err(VaultError::IsDir),
            (false, true) => return Err(VaultError::NotDir),
            (true, true) if !n.children.is_empty() => return Err(VaultError::NotEmpty),
            _ => {}
        }
        Self::drop_inode(st, ino);
        let now = now_ns();
        let p = st.tree.nodes.get_mut(&parent).expect("parent exists");
        p.children.remove(name);
        p.rec.mtime = now;
        p.rec.ctime = now;
        st.changed.insert(parent);
        Ok(())
    }

    fn drop_inode(st: &mut State, ino: Ino) {
        st.tree.nodes.remove(&ino);
        if let Some(d) = st.dirty.remove(&ino) {
            st.dirty_bytes -= d.values().map(|b| b.len() as u64).sum::<u64>();
        }
        st.trunc.remove(&ino);
        st.changed.insert(ino);
    }

    pub fn unlink(&self, parent: Ino, name: &[u8]) -> Result<()> {
        self.writable()?;
        Self::remove_entry(&mut self.inner.lock_state(), parent, name, false)
    }

    pub fn rmdir(&self, parent: Ino, name: &[u8]) -> Result<()> {
        self.writable()?;
        Self::remove_entry(&mut self.inner.lock_state(), parent, name, true)
    }

    /// Renames, replacing a target file (or an empty directory by a directory), as
    /// POSIX `rename(2)`.
    pub fn rename(&self, parent: Ino, name: &[u8], new_parent: Ino, new_name: &[u8]) -> Result<()> {
        self.writable()?;
        check_name(new_name)?;
        let mut guard = self.inner.lock_state();
        let st = &mut *guard;
        let src = st.tree.lookup(parent, name)?;
        if name == b"." || name == b".." {
            return Err(VaultError::InvalidName);
        }
        st.tree.dir(new_parent)?;
        let src_dir = st.tree.node(src)?.rec.kind == FileKind::Dir;
        // A directory cannot move under itself.
        if src_dir {
            let mut a = new_parent;
            loop {
                if a == src {
                    return Err(VaultError::Invalid("rename of a directory under itself"));
                }
                if a == ROOT {
                    break;
                }
                a = st.tree.node(a)?.rec.parent;
            }
        }
        // A new name in another directory adds an entry there: the same limit as for
        // a new inode (a replaced target or a rename in place adds none).
        if new_parent != parent
            && st.tree.lookup(new_parent, new_name).is_err()
            && st.tree.dir(new_parent)?.children.len() >= dir_entries_max()
        {
            return Err(VaultError::TooLarge {
                what: "directory entries",
                limit: dir_entries_max() as u64,
            });
        }
        if let Ok(dst) = st.tree.lookup(new_parent, new_name) {
            if dst == src {
                return Ok(());
            }
            let d = st.tree.node(dst)?;
            let dst_dir = d.rec.kind == FileKind::Dir;
            match (src_dir, dst_dir) {
                (true, false) => return Err(VaultError::NotDir),
                (false, true) => return Err(VaultError::IsDir),
                (true, true) if !d.children.is_empty() => return Err(VaultError::NotEmpty),
                _ => {}
            }
            Self::drop_inode(st, dst);
            st.tree
                .nodes
                .get_mut(&new_parent)
                .expect("checked")
                .children
                .remove(new_name);
        }
        let now = now_ns();
        st.tree
            .nodes
            .get_mut(&parent)
            .expect("checked")
            .children
            .remove(name);
        let np = st.tree.nodes.get_mut(&new_parent).expect("checked");
        np.children
            .insert(new_name.to_vec().into_boxed_slice(), src);
        np.rec.mtime = now;
        np.rec.ctime = now;
        let p = st.tree.nodes.get_mut(&parent).expect("checked");
        p.rec.mtime = now;
        p.rec.ctime = now;
        let n = st.tree.nodes.get_mut(&src).expect("checked");
        n.rec.parent = new_parent;
        n.rec.name = new_name.to_vec();
        n.rec.ctime = now;
        st.changed.insert(src);
        st.changed.insert(parent);
        st.changed.insert(new_parent);
        Ok(())
    }

    pub fn readdir(&self, ino: Ino) -> Result<Vec<DirEntry>> {
        self.inner.lock_state().tree.readdir(ino)
    }

    /// Reads up to `buf.len()` bytes at `offset`; fewer at the end of the file. Every
    /// block is authenticated (or comes from the cache of authenticated blocks).
    pub fn read(&self, ino: Ino, offset: u64, buf: &mut [u8]) -> Result<usize> {
        // A gc may move blocks and delete their old segment between planning a read and
        // reading: plan again then (the new pointers are installed before the delete).
        let mut tries = 0;
        loop {
            match self.read_once(ino, offset, buf) {
                Err(e) if is_moved(&e) && tries < 3 => tries += 1,
                r => return r,
            }
        }
    }

    fn read_once(&self, ino: Ino, offset: u64, buf: &mut [u8]) -> Result<usize> {
        let bs = self.bs() as u64;
        let (n, plan) = {
            let st = self.inner.lock_state();
            let node = st.tree.node(ino)?;
            let Some((n, first, last)) = read_span(node, offset, buf.len(), bs)? else {
                return Ok(0);
            };
            let dirty = st.dirty.get(&ino);
            let mut plan = Vec::with_capacity((last - first + 1) as usize);
            for idx in first..=last {
                let s = if let Some(b) = dirty.and_then(|d| d.get(&idx)) {
                    Source::Dirty(b.clone())
                } else if let Some(p) = node.blocks.get(&idx) {
                    Source::Ptr(*p)
                } else {
                    Source::Hole
                };
                plan.push((idx, s));
            }
            (n, plan)
        };
        #[cfg(test)]
        if let Some(hook) = AFTER_PLAN.with(|h| h.borrow_mut().take()) {
            hook(self);
        }
        self.inner.read_plan(ino, offset, &plan, &mut buf[..n])?;
        self.inner.metrics.reads.inc();
        self.inner.metrics.read_bytes.inc_by(n as u64);
        Ok(n)
    }

    /// Writes `data` at `offset`, extending the file as needed. Visible at once; part
    /// of the next commit. Past the dirty-bytes limit this call commits.
    pub fn write(&self, ino: Ino, offset: u64, data: &[u8]) -> Result<usize> {
        self.writable()?;
        let end = offset
            .checked_add(data.len() as u64)
            .filter(|e| *e <= FILE_BYTES_MAX)
            .ok_or(VaultError::TooLarge {
                what: "file size",
                limit: FILE_BYTES_MAX,
            })?;
        if data.is_empty() {
            self.inner.lock_state().tree.node(ino)?;
            return Ok(0);
        }
        let bs = self.bs() as u64;
        let mut pos = offset;
        let mut over = false;
        let mut retries = 0;
        while pos < end {
            // Take the lock for a run of blocks; leave it only to read a block that a
            // partial write must merge with.
            let mut need: Option<(u64, crate::format::BlockPtr)> = None;
            {
                let mut guard = self.inner.lock_state();
                let st = &mut *guard;
                let node = st.tree.nodes.get(&ino).ok_or(VaultError::NotFound)?;
                match node.rec.kind {
                    FileKind::Dir => return Err(VaultError::IsDir),
                    FileKind::Symlink => return Err(VaultError::Invalid("write to a symlink")),
                    FileKind::File => {}
                }
                let size = node.rec.size;
                while pos < end {
                    let idx = pos / bs;
                    let in_block = (pos % bs) as usize;
                    let n = ((bs - pos % bs).min(end - pos)) as usize;
                    let chunk = &data[(pos - offset) as usize..(pos - offset) as usize + n];
                    let d = st.dirty.entry(ino).or_default();
                    let delta: i64 = if let Some(b) = d.get_mut(&idx) {
                        let b = Arc::make_mut(b);
                        let before = b.len();
                        if b.len() < in_block + n {
                            b.resize(in_block + n, 0);
                        }
                        b[in_block..in_block + n].copy_from_slice(chunk);
                        b.len() as i64 - before as i64
                    } else {
                        let whole = in_block == 0 && (n as u64 == bs || pos + n as u64 >= size);
                        let committed = node.blocks.get(&idx).copied();
                        match committed {
                            Some(p) if !whole => {
                                need = Some((idx, p));
                                break;
                            }
                            _ => {
                                let mut b = vec![0u8; in_block + n];
                                b[in_block..].copy_from_slice(chunk);
                                let len = b.len() as i64;
                                d.insert(idx, Arc::new(b));
                                len
                            }
                        }
                    };
                    st.dirty_bytes = (st.dirty_bytes as i64 + delta) as u64;
                    pos += n as u64;
                }
                if st.dirty.get(&ino).is_some_and(|d| d.is_empty()) {
                    st.dirty.remove(&ino);
                }
                let node = st.tree.nodes.get_mut(&ino).expect("checked");
                if pos > node.rec.size {
                    node.rec.size = pos;
                }
                let now = now_ns();
                node.rec.mtime = now;
                node.rec.ctime = now;
                st.changed.insert(ino);
                over = st.dirty_bytes > self.inner.dirty_limit;
                self.inner.metrics.dirty_bytes.set(st.dirty_bytes as i64);
            }
            if let Some((idx, p)) = need {
                // Merge with the committed block: read it, then install it as dirty
                // unless someone else did meanwhile (the loop then writes over theirs).
                let old = match self.inner.fetch_block(ino, idx, &p) {
                    Ok(b) => b,
                    // A gc moved the block and removed its old segment meanwhile.
                    Err(e) if is_moved(&e) && retries < 3 => {
                        retries += 1;
                        continue;
                    }
                    Err(e) => return Err(e),
                };
                let mut guard = self.inner.lock_state();
                let st = &mut *guard;
                let node = st.tree.nodes.get(&ino).ok_or(VaultError::NotFound)?;
                let still = node.blocks.get(&idx) == Some(&p);
                let d = st.dirty.entry(ino).or_default();
                if still && !d.contains_key(&idx) {
                    // Only the part within the file's size is data.
                    let keep =
                        (node.rec.size.saturating_sub(idx * bs)).min(old.len() as u64) as usize;
                    let b = old[..keep].to_vec();
                    st.dirty_bytes += b.len() as u64;
                    d.insert(idx, Arc::new(b));
                }
            }
        }
        self.inner.metrics.writes.inc();
        self.inner.metrics.write_bytes.inc_by(data.len() as u64);
        if over {
            self.commit()?;
        }
        Ok(data.len())
    }

    /// Makes everything written so far a new version (not yet durable). Returns the
    /// head version (unchanged when nothing was pending).
    pub fn commit(&self) -> Result<Version> {
        self.writable()?;
        let mut log = self.inner.lock_log();
        let v = self
            .inner
            .commit_locked(&mut log, Vec::new(), None, false, false)?;
        drop(log);
        crate::maint::after_commit(&self.inner);
        Ok(v)
    }

    /// `sync` (the whole vault: commits are global, so one file's fsync is all of it).
    pub fn fsync(&self, ino: Ino) -> Result<()> {
        self.inner.lock_state().tree.node(ino)?;
        self.sync().map(|_| ())
    }

    /// Commits and makes the log (and the mirror) durable.
    pub fn sync(&self) -> Result<Version> {
        self.writable()?;
        let mut log = self.inner.lock_log();
        let v = self
            .inner
            .commit_locked(&mut log, Vec::new(), None, false, true)?;
        drop(log);
        crate::maint::after_commit(&self.inner);
        Ok(v)
    }

    pub fn statfs(&self) -> Result<StatFs> {
        let fs = rustix::fs::statvfs(&self.inner.dir).map_err(std::io::Error::from)?;
        let inodes = self.inner.lock_state().tree.nodes.len() as u64;
        Ok(StatFs {
            blocks: fs.f_blocks,
            bfree: fs.f_bfree,
            bavail: fs.f_bavail,
            files: inodes + fs.f_ffree.min(INODES_MAX - inodes),
            ffree: fs.f_ffree.min(INODES_MAX - inodes),
            bsize: fs.f_bsize as u32,
            frsize: fs.f_frsize as u32,
            namelen: NAME_BYTES_MAX as u32,
        })
    }

    pub fn stats(&self) -> Stats {
        crate::maint::stats(&self.inner)
    }

    pub fn head(&self) -> Head {
        self.inner.lock_state().head
    }

    pub fn vault_id(&self) -> [u8; 16] {
        self.inner.crypt.vault_id
    }

    pub fn block_bytes(&self) -> u32 {
        self.bs()
    }

    pub fn is_read_only(&self) -> bool {
        self.inner.read_only
    }

    /// Commits, syncs and closes (when this is the last clone; otherwise only the
    /// commit and sync).
    pub fn close(self) -> Result<()> {
        if !self.inner.read_only {
            self.sync()?;
        }
        Ok(())
    }

    // ---- path helpers ---------------------------------------------------------------

    /// The attributes of `path` ("/a/b"; symlinks followed).
    pub fn resolve(&self, path: &str) -> Result<Attr> {
        let st = self.inner.lock_state();
        let ino = st.tree.resolve(path, true)?;
        st.tree.attr(ino, self.bs())
    }

    pub fn read_file(&self, path: &str) -> Result<Vec<u8>> {
        let a = self.resolve(path)?;
        read_all(a.size, |off, buf| self.read(a.ino, off, buf))
    }

    fn parent_and_name<'p>(&self, path: &'p str) -> Result<(Ino, &'p [u8])> {
        let (dir, name) = split_path(path)?;
        let st = self.inner.lock_state();
        let ino = st.tree.resolve(dir, true)?;
        st.tree.dir(ino)?;
        Ok((ino, name))
    }

    /// Creates or replaces the file at `path` with `data` (its directory must exist).
    pub fn write_file(&self, path: &str, data: &[u8]) -> Result<()> {
        self.writable()?;
        let (parent, name) = self.parent_and_name(path)?;
        let ino = match self.lookup(parent, name) {
            Ok(a) if a.kind == FileKind::Dir => return Err(VaultError::IsDir),
            Ok(a) => {
                self.setattr(
                    a.ino,
                    SetAttr {
                        size: Some(0),
                        ..Default::default()
                    },
                )?;
                a.ino
            }
            Err(VaultError::NotFound) => self.create_file(parent, name, 0o644)?.ino,
            Err(e) => return Err(e),
        };
        let mut off = 0;
        for chunk in data.chunks(1 << 20) {
            self.write(ino, off, chunk)?;
            off += chunk.len() as u64;
        }
        Ok(())
    }

    /// Creates `path` and every missing directory above it.
    pub fn mkdir_all(&self, path: &str) -> Result<Attr> {
        self.writable()?;
        let mut cur = self.getattr(ROOT)?;
        for name in components(path) {
            cur = match self.lookup(cur.ino, name) {
                Ok(a) if a.kind == FileKind::Dir => a,
                Ok(_) => return Err(VaultError::NotDir),
                Err(VaultError::NotFound) => match self.mkdir(cur.ino, name, 0o755) {
                    Ok(a) => a,
                    Err(VaultError::Exists) => self.lookup(cur.ino, name)?,
                    Err(e) => return Err(e),
                },
                Err(e) => return Err(e),
            };
        }
        Ok(cur)
    }

    pub fn list(&self, path: &str) -> Result<Vec<DirEntry>> {
        let a = self.resolve(path)?;
        self.readdir(a.ino)
    }

    /// Removes a file, symlink or empty directory.
    pub fn remove(&self, path: &str) -> Result<()> {
        self.writable()?;
        let (parent, name) = self.parent_and_name(path)?;
        let a = self.lookup(parent, name)?;
        if a.kind == FileKind::Dir {
            self.rmdir(parent, name)
        } else {
            self.unlink(parent, name)
        }
    }

    // ---- versions -------------------------------------------------------------------

    /// The versions at which `path` changed (was created, written, renamed to or
    /// from, or removed), oldest first, within the retained history.
    pub fn versions(&self, path: &str) -> Result<Vec<VersionInfo>> {
        crate::history::versions(&self.inner, path)
    }

    /// Every retained version, oldest first (the retention horizon first).
    pub fn history(&self) -> Result<Vec<VersionInfo>> {
        Ok(crate::history::history(&self.inner))
    }

    /// Commits what is pending, then a commit naming the resulting state `name`.
    /// Instant: nothing is copied. Returns the version the snapshot names.
    pub fn snapshot(&self, name: &str) -> Result<Version> {
        self.writable()?;
        if name.is_empty() || name.len() > SNAPSHOT_NAME_BYTES_MAX {
            return Err(VaultError::InvalidName);
        }
        let mut log = self.inner.lock_log();
        self.inner
            .commit_locked(&mut log, Vec::new(), None, false, false)?;
        if self.inner.lock_state().snapshots.contains_key(name) {
            return Err(VaultError::Exists);
        }
        let v = self.inner.commit_locked(
            &mut log,
            vec![SnapshotOp::Create(name.to_string())],
            None,
            true,
            true,
        )?;
        drop(log);
        crate::maint::after_commit(&self.inner);
        Ok(v)
    }

    pub fn snapshots(&self) -> Result<Vec<SnapshotInfo>> {
        let mut v: Vec<_> = self
            .inner
            .lock_state()
            .snapshots
            .values()
            .cloned()
            .collect();
        v.sort_by_key(|s| s.version);
        Ok(v)
    }

    /// Forgets a snapshot (its versions then follow the retention policy).
    pub fn delete_snapshot(&self, name: &str) -> Result<Version> {
        self.writable()?;
        let mut log = self.inner.lock_log();
        if !self.inner.lock_state().snapshots.contains_key(name) {
            return Err(VaultError::NotFound);
        }
        self.inner.commit_locked(
            &mut log,
            vec![SnapshotOp::Delete(name.to_string())],
            None,
            true,
            true,
        )
    }

    /// A read-only view of the vault as of `spec`.
    pub fn at(&self, spec: VersionSpec) -> Result<View> {
        let (tree, version, time) = crate::history::state_at(&self.inner, &spec)?;
        Ok(View {
            inner: self.inner.clone(),
            tree: Arc::new(tree),
            version,
            time,
        })
    }

    /// Writes `path` (file, symlink or whole directory tree) as it was at `spec` as a
    /// new version. History is not rewritten.
    pub fn restore(&self, path: &str, spec: VersionSpec) -> Result<Version> {
        self.writable()?;
        let v = crate::history::restore(&self.inner, Some(path), &spec)?;
        crate::maint::after_commit(&self.inner);
        Ok(v)
    }

    /// Writes the whole vault as it was at `spec` as a new version.
    pub fn restore_all(&self, spec: VersionSpec) -> Result<Version> {
        self.writable()?;
        let v = crate::history::restore(&self.inner, None, &spec)?;
        crate::maint::after_commit(&self.inner);
        Ok(v)
    }

    // ---- keys and maintenance ---------------------------------------------------------

    /// Rewraps the data keys under a key derived from `new` (only the header is
    /// rewritten). `old` must be the current passphrase.
    pub fn change_passphrase(&self, old: &[u8], new: &[u8]) -> Result<()> {
        self.writable()?;
        crate::maint::change_passphrase(&self.inner, old, new)
    }

    /// Makes a new data key active for every later seal; returns its id. Old keys stay
    /// (to open old records) until [`Vault::reseal`] rewrites those records.
    pub fn rotate_key(&self) -> Result<u32> {
        self.writable()?;
        let mut log = self.inner.lock_log();
        self.inner
            .commit_locked(&mut log, Vec::new(), None, false, true)?;
        self.inner.rotate_locked(&mut log)
    }

    /// Rewrites every live record sealed under an old key with the active key, then
    /// drops the old keys from the header.
    pub fn reseal(&self) -> Result<ResealReport> {
        self.writable()?;
        crate::maint::reseal(&self.inner)
    }

    /// Scrubs every record (both copies when there is a mirror) and the parity files;
    /// with `repair`, writes good copies over damaged ones.
    pub fn check(&self, repair: bool) -> Result<CheckReport> {
        crate::maint::check(&self.inner, repair)
    }

    /// Ships what `dir` does not have yet (incremental), fsyncs, and verifies it by
    /// reading it back. `dir` becomes (or stays) a vault that `open` and `check` accept.
    pub fn backup_to(&self, dir: impl AsRef<Path>) -> Result<BackupReport> {
        let mut t = crate::target::DirTarget::new(dir.as_ref());
        crate::maint::backup_to(&self.inner, &mut t)
    }

    /// [`Vault::backup_to`] any [`BackupTarget`](crate::target::BackupTarget): a
    /// directory, or a backup server on another node (`portswitch-vault-remote`).
    pub fn backup_to_target(
        &self,
        target: &mut dyn crate::target::BackupTarget,
    ) -> Result<BackupReport> {
        crate::maint::backup_to(&self.inner, target)
    }

    /// Sets a copy on another node (a backup server's `RemoteTarget`) to repair
    /// damaged records from when the mirror and the parity cannot; `None` unsets it.
    pub fn set_remote_copy(&self, target: Option<Box<dyn crate::target::BackupTarget>>) {
        *self.inner.remote.lock().unwrap_or_else(|p| p.into_inner()) = target;
    }

    /// After every durable commit, ship it to `dir` from a background thread (errors
    /// are logged and counted; the next commit retries).
    pub fn continuous_backup(&self, dir: impl AsRef<Path>) -> Result<()> {
        let t = crate::target::DirTarget::new(dir.as_ref());
        crate::maint::continuous_backup(&self.inner, Box::new(t))
    }

    /// [`Vault::continuous_backup`] to any target.
    pub fn continuous_backup_to_target(
        &self,
        target: Box<dyn crate::target::BackupTarget>,
    ) -> Result<()> {
        crate::maint::continuous_backup(&self.inner, target)
    }

    /// Drops versions outside `retention` and compacts segments whose live share fell
    /// below half.
    pub fn gc(&self, retention: Retention) -> Result<GcReport> {
        self.writable()?;
        crate::maint::gc(&self.inner, &retention)
    }

    /// A clone of the vault's metrics (the counters are shared).
    pub fn metrics(&self) -> crate::metrics::Metrics {
        self.inner.metrics.clone()
    }

    /// A Prometheus registry holding this vault's metrics (prefix `vault_`).
    pub fn metrics_registry(&self) -> prometheus_client::registry::Registry {
        let mut r = prometheus_client::registry::Registry::default();
        self.inner.metrics.register(&mut r);
        r
    }
}

/// Entries one directory may hold ([`DIR_ENTRIES_MAX`]; tests lower it).
fn dir_entries_max() -> usize {
    #[cfg(test)]
    if let Some(n) = TEST_DIR_ENTRIES_MAX.with(|c| c.get()) {
        return n;
    }
    DIR_ENTRIES_MAX
}

/// A test hook run between planning a read and reading.
#[cfg(test)]
pub(crate) type ReadHook = Box<dyn FnOnce(&Vault)>;

#[cfg(test)]
thread_local! {
    /// Test override of [`DIR_ENTRIES_MAX`] (filling 2^24 entries is too slow).
    pub(crate) static TEST_DIR_ENTRIES_MAX: std::cell::Cell<Option<usize>> =
        const { std::cell::Cell::new(None) };

    /// Test hook: run once between planning a read and reading (to race a gc there).
    pub(crate) static AFTER_PLAN: std::cell::RefCell<Option<ReadHook>> =
        const { std::cell::RefCell::new(None) };
}

/// Whether an error is a read of a segment a gc just removed (the caller plans again:
/// the moved block's new pointer is installed before the old segment goes).
/// What a read of `len` bytes at `offset` covers in a file: the bytes it returns and
/// its first and last block; `None` at or past the end (or for an empty buffer).
/// Shared by the live vault and a view, which differ only in where blocks come from.
fn read_span(node: &Node, offset: u64, len: usize, bs: u64) -> Result<Option<(usize, u64, u64)>> {
    match node.rec.kind {
        FileKind::Dir => return Err(VaultError::IsDir),
        FileKind::Symlink => return Err(VaultError::Invalid("read of a symlink")),
        FileKind::File => {}
    }
    let size = node.rec.size;
    if offset >= size || len == 0 {
        return Ok(None);
    }
    let n = (len as u64).min(size - offset) as usize;
    Ok(Some((n, offset / bs, (offset + n as u64 - 1) / bs)))
}

fn is_moved(e: &VaultError) -> bool {
    e.is_missing_segment()
}

/// Splits "/a/b/c" into ("/a/b", "c").
pub(crate) fn split_path(path: &str) -> Result<(&str, &[u8])> {
    let trimmed = path.trim_end_matches('/');
    let (dir, name) = match trimmed.rfind('/') {
        Some(i) => (&trimmed[..i], &trimmed[i + 1..]),
        None => ("", trimmed),
    };
    if name.is_empty() || name == "." || name == ".." {
        return Err(VaultError::InvalidName);
    }
    Ok((dir, name.as_bytes()))
}

fn read_all(size: u64, mut read: impl FnMut(u64, &mut [u8]) -> Result<usize>) -> Result<Vec<u8>> {
    if size > isize::MAX as u64 {
        return Err(VaultError::TooLarge {
            what: "file for read_file",
            limit: isize::MAX as u64,
        });
    }
    let mut out = vec![0u8; size as usize];
    let mut off = 0usize;
    while off < out.len() {
        let n = read(off as u64, &mut out[off..])?;
        if n == 0 {
            break;
        }
        off += n;
    }
    out.truncate(off);
    Ok(out)
}

/// A read-only view of the vault as of one version (from [`Vault::at`]).
#[derive(Clone)]
pub struct View {
    inner: Arc<Inner>,
    tree: Arc<Tree>,
    version: Version,
    time: std::time::SystemTime,
}

impl std::fmt::Debug for View {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("View")
            .field("version", &self.version)
            .finish_non_exhaustive()
    }
}

impl View {
    pub fn version(&self) -> Version {
        self.version
    }

    pub fn time(&self) -> std::time::SystemTime {
        self.time
    }

    pub fn lookup(&self, parent: Ino, name: &[u8]) -> Result<Attr> {
        let ino = self.tree.lookup(parent, name)?;
        self.tree.attr(ino, self.inner.block_bytes)
    }

    pub fn getattr(&self, ino: Ino) -> Result<Attr> {
        self.tree.attr(ino, self.inner.block_bytes)
    }

    pub fn readlink(&self, ino: Ino) -> Result<Vec<u8>> {
        let n = self.tree.node(ino)?;
        if n.rec.kind != FileKind::Symlink {
            return Err(VaultError::Invalid("not a symbolic link"));
        }
        Ok(n.rec.target.clone())
    }

    pub fn readdir(&self, ino: Ino) -> Result<Vec<DirEntry>> {
        self.tree.readdir(ino)
    }

    pub fn read(&self, ino: Ino, offset: u64, buf: &mut [u8]) -> Result<usize> {
        let bs = self.inner.block_bytes as u64;
        let node = self.tree.node(ino)?;
        let Some((n, first, last)) = read_span(node, offset, buf.len(), bs)? else {
            return Ok(0);
        };
        let plan: Vec<(u64, Source)> = (first..=last)
            .map(|idx| match node.blocks.get(&idx) {
                Some(p) => (idx, Source::Ptr(*p)),
                None => (idx, Source::Hole),
            })
            .collect();
        self.inner.read_plan(ino, offset, &plan, &mut buf[..n])?;
        Ok(n)
    }

    pub fn resolve(&self, path: &str) -> Result<Attr> {
        let ino = self.tree.resolve(path, true)?;
        self.tree.attr(ino, self.inner.block_bytes)
    }

    pub fn read_file(&self, path: &str) -> Result<Vec<u8>> {
        let a = self.resolve(path)?;
        read_all(a.size, |off, buf| self.read(a.ino, off, buf))
    }

    pub fn list(&self, path: &str) -> Result<Vec<DirEntry>> {
        let a = self.resolve(path)?;
        self.readdir(a.ino)
    }
}
