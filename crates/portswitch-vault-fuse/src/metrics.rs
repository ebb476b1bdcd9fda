//! Prometheus counters of one mount: requests and errors by operation, commits by
//! reason, backups. The vault's own counters (bytes, blocks, repairs) are
//! `Vault::metrics`.

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;

type Labels = Vec<(&'static str, &'static str)>;

/// The file-system operations counted, one label value each.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Op {
    Lookup,
    Getattr,
    Setattr,
    Readlink,
    Mknod,
    Mkdir,
    Unlink,
    Rmdir,
    Symlink,
    Rename,
    Link,
    Open,
    Read,
    Write,
    Flush,
    Release,
    Fsync,
    Opendir,
    Readdir,
    Releasedir,
    Fsyncdir,
    Statfs,
    Create,
}

impl Op {
    const ALL: [Op; 23] = [
        Op::Lookup,
        Op::Getattr,
        Op::Setattr,
        Op::Readlink,
        Op::Mknod,
        Op::Mkdir,
        Op::Unlink,
        Op::Rmdir,
        Op::Symlink,
        Op::Rename,
        Op::Link,
        Op::Open,
        Op::Read,
        Op::Write,
        Op::Flush,
        Op::Release,
        Op::Fsync,
        Op::Opendir,
        Op::Readdir,
        Op::Releasedir,
        Op::Fsyncdir,
        Op::Statfs,
        Op::Create,
    ];

    pub(crate) fn name(self) -> &'static str {
        match self {
            Op::Lookup => "lookup",
            Op::Getattr => "getattr",
            Op::Setattr => "setattr",
            Op::Readlink => "readlink",
            Op::Mknod => "mknod",
            Op::Mkdir => "mkdir",
            Op::Unlink => "unlink",
            Op::Rmdir => "rmdir",
            Op::Symlink => "symlink",
            Op::Rename => "rename",
            Op::Link => "link",
            Op::Open => "open",
            Op::Read => "read",
            Op::Write => "write",
            Op::Flush => "flush",
            Op::Release => "release",
            Op::Fsync => "fsync",
            Op::Opendir => "opendir",
            Op::Readdir => "readdir",
            Op::Releasedir => "releasedir",
            Op::Fsyncdir => "fsyncdir",
            Op::Statfs => "statfs",
            Op::Create => "create",
        }
    }
}

/// Why a commit was made.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum CommitReason {
    /// A written file was closed.
    Close,
    /// The periodic commit of whatever was uncommitted.
    Timer,
    /// fsync / fdatasync / fsyncdir (durable).
    Fsync,
}

/// Every counter of one mount. Cheap to clone (the counters are shared).
#[derive(Clone, Debug)]
pub struct FuseMetrics {
    requests: Family<Labels, Counter>,
    errors: Family<Labels, Counter>,
    commits: Family<Labels, Counter>,
    // The same counters as the families hold, by index, so a request does not hash
    // its labels.
    requests_by_op: Vec<Counter>,
    errors_by_op: Vec<Counter>,
    commits_by_reason: [Counter; 3],
    /// Commits that failed (the changes stay uncommitted and are tried again).
    pub commit_failures: Counter,
    /// Reads answered EIO because a block failed authentication and had no good copy.
    pub corrupt_reads: Counter,
    /// Continuous-backup runs and the failed ones.
    pub backups: Counter,
    pub backup_failures: Counter,
}

impl Default for FuseMetrics {
    fn default() -> Self {
        let requests = Family::<Labels, Counter>::default();
        let errors = Family::<Labels, Counter>::default();
        let commits = Family::<Labels, Counter>::default();
        let requests_by_op = Op::ALL
            .iter()
            .map(|op| requests.get_or_create(&vec![("op", op.name())]).clone())
            .collect();
        let errors_by_op = Op::ALL
            .iter()
            .map(|op| errors.get_or_create(&vec![("op", op.name())]).clone())
            .collect();
        let commits_by_reason = ["close", "timer", "fsync"]
            .map(|r| commits.get_or_create(&vec![("reason", r)]).clone());
        FuseMetrics {
            requests,
            errors,
            commits,
            requests_by_op,
            errors_by_op,
            commits_by_reason,
            commit_failures: Counter::default(),
            corrupt_reads: Counter::default(),
            backups: Counter::default(),
            backup_failures: Counter::default(),
        }
    }
}

impl FuseMetrics {
    pub(crate) fn request(&self, op: Op) {
        self.requests_by_op[op as usize].inc();
    }

    pub(crate) fn error(&self, op: Op) {
        self.errors_by_op[op as usize].inc();
    }

    pub(crate) fn commit(&self, reason: CommitReason) {
        self.commits_by_reason[reason as usize].inc();
    }

    /// Requests of one operation so far (`"read"`, `"write"`, ...).
    pub fn requests_of(&self, op: &'static str) -> u64 {
        self.requests.get_or_create(&vec![("op", op)]).get()
    }

    /// Commits so far for one reason: `"close"`, `"timer"` or `"fsync"`.
    pub fn commits_of(&self, reason: &'static str) -> u64 {
        self.commits.get_or_create(&vec![("reason", reason)]).get()
    }

    /// Registers every counter under `vault_fuse_`.
    pub fn register(&self, registry: &mut Registry) {
        let r = registry.sub_registry_with_prefix("vault_fuse");
        r.register(
            "requests",
            "FUSE requests by operation",
            self.requests.clone(),
        );
        r.register(
            "errors",
            "FUSE requests answered with an error, by operation",
            self.errors.clone(),
        );
        r.register("commits", "commits by reason", self.commits.clone());
        r.register(
            "commit_failures",
            "commits that failed (retried)",
            self.commit_failures.clone(),
        );
        r.register(
            "corrupt_reads",
            "reads answered EIO: a block failed authentication with no good copy",
            self.corrupt_reads.clone(),
        );
        r.register("backups", "continuous backup runs", self.backups.clone());
        r.register(
            "backup_failures",
            "continuous backup runs that failed",
            self.backup_failures.clone(),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_by_index_are_the_registered_ones() {
        let m = FuseMetrics::default();
        m.request(Op::Create);
        m.request(Op::Read);
        m.request(Op::Read);
        m.commit(CommitReason::Fsync);
        assert_eq!(m.requests_of("read"), 2);
        assert_eq!(m.requests_of("create"), 1);
        assert_eq!(m.commits_of("fsync"), 1);
        assert_eq!(m.commits_of("close"), 0);
        let mut r = Registry::default();
        m.register(&mut r);
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &r).unwrap();
        assert!(
            text.contains("vault_fuse_requests_total{op=\"read\"} 2"),
            "{text}"
        );
    }
}
