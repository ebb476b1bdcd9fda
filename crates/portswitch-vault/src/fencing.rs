//! Fencing: at most one writer of a vault at a time, across machines, with the port
//! switch's fencing tokens (docs/VAULT.md, "The port switch").
//!
//! The vault's `LOCK` file keeps a second writer out on one machine. Across machines
//! (a vault on shared storage, a backup target several writers ship to), the writer
//! owns the port [`port_name`] `vault/<vault id hex>` and opens the vault with a
//! [`Fence`] holding the port's token. Then:
//!
//! - every commit records the token (`writer_token`);
//! - opening for writing with a token lower than the highest one recorded in the log
//!   is refused ([`VaultError::Fenced`]): a newer writer has had the vault since;
//! - [`Fence::revoke`] (called the moment the port is lost) makes every later change
//!   and commit fail with [`VaultError::FenceLost`]: another writer may own the vault
//!   now;
//! - a backup target remembers the highest token it took (its `FENCE` file) and
//!   refuses a backup from a vault whose highest token is lower
//!   ([`VaultError::Fenced`]).
//!
//! A token of 0 means "not fenced": such a writer relies on the `LOCK` file alone, is
//! never refused, and records 0. The rule itself is [`admit`].

use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use crate::error::{Result, VaultError};

/// The port a vault's writer owns: `vault/` and the vault id in lowercase hex.
pub fn port_name(vault_id: &[u8; 16]) -> String {
    let mut s = String::with_capacity(6 + 32);
    s.push_str("vault/");
    for b in vault_id {
        s.push_str(&format!("{b:02x}"));
    }
    s
}

/// The vault id of the vault in `dir`, from the clear part of its header (no
/// passphrase needed: the id is not secret). Not authenticated here: a tampered id
/// makes the open that follows fail.
pub fn vault_id_of(dir: impl AsRef<Path>) -> Result<[u8; 16]> {
    let bytes = crate::header::read_file(dir.as_ref())?;
    let (clear, _) = crate::format::HeaderClear::decode(&bytes)?;
    Ok(clear.vault_id)
}

/// The fencing rule: a writer (or a backup from a vault) whose highest token is `ours`
/// may write where `theirs` is the highest token already recorded, when `ours` is not
/// lower. 0 is "not fenced" and always admitted.
pub fn admit(ours: u64, theirs: u64) -> Result<()> {
    if ours != 0 && ours < theirs {
        return Err(VaultError::Fenced { ours, theirs });
    }
    Ok(())
}

/// The writer's claim to a vault: the fencing token of the port it owns, and whether
/// it still owns it. Cheap to clone; clones share the state, so the task that watches
/// the port revokes the fence the vault checks.
#[derive(Clone, Debug)]
pub struct Fence {
    shared: Arc<Shared>,
}

#[derive(Debug)]
struct Shared {
    token: AtomicU64,
    revoked: AtomicBool,
    why: Mutex<String>,
}

impl Fence {
    /// A fence for a port held with `token` (must not be 0).
    pub fn new(token: u64) -> Fence {
        Fence {
            shared: Arc::new(Shared {
                token: AtomicU64::new(token),
                revoked: AtomicBool::new(false),
                why: Mutex::new(String::new()),
            }),
        }
    }

    pub fn token(&self) -> u64 {
        self.shared.token.load(Ordering::Acquire)
    }

    /// The port is lost: from now on every change and commit of the vault fails with
    /// [`VaultError::FenceLost`]. Irreversible (a new grant is a new token: reopen).
    pub fn revoke(&self, why: &str) {
        *self.shared.why.lock().unwrap_or_else(|p| p.into_inner()) = why.to_string();
        self.shared.revoked.store(true, Ordering::Release);
    }

    pub fn is_revoked(&self) -> bool {
        self.shared.revoked.load(Ordering::Acquire)
    }

    /// `Ok` while the port is held; [`VaultError::FenceLost`] once revoked.
    pub fn check(&self) -> Result<()> {
        if self.is_revoked() {
            let why = self
                .shared
                .why
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clone();
            return Err(VaultError::FenceLost {
                token: self.token(),
                why,
            });
        }
        Ok(())
    }
}

// ---- a backup target's FENCE file --------------------------------------------------------

/// The file in a backup target that holds the highest writer token it has taken.
pub(crate) const FENCE_FILE: &str = "FENCE";
const FENCE_MAGIC: &[u8; 8] = b"PSVFENC1";
/// magic [8] | vault id [16] | token u64 | CRC32C of the 32 bytes before.
const FENCE_FILE_BYTES: usize = 36;

pub(crate) fn encode_fence(vault_id: &[u8; 16], token: u64) -> [u8; FENCE_FILE_BYTES] {
    let mut b = [0u8; FENCE_FILE_BYTES];
    b[..8].copy_from_slice(FENCE_MAGIC);
    b[8..24].copy_from_slice(vault_id);
    b[24..32].copy_from_slice(&token.to_le_bytes());
    let crc = crc32c::crc32c(&b[..32]);
    b[32..].copy_from_slice(&crc.to_le_bytes());
    b
}

pub(crate) fn decode_fence(b: &[u8], vault_id: &[u8; 16]) -> Result<u64> {
    let bad = |why: &str| VaultError::format("backup FENCE file", why.to_string());
    if b.len() != FENCE_FILE_BYTES || &b[..8] != FENCE_MAGIC {
        return Err(bad("not a fence file"));
    }
    if crc32c::crc32c(&b[..32]).to_le_bytes() != b[32..36] {
        return Err(bad("checksum"));
    }
    if &b[8..24] != vault_id {
        return Err(bad("it belongs to another vault"));
    }
    Ok(u64::from_le_bytes(b[24..32].try_into().expect("8 bytes")))
}

/// The highest token the backup target `dir` has taken (0 with no FENCE file).
pub(crate) fn read_target(dir: &Path, vault_id: &[u8; 16]) -> Result<u64> {
    match std::fs::read(dir.join(FENCE_FILE)) {
        Ok(b) => decode_fence(&b, vault_id),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(0),
        Err(e) => Err(e.into()),
    }
}

pub(crate) fn write_target(dir: &Path, vault_id: &[u8; 16], token: u64) -> Result<()> {
    crate::header::write_atomic(dir, FENCE_FILE, &encode_fence(vault_id, token))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_rule() {
        // Equal or higher: admitted. Lower: refused with both tokens.
        assert!(admit(5, 5).is_ok());
        assert!(admit(6, 5).is_ok());
        assert!(admit(5, 0).is_ok());
        match admit(3, 5) {
            Err(VaultError::Fenced { ours: 3, theirs: 5 }) => {}
            other => panic!("{other:?}"),
        }
        // 0 is "not fenced": never refused.
        assert!(admit(0, 5).is_ok());
        // Tokens of the port switch: epoch << 32 | sequence; a later epoch wins over
        // any sequence of an earlier one.
        assert!(admit(2 << 32 | 1, 1 << 32 | 999).is_ok());
        assert!(admit(1 << 32 | 999, 2 << 32 | 1).is_err());
    }

    #[test]
    fn a_revoked_fence_answers_fence_lost_in_every_clone() {
        let f = Fence::new(7);
        let g = f.clone();
        assert!(g.check().is_ok());
        f.revoke("session expired");
        match g.check() {
            Err(e @ VaultError::FenceLost { token: 7, .. }) => {
                assert!(e.to_string().contains("session expired"), "{e}");
                assert_eq!(e.errno(), rustix::io::Errno::ROFS.raw_os_error());
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn port_names_and_fence_files() {
        let id = [0xab; 16];
        assert_eq!(port_name(&id), format!("vault/{}", "ab".repeat(16)));
        let b = encode_fence(&id, 42);
        assert_eq!(decode_fence(&b, &id).unwrap(), 42);
        assert!(decode_fence(&b, &[0; 16]).is_err());
        let mut bad = b;
        bad[25] ^= 1;
        assert!(decode_fence(&bad, &id).is_err());
        assert!(decode_fence(&b[..35], &id).is_err());
    }
}
