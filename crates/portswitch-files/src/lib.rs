//! portswitch's files on disk, in one place: durable writes, files holding secrets
//! (written private, refused on open when they are not), append-only logs, and PEM
//! certificates and keys. Every error names the file at fault.
//!
//! - [`write_durable`] (and [`write_new_durable`]): write aside in the same directory
//!   with the final mode from the start, sync, rename over the target (or link it in,
//!   never replacing a file), sync the directory. A crash leaves the old file or the
//!   new one, whole, and a secret is never readable by others, not even for a moment.
//! - [`open_secret`] / [`read_secret`]: open a file that holds secrets (group keys,
//!   password verifiers) and refuse it if its mode gives group or others any access,
//!   the way ssh treats private keys: such a file may already have been read.
//! - [`open_append`]: a log created with a given mode; [`create_dir_private`]: a
//!   data directory only its owner can enter.
//! - [`load_certs`], [`load_key`], [`load_roots`]: PEM, each refusing a file without
//!   what it should hold.
//!
//! ```
//! # fn demo(dir: &std::path::Path) -> Result<(), portswitch_files::FileError> {
//! use portswitch_files::{read_secret, write_durable, SECRET_MODE};
//! let path = dir.join("keys.json");
//! write_durable(&path, b"{\"key\": 42}", SECRET_MODE)?;
//! assert_eq!(read_secret(&path)?, b"{\"key\": 42}");
//! # Ok(()) }
//! # let dir = std::env::temp_dir().join(format!("ps-files-doc-{}", std::process::id()));
//! # std::fs::create_dir_all(&dir).unwrap();
//! # demo(&dir).unwrap();
//! # std::fs::remove_dir_all(&dir).unwrap();
//! ```

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

use rustls_pki_types::pem::{self, PemObject};
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

/// Mode of files that hold secrets: owner read and write only.
pub const SECRET_MODE: u32 = 0o600;
/// Mode of files anyone on the machine may read (certificates).
pub const PUBLIC_MODE: u32 = 0o644;
/// Largest PEM file read. A PEM file is the operator's, not a peer's, but a path
/// pointing at the wrong file (a log, a device) should fail, not fill memory; a
/// system's whole CA bundle is about 0.2 MiB.
pub const PEM_FILE_BYTES_MAX: u64 = 4 << 20;

/// Why a file could not be used.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum FileError {
    /// The operating system refused (missing file, no permission, full disk...).
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// A file holding secrets gives group or others some access.
    #[error("{path} is {access} by group or others (mode {mode:04o}); run chmod 600 {path}")]
    Exposed {
        path: PathBuf,
        /// The permission bits found.
        mode: u32,
        /// "readable", or "accessible" when only write or execute bits are set.
        access: &'static str,
    },
    /// Not a regular file (a directory, a device, a socket).
    #[error("{path}: not a regular file")]
    NotAFile { path: PathBuf },
    /// Larger than the limit for its kind.
    #[error("{path}: larger than {bytes_max} bytes")]
    TooLarge { path: PathBuf, bytes_max: u64 },
    /// Malformed PEM.
    #[error("{path}: {source}")]
    Pem {
        path: PathBuf,
        #[source]
        source: pem::Error,
    },
    /// Well-formed, but without what it should hold.
    #[error("{path}: no {what} in the file")]
    Missing { path: PathBuf, what: &'static str },
}

impl FileError {
    /// The file does not exist (callers often start empty then).
    pub fn is_not_found(&self) -> bool {
        matches!(self, FileError::Io { source, .. } if source.kind() == io::ErrorKind::NotFound)
    }

    /// The file at fault.
    pub fn path(&self) -> &Path {
        match self {
            FileError::Io { path, .. }
            | FileError::Exposed { path, .. }
            | FileError::NotAFile { path }
            | FileError::TooLarge { path, .. }
            | FileError::Pem { path, .. }
            | FileError::Missing { path, .. } => path,
        }
    }

    fn io(path: &Path, source: io::Error) -> FileError {
        FileError::Io {
            path: path.to_path_buf(),
            source,
        }
    }
}

impl From<FileError> for io::Error {
    fn from(e: FileError) -> io::Error {
        let kind = match &e {
            FileError::Io { source, .. } => source.kind(),
            FileError::Exposed { .. } => io::ErrorKind::PermissionDenied,
            FileError::NotAFile { .. }
            | FileError::TooLarge { .. }
            | FileError::Pem { .. }
            | FileError::Missing { .. } => io::ErrorKind::InvalidData,
        };
        io::Error::new(kind, e)
    }
}

type Result<T> = std::result::Result<T, FileError>;

/// The directory holding `path` ("." for a bare file name).
fn dir_of(path: &Path) -> &Path {
    match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    }
}

/// `path` with `.tmp` appended: in the same directory, so the rename stays on one
/// file system and is atomic.
fn aside(path: &Path) -> PathBuf {
    let mut p = path.as_os_str().to_owned();
    p.push(".tmp");
    PathBuf::from(p)
}

#[cfg(unix)]
fn set_create_mode(opts: &mut OpenOptions, mode: u32) {
    std::os::unix::fs::OpenOptionsExt::mode(opts, mode);
}

#[cfg(not(unix))]
fn set_create_mode(_opts: &mut OpenOptions, _mode: u32) {}

/// Writes `bytes` to a fresh file beside `path` created with `mode` (less the umask),
/// syncs it and returns its name. A stale file of that name (from a crash) is removed
/// first: an existing file would keep its own, perhaps wider, mode.
fn write_aside(path: &Path, bytes: &[u8], mode: u32) -> Result<PathBuf> {
    let tmp = aside(path);
    match std::fs::remove_file(&tmp) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(FileError::io(&tmp, e)),
        _ => {}
    }
    let mut opts = OpenOptions::new();
    opts.write(true).create_new(true);
    set_create_mode(&mut opts, mode);
    let written = (|| {
        let mut f = opts.open(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()
    })();
    if let Err(e) = written {
        let _ = std::fs::remove_file(&tmp);
        return Err(FileError::io(&tmp, e));
    }
    Ok(tmp)
}

/// Makes the directory's entries durable (a file created, renamed or removed in it
/// survives a crash once this returns).
pub fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| FileError::io(dir, e))
}

/// Replaces `path` with `bytes`, durably: written aside (created with `mode`),
/// synced, renamed over `path`, and the directory synced. A crash leaves the old
/// content or the new, whole. Writers of one path must not run concurrently (they
/// share the file written aside); every caller holds a lock for that.
pub fn write_durable(path: &Path, bytes: &[u8], mode: u32) -> Result<()> {
    let tmp = write_aside(path, bytes, mode)?;
    if let Err(e) = std::fs::rename(&tmp, path) {
        let _ = std::fs::remove_file(&tmp);
        return Err(FileError::io(path, e));
    }
    sync_dir(dir_of(path))
}

/// Like [`write_durable`], but never replaces a file: if `path` exists this fails
/// with an error of kind `AlreadyExists` and `path` is untouched (the new file is
/// linked in, which fails rather than replaces).
pub fn write_new_durable(path: &Path, bytes: &[u8], mode: u32) -> Result<()> {
    let tmp = write_aside(path, bytes, mode)?;
    let linked = std::fs::hard_link(&tmp, path);
    let _ = std::fs::remove_file(&tmp);
    linked.map_err(|e| FileError::io(path, e))?;
    sync_dir(dir_of(path))
}

/// Creates `dir` and any missing parents, owner-only (0700, less the umask): a data
/// directory. An existing directory keeps its mode.
pub fn create_dir_private(dir: &Path) -> Result<()> {
    let mut builder = std::fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    std::os::unix::fs::DirBuilderExt::mode(&mut builder, 0o700);
    builder.create(dir).map_err(|e| FileError::io(dir, e))
}

/// Refuses a file whose permission bits give group or others any access.
#[cfg(unix)]
fn check_private(path: &Path, file: &File) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let meta = file.metadata().map_err(|e| FileError::io(path, e))?;
    if !meta.is_file() {
        return Err(FileError::NotAFile {
            path: path.to_path_buf(),
        });
    }
    let mode = meta.permissions().mode() & 0o7777;
    if mode & 0o077 != 0 {
        return Err(FileError::Exposed {
            path: path.to_path_buf(),
            mode,
            access: if mode & 0o044 != 0 {
                "readable"
            } else {
                "accessible"
            },
        });
    }
    Ok(())
}

#[cfg(not(unix))]
fn check_private(_path: &Path, _file: &File) -> Result<()> {
    Ok(())
}

/// Opens a file holding secrets for reading, refusing it (`FileError::Exposed`) if
/// group or others have any access to it. The check is on the opened file, so the
/// file checked is the file read.
pub fn open_secret(path: &Path) -> Result<File> {
    let file = File::open(path).map_err(|e| FileError::io(path, e))?;
    check_private(path, &file)?;
    Ok(file)
}

/// Reads a whole file holding secrets, as [`open_secret`] opens it. These are files
/// this program wrote; their size is bounded by what wrote them.
pub fn read_secret(path: &Path) -> Result<Vec<u8>> {
    let mut file = open_secret(path)?;
    let mut bytes = Vec::new();
    file.read_to_end(&mut bytes)
        .map_err(|e| FileError::io(path, e))?;
    Ok(bytes)
}

/// Opens `path` for appending, creating it with `mode` (less the umask) if missing.
/// An existing file keeps its mode: see [`is_private`].
pub fn open_append(path: &Path, mode: u32) -> Result<File> {
    let mut opts = OpenOptions::new();
    opts.create(true).append(true);
    set_create_mode(&mut opts, mode);
    opts.open(path).map_err(|e| FileError::io(path, e))
}

/// Whether group and others have no access to the open file (always true where
/// there are no Unix modes).
pub fn is_private(file: &File) -> io::Result<bool> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        Ok(file.metadata()?.permissions().mode() & 0o077 == 0)
    }
    #[cfg(not(unix))]
    {
        let _ = file;
        Ok(true)
    }
}

/// Reads a PEM file, at most [`PEM_FILE_BYTES_MAX`].
fn read_pem(path: &Path) -> Result<Vec<u8>> {
    let file = File::open(path).map_err(|e| FileError::io(path, e))?;
    let mut bytes = Vec::new();
    file.take(PEM_FILE_BYTES_MAX + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| FileError::io(path, e))?;
    if bytes.len() as u64 > PEM_FILE_BYTES_MAX {
        return Err(FileError::TooLarge {
            path: path.to_path_buf(),
            bytes_max: PEM_FILE_BYTES_MAX,
        });
    }
    Ok(bytes)
}

fn certs_in(path: &Path, what: &'static str) -> Result<Vec<CertificateDer<'static>>> {
    let bytes = read_pem(path)?;
    let certs = CertificateDer::pem_slice_iter(&bytes)
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(|source| FileError::Pem {
            path: path.to_path_buf(),
            source,
        })?;
    if certs.is_empty() {
        return Err(FileError::Missing {
            path: path.to_path_buf(),
            what,
        });
    }
    Ok(certs)
}

/// The certificate chain in a PEM file (leaf first); an error if it holds none.
pub fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>> {
    certs_in(path, "certificate")
}

/// The trusted CA certificates in a PEM file; an error if it holds none (trusting
/// nobody is never what was meant).
pub fn load_roots(path: &Path) -> Result<Vec<CertificateDer<'static>>> {
    certs_in(path, "CA certificate")
}

/// The first private key (PKCS#8, PKCS#1 or SEC1) in a PEM file.
///
/// Its mode is not checked: key files are often provisioned by other tools (a
/// secrets manager, a container mount) with modes of their own. Keys this program
/// writes are private (`portswitch cert`).
pub fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>> {
    let mut bytes = read_pem(path)?;
    let key = PrivateKeyDer::from_pem_slice(&bytes);
    // Do not leave the key's text in freed memory.
    bytes.fill(0);
    std::hint::black_box(&bytes);
    key.map_err(|source| match source {
        pem::Error::NoItemsFound => FileError::Missing {
            path: path.to_path_buf(),
            what: "private key",
        },
        source => FileError::Pem {
            path: path.to_path_buf(),
            source,
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bare_file_name_syncs_the_current_directory() {
        assert_eq!(dir_of(Path::new("auth.json")), Path::new("."));
        assert_eq!(dir_of(Path::new("/data/auth.json")), Path::new("/data"));
        assert_eq!(
            aside(Path::new("/data/raft.json")),
            Path::new("/data/raft.json.tmp")
        );
    }
}
