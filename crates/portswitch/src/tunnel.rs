//! `portswitch tunnel`: run a tunnel server or client, make keys.
//!
//! ```text
//! portswitch tunnel keygen > tunnel.key
//! portswitch tunnel server --listen 0.0.0.0:7490 --key-file tunnel.key
//! portswitch tunnel client --server host:7490 --key-file tunnel.key \
//!     -L 127.0.0.1:8080:intranet:80 --socks 127.0.0.1:1080
//! ```
//! Without a key, both ends use (and the first one run creates) the key file in the
//! user's configuration directory, so a server and a client on one machine start with
//! no setup.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Subcommand};
use portswitch_tunnel::client::{ClientConfig, ServerSource, TunnelClient};
use portswitch_tunnel::forward::Forward;
use portswitch_tunnel::frame::CompressPolicy;
use portswitch_tunnel::handshake::Psk;
use portswitch_tunnel::limits;
use portswitch_tunnel::server::{Registration, RunningServer, ServerConfig};
use portswitch_tunnel::session::SessionConfig;

use crate::AppResult;

#[derive(Args, Debug)]
pub struct TunnelArgs {
    #[command(subcommand)]
    command: TunnelCommand,
}

#[derive(Subcommand, Debug)]
enum TunnelCommand {
    /// Print a new pre-shared key (give the same key to servers and clients).
    Keygen {
        /// Write it to this file (mode 0600) instead of standard output.
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Run a tunnel server: accepts pool connections and dials the targets clients ask for.
    Server(ServerArgs),
    /// Run a tunnel client: local forwards (-L) and a SOCKS5 listener through the tunnel.
    Client(ClientArgs),
}

#[derive(Args, Debug, Clone)]
struct KeyArgs {
    /// The pre-shared key (`pst1…`, from `tunnel keygen`).
    #[arg(long, env = "PORTSWITCH_TUNNEL_KEY", hide_env_values = true)]
    key: Option<String>,
    /// A file holding the key (default: $XDG_CONFIG_HOME/portswitch/tunnel.key, created
    /// by the server when missing).
    #[arg(long)]
    key_file: Option<PathBuf>,
}

#[derive(Args, Debug, Clone)]
struct Tuning {
    /// Per-stream window at first, bytes: what one stream may have in flight and
    /// buffered.
    #[arg(long, default_value_t = limits::STREAM_WINDOW_BYTES_DEFAULT)]
    stream_window: u64,
    /// What a stream's window grows to (doubling) while its reader keeps up, bytes
    /// (no growth when below --stream-window).
    #[arg(long, default_value_t = limits::STREAM_WINDOW_AUTO_MAX_BYTES_DEFAULT)]
    stream_window_max: u64,
    /// Window of all streams of a session together, bytes.
    #[arg(long, default_value_t = limits::SESSION_WINDOW_BYTES_DEFAULT)]
    session_window: u64,
    /// Streams open at once per session.
    #[arg(long, default_value_t = limits::STREAMS_PER_SESSION_MAX)]
    streams_max: usize,
    /// zstd level of compressed chunks.
    #[arg(long, default_value_t = 3)]
    zstd_level: i32,
    /// Metrics (/metrics) and health (/health) over HTTP.
    #[arg(long)]
    metrics_listen: Option<SocketAddr>,
}

#[derive(Args, Debug)]
struct ServerArgs {
    #[arg(long, default_value = "127.0.0.1:7490")]
    listen: SocketAddr,
    #[command(flatten)]
    key: KeyArgs,
    #[command(flatten)]
    tuning: Tuning,
    /// Register in this port switch (port `tunnel/<name>/<advertise>`) so clients
    /// given `--switch` find this server.
    #[arg(long)]
    switch: Option<String>,
    #[arg(long, default_value = "default")]
    name: String,
    /// The address clients should dial (default: the listening address).
    #[arg(long)]
    advertise: Option<String>,
    /// Rejected connections are read and discarded for this long at most, ms, before
    /// the server closes them (drawn at random below it; default 20-60 s).
    #[arg(long)]
    silent_ms_max: Option<u64>,
}

#[derive(Args, Debug)]
struct ClientArgs {
    /// Tunnel server(s) to dial, in order of preference.
    #[arg(long)]
    server: Vec<String>,
    /// Find servers in this port switch instead (those registered with `--name`).
    #[arg(long)]
    switch: Option<String>,
    #[arg(long, default_value = "default")]
    name: String,
    #[command(flatten)]
    key: KeyArgs,
    /// Forward `[bind:]port:host:hostport[,compress=auto|never]` through the tunnel.
    #[arg(short = 'L', long = "local")]
    forwards: Vec<String>,
    /// A SOCKS5 listener (CONNECT; IPv4, IPv6, names) whose connections go through the tunnel.
    #[arg(long)]
    socks: Option<SocketAddr>,
    /// Pool connections to the server.
    #[arg(long, default_value_t = limits::POOL_CONNECTIONS_DEFAULT)]
    pool: usize,
    /// Compression of forwards without their own policy and of SOCKS: `auto` compresses
    /// what shrinks; `never` for traffic that mixes secrets with attacker-chosen bytes
    /// (docs/TUNNEL.md, "Compression").
    #[arg(long, default_value = "auto")]
    compress: CompressPolicy,
    #[command(flatten)]
    tuning: Tuning,
}

fn default_key_file() -> PathBuf {
    match (
        std::env::var_os("XDG_CONFIG_HOME"),
        std::env::var_os("HOME"),
    ) {
        (Some(x), _) if !x.is_empty() => PathBuf::from(x).join("portswitch/tunnel.key"),
        (_, Some(h)) if !h.is_empty() => PathBuf::from(h).join(".config/portswitch/tunnel.key"),
        _ => PathBuf::from("portswitch-tunnel.key"),
    }
}

fn write_key(path: &std::path::Path, psk: &Psk) -> std::io::Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let mut o = std::fs::OpenOptions::new();
    o.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut o, 0o600);
    std::io::Write::write_all(
        &mut o.open(path)?,
        format!("{}\n", psk.to_text()).as_bytes(),
    )
}

fn load_key(k: &KeyArgs, create: bool) -> Result<Psk, Box<dyn std::error::Error + Send + Sync>> {
    if let Some(text) = &k.key {
        return Ok(Psk::from_text(text)?);
    }
    let path = k.key_file.clone().unwrap_or_else(default_key_file);
    match std::fs::read_to_string(&path) {
        Ok(text) => Ok(Psk::from_text(&text)?),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && create && k.key_file.is_none() => {
            let psk = Psk::generate();
            write_key(&path, &psk)?;
            eprintln!("tunnel: new key in {}", path.display());
            Ok(psk)
        }
        Err(e) => Err(format!("key file {}: {e}", path.display()).into()),
    }
}

fn session_config(t: &Tuning) -> Result<SessionConfig, Box<dyn std::error::Error + Send + Sync>> {
    let mut s = SessionConfig::default();
    if !(limits::STREAM_WINDOW_BYTES_MIN..=limits::STREAM_WINDOW_BYTES_MAX)
        .contains(&t.stream_window)
    {
        return Err(format!(
            "--stream-window must be within {}..={}",
            limits::STREAM_WINDOW_BYTES_MIN,
            limits::STREAM_WINDOW_BYTES_MAX
        )
        .into());
    }
    // A --stream-window above --stream-window-max simply does not grow.
    if t.stream_window_max > limits::STREAM_WINDOW_BYTES_MAX {
        return Err(format!(
            "--stream-window-max must be at most {}",
            limits::STREAM_WINDOW_BYTES_MAX
        )
        .into());
    }
    if t.session_window < t.stream_window || t.session_window > limits::SESSION_WINDOW_BYTES_MAX {
        return Err(format!(
            "--session-window must be at least --stream-window and at most {}",
            limits::SESSION_WINDOW_BYTES_MAX
        )
        .into());
    }
    if t.streams_max == 0 || t.streams_max > limits::STREAMS_PER_SESSION_MAX {
        return Err(format!(
            "--streams-max must be within 1..={}",
            limits::STREAMS_PER_SESSION_MAX
        )
        .into());
    }
    if !(1..=19).contains(&t.zstd_level) {
        return Err("--zstd-level must be within 1..=19".into());
    }
    s.mux.stream_window_bytes = t.stream_window;
    s.mux.stream_window_max_bytes = t.stream_window_max;
    s.mux.session_window_bytes = t.session_window;
    s.mux.streams_max = t.streams_max;
    s.compress_level = t.zstd_level;
    Ok(s)
}

pub async fn run(args: TunnelArgs) -> AppResult {
    match args.command {
        TunnelCommand::Keygen { out } => {
            let psk = Psk::generate();
            match out {
                Some(path) => {
                    write_key(&path, &psk).map_err(|e| format!("{}: {e}", path.display()))?;
                    eprintln!("key written to {}", path.display());
                }
                None => println!("{}", psk.to_text()),
            }
            Ok(ExitCode::SUCCESS)
        }
        TunnelCommand::Server(a) => server(a).await,
        TunnelCommand::Client(a) => client(a).await,
    }
}

async fn server(a: ServerArgs) -> AppResult {
    let psk = load_key(&a.key, true)?;
    let mut cfg = ServerConfig::new(a.listen, psk);
    cfg.session = session_config(&a.tuning)?;
    if let Some(ms) = a.silent_ms_max {
        cfg.silent_ms = (ms / 3).max(1)..=ms.max(1);
    }
    cfg.register = a.switch.clone().map(|switch| Registration {
        switch,
        name: a.name.clone(),
        advertise: a.advertise.clone(),
    });
    let s = RunningServer::start(cfg).await?;
    println!("listening on {}", s.addr);
    if let Some(m) = a.tuning.metrics_listen {
        let bound = portswitch_tunnel::metrics::serve(m, s.metrics.clone()).await?;
        eprintln!("tunnel server: metrics on http://{bound}/metrics");
    }
    if let Some(sw) = &a.switch {
        eprintln!("tunnel server: registered as tunnel/{}/… in {sw}", a.name);
    }
    crate::serve::shutdown_signal().await;
    s.stop().await;
    Ok(ExitCode::SUCCESS)
}

async fn client(a: ClientArgs) -> AppResult {
    let psk = load_key(&a.key, false)?;
    let source = match (&a.switch, a.server.is_empty()) {
        (Some(sw), true) => ServerSource::Switch {
            switch: sw.clone(),
            name: a.name.clone(),
        },
        (None, false) => ServerSource::Direct(a.server.clone()),
        (None, true) => ServerSource::Direct(vec!["127.0.0.1:7490".into()]),
        (Some(_), false) => return Err("give --server or --switch, not both".into()),
    };
    if a.forwards.is_empty() && a.socks.is_none() {
        return Err(
            "nothing to carry: give -L [bind:]port:host:hostport and/or --socks ADDR".into(),
        );
    }
    let forwards: Vec<Forward> = a
        .forwards
        .iter()
        .map(|f| f.parse())
        .collect::<Result<_, _>>()?;
    let mut cfg = ClientConfig::new(psk, source);
    cfg.pool = a.pool;
    cfg.session = session_config(&a.tuning)?;
    let c = TunnelClient::start(cfg).await?;
    if let Some((server, _)) = c.current() {
        eprintln!("tunnel client: connected to {server}");
    }
    for f in forwards {
        let bound = c
            .forward(f.listen, f.target.clone(), f.policy.unwrap_or(a.compress))
            .await
            .map_err(|e| format!("-L {}: {e}", f.listen))?;
        println!("forward {bound} -> {}", f.target);
    }
    if let Some(s) = a.socks {
        let bound = c
            .socks(s, a.compress)
            .await
            .map_err(|e| format!("--socks {s}: {e}"))?;
        println!("socks on {bound}");
    }
    if let Some(m) = a.tuning.metrics_listen {
        let bound = portswitch_tunnel::metrics::serve(m, c.metrics().clone()).await?;
        eprintln!("tunnel client: metrics on http://{bound}/metrics");
    }
    crate::serve::shutdown_signal().await;
    c.stop();
    tokio::time::sleep(Duration::from_millis(50)).await;
    Ok(ExitCode::SUCCESS)
}
