//! Block and entry compression: zstd or lz4, kept only when it shrinks the data.
//!
//! A block's plaintext inside its seal is `codec u8` then either the raw bytes
//! (`BLOCK_RAW`) or `raw_len u32` and the compressed bytes.

use std::cell::RefCell;

use crate::error::{Result, VaultError};
use crate::format::{BLOCK_LZ4, BLOCK_RAW, BLOCK_ZSTD};
use crate::types::Compression;

/// Bytes a block's plaintext may take beyond its raw data (the codec byte).
pub const BLOCK_OVERHEAD_BYTES: usize = 1;

thread_local! {
    static ZSTD_C: RefCell<Option<(i32, zstd::bulk::Compressor<'static>)>> = const { RefCell::new(None) };
    static LZ4_SCRATCH: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
    static ZSTD_D: RefCell<Option<zstd::bulk::Decompressor<'static>>> = const { RefCell::new(None) };
}

fn zstd_compress(level: i32, src: &[u8], dst: &mut [u8]) -> Option<usize> {
    ZSTD_C.with(|c| {
        let mut c = c.borrow_mut();
        if c.as_ref().map(|(l, _)| *l) != Some(level) {
            *c = Some((level, zstd::bulk::Compressor::new(level).ok()?));
        }
        let (_, comp) = c.as_mut()?;
        // Too small a destination is an error: the data did not shrink enough.
        comp.compress_to_buffer(src, dst).ok()
    })
}

/// lz4_flex wants room for the worst case: compress into a scratch buffer, keep the
/// result only when it fits `dst`.
fn lz4_compress(src: &[u8], dst: &mut [u8]) -> Option<usize> {
    LZ4_SCRATCH.with(|s| {
        let mut s = s.borrow_mut();
        s.resize(lz4_flex::block::get_maximum_output_size(src.len()), 0);
        let n = lz4_flex::block::compress_into(src, &mut s).ok()?;
        if n > dst.len() {
            return None;
        }
        dst[..n].copy_from_slice(&s[..n]);
        Some(n)
    })
}

fn zstd_decompress(src: &[u8], dst: &mut [u8]) -> Option<usize> {
    ZSTD_D.with(|d| {
        let mut d = d.borrow_mut();
        if d.is_none() {
            *d = Some(zstd::bulk::Decompressor::new().ok()?);
        }
        d.as_mut()?.decompress_to_buffer(src, dst).ok()
    })
}

/// Writes the plaintext of a block holding `data` into `out` (which must hold at least
/// `data.len() + BLOCK_OVERHEAD_BYTES`) and returns its length. Compressed only when
/// that saves at least one byte after the length field.
pub fn encode_block(comp: Compression, level: i32, data: &[u8], out: &mut [u8]) -> usize {
    assert!(out.len() >= data.len() + BLOCK_OVERHEAD_BYTES);
    // Compressed form: codec, raw length, payload; it must beat codec + raw bytes.
    let budget = data.len().saturating_sub(4);
    if data.len() >= 64 && budget > 0 {
        let got = match comp {
            Compression::None => None,
            Compression::Zstd => zstd_compress(level, data, &mut out[5..5 + budget]),
            Compression::Lz4 => lz4_compress(data, &mut out[5..5 + budget]),
        };
        if let Some(n) = got {
            if n < budget {
                out[0] = if comp == Compression::Zstd {
                    BLOCK_ZSTD
                } else {
                    BLOCK_LZ4
                };
                out[1..5].copy_from_slice(&(data.len() as u32).to_le_bytes());
                return 5 + n;
            }
        }
    }
    out[0] = BLOCK_RAW;
    out[1..1 + data.len()].copy_from_slice(data);
    1 + data.len()
}

/// Decodes a block's plaintext into `out` (the block size) and returns the logical
/// length. Only reached after the seal opened, but still checked: a codec bug must not
/// become a panic or wrong bytes.
pub fn decode_block(plain: &[u8], out: &mut [u8]) -> Result<usize> {
    let bad = |why: &str| VaultError::format("block", why.to_string());
    let (&codec, rest) = plain.split_first().ok_or_else(|| bad("empty"))?;
    if codec == BLOCK_RAW {
        if rest.len() > out.len() {
            return Err(bad("raw block larger than the block size"));
        }
        out[..rest.len()].copy_from_slice(rest);
        return Ok(rest.len());
    }
    if rest.len() < 4 {
        return Err(bad("short compressed block"));
    }
    let raw_len = u32::from_le_bytes(rest[..4].try_into().expect("4 bytes")) as usize;
    if raw_len > out.len() {
        return Err(bad("declared length larger than the block size"));
    }
    let n = match codec {
        BLOCK_ZSTD => zstd_decompress(&rest[4..], &mut out[..raw_len]),
        BLOCK_LZ4 => lz4_flex::block::decompress_into(&rest[4..], &mut out[..raw_len]).ok(),
        _ => return Err(bad("unknown codec")),
    };
    match n {
        Some(n) if n == raw_len => Ok(n),
        _ => Err(bad("does not decompress to its declared length")),
    }
}

/// Compresses an entry with zstd when that shrinks it; returns (codec, bytes).
pub fn compress_entry(raw: &[u8]) -> (u8, Vec<u8>) {
    if raw.len() >= 256 {
        if let Ok(c) = zstd::bulk::compress(raw, 3) {
            if c.len() < raw.len() {
                return (1, c);
            }
        }
    }
    (0, raw.to_vec())
}

/// Decompresses an entry of declared `raw_len` (bounded by the caller).
pub fn decompress_entry(codec: u8, stored: &[u8], raw_len: usize) -> Result<Vec<u8>> {
    match codec {
        0 if stored.len() == raw_len => Ok(stored.to_vec()),
        1 => {
            let mut out = vec![0u8; raw_len];
            match zstd_decompress(stored, &mut out) {
                Some(n) if n == raw_len => Ok(out),
                _ => Err(VaultError::format(
                    "entry",
                    "does not decompress to its length",
                )),
            }
        }
        _ => Err(VaultError::format("entry", "bad codec or length")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_round_trip_and_skip_compression_when_useless() {
        for comp in [Compression::None, Compression::Zstd, Compression::Lz4] {
            let text = b"the quick brown fox ".repeat(300);
            let mut noise = vec![0u8; 4096];
            crate::crypto::random(&mut noise[..200]);
            for chunk in noise.chunks_mut(200) {
                crate::crypto::random(chunk);
            }
            for data in [&text[..4096], &noise[..], &b"short"[..], &[][..]] {
                let mut out = vec![0u8; data.len() + BLOCK_OVERHEAD_BYTES];
                let n = encode_block(comp, 1, data, &mut out);
                if comp != Compression::None && data.len() == 4096 && data[0] == b't' {
                    assert!(n < 1000, "{comp:?} compresses text");
                }
                if data.len() == 4096 && data[0] != b't' {
                    assert_eq!(out[0], BLOCK_RAW, "noise stays raw");
                }
                let mut back = vec![0u8; 4096];
                let m = decode_block(&out[..n], &mut back).unwrap();
                assert_eq!(&back[..m], data);
            }
        }
    }

    #[test]
    fn hostile_blocks_are_errors() {
        let mut out = vec![0u8; 4096];
        assert!(decode_block(&[], &mut out).is_err());
        assert!(decode_block(&[BLOCK_ZSTD, 0xff, 0xff, 0xff, 0xff, 1, 2], &mut out).is_err());
        assert!(decode_block(&[BLOCK_LZ4, 16, 0, 0, 0, 0xf0, 2], &mut out).is_err());
        assert!(decode_block(&[9, 1, 0, 0, 0], &mut out).is_err());
        let big = vec![0u8; 5000];
        assert!(decode_block(&big, &mut out).is_err());
    }
}
