//! [`VaultFs`]: the `fuser::Filesystem` callbacks, each one call of the vault's inode
//! API. No lock is held across a vault call, so the worker threads run in parallel.

use std::cell::RefCell;
use std::collections::{HashMap, HashSet};
use std::ffi::OsStr;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use fuser::{
    Errno, FileAttr, FileHandle, FileType, FopenFlags, Generation, INodeNo, InitFlags,
    KernelConfig, LockOwner, OpenFlags, RenameFlags, ReplyAttr, ReplyCreate, ReplyData,
    ReplyDirectory, ReplyEmpty, ReplyEntry, ReplyOpen, ReplyStatfs, ReplyWrite, Request, TimeOrNow,
    WriteFlags,
};
use portswitch_vault::{Attr, DirEntry, FileKind, Ino, SetAttr, Vault, VaultError};

use crate::limits;
use crate::metrics::{CommitReason, FuseMetrics, Op};
use crate::MountOptions;

/// File-type bits of a mode (`S_IFMT`) and the regular-file type (`S_IFREG`).
const MODE_TYPE_MASK: u32 = 0o170_000;
const MODE_REGULAR: u32 = 0o100_000;
/// Permission bits, with setuid, setgid and sticky.
const MODE_PERMISSIONS: u32 = 0o7777;

/// Inodes are never reused within a vault, so one generation serves them all.
const GENERATION: Generation = Generation(0);

/// A directory under the root, hidden from the mount, where a file unlinked while open
/// waits (under its inode number) for its last close: POSIX lets the open descriptors
/// go on reading and writing it. The next mount empties it (after a crash).
pub(crate) const UNLINKED_DIR: &[u8] = b".portswitch-vault-unlinked";

/// State shared by the callbacks and the background threads.
#[derive(Debug)]
pub(crate) struct Shared {
    /// Something was changed since the last commit began.
    pub(crate) dirty: AtomicBool,
    pub(crate) metrics: FuseMetrics,
    /// A commit happened since the last backup began (only when a backup is set).
    pub(crate) backup_due: Mutex<bool>,
    pub(crate) backup_wake: std::sync::Condvar,
    /// Continuous backup target, if any.
    pub(crate) backup: Option<crate::BackupTo>,
}

impl Shared {
    pub(crate) fn new(backup: Option<crate::BackupTo>) -> Shared {
        Shared {
            dirty: AtomicBool::new(false),
            metrics: FuseMetrics::default(),
            backup_due: Mutex::new(false),
            backup_wake: std::sync::Condvar::new(),
            backup,
        }
    }

    /// Commits what is uncommitted (if anything) and tells the backup thread.
    pub(crate) fn commit(&self, vault: &Vault, reason: CommitReason) -> Result<(), VaultError> {
        if !self.dirty.swap(false, Ordering::AcqRel) {
            return Ok(());
        }
        match vault.commit() {
            Ok(_) => {
                self.metrics.commit(reason);
                self.backup_after_commit();
                Ok(())
            }
            Err(e) => {
                // Still uncommitted: the next close or tick tries again.
                self.dirty.store(true, Ordering::Release);
                self.metrics.commit_failures.inc();
                Err(e)
            }
        }
    }

    /// fsync: commit everything and make it durable.
    pub(crate) fn fsync(&self, vault: &Vault, ino: Ino) -> Result<(), VaultError> {
        let was_dirty = self.dirty.swap(false, Ordering::AcqRel);
        match vault.fsync(ino) {
            Ok(()) => {
                self.metrics.commit(CommitReason::Fsync);
                if was_dirty {
                    self.backup_after_commit();
                }
                Ok(())
            }
            Err(e) => {
                if was_dirty {
                    self.dirty.store(true, Ordering::Release);
                }
                self.metrics.commit_failures.inc();
                Err(e)
            }
        }
    }

    pub(crate) fn backup_after_commit(&self) {
        if self.backup.is_some() {
            *lock(&self.backup_due) = true;
            self.backup_wake.notify_one();
        }
    }
}

/// Locks a mutex whose data stays consistent even if a holder panicked (sets and
/// flags only).
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// The file system. Build one with [`crate::mount`]; it is public so that a caller can
/// run it in a `fuser::Session` of its own.
pub struct VaultFs {
    vault: Vault,
    shared: Arc<Shared>,
    ttl: Duration,
    max_write_bytes: u32,
    max_readahead_bytes: u32,
    writeback_cache: bool,
    next_handle: AtomicU64,
    /// Handles written through since their last flush: closing one commits.
    written: Mutex<HashSet<u64>>,
    /// Open directories: the listing taken at opendir, so a directory read while it
    /// changes (`rm -r`) neither skips nor repeats names.
    dirs: Mutex<HashMap<u64, Arc<Vec<DirEntry>>>>,
    /// Open file handles per inode.
    open_files: Mutex<HashMap<Ino, u32>>,
    /// Inodes moved to [`UNLINKED_DIR`] while open: removed at their last release.
    unlinked: Mutex<HashSet<Ino>>,
}

impl std::fmt::Debug for VaultFs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VaultFs").finish_non_exhaustive()
    }
}

thread_local! {
    /// Each worker thread's read buffer, reused so a 1 MiB read does not allocate.
    static READ_BUF: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

impl VaultFs {
    pub(crate) fn new(vault: Vault, shared: Arc<Shared>, opts: &MountOptions) -> VaultFs {
        VaultFs {
            vault,
            shared,
            ttl: opts.attr_ttl,
            max_write_bytes: opts.max_write_bytes,
            max_readahead_bytes: opts.max_readahead_bytes,
            writeback_cache: opts.writeback_cache,
            next_handle: AtomicU64::new(1),
            written: Mutex::new(HashSet::new()),
            dirs: Mutex::new(HashMap::new()),
            open_files: Mutex::new(HashMap::new()),
            unlinked: Mutex::new(HashSet::new()),
        }
    }

    fn opened(&self, ino: Ino) {
        *lock(&self.open_files).entry(ino).or_insert(0) += 1;
    }

    /// Counts a handle closed; at the last one of an unlinked inode, removes it.
    fn closed(&self, ino: Ino) {
        let last = {
            let mut open = lock(&self.open_files);
            match open.get_mut(&ino) {
                Some(n) if *n > 1 => {
                    *n -= 1;
                    false
                }
                Some(_) => {
                    open.remove(&ino);
                    true
                }
                None => false,
            }
        };
        if last && lock(&self.unlinked).remove(&ino) {
            let r = self
                .vault
                .lookup(crate::ROOT_INO, UNLINKED_DIR)
                .and_then(|dir| self.vault.unlink(dir.ino, ino.to_string().as_bytes()));
            match r {
                Ok(()) => self.changed(),
                Err(e) => {
                    tracing::warn!(ino, error = %e, "removing an unlinked file at its last close")
                }
            }
        }
    }

    /// The hidden directory of unlinked open files, made on first use.
    fn unlinked_dir(&self) -> Result<Ino, VaultError> {
        match self.vault.lookup(crate::ROOT_INO, UNLINKED_DIR) {
            Ok(a) => Ok(a.ino),
            Err(VaultError::NotFound) => {
                match self.vault.mkdir(crate::ROOT_INO, UNLINKED_DIR, 0o700) {
                    Ok(a) => Ok(a.ino),
                    // Another worker thread made it meanwhile.
                    Err(VaultError::Exists) => self
                        .vault
                        .lookup(crate::ROOT_INO, UNLINKED_DIR)
                        .map(|a| a.ino),
                    Err(e) => Err(e),
                }
            }
            Err(e) => Err(e),
        }
    }

    /// unlink: a file still open moves to the hidden directory instead.
    fn unlink_name(&self, parent: Ino, name: &[u8]) -> Result<(), VaultError> {
        let a = self.vault.lookup(parent, name)?;
        let open = a.kind != FileKind::Dir && lock(&self.open_files).contains_key(&a.ino);
        if !open {
            return self.vault.unlink(parent, name);
        }
        let dir = self.unlinked_dir()?;
        self.vault
            .rename(parent, name, dir, a.ino.to_string().as_bytes())?;
        lock(&self.unlinked).insert(a.ino);
        // Closed meanwhile (the kernel serialises unlink and open of one name, not
        // unlink and close): remove it now.
        if !lock(&self.open_files).contains_key(&a.ino) && lock(&self.unlinked).remove(&a.ino) {
            self.vault.unlink(dir, a.ino.to_string().as_bytes())?;
        }
        Ok(())
    }

    fn handle(&self) -> FileHandle {
        FileHandle(self.next_handle.fetch_add(1, Ordering::Relaxed))
    }

    /// Counts a failed request and picks its errno. Integrity failures are logged: the
    /// vault has already tried the mirror and the parity.
    fn fail(&self, op: Op, ino: u64, e: &VaultError) -> Errno {
        self.shared.metrics.error(op);
        match e {
            VaultError::Corrupt { .. } | VaultError::Format { .. } => {
                if op == Op::Read {
                    self.shared.metrics.corrupt_reads.inc();
                }
                tracing::error!(op = op.name(), ino, error = %e, "answering EIO");
            }
            VaultError::Io(_) => tracing::warn!(op = op.name(), ino, error = %e, "i/o error"),
            _ => tracing::debug!(op = op.name(), ino, error = %e, "request failed"),
        }
        Errno::from_i32(e.errno())
    }

    fn changed(&self) {
        self.shared.dirty.store(true, Ordering::Release);
    }

    /// New inodes belong to whoever created them (the vault creates them as the
    /// process's user).
    fn owned_by(&self, req: &Request, a: Attr) -> Result<Attr, VaultError> {
        if a.uid == req.uid() && a.gid == req.gid() {
            return Ok(a);
        }
        self.vault.setattr(
            a.ino,
            SetAttr {
                uid: Some(req.uid()),
                gid: Some(req.gid()),
                ..SetAttr::default()
            },
        )
    }

    fn entry(&self, op: Op, parent: INodeNo, r: Result<Attr, VaultError>, reply: ReplyEntry) {
        match r {
            Ok(a) => reply.entry(&self.ttl, &file_attr(&a), GENERATION),
            Err(e) => reply.error(self.fail(op, parent.0, &e)),
        }
    }

    fn empty(&self, op: Op, ino: u64, r: Result<(), VaultError>, reply: ReplyEmpty) {
        match r {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(self.fail(op, ino, &e)),
        }
    }

    /// Closing a handle that wrote commits (everything uncommitted: a commit is
    /// vault-wide).
    fn commit_if_written(&self, fh: FileHandle) -> Result<(), VaultError> {
        if lock(&self.written).remove(&fh.0) {
            self.shared.commit(&self.vault, CommitReason::Close)?;
        }
        Ok(())
    }
}

/// The hidden directory's name in the root: not found, not creatable.
fn reserved(parent: INodeNo, name: &OsStr) -> bool {
    parent.0 == crate::ROOT_INO && name.as_bytes() == UNLINKED_DIR
}

fn file_type(kind: FileKind) -> FileType {
    match kind {
        FileKind::File => FileType::RegularFile,
        FileKind::Dir => FileType::Directory,
        FileKind::Symlink => FileType::Symlink,
    }
}

fn file_attr(a: &Attr) -> FileAttr {
    FileAttr {
        ino: INodeNo(a.ino),
        size: a.size,
        blocks: a.blocks,
        atime: a.atime,
        mtime: a.mtime,
        ctime: a.ctime,
        crtime: a.ctime,
        kind: file_type(a.kind),
        perm: (a.mode & MODE_PERMISSIONS) as u16,
        nlink: a.nlink,
        uid: a.uid,
        gid: a.gid,
        rdev: 0,
        blksize: a.blksize,
        flags: 0,
    }
}

fn time(t: TimeOrNow) -> SystemTime {
    match t {
        TimeOrNow::SpecificTime(t) => t,
        TimeOrNow::Now => SystemTime::now(),
    }
}

impl fuser::Filesystem for VaultFs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> io::Result<()> {
        // Each setter answers the nearest value the kernel accepts when ours is too
        // large: take that.
        if let Err(nearest) = config.set_max_write(self.max_write_bytes) {
            let _ = config.set_max_write(nearest);
        }
        if let Err(nearest) = config.set_max_readahead(self.max_readahead_bytes) {
            let _ = config.set_max_readahead(nearest);
        }
        let _ = config.set_max_background(limits::BACKGROUND_REQUESTS_MAX);
        // Lookups and readdirs of one directory in parallel: the vault is thread-safe.
        let _ = config.add_capabilities(InitFlags::FUSE_PARALLEL_DIROPS);
        if self.writeback_cache
            && config
                .add_capabilities(InitFlags::FUSE_WRITEBACK_CACHE)
                .is_err()
        {
            tracing::warn!("the kernel has no FUSE writeback cache; writing through");
        }
        Ok(())
    }

    fn destroy(&mut self) {
        if let Err(e) = self.vault.sync() {
            tracing::error!(error = %e, "sync at the end of the session failed");
        }
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        self.shared.metrics.request(Op::Lookup);
        let r = if reserved(parent, name) {
            Err(VaultError::NotFound)
        } else {
            self.vault.lookup(parent.0, name.as_bytes())
        };
        self.entry(Op::Lookup, parent, r, reply);
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        self.shared.metrics.request(Op::Getattr);
        match self.vault.getattr(ino.0) {
            Ok(a) => reply.attr(&self.ttl, &file_attr(&a)),
            Err(e) => reply.error(self.fail(Op::Getattr, ino.0, &e)),
        }
    }

    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        self.shared.metrics.request(Op::Setattr);
        let set = SetAttr {
            size,
            mode: mode.map(|m| m & MODE_PERMISSIONS),
            uid,
            gid,
            atime: atime.map(time),
            mtime: mtime.map(time),
        };
        let r = if set == SetAttr::default() {
            // Only what the vault does not keep (ctime alone, flags): nothing to change.
            self.vault.getattr(ino.0)
        } else {
            let r = self.vault.setattr(ino.0, set);
            if r.is_ok() {
                self.changed();
                if let (Some(fh), Some(_)) = (fh, size) {
                    // ftruncate through a handle: its close commits.
                    lock(&self.written).insert(fh.0);
                }
            }
            r
        };
        match r {
            Ok(a) => reply.attr(&self.ttl, &file_attr(&a)),
            Err(e) => reply.error(self.fail(Op::Setattr, ino.0, &e)),
        }
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        self.shared.metrics.request(Op::Readlink);
        match self.vault.readlink(ino.0) {
            Ok(target) => reply.data(&target),
            Err(e) => reply.error(self.fail(Op::Readlink, ino.0, &e)),
        }
    }

    fn mknod(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        _umask: u32,
        _rdev: u32,
        reply: ReplyEntry,
    ) {
        self.shared.metrics.request(Op::Mknod);
        if reserved(parent, name) {
            self.shared.metrics.error(Op::Mknod);
            return reply.error(Errno::EPERM);
        }
        let kind = mode & MODE_TYPE_MASK;
        if kind != MODE_REGULAR && kind != 0 {
            // The vault holds files, directories and symbolic links only: no devices,
            // FIFOs or sockets (what Linux answers where a file system has none).
            self.shared.metrics.error(Op::Mknod);
            return reply.error(Errno::EPERM);
        }
        let r = self
            .vault
            .create_file(parent.0, name.as_bytes(), mode & MODE_PERMISSIONS)
            .and_then(|a| self.owned_by(req, a));
        if r.is_ok() {
            self.changed();
        }
        self.entry(Op::Mknod, parent, r, reply);
    }

    fn mkdir(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        _umask: u32,
        reply: ReplyEntry,
    ) {
        self.shared.metrics.request(Op::Mkdir);
        if reserved(parent, name) {
            self.shared.metrics.error(Op::Mkdir);
            return reply.error(Errno::EPERM);
        }
        let r = self
            .vault
            .mkdir(parent.0, name.as_bytes(), mode & MODE_PERMISSIONS)
            .and_then(|a| self.owned_by(req, a));
        if r.is_ok() {
            self.changed();
        }
        self.entry(Op::Mkdir, parent, r, reply);
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        self.shared.metrics.request(Op::Unlink);
        let r = if reserved(parent, name) {
            Err(VaultError::NotFound)
        } else {
            self.unlink_name(parent.0, name.as_bytes())
        };
        if r.is_ok() {
            self.changed();
        }
        self.empty(Op::Unlink, parent.0, r, reply);
    }

    fn rmdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        self.shared.metrics.request(Op::Rmdir);
        let r = self.vault.rmdir(parent.0, name.as_bytes());
        if r.is_ok() {
            self.changed();
        }
        self.empty(Op::Rmdir, parent.0, r, reply);
    }

    fn symlink(
        &self,
        req: &Request,
        parent: INodeNo,
        link_name: &OsStr,
        target: &Path,
        reply: ReplyEntry,
    ) {
        self.shared.metrics.request(Op::Symlink);
        if reserved(parent, link_name) {
            self.shared.metrics.error(Op::Symlink);
            return reply.error(Errno::EPERM);
        }
        let r = self
            .vault
            .symlink(
                parent.0,
                link_name.as_bytes(),
                target.as_os_str().as_bytes(),
            )
            .and_then(|a| self.owned_by(req, a));
        if r.is_ok() {
            self.changed();
        }
        self.entry(Op::Symlink, parent, r, reply);
    }

    fn rename(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        self.shared.metrics.request(Op::Rename);
        if reserved(parent, name) || reserved(newparent, newname) {
            self.shared.metrics.error(Op::Rename);
            return reply.error(Errno::EPERM);
        }
        if flags.intersects(RenameFlags::RENAME_EXCHANGE | RenameFlags::RENAME_WHITEOUT) {
            self.shared.metrics.error(Op::Rename);
            return reply.error(Errno::EINVAL);
        }
        if flags.contains(RenameFlags::RENAME_NOREPLACE) {
            // Checked here, then renamed: only this process changes the vault, and a
            // racing create in another worker thread is the caller's own race.
            match self.vault.lookup(newparent.0, newname.as_bytes()) {
                Ok(_) => {
                    self.shared.metrics.error(Op::Rename);
                    return reply.error(Errno::EEXIST);
                }
                Err(VaultError::NotFound) => {}
                Err(e) => return reply.error(self.fail(Op::Rename, newparent.0, &e)),
            }
        }
        let r = self
            .vault
            .rename(parent.0, name.as_bytes(), newparent.0, newname.as_bytes());
        if r.is_ok() {
            self.changed();
        }
        self.empty(Op::Rename, parent.0, r, reply);
    }

    fn link(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _newparent: INodeNo,
        _newname: &OsStr,
        reply: ReplyEntry,
    ) {
        // No hard links in the vault's format: Linux's answer for such file systems.
        self.shared.metrics.request(Op::Link);
        self.shared.metrics.error(Op::Link);
        reply.error(Errno::EPERM);
    }

    fn open(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        self.shared.metrics.request(Op::Open);
        match self.vault.getattr(ino.0) {
            Ok(a) if a.kind == FileKind::Dir => {
                self.shared.metrics.error(Op::Open);
                reply.error(Errno::EISDIR)
            }
            // Only this process changes the vault, so pages cached from an earlier
            // open are still right.
            Ok(_) => {
                self.opened(ino.0);
                reply.opened(self.handle(), FopenFlags::FOPEN_KEEP_CACHE)
            }
            Err(e) => reply.error(self.fail(Op::Open, ino.0, &e)),
        }
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        self.shared.metrics.request(Op::Read);
        READ_BUF.with_borrow_mut(|buf| {
            let want = size as usize;
            if buf.len() < want {
                buf.resize(want, 0);
            }
            // FUSE wants the whole request unless the file ends first: the vault may
            // answer a block at a time.
            let mut got = 0;
            while got < want {
                match self
                    .vault
                    .read(ino.0, offset + got as u64, &mut buf[got..want])
                {
                    Ok(0) => break,
                    Ok(n) => got += n,
                    Err(e) => return reply.error(self.fail(Op::Read, ino.0, &e)),
                }
            }
            reply.data(&buf[..got]);
        });
    }

    fn write(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        self.shared.metrics.request(Op::Write);
        let mut done = 0;
        while done < data.len() {
            match self.vault.write(ino.0, offset + done as u64, &data[done..]) {
                Ok(0) => break,
                Ok(n) => done += n,
                Err(e) => {
                    if done > 0 {
                        self.changed();
                        lock(&self.written).insert(fh.0);
                    }
                    return reply.error(self.fail(Op::Write, ino.0, &e));
                }
            }
        }
        self.changed();
        lock(&self.written).insert(fh.0);
        // At most max_write (16 MiB) per request: fits.
        reply.written(done as u32);
    }

    fn flush(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        self.shared.metrics.request(Op::Flush);
        // close(2) sees a failed commit.
        let r = self.commit_if_written(fh);
        self.empty(Op::Flush, ino.0, r, reply);
    }

    fn release(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        self.shared.metrics.request(Op::Release);
        self.closed(ino.0);
        // Written through a memory mapping after the last flush, say: nobody waits for
        // this answer, so a failure is logged (and the next tick retries).
        if let Err(e) = self.commit_if_written(fh) {
            let _ = self.fail(Op::Release, ino.0, &e);
        }
        reply.ok();
    }

    fn fsync(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        self.shared.metrics.request(Op::Fsync);
        lock(&self.written).remove(&fh.0);
        let r = self.shared.fsync(&self.vault, ino.0);
        self.empty(Op::Fsync, ino.0, r, reply);
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        self.shared.metrics.request(Op::Opendir);
        let listing = match self.vault.readdir(ino.0) {
            Ok(l) => l,
            Err(e) => return reply.error(self.fail(Op::Opendir, ino.0, &e)),
        };
        let mut entries = Vec::with_capacity(listing.len() + 2);
        // `..` names this directory too: the kernel answers `..` lookups itself and
        // nothing reads the inode number of this entry.
        for dot in [&b"."[..], &b".."[..]] {
            entries.push(DirEntry {
                ino: ino.0,
                name: dot.to_vec(),
                kind: FileKind::Dir,
            });
        }
        entries.extend(
            listing
                .into_iter()
                .filter(|e| e.name != b"." && e.name != b"..")
                .filter(|e| !(ino.0 == crate::ROOT_INO && e.name == UNLINKED_DIR)),
        );
        let fh = self.handle();
        let mut dirs = lock(&self.dirs);
        if dirs.len() >= limits::DIR_HANDLES_MAX {
            drop(dirs);
            self.shared.metrics.error(Op::Opendir);
            return reply.error(Errno::EMFILE);
        }
        dirs.insert(fh.0, Arc::new(entries));
        drop(dirs);
        reply.opened(fh, FopenFlags::empty());
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        self.shared.metrics.request(Op::Readdir);
        let Some(entries) = lock(&self.dirs).get(&fh.0).cloned() else {
            self.shared.metrics.error(Op::Readdir);
            tracing::debug!(ino = ino.0, "readdir without opendir");
            return reply.error(Errno::EBADF);
        };
        // The offset of an entry is its index + 1: the kernel asks from there next.
        let from = usize::try_from(offset).unwrap_or(usize::MAX);
        for (i, e) in entries.iter().enumerate().skip(from) {
            let full = reply.add(
                INodeNo(e.ino),
                i as u64 + 1,
                file_type(e.kind),
                OsStr::from_bytes(&e.name),
            );
            if full {
                break;
            }
        }
        reply.ok();
    }

    fn releasedir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        reply: ReplyEmpty,
    ) {
        self.shared.metrics.request(Op::Releasedir);
        lock(&self.dirs).remove(&fh.0);
        reply.ok();
    }

    fn fsyncdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        self.shared.metrics.request(Op::Fsyncdir);
        let r = self.shared.fsync(&self.vault, ino.0);
        self.empty(Op::Fsyncdir, ino.0, r, reply);
    }

    fn statfs(&self, _req: &Request, ino: INodeNo, reply: ReplyStatfs) {
        self.shared.metrics.request(Op::Statfs);
        match self.vault.statfs() {
            Ok(s) => reply.statfs(
                s.blocks, s.bfree, s.bavail, s.files, s.ffree, s.bsize, s.namelen, s.frsize,
            ),
            Err(e) => reply.error(self.fail(Op::Statfs, ino.0, &e)),
        }
    }

    fn access(&self, _req: &Request, _ino: INodeNo, _mask: fuser::AccessFlags, reply: ReplyEmpty) {
        // Only the user who mounted gets in unless `allow_other`, and then the kernel
        // checks modes itself (`default_permissions`).
        reply.ok();
    }

    fn create(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        _umask: u32,
        _flags: i32,
        reply: ReplyCreate,
    ) {
        self.shared.metrics.request(Op::Create);
        if reserved(parent, name) {
            self.shared.metrics.error(Op::Create);
            return reply.error(Errno::EPERM);
        }
        let kind = mode & MODE_TYPE_MASK;
        if kind != MODE_REGULAR && kind != 0 {
            self.shared.metrics.error(Op::Create);
            return reply.error(Errno::EPERM);
        }
        // The kernel has applied the umask already (we do not ask for FUSE_DONT_MASK).
        let r = self
            .vault
            .create_file(parent.0, name.as_bytes(), mode & MODE_PERMISSIONS)
            .and_then(|a| self.owned_by(req, a));
        match r {
            Ok(a) => {
                self.changed();
                let fh = self.handle();
                self.opened(a.ino);
                // A new file is a change of its own: closing it commits even if nothing
                // is written (`touch`).
                lock(&self.written).insert(fh.0);
                reply.created(
                    &self.ttl,
                    &file_attr(&a),
                    GENERATION,
                    fh,
                    FopenFlags::FOPEN_KEEP_CACHE,
                )
            }
            Err(e) => reply.error(self.fail(Op::Create, parent.0, &e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attributes_keep_permission_bits_only() {
        let now = SystemTime::now();
        let a = Attr {
            ino: 7,
            kind: FileKind::Symlink,
            size: 3,
            mode: 0o104_755,
            uid: 1,
            gid: 2,
            atime: now,
            mtime: now,
            ctime: now,
            nlink: 1,
            blocks: 1,
            blksize: 4096,
        };
        let f = file_attr(&a);
        assert_eq!(f.perm, 0o4755);
        assert_eq!(f.kind, FileType::Symlink);
        assert_eq!(f.ino, INodeNo(7));
    }
}
