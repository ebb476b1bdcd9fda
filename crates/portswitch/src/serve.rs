//! `portswitch serve`: settings from flags, environment and an optional TOML file
//! (in that order of precedence), then run until SIGINT/SIGTERM.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::Args;
use portswitch_server::{Server, ServerConfig};
use serde::Deserialize;

use crate::AppResult;

#[derive(Args, Debug, Default)]
pub struct ServeArgs {
    /// Address for clients, HOST:PORT; a host name is resolved (`localhost` is
    /// 127.0.0.1) [default: 127.0.0.1:7400]
    #[arg(long, env = "PORTSWITCH_LISTEN", value_parser = parse_listen)]
    listen: Option<SocketAddr>,
    /// Address for HTTP /metrics and /health [default: 127.0.0.1:7401]
    #[arg(long, env = "PORTSWITCH_HTTP_LISTEN")]
    http_listen: Option<SocketAddr>,
    /// Do not serve HTTP metrics and health.
    #[arg(long, env = "PORTSWITCH_NO_HTTP")]
    no_http: bool,
    /// A TOML file with any of the settings below (keys as the flags, with `_`).
    #[arg(long, env = "PORTSWITCH_CONFIG")]
    config: Option<PathBuf>,
    /// Most concurrent client connections [default: 100000]
    #[arg(long, env = "PORTSWITCH_CONNECTIONS_MAX")]
    connections_max: Option<usize>,
    /// Bytes queued for one connection before it is dropped as a slow consumer [default: 8388608]
    #[arg(long, env = "PORTSWITCH_SEND_QUEUE_BYTES_MAX")]
    send_queue_bytes_max: Option<usize>,
    /// Close a connection whose peer accepts no bytes for this long while output waits [default: 30000]
    #[arg(long, env = "PORTSWITCH_WRITE_STALL_MS_MAX")]
    write_stall_ms_max: Option<u64>,
    /// HELLOs handled per second (new sessions and resumes); more are told to retry,
    /// so a reconnect stampede after a failover cannot topple the new master [default: 20000]
    #[arg(long, env = "PORTSWITCH_HELLO_RATE_MAX")]
    hello_rate_max: Option<u32>,
    /// After a restart on the same data directory: how long sessions of the earlier
    /// master may resume and reclaim their ports before unreclaimed ports are free
    /// [default: the longest lease the earlier master could grant, plus 10%]
    #[arg(long, env = "PORTSWITCH_RECOVERY_WINDOW_MS")]
    recovery_window_ms: Option<u64>,
    /// This server's id in its group (with --member); without it the server is a
    /// group by itself [default: none]
    #[arg(long, env = "PORTSWITCH_NODE_ID")]
    node_id: Option<u64>,
    /// A member of the group as ID=PEER_ADDR/CLIENT_ADDR; name all of them (1, 3 or
    /// 5), this server included; comma-separated or repeated [default: none]
    #[arg(long = "member", env = "PORTSWITCH_MEMBERS", value_delimiter = ',')]
    members: Vec<String>,
    /// Join a running group instead of forming one: wait to be added with `ctl member
    /// add` on its master (--member then names at least this server)
    #[arg(long, env = "PORTSWITCH_JOIN")]
    join: bool,
    /// Where to accept other members, when that differs from this member's peer
    /// address in --member (behind NAT or a relay) [default: that address]
    #[arg(long, env = "PORTSWITCH_PEER_LISTEN")]
    peer_listen: Option<SocketAddr>,
    /// PEM certificate of this member for peer links (mutual TLS; valid for its peer
    /// address, for server and client use; with --peer-tls-key and --peer-tls-ca)
    #[arg(long, env = "PORTSWITCH_PEER_TLS_CERT")]
    peer_tls_cert: Option<PathBuf>,
    /// PEM private key of --peer-tls-cert
    #[arg(long, env = "PORTSWITCH_PEER_TLS_KEY")]
    peer_tls_key: Option<PathBuf>,
    /// PEM CA that signed every member's peer certificate (use one for peers only:
    /// any holder of a certificate from it can speak Raft to the group)
    #[arg(long, env = "PORTSWITCH_PEER_TLS_CA")]
    peer_tls_ca: Option<PathBuf>,
    /// How long one quorum confirmation lets the master serve, ms [default: 300]
    #[arg(long, env = "PORTSWITCH_MASTER_LEASE_MS")]
    master_lease_ms: Option<u64>,
    /// Longest session lease the first master grants before it raises its ceiling
    /// (recorded in the data directory, or through the group; once, when a client
    /// asks for more). A successor's recovery window covers the ceiling; a later
    /// master starts at its predecessor's ceiling (at most this), and a master lowers
    /// its ceiling to the leases in use once longer ones have been gone for a whole
    /// ceiling, ms [default: 10000]
    #[arg(long, env = "PORTSWITCH_LEASE_CEILING_START_MS")]
    lease_ceiling_start_ms: Option<u32>,
    /// Raft heartbeat interval between members, ms [default: 50]
    #[arg(long, env = "PORTSWITCH_HEARTBEAT_MS")]
    heartbeat_ms: Option<u64>,
    /// Shortest time without a master before a member stands for election, ms [default: 150]
    #[arg(long, env = "PORTSWITCH_ELECTION_TIMEOUT_MS_MIN")]
    election_timeout_ms_min: Option<u64>,
    /// Longest such time (each member picks at random in between), ms [default: 300]
    #[arg(long, env = "PORTSWITCH_ELECTION_TIMEOUT_MS_MAX")]
    election_timeout_ms_max: Option<u64>,
    /// Largest difference in clock rate between members, per mille (the new master
    /// waits the old lease stretched by it) [default: 50]
    #[arg(long, env = "PORTSWITCH_DRIFT_PER_MILLE")]
    drift_per_mille: Option<u64>,
    /// Most sessions [default: 1000000]
    #[arg(long, env = "PORTSWITCH_SESSIONS_MAX")]
    sessions_max: Option<u32>,
    /// Most ports one session may own plus wait for [default: 1000000]
    #[arg(long, env = "PORTSWITCH_PORTS_PER_SESSION_MAX")]
    ports_per_session_max: Option<u32>,
    /// Most ports across all sessions; past it new ones get `ports_full`
    /// [default: 100000000, ~6.3 GiB]
    #[arg(long, env = "PORTSWITCH_PORTS_MAX")]
    ports_max: Option<u64>,
    /// How long a connection may stay without a session (not logged in) before it is
    /// closed, ms [default: 10000]
    #[arg(long, env = "PORTSWITCH_LOGIN_TIMEOUT_MS")]
    login_timeout_ms: Option<u64>,
    /// Largest frame a connection may send before it has a session, bytes
    /// [default: 65536]
    #[arg(long, env = "PORTSWITCH_FRAME_BYTES_BEFORE_LOGIN_MAX")]
    frame_bytes_before_login_max: Option<u32>,
    /// Most watches of one session [default: 100000]
    #[arg(long, env = "PORTSWITCH_WATCHES_PER_SESSION_MAX")]
    watches_per_session_max: Option<u32>,
    /// Most waiters in one port's queue [default: 100000]
    #[arg(long, env = "PORTSWITCH_QUEUE_LEN_MAX")]
    queue_len_max: Option<u32>,
    /// Most prefix watches on the server [default: 1024]
    #[arg(long, env = "PORTSWITCH_PREFIX_WATCHES_MAX")]
    prefix_watches_max: Option<u32>,
    /// Shortest lease a session may ask for, ms [default: 100]
    #[arg(long, env = "PORTSWITCH_LEASE_MS_MIN")]
    lease_ms_min: Option<u32>,
    /// Longest lease a session may ask for, ms [default: 300000]
    #[arg(long, env = "PORTSWITCH_LEASE_MS_MAX")]
    lease_ms_max: Option<u32>,
    /// Longest port name, bytes (at most 256) [default: 256]
    #[arg(long, env = "PORTSWITCH_PORT_NAME_BYTES_MAX")]
    port_name_bytes_max: Option<u32>,
    /// Largest port value, bytes (at most 4096) [default: 4096]
    #[arg(long, env = "PORTSWITCH_VALUE_BYTES_MAX")]
    value_bytes_max: Option<u32>,
    /// Largest SEND/BROADCAST payload, bytes (at most 65536) [default: 65536]
    #[arg(long, env = "PORTSWITCH_PAYLOAD_BYTES_MAX")]
    payload_bytes_max: Option<u32>,
    /// Largest frame, bytes (at most 1048576) [default: 1048576]
    #[arg(long, env = "PORTSWITCH_FRAME_BYTES_MAX")]
    frame_bytes_max: Option<u32>,
    /// Most commands in one frame (at most 16384) [default: 16384]
    #[arg(long, env = "PORTSWITCH_COMMANDS_PER_FRAME_MAX")]
    commands_per_frame_max: Option<u32>,
    /// Channels one connection may carry, each with its own session (at most 65536;
    /// 1 turns multiplexing off) [default: 4096]
    #[arg(long, env = "PORTSWITCH_CHANNELS_PER_CONNECTION_MAX")]
    channels_per_connection_max: Option<u32>,
    /// Log filter (tracing's EnvFilter syntax) [default: info,openraft=off]
    #[arg(long, env = "PORTSWITCH_LOG")]
    log: Option<String>,
    /// Directory for users and roles (auth.json) and the group's state (group.json:
    /// epoch and session keys, so a restarted server adopts its predecessor's sessions).
    /// Without it the server has no users, needs no login, and a restart ends every
    /// session [default: none]
    #[arg(long, env = "PORTSWITCH_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// JSON-lines audit log of logins, lockouts, denials, admin changes [default: none]
    #[arg(long, env = "PORTSWITCH_AUDIT_LOG")]
    audit_log: Option<PathBuf>,
    /// Size at which the audit log rotates (5 old files kept) [default: 67108864]
    #[arg(long, env = "PORTSWITCH_AUDIT_LOG_BYTES_MAX")]
    audit_log_bytes_max: Option<u64>,
    /// Failed logins of a user name in a row before it backs off: each further one
    /// refuses the name for 1 s, doubling to 60 s (0: never). Admins see it with
    /// `ctl lockout list` and end it with `ctl user unlock NAME` [default: 5]
    #[arg(long, env = "PORTSWITCH_LOCKOUT_USER_FAILURES")]
    lockout_user_failures: Option<u32>,
    /// Failed logins from a source address (any names; IPv6 by /64) before each
    /// further one refuses it for --lockout-ms, doubling up to 15 minutes (0: never).
    /// Admins end it with `ctl lockout unlock-addr IP` [default: 20]
    #[arg(long, env = "PORTSWITCH_LOCKOUT_ADDR_FAILURES")]
    lockout_addr_failures: Option<u32>,
    /// The first refusal of a source address after --lockout-addr-failures, ms; each
    /// further failure doubles it, up to 15 minutes [default: 10000]
    #[arg(long, env = "PORTSWITCH_LOCKOUT_MS")]
    lockout_ms: Option<u64>,
    /// Shortest password accepted [default: 12]
    #[arg(long, env = "PORTSWITCH_PASSWORD_LENGTH_MIN")]
    password_length_min: Option<usize>,
    /// Fewest character classes (lower, upper, digit, other) in a password [default: 3]
    #[arg(long, env = "PORTSWITCH_PASSWORD_CLASSES_MIN")]
    password_classes_min: Option<u8>,
    /// PBKDF2 iterations of new password verifiers [default: 16384]
    #[arg(long, env = "PORTSWITCH_SCRAM_ITERATIONS")]
    scram_iterations: Option<u32>,
    /// PEM certificate chain: serve clients over TLS (with --tls-key)
    #[arg(long, env = "PORTSWITCH_TLS_CERT")]
    tls_cert: Option<PathBuf>,
    /// PEM private key of --tls-cert
    #[arg(long, env = "PORTSWITCH_TLS_KEY")]
    tls_key: Option<PathBuf>,
    /// PEM CA of client certificates (mutual TLS; the common name is the user)
    #[arg(long, env = "PORTSWITCH_TLS_CLIENT_CA")]
    tls_client_ca: Option<PathBuf>,
    /// Listen beyond loopback without TLS and authentication. Anyone who can reach
    /// the address can then take, watch and message any port.
    #[arg(long, env = "PORTSWITCH_DANGER_ALLOW_INSECURE_NETWORK")]
    danger_allow_insecure_network: bool,
}

#[derive(Deserialize, Debug, Default)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    #[serde(default, deserialize_with = "listen_in_file")]
    listen: Option<SocketAddr>,
    http_listen: Option<SocketAddr>,
    no_http: Option<bool>,
    connections_max: Option<usize>,
    send_queue_bytes_max: Option<usize>,
    write_stall_ms_max: Option<u64>,
    hello_rate_max: Option<u32>,
    recovery_window_ms: Option<u64>,
    node_id: Option<u64>,
    members: Option<Vec<String>>,
    join: Option<bool>,
    peer_listen: Option<SocketAddr>,
    peer_tls_cert: Option<PathBuf>,
    peer_tls_key: Option<PathBuf>,
    peer_tls_ca: Option<PathBuf>,
    master_lease_ms: Option<u64>,
    lease_ceiling_start_ms: Option<u32>,
    heartbeat_ms: Option<u64>,
    election_timeout_ms_min: Option<u64>,
    election_timeout_ms_max: Option<u64>,
    drift_per_mille: Option<u64>,
    sessions_max: Option<u32>,
    ports_per_session_max: Option<u32>,
    ports_max: Option<u64>,
    login_timeout_ms: Option<u64>,
    frame_bytes_before_login_max: Option<u32>,
    watches_per_session_max: Option<u32>,
    queue_len_max: Option<u32>,
    prefix_watches_max: Option<u32>,
    lease_ms_min: Option<u32>,
    lease_ms_max: Option<u32>,
    port_name_bytes_max: Option<u32>,
    value_bytes_max: Option<u32>,
    payload_bytes_max: Option<u32>,
    frame_bytes_max: Option<u32>,
    commands_per_frame_max: Option<u32>,
    channels_per_connection_max: Option<u32>,
    log: Option<String>,
    data_dir: Option<PathBuf>,
    audit_log: Option<PathBuf>,
    audit_log_bytes_max: Option<u64>,
    lockout_user_failures: Option<u32>,
    lockout_addr_failures: Option<u32>,
    lockout_ms: Option<u64>,
    password_length_min: Option<usize>,
    password_classes_min: Option<u8>,
    scram_iterations: Option<u32>,
    tls_cert: Option<PathBuf>,
    tls_key: Option<PathBuf>,
    tls_client_ca: Option<PathBuf>,
    danger_allow_insecure_network: Option<bool>,
}

/// Builds the server configuration: flag or environment, else file, else default.
fn config(
    args: &ServeArgs,
) -> Result<(ServerConfig, String), Box<dyn std::error::Error + Send + Sync>> {
    let file: FileConfig = match &args.config {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
            toml::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))?
        }
        None => FileConfig::default(),
    };
    let mut cfg = ServerConfig::default();
    macro_rules! pick {
        ($($field:ident => $target:expr),* $(,)?) => {$(
            if let Some(v) = args.$field.clone().or(file.$field.clone()) { $target = v; }
        )*};
    }
    pick! {
        listen => cfg.listen,
        connections_max => cfg.connections_max,
        send_queue_bytes_max => cfg.send_queue_bytes_max,
        write_stall_ms_max => cfg.write_stall_ms_max,
        hello_rate_max => cfg.hello_rate_max,
        sessions_max => cfg.core.sessions_max,
        ports_per_session_max => cfg.core.ports_per_session_max,
        ports_max => cfg.core.ports_max,
        login_timeout_ms => cfg.login_timeout_ms,
        frame_bytes_before_login_max => cfg.frame_bytes_before_login_max,
        watches_per_session_max => cfg.core.watches_per_session_max,
        queue_len_max => cfg.core.queue_len_max,
        prefix_watches_max => cfg.core.prefix_watches_max,
        lease_ms_min => cfg.core.lease_ms_min,
        lease_ms_max => cfg.core.lease_ms_max,
        port_name_bytes_max => cfg.core.port_name_bytes_max,
        value_bytes_max => cfg.core.value_bytes_max,
        payload_bytes_max => cfg.core.payload_bytes_max,
        frame_bytes_max => cfg.core.frame_bytes_max,
        commands_per_frame_max => cfg.core.commands_per_frame_max,
        channels_per_connection_max => cfg.core.channels_per_connection_max,
        audit_log_bytes_max => cfg.auth.audit_log_bytes_max,
        lockout_user_failures => cfg.auth.lockout.user_failures_max,
        lockout_addr_failures => cfg.auth.lockout.addr_failures_max,
        lockout_ms => cfg.auth.lockout.lock_ms,
        password_length_min => cfg.auth.policy.length_min,
        password_classes_min => cfg.auth.policy.classes_min,
        scram_iterations => cfg.auth.iterations,
    }
    cfg.recovery_window_ms = args.recovery_window_ms.or(file.recovery_window_ms);
    if let Some(v) = args.lease_ceiling_start_ms.or(file.lease_ceiling_start_ms) {
        cfg.lease_ceiling_start_ms = v;
    }
    cfg.cluster = cluster_config(args, &file, cfg.core.lease_ms_max)?;
    if let Some(c) = &cfg.cluster {
        let danger =
            args.danger_allow_insecure_network || file.danger_allow_insecure_network == Some(true);
        for (id, m) in &c.members {
            let peer: SocketAddr = m
                .peer_addr
                .parse()
                .map_err(|e| format!("member {id}: peer address {}: {e}", m.peer_addr))?;
            if !peer.ip().is_loopback() && !danger && c.peer_tls.is_none() {
                return Err(format!(
                    "member {id}: peer links beyond loopback need mutual TLS (--peer-tls-cert, \
                     --peer-tls-key, --peer-tls-ca), or a private network and \
                     --danger-allow-insecure-network"
                )
                .into());
            }
        }
        if let Some(l) = c.peer_listen {
            if !l.ip().is_loopback() && !danger && c.peer_tls.is_none() {
                return Err(format!(
                    "--peer-listen {l}: peer links beyond loopback need mutual TLS \
                     (--peer-tls-cert, --peer-tls-key, --peer-tls-ca), or a private network \
                     and --danger-allow-insecure-network"
                )
                .into());
            }
        }
    }
    cfg.auth.data_dir = args.data_dir.clone().or(file.data_dir);
    cfg.auth.audit_log = args.audit_log.clone().or(file.audit_log);
    let iterations =
        portswitch_auth::scram::ITERATIONS_MIN..=portswitch_auth::scram::ITERATIONS_MAX;
    if !iterations.contains(&cfg.auth.iterations) {
        return Err(format!("scram_iterations must be in {iterations:?}").into());
    }
    if cfg.auth.policy.classes_min > 4 {
        return Err("password_classes_min is at most 4".into());
    }
    let cert = args.tls_cert.clone().or(file.tls_cert);
    let key = args.tls_key.clone().or(file.tls_key);
    cfg.tls = match (cert, key) {
        (Some(cert), Some(key)) => Some(portswitch_server::tls::TlsSettings {
            cert,
            key,
            client_ca: args.tls_client_ca.clone().or(file.tls_client_ca),
        }),
        (None, None) => None,
        _ => return Err("--tls-cert and --tls-key go together".into()),
    };
    // A server reachable from the network must encrypt and authenticate, unless the
    // operator says, with a flag that sounds like it, that it need not.
    let danger =
        args.danger_allow_insecure_network || file.danger_allow_insecure_network == Some(true);
    if !cfg.listen.ip().is_loopback()
        && !danger
        && (cfg.tls.is_none() || cfg.auth.data_dir.is_none())
    {
        return Err(format!(
            "refusing to listen on {} without TLS (--tls-cert, --tls-key) and authentication (--data-dir); \
             --danger-allow-insecure-network overrides this",
            cfg.listen
        )
        .into());
    }
    if let Some(v) = args.http_listen.or(file.http_listen) {
        cfg.http_listen = Some(v);
    }
    if args.no_http || file.no_http == Some(true) {
        cfg.http_listen = None;
    }
    // The same rule for the metrics and health endpoint, which has neither TLS nor
    // authentication: loopback only (scrape through a proxy or an SSH tunnel)
    // unless the operator says otherwise.
    if let Some(h) = cfg.http_listen.filter(|h| !h.ip().is_loopback()) {
        if !danger {
            return Err(format!(
                "refusing to serve metrics and health on {h}: the HTTP endpoint has no TLS or \
                 authentication, so it listens on loopback only (put a proxy in front of it); \
                 --danger-allow-insecure-network overrides this"
            )
            .into());
        }
    }
    if cfg.connections_max == 0 || cfg.connections_max > portswitch_server::CONNECTIONS_MAX_LIMIT {
        return Err(format!(
            "connections_max must be in [1, {}]",
            portswitch_server::CONNECTIONS_MAX_LIMIT
        )
        .into());
    }
    if cfg.hello_rate_max == 0 {
        return Err("hello_rate_max must be at least 1".into());
    }
    if cfg.login_timeout_ms == 0 {
        return Err("login_timeout_ms must be at least 1".into());
    }
    let before_login = portswitch_proto::limits::FRAME_BYTES_BEFORE_LOGIN as u32;
    if cfg.frame_bytes_before_login_max < before_login
        || cfg.frame_bytes_before_login_max > cfg.core.frame_bytes_max
    {
        return Err(format!(
            "frame_bytes_before_login_max = {} is outside [{before_login}, frame_bytes_max = {}]",
            cfg.frame_bytes_before_login_max, cfg.core.frame_bytes_max
        )
        .into());
    }
    if cfg.write_stall_ms_max == 0 {
        return Err("write_stall_ms_max must be at least 1".into());
    }
    if cfg.send_queue_bytes_max < cfg.core.frame_bytes_max as usize {
        return Err("send_queue_bytes_max must be at least frame_bytes_max".into());
    }
    cfg.core.validate()?;
    let log = args
        .log
        .clone()
        .or(file.log)
        .unwrap_or_else(|| LOG_DEFAULT.into());
    Ok((cfg, log))
}

/// The default log filter. openraft logs every unreachable peer on every heartbeat at
/// ERROR, which buries everything else while a member is down; `--log
/// info,openraft=warn` shows them.
const LOG_DEFAULT: &str = "info,openraft=off";
/// Descriptors kept for everything but client connections (data files, peers, HTTP).
const DESCRIPTORS_SPARE: u64 = 1024;

pub async fn run(args: ServeArgs) -> AppResult {
    let (cfg, log) = config(&args)?;
    let filter =
        tracing_subscriber::EnvFilter::try_new(&log).map_err(|e| format!("--log {log}: {e}"))?;
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr)
        .init();
    // A broken invariant inside the core must stop the node, not leave it serving
    // from a state nobody can reason about.
    let default_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        default_hook(info);
        std::process::abort();
    }));
    // Every connection is a descriptor: take the soft limit up to the hard one (as
    // most servers do). The default connections_max is sized to what that allows
    // (connections past it are refused with a reason, not left in the accept queue);
    // a connections_max set higher than the limit is worth a warning.
    let mut cfg = cfg;
    let wanted = cfg.connections_max as u64 + DESCRIPTORS_SPARE;
    match rlimit::increase_nofile_limit(wanted) {
        Ok(got) if got < wanted => {
            let fits = (got.saturating_sub(DESCRIPTORS_SPARE) as usize).max(1);
            if cfg.connections_max == portswitch_server::CONNECTIONS_MAX_DEFAULT {
                tracing::info!(
                    descriptors = got,
                    connections_max = fits,
                    "connections_max sized to the descriptor limit (raise `ulimit -Hn` for more)"
                );
                cfg.connections_max = fits;
            } else {
                tracing::warn!(
                    descriptors = got,
                    connections_max = cfg.connections_max,
                    "the descriptor limit is below connections_max + {DESCRIPTORS_SPARE}: connections past it wait in the accept queue (raise `ulimit -Hn`)"
                );
            }
        }
        Ok(_) => {}
        Err(e) => tracing::warn!("cannot read the descriptor limit: {e}"),
    }
    if !cfg.listen.ip().is_loopback() {
        tracing::warn!(listen = %cfg.listen, "listening beyond loopback with no authentication or TLS: anyone who can reach this address can take any port");
    }
    let server = Server::bind(cfg.clone())
        .await
        .map_err(|e| format!("cannot start on {}: {e}", cfg.listen))?;
    tracing::info!(
        listen = %server.local_addr(),
        http = %server.http_addr().map_or("off".to_string(), |a| a.to_string()),
        epoch = server.epoch(),
        "portswitch serving"
    );
    // Print the addresses for scripts that start the server on port 0. Ignore write
    // errors: a closed stdout (`portswitch serve | head -1`) must not stop the server.
    {
        use std::io::Write;
        let mut text = format!("listening on {}\n", server.local_addr());
        if let Some(http) = server.http_addr() {
            text.push_str(&format!("http on {http}\n"));
        }
        let mut stdout = std::io::stdout();
        let _ = stdout
            .write_all(text.as_bytes())
            .and_then(|()| stdout.flush());
    }
    server.run(shutdown_signal()).await?;
    tracing::info!("stopped");
    Ok(std::process::ExitCode::SUCCESS)
}

pub async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(_) => {
                    let _ = ctrl_c.await;
                    return;
                }
            };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = ctrl_c.await;
    }
}

/// Parses `ID=PEER_ADDR/CLIENT_ADDR`.
/// A listen address: an IP address and port, or a host name and port. `localhost`
/// (and any name under `.localhost`, RFC 6761) is 127.0.0.1 without asking a
/// resolver, so it is loopback for the listen-safety rules whatever the resolver
/// says; another name is resolved, preferring IPv4, and the rules apply to the
/// address it resolves to (the one bound).
fn parse_listen(s: &str) -> Result<SocketAddr, String> {
    if let Ok(a) = s.parse::<SocketAddr>() {
        return Ok(a);
    }
    let (host, port) = s
        .rsplit_once(':')
        .ok_or_else(|| format!("{s}: expected HOST:PORT"))?;
    let port: u16 = port
        .parse()
        .map_err(|_| format!("{s}: {port:?} is not a port number"))?;
    let host_lower = host.to_ascii_lowercase();
    if host_lower == "localhost" || host_lower.ends_with(".localhost") {
        return Ok(SocketAddr::from(([127, 0, 0, 1], port)));
    }
    let addrs: Vec<SocketAddr> = std::net::ToSocketAddrs::to_socket_addrs(&(host, port))
        .map_err(|e| format!("{s}: cannot resolve {host}: {e}"))?
        .collect();
    addrs
        .iter()
        .find(|a| a.is_ipv4())
        .or(addrs.first())
        .copied()
        .ok_or_else(|| format!("{s}: {host} resolves to no address"))
}

/// `listen` in the settings file, parsed as `--listen` is.
fn listen_in_file<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<SocketAddr>, D::Error> {
    let s = String::deserialize(d)?;
    parse_listen(&s).map(Some).map_err(serde::de::Error::custom)
}

fn parse_member(s: &str) -> Result<(u64, portswitch_cluster::Member), String> {
    let bad = || format!("--member {s}: expected ID=PEER_ADDR/CLIENT_ADDR");
    let (id, addrs) = s.split_once('=').ok_or_else(bad)?;
    let (peer, client) = addrs.split_once('/').ok_or_else(bad)?;
    let id: u64 = id.trim().parse().map_err(|_| bad())?;
    if id == 0 {
        return Err(format!("--member {s}: ids start at 1"));
    }
    Ok((
        id,
        portswitch_cluster::Member {
            peer_addr: peer.trim().to_string(),
            client_addr: client.trim().to_string(),
        },
    ))
}

/// The group settings, if this server is a member of one.
fn cluster_config(
    args: &ServeArgs,
    file: &FileConfig,
    lease_ms_max: u32,
) -> Result<Option<portswitch_cluster::ClusterConfig>, String> {
    let members = if args.members.is_empty() {
        file.members.clone().unwrap_or_default()
    } else {
        args.members.clone()
    };
    let id = args.node_id.or(file.node_id);
    let id = match (id, members.is_empty()) {
        (None, true) => return Ok(None),
        (Some(id), false) => id,
        _ => return Err("--node-id and --member go together".into()),
    };
    let mut map = std::collections::BTreeMap::new();
    for m in &members {
        let (mid, member) = parse_member(m)?;
        if map.insert(mid, member).is_some() {
            return Err(format!("member {mid} is named twice"));
        }
    }
    let mut c = portswitch_cluster::ClusterConfig::new(id, map, PathBuf::new(), lease_ms_max);
    c.join = args.join || file.join == Some(true);
    c.peer_listen = args.peer_listen.or(file.peer_listen);
    c.peer_tls = match (
        args.peer_tls_cert.clone().or(file.peer_tls_cert.clone()),
        args.peer_tls_key.clone().or(file.peer_tls_key.clone()),
        args.peer_tls_ca.clone().or(file.peer_tls_ca.clone()),
    ) {
        (Some(cert), Some(key), Some(ca)) => {
            Some(portswitch_cluster::PeerTlsSettings { cert, key, ca })
        }
        (None, None, None) => None,
        _ => return Err("--peer-tls-cert, --peer-tls-key and --peer-tls-ca go together".into()),
    };
    if let Some(v) = args.master_lease_ms.or(file.master_lease_ms) {
        c.lease.lease_ms = v;
    }
    if let Some(v) = args.lease_ceiling_start_ms.or(file.lease_ceiling_start_ms) {
        c.lease_ceiling_start_ms = v;
    }
    if let Some(v) = args.drift_per_mille.or(file.drift_per_mille) {
        if v >= 500 {
            return Err("drift_per_mille must be below 500".into());
        }
        c.lease.drift_per_mille = v;
    }
    if let Some(v) = args.heartbeat_ms.or(file.heartbeat_ms) {
        c.heartbeat_ms = v;
    }
    if let Some(v) = args
        .election_timeout_ms_min
        .or(file.election_timeout_ms_min)
    {
        c.election_timeout_ms.0 = v;
    }
    if let Some(v) = args
        .election_timeout_ms_max
        .or(file.election_timeout_ms_max)
    {
        c.election_timeout_ms.1 = v;
    }
    c.validate().map_err(|e| e.to_string())?;
    Ok(Some(c))
}

#[cfg(test)]
mod tests {
    use super::*;
    use portswitch_server::config::{HTTP_LISTEN_DEFAULT, LISTEN_DEFAULT};

    #[test]
    fn defaults_need_no_configuration() {
        let (cfg, log) = config(&ServeArgs::default()).unwrap();
        assert_eq!(cfg.listen.to_string(), LISTEN_DEFAULT);
        assert_eq!(cfg.http_listen.unwrap().to_string(), HTTP_LISTEN_DEFAULT);
        assert!(cfg.listen.ip().is_loopback());
        assert_eq!(log, LOG_DEFAULT);
    }

    #[test]
    fn group_membership_is_checked() {
        let members = |list: &[&str]| list.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let three = members(&[
            "1=127.0.0.1:7500/127.0.0.1:7400",
            "2=127.0.0.1:7501/127.0.0.1:7401",
            "3=127.0.0.1:7502/127.0.0.1:7402",
        ]);
        let args = ServeArgs {
            node_id: Some(2),
            members: three.clone(),
            master_lease_ms: Some(400),
            ..Default::default()
        };
        let (cfg, _) = config(&args).unwrap();
        let c = cfg.cluster.unwrap();
        assert_eq!((c.id, c.members.len(), c.lease.lease_ms), (2, 3, 400));
        assert_eq!(c.members[&3].client_addr, "127.0.0.1:7402");
        let refused = |args: ServeArgs, why: &str| {
            let e = config(&args).unwrap_err().to_string();
            assert!(e.contains(why), "{e} should say {why}");
        };
        refused(
            ServeArgs {
                node_id: Some(4),
                members: three.clone(),
                ..Default::default()
            },
            "not in the member list",
        );
        refused(
            ServeArgs {
                node_id: Some(1),
                members: three[..2].to_vec(),
                ..Default::default()
            },
            "1, 3 or 5",
        );
        refused(
            ServeArgs {
                node_id: Some(1),
                members: members(&["1=127.0.0.1:7500"]),
                ..Default::default()
            },
            "ID=PEER_ADDR/CLIENT_ADDR",
        );
        refused(
            ServeArgs {
                members: three.clone(),
                ..Default::default()
            },
            "go together",
        );
        refused(
            ServeArgs {
                node_id: Some(1),
                members: members(&["1=10.0.0.1:7500/127.0.0.1:7400"]),
                ..Default::default()
            },
            "need mutual TLS",
        );
        refused(
            ServeArgs {
                node_id: Some(1),
                members: members(&["1=10.0.0.1:7500/127.0.0.1:7400"]),
                peer_tls_cert: Some("peer.pem".into()),
                ..Default::default()
            },
            "go together",
        );
        // With peer TLS, peers may be anywhere.
        let (cfg, _) = config(&ServeArgs {
            node_id: Some(1),
            members: members(&["1=10.0.0.1:7500/127.0.0.1:7400"]),
            peer_tls_cert: Some("peer.pem".into()),
            peer_tls_key: Some("peer-key.pem".into()),
            peer_tls_ca: Some("ca.pem".into()),
            ..Default::default()
        })
        .unwrap();
        let tls = cfg.cluster.unwrap().peer_tls.unwrap();
        assert_eq!(tls.ca, std::path::PathBuf::from("ca.pem"));
        refused(
            ServeArgs {
                node_id: Some(1),
                members: three,
                master_lease_ms: Some(60),
                ..Default::default()
            },
            "master_lease_ms",
        );
    }

    #[test]
    fn flags_beat_the_file_and_bad_files_are_refused() {
        let dir = std::env::temp_dir().join(format!("portswitch-cfg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("a.toml");
        std::fs::write(
            &path,
            "listen = \"127.0.0.1:9000\"\nqueue_len_max = 7\nlease_ms_min = 200\n",
        )
        .unwrap();
        let args = ServeArgs {
            config: Some(path.clone()),
            queue_len_max: Some(9),
            ..Default::default()
        };
        let (cfg, _) = config(&args).unwrap();
        assert_eq!(cfg.listen.port(), 9000);
        assert_eq!(cfg.core.queue_len_max, 9);
        assert_eq!(cfg.core.lease_ms_min, 200);
        std::fs::write(&path, "no_such_setting = 1\n").unwrap();
        let err = config(&ServeArgs {
            config: Some(path.clone()),
            ..Default::default()
        })
        .unwrap_err();
        assert!(err.to_string().contains("no_such_setting"), "{err}");
        std::fs::write(&path, "port_name_bytes_max = 100000\n").unwrap();
        let err = config(&ServeArgs {
            config: Some(path),
            ..Default::default()
        })
        .unwrap_err();
        assert!(err.to_string().contains("port_name_bytes_max"), "{err}");
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn listen_takes_host_names_and_localhost_stays_loopback() {
        assert_eq!(
            parse_listen("127.0.0.1:7400").unwrap(),
            "127.0.0.1:7400".parse().unwrap()
        );
        assert_eq!(parse_listen("[::1]:0").unwrap(), "[::1]:0".parse().unwrap());
        for name in ["localhost:7411", "LocalHost:7411", "ps.localhost:7411"] {
            let a = parse_listen(name).unwrap();
            assert!(a.ip().is_loopback() && a.port() == 7411, "{name}: {a}");
        }
        assert!(parse_listen("localhost").unwrap_err().contains("HOST:PORT"));
        assert!(parse_listen("localhost:http").unwrap_err().contains("port"));
        // The listen-safety rules see the address: loopback by name needs no TLS.
        let args = ServeArgs {
            listen: Some(parse_listen("localhost:0").unwrap()),
            ..Default::default()
        };
        assert!(config(&args).unwrap().0.listen.ip().is_loopback());
        // And the settings file takes the same form.
        let dir = std::env::temp_dir().join(format!("portswitch-listen-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("c.toml");
        std::fs::write(&path, "listen = \"localhost:9001\"\n").unwrap();
        let (cfg, _) = config(&ServeArgs {
            config: Some(path),
            ..Default::default()
        })
        .unwrap();
        assert_eq!(cfg.listen, "127.0.0.1:9001".parse().unwrap());
        let _ = std::fs::remove_dir_all(dir);
    }
}
