//! The group's durable facts, for a server with a data directory: the secret keys
//! that let a later master verify the sessions of an earlier one, the last epoch, and
//! the longest lease that master could grant. A restarted server thus serves in a
//! higher epoch and adopts its predecessor's sessions in a recovery window — failover
//! for a group of one. (A group of three or five keeps the same facts in Raft.)

use std::fs::File;
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// The file's name in the data directory.
pub const GROUP_FILE: &str = "group.json";
/// Held (flock) while a server uses the data directory: two servers on one directory
/// would both believe they are the master.
pub const LOCK_FILE: &str = "portswitch.lock";
/// The recovery window is the longest lease the earlier master could grant, plus this
/// much (per mille) for clock-rate differences between client and server.
pub const RECOVERY_MARGIN_PER_MILLE: u64 = 100;

#[derive(Debug, Serialize, Deserialize)]
struct GroupFile {
    format: u32,
    /// SipHash keys of session secrets (keep this file private: mode 0600).
    secret_keys: [u64; 2],
    /// The epoch the last master served in.
    epoch: u64,
    /// The longest lease any master using this directory could grant.
    lease_ms_max: u32,
}

/// What a server takes from (and has written to) its data directory at start.
#[derive(Debug)]
pub(crate) struct GroupState {
    pub secret_keys: [u64; 2],
    pub epoch: u64,
    /// `Some` when an earlier master of this group served: how long the recovery
    /// window must stay open.
    pub recovery_window_ms: Option<u64>,
    /// Keeps the directory's lock for the life of the server.
    _lock: File,
}

fn invalid(path: &Path, e: impl std::fmt::Display) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!("{}: {e}", path.display()),
    )
}

impl GroupState {
    /// Locks `dir`, reads what an earlier master left, and durably records `epoch`
    /// (raised above the earlier one if need be) before anything is served.
    pub(crate) fn open(
        dir: &Path,
        epoch: u64,
        lease_ms_max: u32,
        window_override_ms: Option<u64>,
    ) -> io::Result<GroupState> {
        let lock = lock_dir(dir)?;
        let path = dir.join(GROUP_FILE);
        let earlier = match std::fs::read(&path) {
            Ok(bytes) => {
                let f: GroupFile = serde_json::from_slice(&bytes).map_err(|e| invalid(&path, e))?;
                if f.format != 1 {
                    return Err(invalid(&path, format!("unknown format {}", f.format)));
                }
                Some(f)
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => None,
            Err(e) => return Err(e),
        };
        let secret_keys = match &earlier {
            Some(f) => f.secret_keys,
            None => {
                let mut b = [0u8; 16];
                getrandom::getrandom(&mut b).map_err(|e| io::Error::other(e.to_string()))?;
                [
                    u64::from_le_bytes(b[..8].try_into().expect("8 bytes")),
                    u64::from_le_bytes(b[8..].try_into().expect("8 bytes")),
                ]
            }
        };
        let epoch = match &earlier {
            Some(f) => epoch.max(f.epoch + 1),
            None => epoch,
        };
        let recovery_window_ms = earlier.as_ref().map(|f| {
            window_override_ms.unwrap_or_else(|| {
                let lease = f.lease_ms_max.max(lease_ms_max) as u64;
                lease + lease * RECOVERY_MARGIN_PER_MILLE / 1_000
            })
        });
        // The longest lease ever granted through this directory is kept, not this
        // run's: a master that dies inside its own recovery window leaves its
        // predecessor's (possibly longer) leases for the next one to cover.
        let lease_ms_max = earlier
            .as_ref()
            .map_or(lease_ms_max, |f| f.lease_ms_max.max(lease_ms_max));
        write_aside(
            dir,
            &path,
            &GroupFile {
                format: 1,
                secret_keys,
                epoch,
                lease_ms_max,
            },
        )?;
        Ok(GroupState {
            secret_keys,
            epoch,
            recovery_window_ms,
            _lock: lock,
        })
    }
}

/// Creates `dir` if need be and takes its lock (held while the returned file is open).
pub(crate) fn lock_dir(dir: &Path) -> io::Result<File> {
    std::fs::create_dir_all(dir)?;
    let lock = File::create(dir.join(LOCK_FILE))?;
    match lock.try_lock() {
        Ok(()) => Ok(lock),
        Err(std::fs::TryLockError::WouldBlock) => Err(io::Error::new(
            io::ErrorKind::AddrInUse,
            format!(
                "another server is using the data directory {}",
                dir.display()
            ),
        )),
        Err(std::fs::TryLockError::Error(e)) => Err(e),
    }
}

/// Writes aside, syncs, renames, syncs the directory: a crash leaves the old file or
/// the new one, whole.
fn write_aside(dir: &Path, path: &PathBuf, f: &GroupFile) -> io::Result<()> {
    let tmp = dir.join("group.json.tmp");
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create(true).truncate(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut opts, 0o600);
    let mut out = opts.open(&tmp)?;
    out.write_all(&serde_json::to_vec_pretty(f).map_err(io::Error::other)?)?;
    out.sync_all()?;
    std::fs::rename(&tmp, path)?;
    File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_restart_raises_the_epoch_keeps_the_keys_and_opens_a_window() {
        let dir = std::env::temp_dir().join(format!("ps-group-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let first = GroupState::open(&dir, 100, 60_000, None).unwrap();
        assert_eq!(first.epoch, 100);
        assert_eq!(first.recovery_window_ms, None, "nothing to recover from");
        // A second server on the same directory is refused while the first runs.
        let err = GroupState::open(&dir, 100, 60_000, None).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::AddrInUse);
        let keys = first.secret_keys;
        drop(first);
        // A restart within the same second still gets a higher epoch.
        let second = GroupState::open(&dir, 100, 30_000, None).unwrap();
        assert_eq!(second.epoch, 101);
        assert_eq!(second.secret_keys, keys);
        // The window covers the longer of the two masters' longest leases.
        assert_eq!(second.recovery_window_ms, Some(66_000));
        drop(second);
        let third = GroupState::open(&dir, 500, 30_000, Some(1_234)).unwrap();
        assert_eq!(third.epoch, 500);
        assert_eq!(third.recovery_window_ms, Some(1_234));
        drop(third);
        // Leases granted under the first run's longer setting are still covered.
        let fourth = GroupState::open(&dir, 501, 30_000, None).unwrap();
        assert_eq!(fourth.recovery_window_ms, Some(66_000));
        drop(fourth);
        std::fs::write(dir.join(GROUP_FILE), b"{not json").unwrap();
        let err = GroupState::open(&dir, 600, 30_000, None).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
