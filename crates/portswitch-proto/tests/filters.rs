//! Filtered LIST (LIST_WHERE) and filtered prefix WATCH (the WATCH_WHERE flag): the
//! encodings of before decode exactly as before, the new ones round-trip, and every
//! malformed variant fails only its request with a typed code.

use bytes::BytesMut;
use portswitch_proto::limits::*;
use portswitch_proto::msg::{op, PREFIX, WATCH_WHERE};
use portswitch_proto::*;
use proptest::prelude::*;

fn body(r: &Request<'_>) -> Vec<u8> {
    let mut b = BytesMut::new();
    r.encode_body(&mut b);
    assert_eq!(b.len(), r.body_len());
    b.to_vec()
}

#[test]
fn frames_of_before_decode_as_before() {
    // WATCH, prefix "ab": flags 0x01, name b16.
    let w = [PREFIX, 0, 2, b'a', b'b'];
    assert_eq!(
        Request::decode(op::WATCH, &w).unwrap(),
        Request::Watch {
            name: b"ab",
            prefix: true
        }
    );
    assert_eq!(
        body(&Request::Watch {
            name: b"ab",
            prefix: true
        }),
        w
    );
    // LIST "ab", cursor 7, limit 9: unchanged opcode and body.
    let l = [0, 2, b'a', b'b', 0, 0, 0, 0, 0, 0, 0, 7, 0, 0, 0, 9];
    let list = Request::List {
        prefix: b"ab",
        cursor: 7,
        limit: 9,
    };
    assert_eq!(Request::decode(op::LIST, &l).unwrap(), list);
    assert_eq!(body(&list), l);
    assert_eq!(list.opcode(), op::LIST);
    // Bytes appended to a LIST are ignored, as always: a filter never rides on LIST
    // (a server of before would ignore it and list everything).
    let mut longer = l.to_vec();
    longer.extend_from_slice(&[0, 1, b'x']);
    assert_eq!(Request::decode(op::LIST, &longer).unwrap(), list);
}

#[test]
fn filtered_requests_have_their_own_encoding() {
    let w = Request::WatchWhere {
        prefix: b"svc/",
        filter: b"name.endsWith(\"/leader\")",
    };
    assert_eq!(w.opcode(), op::WATCH);
    let b = body(&w);
    assert_eq!(b[0], PREFIX | WATCH_WHERE);
    assert_eq!(Request::decode(op::WATCH, &b).unwrap(), w);
    let l = Request::ListWhere {
        prefix: b"",
        cursor: 0,
        limit: 100,
        filter: b"true",
    };
    assert_eq!(l.opcode(), op::LIST_WHERE);
    assert_eq!(Request::decode(op::LIST_WHERE, &body(&l)).unwrap(), l);
}

#[test]
fn bad_filtered_requests_fail_alone_with_typed_codes() {
    let code = |opcode, b: &[u8]| Request::decode(opcode, b).unwrap_err().code;
    // WHERE without PREFIX: a filter on one port is not offered.
    assert_eq!(
        code(op::WATCH, &[WATCH_WHERE, 0, 1, b'a', 0, 1, b'x']),
        ErrorCode::InvalidArgument
    );
    // UNWATCH takes no filter.
    assert_eq!(
        code(op::UNWATCH, &[PREFIX | WATCH_WHERE, 0, 1, b'a', 0, 1, b'x']),
        ErrorCode::InvalidArgument
    );
    // Other unknown bits are still refused.
    assert_eq!(
        code(op::WATCH, &[0x04 | PREFIX, 0, 1, b'a']),
        ErrorCode::InvalidArgument
    );
    // The WHERE flag promises a filter: a missing or truncated one is malformed.
    assert_eq!(
        code(op::WATCH, &[PREFIX | WATCH_WHERE, 0, 1, b'a']),
        ErrorCode::Malformed
    );
    assert_eq!(
        code(op::WATCH, &[PREFIX | WATCH_WHERE, 0, 1, b'a', 0, 5, b'x']),
        ErrorCode::Malformed
    );
    // A filter longer than QUERY_BYTES_MAX: query_invalid, checked before slicing.
    let n = (QUERY_BYTES_MAX + 1) as u16;
    let mut long = vec![PREFIX | WATCH_WHERE, 0, 1, b'a'];
    long.extend_from_slice(&n.to_be_bytes());
    long.resize(long.len() + n as usize, b'x');
    assert_eq!(code(op::WATCH, &long), ErrorCode::QueryInvalid);
    let mut list = vec![0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];
    list.extend_from_slice(&n.to_be_bytes());
    list.resize(list.len() + n as usize, b'x');
    assert_eq!(code(op::LIST_WHERE, &list), ErrorCode::QueryInvalid);
    // LIST_WHERE without its filter.
    assert_eq!(
        code(op::LIST_WHERE, &[0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1]),
        ErrorCode::Malformed
    );
}

#[test]
fn query_invalid_is_code_39() {
    assert_eq!(ErrorCode::QueryInvalid.to_u16(), 39);
    assert_eq!(ErrorCode::from_u16(39), ErrorCode::QueryInvalid);
    assert_eq!(ErrorCode::QueryInvalid.name(), "query_invalid");
    // Its reply carries the compiler's message like any ERROR.
    let r = Reply::error(ErrorCode::QueryInvalid, b"1:5: unexpected character '$'");
    let mut b = BytesMut::new();
    r.encode_body(&mut b);
    assert_eq!(Reply::decode(op::ERROR, &b).unwrap(), r);
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, failure_persistence: None, .. ProptestConfig::default() })]

    /// Any WATCH body of before (flags 0 or PREFIX, a name) decodes to the plain
    /// Watch it always did, whatever follows it.
    #[test]
    fn watch_bodies_of_before_are_unchanged(
        prefix in any::<bool>(),
        name in proptest::collection::vec(any::<u8>(), 0..=PORT_NAME_BYTES_MAX),
        tail in proptest::collection::vec(any::<u8>(), 0..16),
    ) {
        let req = Request::Watch { name: &name, prefix };
        let mut b = body(&req);
        b.extend_from_slice(&tail);
        prop_assert_eq!(Request::decode(op::WATCH, &b).unwrap(), req);
    }

    /// Filtered requests round-trip with any prefix and filter within the limits.
    #[test]
    fn filtered_requests_round_trip(
        prefix in proptest::collection::vec(any::<u8>(), 0..=PORT_NAME_BYTES_MAX),
        filter in proptest::collection::vec(any::<u8>(), 0..=QUERY_BYTES_MAX),
        cursor in any::<u64>(),
        limit in any::<u32>(),
    ) {
        let w = Request::WatchWhere { prefix: &prefix, filter: &filter };
        let wb = body(&w);
        prop_assert_eq!(Request::decode(op::WATCH, &wb).unwrap(), w);
        let l = Request::ListWhere { prefix: &prefix, cursor, limit, filter: &filter };
        let lb = body(&l);
        prop_assert_eq!(Request::decode(op::LIST_WHERE, &lb).unwrap(), l);
    }

    /// No prefix of a filtered body makes the decoder panic; each is a typed error.
    #[test]
    fn truncated_filtered_bodies_fail_typed(cut in 0usize..40) {
        let l = Request::ListWhere { prefix: b"svc/", cursor: 1, limit: 2, filter: b"name == \"x\"" };
        let b = body(&l);
        let cut = cut.min(b.len() - 1);
        let e = Request::decode(op::LIST_WHERE, &b[..cut]).unwrap_err();
        prop_assert_eq!(e.code, ErrorCode::Malformed);
    }
}
