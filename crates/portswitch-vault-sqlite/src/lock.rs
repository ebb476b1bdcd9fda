//! SQLite's locks, kept in memory: the file locks of the rollback journal protocol
//! (`xLock`/`xUnlock`/`xCheckReservedLock`) and the eight slot locks of the WAL index
//! (`xShmLock`). Pure state machines, no I/O: the VFS keeps one per open file (keyed by
//! inode) and feeds them the requests of its connections.
//!
//! They only order connections of this process. That is enough because a vault is
//! opened by one process at a time (the vault holds its `LOCK` file): no other process
//! can reach the same database.

/// The lock levels of SQLite's `xLock`, in order.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum LockLevel {
    None = 0,
    Shared = 1,
    Reserved = 2,
    /// Held by a writer waiting for readers to leave; keeps new readers out.
    Pending = 3,
    Exclusive = 4,
}

impl LockLevel {
    /// SQLite's `SQLITE_LOCK_*` value; `None` for a value it never sends.
    pub(crate) fn from_raw(raw: i32) -> Option<LockLevel> {
        Some(match raw {
            0 => LockLevel::None,
            1 => LockLevel::Shared,
            2 => LockLevel::Reserved,
            3 => LockLevel::Pending,
            4 => LockLevel::Exclusive,
            _ => return None,
        })
    }
}

/// Who asks: one id per open file handle.
pub(crate) type Owner = u64;

/// The file lock of one database, shared by every handle open on it.
///
/// Readers count the handles at `Shared` or above; at most one handle (the writer)
/// is above `Shared`. The same rules as the unix VFS's byte-range locks: a reserved
/// lock coexists with readers, a pending lock keeps new readers out, an exclusive lock
/// needs every other reader gone.
#[derive(Debug, Default)]
pub(crate) struct FileLock {
    readers: u32,
    writer: Option<(Owner, LockLevel)>,
}

impl FileLock {
    /// Raises `held` (the handle's level) towards `want`. Returns false (SQLITE_BUSY)
    /// when another handle is in the way; `held` may then have moved to `Pending`, as
    /// SQLite's contract allows, so that readers drain.
    pub(crate) fn lock(&mut self, owner: Owner, held: &mut LockLevel, want: LockLevel) -> bool {
        if *held >= want {
            return true;
        }
        match want {
            LockLevel::None => true,
            LockLevel::Shared => {
                if matches!(self.writer, Some((_, l)) if l >= LockLevel::Pending) {
                    return false;
                }
                self.readers += 1;
                *held = LockLevel::Shared;
                true
            }
            LockLevel::Reserved => {
                assert_eq!(*held, LockLevel::Shared, "RESERVED asked without SHARED");
                if self.writer.is_some() {
                    return false;
                }
                self.writer = Some((owner, LockLevel::Reserved));
                *held = LockLevel::Reserved;
                true
            }
            LockLevel::Pending | LockLevel::Exclusive => {
                assert!(*held >= LockLevel::Shared, "EXCLUSIVE asked without SHARED");
                if matches!(self.writer, Some((o, _)) if o != owner) {
                    return false;
                }
                if self.readers > 1 {
                    self.writer = Some((owner, LockLevel::Pending));
                    *held = LockLevel::Pending;
                    return false;
                }
                self.writer = Some((owner, want));
                *held = want;
                true
            }
        }
    }

    /// Lowers `held` to `to` (`Shared` or `None`, as SQLite asks).
    pub(crate) fn unlock(&mut self, owner: Owner, held: &mut LockLevel, to: LockLevel) {
        if *held <= to {
            return;
        }
        if *held > LockLevel::Shared {
            assert!(
                matches!(self.writer, Some((o, _)) if o == owner),
                "a handle above SHARED must be the writer"
            );
            self.writer = None;
        }
        if to == LockLevel::None && *held >= LockLevel::Shared {
            assert!(self.readers > 0, "reader count underflow");
            self.readers -= 1;
        }
        *held = to.min(LockLevel::Shared);
    }

    /// Whether any handle holds RESERVED or above (`xCheckReservedLock`).
    pub(crate) fn reserved(&self) -> bool {
        self.writer.is_some()
    }

    /// No handle holds anything: the entry can be dropped.
    pub(crate) fn is_idle(&self) -> bool {
        self.readers == 0 && self.writer.is_none()
    }
}

/// Slots of the WAL index's lock array (`SQLITE_SHM_NLOCK`).
pub(crate) const SHM_SLOTS: usize = 8;

/// The slot locks of one WAL index.
#[derive(Debug, Default)]
pub(crate) struct ShmLock {
    /// Per slot: handles holding it shared.
    shared: [u32; SHM_SLOTS],
    /// Per slot: the handle holding it exclusively.
    exclusive: [Option<Owner>; SHM_SLOTS],
}

/// What one handle holds of a [`ShmLock`], as bit masks over the slots.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct ShmHeld {
    pub(crate) shared: u8,
    pub(crate) exclusive: u8,
}

impl ShmLock {
    /// `xShmLock`: slots `offset..offset + n`. Returns false (SQLITE_BUSY) when another
    /// handle is in the way; nothing changes then.
    pub(crate) fn lock(
        &mut self,
        owner: Owner,
        held: &mut ShmHeld,
        offset: usize,
        n: usize,
        exclusive: bool,
    ) -> bool {
        let slots = offset..offset + n;
        assert!(
            n >= 1 && offset + n <= SHM_SLOTS,
            "shm lock range out of bounds"
        );
        if exclusive {
            for s in slots.clone() {
                let mine = held.exclusive & (1 << s) != 0;
                if !mine && (self.exclusive[s].is_some() || self.shared[s] > 0) {
                    return false;
                }
            }
            for s in slots {
                self.exclusive[s] = Some(owner);
                held.exclusive |= 1 << s;
            }
        } else {
            for s in slots.clone() {
                if matches!(self.exclusive[s], Some(o) if o != owner) {
                    return false;
                }
            }
            for s in slots {
                if held.shared & (1 << s) == 0 {
                    self.shared[s] += 1;
                    held.shared |= 1 << s;
                }
            }
        }
        true
    }

    /// `xShmLock` with `SQLITE_SHM_UNLOCK`: releases what `owner` holds in the range.
    pub(crate) fn unlock(&mut self, owner: Owner, held: &mut ShmHeld, offset: usize, n: usize) {
        assert!(
            n >= 1 && offset + n <= SHM_SLOTS,
            "shm lock range out of bounds"
        );
        for s in offset..offset + n {
            if held.shared & (1 << s) != 0 {
                assert!(self.shared[s] > 0, "shm shared count underflow");
                self.shared[s] -= 1;
                held.shared &= !(1 << s);
            }
            if held.exclusive & (1 << s) != 0 {
                assert_eq!(self.exclusive[s], Some(owner), "shm exclusive owner");
                self.exclusive[s] = None;
                held.exclusive &= !(1 << s);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn readers_and_one_writer() {
        let mut f = FileLock::default();
        let (mut a, mut b) = (LockLevel::None, LockLevel::None);
        assert!(f.lock(1, &mut a, LockLevel::Shared));
        assert!(f.lock(2, &mut b, LockLevel::Shared));
        assert!(f.lock(1, &mut a, LockLevel::Reserved));
        assert!(f.reserved());
        // A second writer waits.
        assert!(!f.lock(2, &mut b, LockLevel::Reserved));
        // Exclusive waits for reader b, leaving a at PENDING: no new reader gets in.
        assert!(!f.lock(1, &mut a, LockLevel::Exclusive));
        assert_eq!(a, LockLevel::Pending);
        let mut c = LockLevel::None;
        assert!(!f.lock(3, &mut c, LockLevel::Shared));
        f.unlock(2, &mut b, LockLevel::None);
        assert!(f.lock(1, &mut a, LockLevel::Exclusive));
        f.unlock(1, &mut a, LockLevel::Shared);
        assert_eq!(a, LockLevel::Shared);
        assert!(!f.reserved());
        assert!(f.lock(3, &mut c, LockLevel::Shared));
        f.unlock(1, &mut a, LockLevel::None);
        f.unlock(3, &mut c, LockLevel::None);
        assert!(f.is_idle());
    }

    /// Random requests from several handles against the invariants of the protocol.
    #[test]
    fn random_requests_keep_invariants() {
        let seed = fastrand::u64(..);
        let mut rng = fastrand::Rng::with_seed(seed);
        let mut f = FileLock::default();
        let mut held = [LockLevel::None; 4];
        for _ in 0..20_000 {
            let who = rng.usize(..held.len());
            let h = &mut held[who];
            match rng.u8(..4) {
                0 => {
                    let want = [LockLevel::Shared, LockLevel::Reserved, LockLevel::Exclusive]
                        [rng.usize(..3)];
                    if want > LockLevel::Shared && *h == LockLevel::None {
                        continue;
                    }
                    f.lock(who as Owner, h, want);
                }
                1 => f.unlock(who as Owner, h, LockLevel::Shared),
                2 => f.unlock(who as Owner, h, LockLevel::None),
                _ => {}
            }
            let readers = held.iter().filter(|l| **l >= LockLevel::Shared).count();
            let writers = held.iter().filter(|l| **l > LockLevel::Shared).count();
            let exclusive = held.iter().filter(|l| **l == LockLevel::Exclusive).count();
            assert_eq!(readers as u32, f.readers, "seed {seed}");
            assert!(writers <= 1, "seed {seed}");
            assert!(exclusive == 0 || readers == 1, "seed {seed}");
            assert_eq!(f.reserved(), writers == 1, "seed {seed}");
        }
    }

    #[test]
    fn shm_slots() {
        let mut l = ShmLock::default();
        let (mut a, mut b) = (ShmHeld::default(), ShmHeld::default());
        assert!(l.lock(1, &mut a, 3, 1, false));
        assert!(l.lock(2, &mut b, 3, 1, false));
        assert!(!l.lock(2, &mut b, 0, 4, true));
        assert!(l.lock(2, &mut b, 0, 1, true));
        assert!(!l.lock(1, &mut a, 0, 1, false));
        l.unlock(1, &mut a, 0, SHM_SLOTS);
        assert_eq!(a, ShmHeld::default());
        assert!(!l.lock(1, &mut a, 0, 1, true));
        l.unlock(2, &mut b, 0, SHM_SLOTS);
        assert!(l.lock(1, &mut a, 0, 8, true));
    }
}
