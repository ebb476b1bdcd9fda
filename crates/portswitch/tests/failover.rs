//! Failover keeps locks moving: three `portswitch serve` members as processes, the
//! master killed (SIGKILL) or stopped (SIGSTOP), and every kind of waiter — the
//! library's `register_wait`, `Lock`, `Election`, `Mux` sessions, and the CLI's
//! `register --wait`, `lock` and `elect` — granted on the new master as soon as the
//! port is free.
//!
//! Most tests use 20 s leases, so the new master's recovery window (22 s) outlasts
//! the 10 s bound every wait here has: a grant seen within it came from the holder
//! letting go, never from the window closing. The tests about windows use 2 s leases.

mod common;

use std::process::Stdio;
use std::time::Duration;

use common::group::{own, Group};
use common::{eventually_async, resynced, within};
use portswitch_client::{Client, ClientOptions, Election, Error, ErrorCode, Lock, Mux};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Command;

const BIN: &str = env!("CARGO_BIN_EXE_portswitch");

/// Client leases of the tests whose windows must outlast their waits.
const LONG_LEASE_MS: u64 = 20_000;

/// Members whose first ceiling is the short leases some tests use (2 s), and who
/// grant the long ones after raising it.
const MEMBERS: [&str; 4] = [
    "--lease-ms-max",
    "30000",
    "--lease-ceiling-start-ms",
    "2000",
];

fn options(g: &Group, lease_ms: u64) -> ClientOptions {
    let mut o = ClientOptions::new(g.addrs[0].clone());
    o.servers = g.addrs[1..].to_vec();
    o.lease = Duration::from_millis(lease_ms);
    // Idle sessions notice a silent master within a second.
    o.keepalive = Some(Duration::from_millis(500));
    o.connect_timeout = Duration::from_secs(10);
    o
}

async fn session(g: &Group, lease_ms: u64) -> Client {
    Client::connect(options(g, lease_ms))
        .await
        .expect("a client finds the master")
}

async fn stat(g: &Group, i: usize, name: &str) -> u64 {
    g.stat(i, name).await
}

/// Waits until member `m` counts `n` waiters (a hang guard, not a timing assertion).
async fn waiters(g: &Group, m: usize, n: u64) {
    eventually_async(&format!("{n} waiters on member {}", m + 1), || async move {
        stat(g, m, "waiters").await == n
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waiter_queued_on_a_killed_master_is_granted_when_the_holder_lets_go() {
    let mut g = Group::start_with("waiter-kill", &MEMBERS).await;
    let m = g.master(None).await;
    let holder = session(&g, LONG_LEASE_MS).await;
    let waiter = session(&g, LONG_LEASE_MS).await;
    let lock = Lock::acquire(&holder, "jobs/x").await.unwrap();
    let mut held = holder.events();
    let w = tokio::spawn({
        let waiter = waiter.clone();
        async move { Lock::acquire(&waiter, "jobs/x").await }
    });
    waiters(&g, m, 1).await;

    g.kill(m).await;
    let m2 = g.master(Some(m)).await;
    resynced(&mut held).await;
    assert!(lock.is_held(), "the holder reclaimed its lock");
    // The waiter took its place in the queue on the new master.
    waiters(&g, m2, 1).await;
    let t = lock.token();
    lock.release().await.unwrap();
    let granted = within("the waiter is granted the lock", w)
        .await
        .unwrap()
        .unwrap();
    assert!(granted.token() > t, "{} after {t}", granted.token());
    assert!(granted.is_held());
    assert!(
        stat(&g, m2, "recovery_left_ms").await > 0,
        "granted by the release, inside the window"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waiter_is_granted_when_the_holders_session_ends_inside_the_window() {
    let mut g = Group::start_with("waiter-end", &MEMBERS).await;
    let m = g.master(None).await;
    let holder = session(&g, LONG_LEASE_MS).await;
    let waiter = session(&g, LONG_LEASE_MS).await;
    own(&holder, "jobs/y").await;
    let mut held = holder.events();
    let w = tokio::spawn({
        let waiter = waiter.clone();
        async move { waiter.register_wait("jobs/y", "next").await }
    });
    waiters(&g, m, 1).await;

    g.kill(m).await;
    let m2 = g.master(Some(m)).await;
    resynced(&mut held).await;
    waiters(&g, m2, 1).await;
    // The holder's session ends: its reclaimed port goes to the next in line at once.
    holder.close().await.unwrap();
    let token = within("the waiter is granted the port", w)
        .await
        .unwrap()
        .unwrap();
    let o = waiter.query("jobs/y").await.unwrap().expect("owned");
    assert_eq!(
        (o.session, o.token, &o.value[..]),
        (waiter.session().id, token, &b"next"[..])
    );
    assert!(stat(&g, m2, "recovery_left_ms").await > 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_port_nobody_reclaims_goes_to_its_waiter_when_the_window_closes() {
    let mut g = Group::start_with("waiter-window", &MEMBERS).await;
    let m = g.master(None).await;
    let holder = session(&g, 2_000).await;
    let waiter = session(&g, 2_000).await;
    own(&holder, "jobs/z").await;
    let w = tokio::spawn({
        let waiter = waiter.clone();
        async move { waiter.register_wait("jobs/z", "").await }
    });
    waiters(&g, m, 1).await;
    // The holder's process goes away without a word: nobody will reclaim jobs/z.
    holder.detach();

    g.kill(m).await;
    let m2 = g.master(Some(m)).await;
    let token = within("the waiter is granted when the window closes", w)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        stat(&g, m2, "recovery_left_ms").await,
        0,
        "granted only once the window closed"
    );
    assert_eq!(token >> 32, stat(&g, m2, "epoch").await, "a grant of m2");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_candidate_is_elected_on_the_new_master_after_a_stop() {
    let g = Group::start_with("elect-stop", &MEMBERS).await;
    let m = g.master(None).await;
    let leader = session(&g, LONG_LEASE_MS).await;
    let candidate = session(&g, LONG_LEASE_MS).await;
    let election = Election::new(&leader, "leader/api");
    let leading = election.campaign("10.0.0.1:80").await.unwrap();
    let mut led = leader.events();
    let c = tokio::spawn({
        let candidate = candidate.clone();
        async move {
            Election::new(&candidate, "leader/api")
                .campaign("10.0.0.2:80")
                .await
        }
    });
    waiters(&g, m, 1).await;

    g.signal(m, "-STOP");
    let m2 = g.master(Some(m)).await;
    resynced(&mut led).await;
    assert!(leading.is_leader());
    waiters(&g, m2, 1).await;
    leading.resign().await.unwrap();
    let next = within("the candidate is elected", c)
        .await
        .unwrap()
        .unwrap();
    assert!(next.is_leader());
    let o = Election::new(&candidate, "leader/api")
        .leader()
        .await
        .unwrap()
        .expect("a leader");
    assert_eq!(&o.value[..], b"10.0.0.2:80");
    g.signal(m, "-CONT");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mux_sessions_fail_over_and_their_waiters_are_granted() {
    let mut g = Group::start_with("mux", &MEMBERS).await;
    let m = g.master(None).await;
    let mux = Mux::connect(options(&g, LONG_LEASE_MS)).await.unwrap();
    let holder = mux.session().await.unwrap();
    let waiter = mux.session().await.unwrap();
    let lock = Lock::acquire(&holder, "jobs/m").await.unwrap();
    let mut held = holder.events();
    let w = tokio::spawn({
        let waiter = waiter.client().clone();
        async move { Lock::acquire(&waiter, "jobs/m").await }
    });
    waiters(&g, m, 1).await;

    g.kill(m).await;
    let m2 = g.master(Some(m)).await;
    resynced(&mut held).await;
    assert!(mux.is_connected());
    waiters(&g, m2, 1).await;
    lock.release().await.unwrap();
    let granted = within("the mux waiter is granted", w)
        .await
        .unwrap()
        .unwrap();
    assert!(granted.is_held());
    assert_eq!(
        waiter
            .query("jobs/m")
            .await
            .unwrap()
            .expect("owned")
            .session,
        waiter.info().id
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_port_reclaimed_and_released_in_the_window_is_free_at_once() {
    let mut g = Group::start_with("settled", &MEMBERS).await;
    let m = g.master(None).await;
    let a = session(&g, LONG_LEASE_MS).await;
    let b = session(&g, LONG_LEASE_MS).await;
    own(&a, "kept").await;
    let t = own(&a, "released").await;
    let mut events = a.events();
    g.kill(m).await;
    let m2 = g.master(Some(m)).await;
    resynced(&mut events).await;
    a.unregister("released").await.unwrap();
    // Free at once, in the window: nobody else can have held it.
    assert_eq!(b.query("released").await.unwrap(), None);
    let t2 = own(&b, "released").await;
    assert!(t2 > t);
    // A name nobody reclaimed is still unknown.
    match b.register("never-seen", "").await {
        Err(Error::Server {
            code: ErrorCode::Recovering,
            ..
        }) => {}
        other => panic!("{other:?}"),
    }
    assert!(stat(&g, m2, "recovery_left_ms").await > 0);
    assert!(a.owns("kept", a.owned_ports()[0].1));
}

/// Sessions with 2 s leases survive a master stopped for 4 s: they notice the
/// silence within a sixth of the lease, find the new master and resume there before
/// their lease view runs out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_with_two_second_leases_survive_a_stopped_master() {
    let g = Group::start_with("short-stop", &MEMBERS).await;
    let m = g.master(None).await;
    let mut sessions = Vec::new();
    for i in 0..8 {
        let mut o = options(&g, 2_000);
        o.keepalive = None; // the library's own pace: a quarter of the lease
        let c = Client::connect(o).await.unwrap();
        let t = own(&c, &format!("short/{i}")).await;
        let ev = c.events();
        sessions.push((c, t, ev));
    }
    g.signal(m, "-STOP");
    for (_, _, ev) in &mut sessions {
        resynced(ev).await;
    }
    tokio::time::sleep(Duration::from_secs(4)).await;
    g.signal(m, "-CONT");
    for (i, (c, t, _)) in sessions.iter().enumerate() {
        assert!(c.is_alive(), "session {i} lost");
        assert_eq!(c.owned_ports(), vec![(format!("short/{i}").into(), *t)]);
    }
}

/// With every client on 2 s leases the ceiling comes down to 2 s, and a new master's
/// window is 2 s stretched by the drift margin — also when it takes over inside its
/// predecessor's window.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recovery_windows_follow_the_leases_in_use() {
    // The ceiling starts at 4 s here, so that it comes down within the test.
    let mut g = Group::start_with(
        "follow",
        &[
            "--lease-ms-max",
            "30000",
            "--lease-ceiling-start-ms",
            "4000",
        ],
    )
    .await;
    let m = g.master(None).await;
    assert_eq!(stat(&g, m, "lease_ceiling_ms").await, 4_000);
    let a = session(&g, 2_000).await;
    own(&a, "p").await;
    eventually_async("the ceiling comes down to the leases in use", || async {
        stat(&g, m, "lease_ceiling_ms").await == 2_000
    })
    .await;
    // The master grants by the lower ceiling at once and records it through Raft
    // right after; only a recorded ceiling binds its successor, so wait for that.
    eventually_async("the group records the lower ceiling", || async {
        let status = a.admin(r#"{"op":"member_list"}"#).await.unwrap();
        let status: serde_json::Value = serde_json::from_str(&status).unwrap();
        status["facts"]["lease_ceiling_ms"] == 2_000
    })
    .await;
    // 2 s × 1050 / 950, rounded up.
    let window_max = 2_211;
    let mut events = a.events();
    g.kill(m).await;
    let m2 = g.master(Some(m)).await;
    let left = stat(&g, m2, "recovery_left_ms").await;
    assert!(left > 0 && left <= window_max, "window left {left} ms");
    assert_eq!(stat(&g, m2, "lease_ceiling_ms").await, 2_000);
    resynced(&mut events).await;

    // Another failover inside that window: no longer a window than 2 s leases need.
    g.respawn(m).await;
    let mut events = a.events();
    g.kill(m2).await;
    let m3 = g.master(Some(m2)).await;
    let left = stat(&g, m3, "recovery_left_ms").await;
    assert!(left <= window_max, "window left {left} ms");
    resynced(&mut events).await;
    assert!(a.is_alive());
}

/// A master shut down gracefully (SIGTERM) says GOAWAY; its clients move to the new
/// master at once and keep their ports.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_master_that_steps_down_moves_its_clients_at_once() {
    let mut g = Group::start_with("term", &MEMBERS).await;
    let m = g.master(None).await;
    let a = session(&g, LONG_LEASE_MS).await;
    let t = own(&a, "p").await;
    let mut events = a.events();
    g.signal(m, "-TERM");
    resynced(&mut events).await;
    assert_eq!(a.owned_ports(), vec![("p".into(), t)]);
    g.wait(m).await;
    assert_ne!(g.master(Some(m)).await, m);
}

/// The command-line waiters: `register --wait`, `lock` and `elect`, queued behind
/// holders on a master that is killed, each get their port when its holder lets go.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_waiters_are_granted_on_the_new_master() {
    let mut g = Group::start_with("cli", &MEMBERS).await;
    let m = g.master(None).await;
    let holder = session(&g, LONG_LEASE_MS).await;
    let ports = ["cli/register", "cli/lock", "cli/elect"];
    for p in ports {
        own(&holder, p).await;
    }
    let mut held = holder.events();
    let addr = g.addrs.join(",");
    let ctl = |args: &[&str]| {
        let mut c = Command::new(BIN);
        c.args(["ctl", "--addr", &addr, "--lease-ms", "20000"])
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .kill_on_drop(true);
        c
    };
    let mut register = ctl(&["register", "cli/register", "--wait", "--hold-secs", "0"])
        .spawn()
        .unwrap();
    let lock = ctl(&[
        "lock",
        "cli/lock",
        "--",
        "sh",
        "-c",
        "echo locked $PORTSWITCH_TOKEN",
    ])
    .spawn()
    .unwrap();
    let elect = ctl(&[
        "elect",
        "cli/elect",
        "--",
        "sh",
        "-c",
        "echo elected $PORTSWITCH_TOKEN",
    ])
    .spawn()
    .unwrap();
    waiters(&g, m, 3).await;

    g.kill(m).await;
    let m2 = g.master(Some(m)).await;
    resynced(&mut held).await;
    waiters(&g, m2, 3).await;
    for p in ports {
        holder.unregister(p).await.unwrap();
    }
    let mut out = BufReader::new(register.stdout.take().unwrap()).lines();
    let line = within("register --wait", out.next_line())
        .await
        .unwrap()
        .unwrap();
    assert!(line.starts_with("registered cli/register"), "{line}");
    for (child, want) in [(lock, "locked"), (elect, "elected")] {
        let out = within(want, child.wait_with_output()).await.unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(out.status.success() && text.starts_with(want), "{text}");
        let token: u64 = text.trim().rsplit(' ').next().unwrap().parse().unwrap();
        assert_eq!(token >> 32, stat(&g, m2, "epoch").await, "granted by m2");
    }
    assert!(within("register exits", register.wait())
        .await
        .unwrap()
        .success());
}

/// `portswitch dev` keeps its group running when the master dies, and says who
/// takes over.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dev_keeps_the_group_running_when_the_master_dies() {
    let _turn = common::group::ONE_GROUP.lock().await;
    let base = common::group::free_port();
    let dir = std::env::temp_dir().join(format!("portswitch-dev-test-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let mut dev = Command::new(BIN)
        .args(["dev", "--nodes", "3", "--base-port", &base.to_string()])
        .arg("--dir")
        .arg(&dir)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(dev.stdout.take().unwrap()).lines();
    let mut pids = std::collections::HashMap::new();
    // "  member 1: clients ... pid 1234", then "member 2 is master (epoch N)".
    let master_of = |line: &str| {
        line.strip_prefix("member ")
            .filter(|_| line.contains(" is master"))
            .and_then(|r| r.split(' ').next())
            .map(str::to_string)
    };
    let first = within("a master", async {
        loop {
            let line = lines.next_line().await.unwrap().expect("dev runs");
            if let Some(m) = master_of(&line) {
                return m;
            }
            if let Some(rest) = line.trim().strip_prefix("member ") {
                if let (Some(id), Some(pid)) = (rest.split(':').next(), rest.split("pid ").nth(1)) {
                    pids.insert(id.to_string(), pid.trim().to_string());
                }
            }
        }
    })
    .await;
    let pid = pids[&first].clone();
    assert!(std::process::Command::new("kill")
        .args(["-KILL", &pid])
        .status()
        .unwrap()
        .success());
    let (exited, next) = within("another master", async {
        let mut exited = false;
        loop {
            let line = lines.next_line().await.unwrap().expect("dev goes on");
            if line.starts_with(&format!("member {first} exited")) {
                exited = true;
            }
            if let Some(m) = master_of(&line).filter(|m| *m != first) {
                return (exited, m);
            }
        }
    })
    .await;
    assert!(exited, "dev says the member exited");
    assert_ne!(next, first);
    // Ctrl-C (here SIGTERM) stops the whole group: no member outlives dev.
    let dev_pid = dev.id().unwrap().to_string();
    assert!(std::process::Command::new("kill")
        .args(["-TERM", &dev_pid])
        .status()
        .unwrap()
        .success());
    let status = within("dev stops", dev.wait()).await.unwrap();
    assert!(status.success(), "{status:?}");
    for (id, pid) in &pids {
        let alive = std::process::Command::new("kill")
            .args(["-0", pid])
            .stderr(Stdio::null())
            .status()
            .unwrap()
            .success();
        assert!(!alive, "member {id} (pid {pid}) outlived dev");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// The failover-locks workload in its smoke version: sessions contend for locks
/// while the master is killed and stopped; no two holders overlap, tokens rise, and
/// grants come again after every fault.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failover_locks_smoke_run_is_safe_and_live() {
    use clap::Parser;
    use portswitch_harness::scenario::failover_locks::FailoverLocksArgs;

    /// The scenario's flags, as its command line takes them.
    #[derive(Parser)]
    struct Flags {
        #[command(flatten)]
        args: FailoverLocksArgs,
    }
    let _turn = common::group::ONE_GROUP.lock().await;
    let args = Flags::parse_from([
        "failover-locks",
        "--json",
        "--connections=8",
        "--locks=2",
        "--lease-ms=2000",
        "--duration=16",
        "--warmup-s=4",
        "--faults=kill,stop",
        "--stop-ms=2000",
        "--hold-ms=20",
        // Members start at the 2 s leases in use (the default ceiling comes down
        // only after a whole 10 s of them).
        "--member-flag=--lease-ceiling-start-ms=2000",
    ])
    .args;
    // The run itself takes 16 s: this bound is for a hang.
    let outcome = tokio::time::timeout(
        Duration::from_secs(60),
        portswitch_harness::scenario::failover_locks::run(&args, BIN.as_ref()),
    )
    .await
    .expect("the scenario ends")
    .expect("the scenario runs");
    let r = &outcome.report;
    assert_eq!(r["overlaps"], 0, "{r}");
    assert_eq!(r["token_regressions"], 0, "{r}");
    let faults = r["faults"].as_array().unwrap();
    assert_eq!(faults.len(), 2, "{r}");
    for f in faults {
        assert!(f["first_grant_ms"].is_u64(), "no grant after {f}");
    }
    assert!(outcome.ok, "{r}");
}
