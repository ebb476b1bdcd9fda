//! Sealing and opening whole records (frame, nonce, ciphertext, tag) at their place in
//! the log, with the vault's data keys.

use std::collections::HashMap;
use std::ops::Range;
use std::sync::{Arc, RwLock};
use std::time::Instant;

use prometheus_client::metrics::counter::Counter;

use crate::crypto::{random, Aead, AuthFailed};
use crate::format::{aad, Frame, Place, RecordKind, KEY_BYTES, VAULT_ID_BYTES};
use crate::limits::{FRAME_BYTES, NONCE_BYTES, TAG_BYTES};
use crate::metrics::{Metrics, SecondsCounter};
use crate::types::Cipher;

/// Bytes before a record's plaintext: frame and nonce.
pub const PLAIN_START: usize = FRAME_BYTES + NONCE_BYTES;
/// Bytes a record adds to its plaintext.
pub const RECORD_OVERHEAD_BYTES: usize = FRAME_BYTES + NONCE_BYTES + TAG_BYTES;

/// The vault id, cipher and data keys: everything needed to seal and open records.
pub struct Crypt {
    pub vault_id: [u8; VAULT_ID_BYTES],
    pub cipher: Cipher,
    keys: RwLock<HashMap<u32, Arc<Aead>>>,
    /// Where the time and bytes of block record opens are counted (`metered`).
    meter: Option<(SecondsCounter, Counter)>,
}

impl Crypt {
    pub fn new(vault_id: [u8; VAULT_ID_BYTES], cipher: Cipher) -> Crypt {
        Crypt {
            vault_id,
            cipher,
            keys: RwLock::new(HashMap::new()),
            meter: None,
        }
    }

    /// Counts every block record `open` into `m`: its time in `verify_seconds`, its
    /// bytes in `verified_bytes` (one clock read before and one after each open).
    pub fn metered(mut self, m: &Metrics) -> Crypt {
        self.meter = Some((m.verify_seconds.clone(), m.verified_bytes.clone()));
        self
    }

    pub fn set_keys<'a>(&self, keys: impl Iterator<Item = (u32, &'a [u8; KEY_BYTES])>) {
        let map = keys
            .map(|(id, k)| (id, Arc::new(Aead::new(self.cipher, k))))
            .collect();
        *self.keys.write().expect("keys lock") = map;
    }

    /// The highest key id of the key table. Key ids only grow (a new key takes the
    /// highest plus one, and the active, newest key is never dropped), so an id above
    /// it was never issued under this header: a rolled-back header or a forged frame.
    pub fn max_key_id(&self) -> Option<u32> {
        self.keys.read().expect("keys lock").keys().max().copied()
    }

    pub fn key(&self, id: u32) -> Option<Arc<Aead>> {
        self.keys.read().expect("keys lock").get(&id).cloned()
    }

    /// Seals a record in place. `buf` is `PLAIN_START` bytes of room, the plaintext,
    /// and `TAG_BYTES` of room; `place.key_id` names the key `aead` is.
    pub fn seal(&self, aead: &Aead, place: &Place, buf: &mut [u8]) {
        assert!(
            buf.len() >= RECORD_OVERHEAD_BYTES,
            "record buffer too small"
        );
        let body_len = (buf.len() - FRAME_BYTES) as u32;
        let frame = Frame {
            body_len,
            kind: place.kind,
            key_id: place.key_id,
        };
        buf[..FRAME_BYTES].copy_from_slice(&frame.encode());
        let mut nonce = [0u8; NONCE_BYTES];
        random(&mut nonce);
        buf[FRAME_BYTES..PLAIN_START].copy_from_slice(&nonce);
        let a = aad(&self.vault_id, place);
        let end = buf.len() - TAG_BYTES;
        let tag = aead.seal(&nonce, &a, &mut buf[PLAIN_START..end]);
        buf[end..].copy_from_slice(&tag);
    }

    /// Opens a whole record in place (`buf` is exactly the record); returns the range of
    /// the plaintext. `place.key_id` is ignored: the frame names the key, and the seal
    /// binds it.
    pub fn open(
        &self,
        kind: RecordKind,
        place: &Place,
        buf: &mut [u8],
    ) -> Result<Range<usize>, AuthFailed> {
        match &self.meter {
            Some((time, bytes)) if kind == RecordKind::Block => {
                let t = Instant::now();
                let r = self.open_unmetered(kind, place, buf);
                time.add(t.elapsed());
                bytes.inc_by(buf.len() as u64);
                r
            }
            _ => self.open_unmetered(kind, place, buf),
        }
    }

    fn open_unmetered(
        &self,
        kind: RecordKind,
        place: &Place,
        buf: &mut [u8],
    ) -> Result<Range<usize>, AuthFailed> {
        let frame = Frame::decode(buf).ok_or(AuthFailed)?;
        if frame.kind != kind || frame.record_len() as usize != buf.len() {
            return Err(AuthFailed);
        }
        let aead = self.key(frame.key_id).ok_or(AuthFailed)?;
        let mut nonce = [0u8; NONCE_BYTES];
        nonce.copy_from_slice(&buf[FRAME_BYTES..PLAIN_START]);
        let p = Place {
            kind,
            key_id: frame.key_id,
            ..*place
        };
        let a = aad(&self.vault_id, &p);
        let n = aead.open(&nonce, &a, &mut buf[PLAIN_START..])?;
        Ok(PLAIN_START..PLAIN_START + n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn place(kind: RecordKind) -> Place {
        Place {
            kind,
            key_id: 0,
            segment: 3,
            offset: 4096,
            ino: 7,
            index: 1,
            version: 9,
        }
    }

    fn sealed(c: &Crypt, kind: RecordKind, plain: &[u8]) -> Vec<u8> {
        let mut buf = vec![0u8; RECORD_OVERHEAD_BYTES + plain.len()];
        buf[PLAIN_START..PLAIN_START + plain.len()].copy_from_slice(plain);
        c.seal(&c.key(0).unwrap(), &place(kind), &mut buf);
        buf
    }

    #[test]
    fn metered_opens_of_block_records_count_time_and_bytes() {
        let m = Metrics::default();
        let c = Crypt::new([5; VAULT_ID_BYTES], Cipher::Aes256Gcm).metered(&m);
        c.set_keys([(0, &[1u8; KEY_BYTES])].into_iter());
        let block = sealed(&c, RecordKind::Block, &[0xab; 4096]);
        let mut b = block.clone();
        let r = c.open(RecordKind::Block, &place(RecordKind::Block), &mut b);
        assert_eq!(&b[r.unwrap()], &[0xab; 4096][..]);
        assert_eq!(m.verified_bytes.get(), block.len() as u64);
        assert!(m.verify_seconds.nanos() > 0);
        // A failed open is verification work too.
        let mut bad = block.clone();
        bad[PLAIN_START] ^= 1;
        assert!(c
            .open(RecordKind::Block, &place(RecordKind::Block), &mut bad)
            .is_err());
        assert_eq!(m.verified_bytes.get(), 2 * block.len() as u64);
        // Commits and checkpoints are not block reads.
        let mut commit = sealed(&c, RecordKind::Commit, b"entry");
        assert!(c
            .open(RecordKind::Commit, &place(RecordKind::Commit), &mut commit)
            .is_ok());
        assert_eq!(m.verified_bytes.get(), 2 * block.len() as u64);
        // Unmetered, nothing is counted.
        let plain = Crypt::new([5; VAULT_ID_BYTES], Cipher::Aes256Gcm);
        plain.set_keys([(0, &[1u8; KEY_BYTES])].into_iter());
        let mut b = block.clone();
        assert!(plain
            .open(RecordKind::Block, &place(RecordKind::Block), &mut b)
            .is_ok());
        assert_eq!(m.verified_bytes.get(), 2 * block.len() as u64);
    }
}
