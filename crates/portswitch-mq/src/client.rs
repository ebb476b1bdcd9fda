//! The mq client: one connection, requests pipelined (many in flight, each answered
//! by id) and packed (whatever is waiting when the connection is free goes in one
//! frame), a [`Producer`] that batches messages by itself, and [`Consumer`]s that
//! receive deliveries within their credit.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};

use bytes::BytesMut;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot};

use crate::broker::partition_of;
use crate::proto::{
    self, Code, Delivery, How, Outgoing, QueueConfig, Reply, Request, Settlement, ANY_PARTITION,
};

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ClientError {
    #[error("cannot reach {addr}: {why}")]
    Connect { addr: String, why: String },
    #[error("the connection to the broker is closed")]
    Closed,
    #[error("{} ({message})", code.name())]
    Server { code: Code, message: String },
    #[error("the broker answered something unexpected: {0}")]
    Protocol(String),
}

impl ClientError {
    /// The broker's error code, if the broker refused.
    pub fn code(&self) -> Option<Code> {
        match self {
            ClientError::Server { code, .. } => Some(*code),
            _ => None,
        }
    }
}

pub type Result<T> = std::result::Result<T, ClientError>;

fn check(r: Reply) -> Result<Reply> {
    match r {
        Reply::Error { code, message } => Err(ClientError::Server { code, message }),
        other => Ok(other),
    }
}

struct Shared {
    out: mpsc::UnboundedSender<BytesMut>,
    /// Set by the reader when the connection ends, before it drops every waiter.
    closed: std::sync::atomic::AtomicBool,
    pending: Mutex<HashMap<u32, oneshot::Sender<Reply>>>,
    next_id: AtomicU32,
    consumers: Mutex<HashMap<u64, mpsc::UnboundedSender<Vec<Delivery>>>>,
    /// Deliveries that arrived before their SUBSCRIBED reply was handled (bounded by
    /// the new consumer's credit).
    early: Mutex<HashMap<u64, Vec<Delivery>>>,
    partitions: Mutex<HashMap<String, u16>>,
}

/// A connection to a broker. Cheap to clone; closed when every clone is dropped.
#[derive(Clone)]
pub struct MqClient {
    shared: Arc<Shared>,
    _tasks: Arc<Tasks>,
}

struct Tasks(Vec<tokio::task::JoinHandle<()>>);

impl Drop for Tasks {
    fn drop(&mut self) {
        for t in &self.0 {
            t.abort();
        }
    }
}

impl MqClient {
    pub async fn connect(addr: &str) -> Result<MqClient> {
        let stream = TcpStream::connect(addr)
            .await
            .map_err(|e| ClientError::Connect {
                addr: addr.to_string(),
                why: e.to_string(),
            })?;
        let _ = stream.set_nodelay(true);
        let (mut rd, mut wr) = stream.into_split();
        let (out, mut out_rx) = mpsc::unbounded_channel::<BytesMut>();
        let shared = Arc::new(Shared {
            out,
            closed: std::sync::atomic::AtomicBool::new(false),
            pending: Mutex::new(HashMap::new()),
            next_id: AtomicU32::new(1),
            consumers: Mutex::new(HashMap::new()),
            early: Mutex::new(HashMap::new()),
            partitions: Mutex::new(HashMap::new()),
        });
        let writer = tokio::spawn(async move {
            let mut frame = BytesMut::with_capacity(64 << 10);
            let mut body = BytesMut::with_capacity(64 << 10);
            while let Some(first) = out_rx.recv().await {
                body.extend_from_slice(&first);
                while body.len() < proto::COALESCE_BYTES {
                    match out_rx.try_recv() {
                        Ok(more) => body.extend_from_slice(&more),
                        Err(_) => break,
                    }
                }
                frame.clear();
                proto::frame(&body, &mut frame);
                body.clear();
                if wr.write_all(&frame).await.is_err() {
                    return;
                }
            }
        });
        let reader_shared = shared.clone();
        let reader = tokio::spawn(async move {
            let s = reader_shared;
            let mut buf = BytesMut::with_capacity(64 << 10);
            'conn: loop {
                match proto::frame_len(&buf) {
                    Ok(Some(n)) => {
                        let frame = buf.split_to(n).freeze();
                        // A frame's deliveries go to each consumer together.
                        let mut deliveries: HashMap<u64, Vec<Delivery>> = HashMap::new();
                        for m in proto::messages(frame.slice(4..)) {
                            let Ok((op, id, body)) = m else { break 'conn };
                            let Ok(reply) = Reply::decode(op, body) else {
                                break 'conn;
                            };
                            match reply {
                                Reply::Deliver(d) => {
                                    deliveries.entry(d.consumer).or_default().push(d)
                                }
                                other => {
                                    let waiter = s
                                        .pending
                                        .lock()
                                        .unwrap_or_else(|p| p.into_inner())
                                        .remove(&id);
                                    match waiter {
                                        Some(w) => {
                                            let _ = w.send(other);
                                        }
                                        // An error for no request: the broker closes.
                                        None if id == 0 => break 'conn,
                                        None => {}
                                    }
                                }
                            }
                        }
                        if !deliveries.is_empty() {
                            let c = s.consumers.lock().unwrap_or_else(|p| p.into_inner());
                            for (consumer, list) in deliveries {
                                match c.get(&consumer) {
                                    Some(tx) => {
                                        let _ = tx.send(list);
                                    }
                                    None => s
                                        .early
                                        .lock()
                                        .unwrap_or_else(|p| p.into_inner())
                                        .entry(consumer)
                                        .or_default()
                                        .extend(list),
                                }
                            }
                        }
                    }
                    Ok(None) => match rd.read_buf(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(_) => {}
                    },
                    Err(_) => break,
                }
            }
            // Every waiter learns the connection is gone (a request sent from now on
            // sees `closed`).
            s.closed.store(true, Ordering::SeqCst);
            s.pending.lock().unwrap_or_else(|p| p.into_inner()).clear();
            s.consumers
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clear();
        });
        let c = MqClient {
            shared,
            _tasks: Arc::new(Tasks(vec![writer, reader])),
        };
        c.call(Request::Hello {
            version: proto::VERSION,
        })
        .await?;
        Ok(c)
    }

    /// Connects to the broker that serves `queue`'s partition 0, found through the port
    /// switch at `switch`: the owner of port `mq/<queue>/0` is that broker, and its
    /// value is the broker's address.
    pub async fn discover(switch: &str, queue: &str) -> Result<MqClient> {
        let addr = broker_of(switch, &format!("mq/{queue}/0")).await?;
        MqClient::connect(&addr).await
    }

    /// Whether the connection has ended (a new one is needed).
    pub fn is_closed(&self) -> bool {
        self.shared.closed.load(Ordering::SeqCst)
    }

    /// Sends a request and waits for its reply (other requests stay in flight); an
    /// ERROR reply is [`ClientError::Server`].
    pub async fn call(&self, req: Request) -> Result<Reply> {
        let rx = self.send(req)?;
        check(rx.await.map_err(|_| ClientError::Closed)?)
    }

    fn send(&self, req: Request) -> Result<oneshot::Receiver<Reply>> {
        let id = self.shared.next_id.fetch_add(1, Ordering::Relaxed).max(1);
        let (tx, rx) = oneshot::channel();
        self.shared
            .pending
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id, tx);
        if self.shared.closed.load(Ordering::SeqCst) {
            self.shared
                .pending
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(&id);
            return Err(ClientError::Closed);
        }
        let mut b = BytesMut::new();
        req.encode(id, &mut b);
        self.shared.out.send(b).map_err(|_| ClientError::Closed)?;
        Ok(rx)
    }

    pub async fn create(&self, name: &str, config: QueueConfig) -> Result<()> {
        self.call(Request::Create {
            name: name.to_string(),
            config,
        })
        .await
        .map(|_| ())
    }

    pub async fn delete(&self, name: &str) -> Result<()> {
        self.shared
            .partitions
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(name);
        self.call(Request::Delete {
            name: name.to_string(),
        })
        .await
        .map(|_| ())
    }

    pub async fn list(&self) -> Result<Vec<(String, QueueConfig)>> {
        match self.call(Request::List).await? {
            Reply::Listed(v) => {
                let mut p = self
                    .shared
                    .partitions
                    .lock()
                    .unwrap_or_else(|p| p.into_inner());
                for (n, c) in &v {
                    p.insert(n.clone(), c.partitions);
                }
                Ok(v)
            }
            other => Err(ClientError::Protocol(format!("{other:?}"))),
        }
    }

    pub async fn stat(&self, queue: &str) -> Result<Vec<(String, u64)>> {
        match self
            .call(Request::Stat {
                queue: queue.to_string(),
            })
            .await?
        {
            Reply::Stats(v) => Ok(v),
            other => Err(ClientError::Protocol(format!("{other:?}"))),
        }
    }

    async fn partitions(&self, queue: &str) -> Result<u16> {
        if let Some(&n) = self
            .shared
            .partitions
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(queue)
        {
            return Ok(n);
        }
        self.list().await?;
        self.shared
            .partitions
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(queue)
            .copied()
            .ok_or_else(|| ClientError::Server {
                code: Code::UnknownQueue,
                message: format!("no queue {queue:?}"),
            })
    }

    /// Produces `messages`, one PRODUCE per partition their keys map to (messages
    /// without a key are spread), all in flight at once; returns, per message in the
    /// order given, its (partition, offset). Confirmed means durable per the queue's
    /// fsync policy.
    pub async fn produce(&self, queue: &str, messages: Vec<Outgoing>) -> Result<Vec<(u16, u64)>> {
        let n = self.partitions(queue).await?;
        let mut groups: HashMap<u16, Vec<(usize, Outgoing)>> = HashMap::new();
        for (i, m) in messages.into_iter().enumerate() {
            let p = if m.key.is_empty() {
                ANY_PARTITION
            } else {
                partition_of(&m.key, n)
            };
            groups.entry(p).or_default().push((i, m));
        }
        let mut waits = Vec::new();
        let mut total = 0;
        for (p, list) in groups {
            total += list.len();
            let (idx, msgs): (Vec<usize>, Vec<Outgoing>) = list.into_iter().unzip();
            for chunk_start in (0..msgs.len()).step_by(proto::BATCH_MAX) {
                let end = (chunk_start + proto::BATCH_MAX).min(msgs.len());
                let rx = self.send(Request::Produce {
                    queue: queue.to_string(),
                    partition: p,
                    messages: msgs[chunk_start..end].to_vec(),
                })?;
                waits.push((idx[chunk_start..end].to_vec(), rx));
            }
        }
        let mut out = vec![(0u16, 0u64); total];
        for (idx, rx) in waits {
            match check(rx.await.map_err(|_| ClientError::Closed)?)? {
                Reply::Produced {
                    partition, first, ..
                } => {
                    for (k, i) in idx.into_iter().enumerate() {
                        out[i] = (partition, first + k as u64);
                    }
                }
                other => return Err(ClientError::Protocol(format!("{other:?}"))),
            }
        }
        Ok(out)
    }

    /// Produces `messages` to one partition of `queue` in one PRODUCE (at most
    /// [`proto::BATCH_MAX`]); returns the first offset given.
    pub async fn produce_to(
        &self,
        queue: &str,
        partition: u16,
        messages: Vec<Outgoing>,
    ) -> Result<u64> {
        match self
            .call(Request::Produce {
                queue: queue.to_string(),
                partition,
                messages,
            })
            .await?
        {
            Reply::Produced { first, .. } => Ok(first),
            other => Err(ClientError::Protocol(format!("{other:?}"))),
        }
    }

    /// Replaces broker `from` by broker `to` among the replicas of every partition of
    /// `queue` (this broker must hold the queue); answered once every partition's new
    /// configuration is confirmed.
    pub async fn move_replica(&self, queue: &str, from: &str, to: &str) -> Result<()> {
        self.call(Request::Move {
            queue: queue.to_string(),
            from: from.to_string(),
            to: to.to_string(),
        })
        .await
        .map(|_| ())
    }

    /// The partitions of `queue` (asked once, then remembered).
    pub async fn partition_count(&self, queue: &str) -> Result<u16> {
        self.partitions(queue).await
    }

    /// A producer that packs messages sent one at a time into batches by itself.
    pub fn producer(&self, queue: &str, batches_in_flight_max: usize) -> Producer {
        let (tx, mut rx) = mpsc::channel::<Queued>(65_536);
        let client = self.clone();
        let queue = queue.to_string();
        let gate = Arc::new(tokio::sync::Semaphore::new(batches_in_flight_max.max(1)));
        let task = tokio::spawn(async move {
            while let Some(first) = rx.recv().await {
                let mut batch = vec![first];
                let mut bytes = 0;
                while batch.len() < 4096 && bytes < (1 << 20) {
                    match rx.try_recv() {
                        Ok(m) => {
                            bytes += m.0.payload.len() + m.0.key.len();
                            batch.push(m);
                        }
                        Err(_) => break,
                    }
                }
                let Ok(permit) = gate.clone().acquire_owned().await else {
                    return;
                };
                let client = client.clone();
                let queue = queue.clone();
                tokio::spawn(async move {
                    let (msgs, replies): (Vec<Outgoing>, Vec<_>) = batch.into_iter().unzip();
                    let r = client.produce(&queue, msgs).await;
                    for (i, reply) in replies.into_iter().enumerate() {
                        let _ = reply.send(r.as_ref().map(|v| v[i]).map_err(Clone::clone));
                    }
                    drop(permit);
                });
            }
        });
        Producer {
            tx,
            _task: Arc::new(Tasks(vec![task])),
        }
    }

    /// Joins `group` on `queue` as a new consumer with `credit` messages in flight per
    /// partition at most.
    pub async fn subscribe(&self, queue: &str, group: &str, credit: u32) -> Result<Consumer> {
        self.subscribe_with(queue, group, credit, None).await
    }

    /// [`MqClient::subscribe`] with a selector (docs/MQ.md, "Selectors"): the group
    /// receives only the messages it matches. The first subscription of a group sets
    /// its selector; a later one must ask for the same (or none when none), else the
    /// broker answers `selector_mismatch`. A selector that does not compile gets
    /// `bad_selector` with the compiler's line, column and excerpt.
    pub async fn subscribe_with(
        &self,
        queue: &str,
        group: &str,
        credit: u32,
        selector: Option<&str>,
    ) -> Result<Consumer> {
        let (tx, rx) = mpsc::unbounded_channel();
        // The id is known only from the reply; deliveries that come before it wait in
        // `early` and are handed over here.
        let reply = self
            .call(Request::Subscribe {
                queue: queue.to_string(),
                group: group.to_string(),
                credit,
                selector: selector.map(str::to_string),
            })
            .await?;
        let Reply::Subscribed { consumer } = reply else {
            return Err(ClientError::Protocol(format!("{reply:?}")));
        };
        {
            let mut consumers = self
                .shared
                .consumers
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            let early = self
                .shared
                .early
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(&consumer);
            if let Some(list) = early {
                let _ = tx.send(list);
            }
            consumers.insert(consumer, tx);
        }
        Ok(Consumer {
            client: self.clone(),
            id: consumer,
            rx,
            buffered: std::collections::VecDeque::new(),
        })
    }
}

/// A message queued in a [`Producer`], with where its (partition, offset) goes.
type Queued = (Outgoing, oneshot::Sender<Result<(u16, u64)>>);

/// The address of the broker that owns `port` in the port switch at `switch`.
pub async fn broker_of(switch: &str, port: &str) -> Result<String> {
    let mut opts = portswitch_client::ClientOptions::new(switch.to_string());
    opts.node_name = "mq-client".into();
    let unreachable = |e: portswitch_client::Error| ClientError::Connect {
        addr: switch.to_string(),
        why: format!("port switch: {e}"),
    };
    let c = portswitch_client::Client::connect(opts)
        .await
        .map_err(unreachable)?;
    let owner = c.query(port).await.map_err(unreachable);
    let _ = c.close().await;
    match owner? {
        Some(o) if o.value.is_empty() => Err(ClientError::Server {
            code: Code::NotLeader,
            message: format!("{port} is being taken over by a new leader: try again shortly"),
        }),
        Some(o) => String::from_utf8(o.value.to_vec())
            .map_err(|_| ClientError::Protocol(format!("port {port} holds no address"))),
        None => Err(ClientError::Server {
            code: Code::NotLeader,
            message: format!("no broker owns {port} (no such queue, or its broker is down)"),
        }),
    }
}

/// Sends messages one at a time; they travel in batches.
#[derive(Clone)]
pub struct Producer {
    tx: mpsc::Sender<Queued>,
    _task: Arc<Tasks>,
}

impl Producer {
    /// Queues `m`; the returned receiver gives its (partition, offset) once confirmed.
    pub async fn send(&self, m: Outgoing) -> Result<oneshot::Receiver<Result<(u16, u64)>>> {
        let (tx, rx) = oneshot::channel();
        self.tx
            .send((m, tx))
            .await
            .map_err(|_| ClientError::Closed)?;
        Ok(rx)
    }
}

/// One consumer of a group.
pub struct Consumer {
    client: MqClient,
    id: u64,
    rx: mpsc::UnboundedReceiver<Vec<Delivery>>,
    buffered: std::collections::VecDeque<Delivery>,
}

/// A consumer that is dropped leaves its group: the broker delivers what it had in
/// flight to the others at once (rather than after the ack timeout, and rather than
/// keep handing it messages nobody reads).
impl Drop for Consumer {
    fn drop(&mut self) {
        self.client
            .shared
            .consumers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&self.id);
        let _ = self.client.send(Request::Unsubscribe { consumer: self.id });
    }
}

impl Consumer {
    pub fn id(&self) -> u64 {
        self.id
    }

    /// The next delivery; `None` once the connection is closed.
    pub async fn next(&mut self) -> Option<Delivery> {
        if let Some(d) = self.buffered.pop_front() {
            return Some(d);
        }
        let list = self.rx.recv().await?;
        self.buffered.extend(list);
        self.buffered.pop_front()
    }

    /// A delivery already received, without waiting.
    pub fn try_next(&mut self) -> Option<Delivery> {
        if self.buffered.is_empty() {
            if let Ok(list) = self.rx.try_recv() {
                self.buffered.extend(list);
            }
        }
        self.buffered.pop_front()
    }

    /// Settles deliveries in one request; returns once the broker made them durable.
    pub async fn settle(&self, settlements: Vec<Settlement>) -> Result<()> {
        self.client
            .call(Request::Settle {
                consumer: self.id,
                settlements,
            })
            .await
            .map(|_| ())
    }

    fn one(d: &Delivery, how: How, delay_ms: u64) -> Vec<Settlement> {
        vec![Settlement {
            partition: d.partition,
            offset: d.offset,
            how,
            delay_ms,
        }]
    }

    pub async fn ack(&self, d: &Delivery) -> Result<()> {
        self.settle(Self::one(d, How::Ack, 0)).await
    }

    pub async fn nack(&self, d: &Delivery, delay_ms: u64) -> Result<()> {
        self.settle(Self::one(d, How::Nack, delay_ms)).await
    }

    pub async fn reject(&self, d: &Delivery) -> Result<()> {
        self.settle(Self::one(d, How::Reject, 0)).await
    }

    pub async fn in_progress(&self, d: &Delivery) -> Result<()> {
        self.settle(Self::one(d, How::Progress, 0)).await
    }

    pub async fn set_credit(&self, credit: u32) -> Result<()> {
        self.client
            .call(Request::Credit {
                consumer: self.id,
                credit,
            })
            .await
            .map(|_| ())
    }
}
