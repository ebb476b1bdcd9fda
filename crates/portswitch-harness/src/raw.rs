//! The protocol spoken by hand over a socket, the way a client in another language
//! would: [`Raw`] for tests that send exactly the bytes they mean (malformed frames,
//! requests before HELLO, one frame of many requests) and read every message back;
//! and the helpers that hold very many sessions at once without the client library's
//! per-session cost (connections from many loopback source addresses, replies counted
//! without decoding).
//!
//! [`Raw`] is a test tool: it panics, with a message, on anything a test did not
//! expect (a connection refused, a reply that does not decode, 10 s without one).

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

use bytes::BytesMut;
use portswitch_proto::frame::{frame_len, messages};
use portswitch_proto::limits::{COMMANDS_PER_FRAME_MAX, FRAME_BYTES_MAX};
use portswitch_proto::msg::op;
use portswitch_proto::{ErrorCode, Event, FrameBuf, Hello, Reply, Request, ServerMsg};
use portswitch_server::RunningServer;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

/// Runs `fut` with a 10 s bound, so a bug shows up as a failure rather than a hang.
async fn within<T>(what: &str, fut: impl std::future::Future<Output = T>) -> T {
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

/// `r` once (no channels), or once on each of channels 1..=k, in as few frames as
/// the limits allow.
pub fn encode_on(channels: Option<usize>, r: &Request<'_>) -> Vec<u8> {
    let mut out = FrameBuf::new(FRAME_BYTES_MAX, COMMANDS_PER_FRAME_MAX);
    match channels {
        None => out.push_request(1, r),
        Some(k) => {
            for ch in 1..=k {
                out.push_channel(ch as u16);
                out.push_request(ch as u32, r);
            }
        }
    }
    let mut b = BytesMut::new();
    out.take_into(&mut b);
    b.to_vec()
}

/// 127.0.0.1 + k (k < 2^24 - 2).
pub fn source_addr(k: usize) -> Result<IpAddr, String> {
    if k >= (1 << 24) - 2 {
        return Err("too many source addresses".into());
    }
    Ok(IpAddr::V4(Ipv4Addr::from(
        u32::from(Ipv4Addr::new(127, 0, 0, 1)) + k as u32,
    )))
}

/// Connects from `source` to `server`, sends `hello` (one HELLO, or one per channel)
/// and waits for `k` HELLO_OK replies.
pub async fn open_session(
    server: SocketAddr,
    source: IpAddr,
    hello: &[u8],
    k: usize,
) -> std::io::Result<TcpStream> {
    let sock = TcpSocket::new_v4()?;
    sock.bind(SocketAddr::new(source, 0))?;
    let mut s = sock.connect(server).await?;
    s.set_nodelay(true)?;
    s.write_all(hello).await?;
    read_replies(&mut s, k, op::HELLO_OK).await?;
    Ok(s)
}

/// Reads until `want` replies came (CHANNEL switches aside), each with opcode
/// `expect`: the answers to the HELLOs or PINGs of every session on the connection.
pub async fn read_replies(s: &mut TcpStream, want: usize, expect: u8) -> std::io::Result<()> {
    let mut buf = BytesMut::with_capacity(if want == 1 { 1024 } else { 64 << 10 });
    let mut got = 0;
    while got < want {
        while let Some(len) = frame_len(&buf, FRAME_BYTES_MAX)
            .map_err(|_| std::io::Error::from(std::io::ErrorKind::InvalidData))?
        {
            let frame = buf.split_to(len);
            for m in messages(&frame[4..], usize::MAX) {
                let m = m.map_err(|_| std::io::Error::from(std::io::ErrorKind::InvalidData))?;
                if m.opcode == op::CHANNEL {
                    continue;
                }
                if m.opcode != expect {
                    // An ERROR (a refused HELLO) or a GOAWAY: this connection failed.
                    return Err(std::io::ErrorKind::InvalidData.into());
                }
                got += 1;
            }
        }
        if got >= want {
            break;
        }
        if s.read_buf(&mut buf).await? == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
    }
    Ok(())
}
