//! The mq wire protocol: length-prefixed frames, each carrying many messages, so a
//! client's batch of produces and settlements travels in one write.
//!
//! Frame: `len u32` (big-endian, bytes that follow, at most [`FRAME_BYTES_MAX`]), then
//! messages `op u8, id u32, body_len u32, body` (big-endian). A reply carries its
//! request's id; deliveries carry id 0. Strings and byte strings are `u32` length +
//! bytes; names are UTF-8 of at most [`NAME_BYTES_MAX`]. docs/MQ.md lists each body.

use bytes::{Buf, BufMut, Bytes, BytesMut};

pub const VERSION: u16 = 1;
pub const FRAME_BYTES_MAX: usize = 16 << 20;
/// Writers stop adding messages to a frame past this many bytes: frames stay within
/// buffers that are reused, rather than large ones allocated (and their pages faulted
/// in) per frame.
pub const COALESCE_BYTES: usize = 256 << 10;
pub const NAME_BYTES_MAX: usize = 200;
/// Messages in one PRODUCE or settlements in one SETTLE at most.
pub const BATCH_MAX: usize = 100_000;
/// Where a PRODUCE names no partition: the broker picks by key (or spreads).
pub const ANY_PARTITION: u16 = u16::MAX;

pub mod op {
    pub const HELLO: u8 = 0x01;
    pub const CREATE: u8 = 0x02;
    pub const DELETE: u8 = 0x03;
    pub const LIST: u8 = 0x04;
    pub const PRODUCE: u8 = 0x05;
    pub const SUBSCRIBE: u8 = 0x06;
    pub const CREDIT: u8 = 0x07;
    pub const SETTLE: u8 = 0x08;
    pub const STAT: u8 = 0x09;
    pub const UNSUBSCRIBE: u8 = 0x0A;
    /// Broker to broker: a replica asks a partition's leader for records.
    pub const FETCH: u8 = 0x0B;
    /// Broker to broker: a new leader fences a replica and asks what its log holds.
    pub const SURVEY: u8 = 0x0C;
    /// Broker to broker: open (or drop) a queue created on another broker of the group.
    pub const PEER_CREATE: u8 = 0x0D;
    pub const PEER_DELETE: u8 = 0x0E;
    /// Broker to broker: the leader of a partition replaces one of its replicas.
    pub const PEER_MOVE: u8 = 0x0F;
    /// Replace one broker of a queue's replicas by another, partition by partition.
    pub const MOVE: u8 = 0x10;
    pub const OK: u8 = 0x81;
    pub const ERROR: u8 = 0x82;
    pub const PRODUCED: u8 = 0x83;
    pub const SUBSCRIBED: u8 = 0x84;
    pub const LISTED: u8 = 0x85;
    pub const STATS: u8 = 0x86;
    pub const DELIVER: u8 = 0x87;
    pub const FETCHED: u8 = 0x88;
    pub const SURVEYED: u8 = 0x89;
}

/// Error codes on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u16)]
pub enum Code {
    BadRequest = 1,
    UnknownQueue = 2,
    QueueExists = 3,
    TooLarge = 4,
    /// Back-pressure: the partition's log is full until consumers settle.
    Full = 5,
    UnknownConsumer = 6,
    NotInFlight = 7,
    Limit = 8,
    Io = 9,
    /// The partition is not served here (its port is owned elsewhere).
    NotLeader = 10,
    Version = 11,
    /// A broker-to-broker request carried a fencing token below one already seen.
    Fenced = 12,
    /// Not confirmed: a majority of the partition's replicas did not answer in time
    /// (the message may still be kept: at-least-once, produce again).
    Unavailable = 13,
    /// A SUBSCRIBE's selector does not compile (the message has the compiler's
    /// position and excerpt) or is too long.
    BadSelector = 14,
    /// A SUBSCRIBE names a group whose state has another selector (or none).
    SelectorMismatch = 15,
}

impl Code {
    pub fn from_u16(v: u16) -> Option<Code> {
        use Code::*;
        [
            BadRequest,
            UnknownQueue,
            QueueExists,
            TooLarge,
            Full,
            UnknownConsumer,
            NotInFlight,
            Limit,
            Io,
            NotLeader,
            Version,
            Fenced,
            Unavailable,
            BadSelector,
            SelectorMismatch,
        ]
        .into_iter()
        .find(|c| *c as u16 == v)
    }

    pub fn name(self) -> &'static str {
        match self {
            Code::BadRequest => "bad_request",
            Code::UnknownQueue => "unknown_queue",
            Code::QueueExists => "queue_exists",
            Code::TooLarge => "too_large",
            Code::Full => "full",
            Code::UnknownConsumer => "unknown_consumer",
            Code::NotInFlight => "not_in_flight",
            Code::Limit => "limit",
            Code::Io => "io",
            Code::NotLeader => "not_leader",
            Code::Version => "version",
            Code::Fenced => "fenced",
            Code::Unavailable => "unavailable",
            Code::BadSelector => "bad_selector",
            Code::SelectorMismatch => "selector_mismatch",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("frame of {0} bytes is larger than the limit of {FRAME_BYTES_MAX}")]
    FrameTooLarge(usize),
    #[error("message body ends early")]
    Short,
    #[error("a name is not UTF-8 or longer than {NAME_BYTES_MAX} bytes")]
    BadName,
    #[error("unknown opcode {0:#04x}")]
    UnknownOp(u8),
    #[error("a batch of {0} is larger than the limit of {BATCH_MAX}")]
    BatchTooLarge(usize),
    #[error("{0}")]
    Invalid(&'static str),
}

/// A queue's settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueueConfig {
    pub partitions: u16,
    /// Largest key + payload of a message.
    pub message_bytes_max: u32,
    /// Default time to live of a message, ms (0: none).
    pub ttl_ms: u64,
    /// Deliveries of a message at most before it is dead-lettered (0: no limit).
    pub max_deliveries: u32,
    /// The queue dead letters go to ("" for none: they are dropped).
    pub dead_letter_queue: String,
    pub ack_timeout_ms: u64,
    /// One message per key in flight, in order.
    pub ordered_by_key: bool,
    /// fsync every batch (true) or on a timer (false).
    pub fsync_every_batch: bool,
    /// Bytes a partition's log may hold before producers get `full`.
    pub retention_bytes: u64,
    /// Brokers holding each partition (0: up to 3, as many as the group has).
    pub replicas: u8,
}

impl Default for QueueConfig {
    fn default() -> QueueConfig {
        QueueConfig {
            partitions: 1,
            message_bytes_max: 1 << 20,
            ttl_ms: 0,
            max_deliveries: 5,
            dead_letter_queue: String::new(),
            ack_timeout_ms: 30_000,
            ordered_by_key: false,
            fsync_every_batch: true,
            retention_bytes: 1 << 30,
            replicas: 0,
        }
    }
}

/// A message to produce.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Outgoing {
    pub key: Bytes,
    pub payload: Bytes,
    /// Deliver no earlier than this many ms after it is accepted.
    pub delay_ms: u64,
    /// Dead-letter if not settled this many ms after it is accepted (0: the queue's).
    pub ttl_ms: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum How {
    Ack = 1,
    Nack = 2,
    Reject = 3,
    Progress = 4,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Settlement {
    pub partition: u16,
    pub offset: u64,
    pub how: How,
    /// Nack: deliver again after this.
    pub delay_ms: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    Hello {
        version: u16,
    },
    Create {
        name: String,
        config: QueueConfig,
    },
    Delete {
        name: String,
    },
    List,
    Produce {
        queue: String,
        partition: u16,
        messages: Vec<Outgoing>,
    },
    Subscribe {
        queue: String,
        group: String,
        credit: u32,
        /// The group's selector (docs/MQ.md, "Selectors"); on the wire an optional
        /// trailing string, absent from older clients' frames.
        selector: Option<String>,
    },
    Credit {
        consumer: u64,
        credit: u32,
    },
    Settle {
        consumer: u64,
        settlements: Vec<Settlement>,
    },
    Stat {
        queue: String,
    },
    Unsubscribe {
        consumer: u64,
    },
    Fetch {
        queue: String,
        partition: u16,
        /// The fetching broker's name.
        replica: String,
        /// The token of the leader it follows (or, for a new leader catching up, its own).
        token: u64,
        /// Its log's end: it holds every record below (synced).
        offset: u64,
        /// The high-water mark it knows (a leader holds a fetch with nothing new
        /// until there are records or a higher mark).
        hw: u64,
        epochs: Vec<(u64, u64)>,
    },
    Survey {
        queue: String,
        partition: u16,
        token: u64,
    },
    PeerCreate {
        name: String,
        config: QueueConfig,
        /// Brokers (by name) that hold the queue's partitions.
        replicas: Vec<String>,
    },
    PeerDelete {
        name: String,
    },
    PeerMove {
        queue: String,
        partition: u16,
        from: String,
        to: String,
    },
    Move {
        queue: String,
        from: String,
        to: String,
    },
}

/// A replica's answer to FETCH.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fetched {
    /// The answering broker's promised token (its own if it leads).
    pub token: u64,
    /// Whether it leads the partition with that token.
    pub leader: bool,
    pub hw: u64,
    /// Its log's first offset (a fetcher whose log ends before it starts again
    /// there) and end, and its history.
    pub start: u64,
    pub end: u64,
    pub epochs: Vec<(u64, u64)>,
    /// Records from the fetch's offset, if the fetcher's log agrees up to there.
    pub records: Vec<Replicated>,
}

/// A record as replicated between brokers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Replicated {
    pub offset: u64,
    pub timestamp_ms: u64,
    pub not_before_ms: u64,
    pub expires_ms: u64,
    pub key: Bytes,
    pub headers: Bytes,
    pub payload: Bytes,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delivery {
    pub consumer: u64,
    pub partition: u16,
    pub offset: u64,
    pub attempt: u32,
    pub timestamp_ms: u64,
    pub key: Bytes,
    pub headers: Bytes,
    pub payload: Bytes,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    Ok,
    Error {
        code: Code,
        message: String,
    },
    Produced {
        partition: u16,
        first: u64,
        count: u32,
    },
    Subscribed {
        consumer: u64,
    },
    Listed(Vec<(String, QueueConfig)>),
    Stats(Vec<(String, u64)>),
    Deliver(Delivery),
    Fetched(Fetched),
    Surveyed {
        end: u64,
        epochs: Vec<(u64, u64)>,
    },
}

// ---- writing

fn put_bytes(b: &mut BytesMut, v: &[u8]) {
    b.put_u32(v.len() as u32);
    b.put_slice(v);
}

fn put_config(b: &mut BytesMut, c: &QueueConfig) {
    b.put_u16(c.partitions);
    b.put_u32(c.message_bytes_max);
    b.put_u64(c.ttl_ms);
    b.put_u32(c.max_deliveries);
    put_bytes(b, c.dead_letter_queue.as_bytes());
    b.put_u64(c.ack_timeout_ms);
    b.put_u8(c.ordered_by_key as u8);
    b.put_u8(c.fsync_every_batch as u8);
    b.put_u64(c.retention_bytes);
    b.put_u8(c.replicas);
}

fn put_epochs(b: &mut BytesMut, epochs: &[(u64, u64)]) {
    b.put_u32(epochs.len() as u32);
    for &(e, s) in epochs {
        b.put_u64(e);
        b.put_u64(s);
    }
}

/// Appends one message (`op`, `id`, body written by `body`) to `out`.
fn message(out: &mut BytesMut, op: u8, id: u32, body: impl FnOnce(&mut BytesMut)) {
    out.put_u8(op);
    out.put_u32(id);
    let len_at = out.len();
    out.put_u32(0);
    body(out);
    let len = (out.len() - len_at - 4) as u32;
    out[len_at..len_at + 4].copy_from_slice(&len.to_be_bytes());
}

impl Request {
    /// Appends this request as a message with `id` to `out` (a frame's body).
    pub fn encode(&self, id: u32, out: &mut BytesMut) {
        match self {
            Request::Hello { version } => message(out, op::HELLO, id, |b| b.put_u16(*version)),
            Request::Create { name, config } => message(out, op::CREATE, id, |b| {
                put_bytes(b, name.as_bytes());
                put_config(b, config);
            }),
            Request::Delete { name } => {
                message(out, op::DELETE, id, |b| put_bytes(b, name.as_bytes()))
            }
            Request::List => message(out, op::LIST, id, |_| {}),
            Request::Produce {
                queue,
                partition,
                messages,
            } => message(out, op::PRODUCE, id, |b| {
                put_bytes(b, queue.as_bytes());
                b.put_u16(*partition);
                b.put_u32(messages.len() as u32);
                for m in messages {
                    put_bytes(b, &m.key);
                    put_bytes(b, &m.payload);
                    b.put_u64(m.delay_ms);
                    b.put_u64(m.ttl_ms);
                }
            }),
            Request::Subscribe {
                queue,
                group,
                credit,
                selector,
            } => message(out, op::SUBSCRIBE, id, |b| {
                put_bytes(b, queue.as_bytes());
                put_bytes(b, group.as_bytes());
                b.put_u32(*credit);
                if let Some(s) = selector {
                    put_bytes(b, s.as_bytes());
                }
            }),
            Request::Credit { consumer, credit } => message(out, op::CREDIT, id, |b| {
                b.put_u64(*consumer);
                b.put_u32(*credit);
            }),
            Request::Settle {
                consumer,
                settlements,
            } => message(out, op::SETTLE, id, |b| {
                b.put_u64(*consumer);
                b.put_u32(settlements.len() as u32);
                for s in settlements {
                    b.put_u16(s.partition);
                    b.put_u64(s.offset);
                    b.put_u8(s.how as u8);
                    b.put_u64(s.delay_ms);
                }
            }),
            Request::Stat { queue } => {
                message(out, op::STAT, id, |b| put_bytes(b, queue.as_bytes()))
            }
            Request::Unsubscribe { consumer } => {
                message(out, op::UNSUBSCRIBE, id, |b| b.put_u64(*consumer))
            }
            Request::Fetch {
                queue,
                partition,
                replica,
                token,
                offset,
                hw,
                epochs,
            } => message(out, op::FETCH, id, |b| {
                put_bytes(b, queue.as_bytes());
                b.put_u16(*partition);
                put_bytes(b, replica.as_bytes());
                b.put_u64(*token);
                b.put_u64(*offset);
                b.put_u64(*hw);
                put_epochs(b, epochs);
            }),
            Request::Survey {
                queue,
                partition,
                token,
            } => message(out, op::SURVEY, id, |b| {
                put_bytes(b, queue.as_bytes());
                b.put_u16(*partition);
                b.put_u64(*token);
            }),
            Request::PeerCreate {
                name,
                config,
                replicas,
            } => message(out, op::PEER_CREATE, id, |b| {
                put_bytes(b, name.as_bytes());
                put_config(b, config);
                b.put_u32(replicas.len() as u32);
                for r in replicas {
                    put_bytes(b, r.as_bytes());
                }
            }),
            Request::PeerDelete { name } => {
                message(out, op::PEER_DELETE, id, |b| put_bytes(b, name.as_bytes()))
            }
            Request::PeerMove {
                queue,
                partition,
                from,
                to,
            } => message(out, op::PEER_MOVE, id, |b| {
                put_bytes(b, queue.as_bytes());
                b.put_u16(*partition);
                put_bytes(b, from.as_bytes());
                put_bytes(b, to.as_bytes());
            }),
            Request::Move { queue, from, to } => message(out, op::MOVE, id, |b| {
                put_bytes(b, queue.as_bytes());
                put_bytes(b, from.as_bytes());
                put_bytes(b, to.as_bytes());
            }),
        }
    }
}

impl Reply {
    /// Appends this reply as a message with `id` to `out`.
    pub fn encode(&self, id: u32, out: &mut BytesMut) {
        match self {
            Reply::Ok => message(out, op::OK, id, |_| {}),
            Reply::Error { code, message: m } => message(out, op::ERROR, id, |b| {
                b.put_u16(*code as u16);
                put_bytes(b, m.as_bytes());
            }),
            Reply::Produced {
                partition,
                first,
                count,
            } => message(out, op::PRODUCED, id, |b| {
                b.put_u16(*partition);
                b.put_u64(*first);
                b.put_u32(*count);
            }),
            Reply::Subscribed { consumer } => {
                message(out, op::SUBSCRIBED, id, |b| b.put_u64(*consumer))
            }
            Reply::Listed(queues) => message(out, op::LISTED, id, |b| {
                b.put_u32(queues.len() as u32);
                for (n, c) in queues {
                    put_bytes(b, n.as_bytes());
                    put_config(b, c);
                }
            }),
            Reply::Stats(stats) => message(out, op::STATS, id, |b| {
                b.put_u32(stats.len() as u32);
                for (n, v) in stats {
                    put_bytes(b, n.as_bytes());
                    b.put_u64(*v);
                }
            }),
            Reply::Deliver(d) => message(out, op::DELIVER, id, |b| {
                b.put_u64(d.consumer);
                b.put_u16(d.partition);
                b.put_u64(d.offset);
                b.put_u32(d.attempt);
                b.put_u64(d.timestamp_ms);
                put_bytes(b, &d.key);
                put_bytes(b, &d.headers);
                put_bytes(b, &d.payload);
            }),
            Reply::Fetched(f) => message(out, op::FETCHED, id, |b| {
                b.put_u64(f.token);
                b.put_u8(f.leader as u8);
                b.put_u64(f.hw);
                b.put_u64(f.start);
                b.put_u64(f.end);
                put_epochs(b, &f.epochs);
                b.put_u32(f.records.len() as u32);
                for r in &f.records {
                    b.put_u64(r.offset);
                    b.put_u64(r.timestamp_ms);
                    b.put_u64(r.not_before_ms);
                    b.put_u64(r.expires_ms);
                    put_bytes(b, &r.key);
                    put_bytes(b, &r.headers);
                    put_bytes(b, &r.payload);
                }
            }),
            Reply::Surveyed { end, epochs } => message(out, op::SURVEYED, id, |b| {
                b.put_u64(*end);
                put_epochs(b, epochs);
            }),
        }
    }
}

// ---- reading

/// The length of the first whole frame in `buf` (its prefix included), if any.
pub fn frame_len(buf: &[u8]) -> Result<Option<usize>, DecodeError> {
    if buf.len() < 4 {
        return Ok(None);
    }
    let len = u32::from_be_bytes(buf[..4].try_into().expect("4")) as usize;
    if len > FRAME_BYTES_MAX {
        return Err(DecodeError::FrameTooLarge(len));
    }
    Ok((buf.len() >= 4 + len).then_some(4 + len))
}

/// Wraps a frame's body with its length prefix.
pub fn frame(body: &[u8], out: &mut BytesMut) {
    out.put_u32(body.len() as u32);
    out.put_slice(body);
}

/// The messages of a frame body: (op, id, body), each body a slice of `body` (no copy).
pub fn messages(mut body: Bytes) -> impl Iterator<Item = Result<(u8, u32, Bytes), DecodeError>> {
    std::iter::from_fn(move || {
        if body.is_empty() {
            return None;
        }
        if body.len() < 9 {
            body = Bytes::new();
            return Some(Err(DecodeError::Short));
        }
        let op = body[0];
        let id = u32::from_be_bytes(body[1..5].try_into().expect("4"));
        let len = u32::from_be_bytes(body[5..9].try_into().expect("4")) as usize;
        if body.len() < 9 + len {
            body = Bytes::new();
            return Some(Err(DecodeError::Short));
        }
        body.advance(9);
        let m = body.split_to(len);
        Some(Ok((op, id, m)))
    })
}

struct Reader(Bytes);

impl Reader {
    fn need(&self, n: usize) -> Result<(), DecodeError> {
        if self.0.len() < n {
            Err(DecodeError::Short)
        } else {
            Ok(())
        }
    }
    fn u8(&mut self) -> Result<u8, DecodeError> {
        self.need(1)?;
        Ok(self.0.get_u8())
    }
    fn u16(&mut self) -> Result<u16, DecodeError> {
        self.need(2)?;
        Ok(self.0.get_u16())
    }
    fn u32(&mut self) -> Result<u32, DecodeError> {
        self.need(4)?;
        Ok(self.0.get_u32())
    }
    fn u64(&mut self) -> Result<u64, DecodeError> {
        self.need(8)?;
        Ok(self.0.get_u64())
    }
    fn bytes(&mut self) -> Result<Bytes, DecodeError> {
        let n = self.u32()? as usize;
        self.need(n)?;
        Ok(self.0.split_to(n))
    }
    fn name(&mut self) -> Result<String, DecodeError> {
        let b = self.bytes()?;
        if b.len() > NAME_BYTES_MAX {
            return Err(DecodeError::BadName);
        }
        String::from_utf8(b.to_vec()).map_err(|_| DecodeError::BadName)
    }
    fn count(&mut self, least_each: usize) -> Result<usize, DecodeError> {
        let n = self.u32()? as usize;
        if n > BATCH_MAX {
            return Err(DecodeError::BatchTooLarge(n));
        }
        // Each entry takes at least `least_each` bytes: a count the body cannot hold
        // is refused before anything is allocated for it.
        self.need(n.saturating_mul(least_each))?;
        Ok(n)
    }
    fn config(&mut self) -> Result<QueueConfig, DecodeError> {
        Ok(QueueConfig {
            partitions: self.u16()?,
            message_bytes_max: self.u32()?,
            ttl_ms: self.u64()?,
            max_deliveries: self.u32()?,
            dead_letter_queue: {
                let b = self.bytes()?;
                if b.len() > NAME_BYTES_MAX {
                    return Err(DecodeError::BadName);
                }
                String::from_utf8(b.to_vec()).map_err(|_| DecodeError::BadName)?
            },
            ack_timeout_ms: self.u64()?,
            ordered_by_key: self.u8()? != 0,
            fsync_every_batch: self.u8()? != 0,
            retention_bytes: self.u64()?,
            replicas: self.u8()?,
        })
    }
    fn epochs(&mut self) -> Result<Vec<(u64, u64)>, DecodeError> {
        let n = self.count(16)?;
        if n > crate::replica::EPOCHS_MAX {
            return Err(DecodeError::Invalid("epoch history too long"));
        }
        (0..n).map(|_| Ok((self.u64()?, self.u64()?))).collect()
    }
    fn end(&self) -> Result<(), DecodeError> {
        if self.0.is_empty() {
            Ok(())
        } else {
            Err(DecodeError::Invalid("bytes after the message's fields"))
        }
    }
}

impl Request {
    pub fn decode(opcode: u8, body: Bytes) -> Result<Request, DecodeError> {
        let mut r = Reader(body);
        let req = match opcode {
            op::HELLO => Request::Hello { version: r.u16()? },
            op::CREATE => Request::Create {
                name: r.name()?,
                config: r.config()?,
            },
            op::DELETE => Request::Delete { name: r.name()? },
            op::LIST => Request::List,
            op::PRODUCE => {
                let queue = r.name()?;
                let partition = r.u16()?;
                let n = r.count(24)?;
                let mut messages = Vec::with_capacity(n);
                for _ in 0..n {
                    messages.push(Outgoing {
                        key: r.bytes()?,
                        payload: r.bytes()?,
                        delay_ms: r.u64()?,
                        ttl_ms: r.u64()?,
                    });
                }
                Request::Produce {
                    queue,
                    partition,
                    messages,
                }
            }
            op::SUBSCRIBE => Request::Subscribe {
                queue: r.name()?,
                group: r.name()?,
                credit: r.u32()?,
                selector: if r.0.is_empty() {
                    None
                } else {
                    // Bounded by the frame; its limit is checked by the broker, which
                    // answers bad_selector.
                    let b = r.bytes()?;
                    Some(
                        String::from_utf8(b.to_vec())
                            .map_err(|_| DecodeError::Invalid("a selector that is not UTF-8"))?,
                    )
                },
            },
            op::CREDIT => Request::Credit {
                consumer: r.u64()?,
                credit: r.u32()?,
            },
            op::SETTLE => {
                let consumer = r.u64()?;
                let n = r.count(19)?;
                let mut settlements = Vec::with_capacity(n);
                for _ in 0..n {
                    let partition = r.u16()?;
                    let offset = r.u64()?;
                    let how = match r.u8()? {
                        1 => How::Ack,
                        2 => How::Nack,
                        3 => How::Reject,
                        4 => How::Progress,
                        _ => return Err(DecodeError::Invalid("unknown settlement")),
                    };
                    settlements.push(Settlement {
                        partition,
                        offset,
                        how,
                        delay_ms: r.u64()?,
                    });
                }
                Request::Settle {
                    consumer,
                    settlements,
                }
            }
            op::STAT => Request::Stat { queue: r.name()? },
            op::UNSUBSCRIBE => Request::Unsubscribe { consumer: r.u64()? },
            op::FETCH => Request::Fetch {
                queue: r.name()?,
                partition: r.u16()?,
                replica: r.name()?,
                token: r.u64()?,
                offset: r.u64()?,
                hw: r.u64()?,
                epochs: r.epochs()?,
            },
            op::SURVEY => Request::Survey {
                queue: r.name()?,
                partition: r.u16()?,
                token: r.u64()?,
            },
            op::PEER_CREATE => {
                let name = r.name()?;
                let config = r.config()?;
                let n = r.count(4)?;
                if n > 255 {
                    return Err(DecodeError::Invalid("more than 255 replicas"));
                }
                let replicas = (0..n).map(|_| r.name()).collect::<Result<_, _>>()?;
                Request::PeerCreate {
                    name,
                    config,
                    replicas,
                }
            }
            op::PEER_DELETE => Request::PeerDelete { name: r.name()? },
            op::PEER_MOVE => Request::PeerMove {
                queue: r.name()?,
                partition: r.u16()?,
                from: r.name()?,
                to: r.name()?,
            },
            op::MOVE => Request::Move {
                queue: r.name()?,
                from: r.name()?,
                to: r.name()?,
            },
            other => return Err(DecodeError::UnknownOp(other)),
        };
        r.end()?;
        Ok(req)
    }
}

impl Reply {
    pub fn decode(opcode: u8, body: Bytes) -> Result<Reply, DecodeError> {
        let mut r = Reader(body);
        let reply = match opcode {
            op::OK => Reply::Ok,
            op::ERROR => {
                let code = r.u16()?;
                let message = String::from_utf8_lossy(&r.bytes()?).into_owned();
                Reply::Error {
                    code: Code::from_u16(code).ok_or(DecodeError::Invalid("unknown error code"))?,
                    message,
                }
            }
            op::PRODUCED => Reply::Produced {
                partition: r.u16()?,
                first: r.u64()?,
                count: r.u32()?,
            },
            op::SUBSCRIBED => Reply::Subscribed { consumer: r.u64()? },
            op::LISTED => {
                let n = r.count(4)?;
                let mut v = Vec::with_capacity(n);
                for _ in 0..n {
                    v.push((r.name()?, r.config()?));
                }
                Reply::Listed(v)
            }
            op::STATS => {
                let n = r.count(12)?;
                let mut v = Vec::with_capacity(n);
                for _ in 0..n {
                    v.push((r.name()?, r.u64()?));
                }
                Reply::Stats(v)
            }
            op::DELIVER => Reply::Deliver(Delivery {
                consumer: r.u64()?,
                partition: r.u16()?,
                offset: r.u64()?,
                attempt: r.u32()?,
                timestamp_ms: r.u64()?,
                key: r.bytes()?,
                headers: r.bytes()?,
                payload: r.bytes()?,
            }),
            op::FETCHED => {
                let token = r.u64()?;
                let leader = r.u8()? != 0;
                let hw = r.u64()?;
                let start = r.u64()?;
                let end = r.u64()?;
                let epochs = r.epochs()?;
                let n = r.count(44)?;
                let mut records = Vec::with_capacity(n);
                for _ in 0..n {
                    records.push(Replicated {
                        offset: r.u64()?,
                        timestamp_ms: r.u64()?,
                        not_before_ms: r.u64()?,
                        expires_ms: r.u64()?,
                        key: r.bytes()?,
                        headers: r.bytes()?,
                        payload: r.bytes()?,
                    });
                }
                Reply::Fetched(Fetched {
                    token,
                    leader,
                    hw,
                    start,
                    end,
                    epochs,
                    records,
                })
            }
            op::SURVEYED => Reply::Surveyed {
                end: r.u64()?,
                epochs: r.epochs()?,
            },
            other => return Err(DecodeError::UnknownOp(other)),
        };
        r.end()?;
        Ok(reply)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn round_trip_request(r: Request) {
        let mut b = BytesMut::new();
        r.encode(7, &mut b);
        let mut it = messages(b.freeze());
        let (op, id, body) = it.next().unwrap().unwrap();
        assert_eq!(id, 7);
        assert_eq!(Request::decode(op, body).unwrap(), r);
        assert!(it.next().is_none());
    }

    /// A SUBSCRIBE as clients before selectors wrote it (queue, group, credit and
    /// nothing after) still decodes, with no selector.
    #[test]
    fn a_subscribe_without_a_selector_is_the_old_frame() {
        let mut b = BytesMut::new();
        message(&mut b, op::SUBSCRIBE, 1, |b| {
            put_bytes(b, b"q");
            put_bytes(b, b"g");
            b.put_u32(5);
        });
        let mut new = BytesMut::new();
        Request::Subscribe {
            queue: "q".into(),
            group: "g".into(),
            credit: 5,
            selector: None,
        }
        .encode(1, &mut new);
        assert_eq!(b, new);
        let (op, _, body) = messages(b.freeze()).next().unwrap().unwrap();
        assert!(matches!(
            Request::decode(op, body).unwrap(),
            Request::Subscribe { selector: None, .. }
        ));
        assert_eq!(Code::from_u16(14), Some(Code::BadSelector));
        assert_eq!(Code::from_u16(15), Some(Code::SelectorMismatch));
    }

    #[test]
    fn every_request_and_reply_round_trips() {
        round_trip_request(Request::Hello { version: VERSION });
        round_trip_request(Request::Create {
            name: "orders".into(),
            config: QueueConfig {
                dead_letter_queue: "orders.dlq".into(),
                ordered_by_key: true,
                ..Default::default()
            },
        });
        round_trip_request(Request::Produce {
            queue: "q".into(),
            partition: ANY_PARTITION,
            messages: vec![Outgoing {
                key: Bytes::from_static(b"k"),
                payload: Bytes::from_static(b"hello"),
                delay_ms: 5,
                ttl_ms: 6,
            }],
        });
        round_trip_request(Request::Subscribe {
            queue: "q".into(),
            group: "g".into(),
            credit: 10,
            selector: None,
        });
        round_trip_request(Request::Subscribe {
            queue: "q".into(),
            group: "g".into(),
            credit: 10,
            selector: Some(r#"headers.reason == "expired""#.into()),
        });
        round_trip_request(Request::Settle {
            consumer: 3,
            settlements: vec![Settlement {
                partition: 1,
                offset: 9,
                how: How::Nack,
                delay_ms: 100,
            }],
        });
        for reply in [
            Reply::Ok,
            Reply::Error {
                code: Code::Full,
                message: "full".into(),
            },
            Reply::Produced {
                partition: 2,
                first: 10,
                count: 3,
            },
            Reply::Listed(vec![("q".into(), QueueConfig::default())]),
            Reply::Stats(vec![("depth".into(), 4)]),
            Reply::Deliver(Delivery {
                consumer: 1,
                partition: 0,
                offset: 5,
                attempt: 2,
                timestamp_ms: 99,
                key: Bytes::from_static(b"k"),
                headers: Bytes::from_static(b"reason=expired"),
                payload: Bytes::from_static(b"p"),
            }),
        ] {
            let mut b = BytesMut::new();
            reply.encode(0, &mut b);
            let (op, _, body) = messages(b.freeze()).next().unwrap().unwrap();
            assert_eq!(Reply::decode(op, body).unwrap(), reply);
        }
    }

    #[test]
    fn hostile_counts_and_sizes_are_refused_before_allocating() {
        let mut b = BytesMut::new();
        message(&mut b, op::PRODUCE, 1, |b| {
            put_bytes(b, b"q");
            b.put_u16(0);
            b.put_u32(90_000);
        });
        let (op, _, body) = messages(b.freeze()).next().unwrap().unwrap();
        assert_eq!(Request::decode(op, body), Err(DecodeError::Short));
        let big = ((FRAME_BYTES_MAX + 1) as u32).to_be_bytes();
        assert_eq!(
            frame_len(&big),
            Err(DecodeError::FrameTooLarge(FRAME_BYTES_MAX + 1))
        );
    }

    proptest! {
        /// Any bytes decode to a value or a typed error, never a panic.
        #[test]
        fn arbitrary_bytes_never_panic(op in any::<u8>(), body in prop::collection::vec(any::<u8>(), 0..200)) {
            let body = Bytes::from(body);
            let _ = Request::decode(op, body.clone());
            let _ = Reply::decode(op, body.clone());
            for m in messages(body) {
                let _ = m;
            }
        }
    }
}
