//! The session state machine: everything a client knows and decides about one
//! session, with no I/O, no clock and no runtime. [`crate::Client`] drives one per
//! connection; [`crate::Mux`] drives many over one connection, one per channel.
//!
//! It is public as a sans-IO API, in the manner of `quinn-proto`: a driver of its own
//! — another runtime, an event loop, or a deterministic simulation (this workspace's
//! `portswitch-cluster/tests/sim.rs` drives it against simulated servers) — owns the
//! connections, the timers and the HELLO exchange, and the session's rules stay here.
//!
//! # What the driver does
//!
//! - Opens a connection and sends HELLO (with the session's id and secret
//!   ([`SessionCore::info`]) to resume it); without credentials HELLO is answered by
//!   HELLO_OK. The first HELLO_OK makes the session, [`SessionCore::new`]; a later one
//!   is handed to [`SessionCore::resumed`] — after refusing a server whose epoch is
//!   older than [`SessionInfo::epoch`] (it is deposed, or about to learn it is: its
//!   answers must not extend the lease view). A HELLO answered `not_master` means:
//!   try another server.
//! - Implements [`Wire`]: each request the session decides on is pushed onto it, and
//!   the driver sends it on the current connection with the request id it returns.
//! - Hands every reply and event from the server to the session, and calls
//!   [`SessionCore::detached`] when the connection is lost (a GOAWAY, a closed socket,
//!   or an answer that takes too long: see [`SessionCore::oldest_unanswered`]). A
//!   GOAWAY `session_expired` ends the session ([`SessionCore::end`]).
//! - Calls [`SessionCore::handle_timeout`] by [`SessionCore::next_timeout`], and
//!   delivers [`Effects`] after each input. Once the session is over
//!   ([`SessionCore::is_over`]) it is dropped: a new session needs a new HELLO.
//!
//! # Driving contract
//!
//! Inputs, each with the time `now` (never earlier than the last one given):
//! - [`SessionCore::submit`]: a request of the application;
//! - [`SessionCore::handle_reply`] and [`SessionCore::handle_event`]: what the server
//!   sent for this session, in the order it arrived;
//! - [`SessionCore::detached`]: the connection is gone;
//! - [`SessionCore::resumed`]: a HELLO resuming this session on a new connection was
//!   answered;
//! - [`SessionCore::handle_timeout`]: time passed; call it no later than
//!   [`SessionCore::next_timeout`].
//!
//! Outputs: requests are pushed onto the [`Wire`] given to each input, as soon as they
//! are decided (a session detached from its connection keeps them until it is
//! resumed); completions of requests and events for the application are collected and
//! drained with [`SessionCore::take_effects`] after each input — drivers deliver them
//! outside their lock.
//!
//! # The rules it keeps
//!
//! - **The lease view** runs from the send time of the last request the server
//!   answered (save answers that say it has no such session), shortened by the lease
//!   margin. When it runs out the session is over from the client's side: every port is
//!   reported lost ([`Event::OwnershipLost`]) before the server could give it to anyone.
//! - **Failover.** A session resumed on a master of a higher epoch RECLAIMs every port
//!   it owns with its token (a window of [`RECLAIM_IN_FLIGHT_MAX`] at a time), re-sends
//!   its watches and its places in queues, then whatever the application asked while it
//!   was away, and reports [`Event::Resync`]. A request that names a port not yet
//!   reclaimed is preceded by that port's RECLAIM, so an UNREGISTER can never reach the
//!   new master before the port is taken back (it would be refused, and the RECLAIM
//!   after it would hold the port forever). A port not reclaimed by the time the new
//!   master's recovery window could close is given up ([`Event::PortLost`]).
//! - **A release goes only to a server heard from lately.** An UNREGISTER submitted
//!   when the session has heard nothing from its server for [`PROBE_AFTER`] waits
//!   behind a PING (and whatever the session submits after it waits too, to keep its
//!   order). If the server answers, out it goes; if the server died or went silent
//!   meanwhile, the port is still the session's: reclaimed on the new master and
//!   released there, free at once. Sent blindly, a release of unknown outcome leaves
//!   the port unknown to the new master until its recovery window closes — for every
//!   lock whose holder let go while a stopped master went unnoticed.
//! - **Waiting.** A REGISTER that waits until granted (`register_wait`, locks,
//!   elections) survives a lost connection: it is sent again on the next one (REGISTER
//!   is idempotent for the session that sent it), and its place in the queue is taken
//!   again on a new master. Ports being let go when the connection drops are not taken
//!   back, whether or not the server saw the UNREGISTER.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use portswitch_proto::{ErrorCode, Event as WireEvent, HelloOk, Reply, Request};

use crate::name::Name;
use crate::types::*;

/// Maps keyed by port names (foldhash: touched on every REGISTER and UNREGISTER).
pub(crate) type Map<K, V> = hashbrown::HashMap<K, V, foldhash::fast::RandomState>;

/// RECLAIMs a session keeps in flight after a failover: enough to fill frames, few
/// enough that a session with a million ports floods neither the new master's send
/// queue nor its own memory.
pub const RECLAIM_IN_FLIGHT_MAX: usize = 1_024;

/// How long a session may have heard nothing from its server before an UNREGISTER
/// waits for a PING's answer (see the module docs): longer than a request's round
/// trip, so that a release right after an answer (the usual acquire, work, release)
/// costs nothing; a release after a longer quiet costs one round trip.
pub const PROBE_AFTER: Duration = Duration::from_micros(500);

/// Where a session's requests go: its connection, or its channel of a shared one.
/// Implemented by the driver.
pub trait Wire {
    /// Queues `req` and returns the request id it goes out with: non-zero, and unique
    /// among the requests of the connection still unanswered. Replies carry it back
    /// to [`SessionCore::handle_reply`], in the order the requests were pushed.
    fn push(&mut self, req: &Request<'_>) -> u32;
}

/// How a session keeps itself.
#[derive(Debug, Clone)]
pub struct Settings {
    /// The fraction of the lease the view gives up early (clock-rate margin).
    pub lease_margin: f64,
    /// The session ends with its connection.
    pub end_on_disconnect: bool,
    /// Longest quiet time before a PING (never more than a quarter of the lease).
    pub keepalive: Option<Duration>,
}

/// An owned reply: what a request submitted with a completion is completed with
/// (server errors are [`Error::Server`]).
#[derive(Debug)]
pub enum Answer {
    /// OK (PING, UNREGISTER, UNWATCH, BYE).
    Ok,
    /// REGISTERED: the session owns the port with this token (for a wait until
    /// granted, the grant that ended the wait).
    Registered(u64),
    /// TAKEN: another session (id, token, node) owns the port.
    Taken(u64, u64, Bytes),
    /// QUEUED at this position (1 = next).
    Queued(u32),
    /// OWNER, for QUERY (its `port` is left empty).
    Owner(Owner),
    /// FREE, for QUERY.
    Free,
    /// WATCHING, with the watched port's owner (session, token) if any.
    Watching(Option<(u64, u64)>),
    /// DELIVERED, for SEND.
    Delivered,
    /// NO_OWNER, for SEND.
    NoOwner,
    /// COUNT, for BROADCAST.
    Count(u64),
    /// PAGE, for LIST.
    Page(Page),
    /// STATS.
    Stats(Vec<(String, u64)>),
    /// ADMIN_OK, its JSON result.
    Admin(Bytes),
}

/// What a request changes in the session besides answering it: submitted with the
/// request it describes (the two must agree). Build the variants that name a port
/// with [`Kind::register`] and [`Kind::unregister`].
// `Name`, the crate's inline port name, is not public: the constructors take bytes.
#[derive(Debug)]
#[allow(private_interfaces)]
pub enum Kind {
    /// Nothing but the answer (PING, QUERY, SEND, LIST, BYE, ...).
    Plain,
    /// REGISTER of `port`.
    Register {
        /// The port.
        port: Name,
        /// Its value (sent again with RECLAIM after a failover).
        value: Bytes,
        /// Wait in the port's queue if it is taken.
        wait: bool,
        /// Complete only when the port is granted (not at QUEUED); survives a lost
        /// connection.
        until_granted: bool,
    },
    /// UNREGISTER of a port: release it or leave its queue.
    Unregister(Name),
    /// An UNREGISTER sent again on a new connection because the old one dropped
    /// before it was answered (the session sends these itself): the port is no
    /// longer the session's either way, so `not_owner` (it had arrived) or
    /// `recovering` (a new master that never had it) answer it as done.
    UnregisterAgain(Name),
    /// A RECLAIM the session sends itself after a failover.
    Reclaim {
        /// The port.
        port: Name,
        /// The token it is reclaimed with.
        token: u64,
    },
    /// WATCH of a port (or a prefix): re-sent on a new master.
    Watch {
        /// The port name or prefix.
        name: Bytes,
        /// Whether `name` is a prefix.
        prefix: bool,
    },
    /// WATCH of a prefix with a filter expression (WATCH_WHERE): re-sent, with its
    /// filter, on a new master.
    WatchWhere {
        /// The prefix.
        prefix: Bytes,
        /// The filter's source.
        filter: Bytes,
    },
    /// UNWATCH.
    Unwatch {
        /// The port name or prefix.
        name: Bytes,
        /// Whether `name` is a prefix.
        prefix: bool,
    },
    /// A PING proving the server alive before held requests go out (the session sends
    /// these itself).
    Probe,
}

impl Kind {
    /// The kind of a REGISTER of `port` with `value`; `until_granted` (with `wait`) is
    /// what `Client::register_wait` and the lock and election recipes use: the
    /// completion comes with the grant, and the wait survives lost connections and
    /// failovers.
    pub fn register(port: &[u8], value: Bytes, wait: bool, until_granted: bool) -> Kind {
        Kind::Register {
            port: Name::new(port),
            value,
            wait,
            until_granted,
        }
    }

    /// The kind of an UNREGISTER of `port`.
    pub fn unregister(port: &[u8]) -> Kind {
        Kind::Unregister(Name::new(port))
    }

    /// The port a request of this kind names, for the reclaim-first rule.
    fn port(&self) -> Option<&Name> {
        match self {
            Kind::Register { port, .. } | Kind::Unregister(port) => Some(port),
            _ => None,
        }
    }
}

struct Pending<T> {
    id: u32,
    /// Submission order within the session.
    seq: u64,
    sent_at: Instant,
    kind: Kind,
    done: Option<T>,
}

/// A request submitted while the session had no connection, kept encoded.
struct Deferred<T> {
    opcode: u8,
    body: Bytes,
    seq: u64,
    kind: Kind,
    done: Option<T>,
}

impl<T> Deferred<T> {
    fn of(req: &Request<'_>, seq: u64, kind: Kind, done: Option<T>) -> Deferred<T> {
        let mut body = BytesMut::with_capacity(req.body_len());
        req.encode_body(&mut body);
        Deferred {
            opcode: req.opcode(),
            body: body.freeze(),
            seq,
            kind,
            done,
        }
    }
}

/// Where a session stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Phase {
    /// On a connection.
    Live,
    /// Between connections; requests wait for the next one.
    Detached,
    /// Over: the lease view ran out, or the server ended or refused it.
    Lost(String),
    /// Closed by the application.
    Closed,
}

/// What the driver delivers after an input.
pub struct Effects<T> {
    /// Completions of submitted requests, each with the `done` it was submitted with.
    pub done: Vec<(T, Result<Answer>)>,
    /// Events for the application, in order.
    pub events: Vec<Event>,
    /// The session ended during this input.
    pub ended: bool,
}

impl<T> Default for Effects<T> {
    fn default() -> Self {
        Effects {
            done: Vec::new(),
            events: Vec::new(),
            ended: false,
        }
    }
}

/// The state machine of one session. `T` is whatever the driver completes a request
/// through (a channel's sender, a request number, ...).
pub struct SessionCore<T> {
    settings: Settings,
    info: SessionInfo,
    safe_lease: Duration,
    keepalive_every: Duration,
    phase: Phase,
    pending: VecDeque<Pending<T>>,
    backlog: Vec<Deferred<T>>,
    /// Requests held behind a probe (an UNREGISTER after a quiet spell, and all after
    /// it), in order.
    held: VecDeque<Deferred<T>>,
    seq: u64,
    /// Ports this session owns, with their tokens.
    owned: Map<Name, u64>,
    /// Non-empty values of owned ports (sent again with RECLAIM).
    values: Map<Name, Bytes>,
    /// Ports whose queue this session is in, with the value to register.
    queued: Map<Name, Bytes>,
    /// Requests completed when their port is granted.
    grant_waiters: Map<Name, Vec<T>>,
    /// Watched names (prefix or not), with the filter of a filtered prefix watch.
    watches: hashbrown::HashMap<(Bytes, bool), Option<Bytes>, foldhash::fast::RandomState>,
    /// UNREGISTERs submitted and not yet answered (in flight, held or waiting for a
    /// connection): while any is, a REGISTER answered (or an ACQUIRED received) for
    /// its port after it was submitted does not make the port owned again. A count,
    /// and a look through the requests only when it is not zero: a map touched on
    /// every UNREGISTER cost a tenth of a shared connection's throughput.
    unregistering: usize,
    /// Owned ports not yet reclaimed on the current master; `true` once a RECLAIM is
    /// in flight for it on this connection.
    unconfirmed: Map<Name, bool>,
    /// When every unconfirmed port must be given up: the earliest the new master's
    /// recovery window can close.
    unconfirmed_until: Option<Instant>,
    to_reclaim: VecDeque<Name>,
    reclaims_in_flight: usize,
    /// Resumed on a new master: Resync is due once every port is reclaimed (and
    /// watches and queue places must be re-sent on any later resume until then).
    resync_due: bool,
    view_end: Instant,
    last_sent: Instant,
    /// When the server was last heard from (a reply or an event).
    last_heard: Instant,
    fx: Effects<T>,
}

impl<T> SessionCore<T> {
    /// A session the server opened with `ok` for a HELLO sent at `hello_sent_at`.
    pub fn new(settings: Settings, ok: &HelloOk<'_>, hello_sent_at: Instant) -> SessionCore<T> {
        let lease = Duration::from_millis(ok.lease_ms as u64);
        let margin = settings.lease_margin.clamp(0.0, 0.9);
        let safe_lease = lease.mul_f64(1.0 - margin);
        let keepalive_every = settings
            .keepalive
            .map_or(lease / 4, |k| k.min(lease / 4))
            .max(Duration::from_millis(1));
        SessionCore {
            settings,
            info: SessionInfo {
                id: ok.session,
                secret: ok.secret,
                epoch: ok.epoch,
                lease_ms: ok.lease_ms,
                limits: ok.limits,
            },
            safe_lease,
            keepalive_every,
            phase: Phase::Live,
            pending: VecDeque::new(),
            backlog: Vec::new(),
            held: VecDeque::new(),
            seq: 0,
            owned: Map::default(),
            values: Map::default(),
            queued: Map::default(),
            grant_waiters: Map::default(),
            watches: Default::default(),
            unregistering: 0,
            unconfirmed: Map::default(),
            unconfirmed_until: None,
            to_reclaim: VecDeque::new(),
            reclaims_in_flight: 0,
            resync_due: false,
            view_end: hello_sent_at + safe_lease,
            last_sent: hello_sent_at,
            last_heard: hello_sent_at,
            fx: Effects::default(),
        }
    }

    /// The session's id, secret (to resume it), lease and limits, and the epoch of
    /// the latest master it was on.
    pub fn info(&self) -> SessionInfo {
        self.info
    }

    /// Where the session stands.
    pub fn phase(&self) -> &Phase {
        &self.phase
    }

    /// Whether the session is over (lost or closed): it takes no more input.
    pub fn is_over(&self) -> bool {
        matches!(self.phase, Phase::Lost(_) | Phase::Closed)
    }

    /// Ports owned, as far as the client knows, with their tokens.
    pub fn owned_ports(&self) -> Vec<(Bytes, u64)> {
        self.owned.iter().map(|(k, v)| (k.to_bytes(), *v)).collect()
    }

    /// Ports whose queue the session is in, as far as it knows (QUEUED answered and
    /// not yet granted or left): taken again on a new master.
    pub fn queued_ports(&self) -> Vec<Bytes> {
        self.queued.keys().map(Name::to_bytes).collect()
    }

    /// Whether the session owns `port` with `token`.
    pub fn owns(&self, port: &[u8], token: u64) -> bool {
        self.owned.get(port) == Some(&token)
    }

    /// Until when the lease view lasts without further answers.
    pub fn view_end(&self) -> Instant {
        self.view_end
    }

    /// When the oldest request still unanswered was sent.
    pub fn oldest_unanswered(&self) -> Option<Instant> {
        self.pending.front().map(|p| p.sent_at)
    }

    /// Moves the completions out (into a buffer the driver reuses); events stay for
    /// [`SessionCore::take_effects`].
    pub fn take_done(&mut self, into: &mut Vec<(T, Result<Answer>)>) {
        into.append(&mut self.fx.done);
    }

    /// Whether there are events or an end to deliver.
    pub fn has_signals(&self) -> bool {
        !self.fx.events.is_empty() || self.fx.ended
    }

    /// Moves completions, events and the end out into `into` (after each input).
    pub fn take_effects(&mut self, into: &mut Effects<T>) {
        into.done.append(&mut self.fx.done);
        into.events.append(&mut self.fx.events);
        into.ended |= std::mem::take(&mut self.fx.ended);
    }

    fn complete(&mut self, done: Option<T>, r: Result<Answer>) {
        if let Some(d) = done {
            self.fx.done.push((d, r));
        }
    }

    // ----- inputs ---------------------------------------------------------------

    /// A request of the application. Errors (session over, a limit exceeded) come
    /// back at once; otherwise `done` is completed later with the answer.
    pub fn submit(
        &mut self,
        req: &Request<'_>,
        kind: Kind,
        done: Option<T>,
        now: Instant,
        wire: &mut impl Wire,
    ) -> Result<()> {
        match &self.phase {
            Phase::Lost(why) => return Err(Error::SessionLost(why.clone())),
            Phase::Closed => return Err(Error::Closed),
            Phase::Live | Phase::Detached => {}
        }
        check_limits(&self.info.limits, req)?;
        self.seq += 1;
        let seq = self.seq;
        match &kind {
            Kind::Unregister(port) => {
                self.unregistering += 1;
                // Leaving a queue: nobody waits for the grant any more.
                if !self.queued.is_empty() {
                    self.queued.remove(port.as_slice());
                }
                if !self.grant_waiters.is_empty() {
                    if let Some(ws) = self.grant_waiters.remove(port.as_slice()) {
                        for w in ws {
                            self.fx.done.push((w, Err(left_the_queue())));
                        }
                    }
                }
            }
            Kind::Unwatch { name, prefix } => {
                self.watches.remove(&(name.clone(), *prefix));
            }
            _ => {}
        }
        if self.phase == Phase::Detached {
            self.backlog.push(Deferred::of(req, seq, kind, done));
            return Ok(());
        }
        // (The clock arithmetic only for a release: it runs per request.)
        let quiet = || now.saturating_duration_since(self.last_heard) >= PROBE_AFTER;
        if !self.held.is_empty() || (matches!(kind, Kind::Unregister(_)) && quiet()) {
            if self.held.is_empty() {
                self.seq += 1;
                let probe = self.seq;
                self.send(&Request::Ping, Kind::Probe, None, probe, now, wire);
            }
            self.held.push_back(Deferred::of(req, seq, kind, done));
            return Ok(());
        }
        self.send(req, kind, done, seq, now, wire);
        Ok(())
    }

    fn send_deferred(&mut self, d: Deferred<T>, now: Instant, wire: &mut impl Wire) {
        match Request::decode(d.opcode, &d.body) {
            Ok(req) => self.send(&req, d.kind, d.done, d.seq, now, wire),
            Err(e) => {
                let e = Error::Protocol(format!("a deferred request did not decode: {e}"));
                self.complete(d.done, Err(e));
            }
        }
    }

    /// Puts a request on the wire, preceded by its port's RECLAIM if that is still due.
    fn send(
        &mut self,
        req: &Request<'_>,
        kind: Kind,
        done: Option<T>,
        seq: u64,
        now: Instant,
        wire: &mut impl Wire,
    ) {
        // (Each map is looked into only when it has something: these run for every
        // REGISTER and UNREGISTER, and most sessions have nothing unconfirmed, queued
        // or being let go.)
        if let Some(port) = kind.port().filter(|_| !self.unconfirmed.is_empty()) {
            if self.unconfirmed.get(port.as_slice()) == Some(&false) {
                let port = port.clone();
                self.reclaim(&port, now, wire);
            }
        }
        let id = wire.push(req);
        self.pending.push_back(Pending {
            id,
            seq,
            sent_at: now,
            kind,
            done,
        });
        self.last_sent = now;
    }

    /// Sends the RECLAIM of `port` if it is unconfirmed and none is in flight.
    fn reclaim(&mut self, port: &Name, now: Instant, wire: &mut impl Wire) {
        let (Some(sent), Some(&token)) = (
            self.unconfirmed.get_mut(port.as_slice()),
            self.owned.get(port.as_slice()),
        ) else {
            return;
        };
        if *sent {
            return;
        }
        *sent = true;
        let value = self
            .values
            .get(port.as_slice())
            .cloned()
            .unwrap_or_default();
        let id = wire.push(&Request::Reclaim {
            port: port.as_slice(),
            token,
            value: &value,
        });
        self.seq += 1;
        self.pending.push_back(Pending {
            id,
            seq: self.seq,
            sent_at: now,
            kind: Kind::Reclaim {
                port: port.clone(),
                token,
            },
            done: None,
        });
        self.reclaims_in_flight += 1;
        self.last_sent = now;
    }

    /// The server's reply to request `id`. Replies come in request order; one out of
    /// order is a protocol violation (`Err`), and the driver must drop the connection.
    pub fn handle_reply(
        &mut self,
        id: u32,
        reply: &Reply<'_>,
        now: Instant,
        wire: &mut impl Wire,
    ) -> std::result::Result<(), String> {
        let p = match self.pending.pop_front() {
            Some(p) if p.id == id => p,
            Some(p) => {
                let want = p.id;
                self.pending.push_front(p);
                return Err(format!(
                    "the server answered request {id} while {want} was due"
                ));
            }
            None => return Err(format!("the server answered request {id}, never sent")),
        };
        // An answer proves the server held the session when the request was sent —
        // unless it says the server has no such session.
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
        if !disproves {
            let end = p.sent_at + self.safe_lease;
            if end > self.view_end {
                self.view_end = end;
            }
        }
        self.last_heard = now;
        let answer = owned_answer(reply);
        let Pending {
            seq, kind, done, ..
        } = p;
        match kind {
            Kind::Register {
                port,
                value,
                wait,
                until_granted,
            } => self.on_register(port, value, wait, until_granted, seq, answer, done),
            Kind::Unregister(port) => {
                let gone = match &answer {
                    Ok(Answer::Ok) => true,
                    Err(e) => e.code() == Some(ErrorCode::NotOwner),
                    Ok(_) => false,
                };
                if gone {
                    self.forget_port(port.as_slice());
                }
                self.unregistering = self.unregistering.saturating_sub(1);
                self.complete(done, answer);
            }
            Kind::UnregisterAgain(_) => {
                self.unregistering = self.unregistering.saturating_sub(1);
                let done_either_way = match &answer {
                    Err(e) => matches!(e.code(), Some(ErrorCode::NotOwner | ErrorCode::Recovering)),
                    Ok(_) => true,
                };
                let answer = if done_either_way {
                    Ok(Answer::Ok)
                } else {
                    answer
                };
                self.complete(done, answer);
            }
            Kind::Reclaim { port, token } => {
                self.on_reclaim(port, token, answer);
                self.continue_recovery(now, wire);
            }
            Kind::Watch { name, prefix } => {
                if matches!(answer, Ok(Answer::Watching(_))) {
                    self.watches.insert((name, prefix), None);
                }
                self.complete(done, answer);
            }
            Kind::WatchWhere { prefix, filter } => {
                if matches!(answer, Ok(Answer::Watching(_))) {
                    self.watches.insert((prefix, true), Some(filter));
                }
                self.complete(done, answer);
            }
            Kind::Plain | Kind::Unwatch { .. } => self.complete(done, answer),
            Kind::Probe => {
                // The server answered everything sent before: what waited goes out.
                for d in std::mem::take(&mut self.held) {
                    self.send_deferred(d, now, wire);
                }
            }
        }
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    fn on_register(
        &mut self,
        port: Name,
        value: Bytes,
        wait: bool,
        until_granted: bool,
        seq: u64,
        answer: Result<Answer>,
        done: Option<T>,
    ) {
        // Released since this REGISTER was sent: the server releases it right after.
        let let_go = self.unregistered_after(port.as_slice(), seq);
        match answer {
            Ok(Answer::Registered(t)) => {
                if !let_go {
                    self.granted(&port, t, Some(&value));
                }
                self.complete(done, Ok(Answer::Registered(t)));
            }
            Ok(Answer::Queued(position)) if wait && !let_go => {
                self.queued.insert(port.clone(), value);
                match done {
                    Some(d) if until_granted => {
                        self.grant_waiters.entry(port).or_default().push(d);
                    }
                    done => self.complete(done, Ok(Answer::Queued(position))),
                }
            }
            Ok(Answer::Queued(_)) if until_granted => self.complete(done, Err(left_the_queue())),
            Ok(Answer::Taken(..)) if until_granted => self.complete(
                done,
                Err(Error::Protocol("TAKEN for a waiting REGISTER".into())),
            ),
            other => self.complete(done, other),
        }
    }

    /// `port` is this session's with `token`: owned, out of its queue, and whoever
    /// waits for the grant has it.
    fn granted(&mut self, port: &Name, token: u64, value: Option<&Bytes>) {
        self.owned.insert(port.clone(), token);
        let queued_value = if self.queued.is_empty() {
            None
        } else {
            self.queued.remove(port.as_slice())
        };
        match value.or(queued_value.as_ref()) {
            Some(v) if !v.is_empty() => {
                self.values.insert(port.clone(), v.clone());
            }
            _ if !self.values.is_empty() => {
                self.values.remove(port.as_slice());
            }
            _ => {}
        }
        if !self.grant_waiters.is_empty() {
            if let Some(ws) = self.grant_waiters.remove(port.as_slice()) {
                for w in ws {
                    self.fx.done.push((w, Ok(Answer::Registered(token))));
                }
            }
        }
    }

    /// Whether an UNREGISTER of `port` submitted after request `seq` is not yet
    /// answered.
    fn unregistered_after(&self, port: &[u8], seq: u64) -> bool {
        if self.unregistering == 0 {
            return false;
        }
        let is = |kind: &Kind, s: u64| {
            s > seq
                && matches!(kind, Kind::Unregister(p) | Kind::UnregisterAgain(p) if p.as_slice() == port)
        };
        self.pending.iter().any(|p| is(&p.kind, p.seq))
            || self.held.iter().any(|d| is(&d.kind, d.seq))
            || self.backlog.iter().any(|d| is(&d.kind, d.seq))
    }

    fn forget_port(&mut self, port: &[u8]) {
        self.owned.remove(port);
        if !self.values.is_empty() {
            self.values.remove(port);
        }
        if !self.unconfirmed.is_empty() {
            self.unconfirmed.remove(port);
        }
    }

    fn on_reclaim(&mut self, port: Name, token: u64, answer: Result<Answer>) {
        self.reclaims_in_flight = self.reclaims_in_flight.saturating_sub(1);
        let reason = match answer {
            Ok(Answer::Registered(t)) if t == token => {
                self.unconfirmed.remove(port.as_slice());
                return;
            }
            // Not this master after all (deposed meanwhile): reclaim on the next one.
            Err(e)
                if matches!(
                    e.code(),
                    Some(
                        ErrorCode::NotMaster
                            | ErrorCode::NoSession
                            | ErrorCode::SessionExpired
                            | ErrorCode::ResumeFailed
                    )
                ) =>
            {
                if let Some(sent) = self.unconfirmed.get_mut(port.as_slice()) {
                    *sent = false;
                }
                return;
            }
            Ok(other) => format!("the new master answered {other:?}"),
            Err(e) => format!("the new master refused: {e}"),
        };
        self.unconfirmed.remove(port.as_slice());
        if self.owned.get(port.as_slice()) == Some(&token) {
            self.owned.remove(port.as_slice());
            self.values.remove(port.as_slice());
            self.fx.events.push(Event::PortLost {
                port: port.to_bytes(),
                token,
                reason,
            });
        }
    }

    /// Keeps RECLAIMs flowing; reports Resync once every port is reclaimed.
    fn continue_recovery(&mut self, now: Instant, wire: &mut impl Wire) {
        while self.reclaims_in_flight < RECLAIM_IN_FLIGHT_MAX {
            let Some(port) = self.to_reclaim.pop_front() else {
                break;
            };
            self.reclaim(&port, now, wire);
        }
        if self.resync_due && self.to_reclaim.is_empty() && self.reclaims_in_flight == 0 {
            self.resync_due = false;
            self.fx.events.push(Event::Resync);
        }
    }

    /// An event for this session.
    pub fn handle_event(&mut self, ev: &WireEvent<'_>, now: Instant) {
        self.last_heard = self.last_heard.max(now);
        let ev = match *ev {
            WireEvent::Acquired { port, token } => {
                // Granted before the server saw our UNREGISTER, which releases it
                // again: not ours.
                if !self.unregistered_after(port, 0) {
                    self.granted(&Name::new(port), token, None);
                }
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
            // The driver decides what a GOAWAY means for the connection and session.
            WireEvent::GoAway { .. } => return,
        };
        self.fx.events.push(ev);
    }

    /// The connection is gone. Requests in flight fail with `ConnectionLost` (their
    /// outcome is unknown), except waits until granted, which are sent again on the
    /// next connection. A session that ends on disconnect ends now.
    pub fn detached(&mut self, why: &str) {
        if self.phase != Phase::Live {
            return;
        }

        // Ports the application was letting go of are not ours to take back, whether
        // or not the server saw the UNREGISTER: not reclaimed on a new master. The
        // UNREGISTER goes out again on the next connection (on the same master it may
        // never have arrived, and the port would stay the session's for its life).
        // (One submitted while detached was not sent: that port is still ours,
        // reclaimed and then released on the next connection.)
        let sent: Vec<(Name, u64)> = self
            .pending
            .iter()
            .filter_map(|p| match &p.kind {
                Kind::Unregister(port) | Kind::UnregisterAgain(port) => Some((port.clone(), p.seq)),
                _ => None,
            })
            .collect();
        for (port, _) in &sent {
            self.forget_port(port.as_slice());
        }
        for sent in self.unconfirmed.values_mut() {
            *sent = false;
        }
        self.reclaims_in_flight = 0;
        let mut again = Vec::new();
        for p in std::mem::take(&mut self.pending) {
            match p.kind {
                // The application left the queue after asking: the wait is over.
                Kind::Register {
                    ref port,
                    until_granted: true,
                    ..
                } if sent.iter().any(|(q, s)| q == port && *s > p.seq) => {
                    self.complete(p.done, Err(left_the_queue()));
                }
                Kind::Unregister(port) | Kind::UnregisterAgain(port) => {
                    let req = Request::Unregister {
                        port: port.as_slice(),
                    };
                    again.push(Deferred::of(
                        &req,
                        p.seq,
                        Kind::UnregisterAgain(port.clone()),
                        p.done,
                    ));
                }
                Kind::Register {
                    ref port,
                    ref value,
                    until_granted: true,
                    ..
                } => {
                    let req = Request::Register {
                        port: port.as_slice(),
                        value,
                        wait: true,
                    };
                    let mut d = Deferred::of(&req, p.seq, Kind::Plain, p.done);
                    d.kind = p.kind;
                    again.push(d);
                }
                _ => self.complete(p.done, Err(Error::ConnectionLost)),
            }
        }
        // Held behind a probe: not sent, so still the session's to send elsewhere.
        again.extend(self.held.drain(..));
        again.append(&mut self.backlog);
        self.backlog = again;
        if self.settings.end_on_disconnect {
            self.end(Phase::Lost(format!(
                "{why}; the session ends on disconnect"
            )));
            return;
        }
        self.phase = Phase::Detached;
        self.fx.events.push(Event::Disconnected);
    }

    /// A HELLO resuming this session, sent at `sent_at`, was answered with `ok` on a
    /// new connection whose requests go to `wire`. The driver has already refused a
    /// master of an older epoch than [`SessionInfo::epoch`].
    pub fn resumed(
        &mut self,
        ok: &HelloOk<'_>,
        sent_at: Instant,
        now: Instant,
        wire: &mut impl Wire,
    ) {
        if self.phase != Phase::Detached {
            return;
        }
        debug_assert!(
            ok.epoch >= self.info.epoch,
            "the driver refuses older masters"
        );
        // Ports whose reclaim deadline passed are given up before anything else.
        self.give_up_unreclaimed(now);
        let new_master = ok.epoch > self.info.epoch;
        self.phase = Phase::Live;
        self.info.epoch = ok.epoch;
        let end = sent_at + self.safe_lease;
        if end > self.view_end {
            self.view_end = end;
        }
        self.last_sent = sent_at;
        self.last_heard = now;
        if new_master {
            // Every port must be reclaimed before the new master's window can close;
            // past that the client must not count on it.
            let margin = self.settings.lease_margin.clamp(0.0, 0.9);
            let window = Duration::from_millis(ok.recovery_ms as u64).mul_f64(1.0 - margin);
            self.unconfirmed_until = Some(sent_at + window);
            let ports: Vec<Name> = self.owned.keys().cloned().collect();
            for p in &ports {
                self.unconfirmed.insert(p.clone(), false);
            }
            self.to_reclaim = ports.into();
            self.resync_due = true;
        } else {
            // A reclaim cut short by a dropped connection is finished here.
            self.to_reclaim = self
                .unconfirmed
                .iter()
                .filter(|(_, sent)| !**sent)
                .map(|(p, _)| p.clone())
                .collect();
        }
        self.fx.events.push(Event::Reconnected);
        // Reclaims first (a window of them; the rest as answers come), then watches and
        // queue places, then what the application asked meanwhile.
        while self.reclaims_in_flight < RECLAIM_IN_FLIGHT_MAX {
            let Some(port) = self.to_reclaim.pop_front() else {
                break;
            };
            self.reclaim(&port, now, wire);
        }
        if self.resync_due {
            let watches: Vec<((Bytes, bool), Option<Bytes>)> = self
                .watches
                .iter()
                .map(|(k, f)| (k.clone(), f.clone()))
                .collect();
            for ((name, prefix), filter) in watches {
                self.seq += 1;
                let seq = self.seq;
                match filter {
                    Some(filter) => {
                        let req = Request::WatchWhere {
                            prefix: &name,
                            filter: &filter,
                        };
                        let kind = Kind::WatchWhere {
                            prefix: name.clone(),
                            filter: filter.clone(),
                        };
                        self.send(&req, kind, None, seq, now, wire);
                    }
                    None => {
                        let req = Request::Watch {
                            name: &name,
                            prefix,
                        };
                        let kind = Kind::Watch {
                            name: name.clone(),
                            prefix,
                        };
                        self.send(&req, kind, None, seq, now, wire);
                    }
                }
            }
        }
        // Places in queues, on every resume: on a new master they must be taken again;
        // on the same one a grant (ACQUIRED) may have been lost with the connection,
        // and REGISTER answers a waiter its place, or the owner its grant.
        let queued: Vec<(Name, Bytes)> = self
            .queued
            .iter()
            .map(|(p, v)| (p.clone(), v.clone()))
            .collect();
        for (port, value) in queued {
            // Waits until granted are in the backlog already: they go out below.
            if self
                .backlog
                .iter()
                .any(|d| matches!(&d.kind, Kind::Register { port: p, .. } if *p == port))
            {
                continue;
            }
            let req = Request::Register {
                port: port.as_slice(),
                value: &value,
                wait: true,
            };
            self.seq += 1;
            let seq = self.seq;
            let kind = Kind::Register {
                port: port.clone(),
                value: value.clone(),
                wait: true,
                until_granted: false,
            };
            self.send(&req, kind, None, seq, now, wire);
        }
        for d in std::mem::take(&mut self.backlog) {
            // A release cut short goes out again only to the same master (it may never
            // have arrived, and the port would stay the session's). A new master never
            // had the port from this session — it was not reclaimed — so there is
            // nothing to send: the release is over, its outcome unknown, as before.
            if new_master && matches!(d.kind, Kind::UnregisterAgain(_)) {
                self.unregistering = self.unregistering.saturating_sub(1);
                self.complete(d.done, Err(Error::ConnectionLost));
                continue;
            }
            self.send_deferred(d, now, wire);
        }
        self.continue_recovery(now, wire);
    }

    /// Ports still unreclaimed when the new master's window could close are lost.
    fn give_up_unreclaimed(&mut self, now: Instant) {
        let Some(until) = self.unconfirmed_until else {
            return;
        };
        if now < until {
            return;
        }
        self.unconfirmed_until = None;
        let late: Vec<Name> = self.unconfirmed.drain().map(|(p, _)| p).collect();
        for port in late {
            self.values.remove(port.as_slice());
            if let Some(token) = self.owned.remove(port.as_slice()) {
                self.fx.events.push(Event::PortLost {
                    port: port.to_bytes(),
                    token,
                    reason: "not reclaimed before the new master's recovery window could close"
                        .into(),
                });
            }
        }
    }

    /// Time passed: keepalive, reclaim deadlines, and the lease view.
    pub fn handle_timeout(&mut self, now: Instant, wire: &mut impl Wire) {
        if self.is_over() {
            return;
        }
        self.give_up_unreclaimed(now);
        if now >= self.view_end {
            self.end(Phase::Lost(
                "no answer from the server within the lease".into(),
            ));
            return;
        }
        if self.phase == Phase::Live {
            if now >= self.last_sent + self.keepalive_every {
                self.seq += 1;
                let seq = self.seq;
                self.send(&Request::Ping, Kind::Plain, None, seq, now, wire);
            }
            self.continue_recovery(now, wire);
        }
    }

    /// The latest time by which [`SessionCore::handle_timeout`] must be called.
    pub fn next_timeout(&self) -> Option<Instant> {
        if self.is_over() {
            return None;
        }
        let mut t = self.view_end;
        if self.phase == Phase::Live {
            t = t.min(self.last_sent + self.keepalive_every);
        }
        if let Some(u) = self.unconfirmed_until {
            if !self.unconfirmed.is_empty() {
                t = t.min(u);
            }
        }
        Some(t)
    }

    /// Ends the session from the client's side: everything waiting fails; a lost
    /// session reports every port it owned as lost.
    pub fn end(&mut self, phase: Phase) {
        if self.is_over() {
            return;
        }
        let err = |p: &Phase| match p {
            Phase::Lost(why) => Error::SessionLost(why.clone()),
            _ => Error::Closed,
        };
        for p in std::mem::take(&mut self.pending) {
            self.complete(p.done, Err(err(&phase)));
        }
        for d in std::mem::take(&mut self.backlog)
            .into_iter()
            .chain(std::mem::take(&mut self.held))
        {
            self.complete(d.done, Err(err(&phase)));
        }
        for (_, ws) in std::mem::take(&mut self.grant_waiters) {
            for w in ws {
                self.fx.done.push((w, Err(err(&phase))));
            }
        }
        let owned: Vec<(Bytes, u64)> = self.owned.drain().map(|(p, t)| (p.to_bytes(), t)).collect();
        if let Phase::Lost(reason) = &phase {
            self.fx.events.push(Event::OwnershipLost {
                ports: owned,
                reason: reason.clone(),
            });
        }
        self.values.clear();
        self.queued.clear();
        self.watches.clear();
        self.unregistering = 0;
        self.unconfirmed.clear();
        self.to_reclaim.clear();
        self.phase = phase;
        self.fx.ended = true;
    }
}

fn left_the_queue() -> Error {
    Error::server(
        ErrorCode::NotOwner,
        "the port was unregistered while waiting for it",
    )
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
        Reply::Error {
            code,
            message,
            retry_ms,
            master,
        } => return Err(Error::of_reply(code, message, retry_ms, master)),
        Reply::AdminOk { result } => Answer::Admin(b(result)),
        Reply::HelloOk(_) | Reply::AuthContinue { .. } => {
            return Err(Error::Protocol(
                "handshake reply outside a handshake".into(),
            ))
        }
    })
}

/// Refuses, before sending, a request that exceeds a limit the server announced.
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
        Request::WatchWhere { prefix, filter } | Request::ListWhere { prefix, filter, .. } => {
            check("prefix", prefix.len(), l.port_name_bytes_max)?;
            check(
                "filter",
                filter.len(),
                portswitch_proto::limits::QUERY_BYTES_MAX as u32,
            )
        }
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

#[cfg(test)]
mod tests {
    //! The session core fed inputs, its effects checked: no sockets, no clock.

    use super::*;
    use portswitch_proto::ServerLimits;

    /// Records requests as the server would read them.
    #[derive(Default)]
    struct Tape {
        next_id: u32,
        sent: Vec<(u32, String)>,
    }

    impl Wire for Tape {
        fn push(&mut self, req: &Request<'_>) -> u32 {
            self.next_id += 1;
            let text = match *req {
                Request::Register { port, wait, .. } => {
                    format!(
                        "REGISTER {}{}",
                        lossy(port),
                        if wait { " wait" } else { "" }
                    )
                }
                Request::Unregister { port } => format!("UNREGISTER {}", lossy(port)),
                Request::Reclaim { port, token, .. } => format!("RECLAIM {} {token}", lossy(port)),
                Request::Watch { name, .. } => format!("WATCH {}", lossy(name)),
                Request::Ping => "PING".into(),
                ref other => format!("{other:?}"),
            };
            self.sent.push((self.next_id, text));
            self.next_id
        }
    }

    impl Tape {
        /// Requests sent since the last call.
        fn take(&mut self) -> Vec<String> {
            std::mem::take(&mut self.sent)
                .into_iter()
                .map(|(_, t)| t)
                .collect()
        }
        fn last_id(&self) -> u32 {
            self.next_id
        }
    }

    fn lossy(b: &[u8]) -> String {
        String::from_utf8_lossy(b).into_owned()
    }

    const LIMITS: ServerLimits = ServerLimits {
        frame_bytes_max: 1 << 20,
        commands_per_frame_max: 4_096,
        port_name_bytes_max: 256,
        value_bytes_max: 1_024,
        payload_bytes_max: 65_536,
        ports_per_session_max: 100_000,
        watches_per_session_max: 1_000,
        queue_len_max: 1_000,
        list_limit_max: 1_000,
        lease_ms_min: 100,
        lease_ms_max: 60_000,
    };

    fn hello_ok(epoch: u64, recovery_ms: u32) -> HelloOk<'static> {
        HelloOk {
            version: 1,
            features: 0,
            session: 7,
            secret: 8,
            epoch,
            lease_ms: 10_000,
            resumed: epoch > 1,
            limits: LIMITS,
            auth: &[],
            recovery_ms,
            channels_max: 0,
        }
    }

    type Done = std::sync::mpsc::Sender<Result<Answer>>;

    fn core(t0: Instant) -> SessionCore<Done> {
        let settings = Settings {
            lease_margin: 0.1,
            end_on_disconnect: false,
            keepalive: None,
        };
        SessionCore::new(settings, &hello_ok(1, 0), t0)
    }

    fn register(port: &str, wait: bool, until_granted: bool) -> (Request<'_>, Kind) {
        (
            Request::Register {
                port: port.as_bytes(),
                value: b"",
                wait,
            },
            Kind::Register {
                port: Name::new(port.as_bytes()),
                value: Bytes::new(),
                wait,
                until_granted,
            },
        )
    }

    /// Submits REGISTER of `port` and answers it REGISTERED `token`.
    fn own(s: &mut SessionCore<Done>, w: &mut Tape, port: &str, token: u64, now: Instant) {
        let (req, kind) = register(port, false, false);
        s.submit(&req, kind, None, now, w).unwrap();
        let id = w.last_id();
        s.handle_reply(id, &Reply::Registered { token }, now, w)
            .unwrap();
        w.take();
    }

    fn completions(s: &mut SessionCore<Done>) -> Effects<Done> {
        let mut fx = Effects::default();
        s.take_effects(&mut fx);
        fx
    }

    #[test]
    fn a_release_asked_for_between_masters_follows_its_ports_reclaim() {
        let t0 = Instant::now();
        let (mut s, mut w) = (core(t0), Tape::default());
        own(&mut s, &mut w, "a", 5, t0);
        own(&mut s, &mut w, "b", 6, t0);
        s.detached("gone");
        // The application lets go of b while no connection is up.
        s.submit(
            &Request::Unregister { port: b"b" },
            Kind::Unregister(Name::new(b"b")),
            None,
            t0,
            &mut w,
        )
        .unwrap();
        assert!(w.take().is_empty(), "nothing goes out without a connection");
        s.resumed(&hello_ok(2, 5_000), t0, t0, &mut w);
        let sent = w.take();
        let reclaim_b = sent.iter().position(|r| r == "RECLAIM b 6").unwrap();
        let unregister_b = sent.iter().position(|r| r == "UNREGISTER b").unwrap();
        assert!(reclaim_b < unregister_b, "{sent:?}");
        assert!(sent.contains(&"RECLAIM a 5".to_string()), "{sent:?}");
        assert_eq!(
            sent.iter().filter(|r| r.starts_with("RECLAIM b")).count(),
            1
        );
    }

    #[test]
    fn a_request_naming_a_port_beyond_the_reclaim_window_sends_its_reclaim_first() {
        let t0 = Instant::now();
        let (mut s, mut w) = (core(t0), Tape::default());
        let n = RECLAIM_IN_FLIGHT_MAX + 10;
        for i in 0..n {
            own(&mut s, &mut w, &format!("p{i}"), 100 + i as u64, t0);
        }
        s.detached("gone");
        s.resumed(&hello_ok(2, 5_000), t0, t0, &mut w);
        let first = w.take();
        assert_eq!(first.len(), RECLAIM_IN_FLIGHT_MAX, "a window of reclaims");
        // Some port whose reclaim has not gone out yet.
        let late = (0..n)
            .map(|i| format!("p{i}"))
            .find(|p| {
                !first
                    .iter()
                    .any(|r| r.starts_with(&format!("RECLAIM {p} ")))
            })
            .unwrap();
        s.submit(
            &Request::Unregister {
                port: late.as_bytes(),
            },
            Kind::Unregister(Name::new(late.as_bytes())),
            None,
            t0,
            &mut w,
        )
        .unwrap();
        let sent = w.take();
        assert_eq!(sent.len(), 2, "{sent:?}");
        assert!(sent[0].starts_with(&format!("RECLAIM {late} ")), "{sent:?}");
        assert_eq!(sent[1], format!("UNREGISTER {late}"));
    }

    #[test]
    fn places_in_queues_are_taken_again_on_a_new_master_and_waits_survive() {
        let t0 = Instant::now();
        let (mut s, mut w) = (core(t0), Tape::default());
        // A wait until granted, answered QUEUED.
        let (tx, rx) = std::sync::mpsc::channel();
        let (req, kind) = register("lock", true, true);
        s.submit(&req, kind, Some(tx), t0, &mut w).unwrap();
        let id = w.last_id();
        s.handle_reply(id, &Reply::Queued { position: 1 }, t0, &mut w)
            .unwrap();
        // A plain wait, its REGISTER cut short by the lost connection.
        let (req, kind) = register("other", true, true);
        let (tx2, rx2) = std::sync::mpsc::channel();
        s.submit(&req, kind, Some(tx2), t0, &mut w).unwrap();
        w.take();
        s.detached("gone");
        for fx in completions(&mut s).done {
            let _ = fx.0.send(fx.1);
        }
        assert!(
            rx.try_recv().is_err() && rx2.try_recv().is_err(),
            "still waiting"
        );
        s.resumed(&hello_ok(2, 5_000), t0, t0, &mut w);
        let sent = w.take();
        assert!(sent.contains(&"REGISTER lock wait".to_string()), "{sent:?}");
        assert!(
            sent.contains(&"REGISTER other wait".to_string()),
            "{sent:?}"
        );
        // The new master grants it: the waiter has its token.
        s.handle_event(
            &WireEvent::Acquired {
                port: b"lock",
                token: 2 << 32 | 1,
            },
            t0,
        );
        for (d, r) in completions(&mut s).done {
            let _ = d.send(r);
        }
        assert!(matches!(rx.try_recv(), Ok(Ok(Answer::Registered(t))) if t == 2 << 32 | 1));
        assert!(s.owns(b"lock", 2 << 32 | 1));
    }

    #[test]
    fn a_port_being_let_go_when_the_connection_drops_is_not_reclaimed() {
        let t0 = Instant::now();
        let (mut s, mut w) = (core(t0), Tape::default());
        own(&mut s, &mut w, "kept", 1, t0);
        own(&mut s, &mut w, "going", 2, t0);
        let (tx, rx) = std::sync::mpsc::channel();
        s.submit(
            &Request::Unregister { port: b"going" },
            Kind::Unregister(Name::new(b"going")),
            Some(tx),
            t0,
            &mut w,
        )
        .unwrap();
        w.take();
        s.detached("gone");
        s.resumed(&hello_ok(2, 5_000), t0, t0, &mut w);
        // On a new master: not reclaimed, and nothing to release there; the release's
        // outcome is unknown.
        assert_eq!(w.take(), vec!["RECLAIM kept 1"]);
        assert_eq!(s.owned_ports(), vec![(Bytes::from_static(b"kept"), 1)]);
        for (d, r) in completions(&mut s).done {
            let _ = d.send(r);
        }
        assert!(matches!(rx.try_recv(), Ok(Err(Error::ConnectionLost))));
    }

    #[test]
    fn a_release_cut_short_goes_out_again_on_the_same_master() {
        let t0 = Instant::now();
        let (mut s, mut w) = (core(t0), Tape::default());
        own(&mut s, &mut w, "p", 4, t0);
        s.submit(
            &Request::Unregister { port: b"p" },
            Kind::Unregister(Name::new(b"p")),
            None,
            t0,
            &mut w,
        )
        .unwrap();
        w.take();
        s.detached("stalled");
        s.resumed(&hello_ok(1, 0), t0, t0, &mut w);
        assert_eq!(w.take(), vec!["UNREGISTER p"]);
        assert!(s.owned_ports().is_empty());
        // It had arrived after all: not_owner answers the release as done.
        let not_owner = Reply::error(ErrorCode::NotOwner, b"not yours");
        s.handle_reply(w.last_id(), &not_owner, t0, &mut w).unwrap();
        let fx = completions(&mut s);
        assert!(fx.done.is_empty() && !s.is_over());
    }

    #[test]
    fn a_grant_lost_with_the_connection_is_learned_on_the_same_master() {
        let t0 = Instant::now();
        let (mut s, mut w) = (core(t0), Tape::default());
        let (tx, rx) = std::sync::mpsc::channel();
        let (req, kind) = register("lock", true, true);
        s.submit(&req, kind, Some(tx), t0, &mut w).unwrap();
        let id = w.last_id();
        s.handle_reply(id, &Reply::Queued { position: 1 }, t0, &mut w)
            .unwrap();
        w.take();
        // The ACQUIRED went out on a connection that stalled and was dropped.
        s.detached("no answer in time");
        s.resumed(&hello_ok(1, 0), t0, t0, &mut w);
        assert_eq!(w.take(), vec!["REGISTER lock wait"]);
        // The master answers the owner its grant.
        let id = w.last_id();
        s.handle_reply(id, &Reply::Registered { token: 9 }, t0, &mut w)
            .unwrap();
        for (d, r) in completions(&mut s).done {
            let _ = d.send(r);
        }
        assert!(matches!(rx.try_recv(), Ok(Ok(Answer::Registered(9)))));
        assert!(s.owns(b"lock", 9));
    }

    #[test]
    fn a_queue_place_taken_again_is_retried_if_that_connection_drops_too() {
        let t0 = Instant::now();
        let (mut s, mut w) = (core(t0), Tape::default());
        let (req, kind) = register("lock", true, true);
        s.submit(&req, kind, None, t0, &mut w).unwrap();
        let id = w.last_id();
        s.handle_reply(id, &Reply::Queued { position: 2 }, t0, &mut w)
            .unwrap();
        s.detached("gone");
        s.resumed(&hello_ok(2, 5_000), t0, t0, &mut w);
        w.take();
        // Dropped again before the new master answered the re-queue.
        s.detached("gone again");
        s.resumed(&hello_ok(2, 5_000), t0, t0, &mut w);
        assert_eq!(w.take(), vec!["REGISTER lock wait"]);
    }

    #[test]
    fn a_wait_the_application_left_is_not_sent_again() {
        let t0 = Instant::now();
        let (mut s, mut w) = (core(t0), Tape::default());
        let (tx, rx) = std::sync::mpsc::channel();
        let (req, kind) = register("lock", true, true);
        s.submit(&req, kind, Some(tx), t0, &mut w).unwrap();
        // The application gives up before the REGISTER is answered.
        s.submit(
            &Request::Unregister { port: b"lock" },
            Kind::Unregister(Name::new(b"lock")),
            None,
            t0,
            &mut w,
        )
        .unwrap();
        w.take();
        s.detached("gone");
        for (d, r) in completions(&mut s).done {
            let _ = d.send(r);
        }
        assert!(matches!(rx.try_recv(), Ok(Err(_))), "the wait ended");
        s.resumed(&hello_ok(1, 0), t0, t0, &mut w);
        assert_eq!(w.take(), vec!["UNREGISTER lock"]);
    }

    #[test]
    fn a_port_not_reclaimed_before_the_window_can_close_is_lost() {
        let t0 = Instant::now();
        let (mut s, mut w) = (core(t0), Tape::default());
        own(&mut s, &mut w, "slow", 3, t0);
        s.detached("gone");
        s.resumed(&hello_ok(2, 1_000), t0, t0, &mut w);
        w.take();
        completions(&mut s);
        // 1 s less the 10% margin.
        let late = t0 + Duration::from_millis(900);
        assert_eq!(s.next_timeout(), Some(late));
        s.handle_timeout(late, &mut w);
        let fx = completions(&mut s);
        assert!(
            fx.events
                .iter()
                .any(|e| matches!(e, Event::PortLost { port, token: 3, .. } if port == "slow")),
            "{:?}",
            fx.events
        );
        assert!(s.owned_ports().is_empty());
        assert!(!s.is_over(), "the session itself goes on");
    }

    #[test]
    fn the_lease_view_runs_from_the_send_time_and_then_the_session_is_lost() {
        let t0 = Instant::now();
        let (mut s, mut w) = (core(t0), Tape::default());
        own(&mut s, &mut w, "p", 9, t0);
        let sent = t0 + Duration::from_secs(2);
        s.submit(&Request::Ping, Kind::Plain, None, sent, &mut w)
            .unwrap();
        // Answered much later: the view counts from when it was sent.
        s.handle_reply(
            w.last_id(),
            &Reply::Ok,
            sent + Duration::from_secs(5),
            &mut w,
        )
        .unwrap();
        assert_eq!(s.view_end(), sent + Duration::from_secs(9));
        // An answer saying the server has no such session proves nothing.
        s.submit(
            &Request::Ping,
            Kind::Plain,
            None,
            sent + Duration::from_secs(6),
            &mut w,
        )
        .unwrap();
        let no_session = Reply::error(ErrorCode::NoSession, b"");
        s.handle_reply(
            w.last_id(),
            &no_session,
            sent + Duration::from_secs(6),
            &mut w,
        )
        .unwrap();
        assert_eq!(s.view_end(), sent + Duration::from_secs(9));
        completions(&mut s);
        s.handle_timeout(s.view_end(), &mut w);
        let fx = completions(&mut s);
        assert!(fx.ended && s.is_over());
        assert!(fx
            .events
            .iter()
            .any(|e| matches!(e, Event::OwnershipLost { ports, .. } if ports == &[(Bytes::from_static(b"p"), 9)])));
    }

    #[test]
    fn a_release_after_a_quiet_spell_waits_for_the_server_to_answer_a_ping() {
        let t0 = Instant::now();
        let (mut s, mut w) = (core(t0), Tape::default());
        own(&mut s, &mut w, "p", 4, t0);
        own(&mut s, &mut w, "q", 5, t0);
        // Right after an answer: out at once.
        let unregister = |port: &'static str| {
            (
                Request::Unregister {
                    port: port.as_bytes(),
                },
                Kind::Unregister(Name::new(port.as_bytes())),
            )
        };
        let (r, k) = unregister("q");
        s.submit(&r, k, None, t0, &mut w).unwrap();
        assert_eq!(w.take(), vec!["UNREGISTER q"]);
        s.handle_reply(w.last_id(), &Reply::Ok, t0, &mut w).unwrap();
        // After a second of quiet: a PING first, and the release (and what follows
        // it) waits for its answer.
        let later = t0 + Duration::from_secs(1);
        let (r, k) = unregister("p");
        s.submit(&r, k, None, later, &mut w).unwrap();
        let (req, kind) = register("r", false, false);
        s.submit(&req, kind, None, later, &mut w).unwrap();
        assert_eq!(w.take(), vec!["PING"]);
        let ping = w.last_id();
        s.handle_reply(ping, &Reply::Ok, later, &mut w).unwrap();
        assert_eq!(w.take(), vec!["UNREGISTER p", "REGISTER r"]);

        // The same, but the server never answers the PING: the port is still ours,
        // reclaimed and released on the new master.
        let (mut s, mut w) = (core(t0), Tape::default());
        own(&mut s, &mut w, "p", 4, t0);
        let (r, k) = unregister("p");
        s.submit(&r, k, None, later, &mut w).unwrap();
        assert_eq!(w.take(), vec!["PING"]);
        s.detached("silent");
        s.resumed(&hello_ok(2, 5_000), later, later, &mut w);
        assert_eq!(w.take(), vec!["RECLAIM p 4", "UNREGISTER p"]);
    }

    #[test]
    fn replies_out_of_request_order_are_refused() {
        let t0 = Instant::now();
        let (mut s, mut w) = (core(t0), Tape::default());
        s.submit(&Request::Ping, Kind::Plain, None, t0, &mut w)
            .unwrap();
        s.submit(&Request::Ping, Kind::Plain, None, t0, &mut w)
            .unwrap();
        let second = w.last_id();
        assert!(s.handle_reply(second, &Reply::Ok, t0, &mut w).is_err());
    }
}
