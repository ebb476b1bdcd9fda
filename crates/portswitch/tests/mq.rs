//! The message queue as users run it: `portswitch mq serve` as a process, killed with
//! SIGKILL in the middle of producing and consuming, again and again, on the same data
//! directory. Every message whose produce was confirmed is consumed at least once,
//! nothing is consumed that was never produced, and no message is delivered again
//! after its acknowledgement was confirmed. And the CLI's quickstart works.

use std::collections::BTreeSet;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use portswitch_mq::client::MqClient;
use portswitch_mq::proto::{Outgoing, QueueConfig};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

const BIN: &str = env!("CARGO_BIN_EXE_portswitch");

async fn broker(dir: &std::path::Path) -> (Child, String) {
    let d = dir.to_str().unwrap();
    spawn_listening(&[
        "mq",
        "serve",
        "--listen",
        "127.0.0.1:0",
        "--no-http",
        "--data-dir",
        d,
    ])
    .await
}

/// Messages carrying their ids, keyed by id modulo `keys`.
fn numbered(ids: &[u64], keys: u64) -> Vec<Outgoing> {
    ids.iter()
        .map(|i| Outgoing {
            key: (i % keys).to_le_bytes().to_vec().into(),
            payload: i.to_le_bytes().to_vec().into(),
            ..Default::default()
        })
        .collect()
}

#[derive(Default)]
struct Book {
    confirmed: BTreeSet<u64>,
    acked: BTreeSet<u64>,
    consumed: BTreeSet<u64>,
    violations: Vec<String>,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_confirmed_message_is_lost_across_kill_9_of_the_broker() {
    let dir = tempfile::tempdir().unwrap();
    let book = Arc::new(Mutex::new(Book::default()));
    let next = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let rounds = 6;
    for round in 0..rounds {
        let (mut child, addr) = broker(dir.path()).await;
        let c = MqClient::connect(&addr).await.unwrap();
        if round == 0 {
            c.create(
                "durable",
                QueueConfig {
                    partitions: 2,
                    ack_timeout_ms: 2_000,
                    ..Default::default()
                },
            )
            .await
            .unwrap();
        }
        let producer = {
            let (c, book, next) = (c.clone(), book.clone(), next.clone());
            tokio::spawn(async move {
                // A bounded amount per life, so the test's last drain stays short.
                for _ in 0..40 {
                    let ids: Vec<u64> = (0..50)
                        .map(|_| next.fetch_add(1, std::sync::atomic::Ordering::Relaxed))
                        .collect();
                    let msgs = numbered(&ids, 7);
                    match c.produce("durable", msgs).await {
                        Ok(_) => book.lock().unwrap().confirmed.extend(ids),
                        Err(_) => return,
                    }
                    // Spread over the broker's life, so kills land mid-stream.
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            })
        };
        let consumer = {
            let (c, book) = (c.clone(), book.clone());
            tokio::spawn(async move {
                let Ok(mut cons) = c.subscribe("durable", "g", 64).await else {
                    return;
                };
                while let Some(d) = cons.next().await {
                    let id = u64::from_le_bytes(d.payload[..8].try_into().unwrap());
                    {
                        let mut b = book.lock().unwrap();
                        if b.acked.contains(&id) {
                            b.violations
                                .push(format!("{id} delivered after its ack was confirmed"));
                        }
                        b.consumed.insert(id);
                    }
                    if cons.ack(&d).await.is_err() {
                        return;
                    }
                    book.lock().unwrap().acked.insert(id);
                }
            })
        };
        tokio::time::sleep(Duration::from_millis(150 + fastrand::u64(0..350))).await;
        child.start_kill().unwrap();
        child.wait().await.unwrap();
        let _ = tokio::time::timeout(Duration::from_secs(10), producer)
            .await
            .expect("the producer stops");
        let _ = tokio::time::timeout(Duration::from_secs(10), consumer)
            .await
            .expect("the consumer stops");
    }
    // A last life: everything confirmed and not yet consumed comes out.
    let (_child, addr) = broker(dir.path()).await;
    let c = MqClient::connect(&addr).await.unwrap();
    let mut cons = c.subscribe("durable", "g", 500).await.unwrap();
    let produced_max = next.load(std::sync::atomic::Ordering::Relaxed);
    let mut missing: BTreeSet<u64> = {
        let b = book.lock().unwrap();
        b.confirmed.difference(&b.consumed).copied().collect()
    };
    while !missing.is_empty() {
        let first = tokio::time::timeout(Duration::from_secs(10), cons.next())
            .await
            .unwrap_or_else(|_| panic!("{} confirmed messages never came", missing.len()))
            .expect("connection open");
        let mut batch = vec![first];
        while let Some(d) = cons.try_next() {
            batch.push(d);
        }
        let mut settle = Vec::new();
        for d in &batch {
            let id = u64::from_le_bytes(d.payload[..8].try_into().unwrap());
            let mut b = book.lock().unwrap();
            if b.acked.contains(&id) {
                b.violations
                    .push(format!("{id} delivered after its ack was confirmed"));
            }
            assert!(id < produced_max, "{id} was never produced");
            b.consumed.insert(id);
            missing.remove(&id);
            settle.push(portswitch_mq::proto::Settlement {
                partition: d.partition,
                offset: d.offset,
                how: portswitch_mq::proto::How::Ack,
                delay_ms: 0,
            });
        }
        // A delivery older than the ack timeout was already handed out again; its
        // ack is refused (not_in_flight) and the newer delivery is acknowledged.
        if let Err(e) = cons.settle(settle).await {
            assert_eq!(
                e.code(),
                Some(portswitch_mq::proto::Code::NotInFlight),
                "{e}"
            );
        }
    }
    let b = book.lock().unwrap();
    assert!(b.violations.is_empty(), "{:?}", b.violations);
    assert!(
        b.confirmed.len() > 100,
        "too little traffic to tell: {}",
        b.confirmed.len()
    );
    assert!(b.consumed.iter().all(|&i| i < produced_max));
    eprintln!(
        "{rounds} kill -9 rounds: {} confirmed, {} consumed, {} acknowledged before a kill",
        b.confirmed.len(),
        b.consumed.len(),
        b.acked.len()
    );
}

/// Spawns `portswitch ARGS…` and waits for its "listening on ADDR" line.
async fn spawn_listening(args: &[&str]) -> (Child, String) {
    let mut child = Command::new(BIN)
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn");
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let line = tokio::time::timeout(Duration::from_secs(40), lines.next_line())
        .await
        .expect("it starts")
        .unwrap()
        .expect("a line");
    let addr = line
        .strip_prefix("listening on ")
        .expect("listening line")
        .trim()
        .to_string();
    // Keep reading (and dropping) what it prints, so it never blocks on a full pipe.
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    (child, addr)
}

async fn group_broker(dir: &std::path::Path, switch: &str, name: &str) -> (Child, String) {
    let d = dir.to_str().unwrap();
    spawn_listening(&[
        "mq",
        "serve",
        "--listen",
        "127.0.0.1:0",
        "--no-http",
        "--data-dir",
        d,
        "--switch",
        switch,
        "--name",
        name,
    ])
    .await
}

/// The address that leads `port` once one serves it (and is not `not`).
async fn serving_leader(
    sw: &portswitch_client::Client,
    port: &str,
    not: Option<&str>,
) -> Option<String> {
    for _ in 0..6_000 {
        if let Ok(Some(o)) = sw.query(port).await {
            let a = String::from_utf8_lossy(&o.value).into_owned();
            if !a.is_empty() && Some(a.as_str()) != not {
                return Some(a);
            }
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    None
}

/// Three brokers replicate each partition; the leader of a partition is killed with
/// SIGKILL twenty times while producers and consumers go on through the cluster
/// client. Every confirmed message is consumed, none that was never produced appears,
/// none comes back after its acknowledgement was confirmed, and each time another
/// replica takes over.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_confirmed_message_is_lost_across_20_kills_of_a_partition_leader() {
    use portswitch_mq::cluster::Cluster;
    let root = tempfile::tempdir().unwrap();
    let sw_dir = root.path().join("switch");
    let (_switch, sw_addr) = spawn_listening(&[
        "serve",
        "--listen",
        "127.0.0.1:0",
        "--data-dir",
        sw_dir.to_str().unwrap(),
    ])
    .await;
    let names = ["b0", "b1", "b2"];
    let mut brokers: Vec<(Child, String)> = Vec::new();
    for n in names {
        brokers.push(group_broker(&root.path().join(n), &sw_addr, n).await);
    }
    let cluster = Cluster::connect(&sw_addr).await.unwrap();
    cluster
        .create(
            "ha",
            QueueConfig {
                partitions: 2,
                ack_timeout_ms: 3_000,
                ..Default::default()
            },
        )
        .await
        .unwrap();
    let book = Arc::new(Mutex::new(Book::default()));
    let next = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    // Several producers at once, so followers trail the leader by whole batches when
    // it is killed (a new leader that skipped catching up would lose them).
    let producers: Vec<_> = (0..4)
        .map(|_| {
            let (cluster, book, next, stop) =
                (cluster.clone(), book.clone(), next.clone(), stop.clone());
            tokio::spawn(async move {
                let mut refused = 0u64;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let ids: Vec<u64> = (0..50)
                        .map(|_| next.fetch_add(1, std::sync::atomic::Ordering::Relaxed))
                        .collect();
                    let msgs = numbered(&ids, 11);
                    match cluster.produce("ha", msgs).await {
                        Ok(_) => book.lock().unwrap().confirmed.extend(ids),
                        // Not confirmed: may or may not be kept.
                        Err(_) => refused += 1,
                    }
                    tokio::time::sleep(Duration::from_millis(2)).await;
                }
                refused
            })
        })
        .collect();
    let consumer = {
        let (cluster, book) = (cluster.clone(), book.clone());
        tokio::spawn(async move {
            let mut cons = cluster.subscribe("ha", "g", 64).await.unwrap();
            // A produce retried after a failover may store a message twice (at
            // least once): acknowledgements are checked per stored copy, by
            // (partition, offset), which a confirmed message keeps for good.
            let acked: Arc<Mutex<BTreeSet<(u16, u64)>>> = Arc::default();
            while let Some(r) = cons.next().await {
                let id = u64::from_le_bytes(r.delivery.payload[..8].try_into().unwrap());
                let at = (r.delivery.partition, r.delivery.offset);
                {
                    let mut b = book.lock().unwrap();
                    if acked.lock().unwrap().contains(&at) {
                        b.violations.push(format!(
                            "{id} at {at:?} delivered after its ack was confirmed"
                        ));
                    }
                    b.consumed.insert(id);
                }
                // Acknowledgements in flight together, as a real consumer sends them.
                let acked = acked.clone();
                tokio::spawn(async move {
                    if r.ack().await.is_ok() {
                        acked.lock().unwrap().insert(at);
                    }
                });
            }
        })
    };
    let sw =
        portswitch_client::Client::connect(portswitch_client::ClientOptions::new(sw_addr.clone()))
            .await
            .unwrap();
    let mut takeovers = Vec::new();
    for kill in 0..20 {
        let port = format!("mq/ha/{}", kill % 2);
        tokio::time::sleep(Duration::from_millis(300)).await;
        let leader = serving_leader(&sw, &port, None).await.expect("a leader");
        let i = brokers
            .iter()
            .position(|(_, a)| *a == leader)
            .expect("the leader is one of the brokers");
        brokers[i].0.start_kill().unwrap();
        let _ = brokers[i].0.wait().await;
        let killed = std::time::Instant::now();
        let next_leader = serving_leader(&sw, &port, Some(&leader)).await;
        assert!(
            next_leader.is_some(),
            "kill {kill}: no replica took {port} over"
        );
        takeovers.push(killed.elapsed());
        brokers[i] = group_broker(&root.path().join(names[i]), &sw_addr, names[i]).await;
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut refused = 0;
    for p in producers {
        refused += p.await.unwrap();
    }
    // Drain: every confirmed message is consumed.
    let mut missing = Vec::new();
    for _ in 0..1_200 {
        {
            let b = book.lock().unwrap();
            missing = b.confirmed.difference(&b.consumed).copied().collect();
        }
        if missing.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    consumer.abort();
    takeovers.sort();
    {
        let b = book.lock().unwrap();
        let produced_max = next.load(std::sync::atomic::Ordering::Relaxed);
        eprintln!(
        "20 leader kills: {} confirmed, {} consumed, {} produce calls refused; takeover median {:?}, max {:?}",
        b.confirmed.len(),
        b.consumed.len(),
        refused,
        takeovers[takeovers.len() / 2],
        takeovers.last().unwrap()
    );
        assert!(
            b.confirmed.len() > 1_000,
            "too little traffic: {}",
            b.confirmed.len()
        );
        assert!(
            missing.is_empty(),
            "confirmed and never consumed: {missing:?}"
        );
        assert!(
            b.consumed.iter().all(|&id| id < produced_max),
            "a message nobody produced was consumed"
        );
        assert!(b.violations.is_empty(), "{:?}", b.violations);
    }
    // The CLI reaches the group through the port switch.
    let cli = |args: &[&str]| {
        let out = std::process::Command::new(BIN)
            .arg("mq")
            .args(args)
            .args(["--switch", &sw_addr])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "mq {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    };
    assert!(cli(&["list"]).starts_with("ha\tpartitions=2"));
    let placed = cli(&["produce", "ha", "--key", "k", "from the cli"]);
    assert_eq!(placed.lines().count(), 1, "{placed}");
    let got = cli(&["consume", "ha", "--group", "cli", "--count", "1", "--json"]);
    assert!(got.contains("\"payload\""), "{got}");
    // A fourth broker joins and takes b0's place among the replicas. Then b0 and b1
    // go for good: b2 and b3 are a majority of the new replicas (without the move,
    // b2 alone would be left of the old ones and nothing could be confirmed).
    let (_b3, _) = group_broker(&root.path().join("b3"), &sw_addr, "b3").await;
    cli(&["move", "ha", "--from", "b0", "--to", "b3"]);
    for b in &mut brokers[..2] {
        b.0.start_kill().unwrap();
        let _ = b.0.wait().await;
    }
    let placed = cli(&["produce", "ha", "--key", "k", "after the move"]);
    assert_eq!(placed.lines().count(), 1, "{placed}");
    let placed = cli(&["produce", "ha", "--key", "other key", "after the move"]);
    assert_eq!(placed.lines().count(), 1, "{placed}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_creates_produces_consumes_and_replays_dead_letters() {
    let dir = tempfile::tempdir().unwrap();
    let (_child, addr) = broker(dir.path()).await;
    let run = |args: &[&str], stdin: &str| {
        let mut cmd = std::process::Command::new(BIN);
        cmd.arg("mq").args(args).args(["--addr", &addr]);
        cmd.stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().unwrap();
        use std::io::Write;
        child
            .stdin
            .take()
            .unwrap()
            .write_all(stdin.as_bytes())
            .unwrap();
        let out = child.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "mq {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    };
    run(&["create", "orders", "--dlq", "orders.dlq"], "");
    // Offset 0 is the leader's first record (the start of its epoch).
    assert_eq!(run(&["produce", "orders"], "one\ntwo\n"), "0/1\n0/2\n");
    assert_eq!(run(&["consume", "orders", "--count", "1"], ""), "one\n");
    assert_eq!(
        run(
            &["consume", "orders", "--count", "1", "--then", "reject"],
            ""
        ),
        "two\n"
    );
    let shown = run(&["dlq", "show", "orders.dlq"], "");
    assert!(
        shown.contains("reason=rejected\tfrom=orders/0/2\ttwo"),
        "{shown}"
    );
    run(&["dlq", "replay", "orders.dlq"], "");
    assert_eq!(run(&["consume", "orders", "--count", "1"], ""), "two\n");
    let list = run(&["list"], "");
    assert!(
        list.contains("orders\tpartitions=1\tdlq=orders.dlq"),
        "{list}"
    );
    let stat = run(&["stat", "orders", "--json"], "");
    let v: serde_json::Value = serde_json::from_str(&stat).unwrap();
    // Everything appended is confirmed (one broker: itself is the majority).
    assert_eq!(v["p0.end_offset"], v["p0.high_water"], "{v}");
    assert_eq!(v["p0.role"], 2, "{v}");
    assert_eq!(v["p0.group.default.depth"], 0, "{v}");
}
