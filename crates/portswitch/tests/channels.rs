//! Many sessions over one connection (PROTOCOL.md, "Channels"): against a real server
//! on loopback, through the client's `Mux` and through raw frames.

mod common;

use std::time::Duration;

use bytes::BytesMut;
use common::*;
use portswitch_client::{Event, Mux, RegisterOutcome};
use portswitch_proto::frame::{frame_len, messages};
use portswitch_proto::msg::op;
use portswitch_proto::{ErrorCode, Event as WireEvent, FrameBuf, Reply, Request, ServerMsg};
use portswitch_server::ServerConfig;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

#[tokio::test]
async fn sessions_on_channels_of_one_connection_are_independent() {
    let srv = server().await;
    let mux = Mux::connect(opts(&srv)).await.unwrap();
    let a = mux.session().await.unwrap();
    let b = mux.session().await.unwrap();
    assert_ne!(a.info().id, b.info().id);
    assert_ne!(a.channel(), b.channel());

    let token = match a.register("db", "a").await.unwrap() {
        RegisterOutcome::Owned { token } => token,
        other => panic!("{other:?}"),
    };
    match b.register("db", "b").await.unwrap() {
        RegisterOutcome::Taken {
            session, token: t, ..
        } => {
            assert_eq!(session, a.info().id);
            assert_eq!(t, token);
        }
        other => panic!("{other:?}"),
    }
    let owner = b.query("db").await.unwrap().expect("owned");
    assert_eq!(owner.session, a.info().id);
    assert_eq!(&owner.value[..], b"a");
    // Each session is held to its own ports: b cannot release a's.
    let e = b.unregister("db").await.unwrap_err();
    assert_eq!(e.code(), Some(ErrorCode::NotOwner));
    a.unregister("db").await.unwrap();
    assert!(matches!(
        b.register("db", "b").await.unwrap(),
        RegisterOutcome::Owned { .. }
    ));

    // One connection, two sessions (plus the STATS client's connection).
    let stats = client(&srv).await.stats().await.unwrap();
    let get = |k: &str| stats.iter().find(|(n, _)| n == k).map(|(_, v)| *v);
    assert_eq!(get("sessions"), Some(3));
    assert_eq!(get("connections"), Some(2));

    // BYE on one channel ends that session only.
    b.close().await.unwrap();
    assert!(!b.is_alive());
    assert!(a.is_alive());
    assert!(
        a.query("db").await.unwrap().is_none(),
        "b's port is released"
    );
    // The channel is reused by the next session.
    let c = mux.session().await.unwrap();
    assert_eq!(c.channel(), b.channel());
    assert_ne!(c.info().id, b.info().id);
    a.ping().await.unwrap();
    srv.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_sessions_share_frames_and_each_keeps_its_lease() {
    let srv = server().await;
    let mut o = opts(&srv);
    o.lease = Duration::from_millis(400);
    let mux = Mux::connect(o).await.unwrap();
    let mut sessions = Vec::new();
    for _ in 0..64 {
        sessions.push(std::sync::Arc::new(mux.session().await.unwrap()));
    }
    // Every session registers its own port, all at once, from tasks of their own.
    let tasks: Vec<_> = sessions
        .iter()
        .enumerate()
        .map(|(i, s)| {
            let s = s.clone();
            tokio::spawn(async move { s.register(format!("p{i}"), "").await.unwrap() })
        })
        .collect();
    for t in tasks {
        let r = t.await.unwrap();
        assert!(matches!(r, RegisterOutcome::Owned { .. }), "{r:?}");
    }
    // Several leases pass with no application traffic: keepalives hold every session.
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    let watcher = client(&srv).await;
    for (i, s) in sessions.iter().enumerate() {
        assert!(s.is_alive(), "session {i} lost");
        let o = watcher
            .query(format!("p{i}"))
            .await
            .unwrap()
            .expect("still owned");
        assert_eq!(o.session, s.info().id);
    }
    let stats = watcher.stats().await.unwrap();
    let get = |k: &str| stats.iter().find(|(n, _)| n == k).map(|(_, v)| *v).unwrap();
    assert_eq!(get("sessions_expired_total"), 0);
    assert_eq!(get("connections"), 2);
    srv.stop().await.unwrap();
}

/// Requests are stamped with their send time when the writer takes them: a request
/// queued after a long quiet spell must not look as old as the last write.
#[tokio::test]
async fn a_mux_quiet_for_longer_than_answer_timeout_keeps_its_connection() {
    let srv = server().await;
    let mut o = opts(&srv);
    o.lease = Duration::from_secs(30);
    o.answer_timeout = Some(Duration::from_millis(300));
    let mux = Mux::connect(o).await.unwrap();
    let s = mux.session().await.unwrap();
    s.register("quiet", "").await.unwrap();
    for _ in 0..3 {
        tokio::time::sleep(Duration::from_millis(700)).await;
        for _ in 0..50 {
            s.query("quiet").await.unwrap().expect("still owned");
        }
    }
    assert!(mux.is_connected());
    assert!(s.is_alive());
    srv.stop().await.unwrap();
}

#[tokio::test]
async fn events_reach_the_session_on_their_own_channel() {
    let srv = server().await;
    let mux = Mux::connect(opts(&srv)).await.unwrap();
    let watcher = mux.session().await.unwrap();
    let owner = mux.session().await.unwrap();
    let mut watcher_events = watcher.events();
    let mut owner_events = owner.events();
    let c = client(&srv).await;
    c.watch("w").await.unwrap();
    let mut cev = c.events();
    owner.register("w", "").await.unwrap();
    within("CLAIMED at the plain client", async {
        loop {
            if let Ok(Event::Claimed { session, .. }) = cev.recv().await {
                assert_eq!(session, owner.info().id);
                break;
            }
        }
    })
    .await;
    // A message sent to the owner's port reaches the owner's channel, not the
    // watcher's.
    c.send("w", "hello").await.unwrap();
    within("MESSAGE on the owner's channel", async {
        loop {
            if let Ok(Event::Message { payload, .. }) = owner_events.recv().await {
                assert_eq!(&payload[..], b"hello");
                break;
            }
        }
    })
    .await;
    assert!(
        watcher_events.try_recv().is_err(),
        "nothing for the other channel"
    );
    srv.stop().await.unwrap();
}

#[tokio::test]
async fn a_dropped_connection_ends_every_end_on_disconnect_session_on_it() {
    let srv = server().await;
    let mut o = opts(&srv);
    o.end_on_disconnect = true;
    o.lease = Duration::from_secs(60);
    let mux = Mux::connect(o).await.unwrap();
    let mut sessions = Vec::new();
    for i in 0..5 {
        let s = mux.session().await.unwrap();
        s.register(format!("held{i}"), "").await.unwrap();
        sessions.push(s);
    }
    let mut lost = sessions[3].events();
    let watcher = client(&srv).await;
    mux.shutdown();
    for (i, s) in sessions.iter().enumerate() {
        within("the session is lost to the process", s.lost()).await;
        let port = format!("held{i}");
        eventually_async("port released by the server", || {
            let (w, port) = (&watcher, port.clone());
            async move { w.query(port).await.unwrap().is_none() }
        })
        .await;
    }
    match within("OwnershipLost", lost.recv()).await.unwrap() {
        Event::OwnershipLost { ports, .. } => {
            assert_eq!(ports.len(), 1);
            assert_eq!(&ports[0].0[..], b"held3");
        }
        other => panic!("{other:?}"),
    }
    srv.stop().await.unwrap();
}

/// A connection speaking raw frames with CHANNEL switches.
struct Chan {
    stream: TcpStream,
    buf: BytesMut,
    next_id: u32,
    /// The channel the server's messages currently belong to.
    server_channel: u32,
}

#[derive(Debug, PartialEq)]
enum Got {
    Reply(u32, u32, String),
    Error(u32, u32, ErrorCode),
    GoAway(u32, ErrorCode),
    Event(u32, String),
}

impl Chan {
    async fn connect(srv: &portswitch_server::RunningServer) -> Chan {
        let stream = TcpStream::connect(srv.addr).await.unwrap();
        Chan {
            stream,
            buf: BytesMut::new(),
            next_id: 0,
            server_channel: 0,
        }
    }

    /// Sends `(channel, request)` pairs in one frame, switching channels as needed.
    async fn send(&mut self, reqs: &[(u16, Request<'_>)]) -> Vec<u32> {
        let mut fb = FrameBuf::new(1 << 20, usize::MAX);
        let mut ids = Vec::new();
        for (ch, r) in reqs {
            fb.push_channel(*ch);
            self.next_id += 1;
            fb.push_request(self.next_id, r);
            ids.push(self.next_id);
        }
        let mut b = BytesMut::new();
        fb.take_into(&mut b);
        self.stream.write_all(&b).await.unwrap();
        ids
    }

    /// Every message until the connection closes or `n` were read.
    async fn read(&mut self, n: usize) -> Vec<Got> {
        let mut out = Vec::new();
        while out.len() < n {
            if let Some(len) = frame_len(&self.buf, usize::MAX).unwrap() {
                let frame = self.buf.split_to(len);
                for m in messages(&frame[4..], usize::MAX) {
                    let m = m.unwrap();
                    if m.opcode == op::CHANNEL {
                        self.server_channel = m.id;
                        continue;
                    }
                    let ch = self.server_channel;
                    out.push(match ServerMsg::decode(m.opcode, m.id, m.body).unwrap() {
                        ServerMsg::Reply {
                            id,
                            reply: Reply::Error { code, .. },
                        } => Got::Error(ch, id, code),
                        ServerMsg::Reply { id, reply } => {
                            let text = format!("{reply:?}");
                            let kind = text.split([' ', '(', '{']).next().unwrap().to_string();
                            Got::Reply(ch, id, kind)
                        }
                        ServerMsg::Event(WireEvent::GoAway { code, .. }) => Got::GoAway(ch, code),
                        ServerMsg::Event(e) => Got::Event(ch, format!("{e:?}")),
                    });
                }
                continue;
            }
            match within("server output", self.stream.read_buf(&mut self.buf)).await {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            }
        }
        out
    }
}

#[tokio::test]
async fn a_session_expires_alone_and_its_channel_can_open_another() {
    let srv = server().await;
    let mut c = Chan::connect(&srv).await;
    c.send(&[
        (1, Request::Hello(hello(200, false))),
        (2, Request::Hello(hello(60_000, false))),
    ])
    .await;
    let got = c.read(2).await;
    assert!(
        matches!(&got[0], Got::Reply(1, 1, k) if k == "HelloOk"),
        "{got:?}"
    );
    assert!(
        matches!(&got[1], Got::Reply(2, 2, k) if k == "HelloOk"),
        "{got:?}"
    );
    c.send(&[(
        1,
        Request::Register {
            port: b"short",
            value: b"",
            wait: false,
        },
    )])
    .await;
    assert!(matches!(&c.read(1).await[0], Got::Reply(1, _, k) if k == "Registered"));
    // Only channel 2 is heard from from now on: channel 1's session expires, alone.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    let mut expired = false;
    while !expired && tokio::time::Instant::now() < deadline {
        c.send(&[(2, Request::Ping)]).await;
        loop {
            match c.read(1).await.pop() {
                Some(Got::GoAway(1, ErrorCode::SessionExpired)) => expired = true,
                Some(Got::Reply(2, _, k)) if k == "Ok" => break,
                other => panic!("unexpected {other:?}"),
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        expired,
        "channel 1's session expired with a GOAWAY on channel 1"
    );
    // The connection and channel 2 carry on; channel 1 has no session and may open one.
    c.send(&[
        (2, Request::Query { port: b"short" }),
        (1, Request::Ping),
        (
            1,
            Request::Register {
                port: b"x",
                value: b"",
                wait: false,
            },
        ),
        (1, Request::Hello(hello(60_000, false))),
        (
            1,
            Request::Register {
                port: b"x",
                value: b"",
                wait: false,
            },
        ),
    ])
    .await;
    let got = c.read(5).await;
    let kinds: Vec<_> = got.iter().map(|g| format!("{g:?}")).collect();
    assert!(
        matches!(&got[0], Got::Reply(2, _, k) if k == "Free"),
        "{kinds:?}"
    );
    assert!(
        matches!(&got[1], Got::Reply(1, _, k) if k == "Ok"),
        "{kinds:?}"
    );
    assert!(
        matches!(&got[2], Got::Error(1, _, ErrorCode::NoSession)),
        "{kinds:?}"
    );
    assert!(
        matches!(&got[3], Got::Reply(1, _, k) if k == "HelloOk"),
        "{kinds:?}"
    );
    assert!(
        matches!(&got[4], Got::Reply(1, _, k) if k == "Registered"),
        "{kinds:?}"
    );
    srv.stop().await.unwrap();
}

#[tokio::test]
async fn a_channel_past_the_limit_closes_the_connection_and_its_sessions() {
    let mut cfg = ServerConfig::ephemeral();
    cfg.core.channels_per_connection_max = 4;
    let srv = server_with(cfg).await;
    let watcher = client(&srv).await;
    let mut c = Chan::connect(&srv).await;
    c.send(&[
        (3, Request::Hello(hello(60_000, true))),
        (
            3,
            Request::Register {
                port: b"mine",
                value: b"",
                wait: false,
            },
        ),
    ])
    .await;
    let got = c.read(2).await;
    assert!(
        matches!(&got[1], Got::Reply(3, _, k) if k == "Registered"),
        "{got:?}"
    );
    assert!(watcher.query("mine").await.unwrap().is_some());
    c.send(&[(4, Request::Ping)]).await;
    let got = c.read(usize::MAX).await;
    assert_eq!(got, vec![Got::GoAway(0, ErrorCode::ChannelsMax)]);
    // The session on channel 3 ended with its connection (end on disconnect).
    eventually_async("channel 3's port released", || async {
        watcher.query("mine").await.unwrap().is_none()
    })
    .await;
    srv.stop().await.unwrap();
}

#[tokio::test]
async fn a_plain_connection_never_sees_a_channel_switch() {
    // Clients that do not multiplex are unaffected: the Raw helper panics on any
    // message it cannot decode, CHANNEL included.
    let srv = server().await;
    let mut raw = Raw::session(&srv, 60_000, false).await;
    let got = raw
        .call(&[
            Request::Register {
                port: b"p",
                value: b"",
                wait: false,
            },
            Request::Query { port: b"p" },
        ])
        .await;
    assert!(got[0].1.starts_with("Registered"), "{got:?}");
    assert!(got[1].1.starts_with("Owner"), "{got:?}");
    srv.stop().await.unwrap();
}

#[tokio::test]
async fn a_client_resumes_a_session_its_mux_left_behind() {
    let srv = server().await;
    let mut o = opts(&srv);
    o.lease = Duration::from_secs(30);
    let mux = Mux::connect(o.clone()).await.unwrap();
    let s = mux.session().await.unwrap();
    let token = match s.register("kept", "v").await.unwrap() {
        RegisterOutcome::Owned { token } => token,
        other => panic!("{other:?}"),
    };
    let info = s.info();
    mux.shutdown();
    within("the mux session is lost to the process", s.lost()).await;
    // Not ended on disconnect: the session waits on the server for its lease.
    o.resume = Some((info.id, info.secret));
    let c = portswitch_client::Client::connect(o).await.unwrap();
    assert_eq!(c.session().id, info.id);
    match c.register("kept", "v").await.unwrap() {
        RegisterOutcome::Owned { token: t } => assert_eq!(t, token, "same grant, same token"),
        other => panic!("{other:?}"),
    }
    srv.stop().await.unwrap();
}

#[tokio::test]
async fn a_dropped_session_says_bye_and_a_dropped_mux_flushes_its_byes() {
    let srv = server().await;
    let mut o = opts(&srv);
    o.lease = Duration::from_secs(60); // not ended on disconnect: only BYE frees at once
    let watcher = client(&srv).await;
    let mux = Mux::connect(o.clone()).await.unwrap();
    let keep = mux.session().await.unwrap();
    let gone = mux.session().await.unwrap();
    gone.register("dropped", "").await.unwrap();
    keep.register("kept", "").await.unwrap();
    drop(gone);
    eventually_async("the dropped session's port is free", || async {
        watcher.query("dropped").await.unwrap().is_none()
    })
    .await;
    assert!(keep.is_alive());
    assert!(watcher.query("kept").await.unwrap().is_some());
    // The last handles go: their BYEs are written before the connection closes.
    drop(keep);
    drop(mux);
    eventually_async("every session ended", || async {
        watcher.query("kept").await.unwrap().is_none()
    })
    .await;
    srv.stop().await.unwrap();
}

#[tokio::test]
async fn a_mux_on_a_server_that_does_not_multiplex_is_told_why() {
    let mut cfg = ServerConfig::ephemeral();
    cfg.core.channels_per_connection_max = 1;
    let srv = server_with(cfg).await;
    let mux = Mux::connect(opts(&srv)).await.unwrap();
    let e = mux.session().await.expect_err("refused");
    assert_eq!(e.code(), Some(ErrorCode::ChannelsMax), "{e:?}");
    // Plain clients are served as ever.
    client(&srv).await.register("p", "").await.unwrap();
    srv.stop().await.unwrap();
}

#[tokio::test]
async fn a_thousand_sessions_opened_at_once_fit_the_servers_pre_login_frames() {
    // The server takes only FRAME_BYTES_BEFORE_LOGIN-sized frames until a HELLO
    // succeeds: a Mux opening 1,000 sessions at once on a new connection (~60 KB of
    // HELLOs) must split them, not be cut off as frame_too_large.
    let mut cfg = ServerConfig::ephemeral();
    cfg.frame_bytes_before_login_max = portswitch_proto::limits::FRAME_BYTES_BEFORE_LOGIN as u32;
    let srv = server_with(cfg).await;
    let mux = std::sync::Arc::new(Mux::connect(opts(&srv)).await.unwrap());
    let tasks: Vec<_> = (0..1_000)
        .map(|_| {
            let mux = mux.clone();
            tokio::spawn(async move { mux.session().await })
        })
        .collect();
    let mut sessions = Vec::new();
    for t in tasks {
        sessions.push(t.await.unwrap().expect("session opens"));
    }
    let last = sessions.last().unwrap();
    assert!(matches!(
        last.register("after", "").await.unwrap(),
        RegisterOutcome::Owned { .. }
    ));
    let stats = client(&srv).await.stats().await.unwrap();
    let get = |k: &str| stats.iter().find(|(n, _)| n == k).map(|(_, v)| *v);
    assert_eq!(get("sessions"), Some(1_001));
    assert_eq!(get("malformed_disconnects_total"), Some(0));
    srv.stop().await.unwrap();
}

#[tokio::test]
async fn a_plain_mux_to_a_tls_server_is_told_the_server_speaks_tls() {
    let dir = std::env::temp_dir().join(format!("portswitch-mux-tls-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_portswitch"))
        .args(["cert", "--out", dir.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let mut cfg = ServerConfig::ephemeral();
    cfg.tls = Some(portswitch_server::tls::TlsSettings {
        cert: dir.join("server.pem"),
        key: dir.join("server-key.pem"),
        client_ca: None,
    });
    let srv = server_with(cfg).await;
    let mut o = opts(&srv);
    o.connect_timeout = Duration::from_secs(2);
    let e = match Mux::connect(o).await {
        Ok(mux) => mux.session().await.map(|_| ()).unwrap_err(),
        Err(e) => e,
    };
    assert!(
        matches!(e, portswitch_client::Error::TlsExpected { .. }),
        "{e:?}"
    );
    assert!(e.to_string().contains("TLS"), "{e}");
    srv.stop().await.unwrap();
    let _ = std::fs::remove_dir_all(dir);
}
