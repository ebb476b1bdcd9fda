//! Segment files on disk (and their mirror copies): listing, positional reads, the
//! buffered appender, write-back of repaired bytes. Knows nothing of what records mean.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use crate::error::{Result, VaultError};

pub const SEG_DIR: &str = "seg";

pub fn seg_path(dir: &Path, id: u32) -> PathBuf {
    dir.join(SEG_DIR).join(format!("{id:08}.seg"))
}

pub fn par_path(dir: &Path, id: u32) -> PathBuf {
    dir.join(SEG_DIR).join(format!("{id:08}.par"))
}

/// Segment ids present in `dir/seg`, sorted.
pub fn list_segments(dir: &Path) -> io::Result<Vec<u32>> {
    let mut ids = Vec::new();
    let rd = match fs::read_dir(dir.join(SEG_DIR)) {
        Ok(rd) => rd,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(ids),
        Err(e) => return Err(e),
    };
    for e in rd {
        let name = e?.file_name();
        let name = name.to_string_lossy();
        if let Some(stem) = name.strip_suffix(".seg") {
            if stem.len() == 8 {
                if let Ok(id) = stem.parse::<u32>() {
                    ids.push(id);
                }
            }
        }
    }
    ids.sort_unstable();
    Ok(ids)
}

pub fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

pub struct SegFile {
    pub file: File,
    pub mirror: Option<File>,
}

/// The segment files of a vault and of its mirror.
pub struct Store {
    pub dir: PathBuf,
    pub mirror: Option<PathBuf>,
    pub read_only: bool,
    /// Read-only opens: where the log as of the open ends (segment, offset). Later
    /// segments and bytes past it (a torn or uncommitted tail; a live writer's newer
    /// records) are not part of this open's view: `ids` and `len` leave them out.
    pub view_end: Option<(u32, u64)>,
    segs: RwLock<BTreeMap<u32, Arc<SegFile>>>,
}

fn open_rw(path: &Path, read_only: bool) -> io::Result<File> {
    OpenOptions::new().read(true).write(!read_only).open(path)
}

impl Store {
    pub fn new(dir: PathBuf, mirror: Option<PathBuf>, read_only: bool) -> Store {
        Store {
            dir,
            mirror,
            read_only,
            view_end: None,
            segs: RwLock::new(BTreeMap::new()),
        }
    }

    /// Opens every segment file of the primary (and the mirror's where present).
    pub fn load(&self) -> Result<Vec<u32>> {
        let ids = list_segments(&self.dir)?;
        let mut segs = self.segs.write().expect("segs lock");
        for &id in &ids {
            let file = open_rw(&seg_path(&self.dir, id), self.read_only)?;
            let mirror = match &self.mirror {
                Some(m) => match open_rw(&seg_path(m, id), self.read_only) {
                    Ok(f) => Some(f),
                    Err(e) if e.kind() == io::ErrorKind::NotFound => None,
                    Err(e) => return Err(e.into()),
                },
                None => None,
            };
            segs.insert(id, Arc::new(SegFile { file, mirror }));
        }
        Ok(ids)
    }

    pub fn ids(&self) -> Vec<u32> {
        self.segs
            .read()
            .expect("segs lock")
            .keys()
            .copied()
            .filter(|id| self.view_end.is_none_or(|(last, _)| *id <= last))
            .collect()
    }

    pub fn get(&self, id: u32) -> Result<Arc<SegFile>> {
        self.segs
            .read()
            .expect("segs lock")
            .get(&id)
            .cloned()
            .ok_or(VaultError::Corrupt {
                what: "missing segment",
                segment: id,
                offset: 0,
            })
    }

    pub fn len(&self, id: u32) -> Result<u64> {
        let len = self.get(id)?.file.metadata()?.len();
        Ok(match self.view_end {
            Some((last, end)) if id == last => len.min(end),
            _ => len,
        })
    }

    /// Creates an empty segment (and its mirror copy), durable in its directory. An
    /// existing file is never truncated: an empty one (a crash between create and the
    /// first append) is reused, a non-empty one (which may hold the only copy of
    /// commits) is refused.
    pub fn create(&self, id: u32) -> Result<Arc<SegFile>> {
        fs::create_dir_all(self.dir.join(SEG_DIR))?;
        let mk = |dir: &Path| -> Result<File> {
            let f = OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .open(seg_path(dir, id))?;
            if f.metadata()?.len() != 0 {
                return Err(VaultError::format(
                    "segment",
                    format!("new segment {id} already exists and is not empty"),
                ));
            }
            sync_dir(&dir.join(SEG_DIR))?;
            Ok(f)
        };
        let file = mk(&self.dir)?;
        let mirror = match &self.mirror {
            Some(m) => {
                fs::create_dir_all(m.join(SEG_DIR))?;
                Some(mk(m)?)
            }
            None => None,
        };
        let s = Arc::new(SegFile { file, mirror });
        self.segs.write().expect("segs lock").insert(id, s.clone());
        Ok(s)
    }

    /// Deletes a segment, its parity and their mirror copies.
    pub fn remove(&self, id: u32) -> Result<()> {
        self.segs.write().expect("segs lock").remove(&id);
        let mut dirs = vec![self.dir.clone()];
        dirs.extend(self.mirror.clone());
        for d in dirs {
            for p in [seg_path(&d, id), par_path(&d, id)] {
                match fs::remove_file(&p) {
                    Ok(()) => {}
                    Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                    Err(e) => return Err(e.into()),
                }
            }
        }
        Ok(())
    }

    pub fn sync_dirs(&self) -> Result<()> {
        sync_dir(&self.dir.join(SEG_DIR))?;
        if let Some(m) = &self.mirror {
            sync_dir(&m.join(SEG_DIR))?;
        }
        Ok(())
    }

    /// Reads a record's bytes from the primary copy.
    pub fn read(&self, id: u32, off: u64, buf: &mut [u8]) -> Result<()> {
        let s = self.get(id)?;
        #[cfg(test)]
        if faults::failing(&self.dir, id) {
            return Err(io::Error::from_raw_os_error(rustix::io::Errno::IO.raw_os_error()).into());
        }
        s.file.read_exact_at(buf, off).map_err(|e| {
            if e.kind() == io::ErrorKind::UnexpectedEof {
                VaultError::Corrupt {
                    what: "record beyond the end of its segment",
                    segment: id,
                    offset: off,
                }
            } else {
                e.into()
            }
        })
    }

    /// Reads from the mirror copy; `None` when there is none or it is too short.
    pub fn read_mirror(&self, id: u32, off: u64, buf: &mut [u8]) -> Option<()> {
        let s = self.get(id).ok()?;
        s.mirror.as_ref()?.read_exact_at(buf, off).ok()
    }

    /// Writes verified bytes back over a damaged range of the primary (`to_mirror`:
    /// of the mirror), durably.
    pub fn write_back(&self, id: u32, off: u64, bytes: &[u8], to_mirror: bool) -> Result<()> {
        if self.read_only {
            return Ok(());
        }
        let s = self.get(id)?;
        let f = if to_mirror {
            match &s.mirror {
                Some(m) => m,
                None => return Ok(()),
            }
        } else {
            #[cfg(test)]
            if faults::failing(&self.dir, id) {
                return Err(
                    io::Error::from_raw_os_error(rustix::io::Errno::IO.raw_os_error()).into(),
                );
            }
            &s.file
        };
        f.write_all_at(bytes, off)?;
        f.sync_data()?;
        Ok(())
    }
}

/// Appends records to the open segment through a buffer; `flush` writes the buffer to
/// the primary and the mirror at the same offset.
pub struct Appender {
    pub seg: u32,
    file: Arc<SegFile>,
    written: u64,
    buf: Vec<u8>,
    /// Segments written since the last sync (the open one included once written).
    unsynced: BTreeSet<u32>,
}

/// Bytes buffered before the appender writes on its own (a commit flushes anyway).
const APPEND_BUFFER_BYTES: usize = 4 << 20;

impl Appender {
    pub fn new(seg: u32, file: Arc<SegFile>, written: u64) -> Appender {
        Appender {
            seg,
            file,
            written,
            buf: Vec::with_capacity(APPEND_BUFFER_BYTES),
            unsynced: BTreeSet::new(),
        }
    }

    pub fn file(&self) -> Arc<SegFile> {
        self.file.clone()
    }

    /// Offset the next appended byte lands at.
    pub fn offset(&self) -> u64 {
        self.written + self.buf.len() as u64
    }

    pub fn append(&mut self, bytes: &[u8]) -> Result<()> {
        if self.buf.len() + bytes.len() > APPEND_BUFFER_BYTES && !self.buf.is_empty() {
            self.flush()?;
        }
        if bytes.len() >= APPEND_BUFFER_BYTES {
            self.write_direct(bytes)?;
        } else {
            self.buf.extend_from_slice(bytes);
        }
        Ok(())
    }

    /// Counts `n` bytes written by the caller at [`Appender::offset`] (after a
    /// [`Appender::flush`]), to the primary and the mirror.
    pub fn advance(&mut self, n: u64) {
        debug_assert!(self.buf.is_empty(), "advance over buffered bytes");
        self.written += n;
        self.unsynced.insert(self.seg);
    }

    fn write_direct(&mut self, bytes: &[u8]) -> Result<()> {
        self.file.file.write_all_at(bytes, self.written)?;
        if let Some(m) = &self.file.mirror {
            m.write_all_at(bytes, self.written)?;
        }
        self.written += bytes.len() as u64;
        self.unsynced.insert(self.seg);
        Ok(())
    }

    pub fn flush(&mut self) -> Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let buf = std::mem::take(&mut self.buf);
        let r = self.write_direct(&buf);
        self.buf = buf;
        self.buf.clear();
        r
    }

    /// Flushes and makes every segment written since the last sync durable.
    pub fn sync(&mut self, store: &Store) -> Result<()> {
        self.flush()?;
        for id in std::mem::take(&mut self.unsynced) {
            let s = if id == self.seg {
                self.file.clone()
            } else {
                match store.get(id) {
                    Ok(s) => s,
                    Err(_) => continue, // deleted by gc since
                }
            };
            s.file.sync_data()?;
            if let Some(m) = &s.mirror {
                m.sync_data()?;
            }
        }
        Ok(())
    }
}

/// Test-only fault injection: primary reads (and repair write-backs) of chosen segments
/// fail with EIO (a bad sector), as a disk would answer.
#[cfg(test)]
pub(crate) mod faults {
    use std::path::{Path, PathBuf};
    use std::sync::Mutex;

    static FAILING: Mutex<Vec<(PathBuf, u32)>> = Mutex::new(Vec::new());

    pub fn fail_reads(dir: &Path, id: u32) {
        FAILING.lock().unwrap().push((dir.to_path_buf(), id));
    }

    pub fn heal(dir: &Path) {
        FAILING.lock().unwrap().retain(|(d, _)| d != dir);
    }

    pub fn failing(dir: &Path, id: u32) -> bool {
        FAILING
            .lock()
            .unwrap()
            .iter()
            .any(|(d, i)| d == dir && *i == id)
    }
}
