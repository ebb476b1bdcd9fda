//! The state machine. See the crate docs for the driving contract. This file holds
//! the types, the dispatch of requests (`Core::handle`) and time; by concern:
//! `sessions`, `ports` (ownership and queues), `recovery`, `watches`, `relay`
//! (SEND, BROADCAST) and `listing` (LIST).

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::hash::Hasher;

use bytes::BytesMut;
use portswitch_proto::limits::{self, PROTOCOL_VERSION};
use portswitch_proto::msg::PageEntry;
use portswitch_proto::{ErrorCode, Event, FrameBuf, Hello, HelloOk, Reply, Request, ServerLimits};

use portswitch_auth::acl::{Access, Perm};

use crate::config::Config;
use crate::filter::{Derived, Filter, FilterCache, Record, Scope};
use crate::table::{PortTable, Waiter, NONE};

mod listing;
mod ports;
mod recovery;
mod relay;
mod sessions;
mod watches;

/// Identifies a connection to the core. Chosen by the driver; never reused while the
/// core may still hold it.
pub type ConnId = u64;

/// Where the core's effects go. The driver encodes them onto connections.
///
/// Effects for one connection must be delivered in the order they are emitted.
pub trait Outbox {
    /// A reply to request `id` on `conn`.
    fn reply(&mut self, conn: ConnId, id: u32, reply: &Reply<'_>);
    /// An event for `conn`.
    fn event(&mut self, conn: ConnId, event: &Event<'_>);
    /// Whole encoded frames for `conn` (events buffered while its session had no
    /// connection).
    fn frames(&mut self, conn: ConnId, frames: &[u8]);
    /// Close `conn` once what was emitted for it is written. The core has already
    /// forgotten the connection; the driver must not report its disconnect.
    fn close(&mut self, conn: ConnId);
    /// A request of `user` was refused for lack of `perm` on `name` (for the audit
    /// log). The error reply has been emitted already.
    fn denied(&mut self, _conn: ConnId, _user: &str, _perm: Perm, _name: &[u8]) {}
}

/// Counters and gauges of a core.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Stats {
    pub epoch: u64,
    pub sessions: u64,
    pub sessions_attached: u64,
    pub ports_owned: u64,
    pub port_entries: u64,
    pub waiters: u64,
    pub watches: u64,
    pub prefix_watches: u64,
    pub requests_total: u64,
    pub registers_total: u64,
    pub grants_total: u64,
    pub releases_total: u64,
    pub messages_relayed_total: u64,
    pub sessions_created_total: u64,
    pub sessions_expired_total: u64,
    pub sessions_resumed_total: u64,
    pub errors_total: u64,
    /// Heap bytes of the port table's own arrays (entries, index, free list).
    pub table_heap_bytes: u64,
    /// 1 while a recovery window is open.
    pub recovering: u64,
    /// Sessions of an earlier master adopted in a recovery window.
    pub sessions_adopted_total: u64,
    /// Ports taken back with RECLAIM.
    pub ports_reclaimed_total: u64,
    /// Prefix watches with a filter (WATCH_WHERE).
    pub watch_filters: u64,
    /// Filter evaluations that failed (an error or a budget exceeded on one port or
    /// event): that port is left out of its page, that event not delivered.
    pub filter_errors_total: u64,
}

#[derive(Debug)]
struct Session {
    id: u64,
    secret: u64,
    node: Box<[u8]>,
    lease_ms: u32,
    deadline_ms: u64,
    conn: Option<ConnId>,
    end_on_disconnect: bool,
    /// Slots of owned ports; `Entry::owner_pos` indexes this.
    ports: Vec<u32>,
    /// Slots of ports whose queue holds this session.
    waits: Vec<u32>,
    /// Slots of watched ports.
    watches: Vec<u32>,
    prefix_watches: u32,
    /// Events that arrived while detached.
    missed: Option<Box<Missed>>,
    /// Who the session authenticated as; `None` on a server without users.
    user: Option<Box<str>>,
    /// What it may do; `None` means everything (no authentication configured).
    access: Option<Box<Access>>,
    /// Ended, still releasing its ports a step at a time (see `Config::release_step_ports_max`).
    ending: bool,
    /// Resumed from an earlier master during this core's recovery window: may RECLAIM.
    adopted: bool,
}

/// A port as [`Core::lookup`] sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lookup {
    Owned {
        session: u64,
        token: u64,
    },
    Free,
    /// In a recovery window, nobody has reclaimed it yet.
    Unknown,
}

/// Who a session authenticated as, and what its roles let it do. The driver verifies
/// credentials; the core enforces the access on every request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    pub user: String,
    pub access: Access,
}

/// The permission a request needs, and on which name (a port, or a prefix).
/// [`also_required`] names a second one some requests need as well.
fn required<'r>(req: &Request<'r>) -> Option<(Perm, &'r [u8])> {
    Some(match *req {
        Request::Register { port, .. } | Request::Unregister { port } => (Perm::Register, port),
        Request::Query { port } => (Perm::Query, port),
        Request::Watch { name, .. } => (Perm::Watch, name),
        Request::WatchWhere { prefix, .. } => (Perm::Watch, prefix),
        Request::Send { port, .. } => (Perm::Send, port),
        // A broadcast to everyone needs the permission on the empty prefix.
        Request::Broadcast { prefix, .. } => (Perm::Broadcast, prefix.unwrap_or(&[])),
        Request::List { prefix, .. } | Request::ListWhere { prefix, .. } => (Perm::List, prefix),
        Request::Hello(_)
        | Request::Auth { .. }
        | Request::Admin { .. }
        | Request::Ping
        | Request::Bye
        | Request::Stats
        | Request::Unwatch { .. } => return None,
        Request::Reclaim { port, .. } => (Perm::Register, port),
    })
}

/// A second permission a request needs besides [`required`]'s: a filtered prefix
/// watch reads the ports' values (`value`, `text`, `json`), which its events never
/// carry, so it needs what reveals values under the prefix — `list`, as LIST_WHERE
/// does — besides `watch`. Otherwise a watch-only role could learn a value a bit at a
/// time from which events a filter lets through.
fn also_required<'r>(req: &Request<'r>) -> Option<(Perm, &'r [u8])> {
    match *req {
        Request::WatchWhere { prefix, .. } => Some((Perm::List, prefix)),
        _ => None,
    }
}

#[derive(Debug)]
struct Missed {
    frames: FrameBuf,
    overflowed: bool,
}

#[derive(Debug)]
struct PrefixWatch {
    prefix: Box<[u8]>,
    session: u32,
    /// Only events this selects are delivered (WATCH_WHERE).
    filter: Option<std::sync::Arc<Filter>>,
}

/// Why a session ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum End {
    Bye,
    Expired,
    Disconnected,
    /// Its user was deleted.
    UserRemoved,
}

/// Per-frame context: the connection and its session, looked up once per frame.
#[derive(Debug, Clone, Copy)]
pub struct Batch {
    conn: ConnId,
    session: u32,
    now_ms: u64,
}

/// The port switch state machine of one master.
#[derive(Debug)]
pub struct Core {
    cfg: Config,
    epoch: u64,
    seq: u32,
    sessions: slab::Slab<Session>,
    /// Public session id → slot. Ids are unpredictable and unique across the group's
    /// epochs, so a session keeps its id when a new master adopts it.
    session_ids: hashbrown::HashMap<u64, u32, foldhash::fast::RandomState>,
    session_seq: u64,
    id_keys: (u64, u64),
    conn_sessions: hashbrown::HashMap<ConnId, u32, foldhash::fast::RandomState>,
    ports: PortTable,
    prefix_watches: Vec<PrefixWatch>,
    /// How many of `prefix_watches` have a filter: while 0, grants and releases build
    /// no filter records at all.
    watch_filters: u32,
    /// Filters compiled lately, by source (LIST_WHERE, WATCH_WHERE).
    filter_cache: FilterCache,
    /// Filter evaluations the LIST_WHEREs of the current batch may still make
    /// (`Config::filter_evals_per_batch_max`, renewed by [`Core::begin_batch`]).
    filter_evals_left: u32,
    expiry: BinaryHeap<Reverse<(u64, u64)>>,
    /// Ended sessions still releasing ports, oldest first.
    ending: std::collections::VecDeque<u32>,
    secret_keys: (u64, u64),
    /// While `Some`: the recovery window of a new master closes at this time.
    recovery_until: Option<u64>,
    /// Ports that got a waiter while unowned during the recovery window: granted to
    /// their first waiter when it closes.
    recovery_waits: Vec<u32>,
    /// Names known during the recovery window although free: reclaimed by their owner
    /// and released since. Nobody else can hold a lease view on them (only one
    /// session held a port when the earlier master stopped, and it gave this one
    /// back), so they are granted, reported free and queued for as usual.
    settled: hashbrown::HashSet<Box<[u8]>, foldhash::fast::RandomState>,
    /// How many live sessions hold each lease length (for the lease ceiling).
    leases: std::collections::BTreeMap<u32, u32>,
    now_ms: u64,
    stats: Stats,
    scratch: BytesMut,
}

impl Core {
    /// A core for `epoch` (strictly greater than any earlier epoch of this group; grants
    /// carry it in their tokens). `seed` keys the port hash and session ids (`seed[0]`)
    /// and session secrets (`seed[1]`, `seed[2]`); all must be unpredictable to clients.
    /// The secret keys are the group's: a later master with the same keys can verify
    /// and adopt this master's sessions in its recovery window.
    pub fn new(cfg: Config, epoch: u64, seed: [u64; 3]) -> Core {
        cfg.validate()
            .expect("core config must be validated by the caller");
        assert!(
            epoch < (1 << 32) - 1,
            "epoch {epoch} leaves no room in tokens"
        );
        let filter_evals = cfg.filter_evals_per_batch_max;
        Core {
            cfg,
            epoch,
            seq: 0,
            sessions: slab::Slab::new(),
            session_ids: Default::default(),
            session_seq: 0,
            id_keys: (
                seed[0] ^ 0x6964_5f6b_6579_5f30,
                seed[0].rotate_left(17) ^ epoch,
            ),
            conn_sessions: Default::default(),
            ports: PortTable::new(seed[0]),
            prefix_watches: Vec::new(),
            watch_filters: 0,
            filter_cache: FilterCache::default(),
            filter_evals_left: filter_evals,
            expiry: BinaryHeap::new(),
            ending: Default::default(),
            secret_keys: (seed[1], seed[2]),
            recovery_until: None,
            recovery_waits: Vec::new(),
            settled: Default::default(),
            leases: Default::default(),
            now_ms: 0,
            stats: Stats::default(),
            scratch: BytesMut::new(),
        }
    }

    pub fn config(&self) -> &Config {
        &self.cfg
    }

    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// What this core knows of the port `name` now, without a session: for drivers'
    /// diagnostics and for simulations checking the core from outside.
    pub fn lookup(&self, name: &[u8]) -> Lookup {
        match self
            .ports
            .find(name)
            .filter(|&p| self.ports.get(p).owner != NONE)
        {
            Some(port) => {
                let e = self.ports.get(port);
                Lookup::Owned {
                    session: self.sessions[e.owner as usize].id,
                    token: e.token,
                }
            }
            None if self.unknown(name) => Lookup::Unknown,
            None => Lookup::Free,
        }
    }

    /// The sessions waiting in the queue of the port `name`, first first (for
    /// diagnostics and simulations, like [`Core::lookup`]).
    pub fn waiting(&self, name: &[u8]) -> Vec<u64> {
        let Some(port) = self.ports.find(name) else {
            return Vec::new();
        };
        self.ports.extra(port).map_or(Vec::new(), |x| {
            x.queue
                .iter()
                .map(|w| self.sessions[w.session as usize].id)
                .collect()
        })
    }

    /// The limits announced to clients.
    pub fn limits(&self) -> ServerLimits {
        let c = &self.cfg;
        ServerLimits {
            frame_bytes_max: c.frame_bytes_max,
            commands_per_frame_max: c.commands_per_frame_max,
            port_name_bytes_max: c.port_name_bytes_max,
            value_bytes_max: c.value_bytes_max,
            payload_bytes_max: c.payload_bytes_max,
            ports_per_session_max: c.ports_per_session_max,
            watches_per_session_max: c.watches_per_session_max,
            queue_len_max: c.queue_len_max,
            list_limit_max: c.list_limit_max,
            lease_ms_min: c.lease_ms_min,
            lease_ms_max: c.lease_ms_max,
        }
    }

    pub fn stats(&self) -> Stats {
        let mut s = self.stats.clone();
        s.epoch = self.epoch;
        s.sessions = self.sessions.len() as u64;
        s.sessions_attached = self.conn_sessions.len() as u64;
        s.ports_owned = self.ports.owned() as u64;
        s.port_entries = self.ports.len() as u64;
        s.prefix_watches = self.prefix_watches.len() as u64;
        s.watch_filters = self.watch_filters as u64;
        s.table_heap_bytes = self.ports.heap_bytes() as u64;
        s.recovering = self.recovery_until.is_some() as u64;
        s
    }

    fn advance(&mut self, now_ms: u64) {
        assert!(
            now_ms >= self.now_ms,
            "time went backwards: {now_ms} < {}",
            self.now_ms
        );
        self.now_ms = now_ms;
    }

    /// The earliest time at which [`Core::handle_timeout`] has work, if any.
    pub fn next_deadline(&self) -> Option<u64> {
        if !self.ending.is_empty() {
            // Ended sessions still have ports to release: due now.
            return Some(self.now_ms);
        }
        let expiry = self.expiry.peek().map(|Reverse((t, _))| *t);
        match (expiry, self.recovery_until) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Starts processing one frame from `conn`. Any frame renews the session's lease.
    /// It also renews the budget of filter evaluations (`filter_evals_per_batch_max`)
    /// that the frame's LIST_WHEREs share; a driver that handles more than one frame,
    /// or sessions of several channels, in one go under its lock starts the others
    /// with [`Core::continue_batch`] so that they share it too.
    pub fn begin_batch(&mut self, conn: ConnId, now_ms: u64) -> Batch {
        self.filter_evals_left = self.cfg.filter_evals_per_batch_max;
        self.continue_batch(conn, now_ms)
    }

    /// Like [`Core::begin_batch`], but what is left of the current batch's budget of
    /// filter evaluations carries over: for the next frame, or the next channel's
    /// session, handled in the same go.
    pub fn continue_batch(&mut self, conn: ConnId, now_ms: u64) -> Batch {
        self.advance(now_ms);
        let session = match self.conn_sessions.get(&conn) {
            Some(&slot) => {
                let s = &mut self.sessions[slot as usize];
                s.deadline_ms = now_ms + s.lease_ms as u64;
                slot
            }
            None => NONE,
        };
        Batch {
            conn,
            session,
            now_ms,
        }
    }

    /// Handles one request of the batch, emitting its reply (and any events it causes).
    pub fn handle(&mut self, b: &mut Batch, id: u32, req: &Request<'_>, out: &mut impl Outbox) {
        self.stats.requests_total += 1;
        // Access control first: a denied request fails alone, the batch goes on.
        if b.session != NONE {
            let s = &self.sessions[b.session as usize];
            if let Some(access) = &s.access {
                for (perm, name) in required(req).into_iter().chain(also_required(req)) {
                    if !access.allows(perm, name) {
                        out.denied(b.conn, s.user.as_deref().unwrap_or(""), perm, name);
                        return self.error(
                            b.conn,
                            id,
                            ErrorCode::PermissionDenied,
                            "this session's roles do not grant that on that name",
                            out,
                        );
                    }
                }
            }
        }
        let result = match *req {
            Request::Hello(ref h) => self.hello(b, h, None, out),
            Request::Ping => Ok(Reply::Ok),
            Request::Stats => Err(Fail::Code(
                ErrorCode::InvalidArgument,
                "STATS is answered by the server",
            )),
            Request::Auth { .. } => Err(Fail::Code(
                ErrorCode::InvalidArgument,
                "AUTH without an authentication exchange in progress",
            )),
            Request::Admin { .. } => Err(Fail::Code(
                ErrorCode::InvalidArgument,
                "ADMIN is answered by the server",
            )),
            _ if b.session == NONE => Err(Fail::Code(ErrorCode::NoSession, "send HELLO first")),
            Request::Register { port, value, wait } => self.register(b, port, value, wait, out),
            Request::Reclaim { port, token, value } => self.reclaim(b, port, token, value, out),
            Request::Unregister { port } => self.unregister(b, port, out),
            Request::Query { port } => {
                self.query(b.conn, id, port, out);
                return;
            }
            Request::Watch { name, prefix } => self.watch(b, name, prefix),
            Request::WatchWhere { prefix, filter } => {
                self.watch_where(b, id, prefix, filter, out);
                return;
            }
            Request::Unwatch { name, prefix } => self.unwatch(b, name, prefix),
            Request::Send { port, payload } => self.send(b, port, payload, out),
            Request::Broadcast { prefix, payload } => self.broadcast(b, prefix, payload, out),
            Request::List {
                prefix,
                cursor,
                limit,
            } => {
                self.list(b.conn, id, prefix, cursor, limit, None, out);
                return;
            }
            Request::ListWhere {
                prefix,
                cursor,
                limit,
                filter,
            } => {
                self.list(b.conn, id, prefix, cursor, limit, Some(filter), out);
                return;
            }
            Request::Bye => {
                let slot = b.session;
                self.end_session(slot, End::Bye, out);
                b.session = NONE;
                Ok(Reply::Ok)
            }
        };
        match result {
            Ok(Reply::HelloOk(h)) => {
                out.reply(b.conn, id, &Reply::HelloOk(h));
                // Events buffered while detached follow the HELLO_OK of a resume.
                self.flush_missed(b.session, b.conn, out);
            }
            Ok(reply) => out.reply(b.conn, id, &reply),
            Err(Fail::Code(code, msg)) => self.error(b.conn, id, code, msg, out),
            Err(Fail::Taken { port, owner }) => {
                let o = &self.sessions[owner as usize];
                let token = self.ports.get(port).token;
                out.reply(
                    b.conn,
                    id,
                    &Reply::Taken {
                        session: o.id,
                        token,
                        node: &o.node,
                    },
                );
            }
        }
    }

    fn error(&mut self, conn: ConnId, id: u32, code: ErrorCode, msg: &str, out: &mut impl Outbox) {
        self.stats.errors_total += 1;
        out.reply(conn, id, &Reply::error(code, msg.as_bytes()));
    }

    /// The connection closed (or the driver gave up on it). A session that asked to end
    /// on disconnect ends now; others stay for their lease, waiting to be resumed.
    pub fn handle_disconnect(&mut self, conn: ConnId, now_ms: u64, out: &mut impl Outbox) {
        self.advance(now_ms);
        let Some(slot) = self.conn_sessions.remove(&conn) else {
            return;
        };
        let s = &mut self.sessions[slot as usize];
        s.conn = None;
        if s.end_on_disconnect {
            self.end_session(slot, End::Disconnected, out);
        }
    }

    /// Expires every session whose lease has run out by `now_ms`.
    pub fn handle_timeout(&mut self, now_ms: u64, out: &mut impl Outbox) {
        self.advance(now_ms);
        while let Some(&Reverse((at, id))) = self.expiry.peek() {
            if at > now_ms {
                break;
            }
            self.expiry.pop();
            let Some(&slot) = self.session_ids.get(&id) else {
                continue; // ended earlier
            };
            let s = &self.sessions[slot as usize];
            if s.ending {
                continue;
            }
            if s.deadline_ms > now_ms {
                // Renewed since it was queued: look again at its current deadline.
                self.expiry.push(Reverse((s.deadline_ms, id)));
                continue;
            }
            self.stats.sessions_expired_total += 1;
            self.end_session(slot, End::Expired, out);
        }
        if self.recovery_until.is_some_and(|until| until <= now_ms) {
            self.close_recovery(out);
        }
        self.continue_ending(out);
    }

    // ----- sessions -------------------------------------------------------------

    // ----- ports ----------------------------------------------------------------
}

/// How a request failed: a plain error, or TAKEN (whose reply borrows the owner's
/// node name, so it is built where the core can lend it).
#[derive(Debug)]
enum Fail {
    Code(ErrorCode, &'static str),
    Taken { port: u32, owner: u32 },
}

const PORTS_FULL: Fail = Fail::Code(
    ErrorCode::PortsPerSessionMax,
    "session owns and waits for ports_per_session_max ports",
);
const RECOVERING: Fail = Fail::Code(
    ErrorCode::Recovering,
    "a new master is recovering: nobody has reclaimed this port yet; retry when the window closes, or REGISTER with WAIT",
);
const WATCHES_FULL: Fail = Fail::Code(
    ErrorCode::WatchesPerSessionMax,
    "session watches watches_per_session_max ports",
);

impl From<(ErrorCode, &'static str)> for Fail {
    fn from((code, msg): (ErrorCode, &'static str)) -> Fail {
        Fail::Code(code, msg)
    }
}
