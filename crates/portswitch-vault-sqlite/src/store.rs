//! What the VFS needs from the vault: a narrow, inode-level file API. [`Vault`]
//! implements it; the crate's own tests also run SQLite over an in-memory
//! implementation, so the VFS is tested apart from the vault's format.

use portswitch_vault::{Attr, Ino, Result, SetAttr, Vault, Version};

pub(crate) trait Store: Send + Sync + 'static {
    fn resolve(&self, path: &str) -> Result<Attr>;
    fn lookup(&self, parent: Ino, name: &[u8]) -> Result<Attr>;
    fn create_file(&self, parent: Ino, name: &[u8], mode: u32) -> Result<Attr>;
    fn unlink(&self, parent: Ino, name: &[u8]) -> Result<()>;
    fn getattr(&self, ino: Ino) -> Result<Attr>;
    fn set_size(&self, ino: Ino, size: u64) -> Result<()>;
    fn read(&self, ino: Ino, offset: u64, buf: &mut [u8]) -> Result<usize>;
    fn write(&self, ino: Ino, offset: u64, data: &[u8]) -> Result<usize>;
    /// Commit, then make everything committed durable.
    fn fsync(&self, ino: Ino) -> Result<()>;
    /// Commit without waiting for the disk: survives a crash of this process.
    fn commit(&self) -> Result<Version>;
    /// Commit, then make the whole vault durable.
    fn sync(&self) -> Result<Version>;
    /// Opened read-only: every change would fail.
    fn read_only(&self) -> bool;
}

impl Store for Vault {
    fn resolve(&self, path: &str) -> Result<Attr> {
        Vault::resolve(self, path)
    }
    fn lookup(&self, parent: Ino, name: &[u8]) -> Result<Attr> {
        Vault::lookup(self, parent, name)
    }
    fn create_file(&self, parent: Ino, name: &[u8], mode: u32) -> Result<Attr> {
        Vault::create_file(self, parent, name, mode)
    }
    fn unlink(&self, parent: Ino, name: &[u8]) -> Result<()> {
        Vault::unlink(self, parent, name)
    }
    fn getattr(&self, ino: Ino) -> Result<Attr> {
        Vault::getattr(self, ino)
    }
    fn set_size(&self, ino: Ino, size: u64) -> Result<()> {
        let set = SetAttr {
            size: Some(size),
            ..SetAttr::default()
        };
        Vault::setattr(self, ino, set).map(|_| ())
    }
    fn read(&self, ino: Ino, offset: u64, buf: &mut [u8]) -> Result<usize> {
        Vault::read(self, ino, offset, buf)
    }
    fn write(&self, ino: Ino, offset: u64, data: &[u8]) -> Result<usize> {
        Vault::write(self, ino, offset, data)
    }
    fn fsync(&self, ino: Ino) -> Result<()> {
        Vault::fsync(self, ino)
    }
    fn commit(&self) -> Result<Version> {
        Vault::commit(self)
    }
    fn sync(&self) -> Result<Version> {
        Vault::sync(self)
    }
    fn read_only(&self) -> bool {
        Vault::is_read_only(self)
    }
}

#[cfg(test)]
pub(crate) mod mem {
    //! An in-memory [`Store`] for the VFS's own tests: one flat directory level is
    //! enough for SQLite (database, journal, WAL side by side).
    use super::*;
    use portswitch_vault::{FileKind, VaultError, ROOT};
    use std::collections::HashMap;
    use std::sync::Mutex;
    use std::time::UNIX_EPOCH;

    #[derive(Default)]
    pub(crate) struct MemStore {
        inner: Mutex<Inner>,
        /// Test hook: the operation ("read", "write", "fsync") that panics, to check
        /// that a panic inside a VFS callback reaches SQLite as an error.
        panic_in: Mutex<Option<&'static str>>,
    }

    #[derive(Default)]
    struct Inner {
        names: HashMap<(Ino, Vec<u8>), Ino>,
        files: HashMap<Ino, Vec<u8>>,
        next: Ino,
        syncs: u64,
    }

    fn attr(ino: Ino, kind: FileKind, size: u64) -> Attr {
        Attr {
            ino,
            kind,
            size,
            mode: 0o644,
            uid: 0,
            gid: 0,
            atime: UNIX_EPOCH,
            mtime: UNIX_EPOCH,
            ctime: UNIX_EPOCH,
            nlink: 1,
            blocks: size.div_ceil(512),
            blksize: 4096,
        }
    }

    impl MemStore {
        pub(crate) fn syncs(&self) -> u64 {
            self.inner.lock().unwrap().syncs
        }

        /// Makes `op` panic from now on (`None`: nothing panics).
        pub(crate) fn panic_in(&self, op: Option<&'static str>) {
            *self.panic_in.lock().unwrap() = op;
        }

        /// Panics if the hook says so; called before `inner` is locked, so that the
        /// store is not poisoned and works again once the hook is cleared.
        fn hook(&self, op: &'static str) {
            if *self.panic_in.lock().unwrap() == Some(op) {
                panic!("MemStore test hook: {op} panics");
            }
        }
    }

    impl Store for MemStore {
        fn resolve(&self, path: &str) -> Result<Attr> {
            if path == "/" {
                return Ok(attr(ROOT, FileKind::Dir, 0));
            }
            let name = path.trim_start_matches('/');
            self.lookup(ROOT, name.as_bytes())
        }
        fn lookup(&self, parent: Ino, name: &[u8]) -> Result<Attr> {
            let g = self.inner.lock().unwrap();
            let ino = *g
                .names
                .get(&(parent, name.to_vec()))
                .ok_or(VaultError::NotFound)?;
            Ok(attr(ino, FileKind::File, g.files[&ino].len() as u64))
        }
        fn create_file(&self, parent: Ino, name: &[u8], _mode: u32) -> Result<Attr> {
            let mut g = self.inner.lock().unwrap();
            if g.names.contains_key(&(parent, name.to_vec())) {
                return Err(VaultError::Exists);
            }
            g.next += 1;
            let ino = ROOT + g.next;
            g.names.insert((parent, name.to_vec()), ino);
            g.files.insert(ino, Vec::new());
            Ok(attr(ino, FileKind::File, 0))
        }
        fn unlink(&self, parent: Ino, name: &[u8]) -> Result<()> {
            let mut g = self.inner.lock().unwrap();
            let ino = g
                .names
                .remove(&(parent, name.to_vec()))
                .ok_or(VaultError::NotFound)?;
            g.files.remove(&ino);
            Ok(())
        }
        fn getattr(&self, ino: Ino) -> Result<Attr> {
            let g = self.inner.lock().unwrap();
            let f = g.files.get(&ino).ok_or(VaultError::NotFound)?;
            Ok(attr(ino, FileKind::File, f.len() as u64))
        }
        fn set_size(&self, ino: Ino, size: u64) -> Result<()> {
            let mut g = self.inner.lock().unwrap();
            let f = g.files.get_mut(&ino).ok_or(VaultError::NotFound)?;
            f.resize(size as usize, 0);
            Ok(())
        }
        fn read(&self, ino: Ino, offset: u64, buf: &mut [u8]) -> Result<usize> {
            self.hook("read");
            let g = self.inner.lock().unwrap();
            let f = g.files.get(&ino).ok_or(VaultError::NotFound)?;
            let start = (offset as usize).min(f.len());
            let n = buf.len().min(f.len() - start);
            buf[..n].copy_from_slice(&f[start..start + n]);
            Ok(n)
        }
        fn write(&self, ino: Ino, offset: u64, data: &[u8]) -> Result<usize> {
            self.hook("write");
            let mut g = self.inner.lock().unwrap();
            let f = g.files.get_mut(&ino).ok_or(VaultError::NotFound)?;
            let end = offset as usize + data.len();
            if f.len() < end {
                f.resize(end, 0);
            }
            f[offset as usize..end].copy_from_slice(data);
            Ok(data.len())
        }
        fn fsync(&self, _ino: Ino) -> Result<()> {
            self.hook("fsync");
            self.inner.lock().unwrap().syncs += 1;
            Ok(())
        }
        fn commit(&self) -> Result<Version> {
            Ok(0)
        }
        fn sync(&self) -> Result<Version> {
            self.inner.lock().unwrap().syncs += 1;
            Ok(0)
        }
        fn read_only(&self) -> bool {
            false
        }
    }
}
