//! A group of three `portswitch serve` members as child processes on loopback, for
//! tests that kill, stop and restart them.

use std::process::Stdio;
use std::time::{Duration, Instant};

use portswitch_client::{server_stats, Client, ClientOptions, MemberRole, RegisterOutcome};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

use super::within;

const BIN: &str = env!("CARGO_BIN_EXE_portswitch");

/// Client leases in these tests; the recovery window after a failover is this plus
/// the drift margin.
pub const LEASE_MS_MAX: u32 = 12_000;

/// A free port below the ephemeral range (10000-19999), so that no outgoing
/// connection takes it between this check and the server binding it.
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

/// One group at a time: each runs three debug-build servers, and several at once on
/// a loaded two-core machine starve their leases and elections, which then measure
/// the machine rather than the failover.
pub static ONE_GROUP: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

pub struct Group {
    _turn: tokio::sync::MutexGuard<'static, ()>,
    pub children: Vec<Option<Child>>,
    pub addrs: Vec<String>,
    pub members: String,
    pub dir: std::path::PathBuf,
    /// Flags every member gets besides the group's.
    pub extra: Vec<String>,
    /// Where each member accepts peers when others reach it elsewhere (a relay).
    pub peer_listen: Vec<Option<String>>,
}

impl Group {
    pub async fn start(tag: &str) -> Group {
        Group::start_with(tag, &[]).await
    }

    pub async fn start_with(tag: &str, extra: &[&str]) -> Group {
        Group::start_staggered(tag, extra, Duration::ZERO).await
    }

    /// Starts the members `pause` apart.
    pub async fn start_staggered(tag: &str, extra: &[&str], pause: Duration) -> Group {
        Group::start_full(tag, extra, pause, &[]).await
    }

    /// Starts the members `pause` apart; each `(i, addr)` of `via` has member `i`'s
    /// peers reach it at `addr` (a relay's), while it accepts them at a port of its own.
    pub async fn start_full(
        tag: &str,
        extra: &[&str],
        pause: Duration,
        via: &[(usize, String)],
    ) -> Group {
        let turn = ONE_GROUP.lock().await;
        let dir =
            std::env::temp_dir().join(format!("portswitch-group-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let addrs: Vec<String> = (0..3)
            .map(|_| format!("127.0.0.1:{}", free_port()))
            .collect();
        let mut peer_listen = vec![None; 3];
        let members = (0..3)
            .map(|i| {
                let own = format!("127.0.0.1:{}", free_port());
                let peer = match via.iter().find(|(j, _)| *j == i) {
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
            _turn: turn,
            children: Vec::new(),
            addrs,
            members,
            dir,
            extra: extra.iter().map(|s| s.to_string()).collect(),
            peer_listen,
        };
        for i in 0..3 {
            if i > 0 {
                tokio::time::sleep(pause).await;
            }
            let c = g.spawn(i).await;
            g.children.push(Some(c));
        }
        g
    }

    pub async fn spawn(&self, i: usize) -> Child {
        let mut child = Command::new(BIN)
            .args([
                "serve",
                "--listen",
                &self.addrs[i],
                "--http-listen",
                "127.0.0.1:0",
            ])
            .args([
                "--data-dir",
                &self.dir.join(i.to_string()).to_string_lossy(),
            ])
            .args(["--node-id", &(i + 1).to_string(), "--member", &self.members])
            .args(if self.extra.iter().any(|a| a == "--lease-ms-max") {
                vec![]
            } else {
                vec!["--lease-ms-max".to_string(), LEASE_MS_MAX.to_string()]
            })
            .args(&self.extra)
            .args(
                self.peer_listen[i]
                    .iter()
                    .flat_map(|a| ["--peer-listen", a]),
            )
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("spawn serve");
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let line = within("member start", lines.next_line()).await.unwrap();
        assert!(line.unwrap().starts_with("listening on"));
        child
    }

    /// SIGKILLs member `i` and reaps it.
    pub async fn kill(&mut self, i: usize) {
        self.signal(i, "-KILL");
        self.children[i].as_mut().unwrap().wait().await.unwrap();
        self.children[i] = None;
    }

    pub fn pid(&self, i: usize) -> String {
        self.children[i].as_ref().unwrap().id().unwrap().to_string()
    }

    pub fn signal(&self, i: usize, sig: &str) {
        let ok = std::process::Command::new("kill")
            .args([sig, &self.pid(i)])
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill {sig}");
    }

    /// The member serving as master (bounded wait), optionally other than `not`.
    pub async fn master(&self, not: Option<usize>) -> usize {
        let opts = ClientOptions::new("unused");
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            for (i, a) in self.addrs.iter().enumerate() {
                if Some(i) == not || self.children[i].is_none() {
                    continue;
                }
                if let Ok(s) = server_stats(&opts, a).await {
                    if MemberRole::from_stats(&s) == Some(MemberRole::Master) {
                        return i;
                    }
                }
            }
            assert!(Instant::now() < deadline, "no master");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub async fn client(&self) -> Client {
        self.client_with_lease(LEASE_MS_MAX).await
    }

    pub async fn client_with_lease(&self, lease_ms: u32) -> Client {
        let mut o = ClientOptions::new(self.addrs[0].clone());
        o.servers = self.addrs[1..].to_vec();
        o.lease = Duration::from_millis(lease_ms as u64);
        Client::connect(o).await.expect("a client finds the master")
    }

    /// One of member `i`'s STATS.
    pub async fn stat(&self, i: usize, name: &str) -> u64 {
        let s = server_stats(&ClientOptions::new("unused"), &self.addrs[i])
            .await
            .unwrap();
        s.iter().find(|(k, _)| k == name).expect(name).1
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

pub async fn own(c: &Client, port: &str) -> u64 {
    match c.register(port, "").await.unwrap() {
        RegisterOutcome::Owned { token } => token,
        other => panic!("{port}: {other:?}"),
    }
}
