//! The portswitch wire protocol, without I/O.
//!
//! A connection carries length-prefixed **frames**; each frame carries one or more
//! **messages**: client requests, server replies (matched by request id) and server
//! events (request id 0). Batching is the point: a client puts whatever it has into one
//! frame, and the server coalesces its replies and events the same way.
//!
//! - [`limits`]: every size limit of the protocol, as named constants.
//! - [`frame`]: finding frames in a byte stream, walking their messages, building them.
//! - [`msg`]: typed requests, replies and events, and their body codec.
//! - [`code`]: the error codes.
//!
//! Nothing here reads a socket or a clock, so it can be fuzzed and reused by any
//! client or server. The normative description is `docs/PROTOCOL.md`.
//!
//! ```
//! use portswitch_proto::{frame, msg::{Request, ServerMsg, Reply}, FrameBuf, limits::*};
//! use bytes::BytesMut;
//!
//! // A client batches two requests into one frame...
//! let mut out = FrameBuf::new(FRAME_BYTES_MAX, COMMANDS_PER_FRAME_MAX);
//! out.push_request(1, &Request::Register { port: b"svc/db/leader", value: b"10.0.0.7:5432", wait: true });
//! out.push_request(2, &Request::Query { port: b"svc/cache/leader" });
//! let mut wire = BytesMut::new();
//! out.take_into(&mut wire);
//!
//! // ...and a server walks them.
//! let n = frame::frame_len(&wire, FRAME_BYTES_MAX).unwrap().unwrap();
//! let reqs: Vec<_> = frame::messages(&wire[4..n], COMMANDS_PER_FRAME_MAX)
//!     .map(|m| { let m = m.unwrap(); (m.id, Request::decode(m.opcode, m.body).unwrap()) })
//!     .collect();
//! assert_eq!(reqs[1], (2, Request::Query { port: b"svc/cache/leader" }));
//! ```

pub mod code;
pub mod frame;
pub mod limits;
pub mod msg;
pub mod role;

pub use code::ErrorCode;
pub use frame::{FrameBuf, FrameError, RawMessage};
pub use msg::{
    BodyError, Event, Hello, HelloOk, PageEntry, Reply, Request, ServerLimits, ServerMsg,
};
pub use role::MemberRole;
