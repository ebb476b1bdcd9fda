//! SCRAM-SHA-256 (RFC 5802, RFC 7677), both sides, as pure state machines.
//!
//! No password or reusable secret crosses the wire: the client proves knowledge of the
//! password against a salted, iterated verifier the server stores (`StoredKey`,
//! `ServerKey`), and the server proves it holds the verifier by signing the exchange.
//! Each exchange is bound to a fresh server nonce, so a recorded exchange cannot be
//! replayed. Over TLS the exchange can also be bound to the TLS channel
//! (`tls-exporter`, RFC 9266), so it cannot be relayed through another connection.
//!
//! Passwords are used as their UTF-8 bytes (no SASLprep); for ASCII passwords that is
//! what SASLprep would produce.
//!
//! Nonces and salts come from the caller (the driver reads the OS's randomness), so
//! these machines are deterministic and testable against the RFC's vectors.

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

type HmacSha256 = Hmac<Sha256>;

/// Fewest PBKDF2 iterations a verifier may use (RFC 7677 recommends at least 4096).
pub const ITERATIONS_MIN: u32 = 4_096;
/// Default iterations for new verifiers.
pub const ITERATIONS_DEFAULT: u32 = 16_384;
/// Most iterations a client will compute for a server (a hostile server could
/// otherwise make every login burn seconds of client CPU).
pub const ITERATIONS_MAX: u32 = 1_000_000;
/// Longest SCRAM message accepted.
pub const MESSAGE_BYTES_MAX: usize = 1_024;
/// Longest user name.
pub const USERNAME_BYTES_MAX: usize = 128;
/// Bytes of salt in new verifiers.
pub const SALT_BYTES: usize = 16;

/// Why an exchange failed. Deliberately coarse towards the peer: the server answers
/// every authentication failure the same way (see [`ScramError::peer_message`]).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ScramError {
    #[error("malformed SCRAM message: {0}")]
    Malformed(&'static str),
    #[error("SCRAM message longer than {MESSAGE_BYTES_MAX} bytes")]
    TooLong,
    #[error("invalid credentials")]
    InvalidProof,
    #[error("the server's nonce does not extend the client's")]
    NonceMismatch,
    #[error("channel binding does not match")]
    ChannelBinding,
    #[error("iteration count {0} outside [{ITERATIONS_MIN}, {ITERATIONS_MAX}]")]
    Iterations(u32),
    #[error("the server's signature is wrong: it does not hold this user's verifier")]
    ServerSignature,
    #[error("the server refused: {0}")]
    ServerError(String),
}

impl ScramError {
    /// What the server tells the client: the same text for a wrong password, an
    /// unknown user and a bad proof, so that answers do not reveal which users exist.
    pub fn peer_message(&self) -> &'static str {
        match self {
            ScramError::Malformed(_) | ScramError::TooLong => "invalid-encoding",
            ScramError::ChannelBinding => "channel-bindings-dont-match",
            _ => "invalid-proof",
        }
    }
}

/// What the server stores for a user instead of the password.
#[derive(Clone, PartialEq, Eq)]
pub struct Verifier {
    pub salt: Vec<u8>,
    pub iterations: u32,
    pub stored_key: [u8; 32],
    pub server_key: [u8; 32],
}

impl std::fmt::Debug for Verifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Keys stay out of logs.
        f.debug_struct("Verifier")
            .field("iterations", &self.iterations)
            .finish_non_exhaustive()
    }
}

fn hmac(key: &[u8], data: &[u8]) -> [u8; 32] {
    let mut m = HmacSha256::new_from_slice(key).expect("HMAC takes keys of any length");
    m.update(data);
    m.finalize().into_bytes().into()
}

/// Salted passwords a client derived, so that a process with many sessions (or one
/// session resuming after a failover) pays PBKDF2 once per password and salt, not
/// per login (RFC 5802 §5.1 allows this). The entry is as secret as the password the
/// process already holds; the cache is emptied when full.
static SALTED_CACHE: std::sync::Mutex<Vec<([u8; 32], [u8; 32])>> =
    std::sync::Mutex::new(Vec::new());
/// Most entries in [`SALTED_CACHE`].
pub const SALTED_CACHE_ENTRIES_MAX: usize = 64;

fn cached_salted_password(password: &[u8], salt: &[u8], iterations: u32) -> [u8; 32] {
    let mut h = Sha256::new();
    for part in [password, salt, &iterations.to_le_bytes()] {
        h.update((part.len() as u64).to_le_bytes());
        h.update(part);
    }
    let key: [u8; 32] = h.finalize().into();
    // A poisoned lock only means another thread panicked while holding a cache.
    let lock = || SALTED_CACHE.lock().unwrap_or_else(|p| p.into_inner());
    if let Some((_, v)) = lock().iter().find(|(k, _)| *k == key) {
        return *v;
    }
    // Derived outside the lock: other logins need not wait for this one.
    let v = salted_password(password, salt, iterations);
    let mut cache = lock();
    if cache.len() >= SALTED_CACHE_ENTRIES_MAX {
        cache.clear();
    }
    cache.push((key, v));
    v
}

fn salted_password(password: &[u8], salt: &[u8], iterations: u32) -> [u8; 32] {
    let mut out = [0u8; 32];
    pbkdf2::pbkdf2_hmac::<Sha256>(password, salt, iterations, &mut out);
    out
}

impl Verifier {
    /// Derives a verifier from a password. `salt` must be random and unique per user.
    pub fn new(password: &str, salt: &[u8], iterations: u32) -> Verifier {
        assert!(
            iterations >= ITERATIONS_MIN,
            "verifiers use at least {ITERATIONS_MIN} iterations"
        );
        let salted = salted_password(password.as_bytes(), salt, iterations);
        let client_key = hmac(&salted, b"Client Key");
        Verifier {
            salt: salt.to_vec(),
            iterations,
            stored_key: Sha256::digest(client_key).into(),
            server_key: hmac(&salted, b"Server Key"),
        }
    }
}

/// The channel the exchange runs over, as the server or client sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Channel<'a> {
    /// No TLS: nothing to bind to.
    Plain,
    /// TLS: the `tls-exporter` keying material of this connection (32 bytes, label
    /// "EXPORTER-Channel-Binding", empty context).
    TlsExporter(&'a [u8]),
}

fn escape_name(name: &str) -> String {
    name.replace('=', "=3D").replace(',', "=2C")
}

fn unescape_name(s: &str) -> Result<String, ScramError> {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(i) = rest.find('=') {
        out.push_str(&rest[..i]);
        match rest.get(i..i + 3) {
            Some("=3D") => out.push('='),
            Some("=2C") => out.push(','),
            _ => return Err(ScramError::Malformed("bad escape in user name")),
        }
        rest = &rest[i + 3..];
    }
    out.push_str(rest);
    Ok(out)
}

fn attr(part: &str, key: char) -> Result<&str, ScramError> {
    let mut chars = part.chars();
    if chars.next() == Some(key) && chars.next() == Some('=') {
        Ok(&part[2..])
    } else {
        Err(ScramError::Malformed("unexpected attribute"))
    }
}

fn printable_nonce(n: &str) -> bool {
    !n.is_empty() && n.bytes().all(|b| (0x21..=0x7e).contains(&b) && b != b',')
}

/// Encodes raw random bytes as a nonce (printable, no commas).
pub fn nonce_from(random: &[u8]) -> String {
    B64.encode(random)
}

/// The server's side of one exchange, between the two client messages.
#[derive(Debug)]
pub struct ServerExchange {
    username: String,
    /// `None` when the user does not exist: the exchange continues with a fake salt and
    /// fails at the proof, exactly as a wrong password would.
    verifier: Option<Verifier>,
    gs2_header: String,
    client_first_bare: String,
    server_first: String,
    nonce: String,
}

impl ServerExchange {
    /// Handles `client-first-message`. `lookup` finds the user's verifier; for unknown
    /// users the salt is derived from `fake_salt_key` so that it is stable per name and
    /// indistinguishable from a real one. Returns the `server-first-message`.
    pub fn start(
        client_first: &str,
        lookup: impl FnOnce(&str) -> Option<Verifier>,
        fake_salt_key: &[u8; 32],
        server_nonce: &str,
        channel: Channel<'_>,
    ) -> Result<(ServerExchange, String), ScramError> {
        Self::start_with(
            client_first,
            lookup,
            fake_salt_key,
            ITERATIONS_DEFAULT,
            server_nonce,
            channel,
        )
    }

    /// [`ServerExchange::start`] on a server whose new verifiers use
    /// `fake_iterations`: unknown users are offered that count too, so the count
    /// does not tell them from real ones (whose verifiers mostly have it).
    pub fn start_with(
        client_first: &str,
        lookup: impl FnOnce(&str) -> Option<Verifier>,
        fake_salt_key: &[u8; 32],
        fake_iterations: u32,
        server_nonce: &str,
        channel: Channel<'_>,
    ) -> Result<(ServerExchange, String), ScramError> {
        if client_first.len() > MESSAGE_BYTES_MAX {
            return Err(ScramError::TooLong);
        }
        // gs2-header: cbind-flag "," [authzid] ","
        let mut parts = client_first.splitn(3, ',');
        let cbind = parts.next().ok_or(ScramError::Malformed("no gs2 header"))?;
        let authzid = parts.next().ok_or(ScramError::Malformed("no gs2 header"))?;
        let bare = parts
            .next()
            .ok_or(ScramError::Malformed("no client-first-message-bare"))?;
        if !authzid.is_empty() {
            return Err(ScramError::Malformed(
                "authorization identities are not supported",
            ));
        }
        match (cbind, channel) {
            ("n", _) => {}
            // The client could bind but thinks we cannot: on TLS that is a downgrade.
            ("y", Channel::TlsExporter(_)) => return Err(ScramError::ChannelBinding),
            ("y", Channel::Plain) => {}
            ("p=tls-exporter", Channel::TlsExporter(_)) => {}
            _ => return Err(ScramError::ChannelBinding),
        }
        let gs2_header = format!("{cbind},,");
        let mut fields = bare.split(',');
        let username = unescape_name(attr(fields.next().unwrap_or(""), 'n')?)?;
        let client_nonce = attr(fields.next().ok_or(ScramError::Malformed("no nonce"))?, 'r')?;
        if username.is_empty() || username.len() > USERNAME_BYTES_MAX {
            return Err(ScramError::Malformed("user name empty or too long"));
        }
        if !printable_nonce(client_nonce) || !printable_nonce(server_nonce) {
            return Err(ScramError::Malformed("bad nonce"));
        }
        let verifier = lookup(&username);
        let (salt, iterations) = match &verifier {
            Some(v) => (v.salt.clone(), v.iterations),
            None => {
                let fake = hmac(fake_salt_key, username.as_bytes());
                (fake[..SALT_BYTES].to_vec(), fake_iterations)
            }
        };
        let nonce = format!("{client_nonce}{server_nonce}");
        let server_first = format!("r={nonce},s={},i={iterations}", B64.encode(&salt));
        Ok((
            ServerExchange {
                username,
                verifier,
                gs2_header,
                client_first_bare: bare.to_string(),
                server_first: server_first.clone(),
                nonce,
            },
            server_first,
        ))
    }

    /// The user name the client claims (not yet proven).
    pub fn username(&self) -> &str {
        &self.username
    }

    /// Handles `client-final-message`. On success returns the proven user name and the
    /// `server-final-message` (the server's signature, for the client to check).
    pub fn finish(
        self,
        client_final: &str,
        channel: Channel<'_>,
    ) -> Result<(String, String), ScramError> {
        if client_final.len() > MESSAGE_BYTES_MAX {
            return Err(ScramError::TooLong);
        }
        let (without_proof, proof) = client_final
            .rsplit_once(",p=")
            .ok_or(ScramError::Malformed("no proof"))?;
        let mut fields = without_proof.split(',');
        let cbind = B64
            .decode(attr(fields.next().unwrap_or(""), 'c')?)
            .map_err(|_| ScramError::Malformed("channel binding is not base64"))?;
        let nonce = attr(fields.next().ok_or(ScramError::Malformed("no nonce"))?, 'r')?;
        let mut expected_cbind = self.gs2_header.clone().into_bytes();
        if self.gs2_header.starts_with("p=") {
            match channel {
                Channel::TlsExporter(data) => expected_cbind.extend_from_slice(data),
                Channel::Plain => return Err(ScramError::ChannelBinding),
            }
        }
        if !bool::from(cbind.ct_eq(&expected_cbind)) {
            return Err(ScramError::ChannelBinding);
        }
        if nonce != self.nonce {
            return Err(ScramError::NonceMismatch);
        }
        let proof = B64
            .decode(proof)
            .map_err(|_| ScramError::Malformed("proof is not base64"))?;
        if proof.len() != 32 {
            return Err(ScramError::InvalidProof);
        }
        let Some(v) = self.verifier else {
            return Err(ScramError::InvalidProof);
        };
        let auth_message = format!(
            "{},{},{}",
            self.client_first_bare, self.server_first, without_proof
        );
        let client_signature = hmac(&v.stored_key, auth_message.as_bytes());
        let mut client_key = [0u8; 32];
        for i in 0..32 {
            client_key[i] = proof[i] ^ client_signature[i];
        }
        let stored: [u8; 32] = Sha256::digest(client_key).into();
        if !bool::from(stored.ct_eq(&v.stored_key)) {
            return Err(ScramError::InvalidProof);
        }
        let server_signature = hmac(&v.server_key, auth_message.as_bytes());
        Ok((self.username, format!("v={}", B64.encode(server_signature))))
    }
}

/// The client's side of one exchange.
#[derive(Debug)]
pub struct ClientExchange {
    password: String,
    gs2_header: String,
    client_first_bare: String,
    client_nonce: String,
}

/// The client after sending its proof, waiting for the server's signature.
#[derive(Debug)]
pub struct ClientAwaitingServer {
    server_signature: [u8; 32],
}

impl ClientExchange {
    /// Starts an exchange; returns the `client-first-message`. With
    /// `Channel::TlsExporter` the exchange is bound to the TLS connection.
    pub fn start(
        username: &str,
        password: &str,
        client_nonce: &str,
        channel: Channel<'_>,
    ) -> (ClientExchange, String) {
        let gs2_header = match channel {
            Channel::Plain => "n,,".to_string(),
            Channel::TlsExporter(_) => "p=tls-exporter,,".to_string(),
        };
        let bare = format!("n={},r={client_nonce}", escape_name(username));
        let first = format!("{gs2_header}{bare}");
        (
            ClientExchange {
                password: password.to_string(),
                gs2_header,
                client_first_bare: bare,
                client_nonce: client_nonce.to_string(),
            },
            first,
        )
    }

    /// Handles `server-first-message`; returns the `client-final-message`.
    pub fn respond(
        self,
        server_first: &str,
        channel: Channel<'_>,
    ) -> Result<(ClientAwaitingServer, String), ScramError> {
        if server_first.len() > MESSAGE_BYTES_MAX {
            return Err(ScramError::TooLong);
        }
        let mut fields = server_first.split(',');
        let nonce = attr(fields.next().unwrap_or(""), 'r')?;
        let salt = B64
            .decode(attr(
                fields.next().ok_or(ScramError::Malformed("no salt"))?,
                's',
            )?)
            .map_err(|_| ScramError::Malformed("salt is not base64"))?;
        let iterations: u32 = attr(
            fields
                .next()
                .ok_or(ScramError::Malformed("no iterations"))?,
            'i',
        )?
        .parse()
        .map_err(|_| ScramError::Malformed("iterations"))?;
        if !nonce.starts_with(&self.client_nonce) || nonce.len() == self.client_nonce.len() {
            return Err(ScramError::NonceMismatch);
        }
        if !(ITERATIONS_MIN..=ITERATIONS_MAX).contains(&iterations) {
            return Err(ScramError::Iterations(iterations));
        }
        let mut cbind = self.gs2_header.clone().into_bytes();
        if let Channel::TlsExporter(data) = channel {
            cbind.extend_from_slice(data);
        }
        let without_proof = format!("c={},r={nonce}", B64.encode(&cbind));
        let auth_message = format!("{},{server_first},{without_proof}", self.client_first_bare);
        let salted = cached_salted_password(self.password.as_bytes(), &salt, iterations);
        let client_key = hmac(&salted, b"Client Key");
        let stored_key: [u8; 32] = Sha256::digest(client_key).into();
        let client_signature = hmac(&stored_key, auth_message.as_bytes());
        let mut proof = [0u8; 32];
        for i in 0..32 {
            proof[i] = client_key[i] ^ client_signature[i];
        }
        let server_key = hmac(&salted, b"Server Key");
        Ok((
            ClientAwaitingServer {
                server_signature: hmac(&server_key, auth_message.as_bytes()),
            },
            format!("{without_proof},p={}", B64.encode(proof)),
        ))
    }
}

impl ClientAwaitingServer {
    /// Checks the `server-final-message`: mutual authentication.
    pub fn verify(self, server_final: &str) -> Result<(), ScramError> {
        if let Some(e) = server_final.strip_prefix("e=") {
            return Err(ScramError::ServerError(e.chars().take(64).collect()));
        }
        let sig = B64
            .decode(attr(server_final, 'v')?)
            .map_err(|_| ScramError::Malformed("signature is not base64"))?;
        if bool::from(sig.ct_eq(&self.server_signature)) {
            Ok(())
        } else {
            Err(ScramError::ServerSignature)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FAKE: [u8; 32] = [7; 32];

    #[test]
    fn a_cached_salted_password_never_stands_in_for_another() {
        let a = cached_salted_password(b"one", b"salt", 4096);
        assert_eq!(a, salted_password(b"one", b"salt", 4096));
        assert_eq!(cached_salted_password(b"one", b"salt", 4096), a);
        assert_ne!(cached_salted_password(b"two", b"salt", 4096), a);
        assert_ne!(cached_salted_password(b"one", b"salu", 4096), a);
        assert_ne!(cached_salted_password(b"one", b"salt", 4097), a);
        // Lengths are part of the key: moving a byte from password to salt differs.
        assert_ne!(
            cached_salted_password(b"onex", b"salt", 4096),
            cached_salted_password(b"one", b"xsalt", 4096)
        );
    }

    /// RFC 7677 section 3: user "user", password "pencil".
    #[test]
    fn rfc7677_test_vector() {
        let salt = B64.decode("W22ZaJ0SNY7soEsUEjb6gQ==").unwrap();
        let verifier = Verifier::new("pencil", &salt, 4096);
        let (client, first) =
            ClientExchange::start("user", "pencil", "rOprNGfwEbeRWgbNEkqO", Channel::Plain);
        assert_eq!(first, "n,,n=user,r=rOprNGfwEbeRWgbNEkqO");
        let (server, server_first) = ServerExchange::start(
            &first,
            |u| (u == "user").then(|| verifier.clone()),
            &FAKE,
            "%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0",
            Channel::Plain,
        )
        .unwrap();
        assert_eq!(
            server_first,
            "r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096"
        );
        let (awaiting, client_final) = client.respond(&server_first, Channel::Plain).unwrap();
        assert_eq!(
            client_final,
            "c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ="
        );
        let (user, server_final) = server.finish(&client_final, Channel::Plain).unwrap();
        assert_eq!(user, "user");
        assert_eq!(
            server_final,
            "v=6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4="
        );
        awaiting.verify(&server_final).unwrap();
    }

    fn exchange(
        user: &str,
        password: &str,
        stored: Option<Verifier>,
        client_channel: Channel<'_>,
        server_channel: Channel<'_>,
    ) -> Result<(), ScramError> {
        let (client, first) = ClientExchange::start(user, password, "clientnonce", client_channel);
        let (server, sfirst) =
            ServerExchange::start(&first, |_| stored, &FAKE, "servernonce", server_channel)?;
        let (awaiting, cfinal) = client.respond(&sfirst, client_channel)?;
        let (_, sfinal) = server.finish(&cfinal, server_channel)?;
        awaiting.verify(&sfinal)
    }

    #[test]
    fn wrong_password_and_unknown_user_fail_alike() {
        let v = Verifier::new("correct horse", b"0123456789abcdef", ITERATIONS_MIN);
        assert!(exchange(
            "alice",
            "correct horse",
            Some(v.clone()),
            Channel::Plain,
            Channel::Plain
        )
        .is_ok());
        let wrong = exchange(
            "alice",
            "battery staple",
            Some(v),
            Channel::Plain,
            Channel::Plain,
        )
        .unwrap_err();
        let unknown = exchange(
            "mallory",
            "battery staple",
            None,
            Channel::Plain,
            Channel::Plain,
        )
        .unwrap_err();
        assert_eq!(wrong, ScramError::InvalidProof);
        assert_eq!(unknown, ScramError::InvalidProof);
        assert_eq!(wrong.peer_message(), unknown.peer_message());
        // An unknown user gets a stable, plausible salt and the default iterations.
        let (_, a) =
            ServerExchange::start("n,,n=mallory,r=x", |_| None, &FAKE, "s", Channel::Plain)
                .unwrap();
        let (_, b) =
            ServerExchange::start("n,,n=mallory,r=x", |_| None, &FAKE, "s", Channel::Plain)
                .unwrap();
        assert_eq!(a, b);
        assert!(a.ends_with(&format!(",i={ITERATIONS_DEFAULT}")));
        // On a server configured for other counts, unknown users get that count.
        let (_, c) = ServerExchange::start_with(
            "n,,n=mallory,r=x",
            |_| None,
            &FAKE,
            50_000,
            "s",
            Channel::Plain,
        )
        .unwrap();
        assert!(c.ends_with(",i=50000"), "{c}");
    }

    #[test]
    fn a_replayed_client_final_fails_against_a_fresh_server_nonce() {
        let v = Verifier::new("pw-123456789", b"saltsaltsaltsalt", ITERATIONS_MIN);
        let (client, first) = ClientExchange::start("bob", "pw-123456789", "cn", Channel::Plain);
        let (server, sfirst) =
            ServerExchange::start(&first, |_| Some(v.clone()), &FAKE, "sn1", Channel::Plain)
                .unwrap();
        let (_, recorded_final) = client.respond(&sfirst, Channel::Plain).unwrap();
        assert!(server.finish(&recorded_final, Channel::Plain).is_ok());
        // The attacker replays both client messages; the server picks a new nonce.
        let (server2, _) =
            ServerExchange::start(&first, |_| Some(v.clone()), &FAKE, "sn2", Channel::Plain)
                .unwrap();
        assert_eq!(
            server2.finish(&recorded_final, Channel::Plain).unwrap_err(),
            ScramError::NonceMismatch
        );
    }

    #[test]
    fn channel_binding_is_checked() {
        let v = Verifier::new("pw", b"saltsaltsaltsalt", ITERATIONS_MIN);
        let tls_a = [1u8; 32];
        let tls_b = [2u8; 32];
        assert!(exchange(
            "u",
            "pw",
            Some(v.clone()),
            Channel::TlsExporter(&tls_a),
            Channel::TlsExporter(&tls_a)
        )
        .is_ok());
        // Relayed through another TLS connection: the exporters differ.
        assert_eq!(
            exchange(
                "u",
                "pw",
                Some(v.clone()),
                Channel::TlsExporter(&tls_a),
                Channel::TlsExporter(&tls_b)
            )
            .unwrap_err(),
            ScramError::ChannelBinding
        );
        // Binding asked for on a plain connection.
        assert_eq!(
            exchange(
                "u",
                "pw",
                Some(v.clone()),
                Channel::TlsExporter(&tls_a),
                Channel::Plain
            )
            .unwrap_err(),
            ScramError::ChannelBinding
        );
        // "y" (client could bind, thinks the server cannot) over TLS is a downgrade.
        let r = ServerExchange::start(
            "y,,n=u,r=abc",
            |_| Some(v.clone()),
            &FAKE,
            "s",
            Channel::TlsExporter(&tls_a),
        );
        assert_eq!(r.unwrap_err(), ScramError::ChannelBinding);
        // Not binding at all over TLS is allowed ("n").
        assert!(exchange(
            "u",
            "pw",
            Some(v),
            Channel::Plain,
            Channel::TlsExporter(&tls_a)
        )
        .is_ok());
    }

    #[test]
    fn a_server_without_the_verifier_cannot_fake_success() {
        let v = Verifier::new("pw", b"saltsaltsaltsalt", ITERATIONS_MIN);
        let (client, first) = ClientExchange::start("u", "pw", "cn", Channel::Plain);
        let (_, sfirst) =
            ServerExchange::start(&first, |_| Some(v.clone()), &FAKE, "sn", Channel::Plain)
                .unwrap();
        let (awaiting, _) = client.respond(&sfirst, Channel::Plain).unwrap();
        assert_eq!(
            awaiting
                .verify(&format!("v={}", B64.encode([0u8; 32])))
                .unwrap_err(),
            ScramError::ServerSignature
        );
    }

    #[test]
    fn clients_refuse_abusive_iteration_counts_and_foreign_nonces() {
        let (c, _) = ClientExchange::start("u", "pw", "cn", Channel::Plain);
        assert_eq!(
            c.respond("r=cnX,s=c2FsdA==,i=100000000", Channel::Plain)
                .unwrap_err(),
            ScramError::Iterations(100_000_000)
        );
        let (c, _) = ClientExchange::start("u", "pw", "cn", Channel::Plain);
        assert_eq!(
            c.respond("r=zzX,s=c2FsdA==,i=4096", Channel::Plain)
                .unwrap_err(),
            ScramError::NonceMismatch
        );
    }

    #[test]
    fn names_with_commas_and_equals_survive() {
        let v = Verifier::new("pw", b"saltsaltsaltsalt", ITERATIONS_MIN);
        let (client, first) = ClientExchange::start("a,b=c", "pw", "cn", Channel::Plain);
        assert!(first.contains("n=a=2Cb=3Dc"));
        let (server, sfirst) = ServerExchange::start(
            &first,
            |u| (u == "a,b=c").then(|| v.clone()),
            &FAKE,
            "sn",
            Channel::Plain,
        )
        .unwrap();
        let (_, cfinal) = client.respond(&sfirst, Channel::Plain).unwrap();
        assert_eq!(server.finish(&cfinal, Channel::Plain).unwrap().0, "a,b=c");
    }
}
