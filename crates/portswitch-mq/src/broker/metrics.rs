//! Prometheus metrics of a broker, per queue (and per group where it matters).

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct QueueLabel {
    pub queue: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct GroupLabel {
    pub queue: String,
    pub group: String,
}

fn fsync_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.000_05, 2.0, 16))
}

/// Every family, registered once.
#[derive(Clone)]
pub struct Families {
    produced: Family<QueueLabel, Counter>,
    delivered: Family<QueueLabel, Counter>,
    redelivered: Family<QueueLabel, Counter>,
    acked: Family<QueueLabel, Counter>,
    nacked: Family<QueueLabel, Counter>,
    dead_lettered: Family<QueueLabel, Counter>,
    dead_letter_dropped: Family<QueueLabel, Counter>,
    segments_reclaimed: Family<QueueLabel, Counter>,
    log_bytes: Family<QueueLabel, Gauge>,
    fsync_seconds: Family<QueueLabel, Histogram, fn() -> Histogram>,
    depth: Family<GroupLabel, Gauge>,
    in_flight: Family<GroupLabel, Gauge>,
    selector_skipped: Family<GroupLabel, Counter>,
    selector_errors: Family<GroupLabel, Counter>,
    elections: Family<QueueLabel, Counter>,
    truncated: Family<QueueLabel, Counter>,
    unconfirmed: Family<QueueLabel, Counter>,
    replica_lag: Family<QueueLabel, Gauge>,
    pub connections: Gauge,
}

impl Families {
    pub fn register(reg: &mut Registry) -> Families {
        let f = Families {
            produced: Family::default(),
            delivered: Family::default(),
            redelivered: Family::default(),
            acked: Family::default(),
            nacked: Family::default(),
            dead_lettered: Family::default(),
            dead_letter_dropped: Family::default(),
            segments_reclaimed: Family::default(),
            log_bytes: Family::default(),
            fsync_seconds: Family::new_with_constructor(fsync_histogram),
            depth: Family::default(),
            in_flight: Family::default(),
            selector_skipped: Family::default(),
            selector_errors: Family::default(),
            elections: Family::default(),
            truncated: Family::default(),
            unconfirmed: Family::default(),
            replica_lag: Family::default(),
            connections: Gauge::default(),
        };
        reg.register("messages_produced", "Messages appended", f.produced.clone());
        reg.register(
            "messages_delivered",
            "Deliveries to consumers, redeliveries included",
            f.delivered.clone(),
        );
        reg.register(
            "messages_redelivered",
            "Deliveries after the first",
            f.redelivered.clone(),
        );
        reg.register("messages_acked", "Messages acknowledged", f.acked.clone());
        reg.register(
            "messages_nacked",
            "Messages given back by consumers",
            f.nacked.clone(),
        );
        reg.register(
            "messages_dead_lettered",
            "Messages dead-lettered (expired, too many deliveries, rejected)",
            f.dead_lettered.clone(),
        );
        reg.register(
            "dead_letters_dropped",
            "Dead letters of queues whose dead-letter queue does not exist",
            f.dead_letter_dropped.clone(),
        );
        reg.register(
            "segments_reclaimed",
            "Log segments deleted once every group settled them",
            f.segments_reclaimed.clone(),
        );
        reg.register(
            "log_bytes",
            "Bytes of the queue's partition logs on disk (last partition reported)",
            f.log_bytes.clone(),
        );
        reg.register(
            "fsync_seconds",
            "Time of each batch's fsync",
            f.fsync_seconds.clone(),
        );
        reg.register(
            "group_depth",
            "Messages a group has not settled (its lag)",
            f.depth.clone(),
        );
        reg.register(
            "group_in_flight",
            "Messages delivered to a group's consumers and not settled",
            f.in_flight.clone(),
        );
        reg.register(
            "selector_skipped",
            "Messages a group's selector did not match: settled for the group without delivery",
            f.selector_skipped.clone(),
        );
        reg.register(
            "selector_errors",
            "Messages on which a group's selector failed to evaluate (skipped too, counted apart)",
            f.selector_errors.clone(),
        );
        reg.register(
            "leader_elections",
            "Partitions of the queue this broker began to lead",
            f.elections.clone(),
        );
        reg.register(
            "records_truncated",
            "Records a replica cut because its leader did not have them (never confirmed ones)",
            f.truncated.clone(),
        );
        reg.register(
            "unconfirmed",
            "Produces and settlements refused because a majority of replicas did not hold them in time",
            f.unconfirmed.clone(),
        );
        reg.register(
            "replica_lag",
            "Records the slowest replica lacks, on partitions this broker leads (last reported)",
            f.replica_lag.clone(),
        );
        reg.register(
            "connections",
            "Client connections open",
            f.connections.clone(),
        );
        f
    }

    pub fn queue(&self, queue: &str) -> QueueMetrics {
        let l = QueueLabel {
            queue: queue.to_string(),
        };
        QueueMetrics {
            queue: queue.to_string(),
            produced: self.produced.get_or_create(&l).clone(),
            delivered: self.delivered.get_or_create(&l).clone(),
            redelivered: self.redelivered.get_or_create(&l).clone(),
            acked: self.acked.get_or_create(&l).clone(),
            nacked: self.nacked.get_or_create(&l).clone(),
            dead_lettered: self.dead_lettered.get_or_create(&l).clone(),
            dead_letter_dropped: self.dead_letter_dropped.get_or_create(&l).clone(),
            segments_reclaimed: self.segments_reclaimed.get_or_create(&l).clone(),
            log_bytes: self.log_bytes.get_or_create(&l).clone(),
            fsync_seconds: self.fsync_seconds.get_or_create(&l).clone(),
            elections: self.elections.get_or_create(&l).clone(),
            truncated: self.truncated.get_or_create(&l).clone(),
            unconfirmed: self.unconfirmed.get_or_create(&l).clone(),
            replica_lag: self.replica_lag.get_or_create(&l).clone(),
            families: self.clone(),
        }
    }
}

/// One queue's handles (cheap clones of shared counters).
#[derive(Clone)]
pub struct QueueMetrics {
    queue: String,
    pub produced: Counter,
    pub delivered: Counter,
    pub redelivered: Counter,
    pub acked: Counter,
    pub nacked: Counter,
    pub dead_lettered: Counter,
    pub dead_letter_dropped: Counter,
    pub segments_reclaimed: Counter,
    pub log_bytes: Gauge,
    pub fsync_seconds: Histogram,
    pub elections: Counter,
    pub truncated: Counter,
    pub unconfirmed: Counter,
    pub replica_lag: Gauge,
    families: Families,
}

impl QueueMetrics {
    /// A group's (depth, in-flight) gauges.
    pub fn group(&self, group: &str) -> (Gauge, Gauge) {
        let l = GroupLabel {
            queue: self.queue.clone(),
            group: group.to_string(),
        };
        (
            self.families.depth.get_or_create(&l).clone(),
            self.families.in_flight.get_or_create(&l).clone(),
        )
    }

    /// A group's (selector skipped, selector errors) counters.
    pub fn selector(&self, group: &str) -> (Counter, Counter) {
        let l = GroupLabel {
            queue: self.queue.clone(),
            group: group.to_string(),
        };
        (
            self.families.selector_skipped.get_or_create(&l).clone(),
            self.families.selector_errors.get_or_create(&l).clone(),
        )
    }
}
