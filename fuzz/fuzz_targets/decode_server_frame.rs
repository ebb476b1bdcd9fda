//! The client's decoder: arbitrary bytes as a stream of server frames. Nothing may
//! panic; whatever decodes must survive encode → decode unchanged.
#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use portswitch_proto::frame::{frame_len, messages};
use portswitch_proto::limits::FRAME_BYTES_MAX;
use portswitch_proto::{FrameBuf, ServerMsg};

fuzz_target!(|data: &[u8]| {
    let mut rest = data;
    while let Ok(Some(n)) = frame_len(rest, FRAME_BYTES_MAX) {
        for m in messages(&rest[4..n], usize::MAX) {
            let Ok(m) = m else { break };
            let Ok(msg) = ServerMsg::decode(m.opcode, m.id, m.body) else {
                continue;
            };
            // Walking page and stats entries must not fail once decoded.
            if let ServerMsg::Reply { reply, .. } = &msg {
                let _ = reply.page_entries().count();
                let _ = reply.stats_entries().count();
            }
            let mut fb = FrameBuf::new(usize::MAX, usize::MAX);
            match msg {
                ServerMsg::Reply { id, reply } => fb.push_reply(id, &reply),
                ServerMsg::Event(e) => fb.push_event(&e),
            }
            let mut wire = BytesMut::new();
            fb.take_into(&mut wire);
            let n2 = frame_len(&wire, usize::MAX).unwrap().unwrap();
            let m2 = messages(&wire[4..n2], 1).next().unwrap().unwrap();
            assert_eq!(ServerMsg::decode(m2.opcode, m2.id, m2.body).unwrap(), msg);
        }
        rest = &rest[n..];
    }
});
