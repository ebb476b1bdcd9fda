//! Adaptive compression of a stream's chunks (zstd), each chunk on its own so any
//! chunk can be resent on any connection and decoded alone.
//!
//! A chunk is sent compressed only when that saves at least an eighth of it. After a
//! chunk that did not shrink, the next ones are sent as they are, without trying, for
//! a number of chunks that doubles each time (up to 64), then compression is tried
//! again: incompressible streams (TLS, video, archives) cost almost nothing.

use bytes::Bytes;

use crate::error::{Result, TunnelError};
use crate::frame::CompressPolicy;
use crate::limits::STREAM_CHUNK_BYTES_MAX;
use crate::mux::Chunk;

/// Chunks shorter than this are not worth a try.
pub const COMPRESS_MIN_BYTES: usize = 256;
const SKIP_MAX: u32 = 64;

pub struct Compressor {
    policy: CompressPolicy,
    level: i32,
    skip: u32,
    backoff: u32,
    ctx: Option<zstd::bulk::Compressor<'static>>,
}

impl Compressor {
    pub fn new(policy: CompressPolicy, level: i32) -> Compressor {
        Compressor {
            policy,
            level,
            skip: 0,
            backoff: 1,
            ctx: None,
        }
    }

    /// The chunk to send for `raw` bytes read from a socket.
    pub fn chunk(&mut self, raw: Bytes) -> Chunk {
        if self.policy == CompressPolicy::Never || raw.len() < COMPRESS_MIN_BYTES {
            return Chunk::plain(raw);
        }
        if self.skip > 0 {
            self.skip -= 1;
            return Chunk::plain(raw);
        }
        if self.ctx.is_none() {
            self.ctx = zstd::bulk::Compressor::new(self.level).ok();
        }
        let Some(ctx) = self.ctx.as_mut() else {
            return Chunk::plain(raw);
        };
        match ctx.compress(&raw) {
            Ok(out) if out.len() <= raw.len() - raw.len() / 8 => {
                self.backoff = 1;
                Chunk {
                    raw_len: raw.len() as u32,
                    payload: Bytes::from(out),
                    compressed: true,
                }
            }
            _ => {
                self.skip = self.backoff;
                self.backoff = (self.backoff * 2).min(SKIP_MAX);
                Chunk::plain(raw)
            }
        }
    }
}

/// Decompresses chunks; the output size is the frame's declared `raw_len`, itself
/// bounded by the chunk limit, so a hostile frame cannot make it allocate more.
#[derive(Default)]
pub struct Decompressor {
    ctx: Option<zstd::bulk::Decompressor<'static>>,
}

impl Decompressor {
    pub fn new() -> Decompressor {
        Decompressor::default()
    }

    pub fn raw(&mut self, chunk: Chunk) -> Result<Bytes> {
        if !chunk.compressed {
            return Ok(chunk.payload);
        }
        let want = chunk.raw_len as usize;
        assert!(
            want <= STREAM_CHUNK_BYTES_MAX,
            "checked by the frame decoder"
        );
        if self.ctx.is_none() {
            self.ctx = Some(
                zstd::bulk::Decompressor::new()
                    .map_err(|e| TunnelError::malformed("compressed chunk", e.to_string()))?,
            );
        }
        let ctx = self.ctx.as_mut().expect("set above");
        let out = ctx
            .decompress(&chunk.payload, want)
            .map_err(|e| TunnelError::malformed("compressed chunk", e.to_string()))?;
        if out.len() != want {
            return Err(TunnelError::malformed("compressed chunk", "length differs"));
        }
        Ok(Bytes::from(out))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_shrinks_random_is_skipped_and_both_round_trip() {
        let mut c = Compressor::new(CompressPolicy::Auto, 3);
        let mut d = Decompressor::new();
        let text = Bytes::from("<html><body>hello office</body></html>\n".repeat(400));
        let ch = c.chunk(text.clone());
        assert!(ch.compressed && ch.payload.len() < text.len() / 4);
        assert_eq!(d.raw(ch).unwrap(), text);
        let random = Bytes::from((0..16_000).map(|_| fastrand::u8(..)).collect::<Vec<u8>>());
        let mut tried = 0;
        for _ in 0..100 {
            let ch = c.chunk(random.clone());
            assert!(!ch.compressed);
            if c.skip == 0 {
                tried += 1;
            }
            assert_eq!(d.raw(ch).unwrap(), random);
        }
        assert!(tried < 10, "backs off: tried {tried} times");
        let mut never = Compressor::new(CompressPolicy::Never, 3);
        assert!(!never.chunk(text).compressed);
    }

    #[test]
    fn a_lying_raw_length_is_an_error_not_a_big_allocation() {
        let mut c = Compressor::new(CompressPolicy::Auto, 3);
        let mut ch = c.chunk(Bytes::from(vec![b'a'; 20_000]));
        assert!(ch.compressed);
        ch.raw_len = 100;
        assert!(Decompressor::new().raw(ch).is_err());
        let garbage = Chunk {
            payload: Bytes::from_static(b"\x28\xb5\x2f\xfd garbage"),
            raw_len: 1000,
            compressed: true,
        };
        assert!(Decompressor::new().raw(garbage).is_err());
    }
}
