//! A session on a connection of its own: the driver behind [`Client::connect`].
//!
//! Four tasks share the session's [`SessionCore`] under one short lock: a writer that
//! sends whatever requests accumulated (woken, it yields once first, so the requests
//! of every task that is ready share a frame), a reader that hands replies and events
//! to the core, a ticker (keepalive, reclaim deadlines, the lease view, and the answer
//! timeout that leaves a silent server), and — when the connection is lost — the
//! resume loop that finds the group's master and resumes the session on it.

use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant};

use bytes::BytesMut;
use portswitch_proto::frame::messages;
use portswitch_proto::limits::{COMMANDS_PER_FRAME_MAX, FRAME_BYTES_MAX};
use portswitch_proto::{ErrorCode, Event as WireEvent, FrameBuf, Request, ServerMsg};
use tokio::io::{AsyncWriteExt, ReadHalf, WriteHalf};
use tokio::sync::Notify;

use crate::client::{Link, Signals, Tx};
use crate::net::{handshake_any, retry_hint, try_elsewhere, wait_as_told, Stream};
use crate::session::{Effects, Kind, Phase, SessionCore, Wire};
use crate::types::*;
use crate::{Client, ClientOptions};

pub(crate) struct Shared {
    opts: ClientOptions,
    st: Mutex<St>,
    wake_writer: Notify,
    signals: Arc<Signals>,
    answer_timeout: Duration,
}

struct St {
    core: SessionCore<Tx>,
    /// Requests for the current connection.
    out: FrameBuf,
    next_id: u32,
    /// The server this session is on (asked first when reconnecting).
    server: String,
    /// The current connection's generation; tasks of older ones stop.
    gen: u64,
    /// No connection: the resume loop runs.
    detached: bool,
    /// Wakes the current connection's reader when the connection must go.
    conn_dead: Option<Arc<Notify>>,
    /// The current connection's writer task.
    conn_writer: Option<tokio::task::JoinHandle<()>>,
}

/// The wire of a session on a connection of its own: its frame buffer.
struct FrameWire<'a> {
    out: &'a mut FrameBuf,
    next_id: &'a mut u32,
}

impl Wire for FrameWire<'_> {
    fn push(&mut self, req: &Request<'_>) -> u32 {
        *self.next_id = self.next_id.wrapping_add(1).max(1);
        self.out.push_request(*self.next_id, req);
        *self.next_id
    }
}

impl St {
    /// Runs `f` on the core with this connection's wire, collecting its effects.
    fn drive<R>(
        &mut self,
        fx: &mut Effects<Tx>,
        f: impl FnOnce(&mut SessionCore<Tx>, &mut FrameWire<'_>) -> R,
    ) -> R {
        let St {
            core, out, next_id, ..
        } = self;
        let r = f(core, &mut FrameWire { out, next_id });
        core.take_effects(fx);
        if fx.ended {
            self.after_end();
        }
        r
    }

    /// The session is over: its connection goes (a closed session's writer still
    /// sends what is queued, its BYE; nothing more goes out for a lost one).
    fn after_end(&mut self) {
        if matches!(self.core.phase(), Phase::Lost(_)) {
            self.out.clear();
            self.gen += 1;
        }
        if let Some(dead) = self.conn_dead.take() {
            dead.notify_one();
        }
    }
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, St> {
        self.st.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(crate) fn with<R>(&self, f: impl FnOnce(&SessionCore<Tx>) -> R) -> R {
        f(&self.lock().core)
    }

    pub(crate) fn submit(&self, req: &Request<'_>, kind: Kind, done: Option<Tx>) -> Result<()> {
        let mut fx = Effects::default();
        let r = self.lock().drive(&mut fx, |core, wire| {
            core.submit(req, kind, done, Instant::now(), wire)
        });
        self.wake_writer.notify_one();
        self.signals.deliver(&mut fx);
        r
    }

    /// Ends the session on the client's side; the writer sends what is queued and
    /// closes the connection.
    pub(crate) fn close(&self) {
        let mut fx = Effects::default();
        self.lock()
            .drive(&mut fx, |core, _| core.end(Phase::Closed));
        self.wake_writer.notify_one();
        self.signals.deliver(&mut fx);
    }
}

/// Connects, opens (or resumes) a session, and starts its tasks.
pub(crate) async fn connect(opts: ClientOptions) -> Result<Client> {
    opts.check()?;
    let lease_ms = opts.lease_ms();
    // Through an election a group has no master for a moment: keep trying every
    // server (with jittered backoff) until the connect timeout.
    let deadline = Instant::now() + opts.connect_timeout;
    let mut backoff = Duration::from_millis(20);
    let (stream, hello, rest, sent_at, addr) = loop {
        match handshake_any(&opts, None, lease_ms, opts.resume).await {
            Ok(x) => break x,
            Err(e) if try_elsewhere(&e) && Instant::now() + backoff < deadline => {
                match retry_hint(&e) {
                    Some(wait) => wait_as_told(wait).await,
                    None => {
                        tokio::time::sleep(backoff.mul_f64(0.5 + fastrand::f64())).await;
                        backoff = (backoff * 2).min(Duration::from_millis(500));
                    }
                }
            }
            Err(e) => return Err(e),
        }
    };
    let core = SessionCore::new(opts.settings(), &hello, sent_at);
    let info = core.info();
    let frame_max = (hello.limits.frame_bytes_max as usize).min(FRAME_BYTES_MAX);
    let cmds_max = (hello.limits.commands_per_frame_max as usize).clamp(1, COMMANDS_PER_FRAME_MAX);
    let signals = Signals::new(opts.events_capacity);
    let sh = Arc::new(Shared {
        answer_timeout: opts.answer_timeout_for(hello.lease_ms),
        opts,
        st: Mutex::new(St {
            core,
            out: FrameBuf::new(frame_max, cmds_max),
            next_id: 0,
            server: addr,
            gen: 1,
            detached: false,
            conn_dead: None,
            conn_writer: None,
        }),
        wake_writer: Notify::new(),
        signals: signals.clone(),
    });
    start_connection(sh.clone(), stream, rest, 1);
    tokio::spawn(ticker(Arc::downgrade(&sh)));
    Ok(Client::new(Link::Direct(sh), signals, info, None))
}

fn start_connection(sh: Arc<Shared>, stream: Stream, rest: BytesMut, gen: u64) {
    let (rd, wr) = tokio::io::split(stream);
    let dead = Arc::new(Notify::new());
    let w = tokio::spawn(writer(sh.clone(), wr, gen, dead.clone()));
    {
        let mut st = sh.lock();
        st.conn_dead = Some(dead.clone());
        st.conn_writer = Some(w);
    }
    tokio::spawn(reader(sh, rd, rest, gen, dead));
}

async fn writer(sh: Arc<Shared>, mut wr: WriteHalf<Stream>, gen: u64, dead: Arc<Notify>) {
    let mut buf = BytesMut::new();
    loop {
        let closing = {
            let mut st = sh.lock();
            // A lost connection's writer lets go of its socket at once: a process with
            // thousands of sessions would otherwise hold every old socket as well as
            // every new attempt through a failover, and run out of descriptors.
            if st.gen != gen || st.detached {
                // A newer connection's writer may have been meant by the wake-up this
                // one took: pass it on.
                sh.wake_writer.notify_one();
                break;
            }
            st.out.take_into(&mut buf);
            st.core.is_over()
        };
        if !buf.is_empty() {
            if wr.write_all(&buf).await.is_err() {
                dead.notify_one();
                break;
            }
            if !closing {
                continue; // more may have piled up during the write
            }
        }
        if closing {
            break;
        }
        sh.wake_writer.notified().await;
        // Let the other tasks that are ready run first: what they submit joins this
        // frame instead of costing a write of its own.
        tokio::task::yield_now().await;
    }
    let _ = wr.shutdown().await;
}

async fn reader(
    sh: Arc<Shared>,
    mut rd: ReadHalf<Stream>,
    mut buf: BytesMut,
    gen: u64,
    dead: Arc<Notify>,
) {
    let why = crate::net::read_frames(
        &mut rd,
        &mut buf,
        &dead,
        "the connection failed or the server stopped answering",
        |frame| dispatch(&sh, &frame[4..], gen),
        || {
            let st = sh.lock();
            st.gen == gen && !st.core.is_over()
        },
        || {},
    )
    .await;
    let Some(why) = why else { return };
    // The socket closes once the writer lets go too; reconnecting can take a while.
    drop((rd, buf));
    on_disconnect(sh, gen, why).await;
}

/// Handles every message of one frame; `Err` when the connection must go.
fn dispatch(sh: &Shared, body: &[u8], gen: u64) -> std::result::Result<(), String> {
    let mut fx = Effects::default();
    let r = {
        let mut st = sh.lock();
        if st.gen != gen {
            return Ok(());
        }
        let now = Instant::now();
        st.drive(&mut fx, |core, wire| {
            for m in messages(body, usize::MAX) {
                let m = m.map_err(|e| format!("the server sent a malformed frame: {e}"))?;
                let Ok(msg) = ServerMsg::decode(m.opcode, m.id, m.body) else {
                    continue; // unknown to this version: skipped, as the protocol says
                };
                match msg {
                    ServerMsg::Reply { id, reply } => core.handle_reply(id, &reply, now, wire)?,
                    ServerMsg::Event(WireEvent::GoAway { code, message }) => {
                        let why = String::from_utf8_lossy(message).into_owned();
                        end_by_goaway(core, code, &why);
                        return Err(format!("the server closed the connection: {code}: {why}"));
                    }
                    ServerMsg::Event(e) => core.handle_event(&e, now),
                }
            }
            Ok(())
        })
    };
    sh.wake_writer.notify_one();
    sh.signals.deliver(&mut fx);
    r
}

/// What a GOAWAY means for the session: over if the server expired it; otherwise
/// (not master, shutting down, slow, or resumed on another connection — an attempt
/// of this client's that the server handled late) the session resumes on a new
/// connection at once.
fn end_by_goaway(core: &mut SessionCore<Tx>, code: ErrorCode, why: &str) {
    if matches!(code, ErrorCode::SessionExpired | ErrorCode::UserRemoved) {
        core.end(Phase::Lost(format!("{code}: {why}")));
    }
}

/// Keepalive, deadlines and the answer timeout, until the session is over.
async fn ticker(weak: Weak<Shared>) {
    loop {
        let Some(sh) = weak.upgrade() else { return };
        let now = Instant::now();
        let mut fx = Effects::default();
        let check = (sh.answer_timeout / 2).max(Duration::from_millis(10));
        let (next, stuck) = {
            let mut st = sh.lock();
            st.drive(&mut fx, |core, wire| core.handle_timeout(now, wire));
            if st.core.is_over() {
                (None, None)
            } else {
                // A connection whose oldest request has gone unanswered too long is
                // dropped, so the session leaves a server that is stopped but still
                // holds its sockets.
                let oldest = if st.detached {
                    None
                } else {
                    st.core.oldest_unanswered()
                };
                let stuck =
                    oldest.is_some_and(|t| now.saturating_duration_since(t) >= sh.answer_timeout);
                let next = st
                    .core
                    .next_timeout()
                    .unwrap_or(now + check)
                    .min(now + check)
                    .max(now + Duration::from_millis(1));
                (Some(next), stuck.then(|| st.conn_dead.clone()).flatten())
            }
        };
        sh.wake_writer.notify_one();
        sh.signals.deliver(&mut fx);
        if let Some(dead) = stuck {
            tracing::debug!("no answer within the answer timeout: dropping the connection");
            dead.notify_one();
        }
        let Some(next) = next else { return };
        drop(sh);
        tokio::time::sleep_until(next.into()).await;
    }
}

/// How long a session that lost its connection waits for that connection's writer to
/// end (it is only waiting to be scheduled) before it connects again.
const WRITER_END_WAIT: Duration = Duration::from_millis(100);

/// Longest pause between two rounds of reconnect attempts (before jitter): short
/// enough (× 1.5 < the 330 ms a new master waits before serving) that every client
/// asks the new master at least once while it is taking over, and so learns exactly
/// when to come back.
pub(crate) const RECONNECT_BACKOFF_MAX: Duration = Duration::from_millis(150);

/// The connection is gone: requests in flight fail (save waits until granted), then
/// the session is resumed on a new connection while its lease view lasts (or ends at
/// once if it ends on disconnect, as the server has ended it).
async fn on_disconnect(sh: Arc<Shared>, gen: u64, why: String) {
    let mut fx = Effects::default();
    let old_writer = {
        let mut st = sh.lock();
        if st.gen != gen || st.detached || st.core.is_over() {
            return;
        }
        st.detached = true;
        st.out.clear();
        st.drive(&mut fx, |core, _| core.detached(&why));
        st.conn_writer.take()
    };
    // The lost connection's writer is waiting for work; it sees the session detached
    // and ends, closing the socket, before this session opens another.
    sh.wake_writer.notify_waiters();
    if let Some(w) = old_writer {
        let _ = tokio::time::timeout(WRITER_END_WAIT, w).await;
    }
    sh.signals.deliver(&mut fx);
    let mut backoff = Duration::from_millis(20);
    loop {
        let (view_end, info, server) = {
            let st = sh.lock();
            if st.core.is_over() {
                return;
            }
            (st.core.view_end(), st.core.info(), st.server.clone())
        };
        let now = Instant::now();
        if now >= view_end {
            // The ticker ends the session at the same moment; either will do.
            let mut fx = Effects::default();
            sh.lock()
                .drive(&mut fx, |core, wire| core.handle_timeout(now, wire));
            sh.signals.deliver(&mut fx);
            return;
        }
        let attempt = handshake_any(
            &sh.opts,
            Some(&server),
            info.lease_ms,
            Some((info.id, info.secret)),
        );
        let left = view_end.saturating_duration_since(now);
        match tokio::time::timeout(left, attempt).await {
            Ok(Ok((_, hello, _, _, _))) if hello.epoch < info.epoch => {
                // A master older than one this session has seen is deposed (or about
                // to learn it is): its answers must not extend the lease view.
                tracing::warn!(
                    epoch = hello.epoch,
                    seen = info.epoch,
                    "refusing a server with an older epoch"
                );
            }
            Ok(Ok((stream, hello, rest, sent_at, addr))) => {
                let mut fx = Effects::default();
                let new_gen = {
                    let mut st = sh.lock();
                    if st.core.is_over() {
                        return;
                    }
                    st.gen += 1;
                    st.detached = false;
                    st.server = addr;
                    let now = Instant::now();
                    st.drive(&mut fx, |core, wire| {
                        core.resumed(&hello, sent_at, now, wire)
                    });
                    st.gen
                };
                start_connection(sh.clone(), stream, rest, new_gen);
                sh.wake_writer.notify_one();
                sh.signals.deliver(&mut fx);
                return;
            }
            Ok(Err(Error::Server { code, message, .. }))
                if !matches!(code, ErrorCode::NotMaster | ErrorCode::Overloaded) =>
            {
                let mut fx = Effects::default();
                sh.lock().drive(&mut fx, |core, _| {
                    core.end(Phase::Lost(format!("resume refused: {code}: {message}")))
                });
                sh.signals.deliver(&mut fx);
                return;
            }
            Ok(Err(e)) => {
                if let Some(wait) = retry_hint(&e) {
                    wait_as_told(wait).await;
                    backoff = Duration::from_millis(20);
                    continue;
                }
            }
            Err(_) => {}
        }
        // Jittered exponential backoff, so that many clients do not reconnect in step;
        // capped low, because a new master serves within about a second of the old
        // one's death and every held port waits for its owner to come back.
        let jitter = 0.5 + fastrand::f64();
        tokio::time::sleep(backoff.mul_f64(jitter)).await;
        backoff = (backoff * 2).min(RECONNECT_BACKOFF_MAX);
    }
}
