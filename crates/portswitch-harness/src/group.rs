//! A group of `portswitch serve` members as child processes on loopback: started
//! with the flags given, killed with SIGKILL, stopped and continued, started again
//! from their data directories; the master found by asking each member's STATS.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

pub use nix::sys::signal::Signal;
use portswitch_client::{server_stats, Client, ClientOptions, MemberRole};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

use crate::Result;

/// How long a member may take to print that it listens.
const START_LIMIT: Duration = Duration::from_secs(30);

/// A free port below the ephemeral range (10000-19999), so that no outgoing
/// connection takes it between this check and the server binding it. Ports are
/// handed out in turn from a start that depends on the process id, so concurrent
/// processes rarely try the same ones.
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU16, Ordering};
    static NEXT: AtomicU16 = AtomicU16::new(0);
    let start = (std::process::id() % 1_000) as u16 * 10;
    loop {
        let p = 10_000 + (start + NEXT.fetch_add(1, Ordering::Relaxed)) % 10_000;
        if std::net::TcpListener::bind(("127.0.0.1", p)).is_ok() {
            return p;
        }
    }
}

/// What member to start and how: `server serve --listen LISTEN --data-dir DIR
/// --node-id ID --member MEMBERS FLAGS…`, inside network namespace `netns` if given.
#[derive(Debug, Clone)]
pub struct Member<'a> {
    pub server: &'a Path,
    pub netns: Option<&'a str>,
    pub id: u64,
    pub listen: &'a str,
    pub data_dir: &'a Path,
    pub members: &'a str,
    pub flags: &'a [String],
    /// Pass the member's log (stderr) on rather than discarding it.
    pub log: bool,
}

/// Starts a member and waits (up to 30 s) until it says it listens. The child is
/// killed when dropped. Inside a namespace it runs under `ip netns exec`, which execs
/// the server itself: the child's pid is the server's.
pub async fn start_member(m: &Member<'_>) -> Result<Child> {
    let mut cmd = match m.netns {
        Some(ns) => {
            let mut c = Command::new("ip");
            c.args(["netns", "exec", ns]).arg(m.server);
            c
        }
        None => Command::new(m.server),
    };
    let mut child = cmd
        .args(["serve", "--listen", m.listen])
        .arg("--data-dir")
        .arg(m.data_dir)
        .args(["--node-id", &m.id.to_string(), "--member", m.members])
        .args(m.flags)
        .stdout(Stdio::piped())
        .stderr(if m.log {
            Stdio::inherit()
        } else {
            Stdio::null()
        })
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| format!("cannot start {}: {e}", m.server.display()))?;
    let mut lines = BufReader::new(child.stdout.take().ok_or("no stdout")?).lines();
    match tokio::time::timeout(START_LIMIT, lines.next_line()).await {
        Ok(Ok(Some(l))) if l.starts_with("listening on") => Ok(child),
        Ok(other) => Err(format!("member {} did not start: {other:?}", m.id).into()),
        Err(_) => Err(format!("member {} did not listen within 30 s", m.id).into()),
    }
}

/// The index of the member of `addrs` that serves as master (asked by STATS, which
/// needs no session; members `skip` names are not asked), waiting up to `limit`.
pub async fn find_master(
    addrs: &[String],
    skip: impl Fn(usize) -> bool,
    limit: Duration,
) -> Result<usize> {
    let mut opts = ClientOptions::new("unused");
    // A member cut off from the network must not hold the search up for long.
    opts.connect_timeout = Duration::from_millis(500);
    let deadline = Instant::now() + limit;
    loop {
        for (i, a) in addrs.iter().enumerate() {
            if skip(i) {
                continue;
            }
            if let Ok(s) = server_stats(&opts, a).await {
                if MemberRole::from_stats(&s) == Some(MemberRole::Master) {
                    return Ok(i);
                }
            }
        }
        if Instant::now() >= deadline {
            return Err(format!("no master within {limit:?}").into());
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// One of a member's STATS counters, by name.
pub async fn stat(addr: &str, name: &str) -> Result<u64> {
    let s = server_stats(&ClientOptions::new("unused"), addr).await?;
    s.iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| *v)
        .ok_or_else(|| format!("{addr} has no counter {name:?}").into())
}

/// How to start a [`Group`].
#[derive(Debug, Clone)]
pub struct GroupSpec {
    /// The `portswitch` binary.
    pub server: PathBuf,
    /// Names the group's directory (several groups in one process need different
    /// tags).
    pub tag: String,
    /// Members (1, 3 or 5).
    pub size: usize,
    /// Flags every member gets besides the group's own.
    pub flags: Vec<String>,
    /// Pause between starting one member and the next.
    pub pause: Duration,
    /// `(i, addr)`: the others reach member `i` at `addr` (a relay's), while it
    /// accepts its peers on a port of its own.
    pub via: Vec<(usize, String)>,
    /// Pass the members' logs on (stderr).
    pub log: bool,
}

impl GroupSpec {
    /// Three members of `server`, no extra flags.
    pub fn new(server: impl Into<PathBuf>, tag: &str) -> GroupSpec {
        GroupSpec {
            server: server.into(),
            tag: tag.to_string(),
            size: 3,
            flags: Vec::new(),
            pause: Duration::ZERO,
            via: Vec::new(),
            log: false,
        }
    }

    pub fn flags<S: AsRef<str>>(mut self, flags: &[S]) -> GroupSpec {
        self.flags
            .extend(flags.iter().map(|f| f.as_ref().to_string()));
        self
    }
}

/// A running group. Members are killed and its directory removed when it is dropped.
#[derive(Debug)]
pub struct Group {
    spec: GroupSpec,
    dir: PathBuf,
    /// Each member's client address.
    pub addrs: Vec<String>,
    /// The group as `--member` names it.
    pub members: String,
    /// Where member `i` accepts peers when they reach it elsewhere (`spec.via`).
    pub peer_listen: Vec<Option<String>>,
    children: Vec<Option<Child>>,
}

impl Group {
    /// Starts the members (`spec.pause` apart). It does not wait for a master: see
    /// [`Group::master`].
    pub async fn start(spec: GroupSpec) -> Result<Group> {
        let dir = std::env::temp_dir().join(format!(
            "portswitch-group-{}-{}",
            spec.tag,
            std::process::id()
        ));
        let _ = std::fs::remove_dir_all(&dir);
        let n = spec.size;
        let addrs: Vec<String> = (0..n)
            .map(|_| format!("127.0.0.1:{}", free_port()))
            .collect();
        let mut peer_listen = vec![None; n];
        let members = (0..n)
            .map(|i| {
                let own = format!("127.0.0.1:{}", free_port());
                let peer = match spec.via.iter().find(|(j, _)| *j == i) {
                    Some((_, relay)) => {
                        peer_listen[i] = Some(own);
                        relay.clone()
                    }
                    None => own,
                };
                format!("{}={peer}/{}", i + 1, addrs[i])
            })
            .collect::<Vec<_>>()
            .join(",");
        let mut g = Group {
            children: (0..n).map(|_| None).collect(),
            spec,
            dir,
            addrs,
            members,
            peer_listen,
        };
        for i in 0..n {
            if i > 0 {
                tokio::time::sleep(g.spec.pause).await;
            }
            g.spawn(i).await?;
        }
        Ok(g)
    }

    /// Starts member `i` (again, from its data directory if it ran before).
    pub async fn spawn(&mut self, i: usize) -> Result<()> {
        let mut flags = self.spec.flags.clone();
        if let Some(a) = &self.peer_listen[i] {
            flags.extend(["--peer-listen".to_string(), a.clone()]);
        }
        let child = start_member(&Member {
            server: &self.spec.server,
            netns: None,
            id: i as u64 + 1,
            listen: &self.addrs[i],
            data_dir: &self.dir.join(i.to_string()),
            members: &self.members,
            flags: &flags,
            log: self.spec.log,
        })
        .await?;
        self.children[i] = Some(child);
        Ok(())
    }

    /// Where the members keep their data (`<dir>/<i>`); removed with the group.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Whether member `i` is running (as far as this group started and reaped it).
    pub fn running(&self, i: usize) -> bool {
        self.children[i].is_some()
    }

    /// Member `i`'s process id.
    pub fn pid(&self, i: usize) -> Option<u32> {
        self.children[i].as_ref().and_then(|c| c.id())
    }

    /// Sends member `i` a signal.
    pub fn signal(&self, i: usize, sig: Signal) -> Result<()> {
        let pid = self.pid(i).ok_or("member not running")?;
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), sig)
            .map_err(|e| format!("kill -{sig} {pid}: {e}"))?;
        Ok(())
    }

    /// SIGKILLs member `i` and reaps it.
    pub async fn kill(&mut self, i: usize) -> Result<()> {
        if let Some(mut child) = self.children[i].take() {
            child.start_kill()?;
            child.wait().await?;
        }
        Ok(())
    }

    /// Waits for member `i` to exit by itself (after a SIGTERM, say) and reaps it.
    pub async fn wait(&mut self, i: usize) -> Result<std::process::ExitStatus> {
        let mut child = self.children[i].take().ok_or("member not running")?;
        Ok(child.wait().await?)
    }

    /// The running member serving as master, other than `not`, waiting up to 30 s.
    pub async fn master(&self, not: Option<usize>) -> Result<usize> {
        find_master(
            &self.addrs,
            |i| Some(i) == not || !self.running(i),
            Duration::from_secs(30),
        )
        .await
    }

    /// One of member `i`'s STATS counters.
    pub async fn stat(&self, i: usize, name: &str) -> Result<u64> {
        stat(&self.addrs[i], name).await
    }

    /// Client options that know every member, first trying member 0.
    pub fn client_options(&self, lease: Duration) -> ClientOptions {
        let mut o = ClientOptions::new(self.addrs[0].clone());
        o.servers = self.addrs[1..].to_vec();
        o.lease = lease;
        o
    }

    /// A session on the group's master.
    pub async fn client(&self, lease: Duration) -> Result<Client> {
        Ok(Client::connect(self.client_options(lease)).await?)
    }

    /// Stops every member (SIGKILL) and removes the group's directory.
    pub async fn stop(mut self) {
        for c in self.children.iter_mut().flatten() {
            let _ = c.start_kill();
            let _ = c.wait().await;
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl Drop for Group {
    fn drop(&mut self) {
        for c in self.children.iter_mut().flatten() {
            let _ = c.start_kill();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
