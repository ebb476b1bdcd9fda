//! Real processes: three `portswitch serve` members on loopback. The master is killed
//! with SIGKILL, or stopped with SIGSTOP for longer than its lease and continued;
//! clients hold their ports throughout and the old master never serves again.

mod common;

use std::process::Stdio;
use std::time::{Duration, Instant};

use common::group::{free_port, own, Group, LEASE_MS_MAX, ONE_GROUP};
use common::{resynced, within};
use portswitch_client::{server_stats, Client, ClientOptions, Error, MemberRole, RegisterOutcome};
use portswitch_proto::msg::op;
use portswitch_proto::ErrorCode;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Command;

const BIN: &str = env!("CARGO_BIN_EXE_portswitch");
/// Election timeouts of 20–25 s: a master found sooner was not elected by a timeout.
const SLOW_ELECTIONS: [&str; 8] = [
    "--heartbeat-ms",
    "100",
    "--election-timeout-ms-min",
    "20000",
    "--election-timeout-ms-max",
    "25000",
    "--master-lease-ms",
    "500",
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_master_keeps_every_session_and_port() {
    let g = Group::start("kill").await;
    let m = g.master(None).await;
    let a = g.client().await;
    let mut events = a.events();
    let epoch1 = a.session().epoch;
    let mut tokens = Vec::new();
    for i in 0..20 {
        tokens.push(own(&a, &format!("svc/{i}")).await);
    }

    g.signal(m, "-KILL");
    let killed = Instant::now();
    resynced(&mut events).await;
    eprintln!(
        "kill -9 of the master to every port reclaimed: {:?}",
        killed.elapsed()
    );
    let m2 = g.master(Some(m)).await;
    assert_ne!(m2, m);
    assert!(a.session().epoch > epoch1);
    let mut owned = a.owned_ports();
    owned.sort_by_key(|(_, t)| *t);
    assert_eq!(owned.len(), 20);
    for ((_, t), want) in owned.iter().zip(&tokens) {
        assert_eq!(t, want, "ports keep their tokens across the failover");
    }
    // Everyone else sees the same owner and token on the new master.
    let b = g.client().await;
    let o = b.query("svc/3").await.unwrap().expect("owned");
    assert_eq!((o.session, o.token), (a.session().id, tokens[3]));
    // New grants are above every earlier token.
    match b.register("svc/3", "").await.unwrap() {
        RegisterOutcome::Taken { token, .. } => assert_eq!(token, tokens[3]),
        other => panic!("{other:?}"),
    }
    // An unclaimed name waits for the window; with WAIT it is queued meanwhile.
    match b.register("fresh", "").await {
        Err(Error::Server {
            code: ErrorCode::Recovering,
            ..
        }) => {}
        other => panic!("{other:?}"),
    }
    assert!(a.is_alive());
}

/// A killed master's peer address refuses connections, and the survivors elect at
/// once instead of waiting out their election timeouts. Timeouts of 20–25 s make the
/// difference plain: the master lease (500 ms) is all a new master must wait. The
/// members start 2 s apart, and the first election still waits for no timeout: the
/// group forms once a majority runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_master_is_replaced_before_any_election_timeout() {
    let started = Instant::now();
    let mut g = Group::start_staggered("crash", &SLOW_ELECTIONS, Duration::from_secs(2)).await;
    let m = g.master(None).await;
    let formed = started.elapsed();
    eprintln!("members started 2 s apart to a master: {formed:?}");
    assert!(
        formed < Duration::from_secs(15),
        "a master after {formed:?}: the first election was lost to members not yet running"
    );
    // Member 3 started a moment ago. Killed before its first entries arrive, the master
    // would leave it a learner that cannot stand but refuses its vote for openraft's
    // leader lease (= the 25 s election timeout here): give it ten heartbeats to catch up.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let a = g.client().await;
    let mut events = a.events();
    let t = own(&a, "x").await;

    let killed = Instant::now();
    g.kill(m).await;
    let m2 = g.master(Some(m)).await;
    let took = killed.elapsed();
    eprintln!("kill -9 of the master to a new master: {took:?}");
    assert!(
        took < Duration::from_secs(15),
        "a new master after {took:?}: the survivors waited for an election timeout"
    );
    assert_ne!(m2, m);
    resynced(&mut events).await;
    assert_eq!(a.owned_ports(), vec![("x".into(), t)]);

    // A stopped master is silent, not gone: nobody stands before the timeouts.
    g.signal(m2, "-STOP");
    tokio::time::sleep(Duration::from_secs(3)).await;
    let opts = ClientOptions::new("unused");
    for (i, addr) in g.addrs.iter().enumerate() {
        if i == m || i == m2 {
            continue;
        }
        let s = server_stats(&opts, addr).await.unwrap();
        let role = MemberRole::from_stats(&s).unwrap();
        assert_ne!(
            role,
            MemberRole::Master,
            "member {} took over from a master that was only stopped",
            i + 1
        );
    }
    g.signal(m2, "-CONT");
}

/// A relay in this process from `listen` to `target`, adding `delay_ms` each way;
/// stopping (or dropping) it cuts the link and every connection in it.
async fn relay(listen: &str, target: &str, delay_ms: u64) -> portswitch_harness::relay::Running {
    let route = format!("{listen}={target}").parse().expect("a route");
    portswitch_harness::relay::start(&[route], Duration::from_millis(delay_ms), 100)
        .await
        .expect("the relay listens")
}

/// The survivor meant to win a crash election (the highest id) has not received the
/// group's last entry when the master dies (its link is slow: a relay adds 1.5 s), so
/// it cannot win; the other survivor's first try found no majority. Neither waits for
/// an election timeout (20–25 s here): survivors that see no master stand again
/// within a few hundred ms, and the one with the whole log wins.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_survivor_behind_on_the_log_does_not_hold_up_a_crash_election() {
    let via = format!("127.0.0.1:{}", free_port());
    let mut g = Group::start_full(
        "behind",
        &SLOW_ELECTIONS,
        Duration::ZERO,
        &[(2, via.clone())],
    )
    .await;
    let third = g.peer_listen[2].clone().unwrap();
    let slow_link = relay(&via, &third, 1_500).await;
    // Member 1 forms the group (the others would wait 50 s), with member 2's vote.
    let m = g.master(None).await;
    assert_eq!(m, 0);
    // Member 3 hears the master 1.5 s late.
    tokio::time::sleep(Duration::from_secs(2)).await;

    // A lease above the starting ceiling: the master records the raise through Raft
    // with member 2; member 3 would get it 1.5 s later.
    let mut o = ClientOptions::new(g.addrs[m].clone());
    o.servers = vec![g.addrs[1].clone()];
    o.lease = Duration::from_millis(LEASE_MS_MAX as u64);
    let a = Client::connect(o).await.expect("a session on the master");
    assert_eq!(g.stat(m, "lease_ceiling_ms").await, LEASE_MS_MAX as u64);
    let mut events = a.events();
    let t = own(&a, "x").await;

    // The master dies, and so does the slow link with the entry still in it: member 3
    // sees its link to the master close and stands (as the highest survivor) without
    // the entry. Member 2 stood at once and reached nobody.
    let killed = Instant::now();
    g.kill(m).await;
    slow_link.stop().await;
    let _fast_link = relay(&via, &third, 0).await;
    let m2 = g.master(Some(m)).await;
    let took = killed.elapsed();
    eprintln!("kill -9 of the master, the highest survivor behind, to a new master: {took:?}");
    assert!(
        took < Duration::from_secs(15),
        "a new master after {took:?}: the survivors waited for an election timeout"
    );
    assert_eq!(m2, 1, "only member 2 holds the whole log");
    resynced(&mut events).await;
    assert_eq!(a.owned_ports(), vec![("x".into(), t)]);
}

/// A new master's recovery window covers the leases earlier masters granted, not the
/// longest they were allowed to (300 s here): a master grants up to 10 s until a
/// client asks for more, and raises its ceiling through Raft first.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recovery_windows_cover_the_leases_granted_not_the_longest_allowed() {
    // Steadier than the defaults (300 ms master lease): a master deposed by a CPU stall
    // of a loaded test machine would open a new window mid-test and defeat what it
    // measures. Failover after SIGKILL is as fast either way (crash detection).
    let steady = [
        "--lease-ms-max",
        "300000",
        "--heartbeat-ms",
        "100",
        "--election-timeout-ms-min",
        "1500",
        "--election-timeout-ms-max",
        "2500",
        "--master-lease-ms",
        "1200",
    ];
    let mut g = Group::start_with("ceiling", &steady).await;
    let m1 = g.master(None).await;
    assert_eq!(g.stat(m1, "lease_ceiling_ms").await, 10_000);
    let a = g.client_with_lease(10_000).await;
    let mut a_events = a.events();
    let ta = own(&a, "a").await;

    g.kill(m1).await;
    let m2 = g.master(Some(m1)).await;
    resynced(&mut a_events).await;
    // 10 s stretched by the drift margin, not 300 s.
    let left = g.stat(m2, "recovery_left_ms").await;
    assert!(
        left > 0 && left <= 11_100,
        "recovery window left: {left} ms"
    );

    // A client asking for a minute gets it once the group has recorded the raise.
    let b = g.client_with_lease(60_000).await;
    assert_eq!(b.session().lease_ms, 60_000);
    assert_eq!(g.stat(m2, "lease_ceiling_ms").await, 60_000);
    let mut b_events = b.events();
    // New names wait for the window to close (and m2 then records that it did).
    let closes = Instant::now() + Duration::from_secs(20);
    while g.stat(m2, "recovery_left_ms").await > 0 {
        assert!(Instant::now() < closes, "the window never closed");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let tb = own(&b, "b").await;

    // The next master owes that minute.
    g.respawn(m1).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let mut a_events = a.events();
    g.kill(m2).await;
    let m3 = g.master(Some(m2)).await;
    let left = g.stat(m3, "recovery_left_ms").await;
    assert!(
        left > 60_000 && left <= 66_400,
        "recovery window left: {left} ms"
    );
    resynced(&mut a_events).await;
    resynced(&mut b_events).await;
    assert_eq!(a.owned_ports(), vec![("a".into(), ta)]);
    assert_eq!(b.owned_ports(), vec![("b".into(), tb)]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_master_stopped_past_its_lease_never_serves_again() {
    let mut g = Group::start("stop").await;
    let m = g.master(None).await;
    let a = g.client().await;
    let mut events = a.events();
    let tx = own(&a, "x").await;

    // Stop the master well past its lease and the election of a successor.
    g.signal(m, "-STOP");
    let stopped = Instant::now();
    let m2 = g.master(Some(m)).await;
    // The client gives up on the silent master and takes its session over there.
    resynced(&mut events).await;
    eprintln!(
        "SIGSTOP of the master to every port reclaimed: {:?}",
        stopped.elapsed()
    );
    assert_eq!(a.owned_ports(), vec![("x".into(), tx)]);

    g.signal(m, "-CONT");
    // The old master knows at once that its lease ran out: it serves nobody. A client
    // that knows only its address is sent to the new master.
    let mut only_old = ClientOptions::new(g.addrs[m].clone());
    only_old.connect_timeout = Duration::from_secs(10);
    let c = within("client via the old master", Client::connect(only_old))
        .await
        .expect("redirected to the new master");
    let o = c.query("x").await.unwrap().expect("x is owned");
    assert_eq!((o.session, o.token), (a.session().id, tx));
    let stats = server_stats(&ClientOptions::new("unused"), &g.addrs[m])
        .await
        .unwrap();
    let role = MemberRole::from_stats(&stats).unwrap();
    assert_ne!(
        role,
        MemberRole::Master,
        "the continued old master is not master"
    );
    assert_eq!(g.master(None).await, m2);
    assert!(a.is_alive());
    // A restarted member rejoins as a follower.
    g.kill(m).await;
    g.respawn(m).await;
    assert_eq!(
        g.master(None).await,
        m2,
        "no election when a follower comes back"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dev_starts_a_group_that_ctl_status_describes() {
    let _turn = ONE_GROUP.lock().await;
    // Member i uses base+i-1 (clients), base+100+i-1 (peers), base+200+i-1 (HTTP):
    // below the ephemeral range, so outgoing connections do not take them.
    let base = 20_000 + (std::process::id() % 4_000) as u16 * 2;
    let dir = std::env::temp_dir().join(format!("portswitch-dev-test-{}", std::process::id()));
    let mut dev = Command::new(BIN)
        .args(["dev", "--nodes", "3", "--base-port", &base.to_string()])
        .args(["--dir", &dir.to_string_lossy()])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(dev.stdout.take().unwrap()).lines();
    let first = within("dev starts", lines.next_line())
        .await
        .unwrap()
        .unwrap();
    assert!(first.starts_with("a group of 3"), "{first}");
    let addrs: Vec<String> = (0..3).map(|i| format!("127.0.0.1:{}", base + i)).collect();
    let all = addrs.join(",");
    // Wait (bounded) for a master, then read everyone's status in one command.
    let deadline = Instant::now() + Duration::from_secs(20);
    let masters = loop {
        let out = within(
            "ctl status",
            Command::new(BIN)
                .args(["ctl", "--addr", &all, "--json", "status"])
                .output(),
        )
        .await
        .unwrap();
        let members: Vec<serde_json::Value> = String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(members.len(), 3);
        let masters: Vec<_> = members
            .iter()
            .filter(|m| m["role_name"] == "master")
            .cloned()
            .collect();
        if masters.len() == 1 {
            break masters;
        }
        assert!(Instant::now() < deadline, "no master: {members:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(masters[0]["epoch"].as_u64().unwrap() > 1_700_000_000);
    assert!(masters[0]["master_lease_left_ms"].as_u64().unwrap() > 0);
    // A client given every member's address gets a session on the master.
    let mut o = ClientOptions::new(addrs[0].clone());
    o.servers = addrs[1..].to_vec();
    let c = Client::connect(o).await.unwrap();
    assert!(matches!(
        c.register("dev/x", "").await.unwrap(),
        RegisterOutcome::Owned { .. }
    ));
    // Ctrl-C stops the whole group (SIGKILL would leave the members running).
    let pid = dev.id().unwrap().to_string();
    assert!(std::process::Command::new("kill")
        .args(["-INT", &pid])
        .status()
        .unwrap()
        .success());
    within("dev stops", dev.wait()).await.unwrap();
    let opts = ClientOptions::new("unused");
    for a in &addrs {
        assert!(server_stats(&opts, a).await.is_err(), "{a} still serving");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// Sends `ADMIN command` and `PING` in one frame on a fresh connection, with no
/// session (an admin from loopback on a server without users); the (id, opcode) of
/// each reply in the order they came.
async fn admin_then_ping(addr: &str, command: &str) -> Vec<(u32, u8)> {
    use portswitch_proto::frame::{frame_len, messages};
    use portswitch_proto::{FrameBuf, Request};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut fb = FrameBuf::new(1 << 16, 16);
    fb.push_request(
        1,
        &Request::Admin {
            command: command.as_bytes(),
        },
    );
    fb.push_request(2, &Request::Ping);
    let mut b = bytes::BytesMut::new();
    fb.take_into(&mut b);
    s.write_all(&b).await.unwrap();
    let mut got = Vec::new();
    let mut buf = bytes::BytesMut::new();
    while got.len() < 2 {
        if let Some(n) = frame_len(&buf, usize::MAX).unwrap() {
            let frame = buf.split_to(n);
            for m in messages(&frame[4..], usize::MAX) {
                let m = m.unwrap();
                got.push((m.id, m.opcode));
            }
            continue;
        }
        let n = within("replies", s.read_buf(&mut buf)).await.unwrap();
        assert!(n > 0, "connection closed after {got:?}");
    }
    got
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn members_are_added_and_removed_without_dropping_sessions() {
    let mut g = Group::start("members").await;
    let m = g.master(None).await;
    // A membership change is answered when Raft has committed it; the requests after
    // it on the same connection are still answered after it (request order).
    assert_eq!(
        admin_then_ping(&g.addrs[m], r#"{"op":"member_remove","id":9}"#).await,
        vec![(1, op::ERROR), (2, op::OK)]
    );
    let a = g.client().await;
    let mut events = a.events();
    let mut tokens = Vec::new();
    for i in 0..5 {
        tokens.push(own(&a, &format!("job/{i}")).await);
    }
    // A fourth server joins: started with --join, then added on the master.
    let addr4 = format!("127.0.0.1:{}", free_port());
    let peer4 = format!("127.0.0.1:{}", free_port());
    let mut fourth = Command::new(BIN)
        .args(["serve", "--listen", &addr4, "--http-listen", "127.0.0.1:0"])
        .args(["--data-dir", &g.dir().join("4").to_string_lossy()])
        .args([
            "--node-id",
            "4",
            "--member",
            &format!("4={peer4}/{addr4}"),
            "--join",
        ])
        .args(["--lease-ms-max", &LEASE_MS_MAX.to_string()])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(fourth.stdout.take().unwrap()).lines();
    assert!(within("4 starts", lines.next_line())
        .await
        .unwrap()
        .unwrap()
        .starts_with("listening on"));
    let all = g.addrs.join(",");
    let ctl = |args: &[&str]| {
        let mut c = Command::new(BIN);
        c.args(["ctl", "--addr", &all, "--json"])
            .args(args)
            .kill_on_drop(true);
        c
    };
    let out = within(
        "member add",
        ctl(&["member", "add", "4", &peer4, &addr4]).output(),
    )
    .await
    .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let status: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        status["voters"],
        serde_json::json!([1, 2, 3, 4]),
        "{status}"
    );
    assert_eq!(status["members"]["4"]["client_addr"], addr4.as_str());

    // Remove the master itself: another member takes over, the session carries on.
    let out = within(
        "member remove",
        ctl(&["member", "remove", &(m + 1).to_string()]).output(),
    )
    .await
    .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let status: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let voters: Vec<u64> = serde_json::from_value(status["voters"].clone()).unwrap();
    assert_eq!(voters.len(), 3);
    assert!(!voters.contains(&(m as u64 + 1)));
    resynced(&mut events).await;
    let mut owned: Vec<u64> = a.owned_ports().into_iter().map(|(_, t)| t).collect();
    owned.sort();
    assert_eq!(owned, tokens, "same ports, same tokens, on the new master");
    // The removed member no longer leads; the group still fails over without it.
    let stats = server_stats(&ClientOptions::new("unused"), &g.addrs[m])
        .await
        .unwrap();
    assert_ne!(MemberRole::from_stats(&stats), Some(MemberRole::Master));
    let out = within("member list", ctl(&["member", "list"]).output())
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(a.is_alive());
    g.kill(m).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn users_belong_to_the_group_and_a_deleted_users_sessions_end() {
    const ROOT_PW: &str = "Granite-Falcon-2026!";
    const ALICE_PW: &str = "Tulip-Orbit-93";
    let mut g = Group::start("users").await;
    let addrs = g.addrs.clone();
    let login = |user: &str, pw: &str| {
        let mut o = ClientOptions::new(addrs[0].clone());
        o.servers = addrs[1..].to_vec();
        o.credentials = Some((user.to_string(), pw.to_string()));
        o.connect_timeout = Duration::from_secs(10);
        Client::connect(o)
    };
    // The first user, from loopback, on whichever member is master.
    let anon = g.client().await;
    anon.admin(
        &serde_json::json!({"op": "user_add", "user": "root", "password": ROOT_PW, "roles": ["root"]})
            .to_string(),
    )
    .await
    .unwrap();
    drop(anon);
    let root = login("root", ROOT_PW).await.unwrap();
    root.admin(
        &serde_json::json!({"op": "role_add", "role": "w", "grants": [{"prefix": "svc/", "perms": "register,query"}]})
            .to_string(),
    )
    .await
    .unwrap();
    root.admin(
        &serde_json::json!({"op": "user_add", "user": "alice", "password": ALICE_PW, "roles": ["w"]})
            .to_string(),
    )
    .await
    .unwrap();
    drop(root);
    let alice = login("alice", ALICE_PW).await.unwrap();
    let token = own(&alice, "svc/a").await;
    let mut events = alice.events();

    // The master dies: the users were the group's, so the next master logs them in,
    // and alice's session resumes there with its port.
    let m = g.master(None).await;
    g.kill(m).await;
    let m2 = g.master(Some(m)).await;
    assert_ne!(m, m2);
    let root = login("root", ROOT_PW)
        .await
        .expect("root logs in at the new master");
    resynced(&mut events).await;
    assert_eq!(
        root.query("svc/a")
            .await
            .unwrap()
            .map(|o| (o.session, o.token)),
        Some((alice.session().id, token))
    );

    // Deleting alice ends her sessions at once and frees her port.
    root.admin(&serde_json::json!({"op": "user_del", "user": "alice"}).to_string())
        .await
        .unwrap();
    common::eventually_async("alice's session ended", || async { !alice.is_alive() }).await;
    common::eventually_async("alice's port freed", || async {
        root.query("svc/a").await.unwrap().is_none()
    })
    .await;
    assert!(login("alice", ALICE_PW).await.is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_follower_names_the_master_in_a_field_of_its_answer() {
    use portswitch_proto::{FrameBuf, Reply, Request, ServerMsg};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let g = Group::start("hint").await;
    let m = g.master(None).await;
    let follower = (m + 1) % g.addrs.len();
    let mut s = tokio::net::TcpStream::connect(&g.addrs[follower])
        .await
        .unwrap();
    let mut fb = FrameBuf::new(1 << 14, 8);
    fb.push_request(1, &Request::Hello(common::hello(10_000, false)));
    let mut out = bytes::BytesMut::new();
    fb.take_into(&mut out);
    s.write_all(&out).await.unwrap();
    let mut buf = vec![0u8; 4];
    within("reply", s.read_exact(&mut buf)).await.unwrap();
    let len = u32::from_be_bytes(buf[..4].try_into().unwrap()) as usize;
    let mut frame = vec![0u8; len];
    within("reply", s.read_exact(&mut frame)).await.unwrap();
    let msg = portswitch_proto::frame::messages(&frame, 8)
        .next()
        .unwrap()
        .unwrap();
    match ServerMsg::decode(msg.opcode, msg.id, msg.body).unwrap() {
        ServerMsg::Reply {
            reply:
                Reply::Error {
                    code: ErrorCode::NotMaster,
                    master,
                    ..
                },
            ..
        } => assert_eq!(master, g.addrs[m].as_bytes()),
        other => panic!("{other:?}"),
    }
}
