//! Backup targets: where [`crate::Vault::backup_to_target`] ships a vault's files.
//!
//! A backup is a copy of the vault's directory (header, segments, parity) that stays a
//! prefix of the vault's log, plus a `FENCE` file holding the highest writer token it
//! took. [`BackupTarget`] is the handful of file operations a backup needs, so the
//! same shipping and verifying code serves a local directory ([`DirTarget`]) and a
//! remote one (the `portswitch-vault-remote` crate runs a [`DirTarget`] on the far
//! side and forwards these operations over an authenticated channel). A target only
//! ever holds ciphertext: it never needs the passphrase.

use std::fs::{self, File};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use crate::error::{Result, VaultError};
use crate::format::VAULT_ID_BYTES;
use crate::store::{list_segments, par_path, seg_path, sync_dir, SEG_DIR};

/// A file of a backup.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TargetFile {
    /// Segment `id`'s log.
    Segment(u32),
    /// Segment `id`'s parity.
    Parity(u32),
}

/// One segment held by a target, and the lengths of its files.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TargetEntry {
    pub id: u32,
    pub segment_len: u64,
    pub parity_len: Option<u64>,
}

/// Bytes a single [`BackupTarget::write`] or [`BackupTarget::read`] carries at most.
pub const TARGET_IO_BYTES_MAX: usize = 1 << 20;
/// The largest file a target holds: a segment of `SEGMENT_BYTES_MAX` or its parity
/// (smaller). Offsets and lengths past it are refused, so a peer cannot make a server
/// create, or hash its way through, a huge sparse file.
pub const TARGET_FILE_BYTES_MAX: u64 = 2 * crate::limits::SEGMENT_BYTES_MAX;

fn within(end: u64) -> Result<()> {
    if end > TARGET_FILE_BYTES_MAX {
        return Err(VaultError::TooLarge {
            what: "backup file",
            limit: TARGET_FILE_BYTES_MAX,
        });
    }
    Ok(())
}

/// The file operations a backup needs. Calls come in this order: [`BackupTarget::begin`]
/// first (it takes the target's lock for as long as the target lives), then any.
pub trait BackupTarget: Send {
    /// Where the target is, for messages.
    fn describe(&self) -> String;
    /// The local directory, when the target is one (a backup must not be the vault).
    fn local_dir(&self) -> Option<&Path> {
        None
    }
    /// Prepares the target for `vault_id` and takes its lock (one backup at a time).
    fn begin(&mut self, vault_id: &[u8; VAULT_ID_BYTES]) -> Result<()>;
    /// Prepares the target for reading `vault_id`'s files, without its lock (reads
    /// of a backup while another backup writes it see whole records: a backup only
    /// appends to what it already holds, or ships a segment again after a cut).
    fn begin_read(&mut self, vault_id: &[u8; VAULT_ID_BYTES]) -> Result<()>;
    /// Releases the lock `begin` took.
    fn end(&mut self) {}
    /// The highest writer token the target took (0: none yet).
    fn fence(&mut self) -> Result<u64>;
    fn set_fence(&mut self, token: u64) -> Result<()>;
    /// The header the target holds, if any.
    fn header(&mut self) -> Result<Option<Vec<u8>>>;
    /// Replaces the header atomically and durably.
    fn set_header(&mut self, bytes: &[u8]) -> Result<()>;
    /// The segments the target holds.
    fn list(&mut self) -> Result<Vec<TargetEntry>>;
    /// SHA-256 of bytes `from..to` of a file (which must be that long).
    fn hash(&mut self, f: TargetFile, from: u64, to: u64) -> Result<[u8; 32]>;
    /// Writes `bytes` at `off` (creating the file); at most [`TARGET_IO_BYTES_MAX`].
    fn write(&mut self, f: TargetFile, off: u64, bytes: &[u8]) -> Result<()>;
    /// Reads `len` bytes at `off`; at most [`TARGET_IO_BYTES_MAX`].
    fn read(&mut self, f: TargetFile, off: u64, len: usize) -> Result<Vec<u8>>;
    /// Cuts (or extends with zeros) a file to `len`.
    fn set_len(&mut self, f: TargetFile, len: u64) -> Result<()>;
    /// Makes a file's data durable.
    fn sync(&mut self, f: TargetFile) -> Result<()>;
    /// Removes segment `id` and its parity.
    fn remove(&mut self, id: u32) -> Result<()>;
    /// Makes creations and removals durable.
    fn sync_dir(&mut self) -> Result<()>;
}

/// A backup in a local directory.
pub struct DirTarget {
    dir: PathBuf,
    vault_id: [u8; VAULT_ID_BYTES],
    lock: Option<File>,
    /// Begun for reading only ([`BackupTarget::begin_read`]).
    reading: bool,
}

impl DirTarget {
    pub fn new(dir: impl Into<PathBuf>) -> DirTarget {
        DirTarget {
            dir: dir.into(),
            vault_id: [0; VAULT_ID_BYTES],
            lock: None,
            reading: false,
        }
    }

    fn path(&self, f: TargetFile) -> PathBuf {
        match f {
            TargetFile::Segment(id) => seg_path(&self.dir, id),
            TargetFile::Parity(id) => par_path(&self.dir, id),
        }
    }

    fn open(&self, f: TargetFile, create: bool) -> Result<File> {
        Ok(fs::OpenOptions::new()
            .read(true)
            .write(create)
            .create(create)
            .truncate(false)
            .open(self.path(f))?)
    }

    /// Writes need `begin` (the lock).
    fn begun(&self) -> Result<()> {
        if self.lock.is_none() {
            return Err(VaultError::Invalid("backup target written before begin"));
        }
        Ok(())
    }

    /// Reads need `begin` or `begin_read`.
    fn readable(&self) -> Result<()> {
        if self.lock.is_none() && !self.reading {
            return Err(VaultError::Invalid("backup target read before begin"));
        }
        Ok(())
    }
}

impl BackupTarget for DirTarget {
    fn describe(&self) -> String {
        self.dir.display().to_string()
    }

    fn local_dir(&self) -> Option<&Path> {
        Some(&self.dir)
    }

    fn begin(&mut self, vault_id: &[u8; VAULT_ID_BYTES]) -> Result<()> {
        self.lock = None;
        fs::create_dir_all(self.dir.join(SEG_DIR))?;
        self.lock = Some(crate::open::take_lock(&self.dir)?);
        self.vault_id = *vault_id;
        if let Some(theirs) = self.header()? {
            let (c, _) = crate::format::HeaderClear::decode(&theirs)?;
            if c.vault_id != *vault_id {
                self.lock = None;
                return Err(VaultError::format(
                    "backup",
                    "the target holds another vault",
                ));
            }
        }
        Ok(())
    }

    fn begin_read(&mut self, vault_id: &[u8; VAULT_ID_BYTES]) -> Result<()> {
        self.lock = None;
        self.reading = false;
        if let Some(theirs) = self.header()? {
            let (c, _) = crate::format::HeaderClear::decode(&theirs)?;
            if c.vault_id != *vault_id {
                return Err(VaultError::format(
                    "backup",
                    "the target holds another vault",
                ));
            }
        } else {
            return Err(VaultError::NotFound);
        }
        self.vault_id = *vault_id;
        self.reading = true;
        Ok(())
    }

    fn end(&mut self) {
        self.lock = None;
        self.reading = false;
    }

    fn fence(&mut self) -> Result<u64> {
        self.readable()?;
        crate::fencing::read_target(&self.dir, &self.vault_id)
    }

    fn set_fence(&mut self, token: u64) -> Result<()> {
        self.begun()?;
        let theirs = crate::fencing::read_target(&self.dir, &self.vault_id)?;
        if token < theirs {
            return Err(VaultError::Fenced {
                ours: token,
                theirs,
            });
        }
        crate::fencing::write_target(&self.dir, &self.vault_id, token)
    }

    fn header(&mut self) -> Result<Option<Vec<u8>>> {
        match crate::header::read_file(&self.dir) {
            Ok(h) => Ok(Some(h)),
            Err(VaultError::NotFound) => Ok(None),
            Err(e) => Err(e),
        }
    }

    fn set_header(&mut self, bytes: &[u8]) -> Result<()> {
        self.begun()?;
        crate::header::write_file(&self.dir, bytes)
    }

    fn list(&mut self) -> Result<Vec<TargetEntry>> {
        self.readable()?;
        let mut out = Vec::new();
        for id in list_segments(&self.dir)? {
            let segment_len = fs::metadata(seg_path(&self.dir, id))?.len();
            let parity_len = fs::metadata(par_path(&self.dir, id)).map(|m| m.len()).ok();
            out.push(TargetEntry {
                id,
                segment_len,
                parity_len,
            });
        }
        Ok(out)
    }

    fn hash(&mut self, f: TargetFile, from: u64, to: u64) -> Result<[u8; 32]> {
        self.readable()?;
        within(to)?;
        if from > to {
            return Err(VaultError::Invalid("hash range reversed"));
        }
        crate::maint::hash_range(&self.open(f, false)?, from, to)
    }

    fn write(&mut self, f: TargetFile, off: u64, bytes: &[u8]) -> Result<()> {
        self.begun()?;
        within(off.saturating_add(bytes.len() as u64))?;
        if bytes.len() > TARGET_IO_BYTES_MAX {
            return Err(VaultError::TooLarge {
                what: "backup write",
                limit: TARGET_IO_BYTES_MAX as u64,
            });
        }
        Ok(self.open(f, true)?.write_all_at(bytes, off)?)
    }

    fn read(&mut self, f: TargetFile, off: u64, len: usize) -> Result<Vec<u8>> {
        self.readable()?;
        within(off.saturating_add(len as u64))?;
        if len > TARGET_IO_BYTES_MAX {
            return Err(VaultError::TooLarge {
                what: "backup read",
                limit: TARGET_IO_BYTES_MAX as u64,
            });
        }
        let mut buf = vec![0u8; len];
        self.open(f, false)?.read_exact_at(&mut buf, off)?;
        Ok(buf)
    }

    fn set_len(&mut self, f: TargetFile, len: u64) -> Result<()> {
        self.begun()?;
        within(len)?;
        Ok(self.open(f, true)?.set_len(len)?)
    }

    fn sync(&mut self, f: TargetFile) -> Result<()> {
        self.begun()?;
        Ok(self.open(f, false)?.sync_data()?)
    }

    fn remove(&mut self, id: u32) -> Result<()> {
        self.begun()?;
        for p in [seg_path(&self.dir, id), par_path(&self.dir, id)] {
            match fs::remove_file(p) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(e.into()),
            }
        }
        Ok(())
    }

    fn sync_dir(&mut self) -> Result<()> {
        self.begun()?;
        sync_dir(&self.dir.join(SEG_DIR))?;
        Ok(sync_dir(&self.dir)?)
    }
}

/// Copies a whole backup from `from` into the empty (or absent) local directory `to`,
/// verifying every file by hash on both sides: how a backup held elsewhere comes back
/// to be opened, checked or restored from. Returns the bytes copied.
pub fn pull(
    from: &mut dyn BackupTarget,
    vault_id: &[u8; VAULT_ID_BYTES],
    to: &Path,
) -> Result<u64> {
    // An empty or absent directory only: leftovers (an interrupted pull of another
    // vault) would mix into this one.
    match fs::read_dir(to) {
        Ok(mut d) => {
            if d.next().is_some() {
                return Err(VaultError::Invalid(
                    "pull into a directory that is not empty",
                ));
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e.into()),
    }
    from.begin_read(vault_id)?;
    let header = from.header()?.ok_or(VaultError::Invalid(
        "the backup holds no vault with that id",
    ))?;
    // The header must be this vault's (a server could answer with another's).
    let (clear, _) = crate::format::HeaderClear::decode(&header)?;
    if clear.vault_id != *vault_id {
        return Err(VaultError::format(
            "backup",
            "the server sent another vault's header",
        ));
    }
    let mut dst = DirTarget::new(to);
    dst.begin(vault_id)?;
    let mut copied = 0u64;
    for e in from.list()? {
        let files = std::iter::once((TargetFile::Segment(e.id), e.segment_len))
            .chain(e.parity_len.map(|l| (TargetFile::Parity(e.id), l)));
        for (f, len) in files {
            let mut off = 0;
            dst.set_len(f, 0)?;
            while off < len {
                let n = ((len - off) as usize).min(TARGET_IO_BYTES_MAX);
                let bytes = from.read(f, off, n)?;
                dst.write(f, off, &bytes)?;
                off += n as u64;
            }
            dst.sync(f)?;
            if from.hash(f, 0, len)? != dst.hash(f, 0, len)? {
                return Err(VaultError::Corrupt {
                    what: "pulled copy differs from the backup",
                    segment: e.id,
                    offset: 0,
                });
            }
            copied += len;
        }
    }
    let fence = from.fence()?;
    if fence > 0 {
        dst.set_fence(fence)?;
    }
    dst.sync_dir()?;
    // The header last: until it is there, the directory is not a vault.
    dst.set_header(&header)?;
    Ok(copied + header.len() as u64)
}
