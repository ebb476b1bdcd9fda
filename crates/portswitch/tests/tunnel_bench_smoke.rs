//! The tunnel benchmark (`scripts/bench-tunnel.sh`) in its smoke mode: iperf3,
//! OpenSSH and shadowsocks-libev are installed by the script when missing (Debian
//! packages, as root or with sudo), every system is started, measured for a second
//! and stopped, and the summary is written — so the suite cannot rot between runs.
//! The office corpus is sent through our tunnel in full: its bytes on the wire are a
//! count, not a timing, and are checked against the target. An ssh session and
//! an HTTP download through our tunnel are checked byte for byte.

use std::path::Path;
use std::process::Command;

use serde_json::Value;

const SYSTEMS: [&str; 5] = ["loopback", "tunnel", "ssh-aes", "ssh-chacha", "shadowsocks"];

#[test]
fn tunnel_bench_smoke_run_measures_every_system() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let out = std::env::temp_dir().join(format!("portswitch-tunnel-smoke-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&out);
    let run = Command::new("bash")
        .arg(root.join("scripts/bench-tunnel.sh"))
        .env("SMOKE", "1")
        .env("OUT", &out)
        .env("BASE_PORT", "28800")
        .env("PORTSWITCH_BIN", env!("CARGO_BIN_EXE_portswitch"))
        .output()
        .expect("run scripts/bench-tunnel.sh");
    assert!(
        run.status.success(),
        "scripts/bench-tunnel.sh failed: {}\n--- stdout\n{}\n--- stderr\n{}",
        run.status,
        String::from_utf8_lossy(&run.stdout),
        String::from_utf8_lossy(&run.stderr)
    );
    let results: Vec<Value> = std::fs::read_to_string(out.join("results.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect();
    for system in SYSTEMS {
        for streams in [1, 8] {
            let r = results
                .iter()
                .find(|r| {
                    r["system"] == system
                        && r["measure"] == "iperf3_gbit_s"
                        && r["streams"] == streams
                })
                .unwrap_or_else(|| panic!("{system}, {streams} streams: not measured"));
            assert!(
                r["median"].as_f64().is_some_and(|g| g > 0.0),
                "{system}, {streams} streams: no throughput: {r}"
            );
        }
        let rtt = results
            .iter()
            .find(|r| r["system"] == system && r["measure"] == "rtt_64B")
            .unwrap_or_else(|| panic!("{system}: no round trip measured"));
        let (p50, p99) = (&rtt["result"]["p50_us"], &rtt["result"]["p99_us"]);
        assert!(
            p50.as_f64().is_some_and(|p| p > 0.0) && p99.as_f64() >= p50.as_f64(),
            "{system}: {rtt}"
        );
    }
    let corpus = results
        .iter()
        .find(|r| r["measure"] == "office_corpus")
        .expect("the office corpus was sent");
    let carried = corpus["carried"].as_u64().unwrap();
    let wire = corpus["wire"].as_u64().unwrap();
    assert_eq!(
        carried,
        corpus["corpus"]["bytes"].as_u64().unwrap(),
        "every corpus byte was carried, and only those: {corpus}"
    );
    // The target: at least 40% fewer bytes on the wire than carried.
    assert!(
        (wire as f64) <= 0.60 * carried as f64,
        "{wire} bytes on the wire for {carried} carried: {corpus}"
    );
    // Real applications through the tunnel: an ssh session and an HTTP download, each
    // checked byte for byte (SHA-256 of what came out against what went in).
    for app in ["ssh_through", "http_through"] {
        let r = results
            .iter()
            .find(|r| r["measure"] == app)
            .unwrap_or_else(|| panic!("{app}: not run"));
        assert_eq!(r["sha256_ok"], true, "{app}: {r}");
        assert!(r["bytes"].as_u64().is_some_and(|b| b > 0), "{app}: {r}");
    }
    let summary = std::fs::read_to_string(out.join("summary.md")).unwrap();
    for system in SYSTEMS {
        assert!(summary.contains(&format!("| {system} |")), "{summary}");
    }
    let _ = std::fs::remove_dir_all(&out);
}
