//! Deterministic simulation of a whole group plus clients.
//!
//! Three servers and four clients exchange messages through a simulated network with
//! delay, loss and partitions (including a master cut off from the other servers but
//! still reachable by its clients); servers crash (losing everything but their
//! durable election state and group facts) and restart; every clock runs at its own
//! rate within the configured drift margin. Time is discrete and every choice comes
//! from one seeded generator, so a seed replays exactly.
//!
//! What is real and what is modelled: each server runs the real `portswitch-core`
//! (sessions, leases, ports, tokens, adoption, RECLAIM, the recovery window) and the
//! real master-lease arithmetic (`MasterLease`). Raft is modelled by what openraft
//! guarantees and our use of it relies on — one leader per term, durable votes,
//! quorum intersection, a new leader holding every committed write, heartbeats
//! acknowledged against their send time — not by openraft itself (it cannot be run
//! deterministically). Clients follow the client library's rules: the lease view from
//! the send time of the last answered request less a 10% margin, resume on any server,
//! reclaim with tokens on a higher epoch, refuse a lower epoch, give up when the view
//! runs out; every REGISTER waits in the port's queue, and a client keeps its places
//! in queues across a failover (re-queued on a new master, a REGISTER cut short by a
//! lost connection sent again), as the library does.
//!
//! Invariants checked on every run:
//! - never two clients whose lease views of the same port overlap in time;
//! - the tokens of a port, in the order owners come to believe in them, only increase;
//! - after the faults stop, every client gets service again;
//! - after the faults stop, every client that waits for a port is in the master's
//!   queue for it (or owns it) within [`STARVE_MS`]: a waiter the master lost track
//!   of would wait forever.
//!
//! `PORTSWITCH_SIM_SEEDS=N` runs N seeds (default 300); `PORTSWITCH_SIM_SEED=S` runs
//! seed S alone, printing its trace.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, BinaryHeap, HashMap};

use portswitch_cluster::MasterLease;
use portswitch_core::{Config, ConnId, Core, Lookup, Outbox};
use portswitch_proto::{ErrorCode, Event, Hello, Reply, Request};

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
const ANSWER_TIMEOUT_MS: u64 = 1_000;
/// Simulated time with faults, then with none.
const FAULT_MS: u64 = 15_000;
const HEAL_MS: u64 = 15_000;
/// After the faults stop, when waiters must be served: a new master's election,
/// its wait, its recovery window (2 s leases) and clients finding it.
const SETTLE_MS: u64 = 6_000;
/// How long a client may believe it waits for a port while the master does not have
/// it in the queue (message delays after the faults stop are a few ms).
const STARVE_MS: u64 = 1_000;

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

/// Owned requests a client sends.
#[derive(Debug, Clone)]
enum Req {
    Hello { resume: Option<(u64, u64)> },
    Ping,
    Register(&'static str),
    Unregister(&'static str),
    Reclaim(&'static str, u64),
}

/// Owned replies and events a client receives.
#[derive(Debug, Clone)]
enum Resp {
    HelloOk {
        session: u64,
        secret: u64,
        epoch: u64,
        recovery_ms: u64,
    },
    Registered(u64),
    Queued,
    Ok,
    Other,
    Err(ErrorCode),
}

#[derive(Debug, Clone)]
enum Msg {
    Peer {
        to: usize,
        m: Peer,
    },
    ToServer {
        server: usize,
        client: usize,
        conn: ConnId,
        id: u32,
        req: Req,
    },
    ToClient {
        client: usize,
        conn: ConnId,
        id: u32,
        resp: Resp,
    },
    Acquired {
        client: usize,
        conn: ConnId,
        port: String,
        token: u64,
    },
    /// The connection is gone (RST of a killed server, GOAWAY, refused connect).
    Closed {
        client: usize,
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

/// One thing a core emitted for a connection: a reply (with its request id), or an
/// ACQUIRED (port, token).
type Emitted = (ConnId, Option<u32>, Resp, Option<(String, u64)>);

struct Rec {
    out: Vec<Emitted>,
    closed: Vec<ConnId>,
}

impl Outbox for Rec {
    fn reply(&mut self, conn: ConnId, id: u32, r: &Reply<'_>) {
        let resp = match *r {
            Reply::HelloOk(h) => Resp::HelloOk {
                session: h.session,
                secret: h.secret,
                epoch: h.epoch,
                recovery_ms: h.recovery_ms as u64,
            },
            Reply::Registered { token } => Resp::Registered(token),
            Reply::Queued { .. } => Resp::Queued,
            Reply::Ok => Resp::Ok,
            Reply::Error { code, .. } => Resp::Err(code),
            _ => Resp::Other,
        };
        self.out.push((conn, Some(id), resp, None));
    }
    fn event(&mut self, conn: ConnId, e: &Event<'_>) {
        if let Event::Acquired { port, token } = e {
            let p = String::from_utf8_lossy(port).into_owned();
            self.out.push((conn, None, Resp::Other, Some((p, *token))));
        }
    }
    fn frames(&mut self, conn: ConnId, frames: &[u8]) {
        // Buffered events of a resumed session: only ACQUIRED matters here.
        let mut rest = frames;
        while let Ok(Some(n)) = portswitch_proto::frame::frame_len(rest, usize::MAX) {
            for m in portswitch_proto::frame::messages(&rest[4..n], usize::MAX).flatten() {
                if let Ok(portswitch_proto::ServerMsg::Event(e)) =
                    portswitch_proto::ServerMsg::decode(m.opcode, m.id, m.body)
                {
                    self.event(conn, &e);
                }
            }
            rest = &rest[n..];
        }
    }
    fn close(&mut self, conn: ConnId) {
        self.closed.push(conn);
    }
}

// ---------------------------------------------------------------- clients

struct Client {
    clock: Clock,
    server: usize,
    conn: Option<ConnId>,
    conn_gen: u64,
    handshaking: Option<u64>,
    session: Option<(u64, u64)>,
    max_epoch: u64,
    view_end_local: u64,
    owned: BTreeMap<&'static str, u64>,
    /// Owned ports not yet reclaimed on the current master, and when the client must
    /// give them up (the earliest the master's recovery window can close).
    unconfirmed: BTreeMap<&'static str, u64>,
    pending: BTreeMap<u32, (u64, Req)>,
    /// Ports with an UNREGISTER in flight, by its request id (as the client library).
    letting_go: BTreeMap<&'static str, u32>,
    /// Ports whose queue this client is in (QUEUED answered), and since when (real).
    queued: BTreeMap<&'static str, u64>,
    /// REGISTERs cut short by a lost connection: sent again on the next one.
    resend: BTreeSet<&'static str>,
    next_id: u32,
    next_ping_local: u64,
    retry_at_local: u64,
    last_answer_real: u64,
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
    faults: bool,
    /// Per port: the highest token some client has believed in, and which client.
    believed: HashMap<&'static str, (u64, usize)>,
    /// (client, port) a waiter was first seen waiting while the master had the port
    /// free, and when.
    starving: HashMap<(usize, &'static str), u64>,
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
    }
}

fn quorum() -> usize {
    SERVERS / 2 + 1
}

impl World {
    fn new(seed: u64) -> World {
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
                handshaking: None,
                session: None,
                max_epoch: 0,
                view_end_local: 0,
                owned: BTreeMap::new(),
                unconfirmed: BTreeMap::new(),
                pending: BTreeMap::new(),
                letting_go: BTreeMap::new(),
                queued: BTreeMap::new(),
                resend: BTreeSet::new(),
                next_id: 0,
                next_ping_local: 0,
                retry_at_local: 0,
                last_answer_real: 0,
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
            faults: true,
            believed: HashMap::new(),
            starving: HashMap::new(),
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
        let (a, b) = (from.min(to), from.max(to));
        if self.cut.contains(&(a, b)) || (self.faults && self.rng.u64(0..1_000) < self.loss_pm) {
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
        self.push(at, 1_000 + k);
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
        for (conn, id, resp, acquired) in rec.out {
            let Some(&client) = self.servers[s].conns.get(&conn) else {
                continue;
            };
            let m = match (id, acquired) {
                (_, Some((port, token))) => Msg::Acquired {
                    client,
                    conn,
                    port,
                    token,
                },
                (Some(id), None) => Msg::ToClient {
                    client,
                    conn,
                    id,
                    resp,
                },
                (None, None) => continue,
            };
            self.send(s, SERVERS + client, m);
        }
        for conn in rec.closed {
            if let Some(client) = self.servers[s].conns.remove(&conn) {
                self.send(s, SERVERS + client, Msg::Closed { client, conn });
            }
        }
    }

    fn on_request(&mut self, s: usize, client: usize, conn: ConnId, id: u32, req: Req) {
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
        // A connection the server closed (a deposed core's) carries nothing more, as
        // with TCP: only a new connection's HELLO starts one.
        if !self.servers[s].conns.contains_key(&conn) && !matches!(req, Req::Hello { .. }) {
            self.send(s, SERVERS + client, Msg::Closed { client, conn });
            return;
        }
        if self.servers[s].core.is_none() {
            let resp = Resp::Err(ErrorCode::NotMaster);
            self.send(
                s,
                SERVERS + client,
                Msg::ToClient {
                    client,
                    conn,
                    id,
                    resp,
                },
            );
            return;
        }
        self.servers[s].conns.insert(conn, client);
        let core = self.servers[s].core.as_mut().expect("checked");
        let mut rec = Rec {
            out: Vec::new(),
            closed: Vec::new(),
        };
        let mut b = core.begin_batch(conn, local);
        let hello;
        let request = match &req {
            Req::Hello { resume } => {
                let (rs, rk) = resume.unwrap_or((0, 0));
                hello = Hello {
                    version_min: 1,
                    version_max: 1,
                    features: 0,
                    lease_ms: LEASE_MS as u32,
                    end_on_disconnect: false,
                    node_name: b"c",
                    credentials: b"",
                    resume_session: rs,
                    resume_secret: rk,
                };
                Request::Hello(hello)
            }
            Req::Ping => Request::Ping,
            Req::Register(p) => Request::Register {
                port: p.as_bytes(),
                value: b"",
                wait: true,
            },
            Req::Unregister(p) => Request::Unregister { port: p.as_bytes() },
            Req::Reclaim(p, t) => Request::Reclaim {
                port: p.as_bytes(),
                token: *t,
                value: b"",
            },
        };
        core.handle(&mut b, id, &request, &mut rec);
        self.emit(s, rec);
    }

    // ------------------------------------------------------------ clients

    fn client_send(&mut self, c: usize, req: Req) {
        let cl = &mut self.clients[c];
        let Some(conn) = cl.conn else { return };
        cl.next_id += 1;
        let id = cl.next_id;
        if let Req::Unregister(p) = req {
            cl.letting_go.insert(p, id);
            cl.queued.remove(p);
            cl.resend.remove(p);
        }
        let local = cl.clock.local(self.now);
        cl.pending.insert(id, (local, req.clone()));
        let server = cl.server;
        self.send(
            SERVERS + c,
            server,
            Msg::ToServer {
                server,
                client: c,
                conn,
                id,
                req,
            },
        );
    }

    /// Whether client `c` believes it owns `port` right now.
    fn believes(&self, c: usize, port: &str) -> bool {
        let cl = &self.clients[c];
        let local = cl.clock.local(self.now);
        cl.owned.contains_key(port)
            && local < cl.view_end_local
            && cl.unconfirmed.get(port).is_none_or(|&d| local < d)
    }

    /// Client `c` has come to believe it owns `port` with `token`: nobody else may
    /// believe so now, and the token must be above every token believed before.
    fn check_grant(&mut self, c: usize, port: &'static str, token: u64) {
        self.note(format!("client {c} holds {port} token {token}"));
        for other in 0..CLIENTS {
            if other != c && self.believes(other, port) {
                let o = &self.clients[other];
                self.fail(format!(
                    "client {c} got {port} (token {token}) while client {other} still holds it (token {}, view ends at real {})",
                    o.owned[port],
                    o.clock.real(o.view_end_local)
                ));
            }
        }
        // The same grant may be believed again by its owner (say, an UNREGISTER that
        // was lost, then REGISTER answering with the grant's token); any other must
        // carry a higher token.
        let (last, by) = self.believed.get(port).copied().unwrap_or((0, usize::MAX));
        if token < last || (token == last && by != c) {
            self.fail(format!(
                "client {c} believes {port} with token {token}; client {by} believed it with {last} before"
            ));
        }
        self.believed.insert(port, (token, c));
        self.stats.grants_believed += 1;
    }

    fn lose_session(&mut self, c: usize, why: &str) {
        let cl = &mut self.clients[c];
        if cl.session.is_some() {
            let n = cl.owned.len();
            cl.session = None;
            cl.owned.clear();
            cl.unconfirmed.clear();
            cl.queued.clear();
            cl.resend.clear();
            self.stats.sessions_lost += 1;
            self.note(format!("client {c} lost its session ({why}; {n} ports)"));
            // Like the client library: a lost session's requests fail; the
            // application starts a new session on a new connection.
            self.disconnect(c);
        }
    }

    fn disconnect(&mut self, c: usize) {
        let cl = &mut self.clients[c];
        cl.conn = None;
        cl.handshaking = None;
        // A wait cut short by the lost connection is sent again on the next one.
        if cl.session.is_some() {
            let cut: Vec<&'static str> = cl
                .pending
                .values()
                .filter_map(|(_, r)| match r {
                    Req::Register(p) => Some(*p),
                    _ => None,
                })
                .collect();
            cl.resend.extend(cut);
        }
        cl.pending.clear();
        cl.letting_go.clear();
        cl.server = (cl.server + 1) % SERVERS;
        cl.retry_at_local = cl.clock.local(self.now) + self.rng.u64(10..=250);
    }

    fn connect(&mut self, c: usize) {
        let cl = &mut self.clients[c];
        cl.conn_gen += 1;
        let conn = (c as u64) << 32 | cl.conn_gen;
        cl.conn = Some(conn);
        cl.handshaking = Some(cl.clock.local(self.now));
        let resume = cl.session;
        self.client_send(c, Req::Hello { resume });
    }

    fn client_tick(&mut self, c: usize) {
        let local = self.clients[c].clock.local(self.now);
        if self.clients[c].session.is_some() && local >= self.clients[c].view_end_local {
            self.lose_session(c, "lease view ran out");
        }
        // A port not reclaimed before the new master's window may close is lost.
        let late: Vec<&'static str> = self.clients[c]
            .unconfirmed
            .iter()
            .filter(|(_, &d)| local >= d)
            .map(|(p, _)| *p)
            .collect();
        for p in late {
            self.clients[c].unconfirmed.remove(p);
            self.clients[c].owned.remove(p);
            self.note(format!("client {c} gives up {p}: not reclaimed in time"));
        }
        if self.clients[c].conn.is_none() {
            if local >= self.clients[c].retry_at_local {
                self.connect(c);
            }
            return;
        }
        // A connection whose oldest request has gone unanswered too long is dead.
        let oldest = self.clients[c].pending.values().map(|(t, _)| *t).min();
        if oldest.is_some_and(|t| local >= t + ANSWER_TIMEOUT_MS) {
            self.note(format!(
                "client {c}: no answer from server {}",
                self.clients[c].server
            ));
            self.disconnect(c);
            return;
        }
        if self.clients[c].handshaking.is_some() || self.clients[c].session.is_none() {
            return;
        }
        if local >= self.clients[c].next_ping_local {
            self.clients[c].next_ping_local = local + LEASE_MS / 3;
            self.client_send(c, Req::Ping);
        }
        // Now and then: take a port (waiting in its queue), or let one go.
        if self.rng.u64(0..1_000) < 20 {
            let port = PORTS[self.rng.usize(0..PORTS.len())];
            if self.clients[c].owned.contains_key(port) {
                // Stop believing when asking to let go (the safe side).
                self.clients[c].owned.remove(port);
                self.clients[c].unconfirmed.remove(port);
                self.note(format!("client {c} lets go of {port}"));
                self.client_send(c, Req::Unregister(port));
            } else if self.clients[c].queued.contains_key(port) && self.rng.bool() {
                self.note(format!("client {c} leaves the queue of {port}"));
                self.client_send(c, Req::Unregister(port));
            } else if !self.clients[c].queued.contains_key(port)
                && !self.clients[c]
                    .pending
                    .values()
                    .any(|(_, r)| matches!(r, Req::Register(p) if *p == port))
            {
                // A waiter waits: it does not ask again (that would hide a place in a
                // queue the master lost).
                self.client_send(c, Req::Register(port));
            }
        }
        self.check_waiters(c);
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
        let waiting: Vec<(&'static str, u64)> = self.clients[c]
            .queued
            .iter()
            .map(|(p, since)| (*p, *since))
            .collect();
        let Some((sid, _)) = self.clients[c].session else {
            return;
        };
        for (p, since) in waiting {
            let core = self.servers[master].core.as_ref().expect("checked");
            let known = core.waiting(p.as_bytes()).contains(&sid)
                || matches!(core.lookup(p.as_bytes()), Lookup::Owned { session, .. } if session == sid);
            if known || self.now < since + STARVE_MS {
                self.starving.remove(&(c, p));
                continue;
            }
            let first = *self.starving.entry((c, p)).or_insert(self.now);
            if self.now >= first + STARVE_MS {
                self.fail(format!(
                    "client {c} has waited for {p} since {since} ms; master {master} has not had it in the queue since {first} ms ({:?})",
                    core.lookup(p.as_bytes())
                ));
            }
        }
    }

    fn on_client_msg(&mut self, m: Msg) {
        match m {
            Msg::Closed { client, conn } => {
                if self.clients[client].conn == Some(conn) {
                    self.disconnect(client);
                }
            }
            Msg::Acquired {
                client,
                conn,
                port,
                token,
            } => {
                if self.clients[client].conn != Some(conn) || self.clients[client].session.is_none()
                {
                    return;
                }
                let port = PORTS
                    .iter()
                    .copied()
                    .find(|p| *p == port)
                    .expect("known port");
                if self.clients[client].letting_go.contains_key(port) {
                    return;
                }
                self.clients[client].queued.remove(port);
                self.clients[client].resend.remove(port);
                if self.clients[client].owned.insert(port, token) == Some(token) {
                    return;
                }
                if self.believes(client, port) {
                    self.check_grant(client, port, token);
                    self.stats.waiters_granted += 1;
                }
            }
            Msg::ToClient {
                client,
                conn,
                id,
                resp,
            } => {
                if self.clients[client].conn != Some(conn) {
                    return;
                }
                let Some((sent, req)) = self.clients[client].pending.remove(&id) else {
                    return;
                };
                if let Req::Unregister(p) = req {
                    if self.clients[client].letting_go.get(p) == Some(&id) {
                        self.clients[client].letting_go.remove(p);
                    }
                }
                self.on_reply(client, id, sent, req, resp);
            }
            _ => unreachable!(),
        }
    }

    fn on_reply(&mut self, c: usize, id: u32, sent: u64, req: Req, resp: Resp) {
        let extend = |w: &mut World| {
            let cl = &mut w.clients[c];
            let end = sent + (LEASE_MS as f64 * (1.0 - CLIENT_MARGIN)) as u64;
            cl.view_end_local = cl.view_end_local.max(end);
            cl.last_answer_real = w.now;
            // A late answer can make an expired view valid again: that must not
            // overlap anyone else's view either.
            let owned: Vec<&'static str> = w.clients[c].owned.keys().copied().collect();
            for p in owned {
                if w.believes(c, p) {
                    for other in 0..CLIENTS {
                        if other != c && w.believes(other, p) {
                            w.fail(format!("clients {c} and {other} both hold {p}"));
                        }
                    }
                }
            }
        };
        match (req, resp) {
            (
                Req::Hello { resume },
                Resp::HelloOk {
                    session,
                    secret,
                    epoch,
                    recovery_ms,
                },
            ) => {
                if epoch < self.clients[c].max_epoch {
                    // An older master than one already seen: refuse it.
                    self.note(format!("client {c} refuses epoch {epoch}"));
                    self.disconnect(c);
                    return;
                }
                let new_master = resume.is_some() && epoch > self.clients[c].max_epoch;
                let cl = &mut self.clients[c];
                cl.max_epoch = epoch;
                cl.handshaking = None;
                if resume.is_none() {
                    cl.owned.clear();
                    cl.unconfirmed.clear();
                    cl.queued.clear();
                    cl.resend.clear();
                    cl.view_end_local = 0;
                }
                if new_master {
                    // Every port must be reclaimed before the window can close.
                    let deadline = sent + (recovery_ms as f64 * (1.0 - CLIENT_MARGIN)) as u64;
                    let ports: Vec<&'static str> = cl.owned.keys().copied().collect();
                    for p in ports {
                        cl.unconfirmed.insert(p, deadline);
                    }
                }
                cl.session = Some((session, secret));
                extend(self);
                self.note(format!(
                    "client {c} on server {} epoch {epoch} (resumed {})",
                    self.clients[c].server,
                    resume.is_some()
                ));
                // Reclaim what is not yet confirmed on this master — also after a
                // resume on the same master that interrupted an earlier reclaim.
                let todo: Vec<_> = self.clients[c]
                    .unconfirmed
                    .keys()
                    .filter_map(|p| self.clients[c].owned.get(p).map(|t| (*p, *t)))
                    .collect();
                for (p, t) in todo {
                    self.client_send(c, Req::Reclaim(p, t));
                }
                // Places in queues: taken again on a new master (the old one's queues
                // are gone), and waits cut short by the lost connection sent again.
                let mut again: BTreeSet<&'static str> = std::mem::take(&mut self.clients[c].resend);
                if new_master {
                    let queued: Vec<&'static str> =
                        self.clients[c].queued.keys().copied().collect();
                    self.stats.requeued += queued.len() as u64;
                    again.extend(queued);
                }
                for p in again {
                    if !self.clients[c].owned.contains_key(p) {
                        self.client_send(c, Req::Register(p));
                    }
                }
            }
            (Req::Hello { .. }, Resp::Err(ErrorCode::NotMaster)) => self.disconnect(c),
            (Req::Hello { .. }, Resp::Err(code)) => {
                self.lose_session(c, &format!("resume refused: {code}"));
                self.clients[c].handshaking = None;
                self.disconnect(c);
            }
            (_, Resp::Err(ErrorCode::NotMaster)) => self.disconnect(c),
            (Req::Register(p), Resp::Registered(_))
                if self.clients[c].letting_go.get(p).is_some_and(|&u| u > id) =>
            {
                extend(self);
            }
            (Req::Register(p), Resp::Queued) => {
                extend(self);
                if self.clients[c].letting_go.get(p).is_none_or(|&u| u <= id) {
                    let now = self.now;
                    self.clients[c].queued.entry(p).or_insert(now);
                }
            }
            (Req::Register(p), Resp::Registered(token)) => {
                extend(self);
                self.clients[c].queued.remove(p);
                // Asking again for a port already granted answers with its token: the
                // same grant, not a new one.
                if self.clients[c].owned.insert(p, token) == Some(token) {
                    return;
                }
                if self.believes(c, p) {
                    self.check_grant(c, p, token);
                }
            }
            (Req::Reclaim(p, t), resp) => {
                extend(self);
                match resp {
                    Resp::Registered(token) if token == t => {
                        self.clients[c].unconfirmed.remove(p);
                        self.stats.reclaims_kept += 1;
                    }
                    other => {
                        self.clients[c].unconfirmed.remove(p);
                        if self.clients[c].owned.remove(p).is_some() {
                            self.note(format!("client {c} lost {p} on reclaim: {other:?}"));
                        }
                    }
                }
            }
            (_, _) => extend(self),
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
        const SERVER_TICK: usize = 0;
        const CLIENT_TICK: usize = 100;
        const FAULT: usize = 200;
        const HEAL: usize = 201;
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
            match kind {
                k if k < CLIENT_TICK => {
                    self.server_tick(k);
                    self.push(at + TICK_MS, k);
                }
                k if k < FAULT => {
                    self.client_tick(k - CLIENT_TICK);
                    self.push(at + TICK_MS, k);
                }
                FAULT => {
                    self.fault();
                    if self.faults {
                        let next = at + self.rng.u64(200..2_500);
                        self.push(next, FAULT);
                    }
                }
                HEAL => self.heal(),
                k => {
                    let m = self.msgs.remove(&(k - 1_000)).expect("queued message");
                    match m {
                        Msg::Peer { to, m } => self.on_peer(to, m),
                        Msg::ToServer {
                            server,
                            client,
                            conn,
                            id,
                            req,
                        } => self.on_request(server, client, conn, id, req),
                        other => self.on_client_msg(other),
                    }
                }
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

fn run_seed(seed: u64, trace: bool) -> Counts {
    let mut w = World::new(seed);
    w.trace = trace;
    w.run();
    w.stats
}

#[test]
fn simulated_groups_keep_ownership_exclusive_tokens_rising_and_clients_served() {
    if let Ok(seed) = std::env::var("PORTSWITCH_SIM_SEED") {
        let seed: u64 = seed.parse().expect("PORTSWITCH_SIM_SEED is a number");
        println!("{:?}", run_seed(seed, true));
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
    for seed in base..base + n {
        total += run_seed(seed, false);
    }
    println!("{n} seeds: {total:?}");
    // The faults must have made the group fail over, clients keep ports across it,
    // and waiters took their places again and were granted.
    assert!(total.masters_with_window > 0 && total.reclaims_kept > 0 && total.crashes > 0);
    assert!(total.requeued > 0 && total.waiters_granted > 0, "{total:?}");
}
