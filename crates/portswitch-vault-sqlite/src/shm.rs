//! The WAL index ("shared memory") of a database in WAL mode, kept on the heap.
//!
//! SQLite's unix VFS maps a `-shm` file so that processes share the index. A vault is
//! opened by one process only, so heap memory shared by the connections of this process
//! does the same job, and nothing of it reaches the disk. After a crash the index is
//! simply gone; the first connection finds zeroed memory and SQLite rebuilds the index
//! from the WAL file (its normal recovery).

use crate::ffi::ShmRegion;
use crate::lock::ShmLock;

/// Bytes of the WAL index: SQLite maps 32 KiB regions, one per 4,096 WAL frames. 1 GiB
/// of regions covers a WAL of 130 M frames, far past any sane checkpoint interval; a
/// request beyond it is refused (SQLITE_NOMEM) rather than allocated.
pub(crate) const SHM_BYTES_MAX: usize = 1 << 30;

/// One database's WAL index: regions and slot locks, shared by the handles mapping it.
#[derive(Debug, Default)]
pub(crate) struct Shm {
    /// Each region is its own allocation, so its address stays put while the list grows.
    /// SQLite reads and writes these bytes through the pointers we hand out, from any
    /// thread, under its own locks and barriers, also while this `Shm` is borrowed
    /// mutably: a [`ShmRegion`] holds only a raw pointer to its bytes and never makes a
    /// reference to them, so borrowing or moving the list claims nothing about the bytes.
    regions: Vec<ShmRegion>,
    bytes: usize,
    pub(crate) lock: ShmLock,
    /// Handles that mapped it; the memory goes when the last one unmaps.
    pub(crate) refs: u32,
}

impl Shm {
    /// The address of region `index` (`size` bytes), allocating it and the ones before
    /// it when `extend`. `Ok(None)`: not allocated and not asked to. `Err(())`: over
    /// [`SHM_BYTES_MAX`], a size that changed between calls, or out of memory.
    pub(crate) fn region(
        &mut self,
        index: usize,
        size: usize,
        extend: bool,
    ) -> Result<Option<*mut u8>, ()> {
        if let Some(first) = self.regions.first() {
            if first.len() != size {
                return Err(());
            }
        }
        if index >= self.regions.len() {
            if !extend {
                return Ok(None);
            }
            let total = (index + 1).checked_mul(size).ok_or(())?;
            if total > SHM_BYTES_MAX {
                return Err(());
            }
            while self.regions.len() <= index {
                self.regions.push(ShmRegion::zeroed(size).ok_or(())?);
                self.bytes += size;
            }
        }
        Ok(Some(self.regions[index].as_ptr()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn regions_stay_put() {
        let mut shm = Shm::default();
        assert_eq!(shm.region(0, 32768, false), Ok(None));
        let a = shm.region(0, 32768, true).unwrap().unwrap();
        let c = shm.region(5, 32768, true).unwrap().unwrap();
        assert_eq!(shm.region(0, 32768, false).unwrap(), Some(a));
        assert_eq!(shm.region(5, 32768, false).unwrap(), Some(c));
        assert_eq!(shm.bytes, 6 * 32768);
        assert!(shm.region(0, 4096, true).is_err());
        assert!(shm.region(SHM_BYTES_MAX / 32768, 32768, true).is_err());
        assert!(shm.region(0, 0, true).is_err() && Shm::default().region(0, 0, true).is_err());
        assert_eq!(a.align_offset(8), 0);
    }
}
