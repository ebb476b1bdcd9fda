//! Shared by the integration tests: scratch directories, vaults with test-only key
//! derivation, text-heavy rows.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};

use portswitch_vault::{CreateOptions, KdfParams, OpenOptions, Vault};

pub const PASS: &[u8] = b"correct horse battery staple";

/// A directory removed when dropped.
pub struct TempDir(PathBuf);

impl TempDir {
    pub fn new(what: &str) -> TempDir {
        static N: AtomicU32 = AtomicU32::new(0);
        let dir = std::env::temp_dir().join(format!(
            "psv-sqlite-{what}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }
    pub fn path(&self) -> &Path {
        &self.0
    }
    pub fn join(&self, p: &str) -> PathBuf {
        self.0.join(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Options of a test vault: cheap key derivation, no parity unless asked.
pub fn create_options(mirror: Option<&Path>) -> CreateOptions {
    CreateOptions {
        kdf: KdfParams::danger_insecure_fast(),
        parity: None,
        open: OpenOptions {
            mirror: mirror.map(Path::to_path_buf),
            ..OpenOptions::default()
        },
        ..CreateOptions::default()
    }
}

pub fn create_vault(dir: &Path, mirror: Option<&Path>) -> Vault {
    Vault::create(dir, PASS, create_options(mirror)).expect("create vault")
}

pub fn open_vault(dir: &Path, mirror: Option<&Path>) -> Vault {
    let opts = OpenOptions {
        mirror: mirror.map(Path::to_path_buf),
        ..OpenOptions::default()
    };
    Vault::open(dir, PASS, opts).expect("open vault")
}

/// Words in rough frequency order: text made of them compresses like prose.
const WORDS: &[&str] = &[
    "the",
    "of",
    "and",
    "to",
    "a",
    "in",
    "is",
    "that",
    "for",
    "it",
    "as",
    "was",
    "with",
    "be",
    "by",
    "on",
    "not",
    "he",
    "this",
    "are",
    "or",
    "his",
    "from",
    "at",
    "which",
    "but",
    "have",
    "an",
    "had",
    "they",
    "you",
    "were",
    "their",
    "one",
    "all",
    "we",
    "can",
    "her",
    "has",
    "there",
    "been",
    "if",
    "more",
    "when",
    "will",
    "would",
    "who",
    "customer",
    "order",
    "delivery",
    "address",
    "invoice",
    "payment",
    "account",
    "request",
    "support",
    "shipping",
    "warehouse",
    "contract",
    "meeting",
    "schedule",
    "report",
    "quarterly",
    "project",
    "review",
    "update",
    "status",
    "pending",
    "approved",
    "rejected",
    "urgent",
    "please",
    "confirm",
    "thanks",
    "regards",
];

/// A deterministic text of about `bytes` bytes for row `id`.
pub fn text(id: u64, bytes: usize) -> String {
    let mut rng = fastrand::Rng::with_seed(id.wrapping_mul(0x9e37_79b9_7f4a_7c15));
    let mut s = String::with_capacity(bytes + 16);
    while s.len() < bytes {
        // Zipf-like: low indexes far more often.
        let r = rng.f64();
        let i = ((WORDS.len() as f64 + 1.0).powf(r) - 1.0) as usize;
        s.push_str(WORDS[i.min(WORDS.len() - 1)]);
        s.push(if rng.u8(..12) == 0 { '.' } else { ' ' });
        if rng.u8(..40) == 0 {
            s.push_str(&format!("#{} ", rng.u32(10_000..99_999)));
        }
    }
    s
}

/// Bytes of every file under `dir` (the vault's header, segments, parity).
pub fn dir_bytes(dir: &Path) -> u64 {
    let mut total = 0;
    for entry in std::fs::read_dir(dir).unwrap() {
        let entry = entry.unwrap();
        let meta = entry.metadata().unwrap();
        if meta.is_dir() {
            total += dir_bytes(&entry.path());
        } else {
            total += meta.len();
        }
    }
    total
}
