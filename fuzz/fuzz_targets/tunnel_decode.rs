//! The tunnel's decoders: arbitrary bytes as a record's frames, as sealed records
//! (header and body), and as both hellos (raw, and as corruptions of genuine ones).
//! Nothing may panic; frames that decode must survive encode → decode unchanged, and
//! content sealed as a record must open to itself, with any flipped bit refused.
#![no_main]

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use portswitch_tunnel::frame::{decode_all, Frame};
use portswitch_tunnel::handshake::{
    ClientHello, ClientInfo, Psk, ServerHello, CLIENT_HEADER_WIRE_BYTES, SERVER_HEADER_WIRE_BYTES,
};
use portswitch_tunnel::limits::{RECORD_CONTENT_BYTES_MAX, RECORD_HEADER_BYTES};
use portswitch_tunnel::record::{pad_len, Opener, Sealer};

fn frames(data: &[u8]) {
    let mut out = Vec::new();
    // Frames before an error are kept in `out`: they decoded, so they round-trip.
    let _ = decode_all(Bytes::copy_from_slice(data), &mut out);
    let mut enc = Vec::new();
    for f in &out {
        let before = enc.len();
        f.encode(&mut enc);
        assert_eq!(enc.len() - before, f.encoded_len());
    }
    let mut back: Vec<Frame> = Vec::new();
    decode_all(Bytes::from(enc), &mut back).expect("encoded frames decode");
    assert_eq!(back, out);
}

fn records(data: &[u8]) {
    let key = [0x5a; 32];
    // As received from a peer: must fail cleanly, never panic.
    let mut o = Opener::new(&key);
    if data.len() >= RECORD_HEADER_BYTES {
        let mut h = [0u8; RECORD_HEADER_BYTES];
        h.copy_from_slice(&data[..RECORD_HEADER_BYTES]);
        let _ = o.open_header(&mut h);
    }
    let _ = Opener::new(&key).open_body(&mut data.to_vec());
    // As content: seal, open, compare; then flip one bit chosen by the input.
    let content = &data[..data.len().min(RECORD_CONTENT_BYTES_MAX)];
    let mut rng = fastrand::Rng::with_seed(data.len() as u64);
    let mut wire = Vec::new();
    Sealer::begin(&mut wire);
    wire.extend_from_slice(content);
    Sealer::new(&key).seal(&mut wire, pad_len(content.len(), &mut rng));
    let open = |wire: &[u8]| -> Option<Vec<u8>> {
        let mut o = Opener::new(&key);
        let mut h = [0u8; RECORD_HEADER_BYTES];
        h.copy_from_slice(&wire[..RECORD_HEADER_BYTES]);
        let len = o.open_header(&mut h).ok()?;
        let mut body = wire.get(RECORD_HEADER_BYTES..RECORD_HEADER_BYTES + len)?.to_vec();
        let r = o.open_body(&mut body).ok()?;
        Some(body[r].to_vec())
    };
    assert_eq!(open(&wire).as_deref(), Some(content));
    let bit = data.iter().fold(0usize, |a, &b| a.wrapping_mul(31).wrapping_add(b as usize));
    let mut bad = wire.clone();
    let at = bit % bad.len();
    bad[at] ^= 1 << (bit % 8);
    assert_ne!(open(&bad).as_deref(), Some(content));
}

fn hellos(data: &[u8]) {
    let psk = Psk::from_bytes([0x17; 32]);
    // Raw input as a client hello, split where the server splits it.
    if data.len() >= CLIENT_HEADER_WIRE_BYTES {
        let (head, body) = data.split_at(CLIENT_HEADER_WIRE_BYTES);
        if let Ok((mut hello, _)) = ServerHello::read_header(&psk, head) {
            let _ = hello.read_body(body);
        }
    }
    let _ = ServerHello::read_header(&psk, data);
    // A genuine client hello with the input XORed over it.
    let info = ClientInfo {
        unix_s: 1_700_000_000,
        session: [3; 16],
    };
    let mut rng = fastrand::Rng::with_seed(1);
    let Ok((client, mut wire)) = ClientHello::start(&psk, &info, &mut rng) else {
        return;
    };
    for (w, d) in wire.iter_mut().zip(data) {
        *w ^= d;
    }
    let (head, body) = wire.split_at(CLIENT_HEADER_WIRE_BYTES);
    if let Ok((mut hello, len)) = ServerHello::read_header(&psk, head) {
        if let Ok(got) = hello.read_body(&body[..len.min(body.len())]) {
            // Only an untouched hello opens, and says what was sent.
            assert_eq!(got, info);
        }
    }
    // Input as the server's answer to a genuine client hello.
    let (head, body) = data.split_at(SERVER_HEADER_WIRE_BYTES.min(data.len()));
    match client.server_body_len(head) {
        Ok(len) => {
            let _ = client.finish(&body[..len.min(body.len())]);
        }
        Err(_) => {
            let _ = client.finish(data);
        }
    }
}

fuzz_target!(|data: &[u8]| {
    frames(data);
    records(data);
    hellos(data);
});
