//! `wan`: a group of three spread over three "data centres" with a
//! fixed delay between them, on one machine.
//!
//! Each data centre is a network namespace this workload creates (and removes when it
//! ends, also on error): member k runs in namespace k, behind a veth pair whose outer
//! end (10.N.k.1) is in the benchmark's own namespace, the "WAN". Everything that
//! crosses the WAN goes through the harness's relay there (on a thread and runtime of
//! its own, so the load in this process does not delay it), which delays
//! every byte by `--delay-ms` each way (this kernel has no netem): member k is known
//! to the others and to clients by the relay's addresses 10.N.k.1:17000 (peers) and
//! 10.N.k.1:17001 (clients) and listens on 10.N.k.2 inside its namespace
//! (`--peer-listen`, `--listen`). So every pair of members is `--delay-ms` apart one
//! way, and so is every client; a client "in the master's data centre" connects to
//! the master's own address over its veth, without the relay.
//!
//! It measures, in one run: batched register-unregister throughput next to the
//! master and through the WAN (`portswitch bench` as a child process), then
//! `--rounds` times takes the master's data centre off the network (its veth link
//! down, so packets to and from it vanish) and times how long until every session
//! (clients in the WAN) is back on a new master with all its ports. Needs root (it
//! creates namespaces and links).

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use portswitch_client::{server_stats, ClientOptions};
use tokio::process::{Child, Command};

use crate::group::{find_master, start_member, Member};
use crate::netns::Net;
use crate::recovery::{hold_ports, RecoveryWatch};
use crate::relay::Route;
use crate::{Outcome, Result};

/// Members (one per data centre).
const DCS: u8 = 3;
/// Ports members listen on inside their namespaces, and the relay's ports outside.
const PEER_PORT: u16 = 7000;
const CLIENT_PORT: u16 = 7001;
const RELAY_PEER_PORT: u16 = 17000;
const RELAY_CLIENT_PORT: u16 = 17001;
/// The user every client logs in as: members reached over a network require a login.
const USER: &str = "loader";
const PASSWORD: &str = "Wan-load-Pass-42";

#[derive(clap::Args, Debug)]
pub struct WanArgs {
    /// Delay between data centres, ms one way.
    #[arg(long, default_value_t = 30)]
    pub delay_ms: u64,
    /// Sessions (clients in the WAN) holding --ports ports through the failovers.
    #[arg(long, default_value_t = 100)]
    pub sessions: usize,
    /// Ports held in all, spread over the sessions.
    #[arg(long, default_value_t = 1_000_000)]
    pub ports: u64,
    /// Times the master's data centre is cut off.
    #[arg(long, default_value_t = 20)]
    pub rounds: usize,
    /// Session lease in ms.
    #[arg(long, default_value_t = 10_000)]
    pub lease_ms: u32,
    /// Seconds of each register-unregister throughput run.
    #[arg(long, default_value_t = 10.0)]
    pub duration: f64,
    /// Connections of each throughput run (one session each).
    #[arg(long, default_value_t = 64)]
    pub connections: usize,
    /// Requests in flight per connection in the throughput runs.
    #[arg(long, default_value_t = 64)]
    pub pipeline: usize,
    /// A flag for every member's `serve` (repeatable), e.g.
    /// --member-flag=--heartbeat-ms=100
    #[arg(long = "member-flag", value_name = "FLAG", allow_hyphen_values = true)]
    pub member_flags: Vec<String>,
    /// PING an idle session at least this often (default: a third of the lease),
    /// which bounds how long a session takes to notice a silent master.
    #[arg(long)]
    pub keepalive_ms: Option<u64>,
    /// Print one JSON object instead of text.
    #[arg(long)]
    pub json: bool,
}

/// The group, its relay and where it keeps its data.
struct Group {
    net: Net,
    exe: PathBuf,
    dir: PathBuf,
    members: String,
    extra: Vec<String>,
    children: Vec<Option<Child>>,
    cut: Option<u8>,
    _relay: Relay,
}

/// The relay on a thread of its own; it stops when this is dropped.
struct Relay {
    stop: Option<tokio::sync::oneshot::Sender<()>>,
}

impl Relay {
    /// Binds every route (an error if any cannot be bound), then relays them on a
    /// single-threaded runtime on a thread of its own.
    fn start(routes: Vec<Route>, delay: Duration) -> Result<Relay> {
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let (ready_tx, ready) = std::sync::mpsc::channel::<std::result::Result<(), String>>();
        std::thread::Builder::new()
            .name("wan-relay".into())
            .spawn(move || {
                let rt = match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(rt) => rt,
                    Err(e) => {
                        let _ = ready_tx.send(Err(e.to_string()));
                        return;
                    }
                };
                rt.block_on(async move {
                    match crate::relay::start(&routes, delay, 10_000).await {
                        Ok(relay) => {
                            let _ = ready_tx.send(Ok(()));
                            let _ = stopped.await;
                            drop(relay);
                        }
                        Err(e) => {
                            let _ = ready_tx.send(Err(e.to_string()));
                        }
                    }
                });
            })?;
        match ready.recv() {
            Ok(Ok(())) => Ok(Relay { stop: Some(stop) }),
            Ok(Err(e)) => Err(format!("the relay did not start: {e}").into()),
            Err(_) => Err("the relay thread ended".into()),
        }
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
    }
}

impl Group {
    async fn start(args: &WanArgs, server: &Path) -> Result<Group> {
        let net = Net::create(DCS)?;
        let exe = server.to_path_buf();
        let dir = std::env::temp_dir().join(format!("portswitch-wan-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let mut routes = Vec::new();
        for k in 1..=DCS {
            let (w, d) = (net.wan_ip(k), net.dc_ip(k));
            for (from, to) in [
                (RELAY_PEER_PORT, PEER_PORT),
                (RELAY_CLIENT_PORT, CLIENT_PORT),
            ] {
                routes.push(Route {
                    listen: (w, from).into(),
                    target: (d, to).into(),
                });
            }
        }
        let relay = Relay::start(routes, Duration::from_millis(args.delay_ms))?;
        let members: Vec<String> = (1..=DCS)
            .map(|k| {
                let w = net.wan_ip(k);
                format!("{k}={w}:{RELAY_PEER_PORT}/{w}:{RELAY_CLIENT_PORT}")
            })
            .collect();
        // Peer links use mutual TLS, as they would between data centres: one
        // certificate valid for every member's address, from a CA of the run's own.
        let pki = dir.join("pki");
        let mut cert = std::process::Command::new(&exe);
        cert.arg("cert").arg("--out").arg(&pki);
        for k in 1..=DCS {
            cert.args(["--host", &net.wan_ip(k).to_string()]);
        }
        let out = cert.output()?;
        if !out.status.success() {
            return Err(format!(
                "portswitch cert failed: {}",
                String::from_utf8_lossy(&out.stderr)
            )
            .into());
        }
        let path = |f: &str| pki.join(f).to_string_lossy().into_owned();
        let mut extra = vec![
            "--no-http".to_string(),
            // Clients reach members in plain TCP across the test's own private network.
            "--danger-allow-insecure-network".to_string(),
            format!("--peer-tls-cert={}", path("server.pem")),
            format!("--peer-tls-key={}", path("server-key.pem")),
            format!("--peer-tls-ca={}", path("ca.pem")),
            "--lease-ms-max".to_string(),
            args.lease_ms.to_string(),
        ];
        if !args.member_flags.iter().any(|f| f.starts_with("--log")) {
            extra.push("--log=error,openraft=off".to_string());
        }
        extra.extend(args.member_flags.iter().cloned());
        let mut g = Group {
            net,
            exe,
            dir,
            members: members.join(","),
            extra,
            children: (0..DCS).map(|_| None).collect(),
            cut: None,
            _relay: relay,
        };
        for k in 1..=DCS {
            // Each member keeps its own users: the same one on every member.
            let cfg = portswitch_server::auth::AuthConfig {
                data_dir: Some(g.dir.join(k.to_string())),
                ..Default::default()
            };
            let add = serde_json::json!({"op": "user_add", "user": USER, "password": PASSWORD, "roles": ["root"]});
            portswitch_server::auth::admin_offline(cfg, add.to_string().as_bytes())?;
            g.spawn(k).await?;
        }
        Ok(g)
    }

    async fn spawn(&mut self, k: u8) -> Result<()> {
        let peer_listen = format!("{}:{PEER_PORT}", self.net.dc_ip(k));
        let listen = format!("{}:{CLIENT_PORT}", self.net.dc_ip(k));
        let mut flags = self.extra.clone();
        flags.extend(["--peer-listen".to_string(), peer_listen]);
        let child = start_member(&Member {
            server: &self.exe,
            netns: Some(&self.net.ns(k)),
            id: k as u64,
            listen: &listen,
            data_dir: &self.dir.join(k.to_string()),
            members: &self.members,
            flags: &flags,
            log: true,
        })
        .await?;
        self.children[k as usize - 1] = Some(child);
        Ok(())
    }

    fn client_addrs(&self) -> Vec<String> {
        (1..=DCS).map(|k| client_addr(&self.net, k)).collect()
    }

    /// The member serving as master (not counting a cut-off one), waiting up to 30 s.
    async fn master(&self) -> Result<u8> {
        let k = |i: usize| i as u8 + 1;
        find_master(
            &self.client_addrs(),
            |i| self.cut == Some(k(i)),
            Duration::from_secs(30),
        )
        .await
        .map(k)
    }

    /// Waits until member k's recovery window (if its takeover opened one) is closed,
    /// so that new ports can be registered.
    async fn settled(&self, k: u8, lease_ms: u32) -> Result<()> {
        let opts = ClientOptions::new("unused");
        let deadline = Instant::now() + Duration::from_millis(lease_ms as u64 * 2 + 30_000);
        while Instant::now() < deadline {
            if let Ok(s) = server_stats(&opts, &client_addr(&self.net, k)).await {
                if s.iter().any(|(n, v)| n == "recovering" && *v == 0) {
                    return Ok(());
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Err(format!("member {k} still recovering").into())
    }

    /// The shortest of five STATS round trips to `addr` (an idle request: what the
    /// distance alone costs), in ms.
    async fn idle_rtt_ms(&self, addr: &str) -> Result<f64> {
        let opts = ClientOptions::new("unused");
        let mut best = f64::MAX;
        for _ in 0..5 {
            let t = Instant::now();
            server_stats(&opts, addr).await?;
            best = best.min(t.elapsed().as_secs_f64() * 1e3);
        }
        Ok((best * 1000.0).round() / 1000.0)
    }

    /// Runs the register-unregister benchmark against `addr` in a child process.
    async fn throughput(&self, addr: &str, args: &WanArgs) -> Result<serde_json::Value> {
        let out = Command::new(&self.exe)
            .args(["bench", "register-unregister", "--json"])
            .args(["--addr", addr, "--user", USER])
            .env("PORTSWITCH_PASSWORD", PASSWORD)
            .args(["--duration", &args.duration.to_string()])
            .args(["--connections", &args.connections.to_string()])
            .args(["--pipeline", &args.pipeline.to_string()])
            .output()
            .await?;
        let text = String::from_utf8_lossy(&out.stdout);
        let report: serde_json::Value = serde_json::from_str(text.trim()).map_err(|e| {
            format!(
                "bench against {addr} ({}) printed {text:?} and {:?}: {e}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            )
        })?;
        Ok(report)
    }
}

impl Drop for Group {
    fn drop(&mut self) {
        // Members first, so nothing runs in a namespace when it is removed.
        for c in self.children.iter_mut().flatten() {
            let _ = c.start_kill();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

pub async fn run(args: &WanArgs, server: &Path) -> Result<Outcome> {
    if args.sessions == 0 || args.connections == 0 || args.pipeline == 0 {
        return Err("--sessions, --connections and --pipeline must be at least 1".into());
    }
    let mut g = Group::start(args, server).await?;
    let m = g.master().await?;
    // A takeover that had to be repeated while the group formed opens a recovery
    // window (an earlier master might have served); the load waits for it to close.
    g.settled(m, args.lease_ms).await?;
    let say = |s: String| {
        if !args.json {
            eprintln!("{s}");
        }
    };
    say(format!(
        "three data centres {} ms apart (one way); member {m} is master",
        args.delay_ms
    ));

    // Steady state: clients next to the master, then clients across the WAN.
    let near_addr = format!("{}:{CLIENT_PORT}", g.net.dc_ip(m));
    let near_rtt_ms = g.idle_rtt_ms(&near_addr).await?;
    let far_rtt_ms = g.idle_rtt_ms(&client_addr(&g.net, m)).await?;
    say(format!(
        "an idle round trip: {near_rtt_ms} ms next to the master, {far_rtt_ms} ms across the WAN"
    ));
    // A master that loses its lease under the load (an overloaded, unoptimised build)
    // hands over; the measurement is then taken again on the new one, and counted.
    let mut retries = 0;
    let (near, far) = loop {
        let m = g.master().await?;
        let near_addr = format!("{}:{CLIENT_PORT}", g.net.dc_ip(m));
        let r = async {
            let near = g.throughput(&near_addr, args).await?;
            let far = g.throughput(&client_addr(&g.net, m), args).await?;
            Ok::<_, Box<dyn std::error::Error + Send + Sync>>((near, far))
        }
        .await;
        match r {
            Ok(x) => break x,
            Err(e) if retries < 2 => {
                retries += 1;
                eprintln!("throughput run failed ({e}); measuring again");
                g.settled(g.master().await?, args.lease_ms).await?;
            }
            Err(e) => return Err(e),
        }
    };
    let rate = |r: &serde_json::Value| r["ops_per_sec"].as_f64().unwrap_or(0.0);
    let ratio = rate(&near) / rate(&far).max(1.0);
    say(format!(
        "register-unregister, {} connections x {} in flight: next to the master {:.0}/s (p99 {} us), across the WAN {:.0}/s (p99 {} us): {ratio:.2}x",
        args.connections,
        args.pipeline,
        rate(&near),
        near["p99_us"],
        rate(&far),
        far["p99_us"]
    ));

    // Losing the master's data centre.
    let lost = Arc::new(AtomicU64::new(0));
    let mut template = ClientOptions::new("");
    template.lease = Duration::from_millis(args.lease_ms as u64);
    template.credentials = Some((USER.into(), PASSWORD.into()));
    template.keepalive = args.keepalive_ms.map(Duration::from_millis);
    let clients = hold_ports(&g.client_addrs(), args.sessions, args.ports, &template).await?;
    say(format!(
        "{} sessions (in the WAN) hold {} ports",
        args.sessions, args.ports
    ));
    let mut all_hist = Histogram::<u64>::new(3)?;
    let mut each_hist = Histogram::<u64>::new(3)?;
    let mut master_hist = Histogram::<u64>::new(3)?;
    let mut incomplete = 0;
    for round in 0..args.rounds {
        let m = g.master().await?;
        let watch = RecoveryWatch::start(&clients, &lost);
        let cut_at = Instant::now();
        g.net.cut(m)?;
        g.cut = Some(m);
        let new_master = g.master().await?;
        let serving_after = cut_at.elapsed();
        master_hist.record(serving_after.as_micros() as u64)?;
        let limit = Duration::from_millis(args.lease_ms as u64) * 2;
        let (recovered, slowest) = watch.finish(cut_at, limit, &mut each_hist).await?;
        all_hist.record(slowest.as_micros() as u64)?;
        if recovered < clients.len() {
            incomplete += 1;
        }
        say(format!(
            "round {}: data centre {m} cut off; member {new_master} master after {} ms; {recovered}/{} sessions back with their ports, the last after {} ms",
            round + 1,
            serving_after.as_millis(),
            clients.len(),
            slowest.as_millis()
        ));
        // Bring the data centre back; its member rejoins as a follower.
        g.net.mend(m)?;
        g.cut = None;
        tokio::time::sleep(Duration::from_secs(3)).await;
    }
    let lost = lost.load(Ordering::Relaxed);
    let ms = |h: &Histogram<u64>, q: f64| h.value_at_quantile(q) as f64 / 1_000.0;
    let errors = near["errors"].as_u64().unwrap_or(1) + far["errors"].as_u64().unwrap_or(1);
    let report = serde_json::json!({
        "workload": "wan",
        "delay_ms": args.delay_ms,
        "member_flags": args.member_flags,
        "keepalive_ms": args.keepalive_ms,
        "near_idle_rtt_ms": near_rtt_ms,
        "far_idle_rtt_ms": far_rtt_ms,
        "near": near,
        "far": far,
        "near_over_far": (ratio * 1000.0).round() / 1000.0,
        "throughput_retries": retries,
        "sessions": args.sessions,
        "ports": args.ports,
        "rounds": args.rounds,
        "new_master_p50_ms": ms(&master_hist, 0.5),
        "new_master_p99_ms": ms(&master_hist, 0.99),
        "all_recovered_p50_ms": ms(&all_hist, 0.5),
        "all_recovered_p99_ms": ms(&all_hist, 0.99),
        "session_recovered_p50_ms": ms(&each_hist, 0.5),
        "session_recovered_p99_ms": ms(&each_hist, 0.99),
        "ownership_lost": lost,
        "incomplete_rounds": incomplete,
        "throughput_errors": errors,
    });
    if !args.json {
        println!(
            "wan, {} ms one way: throughput across the WAN {:.0}/s = 1/{ratio:.2} of next to the master; losing the master's data centre, {} rounds: new master after p50 {:.0} ms, every session back with every port after p50 {:.0} ms, p99 {:.0} ms; ownership lost: {lost}; incomplete rounds: {incomplete}",
            args.delay_ms,
            rate(&far),
            args.rounds,
            ms(&master_hist, 0.5),
            ms(&all_hist, 0.5),
            ms(&all_hist, 0.99),
        );
    }
    for c in &clients {
        let _ = c.close().await;
    }
    Ok(Outcome {
        report,
        ok: lost == 0 && incomplete == 0 && errors == 0,
    })
}

/// Member k as the others and clients know it (through the relay).
fn client_addr(net: &Net, k: u8) -> String {
    format!("{}:{RELAY_CLIENT_PORT}", net.wan_ip(k))
}
