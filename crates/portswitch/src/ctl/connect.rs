//! Reaching servers and letting go of them: the reachability probe run before a
//! session is opened, advice for the errors a flag would fix, BYE when a command gives
//! up ([`TimedOut`], [`Interrupted`]), and the command that `lock` and `elect` run
//! while they own their port ([`run_while`]), stopped with its whole process group.

use std::process::ExitCode;
use std::time::Duration;

use portswitch_client::Client;

use super::output::{note, shown};
use super::BoxError;
use crate::AppResult;

/// The command gave up waiting at `--timeout` (exit code 124, as `timeout(1)`).
#[derive(Debug)]
pub(crate) struct TimedOut {
    pub(super) what: String,
    pub(super) after: Duration,
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
pub(super) const REFUSED_RETRY: Duration = Duration::from_millis(300);

/// Pause between two attempts on an address that refused.
const REFUSED_PAUSE: Duration = Duration::from_millis(25);

/// Ends a session that is being given up on (BYE), waiting for the server's answer
/// at most [`BYE_WAIT`]: a server that has gone must not hold the command up until
/// the session's lease view runs out.
pub(super) async fn bye(client: &Client) {
    let _ = tokio::time::timeout(BYE_WAIT, client.close()).await;
}

/// How long a command that is giving up waits for its BYE to be answered.
const BYE_WAIT: Duration = Duration::from_secs(1);

/// Fails at once, naming each address and why, when no address given accepts a
/// connection (an address that refuses is asked again for `refused_retry`). The
/// client's own connect would keep trying every address until its connect timeout,
/// as it must through a group's election; nothing listening anywhere is no election.
pub(super) async fn reachable(
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
pub(super) fn advice(e: BoxError) -> BoxError {
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

/// Runs `command` in a process group of its own, with the token in its environment,
/// until it exits (its exit code is returned), `lost` resolves (exit code 4) or this
/// process is interrupted (130). Stopping it sends SIGTERM to the whole group and,
/// `grace` later, SIGKILL: whatever it started stops with it.
pub(super) async fn run_while(
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
