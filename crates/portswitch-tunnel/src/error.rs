//! Typed errors. What a peer, the network or a user can cause is one of these, never a
//! panic.

use std::io;

/// Why a frame, record or hello could not be read, or a session had to end.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TunnelError {
    #[error("i/o: {0}")]
    Io(#[from] io::Error),
    /// A record or hello failed authentication: tampered, truncated, replayed on
    /// another connection, or sealed with another key.
    #[error("authentication failed")]
    Auth,
    /// A hello seen before (or one the replay cache could not check).
    #[error("replayed handshake")]
    Replay,
    /// A hello whose timestamp is too far from our clock.
    #[error("handshake clock skew")]
    ClockSkew,
    #[error("handshake timed out")]
    HandshakeTimeout,
    #[error("handshake: {0}")]
    Noise(String),
    /// A decoded structure broke the wire format.
    #[error("malformed {what}: {why}")]
    Malformed { what: &'static str, why: String },
    /// A peer-declared length beyond its named limit.
    #[error("{what} of {len} bytes exceeds the limit of {max}")]
    TooLong {
        what: &'static str,
        len: usize,
        max: usize,
    },
    /// The peer sent more than it was granted.
    #[error("flow control violated on {what}")]
    FlowControl { what: &'static str },
    /// A named limit was reached on our side.
    #[error("limit reached: {0}")]
    Limit(&'static str),
    #[error("bad key: {0}")]
    Key(String),
    #[error("bad address {addr:?}: {why}")]
    Address { addr: String, why: String },
    #[error("socks: {0}")]
    Socks(String),
    #[error("no tunnel server reachable: {0}")]
    NoServer(String),
    #[error("port switch: {0}")]
    Switch(String),
    #[error("the session is closed")]
    Closed,
}

impl TunnelError {
    pub(crate) fn malformed(what: &'static str, why: impl Into<String>) -> TunnelError {
        TunnelError::Malformed {
            what,
            why: why.into(),
        }
    }
}

pub type Result<T, E = TunnelError> = std::result::Result<T, E>;
