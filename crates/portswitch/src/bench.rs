//! `portswitch bench`: load against a running server.
//!
//! Throughput workloads drive raw protocol connections (one session each), keeping
//! `--pipeline` requests in flight per connection and batching them into frames the
//! way the client library does; they measure the server, not client-side overhead.
//! Latency is from a request's write to its reply. `kill-holder` measures failure
//! detection with real processes killed by SIGKILL.

use std::io::IsTerminal;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use clap::{Args, ValueEnum};
use hdrhistogram::Histogram;
use portswitch_client::{Client, ClientOptions, Event};
use portswitch_proto::frame::{frame_len, messages};
use portswitch_proto::limits::{COMMANDS_PER_FRAME_MAX, FRAME_BYTES_MAX, PROTOCOL_VERSION};
use portswitch_proto::msg::op;
use portswitch_proto::{FrameBuf, Hello, Reply, Request, ServerMsg};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::AppResult;

#[derive(Copy, Clone, Debug, PartialEq, Eq, ValueEnum)]
pub enum Workload {
    /// REGISTER then UNREGISTER of distinct ports; every request counts.
    RegisterUnregister,
    /// QUERY of owned ports.
    Query,
    /// SEND to a port owned by another connection (relay).
    Send,
    /// Many sessions queueing for few ports; counts handoffs.
    LockContended,
    /// Register --ports ports, then report server memory per port.
    Fill,
    /// Kill -9 a process holding a port; time until watchers hear RELEASED.
    KillHolder,
    /// Connect, log in (SCRAM-SHA-256 with --user), say BYE, again; counts logins.
    Login,
    /// Open --connections sessions and keep them alive with PINGs for --duration
    /// seconds while a fresh client times REGISTER; report server memory per session.
    HoldSessions,
    /// Start a group of three members on loopback, give --connections sessions
    /// --ports ports in all, then SIGKILL the master --rounds times; time until every
    /// session is back with every port on the new master.
    Failover,
    /// Start a group of three members on loopback; --connections sessions contend for
    /// --locks locks (acquire, hold --hold-ms, release) for --duration seconds while
    /// the master suffers --faults (kill: SIGKILL, stop: SIGSTOP for --stop-ms);
    /// checks that no two holders' intervals overlap and tokens rise, and reports
    /// grants per second and how soon grants resume after each fault.
    FailoverLocks,
    /// Needs root. Three members in three network namespaces ("data centres") with
    /// --delay-ms between them through a relay: register-unregister throughput next to
    /// the master and across the WAN, then --rounds times the master's data centre is
    /// cut off; time until --sessions sessions holding --ports ports are back.
    Wan,
}

#[derive(Args, Debug)]
pub struct BenchArgs {
    #[arg(long, default_value = "127.0.0.1:7400")]
    addr: String,
    #[arg(long, value_enum)]
    workload: Workload,
    /// Concurrent connections (one session each).
    #[arg(long, default_value_t = 64)]
    connections: usize,
    /// Seconds to run (throughput workloads).
    #[arg(long, default_value_t = 10.0)]
    duration: f64,
    /// Requests in flight per connection.
    #[arg(long, default_value_t = 64)]
    pipeline: usize,
    /// fill: ports to register in total. query: ports per connection to query.
    #[arg(long, default_value_t = 1_000_000)]
    ports: u64,
    /// Session lease in ms (kill-holder: the holder's lease).
    #[arg(long, default_value_t = 10_000)]
    lease_ms: u32,
    /// kill-holder: rounds; with --end-on-disconnect the holder asks to end on
    /// disconnect, otherwise its lease must run out.
    #[arg(long, default_value_t = 20)]
    rounds: usize,
    #[arg(long)]
    end_on_disconnect: bool,
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
    /// register-unregister only: encode one frame of --pipeline requests once and
    /// send it again and again, so the load generator's own cost per request is a
    /// copy and a header walk and the figure is the server's. Latencies are then per
    /// frame round trip.
    #[arg(long)]
    preencoded: bool,
    /// fill: after the report, keep the sessions (and their ports) until SIGINT or
    /// SIGTERM, so other benchmarks can run against a full server.
    #[arg(long)]
    hold: bool,
    /// hold-sessions: loopback source addresses to spread connections over
    /// (127.0.0.1 upwards); default one per 25,000 connections (the default
    /// ephemeral port range holds about 28,000 per address).
    #[arg(long)]
    source_addrs: Option<usize>,
    /// wan: delay between data centres, ms one way.
    #[arg(long, default_value_t = 30)]
    delay_ms: u64,
    /// wan: sessions holding --ports ports through the failovers.
    #[arg(long, default_value_t = 100)]
    sessions: usize,
    /// wan, failover-locks: a flag for every member's `serve` (repeatable), e.g.
    /// --member-flag=--heartbeat-ms=100
    #[arg(long = "member-flag", allow_hyphen_values = true)]
    member_flags: Vec<String>,
    /// wan: PING an idle session at least this often (default: a third of the lease),
    /// which bounds how long a session takes to notice a silent master.
    #[arg(long)]
    keepalive_ms: Option<u64>,
    /// hold-sessions: connections being opened at once.
    #[arg(long, default_value_t = 256)]
    connect_concurrency: usize,
    /// hold-sessions, failover-locks: sessions per connection, each on a channel of
    /// its own (1: one connection per session, no channels).
    #[arg(long, default_value_t = 1)]
    channels: usize,
    /// failover-locks: locks the sessions contend for.
    #[arg(long, default_value_t = 8)]
    locks: usize,
    /// failover-locks: which lock a session asks for next.
    #[arg(long, value_enum, default_value = "fixed")]
    pick: crate::failover_locks::Pick,
    /// failover-locks: faults applied to the master, evenly spread over the run.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "kill,stop,kill,stop,kill"
    )]
    faults: Vec<crate::failover_locks::Fault>,
    /// failover-locks: how long a SIGSTOP lasts before SIGCONT.
    #[arg(long, default_value_t = 4_000)]
    stop_ms: u64,
    /// failover-locks: seconds before the first fault (a master lowers its lease
    /// ceiling to the leases in use after a whole ceiling of them, 10 s at first).
    #[arg(long, default_value_t = 12.0)]
    warmup_s: f64,
    /// failover-locks: how long a holder keeps a lock before releasing it.
    #[arg(long, default_value_t = 5)]
    hold_ms: u64,
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
    fn from_args(args: &BenchArgs) -> Result<Access, Box<dyn std::error::Error + Send + Sync>> {
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
    if args.workload == Workload::KillHolder {
        return kill_holder(&args).await;
    }
    if args.workload == Workload::Failover {
        return crate::failover::run(crate::failover::FailoverArgs {
            sessions: args.connections,
            ports: args.ports,
            rounds: args.rounds,
            lease_ms: args.lease_ms,
            json: args.json,
        })
        .await;
    }
    if args.workload == Workload::FailoverLocks {
        return crate::failover_locks::run(crate::failover_locks::FailoverLocksArgs {
            sessions: args.connections,
            channels: args.channels,
            locks: args.locks,
            pick: args.pick,
            duration: Duration::from_secs_f64(args.duration.max(1.0)),
            faults: args.faults.clone(),
            stop_ms: args.stop_ms,
            warmup: Duration::from_secs_f64(args.warmup_s.max(0.0)),
            lease_ms: args.lease_ms,
            hold_ms: args.hold_ms,
            member_flags: args.member_flags.clone(),
            json: args.json,
        })
        .await;
    }
    if args.workload == Workload::Wan {
        return crate::wan::run(crate::wan::WanArgs {
            delay_ms: args.delay_ms,
            sessions: args.sessions,
            ports: args.ports,
            rounds: args.rounds,
            lease_ms: args.lease_ms,
            duration: args.duration,
            connections: args.connections,
            pipeline: args.pipeline,
            member_flags: args.member_flags.clone(),
            keepalive_ms: args.keepalive_ms,
            json: args.json,
        })
        .await;
    }
    if args.workload == Workload::HoldSessions {
        return crate::hold::run(crate::hold::HoldArgs {
            addr: args.addr.clone(),
            sessions: args.connections,
            lease_ms: args.lease_ms,
            hold_s: args.duration,
            source_addrs: args.source_addrs.unwrap_or(
                args.connections
                    .div_ceil(args.channels.max(1))
                    .div_ceil(25_000),
            ),
            connect_concurrency: args.connect_concurrency,
            channels: args.channels,
            json: args.json,
        })
        .await;
    }
    if args.connections == 0 || args.pipeline == 0 {
        return Err("--connections and --pipeline must be at least 1".into());
    }
    if args.preencoded && args.workload != Workload::RegisterUnregister {
        return Err("--preencoded applies to register-unregister only".into());
    }
    let access = Access::from_args(&args)?;
    if args.workload == Workload::Login {
        return login_bench(&args, access).await;
    }
    let shared = Arc::new(Shared {
        ops: AtomicU64::new(0),
        errors: AtomicU64::new(0),
        stop: AtomicBool::new(false),
    });
    let duration = Duration::from_secs_f64(args.duration.max(0.1));

    let rss_before = if args.workload == Workload::Fill {
        server_stat(&access, "rss_bytes").await?
    } else {
        0
    };
    let expired_before = server_stat(&access, "sessions_expired_total").await?;

    // Connect and set up every connection before the clock starts.
    let mut conns = Vec::with_capacity(args.connections);
    for i in 0..args.connections {
        let mut c = RawConn::connect(&access).await?;
        setup(&mut c, &args, i).await?;
        conns.push(c);
    }
    let barrier = Arc::new(tokio::sync::Barrier::new(args.connections + 1));
    let mut tasks = Vec::new();
    for (i, c) in conns.into_iter().enumerate() {
        let shared = shared.clone();
        let barrier = barrier.clone();
        let a = (args.workload, args.connections, args.pipeline, args.ports);
        let preencoded = args.preencoded;
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
    let progress = progress_bar(&args, duration);
    if args.workload != Workload::Fill {
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
        "workload": format!("{:?}", args.workload),
        "connections": args.connections,
        "pipeline": args.pipeline,
        "preencoded": args.preencoded,
        "duration_s": round3(elapsed),
        "ops": ops,
        "ops_per_sec": round3(ops as f64 / elapsed),
        "errors": errors,
        "p50_us": round3(hist.value_at_quantile(0.50) as f64 / 1e3),
        "p99_us": round3(hist.value_at_quantile(0.99) as f64 / 1e3),
        "p999_us": round3(hist.value_at_quantile(0.999) as f64 / 1e3),
        "max_us": round3(hist.max() as f64 / 1e3),
    });
    if args.workload == Workload::Fill {
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
    if args.hold {
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

fn progress_bar(args: &BenchArgs, duration: Duration) -> Option<indicatif::ProgressBar> {
    if args.json || !std::io::stderr().is_terminal() || args.workload == Workload::Fill {
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
    args: &BenchArgs,
    i: usize,
) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let mut name = Vec::new();
    match args.workload {
        Workload::Query => {
            let per = args.ports.clamp(1, 1_000_000);
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
        Workload::Send => {
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
    w: Workload,
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
        let stopping =
            shared.stop.load(Ordering::Relaxed) || (w == Workload::Fill && i >= fill_share);
        if stopping && in_flight == 0 && !waiting_grant {
            break;
        }
        // Top up the pipeline.
        if !stopping {
            let now = Instant::now();
            match w {
                Workload::LockContended => {
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
                    while in_flight < pipeline && !(w == Workload::Fill && i >= fill_share) {
                        match w {
                            Workload::RegisterUnregister => {
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
                            Workload::Query => {
                                let other = rng.usize(0..conns);
                                port_name(
                                    &mut name,
                                    "bench-q",
                                    other,
                                    rng.u64(0..ports.clamp(1, 1_000_000)),
                                );
                                c.push(&Request::Query { port: &name });
                            }
                            Workload::Send => {
                                port_name(&mut name, "bench-s", (me + 1) % conns, 0);
                                c.push(&Request::Send {
                                    port: &name,
                                    payload: b"0123456789abcdef",
                                });
                            }
                            Workload::Fill => {
                                port_name(&mut name, "bench-fill", me, i);
                                c.push(&Request::Register {
                                    port: &name,
                                    value: b"",
                                    wait: false,
                                });
                            }
                            Workload::LockContended
                            | Workload::KillHolder
                            | Workload::Login
                            | Workload::HoldSessions
                            | Workload::Failover
                            | Workload::FailoverLocks
                            | Workload::Wan => {
                                unreachable!()
                            }
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
                        Reply::Registered { .. } if w == Workload::LockContended => {
                            unregister = true
                        }
                        _ => {}
                    }
                    if w == Workload::LockContended && !matches!(reply, Reply::Registered { .. }) {
                        return; // the UNREGISTER that hands over; not a handoff itself
                    }
                    done += 1;
                    if let Some(t0) = t0 {
                        let _ = hist.record(t0.elapsed().as_nanos().max(1) as u64);
                    }
                }
                ServerMsg::Event(portswitch_proto::Event::Acquired { .. })
                    if w == Workload::LockContended =>
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
async fn login_bench(args: &BenchArgs, access: Access) -> AppResult {
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
async fn kill_holder(args: &BenchArgs) -> AppResult {
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
