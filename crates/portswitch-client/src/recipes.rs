//! Recipes built on ports: an exclusive lock, leader election, service discovery.
//!
//! Each is a thin, documented use of REGISTER/WATCH/LIST; none adds protocol.

use bytes::Bytes;
use tokio::sync::broadcast;

use crate::client::Client;
use crate::types::{Error, Event, Owner, RegisterOutcome, Result};

/// An exclusive lock: ownership of one port, handed over in FIFO order.
///
/// Hold it only while [`Lock::lost`] has not resolved, and pass [`Lock::token`] to
/// every resource the lock protects so it can reject a stale holder's writes.
///
/// ```no_run
/// # async fn demo(client: portswitch_client::Client) -> portswitch_client::Result<()> {
/// use portswitch_client::Lock;
/// if let Some(lock) = Lock::try_acquire(&client, "locks/db-migration").await? {
///     // ... migrate, tagging writes with lock.token() ...
///     lock.release().await?;
/// }
/// # Ok(()) }
/// ```
#[derive(Debug)]
pub struct Lock {
    client: Client,
    name: Bytes,
    token: u64,
}

impl Lock {
    /// Waits in the lock's queue until it is granted.
    pub async fn acquire(client: &Client, name: impl AsRef<[u8]>) -> Result<Lock> {
        let token = client.register_wait(name.as_ref(), b"").await?;
        Ok(Lock {
            client: client.clone(),
            name: Bytes::copy_from_slice(name.as_ref()),
            token,
        })
    }

    /// Takes the lock if it is free; `None` if someone holds it.
    pub async fn try_acquire(client: &Client, name: impl AsRef<[u8]>) -> Result<Option<Lock>> {
        match client.register(name.as_ref(), b"").await? {
            RegisterOutcome::Owned { token } => Ok(Some(Lock {
                client: client.clone(),
                name: Bytes::copy_from_slice(name.as_ref()),
                token,
            })),
            RegisterOutcome::Taken { .. } => Ok(None),
            RegisterOutcome::Queued { .. } => Err(Error::Protocol("QUEUED without wait".into())),
        }
    }

    /// The fencing token of this grant: higher than any earlier holder's.
    pub fn token(&self) -> u64 {
        self.token
    }

    pub fn name(&self) -> &[u8] {
        &self.name
    }

    /// Resolves when the lock is lost: the session is over, or a new master did not
    /// give the port back ([`Event::PortLost`]). Stop using it then.
    pub async fn lost(&self) {
        port_lost(&self.client, &self.name, self.token).await
    }

    /// Whether the lock is still held, as far as this client knows.
    pub fn is_held(&self) -> bool {
        self.client.is_alive() && self.client.owns(&self.name, self.token)
    }

    /// Releases the lock; the next waiter gets it.
    pub async fn release(self) -> Result<()> {
        self.client.unregister(&self.name).await
    }
}

/// Resolves when `client` no longer holds `port` with `token`: its session is over,
/// or the port was lost (a new master did not give it back, or it was released).
async fn port_lost(client: &Client, port: &[u8], token: u64) {
    let mut events = client.events();
    loop {
        if !client.is_alive() || !client.owns(port, token) {
            return;
        }
        tokio::select! {
            _ = client.lost() => return,
            e = events.recv() => match e {
                Ok(Event::PortLost { port: p, token: t, .. }) if p == port && t == token => return,
                Err(broadcast::error::RecvError::Closed) => return,
                // Anything else (events missed included): look again.
                _ => {}
            },
        }
    }
}

/// Leader election on one port: every candidate queues for it, the owner leads.
/// The next candidate in line takes over the moment the leader resigns or its session
/// ends.
///
/// ```no_run
/// # async fn demo(client: portswitch_client::Client) -> portswitch_client::Result<()> {
/// use portswitch_client::{Election, LeaderChange};
/// let election = Election::new(&client, "leader/billing");
///
/// // Followers: find out who leads, and follow changes.
/// let mut watch = election.observe().await?;
/// while let Some(change) = watch.next().await {
///     match change {
///         LeaderChange::Leader(o) => println!("leader at {}", String::from_utf8_lossy(&o.value)),
///         LeaderChange::Vacant => println!("no leader"),
///     }
/// #   break;
/// }
///
/// // Candidates: wait to be elected, lead until resigning or losing the session.
/// let leadership = election.campaign("10.0.0.5:8080").await?;
/// tokio::select! {
///     _ = leadership.lost() => eprintln!("no longer leader: stop now"),
///     _ = tokio::time::sleep(std::time::Duration::from_secs(60)) => leadership.resign().await?,
/// }
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct Election {
    client: Client,
    name: Bytes,
}

/// Being the leader. Lead only while [`Leadership::lost`] has not resolved.
#[derive(Debug)]
pub struct Leadership {
    election: Election,
    token: u64,
}

/// A change of leader, as [`LeaderWatch::next`] reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LeaderChange {
    /// The current leader (with its value, the "proposal").
    Leader(Owner),
    /// Nobody leads right now.
    Vacant,
}

/// Follows who leads an election.
#[derive(Debug)]
pub struct LeaderWatch {
    election: Election,
    events: broadcast::Receiver<Event>,
    first: Option<LeaderChange>,
}

impl Election {
    pub fn new(client: &Client, name: impl AsRef<[u8]>) -> Election {
        Election {
            client: client.clone(),
            name: Bytes::copy_from_slice(name.as_ref()),
        }
    }

    /// Campaigns with `value` (say, this candidate's address) and waits until elected.
    pub async fn campaign(&self, value: impl AsRef<[u8]>) -> Result<Leadership> {
        let token = self.client.register_wait(&self.name, value).await?;
        Ok(Leadership {
            election: self.clone(),
            token,
        })
    }

    /// The current leader, if any.
    pub async fn leader(&self) -> Result<Option<Owner>> {
        self.client.query(&self.name).await
    }

    /// Watches the election; the first [`LeaderWatch::next`] is the current state.
    pub async fn observe(&self) -> Result<LeaderWatch> {
        let events = self.client.events();
        self.client.watch(&self.name).await?;
        let first = Some(match self.leader().await? {
            Some(o) => LeaderChange::Leader(o),
            None => LeaderChange::Vacant,
        });
        Ok(LeaderWatch {
            election: self.clone(),
            events,
            first,
        })
    }
}

impl Leadership {
    pub fn token(&self) -> u64 {
        self.token
    }

    /// Resolves when leadership is lost: the session is over, or a new master did
    /// not give the port back.
    pub async fn lost(&self) {
        port_lost(&self.election.client, &self.election.name, self.token).await
    }

    /// Whether this candidate still leads, as far as this client knows.
    pub fn is_leader(&self) -> bool {
        let c = &self.election.client;
        c.is_alive() && c.owns(&self.election.name, self.token)
    }

    /// Steps down; the next candidate in line leads.
    pub async fn resign(self) -> Result<()> {
        self.election.client.unregister(&self.election.name).await
    }
}

impl LeaderWatch {
    /// The next change of leader. `None` when the session is over.
    pub async fn next(&mut self) -> Option<LeaderChange> {
        if let Some(first) = self.first.take() {
            return Some(first);
        }
        loop {
            match self.events.recv().await {
                Ok(Event::Claimed { port, .. }) if port == self.election.name => {
                    // Read the value too; if it changed hands again meanwhile, the
                    // later events follow.
                    if let Ok(Some(o)) = self.election.leader().await {
                        return Some(LeaderChange::Leader(o));
                    }
                }
                Ok(Event::Released { port, .. }) if port == self.election.name => {
                    return Some(LeaderChange::Vacant);
                }
                Ok(Event::Resync)
                | Err(broadcast::error::RecvError::Lagged(_))
                | Ok(Event::Reconnected) => {
                    // Events may have been missed: report the current state.
                    match self.election.leader().await {
                        Ok(Some(o)) => return Some(LeaderChange::Leader(o)),
                        Ok(None) => return Some(LeaderChange::Vacant),
                        Err(_) => return None,
                    }
                }
                Ok(Event::OwnershipLost { .. }) | Err(broadcast::error::RecvError::Closed) => {
                    return None
                }
                Ok(_) => {}
            }
        }
    }
}

/// Service discovery: each instance owns `svc/<service>/<instance>` with its address
/// as the value, for as long as its session lives.
///
/// ```no_run
/// # async fn demo(client: portswitch_client::Client) -> portswitch_client::Result<()> {
/// use portswitch_client::{Discovery, DiscoveryChange};
/// let api = Discovery::new(&client, "api");
///
/// // An instance announces itself; it disappears when its session ends.
/// api.register("host-7", "10.0.0.7:8080").await?;
///
/// // A consumer lists instances, then follows changes.
/// let mut watch = api.watch().await?;
/// for (instance, addr) in api.instances().await? {
///     println!("{instance} at {}", String::from_utf8_lossy(&addr));
/// }
/// while let Some(change) = watch.next().await {
///     match change {
///         DiscoveryChange::Up { instance, .. } => println!("{instance} up"),
///         DiscoveryChange::Down { instance } => println!("{instance} down"),
///         DiscoveryChange::Resync(all) => println!("{} instances", all.len()),
///     }
/// #   break;
/// }
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct Discovery {
    client: Client,
    service: String,
}

/// An instance coming or going, as [`ServiceWatch::next`] reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DiscoveryChange {
    Up {
        instance: String,
        addr: Bytes,
    },
    Down {
        instance: String,
    },
    /// Events were missed; here is the full current set.
    Resync(Vec<(String, Bytes)>),
}

/// Follows the instances of a service.
#[derive(Debug)]
pub struct ServiceWatch {
    discovery: Discovery,
    events: broadcast::Receiver<Event>,
}

impl Discovery {
    pub fn new(client: &Client, service: impl Into<String>) -> Discovery {
        Discovery {
            client: client.clone(),
            service: service.into(),
        }
    }

    fn prefix(&self) -> String {
        format!("svc/{}/", self.service)
    }

    /// Registers this process as `instance` at `addr`. Returns the grant's token.
    /// Fails with `TAKEN` semantics (an error) if another session holds that instance.
    pub async fn register(&self, instance: &str, addr: impl AsRef<[u8]>) -> Result<u64> {
        let port = format!("{}{instance}", self.prefix());
        match self.client.register(&port, addr).await? {
            RegisterOutcome::Owned { token } => Ok(token),
            RegisterOutcome::Taken { session, .. } => Err(Error::server(
                portswitch_proto::ErrorCode::InvalidArgument,
                format!("instance {instance} is registered by session {session:#x}"),
            )),
            RegisterOutcome::Queued { .. } => Err(Error::Protocol("QUEUED without wait".into())),
        }
    }

    /// Takes this process's instance out of the service.
    pub async fn deregister(&self, instance: &str) -> Result<()> {
        self.client
            .unregister(format!("{}{instance}", self.prefix()))
            .await
    }

    /// Every live instance and its address.
    pub async fn instances(&self) -> Result<Vec<(String, Bytes)>> {
        let prefix = self.prefix();
        Ok(self
            .client
            .list_all(&prefix)
            .await?
            .into_iter()
            .map(|o| {
                (
                    String::from_utf8_lossy(&o.port[prefix.len()..]).into_owned(),
                    o.value,
                )
            })
            .collect())
    }

    /// Watches the service's instances coming and going.
    pub async fn watch(&self) -> Result<ServiceWatch> {
        let events = self.client.events();
        self.client.watch_prefix(self.prefix()).await?;
        Ok(ServiceWatch {
            discovery: self.clone(),
            events,
        })
    }
}

impl ServiceWatch {
    /// The next change. `None` when the session is over.
    pub async fn next(&mut self) -> Option<DiscoveryChange> {
        let prefix = self.discovery.prefix();
        let instance = |port: &[u8]| String::from_utf8_lossy(&port[prefix.len()..]).into_owned();
        loop {
            match self.events.recv().await {
                Ok(Event::Claimed { port, .. }) if port.starts_with(prefix.as_bytes()) => {
                    let addr = match self.discovery.client.query(&port).await {
                        Ok(Some(o)) => o.value,
                        Ok(None) => continue, // already gone again; its Released follows
                        Err(_) => return None,
                    };
                    return Some(DiscoveryChange::Up {
                        instance: instance(&port),
                        addr,
                    });
                }
                Ok(Event::Released { port, .. }) if port.starts_with(prefix.as_bytes()) => {
                    return Some(DiscoveryChange::Down {
                        instance: instance(&port),
                    });
                }
                Ok(Event::Resync)
                | Ok(Event::Reconnected)
                | Err(broadcast::error::RecvError::Lagged(_)) => {
                    return self
                        .discovery
                        .instances()
                        .await
                        .ok()
                        .map(DiscoveryChange::Resync);
                }
                Ok(Event::OwnershipLost { .. }) | Err(broadcast::error::RecvError::Closed) => {
                    return None
                }
                Ok(_) => {}
            }
        }
    }
}
