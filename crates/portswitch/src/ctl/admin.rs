//! Administration: `status` (every server's counters), `user`, `role`, `lockout`
//! and `member`, through the server's ADMIN command (users and roles also offline,
//! on a stopped server's data directory), and the tables they print.

use std::process::ExitCode;

use portswitch_client::ClientOptions;
use serde_json::json;

use super::connect::advice;
use super::output::{json_line, shown, table, Out};
use super::{BoxError, Ctx, LockoutCmd, MemberCmd, RoleCmd, UserCmd};
use crate::AppResult;

/// `ctl status`: every server named, master or not — its role, epoch, lease and
/// recovery state, then its other figures. With credentials, each server that can
/// check them (a master, a server on its own) is logged in to, so refused credentials
/// fail the command as they fail any other.
pub(super) async fn status(opts: &ClientOptions, addrs: &[String], out: Out) -> AppResult {
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

/// `ctl lockout`: who is refused after failed logins, or ending an address's refusal.
pub(super) async fn lockout(ctx: &Ctx, opts: ClientOptions, cmd: LockoutCmd) -> AppResult {
    let out = ctx.out;
    match cmd {
        LockoutCmd::List => {
            let result = admin(ctx, opts, None, &json!({"op": "lockout_list"})).await?;
            if out.json {
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
    }
}

/// `ctl user`: adds, changes, deletes, lists, grants and revokes users (on the
/// server, or on the store in `offline`), or ends a user name's back-off.
pub(super) async fn user(
    ctx: &Ctx,
    opts: ClientOptions,
    offline: Option<std::path::PathBuf>,
    cmd: UserCmd,
) -> AppResult {
    let out = ctx.out;
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
    if out.json {
        out.raw(&json_line(&result))?;
    } else if listing {
        out.raw(&users_table(&result))?;
    } else {
        out.raw("ok")?;
    }
    Ok(ExitCode::SUCCESS)
}

/// `ctl member`: adds, removes or lists the members of a group, on its master.
pub(super) async fn member(ctx: &Ctx, opts: ClientOptions, cmd: MemberCmd) -> AppResult {
    let out = ctx.out;
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
    if out.json {
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

/// `ctl role`: adds, deletes or lists roles (on the server, or on the store in
/// `offline`).
pub(super) async fn role(
    ctx: &Ctx,
    opts: ClientOptions,
    offline: Option<std::path::PathBuf>,
    cmd: RoleCmd,
) -> AppResult {
    let out = ctx.out;
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
    if out.json {
        out.raw(&json_line(&result))?;
    } else if listing {
        out.raw(&roles_table(&result))?;
    } else {
        out.raw("ok")?;
    }
    Ok(ExitCode::SUCCESS)
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

/// The STATS `role` number as a word.
fn role_name(role: u64) -> &'static str {
    portswitch_client::MemberRole::from_u64(role).name()
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

#[cfg(test)]
mod tests {
    use super::*;

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
