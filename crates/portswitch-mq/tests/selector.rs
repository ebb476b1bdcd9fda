//! Consumer groups with selectors, over real TCP on loopback: a group receives exactly
//! the messages its selector matches, skipped messages never hold its progress back,
//! a group keeps one selector (across a restart and a change of leader), and bad
//! selectors get typed errors with their position.

use std::collections::BTreeSet;
use std::time::Duration;

use portswitch_mq::broker::{BrokerConfig, RunningBroker};
use portswitch_mq::client::{Consumer, MqClient};
use portswitch_mq::cluster::Cluster;
use portswitch_mq::proto::{Code, Outgoing, QueueConfig};

async fn broker(dir: &std::path::Path) -> RunningBroker {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
    let mut cfg = BrokerConfig::new(dir);
    cfg.listen = "127.0.0.1:0".parse().unwrap();
    cfg.http_listen = Some("127.0.0.1:0".parse().unwrap());
    RunningBroker::start(cfg).await.expect("the broker starts")
}

async fn within<T>(fut: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(20), fut)
        .await
        .expect("in time")
}

/// Message `n`: key `k<n % 5>`, payload `{"n": n, "kind": "even"|"odd"}`.
fn numbered(range: std::ops::Range<u64>) -> Vec<Outgoing> {
    range
        .map(|n| Outgoing {
            key: format!("k{}", n % 5).into_bytes().into(),
            payload: format!(
                r#"{{"n": {n}, "kind": "{}"}}"#,
                if n % 2 == 0 { "even" } else { "odd" }
            )
            .into_bytes()
            .into(),
            ..Default::default()
        })
        .collect()
}

fn n_of(payload: &[u8]) -> u64 {
    let v: serde_json::Value = serde_json::from_slice(payload).unwrap();
    v["n"].as_u64().unwrap()
}

/// Receives and acknowledges `count` distinct messages; returns their numbers. (At
/// least once: a message whose ack timeout passed comes again, and its first delivery
/// can no longer be acknowledged.)
async fn take(cons: &mut Consumer, count: usize) -> BTreeSet<u64> {
    let mut got = BTreeSet::new();
    while got.len() < count {
        let d = within(cons.next()).await.unwrap();
        got.insert(n_of(&d.payload));
        if let Err(e) = cons.ack(&d).await {
            assert_eq!(e.code(), Some(Code::NotInFlight), "{e}");
        }
    }
    got
}

/// Nothing more comes within a while.
async fn quiet(cons: &mut Consumer) {
    if let Ok(d) = tokio::time::timeout(Duration::from_millis(400), cons.next()).await {
        panic!("an unexpected delivery: {d:?}");
    }
}

fn sum_of(stats: &[(String, u64)], suffix: &str) -> u64 {
    stats
        .iter()
        .filter(|(k, _)| k.ends_with(suffix))
        .map(|(_, v)| v)
        .sum()
}

async fn http_get(addr: std::net::SocketAddr, path: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: x\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut out = String::new();
    within(s.read_to_string(&mut out)).await.unwrap();
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_groups_see_exactly_their_messages_and_skipped_ones_never_hold_progress() {
    let dir = tempfile::tempdir().unwrap();
    let b = broker(dir.path()).await;
    let c = MqClient::connect(&b.addr.to_string()).await.unwrap();
    c.create(
        "orders",
        QueueConfig {
            partitions: 2,
            ack_timeout_ms: 1000,
            ..Default::default()
        },
    )
    .await
    .unwrap();
    // 0..100, then a run of non-matching messages at the end of every partition.
    c.produce("orders", numbered(0..100)).await.unwrap();
    let mut all = c.subscribe("orders", "all", 1000).await.unwrap();
    let sel = r#"json.kind == "odd" && key_str != "k3""#;
    let mut odd = c
        .subscribe_with("orders", "odd", 1000, Some(sel))
        .await
        .unwrap();
    let want: BTreeSet<u64> = (0..100).filter(|n| n % 2 == 1 && n % 5 != 3).collect();
    assert_eq!(take(&mut all, 100).await, (0..100).collect());
    assert_eq!(take(&mut odd, want.len()).await, want);
    c.produce(
        "orders",
        numbered(200..240).into_iter().step_by(2).collect(),
    )
    .await
    .unwrap();
    assert_eq!(take(&mut all, 20).await.len(), 20);
    quiet(&mut odd).await;
    // Past the ack timeout: no skipped message is ever (re)delivered.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    quiet(&mut odd).await;
    // Its progress is at the end: nothing outstanding, and the low-water mark of each
    // partition at its last message (the skipped run at the end does not hold it).
    let stats = c.stat("orders").await.unwrap();
    assert_eq!(sum_of(&stats, ".group.odd.depth"), 0, "{stats:?}");
    assert_eq!(sum_of(&stats, ".group.all.depth"), 0, "{stats:?}");
    for p in 0..2 {
        let low = |g: &str| {
            stats
                .iter()
                .find(|(k, _)| *k == format!("p{p}.group.{g}.low_water"))
                .map(|(_, v)| *v)
                .unwrap()
        };
        assert_eq!(low("odd"), low("all"), "{stats:?}");
    }
    let skipped = 120 - want.len() as u64;
    assert_eq!(sum_of(&stats, ".group.odd.skipped"), skipped, "{stats:?}");
    let metrics = http_get(b.http_addr.unwrap(), "/metrics").await;
    let line =
        format!("portswitch_mq_selector_skipped_total{{queue=\"orders\",group=\"odd\"}} {skipped}");
    assert!(metrics.contains(&line), "{line} in {metrics}");
    drop((all, odd));
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_keeps_one_selector_and_bad_ones_are_refused_with_their_position() {
    let dir = tempfile::tempdir().unwrap();
    let b = broker(dir.path()).await;
    let c = MqClient::connect(&b.addr.to_string()).await.unwrap();
    c.create("q", QueueConfig::default()).await.unwrap();
    let sel = "offset % 2 == 0";
    let first = c.subscribe_with("q", "g", 10, Some(sel)).await.unwrap();
    // The same selector joins; another, or none, is refused by name.
    let second = c.subscribe_with("q", "g", 10, Some(sel)).await.unwrap();
    for other in [Some("offset % 2 == 1"), None] {
        let e = c.subscribe_with("q", "g", 10, other).await.err().unwrap();
        assert_eq!(e.code(), Some(Code::SelectorMismatch), "{e}");
        assert!(e.to_string().contains(sel), "{e}");
    }
    // A group without a selector refuses one.
    let plain = c.subscribe("q", "plain", 10).await.unwrap();
    let e = c
        .subscribe_with("q", "plain", 10, Some(sel))
        .await
        .err()
        .unwrap();
    assert_eq!(e.code(), Some(Code::SelectorMismatch), "{e}");
    // Does not compile: the compiler's line, column and a caret under the place.
    let e = c
        .subscribe_with("q", "h", 10, Some("offset ==\n  && true"))
        .await
        .err()
        .unwrap();
    assert_eq!(e.code(), Some(Code::BadSelector), "{e}");
    assert!(e.to_string().contains("2:3"), "{e}");
    assert!(e.to_string().contains('^'), "{e}");
    for bad in [
        "ofset == 1",             // not in the record schema
        "offset + 1",             // not a bool
        "key == \"text\"",        // key is bytes: key_str is the string
        &"true && ".repeat(1000), // longer than the limit
        "payload.matches(\"(\")", // a bad regex
    ] {
        let e = c
            .subscribe_with("q", "h", 10, Some(bad))
            .await
            .err()
            .unwrap();
        assert_eq!(e.code(), Some(Code::BadSelector), "{bad}: {e}");
    }
    // A refused subscription made no group.
    let h = c.subscribe("q", "h", 10).await.unwrap();
    // The connection goes on.
    c.produce("q", numbered(0..4)).await.unwrap();
    drop((first, second, plain, h));
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_selector_that_fails_on_a_message_skips_it_and_counts_it_apart() {
    let dir = tempfile::tempdir().unwrap();
    let b = broker(dir.path()).await;
    let c = MqClient::connect(&b.addr.to_string()).await.unwrap();
    c.create("mixed", QueueConfig::default()).await.unwrap();
    let mut msgs = numbered(0..10);
    msgs.push(Outgoing {
        payload: b"not json".to_vec().into(),
        ..Default::default()
    });
    msgs.extend(numbered(10..12));
    c.produce("mixed", msgs).await.unwrap();
    // `json.n` on a payload that is not a JSON object: a missing key, an error.
    let mut cons = c
        .subscribe_with("mixed", "big", 100, Some("json.n >= 8"))
        .await
        .unwrap();
    assert_eq!(take(&mut cons, 4).await, (8..12).collect());
    quiet(&mut cons).await;
    let stats = c.stat("mixed").await.unwrap();
    assert_eq!(sum_of(&stats, ".group.big.depth"), 0, "{stats:?}");
    let metrics = http_get(b.http_addr.unwrap(), "/metrics").await;
    for line in [
        "portswitch_mq_selector_errors_total{queue=\"mixed\",group=\"big\"} 1",
        "portswitch_mq_selector_skipped_total{queue=\"mixed\",group=\"big\"} 8",
    ] {
        assert!(metrics.contains(line), "{line} in {metrics}");
    }
    drop(cons);
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_groups_selector_survives_a_restart() {
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
    let sel = "json.n % 3 == 0";
    let mut cons = c
        .subscribe_with("keep", "third", 100, Some(sel))
        .await
        .unwrap();
    c.produce("keep", numbered(0..30)).await.unwrap();
    // Half of the matching ones acknowledged before the restart.
    let before = take(&mut cons, 5).await;
    drop(cons);
    drop(c);
    b.stop().await;
    let b = broker(dir.path()).await;
    let c = MqClient::connect(&b.addr.to_string()).await.unwrap();
    // The group still has its selector: joining without it, or with another, is refused.
    let e = c.subscribe("keep", "third", 100).await.err().unwrap();
    assert_eq!(e.code(), Some(Code::SelectorMismatch), "{e}");
    let mut cons = c
        .subscribe_with("keep", "third", 100, Some(sel))
        .await
        .unwrap();
    c.produce("keep", numbered(30..36)).await.unwrap();
    let after = take(&mut cons, 7).await;
    assert!(before.is_disjoint(&after), "{before:?} {after:?}");
    let all: BTreeSet<u64> = before.union(&after).copied().collect();
    assert_eq!(all, (0..36).filter(|n| n % 3 == 0).collect());
    quiet(&mut cons).await;
    let stats = c.stat("keep").await.unwrap();
    assert_eq!(sum_of(&stats, ".group.third.depth"), 0, "{stats:?}");
    drop(cons);
    b.stop().await;
}

async fn member(dir: &std::path::Path, switch: &str, name: &str) -> RunningBroker {
    let mut cfg = BrokerConfig::new(dir);
    cfg.listen = "127.0.0.1:0".parse().unwrap();
    cfg.http_listen = None;
    cfg.switch = Some(switch.to_string());
    cfg.name = Some(name.to_string());
    RunningBroker::start(cfg).await.expect("the broker starts")
}

async fn leader_addr(switch: &str, queue: &str, not: Option<&str>) -> String {
    for _ in 0..1000 {
        if let Ok(a) = portswitch_mq::client::broker_of(switch, &format!("mq/{queue}/0")).await {
            if Some(a.as_str()) != not {
                return a;
            }
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("no leader for {queue}");
}

/// Three replicas; the group is made through the leader; the leader stops; the next
/// leader (which learnt the group and its selector from the replicated log) delivers
/// only what the selector matches, and the cluster client refuses a mismatch early.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_leader_applies_the_groups_selector() {
    let mut sc = portswitch_server::ServerConfig::ephemeral();
    sc.http_listen = None;
    let sw = portswitch_server::RunningServer::start(sc).await.unwrap();
    let sw_addr = sw.addr.to_string();
    let dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let mut brokers = Vec::new();
    for (i, d) in dirs.iter().enumerate() {
        brokers.push(Some(member(d.path(), &sw_addr, &format!("b{i}")).await));
    }
    let c = MqClient::connect(&brokers[0].as_ref().unwrap().addr.to_string())
        .await
        .unwrap();
    c.create("rep", QueueConfig::default()).await.unwrap();
    let first = leader_addr(&sw_addr, "rep", None).await;
    let lc = MqClient::connect(&first).await.unwrap();
    let sel = r#"json.kind == "even""#;
    let mut cons = lc
        .subscribe_with("rep", "evens", 100, Some(sel))
        .await
        .unwrap();
    lc.produce("rep", numbered(0..20)).await.unwrap();
    let before = take(&mut cons, 4).await;
    drop(cons);
    drop(lc);
    let gone = brokers
        .iter()
        .position(|b| b.as_ref().is_some_and(|b| b.addr.to_string() == first))
        .unwrap();
    brokers[gone].take().unwrap().stop().await;
    let second = leader_addr(&sw_addr, "rep", Some(&first)).await;
    let nc = MqClient::connect(&second).await.unwrap();
    nc.produce("rep", numbered(20..24)).await.unwrap();
    // The new leader's group has the selector.
    let e = nc.subscribe("rep", "evens", 100).await.err().unwrap();
    assert_eq!(e.code(), Some(Code::SelectorMismatch), "{e}");
    let cluster = Cluster::connect(&sw_addr).await.unwrap();
    let e = cluster
        .subscribe_with("rep", "evens", 100, Some("true"))
        .await
        .err()
        .unwrap();
    assert_eq!(e.code(), Some(Code::SelectorMismatch), "{e}");
    let e = cluster
        .subscribe_with("rep", "other", 100, Some("json.n >"))
        .await
        .err()
        .unwrap();
    assert_eq!(e.code(), Some(Code::BadSelector), "{e}");
    let mut cons = nc
        .subscribe_with("rep", "evens", 100, Some(sel))
        .await
        .unwrap();
    // At least once: a message in flight at the change may come again; every one is even.
    let mut rest = BTreeSet::new();
    while rest.len() + before.len() < 12 {
        let d = within(cons.next()).await.unwrap();
        let n = n_of(&d.payload);
        assert_eq!(n % 2, 0, "an odd message reached the group: {n}");
        cons.ack(&d).await.unwrap();
        if !before.contains(&n) {
            rest.insert(n);
        }
    }
    let all: BTreeSet<u64> = before.union(&rest).copied().collect();
    assert_eq!(all, (0..24).filter(|n| n % 2 == 0).collect());
    drop(cons);
    for b in brokers.into_iter().flatten() {
        b.stop().await;
    }
}

async fn stat_of(addr: &str, queue: &str, name: &str) -> Option<u64> {
    let stat = MqClient::connect(addr)
        .await
        .unwrap()
        .stat(queue)
        .await
        .unwrap();
    stat.iter().find(|(k, _)| k == name).map(|(_, v)| *v)
}

/// A follower is away while a selective group is made and the leader reclaims the
/// segments holding the group's record; back, it starts its log again at the leader's
/// start — and still learns the group's selector, from the leader's roster.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_starting_again_after_reclaim_learns_the_selector_from_the_roster() {
    let mut sc = portswitch_server::ServerConfig::ephemeral();
    sc.http_listen = None;
    let sw = portswitch_server::RunningServer::start(sc).await.unwrap();
    let sw_addr = sw.addr.to_string();
    let dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let start = |i: usize| {
        let (dir, sw_addr) = (dirs[i].path().to_path_buf(), sw_addr.clone());
        async move {
            let mut cfg = BrokerConfig::new(&dir);
            cfg.listen = "127.0.0.1:0".parse().unwrap();
            cfg.http_listen = None;
            cfg.switch = Some(sw_addr);
            cfg.name = Some(format!("b{i}"));
            cfg.segment_bytes_max = 4096;
            RunningBroker::start(cfg).await.expect("the broker starts")
        }
    };
    let mut brokers = Vec::new();
    for i in 0..3 {
        brokers.push(Some(start(i).await));
    }
    let c = MqClient::connect(&brokers[0].as_ref().unwrap().addr.to_string())
        .await
        .unwrap();
    c.create("behind", QueueConfig::default()).await.unwrap();
    let leader = leader_addr(&sw_addr, "behind", None).await;
    let away = brokers
        .iter()
        .position(|b| b.as_ref().unwrap().addr.to_string() != leader)
        .unwrap();
    brokers[away].take().unwrap().stop().await;
    let lc = MqClient::connect(&leader).await.unwrap();
    let sel = "json.n % 2 == 0";
    let mut cons = lc
        .subscribe_with("behind", "evens", 1000, Some(sel))
        .await
        .unwrap();
    for round in 0..10 {
        let batch: Vec<Outgoing> = (0..100)
            .map(|i| {
                let n = round * 100 + i;
                Outgoing {
                    payload: format!(r#"{{"n": {n}, "pad": "{:0>80}"}}"#, "")
                        .into_bytes()
                        .into(),
                    ..Default::default()
                }
            })
            .collect();
        lc.produce("behind", batch).await.unwrap();
    }
    assert_eq!(take(&mut cons, 500).await, (0..1000).step_by(2).collect());
    let mut first = 0;
    for _ in 0..500 {
        first = stat_of(&leader, "behind", "p0.start_offset").await.unwrap();
        if first > 500 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(first > 500, "the leader reclaimed nothing (start {first})");
    let back = start(away).await;
    let back_addr = back.addr.to_string();
    brokers[away] = Some(back);
    lc.produce("behind", numbered(1000..1002)).await.unwrap();
    let end = stat_of(&leader, "behind", "p0.end_offset").await.unwrap();
    let mut caught_up = false;
    for _ in 0..500 {
        if stat_of(&back_addr, "behind", "p0.end_offset").await >= Some(end) {
            caught_up = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(caught_up, "the replica did not catch up");
    assert!(stat_of(&back_addr, "behind", "p0.start_offset").await >= Some(first));
    // The returning replica knows the group, with its selector.
    let bc = MqClient::connect(&back_addr).await.unwrap();
    let e = bc.subscribe("behind", "evens", 10).await.err().unwrap();
    assert_eq!(e.code(), Some(Code::SelectorMismatch), "{e}");
    assert!(e.to_string().contains(sel), "{e}");
    drop((cons, lc, bc));
    for b in brokers.into_iter().flatten() {
        b.stop().await;
    }
}

/// Messages at the queue's size limit are evaluated within the step budget (it is
/// sized from the limit): a regex match and scans over a 1 MiB payload deliver the
/// matching message and skip the other, with no evaluation error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_selector_scans_messages_at_the_size_limit() {
    let dir = tempfile::tempdir().unwrap();
    let b = broker(dir.path()).await;
    let c = MqClient::connect(&b.addr.to_string()).await.unwrap();
    c.create("big", QueueConfig::default()).await.unwrap();
    let limit = QueueConfig::default().message_bytes_max as usize;
    let big = |n: u64, tail: &str| {
        let mut p = format!(r#"{{"n": {n}, "pad": ""#).into_bytes();
        p.resize(limit - 2 - tail.len(), b'a');
        p.extend_from_slice(tail.as_bytes());
        p.extend_from_slice(br#""}"#);
        assert_eq!(p.len(), limit);
        Outgoing {
            payload: p.into(),
            ..Default::default()
        }
    };
    c.produce("big", vec![big(1, "urgent!!")]).await.unwrap();
    c.produce("big", vec![big(2, "routine")]).await.unwrap();
    let sel = r#"payload_str.matches("urgent!+\"}$") && payload_str.contains("urgent") && size(payload) > 1000"#;
    let mut cons = c
        .subscribe_with("big", "urgent", 10, Some(sel))
        .await
        .unwrap();
    let d = within(cons.next()).await.unwrap();
    assert!(d.payload.starts_with(br#"{"n": 1,"#));
    cons.ack(&d).await.unwrap();
    quiet(&mut cons).await;
    let metrics = http_get(b.http_addr.unwrap(), "/metrics").await;
    for line in [
        "portswitch_mq_selector_errors_total{queue=\"big\",group=\"urgent\"} 0",
        "portswitch_mq_selector_skipped_total{queue=\"big\",group=\"urgent\"} 1",
    ] {
        assert!(metrics.contains(line), "{line} in {metrics}");
    }
    drop(cons);
    b.stop().await;
}

/// The nearest deterministic form of two first subscriptions racing with different
/// selectors: partition 1 already has the group with S2, partition 0 not at all. A
/// subscription with S1 makes the group on partition 0, is refused on partition 1 —
/// and leaves no group on partition 0 behind (on disk either), so the group stays
/// usable: a subscription with S2 then joins on both.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_subscription_leaves_no_group_where_it_made_one() {
    let dir = tempfile::tempdir().unwrap();
    let b = broker(dir.path()).await;
    let c = MqClient::connect(&b.addr.to_string()).await.unwrap();
    c.create(
        "split",
        QueueConfig {
            partitions: 2,
            ..Default::default()
        },
    )
    .await
    .unwrap();
    drop(c);
    b.stop().await;
    let (s1, s2) = ("json.n % 2 == 0", "json.n % 2 == 1");
    let groups = |p: u32| dir.path().join(format!("queues/split/{p}/groups"));
    std::fs::write(groups(1).join("g.selector"), s2).unwrap();
    std::fs::write(groups(1).join("g.acks"), b"").unwrap();
    let b = broker(dir.path()).await;
    let c = MqClient::connect(&b.addr.to_string()).await.unwrap();
    let e = c
        .subscribe_with("split", "g", 10, Some(s1))
        .await
        .err()
        .unwrap();
    assert_eq!(e.code(), Some(Code::SelectorMismatch), "{e}");
    // Partition 0's group, made by the refused subscription, is gone.
    let mut cons = c.subscribe_with("split", "g", 100, Some(s2)).await.unwrap();
    assert_eq!(
        std::fs::read_to_string(groups(0).join("g.selector")).unwrap(),
        s2
    );
    c.produce("split", numbered(0..20)).await.unwrap();
    assert_eq!(
        take(&mut cons, 10).await,
        (0..20).filter(|n| n % 2 == 1).collect()
    );
    // A refused subscription never drops a group that others use: S1 again is refused
    // on both partitions now, and the group keeps its consumer and its selector.
    let e = c
        .subscribe_with("split", "g", 10, Some(s1))
        .await
        .err()
        .unwrap();
    assert_eq!(e.code(), Some(Code::SelectorMismatch), "{e}");
    c.produce("split", numbered(20..22)).await.unwrap();
    assert_eq!(take(&mut cons, 1).await, [21].into_iter().collect());
    drop(cons);
    drop(c);
    b.stop().await;
    // And a restart does not find a group that was dropped.
    let b = broker(dir.path()).await;
    let c = MqClient::connect(&b.addr.to_string()).await.unwrap();
    let e = c
        .subscribe_with("split", "g", 10, Some(s1))
        .await
        .err()
        .unwrap();
    assert_eq!(e.code(), Some(Code::SelectorMismatch), "{e}");
    drop(c);
    b.stop().await;
}

/// Two first subscriptions with different selectors race, many times over: whatever
/// the interleaving, at most one wins, and the group is usable afterwards (by the
/// winner's selector, or by either when both lost).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn racing_first_subscriptions_never_leave_a_split_group() {
    let dir = tempfile::tempdir().unwrap();
    let b = broker(dir.path()).await;
    let addr = b.addr.to_string();
    let c = MqClient::connect(&addr).await.unwrap();
    c.create(
        "race",
        QueueConfig {
            partitions: 4,
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let (c1, c2) = (
        MqClient::connect(&addr).await.unwrap(),
        MqClient::connect(&addr).await.unwrap(),
    );
    let (s1, s2) = ("offset >= 0", "offset >= 1");
    for i in 0..40 {
        let g = format!("g{i}");
        let (a, b2) = tokio::join!(
            c1.subscribe_with("race", &g, 10, Some(s1)),
            c2.subscribe_with("race", &g, 10, Some(s2))
        );
        let winner = match (&a, &b2) {
            (Ok(_), Ok(_)) => panic!("both selectors joined group {g}"),
            (Ok(_), Err(_)) => Some(s1),
            (Err(_), Ok(_)) => Some(s2),
            (Err(_), Err(_)) => None,
        };
        drop((a, b2));
        // Usable: the winner's selector joins (or, when both lost, either does).
        let again = c.subscribe_with("race", &g, 10, Some(winner.unwrap_or(s2)));
        assert!(again.await.is_ok(), "group {g} is unusable");
    }
    drop((c, c1, c2));
    b.stop().await;
}

/// A group whose selector this broker cannot apply (a newer broker's, say) is not
/// served rather than served without it: the broker starts, keeps the selector's text,
/// refuses to subscribe to the group, and serves the queue's other groups.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_selector_this_broker_cannot_apply_fails_closed() {
    let dir = tempfile::tempdir().unwrap();
    let b = broker(dir.path()).await;
    let c = MqClient::connect(&b.addr.to_string()).await.unwrap();
    c.create("newer", QueueConfig::default()).await.unwrap();
    drop(c);
    b.stop().await;
    let groups = dir.path().join("queues/newer/0/groups");
    let text = "json.n.future_function(1)";
    std::fs::write(groups.join("g.selector"), text).unwrap();
    std::fs::write(groups.join("g.acks"), b"").unwrap();
    let b = broker(dir.path()).await;
    let c = MqClient::connect(&b.addr.to_string()).await.unwrap();
    c.produce("newer", numbered(0..4)).await.unwrap();
    for sel in [None, Some("true")] {
        let e = c.subscribe_with("newer", "g", 10, sel).await.err().unwrap();
        assert_eq!(e.code(), Some(Code::Unavailable), "{e}");
        assert!(e.to_string().contains("upgrade"), "{e}");
    }
    let mut other = c.subscribe("newer", "other", 10).await.unwrap();
    assert_eq!(take(&mut other, 4).await, (0..4).collect());
    assert_eq!(
        std::fs::read_to_string(groups.join("g.selector")).unwrap(),
        text
    );
    drop((other, c));
    b.stop().await;
}
