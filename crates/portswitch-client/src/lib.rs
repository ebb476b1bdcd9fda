//! Async Rust client for portswitch.
//!
//! A [`Client`] is one session on one connection. Calls from any number of tasks are
//! batched into frames automatically and pipelined; replies are matched by request id.
//!
//! **The lease view** (docs/PROTOCOL.md, "The client's lease view"): the client counts the lease from the *send* time of
//! the last request the server answered, minus a safety margin for clock-rate drift.
//! When that view runs out without contact, the session is over from the client's
//! side: [`Event::OwnershipLost`] is sent and [`Client::lost`] resolves, before the
//! server could possibly have given any of the session's ports to someone else. An
//! application must stop acting as owner at that moment.
//!
//! If the connection drops, the client resumes the session on a new connection (with
//! jittered backoff) as long as its lease view lasts; requests in flight fail with
//! [`Error::ConnectionLost`] (their outcome is unknown). A session opened with
//! `end_on_disconnect` ends with its connection instead.
//!
//! Recipes: [`Lock`], [`Election`], [`Discovery`].
//!
//! ```no_run
//! use portswitch_client::{Client, Lock};
//! # async fn demo() -> portswitch_client::Result<()> {
//! let client = Client::connect_to("127.0.0.1:7400").await?;
//! let lock = Lock::acquire(&client, "jobs/nightly-report").await?;
//! // Pass the fencing token to every resource the lock protects.
//! println!("holding with token {}", lock.token());
//! tokio::select! {
//!     _ = lock.lost() => eprintln!("lost the lock: stop now"),
//!     _ = tokio::time::sleep(std::time::Duration::from_secs(1)) => {}
//! }
//! lock.release().await?;
//! # Ok(()) }
//! ```

mod client;
mod direct;
mod handshake;
mod mux;
mod name;
mod net;
mod recipes;
pub mod session;
mod types;

pub use client::{Client, ClientOptions, ClientTls, LEASE_MS_DEFAULT};
pub use mux::{Mux, MuxSession};
pub use net::{server_stats, tls_exporter};
pub use portswitch_proto::{ErrorCode, MemberRole};
pub use recipes::{
    Discovery, DiscoveryChange, Election, LeaderChange, LeaderWatch, Leadership, Lock, ServiceWatch,
};
pub use types::{Error, Event, Owner, Page, RegisterOutcome, Result, SendOutcome, SessionInfo};
