//! Helpers for tests against a real server on loopback.
#![allow(dead_code)]

pub mod group;

use std::time::Duration;

use bytes::BytesMut;
use portswitch_client::{Client, ClientOptions};
use portswitch_proto::frame::{frame_len, messages};
use portswitch_proto::limits::FRAME_BYTES_MAX;
use portswitch_proto::{ErrorCode, Event, FrameBuf, Hello, Reply, Request, ServerMsg};
use portswitch_server::{RunningServer, ServerConfig};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

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

/// An owned server message, for assertions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Msg {
    Reply(u32, String),
    Error(u32, ErrorCode),
    GoAway(ErrorCode),
    Event(String),
}

/// A raw protocol connection: what a client in another language would do.
pub struct Raw {
    pub stream: TcpStream,
    buf: BytesMut,
    next_id: u32,
}

pub fn hello(lease_ms: u32, end_on_disconnect: bool) -> Hello<'static> {
    Hello {
        version_min: 1,
        version_max: 1,
        features: 0,
        lease_ms,
        end_on_disconnect,
        node_name: b"raw",
        credentials: b"",
        resume_session: 0,
        resume_secret: 0,
    }
}

impl Raw {
    pub async fn connect(srv: &RunningServer) -> Raw {
        Raw::connect_addr(srv.addr).await
    }

    pub async fn connect_addr(addr: std::net::SocketAddr) -> Raw {
        let stream = TcpStream::connect(addr).await.expect("connect");
        stream.set_nodelay(true).unwrap();
        Raw {
            stream,
            buf: BytesMut::new(),
            next_id: 0,
        }
    }

    /// Connects and opens a session.
    pub async fn session(srv: &RunningServer, lease_ms: u32, end_on_disconnect: bool) -> Raw {
        let mut r = Raw::connect(srv).await;
        let replies = r
            .call(&[Request::Hello(hello(lease_ms, end_on_disconnect))])
            .await;
        assert!(replies[0].1.starts_with("HelloOk"), "{replies:?}");
        r
    }

    pub async fn send_bytes(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).await.expect("write");
    }

    /// Sends requests in one frame; returns their ids.
    pub async fn send(&mut self, reqs: &[Request<'_>]) -> Vec<u32> {
        let mut fb = FrameBuf::new(FRAME_BYTES_MAX, usize::MAX);
        let mut ids = Vec::new();
        for r in reqs {
            self.next_id += 1;
            fb.push_request(self.next_id, r);
            ids.push(self.next_id);
        }
        let mut b = BytesMut::new();
        fb.take_into(&mut b);
        self.send_bytes(&b).await;
        ids
    }

    /// Next message, or `None` at EOF.
    pub async fn next(&mut self) -> Option<Msg> {
        loop {
            if let Some(n) = frame_len(&self.buf, usize::MAX).expect("server frames are valid") {
                let frame = self.buf.split_to(n);
                let mut it = messages(&frame[4..], usize::MAX);
                let m = it.next().expect("non-empty").expect("valid");
                let rest = frame.len() - 4 - 9 - m.body.len();
                let msg = match ServerMsg::decode(m.opcode, m.id, m.body).expect("decodes") {
                    ServerMsg::Reply {
                        id,
                        reply: Reply::Error { code, .. },
                    } => Msg::Error(id, code),
                    ServerMsg::Reply { id, reply } => Msg::Reply(id, format!("{reply:?}")),
                    ServerMsg::Event(Event::GoAway { code, .. }) => Msg::GoAway(code),
                    ServerMsg::Event(e) => Msg::Event(format!("{e:?}")),
                };
                if rest > 0 {
                    // Put the frame's other messages back as a frame of their own.
                    let mut again = BytesMut::new();
                    again.extend_from_slice(&(rest as u32).to_be_bytes());
                    again.extend_from_slice(&frame[frame.len() - rest..]);
                    again.extend_from_slice(&self.buf);
                    self.buf = again;
                }
                return Some(msg);
            }
            match self.stream.read_buf(&mut self.buf).await {
                Ok(0) | Err(_) => return None,
                Ok(_) => {}
            }
        }
    }

    /// Sends requests in one frame and collects their replies as (id, text).
    pub async fn call(&mut self, reqs: &[Request<'_>]) -> Vec<(u32, String)> {
        let ids = self.send(reqs).await;
        let mut out = Vec::new();
        while out.len() < ids.len() {
            match within("reply", self.next()).await.expect("connection open") {
                Msg::Reply(id, r) => out.push((id, r)),
                Msg::Error(id, c) => out.push((id, format!("Error {}", c.name()))),
                Msg::Event(_) => {}
                Msg::GoAway(c) => panic!("GOAWAY {c}"),
            }
        }
        out
    }

    /// Reads until EOF; returns the last GOAWAY seen, if any.
    pub async fn goaway(&mut self) -> Option<ErrorCode> {
        let mut last = None;
        while let Some(m) = within("EOF", self.next()).await {
            if let Msg::GoAway(c) = m {
                last = Some(c);
            }
        }
        last
    }
}

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
