//! The core under arbitrary request streams from four connections, with disconnects
//! and time passing. No input may make it panic (a panic is a broken invariant: the
//! server would stop), and everything it emits must encode.
//!
//! An odd first byte makes the core a new master in its recovery window, taking over
//! from an earlier core with the same keys that holds three sessions; a HELLO whose
//! `resume_session` is 1..=3 resumes that session with its real id and secret, so the
//! fuzzer reaches adoption and RECLAIM.
#![no_main]

use libfuzzer_sys::fuzz_target;
use portswitch_core::{Config, ConnId, Core, Outbox};
use portswitch_proto::frame::{frame_len, messages};
use portswitch_proto::limits::{COMMANDS_PER_FRAME_MAX, FRAME_BYTES_MAX};
use portswitch_proto::{Event, FrameBuf, Hello, Reply, Request};

struct Sink(FrameBuf);

impl Outbox for Sink {
    fn reply(&mut self, _: ConnId, id: u32, r: &Reply<'_>) {
        self.0.push_reply(id, r);
    }
    fn event(&mut self, _: ConnId, e: &Event<'_>) {
        self.0.push_event(e);
    }
    fn frames(&mut self, _: ConnId, f: &[u8]) {
        self.0.push_frames(f);
    }
    fn close(&mut self, _: ConnId) {}
}

fuzz_target!(|data: &[u8]| {
    let cfg = Config {
        ports_per_session_max: 8,
        watches_per_session_max: 4,
        queue_len_max: 3,
        sessions_max: 3,
        prefix_watches_max: 2,
        lease_ms_min: 10,
        list_scan_slots_max: 5,
        detached_event_bytes_max: 200,
        // Sessions ending with more than 2 ports release them over several ticks.
        release_step_ports_max: 2,
        ..Config::default()
    };
    let Some((&mode, mut rest)) = data.split_first() else {
        return;
    };
    let mut out = Sink(FrameBuf::new(FRAME_BYTES_MAX, COMMANDS_PER_FRAME_MAX));
    let mut known = Vec::new();
    let mut core = if mode & 1 == 0 {
        Core::new(cfg, 1, [1, 2, 3])
    } else {
        known = earlier_sessions(&cfg);
        let mut core = Core::new(cfg, 2, [9, 2, 3]);
        core.start_recovery(0, mode as u64 * 4);
        core
    };
    let mut now = 0u64;
    // Each chunk: control byte (conn, disconnect bit), time step, then a frame.
    while rest.len() >= 2 {
        let (ctl, step) = (rest[0], rest[1]);
        rest = &rest[2..];
        let conn = (ctl & 3) as ConnId;
        now += step as u64;
        if ctl & 0x80 != 0 {
            core.handle_disconnect(conn, now, &mut out);
        }
        core.handle_timeout(now, &mut out);
        let Ok(Some(n)) = frame_len(rest, FRAME_BYTES_MAX) else {
            break;
        };
        let mut batch = core.begin_batch(conn, now);
        for m in messages(&rest[4..n], COMMANDS_PER_FRAME_MAX) {
            let Ok(m) = m else { break };
            if let Ok(mut req) = Request::decode(m.opcode, m.body) {
                if let Request::Hello(h) = &mut req {
                    if let Some(&(id, secret)) =
                        known.get((h.resume_session as usize).wrapping_sub(1))
                    {
                        h.resume_session = id;
                        h.resume_secret = secret;
                    }
                }
                if req != Request::Stats {
                    core.handle(&mut batch, m.id, &req, &mut out);
                }
            }
        }
        rest = &rest[n..];
        if out.0.len() > 1 << 20 {
            out.0.clear();
        }
    }
});

/// Three sessions of an earlier master (epoch 1, same secret keys) owning a port each:
/// their (id, secret).
fn earlier_sessions(cfg: &Config) -> Vec<(u64, u64)> {
    struct Grab(Vec<(u64, u64)>);
    impl Outbox for Grab {
        fn reply(&mut self, _: ConnId, _: u32, r: &Reply<'_>) {
            if let Reply::HelloOk(h) = r {
                self.0.push((h.session, h.secret));
            }
        }
        fn event(&mut self, _: ConnId, _: &Event<'_>) {}
        fn frames(&mut self, _: ConnId, _: &[u8]) {}
        fn close(&mut self, _: ConnId) {}
    }
    let mut old = Core::new(cfg.clone(), 1, [1, 2, 3]);
    let mut grab = Grab(Vec::new());
    for conn in 0..3u64 {
        let mut b = old.begin_batch(conn, 0);
        let hello = Hello {
            version_min: 1,
            version_max: 1,
            features: 0,
            lease_ms: 1_000,
            end_on_disconnect: false,
            node_name: b"n",
            credentials: b"",
            resume_session: 0,
            resume_secret: 0,
        };
        old.handle(&mut b, 1, &Request::Hello(hello), &mut grab);
        let port = [b'p', b'0' + conn as u8];
        let reg = Request::Register {
            port: &port,
            value: b"",
            wait: false,
        };
        old.handle(&mut b, 2, &reg, &mut grab);
    }
    grab.0
}
