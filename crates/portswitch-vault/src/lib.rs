//! portswitch vault: encrypted, compressed, versioned storage with integrity on every read.
//!
//! A vault is a directory: a `VAULT` header (the data keys sealed under a key derived
//! from the passphrase with Argon2id) and append-only segment files of sealed records
//! (file blocks, commits, checkpoints). docs/VAULT.md has the format byte by byte, the
//! semantics and the threat model.
//!
//! Layout, from the bytes up:
//!
//! - [`limits`]: every bound, named once;
//! - `codec`, [`format`](mod@format): pure encode/decode of every on-disk structure (no I/O; fuzzed);
//! - `crypto`, `record`, `compress`: the AEADs and KDF, sealing records at their place,
//!   block compression;
//! - `store`, `parity`: segment files, the appender, Reed-Solomon parity;
//! - `tree`: the in-memory state of one version (pure);
//! - `engine`, `replay`, `open`: the live state, the log writer, verification and repair
//!   on read, opening and crash recovery;
//! - `vault` ([`Vault`], [`View`]), `history`, `maint`: the API, versions, gc, reseal,
//!   check, backup;
//! - [`fencing`]: one writer across machines with the port switch's fencing tokens;
//! - [`metrics`]: Prometheus counters.
//!
//! ```no_run
//! use portswitch_vault::{CreateOptions, OpenOptions, Vault};
//! let v = Vault::create("/tmp/v", b"passphrase", CreateOptions::default())?;
//! v.mkdir_all("/docs")?;
//! v.write_file("/docs/a.txt", b"hello")?;
//! v.sync()?; // a durable version
//! drop(v);
//! let v = Vault::open("/tmp/v", b"passphrase", OpenOptions::default())?;
//! assert_eq!(v.read_file("/docs/a.txt")?, b"hello");
//! # Ok::<(), portswitch_vault::VaultError>(())
//! ```
//!
//! *Architecture invariant:* a read never returns bytes whose seal did not open; a
//! damaged record is repaired from the mirror or parity, or the read fails with
//! [`VaultError::Corrupt`].

mod cache;
mod codec;
mod compress;
mod crypto;
mod engine;
pub mod error;
#[cfg(test)]
mod fault_tests;
pub mod fencing;
pub mod format;
mod header;
mod history;
pub mod limits;
mod maint;
pub mod metrics;
mod open;
mod parity;
mod record;
mod replay;
mod store;
pub mod target;
mod tree;
pub mod types;
mod vault;

pub use error::{Result, VaultError};
pub use fencing::Fence;
pub use metrics::Metrics;
pub use types::*;
pub use vault::{Vault, View};
