//! A session as applications use it: [`Client`], whichever driver carries it — a
//! connection of its own (`direct`) or a channel of a shared one ([`crate::Mux`]).
//! Both drive the same [`SessionCore`], so a session behaves the same on either:
//! batching, lease view, failover, reclaim, waiting.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use portswitch_proto::limits::NODE_NAME_BYTES_MAX;
use portswitch_proto::Request;
use tokio::sync::{broadcast, oneshot, watch};

use crate::name::Name;
use crate::session::{Answer, Effects, Kind, SessionCore, Settings};
use crate::types::*;

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
    /// SIGSTOP keeps its sockets open; this is how clients leave it. Default (`None`):
    /// a sixth of the lease, between 100 ms and 1 s, so that a session notices a
    /// silent master early enough to resume on its successor before its lease view
    /// runs out.
    pub answer_timeout: Option<Duration>,
    /// Longest quiet time on a connection before the client sends a PING (never more
    /// than a quarter of the lease, the default). A server that goes silent — its data
    /// centre cut off, say — is only noticed when a request goes unanswered, so an idle
    /// session finds it after up to this plus the answer timeout; shorter costs PINGs.
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

/// The default session lease.
pub const LEASE_MS_DEFAULT: u64 = 10_000;

/// Bounds of the default answer timeout (a sixth of the lease).
const ANSWER_TIMEOUT_MIN: Duration = Duration::from_millis(100);
const ANSWER_TIMEOUT_MAX: Duration = Duration::from_secs(1);

impl ClientOptions {
    pub fn new(addr: impl Into<String>) -> Self {
        ClientOptions {
            addr: addr.into(),
            servers: Vec::new(),
            node_name: default_node_name(),
            lease: Duration::from_millis(LEASE_MS_DEFAULT),
            end_on_disconnect: false,
            lease_margin: 0.1,
            connect_timeout: Duration::from_secs(5),
            answer_timeout: None,
            keepalive: None,
            resume: None,
            credentials: None,
            tls: None,
            events_capacity: 4_096,
        }
    }

    /// The answer timeout for a session with a lease of `lease_ms`.
    pub fn answer_timeout_for(&self, lease_ms: u32) -> Duration {
        self.answer_timeout.unwrap_or_else(|| {
            (Duration::from_millis(lease_ms as u64) / 6)
                .clamp(ANSWER_TIMEOUT_MIN, ANSWER_TIMEOUT_MAX)
        })
    }

    /// The lease to ask for, in ms.
    pub(crate) fn lease_ms(&self) -> u32 {
        u32::try_from(self.lease.as_millis()).unwrap_or(u32::MAX)
    }

    pub(crate) fn settings(&self) -> Settings {
        Settings {
            lease_margin: self.lease_margin,
            end_on_disconnect: self.end_on_disconnect,
            keepalive: self.keepalive,
        }
    }

    /// Refuses options no server would accept, before connecting.
    pub(crate) fn check(&self) -> Result<()> {
        if self.node_name.len() > NODE_NAME_BYTES_MAX {
            return Err(Error::TooLarge {
                what: "node name",
                len: self.node_name.len(),
                max: NODE_NAME_BYTES_MAX,
            });
        }
        Ok(())
    }
}

fn default_node_name() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    let host = host.trim();
    let mut name = format!(
        "{}:{}",
        if host.is_empty() { "client" } else { host },
        std::process::id()
    );
    while name.len() > NODE_NAME_BYTES_MAX {
        name.pop();
    }
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

/// What a request's submitter waits on.
pub(crate) type Tx = oneshot::Sender<Result<Answer>>;

/// What the application hears of a session: its events, and whether it lives.
pub(crate) struct Signals {
    pub events: broadcast::Sender<Event>,
    pub alive: watch::Sender<bool>,
}

impl Signals {
    pub fn new(events_capacity: usize) -> Arc<Signals> {
        let (events, _) = broadcast::channel(events_capacity.max(1));
        let (alive, _) = watch::channel(true);
        Arc::new(Signals { events, alive })
    }

    /// Delivers what a session's core produced; call with no lock held.
    pub fn deliver(&self, fx: &mut Effects<Tx>) {
        for (tx, r) in fx.done.drain(..) {
            let _ = tx.send(r);
        }
        for e in fx.events.drain(..) {
            let _ = self.events.send(e);
        }
        if std::mem::take(&mut fx.ended) {
            self.alive.send_replace(false);
        }
    }
}

/// The driver a session rides on.
#[derive(Clone)]
pub(crate) enum Link {
    Direct(Arc<crate::direct::Shared>),
    Mux(Arc<crate::mux::Inner>, u16, u64),
}

impl Link {
    /// Runs `f` on the session's core under its driver's lock (with the wire its
    /// requests go to), then wakes the writer and delivers what came of it.
    fn with<R>(&self, f: impl FnOnce(&SessionCore<Tx>) -> R) -> Option<R> {
        match self {
            Link::Direct(d) => Some(d.with(f)),
            Link::Mux(m, ch, key) => m.with(*ch, *key, f),
        }
    }

    fn submit(&self, req: &Request<'_>, kind: Kind, done: Option<Tx>) -> Result<()> {
        match self {
            Link::Direct(d) => d.submit(req, kind, done),
            Link::Mux(m, ch, key) => m.submit(*ch, *key, req, kind, done),
        }
    }

    /// Ends the session on the client's side (its driver flushes what is queued, a
    /// BYE say, and lets go of the connection or channel).
    fn close(&self) {
        match self {
            Link::Direct(d) => d.close(),
            Link::Mux(m, ch, key) => m.close_session(*ch, *key),
        }
    }
}

/// A portswitch session. Cheap to clone; all clones share the session.
///
/// Requests from any number of tasks are batched into frames automatically: whatever
/// is submitted while a write is in flight goes out in the next frame, and replies
/// are matched to requests in order, so one connection pipelines without waiting.
#[derive(Clone)]
pub struct Client {
    link: Link,
    signals: Arc<Signals>,
    /// The session as opened, for when its driver has let go of it.
    opened: SessionInfo,
    _guard: Arc<DropGuard>,
}

/// Ends the session (BYE) when the last clone of a [`Client`] is dropped, so a
/// forgotten client does not keep ports alive. Holds whatever keeps the session's
/// connection open (a [`crate::Mux`]'s guard).
struct DropGuard {
    link: Link,
    _keep: Option<Arc<dyn std::any::Any + Send + Sync>>,
}

impl Drop for DropGuard {
    fn drop(&mut self) {
        let _ = self.link.submit(&Request::Bye, Kind::Plain, None);
        self.link.close();
    }
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("session", &self.session().id)
            .finish_non_exhaustive()
    }
}

impl Client {
    /// Connects, opens (or resumes) a session, and starts keeping it alive.
    pub async fn connect(opts: ClientOptions) -> Result<Client> {
        crate::direct::connect(opts).await
    }

    /// Connects to `addr` with default options.
    pub async fn connect_to(addr: impl Into<String>) -> Result<Client> {
        Client::connect(ClientOptions::new(addr)).await
    }

    pub(crate) fn new(
        link: Link,
        signals: Arc<Signals>,
        opened: SessionInfo,
        keep: Option<Arc<dyn std::any::Any + Send + Sync>>,
    ) -> Client {
        Client {
            opened,
            _guard: Arc::new(DropGuard {
                link: link.clone(),
                _keep: keep,
            }),
            link,
            signals,
        }
    }

    pub fn session(&self) -> SessionInfo {
        self.link.with(|core| core.info()).unwrap_or(self.opened)
    }

    /// Subscribes to this session's events (from now on).
    pub fn events(&self) -> broadcast::Receiver<Event> {
        self.signals.events.subscribe()
    }

    /// Whether the session is still held (the lease view has not run out).
    pub fn is_alive(&self) -> bool {
        *self.signals.alive.borrow()
    }

    /// Resolves when the session is lost or closed; an owner must stop acting as owner
    /// of every port at that moment.
    pub async fn lost(&self) {
        let mut rx = self.signals.alive.subscribe();
        let _ = rx.wait_for(|alive| !*alive).await;
    }

    /// Ports this session owns, as far as the client knows, with their tokens.
    pub fn owned_ports(&self) -> Vec<(Bytes, u64)> {
        self.link
            .with(|core| core.owned_ports())
            .unwrap_or_default()
    }

    /// Whether this session owns `port` with `token`, as far as the client knows.
    pub fn owns(&self, port: impl AsRef<[u8]>, token: u64) -> bool {
        self.link
            .with(|core| core.owns(port.as_ref(), token))
            .unwrap_or(false)
    }

    /// Registers `port` without waiting: owned, or taken by someone else.
    pub async fn register(
        &self,
        port: impl AsRef<[u8]>,
        value: impl AsRef<[u8]>,
    ) -> Result<RegisterOutcome> {
        let rx = self.start_register(port.as_ref(), value.as_ref(), false);
        register_outcome(answer(rx).await?)
    }

    /// Registers `port`, joining its FIFO queue if taken; `Queued` means an
    /// [`Event::Acquired`] follows when it is granted. The place in the queue is
    /// kept across a failover (taken again on the new master).
    pub async fn register_with(
        &self,
        port: &[u8],
        value: &[u8],
        wait: bool,
    ) -> Result<RegisterOutcome> {
        let rx = self.start_register(port, value, wait);
        register_outcome(answer(rx).await?)
    }

    fn start_register(&self, port: &[u8], value: &[u8], wait: bool) -> Started {
        let kind = Kind::Register {
            port: Name::new(port),
            value: Bytes::copy_from_slice(value),
            wait,
            until_granted: false,
        };
        self.start(&Request::Register { port, value, wait }, kind)
    }

    /// Registers `port`, waiting in its FIFO queue until granted. Returns the token.
    /// The wait survives lost connections and master failovers; it ends with the
    /// session, or with an UNREGISTER of the port.
    pub async fn register_wait(
        &self,
        port: impl AsRef<[u8]>,
        value: impl AsRef<[u8]>,
    ) -> Result<u64> {
        let (port, value) = (port.as_ref(), value.as_ref());
        let kind = Kind::Register {
            port: Name::new(port),
            value: Bytes::copy_from_slice(value),
            wait: true,
            until_granted: true,
        };
        let req = Request::Register {
            port,
            value,
            wait: true,
        };
        let rx = self.start(&req, kind);
        match answer(rx).await? {
            Answer::Registered(token) => Ok(token),
            other => Err(unexpected(other)),
        }
    }

    /// Releases a port this session owns, or leaves its queue.
    pub async fn unregister(&self, port: impl AsRef<[u8]>) -> Result<()> {
        let port = port.as_ref();
        let rx = self.start(
            &Request::Unregister { port },
            Kind::Unregister(Name::new(port)),
        );
        ok(answer(rx).await?)
    }

    /// The owner of `port`, or `None` if it is free.
    pub async fn query(&self, port: impl AsRef<[u8]>) -> Result<Option<Owner>> {
        let port = port.as_ref();
        match self.request(&Request::Query { port }, Kind::Plain).await? {
            Answer::Owner(mut o) => {
                o.port = Bytes::copy_from_slice(port);
                Ok(Some(o))
            }
            Answer::Free => Ok(None),
            other => Err(unexpected(other)),
        }
    }

    /// Watches `port`: [`Event::Claimed`] and [`Event::Released`] follow its changes.
    /// Returns its owner now (session, token), if any. Kept across failovers.
    pub async fn watch(&self, port: impl AsRef<[u8]>) -> Result<Option<(u64, u64)>> {
        let name = port.as_ref();
        let kind = Kind::Watch {
            name: Bytes::copy_from_slice(name),
            prefix: false,
        };
        match self
            .request(
                &Request::Watch {
                    name,
                    prefix: false,
                },
                kind,
            )
            .await?
        {
            Answer::Watching(o) => Ok(o),
            other => Err(unexpected(other)),
        }
    }

    /// Watches every port whose name starts with `prefix`.
    pub async fn watch_prefix(&self, prefix: impl AsRef<[u8]>) -> Result<()> {
        let name = prefix.as_ref();
        let kind = Kind::Watch {
            name: Bytes::copy_from_slice(name),
            prefix: true,
        };
        match self
            .request(&Request::Watch { name, prefix: true }, kind)
            .await?
        {
            Answer::Watching(_) => Ok(()),
            other => Err(unexpected(other)),
        }
    }

    /// Watches every port whose name starts with `prefix`, receiving only the events
    /// `filter` selects: a `portswitch-query` expression over the port record (`name`,
    /// `value`, `text`, `session`, `node`, `token`, `json`, and `event`: `"claimed"` or
    /// `"released"`; see docs/PROTOCOL.md). The server compiles it once; one that does
    /// not compile fails with [`ErrorCode::QueryInvalid`](crate::ErrorCode) and a
    /// message giving the position. Watching the same prefix again (with or without a
    /// filter) replaces the filter. Kept, with its filter, across failovers.
    pub async fn watch_prefix_where(&self, prefix: impl AsRef<[u8]>, filter: &str) -> Result<()> {
        let prefix = prefix.as_ref();
        let kind = Kind::WatchWhere {
            prefix: Bytes::copy_from_slice(prefix),
            filter: Bytes::copy_from_slice(filter.as_bytes()),
        };
        let req = Request::WatchWhere {
            prefix,
            filter: filter.as_bytes(),
        };
        match self.request(&req, kind).await? {
            Answer::Watching(_) => Ok(()),
            other => Err(unexpected(other)),
        }
    }

    pub async fn unwatch(&self, port: impl AsRef<[u8]>) -> Result<()> {
        let name = port.as_ref();
        let kind = Kind::Unwatch {
            name: Bytes::copy_from_slice(name),
            prefix: false,
        };
        self.ok(
            &Request::Unwatch {
                name,
                prefix: false,
            },
            kind,
        )
        .await
    }

    pub async fn unwatch_prefix(&self, prefix: impl AsRef<[u8]>) -> Result<()> {
        let name = prefix.as_ref();
        let kind = Kind::Unwatch {
            name: Bytes::copy_from_slice(name),
            prefix: true,
        };
        self.ok(&Request::Unwatch { name, prefix: true }, kind)
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
        match self.request(&req, Kind::Plain).await? {
            Answer::Delivered => Ok(SendOutcome::Delivered),
            Answer::NoOwner => Ok(SendOutcome::NoOwner),
            other => Err(unexpected(other)),
        }
    }

    /// Sends `payload` to every other session (`prefix` = `None`) or to the owner of
    /// every port under `prefix`. Returns how many messages were sent.
    pub async fn broadcast(&self, prefix: Option<&[u8]>, payload: impl AsRef<[u8]>) -> Result<u64> {
        let req = Request::Broadcast {
            prefix,
            payload: payload.as_ref(),
        };
        match self.request(&req, Kind::Plain).await? {
            Answer::Count(n) => Ok(n),
            other => Err(unexpected(other)),
        }
    }

    /// One page of owned ports under `prefix`, from `cursor` (0 to start).
    pub async fn list(&self, prefix: impl AsRef<[u8]>, cursor: u64, limit: u32) -> Result<Page> {
        let req = Request::List {
            prefix: prefix.as_ref(),
            cursor,
            limit,
        };
        match self.request(&req, Kind::Plain).await? {
            Answer::Page(p) => Ok(p),
            other => Err(unexpected(other)),
        }
    }

    /// One page of the owned ports under `prefix` that `filter` selects (a
    /// `portswitch-query` expression over `name`, `value`, `text`, `session`, `node`,
    /// `token` and `json`), from `cursor` (0 to start). The server evaluates the filter on a
    /// bounded number of ports per call, so a page may be short or even empty while
    /// `next_cursor` is not 0: keep going until it is. A filter that does not compile
    /// fails with [`ErrorCode::QueryInvalid`](crate::ErrorCode); ports the filter fails
    /// on (`int(text)` of a value that is not a number, say) are left out.
    pub async fn list_where(
        &self,
        prefix: impl AsRef<[u8]>,
        filter: &str,
        cursor: u64,
        limit: u32,
    ) -> Result<Page> {
        let req = Request::ListWhere {
            prefix: prefix.as_ref(),
            cursor,
            limit,
            filter: filter.as_bytes(),
        };
        match self.request(&req, Kind::Plain).await? {
            Answer::Page(p) => Ok(p),
            other => Err(unexpected(other)),
        }
    }

    /// Every owned port under `prefix` that `filter` selects, page by page (see
    /// [`Client::list_where`]).
    pub async fn list_all_where(
        &self,
        prefix: impl AsRef<[u8]>,
        filter: &str,
    ) -> Result<Vec<Owner>> {
        let limit = self.session().limits.list_limit_max.max(1);
        let mut all = Vec::new();
        let mut cursor = 0;
        loop {
            let page = self
                .list_where(prefix.as_ref(), filter, cursor, limit)
                .await?;
            all.extend(page.entries);
            if page.next_cursor == 0 {
                return Ok(all);
            }
            cursor = page.next_cursor;
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
        match self.request(&Request::Stats, Kind::Plain).await? {
            Answer::Stats(s) => Ok(s),
            other => Err(unexpected(other)),
        }
    }

    /// Runs a user/role management command (a JSON object, see docs/PROTOCOL.md) and
    /// returns the server's JSON result. Needs the admin permission, or a server with
    /// no users yet and a loopback connection.
    pub async fn admin(&self, command: &str) -> Result<String> {
        let req = Request::Admin {
            command: command.as_bytes(),
        };
        match self.request(&req, Kind::Plain).await? {
            Answer::Admin(result) => Ok(String::from_utf8_lossy(&result).into_owned()),
            other => Err(unexpected(other)),
        }
    }

    /// A round trip (also renews the lease, as any request does).
    pub async fn ping(&self) -> Result<()> {
        self.ok(&Request::Ping, Kind::Plain).await
    }

    /// Ends the session (its ports are released at once) and lets go of its
    /// connection (or channel).
    pub async fn close(&self) -> Result<()> {
        let r = self.ok(&Request::Bye, Kind::Plain).await;
        self.link.close();
        r
    }

    /// Lets go of the connection (or channel) without ending the session: it stays
    /// on the server for its lease and can be resumed with [`ClientOptions::resume`].
    /// Returns (session id, secret).
    pub fn detach(&self) -> (u64, u64) {
        let info = self.session();
        self.link.close();
        (info.id, info.secret)
    }

    async fn ok(&self, req: &Request<'_>, kind: Kind) -> Result<()> {
        ok(answer(self.start(req, kind)).await?)
    }

    async fn request(&self, req: &Request<'_>, kind: Kind) -> Result<Answer> {
        answer(self.start(req, kind)).await
    }

    /// Submits a request now; what is awaited afterwards is only its answer. (The
    /// request and what it changes are not kept across an await: on a busy shared
    /// connection every byte of a request's future is copied around per request.)
    fn start(&self, req: &Request<'_>, kind: Kind) -> Started {
        let (tx, rx) = oneshot::channel();
        self.link.submit(req, kind, Some(tx))?;
        Ok(rx)
    }
}

/// A submitted request: its answer to come, or why it was not sent.
type Started = Result<oneshot::Receiver<Result<Answer>>>;

async fn answer(started: Started) -> Result<Answer> {
    started?.await.map_err(|_| Error::ConnectionLost)?
}

fn ok(a: Answer) -> Result<()> {
    match a {
        Answer::Ok => Ok(()),
        other => Err(unexpected(other)),
    }
}

fn register_outcome(a: Answer) -> Result<RegisterOutcome> {
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

pub(crate) fn unexpected(a: Answer) -> Error {
    Error::Protocol(format!("unexpected reply {a:?}"))
}
