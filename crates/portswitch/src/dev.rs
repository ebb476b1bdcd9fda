//! `portswitch dev`: a local group of servers in one command, for trying things out.
//! Each member is a `portswitch serve` child process on loopback with its own data
//! directory; Ctrl-C stops them all.

use std::path::PathBuf;
use std::process::{ExitCode, Stdio};

use clap::Args;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

use crate::AppResult;

#[derive(Args, Debug)]
pub struct DevArgs {
    /// Members of the group: 1, 3 or 5.
    #[arg(long, default_value_t = 3)]
    nodes: u64,
    /// Client port of the first member; member i listens on BASE+i-1 for clients,
    /// BASE+100+i-1 for peers and BASE+200+i-1 for HTTP.
    #[arg(long, default_value_t = 7400)]
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
    let exe = std::env::current_exe()?;
    let mut children: Vec<Child> = Vec::new();
    for i in 1..=args.nodes {
        let http = format!("127.0.0.1:{}", port(200, i));
        let extra = ["--http-listen", &http, "--log", &args.log];
        let listen = format!("127.0.0.1:{}", port(0, i));
        let data = dir.join(i.to_string());
        let member = start_member(&exe, i, &listen, &data, &members.join(","), &extra).await?;
        children.push(member);
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
            "  member {i}: clients 127.0.0.1:{}  peers 127.0.0.1:{}  http http://127.0.0.1:{}/cluster",
            port(0, i),
            port(100, i),
            port(200, i)
        );
    }
    println!("try:  portswitch ctl --addr {} status", addrs.join(","));
    println!("Ctrl-C stops the group.");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        (i, status) = first_exit(&mut children) => {
            eprintln!("member {} exited ({status:?}); stopping the group", i + 1);
        }
    }
    for c in &mut children {
        let _ = c.start_kill();
    }
    for c in &mut children {
        let _ = c.wait().await;
    }
    Ok(ExitCode::SUCCESS)
}

/// Starts `exe serve` as member `id` of the group `members` (plus `extra` flags)
/// and waits until it listens.
pub(crate) async fn start_member(
    exe: &std::path::Path,
    id: u64,
    listen: &str,
    data_dir: &std::path::Path,
    members: &str,
    extra: &[&str],
) -> Result<Child, Box<dyn std::error::Error + Send + Sync>> {
    start_member_in(None, exe, id, listen, data_dir, members, extra).await
}

/// [`start_member`] inside the network namespace `netns` (`ip netns exec`, which
/// execs the server itself: the child's pid is the server's).
pub(crate) async fn start_member_in(
    netns: Option<&str>,
    exe: &std::path::Path,
    id: u64,
    listen: &str,
    data_dir: &std::path::Path,
    members: &str,
    extra: &[&str],
) -> Result<Child, Box<dyn std::error::Error + Send + Sync>> {
    let mut cmd = match netns {
        Some(ns) => {
            let mut c = Command::new("ip");
            c.args(["netns", "exec", ns]).arg(exe);
            c
        }
        None => Command::new(exe),
    };
    let mut child = cmd
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

/// Resolves when any child exits: its index and status.
async fn first_exit(children: &mut [Child]) -> (usize, std::io::Result<std::process::ExitStatus>) {
    loop {
        for (i, c) in children.iter_mut().enumerate() {
            if let Ok(Some(status)) = c.try_wait() {
                return (i, Ok(status));
            }
        }
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
}
