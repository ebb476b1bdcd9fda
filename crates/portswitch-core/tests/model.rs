//! Property test: the core against a simple model of ownership, FIFO queues, leases,
//! detach-on-disconnect and token order. Three client connections, three ports, and a
//! probe session that only queries; random operations and time steps.

mod common;

use std::collections::VecDeque;

use common::*;
use portswitch_core::Config;
use portswitch_proto::{ErrorCode, Request};
use proptest::prelude::*;
use proptest::test_runner::TestCaseError;

const CONNS: usize = 3;
const PORTS: [&str; 3] = ["p0", "p1", "p2"];
const LEASE: u64 = 100;
const PROBE: u64 = 99;

#[derive(Debug, Clone)]
enum Op {
    Hello(usize),
    Bye(usize),
    Disconnect(usize),
    Register(usize, usize, bool),
    Unregister(usize, usize),
    Ping(usize),
    Advance(u64),
}

fn op() -> impl Strategy<Value = Op> {
    let c = 0..CONNS;
    let p = 0..PORTS.len();
    prop_oneof![
        2 => c.clone().prop_map(Op::Hello),
        1 => c.clone().prop_map(Op::Bye),
        1 => c.clone().prop_map(Op::Disconnect),
        6 => (c.clone(), p.clone(), any::<bool>()).prop_map(|(c, p, w)| Op::Register(c, p, w)),
        3 => (c.clone(), p).prop_map(|(c, p)| Op::Unregister(c, p)),
        2 => c.prop_map(Op::Ping),
        2 => (1..80u64).prop_map(Op::Advance),
    ]
}

#[derive(Debug)]
struct MSession {
    id: u64,
    deadline: u64,
    end_on_disconnect: bool,
    alive: bool,
}

#[derive(Default, Debug)]
struct Model {
    conn_session: [Option<usize>; CONNS],
    sessions: Vec<MSession>,
    owner: [Option<usize>; 3],
    queue: [VecDeque<usize>; 3],
}

impl Model {
    fn end(&mut self, s: usize) {
        self.sessions[s].alive = false;
        for c in self.conn_session.iter_mut() {
            if *c == Some(s) {
                *c = None;
            }
        }
        for q in self.queue.iter_mut() {
            q.retain(|&w| w != s);
        }
        for p in 0..PORTS.len() {
            if self.owner[p] == Some(s) {
                self.owner[p] = self.queue[p].pop_front();
            }
        }
    }
    fn renew(&mut self, c: usize, now: u64) {
        if let Some(s) = self.conn_session[c] {
            self.sessions[s].deadline = now + LEASE;
        }
    }
}

fn conn(c: usize) -> u64 {
    c as u64 + 1
}

/// The reply to the request just sent on `c` (the last thing emitted for it that is
/// not an event).
fn reply_of(outs: &[(u64, Out)], c: usize) -> Out {
    outs.iter()
        .rev()
        .find(|(cc, o)| {
            *cc == conn(c)
                && !matches!(
                    o,
                    Out::Acquired(..) | Out::Claimed(..) | Out::Released(..) | Out::Message { .. }
                )
        })
        .expect("a reply")
        .1
        .clone()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2048, failure_persistence: None, .. ProptestConfig::default() })]
    #[test]
    fn core_matches_model(ops in proptest::collection::vec(op(), 1..150)) {
        check(ops, Config::default())?;
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 1024, failure_persistence: None, .. ProptestConfig::default() })]
    /// Ended sessions release one port per timer step; once the steps due have run,
    /// the core must agree with the model (which releases at once).
    #[test]
    fn core_matches_model_when_ended_sessions_release_a_port_per_step(ops in proptest::collection::vec(op(), 1..150)) {
        check(ops, Config { release_step_ports_max: 1, ..Config::default() })?;
    }
}

fn check(ops: Vec<Op>, cfg: Config) -> Result<(), TestCaseError> {
    {
        let mut h = H::with(cfg);
        h.one(PROBE, Request::Hello(hello(300_000, false)));
        let mut m = Model::default();
        let mut last_token = 0u64;
        let mut tokens = [0u64; 3];
        let port_index = |name: &str| PORTS.iter().position(|p| *p == name).unwrap();

        for op in ops {
            let outs = match op {
                Op::Advance(ms) => {
                    let outs = h.advance(ms);
                    let now = h.now;
                    let expired: Vec<usize> = (0..m.sessions.len())
                        .filter(|&s| m.sessions[s].alive && m.sessions[s].deadline <= now)
                        .collect();
                    for s in expired {
                        m.end(s);
                    }
                    outs
                }
                Op::Hello(c) => {
                    let outs = h.req(conn(c), Request::Hello(hello(LEASE as u32, c % 2 == 1)));
                    match (reply_of(&outs, c), m.conn_session[c]) {
                        (Out::HelloOk { session, .. }, None) => {
                            m.sessions.push(MSession {
                                id: session,
                                deadline: h.now + LEASE,
                                end_on_disconnect: c % 2 == 1,
                                alive: true,
                            });
                            m.conn_session[c] = Some(m.sessions.len() - 1);
                        }
                        (Out::Err(_, ErrorCode::SessionExists), Some(_)) => m.renew(c, h.now),
                        (o, s) => panic!("HELLO gave {o:?} with model session {s:?}"),
                    }
                    outs
                }
                Op::Bye(c) => {
                    let outs = h.req(conn(c), Request::Bye);
                    let reply = reply_of(&outs, c);
                    match m.conn_session[c] {
                        Some(s) => {
                            prop_assert!(matches!(reply, Out::Ok(_)), "{:?}", reply);
                            m.end(s);
                        }
                        None => prop_assert!(
                            matches!(reply, Out::Err(_, ErrorCode::NoSession)),
                            "{:?}",
                            reply
                        ),
                    }
                    outs
                }
                Op::Disconnect(c) => {
                    let outs = h.disconnect(conn(c));
                    if let Some(s) = m.conn_session[c].take() {
                        if m.sessions[s].end_on_disconnect {
                            m.end(s);
                        }
                    }
                    outs
                }
                Op::Ping(c) => {
                    let outs = h.req(conn(c), Request::Ping);
                    m.renew(c, h.now);
                    outs
                }
                Op::Register(c, p, wait) => {
                    let outs = h.req(
                        conn(c),
                        Request::Register {
                            port: PORTS[p].as_bytes(),
                            value: b"",
                            wait,
                        },
                    );
                    let reply = reply_of(&outs, c);
                    m.renew(c, h.now);
                    match m.conn_session[c] {
                        None => prop_assert!(
                            matches!(reply, Out::Err(_, ErrorCode::NoSession)),
                            "{:?}",
                            reply
                        ),
                        Some(me) => match m.owner[p] {
                            Some(o) if o == me => {
                                prop_assert_eq!(
                                    token_of(&reply),
                                    tokens[p],
                                    "re-register keeps the grant"
                                );
                            }
                            None => {
                                let t = token_of(&reply);
                                prop_assert!(
                                    t > last_token,
                                    "token {} not above {}",
                                    t,
                                    last_token
                                );
                                last_token = t;
                                tokens[p] = t;
                                m.owner[p] = Some(me);
                            }
                            Some(o) if !wait => {
                                let want = m.sessions[o].id;
                                prop_assert!(
                                    matches!(reply, Out::Taken(_, s) if s == want),
                                    "{:?}",
                                    reply
                                );
                            }
                            Some(_) => {
                                if !m.queue[p].contains(&me) {
                                    m.queue[p].push_back(me);
                                }
                                let pos =
                                    m.queue[p].iter().position(|&w| w == me).unwrap() as u32 + 1;
                                prop_assert!(
                                    matches!(reply, Out::Queued(_, got) if got == pos),
                                    "{:?} want {}",
                                    reply,
                                    pos
                                );
                            }
                        },
                    }
                    outs
                }
                Op::Unregister(c, p) => {
                    let outs = h.req(
                        conn(c),
                        Request::Unregister {
                            port: PORTS[p].as_bytes(),
                        },
                    );
                    let reply = reply_of(&outs, c);
                    m.renew(c, h.now);
                    match m.conn_session[c] {
                        None => prop_assert!(
                            matches!(reply, Out::Err(_, ErrorCode::NoSession)),
                            "{:?}",
                            reply
                        ),
                        Some(me) => {
                            if m.owner[p] == Some(me) {
                                prop_assert!(matches!(reply, Out::Ok(_)), "{:?}", reply);
                                m.owner[p] = m.queue[p].pop_front();
                            } else if m.queue[p].contains(&me) {
                                prop_assert!(matches!(reply, Out::Ok(_)), "{:?}", reply);
                                m.queue[p].retain(|&w| w != me);
                            } else {
                                prop_assert!(
                                    matches!(reply, Out::Err(_, ErrorCode::NotOwner)),
                                    "{:?}",
                                    reply
                                );
                            }
                        }
                    }
                    outs
                }
            };
            // Run the release steps that are due (none unless a session ended with
            // more ports than one step releases).
            let mut outs = outs;
            while h.core.next_deadline().is_some_and(|d| d <= h.now) {
                outs.extend(h.advance(0));
            }
            // Fencing: every grant handed over from a queue has a token above every
            // earlier grant's (direct grants were checked above).
            for (_, o) in &outs {
                if let Out::Acquired(port, t) = o {
                    prop_assert!(*t > last_token, "token {} not above {}", t, last_token);
                    last_token = *t;
                    tokens[port_index(port)] = *t;
                }
            }
            // Every port's owner matches the model.
            for (p, name) in PORTS.iter().enumerate() {
                let got = h.one(
                    PROBE,
                    Request::Query {
                        port: name.as_bytes(),
                    },
                );
                let want = m.owner[p].map(|s| m.sessions[s].id);
                match got {
                    Out::Free(_) => {
                        prop_assert_eq!(want, None, "port {} is free in the core", name)
                    }
                    Out::Owner { session, .. } => {
                        prop_assert_eq!(want, Some(session), "owner of {}", name)
                    }
                    other => panic!("{other:?}"),
                }
            }
            prop_assert_eq!(
                h.core.stats().waiters as usize,
                m.queue.iter().map(|q| q.len()).sum::<usize>()
            );
        }
    }
    Ok(())
}
