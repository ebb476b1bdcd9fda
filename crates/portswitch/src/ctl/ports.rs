//! The commands on ports: `register` (a queued one waits for its grant in
//! [`super::wait::queued`]), `unregister`, `query`, `list`, `send` and `broadcast`.

use std::process::ExitCode;
use std::time::Duration;

use portswitch_client::{ClientOptions, ErrorCode, Event, RegisterOutcome, SendOutcome};
use serde_json::json;

use super::connect::interrupted;
use super::output::{hex, lossy, note, shown, text};
use super::Ctx;
use crate::AppResult;

/// `ctl register`: owns the port (queued for it with `--wait`), prints what is
/// relayed to it while holding it, and releases it at Ctrl-C or after `--hold-secs`;
/// with `--detach`, leaves the session alive and prints it.
pub(super) async fn register(
    ctx: &Ctx,
    opts: ClientOptions,
    name: String,
    value: String,
    wait: bool,
    hold_secs: Option<f64>,
    detach: bool,
) -> AppResult {
    let out = ctx.out;
    let client = ctx.connect(opts).await?;
    // Listen before asking, so that a grant cannot slip past.
    let events = client.events();
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
            super::wait::queued(ctx, &client, events, &name, position).await?
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

/// `ctl unregister`: releases a port held by a detached session, which lives on.
pub(super) async fn unregister(
    ctx: &Ctx,
    mut opts: ClientOptions,
    name: String,
    session: String,
) -> AppResult {
    let out = ctx.out;
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

/// `ctl query`: who owns a port.
pub(super) async fn query(ctx: &Ctx, opts: ClientOptions, name: String) -> AppResult {
    let out = ctx.out;
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

/// `ctl list`: owned ports under a prefix, page by page.
pub(super) async fn list(
    ctx: &Ctx,
    opts: ClientOptions,
    prefix: String,
    limit: Option<usize>,
    filter: Option<String>,
) -> AppResult {
    let out = ctx.out;
    let client = ctx.connect(opts).await?;
    let page_limit = client.session().limits.list_limit_max;
    let mut cursor = 0;
    let mut shown_count = 0usize;
    'pages: loop {
        // With a filter a page may be short, even empty, before the end: the cursor
        // alone says whether more remain.
        let page = match &filter {
            Some(f) => match client.list_where(&prefix, f, cursor, page_limit).await {
                Ok(page) => page,
                Err(e) => return filter_refused(&client, e).await,
            },
            None => client.list(&prefix, cursor, page_limit).await?,
        };
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

/// A `--where` filter the server refused (`query_invalid`): its message, which gives
/// the position with the line and a caret, on standard error line by line, and exit
/// code 2 (as `portswitch query` does for an expression that does not compile). Any
/// other error is returned as it is.
pub(super) async fn filter_refused(
    client: &portswitch_client::Client,
    e: portswitch_client::Error,
) -> AppResult {
    let portswitch_client::Error::Server {
        code: ErrorCode::QueryInvalid,
        message,
        ..
    } = &e
    else {
        return Err(e.into());
    };
    let mut lines = message.lines();
    note(&format!(
        "error: --where does not compile: {}",
        shown(lines.next().unwrap_or(""))
    ));
    for line in lines {
        note(&shown(line));
    }
    let _ = client.close().await;
    Ok(ExitCode::from(2))
}

/// `ctl send`: relays a message to a port's owner (exit code 3 if it has none).
pub(super) async fn send(
    ctx: &Ctx,
    opts: ClientOptions,
    name: String,
    payload: String,
) -> AppResult {
    let out = ctx.out;
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

/// `ctl broadcast`: a message to every session, or to the owners under a prefix.
pub(super) async fn broadcast(
    ctx: &Ctx,
    opts: ClientOptions,
    payload: String,
    prefix: Option<String>,
) -> AppResult {
    let out = ctx.out;
    let client = ctx.connect(opts).await?;
    let n = client
        .broadcast(prefix.as_deref().map(str::as_bytes), &payload)
        .await?;
    client.close().await?;
    out.line(format!("sent to {n} recipients"), json!({"recipients": n}))?;
    Ok(ExitCode::SUCCESS)
}
