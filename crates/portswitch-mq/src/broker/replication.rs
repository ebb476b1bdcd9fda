//! The network side of replication, one pair of tasks per partition:
//!
//! - **campaign**: queue for the partition's port `mq/<queue>/<partition>` in the port
//!   switch; once granted (with a fencing token), fence a majority of the replicas
//!   (SURVEY), catch up from the most up-to-date log among them, then lead until the
//!   port is lost. The rules are in [`crate::replica`]; the argument in docs/MQ.md.
//! - **follow**: while not leading, fetch the leader's log (the port's owner's address
//!   is the port's value) and hand what comes to the partition actor.
//!
//! Brokers reach each other through the same protocol clients use
//! ([`crate::client::MqClient`]), one connection per peer broker.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};

use super::partition::{Cmd, FetchedData, ReplicaState, Role};
use super::{Catalog, MqError};
use crate::client::{ClientError, MqClient};
use crate::proto::{Code, Reply, Request};
use crate::replica::{self, Survey};

/// A peer broker's answer must come within this (a fetch waits longer: the leader
/// holds it while it has nothing new).
const PEER_TIMEOUT: Duration = Duration::from_secs(2);
/// Between tries when a peer or the port switch does not answer.
const RETRY: Duration = Duration::from_millis(100);
/// A candidate that has not surveyed, caught up and begun its epoch by then gives the
/// port back (a replica it was catching up from may have died).
const CANDIDACY_MAX: Duration = Duration::from_secs(10);
/// A partition without a serving leader this long is queued for by every replica, not
/// only its preferred one.
const UNLED_GRACE: Duration = Duration::from_secs(2);

/// One connection per peer broker address, made when first needed.
#[derive(Default)]
pub struct Peers {
    clients: Mutex<HashMap<String, MqClient>>,
}

impl Peers {
    pub async fn get(&self, addr: &str) -> Result<MqClient, ClientError> {
        if let Some(c) = self
            .clients
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(addr)
        {
            if !c.is_closed() {
                return Ok(c.clone());
            }
        }
        let c = tokio::time::timeout(PEER_TIMEOUT, MqClient::connect(addr))
            .await
            .map_err(|_| ClientError::Connect {
                addr: addr.to_string(),
                why: "timed out".into(),
            })??;
        self.clients
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(addr.to_string(), c.clone());
        Ok(c)
    }

    pub async fn call(
        &self,
        addr: &str,
        req: Request,
        wait: Duration,
    ) -> Result<Reply, ClientError> {
        let c = self.get(addr).await?;
        match tokio::time::timeout(wait, c.call(req)).await {
            Ok(r) => r,
            Err(_) => Err(ClientError::Connect {
                addr: addr.to_string(),
                why: "no answer in time".into(),
            }),
        }
    }
}

/// What the tasks of one partition need.
#[derive(Clone)]
pub struct Ctx {
    pub catalog: Arc<Catalog>,
    pub queue: String,
    pub index: u16,
    pub tx: mpsc::Sender<Cmd>,
}

impl Ctx {
    fn port(&self) -> String {
        format!("mq/{}/{}", self.queue, self.index)
    }

    async fn ask<T>(&self, make: impl FnOnce(oneshot::Sender<T>) -> Cmd) -> Option<T> {
        let (tx, rx) = oneshot::channel();
        self.tx.send(make(tx)).await.ok()?;
        rx.await.ok()
    }

    async fn state(&self) -> Option<ReplicaState> {
        self.ask(|reply| Cmd::State { reply }).await
    }
}

/// Starts the partition's campaign and follow tasks.
pub fn start(ctx: Ctx) -> Vec<tokio::task::JoinHandle<()>> {
    vec![
        tokio::spawn(campaign(ctx.clone())),
        tokio::spawn(follow(ctx)),
    ]
}

/// Whether an event says `port` lost its owner (or that watched state must be read
/// again).
fn released(e: &portswitch_client::Event, port: &str) -> bool {
    use portswitch_client::Event;
    match e {
        Event::Released { port: p, .. } => p.as_ref() == port.as_bytes(),
        Event::Resync | Event::Recovered => true,
        _ => false,
    }
}

fn claimed(e: &portswitch_client::Event, port: &str) -> bool {
    use portswitch_client::Event;
    match e {
        Event::Claimed { port: p, .. } => p.as_ref() == port.as_bytes(),
        Event::Resync | Event::Recovered => true,
        _ => false,
    }
}

type Events = tokio::sync::broadcast::Receiver<portswitch_client::Event>;

/// Waits for an event that `pred` accepts; `false` if events end. Lost events count
/// as accepted (the caller reads the state again).
async fn wait_event(events: &mut Events, pred: impl Fn(&portswitch_client::Event) -> bool) -> bool {
    loop {
        match events.recv().await {
            Ok(e) if pred(&e) => return true,
            Ok(_) => {}
            Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => return true,
            Err(tokio::sync::broadcast::error::RecvError::Closed) => return false,
        }
    }
}

/// The replica that leads a partition while it runs: the partition's index among the
/// configuration's replicas (so a queue's leaders spread over the group).
fn preferred(ctx: &Ctx, st: &ReplicaState) -> String {
    let new = &st.config.new;
    new.get(ctx.index as usize % new.len().max(1))
        .cloned()
        .unwrap_or_default()
}

async fn campaign(ctx: Ctx) {
    let Some(switch) = ctx.catalog.switch.clone() else {
        return;
    };
    let port = ctx.port();
    let me = ctx.catalog.me.clone();
    let mut events = switch.events();
    let mut unled_since: Option<std::time::Instant> = None;
    loop {
        let Some(st) = ctx.state().await else {
            return;
        };
        if st.retired {
            return;
        }
        // A broker that is not (or not yet) a replica does not campaign; one being
        // added becomes one when the configuration with it reaches its log.
        if !st.config.contains(&me) {
            tokio::time::sleep(RETRY * 2).await;
            continue;
        }
        // Leadership is spread: each partition has a preferred replica, which leads
        // while it runs. The others queue for the port only while it is down, and one
        // that leads hands the port back once the preferred replica has caught up.
        let pref = preferred(&ctx, &st);
        let pref_port = super::broker_port(&pref);
        let is_preferred = pref == me;
        if !is_preferred {
            // Wait until the preferred broker is down (looking again now and then:
            // the configuration may change) — or until the partition has had no
            // serving leader for a while although it runs (it may be catching up, or
            // unable to lead): then queue as well.
            match switch.watch(pref_port.as_str()).await {
                Ok(None) => {}
                Ok(Some(_)) if unled_since.is_some_and(|t| t.elapsed() >= UNLED_GRACE) => {}
                Ok(Some(_)) => {
                    tokio::select! {
                        alive = wait_event(&mut events, |e| released(e, &pref_port)) => {
                            if !alive {
                                return;
                            }
                        }
                        _ = tokio::time::sleep(Duration::from_millis(500)) => {}
                    }
                    let serving = matches!(switch.query(port.as_str()).await, Ok(Some(o)) if !o.value.is_empty());
                    unled_since = if serving {
                        None
                    } else {
                        unled_since.or(Some(std::time::Instant::now()))
                    };
                    continue;
                }
                Err(e) => {
                    tracing::debug!(port, error = %e, "cannot watch the preferred broker");
                    tokio::time::sleep(RETRY * 5).await;
                    continue;
                }
            }
        }
        // Owned with no address while surveying and catching up: clients and replicas
        // wait for the address, which is set once this broker serves.
        let granted = tokio::select! {
            r = switch.register_wait(port.as_str(), b"") => Some(r),
            alive = wait_event(&mut events, |e| claimed(e, &pref_port)), if !is_preferred => {
                if !alive {
                    return;
                }
                None
            }
        };
        let token = match granted {
            Some(Ok(t)) => t,
            Some(Err(e)) => {
                tracing::warn!(port, error = %e, "cannot queue for the partition's port");
                tokio::time::sleep(RETRY * 5).await;
                continue;
            }
            None => {
                // The preferred broker is back (or events were lost): leave the queue.
                let _ = switch.unregister(port.as_str()).await;
                continue;
            }
        };
        let led = match tokio::time::timeout(CANDIDACY_MAX, become_leader(&ctx, token)).await {
            Ok(r) => r,
            Err(_) => Err(LeadError::TooLong),
        };
        match led {
            Ok(()) => {
                // Publish the address (without it nobody fetches or produces): a few
                // tries, then give the port back.
                let mut published = false;
                for _ in 0..5 {
                    match switch
                        .register(port.as_str(), ctx.catalog.addr.as_bytes())
                        .await
                    {
                        Ok(_) => {
                            published = true;
                            break;
                        }
                        Err(e) => {
                            tracing::warn!(port, error = %e, "cannot publish this leader's address");
                            tokio::time::sleep(RETRY * 2).await;
                        }
                    }
                }
                if !published {
                    let _ = ctx.tx.send(Cmd::Demote { token }).await;
                    let _ = switch.unregister(port.as_str()).await;
                    continue;
                }
                unled_since = None;
            }
            Err(e) => {
                tracing::warn!(port, token, error = %e, "did not become leader: giving the port back");
                let _ = ctx.tx.send(Cmd::Demote { token }).await;
                let _ = switch.unregister(port.as_str()).await;
                tokio::time::sleep(RETRY * 2 + Duration::from_millis(fastrand_ms())).await;
                continue;
            }
        }
        // Lead until the port is lost; until the preferred replica is back and holds
        // everything; or until a confirmed configuration leaves this broker out.
        let mut tick = tokio::time::interval(Duration::from_millis(100));
        loop {
            tokio::select! {
                e = events.recv() => match e {
                    Ok(portswitch_client::Event::PortLost { port: p, .. }) if p.as_ref() == port.as_bytes() => break,
                    Ok(_) => {}
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {
                        // Events were lost: ask whether the port is still ours (an
                        // error answers nothing: ask again at the next tick).
                        match switch.query(port.as_str()).await {
                            Ok(Some(o)) if o.token == token => {}
                            Ok(_) => break,
                            Err(_) => {}
                        }
                    }
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => {
                        let _ = ctx.tx.send(Cmd::Demote { token }).await;
                        return;
                    }
                },
                _ = tick.tick() => {
                    if let Some(why) = give_up_due(&ctx, &switch).await {
                        tracing::info!(port, why, "giving the partition's port up");
                        let _ = ctx.tx.send(Cmd::Demote { token }).await;
                        let _ = switch.unregister(port.as_str()).await;
                        break;
                    }
                }
            }
            if ctx.tx.is_closed() {
                return;
            }
        }
        tracing::info!(port, token, "no longer leading the partition");
        let _ = ctx.tx.send(Cmd::Demote { token }).await;
    }
}

/// Why a leader should give its port up, if it should: a confirmed configuration left
/// it out, or the preferred replica runs and holds everything it has.
async fn give_up_due(ctx: &Ctx, switch: &portswitch_client::Client) -> Option<&'static str> {
    let st = ctx.state().await?;
    if st.config.is_joint() {
        return None;
    }
    let pref = preferred(ctx, &st);
    if st.step_down {
        // Left out: lead on until the new preferred replica holds everything (or is
        // down, and another takes over), so the partition is never left unled.
        let pref_up = matches!(
            switch.query(super::broker_port(&pref).as_str()).await,
            Ok(Some(_))
        );
        let caught_up = st.matches.iter().any(|(n, m)| *n == pref && *m == st.end);
        return (caught_up || !pref_up).then_some("no longer a replica");
    }
    if pref == ctx.catalog.me
        || !matches!(
            switch.query(super::broker_port(&pref).as_str()).await,
            Ok(Some(_))
        )
    {
        return None;
    }
    st.matches
        .iter()
        .any(|(name, m)| *name == pref && *m == st.end)
        .then_some("handing back to the preferred replica")
}

/// A little jitter so that brokers that gave a port back do not queue in lockstep.
fn fastrand_ms() -> u64 {
    u64::from(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos())
            % 200,
    )
}

#[derive(Debug, thiserror::Error)]
enum LeadError {
    #[error("{0}")]
    Refused(MqError),
    #[error("the partition is gone")]
    Gone,
    #[error("a replica follows a newer leader: {0}")]
    Fenced(String),
    #[error("lost candidacy while surveying")]
    NotCandidate,
    #[error("surveying and catching up took longer than {CANDIDACY_MAX:?}")]
    TooLong,
}

/// Fences a majority at `token`, adopts the most up-to-date log among them, leads.
async fn become_leader(ctx: &Ctx, token: u64) -> Result<(), LeadError> {
    let mine = ctx
        .ask(|reply| Cmd::Promise { token, reply })
        .await
        .ok_or(LeadError::Gone)?
        .map_err(LeadError::Refused)?;
    let me = ctx.catalog.me.clone();
    let mut surveys: Vec<(String, Survey)> = vec![(me.clone(), mine)];
    loop {
        // The configuration in this log decides whose answers are needed: a majority
        // of each side of it.
        let st = ctx.state().await.ok_or(LeadError::Gone)?;
        if st.role != Role::Candidate(token) {
            return Err(LeadError::NotCandidate);
        }
        let config = st.config.clone();
        while !config.satisfied_by(surveys.iter().map(|(n, _)| n.as_str())) {
            let asked: Vec<String> = config
                .members()
                .into_iter()
                .filter(|p| !surveys.iter().any(|(n, _)| n == p))
                .collect();
            // Every replica at once.
            let asking: Vec<_> = asked
                .iter()
                .map(|peer| {
                    let (ctx, peer) = (ctx.clone(), peer.clone());
                    tokio::spawn(async move { survey_peer(&ctx, &peer, token).await })
                })
                .collect();
            for (peer, answer) in asked.into_iter().zip(asking) {
                let answer = answer
                    .await
                    .unwrap_or_else(|e| Err(PeerError::Unreachable(e.to_string())));
                match answer {
                    Ok(s) => surveys.push((peer, s)),
                    Err(PeerError::Fenced(why)) => return Err(LeadError::Fenced(why)),
                    Err(PeerError::Unreachable(why)) => {
                        tracing::debug!(peer, why, "replica did not answer the survey")
                    }
                }
            }
            if !config.satisfied_by(surveys.iter().map(|(n, _)| n.as_str())) {
                match ctx.state().await {
                    Some(s) if s.role == Role::Candidate(token) => {}
                    Some(_) => return Err(LeadError::NotCandidate),
                    None => return Err(LeadError::Gone),
                }
                tokio::time::sleep(RETRY).await;
            }
        }
        let list: Vec<Survey> = surveys.iter().map(|(_, s)| s.clone()).collect();
        let b = replica::best(&list).ok_or(LeadError::NotCandidate)?;
        let (best_name, best) = surveys[b].clone();
        if best_name != me {
            catch_up(ctx, token, &best_name, &best).await?;
            // This log is now the best one; what it says of the others stands.
            if let Some(s) = surveys.iter_mut().find(|(n, _)| *n == me) {
                s.1 = best.clone();
            }
        }
        // The adopted log may carry a newer configuration: its majorities must have
        // answered too (a change of replicas overlaps the old and new majorities).
        let after = ctx.state().await.ok_or(LeadError::Gone)?;
        if after.config == config {
            break;
        }
    }
    ctx.ask(|reply| Cmd::Lead { token, reply })
        .await
        .ok_or(LeadError::Gone)?
        .map_err(LeadError::Refused)
}

enum PeerError {
    Fenced(String),
    Unreachable(String),
}

async fn peer_addr(ctx: &Ctx, peer: &str) -> Result<String, PeerError> {
    ctx.catalog
        .broker_addr(peer)
        .await
        .map_err(PeerError::Unreachable)
}

async fn survey_peer(ctx: &Ctx, peer: &str, token: u64) -> Result<Survey, PeerError> {
    let addr = peer_addr(ctx, peer).await?;
    let req = Request::Survey {
        queue: ctx.queue.clone(),
        partition: ctx.index,
        token,
    };
    match ctx.catalog.peers.call(&addr, req, PEER_TIMEOUT).await {
        Ok(Reply::Surveyed { end, epochs }) => Ok(Survey { end, epochs }),
        Ok(other) => Err(PeerError::Unreachable(format!("answered {other:?}"))),
        Err(ClientError::Server {
            code: Code::Fenced,
            message,
        }) => Err(PeerError::Fenced(message)),
        Err(e) => Err(PeerError::Unreachable(e.to_string())),
    }
}

/// Fetches from the best replica until this log holds what it holds.
async fn catch_up(ctx: &Ctx, token: u64, peer: &str, best: &Survey) -> Result<(), LeadError> {
    loop {
        let st = ctx.state().await.ok_or(LeadError::Gone)?;
        if st.role != Role::Candidate(token) {
            return Err(LeadError::NotCandidate);
        }
        if st.end >= best.end
            && replica::agreement(&st.epochs, st.end, &best.epochs, best.end) == best.end
        {
            return Ok(());
        }
        let addr = match peer_addr(ctx, peer).await {
            Ok(a) => a,
            Err(_) => {
                tokio::time::sleep(RETRY).await;
                continue;
            }
        };
        let req = Request::Fetch {
            queue: ctx.queue.clone(),
            partition: ctx.index,
            replica: ctx.catalog.me.clone(),
            token,
            offset: st.end,
            hw: st.hw,
            epochs: st.epochs,
        };
        match ctx.catalog.peers.call(&addr, req, PEER_TIMEOUT).await {
            Ok(reply) => {
                let Some(fetched) = fetched(reply) else {
                    tokio::time::sleep(RETRY).await;
                    continue;
                };
                ctx.ask(|reply| Cmd::Apply {
                    fetched,
                    token,
                    catching_up: true,
                    reply,
                })
                .await
                .ok_or(LeadError::Gone)?
                .map_err(LeadError::Refused)?;
            }
            Err(ClientError::Server {
                code: Code::Fenced,
                message,
            }) => return Err(LeadError::Fenced(message)),
            Err(_) => tokio::time::sleep(RETRY).await,
        }
    }
}

fn fetched(reply: Reply) -> Option<FetchedData> {
    match reply {
        Reply::Fetched(f) => Some(f),
        _ => None,
    }
}

/// While not leading: fetch from the port's owner.
async fn follow(ctx: Ctx) {
    let Some(switch) = ctx.catalog.switch.clone() else {
        return;
    };
    let port = ctx.port();
    loop {
        let Some(mut st) = ctx.state().await else {
            return;
        };
        if st.retired {
            ctx.catalog.retired(&ctx.queue, ctx.index);
            return;
        }
        if st.role != Role::Follower || st.config.members() == [ctx.catalog.me.clone()] {
            tokio::time::sleep(RETRY).await;
            continue;
        }
        let owner = match switch.query(port.as_str()).await {
            Ok(Some(o)) => o,
            _ => {
                tokio::time::sleep(RETRY).await;
                continue;
            }
        };
        let addr = String::from_utf8_lossy(&owner.value).into_owned();
        if addr.is_empty() || addr == ctx.catalog.addr {
            tokio::time::sleep(RETRY).await;
            continue;
        }
        loop {
            let req = Request::Fetch {
                queue: ctx.queue.clone(),
                partition: ctx.index,
                replica: ctx.catalog.me.clone(),
                token: owner.token,
                offset: st.end,
                hw: st.hw,
                epochs: st.epochs.clone(),
            };
            let reply = ctx
                .catalog
                .peers
                .call(&addr, req, PEER_TIMEOUT + super::partition::CONFIRM_TIMEOUT)
                .await;
            let Some(fetched) = reply.ok().and_then(fetched) else {
                tokio::time::sleep(RETRY).await;
                break;
            };
            match ctx
                .ask(|reply| Cmd::Apply {
                    fetched,
                    token: owner.token,
                    catching_up: false,
                    reply,
                })
                .await
            {
                Some(Ok(s)) if s.retired => break,
                Some(Ok(s)) => st = s,
                Some(Err(e)) => {
                    tracing::debug!(port, error = %e, "fetched records not taken");
                    tokio::time::sleep(RETRY).await;
                    break;
                }
                None => return,
            }
        }
    }
}
