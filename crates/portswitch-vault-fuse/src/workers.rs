//! The mount's background threads: the committer (commits whatever is uncommitted every
//! `commit_interval`) and the continuous backup (ships each commit to the backup
//! directory; runs coalesce, so a burst of commits is one run).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use portswitch_vault::{BackupReport, Vault, VaultError};

use crate::fs::{lock, Shared};
use crate::metrics::CommitReason;
use crate::{BackupTo, MountOptions};

pub(crate) struct Workers {
    stop: Arc<Stop>,
    committer: JoinHandle<()>,
    backup: Option<JoinHandle<()>>,
    shared: Arc<Shared>,
}

#[derive(Default)]
struct Stop {
    stopped: Mutex<bool>,
    wake: Condvar,
    flag: AtomicBool,
}

impl Stop {
    /// Sleeps for `d` or until stopped; answers whether stopped.
    fn sleep(&self, d: Duration) -> bool {
        let g = lock(&self.stopped);
        let (g, _) = self
            .wake
            .wait_timeout_while(g, d, |stopped| !*stopped)
            .unwrap_or_else(|p| p.into_inner());
        *g
    }
}

impl Workers {
    pub(crate) fn start(vault: Vault, shared: Arc<Shared>, opts: &MountOptions) -> Workers {
        let stop = Arc::new(Stop::default());
        let committer = {
            let (vault, shared, stop) = (vault.clone(), shared.clone(), stop.clone());
            let interval = opts.commit_interval;
            std::thread::Builder::new()
                .name("vault-commit".into())
                .spawn(move || {
                    while !stop.sleep(interval) {
                        match shared.commit(&vault, CommitReason::Timer) {
                            Ok(()) => {}
                            // The writer lost its port: no commit will ever succeed
                            // again (every change is refused with EROFS meanwhile).
                            Err(e) if e.is_fenced() => {
                                tracing::error!(error = %e, "periodic commits stopped");
                                return;
                            }
                            Err(e) => {
                                tracing::warn!(error = %e, "periodic commit failed; retrying")
                            }
                        }
                    }
                })
                .expect("spawning the committer thread")
        };
        let backup = opts.backup.clone().map(|to| {
            let (shared, stop) = (shared.clone(), stop.clone());
            std::thread::Builder::new()
                .name("vault-backup".into())
                .spawn(move || backup_loop(vault, shared, stop, to))
                .expect("spawning the backup thread")
        });
        Workers {
            stop,
            committer,
            backup,
            shared,
        }
    }

    /// Stops both threads (a backup run under way finishes first).
    pub(crate) fn stop(self) {
        *lock(&self.stop.stopped) = true;
        self.stop.flag.store(true, Ordering::Release);
        self.stop.wake.notify_all();
        // The backup thread sleeps on the shared condition variable.
        {
            let _g = lock(&self.shared.backup_due);
            self.shared.backup_wake.notify_all();
        }
        let _ = self.committer.join();
        if let Some(b) = self.backup {
            let _ = b.join();
        }
    }
}

fn backup_loop(vault: Vault, shared: Arc<Shared>, stop: Arc<Stop>, to: BackupTo) {
    // A first run at mount time ships whatever the backup is missing.
    let _ = run_backup(&vault, &shared, &to);
    loop {
        {
            let mut due = lock(&shared.backup_due);
            while !*due && !stop.flag.load(Ordering::Acquire) {
                due = shared
                    .backup_wake
                    .wait(due)
                    .unwrap_or_else(|p| p.into_inner());
            }
            if stop.flag.load(Ordering::Acquire) {
                return;
            }
            *due = false;
        }
        let _ = run_backup(&vault, &shared, &to);
    }
}

fn run_backup(vault: &Vault, shared: &Shared, to: &BackupTo) -> Result<BackupReport, VaultError> {
    shared.metrics.backups.inc();
    let r = match to {
        BackupTo::Dir(dir) => vault.backup_to(dir),
        BackupTo::Target(t) => {
            let mut t = lock(t);
            vault.backup_to_target(&mut **t)
        }
    };
    match &r {
        Ok(rep) => tracing::debug!(
            bytes = rep.bytes_shipped,
            version = rep.version,
            "continuous backup"
        ),
        Err(e) => {
            shared.metrics.backup_failures.inc();
            tracing::warn!(error = %e, target = %to.describe(), "continuous backup failed");
        }
    }
    r
}

/// The backup after the final sync of an unmount; `None` when no backup is set.
pub(crate) fn final_backup(
    vault: &Vault,
    shared: &Shared,
) -> Option<Result<BackupReport, VaultError>> {
    let to = shared.backup.as_ref()?;
    Some(run_backup(vault, shared, to))
}
