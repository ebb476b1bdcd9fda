//! The peer comparison suite (`scripts/peers.sh`) in its smoke mode: every system is
//! installed, started, driven through every workload by its own client library,
//! stopped, and the table is written — so the suite cannot rot between benchmark runs.
//! Installs etcd, ZooKeeper, Redis and protoc (with its well-known types) from
//! Debian's packages when they are missing (needs root or sudo, like any package
//! install).

use std::path::Path;
use std::process::Command;

use serde_json::Value;

#[test]
fn peer_suite_smoke_run_measures_every_system() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let out = std::env::temp_dir().join(format!("portswitch-peers-smoke-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&out);
    let run = Command::new("bash")
        .arg(root.join("scripts/peers.sh"))
        .env("SMOKE", "1")
        .env("OUT", &out)
        .env("BASE_PORT", "27500")
        .env("PORTSWITCH_BIN", env!("CARGO_BIN_EXE_portswitch"))
        .output()
        .expect("run scripts/peers.sh");
    assert!(
        run.status.success(),
        "scripts/peers.sh failed: {}\n--- stdout\n{}\n--- stderr\n{}",
        run.status,
        String::from_utf8_lossy(&run.stdout),
        String::from_utf8_lossy(&run.stderr)
    );

    let results: Value =
        serde_json::from_slice(&std::fs::read(out.join("results.json")).unwrap()).unwrap();
    let versions = results["summary"]["versions"].as_object().unwrap();
    let runs = results["runs"].as_array().unwrap();
    for system in ["portswitch", "etcd", "zookeeper", "redis"] {
        assert!(
            versions[system].as_str().is_some_and(|v| !v.is_empty()),
            "{system}: no version"
        );
        let of = |w: &str| -> Vec<&Value> {
            runs.iter()
                .filter(|r| r["system"] == system && r["workload"] == w)
                .collect()
        };
        for r in of("acquire-release").into_iter().chain(of("contend")) {
            assert!(
                r["pairs"].as_u64().unwrap() > 0,
                "{system}: no pairs in {r}"
            );
            assert_eq!(r["errors"], 0, "{system}: errors in {r}");
            assert!(
                r["server_cpu_s"].as_f64().is_some(),
                "{system}: no CPU figure"
            );
            assert!(r["server_rss_bytes"].as_u64().unwrap() > 0);
        }
        assert_eq!(
            of("acquire-release").len(),
            5,
            "{system}: 1 and 4 clients, 4 × 4 in flight, 4 sharing a connection (twice)"
        );
        let shared: Vec<_> = of("acquire-release")
            .into_iter()
            .filter(|r| r["label"] == "shared-connection")
            .collect();
        // Once with each load-generator thread count.
        let threads: Vec<_> = shared.iter().map(|r| r["load_threads"].clone()).collect();
        assert_eq!(threads, [1, 2], "{system}: shared-connection runs");
        // ZooKeeper has no way to share a connection between sessions.
        let want = if system == "zookeeper" { 0 } else { 1 };
        for r in &shared {
            assert_eq!(r["connections"], want, "{system}: {r}");
        }
        let fill = of("fill");
        assert_eq!(fill.len(), 1);
        assert_eq!(fill[0]["errors"], 0, "{system}: {}", fill[0]);
        assert_eq!(fill[0]["names"], 2000);
        let kill = of("kill-holder");
        assert!(!kill.is_empty(), "{system}: no kill-holder run");
        for k in kill {
            let ms = k["release_p50_ms"].as_f64().unwrap();
            // Released, and not before the holder died: a lease-bound release takes
            // most of the 4 s lease; end-on-disconnect is immediate.
            if k["label"] == "end-on-disconnect" {
                assert!(ms < 1000.0, "{system}: end-on-disconnect release {ms} ms");
            } else {
                assert!(ms > 1000.0 && ms < 15000.0, "{system}: release {ms} ms");
            }
        }
    }
    let table = std::fs::read_to_string(out.join("table.md")).unwrap();
    for needle in [
        "× etcd",
        "× ZooKeeper",
        "× Redis",
        "resident bytes per name",
        "SIGKILL",
        "one shared connection",
        "load-generator threads",
    ] {
        assert!(table.contains(needle), "table lacks {needle}:\n{table}");
    }
    let _ = std::fs::remove_dir_all(&out);
}
