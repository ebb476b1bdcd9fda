//! Access control in the core: every operation checked against the session's grants.

mod common;

use common::*;
use portswitch_core::{Access, Grant, Identity, Perm, Perms, Role};
use portswitch_proto::{ErrorCode, Request};

fn ident(user: &str, grants: &[(&str, &str)]) -> Identity {
    let role = Role {
        name: format!("{user}-role"),
        grants: grants
            .iter()
            .map(|(prefix, perms)| Grant {
                prefix: prefix.as_bytes().to_vec(),
                perms: Perms::parse(perms).unwrap(),
            })
            .collect(),
    };
    Identity {
        user: user.into(),
        access: Access::of([&role]),
    }
}

fn denied(o: &Out) -> bool {
    matches!(o, Out::Err(_, ErrorCode::PermissionDenied))
}

#[test]
fn each_operation_needs_its_permission_on_the_name() {
    let mut h = H::new();
    let root = Identity {
        user: "root".into(),
        access: Access::all(),
    };
    h.session_as(9, &root);
    h.register(9, "app/x"); // owned by someone, so QUERY/SEND have a target
    let ops: Vec<(Perm, Request<'static>)> = vec![
        (
            Perm::Register,
            Request::Register {
                port: b"app/x",
                value: b"",
                wait: true,
            },
        ),
        (Perm::Query, Request::Query { port: b"app/x" }),
        (
            Perm::Watch,
            Request::Watch {
                name: b"app/x",
                prefix: false,
            },
        ),
        (
            Perm::Watch,
            Request::Watch {
                name: b"app/",
                prefix: true,
            },
        ),
        (
            Perm::Send,
            Request::Send {
                port: b"app/x",
                payload: b"hi",
            },
        ),
        (
            Perm::Broadcast,
            Request::Broadcast {
                prefix: Some(b"app/"),
                payload: b"hi",
            },
        ),
        (
            Perm::List,
            Request::List {
                prefix: b"app/",
                cursor: 0,
                limit: 10,
            },
        ),
    ];
    for (i, (perm, req)) in ops.iter().enumerate() {
        let conn = 100 + i as u64 * 2;
        // Granted everything but this permission, on the whole name space: denied.
        let others = Perm::ALL
            .into_iter()
            .filter(|p| p != perm)
            .fold(Perms::NONE, |a, p| a.with(p));
        let mut without = ident("u", &[]);
        without.access = Access::of([&Role {
            name: "r".into(),
            grants: vec![Grant {
                prefix: vec![],
                perms: others,
            }],
        }]);
        h.session_as(conn, &without);
        assert!(
            denied(&h.one(conn, *req)),
            "{perm:?} not granted yet {req:?} allowed"
        );
        // Granted this permission on another prefix only: denied.
        h.session_as(conn + 1, &ident("v", &[("other/", perm.name())]));
        assert!(
            denied(&h.one(conn + 1, *req)),
            "{perm:?} on other/ allowed {req:?}"
        );
        // Granted on a prefix of the name: allowed.
        h.session_as(conn + 1000, &ident("w", &[("app/", perm.name())]));
        assert!(
            !denied(&h.one(conn + 1000, *req)),
            "{perm:?} on app/ denied {req:?}"
        );
    }
    // Unregister needs register; a broadcast to everyone needs the empty prefix.
    h.session_as(50, &ident("q", &[("app/", "query")]));
    assert!(denied(&h.one(50, Request::Unregister { port: b"app/x" })));
    h.session_as(51, &ident("b", &[("app/", "broadcast")]));
    assert!(denied(&h.one(
        51,
        Request::Broadcast {
            prefix: None,
            payload: b"x"
        }
    )));
    h.session_as(52, &ident("c", &[("", "broadcast")]));
    assert!(matches!(
        h.one(
            52,
            Request::Broadcast {
                prefix: None,
                payload: b"x"
            }
        ),
        Out::Count(..)
    ));
}

#[test]
fn a_denied_command_inside_a_batch_fails_alone() {
    let mut h = H::new();
    h.session_as(1, &ident("alice", &[("mine/", "register,query")]));
    let outs = h.batch(
        1,
        &[
            Request::Register {
                port: b"mine/a",
                value: b"",
                wait: false,
            },
            Request::Register {
                port: b"theirs/b",
                value: b"",
                wait: false,
            },
            Request::Query { port: b"mine/a" },
        ],
    );
    assert!(matches!(outs[0].1, Out::Registered(..)));
    assert!(denied(&outs[1].1));
    assert!(matches!(outs[2].1, Out::Owner { .. }));
}

#[test]
fn only_the_same_user_may_resume_a_session() {
    let mut h = H::new();
    let alice = ident("alice", &[("", "all")]);
    let (sid, secret) = h.session_as(1, &alice);
    h.disconnect(1);
    let mut r = hello(10_000, false);
    r.resume_session = sid;
    r.resume_secret = secret;
    // Another user with the right secret cannot take it over...
    h.next_batch_as(2, &ident("mallory", &[("", "all")]), r);
    // ...nor can an unauthenticated HELLO.
    assert!(matches!(
        h.one(3, Request::Hello(r)),
        Out::Err(_, ErrorCode::ResumeFailed)
    ));
    h.next_batch_as(4, &alice, r);
}

trait ResumeAs {
    fn next_batch_as(&mut self, conn: u64, who: &Identity, r: portswitch_proto::Hello<'static>);
}

impl ResumeAs for H {
    fn next_batch_as(&mut self, conn: u64, who: &Identity, r: portswitch_proto::Hello<'static>) {
        let mut b = self.core.begin_batch(conn, self.now);
        self.core
            .handle_authenticated_hello(&mut b, 77, &r, who, b"", &mut self.out);
        let got = std::mem::take(&mut self.out.0);
        let expect_ok = who.user == "alice";
        assert_eq!(
            matches!(got[0].1, Out::HelloOk { resumed: true, .. }),
            expect_ok,
            "{} resuming: {got:?}",
            who.user
        );
        if !expect_ok {
            assert!(matches!(got[0].1, Out::Err(_, ErrorCode::ResumeFailed)));
        }
    }
}

#[test]
fn a_filtered_watch_needs_list_as_well_as_watch() {
    // A filter reads values, which events never carry: with watch alone a role could
    // learn a value a bit at a time from which events a filter lets through.
    let mut h = H::new();
    let ww = |prefix: &'static [u8]| Request::WatchWhere {
        prefix,
        filter: br#"text.startsWith("s")"#,
    };
    h.session_as(1, &ident("watcher", &[("app/", "watch")]));
    assert!(denied(&h.one(1, ww(b"app/"))));
    assert_eq!(h.core.stats().watch_filters, 0);
    // Watching without a filter is still allowed.
    assert!(matches!(
        h.one(
            1,
            Request::Watch {
                name: b"app/",
                prefix: true
            }
        ),
        Out::Watching(..)
    ));
    // List alone is not enough either.
    h.session_as(2, &ident("lister", &[("app/", "list")]));
    assert!(denied(&h.one(2, ww(b"app/"))));
    // List on another prefix, or on a narrower one, neither.
    h.session_as(3, &ident("other", &[("app/", "watch"), ("other/", "list")]));
    assert!(denied(&h.one(3, ww(b"app/"))));
    h.session_as(
        4,
        &ident("narrow", &[("app/", "watch"), ("app/x/", "list")]),
    );
    assert!(denied(&h.one(4, ww(b"app/"))));
    // Watch and list on a prefix of it: allowed.
    h.session_as(5, &ident("both", &[("app/", "watch,list")]));
    assert!(matches!(h.one(5, ww(b"app/")), Out::Watching(..)));
    h.session_as(6, &ident("split", &[("", "watch"), ("app/", "list")]));
    assert!(matches!(h.one(6, ww(b"app/sub/")), Out::Watching(..)));
    assert_eq!(h.core.stats().watch_filters, 2);
}
