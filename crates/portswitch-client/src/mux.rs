//! Many sessions over one connection: each session on a channel of its own
//! (PROTOCOL.md, "Channels").
//!
//! A process that holds many independent sessions — 128 workers, each with its own
//! lease and its own ports — would otherwise open one connection per session and pay
//! the kernel once per request of each. Over a [`Mux`] their requests share frames:
//! whatever the sessions submit while a write is in flight goes out in the next frame.
//!
//! Each [`MuxSession`] keeps its own lease view, exactly like a [`crate::Client`]: it
//! counts from the send time of the last request of that session the server
//! answered, keeps each session alive with PINGs that ride in the shared frames, and
//! reports [`Event::OwnershipLost`] when the view runs out, the server ends the
//! session, or the connection drops. A mux does not reconnect: when its connection
//! is gone its sessions are lost to it (a session that did not ask to end on
//! disconnect stays on the server for its lease, and [`crate::Client`] can resume it
//! with [`MuxSession::info`]'s id and secret).

use std::borrow::Borrow;
use std::collections::VecDeque;
use std::hash::{Hash, Hasher};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use portswitch_proto::frame::{frame_len, messages};
use portswitch_proto::limits::{COMMANDS_PER_FRAME_MAX, FRAME_BYTES_MAX, PROTOCOL_VERSION};
use portswitch_proto::msg::op;
use portswitch_proto::{
    ErrorCode, Event as WireEvent, FrameBuf, Hello, Reply, Request, ServerLimits, ServerMsg,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt, ReadHalf, WriteHalf};
use tokio::sync::{broadcast, oneshot, watch, Notify};

use crate::client::{check_limits, open_stream, owned_answer, safe_lease, Answer, Stream};
use crate::types::*;
use crate::ClientOptions;
use portswitch_auth::scram;

/// One connection carrying sessions on channels. Cheap to clone.
#[derive(Clone)]
pub struct Mux {
    inner: Arc<Inner>,
    guard: Arc<Guard>,
}

/// Closes the connection when the last [`Mux`] and [`MuxSession`] are dropped.
struct Guard(Arc<Inner>);

impl Drop for Guard {
    fn drop(&mut self) {
        self.0.kill("the mux was dropped", true);
    }
}

/// A session on a channel of a [`Mux`]. Dropping it ends the session (BYE), like
/// dropping the last clone of a [`crate::Client`].
pub struct MuxSession {
    inner: Arc<Inner>,
    _guard: Arc<Guard>,
    channel: u16,
    info: SessionInfo,
    alive: watch::Receiver<bool>,
    events: broadcast::Sender<Event>,
}

struct Inner {
    opts: ClientOptions,
    exporter: Option<[u8; 32]>,
    st: Mutex<St>,
    wake_writer: Notify,
}

struct St {
    out: FrameBuf,
    /// The channel the last CHANNEL switch in `out` (or already written) names.
    out_channel: u16,
    next_id: u32,
    /// Requests awaiting replies, in the order sent: the server answers a
    /// connection's requests in request order.
    pending: VecDeque<(u32, Pending)>,
    /// How many entries at the back of `pending` the writer has not taken yet: their
    /// `sent_at` is stamped when it does (one clock read per write, not per request).
    unstamped: usize,
    /// When the writer last took requests to write.
    clock: Instant,
    /// The writer has been woken and has not taken the buffer since: no need to
    /// wake it again.
    writer_woken: bool,
    channels: Chans,
    /// Channels given back by closed sessions, reused before new numbers.
    free: Vec<u16>,
    next_channel: u32,
    /// What the server announced in the first HELLO_OK (0 until then).
    channels_max: u32,
    limits: Option<ServerLimits>,
    /// Why the connection is gone, once it is.
    dead: Option<String>,
    /// The code of a GOAWAY that closed the connection: the requests it left
    /// unanswered were not carried out, and get this error.
    goaway: Option<ErrorCode>,
}

struct Pending {
    /// Taken when the session ends before the reply comes (the reply is then
    /// dropped on arrival, keeping the queue in step with the server).
    tx: Option<oneshot::Sender<Result<Got>>>,
    channel: u16,
    /// When the writer took the request to write (before the server can have seen
    /// it, so safe to count a lease view from); until then, when the writer last
    /// took anything.
    sent_at: Instant,
    kind: Kind,
}

/// What a reply changes besides answering its request.
enum Kind {
    Plain,
    Register(Name),
    Unregister(Name),
}

/// A port name as a session keeps it: inline when short (most names, no allocation
/// per request), shared bytes otherwise. Hashes and compares as its bytes, so the
/// owned set is looked up with a plain `&[u8]`.
#[derive(Clone)]
enum Name {
    Inline {
        len: u8,
        bytes: [u8; NAME_INLINE_MAX],
    },
    Heap(Bytes),
}

/// The longest name kept inline by [`Name`].
const NAME_INLINE_MAX: usize = 30;

impl Name {
    fn new(port: &[u8]) -> Name {
        if port.len() <= NAME_INLINE_MAX {
            let mut bytes = [0; NAME_INLINE_MAX];
            bytes[..port.len()].copy_from_slice(port);
            Name::Inline {
                len: port.len() as u8,
                bytes,
            }
        } else {
            Name::Heap(Bytes::copy_from_slice(port))
        }
    }
    fn as_slice(&self) -> &[u8] {
        match self {
            Name::Inline { len, bytes } => &bytes[..*len as usize],
            Name::Heap(b) => b,
        }
    }
    fn into_bytes(self) -> Bytes {
        match self {
            Name::Heap(b) => b,
            inline => Bytes::copy_from_slice(inline.as_slice()),
        }
    }
}

impl Borrow<[u8]> for Name {
    fn borrow(&self) -> &[u8] {
        self.as_slice()
    }
}

impl Hash for Name {
    fn hash<H: Hasher>(&self, h: &mut H) {
        self.as_slice().hash(h)
    }
}

impl PartialEq for Name {
    fn eq(&self, other: &Name) -> bool {
        self.as_slice() == other.as_slice()
    }
}

impl Eq for Name {}

struct Chan {
    safe_lease: Duration,
    view_end: Instant,
    /// When this channel last sent anything (its keepalive is due a third of a lease
    /// later).
    last_sent: Instant,
    lease: Duration,
    /// The ports this session owns (foldhash: the names are the application's own,
    /// and this set is touched on every REGISTER and UNREGISTER).
    owned: hashbrown::HashSet<Name, foldhash::fast::RandomState>,
    alive: watch::Sender<bool>,
    events: broadcast::Sender<Event>,
    /// Set between HELLO and HELLO_OK: not yet kept alive or checked.
    opening: bool,
}

/// A reply in owned form, as the pending request gets it.
enum Got {
    Answer(Answer),
    HelloOk {
        ok: portswitch_proto::HelloOk<'static>,
        auth: Vec<u8>,
    },
    AuthContinue(Vec<u8>),
}

fn own(reply: &Reply<'_>) -> Result<Got> {
    Ok(match *reply {
        Reply::HelloOk(h) => Got::HelloOk {
            ok: portswitch_proto::HelloOk { auth: &[], ..h },
            auth: h.auth.to_vec(),
        },
        Reply::AuthContinue { data } => Got::AuthContinue(data.to_vec()),
        ref r => Got::Answer(owned_answer(r)?),
    })
}

impl Mux {
    /// Connects to `opts.addr` (TCP, then TLS if configured). No session is opened
    /// until [`Mux::session`].
    pub async fn connect(opts: ClientOptions) -> Result<Mux> {
        let addr = opts.addr.clone();
        let (stream, exporter) = open_stream(&opts, &addr).await?;
        let inner = Arc::new(Inner {
            st: Mutex::new(St {
                out: FrameBuf::new(FRAME_BYTES_MAX, COMMANDS_PER_FRAME_MAX),
                out_channel: 0,
                next_id: 0,
                pending: VecDeque::new(),
                unstamped: 0,
                clock: Instant::now(),
                writer_woken: false,
                channels: Chans::default(),
                free: Vec::new(),
                next_channel: 1,
                channels_max: 0,
                limits: None,
                dead: None,
                goaway: None,
            }),
            opts,
            exporter,
            wake_writer: Notify::new(),
        });
        let (rd, wr) = tokio::io::split(stream);
        tokio::spawn(writer(inner.clone(), wr));
        tokio::spawn(reader(inner.clone(), rd));
        tokio::spawn(keepalive(Arc::downgrade(&inner)));
        Ok(Mux {
            guard: Arc::new(Guard(inner.clone())),
            inner,
        })
    }

    /// Opens a new session on a channel of its own, with the options' lease,
    /// end-on-disconnect flag, node name and credentials.
    pub async fn session(&self) -> Result<MuxSession> {
        let inner = &self.inner;
        let channel = {
            let mut st = inner.lock();
            if let Some(why) = &st.dead {
                return Err(Error::SessionLost(why.clone()));
            }
            let channel = match st.free.pop() {
                Some(c) => c,
                None => {
                    if st.channels_max != 0 && st.next_channel >= st.channels_max {
                        return Err(Error::Server {
                            code: ErrorCode::ChannelsMax,
                            message: format!(
                                "this connection carries the {} channels the server allows",
                                st.channels_max.saturating_sub(1)
                            ),
                        });
                    }
                    let c = st.next_channel as u16;
                    st.next_channel += 1;
                    c
                }
            };
            let (alive, _) = watch::channel(true);
            let (events, _) = broadcast::channel(inner.opts.events_capacity.max(1));
            st.channels.insert(
                channel,
                Chan {
                    safe_lease: Duration::ZERO,
                    view_end: Instant::now(),
                    last_sent: Instant::now(),
                    lease: inner.opts.lease,
                    owned: hashbrown::HashSet::default(),
                    alive,
                    events,
                    opening: true,
                },
            );
            channel
        };
        // A server admitting HELLOs at its rate limit, or raising its lease ceiling,
        // says when to come back: do, until the connect timeout.
        let deadline = Instant::now() + inner.opts.connect_timeout;
        let hello = loop {
            match self.hello(channel).await {
                Err(e) if crate::client::retry_hint(&e).is_some() && Instant::now() < deadline => {
                    crate::client::wait_as_told(crate::client::retry_hint(&e).unwrap()).await;
                }
                other => break other,
            }
        };
        match hello {
            Ok(info) => {
                let st = inner.lock();
                let c = st.channels.get(&channel).expect("opened above");
                Ok(MuxSession {
                    inner: inner.clone(),
                    _guard: self.guard.clone(),
                    channel,
                    info,
                    alive: c.alive.subscribe(),
                    events: c.events.clone(),
                })
            }
            Err(e) => {
                let mut st = inner.lock();
                st.channels.remove(&channel);
                st.free.push(channel);
                Err(e)
            }
        }
    }

    /// HELLO (and with credentials the SCRAM round trip) on `channel`.
    async fn hello(&self, channel: u16) -> Result<SessionInfo> {
        let inner = &self.inner;
        let opts = &inner.opts;
        let lease_ms = u32::try_from(opts.lease.as_millis()).unwrap_or(u32::MAX);
        let binding = match &inner.exporter {
            Some(e) => scram::Channel::TlsExporter(e),
            None => scram::Channel::Plain,
        };
        let (exchange, credentials) = crate::client::scram_first(opts, binding)?;
        let hello = Hello {
            version_min: PROTOCOL_VERSION,
            version_max: PROTOCOL_VERSION,
            features: 0,
            lease_ms,
            end_on_disconnect: opts.end_on_disconnect,
            node_name: opts.node_name.as_bytes(),
            credentials: &credentials,
            resume_session: 0,
            resume_secret: 0,
        };
        let sent_at = Instant::now();
        let first = inner
            .call(channel, &Request::Hello(hello), Kind::Plain, true)?
            .await
            .map_err(|_| Error::ConnectionLost)??;
        let ok = match (first, exchange) {
            (Got::AuthContinue(data), Some(exchange)) => {
                let challenge = std::str::from_utf8(&data)
                    .map_err(|_| Error::Protocol("challenge is not UTF-8".into()))?;
                let (awaiting, client_final) = exchange
                    .respond(challenge, binding)
                    .map_err(|e| Error::Protocol(format!("authentication: {e}")))?;
                let req = Request::Auth {
                    data: client_final.as_bytes(),
                };
                match inner
                    .call(channel, &req, Kind::Plain, true)?
                    .await
                    .map_err(|_| Error::ConnectionLost)??
                {
                    Got::HelloOk { ok: h, auth } => {
                        awaiting
                            .verify(std::str::from_utf8(&auth).unwrap_or(""))
                            .map_err(|e| {
                                Error::Protocol(format!("the server failed to authenticate: {e}"))
                            })?;
                        h
                    }
                    other => return Err(refused(other)),
                }
            }
            (Got::HelloOk { .. }, Some(_)) => {
                return Err(Error::Protocol(
                    "the server accepted the session without authenticating".into(),
                ))
            }
            (Got::HelloOk { ok, .. }, None) => ok,
            (other, _) => return Err(refused(other)),
        };
        if ok.channels_max <= channel as u32 {
            return Err(Error::Protocol(format!(
                "the server does not multiplex sessions (channels_max {})",
                ok.channels_max
            )));
        }
        let info = SessionInfo {
            id: ok.session,
            secret: ok.secret,
            epoch: ok.epoch,
            lease_ms: ok.lease_ms,
            limits: ok.limits,
        };
        let mut st = inner.lock();
        st.channels_max = ok.channels_max;
        st.limits.get_or_insert(ok.limits);
        let safe = safe_lease(&inner.opts, ok.lease_ms);
        if let Some(c) = st.channels.get_mut(&channel) {
            c.opening = false;
            c.safe_lease = safe;
            c.lease = Duration::from_millis(ok.lease_ms as u64);
            c.view_end = c.view_end.max(sent_at + safe);
        }
        Ok(info)
    }

    /// Sessions open on this connection.
    pub fn sessions(&self) -> usize {
        self.inner.lock().channels.len()
    }

    /// Whether the connection is still up.
    pub fn is_connected(&self) -> bool {
        self.inner.lock().dead.is_none()
    }

    /// Closes the connection; every session on it is lost to this process (the
    /// server ends those that asked to end on disconnect and keeps the others for
    /// their lease).
    pub fn shutdown(&self) {
        self.inner.kill("closed by the application", false);
    }
}

fn refused(r: Got) -> Error {
    match r {
        Got::Answer(a) => Error::Protocol(format!("unexpected handshake answer {a:?}")),
        _ => Error::Protocol("unexpected handshake answer".into()),
    }
}

impl MuxSession {
    pub fn info(&self) -> SessionInfo {
        self.info
    }

    /// The channel this session rides on.
    pub fn channel(&self) -> u16 {
        self.channel
    }

    /// Subscribes to this session's events (from now on).
    pub fn events(&self) -> broadcast::Receiver<Event> {
        self.events.subscribe()
    }

    /// Whether the session is still held (the lease view has not run out).
    pub fn is_alive(&self) -> bool {
        *self.alive.borrow()
    }

    /// Resolves when the session is lost or closed.
    pub async fn lost(&self) {
        let mut rx = self.alive.clone();
        let _ = rx.wait_for(|alive| !alive).await;
    }

    /// Registers `port` without waiting: owned, or taken by someone else.
    pub async fn register(
        &self,
        port: impl AsRef<[u8]>,
        value: impl AsRef<[u8]>,
    ) -> Result<RegisterOutcome> {
        let port = port.as_ref();
        let req = Request::Register {
            port,
            value: value.as_ref(),
            wait: false,
        };
        let kind = Kind::Register(Name::new(port));
        match self.answer(&req, kind).await? {
            Answer::Registered(token) => Ok(RegisterOutcome::Owned { token }),
            Answer::Taken(session, token, node) => Ok(RegisterOutcome::Taken {
                session,
                token,
                node,
            }),
            other => Err(Error::Protocol(format!("unexpected reply {other:?}"))),
        }
    }

    /// Releases a port this session owns.
    pub async fn unregister(&self, port: impl AsRef<[u8]>) -> Result<()> {
        let port = port.as_ref();
        let kind = Kind::Unregister(Name::new(port));
        match self.answer(&Request::Unregister { port }, kind).await? {
            Answer::Ok => Ok(()),
            other => Err(Error::Protocol(format!("unexpected reply {other:?}"))),
        }
    }

    /// The owner of `port`, or `None` if it is free.
    pub async fn query(&self, port: impl AsRef<[u8]>) -> Result<Option<Owner>> {
        let port = port.as_ref();
        match self.answer(&Request::Query { port }, Kind::Plain).await? {
            Answer::Owner(o) => Ok(Some(Owner {
                port: Bytes::copy_from_slice(port),
                ..o
            })),
            Answer::Free => Ok(None),
            other => Err(Error::Protocol(format!("unexpected reply {other:?}"))),
        }
    }

    /// A round trip that also renews the lease.
    pub async fn ping(&self) -> Result<()> {
        match self.answer(&Request::Ping, Kind::Plain).await? {
            Answer::Ok => Ok(()),
            other => Err(Error::Protocol(format!("unexpected reply {other:?}"))),
        }
    }

    /// Ends the session (its ports are released at once) and frees its channel.
    pub async fn close(&self) -> Result<()> {
        let r = self.answer(&Request::Bye, Kind::Plain).await;
        self.inner
            .end(self.channel, None, "closed by the application");
        self.free_channel();
        r.map(|_| ())
    }

    /// Frees the channel for the next session (once the session is over).
    fn free_channel(&self) {
        let mut st = self.inner.lock();
        if !st.channels.contains_key(&self.channel) && !st.free.contains(&self.channel) {
            st.free.push(self.channel);
        }
    }

    async fn answer(&self, req: &Request<'_>, kind: Kind) -> Result<Answer> {
        // `call` refuses a session that is over.
        match self
            .inner
            .call(self.channel, req, kind, false)?
            .await
            .map_err(|_| Error::ConnectionLost)??
        {
            Got::Answer(a) => Ok(a),
            _ => Err(Error::Protocol(
                "handshake reply outside a handshake".into(),
            )),
        }
    }
}

impl Drop for MuxSession {
    fn drop(&mut self) {
        // A forgotten session must not keep its ports: BYE, sent with whatever is
        // queued (the reply is not waited for).
        if self
            .inner
            .call(self.channel, &Request::Bye, Kind::Plain, false)
            .is_ok()
        {
            self.inner.end(self.channel, None, "session dropped");
        }
        self.free_channel();
    }
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, St> {
        self.st.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Queues `req` on `channel`; the receiver gets the reply in owned form.
    fn call(
        &self,
        channel: u16,
        req: &Request<'_>,
        kind: Kind,
        opening: bool,
    ) -> Result<oneshot::Receiver<Result<Got>>> {
        let (rx, wake) = {
            let mut st = self.lock();
            if let Some(why) = &st.dead {
                return Err(Error::SessionLost(why.clone()));
            }
            if let Some(l) = &st.limits {
                check_limits(l, req)?;
            }
            match st.channels.get(&channel) {
                Some(c) if c.opening == opening => {}
                _ => return Err(Error::SessionLost("the session is over".into())),
            }
            st.next_id = st.next_id.wrapping_add(1).max(1);
            let id = st.next_id;
            if st.out_channel != channel {
                st.out.push_channel(channel);
                st.out_channel = channel;
            }
            st.out.push_request(id, req);
            let (tx, rx) = oneshot::channel();
            let sent_at = st.clock;
            st.pending.push_back((
                id,
                Pending {
                    tx: Some(tx),
                    channel,
                    sent_at,
                    kind,
                },
            ));
            st.unstamped += 1;
            (rx, !std::mem::replace(&mut st.writer_woken, true))
        };
        if wake {
            self.wake_writer.notify_one();
        }
        Ok(rx)
    }

    /// Ends `channel`'s session on the client's side and tells the application.
    fn end(&self, channel: u16, code: Option<ErrorCode>, reason: &str) {
        let (chan, waiting) = {
            let mut st = self.lock();
            let waiting: Vec<_> = st
                .pending
                .iter_mut()
                .filter(|(_, p)| p.channel == channel)
                .filter_map(|(_, p)| p.tx.take())
                .collect();
            (st.channels.remove(&channel), waiting)
        };
        // Requests of an ended session are not left hanging.
        for tx in waiting {
            let _ = tx.send(Err(Error::SessionLost(reason.to_string())));
        }
        if let Some(c) = chan {
            finish_chan(c, code, reason);
        }
    }

    /// The connection is gone: every session on it is lost to this process.
    /// `flush`: what is queued (the BYEs of dropped sessions) is still written.
    fn kill(&self, reason: &str, flush: bool) {
        let (chans, pending, goaway) = {
            let mut st = self.lock();
            if st.dead.is_none() {
                st.dead = Some(reason.to_string());
            }
            if !flush {
                st.out.clear();
            }
            st.unstamped = 0;
            (
                std::mem::take(&mut st.channels),
                std::mem::take(&mut st.pending),
                st.goaway,
            )
        };
        for (_, p) in pending {
            if let Some(tx) = p.tx {
                let _ = tx.send(Err(match goaway {
                    Some(code) => Error::Server {
                        code,
                        message: reason.to_string(),
                    },
                    None => Error::ConnectionLost,
                }));
            }
        }
        for c in chans.0.into_iter().flatten() {
            finish_chan(c, None, reason);
        }
        self.wake_writer.notify_one();
    }
}

fn finish_chan(c: Chan, code: Option<ErrorCode>, reason: &str) {
    c.alive.send_replace(false);
    let reason = match code {
        Some(code) => format!("{reason} ({code})"),
        None => reason.to_string(),
    };
    let _ = c.events.send(Event::OwnershipLost {
        ports: c.owned.into_iter().map(|p| (p.into_bytes(), 0)).collect(),
        reason,
    });
}

async fn writer(inner: Arc<Inner>, mut wr: WriteHalf<Stream>) {
    let mut buf = BytesMut::new();
    loop {
        let dead = {
            let mut st = inner.lock();
            st.out.take_into(&mut buf);
            st.writer_woken = false;
            if st.unstamped > 0 {
                st.stamp(Instant::now());
            }
            st.dead.is_some()
        };
        if !buf.is_empty() {
            if wr.write_all(&buf).await.is_err() {
                inner.kill("connection write failed", false);
                break;
            }
            if !dead {
                continue; // more may have piled up during the write
            }
        }
        if dead {
            break;
        }
        inner.wake_writer.notified().await;
        // Let every session that is ready add its request to this frame.
        tokio::task::yield_now().await;
    }
    let _ = wr.shutdown().await;
}

async fn reader(inner: Arc<Inner>, mut rd: ReadHalf<Stream>) {
    let mut buf = BytesMut::with_capacity(64 << 10);
    let mut channel = 0u16;
    let why = 'conn: loop {
        loop {
            match frame_len(&buf, FRAME_BYTES_MAX) {
                Ok(Some(n)) => {
                    let frame = buf.split_to(n);
                    if let Err(why) = dispatch(&inner, &frame, &mut channel) {
                        break 'conn why;
                    }
                }
                Ok(None) => break,
                Err(e) => break 'conn format!("the server sent a malformed frame: {e}"),
            }
        }
        if inner.lock().dead.is_some() {
            return;
        }
        match rd.read_buf(&mut buf).await {
            Ok(0) => break "connection closed by the server".to_string(),
            Err(e) => break format!("connection error: {e}"),
            Ok(_) => {}
        }
    };
    inner.kill(&why, false);
}

/// Handles every message of one frame; `Err` when the connection must end.
fn dispatch(inner: &Inner, frame: &[u8], channel: &mut u16) -> std::result::Result<(), String> {
    let mut replies = Vec::new();
    let mut events: Vec<(broadcast::Sender<Event>, Event)> = Vec::new();
    let mut ended: Vec<(u16, ErrorCode, String)> = Vec::new();
    let mut goaway = None;
    {
        let mut st = inner.lock();
        for m in messages(&frame[4..], usize::MAX) {
            let m = m.map_err(|e| format!("the server sent a malformed frame: {e}"))?;
            if m.opcode == op::CHANNEL {
                *channel = m.id as u16;
                continue;
            }
            let Ok(msg) = ServerMsg::decode(m.opcode, m.id, m.body) else {
                continue; // unknown to this version: skipped, as the protocol says
            };
            match msg {
                ServerMsg::Reply { id, reply } => {
                    let p = match st.pending.pop_front() {
                        Some((want, p)) if want == id => p,
                        _ => return Err(format!("the server answered request {id} out of order")),
                    };
                    if let Some(c) = st.channels.get_mut(&p.channel) {
                        // Any answer proves the server heard the session at send time.
                        c.view_end = c.view_end.max(p.sent_at + c.safe_lease);
                        match (p.kind, &reply) {
                            (Kind::Register(port), Reply::Registered { .. }) => {
                                c.owned.insert(port);
                            }
                            (Kind::Unregister(port), Reply::Ok)
                            | (Kind::Unregister(port), Reply::Error { .. }) => {
                                c.owned.remove(port.as_slice());
                            }
                            _ => {}
                        }
                    }
                    if let Some(tx) = p.tx {
                        replies.push((tx, own(&reply)));
                    }
                }
                ServerMsg::Event(WireEvent::GoAway { code, message }) => {
                    let why = String::from_utf8_lossy(message).into_owned();
                    if *channel == 0 {
                        goaway = Some(format!("server closed the connection: {code}: {why}"));
                        st.goaway = Some(code);
                    } else {
                        ended.push((*channel, code, why));
                    }
                }
                ServerMsg::Event(e) => {
                    if let Some(c) = st.channels.get_mut(channel) {
                        let ev = match e {
                            WireEvent::Acquired { port, token } => {
                                c.owned.insert(Name::new(port));
                                Event::Acquired {
                                    port: Bytes::copy_from_slice(port),
                                    token,
                                }
                            }
                            WireEvent::Released { port, token } => Event::Released {
                                port: Bytes::copy_from_slice(port),
                                token,
                            },
                            WireEvent::Claimed {
                                port,
                                session,
                                token,
                                node,
                            } => Event::Claimed {
                                port: Bytes::copy_from_slice(port),
                                session,
                                token,
                                node: Bytes::copy_from_slice(node),
                            },
                            WireEvent::Message {
                                from,
                                port,
                                payload,
                            } => Event::Message {
                                from,
                                port: Bytes::copy_from_slice(port),
                                payload: Bytes::copy_from_slice(payload),
                            },
                            WireEvent::Resync => Event::Resync,
                            WireEvent::Recovered => Event::Recovered,
                            WireEvent::GoAway { .. } => continue,
                        };
                        events.push((c.events.clone(), ev));
                    }
                }
            }
        }
    }
    for (tx, got) in replies {
        let _ = tx.send(got);
    }
    for (tx, ev) in events {
        let _ = tx.send(ev);
    }
    for (channel, code, why) in ended {
        inner.end(
            channel,
            Some(code),
            &format!("the server ended the session: {why}"),
        );
    }
    match goaway {
        Some(why) => Err(why),
        None => Ok(()),
    }
}

/// Keeps every session alive: a PING for each that sent nothing for a third of its
/// lease (they ride together in the next frame), and the lease view of each checked.
async fn keepalive(weak: std::sync::Weak<Inner>) {
    loop {
        tokio::time::sleep(Duration::from_millis(KEEPALIVE_TICK_MS)).await;
        let Some(inner) = weak.upgrade() else { return };
        let now = Instant::now();
        let (due, expired) = {
            let st = inner.lock();
            if st.dead.is_some() {
                return;
            }
            // A server that stopped answering (SIGSTOP keeps its sockets open) is
            // left like a dead one, as `Client` does.
            // (Only requests the writer took count: the others were not sent yet.)
            let stuck = st.pending.len() > st.unstamped
                && st.pending.front().is_some_and(|(_, p)| {
                    now.duration_since(p.sent_at) > inner.opts.answer_timeout
                });
            if stuck {
                drop(st);
                inner.kill("the server did not answer within answer_timeout", false);
                return;
            }
            let mut due = Vec::new();
            let mut expired = Vec::new();
            for (ch, c) in st.channels.iter() {
                if c.opening {
                    continue;
                }
                if c.view_end <= now {
                    expired.push(ch);
                } else if now.duration_since(c.last_sent) >= c.lease / 3 {
                    due.push(ch);
                }
            }
            (due, expired)
        };
        for ch in expired {
            inner.end(ch, None, "lease view expired without contact");
        }
        for ch in due {
            if let Ok(rx) = inner.call(ch, &Request::Ping, Kind::Plain, false) {
                drop(rx); // the reply renews the view in `dispatch`
            }
        }
    }
}

impl St {
    /// The writer took everything queued at `now`: that is when those requests
    /// were sent, and when their sessions last sent anything.
    fn stamp(&mut self, now: Instant) {
        self.clock = now;
        let from = self.pending.len() - self.unstamped;
        self.unstamped = 0;
        let St {
            pending, channels, ..
        } = self;
        for (_, p) in pending.range_mut(from..) {
            p.sent_at = now;
            if let Some(c) = channels.get_mut(&p.channel) {
                c.last_sent = now;
            }
        }
    }
}

/// Sessions by channel number (dense: channels are handed out from 1 up and reused).
#[derive(Default)]
struct Chans(Vec<Option<Chan>>);

impl Chans {
    fn get(&self, ch: &u16) -> Option<&Chan> {
        self.0.get(*ch as usize)?.as_ref()
    }
    fn get_mut(&mut self, ch: &u16) -> Option<&mut Chan> {
        self.0.get_mut(*ch as usize)?.as_mut()
    }
    fn insert(&mut self, ch: u16, c: Chan) {
        let i = ch as usize;
        if self.0.len() <= i {
            self.0.resize_with(i + 1, || None);
        }
        self.0[i] = Some(c);
    }
    fn remove(&mut self, ch: &u16) -> Option<Chan> {
        self.0.get_mut(*ch as usize)?.take()
    }
    fn contains_key(&self, ch: &u16) -> bool {
        self.get(ch).is_some()
    }
    fn len(&self) -> usize {
        self.0.iter().filter(|c| c.is_some()).count()
    }
    fn iter(&self) -> impl Iterator<Item = (u16, &Chan)> {
        self.0
            .iter()
            .enumerate()
            .filter_map(|(i, c)| Some((i as u16, c.as_ref()?)))
    }
}

/// How often sessions' keepalives and lease views are looked at.
const KEEPALIVE_TICK_MS: u64 = 20;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_short_and_long_are_found_by_their_bytes() {
        let mut owned: hashbrown::HashSet<Name, foldhash::fast::RandomState> =
            hashbrown::HashSet::default();
        let short = b"p-1".to_vec();
        let edge = vec![b'e'; NAME_INLINE_MAX];
        let long = vec![b'l'; NAME_INLINE_MAX + 1];
        for n in [&short, &edge, &long] {
            assert!(owned.insert(Name::new(n)));
        }
        assert!(matches!(Name::new(&edge), Name::Inline { .. }));
        assert!(matches!(Name::new(&long), Name::Heap(_)));
        assert!(
            !owned.insert(Name::new(&short)),
            "the same bytes are one name"
        );
        for n in [&short, &edge, &long] {
            assert!(owned.contains(n.as_slice()));
        }
        assert!(owned.remove(long.as_slice()));
        assert!(!owned.contains(&b"p-"[..]));
        let mut back: Vec<Bytes> = owned.into_iter().map(Name::into_bytes).collect();
        back.sort();
        assert_eq!(back, vec![Bytes::from(edge), Bytes::from(short)]);
    }
}
