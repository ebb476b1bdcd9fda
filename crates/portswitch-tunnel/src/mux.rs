//! The multiplexer: many streams over a pool of connections, as a pure state machine.
//!
//! No I/O and no clock. The driver (`session`) owns sockets and calls, under one lock:
//!
//! - inputs: [`Mux::open`] or [`Mux::open_held`] then [`Mux::release_open`]
//!   (client), [`Mux::send_data`] / [`Mux::send_fin`] /
//!   [`Mux::reset`] (a stream's socket was read), [`Mux::consumed`] (delivered bytes
//!   were written to a stream's socket), [`Mux::handle_record`] (a record's frames
//!   arrived on a connection), [`Mux::conn_added`] / [`Mux::conn_lost`];
//! - outputs: [`Mux::poll_transmit`] (the frames of the next record for a connection:
//!   each non-empty answer must be sealed and written as exactly one record, in
//!   order), [`Mux::poll_recv`] (what to write to a stream's socket next),
//!   [`Mux::send_credit`], and [`Mux::take_wakeups`] (which tasks have work now);
//! - acknowledgements are delayed: [`Mux::poll_transmit`] puts one in a record that
//!   goes out anyway, or sends it alone once [`ACK_RECORDS_MAX`] records wait for
//!   it. When `poll_transmit` has nothing and [`Mux::ack_pending`] is true, the
//!   driver waits at most [`ACK_DELAY_MS`] for other work, then sends the record
//!   [`Mux::poll_ack`] gives. (A lone acknowledgement is a whole padded record on the
//!   wire: acknowledging each record at once cost more bytes than small documents
//!   compressed to.)
//!
//! Reliability across connections: ordered frames (OPEN, DATA, FIN) carry a stream
//! sequence number and wait in a reorder buffer until the gap before them is filled.
//! Each connection counts the records it receives and acknowledges them (ACK) on
//! that connection; a sender keeps every record's frames until acknowledged, and when
//! a connection is lost they are sent again on the others. Duplicates are dropped by
//! sequence number.
//!
//! Flow control: a stream may have at most its window of carried (uncompressed) bytes
//! sent and not yet written out by the far end, and all streams together at most the
//! session window; the far end advertises absolute limits (WINDOW, SESSION_WINDOW) as
//! it writes. A connection holds at most `conn_unacked_bytes_max` unacknowledged.
//!
//! ```
//! use portswitch_tunnel::mux::{Chunk, Delivery, Mux, MuxConfig, Role};
//! use portswitch_tunnel::frame::CompressPolicy;
//! let (mut c, mut s) = (Mux::new(Role::Client, MuxConfig::default()), Mux::new(Role::Server, MuxConfig::default()));
//! c.conn_added(1);
//! s.conn_added(1);
//! let id = c.open(b"example.com:80".to_vec().into(), CompressPolicy::Never).unwrap();
//! c.send_data(id, Chunk::plain(b"GET /".to_vec().into())).unwrap();
//! let frames = c.poll_transmit(1, 60_000);
//! s.handle_record(1, frames).unwrap();
//! let opened = s.take_wakeups().opened;
//! assert_eq!(opened[0].target.as_ref(), b"example.com:80");
//! assert!(matches!(s.poll_recv(id), Some(Delivery::Data(d)) if d.payload.as_ref() == b"GET /"));
//! ```

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};

use bytes::Bytes;

use crate::error::{Result, TunnelError};
use crate::frame::{CompressPolicy, Frame, ResetCode, FLAG_COMPRESSED};
pub use crate::limits::{ACK_DELAY_MS, ACK_RECORDS_MAX};
use crate::limits::{
    CLOSED_STREAM_IDS_MAX, CONN_UNACKED_BYTES_MAX, REORDER_FRAMES_MAX,
    SESSION_WINDOW_BYTES_DEFAULT, STREAMS_PER_SESSION_MAX, STREAM_CHUNK_BYTES_MAX,
    STREAM_WINDOW_AUTO_MAX_BYTES_DEFAULT, STREAM_WINDOW_BYTES_DEFAULT, TARGET_BYTES_MAX,
};

pub type ConnId = u64;

/// What both ends assume before any WINDOW frame: the protocol's starting windows.
pub const STREAM_WINDOW_INITIAL_BYTES: u64 = 256 * 1024;
pub const SESSION_WINDOW_INITIAL_BYTES: u64 = 4 << 20;
const _: () = assert!(STREAM_WINDOW_INITIAL_BYTES >= STREAM_CHUNK_BYTES_MAX as u64);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Opens streams.
    Client,
    /// Accepts them.
    Server,
}

#[derive(Debug, Clone)]
pub struct MuxConfig {
    /// A stream's receive window at first.
    pub stream_window_bytes: u64,
    /// What auto-tuning may raise a stream's window to.
    pub stream_window_max_bytes: u64,
    pub session_window_bytes: u64,
    pub streams_max: usize,
    pub conn_unacked_bytes_max: usize,
}

impl Default for MuxConfig {
    fn default() -> Self {
        MuxConfig {
            stream_window_bytes: STREAM_WINDOW_BYTES_DEFAULT,
            stream_window_max_bytes: STREAM_WINDOW_AUTO_MAX_BYTES_DEFAULT,
            session_window_bytes: SESSION_WINDOW_BYTES_DEFAULT,
            streams_max: STREAMS_PER_SESSION_MAX,
            conn_unacked_bytes_max: CONN_UNACKED_BYTES_MAX,
        }
    }
}

/// What [`Mux::send_data`] did with a chunk.
#[derive(Debug, PartialEq, Eq)]
pub enum Sent {
    /// Queued for sending.
    Queued,
    /// Not covered by the credit any more: offer it again once woken.
    Blocked(Chunk),
}

/// A piece of a stream: `raw_len` carried bytes, compressed or not.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chunk {
    pub payload: Bytes,
    pub raw_len: u32,
    pub compressed: bool,
}

impl Chunk {
    pub fn plain(payload: Bytes) -> Chunk {
        Chunk {
            raw_len: payload.len() as u32,
            payload,
            compressed: false,
        }
    }
}

/// What a stream's socket gets next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Delivery {
    Data(Chunk),
    /// The far end finished sending (half-close).
    Fin,
    /// The stream is gone: reset by either end, or the session ended.
    Reset(ResetCode),
}

/// A stream the far end opened (server side).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Opened {
    pub stream: u32,
    pub target: Bytes,
    pub policy: CompressPolicy,
}

/// Which tasks have something to do, collected since the last `take_wakeups`.
#[derive(Debug, Default)]
pub struct Wakeups {
    /// Streams with something to deliver (or reset).
    pub recv: Vec<u32>,
    /// Streams that were waiting for credit and have some (or were reset).
    pub send: Vec<u32>,
    /// Connections whose writer should poll.
    pub conns: Vec<ConnId>,
    pub opened: Vec<Opened>,
}

/// Counters the driver exports as metrics.
#[derive(Debug, Default, Clone)]
pub struct MuxStats {
    pub frames_retransmitted: u64,
    pub frames_duplicate: u64,
    pub streams_opened: u64,
    pub streams_refused: u64,
}

struct Stream {
    policy: CompressPolicy,
    // Sending.
    queue: VecDeque<Frame>,
    send_seq: u64,
    send_offset: u64,
    send_limit: u64,
    send_blocked: bool,
    fin_queued: bool,
    in_ready: bool,
    // Receiving.
    recv_next: u64,
    reorder: BTreeMap<u64, Frame>,
    deliver: VecDeque<Delivery>,
    recv_total: u64,
    recv_limit: u64,
    recv_consumed: u64,
    /// The window granted on each update: starts at the configured window and doubles
    /// (up to the configured maximum) while the reader keeps up.
    recv_window: u64,
    read_done: bool,
}

impl Stream {
    fn new(policy: CompressPolicy, recv_limit: u64) -> Stream {
        Stream {
            policy,
            queue: VecDeque::new(),
            send_seq: 0,
            send_offset: 0,
            send_limit: STREAM_WINDOW_INITIAL_BYTES,
            send_blocked: false,
            fin_queued: false,
            in_ready: false,
            recv_next: 0,
            reorder: BTreeMap::new(),
            deliver: VecDeque::new(),
            recv_total: 0,
            recv_limit,
            recv_consumed: 0,
            recv_window: recv_limit,
            read_done: false,
        }
    }
}

#[derive(Default)]
struct Conn {
    sent_records: u64,
    unacked: VecDeque<(u64, Vec<Frame>, usize)>,
    unacked_bytes: usize,
    recv_records: u64,
    acked_to_peer: u64,
    idle: bool,
}

/// Closed stream ids, so late copies of their frames are dropped rather than taken
/// for a new stream. Bounded: past the limit the oldest ids fold into `floor`, below
/// which every unknown id counts as closed.
#[derive(Default)]
struct ClosedIds {
    floor: u32,
    ids: BTreeSet<u32>,
}

impl ClosedIds {
    fn contains(&self, id: u32) -> bool {
        id < self.floor || self.ids.contains(&id)
    }

    fn insert(&mut self, id: u32) {
        if id >= self.floor {
            self.ids.insert(id);
        }
        while self.ids.len() > CLOSED_STREAM_IDS_MAX {
            if let Some(first) = self.ids.pop_first() {
                self.floor = self.floor.max(first.saturating_add(1));
            }
        }
    }
}

pub struct Mux {
    role: Role,
    cfg: MuxConfig,
    streams: HashMap<u32, Stream>,
    closed: ClosedIds,
    next_stream: u32,
    ready: VecDeque<u32>,
    control: VecDeque<Frame>,
    retransmit: VecDeque<Frame>,
    session_send_limit: u64,
    session_sent: u64,
    session_recv_limit: u64,
    session_recv_total: u64,
    session_consumed: u64,
    conns: HashMap<ConnId, Conn>,
    wake: Wakeups,
    stats: MuxStats,
}

impl Mux {
    pub fn new(role: Role, cfg: MuxConfig) -> Mux {
        let mut m = Mux {
            role,
            streams: HashMap::new(),
            closed: ClosedIds::default(),
            next_stream: 1,
            ready: VecDeque::new(),
            control: VecDeque::new(),
            retransmit: VecDeque::new(),
            session_send_limit: SESSION_WINDOW_INITIAL_BYTES,
            session_sent: 0,
            session_recv_limit: SESSION_WINDOW_INITIAL_BYTES,
            session_recv_total: 0,
            session_consumed: 0,
            conns: HashMap::new(),
            wake: Wakeups::default(),
            stats: MuxStats::default(),
            cfg,
        };
        if m.cfg.session_window_bytes > SESSION_WINDOW_INITIAL_BYTES {
            m.session_recv_limit = m.cfg.session_window_bytes;
            m.control.push_back(Frame::SessionWindow {
                limit: m.session_recv_limit,
            });
        }
        m
    }

    pub fn stats(&self) -> &MuxStats {
        &self.stats
    }

    pub fn streams(&self) -> usize {
        self.streams.len()
    }

    pub fn conns(&self) -> usize {
        self.conns.len()
    }

    pub fn take_wakeups(&mut self) -> Wakeups {
        std::mem::take(&mut self.wake)
    }

    fn wake_writer(&mut self, only: Option<ConnId>) {
        match only {
            Some(c) => {
                if let Some(conn) = self.conns.get_mut(&c) {
                    if conn.idle {
                        conn.idle = false;
                        self.wake.conns.push(c);
                    }
                }
            }
            None => {
                // One idle writer is enough for new work; busy ones poll again anyway.
                if let Some((&c, conn)) = self.conns.iter_mut().find(|(_, c)| c.idle) {
                    conn.idle = false;
                    self.wake.conns.push(c);
                }
            }
        }
    }

    fn wake_all_writers(&mut self) {
        for (&c, conn) in self.conns.iter_mut() {
            if conn.idle {
                conn.idle = false;
                self.wake.conns.push(c);
            }
        }
    }

    // ---- streams, local side ----

    /// Opens a stream to `target` (client side); its OPEN goes out at once.
    pub fn open(&mut self, target: Bytes, policy: CompressPolicy) -> Result<u32> {
        let id = self.open_held(target, policy)?;
        self.release_open(id);
        Ok(id)
    }

    /// Opens a stream whose OPEN waits for its first data or FIN (so they travel in
    /// one record), or for [`Mux::release_open`], whichever comes first.
    pub fn open_held(&mut self, target: Bytes, policy: CompressPolicy) -> Result<u32> {
        assert!(self.role == Role::Client, "only clients open streams");
        if target.len() > TARGET_BYTES_MAX {
            return Err(TunnelError::TooLong {
                what: "target",
                len: target.len(),
                max: TARGET_BYTES_MAX,
            });
        }
        if self.streams.len() >= self.cfg.streams_max {
            return Err(TunnelError::Limit("streams per session"));
        }
        let id = self.next_stream;
        self.next_stream = self
            .next_stream
            .checked_add(1)
            .ok_or(TunnelError::Limit("stream ids"))?;
        let mut s = Stream::new(
            policy,
            self.cfg
                .stream_window_bytes
                .max(STREAM_WINDOW_INITIAL_BYTES),
        );
        s.queue.push_back(Frame::Open {
            stream: id,
            seq: 0,
            policy,
            window: s.recv_limit,
            target,
        });
        s.send_seq = 1;
        self.streams.insert(id, s);
        self.stats.streams_opened += 1;
        Ok(id)
    }

    /// Sends a held OPEN now (the application has not spoken first).
    pub fn release_open(&mut self, id: u32) {
        self.mark_ready(id);
    }

    fn mark_ready(&mut self, id: u32) {
        if let Some(s) = self.streams.get_mut(&id) {
            if !s.in_ready && !s.queue.is_empty() {
                s.in_ready = true;
                self.ready.push_back(id);
                self.wake_writer(None);
            }
        }
    }

    /// Carried bytes the stream may send now. `Err(Closed)` once it is gone.
    pub fn send_credit(&mut self, id: u32) -> Result<u64> {
        let session = self.session_send_limit.saturating_sub(self.session_sent);
        let s = self.streams.get_mut(&id).ok_or(TunnelError::Closed)?;
        let credit = s.send_limit.saturating_sub(s.send_offset).min(session);
        s.send_blocked = credit == 0;
        Ok(credit)
    }

    /// The compression policy the stream was opened with.
    pub fn policy(&self, id: u32) -> Option<CompressPolicy> {
        self.streams.get(&id).map(|s| s.policy)
    }

    /// Queues a chunk read from the stream's socket, or hands it back when the credit
    /// no longer covers it: the session's window is shared, and other streams may have
    /// used it while this one was reading. The stream is then woken (its `send`
    /// wakeup) when a window opens, and offers the chunk again.
    pub fn send_data(&mut self, id: u32, chunk: Chunk) -> Result<Sent> {
        let session_credit = self.session_send_limit.saturating_sub(self.session_sent);
        let s = self.streams.get_mut(&id).ok_or(TunnelError::Closed)?;
        let raw = chunk.raw_len as u64;
        if s.fin_queued {
            return Err(TunnelError::Closed);
        }
        if raw > s.send_limit.saturating_sub(s.send_offset) || raw > session_credit {
            s.send_blocked = true;
            return Ok(Sent::Blocked(chunk));
        }
        assert!(
            chunk.payload.len() <= STREAM_CHUNK_BYTES_MAX && raw as usize <= STREAM_CHUNK_BYTES_MAX
        );
        s.send_offset += raw;
        self.session_sent += raw;
        s.queue.push_back(Frame::Data {
            stream: id,
            seq: s.send_seq,
            flags: if chunk.compressed { FLAG_COMPRESSED } else { 0 },
            raw_len: chunk.raw_len,
            payload: chunk.payload,
        });
        s.send_seq += 1;
        self.mark_ready(id);
        Ok(Sent::Queued)
    }

    /// The stream's socket reached end of file: half-close towards the far end.
    pub fn send_fin(&mut self, id: u32) -> Result<()> {
        let s = self.streams.get_mut(&id).ok_or(TunnelError::Closed)?;
        if s.fin_queued {
            return Ok(());
        }
        s.fin_queued = true;
        s.queue.push_back(Frame::Fin {
            stream: id,
            seq: s.send_seq,
        });
        s.send_seq += 1;
        self.mark_ready(id);
        Ok(())
    }

    /// Aborts a stream in both directions.
    pub fn reset(&mut self, id: u32, code: ResetCode) {
        if self.streams.contains_key(&id) {
            self.control.push_back(Frame::Rst { stream: id, code });
            self.remove(id, Some(code));
            self.wake_writer(None);
        }
    }

    /// Ends every stream (the session is over).
    pub fn reset_all(&mut self) {
        let ids: Vec<u32> = self.streams.keys().copied().collect();
        for id in ids {
            self.remove(id, Some(ResetCode::Session));
        }
    }

    fn remove(&mut self, id: u32, reset: Option<ResetCode>) {
        let Some(s) = self.streams.remove(&id) else {
            return;
        };
        self.closed.insert(id);
        // Bytes granted to the session but never to be consumed or sent: give them
        // back, or the session window would shrink for good.
        let unsent: u64 = s
            .queue
            .iter()
            .map(|f| match f {
                Frame::Data { raw_len, .. } => *raw_len as u64,
                _ => 0,
            })
            .sum();
        self.session_sent -= unsent;
        let unconsumed = s.recv_total - s.recv_consumed;
        self.credit_session(unconsumed);
        if reset.is_some() {
            self.wake.recv.push(id);
            self.wake.send.push(id);
        }
    }

    fn maybe_finished(&mut self, id: u32) {
        if let Some(s) = self.streams.get(&id) {
            if s.fin_queued && s.queue.is_empty() && s.read_done {
                self.remove(id, None);
            }
        }
    }

    /// The next thing to write to the stream's socket; `None` when nothing yet.
    pub fn poll_recv(&mut self, id: u32) -> Option<Delivery> {
        let Some(s) = self.streams.get_mut(&id) else {
            return Some(Delivery::Reset(ResetCode::Cancel));
        };
        let d = s.deliver.pop_front();
        if d == Some(Delivery::Fin) {
            s.read_done = true;
            self.maybe_finished(id);
        }
        d
    }

    /// `raw_len` carried bytes of the stream were written out: grant more.
    pub fn consumed(&mut self, id: u32, raw_len: u64) {
        let most = self
            .cfg
            .stream_window_max_bytes
            .max(self.cfg.stream_window_bytes)
            .max(STREAM_WINDOW_INITIAL_BYTES);
        if let Some(s) = self.streams.get_mut(&id) {
            s.recv_consumed += raw_len;
            assert!(s.recv_consumed <= s.recv_total);
            if s.recv_limit - s.recv_consumed <= s.recv_window / 2 {
                // Auto-tuning: half the window is used and almost nothing waits for
                // the reader, so the window (in flight over the round trip), not the
                // reader, limits this stream: double it. A stalled or slow reader has
                // data waiting and keeps its window.
                let waiting = s.recv_total - s.recv_consumed;
                if waiting <= s.recv_window / 8 && s.recv_window < most {
                    s.recv_window = (s.recv_window * 2).min(most);
                }
                s.recv_limit = s.recv_consumed + s.recv_window;
                self.control.push_back(Frame::Window {
                    stream: id,
                    limit: s.recv_limit,
                });
                self.wake_writer(None);
            }
        }
        self.credit_session(raw_len);
    }

    fn credit_session(&mut self, raw_len: u64) {
        if raw_len == 0 {
            return;
        }
        let window = self
            .cfg
            .session_window_bytes
            .max(SESSION_WINDOW_INITIAL_BYTES);
        self.session_consumed += raw_len;
        if self.session_recv_limit - self.session_consumed.min(self.session_recv_limit)
            <= window / 2
        {
            self.session_recv_limit = self.session_consumed + window;
            self.control.push_back(Frame::SessionWindow {
                limit: self.session_recv_limit,
            });
            self.wake_writer(None);
        }
    }

    // ---- connections ----

    pub fn conn_added(&mut self, c: ConnId) {
        self.conns.insert(c, Conn::default());
        self.wake.conns.push(c);
    }

    /// A connection died: what it carried unacknowledged goes out again on others.
    pub fn conn_lost(&mut self, c: ConnId) {
        let Some(conn) = self.conns.remove(&c) else {
            return;
        };
        let mut again = Vec::new();
        for (_, frames, _) in conn.unacked {
            again.extend(frames);
        }
        self.stats.frames_retransmitted += again.len() as u64;
        // Older frames first: the far end is most likely waiting for them.
        for f in again.into_iter().rev() {
            self.retransmit.push_front(f);
        }
        self.wake_all_writers();
    }

    /// Whether records received on `c` wait for an acknowledgement. The driver sends
    /// [`Mux::poll_ack`] at most [`ACK_DELAY_MS`] after this became true, unless a
    /// record of [`Mux::poll_transmit`] carried it first.
    pub fn ack_pending(&self, c: ConnId) -> bool {
        self.conns
            .get(&c)
            .is_some_and(|k| k.recv_records > k.acked_to_peer)
    }

    /// A record holding only the pending acknowledgement of `c` (empty if none).
    pub fn poll_ack(&mut self, c: ConnId) -> Vec<Frame> {
        match self.conns.get_mut(&c) {
            Some(k) if k.recv_records > k.acked_to_peer => {
                k.acked_to_peer = k.recv_records;
                vec![Frame::Ack {
                    records: k.recv_records,
                }]
            }
            _ => Vec::new(),
        }
    }

    /// Frames for the next record on `c`, at most `budget` encoded bytes; empty when
    /// there is nothing to send (the writer then waits for a wakeup, or for the
    /// acknowledgement delay when [`Mux::ack_pending`]). A pending acknowledgement
    /// rides along with anything else; alone it goes only once
    /// [`ACK_RECORDS_MAX`] records wait for it.
    pub fn poll_transmit(&mut self, c: ConnId, budget: usize) -> Vec<Frame> {
        let mut out = Vec::new();
        let Some(conn) = self.conns.get(&c) else {
            return out;
        };
        let ack_due = conn.recv_records > conn.acked_to_peer;
        // Room for the acknowledgement is kept whether or not it goes.
        let mut used = if ack_due {
            Frame::Ack { records: 0 }.encoded_len()
        } else {
            0
        };
        let room = |used: usize, f: &Frame| used + f.encoded_len() <= budget;
        while let Some(f) = self.control.front() {
            if !room(used, f) {
                break;
            }
            used += f.encoded_len();
            out.extend(self.control.pop_front());
        }
        let unacked_ok = |m: &Mux| {
            m.conns
                .get(&c)
                .is_some_and(|k| k.unacked_bytes < m.cfg.conn_unacked_bytes_max)
        };
        while let Some(f) = self.retransmit.front() {
            if !room(used, f) || !unacked_ok(self) {
                break;
            }
            used += f.encoded_len();
            out.extend(self.retransmit.pop_front());
        }
        // Streams take turns, a frame each.
        let mut turns = self.ready.len();
        while turns > 0 && unacked_ok(self) {
            turns -= 1;
            let Some(id) = self.ready.pop_front() else {
                break;
            };
            let Some(s) = self.streams.get_mut(&id) else {
                continue;
            };
            let fits = s.queue.front().is_some_and(|f| room(used, f));
            if fits {
                if let Some(f) = s.queue.pop_front() {
                    used += f.encoded_len();
                    out.push(f);
                }
            }
            if s.queue.is_empty() {
                s.in_ready = false;
                self.maybe_finished(id);
            } else {
                self.ready.push_back(id);
                if fits {
                    turns = self.ready.len();
                }
            }
        }
        let conn = self.conns.get_mut(&c).expect("checked above");
        if out.is_empty() {
            if conn.recv_records - conn.acked_to_peer >= ACK_RECORDS_MAX {
                // An acknowledgement alone is not itself acknowledged (or acks would
                // bounce for ever), so it is not counted either.
                conn.acked_to_peer = conn.recv_records;
                return vec![Frame::Ack {
                    records: conn.recv_records,
                }];
            }
            conn.idle = true;
            return out;
        }
        let bytes: usize = out.iter().map(Frame::encoded_len).sum();
        conn.sent_records += 1;
        conn.unacked_bytes += bytes;
        conn.unacked
            .push_back((conn.sent_records, out.clone(), bytes));
        if ack_due {
            conn.acked_to_peer = conn.recv_records;
            out.insert(
                0,
                Frame::Ack {
                    records: conn.recv_records,
                },
            );
        }
        out
    }

    // ---- receiving ----

    /// The frames of one record that arrived on `c`. An error means the peer broke
    /// the protocol: end the session.
    pub fn handle_record(&mut self, c: ConnId, frames: Vec<Frame>) -> Result<()> {
        // Keepalives (no frames) and bare acknowledgements are not counted: the
        // sender does not count them either.
        if frames.iter().any(|f| !matches!(f, Frame::Ack { .. })) {
            if let Some(conn) = self.conns.get_mut(&c) {
                conn.recv_records += 1;
                let waiting = conn.recv_records - conn.acked_to_peer;
                // The writer starts the acknowledgement delay at the first record,
                // and sends at once at the threshold.
                if waiting == 1 || waiting == ACK_RECORDS_MAX {
                    self.wake_writer(Some(c));
                }
            }
        }
        for f in frames {
            self.handle_frame(c, f)?;
        }
        Ok(())
    }

    fn handle_frame(&mut self, c: ConnId, f: Frame) -> Result<()> {
        match f {
            Frame::Ack { records } => {
                if let Some(conn) = self.conns.get_mut(&c) {
                    if records > conn.sent_records {
                        return Err(TunnelError::malformed("ACK", "beyond what was sent"));
                    }
                    while conn.unacked.front().is_some_and(|(n, _, _)| *n <= records) {
                        if let Some((_, _, b)) = conn.unacked.pop_front() {
                            conn.unacked_bytes -= b;
                        }
                    }
                    self.wake_writer(Some(c));
                }
            }
            Frame::Window { stream, limit } => {
                if let Some(s) = self.streams.get_mut(&stream) {
                    if limit > s.send_limit {
                        s.send_limit = limit;
                        if s.send_blocked {
                            s.send_blocked = false;
                            self.wake.send.push(stream);
                        }
                    }
                }
            }
            Frame::SessionWindow { limit } => {
                if limit > self.session_send_limit {
                    self.session_send_limit = limit;
                    for (&id, s) in self.streams.iter_mut() {
                        if s.send_blocked {
                            s.send_blocked = false;
                            self.wake.send.push(id);
                        }
                    }
                }
            }
            Frame::Rst { stream, .. } => {
                if let Some(code) = match &f {
                    Frame::Rst { code, .. } => Some(*code),
                    _ => None,
                } {
                    self.remove(stream, Some(code));
                }
            }
            Frame::Open { .. } | Frame::Data { .. } | Frame::Fin { .. } => {
                self.handle_ordered(f)?
            }
        }
        Ok(())
    }

    fn handle_ordered(&mut self, f: Frame) -> Result<()> {
        let (id, seq) = f.ordered().expect("an ordered frame");
        if !self.streams.contains_key(&id) {
            if self.closed.contains(id) || self.role == Role::Client {
                // A late copy for a stream that is gone: its bytes were granted to the
                // session by the peer, so give them back to it.
                self.stats.frames_duplicate += 1;
                if let Frame::Data { raw_len, .. } = f {
                    self.credit_session(raw_len as u64);
                }
                return Ok(());
            }
            if self.streams.len() >= self.cfg.streams_max {
                self.stats.streams_refused += 1;
                self.closed.insert(id);
                self.control.push_back(Frame::Rst {
                    stream: id,
                    code: ResetCode::Refused,
                });
                if let Frame::Data { raw_len, .. } = f {
                    self.credit_session(raw_len as u64);
                }
                self.wake_writer(None);
                return Ok(());
            }
            let recv_limit = self
                .cfg
                .stream_window_bytes
                .max(STREAM_WINDOW_INITIAL_BYTES);
            if recv_limit > STREAM_WINDOW_INITIAL_BYTES {
                self.control.push_back(Frame::Window {
                    stream: id,
                    limit: recv_limit,
                });
            }
            self.streams
                .insert(id, Stream::new(CompressPolicy::Auto, recv_limit));
            self.stats.streams_opened += 1;
        }
        let s = self.streams.get_mut(&id).expect("present");
        if seq < s.recv_next || s.reorder.contains_key(&seq) {
            self.stats.frames_duplicate += 1;
            return Ok(());
        }
        if seq - s.recv_next >= REORDER_FRAMES_MAX {
            return Err(TunnelError::FlowControl {
                what: "reorder buffer",
            });
        }
        if let Frame::Data { raw_len, .. } = f {
            s.recv_total += raw_len as u64;
            self.session_recv_total += raw_len as u64;
            if s.recv_total > s.recv_limit {
                return Err(TunnelError::FlowControl { what: "stream" });
            }
            if self.session_recv_total > self.session_recv_limit {
                return Err(TunnelError::FlowControl { what: "session" });
            }
        }
        if seq != s.recv_next {
            s.reorder.insert(seq, f);
            return Ok(());
        }
        let mut next = Some(f);
        let mut delivered = false;
        while let Some(f) = next {
            s.recv_next += 1;
            match f {
                Frame::Open {
                    target,
                    policy,
                    window,
                    ..
                } => {
                    s.policy = policy;
                    s.send_limit = s.send_limit.max(window);
                    if self.role == Role::Server {
                        self.wake.opened.push(Opened {
                            stream: id,
                            target,
                            policy,
                        });
                    }
                }
                Frame::Data {
                    flags,
                    raw_len,
                    payload,
                    ..
                } => {
                    s.deliver.push_back(Delivery::Data(Chunk {
                        payload,
                        raw_len,
                        compressed: flags & FLAG_COMPRESSED != 0,
                    }));
                    delivered = true;
                }
                Frame::Fin { .. } => {
                    s.deliver.push_back(Delivery::Fin);
                    delivered = true;
                }
                _ => unreachable!("only ordered frames are buffered"),
            }
            next = s.reorder.remove(&s.recv_next);
        }
        if delivered {
            self.wake.recv.push(id);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn pair() -> (Mux, Mux) {
        let cfg = MuxConfig::default();
        (
            Mux::new(Role::Client, cfg.clone()),
            Mux::new(Role::Server, cfg),
        )
    }

    /// Moves records between two muxes over `conns`, in an order the test chooses.
    fn pump(from: &mut Mux, to: &mut Mux, c: ConnId) -> bool {
        let frames = from.poll_transmit(c, 60_000);
        if frames.is_empty() {
            return false;
        }
        to.handle_record(c, frames).unwrap();
        true
    }

    fn drain(m: &mut Mux, id: u32) -> (Vec<u8>, bool) {
        let mut out = Vec::new();
        let mut fin = false;
        while let Some(d) = m.poll_recv(id) {
            match d {
                Delivery::Data(c) => {
                    m.consumed(id, c.raw_len as u64);
                    out.extend_from_slice(&c.payload);
                }
                Delivery::Fin => fin = true,
                Delivery::Reset(_) => break,
            }
        }
        (out, fin)
    }

    #[test]
    fn a_slow_stream_does_not_stall_another() {
        let (mut c, mut s) = pair();
        c.conn_added(1);
        s.conn_added(1);
        let slow = c
            .open(Bytes::from_static(b"a:1"), CompressPolicy::Never)
            .unwrap();
        let fast = c
            .open(Bytes::from_static(b"b:1"), CompressPolicy::Never)
            .unwrap();
        let chunk = Bytes::from(vec![1u8; 16 * 1024]);
        let mut fast_got = 0usize;
        for _ in 0..2000 {
            for id in [slow, fast] {
                if c.send_credit(id).unwrap() >= chunk.len() as u64 {
                    c.send_data(id, Chunk::plain(chunk.clone())).unwrap();
                }
            }
            while pump(&mut c, &mut s, 1) | pump(&mut s, &mut c, 1) {}
            // Only the fast stream's socket is written to.
            fast_got += drain(&mut s, fast).0.len();
        }
        // The slow stream stopped at its window; the fast one went on.
        assert_eq!(c.send_credit(slow).unwrap(), 0);
        // Every chunk offered on the fast stream went through: it never waited.
        assert_eq!(fast_got, 2000 * chunk.len());
        assert!(fast_got > 4 * STREAM_WINDOW_BYTES_DEFAULT as usize);
        assert!(s.streams[&slow].recv_total <= STREAM_WINDOW_BYTES_DEFAULT);
    }

    #[test]
    fn a_chunk_the_shared_session_credit_no_longer_covers_comes_back() {
        // Before the far end's first record, the session may send the initial 4 MiB.
        let (mut c, mut s) = pair();
        c.conn_added(1);
        s.conn_added(1);
        let chunk = |n: usize| Chunk::plain(Bytes::from(vec![7u8; n]));
        let a = c
            .open(Bytes::from_static(b"a:1"), CompressPolicy::Never)
            .unwrap();
        // Stream a sees credit and starts reading its socket...
        assert!(c.send_credit(a).unwrap() >= 1000);
        // ...while sixteen others use up the session's window.
        for i in 0..16 {
            let id = c
                .open(Bytes::from(format!("b{i}:1")), CompressPolicy::Never)
                .unwrap();
            while c.send_credit(id).unwrap() > 0 {
                let n = (c.send_credit(id).unwrap() as usize).min(STREAM_CHUNK_BYTES_MAX);
                assert_eq!(c.send_data(id, chunk(n)).unwrap(), Sent::Queued);
            }
        }
        assert_eq!(c.send_credit(a).unwrap(), 0);
        // a's chunk is handed back, not queued beyond the window (nor a panic).
        match c.send_data(a, chunk(1000)).unwrap() {
            Sent::Blocked(back) => assert_eq!(back.raw_len, 1000),
            Sent::Queued => panic!("queued beyond the session's window"),
        }
        c.take_wakeups();
        // The far end's window arrives: a is woken, and its chunk goes.
        settle(&mut c, &mut s, 1);
        assert!(c.take_wakeups().send.contains(&a));
        assert_eq!(c.send_data(a, chunk(1000)).unwrap(), Sent::Queued);
    }

    #[test]
    fn a_reader_that_keeps_up_gets_a_bigger_window_a_stalled_one_does_not() {
        let (mut c, mut s) = pair();
        c.conn_added(1);
        s.conn_added(1);
        let fast = c
            .open(Bytes::from_static(b"a:1"), CompressPolicy::Never)
            .unwrap();
        let stalled = c
            .open(Bytes::from_static(b"b:1"), CompressPolicy::Never)
            .unwrap();
        let chunk = Bytes::from(vec![1u8; STREAM_CHUNK_BYTES_MAX]);
        for _ in 0..2000 {
            for id in [fast, stalled] {
                let credit = c.send_credit(id).unwrap();
                if credit >= chunk.len() as u64 {
                    assert_eq!(
                        c.send_data(id, Chunk::plain(chunk.clone())).unwrap(),
                        Sent::Queued
                    );
                }
            }
            while pump(&mut c, &mut s, 1) | pump(&mut s, &mut c, 1) {}
            drain(&mut s, fast);
        }
        assert_eq!(
            s.streams[&fast].recv_window,
            STREAM_WINDOW_AUTO_MAX_BYTES_DEFAULT
        );
        assert_eq!(s.streams[&stalled].recv_window, STREAM_WINDOW_BYTES_DEFAULT);
        assert!(s.streams[&stalled].recv_total <= STREAM_WINDOW_BYTES_DEFAULT);
        // The sender sees the grown window as credit beyond the first one.
        assert!(c.streams[&fast].send_limit > STREAM_WINDOW_BYTES_DEFAULT * 2);
    }

    /// Pumps both ways until neither has a record to send.
    fn settle(c: &mut Mux, s: &mut Mux, conn: ConnId) {
        while pump(c, s, conn) | pump(s, c, conn) {}
    }

    #[test]
    fn acknowledgements_ride_along_or_wait_for_the_threshold() {
        let (mut c, mut s) = pair();
        c.conn_added(1);
        s.conn_added(1);
        let id = c
            .open(Bytes::from_static(b"t:1"), CompressPolicy::Never)
            .unwrap();
        settle(&mut c, &mut s, 1);
        // What settling left unacknowledged is acknowledged now (as the writers would
        // after the delay).
        let ack = s.poll_ack(1);
        c.handle_record(1, ack).unwrap();
        let ack = c.poll_ack(1);
        s.handle_record(1, ack).unwrap();
        let unacked = |m: &Mux| m.conns[&1].unacked.len();
        assert_eq!((unacked(&c), unacked(&s)), (0, 0));
        // The server's writer polls, finds nothing, and waits.
        assert!(s.poll_transmit(1, 60_000).is_empty());
        let (_, _) = (c.take_wakeups(), s.take_wakeups());
        // One record in: nothing goes back yet, but an acknowledgement is pending and
        // the writer was woken to start its delay.
        c.send_data(id, Chunk::plain(Bytes::from_static(b"x")))
            .unwrap();
        assert!(pump(&mut c, &mut s, 1));
        assert!(s.take_wakeups().conns.contains(&1));
        assert!(s.poll_transmit(1, 60_000).is_empty());
        assert!(s.ack_pending(1));
        let ack = s.poll_ack(1);
        assert_eq!(ack.len(), 1);
        c.handle_record(1, ack).unwrap();
        assert_eq!(unacked(&c), 0);
        assert!(!s.ack_pending(1) && s.poll_ack(1).is_empty());
        // Below the threshold no record goes back; at it, an acknowledgement alone.
        for i in 1..=ACK_RECORDS_MAX {
            c.send_data(id, Chunk::plain(Bytes::from_static(b"y")))
                .unwrap();
            assert!(pump(&mut c, &mut s, 1));
            let back = s.poll_transmit(1, 60_000);
            if i < ACK_RECORDS_MAX {
                assert!(back.is_empty(), "record {i}: {back:?}");
            } else {
                assert_eq!(
                    back,
                    vec![Frame::Ack {
                        records: s.conns[&1].recv_records
                    }]
                );
                c.handle_record(1, back).unwrap();
            }
        }
        assert_eq!(unacked(&c), 0);
        // A record that goes anyway carries the pending acknowledgement first.
        c.send_data(id, Chunk::plain(Bytes::from_static(b"z")))
            .unwrap();
        assert!(pump(&mut c, &mut s, 1));
        while s.poll_recv(id).is_some() {}
        s.send_data(id, Chunk::plain(Bytes::from_static(b"back")))
            .unwrap();
        let rec = s.poll_transmit(1, 60_000);
        assert!(matches!(rec[0], Frame::Ack { .. }), "{rec:?}");
        assert!(matches!(rec[1], Frame::Data { .. }), "{rec:?}");
        assert!(!s.ack_pending(1));
        c.handle_record(1, rec).unwrap();
        assert_eq!(unacked(&c), 0);
    }

    #[test]
    fn a_held_open_travels_with_the_first_data_or_when_released() {
        let (mut c, _) = pair();
        c.conn_added(1);
        // The session window grant, sent at the start.
        let _ = c.poll_transmit(1, 60_000);
        let a = c
            .open_held(Bytes::from_static(b"a:1"), CompressPolicy::Auto)
            .unwrap();
        assert!(c.poll_transmit(1, 60_000).is_empty(), "held");
        c.send_data(a, Chunk::plain(Bytes::from_static(b"GET /")))
            .unwrap();
        c.send_fin(a).unwrap();
        let rec = c.poll_transmit(1, 60_000);
        assert!(
            matches!(
                rec[..],
                [Frame::Open { .. }, Frame::Data { .. }, Frame::Fin { .. }]
            ),
            "{rec:?}"
        );
        let b = c
            .open_held(Bytes::from_static(b"b:22"), CompressPolicy::Auto)
            .unwrap();
        assert!(c.poll_transmit(1, 60_000).is_empty());
        c.release_open(b);
        assert!(matches!(
            c.poll_transmit(1, 60_000)[..],
            [Frame::Open { .. }]
        ));
    }

    #[test]
    fn a_peer_beyond_its_window_is_a_protocol_error() {
        let (mut c, mut s) = pair();
        s.conn_added(1);
        let big = Bytes::from(vec![0u8; STREAM_CHUNK_BYTES_MAX]);
        let mut r = Ok(());
        for seq in 1..=(2 * STREAM_WINDOW_BYTES_DEFAULT as usize / STREAM_CHUNK_BYTES_MAX + 2) {
            r = s.handle_record(
                1,
                vec![Frame::Data {
                    stream: 1,
                    seq: seq as u64,
                    flags: 0,
                    raw_len: big.len() as u32,
                    payload: big.clone(),
                }],
            );
            if r.is_err() {
                break;
            }
        }
        assert!(matches!(r, Err(TunnelError::FlowControl { .. })), "{r:?}");
        let _ = c.take_wakeups();
    }

    proptest! {
        /// Whatever the connections' order and whichever die, both directions arrive
        /// complete and in order.
        #[test]
        fn streams_survive_lost_connections(
            sizes in proptest::collection::vec(1usize..5000, 1..40),
            schedule in proptest::collection::vec((0u64..3, any::<bool>(), 0u8..20), 1..400),
        ) {
            let (mut c, mut s) = pair();
            let mut next_conn = 3u64;
            let mut live: Vec<ConnId> = vec![0, 1, 2];
            for &k in &live { c.conn_added(k); s.conn_added(k); }
            let id = c.open(Bytes::from_static(b"t:1"), CompressPolicy::Auto).unwrap();
            let mut sent = Vec::new();
            let mut to_send: VecDeque<usize> = sizes.iter().copied().collect();
            let mut got_s = Vec::new();
            let mut got_c = Vec::new();
            let mut sent_back = Vec::new();
            let mut fin = false;
            let mut step = 0;
            for (pick, dir, kill) in schedule.iter().copied().chain((0..4000u64).map(|i| (i % 3, i % 2 == 0, 1))) {
                step += 1;
                if let Some(&n) = to_send.front() {
                    if c.send_credit(id).unwrap() >= n as u64 {
                        let data: Vec<u8> = (0..n).map(|i| (i + sent.len()) as u8).collect();
                        sent.extend_from_slice(&data);
                        c.send_data(id, Chunk::plain(data.into())).unwrap();
                        to_send.pop_front();
                    }
                } else if !fin {
                    c.send_fin(id).unwrap();
                    fin = true;
                }
                let conn = live[(pick as usize) % live.len()];
                if kill == 0 && step < 300 {
                    // The connection dies: in flight both ways is lost.
                    c.conn_lost(conn); s.conn_lost(conn);
                    live.retain(|&k| k != conn);
                    c.conn_added(next_conn); s.conn_added(next_conn);
                    live.push(next_conn);
                    next_conn += 1;
                    continue;
                }
                if dir { pump(&mut c, &mut s, conn); } else { pump(&mut s, &mut c, conn); }
                let (d, _) = drain(&mut s, id);
                // Echo what arrives back, so both directions carry data (the
                // echo stays within the window: it is what the client sent).
                got_s.extend_from_slice(&d);
                sent_back.extend_from_slice(&d);
                for part in d.chunks(STREAM_CHUNK_BYTES_MAX) {
                    prop_assert!(s.send_credit(id).unwrap() >= part.len() as u64);
                    s.send_data(id, Chunk::plain(Bytes::copy_from_slice(part))).unwrap();
                }
                got_c.extend(drain(&mut c, id).0);
                if fin && got_s.len() == sent.len() && got_c.len() == sent.len() { break; }
            }
            prop_assert_eq!(&got_s, &sent);
            prop_assert_eq!(&got_c, &sent_back[..got_c.len()]);
            prop_assert_eq!(got_c.len(), sent.len());
        }
    }
}
