//! Authentication, access control, lockout and audit through real sockets.

mod common;

use std::path::PathBuf;

use base64::Engine;
use common::*;
use portswitch_client::{Client, ErrorCode, RegisterOutcome};
use portswitch_proto::Request;
use portswitch_server::auth::AuthConfig;
use portswitch_server::{RunningServer, ServerConfig};
use serde_json::json;

const ROOT_PW: &str = "Granite-Falcon-2026!";
const ALICE_PW: &str = "Tulip-Orbit-93";

fn tempdir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!(
        "portswitch-sec-{tag}-{}-{}",
        std::process::id(),
        fastrand::u64(..)
    ));
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn secure_config(dir: &std::path::Path) -> ServerConfig {
    let mut cfg = ServerConfig::ephemeral();
    cfg.auth = AuthConfig {
        data_dir: Some(dir.to_path_buf()),
        audit_log: Some(dir.join("audit.log")),
        // Tests log in many times; the minimum keeps debug builds quick.
        iterations: portswitch_auth::scram::ITERATIONS_MIN,
        ..AuthConfig::default()
    };
    cfg
}

async fn login(
    srv: &RunningServer,
    user: &str,
    pw: &str,
) -> Result<Client, portswitch_client::Error> {
    let mut o = opts(srv);
    o.credentials = Some((user.into(), pw.into()));
    Client::connect(o).await
}

/// Bootstraps root from loopback, then adds a role and a user with it.
async fn bootstrap(srv: &RunningServer) -> Client {
    let anon = client(srv).await;
    anon.admin(
        &json!({"op": "user_add", "user": "root", "password": ROOT_PW, "roles": ["root"]})
            .to_string(),
    )
    .await
    .unwrap();
    drop(anon);
    let root = login(srv, "root", ROOT_PW).await.unwrap();
    root.admin(
        &json!({"op": "role_add", "role": "svc-writer", "grants": [
            {"prefix": "svc/", "perms": "register,query,watch,list"},
        ]})
        .to_string(),
    )
    .await
    .unwrap();
    root.admin(
        &json!({"op": "user_add", "user": "alice", "password": ALICE_PW, "roles": ["svc-writer"]})
            .to_string(),
    )
    .await
    .unwrap();
    root
}

#[tokio::test]
async fn logins_access_control_and_persistence() {
    let dir = tempdir("main");
    let srv = server_with(secure_config(&dir)).await;
    let root = bootstrap(&srv).await;

    // Without credentials: refused.
    let e = Client::connect(opts(&srv)).await.unwrap_err();
    assert_eq!(e.code(), Some(ErrorCode::AuthRequired));
    // Wrong password and unknown user: the same answer.
    let wrong = login(&srv, "alice", "Not-Her-Password-1")
        .await
        .unwrap_err();
    let unknown = login(&srv, "nobody", "Not-Her-Password-1")
        .await
        .unwrap_err();
    assert_eq!(wrong.code(), Some(ErrorCode::AuthFailed));
    assert_eq!(wrong.to_string(), unknown.to_string());

    // alice may register under svc/ only; a denied command fails alone in a batch.
    let alice = login(&srv, "alice", ALICE_PW).await.unwrap();
    let (a, b, c) = tokio::join!(
        alice.register("svc/a", "x"),
        alice.register("db/primary", "x"),
        alice.query("svc/a")
    );
    assert!(matches!(a.unwrap(), RegisterOutcome::Owned { .. }));
    assert_eq!(b.unwrap_err().code(), Some(ErrorCode::PermissionDenied));
    assert!(c.unwrap().is_some());
    assert_eq!(
        alice.send("svc/a", "x").await.unwrap_err().code(),
        Some(ErrorCode::PermissionDenied)
    );
    assert_eq!(
        alice.broadcast(None, "x").await.unwrap_err().code(),
        Some(ErrorCode::PermissionDenied)
    );
    let e = alice
        .admin(&json!({"op": "user_list"}).to_string())
        .await
        .unwrap_err();
    assert_eq!(e.code(), Some(ErrorCode::PermissionDenied));
    // root may do anything.
    assert!(matches!(
        root.register("db/primary", "").await.unwrap(),
        RegisterOutcome::Owned { .. }
    ));
    let users: serde_json::Value =
        serde_json::from_str(&root.admin(r#"{"op":"user_list"}"#).await.unwrap()).unwrap();
    assert_eq!(users.as_array().unwrap().len(), 2);
    // The password policy names the rule that failed.
    let e = root
        .admin(&json!({"op": "user_add", "user": "bob", "password": "short"}).to_string())
        .await
        .unwrap_err();
    assert!(e.to_string().contains("shorter than 12"), "{e}");

    // Users survive a restart.
    drop((root, alice));
    srv.stop().await.unwrap();
    let srv = server_with(secure_config(&dir)).await;
    assert!(login(&srv, "alice", ALICE_PW).await.is_ok());
    assert_eq!(
        login(&srv, "alice", "wrong-Password-9")
            .await
            .unwrap_err()
            .code(),
        Some(ErrorCode::AuthFailed)
    );
    srv.stop().await.unwrap();

    // The audit log saw logins, failures, denials and admin changes.
    let log = std::fs::read_to_string(dir.join("audit.log")).unwrap();
    let events: Vec<serde_json::Value> = log
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    for kind in ["login", "login_failed", "denied", "admin"] {
        assert!(
            events.iter().any(|e| e["event"] == kind),
            "no {kind} in audit log:\n{log}"
        );
    }
    assert!(events
        .iter()
        .any(|e| e["event"] == "denied" && e["name"] == "db/primary" && e["user"] == "alice"));
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test]
async fn the_first_user_needs_root_and_a_data_dir() {
    let srv = server().await; // no data dir
    let anon = client(&srv).await;
    let cmd = json!({"op": "user_add", "user": "root", "password": ROOT_PW, "roles": ["root"]})
        .to_string();
    assert!(anon
        .admin(&cmd)
        .await
        .unwrap_err()
        .to_string()
        .contains("--data-dir"));
    let dir = tempdir("boot");
    let srv2 = server_with(secure_config(&dir)).await;
    let anon = client(&srv2).await;
    let cmd =
        json!({"op": "user_add", "user": "ops", "password": ROOT_PW, "roles": []}).to_string();
    assert!(anon
        .admin(&cmd)
        .await
        .unwrap_err()
        .to_string()
        .contains("root role"));
    let _ = std::fs::remove_dir_all(dir);
}

/// One login attempt with a random proof on a raw connection; `true` if the server
/// got as far as a challenge (not locked out).
async fn guess(raw: &mut Raw, user: &str) -> (bool, Msg) {
    let first = format!("SCRAM-SHA-256 n,,n={user},r=attacker{}", fastrand::u32(..));
    let mut h = hello(10_000, false);
    h.credentials = first.as_bytes();
    raw.send(&[Request::Hello(h)]).await;
    let reply = within("challenge", raw.next()).await.unwrap();
    let Msg::Reply(_, text) = &reply else {
        return (false, reply);
    };
    // AuthContinue { data: [...] }: recover the combined nonce from the challenge.
    let challenge = challenge_text(text);
    let nonce = challenge
        .split(',')
        .next()
        .unwrap()
        .trim_start_matches("r=");
    let proof =
        base64::engine::general_purpose::STANDARD.encode(fastrand::u64(..).to_be_bytes().repeat(4));
    let client_final = format!("c=biws,r={nonce},p={proof}");
    raw.send(&[Request::Auth {
        data: client_final.as_bytes(),
    }])
    .await;
    (true, within("verdict", raw.next()).await.unwrap())
}

fn challenge_text(debug: &str) -> String {
    // The Raw helper renders replies with Debug; pull the byte list back out.
    let inner = debug.split('[').nth(1).unwrap().split(']').next().unwrap();
    inner
        .split(", ")
        .map(|b| b.trim().parse::<u8>().unwrap() as char)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lockout_and_a_brute_force_that_gets_nowhere() {
    let dir = tempdir("lock");
    let mut cfg = secure_config(&dir);
    cfg.auth.lockout.user_failures_max = 3;
    cfg.auth.lockout.addr_failures_max = 50;
    cfg.auth.lockout.lock_ms = 600;
    cfg.auth.audit_log_bytes_max = 4_096;
    let srv = server_with(cfg).await;
    let root = bootstrap(&srv).await;

    // Three failures lock alice; the right password is then refused alike.
    for _ in 0..3 {
        assert_eq!(
            login(&srv, "alice", "Wrong-Password-42")
                .await
                .unwrap_err()
                .code(),
            Some(ErrorCode::AuthFailed)
        );
    }
    assert_eq!(
        login(&srv, "alice", ALICE_PW).await.unwrap_err().code(),
        Some(ErrorCode::AuthFailed)
    );
    let log = std::fs::read_to_string(dir.join("audit.log")).unwrap();
    assert!(
        log.contains("\"lockout\"") && log.contains("login_refused_locked"),
        "{log}"
    );
    // After the lock runs out she gets in (bounded wait, not a timing assertion).
    eventually_async("alice can log in again", || async {
        login(&srv, "alice", ALICE_PW).await.is_ok()
    })
    .await;

    // 10,000 guesses from one address while root keeps working.
    let worker = {
        let root = root.clone();
        tokio::spawn(async move {
            let mut n = 0u64;
            loop {
                let name = format!("svc/work/{}", n % 16);
                root.register(&name, "").await.unwrap();
                root.unregister(&name).await.unwrap();
                n += 1;
                if n.is_multiple_of(64) {
                    tokio::task::yield_now().await;
                }
                if root.query("stop").await.unwrap().is_some() {
                    return n;
                }
            }
        })
    };
    let mut raw = Raw::connect(&srv).await;
    let mut challenged = 0;
    for i in 0..10_000 {
        let (got_challenge, verdict) =
            guess(&mut raw, if i % 2 == 0 { "alice" } else { "ghost" }).await;
        challenged += got_challenge as u32;
        assert!(
            matches!(verdict, Msg::Error(_, ErrorCode::AuthFailed)),
            "attempt {i}: {verdict:?}"
        );
    }
    // The address lock stopped the guessing long before 10,000 proofs were checked.
    assert!(challenged <= 60, "{challenged} attempts got a challenge");
    root.register("stop", "").await.unwrap();
    let work = within("worker", worker).await.unwrap();
    assert!(work > 0, "the legitimate session made progress");
    // 10,000 refusals rotated the audit log by size, keeping a bounded number of files.
    assert!(dir.join("audit.log.5").exists());
    assert!(!dir.join("audit.log.6").exists());
    for name in ["audit.log", "audit.log.1", "audit.log.5"] {
        assert!(std::fs::metadata(dir.join(name)).unwrap().len() <= 4_096);
    }
    srv.stop().await.unwrap();
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test]
async fn a_replayed_exchange_is_refused() {
    use portswitch_auth::scram::{Channel, ClientExchange};
    let dir = tempdir("replay");
    let srv = server_with(secure_config(&dir)).await;
    let _root = bootstrap(&srv).await;
    // A legitimate login on a raw connection, recorded.
    let (client, first) = ClientExchange::start("alice", ALICE_PW, "recordednonce", Channel::Plain);
    let creds = format!("SCRAM-SHA-256 {first}");
    let mut h = hello(10_000, false);
    h.credentials = creds.as_bytes();
    let mut raw = Raw::connect(&srv).await;
    raw.send(&[Request::Hello(h)]).await;
    let Some(Msg::Reply(_, challenge)) = raw.next().await else {
        panic!()
    };
    let (_, client_final) = client
        .respond(&challenge_text(&challenge), Channel::Plain)
        .unwrap();
    raw.send(&[Request::Auth {
        data: client_final.as_bytes(),
    }])
    .await;
    assert!(matches!(raw.next().await, Some(Msg::Reply(_, r)) if r.starts_with("HelloOk")));
    // The attacker replays both messages on a new connection.
    let mut replay = Raw::connect(&srv).await;
    replay.send(&[Request::Hello(h)]).await;
    assert!(
        matches!(replay.next().await, Some(Msg::Reply(..))),
        "a fresh challenge"
    );
    replay
        .send(&[Request::Auth {
            data: client_final.as_bytes(),
        }])
        .await;
    assert_eq!(
        replay.next().await,
        Some(Msg::Error(2, ErrorCode::AuthFailed))
    );
    srv.stop().await.unwrap();
    let _ = std::fs::remove_dir_all(dir);
}

/// `ctl --data-dir` changes the user store of a stopped server, which then admits
/// that user (and nobody anonymous); it refuses a directory a running server holds.
#[tokio::test]
async fn users_made_offline_log_in_and_a_running_server_is_not_touched() {
    let dir = tempdir("offline");
    let ctl = |args: &[&str]| {
        std::process::Command::new(env!("CARGO_BIN_EXE_portswitch"))
            .arg("ctl")
            .arg("--data-dir")
            .arg(&dir)
            .args(args)
            .env("PORTSWITCH_NEW_PASSWORD", ROOT_PW)
            .output()
            .unwrap()
    };
    let out = ctl(&["user", "add", "ops", "--role", "root"]);
    assert!(out.status.success(), "{out:?}");
    let out = ctl(&["user", "add", "ops"]);
    assert!(!out.status.success(), "a second ops was added: {out:?}");
    let out = ctl(&["--json", "user", "list"]);
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("\"ops\""),
        "{out:?}"
    );
    // Only user and role commands work on a directory.
    let out = ctl(&["status"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("user and role commands only"));

    let srv = server_with(secure_config(&dir)).await;
    let ops = login(&srv, "ops", ROOT_PW).await.unwrap();
    assert!(matches!(
        ops.register("a", "").await.unwrap(),
        RegisterOutcome::Owned { .. }
    ));
    assert!(login(&srv, "ops", ALICE_PW).await.is_err());
    assert!(
        Client::connect(opts(&srv)).await.is_err(),
        "anonymous admitted"
    );
    // The running server holds the directory's lock: no change behind its back.
    let out = ctl(&["user", "del", "ops"]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("another server is using"),
        "{out:?}"
    );
    drop(ops);
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test]
async fn sessions_on_channels_log_in_each_and_are_held_to_their_grants() {
    let dir = tempdir("mux");
    let srv = server_with(secure_config(&dir)).await;
    let _root = bootstrap(&srv).await;
    let mut o = opts(&srv);
    o.credentials = Some(("alice".into(), ALICE_PW.into()));
    let mux = portswitch_client::Mux::connect(o.clone()).await.unwrap();
    let (a, b) = (mux.session().await.unwrap(), mux.session().await.unwrap());
    assert_ne!(a.info().id, b.info().id);
    assert!(matches!(
        a.register("svc/mux", "x").await.unwrap(),
        RegisterOutcome::Owned { .. }
    ));
    assert_eq!(
        b.register("db/mux", "x").await.unwrap_err().code(),
        Some(ErrorCode::PermissionDenied)
    );
    // A wrong password fails that channel's login alone; the others carry on.
    o.credentials = Some(("alice".into(), "Not-Her-Password-1".into()));
    let wrong = portswitch_client::Mux::connect(o).await.unwrap();
    let e = wrong.session().await.expect_err("refused");
    assert_eq!(e.code(), Some(ErrorCode::AuthFailed));
    // Without credentials on a server with users: refused.
    let anon = portswitch_client::Mux::connect(opts(&srv)).await.unwrap();
    let e = anon.session().await.expect_err("refused");
    assert_eq!(e.code(), Some(ErrorCode::AuthRequired));
    assert!(b.query("svc/mux").await.unwrap().is_some());
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn deleting_a_user_ends_its_sessions_and_frees_its_ports() {
    let dir = tempdir("deluser");
    let srv = server_with(secure_config(&dir)).await;
    let root = bootstrap(&srv).await;
    let alice = login(&srv, "alice", ALICE_PW).await.unwrap();
    assert!(matches!(
        alice.register("svc/a", "x").await.unwrap(),
        RegisterOutcome::Owned { .. }
    ));
    root.admin(&json!({"op": "user_del", "user": "alice"}).to_string())
        .await
        .unwrap();
    eventually_async("alice's session ended", || async { !alice.is_alive() }).await;
    assert!(root.query("svc/a").await.unwrap().is_none());
    let _ = std::fs::remove_dir_all(dir);
}
