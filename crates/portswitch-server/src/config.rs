//! Server settings: where to listen, the core's limits, and the server's own limits.

use std::net::SocketAddr;

/// The default address for clients: loopback only, so a server started without
/// configuration is not reachable from the network.
pub const LISTEN_DEFAULT: &str = "127.0.0.1:7400";
/// The default address for the HTTP metrics and health endpoint.
pub const HTTP_LISTEN_DEFAULT: &str = "127.0.0.1:7401";
/// Default cap on concurrent client connections.
pub const CONNECTIONS_MAX_DEFAULT: usize = 100_000;
/// The most connections a server can be configured for: a connection's slot number
/// takes the low 24 bits of the ids the core sees (channel and generation the rest).
pub const CONNECTIONS_MAX_LIMIT: usize = (1 << 24) - 1;
/// Default bytes a connection may have queued for sending before the server gives up
/// on it as a slow consumer. Bounds server memory per connection whatever the client
/// does; large enough for a burst of replies to a full frame and some events.
pub const SEND_QUEUE_BYTES_MAX_DEFAULT: usize = 8 << 20;
/// How often the server looks for expired leases. Bounds how late an expiry can be.
pub const TICK_MS_DEFAULT: u64 = 5;
/// A gap longer than this between two moments the server held its lock means the
/// server itself stalled (a long operation, the process paused or starved); the
/// excess is not counted against client leases. The ticker takes the lock every
/// `TICK_MS_DEFAULT`, so an idle server never looks stalled. Not counting it only
/// lengthens leases as the server sees them, which is the safe direction: a client's
/// own lease view still runs out on real time, before the server's.
pub const STALL_MS_THRESHOLD: u64 = 50;
const _: () = assert!(STALL_MS_THRESHOLD > 4 * TICK_MS_DEFAULT);

/// Longest a connection's single write may make no progress: a peer that reads
/// nothing for this long while the server has output for it is closed (otherwise a
/// client that stops reading would hold its connection and queued output forever).
pub const WRITE_STALL_MS_MAX_DEFAULT: u64 = 30_000;

/// Default HELLOs a server handles per second (new sessions and resumes alike); more
/// are answered `overloaded` with a time to retry. After a failover every client
/// resumes at once: this keeps the new master responsive (and renewing its lease)
/// while they do. Bursts up to one second's worth pass at once.
pub const HELLO_RATE_MAX_DEFAULT: u32 = 20_000;

/// Default time a connection may stay without a session (no HELLO has succeeded on
/// it: it sends nothing, or stalls in SCRAM) before it is closed with GOAWAY
/// `login_timeout`. Bounds what strangers can hold.
pub const LOGIN_TIMEOUT_MS_DEFAULT: u64 = 10_000;
/// Default largest frame a connection may send before it has a session. HELLO and
/// SCRAM messages are a few hundred bytes, and a multiplexing client opening many
/// sessions at once splits its first HELLOs into frames this size. Without it, every
/// stranger could make the server hold a read buffer of `frame_bytes_max` (1 MiB).
pub const FRAME_BYTES_BEFORE_LOGIN_MAX_DEFAULT: u32 = 64 << 10;

/// How long a graceful shutdown waits for connections to flush.
pub const SHUTDOWN_GRACE_MS: u64 = 2_000;

/// Everything a server needs to start.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub listen: SocketAddr,
    /// HTTP metrics and health; `None` disables it.
    pub http_listen: Option<SocketAddr>,
    pub core: portswitch_core::Config,
    pub connections_max: usize,
    pub send_queue_bytes_max: usize,
    /// See [`WRITE_STALL_MS_MAX_DEFAULT`].
    pub write_stall_ms_max: u64,
    /// See [`HELLO_RATE_MAX_DEFAULT`].
    pub hello_rate_max: u32,
    /// See [`LOGIN_TIMEOUT_MS_DEFAULT`].
    pub login_timeout_ms: u64,
    /// See [`FRAME_BYTES_BEFORE_LOGIN_MAX_DEFAULT`].
    pub frame_bytes_before_login_max: u32,
    pub tick_ms: u64,
    /// The epoch to serve in. `None` takes the current Unix second after waiting for a
    /// fresh one to begin, so a restarted server's tokens are above its predecessor's.
    pub epoch: Option<u64>,
    /// The recovery window after taking over from an earlier master (a restart on the
    /// same data directory). `None`: the longest lease that master could grant, plus
    /// [`crate::group::RECOVERY_MARGIN_PER_MILLE`]. Shorter is unsafe unless no client
    /// asked for a longer lease than this.
    pub recovery_window_ms: Option<u64>,
    /// The longest client lease a new master grants before it durably raises its
    /// ceiling (in `group.json` alone, through Raft in a group): a successor's
    /// recovery window lasts as long as the ceiling, not `lease_ms_max`. A group takes
    /// its members' setting from `cluster`.
    pub lease_ceiling_start_ms: u32,
    /// Users, roles, lockout, password policy, audit log.
    pub auth: crate::auth::AuthConfig,
    /// TLS for client connections; `None` serves plaintext.
    pub tls: Option<crate::tls::TlsSettings>,
    /// Membership of a group of 3 or 5 (Raft-elected master). `None`: this server is
    /// a group by itself. `dir`, `lease_ms_max` and `recovery_window_ms` are filled in
    /// from the data directory and the settings above.
    pub cluster: Option<portswitch_cluster::ClusterConfig>,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            listen: LISTEN_DEFAULT.parse().expect("valid default"),
            http_listen: Some(HTTP_LISTEN_DEFAULT.parse().expect("valid default")),
            core: portswitch_core::Config::default(),
            connections_max: CONNECTIONS_MAX_DEFAULT,
            send_queue_bytes_max: SEND_QUEUE_BYTES_MAX_DEFAULT,
            write_stall_ms_max: WRITE_STALL_MS_MAX_DEFAULT,
            hello_rate_max: HELLO_RATE_MAX_DEFAULT,
            login_timeout_ms: LOGIN_TIMEOUT_MS_DEFAULT,
            frame_bytes_before_login_max: FRAME_BYTES_BEFORE_LOGIN_MAX_DEFAULT,
            tick_ms: TICK_MS_DEFAULT,
            epoch: None,
            recovery_window_ms: None,
            lease_ceiling_start_ms: portswitch_cluster::node::LEASE_CEILING_START_MS_DEFAULT,
            auth: crate::auth::AuthConfig::default(),
            tls: None,
            cluster: None,
        }
    }
}

impl ServerConfig {
    /// A configuration for tests and embedding: ephemeral loopback ports, no waiting
    /// for a fresh epoch.
    pub fn ephemeral() -> Self {
        ServerConfig {
            listen: "127.0.0.1:0".parse().expect("valid"),
            http_listen: Some("127.0.0.1:0".parse().expect("valid")),
            epoch: Some(1),
            ..ServerConfig::default()
        }
    }
}
