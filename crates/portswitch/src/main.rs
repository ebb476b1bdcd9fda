//! `portswitch`: the server (`serve`), the command-line client (`ctl`), the load
//! generator (`bench`) and a local group for trying things out (`dev`) in one binary.

mod bench;
mod cert;
mod ctl;
mod dev;
mod mq;
mod query;
mod query_sources;
mod serve;
mod tunnel;
mod vault;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "portswitch",
    version,
    about = "A port switch coordination service: locks, elections, discovery and routing by exclusive ownership of named ports."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run a server (loopback, port 7400, no configuration needed).
    Serve(Box<serve::ServeArgs>),
    /// Talk to a server from the command line.
    Ctl(ctl::CtlArgs),
    /// Generate load against a server and report throughput and latency.
    Bench(bench::BenchArgs),
    /// Create a development CA, a server certificate and client certificates.
    Cert(cert::CertArgs),
    /// Start a local group of servers (default three) for trying things out.
    Dev(dev::DevArgs),
    /// The message queue: run a broker, manage queues, produce and consume.
    Mq(mq::MqArgs),
    /// The tunnel: many TCP streams over a pool of encrypted, featureless connections.
    Tunnel(tunnel::TunnelArgs),
    /// The vault: encrypted, compressed, versioned storage; a FUSE mount.
    Vault(vault::VaultArgs),
    /// The query language: evaluate an expression over JSON, filter JSON Lines, run
    /// SELECT over JSON, CSV and SQLite sources.
    Query(query::QueryArgs),
}

fn main() -> std::process::ExitCode {
    if let Some(why) = bench::moved_workload(&std::env::args_os().collect::<Vec<_>>()) {
        ctl::note(&format!("error: {why}"));
        return std::process::ExitCode::from(2);
    }
    // `bench --workload NAME`, the form before one subcommand per workload, still runs.
    let (args, note) = bench::legacy_command_line(std::env::args_os().collect());
    if let Some(note) = note {
        ctl::note(&note);
    }
    let cli = Cli::parse_from(args);
    let is_ctl = matches!(cli.command, Command::Ctl(_));
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            ctl::note(&format!("error: cannot start the async runtime: {e}"));
            return std::process::ExitCode::from(2);
        }
    };
    let result = runtime.block_on(async move {
        match cli.command {
            Command::Serve(args) => serve::run(*args).await,
            Command::Ctl(args) => ctl::run(args).await,
            Command::Bench(args) => bench::run(args).await,
            Command::Cert(args) => cert::run(args),
            Command::Dev(args) => dev::run(args).await,
            Command::Mq(args) => mq::run(args).await,
            Command::Tunnel(args) => tunnel::run(args).await,
            Command::Vault(args) => vault::run(args).await,
            Command::Query(args) => query::run(args).await,
        }
    });
    match result {
        Ok(code) => code,
        // Whoever read the output has gone (`ctl list | head -1`): nothing to say.
        Err(e) if e.is::<ctl::StdoutClosed>() => std::process::ExitCode::from(141),
        Err(e) if e.is::<ctl::Interrupted>() => {
            ctl::note(&e.to_string());
            std::process::ExitCode::from(130)
        }
        Err(e) if e.is::<ctl::TimedOut>() => {
            ctl::note(&format!("error: {e}"));
            std::process::ExitCode::from(124)
        }
        // What ctl reports may carry a server's words: shown escaped, like its output.
        Err(e) if is_ctl => {
            ctl::note(&format!("error: {}", ctl::shown(&e.to_string())));
            std::process::ExitCode::from(1)
        }
        Err(e) => {
            ctl::note(&format!("error: {e}"));
            std::process::ExitCode::from(1)
        }
    }
}

/// Errors of the binary's subcommands: a message for the user.
pub type AppResult = Result<std::process::ExitCode, Box<dyn std::error::Error + Send + Sync>>;
