//! The port table: every port that has an owner, a waiter or a watcher.
//!
//! Memory per port is a product figure (docs/BENCHMARKS.md, "Memory per port"), so entries are compact: names of up
//! to [`INLINE_NAME_BYTES`] bytes live inside the entry, values and the rarely-used
//! watcher/queue lists live in side slabs addressed by `u32`, and the hash index stores
//! only a `u32` slot per port. An entry never moves while it exists, so its slot is a
//! stable handle: sessions keep slots of the ports they own, wait for and watch, and LIST
//! uses slots as cursors.
//!
//! The hash index is split into [`INDEX_SHARDS`] independent tables chosen by hash
//! bits. Each grows on its own, so growing never rehashes more than a small fraction of
//! the ports at once: one big table would stop the server for most of a second while
//! it doubled from 8 to 16 million entries (measured), longer than a short lease.
//!
//! The table is also the seam for spreading ports across cores: every operation goes
//! through `PortTable`'s methods, so ports can be split by hash of their name.

use std::collections::VecDeque;
use std::hash::BuildHasher;

use hashbrown::HashTable;

/// Marks an absent slot or index.
pub const NONE: u32 = u32::MAX;

/// Independent shards of the hash index. At 100 million ports a shard holds about
/// 100,000, so one shard's growth rehashes at most that many entries.
pub const INDEX_SHARDS: usize = 1024;
const _: () = assert!(INDEX_SHARDS.is_power_of_two());

/// The shard of a hash. Uses bits 32.. so that neither hashbrown's bucket index (low
/// bits, for shards below 2^32 buckets) nor its control byte (top 7 bits) loses entropy.
fn shard_of(hash: u64) -> usize {
    (hash >> 32) as usize & (INDEX_SHARDS - 1)
}

/// Names up to this many bytes are stored inside the entry with no allocation.
pub const INLINE_NAME_BYTES: usize = 30;

/// A port name: inline when short, boxed when long.
#[derive(Debug, Clone)]
enum Name {
    Inline {
        len: u8,
        bytes: [u8; INLINE_NAME_BYTES],
    },
    Heap(Box<[u8]>),
}

impl Name {
    fn new(name: &[u8]) -> Name {
        if name.len() <= INLINE_NAME_BYTES {
            let mut bytes = [0u8; INLINE_NAME_BYTES];
            bytes[..name.len()].copy_from_slice(name);
            Name::Inline {
                len: name.len() as u8,
                bytes,
            }
        } else {
            Name::Heap(name.into())
        }
    }
    fn as_bytes(&self) -> &[u8] {
        match self {
            Name::Inline { len, bytes } => &bytes[..*len as usize],
            Name::Heap(b) => b,
        }
    }
    /// The empty name marks a free slot (port names are never empty).
    const FREE: Name = Name::Inline {
        len: 0,
        bytes: [0; INLINE_NAME_BYTES],
    };
}

/// One port.
#[derive(Debug, Clone)]
pub struct Entry {
    name: Name,
    /// Token of the current grant (meaningless while `owner == NONE`).
    pub token: u64,
    /// Session slot of the owner, or `NONE`.
    pub owner: u32,
    /// Index of this entry's slot in the owner's list of ports.
    pub owner_pos: u32,
    value: u32,
    extra: u32,
}

// The memory budget per port depends on this; a change here should be deliberate.
const _: () = assert!(std::mem::size_of::<Entry>() == 56);

impl Entry {
    pub fn name(&self) -> &[u8] {
        self.name.as_bytes()
    }
    fn is_free(&self) -> bool {
        matches!(self.name, Name::Inline { len: 0, .. })
    }
}

/// A session waiting in a port's queue, with the value it registers with.
#[derive(Debug, Clone)]
pub struct Waiter {
    pub session: u32,
    pub value: Box<[u8]>,
}

/// Watchers and waiters of a port; most ports have neither, so this lives aside.
#[derive(Debug, Default, Clone)]
pub struct Extra {
    pub watchers: Vec<u32>,
    pub queue: VecDeque<Waiter>,
}

/// See the module docs.
#[derive(Debug)]
pub struct PortTable {
    index: Vec<HashTable<u32>>,
    indexed: usize,
    entries: Vec<Entry>,
    free: Vec<u32>,
    values: slab::Slab<Box<[u8]>>,
    extras: slab::Slab<Extra>,
    hasher: foldhash::fast::FixedState,
    owned: usize,
}

impl PortTable {
    /// `seed` keys the hash so that names chosen by clients cannot be made to collide.
    pub fn new(seed: u64) -> Self {
        PortTable {
            index: (0..INDEX_SHARDS).map(|_| HashTable::new()).collect(),
            indexed: 0,
            entries: Vec::new(),
            free: Vec::new(),
            values: slab::Slab::new(),
            extras: slab::Slab::new(),
            hasher: foldhash::fast::FixedState::with_seed(seed),
            owned: 0,
        }
    }

    /// Ports with an entry (owned, or free with waiters or watchers).
    pub fn len(&self) -> usize {
        self.indexed
    }

    pub fn is_empty(&self) -> bool {
        self.indexed == 0
    }

    /// Whether `slot` holds a port (slots of removed ports are reused).
    pub fn is_live(&self, slot: u32) -> bool {
        self.entries
            .get(slot as usize)
            .is_some_and(|e| !e.is_free())
    }

    /// Ports with an owner.
    pub fn owned(&self) -> usize {
        self.owned
    }

    /// One past the highest slot ever used (the end of a LIST scan).
    pub fn slots(&self) -> usize {
        self.entries.len()
    }

    fn hash(&self, name: &[u8]) -> u64 {
        self.hasher.hash_one(name)
    }

    /// The slot of `name`, if it has an entry.
    pub fn find(&self, name: &[u8]) -> Option<u32> {
        let entries = &self.entries;
        let hash = self.hash(name);
        self.index[shard_of(hash)]
            .find(hash, |&slot| entries[slot as usize].name() == name)
            .copied()
    }

    /// Creates a free entry for `name`, which must not have one.
    pub fn insert(&mut self, name: &[u8]) -> u32 {
        debug_assert!(!name.is_empty());
        let entry = Entry {
            name: Name::new(name),
            token: 0,
            owner: NONE,
            owner_pos: NONE,
            value: NONE,
            extra: NONE,
        };
        let slot = match self.free.pop() {
            Some(slot) => {
                self.entries[slot as usize] = entry;
                slot
            }
            None => {
                let slot = u32::try_from(self.entries.len()).expect("port slots fit u32");
                assert!(slot != NONE, "port table full");
                self.entries.push(entry);
                slot
            }
        };
        let hash = self.hash(name);
        let (entries, hasher) = (&self.entries, &self.hasher);
        self.index[shard_of(hash)]
            .insert_unique(hash, slot, |&s| hasher.hash_one(entries[s as usize].name()));
        self.indexed += 1;
        slot
    }

    /// Removes the entry at `slot`, which must be free of owner, waiters and watchers.
    pub fn remove(&mut self, slot: u32) {
        let e = &self.entries[slot as usize];
        assert!(e.owner == NONE && e.extra == NONE && e.value == NONE);
        let hash = self.hash(e.name());
        let found = self.index[shard_of(hash)].find_entry(hash, |&s| s == slot);
        match found {
            Ok(occupied) => {
                occupied.remove();
            }
            Err(_) => panic!("port table index lost slot {slot}"),
        }
        self.indexed -= 1;
        self.entries[slot as usize].name = Name::FREE;
        self.free.push(slot);
    }

    pub fn get(&self, slot: u32) -> &Entry {
        &self.entries[slot as usize]
    }

    pub fn get_mut(&mut self, slot: u32) -> &mut Entry {
        &mut self.entries[slot as usize]
    }

    /// Records a grant: `owner` now owns the port at `slot` with `token` and `value`.
    pub fn set_owner(&mut self, slot: u32, owner: u32, owner_pos: u32, token: u64, value: &[u8]) {
        let value_idx = if value.is_empty() {
            NONE
        } else {
            self.values.insert(value.into()) as u32
        };
        let e = &mut self.entries[slot as usize];
        assert!(e.owner == NONE && e.value == NONE);
        e.owner = owner;
        e.owner_pos = owner_pos;
        e.token = token;
        e.value = value_idx;
        self.owned += 1;
    }

    /// Replaces the value of an owned port.
    pub fn set_value(&mut self, slot: u32, value: &[u8]) {
        let old = std::mem::replace(&mut self.entries[slot as usize].value, NONE);
        if old != NONE {
            self.values.remove(old as usize);
        }
        if !value.is_empty() {
            self.entries[slot as usize].value = self.values.insert(value.into()) as u32;
        }
    }

    /// Clears the owner of `slot`, returning the token of the grant that ended.
    pub fn clear_owner(&mut self, slot: u32) -> u64 {
        let e = &mut self.entries[slot as usize];
        assert!(e.owner != NONE);
        e.owner = NONE;
        e.owner_pos = NONE;
        let value = std::mem::replace(&mut e.value, NONE);
        let token = e.token;
        if value != NONE {
            self.values.remove(value as usize);
        }
        self.owned -= 1;
        token
    }

    pub fn value(&self, slot: u32) -> &[u8] {
        match self.entries[slot as usize].value {
            NONE => &[],
            v => &self.values[v as usize],
        }
    }

    /// Watchers and waiters of `slot`, if it has any.
    pub fn extra(&self, slot: u32) -> Option<&Extra> {
        match self.entries[slot as usize].extra {
            NONE => None,
            x => Some(&self.extras[x as usize]),
        }
    }

    /// Watchers and waiters of `slot`, created if absent.
    pub fn extra_mut(&mut self, slot: u32) -> &mut Extra {
        let e = &mut self.entries[slot as usize];
        if e.extra == NONE {
            e.extra = self.extras.insert(Extra::default()) as u32;
        }
        &mut self.extras[e.extra as usize]
    }

    /// Drops the extra of `slot` if it has become empty.
    pub fn shrink_extra(&mut self, slot: u32) {
        let e = &mut self.entries[slot as usize];
        if e.extra != NONE {
            let x = &self.extras[e.extra as usize];
            if x.watchers.is_empty() && x.queue.is_empty() {
                self.extras.remove(e.extra as usize);
                e.extra = NONE;
            }
        }
    }

    /// Removes the entry at `slot` if nothing refers to it any more.
    pub fn remove_if_unused(&mut self, slot: u32) {
        self.shrink_extra(slot);
        let e = &self.entries[slot as usize];
        if e.owner == NONE && e.extra == NONE {
            self.remove(slot);
        }
    }

    /// Owned entries from slot `from` on, in slot order, visiting at most `slots_max`
    /// slots. Returns the slots visited up to.
    pub fn scan(
        &self,
        from: usize,
        slots_max: usize,
        mut visit: impl FnMut(u32, &Entry) -> bool,
    ) -> usize {
        let end = self.entries.len().min(from.saturating_add(slots_max));
        let mut slot = from;
        while slot < end {
            let e = &self.entries[slot];
            if !e.is_free() && e.owner != NONE && !visit(slot as u32, e) {
                return slot;
            }
            slot += 1;
        }
        slot
    }

    /// Bytes of heap this table holds, by its own accounting (capacity, not use).
    pub fn heap_bytes(&self) -> usize {
        self.entries.capacity() * std::mem::size_of::<Entry>()
            + self
                .index
                .iter()
                .map(|t| t.capacity() * (std::mem::size_of::<u32>() + 1))
                .sum::<usize>()
            + self.free.capacity() * 4
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn insert_find_remove_reuses_slots() {
        let mut t = PortTable::new(7);
        let long = vec![b'x'; 200];
        let a = t.insert(b"a");
        let b = t.insert(&long);
        assert_eq!(t.find(b"a"), Some(a));
        assert_eq!(t.find(&long), Some(b));
        assert_eq!(t.get(b).name(), &long[..]);
        t.remove(a);
        assert_eq!(t.find(b"a"), None);
        assert_eq!(t.insert(b"c"), a, "freed slot reused");
        assert_eq!(t.len(), 2);
    }

    #[test]
    fn owner_value_and_extra_lifecycle() {
        let mut t = PortTable::new(1);
        let s = t.insert(b"p");
        t.set_owner(s, 3, 0, 42, b"v");
        assert_eq!(t.value(s), b"v");
        assert_eq!(t.owned(), 1);
        t.extra_mut(s).watchers.push(9);
        assert_eq!(t.clear_owner(s), 42);
        t.remove_if_unused(s);
        assert_eq!(t.find(b"p"), Some(s), "kept for its watcher");
        t.extra_mut(s).watchers.clear();
        t.remove_if_unused(s);
        assert_eq!(t.find(b"p"), None);
    }
}
