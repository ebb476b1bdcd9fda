//! `failover`: starts a group of three `portswitch serve` members on
//! loopback, connects sessions holding ports, then kills the master with SIGKILL,
//! round after round, and times how long until every session has resumed on the new
//! master and reclaimed every port (its `Resync`). Any *ownership lost* or lost port
//! is counted and reported: the figure is only good if that count is zero.

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use portswitch_client::ClientOptions;

use crate::recovery::{hold_ports, RecoveryWatch};
use crate::{Outcome, Result};

#[derive(clap::Args, Debug)]
pub struct FailoverArgs {
    /// Sessions, each on a connection of its own, holding the ports.
    #[arg(long = "connections", value_name = "SESSIONS", default_value_t = 64)]
    pub sessions: usize,
    /// Ports held in all, spread over the sessions.
    #[arg(long, default_value_t = 1_000_000)]
    pub ports: u64,
    /// Times the master is killed.
    #[arg(long, default_value_t = 20)]
    pub rounds: usize,
    /// Session lease in ms.
    #[arg(long, default_value_t = 10_000)]
    pub lease_ms: u32,
    /// Print one JSON object instead of text.
    #[arg(long)]
    pub json: bool,
}

pub async fn run(args: &FailoverArgs, server: &Path) -> Result<Outcome> {
    if args.sessions == 0 || args.rounds == 0 {
        return Err("--connections and --rounds must be at least 1".into());
    }
    let mut g = super::group(server, "failover", args.lease_ms, &[]).await?;

    let lost = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let mut template = ClientOptions::new("");
    template.lease = Duration::from_millis(args.lease_ms as u64);
    let clients = hold_ports(&g.addrs, args.sessions, args.ports, &template).await?;
    if !args.json {
        eprintln!(
            "{} sessions holding {} ports, set up in {:.1?}",
            args.sessions,
            args.ports,
            started.elapsed()
        );
    }

    let mut all_hist = Histogram::<u64>::new(3)?;
    let mut each_hist = Histogram::<u64>::new(3)?;
    let mut rounds = Vec::new();
    for round in 0..args.rounds {
        let m = g.master(None).await?;
        let watch = RecoveryWatch::start(&clients, &lost);
        let killed_at = Instant::now();
        g.kill(m).await?;
        let new_master = g.master(None).await?;
        let serving_after = killed_at.elapsed();
        let limit = Duration::from_millis(args.lease_ms as u64);
        let (recovered, slowest) = watch.finish(killed_at, limit * 2, &mut each_hist).await?;
        all_hist.record(slowest.as_micros() as u64)?;
        if !args.json {
            eprintln!(
                "round {}: killed member {}; member {} master after {} ms; {recovered}/{} sessions back with their ports, the last after {} ms",
                round + 1,
                m + 1,
                new_master + 1,
                serving_after.as_millis(),
                clients.len(),
                slowest.as_millis()
            );
        }
        rounds.push((recovered, slowest));
        // Bring the killed member back as a follower, and let the group settle, so
        // the next round measures the loss of a master in a steady group.
        g.spawn(m).await?;
        tokio::time::sleep(Duration::from_secs(2)).await;
        g.master(None).await?;
    }
    let ms = |h: &Histogram<u64>, q: f64| h.value_at_quantile(q) as f64 / 1_000.0;
    let lost = lost.load(Ordering::Relaxed);
    let incomplete = rounds.iter().filter(|(r, _)| *r < clients.len()).count();
    let report = serde_json::json!({
        "workload": "failover",
        "sessions": args.sessions,
        "ports": args.ports,
        "rounds": args.rounds,
        "all_recovered_p50_ms": ms(&all_hist, 0.5),
        "all_recovered_p99_ms": ms(&all_hist, 0.99),
        "session_recovered_p50_ms": ms(&each_hist, 0.5),
        "session_recovered_p99_ms": ms(&each_hist, 0.99),
        "ownership_lost": lost,
        "incomplete_rounds": incomplete,
    });
    if !args.json {
        println!(
            "failover, {} rounds, {} sessions, {} ports: every session back with every port after p50 {:.0} ms, p99 {:.0} ms (per session p50 {:.0} ms, p99 {:.0} ms); ownership lost: {lost}; incomplete rounds: {incomplete}",
            args.rounds,
            args.sessions,
            args.ports,
            ms(&all_hist, 0.5),
            ms(&all_hist, 0.99),
            ms(&each_hist, 0.5),
            ms(&each_hist, 0.99),
        );
    }
    for c in &clients {
        let _ = c.close().await;
    }
    g.stop().await;
    Ok(Outcome {
        report,
        ok: lost == 0 && incomplete == 0,
    })
}
