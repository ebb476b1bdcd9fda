//! Prometheus metrics of one open vault.

use std::time::Duration;

use prometheus_client::encoding::{EncodeMetric, MetricEncoder, NoLabelSet};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::{MetricType, TypedMetric};
use prometheus_client::registry::{Registry, Unit};

/// A counter of time, kept in whole nanoseconds in one atomic (adding is one
/// `fetch_add`; a `Counter<f64>` is a compare-and-swap loop) and exposed in seconds.
/// Cheap to clone (the count is shared).
#[derive(Clone, Debug, Default)]
pub struct SecondsCounter(Counter);

impl SecondsCounter {
    pub fn add(&self, d: Duration) {
        self.0
            .inc_by(u64::try_from(d.as_nanos()).unwrap_or(u64::MAX));
    }

    pub fn nanos(&self) -> u64 {
        self.0.get()
    }

    pub fn seconds(&self) -> f64 {
        self.nanos() as f64 / 1e9
    }
}

impl TypedMetric for SecondsCounter {
    const TYPE: MetricType = MetricType::Counter;
}

impl EncodeMetric for SecondsCounter {
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        encoder.encode_counter::<NoLabelSet, _, u64>(&self.seconds(), None)
    }

    fn metric_type(&self) -> MetricType {
        Self::TYPE
    }
}

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
    /// The cost of verification on reads: time spent opening block records (frame
    /// check, key lookup, AEAD authentication and decryption; not decompression), and
    /// the record bytes opened. Every open counts, the ones that fail (damage, then
    /// the mirror's or parity's copy) too. Timed once per record, not per byte.
    pub verify_seconds: SecondsCounter,
    pub verified_bytes: Counter,
    pub commits: Counter,
    pub fsyncs: Counter,
    pub cache_hits: Counter,
    pub cache_misses: Counter,
    /// Records that failed authentication (or a frame check) when read.
    pub auth_failures: Counter,
    /// Records restored from the mirror or from parity and written back in place.
    pub repairs_mirror: Counter,
    pub repairs_parity: Counter,
    /// Records restored from the copy on another node (a backup server).
    pub repairs_remote: Counter,
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
        r.register_with_unit(
            "verify",
            "time spent opening (authenticating and decrypting) block records",
            Unit::Seconds,
            self.verify_seconds.clone(),
        );
        r.register(
            "verified_bytes",
            "bytes of block records opened (authenticated)",
            self.verified_bytes.clone(),
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
            "repairs_remote",
            "records repaired from the copy on another node",
            self.repairs_remote.clone(),
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verification_time_is_exposed_in_seconds() {
        let m = Metrics::default();
        m.verify_seconds.add(Duration::from_millis(1500));
        m.verified_bytes.inc_by(4096);
        let mut r = Registry::default();
        m.register(&mut r);
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &r).unwrap();
        assert!(
            text.contains("# UNIT vault_verify_seconds seconds"),
            "{text}"
        );
        assert!(text.contains("vault_verify_seconds_total 1.5\n"), "{text}");
        assert!(text.contains("vault_verified_bytes_total 4096\n"), "{text}");
        assert_eq!(m.clone().verify_seconds.nanos(), 1_500_000_000);
    }
}
