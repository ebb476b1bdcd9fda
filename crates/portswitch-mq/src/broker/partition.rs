//! One partition's actor: it alone owns the partition's log, its epoch history, its
//! groups' settlement files and (while it leads) their delivery state. Commands
//! arrive on a channel; each turn of the loop takes every command waiting (up to a
//! limit) and appends all produced messages and the turn's settlements as one batch
//! (one write, one fsync: group commit).
//!
//! Replication (docs/MQ.md, ARCHITECTURE.md): the partition is on R brokers. The one
//! that owns the port `mq/<queue>/<partition>` leads, with the port's fencing token as
//! its epoch; the others fetch its log ([`Cmd::Fetch`] at the leader, [`Cmd::Apply`]
//! here). A produce or a settlement is confirmed once a majority holds it (the
//! high-water mark passed it); only confirmed messages are delivered. Settlements
//! travel in the log as *control records* (the broker's own headers, which producers
//! cannot set), so a new leader knows what was acknowledged.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::{Buf, BufMut, Bytes, BytesMut};
use tokio::sync::{mpsc, oneshot};

use super::metrics::QueueMetrics;
use super::{Catalog, MqError};
use crate::acks::{Acks, ACKED, DEAD};
use crate::delivery::{DeadReason, DeliveryConfig, DeliveryError, Effect, Entry, Group};
use crate::log::{Fsync, Log, LogConfig, LogError, Message, Record};
use crate::proto::{Delivery, How, Outgoing, QueueConfig, Replicated, Settlement};
use crate::replica::{self, Epochs};
use crate::selector::{Memo, RecordView, Selector, Verdict};

/// Commands taken in one turn at most.
const TURN_COMMANDS_MAX: usize = 4096;
/// Bytes of recent records kept in memory for delivery and for replicas.
const CACHE_BYTES_MAX: usize = 16 << 20;
/// Bytes read from the log at once for deliveries no longer in memory.
const FETCH_BYTES: usize = 1 << 20;
/// Bytes of records in one answer to a replica's fetch.
const REPLICA_FETCH_BYTES: usize = 1 << 20;
/// How long a leader holds a replica's fetch when it has nothing new.
const FETCH_WAIT: Duration = Duration::from_millis(500);
/// A produce or settlement a majority has not confirmed by then is refused.
pub const CONFIRM_TIMEOUT: Duration = Duration::from_secs(5);
/// Messages handed to the delivery groups in one turn at most (a new leader with a
/// long backlog takes it a part at a time).
const ADVANCE_MAX: u64 = 65_536;
/// How often a partition whose queue syncs on a timer syncs.
pub const SYNC_INTERVAL: Duration = Duration::from_millis(50);
/// Settlements in one control record at most (12 bytes each: well under the log's
/// 1 MiB record limit).
const SETTLED_PER_RECORD: usize = 32_768;
/// A group with a selector writes its floor (a settle record without entries) once
/// its low-water mark has moved this far past the floor it wrote, so that messages
/// its selector skipped do not hold back replicas' reclaiming.
const SKIPPED_FLOOR_STEP: u64 = 4096;
/// The headers that mark a control record (producers cannot set headers).
pub const CONTROL_HEADERS: &[u8] = b"mq.control\n";

pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// What a control record says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Control {
    /// A leader began its epoch here (the record a majority must hold before anything
    /// earlier counts as confirmed).
    Epoch { token: u64 },
    /// A group began reading the partition (replicas keep its settlements from now),
    /// with its selector if it has one.
    Group {
        name: String,
        selector: Option<String>,
    },
    /// A group settled these offsets; everything below `floor` is settled.
    Settle {
        group: String,
        floor: u64,
        entries: Vec<(u64, u32)>,
    },
    /// The partition's replicas from here on (joint while `old` and `new` differ).
    Replicas { old: Vec<String>, new: Vec<String> },
    /// A group made by a subscription that was then refused on another partition is
    /// gone again (it had no consumers and had settled nothing). Brokers before it
    /// cannot read it and keep the group.
    Ungroup { name: String },
}

impl Control {
    pub fn encode(&self) -> Vec<u8> {
        let mut b = BytesMut::new();
        match self {
            Control::Epoch { token } => {
                b.put_u8(1);
                b.put_u64(*token);
            }
            Control::Group { name, selector } => {
                b.put_u8(2);
                b.put_u16(name.len() as u16);
                b.put_slice(name.as_bytes());
                // After the name, so that brokers before selectors read the record.
                if let Some(s) = selector {
                    b.put_u32(s.len() as u32);
                    b.put_slice(s.as_bytes());
                }
            }
            Control::Settle {
                group,
                floor,
                entries,
            } => {
                b.put_u8(3);
                b.put_u16(group.len() as u16);
                b.put_slice(group.as_bytes());
                b.put_u64(*floor);
                b.put_u32(entries.len() as u32);
                for &(o, k) in entries {
                    b.put_u64(o);
                    b.put_u32(k);
                }
            }
            Control::Ungroup { name } => {
                b.put_u8(5);
                b.put_u16(name.len() as u16);
                b.put_slice(name.as_bytes());
            }
            Control::Replicas { old, new } => {
                b.put_u8(4);
                for side in [old, new] {
                    b.put_u16(side.len() as u16);
                    for n in side {
                        b.put_u16(n.len() as u16);
                        b.put_slice(n.as_bytes());
                    }
                }
            }
        }
        b.to_vec()
    }

    pub fn decode(mut b: &[u8]) -> Option<Control> {
        let name = |b: &mut &[u8]| -> Option<String> {
            if b.remaining() < 2 {
                return None;
            }
            let n = b.get_u16() as usize;
            if b.remaining() < n {
                return None;
            }
            let s = String::from_utf8(b[..n].to_vec()).ok()?;
            b.advance(n);
            Some(s)
        };
        if b.remaining() < 1 {
            return None;
        }
        match b.get_u8() {
            1 if b.remaining() == 8 => Some(Control::Epoch { token: b.get_u64() }),
            2 => {
                let name = name(&mut b)?;
                let selector = if b.remaining() == 0 {
                    None
                } else {
                    if b.remaining() < 4 {
                        return None;
                    }
                    let n = b.get_u32() as usize;
                    if b.remaining() != n || n > crate::selector::SELECTOR_BYTES_MAX {
                        return None;
                    }
                    Some(String::from_utf8(b.to_vec()).ok()?)
                };
                Some(Control::Group { name, selector })
            }
            5 => {
                let name = name(&mut b)?;
                if b.remaining() != 0 {
                    return None;
                }
                Some(Control::Ungroup { name })
            }
            3 => {
                let group = name(&mut b)?;
                if b.remaining() < 12 {
                    return None;
                }
                let floor = b.get_u64();
                let n = b.get_u32() as usize;
                if b.remaining() != n * 12 {
                    return None;
                }
                let entries = (0..n).map(|_| (b.get_u64(), b.get_u32())).collect();
                Some(Control::Settle {
                    group,
                    floor,
                    entries,
                })
            }
            4 => {
                let mut sides = Vec::new();
                for _ in 0..2 {
                    if b.remaining() < 2 {
                        return None;
                    }
                    let n = b.get_u16() as usize;
                    if n > 255 {
                        return None;
                    }
                    let mut side = Vec::with_capacity(n);
                    for _ in 0..n {
                        side.push(name(&mut b)?);
                    }
                    sides.push(side);
                }
                let new = sides.pop()?;
                let old = sides.pop()?;
                (b.remaining() == 0).then_some(Control::Replicas { old, new })
            }
            _ => None,
        }
    }
}

/// A record kept in memory for delivery and replicas (its bytes shared with the
/// request that brought it, or with the log read that found it).
#[derive(Clone)]
struct Cached {
    timestamp_ms: u64,
    not_before_ms: u64,
    expires_ms: u64,
    key: Bytes,
    headers: Bytes,
    payload: Bytes,
}

impl Cached {
    fn size(&self) -> usize {
        self.key.len() + self.headers.len() + self.payload.len() + 64
    }

    fn is_control(&self) -> bool {
        self.headers.as_ref() == CONTROL_HEADERS
    }

    fn replicated(&self, offset: u64) -> Replicated {
        Replicated {
            offset,
            timestamp_ms: self.timestamp_ms,
            not_before_ms: self.not_before_ms,
            expires_ms: self.expires_ms,
            key: self.key.clone(),
            headers: self.headers.clone(),
            payload: self.payload.clone(),
        }
    }
}

/// The recent records kept in memory: consecutive offsets from `base`, so looking one
/// up, adding one at the end and dropping the oldest are O(1).
#[derive(Default)]
struct Window {
    base: u64,
    records: VecDeque<Cached>,
    /// Bytes held (what [`Cached::size`] counts).
    bytes: usize,
}

impl Window {
    fn end(&self) -> u64 {
        self.base + self.records.len() as u64
    }

    /// Adds the record at `offset`; one that does not follow the window starts it anew.
    fn insert(&mut self, offset: u64, c: Cached) {
        if offset != self.end() {
            self.records.clear();
            self.bytes = 0;
            self.base = offset;
        }
        self.bytes += c.size();
        self.records.push_back(c);
        while self.bytes > CACHE_BYTES_MAX {
            if self.pop_first().is_none() {
                break;
            }
        }
    }

    fn get(&self, offset: &u64) -> Option<&Cached> {
        let i = offset.checked_sub(self.base)?;
        self.records.get(usize::try_from(i).ok()?)
    }

    fn contains_key(&self, offset: &u64) -> bool {
        self.get(offset).is_some()
    }

    fn pop_first(&mut self) -> Option<(u64, Cached)> {
        let c = self.records.pop_front()?;
        self.bytes -= c.size();
        self.base += 1;
        Some((self.base - 1, c))
    }

    /// The records from `range.start` to `range.end` that are here.
    fn range(&self, range: std::ops::Range<u64>) -> impl Iterator<Item = (u64, &Cached)> {
        let from = range.start.max(self.base);
        let to = range.end.min(self.end());
        (from..to.max(from)).filter_map(move |o| self.get(&o).map(|c| (o, c)))
    }

    /// Removes the records at and above `offset`; returns them.
    fn split_off(&mut self, offset: &u64) {
        let keep = offset
            .saturating_sub(self.base)
            .min(self.records.len() as u64) as usize;
        for c in self.records.split_off(keep) {
            self.bytes -= c.size();
        }
    }
}

impl From<Record> for Cached {
    fn from(r: Record) -> Cached {
        Cached {
            timestamp_ms: r.timestamp_ms,
            not_before_ms: r.not_before_ms,
            expires_ms: r.expires_ms,
            key: r.key,
            headers: r.headers,
            payload: r.payload,
        }
    }
}

/// Where a produce's outcome goes: (first offset, count).
pub type Produced = oneshot::Sender<Result<(u64, u32), MqError>>;
type Done = oneshot::Sender<Result<(), MqError>>;

/// Where a consumer's deliveries go, a turn's at a time.
pub type Sink = mpsc::UnboundedSender<Vec<Delivery>>;

/// A replica's view of its partition, for its fetch loop and `mq stat`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplicaState {
    pub role: Role,
    pub end: u64,
    pub hw: u64,
    pub epochs: Vec<(u64, u64)>,
    pub promised: u64,
    /// Leader: how far each replica's log agrees with this one.
    pub matches: Vec<(String, u64)>,
    /// The replicas in effect (the last configuration in this log).
    pub config: replica::Config,
    /// This broker is not a replica of the partition any more, and knows that the
    /// configuration saying so is confirmed.
    pub retired: bool,
    /// This broker leads and the configuration that removed it is confirmed: it
    /// should give the port up.
    pub step_down: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Follower,
    /// Owns the port with this token; surveying and catching up before it serves.
    Candidate(u64),
    Leader(u64),
}

/// What a fetch's answer carries.
pub type FetchedData = crate::proto::Fetched;

pub type FetchReply = oneshot::Sender<Result<FetchedData, MqError>>;

pub enum Cmd {
    Produce {
        messages: Vec<Outgoing>,
        headers: Bytes,
        reply: Produced,
    },
    Subscribe {
        group: String,
        consumer: u64,
        credit: u32,
        sink: Sink,
        /// The selector the subscriber asks for: the group's if the group is new here,
        /// else it must be the group's.
        selector: Option<Arc<Selector>>,
        /// Whether this subscription made the group here.
        reply: oneshot::Sender<Result<bool, MqError>>,
    },
    /// A subscription that made `group` here was refused on another partition: the
    /// group goes again if nobody else joined it and it settled nothing.
    DropGroup {
        group: String,
    },
    Credit {
        consumer: u64,
        credit: u32,
    },
    Settle {
        consumer: u64,
        settlements: Vec<Settlement>,
        reply: Done,
    },
    Unsubscribe {
        consumer: u64,
    },
    /// A dead letter reached the dead-letter queue (or there is none).
    DeadConfirmed {
        group: String,
        offset: u64,
    },
    Stat {
        reply: oneshot::Sender<Vec<(String, u64)>>,
    },
    /// A replica (or a new leader catching up) asks for records.
    Fetch {
        replica: String,
        token: u64,
        offset: u64,
        hw: u64,
        epochs: Vec<(u64, u64)>,
        reply: FetchReply,
    },
    /// A new leader fences this replica and asks what its log holds.
    Survey {
        token: u64,
        reply: oneshot::Sender<Result<replica::Survey, MqError>>,
    },
    /// This broker won the port with `token`: fence locally, become a candidate.
    Promise {
        token: u64,
        reply: oneshot::Sender<Result<replica::Survey, MqError>>,
    },
    /// Records fetched from the leader (or, catching up, from the best replica).
    Apply {
        fetched: FetchedData,
        token: u64,
        catching_up: bool,
        reply: oneshot::Sender<Result<ReplicaState, MqError>>,
    },
    /// The candidate holds every confirmed record: begin the epoch and serve.
    Lead {
        token: u64,
        reply: Done,
    },
    /// The port (granted with `token`) is lost: stop serving.
    Demote {
        token: u64,
    },
    /// Leader: replace replica `from` by `to` (a joint configuration, then the new
    /// one); answered once the new one is confirmed.
    Reconfigure {
        from: String,
        to: String,
        reply: Done,
    },
    State {
        reply: oneshot::Sender<ReplicaState>,
    },
    Stop {
        reply: oneshot::Sender<()>,
    },
}

struct GroupState {
    acks: Acks,
    /// The group's selector (kept in `groups/<name>.selector`).
    selector: Option<Arc<Selector>>,
    /// Messages the selector skipped, and those it failed on.
    skipped: prometheus_client::metrics::counter::Counter,
    selector_errors: prometheus_client::metrics::counter::Counter,
    /// While this broker leads.
    delivery: Option<Group>,
    /// consumer -> (credit, sink); kept while following, joined when leading.
    consumers: HashMap<u64, (u32, Sink)>,
    /// Settlements of this turn to write as a control record.
    settled: Vec<(u64, u32)>,
    /// Made here by a subscription while not leading, and not named by a leader since:
    /// only this broker knows it.
    local: bool,
    /// The group's selector, kept as text, when it does not compile on this broker:
    /// the group is not served here (no delivery state, subscriptions refused).
    unusable: Option<String>,
}

impl GroupState {
    /// The text of the group's selector (compiled or not), if it has one.
    fn source(&self) -> Option<&str> {
        self.selector
            .as_ref()
            .map(|s| s.source())
            .or(self.unusable.as_deref())
    }

    /// Whether the message is for this group (no selector: all are). A message the
    /// selector does not match, or fails on, is counted and skipped.
    /// `memo` holds the message's values built for the selectors (one per message).
    fn admits(&self, r: &RecordView<'_>, memo: &Memo) -> bool {
        let Some(s) = &self.selector else {
            return true;
        };
        match s.matches_with(r, memo) {
            Verdict::Match => true,
            Verdict::Skip => {
                self.skipped.inc();
                false
            }
            Verdict::Error(e) => {
                self.selector_errors.inc();
                tracing::debug!(offset = r.offset, error = %e, "a selector failed on a message: skipped");
                false
            }
        }
    }
}

/// A reply that waits for the high-water mark to pass `end`.
enum Confirm {
    Produce {
        reply: Produced,
        first: u64,
        count: u32,
    },
    Settle(Done),
}

struct Unconfirmed {
    end: u64,
    since: Instant,
    confirm: Confirm,
}

/// A change of replicas: the joint configuration's record ends at `joint_end`; the
/// new one's, once appended, at `final_end`.
struct Reconfig {
    new: Vec<String>,
    joint_end: u64,
    final_end: Option<u64>,
    /// Who asked (again, after a lost answer, or nobody: a change a former leader
    /// began).
    replies: Vec<Done>,
}

struct Parked {
    offset: u64,
    hw: u64,
    token: u64,
    until: Instant,
    reply: FetchReply,
}

pub struct Partition {
    queue: String,
    index: u16,
    config: QueueConfig,
    dir: PathBuf,
    log: Log,
    epochs: Epochs,
    role: Role,
    /// Offset of the current epoch's first record (its Epoch control record).
    epoch_start: u64,
    /// Confirmed: a majority holds every record below.
    hw: u64,
    /// This broker's name, and the partition's configurations.
    me: String,
    configs: replica::Configs,
    /// Leader: a change of replicas under way.
    reconfig: Option<Reconfig>,
    /// Leader: how far each replica's log agrees with this one.
    matches: HashMap<String, u64>,
    unconfirmed: VecDeque<Unconfirmed>,
    parked: Vec<Parked>,
    /// Leader: messages below are in the delivery groups.
    delivered_upto: u64,
    groups: BTreeMap<String, GroupState>,
    /// consumer -> its group.
    consumer_group: HashMap<u64, String>,
    /// Groups begun this turn (a control record tells the replicas).
    new_groups: Vec<String>,
    /// Groups dropped this turn (a control record tells the replicas).
    dropped_groups: Vec<String>,
    /// Leader: where the last roster is — a group control record for every group, with
    /// its selector — which reclaiming never passes, so that a replica starting again
    /// at the log's start still learns each group's selector.
    roster_at: Option<u64>,
    cache: Window,
    /// Records read from the log for this turn's deliveries.
    fetched: HashMap<u64, Cached>,
    catalog: Arc<Catalog>,
    metrics: QueueMetrics,
    /// Whether this broker leads the partition (serves it).
    pub serving: Arc<AtomicBool>,
}

fn delivery_config(c: &QueueConfig) -> DeliveryConfig {
    DeliveryConfig {
        ack_timeout_ms: c.ack_timeout_ms.max(1),
        max_deliveries: c.max_deliveries,
        ordered_by_key: c.ordered_by_key,
        ..DeliveryConfig::default()
    }
}

fn io_error(e: LogError) -> MqError {
    match e {
        LogError::RecordTooLarge { size, max } => MqError::TooLarge(format!(
            "a message of {size} bytes is larger than the queue's limit of {max}"
        )),
        LogError::Full { bytes, max } => MqError::Full(format!(
            "the partition holds {bytes} of its {max} bytes: wait for consumers to settle messages"
        )),
        other => MqError::Io(other.to_string()),
    }
}

/// An owned message of a batch being built (produced or control).
struct Pending {
    key: Bytes,
    headers: Bytes,
    payload: Bytes,
    not_before_ms: u64,
    expires_ms: u64,
}

/// Where a partition is: its queue, index and directory, this broker's name and the
/// replicas the queue was created with.
pub struct Place {
    pub queue: String,
    pub index: u16,
    pub dir: PathBuf,
    pub me: String,
    pub initial: Vec<String>,
    pub segment_bytes_max: u64,
}

impl Partition {
    /// Opens the partition's log, history and groups from its directory (created if
    /// missing).
    pub fn open(
        place: Place,
        config: QueueConfig,
        catalog: Arc<Catalog>,
        metrics: QueueMetrics,
    ) -> Result<Partition, LogError> {
        let Place {
            queue,
            index,
            dir,
            me,
            initial,
            segment_bytes_max,
        } = place;
        let queue = queue.as_str();
        let log_cfg = LogConfig {
            record_bytes_max: config.message_bytes_max.saturating_add(1024).max(1 << 20),
            log_bytes_max: config.retention_bytes,
            fsync: if config.fsync_every_batch {
                Fsync::EveryBatch
            } else {
                Fsync::Explicit
            },
            segment_bytes_max,
        };
        let (log, report) = Log::open(&dir.join("log"), log_cfg)?;
        if report.cut_bytes > 0 {
            tracing::warn!(
                queue,
                partition = index,
                bytes = report.cut_bytes,
                "cut a torn tail off the log"
            );
        }
        let mut epochs = Epochs::load(&dir.join("epochs"))?;
        let log_start = log.start_offset();
        let mut configs = replica::Configs::load(&dir.join("config"), initial)?;
        if configs.truncate(log.end_offset()) {
            configs.save(&dir.join("config"))?;
        }
        if epochs.list.is_empty() && log.end_offset() > log.start_offset() {
            // A log written before replication: its records are epoch 0.
            let _ = epochs.begin(0, log.start_offset());
        }
        let mut p = Partition {
            queue: queue.to_string(),
            index,
            config,
            dir,
            log,
            epochs,
            role: Role::Follower,
            epoch_start: 0,
            // Below the log's start everything was settled, so confirmed.
            hw: log_start,
            me,
            configs,
            reconfig: None,
            matches: HashMap::new(),
            unconfirmed: VecDeque::new(),
            parked: Vec::new(),
            delivered_upto: 0,
            groups: BTreeMap::new(),
            consumer_group: HashMap::new(),
            new_groups: Vec::new(),
            dropped_groups: Vec::new(),
            roster_at: None,
            cache: Window::default(),
            fetched: HashMap::new(),
            catalog,
            metrics,
            serving: Arc::new(AtomicBool::new(false)),
        };
        let groups_dir = p.dir.join("groups");
        portswitch_files::create_dir_private(&groups_dir)?;
        let mut names = Vec::new();
        for e in std::fs::read_dir(&groups_dir).map_err(|source| LogError::Io {
            path: groups_dir.clone(),
            source,
        })? {
            let path = e
                .map_err(|source| LogError::Io {
                    path: groups_dir.clone(),
                    source,
                })?
                .path();
            if let Some(name) = path
                .file_name()
                .and_then(|n| n.to_str())
                .and_then(|n| n.strip_suffix(".acks"))
            {
                names.push(name.to_string());
            }
        }
        for name in names {
            let path = p.selector_path(&name);
            let selector = match std::fs::read(&path) {
                Ok(b) => {
                    let src = String::from_utf8(b).map_err(|_| LogError::Corrupt {
                        segment: path.clone(),
                        position: 0,
                        why: "a group's selector is not UTF-8",
                    })?;
                    match p.catalog.selector(&src, p.config.message_bytes_max) {
                        Ok(s) => Ok(s),
                        // Kept, and the group not served (a selector a newer broker
                        // wrote, or one this build's limits refuse): fail closed.
                        Err(e) => {
                            tracing::error!(queue, partition = index, group = name, error = %e, "a group's selector does not compile here: the group is not served by this broker");
                            Err(src)
                        }
                    }
                    .map(Some)
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
                Err(source) => return Err(LogError::Io { path, source }),
            };
            match selector {
                Ok(selector) => p.open_group(&name, selector)?,
                Err(src) => {
                    p.open_group(&name, None)?;
                    if let Some(g) = p.groups.get_mut(&name) {
                        g.unusable = Some(src);
                    }
                }
            }
        }
        Ok(p)
    }

    fn replicas(&self) -> usize {
        self.configs.current().members().len()
    }

    fn save_configs(&self) -> Result<(), MqError> {
        self.configs
            .save(&self.dir.join("config"))
            .map_err(io_error)
    }

    fn selector_path(&self, group: &str) -> PathBuf {
        self.dir.join("groups").join(format!("{group}.selector"))
    }

    /// Keeps a group's selector on disk (before its settlement file exists, so that a
    /// group is never found without the selector it was made with), or removes it.
    fn save_selector(&self, group: &str, selector: Option<&str>) -> Result<(), LogError> {
        let path = self.selector_path(group);
        match selector {
            Some(s) => {
                portswitch_files::write_durable(&path, s.as_bytes(), 0o600).map_err(LogError::from)
            }
            // The unlink is durable once the directory is synced (else a crash could
            // bring the old selector back).
            None => match std::fs::remove_file(&path) {
                Ok(()) => {
                    portswitch_files::sync_dir(&self.dir.join("groups")).map_err(LogError::from)
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
                Err(source) => Err(LogError::Io { path, source }),
            },
        }
    }

    /// Makes a group new to this partition, with its selector (written first).
    fn create_group(
        &mut self,
        name: &str,
        selector: Option<Arc<Selector>>,
    ) -> Result<(), LogError> {
        self.save_selector(name, selector.as_deref().map(Selector::source))?;
        self.open_group(name, selector)
    }

    /// A group named by a leader's control record: made here if new; a selector that
    /// differs from this replica's is the leader's (the log decides). A selector that
    /// does not compile here (a newer broker's) is kept as text and the group is not
    /// served by this broker (fail closed: never delivered without its selector).
    fn group_from_leader(&mut self, name: &str, source: Option<String>) {
        let bytes_max = self.config.message_bytes_max;
        let (selector, unusable) = match source
            .map(|src| (self.catalog.selector(&src, bytes_max), src))
        {
            None => (None, None),
            Some((Ok(s), _)) => (Some(s), None),
            Some((Err(e), src)) => {
                tracing::error!(queue = %self.queue, partition = self.index, group = name, error = %e, "a group's selector from the leader does not compile here: the group is not served by this broker (upgrade it)");
                (None, Some(src))
            }
        };
        let wanted = selector
            .as_ref()
            .map(|s| s.source().to_string())
            .or(unusable.clone());
        if let Some(g) = self.groups.get_mut(name) {
            g.local = false;
        }
        let result = match self.groups.get(name) {
            None => self
                .save_selector(name, wanted.as_deref())
                .and_then(|()| self.open_group(name, selector))
                .map(|()| {
                    if let Some(g) = self.groups.get_mut(name) {
                        g.unusable = unusable;
                    }
                }),
            Some(g) if g.source() == wanted.as_deref() => Ok(()),
            Some(_) => self.save_selector(name, wanted.as_deref()).map(|()| {
                if let Some(g) = self.groups.get_mut(name) {
                    g.selector = selector;
                    g.unusable = unusable;
                }
            }),
        };
        if let Err(e) = result {
            tracing::error!(queue = %self.queue, partition = self.index, group = name, error = %e, "cannot keep a group the leader named");
        }
    }

    fn open_group(&mut self, name: &str, selector: Option<Arc<Selector>>) -> Result<(), LogError> {
        if self.groups.contains_key(name) {
            return Ok(());
        }
        let (acks, cut) = Acks::open(&self.dir.join("groups").join(format!("{name}.acks")))?;
        if cut > 0 {
            tracing::warn!(queue = %self.queue, group = name, bytes = cut, "cut a torn tail off a group's settlements");
        }
        let (skipped, selector_errors) = self.metrics.selector(name);
        self.groups.insert(
            name.to_string(),
            GroupState {
                acks,
                selector,
                skipped,
                selector_errors,
                delivery: None,
                consumers: HashMap::new(),
                settled: Vec::new(),
                local: false,
                unusable: None,
            },
        );
        Ok(())
    }

    /// The delivery state of a group on a leader: every confirmed, unsettled message
    /// below `delivered_upto`.
    fn start_delivery(&mut self, name: &str) -> Result<(), LogError> {
        let cfg = delivery_config(&self.config);
        let upto = self.delivered_upto;
        let log_start = self.log.start_offset();
        let g = self.groups.get_mut(name).expect("opened");
        if g.unusable.is_some() {
            // Its selector does not compile here: not served rather than served
            // without it (its settlements hold reclaiming back meanwhile).
            tracing::error!(queue = %self.queue, partition = self.index, group = name, "leading a group whose selector this broker cannot apply: the group is not served (upgrade every broker before using selectors)");
            return Ok(());
        }
        let start = log_start.max(g.acks.floor());
        let mut delivery = Group::new(cfg, start);
        let mut at = start;
        while at < upto {
            let records = self.log.read(at, 4 << 20)?;
            let Some(last) = records.last() else { break };
            at = last.offset + 1;
            for r in records {
                if r.offset >= upto {
                    break;
                }
                if r.headers != CONTROL_HEADERS && !g.acks.is_settled(r.offset) {
                    let view = RecordView {
                        offset: r.offset,
                        timestamp_ms: r.timestamp_ms,
                        key: &r.key,
                        headers: &r.headers,
                        payload: &r.payload,
                    };
                    if g.admits(&view, &Memo::default()) {
                        let _ = delivery.append(Entry {
                            offset: r.offset,
                            key: r.key,
                            not_before_ms: r.not_before_ms,
                            expires_ms: r.expires_ms,
                        });
                    } else {
                        let _ = delivery.skip(r.offset);
                    }
                }
            }
        }
        // Offsets not delivered yet come through `advance`.
        delivery.skip_to(upto);
        for (&c, &(credit, _)) in &g.consumers {
            let _ = delivery.join(c, credit);
        }
        g.delivery = Some(delivery);
        Ok(())
    }

    /// Runs the partition until a Stop command (or every sender is gone).
    pub async fn run(mut self, mut rx: mpsc::Receiver<Cmd>) {
        let mut batch = Vec::with_capacity(64);
        let mut last_sync = Instant::now();
        loop {
            let wake = self.next_wakeup();
            let first = match wake {
                Some(at) => {
                    let wait = Duration::from_millis(at.saturating_sub(now_ms()));
                    match tokio::time::timeout(wait, rx.recv()).await {
                        Ok(Some(c)) => Some(c),
                        Ok(None) => return,
                        Err(_) => None,
                    }
                }
                None => match rx.recv().await {
                    Some(c) => Some(c),
                    None => return,
                },
            };
            batch.extend(first);
            while batch.len() < TURN_COMMANDS_MAX {
                match rx.try_recv() {
                    Ok(c) => batch.push(c),
                    Err(_) => break,
                }
            }
            let mut stop = None;
            self.turn(std::mem::take(&mut batch), &mut stop);
            if !self.config.fsync_every_batch && last_sync.elapsed() >= SYNC_INTERVAL {
                let _ = self.log.sync();
                last_sync = Instant::now();
            }
            if let Some(reply) = stop {
                let _ = self.log.sync();
                self.demote("the broker is stopping");
                let _ = reply.send(());
                return;
            }
        }
    }

    fn next_wakeup(&self) -> Option<u64> {
        let mut at = self
            .groups
            .values()
            .filter_map(|g| g.delivery.as_ref().and_then(|d| d.next_wakeup()))
            .min();
        let soon = |at: &mut Option<u64>, t: u64| *at = Some(at.map_or(t, |a| a.min(t)));
        if !self.config.fsync_every_batch {
            soon(&mut at, now_ms() + SYNC_INTERVAL.as_millis() as u64);
        }
        if !self.parked.is_empty() || !self.unconfirmed.is_empty() {
            soon(&mut at, now_ms() + 100);
        }
        if matches!(self.role, Role::Leader(_)) && self.delivered_upto < self.hw {
            soon(&mut at, now_ms());
        }
        at
    }

    fn state(&self) -> ReplicaState {
        ReplicaState {
            role: self.role,
            end: self.log.end_offset(),
            hw: self.hw,
            epochs: self.epochs.list.clone(),
            promised: self.epochs.promised,
            matches: self.matches.iter().map(|(k, v)| (k.clone(), *v)).collect(),
            config: self.configs.current(),
            retired: self.removed() && !matches!(self.role, Role::Leader(_)),
            step_down: self.removed() && matches!(self.role, Role::Leader(_)),
        }
    }

    /// Whether a confirmed configuration without this broker is in effect.
    fn removed(&self) -> bool {
        let c = self.configs.current();
        // Only a configuration that follows one naming this broker removes it (a
        // broker being added reads older ones without itself first).
        let was_member = self.configs.initial.contains(&self.me)
            || self
                .configs
                .changes
                .iter()
                .rev()
                .skip(1)
                .any(|(_, c)| c.contains(&self.me));
        !c.is_joint()
            && !c.contains(&self.me)
            && was_member
            && self.configs.current_offset().is_some_and(|o| o < self.hw)
    }

    fn turn(&mut self, cmds: Vec<Cmd>, stop: &mut Option<oneshot::Sender<()>>) {
        let now = now_ms();
        let leading = matches!(self.role, Role::Leader(_));
        let mut produced: Vec<(Vec<Outgoing>, Bytes, Produced)> = Vec::new();
        let mut settles: Vec<(Done, bool)> = Vec::new();
        for c in cmds {
            match c {
                Cmd::Produce {
                    messages,
                    headers,
                    reply,
                } => {
                    if leading {
                        produced.push((messages, headers, reply));
                    } else {
                        let _ = reply.send(Err(MqError::NotLeader(self.port())));
                    }
                }
                Cmd::Subscribe {
                    group,
                    consumer,
                    credit,
                    sink,
                    selector,
                    reply,
                } => {
                    let _ = reply.send(self.subscribe(&group, consumer, credit, sink, selector));
                }
                Cmd::DropGroup { group } => self.drop_unused_group(&group, true),
                Cmd::Credit { consumer, credit } => {
                    if let Some(g) = self
                        .consumer_group
                        .get(&consumer)
                        .and_then(|n| self.groups.get_mut(n))
                    {
                        if let Some(c) = g.consumers.get_mut(&consumer) {
                            c.0 = credit;
                        }
                        if let Some(d) = g.delivery.as_mut() {
                            let _ = d.set_credit(consumer, credit);
                        }
                    }
                }
                Cmd::Settle {
                    consumer,
                    settlements,
                    reply,
                } => {
                    if leading {
                        self.settle(consumer, settlements, reply, now, &mut settles);
                    } else {
                        let _ = reply.send(Err(MqError::NotLeader(self.port())));
                    }
                }
                Cmd::Unsubscribe { consumer } => {
                    if let Some(name) = self.consumer_group.remove(&consumer) {
                        if let Some(g) = self.groups.get_mut(&name) {
                            g.consumers.remove(&consumer);
                            if let Some(d) = g.delivery.as_mut() {
                                let _ = d.leave(consumer);
                            }
                        }
                    }
                }
                Cmd::DeadConfirmed { group, offset } => {
                    if let Some(g) = self.groups.get_mut(&group) {
                        if !g.acks.is_settled(offset) {
                            g.acks.settle(offset, DEAD);
                            g.settled.push((offset, DEAD));
                        }
                    }
                }
                Cmd::Stat { reply } => {
                    let _ = reply.send(self.stats());
                }
                Cmd::Fetch {
                    replica,
                    token,
                    offset,
                    hw,
                    epochs,
                    reply,
                } => self.fetch(replica, token, offset, hw, epochs, reply),
                Cmd::Survey { token, reply } => {
                    let _ = reply.send(self.survey(token, false));
                }
                Cmd::Promise { token, reply } => {
                    let _ = reply.send(self.survey(token, true));
                }
                Cmd::Apply {
                    fetched,
                    token,
                    catching_up,
                    reply,
                } => {
                    let _ = reply.send(self.apply(fetched, token, catching_up));
                }
                Cmd::Lead { token, reply } => {
                    let _ = reply.send(self.lead(token));
                }
                Cmd::Reconfigure { from, to, reply } => self.reconfigure(from, to, reply),
                Cmd::Demote { token } => {
                    if matches!(self.role, Role::Leader(t) | Role::Candidate(t) if t == token) {
                        self.demote("lost the partition's port");
                    }
                }
                Cmd::State { reply } => {
                    let _ = reply.send(self.state());
                }
                Cmd::Stop { reply } => *stop = Some(reply),
            }
        }
        if matches!(self.role, Role::Leader(_)) {
            self.append(produced, settles, now);
        } else {
            for (messages, _, reply) in produced {
                drop(messages);
                let _ = reply.send(Err(MqError::NotLeader(self.port())));
            }
            for (reply, _) in settles {
                let _ = reply.send(Err(MqError::NotLeader(self.port())));
            }
        }
        self.confirm();
        if matches!(self.role, Role::Leader(_)) {
            self.advance();
            self.dispatch(now);
        }
        self.answer_parked(false);
        self.reclaim();
        self.metrics.log_bytes.set(self.log.bytes() as i64);
    }

    fn port(&self) -> String {
        format!("mq/{}/{}", self.queue, self.index)
    }

    /// Appends the turn's produced messages and control records as one batch.
    fn append(
        &mut self,
        produced: Vec<(Vec<Outgoing>, Bytes, Produced)>,
        settles: Vec<(Done, bool)>,
        now: u64,
    ) {
        let default_ttl = self.config.ttl_ms;
        let limit = self.config.message_bytes_max as usize;
        let mut batch: Vec<Pending> = Vec::new();
        // Per produce: Ok(count) or the refusal. Retention is enforced on produces alone
        // (settlements in the same batch are what lets the log shrink).
        let mut accepted = Vec::with_capacity(produced.len());
        let mut adding = 0u64;
        for (messages, headers, _) in &produced {
            let size: u64 = messages
                .iter()
                .map(|m| (m.key.len() + m.payload.len() + headers.len()) as u64 + 48)
                .sum();
            if !self.log.has_room(adding + size) {
                accepted.push(Err(MqError::Full(format!(
                    "the partition holds {} of its {} bytes: wait for consumers to settle messages",
                    self.log.bytes(),
                    self.config.retention_bytes
                ))));
                continue;
            }
            adding += size;
            if let Some(m) = messages
                .iter()
                .find(|m| m.key.len() + m.payload.len() > limit)
            {
                let size = m.key.len() + m.payload.len();
                accepted.push(Err(MqError::TooLarge(format!(
                    "a message of {size} bytes is larger than the queue's limit of {limit}"
                ))));
                continue;
            }
            accepted.push(Ok(messages.len() as u32));
            for m in messages {
                let ttl = if m.ttl_ms > 0 { m.ttl_ms } else { default_ttl };
                batch.push(Pending {
                    key: m.key.clone(),
                    headers: headers.clone(),
                    payload: m.payload.clone(),
                    not_before_ms: if m.delay_ms > 0 { now + m.delay_ms } else { 0 },
                    expires_ms: if ttl > 0 { now + ttl } else { 0 },
                });
            }
        }
        let produced_count = batch.len();
        // The turn's new groups and settlements, as control records.
        for name in std::mem::take(&mut self.new_groups) {
            let selector = self
                .groups
                .get(&name)
                .and_then(|g| g.source())
                .map(str::to_string);
            batch.push(control(Control::Group { name, selector }));
        }
        for name in std::mem::take(&mut self.dropped_groups) {
            batch.push(control(Control::Ungroup { name }));
        }
        for (name, g) in self.groups.iter_mut() {
            let floor = g
                .delivery
                .as_ref()
                .map_or(g.acks.floor(), |d| d.low_water())
                .max(g.acks.floor());
            // Messages a selector skipped are settled without an entry each: the floor
            // passing them is what tells the replicas.
            let skipped_past =
                g.selector.is_some() && floor >= g.acks.floor().saturating_add(SKIPPED_FLOOR_STEP);
            if g.settled.is_empty() && !skipped_past {
                continue;
            }
            g.acks.raise_to(floor);
            if g.settled.is_empty() {
                batch.push(control(Control::Settle {
                    group: name.clone(),
                    floor,
                    entries: Vec::new(),
                }));
            }
            // In records well under the log's record limit (a SETTLE may hold 100,000).
            for entries in std::mem::take(&mut g.settled).chunks(SETTLED_PER_RECORD) {
                batch.push(control(Control::Settle {
                    group: name.clone(),
                    floor,
                    entries: entries.to_vec(),
                }));
            }
        }
        // Settlements are durable here before they are confirmed anywhere.
        let mut acks_result = Ok(());
        for g in self.groups.values_mut() {
            if let Err(e) = g.acks.flush() {
                acks_result = Err(io_error(e));
            }
        }
        let started = Instant::now();
        let result = if batch.is_empty() {
            Ok(self.log.end_offset())
        } else {
            let msgs: Vec<Message<'_>> = batch
                .iter()
                .map(|p| Message {
                    key: &p.key,
                    headers: &p.headers,
                    payload: &p.payload,
                    timestamp_ms: now,
                    not_before_ms: p.not_before_ms,
                    expires_ms: p.expires_ms,
                })
                .collect();
            self.log.append_unlimited(&msgs).map_err(io_error)
        };
        if !batch.is_empty() && self.config.fsync_every_batch {
            self.metrics
                .fsync_seconds
                .observe(started.elapsed().as_secs_f64());
        }
        let since = Instant::now();
        match result {
            Ok(first) => {
                let end = first + batch.len() as u64;
                for (i, p) in batch.into_iter().enumerate() {
                    let c = Cached {
                        timestamp_ms: now,
                        not_before_ms: p.not_before_ms,
                        expires_ms: p.expires_ms,
                        key: p.key,
                        headers: p.headers,
                        payload: p.payload,
                    };
                    self.cache.insert(first + i as u64, c);
                }
                self.metrics.produced.inc_by(produced_count as u64);
                let mut next = first;
                for ((_, _, reply), a) in produced.into_iter().zip(accepted) {
                    match a {
                        Ok(count) => {
                            self.unconfirmed.push_back(Unconfirmed {
                                end: next + u64::from(count),
                                since,
                                confirm: Confirm::Produce {
                                    reply,
                                    first: next,
                                    count,
                                },
                            });
                            next += u64::from(count);
                        }
                        Err(e) => {
                            let _ = reply.send(Err(e));
                        }
                    }
                }
                for (reply, needs_record) in settles {
                    match (&acks_result, needs_record) {
                        (Err(e), _) => {
                            let _ = reply.send(Err(e.clone()));
                        }
                        (Ok(()), false) => {
                            let _ = reply.send(Ok(()));
                        }
                        (Ok(()), true) => self.unconfirmed.push_back(Unconfirmed {
                            end,
                            since,
                            confirm: Confirm::Settle(reply),
                        }),
                    }
                }
                self.recompute_hw();
            }
            Err(e) => {
                for ((_, _, reply), a) in produced.into_iter().zip(accepted) {
                    let _ = reply.send(a.and(Err(e.clone())));
                }
                for (reply, _) in settles {
                    let _ = reply.send(Err(e.clone()));
                }
            }
        }
    }

    /// Leader: the high-water mark from what the replicas hold.
    fn recompute_hw(&mut self) {
        if !matches!(self.role, Role::Leader(_)) {
            return;
        }
        let end = self.log.end_offset();
        let config = self.configs.current();
        let end_of = |n: &str| {
            if n == self.me {
                end
            } else {
                self.matches.get(n).copied().unwrap_or(0)
            }
        };
        let slowest = config
            .members()
            .iter()
            .map(|n| end_of(n))
            .min()
            .unwrap_or(end);
        self.metrics.replica_lag.set((end - slowest) as i64);
        let hw = config.high_water(end_of);
        // Nothing counts as confirmed until a majority holds this epoch's first record.
        if hw > self.epoch_start && hw > self.hw {
            self.hw = hw;
        }
    }

    /// Answers what the high-water mark now covers; refuses what waited too long.
    fn confirm(&mut self) {
        self.advance_reconfig();
        while let Some(u) = self.unconfirmed.front() {
            let timed_out = u.since.elapsed() >= CONFIRM_TIMEOUT;
            if u.end > self.hw && !timed_out {
                break;
            }
            let u = self.unconfirmed.pop_front().expect("front");
            if u.end <= self.hw {
                match u.confirm {
                    Confirm::Produce {
                        reply,
                        first,
                        count,
                    } => {
                        let _ = reply.send(Ok((first, count)));
                    }
                    Confirm::Settle(reply) => {
                        let _ = reply.send(Ok(()));
                    }
                }
            } else {
                self.metrics.unconfirmed.inc();
                let e = MqError::Unavailable(format!(
                    "a majority of {}'s {} replicas did not confirm within {:?}",
                    self.port(),
                    self.replicas(),
                    CONFIRM_TIMEOUT
                ));
                match u.confirm {
                    Confirm::Produce { reply, .. } => {
                        let _ = reply.send(Err(e));
                    }
                    Confirm::Settle(reply) => {
                        let _ = reply.send(Err(e));
                    }
                }
            }
        }
    }

    /// Leader: hands newly confirmed messages to the delivery groups.
    fn advance(&mut self) {
        let upto = self.hw.min(self.delivered_upto + ADVANCE_MAX);
        while self.delivered_upto < upto {
            let at = self.delivered_upto;
            // From memory while the records there run on, else from the log.
            let mut recs: Vec<(u64, Cached)> = Vec::new();
            for (o, c) in self.cache.range(at..upto) {
                if o != at + recs.len() as u64 {
                    break;
                }
                recs.push((o, c.clone()));
            }
            if recs.is_empty() {
                match self.log.read(at, FETCH_BYTES) {
                    Ok(v) => recs.extend(
                        v.into_iter()
                            .filter(|r| r.offset < upto)
                            .map(|r| (r.offset, r.into())),
                    ),
                    Err(e) => {
                        tracing::error!(queue = %self.queue, partition = self.index, offset = at, error = %e, "cannot read confirmed messages");
                        return;
                    }
                }
            }
            if recs.is_empty() {
                return;
            }
            for (offset, c) in recs {
                self.delivered_upto = offset + 1;
                if c.is_control() {
                    continue;
                }
                let view = RecordView {
                    offset,
                    timestamp_ms: c.timestamp_ms,
                    key: &c.key,
                    headers: &c.headers,
                    payload: &c.payload,
                };
                // Built once for every group whose selector reads them (`json` above all).
                let memo = Memo::default();
                for g in self.groups.values_mut() {
                    if g.delivery.is_none() || g.acks.is_settled(offset) {
                        continue;
                    }
                    let admitted = g.admits(&view, &memo);
                    if let Some(d) = g.delivery.as_mut() {
                        if admitted {
                            let _ = d.append(Entry {
                                offset,
                                key: c.key.clone(),
                                not_before_ms: c.not_before_ms,
                                expires_ms: c.expires_ms,
                            });
                        } else {
                            let _ = d.skip(offset);
                        }
                    }
                }
            }
        }
    }

    fn subscribe(
        &mut self,
        group: &str,
        consumer: u64,
        credit: u32,
        sink: Sink,
        selector: Option<Arc<Selector>>,
    ) -> Result<bool, MqError> {
        if self.consumer_group.contains_key(&consumer) {
            return Err(MqError::BadRequest(format!(
                "consumer {consumer} is already subscribed"
            )));
        }
        let created = !self.groups.contains_key(group);
        let r = self.join(group, consumer, credit, sink, selector);
        if r.is_err() && created {
            // Refused after the group was made (a credit above the limit): unmade.
            self.drop_unused_group(group, false);
        }
        r.map(|()| created)
    }

    /// Drops a group that has no consumers and never settled anything (made by a
    /// subscription that was refused). `asked`: a connection asks after a refusal on
    /// another partition; on a broker not leading, only a group only it knows goes.
    fn drop_unused_group(&mut self, name: &str, asked: bool) {
        let leading = matches!(self.role, Role::Leader(_));
        let Some(g) = self.groups.get(name) else {
            return;
        };
        if !g.consumers.is_empty()
            || !g.settled.is_empty()
            || g.acks.any_settled()
            || (asked && !leading && !g.local)
        {
            return;
        }
        self.groups.remove(name);
        if let Some(i) = self.new_groups.iter().position(|n| n == name) {
            // Not written yet: the replicas never hear of it.
            self.new_groups.remove(i);
        } else if leading {
            self.dropped_groups.push(name.to_string());
        }
        self.remove_group_files(name);
    }

    /// Removes a dropped group's files (settlements, then selector) and syncs the
    /// directory, so that a restart does not find the group again.
    fn remove_group_files(&self, name: &str) {
        let dir = self.dir.join("groups");
        let acks = dir.join(format!("{name}.acks"));
        for path in [acks, self.selector_path(name)] {
            match std::fs::remove_file(&path) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => {
                    tracing::warn!(queue = %self.queue, partition = self.index, path = %path.display(), error = %e, "cannot remove a dropped group's file");
                }
            }
        }
        if let Err(e) = portswitch_files::sync_dir(&dir) {
            tracing::warn!(queue = %self.queue, partition = self.index, error = %e, "cannot sync the groups' directory");
        }
    }

    /// Joins `consumer` to `group`, making the group with `selector` if it is new here.
    fn join(
        &mut self,
        group: &str,
        consumer: u64,
        credit: u32,
        sink: Sink,
        selector: Option<Arc<Selector>>,
    ) -> Result<(), MqError> {
        match self.groups.get(group) {
            None => {
                self.create_group(group, selector).map_err(io_error)?;
                self.new_groups.push(group.to_string());
                if !matches!(self.role, Role::Leader(_)) {
                    if let Some(g) = self.groups.get_mut(group) {
                        g.local = true;
                    }
                }
            }
            Some(g) => {
                if g.unusable.is_some() {
                    return Err(MqError::Unavailable(format!(
                        "group {group:?} of {} has a selector this broker cannot apply (a newer broker's?): upgrade every broker before using selectors",
                        self.port()
                    )));
                }
                let has = g.source();
                let asks = selector.as_ref().map(|s| s.source());
                if has != asks {
                    let say = |s: Option<&str>| {
                        s.map_or("no selector".to_string(), |s| format!("selector {s:?}"))
                    };
                    return Err(MqError::SelectorMismatch(format!(
                        "group {group:?} of {} has {}; this subscription asks for {} (a group has one selector: use another group)",
                        self.port(),
                        say(has),
                        say(asks)
                    )));
                }
            }
        }
        if matches!(self.role, Role::Leader(_)) && self.groups[group].delivery.is_none() {
            self.start_delivery(group).map_err(io_error)?;
        }
        let g = self.groups.get_mut(group).expect("opened");
        if let Some(d) = g.delivery.as_mut() {
            d.join(consumer, credit).map_err(delivery_error)?;
        } else {
            let cfg = delivery_config(&self.config);
            if credit > cfg.credit_max {
                return Err(MqError::Limit(format!(
                    "credit {credit} is above the limit"
                )));
            }
        }
        g.consumers.insert(consumer, (credit, sink));
        self.consumer_group.insert(consumer, group.to_string());
        Ok(())
    }

    fn settle(
        &mut self,
        consumer: u64,
        settlements: Vec<Settlement>,
        reply: Done,
        now: u64,
        settles: &mut Vec<(Done, bool)>,
    ) {
        let Some(name) = self.consumer_group.get(&consumer).cloned() else {
            let _ = reply.send(Err(MqError::UnknownConsumer(consumer)));
            return;
        };
        let g = self
            .groups
            .get_mut(&name)
            .expect("a consumer's group exists");
        let Some(d) = g.delivery.as_mut() else {
            let _ = reply.send(Err(MqError::NotLeader(format!(
                "mq/{}/{}",
                self.queue, self.index
            ))));
            return;
        };
        let mut first_error = None;
        let mut dead = Vec::new();
        let mut recorded = false;
        for s in settlements {
            let r = match s.how {
                How::Ack => d.ack(consumer, s.offset).map(|()| {
                    g.acks.settle(s.offset, ACKED);
                    g.settled.push((s.offset, ACKED));
                    recorded = true;
                    self.metrics.acked.inc();
                }),
                How::Nack => d.nack(consumer, s.offset, s.delay_ms, now).map(|()| {
                    self.metrics.nacked.inc();
                }),
                How::Reject => d.reject(consumer, s.offset).map(|e| dead.push(e)),
                How::Progress => d.in_progress(consumer, s.offset, now),
            };
            if let Err(e) = r {
                first_error.get_or_insert(delivery_error(e));
            }
        }
        match first_error {
            // The valid ones are settled; the reply names the first that was not.
            Some(e) => {
                let _ = reply.send(Err(e));
            }
            None => settles.push((reply, recorded)),
        }
        for e in dead {
            if let Effect::DeadLetter { offset, reason } = e {
                self.dead_letter(&name, offset, reason);
            }
        }
    }

    // ---- replication

    /// A replica's fetch (at the leader), or a new leader catching up (anywhere).
    fn fetch(
        &mut self,
        replica: String,
        token: u64,
        offset: u64,
        hw: u64,
        epochs: Vec<(u64, u64)>,
        reply: FetchReply,
    ) {
        let end = self.log.end_offset();
        let agree = replica::agreement(&epochs, offset, &self.epochs.list, end);
        match self.role {
            Role::Leader(t) if t == token => {
                // Any replica's progress is kept (one being added counts once a
                // configuration with it is in effect).
                if self.matches.len() < 256 || self.matches.contains_key(&replica) {
                    self.matches.insert(replica, agree);
                }
                self.recompute_hw();
                if agree == offset && offset == end && hw >= self.hw {
                    self.parked.push(Parked {
                        offset,
                        hw,
                        token,
                        until: Instant::now() + FETCH_WAIT,
                        reply,
                    });
                } else {
                    let _ = reply.send(Ok(self.fetched(token, true, offset, agree)));
                }
            }
            _ if token >= self.epochs.promised && token > 0 => {
                // A candidate catching up from this replica's log.
                let promised = self.epochs.promised;
                let _ = reply.send(Ok(self.fetched(promised, false, offset, agree)));
            }
            _ => {
                let _ = reply.send(Err(MqError::Fenced(format!(
                    "token {token} is below {} this replica follows",
                    self.epochs.promised
                ))));
            }
        }
    }

    /// An answer to a fetch from `offset`, with records only if the fetcher's log
    /// agrees with this one up to `offset`.
    fn fetched(&mut self, token: u64, leader: bool, offset: u64, agree: u64) -> FetchedData {
        let mut records = Vec::new();
        let end = self.log.end_offset();
        let start = self.log.start_offset();
        if agree == offset && offset < end && offset >= start {
            let mut bytes = 0;
            let mut at = offset;
            while at < end && bytes < REPLICA_FETCH_BYTES {
                if let Some(c) = self.cache.get(&at) {
                    bytes += c.size();
                    records.push(c.replicated(at));
                    at += 1;
                    continue;
                }
                match self.log.read(at, REPLICA_FETCH_BYTES - bytes) {
                    Ok(v) if !v.is_empty() => {
                        for r in v {
                            if self.cache.contains_key(&r.offset) {
                                break;
                            }
                            at = r.offset + 1;
                            let c: Cached = r.into();
                            bytes += c.size();
                            records.push(c.replicated(at - 1));
                        }
                    }
                    Ok(_) => break,
                    Err(e) => {
                        tracing::error!(queue = %self.queue, partition = self.index, offset = at, error = %e, "cannot read records for a replica");
                        break;
                    }
                }
            }
        }
        FetchedData {
            token,
            leader,
            hw: self.hw,
            start,
            end,
            epochs: self.epochs.list.clone(),
            records,
        }
    }

    /// Answers held fetches that now have something (or every one, when `all`).
    fn answer_parked(&mut self, all: bool) {
        if self.parked.is_empty() {
            return;
        }
        let end = self.log.end_offset();
        let now = Instant::now();
        let leading = self.role;
        let parked = std::mem::take(&mut self.parked);
        for p in parked {
            let still = matches!(leading, Role::Leader(t) if t == p.token);
            if all || !still || p.offset < end || self.hw > p.hw || now >= p.until {
                let answer = if still {
                    Ok(self.fetched(p.token, true, p.offset, p.offset))
                } else {
                    Err(MqError::NotLeader(self.port()))
                };
                let _ = p.reply.send(answer);
            } else {
                self.parked.push(p);
            }
        }
    }

    /// Fences this replica at `token` (refusing lower ones from now on) and says what
    /// its log holds; `candidate`: this broker owns the port with it.
    fn survey(&mut self, token: u64, candidate: bool) -> Result<replica::Survey, MqError> {
        if token < self.epochs.promised || token == 0 {
            return Err(MqError::Fenced(format!(
                "token {token} is below {} this replica follows",
                self.epochs.promised
            )));
        }
        if token > self.epochs.promised {
            self.epochs.promised = token;
            self.epochs
                .save(&self.dir.join("epochs"))
                .map_err(io_error)?;
        }
        match self.role {
            Role::Leader(t) | Role::Candidate(t) if t != token => {
                self.demote("a newer leader fenced this replica")
            }
            _ => {}
        }
        if candidate {
            self.role = Role::Candidate(token);
        }
        Ok(replica::Survey {
            end: self.log.end_offset(),
            epochs: self.epochs.list.clone(),
        })
    }

    /// Takes records fetched from the leader (or from the best replica while catching
    /// up): cuts what disagrees with it, appends the rest.
    fn apply(
        &mut self,
        f: FetchedData,
        token: u64,
        catching_up: bool,
    ) -> Result<ReplicaState, MqError> {
        if catching_up {
            if self.role != Role::Candidate(token) || f.token > token {
                return Err(MqError::Fenced(
                    "no longer a candidate with this token".into(),
                ));
            }
        } else {
            if self.role != Role::Follower {
                return Err(MqError::BadRequest("leading: not following".into()));
            }
            if !f.leader || f.token != token || f.token < self.epochs.promised {
                return Err(MqError::Fenced(format!(
                    "the answer's token {} is not the leader's this replica follows ({})",
                    f.token, self.epochs.promised
                )));
            }
            if f.token > self.epochs.promised {
                self.epochs.promised = f.token;
                self.epochs
                    .save(&self.dir.join("epochs"))
                    .map_err(io_error)?;
            }
        }
        // So far behind that the other log no longer has what follows this one (every
        // group settled it and it was reclaimed): start again where it starts.
        if self.log.end_offset() < f.start {
            tracing::warn!(queue = %self.queue, partition = self.index, end = self.log.end_offset(), start = f.start, "behind the leader's first record: starting this replica's log again there");
            // The history first: a crash before the log is emptied resets again.
            self.epochs.list.clear();
            self.epochs.follow(&f.epochs, f.start + 1);
            self.epochs.fold_below(f.start);
            self.epochs
                .save(&self.dir.join("epochs"))
                .map_err(io_error)?;
            self.log.reset(f.start).map_err(io_error)?;
            self.cache.split_off(&0);
            // The configurations it knows are older than what comes; the current one
            // is in what comes (a leader never lets it fall below its log's start).
            for g in self.groups.values_mut() {
                g.acks.raise_to(f.start);
                g.acks.flush().map_err(io_error)?;
            }
        }
        let end = self.log.end_offset();
        let agree = replica::agreement(&self.epochs.list, end, &f.epochs, f.end);
        if agree < end {
            if agree < self.hw {
                tracing::error!(queue = %self.queue, partition = self.index, agree, hw = self.hw, "a leader disagrees with confirmed records");
            }
            if agree < self.log.start_offset() {
                return Err(MqError::Io(format!(
                    "the leader disagrees below this replica's first record ({agree})"
                )));
            }
            self.log.truncate(agree).map_err(io_error)?;
            self.epochs.truncate(agree);
            if self.configs.truncate(agree) {
                self.save_configs()?;
            }
            self.epochs
                .save(&self.dir.join("epochs"))
                .map_err(io_error)?;
            self.metrics.truncated.inc_by(end - agree);
            self.cache.split_off(&agree);
            tracing::warn!(queue = %self.queue, partition = self.index, from = agree, records = end - agree, "cut records the leader does not have");
        }
        let end = self.log.end_offset();
        let records: Vec<&Replicated> = f.records.iter().filter(|r| r.offset >= end).collect();
        if let Some(first) = records.first() {
            if first.offset != end || records.windows(2).any(|w| w[1].offset != w[0].offset + 1) {
                return Err(MqError::BadRequest(format!(
                    "records from {} do not follow this replica's end {end}",
                    first.offset
                )));
            }
            let new_end = end + records.len() as u64;
            let before = self.epochs.list.clone();
            self.epochs.follow(&f.epochs, new_end);
            if self.epochs.list != before {
                self.epochs
                    .save(&self.dir.join("epochs"))
                    .map_err(io_error)?;
            }
            let msgs: Vec<Message<'_>> = records
                .iter()
                .map(|r| Message {
                    key: &r.key,
                    headers: &r.headers,
                    payload: &r.payload,
                    timestamp_ms: r.timestamp_ms,
                    not_before_ms: r.not_before_ms,
                    expires_ms: r.expires_ms,
                })
                .collect();
            // Control records: the groups' settlements and the replicas in force, kept
            // by every replica — written before the records that carry them, so a
            // crash in between leaves them ahead of the log (settlements of confirmed
            // messages; configurations cut back to the log's end on opening), never
            // behind it.
            for r in &records {
                if r.headers.as_ref() != CONTROL_HEADERS {
                    continue;
                }
                match Control::decode(&r.payload) {
                    Some(Control::Group { name, selector }) => {
                        self.group_from_leader(&name, selector);
                    }
                    Some(Control::Settle {
                        group,
                        floor,
                        entries,
                    }) => {
                        // A group this replica never saw named (its record reclaimed
                        // before this replica got it): kept without a selector.
                        if self.groups.contains_key(&group)
                            || self.create_group(&group, None).is_ok()
                        {
                            let g = self.groups.get_mut(&group).expect("opened");
                            for (o, k) in entries {
                                g.acks.settle(o, k);
                            }
                            g.acks.raise_to(floor);
                        }
                    }
                    Some(Control::Ungroup { name }) => {
                        // Kept while consumers of this broker are joined to it.
                        if self
                            .groups
                            .get(&name)
                            .is_some_and(|g| g.consumers.is_empty())
                        {
                            self.groups.remove(&name);
                            self.remove_group_files(&name);
                        }
                    }
                    Some(Control::Replicas { old, new }) => {
                        self.configs.push(r.offset, replica::Config { old, new });
                        self.save_configs()?;
                    }
                    Some(Control::Epoch { .. }) => {}
                    None => {
                        tracing::warn!(queue = %self.queue, partition = self.index, offset = r.offset, "a control record this broker cannot read")
                    }
                }
            }
            for g in self.groups.values_mut() {
                g.acks.flush().map_err(io_error)?;
            }
            // A replica keeps what its leader accepted: retention is the leader's to
            // enforce (on producers).
            self.log.append_unlimited(&msgs).map_err(io_error)?;
        }
        let end = self.log.end_offset();
        self.hw = self.hw.max(f.hw.min(end)).min(end);
        Ok(self.state())
    }

    fn has_selectors(&self) -> bool {
        self.groups.values().any(|g| g.source().is_some())
    }

    /// Leader: appends a group control record for every group (with its selector), as
    /// one batch, and remembers where.
    fn append_roster(&mut self) -> Result<(), MqError> {
        let recs: Vec<Pending> = self
            .groups
            .iter()
            .map(|(name, g)| {
                control(Control::Group {
                    name: name.clone(),
                    selector: g.source().map(str::to_string),
                })
            })
            .collect();
        if recs.is_empty() {
            return Ok(());
        }
        let now = now_ms();
        let msgs: Vec<Message<'_>> = recs
            .iter()
            .map(|p| Message {
                key: &p.key,
                headers: &p.headers,
                payload: &p.payload,
                timestamp_ms: now,
                ..Default::default()
            })
            .collect();
        let first = self.log.append_unlimited(&msgs).map_err(io_error)?;
        for (i, p) in recs.into_iter().enumerate() {
            self.cache.insert(
                first + i as u64,
                Cached {
                    timestamp_ms: now,
                    not_before_ms: 0,
                    expires_ms: 0,
                    key: p.key,
                    headers: p.headers,
                    payload: p.payload,
                },
            );
        }
        self.roster_at = Some(first);
        self.recompute_hw();
        Ok(())
    }

    /// Appends one control record by itself (a leader's configuration change).
    fn append_control(&mut self, c: Control) -> Result<u64, MqError> {
        let rec = control(c.clone());
        let now = now_ms();
        // The configuration file first (cut back to the log's end on opening if the
        // record does not follow).
        let at = self.log.end_offset();
        if let Control::Replicas { old, new } = c {
            self.configs.push(at, replica::Config { old, new });
            self.save_configs()?;
        }
        // Control records are not refused for retention: they are what lets it shrink.
        let appended = self.log.append_unlimited(&[Message {
            key: &rec.key,
            headers: &rec.headers,
            payload: &rec.payload,
            timestamp_ms: now,
            ..Default::default()
        }]);
        let offset = match appended {
            Ok(o) => o,
            Err(e) => {
                if self.configs.truncate(at) {
                    let _ = self.save_configs();
                }
                return Err(io_error(e));
            }
        };
        let cached = Cached {
            timestamp_ms: now,
            not_before_ms: 0,
            expires_ms: 0,
            key: rec.key,
            headers: rec.headers,
            payload: rec.payload,
        };
        self.cache.insert(offset, cached);
        self.recompute_hw();
        Ok(offset)
    }

    /// Leader: begins replacing replica `from` by `to`.
    fn reconfigure(&mut self, from: String, to: String, reply: Done) {
        let current = self.configs.current();
        let refuse = |why: String| Err(MqError::BadRequest(why));
        let check = if !matches!(self.role, Role::Leader(_)) {
            Err(MqError::NotLeader(self.port()))
        } else if self.reconfig.is_some() || current.is_joint() {
            refuse("a change of replicas is under way".into())
        } else if self.hw <= self.epoch_start {
            Err(MqError::Unavailable(
                "the leader's epoch is not confirmed yet: try again".into(),
            ))
        } else if !current.new.contains(&from) {
            refuse(format!("{from} is not a replica of {}", self.port()))
        } else if current.new.contains(&to) {
            refuse(format!("{to} is a replica of {} already", self.port()))
        } else {
            Ok(())
        };
        // Asked again after it was done (the answer was lost): done. Asked again while
        // it is under way: answered with it.
        let done = !current.is_joint() && current.new.contains(&to) && !current.new.contains(&from);
        if check.is_err() && done && matches!(self.role, Role::Leader(_)) {
            let _ = reply.send(Ok(()));
            return;
        }
        if let Some(r) = self.reconfig.as_mut() {
            if current.is_joint() && r.new.contains(&to) && !r.new.contains(&from) {
                r.replies.push(reply);
                return;
            }
        }
        if let Err(e) = check {
            let _ = reply.send(Err(e));
            return;
        }
        // The new broker takes the old one's place (and so its preferred partitions).
        let new: Vec<String> = current
            .new
            .iter()
            .map(|n| if *n == from { to.clone() } else { n.clone() })
            .collect();
        match self.append_control(Control::Replicas {
            old: current.new.clone(),
            new: new.clone(),
        }) {
            Ok(offset) => {
                tracing::info!(queue = %self.queue, partition = self.index, from, to, "changing replicas");
                self.reconfig = Some(Reconfig {
                    new,
                    joint_end: offset + 1,
                    final_end: None,
                    replies: vec![reply],
                });
            }
            Err(e) => {
                let _ = reply.send(Err(e));
            }
        }
    }

    /// Moves a change of replicas on as the high-water mark passes its records.
    fn advance_reconfig(&mut self) {
        let Some(r) = self.reconfig.as_ref() else {
            return;
        };
        match r.final_end {
            None if self.hw >= r.joint_end => {
                let new = r.new.clone();
                match self.append_control(Control::Replicas {
                    old: new.clone(),
                    new,
                }) {
                    Ok(offset) => {
                        if let Some(r) = self.reconfig.as_mut() {
                            r.final_end = Some(offset + 1);
                        }
                    }
                    Err(e) => {
                        if let Some(r) = self.reconfig.take() {
                            for reply in r.replies {
                                let _ = reply.send(Err(e.clone()));
                            }
                        }
                    }
                }
            }
            Some(end) if self.hw >= end => {
                if let Some(r) = self.reconfig.take() {
                    tracing::info!(queue = %self.queue, partition = self.index, replicas = ?r.new, "replicas changed");
                    for reply in r.replies {
                        let _ = reply.send(Ok(()));
                    }
                }
            }
            _ => {}
        }
    }

    /// The candidate holds every confirmed record: begins its epoch with a record of
    /// its own, and serves.
    fn lead(&mut self, token: u64) -> Result<(), MqError> {
        if self.role != Role::Candidate(token) {
            return Err(MqError::Fenced(
                "no longer a candidate with this token".into(),
            ));
        }
        if !self.configs.current().contains(&self.me) {
            return Err(MqError::Fenced(format!(
                "{} is not a replica of {} any more",
                self.me,
                self.port()
            )));
        }
        let end = self.log.end_offset();
        match self.epochs.list.last().copied() {
            // Granted the same token again (this session kept the port): the epoch goes
            // on as it was; its first record is where it began.
            Some((e, s)) if e == token => self.epoch_start = s,
            Some((e, _)) if e > token => {
                return Err(MqError::Fenced(format!(
                    "token {token} is below epoch {e} of this log"
                )))
            }
            _ => {
                if !self.epochs.begin(token, end) {
                    return Err(MqError::Limit(format!(
                        "the partition's epoch history is full ({} leader changes)",
                        replica::EPOCHS_MAX
                    )));
                }
                self.epochs
                    .save(&self.dir.join("epochs"))
                    .map_err(io_error)?;
                let rec = control(Control::Epoch { token });
                self.log
                    .append_unlimited(&[Message {
                        key: &rec.key,
                        headers: &rec.headers,
                        payload: &rec.payload,
                        timestamp_ms: now_ms(),
                        ..Default::default()
                    }])
                    .map_err(io_error)?;
                self.epoch_start = end;
            }
        }
        // A change of replicas a former leader began is finished by this one.
        let current = self.configs.current();
        if current.is_joint() && self.reconfig.is_none() {
            let joint_end = self.configs.current_offset().map_or(0, |o| o + 1);
            let (reply, _) = oneshot::channel();
            self.reconfig = Some(Reconfig {
                new: current.new.clone(),
                joint_end,
                final_end: None,
                replies: vec![reply],
            });
        }
        self.role = Role::Leader(token);
        self.matches.clear();
        self.roster_at = None;
        if self.has_selectors() {
            if let Err(e) = self.append_roster() {
                tracing::warn!(queue = %self.queue, partition = self.index, error = %e, "cannot write the groups' roster");
            }
        }
        // Confirmed messages are delivered from the lowest unsettled one on.
        self.delivered_upto = self
            .groups
            .values()
            .map(|g| g.acks.floor())
            .min()
            .unwrap_or(end)
            .min(self.hw)
            .max(self.log.start_offset());
        let names: Vec<String> = self.groups.keys().cloned().collect();
        for name in names {
            self.start_delivery(&name).map_err(io_error)?;
        }
        self.recompute_hw();
        self.serving.store(true, Ordering::Release);
        self.metrics.elections.inc();
        tracing::info!(queue = %self.queue, partition = self.index, token, end, "leading");
        Ok(())
    }

    /// Stops leading: what waits for confirmation is refused (produce again:
    /// at-least-once), deliveries in flight come again from the next leader.
    fn demote(&mut self, why: &str) {
        if self.role == Role::Follower {
            return;
        }
        tracing::warn!(queue = %self.queue, partition = self.index, why, "no longer leading");
        self.role = Role::Follower;
        self.serving.store(false, Ordering::Release);
        if let Some(r) = self.reconfig.take() {
            for reply in r.replies {
                let _ = reply.send(Err(MqError::NotLeader(format!(
                    "mq/{}/{}: the change of replicas was cut short; ask again",
                    self.queue, self.index
                ))));
            }
        }
        for u in self.unconfirmed.drain(..) {
            let e = MqError::NotLeader(format!("mq/{}/{}", self.queue, self.index));
            match u.confirm {
                Confirm::Produce { reply, .. } => {
                    let _ = reply.send(Err(e));
                }
                Confirm::Settle(reply) => {
                    let _ = reply.send(Err(e));
                }
            }
        }
        for g in self.groups.values_mut() {
            g.delivery = None;
            g.settled.clear();
        }
        self.new_groups.clear();
        self.dropped_groups.clear();
        self.matches.clear();
        self.answer_parked(true);
    }

    /// Deletes segments every group settled (and that a majority holds).
    fn reclaim(&mut self) {
        let low = self
            .groups
            .values()
            .map(|g| {
                g.delivery
                    .as_ref()
                    .map_or(g.acks.floor(), |d| d.low_water().max(g.acks.floor()))
            })
            .min();
        if let Some(low) = low {
            // The current configuration's record stays in the log (a replica that
            // starts again at the log's start must find it): a leader about to reclaim
            // past it writes it again.
            let config_at = self.configs.current_offset().unwrap_or(u64::MAX);
            if config_at < low && matches!(self.role, Role::Leader(_)) {
                let c = self.configs.current();
                if !c.is_joint() && self.reconfig.is_none() {
                    if let Err(e) = self.append_control(Control::Replicas {
                        old: c.new.clone(),
                        new: c.new,
                    }) {
                        tracing::warn!(queue = %self.queue, error = %e, "cannot write the configuration again");
                    }
                }
            }
            let mut low = low.min(self.hw).min(config_at);
            // Nor past the last roster of the groups' selectors: a leader about to
            // reclaim past it writes it again.
            if matches!(self.role, Role::Leader(_)) && self.has_selectors() {
                let at = self.roster_at.unwrap_or(0);
                if at < low && self.log.would_reclaim(low) {
                    if let Err(e) = self.append_roster() {
                        tracing::warn!(queue = %self.queue, error = %e, "cannot write the groups' roster again");
                    }
                }
                low = low.min(self.roster_at.unwrap_or(0));
            }
            match self.log.reclaim(low) {
                Ok(n) if n > 0 => {
                    self.metrics.segments_reclaimed.inc_by(n as u64);
                    self.epochs.fold_below(self.log.start_offset());
                    if self.configs.fold_below(self.log.start_offset()) {
                        let _ = self.save_configs();
                    }
                }
                Ok(_) => {}
                Err(e) => {
                    tracing::warn!(queue = %self.queue, error = %e, "reclaiming segments failed")
                }
            }
        }
    }

    /// Hands due messages to consumers and dead letters to the dead-letter queue.
    fn dispatch(&mut self, now: u64) {
        self.fetched.clear();
        let names: Vec<String> = self.groups.keys().cloned().collect();
        for name in names {
            let Some(d) = self.groups.get_mut(&name).and_then(|g| g.delivery.as_mut()) else {
                continue;
            };
            let effects = d.poll(now);
            // Messages no longer in memory are read from the log a run at a time.
            let mut missing: Vec<u64> = effects
                .iter()
                .filter_map(|e| match e {
                    Effect::Deliver { offset, .. } if !self.cache.contains_key(offset) => {
                        Some(*offset)
                    }
                    _ => None,
                })
                .collect();
            missing.sort_unstable();
            for offset in missing {
                if self.fetched.contains_key(&offset) {
                    continue;
                }
                match self.log.read(offset, FETCH_BYTES) {
                    Ok(records) => {
                        for r in records {
                            self.fetched.insert(r.offset, r.into());
                        }
                    }
                    Err(e) => {
                        tracing::error!(queue = %self.queue, partition = self.index, offset, error = %e, "cannot read messages to deliver")
                    }
                }
            }
            // Each consumer's deliveries of this turn travel together.
            let mut out: HashMap<u64, Vec<Delivery>> = HashMap::new();
            for e in effects {
                match e {
                    Effect::Deliver {
                        consumer,
                        offset,
                        attempt,
                    } => {
                        let Some(rec) = self.record(offset) else {
                            continue;
                        };
                        if attempt > 1 {
                            self.metrics.redelivered.inc();
                        }
                        self.metrics.delivered.inc();
                        out.entry(consumer).or_default().push(Delivery {
                            consumer,
                            partition: self.index,
                            offset,
                            attempt,
                            timestamp_ms: rec.timestamp_ms,
                            key: rec.key,
                            headers: rec.headers,
                            payload: rec.payload,
                        });
                    }
                    Effect::DeadLetter { offset, reason } => {
                        self.dead_letter(&name, offset, reason)
                    }
                }
            }
            let g = self.groups.get_mut(&name).expect("listed");
            for (consumer, list) in out {
                if let Some((_, sink)) = g.consumers.get(&consumer) {
                    let _ = sink.send(list);
                }
            }
            if let Some(d) = g.delivery.as_ref() {
                let st = d.stats();
                let labels = self.metrics.group(&name);
                labels.0.set(st.outstanding as i64);
                labels.1.set(st.in_flight as i64);
            }
        }
    }

    /// The record at `offset`, from memory or the log.
    fn record(&mut self, offset: u64) -> Option<Cached> {
        if let Some(r) = self
            .cache
            .get(&offset)
            .or_else(|| self.fetched.get(&offset))
        {
            return Some(r.clone());
        }
        match self.log.read(offset, 1) {
            Ok(mut v) if !v.is_empty() && v[0].offset == offset => Some(v.swap_remove(0).into()),
            Ok(_) => None,
            Err(e) => {
                tracing::error!(queue = %self.queue, partition = self.index, offset, error = %e, "cannot read a message to deliver");
                None
            }
        }
    }

    fn dead_letter(&mut self, group: &str, offset: u64, reason: DeadReason) {
        self.metrics.dead_lettered.inc();
        let dlq = self.config.dead_letter_queue.clone();
        let target = if dlq.is_empty() {
            None
        } else {
            self.catalog.partition_led_here(&dlq)
        };
        let Some(target) = target else {
            if !dlq.is_empty() {
                if self.catalog.has_queue(&dlq) {
                    // The dead-letter queue is led elsewhere: the message stays
                    // unsettled and is dead-lettered again by the next leader of this
                    // partition that also leads a partition of the dead-letter queue.
                    tracing::warn!(queue = %self.queue, dlq = %dlq, offset, "no partition of the dead-letter queue is led by this broker: the dead letter waits");
                    return;
                }
                tracing::warn!(queue = %self.queue, dlq = %dlq, offset, "the dead-letter queue does not exist: the message is dropped");
                self.metrics.dead_letter_dropped.inc();
            }
            if let Some(g) = self.groups.get_mut(group) {
                if !g.acks.is_settled(offset) {
                    g.acks.settle(offset, DEAD);
                    g.settled.push((offset, DEAD));
                }
            }
            return;
        };
        let Some(rec) = self.record(offset) else {
            return;
        };
        let headers = format!(
            "reason={}\nqueue={}\npartition={}\noffset={offset}\ngroup={group}\n",
            reason.name(),
            self.queue,
            self.index
        );
        let headers = Bytes::from(headers);
        let me = self.catalog.partition_sender(&self.queue, self.index);
        let group = group.to_string();
        let message = Outgoing {
            key: rec.key.clone(),
            payload: rec.payload.clone(),
            delay_ms: 0,
            ttl_ms: 0,
        };
        tokio::spawn(async move {
            let (tx, rx) = oneshot::channel();
            let sent = target
                .send(Cmd::Produce {
                    messages: vec![message],
                    headers,
                    reply: tx,
                })
                .await;
            match (sent, rx.await) {
                (Ok(()), Ok(Ok(_))) => {
                    if let Some(me) = me {
                        let _ = me.send(Cmd::DeadConfirmed { group, offset }).await;
                    }
                }
                // Not settled: the next leader dead-letters the message again.
                (_, other) => {
                    tracing::warn!(offset, result = ?other.map(|r| r.map(|_| ())), "a dead letter did not reach its queue")
                }
            }
        });
    }

    fn stats(&self) -> Vec<(String, u64)> {
        let p = self.index;
        let (role, token) = match self.role {
            Role::Follower => (0, self.epochs.promised),
            Role::Candidate(t) => (1, t),
            Role::Leader(t) => (2, t),
        };
        let mut v = vec![
            (format!("p{p}.start_offset"), self.log.start_offset()),
            (format!("p{p}.end_offset"), self.log.end_offset()),
            (format!("p{p}.high_water"), self.hw),
            (format!("p{p}.role"), role),
            (format!("p{p}.token"), token),
            (format!("p{p}.replicas"), self.replicas() as u64),
            (
                format!("p{p}.changing_replicas"),
                u64::from(self.configs.current().is_joint()),
            ),
            (format!("p{p}.log_bytes"), self.log.bytes()),
            (format!("p{p}.segments"), self.log.segments() as u64),
        ];
        for (name, g) in &self.groups {
            let Some(d) = g.delivery.as_ref() else {
                v.push((format!("p{p}.group.{name}.floor"), g.acks.floor()));
                continue;
            };
            let st = d.stats();
            v.push((format!("p{p}.group.{name}.depth"), st.outstanding as u64));
            v.push((format!("p{p}.group.{name}.ready"), st.ready as u64));
            v.push((format!("p{p}.group.{name}.delayed"), st.delayed as u64));
            v.push((format!("p{p}.group.{name}.in_flight"), st.in_flight as u64));
            v.push((format!("p{p}.group.{name}.consumers"), st.consumers as u64));
            v.push((format!("p{p}.group.{name}.low_water"), d.low_water()));
            if g.selector.is_some() {
                v.push((format!("p{p}.group.{name}.skipped"), st.skipped));
            }
        }
        v
    }
}

fn control(c: Control) -> Pending {
    Pending {
        key: Bytes::new(),
        headers: Bytes::from_static(CONTROL_HEADERS),
        payload: Bytes::from(c.encode()),
        not_before_ms: 0,
        expires_ms: 0,
    }
}

fn delivery_error(e: DeliveryError) -> MqError {
    match e {
        DeliveryError::UnknownConsumer(c) => MqError::UnknownConsumer(c),
        DeliveryError::NotInFlight(o) => MqError::NotInFlight(o),
        DeliveryError::ConsumerExists(c) => {
            MqError::BadRequest(format!("consumer {c} is already subscribed"))
        }
        other => MqError::Limit(other.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cached(n: usize) -> Cached {
        Cached {
            timestamp_ms: 0,
            not_before_ms: 0,
            expires_ms: 0,
            key: Bytes::new(),
            headers: Bytes::new(),
            payload: Bytes::from(vec![0u8; n]),
        }
    }

    #[test]
    fn the_window_keeps_consecutive_records_within_its_bytes() {
        let mut w = Window::default();
        for o in 10..20 {
            w.insert(o, cached(100));
        }
        assert_eq!((w.base, w.end(), w.bytes), (10, 20, 10 * 164));
        assert!(w.get(&9).is_none() && w.get(&20).is_none());
        assert_eq!(w.get(&15).unwrap().payload.len(), 100);
        let r: Vec<u64> = w.range(5..13).map(|(o, _)| o).collect();
        assert_eq!(r, vec![10, 11, 12]);
        assert_eq!(w.range(25..30).count(), 0);
        w.split_off(&17);
        assert_eq!((w.end(), w.bytes), (17, 7 * 164));
        assert_eq!(w.pop_first().map(|(o, _)| o), Some(10));
        // A record that does not follow starts the window anew.
        w.insert(40, cached(1));
        assert_eq!((w.base, w.end(), w.bytes), (40, 41, 65));
        // Past its bytes the oldest go.
        for o in 41..41 + (CACHE_BYTES_MAX / 65_600) as u64 + 10 {
            w.insert(o, cached(65_536));
        }
        assert!(w.bytes <= CACHE_BYTES_MAX);
        assert!(w.base > 40);
    }

    #[test]
    fn control_records_round_trip_and_garbage_is_none() {
        for c in [
            Control::Epoch { token: 7 << 32 | 3 },
            Control::Ungroup { name: "g".into() },
            Control::Group {
                name: "g".into(),
                selector: None,
            },
            Control::Group {
                name: "g".into(),
                selector: Some("offset > 3".into()),
            },
            Control::Settle {
                group: "workers".into(),
                floor: 10,
                entries: vec![(11, ACKED), (14, DEAD)],
            },
        ] {
            assert_eq!(Control::decode(&c.encode()), Some(c));
        }
        assert_eq!(Control::decode(&[]), None);
        assert_eq!(Control::decode(&[3, 0, 1, b'g', 0, 0]), None);
        assert_eq!(Control::decode(&[9]), None);
    }
}
