//! The tunnel client: keeps a pool of connections to one server (one session), carries
//! local forwards (`-L`) and a SOCKS5 listener through it, redials lost connections,
//! and with a port switch finds live servers and moves to another when one dies.
//!
//! With a port switch the client watches `tunnel/<name>/`: when the port of the
//! server in use is released (the server stopped, or its port-switch session ended)
//! the client lists the live servers again and, if its server is no longer among
//! them, moves to another at once, without waiting for dials to fail.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Notify};

use crate::error::{Result, TunnelError};
use crate::frame::CompressPolicy;
use crate::handshake::{ClientHello, ClientInfo, Keys, Psk, SERVER_HEADER_WIRE_BYTES};
use crate::limits::{
    HANDSHAKE_TIMEOUT_MS, POOL_CONNECTIONS_DEFAULT, POOL_CONNECTIONS_MAX, REDIAL_BACKOFF_MS_MAX,
    REDIAL_BACKOFF_MS_MIN, SESSION_ORPHAN_GRACE_MS,
};
use crate::metrics::Metrics;
use crate::mux::Role;
use crate::session::{Session, SessionConfig};

/// The port-switch prefix under which servers of tunnel `name` register.
pub fn switch_prefix(name: &str) -> String {
    format!("tunnel/{name}/")
}

/// How the client finds its server.
#[derive(Debug, Clone)]
pub enum ServerSource {
    /// These addresses, tried in turn.
    Direct(Vec<String>),
    /// The live servers of tunnel `name` in the port switch at `switch`.
    Switch { switch: String, name: String },
}

#[derive(Debug, Clone)]
pub struct ClientConfig {
    pub psk: Psk,
    pub source: ServerSource,
    /// Pool connections per session.
    pub pool: usize,
    pub session: SessionConfig,
    pub handshake_timeout: Duration,
    /// Consecutive failed dials, with no connection up, after which the server counts
    /// as dead and the client moves to another (when it knows of one).
    pub failover_after_failures: u32,
}

impl ClientConfig {
    pub fn new(psk: Psk, source: ServerSource) -> ClientConfig {
        ClientConfig {
            psk,
            source,
            pool: POOL_CONNECTIONS_DEFAULT,
            session: SessionConfig::default(),
            handshake_timeout: Duration::from_millis(HANDSHAKE_TIMEOUT_MS),
            failover_after_failures: 3,
        }
    }
}

/// Dials `addr` and runs the client side of the handshake for `session`.
pub async fn connect(
    addr: &str,
    psk: &Psk,
    session: [u8; 16],
    timeout: Duration,
    metrics: &Metrics,
) -> Result<(TcpStream, Keys)> {
    let run = async {
        let mut tcp = TcpStream::connect(addr).await?;
        let _ = tcp.set_nodelay(true);
        let unix_s = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let (hello, wire) = ClientHello::start(
            psk,
            &ClientInfo { unix_s, session },
            &mut fastrand::Rng::new(),
        )?;
        tcp.write_all(&wire).await?;
        let mut header = [0u8; SERVER_HEADER_WIRE_BYTES];
        tcp.read_exact(&mut header).await?;
        let len = hello.server_body_len(&header)?;
        let mut body = vec![0u8; len];
        tcp.read_exact(&mut body).await?;
        let keys = hello.finish(&body)?;
        metrics.wire_sent_bytes.inc_by(wire.len() as u64);
        metrics
            .wire_received_bytes
            .inc_by((header.len() + body.len()) as u64);
        Ok::<_, TunnelError>((tcp, keys))
    };
    tokio::time::timeout(timeout, run)
        .await
        .map_err(|_| TunnelError::HandshakeTimeout)?
}

fn session_id() -> [u8; 16] {
    let mut b = [0u8; 16];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut b)
        .expect("the system's random source");
    b
}

struct Inner {
    cfg: ClientConfig,
    metrics: Metrics,
    current: watch::Sender<Option<(String, Session)>>,
    stop: Notify,
    stopped: std::sync::atomic::AtomicBool,
    switch: Mutex<Option<portswitch_client::Client>>,
    /// Bumped on every port-switch event under the tunnel's prefix (and when events
    /// were lost): the list of live servers may have changed.
    switch_changes: watch::Sender<u64>,
    /// How many times each server's port was seen released. A session judges its
    /// server gone on a release even when the server has registered again by the
    /// time the list is read: that session's pool belonged to the lost session.
    releases: Mutex<std::collections::HashMap<String, u64>>,
}

/// A running client. Cheap to clone.
#[derive(Clone)]
pub struct TunnelClient(Arc<Inner>);

impl TunnelClient {
    /// Starts the client and waits until its first pool connection is up (or the
    /// handshake timeout passes).
    pub async fn start(mut cfg: ClientConfig) -> Result<TunnelClient> {
        cfg.pool = cfg.pool.clamp(1, POOL_CONNECTIONS_MAX);
        let (current, mut rx) = watch::channel(None);
        let c = TunnelClient(Arc::new(Inner {
            metrics: Metrics::new(),
            current,
            stop: Notify::new(),
            stopped: Default::default(),
            switch: Mutex::new(None),
            switch_changes: watch::channel(0).0,
            releases: Mutex::default(),
            cfg,
        }));
        let me = c.clone();
        tokio::spawn(async move { me.supervise().await });
        let timeout = c.0.cfg.handshake_timeout;
        let up = tokio::time::timeout(timeout, async {
            loop {
                let s = rx.borrow_and_update().clone();
                if let Some((_, s)) = s {
                    while s.conns() == 0 && !s.is_closed() {
                        let _ = tokio::time::timeout(Duration::from_millis(50), s.conns_changed())
                            .await;
                    }
                    if s.conns() > 0 {
                        return;
                    }
                }
                if rx.changed().await.is_err() {
                    return;
                }
            }
        })
        .await;
        if up.is_err() {
            c.stop();
            return Err(TunnelError::NoServer(format!(
                "no pool connection within {} ms",
                timeout.as_millis()
            )));
        }
        Ok(c)
    }

    pub fn metrics(&self) -> &Metrics {
        &self.0.metrics
    }

    /// The current session and its server.
    pub fn current(&self) -> Option<(String, Session)> {
        self.0.current.borrow().clone()
    }

    pub fn stop(&self) {
        self.0.stopped.store(true, Ordering::Release);
        self.0.stop.notify_waiters();
        if let Some((_, s)) = self.current() {
            s.close();
        }
    }

    fn is_stopped(&self) -> bool {
        self.0.stopped.load(Ordering::Acquire)
    }

    /// Carries `socket` to `target` through the tunnel.
    pub fn open(&self, socket: TcpStream, target: &str, policy: CompressPolicy) -> Result<u32> {
        let (_, s) = self.current().ok_or(TunnelError::Closed)?;
        s.open_stream(socket, target, policy)
    }

    /// Listens on `listen` and carries every connection to `target` (`ssh -L`).
    pub async fn forward(
        &self,
        listen: SocketAddr,
        target: String,
        policy: CompressPolicy,
    ) -> Result<SocketAddr> {
        let l = TcpListener::bind(listen).await?;
        let addr = l.local_addr()?;
        let me = self.clone();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    a = l.accept() => match a {
                        Ok((tcp, _)) => {
                            if let Err(e) = me.open(tcp, &target, policy) {
                                tracing::warn!("forward to {target}: {e}");
                            }
                        }
                        Err(e) => tracing::warn!("accept: {e}"),
                    },
                    _ = me.0.stop.notified() => return,
                }
            }
        });
        Ok(addr)
    }

    /// Listens on `listen` as a SOCKS5 proxy whose connections go through the tunnel.
    pub async fn socks(&self, listen: SocketAddr, policy: CompressPolicy) -> Result<SocketAddr> {
        let l = TcpListener::bind(listen).await?;
        let addr = l.local_addr()?;
        let me = self.clone();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    a = l.accept() => if let Ok((mut tcp, _)) = a {
                        let me = me.clone();
                        tokio::spawn(async move {
                            let target = tokio::time::timeout(
                                Duration::from_millis(HANDSHAKE_TIMEOUT_MS),
                                crate::socks::accept(&mut tcp),
                            ).await;
                            match target {
                                Ok(Ok(t)) => {
                                    if let Err(e) = me.open(tcp, &t, policy) {
                                        tracing::warn!("socks to {t}: {e}");
                                    }
                                }
                                Ok(Err(e)) => tracing::debug!("socks: {e}"),
                                Err(_) => tracing::debug!("socks: timed out"),
                            }
                        });
                    },
                    _ = me.0.stop.notified() => return,
                }
            }
        });
        Ok(addr)
    }

    /// Live servers, best first; `None` when the port switch cannot be asked.
    async fn servers(&self) -> Option<Vec<String>> {
        match &self.0.cfg.source {
            ServerSource::Direct(list) => Some(list.clone()),
            ServerSource::Switch { switch, name } => {
                let client = {
                    let g = self.0.switch.lock().unwrap_or_else(|p| p.into_inner());
                    g.as_ref().filter(|c| c.is_alive()).cloned()
                };
                let client = match client {
                    Some(c) => c,
                    None => match portswitch_client::Client::connect(
                        portswitch_client::ClientOptions::new(switch.clone()),
                    )
                    .await
                    {
                        Ok(c) => {
                            // Subscribed before the watch, so no event falls between.
                            self.follow_switch_events(c.events(), switch_prefix(name));
                            if let Err(e) = c.watch_prefix(switch_prefix(name)).await {
                                tracing::warn!("port switch watch: {e}");
                            }
                            *self.0.switch.lock().unwrap_or_else(|p| p.into_inner()) =
                                Some(c.clone());
                            c
                        }
                        Err(e) => {
                            tracing::warn!("port switch {switch}: {e}");
                            return None;
                        }
                    },
                };
                match client.list_all(switch_prefix(name)).await {
                    Ok(owners) => Some(
                        owners
                            .into_iter()
                            .map(|o| String::from_utf8_lossy(&o.value).into_owned())
                            .collect(),
                    ),
                    Err(e) => {
                        tracing::warn!("port switch list: {e}");
                        None
                    }
                }
            }
        }
    }

    /// Turns the port switch's events under `prefix` into bumps of `switch_changes`,
    /// until the switch client is gone or the tunnel client stops.
    fn follow_switch_events(
        &self,
        mut events: tokio::sync::broadcast::Receiver<portswitch_client::Event>,
        prefix: String,
    ) {
        use portswitch_client::Event;
        use tokio::sync::broadcast::error::RecvError;
        let me = self.clone();
        tokio::spawn(async move {
            while !me.is_stopped() {
                let relevant = tokio::select! {
                    ev = events.recv() => match ev {
                        Ok(Event::Released { port, .. }) => match port.strip_prefix(prefix.as_bytes()) {
                            Some(server) => {
                                let server = String::from_utf8_lossy(server).into_owned();
                                *me.0.releases.lock().unwrap_or_else(|p| p.into_inner())
                                    .entry(server).or_default() += 1;
                                true
                            }
                            None => false,
                        },
                        Ok(Event::Claimed { port, .. }) => port.starts_with(prefix.as_bytes()),
                        Ok(Event::Resync | Event::Recovered) => true,
                        Ok(_) => false,
                        // Events were dropped: whatever they said, look again.
                        Err(RecvError::Lagged(_)) => true,
                        Err(RecvError::Closed) => {
                            me.0.switch_changes.send_modify(|g| *g += 1);
                            return;
                        }
                    },
                    _ = me.0.stop.notified() => return,
                };
                if relevant {
                    me.0.switch_changes.send_modify(|g| *g += 1);
                }
            }
        });
    }

    /// Picks a server, runs a session with it until it is judged dead, and moves on.
    async fn supervise(self) {
        let mut bad: HashSet<String> = HashSet::new();
        let mut backoff = Duration::from_millis(REDIAL_BACKOFF_MS_MIN);
        let mut changes = self.0.switch_changes.subscribe();
        while !self.is_stopped() {
            changes.mark_unchanged();
            let servers = self.servers().await.unwrap_or_default();
            let fresh: Vec<&String> = servers.iter().filter(|s| !bad.contains(*s)).collect();
            let server = match fresh.first().copied().or(servers.first()) {
                Some(s) => s.clone(),
                None => {
                    // Nothing registered (or the switch is away): look again after the
                    // backoff, or as soon as a server registers.
                    tokio::select! {
                        _ = tokio::time::sleep(backoff) => {}
                        _ = changes.changed() => {}
                        _ = self.0.stop.notified() => {}
                    }
                    backoff = (backoff * 2).min(Duration::from_millis(REDIAL_BACKOFF_MS_MAX));
                    bad.clear();
                    continue;
                }
            };
            if fresh.is_empty() {
                bad.clear();
            }
            backoff = Duration::from_millis(REDIAL_BACKOFF_MS_MIN);
            let session = Session::new(
                Role::Client,
                self.0.cfg.session.clone(),
                self.0.metrics.clone(),
                None,
            );
            self.0
                .current
                .send_replace(Some((server.clone(), session.clone())));
            let verdict = self.run_session(&server, &session, servers.len() > 1).await;
            session.close();
            if let Some(why) = verdict {
                tracing::warn!("tunnel server {server} is gone ({why}); moving on");
                self.0.metrics.server_moved(why);
                bad.insert(server);
            }
        }
    }

    fn releases_of(&self, server: &str) -> u64 {
        let g = self.0.releases.lock().unwrap_or_else(|p| p.into_inner());
        g.get(server).copied().unwrap_or(0)
    }

    /// Keeps the pool of `session` full. Returns why the server is judged gone
    /// (`released`, `unreachable`), or `None` when the client stopped.
    async fn run_session(
        &self,
        server: &str,
        session: &Session,
        others: bool,
    ) -> Option<&'static str> {
        let mut changes = self.0.switch_changes.subscribe();
        let released_before = self.releases_of(server);
        let id = session_id();
        let failures = Arc::new(AtomicU32::new(0));
        let mut slots = tokio::task::JoinSet::new();
        for _ in 0..self.0.cfg.pool {
            let (me, server, session, failures) = (
                self.clone(),
                server.to_string(),
                session.clone(),
                failures.clone(),
            );
            slots.spawn(async move {
                let mut backoff = Duration::from_millis(REDIAL_BACKOFF_MS_MIN);
                while !session.is_closed() && !me.is_stopped() {
                    let cfg = &me.0.cfg;
                    match connect(&server, &cfg.psk, id, cfg.handshake_timeout, &me.0.metrics).await
                    {
                        Ok((tcp, keys)) => {
                            failures.store(0, Ordering::Release);
                            backoff = Duration::from_millis(REDIAL_BACKOFF_MS_MIN);
                            me.0.metrics.pool_connections_dialled.inc();
                            me.0.metrics.handshake("ok");
                            session.run_conn(tcp, keys).await;
                        }
                        Err(e) => {
                            tracing::debug!("dial {server}: {e}");
                            me.0.metrics.handshake("failed");
                            failures.fetch_add(1, Ordering::AcqRel);
                            tokio::time::sleep(backoff).await;
                            backoff =
                                (backoff * 2).min(Duration::from_millis(REDIAL_BACKOFF_MS_MAX));
                        }
                    }
                }
            });
        }
        // Judge the server: dead when nothing is up and dials keep failing (sooner if
        // another server is known), or when nothing has been up for the grace period
        // the server gives an orphaned session.
        let mut down_since: Option<tokio::time::Instant> = None;
        let grace = Duration::from_millis(SESSION_ORPHAN_GRACE_MS);
        let verdict = loop {
            if self.is_stopped() || session.is_closed() {
                break None;
            }
            if session.conns() > 0 {
                down_since = None;
            } else {
                let since = *down_since.get_or_insert_with(tokio::time::Instant::now);
                let fails = failures.load(Ordering::Acquire);
                if (others && fails >= self.0.cfg.failover_after_failures)
                    || since.elapsed() >= grace
                {
                    break Some("unreachable");
                }
            }
            tokio::select! {
                _ = session.conns_changed() => {}
                _ = tokio::time::sleep(Duration::from_millis(100)) => {}
                _ = self.0.stop.notified() => {}
                r = changes.changed() => {
                    // A server registered or left. If ours was released or is no
                    // longer registered (it stopped, or lost its port-switch session;
                    // it may be back already under a new session), move now: its
                    // pool may look alive for up to the idle timeout, and dials to a
                    // vanished host take the handshake timeout each. A switch that
                    // cannot be asked says nothing about the server.
                    if r.is_ok() {
                        if self.releases_of(server) > released_before {
                            break Some("released");
                        }
                        if let Some(live) = self.servers().await {
                            if !live.iter().any(|s| s == server) {
                                break Some("released");
                            }
                        }
                    }
                }
            }
        };
        session.close();
        slots.abort_all();
        verdict
    }
}
