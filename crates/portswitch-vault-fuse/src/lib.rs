//! A [`portswitch_vault::Vault`] served as a FUSE file system.
//!
//! Every file-system call becomes one call of the vault's inode-level API (`lookup`,
//! `read`, `write`, `rename`, ...), answered with the POSIX errno of
//! [`VaultError::errno`](portswitch_vault::VaultError::errno): a block that fails
//! authentication and has no good copy in the mirror or the parity is `EIO`, never wrong
//! bytes.
//!
//! # When changes become versions
//! The vault writes blocks as they come and makes them a version with a *commit*. The
//! mount commits:
//! - when a file that was written through a handle is closed (`flush`, and `release`
//!   for handles that were never flushed), so `cp`, an editor's save or a shell
//!   redirection is one version;
//! - every [`MountOptions::commit_interval`] (1 s) while anything is uncommitted
//!   (metadata changes, files held open while written, memory-mapped writes);
//! - on `fsync`/`fdatasync`/`fsyncdir` through [`Vault::fsync`], which also makes the
//!   commit durable (fdatasync of the segment and of the mirror) before it answers;
//! - and on unmount, with a final durable sync.
//!
//! What was written but not committed is lost when the process is killed; what
//! `fsync` answered for never is.
//!
//! # Fencing
//! A vault opened with a [`portswitch_vault::Fence`] (`vault mount --switch`: the
//! fencing token of the vault's port in the port switch) stops the moment the fence is
//! revoked: every change answers `EROFS`, the periodic committer stops, and the
//! unmount's final commit fails with the typed error
//! ([`MountError::Vault`] of a fencing [`VaultError`]). Reads go on.
//!
//! # Layout
//! - [`mount`] starts a session ([`MountedVault`]): `fs` holds the [`fuser::Filesystem`]
//!   implementation ([`VaultFs`]), `workers` the committer and the continuous-backup
//!   threads, `unmount` the unmount that falls back to a lazy one when the mount is
//!   busy, `metrics` the request counters.
//! - The kernel talks to several worker threads at once ([`MountOptions::threads`], each
//!   with its own cloned `/dev/fuse` descriptor): the vault is thread-safe and the
//!   callbacks hold no lock across a vault call.
//! - fuser is used without its `libfuse` feature: root mounts with the mount(2) system
//!   call, other users through Debian's `fusermount3` (package `fuse3`). Nothing links
//!   libfuse.
//!
//! ```no_run
//! use portswitch_vault::{OpenOptions, Vault};
//! use portswitch_vault_fuse::{mount, MountOptions};
//!
//! let vault = Vault::open("/srv/vault", b"passphrase", OpenOptions::default())?;
//! let mounted = mount(vault, "/mnt/vault", MountOptions::default())?;
//! std::fs::write("/mnt/vault/hello.txt", b"hello")?; // a version once closed
//! mounted.unmount()?; // final durable commit
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

mod fs;
mod metrics;
mod unmount;
mod workers;

use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use portswitch_vault::target::BackupTarget;
use portswitch_vault::{Vault, VaultError, ROOT};

/// The root's inode number, as the vault names it.
pub(crate) const ROOT_INO: u64 = ROOT;

pub use fs::VaultFs;
pub use metrics::FuseMetrics;

/// Every limit and default of the mount, named once.
pub mod limits {
    use std::time::Duration;

    /// Bytes of one write request from the kernel (and of one read): large requests
    /// keep sequential throughput up. The kernel's own cap (`max_pages`, 256 pages by
    /// default) is 1 MiB.
    pub const MAX_WRITE_BYTES_DEFAULT: u32 = 1 << 20;
    pub const MAX_READAHEAD_BYTES_DEFAULT: u32 = 1 << 20;
    /// fuser's receive buffer holds 16 MiB of payload.
    pub const MAX_WRITE_BYTES_MAX: u32 = 16 << 20;
    /// FUSE worker threads.
    pub const THREADS_DEFAULT: usize = 4;
    pub const THREADS_MAX: usize = 64;
    /// Background requests (readahead, writeback) the kernel keeps in flight.
    pub const BACKGROUND_REQUESTS_MAX: u16 = 64;
    /// How often uncommitted changes are committed.
    pub const COMMIT_INTERVAL_DEFAULT: Duration = Duration::from_secs(1);
    pub const COMMIT_INTERVAL_MIN: Duration = Duration::from_millis(10);
    /// How long the kernel may cache attributes and names. Only this process changes
    /// the vault while it is mounted (the vault's lock), so the cache cannot go stale
    /// behind our back.
    pub const ATTR_TTL_DEFAULT: Duration = Duration::from_secs(1);
    /// Open directory handles, each holding its listing (a directory can hold up to
    /// `portswitch_vault::limits::DIR_ENTRIES_MAX` names).
    pub const DIR_HANDLES_MAX: usize = 4096;
    /// How long an unmount retries while the mount is busy before it detaches it
    /// (lazy unmount), and how long it then waits for the last open file to close.
    pub const UNMOUNT_BUSY_RETRY: Duration = Duration::from_secs(2);
    pub const UNMOUNT_LAZY_WAIT: Duration = Duration::from_secs(10);
}

/// Where a mount's continuous backup goes.
#[derive(Clone)]
pub enum BackupTo {
    /// A local directory.
    Dir(PathBuf),
    /// Any backup target: a backup server on another node
    /// (`portswitch_vault_remote::RemoteTarget`), for one.
    Target(Arc<Mutex<Box<dyn BackupTarget>>>),
}

impl BackupTo {
    pub fn target(t: impl BackupTarget + 'static) -> BackupTo {
        BackupTo::Target(Arc::new(Mutex::new(Box::new(t))))
    }

    pub fn describe(&self) -> String {
        match self {
            BackupTo::Dir(d) => d.display().to_string(),
            BackupTo::Target(t) => t.lock().map(|t| t.describe()).unwrap_or_default(),
        }
    }
}

impl std::fmt::Debug for BackupTo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "BackupTo({})", self.describe())
    }
}

/// How to serve a vault.
#[derive(Clone, Debug)]
pub struct MountOptions {
    /// FUSE worker threads (each with its own `/dev/fuse` descriptor).
    pub threads: usize,
    /// Commit uncommitted changes this often.
    pub commit_interval: Duration,
    /// How long the kernel caches attributes and directory entries.
    pub attr_ttl: Duration,
    pub max_write_bytes: u32,
    pub max_readahead_bytes: u32,
    /// Mount read-only (also what a vault opened read-only gets).
    pub read_only: bool,
    /// Let other users than the one mounting in (`allow_other`; a non-root user needs
    /// `user_allow_other` in /etc/fuse.conf). Permissions are then checked by the
    /// kernel against each file's mode (`default_permissions`).
    pub allow_other: bool,
    /// The kernel's writeback cache: small writes are gathered in the page cache and
    /// sent in large batches. Faster for small random writes; the kernel then keeps
    /// sizes and times itself. `fsync` and `close` still commit everything written.
    pub writeback_cache: bool,
    /// Continuous backup: after each commit, ship the new records to this directory
    /// or target (`Vault::backup_to`, `Vault::backup_to_target`) from a background
    /// thread.
    pub backup: Option<BackupTo>,
    /// The source name shown by `mount` and /proc/mounts.
    pub fsname: String,
}

impl Default for MountOptions {
    fn default() -> Self {
        MountOptions {
            threads: limits::THREADS_DEFAULT,
            commit_interval: limits::COMMIT_INTERVAL_DEFAULT,
            attr_ttl: limits::ATTR_TTL_DEFAULT,
            max_write_bytes: limits::MAX_WRITE_BYTES_DEFAULT,
            max_readahead_bytes: limits::MAX_READAHEAD_BYTES_DEFAULT,
            read_only: false,
            allow_other: false,
            writeback_cache: false,
            backup: None,
            fsname: "portswitch-vault".into(),
        }
    }
}

/// Why a mount or an unmount failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum MountError {
    #[error("invalid mount option: {0}")]
    Invalid(&'static str),
    #[error("mount point {path}: {source}")]
    MountPoint { path: PathBuf, source: io::Error },
    #[error("cannot mount on {path}: {source} (FUSE needs /dev/fuse, and fusermount3 from the fuse3 package when not root)")]
    Mount { path: PathBuf, source: io::Error },
    #[error("cannot unmount {path}: {source}")]
    Unmount { path: PathBuf, source: io::Error },
    #[error("the FUSE session ended with an error: {0}")]
    Session(io::Error),
    #[error("vault: {0}")]
    Vault(#[from] VaultError),
}

/// A mounted vault. Unmount with [`MountedVault::unmount`]; dropping it unmounts too,
/// ignoring errors.
pub struct MountedVault {
    session: Option<fuser::BackgroundSession>,
    mountpoint: PathBuf,
    vault: Vault,
    shared: Arc<fs::Shared>,
    workers: Option<workers::Workers>,
    read_only: bool,
}

impl std::fmt::Debug for MountedVault {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MountedVault")
            .field("mountpoint", &self.mountpoint)
            .finish_non_exhaustive()
    }
}

/// Mounts `vault` on `mountpoint` (an existing directory) and serves it from background
/// threads until [`MountedVault::unmount`] (or an unmount from outside).
pub fn mount(
    vault: Vault,
    mountpoint: impl AsRef<Path>,
    opts: MountOptions,
) -> Result<MountedVault, MountError> {
    if opts.threads == 0 || opts.threads > limits::THREADS_MAX {
        return Err(MountError::Invalid("threads must be within 1..=64"));
    }
    if opts.commit_interval < limits::COMMIT_INTERVAL_MIN {
        return Err(MountError::Invalid(
            "commit interval must be at least 10 ms",
        ));
    }
    if opts.max_write_bytes < 4096 || opts.max_write_bytes > limits::MAX_WRITE_BYTES_MAX {
        return Err(MountError::Invalid(
            "max write must be within 4 KiB..=16 MiB",
        ));
    }
    if opts.max_readahead_bytes < 4096 {
        return Err(MountError::Invalid("max readahead must be at least 4 KiB"));
    }
    let mountpoint = mountpoint.as_ref();
    let meta = std::fs::metadata(mountpoint).map_err(|source| MountError::MountPoint {
        path: mountpoint.to_path_buf(),
        source,
    })?;
    if !meta.is_dir() {
        return Err(MountError::MountPoint {
            path: mountpoint.to_path_buf(),
            source: io::Error::new(io::ErrorKind::NotADirectory, "not a directory"),
        });
    }
    // An absolute path, so unmount works whatever the working directory is then.
    let mountpoint = mountpoint
        .canonicalize()
        .map_err(|source| MountError::MountPoint {
            path: mountpoint.to_path_buf(),
            source,
        })?;

    if !opts.read_only {
        remove_unlinked(&vault)?;
    }
    let shared = Arc::new(fs::Shared::new(opts.backup.clone()));
    let filesystem = VaultFs::new(vault.clone(), shared.clone(), &opts);

    let mut cfg = fuser::Config::default();
    cfg.mount_options = vec![
        fuser::MountOption::FSName(opts.fsname.clone()),
        fuser::MountOption::Subtype("portswitch-vault".into()),
        fuser::MountOption::NoDev,
        fuser::MountOption::NoSuid,
        fuser::MountOption::NoAtime,
    ];
    cfg.mount_options.push(if opts.read_only {
        fuser::MountOption::RO
    } else {
        fuser::MountOption::RW
    });
    if opts.allow_other {
        cfg.acl = fuser::SessionACL::All;
        cfg.mount_options
            .push(fuser::MountOption::DefaultPermissions);
    }
    cfg.n_threads = Some(opts.threads);
    cfg.clone_fd = opts.threads > 1;

    let session = fuser::Session::new(filesystem, &mountpoint, &cfg)
        .and_then(fuser::Session::spawn)
        .map_err(|source| MountError::Mount {
            path: mountpoint.clone(),
            source,
        })?;
    let workers = workers::Workers::start(vault.clone(), shared.clone(), &opts);
    tracing::info!(mountpoint = %mountpoint.display(), threads = opts.threads, "vault mounted");
    Ok(MountedVault {
        session: Some(session),
        mountpoint,
        vault,
        shared,
        workers: Some(workers),
        read_only: opts.read_only,
    })
}

impl MountedVault {
    /// Where the vault is mounted (canonical path).
    pub fn mountpoint(&self) -> &Path {
        &self.mountpoint
    }

    /// The vault being served (a clone shares everything).
    pub fn vault(&self) -> &Vault {
        &self.vault
    }

    /// The mount's counters (requests by operation, errors, commits by reason,
    /// backups).
    pub fn metrics(&self) -> FuseMetrics {
        self.shared.metrics.clone()
    }

    /// Whether the session has ended: unmounted from outside (`fusermount3 -u`,
    /// `umount`), or the kernel connection was aborted.
    pub fn is_finished(&self) -> bool {
        self.session.as_ref().is_none_or(|s| s.guard.is_finished())
    }

    /// Unmounts (lazily when the mount stays busy, see [`limits::UNMOUNT_BUSY_RETRY`]),
    /// waits for the session to end, stops the background threads and makes
    /// everything written durable (a final commit and sync, then a final backup).
    pub fn unmount(mut self) -> Result<(), MountError> {
        self.finish()
    }

    /// After [`MountedVault::is_finished`]: collects the session's result, stops the
    /// background threads and syncs. The same as `unmount` with nothing to unmount.
    pub fn finish(&mut self) -> Result<(), MountError> {
        let mut result = Ok(());
        let mut ended = true;
        if let Some(session) = self.session.take() {
            if !session.guard.is_finished() {
                if let Err(e) = unmount::unmount(&self.mountpoint) {
                    // Give the session back to Drop, which tries again.
                    self.session = Some(session);
                    return Err(e);
                }
            }
            (result, ended) = wait_session(session, &self.mountpoint);
        }
        if let Some(w) = self.workers.take() {
            w.stop();
        }
        // Files unlinked while open were closed with the session (the lazy case
        // leaves them for the next mount).
        if !self.read_only && ended {
            if let Err(e) = remove_unlinked(&self.vault) {
                tracing::warn!(error = %e, "removing files unlinked while open");
            }
        }
        // The last words: everything committed and durable, then shipped.
        let synced = self.vault.sync().map(|_| ()).map_err(MountError::Vault);
        if let Err(e) = &synced {
            tracing::error!(error = %e, "final sync after unmount failed");
        }
        if let Some(Err(e)) = workers::final_backup(&self.vault, &self.shared) {
            tracing::error!(error = %e, "final backup after unmount failed");
        }
        tracing::info!(mountpoint = %self.mountpoint.display(), "vault unmounted");
        result.and(synced)
    }
}

/// Empties the hidden directory of files unlinked while open, left by a mount that
/// did not end cleanly.
fn remove_unlinked(vault: &Vault) -> Result<(), MountError> {
    let dir = match vault.lookup(ROOT, fs::UNLINKED_DIR) {
        Ok(a) => a.ino,
        Err(VaultError::NotFound) => return Ok(()),
        Err(e) => return Err(e.into()),
    };
    let entries = vault.readdir(dir)?;
    for e in &entries {
        vault.unlink(dir, &e.name)?;
    }
    vault.rmdir(ROOT, fs::UNLINKED_DIR)?;
    vault.commit()?;
    tracing::info!(
        files = entries.len(),
        "removed files unlinked while open before a crash"
    );
    Ok(())
}

/// Waits for the session to end: its result, and whether it ended (rather than was
/// left running on a detached mount).
fn wait_session(
    session: fuser::BackgroundSession,
    mountpoint: &Path,
) -> (Result<(), MountError>, bool) {
    // A detached (lazy) mount lives on until its last open file closes; wait a while,
    // then leave the thread to it: the vault is synced below either way.
    let deadline = Instant::now() + limits::UNMOUNT_LAZY_WAIT;
    while !session.guard.is_finished() {
        if Instant::now() > deadline {
            tracing::warn!(
                mountpoint = %mountpoint.display(),
                "files are still open on the detached mount; syncing without waiting for them"
            );
            // Leaking the session keeps fuser from unmounting the path again later
            // (something else may be mounted there by then).
            std::mem::forget(session);
            return (Ok(()), false);
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    (session.join().map_err(MountError::Session), true)
}

impl Drop for MountedVault {
    fn drop(&mut self) {
        if self.session.is_some() || self.workers.is_some() {
            if let Err(e) = self.finish() {
                tracing::warn!(error = %e, "unmount on drop failed");
            }
        }
    }
}
