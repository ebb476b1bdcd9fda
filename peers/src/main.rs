//! `peerbench`: the same workloads against portswitch, etcd, ZooKeeper and Redis.
//!
//! Driven by `scripts/peers.sh`, which installs and starts each server and turns the
//! JSON lines this prints into the comparison table. Every figure is one system's, in
//! one process, measured the same way; the server's CPU seconds and resident memory
//! come from `/proc/<server pid>`.

mod driver;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::{Parser, Subcommand, ValueEnum};
use driver::{Result, Session, SessionSpec, System};
use hdrhistogram::Histogram;
use serde_json::json;
use tokio::io::AsyncBufReadExt;

#[derive(Parser)]
#[command(about = "Same workloads against portswitch, etcd, ZooKeeper and Redis")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run one workload and print one JSON line.
    Run(RunArgs),
    /// Acquire a name and hold it until killed (the kill-holder workload's victim).
    Hold {
        #[arg(long, value_enum)]
        system: System,
        #[arg(long)]
        addr: String,
        #[arg(long)]
        name: String,
        #[arg(long, default_value_t = 4000)]
        lease_ms: u64,
        #[arg(long)]
        end_on_disconnect: bool,
    },
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Workload {
    /// Each client acquires and releases its own name, one pair at a time.
    AcquireRelease,
    /// All clients try to take one name; whoever gets it releases it at once.
    Contend,
    /// Create --count names bound to the clients' sessions; report bytes per name.
    Fill,
    /// Kill -9 a process holding a name; time until the name is free.
    KillHolder,
}

#[derive(clap::Args)]
struct RunArgs {
    #[arg(long, value_enum)]
    system: System,
    #[arg(long)]
    addr: String,
    #[arg(long, value_enum)]
    workload: Workload,
    /// PID of the server, for its CPU seconds and resident memory.
    #[arg(long)]
    server_pid: Option<u32>,
    #[arg(long, default_value_t = 16)]
    clients: usize,
    /// Seconds, for acquire-release and contend.
    #[arg(long, default_value_t = 10.0)]
    duration: f64,
    /// Names to create (fill).
    #[arg(long, default_value_t = 1_000_000)]
    count: u64,
    /// Requests in flight per client session (fill).
    #[arg(long, default_value_t = 64)]
    inflight: usize,
    /// acquire-release: closed loops per client session, each on its own name (1 =
    /// one request in flight per client; more shows what each system makes of
    /// concurrent requests on one session).
    #[arg(long, default_value_t = 1)]
    pipeline: usize,
    /// Session lease / TTL / session timeout in milliseconds.
    #[arg(long, default_value_t = 60_000)]
    lease_ms: u64,
    /// kill-holder: repetitions.
    #[arg(long, default_value_t = 5)]
    repeat: usize,
    /// portswitch only: the holder's session ends when its connection closes.
    #[arg(long)]
    end_on_disconnect: bool,
    /// Connections the client sessions share (0: one connection per session). See
    /// `Session::open_many` for what sharing means for each system.
    #[arg(long, default_value_t = 0)]
    connections: usize,
    /// Free-form label copied into the JSON (e.g. "end-on-disconnect").
    #[arg(long, default_value = "")]
    label: String,
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    // PEERBENCH_THREADS: the load generator's runtime threads (default: one per core).
    let mut rt = tokio::runtime::Builder::new_multi_thread();
    if let Some(n) = std::env::var("PEERBENCH_THREADS")
        .ok()
        .and_then(|v| v.parse().ok())
    {
        rt.worker_threads(n);
    }
    let rt = rt.enable_all().build()?;
    rt.block_on(async move {
        match cli.cmd {
            Cmd::Run(args) => {
                let line = run(&args).await?;
                println!("{line}");
                Ok(())
            }
            Cmd::Hold {
                system,
                addr,
                name,
                lease_ms,
                end_on_disconnect,
            } => hold(system, addr, name, lease_ms, end_on_disconnect).await,
        }
    })
}

async fn run(a: &RunArgs) -> Result<serde_json::Value> {
    let spec = SessionSpec {
        system: a.system,
        addr: a.addr.clone(),
        lease: Duration::from_millis(a.lease_ms),
        end_on_disconnect: false,
        // fill can outlast a lease: etcd's leases must be kept alive like a real
        // holder's (the other clients heartbeat on their own; Redis keys get the lease).
        keep_alive: a.workload == Workload::Fill,
    };
    let before = a.server_pid.map(ServerSample::read).transpose()?;
    let mut out = match a.workload {
        Workload::AcquireRelease => closed_loop(&spec, a, false).await?,
        Workload::Contend => closed_loop(&spec, a, true).await?,
        Workload::Fill => fill(&spec, a, before.as_ref()).await?,
        Workload::KillHolder => kill_holder(&spec, a).await?,
    };
    if let (Some(pid), Some(before)) = (a.server_pid, before) {
        let after = ServerSample::read(pid)?;
        out["server_cpu_s"] = json!(after.cpu_s - before.cpu_s);
        out["server_rss_bytes"] = json!(after.rss);
    }
    out["system"] = json!(a.system.name());
    out["workload"] = json!(a.workload.to_possible_value().unwrap().get_name());
    out["clients"] = json!(a.clients);
    out["pipeline"] = json!(if a.workload == Workload::AcquireRelease {
        a.pipeline
    } else {
        1
    });
    out["label"] = json!(a.label);
    out["load_threads"] = json!(tokio::runtime::Handle::current().metrics().num_workers());
    out["connections"] = json!(if a.system == System::Zookeeper {
        0
    } else {
        a.connections
    });
    Ok(out)
}

/// One task's latencies, in microseconds: buffered and folded into a histogram in
/// bulk. A histogram per task recorded into on every operation missed the cache each
/// time (128 of them, ~140 KB each, do not fit it), which cost the load generator 6%
/// of its thread against portswitch: a harness must not tax the fastest system most.
struct Latencies {
    hist: Histogram<u64>,
    buf: Vec<u32>,
}

impl Latencies {
    const FLUSH_EVERY: usize = 4_096;

    fn new() -> Latencies {
        Latencies {
            hist: Histogram::new_with_bounds(1, 60_000_000, 3).expect("valid bounds"),
            buf: Vec::with_capacity(Self::FLUSH_EVERY),
        }
    }

    fn record(&mut self, d: Duration) {
        self.buf.push(d.as_micros().min(u32::MAX as u128) as u32);
        if self.buf.len() == Self::FLUSH_EVERY {
            self.flush();
        }
    }

    fn flush(&mut self) {
        for &us in &self.buf {
            self.hist.saturating_record(us as u64);
        }
        self.buf.clear();
    }

    fn into_histogram(mut self) -> Histogram<u64> {
        self.flush();
        self.hist
    }
}

/// acquire-release (own name per client) or contend (one name for all), closed loop.
async fn closed_loop(spec: &SessionSpec, a: &RunArgs, contend: bool) -> Result<serde_json::Value> {
    let sessions = Session::open_many(spec, a.clients, a.connections).await?;
    let start = Instant::now();
    let deadline = start + Duration::from_secs_f64(a.duration);
    let loops = if contend { 1 } else { a.pipeline.max(1) };
    let mut tasks = Vec::new();
    for (i, s) in sessions.iter().enumerate() {
        for j in 0..loops {
            let mut s = s.clone();
            let name = if contend {
                "peerbench-contended-name".to_string()
            } else {
                format!("peerbench-ar-{i:06}-{j:04}")
            };
            tasks.push(tokio::spawn(async move {
                let mut lat = Latencies::new();
                let (mut pairs, mut busy, mut errors) = (0u64, 0u64, 0u64);
                // One clock read per pair: the end of one is the start of the next.
                let mut t = Instant::now();
                while t < deadline {
                    match s.acquire(&name).await {
                        Ok(true) => {}
                        Ok(false) => {
                            busy += 1;
                            if !contend {
                                errors += 1;
                            }
                            t = Instant::now();
                            continue;
                        }
                        Err(_) => {
                            errors += 1;
                            tokio::time::sleep(Duration::from_millis(10)).await;
                            t = Instant::now();
                            continue;
                        }
                    }
                    if s.release(&name).await.is_err() {
                        errors += 1;
                        t = Instant::now();
                        continue;
                    }
                    let end = Instant::now();
                    lat.record(end - t);
                    pairs += 1;
                    t = end;
                }
                (lat.into_histogram(), pairs, busy, errors)
            }));
        }
    }
    let mut hist = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).unwrap();
    let (mut pairs, mut busy, mut errors) = (0, 0, 0);
    for t in tasks {
        let (h, p, b, e) = t.await?;
        hist.add(&h)?;
        pairs += p;
        busy += b;
        errors += e;
    }
    let secs = start.elapsed().as_secs_f64();
    drop(sessions);
    Ok(json!({
        "pairs_per_s": pairs as f64 / secs,
        "attempts_per_s": (pairs + busy) as f64 / secs,
        "pairs": pairs,
        "errors": errors,
        "seconds": secs,
        "p50_us": hist.value_at_quantile(0.5),
        "p99_us": hist.value_at_quantile(0.99),
        "max_us": hist.max(),
    }))
}

/// Creates `count` names spread over `clients` sessions, `inflight` at a time per
/// session, then reads the server's resident memory while they are all held.
async fn fill(
    spec: &SessionSpec,
    a: &RunArgs,
    before: Option<&ServerSample>,
) -> Result<serde_json::Value> {
    let sessions = Session::open_many(spec, a.clients, a.connections).await?;
    let next = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let mut tasks = Vec::new();
    for s in &sessions {
        for _ in 0..a.inflight.max(1) {
            let mut s = s.clone();
            let (next, errors, count) = (next.clone(), errors.clone(), a.count);
            tasks.push(tokio::spawn(async move {
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= count {
                        return;
                    }
                    if !matches!(s.acquire(&format!("peerbench-fill-{i:09}")).await, Ok(true)) {
                        errors.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }));
        }
    }
    for t in tasks {
        t.await?;
    }
    let secs = start.elapsed().as_secs_f64();
    let errors = errors.load(Ordering::Relaxed);
    // Let the server settle (etcd and ZooKeeper apply asynchronously to their logs).
    tokio::time::sleep(Duration::from_secs(2)).await;
    let mut out = json!({
        "names": a.count,
        "errors": errors,
        "seconds": secs,
        "names_per_s": a.count as f64 / secs,
    });
    if let (Some(pid), Some(before)) = (a.server_pid, before) {
        let after = ServerSample::read(pid)?;
        let held = a.count.saturating_sub(errors).max(1);
        out["rss_before_bytes"] = json!(before.rss);
        out["rss_after_bytes"] = json!(after.rss);
        out["bytes_per_name"] = json!(after.rss.saturating_sub(before.rss) as f64 / held as f64);
    }
    drop(sessions);
    Ok(out)
}

/// Starts a holder process, kills it with SIGKILL once it holds the name, and polls
/// (every millisecond, from a separate session) until the name is free.
async fn kill_holder(spec: &SessionSpec, a: &RunArgs) -> Result<serde_json::Value> {
    let mut observer = Session::open(spec).await?;
    let exe = std::env::current_exe()?;
    let mut ms = Vec::new();
    for rep in 0..a.repeat {
        let name = format!("peerbench-held-{rep:09}");
        let mut cmd = tokio::process::Command::new(&exe);
        cmd.args(["hold", "--system", a.system.name(), "--addr", &a.addr])
            .args(["--name", &name, "--lease-ms", &a.lease_ms.to_string()])
            .stdout(std::process::Stdio::piped())
            .kill_on_drop(true);
        if a.end_on_disconnect {
            cmd.arg("--end-on-disconnect");
        }
        let mut child = cmd.spawn()?;
        let mut lines = tokio::io::BufReader::new(child.stdout.take().unwrap()).lines();
        match tokio::time::timeout(Duration::from_secs(30), lines.next_line()).await {
            Ok(Ok(Some(l))) if l == "held" => {}
            other => return Err(format!("holder did not report holding: {other:?}").into()),
        }
        if !observer.held(&name).await? {
            return Err("holder says it holds the name, the server says nobody does".into());
        }
        // Let a heartbeat or two go by, as in a real process's life.
        tokio::time::sleep(Duration::from_millis(300)).await;
        child.start_kill()?;
        let killed = Instant::now();
        child.wait().await?;
        let limit = killed + Duration::from_millis(a.lease_ms * 3 + 10_000);
        loop {
            if !observer.held(&name).await? {
                break;
            }
            if Instant::now() > limit {
                return Err(format!("{name} still held long after its holder died").into());
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        ms.push(killed.elapsed().as_secs_f64() * 1e3);
    }
    ms.sort_by(|a, b| a.partial_cmp(b).unwrap());
    Ok(json!({
        "lease_ms": a.lease_ms,
        "release_ms": ms,
        "release_p50_ms": ms[ms.len() / 2],
        "release_max_ms": ms[ms.len() - 1],
    }))
}

async fn hold(
    system: System,
    addr: String,
    name: String,
    lease_ms: u64,
    end_on_disconnect: bool,
) -> Result<()> {
    let spec = SessionSpec {
        system,
        addr,
        lease: Duration::from_millis(lease_ms),
        end_on_disconnect,
        keep_alive: true,
    };
    let mut s = Session::open(&spec).await?;
    if !s.acquire(&name).await? {
        return Err(format!("{name} is already held").into());
    }
    println!("held");
    loop {
        tokio::time::sleep(Duration::from_millis(lease_ms / 3)).await;
        s.refresh(&name).await?;
    }
}

/// CPU seconds and resident memory of a process, from /proc.
struct ServerSample {
    cpu_s: f64,
    rss: u64,
}

impl ServerSample {
    fn read(pid: u32) -> Result<ServerSample> {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
        // Fields after the parenthesised command name; utime and stime are 14 and 15.
        let rest = &stat[stat.rfind(')').ok_or("bad /proc stat")? + 2..];
        let f: Vec<&str> = rest.split_whitespace().collect();
        let ticks: f64 = f[11].parse::<f64>()? + f[12].parse::<f64>()?;
        let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
        let rss_kb: u64 = status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next())
            .ok_or("no VmRSS")?
            .parse()?;
        Ok(ServerSample {
            cpu_s: ticks / clk_tck(),
            rss: rss_kb * 1024,
        })
    }
}

fn clk_tck() -> f64 {
    std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(100.0)
}
