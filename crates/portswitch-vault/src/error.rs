//! Typed errors. What a disk, an attacker holding the directory or a caller can cause is
//! one of these, never a panic; [`VaultError::errno`] maps each to the POSIX errno FUSE
//! returns.

use std::io;

/// Why a vault operation failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum VaultError {
    #[error("not found")]
    NotFound,
    #[error("already exists")]
    Exists,
    #[error("not a directory")]
    NotDir,
    #[error("is a directory")]
    IsDir,
    #[error("directory not empty")]
    NotEmpty,
    /// Empty, `.`, `..`, or holding `/` or NUL.
    #[error("invalid name")]
    InvalidName,
    /// Not a symbolic link (readlink), or an operation that needs another kind.
    #[error("invalid argument: {0}")]
    Invalid(&'static str),
    /// The header's seal did not open under the key derived from this passphrase (or the
    /// header was tampered with: the two cannot be told apart, by design).
    #[error("wrong passphrase")]
    WrongPassphrase,
    /// A record failed authentication (or its frame is malformed) and no good copy was
    /// found in the mirror or the parity. Never returned as wrong bytes.
    #[error("corrupt {what} in segment {segment} at offset {offset}")]
    Corrupt {
        what: &'static str,
        segment: u32,
        offset: u64,
    },
    /// A structure that authenticated (or a clear header field) breaks the format.
    #[error("bad format of {what}: {why}")]
    Format { what: &'static str, why: String },
    /// Another process holds the vault's lock.
    #[error("vault is locked by another process")]
    Locked,
    /// The vault (or view) was opened read-only.
    #[error("read-only")]
    ReadOnly,
    /// A named limit (see [`crate::limits`]) was exceeded.
    #[error("{what} exceeds the limit of {limit}")]
    TooLarge { what: &'static str, limit: u64 },
    /// The requested version, snapshot or time is older than the retention horizon, or
    /// does not exist.
    #[error("no such version: {0}")]
    NoVersion(String),
    /// `expect_head` did not match: the vault was rolled back (or the head kept
    /// elsewhere is wrong).
    #[error("rolled back: expected version {expected}, found {found}")]
    RolledBack { expected: u64, found: u64 },
    /// Fencing: a writer (or a backup from a vault) whose fencing token `ours` is lower
    /// than `theirs`, the highest token already recorded in the vault's log or taken by
    /// the backup target. A newer writer has owned the vault since: this one is stale.
    #[error("fenced: writer token {ours} is lower than token {theirs} already recorded (a newer writer has owned the vault since)")]
    Fenced { ours: u64, theirs: u64 },
    /// The writer's fence was revoked (its port switch port was lost): no change or
    /// commit is taken any more, because another writer may own the vault now.
    #[error("the vault's port (writer token {token}) was lost ({why}): no more changes; another writer may own the vault")]
    FenceLost { token: u64, why: String },
    #[error("i/o: {0}")]
    Io(#[from] io::Error),
}

impl VaultError {
    /// The POSIX errno FUSE answers with.
    pub fn errno(&self) -> i32 {
        match self {
            VaultError::NotFound => rustix::io::Errno::NOENT.raw_os_error(),
            VaultError::Exists => rustix::io::Errno::EXIST.raw_os_error(),
            VaultError::NotDir => rustix::io::Errno::NOTDIR.raw_os_error(),
            VaultError::IsDir => rustix::io::Errno::ISDIR.raw_os_error(),
            VaultError::NotEmpty => rustix::io::Errno::NOTEMPTY.raw_os_error(),
            VaultError::InvalidName => rustix::io::Errno::INVAL.raw_os_error(),
            VaultError::Invalid(_) => rustix::io::Errno::INVAL.raw_os_error(),
            VaultError::WrongPassphrase => rustix::io::Errno::ACCESS.raw_os_error(),
            VaultError::Corrupt { .. } | VaultError::Format { .. } => {
                rustix::io::Errno::IO.raw_os_error()
            }
            VaultError::RolledBack { .. } => rustix::io::Errno::IO.raw_os_error(),
            VaultError::Locked => rustix::io::Errno::WOULDBLOCK.raw_os_error(),
            VaultError::ReadOnly => rustix::io::Errno::ROFS.raw_os_error(),
            // No longer the writer: to the file system, read-only from now on.
            VaultError::Fenced { .. } | VaultError::FenceLost { .. } => {
                rustix::io::Errno::ROFS.raw_os_error()
            }
            VaultError::TooLarge { what, .. } => {
                if *what == "name" {
                    rustix::io::Errno::NAMETOOLONG.raw_os_error()
                } else {
                    rustix::io::Errno::FBIG.raw_os_error()
                }
            }
            VaultError::NoVersion(_) => rustix::io::Errno::NOENT.raw_os_error(),
            VaultError::Io(e) => e
                .raw_os_error()
                .unwrap_or(rustix::io::Errno::IO.raw_os_error()),
        }
    }

    pub(crate) fn format(what: &'static str, why: impl Into<String>) -> VaultError {
        VaultError::Format {
            what,
            why: why.into(),
        }
    }

    /// Whether this is an integrity failure (counted, and repairable from a copy).
    pub fn is_corrupt(&self) -> bool {
        matches!(self, VaultError::Corrupt { .. })
    }

    /// Whether this is a read of a segment no longer in the live map (a gc removed it
    /// after the caller planned the read): not damage; the caller plans again.
    pub(crate) fn is_missing_segment(&self) -> bool {
        matches!(
            self,
            VaultError::Corrupt {
                what: "missing segment",
                ..
            }
        )
    }

    /// Whether this is a fencing refusal: a newer writer owns (or has owned) the vault.
    pub fn is_fenced(&self) -> bool {
        matches!(
            self,
            VaultError::Fenced { .. } | VaultError::FenceLost { .. }
        )
    }
}

pub type Result<T, E = VaultError> = std::result::Result<T, E>;
