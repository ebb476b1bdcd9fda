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
    use clap::Parser;
    use portswitch_harness::scenario::wan::WanArgs;

    /// The scenario's flags, as its command line takes them.
    #[derive(Parser)]
    struct Flags {
        #[command(flatten)]
        args: WanArgs,
    }
    let args = Flags::parse_from([
        "wan",
        "--json",
        "--delay-ms=30",
        "--sessions=10",
        "--ports=500",
        "--rounds=2",
        "--duration=2",
        // 131,072 in flight: far more than the round trip times a debug build's rate,
        // so the WAN figure is not bound by the window.
        "--connections=8",
        "--pipeline=16384",
        "--lease-ms=10000",
        "--keepalive-ms=500",
        // WAN settings (README): a heartbeat longer than the 60 ms round trip,
        // elections and master lease to match — here with the slack an unoptimised
        // build needs while the load saturates both cores.
        "--member-flag=--heartbeat-ms=150",
        "--member-flag=--election-timeout-ms-min=600",
        "--member-flag=--election-timeout-ms-max=1200",
        // 1 s lapsed now and then while the unoptimised build saturated both
        // cores (lease renewals compete with client work; see BENCHMARKS).
        "--member-flag=--master-lease-ms=2000",
    ])
    .args;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let outcome = runtime
        .block_on(portswitch_harness::scenario::wan::run(&args, BIN.as_ref()))
        .expect("the wan scenario runs");
    let r = &outcome.report;
    assert!(outcome.ok, "a check failed: {r}");
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
    // Nothing is left behind: this process's namespaces went with the run.
    let ns = Command::new("ip").args(["netns", "list"]).output().unwrap();
    let ours = format!("psw{}-", std::process::id());
    let left: Vec<String> = String::from_utf8_lossy(&ns.stdout)
        .lines()
        .filter(|l| l.starts_with(&ours))
        .map(str::to_string)
        .collect();
    assert!(left.is_empty(), "namespaces outlived the run: {left:?}");
}
