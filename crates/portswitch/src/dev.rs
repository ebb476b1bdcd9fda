//! `portswitch dev`: a local group of servers in one command, for trying things out.
//! Each member is a `portswitch serve` child process on loopback with its own data
//! directory. It says which member is master and follows changes; a member that dies
//! (kill -9 it to try a failover) leaves the others serving, and the command to start
//! it again is printed. Ctrl-C stops them all.

use std::path::PathBuf;
use std::process::{ExitCode, Stdio};

use clap::Args;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

use crate::AppResult;
use portswitch_client::MemberRole;

#[derive(Args, Debug)]
pub struct DevArgs {
    /// Members of the group: 1, 3 or 5.
    #[arg(long, default_value_t = 3)]
    nodes: u64,
    /// Client port of the first member; member i listens on BASE+i-1 for clients,
    /// BASE+100+i-1 for peers and BASE+200+i-1 for HTTP. (The default leaves 7400
    /// and 7401 to a `portswitch serve` started with its defaults.)
    #[arg(long, default_value_t = 7410)]
    base_port: u16,
    /// Where the members keep their state [default: a new directory under the
    /// system's temporary directory]
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Log filter passed to every member.
    #[arg(long, default_value = "warn,openraft=off")]
    log: String,
}

pub async fn run(args: DevArgs) -> AppResult {
    if ![1, 3, 5].contains(&args.nodes) {
        return Err("--nodes must be 1, 3 or 5".into());
    }
    if args.base_port as u64 + 200 + args.nodes > u16::MAX as u64 {
        return Err("--base-port leaves no room for the members' ports".into());
    }
    let dir = args.dir.clone().unwrap_or_else(|| {
        std::env::temp_dir().join(format!("portswitch-dev-{}", std::process::id()))
    });
    let port = |offset: u64, i: u64| args.base_port as u64 + offset + i - 1;
    let members: Vec<String> = (1..=args.nodes)
        .map(|i| format!("{i}=127.0.0.1:{}/127.0.0.1:{}", port(100, i), port(0, i)))
        .collect();
    for i in 1..=args.nodes {
        for (what, offset) in [("client", 0), ("peer", 100), ("HTTP", 200)] {
            let p = port(offset, i);
            if std::net::TcpListener::bind(("127.0.0.1", p as u16)).is_err() {
                return Err(format!(
                    "port {p} (member {i}'s {what} port) is taken; choose others with --base-port"
                )
                .into());
            }
        }
    }
    let exe = std::env::current_exe()?;
    let mut children: Vec<Option<Child>> = Vec::new();
    let member_args = |i: u64| -> Vec<String> {
        vec![
            "serve".into(),
            "--listen".into(),
            format!("127.0.0.1:{}", port(0, i)),
            "--http-listen".into(),
            format!("127.0.0.1:{}", port(200, i)),
            "--log".into(),
            args.log.clone(),
            "--data-dir".into(),
            dir.join(i.to_string()).to_string_lossy().into_owned(),
            "--node-id".into(),
            i.to_string(),
            "--member".into(),
            members.join(","),
        ]
    };
    for i in 1..=args.nodes {
        let http = format!("127.0.0.1:{}", port(200, i));
        let extra = ["--http-listen", &http, "--log", &args.log];
        let listen = format!("127.0.0.1:{}", port(0, i));
        let data = dir.join(i.to_string());
        let member = start_member(&exe, i, &listen, &data, &members.join(","), &extra).await?;
        children.push(Some(member));
    }
    let addrs: Vec<String> = (1..=args.nodes)
        .map(|i| format!("127.0.0.1:{}", port(0, i)))
        .collect();
    println!(
        "a group of {} on loopback (state in {})",
        args.nodes,
        dir.display()
    );
    for i in 1..=args.nodes {
        println!(
            "  member {i}: clients 127.0.0.1:{}  peers 127.0.0.1:{}  http http://127.0.0.1:{}/cluster  pid {}",
            port(0, i),
            port(100, i),
            port(200, i),
            children[i as usize - 1]
                .as_ref()
                .and_then(|c| c.id())
                .map_or("?".to_string(), |p| p.to_string())
        );
    }
    println!("try:  portswitch ctl --addr {} status", addrs.join(","));
    println!("Ctrl-C stops the group.");
    let mut master: Option<(usize, u64)> = None;
    let mut tick = tokio::time::interval(std::time::Duration::from_millis(250));
    // One listener for the whole run: a listener made per turn would miss a signal that
    // arrives between two turns (while asking for the master), and dev would not stop.
    let interrupted = crate::ctl::interrupted();
    tokio::pin!(interrupted);
    loop {
        tokio::select! {
            _ = &mut interrupted => break,
            _ = tick.tick() => {}
        }
        for (i, slot) in children.iter_mut().enumerate() {
            let Some(c) = slot else { continue };
            if let Ok(Some(status)) = c.try_wait() {
                *slot = None;
                println!(
                    "member {} exited ({status}); the others go on. Start it again with:\n  {} {}",
                    i + 1,
                    exe.display(),
                    member_args(i as u64 + 1).join(" ")
                );
            }
        }
        if children.iter().all(Option::is_none) {
            println!("every member has exited");
            return Ok(ExitCode::from(1));
        }
        let now = tokio::select! {
            _ = &mut interrupted => break,
            now = find_master(&addrs, &children) => now,
        };
        if now != master {
            match now {
                Some((m, epoch)) => println!("member {} is master (epoch {epoch})", m + 1),
                None => println!("no master yet"),
            }
            master = now;
        }
    }
    for c in children.iter_mut().flatten() {
        let _ = c.start_kill();
    }
    for c in children.iter_mut().flatten() {
        let _ = c.wait().await;
    }
    Ok(ExitCode::SUCCESS)
}

/// The running member that serves as master, and its epoch (asked by STATS).
async fn find_master(addrs: &[String], children: &[Option<Child>]) -> Option<(usize, u64)> {
    let mut opts = portswitch_client::ClientOptions::new("unused");
    opts.connect_timeout = std::time::Duration::from_millis(200);
    for (i, a) in addrs.iter().enumerate() {
        if children[i].is_none() {
            continue;
        }
        let Ok(stats) = portswitch_client::server_stats(&opts, a).await else {
            continue;
        };
        let get = |k: &str| stats.iter().find(|(n, _)| n == k).map(|(_, v)| *v);
        if MemberRole::from_stats(&stats) == Some(MemberRole::Master) {
            return Some((i, get("epoch").unwrap_or(0)));
        }
    }
    None
}

/// Starts `exe serve` as member `id` of the group `members` (plus `extra` flags)
/// and waits until it listens.
async fn start_member(
    exe: &std::path::Path,
    id: u64,
    listen: &str,
    data_dir: &std::path::Path,
    members: &str,
    extra: &[&str],
) -> Result<Child, Box<dyn std::error::Error + Send + Sync>> {
    let mut child = Command::new(exe)
        .args(["serve", "--listen", listen])
        .args(extra)
        .args(["--data-dir", &data_dir.to_string_lossy()])
        .args(["--node-id", &id.to_string(), "--member", members])
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()?;
    let mut lines = BufReader::new(child.stdout.take().expect("piped")).lines();
    match lines.next_line().await? {
        Some(l) if l.starts_with("listening on") => Ok(child),
        other => Err(format!("member {id} did not start: {other:?}").into()),
    }
}
