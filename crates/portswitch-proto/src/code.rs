//! Error codes carried by `ERROR` replies and `GOAWAY` events.

/// A typed error code. Unknown codes from a newer peer decode as [`ErrorCode::Other`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ErrorCode {
    /// A frame or message could not be decoded. The connection is closed.
    Malformed,
    /// The opcode is not known to this server. Only this command fails.
    UnknownCommand,
    /// UNREGISTER of a port this session neither owns nor waits for.
    NotOwner,
    /// A command other than HELLO, PING or STATS before HELLO.
    NoSession,
    /// A second HELLO on a connection that already has a session.
    SessionExists,
    /// An empty port name or prefix where one is required.
    EmptyName,
    /// A port name longer than the server's limit.
    NameTooLong,
    /// A value larger than the server's limit.
    ValueTooLarge,
    /// A payload larger than the server's limit.
    PayloadTooLarge,
    /// A frame larger than the server's limit. The connection is closed.
    FrameTooLarge,
    /// More commands in one frame than the server's limit. The connection is closed.
    TooManyCommands,
    /// The session already owns the most ports it may.
    PortsPerSessionMax,
    /// The session already watches the most ports or prefixes it may.
    WatchesPerSessionMax,
    /// The port's wait queue is full.
    QueueFull,
    /// The server holds the most sessions it may.
    SessionsMax,
    /// The server holds the most connections it may. The connection is closed.
    ConnectionsMax,
    /// The requested lease is outside the server's `[min, max]`.
    LeaseOutOfRange,
    /// No protocol version in common.
    VersionUnsupported,
    /// The session to resume is unknown, expired, or the secret does not match.
    ResumeFailed,
    /// A LIST limit of zero or above the server's maximum.
    ListLimit,
    /// The owner of the port exists but has no connection right now (it may resume).
    OwnerUnreachable,
    /// The connection could not keep up with what was sent to it. It is closed.
    SlowConsumer,
    /// The server is shutting down. The connection is closed.
    ShuttingDown,
    /// Credentials were sent but this server has no authentication configured, or the
    /// server requires credentials and none were sent.
    AuthUnavailable,
    /// The server holds the most prefix watches it may.
    PrefixWatchesMax,
    /// A field has a value the command does not accept (unknown flag bits, say).
    InvalidArgument,
    /// The session's lease ran out (sent with GOAWAY to a connection whose session
    /// expired while it stayed connected).
    SessionExpired,
    /// The session's roles do not grant this operation on this name. Only this
    /// request fails.
    PermissionDenied,
    /// Authentication failed: wrong password, unknown user, bad proof, or too many
    /// failed attempts (the same code for all, so answers reveal nothing).
    AuthFailed,
    /// This server requires credentials in HELLO.
    AuthRequired,
    /// A new master is in its recovery window: the port's state is not known until
    /// its owner reclaims it or the window closes (RECOVERED). Retry after the window,
    /// or REGISTER with WAIT to queue for it.
    Recovering,
    /// RECLAIM outside a recovery window, or from a session that was not resumed
    /// from an earlier master, or with a token not from an earlier epoch.
    ReclaimRefused,
    /// This server is not the group's master (a follower, or a master electing or
    /// deposed). The ERROR's `master` field names the master when it knows it, and
    /// `retry_ms` says when to come back while it takes over itself.
    NotMaster,
    /// The server admits at most `hello_rate_max` HELLOs per second (a reconnect
    /// stampede after a failover must not topple the new master). The ERROR's
    /// `retry_ms` field says when to ask again; nothing was done.
    Overloaded,
    /// A CHANNEL switch named a channel at or past the server's
    /// `channels_per_connection_max` (a structural error: the connection closes).
    ChannelsMax,
    /// The server holds the most ports it may (`ports_max`, across all sessions):
    /// only this request fails.
    PortsFull,
    /// The connection stayed without a session for the server's `login_timeout_ms`
    /// (sent with GOAWAY; the connection is closed).
    LoginTimeout,
    /// The session's user was deleted (sent with GOAWAY; the session is over and its
    /// ports are released).
    UserRemoved,
    /// A filter expression (LIST_WHERE, or WATCH with the WHERE flag) that does not
    /// compile: a syntax or type error, an unknown field, or a limit of the query
    /// language exceeded. The message says what and where (`line:column`, with the
    /// offending line and a caret). Only this request fails.
    QueryInvalid,
    /// A code this library does not know.
    Other(u16),
}

impl ErrorCode {
    /// The code's number on the wire.
    pub fn to_u16(self) -> u16 {
        match self {
            ErrorCode::Malformed => 1,
            ErrorCode::UnknownCommand => 2,
            ErrorCode::NotOwner => 3,
            ErrorCode::NoSession => 4,
            ErrorCode::SessionExists => 5,
            ErrorCode::EmptyName => 6,
            ErrorCode::NameTooLong => 7,
            ErrorCode::ValueTooLarge => 8,
            ErrorCode::PayloadTooLarge => 9,
            ErrorCode::FrameTooLarge => 10,
            ErrorCode::TooManyCommands => 11,
            ErrorCode::PortsPerSessionMax => 12,
            ErrorCode::WatchesPerSessionMax => 13,
            ErrorCode::QueueFull => 14,
            ErrorCode::SessionsMax => 15,
            ErrorCode::ConnectionsMax => 16,
            ErrorCode::LeaseOutOfRange => 17,
            ErrorCode::VersionUnsupported => 18,
            ErrorCode::ResumeFailed => 19,
            ErrorCode::ListLimit => 20,
            ErrorCode::OwnerUnreachable => 21,
            ErrorCode::SlowConsumer => 22,
            ErrorCode::ShuttingDown => 23,
            ErrorCode::AuthUnavailable => 24,
            ErrorCode::PrefixWatchesMax => 25,
            ErrorCode::InvalidArgument => 26,
            ErrorCode::SessionExpired => 27,
            ErrorCode::PermissionDenied => 28,
            ErrorCode::AuthFailed => 29,
            ErrorCode::AuthRequired => 30,
            ErrorCode::Recovering => 31,
            ErrorCode::ReclaimRefused => 32,
            ErrorCode::NotMaster => 33,
            ErrorCode::Overloaded => 34,
            ErrorCode::ChannelsMax => 35,
            ErrorCode::PortsFull => 36,
            ErrorCode::LoginTimeout => 37,
            ErrorCode::UserRemoved => 38,
            ErrorCode::QueryInvalid => 39,
            ErrorCode::Other(n) => n,
        }
    }

    /// The code for a number on the wire.
    pub fn from_u16(n: u16) -> ErrorCode {
        match n {
            1 => ErrorCode::Malformed,
            2 => ErrorCode::UnknownCommand,
            3 => ErrorCode::NotOwner,
            4 => ErrorCode::NoSession,
            5 => ErrorCode::SessionExists,
            6 => ErrorCode::EmptyName,
            7 => ErrorCode::NameTooLong,
            8 => ErrorCode::ValueTooLarge,
            9 => ErrorCode::PayloadTooLarge,
            10 => ErrorCode::FrameTooLarge,
            11 => ErrorCode::TooManyCommands,
            12 => ErrorCode::PortsPerSessionMax,
            13 => ErrorCode::WatchesPerSessionMax,
            14 => ErrorCode::QueueFull,
            15 => ErrorCode::SessionsMax,
            16 => ErrorCode::ConnectionsMax,
            17 => ErrorCode::LeaseOutOfRange,
            18 => ErrorCode::VersionUnsupported,
            19 => ErrorCode::ResumeFailed,
            20 => ErrorCode::ListLimit,
            21 => ErrorCode::OwnerUnreachable,
            22 => ErrorCode::SlowConsumer,
            23 => ErrorCode::ShuttingDown,
            24 => ErrorCode::AuthUnavailable,
            25 => ErrorCode::PrefixWatchesMax,
            26 => ErrorCode::InvalidArgument,
            27 => ErrorCode::SessionExpired,
            28 => ErrorCode::PermissionDenied,
            29 => ErrorCode::AuthFailed,
            30 => ErrorCode::AuthRequired,
            31 => ErrorCode::Recovering,
            32 => ErrorCode::ReclaimRefused,
            33 => ErrorCode::NotMaster,
            34 => ErrorCode::Overloaded,
            35 => ErrorCode::ChannelsMax,
            36 => ErrorCode::PortsFull,
            37 => ErrorCode::LoginTimeout,
            38 => ErrorCode::UserRemoved,
            39 => ErrorCode::QueryInvalid,
            n => ErrorCode::Other(n),
        }
    }

    /// A stable lowercase name, for logs, metrics and `--json` output.
    pub fn name(self) -> &'static str {
        match self {
            ErrorCode::Malformed => "malformed",
            ErrorCode::UnknownCommand => "unknown_command",
            ErrorCode::NotOwner => "not_owner",
            ErrorCode::NoSession => "no_session",
            ErrorCode::SessionExists => "session_exists",
            ErrorCode::EmptyName => "empty_name",
            ErrorCode::NameTooLong => "name_too_long",
            ErrorCode::ValueTooLarge => "value_too_large",
            ErrorCode::PayloadTooLarge => "payload_too_large",
            ErrorCode::FrameTooLarge => "frame_too_large",
            ErrorCode::TooManyCommands => "too_many_commands",
            ErrorCode::PortsPerSessionMax => "ports_per_session_max",
            ErrorCode::WatchesPerSessionMax => "watches_per_session_max",
            ErrorCode::QueueFull => "queue_full",
            ErrorCode::SessionsMax => "sessions_max",
            ErrorCode::ConnectionsMax => "connections_max",
            ErrorCode::LeaseOutOfRange => "lease_out_of_range",
            ErrorCode::VersionUnsupported => "version_unsupported",
            ErrorCode::ResumeFailed => "resume_failed",
            ErrorCode::ListLimit => "list_limit",
            ErrorCode::OwnerUnreachable => "owner_unreachable",
            ErrorCode::SlowConsumer => "slow_consumer",
            ErrorCode::ShuttingDown => "shutting_down",
            ErrorCode::AuthUnavailable => "auth_unavailable",
            ErrorCode::PrefixWatchesMax => "prefix_watches_max",
            ErrorCode::InvalidArgument => "invalid_argument",
            ErrorCode::SessionExpired => "session_expired",
            ErrorCode::PermissionDenied => "permission_denied",
            ErrorCode::AuthFailed => "auth_failed",
            ErrorCode::AuthRequired => "auth_required",
            ErrorCode::Recovering => "recovering",
            ErrorCode::ReclaimRefused => "reclaim_refused",
            ErrorCode::NotMaster => "not_master",
            ErrorCode::Overloaded => "overloaded",
            ErrorCode::ChannelsMax => "channels_max",
            ErrorCode::PortsFull => "ports_full",
            ErrorCode::LoginTimeout => "login_timeout",
            ErrorCode::UserRemoved => "user_removed",
            ErrorCode::QueryInvalid => "query_invalid",
            ErrorCode::Other(_) => "other",
        }
    }
}

impl std::fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ErrorCode::Other(n) => write!(f, "error code {n}"),
            code => f.write_str(code.name()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_round_trip() {
        for n in 0..=64u16 {
            assert_eq!(ErrorCode::from_u16(n).to_u16(), n);
        }
    }
}
