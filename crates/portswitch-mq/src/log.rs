//! A partition's durable log: append-only segment files in one directory, each named
//! by the offset of its first record (`00000000000000000000.log`).
//!
//! # Record format (all integers little-endian)
//!
//! | field | bytes | meaning |
//! |---|---|---|
//! | `len` | 4 | bytes after `crc`: 40 + key + headers + payload |
//! | `crc` | 4 | CRC-32C (Castagnoli) of those bytes |
//! | `offset` | 8 | the record's offset in the partition, one more than the last |
//! | `timestamp_ms` | 8 | when the broker accepted it (Unix ms) |
//! | `not_before_ms` | 8 | deliver no earlier than this (0: at once) |
//! | `expires_ms` | 8 | dead-letter after this (0: never) |
//! | `key_len` | 4 | bytes of key |
//! | `headers_len` | 4 | bytes of headers (`name=value` lines; the broker's own, such as a dead letter's reason) |
//! | key, headers, payload | … | |
//!
//! # Durability
//!
//! A batch is encoded whole and written with one `write`; with [`Fsync::EveryBatch`]
//! one `fdatasync` covers it (group commit: the broker gathers every producer's
//! records that arrive while the previous sync runs into the next batch). A write that
//! fails part-way is cut back to the last whole batch. When a segment is full the next
//! batch starts a new one (the full one is synced first, and the directory after the
//! new file is created). Opening a log checks every record's length, CRC and offset:
//! a bad record in the *last* segment is a torn tail (a crash mid-write) and is cut
//! off — reported in [`OpenReport::cut_bytes`], never served; a bad record in an
//! earlier segment is [`LogError::Corrupt`]. Every read checks the CRCs again.

use std::fs::{File, OpenOptions};

use bytes::Bytes;
use std::io::{self, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

/// `len` + `crc`.
const FRAME_HEAD: usize = 8;
/// The fixed part of what `len` counts.
const BODY_FIXED: usize = 40;
/// Bytes between entries of a segment's in-memory index.
const INDEX_EVERY_BYTES: u64 = 4096;

/// When appended records reach the disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fsync {
    /// One `fdatasync` per appended batch, before [`Log::append`] returns: a record
    /// confirmed is on disk.
    EveryBatch,
    /// Only when [`Log::sync`] is called (by the broker on a timer) or a segment
    /// rolls: a crash may lose what was appended since.
    Explicit,
}

/// Limits and policies of one partition's log.
#[derive(Debug, Clone)]
pub struct LogConfig {
    /// A segment is closed once it holds this many bytes (one batch may overrun it).
    pub segment_bytes_max: u64,
    /// Largest key + headers + payload of one record.
    pub record_bytes_max: u32,
    /// Largest size of the whole log on disk; appends beyond it are refused
    /// ([`LogError::Full`]) until segments are reclaimed.
    pub log_bytes_max: u64,
    pub fsync: Fsync,
}

impl Default for LogConfig {
    fn default() -> LogConfig {
        LogConfig {
            segment_bytes_max: 64 << 20,
            record_bytes_max: 1 << 20,
            log_bytes_max: 1 << 30,
            fsync: Fsync::EveryBatch,
        }
    }
}

/// A record to append.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Message<'a> {
    pub key: &'a [u8],
    pub headers: &'a [u8],
    pub payload: &'a [u8],
    pub timestamp_ms: u64,
    pub not_before_ms: u64,
    pub expires_ms: u64,
}

/// A record read back. Its bytes are slices of the buffer the read filled (one
/// allocation per read, not three per record).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    pub offset: u64,
    pub timestamp_ms: u64,
    pub not_before_ms: u64,
    pub expires_ms: u64,
    pub key: Bytes,
    pub headers: Bytes,
    pub payload: Bytes,
}

#[derive(Debug, thiserror::Error)]
pub enum LogError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(transparent)]
    File(#[from] portswitch_files::FileError),
    #[error(
        "a record of {size} bytes (key, headers and payload) is larger than the limit of {max}"
    )]
    RecordTooLarge { size: u64, max: u32 },
    #[error("the log holds {bytes} bytes and may hold {max}: appends wait until consumers acknowledge and segments are reclaimed")]
    Full { bytes: u64, max: u64 },
    #[error("{segment}: bad record at byte {position}: {why}")]
    Corrupt {
        segment: PathBuf,
        position: u64,
        why: &'static str,
    },
    #[error("offset {offset} is outside the log ({start}..{end})")]
    OutOfRange { offset: u64, start: u64, end: u64 },
    #[error("{0}: not a segment name (20 digits and .log)")]
    BadSegmentName(PathBuf),
    #[error("a batch holds no records")]
    EmptyBatch,
}

pub type Result<T> = std::result::Result<T, LogError>;

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> LogError + '_ {
    move |source| LogError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// What opening a log found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OpenReport {
    pub segments: usize,
    pub records: u64,
    /// Bytes of a torn tail cut off the last segment.
    pub cut_bytes: u64,
}

#[derive(Debug)]
struct Segment {
    base: u64,
    path: PathBuf,
    file: File,
    len: u64,
    /// One past the last record's offset.
    next: u64,
    /// (offset, byte position) of a record at least every INDEX_EVERY_BYTES.
    index: Vec<(u64, u64)>,
}

/// One partition's log. Not shared between threads by itself: the broker owns one
/// per partition.
#[derive(Debug)]
pub struct Log {
    dir: PathBuf,
    cfg: LogConfig,
    segments: Vec<Segment>,
    bytes: u64,
    /// Written since the last sync (Fsync::Explicit).
    dirty: bool,
}

fn segment_name(base: u64) -> String {
    format!("{base:020}.log")
}

fn parse_segment_name(path: &Path) -> Option<u64> {
    let name = path.file_name()?.to_str()?;
    let digits = name.strip_suffix(".log")?;
    if digits.len() != 20 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

/// Appends the encoding of `m` as record `offset` to `out`.
fn encode(out: &mut Vec<u8>, offset: u64, m: &Message<'_>) {
    let len = BODY_FIXED + m.key.len() + m.headers.len() + m.payload.len();
    out.extend_from_slice(&(len as u32).to_le_bytes());
    let crc_at = out.len();
    out.extend_from_slice(&[0; 4]);
    let body_at = out.len();
    out.extend_from_slice(&offset.to_le_bytes());
    out.extend_from_slice(&m.timestamp_ms.to_le_bytes());
    out.extend_from_slice(&m.not_before_ms.to_le_bytes());
    out.extend_from_slice(&m.expires_ms.to_le_bytes());
    out.extend_from_slice(&(m.key.len() as u32).to_le_bytes());
    out.extend_from_slice(&(m.headers.len() as u32).to_le_bytes());
    out.extend_from_slice(m.key);
    out.extend_from_slice(m.headers);
    out.extend_from_slice(m.payload);
    let crc = crc32c::crc32c(&out[body_at..]);
    out[crc_at..crc_at + 4].copy_from_slice(&crc.to_le_bytes());
}

/// The record at the start of `b`, if it is whole and sound, with its encoded size.
/// `Err(why)` names what is wrong; `Ok(None)` means `b` ends before the record does.
fn decode(
    b: &Bytes,
    record_bytes_max: u32,
) -> std::result::Result<Option<(Record, usize)>, &'static str> {
    if b.len() < FRAME_HEAD {
        return Ok(None);
    }
    let len = u32_at(b, 0) as usize;
    if len < BODY_FIXED {
        return Err("length shorter than a record header");
    }
    if (len - BODY_FIXED) as u64 > u64::from(record_bytes_max) {
        return Err("length beyond the record limit");
    }
    let end = FRAME_HEAD + len;
    if b.len() < end {
        return Ok(None);
    }
    let body = &b[FRAME_HEAD..end];
    if crc32c::crc32c(body) != u32_at(b, 4) {
        return Err("checksum mismatch");
    }
    let key_len = u32_at(body, 32) as usize;
    let headers_len = u32_at(body, 36) as usize;
    if key_len + headers_len > len - BODY_FIXED {
        return Err("key and headers longer than the record");
    }
    let h = BODY_FIXED + key_len;
    let rec = Record {
        offset: u64_at(body, 0),
        timestamp_ms: u64_at(body, 8),
        not_before_ms: u64_at(body, 16),
        expires_ms: u64_at(body, 24),
        key: b.slice(FRAME_HEAD + BODY_FIXED..FRAME_HEAD + h),
        headers: b.slice(FRAME_HEAD + h..FRAME_HEAD + h + headers_len),
        payload: b.slice(FRAME_HEAD + h + headers_len..end),
    };
    Ok(Some((rec, end)))
}

impl Log {
    /// Opens the log in `dir` (created, private, if missing), checking every record;
    /// a torn tail of the last segment is cut off.
    pub fn open(dir: &Path, cfg: LogConfig) -> Result<(Log, OpenReport)> {
        portswitch_files::create_dir_private(dir)?;
        let mut bases = Vec::new();
        for entry in std::fs::read_dir(dir).map_err(io_err(dir))? {
            let path = entry.map_err(io_err(dir))?.path();
            if path.extension().and_then(|e| e.to_str()) != Some("log") {
                continue;
            }
            let base =
                parse_segment_name(&path).ok_or_else(|| LogError::BadSegmentName(path.clone()))?;
            bases.push(base);
        }
        bases.sort_unstable();
        let mut report = OpenReport::default();
        let mut log = Log {
            dir: dir.to_path_buf(),
            cfg,
            segments: Vec::new(),
            bytes: 0,
            dirty: false,
        };
        let count = bases.len();
        for (i, base) in bases.into_iter().enumerate() {
            let last = i + 1 == count;
            if let Some(prev) = log.segments.last() {
                if prev.next != base {
                    return Err(LogError::Corrupt {
                        segment: dir.join(segment_name(base)),
                        position: 0,
                        why: "segment does not start where the previous one ends",
                    });
                }
            }
            let (seg, records, cut) = log.scan(base, last)?;
            report.records += records;
            report.cut_bytes += cut;
            log.bytes += seg.len;
            log.segments.push(seg);
        }
        report.segments = log.segments.len();
        Ok((log, report))
    }

    /// Reads and checks segment `base`; a bad tail is cut if `last`, an error if not.
    fn scan(&self, base: u64, last: bool) -> Result<(Segment, u64, u64)> {
        let path = self.dir.join(segment_name(base));
        let bytes = Bytes::from(std::fs::read(&path).map_err(io_err(&path))?);
        let mut pos = 0usize;
        let mut next = base;
        let mut index = Vec::new();
        let mut last_indexed = None::<u64>;
        let mut records = 0u64;
        let bad = loop {
            match decode(&bytes.slice(pos..), self.cfg.record_bytes_max) {
                Ok(Some((rec, size))) => {
                    if rec.offset != next {
                        break Some("offset out of sequence");
                    }
                    if last_indexed.is_none_or(|at| pos as u64 >= at + INDEX_EVERY_BYTES) {
                        index.push((rec.offset, pos as u64));
                        last_indexed = Some(pos as u64);
                    }
                    next += 1;
                    records += 1;
                    pos += size;
                }
                Ok(None) if pos == bytes.len() => break None,
                Ok(None) => break Some("record cut short"),
                Err(why) => break Some(why),
            }
        };
        let mut cut = 0;
        if let Some(why) = bad {
            if !last {
                return Err(LogError::Corrupt {
                    segment: path,
                    position: pos as u64,
                    why,
                });
            }
            cut = (bytes.len() - pos) as u64;
        }
        let file = OpenOptions::new()
            .read(true)
            .append(true)
            .open(&path)
            .map_err(io_err(&path))?;
        if cut > 0 {
            file.set_len(pos as u64).map_err(io_err(&path))?;
            file.sync_all().map_err(io_err(&path))?;
        }
        let seg = Segment {
            base,
            path,
            file,
            len: pos as u64,
            next,
            index,
        };
        Ok((seg, records, cut))
    }

    /// The first offset still in the log.
    pub fn start_offset(&self) -> u64 {
        self.segments.first().map_or(0, |s| s.base)
    }

    /// The offset the next record will get.
    pub fn end_offset(&self) -> u64 {
        self.segments.last().map_or(0, |s| s.next)
    }

    /// Whether `extra` more bytes stay within `log_bytes_max`.
    pub fn has_room(&self, extra: u64) -> bool {
        self.bytes + extra <= self.cfg.log_bytes_max
    }

    /// Bytes on disk.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    pub fn segments(&self) -> usize {
        self.segments.len()
    }

    /// Appends `batch` with one write (and, by policy, one fsync); returns the first
    /// offset given. Nothing of a refused batch is written.
    pub fn append(&mut self, batch: &[Message<'_>]) -> Result<u64> {
        self.append_checked(batch, true)
    }

    /// [`Log::append`] without the `log_bytes_max` check: for records a leader already
    /// accepted (a replica's copy) and for the broker's own control records.
    pub fn append_unlimited(&mut self, batch: &[Message<'_>]) -> Result<u64> {
        self.append_checked(batch, false)
    }

    fn append_checked(&mut self, batch: &[Message<'_>], limited: bool) -> Result<u64> {
        if batch.is_empty() {
            return Err(LogError::EmptyBatch);
        }
        let mut size = 0u64;
        for m in batch {
            let body = (m.key.len() + m.headers.len() + m.payload.len()) as u64;
            if body > u64::from(self.cfg.record_bytes_max) {
                return Err(LogError::RecordTooLarge {
                    size: body,
                    max: self.cfg.record_bytes_max,
                });
            }
            size += (FRAME_HEAD + BODY_FIXED) as u64 + body;
        }
        if limited && self.bytes + size > self.cfg.log_bytes_max {
            return Err(LogError::Full {
                bytes: self.bytes,
                max: self.cfg.log_bytes_max,
            });
        }
        let need_new = match self.segments.last() {
            None => true,
            Some(s) => s.len > 0 && s.len + size > self.cfg.segment_bytes_max,
        };
        if need_new {
            self.roll()?;
        }
        let seg = self.segments.last_mut().expect("a segment after roll");
        let first = seg.next;
        let mut buf = Vec::with_capacity(size as usize);
        let mut positions = Vec::with_capacity(batch.len());
        for (i, m) in batch.iter().enumerate() {
            positions.push(seg.len + buf.len() as u64);
            encode(&mut buf, first + i as u64, m);
        }
        if let Err(e) = seg.file.write_all(&buf) {
            // Cut back to the last whole batch, so a later append does not follow
            // half a record.
            let _ = seg.file.set_len(seg.len);
            return Err(LogError::Io {
                path: seg.path.clone(),
                source: e,
            });
        }
        if self.cfg.fsync == Fsync::EveryBatch {
            seg.file.sync_data().map_err(io_err(&seg.path))?;
        } else {
            self.dirty = true;
        }
        let mut last_indexed = seg.index.last().map(|&(_, at)| at);
        for (i, pos) in positions.into_iter().enumerate() {
            if last_indexed.is_none_or(|at| pos >= at + INDEX_EVERY_BYTES) {
                seg.index.push((first + i as u64, pos));
                last_indexed = Some(pos);
            }
        }
        seg.len += buf.len() as u64;
        seg.next += batch.len() as u64;
        self.bytes += buf.len() as u64;
        Ok(first)
    }

    /// Makes everything appended so far durable.
    pub fn sync(&mut self) -> Result<()> {
        if self.dirty {
            if let Some(seg) = self.segments.last() {
                seg.file.sync_data().map_err(io_err(&seg.path))?;
            }
            self.dirty = false;
        }
        Ok(())
    }

    /// Starts a new segment at the end offset (the current one synced first).
    fn roll(&mut self) -> Result<()> {
        self.sync()?;
        self.new_segment(self.end_offset())
    }

    /// Creates an empty segment starting at `base` (the directory synced after).
    fn new_segment(&mut self, base: u64) -> Result<()> {
        let path = self.dir.join(segment_name(base));
        let file = OpenOptions::new()
            .read(true)
            .append(true)
            .create_new(true)
            .open(&path)
            .map_err(io_err(&path))?;
        portswitch_files::sync_dir(&self.dir)?;
        self.segments.push(Segment {
            base,
            path,
            file,
            len: 0,
            next: base,
            index: Vec::new(),
        });
        Ok(())
    }

    /// Empties the log and starts it again at `start` (a replica so far behind that its
    /// leader no longer has the records that follow its own: every group settled them).
    pub fn reset(&mut self, start: u64) -> Result<()> {
        for seg in self.segments.drain(..) {
            std::fs::remove_file(&seg.path).map_err(io_err(&seg.path))?;
        }
        self.bytes = 0;
        self.dirty = false;
        self.new_segment(start)
    }

    /// Records from `offset` on, about `max_bytes` of them (at least one if any),
    /// each checked against its CRC. An offset below the start is out of range; one at
    /// the end gives nothing.
    pub fn read(&self, offset: u64, max_bytes: usize) -> Result<Vec<Record>> {
        let (start, end) = (self.start_offset(), self.end_offset());
        if offset < start || offset > end {
            return Err(LogError::OutOfRange { offset, start, end });
        }
        let mut out = Vec::new();
        let mut want = offset;
        let mut budget = max_bytes;
        let mut i = self
            .segments
            .partition_point(|s| s.base <= offset)
            .saturating_sub(1);
        while i < self.segments.len() && want < end && (out.is_empty() || budget > 0) {
            let seg = &self.segments[i];
            let k = seg
                .index
                .partition_point(|&(o, _)| o <= want)
                .saturating_sub(1);
            let mut pos = seg.index.get(k).map_or(0, |&(_, p)| p);
            while pos < seg.len && (out.is_empty() || budget > 0) {
                let chunk =
                    (seg.len - pos).min((budget.max(FRAME_HEAD + BODY_FIXED)) as u64 + 64 * 1024);
                let mut buf = vec![0u8; chunk as usize];
                seg.file
                    .read_exact_at(&mut buf, pos)
                    .map_err(io_err(&seg.path))?;
                let buf = Bytes::from(buf);
                let mut at = 0usize;
                let mut progressed = false;
                loop {
                    match decode(&buf.slice(at..), self.cfg.record_bytes_max) {
                        Ok(Some((rec, size))) => {
                            progressed = true;
                            at += size;
                            if rec.offset < want {
                                continue;
                            }
                            if rec.offset != want {
                                return Err(LogError::Corrupt {
                                    segment: seg.path.clone(),
                                    position: pos + (at - size) as u64,
                                    why: "offset out of sequence",
                                });
                            }
                            budget = budget.saturating_sub(size);
                            want += 1;
                            out.push(rec);
                            if budget == 0 {
                                break;
                            }
                        }
                        Ok(None) => break,
                        Err(why) => {
                            return Err(LogError::Corrupt {
                                segment: seg.path.clone(),
                                position: pos + at as u64,
                                why,
                            })
                        }
                    }
                }
                if !progressed {
                    // A record longer than the chunk: read exactly it next time.
                    let len = u32_at(&buf, 0) as u64 + FRAME_HEAD as u64;
                    let mut whole = vec![0u8; len.min(seg.len - pos) as usize];
                    seg.file
                        .read_exact_at(&mut whole, pos)
                        .map_err(io_err(&seg.path))?;
                    match decode(&Bytes::from(whole), self.cfg.record_bytes_max) {
                        Ok(Some((rec, size))) => {
                            at = size;
                            if rec.offset >= want {
                                budget = budget.saturating_sub(size);
                                want = rec.offset + 1;
                                out.push(rec);
                            }
                        }
                        Ok(None) | Err(_) => {
                            return Err(LogError::Corrupt {
                                segment: seg.path.clone(),
                                position: pos,
                                why: "record cut short",
                            })
                        }
                    }
                }
                pos += at as u64;
            }
            i += 1;
        }
        Ok(out)
    }

    /// Cuts the log so that `to` is its end (a replica dropping records its leader
    /// does not have). Synced before it returns. Cutting below the start is refused.
    pub fn truncate(&mut self, to: u64) -> Result<()> {
        let (start, end) = (self.start_offset(), self.end_offset());
        if to >= end {
            return Ok(());
        }
        if to < start {
            return Err(LogError::OutOfRange {
                offset: to,
                start,
                end,
            });
        }
        let mut removed = false;
        while self.segments.len() > 1 && self.segments.last().is_some_and(|s| s.base >= to) {
            let seg = self.segments.pop().expect("checked");
            std::fs::remove_file(&seg.path).map_err(io_err(&seg.path))?;
            self.bytes -= seg.len;
            removed = true;
        }
        if removed {
            portswitch_files::sync_dir(&self.dir)?;
        }
        let seg = self.segments.last_mut().expect("one segment stays");
        if to < seg.next {
            // The byte where record `to` starts.
            let k = seg
                .index
                .partition_point(|&(o, _)| o <= to)
                .saturating_sub(1);
            let (mut at_offset, mut pos) = seg.index.get(k).copied().unwrap_or((seg.base, 0));
            while at_offset < to {
                let mut head = [0u8; FRAME_HEAD];
                seg.file
                    .read_exact_at(&mut head, pos)
                    .map_err(io_err(&seg.path))?;
                pos += FRAME_HEAD as u64 + u64::from(u32_at(&head, 0));
                at_offset += 1;
            }
            seg.file.set_len(pos).map_err(io_err(&seg.path))?;
            seg.file.sync_all().map_err(io_err(&seg.path))?;
            self.bytes -= seg.len - pos;
            seg.len = pos;
            seg.next = to;
            seg.index.retain(|&(o, _)| o < to);
        }
        self.dirty = false;
        Ok(())
    }

    /// Whether [`Log::reclaim`] with `low_water` would delete a segment.
    pub fn would_reclaim(&self, low_water: u64) -> bool {
        self.segments.len() > 1 && self.segments[0].next <= low_water
    }

    /// Deletes the segments every record of which is below `low_water` (acknowledged
    /// by every group); the last segment always stays. Returns how many went.
    pub fn reclaim(&mut self, low_water: u64) -> Result<usize> {
        let mut gone = 0;
        while self.segments.len() > 1 && self.segments[0].next <= low_water {
            let seg = self.segments.remove(0);
            std::fs::remove_file(&seg.path).map_err(io_err(&seg.path))?;
            self.bytes -= seg.len;
            gone += 1;
        }
        if gone > 0 {
            portswitch_files::sync_dir(&self.dir)?;
        }
        Ok(gone)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(payload: &[u8]) -> Message<'_> {
        Message {
            key: b"k",
            payload,
            timestamp_ms: 1,
            ..Default::default()
        }
    }

    fn small() -> LogConfig {
        LogConfig {
            segment_bytes_max: 1024,
            record_bytes_max: 4096,
            log_bytes_max: 1 << 20,
            fsync: Fsync::EveryBatch,
        }
    }

    fn payloads(n: usize) -> Vec<Vec<u8>> {
        (0..n)
            .map(|i| format!("message {i}").into_bytes())
            .collect()
    }

    fn append_all(log: &mut Log, p: &[Vec<u8>]) {
        for chunk in p.chunks(7) {
            let batch: Vec<Message<'_>> = chunk.iter().map(|b| msg(b)).collect();
            log.append(&batch).unwrap();
        }
    }

    #[test]
    fn records_come_back_in_order_across_segments_and_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let p = payloads(500);
        let (mut log, report) = Log::open(dir.path(), small()).unwrap();
        assert_eq!(report, OpenReport::default());
        append_all(&mut log, &p);
        assert!(log.segments() > 5, "{} segments", log.segments());
        assert_eq!(log.end_offset(), 500);
        drop(log);
        let (log, report) = Log::open(dir.path(), small()).unwrap();
        assert_eq!((report.records, report.cut_bytes), (500, 0));
        for from in [0, 1, 99, 250, 499] {
            let got = log.read(from, 1 << 20).unwrap();
            assert_eq!(got.len(), 500 - from as usize);
            for (i, r) in got.iter().enumerate() {
                assert_eq!(r.offset, from + i as u64);
                assert_eq!(r.payload, p[r.offset as usize]);
                assert_eq!(r.key, &b"k"[..]);
            }
        }
        assert!(log.read(500, 100).unwrap().is_empty());
        assert!(matches!(
            log.read(501, 100),
            Err(LogError::OutOfRange { .. })
        ));
        // A small budget still gives one record, and then about that much.
        assert_eq!(log.read(3, 1).unwrap().len(), 1);
        let some = log.read(3, 200).unwrap();
        assert!(some.len() >= 2 && some.len() < 10, "{}", some.len());
    }

    #[test]
    fn a_torn_tail_is_cut_not_served() {
        let dir = tempfile::tempdir().unwrap();
        let p = payloads(20);
        let (mut log, _) = Log::open(dir.path(), LogConfig::default()).unwrap();
        append_all(&mut log, &p);
        drop(log);
        let seg = dir.path().join(segment_name(0));
        let whole = std::fs::read(&seg).unwrap();
        // A crash in the middle of the last record's write.
        std::fs::write(&seg, &whole[..whole.len() - 5]).unwrap();
        let (mut log, report) = Log::open(dir.path(), LogConfig::default()).unwrap();
        assert_eq!(report.records, 19);
        assert!(report.cut_bytes > 0);
        assert_eq!(log.end_offset(), 19);
        assert_eq!(log.read(0, 1 << 20).unwrap().len(), 19);
        // The next append follows the last whole record.
        assert_eq!(log.append(&[msg(b"after")]).unwrap(), 19);
        drop(log);
        let (log, report) = Log::open(dir.path(), LogConfig::default()).unwrap();
        assert_eq!((report.records, report.cut_bytes), (20, 0));
        assert_eq!(log.read(19, 100).unwrap()[0].payload, &b"after"[..]);
    }

    #[test]
    fn a_flipped_bit_is_caught_on_open_and_on_read() {
        let dir = tempfile::tempdir().unwrap();
        let (mut log, _) = Log::open(dir.path(), small()).unwrap();
        append_all(&mut log, &payloads(200));
        let first = dir.path().join(segment_name(0));
        let mut bytes = std::fs::read(&first).unwrap();
        // A bit of the first record's payload.
        bytes[52] ^= 0x10;
        std::fs::write(&first, &bytes).unwrap();
        // The open log reads from disk and checks: the damage is reported.
        assert!(matches!(
            log.read(0, 1 << 20),
            Err(LogError::Corrupt { .. })
        ));
        drop(log);
        // Damage in an earlier segment is not a torn tail: opening refuses.
        let e = Log::open(dir.path(), small()).unwrap_err();
        assert!(matches!(e, LogError::Corrupt { .. }), "{e}");
        assert!(e.to_string().contains("checksum"), "{e}");
    }

    #[test]
    fn limits_are_typed_errors_and_write_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = small();
        cfg.log_bytes_max = 2_000;
        let (mut log, _) = Log::open(dir.path(), cfg).unwrap();
        let big = vec![0u8; 5_000];
        assert!(matches!(
            log.append(&[msg(&big)]),
            Err(LogError::RecordTooLarge {
                size: 5_001,
                max: 4096
            })
        ));
        assert!(matches!(log.append(&[]), Err(LogError::EmptyBatch)));
        let p = payloads(100);
        let mut appended = 0;
        let full = loop {
            match log.append(&[msg(&p[appended])]) {
                Ok(_) => appended += 1,
                Err(e) => break e,
            }
        };
        assert!(matches!(full, LogError::Full { .. }), "{full}");
        assert!(log.bytes() <= 2_000);
        assert_eq!(log.end_offset(), appended as u64);
        // Reclaiming acknowledged segments makes room again.
        let gone = log.reclaim(log.end_offset()).unwrap();
        assert!(gone > 0);
        assert!(log.start_offset() > 0);
        log.append(&[msg(b"again")]).unwrap();
        assert!(matches!(log.read(0, 10), Err(LogError::OutOfRange { .. })));
        let (reopened, _) = Log::open(dir.path(), small()).unwrap();
        assert_eq!(reopened.start_offset(), log.start_offset());
        assert_eq!(reopened.end_offset(), appended as u64 + 1);
    }

    #[test]
    fn a_record_larger_than_a_read_chunk_is_read_whole() {
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = small();
        cfg.record_bytes_max = 1 << 20;
        let (mut log, _) = Log::open(dir.path(), cfg).unwrap();
        let big = vec![7u8; 300_000];
        log.append(&[msg(b"a"), msg(&big), msg(b"b")]).unwrap();
        let got = log.read(0, 10).unwrap();
        assert_eq!(got.len(), 1);
        let got = log.read(1, 10).unwrap();
        assert_eq!(got[0].payload.len(), 300_000);
        let all = log.read(0, 1 << 20).unwrap();
        assert_eq!(all.len(), 3);
        assert_eq!(all[2].payload, &b"b"[..]);
    }

    #[test]
    fn truncating_cuts_records_across_segments_and_appends_follow() {
        let dir = tempfile::tempdir().unwrap();
        let p = payloads(300);
        let (mut log, _) = Log::open(dir.path(), small()).unwrap();
        append_all(&mut log, &p);
        let segments = log.segments();
        assert!(segments > 4);
        log.truncate(123).unwrap();
        assert_eq!(log.end_offset(), 123);
        assert!(log.segments() < segments);
        let got = log.read(100, 1 << 20).unwrap();
        assert_eq!(got.len(), 23);
        assert_eq!(got.last().unwrap().payload, p[122]);
        assert_eq!(log.append(&[msg(b"new 123")]).unwrap(), 123);
        // Nothing cut comes back on reopening; the cut point is a record boundary.
        drop(log);
        let (mut log, report) = Log::open(dir.path(), small()).unwrap();
        assert_eq!((report.records, report.cut_bytes), (124, 0));
        assert_eq!(log.read(123, 100).unwrap()[0].payload, &b"new 123"[..]);
        let bytes = log.bytes();
        log.truncate(500).unwrap();
        assert_eq!(log.bytes(), bytes);
        log.truncate(0).unwrap();
        assert_eq!((log.end_offset(), log.segments()), (0, 1));
        assert_eq!(log.append(&[msg(b"zero")]).unwrap(), 0);
        log.reclaim(1).unwrap();
    }

    #[test]
    fn a_log_reset_starts_again_at_an_offset_and_reopens_there() {
        let dir = tempfile::tempdir().unwrap();
        let (mut log, _) = Log::open(dir.path(), small()).unwrap();
        append_all(&mut log, &payloads(100));
        log.reset(5_000).unwrap();
        assert_eq!(
            (log.start_offset(), log.end_offset(), log.bytes()),
            (5_000, 5_000, 0)
        );
        assert_eq!(log.append(&[msg(b"x")]).unwrap(), 5_000);
        drop(log);
        let (log, report) = Log::open(dir.path(), small()).unwrap();
        assert_eq!((report.segments, report.records), (1, 1));
        assert_eq!(log.read(5_000, 10).unwrap()[0].payload, &b"x"[..]);
    }

    #[test]
    fn stray_files_are_ignored_and_bad_names_refused() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("notes.txt"), b"x").unwrap();
        let (log, _) = Log::open(dir.path(), small()).unwrap();
        drop(log);
        std::fs::write(dir.path().join("12.log"), b"").unwrap();
        assert!(matches!(
            Log::open(dir.path(), small()),
            Err(LogError::BadSegmentName(_))
        ));
    }
}
