//! Reed-Solomon parity of closed segments (`seg/NNNNNNNN.par`).
//!
//! Every closed segment has a `.par` file, written once the segment is durable: its
//! existence is what marks the segment closed (see `replay`). With parity off it holds
//! only the per-shard checksums (`parity` = 0 shards).
//!
//! A segment is cut into stripes of `data` shards of [`PARITY_SHARD_BYTES`] (the last
//! stripe zero-padded); each stripe gets `parity` recovery shards. A CRC32C per shard
//! (data and parity) locates damaged shards, which are rebuilt from the others while no
//! more than `parity` of a stripe are bad. What parity rebuilds is only trusted once the
//! record's seal opens on it.
//!
//! Layout: header (36 bytes: magic `PSVPAR01`, segment u32, data u8, parity u8, 0 u16,
//! shard bytes u32, segment length u64, stripes u32, crc32c of the previous 32 bytes),
//! then `stripes x (data + parity)` CRC32C u32, then `stripes x parity` shards.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::Path;

use crate::error::{Result, VaultError};
use crate::limits::PARITY_SHARD_BYTES;
use crate::store::{par_path, seg_path, sync_dir, SEG_DIR};
use crate::types::Parity;

const MAGIC: &[u8; 8] = b"PSVPAR01";
const HEADER_BYTES: usize = 36;

struct ParHeader {
    segment: u32,
    data: usize,
    parity: usize,
    seg_len: u64,
    stripes: usize,
}

fn stripe_bytes(data: usize) -> u64 {
    (data * PARITY_SHARD_BYTES) as u64
}

/// Computes the parity file of segment `id` of `dir` (written to a temporary file,
/// synced, renamed): called when a segment is closed.
pub fn write(dir: &Path, id: u32, p: Option<Parity>) -> Result<()> {
    let seg = File::open(seg_path(dir, id))?;
    let seg_len = seg.metadata()?.len();
    let (d, r) = match p {
        Some(p) => (p.data_shards as usize, p.parity_shards as usize),
        None => (crate::limits::PARITY_DATA_SHARDS_DEFAULT as usize, 0),
    };
    let stripes = seg_len.div_ceil(stripe_bytes(d)) as usize;
    let mut crcs = Vec::with_capacity(stripes * (d + r));
    let mut parity_out = Vec::with_capacity(stripes * r * PARITY_SHARD_BYTES);
    let mut stripe = vec![0u8; d * PARITY_SHARD_BYTES];
    for s in 0..stripes {
        read_stripe(&seg, seg_len, s, d, &mut stripe)?;
        let shards: Vec<&[u8]> = stripe.chunks(PARITY_SHARD_BYTES).collect();
        for sh in &shards {
            crcs.push(crc32c::crc32c(sh));
        }
        let rec = if r == 0 {
            Vec::new()
        } else {
            reed_solomon_simd::encode(d, r, &shards)
                .map_err(|e| VaultError::format("parity", e.to_string()))?
        };
        for sh in &rec {
            crcs.push(crc32c::crc32c(sh));
            parity_out.extend_from_slice(sh);
        }
    }
    let mut out = Vec::with_capacity(HEADER_BYTES + crcs.len() * 4 + parity_out.len());
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&id.to_le_bytes());
    out.push(d as u8);
    out.push(r as u8);
    out.extend_from_slice(&[0, 0]);
    out.extend_from_slice(&(PARITY_SHARD_BYTES as u32).to_le_bytes());
    out.extend_from_slice(&seg_len.to_le_bytes());
    out.extend_from_slice(&(stripes as u32).to_le_bytes());
    let crc = crc32c::crc32c(&out);
    out.extend_from_slice(&crc.to_le_bytes());
    for c in &crcs {
        out.extend_from_slice(&c.to_le_bytes());
    }
    out.extend_from_slice(&parity_out);
    let tmp = dir.join(SEG_DIR).join(format!("{id:08}.par.tmp"));
    {
        let mut f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&tmp)?;
        f.write_all(&out)?;
        f.sync_all()?;
    }
    fs::rename(&tmp, par_path(dir, id))?;
    sync_dir(&dir.join(SEG_DIR))?;
    Ok(())
}

/// Reads stripe `s` of the segment (`seg_len` long, zeros past it). Every read
/// error is an error: parity written or verified over bytes that did not read would
/// protect nothing.
fn read_stripe(seg: &File, seg_len: u64, s: usize, d: usize, out: &mut [u8]) -> Result<()> {
    let start = s as u64 * stripe_bytes(d);
    let n = (seg_len - start).min(stripe_bytes(d)) as usize;
    out.fill(0);
    seg.read_exact_at(&mut out[..n], start)?;
    Ok(())
}

/// [`read_stripe`] for a rebuild: bytes the file no longer has (a truncated segment)
/// or that fail to read stay zero, and the shard checksums then mark those shards for
/// rebuilding.
fn read_stripe_for_rebuild(seg: &File, seg_len: u64, s: usize, d: usize, out: &mut [u8]) {
    let start = s as u64 * stripe_bytes(d);
    let n = (seg_len - start).min(stripe_bytes(d)) as usize;
    out.fill(0);
    let mut got = 0;
    while got < n {
        match seg.read_at(&mut out[got..n], start + got as u64) {
            Ok(0) => break,
            Ok(k) => got += k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => {
                tracing::warn!(offset = start + got as u64, error = %e, "vault: parity read of a stripe failed");
                break;
            }
        }
    }
}

/// The segment length the parity of segment `id` covers, if it has a readable parity
/// file.
pub fn covered_len(dir: &Path, id: u32) -> Option<u64> {
    let par = File::open(par_path(dir, id)).ok()?;
    read_header(&par)
        .ok()
        .filter(|h| h.segment == id)
        .map(|h| h.seg_len)
}

fn read_header(par: &File) -> Result<ParHeader> {
    let mut h = [0u8; HEADER_BYTES];
    par.read_exact_at(&mut h, 0)?;
    let bad = || VaultError::format("parity file", "bad header");
    if &h[..8] != MAGIC
        || crc32c::crc32c(&h[..32]) != u32::from_le_bytes(h[32..36].try_into().map_err(|_| bad())?)
    {
        return Err(bad());
    }
    let u32_at = |i: usize| u32::from_le_bytes(h[i..i + 4].try_into().expect("4 bytes"));
    let hdr = ParHeader {
        segment: u32_at(8),
        data: h[12] as usize,
        parity: h[13] as usize,
        seg_len: u64::from_le_bytes(h[20..28].try_into().expect("8 bytes")),
        stripes: u32_at(28) as usize,
    };
    // A segment never passes its size limit by more than one record: a larger length
    // is a forged or damaged header (and must not size an allocation).
    let seg_len_max = crate::limits::SEGMENT_BYTES_MAX
        + crate::limits::RECORD_BODY_BYTES_MAX as u64
        + crate::limits::FRAME_BYTES as u64;
    if u32_at(16) as usize != PARITY_SHARD_BYTES
        || hdr.data == 0
        || hdr.seg_len > seg_len_max
        || hdr.stripes as u64 != hdr.seg_len.div_ceil(stripe_bytes(hdr.data))
    {
        return Err(bad());
    }
    Ok(hdr)
}

/// Whether segment `id` has a parity file (it is closed).
pub fn exists(dir: &Path, id: u32) -> bool {
    par_path(dir, id).exists()
}

/// Rebuilds bytes `[off, off + len)` of segment `id` from its parity: returns them, or
/// `None` when a stripe has more damaged shards than parity shards (or no parity).
pub fn rebuild(dir: &Path, id: u32, off: u64, len: usize) -> Result<Option<Vec<u8>>> {
    let par = match File::open(par_path(dir, id)) {
        Ok(f) => f,
        Err(_) => return Ok(None),
    };
    let h = read_header(&par)?;
    if h.segment != id || off + len as u64 > h.seg_len || h.parity == 0 {
        return Ok(None);
    }
    let seg = File::open(seg_path(dir, id))?;
    let (d, r) = (h.data, h.parity);
    let sb = stripe_bytes(d);
    let first = (off / sb) as usize;
    let last = ((off + len as u64 - 1) / sb) as usize;
    let mut out = Vec::with_capacity(len);
    let mut stripe = vec![0u8; d * PARITY_SHARD_BYTES];
    let crc_base = HEADER_BYTES as u64;
    let par_base = crc_base + (h.stripes * (d + r) * 4) as u64;
    for s in first..=last {
        read_stripe_for_rebuild(&seg, h.seg_len, s, d, &mut stripe);
        let mut crcs = vec![0u8; (d + r) * 4];
        par.read_exact_at(&mut crcs, crc_base + (s * (d + r) * 4) as u64)?;
        let crc = |i: usize| u32::from_le_bytes(crcs[i * 4..i * 4 + 4].try_into().expect("4"));
        let mut good_data = Vec::new();
        let mut bad_data = Vec::new();
        for (i, sh) in stripe.chunks(PARITY_SHARD_BYTES).enumerate() {
            if crc32c::crc32c(sh) == crc(i) {
                good_data.push(i);
            } else {
                bad_data.push(i);
            }
        }
        if !bad_data.is_empty() {
            let mut recovery = Vec::new();
            for j in 0..r {
                let mut sh = vec![0u8; PARITY_SHARD_BYTES];
                par.read_exact_at(
                    &mut sh,
                    par_base + ((s * r + j) * PARITY_SHARD_BYTES) as u64,
                )?;
                if crc32c::crc32c(&sh) == crc(d + j) {
                    recovery.push((j, sh));
                }
            }
            if bad_data.len() > recovery.len() {
                return Ok(None);
            }
            let originals: Vec<(usize, &[u8])> = good_data
                .iter()
                .map(|&i| {
                    (
                        i,
                        &stripe[i * PARITY_SHARD_BYTES..(i + 1) * PARITY_SHARD_BYTES],
                    )
                })
                .collect();
            let restored = reed_solomon_simd::decode(d, r, originals, recovery)
                .map_err(|e| VaultError::format("parity", e.to_string()))?;
            for (i, sh) in restored {
                if crc32c::crc32c(&sh) != crc(i) {
                    return Ok(None);
                }
                stripe[i * PARITY_SHARD_BYTES..(i + 1) * PARITY_SHARD_BYTES].copy_from_slice(&sh);
            }
        }
        let s_start = s as u64 * sb;
        let from = off.max(s_start) - s_start;
        let to = (off + len as u64).min(s_start + sb) - s_start;
        out.extend_from_slice(&stripe[from as usize..to as usize]);
    }
    Ok(Some(out))
}

/// Whether the parity file matches the segment as it is now (every CRC agrees).
pub fn verify(dir: &Path, id: u32) -> Result<bool> {
    let par = match File::open(par_path(dir, id)) {
        Ok(f) => f,
        Err(_) => return Ok(false),
    };
    let h = match read_header(&par) {
        Ok(h) => h,
        Err(_) => return Ok(false),
    };
    let seg = File::open(seg_path(dir, id))?;
    if h.segment != id || seg.metadata()?.len() != h.seg_len {
        return Ok(false);
    }
    let (d, r) = (h.data, h.parity);
    let mut stripe = vec![0u8; d * PARITY_SHARD_BYTES];
    let par_base = HEADER_BYTES as u64 + (h.stripes * (d + r) * 4) as u64;
    let mut sh = vec![0u8; PARITY_SHARD_BYTES];
    for s in 0..h.stripes {
        read_stripe(&seg, h.seg_len, s, d, &mut stripe)?;
        let mut crcs = vec![0u8; (d + r) * 4];
        par.read_exact_at(&mut crcs, HEADER_BYTES as u64 + (s * (d + r) * 4) as u64)?;
        let crc = |i: usize| u32::from_le_bytes(crcs[i * 4..i * 4 + 4].try_into().expect("4"));
        for (i, c) in stripe.chunks(PARITY_SHARD_BYTES).enumerate() {
            if crc32c::crc32c(c) != crc(i) {
                return Ok(false);
            }
        }
        for j in 0..r {
            par.read_exact_at(
                &mut sh,
                par_base + ((s * r + j) * PARITY_SHARD_BYTES) as u64,
            )?;
            if crc32c::crc32c(&sh) != crc(d + j) {
                return Ok(false);
            }
        }
    }
    Ok(true)
}
