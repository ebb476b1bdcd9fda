//! Lockout after repeated failed logins, per user name and per source address.
//!
//! Pure bookkeeping with time passed in. Unknown user names are tracked exactly like
//! known ones, so lockout answers do not reveal which users exist. Memory is bounded:
//! at most `tracked_max` names and as many addresses; past that, entries whose lock
//! has ended are dropped first, then the oldest.

use std::collections::HashMap;
use std::hash::Hash;
use std::net::IpAddr;

/// Settings of a [`Lockout`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LockoutConfig {
    /// Consecutive failures that lock a user name (0 disables).
    pub user_failures_max: u32,
    /// Consecutive failures that lock a source address (0 disables).
    pub addr_failures_max: u32,
    /// How long a lock lasts.
    pub lock_ms: u64,
    /// Most names (and, separately, addresses) tracked at once.
    pub tracked_max: usize,
}

impl Default for LockoutConfig {
    fn default() -> Self {
        LockoutConfig {
            user_failures_max: 5,
            addr_failures_max: 20,
            lock_ms: 15 * 60_000,
            tracked_max: 100_000,
        }
    }
}

#[derive(Debug, Clone, Copy, Default)]
struct Count {
    failures: u32,
    locked_until: u64,
    last_ms: u64,
}

#[derive(Debug)]
struct Tracker<K> {
    map: HashMap<K, Count>,
}

impl<K: Hash + Eq + Clone> Tracker<K> {
    fn locked(&self, k: &K, now: u64) -> Option<u64> {
        self.map
            .get(k)
            .filter(|c| c.locked_until > now)
            .map(|c| c.locked_until)
    }

    /// Returns whether this failure locked `k`.
    fn fail(&mut self, k: &K, now: u64, max: u32, lock_ms: u64, tracked_max: usize) -> bool {
        if max == 0 {
            return false;
        }
        if !self.map.contains_key(k) && self.map.len() >= tracked_max {
            self.map.retain(|_, c| c.locked_until > now);
            if self.map.len() >= tracked_max {
                if let Some(oldest) = self
                    .map
                    .iter()
                    .min_by_key(|(_, c)| c.last_ms)
                    .map(|(k, _)| k.clone())
                {
                    self.map.remove(&oldest);
                }
            }
        }
        let c = self.map.entry(k.clone()).or_default();
        if c.locked_until != 0 && c.locked_until <= now {
            *c = Count::default(); // the lock ran out: start counting again
        }
        c.failures += 1;
        c.last_ms = now;
        if c.failures >= max && c.locked_until <= now {
            c.locked_until = now + lock_ms;
            return true;
        }
        false
    }
}

/// Why an attempt is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Locked {
    User { until_ms: u64 },
    Addr { until_ms: u64 },
}

/// What a recorded failure led to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct FailureOutcome {
    pub user_locked: bool,
    pub addr_locked: bool,
}

/// See the module docs.
#[derive(Debug)]
pub struct Lockout {
    cfg: LockoutConfig,
    users: Tracker<String>,
    addrs: Tracker<IpAddr>,
}

impl Lockout {
    pub fn new(cfg: LockoutConfig) -> Lockout {
        Lockout {
            cfg,
            users: Tracker {
                map: HashMap::new(),
            },
            addrs: Tracker {
                map: HashMap::new(),
            },
        }
    }

    /// Whether a login for `user` from `addr` may be attempted now.
    pub fn check(&self, user: &str, addr: IpAddr, now_ms: u64) -> Result<(), Locked> {
        if let Some(until_ms) = self.addrs.locked(&addr, now_ms) {
            return Err(Locked::Addr { until_ms });
        }
        if let Some(until_ms) = self.users.locked(&user.to_string(), now_ms) {
            return Err(Locked::User { until_ms });
        }
        Ok(())
    }

    /// Records a failed login.
    pub fn failure(&mut self, user: &str, addr: IpAddr, now_ms: u64) -> FailureOutcome {
        let c = &self.cfg;
        FailureOutcome {
            user_locked: self.users.fail(
                &user.to_string(),
                now_ms,
                c.user_failures_max,
                c.lock_ms,
                c.tracked_max,
            ),
            addr_locked: self.addrs.fail(
                &addr,
                now_ms,
                c.addr_failures_max,
                c.lock_ms,
                c.tracked_max,
            ),
        }
    }

    /// Records a successful login: both counts start again.
    pub fn success(&mut self, user: &str, addr: IpAddr) {
        self.users.map.remove(user);
        self.addrs.map.remove(&addr);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(last: u8) -> IpAddr {
        IpAddr::from([10, 0, 0, last])
    }

    #[test]
    fn user_lock_after_n_failures_then_expiry() {
        let mut l = Lockout::new(LockoutConfig {
            user_failures_max: 3,
            addr_failures_max: 0,
            lock_ms: 1_000,
            tracked_max: 10,
        });
        for t in 0..2 {
            assert_eq!(
                l.failure("alice", ip(t), t as u64),
                FailureOutcome::default()
            );
        }
        assert!(l.failure("alice", ip(9), 2).user_locked);
        // Locked whatever the address; another user is not.
        assert_eq!(
            l.check("alice", ip(50), 3),
            Err(Locked::User { until_ms: 1_002 })
        );
        assert_eq!(l.check("bob", ip(50), 3), Ok(()));
        // The lock runs out, and counting starts afresh.
        assert_eq!(l.check("alice", ip(50), 1_002), Ok(()));
        assert!(!l.failure("alice", ip(1), 1_003).user_locked);
    }

    #[test]
    fn addr_lock_covers_every_user_name() {
        let mut l = Lockout::new(LockoutConfig {
            user_failures_max: 0,
            addr_failures_max: 4,
            lock_ms: 500,
            tracked_max: 10,
        });
        for i in 0..4 {
            l.failure(&format!("user{i}"), ip(1), i);
        }
        assert_eq!(
            l.check("anyone", ip(1), 10),
            Err(Locked::Addr { until_ms: 503 })
        );
        assert_eq!(l.check("anyone", ip(2), 10), Ok(()));
    }

    #[test]
    fn success_resets_and_memory_stays_bounded() {
        let mut l = Lockout::new(LockoutConfig {
            user_failures_max: 2,
            addr_failures_max: 2,
            lock_ms: 500,
            tracked_max: 3,
        });
        l.failure("a", ip(1), 0);
        l.success("a", ip(1));
        assert!(
            !l.failure("a", ip(1), 1).user_locked,
            "count restarted after success"
        );
        for i in 0..100u8 {
            l.failure(&format!("spray{i}"), ip(i), 10 + i as u64);
        }
        assert!(l.users.map.len() <= 3 && l.addrs.map.len() <= 3);
    }
}
