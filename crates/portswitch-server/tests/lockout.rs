//! Failed logins over real sockets: a back-off an administrator lifts with an ADMIN
//! command, an audit log that never holds a password typed as a user name, and the
//! modes of the files that hold secrets. The client is written out by hand (frames,
//! SCRAM), as a client in another language would be.

use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use bytes::BytesMut;
use portswitch_auth::lockout::LockoutConfig;
use portswitch_auth::scram::{Channel, ClientExchange, ITERATIONS_MIN};
use portswitch_proto::frame::{frame_len, messages};
use portswitch_proto::limits::FRAME_BYTES_MAX;
use portswitch_proto::{ErrorCode, FrameBuf, Hello, Reply, Request, ServerMsg};
use portswitch_server::auth::AuthConfig;
use portswitch_server::{RunningServer, ServerConfig};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const ROOT_PW: &str = "Granite-Falcon-2026!";
const ALICE_PW: &str = "Tulip-Orbit-93";

/// What the server answered one request.
#[derive(Debug)]
enum Answer {
    HelloOk,
    Challenge(String),
    Admin(Value),
    Refused(ErrorCode, String),
}

struct Conn {
    stream: TcpStream,
    buf: BytesMut,
    next_id: u32,
}

impl Conn {
    async fn open(addr: SocketAddr) -> Conn {
        Conn {
            stream: TcpStream::connect(addr).await.unwrap(),
            buf: BytesMut::new(),
            next_id: 0,
        }
    }

    /// Sends one request and waits (at most 10 s) for its reply.
    async fn call(&mut self, req: &Request<'_>) -> Answer {
        self.next_id += 1;
        let mut fb = FrameBuf::new(FRAME_BYTES_MAX, usize::MAX);
        fb.push_request(self.next_id, req);
        let mut out = BytesMut::new();
        fb.take_into(&mut out);
        self.stream.write_all(&out).await.unwrap();
        tokio::time::timeout(Duration::from_secs(10), self.reply())
            .await
            .expect("a reply within 10 s")
    }

    async fn reply(&mut self) -> Answer {
        loop {
            if let Some(n) = frame_len(&self.buf, usize::MAX).unwrap() {
                let frame = self.buf.split_to(n);
                for m in messages(&frame[4..], usize::MAX) {
                    let m = m.unwrap();
                    let ServerMsg::Reply { reply, .. } =
                        ServerMsg::decode(m.opcode, m.id, m.body).unwrap()
                    else {
                        continue;
                    };
                    let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
                    return match reply {
                        Reply::HelloOk(_) => Answer::HelloOk,
                        Reply::AuthContinue { data } => Answer::Challenge(text(data)),
                        Reply::AdminOk { result } => {
                            Answer::Admin(serde_json::from_slice(result).unwrap())
                        }
                        Reply::Error { code, message, .. } => Answer::Refused(code, text(message)),
                        other => panic!("unexpected {other:?}"),
                    };
                }
                continue;
            }
            assert!(
                self.stream.read_buf(&mut self.buf).await.unwrap() > 0,
                "connection closed"
            );
        }
    }

    async fn admin(&mut self, cmd: Value) -> Answer {
        let cmd = cmd.to_string();
        self.call(&Request::Admin {
            command: cmd.as_bytes(),
        })
        .await
    }
}

fn hello(credentials: &[u8]) -> Hello<'_> {
    Hello {
        version_min: 1,
        version_max: 1,
        features: 0,
        lease_ms: 10_000,
        end_on_disconnect: true,
        node_name: b"lockout-test",
        credentials,
        resume_session: 0,
        resume_secret: 0,
    }
}

/// A SCRAM login on a new connection: the connection if it got in, else the refusal.
async fn login(addr: SocketAddr, user: &str, pw: &str) -> Result<Conn, (ErrorCode, String)> {
    let mut c = Conn::open(addr).await;
    let (client, first) = ClientExchange::start(user, pw, "testnonce", Channel::Plain);
    let creds = format!("SCRAM-SHA-256 {first}");
    let challenge = match c.call(&Request::Hello(hello(creds.as_bytes()))).await {
        Answer::Challenge(ch) => ch,
        Answer::Refused(code, msg) => return Err((code, msg)),
        other => panic!("{other:?}"),
    };
    let (_, client_final) = client.respond(&challenge, Channel::Plain).unwrap();
    match c
        .call(&Request::Auth {
            data: client_final.as_bytes(),
        })
        .await
    {
        Answer::HelloOk => Ok(c),
        Answer::Refused(code, msg) => Err((code, msg)),
        other => panic!("{other:?}"),
    }
}

fn temp_dir() -> PathBuf {
    let dir = std::env::temp_dir().join(format!("portswitch-lockout-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn mode(p: &Path) -> u32 {
    std::fs::metadata(p).unwrap().permissions().mode() & 0o777
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backed_off_user_is_unlocked_by_an_admin_and_the_log_keeps_no_passwords() {
    let dir = temp_dir();
    let mut cfg = ServerConfig::ephemeral();
    cfg.auth = AuthConfig {
        data_dir: Some(dir.clone()),
        audit_log: Some(dir.join("audit.log")),
        iterations: ITERATIONS_MIN,
        // A back-off of a whole minute from the second failure: only the unlock can
        // end it within this test.
        lockout: LockoutConfig {
            user_failures_max: 2,
            user_backoff_ms_min: 60_000,
            user_backoff_ms_max: 60_000,
            ..LockoutConfig::default()
        },
        ..AuthConfig::default()
    };
    let srv = RunningServer::start(cfg).await.unwrap();
    let addr = srv.addr;

    // The first user, from loopback without credentials; then alice.
    let mut anon = Conn::open(addr).await;
    assert!(matches!(
        anon.call(&Request::Hello(hello(b""))).await,
        Answer::HelloOk
    ));
    let made = anon
        .admin(json!({"op": "user_add", "user": "root", "password": ROOT_PW, "roles": ["root"]}))
        .await;
    assert!(matches!(made, Answer::Admin(_)), "{made:?}");
    drop(anon);
    let mut root = login(addr, "root", ROOT_PW).await.unwrap();
    let made = root
        .admin(json!({"op": "user_add", "user": "alice", "password": ALICE_PW, "roles": []}))
        .await;
    assert!(matches!(made, Answer::Admin(_)), "{made:?}");

    // Someone types alice's password into the user field, then guesses at alice.
    let (code, _) = login(addr, ALICE_PW, "").await.err().unwrap();
    assert_eq!(code, ErrorCode::AuthFailed);
    for _ in 0..2 {
        let (code, _) = login(addr, "alice", "Wrong-Guess-11").await.err().unwrap();
        assert_eq!(code, ErrorCode::AuthFailed);
    }
    // Alice's right password is refused for the back-off, which says how long.
    let (code, msg) = login(addr, "alice", ALICE_PW).await.err().unwrap();
    assert_eq!(code, ErrorCode::AuthFailed);
    assert!(msg.contains("retry in 60 s"), "{msg}");

    // An admin sees it and lifts it; alice gets in at once.
    let Answer::Admin(listed) = root.admin(json!({"op": "lockout_list"})).await else {
        panic!()
    };
    assert!(
        listed
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["user"] == "alice" && e["refused_ms"].as_u64().unwrap() > 50_000),
        "{listed}"
    );
    let Answer::Admin(unlocked) = root
        .admin(json!({"op": "user_unlock", "user": "alice"}))
        .await
    else {
        panic!()
    };
    assert_eq!(unlocked["had_failures"], true, "{unlocked}");
    login(addr, "alice", ALICE_PW).await.unwrap();

    // Only an admin may unlock.
    let mut alice = login(addr, "alice", ALICE_PW).await.unwrap();
    let denied = alice
        .admin(json!({"op": "addr_unlock", "addr": "127.0.0.1"}))
        .await;
    assert!(
        matches!(denied, Answer::Refused(ErrorCode::PermissionDenied, _)),
        "{denied:?}"
    );
    drop((root, alice));
    srv.stop().await.unwrap();

    let log = std::fs::read_to_string(dir.join("audit.log")).unwrap();
    assert!(
        !log.contains(ALICE_PW),
        "a password reached the audit log:\n{log}"
    );
    let events: Vec<Value> = log
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert!(events.iter().any(|e| e["event"] == "login_failed"
        && e["user"].is_null()
        && e["user_known"] == false
        && e["user_hash"].is_string()));
    assert!(events
        .iter()
        .any(|e| e["event"] == "login_refused_locked" && e["user"] == "alice"));
    assert!(events
        .iter()
        .any(|e| e["event"] == "admin" && e["op"] == "user_unlock" && e["by"] == "root"));
    for f in ["auth.json", "auth.key", "audit.log"] {
        assert_eq!(mode(&dir.join(f)), 0o600, "{f}");
    }
    let _ = std::fs::remove_dir_all(dir);
}
