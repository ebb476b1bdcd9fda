//! `bench failover`: starts a group of three `portswitch serve` members on
//! loopback, connects sessions holding ports, then kills the master with SIGKILL,
//! round after round, and times how long until every session has resumed on the new
//! master and reclaimed every port (its `Resync`). Any *ownership lost* or lost port
//! is counted and reported: the figure is only good if that count is zero.

use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use portswitch_client::{server_stats, Client, ClientOptions, Event, MemberRole, RegisterOutcome};
use tokio::process::Child;

use crate::AppResult;

type Res<T> = Result<T, Box<dyn std::error::Error + Send + Sync>>;

#[derive(clap::Args, Debug)]
pub struct FailoverArgs {
    /// Sessions, each on a connection of its own, holding the ports.
    #[arg(long = "connections", value_name = "SESSIONS", default_value_t = 64)]
    pub sessions: usize,
    /// Ports held in all, spread over the sessions.
    #[arg(long, default_value_t = 1_000_000)]
    pub ports: u64,
    /// Times the master is killed.
    #[arg(long, default_value_t = 20)]
    pub rounds: usize,
    /// Session lease in ms.
    #[arg(long, default_value_t = 10_000)]
    pub lease_ms: u32,
    /// Print one JSON object instead of text.
    #[arg(long)]
    pub json: bool,
}

fn free_port() -> std::io::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// A group of three `portswitch serve` members on loopback, as child processes.
pub(crate) struct Group {
    exe: std::path::PathBuf,
    dir: std::path::PathBuf,
    pub(crate) addrs: Vec<String>,
    members: String,
    lease_ms_max: u32,
    /// Flags every member gets besides the group's.
    flags: Vec<String>,
    children: Vec<Option<Child>>,
}

impl Group {
    /// Starts three members in a fresh temporary directory and waits for a master.
    pub(crate) async fn start(lease_ms_max: u32) -> Res<Group> {
        Group::start_with(lease_ms_max, &[]).await
    }

    /// [`Group::start`], every member also given `flags`.
    pub(crate) async fn start_with(lease_ms_max: u32, flags: &[String]) -> Res<Group> {
        let dir = std::env::temp_dir().join(format!("portswitch-failover-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let addrs: Vec<String> = (0..3)
            .map(|_| free_port().map(|p| format!("127.0.0.1:{p}")))
            .collect::<Result<_, _>>()?;
        let mut members = Vec::new();
        for (i, a) in addrs.iter().enumerate() {
            members.push(format!("{}=127.0.0.1:{}/{a}", i + 1, free_port()?));
        }
        let mut g = Group {
            exe: std::env::current_exe()?,
            dir,
            addrs,
            members: members.join(","),
            lease_ms_max,
            flags: flags.to_vec(),
            children: vec![None, None, None],
        };
        for i in 0..3 {
            g.spawn(i).await?;
        }
        g.master().await?;
        Ok(g)
    }

    pub(crate) async fn spawn(&mut self, i: usize) -> Res<()> {
        let lease = self.lease_ms_max.to_string();
        let mut extra = vec![
            "--no-http",
            "--lease-ms-max",
            &lease,
            "--log",
            "error,openraft=off",
        ];
        extra.extend(self.flags.iter().map(String::as_str));
        let data = self.dir.join(i.to_string());
        let child = crate::dev::start_member(
            &self.exe,
            i as u64 + 1,
            &self.addrs[i],
            &data,
            &self.members,
            &extra,
        )
        .await?;
        self.children[i] = Some(child);
        Ok(())
    }

    /// The member serving as master, waiting up to 30 s.
    pub(crate) async fn master(&self) -> Res<usize> {
        find_master(&self.addrs, |i| self.children[i].is_none()).await
    }

    /// SIGKILLs member `i` and reaps it.
    pub(crate) async fn kill(&mut self, i: usize) -> Res<()> {
        if let Some(mut child) = self.children[i].take() {
            child.start_kill()?;
            child.wait().await?;
        }
        Ok(())
    }

    /// Sends member `i` a signal by name (`-STOP`, `-CONT`).
    pub(crate) fn signal(&self, i: usize, sig: &str) -> Res<()> {
        let pid = self.children[i]
            .as_ref()
            .and_then(|c| c.id())
            .ok_or("member not running")?;
        let status = std::process::Command::new("kill")
            .args([sig, &pid.to_string()])
            .status()?;
        if !status.success() {
            return Err(format!("kill {sig} {pid} failed").into());
        }
        Ok(())
    }

    /// Stops every member and removes the group's directory.
    pub(crate) async fn stop(mut self) {
        for c in self.children.iter_mut().flatten() {
            let _ = c.start_kill();
            let _ = c.wait().await;
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The index of the member of `addrs` that serves as master (asked by STATS, which
/// needs no session; members `skip` names are not asked), waiting up to 30 s.
pub(crate) async fn find_master(addrs: &[String], skip: impl Fn(usize) -> bool) -> Res<usize> {
    let mut opts = ClientOptions::new("unused");
    // A member cut off from the network must not hold the search up for long.
    opts.connect_timeout = Duration::from_millis(500);
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
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
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    Err("no master within 30 s".into())
}

/// Connects `sessions` sessions with `template`'s options (knowing every server in
/// `addrs`), giving them `ports` ports in all, named `s{session}/p{n}`.
pub(crate) async fn hold_ports(
    addrs: &[String],
    sessions: usize,
    ports: u64,
    template: &ClientOptions,
) -> Res<Vec<Client>> {
    let mut clients = Vec::with_capacity(sessions);
    let per = ports / sessions as u64;
    let extra = ports % sessions as u64;
    for s in 0..sessions {
        let mut o = template.clone();
        o.addr = addrs[s % addrs.len()].clone();
        o.servers = addrs.to_vec();
        o.connect_timeout = Duration::from_secs(30);
        let c = Client::connect(o).await?;
        let n = per + u64::from((s as u64) < extra);
        let mut pending = Vec::with_capacity(n as usize);
        for p in 0..n {
            let c = c.clone();
            pending.push(tokio::spawn(async move {
                c.register(format!("s{s}/p{p}"), "").await
            }));
        }
        for p in pending {
            match p.await? {
                Ok(RegisterOutcome::Owned { .. }) => {}
                other => return Err(format!("setting up: {other:?}").into()),
            }
        }
        clients.push(c);
    }
    Ok(clients)
}

/// Watches every session through one failover: each reports `Resync` once it is back
/// on the new master with all its ports; *ownership lost* and lost ports are counted.
pub(crate) struct RecoveryWatch {
    rx: tokio::sync::mpsc::UnboundedReceiver<Instant>,
    watchers: Vec<tokio::task::JoinHandle<()>>,
    sessions: usize,
}

impl RecoveryWatch {
    /// Starts watching (before the fault, so no event is missed).
    pub(crate) fn start(clients: &[Client], lost: &Arc<AtomicU64>) -> RecoveryWatch {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel::<Instant>();
        let mut watchers = Vec::new();
        for c in clients {
            let mut ev = c.events();
            let (tx, lost) = (tx.clone(), lost.clone());
            watchers.push(tokio::spawn(async move {
                loop {
                    match ev.recv().await {
                        Ok(Event::Resync) => {
                            let _ = tx.send(Instant::now());
                            return;
                        }
                        Ok(Event::OwnershipLost { .. }) => {
                            lost.fetch_add(1, Ordering::Relaxed);
                            return;
                        }
                        Ok(Event::PortLost { .. }) => {
                            lost.fetch_add(1, Ordering::Relaxed);
                        }
                        Ok(_) => {}
                        Err(_) => return,
                    }
                }
            }));
        }
        RecoveryWatch {
            rx,
            watchers,
            sessions: clients.len(),
        }
    }

    /// Waits up to `limit` for every session; records each one's time since `fault`
    /// in `each`. Returns how many came back and when the last one did.
    pub(crate) async fn finish(
        mut self,
        fault: Instant,
        limit: Duration,
        each: &mut Histogram<u64>,
    ) -> Res<(usize, Duration)> {
        let deadline = tokio::time::Instant::from_std(fault + limit);
        let (mut done, mut slowest) = (0, Duration::ZERO);
        while done < self.sessions {
            match tokio::time::timeout_at(deadline, self.rx.recv()).await {
                Ok(Some(at)) => {
                    let t = at.saturating_duration_since(fault);
                    done += 1;
                    each.record(t.as_micros() as u64)?;
                    slowest = slowest.max(t);
                }
                Ok(None) | Err(_) => break,
            }
        }
        for w in self.watchers {
            w.abort();
        }
        Ok((done, slowest))
    }
}

pub async fn run(args: FailoverArgs) -> AppResult {
    if args.sessions == 0 || args.rounds == 0 {
        return Err("--connections and --rounds must be at least 1".into());
    }
    let mut g = Group::start(args.lease_ms).await?;

    let lost = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let mut template = ClientOptions::new("");
    template.lease = Duration::from_millis(args.lease_ms as u64);
    let clients = hold_ports(&g.addrs, args.sessions, args.ports, &template).await?;
    if !args.json {
        eprintln!(
            "{} sessions holding {} ports, set up in {:.1?}",
            args.sessions,
            args.ports,
            started.elapsed()
        );
    }

    let mut all_hist = Histogram::<u64>::new(3)?;
    let mut each_hist = Histogram::<u64>::new(3)?;
    let mut rounds = Vec::new();
    for round in 0..args.rounds {
        let m = g.master().await?;
        let watch = RecoveryWatch::start(&clients, &lost);
        let killed_at = Instant::now();
        g.kill(m).await?;
        let new_master = g.master().await?;
        let serving_after = killed_at.elapsed();
        let limit = Duration::from_millis(args.lease_ms as u64);
        let (recovered, slowest) = watch.finish(killed_at, limit * 2, &mut each_hist).await?;
        all_hist.record(slowest.as_micros() as u64)?;
        if !args.json {
            eprintln!(
                "round {}: killed member {}; member {} master after {} ms; {recovered}/{} sessions back with their ports, the last after {} ms",
                round + 1,
                m + 1,
                new_master + 1,
                serving_after.as_millis(),
                clients.len(),
                slowest.as_millis()
            );
        }
        rounds.push((recovered, slowest));
        // Bring the killed member back as a follower, and let the group settle, so
        // the next round measures the loss of a master in a steady group.
        g.spawn(m).await?;
        tokio::time::sleep(Duration::from_secs(2)).await;
        g.master().await?;
    }
    let ms = |h: &Histogram<u64>, q: f64| h.value_at_quantile(q) as f64 / 1_000.0;
    let lost = lost.load(Ordering::Relaxed);
    let incomplete = rounds.iter().filter(|(r, _)| *r < clients.len()).count();
    if args.json {
        println!(
            "{}",
            serde_json::json!({
                "workload": "failover",
                "sessions": args.sessions,
                "ports": args.ports,
                "rounds": args.rounds,
                "all_recovered_p50_ms": ms(&all_hist, 0.5),
                "all_recovered_p99_ms": ms(&all_hist, 0.99),
                "session_recovered_p50_ms": ms(&each_hist, 0.5),
                "session_recovered_p99_ms": ms(&each_hist, 0.99),
                "ownership_lost": lost,
                "incomplete_rounds": incomplete,
            })
        );
    } else {
        println!(
            "failover, {} rounds, {} sessions, {} ports: every session back with every port after p50 {:.0} ms, p99 {:.0} ms (per session p50 {:.0} ms, p99 {:.0} ms); ownership lost: {lost}; incomplete rounds: {incomplete}",
            args.rounds,
            args.sessions,
            args.ports,
            ms(&all_hist, 0.5),
            ms(&all_hist, 0.99),
            ms(&each_hist, 0.5),
            ms(&each_hist, 0.99),
        );
    }
    for c in &clients {
        let _ = c.close().await;
    }
    g.stop().await;
    Ok(if lost == 0 && incomplete == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}
