//! The mq broker's and client's decoders: arbitrary bytes as a stream of frames, each
//! message decoded as a request and as a reply. Nothing may panic; whatever decodes
//! must survive encode → decode unchanged.
#![no_main]

use bytes::{Bytes, BytesMut};
use libfuzzer_sys::fuzz_target;
use portswitch_mq::proto::{frame_len, messages, Reply, Request};

fuzz_target!(|data: &[u8]| {
    let mut rest = Bytes::copy_from_slice(data);
    while let Ok(Some(n)) = frame_len(&rest) {
        let frame = rest.split_to(n);
        for m in messages(frame.slice(4..)) {
            let Ok((op, id, body)) = m else { break };
            if let Ok(req) = Request::decode(op, body.clone()) {
                let mut b = BytesMut::new();
                req.encode(id, &mut b);
                let (op2, id2, body2) = messages(b.freeze()).next().unwrap().unwrap();
                assert_eq!((op2, id2), (op, id));
                assert_eq!(Request::decode(op2, body2).unwrap(), req);
            }
            if let Ok(reply) = Reply::decode(op, body) {
                let mut b = BytesMut::new();
                reply.encode(id, &mut b);
                let (op2, _, body2) = messages(b.freeze()).next().unwrap().unwrap();
                assert_eq!(Reply::decode(op2, body2).unwrap(), reply);
            }
        }
    }
});
