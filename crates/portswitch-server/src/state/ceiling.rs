//! The master's lease ceiling: where it is recorded (Raft, or `group.json`), raised
//! before a longer lease is granted, and lowered once the leases in use are shorter.

use super::*;

/// A master's lease ceiling and the raise in progress, shared with the task that
/// raises it durably (through Raft, or in the data directory).
#[derive(Debug, Default)]
pub(crate) struct Ceiling {
    pub(super) epoch: AtomicU64,
    pub(super) lease_ms: std::sync::atomic::AtomicU32,
    /// The longest lease a HELLO asked for; a raise is under way while above
    /// `lease_ms`.
    pub(super) wanted_ms: std::sync::atomic::AtomicU32,
    /// The epoch whose recovery window closed and is still to be recorded.
    pub(super) settle_epoch: AtomicU64,
    /// A lower is being recorded.
    pub(super) lowering: std::sync::atomic::AtomicBool,
}

/// Where a master records its lease ceiling and the close of its recovery window, so
/// that its successor's window covers what it granted.
#[derive(Clone)]
pub(super) enum Keeper {
    /// A member of a group: through Raft.
    Raft(Arc<portswitch_cluster::ClusterNode>),
    /// A server alone on its data directory: in `group.json`.
    Dir(Arc<crate::group::GroupState>),
}

impl Keeper {
    pub(super) async fn raise(&self, epoch: u64, lease_ms: u32) -> Result<u32, String> {
        match self {
            Keeper::Raft(node) => node
                .raise_ceiling(epoch, lease_ms)
                .await
                .map_err(|e| e.to_string()),
            Keeper::Dir(g) => on_disk(g, move |g| g.raise_ceiling(lease_ms)).await,
        }
    }

    pub(super) async fn lower(
        &self,
        epoch: u64,
        from: u32,
        lease_ms: u32,
    ) -> Result<Option<u32>, String> {
        match self {
            Keeper::Raft(node) => node
                .lower_ceiling(epoch, from, lease_ms)
                .await
                .map_err(|e| e.to_string()),
            Keeper::Dir(g) => on_disk(g, move |g| g.lower_ceiling(from, lease_ms)).await,
        }
    }

    pub(super) async fn settle(&self, epoch: u64) -> Result<(), String> {
        match self {
            Keeper::Raft(node) => node.settle(epoch).await.map_err(|e| e.to_string()),
            Keeper::Dir(g) => on_disk(g, |g| g.settle()).await,
        }
    }
}

/// Runs a write to the data directory on a blocking thread (it syncs).
pub(super) async fn on_disk<T: Send + 'static>(
    g: &Arc<crate::group::GroupState>,
    f: impl FnOnce(&crate::group::GroupState) -> std::io::Result<T> + Send + 'static,
) -> Result<T, String> {
    let g = g.clone();
    tokio::task::spawn_blocking(move || f(&g))
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| e.to_string())
}

/// A master's lease ceiling and where it is recorded.
pub(crate) struct CeilingKeeper {
    pub(super) ceiling: Arc<Ceiling>,
    pub(super) keeper: Keeper,
}

impl CeilingKeeper {
    /// Whether a HELLO asking for `lease_ms` must wait for the ceiling to rise; if so,
    /// makes sure a raise is under way.
    pub(super) fn must_raise(&self, lease_ms: u32) -> bool {
        let c = &self.ceiling;
        if lease_ms <= c.lease_ms.load(Ordering::Acquire) {
            return false;
        }
        let before = c.wanted_ms.fetch_max(lease_ms, Ordering::AcqRel);
        if before <= c.lease_ms.load(Ordering::Acquire) {
            // No raise under way: start one; it raises to the most anyone asked.
            let (keeper, c) = (self.keeper.clone(), self.ceiling.clone());
            tokio::spawn(async move {
                loop {
                    let epoch = c.epoch.load(Ordering::Acquire);
                    let want = c.wanted_ms.load(Ordering::Acquire);
                    match keeper.raise(epoch, want).await {
                        Ok(now) if c.epoch.load(Ordering::Acquire) == epoch => {
                            c.lease_ms.fetch_max(now, Ordering::AcqRel);
                            tracing::info!(epoch, lease_ms = now, "lease ceiling raised");
                            if c.wanted_ms.load(Ordering::Acquire) <= now {
                                return;
                            }
                        }
                        Ok(_) => return,
                        Err(e) => {
                            tracing::warn!(error = %e, "could not raise the lease ceiling");
                            // Let the next HELLO asking for more try again.
                            c.wanted_ms.store(0, Ordering::Release);
                            return;
                        }
                    }
                }
            });
        }
        true
    }
}

/// How much longer than a whole ceiling the leases in use must have stayed below it
/// before the ceiling comes down (the ticker's granularity, and then some).
pub(super) const CEILING_QUIET_SLACK_MS: u64 = 100;

/// When a client asking for a lease above the master's ceiling should come back: a
/// raise is one Raft write (a few ms on one site, a round trip across data centres).
pub(super) const RAISE_RETRY_MS: u64 = 20;

impl Shared {
    /// Lowers the lease ceiling to the leases in use once no session has held a lease
    /// as long as it for a whole ceiling (plus a little): every lease view granted
    /// longer than the new ceiling has run out by then, so a successor's recovery
    /// window may be that much shorter. Not inside a recovery window, whose adopted
    /// sessions are still coming back with their leases.
    pub(super) fn maybe_lower_ceiling(&self, st: &mut State, k: &CeilingKeeper, now: u64) {
        let c = &k.ceiling;
        if st.core.recovery_left_ms().is_some() || c.lowering.load(Ordering::Acquire) {
            st.ceiling_quiet_since_ms = now;
            st.ceiling_quiet_peak_ms = 0;
            return;
        }
        let ceiling = c.lease_ms.load(Ordering::Acquire);
        let longest = st.core.lease_ms_longest().max(self.cfg.core.lease_ms_min);
        if longest >= ceiling || c.wanted_ms.load(Ordering::Acquire) > ceiling {
            st.ceiling_quiet_since_ms = now;
            st.ceiling_quiet_peak_ms = 0;
            return;
        }
        st.ceiling_quiet_peak_ms = st.ceiling_quiet_peak_ms.max(longest);
        if now.saturating_sub(st.ceiling_quiet_since_ms) < ceiling as u64 + CEILING_QUIET_SLACK_MS {
            return;
        }
        let target = st.ceiling_quiet_peak_ms;
        let epoch = c.epoch.load(Ordering::Acquire);
        // From now on a HELLO asking for more than the target raises the ceiling
        // first; the record follows.
        c.lease_ms.store(target, Ordering::Release);
        c.wanted_ms.store(0, Ordering::Release);
        c.lowering.store(true, Ordering::Release);
        st.ceiling_quiet_since_ms = now;
        st.ceiling_quiet_peak_ms = 0;
        let (keeper, c) = (k.keeper.clone(), k.ceiling.clone());
        tokio::spawn(async move {
            match keeper.lower(epoch, ceiling, target).await {
                Ok(Some(now_ms)) => {
                    tracing::info!(
                        epoch,
                        lease_ms = now_ms,
                        "lease ceiling lowered to the leases in use"
                    )
                }
                Ok(None) => tracing::debug!(epoch, "lease ceiling not lowered: raised meanwhile"),
                Err(e) => tracing::warn!(error = %e, "could not lower the lease ceiling"),
            }
            c.lowering.store(false, Ordering::Release);
        });
    }
}
