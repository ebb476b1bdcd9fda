//! Settings the core enforces. Every limit is named here with its default; the server
//! fills them from flags, environment and file.

use portswitch_proto::limits;

/// Limits and knobs of one core.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// Longest port name accepted (≤ the protocol's [`limits::PORT_NAME_BYTES_MAX`]).
    pub port_name_bytes_max: u32,
    /// Largest port value accepted.
    pub value_bytes_max: u32,
    /// Largest SEND/BROADCAST payload accepted.
    pub payload_bytes_max: u32,
    /// Ports one session may own plus wait for.
    pub ports_per_session_max: u32,
    /// Ports and prefixes one session may watch.
    pub watches_per_session_max: u32,
    /// Waiters one port's queue may hold.
    pub queue_len_max: u32,
    /// Sessions the core may hold (attached or waiting to be resumed).
    pub sessions_max: u32,
    /// Ports the core may hold across all sessions (owned, or named by a queue or a
    /// watch); past this, new ones are refused `ports_full`. Bounds memory whatever
    /// the per-session limits multiply to (about 70 bytes a port, see
    /// docs/BENCHMARKS.md).
    pub ports_max: u64,
    /// Prefix watches across all sessions (each costs a check on every grant/release).
    pub prefix_watches_max: u32,
    /// Shortest lease a session may ask for.
    pub lease_ms_min: u32,
    /// Longest lease a session may ask for.
    pub lease_ms_max: u32,
    /// Most entries one LIST page may ask for.
    pub list_limit_max: u32,
    /// Most table slots one LIST call examines (bounds the work of a sparse prefix).
    pub list_scan_slots_max: u32,
    /// Most ports one LIST_WHERE evaluates its filter on (within the slots it
    /// examines): with the filter's step budget (`filter::FILTER_STEPS_MAX`) this bounds
    /// the work of one filtered LIST. A page may end short (or empty) with a non-zero
    /// cursor when it is reached.
    pub list_filter_entries_max: u32,
    /// Most prefix watches with a filter across all sessions: each costs an evaluation
    /// of its filter on every grant and release under its prefix.
    pub watch_filters_max: u32,
    /// Most prefix watches with a filter one session may hold (within
    /// `watch_filters_max`), so that one client cannot take every filtered watch.
    pub watch_filters_per_session_max: u32,
    /// Most filter evaluations the LIST_WHEREs of one batch (a frame, or the frames
    /// handled under one lock) may make together, whatever the number of requests:
    /// past it a LIST_WHERE ends its page early (short or empty, non-zero cursor).
    pub filter_evals_per_batch_max: u32,
    /// Payload bytes times recipients one BROADCAST may fan out to.
    pub broadcast_fanout_bytes_max: u64,
    /// Events buffered for a session while it has no connection; past this the buffer
    /// is dropped and the session gets RESYNC when it resumes.
    pub detached_event_bytes_max: u32,
    /// Announced to clients in HELLO_OK; enforced by the server's frame reader.
    pub frame_bytes_max: u32,
    /// Announced to clients in HELLO_OK; enforced by the server's frame reader.
    pub commands_per_frame_max: u32,
    /// Most ports released in one step when a session ends. A session that owns more
    /// is released over several steps (one per timer tick), so that no single session
    /// end holds the server for long; meanwhile its ports still read as owned.
    pub release_step_ports_max: u32,
    /// Channels one connection may carry, each with a session of its own (announced
    /// in HELLO_OK; enforced by the server's frame reader). 1: no multiplexing.
    pub channels_per_connection_max: u32,
}

/// Default channels per connection: a process's sessions share one connection and so
/// one frame per round trip, while one connection's sessions stay few enough that
/// ending them all on disconnect is one short step.
pub const CHANNELS_PER_CONNECTION_MAX_DEFAULT: u32 = 4_096;

/// Default cap on ports across all sessions: 100 million, measured at 6.25 GiB of
/// server memory (docs/BENCHMARKS.md, "100 million ports").
pub const PORTS_MAX_DEFAULT: u64 = 100_000_000;

/// Default shortest lease. Leases this short work at full load; shorter ones would
/// make scheduling hiccups look like deaths.
pub const LEASE_MS_MIN: u32 = 100;
/// Default longest lease (five minutes).
pub const LEASE_MS_MAX: u32 = 300_000;
/// Lease a client gets when it does not ask (the Rust client's default too).
pub const LEASE_MS_DEFAULT: u32 = 10_000;

impl Default for Config {
    fn default() -> Self {
        Config {
            port_name_bytes_max: limits::PORT_NAME_BYTES_MAX as u32,
            value_bytes_max: limits::VALUE_BYTES_MAX as u32,
            payload_bytes_max: limits::PAYLOAD_BYTES_MAX as u32,
            ports_per_session_max: 1_000_000,
            watches_per_session_max: 100_000,
            queue_len_max: 100_000,
            sessions_max: 1_000_000,
            ports_max: PORTS_MAX_DEFAULT,
            prefix_watches_max: 1_024,
            lease_ms_min: LEASE_MS_MIN,
            lease_ms_max: LEASE_MS_MAX,
            list_limit_max: limits::LIST_LIMIT_MAX,
            list_scan_slots_max: 65_536,
            list_filter_entries_max: 256,
            watch_filters_max: 64,
            watch_filters_per_session_max: 8,
            filter_evals_per_batch_max: 4_096,
            broadcast_fanout_bytes_max: 256 << 20,
            detached_event_bytes_max: 1 << 20,
            frame_bytes_max: limits::FRAME_BYTES_MAX as u32,
            commands_per_frame_max: limits::COMMANDS_PER_FRAME_MAX as u32,
            release_step_ports_max: 16_384,
            channels_per_connection_max: CHANNELS_PER_CONNECTION_MAX_DEFAULT,
        }
    }
}

/// Why a configuration cannot be used.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError(pub String);

impl std::fmt::Display for ConfigError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for ConfigError {}

impl Config {
    /// Checks the settings against the protocol's limits and each other.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |s: String| Err(ConfigError(s));
        let within = |name: &str, v: u64, lo: u64, hi: u64| -> Result<(), ConfigError> {
            if v < lo || v > hi {
                return bad(format!("{name} = {v} is outside [{lo}, {hi}]"));
            }
            Ok(())
        };
        within(
            "port_name_bytes_max",
            self.port_name_bytes_max.into(),
            1,
            limits::PORT_NAME_BYTES_MAX as u64,
        )?;
        within(
            "value_bytes_max",
            self.value_bytes_max.into(),
            0,
            limits::VALUE_BYTES_MAX as u64,
        )?;
        within(
            "payload_bytes_max",
            self.payload_bytes_max.into(),
            0,
            limits::PAYLOAD_BYTES_MAX as u64,
        )?;
        within(
            "ports_per_session_max",
            self.ports_per_session_max.into(),
            1,
            u32::MAX as u64 - 1,
        )?;
        within(
            "watches_per_session_max",
            self.watches_per_session_max.into(),
            0,
            u32::MAX as u64 - 1,
        )?;
        within(
            "queue_len_max",
            self.queue_len_max.into(),
            0,
            u32::MAX as u64 - 1,
        )?;
        within(
            "sessions_max",
            self.sessions_max.into(),
            1,
            u32::MAX as u64 - 1,
        )?;
        within("ports_max", self.ports_max, 1, u32::MAX as u64 - 1)?;
        within(
            "lease_ms_min",
            self.lease_ms_min.into(),
            10,
            self.lease_ms_max.into(),
        )?;
        within(
            "lease_ms_max",
            self.lease_ms_max.into(),
            self.lease_ms_min.into(),
            86_400_000,
        )?;
        within(
            "release_step_ports_max",
            self.release_step_ports_max.into(),
            1,
            u32::MAX as u64,
        )?;
        within(
            "list_limit_max",
            self.list_limit_max.into(),
            1,
            limits::LIST_LIMIT_MAX.into(),
        )?;
        within(
            "list_scan_slots_max",
            self.list_scan_slots_max.into(),
            1,
            u32::MAX as u64,
        )?;
        within(
            "list_filter_entries_max",
            self.list_filter_entries_max.into(),
            1,
            u32::MAX as u64,
        )?;
        within(
            "watch_filters_max",
            self.watch_filters_max.into(),
            0,
            u32::MAX as u64,
        )?;
        within(
            "watch_filters_per_session_max",
            self.watch_filters_per_session_max.into(),
            0,
            u32::MAX as u64,
        )?;
        within(
            "filter_evals_per_batch_max",
            self.filter_evals_per_batch_max.into(),
            1,
            u32::MAX as u64,
        )?;
        within(
            "frame_bytes_max",
            self.frame_bytes_max.into(),
            limits::REQUEST_BYTES_MAX.max(limits::EVENT_BYTES_MAX) as u64,
            limits::FRAME_BYTES_MAX as u64,
        )?;
        within(
            "commands_per_frame_max",
            self.commands_per_frame_max.into(),
            1,
            limits::COMMANDS_PER_FRAME_MAX as u64,
        )?;
        within(
            "channels_per_connection_max",
            self.channels_per_connection_max.into(),
            1,
            portswitch_proto::msg::CHANNELS_MAX.into(),
        )?;
        Ok(())
    }
}
