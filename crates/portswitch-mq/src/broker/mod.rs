//! The broker: queues of partitions, each partition an actor ([`partition`]) that owns
//! its log and its groups; connections speak [`crate::proto`]; a partition is served
//! only while this broker owns its port `mq/<queue>/<partition>` in the port switch.

mod conn;
pub mod metrics;
pub mod partition;
mod replication;

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, RwLock, Weak};

use tokio::sync::{mpsc, oneshot};

use crate::proto::{Code, QueueConfig, NAME_BYTES_MAX};
use crate::selector::{Selector, SelectorError};
use partition::{Cmd, Partition};

/// Errors a request gets; each maps to a wire [`Code`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MqError {
    #[error("{0}")]
    BadRequest(String),
    #[error("no queue {0:?}")]
    UnknownQueue(String),
    #[error("queue {0:?} exists")]
    QueueExists(String),
    #[error("{0}")]
    TooLarge(String),
    #[error("{0}")]
    Full(String),
    #[error("no consumer {0} on this connection")]
    UnknownConsumer(u64),
    #[error("message {0} is not in flight to this consumer (settled, redelivered, or never sent)")]
    NotInFlight(u64),
    #[error("{0}")]
    Limit(String),
    #[error("storage: {0}")]
    Io(String),
    #[error("port {0} is owned by another broker: this one does not serve the partition")]
    NotLeader(String),
    #[error("protocol version {0} is not spoken here (1 is)")]
    Version(u16),
    #[error("fenced: {0}")]
    Fenced(String),
    #[error("unavailable: {0}")]
    Unavailable(String),
    /// The selector of a SUBSCRIBE does not compile (with the compiler's position).
    #[error("{0}")]
    BadSelector(String),
    /// The group exists with another selector (or none): a group has one selector.
    #[error("{0}")]
    SelectorMismatch(String),
}

impl MqError {
    pub fn code(&self) -> Code {
        match self {
            MqError::BadRequest(_) => Code::BadRequest,
            MqError::UnknownQueue(_) => Code::UnknownQueue,
            MqError::QueueExists(_) => Code::QueueExists,
            MqError::TooLarge(_) => Code::TooLarge,
            MqError::Full(_) => Code::Full,
            MqError::UnknownConsumer(_) => Code::UnknownConsumer,
            MqError::NotInFlight(_) => Code::NotInFlight,
            MqError::Limit(_) => Code::Limit,
            MqError::Io(_) => Code::Io,
            MqError::NotLeader(_) => Code::NotLeader,
            MqError::Version(_) => Code::Version,
            MqError::Fenced(_) => Code::Fenced,
            MqError::Unavailable(_) => Code::Unavailable,
            MqError::BadSelector(_) => Code::BadSelector,
            MqError::SelectorMismatch(_) => Code::SelectorMismatch,
        }
    }
}

/// A broker's settings; every limit is enforced with a typed error.
#[derive(Debug, Clone)]
pub struct BrokerConfig {
    pub listen: SocketAddr,
    /// Metrics and health over HTTP (`None`: off).
    pub http_listen: Option<SocketAddr>,
    pub data_dir: PathBuf,
    /// The port switch that decides which broker serves a partition (`None`: one
    /// embedded in this process, on loopback).
    pub switch: Option<String>,
    /// This broker's name in the port switch (default: its address).
    pub name: Option<String>,
    pub connections_max: usize,
    pub queues_max: usize,
    pub partitions_max: u16,
    /// Requests of one connection being handled at once (more wait: back-pressure).
    pub requests_in_flight_max: usize,
    pub consumers_per_connection_max: usize,
    /// A partition's log starts a new segment file past this many bytes (segments are
    /// what is reclaimed once every group settled them).
    pub segment_bytes_max: u64,
}

impl BrokerConfig {
    pub fn new(data_dir: impl Into<PathBuf>) -> BrokerConfig {
        BrokerConfig {
            listen: "127.0.0.1:7480".parse().expect("valid"),
            http_listen: Some("127.0.0.1:7481".parse().expect("valid")),
            data_dir: data_dir.into(),
            switch: None,
            name: None,
            connections_max: 10_000,
            queues_max: 1_000,
            partitions_max: 256,
            requests_in_flight_max: 1_024,
            consumers_per_connection_max: 1_000,
            segment_bytes_max: crate::log::LogConfig::default().segment_bytes_max,
        }
    }
}

struct QueueEntry {
    config: QueueConfig,
    /// The brokers (by name) that hold every partition of the queue.
    replicas: Vec<String>,
    partitions: Vec<mpsc::Sender<Cmd>>,
    serving: Vec<Arc<AtomicBool>>,
    spread: AtomicUsize,
    /// The partitions' replication tasks.
    tasks: Vec<tokio::task::JoinHandle<()>>,
    /// Partitions this broker is no longer a replica of.
    retired: std::sync::Mutex<std::collections::BTreeSet<u16>>,
}

impl QueueEntry {
    /// The partition a message with `key` goes to: its hash, or for an empty key
    /// round-robin over the partitions this broker leads (all of them if it leads
    /// none: the produce then says who does not lead).
    fn partition_for(&self, key: &[u8]) -> u16 {
        let n = self.partitions.len() as u16;
        if key.is_empty() {
            let led: Vec<u16> = (0..n)
                .filter(|&i| self.serving[i as usize].load(Ordering::Acquire))
                .collect();
            let k = self.spread.fetch_add(1, Ordering::Relaxed);
            if led.is_empty() {
                (k % n as usize) as u16
            } else {
                led[k % led.len()]
            }
        } else {
            partition_of(key, n)
        }
    }
}

impl Drop for QueueEntry {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// The queues, shared by connections and partitions.
pub struct Catalog {
    dir: PathBuf,
    queues: RwLock<BTreeMap<String, Arc<QueueEntry>>>,
    /// Serialises create and delete (and the catalogue file).
    change: tokio::sync::Mutex<()>,
    next_consumer: AtomicU64,
    families: metrics::Families,
    queues_max: usize,
    partitions_max: u16,
    segment_bytes_max: u64,
    switch: Option<portswitch_client::Client>,
    /// This broker's address (the value of the ports it owns) and name.
    addr: String,
    me: String,
    peers: replication::Peers,
    /// Compiled selectors by source, shared by every partition and subscription that
    /// uses one (a group's selector is compiled once, not once per partition).
    /// Keyed by the queue's `message_bytes_max` too (the step budget follows it).
    selectors: std::sync::Mutex<HashMap<(u64, String), Weak<Selector>>>,
}

/// The port a broker of the group owns while it runs; its value is the address.
pub fn broker_port(name: &str) -> String {
    format!("mq/brokers/{name}")
}

/// The brokers of the group behind `switch`: (name, address), from the ports they own.
pub async fn group_brokers(
    switch: &portswitch_client::Client,
) -> Result<Vec<(String, String)>, portswitch_client::Error> {
    let prefix = broker_port("");
    let owners = switch.list_all(prefix.as_str()).await?;
    Ok(owners
        .into_iter()
        .filter_map(|o| {
            let name = std::str::from_utf8(&o.port).ok()?.strip_prefix(&prefix)?;
            Some((
                name.to_string(),
                String::from_utf8_lossy(&o.value).into_owned(),
            ))
        })
        .collect())
}

/// Replicas of a queue when its settings say 0.
pub const REPLICAS_DEFAULT: usize = 3;

/// Partition of `key` among `n`: CRC-32C of the key, modulo n (stable across versions).
pub fn partition_of(key: &[u8], n: u16) -> u16 {
    (crc32c::crc32c(key) % u32::from(n.max(1))) as u16
}

fn valid_name(name: &str) -> Result<(), MqError> {
    let ok = !name.is_empty()
        && name.len() <= NAME_BYTES_MAX
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(MqError::BadRequest(format!(
            "queue name {name:?}: 1 to {NAME_BYTES_MAX} of A-Z a-z 0-9 . _ -, not starting with ."
        )))
    }
}

impl Catalog {
    /// The compiled selector for `source` on a queue whose messages are at most
    /// `message_bytes_max` bytes: compiled once while anything holds it.
    pub fn selector(
        &self,
        source: &str,
        message_bytes_max: u32,
    ) -> Result<Arc<Selector>, SelectorError> {
        let lock = || self.selectors.lock().unwrap_or_else(|p| p.into_inner());
        let key = (u64::from(message_bytes_max), source.to_string());
        if let Some(s) = lock().get(&key).and_then(Weak::upgrade) {
            return Ok(s);
        }
        // Compiled outside the lock (regexes may take milliseconds).
        let s = Arc::new(Selector::compile(source, key.0)?);
        let mut m = lock();
        if let Some(s) = m.get(&key).and_then(Weak::upgrade) {
            return Ok(s);
        }
        if m.len() >= 64 {
            m.retain(|_, w| w.strong_count() > 0);
        }
        m.insert(key, Arc::downgrade(&s));
        Ok(s)
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, BTreeMap<String, Arc<QueueEntry>>> {
        self.queues.read().unwrap_or_else(|p| p.into_inner())
    }

    fn get(&self, queue: &str) -> Option<Arc<QueueEntry>> {
        self.read().get(queue).cloned()
    }

    /// The partition a message with `key` goes to (an empty key spreads round-robin).
    pub fn partition_for(&self, queue: &str, key: &[u8]) -> Option<mpsc::Sender<Cmd>> {
        let q = self.get(queue)?;
        q.partitions.get(q.partition_for(key) as usize).cloned()
    }

    pub fn partition_sender(&self, queue: &str, index: u16) -> Option<mpsc::Sender<Cmd>> {
        self.get(queue)?.partitions.get(index as usize).cloned()
    }

    /// A partition of `queue` this broker leads (spread over them), if any.
    pub fn partition_led_here(&self, queue: &str) -> Option<mpsc::Sender<Cmd>> {
        let q = self.get(queue)?;
        let i = q.partition_for(&[]) as usize;
        q.serving[i]
            .load(Ordering::Acquire)
            .then(|| q.partitions[i].clone())
    }

    /// A partition learned that a confirmed configuration left this broker out; once
    /// every partition of the queue has, the queue and its data go from this broker.
    pub fn retired(self: &Arc<Self>, queue: &str, index: u16) {
        let Some(q) = self.get(queue) else { return };
        let all = {
            let mut r = q.retired.lock().unwrap_or_else(|p| p.into_inner());
            r.insert(index);
            r.len() == q.partitions.len()
        };
        tracing::info!(
            queue,
            partition = index,
            "no longer a replica of the partition"
        );
        if all {
            let (me, queue) = (self.clone(), queue.to_string());
            tokio::spawn(async move {
                match me.delete(&queue, false).await {
                    Ok(()) => tracing::info!(queue, "no longer a replica of any partition: the queue's data is removed from this broker"),
                    Err(e) => tracing::warn!(queue, error = %e, "cannot remove a queue this broker no longer holds"),
                }
            });
        }
    }

    pub fn has_queue(&self, queue: &str) -> bool {
        self.get(queue).is_some()
    }

    /// A broker's address, from the port it owns in the port switch.
    pub async fn broker_addr(&self, name: &str) -> Result<String, String> {
        if name == self.me {
            return Ok(self.addr.clone());
        }
        let switch = self.switch.as_ref().ok_or("no port switch")?;
        match switch.query(broker_port(name).as_str()).await {
            Ok(Some(o)) => Ok(String::from_utf8_lossy(&o.value).into_owned()),
            Ok(None) => Err(format!("broker {name} is not running")),
            Err(e) => Err(format!("port switch: {e}")),
        }
    }

    /// The brokers of the group: (name, address), from their ports.
    async fn brokers(&self) -> Result<Vec<(String, String)>, MqError> {
        let Some(switch) = &self.switch else {
            return Ok(vec![(self.me.clone(), self.addr.clone())]);
        };
        group_brokers(switch)
            .await
            .map_err(|e| MqError::Unavailable(format!("port switch: {e}")))
    }

    fn save(&self) -> Result<(), MqError> {
        let list: Vec<serde_json::Value> = self
            .read()
            .iter()
            .map(|(n, q)| {
                serde_json::json!({"name": n, "config": config_json(&q.config), "replicas": q.replicas})
            })
            .collect();
        let text = serde_json::to_vec_pretty(&list).map_err(|e| MqError::Io(e.to_string()))?;
        let _ = &list;
        portswitch_files::write_durable(&self.dir.join("queues.json"), &text, 0o600)
            .map_err(|e| MqError::Io(e.to_string()))
    }

    /// Opens a queue's partitions and starts their actors and replication.
    async fn open_queue(
        self: &Arc<Self>,
        name: &str,
        config: QueueConfig,
        replicas: Vec<String>,
    ) -> Result<(), MqError> {
        let metrics = self.families.queue(name);
        let mut senders = Vec::new();
        let mut serving = Vec::new();
        let mut parts = Vec::new();
        for i in 0..config.partitions {
            let dir = self.dir.join("queues").join(name).join(i.to_string());
            let place = partition::Place {
                queue: name.to_string(),
                index: i,
                dir,
                me: self.me.clone(),
                initial: replicas.clone(),
                segment_bytes_max: self.segment_bytes_max,
            };
            let p = Partition::open(place, config.clone(), self.clone(), metrics.clone())
                .map_err(|e| MqError::Io(e.to_string()))?;
            serving.push(p.serving.clone());
            parts.push(p);
        }
        let mut tasks = Vec::new();
        for (i, p) in parts.into_iter().enumerate() {
            let (tx, rx) = mpsc::channel(4096);
            senders.push(tx.clone());
            tokio::spawn(p.run(rx));
            tasks.extend(replication::start(replication::Ctx {
                catalog: self.clone(),
                queue: name.to_string(),
                index: i as u16,
                tx,
            }));
        }
        let entry = Arc::new(QueueEntry {
            config,
            replicas,
            partitions: senders,
            serving,
            spread: AtomicUsize::new(0),
            tasks,
            retired: std::sync::Mutex::new(std::collections::BTreeSet::new()),
        });
        self.queues
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(name.to_string(), entry);
        Ok(())
    }

    async fn create(self: &Arc<Self>, name: &str, config: QueueConfig) -> Result<(), MqError> {
        valid_name(name)?;
        if config.partitions == 0 || config.partitions > self.partitions_max {
            return Err(MqError::Limit(format!(
                "{} partitions: a queue has 1 to {}",
                config.partitions, self.partitions_max
            )));
        }
        if config.message_bytes_max == 0 || config.message_bytes_max > (8 << 20) {
            return Err(MqError::Limit(
                "message_bytes_max is 1 byte to 8 MiB".into(),
            ));
        }
        if !config.dead_letter_queue.is_empty() {
            valid_name(&config.dead_letter_queue)?;
            if config.dead_letter_queue == name {
                return Err(MqError::BadRequest(
                    "a queue cannot be its own dead-letter queue".into(),
                ));
            }
        }
        // Checked here, and again under the catalogue's lock when the queue is opened;
        // the lock is not held while other brokers are asked (two brokers creating
        // queues at once would wait on each other).
        if self.read().contains_key(name) {
            return Err(MqError::QueueExists(name.to_string()));
        }
        if self.read().len() >= self.queues_max {
            return Err(MqError::Limit(format!(
                "this broker holds its limit of {} queues",
                self.queues_max
            )));
        }
        // The replicas: R of the group's brokers, picked by a hash of the queue's name
        // with each broker's (rendezvous), so queues spread over the group.
        let brokers = self.brokers().await?;
        let want = match config.replicas {
            0 => brokers.len().clamp(1, REPLICAS_DEFAULT),
            r => r as usize,
        };
        if want > brokers.len() {
            return Err(MqError::Limit(format!(
                "{want} replicas asked, and the group has {} brokers running",
                brokers.len()
            )));
        }
        let mut ranked: Vec<&(String, String)> = brokers.iter().collect();
        ranked.sort_by_key(|(b, _)| {
            std::cmp::Reverse(crc32c::crc32c(format!("{b}/{name}").as_bytes()))
        });
        let chosen: Vec<(String, String)> = ranked.into_iter().take(want).cloned().collect();
        let replicas: Vec<String> = chosen.iter().map(|(n, _)| n.clone()).collect();
        for (peer, addr) in &chosen {
            if *peer == self.me {
                continue;
            }
            let req = crate::proto::Request::PeerCreate {
                name: name.to_string(),
                config: config.clone(),
                replicas: replicas.clone(),
            };
            self.peers
                .call(addr, req, std::time::Duration::from_secs(10))
                .await
                .map_err(|e| {
                    MqError::Unavailable(format!("broker {peer} did not create the queue: {e}"))
                })?;
        }
        let partitions = config.partitions;
        if replicas.contains(&self.me) {
            let _change = self.change.lock().await;
            if self.read().contains_key(name) {
                return Err(MqError::QueueExists(name.to_string()));
            }
            self.open_queue(name, config, replicas).await?;
            self.save()?;
        }
        // Answered once every partition has a leader, so a produce right after the
        // queue is created finds one.
        if let Some(switch) = &self.switch {
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
            for i in 0..partitions {
                let port = format!("mq/{name}/{i}");
                loop {
                    let led = match self.get(name) {
                        Some(q) if q.serving.len() > i as usize => {
                            q.serving[i as usize].load(Ordering::Acquire)
                        }
                        _ => false,
                    };
                    // A leader elsewhere publishes its address once it serves.
                    if led
                        || matches!(switch.query(port.as_str()).await,
                            Ok(Some(o)) if !o.value.is_empty() && o.value.as_ref() != self.addr.as_bytes())
                    {
                        break;
                    }
                    if std::time::Instant::now() >= deadline {
                        return Err(MqError::Unavailable(format!(
                            "queue {name} is created, and partition {i} has no leader after 10 s"
                        )));
                    }
                    tokio::time::sleep(std::time::Duration::from_millis(5)).await;
                }
            }
        }
        Ok(())
    }

    /// Replaces broker `from` by `to` among the replicas of every partition of
    /// `queue`: `to` opens the queue and follows; each partition's leader then changes
    /// its configuration (joint, then new), confirmed by majorities of both.
    async fn move_replica(
        self: &Arc<Self>,
        name: &str,
        from: &str,
        to: &str,
    ) -> Result<(), MqError> {
        let q = self
            .get(name)
            .ok_or_else(|| MqError::UnknownQueue(name.to_string()))?;
        if from == to {
            return Err(MqError::BadRequest("moving a replica to itself".into()));
        }
        let switch = self
            .switch
            .as_ref()
            .ok_or_else(|| MqError::Unavailable("no port switch".into()))?;
        let to_addr = self.broker_addr(to).await.map_err(MqError::Unavailable)?;
        // No replicas to start from: it learns them from the configuration records it
        // fetches, and is one only once a record names it (not from the list the queue
        // was created with, which it may be on from an earlier life).
        let req = crate::proto::Request::PeerCreate {
            name: name.to_string(),
            config: q.config.clone(),
            replicas: Vec::new(),
        };
        self.peers
            .call(&to_addr, req, std::time::Duration::from_secs(10))
            .await
            .map_err(|e| {
                MqError::Unavailable(format!("broker {to} did not open the queue: {e}"))
            })?;
        for p in 0..q.partitions.len() as u16 {
            let port = format!("mq/{name}/{p}");
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
            loop {
                let leader = match switch.query(port.as_str()).await {
                    Ok(Some(o)) if !o.value.is_empty() => {
                        Some(String::from_utf8_lossy(&o.value).into_owned())
                    }
                    _ => None,
                };
                let outcome = match leader {
                    Some(addr) => {
                        let req = crate::proto::Request::PeerMove {
                            queue: name.to_string(),
                            partition: p,
                            from: from.to_string(),
                            to: to.to_string(),
                        };
                        self.peers
                            .call(&addr, req, std::time::Duration::from_secs(30))
                            .await
                    }
                    None => Err(crate::client::ClientError::Server {
                        code: Code::NotLeader,
                        message: format!("{port} has no leader"),
                    }),
                };
                match outcome {
                    Ok(_) => break,
                    Err(crate::client::ClientError::Server { code, message })
                        if !matches!(code, Code::NotLeader | Code::Unavailable | Code::Fenced) =>
                    {
                        return Err(MqError::BadRequest(format!("partition {p}: {message}")))
                    }
                    Err(e) if std::time::Instant::now() >= deadline => {
                        return Err(MqError::Unavailable(format!(
                            "partition {p}: no leader changed its replicas within 60 s: {e}"
                        )))
                    }
                    Err(_) => tokio::time::sleep(std::time::Duration::from_millis(100)).await,
                }
            }
        }
        Ok(())
    }

    /// A queue created on another broker of the group, which this one holds.
    async fn adopt(
        self: &Arc<Self>,
        name: &str,
        config: QueueConfig,
        replicas: Vec<String>,
    ) -> Result<(), MqError> {
        valid_name(name)?;
        // A broker that is not among `replicas` is one being added by a move: it
        // follows the partitions' leaders until a configuration includes it.
        let _change = self.change.lock().await;
        if let Some(q) = self.get(name) {
            return if q.config == config {
                Ok(())
            } else {
                Err(MqError::QueueExists(name.to_string()))
            };
        }
        self.open_queue(name, config, replicas).await?;
        self.save()
    }

    async fn delete(&self, name: &str, forward: bool) -> Result<(), MqError> {
        // Every broker of the group: replicas may have moved since the queue was
        // created.
        if forward && self.get(name).is_some() {
            for (peer, addr) in self.brokers().await? {
                if peer == self.me {
                    continue;
                }
                let req = crate::proto::Request::PeerDelete {
                    name: name.to_string(),
                };
                match self
                    .peers
                    .call(&addr, req, std::time::Duration::from_secs(10))
                    .await
                {
                    Ok(_) => {}
                    Err(crate::client::ClientError::Server {
                        code: Code::UnknownQueue,
                        ..
                    }) => {}
                    Err(e) => {
                        return Err(MqError::Unavailable(format!(
                            "broker {peer} did not delete the queue: {e}"
                        )))
                    }
                }
            }
        }
        let _change = self.change.lock().await;
        let entry = self
            .queues
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .remove(name)
            .ok_or_else(|| MqError::UnknownQueue(name.to_string()))?;
        for p in &entry.partitions {
            let (tx, rx) = oneshot::channel();
            if p.send(Cmd::Stop { reply: tx }).await.is_ok() {
                let _ = rx.await;
            }
        }
        if let Some(switch) = &self.switch {
            for i in 0..entry.partitions.len() {
                let _ = switch.unregister(format!("mq/{name}/{i}").as_str()).await;
            }
        }
        let dir = self.dir.join("queues").join(name);
        std::fs::remove_dir_all(&dir)
            .map_err(|e| MqError::Io(format!("{}: {e}", dir.display())))?;
        self.save()
    }

    fn list(&self) -> Vec<(String, QueueConfig)> {
        self.read()
            .iter()
            .map(|(n, q)| (n.clone(), q.config.clone()))
            .collect()
    }
}

fn config_json(c: &QueueConfig) -> serde_json::Value {
    serde_json::json!({
        "partitions": c.partitions,
        "message_bytes_max": c.message_bytes_max,
        "ttl_ms": c.ttl_ms,
        "max_deliveries": c.max_deliveries,
        "dead_letter_queue": c.dead_letter_queue,
        "ack_timeout_ms": c.ack_timeout_ms,
        "ordered_by_key": c.ordered_by_key,
        "fsync_every_batch": c.fsync_every_batch,
        "retention_bytes": c.retention_bytes,
        "replicas": c.replicas,
    })
}

fn config_from_json(v: &serde_json::Value) -> Option<QueueConfig> {
    Some(QueueConfig {
        partitions: v["partitions"].as_u64()? as u16,
        message_bytes_max: v["message_bytes_max"].as_u64()? as u32,
        ttl_ms: v["ttl_ms"].as_u64()?,
        max_deliveries: v["max_deliveries"].as_u64()? as u32,
        dead_letter_queue: v["dead_letter_queue"].as_str()?.to_string(),
        ack_timeout_ms: v["ack_timeout_ms"].as_u64()?,
        ordered_by_key: v["ordered_by_key"].as_bool()?,
        fsync_every_batch: v["fsync_every_batch"].as_bool()?,
        retention_bytes: v["retention_bytes"].as_u64()?,
        replicas: v["replicas"].as_u64().unwrap_or(1) as u8,
    })
}

/// A broker running on the current tokio runtime.
pub struct RunningBroker {
    pub addr: SocketAddr,
    pub http_addr: Option<SocketAddr>,
    /// The port switch it uses (the embedded one's address, or the one given).
    pub switch_addr: String,
    catalog: Arc<Catalog>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    _embedded: Option<portswitch_server::RunningServer>,
}

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("data directory {0}")]
    Data(String),
    #[error("port switch: {0}")]
    Switch(String),
}

impl RunningBroker {
    pub async fn start(cfg: BrokerConfig) -> Result<RunningBroker, StartError> {
        portswitch_files::create_dir_private(&cfg.data_dir)
            .map_err(|e| StartError::Data(e.to_string()))?;
        let listener = tokio::net::TcpListener::bind(cfg.listen)
            .await
            .map_err(|source| StartError::Listen {
                addr: cfg.listen,
                source,
            })?;
        let addr = listener.local_addr().map_err(|source| StartError::Listen {
            addr: cfg.listen,
            source,
        })?;
        let (switch_addr, embedded) = match &cfg.switch {
            Some(a) => (a.clone(), None),
            None => {
                let mut sc = portswitch_server::ServerConfig::ephemeral();
                sc.http_listen = None;
                // Tokens must rise across restarts: partitions refuse a leader whose
                // token is below one they followed before.
                sc.epoch = None;
                let s = portswitch_server::RunningServer::start(sc)
                    .await
                    .map_err(|e| StartError::Switch(e.to_string()))?;
                (s.addr.to_string(), Some(s))
            }
        };
        // The broker's name is kept with its data: replicas are named by it.
        let name_file = cfg.data_dir.join("broker-name");
        let stored = match std::fs::read_to_string(&name_file) {
            Ok(s) => Some(s.trim().to_string()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => return Err(StartError::Data(format!("{}: {e}", name_file.display()))),
        };
        let me = match (&cfg.name, stored) {
            (Some(n), Some(s)) if *n != s => {
                return Err(StartError::Data(format!(
                    "{} holds broker {s:?}'s data, and this broker is named {n:?}",
                    cfg.data_dir.display()
                )))
            }
            (_, Some(s)) => s,
            (Some(n), None) => n.clone(),
            (None, None) => addr.to_string(),
        };
        if me.is_empty() || me.len() > 100 || me.contains('/') {
            return Err(StartError::Data(format!(
                "broker name {me:?}: 1 to 100 bytes, no /"
            )));
        }
        portswitch_files::write_durable(&name_file, me.as_bytes(), 0o600)
            .map_err(|e| StartError::Data(e.to_string()))?;
        let mut opts = portswitch_client::ClientOptions::new(switch_addr.clone());
        opts.node_name = format!("mq-broker {me}");
        // A broker that dies (kill -9, a crash) closes its connection: its partitions'
        // ports go to the other replicas at once rather than after a lease. One that
        // hangs loses them after the lease.
        opts.end_on_disconnect = true;
        opts.lease = std::time::Duration::from_secs(3);
        let switch = portswitch_client::Client::connect(opts)
            .await
            .map_err(|e| StartError::Switch(format!("{switch_addr}: {e}")))?;
        let mut registry = prometheus_client::registry::Registry::with_prefix("portswitch_mq");
        let families = metrics::Families::register(&mut registry);
        let catalog = Arc::new(Catalog {
            dir: cfg.data_dir.clone(),
            queues: RwLock::new(BTreeMap::new()),
            change: tokio::sync::Mutex::new(()),
            next_consumer: AtomicU64::new(1),
            families: families.clone(),
            queues_max: cfg.queues_max,
            partitions_max: cfg.partitions_max,
            segment_bytes_max: cfg.segment_bytes_max.max(4096),
            switch: Some(switch.clone()),
            addr: addr.to_string(),
            me: me.clone(),
            peers: replication::Peers::default(),
            selectors: std::sync::Mutex::new(HashMap::new()),
        });
        // This broker is part of the group while it owns its port (a restarted broker
        // waits for its old session's port to be released).
        match tokio::time::timeout(
            std::time::Duration::from_secs(30),
            switch.register_wait(broker_port(&me).as_str(), addr.to_string().as_bytes()),
        )
        .await
        {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => return Err(StartError::Switch(format!("registering {me}: {e}"))),
            Err(_) => {
                return Err(StartError::Switch(format!(
                    "another broker named {me} has held {} for 30 s",
                    broker_port(&me)
                )))
            }
        }
        // The queues this broker had.
        let path = cfg.data_dir.join("queues.json");
        match std::fs::read(&path) {
            Ok(bytes) => {
                let list: Vec<serde_json::Value> = serde_json::from_slice(&bytes)
                    .map_err(|e| StartError::Data(format!("{}: {e}", path.display())))?;
                for q in list {
                    let name = q["name"].as_str().unwrap_or_default().to_string();
                    let config = config_from_json(&q["config"]).ok_or_else(|| {
                        StartError::Data(format!("{}: queue {name:?} is malformed", path.display()))
                    })?;
                    let replicas: Vec<String> = match q["replicas"].as_array() {
                        Some(list) => list
                            .iter()
                            .filter_map(|v| v.as_str().map(str::to_string))
                            .collect(),
                        // Written before replication: this broker alone.
                        None => vec![me.clone()],
                    };
                    catalog
                        .open_queue(&name, config, replicas)
                        .await
                        .map_err(|e| StartError::Data(format!("queue {name}: {e}")))?;
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(StartError::Data(format!("{}: {e}", path.display()))),
        }
        let mut tasks = Vec::new();
        // Queues this broker alone holds are served before start returns.
        let alone: Vec<Arc<QueueEntry>> = catalog
            .read()
            .values()
            .filter(|q| q.replicas.len() == 1)
            .cloned()
            .collect();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        for q in alone {
            for f in &q.serving {
                while !f.load(Ordering::Acquire) && std::time::Instant::now() < deadline {
                    tokio::time::sleep(std::time::Duration::from_millis(5)).await;
                }
            }
        }
        let http_addr = match cfg.http_listen {
            Some(a) => {
                let l = tokio::net::TcpListener::bind(a)
                    .await
                    .map_err(|source| StartError::Listen { addr: a, source })?;
                let http_addr = l.local_addr().ok();
                let registry = Arc::new(registry);
                let app = axum::Router::new()
                    .route(
                        "/metrics",
                        axum::routing::get(move || {
                            let registry = registry.clone();
                            async move {
                                let mut out = String::new();
                                let _ = prometheus_client::encoding::text::encode(&mut out, &registry);
                                (
                                    [("content-type", "application/openmetrics-text; version=1.0.0; charset=utf-8")],
                                    out,
                                )
                            }
                        }),
                    )
                    .route("/health", axum::routing::get(|| async { "ok\n" }));
                tasks.push(tokio::spawn(async move {
                    let _ = axum::serve(l, app).await;
                }));
                http_addr
            }
            None => None,
        };
        let limits = conn::Limits {
            connections_max: cfg.connections_max,
            requests_in_flight_max: cfg.requests_in_flight_max,
            consumers_max: cfg.consumers_per_connection_max,
        };
        tasks.push(tokio::spawn(conn::accept(
            listener,
            catalog.clone(),
            limits,
            families,
        )));
        Ok(RunningBroker {
            addr,
            http_addr,
            switch_addr,
            catalog,
            tasks,
            _embedded: embedded,
        })
    }

    /// Stops accepting, syncs and stops every partition.
    pub async fn stop(self) {
        for t in &self.tasks {
            t.abort();
        }
        let queues: Vec<Arc<QueueEntry>> = self.catalog.read().values().cloned().collect();
        for q in queues {
            for t in &q.tasks {
                t.abort();
            }
            for p in &q.partitions {
                let (tx, rx) = oneshot::channel();
                if p.send(Cmd::Stop { reply: tx }).await.is_ok() {
                    let _ = rx.await;
                }
            }
        }
        // Ending the session gives the partitions' ports to the other replicas now.
        if let Some(switch) = &self.catalog.switch {
            let _ = switch.close().await;
        }
    }
}
