//! Every message survives encode → decode, and no byte string makes a decoder panic.

use bytes::BytesMut;
use portswitch_proto::frame::{frame_len, messages};
use portswitch_proto::limits::*;
use portswitch_proto::msg::{encode_stat, PageEntry};
use portswitch_proto::*;
use proptest::prelude::*;

fn bytes(max: usize) -> impl Strategy<Value = Vec<u8>> {
    proptest::collection::vec(any::<u8>(), 0..=max)
}

#[derive(Debug, Clone)]
enum OwnedReq {
    Hello(u16, u16, u64, u32, bool, Vec<u8>, Vec<u8>, u64, u64),
    Ping,
    Register(Vec<u8>, Vec<u8>, bool),
    Unregister(Vec<u8>),
    Query(Vec<u8>),
    Watch(Vec<u8>, bool),
    Unwatch(Vec<u8>, bool),
    Send(Vec<u8>, Vec<u8>),
    Broadcast(Option<Vec<u8>>, Vec<u8>),
    List(Vec<u8>, u64, u32),
    WatchWhere(Vec<u8>, Vec<u8>),
    ListWhere(Vec<u8>, u64, u32, Vec<u8>),
    Bye,
    Stats,
    Auth(Vec<u8>),
    Reclaim(Vec<u8>, u64, Vec<u8>),
}

impl OwnedReq {
    fn as_req(&self) -> Request<'_> {
        match self {
            OwnedReq::Hello(a, b, f, l, e, n, c, s, k) => Request::Hello(Hello {
                version_min: *a,
                version_max: *b,
                features: *f,
                lease_ms: *l,
                end_on_disconnect: *e,
                node_name: n,
                credentials: c,
                resume_session: *s,
                resume_secret: *k,
            }),
            OwnedReq::Ping => Request::Ping,
            OwnedReq::Register(p, v, w) => Request::Register {
                port: p,
                value: v,
                wait: *w,
            },
            OwnedReq::Unregister(p) => Request::Unregister { port: p },
            OwnedReq::Query(p) => Request::Query { port: p },
            OwnedReq::Watch(p, x) => Request::Watch {
                name: p,
                prefix: *x,
            },
            OwnedReq::Unwatch(p, x) => Request::Unwatch {
                name: p,
                prefix: *x,
            },
            OwnedReq::Send(p, d) => Request::Send {
                port: p,
                payload: d,
            },
            OwnedReq::Broadcast(p, d) => Request::Broadcast {
                prefix: p.as_deref(),
                payload: d,
            },
            OwnedReq::List(p, c, l) => Request::List {
                prefix: p,
                cursor: *c,
                limit: *l,
            },
            OwnedReq::WatchWhere(p, f) => Request::WatchWhere {
                prefix: p,
                filter: f,
            },
            OwnedReq::ListWhere(p, c, l, f) => Request::ListWhere {
                prefix: p,
                cursor: *c,
                limit: *l,
                filter: f,
            },
            OwnedReq::Bye => Request::Bye,
            OwnedReq::Stats => Request::Stats,
            OwnedReq::Auth(d) => Request::Auth { data: d },
            OwnedReq::Reclaim(p, t, v) => Request::Reclaim {
                port: p,
                token: *t,
                value: v,
            },
        }
    }
}

fn request() -> impl Strategy<Value = OwnedReq> {
    let name = || bytes(PORT_NAME_BYTES_MAX);
    prop_oneof![
        (
            any::<u16>(),
            any::<u16>(),
            any::<u64>(),
            any::<u32>(),
            any::<bool>(),
            bytes(NODE_NAME_BYTES_MAX),
            bytes(64),
            any::<u64>(),
            any::<u64>()
        )
            .prop_map(|(a, b, f, l, e, n, c, s, k)| OwnedReq::Hello(a, b, f, l, e, n, c, s, k)),
        Just(OwnedReq::Ping),
        (name(), bytes(VALUE_BYTES_MAX), any::<bool>())
            .prop_map(|(p, v, w)| OwnedReq::Register(p, v, w)),
        name().prop_map(OwnedReq::Unregister),
        name().prop_map(OwnedReq::Query),
        (name(), any::<bool>()).prop_map(|(p, x)| OwnedReq::Watch(p, x)),
        (name(), any::<bool>()).prop_map(|(p, x)| OwnedReq::Unwatch(p, x)),
        (name(), bytes(2_000)).prop_map(|(p, d)| OwnedReq::Send(p, d)),
        (proptest::option::of(name()), bytes(2_000)).prop_map(|(p, d)| OwnedReq::Broadcast(p, d)),
        (name(), any::<u64>(), any::<u32>()).prop_map(|(p, c, l)| OwnedReq::List(p, c, l)),
        (name(), bytes(QUERY_BYTES_MAX)).prop_map(|(p, f)| OwnedReq::WatchWhere(p, f)),
        (name(), any::<u64>(), any::<u32>(), bytes(QUERY_BYTES_MAX))
            .prop_map(|(p, c, l, f)| OwnedReq::ListWhere(p, c, l, f)),
        Just(OwnedReq::Bye),
        Just(OwnedReq::Stats),
        bytes(AUTH_DATA_BYTES_MAX).prop_map(OwnedReq::Auth),
        (name(), any::<u64>(), bytes(VALUE_BYTES_MAX))
            .prop_map(|(p, t, v)| OwnedReq::Reclaim(p, t, v)),
    ]
}

fn wire_of(f: impl FnOnce(&mut FrameBuf)) -> BytesMut {
    let mut fb = FrameBuf::new(FRAME_BYTES_MAX, COMMANDS_PER_FRAME_MAX);
    f(&mut fb);
    let mut w = BytesMut::new();
    fb.take_into(&mut w);
    w
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, failure_persistence: None, .. ProptestConfig::default() })]

    #[test]
    fn requests_round_trip(reqs in proptest::collection::vec(request(), 1..20)) {
        let wire = wire_of(|fb| for (i, r) in reqs.iter().enumerate() { fb.push_request(i as u32 + 1, &r.as_req()) });
        let n = frame_len(&wire, FRAME_BYTES_MAX).unwrap().unwrap();
        prop_assert_eq!(n, wire.len(), "one frame");
        let got: Vec<_> = messages(&wire[4..], COMMANDS_PER_FRAME_MAX).map(|m| m.unwrap()).collect();
        prop_assert_eq!(got.len(), reqs.len());
        for (i, (m, r)) in got.iter().zip(&reqs).enumerate() {
            prop_assert_eq!(m.id, i as u32 + 1);
            prop_assert_eq!(Request::decode(m.opcode, m.body).unwrap(), r.as_req());
        }
    }

    #[test]
    fn replies_and_events_round_trip(
        id in 1u32..,
        token in any::<u64>(),
        session in any::<u64>(),
        node in bytes(NODE_NAME_BYTES_MAX),
        name in bytes(PORT_NAME_BYTES_MAX),
        value in bytes(VALUE_BYTES_MAX),
        payload in bytes(3_000),
        code in 1u16..40,
        entries in proptest::collection::vec((bytes(40), any::<u64>()), 0..5),
    ) {
        let mut page = BytesMut::new();
        for (p, t) in &entries {
            PageEntry { port: p, session, token: *t, node: &node, value: &value }.encode(&mut page);
        }
        let mut stats = BytesMut::new();
        encode_stat(&mut stats, "ports_owned", token);
        let limits = ServerLimits {
            frame_bytes_max: 1, commands_per_frame_max: 2, port_name_bytes_max: 3, value_bytes_max: 4,
            payload_bytes_max: 5, ports_per_session_max: 6, watches_per_session_max: 7, queue_len_max: 8,
            list_limit_max: 9, lease_ms_min: 10, lease_ms_max: 11,
        };
        let replies = [
            Reply::HelloOk(HelloOk { version: 1, features: token, session, secret: !token, epoch: 7, lease_ms: 9, resumed: true, limits, auth: &value[..value.len().min(1024)], recovery_ms: 77, channels_max: 4096 }),
            Reply::Ok, Reply::Registered { token }, Reply::Taken { session, token, node: &node }, Reply::Queued { position: 3 },
            Reply::Owner { session, token, node: &node, value: &value }, Reply::Free, Reply::Watching { owner: Some((session, token)) },
            Reply::Watching { owner: None }, Reply::Delivered, Reply::NoOwner, Reply::Count { count: token },
            Reply::Page { next_cursor: token, count: entries.len() as u32, entries: &page },
            Reply::Stats { count: 1, entries: &stats },
            Reply::error(ErrorCode::from_u16(code), &value[..value.len().min(ERROR_MESSAGE_BYTES_MAX)]),
            Reply::AuthContinue { data: &name },
        ];
        let events = [
            Event::Acquired { port: &name, token }, Event::Released { port: &name, token },
            Event::Claimed { port: &name, session, token, node: &node },
            Event::Message { from: session, port: &name, payload: &payload },
            Event::GoAway { code: ErrorCode::from_u16(code), message: b"bye" }, Event::Resync, Event::Recovered,
        ];
        let wire = wire_of(|fb| {
            for r in &replies { fb.push_reply(id, r) }
            for e in &events { fb.push_event(e) }
        });
        let got: Vec<ServerMsg<'_>> = messages(&wire[4..], usize::MAX)
            .map(|m| { let m = m.unwrap(); ServerMsg::decode(m.opcode, m.id, m.body).unwrap() })
            .collect();
        let want: Vec<ServerMsg<'_>> = replies.iter().map(|r| ServerMsg::Reply { id, reply: *r })
            .chain(events.iter().map(|e| ServerMsg::Event(*e))).collect();
        prop_assert_eq!(&got, &want);
        let ServerMsg::Reply { reply: page_reply, .. } = got[12] else { unreachable!() };
        let listed: Vec<_> = page_reply.page_entries().map(|e| (e.port.to_vec(), e.token)).collect();
        prop_assert_eq!(listed, entries);
    }

    #[test]
    fn no_bytes_make_the_decoders_panic(data in bytes(600)) {
        let mut rest = &data[..];
        while let Ok(Some(n)) = frame_len(rest, FRAME_BYTES_MAX) {
            for m in messages(&rest[4..n], 64) {
                let Ok(m) = m else { break };
                let _ = Request::decode(m.opcode, m.body);
                if let Ok(ServerMsg::Reply { reply, .. }) = ServerMsg::decode(m.opcode, m.id, m.body) {
                    let _ = reply.page_entries().count();
                    let _ = reply.stats_entries().count();
                }
            }
            rest = &rest[n..];
        }
    }
}

/// The worked example in docs/PROTOCOL.md, byte for byte.
#[test]
fn protocol_doc_example() {
    let hex = |s: &str| -> Vec<u8> {
        s.split_whitespace()
            .map(|b| u8::from_str_radix(b, 16).unwrap())
            .collect()
    };
    let req = wire_of(|fb| {
        fb.push_request(
            2,
            &Request::Register {
                port: b"db",
                value: b"v",
                wait: false,
            },
        )
    });
    assert_eq!(
        &req[..],
        &hex("00 00 00 11 03 00 00 00 02 00 00 00 08 00 00 02 64 62 00 01 76")[..]
    );
    let rep = wire_of(|fb| {
        fb.push_reply(
            2,
            &Reply::Registered {
                token: 0x6B04_9A2C_0000_0001,
            },
        )
    });
    assert_eq!(
        &rep[..],
        &hex("00 00 00 11 83 00 00 00 02 00 00 00 08 6B 04 9A 2C 00 00 00 01")[..]
    );
}
