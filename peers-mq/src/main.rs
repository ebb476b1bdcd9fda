//! mqpeerbench: one run of the message-queue peer comparison — one system, one
//! configuration. A fresh queue (or stream set) is created; one producer task
//! publishes N messages of S bytes as fast as the system confirms them, with a
//! bounded number of batches in flight; one consumer task on a connection of its own
//! consumes and acknowledges them. Each system is driven through its own Rust client:
//! portswitch-mq's, lapin (RabbitMQ), async-nats (JetStream) and redis (Streams).
//!
//! Every payload carries the wall clock (microseconds since the Unix epoch, little
//! endian) in its first 8 bytes, written when its batch is built; the consumer
//! subtracts it from its own clock on receipt: end-to-end latency, queueing included
//! (unpaced runs build a backlog; `--rate` measures below the peak).
//!
//! Prints one JSON object on stdout; exits 1 if any message was lost or refused.

use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use clap::{Parser, ValueEnum};
use futures_util::stream::{self, StreamExt};
use futures_util::FutureExt;
use hdrhistogram::Histogram;
use serde_json::{json, Value};

type BoxError = Box<dyn std::error::Error + Send + Sync>;
type Res<T> = Result<T, BoxError>;

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum System {
    Portswitch,
    Rabbitmq,
    Nats,
    Redis,
}

impl System {
    fn name(self) -> &'static str {
        match self {
            System::Portswitch => "portswitch",
            System::Rabbitmq => "rabbitmq",
            System::Nats => "nats",
            System::Redis => "redis",
        }
    }
}

#[derive(Parser, Debug, Clone)]
#[command(about = "One run of the message-queue peer comparison")]
struct Args {
    #[arg(long, value_enum)]
    system: System,
    /// host:port of the server.
    #[arg(long)]
    addr: String,
    /// Configuration label for the report ("fsync-batch", "quorum", ...).
    #[arg(long)]
    config: String,
    /// What is on disk when a publish is confirmed, one sentence, for the report.
    #[arg(long, default_value = "")]
    durability: String,
    /// Partitions: portswitch partitions, RabbitMQ queues, JetStream streams, Redis
    /// streams.
    #[arg(long, default_value_t = 1)]
    partitions: u16,
    /// Payload bytes (at least 8: the timestamp).
    #[arg(long, default_value_t = 100)]
    size: usize,
    #[arg(long, default_value_t = 1_000_000)]
    messages: u64,
    /// Pace the producer to this many messages per second (default: as fast as the
    /// system confirms).
    #[arg(long)]
    rate: Option<u64>,
    /// Messages per batch (one PRODUCE; one pipeline of XADDs; 1,000 publishes whose
    /// confirms are awaited together).
    #[arg(long, default_value_t = 1000)]
    batch: usize,
    /// Batches in flight at most.
    #[arg(long, default_value_t = 8)]
    in_flight: usize,
    /// Unacknowledged messages per partition the consumer may hold (portswitch credit,
    /// AMQP prefetch per queue, JetStream max_ack_pending per consumer, Redis
    /// XREADGROUP COUNT per stream).
    #[arg(long, default_value_t = 2000)]
    credit: u32,
    /// Stop producing after this many seconds (the report says so, and counts what
    /// was sent).
    #[arg(long)]
    max_seconds: Option<f64>,
    /// portswitch: fsync every batch before confirming ("batch") or every 50 ms
    /// ("interval").
    #[arg(long, default_value = "batch", value_parser = ["batch", "interval"])]
    fsync: String,
    /// RabbitMQ: the queue type.
    #[arg(long, default_value = "quorum", value_parser = ["quorum", "classic"])]
    queue_type: String,
    /// The consumer gives up this long after the last message it received once the
    /// producer is done.
    #[arg(long, default_value_t = 30.0)]
    idle_seconds: f64,
}

fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}

/// The payload of a batch: `size` bytes, the first 8 the time it was built.
fn stamped(size: usize) -> Vec<u8> {
    let mut p = vec![b'x'; size.max(8)];
    p[..8].copy_from_slice(&now_us().to_le_bytes());
    p
}

// ---- what producer and consumer share

struct Shared {
    started: Instant,
    /// Messages the consumer should expect (set once the producer is done).
    expect: AtomicU64,
    producer_done: AtomicBool,
}

/// The consumer's figures.
struct Recorder {
    shared: Arc<Shared>,
    got: u64,
    lat: Histogram<u64>,
    last_at: Instant,
    bad_payloads: u64,
    idle: Duration,
}

impl Recorder {
    fn new(shared: Arc<Shared>, idle: Duration) -> Recorder {
        Recorder {
            last_at: shared.started,
            shared,
            got: 0,
            lat: Histogram::new(3).expect("histogram"),
            bad_payloads: 0,
            idle,
        }
    }

    fn record(&mut self, payload: &[u8]) {
        let now = now_us();
        match payload.get(..8) {
            Some(b) => {
                let sent = u64::from_le_bytes(b.try_into().expect("8"));
                let _ = self.lat.record(now.saturating_sub(sent).max(1));
            }
            None => self.bad_payloads += 1,
        }
        self.got += 1;
        self.last_at = Instant::now();
    }

    /// All expected messages are in, or nothing came for `idle` after the producer
    /// finished.
    fn done(&self) -> bool {
        self.shared.producer_done.load(Ordering::Acquire)
            && (self.got >= self.shared.expect.load(Ordering::Acquire)
                || self.last_at.elapsed() > self.idle)
    }
}

/// How long a consumer waits for the next delivery before it checks `done` again.
const POLL: Duration = Duration::from_millis(200);
/// Deliveries taken without waiting before acknowledging them together.
const DRAIN_MAX: usize = 4096;

struct ProduceOutcome {
    sent: u64,
    confirmed: u64,
    errors: u64,
    first_error: Option<String>,
    elapsed: Duration,
    truncated: bool,
    batch_lat: Histogram<u64>,
}

/// Publishes `messages` in batches of `batch`, at most `in_flight` batches awaiting
/// their confirms. `send(first, n, payload)` publishes messages `first..first+n` (all
/// with `payload`) and resolves to how many were confirmed.
async fn produce_loop<F, Fut>(a: &Args, shared: &Shared, mut send: F) -> ProduceOutcome
where
    F: FnMut(u64, usize, Arc<Vec<u8>>) -> Fut,
    Fut: Future<Output = Res<u64>> + Send + 'static,
{
    let gate = Arc::new(tokio::sync::Semaphore::new(a.in_flight.max(1)));
    let started = shared.started;
    let deadline = a.max_seconds.map(|s| started + Duration::from_secs_f64(s));
    let mut sent = 0u64;
    let mut truncated = false;
    let mut tasks = Vec::new();
    while sent < a.messages {
        if let Some(rate) = a.rate {
            let due = started + Duration::from_secs_f64(sent as f64 / rate.max(1) as f64);
            tokio::time::sleep_until(due.into()).await;
        }
        if deadline.is_some_and(|d| Instant::now() >= d) {
            truncated = true;
            break;
        }
        let n = (a.batch as u64).min(a.messages - sent) as usize;
        let permit = gate.clone().acquire_owned().await.expect("semaphore");
        let payload = Arc::new(stamped(a.size));
        let fut = send(sent, n, payload);
        tasks.push(tokio::spawn(async move {
            let t = Instant::now();
            let r = fut.await;
            drop(permit);
            (n as u64, r, t.elapsed(), Instant::now())
        }));
        sent += n as u64;
    }
    let mut out = ProduceOutcome {
        sent,
        confirmed: 0,
        errors: 0,
        first_error: None,
        elapsed: Duration::ZERO,
        truncated,
        batch_lat: Histogram::new(3).expect("histogram"),
    };
    let mut last = started;
    for t in tasks {
        match t.await {
            Ok((n, r, took, at)) => {
                let _ = out.batch_lat.record(took.as_micros() as u64);
                last = last.max(at);
                match r {
                    Ok(c) => {
                        out.confirmed += c;
                        out.errors += n - c.min(n);
                    }
                    Err(e) => {
                        out.errors += n;
                        out.first_error.get_or_insert_with(|| e.to_string());
                    }
                }
            }
            Err(e) => {
                out.errors += 1;
                out.first_error.get_or_insert_with(|| e.to_string());
            }
        }
    }
    out.elapsed = last.duration_since(started);
    shared.expect.store(out.confirmed, Ordering::Release);
    shared.producer_done.store(true, Ordering::Release);
    out
}

/// What one system's run hands back to be reported.
struct Outcome {
    produce: ProduceOutcome,
    consumed: u64,
    consume_elapsed: Duration,
    lat: Histogram<u64>,
    consume_errors: u64,
    consume_first_error: Option<String>,
    server: Value,
}

fn unique_name(prefix: &str) -> String {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    format!("{prefix}{}x{nanos}", std::process::id())
}

// ---- portswitch mq

mod ps {
    use super::*;
    use portswitch_mq::client::MqClient;
    use portswitch_mq::proto::{How, Outgoing, QueueConfig, Settlement};

    /// A key per partition that the client maps to that partition, so message `i`
    /// goes to partition `i % partitions` (the keys spread evenly).
    fn partition_keys(partitions: u16) -> Vec<bytes::Bytes> {
        let mut keys: Vec<Option<Vec<u8>>> = vec![None; usize::from(partitions)];
        let mut k = 0u64;
        while keys.iter().any(Option::is_none) {
            let key = format!("k{k}").into_bytes();
            let p = portswitch_mq::broker::partition_of(&key, partitions);
            if keys[usize::from(p)].is_none() {
                keys[usize::from(p)] = Some(key);
            }
            k += 1;
        }
        keys.into_iter()
            .map(|k| bytes::Bytes::from(k.expect("key")))
            .collect()
    }

    pub async fn run(a: &Args, shared: Arc<Shared>) -> Res<Outcome> {
        let c = MqClient::connect(&a.addr).await?;
        let queue = unique_name("bench");
        c.create(
            &queue,
            QueueConfig {
                partitions: a.partitions,
                fsync_every_batch: a.fsync == "batch",
                retention_bytes: 8 << 30,
                ..QueueConfig::default()
            },
        )
        .await?;
        let cc = MqClient::connect(&a.addr).await?;
        let mut consumer = cc.subscribe(&queue, "bench", a.credit).await?;
        let mut rec = Recorder::new(shared.clone(), Duration::from_secs_f64(a.idle_seconds));
        let consume = tokio::spawn(async move {
            let mut errors = 0u64;
            let mut first_error = None;
            let mut acks = Vec::new();
            while !rec.done() {
                let d = match tokio::time::timeout(POLL, consumer.next()).await {
                    Ok(Some(d)) => d,
                    Ok(None) => {
                        errors += 1;
                        first_error = Some("connection closed".to_string());
                        break;
                    }
                    Err(_) => continue,
                };
                rec.record(&d.payload);
                acks.push(Settlement {
                    partition: d.partition,
                    offset: d.offset,
                    how: How::Ack,
                    delay_ms: 0,
                });
                while acks.len() < DRAIN_MAX {
                    let Some(d) = consumer.try_next() else { break };
                    rec.record(&d.payload);
                    acks.push(Settlement {
                        partition: d.partition,
                        offset: d.offset,
                        how: How::Ack,
                        delay_ms: 0,
                    });
                }
                if let Err(e) = consumer.settle(std::mem::take(&mut acks)).await {
                    errors += 1;
                    first_error.get_or_insert_with(|| e.to_string());
                    break;
                }
            }
            (rec, errors, first_error)
        });
        let keys = Arc::new(partition_keys(a.partitions));
        let parts = u64::from(a.partitions);
        let produce = produce_loop(a, &shared, |first, n, payload| {
            let (c, q, keys) = (c.clone(), queue.clone(), keys.clone());
            async move {
                let body = bytes::Bytes::from(payload.to_vec());
                let msgs: Vec<Outgoing> = (0..n as u64)
                    .map(|i| Outgoing {
                        key: if parts > 1 {
                            keys[((first + i) % parts) as usize].clone()
                        } else {
                            Default::default()
                        },
                        payload: body.clone(),
                        ..Default::default()
                    })
                    .collect();
                let r = c.produce(&q, msgs).await?;
                Ok(r.len() as u64)
            }
        })
        .await;
        let (rec, consume_errors, consume_first_error) = consume.await?;
        let _ = c.delete(&queue).await;
        Ok(Outcome {
            produce,
            consumed: rec.got,
            consume_elapsed: rec.last_at.duration_since(shared.started),
            lat: rec.lat,
            consume_errors: consume_errors + rec.bad_payloads,
            consume_first_error,
            server: json!({ "fsync_every_batch": a.fsync == "batch" }),
        })
    }
}

// ---- RabbitMQ, AMQP 0-9-1 through lapin

mod rabbit {
    use super::*;
    use lapin::options::{
        BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
        ConfirmSelectOptions, QueueDeclareOptions, QueueDeleteOptions,
    };
    use lapin::types::{AMQPValue, FieldTable};
    use lapin::{BasicProperties, Connection, ConnectionProperties};

    async fn connect(addr: &str) -> Res<Connection> {
        Ok(Connection::connect(
            &format!("amqp://guest:guest@{addr}/%2f"),
            ConnectionProperties::default(),
        )
        .await?)
    }

    pub async fn run(a: &Args, shared: Arc<Shared>) -> Res<Outcome> {
        let pconn = connect(&a.addr).await?;
        let pch = pconn.create_channel().await?;
        pch.confirm_select(ConfirmSelectOptions::default()).await?;
        let base = unique_name("bench");
        let queues: Vec<String> = (0..a.partitions).map(|i| format!("{base}-{i}")).collect();
        for q in &queues {
            let mut args = FieldTable::default();
            args.insert(
                "x-queue-type".into(),
                AMQPValue::LongString(a.queue_type.as_str().into()),
            );
            pch.queue_declare(
                q.as_str().into(),
                QueueDeclareOptions {
                    durable: true,
                    ..QueueDeclareOptions::default()
                },
                args,
            )
            .await?;
        }
        // The consumer: its own connection, a channel per queue (so that one
        // multiple-ack per channel acknowledges exactly what was taken from it), a
        // prefetch of `credit` on each.
        let cconn = connect(&a.addr).await?;
        let mut channels = Vec::new();
        let mut streams = Vec::new();
        for (i, q) in queues.iter().enumerate() {
            let ch = cconn.create_channel().await?;
            ch.basic_qos(
                a.credit.min(u32::from(u16::MAX)) as u16,
                BasicQosOptions::default(),
            )
            .await?;
            let consumer = ch
                .basic_consume(
                    q.as_str().into(),
                    format!("c{i}").into(),
                    BasicConsumeOptions::default(),
                    FieldTable::default(),
                )
                .await?;
            streams.push(consumer.map(move |d| (i, d)));
            channels.push(ch);
        }
        let mut merged = stream::select_all(streams);
        let mut rec = Recorder::new(shared.clone(), Duration::from_secs_f64(a.idle_seconds));
        let consume = tokio::spawn(async move {
            let mut errors = 0u64;
            let mut first_error: Option<String> = None;
            let mut top: Vec<u64> = vec![0; channels.len()];
            'run: while !rec.done() {
                let first = match tokio::time::timeout(POLL, merged.next()).await {
                    Ok(Some(x)) => x,
                    Ok(None) => {
                        errors += 1;
                        first_error.get_or_insert_with(|| "consumers ended".to_string());
                        break;
                    }
                    Err(_) => continue,
                };
                let mut next = Some(first);
                let mut taken = 0;
                while let Some((i, d)) = next.take() {
                    match d {
                        Ok(d) => {
                            rec.record(&d.data);
                            top[i] = top[i].max(d.delivery_tag);
                        }
                        Err(e) => {
                            errors += 1;
                            first_error.get_or_insert_with(|| e.to_string());
                            break 'run;
                        }
                    }
                    taken += 1;
                    if taken < DRAIN_MAX {
                        next = merged.next().now_or_never().flatten();
                    }
                }
                for (i, tag) in top.iter_mut().enumerate() {
                    if *tag > 0 {
                        if let Err(e) = channels[i]
                            .basic_ack(*tag, BasicAckOptions { multiple: true })
                            .await
                        {
                            errors += 1;
                            first_error.get_or_insert_with(|| e.to_string());
                        }
                        *tag = 0;
                    }
                }
            }
            (rec, errors, first_error)
        });
        let queues = Arc::new(queues);
        let parts = u64::from(a.partitions);
        let produce = produce_loop(a, &shared, |first, n, payload| {
            let (ch, queues) = (pch.clone(), queues.clone());
            async move {
                // All of the batch's publishes are handed to lapin at once (each
                // publish future resolves when its frames are written; awaited one by
                // one they would be written one per turn of lapin's I/O loop).
                let publishes = (0..n as u64).map(|i| {
                    let q = &queues[((first + i) % parts) as usize];
                    ch.basic_publish(
                        "".into(),
                        q.as_str().into(),
                        BasicPublishOptions::default(),
                        &payload,
                        // Persistent (delivery mode 2).
                        BasicProperties::default().with_delivery_mode(2),
                    )
                });
                let confirms = futures_util::future::try_join_all(publishes).await?;
                let mut ok = 0;
                for c in confirms {
                    if c.await?.is_ack() {
                        ok += 1;
                    }
                }
                Ok(ok)
            }
        })
        .await;
        let (rec, consume_errors, consume_first_error) = consume.await?;
        for q in queues.iter() {
            let _ = pch
                .queue_delete(q.as_str().into(), QueueDeleteOptions::default())
                .await;
        }
        let _ = pconn.close(200, "done".into()).await;
        let _ = cconn.close(200, "done".into()).await;
        Ok(Outcome {
            produce,
            consumed: rec.got,
            consume_elapsed: rec.last_at.duration_since(shared.started),
            lat: rec.lat,
            consume_errors: consume_errors + rec.bad_payloads,
            consume_first_error,
            server: json!({
                "queue_type": a.queue_type,
                "delivery_mode": 2,
                "publisher_confirms": true,
            }),
        })
    }
}

// ---- NATS JetStream through async-nats

mod nats {
    use super::*;
    use async_nats::jetstream::{self, consumer, stream as js_stream};

    pub async fn run(a: &Args, shared: Arc<Shared>) -> Res<Outcome> {
        let pclient = async_nats::connect(&a.addr).await?;
        let version = pclient.server_info().version.clone();
        let js = jetstream::ContextBuilder::new()
            .timeout(Duration::from_secs(120))
            .max_ack_inflight(a.batch * a.in_flight.max(1))
            .backpressure_on_inflight(true)
            .build(pclient.clone());
        let base = unique_name("bench");
        let mut subjects = Vec::new();
        for i in 0..a.partitions {
            let subject = format!("{base}.{i}");
            js.create_stream(js_stream::Config {
                name: format!("{base}-{i}"),
                subjects: vec![subject.clone()],
                storage: js_stream::StorageType::File,
                num_replicas: 1,
                ..Default::default()
            })
            .await?;
            subjects.push(subject);
        }
        let cclient = async_nats::connect(&a.addr).await?;
        let cjs = jetstream::new(cclient.clone());
        let mut streams = Vec::new();
        for i in 0..a.partitions {
            let s = cjs.get_stream(format!("{base}-{i}")).await?;
            let c = s
                .create_consumer(consumer::pull::Config {
                    durable_name: Some("bench".to_string()),
                    ack_policy: consumer::AckPolicy::Explicit,
                    max_ack_pending: i64::from(a.credit),
                    ..Default::default()
                })
                .await?;
            let msgs = c
                .stream()
                .max_messages_per_batch((a.credit as usize).min(1000))
                .messages()
                .await?;
            streams.push(msgs);
        }
        let mut merged = stream::select_all(streams);
        let mut rec = Recorder::new(shared.clone(), Duration::from_secs_f64(a.idle_seconds));
        let consume = tokio::spawn(async move {
            let mut errors = 0u64;
            let mut first_error: Option<String> = None;
            while !rec.done() {
                let m = match tokio::time::timeout(POLL, merged.next()).await {
                    Ok(Some(Ok(m))) => m,
                    Ok(Some(Err(e))) => {
                        // Heartbeat hiccups and the like: counted, not fatal.
                        errors += 1;
                        first_error.get_or_insert_with(|| e.to_string());
                        continue;
                    }
                    Ok(None) => {
                        errors += 1;
                        first_error.get_or_insert_with(|| "streams ended".to_string());
                        break;
                    }
                    Err(_) => continue,
                };
                rec.record(&m.payload);
                // AckExplicit: one ack per message (the protocol has no batched
                // explicit ack); sent without waiting for the server's reply.
                if let Err(e) = m.ack().await {
                    errors += 1;
                    first_error.get_or_insert_with(|| e.to_string());
                }
            }
            (rec, errors, first_error)
        });
        let subjects = Arc::new(subjects);
        let parts = u64::from(a.partitions);
        let produce = produce_loop(a, &shared, |first, n, payload| {
            let (js, subjects) = (js.clone(), subjects.clone());
            async move {
                let body = bytes::Bytes::from(payload.to_vec());
                let mut acks = Vec::with_capacity(n);
                for i in 0..n as u64 {
                    let s = subjects[((first + i) % parts) as usize].clone();
                    acks.push(js.publish(s, body.clone()).await?);
                }
                let mut ok = 0;
                for f in acks {
                    f.await?;
                    ok += 1;
                }
                Ok(ok)
            }
        })
        .await;
        let (rec, consume_errors, consume_first_error) = consume.await?;
        for i in 0..a.partitions {
            let _ = js.delete_stream(format!("{base}-{i}")).await;
        }
        let _ = pclient.flush().await;
        Ok(Outcome {
            produce,
            consumed: rec.got,
            consume_elapsed: rec.last_at.duration_since(shared.started),
            lat: rec.lat,
            consume_errors: consume_errors + rec.bad_payloads,
            consume_first_error,
            server: json!({
                "version": version,
                "storage": "file",
                "replicas": 1,
                "ack_policy": "explicit",
            }),
        })
    }
}

// ---- Redis Streams through redis

mod redis_streams {
    use super::*;
    use redis::aio::MultiplexedConnection;
    use redis::streams::StreamReadReply;
    use redis::{AsyncConnectionConfig, Value as RValue};

    async fn connect(addr: &str) -> Res<MultiplexedConnection> {
        let client = redis::Client::open(format!("redis://{addr}/"))?;
        Ok(client
            .get_multiplexed_async_connection_with_config(
                &AsyncConnectionConfig::new().set_response_timeout(Some(Duration::from_secs(120))),
            )
            .await?)
    }

    fn bulk(v: &RValue) -> Option<&[u8]> {
        match v {
            RValue::BulkString(b) => Some(b),
            _ => None,
        }
    }

    pub async fn run(a: &Args, shared: Arc<Shared>) -> Res<Outcome> {
        let mut pconn = connect(&a.addr).await?;
        let appendonly: Vec<String> = redis::cmd("CONFIG")
            .arg("GET")
            .arg("append*")
            .query_async(&mut pconn)
            .await?;
        let info: String = redis::cmd("INFO")
            .arg("server")
            .query_async(&mut pconn)
            .await?;
        let version = info
            .lines()
            .find_map(|l| l.strip_prefix("redis_version:"))
            .map(str::to_string);
        let base = unique_name("bench");
        let keys: Vec<String> = (0..a.partitions).map(|i| format!("{base}:{i}")).collect();
        for k in &keys {
            let _: () = redis::cmd("XGROUP")
                .arg("CREATE")
                .arg(k)
                .arg("bench")
                .arg("0")
                .arg("MKSTREAM")
                .query_async(&mut pconn)
                .await?;
        }
        let mut cconn = connect(&a.addr).await?;
        let mut rec = Recorder::new(shared.clone(), Duration::from_secs_f64(a.idle_seconds));
        let ckeys = keys.clone();
        let count = a.credit;
        let consume = tokio::spawn(async move {
            let mut errors = 0u64;
            let mut first_error: Option<String> = None;
            // Each round trip acknowledges what the last one read (XACK per stream,
            // all ids at once) and reads the next (COUNT per stream), in one pipeline.
            let mut pending: Vec<Vec<String>> = vec![Vec::new(); ckeys.len()];
            loop {
                let mut pipe = redis::pipe();
                let mut acking = false;
                for (k, ids) in ckeys.iter().zip(&pending) {
                    if !ids.is_empty() {
                        pipe.cmd("XACK").arg(k).arg("bench").arg(ids).ignore();
                        acking = true;
                    }
                }
                for ids in pending.iter_mut() {
                    ids.clear();
                }
                if rec.done() {
                    if !acking {
                        break;
                    }
                    if let Err(e) = pipe.query_async::<()>(&mut cconn).await {
                        errors += 1;
                        first_error.get_or_insert_with(|| e.to_string());
                    }
                    break;
                }
                pipe.cmd("XREADGROUP")
                    .arg("GROUP")
                    .arg("bench")
                    .arg("c")
                    .arg("COUNT")
                    .arg(count)
                    .arg("BLOCK")
                    .arg(POLL.as_millis() as u64)
                    .arg("STREAMS")
                    .arg(&ckeys);
                for _ in &ckeys {
                    pipe.arg(">");
                }
                let reply: (Option<StreamReadReply>,) = match pipe.query_async(&mut cconn).await {
                    Ok(r) => r,
                    Err(e) => {
                        errors += 1;
                        first_error.get_or_insert_with(|| e.to_string());
                        break;
                    }
                };
                let Some(reply) = reply.0 else { continue };
                for sk in reply.keys {
                    let Some(i) = ckeys.iter().position(|k| *k == sk.key) else {
                        continue;
                    };
                    for id in sk.ids {
                        match id.map.get("d").and_then(bulk) {
                            Some(p) => rec.record(p),
                            None => rec.bad_payloads += 1,
                        }
                        pending[i].push(id.id);
                    }
                }
            }
            (rec, errors, first_error)
        });
        let keys = Arc::new(keys);
        let parts = u64::from(a.partitions);
        let produce = produce_loop(a, &shared, |first, n, payload| {
            let (mut conn, keys) = (pconn.clone(), keys.clone());
            async move {
                let mut pipe = redis::pipe();
                for i in 0..n as u64 {
                    pipe.cmd("XADD")
                        .arg(&keys[((first + i) % parts) as usize])
                        .arg("*")
                        .arg("d")
                        .arg(&payload[..]);
                }
                let replies: Vec<RValue> = pipe.query_async(&mut conn).await?;
                Ok(replies
                    .iter()
                    .filter(|v| !matches!(v, RValue::ServerError(_)))
                    .count() as u64)
            }
        })
        .await;
        let (rec, consume_errors, consume_first_error) = consume.await?;
        let _: Result<(), _> = redis::cmd("DEL")
            .arg(&keys[..])
            .query_async(&mut pconn)
            .await;
        let settings: serde_json::Map<String, Value> = appendonly
            .chunks(2)
            .filter(|c| c.len() == 2)
            .map(|c| (c[0].clone(), Value::String(c[1].clone())))
            .collect();
        Ok(Outcome {
            produce,
            consumed: rec.got,
            consume_elapsed: rec.last_at.duration_since(shared.started),
            lat: rec.lat,
            consume_errors: consume_errors + rec.bad_payloads,
            consume_first_error,
            server: json!({ "version": version, "config": settings }),
        })
    }
}

fn per_sec(n: u64, d: Duration) -> f64 {
    if d.is_zero() {
        0.0
    } else {
        (n as f64 / d.as_secs_f64()).round()
    }
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let a = Args::parse();
    if a.size < 8 {
        eprintln!("--size must be at least 8 (the timestamp)");
        return std::process::ExitCode::from(2);
    }
    let shared = Arc::new(Shared {
        started: Instant::now(),
        expect: AtomicU64::new(a.messages),
        producer_done: AtomicBool::new(false),
    });
    let outcome = match a.system {
        System::Portswitch => ps::run(&a, shared.clone()).await,
        System::Rabbitmq => rabbit::run(&a, shared.clone()).await,
        System::Nats => nats::run(&a, shared.clone()).await,
        System::Redis => redis_streams::run(&a, shared.clone()).await,
    };
    let base = json!({
        "system": a.system.name(),
        "config": a.config,
        "durability": a.durability,
        "partitions": a.partitions,
        "size": a.size,
        "rate": a.rate,
        "batch": a.batch,
        "in_flight": a.in_flight,
        "credit": a.credit,
    });
    let mut report = base.as_object().cloned().unwrap_or_default();
    let ok = match outcome {
        Err(e) => {
            report.insert("messages".into(), json!(a.messages));
            report.insert("errors".into(), json!(1));
            report.insert("error".into(), json!(e.to_string()));
            false
        }
        Ok(o) => {
            let p = &o.produce;
            let lost = p.confirmed.saturating_sub(o.consumed);
            let errors = p.errors + o.consume_errors + lost;
            for (k, v) in [
                ("messages", json!(p.sent)),
                ("messages_requested", json!(a.messages)),
                ("truncated", json!(p.truncated)),
                ("confirmed", json!(p.confirmed)),
                ("consumed", json!(o.consumed)),
                ("produced_per_sec", json!(per_sec(p.confirmed, p.elapsed))),
                (
                    "consumed_per_sec",
                    json!(per_sec(o.consumed, o.consume_elapsed)),
                ),
                ("produce_seconds", json!(p.elapsed.as_secs_f64())),
                ("consume_seconds", json!(o.consume_elapsed.as_secs_f64())),
                ("e2e_p50_us", json!(o.lat.value_at_quantile(0.5))),
                ("e2e_p99_us", json!(o.lat.value_at_quantile(0.99))),
                ("e2e_max_us", json!(o.lat.max())),
                (
                    "batch_confirm_p50_us",
                    json!(p.batch_lat.value_at_quantile(0.5)),
                ),
                (
                    "batch_confirm_p99_us",
                    json!(p.batch_lat.value_at_quantile(0.99)),
                ),
                ("produce_errors", json!(p.errors)),
                ("consume_errors", json!(o.consume_errors)),
                ("lost", json!(lost)),
                ("errors", json!(errors)),
                (
                    "first_error",
                    json!(p.first_error.clone().or(o.consume_first_error.clone())),
                ),
                ("server", o.server.clone()),
            ] {
                report.insert(k.into(), v);
            }
            errors == 0
        }
    };
    println!("{}", Value::Object(report));
    // The peers' client libraries keep background tasks; leave without waiting.
    std::process::exit(if ok { 0 } else { 1 })
}
