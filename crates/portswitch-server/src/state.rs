//! The state shared by every task: the core and the output queues of all connections,
//! behind one lock, plus the glue that turns core effects into queued bytes.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use bytes::BytesMut;
use portswitch_core::{ConnId, Core, Outbox, Stats};
use portswitch_proto::frame::{frame_len, messages, FrameError};
use portswitch_proto::{msg::encode_stat, msg::op, ErrorCode, Event, FrameBuf, Reply, Request};
use tokio::sync::Notify;

use crate::auth::{AdminOutcome, Auth};
use crate::config::{ServerConfig, STALL_MS_THRESHOLD};
use portswitch_core::Perm;
use portswitch_proto::MemberRole;

/// One connection's output side as the shared state sees it.
pub(crate) struct ConnOut {
    id: ConnId,
    /// The peer's address (lockout, audit, loopback-only bootstrap).
    addr: std::net::IpAddr,
    /// TLS facts: channel binding, client-certificate user.
    security: crate::tls::ConnSecurity,
    out: FrameBuf,
    pub(crate) notify: Arc<Notify>,
    /// Close once `out` is written (set by GOAWAY paths).
    pub(crate) closing: bool,
    dirty: bool,
    /// The channel the client's messages currently belong to (CHANNEL switches).
    in_channel: u16,
    /// The channel the last switch queued or sent to the client named;
    /// `CHANNEL_UNKNOWN` after queued output was dropped.
    out_channel: u32,
    /// Bit set of the channels other than 0 the client has switched to: their
    /// sessions see the disconnect too. Empty (no allocation) for a connection that
    /// never multiplexes.
    channels: Vec<u64>,
    /// A HELLO has succeeded on this connection (on any channel). Until then its
    /// frames are capped at `frame_bytes_before_login_max` and it has
    /// `login_timeout_ms` to get there.
    logged_in: bool,
}

const CHANNEL_UNKNOWN: u32 = u32::MAX;

/// The ids the core sees: a connection's slot in the low 24 bits, the channel in the
/// next 16, a generation (so a reused slot gets new ids) in the top 24. A plain
/// connection is channel 0.
const CONN_KEY_BITS: u32 = 24;
const CONN_CHANNEL_BITS: u32 = 16;
const CONN_CHANNEL_MASK: u64 = ((1 << CONN_CHANNEL_BITS) - 1) << CONN_KEY_BITS;

fn conn_key(conn: ConnId) -> usize {
    (conn & ((1 << CONN_KEY_BITS) - 1)) as usize
}

fn conn_base(conn: ConnId) -> ConnId {
    conn & !CONN_CHANNEL_MASK
}

fn conn_channel(conn: ConnId) -> u16 {
    ((conn & CONN_CHANNEL_MASK) >> CONN_KEY_BITS) as u16
}

fn on_channel(conn: ConnId, channel: u16) -> ConnId {
    conn_base(conn) | (channel as u64) << CONN_KEY_BITS
}

impl ConnOut {
    /// Queues a CHANNEL switch unless the client already reads `channel`.
    fn select(&mut self, channel: u16) {
        if self.out_channel != channel as u32 {
            self.out.push_channel(channel);
            self.out_channel = channel as u32;
        }
    }

    fn mark(&mut self, channel: u16) {
        let (word, bit) = (channel as usize / 64, channel % 64);
        if self.channels.len() <= word {
            self.channels.resize(word + 1, 0);
        }
        self.channels[word] |= 1 << bit;
    }

    /// Every id of this connection a session may be attached to: channel 0 and each
    /// channel switched to.
    fn ids(&self) -> Vec<ConnId> {
        let mut ids = vec![self.id];
        for (w, bits) in self.channels.iter().enumerate() {
            let mut bits = *bits;
            while bits != 0 {
                let b = bits.trailing_zeros();
                bits &= bits - 1;
                let ch = (w * 64) as u16 + b as u16;
                if ch != 0 {
                    ids.push(on_channel(self.id, ch));
                }
            }
        }
        ids
    }

    /// Drops queued output (a slow consumer) and queues a connection-wide GOAWAY.
    fn replace_with_goaway(&mut self, event: &Event<'_>) {
        self.out.clear();
        if !self.channels.is_empty() {
            self.out_channel = CHANNEL_UNKNOWN;
        }
        self.select(0);
        self.out.push_event(event);
    }
}

/// A member of a Raft group: it serves only while master with a valid lease.
pub(crate) struct Member {
    node: Arc<portswitch_cluster::ClusterNode>,
    lease: Arc<portswitch_cluster::LeaseClock>,
    /// Holds the data directory's lock while the server runs.
    _lock: std::fs::File,
}

/// A master's lease ceiling and the raise in progress, shared with the task that
/// raises it durably (through Raft, or in the data directory).
#[derive(Debug, Default)]
pub(crate) struct Ceiling {
    epoch: AtomicU64,
    lease_ms: std::sync::atomic::AtomicU32,
    /// The longest lease a HELLO asked for; a raise is under way while above
    /// `lease_ms`.
    wanted_ms: std::sync::atomic::AtomicU32,
    /// The epoch whose recovery window closed and is still to be recorded.
    settle_epoch: AtomicU64,
    /// A lower is being recorded.
    lowering: std::sync::atomic::AtomicBool,
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

/// Where a master records its lease ceiling and the close of its recovery window, so
/// that its successor's window covers what it granted.
#[derive(Clone)]
enum Keeper {
    /// A member of a group: through Raft.
    Raft(Arc<portswitch_cluster::ClusterNode>),
    /// A server alone on its data directory: in `group.json`.
    Dir(Arc<crate::group::GroupState>),
}

impl Keeper {
    async fn raise(&self, epoch: u64, lease_ms: u32) -> Result<u32, String> {
        match self {
            Keeper::Raft(node) => node
                .raise_ceiling(epoch, lease_ms)
                .await
                .map_err(|e| e.to_string()),
            Keeper::Dir(g) => on_disk(g, move |g| g.raise_ceiling(lease_ms)).await,
        }
    }

    async fn lower(&self, epoch: u64, from: u32, lease_ms: u32) -> Result<Option<u32>, String> {
        match self {
            Keeper::Raft(node) => node
                .lower_ceiling(epoch, from, lease_ms)
                .await
                .map_err(|e| e.to_string()),
            Keeper::Dir(g) => on_disk(g, move |g| g.lower_ceiling(from, lease_ms)).await,
        }
    }

    async fn settle(&self, epoch: u64) -> Result<(), String> {
        match self {
            Keeper::Raft(node) => node.settle(epoch).await.map_err(|e| e.to_string()),
            Keeper::Dir(g) => on_disk(g, |g| g.settle()).await,
        }
    }
}

/// Runs a write to the data directory on a blocking thread (it syncs).
async fn on_disk<T: Send + 'static>(
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
    ceiling: Arc<Ceiling>,
    keeper: Keeper,
}

impl CeilingKeeper {
    /// Whether a HELLO asking for `lease_ms` must wait for the ceiling to rise; if so,
    /// makes sure a raise is under way.
    fn must_raise(&self, lease_ms: u32) -> bool {
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

/// Whether this server may serve clients now.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Serving {
    /// Standalone, or the master of its group.
    Yes,
    /// A member that is not master: what to tell clients, and — while taking over —
    /// when it expects to serve.
    No {
        hint: Vec<u8>,
        serve_at: Option<Instant>,
    },
}

pub(crate) struct State {
    pub(crate) core: Core,
    serving: Serving,
    /// HELLO admission: tokens left and when they were last refilled (real ms).
    hello_tokens: f64,
    hello_refilled_ms: u64,
    role: MemberRole,
    auth: Auth,
    /// Permission denials of the current batch, for the audit log.
    denials: Vec<(String, Perm, Vec<u8>)>,
    /// Real milliseconds since start when the lock was last taken.
    last_real_ms: u64,
    /// Milliseconds of server stalls not charged to leases (see `STALL_MS_THRESHOLD`).
    stalled_ms: u64,
    conns: slab::Slab<ConnOut>,
    dirty: Vec<usize>,
    conn_seq: u32,
    counters: Counters,
    scratch: BytesMut,
    /// Since when (core ms) no session has held a lease as long as the ceiling, and
    /// the longest lease held since: the ceiling comes down to it after a whole
    /// ceiling of that.
    ceiling_quiet_since_ms: u64,
    ceiling_quiet_peak_ms: u32,
}

#[derive(Default, Clone, Copy)]
struct Counters {
    connections_total: u64,
    connections_rejected_total: u64,
    hellos_throttled_total: u64,
    slow_consumer_total: u64,
    malformed_total: u64,
    login_timeouts_total: u64,
    stalls_total: u64,
    /// Time spent handling frames under the state lock: the part of the server's
    /// work that one core does at a time (compare with the process's CPU time).
    feed_lock_ns: u64,
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

/// Adapts the core's effects to connection output buffers.
struct Out<'a> {
    conns: &'a mut slab::Slab<ConnOut>,
    dirty: &'a mut Vec<usize>,
    denials: &'a mut Vec<(String, Perm, Vec<u8>)>,
}

impl Out<'_> {
    fn slot(&mut self, conn: ConnId) -> Option<&mut ConnOut> {
        let key = conn_key(conn);
        let c = self.conns.get_mut(key)?;
        if c.id != conn_base(conn) || c.closing {
            return None;
        }
        if !c.dirty {
            c.dirty = true;
            self.dirty.push(key);
        }
        c.select(conn_channel(conn));
        Some(c)
    }
}

impl Outbox for Out<'_> {
    fn reply(&mut self, conn: ConnId, id: u32, reply: &Reply<'_>) {
        if let Some(c) = self.slot(conn) {
            c.out.push_reply(id, reply);
        }
    }
    fn event(&mut self, conn: ConnId, event: &Event<'_>) {
        if let Some(c) = self.slot(conn) {
            c.out.push_event(event);
        }
    }
    fn frames(&mut self, conn: ConnId, frames: &[u8]) {
        if let Some(c) = self.slot(conn) {
            c.out.push_frames(frames);
        }
    }
    fn close(&mut self, conn: ConnId) {
        // A session's end on a channel other than 0 (expired, taken over) leaves the
        // connection and its other channels be: the channel may HELLO again.
        if conn_channel(conn) != 0 {
            return;
        }
        if let Some(c) = self.slot(conn) {
            c.closing = true;
        }
    }
    fn denied(&mut self, _conn: ConnId, user: &str, perm: Perm, name: &[u8]) {
        self.denials.push((user.to_string(), perm, name.to_vec()));
    }
}

/// What reading a buffer of bytes from a connection came to.
pub(crate) enum Fed {
    /// Consumed this many bytes; wants more.
    Consumed(usize),
    /// The connection must close (GOAWAY already queued).
    Close,
    /// A request is answered later (a membership change, once Raft has committed
    /// it). Replies come in request order, so nothing after it is read until then:
    /// `consumed` bytes of whole frames were handled, and the first `skip` messages
    /// of the next frame; `answered` resolves once the reply is queued, and `feed`
    /// is then called again with that `skip`.
    Suspended {
        consumed: usize,
        skip: usize,
        answered: tokio::sync::oneshot::Receiver<()>,
    },
}

pub(crate) struct Shared {
    state: Mutex<State>,
    cfg: ServerConfig,
    start: Instant,
    epoch: AtomicU64,
    member: Option<Member>,
    /// The lease ceiling of a master that records one (a group's, or a server's
    /// alone on a data directory; its `Keeper::Dir` also holds the directory's lock
    /// while the server runs).
    ceiling: Option<CeilingKeeper>,
    /// This `Shared` itself, for tasks that answer a request later (membership
    /// changes go through Raft, which takes a while).
    me: std::sync::OnceLock<std::sync::Weak<Shared>>,
}

impl Shared {
    pub(crate) fn new(
        cfg: ServerConfig,
        epoch: u64,
        group: Option<crate::group::GroupState>,
        member: Option<Member>,
    ) -> std::io::Result<Shared> {
        let mut seed = random_seed();
        if let Some(g) = &group {
            // Session secrets under the group's keys: a later master can verify them.
            seed[1] = g.secret_keys[0];
            seed[2] = g.secret_keys[1];
        }
        let mut core = Core::new(cfg.core.clone(), epoch, seed);
        if let Some(w) = group.as_ref().and_then(|g| g.recovery_window_ms) {
            core.start_recovery(0, w);
        }
        let mut fake_salt_key = [0u8; 32];
        fill_random(&mut fake_salt_key);
        let auth = Auth::load(cfg.auth.clone(), fake_salt_key)?;
        let ceiling = match (group.map(Arc::new), &member) {
            (Some(g), _) => Some(CeilingKeeper {
                ceiling: Arc::new(Ceiling {
                    epoch: AtomicU64::new(g.epoch),
                    lease_ms: g.lease_ceiling_ms.into(),
                    wanted_ms: 0.into(),
                    // Recorded once the window closes: the next restart owes less.
                    settle_epoch: AtomicU64::new(if g.recovery_window_ms.is_some() {
                        g.epoch
                    } else {
                        0
                    }),
                    lowering: false.into(),
                }),
                keeper: Keeper::Dir(g),
            }),
            // Set when it becomes master.
            (None, Some(m)) => Some(CeilingKeeper {
                ceiling: Arc::default(),
                keeper: Keeper::Raft(m.node.clone()),
            }),
            (None, None) => None,
        };
        Ok(Shared {
            state: Mutex::new(State {
                core,
                hello_tokens: cfg.hello_rate_max as f64,
                hello_refilled_ms: 0,
                serving: match member {
                    None => Serving::Yes,
                    Some(_) => Serving::No {
                        hint: NO_MASTER_YET.to_vec(),
                        serve_at: None,
                    },
                },
                role: match member {
                    None => MemberRole::Standalone,
                    Some(_) => MemberRole::Follower,
                },
                auth,
                denials: Vec::new(),
                last_real_ms: 0,
                stalled_ms: 0,
                conns: slab::Slab::new(),
                dirty: Vec::new(),
                conn_seq: 0,
                counters: Counters::default(),
                scratch: BytesMut::new(),
                ceiling_quiet_since_ms: 0,
                ceiling_quiet_peak_ms: 0,
            }),
            cfg,
            start: Instant::now(),
            epoch: AtomicU64::new(epoch),
            member,
            ceiling,
            me: std::sync::OnceLock::new(),
        })
    }

    pub(crate) fn config(&self) -> &ServerConfig {
        &self.cfg
    }

    pub(crate) fn epoch(&self) -> u64 {
        self.epoch.load(Ordering::Relaxed)
    }

    /// Lets tasks spawned by this `Shared` reach it later.
    pub(crate) fn set_self(self: &Arc<Self>) {
        let _ = self.me.set(Arc::downgrade(self));
    }

    /// Starts a membership change for the ADMIN request `id` on `conn`; the answer
    /// is queued when Raft has committed it (or refused), and the returned receiver
    /// then resolves (also if the server went away meanwhile).
    fn start_member_op(
        &self,
        conn: ConnId,
        id: u32,
        op: MemberOp,
    ) -> tokio::sync::oneshot::Receiver<()> {
        let (answered, rx) = tokio::sync::oneshot::channel();
        let node = self.member.as_ref().map(|m| m.node.clone());
        let me = self.me.get().cloned();
        tokio::spawn(async move {
            let result = match (node, op) {
                (Some(node), MemberOp::Add { id, member }) => node.add_member(id, member).await,
                (Some(node), MemberOp::Remove { id }) => node.remove_member(id).await,
                _ => Err(portswitch_cluster::ClusterError::NoGroup),
            }
            .map_err(|e| e.to_string());
            if let Some(shared) = me.and_then(|w| w.upgrade()) {
                shared.reply_later(conn, id, result);
            }
            let _ = answered.send(());
        });
        rx
    }

    /// Writes a change of the group's users through Raft; when it is committed (or
    /// refused) the change is taken here and answered, and the receiver resolves.
    fn start_users_op(
        &self,
        conn: ConnId,
        id: u32,
        change: UsersChange,
    ) -> tokio::sync::oneshot::Receiver<()> {
        let (answered, rx) = tokio::sync::oneshot::channel();
        let node = self.member.as_ref().map(|m| m.node.clone());
        let me = self.me.get().cloned();
        tokio::spawn(async move {
            let written = match node {
                Some(node) => node.write_users(change.expect, change.store.clone()).await,
                None => Err(portswitch_cluster::ClusterError::NoGroup),
            };
            if let Some(shared) = me.and_then(|w| w.upgrade()) {
                shared.users_written(conn, id, change, written);
            }
            let _ = answered.send(());
        });
        rx
    }

    fn users_written(
        &self,
        conn: ConnId,
        id: u32,
        change: UsersChange,
        written: Result<u64, portswitch_cluster::ClusterError>,
    ) {
        let mut st = self.lock();
        let st = &mut *st;
        let now = self.now_ms(st);
        let mut out = Out {
            conns: &mut st.conns,
            dirty: &mut st.dirty,
            denials: &mut st.denials,
        };
        match written {
            Ok(version) => {
                st.auth.adopt_replicated(&change.store, version);
                st.auth.audit(change.audit);
                if let Some(user) = &change.deleted {
                    st.core.end_sessions_of(user, now, &mut out);
                }
                out.reply(
                    conn,
                    id,
                    &Reply::AdminOk {
                        result: change.answer.as_bytes(),
                    },
                );
            }
            Err(e) => {
                let code = match e {
                    portswitch_cluster::ClusterError::NotLeader { .. } => ErrorCode::NotMaster,
                    _ => ErrorCode::InvalidArgument,
                };
                refuse(&mut out, conn, id, code, e.to_string().as_bytes());
            }
        }
        self.flush(st, now);
    }

    fn reply_later(
        &self,
        conn: ConnId,
        id: u32,
        result: Result<portswitch_cluster::node::ClusterStatus, String>,
    ) {
        let mut st = self.lock();
        let st = &mut *st;
        let now = self.now_ms(st);
        let mut out = Out {
            conns: &mut st.conns,
            dirty: &mut st.dirty,
            denials: &mut st.denials,
        };
        match result {
            Ok(status) => {
                let json = serde_json::to_string(&status).unwrap_or_default();
                out.reply(
                    conn,
                    id,
                    &Reply::AdminOk {
                        result: json.as_bytes(),
                    },
                );
            }
            Err(e) => refuse(&mut out, conn, id, ErrorCode::InvalidArgument, e.as_bytes()),
        }
        self.flush(st, now);
    }

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
                self.depose(st, NO_MASTER_YET.to_vec());
                if let Serving::No { serve_at: at, .. } = &mut st.serving {
                    *at = *serve_at;
                }
                st.role = MemberRole::TakingOver;
            }
            Role::Follower { master } => {
                let hint = match master {
                    Some(m) => format!("master={}", m.client_addr).into_bytes(),
                    None => NO_MASTER_YET.to_vec(),
                };
                self.depose(st, hint);
                st.role = MemberRole::Follower;
            }
        }
    }

    /// Stops serving at once: every connection gets `GOAWAY not_master` and the core
    /// is replaced by an empty one, so no session expires, no port is granted or
    /// released, no event is sent from here on (a new master adopts the sessions).
    fn depose(&self, st: &mut State, hint: Vec<u8>) {
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
            hint,
            serve_at: None,
        };
    }

    /// Takes a HELLO token, refilling at `hello_rate_max` per second (burst: one
    /// second's worth). False: refuse this HELLO with `overloaded`.
    fn admit_hello(&self, c: &mut Counters, tokens: &mut f64, refilled_ms: &mut u64) -> bool {
        let rate = self.cfg.hello_rate_max as f64;
        let real = self.start.elapsed().as_millis() as u64;
        *tokens = (*tokens + (real.saturating_sub(*refilled_ms)) as f64 * rate / 1_000.0).min(rate);
        *refilled_ms = real;
        if *tokens >= 1.0 {
            *tokens -= 1.0;
            true
        } else {
            c.hellos_throttled_total += 1;
            false
        }
    }

    /// Whether this server may act now; a master whose lease ran out is deposed here,
    /// before it does anything else.
    fn may_serve(&self, st: &mut State) -> bool {
        if st.serving != Serving::Yes {
            return false;
        }
        match &self.member {
            None => true,
            Some(m) if m.lease.valid() => true,
            Some(_) => {
                self.depose(st, NO_MASTER_YET.to_vec());
                st.role = MemberRole::Follower;
                false
            }
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock means a broken invariant in the core; the
        // process is configured to abort on panic, so poisoning is not recoverable.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The core's clock: milliseconds since start, less server stalls. Read under the
    /// lock, so the core sees time rise.
    fn now_ms(&self, st: &mut State) -> u64 {
        let real = self.start.elapsed().as_millis() as u64;
        let gap = real.saturating_sub(st.last_real_ms);
        if gap > STALL_MS_THRESHOLD {
            st.stalled_ms += gap - STALL_MS_THRESHOLD;
            st.counters.stalls_total += 1;
            // Short gaps happen when the machine is saturated; long ones deserve a look.
            if gap >= 250 {
                tracing::warn!(
                    gap_ms = gap,
                    "server stalled; the stall is not charged to leases"
                );
            } else {
                tracing::debug!(
                    gap_ms = gap,
                    "server stalled; the stall is not charged to leases"
                );
            }
        }
        st.last_real_ms = st.last_real_ms.max(real);
        real - st.stalled_ms
    }

    /// Registers a new connection. `None` when the server is at `connections_max`.
    pub(crate) fn open(
        &self,
        addr: std::net::IpAddr,
        security: crate::tls::ConnSecurity,
    ) -> Option<(ConnId, Arc<Notify>)> {
        let mut st = self.lock();
        if st.conns.len() >= self.cfg.connections_max {
            st.counters.connections_rejected_total += 1;
            return None;
        }
        st.conn_seq = st.conn_seq.wrapping_add(1);
        let seq = st.conn_seq & ((1 << (64 - CONN_KEY_BITS - CONN_CHANNEL_BITS)) - 1);
        let entry = st.conns.vacant_entry();
        if entry.key() >= 1 << CONN_KEY_BITS {
            // Unreachable with a validated connections_max; refuse rather than alias.
            st.counters.connections_rejected_total += 1;
            return None;
        }
        let id = (seq as u64) << (CONN_KEY_BITS + CONN_CHANNEL_BITS) | entry.key() as u64;
        let notify = Arc::new(Notify::new());
        entry.insert(ConnOut {
            id,
            addr,
            security,
            out: FrameBuf::new(
                self.cfg.core.frame_bytes_max as usize,
                self.cfg.core.commands_per_frame_max as usize,
            ),
            notify: notify.clone(),
            closing: false,
            dirty: false,
            in_channel: 0,
            out_channel: 0,
            channels: Vec::new(),
            logged_in: false,
        });
        st.counters.connections_total += 1;
        Some((id, notify))
    }

    /// Whether a HELLO has succeeded on `conn` (see `ConnOut::logged_in`).
    pub(crate) fn logged_in(&self, conn: ConnId) -> bool {
        self.lock()
            .conns
            .get(conn_key(conn))
            .is_some_and(|c| c.id == conn && c.logged_in)
    }

    /// `conn` has had no session for `login_timeout_ms`: GOAWAY and close.
    pub(crate) fn login_timed_out(&self, conn: ConnId) {
        let mut st = self.lock();
        let Some(c) = st.conns.get_mut(conn_key(conn)).filter(|c| c.id == conn) else {
            return;
        };
        if c.logged_in || c.closing {
            return;
        }
        let msg = format!(
            "no session within login_timeout_ms ({} ms) of connecting",
            self.cfg.login_timeout_ms
        );
        c.replace_with_goaway(&Event::GoAway {
            code: ErrorCode::LoginTimeout,
            message: msg.as_bytes(),
        });
        c.closing = true;
        c.notify.notify_one();
        st.counters.login_timeouts_total += 1;
    }

    pub(crate) fn connections(&self) -> usize {
        self.lock().conns.len()
    }

    /// Feeds bytes read from `conn`: every whole frame at the front of `buf` is
    /// processed under one lock, except the first `skip` messages of the first frame
    /// (handled before a [`Fed::Suspended`]).
    pub(crate) fn feed(&self, conn: ConnId, buf: &[u8], mut skip: usize) -> Fed {
        let frame_max = self.cfg.core.frame_bytes_max as usize;
        let commands_max = self.cfg.core.commands_per_frame_max as usize;
        let mut st = self.lock();
        let locked_at = Instant::now();
        let st = &mut *st;
        let now = self.now_ms(st);
        let serving = self.may_serve(st);
        // A connection being closed (GOAWAY sent: deposed, expired, slow, taken over)
        // reads nothing more: in particular, a master that is deposed and elected
        // again must not answer an old connection's PING from its new core, which
        // would look to the client like proof that its session is alive.
        let Some((mut channel, logged_in)) = st
            .conns
            .get(conn_key(conn))
            .filter(|c| c.id == conn && !c.closing)
            .map(|c| (c.in_channel, c.logged_in))
        else {
            return Fed::Close;
        };
        // A stranger's frames are small: it cannot make the server buffer 1 MiB.
        let frame_max = if logged_in {
            frame_max
        } else {
            frame_max.min(self.cfg.frame_bytes_before_login_max as usize)
        };
        let channels_max = self.cfg.core.channels_per_connection_max;
        let hint = match &st.serving {
            Serving::Yes => Vec::new(),
            // Taking over: say when to come back, so clients need not poll.
            Serving::No {
                serve_at: Some(at), ..
            } => format!(
                "taking over as master; retry_ms={}",
                at.saturating_duration_since(Instant::now()).as_millis() + 1
            )
            .into_bytes(),
            Serving::No { hint, .. } => hint.clone(),
        };
        let mut consumed = 0;
        let mut close = false;
        let mut suspended = None;
        loop {
            let rest = &buf[consumed..];
            let n = match frame_len(rest, frame_max) {
                Ok(Some(n)) => n,
                Ok(None) => break,
                Err(e) => {
                    close = true;
                    st.goaway(conn, &e);
                    break;
                }
            };
            let mut vconn = on_channel(conn, channel);
            let mut batch = st.core.begin_batch(vconn, now);
            let mut out = Out {
                conns: &mut st.conns,
                dirty: &mut st.dirty,
                denials: &mut st.denials,
            };
            for (i, m) in messages(&rest[4..n], commands_max).enumerate() {
                if i < skip {
                    continue; // handled before this frame was suspended
                }
                let m = match m {
                    Ok(m) => m,
                    Err(e) => {
                        close = true;
                        break_with_goaway(&mut out, conn, &e);
                        break;
                    }
                };
                if m.opcode == op::CHANNEL {
                    if m.id >= channels_max {
                        close = true;
                        let msg = format!(
                            "channel {} is past this server's channels_per_connection_max ({channels_max})",
                            m.id
                        );
                        out.event(
                            conn,
                            &Event::GoAway {
                                code: ErrorCode::ChannelsMax,
                                message: msg.as_bytes(),
                            },
                        );
                        out.close(conn);
                        break;
                    }
                    channel = m.id as u16;
                    vconn = on_channel(conn, channel);
                    if channel != 0 {
                        if let Some(c) = out.conns.get_mut(conn_key(conn)) {
                            c.mark(channel);
                        }
                    }
                    // A frame renews the session of every channel it addresses.
                    batch = st.core.begin_batch(vconn, now);
                    continue;
                }
                match Request::decode(m.opcode, m.body) {
                    Ok(Request::Stats) => {
                        let mut snap = stats_snapshot(
                            &st.core,
                            out.conns.len(),
                            st.counters,
                            st.stalled_ms,
                            self.start,
                        );
                        self.member_stats(&mut snap, st.role);
                        let mut entries = std::mem::take(&mut st.scratch);
                        entries.clear();
                        let pairs = snap.pairs();
                        for (name, value) in &pairs {
                            encode_stat(&mut entries, name, *value);
                        }
                        out.reply(
                            vconn,
                            m.id,
                            &Reply::Stats {
                                count: pairs.len() as u16,
                                entries: &entries,
                            },
                        );
                        st.scratch = entries;
                    }
                    Ok(Request::Ping) if !serving => out.reply(vconn, m.id, &Reply::Ok),
                    Ok(_) if !serving => out.reply(
                        vconn,
                        m.id,
                        &Reply::Error {
                            code: ErrorCode::NotMaster,
                            message: &hint,
                        },
                    ),
                    Ok(Request::Admin { command }) if MemberOp::parse(command).is_some() => {
                        let caller = st
                            .core
                            .session_user(vconn)
                            .and_then(|(u, a)| Some((u?, a?)));
                        let addr = addr_of(out.conns, conn);
                        let op = MemberOp::parse(command).expect("checked");
                        match (st.auth.check_admin(caller, addr), op) {
                            (Err((code, msg)), _) => {
                                refuse(&mut out, vconn, m.id, code, msg.as_bytes())
                            }
                            (Ok(_), MemberOp::Bad(why)) => refuse(
                                &mut out,
                                vconn,
                                m.id,
                                ErrorCode::InvalidArgument,
                                why.as_bytes(),
                            ),
                            (Ok(_), _) if self.member.is_none() => refuse(
                                &mut out,
                                vconn,
                                m.id,
                                ErrorCode::InvalidArgument,
                                b"this server is not a member of a group (--node-id, --member)",
                            ),
                            (Ok(_), MemberOp::List) => {
                                let status = self.cluster_status();
                                let json = serde_json::to_string(&status).unwrap_or_default();
                                out.reply(
                                    vconn,
                                    m.id,
                                    &Reply::AdminOk {
                                        result: json.as_bytes(),
                                    },
                                );
                            }
                            (Ok(who), op) => {
                                st.auth.audit(serde_json::json!({
                                    "event": "admin",
                                    "by": who,
                                    "op": format!("{op:?}"),
                                    "addr": addr.to_string(),
                                }));
                                let answered = self.start_member_op(vconn, m.id, op);
                                suspended = Some((i + 1, answered));
                                break;
                            }
                        }
                    }
                    Ok(Request::Hello(h))
                        if h.lease_ms <= self.cfg.core.lease_ms_max
                            && self
                                .ceiling
                                .as_ref()
                                .is_some_and(|k| k.must_raise(h.lease_ms)) =>
                    {
                        let msg = format!(
                            "raising the master's lease ceiling to {} ms; retry_ms={}",
                            h.lease_ms,
                            RAISE_RETRY_MS + fastrand_ms(10)
                        );
                        refuse(&mut out, vconn, m.id, ErrorCode::Overloaded, msg.as_bytes());
                    }
                    Ok(Request::Hello(_))
                        if !self.admit_hello(
                            &mut st.counters,
                            &mut st.hello_tokens,
                            &mut st.hello_refilled_ms,
                        ) =>
                    {
                        let wait = 1_000 / self.cfg.hello_rate_max.max(1) as u64 + 1;
                        let msg = format!(
                            "too many sessions opening at once (hello_rate_max); retry_ms={}",
                            wait + fastrand_ms(50)
                        );
                        refuse(&mut out, vconn, m.id, ErrorCode::Overloaded, msg.as_bytes());
                    }
                    Ok(Request::Admin { command }) if st.auth.replicated().is_some() => {
                        // A group's users: a change is written through the group first.
                        let caller = st
                            .core
                            .session_user(vconn)
                            .and_then(|(u, a)| Some((u?, a?)));
                        let addr = addr_of(out.conns, conn);
                        let mut salt = [0u8; portswitch_auth::scram::SALT_BYTES];
                        fill_random(&mut salt);
                        match st.auth.admin(caller, addr, command, &salt) {
                            Ok(AdminOutcome::Done { answer, deleted }) => {
                                if let Some(user) = deleted {
                                    st.core.end_sessions_of(&user, now, &mut out);
                                }
                                out.reply(
                                    vconn,
                                    m.id,
                                    &Reply::AdminOk {
                                        result: answer.as_bytes(),
                                    },
                                );
                            }
                            Ok(AdminOutcome::Replicate {
                                expect,
                                store,
                                answer,
                                audit,
                                deleted,
                            }) => {
                                let change = UsersChange {
                                    expect,
                                    store,
                                    answer,
                                    audit,
                                    deleted,
                                };
                                let answered = self.start_users_op(vconn, m.id, change);
                                suspended = Some((i + 1, answered));
                                break;
                            }
                            Err((code, msg)) => refuse(&mut out, vconn, m.id, code, msg.as_bytes()),
                        }
                    }
                    Ok(req) if is_edge(&req) => edge(
                        &mut st.auth,
                        &mut st.core,
                        &mut batch,
                        &mut out,
                        vconn,
                        m.id,
                        &req,
                        now,
                    ),
                    Ok(req) => st.core.handle(&mut batch, m.id, &req, &mut out),
                    Err(e) => out.reply(
                        vconn,
                        m.id,
                        &Reply::Error {
                            code: e.code,
                            message: e.detail.as_bytes(),
                        },
                    ),
                }
            }
            if close {
                st.counters.malformed_total += 1;
                break;
            }
            if suspended.is_some() {
                break;
            }
            skip = 0;
            consumed += n;
        }
        for (user, perm, name) in st.denials.drain(..) {
            st.auth.audit(serde_json::json!({
                "event": "denied",
                "user": user,
                "perm": perm.name(),
                "name": String::from_utf8_lossy(&name),
            }));
        }
        if !logged_in && !close {
            let c = st.conns.get(conn_key(conn));
            let now_in = c.is_some_and(|c| {
                c.ids()
                    .into_iter()
                    .any(|id| st.core.session_user(id).is_some())
            });
            if now_in {
                if let Some(c) = st.conns.get_mut(conn_key(conn)) {
                    c.logged_in = true;
                }
            }
        }
        let ids = match st.conns.get_mut(conn_key(conn)) {
            Some(c) => {
                c.in_channel = channel;
                if close {
                    c.ids()
                } else {
                    Vec::new()
                }
            }
            None => Vec::new(),
        };
        if close {
            // The core forgets the connection now; its sessions (if not ending on
            // disconnect) stay for their lease, resumable from another connection.
            let mut out = Out {
                conns: &mut st.conns,
                dirty: &mut st.dirty,
                denials: &mut st.denials,
            };
            for id in ids {
                st.core.handle_disconnect(id, now, &mut out);
            }
        }
        self.flush(st, now);
        st.counters.feed_lock_ns += locked_at.elapsed().as_nanos() as u64;
        match suspended {
            _ if close => Fed::Close,
            Some((skip, answered)) => Fed::Suspended {
                consumed,
                skip,
                answered,
            },
            None => Fed::Consumed(consumed),
        }
    }

    /// The connection is gone (EOF, error, or its writer finished closing it).
    pub(crate) fn closed(&self, conn: ConnId) {
        let mut st = self.lock();
        let st = &mut *st;
        let now = self.now_ms(st);
        let key = conn_key(conn);
        let ids = match st.conns.get(key).filter(|c| c.id == conn) {
            Some(c) => c.ids(),
            None => vec![conn],
        };
        let mut out = Out {
            conns: &mut st.conns,
            dirty: &mut st.dirty,
            denials: &mut st.denials,
        };
        for id in ids {
            st.auth.forget(id);
            st.core.handle_disconnect(id, now, &mut out);
        }
        if st.conns.get(key).is_some_and(|c| c.id == conn) {
            let c = st.conns.remove(key);
            // Wake the writer so it sees the slot is gone and exits.
            c.notify.notify_one();
        }
        self.flush(st, now);
    }

    /// Moves queued output towards the writers: enforces the send-queue bound and
    /// wakes each writer with something new.
    fn flush(&self, st: &mut State, now: u64) {
        let max = self.cfg.send_queue_bytes_max;
        while !st.dirty.is_empty() {
            let dirty = std::mem::take(&mut st.dirty);
            let mut slow = Vec::new();
            for key in dirty {
                let Some(c) = st.conns.get_mut(key) else {
                    continue;
                };
                c.dirty = false;
                if c.out.len() > max && !c.closing {
                    c.replace_with_goaway(&Event::GoAway {
                        code: ErrorCode::SlowConsumer,
                        message: b"send queue passed send_queue_bytes_max; read faster",
                    });
                    c.closing = true;
                    slow.extend(c.ids());
                }
                c.notify.notify_one();
            }
            for conn in slow {
                st.counters.slow_consumer_total += 1;
                let mut out = Out {
                    conns: &mut st.conns,
                    dirty: &mut st.dirty,
                    denials: &mut st.denials,
                };
                st.core.handle_disconnect(conn, now, &mut out);
            }
        }
    }

    /// Takes what is queued for `conn` into `buf`. Returns whether the connection
    /// should close after writing it, or `None` if the connection is gone.
    pub(crate) fn take_output(&self, conn: ConnId, buf: &mut BytesMut) -> Option<bool> {
        let mut st = self.lock();
        let key = conn_key(conn);
        let c = st.conns.get_mut(key).filter(|c| c.id == conn)?;
        c.out.take_into(buf);
        Some(c.closing)
    }

    pub(crate) fn tick(&self) {
        let mut st = self.lock();
        let st = &mut *st;
        let now = self.now_ms(st);
        if !self.may_serve(st) {
            return;
        }
        if st.core.next_deadline().is_some_and(|d| d <= now) {
            let mut out = Out {
                conns: &mut st.conns,
                dirty: &mut st.dirty,
                denials: &mut st.denials,
            };
            st.core.handle_timeout(now, &mut out);
            self.flush(st, now);
        }
        if let Some(k) = &self.ceiling {
            let c = &k.ceiling;
            if st.core.recovery_left_ms().is_none() && c.settle_epoch.load(Ordering::Acquire) != 0 {
                let epoch = c.settle_epoch.swap(0, Ordering::AcqRel);
                let keeper = k.keeper.clone();
                tokio::spawn(async move {
                    match keeper.settle(epoch).await {
                        Ok(()) => tracing::info!(epoch, "recovery window closed and recorded"),
                        Err(e) => tracing::warn!(error = %e, "could not record the closed window"),
                    }
                });
            }
            self.maybe_lower_ceiling(st, k, now);
        }
    }

    /// Lowers the lease ceiling to the leases in use once no session has held a lease
    /// as long as it for a whole ceiling (plus a little): every lease view granted
    /// longer than the new ceiling has run out by then, so a successor's recovery
    /// window may be that much shorter. Not inside a recovery window, whose adopted
    /// sessions are still coming back with their leases.
    fn maybe_lower_ceiling(&self, st: &mut State, k: &CeilingKeeper, now: u64) {
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

    pub(crate) fn shutdown(&self) {
        self.lock()
            .goaway_all(ErrorCode::ShuttingDown, b"server shutting down");
    }

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

    fn member_stats(&self, snap: &mut StatsSnapshot, role: MemberRole) {
        snap.role = role;
        if let Some(m) = &self.member {
            snap.node_id = m.node.id();
            snap.master_lease_left_ms = m.lease.left().as_millis() as u64;
        }
        if let Some(k) = &self.ceiling {
            if role == MemberRole::Master || role == MemberRole::Standalone {
                snap.lease_ceiling_ms = k.ceiling.lease_ms.load(Ordering::Acquire) as u64;
            }
        }
    }
}

impl State {
    /// Sends every open connection `GOAWAY code` and closes it once written.
    fn goaway_all(&mut self, code: ErrorCode, message: &[u8]) {
        for (_, c) in self.conns.iter_mut() {
            if !c.closing {
                c.select(0);
                c.out.push_event(&Event::GoAway { code, message });
                c.closing = true;
            }
            c.notify.notify_one();
        }
    }

    fn goaway(&mut self, conn: ConnId, e: &FrameError) {
        let mut out = Out {
            conns: &mut self.conns,
            dirty: &mut self.dirty,
            denials: &mut self.denials,
        };
        break_with_goaway(&mut out, conn, e);
        self.counters.malformed_total += 1;
    }
}

fn break_with_goaway(out: &mut Out<'_>, conn: ConnId, e: &FrameError) {
    let code = match e {
        FrameError::TooLarge { .. } => ErrorCode::FrameTooLarge,
        FrameError::TooManyMessages { .. } => ErrorCode::TooManyCommands,
        _ => ErrorCode::Malformed,
    };
    let msg = e.to_string();
    out.event(
        conn,
        &Event::GoAway {
            code,
            message: msg.as_bytes(),
        },
    );
    out.close(conn);
}

fn stats_snapshot(
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

/// A membership command (ADMIN `member_list`, `member_add`, `member_remove`).
#[derive(Debug)]
enum MemberOp {
    List,
    Add {
        id: u64,
        member: portswitch_cluster::Member,
    },
    Remove {
        id: u64,
    },
    Bad(String),
}

impl MemberOp {
    /// `None` when the command is not a membership command at all.
    fn parse(command: &[u8]) -> Option<MemberOp> {
        let v: serde_json::Value = serde_json::from_slice(command).ok()?;
        let op = v["op"].as_str()?;
        let id = v["id"].as_u64().filter(|&id| id > 0);
        Some(match op {
            "member_list" => MemberOp::List,
            "member_add" => match (id, v["peer_addr"].as_str(), v["client_addr"].as_str()) {
                (Some(id), Some(p), Some(c)) => MemberOp::Add {
                    id,
                    member: portswitch_cluster::Member {
                        peer_addr: p.to_string(),
                        client_addr: c.to_string(),
                    },
                },
                _ => MemberOp::Bad("member_add needs id (> 0), peer_addr and client_addr".into()),
            },
            "member_remove" => match id {
                Some(id) => MemberOp::Remove { id },
                None => MemberOp::Bad("member_remove needs id (> 0)".into()),
            },
            _ => return None,
        })
    }
}

/// A change of a group's users on its way through Raft.
struct UsersChange {
    expect: u64,
    store: String,
    answer: String,
    audit: serde_json::Value,
    deleted: Option<String>,
}

/// What a member that is not master says when it knows of none.
const NO_MASTER_YET: &[u8] = b"no master yet: the group is electing one; retry shortly";

/// Requests the server answers at its edge rather than passing straight to the core:
/// authentication (HELLO with credentials, or any HELLO where the server needs them),
/// AUTH, and ADMIN.
fn is_edge(req: &Request<'_>) -> bool {
    matches!(
        req,
        Request::Hello(_) | Request::Auth { .. } | Request::Admin { .. }
    )
}

fn refuse(out: &mut Out<'_>, conn: ConnId, id: u32, code: ErrorCode, msg: &[u8]) {
    out.reply(conn, id, &Reply::Error { code, message: msg });
}

/// Handles an edge request (see [`is_edge`]): verifies credentials here, then hands
/// the core a HELLO with a verified `Identity`, or refuses.
#[allow(clippy::too_many_arguments)]
fn edge(
    auth: &mut Auth,
    core: &mut Core,
    batch: &mut portswitch_core::Batch,
    out: &mut Out<'_>,
    conn: ConnId,
    id: u32,
    req: &Request<'_>,
    now: u64,
) {
    let addr = addr_of(out.conns, conn);
    let security = security_of(out.conns, conn);
    match *req {
        // Answered before any authentication step, so a client learns at once.
        Request::Hello(_) if core.session_user(conn).is_some() => refuse(
            out,
            conn,
            id,
            ErrorCode::SessionExists,
            b"this connection (channel) already has a session",
        ),
        Request::Hello(ref h) if auth.enabled() && h.credentials.is_empty() => {
            // A verified client certificate naming a user logs in as that user.
            match security
                .cert_user
                .as_deref()
                .and_then(|u| auth.cert_login(u, addr))
            {
                Some(ident) => core.handle_authenticated_hello(batch, id, h, &ident, b"", out),
                None => refuse(
                    out,
                    conn,
                    id,
                    ErrorCode::AuthRequired,
                    b"this server requires credentials (SCRAM-SHA-256)",
                ),
            }
        }
        Request::Hello(ref h) if auth.enabled() => {
            let mut nonce = [0u8; 18];
            fill_random(&mut nonce);
            let nonce = portswitch_auth::scram::nonce_from(&nonce);
            match auth.start(conn, addr, h, &nonce, now, channel(&security)) {
                Ok(challenge) => out.reply(
                    conn,
                    id,
                    &Reply::AuthContinue {
                        data: challenge.as_bytes(),
                    },
                ),
                Err((code, msg)) => refuse(out, conn, id, code, msg.as_bytes()),
            }
        }
        Request::Hello(ref h) if h.credentials.is_empty() && !auth.admits_anonymous(addr) => {
            refuse(
                out,
                conn,
                id,
                ErrorCode::AuthRequired,
                b"this server has a user store but no users yet: create the first from loopback",
            )
        }
        Request::Auth { data } => match auth.finish(conn, addr, data, now, channel(&security)) {
            Ok((hello, ident, server_final)) => core.handle_authenticated_hello(
                batch,
                id,
                &hello.as_hello(),
                &ident,
                server_final.as_bytes(),
                out,
            ),
            Err((code, msg)) => refuse(out, conn, id, code, msg.as_bytes()),
        },
        Request::Admin { command } => {
            let caller = core.session_user(conn).and_then(|(u, a)| Some((u?, a?)));
            let mut salt = [0u8; portswitch_auth::scram::SALT_BYTES];
            fill_random(&mut salt);
            match auth.admin(caller, addr, command, &salt) {
                Ok(AdminOutcome::Done { answer, deleted }) => {
                    if let Some(user) = deleted {
                        core.end_sessions_of(&user, now, out);
                    }
                    out.reply(
                        conn,
                        id,
                        &Reply::AdminOk {
                            result: answer.as_bytes(),
                        },
                    )
                }
                // (A group's master takes these in `feed`, where it can wait.)
                Ok(AdminOutcome::Replicate { .. }) => refuse(
                    out,
                    conn,
                    id,
                    ErrorCode::NotMaster,
                    b"users change through the group's master",
                ),
                Err((code, msg)) => refuse(out, conn, id, code, msg.as_bytes()),
            }
        }
        // A HELLO the core handles as before (no users, or credentials it refuses).
        _ => core.handle(batch, id, req, out),
    }
}

fn security_of(conns: &slab::Slab<ConnOut>, conn: ConnId) -> crate::tls::ConnSecurity {
    conns
        .get(conn_key(conn))
        .filter(|c| c.id == conn_base(conn))
        .map(|c| c.security.clone())
        .unwrap_or_default()
}

fn channel(s: &crate::tls::ConnSecurity) -> portswitch_auth::scram::Channel<'_> {
    match &s.exporter {
        Some(e) => portswitch_auth::scram::Channel::TlsExporter(e),
        None => portswitch_auth::scram::Channel::Plain,
    }
}

fn addr_of(conns: &slab::Slab<ConnOut>, conn: ConnId) -> std::net::IpAddr {
    conns
        .get(conn_key(conn))
        .filter(|c| c.id == conn_base(conn))
        .map_or(std::net::IpAddr::from([0, 0, 0, 0]), |c| c.addr)
}

/// A random number of milliseconds below `max`, to spread clients told to retry.
/// How much longer than a whole ceiling the leases in use must have stayed below it
/// before the ceiling comes down (the ticker's granularity, and then some).
const CEILING_QUIET_SLACK_MS: u64 = 100;

/// When a client asking for a lease above the master's ceiling should come back: a
/// raise is one Raft write (a few ms on one site, a round trip across data centres).
const RAISE_RETRY_MS: u64 = 20;

fn fastrand_ms(max: u64) -> u64 {
    let mut b = [0u8; 8];
    fill_random(&mut b);
    u64::from_le_bytes(b) % max.max(1)
}

/// Fills `buf` from the OS's randomness (nonces, salts, keys).
fn fill_random(buf: &mut [u8]) {
    // Without the OS's randomness no secret can be made; stopping is the only safe choice.
    getrandom::getrandom(buf).expect("the OS random number generator is available");
}

/// Seeds for the port hash and session secrets, from the OS.
fn random_seed() -> [u64; 3] {
    let mut bytes = [0u8; 24];
    let ok = std::fs::File::open("/dev/urandom")
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut bytes))
        .is_ok();
    if !ok {
        // No /dev/urandom: fall back to std's randomly keyed hasher.
        use std::hash::{BuildHasher, RandomState};
        for (i, chunk) in bytes.chunks_mut(8).enumerate() {
            chunk.copy_from_slice(&RandomState::new().hash_one(i).to_le_bytes());
        }
    }
    let word = |i: usize| u64::from_le_bytes(bytes[i * 8..i * 8 + 8].try_into().expect("8 bytes"));
    [word(0), word(1), word(2)]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn conn(id: ConnId) -> ConnOut {
        ConnOut {
            id,
            addr: std::net::IpAddr::from([127, 0, 0, 1]),
            security: Default::default(),
            out: FrameBuf::new(1 << 16, 64),
            notify: Arc::new(Notify::new()),
            closing: false,
            dirty: false,
            in_channel: 0,
            out_channel: 0,
            channels: Vec::new(),
            logged_in: false,
        }
    }

    #[test]
    fn channel_ids_keep_the_slot_and_generation() {
        let base: ConnId = (0xAB_CDEF << (CONN_KEY_BITS + CONN_CHANNEL_BITS)) | 0x12_3456;
        for ch in [0u16, 1, 77, u16::MAX] {
            let id = on_channel(base, ch);
            assert_eq!(conn_key(id), 0x12_3456);
            assert_eq!(conn_base(id), base);
            assert_eq!(conn_channel(id), ch);
        }
        assert_eq!(
            on_channel(base, 0),
            base,
            "channel 0 is the connection itself"
        );
    }

    #[test]
    fn a_connection_reports_every_channel_it_used() {
        let base: ConnId = (5 << (CONN_KEY_BITS + CONN_CHANNEL_BITS)) | 9;
        let mut c = conn(base);
        assert_eq!(c.ids(), vec![base]);
        for ch in [3u16, 64, 3, 4095, 65535] {
            c.mark(ch);
        }
        let chans: Vec<u16> = c.ids().iter().map(|&id| conn_channel(id)).collect();
        assert_eq!(chans, vec![0, 3, 64, 4095, 65535]);
    }

    #[test]
    fn output_switches_channel_only_when_it_changes() {
        let mut c = conn(1);
        c.select(0);
        assert!(c.out.is_empty(), "a plain connection never sees a switch");
        c.select(2);
        c.select(2);
        let one = c.out.len();
        assert_eq!(one, 4 + 9, "one frame holding one switch");
        // After dropped output the client's channel is unknown: switch again, even to 0.
        c.mark(2);
        c.replace_with_goaway(&Event::Resync);
        let mut b = BytesMut::new();
        c.out.take_into(&mut b);
        let msgs: Vec<_> = messages(&b[4..], usize::MAX)
            .map(|m| m.unwrap().opcode)
            .collect();
        assert_eq!(msgs, vec![op::CHANNEL, portswitch_proto::msg::op::RESYNC]);
    }
}
