//! Owned types the client hands to applications, and its errors.

use bytes::Bytes;
use portswitch_proto::ErrorCode;

/// Errors of the client library.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// Could not reach or talk to the server.
    #[error("i/o error: {0}")]
    Io(#[from] std::io::Error),
    /// The server answered with a typed error.
    #[error("server error {code}: {message}")]
    Server {
        code: ErrorCode,
        /// For people.
        message: String,
        /// When the server said to ask again (`not_master` while a member takes over,
        /// `overloaded`).
        retry_ms: Option<u32>,
        /// The group's master, when a member that is not it named it.
        master: Option<String>,
    },
    /// A request exceeds a limit the server announced; it was not sent.
    #[error("{what} of {len} bytes exceeds the server's limit of {max}")]
    TooLarge {
        what: &'static str,
        len: usize,
        max: usize,
    },
    /// The server sent something this client did not expect.
    #[error("protocol violation: {0}")]
    Protocol(String),
    /// The connection dropped before the reply came; the request may or may not have
    /// taken effect.
    #[error("connection lost; the request's outcome is unknown")]
    ConnectionLost,
    /// The session is over: the lease view ran out, the server expired or refused the
    /// session, or the connection of an end-on-disconnect session dropped. Every port
    /// it held must be considered lost.
    #[error("session lost: {0}")]
    SessionLost(String),
    /// The client was closed.
    #[error("client closed")]
    Closed,
    /// Connecting took longer than `connect_timeout`.
    #[error("timed out connecting to {0}")]
    ConnectTimeout(String),
    /// No connection could be opened to the server: nothing listens there
    /// (connection refused), no route to it, or its name does not resolve.
    #[error("cannot reach {addr}: {}", reach_failure(.source))]
    Unreachable {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    /// A plaintext connection was answered in TLS: the server wants TLS
    /// ([`crate::ClientOptions::tls`]).
    #[error("{addr} speaks TLS: connect with TLS, trusting the CA of its certificate")]
    TlsExpected { addr: String },
    /// A TLS connection was answered in plaintext: the server does not speak TLS.
    #[error("{addr} does not speak TLS (it answered in plaintext): connect without TLS")]
    TlsUnexpected { addr: String },
}

/// Why a connection could not be opened, in the words of the socket error (without
/// the OS error number, which says nothing more).
fn reach_failure(e: &std::io::Error) -> String {
    use std::io::ErrorKind as K;
    match e.kind() {
        K::ConnectionRefused => "connection refused".into(),
        K::TimedOut => "timed out".into(),
        K::HostUnreachable => "no route to host".into(),
        K::NetworkUnreachable => "network unreachable".into(),
        K::AddrNotAvailable => "address not available".into(),
        _ => e.to_string(),
    }
}

impl Error {
    /// A server error without advice.
    pub fn server(code: ErrorCode, message: impl Into<String>) -> Error {
        Error::Server {
            code,
            message: message.into(),
            retry_ms: None,
            master: None,
        }
    }

    /// The error of an ERROR reply, with its advice.
    pub(crate) fn of_reply(code: ErrorCode, message: &[u8], retry_ms: u32, master: &[u8]) -> Error {
        Error::Server {
            code,
            message: String::from_utf8_lossy(message).into_owned(),
            retry_ms: (retry_ms != 0).then_some(retry_ms),
            master: (!master.is_empty()).then(|| String::from_utf8_lossy(master).into_owned()),
        }
    }

    /// The server's error code, if this is a server error.
    pub fn code(&self) -> Option<ErrorCode> {
        match self {
            Error::Server { code, .. } => Some(*code),
            _ => None,
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// The owner of a port, as QUERY and LIST report it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Owner {
    pub port: Bytes,
    pub session: u64,
    pub token: u64,
    pub node: Bytes,
    pub value: Bytes,
}

/// What REGISTER came to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RegisterOutcome {
    /// This session owns the port, with this fencing token.
    Owned { token: u64 },
    /// Another session owns it.
    Taken {
        session: u64,
        token: u64,
        node: Bytes,
    },
    /// Queued at this position (1 = next); [`Event::Acquired`] follows when granted.
    Queued { position: u32 },
}

/// What SEND came to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SendOutcome {
    Delivered,
    NoOwner,
}

/// One page of a listing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Page {
    pub entries: Vec<Owner>,
    /// Pass back to continue; 0 when the listing is complete.
    pub next_cursor: u64,
}

/// Things that happen to a session, delivered on [`crate::Client::events`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// A queued registration was granted.
    Acquired { port: Bytes, token: u64 },
    /// A watched port's owner let go (or died).
    Released { port: Bytes, token: u64 },
    /// A watched port got an owner.
    Claimed {
        port: Bytes,
        session: u64,
        token: u64,
        node: Bytes,
    },
    /// A message relayed by SEND (to a port this session owns) or BROADCAST.
    Message {
        from: u64,
        port: Bytes,
        payload: Bytes,
    },
    /// Events were lost while the session had no connection, or the session moved to
    /// a new master (its watches are re-established): re-read watched state.
    Resync,
    /// The new master's recovery window closed: ports nobody reclaimed are free.
    Recovered,
    /// A port this session owned was not given back by a new master (someone else
    /// holds it, or the master refused the reclaim). Stop acting as its owner; the
    /// session itself goes on.
    PortLost {
        port: Bytes,
        token: u64,
        reason: String,
    },
    /// The connection dropped; the client is trying to resume the session.
    Disconnected,
    /// The session was resumed on a new connection; ports are still held.
    Reconnected,
    /// The session is over. Every port listed (and any other) is no longer owned:
    /// stop acting as its owner now. Emitted before the server could have handed any
    /// of them to someone else (docs/PROTOCOL.md, "The client's lease view").
    OwnershipLost {
        ports: Vec<(Bytes, u64)>,
        reason: String,
    },
}

/// Facts about the session, fixed at HELLO.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SessionInfo {
    pub id: u64,
    /// Lets another connection resume this session (keep it private).
    pub secret: u64,
    pub epoch: u64,
    pub lease_ms: u32,
    pub limits: portswitch_proto::ServerLimits,
}
