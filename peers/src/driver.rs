//! One session of each system, through that system's own client library, with the
//! three operations every workload is made of: acquire a name bound to the session
//! (exclusively), release it, and ask whether a name is held.
//!
//! | system     | session                    | acquire                                   | release |
//! |------------|----------------------------|-------------------------------------------|---------|
//! | portswitch | client session (lease)     | REGISTER                                  | UNREGISTER |
//! | etcd       | lease                      | txn: if create_revision(k) = 0 put(k, lease) | delete |
//! | ZooKeeper  | ZooKeeper session          | create ephemeral node                     | delete |
//! | Redis      | the key's own expiry       | SET k v NX PX lease                       | DEL |

use std::time::Duration;

pub type Error = Box<dyn std::error::Error + Send + Sync>;
pub type Result<T> = std::result::Result<T, Error>;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum System {
    Portswitch,
    Etcd,
    Zookeeper,
    Redis,
}

impl System {
    pub fn name(self) -> &'static str {
        match self {
            System::Portswitch => "portswitch",
            System::Etcd => "etcd",
            System::Zookeeper => "zookeeper",
            System::Redis => "redis",
        }
    }
}

#[derive(Clone)]
pub enum Session {
    Portswitch(portswitch_client::Client),
    /// A portswitch session on a channel of a connection it shares with others.
    PortswitchMux(std::sync::Arc<portswitch_client::MuxSession>),
    Etcd {
        // Boxed: etcd-client's handle is a few KB of per-service clients.
        client: Box<etcd_client::Client>,
        lease: i64,
    },
    Zookeeper(zookeeper_client::Client),
    Redis {
        conn: redis::aio::MultiplexedConnection,
        lease_ms: u64,
    },
}

/// How a session is opened.
#[derive(Debug, Clone)]
pub struct SessionSpec {
    pub system: System,
    pub addr: String,
    pub lease: Duration,
    /// portswitch only: end the session as soon as its connection closes.
    pub end_on_disconnect: bool,
    /// Keep the session's lease alive in the background (etcd: LeaseKeepAlive;
    /// Redis: PEXPIRE of the names this session holds). portswitch and ZooKeeper
    /// clients always heartbeat on their own.
    pub keep_alive: bool,
}

impl SessionSpec {
    /// How a portswitch session (plain or on a mux) is opened.
    fn portswitch_options(&self) -> portswitch_client::ClientOptions {
        let mut opts = portswitch_client::ClientOptions::new(self.addr.clone());
        opts.lease = self.lease;
        opts.end_on_disconnect = self.end_on_disconnect;
        opts.node_name = "peerbench".into();
        opts
    }
}

impl Session {
    /// Opens `n` sessions. `connections` = 0: each on a connection of its own.
    /// Otherwise the sessions share that many connections, where the system can:
    /// portswitch sessions ride on channels of a mux; etcd leases share one client
    /// (one HTTP/2 connection) per connection; Redis "sessions" share a multiplexed
    /// connection. A ZooKeeper session is its connection, so ZooKeeper always gets
    /// one each.
    pub async fn open_many(
        spec: &SessionSpec,
        n: usize,
        connections: usize,
    ) -> Result<Vec<Session>> {
        let mut out = Vec::with_capacity(n);
        if connections == 0 || spec.system == System::Zookeeper {
            for _ in 0..n {
                out.push(Session::open(spec).await?);
            }
            return Ok(out);
        }
        let connections = connections.min(n.max(1));
        if spec.system == System::Portswitch {
            let mut muxes = Vec::new();
            for _ in 0..connections {
                muxes.push(portswitch_client::Mux::connect(spec.portswitch_options()).await?);
            }
            for i in 0..n {
                let s = muxes[i % muxes.len()].session().await?;
                out.push(Session::PortswitchMux(std::sync::Arc::new(s)));
            }
            return Ok(out);
        }
        let mut shared = Vec::with_capacity(connections);
        for _ in 0..connections {
            shared.push(Session::open(spec).await?);
        }
        for i in 0..n {
            let base = &shared[i % shared.len()];
            out.push(match (spec.system, base) {
                (System::Etcd, Session::Etcd { client, .. }) => {
                    // A lease of its own over the shared client's connection.
                    let mut client = client.clone();
                    let ttl = spec.lease.as_secs().max(1) as i64;
                    let lease = client.lease_grant(ttl, None).await?.id();
                    if spec.keep_alive {
                        keep_etcd_lease(&mut client, lease, spec.lease).await?;
                    }
                    Session::Etcd { client, lease }
                }
                (_, s) => s.clone(),
            });
        }
        Ok(out)
    }

    pub async fn open(spec: &SessionSpec) -> Result<Session> {
        Ok(match spec.system {
            System::Portswitch => Session::Portswitch(
                portswitch_client::Client::connect(spec.portswitch_options()).await?,
            ),
            System::Etcd => {
                let mut client = etcd_client::Client::connect([spec.addr.as_str()], None).await?;
                let ttl = spec.lease.as_secs().max(1) as i64;
                let lease = client.lease_grant(ttl, None).await?.id();
                if spec.keep_alive {
                    keep_etcd_lease(&mut client, lease, spec.lease).await?;
                }
                Session::Etcd {
                    client: Box::new(client),
                    lease,
                }
            }
            System::Zookeeper => Session::Zookeeper(
                zookeeper_client::Client::connector()
                    .with_session_timeout(spec.lease)
                    .connect(&spec.addr)
                    .await?,
            ),
            System::Redis => {
                let client = redis::Client::open(format!("redis://{}/", spec.addr))?;
                let conn = client.get_multiplexed_async_connection().await?;
                Session::Redis {
                    conn,
                    lease_ms: spec.lease.as_millis() as u64,
                }
            }
        })
    }

    /// Takes `name` for this session if nobody holds it. `Ok(false)`: held by another.
    pub async fn acquire(&mut self, name: &str) -> Result<bool> {
        match self {
            Session::Portswitch(c) => Ok(matches!(
                c.register(name, b"peerbench").await?,
                portswitch_client::RegisterOutcome::Owned { .. }
            )),
            Session::PortswitchMux(s) => Ok(matches!(
                s.register(name, b"peerbench").await?,
                portswitch_client::RegisterOutcome::Owned { .. }
            )),
            Session::Etcd { client, lease } => {
                use etcd_client::{Compare, CompareOp, PutOptions, Txn, TxnOp};
                let txn = Txn::new()
                    .when([Compare::create_revision(name, CompareOp::Equal, 0)])
                    .and_then([TxnOp::put(
                        name,
                        "peerbench",
                        Some(PutOptions::new().with_lease(*lease)),
                    )]);
                Ok(client.txn(txn).await?.succeeded())
            }
            Session::Zookeeper(c) => {
                let mode = zookeeper_client::CreateMode::Ephemeral
                    .with_acls(zookeeper_client::Acls::anyone_all());
                match c.create(&zk_path(name), b"peerbench", &mode).await {
                    Ok(_) => Ok(true),
                    Err(zookeeper_client::Error::NodeExists) => Ok(false),
                    Err(e) => Err(e.into()),
                }
            }
            Session::Redis { conn, lease_ms } => {
                let r: Option<String> = redis::cmd("SET")
                    .arg(name)
                    .arg("peerbench")
                    .arg("NX")
                    .arg("PX")
                    .arg(*lease_ms)
                    .query_async(conn)
                    .await?;
                Ok(r.is_some())
            }
        }
    }

    /// Releases `name`, which this session holds.
    pub async fn release(&mut self, name: &str) -> Result<()> {
        match self {
            Session::Portswitch(c) => Ok(c.unregister(name).await?),
            Session::PortswitchMux(s) => Ok(s.unregister(name).await?),
            Session::Etcd { client, .. } => {
                client.delete(name, None).await?;
                Ok(())
            }
            Session::Zookeeper(c) => Ok(c.delete(&zk_path(name), None).await?),
            Session::Redis { conn, .. } => {
                let _: i64 = redis::cmd("DEL").arg(name).query_async(conn).await?;
                Ok(())
            }
        }
    }

    /// Whether anybody holds `name`.
    pub async fn held(&mut self, name: &str) -> Result<bool> {
        match self {
            Session::Portswitch(c) => Ok(c.query(name).await?.is_some()),
            Session::PortswitchMux(s) => Ok(s.query(name).await?.is_some()),
            Session::Etcd { client, .. } => Ok(client.get(name, None).await?.count() > 0),
            Session::Zookeeper(c) => Ok(c.check_stat(&zk_path(name)).await?.is_some()),
            Session::Redis { conn, .. } => {
                let n: i64 = redis::cmd("EXISTS").arg(name).query_async(conn).await?;
                Ok(n > 0)
            }
        }
    }

    /// Redis has no session: a holder that stays alive re-arms its keys' expiry.
    pub async fn refresh(&mut self, name: &str) -> Result<()> {
        if let Session::Redis { conn, lease_ms } = self {
            let _: i64 = redis::cmd("PEXPIRE")
                .arg(name)
                .arg(*lease_ms)
                .query_async(conn)
                .await?;
        }
        Ok(())
    }
}

/// Keeps an etcd lease alive in the background, as a real holder does.
async fn keep_etcd_lease(
    client: &mut etcd_client::Client,
    lease: i64,
    ttl: Duration,
) -> Result<()> {
    let (mut keeper, mut stream) = client.lease_keep_alive(lease).await?;
    let every = ttl / 3;
    tokio::spawn(async move {
        loop {
            if keeper.keep_alive().await.is_err() {
                return;
            }
            if !matches!(stream.message().await, Ok(Some(_))) {
                return;
            }
            tokio::time::sleep(every).await;
        }
    });
    Ok(())
}

/// ZooKeeper names are paths; every workload uses flat names under the root.
fn zk_path(name: &str) -> String {
    format!("/{name}")
}
