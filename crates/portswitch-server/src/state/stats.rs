//! What the server counts and reports (STATS, `/metrics`).

use super::*;

#[derive(Default, Clone, Copy)]
pub(super) struct Counters {
    pub(super) connections_total: u64,
    pub(super) connections_rejected_total: u64,
    pub(super) hellos_throttled_total: u64,
    pub(super) slow_consumer_total: u64,
    pub(super) malformed_total: u64,
    pub(super) login_timeouts_total: u64,
    pub(super) stalls_total: u64,
    /// Time spent handling frames under the state lock: the part of the server's
    /// work that one core does at a time (compare with the process's CPU time).
    pub(super) feed_lock_ns: u64,
}

/// What the server reports in STATS and `/metrics`.
#[derive(Debug, Clone, Default)]
pub struct StatsSnapshot {
    pub core: Stats,
    pub connections: u64,
    pub connections_total: u64,
    pub connections_rejected_total: u64,
    pub hellos_throttled_total: u64,
    pub slow_consumer_disconnects_total: u64,
    pub malformed_disconnects_total: u64,
    pub login_timeouts_total: u64,
    /// Server stalls longer than `STALL_MS_THRESHOLD`, and their total length.
    pub stalls_total: u64,
    pub stalled_ms: u64,
    pub feed_lock_ns_total: u64,
    /// STATS `role` (see [`MemberRole`]).
    pub role: MemberRole,
    pub node_id: u64,
    pub master_lease_left_ms: u64,
    /// A group's master: the longest client lease it may grant before raising it.
    pub lease_ceiling_ms: u64,
    /// Left of the recovery window (0 when none is open).
    pub recovery_left_ms: u64,
    pub rss_bytes: u64,
    pub uptime_ms: u64,
}

impl StatsSnapshot {
    /// Name/value pairs, in the order STATS sends them.
    pub fn pairs(&self) -> Vec<(&'static str, u64)> {
        let c = &self.core;
        vec![
            ("epoch", c.epoch),
            ("sessions", c.sessions),
            ("sessions_attached", c.sessions_attached),
            ("ports_owned", c.ports_owned),
            ("port_entries", c.port_entries),
            ("waiters", c.waiters),
            ("watches", c.watches),
            ("prefix_watches", c.prefix_watches),
            ("requests_total", c.requests_total),
            ("registers_total", c.registers_total),
            ("grants_total", c.grants_total),
            ("releases_total", c.releases_total),
            ("messages_relayed_total", c.messages_relayed_total),
            ("sessions_created_total", c.sessions_created_total),
            ("sessions_expired_total", c.sessions_expired_total),
            ("sessions_resumed_total", c.sessions_resumed_total),
            ("errors_total", c.errors_total),
            ("table_heap_bytes", c.table_heap_bytes),
            ("recovering", c.recovering),
            ("sessions_adopted_total", c.sessions_adopted_total),
            ("ports_reclaimed_total", c.ports_reclaimed_total),
            ("watch_filters", c.watch_filters),
            ("filter_errors_total", c.filter_errors_total),
            ("connections", self.connections),
            ("connections_total", self.connections_total),
            (
                "connections_rejected_total",
                self.connections_rejected_total,
            ),
            ("hellos_throttled_total", self.hellos_throttled_total),
            (
                "slow_consumer_disconnects_total",
                self.slow_consumer_disconnects_total,
            ),
            (
                "malformed_disconnects_total",
                self.malformed_disconnects_total,
            ),
            ("login_timeouts_total", self.login_timeouts_total),
            ("stalls_total", self.stalls_total),
            ("stalled_ms", self.stalled_ms),
            ("feed_lock_ns_total", self.feed_lock_ns_total),
            (MemberRole::STAT, self.role.to_u64()),
            ("node_id", self.node_id),
            ("master_lease_left_ms", self.master_lease_left_ms),
            ("lease_ceiling_ms", self.lease_ceiling_ms),
            ("recovery_left_ms", self.recovery_left_ms),
            ("rss_bytes", self.rss_bytes),
            ("uptime_ms", self.uptime_ms),
        ]
    }
}

/// Resident memory of this process, from /proc (0 where there is no /proc).
pub fn rss_bytes() -> u64 {
    let Ok(statm) = std::fs::read_to_string("/proc/self/statm") else {
        return 0;
    };
    let pages: u64 = statm
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    pages * 4096
}

pub(super) fn stats_snapshot(
    core: &Core,
    conns: usize,
    c: Counters,
    stalled_ms: u64,
    start: Instant,
) -> StatsSnapshot {
    StatsSnapshot {
        core: core.stats(),
        connections: conns as u64,
        connections_total: c.connections_total,
        connections_rejected_total: c.connections_rejected_total,
        hellos_throttled_total: c.hellos_throttled_total,
        slow_consumer_disconnects_total: c.slow_consumer_total,
        malformed_disconnects_total: c.malformed_total,
        login_timeouts_total: c.login_timeouts_total,
        stalls_total: c.stalls_total,
        stalled_ms,
        feed_lock_ns_total: c.feed_lock_ns,
        role: MemberRole::Standalone,
        node_id: 0,
        master_lease_left_ms: 0,
        lease_ceiling_ms: 0,
        recovery_left_ms: core.recovery_left_ms().unwrap_or(0),
        rss_bytes: rss_bytes(),
        uptime_ms: start.elapsed().as_millis() as u64,
    }
}

impl Shared {
    pub(crate) fn snapshot(&self) -> StatsSnapshot {
        let st = self.lock();
        let mut snap = stats_snapshot(
            &st.core,
            st.conns.len(),
            st.counters,
            st.stalled_ms,
            self.start,
        );
        self.member_stats(&mut snap, st.role);
        snap
    }

    pub(super) fn member_stats(&self, snap: &mut StatsSnapshot, role: MemberRole) {
        snap.role = role;
        if let Some(m) = &self.member {
            snap.node_id = m.node.id();
            snap.master_lease_left_ms = m.lease.left().as_millis() as u64;
        }
        if let Some(k) = &self.ceiling {
            if role.serves() {
                snap.lease_ceiling_ms = k.ceiling.lease_ms.load(Ordering::Acquire) as u64;
            }
        }
    }
}
