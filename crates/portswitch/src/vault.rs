//! `portswitch vault`: create, read, write, version, check, back up and mount an
//! encrypted vault (docs/VAULT.md).
//!
//! ```text
//! portswitch vault init ./v                      # passphrase: first line of stdin
//! echo hi | PORTSWITCH_VAULT_PASSPHRASE=… portswitch vault put ./v /notes/a.txt -
//! portswitch vault get ./v /notes/a.txt --at 3   # as of version 3 (or a snapshot, a time)
//! portswitch vault mount ./v /mnt/v --metrics-listen 127.0.0.1:9464
//! ```
//! The passphrase comes from `--passphrase-file`, else `PORTSWITCH_VAULT_PASSPHRASE`,
//! else one line of standard input (not echoed on a terminal) — never from the command
//! line, where other users can read it in the process list.
//!
//! Exit codes: 0 done; 1 an error; 2 bad usage; 3 wrong passphrase; 4 damage found
//! that could not be repaired (or a read that met it); 5 the vault is in use by another
//! process (a mount here, or the owner of its port elsewhere); 6 no such path, version or
//! snapshot; 7 fenced (a writer with a newer fencing token has had the vault or the
//! backup target, or the mount lost its port); 141 standard output closed.
//!
//! `mount --switch ADDR` owns the port `vault/<vault id hex>` in the port switch for as
//! long as it is mounted, and writes with the port's fencing token
//! ([`portswitch_vault::fencing`]); losing the port stops every commit at once.

use std::io::{BufRead, Read, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use clap::{Args, Subcommand, ValueEnum};
use portswitch_vault::{
    Attr, Cipher, CreateOptions, FileKind, KdfParams, OpenOptions, Parity, Retention, Vault,
    VaultError, VersionSpec,
};

use crate::AppResult;

/// Environment variables the passphrases may come from.
const PASSPHRASE_ENV: &str = "PORTSWITCH_VAULT_PASSPHRASE";
const NEW_PASSPHRASE_ENV: &str = "PORTSWITCH_VAULT_NEW_PASSPHRASE";
/// Bytes of a passphrase (a line read from a file or standard input).
const PASSPHRASE_BYTES_MAX: usize = 4096;
/// Bytes `put` reads into memory (the vault's path helpers take the whole file).
const PUT_BYTES_MAX: u64 = 1 << 32;

#[derive(Args, Debug)]
pub struct VaultArgs {
    #[command(subcommand)]
    command: VaultCommand,
}

#[derive(Args, Debug, Clone)]
struct Access {
    /// The vault directory.
    dir: PathBuf,
    /// Read the passphrase from this file (its first line). Otherwise from
    /// $PORTSWITCH_VAULT_PASSPHRASE, else one line of standard input.
    #[arg(long)]
    passphrase_file: Option<PathBuf>,
    /// A mirror directory: written with the same bytes, and where damaged records are
    /// repaired from.
    #[arg(long)]
    mirror: Option<PathBuf>,
    /// Decrypted blocks kept in memory, MiB.
    #[arg(long, default_value_t = 64)]
    cache_mib: u64,
    /// A backup server holding this vault's backup (`host:port`): damaged records the
    /// mirror and the parity cannot restore are repaired from its copy.
    #[arg(long, requires = "repair_key_file")]
    repair_server: Option<String>,
    /// The repair server's pre-shared key (from `vault backup-key`).
    #[arg(long)]
    repair_key_file: Option<PathBuf>,
    /// Port switch address (`host:port`): own the port `vault/<vault id hex>` while
    /// changing the vault (a mount: while mounted), so that one writer at a time has it
    /// across machines. The port's fencing token is recorded in every commit; a vault
    /// or backup target a newer writer has had refuses this one (exit 7), and a mount
    /// that loses the port stops committing. Taken: exit 5.
    #[arg(long)]
    switch: Option<String>,
}

#[derive(Subcommand, Debug)]
enum VaultCommand {
    /// Create a new vault in DIR (empty or missing).
    Init(InitArgs),
    /// Change the passphrase (rewrites the header only). The new one comes from
    /// --new-passphrase-file, $PORTSWITCH_VAULT_NEW_PASSPHRASE or the next line of stdin.
    Passwd {
        #[command(flatten)]
        access: Access,
        #[arg(long)]
        new_passphrase_file: Option<PathBuf>,
    },
    /// Make a new data key active, then re-seal every record under it.
    RotateKey {
        #[command(flatten)]
        access: Access,
        /// Only rotate: records sealed under older keys stay until a later rotate-key.
        #[arg(long)]
        no_reseal: bool,
    },
    /// Write a file into the vault from FILE or standard input (`-`, the default).
    Put {
        #[command(flatten)]
        access: Access,
        /// Path inside the vault (`/a/b.txt`); missing directories are made.
        path: String,
        /// Local file to read; `-` for standard input (after the passphrase line when
        /// that comes from standard input too).
        file: Option<PathBuf>,
    },
    /// Write a file of the vault to standard output.
    Get {
        #[command(flatten)]
        access: Access,
        path: String,
        /// As of a version number, a snapshot name, a time (RFC 3339 UTC, `@UNIX`,
        /// or `-10m` for ten minutes ago), or `latest`.
        #[arg(long, allow_hyphen_values = true)]
        at: Option<String>,
    },
    /// List a directory of the vault (default `/`).
    Ls {
        #[command(flatten)]
        access: Access,
        path: Option<String>,
        #[arg(long, allow_hyphen_values = true)]
        at: Option<String>,
    },
    /// Remove a file, a symbolic link or an empty directory (older versions keep it).
    Rm {
        #[command(flatten)]
        access: Access,
        path: String,
    },
    /// The versions of a path: version, time, size (or `removed`), snapshot.
    Versions {
        #[command(flatten)]
        access: Access,
        path: String,
    },
    /// Name the current version (instant, read-only, kept by gc).
    Snapshot {
        #[command(flatten)]
        access: Access,
        name: String,
    },
    /// List snapshots.
    Snapshots {
        #[command(flatten)]
        access: Access,
    },
    /// Write the state of PATH (default: the whole vault) as of --at as a new version.
    Restore {
        #[command(flatten)]
        access: Access,
        path: Option<String>,
        #[arg(long, allow_hyphen_values = true)]
        at: String,
    },
    /// Authenticate every record (both copies with --mirror); exit 4 on damage left.
    Check {
        #[command(flatten)]
        access: Access,
        /// Repair damaged records from the mirror or the parity.
        #[arg(long)]
        repair: bool,
    },
    /// Ship what the backup lacks (incremental), then verify it: to a directory
    /// (--to) or to a backup server on another node (--server and --key-file).
    Backup {
        #[command(flatten)]
        access: Access,
        #[arg(long, required_unless_present = "server", conflicts_with = "server")]
        to: Option<PathBuf>,
        /// A backup server (`host:port`, see `vault backup-serve`), or the servers
        /// registered as NAME in a port switch (`switch://HOST:PORT/NAME`).
        #[arg(long, requires = "key_file")]
        server: Option<String>,
        /// The server's pre-shared key (from `vault backup-key`).
        #[arg(long)]
        key_file: Option<PathBuf>,
    },
    /// Write a new pre-shared key for `backup-serve` and its clients to FILE (mode 0600).
    BackupKey { file: PathBuf },
    /// Keep backups of any number of vaults (ciphertext only: no passphrase needed)
    /// under ROOT, for vaults that ship to it with `backup --server`.
    BackupServe {
        /// The directory the backups live in (`ROOT/<vault id hex>/`).
        root: PathBuf,
        #[arg(long, default_value = "127.0.0.1:7440")]
        listen: String,
        #[arg(long)]
        key_file: PathBuf,
        /// Register in this port switch (`host:port`) as one of the backup servers
        /// named --name, for vaults that look servers up with
        /// `--server switch://SWITCH/NAME`; registered again if the session is lost.
        #[arg(long, requires = "name")]
        switch: Option<String>,
        #[arg(long)]
        name: Option<String>,
        /// The address clients dial (default: the bound address).
        #[arg(long)]
        advertise: Option<String>,
        /// Metrics (/metrics: `vault_backup_server_*`) and health (/health) over HTTP.
        #[arg(long)]
        metrics_listen: Option<SocketAddr>,
    },
    /// Copy a vault's backup from a backup server into DIR (verified by hash); DIR then
    /// opens with the vault's passphrase.
    Pull {
        /// `host:port`, or `switch://HOST:PORT/NAME`.
        #[arg(long)]
        server: String,
        #[arg(long)]
        key_file: PathBuf,
        /// The vault's id (32 hex digits, as `init` and `backup` print it).
        #[arg(long)]
        vault_id: String,
        dir: PathBuf,
    },
    /// Drop old versions (snapshots are kept) and compact segments.
    Gc {
        #[command(flatten)]
        access: Access,
        /// Keep versions committed within this long (`90s`, `15m`, `12h`, `30d`, `2w`).
        #[arg(long)]
        keep_within: Option<String>,
        /// Keep the last N versions.
        #[arg(long)]
        keep_last: Option<u64>,
    },
    /// Mount the vault with FUSE in the foreground until SIGINT or SIGTERM.
    Mount(MountArgs),
    /// Run SQL on a SQLite database kept in the vault (through the vault's SQLite VFS,
    /// no mount needed); rows print one per line, columns separated by `|`.
    Sql {
        #[command(flatten)]
        access: Access,
        /// The database's path inside the vault (`app.db`, `/dir/app.db`); created if
        /// missing.
        db: String,
        /// The SQL (several statements allowed); read from standard input when absent.
        sql: Option<String>,
    },
}

#[derive(Args, Debug)]
struct InitArgs {
    #[command(flatten)]
    access: Access,
    #[arg(long, value_enum, default_value = "aes-256-gcm")]
    cipher: CipherArg,
    /// Plaintext bytes per block: a power of two, 4K..1M (`4K`, `64K`, `1M`, or bytes).
    #[arg(long, default_value = "4K")]
    block_size: String,
    /// Reed-Solomon parity of closed segments: `D+P` (data and parity shards), or
    /// `none`.
    #[arg(long, default_value = "16+2")]
    parity: String,
    /// Argon2id with tiny parameters (64 KiB, 1 pass): for tests only; such a
    /// passphrase falls to a brute-force search far sooner.
    #[arg(long, hide = true)]
    danger_insecure_fast_kdf: bool,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum CipherArg {
    #[value(name = "aes-256-gcm")]
    Aes256Gcm,
    #[value(name = "chacha20-poly1305")]
    ChaCha20Poly1305,
    #[value(name = "sm4-gcm")]
    Sm4Gcm,
}

#[derive(Args, Debug)]
struct MountArgs {
    #[command(flatten)]
    access: Access,
    /// An existing empty directory to mount on.
    mountpoint: PathBuf,
    /// Continuous backup: ship every commit to this directory.
    #[arg(long, conflicts_with = "backup_server")]
    backup: Option<PathBuf>,
    /// Continuous backup to a backup server on another node (`host:port`, or
    /// `switch://HOST:PORT/NAME`; see `vault backup-serve`).
    #[arg(long, requires = "backup_key_file")]
    backup_server: Option<String>,
    /// The backup server's pre-shared key (from `vault backup-key`).
    #[arg(long)]
    backup_key_file: Option<PathBuf>,
    /// Metrics (/metrics) and health (/health) over HTTP.
    #[arg(long)]
    metrics_listen: Option<SocketAddr>,
    /// FUSE worker threads.
    #[arg(long, default_value_t = portswitch_vault_fuse::limits::THREADS_DEFAULT)]
    threads: usize,
    /// Commit uncommitted changes this often, ms.
    #[arg(long, default_value_t = 1000)]
    commit_interval_ms: u64,
    #[arg(long)]
    read_only: bool,
    /// Let other users in (permissions then checked against each file's mode).
    #[arg(long)]
    allow_other: bool,
    /// Use the kernel's writeback cache (faster small writes; fsync and close still
    /// commit).
    #[arg(long)]
    writeback_cache: bool,
    /// With --switch: wait for the port (and the vault's lock) while another process
    /// has it, instead of exiting with code 5.
    #[arg(long, requires = "switch")]
    wait: bool,
    /// With --switch: the session's lease, ms. A mount that stops answering loses the
    /// port this long after (and stops committing before); one that dies loses it at
    /// once.
    #[arg(long, requires = "switch", default_value_t = portswitch_client::LEASE_MS_DEFAULT)]
    lease_ms: u64,
}

/// Why a vault command failed: the message, and the exit code it maps to.
#[derive(Debug, thiserror::Error)]
enum CliError {
    #[error("{dir}: wrong passphrase")]
    WrongPassphrase { dir: String },
    #[error("{dir}: the vault is in use by another process (is it mounted?)")]
    Locked { dir: String },
    #[error("{port} is owned by {node} (session {session:x}, token {token}): another writer has the vault (a mount waits for it with --wait)")]
    PortTaken {
        port: String,
        node: String,
        session: u64,
        token: u64,
    },
    #[error("port switch {addr}: {why}")]
    Switch { addr: String, why: String },
    #[error("{context}: {source}")]
    Vault { context: String, source: VaultError },
    #[error("{0}")]
    Usage(String),
    #[error("{context}: {source}")]
    Io {
        context: String,
        source: std::io::Error,
    },
    #[error("{0}")]
    Mount(#[from] portswitch_vault_fuse::MountError),
    #[error("the vault has damage that was not repaired")]
    Damaged,
    #[error("standard output closed")]
    StdoutClosed,
    #[error("sql: {0}")]
    Sql(String),
}

impl CliError {
    fn exit_code(&self) -> u8 {
        match self {
            CliError::WrongPassphrase { .. } => 3,
            CliError::Damaged => 4,
            CliError::Vault { source, .. } if source.is_corrupt() => 4,
            CliError::Locked { .. } | CliError::PortTaken { .. } => 5,
            CliError::Vault { source, .. } if source.is_fenced() => 7,
            CliError::Mount(portswitch_vault_fuse::MountError::Vault(e)) if e.is_fenced() => 7,
            CliError::Vault {
                source: VaultError::NotFound | VaultError::NoVersion(_),
                ..
            } => 6,
            CliError::Usage(_) => 2,
            _ => 1,
        }
    }
}

type CliResult<T> = Result<T, CliError>;

/// Wraps a vault error with what was being done, picking the typed variants.
fn vault_err(context: impl Into<String>) -> impl FnOnce(VaultError) -> CliError {
    let context = context.into();
    move |source| match source {
        VaultError::WrongPassphrase => CliError::WrongPassphrase { dir: context },
        VaultError::Locked => CliError::Locked { dir: context },
        source => CliError::Vault { context, source },
    }
}

fn io_err(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> CliError {
    let context = context.into();
    move |source| CliError::Io { context, source }
}

fn remote_key(path: &Path) -> CliResult<portswitch_vault_remote::Key> {
    portswitch_vault_remote::Key::read_file(path).map_err(|e| CliError::Usage(e.to_string()))
}

/// The discovery service backup servers named NAME register in
/// (`svc/vault-backup/NAME/<address>`).
fn backup_service(name: &str) -> String {
    format!("vault-backup/{name}")
}

/// A backup server: `host:port`, or `switch://SWITCH_HOST:PORT/NAME` for the servers
/// registered as NAME in the port switch (looked up at each connection, so a backup
/// follows a server that moved).
fn remote_target(spec: &str, key_file: &Path) -> CliResult<portswitch_vault_remote::RemoteTarget> {
    let key = remote_key(key_file)?;
    let Some(rest) = spec.strip_prefix("switch://") else {
        return Ok(portswitch_vault_remote::RemoteTarget::new(spec, key));
    };
    let (switch, name) = rest
        .split_once('/')
        .filter(|(a, n)| !a.is_empty() && !n.is_empty() && !n.contains('/'))
        .ok_or_else(|| {
            CliError::Usage(format!(
                "{}: expected switch://HOST:PORT/NAME",
                crate::ctl::shown(spec)
            ))
        })?;
    let handle = tokio::runtime::Handle::try_current()
        .map_err(|e| CliError::Usage(format!("no runtime for the port switch: {e}")))?;
    let (switch, service) = (switch.to_string(), backup_service(name));
    let resolver: portswitch_vault_remote::Resolver = Box::new(move || {
        let (switch, service) = (switch.clone(), service.clone());
        // On a thread of its own: the caller may be on one of the runtime's (a mount
        // dropped there runs its final backup), where block_on would panic.
        let handle = handle.clone();
        let lookup = move || {
            handle.block_on(async move {
                let err = |e: portswitch_client::Error| {
                    std::io::Error::other(format!("port switch {switch}: {e}"))
                };
                let c = portswitch_client::Client::connect_to(switch.clone())
                    .await
                    .map_err(err)?;
                let found = portswitch_client::Discovery::new(&c, service)
                    .instances()
                    .await
                    .map_err(err);
                let _ = c.close().await;
                Ok(found?
                    .into_iter()
                    .map(|(_, addr)| String::from_utf8_lossy(&addr).into_owned())
                    .collect())
            })
        };
        std::thread::scope(|s| {
            s.spawn(lookup)
                .join()
                .unwrap_or_else(|_| Err(std::io::Error::other("port switch lookup panicked")))
        })
    });
    Ok(portswitch_vault_remote::RemoteTarget::discovered(
        format!(
            "{} in the port switch {}",
            backup_service(name),
            rest.split('/').next().unwrap_or("")
        ),
        resolver,
        key,
    ))
}

fn shown_path(p: &Path) -> String {
    crate::ctl::shown(&p.display().to_string())
}

fn shown_bytes(b: &[u8]) -> String {
    crate::ctl::shown(&String::from_utf8_lossy(b))
}

pub async fn run(args: VaultArgs) -> AppResult {
    let result = match args.command {
        VaultCommand::Mount(m) => mount(m).await,
        command => tokio::task::spawn_blocking(move || run_blocking(command))
            .await
            .map_err(|e| CliError::Usage(format!("vault command panicked: {e}")))
            .and_then(|r| r),
    };
    match result {
        Ok(code) => Ok(code),
        Err(CliError::StdoutClosed) => Err(Box::new(crate::ctl::StdoutClosed)),
        Err(e) => {
            crate::ctl::note(&format!("error: {e}"));
            Ok(ExitCode::from(e.exit_code()))
        }
    }
}

fn run_blocking(command: VaultCommand) -> CliResult<ExitCode> {
    match command {
        VaultCommand::Init(a) => init(a),
        VaultCommand::Passwd {
            access,
            new_passphrase_file,
        } => {
            let old = passphrase(&access, "passphrase")?;
            let vault = open_with(&access, &old)?;
            let new = match new_passphrase_file {
                Some(f) => passphrase_from_file(&f)?,
                None => match std::env::var_os(NEW_PASSPHRASE_ENV) {
                    Some(v) => nonempty(v.into_encoded_bytes(), NEW_PASSPHRASE_ENV)?,
                    None => new_passphrase_from_stdin()?,
                },
            };
            vault
                .change_passphrase(&old, &new)
                .map_err(vault_err("changing the passphrase"))?;
            close(vault)?;
            eprintln!("passphrase changed");
            Ok(ExitCode::SUCCESS)
        }
        VaultCommand::RotateKey { access, no_reseal } => {
            let vault = open(&access)?;
            let key = vault.rotate_key().map_err(vault_err("rotating the key"))?;
            println!("data key {key} is active");
            if !no_reseal {
                let r = vault.reseal().map_err(vault_err("re-sealing"))?;
                println!(
                    "re-sealed {} records, dropped {} old keys, deleted {} segments",
                    r.records_resealed, r.keys_dropped, r.segments_deleted
                );
            }
            close(vault)?;
            Ok(ExitCode::SUCCESS)
        }
        VaultCommand::Put { access, path, file } => put(access, path, file),
        VaultCommand::Get { access, path, at } => {
            let vault = open_read_only(&access)?;
            let data = match at {
                None => vault.read_file(&path),
                Some(spec) => vault
                    .at(parse_spec(&spec)?)
                    .and_then(|view| view.read_file(&path)),
            }
            .map_err(vault_err(format!("reading {}", crate::ctl::shown(&path))))?;
            write_stdout(&data)?;
            Ok(ExitCode::SUCCESS)
        }
        VaultCommand::Ls { access, path, at } => ls(access, path, at),
        VaultCommand::Rm { access, path } => {
            let vault = open(&access)?;
            vault
                .remove(&path)
                .map_err(vault_err(format!("removing {}", crate::ctl::shown(&path))))?;
            let version = vault.commit().map_err(vault_err("committing"))?;
            close(vault)?;
            println!("version {version}");
            Ok(ExitCode::SUCCESS)
        }
        VaultCommand::Versions { access, path } => {
            let vault = open_read_only(&access)?;
            let versions = vault.versions(&path).map_err(vault_err(format!(
                "versions of {}",
                crate::ctl::shown(&path)
            )))?;
            let mut out = String::new();
            for v in versions {
                let size = v.size.map_or("removed".to_string(), |s| s.to_string());
                let snap = v
                    .snapshot
                    .map(|s| format!(" snapshot={}", crate::ctl::shown(&s)))
                    .unwrap_or_default();
                // The fencing token of the writer that made it (mount --switch).
                let token = match v.writer_token {
                    0 => String::new(),
                    t => format!(" token={t}"),
                };
                out.push_str(&format!(
                    "{} {} {}{}{}\n",
                    v.version,
                    fmt_time(v.time),
                    size,
                    token,
                    snap
                ));
            }
            write_stdout(out.as_bytes())?;
            Ok(ExitCode::SUCCESS)
        }
        VaultCommand::Snapshot { access, name } => {
            let vault = open(&access)?;
            let version = vault
                .snapshot(&name)
                .map_err(vault_err(format!("snapshot {}", crate::ctl::shown(&name))))?;
            close(vault)?;
            println!("snapshot {} = version {version}", crate::ctl::shown(&name));
            Ok(ExitCode::SUCCESS)
        }
        VaultCommand::Snapshots { access } => {
            let vault = open_read_only(&access)?;
            let snaps = vault.snapshots().map_err(vault_err("listing snapshots"))?;
            let mut out = String::new();
            for s in snaps {
                out.push_str(&format!(
                    "{} {} {}\n",
                    crate::ctl::shown(&s.name),
                    s.version,
                    fmt_time(s.time)
                ));
            }
            write_stdout(out.as_bytes())?;
            Ok(ExitCode::SUCCESS)
        }
        VaultCommand::Restore { access, path, at } => {
            let spec = parse_spec(&at)?;
            let vault = open(&access)?;
            let version = match &path {
                Some(p) => vault.restore(p, spec),
                None => vault.restore_all(spec),
            }
            .map_err(vault_err(format!(
                "restoring {} as of {}",
                crate::ctl::shown(path.as_deref().unwrap_or("the vault")),
                crate::ctl::shown(&at)
            )))?;
            close(vault)?;
            println!("version {version}");
            Ok(ExitCode::SUCCESS)
        }
        VaultCommand::Check { access, repair } => check(access, repair),
        VaultCommand::Backup {
            access,
            to,
            server,
            key_file,
        } => {
            let vault = open(&access)?;
            let r = match (to, server, key_file) {
                (Some(to), _, _) => vault
                    .backup_to(&to)
                    .map_err(vault_err(format!("backup to {}", shown_path(&to))))?,
                (None, Some(server), Some(key_file)) => {
                    let mut t = remote_target(&server, &key_file)?;
                    vault.backup_to_target(&mut t).map_err(vault_err(format!(
                        "backup to the server {}",
                        crate::ctl::shown(&server)
                    )))?
                }
                _ => {
                    return Err(CliError::Usage(
                        "--to DIR or --server ADDR --key-file FILE".into(),
                    ))
                }
            };
            let vault_id = vault.vault_id();
            close(vault)?;
            println!(
                "shipped {} bytes ({} segments{}), verified {} bytes, removed {} segments; the backup holds version {} of vault {}",
                r.bytes_shipped,
                r.segments_shipped,
                if r.header_shipped { ", header" } else { "" },
                r.bytes_verified,
                r.segments_removed,
                r.version,
                portswitch_vault_remote::hex(&vault_id)
            );
            Ok(ExitCode::SUCCESS)
        }
        VaultCommand::Gc {
            access,
            keep_within,
            keep_last,
        } => {
            let retention = Retention {
                keep_last,
                keep_within: keep_within.as_deref().map(parse_duration).transpose()?,
            };
            let vault = open(&access)?;
            let r = vault.gc(retention).map_err(vault_err("gc"))?;
            close(vault)?;
            println!(
                "horizon version {}: dropped {} versions, deleted {} segments, copied {} records ({} bytes), freed {} bytes",
                r.horizon,
                r.versions_dropped,
                r.segments_deleted,
                r.records_copied,
                r.bytes_copied,
                r.bytes_freed
            );
            Ok(ExitCode::SUCCESS)
        }
        VaultCommand::Sql { access, db, sql } => sql_command(access, db, sql),
        VaultCommand::BackupKey { file } => {
            use std::io::Write;
            use std::os::unix::fs::OpenOptionsExt;
            let key = portswitch_vault_remote::Key::generate();
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&file)
                .map_err(io_err(format!("creating {}", shown_path(&file))))?;
            writeln!(f, "{}", key.to_hex())
                .and_then(|()| f.sync_all())
                .map_err(io_err(format!("writing {}", shown_path(&file))))?;
            println!("wrote a new backup key to {}", shown_path(&file));
            Ok(ExitCode::SUCCESS)
        }
        VaultCommand::BackupServe {
            root,
            listen,
            key_file,
            switch,
            name,
            advertise,
            metrics_listen,
        } => {
            let key = remote_key(&key_file)?;
            let server =
                portswitch_vault_remote::Server::bind(&listen, &root, key).map_err(|e| {
                    CliError::Usage(format!(
                        "backup server on {}: {e}",
                        crate::ctl::shown(&listen)
                    ))
                })?;
            let addr = server
                .local_addr()
                .map_err(|e| CliError::Usage(format!("backup server: {e}")))?;
            println!(
                "backup server listening on {addr}, backups under {}",
                shown_path(&root)
            );
            if let Some(m) = metrics_listen {
                let mut registry = prometheus_client::registry::Registry::default();
                server
                    .stats
                    .register(registry.sub_registry_with_prefix("vault_backup_server"));
                let bound = tokio::runtime::Handle::current()
                    .block_on(serve_metrics(m, Arc::new(registry)))
                    .map_err(io_err(format!("metrics on {m}")))?;
                println!("metrics on http://{bound}/metrics");
            }
            if let (Some(switch), Some(name)) = (switch, name) {
                if advertise.is_none() && addr.ip().is_unspecified() {
                    return Err(CliError::Usage(format!(
                        "listening on {addr}: give --advertise HOST:PORT, the address clients dial"
                    )));
                }
                let advertise = advertise.unwrap_or_else(|| addr.to_string());
                tokio::runtime::Handle::current().spawn(keep_backup_server_registered(
                    switch,
                    backup_service(&name),
                    advertise,
                ));
            }
            server
                .run()
                .map_err(|e| CliError::Usage(format!("backup server: {e}")))?;
            Ok(ExitCode::SUCCESS)
        }
        VaultCommand::Pull {
            server,
            key_file,
            vault_id,
            dir,
        } => {
            let t = remote_target(&server, &key_file)?;
            let id = portswitch_vault_remote::parse_vault_id(&vault_id)
                .map_err(|e| CliError::Usage(e.to_string()))?;
            let n = portswitch_vault_remote::pull_from(t, &id, &dir).map_err(vault_err(
                format!("pulling from {}", crate::ctl::shown(&server)),
            ))?;
            println!("pulled {n} bytes into {}, verified", shown_path(&dir));
            Ok(ExitCode::SUCCESS)
        }
        VaultCommand::Mount(_) => unreachable!("mount runs on the async runtime"),
    }
}

fn init(a: InitArgs) -> CliResult<ExitCode> {
    let block_bytes = parse_size(&a.block_size)?;
    let lim = portswitch_vault::limits::BLOCK_BYTES_MIN..=portswitch_vault::limits::BLOCK_BYTES_MAX;
    if !block_bytes.is_power_of_two() || !lim.contains(&block_bytes) {
        return Err(CliError::Usage(
            "--block-size must be a power of two within 4K..1M".into(),
        ));
    }
    let parity = parse_parity(&a.parity)?;
    let pass = passphrase(&a.access, "new passphrase")?;
    let cipher = match a.cipher {
        CipherArg::Aes256Gcm => Cipher::Aes256Gcm,
        CipherArg::ChaCha20Poly1305 => Cipher::ChaCha20Poly1305,
        CipherArg::Sm4Gcm => Cipher::Sm4Gcm,
    };
    let opts = CreateOptions {
        cipher,
        block_bytes,
        parity,
        kdf: if a.danger_insecure_fast_kdf {
            KdfParams::danger_insecure_fast()
        } else {
            KdfParams::default()
        },
        open: open_options(&a.access),
        ..CreateOptions::default()
    };
    let dir = &a.access.dir;
    let vault = Vault::create(dir, &pass, opts).map_err(vault_err(shown_path(dir)))?;
    let id: String = vault
        .vault_id()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    close(vault)?;
    println!(
        "created vault {} (id {id}, {}, {} byte blocks, parity {})",
        shown_path(dir),
        a.cipher
            .to_possible_value()
            .map_or(String::new(), |v| v.get_name().to_string()),
        block_bytes,
        parity.map_or("none".to_string(), |p| format!(
            "{}+{}",
            p.data_shards, p.parity_shards
        ))
    );
    Ok(ExitCode::SUCCESS)
}

fn put(access: Access, path: String, file: Option<PathBuf>) -> CliResult<ExitCode> {
    // The passphrase first: it may be the first line of the same standard input.
    let pass = passphrase(&access, "passphrase")?;
    let mut data = Vec::new();
    match file.as_deref() {
        None => read_limited(std::io::stdin().lock(), &mut data, "standard input")?,
        Some(p) if p == Path::new("-") => {
            read_limited(std::io::stdin().lock(), &mut data, "standard input")?
        }
        Some(p) => {
            let f = std::fs::File::open(p).map_err(io_err(shown_path(p)))?;
            read_limited(f, &mut data, &shown_path(p))?
        }
    }
    let vault = open_with(&access, &pass)?;
    let shown = crate::ctl::shown(&path);
    if let Some((parent, _)) = path.trim_end_matches('/').rsplit_once('/') {
        if !parent.is_empty() {
            vault
                .mkdir_all(parent)
                .map_err(vault_err(format!("making the directories of {shown}")))?;
        }
    }
    vault
        .write_file(&path, &data)
        .map_err(vault_err(format!("writing {shown}")))?;
    let version = vault.commit().map_err(vault_err("committing"))?;
    close(vault)?;
    println!("version {version}");
    Ok(ExitCode::SUCCESS)
}

fn read_limited(r: impl Read, data: &mut Vec<u8>, what: &str) -> CliResult<()> {
    r.take(PUT_BYTES_MAX + 1)
        .read_to_end(data)
        .map_err(io_err(what))?;
    if data.len() as u64 > PUT_BYTES_MAX {
        return Err(CliError::Usage(format!(
            "{what}: larger than {PUT_BYTES_MAX} bytes; copy it through a mount instead"
        )));
    }
    Ok(())
}

fn ls(access: Access, path: Option<String>, at: Option<String>) -> CliResult<ExitCode> {
    let vault = open_read_only(&access)?;
    let path = path.unwrap_or_else(|| "/".into());
    let shown = crate::ctl::shown(&path);
    // The same listing from the head or from a view of an older version.
    let view = at
        .map(|s| parse_spec(&s))
        .transpose()?
        .map(|spec| vault.at(spec))
        .transpose()
        .map_err(vault_err("opening the version"))?;
    let (attr, entries) = match &view {
        Some(v) => {
            let a = v.resolve(&path);
            (a, v.list(&path))
        }
        None => (vault.resolve(&path), vault.list(&path)),
    };
    let attr = attr.map_err(vault_err(format!("listing {shown}")))?;
    let getattr = |ino| match &view {
        Some(v) => v.getattr(ino),
        None => vault.getattr(ino),
    };
    let readlink = |ino| match &view {
        Some(v) => v.readlink(ino),
        None => vault.readlink(ino),
    };
    let mut out = String::new();
    let mut line = |a: &Attr, name: &[u8]| {
        let target = match a.kind {
            FileKind::Symlink => readlink(a.ino)
                .map(|t| format!(" -> {}", shown_bytes(&t)))
                .unwrap_or_default(),
            _ => String::new(),
        };
        out.push_str(&format!(
            "{}{:04o} {:>12} {} {}{}\n",
            match a.kind {
                FileKind::Dir => 'd',
                FileKind::File => '-',
                FileKind::Symlink => 'l',
            },
            a.mode & 0o7777,
            a.size,
            fmt_time(a.mtime),
            shown_bytes(name),
            target
        ));
    };
    if attr.kind == FileKind::Dir {
        let mut entries = entries.map_err(vault_err(format!("listing {shown}")))?;
        entries.sort_by(|a, b| a.name.cmp(&b.name));
        for e in entries {
            let a =
                getattr(e.ino).map_err(vault_err(format!("{shown}/{}", shown_bytes(&e.name))))?;
            line(&a, &e.name);
        }
    } else {
        line(&attr, path.as_bytes());
    }
    write_stdout(out.as_bytes())?;
    Ok(ExitCode::SUCCESS)
}

fn check(access: Access, repair: bool) -> CliResult<ExitCode> {
    // A check that repairs writes; one that only reports can run beside a mount.
    let vault = if repair {
        open(&access)?
    } else {
        open_read_only(&access)?
    };
    let r = vault.check(repair).map_err(vault_err("check"))?;
    let mut out = format!(
        "{} segments, {} records ({} blocks, {} commits), {} bytes, {} live blocks; parity files checked: {}; mirror checked: {}\n",
        r.segments,
        r.records,
        r.blocks,
        r.commits,
        r.bytes,
        r.live_blocks,
        r.parity_checked,
        if r.mirror_checked { "yes" } else { "no" }
    );
    if r.torn_tail_bytes > 0 {
        // What a crash left after the last commit: not damage.
        out.push_str(&format!(
            "torn tail: {} bytes after the last commit, cut at the next writable open\n",
            r.torn_tail_bytes
        ));
    }
    for d in &r.damaged {
        out.push_str(&format!(
            "damaged {} in segment {} at offset {} ({} copy): {}\n",
            d.what,
            d.segment,
            d.offset,
            d.copy,
            if d.repaired {
                "repaired"
            } else {
                "NOT repaired"
            }
        ));
    }
    out.push_str(&format!(
        "{} damaged, {} repaired, {} not repaired\n",
        r.damaged.len(),
        r.repaired,
        r.unrepaired
    ));
    write_stdout(out.as_bytes())?;
    close(vault)?;
    if r.is_clean() {
        Ok(ExitCode::SUCCESS)
    } else {
        Err(CliError::Damaged)
    }
}

fn sql_command(access: Access, db: String, sql: Option<String>) -> CliResult<ExitCode> {
    let pass = passphrase(&access, "passphrase")?;
    let sql = match sql {
        Some(s) => s,
        None => {
            let mut s = String::new();
            std::io::stdin()
                .lock()
                .take(PUT_BYTES_MAX)
                .read_to_string(&mut s)
                .map_err(io_err("reading SQL from standard input"))?;
            s
        }
    };
    let vault = open_with(&access, &pass)?;
    let shown_db = crate::ctl::shown(&db);
    let sql_err = |e: rusqlite::Error| CliError::Sql(format!("{shown_db}: {e}"));
    let conn = portswitch_vault_sqlite::open(&vault, &db).map_err(|e| match e {
        portswitch_vault_sqlite::OpenError::Sqlite(e) => sql_err(e),
        e => CliError::Sql(format!("{shown_db}: {e}")),
    })?;
    let mut out = String::new();
    let result = (|| -> rusqlite::Result<()> {
        use rusqlite::fallible_iterator::FallibleIterator;
        let mut batch = rusqlite::Batch::new(&conn, &sql);
        while let Some(mut stmt) = batch.next()? {
            let columns = stmt.column_count();
            if columns == 0 {
                stmt.execute([])?;
                continue;
            }
            let mut rows = stmt.raw_query();
            while let Some(row) = rows.next()? {
                for i in 0..columns {
                    if i > 0 {
                        out.push('|');
                    }
                    out.push_str(&sql_value(row.get_ref(i)?));
                }
                out.push('\n');
            }
        }
        Ok(())
    })();
    // Rows printed so far are shown even when a later statement fails.
    let shown = write_stdout(out.as_bytes());
    let closed = conn.close().map_err(|(_, e)| sql_err(e));
    let _ = portswitch_vault_sqlite::unregister(&portswitch_vault_sqlite::vfs_name(&vault));
    result.map_err(sql_err)?;
    shown?;
    closed?;
    close(vault)?;
    Ok(ExitCode::SUCCESS)
}

fn sql_value(v: rusqlite::types::ValueRef<'_>) -> String {
    use rusqlite::types::ValueRef;
    match v {
        ValueRef::Null => "NULL".into(),
        ValueRef::Integer(i) => i.to_string(),
        ValueRef::Real(f) => f.to_string(),
        ValueRef::Text(t) => shown_bytes(t),
        ValueRef::Blob(b) => {
            let hex: String = b.iter().map(|x| format!("{x:02x}")).collect();
            format!("x'{hex}'")
        }
    }
}

async fn mount(a: MountArgs) -> CliResult<ExitCode> {
    if a.commit_interval_ms < 10 {
        return Err(CliError::Usage(
            "--commit-interval-ms must be at least 10".into(),
        ));
    }
    let opts = portswitch_vault_fuse::MountOptions {
        threads: a.threads,
        commit_interval: Duration::from_millis(a.commit_interval_ms),
        read_only: a.read_only,
        allow_other: a.allow_other,
        writeback_cache: a.writeback_cache,
        backup: match (&a.backup, &a.backup_server, &a.backup_key_file) {
            (Some(dir), _, _) => Some(portswitch_vault_fuse::BackupTo::Dir(dir.clone())),
            (None, Some(server), Some(key)) => Some(portswitch_vault_fuse::BackupTo::target(
                remote_target(server, key)?,
            )),
            _ => None,
        },
        fsname: format!("portswitch-vault:{}", a.access.dir.display()),
        ..portswitch_vault_fuse::MountOptions::default()
    };
    // The passphrase first: a mount that waits for its port does not prompt later.
    let pass = {
        let access = a.access.clone();
        tokio::task::spawn_blocking(move || passphrase(&access, "passphrase"))
            .await
            .map_err(|e| CliError::Usage(format!("passphrase panicked: {e}")))??
    };
    if a.read_only && a.access.switch.is_some() {
        return Err(CliError::Usage(
            "--switch is for writers: a --read-only mount takes no port".into(),
        ));
    }
    let claim = match &a.access.switch {
        Some(addr) => {
            match claim_port(&a.access.dir, addr, a.lease_ms, a.wait, "vault mount").await? {
                Some(c) => Some(c),
                None => return Ok(ExitCode::from(130)), // interrupted while waiting
            }
        }
        None => None,
    };
    let open_opts = OpenOptions {
        read_only: a.read_only,
        fence: claim.as_ref().map(|c| c.fence.clone()),
        ..open_options(&a.access)
    };
    let Some(vault) = open_for_mount(&a, &pass, open_opts).await? else {
        return Ok(ExitCode::from(130));
    };
    let mountpoint = a.mountpoint.clone();
    let mounted =
        tokio::task::spawn_blocking(move || portswitch_vault_fuse::mount(vault, &mountpoint, opts))
            .await
            .map_err(|e| CliError::Usage(format!("mount panicked: {e}")))??;
    println!(
        "mounted {} on {}",
        shown_path(&a.access.dir),
        shown_path(mounted.mountpoint())
    );
    let _ = std::io::stdout().flush();
    if let Some(addr) = a.metrics_listen {
        let mut registry = mounted.vault().metrics_registry();
        mounted.metrics().register(&mut registry);
        let bound = serve_metrics(addr, Arc::new(registry))
            .await
            .map_err(io_err(format!("--metrics-listen {addr}")))?;
        eprintln!("vault mount: metrics on http://{bound}/metrics");
    }
    // Until a signal, an unmount from outside (`fusermount3 -u`), or the loss of the
    // port (the fence is revoked by then: nothing more is committed).
    let mut tick = tokio::time::interval(Duration::from_millis(200));
    let signal = crate::serve::shutdown_signal();
    tokio::pin!(signal);
    let mut lost = claim.as_ref().map(|c| c.lost.clone());
    let port_lost = async {
        match lost.as_mut() {
            Some(rx) => {
                let _ = rx.wait_for(|l| *l).await;
            }
            None => std::future::pending::<()>().await,
        }
    };
    tokio::pin!(port_lost);
    let mut was_lost = false;
    loop {
        tokio::select! {
            _ = &mut signal => break,
            _ = &mut port_lost => { was_lost = true; break }
            _ = tick.tick() => if mounted.is_finished() { break },
        }
    }
    eprintln!(
        "vault mount: unmounting {}",
        shown_path(mounted.mountpoint())
    );
    let unmounted = tokio::task::spawn_blocking(move || mounted.unmount())
        .await
        .map_err(|e| CliError::Usage(format!("unmount panicked: {e}")))?;
    let fence = claim.as_ref().map(|c| c.fence.clone());
    if let Some(c) = claim {
        // The port goes only now, after the last commit: the next writer cannot
        // start before this one has finished.
        c.watcher.abort();
        let _ = c.client.close().await;
    }
    if was_lost {
        // What was committed while the port was held stays; later changes were
        // refused (the final sync of the unmount among them).
        drop(unmounted);
        let source = fence
            .and_then(|f| f.check().err())
            .expect("a lost port revokes the fence first");
        return Err(CliError::Vault {
            context: "vault mount".into(),
            source,
        });
    }
    unmounted?;
    eprintln!("vault mount: unmounted; everything written is committed and durable");
    Ok(ExitCode::SUCCESS)
}

/// The port a `mount --switch` owns, and what watches it.
struct Claim {
    client: portswitch_client::Client,
    fence: portswitch_vault::Fence,
    /// Turns true when the port is lost (after the fence was revoked).
    lost: tokio::sync::watch::Receiver<bool>,
    watcher: tokio::task::JoinHandle<()>,
}

/// Owns the vault's port (`vault/<id hex>`): at once, or after waiting in its queue
/// with `--wait`. `None`: interrupted while waiting.
async fn claim_port(
    dir: &Path,
    addr: &str,
    lease_ms: u64,
    wait: bool,
    who: &'static str,
) -> CliResult<Option<Claim>> {
    use portswitch_client::{Client, ClientOptions, Lock};
    let vault_id =
        portswitch_vault::fencing::vault_id_of(dir).map_err(vault_err(shown_path(dir)))?;
    let port = portswitch_vault::fencing::port_name(&vault_id);
    let switch_err = |e: portswitch_client::Error| CliError::Switch {
        addr: addr.to_string(),
        why: e.to_string(),
    };
    let mut opts = ClientOptions::new(addr.to_string());
    opts.lease = Duration::from_millis(lease_ms);
    // A mount that dies (kill -9, a crash) closes its connection: the port goes to the
    // next writer at once rather than after a lease. One that hangs loses it after the
    // lease, and its own view of the lease revokes its fence before that.
    opts.end_on_disconnect = true;
    let client = Client::connect(opts).await.map_err(switch_err)?;
    let lock = match Lock::try_acquire(&client, &port)
        .await
        .map_err(switch_err)?
    {
        Some(lock) => lock,
        None => {
            let owner = client.query(&port).await.map_err(switch_err)?;
            let (node, session, token) = owner
                .map(|o| (shown_bytes(&o.node), o.session, o.token))
                .unwrap_or_default();
            if !wait {
                let _ = client.close().await;
                return Err(CliError::PortTaken {
                    port,
                    node,
                    session,
                    token,
                });
            }
            eprintln!("{who}: {port} is owned by {node} (token {token}); waiting for it");
            tokio::select! {
                l = Lock::acquire(&client, &port) => l.map_err(switch_err)?,
                _ = crate::serve::shutdown_signal() => {
                    let _ = client.close().await;
                    return Ok(None);
                }
            }
        }
    };
    let token = lock.token();
    eprintln!("{who}: owns {port} with token {token}");
    let fence = portswitch_vault::Fence::new(token);
    let (tx, lost) = tokio::sync::watch::channel(false);
    let watcher = {
        let fence = fence.clone();
        tokio::spawn(async move {
            lock.lost().await;
            // First the fence (no commit from now on), then the news.
            fence.revoke(&format!("lost {port}"));
            eprintln!(
                "{who}: lost {port} (token {token}): no more commits; another writer may own the vault"
            );
            let _ = tx.send(true);
        })
    };
    Ok(Some(Claim {
        client,
        fence,
        lost,
        watcher,
    }))
}

/// Opens the vault to mount; with `--wait`, retries while another process holds its
/// lock (a writer that lost the port and is still finishing). `None`: interrupted.
async fn open_for_mount(a: &MountArgs, pass: &[u8], o: OpenOptions) -> CliResult<Option<Vault>> {
    let mut said = false;
    loop {
        let (dir, pass, o2) = (a.access.dir.clone(), pass.to_vec(), o.clone());
        let r = tokio::task::spawn_blocking(move || Vault::open(&dir, &pass, o2))
            .await
            .map_err(|e| CliError::Usage(format!("open panicked: {e}")))?;
        match r {
            Err(VaultError::Locked) if a.wait => {
                if !said {
                    eprintln!("vault mount: the vault is locked by another process; waiting");
                    said = true;
                }
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_millis(250)) => {}
                    _ = crate::serve::shutdown_signal() => return Ok(None),
                }
            }
            r => {
                let v = r.map_err(vault_err(shown_path(&a.access.dir)))?;
                let fallback = a.backup_server.as_deref().zip(a.backup_key_file.as_deref());
                set_repair_server(&a.access, &v, fallback)?;
                return Ok(Some(v));
            }
        }
    }
}

/// Serves `/metrics` (the vault's and the mount's counters) and `/health`; returns the
/// bound address.
async fn serve_metrics(
    addr: SocketAddr,
    registry: Arc<prometheus_client::registry::Registry>,
) -> std::io::Result<SocketAddr> {
    let l = tokio::net::TcpListener::bind(addr).await?;
    let bound = l.local_addr()?;
    let app = axum::Router::new()
        .route(
            "/metrics",
            axum::routing::get(move || {
                let r = registry.clone();
                async move {
                    let mut body = String::new();
                    let _ = prometheus_client::encoding::text::encode(&mut body, &r);
                    (
                        [(
                            "content-type",
                            "application/openmetrics-text; version=1.0.0; charset=utf-8",
                        )],
                        body,
                    )
                }
            }),
        )
        .route("/health", axum::routing::get(|| async { "ok\n" }));
    tokio::spawn(async move {
        let _ = axum::serve(l, app).await;
    });
    Ok(bound)
}

// ---- opening ----

fn open_options(a: &Access) -> OpenOptions {
    OpenOptions {
        mirror: a.mirror.clone(),
        cache_bytes: a.cache_mib.saturating_mul(1 << 20),
        ..OpenOptions::default()
    }
}

fn open(a: &Access) -> CliResult<Vault> {
    let pass = passphrase(a, "passphrase")?;
    open_with(a, &pass)
}

/// Ports owned by this command (`--switch`), held until the process ends: its
/// connection closes then, and the port goes to the next writer at once.
static HELD_PORTS: std::sync::Mutex<Vec<Claim>> = std::sync::Mutex::new(Vec::new());

fn open_with(a: &Access, pass: &[u8]) -> CliResult<Vault> {
    let mut opts = open_options(a);
    if let Some(addr) = &a.switch {
        let handle = tokio::runtime::Handle::try_current()
            .map_err(|e| CliError::Usage(format!("no runtime for the port switch: {e}")))?;
        let claim = handle
            .block_on(claim_port(
                &a.dir,
                addr,
                portswitch_client::LEASE_MS_DEFAULT,
                false,
                "vault",
            ))?
            .ok_or_else(|| CliError::Usage("interrupted".into()))?;
        opts.fence = Some(claim.fence.clone());
        HELD_PORTS
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(claim);
    }
    let v = Vault::open(&a.dir, pass, opts).map_err(vault_err(shown_path(&a.dir)))?;
    set_repair_server(a, &v, None)?;
    Ok(v)
}

/// Keeps this backup server registered in the port switch's discovery service while
/// the process lives: after a lost session, connects and registers again (backing off
/// up to 5 s between failed attempts).
async fn keep_backup_server_registered(switch: String, service: String, advertise: String) {
    let mut backoff = Duration::from_millis(100);
    loop {
        let c = match portswitch_client::Client::connect_to(switch.clone()).await {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(switch = %switch, error = %e, "backup server: port switch unreachable");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(5));
                continue;
            }
        };
        match portswitch_client::Discovery::new(&c, service.clone())
            .register(&advertise, advertise.as_bytes())
            .await
        {
            Ok(token) => {
                backoff = Duration::from_millis(100);
                eprintln!("backup server: registered as {service}/{advertise} (token {token})");
                c.lost().await;
                tracing::warn!("backup server: port switch session lost; registering again");
            }
            Err(e) => {
                tracing::warn!(error = %e, "backup server: registration failed");
                let _ = c.close().await;
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
        }
    }
}

/// Names the copy on another node to repair from: `--repair-server`, else `fallback`
/// (the mount's backup server).
fn set_repair_server(a: &Access, v: &Vault, fallback: Option<(&str, &Path)>) -> CliResult<()> {
    let server = match (&a.repair_server, &a.repair_key_file) {
        (Some(s), Some(k)) => Some((s.as_str(), k.as_path())),
        _ => fallback,
    };
    if let Some((server, key)) = server {
        v.set_remote_copy(Some(Box::new(remote_target(server, key)?)));
    }
    Ok(())
}

/// Reads without taking the vault's write lock (so it works beside a mount).
fn open_read_only(a: &Access) -> CliResult<Vault> {
    let pass = passphrase(a, "passphrase")?;
    let opts = OpenOptions {
        read_only: true,
        ..open_options(a)
    };
    let v = Vault::open(&a.dir, &pass, opts).map_err(vault_err(shown_path(&a.dir)))?;
    set_repair_server(a, &v, None)?;
    Ok(v)
}

/// Commits, syncs and closes, reporting a failure (a `Drop` would only log it).
fn close(vault: Vault) -> CliResult<()> {
    vault.close().map_err(vault_err("closing the vault"))
}

// ---- passphrases ----

fn passphrase(a: &Access, prompt: &str) -> CliResult<Vec<u8>> {
    if let Some(f) = &a.passphrase_file {
        return passphrase_from_file(f);
    }
    if let Some(v) = std::env::var_os(PASSPHRASE_ENV) {
        return nonempty(v.into_encoded_bytes(), PASSPHRASE_ENV);
    }
    stdin_line(prompt)
}

fn passphrase_from_file(f: &Path) -> CliResult<Vec<u8>> {
    let file = std::fs::File::open(f).map_err(io_err(shown_path(f)))?;
    let mut line = Vec::new();
    std::io::BufReader::new(file.take(PASSPHRASE_BYTES_MAX as u64 + 1))
        .read_until(b'\n', &mut line)
        .map_err(io_err(shown_path(f)))?;
    nonempty(trim_line(line)?, &shown_path(f))
}

fn new_passphrase_from_stdin() -> CliResult<Vec<u8>> {
    let new = stdin_line("new passphrase")?;
    if std::io::IsTerminal::is_terminal(&std::io::stdin()) {
        let again = stdin_line("new passphrase again")?;
        if again != new {
            return Err(CliError::Usage("the passphrases differ".into()));
        }
    }
    Ok(new)
}

/// One line of standard input; on a terminal, prompted for on stderr and not echoed.
fn stdin_line(prompt: &str) -> CliResult<Vec<u8>> {
    let stdin = std::io::stdin();
    let tty = std::io::IsTerminal::is_terminal(&stdin);
    let _echo_off = if tty {
        eprint!("{prompt}: ");
        let _ = std::io::stderr().flush();
        EchoOff::new()
    } else {
        None
    };
    let mut line = Vec::new();
    stdin
        .lock()
        .take(PASSPHRASE_BYTES_MAX as u64 + 1)
        .read_until(b'\n', &mut line)
        .map_err(io_err("reading the passphrase from standard input"))?;
    if tty {
        eprintln!();
    }
    if line.is_empty() {
        return Err(CliError::Usage(format!(
            "no passphrase: give --passphrase-file, set {PASSPHRASE_ENV}, or write it on standard input"
        )));
    }
    nonempty(trim_line(line)?, "standard input")
}

fn trim_line(mut line: Vec<u8>) -> CliResult<Vec<u8>> {
    if line.len() > PASSPHRASE_BYTES_MAX {
        return Err(CliError::Usage(format!(
            "passphrase longer than {PASSPHRASE_BYTES_MAX} bytes"
        )));
    }
    if line.last() == Some(&b'\n') {
        line.pop();
        if line.last() == Some(&b'\r') {
            line.pop();
        }
    }
    Ok(line)
}

fn nonempty(p: Vec<u8>, from: &str) -> CliResult<Vec<u8>> {
    if p.is_empty() {
        return Err(CliError::Usage(format!("empty passphrase from {from}")));
    }
    Ok(p)
}

/// Turns terminal echo off while alive.
struct EchoOff {
    saved: nix::sys::termios::Termios,
}

impl EchoOff {
    fn new() -> Option<EchoOff> {
        use nix::sys::termios::{tcgetattr, tcsetattr, LocalFlags, SetArg};
        let stdin = std::io::stdin();
        let saved = tcgetattr(&stdin).ok()?;
        let mut quiet = saved.clone();
        quiet.local_flags.remove(LocalFlags::ECHO);
        tcsetattr(&stdin, SetArg::TCSANOW, &quiet).ok()?;
        Some(EchoOff { saved })
    }
}

impl Drop for EchoOff {
    fn drop(&mut self) {
        let _ = nix::sys::termios::tcsetattr(
            std::io::stdin(),
            nix::sys::termios::SetArg::TCSANOW,
            &self.saved,
        );
    }
}

// ---- output ----

fn write_stdout(b: &[u8]) -> CliResult<()> {
    let mut out = std::io::stdout().lock();
    match out.write_all(b).and_then(|()| out.flush()) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Err(CliError::StdoutClosed),
        Err(e) => Err(CliError::Io {
            context: "standard output".into(),
            source: e,
        }),
    }
}

// ---- parsing ----

/// `--at`: `latest`, a version number, `snapshot:NAME` or a snapshot name, a time
/// (`2026-12-07T15:20:00Z`, `2026-12-07`, `@1765120800`, `-10m`).
fn parse_spec(s: &str) -> CliResult<VersionSpec> {
    if s == "latest" || s == "head" {
        return Ok(VersionSpec::Latest);
    }
    if let Some(name) = s.strip_prefix("snapshot:") {
        return Ok(VersionSpec::Snapshot(name.to_string()));
    }
    if !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) {
        return s
            .parse()
            .map(VersionSpec::Version)
            .map_err(|_| CliError::Usage(format!("--at {s}: version out of range")));
    }
    if let Some(ago) = s.strip_prefix('-') {
        let d = parse_duration(ago)?;
        return SystemTime::now()
            .checked_sub(d)
            .map(VersionSpec::Time)
            .ok_or_else(|| CliError::Usage(format!("--at {s}: too long ago")));
    }
    if let Some(secs) = s.strip_prefix('@') {
        let secs: u64 = secs
            .parse()
            .map_err(|_| CliError::Usage(format!("--at {s}: expected @UNIX-SECONDS")))?;
        return Ok(VersionSpec::Time(UNIX_EPOCH + Duration::from_secs(secs)));
    }
    if let Some(t) = parse_time(s) {
        return Ok(VersionSpec::Time(t));
    }
    Ok(VersionSpec::Snapshot(s.to_string()))
}

/// `90s`, `15m`, `12h`, `30d`, `2w`, or seconds.
fn parse_duration(s: &str) -> CliResult<Duration> {
    let bad = || {
        CliError::Usage(format!(
            "{s}: expected a duration like 90s, 15m, 12h, 30d, 2w"
        ))
    };
    let (num, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    let n: u64 = num.parse().map_err(|_| bad())?;
    let secs = match unit {
        "" | "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        "w" => 7 * 86_400,
        _ => return Err(bad()),
    };
    n.checked_mul(secs).map(Duration::from_secs).ok_or_else(bad)
}

/// `4096`, `4K`, `64KiB`, `1M`.
fn parse_size(s: &str) -> CliResult<u32> {
    let bad = || CliError::Usage(format!("{s}: expected a size like 4K, 64K, 1M"));
    let (num, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    let n: u32 = num.parse().map_err(|_| bad())?;
    let mul = match unit.to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" | "kib" => 1 << 10,
        "m" | "mb" | "mib" => 1 << 20,
        _ => return Err(bad()),
    };
    n.checked_mul(mul).ok_or_else(bad)
}

/// `D+P` or `none`.
fn parse_parity(s: &str) -> CliResult<Option<Parity>> {
    if s == "none" {
        return Ok(None);
    }
    let bad = || {
        CliError::Usage(format!(
            "--parity {s}: expected D+P (data and parity shards, e.g. 16+2) or none"
        ))
    };
    let (d, p) = s.split_once('+').ok_or_else(bad)?;
    let (d, p): (u8, u8) = (d.parse().map_err(|_| bad())?, p.parse().map_err(|_| bad())?);
    if d == 0
        || p == 0
        || d > portswitch_vault::limits::PARITY_DATA_SHARDS_MAX
        || p > portswitch_vault::limits::PARITY_SHARDS_MAX
    {
        return Err(CliError::Usage(format!(
            "--parity {s}: data shards within 1..={}, parity shards within 1..={}",
            portswitch_vault::limits::PARITY_DATA_SHARDS_MAX,
            portswitch_vault::limits::PARITY_SHARDS_MAX
        )));
    }
    Ok(Some(Parity {
        data_shards: d,
        parity_shards: p,
    }))
}

/// UTC, to the second: `2026-12-07T15:20:31Z`.
fn fmt_time(t: SystemTime) -> String {
    let secs = match t.duration_since(UNIX_EPOCH) {
        Ok(d) => d.as_secs() as i64,
        Err(e) => -(e.duration().as_secs() as i64),
    };
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    let (y, m, d) = civil_from_days(days);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// `YYYY-MM-DD`, `YYYY-MM-DDTHH:MM[:SS]Z` (a space for the T and no Z are accepted:
/// UTC either way).
fn parse_time(s: &str) -> Option<SystemTime> {
    let s = s.strip_suffix('Z').unwrap_or(s);
    let (date, clock) = match s.split_once(['T', ' ']) {
        Some((d, c)) => (d, Some(c)),
        None => (s, None),
    };
    let mut ymd = date.splitn(3, '-');
    let y: i64 = ymd.next()?.parse().ok()?;
    let m: u32 = ymd.next()?.parse().ok()?;
    let d: u32 = ymd.next()?.parse().ok()?;
    if date.len() != 10 || !(1..=12).contains(&m) || !(1..=31).contains(&d) {
        return None;
    }
    let mut secs = days_from_civil(y, m, d) * 86_400;
    if let Some(c) = clock {
        let mut hms = c.splitn(3, ':');
        let h: i64 = hms.next()?.parse().ok()?;
        let mi: i64 = hms.next()?.parse().ok()?;
        let se: i64 = hms.next().map_or(Some(0), |x| x.parse().ok())?;
        if h > 23 || mi > 59 || se > 60 {
            return None;
        }
        secs += h * 3600 + mi * 60 + se;
    }
    u64::try_from(secs)
        .ok()
        .map(|s| UNIX_EPOCH + Duration::from_secs(s))
}

/// Days since 1970-01-01 to a proleptic Gregorian date (H. Hinnant's algorithm).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = y - i64::from(m <= 2);
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let mp = i64::from(if m > 2 { m - 3 } else { m + 9 });
    let doy = (153 * mp + 2) / 5 + i64::from(d) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_round_trip() {
        for secs in [0u64, 951_782_400, 1_765_120_831, 4_102_444_800] {
            let t = UNIX_EPOCH + Duration::from_secs(secs);
            assert_eq!(parse_time(&fmt_time(t)), Some(t), "{}", fmt_time(t));
        }
        assert_eq!(
            fmt_time(UNIX_EPOCH + Duration::from_secs(951_782_400)),
            "2000-02-29T00:00:00Z"
        );
        assert_eq!(parse_time("2026-13-01"), None);
        assert_eq!(parse_time("nightly"), None);
    }

    #[test]
    fn version_specs() {
        assert_eq!(parse_spec("12").unwrap(), VersionSpec::Version(12));
        assert_eq!(parse_spec("latest").unwrap(), VersionSpec::Latest);
        assert_eq!(
            parse_spec("nightly").unwrap(),
            VersionSpec::Snapshot("nightly".into())
        );
        assert_eq!(
            parse_spec("snapshot:12").unwrap(),
            VersionSpec::Snapshot("12".into())
        );
        assert_eq!(
            parse_spec("@60").unwrap(),
            VersionSpec::Time(UNIX_EPOCH + Duration::from_secs(60))
        );
        assert!(matches!(parse_spec("-10m").unwrap(), VersionSpec::Time(_)));
        assert!(matches!(
            parse_spec("2026-12-07T15:20:00Z").unwrap(),
            VersionSpec::Time(_)
        ));
    }

    #[test]
    fn sizes_durations_parity() {
        assert_eq!(parse_size("4K").unwrap(), 4096);
        assert_eq!(parse_size("1MiB").unwrap(), 1 << 20);
        assert!(parse_size("4X").is_err());
        assert_eq!(
            parse_duration("2w").unwrap(),
            Duration::from_secs(1_209_600)
        );
        assert!(parse_duration("1y").is_err());
        assert_eq!(
            parse_parity("8+3").unwrap(),
            Some(Parity {
                data_shards: 8,
                parity_shards: 3
            })
        );
        assert_eq!(parse_parity("none").unwrap(), None);
        assert!(parse_parity("0+1").is_err());
    }
}
