//! portswitch tunnel: many user TCP streams over a pool of encrypted, compressed,
//! featureless tunnel connections.
//!
//! Layout, from the wire inwards (docs/TUNNEL.md has the formats and the threat model):
//!
//! - [`shape`]: the low-popcount encoding of the hellos, and the fully-encrypted-traffic
//!   detector's exemption predicate;
//! - [`handshake`]: Noise NNpsk0 inside PSK-sealed, padded, encoded hellos; the replay
//!   cache;
//! - [`record`]: AEAD records with sealed lengths and random padding;
//! - [`frame`]: what records carry (OPEN, DATA, FIN, RST, WINDOW, ACK…);
//! - [`mux`]: the pure state machine: streams, reordering, windows, acknowledgement
//!   and resending across pool connections;
//! - [`compress`]: adaptive per-chunk zstd;
//! - [`pool`]: recycled read buffers;
//! - [`session`], [`server`], [`client`], [`socks`]: the tokio driver at the edges;
//! - [`metrics`]: Prometheus counters and the /metrics endpoint.
//!
//! *Architecture invariant:* everything above `session` does no I/O and reads no
//! clock; time enters as arguments.

pub mod client;
pub mod compress;
pub mod error;
pub mod forward;
pub mod frame;
pub mod handshake;
pub mod limits;
pub mod metrics;
pub mod mux;
pub mod pool;
pub mod record;
pub mod server;
pub mod session;
pub mod shape;
pub mod socks;

pub use error::{Result, TunnelError};
