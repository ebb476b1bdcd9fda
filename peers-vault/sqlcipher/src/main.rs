//! The vault benchmark's SQLite workload on SQLCipher (see vaultsql-common), with its
//! defaults (SQLCipher 4: AES-256-CBC and HMAC-SHA512 per page, PBKDF2-HMAC-SHA512 key
//! derivation at open, outside the timings). The passphrase is `--key`, or a fixed one.

fn main() -> std::process::ExitCode {
    if vaultsql_common::cipher_version().is_none() {
        eprintln!("vaultsql-sqlcipher does not link SQLCipher");
        return std::process::ExitCode::FAILURE;
    }
    vaultsql_common::main_with("sqlcipher", Some("bench passphrase"))
}
