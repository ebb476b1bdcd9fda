//! The state machine. See the crate docs for the driving contract.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::hash::Hasher;

use bytes::BytesMut;
use portswitch_proto::limits::{self, PROTOCOL_VERSION};
use portswitch_proto::msg::PageEntry;
use portswitch_proto::{ErrorCode, Event, FrameBuf, Hello, HelloOk, Reply, Request, ServerLimits};

use portswitch_auth::acl::{Access, Perm};

use crate::config::Config;
use crate::table::{PortTable, Waiter, NONE};

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
fn required<'r>(req: &Request<'r>) -> Option<(Perm, &'r [u8])> {
    Some(match *req {
        Request::Register { port, .. } | Request::Unregister { port } => (Perm::Register, port),
        Request::Query { port } => (Perm::Query, port),
        Request::Watch { name, .. } => (Perm::Watch, name),
        Request::Send { port, .. } => (Perm::Send, port),
        // A broadcast to everyone needs the permission on the empty prefix.
        Request::Broadcast { prefix, .. } => (Perm::Broadcast, prefix.unwrap_or(&[])),
        Request::List { prefix, .. } => (Perm::List, prefix),
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

#[derive(Debug)]
struct Missed {
    frames: FrameBuf,
    overflowed: bool,
}

#[derive(Debug)]
struct PrefixWatch {
    prefix: Box<[u8]>,
    session: u32,
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

    /// Opens a **recovery window** of `window_ms` from `now_ms` on a core that has just
    /// taken over from an earlier master (docs/PROTOCOL.md, "Failover and the recovery
    /// window"). Until it closes: a HELLO resuming a session of the earlier master
    /// (right id and secret under the group's keys) is adopted with its id; adopted sessions RECLAIM their ports with their tokens; a
    /// port nobody has reclaimed is unknown — REGISTER fails with `recovering` (or with
    /// WAIT queues for it), QUERY and SEND fail with `recovering`. When it closes,
    /// unreclaimed ports are free, their first waiters are granted them, and every
    /// session gets RECOVERED. The window must be at least the longest lease the
    /// earlier master could have granted, plus the clock-drift margin, counted from
    /// when that master's own lease had certainly run out.
    pub fn start_recovery(&mut self, now_ms: u64, window_ms: u64) {
        self.advance(now_ms);
        assert!(
            self.sessions.is_empty() && self.ports.is_empty(),
            "a recovery window opens on a fresh core"
        );
        self.recovery_until = Some(now_ms + window_ms);
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

    /// The longest lease any session of this core holds now (0 without sessions).
    /// A successor's recovery window must cover it; a master lowers its recorded
    /// lease ceiling only once this has stayed below it for a whole ceiling.
    pub fn lease_ms_longest(&self) -> u32 {
        self.leases.keys().next_back().copied().unwrap_or(0)
    }

    fn lease_held(&mut self, lease_ms: u32) {
        *self.leases.entry(lease_ms).or_default() += 1;
    }

    fn lease_dropped(&mut self, lease_ms: u32) {
        let n = self
            .leases
            .get_mut(&lease_ms)
            .expect("every session's lease is counted");
        *n -= 1;
        if *n == 0 {
            self.leases.remove(&lease_ms);
        }
    }

    /// Whether `name` is unknown to this master yet: its recovery window is open and
    /// nobody has reclaimed the port (or released it after reclaiming it).
    fn unknown(&self, name: &[u8]) -> bool {
        self.recovery_until.is_some() && !self.settled.contains(name)
    }

    /// Milliseconds left of the recovery window (`None` when not recovering).
    pub fn recovery_left_ms(&self) -> Option<u64> {
        self.recovery_until
            .map(|until| until.saturating_sub(self.now_ms))
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

    /// The user and access of the session on `conn`, if it has a session (`None`s on
    /// a server without authentication).
    pub fn session_user(&self, conn: ConnId) -> Option<(Option<&str>, Option<&Access>)> {
        let slot = *self.conn_sessions.get(&conn)?;
        let s = &self.sessions[slot as usize];
        Some((s.user.as_deref(), s.access.as_deref()))
    }

    /// Ends every session of `user` (the user was deleted): each connection gets
    /// GOAWAY `user_removed`, and the sessions' ports are released as on any end.
    /// Returns how many sessions ended.
    pub fn end_sessions_of(&mut self, user: &str, now_ms: u64, out: &mut impl Outbox) -> usize {
        self.advance(now_ms);
        let slots: Vec<u32> = self
            .sessions
            .iter()
            .filter(|(_, s)| s.user.as_deref() == Some(user) && !s.ending)
            .map(|(k, _)| k as u32)
            .collect();
        for &slot in &slots {
            self.end_session(slot, End::UserRemoved, out);
        }
        slots.len()
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
    pub fn begin_batch(&mut self, conn: ConnId, now_ms: u64) -> Batch {
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
                if let Some((perm, name)) = required(req) {
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
            Request::Unwatch { name, prefix } => self.unwatch(b, name, prefix),
            Request::Send { port, payload } => self.send(b, port, payload, out),
            Request::Broadcast { prefix, payload } => self.broadcast(b, prefix, payload, out),
            Request::List {
                prefix,
                cursor,
                limit,
            } => {
                self.list(b.conn, id, prefix, cursor, limit, out);
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
        out.reply(
            conn,
            id,
            &Reply::Error {
                code,
                message: msg.as_bytes(),
            },
        );
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

    /// The recovery window is over: whatever nobody reclaimed is free. Ports that got
    /// waiters meanwhile go to their first waiter; every session hears RECOVERED.
    fn close_recovery(&mut self, out: &mut impl Outbox) {
        self.recovery_until = None;
        self.settled = Default::default();
        let mut waits = std::mem::take(&mut self.recovery_waits);
        waits.sort_unstable();
        waits.dedup();
        for port in waits {
            // The slot may have been emptied (everyone left the queue) and reused; a
            // port without an owner but with waiters only arises in the window, so any
            // such slot is one to grant.
            if !self.ports.is_live(port) || self.ports.get(port).owner != NONE {
                continue;
            }
            if self.ports.extra(port).is_some_and(|x| !x.queue.is_empty()) {
                let name: Box<[u8]> = self.ports.get(port).name().into();
                self.grant_first_waiter(port, &name, out);
            }
            self.ports.remove_if_unused(port);
        }
        let slots: Vec<u32> = self.sessions.iter().map(|(k, _)| k as u32).collect();
        for slot in slots {
            self.deliver(slot, &Event::Recovered, out);
        }
    }

    /// Releases up to `release_step_ports_max` ports of ended sessions, and forgets the
    /// sessions that have none left.
    fn continue_ending(&mut self, out: &mut impl Outbox) {
        let mut budget = self.cfg.release_step_ports_max;
        while let Some(&slot) = self.ending.front() {
            while budget > 0 {
                let Some(&port) = self.sessions[slot as usize].ports.last() else {
                    break;
                };
                self.release(port, out);
                budget -= 1;
            }
            if !self.sessions[slot as usize].ports.is_empty() {
                return;
            }
            self.ending.pop_front();
            self.forget_session(slot);
        }
    }

    fn forget_session(&mut self, slot: u32) {
        let s = self.sessions.remove(slot as usize);
        self.session_ids.remove(&s.id);
        self.lease_dropped(s.lease_ms);
    }

    // ----- sessions -------------------------------------------------------------

    /// A session's resume secret: keyed by the group's secret keys, bound to the id
    /// and the user, so any master of the group can verify it and only that user can
    /// present it.
    fn secret_for(&self, id: u64, user: Option<&str>) -> u64 {
        let mut h =
            siphasher::sip::SipHasher24::new_with_keys(self.secret_keys.0, self.secret_keys.1);
        h.write_u64(id);
        match user {
            Some(u) => {
                h.write_u8(1);
                h.write(u.as_bytes());
            }
            None => h.write_u8(0),
        }
        h.finish()
    }

    /// A fresh session id: unpredictable, non-zero, unique among this core's sessions
    /// (and, being keyed by a per-master random key and the epoch, practically unique
    /// across the group's masters).
    fn next_session_id(&mut self) -> u64 {
        loop {
            self.session_seq += 1;
            let mut h = siphasher::sip::SipHasher24::new_with_keys(self.id_keys.0, self.id_keys.1);
            h.write_u64(self.epoch);
            h.write_u64(self.session_seq);
            let id = h.finish();
            if id != 0 && !self.session_ids.contains_key(&id) {
                return id;
            }
        }
    }

    /// Handles a HELLO whose credentials the driver has verified: the session (new or
    /// resumed) belongs to `ident.user` and is held to `ident.access`; HELLO_OK carries
    /// `auth_reply` (the SCRAM server-final-message).
    pub fn handle_authenticated_hello(
        &mut self,
        b: &mut Batch,
        id: u32,
        h: &Hello<'_>,
        ident: &Identity,
        auth_reply: &[u8],
        out: &mut impl Outbox,
    ) {
        self.stats.requests_total += 1;
        match self.hello(b, h, Some(ident), out) {
            Ok(Reply::HelloOk(ok)) => {
                out.reply(
                    b.conn,
                    id,
                    &Reply::HelloOk(HelloOk {
                        auth: auth_reply,
                        ..ok
                    }),
                );
                self.flush_missed(b.session, b.conn, out);
            }
            Err(Fail::Code(code, msg)) => self.error(b.conn, id, code, msg, out),
            other => unreachable!("hello returns HELLO_OK or an error, not {other:?}"),
        }
    }

    fn hello(
        &mut self,
        b: &mut Batch,
        h: &Hello<'_>,
        ident: Option<&Identity>,
        out: &mut impl Outbox,
    ) -> Result<Reply<'static>, Fail> {
        if b.session != NONE {
            return Err(Fail::Code(
                ErrorCode::SessionExists,
                "this connection already has a session",
            ));
        }
        if h.version_min > PROTOCOL_VERSION || h.version_max < PROTOCOL_VERSION {
            return Err(Fail::Code(
                ErrorCode::VersionUnsupported,
                "this server speaks protocol version 1",
            ));
        }
        if ident.is_none() && !h.credentials.is_empty() {
            return Err(Fail::Code(
                ErrorCode::AuthUnavailable,
                "this server has no authentication configured",
            ));
        }
        if h.lease_ms < self.cfg.lease_ms_min || h.lease_ms > self.cfg.lease_ms_max {
            return Err(Fail::Code(
                ErrorCode::LeaseOutOfRange,
                "lease_ms outside the server's range",
            ));
        }
        let limits = self.limits();
        let recovery_ms = self.recovery_left_ms().unwrap_or(0).min(u32::MAX as u64) as u32;
        if h.resume_session != 0 && !self.session_ids.contains_key(&h.resume_session) {
            // Not one of ours: in a recovery window, a session of an earlier master
            // whose secret verifies under the group's keys is adopted with its id.
            let user = ident.map(|i| i.user.as_str());
            let secret = self.secret_for(h.resume_session, user);
            if self.recovery_until.is_none() || !constant_time_eq(secret, h.resume_secret) {
                return Err(Fail::Code(
                    ErrorCode::ResumeFailed,
                    "no such session (expired, ended, or wrong secret)",
                ));
            }
            if self.sessions.len() >= self.cfg.sessions_max as usize {
                return Err(Fail::Code(
                    ErrorCode::SessionsMax,
                    "the server holds the most sessions it may",
                ));
            }
            let slot = self.insert_session(h.resume_session, secret, b, h, ident);
            self.sessions[slot as usize].adopted = true;
            self.stats.sessions_adopted_total += 1;
            return Ok(Reply::HelloOk(HelloOk {
                version: PROTOCOL_VERSION,
                features: 0,
                session: h.resume_session,
                secret,
                epoch: self.epoch,
                lease_ms: h.lease_ms,
                resumed: true,
                limits,
                auth: &[],
                recovery_ms,
                channels_max: self.cfg.channels_per_connection_max,
            }));
        }
        if h.resume_session != 0 {
            let slot = self.session_ids[&h.resume_session];
            // Only the user who owns a session may resume it.
            let user = ident.map(|i| i.user.as_str());
            let ok = self.sessions.get(slot as usize).is_some_and(|s| {
                !s.ending
                    && constant_time_eq(s.secret, h.resume_secret)
                    && s.user.as_deref() == user
            });
            if !ok {
                return Err(Fail::Code(
                    ErrorCode::ResumeFailed,
                    "no such session (expired, ended, or wrong secret)",
                ));
            }
            // A resume takes the session over from a connection it may still have.
            let old = self.sessions[slot as usize].conn.take();
            if let Some(old) = old {
                self.conn_sessions.remove(&old);
                out.event(
                    old,
                    &Event::GoAway {
                        code: ErrorCode::SessionExists,
                        message: b"session resumed on another connection",
                    },
                );
                out.close(old);
            }
            let old_lease = self.sessions[slot as usize].lease_ms;
            if old_lease != h.lease_ms {
                self.lease_dropped(old_lease);
                self.lease_held(h.lease_ms);
            }
            let s = &mut self.sessions[slot as usize];
            s.conn = Some(b.conn);
            s.lease_ms = h.lease_ms;
            s.end_on_disconnect = h.end_on_disconnect;
            s.deadline_ms = b.now_ms + h.lease_ms as u64;
            self.conn_sessions.insert(b.conn, slot);
            b.session = slot;
            self.stats.sessions_resumed_total += 1;
            return Ok(Reply::HelloOk(HelloOk {
                version: PROTOCOL_VERSION,
                features: 0,
                session: s.id,
                secret: s.secret,
                epoch: self.epoch,
                lease_ms: h.lease_ms,
                resumed: true,
                limits,
                auth: &[],
                recovery_ms,
                channels_max: self.cfg.channels_per_connection_max,
            }));
        }
        if self.sessions.len() >= self.cfg.sessions_max as usize {
            return Err(Fail::Code(
                ErrorCode::SessionsMax,
                "the server holds the most sessions it may",
            ));
        }
        let id = self.next_session_id();
        let secret = self.secret_for(id, ident.map(|i| i.user.as_str()));
        self.insert_session(id, secret, b, h, ident);
        self.stats.sessions_created_total += 1;
        Ok(Reply::HelloOk(HelloOk {
            version: PROTOCOL_VERSION,
            features: 0,
            session: id,
            secret,
            epoch: self.epoch,
            lease_ms: h.lease_ms,
            resumed: false,
            limits,
            auth: &[],
            recovery_ms,
            channels_max: self.cfg.channels_per_connection_max,
        }))
    }

    /// Creates a session attached to the batch's connection.
    fn insert_session(
        &mut self,
        id: u64,
        secret: u64,
        b: &mut Batch,
        h: &Hello<'_>,
        ident: Option<&Identity>,
    ) -> u32 {
        let entry = self.sessions.vacant_entry();
        let slot = entry.key() as u32;
        let deadline_ms = b.now_ms + h.lease_ms as u64;
        entry.insert(Session {
            id,
            secret,
            node: h.node_name.into(),
            lease_ms: h.lease_ms,
            deadline_ms,
            conn: Some(b.conn),
            end_on_disconnect: h.end_on_disconnect,
            ports: Vec::new(),
            waits: Vec::new(),
            watches: Vec::new(),
            prefix_watches: 0,
            missed: None,
            user: ident.map(|i| i.user.clone().into_boxed_str()),
            access: ident.map(|i| Box::new(i.access.clone())),
            ending: false,
            adopted: false,
        });
        self.session_ids.insert(id, slot);
        self.lease_held(h.lease_ms);
        self.expiry.push(Reverse((deadline_ms, id)));
        self.conn_sessions.insert(b.conn, slot);
        b.session = slot;
        slot
    }

    fn flush_missed(&mut self, slot: u32, conn: ConnId, out: &mut impl Outbox) {
        if slot == NONE {
            return;
        }
        if let Some(mut missed) = self.sessions[slot as usize].missed.take() {
            if missed.overflowed {
                out.event(conn, &Event::Resync);
            } else {
                let mut bytes = BytesMut::new();
                missed.frames.take_into(&mut bytes);
                out.frames(conn, &bytes);
            }
        }
    }

    fn end_session(&mut self, slot: u32, why: End, out: &mut impl Outbox) {
        // Leave queues and drop watches first, so releasing this session's ports below
        // neither promotes it nor notifies it.
        let waits = std::mem::take(&mut self.sessions[slot as usize].waits);
        for port in waits {
            if let Some(x) = self.ports.extra(port) {
                if x.queue.iter().any(|w| w.session == slot) {
                    self.ports
                        .extra_mut(port)
                        .queue
                        .retain(|w| w.session != slot);
                    self.stats.waiters -= 1;
                }
            }
            self.ports.remove_if_unused(port);
        }
        let watches = std::mem::take(&mut self.sessions[slot as usize].watches);
        for port in watches {
            self.ports.extra_mut(port).watchers.retain(|&w| w != slot);
            self.stats.watches -= 1;
            self.ports.remove_if_unused(port);
        }
        if self.sessions[slot as usize].prefix_watches > 0 {
            let before = self.prefix_watches.len();
            self.prefix_watches.retain(|p| p.session != slot);
            self.stats.watches -= (before - self.prefix_watches.len()) as u64;
        }
        let s = &mut self.sessions[slot as usize];
        s.missed = None;
        if let Some(conn) = s.conn.take() {
            self.conn_sessions.remove(&conn);
            let goaway = match why {
                End::Expired => Some((ErrorCode::SessionExpired, &b"session lease expired"[..])),
                End::UserRemoved => Some((
                    ErrorCode::UserRemoved,
                    &b"the session's user was deleted"[..],
                )),
                End::Bye | End::Disconnected => None,
            };
            if let Some((code, message)) = goaway {
                out.event(conn, &Event::GoAway { code, message });
                out.close(conn);
            }
        }
        // Release the ports now, or — for a session holding more than one step's worth
        // — a step at a time from `handle_timeout`, so that one session's end never
        // holds the server for long (781,250 ports took ~300 ms in one go). Until then
        // its remaining ports read as owned by it; nobody can use or resume it.
        if self.sessions[slot as usize].ports.len() <= self.cfg.release_step_ports_max as usize {
            while let Some(&port) = self.sessions[slot as usize].ports.last() {
                self.release(port, out);
            }
            self.forget_session(slot);
        } else {
            self.sessions[slot as usize].ending = true;
            self.ending.push_back(slot);
        }
    }

    /// Sends an event to a session: to its connection, or into its missed-events
    /// buffer while it has none.
    fn deliver(&mut self, slot: u32, event: &Event<'_>, out: &mut impl Outbox) {
        let limit = self.cfg.detached_event_bytes_max as usize;
        let frame_max = self.cfg.frame_bytes_max as usize;
        let commands_max = self.cfg.commands_per_frame_max as usize;
        let s = &mut self.sessions[slot as usize];
        if s.ending {
            return;
        }
        match s.conn {
            Some(conn) => out.event(conn, event),
            None => {
                let m = s.missed.get_or_insert_with(|| {
                    Box::new(Missed {
                        frames: FrameBuf::new(frame_max, commands_max),
                        overflowed: false,
                    })
                });
                if m.overflowed {
                    return;
                }
                if m.frames.len() + limits::MESSAGE_HEADER_BYTES + event.body_len() > limit {
                    m.overflowed = true;
                    m.frames.clear();
                } else {
                    m.frames.push_event(event);
                }
            }
        }
    }

    // ----- ports ----------------------------------------------------------------

    fn next_token(&mut self) -> u64 {
        if self.seq == u32::MAX {
            // 2^32 grants in one epoch: move to the next epoch so tokens keep rising.
            // (A cluster will take the next epoch from consensus instead.)
            self.epoch += 1;
            assert!(self.epoch < (1 << 32) - 1, "epoch space exhausted");
            self.seq = 0;
        }
        self.seq += 1;
        self.epoch << 32 | self.seq as u64
    }

    fn check_name(&self, name: &[u8]) -> Result<(), Fail> {
        if name.is_empty() {
            return Err(Fail::Code(ErrorCode::EmptyName, "port name is empty"));
        }
        if name.len() > self.cfg.port_name_bytes_max as usize {
            return Err(Fail::Code(
                ErrorCode::NameTooLong,
                "port name longer than port_name_bytes_max",
            ));
        }
        Ok(())
    }

    fn check_value(&self, value: &[u8]) -> Result<(), Fail> {
        if value.len() > self.cfg.value_bytes_max as usize {
            return Err(Fail::Code(
                ErrorCode::ValueTooLarge,
                "value larger than value_bytes_max",
            ));
        }
        Ok(())
    }

    /// Grants the free port at `port` to `session` with a new token, telling watchers.
    fn grant(&mut self, port: u32, session: u32, value: &[u8], out: &mut impl Outbox) -> u64 {
        let token = self.next_token();
        self.grant_with(port, session, value, token, out)
    }

    /// Grants the free port at `port` to `session` with `token`, telling watchers.
    fn grant_with(
        &mut self,
        port: u32,
        session: u32,
        value: &[u8],
        token: u64,
        out: &mut impl Outbox,
    ) -> u64 {
        let s = &mut self.sessions[session as usize];
        let pos = s.ports.len() as u32;
        s.ports.push(port);
        let (sid, node_len) = (s.id, s.node.len());
        self.ports.set_owner(port, session, pos, token, value);
        self.stats.grants_total += 1;
        let has_watchers = self
            .ports
            .extra(port)
            .is_some_and(|x| !x.watchers.is_empty());
        if has_watchers || !self.prefix_watches.is_empty() {
            let name: Box<[u8]> = self.ports.get(port).name().into();
            let node: Box<[u8]> = self.sessions[session as usize].node.clone();
            debug_assert_eq!(node.len(), node_len);
            let ev = Event::Claimed {
                port: &name,
                session: sid,
                token,
                node: &node,
            };
            self.notify_watchers(port, &name, &ev, out);
        }
        token
    }

    fn notify_watchers(&mut self, port: u32, name: &[u8], ev: &Event<'_>, out: &mut impl Outbox) {
        if let Some(x) = self.ports.extra(port) {
            if !x.watchers.is_empty() {
                let watchers = x.watchers.clone();
                for w in watchers {
                    self.deliver(w, ev, out);
                }
            }
        }
        if !self.prefix_watches.is_empty() {
            let targets: Vec<u32> = self
                .prefix_watches
                .iter()
                .filter(|p| name.starts_with(&p.prefix))
                .map(|p| p.session)
                .collect();
            for w in targets {
                self.deliver(w, ev, out);
            }
        }
    }

    /// Releases the owned port at `port`: tells watchers, then hands it to the first
    /// waiter (who gets ACQUIRED), or drops the entry if nothing refers to it.
    fn release(&mut self, port: u32, out: &mut impl Outbox) {
        let e = self.ports.get(port);
        let (owner, pos) = (e.owner, e.owner_pos);
        // Remove from the owner's list by swapping the last one into its place.
        let s = &mut self.sessions[owner as usize];
        let last = s.ports.pop().expect("owner lists the port");
        if last != port {
            s.ports[pos as usize] = last;
            self.ports.get_mut(last).owner_pos = pos;
        }
        let token = self.ports.clear_owner(port);
        self.stats.releases_total += 1;
        if self.recovery_until.is_some() {
            // Only a known port can have an owner in the window: once free it stays
            // known (its next waiter is granted it below, or anyone may register it).
            self.settled.insert(self.ports.get(port).name().into());
        }
        let has_extra = self.ports.extra(port).is_some();
        if has_extra || !self.prefix_watches.is_empty() {
            let name: Box<[u8]> = self.ports.get(port).name().into();
            self.notify_watchers(port, &name, &Event::Released { port: &name, token }, out);
            if self.ports.extra(port).is_some_and(|x| !x.queue.is_empty()) {
                self.grant_first_waiter(port, &name, out);
            }
        }
        self.ports.remove_if_unused(port);
    }

    /// Grants the free port at `port` (named `name`) to the first session in its
    /// queue, which gets ACQUIRED.
    fn grant_first_waiter(&mut self, port: u32, name: &[u8], out: &mut impl Outbox) {
        let w = self
            .ports
            .extra_mut(port)
            .queue
            .pop_front()
            .expect("the caller checked the queue");
        self.stats.waiters -= 1;
        let waits = &mut self.sessions[w.session as usize].waits;
        if let Some(i) = waits.iter().position(|&p| p == port) {
            waits.swap_remove(i);
        }
        let token = self.grant(port, w.session, &w.value, out);
        self.deliver(w.session, &Event::Acquired { port: name, token }, out);
    }

    fn register(
        &mut self,
        b: &Batch,
        name: &[u8],
        value: &[u8],
        wait: bool,
        out: &mut impl Outbox,
    ) -> Result<Reply<'static>, Fail> {
        self.stats.registers_total += 1;
        self.check_name(name)?;
        self.check_value(value)?;
        let me = b.session;
        let s = &self.sessions[me as usize];
        let held = s.ports.len() + s.waits.len();
        let recovering = self.unknown(name);
        let port = match self.ports.find(name) {
            Some(port) => port,
            None if recovering => {
                // Unknown until its owner reclaims it or the window closes.
                if !wait {
                    return Err(RECOVERING);
                }
                self.room_for_a_port()?;
                let port = self.ports.insert(name);
                let r = self.enqueue(me, port, value);
                match r {
                    Ok(_) => self.recovery_waits.push(port),
                    Err(_) => self.ports.remove_if_unused(port),
                }
                return r;
            }
            None => {
                if held >= self.cfg.ports_per_session_max as usize {
                    return Err(PORTS_FULL);
                }
                self.room_for_a_port()?;
                let port = self.ports.insert(name);
                let token = self.grant(port, me, value, out);
                return Ok(Reply::Registered { token });
            }
        };
        let owner = self.ports.get(port).owner;
        if owner == me {
            // Registering a port you own refreshes its value and keeps the grant.
            self.ports.set_value(port, value);
            return Ok(Reply::Registered {
                token: self.ports.get(port).token,
            });
        }
        if owner == NONE && recovering {
            if !wait {
                return Err(RECOVERING);
            }
            let r = self.enqueue(me, port, value);
            if r.is_ok() {
                self.recovery_waits.push(port);
            }
            return r;
        }
        if owner == NONE {
            if held >= self.cfg.ports_per_session_max as usize {
                return Err(PORTS_FULL);
            }
            let token = self.grant(port, me, value, out);
            return Ok(Reply::Registered { token });
        }
        if !wait {
            return Err(Fail::Taken { port, owner });
        }
        self.enqueue(me, port, value)
    }

    /// Whether the table may take one more port (`ports_max`). A RECLAIM is not
    /// counted against it: it restores a port the earlier master held, within the
    /// same limits, and refusing it would take the port from its owner.
    fn room_for_a_port(&self) -> Result<(), Fail> {
        if self.ports.len() as u64 >= self.cfg.ports_max {
            return Err(Fail::Code(
                ErrorCode::PortsFull,
                "the server holds ports_max ports across all sessions",
            ));
        }
        Ok(())
    }

    /// Puts session `me` in the queue of `port` (or tells it its place if it is in
    /// it already).
    fn enqueue(&mut self, me: u32, port: u32, value: &[u8]) -> Result<Reply<'static>, Fail> {
        let s = &self.sessions[me as usize];
        let held = s.ports.len() + s.waits.len();
        if let Some(pos) = self
            .ports
            .extra(port)
            .and_then(|x| x.queue.iter().position(|w| w.session == me))
        {
            return Ok(Reply::Queued {
                position: pos as u32 + 1,
            });
        }
        if held >= self.cfg.ports_per_session_max as usize {
            return Err(PORTS_FULL);
        }
        let queue_max = self.cfg.queue_len_max as usize;
        let x = self.ports.extra_mut(port);
        if x.queue.len() >= queue_max {
            self.ports.shrink_extra(port);
            return Err(Fail::Code(
                ErrorCode::QueueFull,
                "the port's wait queue holds queue_len_max waiters",
            ));
        }
        let waiter = Waiter {
            session: me,
            value: value.into(),
        };
        // In a recovery window a session of the earlier master taking its place again
        // goes ahead of sessions that queued only since: FIFO as far as clients can
        // restore it (among themselves, re-queued sessions keep the order they came
        // back in).
        let sessions = &self.sessions;
        let at = if self.recovery_until.is_some() && sessions[me as usize].adopted {
            x.queue
                .iter()
                .position(|w| !sessions[w.session as usize].adopted)
                .unwrap_or(x.queue.len())
        } else {
            x.queue.len()
        };
        x.queue.insert(at, waiter);
        let position = at as u32 + 1;
        self.sessions[me as usize].waits.push(port);
        self.stats.waiters += 1;
        Ok(Reply::Queued { position })
    }

    /// RECLAIM: an adopted session takes back, in the recovery window, a port it
    /// owned on the earlier master, with that grant's token.
    fn reclaim(
        &mut self,
        b: &Batch,
        name: &[u8],
        token: u64,
        value: &[u8],
        out: &mut impl Outbox,
    ) -> Result<Reply<'static>, Fail> {
        self.check_name(name)?;
        self.check_value(value)?;
        if self.recovery_until.is_none() {
            return Err(Fail::Code(
                ErrorCode::ReclaimRefused,
                "no recovery window is open: REGISTER instead",
            ));
        }
        let me = b.session;
        if !self.sessions[me as usize].adopted {
            return Err(Fail::Code(
                ErrorCode::ReclaimRefused,
                "only a session resumed from an earlier master may reclaim",
            ));
        }
        // Tokens this master grants carry its epoch; a reclaimed one must be older, so
        // that every later grant of the port still carries a higher token.
        if token == 0 || token >> 32 >= self.epoch {
            return Err(Fail::Code(
                ErrorCode::ReclaimRefused,
                "the token is not from an earlier epoch",
            ));
        }
        let port = match self.ports.find(name) {
            Some(port) => port,
            None => self.ports.insert(name),
        };
        let owner = self.ports.get(port).owner;
        if owner == me {
            self.ports.set_value(port, value);
            return Ok(Reply::Registered {
                token: self.ports.get(port).token,
            });
        }
        if owner != NONE {
            // Only one session can have held the port when the earlier master stopped;
            // a second claim comes from a client that had lost it (or lies).
            return Err(Fail::Taken { port, owner });
        }
        let s = &self.sessions[me as usize];
        if s.ports.len() + s.waits.len() >= self.cfg.ports_per_session_max as usize {
            self.ports.remove_if_unused(port);
            return Err(PORTS_FULL);
        }
        // A waiter that queued meanwhile stays queued behind the owner.
        self.grant_with(port, me, value, token, out);
        self.stats.ports_reclaimed_total += 1;
        Ok(Reply::Registered { token })
    }

    fn unregister(
        &mut self,
        b: &Batch,
        name: &[u8],
        out: &mut impl Outbox,
    ) -> Result<Reply<'static>, Fail> {
        self.check_name(name)?;
        let me = b.session;
        let Some(port) = self.ports.find(name) else {
            return Err(Fail::Code(
                ErrorCode::NotOwner,
                "this session neither owns nor waits for the port",
            ));
        };
        if self.ports.get(port).owner == me {
            self.release(port, out);
            return Ok(Reply::Ok);
        }
        let queued = self
            .ports
            .extra(port)
            .is_some_and(|x| x.queue.iter().any(|w| w.session == me));
        if queued {
            self.ports.extra_mut(port).queue.retain(|w| w.session != me);
            self.stats.waiters -= 1;
            let waits = &mut self.sessions[me as usize].waits;
            if let Some(i) = waits.iter().position(|&p| p == port) {
                waits.swap_remove(i);
            }
            self.ports.remove_if_unused(port);
            return Ok(Reply::Ok);
        }
        Err(Fail::Code(
            ErrorCode::NotOwner,
            "this session neither owns nor waits for the port",
        ))
    }

    fn query(&mut self, conn: ConnId, id: u32, name: &[u8], out: &mut impl Outbox) {
        if let Err(Fail::Code(code, msg)) = self.check_name(name) {
            return self.error(conn, id, code, msg, out);
        }
        let owned = self
            .ports
            .find(name)
            .filter(|&p| self.ports.get(p).owner != NONE);
        match owned {
            None if self.unknown(name) => {
                let Fail::Code(code, msg) = RECOVERING else {
                    unreachable!()
                };
                self.error(conn, id, code, msg, out)
            }
            None => out.reply(conn, id, &Reply::Free),
            Some(port) => {
                let e = self.ports.get(port);
                let s = &self.sessions[e.owner as usize];
                out.reply(
                    conn,
                    id,
                    &Reply::Owner {
                        session: s.id,
                        token: e.token,
                        node: &s.node,
                        value: self.ports.value(port),
                    },
                );
            }
        }
    }

    fn watch(&mut self, b: &Batch, name: &[u8], prefix: bool) -> Result<Reply<'static>, Fail> {
        let me = b.session;
        if !prefix {
            self.check_name(name)?;
        } else if name.len() > self.cfg.port_name_bytes_max as usize {
            return Err(Fail::Code(
                ErrorCode::NameTooLong,
                "prefix longer than port_name_bytes_max",
            ));
        }
        let s = &self.sessions[me as usize];
        let watching = s.watches.len() + s.prefix_watches as usize;
        if prefix {
            if self
                .prefix_watches
                .iter()
                .any(|p| p.session == me && &*p.prefix == name)
            {
                return Ok(Reply::Watching { owner: None });
            }
            if watching >= self.cfg.watches_per_session_max as usize {
                return Err(WATCHES_FULL);
            }
            if self.prefix_watches.len() >= self.cfg.prefix_watches_max as usize {
                return Err(Fail::Code(
                    ErrorCode::PrefixWatchesMax,
                    "the server holds prefix_watches_max prefix watches",
                ));
            }
            self.prefix_watches.push(PrefixWatch {
                prefix: name.into(),
                session: me,
            });
            self.sessions[me as usize].prefix_watches += 1;
            self.stats.watches += 1;
            return Ok(Reply::Watching { owner: None });
        }
        let port = match self.ports.find(name) {
            Some(port) => port,
            None => {
                if watching >= self.cfg.watches_per_session_max as usize {
                    return Err(WATCHES_FULL);
                }
                self.room_for_a_port()?;
                self.ports.insert(name)
            }
        };
        let already = self
            .ports
            .extra(port)
            .is_some_and(|x| x.watchers.contains(&me));
        if !already {
            if watching >= self.cfg.watches_per_session_max as usize {
                self.ports.remove_if_unused(port);
                return Err(WATCHES_FULL);
            }
            self.ports.extra_mut(port).watchers.push(me);
            self.sessions[me as usize].watches.push(port);
            self.stats.watches += 1;
        }
        let e = self.ports.get(port);
        let owner = (e.owner != NONE).then(|| (self.sessions[e.owner as usize].id, e.token));
        Ok(Reply::Watching { owner })
    }

    fn unwatch(&mut self, b: &Batch, name: &[u8], prefix: bool) -> Result<Reply<'static>, Fail> {
        let me = b.session;
        if prefix {
            let before = self.prefix_watches.len();
            self.prefix_watches
                .retain(|p| !(p.session == me && &*p.prefix == name));
            let removed = (before - self.prefix_watches.len()) as u32;
            self.sessions[me as usize].prefix_watches -= removed;
            self.stats.watches -= removed as u64;
            return Ok(Reply::Ok);
        }
        self.check_name(name)?;
        if let Some(port) = self.ports.find(name) {
            let watching = self
                .ports
                .extra(port)
                .is_some_and(|x| x.watchers.contains(&me));
            if watching {
                self.ports.extra_mut(port).watchers.retain(|&w| w != me);
                let ws = &mut self.sessions[me as usize].watches;
                if let Some(i) = ws.iter().position(|&p| p == port) {
                    ws.swap_remove(i);
                }
                self.stats.watches -= 1;
                self.ports.remove_if_unused(port);
            }
        }
        Ok(Reply::Ok)
    }

    fn send(
        &mut self,
        b: &Batch,
        name: &[u8],
        payload: &[u8],
        out: &mut impl Outbox,
    ) -> Result<Reply<'static>, Fail> {
        self.check_name(name)?;
        if payload.len() > self.cfg.payload_bytes_max as usize {
            return Err(Fail::Code(
                ErrorCode::PayloadTooLarge,
                "payload larger than payload_bytes_max",
            ));
        }
        let Some(port) = self
            .ports
            .find(name)
            .filter(|&p| self.ports.get(p).owner != NONE)
        else {
            if self.unknown(name) {
                return Err(RECOVERING);
            }
            return Ok(Reply::NoOwner);
        };
        let owner = &self.sessions[self.ports.get(port).owner as usize];
        let Some(conn) = owner.conn else {
            return Err(Fail::Code(
                ErrorCode::OwnerUnreachable,
                "the owner has no connection now",
            ));
        };
        let from = self.sessions[b.session as usize].id;
        out.event(
            conn,
            &Event::Message {
                from,
                port: name,
                payload,
            },
        );
        self.stats.messages_relayed_total += 1;
        Ok(Reply::Delivered)
    }

    fn broadcast(
        &mut self,
        b: &Batch,
        prefix: Option<&[u8]>,
        payload: &[u8],
        out: &mut impl Outbox,
    ) -> Result<Reply<'static>, Fail> {
        if payload.len() > self.cfg.payload_bytes_max as usize {
            return Err(Fail::Code(
                ErrorCode::PayloadTooLarge,
                "payload larger than payload_bytes_max",
            ));
        }
        let from = self.sessions[b.session as usize].id;
        let budget = self.cfg.broadcast_fanout_bytes_max;
        let per = payload.len() as u64 + 64;
        let mut count = 0u64;
        match prefix {
            None => {
                if per.saturating_mul(self.conn_sessions.len() as u64) > budget {
                    return Err(Fail::Code(
                        ErrorCode::PayloadTooLarge,
                        "payload x recipients exceeds broadcast_fanout_bytes_max",
                    ));
                }
                for (slot, s) in self.sessions.iter() {
                    if slot as u32 == b.session {
                        continue;
                    }
                    if let Some(conn) = s.conn {
                        out.event(
                            conn,
                            &Event::Message {
                                from,
                                port: &[],
                                payload,
                            },
                        );
                        count += 1;
                    }
                }
            }
            Some(prefix) => {
                if prefix.len() > self.cfg.port_name_bytes_max as usize {
                    return Err(Fail::Code(
                        ErrorCode::NameTooLong,
                        "prefix longer than port_name_bytes_max",
                    ));
                }
                let sessions = &self.sessions;
                let mut matches = 0u64;
                self.ports.scan(0, usize::MAX, |_, e| {
                    if e.name().starts_with(prefix) && sessions[e.owner as usize].conn.is_some() {
                        matches += 1;
                    }
                    true
                });
                if per.saturating_mul(matches) > budget {
                    return Err(Fail::Code(
                        ErrorCode::PayloadTooLarge,
                        "payload x recipients exceeds broadcast_fanout_bytes_max",
                    ));
                }
                self.ports.scan(0, usize::MAX, |_, e| {
                    if e.name().starts_with(prefix) {
                        if let Some(conn) = sessions[e.owner as usize].conn {
                            out.event(
                                conn,
                                &Event::Message {
                                    from,
                                    port: e.name(),
                                    payload,
                                },
                            );
                            count += 1;
                        }
                    }
                    true
                });
            }
        }
        self.stats.messages_relayed_total += count;
        Ok(Reply::Count { count })
    }

    fn list(
        &mut self,
        conn: ConnId,
        id: u32,
        prefix: &[u8],
        cursor: u64,
        limit: u32,
        out: &mut impl Outbox,
    ) {
        if limit == 0 || limit > self.cfg.list_limit_max {
            return self.error(
                conn,
                id,
                ErrorCode::ListLimit,
                "limit must be in [1, list_limit_max]",
                out,
            );
        }
        if prefix.len() > self.cfg.port_name_bytes_max as usize {
            return self.error(
                conn,
                id,
                ErrorCode::NameTooLong,
                "prefix longer than port_name_bytes_max",
                out,
            );
        }
        // Room for entries in one frame, after the message header and page header.
        let bytes_max = self.cfg.frame_bytes_max as usize - limits::MESSAGE_HEADER_BYTES - 12;
        let mut buf = std::mem::take(&mut self.scratch);
        buf.clear();
        let mut count = 0u32;
        let from = cursor.min(self.ports.slots() as u64) as usize;
        let sessions = &self.sessions;
        let ports = &self.ports;
        let stopped = ports.scan(from, self.cfg.list_scan_slots_max as usize, |slot, e| {
            if !e.name().starts_with(prefix) {
                return true;
            }
            let s = &sessions[e.owner as usize];
            let entry = PageEntry {
                port: e.name(),
                session: s.id,
                token: e.token,
                node: &s.node,
                value: ports.value(slot),
            };
            if count == limit || buf.len() + entry.encoded_len() > bytes_max {
                return false;
            }
            entry.encode(&mut buf);
            count += 1;
            true
        });
        let next_cursor = if stopped >= self.ports.slots() {
            0
        } else {
            stopped as u64
        };
        // A continuation cursor is never 0 (0 means "from the start" / "done"): a scan
        // that stops at slot 0 has returned nothing, which cannot happen with limit ≥ 1.
        debug_assert!(next_cursor != 0 || stopped >= self.ports.slots() || from > 0);
        out.reply(
            conn,
            id,
            &Reply::Page {
                next_cursor,
                count,
                entries: &buf,
            },
        );
        self.scratch = buf;
    }
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

/// Whether two session secrets are equal, in a time that does not depend on where
/// they differ: `subtle` keeps the optimiser from turning the comparison back into
/// one with an early exit, which a hand-written loop cannot promise.
fn constant_time_eq(a: u64, b: u64) -> bool {
    subtle::ConstantTimeEq::ct_eq(&a, &b).into()
}
