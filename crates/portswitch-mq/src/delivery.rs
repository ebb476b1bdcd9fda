//! Dispersed delivery for one consumer group on one partition: a sans-IO state
//! machine. The broker tells it what was appended and what consumers did, passes
//! the time in, and carries out the [`Effect`]s it returns (send a message to a
//! consumer, move a message to the dead-letter queue); [`Group::next_wakeup`] says
//! when to call [`Group::poll`] again if nothing else happens.
//!
//! Semantics (at-least-once, as SQS, JetStream and RabbitMQ consumers see them):
//! - A consumer joins with a *credit* (prefetch): it never has more messages in flight
//!   than that. Ready messages go out in offset order, round-robin over consumers with
//!   credit left.
//! - An in-flight message is settled by `ack` (done), `nack` (back to ready, after an
//!   optional delay) or `reject` (dead-lettered at once); `in_progress` extends its
//!   ack deadline. A message not settled within `ack_timeout_ms` — or whose consumer
//!   leaves — goes back to ready and is delivered again.
//! - A message is delivered at most `max_deliveries` times (0: no limit); the next time
//!   it would be it is dead-lettered instead ([`DeadReason::MaxDeliveries`]). A message
//!   past its `expires_ms` is dead-lettered ([`DeadReason::Expired`]) and never
//!   delivered; one before its `not_before_ms` waits.
//! - With `ordered_by_key`, a key's messages go out one at a time in offset order: a
//!   key with a message in flight or waiting (delayed or nacked with a delay) holds
//!   back its later messages (SQS FIFO message groups).
//! - The *low-water mark* is the lowest offset not yet acked or dead-lettered: the log
//!   below it may be reclaimed (by every group's mark).
//! - A message the group's selector does not match is [`Group::skip`]ped: settled for
//!   the group without being delivered (a JetStream consumer's filtered-out message).
//!   It is never outstanding, so it never holds back the low-water mark, and never
//!   delivered or dead-lettered.

use std::collections::{BTreeMap, BTreeSet};

use std::collections::HashMap;

use bytes::Bytes;

pub type ConsumerId = u64;

#[derive(Debug, Clone)]
pub struct DeliveryConfig {
    /// An in-flight message not settled within this goes back to ready.
    pub ack_timeout_ms: u64,
    /// Deliveries of one message at most; 0 for no limit.
    pub max_deliveries: u32,
    /// One message per key in flight at a time, in offset order.
    pub ordered_by_key: bool,
    /// The largest credit a consumer may ask for.
    pub credit_max: u32,
    /// Consumers in the group at most.
    pub consumers_max: usize,
}

impl Default for DeliveryConfig {
    fn default() -> DeliveryConfig {
        DeliveryConfig {
            ack_timeout_ms: 30_000,
            max_deliveries: 5,
            ordered_by_key: false,
            credit_max: 10_000,
            consumers_max: 10_000,
        }
    }
}

/// What the group knows of an appended message (the payload stays in the log).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub offset: u64,
    /// Shared with the message's bytes (no copy per group).
    pub key: Bytes,
    /// Deliver no earlier than this (0: at once).
    pub not_before_ms: u64,
    /// Dead-letter after this (0: never).
    pub expires_ms: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeadReason {
    Expired,
    MaxDeliveries,
    Rejected,
}

impl DeadReason {
    pub fn name(self) -> &'static str {
        match self {
            DeadReason::Expired => "expired",
            DeadReason::MaxDeliveries => "max_deliveries",
            DeadReason::Rejected => "rejected",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Effect {
    /// Send message `offset` to `consumer`; `attempt` counts from 1.
    Deliver {
        consumer: ConsumerId,
        offset: u64,
        attempt: u32,
    },
    /// Move message `offset` to the dead-letter queue (or drop it if there is none).
    DeadLetter { offset: u64, reason: DeadReason },
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DeliveryError {
    #[error("no consumer {0} in this group")]
    UnknownConsumer(ConsumerId),
    #[error("consumer {0} is already in this group")]
    ConsumerExists(ConsumerId),
    #[error("the group has {0} consumers, its limit")]
    TooManyConsumers(usize),
    #[error("credit {asked} is above the limit of {max}")]
    CreditTooLarge { asked: u32, max: u32 },
    #[error("message {0} is not in flight to this consumer (settled, redelivered, or never sent)")]
    NotInFlight(u64),
    #[error("message {offset} was appended out of order (expected {expected} or later)")]
    OutOfOrder { offset: u64, expected: u64 },
}

#[derive(Debug)]
struct Waiting {
    key: Bytes,
    expires_ms: u64,
    /// Deliveries so far.
    attempts: u32,
}

#[derive(Debug)]
struct InFlight {
    consumer: ConsumerId,
    deadline: u64,
    waiting: Waiting,
}

#[derive(Debug, Default)]
struct Consumer {
    credit: u32,
    in_flight: u32,
}

/// One consumer group's view of one partition.
#[derive(Debug)]
pub struct Group {
    cfg: DeliveryConfig,
    /// Deliverable now, by offset.
    ready: BTreeMap<u64, Waiting>,
    /// Not before `due`: (due, offset) and the message.
    delayed: BTreeMap<(u64, u64), Waiting>,
    /// The due time of each delayed offset.
    due_of: HashMap<u64, u64>,
    in_flight: HashMap<u64, InFlight>,
    /// (deadline, offset) of every in-flight message.
    deadlines: BTreeSet<(u64, u64)>,
    /// (expires, offset) of every ready or delayed message that expires.
    expiries: BTreeSet<(u64, u64)>,
    consumers: BTreeMap<ConsumerId, Consumer>,
    /// Round-robin: the consumer after which the next delivery looks first.
    last_served: Option<ConsumerId>,
    /// Ordered mode: messages of a key in flight or delayed.
    busy_keys: HashMap<Bytes, u32>,
    /// Offsets neither acked nor dead-lettered.
    outstanding: BTreeSet<u64>,
    next_offset: u64,
    /// Messages skipped (not for this group's selector) since it was made.
    skipped: u64,
}

impl Group {
    /// A group that starts reading at `start` (the log's start or a stored position).
    pub fn new(cfg: DeliveryConfig, start: u64) -> Group {
        Group {
            cfg,
            ready: BTreeMap::new(),
            delayed: BTreeMap::new(),
            due_of: HashMap::new(),
            in_flight: HashMap::new(),
            deadlines: BTreeSet::new(),
            expiries: BTreeSet::new(),
            consumers: BTreeMap::new(),
            last_served: None,
            busy_keys: HashMap::new(),
            outstanding: BTreeSet::new(),
            next_offset: start,
            skipped: 0,
        }
    }

    /// A message was appended that is not for this group (its selector does not match
    /// it): settled for the group at once, never delivered, never outstanding.
    pub fn skip(&mut self, offset: u64) -> Result<(), DeliveryError> {
        if offset < self.next_offset {
            return Err(DeliveryError::OutOfOrder {
                offset,
                expected: self.next_offset,
            });
        }
        self.next_offset = offset + 1;
        self.skipped += 1;
        Ok(())
    }

    /// A message was appended to the partition.
    pub fn append(&mut self, e: Entry) -> Result<(), DeliveryError> {
        if e.offset < self.next_offset {
            return Err(DeliveryError::OutOfOrder {
                offset: e.offset,
                expected: self.next_offset,
            });
        }
        self.next_offset = e.offset + 1;
        self.outstanding.insert(e.offset);
        let w = Waiting {
            // Keys matter only to ordering; unordered groups do not keep them.
            key: if self.cfg.ordered_by_key {
                e.key
            } else {
                Bytes::new()
            },
            expires_ms: e.expires_ms,
            attempts: 0,
        };
        self.wait(e.offset, w, e.not_before_ms);
        Ok(())
    }

    /// No message below `offset` will be appended (offsets that are not messages, or
    /// are settled already).
    pub fn skip_to(&mut self, offset: u64) {
        self.next_offset = self.next_offset.max(offset);
    }

    /// Puts a message in ready, or in delayed until `due`.
    fn wait(&mut self, offset: u64, w: Waiting, due: u64) {
        if w.expires_ms > 0 {
            self.expiries.insert((w.expires_ms, offset));
        }
        if due > 0 {
            if self.cfg.ordered_by_key {
                *self.busy_keys.entry(w.key.clone()).or_default() += 1;
            }
            self.delayed.insert((due, offset), w);
            self.due_of.insert(offset, due);
        } else {
            self.ready.insert(offset, w);
        }
    }

    fn release_key(&mut self, key: &[u8]) {
        if !self.cfg.ordered_by_key {
            return;
        }
        if let Some(n) = self.busy_keys.get_mut(key) {
            *n -= 1;
            if *n == 0 {
                self.busy_keys.remove(key);
            }
        }
    }

    pub fn join(&mut self, consumer: ConsumerId, credit: u32) -> Result<(), DeliveryError> {
        if self.consumers.contains_key(&consumer) {
            return Err(DeliveryError::ConsumerExists(consumer));
        }
        if self.consumers.len() >= self.cfg.consumers_max {
            return Err(DeliveryError::TooManyConsumers(self.consumers.len()));
        }
        self.check_credit(credit)?;
        self.consumers.insert(
            consumer,
            Consumer {
                credit,
                in_flight: 0,
            },
        );
        Ok(())
    }

    fn check_credit(&self, credit: u32) -> Result<(), DeliveryError> {
        if credit > self.cfg.credit_max {
            return Err(DeliveryError::CreditTooLarge {
                asked: credit,
                max: self.cfg.credit_max,
            });
        }
        Ok(())
    }

    /// Changes a consumer's credit (messages already in flight stay).
    pub fn set_credit(&mut self, consumer: ConsumerId, credit: u32) -> Result<(), DeliveryError> {
        self.check_credit(credit)?;
        self.consumers
            .get_mut(&consumer)
            .ok_or(DeliveryError::UnknownConsumer(consumer))?
            .credit = credit;
        Ok(())
    }

    /// A consumer left (or its session ended): what it had in flight is ready again.
    pub fn leave(&mut self, consumer: ConsumerId) -> Result<(), DeliveryError> {
        self.consumers
            .remove(&consumer)
            .ok_or(DeliveryError::UnknownConsumer(consumer))?;
        let mine: Vec<u64> = self
            .in_flight
            .iter()
            .filter(|(_, f)| f.consumer == consumer)
            .map(|(&o, _)| o)
            .collect();
        for offset in mine {
            self.requeue(offset, 0);
        }
        if self.last_served == Some(consumer) {
            self.last_served = None;
        }
        Ok(())
    }

    /// Takes `offset` out of flight (it must be `consumer`'s).
    fn take(&mut self, consumer: ConsumerId, offset: u64) -> Result<InFlight, DeliveryError> {
        if !self.consumers.contains_key(&consumer) {
            return Err(DeliveryError::UnknownConsumer(consumer));
        }
        match self.in_flight.get(&offset) {
            Some(f) if f.consumer == consumer => {}
            _ => return Err(DeliveryError::NotInFlight(offset)),
        }
        let f = self.in_flight.remove(&offset).expect("checked");
        self.deadlines.remove(&(f.deadline, offset));
        if let Some(c) = self.consumers.get_mut(&f.consumer) {
            c.in_flight -= 1;
        }
        Ok(f)
    }

    /// Back to waiting (after `delay_ms` from `now` if `due` > 0), its key released
    /// from flight.
    fn requeue(&mut self, offset: u64, due: u64) {
        let Some(f) = self.in_flight.remove(&offset) else {
            return;
        };
        self.deadlines.remove(&(f.deadline, offset));
        if let Some(c) = self.consumers.get_mut(&f.consumer) {
            c.in_flight -= 1;
        }
        self.release_key(&f.waiting.key);
        self.wait(offset, f.waiting, due);
    }

    /// The consumer is done with the message.
    pub fn ack(&mut self, consumer: ConsumerId, offset: u64) -> Result<(), DeliveryError> {
        let f = self.take(consumer, offset)?;
        self.release_key(&f.waiting.key);
        self.outstanding.remove(&offset);
        Ok(())
    }

    /// The consumer gives the message back, to be delivered again after `delay_ms`.
    pub fn nack(
        &mut self,
        consumer: ConsumerId,
        offset: u64,
        delay_ms: u64,
        now: u64,
    ) -> Result<(), DeliveryError> {
        let f = self.take(consumer, offset)?;
        self.release_key(&f.waiting.key);
        let due = if delay_ms > 0 { now + delay_ms } else { 0 };
        self.wait(offset, f.waiting, due);
        Ok(())
    }

    /// The consumer refuses the message for good: dead-lettered at once.
    pub fn reject(&mut self, consumer: ConsumerId, offset: u64) -> Result<Effect, DeliveryError> {
        let f = self.take(consumer, offset)?;
        self.release_key(&f.waiting.key);
        self.outstanding.remove(&offset);
        Ok(Effect::DeadLetter {
            offset,
            reason: DeadReason::Rejected,
        })
    }

    /// The consumer is still working on the message: its ack deadline restarts.
    pub fn in_progress(
        &mut self,
        consumer: ConsumerId,
        offset: u64,
        now: u64,
    ) -> Result<(), DeliveryError> {
        match self.in_flight.get_mut(&offset) {
            Some(f) if f.consumer == consumer => {
                self.deadlines.remove(&(f.deadline, offset));
                f.deadline = now + self.cfg.ack_timeout_ms;
                self.deadlines.insert((f.deadline, offset));
                Ok(())
            }
            _ if !self.consumers.contains_key(&consumer) => {
                Err(DeliveryError::UnknownConsumer(consumer))
            }
            _ => Err(DeliveryError::NotInFlight(offset)),
        }
    }

    /// Everything due by `now`: timed-out messages back to ready, delayed ones ready,
    /// expired ones dead-lettered, ready ones delivered to consumers with credit.
    pub fn poll(&mut self, now: u64) -> Vec<Effect> {
        let mut out = Vec::new();
        while let Some(&(deadline, offset)) = self.deadlines.first() {
            if deadline > now {
                break;
            }
            self.requeue(offset, 0);
        }
        while let Some((&(due, offset), _)) = self.delayed.first_key_value() {
            if due > now {
                break;
            }
            let w = self.delayed.remove(&(due, offset)).expect("first");
            self.due_of.remove(&offset);
            self.release_key(&w.key);
            self.ready.insert(offset, w);
        }
        while let Some(&(expires, offset)) = self.expiries.first() {
            if expires > now {
                break;
            }
            self.expiries.remove(&(expires, offset));
            // Only ready or delayed messages are in `expiries`; one in flight when it
            // expires is settled by its consumer (or expires when it comes back).
            let w = match self.ready.remove(&offset) {
                Some(w) => Some(w),
                None => self.due_of.remove(&offset).and_then(|due| {
                    let w = self.delayed.remove(&(due, offset));
                    if let Some(w) = &w {
                        self.release_key(&w.key);
                    }
                    w
                }),
            };
            if w.is_some() {
                self.outstanding.remove(&offset);
                out.push(Effect::DeadLetter {
                    offset,
                    reason: DeadReason::Expired,
                });
            }
        }
        self.dispatch(now, &mut out);
        out
    }

    /// The next consumer after the last one served that has credit left.
    fn next_consumer(&self) -> Option<ConsumerId> {
        let has_room = |c: &Consumer| c.in_flight < c.credit;
        let after = self.last_served.map_or(0, |c| c + 1);
        self.consumers
            .range(after..)
            .chain(self.consumers.range(..after))
            .find(|(_, c)| has_room(c))
            .map(|(&id, _)| id)
    }

    fn dispatch(&mut self, now: u64, out: &mut Vec<Effect>) {
        let mut cursor = 0u64;
        loop {
            let Some(consumer) = self.next_consumer() else {
                return;
            };
            // The first ready message at or after the cursor whose key may go (in
            // ordered mode a key with a message in flight or delayed waits; the ready
            // messages passed over are all of such keys, so none of them goes ahead
            // of an earlier one of its key).
            let found = self
                .ready
                .range(cursor..)
                .find(|(_, w)| !self.cfg.ordered_by_key || !self.busy_keys.contains_key(&w.key))
                .map(|(&o, _)| o);
            let Some(offset) = found else {
                return;
            };
            cursor = offset + 1;
            let mut w = self.ready.remove(&offset).expect("found");
            if w.expires_ms > 0 {
                self.expiries.remove(&(w.expires_ms, offset));
            }
            if self.cfg.max_deliveries > 0 && w.attempts >= self.cfg.max_deliveries {
                self.outstanding.remove(&offset);
                out.push(Effect::DeadLetter {
                    offset,
                    reason: DeadReason::MaxDeliveries,
                });
                continue;
            }
            w.attempts += 1;
            let attempt = w.attempts;
            if self.cfg.ordered_by_key {
                *self.busy_keys.entry(w.key.clone()).or_default() += 1;
            }
            let deadline = now + self.cfg.ack_timeout_ms;
            self.deadlines.insert((deadline, offset));
            self.in_flight.insert(
                offset,
                InFlight {
                    consumer,
                    deadline,
                    waiting: w,
                },
            );
            if let Some(c) = self.consumers.get_mut(&consumer) {
                c.in_flight += 1;
            }
            self.last_served = Some(consumer);
            out.push(Effect::Deliver {
                consumer,
                offset,
                attempt,
            });
        }
    }

    /// When [`Group::poll`] next has something to do without any other input: the
    /// earliest ack deadline, delay or expiry.
    pub fn next_wakeup(&self) -> Option<u64> {
        [
            self.deadlines.first().map(|&(t, _)| t),
            self.delayed.first_key_value().map(|(&(t, _), _)| t),
            self.expiries.first().map(|&(t, _)| t),
        ]
        .into_iter()
        .flatten()
        .min()
    }

    /// The consumer that has message `offset` in flight, if any.
    pub fn holder(&self, offset: u64) -> Option<ConsumerId> {
        self.in_flight.get(&offset).map(|f| f.consumer)
    }

    /// The lowest offset neither acked nor dead-lettered (the end if none).
    pub fn low_water(&self) -> u64 {
        self.outstanding
            .first()
            .copied()
            .unwrap_or(self.next_offset)
    }

    pub fn stats(&self) -> GroupStats {
        GroupStats {
            ready: self.ready.len(),
            delayed: self.delayed.len(),
            in_flight: self.in_flight.len(),
            consumers: self.consumers.len(),
            outstanding: self.outstanding.len(),
            skipped: self.skipped,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GroupStats {
    pub ready: usize,
    pub delayed: usize,
    pub in_flight: usize,
    pub consumers: usize,
    /// Neither acked nor dead-lettered (the group's lag).
    pub outstanding: usize,
    /// Skipped by the group's selector since the state was built.
    pub skipped: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(offset: u64) -> Entry {
        Entry {
            offset,
            key: Bytes::new(),
            not_before_ms: 0,
            expires_ms: 0,
        }
    }

    fn delivered(effects: &[Effect]) -> Vec<u64> {
        effects
            .iter()
            .filter_map(|e| match e {
                Effect::Deliver { offset, .. } => Some(*offset),
                Effect::DeadLetter { .. } => None,
            })
            .collect()
    }

    /// Offsets 0..10; the even ones match. Skipped ones are never delivered, never
    /// outstanding, and do not hold the low-water mark back.
    #[test]
    fn skipped_messages_are_settled_and_never_delivered() {
        let mut g = Group::new(DeliveryConfig::default(), 0);
        g.join(1, 100).unwrap();
        for o in 0..10 {
            if o % 2 == 0 {
                g.append(entry(o)).unwrap();
            } else {
                g.skip(o).unwrap();
            }
        }
        assert_eq!(g.stats().outstanding, 5);
        assert_eq!(g.stats().skipped, 5);
        assert_eq!(g.low_water(), 0);
        let got = delivered(&g.poll(0));
        assert_eq!(got, vec![0, 2, 4, 6, 8]);
        for o in got {
            g.ack(1, o).unwrap();
        }
        // Past the last (skipped) message: nothing outstanding, the mark at the end.
        assert_eq!(g.stats().outstanding, 0);
        assert_eq!(g.low_water(), 10);
        // Time passing (ack timeouts, expiries) brings none of them back.
        assert!(g.poll(10_000_000).is_empty());
        assert_eq!(g.next_wakeup(), None);
        // Settling a skipped message is refused: it was never in flight.
        assert_eq!(g.ack(1, 1), Err(DeliveryError::NotInFlight(1)));
    }

    #[test]
    fn a_skipped_head_does_not_hold_the_mark_and_order_is_checked() {
        let mut g = Group::new(DeliveryConfig::default(), 5);
        g.skip(5).unwrap();
        g.skip(6).unwrap();
        assert_eq!(g.low_water(), 7);
        g.append(entry(9)).unwrap();
        assert_eq!(g.low_water(), 9);
        assert_eq!(
            g.skip(8),
            Err(DeliveryError::OutOfOrder {
                offset: 8,
                expected: 10
            })
        );
        g.skip(12).unwrap();
        g.join(1, 1).unwrap();
        assert_eq!(delivered(&g.poll(0)), vec![9]);
        g.ack(1, 9).unwrap();
        assert_eq!(g.low_water(), 13);
    }

    /// In ordered mode a skipped message of a key does not make the key busy: the
    /// key's next matching message goes at once.
    #[test]
    fn skipping_does_not_hold_a_key_in_ordered_mode() {
        let cfg = DeliveryConfig {
            ordered_by_key: true,
            ..DeliveryConfig::default()
        };
        let mut g = Group::new(cfg, 0);
        g.join(1, 10).unwrap();
        let k = |o| Entry {
            key: Bytes::from_static(b"k"),
            ..entry(o)
        };
        g.skip(0).unwrap();
        g.append(k(1)).unwrap();
        g.skip(2).unwrap();
        g.append(k(3)).unwrap();
        assert_eq!(delivered(&g.poll(0)), vec![1]);
        g.ack(1, 1).unwrap();
        assert_eq!(delivered(&g.poll(0)), vec![3]);
        g.ack(1, 3).unwrap();
        assert_eq!(g.low_water(), 4);
    }
}
