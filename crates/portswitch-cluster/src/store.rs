//! Durable Raft state of one member: vote, log, applied state and snapshot, in one
//! small JSON file rewritten (aside, synced, renamed) on every change. The group writes
//! a handful of entries per election and nothing per client request, so the whole
//! state stays a few kilobytes; snapshots keep the log short.
//!
//! The state holds the group's session-secret keys, so the file is written 0600 and
//! refused on open if group or others have any access to it.

use std::collections::BTreeMap;
use std::fmt::Debug;
use std::io::Cursor;
use std::ops::RangeBounds;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use openraft::storage::{LogState, RaftLogReader, RaftSnapshotBuilder, RaftStorage, Snapshot};
use openraft::{
    AnyError, Entry, EntryPayload, LogId, OptionalSend, SnapshotMeta, StorageError, StorageIOError,
    StoredMembership, Vote,
};
use portswitch_files::SECRET_MODE;
use serde::{Deserialize, Serialize};

use crate::types::{GroupFacts, Member, Response, TypeConfig};

/// The file's name in the member's data directory.
pub const RAFT_FILE: &str = "raft.json";

#[derive(Debug, Default, Serialize, Deserialize)]
struct Persisted {
    vote: Option<Vote<u64>>,
    committed: Option<LogId<u64>>,
    last_purged: Option<LogId<u64>>,
    log: BTreeMap<u64, Entry<TypeConfig>>,
    last_applied: Option<LogId<u64>>,
    membership: StoredMembership<u64, Member>,
    facts: GroupFacts,
    snapshot: Option<StoredSnapshot>,
    snapshot_seq: u64,
    /// Entries taken out of the log lately (conflicting, or purged), still readable:
    /// see [`REMOVED_KEPT_MAX`]. Not persisted.
    #[serde(skip)]
    removed: BTreeMap<u64, Entry<TypeConfig>>,
}

/// How many entries taken out of the log stay readable. openraft 0.9's replication
/// task panics when it reads an empty range it expects entries in (openraft #1544,
/// fixed only in 0.10): a leader stopped (SIGSTOP) and continued still runs its old
/// replication tasks for a moment after a newer leader truncated its conflicting
/// entries. Such a task can only send what it reads under its old term, which every
/// member rejects, so serving it the removed entries is harmless, and it ends once
/// the node steps down. The group writes a few entries per election, so a small
/// bound covers any such race.
const REMOVED_KEPT_MAX: usize = 1_024;

impl Persisted {
    /// Keeps `e` readable after it leaves the log.
    fn keep_removed(&mut self, e: Entry<TypeConfig>) {
        self.removed.insert(e.log_id.index, e);
        while self.removed.len() > REMOVED_KEPT_MAX {
            self.removed.pop_first();
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct StoredSnapshot {
    meta: SnapshotMeta<u64, Member>,
    data: Vec<u8>,
}

/// One member's Raft storage. Clones share the state (openraft asks for a log reader
/// and a snapshot builder besides the store).
#[derive(Debug, Clone)]
pub struct Store {
    inner: Arc<Mutex<Persisted>>,
    path: Arc<PathBuf>,
}

fn io_err(e: impl std::error::Error + 'static) -> StorageError<u64> {
    StorageError::from(StorageIOError::write(AnyError::new(&e)))
}

impl Store {
    /// Opens (or creates) the state in `dir`.
    pub fn open(dir: &Path) -> std::io::Result<Store> {
        portswitch_files::create_dir_private(dir)?;
        let path = dir.join(RAFT_FILE);
        let persisted = match portswitch_files::read_secret(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| {
                std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    format!("{}: {e}", path.display()),
                )
            })?,
            Err(e) if e.is_not_found() => Persisted::default(),
            Err(e) => return Err(e.into()),
        };
        Ok(Store {
            inner: Arc::new(Mutex::new(persisted)),
            path: Arc::new(path),
        })
    }

    fn lock(&self) -> MutexGuard<'_, Persisted> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// What the group's state machine holds now on this member.
    pub fn facts(&self) -> GroupFacts {
        self.lock().facts.clone()
    }

    /// Whether this member has ever been part of an initialised group.
    pub fn is_empty(&self) -> bool {
        let p = self.lock();
        p.vote.is_none() && p.log.is_empty() && p.last_purged.is_none()
    }

    /// Writes the state durably (aside, sync, rename, sync the directory) and
    /// privately: it holds the group's keys. Callers hold the state's lock, so writes
    /// of the file never overlap.
    // openraft's traits return its (large) StorageError; boxing here would not help.
    #[allow(clippy::result_large_err)]
    fn persist(&self, p: &Persisted) -> Result<(), StorageError<u64>> {
        let bytes = serde_json::to_vec(p).map_err(io_err)?;
        portswitch_files::write_durable(&self.path, &bytes, SECRET_MODE).map_err(io_err)
    }

    fn snapshot_of(s: &StoredSnapshot) -> Snapshot<TypeConfig> {
        Snapshot {
            meta: s.meta.clone(),
            snapshot: Box::new(Cursor::new(s.data.clone())),
        }
    }
}

impl RaftLogReader<TypeConfig> for Store {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry<TypeConfig>>, StorageError<u64>> {
        let p = self.lock();
        // Entries of the log, and removed ones where the log has none any more.
        let mut out: BTreeMap<u64, &Entry<TypeConfig>> = p
            .removed
            .range(range.clone())
            .map(|(&i, e)| (i, e))
            .collect();
        for (&i, e) in p.log.range(range) {
            out.insert(i, e);
        }
        Ok(out.into_values().cloned().collect())
    }
}

impl RaftSnapshotBuilder<TypeConfig> for Store {
    async fn build_snapshot(&mut self) -> Result<Snapshot<TypeConfig>, StorageError<u64>> {
        let mut p = self.lock();
        let data = serde_json::to_vec(&p.facts).map_err(io_err)?;
        p.snapshot_seq += 1;
        let last = p.last_applied;
        let meta = SnapshotMeta {
            last_log_id: last,
            last_membership: p.membership.clone(),
            snapshot_id: format!(
                "{}-{}-{}",
                last.map_or(0, |l| l.leader_id.term),
                last.map_or(0, |l| l.index),
                p.snapshot_seq
            ),
        };
        let s = StoredSnapshot { meta, data };
        p.snapshot = Some(s.clone());
        self.persist(&p)?;
        Ok(Store::snapshot_of(&s))
    }
}

impl RaftStorage<TypeConfig> for Store {
    type LogReader = Store;
    type SnapshotBuilder = Store;

    async fn save_vote(&mut self, vote: &Vote<u64>) -> Result<(), StorageError<u64>> {
        let mut p = self.lock();
        p.vote = Some(*vote);
        self.persist(&p)
    }

    async fn read_vote(&mut self) -> Result<Option<Vote<u64>>, StorageError<u64>> {
        Ok(self.lock().vote)
    }

    async fn save_committed(
        &mut self,
        committed: Option<LogId<u64>>,
    ) -> Result<(), StorageError<u64>> {
        let mut p = self.lock();
        p.committed = committed;
        self.persist(&p)
    }

    async fn read_committed(&mut self) -> Result<Option<LogId<u64>>, StorageError<u64>> {
        Ok(self.lock().committed)
    }

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, StorageError<u64>> {
        let p = self.lock();
        let last = p
            .log
            .values()
            .next_back()
            .map(|e| e.log_id)
            .or(p.last_purged);
        Ok(LogState {
            last_purged_log_id: p.last_purged,
            last_log_id: last,
        })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn append_to_log<I>(&mut self, entries: I) -> Result<(), StorageError<u64>>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + OptionalSend,
    {
        let mut p = self.lock();
        for e in entries {
            p.log.insert(e.log_id.index, e);
        }
        self.persist(&p)
    }

    async fn delete_conflict_logs_since(
        &mut self,
        log_id: LogId<u64>,
    ) -> Result<(), StorageError<u64>> {
        let mut p = self.lock();
        let gone = p.log.split_off(&log_id.index);
        for (_, e) in gone {
            p.keep_removed(e);
        }
        self.persist(&p)
    }

    async fn purge_logs_upto(&mut self, log_id: LogId<u64>) -> Result<(), StorageError<u64>> {
        let mut p = self.lock();
        let kept = p.log.split_off(&(log_id.index + 1));
        let gone = std::mem::replace(&mut p.log, kept);
        for (_, e) in gone {
            p.keep_removed(e);
        }
        p.last_purged = Some(log_id);
        self.persist(&p)
    }

    async fn last_applied_state(
        &mut self,
    ) -> Result<(Option<LogId<u64>>, StoredMembership<u64, Member>), StorageError<u64>> {
        let p = self.lock();
        Ok((p.last_applied, p.membership.clone()))
    }

    async fn apply_to_state_machine(
        &mut self,
        entries: &[Entry<TypeConfig>],
    ) -> Result<Vec<Response>, StorageError<u64>> {
        let mut p = self.lock();
        let mut out = Vec::with_capacity(entries.len());
        for e in entries {
            p.last_applied = Some(e.log_id);
            match &e.payload {
                EntryPayload::Blank => out.push(Response::default()),
                EntryPayload::Normal(cmd) => {
                    let r = p.facts.apply(cmd);
                    out.push(r);
                }
                EntryPayload::Membership(m) => {
                    p.membership = StoredMembership::new(Some(e.log_id), m.clone());
                    out.push(Response::default());
                }
            }
        }
        self.persist(&p)?;
        Ok(out)
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        self.clone()
    }

    async fn begin_receiving_snapshot(
        &mut self,
    ) -> Result<Box<Cursor<Vec<u8>>>, StorageError<u64>> {
        Ok(Box::new(Cursor::new(Vec::new())))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta<u64, Member>,
        snapshot: Box<Cursor<Vec<u8>>>,
    ) -> Result<(), StorageError<u64>> {
        let data = snapshot.into_inner();
        let facts: GroupFacts = serde_json::from_slice(&data).map_err(io_err)?;
        let mut p = self.lock();
        p.facts = facts;
        p.last_applied = meta.last_log_id;
        p.membership = meta.last_membership.clone();
        p.snapshot = Some(StoredSnapshot {
            meta: meta.clone(),
            data,
        });
        self.persist(&p)
    }

    async fn get_current_snapshot(
        &mut self,
    ) -> Result<Option<Snapshot<TypeConfig>>, StorageError<u64>> {
        Ok(self.lock().snapshot.as_ref().map(Store::snapshot_of))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use openraft::CommittedLeaderId;

    fn entry(term: u64, index: u64) -> Entry<TypeConfig> {
        Entry {
            log_id: LogId::new(CommittedLeaderId::new(term, 1), index),
            payload: EntryPayload::Blank,
        }
    }

    #[tokio::test]
    async fn entries_taken_out_of_the_log_stay_readable_for_stale_readers() {
        let dir = std::env::temp_dir().join(format!("portswitch-store-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let mut s = Store::open(&dir).unwrap();
        s.append_to_log((1..=4).map(|i| entry(1, i))).await.unwrap();
        // A newer leader's entries conflict from index 3 on.
        s.delete_conflict_logs_since(LogId::new(CommittedLeaderId::new(2, 2), 3))
            .await
            .unwrap();
        let state = s.get_log_state().await.unwrap();
        assert_eq!(state.last_log_id.map(|l| l.index), Some(2));
        // The old leader's replication still reads 3..5: it gets what was there.
        let got = s.try_get_log_entries(3..5).await.unwrap();
        assert_eq!(
            got.iter().map(|e| e.log_id.index).collect::<Vec<_>>(),
            [3, 4]
        );
        // The new leader's entries take their places.
        s.append_to_log([entry(2, 3)]).await.unwrap();
        let got = s.try_get_log_entries(1..5).await.unwrap();
        let ids: Vec<_> = got
            .iter()
            .map(|e| (e.log_id.leader_id.term, e.log_id.index))
            .collect();
        assert_eq!(ids, [(1, 1), (1, 2), (2, 3), (1, 4)]);
        // Purged entries are readable too, and the log state says they are purged.
        s.purge_logs_upto(LogId::new(CommittedLeaderId::new(1, 1), 2))
            .await
            .unwrap();
        let state = s.get_log_state().await.unwrap();
        assert_eq!(state.last_purged_log_id.map(|l| l.index), Some(2));
        assert_eq!(s.try_get_log_entries(1..3).await.unwrap().len(), 2);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[tokio::test]
    async fn the_state_is_written_private_and_refused_when_it_is_not() {
        use std::os::unix::fs::PermissionsExt;
        let dir =
            std::env::temp_dir().join(format!("portswitch-store-mode-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let mut s = Store::open(&dir).unwrap();
        let vote = Vote::new(3, 1);
        s.save_vote(&vote).await.unwrap();
        let path = dir.join(RAFT_FILE);
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&path), 0o600);
        assert_eq!(mode(&dir) & 0o077, 0, "the data directory is the owner's");
        assert!(!dir.join("raft.json.tmp").exists());
        drop(s);
        assert_eq!(
            Store::open(&dir).unwrap().read_vote().await.unwrap(),
            Some(vote)
        );
        // A state others can read may have leaked the group's keys: refused, with the fix.
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o640)).unwrap();
        let err = Store::open(&dir).unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::PermissionDenied);
        assert_eq!(
            err.to_string(),
            format!(
                "{0} is readable by group or others (mode 0640); run chmod 600 {0}",
                path.display()
            )
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}
