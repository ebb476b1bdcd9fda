//! Creating and opening a vault directory.

use std::collections::{BTreeMap, HashSet};
use std::fs::{self, File, OpenOptions as FsOpenOptions};
use std::path::Path;
use std::sync::Mutex;

use crate::cache::BlockCache;
use crate::crypto::{derive_kek, random_array, sha256};
use crate::engine::{HeaderState, Inner, Log, RecLoc, State};
use crate::error::{Result, VaultError};
use crate::format::{
    check_params, CheckpointEntry, Entry, HeaderClear, KeyEntry, KeyTable, RecordKind,
};
use crate::header::{self, HEADER_FILE, LOCK_FILE};
use crate::limits::*;
use crate::metrics::Metrics;
use crate::parity;
use crate::record::Crypt;
use crate::replay;
use crate::store::{sync_dir, Appender, Store};
use crate::tree::{now_ns, Map, Tree};
use crate::types::{CreateOptions, OpenOptions};

/// The hash the first version chains from.
pub(crate) fn genesis_hash(vault_id: &[u8; 16]) -> [u8; 32] {
    sha256(&[b"portswitch-vault genesis", vault_id])
}

pub(crate) fn take_lock(dir: &Path) -> Result<File> {
    let f = FsOpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(dir.join(LOCK_FILE))?;
    // A process that forks while another thread of it holds the lock gives the child a
    // copy of the locked file until the child's exec closes it: a close followed by an
    // open in that window would see the vault locked by nobody. So a lock held by
    // someone else is retried for a short, bounded while before it is an error.
    for _ in 0..LOCK_RETRIES {
        match f.try_lock() {
            Ok(()) => return Ok(f),
            Err(std::fs::TryLockError::WouldBlock) => {
                std::thread::sleep(std::time::Duration::from_millis(LOCK_RETRY_MS))
            }
            Err(std::fs::TryLockError::Error(e)) => return Err(e.into()),
        }
    }
    match f.try_lock() {
        Ok(()) => Ok(f),
        Err(std::fs::TryLockError::WouldBlock) => Err(VaultError::Locked),
        Err(std::fs::TryLockError::Error(e)) => Err(e.into()),
    }
}

/// Retries of a lock held by someone else, `LOCK_RETRY_MS` apart (200 ms in all).
const LOCK_RETRIES: u32 = 20;
const LOCK_RETRY_MS: u64 = 10;

fn check_open_options(o: &OpenOptions) -> Result<()> {
    if o.dirty_bytes < DIRTY_BYTES_MIN {
        return Err(VaultError::Invalid("dirty_bytes below DIRTY_BYTES_MIN"));
    }
    writer_token(o)?;
    Ok(())
}

/// The token commits record: the fence's, or `writer_token`.
fn writer_token(o: &OpenOptions) -> Result<u64> {
    match &o.fence {
        None => Ok(o.writer_token),
        Some(f) if f.token() == 0 => Err(VaultError::Invalid("a fence with token 0")),
        Some(f) if o.writer_token != 0 && o.writer_token != f.token() => Err(VaultError::Invalid(
            "writer_token differs from the fence's token",
        )),
        Some(f) => Ok(f.token()),
    }
}

pub(crate) fn create(dir: &Path, passphrase: &[u8], opts: &CreateOptions) -> Result<Inner> {
    check_params(opts.block_bytes, opts.segment_bytes, &opts.kdf, opts.parity)?;
    check_open_options(&opts.open)?;
    if opts.open.read_only {
        return Err(VaultError::Invalid("cannot create a read-only vault"));
    }
    if !(-7..=22).contains(&opts.zstd_level) {
        return Err(VaultError::Invalid("zstd level outside -7..=22"));
    }
    fs::create_dir_all(dir)?;
    if dir.join(HEADER_FILE).exists() || dir.join(crate::store::SEG_DIR).exists() {
        return Err(VaultError::Exists);
    }
    let lock = take_lock(dir)?;
    let vault_id: [u8; 16] = random_array();
    let salt: [u8; 16] = random_array();
    let kek = derive_kek(passphrase, &salt, &opts.kdf)?;
    let table = KeyTable {
        active: 1,
        keys: vec![KeyEntry {
            id: 1,
            created: 1,
            seals: 0,
            key: random_array(),
        }],
    };
    let mut clear = HeaderClear {
        vault_id,
        cipher: opts.cipher,
        compression: opts.compression,
        block_bytes: opts.block_bytes,
        zstd_level: opts.zstd_level as i8,
        segment_bytes: opts.segment_bytes,
        parity: opts.parity,
        kdf: opts.kdf,
        salt,
        sequence: 0,
        nonce: [0; 12],
        sealed_len: 0,
    };
    let header_bytes = header::seal(&mut clear, &table, &kek);
    let inner = new_inner(dir, clear, table, kek, &opts.open, Some(lock))?;
    // The first segment holds the checkpoint of version 1 (an empty root directory);
    // the header is written last, so a directory with a header is a complete vault.
    let file = inner.store.create(1)?;
    {
        let mut log = inner.lock_log();
        log.app = Some(Appender::new(1, file, 0));
        let now = now_ns();
        let tree = Tree::new_root(now);
        let cp = CheckpointEntry {
            base: 1,
            base_hash: genesis_hash(&vault_id),
            base_time: now,
            base_writer_token: writer_token(&opts.open)?,
            next_ino: tree.next_ino,
            key_id: 1,
            seals: 0,
            inodes: tree.checkpoint_inodes(),
            snapshots: Vec::new(),
            carried: Vec::new(),
        };
        let raw = Entry::Checkpoint(cp).encode();
        inner.write_entry(&mut log, RecordKind::Checkpoint, &raw)?;
        inner.sync_log(&mut log)?;
    }
    header::write_file(dir, &header_bytes)?;
    if let Some(m) = &opts.open.mirror {
        fs::create_dir_all(m)?;
        replay::mirror_sync(dir, m)?;
    }
    let (clear, table, kek) = {
        let h = inner.header.lock().expect("header lock");
        (h.clear.clone(), h.table.clone(), h.kek.clone())
    };
    drop(inner);
    open_parts(dir, clear, table, kek, &opts.open, true)
}
fn new_inner(
    dir: &Path,
    clear: HeaderClear,
    table: KeyTable,
    kek: zeroize::Zeroizing<[u8; 32]>,
    o: &OpenOptions,
    lock: Option<File>,
) -> Result<Inner> {
    let metrics = Metrics::default();
    let crypt = Crypt::new(clear.vault_id, clear.cipher).metered(&metrics);
    crypt.set_keys(table.keys.iter().map(|k| (k.id, &k.key)));
    let active = table.active;
    let aead = crypt.key(active);
    let seals = table
        .keys
        .iter()
        .find(|k| k.id == active)
        .map(|k| k.seals)
        .unwrap_or(0);
    Ok(Inner {
        dir: dir.to_path_buf(),
        crypt,
        store: Store::new(dir.to_path_buf(), o.mirror.clone(), o.read_only),
        cache: BlockCache::new(o.cache_bytes),
        metrics,
        block_bytes: clear.block_bytes,
        compression: clear.compression,
        zstd_level: clear.zstd_level as i32,
        segment_bytes: clear.segment_bytes,
        parity: clear.parity,
        read_only: o.read_only,
        dirty_limit: o.dirty_bytes,
        writer_token: writer_token(o)?,
        fence: o.fence.clone(),
        max_token: std::sync::atomic::AtomicU64::new(0),
        header_sequence: std::sync::atomic::AtomicU64::new(clear.sequence),
        torn_tail_bytes: 0,
        header: Mutex::new(HeaderState { clear, table, kek }),
        state: Mutex::new(State {
            tree: Tree::new_root(0),
            dirty: Map::default(),
            dirty_bytes: 0,
            changed: HashSet::new(),
            trunc: Map::default(),
            head: crate::types::Head {
                version: 0,
                hash: [0; 32],
            },
            history: Vec::new(),
            snapshots: BTreeMap::new(),
            checkpoint: Vec::new(),
        }),
        log: Mutex::new(Log {
            app: None,
            key_id: active,
            aead,
            seals,
            poisoned: None,
            closing: None,
            closing_pending: 0,
        }),
        backup_tx: Mutex::new(None),
        remote: Mutex::new(None),
        _lock: lock,
    })
}

pub(crate) fn open(dir: &Path, passphrase: &[u8], o: &OpenOptions) -> Result<Inner> {
    check_open_options(o)?;
    let bytes = header::read_file(dir)?;
    let (clear, table, kek) = header::open(&bytes, passphrase)?;
    open_parts(dir, clear, table, kek, o, true)
}

fn open_parts(
    dir: &Path,
    clear: HeaderClear,
    table: KeyTable,
    kek: zeroize::Zeroizing<[u8; 32]>,
    o: &OpenOptions,
    may_heal_from_mirror: bool,
) -> Result<Inner> {
    let lock = if o.read_only {
        None
    } else {
        Some(take_lock(dir)?)
    };
    let mirror = if o.read_only { None } else { o.mirror.clone() };
    if let Some(m) = &mirror {
        fs::create_dir_all(m)?;
        if let Ok(mb) = header::read_file(m) {
            let (mc, _) = HeaderClear::decode(&mb)?;
            if mc.vault_id != clear.vault_id {
                return Err(VaultError::format(
                    "mirror",
                    "the mirror holds another vault",
                ));
            }
        }
    }
    let mut inner = new_inner(dir, clear, table, kek, o, lock)?;
    let ids = inner.store.load()?;
    if ids.is_empty() {
        return Err(VaultError::Corrupt {
            what: "no segments",
            segment: 0,
            offset: 0,
        });
    }
    replay::restore_truncated(&inner, &ids)?;
    let scan = replay::scan(&inner, &ids)?;
    // Where the primary's log ends: the cut, or (every segment closed) the end of the
    // last one. The mirror is asked whether it holds more in every case: the primary
    // may have lost its whole open segment, which leaves no cut at all.
    let end = match scan.cut {
        Some(c) => Some(c),
        None if mirror.is_some() && may_heal_from_mirror => {
            let last = *ids.last().expect("segments");
            Some((last, inner.store.len(last)?))
        }
        None => None,
    };
    if let (Some(m), Some((id, end)), true) = (&mirror, end, may_heal_from_mirror) {
        // The mirror holds commits past the primary's end: the primary lost them (or
        // was cut back). Take the mirror's bytes and start over.
        if replay::mirror_is_ahead(&inner, m, id, end)
            || replay::mirror_is_ahead(&inner, m, id + 1, 0)
        {
            tracing::warn!(
                segment = id,
                "vault: the mirror holds commits the primary lost; restoring them"
            );
            inner.metrics.repairs_mirror.inc();
            // The header's parts again (copies only on this rare path; key entries and
            // the KEK wipe themselves when dropped).
            let (c, t, k) = {
                let h = inner.header.lock().expect("header lock");
                (h.clear.clone(), h.table.clone(), h.kek.clone())
            };
            drop(inner);
            replay::heal_from_mirror(dir, m, id, end)?;
            return open_parts(dir, c, t, k, o, false);
        }
    }
    let rep = replay::replay(&inner, &scan.groups)?;
    // Fencing: a writer with a lower token than one the log recorded is stale.
    if !o.read_only {
        crate::fencing::admit(inner.writer_token, rep.max_token)?;
    }
    inner
        .max_token
        .store(rep.max_token, std::sync::atomic::Ordering::Release);
    if o.read_only {
        // A torn (or uncommitted) tail is left in place and out of this open's view:
        // it is not damage, and only a writable open may cut it.
        if let Some((id, end)) = scan.cut {
            let mut torn = inner.store.len(id)?.saturating_sub(end);
            for later in inner.store.ids().into_iter().filter(|l| *l > id) {
                torn += inner.store.len(later)?;
            }
            inner.store.view_end = Some((id, end));
            inner.torn_tail_bytes = torn;
        }
    }
    if let Some(h) = o.expect_head {
        let found = rep.history.iter().find(|c| c.version == h.version);
        let ok = if h.version < rep.history[0].version {
            true // older than the horizon: the chain went past it
        } else {
            found.is_some_and(|c| c.hash == h.hash)
        };
        if !ok {
            return Err(VaultError::RolledBack {
                expected: h.version,
                found: rep.head.version,
            });
        }
    }
    if !o.read_only {
        let mut ids = ids;
        if let Some((id, end)) = scan.cut {
            let seg = inner.store.get(id)?;
            let len = seg.file.metadata()?.len();
            let later: Vec<u32> = ids.iter().copied().filter(|i| *i > id).collect();
            if len > end || !later.is_empty() {
                tracing::warn!(
                    segment = id,
                    offset = end,
                    bytes = len - end,
                    later_segments = later.len(),
                    "vault: cutting the uncommitted or torn tail of the log"
                );
                seg.file.set_len(end)?;
                seg.file.sync_all()?;
                for l in &later {
                    inner.store.remove(*l)?;
                }
                inner.store.sync_dirs()?;
                ids.retain(|i| *i <= id);
            }
        }
        if let Some(m) = &mirror {
            replay::mirror_sync(dir, m)?;
            inner.store.load()?;
        }
        // Segments a crash left unclosed before the last: close them now.
        let last = *ids.last().expect("segments");
        for &id in &ids {
            if id != last && !parity::exists(dir, id) {
                crate::engine::close_segment(
                    dir,
                    mirror.as_deref(),
                    id,
                    &*inner.store.get(id)?,
                    inner.parity,
                )?;
            }
        }
        let len = inner.store.len(last)?;
        let app = if parity::exists(dir, last) {
            let f = inner.store.create(last + 1)?;
            Appender::new(last + 1, f, 0)
        } else {
            Appender::new(last, inner.store.get(last)?, len)
        };
        let mut log = inner.lock_log();
        log.app = Some(app);
        if len >= inner.segment_bytes && !parity::exists(dir, last) {
            inner.roll(&mut log)?;
        }
        if let Some((key, seals)) = rep.last_key {
            if key == log.key_id {
                log.seals = log.seals.max(seals);
            }
        }
    }
    inner.metrics.version.set(rep.head.version as i64);
    inner.metrics.segments.set(inner.store.ids().len() as i64);
    {
        let mut st = inner.lock_state();
        st.tree = rep.tree;
        st.head = rep.head;
        st.history = rep.history;
        st.snapshots = rep.snapshots;
        st.checkpoint = rep.checkpoint;
    }
    let _ = sync_dir;
    let _: Option<RecLoc> = None;
    Ok(inner)
}
