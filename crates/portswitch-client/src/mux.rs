//! Many sessions over one connection: each session on a channel of its own
//! (PROTOCOL.md, "Channels").
//!
//! A process that holds many independent sessions — 128 workers, each with its own
//! lease and its own ports — would otherwise open one connection per session and pay
//! the kernel once per request of each. Over a [`Mux`] their requests share frames:
//! whatever the sessions submit while a write is in flight goes out in the next frame.
//!
//! Each [`MuxSession`] is a [`Client`] in every respect — the same session state
//! machine keeps its lease view, ports, watches and queue places — whose requests
//! ride on its channel. When the connection is lost (the master died, stopped
//! answering, or stepped down), the mux finds the group's master among
//! [`ClientOptions::servers`], connects again and resumes every session on its
//! channel; on a new master each reclaims its ports and takes its places in queues
//! again, exactly as a [`Client`] does. Sessions that asked to end on disconnect end
//! with the connection.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use portswitch_proto::frame::messages;
use portswitch_proto::limits::{COMMANDS_PER_FRAME_MAX, FRAME_BYTES_BEFORE_LOGIN, FRAME_BYTES_MAX};
use portswitch_proto::msg::op;
use portswitch_proto::{
    ErrorCode, Event as WireEvent, FrameBuf, HelloOk, Reply, Request, ServerMsg,
};
use tokio::io::{AsyncWriteExt, ReadHalf, WriteHalf};
use tokio::sync::{oneshot, watch, Notify};

use crate::client::{Link, Signals, Tx};
use crate::direct::RECONNECT_BACKOFF_MAX;
use crate::handshake::{nonce_seed, Handshake, Next};
use crate::net::{open_stream, retry_hint, wait_as_told, Stream};
use crate::session::{Answer, Effects, Kind, Phase, SessionCore, Wire};
use crate::types::*;
use crate::{Client, ClientOptions};

/// One connection carrying sessions on channels. Cheap to clone.
#[derive(Clone)]
pub struct Mux {
    inner: Arc<Inner>,
    guard: Arc<Guard>,
}

/// Closes the connection when the last [`Mux`] and [`MuxSession`] are dropped (after
/// the BYEs of dropped sessions are written).
struct Guard(Arc<Inner>);

impl Drop for Guard {
    fn drop(&mut self) {
        self.0.shut("the mux was dropped", true);
    }
}

/// A session on a channel of a [`Mux`]: a [`Client`] (it dereferences to one) whose
/// requests share the mux's connection. Dropping it ends the session (BYE).
pub struct MuxSession {
    client: Client,
    channel: u16,
}

impl std::ops::Deref for MuxSession {
    type Target = Client;
    fn deref(&self) -> &Client {
        &self.client
    }
}

impl std::fmt::Debug for MuxSession {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MuxSession")
            .field("channel", &self.channel)
            .field("session", &self.client.session().id)
            .finish()
    }
}

impl MuxSession {
    pub fn info(&self) -> SessionInfo {
        self.client.session()
    }

    /// The channel this session rides on.
    pub fn channel(&self) -> u16 {
        self.channel
    }

    /// The session as a [`Client`] handle (clones share the session).
    pub fn client(&self) -> &Client {
        &self.client
    }
}

pub(crate) struct Inner {
    opts: ClientOptions,
    answer_timeout: Duration,
    st: Mutex<St>,
    wake_writer: Notify,
    /// The connection's generation while it is up, 0 while it is not.
    up: watch::Sender<u64>,
}

/// Where a reply goes.
enum Dest {
    /// To the session core of its channel.
    Session,
    /// To a handshake (HELLO or AUTH) in progress on its channel, as raw bytes.
    Handshake(oneshot::Sender<Result<(u8, Bytes)>>),
}

/// A request on the wire, in send order: the server answers a connection's requests
/// in request order.
struct Route {
    channel: u16,
    /// When the writer took it (until then, when the writer last took anything).
    sent_at: Instant,
    to: Dest,
}

enum SlotState {
    /// A new session's HELLO is in flight.
    Opening,
    Session(Box<SessionCore<Tx>>),
}

struct Slot {
    state: SlotState,
    signals: Arc<Signals>,
    /// Which opening of the channel this is: a handle of an earlier session on a
    /// reused channel must not reach the new one.
    key: u64,
}

struct St {
    out: FrameBuf,
    /// The channel the last CHANNEL switch in `out` (or already written) names.
    out_channel: u16,
    next_id: u32,
    route: VecDeque<Route>,
    /// How many entries at the back of `route` the writer has not taken yet: their
    /// `sent_at` is stamped when it does (one clock read per write, not per request).
    unstamped: usize,
    /// When the writer last took requests to write.
    clock: Instant,
    /// The writer has been woken and has not taken the buffer since.
    writer_woken: bool,
    slots: Vec<Option<Slot>>,
    /// Channels given back by closed sessions, reused before new numbers.
    free: Vec<u16>,
    next_channel: u32,
    /// What the server announced in the first HELLO_OK (0 until then).
    channels_max: u32,
    /// Openings of channels so far (each slot's key).
    openings: u64,
    /// The current connection's generation; tasks of older ones stop.
    gen: u64,
    /// A connection is up.
    connected: bool,
    /// Its `tls-exporter` value (channel binding), over TLS.
    exporter: Option<[u8; 32]>,
    /// The server it goes to (or went to last).
    server: String,
    /// The reconnect task runs.
    reconnecting: bool,
    /// Wakes the current connection's reader when the connection must go.
    conn_dead: Option<Arc<Notify>>,
    /// Why the application shut the mux down, once it did.
    shut: Option<String>,
    /// The GOAWAY that closed the last connection: handshakes it left unanswered
    /// get its code.
    goaway: Option<(ErrorCode, String)>,
    /// The last connection was answered with a TLS record: the server speaks TLS and
    /// this Mux does not (handshakes it left unanswered fail with that).
    tls_expected: bool,
}

/// The connection's output, as the sessions' wires see it.
struct Out<'a> {
    out: &'a mut FrameBuf,
    out_channel: &'a mut u16,
    next_id: &'a mut u32,
    route: &'a mut VecDeque<Route>,
    unstamped: &'a mut usize,
    clock: Instant,
}

impl Out<'_> {
    fn push(&mut self, channel: u16, req: &Request<'_>, to: Dest) -> u32 {
        if *self.out_channel != channel {
            self.out.push_channel(channel);
            *self.out_channel = channel;
        }
        *self.next_id = self.next_id.wrapping_add(1).max(1);
        let id = *self.next_id;
        self.out.push_request(id, req);
        self.route.push_back(Route {
            channel,
            sent_at: self.clock,
            to,
        });
        *self.unstamped += 1;
        id
    }
}

/// One session's wire: its channel of the connection.
struct ChanWire<'a, 'b> {
    out: &'a mut Out<'b>,
    channel: u16,
}

impl Wire for ChanWire<'_, '_> {
    fn push(&mut self, req: &Request<'_>) -> u32 {
        self.out.push(self.channel, req, Dest::Session)
    }
}

impl St {
    fn split(&mut self) -> (Out<'_>, &mut Vec<Option<Slot>>) {
        let clock = self.clock;
        (
            Out {
                out: &mut self.out,
                out_channel: &mut self.out_channel,
                next_id: &mut self.next_id,
                route: &mut self.route,
                unstamped: &mut self.unstamped,
                clock,
            },
            &mut self.slots,
        )
    }

    fn slot(&mut self, ch: u16) -> Option<&mut Slot> {
        self.slots.get_mut(ch as usize)?.as_mut()
    }

    /// The slot of channel `ch` if it still holds session `key`.
    fn slot_of(&mut self, ch: u16, key: u64) -> Option<&mut Slot> {
        self.slot(ch).filter(|s| s.key == key)
    }

    /// Runs `f` on the core of channel `ch` with its wire; collects the effects.
    fn drive<R>(
        &mut self,
        ch: u16,
        fx: &mut Fx,
        f: impl FnOnce(&mut SessionCore<Tx>, &mut ChanWire<'_, '_>) -> R,
    ) -> Option<R> {
        let (mut out, slots) = self.split();
        let slot = slots.get_mut(ch as usize)?.as_mut()?;
        let SlotState::Session(core) = &mut slot.state else {
            return None;
        };
        let r = f(
            core,
            &mut ChanWire {
                out: &mut out,
                channel: ch,
            },
        );
        fx.collect(core, &slot.signals);
        Some(r)
    }

    /// The stamped request that has waited longest for its answer.
    fn oldest_sent(&self) -> Option<Instant> {
        if self.route.len() > self.unstamped {
            self.route.front().map(|r| r.sent_at)
        } else {
            None
        }
    }

    /// The writer took everything queued at `now`: that is when it was sent.
    fn stamp(&mut self, now: Instant) {
        self.clock = now;
        let from = self.route.len() - self.unstamped;
        self.unstamped = 0;
        for r in self.route.range_mut(from..) {
            r.sent_at = now;
        }
    }

    /// Drops the current connection: handshakes in flight fail, sessions on it are
    /// detached (those that end on disconnect end).
    fn drop_connection(&mut self, why: &str, fx: &mut Fx) {
        if !self.connected {
            return;
        }
        self.connected = false;
        self.gen += 1;
        self.out.clear();
        self.out_channel = 0;
        self.unstamped = 0;
        if let Some(dead) = self.conn_dead.take() {
            dead.notify_one();
        }
        let err = || match &self.goaway {
            _ if self.tls_expected => Error::TlsExpected {
                addr: self.server.clone(),
            },
            Some((code, message)) => Error::server(*code, message.clone()),
            None => Error::ConnectionLost,
        };
        for r in std::mem::take(&mut self.route) {
            if let Dest::Handshake(tx) = r.to {
                let _ = tx.send(Err(err()));
            }
        }
        for slot in self.slots.iter_mut().flatten() {
            if let SlotState::Session(core) = &mut slot.state {
                core.detached(why);
                fx.collect(core, &slot.signals);
            }
        }
    }

    /// Channels whose session waits to be resumed.
    fn detached(&self) -> Vec<u16> {
        self.slots
            .iter()
            .enumerate()
            .filter_map(|(i, s)| match s {
                Some(Slot {
                    state: SlotState::Session(core),
                    ..
                }) if *core.phase() == Phase::Detached => Some(i as u16),
                _ => None,
            })
            .collect()
    }
}

/// What sessions' cores produced under the lock, delivered once it is released:
/// completions (no per-session state needed), and the events and ends of sessions
/// that had any, with their signals.
#[derive(Default)]
struct Fx {
    done: Vec<(Tx, Result<Answer>)>,
    signals: Vec<(Arc<Signals>, Effects<Tx>)>,
}

impl Fx {
    fn collect(&mut self, core: &mut SessionCore<Tx>, signals: &Arc<Signals>) {
        core.take_done(&mut self.done);
        if core.has_signals() {
            let mut e = Effects::default();
            core.take_effects(&mut e);
            self.signals.push((signals.clone(), e));
        }
    }
}

fn deliver(fx: Fx) {
    for (tx, r) in fx.done {
        let _ = tx.send(r);
    }
    for (signals, mut e) in fx.signals {
        signals.deliver(&mut e);
    }
}

impl Mux {
    /// Connects to `opts.addr` (TCP, then TLS if configured). No session is opened
    /// until [`Mux::session`]; the first one finds the group's master if `addr` is
    /// not it.
    pub async fn connect(opts: ClientOptions) -> Result<Mux> {
        opts.check()?;
        let addr = opts.addr.clone();
        let (stream, exporter) = open_stream(&opts, &addr).await?;
        let (up, _) = watch::channel(0);
        let inner = Arc::new(Inner {
            answer_timeout: opts.answer_timeout_for(opts.lease_ms()),
            st: Mutex::new(St {
                out: FrameBuf::new(FRAME_BYTES_BEFORE_LOGIN, COMMANDS_PER_FRAME_MAX),
                out_channel: 0,
                next_id: 0,
                route: VecDeque::new(),
                unstamped: 0,
                clock: Instant::now(),
                writer_woken: false,
                slots: Vec::new(),
                free: Vec::new(),
                next_channel: 1,
                channels_max: 0,
                openings: 0,
                gen: 0,
                connected: false,
                exporter: None,
                server: addr,
                reconnecting: false,
                conn_dead: None,
                shut: None,
                goaway: None,
                tls_expected: false,
            }),
            opts,
            wake_writer: Notify::new(),
            up,
        });
        inner.install(stream, exporter);
        tokio::spawn(ticker(Arc::downgrade(&inner)));
        Ok(Mux {
            guard: Arc::new(Guard(inner.clone())),
            inner,
        })
    }

    /// Opens a new session on a channel of its own, with the options' lease,
    /// end-on-disconnect flag, node name and credentials.
    pub async fn session(&self) -> Result<MuxSession> {
        let inner = &self.inner;
        let (channel, key) = inner.open_channel()?;
        match inner.open_session(channel).await {
            Ok(signals) => {
                let info = inner
                    .with(channel, key, |core| core.info())
                    .ok_or(Error::SessionLost("the mux was shut down".into()))?;
                let keep: Arc<dyn std::any::Any + Send + Sync> = self.guard.clone();
                let link = Link::Mux(inner.clone(), channel, key);
                Ok(MuxSession {
                    client: Client::new(link, signals, info, Some(keep)),
                    channel,
                })
            }
            Err(e) => {
                inner.release_channel(channel, key);
                Err(e)
            }
        }
    }

    /// Sessions open on this connection.
    pub fn sessions(&self) -> usize {
        self.inner.lock().slots.iter().flatten().count()
    }

    /// Whether the connection is up (it is down between a failure and the moment a
    /// server takes the sessions back).
    pub fn is_connected(&self) -> bool {
        self.inner.lock().connected
    }

    /// Closes the connection; every session on it is lost to this process (the
    /// server ends those that asked to end on disconnect and keeps the others for
    /// their lease).
    pub fn shutdown(&self) {
        self.inner.shut("closed by the application", false);
    }
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, St> {
        self.st.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(crate) fn with<R>(
        &self,
        ch: u16,
        key: u64,
        f: impl FnOnce(&SessionCore<Tx>) -> R,
    ) -> Option<R> {
        let mut st = self.lock();
        match &st.slot_of(ch, key)?.state {
            SlotState::Session(core) => Some(f(core)),
            SlotState::Opening => None,
        }
    }

    pub(crate) fn submit(
        &self,
        ch: u16,
        key: u64,
        req: &Request<'_>,
        kind: Kind,
        done: Option<Tx>,
    ) -> Result<()> {
        let mut fx = Fx::default();
        // The writer's clock stamps send times (one clock read per write, not per
        // request); a release asks the real time, to know how long the server has been
        // quiet (see `session::PROBE_AFTER`).
        let real = matches!(kind, Kind::Unregister(_)).then(Instant::now);
        let (r, wake) = {
            let mut st = self.lock();
            if st.slot_of(ch, key).is_none() {
                return Err(Error::SessionLost("the session is over".into()));
            }
            let now = real.unwrap_or(st.clock);
            let r = st
                .drive(ch, &mut fx, |core, wire| {
                    core.submit(req, kind, done, now, wire)
                })
                .unwrap_or_else(|| Err(Error::SessionLost("the session is over".into())));
            (r, !std::mem::replace(&mut st.writer_woken, true))
        };
        if wake {
            self.wake_writer.notify_one();
        }
        deliver(fx);
        r
    }

    /// The session on `ch` is over for the application: its channel is freed once
    /// what it queued (a BYE) is on its way.
    pub(crate) fn close_session(&self, ch: u16, key: u64) {
        let mut fx = Fx::default();
        {
            let mut st = self.lock();
            if st.slot_of(ch, key).is_none() {
                return;
            }
            st.drive(ch, &mut fx, |core, _| core.end(Phase::Closed));
            if let Some(s) = st.slots.get_mut(ch as usize) {
                if s.take().is_some() {
                    st.free.push(ch);
                }
            }
        }
        self.wake_writer.notify_one();
        deliver(fx);
    }

    /// Every session is lost to this process and the connection closes (`flush`:
    /// after what is queued, the BYEs of dropped sessions, is written).
    fn shut(&self, reason: &str, flush: bool) {
        let mut fx = Fx::default();
        {
            let mut st = self.lock();
            if st.shut.is_none() {
                st.shut = Some(reason.to_string());
            }
            if !flush {
                st.out.clear();
            }
            for slot in st.slots.iter_mut().flatten() {
                if let SlotState::Session(core) = &mut slot.state {
                    core.end(Phase::Lost(reason.to_string()));
                    fx.collect(core, &slot.signals);
                }
            }
            for r in std::mem::take(&mut st.route) {
                if let Dest::Handshake(tx) = r.to {
                    let _ = tx.send(Err(Error::SessionLost(reason.to_string())));
                }
            }
            st.unstamped = 0;
            if let Some(dead) = st.conn_dead.take() {
                dead.notify_one();
            }
        }
        self.up.send_replace(0);
        self.wake_writer.notify_one();
        deliver(fx);
    }

    /// Takes a channel for a new session.
    fn open_channel(&self) -> Result<(u16, u64)> {
        let mut st = self.lock();
        if let Some(why) = &st.shut {
            return Err(Error::SessionLost(why.clone()));
        }
        let channel = match st.free.pop() {
            Some(c) => c,
            None => {
                if st.channels_max != 0 && st.next_channel >= st.channels_max {
                    return Err(Error::server(
                        ErrorCode::ChannelsMax,
                        format!(
                            "this connection carries the {} channels the server allows",
                            st.channels_max.saturating_sub(1)
                        ),
                    ));
                }
                if st.next_channel > u16::MAX as u32 {
                    return Err(Error::server(
                        ErrorCode::ChannelsMax,
                        "this connection carries 65,535 channels",
                    ));
                }
                let c = st.next_channel as u16;
                st.next_channel += 1;
                c
            }
        };
        let i = channel as usize;
        if st.slots.len() <= i {
            st.slots.resize_with(i + 1, || None);
        }
        st.openings += 1;
        let key = st.openings;
        st.slots[i] = Some(Slot {
            state: SlotState::Opening,
            signals: Signals::new(self.opts.events_capacity),
            key,
        });
        Ok((channel, key))
    }

    fn release_channel(&self, ch: u16, key: u64) {
        let mut st = self.lock();
        if st.slot_of(ch, key).is_none() {
            return;
        }
        if let Some(s) = st.slots.get_mut(ch as usize) {
            if s.take().is_some() {
                st.free.push(ch);
            }
        }
    }

    /// Opens a new session on `ch`: HELLO (SCRAM), following the group's master and
    /// waiting as long as the server says, until the connect timeout.
    async fn open_session(self: &Arc<Self>, ch: u16) -> Result<Arc<Signals>> {
        let deadline = Instant::now() + self.opts.connect_timeout;
        loop {
            self.connected_by(deadline).await?;
            let e = match self.handshake(ch, None).await {
                Ok((ok, sent_at)) => {
                    if ok.channels_max <= ch as u32 {
                        return Err(Error::Protocol(format!(
                            "the server does not multiplex sessions (channels_max {})",
                            ok.channels_max
                        )));
                    }
                    let mut st = self.lock();
                    st.channels_max = ok.channels_max;
                    let slot = st.slot(ch).ok_or(Error::Closed)?;
                    slot.state = SlotState::Session(Box::new(SessionCore::new(
                        self.opts.settings(),
                        &ok,
                        sent_at,
                    )));
                    return Ok(slot.signals.clone());
                }
                Err(e) => e,
            };
            if Instant::now() >= deadline {
                return Err(e);
            }
            if let Some(wait) = retry_hint(&e) {
                wait_as_told(wait).await;
                continue;
            }
            match &e {
                // Not the master: move the connection to the one it names (or look
                // for it) and ask again.
                Error::Server {
                    code: ErrorCode::NotMaster,
                    master,
                    ..
                } => {
                    self.move_connection(master.clone(), "not the master");
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                Error::ConnectionLost | Error::Io(_) => {}
                _ => return Err(e),
            }
        }
    }

    /// Waits until a connection is up (starting the reconnect task if none runs).
    async fn connected_by(self: &Arc<Self>, deadline: Instant) -> Result<()> {
        let mut up = self.up.subscribe();
        loop {
            {
                let mut st = self.lock();
                if let Some(why) = &st.shut {
                    return Err(Error::SessionLost(why.clone()));
                }
                if st.connected {
                    return Ok(());
                }
                if !st.reconnecting {
                    st.reconnecting = true;
                    tokio::spawn(reconnect(self.clone(), None));
                }
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if tokio::time::timeout(left, up.changed()).await.is_err() {
                let server = self.lock().server.clone();
                return Err(Error::ConnectTimeout(server));
            }
        }
    }

    /// Drops the current connection and connects again (to `hint` first).
    fn move_connection(self: &Arc<Self>, hint: Option<String>, why: &str) {
        let mut fx = Fx::default();
        let start = {
            let mut st = self.lock();
            st.goaway = None;
            st.drop_connection(why, &mut fx);
            !std::mem::replace(&mut st.reconnecting, true) && st.shut.is_none()
        };
        self.up.send_replace(0);
        if start {
            tokio::spawn(reconnect(self.clone(), hint));
        }
        deliver(fx);
    }

    /// HELLO (and with credentials the SCRAM round trip) on channel `ch`, resuming
    /// `resume` if given. Returns the server's answer and when HELLO was sent.
    async fn handshake(
        &self,
        ch: u16,
        resume: Option<(u64, u64)>,
    ) -> Result<(HelloOk<'static>, Instant)> {
        let (exporter, gen) = {
            let st = self.lock();
            (st.exporter, st.gen)
        };
        let mut hs = Handshake::start(&self.opts, exporter, &nonce_seed()?);
        let lease_ms = self.opts.lease_ms();
        let sent_at = Instant::now();
        let mut rx = self.call_raw(ch, &Request::Hello(hs.hello(&self.opts, lease_ms, resume)))?;
        loop {
            let (opcode, body) = rx.await.map_err(|_| Error::ConnectionLost)??;
            let reply = Reply::decode(opcode, &body)
                .map_err(|e| Error::Protocol(format!("handshake answer: {e}")))?;
            match hs.on_reply(&reply)? {
                Next::Auth(client_final) => {
                    rx = self.call_raw(
                        ch,
                        &Request::Auth {
                            data: client_final.as_bytes(),
                        },
                    )?;
                }
                Next::Done(ok) => {
                    // The connection has a session: the server takes full frames now.
                    let mut st = self.lock();
                    if st.gen == gen {
                        st.out.set_frame_bytes_max(FRAME_BYTES_MAX);
                    }
                    return Ok((ok, sent_at));
                }
            }
        }
    }

    /// Queues a handshake request on `ch`; the receiver gets the raw reply.
    fn call_raw(
        &self,
        ch: u16,
        req: &Request<'_>,
    ) -> Result<oneshot::Receiver<Result<(u8, Bytes)>>> {
        let (tx, rx) = oneshot::channel();
        let wake = {
            let mut st = self.lock();
            if let Some(why) = &st.shut {
                return Err(Error::SessionLost(why.clone()));
            }
            if !st.connected {
                return Err(Error::ConnectionLost);
            }
            let (mut out, _) = st.split();
            out.push(ch, req, Dest::Handshake(tx));
            !std::mem::replace(&mut st.writer_woken, true)
        };
        if wake {
            self.wake_writer.notify_one();
        }
        Ok(rx)
    }

    /// Makes `stream` the connection and starts its reader and writer.
    fn install(self: &Arc<Self>, stream: Stream, exporter: Option<[u8; 32]>) {
        let (rd, wr) = tokio::io::split(stream);
        let dead = Arc::new(Notify::new());
        let gen = {
            let mut st = self.lock();
            st.gen += 1;
            st.connected = true;
            st.exporter = exporter;
            st.goaway = None;
            st.tls_expected = false;
            st.out.clear();
            // Until a HELLO succeeds on it, the server takes only small frames.
            st.out.set_frame_bytes_max(FRAME_BYTES_BEFORE_LOGIN);
            st.out_channel = 0;
            st.route.clear();
            st.unstamped = 0;
            // The new writer takes whatever is queued first thing; the next request
            // wakes it.
            st.writer_woken = false;
            st.conn_dead = Some(dead.clone());
            st.gen
        };
        tokio::spawn(writer(self.clone(), wr, gen));
        tokio::spawn(reader(self.clone(), rd, gen, dead));
        self.up.send_replace(gen);
    }

    /// Resumes the session on `ch` on the current connection.
    async fn resume(self: &Arc<Self>, ch: u16) -> Result<()> {
        let info = {
            let mut st = self.lock();
            match st.slot(ch).map(|s| &s.state) {
                Some(SlotState::Session(core)) => core.info(),
                _ => return Ok(()),
            }
        };
        let (ok, sent_at) = self.handshake(ch, Some((info.id, info.secret))).await?;
        if ok.epoch < info.epoch {
            // A master older than one this session has seen is deposed (or about to
            // learn it is): its answers must not extend the lease view.
            return Err(Error::server(
                ErrorCode::NotMaster,
                format!("epoch {} is older than {} seen", ok.epoch, info.epoch),
            ));
        }
        let mut fx = Fx::default();
        {
            let mut st = self.lock();
            st.channels_max = ok.channels_max;
            let now = Instant::now();
            st.drive(ch, &mut fx, |core, wire| {
                core.resumed(&ok, sent_at, now, wire)
            });
            st.writer_woken = true;
        }
        self.wake_writer.notify_one();
        deliver(fx);
        Ok(())
    }
}

/// Finds a server that takes the sessions back and resumes every detached session on
/// it; runs until none is left detached (or the mux is shut down). One at a time.
async fn reconnect(inner: Arc<Inner>, mut hint: Option<String>) {
    let mut backoff = Duration::from_millis(20);
    loop {
        let (connected, failed, detached) = {
            let mut st = inner.lock();
            if st.shut.is_some() {
                st.reconnecting = false;
                return;
            }
            let detached = st.detached();
            // Done when every session is back; with none to resume, a connection is
            // made only while a new session waits for one.
            let opening = st
                .slots
                .iter()
                .flatten()
                .any(|s| matches!(s.state, SlotState::Opening));
            if detached.is_empty() && (st.connected || !opening) {
                st.reconnecting = false;
                return;
            }
            (st.connected, st.server.clone(), detached)
        };
        if connected {
            // Resume the rest on this connection, all at once (their HELLOs share
            // frames); a server admitting HELLOs at its rate says when to come back.
            let tasks: Vec<_> = detached
                .into_iter()
                .map(|ch| {
                    let inner = inner.clone();
                    tokio::spawn(async move { (ch, inner.resume(ch).await) })
                })
                .collect();
            let mut wait = None;
            let mut failed_any = false;
            for t in tasks {
                let Ok((ch, r)) = t.await else { continue };
                match r {
                    Ok(()) => {}
                    Err(e) => {
                        failed_any = true;
                        if let Some(w) = retry_hint(&e) {
                            wait = Some(w);
                        } else if let Error::Server {
                            code,
                            message,
                            master,
                            ..
                        } = &e
                        {
                            if !matches!(code, ErrorCode::NotMaster) {
                                end_session(
                                    &inner,
                                    ch,
                                    format!("resume refused: {code}: {message}"),
                                );
                            } else {
                                inner.move_connection(master.clone(), "not the master");
                            }
                        }
                    }
                }
            }
            if let Some(w) = wait {
                wait_as_told(w).await;
            } else if failed_any {
                tokio::time::sleep(backoff.mul_f64(0.5 + fastrand::f64())).await;
                backoff = (backoff * 2).min(RECONNECT_BACKOFF_MAX);
            }
            continue;
        }
        // No connection: the server named first, then the others, the one that just
        // failed last (it may be stopped rather than dead, and cost a whole answer
        // timeout).
        let mut candidates: Vec<String> = Vec::new();
        if let Some(h) = hint.take() {
            candidates.push(h);
        }
        for a in std::iter::once(&inner.opts.addr).chain(inner.opts.servers.iter()) {
            if *a != failed && !candidates.contains(a) {
                candidates.push(a.clone());
            }
        }
        if !candidates.contains(&failed) {
            candidates.push(failed.clone());
        }
        let mut progressed = false;
        for addr in candidates {
            let Ok((stream, exporter)) = open_stream(&inner.opts, &addr).await else {
                continue;
            };
            inner.lock().server = addr.clone();
            inner.install(stream, exporter);
            let Some(&probe) = detached.first() else {
                progressed = true;
                break; // nothing to resume: the next session's HELLO finds the master
            };
            match inner.resume(probe).await {
                Ok(()) => {
                    progressed = true;
                    break;
                }
                Err(e) => {
                    if let Some(w) = retry_hint(&e) {
                        // The master, taking over or admitting HELLOs at its rate.
                        wait_as_told(w).await;
                        progressed = true;
                        break;
                    }
                    match e {
                        Error::Server {
                            code: ErrorCode::NotMaster,
                            master,
                            ..
                        } => {
                            let mut fx = Fx::default();
                            inner.lock().drop_connection("not the master", &mut fx);
                            inner.up.send_replace(0);
                            deliver(fx);
                            if let Some(m) = master {
                                hint = Some(m);
                                progressed = true;
                                break;
                            }
                        }
                        Error::Server { code, message, .. } => {
                            // This session cannot be had; the others may.
                            end_session(
                                &inner,
                                probe,
                                format!("resume refused: {code}: {message}"),
                            );
                            progressed = true;
                            break;
                        }
                        _ => {
                            let mut fx = Fx::default();
                            inner.lock().drop_connection("no answer", &mut fx);
                            inner.up.send_replace(0);
                            deliver(fx);
                        }
                    }
                }
            }
        }
        if progressed {
            backoff = Duration::from_millis(20);
            continue;
        }
        // Jittered exponential backoff, so that many clients do not reconnect in step.
        tokio::time::sleep(backoff.mul_f64(0.5 + fastrand::f64())).await;
        backoff = (backoff * 2).min(RECONNECT_BACKOFF_MAX);
    }
}

fn end_session(inner: &Inner, ch: u16, why: String) {
    let mut fx = Fx::default();
    inner
        .lock()
        .drive(ch, &mut fx, |core, _| core.end(Phase::Lost(why)));
    deliver(fx);
}

async fn writer(inner: Arc<Inner>, mut wr: WriteHalf<Stream>, gen: u64) {
    let mut buf = BytesMut::new();
    loop {
        let last = {
            let mut st = inner.lock();
            if st.gen != gen {
                // A newer connection's writer may have been meant by the wake-up this
                // one took: pass it on.
                inner.wake_writer.notify_one();
                break;
            }
            st.out.take_into(&mut buf);
            st.writer_woken = false;
            if st.unstamped > 0 {
                st.stamp(Instant::now());
            }
            st.shut.is_some()
        };
        if !buf.is_empty() {
            if wr.write_all(&buf).await.is_err() {
                break; // the reader sees the connection fail
            }
            if !last {
                continue; // more may have piled up during the write
            }
        }
        if last {
            break;
        }
        inner.wake_writer.notified().await;
        // Let every session that is ready add its request to this frame.
        tokio::task::yield_now().await;
    }
    let _ = wr.shutdown().await;
}

async fn reader(inner: Arc<Inner>, mut rd: ReadHalf<Stream>, gen: u64, dead: Arc<Notify>) {
    let mut buf = BytesMut::with_capacity(64 << 10);
    let mut channel = 0u16;
    let why = crate::net::read_frames(
        &mut rd,
        &mut buf,
        &dead,
        "the server stopped answering",
        |frame| dispatch(&inner, frame, &mut channel, gen),
        || {
            let st = inner.lock();
            st.gen == gen && st.shut.is_none()
        },
        || inner.lock().tls_expected = true,
    )
    .await;
    let Some(why) = why else { return };
    drop(rd);
    connection_lost(&inner, gen, &why);
}

/// The connection of generation `gen` failed: its sessions are detached and the
/// reconnect task resumes them.
fn connection_lost(inner: &Arc<Inner>, gen: u64, why: &str) {
    let mut fx = Fx::default();
    let start = {
        let mut st = inner.lock();
        if st.gen != gen || st.shut.is_some() {
            return;
        }
        st.drop_connection(why, &mut fx);
        !std::mem::replace(&mut st.reconnecting, true)
    };
    inner.up.send_replace(0);
    if start {
        tokio::spawn(reconnect(inner.clone(), None));
    }
    deliver(fx);
}

/// Handles every message of one frame; `Err` when the connection must end.
fn dispatch(
    inner: &Inner,
    frame: &[u8],
    channel: &mut u16,
    gen: u64,
) -> std::result::Result<(), String> {
    let mut fx = Fx::default();
    let mut raw = Vec::new();
    let mut wake = false;
    let r = (|| {
        let mut st = inner.lock();
        if st.gen != gen {
            return Ok(());
        }
        let now = Instant::now();
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
                    let route = match st.route.pop_front() {
                        Some(r) if r.channel == *channel => r,
                        _ => return Err(format!("the server answered request {id} out of order")),
                    };
                    if st.route.len() < st.unstamped {
                        st.unstamped = st.route.len();
                    }
                    match route.to {
                        Dest::Handshake(tx) => {
                            raw.push((tx, m.opcode, Bytes::copy_from_slice(m.body)));
                        }
                        Dest::Session => {
                            let ch = *channel;
                            if let Some(r) = st.drive(ch, &mut fx, |core, wire| {
                                core.handle_reply(id, &reply, now, wire)
                            }) {
                                r?;
                            }
                        }
                    }
                }
                ServerMsg::Event(WireEvent::GoAway { code, message }) => {
                    let why = String::from_utf8_lossy(message).into_owned();
                    if *channel == 0 {
                        st.goaway = Some((code, format!("server closed the connection: {why}")));
                        return Err(format!("server closed the connection: {code}: {why}"));
                    }
                    // The server ended this channel's session (it expired, say).
                    let ch = *channel;
                    st.drive(ch, &mut fx, |core, _| {
                        core.end(Phase::Lost(format!(
                            "the server ended the session: {code}: {why}"
                        )))
                    });
                }
                ServerMsg::Event(e) => {
                    let ch = *channel;
                    st.drive(ch, &mut fx, |core, _| core.handle_event(&e, now));
                }
            }
        }
        // Answers can make sessions send (the next reclaims, what waited behind a
        // probe): wake the writer then, and only then.
        wake = !st.out.is_empty() && !std::mem::replace(&mut st.writer_woken, true);
        Ok(())
    })();
    if wake {
        inner.wake_writer.notify_one();
    }
    for (tx, opcode, body) in raw {
        let _ = tx.send(Ok((opcode, body)));
    }
    deliver(fx);
    r
}

/// How often sessions' keepalives, deadlines and lease views are looked at.
const TICK_MS: u64 = 20;

/// Keeps every session alive (their PINGs ride together in the next frame), checks
/// their deadlines, and leaves a server that stopped answering.
async fn ticker(weak: Weak<Inner>) {
    loop {
        tokio::time::sleep(Duration::from_millis(TICK_MS)).await;
        let Some(inner) = weak.upgrade() else { return };
        let now = Instant::now();
        let mut fx = Fx::default();
        let (stuck, gen, wake) = {
            let mut st = inner.lock();
            if st.shut.is_some() {
                return;
            }
            // A server that stopped answering (SIGSTOP keeps its sockets open) is
            // left like a dead one. (Only requests the writer took count: the others
            // were not sent yet.)
            let stuck = st.connected
                && st
                    .oldest_sent()
                    .is_some_and(|t| now.saturating_duration_since(t) > inner.answer_timeout);
            let due: Vec<u16> = st
                .slots
                .iter()
                .enumerate()
                .filter_map(|(i, s)| match s {
                    Some(Slot {
                        state: SlotState::Session(core),
                        ..
                    }) if core.next_timeout().is_some_and(|t| t <= now) => Some(i as u16),
                    _ => None,
                })
                .collect();
            for ch in due {
                st.drive(ch, &mut fx, |core, wire| core.handle_timeout(now, wire));
            }
            let wake = !st.out.is_empty() && !std::mem::replace(&mut st.writer_woken, true);
            (stuck, st.gen, wake)
        };
        if wake {
            inner.wake_writer.notify_one();
        }
        deliver(fx);
        if stuck {
            tracing::debug!("no answer within the answer timeout: dropping the connection");
            connection_lost(
                &inner,
                gen,
                "the server did not answer within the answer timeout",
            );
        }
    }
}
