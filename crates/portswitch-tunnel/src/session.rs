//! The tokio driver of one session: a [`Mux`] under a lock, a reader and a writer task
//! per pool connection, and two pumps per stream (socket to tunnel, tunnel to
//! socket). Shared by the client and the server.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::{BufMut, Bytes};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::Notify;

use crate::compress::{Compressor, Decompressor};
use crate::error::{Result, TunnelError};
use crate::frame::{decode_all, CompressPolicy, ResetCode};
use crate::handshake::Keys;
use crate::limits::{
    ACK_DELAY_MS, CONN_IDLE_TIMEOUT_MS, OPEN_HOLD_MS, RECORD_BODY_BYTES_MAX,
    RECORD_CONTENT_BYTES_MAX, RECORD_HEADER_BYTES, STREAM_CHUNK_BYTES_MAX,
};
use crate::metrics::Metrics;
use crate::mux::{ConnId, Delivery, Mux, MuxConfig, Opened, Role, Sent};
use crate::pool::BufPool;
use crate::record::{pad_len, Opener, Sealer};

/// Records gathered into one socket write at most (frames of many streams, packed).
const RECORDS_PER_WRITE_MAX: usize = 4;
/// Bytes a pool connection's reader asks the socket for at once: the size of a stage.
const READ_BUFFER_BYTES: usize = 256 * 1024;
const _: () = assert!(READ_BUFFER_BYTES >= 2 * (RECORD_HEADER_BYTES + RECORD_BODY_BYTES_MAX));
/// Idle buffers kept for reuse, process-wide: 8 MiB of chunks and 8 MiB of stages.
const CHUNKS_KEPT: usize = 256;
const STAGES_KEPT: usize = 32;

/// Buffers that a stream's reads fill (one chunk each).
fn chunk_pool() -> &'static Arc<BufPool> {
    static POOL: std::sync::LazyLock<Arc<BufPool>> =
        std::sync::LazyLock::new(|| BufPool::new(STREAM_CHUNK_BYTES_MAX, CHUNKS_KEPT));
    &POOL
}

/// Buffers that a pool connection's reads fill (records, opened in place).
fn stage_pool() -> &'static Arc<BufPool> {
    static POOL: std::sync::LazyLock<Arc<BufPool>> =
        std::sync::LazyLock::new(|| BufPool::new(READ_BUFFER_BYTES, STAGES_KEPT));
    &POOL
}

/// Settings of a session's endpoint.
#[derive(Debug, Clone)]
pub struct SessionConfig {
    pub mux: MuxConfig,
    /// zstd level for compressed chunks.
    pub compress_level: i32,
    /// A pool connection silent for this long is dead; keepalives go at a third.
    pub conn_idle_timeout: Duration,
}

impl Default for SessionConfig {
    fn default() -> Self {
        SessionConfig {
            mux: MuxConfig::default(),
            compress_level: 3,
            conn_idle_timeout: Duration::from_millis(CONN_IDLE_TIMEOUT_MS),
        }
    }
}

#[derive(Default)]
struct StreamWaker {
    recv: Notify,
    send: Notify,
}

struct State {
    mux: Mux,
    streams: HashMap<u32, Arc<StreamWaker>>,
    writers: HashMap<ConnId, Arc<Notify>>,
    next_conn: ConnId,
    retransmitted_seen: u64,
}

type OnOpen = Box<dyn Fn(Session, Opened) + Send + Sync>;

struct Shared {
    state: Mutex<State>,
    cfg: SessionConfig,
    metrics: Metrics,
    on_open: Option<OnOpen>,
    conns_changed: Notify,
    closed: AtomicBool,
    closed_notify: Notify,
}

/// One session: its streams and its pool connections. Cheap to clone.
#[derive(Clone)]
pub struct Session(Arc<Shared>);

impl Session {
    /// A session; `on_open` is called (server side) for every stream the far end
    /// opens, to dial its target and then [`Session::run_stream`].
    pub fn new(
        role: Role,
        cfg: SessionConfig,
        metrics: Metrics,
        on_open: Option<OnOpen>,
    ) -> Session {
        Session(Arc::new(Shared {
            state: Mutex::new(State {
                mux: Mux::new(role, cfg.mux.clone()),
                streams: HashMap::new(),
                writers: HashMap::new(),
                next_conn: 1,
                retransmitted_seen: 0,
            }),
            cfg,
            metrics,
            on_open,
            conns_changed: Notify::new(),
            closed: AtomicBool::new(false),
            closed_notify: Notify::new(),
        }))
    }

    pub fn metrics(&self) -> &Metrics {
        &self.0.metrics
    }

    /// Runs `f` on the mux, then wakes whoever has work.
    fn with<R>(&self, f: impl FnOnce(&mut Mux) -> R) -> R {
        let mut notify: Vec<Arc<Notify>> = Vec::new();
        let mut notify_send: Vec<Arc<StreamWaker>> = Vec::new();
        let mut notify_recv: Vec<Arc<StreamWaker>> = Vec::new();
        let (r, opened) = {
            let mut st = self.0.state.lock().expect("session lock");
            let r = f(&mut st.mux);
            let w = st.mux.take_wakeups();
            for c in w.conns {
                notify.extend(st.writers.get(&c).cloned());
            }
            for id in w.recv {
                notify_recv.extend(st.streams.get(&id).cloned());
            }
            for id in w.send {
                notify_send.extend(st.streams.get(&id).cloned());
            }
            let again = st.mux.stats().frames_retransmitted;
            if again > st.retransmitted_seen {
                self.0
                    .metrics
                    .frames_retransmitted
                    .inc_by(again - st.retransmitted_seen);
                st.retransmitted_seen = again;
            }
            (r, w.opened)
        };
        for n in notify {
            n.notify_one();
        }
        for s in notify_recv {
            s.recv.notify_one();
        }
        for s in notify_send {
            s.send.notify_one();
        }
        if let Some(cb) = &self.0.on_open {
            for o in opened {
                cb(self.clone(), o);
            }
        }
        r
    }

    /// Pool connections up now.
    pub fn conns(&self) -> usize {
        self.0.state.lock().expect("session lock").mux.conns()
    }

    /// Streams open now.
    pub fn streams(&self) -> usize {
        self.0.state.lock().expect("session lock").mux.streams()
    }

    /// Waits until the number of pool connections may have changed.
    pub async fn conns_changed(&self) {
        self.0.conns_changed.notified().await
    }

    pub fn is_closed(&self) -> bool {
        self.0.closed.load(Ordering::Acquire)
    }

    /// Waits until the session is closed.
    pub async fn closed(&self) {
        loop {
            let n = self.0.closed_notify.notified();
            if self.is_closed() {
                return;
            }
            n.await;
        }
    }

    /// Ends the session: every stream is reset, every connection dropped.
    pub fn close(&self) {
        if self.0.closed.swap(true, Ordering::AcqRel) {
            return;
        }
        self.with(|m| m.reset_all());
        let writers: Vec<Arc<Notify>> = self
            .0
            .state
            .lock()
            .expect("session lock")
            .writers
            .values()
            .cloned()
            .collect();
        for w in writers {
            w.notify_one();
        }
        self.0.closed_notify.notify_waiters();
        self.0.conns_changed.notify_waiters();
    }

    /// Runs a pool connection whose handshake is done until it dies. Its unacknowledged
    /// frames then go out again on the others.
    pub async fn run_conn(&self, tcp: TcpStream, keys: Keys) {
        let _ = tcp.set_nodelay(true);
        let notify = Arc::new(Notify::new());
        let c = {
            let mut st = self.0.state.lock().expect("session lock");
            let c = st.next_conn;
            st.next_conn += 1;
            st.writers.insert(c, notify.clone());
            c
        };
        self.with(|m| m.conn_added(c));
        self.0.metrics.pool_connections.inc();
        self.0.conns_changed.notify_waiters();
        let (rd, wr) = tcp.into_split();
        let reader = self.read_conn(c, rd, Opener::new(&keys.recv));
        let writer = self.write_conn(c, wr, Sealer::new(&keys.send), notify);
        let why = tokio::select! {
            r = reader => r,
            r = writer => r,
            _ = self.closed() => Err(TunnelError::Closed),
        };
        tracing::debug!("pool connection {c} ended: {why:?}");
        self.0
            .state
            .lock()
            .expect("session lock")
            .writers
            .remove(&c);
        self.with(|m| m.conn_lost(c));
        self.0.metrics.pool_connections.dec();
        self.0.metrics.pool_connections_lost.inc();
        self.0.conns_changed.notify_waiters();
        if let Err(TunnelError::FlowControl { .. } | TunnelError::Malformed { .. }) = why {
            // The peer broke the protocol: nothing it sends can be trusted.
            self.close();
        }
    }

    async fn read_conn(
        &self,
        c: ConnId,
        mut rd: tokio::net::tcp::OwnedReadHalf,
        mut opener: Opener,
    ) -> Result<()> {
        // Records are opened in place in a pooled stage; the stage is then frozen and
        // the records' frames are slices of it (no copy). The bytes of a record not yet
        // complete move to the next stage.
        let pool = stage_pool();
        let mut stage = pool.take();
        let idle = self.0.cfg.conn_idle_timeout;
        let m = &self.0.metrics;
        let mut bodies: Vec<std::ops::Range<usize>> = Vec::new();
        loop {
            let room = stage.capacity() - stage.len();
            let got = tokio::time::timeout(idle, rd.read_buf(&mut (&mut stage).limit(room)))
                .await
                .map_err(|_| TunnelError::Io(std::io::ErrorKind::TimedOut.into()))??;
            if got == 0 {
                return Err(TunnelError::Io(std::io::ErrorKind::UnexpectedEof.into()));
            }
            m.wire_received_bytes.inc_by(got as u64);
            // Open every complete record.
            let mut pos = 0;
            bodies.clear();
            while stage.len() - pos >= RECORD_HEADER_BYTES {
                let mut header = [0u8; RECORD_HEADER_BYTES];
                header.copy_from_slice(&stage[pos..pos + RECORD_HEADER_BYTES]);
                // Opening a header does not move the nonce on: an incomplete record's
                // header is opened again once its body is here.
                let len = opener.open_header(&mut header)?;
                let body = pos + RECORD_HEADER_BYTES;
                if stage.len() - body < len {
                    break;
                }
                let content = opener.open_body(&mut stage[body..body + len])?;
                bodies.push(body + content.start..body + content.end);
                pos = body + len;
            }
            if bodies.is_empty() {
                continue;
            }
            let mut next = pool.take();
            next.extend_from_slice(&stage[pos..]);
            let frozen = pool.freeze(std::mem::replace(&mut stage, next));
            for body in bodies.drain(..) {
                let mut frames = Vec::new();
                decode_all(frozen.slice(body), &mut frames)?;
                m.records_received.inc();
                self.with(|mux| mux.handle_record(c, frames))?;
            }
        }
    }

    async fn write_conn(
        &self,
        c: ConnId,
        mut wr: tokio::net::tcp::OwnedWriteHalf,
        mut sealer: Sealer,
        notify: Arc<Notify>,
    ) -> Result<()> {
        let mut rng = fastrand::Rng::new();
        let mut out: Vec<u8> = Vec::with_capacity(RECORDS_PER_WRITE_MAX * 70_000);
        let keepalive = self.0.cfg.conn_idle_timeout / 3;
        let ack_delay = Duration::from_millis(ACK_DELAY_MS);
        // When the pending acknowledgement must go at the latest.
        let mut ack_deadline: Option<tokio::time::Instant> = None;
        // Records are sealed in place, one after another, in the buffer of the write.
        let mut seal = |sealer: &mut Sealer, frames: &[crate::frame::Frame], out: &mut Vec<u8>| {
            let start = Sealer::begin_at_end(out);
            for f in frames {
                f.encode(out);
            }
            let content = out.len() - start - RECORD_HEADER_BYTES - 2;
            sealer.seal_at(out, start, pad_len(content, &mut rng));
        };
        loop {
            out.clear();
            let mut records = 0;
            while records < RECORDS_PER_WRITE_MAX {
                let frames = self.with(|m| m.poll_transmit(c, RECORD_CONTENT_BYTES_MAX));
                if frames.is_empty() {
                    break;
                }
                seal(&mut sealer, &frames, &mut out);
                records += 1;
            }
            if records > 0 {
                // Any record carries the pending acknowledgement: a later one is new.
                ack_deadline = None;
            } else {
                if self.is_closed() {
                    return Err(TunnelError::Closed);
                }
                let ack_pending = self
                    .0
                    .state
                    .lock()
                    .expect("session lock")
                    .mux
                    .ack_pending(c);
                let wait = if ack_pending {
                    let due = *ack_deadline
                        .get_or_insert_with(|| tokio::time::Instant::now() + ack_delay);
                    due.saturating_duration_since(tokio::time::Instant::now())
                } else {
                    ack_deadline = None;
                    keepalive
                };
                match tokio::time::timeout(wait, notify.notified()).await {
                    Ok(()) => continue,
                    Err(_) if ack_pending => {
                        ack_deadline = None;
                        let frames = self.with(|m| m.poll_ack(c));
                        if frames.is_empty() {
                            continue;
                        }
                        seal(&mut sealer, &frames, &mut out);
                        records = 1;
                    }
                    Err(_) => {
                        // Idle: a record with no frames, padded like any other.
                        seal(&mut sealer, &[], &mut out);
                        records = 1;
                    }
                }
            }
            wr.write_all(&out).await?;
            self.0.metrics.wire_sent_bytes.inc_by(out.len() as u64);
            self.0.metrics.records_sent.inc_by(records as u64);
        }
    }

    /// Opens a stream to `target` and carries `socket` through it (client side).
    /// Returns once the stream is queued; the stream runs in its own task.
    pub fn open_stream(
        &self,
        socket: TcpStream,
        target: &str,
        policy: CompressPolicy,
    ) -> Result<u32> {
        if self.is_closed() {
            return Err(TunnelError::Closed);
        }
        // The OPEN waits (briefly) for the application's first bytes, to share their
        // record: one padded record per new stream instead of two.
        let id = self.with(|m| m.open_held(Bytes::copy_from_slice(target.as_bytes()), policy))?;
        let s = self.clone();
        tokio::spawn(async move { s.carry(id, socket, policy, true).await });
        Ok(id)
    }

    /// Carries `socket` through stream `id` until both directions are done.
    pub async fn run_stream(&self, id: u32, socket: TcpStream, policy: CompressPolicy) {
        self.carry(id, socket, policy, false).await
    }

    /// `held_open`: the stream's OPEN waits in the mux for the first read.
    async fn carry(&self, id: u32, socket: TcpStream, policy: CompressPolicy, held_open: bool) {
        let _ = socket.set_nodelay(true);
        let waker = Arc::new(StreamWaker::default());
        self.0
            .state
            .lock()
            .expect("session lock")
            .streams
            .insert(id, waker.clone());
        self.0.metrics.streams_opened.inc();
        self.0.metrics.streams_open.inc();
        let (rd, wr) = socket.into_split();
        tokio::join!(
            self.pump_in(id, rd, policy, &waker, held_open),
            self.pump_out(id, wr, &waker)
        );
        self.0
            .state
            .lock()
            .expect("session lock")
            .streams
            .remove(&id);
        self.0.metrics.streams_open.dec();
    }

    /// Resets a stream (its target could not be reached, say).
    pub fn reset_stream(&self, id: u32, code: ResetCode) {
        self.with(|m| m.reset(id, code));
    }

    async fn pump_in(
        &self,
        id: u32,
        mut rd: tokio::net::tcp::OwnedReadHalf,
        policy: CompressPolicy,
        waker: &StreamWaker,
        held_open: bool,
    ) {
        let mut comp = Compressor::new(policy, self.0.cfg.compress_level);
        let m = &self.0.metrics;
        // While the OPEN is held: when it must go even if the application is silent
        // (it waits for the far end to speak first).
        let mut hold =
            held_open.then(|| tokio::time::Instant::now() + Duration::from_millis(OPEN_HOLD_MS));
        loop {
            let credit = match self.with(|mux| mux.send_credit(id)) {
                Err(_) => return,
                Ok(0) => {
                    waker.send.notified().await;
                    continue;
                }
                Ok(c) => c,
            };
            let want = (credit as usize).min(STREAM_CHUNK_BYTES_MAX);
            // Not zeroed: reads fill it, and never past `want` (the credit).
            let mut buf = chunk_pool().take();
            let mut room = (&mut buf).limit(want);
            let n = tokio::select! {
                r = rd.read_buf(&mut room) => r,
                // Woken while reading: the stream may have been reset.
                _ = waker.send.notified() => continue,
                _ = tokio::time::sleep_until(hold.unwrap_or_else(tokio::time::Instant::now)),
                    if hold.is_some() =>
                {
                    hold = None;
                    self.with(|mux| mux.release_open(id));
                    continue;
                }
            };
            // Data, end of file or an error: each sends (or drops) the OPEN with it.
            hold = None;
            match n {
                Ok(0) => {
                    let _ = self.with(|mux| mux.send_fin(id));
                    return;
                }
                Ok(_) => {
                    // Whatever else is already there joins this chunk, and an end of
                    // file right behind it joins its record as a FIN: fewer, fuller
                    // records (each small one is padded) and better compression.
                    let mut eof = false;
                    while buf.len() < want {
                        let room = want - buf.len();
                        match rd.try_read_buf(&mut (&mut buf).limit(room)) {
                            Ok(0) => {
                                eof = true;
                                break;
                            }
                            Ok(_) => {}
                            // WouldBlock, or an error the next read reports.
                            Err(_) => break,
                        }
                    }
                    let n = buf.len();
                    assert!(n <= want, "read past the stream's credit");
                    m.carried_sent_bytes.inc_by(n as u64);
                    let chunk = comp.chunk(chunk_pool().freeze(buf));
                    if chunk.compressed {
                        m.chunks_compressed.inc();
                    } else {
                        m.chunks_plain.inc();
                    }
                    // Other streams may have used the session's window meanwhile:
                    // then the chunk waits here (one per stream at most) for credit.
                    let mut chunk = chunk;
                    loop {
                        let sent = self.with(|mux| {
                            let sent = mux.send_data(id, chunk)?;
                            if eof && sent == Sent::Queued {
                                mux.send_fin(id)?;
                            }
                            Ok::<_, TunnelError>(sent)
                        });
                        match sent {
                            Err(_) => return,
                            Ok(Sent::Queued) => break,
                            Ok(Sent::Blocked(back)) => {
                                chunk = back;
                                waker.send.notified().await;
                            }
                        }
                    }
                    if eof {
                        return;
                    }
                }
                Err(_) => {
                    self.reset_stream(id, ResetCode::Cancel);
                    return;
                }
            }
        }
    }

    async fn pump_out(
        &self,
        id: u32,
        mut wr: tokio::net::tcp::OwnedWriteHalf,
        waker: &StreamWaker,
    ) {
        let mut dec = Decompressor::new();
        loop {
            match self.with(|m| m.poll_recv(id)) {
                None => waker.recv.notified().await,
                Some(Delivery::Data(chunk)) => {
                    let raw_len = chunk.raw_len as u64;
                    let raw = match dec.raw(chunk) {
                        Ok(r) => r,
                        Err(e) => {
                            tracing::debug!("stream {id}: {e}");
                            self.reset_stream(id, ResetCode::Cancel);
                            return;
                        }
                    };
                    if wr.write_all(&raw).await.is_err() {
                        self.reset_stream(id, ResetCode::Cancel);
                        return;
                    }
                    self.0.metrics.carried_received_bytes.inc_by(raw_len);
                    self.with(|m| m.consumed(id, raw_len));
                }
                Some(Delivery::Fin) => {
                    let _ = wr.shutdown().await;
                    return;
                }
                Some(Delivery::Reset(_)) => return,
            }
        }
    }
}
