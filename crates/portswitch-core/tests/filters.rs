//! LIST_WHERE and filtered prefix WATCHes, driven through the core: paging over a
//! filter, the evaluation bound, errors skipped and counted, compile errors typed, and
//! filters replaced and dropped with their watches.

mod common;

use common::*;
use portswitch_core::Config;
use portswitch_proto::{ErrorCode, Request};

const A: u64 = 1;
const B: u64 = 2;

fn reg_v<'a>(port: &'a str, value: &'a str) -> Request<'a> {
    Request::Register {
        port: port.as_bytes(),
        value: value.as_bytes(),
        wait: false,
    }
}

/// Pages through `prefix` with `filter`; returns (ports seen, calls, empty pages).
fn list_all(h: &mut H, prefix: &str, filter: &str, limit: u32) -> (Vec<String>, usize, usize) {
    let (mut seen, mut calls, mut empty) = (Vec::new(), 0, 0);
    let mut cursor = 0;
    loop {
        calls += 1;
        assert!(calls < 10_000, "the listing ends");
        match h.one(
            A,
            Request::ListWhere {
                prefix: prefix.as_bytes(),
                cursor,
                limit,
                filter: filter.as_bytes(),
            },
        ) {
            Out::Page { next, ports, .. } => {
                assert!(ports.len() <= limit as usize);
                empty += usize::from(ports.is_empty() && next != 0);
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
    (seen, calls, empty)
}

#[test]
fn list_where_pages_through_exactly_the_matching_ports() {
    let mut h = H::with(Config {
        list_scan_slots_max: 50,
        list_filter_entries_max: 16,
        ..Config::default()
    });
    h.session(A, 1_000);
    for i in 0..300 {
        let value = if i % 40 == 0 {
            "role=leader"
        } else {
            "role=follower"
        };
        h.one(A, reg_v(&format!("svc/{i:03}"), value));
        h.one(A, reg_v(&format!("other/{i:03}"), "role=leader"));
    }
    let (seen, calls, empty) = list_all(&mut h, "svc/", r#"text.endsWith("leader")"#, 5);
    let want: Vec<_> = (0..300)
        .filter(|i| i % 40 == 0)
        .map(|i| format!("svc/{i:03}"))
        .collect();
    assert_eq!(seen, want);
    assert!(calls > want.len() / 5, "{calls} calls");
    assert!(empty > 0, "a page may be empty and still not the end");
    // A filter on the name and the token.
    let (seen, ..) = list_all(
        &mut h,
        "",
        r#"name.matches("^other/00[0-4]$") && token > 0"#,
        3,
    );
    assert_eq!(
        seen,
        [
            "other/000",
            "other/001",
            "other/002",
            "other/003",
            "other/004"
        ]
    );
    // A filter nothing matches: no entries, yet every page ends only at the end.
    let (seen, ..) = list_all(&mut h, "", "false", 100);
    assert!(seen.is_empty());
    assert_eq!(h.core.stats().filter_errors_total, 0);
}

#[test]
fn list_where_skips_and_counts_entries_it_fails_on() {
    let mut h = H::new();
    h.session(A, 1_000);
    for (p, v) in [("n/a", "10"), ("n/b", "x"), ("n/c", "30"), ("n/d", "")] {
        h.one(A, reg_v(p, v));
    }
    // int("x") and int("") fail: those two are skipped (not matched), the rest listed.
    let (seen, ..) = list_all(&mut h, "n/", "int(text) > 5", 10);
    assert_eq!(seen, ["n/a", "n/c"]);
    assert_eq!(h.core.stats().filter_errors_total, 2);
}

#[test]
fn list_where_refuses_a_filter_that_does_not_compile() {
    let mut h = H::new();
    h.session(A, 1_000);
    h.register(A, "p");
    for bad in [
        "name ==",
        "nmae == \"p\"",
        "token + 1",
        "event == \"claimed\"",
        "",
    ] {
        let o = h.one(
            A,
            Request::ListWhere {
                prefix: b"",
                cursor: 0,
                limit: 10,
                filter: bad.as_bytes(),
            },
        );
        assert!(
            matches!(o, Out::Err(_, ErrorCode::QueryInvalid)),
            "{bad}: {o:?}"
        );
    }
    // Limits come first, as for LIST.
    let o = h.one(
        A,
        Request::ListWhere {
            prefix: b"",
            cursor: 0,
            limit: 0,
            filter: b"true",
        },
    );
    assert!(matches!(o, Out::Err(_, ErrorCode::ListLimit)), "{o:?}");
    // The session carries on.
    assert!(matches!(h.register(A, "q"), Out::Registered(..)));
}

#[test]
fn filtered_prefix_watch_sees_only_selected_events() {
    let mut h = H::new();
    h.session(A, 1_000);
    let (sb, _) = h.session(B, 1_000);
    let o = h.one(
        A,
        Request::WatchWhere {
            prefix: b"svc/",
            filter: br#"event == "released" || text == "up""#,
        },
    );
    assert!(matches!(o, Out::Watching(_, None)), "{o:?}");
    assert_eq!(h.core.stats().watch_filters, 1);
    // Claimed with "down": filtered out; released: delivered (the value before).
    assert_eq!(h.req(B, reg_v("svc/a", "down")).len(), 1);
    let outs = h.req(B, Request::Unregister { port: b"svc/a" });
    assert!(
        matches!(&outs[0], (A, Out::Released(p, _)) if p == "svc/a"),
        "{outs:?}"
    );
    // Claimed with "up": delivered.
    let outs = h.req(B, reg_v("svc/b", "up"));
    assert!(matches!(&outs[0], (A, Out::Claimed(p, s, _)) if p == "svc/b" && *s == sb));
    // Outside the prefix: nothing, whatever the filter says.
    assert_eq!(h.req(B, reg_v("x/b", "up")).len(), 1);

    // Watching the prefix again without a filter drops the filter.
    h.one(
        A,
        Request::Watch {
            name: b"svc/",
            prefix: true,
        },
    );
    assert_eq!(h.core.stats().watch_filters, 0);
    assert_eq!(h.core.stats().prefix_watches, 1);
    let outs = h.req(B, reg_v("svc/c", "down"));
    assert!(matches!(&outs[0], (A, Out::Claimed(..))), "{outs:?}");

    // And with one again sets it; an evaluation error delivers nothing and is counted.
    h.one(
        A,
        Request::WatchWhere {
            prefix: b"svc/",
            filter: b"int(text) > 0",
        },
    );
    assert_eq!(h.core.stats().watch_filters, 1);
    assert_eq!(h.req(B, reg_v("svc/d", "nope")).len(), 1);
    assert_eq!(h.core.stats().filter_errors_total, 1);
    let outs = h.req(B, reg_v("svc/e", "3"));
    assert!(matches!(&outs[0], (A, Out::Claimed(..))), "{outs:?}");

    // UNWATCH drops the watch and its filter.
    h.one(
        A,
        Request::Unwatch {
            name: b"svc/",
            prefix: true,
        },
    );
    let st = h.core.stats();
    assert_eq!((st.watch_filters, st.prefix_watches, st.watches), (0, 0, 0));
}

#[test]
fn filtered_watches_end_with_their_session_and_are_bounded() {
    let mut h = H::with(Config {
        watch_filters_max: 1,
        ..Config::default()
    });
    h.session(A, 1_000);
    h.session(B, 1_000);
    let w = |p: &'static [u8]| Request::WatchWhere {
        prefix: p,
        filter: b"true",
    };
    assert!(matches!(h.one(A, w(b"a/")), Out::Watching(..)));
    assert!(matches!(
        h.one(B, w(b"b/")),
        Out::Err(_, ErrorCode::PrefixWatchesMax)
    ));
    // Replacing one's own filter is not a new one.
    assert!(matches!(h.one(A, w(b"a/")), Out::Watching(..)));
    // A filter that does not compile: typed error, the watch keeps its filter.
    let o = h.one(
        A,
        Request::WatchWhere {
            prefix: b"a/",
            filter: b"(((",
        },
    );
    assert!(matches!(o, Out::Err(_, ErrorCode::QueryInvalid)), "{o:?}");
    assert_eq!(h.core.stats().watch_filters, 1);
    h.one(A, Request::Bye);
    let st = h.core.stats();
    assert_eq!((st.watch_filters, st.prefix_watches), (0, 0));
    assert!(matches!(h.one(B, w(b"b/")), Out::Watching(..)));
}

#[test]
fn one_session_holds_at_most_its_share_of_filtered_watches() {
    let mut h = H::with(Config {
        watch_filters_max: 4,
        watch_filters_per_session_max: 2,
        ..Config::default()
    });
    h.session(A, 1_000);
    h.session(B, 1_000);
    let w = |p: &'static [u8]| Request::WatchWhere {
        prefix: p,
        filter: b"true",
    };
    assert!(matches!(h.one(A, w(b"a/")), Out::Watching(..)));
    assert!(matches!(h.one(A, w(b"b/")), Out::Watching(..)));
    let o = h.one(A, w(b"c/"));
    assert!(
        matches!(o, Out::Err(_, ErrorCode::PrefixWatchesMax)),
        "{o:?}"
    );
    // Replacing one of its filters is not a new one; a watch without one is allowed.
    assert!(matches!(h.one(A, w(b"a/")), Out::Watching(..)));
    let o = h.one(
        A,
        Request::Watch {
            name: b"c/",
            prefix: true,
        },
    );
    assert!(matches!(o, Out::Watching(..)), "{o:?}");
    // Nor can it add a filter to that watch now.
    let o = h.one(A, w(b"c/"));
    assert!(
        matches!(o, Out::Err(_, ErrorCode::PrefixWatchesMax)),
        "{o:?}"
    );
    // Another session still has room.
    assert!(matches!(h.one(B, w(b"a/")), Out::Watching(..)));
    assert!(matches!(h.one(B, w(b"b/")), Out::Watching(..)));
    assert_eq!(h.core.stats().watch_filters, 4);
    // Dropping one of A's filters makes room for another of A's.
    h.one(
        A,
        Request::Watch {
            name: b"a/",
            prefix: true,
        },
    );
    assert!(matches!(h.one(A, w(b"c/")), Out::Watching(..)));
    assert_eq!(h.core.stats().watch_filters, 4);
}

#[test]
fn a_filtered_watch_on_releases_sees_the_value_and_owner_before_the_release() {
    const C: u64 = 3;
    const W: u64 = 4;
    let mut h = H::new();
    h.session(W, 10_000);
    let (sb, _) = h.session(B, 1_000);
    h.session(C, 10_000);
    let filter = format!(r#"event == "released" && text == "up" && session == "{sb:016x}""#);
    let o = h.one(
        W,
        Request::WatchWhere {
            prefix: b"svc/",
            filter: filter.as_bytes(),
        },
    );
    assert!(matches!(o, Out::Watching(..)), "{o:?}");
    // A second filtered watch on the same events: the record is shared, each decides.
    let o = h.one(A, Request::Hello(hello(10_000, false)));
    assert!(matches!(o, Out::HelloOk { .. }), "{o:?}");
    let o = h.one(
        A,
        Request::WatchWhere {
            prefix: b"svc/",
            filter: br#"event == "released" && text == "down""#,
        },
    );
    assert!(matches!(o, Out::Watching(..)), "{o:?}");

    let released = |outs: &[(u64, Out)], who: u64| -> Vec<String> {
        outs.iter()
            .filter(|(c, _)| *c == who)
            .filter_map(|(_, o)| match o {
                Out::Released(p, _) => Some(p.clone()),
                Out::Claimed(p, ..) => panic!("claimed {p} delivered"),
                _ => None,
            })
            .collect()
    };
    let mut all = Vec::new();
    let step = |h: &mut H, all: &mut Vec<(u64, Out)>, conn: u64, r: Request<'_>| {
        all.extend(h.req(conn, r));
    };
    // Claims: never delivered (the filters select releases only).
    step(&mut h, &mut all, B, reg_v("svc/a", "up"));
    step(&mut h, &mut all, B, reg_v("svc/b", "down"));
    step(&mut h, &mut all, C, reg_v("svc/c", "up"));
    step(&mut h, &mut all, B, reg_v("svc/d", "up"));
    step(&mut h, &mut all, B, reg_v("svc/e", "up"));
    step(&mut h, &mut all, B, reg_v("other/f", "up"));
    // B's "up": W. B's "down": A. C's "up": nobody (another session).
    step(&mut h, &mut all, B, Request::Unregister { port: b"svc/a" });
    step(&mut h, &mut all, B, Request::Unregister { port: b"svc/b" });
    step(&mut h, &mut all, C, Request::Unregister { port: b"svc/c" });
    // The value replaced before the release is the one seen: "down", for A.
    step(&mut h, &mut all, B, reg_v("svc/d", "down"));
    step(&mut h, &mut all, B, Request::Unregister { port: b"svc/d" });
    // Released to a waiter: the release is B's with B's value (W); the grant to C,
    // with C's value, is a claim (nobody).
    step(
        &mut h,
        &mut all,
        C,
        Request::Register {
            port: b"svc/e",
            value: b"up",
            wait: true,
        },
    );
    step(&mut h, &mut all, B, Request::Unregister { port: b"svc/e" });
    // Outside the prefix: nobody.
    step(
        &mut h,
        &mut all,
        B,
        Request::Unregister { port: b"other/f" },
    );
    // Released because B's session ends (lease): B's "up" again (W).
    step(&mut h, &mut all, B, reg_v("svc/g", "up"));
    step(&mut h, &mut all, B, reg_v("svc/h", "down"));
    all.extend(h.advance(5_000));
    // C, now owning svc/e with "up", releases it: not B's.
    step(&mut h, &mut all, C, Request::Unregister { port: b"svc/e" });
    let mut seen_w = released(&all, W);
    let mut seen_a = released(&all, A);
    seen_w.sort();
    seen_a.sort();
    assert_eq!(seen_w, ["svc/a", "svc/e", "svc/g"]);
    assert_eq!(seen_a, ["svc/b", "svc/d", "svc/h"]);
    assert_eq!(h.core.stats().filter_errors_total, 0);
}

#[test]
fn the_list_wheres_of_one_batch_share_a_budget_of_evaluations() {
    let mut h = H::with(Config {
        list_filter_entries_max: 4,
        filter_evals_per_batch_max: 10,
        ..Config::default()
    });
    h.session(A, 1_000);
    for i in 0..30 {
        h.one(A, reg_v(&format!("p/{i:02}"), "v"));
    }
    let lw = |cursor: u64| Request::ListWhere {
        prefix: b"p/",
        cursor,
        limit: 100,
        filter: br#"text == "v""#,
    };
    // Five in one frame: 4 + 4 + 2 evaluations, then empty pages that resume at the
    // start (a non-zero cursor).
    let outs = h.batch(A, &[lw(0), lw(0), lw(0), lw(0), lw(0)]);
    let pages: Vec<(u64, usize)> = outs
        .iter()
        .map(|(_, o)| match o {
            Out::Page { next, ports, .. } => (*next, ports.len()),
            other => panic!("{other:?}"),
        })
        .collect();
    assert_eq!(
        pages.iter().map(|p| p.1).collect::<Vec<_>>(),
        [4, 4, 2, 0, 0]
    );
    assert!(pages.iter().all(|p| p.0 != 0), "{pages:?}");
    assert_eq!(pages[3].0, pages[4].0);
    // That cursor, in a frame of its own, is the first page again.
    match h.one(A, lw(pages[4].0)) {
        Out::Page { ports, next, .. } => {
            assert_eq!(ports, ["p/00", "p/01", "p/02", "p/03"]);
            assert_eq!(next, pages[0].0);
        }
        other => panic!("{other:?}"),
    }
    // A listing paged in frames of many requests (all but the first of each frame
    // spending the rest of the budget or getting empty pages) still sees every port
    // exactly once.
    let mut seen = Vec::new();
    let mut cursor = 0;
    for frames in 1.. {
        assert!(frames < 100, "the listing ends");
        let outs = h.batch(A, &[lw(cursor), lw(cursor), lw(cursor)]);
        let Out::Page { next, ports, .. } = &outs[0].1 else {
            panic!("{outs:?}")
        };
        seen.extend(ports.iter().cloned());
        if *next == 0 {
            break;
        }
        cursor = *next;
    }
    let want: Vec<String> = (0..30).map(|i| format!("p/{i:02}")).collect();
    assert_eq!(seen, want);
    // Plain LIST is not counted.
    let outs = h.batch(
        A,
        &[
            lw(0),
            lw(0),
            lw(0),
            Request::List {
                prefix: b"p/",
                cursor: 0,
                limit: 100,
            },
        ],
    );
    assert!(matches!(&outs[3].1, Out::Page { ports, .. } if ports.len() == 30));
    // A filter that does not compile is still refused while the budget lasts.
    let outs = h.batch(
        A,
        &[Request::ListWhere {
            prefix: b"p/",
            cursor: 0,
            limit: 1,
            filter: b"(((",
        }],
    );
    assert!(matches!(outs[0].1, Out::Err(_, ErrorCode::QueryInvalid)));
}
