//! One partition's actor: it alone owns the partition's log and its groups' delivery
//! state and settlement files. Commands arrive on a channel; each turn of the loop
//! takes every command waiting (up to a limit), appends all produced messages as one
//! batch (one write, one fsync: group commit), writes every group's settlements with
//! one fsync each, and only then confirms them; then it hands due messages to
//! consumers and dead letters to the dead-letter queue.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use tokio::sync::{mpsc, oneshot};

use super::metrics::QueueMetrics;
use super::{Catalog, MqError};
use crate::acks::{Acks, ACKED, DEAD};
use crate::delivery::{DeadReason, DeliveryConfig, DeliveryError, Effect, Entry, Group};
use crate::log::{Fsync, Log, LogConfig, LogError, Message, Record};

/// A message kept in memory for delivery (its bytes shared with the request that
/// brought it, or with the log read that found it).
#[derive(Clone)]
struct Cached {
    timestamp_ms: u64,
    key: Bytes,
    headers: Bytes,
    payload: Bytes,
}

impl Cached {
    fn size(&self) -> usize {
        self.key.len() + self.headers.len() + self.payload.len() + 64
    }
}

impl From<Record> for Cached {
    fn from(r: Record) -> Cached {
        Cached {
            timestamp_ms: r.timestamp_ms,
            key: r.key.into(),
            headers: r.headers.into(),
            payload: r.payload.into(),
        }
    }
}
use crate::proto::{Delivery, How, Outgoing, QueueConfig, Settlement};

/// Commands taken in one turn at most.
const TURN_COMMANDS_MAX: usize = 4096;
/// Bytes of recent records kept in memory for delivery.
const CACHE_BYTES_MAX: usize = 16 << 20;
/// Bytes read from the log at once for deliveries no longer in memory.
const FETCH_BYTES: usize = 1 << 20;
/// How often a partition whose queue syncs on a timer syncs.
pub const SYNC_INTERVAL: Duration = Duration::from_millis(50);

pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Where a produce's outcome goes: (first offset, count).
pub type Produced = oneshot::Sender<Result<(u64, u32), MqError>>;

/// A produce waiting for the turn's batch: messages, broker headers, reply.
type Pending = (Vec<Outgoing>, Bytes, Produced);

/// Where a consumer's deliveries go, a turn's at a time.
pub type Sink = mpsc::UnboundedSender<Vec<Delivery>>;

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
        reply: oneshot::Sender<Result<(), MqError>>,
    },
    Credit {
        consumer: u64,
        credit: u32,
    },
    Settle {
        consumer: u64,
        settlements: Vec<Settlement>,
        reply: oneshot::Sender<Result<(), MqError>>,
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
    Stop {
        reply: oneshot::Sender<()>,
    },
}

struct GroupState {
    delivery: Group,
    acks: Acks,
    consumers: HashMap<u64, Sink>,
    /// Settlements waiting for their fsync.
    waiting: Vec<oneshot::Sender<Result<(), MqError>>>,
}

pub struct Partition {
    queue: String,
    index: u16,
    config: QueueConfig,
    dir: PathBuf,
    log: Log,
    groups: BTreeMap<String, GroupState>,
    /// consumer -> its group.
    consumer_group: HashMap<u64, String>,
    cache: BTreeMap<u64, Cached>,
    cache_bytes: usize,
    /// Records read from the log for this turn's deliveries.
    fetched: std::collections::HashMap<u64, Cached>,
    catalog: Arc<Catalog>,
    metrics: QueueMetrics,
    /// Whether this broker owns the partition's port (serves it).
    pub serving: Arc<std::sync::atomic::AtomicBool>,
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

impl Partition {
    /// Opens the partition's log and groups from `dir` (created if missing).
    pub fn open(
        queue: &str,
        index: u16,
        config: QueueConfig,
        dir: PathBuf,
        catalog: Arc<Catalog>,
        metrics: QueueMetrics,
    ) -> Result<Partition, LogError> {
        let log_cfg = LogConfig {
            record_bytes_max: config.message_bytes_max.saturating_add(1024),
            log_bytes_max: config.retention_bytes,
            fsync: if config.fsync_every_batch {
                Fsync::EveryBatch
            } else {
                Fsync::Explicit
            },
            ..LogConfig::default()
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
        let mut p = Partition {
            queue: queue.to_string(),
            index,
            config,
            dir,
            log,
            groups: BTreeMap::new(),
            consumer_group: HashMap::new(),
            cache: BTreeMap::new(),
            cache_bytes: 0,
            fetched: std::collections::HashMap::new(),
            catalog,
            metrics,
            serving: Arc::new(std::sync::atomic::AtomicBool::new(true)),
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
            p.load_group(&name)?;
        }
        Ok(p)
    }

    /// Opens a group's settlements and queues every unsettled retained message.
    fn load_group(&mut self, name: &str) -> Result<(), LogError> {
        let (acks, cut) = Acks::open(&self.dir.join("groups").join(format!("{name}.acks")))?;
        if cut > 0 {
            tracing::warn!(queue = %self.queue, group = name, bytes = cut, "cut a torn tail off a group's settlements");
        }
        let start = self.log.start_offset().max(acks.floor());
        let mut delivery = Group::new(delivery_config(&self.config), start);
        let mut at = start;
        while at < self.log.end_offset() {
            let records = self.log.read(at, 4 << 20)?;
            let Some(last) = records.last() else { break };
            at = last.offset + 1;
            for r in records {
                if !acks.is_settled(r.offset) {
                    let _ = delivery.append(Entry {
                        offset: r.offset,
                        key: r.key.into(),
                        not_before_ms: r.not_before_ms,
                        expires_ms: r.expires_ms,
                    });
                }
            }
        }
        self.groups.insert(
            name.to_string(),
            GroupState {
                delivery,
                acks,
                consumers: HashMap::new(),
                waiting: Vec::new(),
            },
        );
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
            self.turn(std::mem::take(&mut batch), &mut stop).await;
            if !self.config.fsync_every_batch && last_sync.elapsed() >= SYNC_INTERVAL {
                let _ = self.log.sync();
                last_sync = Instant::now();
            }
            if let Some(reply) = stop {
                let _ = self.log.sync();
                let _ = reply.send(());
                return;
            }
        }
    }

    fn next_wakeup(&self) -> Option<u64> {
        let mut at = self
            .groups
            .values()
            .filter_map(|g| g.delivery.next_wakeup())
            .min();
        if !self.config.fsync_every_batch {
            let tick = now_ms() + SYNC_INTERVAL.as_millis() as u64;
            at = Some(at.map_or(tick, |a| a.min(tick)));
        }
        at
    }

    async fn turn(&mut self, cmds: Vec<Cmd>, stop: &mut Option<oneshot::Sender<()>>) {
        let now = now_ms();
        let serving = self.serving.load(std::sync::atomic::Ordering::Acquire);
        // Produces first, as one batch.
        let mut produced: Vec<Pending> = Vec::new();
        let mut rest = Vec::new();
        for c in cmds {
            match c {
                Cmd::Produce {
                    messages,
                    headers,
                    reply,
                } => {
                    if !serving {
                        let _ = reply.send(Err(MqError::NotLeader(self.port())));
                    } else {
                        produced.push((messages, headers, reply));
                    }
                }
                other => rest.push(other),
            }
        }
        if !produced.is_empty() {
            self.append(produced, now);
        }
        for c in rest {
            match c {
                Cmd::Produce { .. } => unreachable!("taken above"),
                Cmd::Subscribe {
                    group,
                    consumer,
                    credit,
                    sink,
                    reply,
                } => {
                    let _ = reply.send(self.subscribe(&group, consumer, credit, sink));
                }
                Cmd::Credit { consumer, credit } => {
                    if let Some(g) = self
                        .consumer_group
                        .get(&consumer)
                        .and_then(|n| self.groups.get_mut(n))
                    {
                        let _ = g.delivery.set_credit(consumer, credit);
                    }
                }
                Cmd::Settle {
                    consumer,
                    settlements,
                    reply,
                } => self.settle(consumer, settlements, reply, now),
                Cmd::Unsubscribe { consumer } => {
                    if let Some(name) = self.consumer_group.remove(&consumer) {
                        if let Some(g) = self.groups.get_mut(&name) {
                            let _ = g.delivery.leave(consumer);
                            g.consumers.remove(&consumer);
                        }
                    }
                }
                Cmd::DeadConfirmed { group, offset } => {
                    if let Some(g) = self.groups.get_mut(&group) {
                        g.acks.settle(offset, DEAD);
                    }
                }
                Cmd::Stat { reply } => {
                    let _ = reply.send(self.stats());
                }
                Cmd::Stop { reply } => *stop = Some(reply),
            }
        }
        // Settlements are durable before they are confirmed.
        for g in self.groups.values_mut() {
            let result = g.acks.flush().map_err(io_error);
            for w in g.waiting.drain(..) {
                let _ = w.send(result.clone());
            }
        }
        self.dispatch(now);
        let low = self.groups.values().map(|g| g.delivery.low_water()).min();
        if let Some(low) = low {
            match self.log.reclaim(low) {
                Ok(n) if n > 0 => {
                    self.metrics.segments_reclaimed.inc_by(n as u64);
                }
                Ok(_) => {}
                Err(e) => {
                    tracing::warn!(queue = %self.queue, error = %e, "reclaiming segments failed")
                }
            }
        }
        self.metrics.log_bytes.set(self.log.bytes() as i64);
    }

    fn port(&self) -> String {
        format!("mq/{}/{}", self.queue, self.index)
    }

    fn append(&mut self, produced: Vec<Pending>, now: u64) {
        let default_ttl = self.config.ttl_ms;
        let limit = self.config.message_bytes_max as usize;
        let mut batch: Vec<Message<'_>> = Vec::new();
        let mut accepted = Vec::new();
        for (messages, headers, reply) in &produced {
            if let Some(m) = messages
                .iter()
                .find(|m| m.key.len() + m.payload.len() > limit)
            {
                let size = m.key.len() + m.payload.len();
                let _ = reply;
                accepted.push(Err(MqError::TooLarge(format!(
                    "a message of {size} bytes is larger than the queue's limit of {limit}"
                ))));
                continue;
            }
            accepted.push(Ok(messages.len() as u32));
            for m in messages {
                let ttl = if m.ttl_ms > 0 { m.ttl_ms } else { default_ttl };
                batch.push(Message {
                    key: &m.key,
                    headers,
                    payload: &m.payload,
                    timestamp_ms: now,
                    not_before_ms: if m.delay_ms > 0 { now + m.delay_ms } else { 0 },
                    expires_ms: if ttl > 0 { now + ttl } else { 0 },
                });
            }
        }
        let started = Instant::now();
        let result = if batch.is_empty() {
            Ok(self.log.end_offset())
        } else {
            self.log.append(&batch).map_err(io_error)
        };
        if !batch.is_empty() && self.config.fsync_every_batch {
            self.metrics
                .fsync_seconds
                .observe(started.elapsed().as_secs_f64());
        }
        match result {
            Ok(first) => {
                // Every group sees the new messages; the cache keeps them for delivery.
                let mut offset = first;
                let mut meta = batch.iter();
                for (messages, headers, _) in &produced {
                    for m in messages {
                        let Some(b) = meta.next() else { break };
                        for g in self.groups.values_mut() {
                            let _ = g.delivery.append(Entry {
                                offset,
                                key: m.key.clone(),
                                not_before_ms: b.not_before_ms,
                                expires_ms: b.expires_ms,
                            });
                        }
                        let c = Cached {
                            timestamp_ms: now,
                            key: m.key.clone(),
                            headers: headers.clone(),
                            payload: m.payload.clone(),
                        };
                        self.cache_bytes += c.size();
                        self.cache.insert(offset, c);
                        offset += 1;
                    }
                }
                while self.cache_bytes > CACHE_BYTES_MAX {
                    let Some((_, r)) = self.cache.pop_first() else {
                        break;
                    };
                    self.cache_bytes -= r.size();
                }
                self.metrics.produced.inc_by(batch.len() as u64);
                let mut next = first;
                for ((_, _, reply), a) in produced.into_iter().zip(accepted) {
                    let _ = reply.send(a.map(|n| {
                        let r = (next, n);
                        next += u64::from(n);
                        r
                    }));
                }
            }
            Err(e) => {
                for ((_, _, reply), a) in produced.into_iter().zip(accepted) {
                    let _ = reply.send(a.and(Err(e.clone())));
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
    ) -> Result<(), MqError> {
        if !self.groups.contains_key(group) {
            self.load_group(group).map_err(io_error)?;
        }
        let g = self.groups.get_mut(group).expect("loaded");
        g.delivery.join(consumer, credit).map_err(delivery_error)?;
        g.consumers.insert(consumer, sink);
        self.consumer_group.insert(consumer, group.to_string());
        Ok(())
    }

    fn settle(
        &mut self,
        consumer: u64,
        settlements: Vec<Settlement>,
        reply: oneshot::Sender<Result<(), MqError>>,
        now: u64,
    ) {
        let Some(name) = self.consumer_group.get(&consumer).cloned() else {
            let _ = reply.send(Err(MqError::UnknownConsumer(consumer)));
            return;
        };
        let g = self
            .groups
            .get_mut(&name)
            .expect("a consumer's group exists");
        let mut first_error = None;
        let mut dead = Vec::new();
        for s in settlements {
            let r = match s.how {
                How::Ack => g.delivery.ack(consumer, s.offset).map(|()| {
                    g.acks.settle(s.offset, ACKED);
                    self.metrics.acked.inc();
                }),
                How::Nack => g
                    .delivery
                    .nack(consumer, s.offset, s.delay_ms, now)
                    .map(|()| {
                        self.metrics.nacked.inc();
                    }),
                How::Reject => g.delivery.reject(consumer, s.offset).map(|e| dead.push(e)),
                How::Progress => g.delivery.in_progress(consumer, s.offset, now),
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
            None => g.waiting.push(reply),
        }
        for e in dead {
            if let Effect::DeadLetter { offset, reason } = e {
                self.dead_letter(&name, offset, reason);
            }
        }
    }

    /// Hands due messages to consumers and dead letters to the dead-letter queue.
    fn dispatch(&mut self, now: u64) {
        self.fetched.clear();
        let names: Vec<String> = self.groups.keys().cloned().collect();
        for name in names {
            let effects = self
                .groups
                .get_mut(&name)
                .expect("listed")
                .delivery
                .poll(now);
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
            let mut out: std::collections::HashMap<u64, Vec<Delivery>> =
                std::collections::HashMap::new();
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
                if let Some(sink) = g.consumers.get(&consumer) {
                    let _ = sink.send(list);
                }
            }
            let g = &self.groups[&name];
            let st = g.delivery.stats();
            let labels = self.metrics.group(&name);
            labels.0.set(st.outstanding as i64);
            labels.1.set(st.in_flight as i64);
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
            self.catalog.partition_for(&dlq, &[])
        };
        let Some(target) = target else {
            if !dlq.is_empty() {
                tracing::warn!(queue = %self.queue, dlq = %dlq, offset, "the dead-letter queue does not exist: the message is dropped");
                self.metrics.dead_letter_dropped.inc();
            }
            if let Some(g) = self.groups.get_mut(group) {
                g.acks.settle(offset, DEAD);
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
                // Not settled: after a restart the message is dead-lettered again.
                (_, other) => {
                    tracing::warn!(offset, result = ?other.map(|r| r.map(|_| ())), "a dead letter did not reach its queue")
                }
            }
        });
    }

    fn stats(&self) -> Vec<(String, u64)> {
        let p = self.index;
        let mut v = vec![
            (format!("p{p}.start_offset"), self.log.start_offset()),
            (format!("p{p}.end_offset"), self.log.end_offset()),
            (format!("p{p}.log_bytes"), self.log.bytes()),
            (format!("p{p}.segments"), self.log.segments() as u64),
        ];
        for (name, g) in &self.groups {
            let st = g.delivery.stats();
            v.push((format!("p{p}.group.{name}.depth"), st.outstanding as u64));
            v.push((format!("p{p}.group.{name}.ready"), st.ready as u64));
            v.push((format!("p{p}.group.{name}.delayed"), st.delayed as u64));
            v.push((format!("p{p}.group.{name}.in_flight"), st.in_flight as u64));
            v.push((format!("p{p}.group.{name}.consumers"), st.consumers as u64));
            v.push((
                format!("p{p}.group.{name}.low_water"),
                g.delivery.low_water(),
            ));
        }
        v
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
