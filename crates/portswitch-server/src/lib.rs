//! The portswitch server: sockets, timers and metrics around the sans-IO core.
//!
//! Layout:
//! - [`config`]: settings and their defaults.
//! - `conn`: one reader and one writer task per connection. The reader decodes whole
//!   frames and feeds their requests to the core under one lock per read; replies and
//!   events are encoded straight into per-connection output buffers, which the writer
//!   tasks swap out and write, so whatever piles up while a write is in flight leaves
//!   in the next one (responses and events are coalesced).
//! - `http`: Prometheus metrics at `/metrics`, liveness at `/health`.
//!
//! Memory per connection is bounded: a frame is read only after its declared length is
//! checked, and a connection whose output queue passes `send_queue_bytes_max` is sent
//! `GOAWAY slow_consumer` and closed.
//!
//! ```no_run
//! # async fn demo() -> std::io::Result<()> {
//! use portswitch_server::{Server, ServerConfig};
//! let server = Server::bind(ServerConfig::ephemeral()).await?;
//! println!("clients connect to {}", server.local_addr());
//! let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
//! let task = tokio::spawn(server.run(async { let _ = stopped.await; }));
//! stop.send(()).ok();
//! task.await.expect("server task")?;
//! # Ok(()) }
//! ```

pub mod auth;
pub mod config;
mod conn;
pub mod group;
mod http;
mod state;
pub mod tls;

pub use config::{ServerConfig, CONNECTIONS_MAX_DEFAULT, CONNECTIONS_MAX_LIMIT};
pub use state::StatsSnapshot;

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;

use crate::state::Shared;

/// A bound, not yet running server.
pub struct Server {
    listener: TcpListener,
    tls: Option<tokio_rustls::TlsAcceptor>,
    http: Option<TcpListener>,
    shared: Arc<Shared>,
}

impl Server {
    /// Binds the listeners and creates the core. Fails if the configuration is invalid
    /// or an address cannot be bound.
    pub async fn bind(cfg: ServerConfig) -> io::Result<Server> {
        cfg.core
            .validate()
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
        let tls = cfg.tls.as_ref().map(tls::acceptor).transpose()?;
        let epoch = match (cfg.epoch, &cfg.cluster) {
            (Some(e), _) => e,
            // A member's epochs come from the group; it serves nothing until elected.
            (None, Some(_)) => 1,
            (None, None) => fresh_epoch().await,
        };
        let listener = bind_clients(cfg.listen)?;
        let http = match cfg.http_listen {
            Some(addr) => Some(TcpListener::bind(addr).await?),
            None => None,
        };
        // With a data directory alone, the server is a group of one: it takes over
        // from the master that used the directory before (docs/PROTOCOL.md, "Failover and the recovery window"). With members, it
        // is one of a Raft group and serves only while elected master.
        let mut member = None;
        let group = match (&cfg.auth.data_dir, &cfg.cluster) {
            (Some(dir), None) => Some(group::GroupState::open(
                dir,
                epoch,
                cfg.core.lease_ms_max,
                cfg.lease_ceiling_start_ms,
                cfg.recovery_window_ms,
            )?),
            (None, Some(_)) => {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    "a group member needs a data directory (--data-dir) for its Raft state",
                ))
            }
            (Some(dir), Some(c)) => {
                let lock = group::lock_dir(dir)?;
                let mut c = c.clone();
                c.dir = dir.join("raft");
                c.lease_ms_max = cfg.core.lease_ms_max;
                c.recovery_window_ms = cfg.recovery_window_ms;
                let peer_addr = c
                    .members
                    .get(&c.id)
                    .map(|m| m.peer_addr.clone())
                    .ok_or_else(|| {
                        io::Error::new(
                            io::ErrorKind::InvalidInput,
                            format!("member {} is not in the member list", c.id),
                        )
                    })?;
                let peers = match c.peer_listen {
                    Some(a) => TcpListener::bind(a).await?,
                    None => TcpListener::bind(&peer_addr).await?,
                };
                let node = portswitch_cluster::ClusterNode::start(c, peers).await?;
                member = Some(state::Member::new(Arc::new(node), lock));
                None
            }
            (None, None) => None,
        };
        let epoch = group.as_ref().map_or(epoch, |g| g.epoch);
        if let Some(w) = group.as_ref().and_then(|g| g.recovery_window_ms) {
            tracing::info!(
                epoch,
                window_ms = w,
                "taking over from an earlier master: recovery window open"
            );
        }
        let shared = Arc::new(Shared::new(cfg, epoch, group, member)?);
        shared.set_self();
        Ok(Server {
            listener,
            tls,
            http,
            shared,
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.listener
            .local_addr()
            .expect("bound listener has an address")
    }

    pub fn http_addr(&self) -> Option<SocketAddr> {
        self.http
            .as_ref()
            .map(|l| l.local_addr().expect("bound listener has an address"))
    }

    pub fn epoch(&self) -> u64 {
        self.shared.epoch()
    }

    /// Serves until `shutdown` completes, then tells every client `GOAWAY
    /// shutting_down`, waits briefly for their queues to flush, and returns.
    pub async fn run(self, shutdown: impl Future<Output = ()>) -> io::Result<()> {
        let Server {
            listener,
            tls,
            http,
            shared,
        } = self;
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        let mut tasks = tokio::task::JoinSet::new();
        if let Some(http) = http {
            let shared = shared.clone();
            let mut stop = stop_rx.clone();
            tasks.spawn(async move {
                let stopped = async move {
                    let _ = stop.wait_for(|s| *s).await;
                };
                if let Err(e) = http::serve(http, shared, stopped).await {
                    tracing::warn!("http endpoint failed: {e}");
                }
            });
        }
        if let Some(mut role) = shared.role_watch() {
            // A member serves while it is master: follow its role.
            let shared = shared.clone();
            let mut stop = stop_rx.clone();
            tasks.spawn(async move {
                loop {
                    let r = role.borrow_and_update().clone();
                    shared.set_role(&r);
                    tokio::select! {
                        changed = role.changed() => if changed.is_err() { break },
                        _ = stop.wait_for(|s| *s) => break,
                    }
                }
            });
        }
        {
            let shared = shared.clone();
            let mut stop = stop_rx.clone();
            tasks.spawn(async move {
                let tick = Duration::from_millis(shared.config().tick_ms.max(1));
                let mut interval = tokio::time::interval(tick);
                interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                loop {
                    tokio::select! {
                        _ = interval.tick() => shared.tick(),
                        _ = stop.wait_for(|s| *s) => break,
                    }
                }
            });
        }
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                _ = &mut shutdown => break,
                accepted = listener.accept() => match accepted {
                    Ok((stream, peer)) => {
                        let _ = stream.set_nodelay(true);
                        match &tls {
                            None => conn::spawn(shared.clone(), stream, peer, tls::ConnSecurity::default()),
                            Some(acceptor) => {
                                let (shared, acceptor) = (shared.clone(), acceptor.clone());
                                tokio::spawn(async move {
                                    let limit = Duration::from_millis(tls::HANDSHAKE_MS_MAX);
                                    match tokio::time::timeout(limit, acceptor.accept(stream)).await {
                                        Ok(Ok(stream)) => {
                                            let security = tls::security_of(&stream);
                                            conn::spawn(shared, stream, peer, security);
                                        }
                                        Ok(Err(e)) => tracing::debug!(%peer, "TLS handshake failed: {e}"),
                                        Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
                                    }
                                });
                            }
                        }
                    }
                    Err(e) => {
                        // Out of descriptors and the like: back off instead of spinning.
                        tracing::warn!("accept failed: {e}");
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                },
            }
        }
        drop(listener);
        shared.shutdown();
        let deadline =
            tokio::time::Instant::now() + Duration::from_millis(config::SHUTDOWN_GRACE_MS);
        while shared.connections() > 0 && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let _ = stop_tx.send(true);
        while tasks.join_next().await.is_some() {}
        shared.leave_group().await;
        Ok(())
    }
}

/// Waits for a new wall-clock second to begin and returns it. Two servers started one
/// after the other on one machine thus never share an epoch (epochs keep rising even
/// without a disk: docs/PROTOCOL.md, "Groups").
async fn fresh_epoch() -> u64 {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    let next = now.as_secs() + 1;
    let wait = Duration::from_secs(next) - now;
    tokio::time::sleep(wait + Duration::from_millis(1)).await;
    next
}

/// A server running on a background task, for tests and embedding.
pub struct RunningServer {
    pub addr: SocketAddr,
    pub http_addr: Option<SocketAddr>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<io::Result<()>>,
}

impl RunningServer {
    /// Binds and starts a server on the current tokio runtime.
    pub async fn start(cfg: ServerConfig) -> io::Result<RunningServer> {
        let server = Server::bind(cfg).await?;
        let (addr, http_addr) = (server.local_addr(), server.http_addr());
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(server.run(async {
            let _ = stopped.await;
        }));
        Ok(RunningServer {
            addr,
            http_addr,
            stop: Some(stop),
            task,
        })
    }

    /// Shuts the server down gracefully and waits for it.
    pub async fn stop(mut self) -> io::Result<()> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        (&mut self.task).await.map_err(io::Error::other)?
    }
}

/// Connections the kernel may hold for the client listener before `accept` (it caps
/// this at `net.core.somaxconn`, 4,096 by default). After a failover every client of
/// the old master connects within a few milliseconds; with the usual 1,024 the queue
/// overflowed at 5,000 clients, the kernel dropped their SYNs, and they came back only
/// after TCP's 1 s, 3 s and 7 s retransmissions — sessions lost their leases waiting.
pub const LISTEN_BACKLOG: u32 = 65_535;

/// Binds the client listener with [`LISTEN_BACKLOG`].
fn bind_clients(addr: SocketAddr) -> io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(LISTEN_BACKLOG)
}
