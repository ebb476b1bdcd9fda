//! `portswitch bench WORKLOAD`: load against a running server, one subcommand per workload.
//!
//! Throughput workloads drive raw protocol connections (one session each), keeping
//! `--pipeline` requests in flight per connection and batching them into frames the
//! way the client library does; they measure the server, not client-side overhead.
//! Latency is from a request's write to its reply. `kill-holder` measures failure
//! detection with real processes killed by SIGKILL.

use std::ffi::OsString;
use std::io::IsTerminal;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use clap::{Args, Subcommand};
use hdrhistogram::Histogram;
use portswitch_client::{Client, ClientOptions, Event};
use portswitch_proto::frame::{frame_len, messages};
use portswitch_proto::limits::{COMMANDS_PER_FRAME_MAX, FRAME_BYTES_MAX, PROTOCOL_VERSION};
use portswitch_proto::msg::op;
use portswitch_proto::{FrameBuf, Hello, Reply, Request, ServerMsg};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::AppResult;

/// `portswitch bench WORKLOAD [flags]`: one subcommand per workload.
#[derive(Args, Debug)]
#[command(
    arg_required_else_help = true,
    subcommand_value_name = "WORKLOAD",
    subcommand_help_heading = "Workloads",
    after_help = "`portswitch bench WORKLOAD --help` lists the flags of a workload. The older form `portswitch bench --workload WORKLOAD [flags]` still works, with a note that it is deprecated."
)]
pub struct BenchArgs {
    #[command(subcommand)]
    workload: Workload,
}

/// The workloads. The throughput ones (register-unregister, query, send,
/// lock-contended, fill, login) share [`ThroughputArgs`]; the others start or kill
/// processes of their own and take the flags they need.
#[derive(Subcommand, Debug)]
pub enum Workload {
    /// REGISTER then UNREGISTER of distinct ports; every request counts.
    RegisterUnregister(RegisterUnregisterArgs),
    /// QUERY of owned ports.
    ///
    /// Every connection first registers --ports ports, then queries ports of
    /// connections picked at random.
    Query(QueryArgs),
    /// SEND to a port owned by another connection (relay).
    Send(ThroughputArgs),
    /// Many sessions queueing for few ports; counts handoffs.
    ///
    /// One port per 8 connections; each connection has one request in flight (a
    /// queued REGISTER, then the UNREGISTER that hands the port on).
    #[command(mut_arg("pipeline", |a| a.hide(true)))]
    LockContended(ThroughputArgs),
    /// Register --ports ports, then report server memory per port.
    #[command(mut_arg("duration", |a| a.hide(true)))]
    Fill(FillArgs),
    /// Connect, log in (SCRAM-SHA-256 with --user), say BYE, again; counts logins.
    #[command(mut_arg("pipeline", |a| a.hide(true)))]
    Login(ThroughputArgs),
    /// Kill -9 a process holding a port; time until watchers hear RELEASED.
    KillHolder(KillHolderArgs),
}

/// Flags of every throughput workload, the same for each.
#[derive(Args, Debug, Clone)]
pub struct ThroughputArgs {
    /// Server address (host:port).
    #[arg(long, default_value = "127.0.0.1:7400")]
    addr: String,
    /// Concurrent connections (one session each).
    #[arg(long, default_value_t = 64)]
    connections: usize,
    /// Seconds to run.
    #[arg(long, default_value_t = 10.0)]
    duration: f64,
    /// Requests in flight per connection.
    #[arg(long, default_value_t = 64)]
    pipeline: usize,
    /// Session lease in ms.
    #[arg(long, default_value_t = 10_000)]
    lease_ms: u32,
    /// Print one JSON object instead of text.
    #[arg(long)]
    json: bool,
    /// Connect over TLS, trusting this CA (PEM).
    #[arg(long)]
    ca: Option<std::path::PathBuf>,
    /// Server name to verify with --ca (default: the host of --addr).
    #[arg(long)]
    server_name: Option<String>,
    /// Log every session in as this user (password from PORTSWITCH_PASSWORD).
    #[arg(long)]
    user: Option<String>,
}

#[derive(Args, Debug)]
pub struct RegisterUnregisterArgs {
    #[command(flatten)]
    common: ThroughputArgs,
    /// Encode one frame of --pipeline requests once and send it again and again, so
    /// the load generator's own cost per request is a copy and a header walk and the
    /// figure is the server's. Latencies are then per frame round trip.
    #[arg(long)]
    preencoded: bool,
}

#[derive(Args, Debug)]
pub struct QueryArgs {
    #[command(flatten)]
    common: ThroughputArgs,
    /// Ports each connection registers and the others query (at most 1,000,000).
    #[arg(long, default_value_t = 1_000_000)]
    ports: u64,
}

#[derive(Args, Debug)]
pub struct FillArgs {
    #[command(flatten)]
    common: ThroughputArgs,
    /// Ports to register in total (fill runs until they are all registered).
    #[arg(long, default_value_t = 1_000_000)]
    ports: u64,
    /// After the report, keep the sessions (and their ports) until SIGINT or
    /// SIGTERM, so other benchmarks can run against a full server.
    #[arg(long)]
    hold: bool,
}

#[derive(Args, Debug)]
pub struct KillHolderArgs {
    /// Server address (host:port).
    #[arg(long, default_value = "127.0.0.1:7400")]
    addr: String,
    /// Rounds: a holder process started, SIGKILLed, its release timed.
    #[arg(long, default_value_t = 20)]
    rounds: usize,
    /// The holder's session lease in ms (what a kill costs without
    /// --end-on-disconnect).
    #[arg(long, default_value_t = 10_000)]
    lease_ms: u32,
    /// The holder asks to end its session on disconnect; otherwise its lease must
    /// run out.
    #[arg(long)]
    end_on_disconnect: bool,
    /// Print one JSON object instead of text.
    #[arg(long)]
    json: bool,
}

/// The throughput workloads that drive raw connections (`drive`); the `Debug` name
/// is the report's `workload`.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
enum Kind {
    RegisterUnregister,
    Query,
    Send,
    LockContended,
    Fill,
}

/// A throughput run: the workload, the common flags and those of some workloads.
struct Plan {
    kind: Kind,
    args: ThroughputArgs,
    /// query: ports per connection; fill: ports in all; others: unused.
    ports: u64,
    /// register-unregister only.
    preencoded: bool,
    /// fill only.
    hold: bool,
}

/// A command line in the form before subcommands, `bench [flags] --workload NAME
/// [flags]`, rewritten as `bench NAME [flags]`, with a one-line deprecation note for
/// stderr. Flags that the old form took for every workload but NAME does not use are
/// dropped (the old form ignored them) and named in the note; `--preencoded` is left
/// for clap to refuse, as the old form refused it but for register-unregister. Any
/// other command line comes back unchanged, without a note.
pub fn legacy_command_line(args: Vec<OsString>) -> (Vec<OsString>, Option<String>) {
    if args.get(1).and_then(|a| a.to_str()) != Some("bench") {
        return (args, None);
    }
    let mut bench = BenchArgs::augment_args(clap::Command::new("bench"));
    bench.build();
    let first = args.get(2).and_then(|a| a.to_str());
    if first.is_some_and(|a| bench.find_subcommand(a).is_some()) {
        return (args, None);
    }
    // Every flag of the old form is a flag of some workload now, with the same arity.
    let takes_value = |long: &str| {
        bench
            .get_subcommands()
            .flat_map(|s| s.get_arguments())
            .find(|a| a.get_long() == Some(long))
            .map(|a| a.get_action().takes_values())
    };
    let mut workload = None;
    // Each flag's name (if it is one) with its words: the flag and its value.
    let mut rest: Vec<(Option<String>, Vec<OsString>)> = Vec::new();
    let mut i = 2;
    while i < args.len() {
        let word = args[i].to_str();
        if word == Some("--") {
            rest.push((None, args[i..].to_vec()));
            break;
        }
        if word == Some("--workload") {
            workload = args.get(i + 1).cloned();
            i += 2;
            continue;
        }
        if let Some(w) = word.and_then(|w| w.strip_prefix("--workload=")) {
            workload = Some(w.into());
            i += 1;
            continue;
        }
        let (name, inline_value) = match word.and_then(|w| w.strip_prefix("--")) {
            Some(long) => match long.split_once('=') {
                Some((name, _)) => (Some(name), true),
                None => (Some(long), false),
            },
            None => (None, false),
        };
        let words = if !inline_value && name.and_then(takes_value) == Some(true) {
            2
        } else {
            1
        };
        let end = (i + words).min(args.len());
        rest.push((name.map(str::to_owned), args[i..end].to_vec()));
        i = end;
    }
    let Some(workload) = workload else {
        return (args, None);
    };
    let name = workload.to_string_lossy().into_owned();
    // An unknown name is left for clap to refuse, as a subcommand.
    let sub = bench.find_subcommand(&name);
    let mut dropped: Vec<String> = Vec::new();
    let mut out = vec![args[0].clone(), args[1].clone(), workload];
    for (flag, words) in rest {
        let unused = match (sub, flag.as_deref()) {
            (Some(sub), Some(flag)) => {
                flag != "preencoded"
                    && takes_value(flag).is_some()
                    && !sub.get_arguments().any(|a| a.get_long() == Some(flag))
            }
            _ => false,
        };
        match flag {
            Some(flag) if unused => {
                let flag = format!("--{flag}");
                if !dropped.contains(&flag) {
                    dropped.push(flag);
                }
            }
            _ => out.extend(words),
        }
    }
    let note = sub.map(|_| {
        let mut note = format!(
            "note: `portswitch bench --workload {name}` is deprecated; use `portswitch bench {name}`"
        );
        if !dropped.is_empty() {
            note += &format!(" (ignoring {}, which {name} does not use)", dropped.join(", "));
        }
        note
    });
    (out, note)
}

/// Workloads that start members of their own or hold very many sessions live in the
/// harness, not in the product binary; `bench NAME` and `bench --workload NAME` for
/// one of them say where it went.
const MOVED: [&str; 4] = ["failover", "failover-locks", "hold-sessions", "wan"];

/// The message for a command line that names a workload which moved to the harness.
pub fn moved_workload(args: &[OsString]) -> Option<String> {
    if args.get(1).and_then(|a| a.to_str()) != Some("bench") {
        return None;
    }
    let words: Vec<&str> = args[2..].iter().filter_map(|a| a.to_str()).collect();
    let name = match words.first() {
        Some(w) if !w.starts_with('-') => Some(*w),
        _ => words
            .iter()
            .enumerate()
            .find_map(|(i, w)| match w.strip_prefix("--workload") {
                Some("") => words.get(i + 1).copied(),
                Some(v) => v.strip_prefix('='),
                None => None,
            }),
    }?;
    MOVED.contains(&name).then(|| {
        format!(
            "`bench {name}` is a test harness workload now: run `portswitch-harness {name}` (cargo build --release -p portswitch-harness), with the same flags"
        )
    })
}

/// How bench connections reach and log in to the server.
#[derive(Clone)]
struct Access {
    addr: String,
    lease_ms: u32,
    tls: Option<(
        tokio_rustls::TlsConnector,
        rustls_pki_types::ServerName<'static>,
    )>,
    client_tls: Option<portswitch_client::ClientTls>,
    login: Option<(String, String)>,
}

impl Access {
    /// Options for a library client (stats) with the same TLS and login.
    fn client_options(&self) -> ClientOptions {
        let mut o = ClientOptions::new(self.addr.clone());
        o.tls = self.client_tls.clone();
        o.credentials = self.login.clone();
        o
    }
}

impl Access {
    fn from_args(
        args: &ThroughputArgs,
    ) -> Result<Access, Box<dyn std::error::Error + Send + Sync>> {
        let client_tls = args.ca.as_ref().map(|ca| portswitch_client::ClientTls {
            ca: ca.clone(),
            server_name: args.server_name.clone(),
            client_cert: None,
        });
        let tls = match &args.ca {
            Some(ca) => {
                let t = portswitch_client::ClientTls {
                    ca: ca.clone(),
                    server_name: None,
                    client_cert: None,
                };
                let host = args.server_name.clone().unwrap_or_else(|| {
                    args.addr
                        .rsplit_once(':')
                        .map_or(args.addr.as_str(), |(h, _)| h)
                        .to_string()
                });
                Some((
                    t.connector()?,
                    rustls_pki_types::ServerName::try_from(host)?,
                ))
            }
            None => None,
        };
        let login = match &args.user {
            Some(u) => Some((
                u.clone(),
                std::env::var("PORTSWITCH_PASSWORD")
                    .map_err(|_| "--user needs PORTSWITCH_PASSWORD")?,
            )),
            None => None,
        };
        Ok(Access {
            addr: args.addr.clone(),
            lease_ms: args.lease_ms,
            tls,
            client_tls,
            login,
        })
    }
}

struct Shared {
    ops: AtomicU64,
    errors: AtomicU64,
    stop: AtomicBool,
}

pub async fn run(args: BenchArgs) -> AppResult {
    let plan = |kind, args, ports, preencoded, hold| Plan {
        kind,
        args,
        ports,
        preencoded,
        hold,
    };
    match args.workload {
        Workload::RegisterUnregister(a) => {
            throughput(plan(
                Kind::RegisterUnregister,
                a.common,
                0,
                a.preencoded,
                false,
            ))
            .await
        }
        Workload::Query(a) => throughput(plan(Kind::Query, a.common, a.ports, false, false)).await,
        Workload::Send(a) => throughput(plan(Kind::Send, a, 0, false, false)).await,
        Workload::LockContended(a) => {
            throughput(plan(Kind::LockContended, a, 0, false, false)).await
        }
        Workload::Fill(a) => throughput(plan(Kind::Fill, a.common, a.ports, false, a.hold)).await,
        Workload::Login(a) => {
            check_load(&a)?;
            let access = Access::from_args(&a)?;
            login_bench(&a, access).await
        }
        Workload::KillHolder(a) => kill_holder(&a).await,
    }
}

fn check_load(args: &ThroughputArgs) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    if args.connections == 0 || args.pipeline == 0 {
        return Err("--connections and --pipeline must be at least 1".into());
    }
    Ok(())
}

/// register-unregister, query, send, lock-contended and fill: raw connections keeping
/// --pipeline requests in flight.
async fn throughput(plan: Plan) -> AppResult {
    check_load(&plan.args)?;
    let access = Access::from_args(&plan.args)?;
    let args = &plan.args;
    let shared = Arc::new(Shared {
        ops: AtomicU64::new(0),
        errors: AtomicU64::new(0),
        stop: AtomicBool::new(false),
    });
    let duration = Duration::from_secs_f64(args.duration.max(0.1));

    let rss_before = if plan.kind == Kind::Fill {
        server_stat(&access, "rss_bytes").await?
    } else {
        0
    };
    let expired_before = server_stat(&access, "sessions_expired_total").await?;

    // Connect and set up every connection before the clock starts.
    let mut conns = Vec::with_capacity(args.connections);
    for i in 0..args.connections {
        let mut c = RawConn::connect(&access).await?;
        setup(&mut c, &plan, i).await?;
        conns.push(c);
    }
    let barrier = Arc::new(tokio::sync::Barrier::new(args.connections + 1));
    let mut tasks = Vec::new();
    for (i, c) in conns.into_iter().enumerate() {
        let shared = shared.clone();
        let barrier = barrier.clone();
        let a = (plan.kind, args.connections, args.pipeline, plan.ports);
        let preencoded = plan.preencoded;
        tasks.push(tokio::spawn(async move {
            barrier.wait().await;
            if preencoded {
                drive_preencoded(c, i, a.2, &shared).await
            } else {
                drive(c, a.0, i, a.1, a.2, a.3, &shared).await
            }
        }));
    }
    barrier.wait().await;
    let start = Instant::now();
    let progress = progress_bar(&plan, duration);
    if plan.kind != Kind::Fill {
        while start.elapsed() < duration {
            tokio::time::sleep(Duration::from_millis(100)).await;
            if let Some(p) = &progress {
                p.set_position(start.elapsed().as_millis() as u64);
                p.set_message(format!("{} ops", shared.ops.load(Ordering::Relaxed)));
            }
        }
        shared.stop.store(true, Ordering::Relaxed);
    }
    let mut hist =
        Histogram::<u64>::new_with_bounds(1, 600_000_000_000, 3).map_err(|e| e.to_string())?;
    let mut held = Vec::new();
    for t in tasks {
        let (h, conn) = t.await??;
        hist.add(&h).map_err(|e| e.to_string())?;
        held.push(conn);
    }
    let elapsed = start.elapsed().as_secs_f64();
    if let Some(p) = progress {
        p.finish_and_clear();
    }
    let ops = shared.ops.load(Ordering::Relaxed);
    let errors = shared.errors.load(Ordering::Relaxed);
    let mut report = serde_json::json!({
        "workload": format!("{:?}", plan.kind),
        "connections": args.connections,
        "pipeline": args.pipeline,
        "preencoded": plan.preencoded,
        "duration_s": round3(elapsed),
        "ops": ops,
        "ops_per_sec": round3(ops as f64 / elapsed),
        "errors": errors,
        "p50_us": round3(hist.value_at_quantile(0.50) as f64 / 1e3),
        "p99_us": round3(hist.value_at_quantile(0.99) as f64 / 1e3),
        "p999_us": round3(hist.value_at_quantile(0.999) as f64 / 1e3),
        "max_us": round3(hist.max() as f64 / 1e3),
    });
    if plan.kind == Kind::Fill {
        let stats = server_stats(&access).await?;
        let get = |k: &str| stats.iter().find(|(n, _)| n == k).map_or(0, |(_, v)| *v);
        let (rss, ports) = (get("rss_bytes"), get("ports_owned"));
        report["ports"] = ports.into();
        report["rss_bytes"] = rss.into();
        report["rss_before_bytes"] = rss_before.into();
        report["bytes_per_port"] = round3(rss as f64 / ports.max(1) as f64).into();
        report["delta_bytes_per_port"] =
            round3(rss.saturating_sub(rss_before) as f64 / ports.max(1) as f64).into();
    }
    // Sessions the server expired during the run: with every connection busy, any
    // expiry is a false one (leases too short for the load).
    let expired = server_stat(&access, "sessions_expired_total")
        .await?
        .saturating_sub(expired_before);
    report["lease_ms"] = args.lease_ms.into();
    report["sessions_expired"] = expired.into();
    if args.json {
        println!("{report}");
    } else {
        print_human(&report);
    }
    if plan.hold {
        use std::io::Write;
        let _ = std::io::stdout().flush();
        crate::ctl::interrupted().await;
    }
    drop(held); // fill keeps its ports until the report is taken
    Ok(if errors == 0 && expired == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

fn print_human(r: &serde_json::Value) {
    println!(
        "{}: {:.0} ops/s ({} ops in {} s, {} connections, pipeline {}), errors {}",
        r["workload"].as_str().unwrap_or(""),
        r["ops_per_sec"].as_f64().unwrap_or(0.0),
        r["ops"],
        r["duration_s"],
        r["connections"],
        r["pipeline"],
        r["errors"]
    );
    println!(
        "latency: p50 {} µs, p99 {} µs, p999 {} µs, max {} µs",
        r["p50_us"], r["p99_us"], r["p999_us"], r["max_us"]
    );
    println!(
        "sessions expired by the server during the run: {} (lease {} ms)",
        r["sessions_expired"], r["lease_ms"]
    );
    if r.get("bytes_per_port").is_some() {
        println!(
            "fill: {} ports, server rss {} bytes, {} bytes/port ({} bytes/port over the idle server)",
            r["ports"], r["rss_bytes"], r["bytes_per_port"], r["delta_bytes_per_port"]
        );
    }
}

fn progress_bar(plan: &Plan, duration: Duration) -> Option<indicatif::ProgressBar> {
    if plan.args.json || !std::io::stderr().is_terminal() || plan.kind == Kind::Fill {
        return None;
    }
    let p = indicatif::ProgressBar::new(duration.as_millis() as u64);
    if let Ok(style) =
        indicatif::ProgressStyle::with_template("{bar:40} {elapsed}/{duration} {msg}")
    {
        p.set_style(style);
    }
    Some(p)
}

trait Io: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin> Io for T {}

/// A raw protocol connection with one session.
struct RawConn {
    stream: Box<dyn Io>,
    rbuf: BytesMut,
    out: FrameBuf,
    wbuf: BytesMut,
    next_id: u32,
}

impl RawConn {
    async fn connect(a: &Access) -> Result<RawConn, Box<dyn std::error::Error + Send + Sync>> {
        let tcp = TcpStream::connect(&a.addr)
            .await
            .map_err(|e| format!("cannot connect to {}: {e}", a.addr))?;
        tcp.set_nodelay(true)?;
        let (stream, exporter): (Box<dyn Io>, Option<[u8; 32]>) = match &a.tls {
            Some((connector, name)) => {
                let tls = connector.connect(name.clone(), tcp).await?;
                let exporter = portswitch_client::tls_exporter(&tls);
                (Box::new(tls), exporter)
            }
            None => (Box::new(tcp), None),
        };
        let mut c = RawConn {
            stream,
            rbuf: BytesMut::with_capacity(1 << 16),
            out: FrameBuf::new(FRAME_BYTES_MAX, COMMANDS_PER_FRAME_MAX),
            wbuf: BytesMut::new(),
            next_id: 0,
        };
        use portswitch_auth::scram::{nonce_from, Channel, ClientExchange};
        let channel = match &exporter {
            Some(e) => Channel::TlsExporter(e),
            None => Channel::Plain,
        };
        let mut exchange = None;
        let mut credentials = Vec::new();
        if let Some((user, password)) = &a.login {
            let mut random = [0u8; 18];
            getrandom::getrandom(&mut random).map_err(|e| e.to_string())?;
            let (ex, first) = ClientExchange::start(user, password, &nonce_from(&random), channel);
            credentials = format!("SCRAM-SHA-256 {first}").into_bytes();
            exchange = Some(ex);
        }
        c.push(&Request::Hello(Hello {
            version_min: PROTOCOL_VERSION,
            version_max: PROTOCOL_VERSION,
            features: 0,
            lease_ms: a.lease_ms,
            end_on_disconnect: true,
            node_name: b"bench",
            credentials: &credentials,
            resume_session: 0,
            resume_secret: 0,
        }));
        c.flush().await?;
        let mut answer: Result<Option<String>, String> = Err("no answer".into());
        c.read_some(|m| {
            answer = match m {
                ServerMsg::Reply {
                    reply: Reply::HelloOk(_),
                    ..
                } => Ok(None),
                ServerMsg::Reply {
                    reply: Reply::AuthContinue { data },
                    ..
                } => Ok(Some(String::from_utf8_lossy(data).into_owned())),
                other => Err(format!("HELLO refused: {other:?}")),
            }
        })
        .await?;
        if let (Some(challenge), Some(ex)) = (answer?, exchange) {
            let (awaiting, client_final) =
                ex.respond(&challenge, channel).map_err(|e| e.to_string())?;
            c.push(&Request::Auth {
                data: client_final.as_bytes(),
            });
            c.flush().await?;
            let mut server_final: Result<String, String> = Err("no answer".into());
            c.read_some(|m| {
                server_final = match m {
                    ServerMsg::Reply {
                        reply: Reply::HelloOk(h),
                        ..
                    } => Ok(String::from_utf8_lossy(h.auth).into_owned()),
                    other => Err(format!("login refused: {other:?}")),
                }
            })
            .await?;
            awaiting.verify(&server_final?).map_err(|e| e.to_string())?;
        }
        Ok(c)
    }

    fn push(&mut self, r: &Request<'_>) -> u32 {
        self.next_id = self.next_id.wrapping_add(1).max(1);
        self.out.push_request(self.next_id, r);
        self.next_id
    }

    async fn flush(&mut self) -> std::io::Result<()> {
        self.out.take_into(&mut self.wbuf);
        if !self.wbuf.is_empty() {
            self.stream.write_all(&self.wbuf).await?;
        }
        Ok(())
    }

    /// Reads at least once and hands every whole message to `f`.
    async fn read_some(
        &mut self,
        mut f: impl FnMut(ServerMsg<'_>),
    ) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
        loop {
            let n = self.stream.read_buf(&mut self.rbuf).await?;
            if n == 0 {
                return Err("server closed the connection".into());
            }
            let mut consumed = 0;
            while let Some(len) = frame_len(&self.rbuf[consumed..], FRAME_BYTES_MAX)? {
                let body = &self.rbuf[consumed + 4..consumed + len];
                for m in messages(body, usize::MAX) {
                    let m = m?;
                    let msg = ServerMsg::decode(m.opcode, m.id, m.body)?;
                    if let ServerMsg::Event(portswitch_proto::Event::GoAway { code, message }) = msg
                    {
                        return Err(format!(
                            "server closed the connection: {code}: {}",
                            String::from_utf8_lossy(message)
                        )
                        .into());
                    }
                    f(msg);
                }
                consumed += len;
            }
            let _ = self.rbuf.split_to(consumed);
            if consumed > 0 {
                return Ok(());
            }
        }
    }

    /// Sends what is queued and reads until `n` replies have come.
    async fn roundtrip(
        &mut self,
        n: usize,
    ) -> Result<Vec<String>, Box<dyn std::error::Error + Send + Sync>> {
        self.flush().await?;
        let mut got = 0;
        let mut errs = Vec::new();
        while got < n {
            self.read_some(|m| {
                if let ServerMsg::Reply { reply, .. } = m {
                    got += 1;
                    if let Reply::Error { code, message, .. } = reply {
                        errs.push(format!("{code}: {}", String::from_utf8_lossy(message)));
                    }
                }
            })
            .await?;
        }
        Ok(errs)
    }
}

fn port_name(buf: &mut Vec<u8>, prefix: &str, conn: usize, i: u64) {
    use std::io::Write;
    buf.clear();
    let _ = write!(buf, "{prefix}/{conn:04}/{i:09}");
}

/// Work before the clock starts (owning the ports that queries and sends target).
async fn setup(
    c: &mut RawConn,
    plan: &Plan,
    i: usize,
) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let mut name = Vec::new();
    match plan.kind {
        Kind::Query => {
            let per = plan.ports.clamp(1, 1_000_000);
            let mut sent = 0;
            for k in 0..per {
                port_name(&mut name, "bench-q", i, k);
                c.push(&Request::Register {
                    port: &name,
                    value: b"10.0.0.1:8080",
                    wait: false,
                });
                sent += 1;
                if sent == 4096 || k + 1 == per {
                    let errs = c.roundtrip(sent).await?;
                    if let Some(e) = errs.first() {
                        return Err(format!("setup: {e}").into());
                    }
                    sent = 0;
                }
            }
        }
        Kind::Send => {
            port_name(&mut name, "bench-s", i, 0);
            c.push(&Request::Register {
                port: &name,
                value: b"",
                wait: false,
            });
            c.roundtrip(1).await?;
        }
        _ => {}
    }
    Ok(())
}

type DriveResult = Result<(Histogram<u64>, RawConn), Box<dyn std::error::Error + Send + Sync>>;

/// Keeps `pipeline` requests in flight until told to stop (or, for fill, until this
/// connection's share of ports is registered).
async fn drive(
    mut c: RawConn,
    w: Kind,
    me: usize,
    conns: usize,
    pipeline: usize,
    ports: u64,
    shared: &Shared,
) -> DriveResult {
    let mut hist =
        Histogram::<u64>::new_with_bounds(1, 600_000_000_000, 3).map_err(|e| e.to_string())?;
    let mut sent_at: std::collections::VecDeque<Instant> =
        std::collections::VecDeque::with_capacity(pipeline * 2);
    let mut name = Vec::with_capacity(64);
    let mut i: u64 = 0;
    let mut rng = fastrand::Rng::with_seed(me as u64);
    let fill_share = ports / conns as u64 + u64::from((me as u64) < ports % conns as u64);
    let lock_ports = (conns / 8).max(1);
    let mut in_flight = 0usize;
    let mut waiting_grant = false;
    loop {
        let stopping = shared.stop.load(Ordering::Relaxed) || (w == Kind::Fill && i >= fill_share);
        if stopping && in_flight == 0 && !waiting_grant {
            break;
        }
        // Top up the pipeline.
        if !stopping {
            let now = Instant::now();
            match w {
                Kind::LockContended => {
                    if in_flight == 0 && !waiting_grant {
                        port_name(&mut name, "bench-lock", 0, (me % lock_ports) as u64);
                        c.push(&Request::Register {
                            port: &name,
                            value: b"",
                            wait: true,
                        });
                        sent_at.push_back(now);
                        in_flight += 1;
                    }
                }
                _ => {
                    while in_flight < pipeline && !(w == Kind::Fill && i >= fill_share) {
                        match w {
                            Kind::RegisterUnregister => {
                                port_name(&mut name, "bench-ru", me, i / 2 % 4096);
                                if i.is_multiple_of(2) {
                                    c.push(&Request::Register {
                                        port: &name,
                                        value: b"",
                                        wait: false,
                                    });
                                } else {
                                    c.push(&Request::Unregister { port: &name });
                                }
                            }
                            Kind::Query => {
                                let other = rng.usize(0..conns);
                                port_name(
                                    &mut name,
                                    "bench-q",
                                    other,
                                    rng.u64(0..ports.clamp(1, 1_000_000)),
                                );
                                c.push(&Request::Query { port: &name });
                            }
                            Kind::Send => {
                                port_name(&mut name, "bench-s", (me + 1) % conns, 0);
                                c.push(&Request::Send {
                                    port: &name,
                                    payload: b"0123456789abcdef",
                                });
                            }
                            Kind::Fill => {
                                port_name(&mut name, "bench-fill", me, i);
                                c.push(&Request::Register {
                                    port: &name,
                                    value: b"",
                                    wait: false,
                                });
                            }
                            Kind::LockContended => unreachable!(),
                        }
                        sent_at.push_back(now);
                        in_flight += 1;
                        i += 1;
                    }
                }
            }
        }
        // Always send what is queued: even when stopping, a lock holder's UNREGISTER
        // must go out or the sessions queued behind it wait forever.
        c.flush().await?;
        // Read what has come back.
        let mut done = 0u64;
        let mut errors = 0u64;
        let mut unregister = false;
        let now_read = {
            let hist = &mut hist;
            let sent_at = &mut sent_at;
            let in_flight = &mut in_flight;
            let waiting_grant = &mut waiting_grant;
            c.read_some(|m| match m {
                ServerMsg::Reply { reply, .. } => {
                    let t0 = sent_at.pop_front();
                    *in_flight -= 1;
                    match reply {
                        Reply::Error { .. } => errors += 1,
                        Reply::Queued { .. } => {
                            *waiting_grant = true;
                            sent_at.push_front(t0.unwrap_or_else(Instant::now));
                            return;
                        }
                        Reply::Registered { .. } if w == Kind::LockContended => unregister = true,
                        _ => {}
                    }
                    if w == Kind::LockContended && !matches!(reply, Reply::Registered { .. }) {
                        return; // the UNREGISTER that hands over; not a handoff itself
                    }
                    done += 1;
                    if let Some(t0) = t0 {
                        let _ = hist.record(t0.elapsed().as_nanos().max(1) as u64);
                    }
                }
                ServerMsg::Event(portswitch_proto::Event::Acquired { .. })
                    if w == Kind::LockContended =>
                {
                    *waiting_grant = false;
                    unregister = true;
                    done += 1;
                    if let Some(t0) = sent_at.pop_front() {
                        let _ = hist.record(t0.elapsed().as_nanos().max(1) as u64);
                    }
                }
                ServerMsg::Event(_) => {}
            })
            .await
        };
        now_read?;
        if unregister {
            // Hand the lock on straight away; the next REGISTER follows the reply.
            c.push(&Request::Unregister { port: &name });
            in_flight += 1;
            sent_at.push_back(Instant::now());
        }
        shared.ops.fetch_add(done, Ordering::Relaxed);
        shared.errors.fetch_add(errors, Ordering::Relaxed);
    }
    Ok((hist, c))
}

/// register-unregister from one frame encoded once: REGISTER + UNREGISTER of
/// --pipeline / 2 ports of this connection, in that order, so every request succeeds.
async fn drive_preencoded(
    mut c: RawConn,
    me: usize,
    pipeline: usize,
    shared: &Shared,
) -> DriveResult {
    let mut hist =
        Histogram::<u64>::new_with_bounds(1, 600_000_000_000, 3).map_err(|e| e.to_string())?;
    let mut name = Vec::with_capacity(64);
    let pairs = (pipeline / 2).max(1);
    for k in 0..pairs {
        port_name(&mut name, "bench-ru", me, k as u64);
        c.push(&Request::Register {
            port: &name,
            value: b"",
            wait: false,
        });
        c.push(&Request::Unregister { port: &name });
    }
    let mut frame = BytesMut::new();
    c.out.take_into(&mut frame);
    let per_frame = 2 * pairs as u64;
    while !shared.stop.load(Ordering::Relaxed) {
        let t0 = Instant::now();
        c.stream.write_all(&frame).await?;
        let (mut replies, mut errors) = (0u64, 0u64);
        while replies < per_frame {
            if c.stream.read_buf(&mut c.rbuf).await? == 0 {
                return Err("server closed the connection".into());
            }
            let mut consumed = 0;
            while let Some(len) = frame_len(&c.rbuf[consumed..], FRAME_BYTES_MAX)? {
                for m in messages(&c.rbuf[consumed + 4..consumed + len], usize::MAX) {
                    let m = m?;
                    if m.id != 0 {
                        replies += 1;
                        errors += u64::from(m.opcode == op::ERROR);
                    }
                }
                consumed += len;
            }
            let _ = c.rbuf.split_to(consumed);
        }
        let _ = hist.record(t0.elapsed().as_nanos().max(1) as u64);
        shared.ops.fetch_add(per_frame, Ordering::Relaxed);
        shared.errors.fetch_add(errors, Ordering::Relaxed);
    }
    Ok((hist, c))
}

async fn server_stats(
    access: &Access,
) -> Result<Vec<(String, u64)>, Box<dyn std::error::Error + Send + Sync>> {
    let client = Client::connect(access.client_options()).await?;
    let s = client.stats().await?;
    client.close().await?;
    Ok(s)
}

async fn server_stat(
    access: &Access,
    key: &str,
) -> Result<u64, Box<dyn std::error::Error + Send + Sync>> {
    Ok(server_stats(access)
        .await?
        .into_iter()
        .find(|(k, _)| k == key)
        .map_or(0, |(_, v)| v))
}

/// Logins per second: each connection task connects, logs in, says BYE, again.
async fn login_bench(args: &ThroughputArgs, access: Access) -> AppResult {
    if access.login.is_none() {
        return Err("the login workload needs --user (and PORTSWITCH_PASSWORD)".into());
    }
    let duration = Duration::from_secs_f64(args.duration.max(0.1));
    let deadline = Instant::now() + duration;
    let start = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..args.connections.max(1) {
        let access = access.clone();
        tasks.push(tokio::spawn(async move {
            let mut hist = Histogram::<u64>::new_with_bounds(1, 600_000_000_000, 3)
                .map_err(|e| e.to_string())?;
            while Instant::now() < deadline {
                let t0 = Instant::now();
                let mut c = RawConn::connect(&access).await?;
                let _ = hist.record(t0.elapsed().as_nanos().max(1) as u64);
                c.push(&Request::Bye);
                c.flush().await?;
            }
            Ok::<_, Box<dyn std::error::Error + Send + Sync>>(hist)
        }));
    }
    let mut hist =
        Histogram::<u64>::new_with_bounds(1, 600_000_000_000, 3).map_err(|e| e.to_string())?;
    for t in tasks {
        hist.add(&t.await??).map_err(|e| e.to_string())?;
    }
    let elapsed = start.elapsed().as_secs_f64();
    let report = serde_json::json!({
        "workload": "Login",
        "connections": args.connections,
        "tls": args.ca.is_some(),
        "logins": hist.len(),
        "logins_per_sec": round3(hist.len() as f64 / elapsed),
        "p50_us": round3(hist.value_at_quantile(0.5) as f64 / 1e3),
        "p99_us": round3(hist.value_at_quantile(0.99) as f64 / 1e3),
    });
    if args.json {
        println!("{report}");
    } else {
        println!(
            "login: {} logins/s ({} connections, tls {}), connect+login p50 {} µs, p99 {} µs",
            report["logins_per_sec"],
            args.connections,
            args.ca.is_some(),
            report["p50_us"],
            report["p99_us"]
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// Kill -9 a holder process; time from the kill to the watcher's RELEASED.
async fn kill_holder(args: &KillHolderArgs) -> AppResult {
    let exe = std::env::current_exe()?;
    let watcher = Client::connect(ClientOptions::new(args.addr.clone())).await?;
    let mut hist =
        Histogram::<u64>::new_with_bounds(1, 600_000_000_000, 3).map_err(|e| e.to_string())?;
    for round in 0..args.rounds {
        let name = format!("bench-kill/{}/{round}", std::process::id());
        let mut cmd = tokio::process::Command::new(&exe);
        cmd.args([
            "ctl",
            "--addr",
            &args.addr,
            "--json",
            "--lease-ms",
            &args.lease_ms.to_string(),
            "register",
            &name,
        ])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true);
        if args.end_on_disconnect {
            cmd.arg("--end-on-disconnect");
        }
        let mut child = cmd.spawn()?;
        // Wait until the holder says it owns the port.
        let stdout = child.stdout.take().ok_or("no stdout")?;
        let mut lines = tokio::io::AsyncBufReadExt::lines(tokio::io::BufReader::new(stdout));
        let line = tokio::time::timeout(Duration::from_secs(10), lines.next_line())
            .await
            .map_err(|_| "holder did not register in 10 s")??
            .ok_or("holder exited")?;
        if !line.contains("registered") {
            return Err(format!("holder said: {line}").into());
        }
        let mut events = watcher.events();
        watcher.watch(&name).await?;
        let t0 = Instant::now();
        child.start_kill()?; // SIGKILL
        let timeout = Duration::from_millis(args.lease_ms as u64 * 3 + 5_000);
        let released = tokio::time::timeout(timeout, async {
            loop {
                match events.recv().await {
                    Ok(Event::Released { port, .. }) if port == name.as_bytes() => return Ok(()),
                    Ok(_) => {}
                    Err(e) => return Err(e),
                }
            }
        })
        .await;
        let dt = t0.elapsed();
        let _ = child.wait().await;
        watcher.unwatch(&name).await?;
        match released {
            Ok(Ok(())) => {
                let _ = hist.record(dt.as_micros().max(1) as u64);
            }
            _ => return Err(format!("round {round}: no RELEASED within {timeout:?}").into()),
        }
    }
    watcher.close().await?;
    let q = |p: f64| round3(hist.value_at_quantile(p) as f64 / 1e3);
    let report = serde_json::json!({
        "workload": "KillHolder",
        "rounds": args.rounds,
        "lease_ms": args.lease_ms,
        "end_on_disconnect": args.end_on_disconnect,
        "p50_ms": q(0.5),
        "p99_ms": q(0.99),
        "max_ms": round3(hist.max() as f64 / 1e3),
    });
    if args.json {
        println!("{report}");
    } else {
        println!(
            "kill-holder: {} rounds, lease {} ms, end_on_disconnect {}: release seen p50 {} ms, p99 {} ms, max {} ms after SIGKILL",
            args.rounds, args.lease_ms, args.end_on_disconnect, report["p50_ms"], report["p99_ms"], report["max_ms"]
        );
    }
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(subcommand)]
        command: Top,
    }

    #[derive(Subcommand)]
    enum Top {
        Bench(BenchArgs),
    }

    fn command() -> clap::Command {
        let mut c = BenchArgs::augment_args(clap::Command::new("bench"));
        c.build();
        c
    }

    fn words(line: &str) -> Vec<OsString> {
        line.split(' ').map(OsString::from).collect()
    }

    fn legacy(line: &str) -> (String, Option<String>) {
        let (args, note) = legacy_command_line(words(line));
        let args: Vec<String> = args.into_iter().map(|a| a.into_string().unwrap()).collect();
        (args.join(" "), note)
    }

    fn parse(line: &str) -> Result<Workload, clap::Error> {
        Cli::try_parse_from(words(line)).map(|c| match c.command {
            Top::Bench(b) => b.workload,
        })
    }

    #[test]
    fn the_command_line_is_well_formed() {
        command().debug_assert();
    }

    /// Each workload shows exactly the flags it uses.
    #[test]
    fn every_workload_lists_only_its_own_flags() {
        let common = "addr connections duration pipeline lease-ms json ca server-name user";
        let expected = [
            ("register-unregister", format!("{common} preencoded")),
            ("query", format!("{common} ports")),
            ("send", common.to_string()),
            ("lock-contended", common.replace(" pipeline", "")),
            (
                "fill",
                format!("{} ports hold", common.replace(" duration", "")),
            ),
            ("login", common.replace(" pipeline", "")),
            (
                "kill-holder",
                "addr rounds lease-ms end-on-disconnect json".into(),
            ),
        ];
        let c = command();
        let names: Vec<&str> = c
            .get_subcommands()
            .map(|s| s.get_name())
            .filter(|n| *n != "help")
            .collect();
        assert_eq!(names, expected.iter().map(|(n, _)| *n).collect::<Vec<_>>());
        for (name, flags) in expected {
            let sub = c.find_subcommand(name).unwrap();
            let shown: Vec<&str> = sub
                .get_arguments()
                .filter(|a| !a.is_hide_set() && a.get_id() != "help")
                .filter_map(|a| a.get_long())
                .collect();
            assert_eq!(shown.join(" "), flags, "{name}");
            assert!(sub.get_about().is_some(), "{name} has no help");
        }
    }

    #[test]
    fn defaults_are_those_of_the_flat_form() {
        let Workload::RegisterUnregister(a) = parse("x bench register-unregister").unwrap() else {
            panic!()
        };
        let t = &a.common;
        assert_eq!(t.addr, "127.0.0.1:7400");
        assert_eq!((t.connections, t.pipeline, t.lease_ms), (64, 64, 10_000));
        assert_eq!(t.duration, 10.0);
        assert!(!t.json && !a.preencoded && t.ca.is_none() && t.user.is_none());
        let Workload::Fill(f) = parse("x bench fill").unwrap() else {
            panic!()
        };
        assert_eq!((f.ports, f.hold), (1_000_000, false));
    }

    #[test]
    fn a_flag_of_another_workload_is_refused() {
        assert!(parse("x bench query --preencoded").is_err());
        assert!(parse("x bench kill-holder --connections 8").is_err());
        assert!(parse("x bench register-unregister --preencoded --pipeline 8").is_ok());
    }

    #[test]
    fn workloads_that_moved_to_the_harness_say_where() {
        for line in [
            "x bench failover --rounds 3",
            "x bench --workload wan",
            "x bench --json --workload=hold-sessions",
        ] {
            let why = moved_workload(&words(line)).unwrap();
            assert!(why.contains("portswitch-harness"), "{why}");
        }
        assert_eq!(moved_workload(&words("x bench fill")), None);
        assert_eq!(moved_workload(&words("x ctl failover")), None);
    }

    #[test]
    fn the_new_form_and_other_commands_are_left_alone() {
        for line in [
            "x bench fill --ports 10",
            "x bench help",
            "x bench --help",
            "x bench",
            "x ctl --workload fill",
        ] {
            assert_eq!(legacy(line), (line.to_string(), None));
        }
    }

    #[test]
    fn the_old_form_becomes_a_subcommand_with_a_note() {
        let (line, note) =
            legacy("x bench --addr h:1 --workload register-unregister --pipeline 8 --json");
        assert_eq!(
            line,
            "x bench register-unregister --addr h:1 --pipeline 8 --json"
        );
        let note = note.unwrap();
        assert!(
            note.contains("deprecated") && !note.contains('\n'),
            "{note}"
        );
        assert!(
            note.contains("`portswitch bench register-unregister`"),
            "{note}"
        );
        assert!(parse(&line).is_ok());

        let (line, _) = legacy("x bench --workload=fill --ports 10 --hold");
        assert_eq!(line, "x bench fill --ports 10 --hold");
    }

    /// The old form took every flag for every workload and ignored those a workload
    /// does not use: they are dropped, and named in the note.
    #[test]
    fn the_old_form_drops_flags_the_workload_never_used() {
        let (line, note) = legacy(
            "x bench --addr h:1 --connections 8 --workload kill-holder --rounds=3 --pipeline 4 --json --user u",
        );
        assert_eq!(line, "x bench kill-holder --addr h:1 --rounds=3 --json");
        let note = note.unwrap();
        assert!(
            note.contains("ignoring --connections, --pipeline, --user"),
            "{note}"
        );
        assert!(parse(&line).is_ok());
        // A value that looks like a flag stays with its flag.
        let (line, _) = legacy("x bench --workload login --user --odd --duration 2");
        assert_eq!(line, "x bench login --user --odd --duration 2");
        // --preencoded was refused for other workloads, and still is.
        let (line, _) = legacy("x bench --workload query --preencoded");
        assert!(parse(&line).is_err());
        // Unknown flags and names are clap's to refuse.
        let (line, note) = legacy("x bench --workload nope --frobnicate");
        assert_eq!((line.as_str(), note), ("x bench nope --frobnicate", None));
        assert!(parse(&line).is_err());
    }
}
