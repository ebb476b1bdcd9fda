//! Raft messages between members over TCP: each message is a `u32` big-endian length
//! and a JSON body, one request then one response on a connection, one connection per
//! (member, target) kept open between calls. Traffic is heartbeats and the rare entry,
//! so JSON's cost does not matter and its readability in a packet capture does.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use openraft::error::{
    InstallSnapshotError, NetworkError, RPCError, RaftError, RemoteError, Unreachable,
};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use serde::{de::DeserializeOwned, Deserialize, Serialize};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::types::{Member, Raft, TypeConfig};

/// Largest peer message accepted (a snapshot of the group's facts is a few hundred
/// bytes; this bounds what a confused or hostile peer can make a member allocate).
pub const PEER_FRAME_BYTES_MAX: usize = 16 << 20;
/// How long a member waits to connect to a peer.
pub const PEER_CONNECT_MS: u64 = 500;
/// How often a member retries a peer it cannot reach.
pub const PEER_RETRY_MS: u64 = 50;

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

async fn write_msg<T: Serialize>(s: &mut TcpStream, msg: &T) -> std::io::Result<()> {
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

async fn read_msg<T: DeserializeOwned>(s: &mut TcpStream) -> std::io::Result<T> {
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
type Pool = Arc<Mutex<HashMap<(u64, String), Vec<TcpStream>>>>;
/// Idle connections kept per target.
const POOL_PER_TARGET_MAX: usize = 4;

async fn exchange(s: &mut TcpStream, msg: &Envelope<PeerRequest>) -> std::io::Result<PeerResponse> {
    write_msg(s, msg).await?;
    read_msg(s).await
}

/// Makes links to targets, reusing idle connections.
#[derive(Debug, Clone, Default)]
pub struct Network {
    pool: Pool,
}

impl RaftNetworkFactory<TypeConfig> for Network {
    type Network = PeerLink;

    async fn new_client(&mut self, target: u64, node: &Member) -> PeerLink {
        PeerLink {
            target,
            addr: node.peer_addr.clone(),
            stream: None,
            pool: self.pool.clone(),
        }
    }
}

/// The link from this member to one target.
#[derive(Debug)]
pub struct PeerLink {
    target: u64,
    addr: String,
    stream: Option<TcpStream>,
    pool: Pool,
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
    async fn call(
        &mut self,
        req: PeerRequest,
        ttl: Duration,
    ) -> Result<PeerResponse, std::io::Error> {
        let target = self.target;
        let msg = Envelope {
            to: target,
            body: req,
        };
        let attempt = async {
            if self.stream.is_none() {
                let idle = self
                    .pool
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .get_mut(&(target, self.addr.clone()))
                    .and_then(|v| v.pop());
                if let Some(mut s) = idle {
                    // An idle connection may have died with its peer: one try, then a
                    // fresh connection (Raft messages are safe to repeat).
                    match exchange(&mut s, &msg).await {
                        Ok(r) => {
                            self.stream = Some(s);
                            return Ok(r);
                        }
                        Err(e) => tracing::debug!(error = %e, "idle peer connection was dead"),
                    }
                }
            }
            if self.stream.is_none() {
                let s = tokio::time::timeout(
                    Duration::from_millis(PEER_CONNECT_MS),
                    TcpStream::connect(&self.addr),
                )
                .await
                .map_err(|_| std::io::Error::from(std::io::ErrorKind::TimedOut))??;
                s.set_nodelay(true)?;
                self.stream = Some(s);
            }
            let s = self.stream.as_mut().expect("connected above");
            exchange(s, &msg).await
        };
        let r = match tokio::time::timeout(ttl, attempt).await {
            Ok(r) => r,
            Err(_) => Err(std::io::Error::from(std::io::ErrorKind::TimedOut)),
        };
        if r.is_err() {
            // A half-used connection cannot be trusted to be in step: start afresh.
            self.stream = None;
        }
        r
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

/// Answers peers' Raft messages until the listener fails.
pub async fn serve_peers(listener: TcpListener, raft: Raft, me: u64) {
    loop {
        let (stream, addr) = match listener.accept().await {
            Ok(x) => x,
            Err(e) => {
                tracing::warn!(error = %e, "peer accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        tokio::spawn(serve_peer(stream, addr, raft.clone(), me));
    }
}

async fn serve_peer(mut s: TcpStream, addr: SocketAddr, raft: Raft, me: u64) {
    let _ = s.set_nodelay(true);
    loop {
        let msg: Envelope<PeerRequest> = match read_msg(&mut s).await {
            Ok(m) => m,
            Err(e) => {
                if e.kind() != std::io::ErrorKind::UnexpectedEof {
                    tracing::debug!(%addr, error = %e, "peer connection closed");
                }
                return;
            }
        };
        let resp = if msg.to != me {
            PeerResponse::WrongMember { id: me }
        } else {
            match msg.body {
                PeerRequest::Append(r) => PeerResponse::Append(raft.append_entries(r).await),
                PeerRequest::Vote(r) => PeerResponse::Vote(raft.vote(r).await),
                PeerRequest::Snapshot(r) => PeerResponse::Snapshot(raft.install_snapshot(r).await),
            }
        };
        if write_msg(&mut s, &resp).await.is_err() {
            return;
        }
    }
}
