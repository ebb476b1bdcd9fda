//! The broker: queues of partitions, each partition an actor ([`partition`]) that owns
//! its log and its groups; connections speak [`crate::proto`]; a partition is served
//! only while this broker owns its port `mq/<queue>/<partition>` in the port switch.

mod conn;
pub mod metrics;
pub mod partition;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};

use tokio::sync::{mpsc, oneshot};

use crate::proto::{Code, QueueConfig, NAME_BYTES_MAX};
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
        }
    }
}

struct QueueEntry {
    config: QueueConfig,
    partitions: Vec<mpsc::Sender<Cmd>>,
    serving: Vec<Arc<AtomicBool>>,
    spread: AtomicUsize,
}

impl QueueEntry {
    /// The partition a message with `key` goes to: its hash, or round-robin for an
    /// empty key.
    fn partition_for(&self, key: &[u8]) -> u16 {
        let n = self.partitions.len() as u16;
        if key.is_empty() {
            (self.spread.fetch_add(1, Ordering::Relaxed) % n as usize) as u16
        } else {
            partition_of(key, n)
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
    switch: Option<portswitch_client::Client>,
    addr: String,
}

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

    fn save(&self) -> Result<(), MqError> {
        let list: Vec<serde_json::Value> = self
            .read()
            .iter()
            .map(|(n, q)| serde_json::json!({"name": n, "config": config_json(&q.config)}))
            .collect();
        let text = serde_json::to_vec_pretty(&list).map_err(|e| MqError::Io(e.to_string()))?;
        portswitch_files::write_durable(&self.dir.join("queues.json"), &text, 0o600)
            .map_err(|e| MqError::Io(e.to_string()))
    }

    /// Opens a queue's partitions and starts their actors.
    async fn open_queue(self: &Arc<Self>, name: &str, config: QueueConfig) -> Result<(), MqError> {
        let metrics = self.families.queue(name);
        let mut senders = Vec::new();
        let mut serving = Vec::new();
        let mut parts = Vec::new();
        for i in 0..config.partitions {
            let dir = self.dir.join("queues").join(name).join(i.to_string());
            let p = Partition::open(name, i, config.clone(), dir, self.clone(), metrics.clone())
                .map_err(|e| MqError::Io(e.to_string()))?;
            serving.push(p.serving.clone());
            parts.push(p);
        }
        for p in parts {
            let (tx, rx) = mpsc::channel(4096);
            senders.push(tx);
            tokio::spawn(p.run(rx));
        }
        let entry = Arc::new(QueueEntry {
            config,
            partitions: senders,
            serving,
            spread: AtomicUsize::new(0),
        });
        self.queues
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(name.to_string(), entry.clone());
        self.claim(name, &entry).await;
        Ok(())
    }

    /// Takes the ports of a queue's partitions; a partition whose port another broker
    /// owns is not served here.
    async fn claim(&self, name: &str, entry: &QueueEntry) {
        let Some(switch) = &self.switch else { return };
        for (i, flag) in entry.serving.iter().enumerate() {
            let port = format!("mq/{name}/{i}");
            let owned = matches!(
                switch.register(port.as_str(), self.addr.as_bytes()).await,
                Ok(portswitch_client::RegisterOutcome::Owned { .. })
            );
            if !owned {
                tracing::warn!(port, "owned by another broker: not serving this partition");
            }
            flag.store(owned, Ordering::Release);
        }
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
        let _change = self.change.lock().await;
        if self.read().contains_key(name) {
            return Err(MqError::QueueExists(name.to_string()));
        }
        if self.read().len() >= self.queues_max {
            return Err(MqError::Limit(format!(
                "this broker holds its limit of {} queues",
                self.queues_max
            )));
        }
        self.open_queue(name, config).await?;
        self.save()
    }

    async fn delete(&self, name: &str) -> Result<(), MqError> {
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
                let s = portswitch_server::RunningServer::start(sc)
                    .await
                    .map_err(|e| StartError::Switch(e.to_string()))?;
                (s.addr.to_string(), Some(s))
            }
        };
        let mut opts = portswitch_client::ClientOptions::new(switch_addr.clone());
        opts.node_name = cfg
            .name
            .clone()
            .unwrap_or_else(|| format!("mq-broker {addr}"));
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
            switch: Some(switch.clone()),
            addr: addr.to_string(),
        });
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
                    catalog
                        .open_queue(&name, config)
                        .await
                        .map_err(|e| StartError::Data(format!("queue {name}: {e}")))?;
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(StartError::Data(format!("{}: {e}", path.display()))),
        }
        let mut tasks = Vec::new();
        // A partition whose port is lost stops serving at once.
        {
            let catalog = catalog.clone();
            let mut events = switch.events();
            tasks.push(tokio::spawn(async move {
                while let Ok(e) = events.recv().await {
                    if let portswitch_client::Event::PortLost { port, .. } = e {
                        let port = String::from_utf8_lossy(port.as_ref()).into_owned();
                        if let Some((q, i)) =
                            port.strip_prefix("mq/").and_then(|r| r.rsplit_once('/'))
                        {
                            if let (Some(entry), Ok(i)) = (catalog.get(q), i.parse::<usize>()) {
                                if let Some(f) = entry.serving.get(i) {
                                    f.store(false, Ordering::Release);
                                    tracing::error!(
                                        port,
                                        "lost the partition's port: no longer serving it"
                                    );
                                }
                            }
                        }
                    }
                }
            }));
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
            for p in &q.partitions {
                let (tx, rx) = oneshot::channel();
                if p.send(Cmd::Stop { reply: tx }).await.is_ok() {
                    let _ = rx.await;
                }
            }
        }
    }
}
