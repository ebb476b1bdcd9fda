//! Sealing and opening whole records (frame, nonce, ciphertext, tag) at their place in
//! the log, with the vault's data keys.

use std::collections::HashMap;
use std::ops::Range;
use std::sync::{Arc, RwLock};

use crate::crypto::{random, Aead, AuthFailed};
use crate::format::{aad, Frame, Place, RecordKind, KEY_BYTES, VAULT_ID_BYTES};
use crate::limits::{FRAME_BYTES, NONCE_BYTES, TAG_BYTES};
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
}

impl Crypt {
    pub fn new(vault_id: [u8; VAULT_ID_BYTES], cipher: Cipher) -> Crypt {
        Crypt {
            vault_id,
            cipher,
            keys: RwLock::new(HashMap::new()),
        }
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
