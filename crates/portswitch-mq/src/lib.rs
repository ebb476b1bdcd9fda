//! portswitch mq: a durable message queue on the port switch.
//!
//! This crate holds the queue's pure-of-network pieces, each testable alone:
//!
//! - [`log`]: a partition's durable, segmented, append-only log. Records carry a
//!   CRC-32C each; a batch is one write and (by policy) one fsync; a torn tail is cut
//!   when the log is opened, never served; segments wholly below the low-water mark
//!   are deleted; every limit is a typed error.
//! - [`delivery`]: the sans-IO state machine that hands a partition's messages to the
//!   competing consumers of a group: credit (prefetch), ack / nack with delay /
//!   in-progress, redelivery after an ack timeout, per-message TTL, delay and maximum
//!   deliveries, dead-lettering with a reason, and optional ordering per key. Time is
//!   passed in, effects come out.
//! - [`selector`]: a consumer group's filter in the query language (`portswitch-query`)
//!   over a message's key, headers, payload (and its JSON), timestamp and offset.
//!
//! The broker, its wire protocol, replication through port ownership and the
//! `portswitch mq` commands build on these (docs/MQ.md says what exists).

pub mod acks;
pub mod broker;
pub mod client;
pub mod cluster;
pub mod delivery;
pub mod log;
pub mod proto;
pub mod replica;
pub mod selector;
