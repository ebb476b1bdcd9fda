//! The vault's on-disk decoders: arbitrary bytes as a header file (clear part and, as
//! if it had opened, its key table), as record frames, as the chunk header inside an
//! opened commit or checkpoint record, as an opened entry (commit or checkpoint), and as
//! an opened block's plaintext. Nothing may panic or allocate beyond the input; whatever
//! decodes must re-encode to the same bytes (the encoding is canonical).
#![no_main]

use libfuzzer_sys::fuzz_target;
use portswitch_vault::format::{
    decode_block, ChunkHeader, Entry, Frame, HeaderClear, KeyTable, CHUNK_HEADER_BYTES,
    HEADER_CLEAR_BYTES,
};

fuzz_target!(|data: &[u8]| {
    if let Ok((h, sealed)) = HeaderClear::decode(data) {
        assert_eq!(&h.encode()[..], &data[..HEADER_CLEAR_BYTES]);
        assert_eq!(sealed.len(), h.sealed_len as usize);
    }
    if let Ok(t) = KeyTable::decode(data) {
        assert_eq!(t.encode(), data);
    }
    for chunk in data.chunks(16) {
        if let Some(f) = Frame::decode(chunk) {
            assert_eq!(&f.encode()[..], chunk);
        }
    }
    if data.len() >= CHUNK_HEADER_BYTES {
        if let Ok(h) = ChunkHeader::decode(&data[..CHUNK_HEADER_BYTES]) {
            assert_eq!(&h.encode()[..], &data[..CHUNK_HEADER_BYTES]);
        }
    }
    if let Ok(e) = Entry::decode(data) {
        assert_eq!(e.encode(), data);
    }
    let mut out = vec![0u8; 4096];
    if let Ok(n) = decode_block(data, &mut out) {
        assert!(n <= out.len());
    }
});
