//! One member of a group: Raft underneath, and on top the only decisions portswitch
//! makes with it — who is master, in which epoch, and whether its lease still holds.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use openraft::storage::Adaptor;
use openraft::{Config, ServerState, SnapshotPolicy};
use serde::Serialize;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::error::ClusterError;
use crate::lease::{LeaseClock, MasterLease};
use crate::net::{serve_peers, Network};
use crate::store::Store;
use crate::types::{Command, GroupFacts, Member, Raft};

/// Default interval of Raft heartbeats between members.
pub const HEARTBEAT_MS_DEFAULT: u64 = 50;
/// Default election timeout range: a follower that hears no master for this long
/// stands for election.
pub const ELECTION_TIMEOUT_MS_MIN_DEFAULT: u64 = 150;
pub const ELECTION_TIMEOUT_MS_MAX_DEFAULT: u64 = 300;
/// Default master lease: how long one quorum confirmation lets a master serve.
pub const MASTER_LEASE_MS_DEFAULT: u64 = 300;
/// Default clock-rate margin between members, per mille.
pub const DRIFT_PER_MILLE_DEFAULT: u64 = 50;
/// The longest client lease a new master grants before it raises its ceiling through
/// Raft (once, when a client first asks for more): the client library's default
/// lease. A successor's recovery window covers the ceiling, not `lease_ms_max`, so
/// after a failover names nobody reclaimed are free again ~11 s later, not 330 s.
pub const LEASE_CEILING_START_MS_DEFAULT: u32 = 10_000;

/// How often a member forming a fresh group looks for a majority of its members
/// running before it stands for the first election.
const FORM_PROBE_MS: u64 = 50;

/// How a member runs.
#[derive(Debug, Clone)]
pub struct ClusterConfig {
    pub id: u64,
    /// Every member of the group (this one included), by id.
    pub members: BTreeMap<u64, Member>,
    /// Where this member keeps its Raft state.
    pub dir: PathBuf,
    pub heartbeat_ms: u64,
    pub election_timeout_ms: (u64, u64),
    pub lease: MasterLease,
    /// The longest client lease this member grants as master.
    pub lease_ms_max: u32,
    /// The longest client lease it grants as a new master before it raises its
    /// ceiling through Raft; successors keep a recovery window as long as the ceiling.
    pub lease_ceiling_start_ms: u32,
    /// Overrides the recovery window (unsafe if shorter than the longest lease an
    /// earlier master granted).
    pub recovery_window_ms: Option<u64>,
    /// A new member joining a running group: it never forms a group itself, it waits
    /// to be added (`member_add` on the master).
    pub join: bool,
    /// Where to accept peers, when it differs from the peer address the others are
    /// told (behind NAT, a relay or a load balancer); default: that address.
    pub peer_listen: Option<std::net::SocketAddr>,
    /// Mutual TLS on peer links (every member's certificate signed by one peer CA);
    /// without it peer links are plain TCP.
    pub peer_tls: Option<crate::tls::PeerTlsSettings>,
}

/// The most voters a group may have.
pub const MEMBERS_MAX: usize = 7;

impl ClusterConfig {
    pub fn new(id: u64, members: BTreeMap<u64, Member>, dir: PathBuf, lease_ms_max: u32) -> Self {
        ClusterConfig {
            id,
            members,
            dir,
            heartbeat_ms: HEARTBEAT_MS_DEFAULT,
            election_timeout_ms: (
                ELECTION_TIMEOUT_MS_MIN_DEFAULT,
                ELECTION_TIMEOUT_MS_MAX_DEFAULT,
            ),
            lease: MasterLease {
                lease_ms: MASTER_LEASE_MS_DEFAULT,
                drift_per_mille: DRIFT_PER_MILLE_DEFAULT,
            },
            lease_ms_max,
            lease_ceiling_start_ms: LEASE_CEILING_START_MS_DEFAULT,
            recovery_window_ms: None,
            join: false,
            peer_listen: None,
            peer_tls: None,
        }
    }

    /// Checks the settings relate as they must.
    pub fn validate(&self) -> Result<(), ClusterError> {
        if !self.members.contains_key(&self.id) {
            return Err(ClusterError::NotInMemberList(self.id));
        }
        if !self.join && ![1, 3, 5].contains(&self.members.len()) {
            return Err(ClusterError::GroupSize(self.members.len()));
        }
        let (lo, hi) = self.election_timeout_ms;
        if self.heartbeat_ms == 0 || lo <= 2 * self.heartbeat_ms || hi <= lo {
            return Err(ClusterError::Timeouts {
                heartbeat_ms: self.heartbeat_ms,
                min: lo,
                max: hi,
            });
        }
        if self.lease.lease_ms <= 2 * self.heartbeat_ms {
            return Err(ClusterError::MasterLeaseTooShort {
                lease_ms: self.lease.lease_ms,
                heartbeat_ms: self.heartbeat_ms,
            });
        }
        Ok(())
    }
}

/// What a master needs to serve.
#[derive(Debug, Clone)]
pub struct MasterInfo {
    pub epoch: u64,
    pub secret_keys: [u64; 2],
    /// `Some` when an earlier master served: how long the recovery window stays open.
    pub recovery_window_ms: Option<u64>,
    /// The longest client lease it may grant until it raises it.
    pub lease_ceiling_ms: u32,
}

/// What this member is doing, as the server must act on it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Role {
    /// Not master. `master` is where clients should go, if known.
    Follower { master: Option<Member> },
    /// Elected; writing the new epoch and waiting out the previous master's lease.
    /// `serve_at` is when it expects to serve, once the epoch is written.
    TakingOver { serve_at: Option<Instant> },
    /// Serving while the lease clock says so.
    Master(MasterRole),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MasterRole {
    pub epoch: u64,
    pub secret_keys: [u64; 2],
    pub recovery_window_ms: Option<u64>,
    /// The longest client lease it may grant until it raises it
    /// ([`ClusterNode::raise_ceiling`]).
    pub lease_ceiling_ms: u32,
}

/// A running member.
pub struct ClusterNode {
    raft: Raft,
    store: Store,
    cfg: ClusterConfig,
    role: watch::Receiver<Role>,
    lease: Arc<LeaseClock>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl std::fmt::Debug for ClusterNode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClusterNode")
            .field("id", &self.cfg.id)
            .finish_non_exhaustive()
    }
}

/// A member's view of the group, for `ctl status` and `/cluster`.
#[derive(Debug, Clone, Serialize)]
pub struct ClusterStatus {
    pub id: u64,
    pub state: String,
    pub term: u64,
    pub leader: Option<u64>,
    pub members: BTreeMap<u64, Member>,
    /// The members that vote (the others are learners catching up).
    pub voters: Vec<u64>,
    pub facts: GroupFacts,
    pub lease_left_ms: u64,
    pub millis_since_quorum_ack: Option<u64>,
}

impl ClusterNode {
    /// Starts the member: opens its Raft state, answers peers on `peers`, forms the
    /// group on first start, and begins reporting its role.
    pub async fn start(cfg: ClusterConfig, peers: TcpListener) -> std::io::Result<ClusterNode> {
        cfg.validate()
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
        let tls = match &cfg.peer_tls {
            Some(s) => Some(crate::tls::PeerTls::load(s)?),
            None => None,
        };
        let store = Store::open(&cfg.dir)?;
        let raft_cfg = Config {
            cluster_name: "portswitch".into(),
            heartbeat_interval: cfg.heartbeat_ms,
            election_timeout_min: cfg.election_timeout_ms.0,
            election_timeout_max: cfg.election_timeout_ms.1,
            snapshot_policy: SnapshotPolicy::LogsSinceLast(64),
            max_in_snapshot_log_to_keep: 16,
            ..Config::default()
        }
        .validate()
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e.to_string()))?;
        let pristine = store.is_empty() && !cfg.join;
        let (log, sm) = Adaptor::new(store.clone());
        let raft = Raft::new(
            cfg.id,
            Arc::new(raft_cfg),
            Network::new(tls.clone()),
            log,
            sm,
        )
        .await
        .map_err(|e| std::io::Error::other(e.to_string()))?;
        let mut tasks = vec![tokio::spawn(serve_peers(
            peers,
            raft.clone(),
            cfg.id,
            tls.clone(),
        ))];
        if pristine {
            // Any member may form the group with the same list (safe, per openraft),
            // so none has to be started first. They take turns, lowest id first, so
            // that a fresh group does not start with competing elections (each
            // change of master would open a recovery window). Members are seldom
            // started at the same instant: the first election waits until a majority
            // answers on its peer address, since votes asked of members not yet
            // running are lost and the next try would be an election timeout later.
            let rank = cfg.members.keys().position(|&id| id == cfg.id).unwrap_or(0) as u64;
            let delay = Duration::from_millis(rank * 2 * cfg.election_timeout_ms.1);
            let (raft, members, me) = (raft.clone(), cfg.members.clone(), cfg.id);
            let tls = tls.clone();
            tasks.push(tokio::spawn(async move {
                tokio::time::sleep(delay).await;
                let mut answered = std::collections::BTreeSet::from([me]);
                loop {
                    if raft.is_initialized().await.unwrap_or(true) {
                        return;
                    }
                    for (id, m) in &members {
                        if !answered.contains(id)
                            && crate::net::peer_answers(&m.peer_addr, tls.as_ref()).await
                        {
                            answered.insert(*id);
                        }
                    }
                    if answered.len() > members.len() / 2 {
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(FORM_PROBE_MS)).await;
                }
                if let Err(e) = raft.initialize(members).await {
                    tracing::debug!(error = %e, "group already formed");
                }
            }));
        }
        let lease = Arc::new(LeaseClock::new());
        let (role_tx, role) = watch::channel(Role::Follower { master: None });
        tasks.push(tokio::spawn(run_roles(
            raft.clone(),
            cfg.clone(),
            lease.clone(),
            role_tx,
        )));
        Ok(ClusterNode {
            raft,
            store,
            cfg,
            role,
            lease,
            tasks,
        })
    }

    pub fn id(&self) -> u64 {
        self.cfg.id
    }

    /// This member's role, as it changes.
    pub fn role(&self) -> watch::Receiver<Role> {
        self.role.clone()
    }

    /// The lease clock the server must check before every effect while master.
    pub fn lease(&self) -> Arc<LeaseClock> {
        self.lease.clone()
    }

    pub fn status(&self) -> ClusterStatus {
        let m = self.raft.metrics().borrow().clone();
        ClusterStatus {
            id: self.cfg.id,
            state: format!("{:?}", m.state),
            term: m.current_term,
            leader: m.current_leader,
            members: m
                .membership_config
                .membership()
                .nodes()
                .map(|(id, n)| (*id, n.clone()))
                .collect(),
            voters: m.membership_config.membership().voter_ids().collect(),
            // Never the users' verifiers: the status is shown to operators.
            facts: GroupFacts {
                users: None,
                ..self.store.facts()
            },
            lease_left_ms: self.lease.left().as_millis() as u64,
            millis_since_quorum_ack: m.millis_since_quorum_ack,
        }
    }

    /// Adds member `id` (started with `join`) as a voter: it first catches up as a
    /// learner, then the group moves to the new membership through a joint
    /// configuration. Only the leader can do this. Sessions are untouched.
    pub async fn add_member(&self, id: u64, member: Member) -> Result<ClusterStatus, ClusterError> {
        let mut voters = self.voters();
        if voters.contains(&id) {
            return Err(ClusterError::AlreadyMember(id));
        }
        if voters.len() >= MEMBERS_MAX {
            return Err(ClusterError::TooManyMembers(MEMBERS_MAX));
        }
        self.raft
            .add_learner(id, member, true)
            .await
            .map_err(ClusterError::from_raft)?;
        voters.insert(id);
        self.raft
            .change_membership(voters, false)
            .await
            .map_err(ClusterError::from_raft)?;
        Ok(self.status())
    }

    /// Removes member `id` from the group (it may be the master: it then steps down
    /// and another takes over, and clients resume their sessions there).
    pub async fn remove_member(&self, id: u64) -> Result<ClusterStatus, ClusterError> {
        let mut voters = self.voters();
        if !voters.remove(&id) {
            return Err(ClusterError::NotAMember(id));
        }
        if voters.is_empty() {
            return Err(ClusterError::LastMember);
        }
        self.raft
            .change_membership(voters, false)
            .await
            .map_err(ClusterError::from_raft)?;
        Ok(self.status())
    }

    fn voters(&self) -> std::collections::BTreeSet<u64> {
        self.raft
            .metrics()
            .borrow()
            .membership_config
            .membership()
            .voter_ids()
            .collect()
    }

    /// Lets the master of `epoch` grant client leases up to `lease_ms` (capped by the
    /// group's `lease_ms_max`), once a quorum has recorded it: a successor's recovery
    /// window then covers them. Returns the ceiling now in force; fails if this
    /// member is not the master of `epoch` any more.
    pub async fn raise_ceiling(&self, epoch: u64, lease_ms: u32) -> Result<u32, ClusterError> {
        let r = self
            .raft
            .client_write(Command::Raise { epoch, lease_ms })
            .await
            .map_err(ClusterError::from_raft)?;
        r.data.ceiling.ok_or(ClusterError::EpochOver(epoch))
    }

    /// Lowers the ceiling of the master of `epoch` from `from` to `lease_ms` once a
    /// quorum has recorded it (see [`Command::Lower`]). Returns the ceiling now in
    /// force, or `None` if the lower did not apply (the epoch is over, or a raise got
    /// in first).
    pub async fn lower_ceiling(
        &self,
        epoch: u64,
        from: u32,
        lease_ms: u32,
    ) -> Result<Option<u32>, ClusterError> {
        let r = self
            .raft
            .client_write(Command::Lower {
                epoch,
                from,
                lease_ms,
            })
            .await
            .map_err(ClusterError::from_raft)?;
        Ok(r.data.ceiling)
    }

    /// Records that the master of `epoch` closed its recovery window, so that its
    /// successor's window need cover only the leases it granted itself.
    pub async fn settle(&self, epoch: u64) -> Result<(), ClusterError> {
        self.raft
            .client_write(Command::Settle { epoch })
            .await
            .map(|_| ())
            .map_err(ClusterError::from_raft)
    }

    /// The group's facts as this member has applied them.
    pub fn facts(&self) -> GroupFacts {
        self.store.facts()
    }

    /// Makes `store` the group's users and roles if they are still at version
    /// `expect` (see [`Command::Users`]); returns the version written. Only the leader
    /// can do this.
    pub async fn write_users(&self, expect: u64, store: String) -> Result<u64, ClusterError> {
        let r = self
            .raft
            .client_write(Command::Users { expect, store })
            .await
            .map_err(ClusterError::from_raft)?;
        r.data.users_version.ok_or(ClusterError::UsersChanged)
    }

    /// Stops Raft and the member's tasks.
    pub async fn shutdown(&self) {
        self.lease.revoke();
        for t in &self.tasks {
            t.abort();
        }
        let _ = self.raft.shutdown().await;
    }
}

fn unix_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn random_keys() -> [u64; 2] {
    // Only used if the group has no keys yet; any unpredictable value will do.
    use std::hash::{BuildHasher, RandomState};
    [
        RandomState::new().hash_one(unix_secs()),
        RandomState::new().hash_one(std::process::id()),
    ]
}

fn follower(raft: &Raft) -> Role {
    let m = raft.metrics().borrow().clone();
    let master = m
        .current_leader
        .and_then(|id| m.membership_config.membership().get_node(&id).cloned());
    Role::Follower { master }
}

/// Follows Raft's state and turns it into roles: a leader takes over (writes the
/// epoch, waits out the previous lease, confirms a quorum) and then keeps its lease
/// fresh; anything else is a follower with a hint.
async fn run_roles(
    raft: Raft,
    cfg: ClusterConfig,
    lease: Arc<LeaseClock>,
    tx: watch::Sender<Role>,
) {
    let mut metrics = raft.metrics();
    loop {
        let leading = metrics.borrow_and_update().state == ServerState::Leader;
        if !leading {
            lease.revoke();
            let r = follower(&raft);
            tx.send_if_modified(|cur| {
                if *cur != r {
                    *cur = r;
                    true
                } else {
                    false
                }
            });
            if metrics.changed().await.is_err() {
                return;
            }
            continue;
        }
        lease.revoke();
        let elected_at = Instant::now();
        let _ = tx.send(Role::TakingOver { serve_at: None });
        match take_over(&raft, &cfg, &lease, elected_at, &tx).await {
            Ok(info) => {
                tracing::info!(epoch = info.epoch, "serving as master");
                let _ = tx.send(Role::Master(MasterRole {
                    epoch: info.epoch,
                    secret_keys: info.secret_keys,
                    recovery_window_ms: info.recovery_window_ms,
                    lease_ceiling_ms: info.lease_ceiling_ms,
                }));
                keep_lease(&raft, &cfg, &lease, &mut metrics).await;
                lease.revoke();
                tracing::warn!("no longer master: stopped serving");
            }
            Err(e) => {
                lease.revoke();
                tracing::warn!(error = %e, "could not take over as master");
                tokio::time::sleep(Duration::from_millis(cfg.heartbeat_ms)).await;
            }
        }
        let _ = tx.send(follower(&raft));
    }
}

async fn take_over(
    raft: &Raft,
    cfg: &ClusterConfig,
    lease: &LeaseClock,
    elected_at: Instant,
    tx: &watch::Sender<Role>,
) -> Result<MasterInfo, String> {
    let cmd = Command::Master {
        node: cfg.id,
        epoch_floor: unix_secs(),
        keys: random_keys(),
        lease_ms_max: cfg.lease_ms_max,
        master_lease_ms: cfg.lease.lease_ms,
        lease_ms_start: Some(cfg.lease_ceiling_start_ms.min(cfg.lease_ms_max)),
    };
    let grant = raft
        .client_write(cmd)
        .await
        .map_err(|e| e.to_string())?
        .data
        .grant
        .ok_or("the state machine did not answer the master command")?;
    // Wait out the previous master's lease (ours too, if it was us: conservative).
    let previous_lease = grant.previous.map_or(0, |(_, l)| l);
    let wait = cfg.lease.wait_out(previous_lease);
    let serve_at = elected_at + Duration::from_millis(wait);
    // Clients asking meanwhile are told when to come back.
    let _ = tx.send(Role::TakingOver {
        serve_at: Some(serve_at),
    });
    tokio::time::sleep_until(serve_at.into()).await;
    // A check can fail for want of a connection (openraft makes a fresh link per
    // check, and across data centres setting one up takes longer than a heartbeat);
    // the connection is then ready for the next check. Try on for one master lease
    // while still leader, rather than give up the election.
    let give_up = Instant::now() + Duration::from_millis(cfg.lease.lease_ms);
    loop {
        match confirm(raft, cfg, lease).await {
            Ok(()) => break,
            Err(e) => {
                let leader = raft.metrics().borrow().state == ServerState::Leader;
                if !leader || Instant::now() >= give_up {
                    return Err(e);
                }
                tracing::debug!(error = %e, "leadership check failed; trying again");
                tokio::time::sleep(Duration::from_millis((cfg.heartbeat_ms / 2).max(1))).await;
            }
        }
    }
    let recovery_window_ms = grant.previous.map(|(owed_ms, _)| {
        cfg.recovery_window_ms
            .unwrap_or_else(|| cfg.lease.recovery_window(owed_ms as u64))
    });
    Ok(MasterInfo {
        epoch: grant.epoch,
        secret_keys: grant.secret_keys,
        recovery_window_ms,
        lease_ceiling_ms: grant.lease_ceiling_ms,
    })
}

/// Confirms leadership with a quorum and extends the lease from the time of asking.
async fn confirm(raft: &Raft, cfg: &ClusterConfig, lease: &LeaseClock) -> Result<(), String> {
    let sent = lease.now_ms();
    match tokio::time::timeout(
        Duration::from_millis(cfg.lease.lease_ms),
        raft.get_read_log_id(),
    )
    .await
    {
        Ok(Ok(_)) => {
            lease.extend_to(cfg.lease.serve_until(sent));
            Ok(())
        }
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err("no quorum within the master lease".into()),
    }
}

/// Renews the lease a few times per lease period; returns when this member is no
/// longer leader or its lease ran out.
async fn keep_lease(
    raft: &Raft,
    cfg: &ClusterConfig,
    lease: &LeaseClock,
    metrics: &mut watch::Receiver<openraft::RaftMetrics<u64, Member>>,
) {
    let every = Duration::from_millis((cfg.lease.lease_ms / 4).max(1));
    loop {
        if metrics.borrow_and_update().state != ServerState::Leader {
            return;
        }
        if let Err(e) = confirm(raft, cfg, lease).await {
            tracing::debug!(error = %e, "lease renewal failed");
        }
        if !lease.valid() {
            return;
        }
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            r = metrics.changed() => if r.is_err() { return },
        }
    }
}
