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

use std::fmt::Write as _;
use std::io::Write as _;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Subcommand};
use portswitch_client::{
    Client, ClientOptions, Election, Event, LeaderChange, Lock, RegisterOutcome, SendOutcome,
};
use serde_json::json;

use crate::AppResult;

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
    },
    /// Print a port's changes (or, with --prefix, those of every port under it).
    Watch {
        name: String,
        #[arg(long)]
        prefix: bool,
        /// Exit after this many changes.
        #[arg(long)]
        count: Option<usize>,
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

/// A new password: PORTSWITCH_NEW_PASSWORD, or the first line of standard input.
fn new_password() -> Result<String, Box<dyn std::error::Error + Send + Sync>> {
    if let Ok(p) = std::env::var("PORTSWITCH_NEW_PASSWORD") {
        return Ok(p);
    }
    let mut line = String::new();
    std::io::stdin().read_line(&mut line)?;
    let p = line.trim_end_matches(['\r', '\n']).to_string();
    if p.is_empty() {
        return Err(
            "no password: set PORTSWITCH_NEW_PASSWORD or write it on standard input".into(),
        );
    }
    Ok(p)
}

fn hex(n: u64) -> String {
    format!("{n:016x}")
}

/// Bytes (a name, a value, a node name, a server's message) as text that is safe to
/// show on a terminal: control characters — C0 (`\x1b` starts an escape sequence), DEL
/// and C1 — and the invisible bidirectional overrides are written as escapes, and
/// bytes that are not UTF-8 as `\xNN`. Everything else, other scripts included, shows
/// as it is.
fn text(b: &[u8]) -> String {
    let mut s = String::with_capacity(b.len());
    for chunk in b.utf8_chunks() {
        for c in chunk.valid().chars() {
            match c {
                '\n' => s.push_str("\\n"),
                '\r' => s.push_str("\\r"),
                '\t' => s.push_str("\\t"),
                c if c.is_ascii_control() => {
                    let _ = write!(s, "\\x{:02x}", c as u32);
                }
                c if hidden(c) => {
                    let _ = write!(s, "\\u{{{:x}}}", c as u32);
                }
                c => s.push(c),
            }
        }
        for b in chunk.invalid() {
            let _ = write!(s, "\\x{b:02x}");
        }
    }
    s
}

/// A string from the command line or the server (an error message, say), escaped as
/// [`text`].
pub(crate) fn shown(s: &str) -> String {
    text(s.as_bytes())
}

/// Bytes as a JSON string value: UTF-8 as it is (invalid sequences replaced);
/// [`json_line`] escapes what a terminal would act on.
fn lossy(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// Characters beyond ASCII that a terminal acts on or that reorder the text around
/// them: C1 controls (U+009B is CSI on some terminals) and the bidirectional marks,
/// embeddings, overrides and isolates.
fn hidden(c: char) -> bool {
    c.is_control()
        || matches!(
            c,
            '\u{061c}' | '\u{200e}' | '\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}'
        )
}

/// One JSON value as a line. serde_json escapes C0 controls; DEL, C1 and the
/// bidirectional characters are escaped here as `\uXXXX` (all in the BMP). They can
/// only occur inside strings, so the line stays valid JSON with the same meaning.
fn json_line(v: &serde_json::Value) -> String {
    let s = v.to_string();
    if !s.chars().any(hidden) {
        return s;
    }
    let mut out = String::with_capacity(s.len() + 16);
    for c in s.chars() {
        if hidden(c) {
            let _ = write!(out, "\\u{:04x}", c as u32);
        } else {
            out.push(c);
        }
    }
    out
}

/// A table: a header row and rows, columns padded to their widest cell (cells are
/// already escaped, so one character is one column for the scripts names usually
/// use); the last column is not padded.
fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut s = String::new();
    let mut line = |cells: &mut dyn Iterator<Item = &str>| {
        let mut l = String::new();
        for (i, cell) in cells.enumerate() {
            if i + 1 == widths.len() {
                l.push_str(cell);
            } else {
                let _ = write!(l, "{cell:<w$}  ", w = widths[i]);
            }
        }
        s.push_str(l.trim_end());
        s.push('\n');
    };
    line(&mut header.iter().copied());
    for row in rows {
        line(&mut row.iter().map(String::as_str));
    }
    s.pop();
    s
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

/// Where the command's results go: stdout, as text or one JSON value per line.
#[derive(Clone, Copy)]
struct Out {
    json: bool,
}

impl Out {
    /// Prints `human` or `j`, whichever the command was asked for.
    fn line(&self, human: String, j: serde_json::Value) -> Result<(), BoxError> {
        if self.json {
            self.raw(&json_line(&j))
        } else {
            self.raw(&human)
        }
    }

    /// Prints one line as it is (already escaped). A reader that has gone away is
    /// [`StdoutClosed`]: the command ends, quietly.
    fn raw(&self, line: &str) -> Result<(), BoxError> {
        let mut stdout = std::io::stdout().lock();
        match writeln!(stdout, "{line}").and_then(|()| stdout.flush()) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Err(StdoutClosed.into()),
            Err(e) => Err(format!("cannot write to standard output: {e}").into()),
        }
    }
}

/// Resolves when standard output's reader has gone (the read end of its pipe closed),
/// so that a command that prints only now and then (`ctl watch x | head -1`) ends
/// with its reader rather than at its next write. Never resolves when stdout is a
/// terminal or a file, or when this cannot be told.
async fn stdout_gone() {
    let (tx, rx) = tokio::sync::oneshot::channel();
    // A thread of its own, blocked in poll(2): no events are asked for, so only
    // POLLERR (a pipe without readers) or POLLHUP (a socket closed) wake it. It
    // ends with the process.
    let watcher = std::thread::Builder::new()
        .name("stdout-reader".into())
        .spawn(move || {
            use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
            use std::os::fd::AsFd;
            let stdout = std::io::stdout();
            loop {
                let mut fds = [PollFd::new(stdout.as_fd(), PollFlags::empty())];
                match poll(&mut fds, PollTimeout::NONE) {
                    Err(nix::errno::Errno::EINTR) => continue,
                    Ok(_)
                        if fds[0].revents().is_some_and(|r| {
                            r.intersects(PollFlags::POLLERR | PollFlags::POLLHUP)
                        }) =>
                    {
                        let _ = tx.send(());
                        return;
                    }
                    // POLLNVAL (no stdout at all) or an error: nothing to watch.
                    _ => return,
                }
            }
        });
    if watcher.is_ok() && rx.await.is_ok() {
        return;
    }
    std::future::pending().await
}

/// A note for the user on standard error (progress, not results). One that cannot be
/// written is dropped: a closed stderr must not stop the command.
pub(crate) fn note(msg: &str) {
    let _ = writeln!(std::io::stderr().lock(), "{msg}");
}

/// Standard output was closed by its reader (`ctl list | head -1`): the command
/// ends, its session with BYE, and the process exits with code 141 (the shell's code
/// for a process ended by SIGPIPE) and no message.
#[derive(Debug)]
pub(crate) struct StdoutClosed;

impl std::fmt::Display for StdoutClosed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("standard output closed")
    }
}

impl std::error::Error for StdoutClosed {}

/// The command gave up waiting at `--timeout` (exit code 124, as `timeout(1)`).
#[derive(Debug)]
pub(crate) struct TimedOut {
    what: String,
    after: Duration,
}

impl std::fmt::Display for TimedOut {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "timed out after {:?} waiting for {}; the session ended",
            self.after, self.what
        )
    }
}

impl std::error::Error for TimedOut {}

/// How long a first connection keeps asking an address that refuses it, unless
/// `--timeout` says otherwise: short, so that a wrong address fails in well under a
/// second. (A server started a moment ago may take longer to listen — one with a
/// data directory takes about a second — and a script that starts one waits for it
/// with `--timeout`.)
const REFUSED_RETRY: Duration = Duration::from_millis(300);

/// Pause between two attempts on an address that refused.
const REFUSED_PAUSE: Duration = Duration::from_millis(25);

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

/// Ends a session that is being given up on (BYE), waiting for the server's answer
/// at most [`BYE_WAIT`]: a server that has gone must not hold the command up until
/// the session's lease view runs out.
async fn bye(client: &Client) {
    let _ = tokio::time::timeout(BYE_WAIT, client.close()).await;
}

/// How long a command that is giving up waits for its BYE to be answered.
const BYE_WAIT: Duration = Duration::from_secs(1);

/// Fails at once, naming each address and why, when no address given accepts a
/// connection (an address that refuses is asked again for `refused_retry`). The
/// client's own connect would keep trying every address until its connect timeout,
/// as it must through a group's election; nothing listening anywhere is no election.
async fn reachable(
    addrs: &[String],
    connect_timeout: Duration,
    refused_retry: Duration,
) -> Result<(), BoxError> {
    let give_up = tokio::time::Instant::now() + refused_retry;
    let mut probes = tokio::task::JoinSet::new();
    for (i, addr) in addrs.iter().enumerate() {
        let addr = addr.clone();
        probes.spawn(async move { (i, probe(addr, connect_timeout, give_up).await) });
    }
    let mut failures = Vec::new();
    while let Some(done) = probes.join_next().await {
        match done {
            // The others are aborted as the set drops.
            Ok((_, Ok(()))) => return Ok(()),
            Ok((i, Err(e))) => failures.push((i, e.to_string())),
            Err(e) => failures.push((usize::MAX, e.to_string())),
        }
    }
    failures.sort();
    let all: Vec<String> = failures.into_iter().map(|(_, e)| e).collect();
    Err(all.join("; ").into())
}

/// One address: a TCP connection is opened (and closed at once), or the reason none
/// can be (an address that refuses is asked again until `give_up`).
async fn probe(
    addr: String,
    connect_timeout: Duration,
    give_up: tokio::time::Instant,
) -> Result<(), portswitch_client::Error> {
    loop {
        match tokio::time::timeout(connect_timeout, tokio::net::TcpStream::connect(&addr)).await {
            Ok(Ok(_)) => return Ok(()),
            Ok(Err(e))
                if e.kind() == std::io::ErrorKind::ConnectionRefused
                    && tokio::time::Instant::now() + REFUSED_PAUSE < give_up =>
            {
                tokio::time::sleep(REFUSED_PAUSE).await
            }
            Ok(Err(source)) => return Err(portswitch_client::Error::Unreachable { addr, source }),
            Err(_) => return Err(portswitch_client::Error::ConnectTimeout(addr)),
        }
    }
}

/// What to do about a client error, in terms of this command's flags.
fn advice(e: BoxError) -> BoxError {
    use portswitch_client::Error as E;
    match e.downcast_ref::<E>() {
        Some(E::TlsExpected { addr }) => format!(
            "{}: this server speaks TLS: pass --ca with the CA that signed its certificate \
             (and --tls-name if the certificate names the server otherwise)",
            shown(addr)
        )
        .into(),
        Some(E::TlsUnexpected { addr }) => format!(
            "{}: this server does not speak TLS: leave out --ca (and PORTSWITCH_CA)",
            shown(addr)
        )
        .into(),
        _ => e,
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

async fn dispatch(args: CtlArgs, ctx: &Ctx) -> AppResult {
    let addrs: Vec<String> = args
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
    opts.lease = Duration::from_millis(args.lease_ms);
    if let Some(t) = args.timeout {
        opts.connect_timeout = opts.connect_timeout.min(t);
    }
    if let Some(ca) = &args.ca {
        opts.tls = Some(portswitch_client::ClientTls {
            ca: ca.clone(),
            server_name: args.server_name.clone(),
            client_cert: args.cert.clone().zip(args.key.clone()),
        });
    }
    if let Some(user) = &args.user {
        let password = match &args.password_file {
            Some(path) => std::fs::read_to_string(path)
                .map_err(|e| format!("cannot read {}: {e}", path.display()))?
                .lines()
                .next()
                .unwrap_or("")
                .to_string(),
            None => std::env::var("PORTSWITCH_PASSWORD")
                .map_err(|_| "--user needs PORTSWITCH_PASSWORD or --password-file")?,
        };
        opts.credentials = Some((user.clone(), password));
    }
    let json = args.json;
    let offline = args.data_dir.clone();
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
    let out = ctx.out;
    match args.cmd {
        Cmd::Register {
            name,
            value,
            wait,
            hold_secs,
            detach,
            end_on_disconnect,
        } => {
            opts.end_on_disconnect = end_on_disconnect;
            let client = ctx.connect(opts).await?;
            // Listen before asking, so that a grant cannot slip past.
            let mut events = client.events();
            let token = match client
                .register_with(name.as_bytes(), value.as_bytes(), wait)
                .await?
            {
                RegisterOutcome::Owned { token } => token,
                RegisterOutcome::Taken {
                    session,
                    token,
                    node,
                } => {
                    out.line(
                        format!(
                            "taken: {} is owned by session {} ({}) token {token}",
                            shown(&name),
                            hex(session),
                            text(&node)
                        ),
                        json!({"result": "taken", "port": name, "session": hex(session), "token": token, "node": lossy(&node)}),
                    )?;
                    client.close().await?;
                    return Ok(ExitCode::from(3));
                }
                RegisterOutcome::Queued { position } => {
                    if !json {
                        note(&format!("queued at position {position}; waiting"));
                    }
                    let granted = async {
                        loop {
                            match events.recv().await {
                                Ok(Event::Acquired { port, token }) if port == name.as_bytes() => {
                                    return Ok(token)
                                }
                                Ok(Event::OwnershipLost { reason, .. }) => return Err(reason),
                                Ok(_) => {}
                                Err(e) => return Err(e.to_string()),
                            }
                        }
                    };
                    let what = || format!("port {}", shown(&name));
                    match ctx.wait(&client, what, granted).await? {
                        Ok(token) => token,
                        Err(reason) => return Err(reason.into()),
                    }
                }
            };
            // Listening for relayed messages before saying so: one sent the moment
            // the port is known to be ours is printed.
            let mut messages_in = client.events();
            let s = client.session();
            out.line(
                format!(
                    "registered {} token {token} session {}",
                    shown(&name),
                    hex(s.id)
                ),
                json!({"result": "registered", "port": name, "token": token, "session": hex(s.id)}),
            )?;
            if detach {
                let (id, secret) = client.detach();
                out.line(
                    format!("detached session {}:{}", hex(id), hex(secret)),
                    json!({"session": format!("{}:{}", hex(id), hex(secret))}),
                )?;
                return Ok(ExitCode::SUCCESS);
            }
            let hold = async {
                match hold_secs {
                    Some(s) => tokio::time::sleep(Duration::from_secs_f64(s.max(0.0))).await,
                    None => interrupted().await,
                }
            };
            // While holding, print what is relayed to the port (SEND, BROADCAST). Ends
            // only if a message cannot be printed.
            let messages = async {
                loop {
                    match messages_in.recv().await {
                        Ok(Event::Message {
                            from,
                            port,
                            payload,
                        }) => {
                            if let Err(e) = out.line(
                                format!(
                                    "message from session {} to {}: {}",
                                    hex(from),
                                    text(&port),
                                    text(&payload)
                                ),
                                json!({"event": "message", "from": hex(from), "port": lossy(&port), "payload": lossy(&payload)}),
                            ) {
                                break e;
                            }
                        }
                        Ok(_) | Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
                        Err(tokio::sync::broadcast::error::RecvError::Closed) => {
                            std::future::pending::<()>().await
                        }
                    }
                }
            };
            tokio::select! {
                _ = hold => {
                    client.close().await?;
                    Ok(ExitCode::SUCCESS)
                }
                _ = client.lost() => {
                    note(&format!("ownership of {} lost", shown(&name)));
                    Ok(ExitCode::from(4))
                }
                e = messages => Err(e),
            }
        }
        Cmd::Unregister { name, session } => {
            let (id, secret) = session
                .split_once(':')
                .and_then(|(a, b)| {
                    Some((
                        u64::from_str_radix(a, 16).ok()?,
                        u64::from_str_radix(b, 16).ok()?,
                    ))
                })
                .ok_or("--session takes ID:SECRET in hex, as printed by register --detach")?;
            opts.resume = Some((id, secret));
            // The session outlives this command (it may hold other ports): it is let
            // go of, never ended, whatever happens.
            let client = ctx.connect_detached(opts).await?;
            let r = client.unregister(name.as_bytes()).await;
            client.detach();
            r?;
            out.line(
                format!("unregistered {}", shown(&name)),
                json!({"result": "unregistered", "port": name}),
            )?;
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Query { name } => {
            let client = ctx.connect(opts).await?;
            match client.query(&name).await? {
                Some(o) => out.line(
                    format!(
                        "{}: owned by session {} ({}) token {} value \"{}\"",
                        shown(&name),
                        hex(o.session),
                        text(&o.node),
                        o.token,
                        text(&o.value)
                    ),
                    json!({"port": name, "owned": true, "session": hex(o.session), "node": lossy(&o.node), "token": o.token, "value": lossy(&o.value)}),
                )?,
                None => out.line(
                    format!("{}: free", shown(&name)),
                    json!({"port": name, "owned": false}),
                )?,
            }
            client.close().await?;
            Ok(ExitCode::SUCCESS)
        }
        Cmd::List { prefix, limit } => {
            let client = ctx.connect(opts).await?;
            let page_limit = client.session().limits.list_limit_max;
            let mut cursor = 0;
            let mut shown_count = 0usize;
            'pages: loop {
                let page = client.list(&prefix, cursor, page_limit).await?;
                for o in page.entries {
                    if limit.is_some_and(|l| shown_count >= l) {
                        break 'pages;
                    }
                    shown_count += 1;
                    out.line(
                        format!(
                            "{}\t{}\t{}\t{}\t{}",
                            text(&o.port),
                            hex(o.session),
                            text(&o.node),
                            o.token,
                            text(&o.value)
                        ),
                        json!({"port": lossy(&o.port), "session": hex(o.session), "node": lossy(&o.node), "token": o.token, "value": lossy(&o.value)}),
                    )?;
                }
                if page.next_cursor == 0 {
                    break;
                }
                cursor = page.next_cursor;
            }
            client.close().await?;
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Watch {
            name,
            prefix,
            count,
        } => {
            let client = ctx.connect(opts).await?;
            let mut events = client.events();
            if prefix {
                client.watch_prefix(&name).await?;
                out.line(
                    format!("watching prefix {}", shown(&name)),
                    json!({"watching": name, "prefix": true}),
                )?;
            } else {
                match client.watch(&name).await? {
                    Some((session, token)) => out.line(
                        format!(
                            "{}: owned by session {} token {token}",
                            shown(&name),
                            hex(session)
                        ),
                        json!({"port": name, "event": "owned", "session": hex(session), "token": token}),
                    )?,
                    None => out.line(
                        format!("{}: free", shown(&name)),
                        json!({"port": name, "event": "free"}),
                    )?,
                }
            }
            let expired = async {
                match ctx.deadline {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            };
            tokio::pin!(expired);
            let gone = stdout_gone();
            tokio::pin!(gone);
            let mut seen = 0;
            while count.is_none_or(|c| seen < c) {
                let ev = tokio::select! {
                    ev = events.recv() => ev?,
                    // Ctrl-C is how a watch without --count ends: not a failure.
                    _ = interrupted() => {
                        bye(&client).await;
                        return Ok(ExitCode::SUCCESS);
                    }
                    _ = &mut gone => return Err(StdoutClosed.into()),
                    _ = &mut expired => {
                        bye(&client).await;
                        let what = match count {
                            Some(c) => format!("{c} changes of {} ({seen} seen)", shown(&name)),
                            None => format!("changes of {}", shown(&name)),
                        };
                        return Err(TimedOut { what, after: ctx.timeout.unwrap_or_default() }.into());
                    }
                };
                match ev {
                    Event::Claimed {
                        port,
                        session,
                        token,
                        node,
                    } => out.line(
                        format!(
                            "{}: claimed by session {} ({}) token {token}",
                            text(&port),
                            hex(session),
                            text(&node)
                        ),
                        json!({"port": lossy(&port), "event": "claimed", "session": hex(session), "node": lossy(&node), "token": token}),
                    )?,
                    Event::Released { port, token } => out.line(
                        format!("{}: released (token {token})", text(&port)),
                        json!({"port": lossy(&port), "event": "released", "token": token}),
                    )?,
                    Event::Resync if !prefix => {
                        // Events may have been missed (a failover, say): the state now.
                        match client.query(&name).await {
                            Ok(Some(o)) => out.line(
                                format!(
                                    "{}: resync: owned by session {} ({}) token {}",
                                    shown(&name),
                                    hex(o.session),
                                    text(&o.node),
                                    o.token
                                ),
                                json!({"port": name, "event": "resync", "session": hex(o.session), "node": lossy(&o.node), "token": o.token}),
                            )?,
                            Ok(None) => out.line(
                                format!("{}: resync: free", shown(&name)),
                                json!({"port": name, "event": "resync", "session": null}),
                            )?,
                            // A new master still recovering: the owner may not be
                            // back yet; the next change is reported as it comes.
                            Err(e) => out.line(
                                format!("{}: resync: {}", shown(&name), shown(&e.to_string())),
                                json!({"port": name, "event": "resync", "error": e.to_string()}),
                            )?,
                        }
                    }
                    Event::Resync => out.line(
                        "resync: events were missed; list the prefix for the state now".into(),
                        json!({"event": "resync"}),
                    )?,
                    Event::OwnershipLost { reason, .. } => {
                        return Err(format!("session lost: {reason}").into())
                    }
                    _ => continue,
                }
                seen += 1;
            }
            client.close().await?;
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Send { name, payload } => {
            let client = ctx.connect(opts).await?;
            let r = client.send(&name, &payload).await?;
            client.close().await?;
            match r {
                SendOutcome::Delivered => {
                    out.line(
                        format!("delivered to the owner of {}", shown(&name)),
                        json!({"result": "delivered", "port": name}),
                    )?;
                    Ok(ExitCode::SUCCESS)
                }
                SendOutcome::NoOwner => {
                    out.line(
                        format!("{} has no owner", shown(&name)),
                        json!({"result": "no_owner", "port": name}),
                    )?;
                    Ok(ExitCode::from(3))
                }
            }
        }
        Cmd::Broadcast { payload, prefix } => {
            let client = ctx.connect(opts).await?;
            let n = client
                .broadcast(prefix.as_deref().map(str::as_bytes), &payload)
                .await?;
            client.close().await?;
            out.line(format!("sent to {n} recipients"), json!({"recipients": n}))?;
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Status => status(&opts, &addrs, out).await,
        Cmd::Lock {
            name,
            kill_after_ms,
            command,
        } => {
            let client = ctx.connect(opts).await?;
            let what = || format!("lock {}", shown(&name));
            let lock = ctx
                .wait(&client, what, Lock::acquire(&client, &name))
                .await??;
            if !json {
                note(&format!(
                    "holding lock {} with token {}",
                    shown(&name),
                    lock.token()
                ));
            }
            let grace = Duration::from_millis(kill_after_ms);
            let code = if command.is_empty() {
                // Like `etcdctl lock NAME`: hold until interrupted.
                tokio::select! {
                    _ = lock.lost() => {
                        note(&format!("lock {} lost", shown(&name)));
                        ExitCode::from(4)
                    }
                    _ = interrupted() => ExitCode::SUCCESS,
                }
            } else {
                run_while(&command, lock.token(), &name, lock.lost(), grace).await?
            };
            if client.is_alive() {
                lock.release().await?;
                client.close().await?;
            }
            Ok(code)
        }
        Cmd::Lockout { cmd } => match cmd {
            LockoutCmd::List => {
                let result = admin(ctx, opts, None, &json!({"op": "lockout_list"})).await?;
                if json {
                    out.raw(&json_line(&result))?;
                } else {
                    out.raw(&lockout_table(&result))?;
                }
                Ok(ExitCode::SUCCESS)
            }
            LockoutCmd::UnlockAddr { ip } => {
                let command = json!({"op": "addr_unlock", "addr": ip.to_string()});
                let result = admin(ctx, opts, None, &command).await?;
                unlocked(out, &result, &format!("address {}", shown_addr(ip)))
            }
        },
        Cmd::User { cmd } => {
            let listing = matches!(cmd, UserCmd::List);
            let unlocking = match &cmd {
                UserCmd::Unlock { name } => Some(name.clone()),
                _ => None,
            };
            let command = match cmd {
                UserCmd::Add { name, roles } => {
                    json!({"op": "user_add", "user": name, "password": new_password()?, "roles": roles})
                }
                UserCmd::Passwd { name } => {
                    json!({"op": "user_passwd", "user": name, "password": new_password()?})
                }
                UserCmd::Del { name } => json!({"op": "user_del", "user": name}),
                UserCmd::List => json!({"op": "user_list"}),
                UserCmd::Grant { name, role } => {
                    json!({"op": "user_grant", "user": name, "role": role})
                }
                UserCmd::Revoke { name, role } => {
                    json!({"op": "user_revoke", "user": name, "role": role})
                }
                UserCmd::Unlock { name } => json!({"op": "user_unlock", "user": name}),
            };
            let result = admin(ctx, opts, offline, &command).await?;
            if let Some(name) = unlocking {
                return unlocked(out, &result, &format!("user {}", shown(&name)));
            }
            if json {
                out.raw(&json_line(&result))?;
            } else if listing {
                out.raw(&users_table(&result))?;
            } else {
                out.raw("ok")?;
            }
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Member { cmd } => {
            let command = match cmd {
                MemberCmd::Add {
                    id,
                    peer_addr,
                    client_addr,
                } => {
                    json!({"op": "member_add", "id": id, "peer_addr": peer_addr, "client_addr": client_addr})
                }
                MemberCmd::Remove { id } => json!({"op": "member_remove", "id": id}),
                MemberCmd::List => json!({"op": "member_list"}),
            };
            let client = ctx.connect(opts).await?;
            let result = client.admin(&command.to_string()).await;
            client.close().await?;
            let status: serde_json::Value = serde_json::from_str(&result?)?;
            if json {
                out.raw(&json_line(&status))?;
            } else {
                out.raw(&format!(
                    "leader {}  term {}  epoch {}  voters {}",
                    shown(&status["leader"].to_string()),
                    shown(&status["term"].to_string()),
                    shown(&status["facts"]["epoch"].to_string()),
                    shown(&status["voters"].to_string())
                ))?;
                if let Some(members) = status["members"].as_object() {
                    for (id, m) in members {
                        out.raw(&format!(
                            "  member {}: clients {}  peers {}",
                            shown(id),
                            shown(m["client_addr"].as_str().unwrap_or("?")),
                            shown(m["peer_addr"].as_str().unwrap_or("?"))
                        ))?;
                    }
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Role { cmd } => {
            let listing = matches!(cmd, RoleCmd::List);
            let command = match cmd {
                RoleCmd::Add { name, grants } => {
                    let grants = grants
                        .iter()
                        .map(|g| {
                            let (prefix, perms) = g
                                .split_once('=')
                                .ok_or(format!("--grant {g}: expected PREFIX=PERMS"))?;
                            Ok(json!({"prefix": prefix, "perms": perms}))
                        })
                        .collect::<Result<Vec<_>, String>>()?;
                    json!({"op": "role_add", "role": name, "grants": grants})
                }
                RoleCmd::Del { name } => json!({"op": "role_del", "role": name}),
                RoleCmd::List => json!({"op": "role_list"}),
            };
            let result = admin(ctx, opts, offline, &command).await?;
            if json {
                out.raw(&json_line(&result))?;
            } else if listing {
                out.raw(&roles_table(&result))?;
            } else {
                out.raw("ok")?;
            }
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Elect {
            name,
            value,
            observe,
            kill_after_ms,
            command,
        } => {
            if !observe && command.is_empty() {
                return Err("elect needs -- COMMAND (or --observe)".into());
            }
            let client = ctx.connect(opts).await?;
            let election = Election::new(&client, &name);
            if observe {
                let what = || format!("changes of the leader of {}", shown(&name));
                let mut w = ctx.wait(&client, &what, election.observe()).await??;
                let gone = stdout_gone();
                tokio::pin!(gone);
                loop {
                    let next = tokio::select! {
                        next = ctx.wait(&client, &what, w.next()) => next?,
                        _ = &mut gone => return Err(StdoutClosed.into()),
                    };
                    let Some(change) = next else { break };
                    match change {
                        LeaderChange::Leader(o) => out.line(
                            format!(
                                "{}: leader {} ({}) token {} value \"{}\"",
                                shown(&name),
                                hex(o.session),
                                text(&o.node),
                                o.token,
                                text(&o.value)
                            ),
                            json!({"election": name, "leader": hex(o.session), "node": lossy(&o.node), "token": o.token, "value": lossy(&o.value)}),
                        )?,
                        LeaderChange::Vacant => out.line(
                            format!("{}: no leader", shown(&name)),
                            json!({"election": name, "leader": null}),
                        )?,
                    }
                }
                return Ok(ExitCode::SUCCESS);
            }
            let what = || format!("leadership of {}", shown(&name));
            let leadership = ctx.wait(&client, what, election.campaign(&value)).await??;
            if !json {
                note(&format!(
                    "elected leader of {} with token {}",
                    shown(&name),
                    leadership.token()
                ));
            }
            let grace = Duration::from_millis(kill_after_ms);
            let code = run_while(
                &command,
                leadership.token(),
                &name,
                leadership.lost(),
                grace,
            )
            .await?;
            if client.is_alive() {
                leadership.resign().await?;
                client.close().await?;
            }
            Ok(code)
        }
    }
}

/// `ctl status`: every server named, master or not — its role, epoch, lease and
/// recovery state, then its other figures. With credentials, each server that can
/// check them (a master, a server on its own) is logged in to, so refused credentials
/// fail the command as they fail any other.
async fn status(opts: &ClientOptions, addrs: &[String], out: Out) -> AppResult {
    let mut failed = false;
    for addr in addrs {
        let stats = match portswitch_client::server_stats(opts, addr).await {
            Ok(s) => s,
            Err(e) => {
                failed = true;
                let why = advice(e.into()).to_string();
                // Most errors name the server already.
                let human = if why.contains(addr.as_str()) {
                    shown(&why)
                } else {
                    format!("server {}: {}", shown(addr), shown(&why))
                };
                out.line(human, json!({"addr": addr, "error": why}))?;
                continue;
            }
        };
        let get = |k: &str| stats.iter().find(|(n, _)| n == k).map_or(0, |(_, v)| *v);
        if out.json {
            let mut m = serde_json::Map::new();
            m.insert("addr".into(), json!(addr));
            m.insert("role_name".into(), json!(role_name(get("role"))));
            for (k, v) in &stats {
                m.insert(k.clone(), json!(v));
            }
            out.raw(&json_line(&serde_json::Value::Object(m)))?;
        } else {
            let recovering = if get("recovering") == 1 {
                format!("yes, {} ms left", get("recovery_left_ms"))
            } else {
                "no".to_string()
            };
            out.raw(&format!(
                "server {}  node {}  {}  epoch {}  master lease {} ms left  recovering {recovering}",
                shown(addr),
                get("node_id"),
                role_name(get("role")),
                get("epoch"),
                get("master_lease_left_ms"),
            ))?;
            for (k, v) in &stats {
                out.raw(&format!("  {:<34} {v}", shown(k)))?;
            }
        }
    }
    Ok(if failed {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    })
}

/// `user list` as a table: a user and their roles per line.
fn users_table(result: &serde_json::Value) -> String {
    let rows: Vec<Vec<String>> = result
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default()
        .iter()
        .map(|u| {
            let roles: Vec<String> = u["roles"]
                .as_array()
                .map(Vec::as_slice)
                .unwrap_or_default()
                .iter()
                .map(|r| shown(r.as_str().unwrap_or("?")))
                .collect();
            vec![
                shown(u["user"].as_str().unwrap_or("?")),
                if roles.is_empty() {
                    "-".to_string()
                } else {
                    roles.join(",")
                },
            ]
        })
        .collect();
    table(&["USER", "ROLES"], &rows)
}

/// `role list` as a table: one line per grant (a role without grants has one line
/// with none); the empty prefix, every port, shows as `""`.
fn roles_table(result: &serde_json::Value) -> String {
    let mut rows = Vec::new();
    for r in result.as_array().map(Vec::as_slice).unwrap_or_default() {
        let role = shown(r["role"].as_str().unwrap_or("?"));
        let grants = r["grants"]
            .as_array()
            .map(Vec::as_slice)
            .unwrap_or_default();
        if grants.is_empty() {
            rows.push(vec![role.clone(), "-".into(), "-".into()]);
        }
        for g in grants {
            let prefix = match g["prefix"].as_str().unwrap_or("") {
                "" => "\"\"".to_string(),
                p => shown(p),
            };
            rows.push(vec![
                role.clone(),
                prefix,
                shown(g["perms"].as_str().unwrap_or("")),
            ]);
        }
    }
    table(&["ROLE", "PREFIX", "PERMISSIONS"], &rows)
}

/// The answer to `user unlock` or `lockout unlock-addr`: the server's JSON, or a line
/// saying whether there was anything to end.
fn unlocked(out: Out, result: &serde_json::Value, who: &str) -> AppResult {
    if out.json {
        out.raw(&json_line(result))?;
    } else if result["had_failures"].as_bool().unwrap_or(false) {
        out.raw(&format!("unlocked {who}"))?;
    } else {
        out.raw(&format!(
            "{who} had no failed logins counted: nothing to unlock"
        ))?;
    }
    Ok(ExitCode::SUCCESS)
}

/// An address as the server counts it: an IPv6 address stands for its /64.
fn shown_addr(addr: std::net::IpAddr) -> String {
    match addr {
        std::net::IpAddr::V6(v6) if v6.to_ipv4_mapped().is_none() => {
            let s = v6.segments();
            let net = std::net::Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0);
            format!("{net}/64")
        }
        a => a.to_canonical().to_string(),
    }
}

/// How long something is refused for, from milliseconds: tenths of a second below
/// 10 s, whole seconds (rounded up) below a minute, then minutes and seconds.
fn refused_for(ms: u64) -> String {
    if ms < 10_000 {
        return format!("{:.1}s", ms as f64 / 1e3);
    }
    let secs = ms.div_ceil(1_000);
    if secs < 60 {
        format!("{secs}s")
    } else {
        format!("{}m{:02}s", secs / 60, secs % 60)
    }
}

/// `lockout list` as a table: who is refused (a user name, at a trusted address if
/// that is the back-off; a name that is no user by its hash, as in the audit log; an
/// address), after how many failures, for how much longer.
fn lockout_table(result: &serde_json::Value) -> String {
    let entries = result.as_array().map(Vec::as_slice).unwrap_or_default();
    if entries.is_empty() {
        return "no user name or address is refused now".into();
    }
    let rows: Vec<Vec<String>> = entries
        .iter()
        .map(|e| {
            let who = match (e["addr"].as_str(), e["user"].as_str()) {
                (Some(addr), _) => match addr.parse() {
                    Ok(ip) => format!("address {}", shown_addr(ip)),
                    Err(_) => format!("address {}", shown(addr)),
                },
                (None, Some(user)) => format!("user {}", shown(user)),
                (None, None) => format!(
                    "unknown user #{}",
                    shown(e["user_hash"].as_str().unwrap_or("?"))
                ),
            };
            let who = match e["at"].as_str() {
                Some(at) => format!("{who} from {}", shown(at)),
                None => who,
            };
            vec![
                who,
                e["failures"].as_u64().map_or("?".into(), |n| n.to_string()),
                e["refused_ms"].as_u64().map_or("?".into(), refused_for),
            ]
        })
        .collect();
    table(&["WHO", "FAILURES", "REFUSED FOR"], &rows)
}

/// Runs `command` in a process group of its own, with the token in its environment,
/// until it exits (its exit code is returned), `lost` resolves (exit code 4) or this
/// process is interrupted (130). Stopping it sends SIGTERM to the whole group and,
/// `grace` later, SIGKILL: whatever it started stops with it.
async fn run_while(
    command: &[String],
    token: u64,
    name: &str,
    lost: impl std::future::Future<Output = ()>,
    grace: Duration,
) -> AppResult {
    let (program, rest) = command.split_first().ok_or("no command given")?;
    let mut child = tokio::process::Command::new(program)
        .args(rest)
        .env("PORTSWITCH_TOKEN", token.to_string())
        .env("PORTSWITCH_NAME", name)
        .process_group(0)
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| format!("cannot run {}: {e}", shown(program)))?;
    let group = child.id().map(|id| nix::unistd::Pid::from_raw(id as i32));
    let code = tokio::select! {
        status = child.wait() => {
            let status = status?;
            // Nothing the command left behind may run on without the lock.
            if let Some(g) = group {
                let _ = nix::sys::signal::killpg(g, nix::sys::signal::Signal::SIGKILL);
            }
            return Ok(ExitCode::from(status.code().map_or(1, |c| c.clamp(0, 255) as u8)));
        }
        _ = lost => {
            note(&format!("ownership of {} lost: stopping the command", shown(name)));
            ExitCode::from(4)
        }
        _ = interrupted() => ExitCode::from(130),
    };
    stop_group(&mut child, group, grace).await;
    Ok(code)
}

/// SIGTERM to the group, then SIGKILL to what is left after `grace`.
async fn stop_group(
    child: &mut tokio::process::Child,
    group: Option<nix::unistd::Pid>,
    grace: Duration,
) {
    use nix::sys::signal::{killpg, Signal};
    let Some(g) = group else {
        let _ = child.kill().await;
        return;
    };
    let _ = killpg(g, Signal::SIGTERM);
    if tokio::time::timeout(grace, child.wait()).await.is_err() {
        let _ = killpg(g, Signal::SIGKILL);
        let _ = child.wait().await;
    } else {
        // The leader of the group is gone; anything it left behind goes too.
        let _ = killpg(g, Signal::SIGKILL);
    }
}

/// The command was interrupted (exit code 130).
#[derive(Debug)]
pub(crate) struct Interrupted;

impl std::fmt::Display for Interrupted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("interrupted; the session ended")
    }
}

impl std::error::Error for Interrupted {}

/// Resolves on SIGINT or SIGTERM, so that `kill` releases ports as cleanly as Ctrl-C.
pub(crate) async fn interrupted() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        if let Ok(mut term) = signal(SignalKind::terminate()) {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
            return;
        }
    }
    let _ = tokio::signal::ctrl_c().await;
}

/// Runs one admin command (on the server, or offline on a data directory) and
/// returns its result.
async fn admin(
    ctx: &Ctx,
    opts: ClientOptions,
    offline: Option<std::path::PathBuf>,
    command: &serde_json::Value,
) -> Result<serde_json::Value, BoxError> {
    let result = match offline {
        Some(dir) => {
            let cfg = portswitch_server::auth::AuthConfig {
                data_dir: Some(dir),
                ..Default::default()
            };
            portswitch_server::auth::admin_offline(cfg, command.to_string().as_bytes())?
        }
        None => {
            let client = ctx.connect(opts).await?;
            let result = client.admin(&command.to_string()).await;
            client.close().await?;
            result?
        }
    };
    Ok(serde_json::from_str(&result)?)
}

/// The STATS `role` number as a word.
fn role_name(role: u64) -> &'static str {
    portswitch_client::MemberRole::from_u64(role).name()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_bytes_are_escaped_and_the_rest_shown_as_is() {
        assert_eq!(text(b"svc/db"), "svc/db");
        assert_eq!(text("héllo/日本".as_bytes()), "héllo/日本");
        assert_eq!(text(b"a\x1b[31mred\x07"), "a\\x1b[31mred\\x07");
        assert_eq!(text(b"a\nb\tc\rd\x7f"), "a\\nb\\tc\\rd\\x7f");
        assert_eq!(text(b"bad\xff\xfe"), "bad\\xff\\xfe");
        assert_eq!(text("x\u{9b}31m".as_bytes()), "x\\u{9b}31m");
        assert_eq!(text("ab\u{202e}cd".as_bytes()), "ab\\u{202e}cd");
    }

    #[test]
    fn json_lines_escape_what_a_terminal_would_act_on_and_stay_json() {
        let v = json!({"port": "a\u{1b}b\u{7f}c\u{9b}d\u{2067}é"});
        let line = json_line(&v);
        assert!(
            line.chars().all(|c| !hidden(c) && !c.is_control()),
            "{line}"
        );
        assert_eq!(serde_json::from_str::<serde_json::Value>(&line).unwrap(), v);
        assert_eq!(json_line(&json!({"a": 1})), r#"{"a":1}"#);
    }

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

    #[test]
    fn tables_line_up() {
        let users =
            json!([{"user": "admin", "roles": ["root"]}, {"user": "al\u{1b}ice", "roles": []}]);
        assert_eq!(
            users_table(&users),
            "USER       ROLES\nadmin      root\nal\\x1bice  -"
        );
        let roles = json!([{"role": "w", "grants": [{"prefix": "svc/", "perms": "register,query"}, {"prefix": "", "perms": "list"}]}]);
        assert_eq!(
            roles_table(&roles),
            "ROLE  PREFIX  PERMISSIONS\nw     svc/    register,query\nw     \"\"      list"
        );
    }

    #[test]
    fn the_lockout_table_names_who_and_for_how_long() {
        let list = json!([
            {"addr": "2001:db8:1:2::", "failures": 25, "refused_ms": 900_000},
            {"user": "al\u{1b}ice", "user_known": true, "user_hash": null, "at": "127.0.0.1",
             "failures": 7, "refused_ms": 61_001},
            {"user": null, "user_known": false, "user_hash": "0123456789abcdef", "at": null,
             "failures": 5, "refused_ms": 999},
            {"addr": "203.0.113.7", "failures": 20, "refused_ms": 12_345},
        ]);
        assert_eq!(
            lockout_table(&list),
            "WHO                             FAILURES  REFUSED FOR\n\
             address 2001:db8:1:2::/64       25        15m00s\n\
             user al\\x1bice from 127.0.0.1   7         1m02s\n\
             unknown user #0123456789abcdef  5         1.0s\n\
             address 203.0.113.7             20        13s"
        );
        assert_eq!(
            lockout_table(&json!([])),
            "no user name or address is refused now"
        );
        assert_eq!(shown_addr("::ffff:10.0.0.1".parse().unwrap()), "10.0.0.1");
        assert_eq!(refused_for(1_250), "1.2s");
    }
}
