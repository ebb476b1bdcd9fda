//! Bad input and abusive clients: typed errors, only the offender disconnected, the
//! server keeps serving everyone else, memory stays bounded.

mod common;

use common::*;
use portswitch_client::{ErrorCode, RegisterOutcome, SendOutcome};
use portswitch_proto::limits::FRAME_BYTES_MAX;
use portswitch_proto::{msg::op, Request};
use portswitch_server::{RunningServer, ServerConfig};

fn small_limits() -> ServerConfig {
    let mut cfg = ServerConfig::ephemeral();
    let c = &mut cfg.core;
    c.port_name_bytes_max = 16;
    c.value_bytes_max = 8;
    c.payload_bytes_max = 8;
    c.ports_per_session_max = 2;
    c.watches_per_session_max = 1;
    c.queue_len_max = 1;
    c.sessions_max = 4;
    c.commands_per_frame_max = 8;
    c.lease_ms_min = 200;
    c.lease_ms_max = 10_000;
    c.list_limit_max = 10;
    c.prefix_watches_max = 1;
    cfg
}

fn err(r: &(u32, String)) -> &str {
    r.1.strip_prefix("Error ")
        .unwrap_or_else(|| panic!("expected an error, got {r:?}"))
}

#[tokio::test]
async fn every_limit_is_enforced_with_its_error() {
    let srv = server_with(small_limits()).await;
    let mut r = Raw::connect(&srv).await;
    // Before HELLO.
    assert_eq!(
        err(&r.call(&[Request::Query { port: b"x" }]).await[0]),
        "no_session"
    );
    // Lease bounds, version, credentials.
    assert_eq!(
        err(&r.call(&[Request::Hello(hello(199, false))]).await[0]),
        "lease_out_of_range"
    );
    assert_eq!(
        err(&r.call(&[Request::Hello(hello(10_001, false))]).await[0]),
        "lease_out_of_range"
    );
    let mut v2 = hello(1_000, false);
    v2.version_min = 2;
    v2.version_max = 9;
    assert_eq!(
        err(&r.call(&[Request::Hello(v2)]).await[0]),
        "version_unsupported"
    );
    let mut creds = hello(1_000, false);
    creds.credentials = b"alice:secret";
    assert_eq!(
        err(&r.call(&[Request::Hello(creds)]).await[0]),
        "auth_unavailable"
    );
    r.call(&[Request::Hello(hello(1_000, false))]).await;
    assert_eq!(
        err(&r.call(&[Request::Hello(hello(1_000, false))]).await[0]),
        "session_exists"
    );
    // Said before any credential check (here: "auth_unavailable").
    let mut creds = hello(1_000, false);
    creds.credentials = b"alice:secret";
    assert_eq!(
        err(&r.call(&[Request::Hello(creds)]).await[0]),
        "session_exists"
    );

    let long = [b'n'; 17];
    let replies = r
        .call(&[
            Request::Register {
                port: b"",
                value: b"",
                wait: false,
            },
            Request::Register {
                port: &long,
                value: b"",
                wait: false,
            },
            Request::Register {
                port: b"p",
                value: b"123456789",
                wait: false,
            },
            Request::Send {
                port: b"p",
                payload: b"123456789",
            },
            Request::List {
                prefix: b"",
                cursor: 0,
                limit: 11,
            },
            Request::Register {
                port: b"p1",
                value: b"",
                wait: false,
            },
            Request::Register {
                port: b"p2",
                value: b"",
                wait: false,
            },
            Request::Register {
                port: b"p3",
                value: b"",
                wait: false,
            },
        ])
        .await;
    let got: Vec<&str> = replies
        .iter()
        .map(|r| r.1.strip_prefix("Error ").unwrap_or("ok"))
        .collect();
    assert_eq!(
        got,
        [
            "empty_name",
            "name_too_long",
            "value_too_large",
            "payload_too_large",
            "list_limit",
            "ok",
            "ok",
            "ports_per_session_max"
        ]
    );
    let w = r
        .call(&[
            Request::Watch {
                name: b"w1",
                prefix: false,
            },
            Request::Watch {
                name: b"w2",
                prefix: false,
            },
        ])
        .await;
    assert_eq!(err(&w[1]), "watches_per_session_max");

    let mut b = Raw::session(&srv, 1_000, false).await;
    let mut c = Raw::session(&srv, 1_000, false).await;
    assert!(b
        .call(&[Request::Register {
            port: b"p1",
            value: b"",
            wait: true
        }])
        .await[0]
        .1
        .starts_with("Queued"));
    assert_eq!(
        err(&c
            .call(&[Request::Register {
                port: b"p1",
                value: b"",
                wait: true
            }])
            .await[0]),
        "queue_full"
    );
    assert!(b
        .call(&[Request::Watch {
            name: b"pre/",
            prefix: true
        }])
        .await[0]
        .1
        .starts_with("Watching"));
    assert_eq!(
        err(&c
            .call(&[Request::Watch {
                name: b"pre/",
                prefix: true
            }])
            .await[0]),
        "prefix_watches_max"
    );
    let _d = Raw::session(&srv, 1_000, false).await;
    let mut e = Raw::connect(&srv).await;
    assert_eq!(
        err(&e.call(&[Request::Hello(hello(1_000, false))]).await[0]),
        "sessions_max"
    );

    // Unknown opcodes and bad flag bits fail alone; the connection carries on.
    let mut frame = vec![0, 0, 0, 0];
    frame.extend_from_slice(&[0x7E, 0, 0, 0, 99, 0, 0, 0, 0]); // opcode 0x7E, id 99, empty
    frame.extend_from_slice(&[
        op::REGISTER,
        0,
        0,
        0,
        100,
        0,
        0,
        0,
        6,
        0x80,
        0,
        1,
        b'z',
        0,
        0,
    ]);
    let len = (frame.len() - 4) as u32;
    frame[..4].copy_from_slice(&len.to_be_bytes());
    r.send_bytes(&frame).await;
    assert_eq!(
        within("reply", r.next()).await,
        Some(Msg::Error(99, ErrorCode::UnknownCommand))
    );
    assert_eq!(
        within("reply", r.next()).await,
        Some(Msg::Error(100, ErrorCode::InvalidArgument))
    );
    assert!(r.call(&[Request::Ping]).await[0].1.starts_with("Ok"));
    srv.stop().await.unwrap();
}

#[tokio::test]
async fn too_many_commands_or_an_oversized_frame_close_only_that_connection() {
    let srv = server_with(small_limits()).await;
    let healthy = client(&srv).await;
    healthy.register("mine", "").await.unwrap();

    let mut many = Raw::session(&srv, 1_000, false).await;
    let pings = vec![Request::Ping; 9];
    many.send(&pings).await;
    assert_eq!(many.goaway().await, Some(ErrorCode::TooManyCommands));

    let mut huge = Raw::session(&srv, 1_000, false).await;
    huge.send_bytes(&((FRAME_BYTES_MAX as u32 + 1).to_be_bytes()))
        .await;
    assert_eq!(huge.goaway().await, Some(ErrorCode::FrameTooLarge));

    assert_eq!(
        healthy.query("mine").await.unwrap().unwrap().session,
        healthy.session().id
    );
    srv.stop().await.unwrap();
}

#[tokio::test]
async fn garbage_from_many_connections_leaves_other_sessions_unaffected() {
    let srv = server().await;
    let healthy = client(&srv).await;
    let RegisterOutcome::Owned { token } = healthy.register("svc/healthy", "v").await.unwrap()
    else {
        panic!()
    };
    let mut rng = fastrand::Rng::with_seed(7);
    let mut tasks = Vec::new();
    for i in 0..64 {
        let mut junk: Vec<u8> = (0..rng.usize(1..4096)).map(|_| rng.u8(..)).collect();
        match i % 4 {
            // A plausible header followed by nonsense messages.
            0 => {
                let n = (junk.len() as u32).min(60_000);
                junk.splice(0..0, n.to_be_bytes());
            }
            // A zero-length frame.
            1 => junk.splice(0..0, [0, 0, 0, 0]).for_each(drop),
            // A message header that overruns its frame.
            2 => junk = vec![0, 0, 0, 10, op::PING, 0, 0, 0, 1, 0xFF, 0xFF, 0xFF, 0xFF, 0],
            _ => {}
        }
        let mut raw = Raw::connect(&srv).await;
        tasks.push(tokio::spawn(async move {
            raw.send_bytes(&junk).await;
            // Whatever happens, the server answers or closes; it never hangs on us.
            let _ = tokio::time::timeout(std::time::Duration::from_millis(200), raw.goaway()).await;
        }));
        // Healthy traffic interleaved with the garbage.
        assert_eq!(
            healthy.send("svc/healthy", "ping").await.unwrap(),
            SendOutcome::Delivered
        );
    }
    for t in tasks {
        t.await.unwrap();
    }
    let owner = healthy.query("svc/healthy").await.unwrap().unwrap();
    assert_eq!((owner.session, owner.token), (healthy.session().id, token));
    let stats = healthy.stats().await.unwrap();
    let malformed = stats
        .iter()
        .find(|(n, _)| n == "malformed_disconnects_total")
        .unwrap()
        .1;
    assert!(malformed >= 32, "{malformed} malformed disconnects");
    srv.stop().await.unwrap();
}

/// A session that owns the port `sink` and reads nothing after that.
async fn sink_that_never_reads(srv: &RunningServer) -> Raw {
    let mut slow = Raw::session(srv, 10_000, true).await;
    slow.send(&[Request::Register {
        port: b"sink",
        value: b"",
        wait: false,
    }])
    .await;
    slow
}

#[tokio::test]
async fn a_slow_consumer_is_disconnected_and_server_memory_stays_bounded() {
    let mut cfg = ServerConfig::ephemeral();
    cfg.send_queue_bytes_max = 1 << 20;
    let srv = server_with(cfg).await;
    // The slow one owns a port and never reads.
    let mut slow = sink_that_never_reads(&srv).await;
    let sender = client(&srv).await;
    let payload = vec![b'x'; 60_000];
    let mut delivered = 0u64;
    loop {
        match sender.send("sink", &payload).await.unwrap() {
            SendOutcome::Delivered => delivered += 1,
            SendOutcome::NoOwner => break, // the slow session was cut off and its port freed
        }
        assert!(
            delivered < 10_000,
            "never cut off after {delivered} messages"
        );
    }
    assert_eq!(slow.goaway().await, Some(ErrorCode::SlowConsumer));
    let stats = sender.stats().await.unwrap();
    let get = |k: &str| stats.iter().find(|(n, _)| n == k).unwrap().1;
    assert_eq!(get("slow_consumer_disconnects_total"), 1);
    srv.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_that_never_reads_again_is_closed_after_the_write_stall_limit() {
    let mut cfg = ServerConfig::ephemeral();
    cfg.send_queue_bytes_max = 1 << 20;
    cfg.write_stall_ms_max = 300;
    let srv = server_with(cfg).await;
    // Owns a port, then never reads a byte; its socket stays open (held in `_slow`).
    let _slow = sink_that_never_reads(&srv).await;
    let sender = client(&srv).await;
    let payload = vec![b'x'; 60_000];
    for _ in 0..10_000 {
        if sender.send("sink", &payload).await.unwrap() == SendOutcome::NoOwner {
            break;
        }
    }
    // Cut off as a slow consumer; its writer is stuck on a full socket. Only the write
    // stall limit frees the connection: the server must count one connection (ours).
    eventually_async("the stuck connection is closed", || async {
        let stats = sender.stats().await.unwrap();
        stats.iter().any(|(n, v)| n == "connections" && *v == 1)
    })
    .await;
    srv.stop().await.unwrap();
}

#[tokio::test]
async fn connections_beyond_the_cap_are_refused_with_a_reason() {
    let mut cfg = ServerConfig::ephemeral();
    cfg.connections_max = 3;
    let srv = server_with(cfg).await;
    let a = client(&srv).await;
    let _b = Raw::session(&srv, 1_000, false).await;
    let _c = Raw::session(&srv, 1_000, false).await;
    let mut d = Raw::connect(&srv).await;
    assert_eq!(d.goaway().await, Some(ErrorCode::ConnectionsMax));
    assert!(a.ping().await.is_ok());
    srv.stop().await.unwrap();
}

/// One frame: for each channel, a switch to it followed by `reqs`.
fn on_channels(channels: std::ops::Range<u16>, reqs: &[Request<'_>]) -> bytes::BytesMut {
    let mut fb = portswitch_proto::FrameBuf::new(FRAME_BYTES_MAX, usize::MAX);
    let mut id = 0;
    for ch in channels {
        fb.push_channel(ch);
        for r in reqs {
            id += 1;
            fb.push_request(id, r);
        }
    }
    let mut b = bytes::BytesMut::new();
    fb.take_into(&mut b);
    b
}

#[tokio::test]
async fn a_connection_full_of_sessions_ends_them_all_and_the_server_carries_on() {
    let srv = server().await;
    let healthy = client(&srv).await;
    healthy.register("svc/healthy", "").await.unwrap();
    // 4,000 sessions on one connection, each ending on disconnect and owning a port,
    // opened in one frame of 12,000 messages; plus a switch spree through every
    // channel the server allows (switches alone change nothing). The connection
    // logs in first (channel 0): before that the server takes only small frames.
    let mut raw = Raw::session(&srv, 60_000, true).await;
    let names: Vec<String> = (0..4_000).map(|i| format!("many/{i}")).collect();
    let mut fb = portswitch_proto::FrameBuf::new(FRAME_BYTES_MAX, usize::MAX);
    for (i, name) in names.iter().enumerate() {
        fb.push_channel(i as u16 + 1);
        fb.push_request(2 * i as u32 + 1, &Request::Hello(hello(60_000, true)));
        fb.push_request(
            2 * i as u32 + 2,
            &Request::Register {
                port: name.as_bytes(),
                value: b"",
                wait: false,
            },
        );
    }
    let mut b = bytes::BytesMut::new();
    fb.take_into(&mut b);
    raw.send_bytes(&b).await;
    raw.send_bytes(&on_channels(0..4_096, &[])).await;
    let stats = |k: &'static str| {
        let h = &healthy;
        async move {
            h.stats()
                .await
                .unwrap()
                .into_iter()
                .find(|(n, _)| n == k)
                .unwrap()
                .1
        }
    };
    eventually_async("4,000 sessions and ports", || async {
        stats("sessions").await == 4_002 && stats("ports_owned").await == 4_001
    })
    .await;
    assert!(healthy.query("many/3999").await.unwrap().is_some());
    drop(raw);
    eventually_async("every session on the connection ended", || async {
        stats("sessions").await == 1 && stats("ports_owned").await == 1
    })
    .await;
    assert_eq!(
        healthy.query("svc/healthy").await.unwrap().unwrap().session,
        healthy.session().id
    );

    // A switch past the limit closes only that connection.
    let mut bad = Raw::connect(&srv).await;
    bad.send_bytes(&on_channels(4_096..4_097, &[Request::Ping]))
        .await;
    assert_eq!(bad.goaway().await, Some(ErrorCode::ChannelsMax));
    assert!(healthy.query("svc/healthy").await.unwrap().is_some());
    srv.stop().await.unwrap();
}

#[tokio::test]
async fn strangers_get_small_frames_and_a_deadline_to_log_in() {
    let mut cfg = ServerConfig::ephemeral();
    cfg.login_timeout_ms = 400;
    cfg.frame_bytes_before_login_max = 16 << 10;
    let srv = server_with(cfg).await;
    let healthy = client(&srv).await;
    healthy.register("mine", "").await.unwrap();

    // A frame declared past the pre-login cap is refused from its header alone.
    let mut big = Raw::connect(&srv).await;
    big.send_bytes(&((16u32 << 10) + 1).to_be_bytes()).await;
    assert_eq!(big.goaway().await, Some(ErrorCode::FrameTooLarge));

    // A stranger that sends nothing (or only PINGs) is closed at the deadline.
    let mut idle = Raw::connect(&srv).await;
    assert!(idle.call(&[Request::Ping]).await[0].1.starts_with("Ok"));
    let t = std::time::Instant::now();
    assert_eq!(idle.goaway().await, Some(ErrorCode::LoginTimeout));
    assert!(t.elapsed() < std::time::Duration::from_secs(5));

    // Once logged in: no deadline, and full-size frames (a 40 KiB SEND).
    let mut member = Raw::session(&srv, 10_000, false).await;
    tokio::time::sleep(std::time::Duration::from_millis(800)).await;
    let payload = vec![7u8; 40 << 10];
    let replies = member
        .call(&[Request::Send {
            port: b"mine",
            payload: &payload,
        }])
        .await;
    assert!(replies[0].1.starts_with("Delivered"), "{replies:?}");

    let stats = healthy.stats().await.unwrap();
    let get = |k: &str| stats.iter().find(|(n, _)| n == k).map(|(_, v)| *v);
    assert_eq!(get("login_timeouts_total"), Some(1));
    assert_eq!(
        healthy.query("mine").await.unwrap().unwrap().session,
        healthy.session().id
    );
    srv.stop().await.unwrap();
}

#[tokio::test]
async fn ports_max_caps_ports_across_all_sessions_with_ports_full() {
    let mut cfg = ServerConfig::ephemeral();
    cfg.core.ports_max = 3;
    let srv = server_with(cfg).await;
    let a = client(&srv).await;
    let b = client(&srv).await;
    a.register("p1", "").await.unwrap();
    a.register("p2", "").await.unwrap();
    b.register("p3", "").await.unwrap();
    let full = |e: portswitch_client::Error| e.code() == Some(ErrorCode::PortsFull);
    assert!(full(b.register("p4", "").await.unwrap_err()));
    // A watch of a name nobody holds needs an entry too.
    assert!(full(b.watch("w").await.unwrap_err()));
    // Existing ports keep working: re-register, queue behind an owner.
    assert!(matches!(
        a.register("p1", "v2").await.unwrap(),
        RegisterOutcome::Owned { .. }
    ));
    a.unregister("p1").await.unwrap();
    assert!(matches!(
        b.register("p4", "").await.unwrap(),
        RegisterOutcome::Owned { .. }
    ));
    srv.stop().await.unwrap();
}
