//! The core's behaviour, driven through its inputs and checked on its effects.

mod common;

use common::*;
use portswitch_core::Config;
use portswitch_proto::{ErrorCode, Request};

const A: u64 = 1;
const B: u64 = 2;
const C: u64 = 3;
const W: u64 = 4;

fn reg(port: &str, wait: bool) -> Request<'_> {
    Request::Register {
        port: port.as_bytes(),
        value: b"",
        wait,
    }
}

#[test]
fn register_query_unregister() {
    let mut h = H::new();
    let (sa, _) = h.session(A, 1_000);
    let (_sb, _) = h.session(B, 1_000);
    let t = token_of(&h.register(A, "db"));
    assert!(matches!(h.register(B, "db"), Out::Taken(_, s) if s == sa));
    match h.one(B, Request::Query { port: b"db" }) {
        Out::Owner {
            session,
            token,
            node,
            ..
        } => {
            assert_eq!((session, token, node.as_str()), (sa, t, "node"));
        }
        other => panic!("{other:?}"),
    }
    assert!(matches!(
        h.one(B, Request::Unregister { port: b"db" }),
        Out::Err(_, ErrorCode::NotOwner)
    ));
    // Registering again is idempotent: same grant.
    assert_eq!(token_of(&h.register(A, "db")), t);
    assert!(matches!(
        h.one(A, Request::Unregister { port: b"db" }),
        Out::Ok(_)
    ));
    assert!(matches!(
        h.one(B, Request::Query { port: b"db" }),
        Out::Free(_)
    ));
    assert_eq!(
        h.core.stats().port_entries,
        0,
        "a free, unwatched port leaves no entry"
    );
}

#[test]
fn value_is_returned_and_refreshed() {
    let mut h = H::new();
    h.session(A, 1_000);
    h.one(
        A,
        Request::Register {
            port: b"svc/a",
            value: b"10.0.0.1:80",
            wait: false,
        },
    );
    h.one(
        A,
        Request::Register {
            port: b"svc/a",
            value: b"10.0.0.2:80",
            wait: false,
        },
    );
    assert!(
        matches!(h.one(A, Request::Query { port: b"svc/a" }), Out::Owner { value, .. } if value == "10.0.0.2:80")
    );
}

#[test]
fn wait_queue_hands_over_in_fifo_order_and_tells_watchers() {
    let mut h = H::new();
    let (sa, _) = h.session(A, 1_000);
    let (sb, _) = h.session(B, 1_000);
    let (sc, _) = h.session(C, 1_000);
    h.session(W, 1_000);
    let t0 = token_of(&h.register(A, "lock"));
    assert!(
        matches!(h.one(W, Request::Watch { name: b"lock", prefix: false }), Out::Watching(_, Some((s, t))) if s == sa && t == t0)
    );
    assert!(matches!(h.one(B, reg("lock", true)), Out::Queued(_, 1)));
    assert!(matches!(h.one(C, reg("lock", true)), Out::Queued(_, 2)));
    assert!(
        matches!(h.one(C, reg("lock", true)), Out::Queued(_, 2)),
        "queueing twice keeps the place"
    );

    // A lets go: the watcher sees RELEASED then CLAIMED, B (first in line) ACQUIRED.
    let outs = h.req(A, Request::Unregister { port: b"lock" });
    let t1 = match &outs[..] {
        [(W, Out::Released(p, t)), (W, Out::Claimed(p2, s, t1)), (B, Out::Acquired(p3, t1b)), (A, Out::Ok(_))] =>
        {
            assert_eq!(
                (p.as_str(), p2.as_str(), p3.as_str()),
                ("lock", "lock", "lock")
            );
            assert_eq!((*t, *s, t1), (t0, sb, t1b));
            *t1
        }
        other => panic!("{other:?}"),
    };
    assert!(t1 > t0);
    // B's session ends (BYE): C is next, with a higher token.
    let outs = h.req(B, Request::Bye);
    let claimed: Vec<_> = outs
        .iter()
        .filter(|(c, _)| *c == W)
        .map(|(_, o)| o.clone())
        .collect();
    assert!(
        matches!(&claimed[..], [Out::Released(_, t), Out::Claimed(_, s, t2)] if *t == t1 && *s == sc && *t2 > t1)
    );
    let acquired: Vec<_> = outs
        .iter()
        .filter(|(c, o)| *c == C && matches!(o, Out::Acquired(..)))
        .collect();
    assert_eq!(acquired.len(), 1);
    assert!(token_of(&acquired[0].1) > t1);
}

#[test]
fn tokens_only_increase_across_ports_and_grants() {
    let mut h = H::new();
    h.session(A, 1_000);
    h.session(B, 1_000);
    let mut last = 0;
    for i in 0..50 {
        let port = format!("p{}", i % 3);
        let t = token_of(&h.register(if i % 2 == 0 { A } else { B }, &port));
        assert!(t > last, "token {t} after {last}");
        last = t;
        h.one(
            if i % 2 == 0 { A } else { B },
            Request::Unregister {
                port: port.as_bytes(),
            },
        );
    }
    assert_eq!(last >> 32, 5, "tokens carry the epoch in their high half");
}

#[test]
fn lease_expiry_releases_ports_and_tells_watchers_in_one_step() {
    let mut h = H::new();
    let (sa, _) = h.session(A, 1_000);
    h.session(B, 10_000);
    h.session(W, 10_000);
    let t = token_of(&h.register(A, "x"));
    h.register(A, "y");
    h.one(
        W,
        Request::Watch {
            name: b"x",
            prefix: false,
        },
    );
    assert!(matches!(h.one(B, reg("y", true)), Out::Queued(..)));
    // Traffic at 600 ms renews the lease to 1,600 ms.
    h.advance(600);
    h.req(A, Request::Ping);
    assert!(h.advance(999).is_empty(), "renewed lease still running");
    let outs = h.advance(1);
    assert!(outs.contains(&(W, Out::Released("x".into(), t))));
    assert!(outs
        .iter()
        .any(|(c, o)| *c == B && matches!(o, Out::Acquired(p, _) if p == "y")));
    assert!(outs.contains(&(A, Out::GoAway(ErrorCode::SessionExpired))));
    assert!(outs.contains(&(A, Out::Close)));
    assert!(matches!(
        h.one(W, Request::Query { port: b"x" }),
        Out::Free(_)
    ));
    // The expired session is gone: its connection may not use it, nor resume it.
    assert!(matches!(
        h.one(A, Request::Query { port: b"x" }),
        Out::Err(_, ErrorCode::NoSession)
    ));
    assert_eq!(h.core.stats().sessions_expired_total, 1);
    let _ = sa;
}

#[test]
fn end_on_disconnect_releases_at_once() {
    let mut h = H::new();
    h.one(A, Request::Hello(hello(60_000, true)));
    h.session(W, 60_000);
    h.register(A, "x");
    h.one(
        W,
        Request::Watch {
            name: b"x",
            prefix: false,
        },
    );
    let outs = h.disconnect(A);
    assert!(matches!(&outs[..], [(W, Out::Released(p, _))] if p == "x"));
}

#[test]
fn detached_session_keeps_ports_for_its_lease_and_resumes_with_missed_events() {
    let mut h = H::new();
    let (sa, secret) = h.session(A, 1_000);
    h.session(B, 10_000);
    h.register(A, "x");
    h.one(
        A,
        Request::Watch {
            name: b"w",
            prefix: false,
        },
    );
    assert!(
        h.disconnect(A).is_empty(),
        "no release while the lease runs"
    );
    assert!(
        matches!(h.one(B, Request::Query { port: b"x" }), Out::Owner { session, .. } if session == sa)
    );
    // An event while detached is buffered...
    h.register(B, "w");
    // ...SEND to a detached owner says so rather than pretending to deliver.
    assert!(matches!(
        h.one(
            B,
            Request::Send {
                port: b"x",
                payload: b"hi"
            }
        ),
        Out::Err(_, ErrorCode::OwnerUnreachable)
    ));
    h.advance(500);
    let mut bad = hello(1_000, false);
    bad.resume_session = sa;
    bad.resume_secret = secret ^ 1;
    assert!(matches!(
        h.one(C, Request::Hello(bad)),
        Out::Err(_, ErrorCode::ResumeFailed)
    ));
    let mut good = bad;
    good.resume_secret = secret;
    let outs = h.req(C, Request::Hello(good));
    assert!(matches!(&outs[0], (C, Out::HelloOk { resumed: true, session, .. }) if *session == sa));
    assert!(matches!(&outs[1], (C, Out::Claimed(p, _, _)) if p == "w"));
    // The resumed session's lease runs from the resume.
    assert!(h.advance(999).is_empty());
    assert!(
        matches!(h.one(B, Request::Query { port: b"x" }), Out::Owner { session, .. } if session == sa)
    );
}

#[test]
fn missed_events_past_the_buffer_become_resync() {
    let mut h = H::with(Config {
        detached_event_bytes_max: 64,
        ..Config::default()
    });
    let (sa, secret) = h.session(A, 1_000);
    h.session(B, 10_000);
    h.one(
        A,
        Request::Watch {
            name: b"w",
            prefix: false,
        },
    );
    h.disconnect(A);
    for _ in 0..5 {
        h.register(B, "w");
        h.one(B, Request::Unregister { port: b"w" });
    }
    let mut r = hello(1_000, false);
    r.resume_session = sa;
    r.resume_secret = secret;
    let outs = h.req(C, Request::Hello(r));
    assert_eq!(outs.len(), 2);
    assert_eq!(outs[1], (C, Out::Resync));
}

#[test]
fn an_expired_detached_session_cannot_be_resumed() {
    let mut h = H::new();
    let (sa, secret) = h.session(A, 1_000);
    h.disconnect(A);
    h.advance(1_000);
    let mut r = hello(1_000, false);
    r.resume_session = sa;
    r.resume_secret = secret;
    assert!(matches!(
        h.one(B, Request::Hello(r)),
        Out::Err(_, ErrorCode::ResumeFailed)
    ));
}

#[test]
fn send_and_broadcast() {
    let mut h = H::new();
    let (sa, _) = h.session(A, 1_000);
    let (sb, _) = h.session(B, 1_000);
    h.session(C, 1_000);
    h.register(B, "svc/b");
    h.register(C, "svc/c");
    h.register(C, "other/c");
    let outs = h.req(
        A,
        Request::Send {
            port: b"svc/b",
            payload: b"hello",
        },
    );
    assert_eq!(
        outs[0],
        (
            B,
            Out::Message {
                from: sa,
                port: "svc/b".into(),
                payload: "hello".into()
            }
        )
    );
    assert!(matches!(outs[1], (A, Out::Delivered(_))));
    assert!(matches!(
        h.one(
            A,
            Request::Send {
                port: b"nobody",
                payload: b"x"
            }
        ),
        Out::NoOwner(_)
    ));

    let outs = h.req(
        A,
        Request::Broadcast {
            prefix: None,
            payload: b"all",
        },
    );
    assert_eq!(outs.len(), 3, "everyone but the sender, plus the reply");
    assert!(matches!(outs[2], (A, Out::Count(_, 2))));
    let outs = h.req(
        B,
        Request::Broadcast {
            prefix: Some(b"svc/"),
            payload: b"p",
        },
    );
    let got: Vec<_> = outs.iter().map(|(c, _)| *c).collect();
    assert_eq!(got, vec![B, C, B]);
    assert!(matches!(outs[2], (B, Out::Count(_, 2))));
    assert!(
        matches!(&outs[0], (B, Out::Message { from, port, .. }) if *from == sb && port == "svc/b")
    );
}

#[test]
fn broadcast_fanout_is_bounded() {
    let mut h = H::with(Config {
        broadcast_fanout_bytes_max: 1_000,
        payload_bytes_max: 600,
        ..Config::default()
    });
    h.session(A, 1_000);
    h.session(B, 1_000);
    h.session(C, 1_000);
    let big = vec![b'x'; 500];
    assert!(matches!(
        h.one(
            A,
            Request::Broadcast {
                prefix: None,
                payload: &big
            }
        ),
        Out::Err(_, ErrorCode::PayloadTooLarge)
    ));
}

#[test]
fn list_pages_through_every_port_exactly_once() {
    let mut h = H::with(Config {
        list_scan_slots_max: 10,
        ..Config::default()
    });
    h.session(A, 1_000);
    for i in 0..100 {
        h.register(A, &format!("a/{i:03}"));
        h.register(A, &format!("b/{i:03}"));
    }
    let mut seen = Vec::new();
    let mut cursor = 0;
    let mut calls = 0;
    loop {
        calls += 1;
        match h.one(
            A,
            Request::List {
                prefix: b"a/",
                cursor,
                limit: 7,
            },
        ) {
            Out::Page { next, ports, .. } => {
                assert!(ports.len() <= 7);
                seen.extend(ports);
                if next == 0 {
                    break;
                }
                cursor = next;
            }
            other => panic!("{other:?}"),
        }
    }
    seen.sort();
    let want: Vec<_> = (0..100).map(|i| format!("a/{i:03}")).collect();
    assert_eq!(seen, want);
    assert!(
        calls >= 20,
        "the scan bound splits the listing ({calls} calls)"
    );
    assert!(matches!(
        h.one(
            A,
            Request::List {
                prefix: b"",
                cursor: 0,
                limit: 0
            }
        ),
        Out::Err(_, ErrorCode::ListLimit)
    ));
    assert!(matches!(
        h.one(
            A,
            Request::List {
                prefix: b"",
                cursor: 0,
                limit: 5_000
            }
        ),
        Out::Err(_, ErrorCode::ListLimit)
    ));
    // A cursor past the end is simply the end.
    assert!(matches!(
        h.one(
            A,
            Request::List {
                prefix: b"",
                cursor: 1 << 40,
                limit: 5
            }
        ),
        Out::Page { next: 0, .. }
    ));
}

#[test]
fn prefix_watch_sees_claims_and_releases_under_it() {
    let mut h = H::new();
    h.session(A, 1_000);
    let (sb, _) = h.session(B, 1_000);
    assert_eq!(
        h.one(
            A,
            Request::Watch {
                name: b"svc/",
                prefix: true
            }
        ),
        Out::Watching(3, None)
    );
    let outs = h.req(B, reg("svc/x", false));
    assert!(matches!(&outs[0], (A, Out::Claimed(p, s, _)) if p == "svc/x" && *s == sb));
    assert_eq!(
        h.req(B, reg("other", false)).len(),
        1,
        "outside the prefix: reply only"
    );
    let outs = h.req(B, Request::Unregister { port: b"svc/x" });
    assert!(matches!(&outs[0], (A, Out::Released(p, _)) if p == "svc/x"));
    h.one(
        A,
        Request::Unwatch {
            name: b"svc/",
            prefix: true,
        },
    );
    assert_eq!(h.req(B, reg("svc/y", false)).len(), 1);
}

#[test]
fn every_limit_has_its_error() {
    let cfg = Config {
        port_name_bytes_max: 8,
        value_bytes_max: 4,
        payload_bytes_max: 4,
        ports_per_session_max: 2,
        watches_per_session_max: 1,
        queue_len_max: 1,
        sessions_max: 3,
        prefix_watches_max: 1,
        lease_ms_min: 100,
        lease_ms_max: 1_000,
        ..Config::default()
    };
    let mut h = H::with(cfg);
    use ErrorCode::*;
    let err = |o: Out| match o {
        Out::Err(_, c) => c,
        other => panic!("expected an error, got {other:?}"),
    };
    assert_eq!(err(h.one(A, Request::Query { port: b"x" })), NoSession);
    assert_eq!(
        err(h.one(A, Request::Hello(hello(99, false)))),
        LeaseOutOfRange
    );
    assert_eq!(
        err(h.one(A, Request::Hello(hello(1_001, false)))),
        LeaseOutOfRange
    );
    let mut v = hello(500, false);
    v.version_min = 2;
    v.version_max = 3;
    assert_eq!(err(h.one(A, Request::Hello(v))), VersionUnsupported);
    let mut c = hello(500, false);
    c.credentials = b"user:pw";
    assert_eq!(err(h.one(A, Request::Hello(c))), AuthUnavailable);
    h.session(A, 500);
    assert_eq!(
        err(h.one(A, Request::Hello(hello(500, false)))),
        SessionExists
    );
    h.session(B, 500);
    h.session(C, 500);
    assert_eq!(
        err(h.one(W, Request::Hello(hello(500, false)))),
        SessionsMax
    );
    assert_eq!(err(h.register(A, "")), EmptyName);
    assert_eq!(err(h.register(A, "123456789")), NameTooLong);
    assert_eq!(
        err(h.one(
            A,
            Request::Register {
                port: b"p",
                value: b"12345",
                wait: false
            }
        )),
        ValueTooLarge
    );
    assert_eq!(
        err(h.one(
            A,
            Request::Send {
                port: b"p",
                payload: b"12345"
            }
        )),
        PayloadTooLarge
    );
    h.register(A, "p1");
    h.register(A, "p2");
    assert_eq!(err(h.register(A, "p3")), PortsPerSessionMax);
    h.one(
        A,
        Request::Watch {
            name: b"w1",
            prefix: false,
        },
    );
    assert_eq!(
        err(h.one(
            A,
            Request::Watch {
                name: b"w2",
                prefix: false
            }
        )),
        WatchesPerSessionMax
    );
    assert_eq!(
        err(h.one(
            A,
            Request::Watch {
                name: b"pre",
                prefix: true
            }
        )),
        WatchesPerSessionMax
    );
    h.one(
        B,
        Request::Watch {
            name: b"pre",
            prefix: true,
        },
    );
    assert_eq!(
        err(h.one(
            C,
            Request::Watch {
                name: b"pre",
                prefix: true
            }
        )),
        PrefixWatchesMax
    );
    assert!(matches!(h.one(B, reg("p1", true)), Out::Queued(_, 1)));
    assert_eq!(err(h.one(C, reg("p1", true))), QueueFull);
    // The core is still consistent after every refusal.
    assert_eq!(h.core.stats().ports_owned, 2);
    assert_eq!(h.core.stats().waiters, 1);
}

#[test]
fn unregister_leaves_a_queue() {
    let mut h = H::new();
    h.session(A, 1_000);
    h.session(B, 1_000);
    h.session(C, 1_000);
    h.register(A, "l");
    h.one(B, reg("l", true));
    h.one(C, reg("l", true));
    assert!(matches!(
        h.one(B, Request::Unregister { port: b"l" }),
        Out::Ok(_)
    ));
    let outs = h.req(A, Request::Unregister { port: b"l" });
    assert!(outs
        .iter()
        .any(|(c, o)| *c == C && matches!(o, Out::Acquired(..))));
    assert!(!outs.iter().any(|(c, _)| *c == B));
}

#[test]
fn a_session_with_many_ports_is_released_a_step_at_a_time() {
    let mut h = H::with(Config {
        release_step_ports_max: 3,
        ..Config::default()
    });
    let (sa, secret) = h.session(A, 60_000);
    h.session(B, 60_000);
    h.session(W, 60_000);
    let names: Vec<String> = (0..8).map(|i| format!("p{i}")).collect();
    for n in &names {
        h.register(A, n);
    }
    h.one(
        W,
        Request::Watch {
            name: b"p",
            prefix: true,
        },
    );
    assert!(matches!(h.one(B, reg("p0", true)), Out::Queued(..)));
    // BYE ends the session; the first step releases 3 of its 8 ports at once.
    let outs = h.req(A, Request::Bye);
    let released = |outs: &[(u64, Out)]| {
        outs.iter()
            .filter(|(c, o)| *c == W && matches!(o, Out::Released(..)))
            .count()
    };
    assert_eq!(
        released(&outs),
        0,
        "more than one step's worth: released later"
    );
    assert_eq!(h.core.stats().ports_owned, 8);
    assert!(h.core.next_deadline().is_some_and(|d| d <= h.now));
    // Nobody can resume a session that has ended.
    let mut r = hello(60_000, false);
    r.resume_session = sa;
    r.resume_secret = secret;
    assert!(matches!(
        h.one(C, Request::Hello(r)),
        Out::Err(_, ErrorCode::ResumeFailed)
    ));
    // Each timer step releases at most 3, and watchers hear of every one; the queued
    // session gets p0 when its turn comes.
    let mut total = 0;
    let mut acquired = false;
    for step in 0..3 {
        let outs = h.advance(0);
        let n = released(&outs);
        assert!(n <= 3, "step {step} released {n}");
        total += n;
        acquired |= outs
            .iter()
            .any(|(c, o)| *c == B && matches!(o, Out::Acquired(p, _) if p == "p0"));
    }
    assert_eq!(total, 8);
    assert!(acquired, "the waiter got p0");
    assert_eq!(h.core.stats().ports_owned, 1, "only B's p0 is owned");
    assert_eq!(h.core.stats().sessions, 2, "A is gone; B and W remain");
    assert_eq!(h.core.next_deadline().map(|d| d > h.now), Some(true));
}
