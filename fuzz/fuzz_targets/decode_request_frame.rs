//! The server's decoder: arbitrary bytes as a stream of client frames. Nothing may
//! panic; whatever decodes must survive encode → decode unchanged.
#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use portswitch_proto::frame::{frame_len, messages};
use portswitch_proto::limits::{COMMANDS_PER_FRAME_MAX, FRAME_BYTES_MAX};
use portswitch_proto::{FrameBuf, Request};

fuzz_target!(|data: &[u8]| {
    let mut rest = data;
    while let Ok(Some(n)) = frame_len(rest, FRAME_BYTES_MAX) {
        for m in messages(&rest[4..n], COMMANDS_PER_FRAME_MAX) {
            let Ok(m) = m else { break };
            let Ok(req) = Request::decode(m.opcode, m.body) else {
                continue;
            };
            let mut fb = FrameBuf::new(FRAME_BYTES_MAX, COMMANDS_PER_FRAME_MAX);
            fb.push_request(m.id.max(1), &req);
            let mut wire = BytesMut::new();
            fb.take_into(&mut wire);
            let n2 = frame_len(&wire, FRAME_BYTES_MAX).unwrap().unwrap();
            let m2 = messages(&wire[4..n2], 1).next().unwrap().unwrap();
            assert_eq!(Request::decode(m2.opcode, m2.body).unwrap(), req);
        }
        rest = &rest[n..];
    }
});
