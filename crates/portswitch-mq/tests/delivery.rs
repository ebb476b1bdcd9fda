//! The delivery state machine against its rules, over random histories: appends with
//! keys, delays and TTLs; consumers joining, leaving, changing credit; acks, nacks,
//! rejects, in-progress; time passing. After every step the rules are checked against
//! what the effects said, and at the end a patient consumer settles everything.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use portswitch_mq::delivery::{DeadReason, DeliveryConfig, DeliveryError, Effect, Entry, Group};
use proptest::prelude::*;

#[derive(Debug, Clone)]
enum Op {
    Append { key: u8, delay: u64, ttl: u64 },
    Join { consumer: u64, credit: u32 },
    Leave { consumer: u64 },
    Credit { consumer: u64, credit: u32 },
    Ack { pick: usize },
    Nack { pick: usize, delay: u64 },
    Reject { pick: usize },
    Progress { pick: usize },
    Advance { ms: u64 },
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (0u8..4, prop_oneof![3 => Just(0u64), 1 => 1u64..500], prop_oneof![3 => Just(0u64), 1 => 1u64..2_000])
            .prop_map(|(key, delay, ttl)| Op::Append { key, delay, ttl }),
        1 => (0u64..4, 0u32..4).prop_map(|(consumer, credit)| Op::Join { consumer, credit }),
        1 => (0u64..4).prop_map(|consumer| Op::Leave { consumer }),
        1 => (0u64..4, 0u32..4).prop_map(|(consumer, credit)| Op::Credit { consumer, credit }),
        4 => any::<usize>().prop_map(|pick| Op::Ack { pick }),
        1 => (any::<usize>(), 0u64..300).prop_map(|(pick, delay)| Op::Nack { pick, delay }),
        1 => any::<usize>().prop_map(|pick| Op::Reject { pick }),
        1 => any::<usize>().prop_map(|pick| Op::Progress { pick }),
        3 => (1u64..400).prop_map(|ms| Op::Advance { ms }),
    ]
}

/// What the effects and inputs say, kept beside the group.
#[derive(Default)]
struct Seen {
    /// offset -> (key, not_before, expires)
    appended: BTreeMap<u64, (u8, u64, u64)>,
    /// offset -> (consumer, attempt)
    in_flight: HashMap<u64, (u64, u32)>,
    credit: HashMap<u64, u32>,
    settled: BTreeSet<u64>,
    dead: BTreeMap<u64, DeadReason>,
    deliveries: HashMap<u64, u32>,
    /// Per key, offsets in the order of their first delivery.
    first_delivered: HashMap<u8, Vec<u64>>,
}

fn check(cfg: &DeliveryConfig, seen: &mut Seen, now: u64, effects: &[Effect]) {
    for e in effects {
        match *e {
            Effect::Deliver {
                consumer,
                offset,
                attempt,
            } => {
                let (key, not_before, expires) = seen.appended[&offset];
                assert!(
                    !seen.settled.contains(&offset),
                    "delivered {offset} after it was settled"
                );
                assert!(
                    !seen.in_flight.contains_key(&offset),
                    "delivered {offset} twice at once"
                );
                assert!(now >= not_before, "delivered {offset} before its time");
                assert!(
                    expires == 0 || now < expires,
                    "delivered {offset} after it expired"
                );
                let n = seen.deliveries.entry(offset).or_default();
                *n += 1;
                assert_eq!(attempt, *n, "attempt numbers count deliveries");
                assert!(cfg.max_deliveries == 0 || *n <= cfg.max_deliveries);
                seen.in_flight.insert(offset, (consumer, attempt));
                let mine = seen
                    .in_flight
                    .values()
                    .filter(|(c, _)| *c == consumer)
                    .count();
                assert!(
                    mine as u32 <= seen.credit[&consumer],
                    "consumer {consumer} over its credit"
                );
                if cfg.ordered_by_key {
                    let others = seen
                        .in_flight
                        .keys()
                        .filter(|&&o| o != offset && seen.appended[&o].0 == key)
                        .count();
                    assert_eq!(others, 0, "two messages of key {key} in flight");
                    let order = seen.first_delivered.entry(key).or_default();
                    if *n == 1 {
                        if let Some(&last) = order.last() {
                            assert!(last < offset, "key {key}: {offset} went before {last}");
                        }
                        order.push(offset);
                    }
                    // No earlier message of the key is still waiting.
                    for (&o, &(k, _, _)) in seen.appended.range(..offset) {
                        if k == key {
                            assert!(
                                seen.settled.contains(&o),
                                "key {key}: {offset} overtook {o}"
                            );
                        }
                    }
                }
            }
            Effect::DeadLetter { offset, reason } => {
                assert!(
                    !seen.settled.contains(&offset),
                    "dead-lettered {offset} twice"
                );
                assert!(!seen.in_flight.contains_key(&offset) || reason == DeadReason::Rejected);
                match reason {
                    DeadReason::Expired => {
                        let e = seen.appended[&offset].2;
                        assert!(e > 0 && now >= e, "{offset} expired early");
                    }
                    DeadReason::MaxDeliveries => {
                        assert_eq!(
                            seen.deliveries.get(&offset).copied().unwrap_or(0),
                            cfg.max_deliveries
                        )
                    }
                    DeadReason::Rejected => {}
                }
                seen.in_flight.remove(&offset);
                seen.settled.insert(offset);
                seen.dead.insert(offset, reason);
            }
        }
    }
}

fn run(ordered: bool, max_deliveries: u32, ops: Vec<Op>) {
    let cfg = DeliveryConfig {
        ack_timeout_ms: 1_000,
        max_deliveries,
        ordered_by_key: ordered,
        credit_max: 8,
        consumers_max: 3,
    };
    let mut g = Group::new(cfg.clone(), 0);
    let mut seen = Seen::default();
    let mut now = 1u64;
    let mut next = 0u64;
    let pick_in_flight = |seen: &Seen, pick: usize| -> Option<(u64, u64)> {
        let mut v: Vec<(u64, u64)> = seen.in_flight.iter().map(|(&o, &(c, _))| (o, c)).collect();
        v.sort();
        (!v.is_empty()).then(|| v[pick % v.len()])
    };
    let mut deadlines: HashMap<u64, u64> = HashMap::new();
    for op in ops {
        match op {
            Op::Append { key, delay, ttl } => {
                let not_before = if delay > 0 { now + delay } else { 0 };
                let expires = if ttl > 0 { now + ttl } else { 0 };
                g.append(Entry {
                    offset: next,
                    key: vec![key].into(),
                    not_before_ms: not_before,
                    expires_ms: expires,
                })
                .unwrap();
                seen.appended.insert(next, (key, not_before, expires));
                next += 1;
            }
            Op::Join { consumer, credit } => match g.join(consumer, credit) {
                Ok(()) => {
                    seen.credit.insert(consumer, credit);
                }
                Err(DeliveryError::ConsumerExists(_)) => {
                    assert!(seen.credit.contains_key(&consumer))
                }
                Err(DeliveryError::TooManyConsumers(n)) => assert_eq!(n, 3),
                Err(e) => panic!("{e}"),
            },
            Op::Leave { consumer } => match g.leave(consumer) {
                Ok(()) => {
                    seen.credit.remove(&consumer);
                    seen.in_flight.retain(|_, (c, _)| *c != consumer);
                }
                Err(e) => {
                    assert_eq!(e, DeliveryError::UnknownConsumer(consumer));
                    assert!(!seen.credit.contains_key(&consumer));
                }
            },
            Op::Credit { consumer, credit } => {
                if g.set_credit(consumer, credit).is_ok() {
                    seen.credit.insert(consumer, credit);
                }
            }
            Op::Ack { pick } => {
                if let Some((o, c)) = pick_in_flight(&seen, pick) {
                    g.ack(c, o).unwrap();
                    seen.in_flight.remove(&o);
                    seen.settled.insert(o);
                }
            }
            Op::Nack { pick, delay } => {
                if let Some((o, c)) = pick_in_flight(&seen, pick) {
                    g.nack(c, o, delay, now).unwrap();
                    seen.in_flight.remove(&o);
                }
            }
            Op::Reject { pick } => {
                if let Some((o, c)) = pick_in_flight(&seen, pick) {
                    let e = g.reject(c, o).unwrap();
                    check(&cfg, &mut seen, now, &[e]);
                }
            }
            Op::Progress { pick } => {
                if let Some((o, c)) = pick_in_flight(&seen, pick) {
                    g.in_progress(c, o, now).unwrap();
                    deadlines.insert(o, now + cfg.ack_timeout_ms);
                }
            }
            Op::Advance { ms } => now += ms,
        }
        // Messages whose ack deadline passed are no longer the consumer's.
        seen.in_flight
            .retain(|o, _| deadlines.get(o).is_some_and(|&d| d > now));
        let effects = g.poll(now);
        check(&cfg, &mut seen, now, &effects);
        for e in &effects {
            if let Effect::Deliver { offset, .. } = e {
                deadlines.insert(*offset, now + cfg.ack_timeout_ms);
            }
        }
        for (&o, &(c, _)) in &seen.in_flight {
            assert_eq!(g.holder(o), Some(c), "{o} is in flight to {c}");
        }
        let st = g.stats();
        assert_eq!(st.in_flight, seen.in_flight.len());
        assert_eq!(
            g.low_water(),
            (0..next)
                .find(|o| !seen.settled.contains(o))
                .unwrap_or(next)
        );
    }
    // A patient consumer with room for everything settles what is left.
    for c in seen.credit.keys().copied().collect::<Vec<_>>() {
        g.leave(c).unwrap();
    }
    seen.in_flight.clear();
    seen.credit.clear();
    g.join(99, 8).unwrap();
    seen.credit.insert(99, 8);
    for _ in 0..10_000 {
        now += 500;
        let effects = g.poll(now);
        check(&cfg, &mut seen, now, &effects);
        for e in effects {
            if let Effect::Deliver { offset, .. } = e {
                g.ack(99, offset).unwrap();
                seen.in_flight.remove(&offset);
                seen.settled.insert(offset);
            }
        }
        if g.low_water() == next {
            break;
        }
    }
    assert_eq!(
        g.low_water(),
        next,
        "messages left unsettled: {:?}",
        g.stats()
    );
    assert_eq!(seen.settled.len() as u64, next);
    assert_eq!(g.next_wakeup(), None, "nothing left to wake up for");
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn unordered_delivery_keeps_its_rules(ops in prop::collection::vec(op(), 1..120)) {
        run(false, 3, ops);
    }

    #[test]
    fn ordered_delivery_keeps_its_rules(ops in prop::collection::vec(op(), 1..120)) {
        run(true, 3, ops);
    }

    #[test]
    fn unlimited_deliveries_keep_their_rules(ops in prop::collection::vec(op(), 1..120)) {
        run(true, 0, ops);
    }
}

#[test]
fn a_message_that_keeps_timing_out_is_dead_lettered_after_its_deliveries() {
    let cfg = DeliveryConfig {
        ack_timeout_ms: 100,
        max_deliveries: 2,
        ..Default::default()
    };
    let mut g = Group::new(cfg, 0);
    g.append(Entry {
        offset: 0,
        key: b"k".to_vec().into(),
        not_before_ms: 0,
        expires_ms: 0,
    })
    .unwrap();
    g.join(1, 1).unwrap();
    assert_eq!(
        g.poll(0),
        [Effect::Deliver {
            consumer: 1,
            offset: 0,
            attempt: 1
        }]
    );
    assert_eq!(g.next_wakeup(), Some(100));
    assert_eq!(
        g.poll(100),
        [Effect::Deliver {
            consumer: 1,
            offset: 0,
            attempt: 2
        }]
    );
    assert_eq!(
        g.poll(200),
        [Effect::DeadLetter {
            offset: 0,
            reason: DeadReason::MaxDeliveries
        }]
    );
    assert_eq!(g.low_water(), 1);
    assert_eq!(g.ack(1, 0), Err(DeliveryError::NotInFlight(0)));
}

#[test]
fn delay_ttl_and_credit_do_what_they_say() {
    let mut g = Group::new(DeliveryConfig::default(), 10);
    let e = |offset, not_before_ms, expires_ms| Entry {
        offset,
        key: Default::default(),
        not_before_ms,
        expires_ms,
    };
    g.append(e(10, 500, 0)).unwrap();
    g.append(e(11, 0, 50)).unwrap();
    g.append(e(12, 0, 0)).unwrap();
    assert_eq!(
        g.append(e(5, 0, 0)),
        Err(DeliveryError::OutOfOrder {
            offset: 5,
            expected: 13
        })
    );
    assert!(matches!(
        g.join(1, 20_000),
        Err(DeliveryError::CreditTooLarge { .. })
    ));
    g.join(1, 1).unwrap();
    // Credit 1: one message at a time, in offset order.
    assert_eq!(
        g.poll(0),
        [Effect::Deliver {
            consumer: 1,
            offset: 11,
            attempt: 1
        }]
    );
    g.nack(1, 11, 0, 0).unwrap();
    // Nacked at once: it comes back, and it expires before anyone takes it again.
    g.set_credit(1, 0).unwrap();
    assert!(g.poll(10).is_empty());
    assert_eq!(
        g.poll(60),
        [Effect::DeadLetter {
            offset: 11,
            reason: DeadReason::Expired
        }]
    );
    g.set_credit(1, 5).unwrap();
    assert_eq!(
        g.poll(60),
        [Effect::Deliver {
            consumer: 1,
            offset: 12,
            attempt: 1
        }]
    );
    assert_eq!(g.poll(499), []);
    assert_eq!(
        g.poll(500),
        [Effect::Deliver {
            consumer: 1,
            offset: 10,
            attempt: 1
        }]
    );
    g.ack(1, 10).unwrap();
    assert_eq!(g.low_water(), 12);
    g.ack(1, 12).unwrap();
    assert_eq!(g.low_water(), 13);
}
