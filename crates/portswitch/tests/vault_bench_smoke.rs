//! The vault benchmark (`scripts/bench-vault.sh`) in its smoke mode: fio, gocryptfs and
//! fuse3 are installed by the script when missing (Debian packages, as root or with
//! sudo), peers-vault is built (plain SQLite and SQLCipher, unoptimised so that the two
//! amalgamations compile quickly), every system runs every part at a small size, and the
//! summary is written — so the suite cannot rot between runs. The figures of a smoke
//! run mean nothing; only that each system produced one is checked.
//!
//! Ours through the FUSE mount runs when this portswitch has `vault mount`, ours
//! through the SQLite VFS when crates/portswitch-vault-sqlite has its benchmark; until
//! then the script says why it skipped them, and so does this test.

use std::path::Path;
use std::process::Command;

use serde_json::Value;

/// fio, small files, SQLite and bytes on disk, for the file systems.
const FS_MEASURES: [(&str, &str); 12] = [
    ("fio", "seq_write_1m"),
    ("fio", "seq_read_1m_cold"),
    ("fio", "seq_read_1m_warm"),
    ("fio", "rand_read_4k_warm"),
    ("fio", "rand_write_4k"),
    ("files", "unpack_s"),
    ("files", "unpack_sync_s"),
    ("files", "read_cold_s"),
    ("files", "du_apparent_bytes"),
    ("sqlite", "inserts_per_s"),
    ("sqlite", "selects_per_s"),
    ("bytes", "db_on_disk"),
];
/// SQLite and bytes on disk, for the SQLite engines.
const SQL_MEASURES: [(&str, &str); 3] = [
    ("sqlite", "inserts_per_s"),
    ("sqlite", "selects_per_s"),
    ("bytes", "db_on_disk"),
];

#[test]
fn vault_bench_smoke_run_measures_every_system() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let bin = env!("CARGO_BIN_EXE_portswitch");
    let out = std::env::temp_dir().join(format!("portswitch-vault-smoke-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&out);
    let started = std::time::Instant::now();
    let run = Command::new("bash")
        .arg(root.join("scripts/bench-vault.sh"))
        .env("SMOKE", "1")
        .env("OUT", &out)
        .env("PORTSWITCH_BIN", bin)
        .output()
        .expect("run scripts/bench-vault.sh");
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(
        run.status.success(),
        "scripts/bench-vault.sh failed: {}\n--- stdout\n{}\n--- stderr\n{stderr}",
        run.status,
        String::from_utf8_lossy(&run.stdout),
    );
    eprintln!(
        "scripts/bench-vault.sh (smoke) took {:.0} s",
        started.elapsed().as_secs_f64()
    );
    let results: Vec<Value> = std::fs::read_to_string(out.join("results.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect();
    let skipped = |system: &str| {
        results
            .iter()
            .find(|r| r["system"] == system && r.get("skipped").is_some())
            .map(|r| r["skipped"].as_str().unwrap_or_default().to_string())
    };
    for r in &results {
        assert!(r.get("error").is_none(), "a system failed: {r}\n{stderr}");
    }

    // Ours may be missing only while its pieces are: the CLI's `vault mount`, the VFS's
    // benchmark. Then the script must say so.
    let has_mount = Command::new(bin)
        .args(["vault", "mount", "--help"])
        .output()
        .is_ok_and(|o| o.status.success());
    let has_vfs_bench = root
        .join("crates/portswitch-vault-sqlite/benches/sqlite_vfs.rs")
        .exists();
    let mut systems = vec![("ext4", true), ("gocryptfs", true), ("sqlcipher", false)];
    for (system, present, fs) in [
        ("ours", has_mount, true),
        ("ours-vfs", has_vfs_bench, false),
    ] {
        if present {
            systems.push((system, fs));
        } else {
            let why =
                skipped(system).unwrap_or_else(|| panic!("{system}: neither run nor skipped"));
            assert!(!why.is_empty(), "{system}: skipped without a reason");
            eprintln!("{system}: not measured yet: {why}");
        }
    }
    for (system, fs) in systems {
        assert_eq!(skipped(system), None, "{system} was skipped\n{stderr}");
        let measures: &[(&str, &str)] = if fs { &FS_MEASURES } else { &SQL_MEASURES };
        for (part, measure) in measures {
            let r = results
                .iter()
                .find(|r| r["system"] == system && r["part"] == *part && r["measure"] == *measure)
                .unwrap_or_else(|| panic!("{system}: {part} {measure} not measured\n{stderr}"));
            assert!(
                r["median"].as_f64().is_some_and(|v| v > 0.0),
                "{system}: {part} {measure}: no number: {r}"
            );
        }
    }
    // The reference for bytes on disk, and the summary's tables.
    assert!(results
        .iter()
        .any(|r| r["system"] == "zstd-4k" && r["median"].as_f64().is_some_and(|v| v > 0.0)));
    let summary = std::fs::read_to_string(out.join("summary.md")).unwrap();
    for needle in [
        "## fio",
        "## Small files",
        "## SQLite",
        "## Bytes on disk",
        "| gocryptfs |",
        "| SQLCipher on ext4 |",
    ] {
        assert!(
            summary.contains(needle),
            "summary lacks {needle}:\n{summary}"
        );
    }
    let _ = std::fs::remove_dir_all(&out);
}
