//! `failover-locks`: sessions contend for a few locks through a group
//! of three members on loopback while the master is killed (SIGKILL) and paused
//! (SIGSTOP, then SIGCONT) again and again.
//!
//! Every interval in which a client believed it held a lock is recorded — from the
//! moment `Lock::acquire` returned until the holder let go or was told the lock was
//! lost — and checked afterwards: no two intervals of one lock may overlap, and the
//! fencing tokens of one lock must rise in the order the intervals began. Liveness is
//! the other half: grants per second over the run, and after each fault how long
//! until the first grant and the longest time without one.
//!
//! All sessions live in this one process, so every interval is measured on one
//! clock; a grant to the next holder can only follow a release that was sent after
//! the previous interval ended.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use portswitch_client::{Client, ClientOptions, Event, Lock, Mux};

use crate::group::Signal;
use crate::{Outcome, Result};

/// A fault applied to the master.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// SIGKILL; the member is started again a moment later.
    Kill,
    /// SIGSTOP for `stop_ms`, then SIGCONT.
    Stop,
}

impl std::str::FromStr for Fault {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Fault, String> {
        match s {
            "kill" => Ok(Fault::Kill),
            "stop" => Ok(Fault::Stop),
            other => Err(format!("unknown fault {other:?} (kill or stop)")),
        }
    }
}

/// Which lock a session asks for next.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Pick {
    /// Session i always asks for lock i mod --locks (workers each owning a task).
    Fixed,
    /// A lock chosen at random each time.
    Random,
}

#[derive(clap::Args, Debug)]
pub struct FailoverLocksArgs {
    /// Sessions contending for the locks.
    #[arg(long = "connections", value_name = "SESSIONS", default_value_t = 64)]
    pub sessions: usize,
    /// Sessions per connection, each on a channel of its own (1: one connection per
    /// session, `Client`, no channels; more: channels of shared connections, `Mux`).
    #[arg(long, default_value_t = 1)]
    pub channels: usize,
    /// Locks the sessions contend for.
    #[arg(long, default_value_t = 8)]
    pub locks: usize,
    /// Which lock a session asks for next.
    #[arg(long, value_enum, default_value = "fixed")]
    pub pick: Pick,
    /// Seconds to run (at least 1).
    #[arg(long, default_value_t = 10.0)]
    pub duration: f64,
    /// Faults applied to the master, evenly spread over the run: kill or stop,
    /// comma-separated.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "kill,stop,kill,stop,kill"
    )]
    pub faults: Vec<Fault>,
    /// How long a SIGSTOP lasts before SIGCONT.
    #[arg(long, default_value_t = 4_000)]
    pub stop_ms: u64,
    /// Seconds before the first fault (a master lowers its lease ceiling to the
    /// leases in use after a whole ceiling of them, 10 s at first).
    #[arg(long, default_value_t = 12.0)]
    pub warmup_s: f64,
    /// Session lease in ms.
    #[arg(long, default_value_t = 10_000)]
    pub lease_ms: u32,
    /// How long a holder keeps a lock before releasing it.
    #[arg(long, default_value_t = 5)]
    pub hold_ms: u64,
    /// A flag for every member's `serve` (repeatable), e.g.
    /// --member-flag=--heartbeat-ms=100
    #[arg(long = "member-flag", value_name = "FLAG", allow_hyphen_values = true)]
    pub member_flags: Vec<String>,
    /// Print one JSON object instead of text.
    #[arg(long)]
    pub json: bool,
}

/// One time a client believed it held a lock.
#[derive(Debug, Clone, Copy)]
struct Interval {
    lock: usize,
    token: u64,
    start: Instant,
    end: Instant,
    /// Ended by losing the lock rather than releasing it.
    lost: bool,
    /// The release failed (the connection dropped with the UNREGISTER in flight: its
    /// outcome is unknown, so a new master cannot know the lock is free).
    release_failed: bool,
}

/// What the sessions report as they go.
#[derive(Default)]
struct Log {
    intervals: Vec<Interval>,
    /// Sessions that ended (lease view ran out) and were replaced by a new one.
    sessions_lost: u64,
    /// Why (the first few).
    lost_reasons: Vec<String>,
    acquire_errors: u64,
    release_errors: u64,
}

/// How long a member killed by a fault stays down before it is started again.
const RESTART_AFTER: Duration = Duration::from_secs(1);

pub async fn run(args: &FailoverLocksArgs, server: &Path) -> Result<Outcome> {
    if args.sessions == 0 || args.locks == 0 {
        return Err("--connections and --locks must be at least 1".into());
    }
    let mut g = super::group(
        server,
        "failover-locks",
        args.lease_ms.max(10_000),
        &args.member_flags,
    )
    .await?;
    let addrs = g.addrs.clone();
    let mut template = ClientOptions::new(addrs[0].clone());
    template.servers = addrs.clone();
    template.lease = Duration::from_millis(args.lease_ms as u64);
    template.connect_timeout = Duration::from_secs(30);

    let log = Arc::new(std::sync::Mutex::new(Log::default()));
    let mut muxes = Vec::new();
    if args.channels > 1 {
        for m in 0..args.sessions.div_ceil(args.channels) {
            let mut o = template.clone();
            o.addr = addrs[m % addrs.len()].clone();
            o.node_name = format!("bench-mux-{m}");
            muxes.push(Mux::connect(o).await?);
        }
    }
    let duration = Duration::from_secs_f64(args.duration.max(1.0));
    let start = Instant::now();
    let end = start + duration;
    let mut tasks = Vec::new();
    for s in 0..args.sessions {
        let mut o = template.clone();
        o.addr = addrs[s % addrs.len()].clone();
        o.node_name = format!("bench-{s}");
        let maker = match muxes.get(s / args.channels.max(1)) {
            Some(m) if args.channels > 1 => Maker::Mux(m.clone()),
            _ => Maker::Direct(Box::new(o)),
        };
        let (log, hold) = (log.clone(), Duration::from_millis(args.hold_ms));
        let pick = match args.pick {
            Pick::Fixed => Some(s % args.locks),
            Pick::Random => None,
        };
        tasks.push(tokio::spawn(contend(
            maker, args.locks, pick, hold, end, log,
        )));
    }

    // The faults, evenly spread over the run after the warm-up.
    let mut faults_at = Vec::new();
    let warmup_asked = Duration::from_secs_f64(args.warmup_s.max(0.0));
    let warmup = warmup_asked.min(duration / 2);
    let every = (duration - warmup) / (args.faults.len() as u32 + 1);
    for (i, fault) in args.faults.iter().enumerate() {
        let at = start + warmup + every * i as u32;
        tokio::time::sleep_until(at.into()).await;
        let m = g.master(None).await?;
        let t = Instant::now();
        match fault {
            Fault::Kill => {
                g.kill(m).await?;
                faults_at.push((*fault, t, m));
                if !args.json {
                    eprintln!(
                        "{:>6.1} s: killed member {} (master)",
                        secs(start, t),
                        m + 1
                    );
                }
                tokio::time::sleep(RESTART_AFTER).await;
                g.spawn(m).await?;
            }
            Fault::Stop => {
                g.signal(m, Signal::SIGSTOP)?;
                faults_at.push((*fault, t, m));
                if !args.json {
                    eprintln!(
                        "{:>6.1} s: stopped member {} (master) for {} ms",
                        secs(start, t),
                        m + 1,
                        args.stop_ms
                    );
                }
                tokio::time::sleep(Duration::from_millis(args.stop_ms)).await;
                g.signal(m, Signal::SIGCONT)?;
            }
        }
    }
    for t in tasks {
        let _ = t.await;
    }
    drop(muxes);
    g.stop().await;

    let log = std::mem::take(&mut *log.lock().unwrap_or_else(|p| p.into_inner()));
    let report = Report::of(&log, start, end, &faults_at, args.locks);
    if !args.json {
        report.print(args, &log);
    }
    Ok(Outcome {
        report: report.json(args, warmup_asked, &log),
        ok: report.overlaps == 0 && report.token_regressions == 0,
    })
}

/// An interval as seconds since the start, for reports of violations.
fn show(start: Instant, i: &Interval) -> (f64, f64, u64, bool) {
    (secs(start, i.start), secs(start, i.end), i.token, i.lost)
}

fn secs(start: Instant, t: Instant) -> f64 {
    t.saturating_duration_since(start).as_secs_f64()
}

/// How a session loop opens its session.
enum Maker {
    Direct(Box<ClientOptions>),
    Mux(Mux),
}

impl Maker {
    async fn open(&self) -> portswitch_client::Result<Client> {
        match self {
            Maker::Direct(o) => Client::connect((**o).clone()).await,
            Maker::Mux(m) => Ok(m.session().await?.client().clone()),
        }
    }
}

/// One session's loop: acquire its lock (`pick`, or a random one), hold it for
/// `hold`, release it; a lost session is replaced by a new one.
async fn contend(
    maker: Maker,
    locks: usize,
    pick: Option<usize>,
    hold: Duration,
    end: Instant,
    log: Arc<std::sync::Mutex<Log>>,
) {
    let record = |f: &dyn Fn(&mut Log)| f(&mut log.lock().unwrap_or_else(|p| p.into_inner()));
    let mut client: Option<Client> = None;
    let mut events = None;
    while Instant::now() < end {
        let c = match &client {
            Some(c) if c.is_alive() => c.clone(),
            Some(_) => {
                let mut why = String::from("(unknown)");
                if let Some(ev) = events.as_mut() {
                    let ev: &mut tokio::sync::broadcast::Receiver<Event> = ev;
                    while let Ok(e) = ev.try_recv() {
                        if let Event::OwnershipLost { reason, .. } = e {
                            why = reason;
                        }
                    }
                }
                record(&|l| {
                    l.sessions_lost += 1;
                    if l.lost_reasons.len() < 5 {
                        l.lost_reasons.push(why.clone());
                    }
                });
                client = None;
                continue;
            }
            None => match maker.open().await {
                Ok(c) => {
                    events = Some(c.events());
                    client = Some(c.clone());
                    c
                }
                Err(_) => {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let lock_i = pick.unwrap_or_else(|| fastrand::usize(..locks));
        let name = format!("lock/{lock_i}");
        let left = end.saturating_duration_since(Instant::now());
        let lock = match tokio::time::timeout(left, Lock::acquire(&c, &name)).await {
            Err(_) => break,
            Ok(Ok(lock)) => lock,
            Ok(Err(_)) => {
                record(&|l| l.acquire_errors += 1);
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        let began = Instant::now();
        let lost = tokio::select! {
            _ = tokio::time::sleep(hold) => false,
            _ = lock.lost() => true,
        };
        let ended = Instant::now();
        let token = lock.token();
        let released = if lost {
            true
        } else {
            lock.release().await.is_ok()
        };
        record(&|l| {
            l.intervals.push(Interval {
                lock: lock_i,
                token,
                start: began,
                end: ended,
                lost,
                release_failed: !released,
            });
            if !released {
                l.release_errors += 1;
            }
        });
    }
    if let Some(c) = client {
        let _ = c.close().await;
    }
}

struct FaultReport {
    fault: Fault,
    at_s: f64,
    member: usize,
    /// Until the first grant after the fault.
    first_grant_ms: Option<u64>,
    /// The longest time without any grant between this fault and the next (or the end).
    longest_gap_ms: u64,
    /// Per lock, the longest time without a grant of it from the fault on: locks whose
    /// holders kept them through the failover (or released them normally), and locks
    /// whose release was in flight when the master failed (free, but known to the new
    /// master only when its recovery window closes).
    held_ms: Vec<u64>,
    in_transition_ms: Vec<u64>,
}

struct Report {
    grants: usize,
    per_second: Vec<u64>,
    overlaps: usize,
    token_regressions: usize,
    lost_intervals: usize,
    /// The longest time without any grant before the first fault.
    steady_gap_ms: u64,
    faults: Vec<FaultReport>,
}

impl Report {
    fn of(
        log: &Log,
        start: Instant,
        end: Instant,
        faults: &[(Fault, Instant, usize)],
        locks: usize,
    ) -> Report {
        let mut by_lock: Vec<Vec<&Interval>> = vec![Vec::new(); locks];
        for i in &log.intervals {
            by_lock[i.lock].push(i);
        }
        let (mut overlaps, mut token_regressions) = (0, 0);
        for list in &mut by_lock {
            list.sort_by_key(|i| i.start);
            for w in list.windows(2) {
                if w[1].start < w[0].end {
                    overlaps += 1;
                    eprintln!(
                        "overlap on lock/{}: {:?} then {:?}",
                        w[0].lock,
                        show(start, w[0]),
                        show(start, w[1])
                    );
                }
                if w[1].token <= w[0].token {
                    token_regressions += 1;
                    eprintln!(
                        "token regression on lock/{}: {:?} then {:?}",
                        w[0].lock,
                        show(start, w[0]),
                        show(start, w[1])
                    );
                }
            }
        }
        let mut grants: Vec<Instant> = log.intervals.iter().map(|i| i.start).collect();
        grants.sort();
        let seconds = end.saturating_duration_since(start).as_secs() as usize + 1;
        let mut per_second = vec![0u64; seconds];
        for g in &grants {
            let s = g.saturating_duration_since(start).as_secs() as usize;
            if let Some(n) = per_second.get_mut(s) {
                *n += 1;
            }
        }
        // The longest stretch without a grant inside [from, to).
        let gap = |from: Instant, to: Instant| -> u64 {
            let mut last = from;
            let mut longest = Duration::ZERO;
            for &g in grants.iter().filter(|&&g| g >= from && g < to) {
                longest = longest.max(g - last);
                last = g;
            }
            longest = longest.max(to.saturating_duration_since(last));
            longest.as_millis() as u64
        };
        let first_fault = faults.first().map_or(end, |f| f.1);
        // Leave the first second out: sessions are still connecting.
        let steady_gap_ms = gap(
            (start + Duration::from_secs(1)).min(first_fault),
            first_fault,
        );
        let faults = faults
            .iter()
            .enumerate()
            .map(|(k, &(fault, at, member))| {
                let next = faults.get(k + 1).map_or(end, |f| f.1);
                let (mut held_ms, mut in_transition_ms) = (Vec::new(), Vec::new());
                for list in &by_lock {
                    // How long this lock went without a grant from the fault on.
                    let mut last = at;
                    let mut stall = Duration::ZERO;
                    for i in list.iter().filter(|i| i.start >= at && i.start < next) {
                        stall = stall.max(i.start - last);
                        last = i.start;
                    }
                    // Up to the next fault (or the end) without another grant counts too.
                    stall = stall.max(next.saturating_duration_since(last));
                    // A release that failed around the fault: in flight when the
                    // master failed, its outcome unknown to the new master.
                    let transition = list.iter().any(|i| {
                        i.release_failed
                            && i.end + Duration::from_millis(100) >= at
                            && i.end < at + Duration::from_secs(5)
                    });
                    let ms = stall.as_millis() as u64;
                    if transition {
                        in_transition_ms.push(ms);
                    } else {
                        held_ms.push(ms);
                    }
                }
                FaultReport {
                    held_ms,
                    in_transition_ms,
                    fault,
                    at_s: secs(start, at),
                    member,
                    first_grant_ms: grants
                        .iter()
                        .find(|&&g| g >= at)
                        .map(|&g| (g - at).as_millis() as u64),
                    longest_gap_ms: gap(at, next),
                }
            })
            .collect();
        Report {
            grants: grants.len(),
            per_second,
            overlaps,
            token_regressions,
            lost_intervals: log.intervals.iter().filter(|i| i.lost).count(),
            steady_gap_ms,
            faults,
        }
    }

    fn json(&self, args: &FailoverLocksArgs, warmup: Duration, log: &Log) -> serde_json::Value {
        let name = |f: Fault| match f {
            Fault::Kill => "kill",
            Fault::Stop => "stop",
        };
        let faults: Vec<_> = self
            .faults
            .iter()
            .map(|f| {
                serde_json::json!({
                    "fault": name(f.fault),
                    "at_s": f.at_s,
                    "member": f.member + 1,
                    "first_grant_ms": f.first_grant_ms,
                    "longest_gap_ms": f.longest_gap_ms,
                    "locks_held_resumed_ms": f.held_ms,
                    "locks_in_transition_resumed_ms": f.in_transition_ms,
                })
            })
            .collect();
        serde_json::json!({
            "workload": "failover-locks",
            "sessions": args.sessions,
            "channels": args.channels,
            "locks": args.locks,
            "pick": format!("{:?}", args.pick).to_lowercase(),
            "lease_ms": args.lease_ms,
            "stop_ms": args.stop_ms,
            "warmup_s": warmup.as_secs_f64(),
            "grants": self.grants,
            "grants_per_second": self.per_second,
            "overlaps": self.overlaps,
            "token_regressions": self.token_regressions,
            "intervals_ended_by_loss": self.lost_intervals,
            "sessions_lost": log.sessions_lost,
            "acquire_errors": log.acquire_errors,
            "release_errors": log.release_errors,
            "lost_reasons": log.lost_reasons,
            "steady_longest_gap_ms": self.steady_gap_ms,
            "faults": faults,
        })
    }

    fn print(&self, args: &FailoverLocksArgs, log: &Log) {
        let name = |f: Fault| match f {
            Fault::Kill => "kill",
            Fault::Stop => "stop",
        };
        println!("grants per second:");
        for (s, chunk) in self.per_second.chunks(10).enumerate() {
            let row: Vec<String> = chunk.iter().map(|n| format!("{n:>5}")).collect();
            println!("  {:>4} s {}", s * 10, row.join(""));
        }
        let most = |v: &[u64]| {
            v.iter()
                .max()
                .map_or("-".to_string(), |m| format!("{m} ms"))
        };
        for f in &self.faults {
            println!(
                "{} of member {} at {:.1} s: first grant after {} ms, longest time without a grant {} ms; a lock went without a grant at most {} ({} locks), {} ({} locks in transition)",
                name(f.fault),
                f.member + 1,
                f.at_s,
                f.first_grant_ms
                    .map_or("(none)".to_string(), |ms| ms.to_string()),
                f.longest_gap_ms,
                most(&f.held_ms),
                f.held_ms.len(),
                most(&f.in_transition_ms),
                f.in_transition_ms.len(),
            );
        }
        println!(
            "failover-locks, {} sessions ({} per connection), {} locks, {} ms leases: {} grants; overlaps {}; token regressions {}; steady longest gap {} ms; intervals ended by loss {}; sessions lost {}; acquire errors {}; release errors {}",
            args.sessions,
            args.channels.max(1),
            args.locks,
            args.lease_ms,
            self.grants,
            self.overlaps,
            self.token_regressions,
            self.steady_gap_ms,
            self.lost_intervals,
            log.sessions_lost,
            log.acquire_errors,
            log.release_errors,
        );
        for why in &log.lost_reasons {
            println!("  a session was lost: {why}");
        }
    }
}
