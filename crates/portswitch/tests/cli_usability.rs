//! What a new user of `portswitch ctl` and `serve` runs into first, with the real
//! binary against a real `portswitch serve` on loopback: a TLS server spoken to in
//! plaintext (and the reverse), waiting commands that must give up, an address with
//! nothing behind it, credentials `status` must use, output read by `head`, names
//! holding terminal escapes, and `--listen localhost:PORT`.

mod common;

use std::process::Stdio;
use std::time::{Duration, Instant};

use common::within;
use portswitch_client::{Client, ClientOptions, RegisterOutcome};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, Command};

const BIN: &str = env!("CARGO_BIN_EXE_portswitch");

/// A password the server's policy accepts.
const ROOT_PW: &str = "Granite-Falcon-2026!";

/// A `portswitch serve` process (killed when dropped).
struct Serve {
    _child: Child,
    addr: String,
}

async fn serve(listen: &str, extra: &[&str]) -> Serve {
    let mut child = Command::new(BIN)
        .args(["serve", "--listen", listen, "--no-http"])
        .args(extra)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn serve");
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let line = within("server start", lines.next_line())
        .await
        .unwrap()
        .expect("server printed its address");
    let addr = line
        .strip_prefix("listening on ")
        .expect("listening line")
        .to_string();
    Serve {
        _child: child,
        addr,
    }
}

fn tempdir(tag: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("portswitch-cli-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn ctl(addr: &str, args: &[&str]) -> Command {
    let mut c = Command::new(BIN);
    c.args(["ctl", "--addr", addr])
        .args(args)
        .env_remove("PORTSWITCH_USER")
        .env_remove("PORTSWITCH_PASSWORD")
        .env_remove("PORTSWITCH_CA")
        .stdin(Stdio::null())
        .kill_on_drop(true);
    c
}

/// Exit code, stdout and stderr of a command.
async fn run(cmd: &mut Command) -> (i32, String, String) {
    let out = within("ctl", cmd.output()).await.unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A port on loopback with nothing listening: bound, then let go.
fn closed_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

/// The value of one server counter.
async fn stat(c: &Client, name: &str) -> u64 {
    let s = c.stats().await.unwrap();
    s.iter().find(|(k, _)| k == name).unwrap().1
}

#[tokio::test]
async fn plaintext_to_a_tls_server_and_tls_to_a_plain_one_say_what_to_do() {
    let dir = tempdir("tls");
    let certs = dir.join("certs");
    let (code, _, err) =
        run(Command::new(BIN).args(["cert", "--out", certs.to_str().unwrap()])).await;
    assert_eq!(code, 0, "{err}");
    let p = |f: &str| certs.join(f).to_str().unwrap().to_string();
    let tls = serve(
        "127.0.0.1:0",
        &[
            "--tls-cert",
            &p("server.pem"),
            "--tls-key",
            &p("server-key.pem"),
        ],
    )
    .await;
    let plain = serve("127.0.0.1:0", &[]).await;

    // Plaintext to TLS: its TLS alert is no frame of 352,518,912 bytes.
    for args in [&["query", "x"][..], &["status"]] {
        let (code, out, err) = run(&mut ctl(&tls.addr, args)).await;
        let said = format!("{out}{err}");
        assert_eq!(code, 1, "{said}");
        assert!(
            said.contains("speaks TLS") && said.contains("--ca") && !said.contains("bytes"),
            "{said}"
        );
    }
    // With --ca (and --tls-name, the other name of --server-name) it works.
    let (code, out, err) = run(&mut ctl(
        &tls.addr,
        &[
            "--ca",
            &p("ca.pem"),
            "--tls-name",
            "localhost",
            "query",
            "x",
        ],
    ))
    .await;
    assert_eq!((code, out.trim()), (0, "x: free"), "{err}");

    // TLS to plaintext: told to leave out --ca, at once rather than after retries.
    let port = plain.addr.rsplit_once(':').unwrap().1;
    let started = Instant::now();
    let (code, _, err) = run(&mut ctl(
        &format!("localhost:{port}"),
        &["--ca", &p("ca.pem"), "query", "x"],
    ))
    .await;
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("does not speak TLS") && err.contains("--ca"),
        "{err}"
    );
    assert!(
        started.elapsed() < Duration::from_millis(2_500),
        "not retried for the whole connect timeout"
    );
    let _ = std::fs::remove_dir_all(dir);
}

/// Nothing listening at any address: the command fails without waiting out the
/// client's 5 s connect timeout, naming every address and why.
#[tokio::test]
async fn unreachable_addresses_fail_fast_and_are_named() {
    let (a, b) = (
        format!("127.0.0.1:{}", closed_port()),
        format!("127.0.0.1:{}", closed_port()),
    );
    for args in [
        &["query", "x"][..],
        &["lock", "l"],
        &["register", "r", "--wait"],
    ] {
        let started = Instant::now();
        let (code, _, err) = run(&mut ctl(&format!("{a},{b}"), args)).await;
        let took = started.elapsed();
        assert_eq!(code, 1, "{err}");
        for addr in [&a, &b] {
            assert!(
                err.contains(&format!("cannot reach {addr}: connection refused")),
                "{err}"
            );
        }
        // A bound on the retry loop, not a timing figure: it used to take 4.7 s.
        assert!(
            took < Duration::from_millis(2_500),
            "{args:?} took {took:?}"
        );
    }
    // status asks each server and says the same.
    let (code, out, _) = run(&mut ctl(&a, &["status"])).await;
    assert_eq!(code, 1);
    assert!(
        out.contains(&format!("cannot reach {a}: connection refused")),
        "{out}"
    );
}

/// --timeout ends every waiting command with exit code 124 and a message, and its
/// session with BYE: the server is left with no waiter and no session of it.
#[tokio::test]
async fn timeouts_end_waiting_commands_and_their_sessions() {
    let srv = serve("127.0.0.1:0", &[]).await;
    let holder = Client::connect(ClientOptions::new(srv.addr.clone()))
        .await
        .unwrap();
    for port in ["q", "leader/q"] {
        assert!(matches!(
            holder.register(port, "").await.unwrap(),
            RegisterOutcome::Owned { .. }
        ));
    }
    let cases: [&[&str]; 6] = [
        &["register", "q", "--wait"],
        &["lock", "q"],
        &["lock", "q", "--", "true"],
        &["elect", "leader/q", "--", "true"],
        &["elect", "leader/q", "--observe"],
        &["watch", "q", "--count", "1"],
    ];
    for args in cases {
        let mut cmd = ctl(&srv.addr, &["--timeout", "300ms"]);
        cmd.args(args);
        let (code, _, err) = run(&mut cmd).await;
        assert_eq!(code, 124, "{args:?}: {err}");
        assert!(err.contains("timed out after 300ms waiting for"), "{err}");
        assert_eq!(stat(&holder, "waiters").await, 0, "{args:?} left its queue");
        assert_eq!(
            stat(&holder, "sessions").await,
            1,
            "{args:?} ended its session"
        );
    }
    // A lock got in time is held past the timeout, until interrupted.
    let mut lock = ctl(&srv.addr, &["--timeout", "300ms", "lock", "free"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut err = BufReader::new(lock.stderr.take().unwrap()).lines();
    let line = within("lock", err.next_line()).await.unwrap().unwrap();
    assert!(line.starts_with("holding lock free"), "{line}");
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert!(lock.try_wait().unwrap().is_none(), "still holding");
    assert!(holder.query("free").await.unwrap().is_some());
    let pid = lock.id().unwrap().to_string();
    let killed = std::process::Command::new("kill")
        .args(["-INT", &pid])
        .status()
        .unwrap();
    assert!(killed.success());
    let status = within("lock exits", lock.wait()).await.unwrap();
    assert_eq!(status.code(), Some(0));
    assert_eq!(holder.query("free").await.unwrap(), None, "released");
    // A watch that sees its change in time succeeds.
    let mut watch = ctl(
        &srv.addr,
        &["--timeout", "5s", "watch", "q", "--count", "1"],
    )
    .stdout(Stdio::piped())
    .spawn()
    .unwrap();
    let mut out = BufReader::new(watch.stdout.take().unwrap()).lines();
    let first = within("watch", out.next_line()).await.unwrap().unwrap();
    assert!(first.starts_with("q: owned by session"), "{first}");
    holder.unregister("q").await.unwrap();
    let status = within("watch exits", watch.wait()).await.unwrap();
    assert_eq!(status.code(), Some(0));
}

/// `ctl status` logs in with the credentials it is given, so wrong ones fail; `user
/// list` prints a table (JSON with --json).
#[tokio::test]
async fn status_uses_the_credentials_and_user_list_is_a_table() {
    let dir = tempdir("status");
    let data = dir.join("data");
    let srv = serve(
        "127.0.0.1:0",
        &[
            "--data-dir",
            data.to_str().unwrap(),
            "--scram-iterations",
            "4096",
        ],
    )
    .await;
    let mut add = ctl(&srv.addr, &["user", "add", "root", "--role", "root"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let mut stdin = add.stdin.take().unwrap();
    stdin
        .write_all(format!("{ROOT_PW}\n").as_bytes())
        .await
        .unwrap();
    drop(stdin);
    assert!(within("user add", add.wait()).await.unwrap().success());
    let as_root = |pw: &str, args: &[&str]| {
        let mut c = ctl(&srv.addr, &["--user", "root"]);
        c.args(args).env("PORTSWITCH_PASSWORD", pw);
        c
    };

    let (code, out, err) = run(&mut as_root("Not-The-Password-1", &["status"])).await;
    assert_eq!(code, 1, "{out}{err}");
    assert!(out.contains("auth_failed"), "{out}");
    let (code, out, err) = run(&mut as_root("Not-The-Password-1", &["--json", "status"])).await;
    assert_eq!(code, 1, "{err}");
    let j: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert!(j["error"].as_str().unwrap().contains("auth_failed"), "{j}");
    let (code, out, err) = run(&mut as_root(ROOT_PW, &["status"])).await;
    assert_eq!(code, 0, "{err}");
    assert!(
        out.starts_with(&format!("server {}  node", srv.addr)),
        "{out}"
    );

    let (code, _, err) = run(&mut as_root(
        ROOT_PW,
        &["role", "add", "writers", "--grant", "svc/=register"],
    ))
    .await;
    assert_eq!(code, 0, "{err}");
    let (code, out, err) = run(
        as_root(ROOT_PW, &["user", "add", "alice", "--role", "writers"])
            .env("PORTSWITCH_NEW_PASSWORD", "Tulip-Orbit-93"),
    )
    .await;
    assert_eq!((code, out.trim()), (0, "ok"), "{err}");
    let (code, out, err) = run(&mut as_root(ROOT_PW, &["user", "list"])).await;
    assert_eq!(code, 0, "{err}");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 3, "{out}");
    assert_eq!(
        lines[0].split_whitespace().collect::<Vec<_>>(),
        ["USER", "ROLES"]
    );
    assert!(
        lines
            .iter()
            .any(|l| l.split_whitespace().eq(["alice", "writers"])),
        "{out}"
    );
    assert!(
        lines
            .iter()
            .any(|l| l.split_whitespace().eq(["root", "root"])),
        "{out}"
    );
    // The columns line up: every role starts where the header's does.
    let col = lines[0].find("ROLES").unwrap();
    assert!(
        lines[1..]
            .iter()
            .all(|l| l[..col].ends_with(' ') && l.get(col..).is_some_and(|r| !r.starts_with(' '))),
        "{out}"
    );
    let (_, out, _) = run(&mut as_root(ROOT_PW, &["--json", "user", "list"])).await;
    let users: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(users.as_array().unwrap().len(), 2, "{users}");
    let _ = std::fs::remove_dir_all(dir);
}

/// Output to a reader that has gone away ends the command quietly (no panic, no
/// message; exit code 141 as after SIGPIPE), and its session with BYE.
#[tokio::test]
async fn a_closed_stdout_ends_the_command_quietly() {
    let srv = serve("127.0.0.1:0", &[]).await;
    let w = Client::connect(ClientOptions::new(srv.addr.clone()))
        .await
        .unwrap();
    w.register("busy", "v").await.unwrap();
    let cases: [&[&str]; 6] = [
        &["status"],
        &["query", "busy"],
        &["list"],
        &["--json", "list"],
        &["watch", "busy"],
        &["register", "mine"],
    ];
    for args in cases {
        let mut child = ctl(&srv.addr, args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        // The reader goes before anything is written.
        drop(child.stdout.take());
        let out = within("ctl exits", child.wait_with_output()).await.unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(141), "{args:?}: {err}");
        assert!(err.is_empty(), "{args:?}: {err}");
    }
    // `register` ended its session: the port is free now, not after its lease.
    assert_eq!(w.query("mine").await.unwrap(), None);
    assert_eq!(stat(&w, "sessions").await, 1);

    // `watch x | head -1`, `elect --observe | head -1`: the reader leaves after the
    // first line, and the command ends then, not at its next write (none comes).
    for args in [&["watch", "busy"][..], &["elect", "e", "--observe"]] {
        let mut child = ctl(&srv.addr, args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        within("first line", lines.next_line())
            .await
            .unwrap()
            .unwrap();
        drop(lines);
        let out = within("ctl ends with its reader", child.wait_with_output())
            .await
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(141), "{args:?}: {err}");
        assert!(err.is_empty(), "{args:?}: {err}");
        assert_eq!(stat(&w, "sessions").await, 1, "{args:?} ended its session");
    }
}

/// Names, values and node names may hold any bytes; every output shows control bytes
/// escaped, never raw.
#[tokio::test]
async fn control_bytes_are_shown_escaped_in_every_output() {
    let srv = serve("127.0.0.1:0", &[]).await;
    let mut opts = ClientOptions::new(srv.addr.clone());
    opts.node_name = "node\u{1b}]0;title\u{7}".into();
    let evil = Client::connect(opts).await.unwrap();
    let name = "e/\u{1b}[2Jx\u{9b}y";
    evil.register(name, "v\u{1b}[31mred\r").await.unwrap();
    let raw = |s: &str| {
        s.contains('\u{1b}') || s.contains('\u{9b}') || s.contains('\u{7}') || s.contains('\r')
    };

    let mut outputs = Vec::new();
    for args in [
        &["query", name][..],
        &["--json", "query", name],
        &["list", "e/"],
        &["--json", "list", "e/"],
        &["register", name],
        &["send", name, "hi\u{1b}"],
    ] {
        let (_, out, err) = run(&mut ctl(&srv.addr, args)).await;
        outputs.push((args.to_vec(), out, err));
    }
    // watch: a change as it comes, and the message relayed to a holder.
    let mut watch = ctl(&srv.addr, &["watch", "e/", "--prefix", "--count", "1"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(watch.stdout.take().unwrap()).lines();
    let first = within("watch", lines.next_line()).await.unwrap().unwrap();
    evil.unregister(name).await.unwrap();
    let second = within("watch", lines.next_line()).await.unwrap().unwrap();
    assert!(second.contains("released"), "{second}");
    let mut holder = ctl(&srv.addr, &["register", name])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut held = BufReader::new(holder.stdout.take().unwrap()).lines();
    let registered = within("holder", held.next_line()).await.unwrap().unwrap();
    evil.send(name, "pay\u{1b}load").await.unwrap();
    let message = within("message", held.next_line()).await.unwrap().unwrap();
    assert!(message.contains("pay\\x1bload"), "{message}");
    outputs.push((vec!["watch"], format!("{first}\n{second}"), String::new()));
    outputs.push((
        vec!["register (held)"],
        format!("{registered}\n{message}"),
        String::new(),
    ));

    for (args, out, err) in &outputs {
        assert!(
            !raw(out) && !raw(err),
            "{args:?} printed control bytes raw: {out:?} {err:?}"
        );
    }
    let human_query = &outputs[0].1;
    assert!(
        human_query.contains("e/\\x1b[2Jx\\u{9b}y")
            && human_query.contains("node\\x1b]0;title\\x07")
            && human_query.contains("v\\x1b[31mred\\r"),
        "{human_query}"
    );
    // JSON stays JSON, with the same strings.
    let j: serde_json::Value = serde_json::from_str(outputs[1].1.trim()).unwrap();
    assert_eq!(j["port"], name);
    let taken = &outputs[4].1;
    assert!(taken.starts_with("taken: e/\\x1b[2J"), "{taken}");
    let _ = holder.start_kill();
}

/// `serve --listen localhost:PORT` resolves the name, and localhost stays loopback
/// (no TLS or users demanded).
#[tokio::test]
async fn serve_listens_on_localhost_by_name() {
    let srv = serve("localhost:0", &[]).await;
    assert!(srv.addr.starts_with("127.0.0.1:"), "{}", srv.addr);
    let port = srv.addr.rsplit_once(':').unwrap().1;
    let (code, out, err) = run(&mut ctl(&format!("localhost:{port}"), &["query", "x"])).await;
    assert_eq!((code, out.trim()), (0, "x: free"), "{err}");
    let (code, _, err) = run(Command::new(BIN).args([
        "serve",
        "--listen",
        "no-such-host.invalid:7400",
        "--no-http",
    ]))
    .await;
    assert_ne!(code, 0);
    assert!(err.contains("no-such-host.invalid"), "{err}");
}
