//! The commands that wait for someone else — a queued `register --wait`, `watch`,
//! `lock`, `elect` and `elect --observe` — each giving up at `--timeout` or on
//! SIGINT/SIGTERM, its session ending with BYE (through [`Ctx::wait`], or as `watch`
//! does it itself).

use std::process::ExitCode;
use std::time::Duration;

use portswitch_client::{Client, ClientOptions, Election, Event, LeaderChange, Lock};
use serde_json::json;
use tokio::sync::broadcast;

use super::connect::{bye, interrupted, run_while, TimedOut};
use super::output::{hex, lossy, note, shown, stdout_gone, text, StdoutClosed};
use super::{BoxError, Ctx};
use crate::AppResult;

/// `register --wait` queued at `position`: waits on `events` (subscribed before
/// registering, so that the grant cannot slip past) for the port, and returns its
/// token.
pub(super) async fn queued(
    ctx: &Ctx,
    client: &Client,
    mut events: broadcast::Receiver<Event>,
    name: &str,
    position: u32,
) -> Result<u64, BoxError> {
    if !ctx.out.json {
        note(&format!("queued at position {position}; waiting"));
    }
    let granted = async {
        loop {
            match events.recv().await {
                Ok(Event::Acquired { port, token }) if port == name.as_bytes() => return Ok(token),
                Ok(Event::OwnershipLost { reason, .. }) => return Err(reason),
                Ok(_) => {}
                Err(e) => return Err(e.to_string()),
            }
        }
    };
    let what = || format!("port {}", shown(name));
    match ctx.wait(client, what, granted).await? {
        Ok(token) => Ok(token),
        Err(reason) => Err(reason.into()),
    }
}

/// `ctl watch`: prints a port's changes (or those under a prefix), until `--count`
/// of them, Ctrl-C, `--timeout` or a reader that has gone.
pub(super) async fn watch(
    ctx: &Ctx,
    opts: ClientOptions,
    name: String,
    prefix: bool,
    count: Option<usize>,
    filter: Option<String>,
) -> AppResult {
    let out = ctx.out;
    let client = ctx.connect(opts).await?;
    let mut events = client.events();
    if let Some(f) = &filter {
        if let Err(e) = client.watch_prefix_where(&name, f).await {
            return super::ports::filter_refused(&client, e).await;
        }
        out.line(
            format!("watching prefix {} where {}", shown(&name), shown(f)),
            json!({"watching": name, "prefix": true, "where": f}),
        )?;
    } else if prefix {
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

/// `ctl lock`: takes the lock, then holds it until interrupted or runs the command
/// while holding it.
pub(super) async fn lock(
    ctx: &Ctx,
    opts: ClientOptions,
    name: String,
    kill_after_ms: u64,
    command: Vec<String>,
) -> AppResult {
    let client = ctx.connect(opts).await?;
    let what = || format!("lock {}", shown(&name));
    let lock = ctx
        .wait(&client, what, Lock::acquire(&client, &name))
        .await??;
    if !ctx.out.json {
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

/// `ctl elect --observe`: prints the leader of an election each time it changes.
pub(super) async fn observe(ctx: &Ctx, opts: ClientOptions, name: String) -> AppResult {
    let out = ctx.out;
    let client = ctx.connect(opts).await?;
    let election = Election::new(&client, &name);
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
    Ok(ExitCode::SUCCESS)
}

/// `ctl elect`: campaigns for leadership, then runs the command while leader.
pub(super) async fn elect(
    ctx: &Ctx,
    opts: ClientOptions,
    name: String,
    value: String,
    kill_after_ms: u64,
    command: Vec<String>,
) -> AppResult {
    if command.is_empty() {
        return Err("elect needs -- COMMAND (or --observe)".into());
    }
    let client = ctx.connect(opts).await?;
    let election = Election::new(&client, &name);
    let what = || format!("leadership of {}", shown(&name));
    let leadership = ctx.wait(&client, what, election.campaign(&value)).await??;
    if !ctx.out.json {
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
