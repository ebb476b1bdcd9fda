//! `portswitch ctl`: the command-line client. Human-readable output by default,
//! one JSON object per line with `--json`.

use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Subcommand};
use portswitch_client::{
    Client, ClientOptions, Election, Event, LeaderChange, Lock, RegisterOutcome, SendOutcome,
};
use serde_json::json;

use crate::AppResult;

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
    /// The server name to verify (default: the host of --addr).
    #[arg(long, global = true)]
    server_name: Option<String>,
    /// Client certificate (PEM) for mutual TLS, with --key.
    #[arg(long, global = true, requires = "key")]
    cert: Option<std::path::PathBuf>,
    /// Key (PEM) of --cert.
    #[arg(long, global = true, requires = "cert")]
    key: Option<std::path::PathBuf>,
    /// user and role commands only: change the user store in this data directory of
    /// a stopped server instead of asking a running one (the first user of a server
    /// reachable only over the network; every member of a group keeps its own users).
    #[arg(long, global = true)]
    data_dir: Option<std::path::PathBuf>,
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
    /// List users and their roles.
    List,
    /// Give a user a role.
    Grant { name: String, role: String },
    /// Take a role from a user.
    Revoke { name: String, role: String },
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
    /// List roles and their grants.
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

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

pub async fn run(args: CtlArgs) -> AppResult {
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
    if offline.is_some() && !matches!(args.cmd, Cmd::User { .. } | Cmd::Role { .. }) {
        return Err("--data-dir applies to user and role commands only".into());
    }
    let out = |human: String, j: serde_json::Value| {
        if json {
            println!("{j}");
        } else {
            println!("{human}");
        }
    };
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
            let client = Client::connect(opts).await?;
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
                    out(
                        format!(
                            "taken: {name} is owned by session {} ({}) token {token}",
                            hex(session),
                            text(&node)
                        ),
                        json!({"result": "taken", "port": name, "session": hex(session), "token": token, "node": text(&node)}),
                    );
                    return Ok(ExitCode::from(3));
                }
                RegisterOutcome::Queued { position } => {
                    if !json {
                        eprintln!("queued at position {position}; waiting");
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
                    match until_interrupted(&client, granted).await? {
                        Ok(token) => token,
                        Err(reason) => return Err(reason.into()),
                    }
                }
            };
            let s = client.session();
            out(
                format!("registered {name} token {token} session {}", hex(s.id)),
                json!({"result": "registered", "port": name, "token": token, "session": hex(s.id)}),
            );
            if detach {
                let (id, secret) = client.detach();
                out(
                    format!("detached session {}:{}", hex(id), hex(secret)),
                    json!({"session": format!("{}:{}", hex(id), hex(secret))}),
                );
                return Ok(ExitCode::SUCCESS);
            }
            let hold = async {
                match hold_secs {
                    Some(s) => tokio::time::sleep(Duration::from_secs_f64(s.max(0.0))).await,
                    None => interrupted().await,
                }
            };
            // While holding, print what is relayed to the port (SEND, BROADCAST).
            let mut events = client.events();
            let messages = async {
                loop {
                    match events.recv().await {
                        Ok(Event::Message {
                            from,
                            port,
                            payload,
                        }) => out(
                            format!(
                                "message from session {} to {}: {}",
                                hex(from),
                                text(&port),
                                text(&payload)
                            ),
                            json!({"event": "message", "from": hex(from), "port": text(&port), "payload": text(&payload)}),
                        ),
                        Ok(_) | Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
                        Err(tokio::sync::broadcast::error::RecvError::Closed) => {
                            std::future::pending().await
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
                    eprintln!("ownership of {name} lost");
                    Ok(ExitCode::from(4))
                }
                () = messages => unreachable!("the message loop never ends"),
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
            let client = Client::connect(opts).await?;
            client.unregister(name.as_bytes()).await?;
            out(
                format!("unregistered {name}"),
                json!({"result": "unregistered", "port": name}),
            );
            client.detach();
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Query { name } => {
            let client = Client::connect(opts).await?;
            match client.query(&name).await? {
                Some(o) => out(
                    format!(
                        "{name}: owned by session {} ({}) token {} value {:?}",
                        hex(o.session),
                        text(&o.node),
                        o.token,
                        text(&o.value)
                    ),
                    json!({"port": name, "owned": true, "session": hex(o.session), "node": text(&o.node), "token": o.token, "value": text(&o.value)}),
                ),
                None => out(
                    format!("{name}: free"),
                    json!({"port": name, "owned": false}),
                ),
            }
            client.close().await?;
            Ok(ExitCode::SUCCESS)
        }
        Cmd::List { prefix, limit } => {
            let client = Client::connect(opts).await?;
            let page_limit = client.session().limits.list_limit_max;
            let mut cursor = 0;
            let mut shown = 0usize;
            'pages: loop {
                let page = client.list(&prefix, cursor, page_limit).await?;
                for o in page.entries {
                    if limit.is_some_and(|l| shown >= l) {
                        break 'pages;
                    }
                    shown += 1;
                    out(
                        format!(
                            "{}\t{}\t{}\t{}\t{}",
                            text(&o.port),
                            hex(o.session),
                            text(&o.node),
                            o.token,
                            text(&o.value)
                        ),
                        json!({"port": text(&o.port), "session": hex(o.session), "node": text(&o.node), "token": o.token, "value": text(&o.value)}),
                    );
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
            let client = Client::connect(opts).await?;
            let mut events = client.events();
            if prefix {
                client.watch_prefix(&name).await?;
                out(
                    format!("watching prefix {name}"),
                    json!({"watching": name, "prefix": true}),
                );
            } else {
                match client.watch(&name).await? {
                    Some((session, token)) => out(
                        format!("{name}: owned by session {} token {token}", hex(session)),
                        json!({"port": name, "event": "owned", "session": hex(session), "token": token}),
                    ),
                    None => out(
                        format!("{name}: free"),
                        json!({"port": name, "event": "free"}),
                    ),
                }
            }
            let mut seen = 0;
            while count.is_none_or(|c| seen < c) {
                let ev = tokio::select! {
                    ev = events.recv() => ev?,
                    _ = interrupted() => break,
                };
                match ev {
                    Event::Claimed {
                        port,
                        session,
                        token,
                        node,
                    } => out(
                        format!(
                            "{}: claimed by session {} ({}) token {token}",
                            text(&port),
                            hex(session),
                            text(&node)
                        ),
                        json!({"port": text(&port), "event": "claimed", "session": hex(session), "node": text(&node), "token": token}),
                    ),
                    Event::Released { port, token } => out(
                        format!("{}: released (token {token})", text(&port)),
                        json!({"port": text(&port), "event": "released", "token": token}),
                    ),
                    Event::Resync if !prefix => {
                        // Events may have been missed (a failover, say): the state now.
                        match client.query(&name).await {
                            Ok(Some(o)) => out(
                                format!(
                                    "{name}: resync: owned by session {} ({}) token {}",
                                    hex(o.session),
                                    text(&o.node),
                                    o.token
                                ),
                                json!({"port": name, "event": "resync", "session": hex(o.session), "node": text(&o.node), "token": o.token}),
                            ),
                            Ok(None) => out(
                                format!("{name}: resync: free"),
                                json!({"port": name, "event": "resync", "session": null}),
                            ),
                            // A new master still recovering: the owner may not be
                            // back yet; the next change is reported as it comes.
                            Err(e) => out(
                                format!("{name}: resync: {e}"),
                                json!({"port": name, "event": "resync", "error": e.to_string()}),
                            ),
                        }
                    }
                    Event::Resync => out(
                        "resync: events were missed; list the prefix for the state now".into(),
                        json!({"event": "resync"}),
                    ),
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
            let client = Client::connect(opts).await?;
            let r = client.send(&name, &payload).await?;
            client.close().await?;
            match r {
                SendOutcome::Delivered => {
                    out(
                        format!("delivered to the owner of {name}"),
                        json!({"result": "delivered", "port": name}),
                    );
                    Ok(ExitCode::SUCCESS)
                }
                SendOutcome::NoOwner => {
                    out(
                        format!("{name} has no owner"),
                        json!({"result": "no_owner", "port": name}),
                    );
                    Ok(ExitCode::from(3))
                }
            }
        }
        Cmd::Broadcast { payload, prefix } => {
            let client = Client::connect(opts).await?;
            let n = client
                .broadcast(prefix.as_deref().map(str::as_bytes), &payload)
                .await?;
            client.close().await?;
            out(format!("sent to {n} recipients"), json!({"recipients": n}));
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Status => {
            // Every server named, master or not: its role, epoch, lease and recovery
            // state, then its other figures. No session is opened.
            let mut failed = false;
            for addr in &addrs {
                let stats = match portswitch_client::server_stats(&opts, addr).await {
                    Ok(s) => s,
                    Err(e) => {
                        failed = true;
                        out(
                            format!("server {addr} unreachable: {e}"),
                            json!({"addr": addr, "error": e.to_string()}),
                        );
                        continue;
                    }
                };
                let get = |k: &str| stats.iter().find(|(n, _)| n == k).map_or(0, |(_, v)| *v);
                if json {
                    let mut m = serde_json::Map::new();
                    m.insert("addr".into(), json!(addr));
                    m.insert("role_name".into(), json!(role_name(get("role"))));
                    for (k, v) in &stats {
                        m.insert(k.clone(), json!(v));
                    }
                    println!("{}", serde_json::Value::Object(m));
                } else {
                    let recovering = if get("recovering") == 1 {
                        format!("yes, {} ms left", get("recovery_left_ms"))
                    } else {
                        "no".to_string()
                    };
                    println!(
                        "server {addr}  node {}  {}  epoch {}  master lease {} ms left  recovering {recovering}",
                        get("node_id"),
                        role_name(get("role")),
                        get("epoch"),
                        get("master_lease_left_ms"),
                    );
                    for (k, v) in &stats {
                        println!("  {k:<34} {v}");
                    }
                }
            }
            Ok(if failed {
                ExitCode::from(1)
            } else {
                ExitCode::SUCCESS
            })
        }
        Cmd::Lock {
            name,
            kill_after_ms,
            command,
        } => {
            let client = Client::connect(opts).await?;
            let lock = until_interrupted(&client, Lock::acquire(&client, &name)).await??;
            if !json {
                eprintln!("holding lock {name} with token {}", lock.token());
            }
            let grace = Duration::from_millis(kill_after_ms);
            let code = if command.is_empty() {
                // Like `etcdctl lock NAME`: hold until interrupted.
                tokio::select! {
                    _ = lock.lost() => {
                        eprintln!("lock {name} lost");
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
        Cmd::User { cmd } => {
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
            };
            admin(opts, offline, &command, json).await
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
            let client = Client::connect(opts).await?;
            let result = client.admin(&command.to_string()).await;
            client.close().await?;
            let status: serde_json::Value = serde_json::from_str(&result?)?;
            if json {
                println!("{status}");
            } else {
                println!(
                    "leader {}  term {}  epoch {}  voters {}",
                    status["leader"], status["term"], status["facts"]["epoch"], status["voters"]
                );
                if let Some(members) = status["members"].as_object() {
                    for (id, m) in members {
                        println!(
                            "  member {id}: clients {}  peers {}",
                            m["client_addr"].as_str().unwrap_or("?"),
                            m["peer_addr"].as_str().unwrap_or("?")
                        );
                    }
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Role { cmd } => {
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
            admin(opts, offline, &command, json).await
        }
        Cmd::Elect {
            name,
            value,
            observe,
            kill_after_ms,
            command,
        } => {
            let client = Client::connect(opts).await?;
            let election = Election::new(&client, &name);
            if observe {
                let mut w = until_interrupted(&client, election.observe()).await??;
                while let Some(change) = until_interrupted(&client, w.next()).await? {
                    match change {
                        LeaderChange::Leader(o) => out(
                            format!(
                                "{name}: leader {} ({}) token {} value {:?}",
                                hex(o.session),
                                text(&o.node),
                                o.token,
                                text(&o.value)
                            ),
                            json!({"election": name, "leader": hex(o.session), "node": text(&o.node), "token": o.token, "value": text(&o.value)}),
                        ),
                        LeaderChange::Vacant => out(
                            format!("{name}: no leader"),
                            json!({"election": name, "leader": null}),
                        ),
                    }
                }
                return Ok(ExitCode::SUCCESS);
            }
            if command.is_empty() {
                return Err("elect needs -- COMMAND (or --observe)".into());
            }
            let leadership = until_interrupted(&client, election.campaign(&value)).await??;
            if !json {
                eprintln!("elected leader of {name} with token {}", leadership.token());
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
        .map_err(|e| format!("cannot run {program}: {e}"))?;
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
            eprintln!("ownership of {name} lost: stopping the command");
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

/// Runs `fut` unless SIGINT or SIGTERM comes first; then the session says BYE (so it
/// leaves every queue and releases every port at once) and the error says so.
async fn until_interrupted<T>(
    client: &Client,
    fut: impl std::future::Future<Output = T>,
) -> Result<T, Box<dyn std::error::Error + Send + Sync>> {
    tokio::select! {
        r = fut => Ok(r),
        _ = interrupted() => {
            let _ = client.close().await;
            Err(Interrupted.into())
        }
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

/// Runs one admin command and prints its result.
async fn admin(
    opts: ClientOptions,
    offline: Option<std::path::PathBuf>,
    command: &serde_json::Value,
    json: bool,
) -> AppResult {
    let result = match offline {
        Some(dir) => {
            let cfg = portswitch_server::auth::AuthConfig {
                data_dir: Some(dir),
                ..Default::default()
            };
            portswitch_server::auth::admin_offline(cfg, command.to_string().as_bytes())?
        }
        None => {
            let client = Client::connect(opts).await?;
            let result = client.admin(&command.to_string()).await;
            client.close().await?;
            result?
        }
    };
    let result: serde_json::Value = serde_json::from_str(&result)?;
    if json {
        println!("{result}");
    } else {
        match result.as_array() {
            Some(rows) => {
                for row in rows {
                    println!("{row}");
                }
            }
            None => println!("ok"),
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// The STATS `role` number as a word.
fn role_name(role: u64) -> &'static str {
    match role {
        0 => "standalone",
        1 => "follower",
        2 => "taking-over",
        3 => "master",
        _ => "unknown",
    }
}
