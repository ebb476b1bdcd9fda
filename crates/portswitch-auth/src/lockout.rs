//! Throttling of failed logins: a back-off per user name and a refusal per source
//! address, both growing with failures, both bounded, and both ending on their own.
//! It slows guessing down without letting guessers lock anyone out for long.
//!
//! - **User names.** After `user_failures_max` failures of one name in a row, every
//!   further failure refuses that name for a back-off that doubles from
//!   `user_backoff_ms_min` up to `user_backoff_ms_max` (1 s, 2 s, 4 s … 60 s by
//!   default) — never longer, so guesses from anywhere delay a user by a minute at
//!   most, where a lock of 15 minutes after five guesses let anyone keep anyone out.
//!   An attempt refused during a back-off checks no password and does not count.
//! - **Trusted addresses.** Where a user logged in successfully within `trusted_ms`,
//!   their name has a back-off of its own: failures from elsewhere do not delay them
//!   there, and failures there do not count elsewhere. Guessing a user's name from
//!   the rest of the network thus cannot keep them out of where they usually log in
//!   from, while guesses from that address are still throttled.
//! - **Source addresses.** After `addr_failures_max` failures from one address (for
//!   whatever names), every further failure refuses the address for `lock_ms`,
//!   doubling up to `lock_ms_max`. IPv6 addresses count by /64, the block one host
//!   usually holds, and an IPv4-mapped address as its IPv4 address.
//! - A success resets the name and the address. An administrator can clear a name
//!   ([`Lockout::unlock_user`]) or an address ([`Lockout::unlock_addr`]) at once.
//! - A name or address with no failure and no refusal for `forget_ms` is forgotten.
//!
//! Pure bookkeeping with time passed in. Unknown user names are tracked exactly like
//! known ones, so the answers do not reveal which users exist. Memory is bounded: at
//! most `tracked_max` names, as many addresses and as many trusted pairs; a full table
//! drops what is forgotten first, then its oldest eighth (so a full table costs one
//! scan per eighth of it, not one per failure).

use std::collections::HashMap;
use std::hash::Hash;
use std::net::{IpAddr, Ipv6Addr};

/// Most entries [`Lockout::refused`] lists.
pub const REFUSED_LIST_MAX: usize = 1_000;

/// Settings of a [`Lockout`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LockoutConfig {
    /// Failures of a user name in a row before its back-off begins (0 disables the
    /// back-off).
    pub user_failures_max: u32,
    /// The first back-off of a user name; each further failure doubles it.
    pub user_backoff_ms_min: u64,
    /// The longest back-off of a user name.
    pub user_backoff_ms_max: u64,
    /// Failures from one source address before it is refused (0 disables).
    pub addr_failures_max: u32,
    /// How long an address is refused when it reaches `addr_failures_max`; each
    /// further failure doubles it.
    pub lock_ms: u64,
    /// The longest refusal of an address.
    pub lock_ms_max: u64,
    /// A name or address with neither a failure nor a refusal for this long starts
    /// counting afresh.
    pub forget_ms: u64,
    /// How long a successful login from an address gives the user a back-off of
    /// their own there (0 disables).
    pub trusted_ms: u64,
    /// Most names (and, separately, addresses and trusted pairs) tracked at once.
    pub tracked_max: usize,
}

impl Default for LockoutConfig {
    fn default() -> Self {
        LockoutConfig {
            user_failures_max: 5,
            user_backoff_ms_min: 1_000,
            user_backoff_ms_max: 60_000,
            addr_failures_max: 20,
            lock_ms: 10_000,
            lock_ms_max: 15 * 60_000,
            forget_ms: 60 * 60_000,
            trusted_ms: 7 * 24 * 60 * 60_000,
            tracked_max: 100_000,
        }
    }
}

/// The failures of one name or address.
#[derive(Debug, Clone, Copy, Default)]
struct Count {
    failures: u32,
    refused_until_ms: u64,
    last_ms: u64,
}

impl Count {
    fn forgotten(&self, now_ms: u64, forget_ms: u64) -> bool {
        now_ms
            >= self
                .refused_until_ms
                .max(self.last_ms)
                .saturating_add(forget_ms)
    }
}

/// How refusals grow for one kind of key.
#[derive(Debug, Clone, Copy)]
struct Growth {
    failures_max: u32,
    ms_min: u64,
    ms_max: u64,
}

impl Growth {
    /// The refusal after the `failures`th failure in a row, if any: `ms_min` at
    /// `failures_max`, doubling with each failure after, at most `ms_max`.
    fn refusal_ms(&self, failures: u32) -> Option<u64> {
        if self.failures_max == 0 || failures < self.failures_max {
            return None;
        }
        let doublings = failures - self.failures_max;
        let factor = 1u64.checked_shl(doublings).unwrap_or(u64::MAX);
        Some(self.ms_min.saturating_mul(factor).min(self.ms_max))
    }
}

/// Makes room for one more entry in a table of at most `max`: drops what `gone`
/// says is gone, and if that is not enough, the oldest eighth by `age`.
fn make_room<K: Hash + Eq, V>(
    map: &mut HashMap<K, V>,
    max: usize,
    gone: impl Fn(&V) -> bool,
    age: impl Fn(&V) -> u64,
) {
    if map.len() < max.max(1) {
        return;
    }
    map.retain(|_, v| !gone(v));
    if map.len() < max.max(1) {
        return;
    }
    let mut ages: Vec<u64> = map.values().map(&age).collect();
    let n = (ages.len() / 8).max(1);
    let cut = *ages.select_nth_unstable(n - 1).1;
    // Everything older than `cut`, and as many of those exactly as old as needed.
    let mut ties = n - ages.iter().filter(|&&a| a < cut).count();
    map.retain(|_, v| {
        let a = age(v);
        if a < cut {
            return false;
        }
        if a == cut && ties > 0 {
            ties -= 1;
            return false;
        }
        true
    });
}

#[derive(Debug)]
struct Tracker<K> {
    map: HashMap<K, Count>,
}

impl<K: Hash + Eq + Clone> Tracker<K> {
    fn new() -> Tracker<K> {
        Tracker {
            map: HashMap::new(),
        }
    }

    fn refused(&self, k: &K, now_ms: u64) -> Option<u64> {
        self.map
            .get(k)
            .filter(|c| c.refused_until_ms > now_ms)
            .map(|c| c.refused_until_ms)
    }

    /// Counts a failure; returns the refusal (ms) it started, if any.
    fn fail(
        &mut self,
        k: &K,
        now_ms: u64,
        growth: Growth,
        forget_ms: u64,
        tracked_max: usize,
    ) -> Option<u64> {
        if growth.failures_max == 0 {
            return None;
        }
        if !self.map.contains_key(k) {
            make_room(
                &mut self.map,
                tracked_max,
                |c| c.forgotten(now_ms, forget_ms),
                |c| c.last_ms,
            );
        }
        let c = self.map.entry(k.clone()).or_default();
        if c.forgotten(now_ms, forget_ms) {
            *c = Count::default();
        }
        c.failures = c.failures.saturating_add(1);
        c.last_ms = now_ms;
        let ms = growth.refusal_ms(c.failures)?;
        c.refused_until_ms = c.refused_until_ms.max(now_ms.saturating_add(ms));
        Some(ms)
    }
}

/// Why an attempt is refused, and until when.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// The user name is in its back-off.
    User { until_ms: u64 },
    /// The source address is refused.
    Addr { until_ms: u64 },
}

impl Refused {
    pub fn until_ms(&self) -> u64 {
        match *self {
            Refused::User { until_ms } | Refused::Addr { until_ms } => until_ms,
        }
    }
}

/// What a recorded failure started: how long the name, or the address, is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct FailureOutcome {
    pub user_refused_ms: Option<u64>,
    pub addr_refused_ms: Option<u64>,
}

/// What is refused now, for an administrator deciding what to unlock.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Tracked {
    /// A user name; `at` is the trusted address whose back-off this is, if any.
    User {
        name: String,
        at: Option<IpAddr>,
        failures: u32,
        refused_ms: u64,
    },
    /// A source address (an IPv6 address stands for its /64).
    Addr {
        addr: IpAddr,
        failures: u32,
        refused_ms: u64,
    },
}

/// The key an address counts under: IPv6 by /64, IPv4-mapped as IPv4.
pub fn addr_key(addr: IpAddr) -> IpAddr {
    match addr {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let s = v6.segments();
                IpAddr::V6(Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0))
            }
        },
        v4 => v4,
    }
}

/// See the module docs.
#[derive(Debug)]
pub struct Lockout {
    cfg: LockoutConfig,
    /// By name, and by (name, trusted address).
    users: Tracker<(String, Option<IpAddr>)>,
    addrs: Tracker<IpAddr>,
    /// (name, address) of recent successful logins, and until when they count.
    trusted: HashMap<(String, IpAddr), u64>,
}

impl Lockout {
    pub fn new(cfg: LockoutConfig) -> Lockout {
        Lockout {
            cfg,
            users: Tracker::new(),
            addrs: Tracker::new(),
            trusted: HashMap::new(),
        }
    }

    pub fn config(&self) -> &LockoutConfig {
        &self.cfg
    }

    fn user_growth(&self) -> Growth {
        Growth {
            failures_max: self.cfg.user_failures_max,
            ms_min: self.cfg.user_backoff_ms_min,
            ms_max: self.cfg.user_backoff_ms_max,
        }
    }

    fn addr_growth(&self) -> Growth {
        Growth {
            failures_max: self.cfg.addr_failures_max,
            ms_min: self.cfg.lock_ms,
            ms_max: self.cfg.lock_ms_max,
        }
    }

    /// Which back-off `user` from `addr` is counted in: the one of the address if
    /// the user logged in from it lately, else the name's own.
    fn user_key(&self, user: &str, addr: IpAddr, now_ms: u64) -> (String, Option<IpAddr>) {
        let a = addr_key(addr);
        let key = (user.to_string(), a);
        let trusted = self.trusted.get(&key).is_some_and(|&until| until > now_ms);
        (key.0, trusted.then_some(a))
    }

    /// Whether a login for `user` from `addr` may be attempted now.
    pub fn check(&self, user: &str, addr: IpAddr, now_ms: u64) -> Result<(), Refused> {
        if let Some(until_ms) = self.addrs.refused(&addr_key(addr), now_ms) {
            return Err(Refused::Addr { until_ms });
        }
        if let Some(until_ms) = self
            .users
            .refused(&self.user_key(user, addr, now_ms), now_ms)
        {
            return Err(Refused::User { until_ms });
        }
        Ok(())
    }

    /// Records a failed login (one that was not refused by [`Lockout::check`]).
    pub fn failure(&mut self, user: &str, addr: IpAddr, now_ms: u64) -> FailureOutcome {
        let (forget_ms, tracked_max) = (self.cfg.forget_ms, self.cfg.tracked_max);
        let key = self.user_key(user, addr, now_ms);
        let (user_growth, addr_growth) = (self.user_growth(), self.addr_growth());
        FailureOutcome {
            user_refused_ms: self
                .users
                .fail(&key, now_ms, user_growth, forget_ms, tracked_max),
            addr_refused_ms: self.addrs.fail(
                &addr_key(addr),
                now_ms,
                addr_growth,
                forget_ms,
                tracked_max,
            ),
        }
    }

    /// Records a successful login: the name and the address start again, and the
    /// address becomes one the user has a back-off of their own at.
    pub fn success(&mut self, user: &str, addr: IpAddr, now_ms: u64) {
        let a = addr_key(addr);
        let mut key = (user.to_string(), None);
        self.users.map.remove(&key);
        key.1 = Some(a);
        self.users.map.remove(&key);
        self.addrs.map.remove(&a);
        if self.cfg.trusted_ms == 0 {
            return;
        }
        let pair = (user.to_string(), a);
        if !self.trusted.contains_key(&pair) {
            make_room(
                &mut self.trusted,
                self.cfg.tracked_max,
                |&until| until <= now_ms,
                |&until| until,
            );
        }
        self.trusted
            .insert(pair, now_ms.saturating_add(self.cfg.trusted_ms));
    }

    /// An administrator ends every back-off of `user`. Returns whether it had any
    /// failures counted.
    pub fn unlock_user(&mut self, user: &str) -> bool {
        let before = self.users.map.len();
        self.users.map.retain(|(name, _), _| name != user);
        self.users.map.len() != before
    }

    /// An administrator ends the refusal of `addr` (of its /64, for IPv6). Returns
    /// whether it had any failures counted.
    pub fn unlock_addr(&mut self, addr: IpAddr) -> bool {
        self.addrs.map.remove(&addr_key(addr)).is_some()
    }

    /// What is refused at `now_ms`, longest refusal first, at most
    /// [`REFUSED_LIST_MAX`] entries.
    pub fn refused(&self, now_ms: u64) -> Vec<Tracked> {
        let users = self
            .users
            .map
            .iter()
            .filter(|(_, c)| c.refused_until_ms > now_ms)
            .map(|((name, at), c)| Tracked::User {
                name: name.clone(),
                at: *at,
                failures: c.failures,
                refused_ms: c.refused_until_ms - now_ms,
            });
        let addrs = self
            .addrs
            .map
            .iter()
            .filter(|(_, c)| c.refused_until_ms > now_ms)
            .map(|(addr, c)| Tracked::Addr {
                addr: *addr,
                failures: c.failures,
                refused_ms: c.refused_until_ms - now_ms,
            });
        let mut all: Vec<Tracked> = users.chain(addrs).collect();
        let refused_ms = |t: &Tracked| match t {
            Tracked::User { refused_ms, .. } | Tracked::Addr { refused_ms, .. } => *refused_ms,
        };
        all.sort_by_key(|t| std::cmp::Reverse(refused_ms(t)));
        all.truncate(REFUSED_LIST_MAX);
        all
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(last: u8) -> IpAddr {
        IpAddr::from([10, 0, 0, last])
    }

    fn users_only() -> LockoutConfig {
        LockoutConfig {
            user_failures_max: 3,
            user_backoff_ms_min: 1_000,
            user_backoff_ms_max: 8_000,
            addr_failures_max: 0,
            forget_ms: 100_000,
            tracked_max: 10,
            ..LockoutConfig::default()
        }
    }

    #[test]
    fn a_user_backs_off_1_2_4_seconds_up_to_the_cap_and_never_longer() {
        let mut l = Lockout::new(users_only());
        let mut now = 0;
        for _ in 0..2 {
            assert_eq!(l.failure("alice", ip(1), now), FailureOutcome::default());
            assert_eq!(l.check("alice", ip(1), now), Ok(()));
        }
        // Each failure after the third doubles the back-off, from any address.
        for (n, want) in [1_000, 2_000, 4_000, 8_000, 8_000, 8_000]
            .into_iter()
            .enumerate()
        {
            let from = ip(n as u8 + 10);
            assert_eq!(l.failure("alice", from, now).user_refused_ms, Some(want));
            assert_eq!(
                l.check("alice", ip(99), now),
                Err(Refused::User {
                    until_ms: now + want
                })
            );
            // Another name is not affected.
            assert_eq!(l.check("bob", ip(99), now), Ok(()));
            // Refused attempts are not failures: asking again and again changes nothing.
            assert_eq!(
                l.check("alice", ip(99), now + want - 1)
                    .unwrap_err()
                    .until_ms(),
                now + want
            );
            now += want;
            assert_eq!(l.check("alice", ip(99), now), Ok(()), "ends on its own");
        }
        // A success resets the count: three more failures before the next back-off.
        l.success("alice", ip(1), now);
        for _ in 0..2 {
            assert_eq!(l.failure("alice", ip(1), now), FailureOutcome::default());
        }
        assert_eq!(l.failure("alice", ip(1), now).user_refused_ms, Some(1_000));
    }

    #[test]
    fn guesses_from_elsewhere_do_not_keep_a_user_from_where_they_log_in() {
        let mut l = Lockout::new(users_only());
        let (home, attacker, cafe) = (ip(1), ip(66), ip(7));
        l.success("root", home, 0);
        for t in 0..50 {
            l.failure("root", attacker, t);
        }
        assert!(matches!(
            l.check("root", attacker, 60),
            Err(Refused::User { .. })
        ));
        assert!(matches!(
            l.check("root", cafe, 60),
            Err(Refused::User { .. })
        ));
        assert_eq!(
            l.check("root", home, 60),
            Ok(()),
            "home has its own back-off"
        );
        // Guesses from home are throttled all the same, in their own count.
        for _ in 0..2 {
            assert_eq!(l.failure("root", home, 60), FailureOutcome::default());
        }
        assert_eq!(l.failure("root", home, 60).user_refused_ms, Some(1_000));
        assert!(matches!(
            l.check("root", home, 61),
            Err(Refused::User { .. })
        ));
        // The trust runs out.
        let mut short = Lockout::new(LockoutConfig {
            trusted_ms: 1_000,
            ..users_only()
        });
        short.success("root", home, 0);
        for t in 0..3 {
            short.failure("root", attacker, 1_000 + t);
        }
        assert!(short.check("root", home, 1_003).is_err());
    }

    #[test]
    fn an_address_is_refused_after_its_failures_growing_to_its_cap() {
        let mut l = Lockout::new(LockoutConfig {
            user_failures_max: 0,
            addr_failures_max: 4,
            lock_ms: 500,
            lock_ms_max: 1_500,
            tracked_max: 10,
            ..LockoutConfig::default()
        });
        for i in 0..3 {
            assert_eq!(
                l.failure(&format!("user{i}"), ip(1), i),
                FailureOutcome::default()
            );
        }
        assert_eq!(l.failure("user3", ip(1), 3).addr_refused_ms, Some(500));
        assert_eq!(
            l.check("anyone", ip(1), 10),
            Err(Refused::Addr { until_ms: 503 })
        );
        assert_eq!(l.check("anyone", ip(2), 10), Ok(()));
        assert_eq!(l.check("anyone", ip(1), 503), Ok(()));
        assert_eq!(l.failure("x", ip(1), 503).addr_refused_ms, Some(1_000));
        assert_eq!(l.failure("x", ip(1), 1_503).addr_refused_ms, Some(1_500));
        assert_eq!(l.failure("x", ip(1), 3_003).addr_refused_ms, Some(1_500));
        // A success from the address starts it again.
        l.success("x", ip(1), 4_503);
        assert_eq!(l.failure("x", ip(1), 4_503), FailureOutcome::default());
    }

    #[test]
    fn ipv6_counts_by_64_and_mapped_ipv4_as_ipv4() {
        let mut l = Lockout::new(LockoutConfig {
            user_failures_max: 0,
            addr_failures_max: 2,
            lock_ms: 500,
            ..LockoutConfig::default()
        });
        let a: IpAddr = "2001:db8:1:2::1".parse().unwrap();
        let b: IpAddr = "2001:db8:1:2:ffff::9".parse().unwrap();
        let other: IpAddr = "2001:db8:1:3::1".parse().unwrap();
        l.failure("u", a, 0);
        l.failure("u", b, 0);
        assert!(matches!(l.check("u", a, 1), Err(Refused::Addr { .. })));
        assert_eq!(l.check("u", other, 1), Ok(()));
        let mapped: IpAddr = "::ffff:10.0.0.5".parse().unwrap();
        l.failure("u", mapped, 0);
        l.failure("u", ip(5), 0);
        assert!(matches!(l.check("u", ip(5), 1), Err(Refused::Addr { .. })));
        assert!(l.unlock_addr("2001:db8:1:2::77".parse().unwrap()));
        assert_eq!(l.check("u", a, 1), Ok(()));
    }

    #[test]
    fn an_administrator_unlocks_a_user_or_an_address() {
        let mut l = Lockout::new(LockoutConfig {
            user_failures_max: 1,
            addr_failures_max: 1,
            tracked_max: 10,
            ..LockoutConfig::default()
        });
        l.success("root", ip(1), 0);
        l.failure("root", ip(1), 0);
        l.failure("root", ip(2), 0);
        assert_eq!(l.refused(1).len(), 4, "{:?}", l.refused(1));
        assert!(l.unlock_user("root"));
        assert!(!l.unlock_user("root"), "nothing left");
        assert!(matches!(
            l.check("root", ip(2), 1),
            Err(Refused::Addr { .. })
        ));
        assert!(l.unlock_addr(ip(2)));
        assert_eq!(l.check("root", ip(2), 1), Ok(()));
        assert!(matches!(
            l.refused(1).as_slice(),
            [Tracked::Addr { failures: 1, .. }]
        ));
        assert!(l.unlock_addr(ip(1)));
        assert_eq!(l.refused(1), vec![]);
    }

    #[test]
    fn a_quiet_name_is_forgotten_but_not_while_refused() {
        let mut l = Lockout::new(LockoutConfig {
            forget_ms: 1_000,
            user_backoff_ms_max: 5_000,
            user_backoff_ms_min: 5_000,
            ..users_only()
        });
        l.failure("a", ip(1), 0);
        l.failure("a", ip(1), 0);
        // A quiet second: the two failures are forgotten.
        l.failure("a", ip(1), 1_000);
        assert_eq!(l.failure("a", ip(1), 1_000).user_refused_ms, None);
        assert_eq!(l.failure("a", ip(1), 1_000).user_refused_ms, Some(5_000));
        // Refused until 6,000: quiet since then counts, not since the failure.
        assert_eq!(l.check("a", ip(1), 6_500), Ok(()));
        assert_eq!(l.failure("a", ip(1), 6_500).user_refused_ms, Some(5_000));
    }

    #[test]
    fn memory_stays_bounded_and_a_spray_evicts_the_oldest_first() {
        let mut l = Lockout::new(LockoutConfig {
            user_failures_max: 2,
            addr_failures_max: 2,
            tracked_max: 16,
            ..LockoutConfig::default()
        });
        for i in 0..1_000u32 {
            let addr = IpAddr::from(i.to_be_bytes());
            l.failure(&format!("spray{i}"), addr, 10 + i as u64);
            l.success(&format!("ok{i}"), addr, 10 + i as u64);
        }
        // The victim failed last: the spray cannot evict its back-off.
        l.failure("root", ip(1), 2_000);
        l.failure("root", ip(1), 2_000);
        for i in 0..8u32 {
            l.failure(&format!("late{i}"), ip(9), 2_001);
        }
        assert!(matches!(
            l.check("root", ip(2), 2_002),
            Err(Refused::User { .. })
        ));
        assert!(l.users.map.len() <= 16 && l.addrs.map.len() <= 16);
        assert!(l.trusted.len() <= 16);
    }

    #[test]
    fn make_room_drops_exactly_an_eighth_even_when_ages_tie() {
        let mut m: HashMap<u32, u64> = (0..64).map(|k| (k, 7)).collect();
        make_room(&mut m, 64, |_| false, |&a| a);
        assert_eq!(m.len(), 56);
        let mut m: HashMap<u32, u64> = (0..64).map(|k| (k, k as u64)).collect();
        make_room(&mut m, 64, |_| false, |&a| a);
        assert!(m.keys().all(|&k| k >= 8) && m.len() == 56);
    }
}
