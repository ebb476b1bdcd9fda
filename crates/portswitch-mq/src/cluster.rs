//! The client of a group of brokers: it finds each partition's leader through the
//! port switch (the owner of port `mq/<queue>/<partition>`, whose value is the
//! leader's address once it serves), sends each partition's messages to its leader,
//! and when a leader goes (refusal, closed connection, no majority) asks the port
//! switch again and retries: a produce is confirmed at least once. Consumers join the
//! group on every broker (the brokers own `mq/brokers/<name>`), so they get the
//! messages of whichever partitions each broker leads, now or after a failover.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::mpsc;

use crate::broker::{group_brokers, partition_of};
use crate::client::{ClientError, MqClient, Result};
use crate::proto::{Code, Delivery, How, Outgoing, QueueConfig, Settlement};

/// How long an operation keeps retrying through failovers before it gives up.
pub const RETRY_FOR: Duration = Duration::from_secs(15);
const RETRY_EVERY: Duration = Duration::from_millis(20);

struct Inner {
    switch: portswitch_client::Client,
    switch_addr: String,
    /// Connections by broker address.
    brokers: Mutex<HashMap<String, MqClient>>,
    /// (queue, partition) -> leader address, until it fails.
    leaders: Mutex<HashMap<(String, u16), String>>,
    partitions: Mutex<HashMap<String, u16>>,
    spread: AtomicUsize,
}

/// A connection to a group of brokers through its port switch. Cheap to clone.
#[derive(Clone)]
pub struct Cluster {
    inner: Arc<Inner>,
}

/// Whether an error means "ask who leads again and retry".
fn retriable(e: &ClientError) -> bool {
    match e {
        ClientError::Connect { .. } | ClientError::Closed => true,
        ClientError::Server { code, .. } => {
            matches!(code, Code::NotLeader | Code::Unavailable | Code::Fenced)
        }
        ClientError::Protocol(_) => false,
    }
}

impl Cluster {
    pub async fn connect(switch_addr: &str) -> Result<Cluster> {
        let mut opts = portswitch_client::ClientOptions::new(switch_addr.to_string());
        opts.node_name = "mq-client".into();
        let switch = portswitch_client::Client::connect(opts)
            .await
            .map_err(|e| ClientError::Connect {
                addr: switch_addr.to_string(),
                why: format!("port switch: {e}"),
            })?;
        Ok(Cluster {
            inner: Arc::new(Inner {
                switch,
                switch_addr: switch_addr.to_string(),
                brokers: Mutex::new(HashMap::new()),
                leaders: Mutex::new(HashMap::new()),
                partitions: Mutex::new(HashMap::new()),
                spread: AtomicUsize::new(0),
            }),
        })
    }

    /// The brokers of the group: (name, address).
    pub async fn brokers(&self) -> Result<Vec<(String, String)>> {
        group_brokers(&self.inner.switch)
            .await
            .map_err(|e| self.switch_error(e))
    }

    fn switch_error(&self, e: portswitch_client::Error) -> ClientError {
        ClientError::Connect {
            addr: self.inner.switch_addr.clone(),
            why: format!("port switch: {e}"),
        }
    }

    async fn client(&self, addr: &str) -> Result<MqClient> {
        let cached = self
            .inner
            .brokers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(addr)
            .cloned();
        if let Some(c) = cached.filter(|c| !c.is_closed()) {
            return Ok(c);
        }
        let c = MqClient::connect(addr).await?;
        self.inner
            .brokers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(addr.to_string(), c.clone());
        Ok(c)
    }

    /// Any running broker of the group (for requests any of them answers).
    pub async fn any(&self) -> Result<MqClient> {
        let deadline = Instant::now() + RETRY_FOR;
        loop {
            let mut last = None;
            for (_, addr) in self.brokers().await? {
                match self.client(&addr).await {
                    Ok(c) => return Ok(c),
                    Err(e) => last = Some(e),
                }
            }
            if Instant::now() >= deadline {
                return Err(last.unwrap_or(ClientError::Connect {
                    addr: self.inner.switch_addr.clone(),
                    why: "no broker of the group is running".into(),
                }));
            }
            tokio::time::sleep(RETRY_EVERY * 5).await;
        }
    }

    /// The leader of a partition (asked of the port switch unless known).
    async fn leader(&self, queue: &str, partition: u16) -> Result<MqClient> {
        let key = (queue.to_string(), partition);
        let known = self
            .inner
            .leaders
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&key)
            .cloned();
        let addr = match known {
            Some(a) => a,
            None => {
                let port = format!("mq/{queue}/{partition}");
                let owner = self
                    .inner
                    .switch
                    .query(port.as_str())
                    .await
                    .map_err(|e| self.switch_error(e))?;
                match owner {
                    Some(o) if !o.value.is_empty() => {
                        String::from_utf8_lossy(&o.value).into_owned()
                    }
                    _ => {
                        return Err(ClientError::Server {
                            code: Code::NotLeader,
                            message: format!("{port} has no leader serving (yet)"),
                        })
                    }
                }
            }
        };
        match self.client(&addr).await {
            Ok(c) => {
                self.inner
                    .leaders
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .insert(key, addr);
                Ok(c)
            }
            Err(e) => {
                self.forget(queue, partition);
                Err(e)
            }
        }
    }

    fn forget(&self, queue: &str, partition: u16) {
        self.inner
            .leaders
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&(queue.to_string(), partition));
    }

    pub async fn partition_count(&self, queue: &str) -> Result<u16> {
        if let Some(&n) = self
            .inner
            .partitions
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(queue)
        {
            return Ok(n);
        }
        // Asked of each broker until one holds the queue (a queue lives on its
        // replicas only).
        let mut n = None;
        let mut last = None;
        for (_, addr) in self.brokers().await? {
            match self.client(&addr).await {
                Ok(c) => match c.partition_count(queue).await {
                    Ok(k) => {
                        n = Some(k);
                        break;
                    }
                    Err(e) => last = Some(e),
                },
                Err(e) => last = Some(e),
            }
        }
        let n = match (n, last) {
            (Some(n), _) => n,
            (None, Some(e)) => return Err(e),
            (None, None) => {
                return Err(ClientError::Connect {
                    addr: self.inner.switch_addr.clone(),
                    why: "no broker of the group is running".into(),
                })
            }
        };
        self.inner
            .partitions
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(queue.to_string(), n);
        Ok(n)
    }

    pub async fn create(&self, name: &str, config: QueueConfig) -> Result<()> {
        self.any().await?.create(name, config).await
    }

    /// Replaces broker `from` by broker `to` among the replicas of `queue`, while
    /// producers and consumers go on (asked of a broker that holds the queue).
    pub async fn move_replica(&self, queue: &str, from: &str, to: &str) -> Result<()> {
        let mut last = None;
        for (_, addr) in self.brokers().await? {
            let Ok(c) = self.client(&addr).await else {
                continue;
            };
            if c.partition_count(queue).await.is_err() {
                continue;
            }
            match c.move_replica(queue, from, to).await {
                Ok(()) => {
                    self.inner
                        .leaders
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .clear();
                    return Ok(());
                }
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or(ClientError::Server {
            code: Code::UnknownQueue,
            message: format!("no broker of the group holds {queue:?}"),
        }))
    }

    pub async fn delete(&self, name: &str) -> Result<()> {
        self.any().await?.delete(name).await
    }

    /// The queues of the group: every running broker's, merged (a queue lives on its
    /// replicas only).
    pub async fn list(&self) -> Result<Vec<(String, QueueConfig)>> {
        let mut all = std::collections::BTreeMap::new();
        for (_, addr) in self.brokers().await? {
            if let Ok(c) = self.client(&addr).await {
                for (name, config) in c.list().await? {
                    all.insert(name, config);
                }
            }
        }
        Ok(all.into_iter().collect())
    }

    /// Produces to one partition through its leader, retrying through failovers for
    /// up to [`RETRY_FOR`]; returns the first offset. A retry after a lost answer may
    /// store the messages twice (at-least-once).
    pub async fn produce_to(
        &self,
        queue: &str,
        partition: u16,
        messages: Vec<Outgoing>,
    ) -> Result<u64> {
        let deadline = Instant::now() + RETRY_FOR;
        loop {
            let r = match self.leader(queue, partition).await {
                Ok(c) => c.produce_to(queue, partition, messages.clone()).await,
                Err(e) => Err(e),
            };
            match r {
                Ok(first) => return Ok(first),
                Err(e) if retriable(&e) && Instant::now() < deadline => {
                    self.forget(queue, partition);
                    tokio::time::sleep(RETRY_EVERY).await;
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Produces messages: each key's to its partition, keyless ones spread; all
    /// partitions at once. Returns (partition, offset) per message, in order.
    pub async fn produce(&self, queue: &str, messages: Vec<Outgoing>) -> Result<Vec<(u16, u64)>> {
        let n = self.partition_count(queue).await?;
        let spread = (self.inner.spread.fetch_add(1, Ordering::Relaxed) % n as usize) as u16;
        let mut by: HashMap<u16, Vec<(usize, Outgoing)>> = HashMap::new();
        for (i, m) in messages.into_iter().enumerate() {
            let p = if m.key.is_empty() {
                spread
            } else {
                partition_of(&m.key, n)
            };
            by.entry(p).or_default().push((i, m));
        }
        let total: usize = by.values().map(Vec::len).sum();
        let mut tasks = Vec::new();
        for (p, list) in by {
            let (idx, msgs): (Vec<usize>, Vec<Outgoing>) = list.into_iter().unzip();
            let (me, queue) = (self.clone(), queue.to_string());
            tasks.push((
                p,
                idx,
                tokio::spawn(async move { me.produce_to(&queue, p, msgs).await }),
            ));
        }
        let mut out = vec![(0u16, 0u64); total];
        for (p, idx, t) in tasks {
            let first = t
                .await
                .map_err(|e| ClientError::Protocol(e.to_string()))??;
            for (k, i) in idx.into_iter().enumerate() {
                out[i] = (p, first + k as u64);
            }
        }
        Ok(out)
    }

    /// Joins `group` on `queue` on every broker of the group (now and as brokers come
    /// back), with `credit` per partition.
    pub async fn subscribe(
        &self,
        queue: &str,
        group: &str,
        credit: u32,
    ) -> Result<ClusterConsumer> {
        self.subscribe_with(queue, group, credit, None).await
    }

    /// [`Cluster::subscribe`] with a selector (docs/MQ.md, "Selectors"). A selector
    /// that does not compile (`bad_selector`) or differs from the group's
    /// (`selector_mismatch`) is refused here, by a first subscription with no credit
    /// on one broker, rather than retried.
    pub async fn subscribe_with(
        &self,
        queue: &str,
        group: &str,
        credit: u32,
        selector: Option<&str>,
    ) -> Result<ClusterConsumer> {
        let (tx, rx) = mpsc::unbounded_channel();
        let me = self.clone();
        let (queue, group) = (queue.to_string(), group.to_string());
        let selector = selector.map(str::to_string);
        // Fails early if the queue does not exist.
        self.partition_count(&queue).await?;
        // Fails early on a selector the group refuses (credit 0: nothing is delivered
        // to this probe; dropping it unsubscribes).
        if let Ok(c) = self.any().await {
            if let Err(
                e @ ClientError::Server {
                    code: Code::BadSelector | Code::SelectorMismatch,
                    ..
                },
            ) = c
                .subscribe_with(&queue, &group, 0, selector.as_deref())
                .await
            {
                return Err(e);
            }
        }
        let task = tokio::spawn(async move {
            let mut running: HashMap<String, tokio::task::JoinHandle<()>> = HashMap::new();
            loop {
                if tx.is_closed() {
                    break;
                }
                if let Ok(list) = me.brokers().await {
                    for (name, addr) in list {
                        let alive = running.get(&name).is_some_and(|t| !t.is_finished());
                        if !alive {
                            let (tx, queue, group, me, selector) = (
                                tx.clone(),
                                queue.clone(),
                                group.clone(),
                                me.clone(),
                                selector.clone(),
                            );
                            running.insert(
                                name,
                                tokio::spawn(async move {
                                    let Ok(c) = me.client(&addr).await else {
                                        return;
                                    };
                                    let subscribed = c
                                        .subscribe_with(&queue, &group, credit, selector.as_deref())
                                        .await;
                                    let mut cons = match subscribed {
                                        Ok(cons) => cons,
                                        // Not a replica of the queue, or going away:
                                        // asked again a little later.
                                        Err(_) => {
                                            tokio::time::sleep(Duration::from_secs(1)).await;
                                            return;
                                        }
                                    };
                                    let settler = Settler {
                                        broker: addr.clone(),
                                        client: c.clone(),
                                        consumer: cons.id(),
                                    };
                                    while let Some(d) = cons.next().await {
                                        let r = Received {
                                            delivery: d,
                                            settler: settler.clone(),
                                        };
                                        if tx.send(r).is_err() {
                                            return;
                                        }
                                    }
                                }),
                            );
                        }
                    }
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            for t in running.values() {
                t.abort();
            }
        });
        Ok(ClusterConsumer {
            rx,
            _task: Arc::new(AbortOnDrop(task)),
        })
    }
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Where a delivery is settled: the consumer on the broker that delivered it.
#[derive(Clone)]
struct Settler {
    broker: String,
    client: MqClient,
    consumer: u64,
}

/// A delivery from some broker of the group.
pub struct Received {
    pub delivery: Delivery,
    settler: Settler,
}

impl Received {
    /// Settles this delivery with the broker that delivered it.
    pub async fn settle(&self, how: How, delay_ms: u64) -> Result<()> {
        self.settler
            .client
            .call(crate::proto::Request::Settle {
                consumer: self.settler.consumer,
                settlements: vec![Settlement {
                    partition: self.delivery.partition,
                    offset: self.delivery.offset,
                    how,
                    delay_ms,
                }],
            })
            .await
            .map(|_| ())
    }

    /// Acknowledges; confirmed once a majority of the partition's replicas hold it.
    /// An error (the leader went) means the message will be delivered again.
    pub async fn ack(&self) -> Result<()> {
        self.settle(How::Ack, 0).await
    }

    pub async fn nack(&self, delay_ms: u64) -> Result<()> {
        self.settle(How::Nack, delay_ms).await
    }

    pub async fn reject(&self) -> Result<()> {
        self.settle(How::Reject, 0).await
    }
}

/// A consumer of a group on every broker.
pub struct ClusterConsumer {
    rx: mpsc::UnboundedReceiver<Received>,
    _task: Arc<AbortOnDrop>,
}

impl ClusterConsumer {
    /// The next delivery from any broker.
    pub async fn next(&mut self) -> Option<Received> {
        self.rx.recv().await
    }

    /// A delivery already received, without waiting.
    pub fn try_next(&mut self) -> Option<Received> {
        self.rx.try_recv().ok()
    }
}

/// Acknowledges many deliveries with one request per broker they came from.
pub async fn ack_all(received: &[Received]) -> Result<()> {
    let mut by: HashMap<(String, u64), (MqClient, Vec<Settlement>)> = HashMap::new();
    for r in received {
        let s = &r.settler;
        by.entry((s.broker.clone(), s.consumer))
            .or_insert_with(|| (s.client.clone(), Vec::new()))
            .1
            .push(Settlement {
                partition: r.delivery.partition,
                offset: r.delivery.offset,
                how: How::Ack,
                delay_ms: 0,
            });
    }
    let mut first_error = None;
    for ((_, consumer), (client, settlements)) in by {
        let r = client
            .call(crate::proto::Request::Settle {
                consumer,
                settlements,
            })
            .await;
        if let Err(e) = r {
            first_error.get_or_insert(e);
        }
    }
    first_error.map_or(Ok(()), Err)
}
