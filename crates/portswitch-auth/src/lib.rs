//! portswitch's security logic, without I/O: SCRAM-SHA-256 authentication
//! ([`scram`]), password rules ([`policy`]), throttling of failed logins
//! ([`lockout`]: a growing back-off per name and per address, never a long lock)
//! and role-based access control on port-name prefixes ([`acl`]).
//!
//! Like the core, nothing here reads a clock, a socket or the OS's randomness: time,
//! nonces and salts are passed in, so every rule can be tested exactly.
//!
//! Status: the building blocks of the "Security" issue. The server does not use them
//! yet; until it does, it refuses credentials in HELLO and listens on loopback only.
//!
//! ```
//! use portswitch_auth::scram::{Channel, ClientExchange, ServerExchange, Verifier, ITERATIONS_MIN};
//! let stored = Verifier::new("Tulip-Orbit-93", b"per-user-salt-16", ITERATIONS_MIN);
//! let (client, first) = ClientExchange::start("alice", "Tulip-Orbit-93", "c-nonce", Channel::Plain);
//! let (server, server_first) =
//!     ServerExchange::start(&first, |_| Some(stored.clone()), &[0; 32], "s-nonce", Channel::Plain).unwrap();
//! let (client, client_final) = client.respond(&server_first, Channel::Plain).unwrap();
//! let (user, server_final) = server.finish(&client_final, Channel::Plain).unwrap();
//! client.verify(&server_final).unwrap(); // the server proved it holds the verifier too
//! assert_eq!(user, "alice");
//! ```

pub mod acl;
pub mod lockout;
pub mod policy;
pub mod scram;
