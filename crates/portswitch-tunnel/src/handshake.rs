//! The handshake: Noise `NNpsk0` (X25519, ChaCha20-Poly1305, BLAKE2s) for an
//! authenticated key exchange with forward secrecy, wrapped so that no byte of it is
//! clear text and the first packet passes the fully-encrypted-traffic detector.
//!
//! ```text
//! client hello (raw) = salt[18]
//!                      AEAD(k, 0, u16 body length)                  18 bytes
//!                      AEAD(k, 1, u16 noise length, noise msg 1, padding)
//! server hello (raw) = AEAD(k, 2, u16 body length)
//!                      AEAD(k, 3, u16 noise length, noise msg 2, padding)
//! k = HKDF-SHA256(salt, psk, "portswitch-tunnel hello v1")   (ChaCha20-Poly1305)
//! wire = encode(raw): 3 bytes -> 4, over a 64-value low-popcount alphabet
//!        chosen by the PSK (see `shape`)
//! ```
//! The Noise ephemeral key, plainly visible in Noise's own wire format (and a plain
//! X25519 key is distinguishable from random), is inside `k`'s ciphertext here. The
//! client's Noise payload carries a timestamp and the session id; the server rejects
//! a hello outside the clock window or one whose salt it has seen ([`ReplayCache`]).
//! Padding makes every hello's length different. The split of the Noise handshake
//! gives one transport key per direction.
//!
//! Driving it: the client calls [`ClientHello::start`], writes its bytes, reads
//! [`SERVER_HEADER_WIRE_BYTES`], calls [`ClientHello::server_body_len`], reads that
//! many, then [`ClientHello::finish`]. The server reads [`CLIENT_HEADER_WIRE_BYTES`],
//! calls [`ServerHello::read_header`], reads the body, [`ServerHello::read_body`],
//! checks the replay cache, then [`ServerHello::respond`].

use std::collections::{HashMap, VecDeque};

use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, CHACHA20_POLY1305};
use ring::hkdf;

use crate::error::{Result, TunnelError};
use crate::limits::{
    HANDSHAKE_CLOCK_SKEW_S, HELLO_BODY_BYTES_MAX, HELLO_PAD_MAX_BYTES, REPLAY_CACHE_ENTRIES_MAX,
    TAG_BYTES,
};
use crate::shape::Alphabet;

const NOISE: &str = "Noise_NNpsk0_25519_ChaChaPoly_BLAKE2s";
const VERSION: u8 = 1;
pub const SALT_BYTES: usize = 18;
const HEADER_RAW: usize = 2 + TAG_BYTES;
/// Wire bytes a server reads first: salt and sealed length, encoded.
pub const CLIENT_HEADER_WIRE_BYTES: usize = (SALT_BYTES + HEADER_RAW) / 3 * 4;
/// Wire bytes a client reads first: the sealed length, encoded.
pub const SERVER_HEADER_WIRE_BYTES: usize = HEADER_RAW / 3 * 4;
const _: () = assert!((SALT_BYTES + HEADER_RAW).is_multiple_of(3) && HEADER_RAW.is_multiple_of(3));
const _: () = assert!(HELLO_PAD_MAX_BYTES + 200 <= HELLO_BODY_BYTES_MAX);

/// The pre-shared key from `portswitch tunnel keygen`, and what is derived from it.
#[derive(Clone)]
pub struct Psk {
    key: [u8; 32],
    alphabet: Alphabet,
}

impl std::fmt::Debug for Psk {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Psk(..)")
    }
}

struct Len(usize);
impl hkdf::KeyType for Len {
    fn len(&self) -> usize {
        self.0
    }
}

fn hkdf_fill(salt: &[u8], ikm: &[u8], info: &[u8], out: &mut [u8]) {
    hkdf::Salt::new(hkdf::HKDF_SHA256, salt)
        .extract(ikm)
        .expand(&[info], Len(out.len()))
        .and_then(|okm| okm.fill(out))
        .expect("HKDF output within 255 blocks");
}

fn random<const N: usize>() -> [u8; N] {
    let mut b = [0u8; N];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut b)
        .expect("the system's random source");
    b
}

const PSK_PREFIX: &str = "pst1";

impl Psk {
    pub fn from_bytes(key: [u8; 32]) -> Psk {
        let mut seed = [0u8; 64];
        hkdf_fill(b"", &key, b"portswitch-tunnel alphabet v1", &mut seed);
        Psk {
            key,
            alphabet: Alphabet::from_seed(&seed),
        }
    }

    /// A fresh random key.
    pub fn generate() -> Psk {
        Psk::from_bytes(random())
    }

    /// The key as text: `pst1` and 64 hex digits.
    pub fn to_text(&self) -> String {
        let mut s = String::from(PSK_PREFIX);
        for b in self.key {
            s.push_str(&format!("{b:02x}"));
        }
        s
    }

    pub fn from_text(text: &str) -> Result<Psk> {
        let t = text.trim();
        let hex = t
            .strip_prefix(PSK_PREFIX)
            .ok_or_else(|| TunnelError::Key(format!("expected {PSK_PREFIX} and 64 hex digits")))?;
        if hex.len() != 64 || !hex.is_ascii() {
            return Err(TunnelError::Key("expected 64 hex digits".into()));
        }
        let mut key = [0u8; 32];
        for (i, k) in key.iter_mut().enumerate() {
            *k = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16)
                .map_err(|_| TunnelError::Key("not hex".into()))?;
        }
        Ok(Psk::from_bytes(key))
    }

    pub fn alphabet(&self) -> &Alphabet {
        &self.alphabet
    }

    fn hello_key(&self, salt: &[u8]) -> LessSafeKey {
        let mut k = [0u8; 32];
        hkdf_fill(salt, &self.key, b"portswitch-tunnel hello v1", &mut k);
        LessSafeKey::new(UnboundKey::new(&CHACHA20_POLY1305, &k).expect("32-byte key"))
    }
}

/// Transport keys of one connection.
#[derive(Clone)]
pub struct Keys {
    pub send: [u8; 32],
    pub recv: [u8; 32],
}

/// What the client says in its hello.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientInfo {
    /// Seconds since the Unix epoch at the client.
    pub unix_s: u64,
    /// The session this connection joins (random, chosen by the client).
    pub session: [u8; 16],
}

fn nonce(n: u64) -> Nonce {
    let mut b = [0u8; 12];
    b[4..].copy_from_slice(&n.to_be_bytes());
    Nonce::assume_unique_for_key(b)
}

fn seal(k: &LessSafeKey, n: u64, data: &mut Vec<u8>) {
    let tag = k
        .seal_in_place_separate_tag(nonce(n), Aad::empty(), data)
        .expect("sealing a hello");
    data.extend_from_slice(tag.as_ref());
}

fn open<'a>(k: &LessSafeKey, n: u64, data: &'a mut [u8]) -> Result<&'a mut [u8]> {
    k.open_in_place(nonce(n), Aad::empty(), data)
        .map_err(|_| TunnelError::Auth)
}

/// Raw header and body of a hello carrying `noise`, padded at random.
fn sealed_hello(
    k: &LessSafeKey,
    first_nonce: u64,
    noise: &[u8],
    rng: &mut fastrand::Rng,
) -> Vec<u8> {
    let mut body = Vec::with_capacity(noise.len() + HELLO_PAD_MAX_BYTES + 24);
    body.extend_from_slice(&(noise.len() as u16).to_be_bytes());
    body.extend_from_slice(noise);
    let mut pad = rng.usize(0..=HELLO_PAD_MAX_BYTES);
    // The sealed body's length must be a whole number of 3-byte groups.
    while !(body.len() + pad + TAG_BYTES).is_multiple_of(3) {
        pad += 1;
    }
    body.extend((0..pad).map(|_| rng.u8(..)));
    seal(k, first_nonce + 1, &mut body);
    let mut raw = (body.len() as u16).to_be_bytes().to_vec();
    seal(k, first_nonce, &mut raw);
    raw.extend_from_slice(&body);
    raw
}

fn body_len(k: &LessSafeKey, n: u64, header_raw: &mut [u8]) -> Result<usize> {
    // The callers' slices are any length (the functions are public): a header is
    // exactly one sealed u16.
    if header_raw.len() != HEADER_RAW {
        return Err(TunnelError::malformed("hello", "header length"));
    }
    let plain = open(k, n, header_raw)?;
    let len = u16::from_be_bytes([plain[0], plain[1]]) as usize;
    if !(TAG_BYTES + 2..=HELLO_BODY_BYTES_MAX).contains(&len) || !len.is_multiple_of(3) {
        return Err(TunnelError::TooLong {
            what: "hello body",
            len,
            max: HELLO_BODY_BYTES_MAX,
        });
    }
    Ok(len / 3 * 4)
}

fn noise_of<'a>(k: &LessSafeKey, n: u64, body_raw: &'a mut [u8]) -> Result<&'a [u8]> {
    let plain = open(k, n, body_raw)?;
    if plain.len() < 2 {
        return Err(TunnelError::malformed("hello", "body too short"));
    }
    let len = u16::from_be_bytes([plain[0], plain[1]]) as usize;
    if len + 2 > plain.len() {
        return Err(TunnelError::malformed(
            "hello",
            "noise message beyond the body",
        ));
    }
    Ok(&plain[2..2 + len])
}

fn noise_err(e: snow::Error) -> TunnelError {
    TunnelError::Noise(e.to_string())
}

/// The client's side of a handshake.
pub struct ClientHello {
    noise: snow::HandshakeState,
    key: LessSafeKey,
    psk: Psk,
}

impl ClientHello {
    /// Starts a handshake; returns the state and the wire bytes to send.
    pub fn start(
        psk: &Psk,
        info: &ClientInfo,
        rng: &mut fastrand::Rng,
    ) -> Result<(ClientHello, Vec<u8>)> {
        let mut noise = snow::Builder::new(NOISE.parse().map_err(noise_err)?)
            .psk(0, &psk.key)
            .build_initiator()
            .map_err(noise_err)?;
        let mut payload = vec![VERSION];
        payload.extend_from_slice(&info.unix_s.to_be_bytes());
        payload.extend_from_slice(&info.session);
        let mut msg = [0u8; 256];
        let n = noise.write_message(&payload, &mut msg).map_err(noise_err)?;
        let salt: [u8; SALT_BYTES] = random();
        let key = psk.hello_key(&salt);
        let mut raw = salt.to_vec();
        raw.extend_from_slice(&sealed_hello(&key, 0, &msg[..n], rng));
        let mut wire = Vec::new();
        psk.alphabet.encode(&raw, &mut wire);
        Ok((
            ClientHello {
                noise,
                key,
                psk: psk.clone(),
            },
            wire,
        ))
    }

    /// From the server's first [`SERVER_HEADER_WIRE_BYTES`]: the wire length of the
    /// rest of its hello.
    pub fn server_body_len(&self, header: &[u8]) -> Result<usize> {
        let mut raw = Vec::with_capacity(HEADER_RAW);
        self.psk.alphabet.decode(header, &mut raw)?;
        body_len(&self.key, 2, &mut raw)
    }

    pub fn finish(mut self, body: &[u8]) -> Result<Keys> {
        let mut raw = Vec::with_capacity(body.len());
        self.psk.alphabet.decode(body, &mut raw)?;
        let noise = noise_of(&self.key, 3, &mut raw)?;
        let mut payload = [0u8; 64];
        let n = self
            .noise
            .read_message(noise, &mut payload)
            .map_err(|_| TunnelError::Auth)?;
        if n < 2 || payload[0] != VERSION || payload[1] != 0 {
            return Err(TunnelError::malformed("server hello", "refused"));
        }
        let (send, recv) = self.noise.dangerously_get_raw_split();
        Ok(Keys { send, recv })
    }
}

/// The server's side of a handshake.
pub struct ServerHello {
    noise: snow::HandshakeState,
    key: LessSafeKey,
    psk: Psk,
    salt: [u8; SALT_BYTES],
}

impl ServerHello {
    /// From the client's first [`CLIENT_HEADER_WIRE_BYTES`]: the state and the wire
    /// length of the rest of its hello.
    pub fn read_header(psk: &Psk, header: &[u8]) -> Result<(ServerHello, usize)> {
        let mut raw = Vec::with_capacity(SALT_BYTES + HEADER_RAW);
        psk.alphabet.decode(header, &mut raw)?;
        if raw.len() != SALT_BYTES + HEADER_RAW {
            return Err(TunnelError::malformed("hello", "header length"));
        }
        let mut salt = [0u8; SALT_BYTES];
        salt.copy_from_slice(&raw[..SALT_BYTES]);
        let key = psk.hello_key(&salt);
        let len = body_len(&key, 0, &mut raw[SALT_BYTES..])?;
        let noise = snow::Builder::new(NOISE.parse().map_err(noise_err)?)
            .psk(0, &psk.key)
            .build_responder()
            .map_err(noise_err)?;
        Ok((
            ServerHello {
                noise,
                key,
                psk: psk.clone(),
                salt,
            },
            len,
        ))
    }

    /// Reads the rest of the client's hello: what it says.
    pub fn read_body(&mut self, body: &[u8]) -> Result<ClientInfo> {
        let mut raw = Vec::with_capacity(body.len());
        self.psk.alphabet.decode(body, &mut raw)?;
        let noise = noise_of(&self.key, 1, &mut raw)?;
        let mut payload = [0u8; 128];
        let n = self
            .noise
            .read_message(noise, &mut payload)
            .map_err(|_| TunnelError::Auth)?;
        if n < 1 + 8 + 16 || payload[0] != VERSION {
            return Err(TunnelError::malformed("client hello", "payload"));
        }
        let mut session = [0u8; 16];
        session.copy_from_slice(&payload[9..25]);
        Ok(ClientInfo {
            unix_s: u64::from_be_bytes(payload[1..9].try_into().expect("8 bytes")),
            session,
        })
    }

    /// The salt that identifies this hello for the replay cache.
    pub fn salt(&self) -> [u8; SALT_BYTES] {
        self.salt
    }

    /// Accepts: the wire bytes of the server hello and the transport keys.
    pub fn respond(mut self, rng: &mut fastrand::Rng) -> Result<(Vec<u8>, Keys)> {
        let mut msg = [0u8; 256];
        let n = self
            .noise
            .write_message(&[VERSION, 0], &mut msg)
            .map_err(noise_err)?;
        let raw = sealed_hello(&self.key, 2, &msg[..n], rng);
        let mut wire = Vec::new();
        self.psk.alphabet.encode(&raw, &mut wire);
        let (recv, send) = self.noise.dangerously_get_raw_split();
        Ok((wire, Keys { send, recv }))
    }
}

/// Salts of accepted hellos, remembered for twice the clock window: a hello older
/// than that is refused by its timestamp, so forgetting it is safe. Bounded; when
/// full of live entries it refuses new hellos rather than forget one too early.
#[derive(Default)]
pub struct ReplayCache {
    seen: HashMap<[u8; SALT_BYTES], u64>,
    order: VecDeque<([u8; SALT_BYTES], u64)>,
}

impl ReplayCache {
    pub fn new() -> ReplayCache {
        ReplayCache::default()
    }

    pub fn len(&self) -> usize {
        self.seen.len()
    }

    pub fn is_empty(&self) -> bool {
        self.seen.is_empty()
    }

    /// Checks a hello's timestamp against `now_s` and records its salt.
    pub fn check(&mut self, salt: [u8; SALT_BYTES], hello_s: u64, now_s: u64) -> Result<()> {
        if hello_s.abs_diff(now_s) > HANDSHAKE_CLOCK_SKEW_S {
            return Err(TunnelError::ClockSkew);
        }
        let keep_s = 2 * HANDSHAKE_CLOCK_SKEW_S;
        while let Some(&(s, at)) = self.order.front() {
            if at + keep_s >= now_s {
                break;
            }
            self.order.pop_front();
            self.seen.remove(&s);
        }
        if self.seen.contains_key(&salt) {
            return Err(TunnelError::Replay);
        }
        if self.seen.len() >= REPLAY_CACHE_ENTRIES_MAX {
            return Err(TunnelError::Limit("replay cache full"));
        }
        self.seen.insert(salt, now_s);
        self.order.push_back((salt, now_s));
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::shape::fet_exempt;

    fn handshake(psk_c: &Psk, psk_s: &Psk) -> Result<(Keys, Keys, ClientInfo, Vec<u8>)> {
        let mut rng = fastrand::Rng::with_seed(5);
        let info = ClientInfo {
            unix_s: 1000,
            session: [3; 16],
        };
        let (c, wire) = ClientHello::start(psk_c, &info, &mut rng)?;
        let (mut s, len) = ServerHello::read_header(psk_s, &wire[..CLIENT_HEADER_WIRE_BYTES])?;
        assert_eq!(CLIENT_HEADER_WIRE_BYTES + len, wire.len());
        let got = s.read_body(&wire[CLIENT_HEADER_WIRE_BYTES..])?;
        let (reply, skeys) = s.respond(&mut rng)?;
        let len = c.server_body_len(&reply[..SERVER_HEADER_WIRE_BYTES])?;
        assert_eq!(SERVER_HEADER_WIRE_BYTES + len, reply.len());
        let ckeys = c.finish(&reply[SERVER_HEADER_WIRE_BYTES..])?;
        Ok((ckeys, skeys, got, wire))
    }

    #[test]
    fn both_sides_agree_on_keys_and_the_hello_is_exempt() {
        let psk = Psk::generate();
        let (c, s, info, wire) = handshake(&psk, &psk).unwrap();
        assert_eq!(c.send, s.recv);
        assert_eq!(c.recv, s.send);
        assert_ne!(c.send, c.recv);
        assert_eq!(info.session, [3; 16]);
        assert!(fet_exempt(&wire));
    }

    #[test]
    fn another_key_fails_at_the_header() {
        let r = handshake(&Psk::generate(), &Psk::generate());
        assert!(matches!(r, Err(TunnelError::Auth)), "{:?}", r.err());
    }

    #[test]
    fn keys_round_trip_as_text() {
        let psk = Psk::generate();
        assert_eq!(Psk::from_text(&psk.to_text()).unwrap().key, psk.key);
        assert!(Psk::from_text("pst1zz").is_err());
        assert!(Psk::from_text(&"pst1".repeat(17)).is_err());
    }

    #[test]
    fn the_replay_cache_refuses_a_salt_twice_and_old_hellos() {
        let mut c = ReplayCache::new();
        c.check([1; SALT_BYTES], 1000, 1000).unwrap();
        assert!(matches!(
            c.check([1; SALT_BYTES], 1000, 1001),
            Err(TunnelError::Replay)
        ));
        assert!(matches!(
            c.check([2; SALT_BYTES], 1000 - HANDSHAKE_CLOCK_SKEW_S - 1, 1000),
            Err(TunnelError::ClockSkew)
        ));
        // Forgotten only once its timestamp can no longer pass.
        c.check(
            [3; SALT_BYTES],
            1000 + 2 * HANDSHAKE_CLOCK_SKEW_S + 1,
            1000 + 2 * HANDSHAKE_CLOCK_SKEW_S + 1,
        )
        .unwrap();
        assert_eq!(c.len(), 1);
    }
}
