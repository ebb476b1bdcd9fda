//! Helpers for tests against a real server on loopback.
#![allow(dead_code)]

pub mod group;

use std::time::Duration;

use portswitch_client::{Client, ClientOptions};
use portswitch_server::{RunningServer, ServerConfig};

pub async fn server() -> RunningServer {
    server_with(ServerConfig::ephemeral()).await
}

pub async fn server_with(cfg: ServerConfig) -> RunningServer {
    RunningServer::start(cfg).await.expect("server starts")
}

pub fn opts(srv: &RunningServer) -> ClientOptions {
    let mut o = ClientOptions::new(srv.addr.to_string());
    o.node_name = "test".into();
    o
}

pub async fn client(srv: &RunningServer) -> Client {
    Client::connect(opts(srv)).await.expect("client connects")
}

/// Waits up to 10 s for `f` to hold (a bound on a hang, not a timing assertion).
pub async fn eventually<F: Fn() -> bool>(what: &str, f: F) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !f() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Polls the async condition `f` until it holds, bounded by 10 s (a bound on a hang,
/// not a timing assertion).
pub async fn eventually_async<F, Fut>(what: &str, f: F)
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    within(what, async {
        while !f().await {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
}

/// Runs `fut` with a 10 s bound, so a bug shows up as a failure rather than a hang.
pub async fn within<T>(what: &str, fut: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(10), fut)
        .await
        .unwrap_or_else(|_| panic!("timed out: {what}"))
}

#[allow(unused_imports)]
pub use portswitch_harness::raw::{hello, Msg, Raw};

/// Waits for a client's reclaim to finish after a failover or a restart; panics on
/// any loss of ownership.
pub async fn resynced(events: &mut tokio::sync::broadcast::Receiver<portswitch_client::Event>) {
    use portswitch_client::Event;
    loop {
        match within("failover", events.recv()).await.unwrap() {
            Event::Resync => return,
            Event::OwnershipLost { reason, .. } => panic!("ownership lost: {reason}"),
            Event::PortLost { port, reason, .. } => panic!("lost {port:?}: {reason}"),
            _ => {}
        }
    }
}

/// Starts `portswitch serve ARGS` (with `env`) and waits for the address it prints.
/// The process is killed when the returned child is dropped.
pub async fn serve_process(args: &[&str], env: &[(&str, &str)]) -> (tokio::process::Child, String) {
    use tokio::io::AsyncBufReadExt;
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_portswitch"));
    cmd.arg("serve")
        .args(args)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().expect("spawn serve");
    let mut lines = tokio::io::BufReader::new(child.stdout.take().unwrap()).lines();
    let line = within("server start", lines.next_line())
        .await
        .unwrap()
        .expect("server printed its address");
    let addr = line
        .strip_prefix("listening on ")
        .expect("listening line")
        .to_string();
    (child, addr)
}
