//! `portswitch tunnel` as users run it: `keygen`, a `server` process and a `client`
//! process with a `-L` forward and a SOCKS5 listener, carrying HTTP-like requests and
//! a bulk transfer to servers on 127.0.0.1. (The library's own end-to-end tests —
//! cut connections, tampering, replays, featureless captures, failover — are in
//! crates/portswitch-tunnel/tests/e2e.rs.)

use std::process::Stdio;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::process::{Child, Command};

const BIN: &str = env!("CARGO_BIN_EXE_portswitch");

/// Spawns `portswitch args…` and returns it with the lines it printed on stdout
/// until `lines` of them have appeared.
async fn spawn(args: &[&str], lines: usize) -> (Child, Vec<String>) {
    let mut child = Command::new(BIN)
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn portswitch");
    let mut out = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut got = Vec::new();
    while got.len() < lines {
        let line = tokio::time::timeout(Duration::from_secs(30), out.next_line())
            .await
            .expect("the process starts")
            .unwrap()
            .expect("a line");
        got.push(line);
    }
    (child, got)
}

/// A tiny HTTP/1.1 server: answers every request on a connection with a body that
/// names the path.
async fn http_server() -> String {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap().to_string();
    tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            tokio::spawn(async move {
                let (r, mut w) = s.into_split();
                let mut lines = BufReader::new(r).lines();
                let mut path = String::new();
                while let Ok(Some(line)) = lines.next_line().await {
                    if let Some(rest) = line.strip_prefix("GET ") {
                        path = rest.split(' ').next().unwrap_or("").to_string();
                    } else if line.is_empty() {
                        let body = format!("you asked for {path}\n").repeat(100);
                        let resp = format!(
                            "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{body}",
                            body.len()
                        );
                        if w.write_all(resp.as_bytes()).await.is_err() {
                            return;
                        }
                    }
                }
            });
        }
    });
    addr
}

async fn get(s: &mut BufReader<TcpStream>, path: &str) -> String {
    s.get_mut()
        .write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut len = 0;
    loop {
        let mut line = String::new();
        s.read_line(&mut line).await.unwrap();
        if let Some(v) = line.strip_prefix("Content-Length: ") {
            len = v.trim().parse().unwrap();
        }
        if line == "\r\n" {
            break;
        }
    }
    let mut body = vec![0u8; len];
    s.read_exact(&mut body).await.unwrap();
    String::from_utf8(body).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keygen_server_client_forward_and_socks() {
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("tunnel.key");
    let st = std::process::Command::new(BIN)
        .args(["tunnel", "keygen", "--out"])
        .arg(&key)
        .status()
        .unwrap();
    assert!(st.success());
    let key = key.to_str().unwrap();
    let (_server, lines) = spawn(
        &[
            "tunnel",
            "server",
            "--listen",
            "127.0.0.1:0",
            "--key-file",
            key,
        ],
        1,
    )
    .await;
    let server_addr = lines[0].strip_prefix("listening on ").unwrap().to_string();
    let http = http_server().await;
    let forward = format!("127.0.0.1:0:{http}");
    let (_client, lines) = spawn(
        &[
            "tunnel",
            "client",
            "--server",
            &server_addr,
            "--key-file",
            key,
            "-L",
            &forward,
            "--socks",
            "127.0.0.1:0",
        ],
        2,
    )
    .await;
    let fwd = lines[0]
        .strip_prefix("forward ")
        .unwrap()
        .split(' ')
        .next()
        .unwrap()
        .to_string();
    let socks = lines[1].strip_prefix("socks on ").unwrap().to_string();

    // HTTP-like: several requests on one connection through the forward.
    let mut s = BufReader::new(TcpStream::connect(&fwd).await.unwrap());
    for i in 0..10 {
        let body = get(&mut s, &format!("/doc/{i}")).await;
        assert_eq!(body, format!("you asked for /doc/{i}\n").repeat(100));
    }

    // SOCKS5 CONNECT by name: the tunnel server resolves "localhost".
    let port: u16 = http.rsplit(':').next().unwrap().parse().unwrap();
    let mut t = TcpStream::connect(&socks).await.unwrap();
    t.write_all(&[5, 1, 0]).await.unwrap();
    let mut r = [0u8; 2];
    t.read_exact(&mut r).await.unwrap();
    assert_eq!(r, [5, 0]);
    let mut req = vec![5, 1, 0, 3, 9];
    req.extend_from_slice(b"localhost");
    req.extend_from_slice(&port.to_be_bytes());
    t.write_all(&req).await.unwrap();
    let mut rep = [0u8; 10];
    t.read_exact(&mut rep).await.unwrap();
    assert_eq!(rep[1], 0, "SOCKS reply {rep:?}");
    let mut t = BufReader::new(t);
    assert_eq!(
        get(&mut t, "/socks").await,
        "you asked for /socks\n".repeat(100)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bulk_transfer_arrives_whole() {
    let dir = tempfile::tempdir().unwrap();
    // No key given: the server creates the default key file, the client reads it.
    let home = dir.path().to_str().unwrap();
    let sink = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let sink_addr = sink.local_addr().unwrap().to_string();
    let mut server = Command::new(BIN);
    server
        .args(["tunnel", "server", "--listen", "127.0.0.1:0"])
        .env("XDG_CONFIG_HOME", home);
    let mut server = server
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut out = BufReader::new(server.stdout.take().unwrap()).lines();
    let line = tokio::time::timeout(Duration::from_secs(30), out.next_line())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    let server_addr = line.strip_prefix("listening on ").unwrap().to_string();
    let forward = format!("127.0.0.1:0:{sink_addr}");
    let mut client = Command::new(BIN);
    client
        .args(["tunnel", "client", "--server", &server_addr, "-L", &forward])
        .env("XDG_CONFIG_HOME", home);
    let mut client = client
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut out = BufReader::new(client.stdout.take().unwrap()).lines();
    let line = tokio::time::timeout(Duration::from_secs(30), out.next_line())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    let fwd = line
        .strip_prefix("forward ")
        .unwrap()
        .split(' ')
        .next()
        .unwrap()
        .to_string();
    let mut rng = fastrand::Rng::with_seed(4);
    let data: Vec<u8> = (0..(16 << 20)).map(|_| rng.u8(..)).collect();
    let mut s = TcpStream::connect(&fwd).await.unwrap();
    let (mut far, _) = sink.accept().await.unwrap();
    let d2 = data.clone();
    let writer = tokio::spawn(async move {
        s.write_all(&d2).await.unwrap();
        s.shutdown().await.unwrap();
        s
    });
    let mut got = Vec::new();
    far.read_to_end(&mut got).await.unwrap();
    let _s = writer.await.unwrap();
    assert_eq!(got.len(), data.len());
    assert!(got == data, "bytes differ");
}
