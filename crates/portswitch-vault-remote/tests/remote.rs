//! A backup server on loopback: ship a vault to it (incrementally, verified), pull it
//! back and open it; wrong keys, garbage and a second vault's header get nowhere, and
//! the server goes on serving.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};

use portswitch_vault::target::BackupTarget;
use portswitch_vault::{CreateOptions, KdfParams, OpenOptions, Vault};
use portswitch_vault_remote::{hex, pull, Key, RemoteTarget, Server};

const PASS: &[u8] = b"remote backups";

struct TempDir(PathBuf);
impl TempDir {
    fn new(tag: &str) -> TempDir {
        let p = std::env::temp_dir().join(format!(
            "psvremote-{tag}-{}-{}",
            std::process::id(),
            fastrand::u64(..)
        ));
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }
}
impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn create(dir: &Path) -> Vault {
    let opts = CreateOptions {
        kdf: KdfParams::danger_insecure_fast(),
        segment_bytes: 4 << 20,
        ..CreateOptions::default()
    };
    Vault::create(dir, PASS, opts).unwrap()
}

fn noise(seed: u64, len: usize) -> Vec<u8> {
    let mut rng = fastrand::Rng::with_seed(seed);
    (0..len).map(|_| rng.u8(..)).collect()
}

/// Starts a server on an ephemeral loopback port; returns its address and stats.
fn server(root: &Path, key: &Key) -> (String, portswitch_vault_remote::ServerStats) {
    let s = Server::bind("127.0.0.1:0", root, key.clone()).unwrap();
    let addr = s.local_addr().unwrap().to_string();
    let stats = s.stats.clone();
    std::thread::spawn(move || s.run());
    (addr, stats)
}

/// Every file under `dir`, concatenated.
fn all_bytes(dir: &Path) -> Vec<u8> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            out.extend(all_bytes(&p));
        } else {
            out.extend(std::fs::read(&p).unwrap());
        }
    }
    out
}

#[test]
fn a_vault_ships_to_a_server_incrementally_and_comes_back_whole() {
    let (src, root, back) = (
        TempDir::new("src"),
        TempDir::new("root"),
        TempDir::new("back"),
    );
    let key = Key::generate();
    let (addr, stats) = server(&root.0, &key);
    let v = create(&src.0);
    let secret = b"the plaintext the server must never see".repeat(100);
    v.write_file("/secret.txt", &secret).unwrap();
    let big = noise(1, 9 << 20); // spans three 4 MiB segments
    v.write_file("/big", &big).unwrap();
    v.sync().unwrap();
    let mut t = RemoteTarget::new(addr.clone(), key.clone());
    let r1 = v.backup_to_target(&mut t).unwrap();
    assert!(r1.bytes_shipped >= 9 << 20, "{r1:?}");
    assert_eq!(r1.bytes_verified, r1.bytes_shipped, "{r1:?}");
    // Incremental: a small change ships a small part, over the same connection.
    v.write_file("/small", b"a little more").unwrap();
    let r2 = v.backup_to_target(&mut t).unwrap();
    assert!(r2.bytes_shipped > 0 && r2.bytes_shipped < 1 << 20, "{r2:?}");
    let r3 = v.backup_to_target(&mut t).unwrap();
    assert_eq!(r3.bytes_shipped, 0, "{r3:?}");
    // The server holds the vault under its id, and only ciphertext.
    let held = root.0.join(hex(&v.vault_id()));
    assert!(held.join("VAULT").exists());
    let bytes = all_bytes(&held);
    assert!(bytes.len() > 9 << 20);
    assert!(!bytes
        .windows(24)
        .any(|w| w == &b"the plaintext the server"[..]));
    assert!(stats.bytes_written_total.get() >= 9 << 20);
    // Pulled back (verified by hash), it opens with the passphrase and reads the same.
    let to = back.0.join("restored");
    let n = pull(&addr, &key, &v.vault_id(), &to).unwrap();
    assert!(n >= 9 << 20);
    let w = Vault::open(&to, PASS, OpenOptions::default()).unwrap();
    assert_eq!(w.read_file("/secret.txt").unwrap(), secret);
    assert_eq!(w.read_file("/big").unwrap(), big);
    assert_eq!(w.read_file("/small").unwrap(), b"a little more");
    assert_eq!(w.head(), v.head());
    let c = w.check(false).unwrap();
    assert!(c.damaged.is_empty(), "{c:?}");
    // A pull into a vault is refused.
    assert!(pull(&addr, &key, &v.vault_id(), &to).is_err());
}

#[test]
fn wrong_keys_garbage_and_foreign_headers_get_nowhere() {
    let (src, other, root) = (
        TempDir::new("src2"),
        TempDir::new("other"),
        TempDir::new("root2"),
    );
    let key = Key::generate();
    let (addr, stats) = server(&root.0, &key);
    let v = create(&src.0);
    v.write_file("/f", b"data").unwrap();
    // A wrong key fails in the handshake, with a typed error, and nothing is stored.
    let mut bad = RemoteTarget::new(addr.clone(), Key::generate());
    let e = v.backup_to_target(&mut bad).unwrap_err();
    assert!(e.to_string().contains("handshake"), "{e}");
    assert_eq!(std::fs::read_dir(&root.0).unwrap().count(), 0);
    // Garbage: the server closes the connection without an answer.
    let mut s = TcpStream::connect(&addr).unwrap();
    let mut junk = vec![0u8, 100];
    junk.extend(noise(7, 100));
    s.write_all(&junk).unwrap();
    let mut buf = [0u8; 64];
    s.set_read_timeout(Some(std::time::Duration::from_secs(20)))
        .unwrap();
    assert!(matches!(s.read(&mut buf), Ok(0) | Err(_)));
    // A client with the key cannot put another vault's header under this vault's id.
    let u = create(&other.0);
    let mut t = RemoteTarget::new(addr.clone(), key.clone());
    t.begin(&v.vault_id()).unwrap();
    let foreign = std::fs::read(other.0.join("VAULT")).unwrap();
    assert!(t.set_header(&foreign).is_err());
    t.end();
    drop(u);
    // And the server still serves.
    let r = v.backup_to_target(&mut t).unwrap();
    assert!(r.bytes_shipped > 0);
    assert!(stats.handshake_failures_total.get() >= 2);
}

/// Flips one byte of the first segment at `at` (inside a block record of a big file).
fn flip(vault: &Path, at: u64) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(vault.join("seg").join("00000001.seg"))
        .unwrap();
    let mut b = [0u8; 1];
    f.read_exact_at(&mut b, at).unwrap();
    f.write_all_at(&[b[0] ^ 0x5a], at).unwrap();
}

#[test]
fn a_damaged_block_is_repaired_from_the_copy_on_another_node_and_never_read_wrong() {
    let (src, root) = (TempDir::new("src3"), TempDir::new("root3"));
    let key = Key::generate();
    let (addr, _) = server(&root.0, &key);
    // No parity and no mirror: the copy on the server is the only redundancy.
    let opts = CreateOptions {
        kdf: KdfParams::danger_insecure_fast(),
        parity: None,
        ..CreateOptions::default()
    };
    let v = Vault::create(&src.0, PASS, opts).unwrap();
    let data = noise(5, 2 << 20);
    v.write_file("/f", &data).unwrap();
    v.sync().unwrap();
    v.backup_to_target(&mut RemoteTarget::new(addr.clone(), key.clone()))
        .unwrap();
    drop(v);
    flip(&src.0, 1 << 20);
    // Without the remote copy: a typed error, never wrong bytes.
    let v = Vault::open(&src.0, PASS, OpenOptions::default()).unwrap();
    assert!(v.read_file("/f").is_err());
    // With it: repaired, counted, and written back in place.
    v.set_remote_copy(Some(Box::new(RemoteTarget::new(addr.clone(), key.clone()))));
    assert_eq!(v.read_file("/f").unwrap(), data);
    assert_eq!(v.metrics().repairs_remote.get(), 1);
    v.set_remote_copy(None);
    drop(v);
    let v = Vault::open(&src.0, PASS, OpenOptions::default()).unwrap();
    assert_eq!(v.read_file("/f").unwrap(), data);
    assert!(v.check(false).unwrap().damaged.is_empty());
    drop(v);
    // A server whose copy is damaged too cannot make the vault return wrong bytes.
    flip(&src.0, 1 << 20);
    let held = root
        .0
        .join(hex(&portswitch_vault::fencing::vault_id_of(&src.0).unwrap()));
    flip(&held, 1 << 20);
    let v = Vault::open(&src.0, PASS, OpenOptions::default()).unwrap();
    v.set_remote_copy(Some(Box::new(RemoteTarget::new(addr, key))));
    assert!(v.read_file("/f").is_err());
    assert_eq!(v.metrics().repairs_remote.get(), 0);
}
