//! Helpers shared by the vault's integration tests.
#![allow(dead_code)]

use std::path::{Path, PathBuf};

use portswitch_vault::{CreateOptions, KdfParams, OpenOptions, Vault};

pub const PASS: &[u8] = b"correct horse battery staple";

/// A fresh directory under the system temp dir, removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        let p = std::env::temp_dir().join(format!(
            "psvault-{tag}-{}-{}",
            std::process::id(),
            fastrand::u64(..)
        ));
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }
    pub fn path(&self) -> &Path {
        &self.0
    }
    pub fn join(&self, s: &str) -> PathBuf {
        self.0.join(s)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Options for tests: cheap Argon2id, small segments so segments close often.
pub fn opts() -> CreateOptions {
    CreateOptions {
        kdf: KdfParams::danger_insecure_fast(),
        segment_bytes: 4 << 20,
        ..CreateOptions::default()
    }
}

pub fn create(dir: &Path) -> Vault {
    Vault::create(dir, PASS, opts()).unwrap()
}

pub fn open(dir: &Path) -> Vault {
    Vault::open(dir, PASS, OpenOptions::default()).unwrap()
}

/// Deterministic, poorly compressible bytes.
pub fn noise(seed: u64, len: usize) -> Vec<u8> {
    let mut rng = fastrand::Rng::with_seed(seed);
    (0..len).map(|_| rng.u8(..)).collect()
}

/// Compressible text.
pub fn text(seed: u64, len: usize) -> Vec<u8> {
    let words = [
        "alpha ", "beta ", "gamma ", "delta ", "vault ", "block ", "commit\n",
    ];
    let mut rng = fastrand::Rng::with_seed(seed);
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        out.extend_from_slice(words[rng.usize(..words.len())].as_bytes());
    }
    out.truncate(len);
    out
}

/// Segment files of a vault directory, sorted.
pub fn segments(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir.join("seg"))
        .map(|rd| {
            rd.filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.extension().is_some_and(|x| x == "seg"))
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

/// Every record of every segment: (segment file, offset, frame).
pub fn records(dir: &Path) -> Vec<(PathBuf, u64, portswitch_vault::format::Frame)> {
    use portswitch_vault::format::Frame;
    let mut out = Vec::new();
    for seg in segments(dir) {
        let bytes = std::fs::read(&seg).unwrap();
        let mut off = 0usize;
        while off + 16 <= bytes.len() {
            let Some(f) = Frame::decode(&bytes[off..off + 16]) else {
                break;
            };
            out.push((seg.clone(), off as u64, f));
            off += f.record_len() as usize;
        }
    }
    out
}

/// Block records only.
pub fn block_records(dir: &Path) -> Vec<(PathBuf, u64, u32)> {
    records(dir)
        .into_iter()
        .filter(|(_, _, f)| f.kind == portswitch_vault::format::RecordKind::Block)
        .map(|(p, o, f)| (p, o, f.record_len()))
        .collect()
}

pub fn read_at(path: &Path, off: u64, len: usize) -> Vec<u8> {
    use std::os::unix::fs::FileExt;
    let f = std::fs::File::open(path).unwrap();
    let mut b = vec![0u8; len];
    f.read_exact_at(&mut b, off).unwrap();
    b
}

pub fn write_at(path: &Path, off: u64, bytes: &[u8]) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    f.write_all_at(bytes, off).unwrap();
    f.sync_all().unwrap();
}

pub fn flip(path: &Path, off: u64) {
    let mut b = read_at(path, off, 1);
    b[0] ^= 0x40;
    write_at(path, off, &b);
}
