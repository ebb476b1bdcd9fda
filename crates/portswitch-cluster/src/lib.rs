//! portswitch-cluster: a group of 1, 3 or 5 servers. Raft (openraft, behind this
//! crate) is used for exactly three things — membership, electing the master, and
//! making its epoch durable — and nothing per client request touches it.
//!
//! - [`types`]: what the replicated state machine holds ([`GroupFacts`]) and the one
//!   command ever written ([`Command::Master`]).
//! - [`store`]: durable vote, log and state in the member's data directory.
//! - [`net`]: Raft messages between members over TCP.
//! - [`lease`]: the master lease — pure logic, driven with times.
//! - [`node`]: runs a member and reports its [`Role`].

pub mod error;
pub mod lease;
pub mod net;
pub mod node;
pub mod store;
pub mod tls;
pub mod types;

pub use error::ClusterError;
pub use lease::{LeaseClock, MasterLease};
pub use node::{ClusterConfig, ClusterNode, MasterInfo, Role};
pub use tls::{PeerTls, PeerTlsSettings};
pub use types::{Command, Grant, GroupFacts, Member};
