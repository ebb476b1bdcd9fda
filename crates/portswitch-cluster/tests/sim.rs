//! Deterministic simulation of a whole group plus clients.
//!
//! Three servers and four clients exchange messages through a simulated network with
//! delay, loss and partitions (including a master cut off from the other servers but
//! still reachable by its clients; a connection that loses a message, to loss or to a
//! partition, stalls from then on, as a TCP stream would, until the client gives up
//! on it); servers crash (losing everything but their durable election state and
//! group facts) and restart; every clock runs at its own rate within the configured
//! drift margin. Time is discrete and every choice comes from one seeded generator,
//! so a seed replays (the client library orders its requests for different ports
//! within one frame by its hash maps, seeded per process: a replay may number the
//! tokens of different ports differently, nothing checked depends on it).
//!
//! What is real and what is modelled:
//! - each server runs the real `portswitch-core` (sessions, leases, ports, tokens,
//!   adoption, RECLAIM, the recovery window) and the real master-lease arithmetic
//!   (`MasterLease`);
//! - each client is the real client library's session state machine
//!   (`portswitch_client::session::SessionCore`: the lease view, keepalive, RECLAIM on
//!   a new master, re-queueing, the reclaim deadline, the probe before a release, the
//!   backlog of a detached session), driven by a small deterministic driver here that
//!   does what `direct.rs` does around it: it picks a server (on `not_master` or a
//!   lost connection, the next one after a short random pause), sends HELLO (resuming
//!   the session once it has one), hands HELLO_OK to `SessionCore::new` or `resumed`,
//!   refuses a server of an older epoch than the session's, drops a connection whose
//!   oldest request goes unanswered for the library's answer timeout, calls `detached`
//!   when a connection is lost and `handle_timeout` when `next_timeout` says, and
//!   starts a new session when one is over;
//! - requests, replies and events cross the simulated network as encoded frames
//!   (`FrameBuf`), decoded at the other end (`Request::decode`, `ServerMsg::decode`);
//! - Raft is modelled by what openraft guarantees and our use of it relies on — one
//!   leader per term, durable votes, quorum intersection, a new leader holding every
//!   committed write, heartbeats acknowledged against their send time — not by
//!   openraft itself (it cannot be run deterministically);
//! - the application: each client now and then asks for lock a, b or c the way
//!   `Client::register_wait` (and `Lock`) does — a REGISTER that waits in the queue
//!   until granted — holds it a while and lets it go (UNREGISTER), or gives up waiting
//!   (UNREGISTER of a port it is queued for).
//!
//! A client *believes* it owns port P with token T while its application holds P (it
//! was granted T and has not asked to let go), its session core owns P with T
//! (`SessionCore::owns`) and the client's own clock is before the session's lease view
//! end (`SessionCore::view_end`). Invariants, checked after every event processed:
//! - never two clients believe they own the same port at once;
//! - the tokens of a port, in the order clients come to believe in them, only
//!   increase;
//! - after the faults stop, every client gets service again;
//! - after the faults stop, every client that waits for a port is in the master's
//!   queue for it (or owns it) within [`STARVE_MS`]: a waiter the master lost track
//!   of would wait forever;
//! - after the faults stop, every port the master has owned by one session for a
//!   lease plus [`STARVE_MS`] is held by that session's application: a port its
//!   owner's application does not know it holds (a leak) would starve its waiters.
//!   (This check found four bugs in the session core when it first ran — a grant
//!   lost with a dropped connection never learned on the same master, a wait sent
//!   again after the application left the queue, a re-queue not retried, a release
//!   cut short never sent again — all fixed.) `PORTSWITCH_SIM_LEAKS=count` counts
//!   leaks and prints their seeds instead of failing.
//!
//! `PORTSWITCH_SIM_SEEDS=N` runs N seeds (default 300); `PORTSWITCH_SIM_SEED=S` runs
//! seed S alone, printing its trace (every request, reply and event each client sends
//! and receives, and every connection that stalls).

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, BinaryHeap, HashMap};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use portswitch_client::session::{Answer, Effects, Kind, Phase, SessionCore, Settings, Wire};
use portswitch_client::{ClientOptions, Event as ClientEvent};
use portswitch_cluster::MasterLease;
use portswitch_core::{Config, ConnId, Core, Lookup, Outbox};
use portswitch_proto::frame::{frame_len, messages};
use portswitch_proto::limits::{COMMANDS_PER_FRAME_MAX, FRAME_BYTES_MAX, PROTOCOL_VERSION};
use portswitch_proto::{ErrorCode, Event, FrameBuf, Hello, Reply, Request, ServerMsg};

const SERVERS: usize = 3;
const CLIENTS: usize = 4;
const PORTS: [&str; 3] = ["a", "b", "c"];
/// Client session lease, and the longest the servers grant.
const LEASE_MS: u64 = 2_000;
const CLIENT_MARGIN: f64 = 0.1;
const HEARTBEAT_MS: u64 = 50;
const ELECTION_MS: (u64, u64) = (250, 500);
const MASTER_LEASE: MasterLease = MasterLease {
    lease_ms: 300,
    drift_per_mille: 50,
};
const TICK_MS: u64 = 10;
/// Simulated time with faults, then with none.
const FAULT_MS: u64 = 15_000;
const HEAL_MS: u64 = 15_000;
/// After the faults stop, when waiters must be served: a new master's election,
/// its wait, its recovery window (2 s leases) and clients finding it.
const SETTLE_MS: u64 = 6_000;
/// How long a client may believe it waits for a port while the master does not have
/// it in the queue (message delays after the faults stop are a few ms).
const STARVE_MS: u64 = 1_000;
/// The request id of HELLO on every connection (the session's requests follow).
const HELLO_ID: u32 = 1;

// ---------------------------------------------------------------- time & randomness

/// A clock running at `rate_pm` per mille of real time (drift within the margin).
#[derive(Debug, Clone, Copy)]
struct Clock {
    rate_pm: u64,
}

impl Clock {
    fn local(&self, real: u64) -> u64 {
        real * self.rate_pm / 1_000
    }
    /// The first real time at which this clock shows `local` or later.
    fn real(&self, local: u64) -> u64 {
        (local * 1_000).div_ceil(self.rate_pm)
    }
}

fn drift_clock(rng: &mut fastrand::Rng) -> Clock {
    let d = MASTER_LEASE.drift_per_mille;
    Clock {
        rate_pm: rng.u64(1_000 - d..=1_000 + d),
    }
}

// ---------------------------------------------------------------- messages

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
struct Facts {
    /// Term of the leader that wrote them, then the epoch: compared like Raft's
    /// (last log term, last log index).
    term: u64,
    epoch: u64,
    master_lease_ms: u64,
    lease_ms_max: u64,
    has_master: bool,
}

#[derive(Debug, Clone)]
enum Peer {
    Vote {
        term: u64,
        from: usize,
        facts: Facts,
    },
    VoteResp {
        term: u64,
        from: usize,
        granted: bool,
    },
    Heartbeat {
        term: u64,
        from: usize,
        seq: u64,
        facts: Facts,
    },
    HeartbeatResp {
        term: u64,
        from: usize,
        seq: u64,
        ok: bool,
    },
}

#[derive(Debug, Clone)]
enum Msg {
    Peer {
        to: usize,
        m: Peer,
    },
    /// Frames of requests on a connection.
    ToServer {
        server: usize,
        client: usize,
        conn: ConnId,
        frames: Bytes,
    },
    /// Frames of replies and events on a connection.
    ToClient {
        client: usize,
        conn: ConnId,
        frames: Bytes,
    },
    /// The server's end of the connection is gone (RST of a killed server, a deposed
    /// master's or a closed connection, a refused connect).
    Closed {
        client: usize,
        conn: ConnId,
    },
    /// The client closed its connection (FIN).
    Hangup {
        server: usize,
        conn: ConnId,
    },
}

// ---------------------------------------------------------------- servers

#[derive(Debug)]
enum Role {
    Follower,
    Candidate { votes: BTreeSet<usize> },
    Leader(Box<Leading>),
}

#[derive(Debug)]
struct Leading {
    elected_local: u64,
    /// Heartbeats sent: seq → (local send time, who acknowledged).
    sent: BTreeMap<u64, (u64, BTreeSet<usize>)>,
    next_seq: u64,
    /// The facts this leader wrote; committed once a quorum stores them.
    facts: Facts,
    previous: Option<(u64, u64)>,
    committed: bool,
    lease_until_local: u64,
    serving: bool,
}

struct Server {
    up: bool,
    clock: Clock,
    // Durable.
    term: u64,
    voted_for: Option<usize>,
    facts: Facts,
    // Volatile.
    role: Role,
    election_deadline_local: u64,
    last_heartbeat_local: u64,
    core: Option<Core>,
    conns: BTreeMap<ConnId, usize>,
}

/// What a core emitted: frames per connection (in the order connections first got
/// output), and the connections it closed.
struct Rec {
    out: Vec<(ConnId, FrameBuf)>,
    closed: Vec<ConnId>,
}

impl Rec {
    fn new() -> Rec {
        Rec {
            out: Vec::new(),
            closed: Vec::new(),
        }
    }

    fn to(&mut self, conn: ConnId) -> &mut FrameBuf {
        let i = match self.out.iter().position(|(c, _)| *c == conn) {
            Some(i) => i,
            None => {
                self.out
                    .push((conn, FrameBuf::new(FRAME_BYTES_MAX, COMMANDS_PER_FRAME_MAX)));
                self.out.len() - 1
            }
        };
        &mut self.out[i].1
    }
}

impl Outbox for Rec {
    fn reply(&mut self, conn: ConnId, id: u32, r: &Reply<'_>) {
        self.to(conn).push_reply(id, r);
    }
    fn event(&mut self, conn: ConnId, e: &Event<'_>) {
        self.to(conn).push_event(e);
    }
    fn frames(&mut self, conn: ConnId, frames: &[u8]) {
        // Events buffered for a detached session, after its resume's HELLO_OK.
        self.to(conn).push_frames(frames);
    }
    fn close(&mut self, conn: ConnId) {
        self.closed.push(conn);
    }
}

fn frames_of(mut fb: FrameBuf) -> Bytes {
    let mut b = BytesMut::new();
    fb.take_into(&mut b);
    b.freeze()
}

/// The messages of whole frames, frame by frame: (opcode, request id, body).
fn each_frame(frames: &[u8]) -> Vec<Vec<(u8, u32, &[u8])>> {
    let mut out = Vec::new();
    let mut rest = frames;
    while !rest.is_empty() {
        let n = match frame_len(rest, FRAME_BYTES_MAX) {
            Ok(Some(n)) => n,
            other => panic!("a simulated frame did not parse: {other:?}"),
        };
        let frame = messages(&rest[4..n], usize::MAX)
            .map(|m| {
                let m = m.expect("a simulated message parses");
                (m.opcode, m.id, m.body)
            })
            .collect();
        out.push(frame);
        rest = &rest[n..];
    }
    out
}

// ---------------------------------------------------------------- clients

/// What a completion of the session core is for, by port index: the application's
/// wait for a port (`register_wait`; with when it began, which tells it from an
/// earlier wait the application gave up), or its release.
#[derive(Debug, Clone, Copy)]
enum Done {
    Wait(usize, u64),
    Release(usize),
}

struct Client {
    clock: Clock,
    /// The server connected to, or to try next.
    server: usize,
    conn: Option<ConnId>,
    conn_gen: u64,
    /// HELLO sent on `conn` and not answered yet: when (local).
    hello: Option<u64>,
    /// The session: the client library's own state machine.
    session: Option<SessionCore<Done>>,
    /// The last request id used on the current connection.
    next_id: u32,
    /// RECLAIMs the session sent on the current connection, by request id: their
    /// tokens (observed on the wire, for the counts).
    reclaims: BTreeMap<u32, u64>,
    retry_at_local: u64,
    last_answer_real: u64,
    /// When the next `handle_timeout` is scheduled (real), if it is.
    timer_at: Option<u64>,
    // The application, per port of PORTS.
    /// Waiting for the port (`register_wait` outstanding) since (real).
    waiting: [Option<u64>; PORTS.len()],
    /// Granted with this token and not let go.
    holding: [Option<u64>; PORTS.len()],
    /// What the client believed at its last check: the token per port, until the
    /// real time its lease view ends.
    belief: [Option<u64>; PORTS.len()],
    belief_until: u64,
    /// The session took an input since the last check (only then can a belief begin).
    dirty: bool,
}

/// The wire of a client's session: a frame of requests for the current connection.
struct SimWire<'a> {
    next_id: &'a mut u32,
    out: FrameBuf,
    reclaims: &'a mut BTreeMap<u32, u64>,
    /// Ports of the REGISTERs pushed.
    registers: Vec<Vec<u8>>,
    trace: Option<Vec<String>>,
}

impl Wire for SimWire<'_> {
    fn push(&mut self, req: &Request<'_>) -> u32 {
        *self.next_id = self.next_id.wrapping_add(1).max(1);
        let id = *self.next_id;
        self.out.push_request(id, req);
        match *req {
            Request::Reclaim { token, .. } => {
                self.reclaims.insert(id, token);
            }
            Request::Register { port, .. } => self.registers.push(port.to_vec()),
            _ => {}
        }
        if let Some(t) = &mut self.trace {
            t.push(format!("#{id} {}", show_request(req)));
        }
        id
    }
}

/// A request as the trace shows it.
fn show_request(req: &Request<'_>) -> String {
    let name = |p: &[u8]| String::from_utf8_lossy(p).into_owned();
    match *req {
        Request::Hello(h) if h.resume_session != 0 => format!("HELLO resume {}", h.resume_session),
        Request::Hello(_) => "HELLO".into(),
        Request::Register { port, wait, .. } => {
            format!("REGISTER {}{}", name(port), if wait { " wait" } else { "" })
        }
        Request::Unregister { port } => format!("UNREGISTER {}", name(port)),
        Request::Reclaim { port, token, .. } => format!("RECLAIM {} {token}", name(port)),
        Request::Ping => "PING".into(),
        ref other => format!("{other:?}"),
    }
}

/// A reply or event as the trace shows it.
fn show_server_msg(msg: &ServerMsg<'_>) -> String {
    let name = |p: &[u8]| String::from_utf8_lossy(p).into_owned();
    match *msg {
        ServerMsg::Reply { id, reply } => {
            let r = match reply {
                Reply::HelloOk(h) => format!(
                    "HELLO_OK session {} epoch {} recovery_ms {}{}",
                    h.session,
                    h.epoch,
                    h.recovery_ms,
                    if h.resumed { " resumed" } else { "" }
                ),
                Reply::Ok => "OK".into(),
                Reply::Registered { token } => format!("REGISTERED {token}"),
                Reply::Queued { position } => format!("QUEUED {position}"),
                Reply::Error { code, message, .. } => format!("ERROR {code}: {}", name(message)),
                other => format!("{other:?}"),
            };
            format!("#{id} {r}")
        }
        ServerMsg::Event(Event::Acquired { port, token }) => {
            format!("ACQUIRED {} {token}", name(port))
        }
        ServerMsg::Event(Event::GoAway { code, message }) => {
            format!("GOAWAY {code}: {}", name(message))
        }
        ServerMsg::Event(e) => format!("{e:?}"),
    }
}

fn port_index(port: &[u8]) -> usize {
    PORTS
        .iter()
        .position(|p| p.as_bytes() == port)
        .expect("a port of the simulation")
}

// ---------------------------------------------------------------- the world

struct World {
    seed: u64,
    rng: fastrand::Rng,
    now: u64,
    queue: BinaryHeap<Reverse<(u64, u64, usize)>>,
    msgs: HashMap<usize, Msg>,
    next_msg: usize,
    seq: u64,
    servers: Vec<Server>,
    clients: Vec<Client>,
    /// Blocked links (a, b) between endpoints: servers are 0..SERVERS, clients
    /// SERVERS..; blocked both ways.
    cut: BTreeSet<(usize, usize)>,
    /// When the last message on each (from, to) link arrives.
    link_last: HashMap<(usize, usize), u64>,
    loss_pm: u64,
    delay_max: u64,
    /// Connections that lost a message: they carry nothing more.
    stalled: BTreeSet<ConnId>,
    faults: bool,
    /// Per port: the highest token some client has believed in, and which client.
    believed: [(u64, usize); PORTS.len()],
    /// Per client and port: when a waiter was first seen waiting while the master
    /// did not have it in the queue.
    starving: [[Option<u64>; PORTS.len()]; CLIENTS],
    /// Per port: the master's owner (session, token) that no client's application
    /// holds, since when, and whether it was counted as a leak.
    leaking: [Option<(u64, u64, u64, bool)>; PORTS.len()],
    /// A leak fails the run (otherwise it is counted).
    leaks_fail: bool,
    /// Client clocks' zero as an `Instant` (the session core's time).
    base: Instant,
    settings: Settings,
    /// The client library's answer timeout for the sessions' lease.
    answer_timeout_ms: u64,
    trace: bool,
    log: Vec<String>,
    stats: Counts,
}

/// What a run exercised, so a suite of seeds cannot pass by doing nothing.
#[derive(Debug, Default, Clone, Copy)]
struct Counts {
    masters: u64,
    masters_with_window: u64,
    grants_believed: u64,
    reclaims_kept: u64,
    sessions_lost: u64,
    crashes: u64,
    /// Places in queues taken again on a new master.
    requeued: u64,
    /// Grants to waiters (ACQUIRED believed).
    waiters_granted: u64,
    /// Ports the master kept owned by a session whose application did not hold them
    /// (see [`World::check_leaks`]).
    leaks: u64,
}

impl std::ops::AddAssign for Counts {
    fn add_assign(&mut self, o: Counts) {
        self.masters += o.masters;
        self.masters_with_window += o.masters_with_window;
        self.grants_believed += o.grants_believed;
        self.reclaims_kept += o.reclaims_kept;
        self.sessions_lost += o.sessions_lost;
        self.crashes += o.crashes;
        self.requeued += o.requeued;
        self.waiters_granted += o.waiters_granted;
        self.leaks += o.leaks;
    }
}

fn quorum() -> usize {
    SERVERS / 2 + 1
}

impl World {
    fn new(seed: u64, answer_timeout_ms: u64) -> World {
        let mut rng = fastrand::Rng::with_seed(seed);
        let servers = (0..SERVERS)
            .map(|_| Server {
                up: true,
                clock: drift_clock(&mut rng),
                term: 0,
                voted_for: None,
                facts: Facts {
                    term: 0,
                    epoch: 0,
                    master_lease_ms: 0,
                    lease_ms_max: 0,
                    has_master: false,
                },
                role: Role::Follower,
                election_deadline_local: 0,
                last_heartbeat_local: 0,
                core: None,
                conns: BTreeMap::new(),
            })
            .collect();
        let clients = (0..CLIENTS)
            .map(|id| Client {
                clock: drift_clock(&mut rng),
                server: id % SERVERS,
                conn: None,
                conn_gen: 0,
                hello: None,
                session: None,
                next_id: 0,
                reclaims: BTreeMap::new(),
                retry_at_local: 0,
                last_answer_real: 0,
                timer_at: None,
                waiting: [None; PORTS.len()],
                holding: [None; PORTS.len()],
                belief: [None; PORTS.len()],
                belief_until: 0,
                dirty: false,
            })
            .collect();
        let mut w = World {
            seed,
            rng,
            now: 0,
            queue: BinaryHeap::new(),
            msgs: HashMap::new(),
            next_msg: 0,
            seq: 0,
            servers,
            clients,
            cut: BTreeSet::new(),
            link_last: HashMap::new(),
            loss_pm: 0,
            delay_max: 5,
            stalled: BTreeSet::new(),
            faults: true,
            believed: [(0, usize::MAX); PORTS.len()],
            starving: [[None; PORTS.len()]; CLIENTS],
            leaking: [None; PORTS.len()],
            leaks_fail: false,
            base: Instant::now(),
            settings: Settings {
                lease_margin: CLIENT_MARGIN,
                end_on_disconnect: false,
                keepalive: None,
            },
            answer_timeout_ms,
            trace: false,
            log: Vec::new(),
            stats: Counts::default(),
        };
        for s in 0..SERVERS {
            w.reset_election(s);
        }
        w
    }

    fn note(&mut self, s: String) {
        if self.trace {
            println!("{:>6} {s}", self.now);
        }
        self.log.push(s);
        if self.log.len() > 400 {
            self.log.drain(..200);
        }
    }

    fn fail(&self, what: String) -> ! {
        let tail = self
            .log
            .iter()
            .rev()
            .take(60)
            .rev()
            .cloned()
            .collect::<Vec<_>>();
        panic!(
            "seed {}: {what} at {} ms\nreproduce: PORTSWITCH_SIM_SEED={} cargo test -p portswitch-cluster --test sim -- --nocapture\nlast events:\n{}",
            self.seed,
            self.now,
            self.seed,
            tail.join("\n")
        );
    }

    fn push(&mut self, at: u64, kind: usize) {
        self.seq += 1;
        self.queue.push(Reverse((at, self.seq, kind)));
    }

    /// Sends `m` from endpoint `from` to endpoint `to` (servers 0.., clients SERVERS..).
    fn send(&mut self, from: usize, to: usize, m: Msg) {
        let conn = match &m {
            Msg::Peer { .. } => None,
            Msg::ToServer { conn, .. }
            | Msg::ToClient { conn, .. }
            | Msg::Closed { conn, .. }
            | Msg::Hangup { conn, .. } => Some(*conn),
        };
        if conn.is_some_and(|c| self.stalled.contains(&c)) {
            return;
        }
        let (a, b) = (from.min(to), from.max(to));
        if self.cut.contains(&(a, b)) || (self.faults && self.rng.u64(0..1_000) < self.loss_pm) {
            // A stream loses nothing in its middle: a connection that lost a message
            // is stalled from then on (until the client's answer timeout gives up on
            // it).
            if let Some(c) = conn {
                if self.trace {
                    self.note(format!(
                        "connection {c:#x} stalls (a message from {from} to {to} lost)"
                    ));
                }
                self.stalled.insert(c);
            }
            return;
        }
        // Links are FIFO, like TCP: nothing overtakes what was sent before it.
        let last = self.link_last.entry((from, to)).or_insert(0);
        let at = (self.now + self.rng.u64(1..=self.delay_max)).max(*last);
        *last = at;
        let k = self.next_msg;
        self.next_msg += 1;
        self.msgs.insert(k, m);
        // Message kinds are numbered above the timer kinds.
        self.push(at, MESSAGE + k);
    }

    // ------------------------------------------------------------ servers

    fn reset_election(&mut self, s: usize) {
        let local = self.servers[s].clock.local(self.now);
        let t = self.rng.u64(ELECTION_MS.0..=ELECTION_MS.1);
        self.servers[s].election_deadline_local = local + t;
    }

    fn step_down(&mut self, s: usize, term: u64) {
        let srv = &mut self.servers[s];
        if term > srv.term {
            srv.term = term;
            srv.voted_for = None;
        }
        if !matches!(srv.role, Role::Follower) {
            self.depose(s, "stepped down");
            self.servers[s].role = Role::Follower;
        }
    }

    /// Stops serving at once: the core and every effect it could have go.
    fn depose(&mut self, s: usize, why: &str) {
        if self.servers[s].core.take().is_some() {
            self.note(format!("server {s} deposed ({why})"));
        }
        if let Role::Leader(l) = &mut self.servers[s].role {
            l.serving = false;
        }
        let conns: Vec<(ConnId, usize)> = std::mem::take(&mut self.servers[s].conns)
            .into_iter()
            .collect();
        for (conn, client) in conns {
            self.send(s, SERVERS + client, Msg::Closed { client, conn });
        }
    }

    fn server_tick(&mut self, s: usize) {
        if !self.servers[s].up {
            return;
        }
        let local = self.servers[s].clock.local(self.now);
        let is_leader = matches!(self.servers[s].role, Role::Leader(_));
        if !is_leader && local >= self.servers[s].election_deadline_local {
            // Stand for election.
            let srv = &mut self.servers[s];
            srv.term += 1;
            srv.voted_for = Some(s);
            srv.role = Role::Candidate {
                votes: BTreeSet::from([s]),
            };
            let (term, facts) = (srv.term, srv.facts);
            self.note(format!("server {s} stands in term {term}"));
            self.reset_election(s);
            for to in 0..SERVERS {
                if to != s {
                    self.send(
                        s,
                        to,
                        Msg::Peer {
                            to,
                            m: Peer::Vote {
                                term,
                                from: s,
                                facts,
                            },
                        },
                    );
                }
            }
        }
        if is_leader {
            self.leader_tick(s, local);
            self.check_leaks(s);
        }
        let now_local = self.servers[s].clock.local(self.now);
        if let Some(core) = self.servers[s].core.as_mut() {
            let mut rec = Rec {
                out: Vec::new(),
                closed: Vec::new(),
            };
            core.handle_timeout(now_local, &mut rec);
            self.emit(s, rec);
        }
    }

    fn leader_tick(&mut self, s: usize, local: u64) {
        // Heartbeats every HEARTBEAT_MS (they carry the facts, which commits them).
        let (term, facts, seq, send) = {
            let srv = &mut self.servers[s];
            let term = srv.term;
            let facts = srv.facts;
            let Role::Leader(l) = &mut srv.role else {
                return;
            };
            let last = l.sent.keys().next_back().map(|k| l.sent[k].0);
            let send = last.is_none_or(|t| local >= t + HEARTBEAT_MS);
            let seq = l.next_seq;
            if send {
                l.next_seq += 1;
                l.sent.insert(seq, (local, BTreeSet::from([s])));
                while l.sent.len() > 64 {
                    let first = *l.sent.keys().next().expect("non-empty");
                    l.sent.remove(&first);
                }
            }
            (term, facts, seq, send)
        };
        if send {
            for to in 0..SERVERS {
                if to != s {
                    self.send(
                        s,
                        to,
                        Msg::Peer {
                            to,
                            m: Peer::Heartbeat {
                                term,
                                from: s,
                                seq,
                                facts,
                            },
                        },
                    );
                }
            }
        }
        // Serve once the facts are committed, the predecessor's lease waited out and
        // a quorum confirmed us; stop the moment the lease runs out.
        let srv = &mut self.servers[s];
        let Role::Leader(l) = &mut srv.role else {
            return;
        };
        if l.serving && local >= l.lease_until_local {
            self.lapse(s, local);
            return;
        }
        let wait = MASTER_LEASE.wait_out(l.previous.map_or(0, |(_, ml)| ml));
        let may = l.committed && local >= l.elected_local + wait && local < l.lease_until_local;
        if may && !l.serving {
            l.serving = true;
            let epoch = l.facts.epoch;
            let window = l
                .previous
                .map(|(lease_max, _)| MASTER_LEASE.recovery_window(lease_max));
            let cfg = Config {
                lease_ms_min: 100,
                lease_ms_max: LEASE_MS as u32,
                ..Config::default()
            };
            let mut core = Core::new(cfg, epoch, [s as u64 + 1, 7, 8]);
            if let Some(w) = window {
                core.start_recovery(local, w);
            }
            srv.core = Some(core);
            self.stats.masters += 1;
            self.stats.masters_with_window += window.is_some() as u64;
            self.note(format!(
                "server {s} serves in epoch {epoch} (window {window:?})"
            ));
        }
    }

    fn on_peer(&mut self, to: usize, m: Peer) {
        if !self.servers[to].up {
            return;
        }
        let local = self.servers[to].clock.local(self.now);
        match m {
            Peer::Vote { term, from, facts } => {
                if term > self.servers[to].term {
                    self.step_down(to, term);
                }
                let srv = &mut self.servers[to];
                let granted = term == srv.term
                    && srv.voted_for.is_none_or(|v| v == from)
                    && facts >= srv.facts;
                if granted {
                    srv.voted_for = Some(from);
                    self.reset_election(to);
                }
                let t = self.servers[to].term;
                self.send(
                    to,
                    from,
                    Msg::Peer {
                        to: from,
                        m: Peer::VoteResp {
                            term: t,
                            from: to,
                            granted,
                        },
                    },
                );
            }
            Peer::VoteResp {
                term,
                from,
                granted,
            } => {
                if term > self.servers[to].term {
                    self.step_down(to, term);
                    return;
                }
                let srv = &mut self.servers[to];
                let my_term = srv.term;
                let Role::Candidate { votes } = &mut srv.role else {
                    return;
                };
                if granted && term == my_term {
                    votes.insert(from);
                    if votes.len() >= quorum() {
                        self.become_leader(to, local);
                    }
                }
            }
            Peer::Heartbeat {
                term,
                from,
                seq,
                facts,
            } => {
                if term < self.servers[to].term {
                    let t = self.servers[to].term;
                    self.send(
                        to,
                        from,
                        Msg::Peer {
                            to: from,
                            m: Peer::HeartbeatResp {
                                term: t,
                                from: to,
                                seq,
                                ok: false,
                            },
                        },
                    );
                    return;
                }
                if term > self.servers[to].term || !matches!(self.servers[to].role, Role::Follower)
                {
                    self.step_down(to, term);
                }
                let srv = &mut self.servers[to];
                srv.term = term;
                srv.facts = facts;
                srv.last_heartbeat_local = local;
                self.reset_election(to);
                self.send(
                    to,
                    from,
                    Msg::Peer {
                        to: from,
                        m: Peer::HeartbeatResp {
                            term,
                            from: to,
                            seq,
                            ok: true,
                        },
                    },
                );
            }
            Peer::HeartbeatResp {
                term,
                from,
                seq,
                ok,
            } => {
                if term > self.servers[to].term {
                    self.step_down(to, term);
                    return;
                }
                let srv = &mut self.servers[to];
                let my_term = srv.term;
                let Role::Leader(l) = &mut srv.role else {
                    return;
                };
                if !ok || term != my_term {
                    return;
                }
                if let Some((sent_local, acks)) = l.sent.get_mut(&seq) {
                    acks.insert(from);
                    if acks.len() >= quorum() {
                        // The lease runs from the SEND time of a quorum-acked heartbeat.
                        let until = MASTER_LEASE.serve_until(*sent_local);
                        l.lease_until_local = l.lease_until_local.max(until);
                        // Every heartbeat carries this leader's facts and a follower
                        // stores them before it acks: a quorum of acks commits them.
                        l.committed = true;
                    }
                }
            }
        }
    }

    /// The master's lease ran out: it stops serving at once and, like node.rs, a
    /// leader that lost its lease takes over afresh — a new epoch written through the
    /// group, the wait, a recovery window.
    fn lapse(&mut self, s: usize, local: u64) {
        self.depose(s, "lease ran out");
        self.become_leader(s, local);
    }

    fn become_leader(&mut self, s: usize, local: u64) {
        let srv = &mut self.servers[s];
        let previous = srv
            .facts
            .has_master
            .then_some((srv.facts.lease_ms_max, srv.facts.master_lease_ms));
        let floor = self.now / 1_000 + 1_000; // a wall clock, in seconds
        let facts = Facts {
            term: srv.term,
            epoch: (srv.facts.epoch + 1).max(floor),
            // Never lowered (GroupFacts::apply): earlier masters' leases may still run.
            master_lease_ms: MASTER_LEASE.lease_ms.max(srv.facts.master_lease_ms),
            lease_ms_max: LEASE_MS.max(srv.facts.lease_ms_max),
            has_master: true,
        };
        srv.facts = facts;
        srv.role = Role::Leader(Box::new(Leading {
            elected_local: local,
            sent: BTreeMap::new(),
            next_seq: 1,
            facts,
            previous,
            committed: false,
            lease_until_local: 0,
            serving: false,
        }));
        let term = srv.term;
        self.note(format!(
            "server {s} leads term {term}, epoch {}",
            facts.epoch
        ));
    }

    fn crash(&mut self, s: usize) {
        if !self.servers[s].up {
            return;
        }
        self.note(format!("server {s} crashes"));
        self.stats.crashes += 1;
        // Its sockets die with it: clients see the connections close (RST).
        self.depose(s, "crashed");
        let srv = &mut self.servers[s];
        srv.up = false;
        srv.role = Role::Follower;
    }

    fn restart(&mut self, s: usize) {
        if self.servers[s].up {
            return;
        }
        self.note(format!("server {s} restarts"));
        self.servers[s].up = true;
        self.reset_election(s);
    }

    /// Hands what the core emitted to the clients.
    fn emit(&mut self, s: usize, rec: Rec) {
        for (conn, fb) in rec.out {
            let Some(&client) = self.servers[s].conns.get(&conn) else {
                continue;
            };
            let frames = frames_of(fb);
            self.send(
                s,
                SERVERS + client,
                Msg::ToClient {
                    client,
                    conn,
                    frames,
                },
            );
        }
        for conn in rec.closed {
            if let Some(client) = self.servers[s].conns.remove(&conn) {
                self.send(s, SERVERS + client, Msg::Closed { client, conn });
            }
        }
    }

    /// Frames of requests from a client, handled as the server does: each frame is a
    /// batch of the core (any frame renews the session's lease).
    fn on_frames(&mut self, s: usize, client: usize, conn: ConnId, frames: Bytes) {
        if !self.servers[s].up {
            // Connection refused.
            self.send(s, SERVERS + client, Msg::Closed { client, conn });
            return;
        }
        let local = self.servers[s].clock.local(self.now);
        // The lease is checked before anything else.
        if let Role::Leader(l) = &self.servers[s].role {
            if l.serving && local >= l.lease_until_local {
                self.lapse(s, local);
            }
        }
        let batches = each_frame(&frames);
        let first = batches.first().and_then(|f| f.first()).map(|m| m.0);
        let hello = first == Some(portswitch_proto::msg::op::HELLO);
        // A connection the server closed (a deposed core's) carries nothing more, as
        // with TCP: only a new connection's HELLO starts one.
        if !self.servers[s].conns.contains_key(&conn) && !hello {
            self.send(s, SERVERS + client, Msg::Closed { client, conn });
            return;
        }
        if self.servers[s].core.is_none() {
            // Not the master: every request is answered `not_master`.
            let mut fb = FrameBuf::new(FRAME_BYTES_MAX, COMMANDS_PER_FRAME_MAX);
            for &(_, id, _) in batches.iter().flatten() {
                let not_master = Reply::error(ErrorCode::NotMaster, b"not the master");
                fb.push_reply(id, &not_master);
            }
            let frames = frames_of(fb);
            self.send(
                s,
                SERVERS + client,
                Msg::ToClient {
                    client,
                    conn,
                    frames,
                },
            );
            return;
        }
        // The client library only sends what decodes.
        for &(opcode, _, body) in batches.iter().flatten() {
            if let Err(e) = Request::decode(opcode, body) {
                self.fail(format!(
                    "client {client} sent a request that does not decode: {e}"
                ));
            }
        }
        self.servers[s].conns.insert(conn, client);
        let core = self.servers[s].core.as_mut().expect("checked");
        let mut rec = Rec::new();
        for frame in &batches {
            let mut b = core.begin_batch(conn, local);
            for &(opcode, id, body) in frame {
                let req = Request::decode(opcode, body).expect("checked");
                core.handle(&mut b, id, &req, &mut rec);
            }
        }
        self.emit(s, rec);
    }

    /// The client closed a connection: the core forgets it (its session waits to be
    /// resumed).
    fn on_hangup(&mut self, s: usize, conn: ConnId) {
        if !self.servers[s].up || self.servers[s].conns.remove(&conn).is_none() {
            return;
        }
        let local = self.servers[s].clock.local(self.now);
        if let Some(core) = self.servers[s].core.as_mut() {
            let mut rec = Rec::new();
            core.handle_disconnect(conn, local, &mut rec);
            self.emit(s, rec);
        }
    }

    // ------------------------------------------------------------ clients

    /// Client `c`'s clock, as its session core's time.
    fn instant(&self, c: usize) -> Instant {
        self.base + Duration::from_millis(self.clients[c].clock.local(self.now))
    }

    /// The first real time at which client `c`'s clock shows `t` or later.
    fn real_at(&self, c: usize, t: Instant) -> u64 {
        let ns = t.saturating_duration_since(self.base).as_nanos();
        self.clients[c].clock.real(ns.div_ceil(1_000_000) as u64)
    }

    /// Runs `f` on client `c`'s session (if it has one) with a wire for its
    /// connection, then does what the library's drivers do: sends what the session
    /// pushed, delivers its effects, and keeps its timer. Returns what `f` returned and
    /// the ports of the REGISTERs pushed.
    fn drive<R>(
        &mut self,
        c: usize,
        f: impl FnOnce(&mut SessionCore<Done>, &mut SimWire<'_>, Instant) -> R,
    ) -> Option<(R, Vec<Vec<u8>>)> {
        let now = self.instant(c);
        let trace = self.trace;
        let cl = &mut self.clients[c];
        let session = cl.session.as_mut()?;
        cl.dirty = true;
        let mut wire = SimWire {
            next_id: &mut cl.next_id,
            out: FrameBuf::new(FRAME_BYTES_MAX, COMMANDS_PER_FRAME_MAX),
            reclaims: &mut cl.reclaims,
            registers: Vec::new(),
            trace: trace.then(Vec::new),
        };
        let r = f(session, &mut wire, now);
        let mut fx = Effects::default();
        session.take_effects(&mut fx);
        let SimWire {
            out,
            registers,
            trace: sent,
            ..
        } = wire;
        let frames = frames_of(out);
        if !frames.is_empty() {
            let (conn, hello, server) = (cl.conn, cl.hello, cl.server);
            let (Some(conn), None) = (conn, hello) else {
                self.fail(format!(
                    "client {c}'s session sent requests with no connection up"
                ));
            };
            for t in sent.into_iter().flatten() {
                self.note(format!("client {c} → server {server} {t}"));
            }
            self.send(
                SERVERS + c,
                server,
                Msg::ToServer {
                    server,
                    client: c,
                    conn,
                    frames,
                },
            );
        }
        self.deliver(c, fx);
        self.schedule(c);
        Some((r, registers))
    }

    /// Completions and events of client `c`'s session, as its application sees them.
    fn deliver(&mut self, c: usize, fx: Effects<Done>) {
        for (done, r) in fx.done {
            match done {
                Done::Wait(i, since) => {
                    // (A wait the application gave up is not a grant to it.)
                    let current = self.clients[c].waiting[i] == Some(since);
                    if current {
                        self.clients[c].waiting[i] = None;
                    }
                    match r {
                        Ok(Answer::Registered(t)) if current => {
                            self.clients[c].holding[i] = Some(t);
                        }
                        Ok(other) => self.note(format!(
                            "client {c}'s wait for {} (since {since} ms{}) ended: {other:?}",
                            PORTS[i],
                            if current { "" } else { ", given up" }
                        )),
                        Err(e) => {
                            self.note(format!("client {c}'s wait for {} failed: {e}", PORTS[i]))
                        }
                    }
                }
                Done::Release(i) => {
                    if self.trace {
                        self.note(format!("client {c}'s release of {}: {r:?}", PORTS[i]));
                    }
                }
            }
        }
        for ev in fx.events {
            match ev {
                ClientEvent::Acquired { port, token } => {
                    if self.clients[c].holding[port_index(&port)] == Some(token) {
                        self.stats.waiters_granted += 1;
                    }
                }
                ClientEvent::PortLost {
                    port,
                    token,
                    reason,
                } => {
                    let i = port_index(&port);
                    self.note(format!(
                        "client {c} lost {} (token {token}): {reason}",
                        PORTS[i]
                    ));
                    if self.clients[c].holding[i] == Some(token) {
                        self.clients[c].holding[i] = None;
                    }
                }
                ClientEvent::OwnershipLost { ports, reason } => {
                    self.note(format!(
                        "client {c} lost every port ({} held): {reason}",
                        ports.len()
                    ));
                }
                other => {
                    if self.trace {
                        self.note(format!("client {c} event {other:?}"));
                    }
                }
            }
        }
        if fx.ended {
            self.session_over(c);
        }
    }

    /// Client `c`'s session is over: its application forgets it, the connection goes,
    /// and a new session starts on the next connection.
    fn session_over(&mut self, c: usize) {
        let Some(s) = self.clients[c].session.take() else {
            return;
        };
        let why = match s.phase() {
            Phase::Lost(why) => {
                self.stats.sessions_lost += 1;
                why.clone()
            }
            other => format!("{other:?}"),
        };
        self.note(format!(
            "client {c} lost its session {} ({why})",
            s.info().id
        ));
        let cl = &mut self.clients[c];
        cl.waiting = [None; PORTS.len()];
        cl.holding = [None; PORTS.len()];
        self.disconnect(c, "the session is over", true);
    }

    /// Keeps a timer event at the session's next timeout.
    fn schedule(&mut self, c: usize) {
        let Some(t) = self.clients[c]
            .session
            .as_ref()
            .and_then(|s| s.next_timeout())
        else {
            return;
        };
        // Never sooner than the next millisecond, like the library's ticker: a core
        // whose next timeout did not move on would otherwise be called forever.
        let at = self.real_at(c, t).max(self.now + 1);
        if self.clients[c].timer_at.is_none_or(|x| at < x) {
            self.clients[c].timer_at = Some(at);
            self.push(at, CLIENT_TIMER + c);
        }
    }

    fn client_timer(&mut self, c: usize, at: u64) {
        if self.clients[c].timer_at == Some(at) {
            self.clients[c].timer_at = None;
        }
        let now = self.instant(c);
        let due = self.clients[c]
            .session
            .as_ref()
            .and_then(|s| s.next_timeout())
            .is_some_and(|t| now >= t);
        if due {
            self.drive(c, |s, w, now| s.handle_timeout(now, w));
        } else {
            self.schedule(c);
        }
    }

    /// Client `c`'s connection is gone (`hangup`: the client closes it). Its session
    /// is detached; the next connection goes to the next server after a short pause.
    fn disconnect(&mut self, c: usize, why: &str, hangup: bool) {
        let Some(conn) = self.clients[c].conn.take() else {
            return;
        };
        let server = self.clients[c].server;
        self.note(format!("client {c} leaves server {server}: {why}"));
        if hangup {
            self.send(SERVERS + c, server, Msg::Hangup { server, conn });
        }
        let pause = self.rng.u64(10..=250);
        let cl = &mut self.clients[c];
        cl.hello = None;
        cl.reclaims.clear();
        cl.server = (server + 1) % SERVERS;
        cl.retry_at_local = cl.clock.local(self.now) + pause;
        self.drive(c, |s, _, _| s.detached(why));
    }

    /// Opens a connection to the client's next server and sends HELLO (resuming its
    /// session if it has one).
    fn connect(&mut self, c: usize) {
        let local = self.clients[c].clock.local(self.now);
        let cl = &mut self.clients[c];
        cl.conn_gen += 1;
        let conn = (c as u64) << 32 | cl.conn_gen;
        cl.conn = Some(conn);
        cl.hello = Some(local);
        cl.next_id = HELLO_ID;
        cl.reclaims.clear();
        let (resume_session, resume_secret) = cl
            .session
            .as_ref()
            .map_or((0, 0), |s| (s.info().id, s.info().secret));
        let server = cl.server;
        let hello = Request::Hello(Hello {
            version_min: PROTOCOL_VERSION,
            version_max: PROTOCOL_VERSION,
            features: 0,
            lease_ms: LEASE_MS as u32,
            end_on_disconnect: false,
            node_name: b"sim",
            credentials: b"",
            resume_session,
            resume_secret,
        });
        let mut fb = FrameBuf::new(FRAME_BYTES_MAX, COMMANDS_PER_FRAME_MAX);
        fb.push_request(HELLO_ID, &hello);
        if self.trace {
            self.note(format!(
                "client {c} → server {server} #{HELLO_ID} {}",
                show_request(&hello)
            ));
        }
        let frames = frames_of(fb);
        self.send(
            SERVERS + c,
            server,
            Msg::ToServer {
                server,
                client: c,
                conn,
                frames,
            },
        );
    }

    /// Frames from the server on a connection of client `c`.
    fn on_client_frames(&mut self, c: usize, conn: ConnId, frames: Bytes) {
        for frame in each_frame(&frames) {
            for (opcode, id, body) in frame {
                if self.clients[c].conn != Some(conn) {
                    return;
                }
                let msg = match ServerMsg::decode(opcode, id, body) {
                    Ok(m) => m,
                    Err(e) => self.fail(format!(
                        "client {c} got a message that does not decode: {e}"
                    )),
                };
                if self.trace {
                    self.note(format!("client {c} ← {}", show_server_msg(&msg)));
                }
                self.on_server_msg(c, msg);
            }
        }
    }

    fn on_server_msg(&mut self, c: usize, msg: ServerMsg<'_>) {
        match msg {
            ServerMsg::Reply { id, reply } if self.clients[c].hello.is_some() => {
                if id != HELLO_ID {
                    self.fail(format!("client {c} got a reply to #{id} before HELLO_OK"));
                }
                self.on_hello_reply(c, reply);
            }
            ServerMsg::Reply { id, reply } => {
                if self.clients[c].session.is_none() {
                    self.fail(format!("client {c} got a reply to #{id} with no session"));
                }
                if let Some(token) = self.clients[c].reclaims.remove(&id) {
                    if reply == (Reply::Registered { token }) {
                        self.stats.reclaims_kept += 1;
                    }
                }
                if !matches!(reply, Reply::Error { .. }) {
                    self.clients[c].last_answer_real = self.now;
                }
                if let Some((Err(e), _)) =
                    self.drive(c, |s, w, now| s.handle_reply(id, &reply, now, w))
                {
                    self.fail(format!("client {c}: {e}"));
                }
            }
            ServerMsg::Event(Event::GoAway { code, message }) => {
                // As `direct.rs`: over if the server expired it; otherwise the session
                // resumes on a new connection.
                if code == ErrorCode::SessionExpired {
                    let why = format!("{code}: {}", String::from_utf8_lossy(message));
                    self.drive(c, |s, _, _| s.end(Phase::Lost(why)));
                }
                self.disconnect(c, "GOAWAY", false);
            }
            ServerMsg::Event(e) => {
                self.drive(c, |s, _, now| s.handle_event(&e, now));
            }
        }
    }

    /// The server's answer to HELLO: a new session, a resumed one, or try elsewhere.
    fn on_hello_reply(&mut self, c: usize, reply: Reply<'_>) {
        let sent_local = self.clients[c].hello.take().expect("HELLO in flight");
        let sent_at = self.base + Duration::from_millis(sent_local);
        let server = self.clients[c].server;
        match reply {
            Reply::HelloOk(h) => {
                self.clients[c].last_answer_real = self.now;
                match self.clients[c].session.as_ref().map(|s| s.info().epoch) {
                    None => {
                        let s = SessionCore::new(self.settings.clone(), &h, sent_at);
                        self.clients[c].session = Some(s);
                        self.note(format!(
                            "client {c} opens session {} on server {server}, epoch {}",
                            h.session, h.epoch
                        ));
                        self.schedule(c);
                    }
                    Some(epoch) if h.epoch < epoch => {
                        // An older master than one the session has seen: refused.
                        self.note(format!(
                            "client {c} refuses server {server}: epoch {} < {epoch}",
                            h.epoch
                        ));
                        self.disconnect(c, "an older epoch", true);
                    }
                    Some(epoch) => {
                        self.note(format!(
                            "client {c} resumes session {} on server {server}, epoch {} (was {epoch})",
                            h.session, h.epoch
                        ));
                        let queued = self.clients[c]
                            .session
                            .as_ref()
                            .map_or(Vec::new(), |s| s.queued_ports());
                        let (_, registers) = self
                            .drive(c, |s, w, now| s.resumed(&h, sent_at, now, w))
                            .expect("a session");
                        if h.epoch > epoch {
                            // Places in queues taken again on the new master.
                            self.stats.requeued += queued
                                .iter()
                                .filter(|p| registers.iter().any(|r| r[..] == p[..]))
                                .count() as u64;
                        }
                    }
                }
            }
            Reply::Error {
                code: ErrorCode::NotMaster | ErrorCode::Overloaded,
                ..
            } => self.disconnect(c, "not the master", true),
            Reply::Error { code, message, .. } => {
                let why = format!(
                    "resume refused: {code}: {}",
                    String::from_utf8_lossy(message)
                );
                self.drive(c, |s, _, _| s.end(Phase::Lost(why)));
                self.disconnect(c, "HELLO refused", true);
            }
            other => self.fail(format!("client {c} got {other:?} for HELLO")),
        }
    }

    /// Now and then the application asks for a lock, gives up waiting for one, or
    /// lets one go — connected or not, as an application does.
    fn app(&mut self, c: usize) {
        if self.clients[c].session.is_none() || self.rng.u64(0..1_000) >= 20 {
            return;
        }
        let i = self.rng.usize(0..PORTS.len());
        let port = PORTS[i].as_bytes();
        let (req, kind, done) = if self.clients[c].holding[i].is_some() {
            // Stop believing when asking to let go (as `Lock::release` does).
            self.clients[c].holding[i] = None;
            self.note(format!("client {c} lets go of {}", PORTS[i]));
            (
                Request::Unregister { port },
                Kind::unregister(port),
                Done::Release(i),
            )
        } else if self.clients[c].waiting[i].is_some() && self.rng.bool() {
            self.clients[c].waiting[i] = None;
            self.note(format!("client {c} leaves the queue of {}", PORTS[i]));
            (
                Request::Unregister { port },
                Kind::unregister(port),
                Done::Release(i),
            )
        } else if self.clients[c].waiting[i].is_none() {
            // A waiter waits: it does not ask again (that would hide a place in a
            // queue the master lost).
            self.clients[c].waiting[i] = Some(self.now);
            if self.trace {
                self.note(format!("client {c} waits for {}", PORTS[i]));
            }
            let req = Request::Register {
                port,
                value: b"",
                wait: true,
            };
            (
                req,
                Kind::register(port, Bytes::new(), true, true),
                Done::Wait(i, self.now),
            )
        } else {
            return;
        };
        if let Some((Err(e), _)) =
            self.drive(c, |s, w, now| s.submit(&req, kind, Some(done), now, w))
        {
            self.fail(format!("client {c}'s session refused a request: {e}"));
        }
    }

    fn client_tick(&mut self, c: usize) {
        let local = self.clients[c].clock.local(self.now);
        if self.clients[c].conn.is_none() {
            if local >= self.clients[c].retry_at_local {
                self.connect(c);
            }
        } else if let Some(sent) = self.clients[c].hello {
            if local >= sent + self.answer_timeout_ms {
                self.disconnect(c, "no answer to HELLO", true);
            }
        } else {
            // A connection whose oldest request has gone unanswered too long is dead
            // (`direct.rs`'s ticker).
            let now = self.instant(c);
            let timeout = Duration::from_millis(self.answer_timeout_ms);
            let stuck = self.clients[c].session.as_ref().is_some_and(|s| {
                s.oldest_unanswered()
                    .is_some_and(|t| now.saturating_duration_since(t) >= timeout)
            });
            if stuck {
                self.disconnect(c, "no answer within the answer timeout", true);
            }
        }
        self.app(c);
        self.check_waiters(c);
    }

    /// After every event that gave client `c`'s session an input (nothing else can
    /// make a client believe anything: meanwhile beliefs only run out): no other
    /// client believes it owns a port `c` believes it owns, and a port's tokens rise in
    /// the order clients come to believe them.
    fn check_beliefs(&mut self, c: usize) {
        let mut believed = [None; PORTS.len()];
        let mut until = 0;
        let holds = self.clients[c].holding.iter().any(Option::is_some);
        if let Some(s) = self.clients[c].session.as_ref().filter(|_| holds) {
            until = self.real_at(c, s.view_end());
            if self.now < until {
                for (i, b) in believed.iter_mut().enumerate() {
                    if let Some(t) = self.clients[c].holding[i] {
                        if s.owns(PORTS[i].as_bytes(), t) {
                            *b = Some(t);
                        }
                    }
                }
            }
        }
        let cl = &self.clients[c];
        let before = |i: usize| cl.belief[i].filter(|_| self.now < cl.belief_until);
        let new: Vec<(usize, u64)> = (0..PORTS.len())
            .filter_map(|i| {
                believed[i]
                    .filter(|&t| before(i) != Some(t))
                    .map(|t| (i, t))
            })
            .collect();
        let cl = &mut self.clients[c];
        cl.belief = believed;
        cl.belief_until = until;
        for (i, token) in new {
            for other in (0..CLIENTS).filter(|&o| o != c) {
                let o = &self.clients[other];
                if let Some(t) = o.belief[i].filter(|_| self.now < o.belief_until) {
                    self.fail(format!(
                        "client {c} holds {} (token {token}) while client {other} still does (token {t}, view ends at real {})",
                        PORTS[i], o.belief_until
                    ));
                }
            }
            self.check_grant(c, i, token);
        }
    }

    /// Client `c` has come to believe it owns port `i` with `token`: the token must be
    /// above every token believed before.
    fn check_grant(&mut self, c: usize, i: usize, token: u64) {
        self.note(format!("client {c} holds {} token {token}", PORTS[i]));
        // The same grant may be believed again by its owner (a lease view that ran
        // out and came back with a late answer); any other must carry a higher token.
        let (last, by) = self.believed[i];
        if token < last || (token == last && by != c) {
            self.fail(format!(
                "client {c} believes {} with token {token}; client {by} believed it with {last} before",
                PORTS[i]
            ));
        }
        self.believed[i] = (token, c);
        self.stats.grants_believed += 1;
    }

    /// After the faults stop: a port master `s` has owned by one session (and
    /// token) for longer than a lease (the longest a session the client gave up on can
    /// last) plus [`STARVE_MS`] is held by that session's application. A port owned by
    /// a session whose application does not know it holds it (a leak) would starve its
    /// waiters for as long as the session lives.
    fn check_leaks(&mut self, s: usize) {
        if self.faults || self.now < FAULT_MS + SETTLE_MS {
            return;
        }
        if self.servers[s].core.is_none() {
            return;
        }
        for (i, p) in PORTS.iter().enumerate() {
            let core = self.servers[s].core.as_ref().expect("checked");
            let Lookup::Owned { session, token } = core.lookup(p.as_bytes()) else {
                self.leaking[i] = None;
                continue;
            };
            let held = self.clients.iter().any(|cl| {
                cl.holding[i] == Some(token)
                    && cl.session.as_ref().is_some_and(|s| s.info().id == session)
            });
            if held {
                self.leaking[i] = None;
                continue;
            }
            let (since, counted) = match self.leaking[i] {
                Some((sid, t, since, counted)) if sid == session && t == token => (since, counted),
                _ => {
                    self.leaking[i] = Some((session, token, self.now, false));
                    (self.now, false)
                }
            };
            if self.now >= since + LEASE_MS + STARVE_MS && !counted {
                let holders: Vec<String> = (0..CLIENTS)
                    .map(|c| {
                        let cl = &self.clients[c];
                        format!(
                            "client {c}: session {:?}, holds {:?}",
                            cl.session.as_ref().map(|s| s.info().id),
                            cl.holding[i]
                        )
                    })
                    .collect();
                let what = format!(
                    "master {s} has had {p} owned by session {session} (token {token}) since {since} ms, and no client's application holds it ({})",
                    holders.join("; ")
                );
                if self.leaks_fail {
                    self.fail(what);
                }
                self.note(format!("leak: {what}"));
                self.stats.leaks += 1;
                self.leaking[i] = Some((session, token, since, true));
            }
        }
    }

    /// After the faults stop: a port client `c` waits for must have `c` in the
    /// master's queue (or as its owner, the grant on its way); a waiter the master
    /// lost track of would wait forever.
    fn check_waiters(&mut self, c: usize) {
        if self.faults || self.now < FAULT_MS + SETTLE_MS {
            return;
        }
        let Some(master) = (0..SERVERS).find(|&s| {
            matches!(&self.servers[s].role, Role::Leader(l) if l.serving)
                && self.servers[s].core.is_some()
        }) else {
            return;
        };
        let Some(sid) = self.clients[c].session.as_ref().map(|s| s.info().id) else {
            return;
        };
        for (i, p) in PORTS.iter().enumerate() {
            let Some(since) = self.clients[c].waiting[i].filter(|&t| self.now >= t + STARVE_MS)
            else {
                self.starving[c][i] = None;
                continue;
            };
            let core = self.servers[master].core.as_ref().expect("checked");
            let known = matches!(core.lookup(p.as_bytes()), Lookup::Owned { session, .. } if session == sid)
                || core.waiting(p.as_bytes()).contains(&sid);
            if known {
                self.starving[c][i] = None;
                continue;
            }
            let first = *self.starving[c][i].get_or_insert(self.now);
            if self.now >= first + STARVE_MS {
                self.fail(format!(
                    "client {c} has waited for {p} since {since} ms; master {master} has not had it in the queue since {first} ms ({:?})",
                    core.lookup(p.as_bytes())
                ));
            }
        }
    }

    // ------------------------------------------------------------ faults

    fn fault(&mut self) {
        if !self.faults {
            return;
        }
        let r = self.rng.u64(0..100);
        let s = self.rng.usize(0..SERVERS);
        let master = (0..SERVERS).find(|&i| self.servers[i].core.is_some());
        match r {
            0..=14 => self.crash(s),
            15..=34 => self.restart(s),
            35..=44 => {
                // Cut a server off from the other servers only (clients still reach it).
                let target = master.unwrap_or(s);
                for o in 0..SERVERS {
                    if o != target {
                        self.cut.insert((o.min(target), o.max(target)));
                    }
                }
                self.note(format!("server {target} cut off from the other servers"));
            }
            45..=54 => {
                // Cut a client off from everything.
                let c = self.rng.usize(0..CLIENTS);
                for s in 0..SERVERS {
                    self.cut.insert((s, SERVERS + c));
                }
                self.note(format!("client {c} cut off"));
            }
            55..=74 => {
                self.cut.clear();
                self.note("links healed".into());
            }
            75..=84 => {
                self.loss_pm = self.rng.u64(0..=200);
                self.delay_max = self.rng.u64(1..=60);
                self.note(format!(
                    "loss {}‰ delay ≤{} ms",
                    self.loss_pm, self.delay_max
                ));
            }
            _ => {}
        }
    }

    fn heal(&mut self) {
        self.faults = false;
        self.cut.clear();
        self.loss_pm = 0;
        self.delay_max = 5;
        for s in 0..SERVERS {
            self.restart(s);
        }
        self.note("faults stop".into());
    }

    // ------------------------------------------------------------ the loop

    fn run(&mut self) {
        for s in 0..SERVERS {
            let at = self.rng.u64(0..TICK_MS);
            self.push(at, SERVER_TICK + s);
        }
        for c in 0..CLIENTS {
            let at = self.rng.u64(0..TICK_MS);
            self.push(at, CLIENT_TICK + c);
        }
        let at = self.rng.u64(200..1_500);
        self.push(at, FAULT);
        self.push(FAULT_MS, HEAL);
        let end = FAULT_MS + HEAL_MS;
        while let Some(Reverse((at, _, kind))) = self.queue.pop() {
            if at > end {
                break;
            }
            self.now = at;
            // The client this event reached, if any.
            let client = match kind {
                k if k < CLIENT_TICK => {
                    self.server_tick(k);
                    self.push(at + TICK_MS, k);
                    None
                }
                k if k < CLIENT_TIMER => {
                    self.client_tick(k - CLIENT_TICK);
                    self.push(at + TICK_MS, k);
                    Some(k - CLIENT_TICK)
                }
                k if k < FAULT => {
                    self.client_timer(k - CLIENT_TIMER, at);
                    Some(k - CLIENT_TIMER)
                }
                FAULT => {
                    self.fault();
                    if self.faults {
                        let next = at + self.rng.u64(200..2_500);
                        self.push(next, FAULT);
                    }
                    None
                }
                HEAL => {
                    self.heal();
                    None
                }
                k => {
                    let m = self.msgs.remove(&(k - MESSAGE)).expect("queued message");
                    match m {
                        Msg::Peer { to, m } => {
                            self.on_peer(to, m);
                            None
                        }
                        Msg::ToServer {
                            server,
                            client,
                            conn,
                            frames,
                        } => {
                            self.on_frames(server, client, conn, frames);
                            None
                        }
                        Msg::ToClient {
                            client,
                            conn,
                            frames,
                        } => {
                            self.on_client_frames(client, conn, frames);
                            Some(client)
                        }
                        Msg::Closed { client, conn } => {
                            if self.clients[client].conn == Some(conn) {
                                self.disconnect(client, "closed by the server", false);
                            }
                            Some(client)
                        }
                        Msg::Hangup { server, conn } => {
                            self.on_hangup(server, conn);
                            None
                        }
                    }
                }
            };
            if let Some(c) = client.filter(|&c| self.clients[c].dirty) {
                self.clients[c].dirty = false;
                self.check_beliefs(c);
            }
        }
        // Liveness: after the faults stopped, every client got service again (the
        // bound covers an election, the wait, and a client starting over).
        for c in 0..CLIENTS {
            let last = self.clients[c].last_answer_real;
            if last < end - 3_000 {
                self.fail(format!(
                    "client {c} got no service after the faults stopped (last answer at {last} ms)"
                ));
            }
        }
    }
}

/// Kinds of scheduled things: timers below, messages from [`MESSAGE`] on.
const SERVER_TICK: usize = 0;
const CLIENT_TICK: usize = 100;
const CLIENT_TIMER: usize = 150;
const FAULT: usize = 200;
const HEAL: usize = 201;
const MESSAGE: usize = 1_000;

fn run_seed(seed: u64, trace: bool, answer_timeout_ms: u64) -> Counts {
    let mut w = World::new(seed, answer_timeout_ms);
    w.trace = trace;
    w.leaks_fail = std::env::var("PORTSWITCH_SIM_LEAKS").map_or(true, |v| v != "count");
    w.run();
    w.stats
}

#[test]
fn simulated_groups_keep_ownership_exclusive_tokens_rising_and_clients_served() {
    // The client library's answer timeout for the sessions' lease (a sixth of it).
    let answer_timeout_ms = ClientOptions::new("sim")
        .answer_timeout_for(LEASE_MS as u32)
        .as_millis() as u64;
    if let Ok(seed) = std::env::var("PORTSWITCH_SIM_SEED") {
        let seed: u64 = seed.parse().expect("PORTSWITCH_SIM_SEED is a number");
        println!("{:?}", run_seed(seed, true, answer_timeout_ms));
        return;
    }
    let n: u64 = std::env::var("PORTSWITCH_SIM_SEEDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(300);
    // Seeds vary between runs (a fixed base would test the same 300 every time), and
    // every failure prints the seed that reproduces it.
    let base = std::env::var("PORTSWITCH_SIM_BASE")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs())
                * 1_000_000
        });
    println!("simulating seeds {base}..{}", base + n);
    let mut total = Counts::default();
    let mut leaky = Vec::new();
    for seed in base..base + n {
        let counts = run_seed(seed, false, answer_timeout_ms);
        if counts.leaks > 0 {
            leaky.push(seed);
        }
        total += counts;
    }
    println!("{n} seeds: {total:?}");
    if !leaky.is_empty() {
        // Only with PORTSWITCH_SIM_LEAKS=count (otherwise a leak fails its seed).
        println!("seeds that leaked a port (PORTSWITCH_SIM_SEED=S to trace): {leaky:?}");
    }
    // The faults must have made the group fail over, clients keep ports across it,
    // and waiters took their places again and were granted.
    assert!(total.masters_with_window > 0 && total.reclaims_kept > 0 && total.crashes > 0);
    assert!(total.requeued > 0 && total.waiters_granted > 0, "{total:?}");
}
