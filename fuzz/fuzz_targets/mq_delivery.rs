//! The mq delivery state machine under arbitrary inputs: appends, consumers joining and
//! leaving, settlements of any offset by any consumer, time passing. No input may
//! panic; what it reports must stay consistent (in flight never above the consumers'
//! credit, the low-water mark never past an unsettled message, never going down).
#![no_main]

use libfuzzer_sys::fuzz_target;
use portswitch_mq::delivery::{DeliveryConfig, Effect, Entry, Group};

fuzz_target!(|data: &[u8]| {
    let Some((&flags, ops)) = data.split_first() else {
        return;
    };
    let cfg = DeliveryConfig {
        ack_timeout_ms: 50,
        max_deliveries: u32::from(flags & 3),
        ordered_by_key: flags & 4 != 0,
        credit_max: 8,
        consumers_max: 3,
    };
    let mut g = Group::new(cfg, 0);
    let (mut now, mut next, mut low) = (0u64, 0u64, 0u64);
    let mut credit = [0u32; 4];
    for op in ops.chunks(3) {
        let (a, b) = (op.get(1).copied().unwrap_or(0), op.get(2).copied().unwrap_or(0));
        let consumer = u64::from(a & 3);
        let offset = u64::from(b) % (next + 1);
        match op[0] % 9 {
            0 | 1 => {
                let delay = if b & 1 == 1 { now + u64::from(b) } else { 0 };
                let ttl = if b & 2 == 2 { now + u64::from(a) } else { 0 };
                g.append(Entry { offset: next, key: vec![a & 3].into(), not_before_ms: delay, expires_ms: ttl }).unwrap();
                next += 1;
            }
            2 => {
                if g.join(consumer, u32::from(b % 9)).is_ok() {
                    credit[consumer as usize] = u32::from(b % 9);
                }
            }
            3 => {
                if g.leave(consumer).is_ok() {
                    credit[consumer as usize] = 0;
                }
            }
            4 => {
                let _ = g.ack(consumer, offset);
            }
            5 => {
                let _ = g.nack(consumer, offset, u64::from(b), now);
            }
            6 => {
                let _ = g.reject(consumer, offset);
            }
            7 => {
                let _ = g.in_progress(consumer, offset, now);
            }
            _ => now += u64::from(b),
        }
        for e in g.poll(now) {
            if let Effect::Deliver { offset, .. } = e {
                assert!(offset < next);
            }
        }
        let st = g.stats();
        let room: u32 = credit.iter().sum();
        assert!(st.in_flight as u32 <= room, "{st:?} over credit {credit:?}");
        let w = g.low_water();
        assert!(w >= low && w <= next, "low water {w} after {low}, end {next}");
        low = w;
    }
});
