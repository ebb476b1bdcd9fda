//! A new master's recovery window: sessions of the earlier master are adopted, their
//! ports reclaimed with their tokens, and nothing unknown is granted until it closes.

mod common;

use common::*;
use portswitch_core::{Access, Config, Core, Identity};
use portswitch_proto::{ErrorCode, Request};

const A: u64 = 1;
const B: u64 = 2;
const C: u64 = 3;
const WINDOW: u64 = 10_000;

/// The earlier master (epoch 5, secret keys 22/33, see `H::with`).
fn old_master() -> H {
    H::new()
}

/// A later master of the same group (same secret keys, its own table seed), in its
/// recovery window from time `now`.
fn new_master(now: u64) -> H {
    let mut h = H::from_core(Core::new(Config::default(), 6, [77, 22, 33]));
    h.now = now;
    h.core.start_recovery(now, WINDOW);
    h
}

fn resume(h: &mut H, conn: u64, session: u64, secret: u64) -> Out {
    let mut r = hello(60_000, false);
    r.resume_session = session;
    r.resume_secret = secret;
    h.one(conn, Request::Hello(r))
}

fn reclaim(h: &mut H, conn: u64, port: &str, token: u64) -> Out {
    h.one(
        conn,
        Request::Reclaim {
            port: port.as_bytes(),
            token,
            value: b"v",
        },
    )
}

fn register_wait(h: &mut H, conn: u64, port: &str) -> Out {
    h.one(
        conn,
        Request::Register {
            port: port.as_bytes(),
            value: b"",
            wait: true,
        },
    )
}

#[test]
fn failover_keeps_sessions_ports_and_tokens() {
    let mut old = old_master();
    let (sa, secret_a) = old.session(A, 5_000);
    let tx = token_of(&old.register(A, "x"));
    let ty = token_of(&old.register(A, "y"));
    assert_eq!(tx >> 32, 5);

    let mut h = new_master(1_000);
    assert_eq!(h.core.recovery_left_ms(), Some(WINDOW));
    // A resumes on the new master and keeps its id.
    assert!(
        matches!(resume(&mut h, A, sa, secret_a), Out::HelloOk { resumed: true, session, .. } if session == sa)
    );
    assert!(matches!(reclaim(&mut h, A, "x", tx), Out::Registered(_, t) if t == tx));
    // Reclaiming again is harmless and keeps the token.
    assert!(matches!(reclaim(&mut h, A, "x", tx), Out::Registered(_, t) if t == tx));

    // A new session sees reclaimed ports as owned, with their tokens...
    h.session(B, 60_000);
    assert!(
        matches!(h.one(B, Request::Query { port: b"x" }), Out::Owner { session, token, .. } if session == sa && token == tx)
    );
    assert_eq!(
        h.one(
            B,
            Request::Watch {
                name: b"x",
                prefix: false
            }
        ),
        Out::Watching(6, Some((sa, tx)))
    );
    // ...and nothing it cannot know yet: y is not reclaimed yet.
    assert!(matches!(
        h.register(B, "y"),
        Out::Err(_, ErrorCode::Recovering)
    ));
    assert!(matches!(
        h.one(B, Request::Query { port: b"y" }),
        Out::Err(_, ErrorCode::Recovering)
    ));
    assert!(matches!(
        h.one(
            B,
            Request::Send {
                port: b"y",
                payload: b"hi"
            }
        ),
        Out::Err(_, ErrorCode::Recovering)
    ));
    assert!(matches!(register_wait(&mut h, B, "y"), Out::Queued(_, 1)));
    // The owner reclaims y after all; the waiter stays queued behind it.
    assert!(matches!(reclaim(&mut h, A, "y", ty), Out::Registered(_, t) if t == ty));
    assert!(matches!(register_wait(&mut h, B, "y"), Out::Queued(_, 1)));

    // The window closes: everyone hears RECOVERED; the owners keep their ports.
    let outs = h.advance(WINDOW);
    assert!(outs.contains(&(A, Out::Recovered)));
    assert!(outs.contains(&(B, Out::Recovered)));
    assert_eq!(outs.len(), 2, "{outs:?}");
    assert_eq!(h.core.recovery_left_ms(), None);
    // New grants carry the new epoch, above every reclaimed token.
    let tz = token_of(&h.register(B, "z"));
    assert_eq!(tz >> 32, 6);
    assert!(tz > tx && tz > ty);
    // Releasing y hands it to the waiter with a fresh, higher token.
    let outs = h.req(A, Request::Unregister { port: b"y" });
    let acquired = outs
        .iter()
        .find_map(|(c, o)| match o {
            Out::Acquired(p, t) if *c == B && p == "y" => Some(*t),
            _ => None,
        })
        .expect("the waiter gets y");
    assert!(acquired > ty);
    let st = h.core.stats();
    assert_eq!(st.sessions_adopted_total, 1);
    assert_eq!(st.ports_reclaimed_total, 2);
}

#[test]
fn unreclaimed_ports_are_free_when_the_window_closes_and_go_to_waiters() {
    let mut old = old_master();
    let (sa, secret_a) = old.session(A, 5_000);
    let tu = token_of(&old.register(A, "u"));
    old.register(A, "v");

    let mut h = new_master(0);
    h.session(B, 60_000);
    h.session(C, 60_000);
    h.one(
        C,
        Request::Watch {
            name: b"",
            prefix: true,
        },
    );
    assert!(matches!(register_wait(&mut h, B, "u"), Out::Queued(_, 1)));
    // A resumes late in the window and reclaims only "v" (it no longer holds "u").
    h.advance(WINDOW - 1);
    assert!(matches!(
        resume(&mut h, A, sa, secret_a),
        Out::HelloOk { .. }
    ));
    assert!(matches!(
        reclaim(&mut h, A, "v", tu + 1),
        Out::Registered(..)
    ));
    let outs = h.advance(1);
    // u goes to its waiter with a token of the new epoch; the prefix watcher is told;
    // everyone hears RECOVERED.
    let granted = outs
        .iter()
        .find_map(|(c, o)| match o {
            Out::Acquired(p, t) if *c == B && p == "u" => Some(*t),
            _ => None,
        })
        .expect("the waiter gets u");
    assert_eq!(granted >> 32, 6);
    assert!(outs
        .iter()
        .any(|(c, o)| *c == C && matches!(o, Out::Claimed(p, _, t) if p == "u" && *t == granted)));
    for conn in [A, B, C] {
        assert!(outs.contains(&(conn, Out::Recovered)), "{conn}: {outs:?}");
    }
    // Nothing reclaimed "w": it is simply free now.
    let w = h.register(B, "w");
    assert!(matches!(w, Out::Registered(..)), "{w:?}");
    // The window is over: adoption and reclaim are refused.
    let (sb_old, secret_b_old) = old.session(B, 5_000);
    assert!(matches!(
        resume(&mut h, 9, sb_old, secret_b_old),
        Out::Err(_, ErrorCode::ResumeFailed)
    ));
    assert!(matches!(
        reclaim(&mut h, A, "u", tu),
        Out::Err(_, ErrorCode::ReclaimRefused)
    ));
}

#[test]
fn reclaim_is_refused_to_strangers_forgers_and_second_claimants() {
    let mut old = old_master();
    let (sa, secret_a) = old.session(A, 5_000);
    let (sb, secret_b) = old.session(B, 5_000);
    let tx = token_of(&old.register(A, "x"));

    let mut h = new_master(0);
    // A wrong secret is not adopted.
    assert!(matches!(
        resume(&mut h, A, sa, secret_a ^ 1),
        Out::Err(_, ErrorCode::ResumeFailed)
    ));
    // A session new to this master may not reclaim.
    h.session(C, 5_000);
    assert!(matches!(
        reclaim(&mut h, C, "x", tx),
        Out::Err(_, ErrorCode::ReclaimRefused)
    ));
    assert!(matches!(
        resume(&mut h, A, sa, secret_a),
        Out::HelloOk { .. }
    ));
    // Tokens must come from an earlier epoch.
    assert!(matches!(
        reclaim(&mut h, A, "x", 6 << 32 | 1),
        Out::Err(_, ErrorCode::ReclaimRefused)
    ));
    assert!(matches!(
        reclaim(&mut h, A, "x", 0),
        Out::Err(_, ErrorCode::ReclaimRefused)
    ));
    assert!(matches!(reclaim(&mut h, A, "x", tx), Out::Registered(_, t) if t == tx));
    // A second claimant of the same port is told who has it.
    assert!(matches!(
        resume(&mut h, B, sb, secret_b),
        Out::HelloOk { .. }
    ));
    assert!(matches!(reclaim(&mut h, B, "x", tx - 1), Out::Taken(_, s) if s == sa));
    // Names and values are checked as for REGISTER.
    assert!(matches!(
        reclaim(&mut h, B, "", tx),
        Out::Err(_, ErrorCode::EmptyName)
    ));
}

#[test]
fn adopted_sessions_expire_on_the_new_master_and_release_reclaimed_ports() {
    let mut old = old_master();
    let (sa, secret_a) = old.session(A, 5_000);
    let tx = token_of(&old.register(A, "x"));
    let mut h = new_master(0);
    h.session(B, 120_000);
    h.one(
        B,
        Request::Watch {
            name: b"x",
            prefix: false,
        },
    );
    assert!(matches!(
        resume(&mut h, A, sa, secret_a),
        Out::HelloOk { .. }
    ));
    let outs = h.req(
        A,
        Request::Reclaim {
            port: b"x",
            token: tx,
            value: b"",
        },
    );
    assert!(outs.contains(&(B, Out::Claimed("x".into(), sa, tx))));
    h.disconnect(A);
    // A's lease runs out: x is released (its owner is known to be gone), so its
    // watcher hears of it.
    let outs = h.advance(60_000);
    assert!(
        outs.contains(&(B, Out::Released("x".into(), tx))),
        "{outs:?}"
    );
}

#[test]
fn only_the_user_who_owned_a_session_may_have_it_adopted() {
    let alice = Identity {
        user: "alice".into(),
        access: Access::all(),
    };
    let mallory = Identity {
        user: "mallory".into(),
        access: Access::all(),
    };
    let mut old = old_master();
    let (sa, secret_a) = old.session_as(A, &alice);
    let mut h = new_master(0);
    let mut r = hello(5_000, false);
    r.resume_session = sa;
    r.resume_secret = secret_a;
    for (conn, who, adopted) in [(B, &mallory, false), (A, &alice, true)] {
        let mut b = h.core.begin_batch(conn, h.now);
        h.core
            .handle_authenticated_hello(&mut b, 1, &r, who, b"", &mut h.out);
        let outs = std::mem::take(&mut h.out.0);
        if adopted {
            assert!(matches!(&outs[0].1, Out::HelloOk { session, .. } if *session == sa));
        } else {
            assert!(matches!(&outs[0].1, Out::Err(_, ErrorCode::ResumeFailed)));
        }
    }
}

#[test]
fn a_port_reclaimed_and_released_in_the_window_is_known_free() {
    let mut old = old_master();
    let (sa, secret_a) = old.session(A, 5_000);
    let tp = token_of(&old.register(A, "p"));
    let tq = token_of(&old.register(A, "q"));

    let mut h = new_master(0);
    h.session(B, 60_000);
    h.session(C, 60_000);
    assert!(matches!(
        resume(&mut h, A, sa, secret_a),
        Out::HelloOk { .. }
    ));
    assert!(matches!(reclaim(&mut h, A, "p", tp), Out::Registered(..)));
    assert!(matches!(reclaim(&mut h, A, "q", tq), Out::Registered(..)));
    // B waits for q behind A.
    assert!(matches!(register_wait(&mut h, B, "q"), Out::Queued(_, 1)));
    // A lets go of both inside the window: q goes to its waiter at once...
    let outs = h.req(A, Request::Unregister { port: b"q" });
    assert!(
        outs.iter()
            .any(|(c, o)| *c == B && matches!(o, Out::Acquired(p, t) if p == "q" && *t >> 32 == 6)),
        "{outs:?}"
    );
    // ...and p is free for anyone: known, queried, registered, sent to.
    h.req(A, Request::Unregister { port: b"p" });
    assert!(matches!(
        h.one(C, Request::Query { port: b"p" }),
        Out::Free(_)
    ));
    assert!(matches!(
        h.one(
            C,
            Request::Send {
                port: b"p",
                payload: b"x"
            }
        ),
        Out::NoOwner(_)
    ));
    let t = token_of(&h.register(C, "p"));
    assert!(t > tp && t >> 32 == 6);
    // Released again, still known.
    h.req(C, Request::Unregister { port: b"p" });
    assert!(matches!(
        h.one(B, Request::Query { port: b"p" }),
        Out::Free(_)
    ));
    // A name nobody reclaimed is not.
    assert!(matches!(
        h.register(C, "r"),
        Out::Err(_, ErrorCode::Recovering)
    ));
    assert!(h.core.recovery_left_ms().is_some());
}

#[test]
fn sessions_of_the_earlier_master_requeue_ahead_of_newcomers() {
    let mut old = old_master();
    let (sa, secret_a) = old.session(A, 5_000);
    let mut h = new_master(0);
    // A newcomer queues for an unknown port first.
    let (sb, _) = h.session(B, 60_000);
    assert!(matches!(register_wait(&mut h, B, "job"), Out::Queued(_, 1)));
    // A waiter of the earlier master takes its place again: ahead of the newcomer.
    assert!(matches!(
        resume(&mut h, A, sa, secret_a),
        Out::HelloOk { .. }
    ));
    assert!(matches!(register_wait(&mut h, A, "job"), Out::Queued(_, 1)));
    assert_eq!(h.core.waiting(b"job"), vec![sa, sb]);
    // The window closes: the earlier waiter is granted first.
    let outs = h.advance(WINDOW);
    assert!(
        outs.iter()
            .any(|(c, o)| *c == A && matches!(o, Out::Acquired(p, _) if p == "job")),
        "{outs:?}"
    );
}

#[test]
fn the_core_knows_the_longest_lease_its_sessions_hold() {
    let mut h = H::new();
    assert_eq!(h.core.lease_ms_longest(), 0);
    h.session(A, 2_000);
    h.session(B, 30_000);
    assert_eq!(h.core.lease_ms_longest(), 30_000);
    h.req(B, Request::Bye);
    assert_eq!(h.core.lease_ms_longest(), 2_000);
    h.advance(2_001);
    assert_eq!(h.core.lease_ms_longest(), 0, "A expired");
}
