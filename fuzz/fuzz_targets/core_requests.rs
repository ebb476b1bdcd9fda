//! The core under arbitrary request streams from four connections, with disconnects
//! and time passing. No input may make it panic (a panic is a broken invariant: the
//! server would stop), and everything it emits must encode.
#![no_main]

use libfuzzer_sys::fuzz_target;
use portswitch_core::{Config, ConnId, Core, Outbox};
use portswitch_proto::frame::{frame_len, messages};
use portswitch_proto::limits::{COMMANDS_PER_FRAME_MAX, FRAME_BYTES_MAX};
use portswitch_proto::{Event, FrameBuf, Reply, Request};

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
    let mut core = Core::new(cfg, 1, [1, 2, 3]);
    let mut out = Sink(FrameBuf::new(FRAME_BYTES_MAX, COMMANDS_PER_FRAME_MAX));
    let mut now = 0u64;
    // Each chunk: control byte (conn, disconnect bit), time step, then a frame.
    let mut rest = data;
    while rest.len() >= 2 {
        let (ctl, step) = (rest[0], rest[1]);
        rest = &rest[2..];
        let conn = (ctl & 3) as ConnId;
        now += step as u64;
        if ctl & 0x80 != 0 {
            core.handle_disconnect(conn, now, &mut out);
        }
        core.handle_timeout(now, &mut out);
        let Ok(Some(n)) = frame_len(rest, FRAME_BYTES_MAX) else { break };
        let mut batch = core.begin_batch(conn, now);
        for m in messages(&rest[4..n], COMMANDS_PER_FRAME_MAX) {
            let Ok(m) = m else { break };
            if let Ok(req) = Request::decode(m.opcode, m.body) {
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
