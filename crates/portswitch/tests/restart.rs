//! A group of one: a server killed with SIGKILL and restarted on the same data
//! directory takes over as a new master. Clients resume their sessions, reclaim their
//! ports with their tokens, and never hear "ownership lost"; what nobody reclaims is
//! free once the recovery window closes.

mod common;

use std::process::Stdio;
use std::time::{Duration, Instant};

use common::{resynced, within};
use portswitch_client::{Client, ClientOptions, Error, Event, RegisterOutcome};
use portswitch_proto::ErrorCode;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

const BIN: &str = env!("CARGO_BIN_EXE_portswitch");
const WINDOW_MS: u64 = 3_000;

async fn serve(listen: &str, data: &std::path::Path) -> (Child, String) {
    serve_with(
        listen,
        data,
        &["--recovery-window-ms", &WINDOW_MS.to_string()],
    )
    .await
}

async fn serve_with(listen: &str, data: &std::path::Path, extra: &[&str]) -> (Child, String) {
    let mut child = Command::new(BIN)
        .args(["serve", "--listen", listen, "--http-listen", "127.0.0.1:0"])
        .args(["--data-dir", data.to_str().unwrap()])
        .args(extra)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn serve");
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let line = within("server start", lines.next_line())
        .await
        .unwrap()
        .expect("server printed its address");
    let addr = line.strip_prefix("listening on ").unwrap().to_string();
    (child, addr)
}

async fn client(addr: &str) -> Client {
    client_with_lease(addr, Duration::from_secs(10)).await
}

async fn client_with_lease(addr: &str, lease: Duration) -> Client {
    let mut o = ClientOptions::new(addr);
    o.lease = lease;
    Client::connect(o).await.unwrap()
}

async fn stat(c: &Client, name: &str) -> u64 {
    let stats: std::collections::HashMap<_, _> = c.stats().await.unwrap().into_iter().collect();
    stats[name]
}

/// A restarted server's recovery window covers the leases its predecessor granted —
/// recorded in the data directory, raised before the first longer one was served —
/// not the longest it was allowed to grant (300 s by default).
#[tokio::test]
async fn a_restart_owes_the_leases_granted_not_the_longest_allowed() {
    let dir = std::env::temp_dir().join(format!("portswitch-ceiling-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    // Leases short enough to wait out a window in the test, long enough that a client
    // rides out a restart on a loaded machine.
    let args = ["--lease-ceiling-start-ms", "5000"];
    let (mut first, addr) = serve_with("127.0.0.1:0", &dir, &args).await;
    let a = client_with_lease(&addr, Duration::from_secs(5)).await;
    assert_eq!(stat(&a, "lease_ceiling_ms").await, 5_000);
    let ta = match a.register("a", "").await.unwrap() {
        RegisterOutcome::Owned { token } => token,
        other => panic!("{other:?}"),
    };
    let mut a_events = a.events();

    first.start_kill().unwrap();
    first.wait().await.unwrap();
    let (mut second, _) = serve_with(&addr, &dir, &args).await;
    resynced(&mut a_events).await;
    // Five seconds stretched by the 10% margin, not 330 s.
    let left = stat(&a, "recovery_left_ms").await;
    assert!(left > 0 && left <= 5_500, "recovery window left: {left} ms");

    // A client asking for a minute gets it, once the ceiling is on disk.
    let b = client_with_lease(&addr, Duration::from_secs(60)).await;
    assert_eq!(b.session().lease_ms, 60_000);
    assert_eq!(stat(&b, "lease_ceiling_ms").await, 60_000);
    let mut b_events = b.events();
    let closes = Instant::now() + Duration::from_secs(20);
    while stat(&b, "recovery_left_ms").await > 0 {
        assert!(Instant::now() < closes, "the window never closed");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let tb = match b.register("b", "").await.unwrap() {
        RegisterOutcome::Owned { token } => token,
        other => panic!("{other:?}"),
    };
    // The close is recorded too (the earlier server's five seconds are over); give
    // the write a moment.
    let file = dir.join("group.json");
    let settled = Instant::now() + Duration::from_secs(10);
    while !std::fs::read_to_string(&file)
        .unwrap()
        .contains("\"lease_owed_ms\": 0")
    {
        assert!(
            Instant::now() < settled,
            "the closed window was not recorded"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // The next restart owes that minute.
    second.start_kill().unwrap();
    second.wait().await.unwrap();
    let (mut third, _) = serve_with(&addr, &dir, &args).await;
    resynced(&mut a_events).await;
    resynced(&mut b_events).await;
    let left = stat(&a, "recovery_left_ms").await;
    assert!(
        left > 50_000 && left <= 66_000,
        "recovery window left: {left} ms"
    );
    assert_eq!(a.owned_ports(), vec![("a".into(), ta)]);
    assert_eq!(b.owned_ports(), vec![("b".into(), tb)]);
    third.kill().await.unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
}

#[tokio::test]
async fn a_restarted_server_gives_every_resumed_session_its_ports_back() {
    let dir = std::env::temp_dir().join(format!("portswitch-restart-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let (mut first, addr) = serve("127.0.0.1:0", &dir).await;

    let a = client(&addr).await;
    let mut a_events = a.events();
    let t1 = match a.register("job/1", "a").await.unwrap() {
        RegisterOutcome::Owned { token } => token,
        other => panic!("{other:?}"),
    };
    let t2 = match a.register("job/2", "").await.unwrap() {
        RegisterOutcome::Owned { token } => token,
        other => panic!("{other:?}"),
    };
    // B owns a port and then goes away for good (no BYE: its session would live on).
    let b = client(&addr).await;
    assert!(matches!(
        b.register("orphan", "").await.unwrap(),
        RegisterOutcome::Owned { .. }
    ));
    let _ = b.detach();
    let epoch1 = a.session().epoch;
    let session_a = a.session().id;

    first.start_kill().unwrap();
    first.wait().await.unwrap();
    let killed = Instant::now();
    let (mut second, addr2) = serve(&addr, &dir).await;
    assert_eq!(addr2, addr);

    // A resumes on its own, gets a higher epoch, keeps its id, and reclaims.
    let mut resynced = false;
    while !resynced {
        match within("A resyncs", a_events.recv()).await.unwrap() {
            Event::Resync => resynced = true,
            Event::OwnershipLost { reason, .. } => panic!("ownership lost: {reason}"),
            Event::PortLost { port, reason, .. } => panic!("lost {port:?}: {reason}"),
            _ => {}
        }
    }
    let recovered_after = killed.elapsed();
    eprintln!("kill -9 to every port reclaimed: {recovered_after:?}");
    let info = a.session();
    assert!(info.epoch > epoch1, "{} > {epoch1}", info.epoch);
    assert_eq!(info.id, session_a);
    let mut owned = a.owned_ports();
    owned.sort();
    assert_eq!(
        owned,
        vec![("job/1".into(), t1), ("job/2".into(), t2)],
        "same ports, same tokens"
    );

    // Others see A's ports with their old tokens and value...
    let c = client(&addr).await;
    let o = c.query("job/1").await.unwrap().expect("owned");
    assert_eq!(
        (o.session, o.token, &o.value[..]),
        (session_a, t1, &b"a"[..])
    );
    // ...and cannot know about "orphan" until the window closes.
    match c.register("orphan", "").await {
        Err(Error::Server {
            code: ErrorCode::Recovering,
            ..
        }) => {}
        other => panic!("{other:?}"),
    }
    match c.query("orphan").await {
        Err(Error::Server {
            code: ErrorCode::Recovering,
            ..
        }) => {}
        other => panic!("{other:?}"),
    }
    // Waiting for it works: granted when the window closes, with a new-epoch token.
    let token = within("orphan granted", c.register_wait("orphan", ""))
        .await
        .unwrap();
    assert_eq!(token >> 32, info.epoch);
    assert!(token > t1 && token > t2);
    // A hears that the window closed, and still owns its ports.
    loop {
        match within("A hears RECOVERED", a_events.recv()).await.unwrap() {
            Event::Recovered => break,
            Event::OwnershipLost { reason, .. } => panic!("ownership lost: {reason}"),
            _ => {}
        }
    }
    assert_eq!(a.owned_ports().len(), 2);
    // A new session cannot reclaim, and the window is over anyway.
    assert!(matches!(
        c.register("job/2", "").await.unwrap(),
        RegisterOutcome::Taken { token, .. } if token == t2
    ));
    let stats: std::collections::HashMap<_, _> = c.stats().await.unwrap().into_iter().collect();
    assert_eq!(stats["sessions_adopted_total"], 1);
    assert_eq!(stats["ports_reclaimed_total"], 2);
    assert_eq!(stats["recovering"], 0);
    // Stopped first: the server records its closed window in the directory.
    second.kill().await.unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
}

#[tokio::test]
async fn two_servers_cannot_share_a_data_directory() {
    let dir = std::env::temp_dir().join(format!("portswitch-datadir-lock-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let (mut first, _) = serve("127.0.0.1:0", &dir).await;
    let out = within(
        "second server",
        Command::new(BIN)
            .args([
                "serve",
                "--listen",
                "127.0.0.1:0",
                "--http-listen",
                "127.0.0.1:0",
            ])
            .args(["--data-dir", dir.to_str().unwrap()])
            .output(),
    )
    .await
    .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("another server is using the data directory"),
        "{err}"
    );
    first.kill().await.unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
}
