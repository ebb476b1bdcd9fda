//! The VFS itself, in safe Rust: SQLite's file operations on vault files. `ffi.rs`
//! turns SQLite's C callbacks into calls of these methods and their `Err(code)` back
//! into SQLite result codes.
//!
//! What goes where:
//! - the main database, its rollback journal, its WAL and super-journals are vault files
//!   (path = the name SQLite uses, see `path.rs`);
//! - temporary databases, temporary journals and statement sub-journals stay in memory:
//!   they never outlive a connection, so nothing is lost, and no plaintext of them
//!   reaches the disk either;
//! - `xSync` = [`Store::fsync`] (commit + durable): a durable SQLite commit is a vault
//!   version. `xDelete` commits too, because SQLite's transaction is complete when the
//!   journal is gone, and a vault drops uncommitted changes when its process dies.
//! - locks live in memory (`lock.rs`), the WAL index on the heap (`shm.rs`).
//!
//! Crash semantics: a vault commit captures every write made before it, and a crash
//! keeps exactly the committed ones. So what SQLite finds after a crash is always a
//! prefix of its writes in order; that is the promise of `SQLITE_IOCAP_SEQUENTIAL`
//! (SQLite then skips the journal's extra sync), and `SAFE_APPEND` and
//! `POWERSAFE_OVERWRITE` hold because size and data are committed together.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use portswitch_vault::{FileKind, Ino, VaultError};
use rusqlite::ffi;

use crate::lock::{FileLock, LockLevel, Owner, ShmHeld, SHM_SLOTS};
use crate::path;
use crate::shm::Shm;
use crate::store::Store;

/// A SQLite result code: what every VFS method answers on failure.
pub(crate) type Code = i32;
pub(crate) type VfsResult<T> = Result<T, Code>;

/// SQLite's sector size for the journal's header padding. The vault's blocks are 4 KiB
/// by default, and SQLite's default page size matches.
const SECTOR_BYTES: i32 = 4096;

/// `xDeviceCharacteristics`; why each holds is in the module docs.
const DEVICE_CHARACTERISTICS: i32 = ffi::SQLITE_IOCAP_SAFE_APPEND
    | ffi::SQLITE_IOCAP_SEQUENTIAL
    | ffi::SQLITE_IOCAP_POWERSAFE_OVERWRITE;

/// Bytes of one in-memory temporary file (a temp database or sub-journal). A query that
/// spills more than this gets SQLITE_FULL instead of eating the host's memory.
pub(crate) const MEMORY_FILE_BYTES_MAX: u64 = 1 << 30;

/// One registered VFS: a vault plus the in-memory state its connections share.
pub(crate) struct VaultVfs {
    store: Arc<dyn Store>,
    /// File locks per database inode.
    locks: Mutex<HashMap<Ino, FileLock>>,
    /// WAL indexes per database inode.
    shms: Mutex<HashMap<Ino, Shm>>,
    next_owner: AtomicU64,
    open_files: AtomicUsize,
}

/// An open file, as `xOpen` made it.
pub(crate) struct Handle {
    owner: Owner,
    file: File,
    lock: LockLevel,
    /// Set while this handle maps the WAL index of its database.
    shm: Option<ShmHeld>,
    read_only: bool,
    delete_on_close: bool,
}

enum File {
    Vault { ino: Ino, path: String },
    Memory(Vec<u8>),
}

/// Logs a vault error with its context and turns it into a SQLite code.
fn fail(op: &'static str, path: &str, err: VaultError, fallback: Code) -> Code {
    let code = match &err {
        VaultError::ReadOnly => ffi::SQLITE_READONLY,
        VaultError::TooLarge { .. } => ffi::SQLITE_FULL,
        VaultError::Io(e) if e.raw_os_error() == Some(28) => ffi::SQLITE_FULL, // ENOSPC
        // An authentication failure the vault could not repair: an I/O error, so that
        // SQLite stops and reports it instead of using the page.
        _ => fallback,
    };
    if err.is_corrupt() {
        tracing::error!(op, path, error = %err, "vault record failed authentication");
    } else {
        tracing::warn!(op, path, error = %err, "vault operation failed");
    }
    code
}

impl VaultVfs {
    pub(crate) fn new(store: Arc<dyn Store>) -> VaultVfs {
        VaultVfs {
            store,
            locks: Mutex::new(HashMap::new()),
            shms: Mutex::new(HashMap::new()),
            next_owner: AtomicU64::new(1),
            open_files: AtomicUsize::new(0),
        }
    }

    /// Files open through this VFS (unregistering waits for zero).
    pub(crate) fn open_files(&self) -> usize {
        self.open_files.load(Ordering::SeqCst)
    }

    fn locks(&self) -> MutexGuard<'_, HashMap<Ino, FileLock>> {
        // A poisoned lock table means an assertion fired while it was held: the process
        // is going down with that panic's message; keep serving the rest consistently.
        self.locks.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn shms(&self) -> MutexGuard<'_, HashMap<Ino, Shm>> {
        self.shms.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// `xFullPathname`.
    pub(crate) fn full_pathname(&self, name: &str) -> VfsResult<String> {
        path::full(name).ok_or(ffi::SQLITE_CANTOPEN)
    }

    /// The parent directory's inode and the last name of a canonical path.
    fn parent_of<'a>(&self, full: &'a str) -> Result<(Ino, &'a str), VaultError> {
        let (parent, name) = path::split(full);
        let dir = self.store.resolve(parent)?;
        if dir.kind != FileKind::Dir {
            return Err(VaultError::NotDir);
        }
        Ok((dir.ino, name))
    }

    /// `xOpen`. Returns the handle and the flags SQLite gets back.
    pub(crate) fn open(&self, name: Option<&str>, flags: i32) -> VfsResult<(Handle, i32)> {
        const IN_MEMORY: i32 = ffi::SQLITE_OPEN_TEMP_DB
            | ffi::SQLITE_OPEN_TRANSIENT_DB
            | ffi::SQLITE_OPEN_TEMP_JOURNAL
            | ffi::SQLITE_OPEN_SUBJOURNAL;
        let read_only = flags & ffi::SQLITE_OPEN_READONLY != 0;
        // A vault opened read-only: vault files open read-only, as the unix VFS does
        // with a file it may not write, and SQLite learns it from the flags.
        let vault_read_only = self.store.read_only();
        let delete_on_close = flags & ffi::SQLITE_OPEN_DELETEONCLOSE != 0;
        let owner = self.next_owner.fetch_add(1, Ordering::Relaxed);
        let (file, read_only, flags) = match name {
            None => (File::Memory(Vec::new()), read_only, flags),
            Some(_) if flags & IN_MEMORY != 0 => (File::Memory(Vec::new()), read_only, flags),
            Some(name) => {
                let full = path::full(name).ok_or(ffi::SQLITE_CANTOPEN)?;
                let ino = self
                    .open_vault_file(&full, flags)
                    .map_err(|e| fail("open", &full, e, ffi::SQLITE_CANTOPEN))?;
                let flags = if vault_read_only {
                    (flags & !ffi::SQLITE_OPEN_READWRITE) | ffi::SQLITE_OPEN_READONLY
                } else {
                    flags
                };
                (
                    File::Vault { ino, path: full },
                    read_only || vault_read_only,
                    flags,
                )
            }
        };
        self.open_files.fetch_add(1, Ordering::SeqCst);
        let handle = Handle {
            owner,
            file,
            lock: LockLevel::None,
            shm: None,
            read_only,
            delete_on_close,
        };
        Ok((handle, flags))
    }

    fn open_vault_file(&self, full: &str, flags: i32) -> Result<Ino, VaultError> {
        let create = flags & ffi::SQLITE_OPEN_CREATE != 0;
        let exclusive = flags & ffi::SQLITE_OPEN_EXCLUSIVE != 0;
        let (parent, name) = self.parent_of(full)?;
        let attr = match self.store.lookup(parent, name.as_bytes()) {
            Ok(_) if create && exclusive => return Err(VaultError::Exists),
            Ok(attr) => attr,
            Err(VaultError::NotFound) if create => {
                match self.store.create_file(parent, name.as_bytes(), 0o600) {
                    // Another connection of this process created it in between.
                    Err(VaultError::Exists) if !exclusive => {
                        self.store.lookup(parent, name.as_bytes())?
                    }
                    other => other?,
                }
            }
            Err(e) => return Err(e),
        };
        if attr.kind != FileKind::File {
            return Err(VaultError::IsDir);
        }
        Ok(attr.ino)
    }

    /// `xClose`.
    pub(crate) fn close(&self, mut handle: Handle) -> VfsResult<()> {
        // The file stops counting even if what follows panics (`ffi.rs` turns a panic
        // into an error code): a lost decrement would keep `unregister` busy forever.
        struct Closed<'a>(&'a AtomicUsize);
        impl Drop for Closed<'_> {
            fn drop(&mut self) {
                self.0.fetch_sub(1, Ordering::SeqCst);
            }
        }
        let closed = Closed(&self.open_files);
        // SQLite unlocks and unmaps before it closes; do it anyway so that a handle can
        // never leave a lock behind.
        if handle.shm.is_some() {
            self.shm_unmap(&mut handle);
        }
        if handle.lock != LockLevel::None {
            self.unlock(&mut handle, LockLevel::None);
        }
        drop(closed);
        if let (File::Vault { path, .. }, true) = (&handle.file, handle.delete_on_close) {
            self.delete(path, false)?;
        }
        Ok(())
    }

    /// `xDelete`. Commits, so that a finished journal stays finished after a crash.
    pub(crate) fn delete(&self, name: &str, sync_dir: bool) -> VfsResult<()> {
        let full = path::full(name).ok_or(ffi::SQLITE_IOERR_DELETE)?;
        let result = self
            .parent_of(&full)
            .and_then(|(parent, name)| self.store.unlink(parent, name.as_bytes()));
        match result {
            Ok(()) => {}
            Err(VaultError::NotFound) => return Err(ffi::SQLITE_IOERR_DELETE_NOENT),
            Err(e) => return Err(fail("delete", &full, e, ffi::SQLITE_IOERR_DELETE)),
        }
        let committed = if sync_dir {
            self.store.sync().map(|_| ())
        } else {
            self.store.commit().map(|_| ())
        };
        committed.map_err(|e| fail("delete", &full, e, ffi::SQLITE_IOERR_DELETE))
    }

    /// `xAccess`: whether the file exists (every flag: vault files are readable and
    /// writable by the one process that holds the vault).
    pub(crate) fn access(&self, name: &str) -> VfsResult<bool> {
        let Some(full) = path::full(name) else {
            return Ok(false);
        };
        match self.store.resolve(&full) {
            Ok(attr) => Ok(attr.kind == FileKind::File),
            Err(VaultError::NotFound | VaultError::NotDir) => Ok(false),
            Err(e) => Err(fail("access", &full, e, ffi::SQLITE_IOERR_ACCESS)),
        }
    }

    /// `xRead`. A read past the end fills the rest with zeros and answers
    /// `SQLITE_IOERR_SHORT_READ`, as SQLite requires.
    pub(crate) fn read(&self, h: &mut Handle, offset: u64, buf: &mut [u8]) -> VfsResult<()> {
        let done = match &h.file {
            File::Memory(data) => {
                let start = usize::try_from(offset)
                    .unwrap_or(usize::MAX)
                    .min(data.len());
                let n = buf.len().min(data.len() - start);
                buf[..n].copy_from_slice(&data[start..start + n]);
                n
            }
            File::Vault { ino, path } => {
                let mut done = 0;
                while done < buf.len() {
                    match self
                        .store
                        .read(*ino, offset + done as u64, &mut buf[done..])
                    {
                        Ok(0) => break,
                        Ok(n) => done += n,
                        Err(e) => return Err(fail("read", path, e, ffi::SQLITE_IOERR_READ)),
                    }
                }
                done
            }
        };
        if done < buf.len() {
            buf[done..].fill(0);
            return Err(ffi::SQLITE_IOERR_SHORT_READ);
        }
        Ok(())
    }

    /// `xWrite`.
    pub(crate) fn write(&self, h: &mut Handle, offset: u64, data: &[u8]) -> VfsResult<()> {
        if h.read_only {
            return Err(ffi::SQLITE_READONLY);
        }
        match &mut h.file {
            File::Memory(buf) => {
                let end = offset
                    .checked_add(data.len() as u64)
                    .filter(|end| *end <= MEMORY_FILE_BYTES_MAX)
                    .ok_or(ffi::SQLITE_FULL)? as usize;
                if buf.len() < end {
                    buf.resize(end, 0);
                }
                buf[offset as usize..end].copy_from_slice(data);
                Ok(())
            }
            File::Vault { ino, path } => {
                let mut done = 0;
                while done < data.len() {
                    match self.store.write(*ino, offset + done as u64, &data[done..]) {
                        Ok(0) => return Err(ffi::SQLITE_IOERR_WRITE),
                        Ok(n) => done += n,
                        Err(e) => return Err(fail("write", path, e, ffi::SQLITE_IOERR_WRITE)),
                    }
                }
                Ok(())
            }
        }
    }

    /// `xTruncate`.
    pub(crate) fn truncate(&self, h: &mut Handle, size: u64) -> VfsResult<()> {
        if h.read_only {
            return Err(ffi::SQLITE_READONLY);
        }
        match &mut h.file {
            File::Memory(buf) => {
                if size < buf.len() as u64 {
                    buf.truncate(size as usize);
                }
                Ok(())
            }
            File::Vault { ino, path } => self
                .store
                .set_size(*ino, size)
                .map_err(|e| fail("truncate", path, e, ffi::SQLITE_IOERR_TRUNCATE)),
        }
    }

    /// `xSync`: a vault commit made durable.
    pub(crate) fn sync(&self, h: &mut Handle) -> VfsResult<()> {
        match &h.file {
            File::Memory(_) => Ok(()),
            File::Vault { ino, path } => self
                .store
                .fsync(*ino)
                .map_err(|e| fail("sync", path, e, ffi::SQLITE_IOERR_FSYNC)),
        }
    }

    /// `xFileSize`.
    pub(crate) fn file_size(&self, h: &mut Handle) -> VfsResult<u64> {
        match &h.file {
            File::Memory(buf) => Ok(buf.len() as u64),
            File::Vault { ino, path } => self
                .store
                .getattr(*ino)
                .map(|a| a.size)
                .map_err(|e| fail("fstat", path, e, ffi::SQLITE_IOERR_FSTAT)),
        }
    }

    /// `xLock`. False: SQLITE_BUSY.
    pub(crate) fn lock(&self, h: &mut Handle, want: LockLevel) -> bool {
        let File::Vault { ino, .. } = &h.file else {
            h.lock = h.lock.max(want);
            return true;
        };
        let mut locks = self.locks();
        locks
            .entry(*ino)
            .or_default()
            .lock(h.owner, &mut h.lock, want)
    }

    /// `xUnlock`.
    pub(crate) fn unlock(&self, h: &mut Handle, to: LockLevel) {
        let File::Vault { ino, .. } = &h.file else {
            h.lock = h.lock.min(to);
            return;
        };
        let mut locks = self.locks();
        if let Some(lock) = locks.get_mut(ino) {
            lock.unlock(h.owner, &mut h.lock, to);
            if lock.is_idle() {
                locks.remove(ino);
            }
        } else {
            assert_eq!(h.lock, LockLevel::None, "a held lock has no table entry");
        }
    }

    /// `xCheckReservedLock`.
    pub(crate) fn check_reserved_lock(&self, h: &mut Handle) -> bool {
        match &h.file {
            File::Memory(_) => false,
            File::Vault { ino, .. } => self.locks().get(ino).is_some_and(|l| l.reserved()),
        }
    }

    pub(crate) fn sector_size(&self) -> i32 {
        SECTOR_BYTES
    }

    pub(crate) fn device_characteristics(&self) -> i32 {
        DEVICE_CHARACTERISTICS
    }

    /// `xShmMap`: the address of a region of the WAL index, `None` when it does not
    /// exist and `extend` is false.
    pub(crate) fn shm_map(
        &self,
        h: &mut Handle,
        region: usize,
        size: usize,
        extend: bool,
    ) -> VfsResult<Option<*mut u8>> {
        let File::Vault { ino, .. } = &h.file else {
            return Err(ffi::SQLITE_IOERR_SHMMAP);
        };
        let mut shms = self.shms();
        let shm = shms.entry(*ino).or_default();
        if h.shm.is_none() {
            h.shm = Some(ShmHeld::default());
            shm.refs += 1;
        }
        shm.region(region, size, extend)
            .map_err(|()| ffi::SQLITE_NOMEM)
    }

    /// `xShmLock`. False: SQLITE_BUSY.
    pub(crate) fn shm_lock(
        &self,
        h: &mut Handle,
        offset: usize,
        n: usize,
        flags: i32,
    ) -> VfsResult<bool> {
        let (File::Vault { ino, .. }, Some(held)) = (&h.file, h.shm.as_mut()) else {
            return Err(ffi::SQLITE_IOERR_SHMLOCK);
        };
        if n == 0 || offset.checked_add(n).is_none_or(|end| end > SHM_SLOTS) {
            return Err(ffi::SQLITE_IOERR_SHMLOCK);
        }
        let mut shms = self.shms();
        let shm = shms.get_mut(ino).ok_or(ffi::SQLITE_IOERR_SHMLOCK)?;
        if flags & ffi::SQLITE_SHM_UNLOCK != 0 {
            shm.lock.unlock(h.owner, held, offset, n);
            return Ok(true);
        }
        let exclusive = flags & ffi::SQLITE_SHM_EXCLUSIVE != 0;
        Ok(shm.lock.lock(h.owner, held, offset, n, exclusive))
    }

    /// `xShmUnmap`: drops this handle's mapping and locks; the memory goes with the
    /// last handle (the `delete` flag changes nothing: the index is never on disk).
    pub(crate) fn shm_unmap(&self, h: &mut Handle) {
        let (File::Vault { ino, .. }, Some(mut held)) = (&h.file, h.shm.take()) else {
            return;
        };
        let mut shms = self.shms();
        let Some(shm) = shms.get_mut(ino) else {
            return;
        };
        shm.lock.unlock(h.owner, &mut held, 0, SHM_SLOTS);
        shm.refs -= 1;
        if shm.refs == 0 {
            shms.remove(ino);
        }
    }
}
