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
    let mut args = vec!["--listen", listen, "--no-http"];
    args.extend_from_slice(extra);
    let (child, addr) = common::serve_process(&args, &[]).await;
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

/// Runs `user add root --role root` (with `cmd`'s connection flags), the password on
/// standard input: the first user, from loopback, needs no login.
async fn add_root(mut cmd: Command) {
    let mut add = cmd
        .args(["user", "add", "root", "--role", "root"])
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
    assert!(within("user add root", add.wait()).await.unwrap().success());
}

/// The JSON array `ctl --json lockout list` printed.
fn lockout_entries(out: &str) -> Vec<serde_json::Value> {
    let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    v.as_array().unwrap().clone()
}

/// Failed logins back a user name off: `lockout list` shows it (a table, JSON with
/// --json; a name that is no user only by its hash), the right password is refused
/// until `user unlock` ends the back-off, and then it logs in. Only an admin may do
/// either, and only on a running server.
#[tokio::test]
async fn a_user_backing_off_after_failed_logins_is_listed_and_unlocked() {
    let dir = tempdir("unlock-user");
    let data = dir.join("data");
    let srv = serve(
        "127.0.0.1:0",
        &[
            "--data-dir",
            data.to_str().unwrap(),
            "--scram-iterations",
            "4096",
            "--lockout-user-failures",
            "2",
        ],
    )
    .await;
    add_root(ctl(&srv.addr, &[])).await;
    let as_user = |user: &str, pw: &str, args: &[&str]| {
        let mut c = ctl(&srv.addr, args);
        c.env("PORTSWITCH_USER", user)
            .env("PORTSWITCH_PASSWORD", pw);
        c
    };
    let as_root = |args: &[&str]| as_user("root", ROOT_PW, args);
    let (code, _, err) = run(&mut as_root(&[
        "role",
        "add",
        "writers",
        "--grant",
        "svc/=register",
    ]))
    .await;
    assert_eq!(code, 0, "{err}");
    let (code, _, err) = run(as_root(&["user", "add", "alice", "--role", "writers"])
        .env("PORTSWITCH_NEW_PASSWORD", "Tulip-Orbit-93"))
    .await;
    assert_eq!(code, 0, "{err}");

    // Without the admin permission: neither.
    for args in [&["lockout", "list"][..], &["user", "unlock", "alice"]] {
        let (code, _, err) = run(&mut as_user("alice", "Tulip-Orbit-93", args)).await;
        assert_eq!(code, 1, "{args:?}");
        assert!(err.contains("permission_denied"), "{args:?}: {err}");
    }
    let (code, out, err) = run(&mut as_root(&["lockout", "list"])).await;
    assert_eq!(
        (code, out.trim()),
        (0, "no user name or address is refused now"),
        "{err}"
    );

    // Wrong passwords for alice, and for a name that is no user, until both back off
    // for long enough to look at (1 s, then 2 s, 4 s: each failure after a back-off
    // ends doubles it).
    let mut found = Vec::new();
    for _ in 0..8 {
        for user in ["alice", "mallory"] {
            let (code, _, err) = run(&mut as_user(
                user,
                "Not-The-Password-1",
                &["query", "svc/x"],
            ))
            .await;
            assert_eq!(code, 1, "{err}");
            assert!(err.contains("auth_failed"), "{err}");
        }
        let (code, out, err) = run(&mut as_root(&["--json", "lockout", "list"])).await;
        assert_eq!(code, 0, "{err}");
        found = lockout_entries(&out);
        let shortest = found
            .iter()
            .map(|e| e["refused_ms"].as_u64().unwrap())
            .min();
        if found.len() == 2 && shortest >= Some(3_000) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(shortest.unwrap_or(0) + 100)).await;
    }
    assert_eq!(found.len(), 2, "{found:?}");
    let alice = found
        .iter()
        .find(|e| e["user"] == "alice")
        .expect("alice listed");
    assert_eq!(alice["user_known"], true);
    // She logged in from here a moment ago: the back-off is the one of her name at
    // this address (guesses from elsewhere would not delay her here).
    assert_eq!(alice["at"], "127.0.0.1", "{alice}");
    assert!(alice["failures"].as_u64().unwrap() >= 3, "{alice}");
    // The name that is no user: not shown, only its hash (as in the audit log).
    let other = found
        .iter()
        .find(|e| e["user"].is_null())
        .expect("mallory listed");
    assert_eq!(other["user_known"], false);
    let hash = other["user_hash"].as_str().unwrap();
    assert_eq!(hash.len(), 16, "{other}");
    assert!(!other.to_string().contains("mallory"), "{other}");

    // The table: who, failures, for how much longer.
    let (code, out, err) = run(&mut as_root(&["lockout", "list"])).await;
    assert_eq!(code, 0, "{err}");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 3, "{out}");
    assert!(lines[0].starts_with("WHO "), "{out}");
    assert!(lines[0].ends_with("FAILURES  REFUSED FOR"), "{out}");
    let col = lines[0].find("FAILURES").unwrap();
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with("user alice from 127.0.0.1 ")
                && l[col..].split_whitespace().next() == Some(&alice["failures"].to_string())),
        "{out}"
    );
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with(&format!("unknown user #{hash} "))),
        "{out}"
    );
    assert!(!out.contains("mallory"), "{out}");

    // Her own password is refused during the back-off, whatever it is.
    let (code, _, err) = run(&mut as_user("alice", "Tulip-Orbit-93", &["query", "svc/x"])).await;
    assert_eq!(code, 1, "logged in during the back-off");
    assert!(err.contains("retry in"), "{err}");

    // Not offline: a stopped server keeps no count.
    let (code, _, err) = run(&mut as_root(&[
        "--data-dir",
        data.to_str().unwrap(),
        "user",
        "unlock",
        "alice",
    ]))
    .await;
    assert_eq!(code, 1);
    assert!(
        err.contains("running server") && err.contains("--data-dir"),
        "{err}"
    );

    let (code, out, err) = run(&mut as_root(&["user", "unlock", "alice"])).await;
    assert_eq!((code, out.trim()), (0, "unlocked user alice"), "{err}");
    let (code, out, err) = run(&mut as_user("alice", "Tulip-Orbit-93", &["query", "svc/x"])).await;
    // Logged in: only her role stops the query.
    assert_eq!(code, 1, "{out}");
    assert!(err.contains("permission_denied"), "{err}");
    let (code, out, err) = run(&mut as_user(
        "alice",
        "Tulip-Orbit-93",
        &["register", "svc/x", "--hold-secs", "0"],
    ))
    .await;
    assert_eq!(code, 0, "{out}{err}");
    // Nothing left to unlock for her; the other name is still listed.
    let (code, out, err) = run(&mut as_root(&["--json", "user", "unlock", "alice"])).await;
    assert_eq!(code, 0, "{err}");
    let j: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(
        j,
        serde_json::json!({"ok": true, "user": "alice", "had_failures": false})
    );
    let (code, out, _) = run(&mut as_root(&["user", "unlock", "alice"])).await;
    assert_eq!(code, 0);
    assert!(out.contains("nothing to unlock"), "{out}");
    let (_, out, _) = run(&mut as_root(&["--json", "lockout", "list"])).await;
    let left = lockout_entries(&out);
    assert!(left.iter().all(|e| e["user"].is_null()), "{left:?}");

    // A reader that goes away ends it quietly, as every listing.
    let mut child = as_root(&["lockout", "list"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stdout.take());
    let out = within("ctl exits", child.wait_with_output()).await.unwrap();
    assert_eq!(
        out.status.code(),
        Some(141),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.stderr.is_empty());
    let _ = std::fs::remove_dir_all(dir);
}

/// `portswitch cert --client NAME` into a directory holding a CA adds the client's
/// certificate, signed by that CA, leaving ca.pem and the server's certificate as
/// they were: a server already trusting the CA accepts it. With it, root logs in
/// while its address is refused after failed logins (a certificate login is not
/// throttled), sees the refusal in `lockout list` and ends it.
#[tokio::test]
async fn cert_adds_clients_to_its_ca_and_an_admin_unlocks_a_refused_address() {
    let dir = tempdir("unlock-addr");
    let certs = dir.join("certs");
    let c = certs.to_str().unwrap();
    let (code, _, err) = run(Command::new(BIN).args(["cert", "--out", c])).await;
    assert_eq!(code, 0, "{err}");
    let p = |f: &str| certs.join(f).to_str().unwrap().to_string();
    let kept = ["ca.pem", "ca-key.pem", "server.pem", "server-key.pem"];
    let before: Vec<Vec<u8>> = kept.iter().map(|f| std::fs::read(p(f)).unwrap()).collect();
    let data = dir.join("data");
    let srv = serve(
        "127.0.0.1:0",
        &[
            "--tls-cert",
            &p("server.pem"),
            "--tls-key",
            &p("server-key.pem"),
            "--tls-client-ca",
            &p("ca.pem"),
            "--data-dir",
            data.to_str().unwrap(),
            "--scram-iterations",
            "4096",
            "--lockout-addr-failures",
            "3",
            "--lockout-ms",
            "60000",
        ],
    )
    .await;

    // root's certificate, made after the server started, beside the CA it trusts.
    let (code, out, err) =
        run(Command::new(BIN).args(["cert", "--out", c, "--client", "root"])).await;
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("client-root.pem") && !out.contains("ca.pem"),
        "{out}"
    );
    let after: Vec<Vec<u8>> = kept.iter().map(|f| std::fs::read(p(f)).unwrap()).collect();
    assert!(before == after, "ca.pem or the server's files changed");
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(p("client-root-key.pem"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }
    // Again: refused, nothing written.
    let (code, _, err) =
        run(Command::new(BIN).args(["cert", "--out", c, "--client", "root"])).await;
    assert_eq!(code, 1);
    assert!(err.contains("client-root.pem exists"), "{err}");
    // A TLS implementation other than ours agrees, where openssl is installed.
    if let Ok(out) = std::process::Command::new("openssl")
        .args([
            "verify",
            "-purpose",
            "sslclient",
            "-CAfile",
            &p("ca.pem"),
            &p("client-root.pem"),
        ])
        .output()
    {
        let said = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success() && said.contains(": OK"), "{said}");
    }

    let tls = |args: &[&str]| {
        let mut c = ctl(&srv.addr, &["--ca", &p("ca.pem")]);
        c.args(args);
        c
    };
    let with_password = |pw: &str, args: &[&str]| {
        let mut c = tls(&["--user", "root"]);
        c.args(args).env("PORTSWITCH_PASSWORD", pw);
        c
    };
    let with_cert = |args: &[&str]| {
        let mut c = tls(&[
            "--cert",
            &p("client-root.pem"),
            "--key",
            &p("client-root-key.pem"),
        ]);
        c.args(args);
        c
    };
    add_root(tls(&[])).await;
    let (code, out, err) = run(&mut with_cert(&["query", "x"])).await;
    assert_eq!(
        (code, out.trim()),
        (0, "x: free"),
        "the new certificate logs in: {err}"
    );

    // Three failed logins from 127.0.0.1, whatever the names: the address is refused,
    // even with the right password.
    for user in ["root", "nobody", "root"] {
        let mut c = tls(&["--user", user, "query", "x"]);
        c.env("PORTSWITCH_PASSWORD", "Not-The-Password-1");
        let (code, _, err) = run(&mut c).await;
        assert_eq!(code, 1);
        assert!(err.contains("auth_failed"), "{err}");
    }
    let (code, _, err) = run(&mut with_password(ROOT_PW, &["query", "x"])).await;
    assert_eq!(code, 1);
    assert!(err.contains("from this address: retry in"), "{err}");

    // root by certificate sees it, and ends it.
    let (code, out, err) = run(&mut with_cert(&["--json", "lockout", "list"])).await;
    assert_eq!(code, 0, "{err}");
    let entries = lockout_entries(&out);
    assert_eq!(entries.len(), 1, "{out}");
    assert_eq!(entries[0]["addr"], "127.0.0.1");
    assert_eq!(entries[0]["failures"], 3);
    assert!(entries[0]["refused_ms"].as_u64().unwrap() > 50_000, "{out}");
    let (code, out, err) = run(&mut with_cert(&["lockout", "list"])).await;
    assert_eq!(code, 0, "{err}");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 2, "{out}");
    assert_eq!(
        lines[1].split_whitespace().take(3).collect::<Vec<_>>(),
        ["address", "127.0.0.1", "3"],
        "{out}"
    );
    assert!(lines[1].ends_with('s'), "{out}");
    // An address is checked before it is sent.
    let (code, _, err) = run(&mut with_cert(&["lockout", "unlock-addr", "nowhere"])).await;
    assert_eq!(code, 2);
    assert!(err.contains("invalid IP address"), "{err}");
    let (code, out, err) = run(&mut with_cert(&["lockout", "unlock-addr", "127.0.0.1"])).await;
    assert_eq!(
        (code, out.trim()),
        (0, "unlocked address 127.0.0.1"),
        "{err}"
    );

    // The password works again; nothing is left to unlock or list.
    let (code, out, err) = run(&mut with_password(ROOT_PW, &["query", "x"])).await;
    assert_eq!((code, out.trim()), (0, "x: free"), "{err}");
    let (code, out, err) = run(&mut with_password(
        ROOT_PW,
        &["--json", "lockout", "unlock-addr", "127.0.0.1"],
    ))
    .await;
    assert_eq!(code, 0, "{err}");
    let j: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(
        j,
        serde_json::json!({"ok": true, "addr": "127.0.0.1", "had_failures": false})
    );
    let (_, out, _) = run(&mut with_password(ROOT_PW, &["--json", "lockout", "list"])).await;
    assert!(lockout_entries(&out).is_empty(), "{out}");
    let (code, _, err) = run(&mut with_password(
        ROOT_PW,
        &["--data-dir", data.to_str().unwrap(), "lockout", "list"],
    ))
    .await;
    assert_eq!(code, 1);
    assert!(err.contains("running server"), "{err}");
    let _ = std::fs::remove_dir_all(dir);
}
