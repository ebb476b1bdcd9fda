//! Raft messages between members over TCP, with mutual TLS when the group has peer
//! certificates ([`crate::tls`]): each message is a `u32` big-endian length and a JSON
//! body, one request then one response on a connection, one connection per (member,
//! target) kept open between calls. Traffic is heartbeats and the rare entry, so
//! JSON's cost does not matter and its readability in a packet capture does.
//!
//! Each call's I/O runs to completion in a task of its own (see `PeerLink::call`):
//! openraft cancels calls that overrun the heartbeat interval, and cancelling I/O
//! halfway would leave connections out of step or never let a slow link come up.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use openraft::error::{
    InstallSnapshotError, NetworkError, RPCError, RaftError, RemoteError, Unreachable,
};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use serde::{de::DeserializeOwned, Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::tls::PeerTls;
use crate::types::{Member, Raft, TypeConfig};

/// Largest peer message accepted (a snapshot of the group's facts is a few hundred
/// bytes; this bounds what a confused or hostile peer can make a member allocate).
pub const PEER_FRAME_BYTES_MAX: usize = 16 << 20;
/// How long a member waits to set up a connection to a peer (TCP and TLS), and a
/// member accepting one waits for the TLS handshake.
pub const PEER_CONNECT_MS: u64 = 1_000;
/// The longest one call's I/O may take, set-up included, whether or not openraft
/// still waits for it (it gives up after a heartbeat interval).
pub const PEER_IO_MS: u64 = 2_000;
/// How often a member retries a peer it cannot reach.
pub const PEER_RETRY_MS: u64 = 50;
/// How long a member tries to reach the master's peer address after a connection that
/// carried its heartbeats closed (see [`master_link_closed`]).
pub const CRASH_PROBE_MS: u64 = 200;
/// How long after the other survivors the one meant to win stands for election when
/// the master's process is gone (see [`master_link_closed`]).
pub const CRASH_ELECT_STAGGER_MS: u64 = 20;
/// How long a probe connection must stay open and quiet for the master to count as
/// alive, and how many probes one closed connection may take.
const CRASH_LINGER_MS: u64 = 30;
/// After standing for election over a crashed master, how long (at random, between
/// this and twice this, and at least two heartbeat intervals) a survivor waits for a
/// new master before it stands again, and how many times it does before leaving the
/// rest to the election timeouts.
pub const CRASH_ELECT_RETRY_MS: u64 = 100;
const CRASH_ELECT_RETRIES_MAX: usize = 10;
const CRASH_PROBES_MAX: usize = 4;

#[derive(Debug, Serialize, Deserialize)]
struct Envelope<T> {
    /// The member the sender means to reach: a member refuses messages for another.
    to: u64,
    body: T,
}

#[derive(Debug, Serialize, Deserialize)]
enum PeerRequest {
    Append(AppendEntriesRequest<TypeConfig>),
    Vote(VoteRequest<u64>),
    Snapshot(InstallSnapshotRequest<TypeConfig>),
}

#[derive(Debug, Serialize, Deserialize)]
enum PeerResponse {
    Append(Result<AppendEntriesResponse<u64>, RaftError<u64>>),
    Vote(Result<VoteResponse<u64>, RaftError<u64>>),
    Snapshot(Result<InstallSnapshotResponse<u64>, RaftError<u64, InstallSnapshotError>>),
    /// The message was for another member (the address now belongs to someone else).
    WrongMember {
        id: u64,
    },
}

/// A connection to or from a peer: plain TCP or TLS over it.
pub(crate) trait PeerIo: AsyncRead + AsyncWrite + Unpin + Send + Sync {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send + Sync> PeerIo for T {}
type PeerStream = Box<dyn PeerIo>;

async fn write_msg<T: Serialize, S: AsyncWrite + Unpin + ?Sized>(
    s: &mut S,
    msg: &T,
) -> std::io::Result<()> {
    let body = serde_json::to_vec(msg).map_err(std::io::Error::other)?;
    if body.len() > PEER_FRAME_BYTES_MAX {
        return Err(std::io::Error::other(
            "peer message over PEER_FRAME_BYTES_MAX",
        ));
    }
    let mut buf = Vec::with_capacity(4 + body.len());
    buf.extend_from_slice(&(body.len() as u32).to_be_bytes());
    buf.extend_from_slice(&body);
    s.write_all(&buf).await
}

async fn read_msg<T: DeserializeOwned, S: AsyncRead + Unpin + ?Sized>(
    s: &mut S,
) -> std::io::Result<T> {
    let mut len = [0u8; 4];
    s.read_exact(&mut len).await?;
    let len = u32::from_be_bytes(len) as usize;
    if len > PEER_FRAME_BYTES_MAX {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("peer message of {len} bytes is over PEER_FRAME_BYTES_MAX"),
        ));
    }
    let mut body = vec![0u8; len];
    s.read_exact(&mut body).await?;
    serde_json::from_slice(&body)
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))
}

/// Idle connections to peers, by (target, address), so that a link made for one
/// call (openraft makes one per leadership check) does not cost a TCP handshake.
type Pool = Arc<Mutex<HashMap<(u64, String), Vec<PeerStream>>>>;
/// Idle connections kept per target.
const POOL_PER_TARGET_MAX: usize = 4;

async fn exchange(
    s: &mut PeerStream,
    msg: &Envelope<PeerRequest>,
) -> std::io::Result<PeerResponse> {
    write_msg(s, msg).await?;
    read_msg(s).await
}

/// A new connection to a peer: TCP, then TLS if the group uses it, within
/// [`PEER_CONNECT_MS`].
async fn connect(addr: &str, tls: Option<&PeerTls>) -> std::io::Result<PeerStream> {
    let setup = async {
        let s = TcpStream::connect(addr).await?;
        s.set_nodelay(true)?;
        Ok::<_, std::io::Error>(match tls {
            None => Box::new(s) as PeerStream,
            Some(tls) => {
                let name = crate::tls::server_name(addr)?;
                Box::new(tls.connector.connect(name, s).await?)
            }
        })
    };
    tokio::time::timeout(Duration::from_millis(PEER_CONNECT_MS), setup)
        .await
        .unwrap_or_else(|_| Err(std::io::Error::from(std::io::ErrorKind::TimedOut)))
}

/// Whether a member answers on its peer address (TCP, and TLS if the group uses it)
/// within [`PEER_CONNECT_MS`].
pub(crate) async fn peer_answers(addr: &str, tls: Option<&PeerTls>) -> bool {
    connect(addr, tls).await.is_ok()
}

/// Makes links to targets, reusing idle connections.
#[derive(Clone, Default)]
pub struct Network {
    pool: Pool,
    tls: Option<PeerTls>,
}

impl std::fmt::Debug for Network {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Network")
            .field("tls", &self.tls.is_some())
            .finish()
    }
}

impl Network {
    /// Links over TLS with `tls`, or plain TCP without.
    pub fn new(tls: Option<PeerTls>) -> Network {
        Network {
            pool: Pool::default(),
            tls,
        }
    }
}

impl RaftNetworkFactory<TypeConfig> for Network {
    type Network = PeerLink;

    async fn new_client(&mut self, target: u64, node: &Member) -> PeerLink {
        PeerLink {
            target,
            addr: node.peer_addr.clone(),
            stream: None,
            pool: self.pool.clone(),
            tls: self.tls.clone(),
        }
    }
}

/// The link from this member to one target.
pub struct PeerLink {
    target: u64,
    addr: String,
    stream: Option<PeerStream>,
    pool: Pool,
    tls: Option<PeerTls>,
}

impl std::fmt::Debug for PeerLink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PeerLink")
            .field("target", &self.target)
            .field("addr", &self.addr)
            .field("connected", &self.stream.is_some())
            .field("tls", &self.tls.is_some())
            .finish()
    }
}

impl Drop for PeerLink {
    fn drop(&mut self) {
        // Only connections that finished their last call in step come back here.
        if let Some(s) = self.stream.take() {
            let mut pool = self.pool.lock().unwrap_or_else(|p| p.into_inner());
            let idle = pool.entry((self.target, self.addr.clone())).or_default();
            if idle.len() < POOL_PER_TARGET_MAX {
                idle.push(s);
            }
        }
    }
}

type RpcErr<E = RaftError<u64>> = RPCError<u64, Member, E>;

impl PeerLink {
    /// Sends `req` and reads its answer. The I/O runs in a task of its own that always
    /// finishes its exchange (within [`PEER_IO_MS`]): openraft cancels calls that
    /// overrun the heartbeat interval, and a connection abandoned halfway would be out
    /// of step — the next call would read this call's late answer as its own — while
    /// one set up for a cancelled call would be lost, so that a link whose set-up takes
    /// longer than a heartbeat (two or three round trips across data centres) would
    /// never come up. A connection whose call was cancelled goes to the pool, in step.
    async fn call(
        &mut self,
        req: PeerRequest,
        _ttl: Duration,
    ) -> Result<PeerResponse, std::io::Error> {
        let target = self.target;
        let msg = Envelope {
            to: target,
            body: req,
        };
        let held = self.stream.take();
        let (addr, tls, pool) = (self.addr.clone(), self.tls.clone(), self.pool.clone());
        let (tx, rx) = tokio::sync::oneshot::channel();
        tokio::spawn(async move {
            let key = (target, addr.clone());
            let work = async {
                let idle = match held {
                    Some(s) => Some(s),
                    None => pool
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .get_mut(&key)
                        .and_then(|v| v.pop()),
                };
                if let Some(mut s) = idle {
                    // An idle connection may have died with its peer: one try, then a
                    // fresh connection (Raft messages are safe to repeat).
                    match exchange(&mut s, &msg).await {
                        Ok(r) => return Ok((r, s)),
                        Err(e) => tracing::debug!(error = %e, "idle peer connection was dead"),
                    }
                }
                let mut s = connect(&addr, tls.as_ref()).await?;
                let r = exchange(&mut s, &msg).await?;
                Ok::<_, std::io::Error>((r, s))
            };
            let r = tokio::time::timeout(Duration::from_millis(PEER_IO_MS), work)
                .await
                .unwrap_or_else(|_| Err(std::io::Error::from(std::io::ErrorKind::TimedOut)));
            if let Err(Ok((_, s))) = tx.send(r) {
                // The call gave up meanwhile: the connection is in step; keep it.
                let mut pool = pool.lock().unwrap_or_else(|p| p.into_inner());
                let idle = pool.entry(key).or_default();
                if idle.len() < POOL_PER_TARGET_MAX {
                    idle.push(s);
                }
            }
        });
        let (r, s) = rx
            .await
            .unwrap_or_else(|_| Err(std::io::Error::other("peer call task ended")))?;
        self.stream = Some(s);
        Ok(r)
    }

    fn unreachable<E: std::error::Error>(e: std::io::Error) -> RpcErr<E> {
        match e.kind() {
            std::io::ErrorKind::ConnectionRefused | std::io::ErrorKind::TimedOut => {
                RPCError::Unreachable(Unreachable::new(&e))
            }
            _ => RPCError::Network(NetworkError::new(&e)),
        }
    }

    fn wrong_member<E: std::error::Error>(&self, id: u64) -> RpcErr<E> {
        let e = std::io::Error::other(format!(
            "{} is member {id}, not member {}",
            self.addr, self.target
        ));
        RPCError::Unreachable(Unreachable::new(&e))
    }
}

impl RaftNetwork<TypeConfig> for PeerLink {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<u64>, RpcErr> {
        match self.call(PeerRequest::Append(rpc), option.hard_ttl()).await {
            Ok(PeerResponse::Append(Ok(r))) => Ok(r),
            Ok(PeerResponse::Append(Err(e))) => {
                Err(RPCError::RemoteError(RemoteError::new(self.target, e)))
            }
            Ok(PeerResponse::WrongMember { id }) => Err(self.wrong_member(id)),
            Ok(_) => Err(Self::unreachable(std::io::Error::other(
                "mismatched response",
            ))),
            Err(e) => Err(Self::unreachable(e)),
        }
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<InstallSnapshotResponse<u64>, RpcErr<RaftError<u64, InstallSnapshotError>>> {
        match self
            .call(PeerRequest::Snapshot(rpc), option.hard_ttl())
            .await
        {
            Ok(PeerResponse::Snapshot(Ok(r))) => Ok(r),
            Ok(PeerResponse::Snapshot(Err(e))) => {
                Err(RPCError::RemoteError(RemoteError::new(self.target, e)))
            }
            Ok(PeerResponse::WrongMember { id }) => Err(self.wrong_member(id)),
            Ok(_) => Err(Self::unreachable(std::io::Error::other(
                "mismatched response",
            ))),
            Err(e) => Err(Self::unreachable(e)),
        }
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<u64>,
        option: RPCOption,
    ) -> Result<VoteResponse<u64>, RpcErr> {
        match self.call(PeerRequest::Vote(rpc), option.hard_ttl()).await {
            Ok(PeerResponse::Vote(Ok(r))) => Ok(r),
            Ok(PeerResponse::Vote(Err(e))) => {
                Err(RPCError::RemoteError(RemoteError::new(self.target, e)))
            }
            Ok(PeerResponse::WrongMember { id }) => Err(self.wrong_member(id)),
            Ok(_) => Err(Self::unreachable(std::io::Error::other(
                "mismatched response",
            ))),
            Err(e) => Err(Self::unreachable(e)),
        }
    }

    /// How long to wait before trying an unreachable member again. openraft's 500 ms
    /// default let a restarted member go without heartbeats long enough to stand for
    /// election and depose a healthy master; a refused connection is cheap to retry.
    fn backoff(&self) -> openraft::network::Backoff {
        openraft::network::Backoff::new(std::iter::repeat(Duration::from_millis(PEER_RETRY_MS)))
    }
}

/// Answers peers' Raft messages until the listener fails; with `tls`, only from peers
/// whose certificate the peer CA signed.
pub async fn serve_peers(listener: TcpListener, raft: Raft, me: u64, tls: Option<PeerTls>) {
    let crashes = CrashWatch::default();
    loop {
        let (stream, addr) = match listener.accept().await {
            Ok(x) => x,
            Err(e) => {
                tracing::warn!(error = %e, "peer accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let (raft, tls, crashes) = (raft.clone(), tls.clone(), crashes.clone());
        tokio::spawn(async move {
            let _ = stream.set_nodelay(true);
            let s: PeerStream = match tls {
                None => Box::new(stream),
                Some(tls) => {
                    let handshake = tokio::time::timeout(
                        Duration::from_millis(PEER_CONNECT_MS),
                        tls.acceptor.accept(stream),
                    );
                    match handshake.await {
                        Ok(Ok(s)) => Box::new(s),
                        Ok(Err(e)) => {
                            tracing::warn!(%addr, error = %e, "peer TLS handshake failed");
                            return;
                        }
                        Err(_) => {
                            tracing::warn!(%addr, "peer TLS handshake timed out");
                            return;
                        }
                    }
                }
            };
            serve_peer(s, addr, raft, me, crashes).await
        });
    }
}

/// What a member knows of probing a master whose connection closed.
#[derive(Debug, Default)]
struct CrashState {
    /// The (master, term) whose crash this member has acted on.
    acted: Option<(u64, u64)>,
    probing: bool,
    /// Another connection closed while a probe ran.
    again: bool,
    /// When a candidate whose log is ahead of this member's last asked for its vote.
    longer_log_asked: Option<Instant>,
}
type CrashWatch = Arc<Mutex<CrashState>>;

async fn serve_peer(mut s: PeerStream, addr: SocketAddr, raft: Raft, me: u64, crashes: CrashWatch) {
    // The master whose heartbeats this connection carried last, and its term.
    let mut from_master: Option<(u64, u64)> = None;
    loop {
        let msg: Envelope<PeerRequest> = match read_msg(&mut s).await {
            Ok(m) => m,
            Err(e) => {
                if e.kind() != std::io::ErrorKind::UnexpectedEof {
                    tracing::debug!(%addr, error = %e, "peer connection closed");
                }
                if let Some((master, term)) = from_master {
                    tokio::spawn(master_link_closed(raft, me, master, term, crashes));
                }
                return;
            }
        };
        let resp = if msg.to != me {
            PeerResponse::WrongMember { id: me }
        } else {
            match msg.body {
                PeerRequest::Append(r) => {
                    let v = r.vote;
                    from_master = v
                        .leader_id()
                        .voted_for()
                        .filter(|_| v.is_committed())
                        .map(|id| (id, v.leader_id().get_term()));
                    PeerResponse::Append(raft.append_entries(r).await)
                }
                PeerRequest::Vote(r) => {
                    let theirs = r.last_log_id;
                    let resp = raft.vote(r).await;
                    if matches!(&resp, Ok(v) if theirs > v.last_log_id) {
                        let mut w = crashes.lock().unwrap_or_else(|p| p.into_inner());
                        w.longer_log_asked = Some(Instant::now());
                    }
                    PeerResponse::Vote(resp)
                }
                PeerRequest::Snapshot(r) => PeerResponse::Snapshot(raft.install_snapshot(r).await),
            }
        };
        if write_msg(&mut s, &resp).await.is_err() {
            return;
        }
    }
}

/// A connection that carried the master's heartbeats closed. If the master's peer
/// address now refuses connections, its process is gone (killed, crashed or shut
/// down), and waiting for silence to prove it costs openraft's leader lease plus an
/// election timeout (450–600 ms with the defaults). So the survivors elect at once:
/// each but the one meant to win (the highest id) stands for election, which ends the
/// leader lease for which they would refuse anyone their vote; the one meant to win
/// stands [`CRASH_ELECT_STAGGER_MS`] later, in a higher term, and gets their votes.
///
/// Only liveness depends on this: an election is always safe in Raft, and the new
/// master still waits out the old master's lease before serving. A master that is
/// merely silent (stopped, cut off, behind a relay) is left to the timeouts; a
/// connection closed for any other reason (a master drops surplus idle connections
/// all the time) finds the master's address answering and changes nothing. Closes
/// that arrive while a probe runs are folded into one more probe after it.
async fn master_link_closed(raft: Raft, me: u64, master: u64, term: u64, watch: CrashWatch) {
    {
        let mut w = watch.lock().unwrap_or_else(|p| p.into_inner());
        if w.acted == Some((master, term)) {
            return;
        }
        if w.probing {
            w.again = true;
            return;
        }
        w.probing = true;
    }
    let winner = loop {
        let winner = master_gone(&raft, me, master, term).await;
        let mut w = watch.lock().unwrap_or_else(|p| p.into_inner());
        if winner.is_none() && w.again {
            w.again = false;
            continue;
        }
        w.probing = false;
        w.again = false;
        if winner.is_some() {
            w.acted = Some((master, term));
        }
        break winner;
    };
    let Some(winner) = winner else { return };
    if me == winner {
        tokio::time::sleep(Duration::from_millis(CRASH_ELECT_STAGGER_MS)).await;
    }
    if !still_following(&raft.metrics().borrow(), master, term) {
        return;
    }
    tracing::info!(
        master,
        term,
        "the master's peer address refuses connections: standing for election now"
    );
    let _ = raft.trigger().elect().await;
    // That election can fail: the one meant to win may lack entries another survivor
    // has (it joined or restarted just before the crash), and a voter that heard the
    // master moments ago refuses anyone its vote for its leader lease. Once every
    // survivor has stood, no lease holds any vote, so a survivor that sees no master
    // soon stands again, at a random moment (a short election timeout for a crash
    // known for certain), unless a candidate with a longer log asked for its vote
    // lately: that one can win, and competing with it would only delay it.
    let wait = CRASH_ELECT_RETRY_MS.max(2 * raft.config().heartbeat_interval);
    for _ in 0..CRASH_ELECT_RETRIES_MAX {
        let ms = fastrand::u64(wait..2 * wait);
        tokio::time::sleep(Duration::from_millis(ms)).await;
        let settled = {
            let m = raft.metrics();
            let m = m.borrow();
            m.current_leader.is_some() || m.state == openraft::ServerState::Learner
        };
        if settled {
            return;
        }
        let deferred = {
            let w = watch.lock().unwrap_or_else(|p| p.into_inner());
            w.longer_log_asked
                .is_some_and(|t| t.elapsed() < Duration::from_millis(2 * wait))
        };
        if deferred {
            continue;
        }
        tracing::info!(master, "no master yet after the crash: standing again");
        let _ = raft.trigger().elect().await;
    }
}

fn still_following(m: &openraft::RaftMetrics<u64, Member>, master: u64, term: u64) -> bool {
    m.current_leader == Some(master)
        && m.current_term == term
        && m.state == openraft::ServerState::Follower
}

/// Whether `master` (of `term`, still followed by this member) is gone: its peer
/// address refuses connections. Returns the survivor meant to win the election.
async fn master_gone(raft: &Raft, me: u64, master: u64, term: u64) -> Option<u64> {
    let (addr, winner) = {
        let m = raft.metrics().borrow().clone();
        if !still_following(&m, master, term) {
            return None;
        }
        let members = m.membership_config.membership();
        let survivors: Vec<u64> = members.voter_ids().filter(|&id| id != master).collect();
        match (members.get_node(&master), survivors.iter().max()) {
            (Some(n), Some(&w)) if survivors.contains(&me) => (n.peer_addr.clone(), w),
            _ => return None,
        }
    };
    peer_process_gone(&addr).await.then_some(winner)
}

/// Whether the process that listened on `addr` is gone: the address refuses
/// connections (a reset or a connection reset at once is asked again). Silence
/// (a stopped or cut-off process) and a quiet open connection are not "gone".
async fn peer_process_gone(addr: &str) -> bool {
    for _ in 0..CRASH_PROBES_MAX {
        let connect = tokio::time::timeout(
            Duration::from_millis(CRASH_PROBE_MS),
            TcpStream::connect(addr),
        );
        match connect.await {
            // Silent: cut off or stopped, not gone; the timeouts decide.
            Err(_) => return false,
            Ok(Err(e)) if e.kind() == std::io::ErrorKind::ConnectionRefused => return true,
            // Reset: a listener closing under us; ask again.
            Ok(Err(_)) => {}
            Ok(Ok(mut s)) => {
                // A process being torn down closes its peer connections before its
                // listener, which may still take us into its backlog and then reset
                // us. A live member waits quietly for a request.
                let mut b = [0u8; 1];
                let quiet =
                    tokio::time::timeout(Duration::from_millis(CRASH_LINGER_MS), s.read(&mut b));
                match quiet.await {
                    Err(_) | Ok(Ok(1..)) => return false,
                    Ok(Ok(0)) | Ok(Err(_)) => {}
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_closed_address_is_gone_and_a_listening_one_is_not() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap().to_string();
        // Listening but never accepting: the connection waits in the backlog, quiet.
        assert!(!peer_process_gone(&addr).await);
        drop(l);
        assert!(peer_process_gone(&addr).await);
    }

    #[tokio::test]
    async fn a_listener_that_hangs_up_on_everyone_is_not_gone() {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap().to_string();
        let hang_up = tokio::spawn(async move {
            loop {
                let (s, _) = l.accept().await.unwrap();
                drop(s);
            }
        });
        assert!(!peer_process_gone(&addr).await);
        hang_up.abort();
    }
}
