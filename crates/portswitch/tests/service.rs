//! The port switch service end to end: a real server on loopback, the real client.

mod common;

use std::time::Duration;

use common::*;
use portswitch_client::{
    Client, Discovery, DiscoveryChange, Election, Error, ErrorCode, Event, LeaderChange, Lock,
    RegisterOutcome, SendOutcome,
};
use portswitch_proto::Request;
use portswitch_server::ServerConfig;

async fn next_event(
    rx: &mut tokio::sync::broadcast::Receiver<Event>,
    f: impl Fn(&Event) -> bool,
) -> Event {
    within("event", async {
        loop {
            let e = rx.recv().await.expect("event stream open");
            if f(&e) {
                return e;
            }
        }
    })
    .await
}

#[tokio::test]
async fn register_query_unregister_with_tokens() {
    let srv = server().await;
    let a = client(&srv).await;
    let b = client(&srv).await;
    let RegisterOutcome::Owned { token } = a.register("db/primary", "10.0.0.7:5432").await.unwrap()
    else {
        panic!("not owned")
    };
    match b.register("db/primary", "x").await.unwrap() {
        RegisterOutcome::Taken {
            session, token: t, ..
        } => {
            assert_eq!((session, t), (a.session().id, token));
        }
        other => panic!("{other:?}"),
    }
    let owner = b.query("db/primary").await.unwrap().unwrap();
    assert_eq!(
        (owner.session, owner.token, &owner.value[..]),
        (a.session().id, token, &b"10.0.0.7:5432"[..])
    );
    assert_eq!(
        b.unregister("db/primary").await.unwrap_err().code(),
        Some(ErrorCode::NotOwner)
    );
    a.unregister("db/primary").await.unwrap();
    assert!(b.query("db/primary").await.unwrap().is_none());
    let RegisterOutcome::Owned { token: t2 } = b.register("db/primary", "").await.unwrap() else {
        panic!()
    };
    assert!(t2 > token, "a later grant has a higher token");
    srv.stop().await.unwrap();
}

#[tokio::test]
async fn wait_queue_hands_over_in_fifo_order() {
    let srv = server().await;
    let holder = client(&srv).await;
    holder.register("lock", "").await.unwrap();
    let mut waiters = Vec::new();
    for i in 0..5 {
        let c = client(&srv).await;
        match c.register_with(b"lock", b"", true).await.unwrap() {
            RegisterOutcome::Queued { position } => assert_eq!(position, i + 1),
            other => panic!("{other:?}"),
        }
        waiters.push(c);
    }
    let mut events: Vec<_> = waiters.iter().map(|c| c.events()).collect();
    let mut last = 0;
    holder.unregister("lock").await.unwrap();
    for (i, c) in waiters.iter().enumerate() {
        let Event::Acquired { token, .. } =
            next_event(&mut events[i], |e| matches!(e, Event::Acquired { .. })).await
        else {
            unreachable!()
        };
        assert!(token > last, "tokens rise along the queue");
        last = token;
        // Nobody behind is granted before this one lets go.
        for (j, later) in waiters.iter().enumerate().skip(i + 1) {
            assert!(
                later.owned_ports().is_empty(),
                "waiter {j} granted out of order"
            );
        }
        c.unregister("lock").await.unwrap();
    }
    srv.stop().await.unwrap();
}

#[tokio::test]
async fn lease_expiry_releases_ports_and_tells_watchers() {
    let srv = server().await;
    let watcher = client(&srv).await;
    let mut events = watcher.events();
    // A raw session sends nothing after registering: no heartbeats.
    let mut silent = Raw::session(&srv, 300, false).await;
    let r = silent
        .call(&[Request::Register {
            port: b"svc/x",
            value: b"",
            wait: false,
        }])
        .await;
    assert!(r[0].1.starts_with("Registered"), "{r:?}");
    assert!(watcher.watch("svc/x").await.unwrap().is_some());
    let e = next_event(&mut events, |e| matches!(e, Event::Released { .. })).await;
    assert!(matches!(e, Event::Released { ref port, .. } if &port[..] == b"svc/x"));
    assert_eq!(silent.goaway().await, Some(ErrorCode::SessionExpired));
    assert!(watcher.query("svc/x").await.unwrap().is_none());
    srv.stop().await.unwrap();
}

#[tokio::test]
async fn relay_and_broadcast() {
    let srv = server().await;
    let a = client(&srv).await;
    let b = client(&srv).await;
    let c = client(&srv).await;
    let (mut eb, mut ec) = (b.events(), c.events());
    b.register("svc/b", "").await.unwrap();
    c.register("svc/c", "").await.unwrap();
    assert_eq!(
        a.send("svc/b", "hello b").await.unwrap(),
        SendOutcome::Delivered
    );
    let m = next_event(&mut eb, |e| matches!(e, Event::Message { .. })).await;
    assert_eq!(
        m,
        Event::Message {
            from: a.session().id,
            port: "svc/b".into(),
            payload: "hello b".into()
        }
    );
    assert_eq!(
        a.send("svc/nobody", "x").await.unwrap(),
        SendOutcome::NoOwner
    );
    assert_eq!(a.broadcast(Some(b"svc/"), "to owners").await.unwrap(), 2);
    for rx in [&mut eb, &mut ec] {
        let m = next_event(rx, |e| matches!(e, Event::Message { .. })).await;
        assert!(matches!(m, Event::Message { ref payload, .. } if &payload[..] == b"to owners"));
    }
    assert_eq!(
        a.broadcast(None, "to all").await.unwrap(),
        2,
        "everyone but the sender"
    );
    srv.stop().await.unwrap();
}

#[tokio::test]
async fn listing_pages_through_many_ports() {
    let srv = server().await;
    let a = client(&srv).await;
    let futs: Vec<_> = (0..3000)
        .map(|i| a.register(format!("list/{i:05}"), "v"))
        .collect();
    for r in futures_join(futs).await {
        assert!(matches!(r.unwrap(), RegisterOutcome::Owned { .. }));
    }
    a.register("other/x", "").await.unwrap();
    let mut all = a.list_all("list/").await.unwrap();
    all.sort_by(|x, y| x.port.cmp(&y.port));
    assert_eq!(all.len(), 3000);
    assert_eq!(&all[0].port[..], b"list/00000");
    assert!(all
        .iter()
        .all(|o| o.session == a.session().id && &o.value[..] == b"v"));
    // Small pages: every port exactly once.
    let mut seen = Vec::new();
    let mut cursor = 0;
    loop {
        let page = a.list("list/", cursor, 7).await.unwrap();
        assert!(page.entries.len() <= 7);
        seen.extend(page.entries.into_iter().map(|o| o.port));
        if page.next_cursor == 0 {
            break;
        }
        cursor = page.next_cursor;
    }
    seen.sort();
    seen.dedup();
    assert_eq!(seen.len(), 3000);
    assert_eq!(
        a.list("", 0, 0).await.unwrap_err().code(),
        Some(ErrorCode::ListLimit)
    );
    srv.stop().await.unwrap();
}

/// Awaits many futures concurrently, so their requests are pipelined on one
/// connection (awaiting them one by one would send one request per round trip).
async fn futures_join<F: std::future::Future>(futs: Vec<F>) -> Vec<F::Output> {
    use std::task::Poll;
    let mut futs: Vec<_> = futs.into_iter().map(Box::pin).collect();
    let mut out: Vec<Option<F::Output>> = futs.iter().map(|_| None).collect();
    std::future::poll_fn(|cx| {
        let mut done = true;
        for (f, o) in futs.iter_mut().zip(out.iter_mut()) {
            if o.is_none() {
                match f.as_mut().poll(cx) {
                    Poll::Ready(v) => *o = Some(v),
                    Poll::Pending => done = false,
                }
            }
        }
        if done {
            Poll::Ready(())
        } else {
            Poll::Pending
        }
    })
    .await;
    out.into_iter()
        .map(|o| o.expect("every future finished"))
        .collect()
}

#[tokio::test]
async fn pipelined_requests_from_many_tasks_are_batched() {
    let srv = server().await;
    let a = client(&srv).await;
    let mut tasks = Vec::new();
    for t in 0..16 {
        let a = a.clone();
        tasks.push(tokio::spawn(async move {
            for i in 0..200 {
                let name = format!("p/{t}/{i}");
                assert!(matches!(
                    a.register(&name, "").await.unwrap(),
                    RegisterOutcome::Owned { .. }
                ));
                a.unregister(&name).await.unwrap();
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let stats = a.stats().await.unwrap();
    let get = |k: &str| stats.iter().find(|(n, _)| n == k).unwrap().1;
    assert_eq!(get("grants_total"), 3200);
    assert_eq!(get("ports_owned"), 0);
    srv.stop().await.unwrap();
}

#[tokio::test]
async fn end_on_disconnect_session_releases_when_its_connection_drops() {
    let srv = server().await;
    let watcher = client(&srv).await;
    let mut events = watcher.events();
    let mut raw = Raw::session(&srv, 60_000, true).await;
    raw.call(&[Request::Register {
        port: b"fast",
        value: b"",
        wait: false,
    }])
    .await;
    watcher.watch("fast").await.unwrap();
    drop(raw);
    next_event(&mut events, |e| matches!(e, Event::Released { .. })).await;
    srv.stop().await.unwrap();
}

#[tokio::test]
async fn a_detached_session_keeps_its_ports_and_can_be_resumed() {
    let srv = server().await;
    let a = client(&srv).await;
    a.register("keep", "v").await.unwrap();
    let id = a.session().id;
    let (sid, secret) = a.detach();
    assert_eq!(sid, id);
    let b = client(&srv).await;
    eventually_async("detached session still owns the port", || async {
        b.query("keep")
            .await
            .unwrap()
            .is_some_and(|o| o.session == id)
    })
    .await;
    let mut o = opts(&srv);
    o.resume = Some((sid, secret ^ 1));
    let err = Client::connect(o.clone()).await.unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::ResumeFailed));
    o.resume = Some((sid, secret));
    let resumed = Client::connect(o).await.unwrap();
    assert_eq!(resumed.session().id, id);
    resumed.unregister("keep").await.unwrap();
    assert!(b.query("keep").await.unwrap().is_none());
    srv.stop().await.unwrap();
}

#[tokio::test]
async fn the_client_reports_ownership_lost_when_the_server_is_gone() {
    let srv = server().await;
    let mut o = opts(&srv);
    o.lease = Duration::from_millis(400);
    let a = Client::connect(o).await.unwrap();
    let mut events = a.events();
    a.register("mine", "").await.unwrap();
    srv.stop().await.unwrap();
    let e = next_event(&mut events, |e| matches!(e, Event::OwnershipLost { .. })).await;
    let Event::OwnershipLost { ports, .. } = e else {
        unreachable!()
    };
    assert_eq!(ports.len(), 1);
    assert_eq!(&ports[0].0[..], b"mine");
    assert!(!a.is_alive());
    assert!(matches!(a.query("x").await, Err(Error::SessionLost(_))));
}

#[tokio::test]
async fn the_client_resumes_after_a_dropped_connection() {
    // A relay between client and server lets the test cut the connection.
    let srv = server().await;
    let relay = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let relay_addr = relay.local_addr().unwrap();
    let target = srv.addr;
    let (cut_tx, _) = tokio::sync::broadcast::channel::<()>(4);
    let cut = cut_tx.clone();
    tokio::spawn(async move {
        loop {
            let (mut inbound, _) = relay.accept().await.unwrap();
            let mut outbound = tokio::net::TcpStream::connect(target).await.unwrap();
            let mut cut = cut.subscribe();
            tokio::spawn(async move {
                tokio::select! {
                    _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
                    _ = cut.recv() => {}
                }
            });
        }
    });
    let mut o = opts(&srv);
    o.addr = relay_addr.to_string();
    o.lease = Duration::from_secs(5);
    let a = Client::connect(o).await.unwrap();
    let mut events = a.events();
    let RegisterOutcome::Owned { token } = a.register("survives", "").await.unwrap() else {
        panic!()
    };
    cut_tx.send(()).unwrap();
    next_event(&mut events, |e| matches!(e, Event::Reconnected)).await;
    let owner = a.query("survives").await.unwrap().unwrap();
    assert_eq!(
        (owner.session, owner.token),
        (a.session().id, token),
        "same session, same grant"
    );
    assert!(a.is_alive());
    srv.stop().await.unwrap();
}

#[tokio::test]
async fn lock_election_and_discovery_recipes() {
    let srv = server().await;
    let a = client(&srv).await;
    let b = client(&srv).await;

    // Lock: exclusive, FIFO, fencing tokens rise.
    let la = Lock::acquire(&a, "locks/job").await.unwrap();
    assert!(la.is_held());
    assert!(Lock::try_acquire(&b, "locks/job").await.unwrap().is_none());
    let b2 = b.clone();
    let waiting = tokio::spawn(async move { Lock::acquire(&b2, "locks/job").await });
    tokio::time::sleep(Duration::from_millis(20)).await;
    assert!(!waiting.is_finished());
    let ta = la.token();
    la.release().await.unwrap();
    let lb = within("lock handover", waiting).await.unwrap().unwrap();
    assert!(lb.token() > ta);
    lb.release().await.unwrap();

    // Election: observe, campaign, resign.
    let ea = Election::new(&a, "elect/svc");
    let eb = Election::new(&b, "elect/svc");
    let observer = client(&srv).await;
    let mut watch = Election::new(&observer, "elect/svc")
        .observe()
        .await
        .unwrap();
    assert_eq!(
        within("state", watch.next()).await,
        Some(LeaderChange::Vacant)
    );
    let leader_a = ea.campaign("a:1").await.unwrap();
    match within("leader", watch.next()).await {
        Some(LeaderChange::Leader(o)) => assert_eq!(&o.value[..], b"a:1"),
        other => panic!("{other:?}"),
    }
    let eb2 = eb.clone();
    let campaign_b = tokio::spawn(async move { eb2.campaign("b:1").await });
    leader_a.resign().await.unwrap();
    let leader_b = within("b elected", campaign_b).await.unwrap().unwrap();
    assert!(leader_b.token() > 0);
    let mut saw_b = false;
    while let Some(change) = within("change", watch.next()).await {
        if let LeaderChange::Leader(o) = change {
            if &o.value[..] == b"b:1" {
                saw_b = true;
                break;
            }
        }
    }
    assert!(saw_b);
    assert_eq!(&ea.leader().await.unwrap().unwrap().value[..], b"b:1");

    // Discovery: register, list, watch.
    let da = Discovery::new(&a, "api");
    let db = Discovery::new(&b, "api");
    let viewer = Discovery::new(&observer, "api");
    let mut changes = viewer.watch().await.unwrap();
    da.register("a", "10.0.0.1:80").await.unwrap();
    assert!(
        db.register("a", "10.0.0.2:80").await.is_err(),
        "instance names are exclusive"
    );
    db.register("b", "10.0.0.2:80").await.unwrap();
    let mut up = Vec::new();
    while up.len() < 2 {
        if let Some(DiscoveryChange::Up { instance, addr }) = within("up", changes.next()).await {
            up.push((instance, addr));
        }
    }
    let mut listed = viewer.instances().await.unwrap();
    listed.sort();
    assert_eq!(
        listed,
        vec![
            ("a".into(), "10.0.0.1:80".into()),
            ("b".into(), "10.0.0.2:80".into())
        ]
    );
    b.close().await.unwrap();
    loop {
        if let Some(DiscoveryChange::Down { instance }) = within("down", changes.next()).await {
            assert_eq!(instance, "b");
            break;
        }
    }
    srv.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn short_leases_hold_under_full_load() {
    // 64 sessions with 300 ms leases, all busy for a while: none may be expired.
    let srv = server().await;
    let mut clients = Vec::new();
    for _ in 0..64 {
        let mut o = opts(&srv);
        o.lease = Duration::from_millis(300);
        clients.push(Client::connect(o).await.unwrap());
    }
    let deadline = tokio::time::Instant::now() + Duration::from_millis(1500);
    let mut tasks = Vec::new();
    for (i, c) in clients.iter().enumerate() {
        let c = c.clone();
        tasks.push(tokio::spawn(async move {
            let mut n = 0u64;
            while tokio::time::Instant::now() < deadline {
                let name = format!("load/{i}/{}", n % 64);
                c.register(&name, "").await.unwrap();
                c.unregister(&name).await.unwrap();
                n += 1;
            }
            n
        }));
    }
    let mut total = 0;
    for t in tasks {
        total += t.await.unwrap();
    }
    assert!(total > 0);
    assert!(
        clients.iter().all(|c| c.is_alive()),
        "a client saw its lease run out"
    );
    let stats = clients[0].stats().await.unwrap();
    let expired = stats
        .iter()
        .find(|(n, _)| n == "sessions_expired_total")
        .unwrap()
        .1;
    assert_eq!(expired, 0, "false expiries under load");
    srv.stop().await.unwrap();
}

#[tokio::test]
async fn metrics_and_health_over_http() {
    let srv = server().await;
    let a = client(&srv).await;
    a.register("m", "").await.unwrap();
    let http = srv.http_addr.unwrap();
    let get = |path: &'static str| async move {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut s = tokio::net::TcpStream::connect(http).await.unwrap();
        s.write_all(
            format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await
        .unwrap();
        let mut body = String::new();
        s.read_to_string(&mut body).await.unwrap();
        body
    };
    let health = get("/health").await;
    assert!(health.starts_with("HTTP/1.1 200"), "{health}");
    assert!(health.contains("\"ports_owned\":1"), "{health}");
    let metrics = get("/metrics").await;
    assert!(metrics.contains("portswitch_ports_owned 1"), "{metrics}");
    assert!(metrics.contains("portswitch_grants_total 1"), "{metrics}");
    srv.stop().await.unwrap();
}

#[tokio::test]
async fn graceful_shutdown_tells_clients() {
    let srv = server().await;
    let mut raw = Raw::session(&srv, 10_000, false).await;
    srv.stop().await.unwrap();
    assert_eq!(raw.goaway().await, Some(ErrorCode::ShuttingDown));
}

#[tokio::test]
async fn default_server_config_waits_for_a_fresh_epoch() {
    // Two servers started one after the other never share an epoch.
    let mut cfg = ServerConfig::ephemeral();
    cfg.epoch = None;
    let s1 = server_with(cfg.clone()).await;
    let e1 = client(&s1).await.session().epoch;
    s1.stop().await.unwrap();
    let s2 = server_with(cfg).await;
    let e2 = client(&s2).await.session().epoch;
    assert!(e2 > e1, "epoch {e2} after {e1}");
    s2.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stampede_of_hellos_is_admitted_at_hello_rate_max_and_all_get_in() {
    let srv = server_with(ServerConfig {
        hello_rate_max: 100,
        ..ServerConfig::ephemeral()
    })
    .await;
    // 300 sessions at once: the first 100 pass, the rest are told when to retry.
    let mut tasks = Vec::new();
    for _ in 0..300 {
        let o = opts(&srv);
        tasks.push(tokio::spawn(async move { Client::connect(o).await }));
    }
    let mut clients = Vec::new();
    for t in tasks {
        clients.push(t.await.unwrap().expect("every client gets in"));
    }
    let stats: std::collections::HashMap<_, _> =
        clients[0].stats().await.unwrap().into_iter().collect();
    assert!(stats["hellos_throttled_total"] > 0, "{stats:?}");
    assert_eq!(stats["sessions"], 300);
    srv.stop().await.unwrap();
}
