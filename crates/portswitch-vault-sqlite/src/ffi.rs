//! The C side of the VFS: SQLite's `sqlite3_vfs` and `sqlite3_io_methods` tables,
//! filled with `extern "C"` functions that check their arguments and call the safe
//! methods of [`VaultVfs`]. The only module of the crate with `unsafe` code (the crate
//! denies it everywhere else); every block says why it holds.
//!
//! Written against `rusqlite::ffi` (libsqlite3-sys, the SQLite rusqlite links), so a
//! `rusqlite::Connection` opened with the VFS's name reaches these functions.
//!
//! Memory: a registration owns three heap objects: the `sqlite3_vfs` table, its C name,
//! and the [`AppData`] that `pAppData` points to (it holds the `Arc<VaultVfs>`). None of
//! them is ever freed once SQLite has accepted the table: a connection keeps
//! `db->pVfs` for its whole life, even when no file of it is open through our `xOpen`
//! (a `:memory:` database, or a thread inside `sqlite3_open_v2` that already looked the
//! name up), and it calls the table's time and randomness functions through it.
//! Unregistering *retires* the table instead: SQLite forgets the name, the `AppData`
//! drops its `Arc<VaultVfs>` (and so the vault), and every later `xOpen`, `xDelete`,
//! `xAccess` and `xFullPathname` through it answers an error; time, randomness, sleep
//! still work. A retired table costs ~200 bytes for the rest of the process. An open
//! file is a [`FileSlot`] written into the `szOsFile` bytes SQLite allocates for it; it
//! holds its own `Arc<VaultVfs>`.
//!
//! Panics: every `extern "C"` function runs its body under [`guarded`], which catches a
//! panic (a broken invariant's assertion, a poisoned lock in the vault), logs it and
//! answers SQLite an error code instead of letting it abort the host process.
#![allow(unsafe_code)]

use std::alloc::{self, Layout};
use std::ffi::{c_char, c_int, c_void, CStr, CString};
use std::panic::{self, AssertUnwindSafe};
use std::ptr::{self, NonNull};
use std::slice;
use std::sync::{Arc, RwLock};

use rusqlite::ffi;

use crate::lock::LockLevel;
use crate::path::PATH_BYTES_MAX;
use crate::vfs::{Handle, VaultVfs};

/// What SQLite's per-file allocation holds for us. `repr(C)` with `sqlite3_file` first:
/// SQLite sees only that header (a C "subclass").
#[repr(C)]
struct FileSlot {
    base: ffi::sqlite3_file,
    vfs: Arc<VaultVfs>,
    handle: Handle,
}

// SQLite places file objects in its own allocations, rounded to 8 bytes (`ROUND8`):
// the slot must not need more.
const _: () = assert!(std::mem::align_of::<FileSlot>() <= 8);

/// What a table's `pAppData` points to. `Some` while registered, `None` once retired.
/// `xOpen` holds the read lock for its whole run and [`retire`] takes the write lock to
/// check for open files, so no file can be opened between that check and the
/// retirement.
struct AppData {
    vfs: RwLock<Option<Arc<VaultVfs>>>,
}

impl AppData {
    /// Runs `f` on the VFS, or answers `retired` when the table was retired (a
    /// connection that outlived `unregister`). The read lock is held during `f`.
    fn with_vfs<T>(
        &self,
        callback: &'static str,
        retired: T,
        f: impl FnOnce(&Arc<VaultVfs>) -> T,
    ) -> T {
        // Only a panic while holding the write lock poisons it, and `retire` does
        // nothing there that can panic; the value is consistent either way.
        let vfs = self.vfs.read().unwrap_or_else(|p| p.into_inner());
        match vfs.as_ref() {
            Some(vfs) => f(vfs),
            None => {
                tracing::debug!(callback, "call through an unregistered SQLite VFS refused");
                retired
            }
        }
    }
}

/// A `sqlite3_vfs` table we made, as an address: raw pointers are not `Send`, and the
/// registry that keeps it is a global.
pub(crate) struct VfsTable {
    addr: usize,
    /// The table's `pAppData`, never freed (see the module docs).
    app: &'static AppData,
}

/// Registers `vfs` with SQLite under `name` (not as the default VFS). Fails with
/// SQLite's code when SQLite refuses.
pub(crate) fn register(name: &CStr, vfs: Arc<VaultVfs>) -> Result<VfsTable, c_int> {
    let name = CString::from(name).into_raw();
    let app = Box::into_raw(Box::new(AppData {
        vfs: RwLock::new(Some(vfs)),
    }));
    // The unix VFS lends us its non-file functions (time, randomness, sleep, dlopen):
    // they ignore the VFS pointer they are called with, so ours will do. NULL (the
    // default VFS) only where there is no "unix".
    // SAFETY: sqlite3_vfs_find only reads the global VFS list; the names are C strings.
    let base = match unsafe { ffi::sqlite3_vfs_find(c"unix".as_ptr()) } {
        p if p.is_null() => unsafe { ffi::sqlite3_vfs_find(ptr::null()) },
        p => p,
    };
    let table = Box::new(ffi::sqlite3_vfs {
        iVersion: 2,
        szOsFile: size_of::<FileSlot>() as c_int,
        mxPathname: PATH_BYTES_MAX as c_int,
        pNext: ptr::null_mut(),
        zName: name,
        pAppData: app as *mut c_void,
        xOpen: Some(x_open),
        xDelete: Some(x_delete),
        xAccess: Some(x_access),
        xFullPathname: Some(x_full_pathname),
        // Loading extensions, randomness, sleep and time: the unix VFS's.
        xDlOpen: unsafe_base(base).and_then(|b| b.xDlOpen),
        xDlError: unsafe_base(base).and_then(|b| b.xDlError),
        xDlSym: unsafe_base(base).and_then(|b| b.xDlSym),
        xDlClose: unsafe_base(base).and_then(|b| b.xDlClose),
        xRandomness: unsafe_base(base).and_then(|b| b.xRandomness),
        xSleep: unsafe_base(base).and_then(|b| b.xSleep),
        xCurrentTime: unsafe_base(base).and_then(|b| b.xCurrentTime),
        xGetLastError: None,
        xCurrentTimeInt64: unsafe_base(base).and_then(|b| b.xCurrentTimeInt64),
        xSetSystemCall: None,
        xGetSystemCall: None,
        xNextSystemCall: None,
    });
    let table = Box::into_raw(table);
    // SAFETY: `table` is a complete, heap-allocated sqlite3_vfs that is never freed once
    // SQLite accepted it (module docs).
    let rc = unsafe { ffi::sqlite3_vfs_register(table, 0) };
    if rc != ffi::SQLITE_OK {
        // SAFETY: SQLite refused it, so nothing refers to the table, the name or the
        // app data: the three allocations are ours and unshared.
        unsafe {
            let table = Box::from_raw(table);
            drop(CString::from_raw(table.zName as *mut c_char));
            drop(Box::from_raw(app));
        }
        return Err(rc);
    }
    Ok(VfsTable {
        addr: table.expose_provenance(),
        // SAFETY: `app` is a live allocation that is never freed from here on, so a
        // `'static` shared borrow of it is valid; it is only ever reached through `&`.
        app: unsafe { &*app },
    })
}

/// The unix VFS's table, to borrow its non-file functions.
fn unsafe_base(base: *mut ffi::sqlite3_vfs) -> Option<&'static ffi::sqlite3_vfs> {
    // SAFETY: the unix VFS's table is a static of SQLite's; a NULL gives None.
    unsafe { base.as_ref() }
}

/// Retires a table: removes it from SQLite's list and drops its `Arc<VaultVfs>`, after
/// `may_retire` agreed (it sees the VFS with no `xOpen` running, as the check for open
/// files needs). The table itself stays allocated for connections that still point to
/// it; their file-level calls fail from now on. `Ok(rc)`: SQLite's answer to the
/// unregistration (the table is retired only when it is `SQLITE_OK`).
pub(crate) fn retire<E>(
    table: &VfsTable,
    may_retire: impl FnOnce(&VaultVfs) -> Result<(), E>,
) -> Result<c_int, E> {
    let retired = {
        let mut slot = table.app.vfs.write().unwrap_or_else(|p| p.into_inner());
        if let Some(vfs) = slot.as_ref() {
            may_retire(vfs)?;
        }
        let p = ptr::with_exposed_provenance_mut::<ffi::sqlite3_vfs>(table.addr);
        // SAFETY: `p` is a table `register` made and that is never freed; unregistering
        // only unlinks it from SQLite's list (a no-op when it is not listed).
        let rc = unsafe { ffi::sqlite3_vfs_unregister(p) };
        if rc != ffi::SQLITE_OK {
            return Ok(rc);
        }
        slot.take()
    };
    // The vault clone goes here, outside the lock.
    drop(retired);
    Ok(ffi::SQLITE_OK)
}

/// Whether SQLite knows a VFS of this name.
pub(crate) fn is_registered(name: &CStr) -> bool {
    // SAFETY: `name` is a valid C string; find only reads the list.
    !unsafe { ffi::sqlite3_vfs_find(name.as_ptr()) }.is_null()
}

/// One region of a WAL index: `len` zeroed bytes, 8-aligned, at an address that never
/// changes, handed to SQLite as a raw pointer and freed on drop. The bytes are reached
/// only through that pointer (by SQLite, from any thread, under its own WAL locks and
/// `xShmBarrier`); Rust never makes a reference to them, so no `&`/`&mut` borrow can
/// conflict with SQLite's writes, however the [`Shm`](crate::shm::Shm) that owns the
/// region is borrowed or moved.
#[derive(Debug)]
pub(crate) struct ShmRegion {
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: a ShmRegion owns its allocation (like a Box), and Rust code never reads or
// writes the bytes, so moving the owner to another thread cannot race with anything;
// SQLite's accesses through the raw pointer are synchronised by SQLite itself.
unsafe impl Send for ShmRegion {}

impl ShmRegion {
    /// SQLite reads the index as 32-bit words (atomically, for some): 8-byte alignment,
    /// like the page-aligned `mmap` of the unix VFS, never less than the words need.
    const ALIGN: usize = 8;

    /// A zeroed region of `len` bytes; `None` when `len` is 0 or allocation fails.
    pub(crate) fn zeroed(len: usize) -> Option<ShmRegion> {
        let layout = Layout::from_size_align(len, Self::ALIGN).ok()?;
        if len == 0 {
            return None;
        }
        // SAFETY: `layout` has a non-zero size.
        let ptr = NonNull::new(unsafe { alloc::alloc_zeroed(layout) })?;
        Some(ShmRegion { ptr, len })
    }

    pub(crate) fn len(&self) -> usize {
        self.len
    }

    /// The address SQLite gets; valid until the region is dropped.
    pub(crate) fn as_ptr(&self) -> *mut u8 {
        self.ptr.as_ptr()
    }
}

impl Drop for ShmRegion {
    fn drop(&mut self) {
        // SAFETY: allocated by `zeroed` with this very layout (len > 0, ALIGN), freed
        // once. The owner drops a region only when the last handle of its database
        // unmapped the index (`Shm::refs`), after which SQLite no longer uses pointers
        // into it.
        unsafe {
            alloc::dealloc(
                self.ptr.as_ptr(),
                Layout::from_size_align_unchecked(self.len, Self::ALIGN),
            )
        };
    }
}

/// Runs the body of an `extern "C"` callback, so that no panic unwinds into (or aborts
/// through) SQLite: a panic is logged and becomes `on_panic`, the callback's error code.
///
/// `AssertUnwindSafe`: what a panicking body may leave half-updated is the VFS's state
/// behind its mutexes (locks, WAL indexes), which those mutexes' users recover from a
/// poisoned lock as is, and the vault's, which guards itself; SQLite, told of an I/O
/// error, stops using the file in question.
fn guarded<T>(callback: &'static str, on_panic: T, body: impl FnOnce() -> T) -> T {
    match panic::catch_unwind(AssertUnwindSafe(body)) {
        Ok(value) => value,
        Err(payload) => {
            let message = payload
                .downcast_ref::<&str>()
                .copied()
                .or_else(|| payload.downcast_ref::<String>().map(String::as_str))
                .unwrap_or("(not a string)");
            tracing::error!(
                callback,
                panic = message,
                "panic in a SQLite VFS callback; SQLite gets an error instead"
            );
            // A payload whose drop panics again must not unwind into SQLite either.
            if let Err(again) = panic::catch_unwind(AssertUnwindSafe(|| drop(payload))) {
                std::mem::forget(again);
            }
            on_panic
        }
    }
}

static IO_METHODS: ffi::sqlite3_io_methods = ffi::sqlite3_io_methods {
    // 2: with the shared-memory methods (WAL), without xFetch/xUnfetch (no mmap: every
    // read goes through the vault's authentication).
    iVersion: 2,
    xClose: Some(x_close),
    xRead: Some(x_read),
    xWrite: Some(x_write),
    xTruncate: Some(x_truncate),
    xSync: Some(x_sync),
    xFileSize: Some(x_file_size),
    xLock: Some(x_lock),
    xUnlock: Some(x_unlock),
    xCheckReservedLock: Some(x_check_reserved_lock),
    xFileControl: Some(x_file_control),
    xSectorSize: Some(x_sector_size),
    xDeviceCharacteristics: Some(x_device_characteristics),
    xShmMap: Some(x_shm_map),
    xShmLock: Some(x_shm_lock),
    xShmBarrier: Some(x_shm_barrier),
    xShmUnmap: Some(x_shm_unmap),
    xFetch: None,
    xUnfetch: None,
};

/// The app data of a table we registered.
///
/// SAFETY: `p_vfs` must be a table made by `register` (SQLite passes it back to the
/// functions we put in it); its `AppData` is never freed.
unsafe fn app_of<'a>(p_vfs: *mut ffi::sqlite3_vfs) -> &'a AppData {
    // SAFETY: per the contract above.
    unsafe { &*((*p_vfs).pAppData as *const AppData) }
}

/// The slot of an open file.
///
/// SAFETY: `p_file` must be a file `x_open` filled (SQLite calls io methods only on
/// files whose `pMethods` is ours) and not yet closed; SQLite does not call methods of
/// one file concurrently.
unsafe fn slot<'a>(p_file: *mut ffi::sqlite3_file) -> &'a mut FileSlot {
    // SAFETY: per the contract above.
    unsafe { &mut *(p_file as *mut FileSlot) }
}

/// A C string argument as UTF-8 (vault names are bytes, but SQLite's are the
/// application's UTF-8 strings).
///
/// SAFETY: `p` must be NULL or a valid NUL-terminated string.
unsafe fn str_arg<'a>(p: *const c_char) -> Option<&'a str> {
    if p.is_null() {
        return None;
    }
    // SAFETY: per the contract above.
    unsafe { CStr::from_ptr(p) }.to_str().ok()
}

fn code(r: Result<(), c_int>) -> c_int {
    r.err().unwrap_or(ffi::SQLITE_OK)
}

unsafe extern "C" fn x_open(
    p_vfs: *mut ffi::sqlite3_vfs,
    z_name: ffi::sqlite3_filename,
    p_file: *mut ffi::sqlite3_file,
    flags: c_int,
    p_out_flags: *mut c_int,
) -> c_int {
    // SAFETY: SQLite hands us `szOsFile` writable bytes at `p_file`, which must hold a
    // valid `pMethods` (ours, or NULL when the open fails) when we return. Done before
    // anything can panic, so a panic leaves a file SQLite will not close.
    unsafe { (*p_file).pMethods = ptr::null() };
    guarded("xOpen", ffi::SQLITE_CANTOPEN, || {
        // SAFETY: SQLite passes a NUL-terminated name or NULL.
        let name = unsafe { str_arg(z_name) };
        if !z_name.is_null() && name.is_none() {
            return ffi::SQLITE_CANTOPEN;
        }
        // SAFETY: SQLite calls xOpen on our table.
        let app = unsafe { app_of(p_vfs) };
        // The read lock stays held until the slot is written, so `retire` sees either
        // no open or this file counted.
        app.with_vfs("xOpen", ffi::SQLITE_CANTOPEN, |vfs| {
            let (handle, out_flags) = match vfs.open(name, flags) {
                Ok(opened) => opened,
                Err(rc) => return rc,
            };
            let slot = FileSlot {
                base: ffi::sqlite3_file {
                    pMethods: &IO_METHODS,
                },
                vfs: Arc::clone(vfs),
                handle,
            };
            // SAFETY: `p_file` has room for a FileSlot (szOsFile) and holds nothing to
            // drop; `ptr::write` moves ownership into SQLite's allocation until xClose.
            unsafe { ptr::write(p_file as *mut FileSlot, slot) };
            if !p_out_flags.is_null() {
                // SAFETY: a non-NULL out pointer is writable.
                unsafe { *p_out_flags = out_flags };
            }
            ffi::SQLITE_OK
        })
    })
}

unsafe extern "C" fn x_delete(
    p_vfs: *mut ffi::sqlite3_vfs,
    z_name: *const c_char,
    sync_dir: c_int,
) -> c_int {
    guarded("xDelete", ffi::SQLITE_IOERR_DELETE, || {
        // SAFETY: SQLite passes a file name.
        let name = unsafe { str_arg(z_name) };
        let Some(name) = name else {
            return ffi::SQLITE_IOERR_DELETE;
        };
        // SAFETY: SQLite calls xDelete on our table.
        let app = unsafe { app_of(p_vfs) };
        app.with_vfs("xDelete", ffi::SQLITE_IOERR_DELETE, |vfs| {
            code(vfs.delete(name, sync_dir != 0))
        })
    })
}

unsafe extern "C" fn x_access(
    p_vfs: *mut ffi::sqlite3_vfs,
    z_name: *const c_char,
    _flags: c_int,
    p_res_out: *mut c_int,
) -> c_int {
    guarded("xAccess", ffi::SQLITE_IOERR_ACCESS, || {
        // SAFETY: SQLite passes a file name.
        let name = unsafe { str_arg(z_name) };
        // SAFETY: SQLite calls xAccess on our table.
        let app = unsafe { app_of(p_vfs) };
        let result = app.with_vfs("xAccess", Err(ffi::SQLITE_IOERR_ACCESS), |vfs| match name {
            Some(name) => vfs.access(name),
            None => Ok(false),
        });
        match result {
            Ok(exists) => {
                // SAFETY: SQLite's out pointer is valid for writes.
                unsafe { *p_res_out = c_int::from(exists) };
                ffi::SQLITE_OK
            }
            Err(rc) => rc,
        }
    })
}

unsafe extern "C" fn x_full_pathname(
    p_vfs: *mut ffi::sqlite3_vfs,
    z_name: *const c_char,
    n_out: c_int,
    z_out: *mut c_char,
) -> c_int {
    guarded("xFullPathname", ffi::SQLITE_CANTOPEN, || {
        // SAFETY: SQLite passes a file name.
        let name = unsafe { str_arg(z_name) };
        let Some(name) = name else {
            return ffi::SQLITE_CANTOPEN;
        };
        // SAFETY: SQLite calls xFullPathname on our table.
        let app = unsafe { app_of(p_vfs) };
        let full = app.with_vfs("xFullPathname", Err(ffi::SQLITE_CANTOPEN), |vfs| {
            vfs.full_pathname(name)
        });
        let full = match full {
            Ok(full) => full,
            Err(rc) => return rc,
        };
        let room = usize::try_from(n_out).unwrap_or(0);
        if full.len() + 1 > room {
            return ffi::SQLITE_CANTOPEN;
        }
        // SAFETY: `z_out` has `n_out` writable bytes; we write len + 1 <= n_out of them.
        unsafe {
            ptr::copy_nonoverlapping(full.as_ptr(), z_out as *mut u8, full.len());
            *z_out.add(full.len()) = 0;
        }
        ffi::SQLITE_OK
    })
}

unsafe extern "C" fn x_close(p_file: *mut ffi::sqlite3_file) -> c_int {
    guarded("xClose", ffi::SQLITE_IOERR_CLOSE, || {
        // SAFETY: SQLite closes a file x_open filled, once; `ptr::read` takes the slot
        // back out of SQLite's allocation (which SQLite frees, without dropping
        // anything). From here the slot is ours: a panic in `close` drops it while
        // unwinding, so it is freed either way.
        let slot = unsafe { ptr::read(p_file as *mut FileSlot) };
        // SAFETY: the same allocation; the methods pointer must no longer be used.
        unsafe { (*p_file).pMethods = ptr::null() };
        code(slot.vfs.close(slot.handle))
    })
}

unsafe extern "C" fn x_read(
    p_file: *mut ffi::sqlite3_file,
    buf: *mut c_void,
    amt: c_int,
    offset: ffi::sqlite3_int64,
) -> c_int {
    guarded("xRead", ffi::SQLITE_IOERR_READ, || {
        let (Ok(len), Ok(offset)) = (usize::try_from(amt), u64::try_from(offset)) else {
            return ffi::SQLITE_IOERR_READ;
        };
        // SAFETY: an open file of ours; SQLite's buffer has `amt` writable bytes.
        let (s, buf) = unsafe { (slot(p_file), slice::from_raw_parts_mut(buf as *mut u8, len)) };
        code(s.vfs.read(&mut s.handle, offset, buf))
    })
}

unsafe extern "C" fn x_write(
    p_file: *mut ffi::sqlite3_file,
    buf: *const c_void,
    amt: c_int,
    offset: ffi::sqlite3_int64,
) -> c_int {
    guarded("xWrite", ffi::SQLITE_IOERR_WRITE, || {
        let (Ok(len), Ok(offset)) = (usize::try_from(amt), u64::try_from(offset)) else {
            return ffi::SQLITE_IOERR_WRITE;
        };
        // SAFETY: an open file of ours; SQLite's buffer has `amt` readable bytes.
        let (s, data) = unsafe { (slot(p_file), slice::from_raw_parts(buf as *const u8, len)) };
        code(s.vfs.write(&mut s.handle, offset, data))
    })
}

unsafe extern "C" fn x_truncate(p_file: *mut ffi::sqlite3_file, size: ffi::sqlite3_int64) -> c_int {
    guarded("xTruncate", ffi::SQLITE_IOERR_TRUNCATE, || {
        let Ok(size) = u64::try_from(size) else {
            return ffi::SQLITE_IOERR_TRUNCATE;
        };
        // SAFETY: an open file of ours.
        let s = unsafe { slot(p_file) };
        code(s.vfs.truncate(&mut s.handle, size))
    })
}

unsafe extern "C" fn x_sync(p_file: *mut ffi::sqlite3_file, _flags: c_int) -> c_int {
    guarded("xSync", ffi::SQLITE_IOERR_FSYNC, || {
        // SAFETY: an open file of ours.
        let s = unsafe { slot(p_file) };
        code(s.vfs.sync(&mut s.handle))
    })
}

unsafe extern "C" fn x_file_size(
    p_file: *mut ffi::sqlite3_file,
    p_size: *mut ffi::sqlite3_int64,
) -> c_int {
    guarded("xFileSize", ffi::SQLITE_IOERR_FSTAT, || {
        // SAFETY: an open file of ours.
        let s = unsafe { slot(p_file) };
        match s.vfs.file_size(&mut s.handle) {
            Ok(size) => {
                let Ok(size) = i64::try_from(size) else {
                    return ffi::SQLITE_IOERR_FSTAT;
                };
                // SAFETY: SQLite's out pointer is valid for writes.
                unsafe { *p_size = size };
                ffi::SQLITE_OK
            }
            Err(rc) => rc,
        }
    })
}

unsafe extern "C" fn x_lock(p_file: *mut ffi::sqlite3_file, level: c_int) -> c_int {
    guarded("xLock", ffi::SQLITE_IOERR_LOCK, || {
        let Some(level) = LockLevel::from_raw(level) else {
            return ffi::SQLITE_IOERR_LOCK;
        };
        // SAFETY: an open file of ours.
        let s = unsafe { slot(p_file) };
        if s.vfs.lock(&mut s.handle, level) {
            ffi::SQLITE_OK
        } else {
            ffi::SQLITE_BUSY
        }
    })
}

unsafe extern "C" fn x_unlock(p_file: *mut ffi::sqlite3_file, level: c_int) -> c_int {
    guarded("xUnlock", ffi::SQLITE_IOERR_UNLOCK, || {
        let Some(level) = LockLevel::from_raw(level).filter(|l| *l <= LockLevel::Shared) else {
            return ffi::SQLITE_IOERR_UNLOCK;
        };
        // SAFETY: an open file of ours.
        let s = unsafe { slot(p_file) };
        s.vfs.unlock(&mut s.handle, level);
        ffi::SQLITE_OK
    })
}

unsafe extern "C" fn x_check_reserved_lock(
    p_file: *mut ffi::sqlite3_file,
    p_res_out: *mut c_int,
) -> c_int {
    guarded(
        "xCheckReservedLock",
        ffi::SQLITE_IOERR_CHECKRESERVEDLOCK,
        || {
            // SAFETY: an open file of ours.
            let s = unsafe { slot(p_file) };
            let reserved = s.vfs.check_reserved_lock(&mut s.handle);
            // SAFETY: SQLite's out pointer is valid for writes.
            unsafe { *p_res_out = c_int::from(reserved) };
            ffi::SQLITE_OK
        },
    )
}

unsafe extern "C" fn x_file_control(
    _p_file: *mut ffi::sqlite3_file,
    _op: c_int,
    _arg: *mut c_void,
) -> c_int {
    // No file control of ours: SQLite's defaults apply to every op. (Nothing here can
    // panic; guarded all the same, like every callback.)
    guarded("xFileControl", ffi::SQLITE_NOTFOUND, || {
        ffi::SQLITE_NOTFOUND
    })
}

unsafe extern "C" fn x_sector_size(p_file: *mut ffi::sqlite3_file) -> c_int {
    // On a panic, 0: SQLite then assumes its minimum sector (512 bytes).
    guarded("xSectorSize", 0, || {
        // SAFETY: an open file of ours.
        unsafe { slot(p_file) }.vfs.sector_size()
    })
}

unsafe extern "C" fn x_device_characteristics(p_file: *mut ffi::sqlite3_file) -> c_int {
    // On a panic, 0: no guarantees claimed, SQLite's most careful behaviour.
    guarded("xDeviceCharacteristics", 0, || {
        // SAFETY: an open file of ours.
        unsafe { slot(p_file) }.vfs.device_characteristics()
    })
}

unsafe extern "C" fn x_shm_map(
    p_file: *mut ffi::sqlite3_file,
    region: c_int,
    size: c_int,
    extend: c_int,
    pp: *mut *mut c_void,
) -> c_int {
    guarded("xShmMap", ffi::SQLITE_IOERR_SHMMAP, || {
        let (Ok(region), Ok(size)) = (usize::try_from(region), usize::try_from(size)) else {
            return ffi::SQLITE_IOERR_SHMMAP;
        };
        // SAFETY: an open file of ours.
        let s = unsafe { slot(p_file) };
        match s.vfs.shm_map(&mut s.handle, region, size, extend != 0) {
            Ok(addr) => {
                // SAFETY: SQLite's out pointer is valid for writes. The region stays
                // allocated until the last handle unmaps it (`Shm::refs`).
                unsafe { *pp = addr.unwrap_or(ptr::null_mut()) as *mut c_void };
                ffi::SQLITE_OK
            }
            Err(rc) => rc,
        }
    })
}

unsafe extern "C" fn x_shm_lock(
    p_file: *mut ffi::sqlite3_file,
    offset: c_int,
    n: c_int,
    flags: c_int,
) -> c_int {
    guarded("xShmLock", ffi::SQLITE_IOERR_SHMLOCK, || {
        let (Ok(offset), Ok(n)) = (usize::try_from(offset), usize::try_from(n)) else {
            return ffi::SQLITE_IOERR_SHMLOCK;
        };
        // SAFETY: an open file of ours.
        let s = unsafe { slot(p_file) };
        match s.vfs.shm_lock(&mut s.handle, offset, n, flags) {
            Ok(true) => ffi::SQLITE_OK,
            Ok(false) => ffi::SQLITE_BUSY,
            Err(rc) => rc,
        }
    })
}

unsafe extern "C" fn x_shm_barrier(_p_file: *mut ffi::sqlite3_file) {
    // Orders this thread's accesses to the index against other connections' (the unix
    // VFS does the same with a full fence).
    guarded("xShmBarrier", (), || {
        std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst)
    });
}

unsafe extern "C" fn x_shm_unmap(p_file: *mut ffi::sqlite3_file, _delete: c_int) -> c_int {
    guarded("xShmUnmap", ffi::SQLITE_IOERR, || {
        // SAFETY: an open file of ours.
        let s = unsafe { slot(p_file) };
        s.vfs.shm_unmap(&mut s.handle);
        ffi::SQLITE_OK
    })
}

#[cfg(test)]
mod tests {
    use crate::shm::Shm;

    /// The WAL index's memory as SQLite uses it: zeroed, written through the handed-out
    /// pointers while the `Shm` is borrowed mutably again to map more regions (which
    /// moves the region list), and read back through the pointers.
    #[test]
    fn shm_regions_are_written_through_their_pointers() {
        let mut shm = Shm::default();
        let a = shm.region(0, 32768, true).unwrap().unwrap();
        assert_eq!(a.align_offset(8), 0);
        // SAFETY: `a` points to a live zeroed region of 32 KiB; offsets are in bounds.
        unsafe {
            assert!((0..32768).all(|i| a.add(i).read() == 0));
            a.add(32767).write(0xa5);
        }
        for i in 1..40 {
            let p = shm.region(i, 32768, true).unwrap().unwrap();
            // SAFETY: as above, for region `i`.
            unsafe { p.write(i as u8) };
        }
        // SAFETY: the regions live as long as `shm`, at the same addresses.
        unsafe {
            assert_eq!(a.add(32767).read(), 0xa5);
            assert_eq!(shm.region(39, 32768, false).unwrap().unwrap().read(), 39);
        }
    }
}
