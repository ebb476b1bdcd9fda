//! portswitch vault as a SQLite VFS: an encrypted, compressed, versioned database without
//! FUSE (the SQLCipher use case, with the vault's integrity checks, repair, versions and
//! backups on top).
//!
//! [`register`] gives SQLite a VFS over a [`Vault`]; a connection opened with that VFS
//! name keeps its database, rollback journal and WAL as files inside the vault. The
//! SQLite is the one `rusqlite` links (its `bundled` build), so a `rusqlite::Connection`
//! is the way in:
//!
//! ```no_run
//! use portswitch_vault::{CreateOptions, Vault};
//! use rusqlite::{Connection, OpenFlags};
//!
//! let vault = Vault::create("/tmp/v", b"passphrase", CreateOptions::default())?;
//! portswitch_vault_sqlite::register(vault.clone(), "secrets")?;
//! let db = Connection::open_with_flags_and_vfs("app.db", OpenFlags::default(), "secrets")?;
//! db.execute_batch("CREATE TABLE t(x); INSERT INTO t VALUES ('hello');")?;
//! drop(db);
//! portswitch_vault_sqlite::unregister("secrets")?;
//! vault.close()?;
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! [`open`] does the registration for you under a name derived from the vault's id.
//!
//! What to know:
//! - A durable SQLite commit is a vault version: `xSync` commits the vault and makes it
//!   durable. What a crash (even `kill -9`) leaves is the state of the last vault
//!   commit, always a prefix of SQLite's writes, so the database stays consistent; with
//!   `synchronous=OFF` (or `NORMAL` in WAL mode) the last transactions may be lost, as
//!   after a power loss on a plain disk.
//! - A page that fails authentication and has no good copy (mirror, parity) is an I/O
//!   error (`SQLITE_IOERR_READ`, "disk I/O error"), never wrong rows.
//! - Locks are in memory: connections of this process see each other, as they must;
//!   other processes cannot open the vault at all (it holds its `LOCK` file).
//! - SQLite's default rollback journal (`DELETE`) is the mode to use: one durable vault
//!   commit per transaction. WAL mode works (the WAL index lives on the heap: see
//!   `shm.rs`) but is slower here: a WAL frame (page + 24-byte header) straddles two
//!   vault blocks, and the checkpoint writes every page a second time.
//! - Temporary files stay in memory (at most 1 GiB each).
//! - Keep SQLite's page size equal to the vault's block size (both 4 KiB by default):
//!   each page write is then one block.
//!
//! Layout: `vfs.rs` is the VFS in safe Rust, `ffi.rs` the C tables that call it (the
//! crate's only `unsafe`), `lock.rs` and `shm.rs` SQLite's locks and WAL index,
//! `path.rs` names, `store.rs` the slice of the vault API the VFS uses.

mod ffi;
mod lock;
mod path;
mod shm;
mod store;
mod vfs;

use std::ffi::CString;
use std::sync::{Arc, Mutex};

use portswitch_vault::Vault;
use rusqlite::{Connection, OpenFlags};

use crate::store::Store;
use crate::vfs::VaultVfs;

/// Why [`register`] or [`unregister`] failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RegisterError {
    /// Empty, or holding a NUL byte.
    #[error("invalid VFS name {0:?}")]
    InvalidName(String),
    /// SQLite already has a VFS of this name (ours or another).
    #[error("a SQLite VFS named {0:?} is already registered")]
    NameTaken(String),
    /// The vault already has a VFS (named here). Locks and WAL indexes live in the VFS,
    /// so two VFSes over one vault would let their connections trample each other.
    #[error("this vault is already registered as VFS {0:?}")]
    VaultRegistered(String),
    /// [`unregister`] of a name this crate did not register.
    #[error("no vault VFS named {0:?} is registered")]
    NotRegistered(String),
    /// [`unregister`] while connections still have files open through the VFS.
    #[error("VFS {name:?} still has {open_files} open files")]
    Busy { name: String, open_files: usize },
    /// SQLite refused the registration (its result code).
    #[error("SQLite refused to register the VFS (code {0})")]
    Sqlite(i32),
}

/// Why [`open`] failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum OpenError {
    #[error(transparent)]
    Register(#[from] RegisterError),
    #[error(transparent)]
    Sqlite(#[from] rusqlite::Error),
}

struct Registration {
    name: String,
    /// The vault's id (`None` for the in-memory stores of the unit tests).
    vault_id: Option<[u8; 16]>,
    table: ffi::VfsTable,
}

/// Every VFS this crate registered and has not unregistered, by name. SQLite keeps its
/// own list; the tables its entries point to are never freed (`ffi.rs`).
static REGISTRY: Mutex<Vec<Registration>> = Mutex::new(Vec::new());

fn registry() -> std::sync::MutexGuard<'static, Vec<Registration>> {
    REGISTRY.lock().unwrap_or_else(|p| p.into_inner())
}

/// Registers a SQLite VFS named `vfs_name` that keeps databases in `vault`. It is not
/// made SQLite's default: open connections with
/// `Connection::open_with_flags_and_vfs(path, flags, vfs_name)`, where `path` is a path
/// inside the vault (`app.db` or `/dir/app.db`; the directory must exist).
///
/// One VFS per vault: a second registration of the same vault is refused
/// ([`RegisterError::VaultRegistered`]), since locks live in the VFS. The VFS holds a
/// clone of `vault` until [`unregister`].
pub fn register(vault: Vault, vfs_name: &str) -> Result<(), RegisterError> {
    let id = vault.vault_id();
    register_store(Arc::new(vault), Some(id), vfs_name)
}

fn register_store(
    store: Arc<dyn Store>,
    vault_id: Option<[u8; 16]>,
    vfs_name: &str,
) -> Result<(), RegisterError> {
    let name = CString::new(vfs_name)
        .ok()
        .filter(|n| !n.is_empty())
        .ok_or_else(|| RegisterError::InvalidName(vfs_name.to_owned()))?;
    let mut registry = registry();
    if let Some(r) = registry
        .iter()
        .find(|r| vault_id.is_some() && r.vault_id == vault_id)
    {
        return Err(RegisterError::VaultRegistered(r.name.clone()));
    }
    if ffi::is_registered(&name) {
        return Err(RegisterError::NameTaken(vfs_name.to_owned()));
    }
    let vfs = Arc::new(VaultVfs::new(store));
    let table = ffi::register(&name, vfs).map_err(RegisterError::Sqlite)?;
    registry.push(Registration {
        name: vfs_name.to_owned(),
        vault_id,
        table,
    });
    Ok(())
}

/// Removes a VFS that [`register`] made and drops its clone of the vault (so that the
/// vault can be closed and opened again in this process). Refused while any connection
/// has a file open through it: close the connections first.
///
/// A connection can still point to the VFS without a file open through it (a
/// `:memory:` database opened with its name, or an open racing with this call). Such a
/// connection stays safe to use: the VFS's C table is never freed, only retired, so its
/// time and randomness functions keep working, and anything that would open, delete or
/// look up a file through it fails (`SQLITE_CANTOPEN` / `SQLITE_IOERR`). The name is
/// free for a new [`register`] at once.
pub fn unregister(vfs_name: &str) -> Result<(), RegisterError> {
    let mut registry = registry();
    let index = registry
        .iter()
        .position(|r| r.name == vfs_name)
        .ok_or_else(|| RegisterError::NotRegistered(vfs_name.to_owned()))?;
    let rc = ffi::retire(&registry[index].table, |vfs| match vfs.open_files() {
        0 => Ok(()),
        open_files => Err(RegisterError::Busy {
            name: vfs_name.to_owned(),
            open_files,
        }),
    })?;
    if rc != rusqlite::ffi::SQLITE_OK {
        return Err(RegisterError::Sqlite(rc));
    }
    registry.swap_remove(index);
    Ok(())
}

/// The VFS name [`open`] uses for a vault: `portswitch-vault-` and its id in hex.
pub fn vfs_name(vault: &Vault) -> String {
    let mut name = String::from("portswitch-vault-");
    for b in vault.vault_id() {
        name.push_str(&format!("{b:02x}"));
    }
    name
}

/// Opens (creating it if needed) the database at `db_path` inside `vault` through the
/// vault's VFS, registering it as [`vfs_name`] first if the vault has none yet. Call
/// [`unregister`] with that name once every connection is closed to let go of the vault.
pub fn open(vault: &Vault, db_path: &str) -> Result<Connection, OpenError> {
    let id = Some(vault.vault_id());
    let existing = registry()
        .iter()
        .find(|r| r.vault_id == id)
        .map(|r| r.name.clone());
    let name = match existing {
        Some(name) => name,
        None => {
            let name = vfs_name(vault);
            register(vault.clone(), &name)?;
            name
        }
    };
    Ok(Connection::open_with_flags_and_vfs(
        db_path,
        OpenFlags::default(),
        name.as_str(),
    )?)
}

#[cfg(test)]
mod tests;
