//! `portswitch ctl`: the command-line client. Human-readable output by default,
//! one JSON object per line with `--json`.
//!
//! Everything it prints goes through [`Out`]: names, values, node names and server
//! messages are escaped (a name may hold any bytes, and raw control bytes would drive
//! the terminal), and a reader that goes away (`ctl list | head -1`) ends the command
//! quietly ([`StdoutClosed`]) instead of a panic. Every command that waits — a queued
//! `register --wait`, `lock`, `elect`, `watch` — gives up at `--timeout`
//! ([`TimedOut`]) or on SIGINT/SIGTERM ([`Interrupted`]), ending its session with BYE
//! so that it leaves every queue at once.
//!
//! Laid out by concern. This file holds the flags, [`run`], the [`Ctx`] every command
//! shares and a `dispatch` that only routes each subcommand to its function.
//! `output.rs` is how things are printed; `connect.rs` how servers are reached and
//! given up on, and how `lock` and `elect` run their command; `ports.rs` has the
//! commands on ports, `wait.rs` the commands that wait for someone else, `admin.rs`
//! `status`, users, roles, lockouts and members.

mod admin;
mod connect;
mod output;
mod ports;
mod wait;

use std::time::Duration;

use clap::{Args, Subcommand};
use portswitch_client::{Client, ClientOptions};

use crate::AppResult;
use connect::{advice, bye, reachable, REFUSED_RETRY};
pub(crate) use connect::{interrupted, Interrupted, TimedOut};

use output::Out;
pub(crate) use output::{note, shown, StdoutClosed};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

#[derive(Args, Debug)]
pub struct CtlArgs {
    /// Server address; for a group, every member's, comma-separated (the client
    /// finds the master).
    #[arg(
        long,
        env = "PORTSWITCH_ADDR",
        default_value = "127.0.0.1:7400",
        global = true
    )]
    addr: String,
    /// Print JSON (one object per line) instead of text.
    #[arg(long, global = true)]
    json: bool,
    /// Session lease in milliseconds.
    #[arg(long, default_value_t = 10_000, global = true)]
    lease_ms: u64,
    /// Log in as this user (SCRAM-SHA-256). The password comes from
    /// PORTSWITCH_PASSWORD or --password-file, never from the command line.
    #[arg(long, env = "PORTSWITCH_USER", global = true)]
    user: Option<String>,
    /// A file whose first line is the password of --user.
    #[arg(long, global = true)]
    password_file: Option<std::path::PathBuf>,
    /// Connect with TLS, trusting the CA in this PEM file.
    #[arg(long, env = "PORTSWITCH_CA", global = true)]
    ca: Option<std::path::PathBuf>,
    /// The server name to verify in its certificate (default: the host of --addr).
    #[arg(long, visible_alias = "tls-name", global = true)]
    server_name: Option<String>,
    /// Client certificate (PEM) for mutual TLS, with --key.
    #[arg(long, global = true, requires = "key")]
    cert: Option<std::path::PathBuf>,
    /// Key (PEM) of --cert.
    #[arg(long, global = true, requires = "cert")]
    key: Option<std::path::PathBuf>,
    /// user and role commands only (not `user unlock`): change the user store in this
    /// data directory of a stopped server instead of asking a running one (the first
    /// user of a server reachable only over the network; every member of a group
    /// keeps its own users).
    #[arg(long, global = true)]
    data_dir: Option<std::path::PathBuf>,
    /// Give up waiting — for a queued `register --wait`, a lock, leadership, or the
    /// changes `watch` and `elect --observe` wait for — after this long (`500ms`,
    /// `30s`, `2m`; a bare number is seconds): the session ends and the command exits
    /// with code 124. It also bounds connecting, and until then an address that
    /// refuses connections (a server still starting) is asked again; without
    /// --timeout, for 0.3 s.
    #[arg(long, global = true, value_parser = parse_duration)]
    timeout: Option<Duration>,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Own a port for as long as this command runs (Ctrl-C releases it).
    Register {
        name: String,
        #[arg(default_value = "")]
        value: String,
        /// Queue for the port if it is taken, instead of failing.
        #[arg(long)]
        wait: bool,
        /// Release after this many seconds instead of waiting for Ctrl-C.
        #[arg(long)]
        hold_secs: Option<f64>,
        /// Exit at once, leaving the session alive for its lease; prints the session
        /// as ID:SECRET for `unregister --session`.
        #[arg(long, conflicts_with = "end_on_disconnect")]
        detach: bool,
        /// End the session (release the port) the moment this process dies.
        #[arg(long)]
        end_on_disconnect: bool,
    },
    /// Release a port held by a detached session.
    Unregister {
        name: String,
        /// The session, as printed by `register --detach` (ID:SECRET, hex).
        #[arg(long)]
        session: String,
    },
    /// Who owns a port.
    Query { name: String },
    /// Owned ports under a prefix.
    List {
        #[arg(default_value = "")]
        prefix: String,
        /// Stop after this many.
        #[arg(long)]
        limit: Option<usize>,
        /// Only ports this expression selects, evaluated by the server (the query
        /// language over `name`, `value`, `text`, `session`, `node`, `token`, `json`),
        /// e.g. `text.startsWith("10.0.")`. Exit code 2 if it does not compile.
        #[arg(long = "where", value_name = "EXPR")]
        filter: Option<String>,
    },
    /// Print a port's changes (or, with --prefix, those of every port under it).
    Watch {
        name: String,
        #[arg(long)]
        prefix: bool,
        /// Exit after this many changes.
        #[arg(long)]
        count: Option<usize>,
        /// With --prefix: only changes this expression selects, evaluated by the
        /// server (over `name`, `value`, `text`, `session`, `node`, `token`, `json`
        /// and `event`, "claimed" or "released"). Exit code 2 if it does not compile.
        #[arg(long = "where", value_name = "EXPR", requires = "prefix")]
        filter: Option<String>,
    },
    /// Relay a message to a port's owner.
    Send { name: String, payload: String },
    /// Send a message to every session, or to the owners of every port under --prefix.
    Broadcast {
        payload: String,
        #[arg(long)]
        prefix: Option<String>,
    },
    /// Server counters.
    Status,
    /// Run a command while holding a lock; its fencing token is in PORTSWITCH_TOKEN.
    /// The command (its whole process group) is stopped if the lock is lost. Without
    /// a command, hold the lock until interrupted.
    Lock {
        name: String,
        /// How long the command has after SIGTERM before SIGKILL.
        #[arg(long, default_value_t = 1_000)]
        kill_after_ms: u64,
        #[arg(last = true)]
        command: Vec<String>,
    },
    /// Manage users (needs the admin permission; the very first user, who must have
    /// the root role, may be created from loopback without logging in).
    User {
        #[command(subcommand)]
        cmd: UserCmd,
    },
    /// Manage roles: permissions on port-name prefixes.
    Role {
        #[command(subcommand)]
        cmd: RoleCmd,
    },
    /// Failed logins: what the server refuses now, and ending an address's refusal
    /// (a user name's back-off: `user unlock NAME`). Needs the admin permission and
    /// a running server: the counts are in its memory.
    Lockout {
        #[command(subcommand)]
        cmd: LockoutCmd,
    },
    /// Manage the members of a group (on its master; sessions carry on).
    Member {
        #[command(subcommand)]
        cmd: MemberCmd,
    },
    /// Campaign for leadership, run a command while leader (token in
    /// PORTSWITCH_TOKEN); with --observe, print leader changes instead.
    Elect {
        name: String,
        /// The value to lead with (say, this process's address).
        #[arg(long, default_value = "")]
        value: String,
        #[arg(long)]
        observe: bool,
        /// How long the command has after SIGTERM before SIGKILL, once leadership is
        /// lost.
        #[arg(long, default_value_t = 1_000)]
        kill_after_ms: u64,
        #[arg(last = true)]
        command: Vec<String>,
    },
}

#[derive(Subcommand, Debug)]
enum UserCmd {
    /// Create a user. The password is read from PORTSWITCH_NEW_PASSWORD, or else the
    /// first line of standard input.
    Add {
        name: String,
        /// A role to give the user (repeatable; `root` grants everything).
        #[arg(long = "role")]
        roles: Vec<String>,
    },
    /// Change a user's password (read as for `add`).
    Passwd { name: String },
    /// Delete a user.
    Del { name: String },
    /// List users and their roles (a table; with --json, one JSON array).
    List,
    /// Give a user a role.
    Grant { name: String, role: String },
    /// Take a role from a user.
    Revoke { name: String, role: String },
    /// End the back-off of a user name after failed logins, at once (everywhere:
    /// also at addresses the user logged in from lately). Asks the running server.
    Unlock { name: String },
}

#[derive(Subcommand, Debug)]
enum LockoutCmd {
    /// User names in a back-off and addresses refused, longest first (a table; with
    /// --json, one JSON array). Names that are no user show as the audit log's hash
    /// of them.
    List,
    /// End the refusal of a source address after failed logins, at once (an IPv6
    /// address: its /64, as the server counts them).
    UnlockAddr {
        /// The client's IP address (IPv6: any address in the /64 `lockout list` shows).
        // Not named `addr`: that is the global --addr, the server's.
        #[arg(value_name = "IP")]
        ip: std::net::IpAddr,
    },
}

#[derive(Subcommand, Debug)]
enum RoleCmd {
    /// Create or replace a role.
    Add {
        name: String,
        /// PREFIX=PERMS, e.g. `svc/=register,query,watch` or `=all` (repeatable).
        /// Permissions: register, query, watch, send, broadcast, list, admin, all.
        #[arg(long = "grant", value_name = "PREFIX=PERMS")]
        grants: Vec<String>,
    },
    /// Delete a role (users lose it).
    Del { name: String },
    /// List roles and their grants (a table; with --json, one JSON array).
    List,
}

#[derive(Subcommand, Debug)]
enum MemberCmd {
    /// Add a member started with `serve --join`: it catches up, then votes.
    Add {
        id: u64,
        /// Where the other members reach it.
        peer_addr: String,
        /// Where clients reach it.
        client_addr: String,
    },
    /// Remove a member (if it is the master, another takes over and clients resume
    /// their sessions there).
    Remove { id: u64 },
    /// The group as the master sees it: members, voters, leader, term, epoch.
    List,
}

/// Parses `--timeout`: a number with an optional unit (`ms`, `s`, `m`); a bare
/// number is seconds.
fn parse_duration(s: &str) -> Result<Duration, String> {
    let t = s.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (n, unit) = t.split_at(split);
    let n: f64 = n
        .parse()
        .map_err(|_| format!("{s:?}: expected a duration like 500ms, 30s or 2m"))?;
    let secs = match unit.trim() {
        "" | "s" => n,
        "ms" => n / 1e3,
        "m" => n * 60.0,
        other => return Err(format!("{s:?}: unknown unit {other:?} (ms, s or m)")),
    };
    Duration::try_from_secs_f64(secs).map_err(|e| format!("{s:?}: {e}"))
}

/// What one `ctl` run shares: its output, its deadline, and the sessions it opened
/// (ended with BYE if the command fails, so that they leave their queues and ports
/// at once instead of at the end of their lease).
struct Ctx {
    out: Out,
    timeout: Option<Duration>,
    deadline: Option<tokio::time::Instant>,
    opened: std::sync::Mutex<Vec<Client>>,
}

impl Ctx {
    /// Opens a session that ends (BYE) if the command fails.
    async fn connect(&self, opts: ClientOptions) -> Result<Client, BoxError> {
        let client = self.connect_detached(opts).await?;
        self.opened
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(client.clone());
        Ok(client)
    }

    /// Opens (or resumes) a session that a failure leaves alone.
    async fn connect_detached(&self, opts: ClientOptions) -> Result<Client, BoxError> {
        let addrs: Vec<String> = std::iter::once(opts.addr.clone())
            .chain(opts.servers.iter().cloned())
            .collect();
        let refused_retry = self.timeout.unwrap_or(REFUSED_RETRY);
        reachable(&addrs, opts.connect_timeout, refused_retry).await?;
        Ok(Client::connect(opts).await?)
    }

    /// Ends every session this run opened that is still open.
    async fn close_all(&self) {
        let opened = std::mem::take(&mut *self.opened.lock().unwrap_or_else(|p| p.into_inner()));
        for c in opened {
            if c.is_alive() {
                bye(&c).await;
            }
        }
    }

    /// Runs `fut` until it completes, unless `--timeout` passes first ([`TimedOut`])
    /// or SIGINT or SIGTERM comes ([`Interrupted`]); either way the session says BYE
    /// (so it leaves every queue and releases every port at once).
    async fn wait<T>(
        &self,
        client: &Client,
        what: impl FnOnce() -> String,
        fut: impl std::future::Future<Output = T>,
    ) -> Result<T, BoxError> {
        let expired = async {
            match self.deadline {
                Some(at) => tokio::time::sleep_until(at).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            r = fut => Ok(r),
            _ = interrupted() => {
                bye(client).await;
                Err(Interrupted.into())
            }
            _ = expired => {
                bye(client).await;
                Err(TimedOut { what: what(), after: self.timeout.unwrap_or_default() }.into())
            }
        }
    }
}

pub async fn run(args: CtlArgs) -> AppResult {
    let deadline = args.timeout.map(|t| tokio::time::Instant::now() + t);
    let ctx = Ctx {
        out: Out { json: args.json },
        timeout: args.timeout,
        deadline,
        opened: std::sync::Mutex::new(Vec::new()),
    };
    let result = dispatch(args, &ctx).await;
    if result.is_err() {
        ctx.close_all().await;
    }
    result.map_err(advice)
}

/// The session options the global flags ask for, and every server address named.
fn client_options(args: &CtlArgs) -> Result<(Vec<String>, ClientOptions), BoxError> {
    let conn = Connection {
        addr: &args.addr,
        user: args.user.as_deref(),
        password_file: args.password_file.as_deref(),
        ca: args.ca.as_deref(),
        server_name: args.server_name.as_deref(),
        cert_key: args.cert.as_deref().zip(args.key.as_deref()),
    };
    let (addrs, mut opts) = conn.options()?;
    opts.lease = Duration::from_millis(args.lease_ms);
    if let Some(t) = args.timeout {
        opts.connect_timeout = opts.connect_timeout.min(t);
    }
    Ok((addrs, opts))
}

/// How to reach and log in to a port switch, as `ctl`'s flags (and `query run`'s) say.
pub(crate) struct Connection<'a> {
    /// Comma-separated member addresses.
    pub addr: &'a str,
    pub user: Option<&'a str>,
    pub password_file: Option<&'a std::path::Path>,
    pub ca: Option<&'a std::path::Path>,
    pub server_name: Option<&'a str>,
    pub cert_key: Option<(&'a std::path::Path, &'a std::path::Path)>,
}

impl Connection<'_> {
    /// The client options, and every address named. The password of `user` comes from
    /// `password_file` or PORTSWITCH_PASSWORD, never from the command line.
    pub(crate) fn options(&self) -> Result<(Vec<String>, ClientOptions), BoxError> {
        let addrs: Vec<String> = self
            .addr
            .split(',')
            .map(|a| a.trim().to_string())
            .filter(|a| !a.is_empty())
            .collect();
        let Some(first) = addrs.first() else {
            return Err("--addr names no server".into());
        };
        let mut opts = ClientOptions::new(first.clone());
        opts.servers = addrs[1..].to_vec();
        if let Some(ca) = self.ca {
            opts.tls = Some(portswitch_client::ClientTls {
                ca: ca.to_owned(),
                server_name: self.server_name.map(str::to_owned),
                client_cert: self.cert_key.map(|(c, k)| (c.to_owned(), k.to_owned())),
            });
        }
        if let Some(user) = self.user {
            let password = match self.password_file {
                Some(path) => std::fs::read_to_string(path)
                    .map_err(|e| format!("cannot read {}: {e}", path.display()))?
                    .lines()
                    .next()
                    .unwrap_or("")
                    .to_string(),
                None => std::env::var("PORTSWITCH_PASSWORD")
                    .map_err(|_| "--user needs PORTSWITCH_PASSWORD or --password-file")?,
            };
            opts.credentials = Some((user.to_owned(), password));
        }
        Ok((addrs, opts))
    }
}

/// Refuses `--data-dir` for the commands it does not apply to.
fn check_data_dir(args: &CtlArgs) -> Result<(), BoxError> {
    let offline = &args.data_dir;
    if offline.is_some()
        && matches!(
            args.cmd,
            Cmd::Lockout { .. }
                | Cmd::User {
                    cmd: UserCmd::Unlock { .. }
                }
        )
    {
        return Err(
            "failed logins are counted in a running server's memory (a stopped server \
             keeps none): leave out --data-dir and ask the server"
                .into(),
        );
    }
    if offline.is_some() && !matches!(args.cmd, Cmd::User { .. } | Cmd::Role { .. }) {
        return Err("--data-dir applies to user and role commands only".into());
    }
    Ok(())
}

/// Routes the subcommand to its function.
async fn dispatch(args: CtlArgs, ctx: &Ctx) -> AppResult {
    let (addrs, opts) = client_options(&args)?;
    check_data_dir(&args)?;
    let offline = args.data_dir;
    match args.cmd {
        Cmd::Register {
            name,
            value,
            wait,
            hold_secs,
            detach,
            end_on_disconnect,
        } => {
            let opts = ClientOptions {
                end_on_disconnect,
                ..opts
            };
            ports::register(ctx, opts, name, value, wait, hold_secs, detach).await
        }
        Cmd::Unregister { name, session } => ports::unregister(ctx, opts, name, session).await,
        Cmd::Query { name } => ports::query(ctx, opts, name).await,
        Cmd::List {
            prefix,
            limit,
            filter,
        } => ports::list(ctx, opts, prefix, limit, filter).await,
        Cmd::Send { name, payload } => ports::send(ctx, opts, name, payload).await,
        Cmd::Broadcast { payload, prefix } => ports::broadcast(ctx, opts, payload, prefix).await,
        Cmd::Watch {
            name,
            prefix,
            count,
            filter,
        } => wait::watch(ctx, opts, name, prefix, count, filter).await,
        Cmd::Lock {
            name,
            kill_after_ms,
            command,
        } => wait::lock(ctx, opts, name, kill_after_ms, command).await,
        Cmd::Elect {
            name,
            observe: true,
            ..
        } => wait::observe(ctx, opts, name).await,
        Cmd::Elect {
            name,
            value,
            observe: false,
            kill_after_ms,
            command,
        } => wait::elect(ctx, opts, name, value, kill_after_ms, command).await,
        Cmd::Status => admin::status(&opts, &addrs, ctx.out).await,
        Cmd::User { cmd } => admin::user(ctx, opts, offline, cmd).await,
        Cmd::Role { cmd } => admin::role(ctx, opts, offline, cmd).await,
        Cmd::Lockout { cmd } => admin::lockout(ctx, opts, cmd).await,
        Cmd::Member { cmd } => admin::member(ctx, opts, cmd).await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_take_units() {
        assert_eq!(parse_duration("2").unwrap(), Duration::from_secs(2));
        assert_eq!(parse_duration("1.5s").unwrap(), Duration::from_millis(1500));
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
        assert_eq!(parse_duration("2m").unwrap(), Duration::from_secs(120));
        assert!(parse_duration("soon").is_err());
        assert!(parse_duration("3h").is_err());
        assert!(parse_duration("-1s").is_err());
    }
}
