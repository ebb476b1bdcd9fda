//! A bounded LRU of decrypted blocks, keyed by record position, in shards so readers on
//! different cores rarely meet on one lock.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

const SHARDS: usize = 8;
const NIL: u32 = u32::MAX;

/// Where a block's record is: (segment, offset). Segment ids are never reused, so a key
/// never names two different records.
pub type Key = (u32, u32);

struct Slot {
    key: Key,
    data: Arc<Vec<u8>>,
    prev: u32,
    next: u32,
}

struct Shard {
    map: HashMap<Key, u32, foldhash::fast::FixedState>,
    slots: Vec<Slot>,
    free: Vec<u32>,
    head: u32,
    tail: u32,
    bytes: u64,
    bytes_max: u64,
}

impl Shard {
    fn unlink(&mut self, i: u32) {
        let (p, n) = (self.slots[i as usize].prev, self.slots[i as usize].next);
        if p == NIL {
            self.head = n;
        } else {
            self.slots[p as usize].next = n;
        }
        if n == NIL {
            self.tail = p;
        } else {
            self.slots[n as usize].prev = p;
        }
    }

    fn push_front(&mut self, i: u32) {
        self.slots[i as usize].prev = NIL;
        self.slots[i as usize].next = self.head;
        if self.head != NIL {
            self.slots[self.head as usize].prev = i;
        }
        self.head = i;
        if self.tail == NIL {
            self.tail = i;
        }
    }

    fn evict(&mut self) {
        while self.bytes > self.bytes_max && self.tail != NIL {
            let i = self.tail;
            self.unlink(i);
            let key = self.slots[i as usize].key;
            self.map.remove(&key);
            let data = std::mem::take(&mut self.slots[i as usize].data);
            self.bytes -= data.len() as u64;
            self.free.push(i);
        }
    }
}

pub struct BlockCache {
    shards: Vec<Mutex<Shard>>,
}

impl BlockCache {
    pub fn new(bytes_max: u64) -> BlockCache {
        BlockCache {
            shards: (0..SHARDS)
                .map(|_| {
                    Mutex::new(Shard {
                        map: HashMap::default(),
                        slots: Vec::new(),
                        free: Vec::new(),
                        head: NIL,
                        tail: NIL,
                        bytes: 0,
                        bytes_max: bytes_max / SHARDS as u64,
                    })
                })
                .collect(),
        }
    }

    fn shard(&self, key: Key) -> &Mutex<Shard> {
        let h = (key.0 as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ (key.1 as u64 >> 12);
        &self.shards[(h as usize ^ (h >> 32) as usize) % SHARDS]
    }

    pub fn get(&self, key: Key) -> Option<Arc<Vec<u8>>> {
        let mut s = self.shard(key).lock().expect("cache lock");
        let i = *s.map.get(&key)?;
        s.unlink(i);
        s.push_front(i);
        Some(s.slots[i as usize].data.clone())
    }

    pub fn insert(&self, key: Key, data: Arc<Vec<u8>>) {
        let mut s = self.shard(key).lock().expect("cache lock");
        if s.bytes_max < data.len() as u64 {
            return;
        }
        if let Some(&i) = s.map.get(&key) {
            s.unlink(i);
            s.push_front(i);
            return;
        }
        let len = data.len() as u64;
        let slot = Slot {
            key,
            data,
            prev: NIL,
            next: NIL,
        };
        let i = match s.free.pop() {
            Some(i) => {
                s.slots[i as usize] = slot;
                i
            }
            None => {
                s.slots.push(slot);
                (s.slots.len() - 1) as u32
            }
        };
        s.map.insert(key, i);
        s.push_front(i);
        s.bytes += len;
        s.evict();
    }

    pub fn bytes(&self) -> u64 {
        self.shards
            .iter()
            .map(|s| s.lock().expect("cache lock").bytes)
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounded_and_least_recently_used_goes_first() {
        let c = BlockCache::new(SHARDS as u64 * 4096 * 4);
        for i in 0..1000u32 {
            c.insert((1, i * 4096), Arc::new(vec![i as u8; 4096]));
            assert!(c.bytes() <= SHARDS as u64 * 4096 * 4);
        }
        assert!(c.get((1, 999 * 4096)).is_some());
        assert!(c.get((1, 0)).is_none());
    }
}
