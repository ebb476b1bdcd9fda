//! Many threads at once: writers on their own files, readers, commits, syncs and gc
//! racing; then everything is checked against what each writer last wrote.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use common::*;
use portswitch_vault::Retention;

const BS: usize = 4096;

/// A self-describing block: a header naming its writer, round and index, then bytes
/// derived from them (compressible text on even rounds, noise on odd ones). Readers
/// check every block they see against this, so a block of the wrong file, place or
/// generation (or torn inside) is caught, not only an error.
fn block(w: u64, round: u64, idx: u64) -> Vec<u8> {
    let mut b = Vec::with_capacity(BS);
    b.extend_from_slice(b"PSVB");
    b.extend_from_slice(&w.to_le_bytes());
    b.extend_from_slice(&round.to_le_bytes());
    b.extend_from_slice(&idx.to_le_bytes());
    b.extend_from_slice(&[0u8; 4]);
    let seed = (w << 40) ^ (round << 20) ^ idx;
    if round.is_multiple_of(2) {
        b.extend_from_slice(&text(seed, BS - 32));
    } else {
        b.extend_from_slice(&noise(seed, BS - 32));
    }
    b
}

/// Checks every whole block read from writer `w`'s file: a hole (zeros) or a block that
/// `block` made for this writer at this index.
fn verify(w: u64, bytes: &[u8]) {
    for (i, c) in bytes.chunks_exact(BS).enumerate() {
        if c.iter().all(|b| *b == 0) {
            continue;
        }
        assert_eq!(&c[..4], b"PSVB", "writer {w} block {i}: not a block");
        let hw = u64::from_le_bytes(c[4..12].try_into().unwrap());
        let round = u64::from_le_bytes(c[12..20].try_into().unwrap());
        let idx = u64::from_le_bytes(c[20..28].try_into().unwrap());
        assert_eq!((hw, idx), (w, i as u64), "block of another file or place");
        assert!(
            c == block(w, round, idx),
            "writer {w} block {i}: wrong bytes"
        );
    }
}

#[test]
fn writers_readers_commits_and_gc_race_safely() {
    let d = TempDir::new("conc");
    let v = create(d.path());
    let stop = Arc::new(AtomicBool::new(false));
    let mut handles = Vec::new();
    for w in 0..4u64 {
        let v = v.clone();
        handles.push(std::thread::spawn(move || {
            let mut last = Vec::new();
            for round in 0..150u64 {
                let blocks = 5 + round % 12;
                let data: Vec<u8> = (0..blocks).flat_map(|i| block(w, round, i)).collect();
                v.write_file(&format!("/w{w}"), &data).unwrap();
                // Overwrite blocks 1 and 2 in place too (another generation).
                let ino = v.resolve(&format!("/w{w}")).unwrap().ino;
                let patch: Vec<u8> = (1..3).flat_map(|i| block(w, round + 10_000, i)).collect();
                v.write(ino, BS as u64, &patch).unwrap();
                let mut want = data.clone();
                want[BS..3 * BS].copy_from_slice(&patch);
                let got = v.read_file(&format!("/w{w}")).unwrap();
                verify(w, &got);
                assert_eq!(got, want);
                last = want;
            }
            last
        }));
    }
    let readers: Vec<_> = (0..2)
        .map(|_| {
            let v = v.clone();
            let stop = stop.clone();
            std::thread::spawn(move || {
                let mut reads = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    for w in 0..4u64 {
                        // write_file is not atomic: any length may be seen, but
                        // never an error other than a file not created yet, and
                        // every block seen is one its writer wrote there.
                        match v.read_file(&format!("/w{w}")) {
                            Ok(b) => {
                                verify(w, &b);
                                reads += 1;
                            }
                            Err(portswitch_vault::VaultError::NotFound) => {}
                            Err(e) => panic!("{e}"),
                        }
                    }
                }
                reads
            })
        })
        .collect();
    let maint = {
        let v = v.clone();
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut i = 0u64;
            while !stop.load(Ordering::Relaxed) {
                match i % 4 {
                    0 => drop(v.commit().unwrap()),
                    1 => drop(v.sync().unwrap()),
                    2 => drop(
                        v.gc(Retention {
                            keep_last: Some(3),
                            keep_within: None,
                        })
                        .unwrap(),
                    ),
                    _ => assert!(v.check(false).unwrap().is_clean()),
                }
                i += 1;
            }
        })
    };
    let finals: Vec<Vec<u8>> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    stop.store(true, Ordering::Relaxed);
    for r in readers {
        assert!(r.join().unwrap() > 0);
    }
    maint.join().unwrap();
    v.sync().unwrap();
    drop(v);
    let v = open(d.path());
    for (w, want) in finals.iter().enumerate() {
        let got = v.read_file(&format!("/w{w}")).unwrap();
        verify(w as u64, &got);
        assert_eq!(&got, want, "writer {w}");
    }
    assert!(v.check(false).unwrap().is_clean());
    // The metrics encode as Prometheus text.
    let mut out = String::new();
    prometheus_client::encoding::text::encode(&mut out, &v.metrics_registry()).unwrap();
    assert!(out.contains("vault_commits_total"), "{out}");
    assert!(out.contains("vault_cache_hits_total"));
}
