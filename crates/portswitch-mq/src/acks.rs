//! What a consumer group has settled on one partition, durably: an append-only file
//! of 16-byte entries `[offset u64][kind u32][crc u32]` (little-endian; the CRC-32C
//! covers the first 12 bytes). Kinds: 1 acked, 2 dead-lettered, 3 *floor* (every
//! offset below is settled). Appends are batched by the broker and synced before an
//! ack is confirmed, so a message whose ack was confirmed is never delivered again,
//! even after kill -9. A torn or damaged tail is cut on open. When the file holds many
//! entries below the low-water mark it is rewritten as one floor and the entries
//! above it (written aside, synced, renamed).

use std::collections::BTreeSet;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

use crate::log::LogError;

const ENTRY: usize = 16;
pub const ACKED: u32 = 1;
pub const DEAD: u32 = 2;
const FLOOR: u32 = 3;
/// Rewrite once this many entries lie below the floor.
const COMPACT_AFTER: usize = 100_000;

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> LogError + '_ {
    move |source| LogError::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn entry(offset: u64, kind: u32) -> [u8; ENTRY] {
    let mut e = [0u8; ENTRY];
    e[..8].copy_from_slice(&offset.to_le_bytes());
    e[8..12].copy_from_slice(&kind.to_le_bytes());
    let crc = crc32c::crc32c(&e[..12]);
    e[12..].copy_from_slice(&crc.to_le_bytes());
    e
}

/// One group's settlements on one partition.
#[derive(Debug)]
pub struct Acks {
    path: PathBuf,
    file: File,
    /// Every offset below is settled.
    floor: u64,
    /// Settled offsets at or above the floor.
    settled: BTreeSet<u64>,
    /// Entries in the file (for compaction).
    entries: usize,
    /// Whether any offset was ever settled (acknowledged or dead), not only passed by
    /// the floor.
    any_settled: bool,
    pending: Vec<u8>,
}

impl Acks {
    /// Opens (or creates) the file; returns it and the bytes of a bad tail cut off.
    pub fn open(path: &Path) -> Result<(Acks, u64), LogError> {
        let bytes = match std::fs::read(path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(e) => return Err(io_err(path)(e)),
        };
        let mut floor = 0;
        let mut settled = BTreeSet::new();
        let mut any_settled = false;
        let mut good = 0;
        for e in bytes.chunks(ENTRY) {
            if e.len() < ENTRY || crc32c::crc32c(&e[..12]).to_le_bytes() != e[12..16] {
                break;
            }
            let offset = u64::from_le_bytes(e[..8].try_into().expect("8"));
            match u32::from_le_bytes(e[8..12].try_into().expect("4")) {
                ACKED | DEAD => {
                    settled.insert(offset);
                    any_settled = true;
                }
                FLOOR => floor = floor.max(offset),
                _ => break,
            }
            good += ENTRY;
        }
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .map_err(io_err(path))?;
        let cut = (bytes.len() - good) as u64;
        if cut > 0 {
            file.set_len(good as u64).map_err(io_err(path))?;
            file.sync_all().map_err(io_err(path))?;
        }
        // Entries below a floor written later are settled already.
        let settled = settled.split_off(&floor);
        let mut acks = Acks {
            path: path.to_path_buf(),
            file,
            floor,
            settled,
            entries: good / ENTRY,
            any_settled,
            pending: Vec::new(),
        };
        acks.raise_floor();
        Ok((acks, cut))
    }

    fn raise_floor(&mut self) {
        while self.settled.remove(&self.floor) {
            self.floor += 1;
        }
    }

    /// Every offset below this is settled.
    pub fn floor(&self) -> u64 {
        self.floor
    }

    pub fn is_settled(&self, offset: u64) -> bool {
        offset < self.floor || self.settled.contains(&offset)
    }

    /// Records a settlement, to be written by the next [`Acks::flush`].
    pub fn settle(&mut self, offset: u64, kind: u32) {
        if self.is_settled(offset) {
            return;
        }
        self.pending.extend_from_slice(&entry(offset, kind));
        self.settled.insert(offset);
        self.any_settled = true;
        self.raise_floor();
    }

    /// Whether the group ever settled an offset itself (acknowledged or dead-lettered
    /// it), as opposed to the floor passing it.
    pub fn any_settled(&self) -> bool {
        self.any_settled
    }

    /// Whether settlements wait to be written.
    pub fn dirty(&self) -> bool {
        !self.pending.is_empty()
    }

    /// Writes the pending settlements with one write and one fdatasync.
    pub fn flush(&mut self) -> Result<(), LogError> {
        if self.pending.is_empty() {
            return Ok(());
        }
        self.file
            .write_all(&self.pending)
            .map_err(io_err(&self.path))?;
        self.file.sync_data().map_err(io_err(&self.path))?;
        self.entries += self.pending.len() / ENTRY;
        self.pending.clear();
        if self.entries > COMPACT_AFTER && self.entries > 2 * (self.settled.len() + 1) {
            self.compact()?;
        }
        Ok(())
    }

    /// Rewrites the file as the floor and the settled offsets above it.
    fn compact(&mut self) -> Result<(), LogError> {
        let mut bytes = Vec::with_capacity((self.settled.len() + 1) * ENTRY);
        bytes.extend_from_slice(&entry(self.floor, FLOOR));
        for &o in &self.settled {
            bytes.extend_from_slice(&entry(o, ACKED));
        }
        portswitch_files::write_durable(&self.path, &bytes, 0o600)?;
        self.file = OpenOptions::new()
            .append(true)
            .open(&self.path)
            .map_err(io_err(&self.path))?;
        self.entries = self.settled.len() + 1;
        Ok(())
    }

    /// Settles everything below `offset` (the log's start moved past it).
    pub fn raise_to(&mut self, offset: u64) {
        if offset > self.floor {
            self.pending.extend_from_slice(&entry(offset, FLOOR));
            self.floor = offset;
            self.settled = self.settled.split_off(&offset);
            self.raise_floor();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settlements_survive_reopening_and_a_torn_tail_is_cut() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("g.acks");
        let (mut a, cut) = Acks::open(&path).unwrap();
        assert_eq!((a.floor(), cut), (0, 0));
        for o in [0, 1, 2, 5, 7] {
            a.settle(o, ACKED);
        }
        a.settle(3, DEAD);
        a.flush().unwrap();
        assert_eq!(a.floor(), 4);
        drop(a);
        // Half an entry at the end: a crash mid-write.
        let mut f = OpenOptions::new().append(true).open(&path).unwrap();
        f.write_all(&entry(4, ACKED)[..9]).unwrap();
        drop(f);
        let (mut a, cut) = Acks::open(&path).unwrap();
        assert_eq!(cut, 9);
        assert_eq!(a.floor(), 4);
        assert!(a.is_settled(5) && a.is_settled(7) && !a.is_settled(4) && !a.is_settled(6));
        a.settle(4, ACKED);
        a.settle(6, ACKED);
        a.flush().unwrap();
        assert_eq!(a.floor(), 8);
        a.compact().unwrap();
        drop(a);
        let (a, cut) = Acks::open(&path).unwrap();
        assert_eq!((a.floor(), cut), (8, 0));
        assert_eq!(std::fs::metadata(&path).unwrap().len(), ENTRY as u64);
    }
}
