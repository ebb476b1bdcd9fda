//! Connections: opening a stream (TCP, then TLS), opening or resuming a session on
//! a stream of its own, and finding the group's master among its servers.

use std::time::{Duration, Instant};

use bytes::BytesMut;
use portswitch_proto::frame::{frame_len, messages};
use portswitch_proto::limits::{COMMANDS_PER_FRAME_MAX, FRAME_BYTES_MAX};
use portswitch_proto::{
    ErrorCode, Event as WireEvent, FrameBuf, HelloOk, Reply, Request, ServerMsg,
};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::client::unexpected;
use crate::handshake::{nonce_seed, Handshake, Next};
use crate::session::{owned_answer, Answer};
use crate::types::*;
use crate::{ClientOptions, ClientTls};

/// Any byte stream a session can run over (TCP, or TLS over TCP).
pub(crate) trait Io: AsyncRead + AsyncWrite + Send + Unpin {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin> Io for T {}
pub(crate) type Stream = Box<dyn Io>;

impl ClientTls {
    /// A rustls connector for these settings (for tools that open their own
    /// connections, like the load generator).
    pub fn connector(&self) -> Result<tokio_rustls::TlsConnector> {
        tls_connector(self)
    }
}

fn tls_connector(t: &ClientTls) -> Result<tokio_rustls::TlsConnector> {
    let bad = |what: &str, e: &dyn std::fmt::Display| {
        Error::Io(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("{what}: {e}"),
        ))
    };
    // The files' errors name the file; say which setting it was.
    let file = |what: &'static str| {
        move |e: portswitch_files::FileError| {
            let e = std::io::Error::from(e);
            Error::Io(std::io::Error::new(e.kind(), format!("TLS {what}: {e}")))
        }
    };
    let mut roots = rustls::RootCertStore::empty();
    for c in portswitch_files::load_roots(&t.ca).map_err(file("CA"))? {
        roots.add(c).map_err(|e| bad("CA file", &e))?;
    }
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| bad("TLS", &e))?
        .with_root_certificates(roots);
    let config = match &t.client_cert {
        Some((cert, key)) => {
            let certs = portswitch_files::load_certs(cert).map_err(file("client certificate"))?;
            let key = portswitch_files::load_key(key).map_err(file("client key"))?;
            builder
                .with_client_auth_cert(certs, key)
                .map_err(|e| bad("client certificate", &e))?
        }
        None => builder.with_no_client_auth(),
    };
    Ok(tokio_rustls::TlsConnector::from(std::sync::Arc::new(
        config,
    )))
}

/// Opens the connection (TCP, then TLS if configured). Returns the stream and, over
/// TLS, its `tls-exporter` value for channel binding.
pub(crate) async fn open_stream(
    opts: &ClientOptions,
    addr: &str,
) -> Result<(Stream, Option<[u8; 32]>)> {
    let connect = TcpStream::connect(addr);
    let tcp = tokio::time::timeout(opts.connect_timeout, connect)
        .await
        .map_err(|_| Error::ConnectTimeout(addr.to_string()))?
        .map_err(|source| Error::Unreachable {
            addr: addr.to_string(),
            source,
        })?;
    tcp.set_nodelay(true)?;
    let Some(t) = &opts.tls else {
        return Ok((Box::new(tcp), None));
    };
    let host = match &t.server_name {
        Some(n) => n.clone(),
        None => addr
            .rsplit_once(':')
            .map_or(addr, |(h, _)| h)
            .trim_matches(['[', ']'])
            .to_string(),
    };
    let name = rustls_pki_types::ServerName::try_from(host.clone()).map_err(|e| {
        Error::Io(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("server name {host}: {e}"),
        ))
    })?;
    let tls = tokio::time::timeout(opts.connect_timeout, tls_connector(t)?.connect(name, tcp))
        .await
        .map_err(|_| Error::ConnectTimeout(addr.to_string()))?
        .map_err(|e| tls_failure(addr, e))?;
    let exporter = tls_exporter(&tls);
    Ok((Box::new(tls), exporter))
}

/// The error for a failed TLS handshake with `addr`. A portswitch server that does
/// not speak TLS reads the ClientHello as a frame of some 369 MB, answers GOAWAY in a
/// frame (whose first byte, 0, is no TLS record type) and closes: that is named for
/// what it is. Anything else (an untrusted certificate, say) keeps rustls's words,
/// with the server's address.
fn tls_failure(addr: &str, e: std::io::Error) -> Error {
    let not_tls = e
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>())
        .is_some_and(|r| {
            matches!(
                r,
                rustls::Error::InvalidMessage(
                    rustls::InvalidMessage::InvalidContentType
                        | rustls::InvalidMessage::UnknownProtocolVersion
                )
            )
        });
    if not_tls {
        return Error::TlsUnexpected {
            addr: addr.to_string(),
        };
    }
    Error::Io(std::io::Error::new(
        e.kind(),
        format!("TLS handshake with {addr}: {e}"),
    ))
}

/// The `tls-exporter` channel-binding value of a TLS connection (RFC 9266): 32 bytes
/// under the label "EXPORTER-Channel-Binding" with no context.
pub fn tls_exporter<S>(tls: &tokio_rustls::client::TlsStream<S>) -> Option<[u8; 32]> {
    let mut out = [0u8; 32];
    tls.get_ref()
        .1
        .export_keying_material(&mut out, b"EXPORTER-Channel-Binding", None)
        .ok()?;
    Some(out)
}

/// Connects to `addr` and opens (or resumes) a session on a stream of its own: HELLO,
/// and with credentials the SCRAM-SHA-256 round trip, checking the server's
/// signature. Returns the stream, the server's answer, any bytes read past it, and when
/// HELLO was sent (the start of the lease view it proves).
pub(crate) async fn handshake(
    opts: &ClientOptions,
    addr: &str,
    lease_ms: u32,
    resume: Option<(u64, u64)>,
) -> Result<(Stream, HelloOk<'static>, BytesMut, Instant)> {
    let (mut stream, exporter) = open_stream(opts, addr).await?;
    let (hello_ok, leftover, sent_at) =
        handshake_on(&mut stream, exporter, opts, addr, lease_ms, resume).await?;
    Ok((stream, hello_ok, leftover, sent_at))
}

/// Opens (or resumes) a session on an open stream: see [`handshake`].
async fn handshake_on(
    stream: &mut Stream,
    exporter: Option<[u8; 32]>,
    opts: &ClientOptions,
    addr: &str,
    lease_ms: u32,
    resume: Option<(u64, u64)>,
) -> Result<(HelloOk<'static>, BytesMut, Instant)> {
    let deadline = tokio::time::Instant::now() + opts.answer_timeout_for(lease_ms);
    let mut hs = Handshake::start(opts, exporter, &nonce_seed()?);
    let sent_at = Instant::now();
    send_one(stream, &Request::Hello(hs.hello(opts, lease_ms, resume))).await?;
    let mut buf = BytesMut::with_capacity(4096);
    loop {
        let frame = next_frame(stream, &mut buf, deadline, addr).await?;
        let (msg, rest) = first_message(&frame)?;
        let reply = match msg {
            ServerMsg::Reply { reply, .. } => reply,
            other => return Err(refusal(other)),
        };
        match hs.on_reply(&reply)? {
            Next::Auth(client_final) => {
                send_one(
                    stream,
                    &Request::Auth {
                        data: client_final.as_bytes(),
                    },
                )
                .await?;
            }
            Next::Done(hello_ok) => {
                let mut leftover = BytesMut::new();
                if !rest.is_empty() {
                    // Events that came in the same frame as HELLO_OK (a resume's
                    // missed events): re-framed for the reader.
                    leftover.extend_from_slice(&(rest.len() as u32).to_be_bytes());
                    leftover.extend_from_slice(rest);
                }
                leftover.extend_from_slice(&buf);
                return Ok((hello_ok, leftover, sent_at));
            }
        }
    }
}

/// STATS of the server at `addr` (works on any member of a group, master or not).
///
/// Without credentials no session is opened: STATS needs none. With credentials
/// (`opts.credentials`) the client logs in first, on the same connection, so that
/// credentials the server refuses fail the call rather than pass unnoticed; the
/// session it opens ends with its connection (BYE, and `end_on_disconnect`). A member
/// that is not master opens no sessions and so cannot check credentials: it answers
/// HELLO `not_master`, and its figures are read without a login.
pub async fn server_stats(opts: &ClientOptions, addr: &str) -> Result<Vec<(String, u64)>> {
    let (mut stream, exporter) = open_stream(opts, addr).await?;
    let mut buf = BytesMut::with_capacity(4096);
    let mut logged_in = false;
    if opts.credentials.is_some() {
        let mut once = opts.clone();
        once.end_on_disconnect = true;
        let deadline = tokio::time::Instant::now() + opts.connect_timeout;
        loop {
            let lease_ms = once.lease_ms();
            match handshake_on(&mut stream, exporter, &once, addr, lease_ms, None).await {
                Ok((_, rest, _)) => {
                    buf = rest;
                    logged_in = true;
                    break;
                }
                Err(Error::Server {
                    code: ErrorCode::NotMaster,
                    ..
                }) => break,
                // Admitting sessions at its own pace, or raising its lease ceiling:
                // come back when it says, while the connect timeout lasts.
                Err(e) => match retry_hint(&e) {
                    Some(wait) if tokio::time::Instant::now() + wait < deadline => {
                        wait_as_told(wait).await
                    }
                    _ => return Err(e),
                },
            }
        }
    }
    send_one(&mut stream, &Request::Stats).await?;
    let deadline = tokio::time::Instant::now() + opts.connect_timeout;
    let stats = loop {
        let frame = next_frame(&mut stream, &mut buf, deadline, addr).await?;
        // A session may get events (none are expected); the answer is the reply.
        let mut found = None;
        for m in messages(&frame[4..], COMMANDS_PER_FRAME_MAX) {
            let m = m.map_err(|e| Error::Protocol(e.to_string()))?;
            let msg = ServerMsg::decode(m.opcode, m.id, m.body)
                .map_err(|e| Error::Protocol(e.to_string()))?;
            match msg {
                ServerMsg::Reply { reply, .. } => {
                    found = Some(match owned_answer(&reply)? {
                        Answer::Stats(s) => Ok(s),
                        other => Err(unexpected(other)),
                    });
                    break;
                }
                ServerMsg::Event(WireEvent::GoAway { .. }) => return Err(refusal(msg)),
                ServerMsg::Event(_) => {}
            }
        }
        if let Some(r) = found {
            break r;
        }
    };
    if logged_in {
        // Best effort: the session ends with its connection anyway.
        let _ = send_one(&mut stream, &Request::Bye).await;
    }
    stats
}

/// What a handshake with some server of the group came to.
pub(crate) type Handshaken = (Stream, HelloOk<'static>, BytesMut, Instant, String);

/// Whether an error means "try another server of the group" rather than "this
/// session cannot be had".
pub(crate) fn try_elsewhere(e: &Error) -> bool {
    match e {
        Error::Server { code, .. } => {
            matches!(code, ErrorCode::NotMaster | ErrorCode::Overloaded)
        }
        Error::Io(_)
        | Error::Unreachable { .. }
        | Error::ConnectTimeout(_)
        | Error::ConnectionLost => true,
        _ => false,
    }
}

/// How long a member taking over as master asked us to wait (the `retry_ms` of its
/// `not_master` answer), if it did.
pub(crate) fn retry_hint(e: &Error) -> Option<Duration> {
    let Error::Server {
        code: ErrorCode::NotMaster | ErrorCode::Overloaded,
        retry_ms: Some(ms),
        ..
    } = e
    else {
        return None;
    };
    Some(Duration::from_millis((*ms as u64).min(10_000)))
}

/// Waits as long as a server said (`retry_ms`), spread over a few ms more so that
/// its clients do not all come back in one instant.
pub(crate) async fn wait_as_told(wait: Duration) {
    let spread = Duration::from_millis(fastrand::u64(0..=20));
    tokio::time::sleep(wait + spread).await;
}

/// Handshakes with the group's master: `addr`, then the other servers, following a
/// follower's hint at the master at once. `failed` (the server whose connection just
/// failed) is asked alongside them rather than first: it may be silent rather than
/// dead (its data centre cut off), and then an attempt on it costs a whole
/// `answer_timeout`, while a live member answers in a round trip and names the
/// master if there is one. Returns the first success, or the last error.
pub(crate) async fn handshake_any(
    opts: &ClientOptions,
    failed: Option<&str>,
    lease_ms: u32,
    resume: Option<(u64, u64)>,
) -> Result<Handshaken> {
    let mut todo: std::collections::VecDeque<String> = std::iter::once(opts.addr.clone())
        .chain(opts.servers.iter().cloned())
        .filter(|a| Some(a.as_str()) != failed)
        .collect();
    let alone = todo.is_empty();
    let mut tried: std::collections::HashSet<String> =
        failed.map(str::to_string).into_iter().collect();
    let mut beside = failed.map(|f| Box::pin(handshake(opts, f, lease_ms, resume)));
    let mut last = Error::ConnectionLost;
    // What one attempt came to: done (success or a final error), or try on.
    let mut settle = |r: Result<(Stream, HelloOk<'static>, BytesMut, Instant)>,
                      addr: String,
                      todo: &mut std::collections::VecDeque<String>|
     -> Option<Result<Handshaken>> {
        match r {
            Ok((s, h, rest, sent)) => Some(Ok((s, h, rest, sent, addr))),
            // The master is admitting sessions as fast as it will: it said when to
            // come back, and no other server can help.
            Err(
                e @ Error::Server {
                    code: ErrorCode::Overloaded,
                    ..
                },
            ) => Some(Err(e)),
            Err(e) if try_elsewhere(&e) => {
                if let Error::Server {
                    master: Some(master),
                    ..
                } = &e
                {
                    // A hint at the server that just failed us adds nothing: it is
                    // being asked already.
                    if Some(master.as_str()) != failed {
                        todo.push_front(master.clone());
                    }
                }
                tracing::debug!(%addr, error = %e, "not served here; trying the next server");
                last = e;
                None
            }
            Err(e) => Some(Err(e)),
        }
    };
    while let Some(addr) = todo.pop_front() {
        if !tried.insert(addr.clone()) {
            continue;
        }
        let here = handshake(opts, &addr, lease_ms, resume);
        let (r, from) = match beside.as_mut() {
            None => (here.await, addr.clone()),
            Some(b) => tokio::select! {
                r = here => (r, addr.clone()),
                r = b => {
                    beside = None;
                    // The attempt on `addr` was cut short: it is asked again.
                    tried.remove(&addr);
                    todo.push_front(addr.clone());
                    (r, failed.unwrap_or_default().to_string())
                }
            },
        };
        if let Some(done) = settle(r, from, &mut todo) {
            return done;
        }
    }
    if let (Some(b), Some(f)) = (beside, failed) {
        // The others are not serving. The failed server gets a little longer (it may
        // be alive, and only our connection to it broke), unless it is the only one;
        // then the caller backs off and asks everyone again, instead of hanging on a
        // silent server for a whole answer_timeout while a new master comes up.
        let r = if alone {
            Some(b.await)
        } else {
            tokio::time::timeout(FAILED_SERVER_GRACE, b).await.ok()
        };
        if let Some(r) = r {
            if let Some(done) = settle(r, f.to_string(), &mut todo) {
                return done;
            }
        }
    }
    Err(last)
}

/// How much longer than the other servers' answers a reconnecting client waits for
/// the server whose connection just failed, before asking everyone again.
const FAILED_SERVER_GRACE: Duration = Duration::from_millis(200);

pub(crate) async fn send_one(stream: &mut Stream, req: &Request<'_>) -> Result<()> {
    let mut fb = FrameBuf::new(FRAME_BYTES_MAX, 1);
    fb.push_request(1, req);
    let mut bytes = BytesMut::new();
    fb.take_into(&mut bytes);
    stream.write_all(&bytes).await?;
    Ok(())
}

/// Reads until `buf` starts with a whole frame and splits it off.
pub(crate) async fn next_frame(
    stream: &mut Stream,
    buf: &mut BytesMut,
    deadline: tokio::time::Instant,
    addr: &str,
) -> Result<BytesMut> {
    loop {
        match frame_len(buf, FRAME_BYTES_MAX) {
            Ok(Some(n)) => return Ok(buf.split_to(n)),
            Ok(None) => {}
            Err(_) if looks_like_tls(buf) => {
                return Err(Error::TlsExpected {
                    addr: addr.to_string(),
                })
            }
            Err(e) => return Err(Error::Protocol(e.to_string())),
        }
        let read = tokio::time::timeout_at(deadline, stream.read_buf(buf))
            .await
            .map_err(|_| Error::ConnectTimeout(addr.to_string()))??;
        if read == 0 {
            return Err(Error::Io(std::io::ErrorKind::UnexpectedEof.into()));
        }
    }
}

/// Whether bytes that are no valid frame start like a TLS record: content type
/// (change_cipher_spec 20, alert 21, handshake 22, application_data 23, heartbeat
/// 24), then protocol version 3.x. Read as a frame header, such a record claims some
/// 336 to 403 MB (a TLS alert: 352,518,912 bytes), far past any frame limit, so no
/// valid frame is ever taken for one.
pub(crate) fn looks_like_tls(buf: &[u8]) -> bool {
    buf.len() >= 3 && (20..=24).contains(&buf[0]) && buf[1] == 3 && buf[2] <= 4
}

// The smallest length a TLS record header reads as (20, 3, 0, 0) is past the frame
// limit, so `next_frame` asks `looks_like_tls` only of bytes that are no frame.
const _: () = assert!(FRAME_BYTES_MAX < 0x1403_0000);

/// The read loop of a connection after its handshake, shared by `Client` and `Mux`:
/// each whole frame in `buf` (length prefix included) goes to `on_frame`; when `buf`
/// holds no whole frame, `wanted()` is asked whether this reader still serves its
/// connection (a newer connection replaced it, or the sessions are over: then `None`,
/// quietly) before more is read. Returns why the connection ended otherwise: a frame
/// `on_frame` refused, a malformed frame (a TLS record named as such, `on_tls` told),
/// the end of the stream, a read error, or `dead` notified (`dead_why`).
pub(crate) async fn read_frames<R: AsyncRead + Unpin>(
    rd: &mut R,
    buf: &mut BytesMut,
    dead: &tokio::sync::Notify,
    dead_why: &str,
    mut on_frame: impl FnMut(&[u8]) -> std::result::Result<(), String>,
    mut wanted: impl FnMut() -> bool,
    on_tls: impl FnOnce(),
) -> Option<String> {
    loop {
        loop {
            match frame_len(buf, FRAME_BYTES_MAX) {
                Ok(Some(n)) => {
                    let frame = buf.split_to(n);
                    if let Err(why) = on_frame(&frame) {
                        return Some(why);
                    }
                }
                Ok(None) => break,
                Err(_) if looks_like_tls(buf) => {
                    on_tls();
                    return Some(
                        "the server speaks TLS: configure a CA (ClientOptions::tls)".to_string(),
                    );
                }
                Err(e) => return Some(format!("the server sent a malformed frame: {e}")),
            }
        }
        if !wanted() {
            return None;
        }
        tokio::select! {
            r = rd.read_buf(buf) => match r {
                Ok(0) => return Some("connection closed by the server".to_string()),
                Err(e) => return Some(format!("connection error: {e}")),
                Ok(_) => {}
            },
            _ = dead.notified() => return Some(dead_why.to_string()),
        }
    }
}

/// The first message of a frame, and the bytes of the frame's other messages.
pub(crate) fn first_message(frame: &[u8]) -> Result<(ServerMsg<'_>, &[u8])> {
    let m = messages(&frame[4..], COMMANDS_PER_FRAME_MAX)
        .next()
        .ok_or_else(|| Error::Protocol("empty frame".into()))?
        .map_err(|e| Error::Protocol(e.to_string()))?;
    let msg =
        ServerMsg::decode(m.opcode, m.id, m.body).map_err(|e| Error::Protocol(e.to_string()))?;
    Ok((msg, &frame[4 + 9 + m.body.len()..]))
}

/// The error for a handshake answer that is not the expected one.
pub(crate) fn refusal(msg: ServerMsg<'_>) -> Error {
    match msg {
        ServerMsg::Reply {
            reply:
                Reply::Error {
                    code,
                    message,
                    retry_ms,
                    master,
                },
            ..
        } => Error::of_reply(code, message, retry_ms, master),
        ServerMsg::Event(WireEvent::GoAway { code, message }) => {
            Error::of_reply(code, message, 0, b"")
        }
        other => Error::Protocol(format!("unexpected handshake answer {other:?}")),
    }
}
