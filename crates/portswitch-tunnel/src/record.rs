//! Records: how frames travel on a pool connection once the handshake is done.
//!
//! ```text
//! record  = header body
//! header  = AEAD(key, nonce 2i,   u16 body length)            18 bytes
//! body    = AEAD(key, nonce 2i+1, u16 content length, content, padding)
//! ```
//! AES-256-GCM, one key per direction per connection (from the Noise handshake), the
//! nonce a counter: a record cannot be replayed, reordered, dropped or moved to
//! another connection without the next open failing. Nothing on the wire is clear
//! text: lengths are sealed too, and a record's length is its content padded to a
//! length drawn at random (see [`pad_len`]), not the length of what it carries.

use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM};

use crate::error::{Result, TunnelError};
use crate::limits::{
    RECORD_BODY_BYTES_MAX, RECORD_HEADER_BYTES, RECORD_PAD_JITTER_MAX_BYTES, RECORD_PAD_MAX_BYTES,
    RECORD_PAD_MIN_BYTES, RECORD_PLAIN_BYTES_MAX, TAG_BYTES,
};

fn nonce(counter: u64) -> Nonce {
    let mut n = [0u8; 12];
    n[4..].copy_from_slice(&counter.to_be_bytes());
    Nonce::assume_unique_for_key(n)
}

fn key(k: &[u8; 32]) -> LessSafeKey {
    // A 32-byte key is always valid for AES-256-GCM.
    LessSafeKey::new(UnboundKey::new(&AES_256_GCM, k).expect("32-byte AES key"))
}

/// Plaintext length of a record carrying `content` bytes of frames: small records are
/// padded up to a length drawn uniformly from a fixed range, whatever they carry;
/// longer ones get a few random bytes more.
pub fn pad_len(content: usize, rng: &mut fastrand::Rng) -> usize {
    let with_prefix = content + 2;
    let target = rng.usize(RECORD_PAD_MIN_BYTES..=RECORD_PAD_MAX_BYTES);
    let plain = if with_prefix <= target {
        target
    } else {
        with_prefix + rng.usize(0..=RECORD_PAD_JITTER_MAX_BYTES)
    };
    plain.min(RECORD_PLAIN_BYTES_MAX)
}

/// Seals records in one direction of one connection.
pub struct Sealer {
    key: LessSafeKey,
    counter: u64,
}

impl Sealer {
    pub fn new(k: &[u8; 32]) -> Sealer {
        Sealer {
            key: key(k),
            counter: 0,
        }
    }

    /// Records sealed so far.
    pub fn records(&self) -> u64 {
        self.counter / 2
    }

    /// Starts a record in `buf`: room for the header and the content length. Append
    /// frames, then call [`Sealer::seal`].
    pub fn begin(buf: &mut Vec<u8>) {
        buf.clear();
        Sealer::begin_at_end(buf);
    }

    /// Starts a record after what `buf` already holds (records sealed before it, so
    /// several go out in one write without being copied); returns where it starts,
    /// for [`Sealer::seal_at`].
    pub fn begin_at_end(buf: &mut Vec<u8>) -> usize {
        let start = buf.len();
        buf.resize(start + RECORD_HEADER_BYTES + 2, 0);
        start
    }

    /// Pads and seals the record begun in `buf` to `plain_len` plaintext bytes
    /// (at least its content), leaving the wire bytes in `buf`.
    pub fn seal(&mut self, buf: &mut Vec<u8>, plain_len: usize) {
        self.seal_at(buf, 0, plain_len)
    }

    /// [`Sealer::seal`] for the record that starts at `start` of `buf`.
    pub fn seal_at(&mut self, buf: &mut Vec<u8>, start: usize, plain_len: usize) {
        let content = buf.len() - start - RECORD_HEADER_BYTES - 2;
        assert!(content + 2 <= plain_len && plain_len <= RECORD_PLAIN_BYTES_MAX);
        let at = start + RECORD_HEADER_BYTES;
        buf[at..at + 2].copy_from_slice(&(content as u16).to_be_bytes());
        // Padding: zeros, then sealed like the rest (indistinguishable from it).
        buf.resize(at + plain_len, 0);
        let body_len = plain_len + TAG_BYTES;
        buf[start..start + 2].copy_from_slice(&(body_len as u16).to_be_bytes());
        assert!(self.counter < u64::MAX - 2, "record counter exhausted");
        let (head, body) = buf[start..].split_at_mut(RECORD_HEADER_BYTES);
        let tag = self
            .key
            .seal_in_place_separate_tag(nonce(self.counter), Aad::empty(), &mut head[..2])
            .expect("sealing a short header");
        head[2..].copy_from_slice(tag.as_ref());
        let tag = self
            .key
            .seal_in_place_separate_tag(nonce(self.counter + 1), Aad::empty(), body)
            .expect("sealing a record within the AEAD's limits");
        buf.extend_from_slice(tag.as_ref());
        self.counter += 2;
    }
}

/// Opens records in one direction of one connection.
pub struct Opener {
    key: LessSafeKey,
    counter: u64,
}

impl Opener {
    pub fn new(k: &[u8; 32]) -> Opener {
        Opener {
            key: key(k),
            counter: 0,
        }
    }

    /// Opens a header; returns the length of the body that follows.
    pub fn open_header(&mut self, header: &mut [u8; RECORD_HEADER_BYTES]) -> Result<usize> {
        let plain = self
            .key
            .open_in_place(nonce(self.counter), Aad::empty(), header)
            .map_err(|_| TunnelError::Auth)?;
        let len = u16::from_be_bytes([plain[0], plain[1]]) as usize;
        // Checked before the body is read into memory: the length is the peer's.
        if !(TAG_BYTES + 2..=RECORD_BODY_BYTES_MAX).contains(&len) {
            return Err(TunnelError::malformed(
                "record",
                format!("body length {len}"),
            ));
        }
        Ok(len)
    }

    /// Opens a body in place; returns the range of its content (the frames).
    pub fn open_body(&mut self, body: &mut [u8]) -> Result<std::ops::Range<usize>> {
        let plain = self
            .key
            .open_in_place(nonce(self.counter + 1), Aad::empty(), body)
            .map_err(|_| TunnelError::Auth)?;
        self.counter += 2;
        if plain.len() < 2 {
            return Err(TunnelError::malformed("record", "body too short"));
        }
        let content = u16::from_be_bytes([plain[0], plain[1]]) as usize;
        if content + 2 > plain.len() {
            return Err(TunnelError::malformed("record", "content beyond the body"));
        }
        Ok(2..2 + content)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seal(s: &mut Sealer, content: &[u8], rng: &mut fastrand::Rng) -> Vec<u8> {
        let mut buf = Vec::new();
        Sealer::begin(&mut buf);
        buf.extend_from_slice(content);
        s.seal(&mut buf, pad_len(content.len(), rng));
        buf
    }

    fn open(o: &mut Opener, wire: &[u8]) -> Result<Vec<u8>> {
        let mut h = [0u8; RECORD_HEADER_BYTES];
        h.copy_from_slice(&wire[..RECORD_HEADER_BYTES]);
        let len = o.open_header(&mut h)?;
        let mut body = wire[RECORD_HEADER_BYTES..RECORD_HEADER_BYTES + len].to_vec();
        let r = o.open_body(&mut body)?;
        Ok(body[r].to_vec())
    }

    #[test]
    fn records_round_trip_and_small_ones_hide_their_length() {
        let k = [7u8; 32];
        let (mut s, mut o) = (Sealer::new(&k), Opener::new(&k));
        let mut rng = fastrand::Rng::with_seed(1);
        for n in [0usize, 1, 5, 100, 1000, 5000, 65_000] {
            let content: Vec<u8> = (0..n).map(|i| i as u8).collect();
            let wire = seal(&mut s, &content, &mut rng);
            if n + 2 <= RECORD_PAD_MIN_BYTES {
                assert!(wire.len() >= RECORD_HEADER_BYTES + RECORD_PAD_MIN_BYTES + TAG_BYTES);
            }
            assert_eq!(open(&mut o, &wire).unwrap(), content);
        }
    }

    #[test]
    fn records_sealed_one_after_another_in_one_buffer_open_in_order() {
        let k = [3u8; 32];
        let (mut s, mut o) = (Sealer::new(&k), Opener::new(&k));
        let mut rng = fastrand::Rng::with_seed(5);
        let contents: Vec<Vec<u8>> = vec![b"first".to_vec(), vec![9u8; 3000], Vec::new()];
        let mut wire = Vec::new();
        for c in &contents {
            let start = Sealer::begin_at_end(&mut wire);
            wire.extend_from_slice(c);
            s.seal_at(&mut wire, start, pad_len(c.len(), &mut rng));
        }
        let mut at = 0;
        for c in &contents {
            let mut h = [0u8; RECORD_HEADER_BYTES];
            h.copy_from_slice(&wire[at..at + RECORD_HEADER_BYTES]);
            let len = o.open_header(&mut h).unwrap();
            at += RECORD_HEADER_BYTES;
            let mut body = wire[at..at + len].to_vec();
            let r = o.open_body(&mut body).unwrap();
            assert_eq!(&body[r], &c[..]);
            at += len;
        }
        assert_eq!(at, wire.len());
    }

    #[test]
    fn a_flipped_bit_anywhere_or_a_replayed_record_is_rejected() {
        let k = [9u8; 32];
        let mut rng = fastrand::Rng::with_seed(2);
        let mut s = Sealer::new(&k);
        let wire = seal(&mut s, b"hello", &mut rng);
        for i in (0..wire.len()).step_by(7) {
            let mut bad = wire.clone();
            bad[i] ^= 0x20;
            assert!(open(&mut Opener::new(&k), &bad).is_err(), "bit {i}");
        }
        let mut o = Opener::new(&k);
        open(&mut o, &wire).unwrap();
        // The same record again: the nonce has moved on.
        assert!(matches!(open(&mut o, &wire), Err(TunnelError::Auth)));
    }
}
