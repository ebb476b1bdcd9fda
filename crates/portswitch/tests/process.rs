//! Real processes: the `portswitch` binary as a server and as CLI clients, killed with
//! SIGKILL where the test needs a process to die.

mod common;

use std::process::Stdio;
use std::time::Duration;

use common::within;
use portswitch_client::{Client, ClientOptions, Event};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

const BIN: &str = env!("CARGO_BIN_EXE_portswitch");

/// A `portswitch serve` process on ephemeral ports.
struct Serve {
    child: Child,
    addr: String,
}

async fn serve(extra: &[&str], env: &[(&str, &str)]) -> Serve {
    let mut args = vec!["--listen", "127.0.0.1:0", "--http-listen", "127.0.0.1:0"];
    args.extend_from_slice(extra);
    let (child, addr) = common::serve_process(&args, env).await;
    Serve { child, addr }
}

fn ctl(addr: &str, args: &[&str]) -> Command {
    let mut c = Command::new(BIN);
    c.args(["ctl", "--addr", addr])
        .args(args)
        .kill_on_drop(true);
    c
}

async fn ctl_out(addr: &str, args: &[&str]) -> (i32, String) {
    let out = within("ctl", ctl(addr, args).output()).await.unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

async fn watcher(addr: &str) -> Client {
    Client::connect(ClientOptions::new(addr)).await.unwrap()
}

/// Starts `ctl register` and waits until it says it owns the port.
async fn holder(addr: &str, args: &[&str]) -> Child {
    let mut child = ctl(addr, args)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let line = within("holder registers", lines.next_line())
        .await
        .unwrap()
        .unwrap();
    assert!(line.contains("registered"), "{line}");
    // Keep reading so the child never blocks on a full pipe.
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    child
}

async fn released(events: &mut tokio::sync::broadcast::Receiver<Event>, name: &str) {
    within("RELEASED", async {
        loop {
            if let Event::Released { port, .. } = events.recv().await.unwrap() {
                if &port[..] == name.as_bytes() {
                    return;
                }
            }
        }
    })
    .await
}

#[tokio::test]
async fn a_killed_holder_releases_its_port() {
    let srv = serve(&[], &[]).await;
    let w = watcher(&srv.addr).await;
    let mut events = w.events();

    // Asked to end on disconnect: released as soon as the kernel closes its socket.
    let mut fast = holder(
        &srv.addr,
        &["--json", "register", "fast", "--end-on-disconnect"],
    )
    .await;
    assert!(w.watch("fast").await.unwrap().is_some());
    fast.start_kill().unwrap();
    released(&mut events, "fast").await;

    // Not asked: the session outlives its connection for its lease, then expires.
    let mut slow = holder(
        &srv.addr,
        &["--json", "--lease-ms", "3000", "register", "slow"],
    )
    .await;
    let holder_session = w.query("slow").await.unwrap().unwrap().session;
    assert!(w.watch("slow").await.unwrap().is_some());
    slow.start_kill().unwrap();
    slow.wait().await.unwrap();
    assert_eq!(
        w.query("slow").await.unwrap().unwrap().session,
        holder_session,
        "kept for the lease"
    );
    released(&mut events, "slow").await;
    assert!(w.query("slow").await.unwrap().is_none());
}

#[tokio::test]
async fn ctl_lock_runs_commands_one_at_a_time_with_rising_tokens() {
    let srv = serve(&[], &[]).await;
    let dir = std::env::temp_dir().join(format!("portswitch-lock-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let log = dir.join("log");
    let script = format!(
        "echo start $PORTSWITCH_TOKEN >> {0}; sleep 0.2; echo end $PORTSWITCH_TOKEN >> {0}",
        log.display()
    );
    let runs: Vec<_> = (0..3)
        .map(|_| {
            ctl(
                &srv.addr,
                &["lock", "jobs/report", "--", "sh", "-c", &script],
            )
            .stderr(Stdio::null())
            .spawn()
            .unwrap()
        })
        .collect();
    for mut r in runs {
        assert!(within("lock run", r.wait()).await.unwrap().success());
    }
    let text = std::fs::read_to_string(&log).unwrap();
    let lines: Vec<(&str, u64)> = text
        .lines()
        .map(|l| {
            let (what, token) = l.split_once(' ').unwrap();
            (what, token.parse().unwrap())
        })
        .collect();
    assert_eq!(lines.len(), 6, "{text}");
    for pair in lines.chunks(2) {
        assert_eq!(
            (pair[0].0, pair[1].0),
            ("start", "end"),
            "runs overlapped:\n{text}"
        );
        assert_eq!(pair[0].1, pair[1].1);
    }
    assert!(
        lines[0].1 < lines[2].1 && lines[2].1 < lines[4].1,
        "tokens rise:\n{text}"
    );
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test]
async fn ctl_lock_kills_the_command_when_the_lock_is_lost() {
    let mut srv = serve(&[], &[]).await;
    let mut run = ctl(
        &srv.addr,
        &["--lease-ms", "500", "lock", "l", "--", "sleep", "30"],
    )
    .stderr(Stdio::null())
    .spawn()
    .unwrap();
    let w = watcher(&srv.addr).await;
    within("lock taken", async {
        while w.query("l").await.unwrap().is_none() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    // The server dies: the lock holder can no longer prove its lease.
    srv.child.start_kill().unwrap();
    let status = within("lock holder gives up", run.wait()).await.unwrap();
    assert_eq!(status.code(), Some(4), "exit code 4 = ownership lost");
}

#[tokio::test]
async fn ctl_commands_with_human_and_json_output() {
    let srv = serve(&[], &[]).await;
    let a = &srv.addr;
    let (code, out) = ctl_out(
        a,
        &["--json", "register", "svc/db", "10.0.0.1:5432", "--detach"],
    )
    .await;
    assert_eq!(code, 0, "{out}");
    let mut lines = out.lines();
    let reg: serde_json::Value = serde_json::from_str(lines.next().unwrap()).unwrap();
    assert_eq!(reg["result"], "registered");
    let det: serde_json::Value = serde_json::from_str(lines.next().unwrap()).unwrap();
    let session = det["session"].as_str().unwrap().to_string();

    let (_, q) = ctl_out(a, &["--json", "query", "svc/db"]).await;
    let q: serde_json::Value = serde_json::from_str(q.trim()).unwrap();
    assert_eq!(
        (q["owned"].as_bool(), q["value"].as_str()),
        (Some(true), Some("10.0.0.1:5432"))
    );
    let (_, human) = ctl_out(a, &["query", "svc/db"]).await;
    assert!(
        human.contains("owned by session") && human.contains("10.0.0.1:5432"),
        "{human}"
    );

    let (_, list) = ctl_out(a, &["list", "svc/"]).await;
    assert!(list.starts_with("svc/db\t"), "{list}");
    let (code, _) = ctl_out(a, &["register", "svc/db", "other"]).await;
    assert_eq!(code, 3, "taken");
    let (code, send) = ctl_out(a, &["--json", "send", "svc/none", "hi"]).await;
    assert_eq!(code, 3, "{send}");

    let (code, _) = ctl_out(a, &["unregister", "svc/db", "--session", &session]).await;
    assert_eq!(code, 0);
    let (_, q) = ctl_out(a, &["query", "svc/db"]).await;
    assert!(q.contains("free"), "{q}");

    let (code, status) = ctl_out(a, &["--json", "status"]).await;
    assert_eq!(code, 0);
    let s: serde_json::Value = serde_json::from_str(status.trim()).unwrap();
    assert!(
        s["epoch"].as_u64().unwrap() > 1_700_000_000,
        "epoch from the wall clock: {s}"
    );
    assert!(s["rss_bytes"].as_u64().unwrap() > 0);

    let (code, out) = ctl_out(
        a,
        &[
            "elect",
            "leader/x",
            "--value",
            "me",
            "--",
            "sh",
            "-c",
            "echo led $PORTSWITCH_TOKEN",
        ],
    )
    .await;
    assert_eq!(code, 0);
    assert!(out.starts_with("led "), "{out}");

    // A server that is not there: a clear error, exit code 1.
    let (code, _) = ctl_out("127.0.0.1:1", &["query", "x"]).await;
    assert_eq!(code, 1);
}

#[tokio::test]
async fn serve_reads_a_config_file_and_environment_and_stops_on_sigterm() {
    let dir = std::env::temp_dir().join(format!("portswitch-serve-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("portswitch.toml");
    std::fs::write(&file, "queue_len_max = 1\nlease_ms_min = 250\n").unwrap();
    let mut srv = serve(
        &["--config", file.to_str().unwrap()],
        &[("PORTSWITCH_PORT_NAME_BYTES_MAX", "20")],
    )
    .await;
    let mut o = ClientOptions::new(srv.addr.clone());
    o.lease = Duration::from_millis(249);
    let e = Client::connect(o.clone()).await.unwrap_err();
    assert_eq!(
        e.code(),
        Some(portswitch_client::ErrorCode::LeaseOutOfRange)
    );
    o.lease = Duration::from_millis(250);
    let c = Client::connect(o).await.unwrap();
    assert_eq!(c.session().limits.queue_len_max, 1);
    assert_eq!(c.session().limits.port_name_bytes_max, 20);
    drop(c);
    let pid = srv.child.id().unwrap().to_string();
    let kill = std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap();
    assert!(kill.success());
    let status = within("graceful stop", srv.child.wait()).await.unwrap();
    assert!(status.success(), "{status:?}");
    // A config the server cannot use is refused at start, with the reason.
    std::fs::write(&file, "lease_ms_min = 5\n").unwrap();
    let out = Command::new(BIN)
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--no-http",
            "--config",
            file.to_str().unwrap(),
        ])
        .output()
        .await
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("lease_ms_min"));
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test]
async fn a_paused_server_does_not_charge_its_own_stall_to_leases() {
    use common::{hello, Msg, Raw};
    use portswitch_proto::Request;
    let srv = serve(&[], &[]).await;
    let pid = srv.child.id().unwrap().to_string();
    let mut raw = Raw::connect_addr(srv.addr.parse().unwrap()).await;
    raw.call(&[Request::Hello(hello(300, false))]).await;
    raw.call(&[Request::Register {
        port: b"held",
        value: b"",
        wait: false,
    }])
    .await;
    let signal = |sig: &str| {
        assert!(std::process::Command::new("kill")
            .args([sig, &pid])
            .status()
            .unwrap()
            .success());
    };
    signal("-STOP");
    stopped(&pid).await;
    tokio::time::sleep(Duration::from_millis(1_000)).await;
    // Sent while the server is stopped: it is the first thing it reads on waking.
    raw.send(&[Request::Ping]).await;
    signal("-CONT");
    assert!(matches!(within("pong", raw.next()).await, Some(Msg::Reply(_, r)) if r == "Ok"));
    let w = watcher(&srv.addr).await;
    assert!(
        w.query("held").await.unwrap().is_some(),
        "the session survived the server's stall"
    );
    let stats = w.stats().await.unwrap();
    assert!(
        stats.iter().any(|(k, v)| k == "stalls_total" && *v >= 1),
        "{stats:?}"
    );
    // Without traffic it still expires after its lease.
    let mut events = w.events();
    w.watch("held").await.unwrap();
    released(&mut events, "held").await;
}

#[tokio::test]
async fn ctl_register_prints_relayed_messages_and_releases_on_sigterm() {
    let srv = serve(&[], &[]).await;
    let mut child = ctl(&srv.addr, &["--json", "register", "svc/inbox"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let first = within("registered", lines.next_line())
        .await
        .unwrap()
        .unwrap();
    assert!(first.contains("registered"), "{first}");
    let (code, _) = ctl_out(&srv.addr, &["send", "svc/inbox", "reload config"]).await;
    assert_eq!(code, 0);
    let line = within("message", lines.next_line()).await.unwrap().unwrap();
    let msg: serde_json::Value = serde_json::from_str(&line).unwrap();
    assert_eq!(
        (msg["event"].as_str(), msg["payload"].as_str()),
        (Some("message"), Some("reload config"))
    );
    let pid = child.id().unwrap().to_string();
    assert!(std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap()
        .success());
    assert!(within("exit", child.wait()).await.unwrap().success());
    // It said BYE before exiting: the port is free now, not after the lease.
    let (_, q) = ctl_out(&srv.addr, &["query", "svc/inbox"]).await;
    assert!(q.contains("free"), "{q}");
}

#[tokio::test]
async fn ctl_manages_users_and_roles_and_logs_in() {
    use tokio::io::AsyncWriteExt;
    let dir = std::env::temp_dir().join(format!("portswitch-ctl-auth-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let data = dir.join("data");
    let audit = dir.join("audit.log");
    let srv = serve(
        &[
            "--data-dir",
            data.to_str().unwrap(),
            "--audit-log",
            audit.to_str().unwrap(),
            "--scram-iterations",
            "4096",
        ],
        &[],
    )
    .await;
    let a = srv.addr.clone();
    // The first user, from loopback, with the password on standard input.
    let mut add = ctl(&a, &["user", "add", "admin", "--role", "root"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    add.stdin
        .take()
        .unwrap()
        .write_all(b"Granite-Falcon-2026!\n")
        .await
        .unwrap();
    assert!(within("user add", add.wait()).await.unwrap().success());
    let as_admin = |args: &[&str]| {
        let mut c = ctl(&a, args);
        c.env("PORTSWITCH_USER", "admin")
            .env("PORTSWITCH_PASSWORD", "Granite-Falcon-2026!");
        c
    };
    succeeds(
        "role add",
        &mut as_admin(&["role", "add", "writers", "--grant", "svc/=register,query"]),
    )
    .await;
    succeeds(
        "user add",
        as_admin(&["user", "add", "alice", "--role", "writers"])
            .env("PORTSWITCH_NEW_PASSWORD", "Tulip-Orbit-93"),
    )
    .await;
    let out = within("user list", as_admin(&["--json", "user", "list"]).output())
        .await
        .unwrap();
    let users: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(users.as_array().unwrap().len(), 2, "{users}");

    // Without credentials: refused with a clear error.
    let out = within("anon", ctl(&a, &["query", "svc/x"]).output())
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("auth_required"));
    // alice can register under svc/, not elsewhere.
    let as_alice = |args: &[&str]| {
        let mut c = ctl(&a, args);
        c.args(["--user", "alice"])
            .env("PORTSWITCH_PASSWORD", "Tulip-Orbit-93");
        c
    };
    succeeds(
        "alice",
        &mut as_alice(&["register", "svc/x", "--hold-secs", "0"]),
    )
    .await;
    let out = within(
        "alice denied",
        as_alice(&["register", "db/x", "--hold-secs", "0"]).output(),
    )
    .await
    .unwrap();
    assert!(String::from_utf8_lossy(&out.stderr).contains("permission_denied"));
    let out = within(
        "wrong pw",
        ctl(&a, &["--user", "alice", "query", "svc/x"])
            .env("PORTSWITCH_PASSWORD", "nope")
            .output(),
    )
    .await
    .unwrap();
    assert!(String::from_utf8_lossy(&out.stderr).contains("auth_failed"));
    assert!(std::fs::read_to_string(&audit)
        .unwrap()
        .contains("\"event\":\"admin\""));
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test]
async fn tls_with_scram_channel_binding_client_certificates_and_openssl() {
    use tokio::io::AsyncWriteExt;
    let dir = std::env::temp_dir().join(format!("portswitch-tls-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let certs = dir.join("certs");
    succeeds(
        "cert",
        Command::new(BIN).args([
            "cert",
            "--out",
            certs.to_str().unwrap(),
            "--client",
            "alice",
        ]),
    )
    .await;
    let p = |f: &str| certs.join(f).to_str().unwrap().to_string();
    let data = dir.join("data");
    let srv = serve(
        &[
            "--tls-cert",
            &p("server.pem"),
            "--tls-key",
            &p("server-key.pem"),
            "--tls-client-ca",
            &p("ca.pem"),
            "--data-dir",
            data.to_str().unwrap(),
            "--scram-iterations",
            "4096",
        ],
        &[],
    )
    .await;
    let port = srv.addr.rsplit_once(':').unwrap().1.to_string();
    let a = format!("localhost:{port}");

    // A real TLS client other than ours verifies the server's certificate.
    let mut s_client = Command::new("openssl")
        .args([
            "s_client",
            "-connect",
            &format!("127.0.0.1:{port}"),
            "-CAfile",
            &p("ca.pem"),
            "-servername",
            "localhost",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("openssl is installed");
    drop(s_client.stdin.take());
    let out = within("openssl", s_client.wait_with_output())
        .await
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("Verify return code: 0 (ok)"), "{text}");

    // A plaintext client gets nowhere.
    let (code, _) = ctl_out(&srv.addr, &["query", "x"]).await;
    assert_eq!(code, 1);

    // Bootstrap root over TLS, then alice (who also has a client certificate).
    let tls = |args: &[&str]| {
        let mut c = ctl(&a, &["--ca", &p("ca.pem")]);
        c.args(args);
        c
    };
    let mut add = tls(&["user", "add", "root", "--role", "root"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    add.stdin
        .take()
        .unwrap()
        .write_all(b"Granite-Falcon-2026!\n")
        .await
        .unwrap();
    assert!(within("root", add.wait()).await.unwrap().success());
    succeeds(
        "alice",
        tls(&["--user", "root", "user", "add", "alice", "--role", "root"])
            .env("PORTSWITCH_PASSWORD", "Granite-Falcon-2026!")
            .env("PORTSWITCH_NEW_PASSWORD", "Tulip-Orbit-93"),
    )
    .await;
    // SCRAM over TLS (bound to the channel with tls-exporter).
    succeeds(
        "scram",
        tls(&["--user", "alice", "register", "svc/tls", "--hold-secs", "0"])
            .env("PORTSWITCH_PASSWORD", "Tulip-Orbit-93"),
    )
    .await;
    // A client certificate logs in as alice with no password.
    succeeds(
        "mtls",
        &mut tls(&[
            "--cert",
            &p("client-alice.pem"),
            "--key",
            &p("client-alice-key.pem"),
            "query",
            "svc/tls",
        ]),
    )
    .await;
    // Without certificate or password: authentication required.
    let out = within("anon", tls(&["query", "svc/tls"]).output())
        .await
        .unwrap();
    assert!(String::from_utf8_lossy(&out.stderr).contains("auth_required"));
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test]
async fn a_server_beyond_loopback_requires_tls_and_authentication() {
    // Refused before binding anything (the address is never used).
    let out = within(
        "serve",
        Command::new(BIN)
            .args(["serve", "--listen", "10.255.255.1:7400", "--no-http"])
            .output(),
    )
    .await
    .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("refusing to listen") && err.contains("--danger-allow-insecure-network"),
        "{err}"
    );
    // The metrics and health endpoint follows the same rule.
    let out = within(
        "serve",
        Command::new(BIN)
            .args([
                "serve",
                "--listen",
                "127.0.0.1:0",
                "--http-listen",
                "10.255.255.1:7401",
            ])
            .output(),
    )
    .await
    .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("refusing to serve metrics")
            && err.contains("--danger-allow-insecure-network"),
        "{err}"
    );
}

async fn bench_json(workload: &str, addr: &str, args: &[&str]) -> (i32, serde_json::Value) {
    let out = within(
        "bench",
        Command::new(BIN)
            .args(["bench", workload, "--addr", addr, "--json"])
            .args(args)
            .kill_on_drop(true)
            .output(),
    )
    .await
    .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let json = serde_json::from_str(text.trim())
        .unwrap_or_else(|e| panic!("bench printed no JSON ({e}): {text}"));
    (out.status.code().unwrap_or(-1), json)
}

/// The harness's hold-sessions scenario against `addr` with `args` (its command
/// line's flags): whether every check held, and its report.
async fn hold_sessions(addr: &str, args: &[&str]) -> (bool, serde_json::Value) {
    use clap::Parser;
    use portswitch_harness::scenario::hold::{run, HoldArgs};
    #[derive(Parser)]
    struct Flags {
        #[command(flatten)]
        args: HoldArgs,
    }
    let line = ["hold-sessions", "--json", "--addr", addr]
        .into_iter()
        .chain(args.iter().copied());
    let flags = Flags::parse_from(line);
    let outcome = within("hold-sessions", run(&flags.args))
        .await
        .expect("the scenario runs");
    (outcome.ok, outcome.report)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hold_sessions_holds_every_session_and_reports_memory() {
    let s = serve(&[], &[]).await;
    let (ok, r) = hold_sessions(
        &s.addr,
        &[
            "--connections",
            "300",
            "--source-addrs",
            "3",
            "--lease-ms",
            "3000",
            "--duration",
            "2",
        ],
    )
    .await;
    assert!(ok, "{r}");
    assert_eq!(r["sessions_up"], 300, "{r}");
    assert_eq!(r["sessions_lost"], 0, "{r}");
    // Every session counted by the server, heartbeating through the hold.
    assert!(r["server_sessions_held"].as_u64().unwrap() >= 300, "{r}");
    assert!(r["pings"].as_u64().unwrap() >= 300, "{r}");
    assert!(r["probe_registers"].as_u64().unwrap() > 10, "{r}");
    assert!(r["server_bytes_per_session"].as_f64().unwrap() > 0.0, "{r}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hold_sessions_on_channels_holds_many_sessions_per_connection() {
    let s = serve(&[], &[]).await;
    let (ok, r) = hold_sessions(
        &s.addr,
        &[
            "--connections",
            "2500",
            "--channels",
            "1000",
            "--lease-ms",
            "600",
            "--duration",
            "2",
        ],
    )
    .await;
    assert!(ok, "{r}");
    // 2,500 sessions on three connections (1,000, 1,000 and 500 channels).
    assert_eq!(r["connections"], 3, "{r}");
    assert_eq!(r["sessions_up"], 2500, "{r}");
    assert_eq!(r["sessions_lost"], 0, "{r}");
    assert!(r["server_sessions_held"].as_u64().unwrap() >= 2500, "{r}");
    // Leases of 600 ms over a 2 s hold: every session was kept alive on its channel.
    assert!(r["pings"].as_u64().unwrap() >= 2 * 2500, "{r}");
    let stats = portswitch_client::server_stats(
        &portswitch_client::ClientOptions::new(s.addr.clone()),
        &s.addr,
    )
    .await
    .unwrap();
    let expired = stats
        .iter()
        .find(|(n, _)| n == "sessions_expired_total")
        .unwrap()
        .1;
    assert_eq!(expired, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bench_preencoded_frames_are_all_answered_without_errors() {
    let s = serve(&[], &[]).await;
    let (code, r) = bench_json(
        "register-unregister",
        &s.addr,
        &[
            "--preencoded",
            "--connections",
            "4",
            "--pipeline",
            "128",
            "--duration",
            "1",
        ],
    )
    .await;
    assert_eq!(code, 0, "{r}");
    assert_eq!(r["errors"], 0, "{r}");
    // Whole frames of 64 REGISTER + UNREGISTER pairs only.
    let ops = r["ops"].as_u64().unwrap();
    assert!(ops > 0 && ops % 128 == 0, "{r}");
}

/// The form before one subcommand per workload, `bench --workload NAME`, still runs,
/// with a one-line deprecation note on stderr and the same JSON on stdout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bench_old_workload_flag_still_runs_with_a_note() {
    let s = serve(&[], &[]).await;
    let out = within(
        "bench",
        Command::new(BIN)
            .args(["bench", "--addr", &s.addr, "--json", "--workload"])
            .args([
                "register-unregister",
                "--connections",
                "2",
                "--duration",
                "0.3",
            ])
            .kill_on_drop(true)
            .output(),
    )
    .await
    .unwrap();
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let r: serde_json::Value =
        serde_json::from_str(String::from_utf8_lossy(&out.stdout).trim()).unwrap();
    assert_eq!(r["workload"], "RegisterUnregister", "{r}");
    assert_eq!(r["connections"], 2, "{r}");
    assert_eq!(r["errors"], 0, "{r}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.contains("deprecated") && err.contains("`portswitch bench register-unregister`"),
        "{err}"
    );
}

/// Waits until every thread of process `pid` is stopped. SIGSTOP stops a process's
/// threads only once one of them has run to take the signal: on a busy machine the
/// others may go on serving for a while after `kill` returned.
async fn stopped(pid: &str) {
    let all_stopped = || {
        let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
            return false;
        };
        tasks.flatten().all(|t| {
            std::fs::read_to_string(t.path().join("stat")).is_ok_and(|s| {
                // The state follows the command name, which is in parentheses.
                s.rsplit_once(") ")
                    .is_some_and(|(_, rest)| rest.starts_with('T') || rest.starts_with('t'))
            })
        })
    };
    within("the server's threads stop", async {
        while !all_stopped() {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await;
}

/// Runs a command to completion (within the usual time limit) and asserts that it
/// succeeded, showing its stderr if not.
async fn succeeds(what: &str, cmd: &mut Command) {
    let out = within(what, cmd.output()).await.unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test]
async fn mux_sessions_leave_a_stopped_server_and_resume_when_it_answers_again() {
    let srv = serve(&[], &[]).await;
    let pid = srv.child.id().unwrap().to_string();
    let mut o = ClientOptions::new(srv.addr.clone());
    o.lease = Duration::from_secs(30);
    o.answer_timeout = Some(Duration::from_millis(500));
    let mux = portswitch_client::Mux::connect(o).await.unwrap();
    let s = mux.session().await.unwrap();
    let token = match s.register("held", "").await.unwrap() {
        portswitch_client::RegisterOutcome::Owned { token } => token,
        other => panic!("{other:?}"),
    };
    let mut events = s.events();
    let kill = |sig: &str| {
        assert!(std::process::Command::new("kill")
            .args([sig, &pid])
            .status()
            .unwrap()
            .success());
    };
    kill("-STOP");
    stopped(&pid).await;
    // Asked of a stopped server: answered with an error once the answer timeout
    // passes, long before the 30 s lease, rather than never.
    let e = within("a request to a stopped server", s.query("held"))
        .await
        .unwrap_err();
    assert!(
        matches!(e, portswitch_client::Error::ConnectionLost),
        "{e:?}"
    );
    kill("-CONT");
    // The mux connects again and resumes the session: it still owns its port.
    let back = within("the session is resumed", async {
        loop {
            if let Ok(Some(o)) = s.query("held").await {
                return o;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    assert_eq!((back.session, back.token), (s.info().id, token));
    assert!(s.is_alive());
    assert!(s.owns("held", token));
    assert!(mux.is_connected());
    let mut seen = Vec::new();
    while let Ok(e) = events.try_recv() {
        seen.push(e);
    }
    assert!(
        seen.contains(&Event::Disconnected) && seen.contains(&Event::Reconnected),
        "{seen:?}"
    );
    assert!(
        !seen
            .iter()
            .any(|e| matches!(e, Event::OwnershipLost { .. })),
        "{seen:?}"
    );
}

/// Ctrl-C (or SIGTERM) on a CLI that waits in a queue ends its session: it leaves
/// the queue at once, so the port is never granted to a process that is gone.
#[tokio::test]
async fn interrupted_cli_waiters_leave_their_queues() {
    let srv = serve(&[], &[]).await;
    let w = watcher(&srv.addr).await;
    assert!(matches!(
        w.register("q", "").await.unwrap(),
        portswitch_client::RegisterOutcome::Owned { .. }
    ));
    let quiet = |args: &[&str]| {
        let mut c = ctl(&srv.addr, args);
        c.stdout(Stdio::null()).stderr(Stdio::null());
        c.spawn().unwrap()
    };
    let mut waiting = [
        quiet(&["register", "q", "--wait"]),
        quiet(&["lock", "q"]),
        quiet(&["elect", "q", "--", "true"]),
    ];
    let stat = |name: &'static str| {
        let w = w.clone();
        async move {
            let s = w.stats().await.unwrap();
            s.iter().find(|(k, _)| k == name).unwrap().1
        }
    };
    common::eventually_async("three waiters", || async { stat("waiters").await == 3 }).await;
    for (i, c) in waiting.iter_mut().enumerate() {
        let pid = c.id().unwrap().to_string();
        let sig = if i == 1 { "-TERM" } else { "-INT" };
        assert!(std::process::Command::new("kill")
            .args([sig, &pid])
            .status()
            .unwrap()
            .success());
        let status = within("the waiter exits", c.wait()).await.unwrap();
        assert_eq!(status.code(), Some(130), "waiter {i}");
    }
    assert_eq!(stat("waiters").await, 0);
    assert_eq!(
        stat("sessions").await,
        1,
        "only the holder's session is left"
    );
    w.unregister("q").await.unwrap();
    assert_eq!(w.query("q").await.unwrap(), None, "granted to nobody");
}

/// A lock lost while its command runs stops the command's whole process group:
/// SIGTERM, then SIGKILL after the grace period. What the command started in the
/// background stops too.
#[tokio::test]
async fn a_lost_lock_stops_the_commands_whole_process_group() {
    let srv = serve(&[], &[]).await;
    let pid = srv.child.id().unwrap().to_string();
    let dir = std::env::temp_dir().join(format!("portswitch-pgroup-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let pidfile = dir.join("grandchild.pid");
    let _ = std::fs::remove_file(&pidfile);
    // The background sleep ignores SIGTERM: only the SIGKILL that follows stops it.
    let script = format!(
        "(trap '' TERM; exec sleep 300) & echo $! > {}; wait",
        pidfile.display()
    );
    let mut lock = ctl(
        &srv.addr,
        &[
            "--lease-ms",
            "1000",
            "lock",
            "g",
            "--kill-after-ms",
            "300",
            "--",
            "sh",
            "-c",
            &script,
        ],
    )
    .stdout(Stdio::null())
    .stderr(Stdio::null())
    .spawn()
    .unwrap();
    let grandchild = within("the command starts", async {
        loop {
            if let Ok(s) = std::fs::read_to_string(&pidfile) {
                if let Ok(p) = s.trim().parse::<u32>() {
                    return p;
                }
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    let alive = |p: u32| {
        std::fs::read_to_string(format!("/proc/{p}/stat")).is_ok_and(|s| {
            // A zombie (state Z) has stopped running; it waits only to be reaped.
            !s.rsplit_once(") ")
                .is_some_and(|(_, rest)| rest.starts_with('Z'))
        })
    };
    assert!(alive(grandchild));
    // A server that stops answering: the lock's lease view runs out.
    let kill = |sig: &str| {
        assert!(std::process::Command::new("kill")
            .args([sig, &pid])
            .status()
            .unwrap()
            .success());
    };
    kill("-STOP");
    let status = within("ctl lock gives up", lock.wait()).await.unwrap();
    kill("-CONT");
    assert_eq!(status.code(), Some(4), "the lock was lost");
    within("the background process stops", async {
        while alive(grandchild) {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn a_default_serve_starts_without_warnings() {
    // Nothing about a default configuration deserves a warning on every start (the
    // descriptor limit sizes connections_max instead, said at info level).
    let mut child = Command::new(BIN)
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--http-listen",
            "127.0.0.1:0",
        ])
        .env("NO_COLOR", "1")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    within("server start", lines.next_line())
        .await
        .unwrap()
        .unwrap();
    let pid = child.id().unwrap().to_string();
    std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap();
    let out = within("stop", child.wait_with_output()).await.unwrap();
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(log.contains("portswitch serving"), "{log}");
    assert!(!log.contains("WARN"), "{log}");
}
