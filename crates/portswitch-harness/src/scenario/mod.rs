//! Whole-system workloads: each starts what it needs (a group of members, thousands
//! of sessions), applies its faults or load, checks what must hold and measures
//! what it promises, and returns an [`Outcome`](crate::Outcome) whose `ok` is false
//! if a check failed. They print progress to stderr and, unless asked for JSON, a
//! summary to stdout.

pub mod failover;
pub mod failover_locks;
pub mod hold;
pub mod wan;

use std::path::Path;

use crate::group::{Group, GroupSpec};
use crate::Result;

/// Three members of `server` on loopback for a scenario, with leases up to
/// `lease_ms_max`, no HTTP listener, errors only in their logs, plus `flags` (which
/// win over those defaults); returns once one of them is master.
pub(crate) async fn group(
    server: &Path,
    tag: &str,
    lease_ms_max: u32,
    flags: &[String],
) -> Result<Group> {
    let given = |name: &str| flags.iter().any(|f| f.split('=').next() == Some(name));
    let defaults: Vec<String> = [
        ("--lease-ms-max", lease_ms_max.to_string()),
        ("--log", "error,openraft=off".to_string()),
    ]
    .into_iter()
    .filter(|(name, _)| !given(name))
    .map(|(name, value)| format!("{name}={value}"))
    .chain(["--no-http".to_string()])
    .collect();
    let mut spec = GroupSpec::new(server, tag).flags(&defaults).flags(flags);
    spec.log = true;
    let g = Group::start(spec).await?;
    g.master(None).await?;
    Ok(g)
}
