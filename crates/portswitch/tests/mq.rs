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
    let mut child = Command::new(BIN)
        .args([
            "mq",
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--no-http",
            "--data-dir",
        ])
        .arg(dir)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn mq serve");
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let line = tokio::time::timeout(Duration::from_secs(20), lines.next_line())
        .await
        .expect("the broker starts")
        .unwrap()
        .expect("a line");
    let addr = line
        .strip_prefix("listening on ")
        .expect("listening line")
        .to_string();
    (child, addr)
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
                    let msgs = ids
                        .iter()
                        .map(|i| Outgoing {
                            key: (i % 7).to_le_bytes().to_vec().into(),
                            payload: i.to_le_bytes().to_vec().into(),
                            ..Default::default()
                        })
                        .collect();
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
    assert_eq!(run(&["produce", "orders"], "one\ntwo\n"), "0/0\n0/1\n");
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
        shown.contains("reason=rejected\tfrom=orders/0/1\ttwo"),
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
    assert_eq!(v["p0.end_offset"], 3, "{v}");
    assert_eq!(v["p0.group.default.depth"], 0, "{v}");
}
