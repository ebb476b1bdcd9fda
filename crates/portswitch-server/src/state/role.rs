//! Master or not: following the group's role, serving, taking over, deposing.

use super::*;

/// A member of a Raft group: it serves only while master with a valid lease.
pub(crate) struct Member {
    pub(super) node: Arc<portswitch_cluster::ClusterNode>,
    pub(super) lease: Arc<portswitch_cluster::LeaseClock>,
    /// Holds the data directory's lock while the server runs.
    pub(super) _lock: std::fs::File,
}

impl Member {
    pub(crate) fn new(node: Arc<portswitch_cluster::ClusterNode>, lock: std::fs::File) -> Member {
        Member {
            lease: node.lease(),
            node,
            _lock: lock,
        }
    }
}

/// What a member that is not master says when it knows of none.
pub(super) const NO_MASTER_YET: &[u8] = b"no master yet: the group is electing one; retry shortly";

impl Shared {
    /// The member's role as it changes (`None` for a standalone server).
    pub(crate) fn role_watch(
        &self,
    ) -> Option<tokio::sync::watch::Receiver<portswitch_cluster::Role>> {
        self.member.as_ref().map(|m| m.node.role())
    }

    /// The group as this member sees it (`None` for a standalone server).
    pub(crate) fn cluster_status(&self) -> Option<portswitch_cluster::node::ClusterStatus> {
        self.member.as_ref().map(|m| m.node.status())
    }

    /// Stops this member's Raft (at shutdown).
    pub(crate) async fn leave_group(&self) {
        if let Some(m) = &self.member {
            m.node.shutdown().await;
        }
    }

    /// Acts on a change of the member's role: a new master starts a fresh core in its
    /// epoch with the group's keys (and a recovery window if an earlier master
    /// served); anything else stops serving.
    pub(crate) fn set_role(&self, role: &portswitch_cluster::Role) {
        use portswitch_cluster::Role;
        let mut st = self.lock();
        let st = &mut *st;
        let now = self.now_ms(st);
        match role {
            Role::Master(m) => {
                if st.serving == Serving::Yes {
                    return;
                }
                let mut seed = random_seed();
                seed[1] = m.secret_keys[0];
                seed[2] = m.secret_keys[1];
                st.core = Core::new(self.cfg.core.clone(), m.epoch, seed);
                if let Some(w) = m.recovery_window_ms {
                    st.core.start_recovery(now, w);
                }
                if let Some(k) = &self.ceiling {
                    let c = &k.ceiling;
                    c.epoch.store(m.epoch, Ordering::Release);
                    c.lease_ms.store(m.lease_ceiling_ms, Ordering::Release);
                    c.wanted_ms.store(0, Ordering::Release);
                    let settle = if m.recovery_window_ms.is_some() {
                        m.epoch
                    } else {
                        0
                    };
                    c.settle_epoch.store(settle, Ordering::Release);
                    c.lowering.store(false, Ordering::Release);
                }
                st.ceiling_quiet_since_ms = now;
                st.ceiling_quiet_peak_ms = 0;
                // Log in the group's users; a group without any yet gets this
                // member's own (its auth.json) as the first version.
                if let Some(member) = &self.member {
                    let facts = member.node.facts();
                    st.auth
                        .follow_group(facts.users.as_deref(), facts.users_version);
                    if facts.users.is_none() && st.auth.enabled() {
                        let store = st.auth.store_json();
                        let node = member.node.clone();
                        let me = self.me.get().cloned();
                        tokio::spawn(async move {
                            match node.write_users(0, store).await {
                                Ok(version) => {
                                    if let Some(shared) = me.and_then(|w| w.upgrade()) {
                                        shared.lock().auth.follow_group(None, version);
                                    }
                                }
                                Err(e) => tracing::warn!("cannot give the group its users: {e}"),
                            }
                        });
                    }
                }
                self.epoch.store(m.epoch, Ordering::Relaxed);
                st.serving = Serving::Yes;
                st.role = MemberRole::Master;
                tracing::info!(
                    epoch = m.epoch,
                    recovery_window_ms = m.recovery_window_ms,
                    "master: serving clients"
                );
            }
            Role::TakingOver { serve_at } => {
                self.depose(st, None);
                if let Serving::No { serve_at: at, .. } = &mut st.serving {
                    *at = *serve_at;
                }
                st.role = MemberRole::TakingOver;
            }
            Role::Follower { master } => {
                let master = master.as_ref().map(|m| m.client_addr.clone().into_bytes());
                self.depose(st, master);
                st.role = MemberRole::Follower;
            }
        }
    }

    /// Stops serving at once: every connection gets `GOAWAY not_master` and the core
    /// is replaced by an empty one, so no session expires, no port is granted or
    /// released, no event is sent from here on (a new master adopts the sessions).
    pub(super) fn depose(&self, st: &mut State, master: Option<Vec<u8>>) {
        if st.serving == Serving::Yes {
            st.goaway_all(
                ErrorCode::NotMaster,
                b"this server is no longer master: reconnect to the group",
            );
            let epoch = st.core.epoch();
            st.core = Core::new(self.cfg.core.clone(), epoch, random_seed());
            tracing::warn!("deposed: stopped serving clients");
        }
        st.serving = Serving::No {
            master,
            serve_at: None,
        };
    }

    /// Whether this server may act now; a master whose lease ran out is deposed here,
    /// before it does anything else.
    pub(super) fn may_serve(&self, st: &mut State) -> bool {
        if st.serving != Serving::Yes {
            return false;
        }
        match &self.member {
            None => true,
            Some(m) if m.lease.valid() => true,
            Some(_) => {
                self.depose(st, None);
                st.role = MemberRole::Follower;
                false
            }
        }
    }
}
