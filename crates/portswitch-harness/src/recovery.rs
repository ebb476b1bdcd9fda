//! Sessions holding ports, and a watch that times their return after a failover:
//! what the failover and WAN scenarios measure.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use portswitch_client::{Client, ClientOptions, Event, RegisterOutcome};

use crate::Result;

/// Connects `sessions` sessions with `template`'s options (knowing every server in
/// `addrs`), giving them `ports` ports in all, named `s{session}/p{n}`.
pub async fn hold_ports(
    addrs: &[String],
    sessions: usize,
    ports: u64,
    template: &ClientOptions,
) -> Result<Vec<Client>> {
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
pub struct RecoveryWatch {
    rx: tokio::sync::mpsc::UnboundedReceiver<Instant>,
    watchers: Vec<tokio::task::JoinHandle<()>>,
    sessions: usize,
}

impl RecoveryWatch {
    /// Starts watching (before the fault, so no event is missed).
    pub fn start(clients: &[Client], lost: &Arc<AtomicU64>) -> RecoveryWatch {
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
    pub async fn finish(
        mut self,
        fault: Instant,
        limit: Duration,
        each: &mut Histogram<u64>,
    ) -> Result<(usize, Duration)> {
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
