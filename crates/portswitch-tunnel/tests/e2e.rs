//! The tunnel library end to end over real TCP on 127.0.0.1: a server, a client, and
//! between them a relay that the tests can cut, tamper with and listen to — as an
//! observer on the path would. Streams survive cut pool connections, slow readers do
//! not stall fast streams, tampered records and replayed or garbage hellos are refused
//! (the latter in silence), a target that speaks first is reached through a held OPEN,
//! clients move as soon as their server's port is released in the port switch, a
//! server that loses its port-switch session registers again, and the captured bytes
//! pass the featureless checks.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use portswitch_tunnel::client::{ClientConfig, ServerSource, TunnelClient};
use portswitch_tunnel::frame::CompressPolicy;
use portswitch_tunnel::handshake::Psk;
use portswitch_tunnel::server::{Registration, RunningServer, ServerConfig};
use portswitch_tunnel::shape::fet_exempt;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

// ---- scaffolding -------------------------------------------------------------------

/// What a relay saw of one connection: the chunks each way, as read.
#[derive(Default)]
struct Seen {
    up: Vec<Vec<u8>>,
    down: Vec<Vec<u8>>,
}

struct RelayConn {
    seen: Arc<Mutex<Seen>>,
    task: tokio::task::JoinHandle<()>,
}

/// A TCP relay between the client and the server: cut a connection, flip a byte,
/// record what passes.
struct Relay {
    addr: SocketAddr,
    conns: Arc<Mutex<Vec<RelayConn>>>,
}

impl Relay {
    /// `tamper`: flip a bit of the client-to-server byte at this offset of the first
    /// connection.
    async fn start(upstream: SocketAddr, tamper: Option<usize>) -> Relay {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let conns: Arc<Mutex<Vec<RelayConn>>> = Arc::default();
        let c2 = conns.clone();
        tokio::spawn(async move {
            loop {
                let Ok((client, _)) = l.accept().await else {
                    return;
                };
                let Ok(server) = TcpStream::connect(upstream).await else {
                    continue;
                };
                let _ = client.set_nodelay(true);
                let _ = server.set_nodelay(true);
                let seen: Arc<Mutex<Seen>> = Arc::default();
                let first = c2.lock().unwrap().is_empty();
                let tamper_at = if first { tamper } else { None };
                let s2 = seen.clone();
                let task = tokio::spawn(async move {
                    let (mut cr, mut cw) = client.into_split();
                    let (mut sr, mut sw) = server.into_split();
                    let s3 = s2.clone();
                    let up = async move {
                        let mut buf = vec![0u8; 65536];
                        let mut offset = 0usize;
                        loop {
                            let n = match cr.read(&mut buf).await {
                                Ok(0) | Err(_) => break,
                                Ok(n) => n,
                            };
                            if let Some(t) = tamper_at {
                                if (offset..offset + n).contains(&t) {
                                    buf[t - offset] ^= 0x04;
                                }
                            }
                            offset += n;
                            s2.lock().unwrap().up.push(buf[..n].to_vec());
                            if sw.write_all(&buf[..n]).await.is_err() {
                                break;
                            }
                        }
                        let _ = sw.shutdown().await;
                    };
                    let down = async move {
                        let mut buf = vec![0u8; 65536];
                        loop {
                            let n = match sr.read(&mut buf).await {
                                Ok(0) | Err(_) => break,
                                Ok(n) => n,
                            };
                            s3.lock().unwrap().down.push(buf[..n].to_vec());
                            if cw.write_all(&buf[..n]).await.is_err() {
                                break;
                            }
                        }
                        let _ = cw.shutdown().await;
                    };
                    tokio::join!(up, down);
                });
                c2.lock().unwrap().push(RelayConn { seen, task });
            }
        });
        Relay { addr, conns }
    }

    /// Cuts connection `i` (both sockets close, whatever is in flight is lost).
    fn cut(&self, i: usize) {
        self.conns.lock().unwrap()[i].task.abort();
    }

    fn count(&self) -> usize {
        self.conns.lock().unwrap().len()
    }

    fn live(&self) -> Vec<usize> {
        let c = self.conns.lock().unwrap();
        (0..c.len()).filter(|&i| !c[i].task.is_finished()).collect()
    }

    fn first_packets(&self) -> Vec<Vec<u8>> {
        let c = self.conns.lock().unwrap();
        c.iter()
            .filter_map(|k| k.seen.lock().unwrap().up.first().cloned())
            .collect()
    }

    /// Every chunk after the hellos, both directions.
    fn records(&self) -> (Vec<Vec<u8>>, Vec<Vec<u8>>) {
        let c = self.conns.lock().unwrap();
        let (mut up, mut down) = (Vec::new(), Vec::new());
        for k in c.iter() {
            let s = k.seen.lock().unwrap();
            up.extend(s.up.iter().skip(1).cloned());
            down.extend(s.down.iter().skip(1).cloned());
        }
        (up, down)
    }
}

async fn echo_server() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = s.into_split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
                let _ = w.shutdown().await;
            });
        }
    });
    addr
}

/// Accepts and never reads: a stalled application.
async fn sink_server() -> (SocketAddr, Arc<Mutex<Vec<TcpStream>>>) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let held: Arc<Mutex<Vec<TcpStream>>> = Arc::default();
    let h = held.clone();
    tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            h.lock().unwrap().push(s);
        }
    });
    (addr, held)
}

async fn server(psk: &Psk) -> RunningServer {
    let mut cfg = ServerConfig::new("127.0.0.1:0".parse().unwrap(), psk.clone());
    cfg.silent_ms = 200..=400;
    cfg.loopback_targets_only = true;
    RunningServer::start(cfg).await.unwrap()
}

async fn client(psk: &Psk, server: SocketAddr, pool: usize) -> TunnelClient {
    let mut cfg = ClientConfig::new(psk.clone(), ServerSource::Direct(vec![server.to_string()]));
    cfg.pool = pool;
    let c = TunnelClient::start(cfg).await.unwrap();
    // Every pool connection up, so tests know what the relay holds.
    let (_, s) = c.current().unwrap();
    for _ in 0..200 {
        if s.conns() == pool {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    c
}

/// A local socket whose far end is `target`, through the tunnel.
async fn through(c: &TunnelClient, target: SocketAddr, policy: CompressPolicy) -> TcpStream {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let local = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
    local.set_nodelay(true).unwrap();
    let (theirs, _) = l.accept().await.unwrap();
    c.open(theirs, &target.to_string(), policy).unwrap();
    local
}

fn pattern(seed: u64, n: usize) -> Vec<u8> {
    let mut rng = fastrand::Rng::with_seed(seed);
    (0..n).map(|_| rng.u8(..)).collect()
}

/// Writes `data` and reads the echo back concurrently; returns the echo.
async fn echo_through(
    mut s: TcpStream,
    data: Arc<Vec<u8>>,
    progress: Arc<std::sync::atomic::AtomicUsize>,
) -> Vec<u8> {
    let (mut r, mut w) = s.split();
    let n = data.len();
    let write = async {
        for c in data.chunks(50_000) {
            w.write_all(c).await.unwrap();
        }
        w.shutdown().await.unwrap();
    };
    let read = async {
        let mut got = Vec::with_capacity(n);
        let mut buf = vec![0u8; 65536];
        loop {
            let k = r.read(&mut buf).await.unwrap();
            if k == 0 {
                break;
            }
            got.extend_from_slice(&buf[..k]);
            progress.fetch_add(k, std::sync::atomic::Ordering::Relaxed);
        }
        got
    };
    let ((), got) = tokio::join!(write, read);
    got
}

// ---- tests ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_byte_arrives_in_order_while_pool_connections_are_cut() {
    let psk = Psk::generate();
    let srv = server(&psk).await;
    let relay = Relay::start(srv.addr, None).await;
    let c = client(&psk, relay.addr, 4).await;
    let echo = echo_server().await;
    const EACH: usize = 6 << 20;
    let progress = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for i in 0..3u64 {
        let data = Arc::new(pattern(i, EACH));
        let s = through(&c, echo, CompressPolicy::Auto).await;
        let p = progress.clone();
        tasks.push(tokio::spawn(async move {
            let got = echo_through(s, data.clone(), p).await;
            got == *data
        }));
    }
    // An HTTP-like exchange alongside: small requests, one answer each.
    let mut http = through(&c, echo, CompressPolicy::Never).await;
    // Cut three pool connections while the bulk streams are in flight.
    let mut cuts = 0;
    for step in 0..2000 {
        let done = progress.load(std::sync::atomic::Ordering::Relaxed);
        if cuts < 3 && done > (cuts + 1) * 3 * EACH / 5 {
            let live = relay.live();
            relay.cut(live[step % live.len()]);
            cuts += 1;
        }
        if tasks.iter().all(|t| t.is_finished()) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(cuts, 3, "the transfer ended before the cuts");
    for t in tasks {
        assert!(t.await.unwrap(), "a bulk stream lost or reordered bytes");
    }
    for i in 0..20 {
        let req = format!("GET /item/{i} HTTP/1.1\r\nHost: x\r\n\r\n");
        http.write_all(req.as_bytes()).await.unwrap();
        let mut back = vec![0u8; req.len()];
        http.read_exact(&mut back).await.unwrap();
        assert_eq!(back, req.as_bytes());
    }
    let m = c.metrics();
    assert!(m.pool_connections_lost.get() >= 3);
    assert!(relay.count() >= 4 + 3, "cut connections were dialled again");
    eprintln!(
        "frames resent {} (client) {} (server)",
        m.frames_retransmitted.get(),
        srv.metrics.frames_retransmitted.get()
    );
    c.stop();
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_reader_does_not_stall_a_fast_stream() {
    let psk = Psk::generate();
    let srv = server(&psk).await;
    let c = client(&psk, srv.addr, 2).await;
    let (sink, _held) = sink_server().await;
    let echo = echo_server().await;
    let mut stalled = through(&c, sink, CompressPolicy::Never).await;
    let written = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let w2 = written.clone();
    let stall = tokio::spawn(async move {
        let chunk = vec![7u8; 64 * 1024];
        // Far more than every buffer on the way: it must block.
        for _ in 0..(256 << 20) / chunk.len() {
            if stalled.write_all(&chunk).await.is_err() {
                return;
            }
            w2.fetch_add(chunk.len(), std::sync::atomic::Ordering::Relaxed);
        }
    });
    let data = Arc::new(pattern(9, 8 << 20));
    let s = through(&c, echo, CompressPolicy::Never).await;
    let got = echo_through(s, data.clone(), Arc::default()).await;
    assert!(got == *data, "the fast stream's bytes");
    assert!(
        !stall.is_finished(),
        "the stalled stream's writer is held back"
    );
    assert!(written.load(std::sync::atomic::Ordering::Relaxed) < 256 << 20);
    stall.abort();
    c.stop();
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_target_that_speaks_first_is_reached_though_the_application_is_silent() {
    // The OPEN waits briefly for the application's first bytes; an SSH- or
    // SMTP-like target speaks first, so the OPEN must go without them.
    let psk = Psk::generate();
    let srv = server(&psk).await;
    let c = client(&psk, srv.addr, 2).await;
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let target = l.local_addr().unwrap();
    tokio::spawn(async move {
        let (mut s, _) = l.accept().await.unwrap();
        s.write_all(b"SSH-2.0-banner\r\n").await.unwrap();
        let mut rest = Vec::new();
        let _ = s.read_to_end(&mut rest).await;
    });
    let mut s = through(&c, target, CompressPolicy::Auto).await;
    let mut banner = [0u8; 16];
    s.read_exact(&mut banner).await.unwrap();
    assert_eq!(&banner, b"SSH-2.0-banner\r\n");
    c.stop();
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tampered_record_kills_its_connection_and_the_stream_survives() {
    let psk = Psk::generate();
    let srv = server(&psk).await;
    // Byte 3000 of the first pool connection: past its hello, inside a record.
    let relay = Relay::start(srv.addr, Some(3000)).await;
    let c = client(&psk, relay.addr, 2).await;
    let echo = echo_server().await;
    let data = Arc::new(pattern(3, 2 << 20));
    // Which pool connection a record takes is the scheduler's choice: on a loaded
    // machine the other connection may carry a whole transfer while the tampered one
    // is still shaking hands. So streams go on until the tampered connection has
    // carried its byte 3000 (bounded), each one delivered whole.
    for _ in 0..20 {
        let s = through(&c, echo, CompressPolicy::Never).await;
        let got = echo_through(s, data.clone(), Arc::default()).await;
        assert!(got == *data);
        if srv.metrics.pool_connections_lost.get() >= 1 {
            break;
        }
    }
    assert!(
        srv.metrics.pool_connections_lost.get() >= 1,
        "the tampered connection was dropped"
    );
    assert!(relay.count() >= 3, "and dialled again");
    c.stop();
    srv.stop().await;
}

/// Reads what the server says to `hello` until it closes: nothing, if it is silent.
async fn answer_to(server: SocketAddr, hello: &[u8]) -> Vec<u8> {
    let mut s = TcpStream::connect(server).await.unwrap();
    s.write_all(hello).await.unwrap();
    let mut got = Vec::new();
    // Bounded: the test server closes after 200-400 ms of silence.
    let _ = tokio::time::timeout(Duration::from_secs(20), s.read_to_end(&mut got)).await;
    got
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_wrong_keys_and_replayed_hellos_get_silence() {
    let psk = Psk::generate();
    let srv = server(&psk).await;
    let relay = Relay::start(srv.addr, None).await;
    let c = client(&psk, relay.addr, 1).await;
    let hello = relay.first_packets()[0].clone();
    // The genuine hello, replayed by an observer: no answer at all.
    assert!(answer_to(srv.addr, &hello).await.is_empty());
    // Garbage, and a hello under another key.
    assert!(answer_to(srv.addr, &pattern(1, 700)).await.is_empty());
    let other = Relay::start(srv.addr, None).await;
    let _ = TunnelClient::start({
        let mut cfg = ClientConfig::new(
            Psk::generate(),
            ServerSource::Direct(vec![other.addr.to_string()]),
        );
        cfg.handshake_timeout = Duration::from_millis(500);
        cfg.pool = 1;
        cfg
    })
    .await;
    let mut tampered = hello.clone();
    tampered[60] ^= 1;
    assert!(answer_to(srv.addr, &tampered).await.is_empty());
    for (i, s) in other.conns.lock().unwrap().iter().enumerate() {
        assert!(
            s.seen.lock().unwrap().down.is_empty(),
            "connection {i} under a wrong key got an answer"
        );
    }
    let text = srv.metrics.render();
    assert!(text.contains("result=\"replay\""), "{text}");
    assert!(text.contains("result=\"auth\""), "{text}");
    // The real client is still fine.
    let echo = echo_server().await;
    let s = through(&c, echo, CompressPolicy::Auto).await;
    assert_eq!(
        echo_through(s, Arc::new(b"still here".to_vec()), Arc::default()).await,
        b"still here"
    );
    c.stop();
    srv.stop().await;
}

fn chi_square(bytes: &[u8]) -> f64 {
    let mut counts = [0u64; 256];
    for &b in bytes {
        counts[b as usize] += 1;
    }
    let e = bytes.len() as f64 / 256.0;
    counts.iter().map(|&o| (o as f64 - e).powi(2) / e).sum()
}

fn entropy(bytes: &[u8]) -> f64 {
    let mut counts = [0u64; 256];
    for &b in bytes {
        counts[b as usize] += 1;
    }
    let n = bytes.len() as f64;
    counts
        .iter()
        .filter(|&&c| c > 0)
        .map(|&c| {
            let p = c as f64 / n;
            -p * p.log2()
        })
        .sum()
}

/// Two-sample Kolmogorov-Smirnov statistic.
fn ks(a: &[usize], b: &[usize]) -> f64 {
    let (mut a, mut b) = (a.to_vec(), b.to_vec());
    a.sort_unstable();
    b.sort_unstable();
    let mut d: f64 = 0.0;
    for &x in a.iter().chain(b.iter()) {
        let fa = a.partition_point(|&v| v <= x) as f64 / a.len() as f64;
        let fb = b.partition_point(|&v| v <= x) as f64 / b.len() as f64;
        d = d.max((fa - fb).abs());
    }
    d
}

/// Lengths of what an observer sees of request/response traffic with requests of
/// `size` bytes: each chunk read by the relay, client to server, after the hello.
async fn observed_lengths(psk: &Psk, srv: SocketAddr, echo: SocketAddr, size: usize) -> Vec<usize> {
    let relay = Relay::start(srv, None).await;
    let c = client(psk, relay.addr, 1).await;
    let mut s = through(&c, echo, CompressPolicy::Never).await;
    let msg = pattern(size as u64, size);
    let mut back = vec![0u8; size];
    for _ in 0..150 {
        s.write_all(&msg).await.unwrap();
        s.read_exact(&mut back).await.unwrap();
        assert_eq!(back, msg);
    }
    c.stop();
    relay.records().0.iter().map(Vec::len).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn captured_bytes_are_featureless() {
    let psk = Psk::generate();
    let srv = server(&psk).await;
    let echo = echo_server().await;
    // First packets of 40 pool connections.
    let relay = Relay::start(srv.addr, None).await;
    for _ in 0..5 {
        let c = client(&psk, relay.addr, 8).await;
        c.stop();
    }
    let firsts = relay.first_packets();
    assert!(firsts.len() >= 40);
    for (i, p) in firsts.iter().enumerate() {
        // Would OpenGFW's fully-encrypted-traffic rule block it? It must not.
        assert!(
            fet_exempt(p),
            "first packet {i} ({} bytes) would be blocked",
            p.len()
        );
    }
    let mut lengths: Vec<usize> = firsts.iter().map(Vec::len).collect();
    lengths.sort_unstable();
    lengths.dedup();
    assert!(
        lengths.len() >= firsts.len() * 3 / 4,
        "first-packet lengths vary: {lengths:?}"
    );
    // No fixed byte anywhere at the start: every position takes many values.
    for pos in 0..48 {
        let mut v: Vec<u8> = firsts.iter().map(|p| p[pos]).collect();
        v.sort_unstable();
        v.dedup();
        assert!(
            v.len() >= 10,
            "position {pos} takes only {} values",
            v.len()
        );
    }
    // After the hellos: records, indistinguishable from uniform bytes, whether the
    // inner traffic is text or not.
    let relay = Relay::start(srv.addr, None).await;
    let c = client(&psk, relay.addr, 2).await;
    // JSON lines with varying numbers: compressible, yet plenty left on the wire.
    let mut rng = fastrand::Rng::with_seed(11);
    let text: Vec<u8> = (0..30_000)
        .map(|_| {
            format!(
                "{{\"user\":\"u{}\",\"items\":[{},{},{}],\"amount\":{}}}\n",
                rng.u32(..),
                rng.u32(..),
                rng.u16(..),
                rng.u8(..),
                rng.u64(..)
            )
        })
        .collect::<String>()
        .into_bytes();
    let s = through(&c, echo, CompressPolicy::Auto).await;
    assert!(echo_through(s, Arc::new(text.clone()), Arc::default()).await == text);
    let (up, down) = relay.records();
    let wire: Vec<u8> = up.into_iter().chain(down).flatten().collect();
    assert!(wire.len() > 50_000);
    let chi = chi_square(&wire);
    // 255 degrees of freedom: mean 255, standard deviation 22.6.
    assert!(chi < 400.0, "chi-square {chi} over {} bytes", wire.len());
    assert!(entropy(&wire) > 7.99);
    c.stop();
    // Record lengths do not follow the inner messages' lengths (16 vs 400 bytes).
    let small = observed_lengths(&psk, srv.addr, echo, 16).await;
    let large = observed_lengths(&psk, srv.addr, echo, 400).await;
    let d = ks(&small, &large);
    let mean = |v: &[usize]| v.iter().sum::<usize>() as f64 / v.len() as f64;
    eprintln!(
        "KS {d:.3}; means {:.0} vs {:.0}; {} and {} chunks",
        mean(&small),
        mean(&large),
        small.len(),
        large.len()
    );
    assert!(d < 0.3, "length distributions differ: KS {d}");
    assert!((mean(&small) - mean(&large)).abs() < 150.0);
    srv.stop().await;
}

/// A port switch and two tunnel servers registered in it as `office`.
async fn switch_and_two_servers(
    psk: &Psk,
) -> (portswitch_server::RunningServer, Vec<Option<RunningServer>>) {
    let mut sc = portswitch_server::ServerConfig::ephemeral();
    sc.http_listen = None;
    let switch = portswitch_server::RunningServer::start(sc).await.unwrap();
    let mut servers = Vec::new();
    for _ in 0..2 {
        let mut cfg = ServerConfig::new("127.0.0.1:0".parse().unwrap(), psk.clone());
        cfg.loopback_targets_only = true;
        cfg.register = Some(Registration {
            switch: switch.addr.to_string(),
            name: "office".into(),
            advertise: None,
        });
        servers.push(Some(RunningServer::start(cfg).await.unwrap()));
    }
    (switch, servers)
}

/// A client of `office` that moves only on port-switch events: dial failures never
/// count (so a prompt move proves the event path), and the orphan grace (30 s) is
/// longer than any wait here.
async fn switch_client(psk: &Psk, switch: SocketAddr) -> TunnelClient {
    let mut cfg = ClientConfig::new(
        psk.clone(),
        ServerSource::Switch {
            switch: switch.to_string(),
            name: "office".into(),
        },
    );
    cfg.pool = 2;
    cfg.failover_after_failures = u32::MAX;
    TunnelClient::start(cfg).await.unwrap()
}

/// Waits (bounded) until the client's session is with a server other than `from`
/// and has a pool connection up; returns that server.
async fn moved_from(c: &TunnelClient, from: &str) -> Option<String> {
    for _ in 0..200 {
        if let Some((now, s)) = c.current() {
            if now != from && s.conns() > 0 {
                return Some(now);
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    None
}

async fn echo_once(c: &TunnelClient, echo: SocketAddr, msg: &[u8]) -> Vec<u8> {
    let s = through(c, echo, CompressPolicy::Auto).await;
    echo_through(s, Arc::new(msg.to_vec()), Arc::default()).await
}

fn index_of(servers: &[Option<RunningServer>], addr: &str) -> usize {
    servers
        .iter()
        .position(|s| s.as_ref().is_some_and(|s| s.addr.to_string() == addr))
        .unwrap_or_else(|| panic!("the client uses {addr}, not a registered server"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_find_servers_in_the_port_switch_and_move_when_one_is_released() {
    let psk = Psk::generate();
    let (switch, mut servers) = switch_and_two_servers(&psk).await;
    let c = switch_client(&psk, switch.addr).await;
    let echo = echo_server().await;
    assert_eq!(echo_once(&c, echo, b"one").await, b"one");
    let (first, _) = c.current().unwrap();
    let i = index_of(&servers, &first);
    // Stopping the server releases its port: the client moves on that event, not
    // after failed dials (it is configured never to count them).
    servers[i].take().unwrap().stop().await;
    let now = moved_from(&c, &first)
        .await
        .expect("the client moved to the other server");
    assert_eq!(now, servers[1 - i].as_ref().unwrap().addr.to_string());
    assert_eq!(echo_once(&c, echo, b"two").await, b"two");
    let text = c.metrics().render();
    assert!(
        text.contains("portswitch_tunnel_server_moves_total{result=\"released\"} 1"),
        "{text}"
    );
    assert!(!text.contains("result=\"unreachable\""), "{text}");
    c.stop();
    if let Some(s) = servers[1 - i].take() {
        s.stop().await;
    }
    let _ = switch.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_that_loses_its_switch_session_registers_again_and_clients_return() {
    let psk = Psk::generate();
    let (switch, mut servers) = switch_and_two_servers(&psk).await;
    let c = switch_client(&psk, switch.addr).await;
    let echo = echo_server().await;
    assert_eq!(echo_once(&c, echo, b"one").await, b"one");
    let (first, _) = c.current().unwrap();
    let i = index_of(&servers, &first);
    // The server in use loses its port-switch session while it goes on serving:
    // its port is released, so the client moves to the other server...
    servers[i].as_ref().unwrap().drop_switch_session().await;
    let now = moved_from(&c, &first)
        .await
        .expect("the client moved to the other server");
    assert_eq!(echo_once(&c, echo, b"two").await, b"two");
    // ...and the server registers again.
    let reg = portswitch_client::Client::connect_to(switch.addr.to_string())
        .await
        .unwrap();
    // The listing may still show the old registration for a moment after the session
    // was dropped: wait for the new one (counted by the server) to be listed.
    let mut listed = false;
    for _ in 0..200 {
        let registered = servers[i]
            .as_ref()
            .unwrap()
            .metrics
            .switch_registrations
            .get()
            >= 2;
        let owners = reg.list_all("tunnel/office/").await.unwrap();
        if registered && owners.iter().any(|o| o.value.as_ref() == first.as_bytes()) {
            listed = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(listed, "{first} registered again");
    assert_eq!(
        servers[i]
            .as_ref()
            .unwrap()
            .metrics
            .switch_registrations
            .get(),
        2
    );
    // When the other one stops, the client comes back to it.
    let j = index_of(&servers, &now);
    servers[j].take().unwrap().stop().await;
    let back = moved_from(&c, &now).await.expect("the client moved back");
    assert_eq!(back, first);
    assert_eq!(echo_once(&c, echo, b"three").await, b"three");
    c.stop();
    if let Some(s) = servers[i].take() {
        s.stop().await;
    }
    let _ = reg.close().await;
    let _ = switch.stop().await;
}
