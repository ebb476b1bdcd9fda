//! The master lease (docs/PROTOCOL.md, "Failover and the recovery window"): a master serves only while a quorum has confirmed
//! it recently, and a new master waits out its predecessor's lease before serving.
//!
//! Why this is enough: a master extends its lease only from the time it *sent* a
//! heartbeat that a quorum then acknowledged. A member that has voted for a newer
//! master refuses the old one's heartbeats, and any two quorums share a member, so every
//! acknowledged heartbeat of the old master was sent before the new master was
//! elected. The old master therefore stops serving at most one lease after the new
//! master's election, as the old master's clock counts it; the new master waits that
//! long stretched by the clock-rate margin, as its own clock counts it.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// The lease arithmetic, in milliseconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MasterLease {
    /// How long a quorum's confirmation lets a master serve.
    pub lease_ms: u64,
    /// The largest difference in clock rate between two members, per mille.
    pub drift_per_mille: u64,
}

impl MasterLease {
    /// Until when a master may serve after a quorum acknowledged a heartbeat it sent
    /// at `sent_ms`.
    pub fn serve_until(&self, sent_ms: u64) -> u64 {
        sent_ms + self.lease_ms
    }

    /// How long a new master waits after its election before serving, when its
    /// predecessor's lease was `previous_lease_ms`: long enough even if the
    /// predecessor's clock ran slow and ours fast by the margin
    /// (`lease × (1000 + d) / (1000 − d)`, rounded up).
    pub fn wait_out(&self, previous_lease_ms: u64) -> u64 {
        let d = self.drift_per_mille.min(500);
        (previous_lease_ms * (1_000 + d)).div_ceil(1_000 - d)
    }

    /// A recovery window long enough for every client lease view an earlier master
    /// could have granted (`lease_ms_max`) to have run out, with the same margin.
    pub fn recovery_window(&self, lease_ms_max: u64) -> u64 {
        self.wait_out(lease_ms_max)
    }
}

/// Shared by the member's lease task and the server: until when this member may serve
/// as master. Reading it is one atomic load, cheap enough for every frame.
#[derive(Debug)]
pub struct LeaseClock {
    base: Instant,
    /// Milliseconds since `base` until which serving is allowed; 0: not allowed.
    until_ms: AtomicU64,
}

impl Default for LeaseClock {
    fn default() -> Self {
        LeaseClock::new()
    }
}

impl LeaseClock {
    pub fn new() -> LeaseClock {
        LeaseClock {
            base: Instant::now(),
            until_ms: AtomicU64::new(0),
        }
    }

    /// Milliseconds since this clock's base (monotonic).
    pub fn now_ms(&self) -> u64 {
        self.at(Instant::now())
    }

    /// `t` in this clock's milliseconds.
    pub fn at(&self, t: Instant) -> u64 {
        t.saturating_duration_since(self.base).as_millis() as u64
    }

    /// Allows serving until `until_ms` (never shortens a lease already granted). A
    /// lease that ran out stays out until [`LeaseClock::revoke`] starts afresh: the
    /// server stops serving (and drops its core) the moment it sees the lease out, so
    /// a late confirmation must not revive it — the member would stay master in Raft
    /// and in its role while its server served nobody, and no other member would
    /// stand (found by the WAN test under load). The member takes over again instead,
    /// in a new epoch.
    pub fn extend_to(&self, until_ms: u64) {
        let now = self.now_ms();
        let _ = self
            .until_ms
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |cur| {
                (cur == 0 || cur > now).then_some(cur.max(until_ms))
            });
    }

    /// Stops serving now.
    pub fn revoke(&self) {
        self.until_ms.store(0, Ordering::SeqCst);
    }

    /// Whether serving is allowed at this moment.
    pub fn valid(&self) -> bool {
        self.now_ms() < self.until_ms.load(Ordering::SeqCst)
    }

    /// Time left (zero when not serving).
    pub fn left(&self) -> Duration {
        let until = self.until_ms.load(Ordering::SeqCst);
        Duration::from_millis(until.saturating_sub(self.now_ms()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_wait_covers_a_slow_old_clock_and_a_fast_new_one() {
        let l = MasterLease {
            lease_ms: 1_000,
            drift_per_mille: 50,
        };
        assert_eq!(l.serve_until(10), 1_010);
        let wait = l.wait_out(1_000);
        // Old clock 5% slow: it serves 1000 / 0.95 real ms. New clock 5% fast: waiting
        // `wait` of its ms is wait / 1.05 real ms. The second must not be shorter.
        assert!(wait as f64 / 1.05 >= 1_000.0 / 0.95, "{wait}");
        assert_eq!(wait, 1_106);
        assert_eq!(l.wait_out(0), 0);
        assert_eq!(l.recovery_window(10_000), 11_053);
    }

    #[test]
    fn a_lease_clock_only_grows_until_revoked() {
        let c = LeaseClock::new();
        assert!(!c.valid());
        c.extend_to(c.now_ms() + 60_000);
        assert!(c.valid());
        c.extend_to(1);
        assert!(c.valid(), "a shorter extension does not shorten the lease");
        c.revoke();
        assert!(!c.valid());
        assert_eq!(c.left(), Duration::ZERO);
    }

    #[test]
    fn a_lease_that_ran_out_stays_out_until_revoked() {
        let c = LeaseClock::new();
        c.extend_to(c.now_ms() + 5);
        std::thread::sleep(Duration::from_millis(20));
        assert!(!c.valid());
        c.extend_to(c.now_ms() + 60_000);
        assert!(
            !c.valid(),
            "a late confirmation must not revive a lapsed lease"
        );
        c.revoke();
        c.extend_to(c.now_ms() + 60_000);
        assert!(c.valid(), "a new take-over starts afresh");
    }
}
