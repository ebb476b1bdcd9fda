//! `hold-sessions`: open N sessions, one connection each (or
//! `--channels K` per connection, each session on a channel of its own), and keep
//! them alive with PINGs, as a large fleet of idle clients would; meanwhile a fresh
//! client measures how long REGISTER takes. Reports the server's resident memory per
//! session.
//!
//! Past ~28,000 connections to one server address a client runs out of ephemeral
//! ports, so connections are spread over --source-addrs loopback source addresses
//! (127.0.0.1, 127.0.0.2, …). The process needs a descriptor limit above N
//! (`ulimit -n`; scripts/bench-sessions.sh raises it).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use portswitch_client::{Client, ClientOptions};
use portswitch_proto::limits::PROTOCOL_VERSION;
use portswitch_proto::msg::op;
use portswitch_proto::{Hello, Request};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

use crate::raw::{encode_on, open_session, read_replies, source_addr};
use crate::{Outcome, Result};

#[derive(clap::Args, Debug)]
pub struct HoldArgs {
    /// Server address (host:port).
    #[arg(long, default_value = "127.0.0.1:7400")]
    pub addr: String,
    /// Sessions to open and hold.
    #[arg(long = "connections", value_name = "SESSIONS", default_value_t = 64)]
    pub sessions: usize,
    /// Session lease in ms (each session PINGs every third of it).
    #[arg(long, default_value_t = 10_000)]
    pub lease_ms: u32,
    /// Seconds to hold the sessions once they are all up (at least 1).
    #[arg(long = "duration", value_name = "SECONDS", default_value_t = 10.0)]
    pub hold_s: f64,
    /// Loopback source addresses to spread connections over (127.0.0.1 upwards);
    /// default one per 25,000 connections (the default ephemeral port range holds
    /// about 28,000 per address).
    #[arg(long)]
    pub source_addrs: Option<usize>,
    /// Connections being opened at once.
    #[arg(long, default_value_t = 256)]
    pub connect_concurrency: usize,
    /// Sessions per connection, each on a channel of its own (1: one connection per
    /// session, no channels).
    #[arg(long, default_value_t = 1)]
    pub channels: usize,
    /// Print one JSON object instead of text.
    #[arg(long)]
    pub json: bool,
}

struct Counters {
    up: AtomicU64,
    failed: AtomicU64,
    pings: AtomicU64,
    lost: AtomicU64,
    stop: AtomicBool,
}

pub async fn run(a: &HoldArgs) -> Result<Outcome> {
    let server: SocketAddr = tokio::net::lookup_host(&a.addr)
        .await?
        .next()
        .ok_or("--addr resolves to nothing")?;
    let per_conn = a.channels.max(1);
    if per_conn as u64 > portswitch_proto::msg::CHANNELS_MAX as u64 - 1 {
        return Err(format!(
            "--channels {per_conn}: a connection has at most {} channels besides 0",
            portswitch_proto::msg::CHANNELS_MAX - 1
        )
        .into());
    }
    let conns = a.sessions.div_ceil(per_conn);
    let source_addrs = a.source_addrs.unwrap_or(conns.div_ceil(25_000));
    let fds = rlimit::increase_nofile_limit(conns as u64 + 1024)?;
    if fds < conns as u64 + 64 {
        return Err(format!(
            "{conns} connections need as many descriptors; this process may open {fds} (hard limit; raise it with `ulimit -Hn` as root, which needs CAP_SYS_RESOURCE, or carry more sessions per connection with --channels)",
        )
        .into());
    }
    let probe = Client::connect(ClientOptions::new(a.addr.clone())).await?;
    let stat = |stats: &[(String, u64)], k: &str| {
        stats.iter().find(|(n, _)| n == k).map_or(0, |(_, v)| *v)
    };
    let before = probe.stats().await?;
    let rss_before = stat(&before, "rss_bytes");
    let sessions_before = stat(&before, "sessions");

    let hello = Request::Hello(Hello {
        version_min: PROTOCOL_VERSION,
        version_max: PROTOCOL_VERSION,
        features: 0,
        lease_ms: a.lease_ms,
        end_on_disconnect: true,
        node_name: b"hold",
        credentials: b"",
        resume_session: 0,
        resume_secret: 0,
    });
    let counters = Arc::new(Counters {
        up: AtomicU64::new(0),
        failed: AtomicU64::new(0),
        pings: AtomicU64::new(0),
        lost: AtomicU64::new(0),
        stop: AtomicBool::new(false),
    });
    // A third of the lease between PINGs, as the client library does.
    let every = Duration::from_millis(u64::from(a.lease_ms) / 3);
    let gate = Arc::new(tokio::sync::Semaphore::new(a.connect_concurrency.max(1)));
    let per_source = conns.div_ceil(source_addrs.max(1));
    let started = Instant::now();
    let mut tasks = Vec::with_capacity(conns);
    // Frames for a connection of k sessions (the last connection may carry fewer).
    let frames = |k: usize| -> (Arc<[u8]>, Arc<[u8]>) {
        let channels = if per_conn == 1 { None } else { Some(k) };
        (
            encode_on(channels, &hello).into(),
            encode_on(channels, &Request::Ping).into(),
        )
    };
    let full = frames(per_conn);
    for i in 0..conns {
        let source = source_addr(i / per_source.max(1))?;
        let k = per_conn.min(a.sessions - i * per_conn);
        let (hello, ping) = if k == per_conn {
            full.clone()
        } else {
            frames(k)
        };
        let (counters, gate) = (counters.clone(), gate.clone());
        tasks.push(tokio::spawn(async move {
            let permit = gate.acquire_owned().await;
            let conn = open_session(server, source, &hello, k).await;
            drop(permit);
            match conn {
                Ok(stream) => {
                    counters.up.fetch_add(k as u64, Ordering::Relaxed);
                    keep(stream, &ping, k, every, i, &counters).await;
                }
                Err(_) => {
                    counters.failed.fetch_add(k as u64, Ordering::Relaxed);
                }
            }
        }));
    }
    // Wait until every session is up (or failed).
    let mut last_report = Instant::now();
    loop {
        let done = counters.up.load(Ordering::Relaxed) + counters.failed.load(Ordering::Relaxed);
        if done >= a.sessions as u64 {
            break;
        }
        if !a.json && last_report.elapsed() > Duration::from_secs(2) {
            eprintln!(
                "{} sessions up, {} failed, {:.0} s",
                counters.up.load(Ordering::Relaxed),
                counters.failed.load(Ordering::Relaxed),
                started.elapsed().as_secs_f64()
            );
            last_report = Instant::now();
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let open_s = started.elapsed().as_secs_f64();

    // Hold, while a fresh client registers and releases a port every 10 ms.
    let mut hist = Histogram::<u64>::new_with_bounds(1, 600_000_000, 3)?;
    let hold_until = Instant::now() + Duration::from_secs_f64(a.hold_s.max(1.0));
    let mut n = 0u64;
    let mut probe_errors = 0u64;
    while Instant::now() < hold_until {
        let name = format!("hold-probe/{n}");
        let t = Instant::now();
        match probe.register(&name, b"").await {
            Ok(_) => {
                let _ = hist.record(t.elapsed().as_micros().max(1) as u64);
                let _ = probe.unregister(&name).await;
            }
            Err(_) => probe_errors += 1,
        }
        n += 1;
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let after = probe.stats().await?;
    let up = counters.up.load(Ordering::Relaxed);
    let held = stat(&after, "sessions").saturating_sub(sessions_before);
    let rss_after = stat(&after, "rss_bytes");
    let report = serde_json::json!({
        "workload": "HoldSessions",
        "sessions_requested": a.sessions,
        "sessions_up": up,
        "sessions_failed": counters.failed.load(Ordering::Relaxed),
        "sessions_lost": counters.lost.load(Ordering::Relaxed),
        "server_sessions_held": held,
        "source_addrs": source_addrs,
        "connections": conns,
        "sessions_per_connection": per_conn,
        "open_s": (open_s * 1000.0).round() / 1000.0,
        "lease_ms": a.lease_ms,
        "pings": counters.pings.load(Ordering::Relaxed),
        "server_rss_before_bytes": rss_before,
        "server_rss_after_bytes": rss_after,
        "server_bytes_per_session": rss_after.saturating_sub(rss_before) as f64 / held.max(1) as f64,
        "probe_registers": hist.len(),
        "probe_errors": probe_errors,
        "probe_register_p50_us": hist.value_at_quantile(0.5),
        "probe_register_p99_us": hist.value_at_quantile(0.99),
        "probe_register_max_us": hist.max(),
    });
    counters.stop.store(true, Ordering::Relaxed);
    if !a.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    }
    for t in tasks {
        t.abort();
    }
    let ok = up == a.sessions as u64
        && held >= up
        && counters.lost.load(Ordering::Relaxed) == 0
        && probe_errors == 0;
    Ok(Outcome { report, ok })
}

async fn keep(mut s: TcpStream, ping: &[u8], k: usize, every: Duration, i: usize, c: &Counters) {
    // Spread the PINGs over the period so they do not all come at once.
    let offset = every.mul_f64((i % 1000) as f64 / 1000.0);
    tokio::time::sleep(offset).await;
    while !c.stop.load(Ordering::Relaxed) {
        if s.write_all(ping).await.is_err() || read_replies(&mut s, k, op::OK).await.is_err() {
            if !c.stop.load(Ordering::Relaxed) {
                c.lost.fetch_add(k as u64, Ordering::Relaxed);
            }
            return;
        }
        c.pings.fetch_add(k as u64, Ordering::Relaxed);
        tokio::time::sleep(every).await;
    }
}
