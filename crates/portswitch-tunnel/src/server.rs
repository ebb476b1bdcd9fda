//! The tunnel server: accepts pool connections, runs the handshake, joins each to its
//! session, dials the targets of the streams clients open, and registers itself in the
//! port switch for discovery.
//!
//! A connection that does not complete a valid, fresh hello gets no answer at all: the
//! server goes on reading and discarding until a byte count or a deadline drawn at
//! random when it was accepted, then closes, the same for garbage, a wrong key, a
//! replay or a stall — like a service that never speaks first.
//!
//! Registered in a port switch, the server keeps its port for as long as it runs: if
//! its port-switch session is lost (or the port taken from it), it connects again
//! and registers again, so clients that moved away can find it once more.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

use crate::error::{Result, TunnelError};
use crate::handshake::{Keys, Psk, ReplayCache, ServerHello, CLIENT_HEADER_WIRE_BYTES};
use crate::limits::{
    HANDSHAKE_TIMEOUT_MS, REDIAL_BACKOFF_MS_MAX, REDIAL_BACKOFF_MS_MIN, SESSIONS_MAX,
    SESSION_ORPHAN_GRACE_MS, SILENT_DRAIN_BYTES_MAX, SILENT_DRAIN_BYTES_MIN, SILENT_DRAIN_MS_MAX,
    SILENT_DRAIN_MS_MIN,
};
use crate::metrics::Metrics;
use crate::mux::Role;
use crate::session::{Session, SessionConfig};

/// Where a server announces itself.
#[derive(Debug, Clone)]
pub struct Registration {
    /// The port switch.
    pub switch: String,
    /// The tunnel's name: the server owns port `tunnel/<name>/<advertise>`.
    pub name: String,
    /// The address clients dial (default: the listening address).
    pub advertise: Option<String>,
}

#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub listen: SocketAddr,
    pub psk: Psk,
    pub session: SessionConfig,
    pub handshake_timeout: Duration,
    /// A rejected connection is read and discarded until this many bytes…
    pub silent_bytes: std::ops::RangeInclusive<u64>,
    /// …or this long after it was accepted, each drawn per connection.
    pub silent_ms: std::ops::RangeInclusive<u64>,
    pub orphan_grace: Duration,
    pub sessions_max: usize,
    /// How long a target may take to accept.
    pub dial_timeout: Duration,
    pub register: Option<Registration>,
    /// Dial only targets on loopback (tests, or a server fronting local services).
    pub loopback_targets_only: bool,
}

impl ServerConfig {
    pub fn new(listen: SocketAddr, psk: Psk) -> ServerConfig {
        ServerConfig {
            listen,
            psk,
            session: SessionConfig::default(),
            handshake_timeout: Duration::from_millis(HANDSHAKE_TIMEOUT_MS),
            silent_bytes: SILENT_DRAIN_BYTES_MIN..=SILENT_DRAIN_BYTES_MAX,
            silent_ms: SILENT_DRAIN_MS_MIN..=SILENT_DRAIN_MS_MAX,
            orphan_grace: Duration::from_millis(SESSION_ORPHAN_GRACE_MS),
            sessions_max: SESSIONS_MAX,
            dial_timeout: Duration::from_secs(10),
            register: None,
            loopback_targets_only: false,
        }
    }
}

struct Inner {
    cfg: ServerConfig,
    metrics: Metrics,
    replay: Mutex<ReplayCache>,
    sessions: Mutex<HashMap<[u8; 16], Session>>,
}

/// A running server. Dropping it does not stop it: call [`RunningServer::stop`].
pub struct RunningServer {
    pub addr: SocketAddr,
    pub metrics: Metrics,
    stop: watch::Sender<bool>,
    inner: Arc<Inner>,
    /// The port-switch session holding our port, replaced when lost.
    switch: Arc<Mutex<Option<portswitch_client::Client>>>,
}

impl RunningServer {
    pub async fn start(cfg: ServerConfig) -> Result<RunningServer> {
        let listener = TcpListener::bind(cfg.listen).await?;
        let addr = listener.local_addr()?;
        let metrics = Metrics::new();
        let (stop, mut stopped) = watch::channel(false);
        let switch: Arc<Mutex<Option<portswitch_client::Client>>> = Arc::default();
        if let Some(r) = &cfg.register {
            // The first connection must succeed (a wrong switch address is the user's
            // to see); the port itself may still be held by a previous instance
            // whose lease has not run out: the keeper below takes it when it can.
            let client = connect_switch(r).await?;
            if let Err(e) = register(&client, r, addr).await {
                tracing::warn!("port switch: {e}; trying again");
            } else {
                metrics.switch_registrations.inc();
            }
            *switch.lock().expect("switch lock") = Some(client);
            tokio::spawn(keep_registered(
                r.clone(),
                addr,
                switch.clone(),
                metrics.clone(),
                stop.subscribe(),
            ));
        }
        let inner = Arc::new(Inner {
            cfg,
            metrics: metrics.clone(),
            replay: Mutex::new(ReplayCache::new()),
            sessions: Mutex::new(HashMap::new()),
        });
        let i = inner.clone();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    a = listener.accept() => {
                        if let Ok((tcp, _)) = a {
                            let i = i.clone();
                            tokio::spawn(async move { i.accept(tcp).await });
                        }
                    }
                    _ = stopped.changed() => return,
                }
            }
        });
        Ok(RunningServer {
            addr,
            metrics,
            stop,
            inner,
            switch,
        })
    }

    /// Sessions held now.
    pub fn sessions(&self) -> usize {
        self.inner.sessions.lock().expect("sessions lock").len()
    }

    /// Stops accepting, ends every session and leaves the port switch.
    pub async fn stop(self) {
        let _ = self.stop.send(true);
        let sessions: Vec<Session> = self
            .inner
            .sessions
            .lock()
            .expect("sessions lock")
            .values()
            .cloned()
            .collect();
        for s in sessions {
            s.close();
        }
        let client = self.switch.lock().expect("switch lock").take();
        if let Some(c) = client {
            let _ = c.close().await;
        }
    }

    /// Ends the server's port-switch session as if it had been lost (the lease ran
    /// out, the switch forgot it): the server connects and registers again. For
    /// tests of what clients and the server do then.
    pub async fn drop_switch_session(&self) {
        let client = self.switch.lock().expect("switch lock").clone();
        if let Some(c) = client {
            let _ = c.close().await;
        }
    }
}

async fn connect_switch(r: &Registration) -> Result<portswitch_client::Client> {
    portswitch_client::Client::connect(portswitch_client::ClientOptions::new(r.switch.clone()))
        .await
        .map_err(|e| TunnelError::Switch(e.to_string()))
}

/// The port a server of `r` listening on `listen` owns, and its value.
fn switch_port(r: &Registration, listen: SocketAddr) -> (String, String) {
    let advertise = r.advertise.clone().unwrap_or_else(|| listen.to_string());
    (
        format!("{}{advertise}", crate::client::switch_prefix(&r.name)),
        advertise,
    )
}

async fn register(
    client: &portswitch_client::Client,
    r: &Registration,
    listen: SocketAddr,
) -> Result<()> {
    let (port, advertise) = switch_port(r, listen);
    match client.register(&port, advertise.as_bytes()).await {
        Ok(portswitch_client::RegisterOutcome::Owned { .. }) => Ok(()),
        Ok(other) => Err(TunnelError::Switch(format!("port {port}: {other:?}"))),
        Err(e) => Err(TunnelError::Switch(e.to_string())),
    }
}

/// Keeps the server's port registered until `stopped`: when the session holding it
/// is lost, or the port is taken from it, connects (if need be) and registers again,
/// with a backoff between failed attempts.
async fn keep_registered(
    r: Registration,
    listen: SocketAddr,
    holder: Arc<Mutex<Option<portswitch_client::Client>>>,
    metrics: Metrics,
    mut stopped: watch::Receiver<bool>,
) {
    use portswitch_client::Event;
    let (port, _) = switch_port(&r, listen);
    let mut backoff = Duration::from_millis(REDIAL_BACKOFF_MS_MIN);
    loop {
        if *stopped.borrow() {
            return;
        }
        let current = holder
            .lock()
            .expect("switch lock")
            .clone()
            .filter(|c| c.is_alive());
        let client = match current {
            Some(c) => {
                // Subscribed before checking, so a loss in between is not missed.
                let mut events = c.events();
                let owned = c.owned_ports().iter().any(|(p, _)| p == port.as_bytes());
                if owned {
                    backoff = Duration::from_millis(REDIAL_BACKOFF_MS_MIN);
                    let port_lost = async {
                        loop {
                            match events.recv().await {
                                Ok(Event::PortLost { port: p, .. }) if p == port.as_bytes() => {
                                    return
                                }
                                Ok(Event::OwnershipLost { .. }) => return,
                                Ok(_) => {}
                                // Lost events: check ownership again.
                                Err(_) => return,
                            }
                        }
                    };
                    tokio::select! {
                        _ = c.lost() => {}
                        _ = port_lost => {}
                        _ = stopped.changed() => return,
                    }
                    tracing::warn!("port switch: lost {port}; registering again");
                    continue;
                }
                c
            }
            None => match connect_switch(&r).await {
                Ok(c) => {
                    *holder.lock().expect("switch lock") = Some(c.clone());
                    c
                }
                Err(e) => {
                    tracing::debug!("port switch: {e}");
                    tokio::select! {
                        _ = tokio::time::sleep(backoff) => {}
                        _ = stopped.changed() => return,
                    }
                    backoff = (backoff * 2).min(Duration::from_millis(REDIAL_BACKOFF_MS_MAX));
                    continue;
                }
            },
        };
        if *stopped.borrow() {
            return;
        }
        match register(&client, &r, listen).await {
            Ok(()) => {
                metrics.switch_registrations.inc();
                tracing::info!("port switch: registered {port}");
            }
            Err(e) => {
                tracing::debug!("port switch: {e}");
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {}
                    _ = stopped.changed() => return,
                }
                backoff = (backoff * 2).min(Duration::from_millis(REDIAL_BACKOFF_MS_MAX));
            }
        }
    }
}

fn unix_now_s() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

impl Inner {
    async fn accept(self: Arc<Self>, mut tcp: TcpStream) {
        let accepted = tokio::time::Instant::now();
        let mut rng = fastrand::Rng::new();
        let drain_bytes = rng.u64(self.cfg.silent_bytes.clone());
        let drain_until = accepted + Duration::from_millis(rng.u64(self.cfg.silent_ms.clone()));
        let mut read = 0u64;
        let hs = tokio::time::timeout(
            self.cfg.handshake_timeout,
            self.handshake(&mut tcp, &mut read, &mut rng),
        )
        .await
        .unwrap_or(Err(TunnelError::HandshakeTimeout));
        match hs {
            Ok((keys, session)) => {
                self.metrics.handshake("ok");
                self.metrics.pool_connections_dialled.inc();
                session.run_conn(tcp, keys).await;
                if session.conns() == 0 && !session.is_closed() {
                    self.orphaned(session);
                }
            }
            Err(e) => {
                let label = match &e {
                    TunnelError::Replay => "replay",
                    TunnelError::ClockSkew => "clock_skew",
                    TunnelError::Auth => "auth",
                    TunnelError::HandshakeTimeout => "timeout",
                    TunnelError::Io(_) => "io",
                    TunnelError::Limit(_) => "limit",
                    _ => "malformed",
                };
                self.metrics.handshake(label);
                tracing::debug!("handshake refused: {e}");
                // Silence: read and discard until the limits drawn at accept.
                let mut sink = [0u8; 4096];
                while read < drain_bytes {
                    match tokio::time::timeout_at(drain_until, tcp.read(&mut sink)).await {
                        Ok(Ok(n)) if n > 0 => read += n as u64,
                        _ => break,
                    }
                }
            }
        }
    }

    async fn handshake(
        &self,
        tcp: &mut TcpStream,
        read: &mut u64,
        rng: &mut fastrand::Rng,
    ) -> Result<(Keys, Session)> {
        let mut header = [0u8; CLIENT_HEADER_WIRE_BYTES];
        tcp.read_exact(&mut header).await?;
        *read += header.len() as u64;
        let (mut hello, body_len) = ServerHello::read_header(&self.cfg.psk, &header)?;
        let mut body = vec![0u8; body_len];
        tcp.read_exact(&mut body).await?;
        *read += body_len as u64;
        let info = hello.read_body(&body)?;
        self.replay
            .lock()
            .expect("replay lock")
            .check(hello.salt(), info.unix_s, unix_now_s())?;
        let session = self.session(info.session)?;
        let (wire, keys) = hello.respond(rng)?;
        tcp.write_all(&wire).await?;
        self.metrics.wire_sent_bytes.inc_by(wire.len() as u64);
        self.metrics.wire_received_bytes.inc_by(*read);
        Ok((keys, session))
    }

    fn session(self: &Inner, id: [u8; 16]) -> Result<Session> {
        let mut sessions = self.sessions.lock().expect("sessions lock");
        sessions.retain(|_, s| !s.is_closed());
        if let Some(s) = sessions.get(&id) {
            return Ok(s.clone());
        }
        if sessions.len() >= self.cfg.sessions_max {
            return Err(TunnelError::Limit("sessions"));
        }
        let dial_timeout = self.cfg.dial_timeout;
        let loopback_only = self.cfg.loopback_targets_only;
        let metrics = self.metrics.clone();
        let on_open = Box::new(move |s: Session, o: crate::mux::Opened| {
            let metrics = metrics.clone();
            tokio::spawn(async move {
                let target = String::from_utf8_lossy(&o.target).into_owned();
                match dial(&target, dial_timeout, loopback_only).await {
                    Ok(tcp) => s.run_stream(o.stream, tcp, o.policy).await,
                    Err(e) => {
                        tracing::debug!("stream {} to {target}: {e}", o.stream);
                        metrics.streams_failed.inc();
                        s.reset_stream(o.stream, crate::frame::ResetCode::Unreachable);
                    }
                }
            });
        });
        let s = Session::new(
            Role::Server,
            self.cfg.session.clone(),
            self.metrics.clone(),
            Some(on_open),
        );
        sessions.insert(id, s.clone());
        self.metrics.sessions.set(sessions.len() as i64);
        Ok(s)
    }

    /// A session with no pool connection left: its client has a while to come back.
    fn orphaned(self: &Arc<Self>, s: Session) {
        let me = self.clone();
        tokio::spawn(async move {
            let deadline = tokio::time::Instant::now() + me.cfg.orphan_grace;
            while s.conns() == 0 && !s.is_closed() {
                if tokio::time::timeout_at(deadline, s.conns_changed())
                    .await
                    .is_err()
                {
                    if s.conns() == 0 {
                        s.close();
                    }
                    break;
                }
            }
            let mut sessions = me.sessions.lock().expect("sessions lock");
            sessions.retain(|_, s| !s.is_closed());
            me.metrics.sessions.set(sessions.len() as i64);
        });
    }
}

async fn dial(target: &str, timeout: Duration, loopback_only: bool) -> Result<TcpStream> {
    let addrs: Vec<SocketAddr> = tokio::time::timeout(timeout, tokio::net::lookup_host(target))
        .await
        .map_err(|_| TunnelError::Io(std::io::ErrorKind::TimedOut.into()))??
        .collect();
    let mut last = TunnelError::Address {
        addr: target.to_string(),
        why: "no address".into(),
    };
    for a in addrs {
        if loopback_only && !a.ip().is_loopback() {
            last = TunnelError::Address {
                addr: target.to_string(),
                why: "not on loopback".into(),
            };
            continue;
        }
        match tokio::time::timeout(timeout, TcpStream::connect(a)).await {
            Ok(Ok(t)) => return Ok(t),
            Ok(Err(e)) => last = e.into(),
            Err(_) => last = TunnelError::Io(std::io::ErrorKind::TimedOut.into()),
        }
    }
    Err(last)
}
