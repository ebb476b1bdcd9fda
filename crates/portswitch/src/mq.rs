//! `portswitch mq`: run a broker (`serve`, on embedded defaults), manage queues,
//! produce and consume from the command line, replay dead letters, and measure.

use std::io::BufRead;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::{Args, Subcommand};
use portswitch_mq::broker::{BrokerConfig, RunningBroker};
use portswitch_mq::client::MqClient;
use portswitch_mq::proto::{How, Outgoing, QueueConfig, Settlement};

use crate::AppResult;

#[derive(Args, Debug)]
pub struct MqArgs {
    #[command(subcommand)]
    command: MqCommand,
}

#[derive(Args, Debug, Clone)]
struct At {
    /// Broker address.
    #[arg(long, default_value = "127.0.0.1:7480", env = "PORTSWITCH_MQ_ADDR")]
    addr: String,
    /// Find brokers through this port switch instead: the leader of the partition
    /// (the owner of port `mq/<queue>/<partition>`), or any broker of the group.
    #[arg(long, env = "PORTSWITCH_MQ_SWITCH")]
    switch: Option<String>,
}

#[derive(Subcommand, Debug)]
enum MqCommand {
    /// Run a broker (loopback port 7480, data in the user's data directory, an
    /// embedded port switch: nothing to configure).
    Serve(ServeArgs),
    /// Create a queue.
    Create(CreateArgs),
    /// Delete a queue and its messages.
    Delete {
        name: String,
        #[command(flatten)]
        at: At,
    },
    /// Replace one broker by another among a queue's replicas, while producers and
    /// consumers go on (to add a broker to a group, or take one out).
    Move {
        queue: String,
        /// The broker (by name) that gives its replicas up.
        #[arg(long)]
        from: String,
        /// The broker (by name) that takes them.
        #[arg(long)]
        to: String,
        #[command(flatten)]
        at: At,
    },
    /// List queues and their settings.
    List {
        #[command(flatten)]
        at: At,
        /// One JSON object per line.
        #[arg(long)]
        json: bool,
    },
    /// A queue's figures: offsets, bytes, and per group depth, in flight, consumers.
    Stat {
        queue: String,
        #[command(flatten)]
        at: At,
        #[arg(long)]
        json: bool,
    },
    /// Produce messages: the arguments, or each line of standard input.
    Produce(ProduceArgs),
    /// Consume messages as a member of a group, printing and acknowledging each.
    Consume(ConsumeArgs),
    /// Dead letters: show them, or send them back to the queue they came from.
    Dlq(DlqArgs),
    /// Produce and consume through a broker; report throughput and latency.
    Bench(BenchArgs),
}

#[derive(Args, Debug)]
struct ServeArgs {
    #[arg(long, default_value = "127.0.0.1:7480")]
    listen: SocketAddr,
    /// Metrics (/metrics) and health (/health) over HTTP.
    #[arg(long, default_value = "127.0.0.1:7481")]
    http_listen: SocketAddr,
    #[arg(long)]
    no_http: bool,
    /// Where queues are kept (default: $XDG_DATA_HOME/portswitch/mq, or
    /// ~/.local/share/portswitch/mq).
    #[arg(long, env = "PORTSWITCH_MQ_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// A port switch to take partition ports in (default: one embedded in this
    /// process). Brokers on one port switch form a group: queues are replicated
    /// over up to three of them.
    #[arg(long)]
    switch: Option<String>,
    /// This broker's name in its group (default: the name kept in the data
    /// directory, or at first start the listening address).
    #[arg(long)]
    name: Option<String>,
    /// Listen beyond loopback although the broker has no TLS or login yet.
    #[arg(long)]
    danger_allow_insecure_network: bool,
}

#[derive(Args, Debug)]
struct CreateArgs {
    name: String,
    #[command(flatten)]
    at: At,
    #[arg(long, default_value_t = 1)]
    partitions: u16,
    /// Default time to live of a message, ms (0: none).
    #[arg(long, default_value_t = 0)]
    ttl_ms: u64,
    /// Deliveries of a message at most before it is dead-lettered (0: no limit).
    #[arg(long, default_value_t = 5)]
    max_deliveries: u32,
    /// Queue that dead letters go to (created if missing, one partition).
    #[arg(long)]
    dlq: Option<String>,
    /// A delivery not settled within this goes back to the queue.
    #[arg(long, default_value_t = 30_000)]
    ack_timeout_ms: u64,
    /// One message per key in flight at a time, in order.
    #[arg(long)]
    ordered: bool,
    /// fsync every batch before confirming ("batch"), or every 50 ms ("interval":
    /// a crash may lose what was confirmed since).
    #[arg(long, default_value = "batch", value_parser = ["batch", "interval"])]
    fsync: String,
    /// Bytes a partition may hold before producers are told to wait.
    #[arg(long, default_value_t = 1 << 30)]
    retention_bytes: u64,
    #[arg(long, default_value_t = 1 << 20)]
    message_bytes_max: u32,
}

#[derive(Args, Debug)]
struct ProduceArgs {
    queue: String,
    /// Messages (default: each line of standard input).
    messages: Vec<String>,
    #[command(flatten)]
    at: At,
    /// Key: messages with one key go to one partition, in order.
    #[arg(long, default_value = "")]
    key: String,
    /// Deliver no earlier than this many ms from now.
    #[arg(long, default_value_t = 0)]
    delay_ms: u64,
    /// Dead-letter if not settled within this many ms (0: the queue's default).
    #[arg(long, default_value_t = 0)]
    ttl_ms: u64,
}

#[derive(Args, Debug)]
struct ConsumeArgs {
    queue: String,
    #[command(flatten)]
    at: At,
    #[arg(long, default_value = "default")]
    group: String,
    /// Stop after this many messages (default: run until Ctrl-C).
    #[arg(long)]
    count: Option<u64>,
    /// Messages in flight to this consumer per partition at most.
    #[arg(long, default_value_t = 100)]
    credit: u32,
    /// Give every message back instead of acknowledging it (`nack`), or refuse it for
    /// good (`reject`: dead-lettered).
    #[arg(long, value_parser = ["ack", "nack", "reject"], default_value = "ack")]
    then: String,
    /// One JSON object per message.
    #[arg(long)]
    json: bool,
    /// Give up after this long without a message.
    #[arg(long)]
    idle_timeout_ms: Option<u64>,
    /// Receive only the messages this expression matches (the query language over
    /// `key`, `key_str`, `headers`, `payload`, `payload_str`, `json`, `timestamp`,
    /// `offset`; see
    /// docs/MQ.md, "Selectors"). The group's first subscription sets it; later ones
    /// must give the same.
    #[arg(long, value_name = "EXPR")]
    selector: Option<String>,
}

#[derive(Args, Debug)]
struct DlqArgs {
    #[command(subcommand)]
    command: DlqCommand,
}

#[derive(Subcommand, Debug)]
enum DlqCommand {
    /// Show the dead letters in a dead-letter queue (they stay).
    Show {
        dlq: String,
        #[command(flatten)]
        at: At,
        #[arg(long, default_value_t = 100)]
        count: u64,
    },
    /// Send dead letters back to the queue each came from (its `queue=` header).
    Replay {
        dlq: String,
        #[command(flatten)]
        at: At,
        #[arg(long)]
        count: Option<u64>,
    },
}

#[derive(Args, Debug)]
struct BenchArgs {
    #[command(flatten)]
    at: At,
    #[arg(long, default_value_t = 1_000_000)]
    messages: u64,
    /// Payload bytes.
    #[arg(long, default_value_t = 100)]
    size: usize,
    #[arg(long, default_value_t = 1)]
    partitions: u16,
    /// Messages per PRODUCE.
    #[arg(long, default_value_t = 1000)]
    batch: usize,
    /// PRODUCE requests in flight.
    #[arg(long, default_value_t = 8)]
    in_flight: usize,
    #[arg(long, default_value_t = 2000)]
    credit: u32,
    #[arg(long, default_value = "batch", value_parser = ["batch", "interval"])]
    fsync: String,
    /// Replicas of the bench queue (0: up to 3, as many as the group has).
    #[arg(long, default_value_t = 0)]
    replicas: u8,
    /// Produce at most this many messages per second (default: as fast as the broker
    /// takes them); end-to-end latency is measured best below the peak.
    #[arg(long)]
    rate: Option<u64>,
    #[arg(long)]
    json: bool,
}

pub async fn run(args: MqArgs) -> AppResult {
    match args.command {
        MqCommand::Serve(a) => serve(a).await,
        MqCommand::Create(a) => {
            let c = target(&a.at).await?;
            if let Some(dlq) = &a.dlq {
                let exists = c.list().await?.iter().any(|(n, _)| n == dlq);
                if !exists {
                    c.create(dlq, QueueConfig::default()).await?;
                }
            }
            let config = QueueConfig {
                replicas: 0,
                partitions: a.partitions,
                message_bytes_max: a.message_bytes_max,
                ttl_ms: a.ttl_ms,
                max_deliveries: a.max_deliveries,
                dead_letter_queue: a.dlq.clone().unwrap_or_default(),
                ack_timeout_ms: a.ack_timeout_ms,
                ordered_by_key: a.ordered,
                fsync_every_batch: a.fsync == "batch",
                retention_bytes: a.retention_bytes,
            };
            c.create(&a.name, config).await?;
            Ok(ExitCode::SUCCESS)
        }
        MqCommand::Delete { name, at } => {
            target(&at).await?.delete(&name).await?;
            Ok(ExitCode::SUCCESS)
        }
        MqCommand::Move {
            queue,
            from,
            to,
            at,
        } => {
            match target(&at).await? {
                Target::One(c) => c.move_replica(&queue, &from, &to).await?,
                Target::Group(c) => c.move_replica(&queue, &from, &to).await?,
            }
            eprintln!("{queue}: every partition's replicas now have {to} in place of {from}");
            Ok(ExitCode::SUCCESS)
        }
        MqCommand::List { at, json } => {
            for (name, c) in target(&at).await?.list().await? {
                if json {
                    println!(
                        "{}",
                        serde_json::json!({"name": name, "partitions": c.partitions, "ttl_ms": c.ttl_ms, "max_deliveries": c.max_deliveries, "dead_letter_queue": c.dead_letter_queue, "ack_timeout_ms": c.ack_timeout_ms, "ordered_by_key": c.ordered_by_key, "fsync_every_batch": c.fsync_every_batch, "retention_bytes": c.retention_bytes})
                    );
                } else {
                    println!(
                        "{name}\tpartitions={}\tdlq={}\tmax_deliveries={}\tttl_ms={}\tfsync={}",
                        c.partitions,
                        if c.dead_letter_queue.is_empty() {
                            "-"
                        } else {
                            &c.dead_letter_queue
                        },
                        c.max_deliveries,
                        c.ttl_ms,
                        if c.fsync_every_batch {
                            "batch"
                        } else {
                            "interval"
                        }
                    );
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        MqCommand::Stat { queue, at, json } => {
            let stats = connect_for(&at, &queue).await?.stat(&queue).await?;
            if json {
                let m: serde_json::Map<String, serde_json::Value> =
                    stats.into_iter().map(|(k, v)| (k, v.into())).collect();
                println!("{}", serde_json::Value::Object(m));
            } else {
                for (k, v) in stats {
                    println!("{k}\t{v}");
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        MqCommand::Produce(a) => produce(a).await,
        MqCommand::Consume(a) => consume(a).await,
        MqCommand::Dlq(a) => dlq(a).await,
        MqCommand::Bench(a) => bench(a).await,
    }
}

/// A broker: the one at `--addr`, or with `--switch` any broker of the group.
async fn connect(at: &At) -> Result<MqClient, Box<dyn std::error::Error + Send + Sync>> {
    match &at.switch {
        Some(s) => Ok(portswitch_mq::cluster::Cluster::connect(s)
            .await?
            .any()
            .await?),
        None => Ok(MqClient::connect(&at.addr).await?),
    }
}

/// A connection to the broker serving `queue`: found through the port switch when
/// `--switch` is given, else `--addr`.
async fn connect_for(
    at: &At,
    queue: &str,
) -> Result<MqClient, Box<dyn std::error::Error + Send + Sync>> {
    match &at.switch {
        Some(s) => Ok(MqClient::discover(s, queue).await?),
        None => connect(at).await,
    }
}

fn default_data_dir() -> PathBuf {
    match (std::env::var_os("XDG_DATA_HOME"), std::env::var_os("HOME")) {
        (Some(x), _) if !x.is_empty() => PathBuf::from(x).join("portswitch/mq"),
        (_, Some(h)) if !h.is_empty() => PathBuf::from(h).join(".local/share/portswitch/mq"),
        _ => PathBuf::from("portswitch-mq"),
    }
}

async fn serve(a: ServeArgs) -> AppResult {
    for addr in [Some(a.listen), (!a.no_http).then_some(a.http_listen)]
        .into_iter()
        .flatten()
    {
        if !addr.ip().is_loopback() && !a.danger_allow_insecure_network {
            return Err(format!(
                "refusing to listen on {addr}: the broker has no TLS or login yet; keep it on loopback or pass --danger-allow-insecure-network"
            )
            .into());
        }
    }
    let mut cfg = BrokerConfig::new(a.data_dir.clone().unwrap_or_else(default_data_dir));
    cfg.listen = a.listen;
    cfg.http_listen = (!a.no_http).then_some(a.http_listen);
    cfg.switch = a.switch;
    cfg.name = a.name;
    let data = cfg.data_dir.clone();
    let b = RunningBroker::start(cfg).await?;
    println!("listening on {}", b.addr);
    eprintln!(
        "mq broker: data in {}, port switch at {}{}",
        data.display(),
        b.switch_addr,
        b.http_addr.map_or(String::new(), |h| format!(
            ", metrics on http://{h}/metrics"
        ))
    );
    crate::serve::shutdown_signal().await;
    b.stop().await;
    Ok(ExitCode::SUCCESS)
}

async fn produce(a: ProduceArgs) -> AppResult {
    let c = target(&a.at).await?;
    let mut bodies = a.messages.clone();
    if bodies.is_empty() {
        for line in std::io::stdin().lock().lines() {
            bodies.push(line?);
        }
    }
    let msgs: Vec<Outgoing> = bodies
        .into_iter()
        .map(|b| Outgoing {
            key: a.key.clone().into_bytes().into(),
            payload: b.into_bytes().into(),
            delay_ms: a.delay_ms,
            ttl_ms: a.ttl_ms,
        })
        .collect();
    if msgs.is_empty() {
        return Ok(ExitCode::SUCCESS);
    }
    for (p, o) in c.produce_offsets(&a.queue, msgs).await? {
        println!("{p}/{o}");
    }
    Ok(ExitCode::SUCCESS)
}

/// A consumer of one broker, or of a group through its port switch.
enum AnyConsumer {
    One(portswitch_mq::client::Consumer),
    Group(portswitch_mq::cluster::ClusterConsumer),
}

/// A delivery from either, with what settles it.
enum Got {
    One(portswitch_mq::proto::Delivery),
    Group(portswitch_mq::cluster::Received),
}

impl Got {
    fn delivery(&self) -> &portswitch_mq::proto::Delivery {
        match self {
            Got::One(d) => d,
            Got::Group(r) => &r.delivery,
        }
    }
}

impl AnyConsumer {
    async fn subscribe(
        at: &At,
        queue: &str,
        group: &str,
        credit: u32,
    ) -> Result<AnyConsumer, BoxError> {
        AnyConsumer::subscribe_with(at, queue, group, credit, None).await
    }

    async fn subscribe_with(
        at: &At,
        queue: &str,
        group: &str,
        credit: u32,
        selector: Option<&str>,
    ) -> Result<AnyConsumer, BoxError> {
        Ok(match target(at).await? {
            Target::One(c) => {
                AnyConsumer::One(c.subscribe_with(queue, group, credit, selector).await?)
            }
            Target::Group(c) => {
                AnyConsumer::Group(c.subscribe_with(queue, group, credit, selector).await?)
            }
        })
    }

    async fn next(&mut self) -> Option<Got> {
        match self {
            AnyConsumer::One(c) => c.next().await.map(Got::One),
            AnyConsumer::Group(c) => c.next().await.map(Got::Group),
        }
    }

    async fn settle(&self, got: &Got, how: How) -> Result<(), BoxError> {
        match (self, got) {
            (AnyConsumer::One(c), Got::One(d)) => {
                c.settle(vec![Settlement {
                    partition: d.partition,
                    offset: d.offset,
                    how,
                    delay_ms: 0,
                }])
                .await?
            }
            (_, Got::Group(r)) => r.settle(how, 0).await?,
            (AnyConsumer::Group(_), Got::One(_)) => {
                return Err("a delivery settled with a consumer that did not receive it".into())
            }
        }
        Ok(())
    }
}

fn header<'a>(headers: &'a [u8], name: &str) -> Option<&'a str> {
    std::str::from_utf8(headers)
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix(name).and_then(|r| r.strip_prefix('=')))
}

async fn consume(a: ConsumeArgs) -> AppResult {
    let mut consumer =
        AnyConsumer::subscribe_with(&a.at, &a.queue, &a.group, a.credit, a.selector.as_deref())
            .await?;
    let how = match a.then.as_str() {
        "nack" => How::Nack,
        "reject" => How::Reject,
        _ => How::Ack,
    };
    let mut n = 0u64;
    while a.count.is_none_or(|c| n < c) {
        let next = match a.idle_timeout_ms {
            Some(ms) => {
                match tokio::time::timeout(Duration::from_millis(ms), consumer.next()).await {
                    Ok(d) => d,
                    Err(_) => break,
                }
            }
            None => tokio::select! {
                d = consumer.next() => d,
                _ = crate::serve::shutdown_signal() => break,
            },
        };
        let Some(got) = next else {
            return Err("the broker closed the connection".into());
        };
        let d = got.delivery();
        let text = String::from_utf8_lossy(&d.payload);
        if a.json {
            println!(
                "{}",
                serde_json::json!({"partition": d.partition, "offset": d.offset, "attempt": d.attempt, "timestamp_ms": d.timestamp_ms, "key": String::from_utf8_lossy(&d.key), "headers": String::from_utf8_lossy(&d.headers), "payload": text})
            );
        } else {
            println!("{}", crate::ctl::shown(&text));
        }
        consumer.settle(&got, how).await?;
        n += 1;
    }
    Ok(ExitCode::SUCCESS)
}

async fn dlq(a: DlqArgs) -> AppResult {
    match a.command {
        DlqCommand::Show { dlq, at, count } => {
            // A group of its own that never acknowledges: the letters stay for others.
            let group = format!("show-{}", std::process::id());
            let mut consumer = AnyConsumer::subscribe(&at, &dlq, &group, 1000).await?;
            let mut n = 0;
            while n < count {
                let Ok(Some(got)) =
                    tokio::time::timeout(Duration::from_millis(500), consumer.next()).await
                else {
                    break;
                };
                let d = got.delivery();
                println!(
                    "{}\treason={}\tfrom={}/{}/{}\t{}",
                    d.offset,
                    header(&d.headers, "reason").unwrap_or("-"),
                    header(&d.headers, "queue").unwrap_or("-"),
                    header(&d.headers, "partition").unwrap_or("-"),
                    header(&d.headers, "offset").unwrap_or("-"),
                    crate::ctl::shown(&String::from_utf8_lossy(&d.payload))
                );
                n += 1;
            }
            Ok(ExitCode::SUCCESS)
        }
        DlqCommand::Replay { dlq, at, count } => {
            let c = target(&at).await?;
            let mut consumer = AnyConsumer::subscribe(&at, &dlq, "replay", 1000).await?;
            let mut n = 0u64;
            while count.is_none_or(|c| n < c) {
                let Ok(Some(got)) =
                    tokio::time::timeout(Duration::from_millis(500), consumer.next()).await
                else {
                    break;
                };
                let d = got.delivery();
                let Some(origin) = header(&d.headers, "queue") else {
                    consumer.settle(&got, How::Nack).await?;
                    return Err(
                        format!("dead letter {} names no queue it came from", d.offset).into(),
                    );
                };
                c.produce(
                    origin,
                    vec![Outgoing {
                        key: d.key.clone(),
                        payload: d.payload.clone(),
                        ..Default::default()
                    }],
                )
                .await?;
                // Acknowledged only once it is back in its queue: at least once.
                consumer.settle(&got, How::Ack).await?;
                n += 1;
            }
            eprintln!("replayed {n} dead letters");
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// What `mq bench` talks to: one broker, or a group through its port switch.
#[derive(Clone)]
enum Target {
    One(MqClient),
    Group(portswitch_mq::cluster::Cluster),
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The broker at `--addr`, or the group behind `--switch`.
async fn target(at: &At) -> Result<Target, BoxError> {
    Ok(match &at.switch {
        Some(sw) => Target::Group(portswitch_mq::cluster::Cluster::connect(sw).await?),
        None => Target::One(MqClient::connect(&at.addr).await?),
    })
}

impl Target {
    async fn produce_offsets(
        &self,
        queue: &str,
        msgs: Vec<Outgoing>,
    ) -> Result<Vec<(u16, u64)>, BoxError> {
        Ok(match self {
            Target::One(c) => c.produce(queue, msgs).await?,
            Target::Group(c) => c.produce(queue, msgs).await?,
        })
    }

    async fn produce(&self, queue: &str, msgs: Vec<Outgoing>) -> Result<(), BoxError> {
        match self {
            Target::One(c) => c.produce(queue, msgs).await.map(|_| ())?,
            Target::Group(c) => c.produce(queue, msgs).await.map(|_| ())?,
        }
        Ok(())
    }

    async fn create(&self, queue: &str, config: QueueConfig) -> Result<(), BoxError> {
        match self {
            Target::One(c) => c.create(queue, config).await?,
            Target::Group(c) => c.create(queue, config).await?,
        }
        Ok(())
    }

    async fn list(&self) -> Result<Vec<(String, QueueConfig)>, BoxError> {
        Ok(match self {
            Target::One(c) => c.list().await?,
            Target::Group(c) => c.list().await?,
        })
    }

    async fn delete(&self, queue: &str) -> Result<(), BoxError> {
        match self {
            Target::One(c) => c.delete(queue).await?,
            Target::Group(c) => c.delete(queue).await?,
        }
        Ok(())
    }
}

/// Consumes `total` messages, acknowledging in batches; returns (consumed, end-to-end
/// latency histogram in µs, when the last came).
async fn bench_consume(
    at: &At,
    queue: &str,
    credit: u32,
    total: u64,
) -> Result<tokio::task::JoinHandle<(u64, hdrhistogram::Histogram<u64>, Instant)>, BoxError> {
    let record = |lat: &mut hdrhistogram::Histogram<u64>, ts: u64| {
        let now = portswitch_mq::broker::partition::now_ms();
        let _ = lat.record(now.saturating_sub(ts) * 1000);
    };
    if let Some(sw) = &at.switch {
        let cluster = portswitch_mq::cluster::Cluster::connect(sw).await?;
        let mut consumer = cluster.subscribe(queue, "bench", credit).await?;
        return Ok(tokio::spawn(async move {
            let _keep = cluster;
            let mut got = 0u64;
            let mut lat = hdrhistogram::Histogram::<u64>::new(3).expect("histogram");
            while got < total {
                let Some(r) = consumer.next().await else {
                    break;
                };
                let mut batch = vec![r];
                while let Some(r) = consumer.try_next() {
                    batch.push(r);
                }
                for r in &batch {
                    record(&mut lat, r.delivery.timestamp_ms);
                }
                got += batch.len() as u64;
                if portswitch_mq::cluster::ack_all(&batch).await.is_err() {
                    break;
                }
            }
            (got, lat, Instant::now())
        }));
    }
    let consumer_client = connect(at).await?;
    let mut consumer = consumer_client.subscribe(queue, "bench", credit).await?;
    Ok(tokio::spawn(async move {
        let _keep = consumer_client;
        let mut got = 0u64;
        let mut lat = hdrhistogram::Histogram::<u64>::new(3).expect("histogram");
        let mut acks = Vec::new();
        let ack = |d: &portswitch_mq::proto::Delivery| Settlement {
            partition: d.partition,
            offset: d.offset,
            how: How::Ack,
            delay_ms: 0,
        };
        while got < total {
            let Some(d) = consumer.next().await else {
                break;
            };
            record(&mut lat, d.timestamp_ms);
            acks.push(ack(&d));
            got += 1;
            while let Some(d) = consumer.try_next() {
                record(&mut lat, d.timestamp_ms);
                acks.push(ack(&d));
                got += 1;
            }
            if consumer.settle(std::mem::take(&mut acks)).await.is_err() {
                break;
            }
        }
        (got, lat, Instant::now())
    }))
}

async fn bench(a: BenchArgs) -> AppResult {
    let c = target(&a.at).await?;
    let queue = format!("bench-{}", std::process::id());
    c.create(
        &queue,
        QueueConfig {
            partitions: a.partitions,
            fsync_every_batch: a.fsync == "batch",
            retention_bytes: 8 << 30,
            replicas: a.replicas,
            ..QueueConfig::default()
        },
    )
    .await?;
    let payload = bytes::Bytes::from(vec![b'x'; a.size]);
    let total = a.messages;
    let started = Instant::now();
    let consume = bench_consume(&a.at, &queue, a.credit, total).await?;
    let gate = std::sync::Arc::new(tokio::sync::Semaphore::new(a.in_flight.max(1)));
    let mut sent = 0u64;
    let mut waits = Vec::new();
    let mut produce_lat = hdrhistogram::Histogram::<u64>::new(3)?;
    let (lat_tx, mut lat_rx) = tokio::sync::mpsc::unbounded_channel::<u64>();
    let mut key = 0u64;
    while sent < total {
        if let Some(rate) = a.rate {
            let due = started + Duration::from_secs_f64(sent as f64 / rate.max(1) as f64);
            tokio::time::sleep_until(due.into()).await;
        }
        let n = (a.batch as u64).min(total - sent) as usize;
        let msgs: Vec<Outgoing> = (0..n)
            .map(|_| {
                key += 1;
                Outgoing {
                    key: if a.partitions > 1 {
                        (key % u64::from(a.partitions))
                            .to_le_bytes()
                            .to_vec()
                            .into()
                    } else {
                        bytes::Bytes::new()
                    },
                    payload: payload.clone(),
                    ..Default::default()
                }
            })
            .collect();
        let permit = gate.clone().acquire_owned().await?;
        let (c, q, tx) = (c.clone(), queue.clone(), lat_tx.clone());
        waits.push(tokio::spawn(async move {
            let t = Instant::now();
            let r = c.produce(&q, msgs).await;
            let _ = tx.send(t.elapsed().as_micros() as u64);
            drop(permit);
            r.map(|_| ())
        }));
        sent += n as u64;
    }
    let mut errors = 0;
    for w in waits {
        if !matches!(w.await, Ok(Ok(()))) {
            errors += 1;
        }
    }
    let produced_at = started.elapsed();
    drop(lat_tx);
    while let Some(us) = lat_rx.recv().await {
        let _ = produce_lat.record(us);
    }
    let (got, e2e, consumed_at) = tokio::time::timeout(Duration::from_secs(120), consume).await??;
    let consumed = consumed_at.duration_since(started);
    let _ = c.delete(&queue).await;
    let report = serde_json::json!({
        "workload": "mq-produce-consume",
        "messages": total,
        "size": a.size,
        "partitions": a.partitions,
        "batch": a.batch,
        "in_flight": a.in_flight,
        "fsync": a.fsync,
        "replicas": a.replicas,
        "group": a.at.switch.is_some(),
        "rate": a.rate,
        "produced_per_sec": (total as f64 / produced_at.as_secs_f64()).round(),
        "consumed_per_sec": (got as f64 / consumed.as_secs_f64()).round(),
        "consumed": got,
        "produce_errors": errors,
        "produce_batch_p50_us": produce_lat.value_at_quantile(0.5),
        "produce_batch_p99_us": produce_lat.value_at_quantile(0.99),
        "end_to_end_p50_us": e2e.value_at_quantile(0.5),
        "end_to_end_p99_us": e2e.value_at_quantile(0.99),
    });
    if a.json {
        println!("{report}");
    } else {
        println!("{}", serde_json::to_string_pretty(&report)?);
    }
    Ok(if errors == 0 && got == total {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}
