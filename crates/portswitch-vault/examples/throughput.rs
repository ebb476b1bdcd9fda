//! A quick in-process throughput check of the library API (not a benchmark suite:
//! scripts/bench-vault.sh compares against gocryptfs and SQLCipher). Each figure is
//! printed per wall-clock second and per CPU-second of this process, so it can be read
//! on a busy machine too. Each read also prints the share of its time spent verifying:
//! opening (authenticating and decrypting) block records, from the vault's
//! `verify_seconds` metric.
//!
//! `cargo run --release -p portswitch-vault --example throughput -- DIR [MiB]`

use std::time::Instant;

use portswitch_vault::{CreateOptions, KdfParams, Metrics, OpenOptions, Vault, ROOT};

/// CPU seconds (user + system) this process used so far, from /proc/self/stat.
fn cpu_s() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let rest = stat.rsplit(')').next().unwrap_or("");
    let f: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime (fields 14 and 15) are the 12th and 13th after the name.
    let ticks = |i: usize| f.get(i).and_then(|s| s.parse::<f64>().ok()).unwrap_or(0.0);
    (ticks(11) + ticks(12)) / 100.0
}

/// Runs `f`, then prints `amount / time` per wall-clock second and per CPU-second;
/// returns the wall and CPU seconds.
fn measure(label: &str, amount: f64, unit: &str, f: impl FnOnce()) -> (f64, f64) {
    let (t, c) = (Instant::now(), cpu_s());
    f();
    let (wall, cpu) = (t.elapsed().as_secs_f64(), cpu_s() - c);
    println!(
        "{label}: {:.0} {unit}; {:.0} {unit} per CPU-second ({wall:.2} s wall, {cpu:.2} s CPU)",
        amount / wall,
        amount / cpu.max(0.01),
    );
    (wall, cpu)
}

/// `measure` of a read: also prints the share of its wall and CPU time spent opening
/// block records (the vault's `verify_seconds`; this process reads on one thread).
fn measure_read(m: &Metrics, label: &str, amount: f64, unit: &str, f: impl FnOnce()) {
    let (s, b, o) = (
        m.verify_seconds.nanos(),
        m.verified_bytes.get(),
        m.blocks_opened.get(),
    );
    let (wall, cpu) = measure(label, amount, unit, f);
    let verify = (m.verify_seconds.nanos() - s) as f64 / 1e9;
    let (bytes, opened) = (m.verified_bytes.get() - b, m.blocks_opened.get() - o);
    if verify == 0.0 && opened > 0 {
        println!("  verify: not metered (blocks opened, no time counted)");
        return;
    }
    println!(
        "  verify: {:.1}% of wall, {:.1}% of CPU ({verify:.3} s; {opened} blocks, {:.0} MB opened)",
        100.0 * verify / wall,
        100.0 * verify / cpu.max(0.01),
        bytes as f64 / 1e6,
    );
}

fn main() {
    let mut args = std::env::args().skip(1);
    let dir = std::path::PathBuf::from(args.next().expect("usage: throughput DIR [MiB]"));
    let mib: usize = args.next().map(|s| s.parse().expect("MiB")).unwrap_or(512);
    let mb = mib as f64 * 1.048576;
    let _ = std::fs::remove_dir_all(&dir);
    let v = Vault::create(
        &dir,
        b"bench",
        CreateOptions {
            kdf: KdfParams::danger_insecure_fast(),
            ..CreateOptions::default()
        },
    )
    .unwrap();
    let f = v.create_file(ROOT, b"seq", 0o644).unwrap();
    let mut rng = fastrand::Rng::with_seed(1);
    let chunk: Vec<u8> = (0..1 << 20).map(|_| rng.u8(..)).collect();
    measure(
        "sequential write 1 MiB, incompressible, one sync",
        mb,
        "MB/s",
        || {
            for i in 0..mib {
                v.write(f.ino, (i as u64) << 20, &chunk).unwrap();
            }
            v.sync().unwrap();
        },
    );
    drop(v);
    let v = Vault::open(&dir, b"bench", OpenOptions::default()).unwrap();
    let m = v.metrics();
    let mut buf = vec![0u8; 1 << 20];
    for pass in ["after reopen", "again"] {
        measure_read(
            &m,
            &format!("sequential read 1 MiB ({pass})"),
            mb,
            "MB/s",
            || {
                for i in 0..mib {
                    v.read(f.ino, (i as u64) << 20, &mut buf).unwrap();
                }
            },
        );
    }
    // Random 4 KiB reads within 32 MiB (cached after the first touch) and over the
    // whole file (mostly misses: a pread and an AEAD open per read).
    let mut b4 = vec![0u8; 4096];
    for (label, range) in [
        ("hot 32 MiB", 32u64 << 20),
        ("whole file", (mib as u64) << 20),
    ] {
        let n = 200_000;
        measure_read(
            &m,
            &format!("random 4 KiB read ({label})"),
            n as f64,
            "ops/s",
            || {
                for _ in 0..n {
                    let off = rng.u64(..range / 4096) * 4096;
                    v.read(f.ino, off, &mut b4).unwrap();
                }
            },
        );
    }
    let n = 100_000;
    measure(
        "random 4 KiB write, one sync at the end",
        n as f64,
        "ops/s",
        || {
            for i in 0..n {
                let off = rng.u64(..((mib as u64) << 20) / 4096) * 4096;
                v.write(f.ino, off, &chunk[(i % 256) * 4096..][..4096])
                    .unwrap();
            }
            v.sync().unwrap();
        },
    );
    let n = 1_000;
    measure("random 4 KiB write + sync each", n as f64, "ops/s", || {
        for i in 0..n {
            let off = rng.u64(..((mib as u64) << 20) / 4096) * 4096;
            v.write(f.ino, off, &chunk[(i % 256) * 4096..][..4096])
                .unwrap();
            v.sync().unwrap();
        }
    });
    // Text: what compression saves, and what it costs.
    let g = v.create_file(ROOT, b"text", 0o644).unwrap();
    let words = [
        "alpha ", "beta ", "gamma ", "delta ", "vault ", "block ", "commit\n",
    ];
    let mut text = Vec::with_capacity((1 << 20) + 8);
    while text.len() < 1 << 20 {
        text.extend_from_slice(words[rng.usize(..words.len())].as_bytes());
    }
    text.truncate(1 << 20);
    let before = v.stats().disk_bytes;
    measure(
        "sequential write 1 MiB, text, one sync",
        mb / 2.0,
        "MB/s",
        || {
            for i in 0..mib / 2 {
                v.write(g.ino, (i as u64) << 20, &text).unwrap();
            }
            v.sync().unwrap();
        },
    );
    println!(
        "text: {} MiB logical took {} MiB on disk (parity included)",
        mib / 2,
        (v.stats().disk_bytes - before) >> 20
    );
    let st = v.stats();
    println!(
        "cache hits {} misses {}; {} segments",
        st.cache_hits, st.cache_misses, st.segments
    );
    drop(v);
    let _ = std::fs::remove_dir_all(&dir);
}
