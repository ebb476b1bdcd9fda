//! Three data centres 30 ms apart: three members in network namespaces of their own,
//! every byte between them (and to clients) through the project's delaying relay.
//! The master's whole data centre is cut off (its link down); the group must fail
//! over with every session keeping its ports, and batched throughput across the WAN
//! must stay within 2x of throughput next to the master.
//!
//! Needs root for the namespaces. Outside CI, a machine without root skips it and
//! says so; in CI (`CI=true`) it always runs.

use std::process::Command;

const BIN: &str = env!("CARGO_BIN_EXE_portswitch");

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

#[test]
fn losing_the_master_data_centre_fails_over_and_distance_costs_under_2x() {
    if !is_root() && std::env::var("CI").is_err() {
        eprintln!("SKIPPED: network namespaces need root (CI always runs this test)");
        return;
    }
    let out = Command::new(BIN)
        .args(["bench", "wan", "--json"])
        .args(["--delay-ms", "30", "--sessions", "10", "--ports", "500"])
        .args(["--rounds", "2", "--duration", "2"])
        // 131,072 in flight: far more than the round trip times a debug build's rate,
        // so the WAN figure is not bound by the window.
        .args(["--connections", "8", "--pipeline", "16384"])
        .args(["--lease-ms", "10000", "--keepalive-ms", "500"])
        // WAN settings (README): a heartbeat longer than the 60 ms round trip,
        // elections and master lease to match — here with the slack an unoptimised
        // build needs while the load saturates both cores.
        .args([
            "--member-flag=--heartbeat-ms=150",
            "--member-flag=--election-timeout-ms-min=600",
            "--member-flag=--election-timeout-ms-max=1200",
            // 1 s lapsed now and then while the unoptimised build saturated both
            // cores (lease renewals compete with client work; see BENCHMARKS).
            "--member-flag=--master-lease-ms=2000",
        ])
        .output()
        .expect("bench runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "wan bench failed: {stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let r: serde_json::Value = serde_json::from_str(stdout.trim()).expect("one JSON report");
    assert_eq!(r["ownership_lost"], 0, "{r}");
    assert_eq!(r["incomplete_rounds"], 0, "{r}");
    assert_eq!(r["throughput_errors"], 0, "{r}");
    assert!(r["all_recovered_p99_ms"].as_f64().unwrap() > 0.0, "{r}");
    // The relay really is in the path: an idle request across the WAN waits at least
    // the 60 ms round trip, and one next to the master does not.
    assert!(r["far_idle_rtt_ms"].as_f64().unwrap() >= 60.0, "{r}");
    assert!(r["near_idle_rtt_ms"].as_f64().unwrap() < 30.0, "{r}");
    // Deep enough batches hide the distance: both figures from this one run.
    let ratio = r["near_over_far"].as_f64().unwrap();
    assert!(ratio < 2.0, "across the WAN {ratio}x slower: {r}");
    // Nothing is left behind: namespaces are removed when the run ends.
    let ns = Command::new("ip").args(["netns", "list"]).output().unwrap();
    let pid_tag = "-dc1";
    let left: Vec<String> = String::from_utf8_lossy(&ns.stdout)
        .lines()
        .filter(|l| l.starts_with("psw") && l.contains(pid_tag))
        .map(str::to_string)
        .collect();
    // Other runs may be in progress; ours used the child's pid, which is gone.
    for l in &left {
        let pid: u32 = l
            .trim_start_matches("psw")
            .split('-')
            .next()
            .and_then(|p| p.parse().ok())
            .unwrap_or(0);
        assert!(
            std::path::Path::new(&format!("/proc/{pid}")).exists(),
            "namespace {l} outlived its run"
        );
    }
}
