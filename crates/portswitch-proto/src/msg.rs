//! Typed messages and their body codec.
//!
//! Every message on the wire is `opcode: u8, request_id: u32, body_len: u32, body`. The
//! body's layout depends on the opcode and is documented on each variant (and in
//! `docs/PROTOCOL.md`). Integers are big-endian. `b16` is a byte string with a `u16`
//! length in front, `b32` one with a `u32` length. Bytes after the fields a decoder
//! knows are ignored, so later versions may append fields.
//!
//! Decoded messages borrow from the frame they came in: no allocation per message.

use bytes::BufMut;

use crate::code::ErrorCode;
use crate::limits::*;

/// Opcodes of client requests.
pub mod op {
    pub const HELLO: u8 = 0x01;
    pub const PING: u8 = 0x02;
    pub const REGISTER: u8 = 0x03;
    pub const UNREGISTER: u8 = 0x04;
    pub const QUERY: u8 = 0x05;
    pub const WATCH: u8 = 0x06;
    pub const UNWATCH: u8 = 0x07;
    pub const SEND: u8 = 0x08;
    pub const BROADCAST: u8 = 0x09;
    pub const LIST: u8 = 0x0A;
    pub const BYE: u8 = 0x0B;
    pub const STATS: u8 = 0x0C;
    pub const AUTH: u8 = 0x0D;
    pub const ADMIN: u8 = 0x0E;
    pub const RECLAIM: u8 = 0x0F;
    /// Not a request: a switch, in either direction, of the channel the messages that
    /// follow on the connection belong to. Its request-id field holds the channel
    /// number; its body is empty. See [`crate::msg::CHANNELS_MAX`].
    pub const CHANNEL: u8 = 0x10;
    /// LIST with a filter expression (a new opcode rather than a field appended to
    /// LIST: a server that predates filters must refuse it, `unknown_command`, not
    /// ignore the filter and list everything).
    pub const LIST_WHERE: u8 = 0x11;

    pub const HELLO_OK: u8 = 0x81;
    pub const OK: u8 = 0x82;
    pub const REGISTERED: u8 = 0x83;
    pub const TAKEN: u8 = 0x84;
    pub const QUEUED: u8 = 0x85;
    pub const OWNER: u8 = 0x86;
    pub const FREE: u8 = 0x87;
    pub const WATCHING: u8 = 0x88;
    pub const DELIVERED: u8 = 0x89;
    pub const NO_OWNER: u8 = 0x8A;
    pub const COUNT: u8 = 0x8B;
    pub const PAGE: u8 = 0x8C;
    pub const STATS_REPLY: u8 = 0x8D;
    pub const ERROR: u8 = 0x8F;
    pub const AUTH_CONTINUE: u8 = 0x90;
    pub const ADMIN_OK: u8 = 0x91;

    pub const ACQUIRED: u8 = 0xC1;
    pub const RELEASED: u8 = 0xC2;
    pub const CLAIMED: u8 = 0xC3;
    pub const MESSAGE: u8 = 0xC4;
    pub const GOAWAY: u8 = 0xC5;
    pub const RESYNC: u8 = 0xC6;
    pub const RECOVERED: u8 = 0xC7;
}

/// HELLO flag: end the session the moment its connection closes without BYE.
pub const HELLO_END_ON_DISCONNECT: u8 = 0x01;
/// Most channels the protocol can address on one connection (a channel number is
/// below this). A server announces its own, smaller limit in HELLO_OK.
pub const CHANNELS_MAX: u32 = 1 << 16;
/// REGISTER flag: if the port is taken, join its FIFO wait queue.
pub const REGISTER_WAIT: u8 = 0x01;
/// WATCH / UNWATCH / BROADCAST flag: the name is a prefix.
pub const PREFIX: u8 = 0x01;
/// WATCH flag (with [`PREFIX`] only): a filter expression `b16` follows the name, and
/// only events it selects are delivered. A server that predates filters refuses the
/// unknown bit (`invalid_argument`) rather than deliver everything.
pub const WATCH_WHERE: u8 = 0x02;

/// Why a message body could not be decoded. The message's framing was intact, so only
/// this request fails (with [`BodyError::code`]); the connection carries on.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{code}: {detail}")]
pub struct BodyError {
    pub code: ErrorCode,
    pub detail: &'static str,
}

fn body_err(code: ErrorCode, detail: &'static str) -> BodyError {
    BodyError { code, detail }
}

/// Reads fields from a message body, checking every length against what remains and
/// against the field's limit before handing out a slice.
#[derive(Debug, Clone)]
pub struct Reader<'a> {
    buf: &'a [u8],
}

impl<'a> Reader<'a> {
    pub fn new(buf: &'a [u8]) -> Self {
        Reader { buf }
    }
    pub fn remaining(&self) -> usize {
        self.buf.len()
    }
    fn take(&mut self, n: usize, what: &'static str) -> Result<&'a [u8], BodyError> {
        if self.buf.len() < n {
            return Err(body_err(ErrorCode::Malformed, what));
        }
        let (head, tail) = self.buf.split_at(n);
        self.buf = tail;
        Ok(head)
    }
    pub fn u8(&mut self, what: &'static str) -> Result<u8, BodyError> {
        Ok(self.take(1, what)?[0])
    }
    pub fn u16(&mut self, what: &'static str) -> Result<u16, BodyError> {
        let b = self.take(2, what)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }
    pub fn u32(&mut self, what: &'static str) -> Result<u32, BodyError> {
        let b = self.take(4, what)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }
    pub fn u64(&mut self, what: &'static str) -> Result<u64, BodyError> {
        let b = self.take(8, what)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(u64::from_be_bytes(a))
    }
    /// A `b16` string of at most `max` bytes; longer ones fail with `too_long`.
    pub fn b16(
        &mut self,
        max: usize,
        too_long: ErrorCode,
        what: &'static str,
    ) -> Result<&'a [u8], BodyError> {
        let n = self.u16(what)? as usize;
        if n > max {
            return Err(body_err(too_long, what));
        }
        self.take(n, what)
    }
    /// A `b32` string of at most `max` bytes; longer ones fail with `too_long`.
    pub fn b32(
        &mut self,
        max: usize,
        too_long: ErrorCode,
        what: &'static str,
    ) -> Result<&'a [u8], BodyError> {
        let n = self.u32(what)? as usize;
        if n > max {
            return Err(body_err(too_long, what));
        }
        self.take(n, what)
    }
}

fn check_flags(flags: u8, known: u8) -> Result<u8, BodyError> {
    if flags & !known != 0 {
        return Err(body_err(ErrorCode::InvalidArgument, "unknown flag bits"));
    }
    Ok(flags)
}

/// HELLO: opens (or resumes) a session on this connection.
///
/// Body: `version_min u16, version_max u16, features u64, lease_ms u32, flags u8,
/// node_name b16, credentials b16, resume_session u64, resume_secret u64`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Hello<'a> {
    pub version_min: u16,
    pub version_max: u16,
    /// Feature bits the client understands. None are defined in version 1.
    pub features: u64,
    pub lease_ms: u32,
    /// End the session when the connection closes without BYE.
    pub end_on_disconnect: bool,
    pub node_name: &'a [u8],
    /// Reserved for authentication; must be empty on a server without it.
    pub credentials: &'a [u8],
    /// Session id to resume, or 0 for a new session.
    pub resume_session: u64,
    /// The secret `HELLO_OK` gave for that session.
    pub resume_secret: u64,
}

/// A client request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Request<'a> {
    Hello(Hello<'a>),
    /// Body: empty. Any frame renews the lease; PING is for when there is nothing else.
    Ping,
    /// Body: `flags u8, port b16, value b16`.
    Register {
        port: &'a [u8],
        value: &'a [u8],
        wait: bool,
    },
    /// Body: `port b16`.
    Unregister {
        port: &'a [u8],
    },
    /// Body: `port b16`.
    Query {
        port: &'a [u8],
    },
    /// Body: `flags u8, name b16`.
    Watch {
        name: &'a [u8],
        prefix: bool,
    },
    /// WATCH of a prefix with a filter: body `flags u8 (PREFIX | WATCH_WHERE), prefix
    /// b16, filter b16`. Only events the filter selects are delivered.
    WatchWhere {
        prefix: &'a [u8],
        filter: &'a [u8],
    },
    /// Body: `flags u8, name b16`.
    Unwatch {
        name: &'a [u8],
        prefix: bool,
    },
    /// Body: `port b16, payload b32`.
    Send {
        port: &'a [u8],
        payload: &'a [u8],
    },
    /// Body: `flags u8, prefix b16, payload b32`. Without the PREFIX flag it goes to every
    /// session but the sender.
    Broadcast {
        prefix: Option<&'a [u8]>,
        payload: &'a [u8],
    },
    /// Body: `prefix b16, cursor u64, limit u32`.
    List {
        prefix: &'a [u8],
        cursor: u64,
        limit: u32,
    },
    /// LIST_WHERE: body `prefix b16, cursor u64, limit u32, filter b16`. Answered with
    /// PAGE like LIST, holding only the ports the filter selects.
    ListWhere {
        prefix: &'a [u8],
        cursor: u64,
        limit: u32,
        filter: &'a [u8],
    },
    /// Body: empty.
    Bye,
    /// Body: empty.
    Stats,
    /// Body: `data b16`. The second client message of an authentication exchange
    /// started by HELLO (for SCRAM-SHA-256, the client-final-message).
    Auth {
        data: &'a [u8],
    },
    /// Body: `command b32`. A user/role management command as a JSON object (see
    /// docs/PROTOCOL.md); needs the admin permission.
    Admin {
        command: &'a [u8],
    },
    /// Body: `port b16, token u64, value b16`. During a new master's recovery window, a
    /// session resumed from an earlier master takes back a port it owned there, keeping
    /// the grant's token.
    Reclaim {
        port: &'a [u8],
        token: u64,
        value: &'a [u8],
    },
}

impl<'a> Request<'a> {
    /// The request's opcode.
    pub fn opcode(&self) -> u8 {
        match self {
            Request::Hello(_) => op::HELLO,
            Request::Ping => op::PING,
            Request::Register { .. } => op::REGISTER,
            Request::Unregister { .. } => op::UNREGISTER,
            Request::Query { .. } => op::QUERY,
            Request::Watch { .. } | Request::WatchWhere { .. } => op::WATCH,
            Request::Unwatch { .. } => op::UNWATCH,
            Request::Send { .. } => op::SEND,
            Request::Broadcast { .. } => op::BROADCAST,
            Request::List { .. } => op::LIST,
            Request::ListWhere { .. } => op::LIST_WHERE,
            Request::Bye => op::BYE,
            Request::Stats => op::STATS,
            Request::Auth { .. } => op::AUTH,
            Request::Admin { .. } => op::ADMIN,
            Request::Reclaim { .. } => op::RECLAIM,
        }
    }

    /// Decodes a request body. Lengths are checked against the protocol's limits;
    /// a server applies its own (possibly lower) limits afterwards.
    pub fn decode(opcode: u8, body: &'a [u8]) -> Result<Request<'a>, BodyError> {
        use ErrorCode::*;
        let mut r = Reader::new(body);
        let port = |r: &mut Reader<'a>| r.b16(PORT_NAME_BYTES_MAX, NameTooLong, "port name");
        let filter = |r: &mut Reader<'a>| r.b16(QUERY_BYTES_MAX, QueryInvalid, "filter");
        Ok(match opcode {
            op::HELLO => {
                let version_min = r.u16("version_min")?;
                let version_max = r.u16("version_max")?;
                let features = r.u64("features")?;
                let lease_ms = r.u32("lease_ms")?;
                let flags = check_flags(r.u8("flags")?, HELLO_END_ON_DISCONNECT)?;
                let node_name = r.b16(NODE_NAME_BYTES_MAX, NameTooLong, "node name")?;
                let credentials = r.b16(CREDENTIALS_BYTES_MAX, InvalidArgument, "credentials")?;
                let resume_session = r.u64("resume_session")?;
                let resume_secret = r.u64("resume_secret")?;
                Request::Hello(Hello {
                    version_min,
                    version_max,
                    features,
                    lease_ms,
                    end_on_disconnect: flags & HELLO_END_ON_DISCONNECT != 0,
                    node_name,
                    credentials,
                    resume_session,
                    resume_secret,
                })
            }
            op::PING => Request::Ping,
            op::REGISTER => {
                let flags = check_flags(r.u8("flags")?, REGISTER_WAIT)?;
                let port = port(&mut r)?;
                let value = r.b16(VALUE_BYTES_MAX, ValueTooLarge, "value")?;
                Request::Register {
                    port,
                    value,
                    wait: flags & REGISTER_WAIT != 0,
                }
            }
            op::UNREGISTER => Request::Unregister {
                port: port(&mut r)?,
            },
            op::QUERY => Request::Query {
                port: port(&mut r)?,
            },
            op::WATCH | op::UNWATCH => {
                let known = if opcode == op::WATCH {
                    PREFIX | WATCH_WHERE
                } else {
                    PREFIX
                };
                let flags = check_flags(r.u8("flags")?, known)?;
                let name = port(&mut r)?;
                let prefix = flags & PREFIX != 0;
                if flags & WATCH_WHERE != 0 {
                    if !prefix {
                        return Err(body_err(
                            InvalidArgument,
                            "WATCH_WHERE needs the PREFIX flag",
                        ));
                    }
                    Request::WatchWhere {
                        prefix: name,
                        filter: filter(&mut r)?,
                    }
                } else if opcode == op::WATCH {
                    Request::Watch { name, prefix }
                } else {
                    Request::Unwatch { name, prefix }
                }
            }
            op::SEND => {
                let port = port(&mut r)?;
                let payload = r.b32(PAYLOAD_BYTES_MAX, PayloadTooLarge, "payload")?;
                Request::Send { port, payload }
            }
            op::BROADCAST => {
                let flags = check_flags(r.u8("flags")?, PREFIX)?;
                let prefix = port(&mut r)?;
                let payload = r.b32(PAYLOAD_BYTES_MAX, PayloadTooLarge, "payload")?;
                Request::Broadcast {
                    prefix: (flags & PREFIX != 0).then_some(prefix),
                    payload,
                }
            }
            op::LIST => {
                let prefix = port(&mut r)?;
                let cursor = r.u64("cursor")?;
                let limit = r.u32("limit")?;
                Request::List {
                    prefix,
                    cursor,
                    limit,
                }
            }
            op::LIST_WHERE => {
                let prefix = port(&mut r)?;
                let cursor = r.u64("cursor")?;
                let limit = r.u32("limit")?;
                Request::ListWhere {
                    prefix,
                    cursor,
                    limit,
                    filter: filter(&mut r)?,
                }
            }
            op::BYE => Request::Bye,
            op::STATS => Request::Stats,
            op::AUTH => Request::Auth {
                data: r.b16(AUTH_DATA_BYTES_MAX, InvalidArgument, "auth data")?,
            },
            op::ADMIN => Request::Admin {
                command: r.b32(ADMIN_BYTES_MAX, InvalidArgument, "admin command")?,
            },
            op::RECLAIM => Request::Reclaim {
                port: port(&mut r)?,
                token: r.u64("token")?,
                value: r.b16(VALUE_BYTES_MAX, ValueTooLarge, "value")?,
            },
            _ => return Err(body_err(UnknownCommand, "unknown opcode")),
        })
    }

    /// Bytes of the encoded body.
    pub fn body_len(&self) -> usize {
        match self {
            Request::Hello(h) => {
                2 + 2 + 8 + 4 + 1 + 2 + h.node_name.len() + 2 + h.credentials.len() + 16
            }
            Request::Ping | Request::Bye | Request::Stats => 0,
            Request::Register { port, value, .. } => 1 + 2 + port.len() + 2 + value.len(),
            Request::Unregister { port } | Request::Query { port } => 2 + port.len(),
            Request::Watch { name, .. } | Request::Unwatch { name, .. } => 1 + 2 + name.len(),
            Request::WatchWhere { prefix, filter } => 1 + 2 + prefix.len() + 2 + filter.len(),
            Request::Send { port, payload } => 2 + port.len() + 4 + payload.len(),
            Request::Broadcast { prefix, payload } => {
                1 + 2 + prefix.map_or(0, |p| p.len()) + 4 + payload.len()
            }
            Request::List { prefix, .. } => 2 + prefix.len() + 8 + 4,
            Request::ListWhere { prefix, filter, .. } => {
                2 + prefix.len() + 8 + 4 + 2 + filter.len()
            }
            Request::Auth { data } => 2 + data.len(),
            Request::Admin { command } => 4 + command.len(),
            Request::Reclaim { port, value, .. } => 2 + port.len() + 8 + 2 + value.len(),
        }
    }

    /// Appends the encoded body. The caller has checked lengths against the limits
    /// (encoding a field longer than its length prefix can say would corrupt the frame,
    /// so that is asserted).
    pub fn encode_body(&self, b: &mut impl BufMut) {
        match *self {
            Request::Hello(h) => {
                b.put_u16(h.version_min);
                b.put_u16(h.version_max);
                b.put_u64(h.features);
                b.put_u32(h.lease_ms);
                b.put_u8(if h.end_on_disconnect {
                    HELLO_END_ON_DISCONNECT
                } else {
                    0
                });
                put_b16(b, h.node_name);
                put_b16(b, h.credentials);
                b.put_u64(h.resume_session);
                b.put_u64(h.resume_secret);
            }
            Request::Ping | Request::Bye | Request::Stats => {}
            Request::Register { port, value, wait } => {
                b.put_u8(if wait { REGISTER_WAIT } else { 0 });
                put_b16(b, port);
                put_b16(b, value);
            }
            Request::Unregister { port } | Request::Query { port } => put_b16(b, port),
            Request::Watch { name, prefix } | Request::Unwatch { name, prefix } => {
                b.put_u8(if prefix { PREFIX } else { 0 });
                put_b16(b, name);
            }
            Request::WatchWhere { prefix, filter } => {
                b.put_u8(PREFIX | WATCH_WHERE);
                put_b16(b, prefix);
                put_b16(b, filter);
            }
            Request::Send { port, payload } => {
                put_b16(b, port);
                put_b32(b, payload);
            }
            Request::Broadcast { prefix, payload } => {
                b.put_u8(if prefix.is_some() { PREFIX } else { 0 });
                put_b16(b, prefix.unwrap_or(&[]));
                put_b32(b, payload);
            }
            Request::List {
                prefix,
                cursor,
                limit,
            } => {
                put_b16(b, prefix);
                b.put_u64(cursor);
                b.put_u32(limit);
            }
            Request::ListWhere {
                prefix,
                cursor,
                limit,
                filter,
            } => {
                put_b16(b, prefix);
                b.put_u64(cursor);
                b.put_u32(limit);
                put_b16(b, filter);
            }
            Request::Auth { data } => put_b16(b, data),
            Request::Admin { command } => put_b32(b, command),
            Request::Reclaim { port, token, value } => {
                put_b16(b, port);
                b.put_u64(token);
                put_b16(b, value);
            }
        }
    }
}

/// The limits a server enforces, announced in `HELLO_OK` (all `u32`, in this order).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ServerLimits {
    pub frame_bytes_max: u32,
    pub commands_per_frame_max: u32,
    pub port_name_bytes_max: u32,
    pub value_bytes_max: u32,
    pub payload_bytes_max: u32,
    pub ports_per_session_max: u32,
    pub watches_per_session_max: u32,
    pub queue_len_max: u32,
    pub list_limit_max: u32,
    pub lease_ms_min: u32,
    pub lease_ms_max: u32,
}

impl ServerLimits {
    const FIELDS: usize = 11;
    fn encode(&self, b: &mut impl BufMut) {
        for v in [
            self.frame_bytes_max,
            self.commands_per_frame_max,
            self.port_name_bytes_max,
            self.value_bytes_max,
            self.payload_bytes_max,
            self.ports_per_session_max,
            self.watches_per_session_max,
            self.queue_len_max,
            self.list_limit_max,
            self.lease_ms_min,
            self.lease_ms_max,
        ] {
            b.put_u32(v);
        }
    }
    fn decode(r: &mut Reader<'_>) -> Result<Self, BodyError> {
        Ok(ServerLimits {
            frame_bytes_max: r.u32("limits")?,
            commands_per_frame_max: r.u32("limits")?,
            port_name_bytes_max: r.u32("limits")?,
            value_bytes_max: r.u32("limits")?,
            payload_bytes_max: r.u32("limits")?,
            ports_per_session_max: r.u32("limits")?,
            watches_per_session_max: r.u32("limits")?,
            queue_len_max: r.u32("limits")?,
            list_limit_max: r.u32("limits")?,
            lease_ms_min: r.u32("limits")?,
            lease_ms_max: r.u32("limits")?,
        })
    }
}

/// HELLO_OK. Body: `version u16, features u64, session u64, secret u64, epoch u64,
/// lease_ms u32, resumed u8, limits (11 × u32), auth b16`. `auth` (the server's final
/// authentication message, empty without authentication) may be absent: a decoder
/// reads it as empty.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HelloOk<'a> {
    pub version: u16,
    pub features: u64,
    pub session: u64,
    /// Proves ownership of the session when resuming it on another connection.
    pub secret: u64,
    pub epoch: u64,
    /// The lease granted (the requested one; the server refuses out-of-range leases).
    pub lease_ms: u32,
    /// Whether this HELLO resumed an existing session.
    pub resumed: bool,
    pub limits: ServerLimits,
    /// For SCRAM-SHA-256, the server-final-message (`v=` signature): the client checks
    /// it to know the server holds its verifier.
    pub auth: &'a [u8],
    /// Milliseconds left of this master's recovery window (0: not recovering). While
    /// it runs, only ports their owners reclaimed are known; RECOVERED follows when it
    /// closes. May be absent on the wire: read it as 0.
    pub recovery_ms: u32,
    /// How many channels this server lets one connection carry (channel numbers
    /// `0..channels_max`); 0 or 1: it does not multiplex sessions. May be absent on
    /// the wire: read it as 0.
    pub channels_max: u32,
}

/// A reply to one request, matched to it by request id.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reply<'a> {
    HelloOk(HelloOk<'a>),
    /// Body: empty. PING, UNREGISTER, UNWATCH, BYE.
    Ok,
    /// Body: `token u64`. The port is now owned by the requesting session.
    Registered {
        token: u64,
    },
    /// Body: `session u64, token u64, node b16`. Another session owns the port.
    Taken {
        session: u64,
        token: u64,
        node: &'a [u8],
    },
    /// Body: `position u32` (1 = next in line). ACQUIRED follows when granted.
    Queued {
        position: u32,
    },
    /// Body: `session u64, token u64, node b16, value b16`.
    Owner {
        session: u64,
        token: u64,
        node: &'a [u8],
        value: &'a [u8],
    },
    /// Body: empty. QUERY of a port nobody owns.
    Free,
    /// Body: `owned u8, session u64, token u64`. The watched port's state now (zeros
    /// when free or for a prefix watch).
    Watching {
        owner: Option<(u64, u64)>,
    },
    /// Body: empty. SEND handed the payload to the owner's connection.
    Delivered,
    /// Body: empty. SEND to a port nobody owns.
    NoOwner,
    /// Body: `count u64`. BROADCAST: how many MESSAGE events were sent.
    Count {
        count: u64,
    },
    /// Body: `next_cursor u64, count u32, entries`. `next_cursor` 0 means the listing
    /// is complete. Each entry: `port b16, session u64, token u64, node b16, value b16`.
    Page {
        next_cursor: u64,
        count: u32,
        entries: &'a [u8],
    },
    /// Body: `count u16, (name b16, value u64) × count`.
    Stats {
        count: u16,
        entries: &'a [u8],
    },
    /// Body: `code u16, message b16 [retry_ms u32, master b16]`. The bracketed
    /// fields are sent when either is set (`not_master` from a member that knows the
    /// master or is taking over, `overloaded`); absent, they read as 0 and empty.
    /// Decoders of before ignore them.
    Error {
        code: ErrorCode,
        /// For people; never parsed.
        message: &'a [u8],
        /// When to ask again, in ms (0: no advice).
        retry_ms: u32,
        /// The group's master, `HOST:PORT`, when a member that is not it knows it.
        master: &'a [u8],
    },
    /// Body: `data b16`. HELLO with credentials: the server's challenge (for
    /// SCRAM-SHA-256, the server-first-message); answer with AUTH.
    AuthContinue {
        data: &'a [u8],
    },
    /// Body: `result b32`, a JSON value.
    AdminOk {
        result: &'a [u8],
    },
}

/// An unsolicited message from the server (request id 0 on the wire).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event<'a> {
    /// Body: `port b16, token u64`. A queued REGISTER was granted to this session.
    Acquired { port: &'a [u8], token: u64 },
    /// Body: `port b16, token u64`. A watched port's owner let go (the token of the grant
    /// that ended).
    Released { port: &'a [u8], token: u64 },
    /// Body: `port b16, session u64, token u64, node b16`. A watched port got an owner.
    Claimed {
        port: &'a [u8],
        session: u64,
        token: u64,
        node: &'a [u8],
    },
    /// Body: `from u64, port b16, payload b32`. Relayed by SEND (port = the port sent
    /// to) or BROADCAST (port = the matching port, or empty for a broadcast to all).
    Message {
        from: u64,
        port: &'a [u8],
        payload: &'a [u8],
    },
    /// Body: `code u16, message b16`. The server closes the connection after this.
    GoAway { code: ErrorCode, message: &'a [u8] },
    /// Body: empty. Events were lost while the session had no connection; re-read the
    /// state of what you watch.
    Resync,
    /// Body: empty. The new master's recovery window closed: ports nobody reclaimed
    /// are free (a watched port not reported owned since the window began is free),
    /// and QUERY/SEND/REGISTER answer for every port again.
    Recovered,
}

/// Anything a server sends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ServerMsg<'a> {
    Reply { id: u32, reply: Reply<'a> },
    Event(Event<'a>),
}

impl<'a> Reply<'a> {
    /// An ERROR with no advice (`retry_ms` 0, no master).
    pub fn error(code: ErrorCode, message: &'a [u8]) -> Reply<'a> {
        Reply::Error {
            code,
            message,
            retry_ms: 0,
            master: &[],
        }
    }

    pub fn opcode(&self) -> u8 {
        match self {
            Reply::HelloOk(_) => op::HELLO_OK,
            Reply::Ok => op::OK,
            Reply::Registered { .. } => op::REGISTERED,
            Reply::Taken { .. } => op::TAKEN,
            Reply::Queued { .. } => op::QUEUED,
            Reply::Owner { .. } => op::OWNER,
            Reply::Free => op::FREE,
            Reply::Watching { .. } => op::WATCHING,
            Reply::Delivered => op::DELIVERED,
            Reply::NoOwner => op::NO_OWNER,
            Reply::Count { .. } => op::COUNT,
            Reply::Page { .. } => op::PAGE,
            Reply::Stats { .. } => op::STATS_REPLY,
            Reply::Error { .. } => op::ERROR,
            Reply::AuthContinue { .. } => op::AUTH_CONTINUE,
            Reply::AdminOk { .. } => op::ADMIN_OK,
        }
    }

    pub fn body_len(&self) -> usize {
        match self {
            Reply::HelloOk(h) => {
                2 + 8 + 8 + 8 + 8 + 4 + 1 + 4 * ServerLimits::FIELDS + 2 + h.auth.len() + 4 + 4
            }
            Reply::Ok | Reply::Free | Reply::Delivered | Reply::NoOwner => 0,
            Reply::Registered { .. } => 8,
            Reply::Taken { node, .. } => 16 + 2 + node.len(),
            Reply::Queued { .. } => 4,
            Reply::Owner { node, value, .. } => 16 + 2 + node.len() + 2 + value.len(),
            Reply::Watching { .. } => 17,
            Reply::Count { .. } => 8,
            Reply::Page { entries, .. } => 12 + entries.len(),
            Reply::Stats { entries, .. } => 2 + entries.len(),
            Reply::Error {
                message,
                retry_ms,
                master,
                ..
            } => {
                let hints = if *retry_ms != 0 || !master.is_empty() {
                    4 + 2 + master.len().min(ADDR_BYTES_MAX)
                } else {
                    0
                };
                2 + 2 + message.len().min(ERROR_MESSAGE_BYTES_MAX) + hints
            }
            Reply::AuthContinue { data } => 2 + data.len(),
            Reply::AdminOk { result } => 4 + result.len(),
        }
    }

    pub fn encode_body(&self, b: &mut impl BufMut) {
        match *self {
            Reply::HelloOk(h) => {
                b.put_u16(h.version);
                b.put_u64(h.features);
                b.put_u64(h.session);
                b.put_u64(h.secret);
                b.put_u64(h.epoch);
                b.put_u32(h.lease_ms);
                b.put_u8(h.resumed as u8);
                h.limits.encode(b);
                put_b16(b, h.auth);
                b.put_u32(h.recovery_ms);
                b.put_u32(h.channels_max);
            }
            Reply::Ok | Reply::Free | Reply::Delivered | Reply::NoOwner => {}
            Reply::Registered { token } => b.put_u64(token),
            Reply::Taken {
                session,
                token,
                node,
            } => {
                b.put_u64(session);
                b.put_u64(token);
                put_b16(b, node);
            }
            Reply::Queued { position } => b.put_u32(position),
            Reply::Owner {
                session,
                token,
                node,
                value,
            } => {
                b.put_u64(session);
                b.put_u64(token);
                put_b16(b, node);
                put_b16(b, value);
            }
            Reply::Watching { owner } => {
                let (owned, (s, t)) = match owner {
                    Some(o) => (1, o),
                    None => (0, (0, 0)),
                };
                b.put_u8(owned);
                b.put_u64(s);
                b.put_u64(t);
            }
            Reply::Count { count } => b.put_u64(count),
            Reply::Page {
                next_cursor,
                count,
                entries,
            } => {
                b.put_u64(next_cursor);
                b.put_u32(count);
                b.put_slice(entries);
            }
            Reply::Stats { count, entries } => {
                b.put_u16(count);
                b.put_slice(entries);
            }
            Reply::Error {
                code,
                message,
                retry_ms,
                master,
            } => {
                b.put_u16(code.to_u16());
                put_b16(b, &message[..message.len().min(ERROR_MESSAGE_BYTES_MAX)]);
                if retry_ms != 0 || !master.is_empty() {
                    b.put_u32(retry_ms);
                    put_b16(b, &master[..master.len().min(ADDR_BYTES_MAX)]);
                }
            }
            Reply::AuthContinue { data } => put_b16(b, data),
            Reply::AdminOk { result } => put_b32(b, result),
        }
    }

    pub fn decode(opcode: u8, body: &'a [u8]) -> Result<Reply<'a>, BodyError> {
        use ErrorCode::*;
        let mut r = Reader::new(body);
        let node = |r: &mut Reader<'a>| r.b16(NODE_NAME_BYTES_MAX, NameTooLong, "node name");
        Ok(match opcode {
            op::HELLO_OK => Reply::HelloOk(HelloOk {
                version: r.u16("version")?,
                features: r.u64("features")?,
                session: r.u64("session")?,
                secret: r.u64("secret")?,
                epoch: r.u64("epoch")?,
                lease_ms: r.u32("lease_ms")?,
                resumed: r.u8("resumed")? != 0,
                limits: ServerLimits::decode(&mut r)?,
                auth: if r.remaining() == 0 {
                    &[]
                } else {
                    r.b16(AUTH_DATA_BYTES_MAX, InvalidArgument, "auth data")?
                },
                recovery_ms: if r.remaining() == 0 {
                    0
                } else {
                    r.u32("recovery_ms")?
                },
                channels_max: if r.remaining() == 0 {
                    0
                } else {
                    r.u32("channels_max")?
                },
            }),
            op::OK => Reply::Ok,
            op::REGISTERED => Reply::Registered {
                token: r.u64("token")?,
            },
            op::TAKEN => Reply::Taken {
                session: r.u64("session")?,
                token: r.u64("token")?,
                node: node(&mut r)?,
            },
            op::QUEUED => Reply::Queued {
                position: r.u32("position")?,
            },
            op::OWNER => Reply::Owner {
                session: r.u64("session")?,
                token: r.u64("token")?,
                node: node(&mut r)?,
                value: r.b16(VALUE_BYTES_MAX, ValueTooLarge, "value")?,
            },
            op::FREE => Reply::Free,
            op::WATCHING => {
                let owned = r.u8("owned")? != 0;
                let s = r.u64("session")?;
                let t = r.u64("token")?;
                Reply::Watching {
                    owner: owned.then_some((s, t)),
                }
            }
            op::DELIVERED => Reply::Delivered,
            op::NO_OWNER => Reply::NoOwner,
            op::COUNT => Reply::Count {
                count: r.u64("count")?,
            },
            op::PAGE => {
                let next_cursor = r.u64("cursor")?;
                let count = r.u32("count")?;
                let entries = r.buf;
                // Validate every entry now so iteration cannot fail later.
                let mut check = Reader::new(entries);
                for _ in 0..count {
                    PageEntry::read(&mut check)?;
                }
                Reply::Page {
                    next_cursor,
                    count,
                    entries,
                }
            }
            op::STATS_REPLY => {
                let count = r.u16("count")?;
                if count as usize > STATS_ENTRIES_MAX {
                    return Err(body_err(InvalidArgument, "too many stats"));
                }
                let entries = r.buf;
                let mut check = Reader::new(entries);
                for _ in 0..count {
                    check.b16(STAT_NAME_BYTES_MAX, NameTooLong, "stat name")?;
                    check.u64("stat value")?;
                }
                Reply::Stats { count, entries }
            }
            op::ADMIN_OK => Reply::AdminOk {
                result: r.b32(ADMIN_BYTES_MAX, InvalidArgument, "admin result")?,
            },
            op::AUTH_CONTINUE => Reply::AuthContinue {
                data: r.b16(AUTH_DATA_BYTES_MAX, InvalidArgument, "auth data")?,
            },
            op::ERROR => {
                let code = ErrorCode::from_u16(r.u16("code")?);
                let message = r.b16(ERROR_MESSAGE_BYTES_MAX, InvalidArgument, "message")?;
                let (retry_ms, master) = if r.remaining() == 0 {
                    (0, &[][..])
                } else {
                    (
                        r.u32("retry_ms")?,
                        r.b16(ADDR_BYTES_MAX, InvalidArgument, "master")?,
                    )
                };
                Reply::Error {
                    code,
                    message,
                    retry_ms,
                    master,
                }
            }
            _ => return Err(body_err(UnknownCommand, "unknown reply opcode")),
        })
    }

    /// Entries of a `Page` reply (empty for other replies).
    pub fn page_entries(&self) -> impl Iterator<Item = PageEntry<'a>> + 'a {
        let (count, entries) = match *self {
            Reply::Page { count, entries, .. } => (count, entries),
            _ => (0, &[][..]),
        };
        let mut r = Reader::new(entries);
        // Validated when decoded (or built by PageBuilder), so reading cannot fail.
        (0..count).map_while(move |_| PageEntry::read(&mut r).ok())
    }

    /// Entries of a `Stats` reply (empty for other replies).
    pub fn stats_entries(&self) -> impl Iterator<Item = (&'a [u8], u64)> + 'a {
        let (count, entries) = match *self {
            Reply::Stats { count, entries } => (count, entries),
            _ => (0, &[][..]),
        };
        let mut r = Reader::new(entries);
        (0..count).map_while(move |_| {
            let name = r
                .b16(STAT_NAME_BYTES_MAX, ErrorCode::NameTooLong, "stat")
                .ok()?;
            let value = r.u64("stat").ok()?;
            Some((name, value))
        })
    }
}

/// One entry of a LIST page.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PageEntry<'a> {
    pub port: &'a [u8],
    pub session: u64,
    pub token: u64,
    pub node: &'a [u8],
    pub value: &'a [u8],
}

impl<'a> PageEntry<'a> {
    fn read(r: &mut Reader<'a>) -> Result<Self, BodyError> {
        use ErrorCode::*;
        Ok(PageEntry {
            port: r.b16(PORT_NAME_BYTES_MAX, NameTooLong, "port")?,
            session: r.u64("session")?,
            token: r.u64("token")?,
            node: r.b16(NODE_NAME_BYTES_MAX, NameTooLong, "node")?,
            value: r.b16(VALUE_BYTES_MAX, ValueTooLarge, "value")?,
        })
    }

    /// Encoded size of this entry.
    pub fn encoded_len(&self) -> usize {
        2 + self.port.len() + 16 + 2 + self.node.len() + 2 + self.value.len()
    }

    /// Appends the encoded entry (for building a `Page` reply).
    pub fn encode(&self, b: &mut impl BufMut) {
        put_b16(b, self.port);
        b.put_u64(self.session);
        b.put_u64(self.token);
        put_b16(b, self.node);
        put_b16(b, self.value);
    }
}

/// Appends one stat to the entries of a `Stats` reply.
pub fn encode_stat(b: &mut impl BufMut, name: &str, value: u64) {
    assert!(name.len() <= STAT_NAME_BYTES_MAX);
    put_b16(b, name.as_bytes());
    b.put_u64(value);
}

impl<'a> Event<'a> {
    pub fn opcode(&self) -> u8 {
        match self {
            Event::Acquired { .. } => op::ACQUIRED,
            Event::Released { .. } => op::RELEASED,
            Event::Claimed { .. } => op::CLAIMED,
            Event::Message { .. } => op::MESSAGE,
            Event::GoAway { .. } => op::GOAWAY,
            Event::Resync => op::RESYNC,
            Event::Recovered => op::RECOVERED,
        }
    }

    pub fn body_len(&self) -> usize {
        match self {
            Event::Acquired { port, .. } | Event::Released { port, .. } => 2 + port.len() + 8,
            Event::Claimed { port, node, .. } => 2 + port.len() + 16 + 2 + node.len(),
            Event::Message { port, payload, .. } => 8 + 2 + port.len() + 4 + payload.len(),
            Event::GoAway { message, .. } => 2 + 2 + message.len().min(ERROR_MESSAGE_BYTES_MAX),
            Event::Resync | Event::Recovered => 0,
        }
    }

    pub fn encode_body(&self, b: &mut impl BufMut) {
        match *self {
            Event::Acquired { port, token } | Event::Released { port, token } => {
                put_b16(b, port);
                b.put_u64(token);
            }
            Event::Claimed {
                port,
                session,
                token,
                node,
            } => {
                put_b16(b, port);
                b.put_u64(session);
                b.put_u64(token);
                put_b16(b, node);
            }
            Event::Message {
                from,
                port,
                payload,
            } => {
                b.put_u64(from);
                put_b16(b, port);
                put_b32(b, payload);
            }
            Event::GoAway { code, message } => {
                b.put_u16(code.to_u16());
                put_b16(b, &message[..message.len().min(ERROR_MESSAGE_BYTES_MAX)]);
            }
            Event::Resync | Event::Recovered => {}
        }
    }

    pub fn decode(opcode: u8, body: &'a [u8]) -> Result<Event<'a>, BodyError> {
        use ErrorCode::*;
        let mut r = Reader::new(body);
        let port = |r: &mut Reader<'a>| r.b16(PORT_NAME_BYTES_MAX, NameTooLong, "port name");
        Ok(match opcode {
            op::ACQUIRED => Event::Acquired {
                port: port(&mut r)?,
                token: r.u64("token")?,
            },
            op::RELEASED => Event::Released {
                port: port(&mut r)?,
                token: r.u64("token")?,
            },
            op::CLAIMED => Event::Claimed {
                port: port(&mut r)?,
                session: r.u64("session")?,
                token: r.u64("token")?,
                node: r.b16(NODE_NAME_BYTES_MAX, NameTooLong, "node")?,
            },
            op::MESSAGE => Event::Message {
                from: r.u64("from")?,
                port: port(&mut r)?,
                payload: r.b32(PAYLOAD_BYTES_MAX, PayloadTooLarge, "payload")?,
            },
            op::GOAWAY => Event::GoAway {
                code: ErrorCode::from_u16(r.u16("code")?),
                message: r.b16(ERROR_MESSAGE_BYTES_MAX, InvalidArgument, "message")?,
            },
            op::RESYNC => Event::Resync,
            op::RECOVERED => Event::Recovered,
            _ => return Err(body_err(UnknownCommand, "unknown event opcode")),
        })
    }
}

impl<'a> ServerMsg<'a> {
    /// Decodes a server message: request id 0 is an event, anything else a reply.
    pub fn decode(opcode: u8, id: u32, body: &'a [u8]) -> Result<ServerMsg<'a>, BodyError> {
        if id == 0 {
            Event::decode(opcode, body).map(ServerMsg::Event)
        } else {
            Reply::decode(opcode, body).map(|reply| ServerMsg::Reply { id, reply })
        }
    }
}

fn put_b16(b: &mut impl BufMut, s: &[u8]) {
    assert!(
        s.len() <= u16::MAX as usize,
        "b16 field of {} bytes",
        s.len()
    );
    b.put_u16(s.len() as u16);
    b.put_slice(s);
}

fn put_b32(b: &mut impl BufMut, s: &[u8]) {
    assert!(s.len() <= u32::MAX as usize);
    b.put_u32(s.len() as u32);
    b.put_slice(s);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn body(r: &Reply<'_>) -> Vec<u8> {
        let mut b = bytes::BytesMut::new();
        r.encode_body(&mut b);
        assert_eq!(b.len(), r.body_len());
        b.to_vec()
    }

    #[test]
    fn error_advice_travels_as_fields_and_is_optional() {
        let redirect = Reply::Error {
            code: ErrorCode::NotMaster,
            message: b"this member is not the master",
            retry_ms: 0,
            master: b"10.0.0.2:7400",
        };
        let b = body(&redirect);
        assert_eq!(Reply::decode(op::ERROR, &b).unwrap(), redirect);
        let wait = Reply::Error {
            code: ErrorCode::Overloaded,
            message: b"later",
            retry_ms: 42,
            master: b"",
        };
        assert_eq!(Reply::decode(op::ERROR, &body(&wait)).unwrap(), wait);
        // Without advice the body is what it always was, and such a body (from a
        // server of before) reads as no advice.
        let plain = Reply::error(ErrorCode::NotOwner, b"no");
        let b = body(&plain);
        assert_eq!(b, [0, 3, 0, 2, b'n', b'o']);
        assert_eq!(Reply::decode(op::ERROR, &b).unwrap(), plain);
        // A decoder of before stops after the message: the advice is a trailer.
        let b = body(&redirect);
        let mut r = Reader::new(&b);
        r.u16("code").unwrap();
        let m = r.b16(
            ERROR_MESSAGE_BYTES_MAX,
            ErrorCode::InvalidArgument,
            "message",
        );
        assert_eq!(m.unwrap(), b"this member is not the master");
    }
}
