//! A recording outbox and helpers for driving the core in tests.
#![allow(dead_code)]

use portswitch_core::{Batch, Config, ConnId, Core, Outbox};
use portswitch_proto::frame::{frame_len, messages};
use portswitch_proto::{ErrorCode, Event, Hello, Reply, Request, ServerMsg};

/// Everything the core emitted, owned and easy to match.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Out {
    HelloOk {
        id: u32,
        session: u64,
        secret: u64,
        resumed: bool,
    },
    Ok(u32),
    Registered(u32, u64),
    Taken(u32, u64),
    Queued(u32, u32),
    Owner {
        id: u32,
        session: u64,
        token: u64,
        node: String,
        value: String,
    },
    Free(u32),
    Watching(u32, Option<(u64, u64)>),
    Delivered(u32),
    NoOwner(u32),
    Count(u32, u64),
    Page {
        id: u32,
        next: u64,
        ports: Vec<String>,
    },
    Err(u32, ErrorCode),
    Acquired(String, u64),
    Released(String, u64),
    Claimed(String, u64, u64),
    Message {
        from: u64,
        port: String,
        payload: String,
    },
    GoAway(ErrorCode),
    Resync,
    Recovered,
    Close,
}

fn s(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

pub fn owned_reply(id: u32, r: &Reply<'_>) -> Out {
    match *r {
        Reply::HelloOk(h) => Out::HelloOk {
            id,
            session: h.session,
            secret: h.secret,
            resumed: h.resumed,
        },
        Reply::Ok => Out::Ok(id),
        Reply::Registered { token } => Out::Registered(id, token),
        Reply::Taken { session, .. } => Out::Taken(id, session),
        Reply::Queued { position } => Out::Queued(id, position),
        Reply::Owner {
            session,
            token,
            node,
            value,
        } => Out::Owner {
            id,
            session,
            token,
            node: s(node),
            value: s(value),
        },
        Reply::Free => Out::Free(id),
        Reply::Watching { owner } => Out::Watching(id, owner),
        Reply::Delivered => Out::Delivered(id),
        Reply::NoOwner => Out::NoOwner(id),
        Reply::Count { count } => Out::Count(id, count),
        Reply::Page { next_cursor, .. } => Out::Page {
            id,
            next: next_cursor,
            ports: r.page_entries().map(|e| s(e.port)).collect(),
        },
        Reply::Stats { .. } | Reply::AuthContinue { .. } | Reply::AdminOk { .. } => {
            panic!("the core does not send {r:?}")
        }
        Reply::Error { code, .. } => Out::Err(id, code),
    }
}

pub fn owned_event(e: &Event<'_>) -> Out {
    match *e {
        Event::Acquired { port, token } => Out::Acquired(s(port), token),
        Event::Released { port, token } => Out::Released(s(port), token),
        Event::Claimed {
            port,
            session,
            token,
            ..
        } => Out::Claimed(s(port), session, token),
        Event::Message {
            from,
            port,
            payload,
        } => Out::Message {
            from,
            port: s(port),
            payload: s(payload),
        },
        Event::GoAway { code, .. } => Out::GoAway(code),
        Event::Resync => Out::Resync,
        Event::Recovered => Out::Recovered,
    }
}

#[derive(Default, Debug)]
pub struct Rec(pub Vec<(ConnId, Out)>);

impl Outbox for Rec {
    fn reply(&mut self, c: ConnId, id: u32, r: &Reply<'_>) {
        self.0.push((c, owned_reply(id, r)));
    }
    fn event(&mut self, c: ConnId, e: &Event<'_>) {
        self.0.push((c, owned_event(e)));
    }
    fn frames(&mut self, c: ConnId, mut bytes: &[u8]) {
        while !bytes.is_empty() {
            let n = frame_len(bytes, usize::MAX).unwrap().unwrap();
            for m in messages(&bytes[4..n], usize::MAX) {
                let m = m.unwrap();
                match ServerMsg::decode(m.opcode, m.id, m.body).unwrap() {
                    ServerMsg::Event(e) => self.0.push((c, owned_event(&e))),
                    ServerMsg::Reply { id, reply } => self.0.push((c, owned_reply(id, &reply))),
                }
            }
            bytes = &bytes[n..];
        }
    }
    fn close(&mut self, c: ConnId) {
        self.0.push((c, Out::Close));
    }
}

/// A core plus a clock and a recorder.
pub struct H {
    pub core: Core,
    pub now: u64,
    pub out: Rec,
    next_id: u32,
}

pub fn hello(lease_ms: u32, end_on_disconnect: bool) -> Hello<'static> {
    Hello {
        version_min: 1,
        version_max: 1,
        features: 0,
        lease_ms,
        end_on_disconnect,
        node_name: b"node",
        credentials: b"",
        resume_session: 0,
        resume_secret: 0,
    }
}

impl H {
    pub fn new() -> H {
        H::with(Config::default())
    }
    pub fn with(cfg: Config) -> H {
        H::from_core(Core::new(cfg, 5, [11, 22, 33]))
    }
    pub fn from_core(core: Core) -> H {
        H {
            core,
            now: 0,
            out: Rec::default(),
            next_id: 0,
        }
    }
    /// Sends one request on `conn`; returns everything emitted.
    pub fn req(&mut self, conn: ConnId, r: Request<'_>) -> Vec<(ConnId, Out)> {
        self.batch(conn, &[r])
    }
    pub fn batch(&mut self, conn: ConnId, rs: &[Request<'_>]) -> Vec<(ConnId, Out)> {
        let mut b: Batch = self.core.begin_batch(conn, self.now);
        for r in rs {
            self.next_id += 1;
            self.core.handle(&mut b, self.next_id, r, &mut self.out);
        }
        std::mem::take(&mut self.out.0)
    }
    /// The reply to a single request (the first thing emitted for `conn`).
    pub fn one(&mut self, conn: ConnId, r: Request<'_>) -> Out {
        let outs = self.req(conn, r);
        outs.into_iter()
            .find(|(c, _)| *c == conn)
            .expect("a reply")
            .1
    }
    /// Opens a session on `conn`; returns (session id, secret).
    pub fn session(&mut self, conn: ConnId, lease_ms: u32) -> (u64, u64) {
        match self.one(conn, Request::Hello(hello(lease_ms, false))) {
            Out::HelloOk {
                session, secret, ..
            } => (session, secret),
            other => panic!("HELLO failed: {other:?}"),
        }
    }
    /// Opens a session authenticated as `ident` on `conn`.
    pub fn session_as(&mut self, conn: ConnId, ident: &portswitch_core::Identity) -> (u64, u64) {
        self.next_id += 1;
        let mut b = self.core.begin_batch(conn, self.now);
        self.core.handle_authenticated_hello(
            &mut b,
            self.next_id,
            &hello(10_000, false),
            ident,
            b"v=sig",
            &mut self.out,
        );
        match std::mem::take(&mut self.out.0).into_iter().next() {
            Some((
                _,
                Out::HelloOk {
                    session, secret, ..
                },
            )) => (session, secret),
            other => panic!("HELLO failed: {other:?}"),
        }
    }
    pub fn register(&mut self, conn: ConnId, port: &str) -> Out {
        self.one(
            conn,
            Request::Register {
                port: port.as_bytes(),
                value: b"",
                wait: false,
            },
        )
    }
    pub fn advance(&mut self, ms: u64) -> Vec<(ConnId, Out)> {
        self.now += ms;
        self.core.handle_timeout(self.now, &mut self.out);
        std::mem::take(&mut self.out.0)
    }
    pub fn disconnect(&mut self, conn: ConnId) -> Vec<(ConnId, Out)> {
        self.core.handle_disconnect(conn, self.now, &mut self.out);
        std::mem::take(&mut self.out.0)
    }
}

pub fn token_of(o: &Out) -> u64 {
    match o {
        Out::Registered(_, t) | Out::Acquired(_, t) => *t,
        other => panic!("not a grant: {other:?}"),
    }
}
