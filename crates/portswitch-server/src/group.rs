//! The group's durable facts, for a server with a data directory: the secret keys
//! that let a later master verify the sessions of an earlier one, the last epoch, and
//! the longest lease that master may have granted (its *ceiling*, raised before the
//! first HELLO asking for more is served). A restarted server thus serves in a higher
//! epoch and adopts its predecessor's sessions in a recovery window as long as the
//! leases it granted — failover for a group of one. A group of three or five keeps
//! the same facts in Raft; both apply them with [`GroupFacts::apply`].
//!
//! `group.json` holds the session-secret keys: it is written 0600 and refused on open
//! if group or others have any access to it (anyone who read it could forge the
//! secrets that resume sessions).

use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use portswitch_cluster::{Command, GroupFacts};
use portswitch_files::SECRET_MODE;
use serde::{Deserialize, Serialize};

/// The file's name in the data directory.
pub const GROUP_FILE: &str = "group.json";
/// Held (flock) while a server uses the data directory: two servers on one directory
/// would both believe they are the master.
pub const LOCK_FILE: &str = "portswitch.lock";
/// The recovery window is the longest lease the earlier master could grant, plus this
/// much (per mille) for clock-rate differences between client and server.
pub const RECOVERY_MARGIN_PER_MILLE: u64 = 100;

/// The file as the first versions wrote it: no ceiling, so a successor owes the
/// longest lease that master was configured to allow.
#[derive(Debug, Deserialize)]
struct GroupFileV1 {
    /// SipHash keys of session secrets (keep this file private: mode 0600).
    secret_keys: [u64; 2],
    /// The epoch the last master served in.
    epoch: u64,
    /// The longest lease any master using this directory could grant.
    lease_ms_max: u32,
}

#[derive(Debug, Serialize, Deserialize)]
struct GroupFile {
    format: u32,
    /// What the group knows (the secret keys among them: keep this file private,
    /// mode 0600).
    facts: GroupFacts,
}

#[derive(Deserialize)]
struct Format {
    format: u32,
}

/// The node id a server alone on its data directory takes in the facts.
const SELF: u64 = 0;

/// What a server takes from (and keeps writing to) its data directory.
#[derive(Debug)]
pub(crate) struct GroupState {
    pub secret_keys: [u64; 2],
    pub epoch: u64,
    /// `Some` when an earlier master of this group served: how long the recovery
    /// window must stay open.
    pub recovery_window_ms: Option<u64>,
    /// The longest client lease this server may grant before raising its ceiling.
    pub lease_ceiling_ms: u32,
    dir: PathBuf,
    /// The facts as last written (raises and the settle rewrite them).
    facts: Mutex<GroupFacts>,
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
    /// Locks `dir`, reads what an earlier master left, and durably records this
    /// server as the master of a new epoch (`epoch`, or above the earlier one) with a
    /// lease ceiling of `lease_ms_start` (at most `lease_ms_max`) before anything is
    /// served.
    pub(crate) fn open(
        dir: &Path,
        epoch: u64,
        lease_ms_max: u32,
        lease_ms_start: u32,
        window_override_ms: Option<u64>,
    ) -> io::Result<GroupState> {
        let lock = lock_dir(dir)?;
        let path = dir.join(GROUP_FILE);
        let mut facts = match portswitch_files::read_secret(&path) {
            Ok(bytes) => read_facts(&path, &bytes)?,
            Err(e) if e.is_not_found() => GroupFacts::default(),
            Err(e) => return Err(e.into()),
        };
        let mut b = [0u8; 16];
        getrandom::getrandom(&mut b).map_err(|e| io::Error::other(e.to_string()))?;
        let keys = [
            u64::from_le_bytes(b[..8].try_into().expect("8 bytes")),
            u64::from_le_bytes(b[8..].try_into().expect("8 bytes")),
        ];
        // A server alone has no master lease to wait out: the directory's lock proves
        // its predecessor is gone.
        let grant = facts
            .apply(&Command::Master {
                node: SELF,
                epoch_floor: epoch,
                keys,
                lease_ms_max,
                master_lease_ms: 0,
                lease_ms_start: Some(lease_ms_start.min(lease_ms_max)),
            })
            .grant
            .expect("a master command answers a grant");
        let recovery_window_ms = grant.previous.map(|(owed, _)| {
            window_override_ms.unwrap_or_else(|| {
                let lease = owed as u64;
                lease + lease * RECOVERY_MARGIN_PER_MILLE / 1_000
            })
        });
        write_facts(&path, &facts)?;
        Ok(GroupState {
            secret_keys: grant.secret_keys,
            epoch: grant.epoch,
            recovery_window_ms,
            lease_ceiling_ms: grant.lease_ceiling_ms,
            dir: dir.to_path_buf(),
            facts: Mutex::new(facts),
            _lock: lock,
        })
    }

    /// Durably raises this server's ceiling to `lease_ms` (at most `lease_ms_max`)
    /// before it grants such a lease: a successor's window must cover it. Blocks on
    /// the disk (a write and two syncs).
    pub(crate) fn raise_ceiling(&self, lease_ms: u32) -> io::Result<u32> {
        self.update(&Command::Raise {
            epoch: self.epoch,
            lease_ms,
        })
        .map(|f| f.ceiling())
    }

    /// Durably lowers this server's ceiling from `from` to `lease_ms` (see
    /// `Command::Lower`). Returns the ceiling now in force, or `None` if a raise got
    /// in first. Blocks on the disk.
    pub(crate) fn lower_ceiling(&self, from: u32, lease_ms: u32) -> io::Result<Option<u32>> {
        let cmd = Command::Lower {
            epoch: self.epoch,
            from,
            lease_ms,
        };
        let facts = self.facts.lock().unwrap_or_else(|p| p.into_inner());
        let mut next = facts.clone();
        drop(facts);
        let applied = next.apply(&cmd).ceiling;
        if applied.is_some() {
            self.update(&cmd)?;
        }
        Ok(applied)
    }

    /// Durably records that this server's recovery window closed: no lease of an
    /// earlier master is left, so a successor owes only this server's ceiling.
    pub(crate) fn settle(&self) -> io::Result<()> {
        self.update(&Command::Settle { epoch: self.epoch })
            .map(|_| ())
    }

    fn update(&self, cmd: &Command) -> io::Result<GroupFacts> {
        let mut facts = self.facts.lock().unwrap_or_else(|p| p.into_inner());
        let mut next = facts.clone();
        next.apply(cmd);
        write_facts(&self.dir.join(GROUP_FILE), &next)?;
        *facts = next.clone();
        Ok(next)
    }
}

/// Reads the facts an earlier server left (either format).
fn read_facts(path: &Path, bytes: &[u8]) -> io::Result<GroupFacts> {
    let format = serde_json::from_slice::<Format>(bytes).map_err(|e| invalid(path, e))?;
    match format.format {
        1 => {
            let f: GroupFileV1 = serde_json::from_slice(bytes).map_err(|e| invalid(path, e))?;
            // No ceiling and nothing settled was recorded: owe the longest allowed.
            Ok(GroupFacts {
                epoch: f.epoch,
                master: Some(SELF),
                secret_keys: Some(f.secret_keys),
                lease_ms_max: f.lease_ms_max,
                master_lease_ms: 0,
                lease_ceiling_ms: None,
                lease_owed_ms: None,
                users: None,
                users_version: 0,
            })
        }
        2 => {
            let f: GroupFile = serde_json::from_slice(bytes).map_err(|e| invalid(path, e))?;
            Ok(f.facts)
        }
        n => Err(invalid(path, format!("unknown format {n}"))),
    }
}

/// Creates `dir` if need be and takes its lock (held while the returned file is open).
pub(crate) fn lock_dir(dir: &Path) -> io::Result<File> {
    portswitch_files::create_dir_private(dir)?;
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

/// Writes the facts durably and privately (they hold the session keys): a crash
/// leaves the old file or the new one, whole.
fn write_facts(path: &Path, facts: &GroupFacts) -> io::Result<()> {
    let f = GroupFile {
        format: 2,
        facts: facts.clone(),
    };
    let bytes = serde_json::to_vec_pretty(&f).map_err(io::Error::other)?;
    Ok(portswitch_files::write_durable(path, &bytes, SECRET_MODE)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_dir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("ps-group-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        dir
    }

    #[test]
    fn a_restart_raises_the_epoch_keeps_the_keys_and_opens_a_window() {
        let dir = temp_dir("restart");
        let first = GroupState::open(&dir, 100, 60_000, 60_000, None).unwrap();
        assert_eq!(first.epoch, 100);
        assert_eq!(first.recovery_window_ms, None, "nothing to recover from");
        // A second server on the same directory is refused while the first runs.
        let err = GroupState::open(&dir, 100, 60_000, 60_000, None).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::AddrInUse);
        let keys = first.secret_keys;
        drop(first);
        // A restart within the same second still gets a higher epoch.
        let second = GroupState::open(&dir, 100, 30_000, 30_000, None).unwrap();
        assert_eq!(second.epoch, 101);
        assert_eq!(second.secret_keys, keys);
        // The window covers the longest lease the first could grant, plus 10%.
        assert_eq!(second.recovery_window_ms, Some(66_000));
        drop(second);
        let third = GroupState::open(&dir, 500, 30_000, 30_000, Some(1_234)).unwrap();
        assert_eq!(third.epoch, 500);
        assert_eq!(third.recovery_window_ms, Some(1_234));
        drop(third);
        // Nobody outlived a window since the first run: its minute is still owed.
        let fourth = GroupState::open(&dir, 501, 30_000, 30_000, None).unwrap();
        assert_eq!(fourth.recovery_window_ms, Some(66_000));
        drop(fourth);
        std::fs::write(dir.join(GROUP_FILE), b"{not json").unwrap();
        let err = GroupState::open(&dir, 600, 30_000, 30_000, None).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
        std::fs::write(dir.join(GROUP_FILE), br#"{"format": 3}"#).unwrap();
        let err = GroupState::open(&dir, 600, 30_000, 30_000, None).unwrap_err();
        assert!(err.to_string().contains("unknown format 3"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn the_keys_are_written_private_and_refused_when_they_are_not() {
        use std::os::unix::fs::PermissionsExt;
        let dir = temp_dir("modes");
        let first = GroupState::open(&dir, 1, 10_000, 10_000, None).unwrap();
        let path = dir.join(GROUP_FILE);
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&path), 0o600);
        first.raise_ceiling(20_000).unwrap();
        assert_eq!(mode(&path), 0o600, "a rewrite stays private");
        assert_eq!(mode(&dir) & 0o077, 0, "the data directory is the owner's");
        drop(first);
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let err = GroupState::open(&dir, 1, 10_000, 10_000, None).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::PermissionDenied);
        assert!(
            err.to_string().contains(&format!(
                "is readable by group or others (mode 0644); run chmod 600 {}",
                path.display()
            )),
            "{err}"
        );
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        let again = GroupState::open(&dir, 1, 10_000, 10_000, None).unwrap();
        assert_eq!(again.epoch, 2);
        drop(again);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_lowered_ceiling_is_what_the_next_restart_owes() {
        let dir = temp_dir("lower");
        let first = GroupState::open(&dir, 10, 300_000, 10_000, None).unwrap();
        first.settle().unwrap();
        // Every client used 2 s leases for a whole ceiling: recorded lower.
        assert_eq!(first.lower_ceiling(10_000, 2_000).unwrap(), Some(2_000));
        // A lower that lost the race with a raise is not recorded.
        first.raise_ceiling(5_000).unwrap();
        assert_eq!(first.lower_ceiling(2_000, 1_000).unwrap(), None);
        assert_eq!(first.lower_ceiling(5_000, 2_000).unwrap(), Some(2_000));
        drop(first);
        // The restart owes 2 s (+10%) and starts granting at 2 s.
        let second = GroupState::open(&dir, 10, 300_000, 10_000, None).unwrap();
        assert_eq!(second.recovery_window_ms, Some(2_200));
        assert_eq!(second.lease_ceiling_ms, 2_000);
        drop(second);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn the_window_covers_the_ceiling_granted_not_the_longest_allowed() {
        let dir = temp_dir("ceiling");
        let first = GroupState::open(&dir, 10, 300_000, 10_000, None).unwrap();
        assert_eq!(first.lease_ceiling_ms, 10_000);
        drop(first);
        // Ten seconds granted at most: an eleven-second window, not 330 s.
        let second = GroupState::open(&dir, 10, 300_000, 10_000, None).unwrap();
        assert_eq!(second.recovery_window_ms, Some(11_000));
        // A client asks for a minute: recorded before it is granted (and never more
        // than lease_ms_max).
        assert_eq!(second.raise_ceiling(60_000).unwrap(), 60_000);
        assert_eq!(
            second.raise_ceiling(30_000).unwrap(),
            60_000,
            "never lowered"
        );
        assert_eq!(second.raise_ceiling(900_000).unwrap(), 300_000);
        drop(second);
        // The third owes the second's five minutes, and — since the second never
        // outlived its own window — the first's ten seconds are covered by that.
        let third = GroupState::open(&dir, 10, 300_000, 10_000, None).unwrap();
        assert_eq!(third.recovery_window_ms, Some(330_000));
        // Once its window has closed, what the earlier servers granted is over.
        third.settle().unwrap();
        drop(third);
        let fourth = GroupState::open(&dir, 10, 300_000, 10_000, None).unwrap();
        assert_eq!(fourth.recovery_window_ms, Some(11_000));
        assert_eq!(fourth.epoch, 13);
        drop(fourth);
        // A later master that dies inside its window leaves both obligations.
        let fifth = GroupState::open(&dir, 10, 300_000, 10_000, None).unwrap();
        assert_eq!(fifth.recovery_window_ms, Some(11_000));
        fifth.raise_ceiling(20_000).unwrap();
        drop(fifth);
        let sixth = GroupState::open(&dir, 10, 300_000, 10_000, None).unwrap();
        assert_eq!(sixth.recovery_window_ms, Some(22_000));
        drop(sixth);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_file_from_before_ceilings_owes_the_longest_allowed_lease() {
        let dir = temp_dir("v1");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(
            dir.join(GROUP_FILE),
            br#"{"format": 1, "secret_keys": [7, 9], "epoch": 40, "lease_ms_max": 120000}"#,
        )
        .unwrap();
        // As the first versions wrote it too: private.
        std::fs::set_permissions(
            dir.join(GROUP_FILE),
            std::os::unix::fs::PermissionsExt::from_mode(0o600),
        )
        .unwrap();
        let g = GroupState::open(&dir, 10, 300_000, 10_000, None).unwrap();
        assert_eq!(g.secret_keys, [7, 9]);
        assert_eq!(g.epoch, 41);
        assert_eq!(g.recovery_window_ms, Some(132_000));
        assert_eq!(g.lease_ceiling_ms, 10_000);
        drop(g);
        // Rewritten in the current format, keys and obligations kept.
        let text = std::fs::read_to_string(dir.join(GROUP_FILE)).unwrap();
        assert!(text.contains("\"format\": 2"), "{text}");
        let g = GroupState::open(&dir, 10, 300_000, 10_000, None).unwrap();
        assert_eq!((g.secret_keys, g.epoch), ([7, 9], 42));
        assert_eq!(g.recovery_window_ms, Some(132_000));
        drop(g);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
