//! `portswitch-harness`: the whole-system workloads that start members of their own
//! (failover, failover-locks, wan), hold very many sessions (hold-sessions), or
//! stand in for distance (relay). The figures in docs/BENCHMARKS.md come from here
//! and from `portswitch bench`.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use portswitch_harness::scenario::{failover, failover_locks, hold, wan};
use portswitch_harness::{relay, server_bin, Outcome};

#[derive(Parser)]
#[command(
    name = "portswitch-harness",
    version,
    about = "Failover, WAN and many-session workloads against real portswitch processes."
)]
struct Cli {
    /// The portswitch binary members run (default: the one next to this binary).
    #[arg(long, global = true, value_name = "PATH")]
    server_bin: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Time sessions and their ports coming back after the master is SIGKILLed.
    ///
    /// Start a group of three members on loopback, give --connections sessions
    /// --ports ports in all, then SIGKILL the master --rounds times; time until every
    /// session is back with every port on the new master.
    Failover(failover::FailoverArgs),
    /// Locks through kills and stops of the master: safety checked, grants timed.
    ///
    /// Start a group of three members on loopback; --connections sessions contend for
    /// --locks locks (acquire, hold --hold-ms, release) for --duration seconds while
    /// the master suffers --faults (kill: SIGKILL, stop: SIGSTOP for --stop-ms);
    /// checks that no two holders' intervals overlap and tokens rise, and reports
    /// grants per second and how soon grants resume after each fault.
    FailoverLocks(failover_locks::FailoverLocksArgs),
    /// Hold many idle sessions against a running server; memory per session.
    ///
    /// Open --connections sessions and keep them alive with PINGs for --duration
    /// seconds while a fresh client times REGISTER; report server memory per session.
    /// Connections are spread over --source-addrs loopback source addresses.
    HoldSessions(hold::HoldArgs),
    /// Throughput and failover across three data centres (needs root).
    ///
    /// Three members in three network namespaces ("data centres") with
    /// --delay-ms between them through a relay: register-unregister throughput next to
    /// the master and across the WAN, then --rounds times the master's data centre is
    /// cut off; time until --sessions sessions holding --ports ports are back.
    Wan(wan::WanArgs),
    /// Relay TCP connections with a fixed delay each way (distance between data
    /// centres where the kernel has no netem).
    Relay(relay::RelayArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let _ = tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .try_init();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::from(2);
        }
    };
    let result = runtime.block_on(async move {
        let server = || server_bin(cli.server_bin.as_deref());
        let (outcome, json) = match cli.command {
            Command::Failover(a) => (failover::run(&a, &server()?).await?, a.json),
            Command::FailoverLocks(a) => (failover_locks::run(&a, &server()?).await?, a.json),
            Command::HoldSessions(a) => (hold::run(&a).await?, a.json),
            Command::Wan(a) => (wan::run(&a, &server()?).await?, a.json),
            Command::Relay(a) => {
                relay::run(&a).await?;
                return Ok(None);
            }
        };
        Ok::<_, portswitch_harness::Error>(Some((outcome, json)))
    });
    match result {
        Ok(None) => ExitCode::SUCCESS,
        Ok(Some((Outcome { report, ok }, json))) => {
            if json {
                println!("{report}");
            }
            if ok {
                ExitCode::SUCCESS
            } else {
                eprintln!("a check failed: see the report");
                ExitCode::from(1)
            }
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(1)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;
    use failover_locks::{Fault, Pick};

    fn parse(line: &str) -> Command {
        Cli::try_parse_from(line.split(' ')).unwrap().command
    }

    #[test]
    fn the_command_line_is_well_formed() {
        Cli::command().debug_assert();
    }

    /// The defaults the figures in docs/BENCHMARKS.md were taken with.
    #[test]
    fn defaults_are_those_the_figures_were_taken_with() {
        let Command::FailoverLocks(f) = parse("x failover-locks") else {
            panic!()
        };
        assert_eq!((f.sessions, f.channels, f.locks), (64, 1, 8));
        assert_eq!((f.stop_ms, f.hold_ms, f.lease_ms), (4_000, 5, 10_000));
        assert_eq!((f.duration, f.warmup_s), (10.0, 12.0));
        assert_eq!(f.pick, Pick::Fixed);
        use Fault::{Kill, Stop};
        assert_eq!(f.faults, [Kill, Stop, Kill, Stop, Kill]);
        let Command::Wan(w) = parse("x wan --member-flag --heartbeat-ms=100") else {
            panic!()
        };
        assert_eq!(
            (w.delay_ms, w.sessions, w.ports, w.rounds),
            (30, 100, 1_000_000, 20)
        );
        assert_eq!((w.connections, w.pipeline, w.duration), (64, 64, 10.0));
        assert_eq!(w.member_flags, ["--heartbeat-ms=100"]);
        let Command::HoldSessions(h) = parse("x hold-sessions") else {
            panic!()
        };
        assert_eq!(
            (h.sessions, h.connect_concurrency, h.channels),
            (64, 256, 1)
        );
        assert_eq!((h.hold_s, h.source_addrs), (10.0, None));
        let Command::Failover(f) = parse("x --server-bin /bin/portswitch failover") else {
            panic!()
        };
        assert_eq!((f.sessions, f.ports, f.rounds), (64, 1_000_000, 20));
    }

    #[test]
    fn a_missing_server_binary_says_how_to_build_it() {
        let e = server_bin(None).unwrap_err().to_string();
        assert!(e.contains("cargo build --release -p portswitch"), "{e}");
        let given = std::path::Path::new("/some/portswitch");
        assert_eq!(server_bin(Some(given)).unwrap(), given);
    }
}
