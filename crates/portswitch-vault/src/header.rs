//! The `VAULT` header file: sealing the key table under the passphrase's key, opening
//! it, writing the file atomically.

use std::fs::{self, OpenOptions};
use std::io::Write;
use std::path::Path;

use zeroize::Zeroizing;

use crate::crypto::{derive_kek, random_array, Aead};
use crate::error::{Result, VaultError};
use crate::format::{HeaderClear, KeyTable, KEY_BYTES};
use crate::limits::{HEADER_BYTES_MAX, TAG_BYTES};
use crate::store::sync_dir;

pub const HEADER_FILE: &str = "VAULT";
pub const LOCK_FILE: &str = "LOCK";

/// Seals `table` under `kek` into a complete header file; sets a fresh nonce and the
/// sealed length in `clear`.
pub fn seal(clear: &mut HeaderClear, table: &KeyTable, kek: &[u8; KEY_BYTES]) -> Vec<u8> {
    let plain = Zeroizing::new(table.encode());
    clear.nonce = random_array();
    clear.sealed_len = (plain.len() + TAG_BYTES) as u32;
    let head = clear.encode();
    let aead = Aead::new(clear.cipher, kek);
    let mut body = Zeroizing::new(plain.to_vec());
    let tag = aead.seal(&clear.nonce, &head, &mut body);
    let mut out = Vec::with_capacity(head.len() + body.len() + TAG_BYTES);
    out.extend_from_slice(&head);
    out.extend_from_slice(&body);
    out.extend_from_slice(&tag);
    out
}

/// Opens a header file with a passphrase. A seal that does not open is
/// `WrongPassphrase` (a tampered header looks the same, by design).
pub fn open(
    file: &[u8],
    passphrase: &[u8],
) -> Result<(HeaderClear, KeyTable, Zeroizing<[u8; KEY_BYTES]>)> {
    let (clear, sealed) = HeaderClear::decode(file)?;
    let kek = derive_kek(passphrase, &clear.salt, &clear.kdf)?;
    let table = open_with_kek(&clear, sealed, &kek)?;
    Ok((clear, table, kek))
}

pub fn open_with_kek(
    clear: &HeaderClear,
    sealed: &[u8],
    kek: &[u8; KEY_BYTES],
) -> Result<KeyTable> {
    let aead = Aead::new(clear.cipher, kek);
    let mut body = Zeroizing::new(sealed.to_vec());
    let n = aead
        .open(&clear.nonce, &clear.encode(), &mut body)
        .map_err(|_| VaultError::WrongPassphrase)?;
    KeyTable::decode(&body[..n])
}

pub fn read_file(dir: &Path) -> Result<Vec<u8>> {
    let path = dir.join(HEADER_FILE);
    let meta = fs::metadata(&path).map_err(|e| {
        if e.kind() == std::io::ErrorKind::NotFound {
            VaultError::NotFound
        } else {
            e.into()
        }
    })?;
    if meta.len() > HEADER_BYTES_MAX as u64 {
        return Err(VaultError::TooLarge {
            what: "header",
            limit: HEADER_BYTES_MAX as u64,
        });
    }
    Ok(fs::read(path)?)
}

/// Writes the header atomically: temporary file, fsync, rename, fsync of the directory.
pub fn write_file(dir: &Path, bytes: &[u8]) -> Result<()> {
    write_atomic(dir, HEADER_FILE, bytes)
}

/// Writes `dir/name` atomically: temporary file, fsync, rename, fsync of the directory.
pub fn write_atomic(dir: &Path, name: &str, bytes: &[u8]) -> Result<()> {
    let tmp = dir.join(format!("{name}.tmp"));
    {
        let mut f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
    }
    fs::rename(&tmp, dir.join(name))?;
    sync_dir(dir)?;
    Ok(())
}
