//! A TCP relay (`portswitch-harness relay`) that delays every byte by a fixed time in each
//! direction, standing in for the distance between data centres where the kernel has
//! no netem. Each accepted connection gets its own connection to the target; bytes
//! keep their order, an end of stream is passed on after the same delay, and an error
//! on either side closes both.
//!
//! The relay splits TCP: each side's congestion control sees a short, fast link, and
//! the relay only adds latency. Bandwidth is limited by the relay's CPU, not by a
//! modelled link, so figures taken through it measure the effect of distance.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use clap::Args;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::Instant;

use crate::Result;

/// Largest chunk read at once.
pub const CHUNK_BYTES_MAX: usize = 64 * 1024;
/// Chunks in flight per direction of one connection before the relay stops reading
/// (so a fast sender against a slow receiver is held back, not buffered without end).
pub const CHUNKS_IN_FLIGHT_MAX: usize = 256;
/// How long to wait for the target to accept a connection.
pub const CONNECT_MS_MAX: u64 = 5_000;

#[derive(Args, Debug)]
pub struct RelayArgs {
    /// Delay added to every byte in each direction, ms (a round trip gains twice this).
    #[arg(long, default_value_t = 30)]
    pub delay_ms: u64,
    /// LISTEN_ADDR=TARGET_ADDR; repeatable.
    #[arg(long = "route", required = true)]
    pub routes: Vec<String>,
    /// Most connections relayed at once (over all routes); more are closed at once.
    #[arg(long, default_value_t = 10_000)]
    pub connections_max: usize,
}

/// One relayed direction: what to listen on, where to connect.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Route {
    pub listen: SocketAddr,
    pub target: SocketAddr,
}

impl std::str::FromStr for Route {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Route, String> {
        let (l, t) = s
            .split_once('=')
            .ok_or_else(|| format!("--route {s}: expected LISTEN_ADDR=TARGET_ADDR"))?;
        let listen = l
            .trim()
            .parse()
            .map_err(|e| format!("--route {s}: listen address {l}: {e}"))?;
        let target = t
            .trim()
            .parse()
            .map_err(|e| format!("--route {s}: target address {t}: {e}"))?;
        Ok(Route { listen, target })
    }
}

/// Listens on every route and relays until the process is told to stop; prints one
/// line per route, then `ready` (scripts wait for it).
pub async fn run(args: &RelayArgs) -> Result<()> {
    let routes: Vec<Route> = args
        .routes
        .iter()
        .map(|r| r.parse())
        .collect::<std::result::Result<_, String>>()?;
    let relay = start(
        &routes,
        Duration::from_millis(args.delay_ms),
        args.connections_max,
    )
    .await?;
    for r in &routes {
        println!(
            "relaying {} -> {} (+{} ms each way)",
            r.listen, r.target, args.delay_ms
        );
    }
    println!("ready");
    stop_signal().await;
    drop(relay);
    Ok(())
}

/// A relay running in the current runtime. Dropping it stops it: the listeners
/// close and so does every connection it was relaying, with whatever was in flight.
#[derive(Debug)]
pub struct Running {
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Running {
    /// Stops the relay and waits until its listeners and connections are closed (a
    /// relay started again on the same address right after can bind it).
    pub async fn stop(mut self) {
        for t in std::mem::take(&mut self.tasks) {
            t.abort();
            let _ = t.await;
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// Binds every route and relays each in a task of the current runtime; at most
/// `connections_max` connections at once over all.
pub async fn start(routes: &[Route], delay: Duration, connections_max: usize) -> Result<Running> {
    if connections_max == 0 {
        return Err("--connections-max must be at least 1".into());
    }
    let open = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for r in routes {
        let listener = TcpListener::bind(r.listen)
            .await
            .map_err(|e| format!("cannot listen on {}: {e}", r.listen))?;
        tasks.push(tokio::spawn(serve(
            listener,
            r.target,
            delay,
            open.clone(),
            connections_max,
        )));
    }
    Ok(Running { tasks })
}

/// Ctrl-C or SIGTERM.
async fn stop_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
        }
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

/// Accepts on `listener` and relays each connection to `target` with `delay` each way.
/// The connections are this task's own: aborting it closes every one of them (a
/// link that dies with what is in flight in it).
pub async fn serve(
    listener: TcpListener,
    target: SocketAddr,
    delay: Duration,
    open: Arc<AtomicUsize>,
    connections_max: usize,
) {
    /// One connection counted while it is relayed, however its task ends.
    struct Counted(Arc<AtomicUsize>);
    impl Drop for Counted {
        fn drop(&mut self) {
            self.0.fetch_sub(1, Ordering::AcqRel);
        }
    }
    let mut conns = tokio::task::JoinSet::new();
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            Some(_) = conns.join_next(), if !conns.is_empty() => continue,
        };
        let inbound = match accepted {
            Ok((c, _)) => c,
            Err(e) => {
                // Out of descriptors and the like: wait a little rather than spin.
                tracing::warn!(error = %e, "relay accept failed");
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        if open.fetch_add(1, Ordering::AcqRel) >= connections_max {
            open.fetch_sub(1, Ordering::AcqRel);
            drop(inbound);
            continue;
        }
        let counted = Counted(open.clone());
        conns.spawn(async move {
            relay_one(inbound, target, delay).await;
            drop(counted);
        });
    }
}

async fn relay_one(inbound: TcpStream, target: SocketAddr, delay: Duration) {
    let outbound = match tokio::time::timeout(
        Duration::from_millis(CONNECT_MS_MAX),
        TcpStream::connect(target),
    )
    .await
    {
        Ok(Ok(s)) => s,
        // The client sees its connection closed, as it would if the target refused.
        _ => return,
    };
    let _ = inbound.set_nodelay(true);
    let _ = outbound.set_nodelay(true);
    let (ir, iw) = inbound.into_split();
    let (or, ow) = outbound.into_split();
    let up = pump(ir, ow, delay);
    let down = pump(or, iw, delay);
    tokio::pin!(up, down);
    // When one direction fails, the other goes too: a relay that kept half a
    // broken connection open would hide the failure from both ends. A direction
    // that ended cleanly leaves the other to finish.
    tokio::select! {
        ok = &mut up => if ok { down.await; },
        ok = &mut down => if ok { up.await; },
    }
}

/// Moves bytes from `r` to `w`, each chunk written `delay` after it was read. Returns
/// true when the stream ended cleanly (the end passed on), false on an error.
async fn pump(mut r: OwnedReadHalf, mut w: OwnedWriteHalf, delay: Duration) -> bool {
    let (tx, mut rx) = tokio::sync::mpsc::channel::<(Instant, Option<Bytes>)>(CHUNKS_IN_FLIGHT_MAX);
    let reader = async move {
        let mut buf = BytesMut::with_capacity(CHUNK_BYTES_MAX);
        loop {
            buf.reserve(CHUNK_BYTES_MAX);
            match r.read_buf(&mut buf).await {
                Ok(0) => {
                    let _ = tx.send((Instant::now() + delay, None)).await;
                    return true;
                }
                Ok(_) => {
                    let chunk = buf.split().freeze();
                    if tx
                        .send((Instant::now() + delay, Some(chunk)))
                        .await
                        .is_err()
                    {
                        return false;
                    }
                }
                Err(_) => return false,
            }
        }
    };
    let writer = async move {
        while let Some((due, chunk)) = rx.recv().await {
            tokio::time::sleep_until(due).await;
            match chunk {
                Some(c) => {
                    if w.write_all(&c).await.is_err() {
                        return false;
                    }
                }
                None => {
                    let _ = w.shutdown().await;
                    return true;
                }
            }
        }
        false
    };
    let (read_ok, write_ok) = tokio::join!(reader, writer);
    read_ok && write_ok
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn echo_server() -> SocketAddr {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let a = l.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = l.accept().await {
                tokio::spawn(async move {
                    let (mut r, mut w) = s.split();
                    let _ = tokio::io::copy(&mut r, &mut w).await;
                    let _ = w.shutdown().await;
                });
            }
        });
        a
    }

    async fn relay(target: SocketAddr, delay_ms: u64, max: usize) -> SocketAddr {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let a = l.local_addr().unwrap();
        tokio::spawn(serve(
            l,
            target,
            Duration::from_millis(delay_ms),
            Arc::new(AtomicUsize::new(0)),
            max,
        ));
        a
    }

    #[test]
    fn routes_parse_and_bad_ones_say_why() {
        let r: Route = "127.0.0.1:1=127.0.0.2:2".parse().unwrap();
        assert_eq!(r.listen.to_string(), "127.0.0.1:1");
        assert_eq!(r.target.to_string(), "127.0.0.2:2");
        assert!("127.0.0.1:1"
            .parse::<Route>()
            .unwrap_err()
            .contains("expected"));
        assert!("x=127.0.0.1:2"
            .parse::<Route>()
            .unwrap_err()
            .contains("listen address"));
    }

    #[tokio::test]
    async fn bytes_arrive_whole_in_order_and_late() {
        let relay = relay(echo_server().await, 25, 10).await;
        let mut s = TcpStream::connect(relay).await.unwrap();
        let data: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
        let started = std::time::Instant::now();
        let (mut r, mut w) = s.split();
        let send = async {
            w.write_all(&data).await.unwrap();
            w.shutdown().await.unwrap();
        };
        let mut back = Vec::new();
        let recv = r.read_to_end(&mut back);
        let (_, got) = tokio::join!(send, recv);
        got.unwrap();
        // A round trip through the relay crosses it twice; the end of stream too.
        assert!(started.elapsed() >= Duration::from_millis(50));
        assert_eq!(back.len(), data.len());
        assert!(back == data, "bytes changed or reordered");
    }

    /// A link that dies takes what is in it: every connection it relays closes.
    #[tokio::test]
    async fn dropping_a_running_relay_closes_its_connections() {
        let route = Route {
            listen: "127.0.0.1:0".parse().unwrap(),
            target: echo_server().await,
        };
        // Port 0 cannot be dialled: bind one first and give the relay its address.
        let probe = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let listen = probe.local_addr().unwrap();
        drop(probe);
        let running = start(&[Route { listen, ..route }], Duration::from_millis(0), 10)
            .await
            .unwrap();
        let mut s = TcpStream::connect(listen).await.unwrap();
        let mut b = [0u8; 1];
        s.write_all(b"x").await.unwrap();
        s.read_exact(&mut b).await.unwrap();
        running.stop().await;
        let end = tokio::time::timeout(Duration::from_secs(10), s.read(&mut b)).await;
        assert!(matches!(end, Ok(Ok(0)) | Ok(Err(_))), "{end:?}");
        assert!(TcpStream::connect(listen).await.is_err(), "still listening");
    }

    #[tokio::test]
    async fn a_refused_target_closes_the_client_and_the_limit_holds() {
        // Nothing listens on the target: the client's connection is closed.
        let dead = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let dead_addr = dead.local_addr().unwrap();
        drop(dead);
        let relay_dead = relay(dead_addr, 0, 10).await;
        let mut s = TcpStream::connect(relay_dead).await.unwrap();
        let mut b = [0u8; 1];
        assert_eq!(s.read(&mut b).await.unwrap_or(0), 0);

        // With room for one connection, a second is closed while the first works.
        let relay_one = relay(echo_server().await, 0, 1).await;
        let mut first = TcpStream::connect(relay_one).await.unwrap();
        first.write_all(b"x").await.unwrap();
        first.read_exact(&mut b).await.unwrap();
        let mut second = TcpStream::connect(relay_one).await.unwrap();
        assert_eq!(second.read(&mut b).await.unwrap_or(0), 0);
        first.write_all(b"y").await.unwrap();
        first.read_exact(&mut b).await.unwrap();
        assert_eq!(&b, b"y");
    }
}
