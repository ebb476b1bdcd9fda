//! Prometheus metrics of one open vault.

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

/// Every counter of one open vault. Cheap to clone (the counters are shared).
#[derive(Clone, Debug, Default)]
pub struct Metrics {
    /// `read` calls and the logical bytes they returned.
    pub reads: Counter,
    pub read_bytes: Counter,
    /// `write` calls and the logical bytes they took.
    pub writes: Counter,
    pub write_bytes: Counter,
    /// Block plaintext bytes sealed, and the record bytes they took on disk.
    pub block_logical_bytes: Counter,
    pub block_disk_bytes: Counter,
    /// Bytes appended to segments (all records, before mirror copies).
    pub appended_bytes: Counter,
    pub blocks_sealed: Counter,
    pub blocks_compressed: Counter,
    pub blocks_opened: Counter,
    pub commits: Counter,
    pub fsyncs: Counter,
    pub cache_hits: Counter,
    pub cache_misses: Counter,
    /// Records that failed authentication (or a frame check) when read.
    pub auth_failures: Counter,
    /// Records restored from the mirror or from parity and written back in place.
    pub repairs_mirror: Counter,
    pub repairs_parity: Counter,
    /// Damaged records with no good copy (each read of one answers `Corrupt`).
    pub unrepaired: Counter,
    pub backup_bytes: Counter,
    pub backup_failures: Counter,
    pub gc_runs: Counter,
    pub key_rotations: Counter,
    pub version: Gauge,
    pub dirty_bytes: Gauge,
    pub cache_bytes: Gauge,
    pub segments: Gauge,
}

impl Metrics {
    /// Registers every metric under `vault_` in `registry`.
    pub fn register(&self, registry: &mut Registry) {
        let r = registry.sub_registry_with_prefix("vault");
        r.register("reads", "read calls", self.reads.clone());
        r.register("read_bytes", "logical bytes read", self.read_bytes.clone());
        r.register("writes", "write calls", self.writes.clone());
        r.register(
            "write_bytes",
            "logical bytes written",
            self.write_bytes.clone(),
        );
        r.register(
            "block_logical_bytes",
            "block plaintext bytes sealed",
            self.block_logical_bytes.clone(),
        );
        r.register(
            "block_disk_bytes",
            "bytes the sealed block records take on disk",
            self.block_disk_bytes.clone(),
        );
        r.register(
            "appended_bytes",
            "bytes appended to segments",
            self.appended_bytes.clone(),
        );
        r.register(
            "blocks_sealed",
            "block records sealed",
            self.blocks_sealed.clone(),
        );
        r.register(
            "blocks_compressed",
            "block records stored compressed",
            self.blocks_compressed.clone(),
        );
        r.register(
            "blocks_opened",
            "block records opened",
            self.blocks_opened.clone(),
        );
        r.register("commits", "commits", self.commits.clone());
        r.register("fsyncs", "durable commits", self.fsyncs.clone());
        r.register("cache_hits", "block cache hits", self.cache_hits.clone());
        r.register(
            "cache_misses",
            "block cache misses",
            self.cache_misses.clone(),
        );
        r.register(
            "auth_failures",
            "records that failed authentication when read",
            self.auth_failures.clone(),
        );
        r.register(
            "repairs_mirror",
            "records repaired from the mirror",
            self.repairs_mirror.clone(),
        );
        r.register(
            "repairs_parity",
            "records repaired from parity",
            self.repairs_parity.clone(),
        );
        r.register(
            "unrepaired",
            "damaged records with no good copy",
            self.unrepaired.clone(),
        );
        r.register(
            "backup_bytes",
            "bytes shipped to backups",
            self.backup_bytes.clone(),
        );
        r.register(
            "backup_failures",
            "continuous backups that failed",
            self.backup_failures.clone(),
        );
        r.register("gc_runs", "gc runs", self.gc_runs.clone());
        r.register(
            "key_rotations",
            "data key rotations",
            self.key_rotations.clone(),
        );
        r.register("version", "head version", self.version.clone());
        r.register(
            "dirty_bytes",
            "uncommitted block bytes",
            self.dirty_bytes.clone(),
        );
        r.register(
            "cache_bytes",
            "decrypted block cache bytes",
            self.cache_bytes.clone(),
        );
        r.register("segments", "segment files", self.segments.clone());
    }
}
