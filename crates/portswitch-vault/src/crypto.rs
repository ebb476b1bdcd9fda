//! The three AEADs behind one type, the passphrase KDF, and randomness. No hand-written
//! crypto: AES-256-GCM and ChaCha20-Poly1305 come from ring, SM4-GCM from RustCrypto's
//! generic GCM over `sm4`, Argon2id from RustCrypto's `argon2`.

use std::cell::RefCell;

use aes_gcm::aead::consts::U12;
use aes_gcm::aead::generic_array::GenericArray;
use aes_gcm::aead::{AeadInPlace, KeyInit};
use aes_gcm::AesGcm;
use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM, CHACHA20_POLY1305};
use zeroize::{Zeroize, Zeroizing};

use crate::error::{Result, VaultError};
use crate::format::KEY_BYTES;
use crate::limits::{NONCE_BYTES, TAG_BYTES};
use crate::types::{Cipher, KdfParams};

type Sm4Gcm = AesGcm<sm4::Sm4, U12>;

/// One key of one cipher, ready to seal and open.
pub(crate) enum Aead {
    Ring(Box<LessSafeKey>),
    Sm4(Box<Sm4Gcm>),
}

/// An AEAD that did not open: tampered, misplaced, or under another key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct AuthFailed;

impl Aead {
    /// SM4 takes 128-bit keys: it uses the first 16 bytes of the 32-byte key.
    pub fn new(cipher: Cipher, key: &[u8; KEY_BYTES]) -> Aead {
        match cipher {
            Cipher::Aes256Gcm => Aead::Ring(Box::new(LessSafeKey::new(
                UnboundKey::new(&AES_256_GCM, key).expect("32-byte AES key"),
            ))),
            Cipher::ChaCha20Poly1305 => Aead::Ring(Box::new(LessSafeKey::new(
                UnboundKey::new(&CHACHA20_POLY1305, key).expect("32-byte ChaCha key"),
            ))),
            Cipher::Sm4Gcm => Aead::Sm4(Box::new(
                Sm4Gcm::new_from_slice(&key[..16]).expect("16-byte SM4 key"),
            )),
        }
    }

    /// Seals `buf` in place and returns the tag.
    pub fn seal(&self, nonce: &[u8; NONCE_BYTES], aad: &[u8], buf: &mut [u8]) -> [u8; TAG_BYTES] {
        let mut out = [0u8; TAG_BYTES];
        match self {
            Aead::Ring(k) => {
                let tag = k
                    .seal_in_place_separate_tag(
                        Nonce::assume_unique_for_key(*nonce),
                        Aad::from(aad),
                        buf,
                    )
                    .expect("ring seal cannot fail below its size limit");
                out.copy_from_slice(tag.as_ref());
            }
            Aead::Sm4(k) => {
                let tag = k
                    .encrypt_in_place_detached(GenericArray::from_slice(nonce), aad, buf)
                    .expect("sm4-gcm seal cannot fail below its size limit");
                out.copy_from_slice(&tag);
            }
        }
        out
    }

    /// Opens `buf` (ciphertext followed by the tag) in place; the plaintext is
    /// `buf[..len - TAG_BYTES]` on success.
    pub fn open(
        &self,
        nonce: &[u8; NONCE_BYTES],
        aad: &[u8],
        buf: &mut [u8],
    ) -> Result<usize, AuthFailed> {
        if buf.len() < TAG_BYTES {
            return Err(AuthFailed);
        }
        match self {
            Aead::Ring(k) => k
                .open_in_place(Nonce::assume_unique_for_key(*nonce), Aad::from(aad), buf)
                .map(|p| p.len())
                .map_err(|_| AuthFailed),
            Aead::Sm4(k) => {
                let n = buf.len() - TAG_BYTES;
                let (ct, tag) = buf.split_at_mut(n);
                let tag = GenericArray::clone_from_slice(tag);
                k.decrypt_in_place_detached(GenericArray::from_slice(nonce), aad, ct, &tag)
                    .map(|_| n)
                    .map_err(|_| AuthFailed)
            }
        }
    }
}

/// Passphrase -> key-encryption key, with Argon2id.
pub(crate) fn derive_kek(
    passphrase: &[u8],
    salt: &[u8],
    kdf: &KdfParams,
) -> Result<Zeroizing<[u8; KEY_BYTES]>> {
    let params = argon2::Params::new(kdf.memory_kib, kdf.passes, kdf.lanes, Some(KEY_BYTES))
        .map_err(|e| VaultError::format("kdf parameters", e.to_string()))?;
    let a = argon2::Argon2::new(argon2::Algorithm::Argon2id, argon2::Version::V0x13, params);
    let mut out = Zeroizing::new([0u8; KEY_BYTES]);
    a.hash_password_into(passphrase, salt, &mut out[..])
        .map_err(|e| VaultError::format("kdf", e.to_string()))?;
    Ok(out)
}

/// Bytes of one thread's pool: one getrandom per ~340 nonces instead of one per block.
const POOL_BYTES: usize = 4096;

/// Random bytes drawn from the OS in batches, handed out once each.
///
/// Fork safety: a child process inherits a copy of the pool. Had it kept drawing from
/// it, parent and child would hand out the same bytes: the same nonces under the same
/// key (GCM then leaks the XOR of the plaintexts and its authentication key) or the
/// same new data keys. So the pool records the process that filled it, and every draw
/// compares that with the caller's process id (`std::process::id()`: a `getpid`
/// system call, about 70 ns, against a 4 KiB block seal of about 1 µs and a block
/// write of about 10 µs); a child sees another id and refills from the OS first.
/// (A page with `MADV_WIPEONFORK`, which the kernel zeroes in the child, would spare
/// the system call, but mapping and advising it takes `unsafe`, which this crate
/// forbids.)
#[cfg_attr(test, derive(Clone))]
struct Pool {
    buf: Box<[u8; POOL_BYTES]>,
    /// The next byte to hand out; `POOL_BYTES` when empty.
    pos: usize,
    /// The process that filled `buf`; 0 (no process) before the first fill.
    pid: u32,
}

impl Pool {
    fn new() -> Pool {
        Pool {
            buf: Box::new([0u8; POOL_BYTES]),
            pos: POOL_BYTES,
            pid: 0,
        }
    }

    /// Fills `out` (at most `POOL_BYTES`) from the pool, as process `pid`.
    fn draw(&mut self, pid: u32, out: &mut [u8]) {
        if self.pid != pid || self.pos + out.len() > POOL_BYTES {
            ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut self.buf[..])
                .expect("the OS random source failed");
            self.pos = 0;
            self.pid = pid;
        }
        let bytes = &mut self.buf[self.pos..self.pos + out.len()];
        out.copy_from_slice(bytes);
        // Bytes handed out are wiped so the pool never holds a nonce or key twice.
        bytes.zeroize();
        self.pos += out.len();
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        self.buf.zeroize();
    }
}

thread_local! {
    static POOL: RefCell<Pool> = RefCell::new(Pool::new());
}

/// Fills `out` with bytes from the operating system's CSPRNG.
pub(crate) fn random(out: &mut [u8]) {
    if out.len() > 256 {
        ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), out)
            .expect("the OS random source failed");
        return;
    }
    POOL.with(|p| p.borrow_mut().draw(std::process::id(), out));
}

pub(crate) fn random_array<const N: usize>() -> [u8; N] {
    let mut a = [0u8; N];
    random(&mut a);
    a
}

pub(crate) fn sha256(parts: &[&[u8]]) -> [u8; 32] {
    let mut c = ring::digest::Context::new(&ring::digest::SHA256);
    for p in parts {
        c.update(p);
    }
    let mut out = [0u8; 32];
    out.copy_from_slice(c.finish().as_ref());
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_cipher_round_trips_and_refuses_tampering() {
        for cipher in [Cipher::Aes256Gcm, Cipher::ChaCha20Poly1305, Cipher::Sm4Gcm] {
            let key = random_array::<32>();
            let a = Aead::new(cipher, &key);
            let nonce = random_array::<12>();
            let mut buf = b"hello vault".to_vec();
            let tag = a.seal(&nonce, b"aad", &mut buf);
            assert_ne!(&buf[..], b"hello vault");
            buf.extend_from_slice(&tag);
            let mut ok = buf.clone();
            let n = a.open(&nonce, b"aad", &mut ok).unwrap();
            assert_eq!(&ok[..n], b"hello vault", "{cipher:?}");
            let mut bad = buf.clone();
            bad[0] ^= 1;
            assert_eq!(a.open(&nonce, b"aad", &mut bad), Err(AuthFailed));
            let mut bad = buf.clone();
            assert_eq!(a.open(&nonce, b"aaD", &mut bad), Err(AuthFailed));
            let other = Aead::new(cipher, &random_array::<32>());
            let mut bad = buf.clone();
            assert_eq!(other.open(&nonce, b"aad", &mut bad), Err(AuthFailed));
        }
    }

    #[test]
    fn a_forked_child_does_not_reuse_the_parents_pool() {
        let me = std::process::id();
        let mut parent = Pool::new();
        let mut first = [0u8; 12];
        parent.draw(me, &mut first);
        assert_ne!(first, [0; 12]);
        // fork(): the child's memory is a copy of the parent's, its pid another.
        let mut child = parent.clone();
        let (mut p, mut c) = ([0u8; 12], [0u8; 12]);
        parent.draw(me, &mut p);
        child.draw(me.wrapping_add(1), &mut c);
        assert_ne!(p, c, "the child handed out the parent's next nonce");
        assert_ne!(p, first);
        // The child refilled: what it had inherited is gone, and it goes on from there.
        assert_eq!(child.pid, me.wrapping_add(1));
        assert_eq!(child.pos, 12);
        // Without a fork the parent goes on from the same batch; what it handed out is
        // wiped.
        assert_eq!(parent.pos, 24);
        assert_eq!(parent.buf[..24], [0u8; 24]);
    }

    #[test]
    fn the_pool_refills_when_empty_and_never_repeats() {
        let me = std::process::id();
        let mut pool = Pool::new();
        let mut seen = std::collections::HashSet::new();
        for _ in 0..3 * POOL_BYTES / 12 {
            let mut n = [0u8; 12];
            pool.draw(me, &mut n);
            assert!(seen.insert(n), "a nonce came twice");
        }
    }

    #[test]
    fn kdf_depends_on_passphrase_and_salt() {
        let p = KdfParams::danger_insecure_fast();
        let a = derive_kek(b"one", &[1; 16], &p).unwrap();
        let b = derive_kek(b"two", &[1; 16], &p).unwrap();
        let c = derive_kek(b"one", &[2; 16], &p).unwrap();
        assert_ne!(*a, *b);
        assert_ne!(*a, *c);
        assert_eq!(*a, *derive_kek(b"one", &[1; 16], &p).unwrap());
    }
}
