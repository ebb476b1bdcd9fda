//! The vault benchmark's SQLite workload on plain SQLite (see vaultsql-common), and
//! `blockzstd FILE`: what compressing a file per block with zstd would leave (the
//! reference for the vault's bytes-on-disk target).

use std::io::Read;
use std::process::ExitCode;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) == Some("blockzstd") {
        return blockzstd(&args[1..]);
    }
    // Built together with vaultsql-sqlcipher, Cargo would have linked SQLCipher here too.
    if let Some(v) = vaultsql_common::cipher_version() {
        eprintln!(
            "vaultsql-plain links SQLCipher {v}, not plain SQLite: build it on its own \
             (cargo build --release -p vaultsql-plain)"
        );
        return ExitCode::FAILURE;
    }
    vaultsql_common::main_with("sqlite", None)
}

/// `blockzstd FILE [--block BYTES (4096)] [--level N (1)]`: the file cut in blocks, each
/// compressed on its own with zstd and kept raw when that does not shrink it.
fn blockzstd(args: &[String]) -> ExitCode {
    let mut file = None;
    let (mut block, mut level) = (4096usize, 1i32);
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let v = it.next();
        match (a.as_str(), v) {
            ("--block", Some(v)) => block = v.parse().unwrap_or(0),
            ("--level", Some(v)) => level = v.parse().unwrap_or(1),
            (f, None) if !f.starts_with("--") => file = Some(f.to_string()),
            _ => {
                eprintln!("usage: vaultsql-plain blockzstd FILE [--block BYTES] [--level N]");
                return ExitCode::from(2);
            }
        }
    }
    let (Some(file), true) = (file, block > 0) else {
        eprintln!("usage: vaultsql-plain blockzstd FILE [--block BYTES] [--level N]");
        return ExitCode::from(2);
    };
    let mut data = Vec::new();
    if let Err(e) = std::fs::File::open(&file).and_then(|mut f| f.read_to_end(&mut data)) {
        eprintln!("{file}: {e}");
        return ExitCode::FAILURE;
    }
    let mut packed = 0usize;
    let mut compressed_blocks = 0usize;
    let blocks = data.len().div_ceil(block);
    for b in data.chunks(block) {
        match zstd::bulk::compress(b, level) {
            Ok(z) if z.len() < b.len() => {
                packed += z.len();
                compressed_blocks += 1;
            }
            _ => packed += b.len(),
        }
    }
    let ratio = if data.is_empty() {
        1.0
    } else {
        packed as f64 / data.len() as f64
    };
    println!(
        "{{\"bytes\":{},\"block\":{block},\"level\":{level},\"blocks\":{blocks},\"compressed_blocks\":{compressed_blocks},\"zstd_bytes\":{packed},\"ratio\":{ratio:.4}}}",
        data.len()
    );
    ExitCode::SUCCESS
}
