//! The mq broker's and client's decoders: arbitrary bytes as a stream of frames, each
//! message decoded as a request and as a reply (broker-to-broker FETCH, SURVEY and
//! PEER_* included), and the whole input as a control record and as an epoch history
//! file. Nothing may panic; whatever decodes must survive encode → decode unchanged.
#![no_main]

use bytes::{Bytes, BytesMut};
use libfuzzer_sys::fuzz_target;
use portswitch_mq::broker::partition::Control;
use portswitch_mq::proto::{frame_len, messages, Reply, Request};
use portswitch_mq::replica::Epochs;

fuzz_target!(|data: &[u8]| {
    if let Some(c) = Control::decode(data) {
        assert_eq!(Control::decode(&c.encode()), Some(c));
    }
    if let Some(e) = Epochs::decode(data) {
        assert_eq!(Epochs::decode(&e.encode()), Some(e));
    }
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
