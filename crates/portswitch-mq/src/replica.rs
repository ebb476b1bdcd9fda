//! The pure rules of replication: a partition's *epoch history* (which leader wrote
//! which offsets), the point up to which two replicas' logs agree, the high-water mark
//! (what a majority holds: what is confirmed), and which surveyed log a new leader
//! adopts. No I/O here but the history's small file; the broker drives it.
//!
//! A leader's epoch is the fencing token of its grant of the partition's port
//! `mq/<queue>/<partition>`: tokens only rise, so epochs do. The history is a list of
//! `(epoch, start offset)`: the records from `start` until the next entry's start were
//! written by that epoch's leader. Two replicas whose histories give the same epoch
//! for an offset hold the same record there and agree on everything before it (one
//! leader per epoch, and a follower only appends what its leader sent, after cutting
//! what disagrees): that is what makes [`agreement`] a simple walk.

use std::path::Path;

use crate::log::LogError;

/// Entries a history holds at most (one per leader change; entries that describe only
/// reclaimed records are dropped). A leader refuses to begin an epoch beyond it.
pub const EPOCHS_MAX: usize = 10_000;

/// A partition's epoch history and the highest token it has promised to follow.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Epochs {
    /// `(epoch, start)`, epochs and starts strictly rising.
    pub list: Vec<(u64, u64)>,
    /// No leader with a lower token is followed, and no candidate with a lower token
    /// is answered: the fence a new leader sets on a majority before it serves.
    pub promised: u64,
}

impl Epochs {
    /// The epoch of the record at `offset`, if any epoch covers it.
    pub fn epoch_at(&self, offset: u64) -> Option<u64> {
        let i = self.list.partition_point(|&(_, s)| s <= offset);
        (i > 0).then(|| self.list[i - 1].0)
    }

    /// The epoch of the last record of a log ending at `end` (0 for an empty log).
    pub fn last_epoch(&self, end: u64) -> u64 {
        if end == 0 {
            return 0;
        }
        self.epoch_at(end - 1).unwrap_or(0)
    }

    /// Records from `start` on belong to `epoch` (a leader beginning, or a follower
    /// learning of one). An entry with no records after it is replaced.
    pub fn begin(&mut self, epoch: u64, start: u64) -> bool {
        while let Some(&(e, s)) = self.list.last() {
            if s >= start || e >= epoch {
                self.list.pop();
            } else {
                break;
            }
        }
        if self.list.len() >= EPOCHS_MAX {
            return false;
        }
        self.list.push((epoch, start));
        true
    }

    /// Drops entries that describe only records below `start` (reclaimed).
    pub fn fold_below(&mut self, start: u64) {
        while self.list.len() > 1 && self.list[1].1 <= start {
            self.list.remove(0);
        }
    }

    /// Forgets what the history says of offsets at and above `end` (the log was cut
    /// there), keeping the entry that covers `end - 1`.
    pub fn truncate(&mut self, end: u64) {
        while self.list.len() > 1 && self.list.last().is_some_and(|&(_, s)| s >= end) {
            self.list.pop();
        }
    }

    /// Takes the leader's history for the records this log now holds up to `end`.
    pub fn follow(&mut self, leader: &[(u64, u64)], end: u64) {
        for &(e, s) in leader {
            if s < end && self.epoch_at(s) != Some(e) {
                let _ = self.begin(e, s);
            }
        }
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(16 + self.list.len() * 16);
        out.extend_from_slice(&self.promised.to_le_bytes());
        out.extend_from_slice(&(self.list.len() as u64).to_le_bytes());
        for &(e, s) in &self.list {
            out.extend_from_slice(&e.to_le_bytes());
            out.extend_from_slice(&s.to_le_bytes());
        }
        let crc = crc32c::crc32c(&out);
        out.extend_from_slice(&crc.to_le_bytes());
        out
    }

    pub fn decode(b: &[u8]) -> Option<Epochs> {
        if b.len() < 20 {
            return None;
        }
        let (body, crc) = b.split_at(b.len() - 4);
        if crc32c::crc32c(body) != u32::from_le_bytes(crc.try_into().ok()?) {
            return None;
        }
        let u = |i: usize| u64::from_le_bytes(body[i..i + 8].try_into().expect("8 bytes"));
        let promised = u(0);
        let n = u(8);
        if n > EPOCHS_MAX as u64 || body.len() as u64 != 16 + n * 16 {
            return None;
        }
        let n = n as usize;
        let list: Vec<(u64, u64)> = (0..n).map(|i| (u(16 + i * 16), u(24 + i * 16))).collect();
        if list
            .windows(2)
            .any(|w| w[0].0 >= w[1].0 || w[0].1 >= w[1].1)
        {
            return None;
        }
        Some(Epochs { list, promised })
    }

    /// Reads the history from `path` (an empty one if the file does not exist).
    pub fn load(path: &Path) -> Result<Epochs, LogError> {
        match std::fs::read(path) {
            Ok(b) => Epochs::decode(&b).ok_or_else(|| LogError::Corrupt {
                segment: path.to_path_buf(),
                position: 0,
                why: "epoch history damaged",
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Epochs::default()),
            Err(source) => Err(LogError::Io {
                path: path.to_path_buf(),
                source,
            }),
        }
    }

    /// Writes the history durably (written aside, synced, renamed).
    pub fn save(&self, path: &Path) -> Result<(), LogError> {
        portswitch_files::write_durable(path, &self.encode(), 0o600)?;
        Ok(())
    }
}

/// The offset up to which a log ending at `a_end` with history `a` and one ending at
/// `b_end` with history `b` hold the same records: the first offset where their
/// epochs differ, or the shorter end.
pub fn agreement(a: &[(u64, u64)], a_end: u64, b: &[(u64, u64)], b_end: u64) -> u64 {
    let limit = a_end.min(b_end);
    let (Some(&(_, a0)), Some(&(_, b0))) = (a.first(), b.first()) else {
        return 0;
    };
    // Below both histories' first entries lie records one of them reclaimed: compare
    // from there.
    let from = a0.max(b0);
    if from >= limit {
        return limit;
    }
    let epoch = |h: &[(u64, u64)], o: u64| {
        let i = h.partition_point(|&(_, s)| s <= o);
        (i > 0).then(|| h[i - 1].0)
    };
    // Where either history changes epoch, and the start.
    let mut points: Vec<u64> = a
        .iter()
        .chain(b.iter())
        .map(|&(_, s)| s)
        .filter(|&s| s > from && s < limit)
        .collect();
    points.push(from);
    points.sort_unstable();
    points.dedup();
    for p in points {
        // Between two points both epochs are constant: comparing at the point is enough.
        if epoch(a, p) != epoch(b, p) {
            return p;
        }
    }
    limit
}

/// The high-water mark of `replicas` replicas: the highest offset such that a
/// majority hold every record below it. `matches` are the ends of the replicas known
/// to agree with the leader (the leader's own included); unknown ones count as 0.
pub fn high_water(matches: &[u64], replicas: usize) -> u64 {
    let majority = replicas / 2 + 1;
    if matches.len() < majority {
        return 0;
    }
    let mut m = matches.to_vec();
    m.sort_unstable_by(|a, b| b.cmp(a));
    m[majority - 1]
}

/// Which brokers hold a partition: a simple configuration (`old == new`) or, while
/// replicas are being changed, a *joint* one in which a record is confirmed only once
/// a majority of `old` **and** a majority of `new` hold it (Raft's joint consensus).
/// A configuration takes effect on a replica when its record is in that replica's log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    pub old: Vec<String>,
    pub new: Vec<String>,
}

impl Config {
    pub fn simple(members: Vec<String>) -> Config {
        Config {
            old: members.clone(),
            new: members,
        }
    }

    pub fn is_joint(&self) -> bool {
        self.old != self.new
    }

    /// Every broker of `old` or `new` (`new`'s first, in order).
    pub fn members(&self) -> Vec<String> {
        let mut m = self.new.clone();
        for o in &self.old {
            if !m.contains(o) {
                m.push(o.clone());
            }
        }
        m
    }

    pub fn contains(&self, name: &str) -> bool {
        self.old.iter().chain(&self.new).any(|n| n == name)
    }

    /// Whether `names` hold a majority of each side.
    pub fn satisfied_by<'a>(&self, names: impl Iterator<Item = &'a str> + Clone) -> bool {
        let majority = |set: &[String]| {
            let n = names.clone().filter(|x| set.iter().any(|s| s == x)).count();
            n > set.len() / 2
        };
        majority(&self.old) && majority(&self.new)
    }

    /// The high-water mark under this configuration: what a majority of each side
    /// holds. `end_of` gives a replica's agreed end (0 if unknown).
    pub fn high_water(&self, end_of: impl Fn(&str) -> u64) -> u64 {
        let side = |set: &[String]| {
            let m: Vec<u64> = set.iter().map(|n| end_of(n)).collect();
            high_water(&m, set.len())
        };
        side(&self.old).min(side(&self.new))
    }
}

/// A partition's configurations over its log: the one it was created with, and each
/// change with the offset of its record. Kept in the partition's `config` file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Configs {
    pub initial: Vec<String>,
    pub changes: Vec<(u64, Config)>,
}

impl Configs {
    pub fn new(initial: Vec<String>) -> Configs {
        Configs {
            initial,
            changes: Vec::new(),
        }
    }

    /// The configuration in effect: the last one in the log.
    pub fn current(&self) -> Config {
        self.changes
            .last()
            .map_or_else(|| Config::simple(self.initial.clone()), |(_, c)| c.clone())
    }

    /// The offset of the current configuration's record (None: the initial one).
    pub fn current_offset(&self) -> Option<u64> {
        self.changes.last().map(|&(o, _)| o)
    }

    pub fn push(&mut self, offset: u64, c: Config) {
        self.changes.push((offset, c));
    }

    /// Drops changes that only describe records below `start` (reclaimed).
    pub fn fold_below(&mut self, start: u64) -> bool {
        let before = self.changes.len();
        while self.changes.len() > 1 && self.changes[1].0 <= start {
            self.changes.remove(0);
        }
        self.changes.len() != before
    }

    /// Forgets changes whose records were cut (at and above `end`).
    pub fn truncate(&mut self, end: u64) -> bool {
        let before = self.changes.len();
        self.changes.retain(|&(o, _)| o < end);
        self.changes.len() != before
    }

    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "initial": self.initial,
            "changes": self.changes.iter().map(|(o, c)| serde_json::json!({"offset": o, "old": c.old, "new": c.new})).collect::<Vec<_>>(),
        })
    }

    pub fn from_json(v: &serde_json::Value) -> Option<Configs> {
        let names = |v: &serde_json::Value| -> Option<Vec<String>> {
            v.as_array()?
                .iter()
                .map(|n| n.as_str().map(str::to_string))
                .collect()
        };
        let mut changes = Vec::new();
        for c in v["changes"].as_array()? {
            changes.push((
                c["offset"].as_u64()?,
                Config {
                    old: names(&c["old"])?,
                    new: names(&c["new"])?,
                },
            ));
        }
        Some(Configs {
            initial: names(&v["initial"])?,
            changes,
        })
    }

    /// Reads the file at `path`, or starts from `initial` if there is none.
    pub fn load(path: &Path, initial: Vec<String>) -> Result<Configs, LogError> {
        match std::fs::read(path) {
            Ok(b) => serde_json::from_slice(&b)
                .ok()
                .and_then(|v| Configs::from_json(&v))
                .ok_or_else(|| LogError::Corrupt {
                    segment: path.to_path_buf(),
                    position: 0,
                    why: "replica configuration damaged",
                }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Configs::new(initial)),
            Err(source) => Err(LogError::Io {
                path: path.to_path_buf(),
                source,
            }),
        }
    }

    pub fn save(&self, path: &Path) -> Result<(), LogError> {
        let text = serde_json::to_vec(&self.to_json()).unwrap_or_default();
        portswitch_files::write_durable(path, &text, 0o600)?;
        Ok(())
    }
}

/// What one replica told a candidate: its log's end and its history.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Survey {
    pub end: u64,
    pub epochs: Vec<(u64, u64)>,
}

impl Survey {
    fn rank(&self) -> (u64, u64) {
        let e = Epochs {
            list: self.epochs.clone(),
            promised: 0,
        };
        (e.last_epoch(self.end), self.end)
    }
}

/// Which of the surveyed logs a new leader adopts: the one whose last record has the
/// highest epoch, the longest among those. Every confirmed record is in it when the
/// surveys come from a majority (docs/MQ.md and ARCHITECTURE.md give the argument).
pub fn best(surveys: &[Survey]) -> Option<usize> {
    (0..surveys.len()).max_by_key(|&i| surveys[i].rank())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn agreement_walks_both_histories() {
        let a = [(1, 0), (3, 50)];
        let b = [(1, 0), (2, 40)];
        assert_eq!(agreement(&a, 100, &b, 90), 40);
        assert_eq!(agreement(&a, 100, &a, 70), 70);
        assert_eq!(agreement(&a, 30, &b, 90), 30);
        assert_eq!(agreement(&[], 0, &b, 90), 0);
        assert_eq!(agreement(&[(5, 0)], 10, &[(4, 0)], 10), 0);
        // A history entry with no records after it changes nothing.
        assert_eq!(agreement(&[(1, 0), (9, 20)], 20, &[(1, 0)], 25), 20);
    }

    #[test]
    fn begin_replaces_empty_epochs_and_keeps_them_rising() {
        let mut e = Epochs::default();
        assert!(e.begin(3, 0));
        assert!(e.begin(5, 10));
        assert!(e.begin(7, 10));
        assert_eq!(e.list, vec![(3, 0), (7, 10)]);
        assert_eq!(e.last_epoch(10), 3);
        assert_eq!(e.last_epoch(11), 7);
        e.truncate(10);
        assert_eq!(e.list, vec![(3, 0)]);
        e.follow(&[(3, 0), (4, 5), (8, 12)], 12);
        assert_eq!(e.list, vec![(3, 0), (4, 5)]);
        let bytes = e.encode();
        assert_eq!(Epochs::decode(&bytes), Some(e.clone()));
        let mut bad = bytes.clone();
        bad[17] ^= 1;
        assert_eq!(Epochs::decode(&bad), None);
        e.begin(9, 30);
        e.fold_below(29);
        assert_eq!(e.list, vec![(4, 5), (9, 30)]);
        e.fold_below(30);
        assert_eq!(e.list, vec![(9, 30)]);
        // A folded history still agrees with a whole one from its first entry on.
        assert_eq!(agreement(&e.list, 40, &[(3, 0), (4, 5), (9, 30)], 45), 40);
        assert_eq!(agreement(&e.list, 40, &[(3, 0), (4, 5), (8, 30)], 45), 30);
    }

    #[test]
    fn high_water_is_what_a_majority_holds() {
        assert_eq!(high_water(&[10], 1), 10);
        assert_eq!(high_water(&[10], 3), 0);
        assert_eq!(high_water(&[10, 4], 3), 4);
        assert_eq!(high_water(&[10, 4, 7], 3), 7);
        assert_eq!(high_water(&[10, 4, 7, 1, 9], 5), 7);
    }

    #[test]
    fn a_joint_configuration_needs_a_majority_of_both_sides() {
        let n = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let joint = Config {
            old: n(&["a", "b", "c"]),
            new: n(&["b", "c", "d"]),
        };
        assert!(joint.is_joint() && joint.contains("a") && joint.contains("d"));
        assert_eq!(joint.members(), n(&["b", "c", "d", "a"]));
        assert!(!joint.satisfied_by(["a", "d"].into_iter()));
        assert!(!joint.satisfied_by(["a", "b"].into_iter()));
        assert!(joint.satisfied_by(["a", "b", "d"].into_iter()));
        assert!(joint.satisfied_by(["b", "c"].into_iter()));
        let ends = |x: &str| match x {
            "a" => 10,
            "b" => 4,
            "c" => 7,
            _ => 0,
        };
        // old: {10,4,7} -> 7; new: {4,7,0} -> 4.
        assert_eq!(joint.high_water(ends), 4);
        assert_eq!(Config::simple(n(&["a", "b", "c"])).high_water(ends), 7);
        let mut cs = Configs::new(n(&["a", "b", "c"]));
        cs.push(12, joint.clone());
        cs.push(15, Config::simple(n(&["b", "c", "d"])));
        assert_eq!(Configs::from_json(&cs.to_json()), Some(cs.clone()));
        assert!(cs.truncate(15));
        assert_eq!(cs.current(), joint);
        assert!(cs.truncate(0));
        assert_eq!(cs.current(), Config::simple(n(&["a", "b", "c"])));
    }

    #[test]
    fn the_best_log_has_the_highest_last_epoch_then_the_most_records() {
        let s = |end, epochs: &[(u64, u64)]| Survey {
            end,
            epochs: epochs.to_vec(),
        };
        let v = [
            s(100, &[(1, 0)]),
            s(60, &[(1, 0), (2, 50)]),
            s(55, &[(1, 0), (2, 50)]),
        ];
        assert_eq!(best(&v), Some(1));
        assert_eq!(best(&[]), None);
    }

    /// A model of replicated logs: every log is a list of the epoch that wrote each
    /// record (a leader of an epoch writes at most once per offset). Random leader
    /// changes, surveys of random majorities, partial replication: a record a majority
    /// held when it was confirmed is in every later leader's log.
    #[derive(Debug, Clone)]
    enum Step {
        /// The leader appends n records.
        Append(u8),
        /// The leader sends its log to replica r (up to a random length).
        Replicate(u8, u8),
        /// Replica r becomes leader after surveying a majority that includes it.
        Elect(u8, u8),
    }

    fn step() -> impl Strategy<Value = Step> {
        prop_oneof![
            (1u8..4).prop_map(Step::Append),
            (0u8..5, any::<u8>()).prop_map(|(r, k)| Step::Replicate(r, k)),
            (0u8..5, any::<u8>()).prop_map(|(r, k)| Step::Elect(r, k)),
        ]
    }

    fn history(log: &[u64]) -> Vec<(u64, u64)> {
        let mut h: Vec<(u64, u64)> = Vec::new();
        for (o, &e) in log.iter().enumerate() {
            if h.last().is_none_or(|&(le, _)| le != e) {
                h.push((e, o as u64));
            }
        }
        h
    }

    proptest! {
        #[test]
        fn confirmed_records_survive_every_election(steps in prop::collection::vec(step(), 1..80)) {
            const N: usize = 5;
            // logs[r][o] = epoch of record o on replica r.
            let mut logs: Vec<Vec<u64>> = vec![Vec::new(); N];
            let mut leader = 0usize;
            let mut epoch = 1u64;
            // The leader's no-op of its epoch starts at this offset: nothing below it
            // counts as confirmed until a majority holds a record of this epoch.
            let mut epoch_start = 0u64;
            logs[0].push(epoch);
            // (offset, epoch) confirmed.
            let mut confirmed: Vec<(usize, u64)> = Vec::new();
            for s in steps {
                match s {
                    Step::Append(n) => {
                        for _ in 0..n {
                            logs[leader].push(epoch);
                        }
                    }
                    Step::Replicate(r, k) => {
                        let r = r as usize % N;
                        if r == leader {
                            continue;
                        }
                        // Cut what disagrees, then take a prefix of the leader's log.
                        let lh = history(&logs[leader]);
                        let rh = history(&logs[r]);
                        let agree = agreement(&rh, logs[r].len() as u64, &lh, logs[leader].len() as u64) as usize;
                        logs[r].truncate(agree);
                        let upto = agree + (k as usize % (logs[leader].len() - agree + 1));
                        let tail = logs[leader][agree..upto].to_vec();
                        logs[r].extend(tail);
                        // Confirm what a majority holds, counting only followers that
                        // agree with the leader, from the epoch's first record on.
                        let matches: Vec<u64> = (0..N)
                            .map(|i| {
                                let h = history(&logs[i]);
                                agreement(&h, logs[i].len() as u64, &lh, logs[leader].len() as u64)
                            })
                            .collect();
                        let hw = high_water(&matches, N);
                        if hw > epoch_start {
                            for (o, &e) in logs[leader].iter().enumerate().take(hw as usize) {
                                if !confirmed.iter().any(|&(c, _)| c == o) {
                                    confirmed.push((o, e));
                                }
                            }
                        }
                    }
                    Step::Elect(r, k) => {
                        let r = r as usize % N;
                        // A majority including r, chosen by k's bits.
                        let mut members = vec![r];
                        for i in 0..N {
                            if i != r && (k >> i) & 1 == 1 {
                                members.push(i);
                            }
                        }
                        let mut i = 0;
                        while members.len() < N / 2 + 1 {
                            if !members.contains(&i) {
                                members.push(i);
                            }
                            i += 1;
                        }
                        let surveys: Vec<Survey> = members
                            .iter()
                            .map(|&m| Survey { end: logs[m].len() as u64, epochs: history(&logs[m]) })
                            .collect();
                        let b = members[best(&surveys).expect("a majority")];
                        logs[r] = logs[b].clone();
                        leader = r;
                        epoch += 1;
                        epoch_start = logs[r].len() as u64;
                        logs[r].push(epoch);
                        for &(o, e) in &confirmed {
                            prop_assert_eq!(logs[r].get(o).copied(), Some(e), "confirmed record {} lost", o);
                        }
                    }
                }
            }
        }
    }

    /// The same model with changes of replicas: five brokers, three replicas at a time;
    /// a leader replaces one (a joint configuration, then the new one, each a record of
    /// the log); a candidate must be a replica in its log's configuration, surveys a
    /// majority of each side of it, and again of the configuration of the log it
    /// adopts. A record a majority of each side held when it was confirmed is in
    /// every later leader's log.
    #[derive(Debug, Clone)]
    enum Change {
        Append(u8),
        Replicate(u8, u8),
        Elect(u8, u8),
        /// Replace the k-th replica by the first broker that is not one.
        Replace(u8),
    }

    fn change() -> impl Strategy<Value = Change> {
        prop_oneof![
            (1u8..4).prop_map(Change::Append),
            (0u8..5, any::<u8>()).prop_map(|(r, k)| Change::Replicate(r, k)),
            (0u8..5, any::<u8>()).prop_map(|(r, k)| Change::Elect(r, k)),
            (0u8..3).prop_map(Change::Replace),
        ]
    }

    #[derive(Debug, Clone, PartialEq)]
    struct Rec {
        epoch: u64,
        config: Option<Config>,
    }

    fn name(i: usize) -> String {
        format!("b{i}")
    }

    fn config_of(log: &[Rec]) -> Config {
        log.iter()
            .rev()
            .find_map(|r| r.config.clone())
            .unwrap_or_else(|| Config::simple((0..3).map(name).collect()))
    }

    fn epochs_of(log: &[Rec]) -> Vec<(u64, u64)> {
        history(&log.iter().map(|r| r.epoch).collect::<Vec<_>>())
    }

    proptest! {
        #[test]
        fn confirmed_records_survive_changes_of_replicas(steps in prop::collection::vec(change(), 1..100)) {
            const N: usize = 5;
            let mut logs: Vec<Vec<Rec>> = vec![Vec::new(); N];
            let mut leader = 0usize;
            let mut epoch = 1u64;
            let mut epoch_start = 0u64;
            logs[0].push(Rec { epoch, config: None });
            let mut confirmed: Vec<(usize, u64)> = Vec::new();
            // Offset of a joint configuration waiting to be confirmed.
            let mut joint_at: Option<usize> = None;
            let agree = |a: &[Rec], b: &[Rec]| {
                agreement(&epochs_of(a), a.len() as u64, &epochs_of(b), b.len() as u64) as usize
            };
            for s in steps {
                match s {
                    Change::Append(n) => {
                        if config_of(&logs[leader]).contains(&name(leader)) {
                            for _ in 0..n {
                                logs[leader].push(Rec { epoch, config: None });
                            }
                        }
                    }
                    Change::Replace(k) => {
                        let c = config_of(&logs[leader]);
                        if c.is_joint() || joint_at.is_some() || !c.contains(&name(leader)) {
                            continue;
                        }
                        let from = c.new[k as usize % c.new.len()].clone();
                        let Some(to) = (0..N).map(name).find(|n| !c.new.contains(n)) else { continue };
                        let new: Vec<String> = c.new.iter().map(|n| if *n == from { to.clone() } else { n.clone() }).collect();
                        joint_at = Some(logs[leader].len());
                        logs[leader].push(Rec { epoch, config: Some(Config { old: c.new.clone(), new }) });
                    }
                    Change::Replicate(r, k) => {
                        let r = r as usize % N;
                        if r == leader {
                            continue;
                        }
                        let a = agree(&logs[r], &logs[leader]);
                        logs[r].truncate(a);
                        let upto = a + (k as usize % (logs[leader].len() - a + 1));
                        let tail = logs[leader][a..upto].to_vec();
                        logs[r].extend(tail);
                        let config = config_of(&logs[leader]);
                        let ends: Vec<u64> = (0..N).map(|i| agree(&logs[i], &logs[leader]) as u64).collect();
                        let hw = config.high_water(|n| {
                            let i: usize = n[1..].parse().expect("b<i>");
                            ends[i]
                        });
                        if hw > epoch_start {
                            for (o, rec) in logs[leader].iter().enumerate().take(hw as usize) {
                                if !confirmed.iter().any(|&(c, _)| c == o) {
                                    confirmed.push((o, rec.epoch));
                                }
                            }
                            // The joint configuration is confirmed: the new one alone.
                            if let Some(j) = joint_at {
                                if (hw as usize) > j {
                                    joint_at = None;
                                    let c = config_of(&logs[leader]);
                                    logs[leader].push(Rec { epoch, config: Some(Config::simple(c.new)) });
                                }
                            }
                        }
                    }
                    Change::Elect(r, k) => {
                        let r = r as usize % N;
                        if !config_of(&logs[r]).contains(&name(r)) {
                            continue;
                        }
                        // Survey: r, some others, then as many as each configuration
                        // met on the way needs.
                        let mut asked: Vec<usize> = vec![r];
                        let mut adopted = logs[r].clone();
                        loop {
                            let config = config_of(&adopted);
                            for i in 0..N {
                                if (k >> i) & 1 == 1 && config.contains(&name(i)) && !asked.contains(&i) {
                                    asked.push(i);
                                }
                            }
                            for m in config.members() {
                                if config.satisfied_by(asked.iter().map(|&i| name(i)).collect::<Vec<_>>().iter().map(String::as_str)) {
                                    break;
                                }
                                let i: usize = m[1..].parse().expect("b<i>");
                                if !asked.contains(&i) {
                                    asked.push(i);
                                }
                            }
                            let surveys: Vec<Survey> = asked
                                .iter()
                                .map(|&i| if i == r { Survey { end: adopted.len() as u64, epochs: epochs_of(&adopted) } } else { Survey { end: logs[i].len() as u64, epochs: epochs_of(&logs[i]) } })
                                .collect();
                            let b = asked[best(&surveys).expect("surveys")];
                            if b != r {
                                adopted = logs[b].clone();
                            }
                            if config_of(&adopted) == config {
                                break;
                            }
                        }
                        if !config_of(&adopted).contains(&name(r)) {
                            continue;
                        }
                        logs[r] = adopted;
                        leader = r;
                        epoch += 1;
                        epoch_start = logs[r].len() as u64;
                        joint_at = None;
                        // A joint configuration left by the old leader is finished by the
                        // new one once confirmed (here: noted to be finished).
                        if config_of(&logs[r]).is_joint() {
                            joint_at = logs[r].iter().rposition(|x| x.config.is_some());
                        }
                        logs[r].push(Rec { epoch, config: None });
                        for &(o, e) in &confirmed {
                            prop_assert_eq!(logs[r].get(o).map(|x| x.epoch), Some(e), "confirmed record {} lost", o);
                        }
                    }
                }
            }
        }
    }
}
