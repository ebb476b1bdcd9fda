//! The harness that tests and benchmarks drive portswitch with. None of it is in the
//! product binary: what a user runs is `portswitch`; this is how we check it.
//!
//! - [`group`]: a group of `portswitch serve` members as child processes (start,
//!   kill -9, SIGSTOP/SIGCONT, restart, find the master, read STATS).
//! - [`raw`]: the protocol spoken by hand over a socket, the way a client in another
//!   language would, and the many-sessions helpers (source addresses, replies counted
//!   without decoding).
//! - [`relay`]: a TCP relay that delays every byte (distance between data centres
//!   where the kernel has no netem).
//! - [`netns`]: data centres as network namespaces joined by veth links (root only).
//! - [`recovery`]: sessions holding ports and a watch that times their return after a
//!   failover.
//! - [`scenario`]: the whole-system workloads (`failover`, `failover-locks`,
//!   `hold-sessions`, `wan`), run by the `portswitch-harness` binary and, in their
//!   smoke versions, by the tests.
//!
//! Scenarios start the server binary they are given (`--server-bin`, or the
//! `portswitch` next to this binary): the same release build the user runs.

pub mod group;
pub mod netns;
pub mod raw;
pub mod recovery;
pub mod relay;
pub mod scenario;

pub use group::{free_port, Group, GroupSpec};

/// Errors of the harness: a message for whoever runs it.
pub type Error = Box<dyn std::error::Error + Send + Sync>;
pub type Result<T> = std::result::Result<T, Error>;

/// What a scenario measured: its report (the JSON `--json` prints) and whether every
/// safety and completeness check in it held.
#[derive(Debug, Clone)]
pub struct Outcome {
    pub report: serde_json::Value,
    pub ok: bool,
}

/// The `portswitch` binary to run as server: `explicit`, else the one next to the
/// running executable (`target/release/portswitch-harness` finds
/// `target/release/portswitch`).
pub fn server_bin(explicit: Option<&std::path::Path>) -> Result<std::path::PathBuf> {
    if let Some(p) = explicit {
        return Ok(p.to_path_buf());
    }
    let me = std::env::current_exe()?;
    let beside = me.with_file_name("portswitch");
    if beside.is_file() {
        return Ok(beside);
    }
    Err(format!(
        "no portswitch binary next to {} (build it with `cargo build --release -p portswitch`, or pass --server-bin)",
        me.display()
    )
    .into())
}
