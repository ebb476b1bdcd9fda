//! The client: one connection, automatic batching, lease view, resume.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use portswitch_proto::frame::{frame_len, messages};
use portswitch_proto::limits::{
    COMMANDS_PER_FRAME_MAX, FRAME_BYTES_MAX, NODE_NAME_BYTES_MAX, PROTOCOL_VERSION,
};
use portswitch_proto::{
    ErrorCode, Event as WireEvent, FrameBuf, Hello, HelloOk, Reply, Request, ServerMsg,
};
use tokio::io::{AsyncRead, AsyncWrite, ReadHalf, WriteHalf};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{broadcast, oneshot, watch, Notify};

use crate::types::*;
use portswitch_auth::scram;

/// How a client connects and keeps its session.
#[derive(Debug, Clone)]
pub struct ClientOptions {
    /// Server address, `host:port`.
    pub addr: String,
    /// The other servers of the group, tried in turn (after any master a server
    /// names) when `addr` is not master or cannot be reached.
    pub servers: Vec<String>,
    /// Announced to the server; others see it as the owner's node name.
    pub node_name: String,
    /// The session lease: the server ends the session this long after it last heard
    /// from it.
    pub lease: Duration,
    /// End the session the moment the connection closes without BYE (fast failure
    /// detection for processes that die, at the price of losing ports on a blip).
    pub end_on_disconnect: bool,
    /// The fraction of the lease the client's own view gives up early, to cover clock
    /// rate differences between client and server. 0.1 tolerates a 10% faster client
    /// clock.
    pub lease_margin: f64,
    pub connect_timeout: Duration,
    /// A connection whose oldest request has gone unanswered this long (or a server
    /// that does not answer HELLO this long) is treated as dead, and the session
    /// moves on — to another server of the group if need be. A master stopped with
    /// SIGSTOP keeps its sockets open; this is how clients leave it.
    pub answer_timeout: Duration,
    /// Longest quiet time on a connection before the client sends a PING (never more
    /// than a third of the lease, the default). A server that goes silent — its data
    /// centre cut off, say — is only noticed when a request goes unanswered, so an idle
    /// session finds it after up to this plus `answer_timeout`; shorter costs PINGs.
    pub keepalive: Option<Duration>,
    /// Resume this session (id, secret) instead of starting a new one.
    pub resume: Option<(u64, u64)>,
    /// Log in as (user, password) with SCRAM-SHA-256; the password never leaves this
    /// process. Required by servers that have users.
    pub credentials: Option<(String, String)>,
    /// Connect with TLS.
    pub tls: Option<ClientTls>,
    /// Capacity of the events channel; a receiver that falls further behind sees
    /// `RecvError::Lagged` (it lost events, and should re-read what it watches).
    pub events_capacity: usize,
}

impl ClientOptions {
    pub fn new(addr: impl Into<String>) -> Self {
        ClientOptions {
            addr: addr.into(),
            servers: Vec::new(),
            node_name: default_node_name(),
            lease: Duration::from_millis(portswitch_proto_lease_default()),
            end_on_disconnect: false,
            lease_margin: 0.1,
            connect_timeout: Duration::from_secs(5),
            answer_timeout: Duration::from_secs(1),
            keepalive: None,
            resume: None,
            credentials: None,
            tls: None,
            events_capacity: 4_096,
        }
    }
}

fn portswitch_proto_lease_default() -> u64 {
    10_000
}

fn default_node_name() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    let host = host.trim();
    let mut name = format!(
        "{}:{}",
        if host.is_empty() { "client" } else { host },
        std::process::id()
    );
    name.truncate(NODE_NAME_BYTES_MAX);
    name
}

/// TLS settings of a client.
#[derive(Debug, Clone)]
pub struct ClientTls {
    /// PEM file of the CA(s) that signed the server's certificate.
    pub ca: std::path::PathBuf,
    /// The name to verify the server's certificate against; defaults to the host part
    /// of the address.
    pub server_name: Option<String>,
    /// A client certificate and key (PEM) for mutual TLS: a server that trusts its CA
    /// logs the session in as the user the certificate's common name names.
    pub client_cert: Option<(std::path::PathBuf, std::path::PathBuf)>,
}

/// Any byte stream a session can run over (TCP, or TLS over TCP).
pub(crate) trait Io: AsyncRead + AsyncWrite + Send + Unpin {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin> Io for T {}
pub(crate) type Stream = Box<dyn Io>;

impl ClientTls {
    /// A rustls connector for these settings (for tools that open their own
    /// connections, like the load generator).
    pub fn connector(&self) -> Result<tokio_rustls::TlsConnector> {
        tls_connector(self)
    }
}

fn tls_connector(t: &ClientTls) -> Result<tokio_rustls::TlsConnector> {
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer};
    let bad = |what: &str, e: &dyn std::fmt::Display| {
        Error::Io(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("{what}: {e}"),
        ))
    };
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(&t.ca).map_err(|e| bad("CA file", &e))? {
        roots
            .add(c.map_err(|e| bad("CA file", &e))?)
            .map_err(|e| bad("CA file", &e))?;
    }
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| bad("TLS", &e))?
        .with_root_certificates(roots);
    let config = match &t.client_cert {
        Some((cert, key)) => {
            let certs = CertificateDer::pem_file_iter(cert)
                .map_err(|e| bad("client certificate", &e))?
                .collect::<std::result::Result<Vec<_>, _>>()
                .map_err(|e| bad("client certificate", &e))?;
            let key = PrivateKeyDer::from_pem_file(key).map_err(|e| bad("client key", &e))?;
            builder
                .with_client_auth_cert(certs, key)
                .map_err(|e| bad("client certificate", &e))?
        }
        None => builder.with_no_client_auth(),
    };
    Ok(tokio_rustls::TlsConnector::from(std::sync::Arc::new(
        config,
    )))
}

/// Opens the connection (TCP, then TLS if configured). Returns the stream and, over
/// TLS, its `tls-exporter` value for channel binding.
pub(crate) async fn open_stream(
    opts: &ClientOptions,
    addr: &str,
) -> Result<(Stream, Option<[u8; 32]>)> {
    let connect = TcpStream::connect(addr);
    let tcp = tokio::time::timeout(opts.connect_timeout, connect)
        .await
        .map_err(|_| Error::ConnectTimeout(addr.to_string()))??;
    tcp.set_nodelay(true)?;
    let Some(t) = &opts.tls else {
        return Ok((Box::new(tcp), None));
    };
    let host = match &t.server_name {
        Some(n) => n.clone(),
        None => addr
            .rsplit_once(':')
            .map_or(addr, |(h, _)| h)
            .trim_matches(['[', ']'])
            .to_string(),
    };
    let name = rustls_pki_types::ServerName::try_from(host.clone()).map_err(|e| {
        Error::Io(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("server name {host}: {e}"),
        ))
    })?;
    let tls = tokio::time::timeout(opts.connect_timeout, tls_connector(t)?.connect(name, tcp))
        .await
        .map_err(|_| Error::ConnectTimeout(addr.to_string()))??;
    let exporter = tls_exporter(&tls);
    Ok((Box::new(tls), exporter))
}

/// The `tls-exporter` channel-binding value of a TLS connection (RFC 9266): 32 bytes
/// under the label "EXPORTER-Channel-Binding" with no context.
pub fn tls_exporter<S>(tls: &tokio_rustls::client::TlsStream<S>) -> Option<[u8; 32]> {
    let mut out = [0u8; 32];
    tls.get_ref()
        .1
        .export_keying_material(&mut out, b"EXPORTER-Channel-Binding", None)
        .ok()?;
    Some(out)
}

/// An owned reply.
#[derive(Debug)]
pub(crate) enum Answer {
    Ok,
    Registered(u64),
    Taken(u64, u64, Bytes),
    Queued(u32),
    Owner(Owner),
    Free,
    Watching(Option<(u64, u64)>),
    Delivered,
    NoOwner,
    Count(u64),
    Page(Page),
    Stats(Vec<(String, u64)>),
    Admin(Bytes),
}

/// What a pending request needs to update on its reply.
#[derive(Debug)]
enum Kind {
    Plain,
    /// (port, value): the value is kept to reclaim or re-queue after a failover.
    Register(Bytes, Bytes),
    Unregister(Bytes),
}

struct Pending {
    tx: Option<oneshot::Sender<Result<Answer>>>,
    sent_at: Instant,
    kind: Kind,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Phase {
    Connected(u64),
    Reconnecting,
    Lost(String),
    Closed,
}

struct St {
    out: FrameBuf,
    next_id: u32,
    pending: HashMap<u32, Pending>,
    acquire_waiters: HashMap<Bytes, Vec<oneshot::Sender<Result<u64>>>>,
    owned: HashMap<Bytes, u64>,
    /// Non-empty values of owned or awaited ports (re-sent after a failover).
    values: HashMap<Bytes, Bytes>,
    /// What this session watches: (name, prefix). Re-watched on a new master.
    watches: std::collections::HashSet<(Bytes, bool)>,
    /// The server this session is on (tried first when reconnecting).
    server: String,
    /// Ports with an UNREGISTER in flight, and its request id: a REGISTER answered
    /// for an earlier request, or an ACQUIRED, must not make them owned again (the
    /// server releases them right after; a failover would reclaim them).
    letting_go: HashMap<Bytes, u32>,
    /// Owned ports not yet reclaimed on the current master, each with the moment the
    /// client must give it up: the earliest that master's recovery window can close,
    /// after which the port may be someone else's.
    unconfirmed: HashMap<Bytes, Instant>,
    /// Watches and queue places still to re-establish on a new master.
    resync_due: bool,
    info: SessionInfo,
    safe_lease: Duration,
    view_end: Instant,
    phase: Phase,
    conn_gen: u64,
    /// Wakes the current connection's reader when the session is over.
    conn_dead: Option<Arc<Notify>>,
    /// The current connection's writer task.
    conn_writer: Option<tokio::task::JoinHandle<()>>,
}

struct Inner {
    opts: ClientOptions,
    st: Mutex<St>,
    wake_writer: Notify,
    events: broadcast::Sender<Event>,
    alive: watch::Sender<bool>,
}

/// A portswitch session. Cheap to clone; all clones share the session.
///
/// Requests from any number of tasks are batched into frames automatically: whatever
/// is submitted while a write is in flight goes out in the next frame, and replies
/// are matched by request id, so one connection pipelines without waiting.
#[derive(Clone)]
pub struct Client {
    inner: Arc<Inner>,
    _guard: Arc<DropGuard>,
}

/// Ends the session (BYE) when the last clone of a [`Client`] is dropped, so a
/// forgotten client does not keep ports alive.
struct DropGuard(Arc<Inner>);

impl Drop for DropGuard {
    fn drop(&mut self) {
        let inner = &self.0;
        {
            let mut st = inner.lock();
            if matches!(st.phase, Phase::Connected(_)) {
                st.next_id = st.next_id.wrapping_add(1).max(1);
                let id = st.next_id;
                st.out.push_request(id, &Request::Bye);
            }
        }
        inner.finish(Phase::Closed, "client dropped");
    }
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("addr", &self.inner.opts.addr)
            .finish_non_exhaustive()
    }
}

impl Client {
    /// Connects, opens (or resumes) a session, and starts keeping it alive.
    pub async fn connect(opts: ClientOptions) -> Result<Client> {
        if opts.node_name.len() > NODE_NAME_BYTES_MAX {
            return Err(Error::TooLarge {
                what: "node name",
                len: opts.node_name.len(),
                max: NODE_NAME_BYTES_MAX,
            });
        }
        let lease_ms = u32::try_from(opts.lease.as_millis()).unwrap_or(u32::MAX);
        // Through an election a group has no master for a moment: keep trying every
        // server (with jittered backoff) until the connect timeout.
        let deadline = Instant::now() + opts.connect_timeout;
        let mut backoff = Duration::from_millis(20);
        let (stream, hello, rest, sent_at, addr) = loop {
            match handshake_any(&opts, None, lease_ms, opts.resume).await {
                Ok(x) => break x,
                Err(e) if try_elsewhere(&e) && Instant::now() + backoff < deadline => {
                    match retry_hint(&e) {
                        Some(wait) => wait_as_told(wait).await,
                        None => {
                            tokio::time::sleep(backoff.mul_f64(0.5 + fastrand::f64())).await;
                            backoff = (backoff * 2).min(Duration::from_millis(500));
                        }
                    }
                }
                Err(e) => return Err(e),
            }
        };
        let safe_lease = safe_lease(&opts, hello.lease_ms);
        let info = SessionInfo {
            id: hello.session,
            secret: hello.secret,
            epoch: hello.epoch,
            lease_ms: hello.lease_ms,
            limits: hello.limits,
        };
        let (events, _) = broadcast::channel(opts.events_capacity.max(1));
        let (alive, _) = watch::channel(true);
        let frame_max = (hello.limits.frame_bytes_max as usize).min(FRAME_BYTES_MAX);
        let cmds_max =
            (hello.limits.commands_per_frame_max as usize).clamp(1, COMMANDS_PER_FRAME_MAX);
        let inner = Arc::new(Inner {
            opts,
            st: Mutex::new(St {
                out: FrameBuf::new(frame_max, cmds_max),
                next_id: 0,
                pending: HashMap::new(),
                acquire_waiters: HashMap::new(),
                owned: HashMap::new(),
                values: HashMap::new(),
                watches: Default::default(),
                server: addr,
                letting_go: HashMap::new(),
                unconfirmed: HashMap::new(),
                resync_due: false,
                info,
                safe_lease,
                view_end: sent_at + safe_lease,
                phase: Phase::Connected(1),
                conn_gen: 1,
                conn_dead: None,
                conn_writer: None,
            }),
            wake_writer: Notify::new(),
            events,
            alive,
        });
        start_connection(inner.clone(), stream, rest, 1);
        tokio::spawn(keepalive(Arc::downgrade(&inner)));
        Ok(Client {
            _guard: Arc::new(DropGuard(inner.clone())),
            inner,
        })
    }

    /// Connects to `addr` with default options.
    pub async fn connect_to(addr: impl Into<String>) -> Result<Client> {
        Client::connect(ClientOptions::new(addr)).await
    }

    pub fn session(&self) -> SessionInfo {
        self.inner.lock().info
    }

    /// Subscribes to this session's events (from now on).
    pub fn events(&self) -> broadcast::Receiver<Event> {
        self.inner.events.subscribe()
    }

    /// Whether the session is still held (the lease view has not run out).
    pub fn is_alive(&self) -> bool {
        *self.inner.alive.borrow()
    }

    /// Resolves when the session is lost or closed; an owner must stop acting as owner
    /// of every port at that moment.
    pub async fn lost(&self) {
        let mut rx = self.inner.alive.subscribe();
        let _ = rx.wait_for(|alive| !*alive).await;
    }

    /// Ports this session owns, as far as the client knows, with their tokens.
    pub fn owned_ports(&self) -> Vec<(Bytes, u64)> {
        self.inner
            .lock()
            .owned
            .iter()
            .map(|(k, v)| (k.clone(), *v))
            .collect()
    }

    /// Registers `port` without waiting: owned, or taken by someone else.
    pub async fn register(
        &self,
        port: impl AsRef<[u8]>,
        value: impl AsRef<[u8]>,
    ) -> Result<RegisterOutcome> {
        self.register_with(port.as_ref(), value.as_ref(), false)
            .await
    }

    /// Registers `port`, joining its FIFO queue if taken; `Queued` means an
    /// [`Event::Acquired`] follows when it is granted.
    pub async fn register_with(
        &self,
        port: &[u8],
        value: &[u8],
        wait: bool,
    ) -> Result<RegisterOutcome> {
        let port = Bytes::copy_from_slice(port);
        let a = self
            .request(
                Request::Register {
                    port: &port,
                    value,
                    wait,
                },
                Kind::Register(port.clone(), Bytes::copy_from_slice(value)),
            )
            .await?;
        Ok(match a {
            Answer::Registered(token) => RegisterOutcome::Owned { token },
            Answer::Taken(session, token, node) => RegisterOutcome::Taken {
                session,
                token,
                node,
            },
            Answer::Queued(position) => RegisterOutcome::Queued { position },
            other => return Err(unexpected(other)),
        })
    }

    /// Registers `port`, waiting in its FIFO queue until granted. Returns the token.
    pub async fn register_wait(
        &self,
        port: impl AsRef<[u8]>,
        value: impl AsRef<[u8]>,
    ) -> Result<u64> {
        let port = Bytes::copy_from_slice(port.as_ref());
        // Listen for the grant before asking, so it cannot slip past.
        let (tx, rx) = oneshot::channel();
        self.inner
            .lock()
            .acquire_waiters
            .entry(port.clone())
            .or_default()
            .push(tx);
        match self.register_with(&port, value.as_ref(), true).await {
            Ok(RegisterOutcome::Owned { token }) => {
                self.inner.lock().acquire_waiters.remove(&port);
                Ok(token)
            }
            Ok(RegisterOutcome::Queued { .. }) => rx.await.map_err(|_| Error::Closed)?,
            Ok(RegisterOutcome::Taken { .. }) => {
                Err(Error::Protocol("TAKEN for a waiting REGISTER".into()))
            }
            Err(e) => {
                self.inner.lock().acquire_waiters.remove(&port);
                Err(e)
            }
        }
    }

    /// Releases a port this session owns, or leaves its queue.
    pub async fn unregister(&self, port: impl AsRef<[u8]>) -> Result<()> {
        let port = Bytes::copy_from_slice(port.as_ref());
        self.ok(
            Request::Unregister { port: &port },
            Kind::Unregister(port.clone()),
        )
        .await
    }

    /// The owner of `port`, or `None` if it is free.
    pub async fn query(&self, port: impl AsRef<[u8]>) -> Result<Option<Owner>> {
        match self
            .request(
                Request::Query {
                    port: port.as_ref(),
                },
                Kind::Plain,
            )
            .await?
        {
            Answer::Owner(mut o) => {
                o.port = Bytes::copy_from_slice(port.as_ref());
                Ok(Some(o))
            }
            Answer::Free => Ok(None),
            other => Err(unexpected(other)),
        }
    }

    /// Watches `port`: [`Event::Claimed`] and [`Event::Released`] follow its changes.
    /// Returns its owner now (session, token), if any.
    pub async fn watch(&self, port: impl AsRef<[u8]>) -> Result<Option<(u64, u64)>> {
        match self
            .request(
                Request::Watch {
                    name: port.as_ref(),
                    prefix: false,
                },
                Kind::Plain,
            )
            .await?
        {
            Answer::Watching(o) => {
                self.inner
                    .lock()
                    .watches
                    .insert((Bytes::copy_from_slice(port.as_ref()), false));
                Ok(o)
            }
            other => Err(unexpected(other)),
        }
    }

    /// Watches every port whose name starts with `prefix`.
    pub async fn watch_prefix(&self, prefix: impl AsRef<[u8]>) -> Result<()> {
        match self
            .request(
                Request::Watch {
                    name: prefix.as_ref(),
                    prefix: true,
                },
                Kind::Plain,
            )
            .await?
        {
            Answer::Watching(_) => {
                self.inner
                    .lock()
                    .watches
                    .insert((Bytes::copy_from_slice(prefix.as_ref()), true));
                Ok(())
            }
            other => Err(unexpected(other)),
        }
    }

    pub async fn unwatch(&self, port: impl AsRef<[u8]>) -> Result<()> {
        self.inner
            .lock()
            .watches
            .remove(&(Bytes::copy_from_slice(port.as_ref()), false));
        self.ok(
            Request::Unwatch {
                name: port.as_ref(),
                prefix: false,
            },
            Kind::Plain,
        )
        .await
    }

    pub async fn unwatch_prefix(&self, prefix: impl AsRef<[u8]>) -> Result<()> {
        self.inner
            .lock()
            .watches
            .remove(&(Bytes::copy_from_slice(prefix.as_ref()), true));
        self.ok(
            Request::Unwatch {
                name: prefix.as_ref(),
                prefix: true,
            },
            Kind::Plain,
        )
        .await
    }

    /// Relays `payload` to the owner of `port` (it gets [`Event::Message`]).
    pub async fn send(
        &self,
        port: impl AsRef<[u8]>,
        payload: impl AsRef<[u8]>,
    ) -> Result<SendOutcome> {
        let req = Request::Send {
            port: port.as_ref(),
            payload: payload.as_ref(),
        };
        match self.request(req, Kind::Plain).await? {
            Answer::Delivered => Ok(SendOutcome::Delivered),
            Answer::NoOwner => Ok(SendOutcome::NoOwner),
            other => Err(unexpected(other)),
        }
    }

    /// Sends `payload` to every other session (`prefix` = `None`) or to the owner of
    /// every port under `prefix`. Returns how many messages were sent.
    pub async fn broadcast(&self, prefix: Option<&[u8]>, payload: impl AsRef<[u8]>) -> Result<u64> {
        match self
            .request(
                Request::Broadcast {
                    prefix,
                    payload: payload.as_ref(),
                },
                Kind::Plain,
            )
            .await?
        {
            Answer::Count(n) => Ok(n),
            other => Err(unexpected(other)),
        }
    }

    /// One page of owned ports under `prefix`, from `cursor` (0 to start).
    pub async fn list(&self, prefix: impl AsRef<[u8]>, cursor: u64, limit: u32) -> Result<Page> {
        match self
            .request(
                Request::List {
                    prefix: prefix.as_ref(),
                    cursor,
                    limit,
                },
                Kind::Plain,
            )
            .await?
        {
            Answer::Page(p) => Ok(p),
            other => Err(unexpected(other)),
        }
    }

    /// Every owned port under `prefix`, page by page. Ports that come and go during
    /// the listing may or may not appear; the others appear exactly once.
    pub async fn list_all(&self, prefix: impl AsRef<[u8]>) -> Result<Vec<Owner>> {
        let limit = self.session().limits.list_limit_max.max(1);
        let mut all = Vec::new();
        let mut cursor = 0;
        loop {
            let page = self.list(prefix.as_ref(), cursor, limit).await?;
            all.extend(page.entries);
            if page.next_cursor == 0 {
                return Ok(all);
            }
            cursor = page.next_cursor;
        }
    }

    /// The server's counters.
    pub async fn stats(&self) -> Result<Vec<(String, u64)>> {
        match self.request(Request::Stats, Kind::Plain).await? {
            Answer::Stats(s) => Ok(s),
            other => Err(unexpected(other)),
        }
    }

    /// Runs a user/role management command (a JSON object, see docs/PROTOCOL.md) and
    /// returns the server's JSON result. Needs the admin permission, or a server with
    /// no users yet and a loopback connection.
    pub async fn admin(&self, command: &str) -> Result<String> {
        match self
            .request(
                Request::Admin {
                    command: command.as_bytes(),
                },
                Kind::Plain,
            )
            .await?
        {
            Answer::Admin(result) => Ok(String::from_utf8_lossy(&result).into_owned()),
            other => Err(unexpected(other)),
        }
    }

    /// A round trip (also renews the lease, as any request does).
    pub async fn ping(&self) -> Result<()> {
        self.ok(Request::Ping, Kind::Plain).await
    }

    /// Ends the session (its ports are released at once) and closes the connection.
    pub async fn close(&self) -> Result<()> {
        let r = self.ok(Request::Bye, Kind::Plain).await;
        self.inner
            .finish(Phase::Closed, "closed by the application");
        r
    }

    /// Closes the connection without ending the session: it stays on the server for
    /// its lease and can be resumed with [`ClientOptions::resume`]. Returns
    /// (session id, secret).
    pub fn detach(&self) -> (u64, u64) {
        let info = self.session();
        self.inner.finish(Phase::Closed, "detached");
        (info.id, info.secret)
    }

    async fn ok(&self, req: Request<'_>, kind: Kind) -> Result<()> {
        match self.request(req, kind).await? {
            Answer::Ok => Ok(()),
            other => Err(unexpected(other)),
        }
    }

    async fn request(&self, req: Request<'_>, kind: Kind) -> Result<Answer> {
        let rx = self.inner.submit(req, kind)?;
        rx.await.map_err(|_| Error::ConnectionLost)?
    }
}

impl Inner {
    /// Queues a request; the receiver gets its answer.
    fn submit(&self, req: Request<'_>, kind: Kind) -> Result<oneshot::Receiver<Result<Answer>>> {
        let rx = {
            let mut st = self.lock();
            match &st.phase {
                Phase::Lost(why) => return Err(Error::SessionLost(why.clone())),
                Phase::Closed => return Err(Error::Closed),
                Phase::Connected(_) | Phase::Reconnecting => {}
            }
            check_limits(&st.info.limits, &req)?;
            st.next_id = st.next_id.wrapping_add(1).max(1);
            let id = st.next_id;
            let (tx, rx) = oneshot::channel();
            st.out.push_request(id, &req);
            if let Kind::Unregister(port) = &kind {
                st.letting_go.insert(port.clone(), id);
            }
            st.pending.insert(
                id,
                Pending {
                    tx: Some(tx),
                    sent_at: Instant::now(),
                    kind,
                },
            );
            rx
        };
        self.wake_writer.notify_one();
        Ok(rx)
    }
}

fn unexpected(a: Answer) -> Error {
    Error::Protocol(format!("unexpected reply {a:?}"))
}

pub(crate) fn check_limits(l: &portswitch_proto::ServerLimits, req: &Request<'_>) -> Result<()> {
    let check = |what, len: usize, max: u32| {
        if len > max as usize {
            Err(Error::TooLarge {
                what,
                len,
                max: max as usize,
            })
        } else {
            Ok(())
        }
    };
    match *req {
        Request::Register { port, value, .. } | Request::Reclaim { port, value, .. } => {
            check("port name", port.len(), l.port_name_bytes_max)?;
            check("value", value.len(), l.value_bytes_max)
        }
        Request::Unregister { port } | Request::Query { port } => {
            check("port name", port.len(), l.port_name_bytes_max)
        }
        Request::Watch { name, .. } | Request::Unwatch { name, .. } => {
            check("port name", name.len(), l.port_name_bytes_max)
        }
        Request::Send { port, payload } => {
            check("port name", port.len(), l.port_name_bytes_max)?;
            check("payload", payload.len(), l.payload_bytes_max)
        }
        Request::Broadcast { prefix, payload } => {
            check(
                "prefix",
                prefix.map_or(0, |p| p.len()),
                l.port_name_bytes_max,
            )?;
            check("payload", payload.len(), l.payload_bytes_max)
        }
        Request::List { prefix, .. } => check("prefix", prefix.len(), l.port_name_bytes_max),
        Request::Admin { command } => check(
            "admin command",
            command.len(),
            portswitch_proto::limits::ADMIN_BYTES_MAX as u32,
        ),
        Request::Hello(_)
        | Request::Auth { .. }
        | Request::Ping
        | Request::Bye
        | Request::Stats => Ok(()),
    }
}

pub(crate) fn safe_lease(opts: &ClientOptions, lease_ms: u32) -> Duration {
    let margin = opts.lease_margin.clamp(0.0, 0.9);
    Duration::from_millis(lease_ms as u64).mul_f64(1.0 - margin)
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, St> {
        self.st.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Ends the session from the client's side: fails everything pending, tells the
    /// application which ports it no longer owns.
    fn finish(&self, phase: Phase, reason: &str) {
        let (pending, waiters, owned) = {
            let mut st = self.lock();
            if matches!(st.phase, Phase::Lost(_) | Phase::Closed) {
                return;
            }
            st.phase = phase.clone();
            if let Some(dead) = st.conn_dead.take() {
                dead.notify_one();
            }
            if !matches!(phase, Phase::Closed) {
                // Nothing more goes out for a lost session; a closed one still flushes
                // what is queued (its BYE).
                st.out.clear();
                st.conn_gen += 1;
            }
            st.values.clear();
            st.watches.clear();
            st.unconfirmed.clear();
            (
                std::mem::take(&mut st.pending),
                std::mem::take(&mut st.acquire_waiters),
                std::mem::take(&mut st.owned),
            )
        };
        self.alive.send_replace(false);
        let err = || match &phase {
            Phase::Closed => Error::Closed,
            _ => Error::SessionLost(reason.to_string()),
        };
        for (_, mut p) in pending {
            if let Some(tx) = p.tx.take() {
                let _ = tx.send(Err(err()));
            }
        }
        for (_, ws) in waiters {
            for w in ws {
                let _ = w.send(Err(err()));
            }
        }
        if matches!(phase, Phase::Lost(_)) {
            let _ = self.events.send(Event::OwnershipLost {
                ports: owned.into_iter().collect(),
                reason: reason.to_string(),
            });
        }
        self.wake_writer.notify_one();
    }
}

/// Connects and exchanges HELLO (and, with credentials, the SCRAM-SHA-256 round
/// trip, checking the server's signature). Returns the stream, the server's answer,
/// any bytes read past it, and when HELLO was sent (the start of the first lease view).
async fn handshake(
    opts: &ClientOptions,
    addr: &str,
    lease_ms: u32,
    resume: Option<(u64, u64)>,
) -> Result<(Stream, HelloOk<'static>, BytesMut, Instant)> {
    let (mut stream, exporter) = open_stream(opts, addr).await?;
    let channel = match &exporter {
        Some(e) => scram::Channel::TlsExporter(e),
        None => scram::Channel::Plain,
    };
    let deadline =
        tokio::time::Instant::now() + opts.answer_timeout.max(Duration::from_millis(100));
    let (resume_session, resume_secret) = resume.unwrap_or((0, 0));
    let (exchange, credentials) = scram_first(opts, channel)?;
    let hello = Hello {
        version_min: PROTOCOL_VERSION,
        version_max: PROTOCOL_VERSION,
        features: 0,
        lease_ms,
        end_on_disconnect: opts.end_on_disconnect,
        node_name: opts.node_name.as_bytes(),
        credentials: &credentials,
        resume_session,
        resume_secret,
    };
    let sent_at = Instant::now();
    send_one(&mut stream, &Request::Hello(hello)).await?;
    let mut buf = BytesMut::with_capacity(4096);
    let frame = next_frame(&mut stream, &mut buf, deadline, addr).await?;
    let (msg, rest) = first_message(&frame)?;
    let (hello_ok, rest) = match (msg, exchange) {
        (
            ServerMsg::Reply {
                reply: Reply::AuthContinue { data },
                ..
            },
            Some(exchange),
        ) => {
            let challenge = std::str::from_utf8(data)
                .map_err(|_| Error::Protocol("challenge is not UTF-8".into()))?;
            let (awaiting, client_final) = exchange
                .respond(challenge, channel)
                .map_err(|e| Error::Protocol(format!("authentication: {e}")))?;
            send_one(
                &mut stream,
                &Request::Auth {
                    data: client_final.as_bytes(),
                },
            )
            .await?;
            let frame = next_frame(&mut stream, &mut buf, deadline, addr).await?;
            let (msg, rest) = first_message(&frame)?;
            match msg {
                ServerMsg::Reply {
                    reply: Reply::HelloOk(h),
                    ..
                } => {
                    let server_final = std::str::from_utf8(h.auth).unwrap_or("");
                    // Mutual authentication: only a server holding our verifier can sign.
                    awaiting.verify(server_final).map_err(|e| {
                        Error::Protocol(format!("the server failed to authenticate: {e}"))
                    })?;
                    (HelloOk { auth: &[], ..h }, rest.to_vec())
                }
                other => return Err(refusal(other)),
            }
        }
        (
            ServerMsg::Reply {
                reply: Reply::HelloOk(h),
                ..
            },
            None,
        ) => (HelloOk { auth: &[], ..h }, rest.to_vec()),
        (
            ServerMsg::Reply {
                reply: Reply::HelloOk(_),
                ..
            },
            Some(_),
        ) => {
            return Err(Error::Protocol(
                "the server accepted the session without authenticating".into(),
            ))
        }
        (other, _) => return Err(refusal(other)),
    };
    let mut leftover = BytesMut::new();
    if !rest.is_empty() {
        // Events that came in the same frame as HELLO_OK (a resume's missed events):
        // re-frame them for the reader.
        leftover.extend_from_slice(&(rest.len() as u32).to_be_bytes());
        leftover.extend_from_slice(&rest);
    }
    leftover.extend_from_slice(&buf);
    Ok((stream, hello_ok, leftover, sent_at))
}

/// With credentials: the SCRAM exchange begun and HELLO's `credentials` (the
/// mechanism and the client-first-message); without: nothing to send.
pub(crate) fn scram_first(
    opts: &ClientOptions,
    channel: scram::Channel<'_>,
) -> Result<(Option<scram::ClientExchange>, Vec<u8>)> {
    let Some((user, password)) = &opts.credentials else {
        return Ok((None, Vec::new()));
    };
    let mut random = [0u8; 18];
    getrandom::getrandom(&mut random)
        .map_err(|e| Error::Io(std::io::Error::other(e.to_string())))?;
    let nonce = scram::nonce_from(&random);
    let (exchange, first) = scram::ClientExchange::start(user, password, &nonce, channel);
    Ok((
        Some(exchange),
        format!("{SCRAM_MECHANISM}{first}").into_bytes(),
    ))
}

/// STATS of the server at `addr`, without opening a session (works on any member of
/// a group, master or not).
pub async fn server_stats(opts: &ClientOptions, addr: &str) -> Result<Vec<(String, u64)>> {
    let (mut stream, _) = open_stream(opts, addr).await?;
    send_one(&mut stream, &Request::Stats).await?;
    let mut buf = BytesMut::with_capacity(4096);
    let deadline = tokio::time::Instant::now() + opts.connect_timeout;
    let frame = next_frame(&mut stream, &mut buf, deadline, addr).await?;
    let (msg, _) = first_message(&frame)?;
    match msg {
        ServerMsg::Reply { reply, .. } => match owned_answer(&reply)? {
            Answer::Stats(s) => Ok(s),
            other => Err(unexpected(other)),
        },
        other => Err(refusal(other)),
    }
}

/// What a handshake with some server of the group came to.
type Handshaken = (Stream, HelloOk<'static>, BytesMut, Instant, String);

/// Whether an error means "try another server of the group" rather than "this
/// session cannot be had".
fn try_elsewhere(e: &Error) -> bool {
    match e {
        Error::Server { code, .. } => {
            matches!(code, ErrorCode::NotMaster | ErrorCode::Overloaded)
        }
        Error::Io(_) | Error::ConnectTimeout(_) | Error::ConnectionLost => true,
        _ => false,
    }
}

/// How long a member taking over as master asked us to wait (`retry_ms=N` in its
/// `not_master` answer), if it did.
pub(crate) fn retry_hint(e: &Error) -> Option<Duration> {
    let Error::Server {
        code: ErrorCode::NotMaster | ErrorCode::Overloaded,
        message,
    } = e
    else {
        return None;
    };
    let (_, n) = message.split_once("retry_ms=")?;
    let ms: u64 = n
        .split(|c: char| !c.is_ascii_digit())
        .next()?
        .parse()
        .ok()?;
    Some(Duration::from_millis(ms.min(10_000)))
}

/// Waits as long as a server said (`retry_ms`), spread over a few ms more so that
/// its clients do not all come back in one instant.
pub(crate) async fn wait_as_told(wait: Duration) {
    let spread = Duration::from_millis(fastrand::u64(0..=20));
    tokio::time::sleep(wait + spread).await;
}

/// Handshakes with the group's master: `addr`, then the other servers, following a
/// follower's `master=` hint at once. `failed` (the server whose connection just
/// failed) is asked alongside them rather than first: it may be silent rather than
/// dead (its data centre cut off), and then an attempt on it costs a whole
/// `answer_timeout`, while a live member answers in a round trip and names the
/// master if there is one. Returns the first success, or the last error.
async fn handshake_any(
    opts: &ClientOptions,
    failed: Option<&str>,
    lease_ms: u32,
    resume: Option<(u64, u64)>,
) -> Result<Handshaken> {
    let mut todo: std::collections::VecDeque<String> = std::iter::once(opts.addr.clone())
        .chain(opts.servers.iter().cloned())
        .filter(|a| Some(a.as_str()) != failed)
        .collect();
    let alone = todo.is_empty();
    let mut tried: std::collections::HashSet<String> =
        failed.map(str::to_string).into_iter().collect();
    let mut beside = failed.map(|f| Box::pin(handshake(opts, f, lease_ms, resume)));
    let mut last = Error::ConnectionLost;
    // What one attempt came to: done (success or a final error), or try on.
    let mut settle = |r: Result<(Stream, HelloOk<'static>, BytesMut, Instant)>,
                      addr: String,
                      todo: &mut std::collections::VecDeque<String>|
     -> Option<Result<Handshaken>> {
        match r {
            Ok((s, h, rest, sent)) => Some(Ok((s, h, rest, sent, addr))),
            // The master is admitting sessions as fast as it will: it said when to
            // come back, and no other server can help.
            Err(
                e @ Error::Server {
                    code: ErrorCode::Overloaded,
                    ..
                },
            ) => Some(Err(e)),
            Err(e) if try_elsewhere(&e) => {
                if let Error::Server { message, .. } = &e {
                    if let Some(master) = message.strip_prefix("master=") {
                        // A hint at the server that just failed us adds nothing:
                        // it is being asked already.
                        if Some(master) != failed {
                            todo.push_front(master.to_string());
                        }
                    }
                }
                tracing::debug!(%addr, error = %e, "not served here; trying the next server");
                last = e;
                None
            }
            Err(e) => Some(Err(e)),
        }
    };
    while let Some(addr) = todo.pop_front() {
        if !tried.insert(addr.clone()) {
            continue;
        }
        let here = handshake(opts, &addr, lease_ms, resume);
        let (r, from) = match beside.as_mut() {
            None => (here.await, addr.clone()),
            Some(b) => tokio::select! {
                r = here => (r, addr.clone()),
                r = b => {
                    beside = None;
                    // The attempt on `addr` was cut short: it is asked again.
                    tried.remove(&addr);
                    todo.push_front(addr.clone());
                    (r, failed.unwrap_or_default().to_string())
                }
            },
        };
        if let Some(done) = settle(r, from, &mut todo) {
            return done;
        }
    }
    if let (Some(b), Some(f)) = (beside, failed) {
        // The others are not serving. The failed server gets a little longer (it may
        // be alive, and only our connection to it broke), unless it is the only one;
        // then the caller backs off and asks everyone again, instead of hanging on a
        // silent server for a whole answer_timeout while a new master comes up.
        let r = if alone {
            Some(b.await)
        } else {
            tokio::time::timeout(FAILED_SERVER_GRACE, b).await.ok()
        };
        if let Some(r) = r {
            if let Some(done) = settle(r, f.to_string(), &mut todo) {
                return done;
            }
        }
    }
    Err(last)
}

/// How much longer than the other servers' answers a reconnecting client waits for
/// the server whose connection just failed, before asking everyone again.
const FAILED_SERVER_GRACE: Duration = Duration::from_millis(200);

/// The mechanism prefix of HELLO credentials.
const SCRAM_MECHANISM: &str = "SCRAM-SHA-256 ";

async fn send_one(stream: &mut Stream, req: &Request<'_>) -> Result<()> {
    let mut fb = FrameBuf::new(FRAME_BYTES_MAX, 1);
    fb.push_request(1, req);
    let mut bytes = BytesMut::new();
    fb.take_into(&mut bytes);
    stream.write_all(&bytes).await?;
    Ok(())
}

/// Reads until `buf` starts with a whole frame and splits it off.
async fn next_frame(
    stream: &mut Stream,
    buf: &mut BytesMut,
    deadline: tokio::time::Instant,
    addr: &str,
) -> Result<BytesMut> {
    loop {
        if let Some(n) =
            frame_len(buf, FRAME_BYTES_MAX).map_err(|e| Error::Protocol(e.to_string()))?
        {
            return Ok(buf.split_to(n));
        }
        let read = tokio::time::timeout_at(deadline, stream.read_buf(buf))
            .await
            .map_err(|_| Error::ConnectTimeout(addr.to_string()))??;
        if read == 0 {
            return Err(Error::Io(std::io::ErrorKind::UnexpectedEof.into()));
        }
    }
}

/// The first message of a frame, and the bytes of the frame's other messages.
fn first_message(frame: &[u8]) -> Result<(ServerMsg<'_>, &[u8])> {
    let m = messages(&frame[4..], COMMANDS_PER_FRAME_MAX)
        .next()
        .ok_or_else(|| Error::Protocol("empty frame".into()))?
        .map_err(|e| Error::Protocol(e.to_string()))?;
    let msg =
        ServerMsg::decode(m.opcode, m.id, m.body).map_err(|e| Error::Protocol(e.to_string()))?;
    Ok((msg, &frame[4 + 9 + m.body.len()..]))
}

/// The error for a handshake answer that is not the expected one.
fn refusal(msg: ServerMsg<'_>) -> Error {
    match msg {
        ServerMsg::Reply {
            reply: Reply::Error { code, message },
            ..
        }
        | ServerMsg::Event(WireEvent::GoAway { code, message }) => Error::Server {
            code,
            message: String::from_utf8_lossy(message).into_owned(),
        },
        other => Error::Protocol(format!("unexpected handshake answer {other:?}")),
    }
}

fn start_connection(inner: Arc<Inner>, stream: Stream, rest: BytesMut, gen: u64) {
    let (rd, wr) = tokio::io::split(stream);
    let dead = Arc::new(Notify::new());
    let w = tokio::spawn(writer(inner.clone(), wr, gen, dead.clone()));
    {
        let mut st = inner.lock();
        st.conn_dead = Some(dead.clone());
        st.conn_writer = Some(w);
    }
    tokio::spawn(reader(inner, rd, rest, gen, dead));
}

async fn writer(inner: Arc<Inner>, mut wr: WriteHalf<Stream>, gen: u64, dead: Arc<Notify>) {
    let mut buf = BytesMut::new();
    loop {
        let closing = {
            let mut st = inner.lock();
            // A lost connection's writer lets go of its socket at once: a process with
            // thousands of sessions would otherwise hold every old socket as well as
            // every new attempt through a failover, and run out of descriptors.
            if st.conn_gen != gen || st.phase == Phase::Reconnecting {
                break;
            }
            st.out.take_into(&mut buf);
            st.phase == Phase::Closed
        };
        if !buf.is_empty() {
            if wr.write_all(&buf).await.is_err() {
                dead.notify_one();
                break;
            }
            if !closing {
                continue; // more may have piled up during the write
            }
        }
        if closing {
            break;
        }
        inner.wake_writer.notified().await;
        // Let the other tasks that are ready run first: what they submit joins this
        // frame instead of costing a write of its own.
        tokio::task::yield_now().await;
    }
    let _ = wr.shutdown().await;
}

async fn reader(
    inner: Arc<Inner>,
    mut rd: ReadHalf<Stream>,
    mut buf: BytesMut,
    gen: u64,
    dead: Arc<Notify>,
) {
    let why = loop {
        loop {
            match frame_len(&buf, FRAME_BYTES_MAX) {
                Ok(Some(n)) => {
                    let frame = buf.split_to(n);
                    if dispatch(&inner, &frame[4..], gen).is_err() {
                        return; // this connection is stale
                    }
                }
                Ok(None) => break,
                Err(e) => {
                    inner.finish(Phase::Lost(e.to_string()), "server sent a malformed frame");
                    return;
                }
            }
        }
        if inner.lock().conn_gen != gen {
            return;
        }
        tokio::select! {
            r = rd.read_buf(&mut buf) => match r {
                Ok(0) => break "connection closed by the server".to_string(),
                Err(e) => break format!("connection error: {e}"),
                Ok(_) => {}
            },
            _ = dead.notified() => break "connection write failed".to_string(),
        }
    };
    // The socket closes once the writer lets go too; reconnecting can take a while.
    drop((rd, buf));
    on_disconnect(inner, gen, why).await;
}

/// Handles every message of one frame.
fn dispatch(inner: &Inner, body: &[u8], gen: u64) -> Result<(), ()> {
    let mut events = Vec::new();
    let mut completions = Vec::new();
    let mut goaway = None;
    {
        let mut st = inner.lock();
        if st.conn_gen != gen {
            return Err(());
        }
        for m in messages(body, usize::MAX) {
            let Ok(m) = m else { break };
            let Ok(msg) = ServerMsg::decode(m.opcode, m.id, m.body) else {
                continue;
            };
            match msg {
                ServerMsg::Reply { id, reply } => {
                    let Some(mut p) = st.pending.remove(&id) else {
                        continue;
                    };
                    // An answer proves the server held the session when the request
                    // was sent — unless it says the server has no session for us:
                    // the lease view runs from the send time.
                    let disproves = matches!(
                        reply,
                        Reply::Error {
                            code: ErrorCode::NoSession
                                | ErrorCode::NotMaster
                                | ErrorCode::SessionExpired
                                | ErrorCode::ResumeFailed,
                            ..
                        }
                    );
                    let end = p.sent_at + st.safe_lease;
                    if end > st.view_end && !disproves {
                        st.view_end = end;
                    }
                    let answer = owned_answer(&reply);
                    if let Ok(a) = &answer {
                        let released_since = |st: &St, port: &Bytes| {
                            st.letting_go
                                .get(port)
                                .is_some_and(|&u| (u.wrapping_sub(id) as i32) > 0)
                        };
                        match (&p.kind, a) {
                            (Kind::Register(port, _), Answer::Registered(_))
                                if released_since(&st, port) => {}
                            (Kind::Register(port, value), Answer::Registered(t)) => {
                                st.owned.insert(port.clone(), *t);
                                remember_value(&mut st.values, port, value);
                                // A waiter re-queued after a failover may be granted
                                // at once: whoever awaits the port has it.
                                if let Some(ws) = st.acquire_waiters.remove(port) {
                                    for w in ws {
                                        let _ = w.send(Ok(*t));
                                    }
                                }
                            }
                            (Kind::Register(port, value), Answer::Queued(_)) => {
                                remember_value(&mut st.values, port, value);
                            }
                            (Kind::Unregister(port), Answer::Ok) => {
                                st.owned.remove(port);
                                st.values.remove(port);
                                st.unconfirmed.remove(port);
                            }
                            _ => {}
                        }
                    }
                    if let Kind::Unregister(port) = &p.kind {
                        if st.letting_go.get(port) == Some(&id) {
                            st.letting_go.remove(port);
                        }
                    }
                    if let Some(tx) = p.tx.take() {
                        completions.push((tx, answer));
                    }
                }
                ServerMsg::Event(e) => match e {
                    WireEvent::Acquired { port, token } => {
                        let port = Bytes::copy_from_slice(port);
                        // Granted before the server saw our UNREGISTER, which
                        // releases it again: not ours.
                        if !st.letting_go.contains_key(&port) {
                            st.owned.insert(port.clone(), token);
                        }
                        if let Some(ws) = st.acquire_waiters.remove(&port) {
                            for w in ws {
                                let _ = w.send(Ok(token));
                            }
                        }
                        events.push(Event::Acquired { port, token });
                    }
                    WireEvent::Released { port, token } => events.push(Event::Released {
                        port: Bytes::copy_from_slice(port),
                        token,
                    }),
                    WireEvent::Claimed {
                        port,
                        session,
                        token,
                        node,
                    } => events.push(Event::Claimed {
                        port: Bytes::copy_from_slice(port),
                        session,
                        token,
                        node: Bytes::copy_from_slice(node),
                    }),
                    WireEvent::Message {
                        from,
                        port,
                        payload,
                    } => events.push(Event::Message {
                        from,
                        port: Bytes::copy_from_slice(port),
                        payload: Bytes::copy_from_slice(payload),
                    }),
                    WireEvent::Resync => events.push(Event::Resync),
                    WireEvent::Recovered => events.push(Event::Recovered),
                    WireEvent::GoAway { code, message } => {
                        goaway = Some((code, String::from_utf8_lossy(message).into_owned()));
                    }
                },
            }
        }
    }
    for (tx, a) in completions {
        let _ = tx.send(a);
    }
    for e in events {
        let _ = inner.events.send(e);
    }
    if let Some((code, msg)) = goaway {
        // The server is closing this connection. A session it expired or that it
        // refuses is over; otherwise (shutdown, slow consumer) the reader sees EOF
        // next and the client tries to resume.
        if code == ErrorCode::SessionExpired {
            inner.finish(Phase::Lost(msg.clone()), &format!("{code}: {msg}"));
        }
        tracing::debug!(%code, %msg, "GOAWAY from server");
    }
    Ok(())
}

fn remember_value(values: &mut HashMap<Bytes, Bytes>, port: &Bytes, value: &Bytes) {
    if value.is_empty() {
        values.remove(port);
    } else {
        values.insert(port.clone(), value.clone());
    }
}

pub(crate) fn owned_answer(r: &Reply<'_>) -> Result<Answer> {
    let b = Bytes::copy_from_slice;
    Ok(match *r {
        Reply::Ok => Answer::Ok,
        Reply::Registered { token } => Answer::Registered(token),
        Reply::Taken {
            session,
            token,
            node,
        } => Answer::Taken(session, token, b(node)),
        Reply::Queued { position } => Answer::Queued(position),
        Reply::Owner {
            session,
            token,
            node,
            value,
        } => Answer::Owner(Owner {
            port: Bytes::new(),
            session,
            token,
            node: b(node),
            value: b(value),
        }),
        Reply::Free => Answer::Free,
        Reply::Watching { owner } => Answer::Watching(owner),
        Reply::Delivered => Answer::Delivered,
        Reply::NoOwner => Answer::NoOwner,
        Reply::Count { count } => Answer::Count(count),
        Reply::Page { next_cursor, .. } => Answer::Page(Page {
            next_cursor,
            entries: r
                .page_entries()
                .map(|e| Owner {
                    port: b(e.port),
                    session: e.session,
                    token: e.token,
                    node: b(e.node),
                    value: b(e.value),
                })
                .collect(),
        }),
        Reply::Stats { .. } => Answer::Stats(
            r.stats_entries()
                .map(|(k, v)| (String::from_utf8_lossy(k).into_owned(), v))
                .collect(),
        ),
        Reply::Error { code, message } => {
            return Err(Error::Server {
                code,
                message: String::from_utf8_lossy(message).into_owned(),
            })
        }
        Reply::AdminOk { result } => Answer::Admin(b(result)),
        Reply::HelloOk(_) | Reply::AuthContinue { .. } => {
            return Err(Error::Protocol(
                "handshake reply outside a handshake".into(),
            ))
        }
    })
}

/// The connection is gone: fail what was in flight, then resume the session on a new
/// connection while the lease view lasts (or give up at once for an end-on-disconnect
/// session, whose ports the server has already released).
async fn on_disconnect(inner: Arc<Inner>, gen: u64, why: String) {
    let (pending, old_writer) = {
        let mut st = inner.lock();
        if st.conn_gen != gen || !matches!(st.phase, Phase::Connected(_)) {
            return;
        }
        st.phase = Phase::Reconnecting;
        st.out.clear();
        // Ports the application was letting go of are not ours to take back, whether
        // or not the server saw the UNREGISTER.
        for port in std::mem::take(&mut st.letting_go).into_keys() {
            st.owned.remove(&port);
            st.values.remove(&port);
            st.unconfirmed.remove(&port);
        }
        (std::mem::take(&mut st.pending), st.conn_writer.take())
    };
    // The lost connection's writer is waiting for work; it sees the phase and ends,
    // closing the socket, before this session opens another.
    inner.wake_writer.notify_waiters();
    if let Some(w) = old_writer {
        let _ = tokio::time::timeout(WRITER_END_WAIT, w).await;
    }
    for (_, mut p) in pending {
        if let Some(tx) = p.tx.take() {
            let _ = tx.send(Err(Error::ConnectionLost));
        }
    }
    if inner.opts.end_on_disconnect {
        inner.finish(
            Phase::Lost(why.clone()),
            &format!("{why}; the session ends on disconnect"),
        );
        return;
    }
    let _ = inner.events.send(Event::Disconnected);
    let mut backoff = Duration::from_millis(20);
    loop {
        let (view_end, info, server) = {
            let st = inner.lock();
            if st.phase != Phase::Reconnecting {
                return;
            }
            (st.view_end, st.info, st.server.clone())
        };
        if Instant::now() >= view_end {
            inner.finish(
                Phase::Lost("lease view expired while reconnecting".into()),
                "could not resume in time",
            );
            return;
        }
        let attempt = handshake_any(
            &inner.opts,
            Some(&server),
            info.lease_ms,
            Some((info.id, info.secret)),
        );
        let left = view_end.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, attempt).await {
            Ok(Ok((_, hello, _, _, _))) if hello.epoch < info.epoch => {
                // A master older than one this session has seen is deposed (or about
                // to learn it is): its answers must not extend the lease view.
                tracing::warn!(
                    epoch = hello.epoch,
                    seen = info.epoch,
                    "refusing a server with an older epoch"
                );
            }
            Ok(Ok((stream, hello, rest, sent_at, addr))) => {
                let new_master = hello.epoch > info.epoch;
                let new_gen = {
                    let mut st = inner.lock();
                    if st.phase != Phase::Reconnecting {
                        return;
                    }
                    st.conn_gen += 1;
                    st.phase = Phase::Connected(st.conn_gen);
                    let end = sent_at + st.safe_lease;
                    if end > st.view_end {
                        st.view_end = end;
                    }
                    st.info.epoch = hello.epoch;
                    st.server = addr;
                    if new_master {
                        // Every port must be reclaimed before the new master's window
                        // can close; past that the client must not count on it.
                        let margin = inner.opts.lease_margin.clamp(0.0, 0.9);
                        let window =
                            Duration::from_millis(hello.recovery_ms as u64).mul_f64(1.0 - margin);
                        let deadline = sent_at + window;
                        let ports: Vec<Bytes> = st.owned.keys().cloned().collect();
                        for p in ports {
                            st.unconfirmed.insert(p, deadline);
                        }
                        st.resync_due = true;
                    }
                    let recover = !st.unconfirmed.is_empty() || st.resync_due;
                    (st.conn_gen, recover)
                };
                let (new_gen, recover) = new_gen;
                start_connection(inner.clone(), stream, rest, new_gen);
                let _ = inner.events.send(Event::Reconnected);
                inner.wake_writer.notify_one();
                if recover {
                    // Also after a resume on the same master that cut an earlier
                    // reclaim short.
                    tokio::spawn(reclaim_all(inner.clone()));
                }
                return;
            }
            Ok(Err(Error::Server { code, message }))
                if !matches!(code, ErrorCode::NotMaster | ErrorCode::Overloaded) =>
            {
                inner.finish(
                    Phase::Lost(message.clone()),
                    &format!("resume refused: {code}: {message}"),
                );
                return;
            }
            Ok(Err(e)) => {
                if let Some(wait) = retry_hint(&e) {
                    wait_as_told(wait).await;
                    backoff = Duration::from_millis(20);
                    continue;
                }
            }
            Err(_) => {}
        }
        // Jittered exponential backoff, so that many clients do not reconnect in step;
        // capped low, because a new master serves within about a second of the old
        // one's death and every held port waits for its owner to come back.
        let jitter = 0.5 + fastrand::f64();
        tokio::time::sleep(backoff.mul_f64(jitter)).await;
        backoff = (backoff * 2).min(RECONNECT_BACKOFF_MAX);
    }
}

/// How long a session that lost its connection waits for that connection's writer to
/// end (it is only waiting to be scheduled) before it connects again.
const WRITER_END_WAIT: Duration = Duration::from_millis(100);

/// Longest pause between two rounds of reconnect attempts (before jitter): short
/// enough (× 1.5 < the 330 ms a new master waits before serving) that every client
/// asks the new master at least once while it is taking over, and so learns exactly
/// when to come back.
const RECONNECT_BACKOFF_MAX: Duration = Duration::from_millis(150);

/// RECLAIMs sent per round trip after a failover: enough to fill frames, few enough
/// that a session with a million ports neither floods the new master's send queue
/// nor its own memory.
const RECLAIM_CHUNK: usize = 1_024;

/// The session was adopted by a new master: take back every port with its token (in
/// chunks), re-watch, re-queue, and tell the application to re-read what it watches.
/// A port the new master will not give back is reported as [`Event::PortLost`].
async fn reclaim_all(inner: Arc<Inner>) {
    let (owned, values) = {
        let st = inner.lock();
        (
            st.unconfirmed
                .keys()
                .filter_map(|p| st.owned.get(p).map(|t| (p.clone(), *t)))
                .collect::<Vec<_>>(),
            st.values.clone(),
        )
    };
    let empty = Bytes::new();
    for chunk in owned.chunks(RECLAIM_CHUNK) {
        let mut answers = Vec::with_capacity(chunk.len());
        for (port, token) in chunk {
            let value = values.get(port).unwrap_or(&empty);
            let req = Request::Reclaim {
                port,
                token: *token,
                value,
            };
            match inner.submit(req, Kind::Plain) {
                Ok(rx) => answers.push((port, *token, rx)),
                Err(_) => return, // the session is over: OwnershipLost said it all
            }
        }
        for (port, token, rx) in answers {
            let reason = match rx.await {
                Ok(Ok(Answer::Registered(t))) if t == token => {
                    inner.lock().unconfirmed.remove(port);
                    continue;
                }
                Ok(Ok(other)) => format!("the new master answered {other:?}"),
                Ok(Err(Error::ConnectionLost)) | Err(_) => {
                    // The connection dropped again; the next resume reclaims again.
                    return;
                }
                Ok(Err(e)) => format!("the new master refused: {e}"),
            };
            let lost = {
                let mut st = inner.lock();
                let held = st.owned.get(port) == Some(&token);
                if held {
                    st.owned.remove(port);
                    st.values.remove(port);
                }
                st.unconfirmed.remove(port);
                held
            };
            if lost {
                let _ = inner.events.send(Event::PortLost {
                    port: port.clone(),
                    token,
                    reason,
                });
            }
        }
    }
    let (watches, awaited) = {
        let mut st = inner.lock();
        if !std::mem::take(&mut st.resync_due) {
            return;
        }
        (
            st.watches.iter().cloned().collect::<Vec<_>>(),
            st.acquire_waiters.keys().cloned().collect::<Vec<_>>(),
        )
    };
    for (name, prefix) in watches {
        let _ = inner.submit(
            Request::Watch {
                name: &name,
                prefix,
            },
            Kind::Plain,
        );
    }
    for port in awaited {
        let value = values.get(&port).cloned().unwrap_or_default();
        let req = Request::Register {
            port: &port,
            value: &value,
            wait: true,
        };
        let _ = inner.submit(req, Kind::Register(port.clone(), value.clone()));
    }
    let _ = inner.events.send(Event::Resync);
}

/// Sends a PING every third of the lease, drops a connection whose oldest request
/// has gone unanswered for `answer_timeout` (so the session resumes elsewhere), and
/// declares the session lost when the lease view runs out without an answer.
async fn keepalive(weak: std::sync::Weak<Inner>) {
    let mut next_ping = Instant::now();
    loop {
        let Some(inner) = weak.upgrade() else { return };
        let (view_end, lease, phase, oldest, dead) = {
            let st = inner.lock();
            (
                st.view_end,
                Duration::from_millis(st.info.lease_ms as u64),
                st.phase.clone(),
                st.pending.values().map(|p| p.sent_at).min(),
                st.conn_dead.clone(),
            )
        };
        let answer_timeout = inner.opts.answer_timeout;
        let late: Vec<(Bytes, u64)> = {
            let mut st = inner.lock();
            let now = Instant::now();
            let late: Vec<Bytes> = st
                .unconfirmed
                .iter()
                .filter(|(_, &d)| now >= d)
                .map(|(p, _)| p.clone())
                .collect();
            late.into_iter()
                .filter_map(|p| {
                    st.unconfirmed.remove(&p);
                    st.values.remove(&p);
                    st.owned.remove(&p).map(|t| (p, t))
                })
                .collect()
        };
        for (port, token) in late {
            let _ = inner.events.send(Event::PortLost {
                port,
                token,
                reason: "not reclaimed before the new master's recovery window could close".into(),
            });
        }
        match phase {
            Phase::Lost(_) | Phase::Closed => return,
            Phase::Connected(_) | Phase::Reconnecting => {}
        }
        let now = Instant::now();
        if now >= view_end {
            inner.finish(
                Phase::Lost("lease view expired".into()),
                "no answer from the server within the lease",
            );
            return;
        }
        let unanswered = oldest.is_some_and(|t| now.saturating_duration_since(t) >= answer_timeout);
        if matches!(phase, Phase::Connected(_)) && unanswered {
            tracing::debug!("no answer within answer_timeout: dropping the connection");
            if let Some(dead) = dead {
                dead.notify_one();
            }
        } else if matches!(phase, Phase::Connected(_)) && now >= next_ping {
            let every = inner.opts.keepalive.map_or(lease / 3, |k| k.min(lease / 3));
            next_ping = now + every.max(Duration::from_millis(1));
            let mut st = inner.lock();
            st.next_id = st.next_id.wrapping_add(1).max(1);
            let id = st.next_id;
            st.out.push_request(id, &Request::Ping);
            st.pending.insert(
                id,
                Pending {
                    tx: None,
                    sent_at: now,
                    kind: Kind::Plain,
                },
            );
            drop(st);
            inner.wake_writer.notify_one();
        }
        let check = (answer_timeout / 2).clamp(Duration::from_millis(10), lease / 3);
        let mut next = (now + check).min(view_end);
        if next_ping > now {
            next = next.min(next_ping);
        }
        // Give up an unreclaimed port on time, not at the next check.
        if let Some(d) = inner.lock().unconfirmed.values().min() {
            next = next.min((*d).max(now + Duration::from_millis(1)));
        }
        drop(inner);
        tokio::time::sleep_until(next.into()).await;
    }
}
