//! The broker over real TCP on loopback, driven by the client library: produce and
//! consume, competing consumers, redelivery, dead letters, limits and bad input.

use std::sync::Arc;
use std::time::Duration;

use portswitch_mq::broker::{BrokerConfig, RunningBroker};
use portswitch_mq::client::{ClientError, MqClient};
use portswitch_mq::proto::{self, Code, How, Outgoing, QueueConfig, Settlement};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

async fn broker(dir: &std::path::Path) -> RunningBroker {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
    let mut cfg = BrokerConfig::new(dir);
    cfg.listen = "127.0.0.1:0".parse().unwrap();
    cfg.http_listen = Some("127.0.0.1:0".parse().unwrap());
    cfg.queues_max = 4;
    RunningBroker::start(cfg).await.expect("the broker starts")
}

fn msg(key: &str, payload: &str) -> Outgoing {
    Outgoing {
        key: key.as_bytes().to_vec().into(),
        payload: payload.as_bytes().to_vec().into(),
        ..Default::default()
    }
}

async fn within<T>(fut: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(10), fut)
        .await
        .expect("in time")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_go_round_once_acknowledged_and_keys_keep_their_order() {
    let dir = tempfile::tempdir().unwrap();
    let b = broker(dir.path()).await;
    let c = MqClient::connect(&b.addr.to_string()).await.unwrap();
    c.create(
        "orders",
        QueueConfig {
            partitions: 4,
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let msgs: Vec<Outgoing> = (0..400)
        .map(|i| msg(&format!("k{}", i % 10), &format!("{i}")))
        .collect();
    let placed = c.produce("orders", msgs).await.unwrap();
    assert_eq!(placed.len(), 400);
    // One key, one partition.
    for i in 0..400 {
        assert_eq!(placed[i].0, placed[i % 10].0);
    }
    // Two competing consumers share the messages; each key's come in order.
    let mut a = c.subscribe("orders", "g", 50).await.unwrap();
    let c2 = MqClient::connect(&b.addr.to_string()).await.unwrap();
    let mut b2 = c2.subscribe("orders", "g", 50).await.unwrap();
    let mut seen = std::collections::BTreeMap::<String, Vec<u32>>::new();
    let (mut from_a, mut from_b) = (0, 0);
    while from_a + from_b < 400 {
        let (d, who) = within(async {
            tokio::select! {
                d = a.next() => (d.unwrap(), 0),
                d = b2.next() => (d.unwrap(), 1),
            }
        })
        .await;
        let n: u32 = String::from_utf8(d.payload.to_vec())
            .unwrap()
            .parse()
            .unwrap();
        seen.entry(String::from_utf8(d.key.to_vec()).unwrap())
            .or_default()
            .push(n);
        let s = vec![Settlement {
            partition: d.partition,
            offset: d.offset,
            how: How::Ack,
            delay_ms: 0,
        }];
        if who == 0 {
            from_a += 1;
            a.settle(s).await.unwrap();
        } else {
            from_b += 1;
            b2.settle(s).await.unwrap();
        }
    }
    assert!(
        from_a > 0 && from_b > 0,
        "both consumers got messages: {from_a} {from_b}"
    );
    assert_eq!(seen.values().map(Vec::len).sum::<usize>(), 400);
    // Nothing more comes: every message was acknowledged once.
    assert!(tokio::time::timeout(Duration::from_millis(300), a.next())
        .await
        .is_err());
    let stats = c.stat("orders").await.unwrap();
    let depth: u64 = stats
        .iter()
        .filter(|(k, _)| k.ends_with(".group.g.depth"))
        .map(|(_, v)| v)
        .sum();
    assert_eq!(depth, 0, "{stats:?}");
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consumer_that_goes_away_has_its_messages_delivered_again() {
    let dir = tempfile::tempdir().unwrap();
    let b = broker(dir.path()).await;
    let addr = b.addr.to_string();
    let c = MqClient::connect(&addr).await.unwrap();
    c.create("jobs", QueueConfig::default()).await.unwrap();
    c.produce("jobs", vec![msg("", "a"), msg("", "b")])
        .await
        .unwrap();
    {
        let gone = MqClient::connect(&addr).await.unwrap();
        let mut first = gone.subscribe("jobs", "w", 10).await.unwrap();
        let d = within(first.next()).await.unwrap();
        assert_eq!((&d.payload[..], d.attempt), (&b"a"[..], 1));
        first.ack(&d).await.unwrap();
        let d = within(first.next()).await.unwrap();
        assert_eq!(&d.payload[..], b"b");
        // Dropped without settling "b".
    }
    let mut second = c.subscribe("jobs", "w", 10).await.unwrap();
    let d = within(second.next()).await.unwrap();
    assert_eq!((&d.payload[..], d.attempt), (&b"b"[..], 2));
    // Settling something not in flight to you is a typed error.
    let e = second
        .settle(vec![Settlement {
            partition: 0,
            offset: 0,
            how: How::Ack,
            delay_ms: 0,
        }])
        .await
        .unwrap_err();
    assert_eq!(e.code(), Some(Code::NotInFlight), "{e}");
    second.nack(&d, 100).await.unwrap();
    let again = within(second.next()).await.unwrap();
    assert_eq!((again.offset, again.attempt), (d.offset, 3));
    second.ack(&again).await.unwrap();
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_rejected_and_exhausted_messages_become_dead_letters_with_a_reason() {
    let dir = tempfile::tempdir().unwrap();
    let b = broker(dir.path()).await;
    let c = MqClient::connect(&b.addr.to_string()).await.unwrap();
    c.create("dlq", QueueConfig::default()).await.unwrap();
    c.create(
        "work",
        QueueConfig {
            dead_letter_queue: "dlq".into(),
            max_deliveries: 1,
            ack_timeout_ms: 200,
            ..Default::default()
        },
    )
    .await
    .unwrap();
    c.produce(
        "work",
        vec![
            Outgoing {
                ttl_ms: 50,
                ..msg("", "expires")
            },
            msg("", "rejected"),
            msg("", "times-out"),
        ],
    )
    .await
    .unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    let mut w = c.subscribe("work", "g", 10).await.unwrap();
    let mut letters = Vec::new();
    let mut d = c.subscribe("dlq", "inspect", 10).await.unwrap();
    while letters.len() < 3 {
        tokio::select! {
            got = w.next() => {
                let got = got.unwrap();
                if got.payload[..] == b"rejected"[..] {
                    w.reject(&got).await.unwrap();
                }
                // "times-out" is left to its ack timeout.
            }
            letter = d.next() => letters.push(letter.unwrap()),
            _ = tokio::time::sleep(Duration::from_secs(10)) => panic!("dead letters: {letters:?}"),
        }
    }
    let reason = |p: &[u8]| {
        let l = letters.iter().find(|l| l.payload == p).expect("a letter");
        String::from_utf8(l.headers.to_vec()).unwrap()
    };
    assert!(
        reason(b"expires").contains("reason=expired\nqueue=work"),
        "{}",
        reason(b"expires")
    );
    assert!(reason(b"rejected").contains("reason=rejected"));
    assert!(reason(b"times-out").contains("reason=max_deliveries"));
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limits_and_bad_input_get_typed_errors_and_the_broker_keeps_serving() {
    let dir = tempfile::tempdir().unwrap();
    let b = broker(dir.path()).await;
    let addr = b.addr.to_string();
    let c = MqClient::connect(&addr).await.unwrap();
    let code = |e: ClientError| e.code();
    assert_eq!(
        code(
            c.create("../etc", QueueConfig::default())
                .await
                .unwrap_err()
        ),
        Some(Code::BadRequest)
    );
    assert_eq!(
        code(
            c.create(
                "q",
                QueueConfig {
                    partitions: 0,
                    ..Default::default()
                }
            )
            .await
            .unwrap_err()
        ),
        Some(Code::Limit)
    );
    c.create(
        "small",
        QueueConfig {
            message_bytes_max: 10,
            retention_bytes: 4096,
            ..Default::default()
        },
    )
    .await
    .unwrap();
    assert_eq!(
        code(c.create("small", QueueConfig::default()).await.unwrap_err()),
        Some(Code::QueueExists)
    );
    assert_eq!(
        code(
            c.produce("small", vec![msg("", "more than ten bytes")])
                .await
                .unwrap_err()
        ),
        Some(Code::TooLarge)
    );
    assert_eq!(
        code(c.produce("nope", vec![msg("", "x")]).await.unwrap_err()),
        Some(Code::UnknownQueue)
    );
    // The partition fills up: producers are told to wait, nothing is dropped.
    let mut accepted = 0;
    let full = loop {
        match c.produce("small", vec![msg("", "0123456789")]).await {
            Ok(_) => accepted += 1,
            Err(e) => break e,
        }
        assert!(accepted < 1000, "never full");
    };
    assert_eq!(full.code(), Some(Code::Full), "{full}");
    for i in 0..3 {
        c.create(&format!("q{i}"), QueueConfig::default())
            .await
            .unwrap_or(());
    }
    assert_eq!(
        code(c.create("q9", QueueConfig::default()).await.unwrap_err()),
        Some(Code::Limit)
    );
    // Garbage on a raw socket: an error, the connection closed, the others unaffected.
    let mut raw = tokio::net::TcpStream::connect(&addr).await.unwrap();
    raw.write_all(&[0xff; 64]).await.unwrap();
    let mut back = Vec::new();
    let _ = within(raw.read_to_end(&mut back)).await;
    let mut hello_first = tokio::net::TcpStream::connect(&addr).await.unwrap();
    let mut body = bytes::BytesMut::new();
    proto::Request::List.encode(1, &mut body);
    let mut f = bytes::BytesMut::new();
    proto::frame(&body, &mut f);
    hello_first.write_all(&f).await.unwrap();
    let mut back = Vec::new();
    within(hello_first.read_to_end(&mut back)).await.unwrap();
    assert!(
        String::from_utf8_lossy(&back).contains("HELLO comes first"),
        "{back:?}"
    );
    // The first client still works, and the queue kept every accepted message.
    let mut cons = c.subscribe("small", "g", 1000).await.unwrap();
    for _ in 0..accepted {
        within(cons.next()).await.unwrap();
    }
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queues_messages_and_acknowledgements_survive_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let b = broker(dir.path()).await;
    let c = MqClient::connect(&b.addr.to_string()).await.unwrap();
    c.create(
        "keep",
        QueueConfig {
            partitions: 2,
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let msgs: Vec<Outgoing> = (0..20)
        .map(|i| msg(&format!("{i}"), &format!("{i}")))
        .collect();
    c.produce("keep", msgs).await.unwrap();
    let mut cons = c.subscribe("keep", "g", 100).await.unwrap();
    let mut acked = std::collections::BTreeSet::new();
    for _ in 0..8 {
        let d = within(cons.next()).await.unwrap();
        cons.ack(&d).await.unwrap();
        acked.insert(d.payload);
    }
    drop(cons);
    drop(c);
    b.stop().await;
    let b = broker(dir.path()).await;
    let c = MqClient::connect(&b.addr.to_string()).await.unwrap();
    assert_eq!(c.list().await.unwrap()[0].1.partitions, 2);
    let mut cons = c.subscribe("keep", "g", 100).await.unwrap();
    let mut rest = std::collections::BTreeSet::new();
    while rest.len() < 12 {
        let d = within(cons.next()).await.unwrap();
        assert!(
            !acked.contains(&d.payload),
            "an acknowledged message came back"
        );
        rest.insert(d.payload);
    }
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_producer_packs_messages_sent_one_at_a_time_into_batches() {
    let dir = tempfile::tempdir().unwrap();
    let b = broker(dir.path()).await;
    let c = MqClient::connect(&b.addr.to_string()).await.unwrap();
    c.create("packed", QueueConfig::default()).await.unwrap();
    let p = c.producer("packed", 4);
    let mut waits = Vec::new();
    for i in 0..2_000 {
        waits.push(p.send(msg("", &format!("{i}"))).await.unwrap());
    }
    let mut offsets = std::collections::BTreeSet::new();
    for w in waits {
        let (_, offset) = within(w).await.unwrap().unwrap();
        offsets.insert(offset);
    }
    assert_eq!(
        offsets.len(),
        2_000,
        "every message got an offset of its own"
    );
    // Contiguous: nothing else was appended meanwhile.
    assert_eq!(offsets.last().unwrap() - offsets.first().unwrap(), 1_999);
    // Far fewer fsyncs than messages: they travelled in batches.
    let metrics = reqwest_free_get(b.http_addr.unwrap()).await;
    let count = metrics
        .lines()
        .find(|l| l.starts_with("portswitch_mq_fsync_seconds_count{queue=\"packed\"}"))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse::<u64>().ok())
        .expect("an fsync count");
    assert!(count < 500, "{count} fsyncs for 2,000 messages");
    b.stop().await;
}

/// GET /metrics over a plain socket.
async fn reqwest_free_get(addr: std::net::SocketAddr) -> String {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(b"GET /metrics HTTP/1.0\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut out = String::new();
    within(s.read_to_string(&mut out)).await.unwrap();
    out
}

async fn switch() -> portswitch_server::RunningServer {
    let mut sc = portswitch_server::ServerConfig::ephemeral();
    sc.http_listen = None;
    portswitch_server::RunningServer::start(sc).await.unwrap()
}

async fn member(dir: &std::path::Path, switch: &str, name: &str) -> RunningBroker {
    member_with(dir, switch, name, |_| {}).await
}

async fn member_with(
    dir: &std::path::Path,
    switch: &str,
    name: &str,
    tune: impl FnOnce(&mut BrokerConfig),
) -> RunningBroker {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
    let mut cfg = BrokerConfig::new(dir);
    cfg.listen = "127.0.0.1:0".parse().unwrap();
    cfg.http_listen = None;
    cfg.switch = Some(switch.to_string());
    cfg.name = Some(name.to_string());
    tune(&mut cfg);
    RunningBroker::start(cfg).await.expect("the broker starts")
}

/// A port switch and `n` brokers on it named b0, b1…, with their data directories.
async fn group(
    n: usize,
    tune: impl Fn(&mut BrokerConfig) + Copy,
) -> (
    portswitch_server::RunningServer,
    Vec<tempfile::TempDir>,
    Vec<Option<RunningBroker>>,
) {
    let sw = switch().await;
    let sw_addr = sw.addr.to_string();
    let dirs: Vec<_> = (0..n).map(|_| tempfile::tempdir().unwrap()).collect();
    let mut brokers = Vec::new();
    for (i, d) in dirs.iter().enumerate() {
        brokers.push(Some(
            member_with(d.path(), &sw_addr, &format!("b{i}"), tune).await,
        ));
    }
    (sw, dirs, brokers)
}

/// The broker that leads `queue`'s partition 0, once one does (and is not `not`).
async fn leader_addr(switch: &str, queue: &str, not: Option<&str>) -> String {
    for _ in 0..500 {
        if let Ok(a) = portswitch_mq::client::broker_of(switch, &format!("mq/{queue}/0")).await {
            if Some(a.as_str()) != not {
                return a;
            }
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("no leader for {queue}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_replicates_each_partition_and_a_survivor_serves_every_confirmed_message() {
    let (sw, _dirs, mut brokers) = group(3, |_| {}).await;
    let sw_addr = sw.addr.to_string();
    let c = MqClient::connect(&brokers[0].as_ref().unwrap().addr.to_string())
        .await
        .unwrap();
    c.create(
        "rep",
        QueueConfig {
            ack_timeout_ms: 500,
            ..Default::default()
        },
    )
    .await
    .unwrap();
    // Every broker holds the queue: three replicas by default.
    for b in brokers.iter().flatten() {
        let c = MqClient::connect(&b.addr.to_string()).await.unwrap();
        assert_eq!(c.list().await.unwrap()[0].0, "rep");
        assert!(c
            .stat("rep")
            .await
            .unwrap()
            .contains(&("p0.replicas".to_string(), 3)));
    }
    let first = leader_addr(&sw_addr, "rep", None).await;
    let via = MqClient::discover(&sw_addr, "rep").await.unwrap();
    via.produce("rep", vec![msg("", "m-found")]).await.unwrap();
    let e = MqClient::discover(&sw_addr, "nowhere").await.err().unwrap();
    assert_eq!(e.code(), Some(Code::NotLeader), "{e}");
    // A broker that does not lead the partition refuses, by name.
    let other = brokers
        .iter()
        .flatten()
        .find(|b| b.addr.to_string() != first)
        .unwrap();
    let e = MqClient::connect(&other.addr.to_string())
        .await
        .unwrap()
        .produce("rep", vec![msg("", "x")])
        .await
        .unwrap_err();
    assert_eq!(e.code(), Some(Code::NotLeader), "{e}");
    let lc = MqClient::connect(&first).await.unwrap();
    let batch: Vec<Outgoing> = (0..300).map(|i| msg("", &format!("m{i}"))).collect();
    lc.produce("rep", batch).await.unwrap();
    // Half of them acknowledged (confirmed by a majority before the reply).
    let mut cons = lc.subscribe("rep", "g", 1000).await.unwrap();
    let mut acked = std::collections::BTreeSet::new();
    while acked.len() < 150 {
        let d = within(cons.next()).await.unwrap();
        cons.ack(&d).await.unwrap();
        acked.insert(d.payload.clone());
    }
    drop(cons);
    drop(lc);
    // The leader goes; another replica leads, with every confirmed message and the
    // acknowledgements.
    let gone = brokers
        .iter()
        .position(|b| b.as_ref().is_some_and(|b| b.addr.to_string() == first))
        .unwrap();
    brokers[gone].take().unwrap().stop().await;
    let second = leader_addr(&sw_addr, "rep", Some(&first)).await;
    let nc = MqClient::connect(&second).await.unwrap();
    nc.produce("rep", vec![msg("", "after")]).await.unwrap();
    let mut cons = nc.subscribe("rep", "g", 1000).await.unwrap();
    let mut rest = std::collections::BTreeSet::new();
    while rest.len() < 152 {
        let d = within(cons.next()).await.unwrap();
        assert!(
            !acked.contains(&d.payload),
            "an acknowledged message came back"
        );
        assert!(
            d.payload.starts_with(b"m") || d.payload.as_ref() == b"after",
            "a message nobody produced: {:?}",
            d.payload
        );
        cons.ack(&d).await.unwrap();
        rest.insert(d.payload.clone());
    }
    for b in brokers.into_iter().flatten() {
        b.stop().await;
    }
}

/// Which brokers (by address) lead each of `queue`'s `n` partitions, once all do.
async fn leaders(switch: &str, queue: &str, n: u16) -> Vec<String> {
    let mut out = Vec::new();
    for p in 0..n {
        let port = format!("mq/{queue}/{p}");
        let mut found = None;
        for _ in 0..1_000 {
            if let Ok(a) = portswitch_mq::client::broker_of(switch, &port).await {
                found = Some(a);
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        out.push(found.expect("a leader"));
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leaders_spread_over_the_group_and_go_back_to_their_preferred_broker() {
    let (sw, dirs, mut brokers) = group(3, |_| {}).await;
    let sw_addr = sw.addr.to_string();
    let cluster = portswitch_mq::cluster::Cluster::connect(&sw_addr)
        .await
        .unwrap();
    cluster
        .create(
            "spread",
            QueueConfig {
                partitions: 3,
                ..Default::default()
            },
        )
        .await
        .unwrap();
    let before = leaders(&sw_addr, "spread", 3).await;
    let distinct: std::collections::BTreeSet<&String> = before.iter().collect();
    assert_eq!(distinct.len(), 3, "one partition per broker: {before:?}");
    // The leader of partition 0 goes: another replica takes it, producers go on.
    let gone = brokers
        .iter()
        .position(|b| b.as_ref().is_some_and(|b| b.addr.to_string() == before[0]))
        .unwrap();
    brokers[gone].take().unwrap().stop().await;
    cluster
        .produce_to("spread", 0, vec![msg("", "during")])
        .await
        .unwrap();
    let during = leaders(&sw_addr, "spread", 1).await;
    assert_ne!(during[0], before[0]);
    // It comes back (same data, same name): once caught up it leads partition 0 again.
    let back = member(dirs[gone].path(), &sw_addr, &format!("b{gone}")).await;
    let back_addr = back.addr.to_string();
    brokers[gone] = Some(back);
    let mut led = false;
    for _ in 0..500 {
        if leaders(&sw_addr, "spread", 1).await[0] == back_addr {
            led = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(led, "partition 0 did not go back to its preferred broker");
    cluster
        .produce_to("spread", 0, vec![msg("", "after")])
        .await
        .unwrap();
    let mut cons = cluster.subscribe("spread", "g", 100).await.unwrap();
    let mut got = std::collections::BTreeSet::new();
    while got.len() < 2 {
        let r = within(cons.next()).await.unwrap();
        got.insert(r.delivery.payload.clone());
        r.ack().await.unwrap();
    }
    assert!(got.contains(b"during".as_slice()) && got.contains(b"after".as_slice()));
    for b in brokers.into_iter().flatten() {
        b.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_consumer_leaves_its_group_and_its_messages_go_to_the_others() {
    let dir = tempfile::tempdir().unwrap();
    let b = broker(dir.path()).await;
    let c = MqClient::connect(&b.addr.to_string()).await.unwrap();
    c.create(
        "left",
        QueueConfig {
            // Long enough that only leaving the group can explain a quick redelivery.
            ack_timeout_ms: 600_000,
            ..Default::default()
        },
    )
    .await
    .unwrap();
    c.produce("left", (0..10).map(|i| msg("", &format!("{i}"))).collect())
        .await
        .unwrap();
    let mut first = c.subscribe("left", "g", 10).await.unwrap();
    let d = within(first.next()).await.unwrap();
    assert_eq!(d.attempt, 1);
    // The same connection stays open: only the drop tells the broker.
    drop(first);
    let mut second = c.subscribe("left", "g", 10).await.unwrap();
    let mut got = std::collections::BTreeSet::new();
    while got.len() < 10 {
        let d = within(second.next()).await.unwrap();
        got.insert(d.payload.clone());
        second.ack(&d).await.unwrap();
    }
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_moves_to_another_broker_while_producers_go_on() {
    let sw = switch().await;
    let sw_addr = sw.addr.to_string();
    let dirs: Vec<_> = (0..4).map(|_| tempfile::tempdir().unwrap()).collect();
    let mut brokers = Vec::new();
    for (i, d) in dirs.iter().enumerate() {
        brokers.push(member(d.path(), &sw_addr, &format!("b{i}")).await);
    }
    let cluster = portswitch_mq::cluster::Cluster::connect(&sw_addr)
        .await
        .unwrap();
    cluster
        .create(
            "moving",
            QueueConfig {
                partitions: 2,
                replicas: 3,
                ..Default::default()
            },
        )
        .await
        .unwrap();
    // Which brokers hold it: three of the four.
    let mut holders = Vec::new();
    let mut spare = None;
    for (i, b) in brokers.iter().enumerate() {
        let c = MqClient::connect(&b.addr.to_string()).await.unwrap();
        if c.list().await.unwrap().iter().any(|(n, _)| n == "moving") {
            holders.push(i);
        } else {
            spare = Some(i);
        }
    }
    assert_eq!(holders.len(), 3);
    let spare = spare.unwrap();
    // A log of several fetches' worth, so the new broker is still catching up when
    // the new replicas are confirmed by the other two.
    let big: Vec<Outgoing> = (0..6_000)
        .map(|i| msg("k0", &format!("big{i:0>1000}")))
        .collect();
    for chunk in big.chunks(1_000) {
        cluster
            .produce_to("moving", 0, chunk.to_vec())
            .await
            .unwrap();
    }
    // Move away the broker that leads partition 0 (its leadership moves as well).
    let lead0 = leaders(&sw_addr, "moving", 1).await[0].clone();
    let from = brokers
        .iter()
        .position(|b| b.addr.to_string() == lead0)
        .unwrap();
    // Producers go on during the move.
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let producing = {
        let (cluster, stop) = (cluster.clone(), stop.clone());
        tokio::spawn(async move {
            let mut confirmed = Vec::new();
            let mut i = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let batch: Vec<Outgoing> = (0..20)
                    .map(|k| msg(&format!("k{}", (i + k) % 7), &format!("{}", i + k)))
                    .collect();
                if cluster.produce("moving", batch).await.is_ok() {
                    confirmed.extend(i..i + 20);
                }
                i += 20;
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            confirmed
        })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    within(cluster.move_replica("moving", &format!("b{from}"), &format!("b{spare}")))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let confirmed = producing.await.unwrap();
    assert!(confirmed.len() > 100, "{}", confirmed.len());
    // The new broker holds the queue, leads partition 0 (it took the old one's place,
    // and so its preferred partition), and the old one drops the queue.
    let to_addr = brokers[spare].addr.to_string();
    let mut moved = false;
    for _ in 0..500 {
        let led = leaders(&sw_addr, "moving", 1).await[0] == to_addr;
        let gone = !MqClient::connect(&brokers[from].addr.to_string())
            .await
            .unwrap()
            .list()
            .await
            .unwrap()
            .iter()
            .any(|(n, _)| n == "moving");
        if led && gone {
            moved = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(
        moved,
        "partition 0 not led by the new replica, or the old one kept the queue"
    );
    let stat = MqClient::connect(&to_addr)
        .await
        .unwrap()
        .stat("moving")
        .await
        .unwrap();
    assert!(stat.contains(&("p0.replicas".to_string(), 3)), "{stat:?}");
    assert!(
        stat.contains(&("p0.changing_replicas".to_string(), 0)),
        "{stat:?}"
    );
    // Every confirmed message is there.
    let mut cons = cluster.subscribe("moving", "g", 1000).await.unwrap();
    let want: std::collections::BTreeSet<u64> = confirmed.into_iter().collect();
    let mut got = std::collections::BTreeSet::new();
    while !want.is_subset(&got) {
        let mut batch = vec![within(cons.next()).await.unwrap()];
        while let Some(r) = cons.try_next() {
            batch.push(r);
        }
        for r in &batch {
            if !r.delivery.payload.starts_with(b"big") {
                got.insert(
                    String::from_utf8_lossy(&r.delivery.payload)
                        .parse::<u64>()
                        .unwrap(),
                );
            }
        }
        portswitch_mq::cluster::ack_all(&batch).await.unwrap();
    }
    // With the old broker gone altogether, the queue still has a majority everywhere.
    let old = brokers.remove(from);
    old.stop().await;
    cluster
        .produce("moving", vec![msg("k1", "last"), msg("k2", "last")])
        .await
        .unwrap();
    for b in brokers {
        b.stop().await;
    }
}

async fn stat_of(addr: &str, queue: &str, name: &str) -> u64 {
    let stat = MqClient::connect(addr)
        .await
        .unwrap()
        .stat(queue)
        .await
        .unwrap();
    stat.iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| *v)
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_behind_the_leaders_reclaimed_log_starts_again_where_it_starts() {
    let small = |c: &mut BrokerConfig| c.segment_bytes_max = 4096;
    let (sw, dirs, mut brokers) = group(3, small).await;
    let sw_addr = sw.addr.to_string();
    let cluster = portswitch_mq::cluster::Cluster::connect(&sw_addr)
        .await
        .unwrap();
    cluster
        .create("behind", QueueConfig::default())
        .await
        .unwrap();
    let leader = leaders(&sw_addr, "behind", 1).await[0].clone();
    // A follower goes away.
    let away = brokers
        .iter()
        .position(|b| b.as_ref().unwrap().addr.to_string() != leader)
        .unwrap();
    brokers[away].take().unwrap().stop().await;
    // Many small segments' worth, all acknowledged: the leader reclaims them.
    let mut cons = cluster.subscribe("behind", "g", 1000).await.unwrap();
    for round in 0..10 {
        let batch: Vec<Outgoing> = (0..100)
            .map(|i| msg("", &format!("{round}-{i:0>90}")))
            .collect();
        cluster.produce("behind", batch).await.unwrap();
    }
    let mut acked = 0;
    while acked < 1000 {
        let r = within(cons.next()).await.unwrap();
        r.ack().await.unwrap();
        acked += 1;
    }
    let mut start = 0;
    for _ in 0..500 {
        start = stat_of(&leader, "behind", "p0.start_offset").await;
        if start > 500 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(start > 500, "the leader reclaimed nothing (start {start})");
    // It comes back: it cannot fetch what the leader deleted, so it starts its log
    // again at the leader's start and catches up from there.
    let back = member_with(dirs[away].path(), &sw_addr, &format!("b{away}"), small).await;
    let back_addr = back.addr.to_string();
    brokers[away] = Some(back);
    cluster
        .produce("behind", vec![msg("", "after")])
        .await
        .unwrap();
    let end = stat_of(&leader, "behind", "p0.end_offset").await;
    let mut caught_up = false;
    for _ in 0..500 {
        if stat_of(&back_addr, "behind", "p0.end_offset").await >= end {
            caught_up = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(caught_up, "the replica did not catch up");
    assert!(stat_of(&back_addr, "behind", "p0.start_offset").await >= start);
    // With the leader gone it is one of a majority that serves everything not acked.
    let gone = brokers
        .iter()
        .position(|b| b.as_ref().is_some_and(|b| b.addr.to_string() == leader))
        .unwrap();
    brokers[gone].take().unwrap().stop().await;
    let r = within(cons.next()).await.unwrap();
    assert_eq!(r.delivery.payload, &b"after"[..]);
    for b in brokers.into_iter().flatten() {
        b.stop().await;
    }
}
