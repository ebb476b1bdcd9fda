//! The portswitch core: a pure state machine for one master's sessions and ports.
//!
//! It owns sessions and their leases, the port table, fencing tokens, FIFO wait queues,
//! watches, relay and broadcast, and paged listing. It does no I/O and reads no clock:
//! the driver passes time in and receives effects through an [`Outbox`].
//!
//! # Driving contract
//!
//! - For each frame read from a connection: [`Core::begin_batch`] once (it renews the
//!   session's lease: any frame is a heartbeat), then [`Core::handle`] for each request
//!   in order. Replies and events go to the outbox as they happen; the driver must
//!   deliver each connection's effects in emission order.
//!   A driver that handles several frames (or several channels' sessions) in one go
//!   under one lock starts all but the first with [`Core::continue_batch`]: they then
//!   share one budget of filter evaluations (`Config::filter_evals_per_batch_max`).
//! - When a connection closes: [`Core::handle_disconnect`].
//! - Whenever time passes [`Core::next_deadline`]: [`Core::handle_timeout`] (calling it
//!   more often is harmless).
//! - `now_ms` is milliseconds on a monotonic clock and must never go backwards (that is
//!   asserted). Each call may carry a later `now_ms` than the previous one.
//! - The driver answers `STATS` itself (it knows connections and memory); the core
//!   supplies [`Core::stats`].
//!
//! ```
//! use portswitch_core::{Core, Config, Outbox, ConnId};
//! use portswitch_proto::{Reply, Event, Request, Hello};
//!
//! #[derive(Default)]
//! struct Log(Vec<String>);
//! impl Outbox for Log {
//!     fn reply(&mut self, c: ConnId, id: u32, r: &Reply<'_>) { self.0.push(format!("{c}#{id} {r:?}")) }
//!     fn event(&mut self, c: ConnId, e: &Event<'_>) { self.0.push(format!("{c} {e:?}")) }
//!     fn frames(&mut self, _: ConnId, _: &[u8]) {}
//!     fn close(&mut self, _: ConnId) {}
//! }
//!
//! let mut core = Core::new(Config::default(), 1, [1, 2, 3]);
//! let mut out = Log::default();
//! let hello = Request::Hello(Hello { version_min: 1, version_max: 1, features: 0,
//!     lease_ms: 1_000, end_on_disconnect: false, node_name: b"n1", credentials: b"",
//!     resume_session: 0, resume_secret: 0 });
//! let mut batch = core.begin_batch(7, 0);
//! core.handle(&mut batch, 1, &hello, &mut out);
//! core.handle(&mut batch, 2, &Request::Register { port: b"db/leader", value: b"", wait: false }, &mut out);
//! assert!(out.0[1].contains("Registered"));
//! // No traffic for longer than the lease: the session expires, its port is free.
//! core.handle_timeout(1_001, &mut out);
//! assert_eq!(core.stats().ports_owned, 0);
//! ```

mod config;
mod core;
pub mod filter;
mod table;

pub use crate::config::{Config, ConfigError, LEASE_MS_DEFAULT, LEASE_MS_MAX, LEASE_MS_MIN};
pub use crate::core::{Batch, ConnId, Core, Identity, Lookup, Outbox, Stats};
pub use portswitch_auth::acl::{Access, Grant, Perm, Perms, Role};
