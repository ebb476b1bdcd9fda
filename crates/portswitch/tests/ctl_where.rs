//! `ctl list --where` and `ctl watch --prefix --where`, filtered on the server: a real
//! `portswitch serve` on loopback, the client library and the binary. A filtered
//! listing returns exactly the matching ports across several pages (short and empty
//! pages included); a filtered watch delivers exactly the matching events; a filter
//! that does not compile is a typed error with its position and the connection goes
//! on; a hostile filter is refused when compiled or stopped by the step budget while
//! other clients are served.

mod common;

use std::process::Stdio;
use std::time::{Duration, Instant};

use common::within;
use portswitch_client::{Client, ClientOptions, ErrorCode, Event};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

const BIN: &str = env!("CARGO_BIN_EXE_portswitch");

/// A `portswitch serve` process (killed when dropped).
struct Serve {
    _child: Child,
    addr: String,
}

async fn serve() -> Serve {
    let (child, addr) = common::serve_process(&["--listen", "127.0.0.1:0", "--no-http"], &[]).await;
    Serve {
        _child: child,
        addr,
    }
}

async fn client(addr: &str) -> Client {
    let mut o = ClientOptions::new(addr.to_string());
    o.node_name = "where-test".into();
    within("connect", Client::connect(o)).await.unwrap()
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
async fn run(mut cmd: Command) -> (i32, String, String) {
    let out = within("ctl", cmd.output()).await.unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

async fn stat(c: &Client, name: &str) -> u64 {
    let s = c.stats().await.unwrap();
    s.iter().find(|(k, _)| k == name).unwrap().1
}

/// Registers `n` ports `PREFIX{i:05}`, with `value(i)`, many in flight at once.
async fn register_many(c: &Client, prefix: &str, n: usize, value: impl Fn(usize) -> String) {
    let mut set = tokio::task::JoinSet::new();
    for i in 0..n {
        let (c, name, v) = (c.clone(), format!("{prefix}{i:05}"), value(i));
        set.spawn(async move { c.register(&name, v).await });
    }
    while let Some(r) = within("registers", set.join_next()).await {
        r.unwrap().unwrap();
    }
}

#[tokio::test]
async fn list_where_returns_exactly_the_matching_ports_across_pages() {
    let srv = serve().await;
    let owner = client(&srv.addr).await;
    // 3,000 ports under svc/, one in 97 a leader (the server evaluates at most
    // list_filter_entries_max = 256 per call, so the listing takes many pages), and
    // 500 others outside the prefix that would match.
    register_many(&owner, "svc/", 3_000, |i| {
        if i % 97 == 0 {
            format!("role=leader addr=10.0.0.{}", i % 250)
        } else {
            "role=follower".into()
        }
    })
    .await;
    register_many(&owner, "other/", 500, |_| "role=leader".into()).await;
    let want: Vec<String> = (0..3_000)
        .filter(|i| i % 97 == 0)
        .map(|i| format!("svc/{i:05}"))
        .collect();

    // Through the client, small pages.
    let c = client(&srv.addr).await;
    let filter = r#"text.startsWith("role=leader")"#;
    let (mut seen, mut cursor, mut pages, mut empty) = (Vec::new(), 0, 0, 0);
    loop {
        let page = c.list_where("svc/", filter, cursor, 7).await.unwrap();
        pages += 1;
        assert!(page.entries.len() <= 7);
        if page.entries.is_empty() && page.next_cursor != 0 {
            empty += 1;
        }
        seen.extend(
            page.entries
                .iter()
                .map(|o| String::from_utf8_lossy(&o.port).into_owned()),
        );
        if page.next_cursor == 0 {
            break;
        }
        cursor = page.next_cursor;
        assert!(pages < 10_000, "the listing ends");
    }
    seen.sort();
    assert_eq!(seen, want);
    assert!(pages >= 5, "{pages} pages");
    assert_eq!(empty, 0, "two matches within every 256 ports");
    // One match in 3,000: the first pages end at the evaluation bound with nothing
    // in them and a cursor that says more remain.
    let (mut seen, mut cursor, mut pages, mut empty) = (Vec::new(), 0, 0, 0);
    loop {
        let page = c
            .list_where("svc/", r#"name == "svc/02999""#, cursor, 100)
            .await
            .unwrap();
        pages += 1;
        if page.entries.is_empty() && page.next_cursor != 0 {
            empty += 1;
        }
        seen.extend(page.entries.into_iter().map(|o| o.port));
        if page.next_cursor == 0 {
            break;
        }
        cursor = page.next_cursor;
        assert!(pages < 100, "the listing ends");
    }
    assert_eq!(seen, [&b"svc/02999"[..]]);
    assert!(pages >= 3 && empty >= 2, "{pages} pages, {empty} empty");
    // list_all_where pages for itself.
    let mut all: Vec<String> = c
        .list_all_where("svc/", filter)
        .await
        .unwrap()
        .iter()
        .map(|o| String::from_utf8_lossy(&o.port).into_owned())
        .collect();
    all.sort();
    assert_eq!(all, want);

    // Through the binary: every field of the record can be used.
    let (code, out, err) = run(ctl(
        &srv.addr,
        &[
            "list",
            "svc/",
            "--where",
            r#"text.contains("leader") && node == "where-test" && token > 0 && size(session) == 16"#,
        ],
    ))
    .await;
    assert_eq!(code, 0, "{err}");
    let mut listed: Vec<String> = out
        .lines()
        .map(|l| l.split('\t').next().unwrap().to_string())
        .collect();
    listed.sort();
    assert_eq!(listed, want);
    // --limit still applies; a filter that selects nothing lists nothing, exit 0.
    let (code, out, _) = run(ctl(
        &srv.addr,
        &[
            "list",
            "",
            "--where",
            r#"name.endsWith("0")"#,
            "--limit",
            "3",
        ],
    ))
    .await;
    assert_eq!((code, out.lines().count()), (0, 3), "{out}");
    let (code, out, _) = run(ctl(&srv.addr, &["list", "", "--where", "false"])).await;
    assert_eq!((code, out.as_str()), (0, ""));
    // JSON values are records; values that are not JSON are null.
    owner
        .register("cfg/a", r#"{"zone":"eu","weight":3}"#)
        .await
        .unwrap();
    owner
        .register("cfg/b", r#"{"zone":"us","weight":9}"#)
        .await
        .unwrap();
    owner.register("cfg/c", "10.0.0.1:80").await.unwrap();
    let (code, out, err) = run(ctl(
        &srv.addr,
        &[
            "list",
            "cfg/",
            "--json",
            "--where",
            r#"json != null && json.zone == "eu" && json.weight > 1"#,
        ],
    ))
    .await;
    assert_eq!(code, 0, "{err}");
    let rows: Vec<serde_json::Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(rows.len(), 1, "{out}");
    assert_eq!(rows[0]["port"], "cfg/a");
    assert_eq!(stat(&c, "filter_errors_total").await, 0);
}

#[tokio::test]
async fn watch_where_sees_exactly_the_matching_events() {
    let srv = serve().await;
    let a = client(&srv.addr).await;
    let b = client(&srv.addr).await;
    let mut events = a.events();
    a.watch_prefix_where("svc/", r#"event == "claimed" && text.startsWith("up")"#)
        .await
        .unwrap();
    assert_eq!(stat(&a, "watch_filters").await, 1);

    // The binary too, from its own session: two events, then it exits.
    let mut watcher = ctl(
        &srv.addr,
        &[
            "watch",
            "svc/",
            "--prefix",
            "--count",
            "2",
            "--where",
            r#"event == "released" && name.endsWith("/b")"#,
        ],
    )
    .stdout(Stdio::piped())
    .stderr(Stdio::piped())
    .spawn()
    .unwrap();
    let mut lines = BufReader::new(watcher.stdout.take().unwrap()).lines();
    let first = within("watch starts", lines.next_line())
        .await
        .unwrap()
        .unwrap();
    assert!(first.starts_with("watching prefix svc/ where"), "{first}");

    b.register("svc/a", "down").await.unwrap(); // claimed, not up: no
    b.register("svc/b", "up-1").await.unwrap(); // a: yes
    b.register("other/c", "up").await.unwrap(); // outside the prefix: no
    b.unregister("svc/b").await.unwrap(); // released: a no; ctl yes
    b.unregister("svc/a").await.unwrap(); // released: no
    b.register("svc/b", "up-2").await.unwrap(); // a: yes
    b.unregister("svc/b").await.unwrap(); // ctl: yes (its second)
    b.register("svc/z", "up-end").await.unwrap(); // a: yes (the sentinel)

    let mut got = Vec::new();
    while got.len() < 3 {
        match within("events", events.recv()).await.unwrap() {
            Event::Claimed { port, .. } => {
                got.push(format!("claimed {}", String::from_utf8_lossy(&port)))
            }
            Event::Released { port, .. } => {
                got.push(format!("released {}", String::from_utf8_lossy(&port)))
            }
            _ => {}
        }
    }
    assert_eq!(got, ["claimed svc/b", "claimed svc/b", "claimed svc/z"]);

    let status = within("ctl watch exits", watcher.wait()).await.unwrap();
    assert!(status.success());
    let mut rest = Vec::new();
    while let Some(l) = lines.next_line().await.unwrap() {
        rest.push(l);
    }
    assert_eq!(rest.len(), 2, "{rest:?}");
    assert!(
        rest.iter().all(|l| l.starts_with("svc/b: released")),
        "{rest:?}"
    );

    // Watching again without a filter drops it: everything under the prefix comes.
    a.watch_prefix("svc/").await.unwrap();
    assert_eq!(stat(&a, "watch_filters").await, 0);
    b.register("svc/q", "down").await.unwrap();
    loop {
        if let Event::Claimed { port, .. } = within("event", events.recv()).await.unwrap() {
            assert_eq!(&port[..], b"svc/q");
            break;
        }
    }
}

#[tokio::test]
async fn an_invalid_filter_is_a_typed_error_with_its_position() {
    let srv = serve().await;
    let c = client(&srv.addr).await;
    c.register("svc/a", "x").await.unwrap();
    let session = c.session().id;
    let e = c.list_where("svc/", "name == ", 0, 10).await.unwrap_err();
    assert_eq!(e.code(), Some(ErrorCode::QueryInvalid), "{e}");
    let msg = e.to_string();
    assert!(msg.contains("1:9") && msg.contains('^'), "{msg}");
    let e = c
        .watch_prefix_where("svc/", r#"nmae == "a""#)
        .await
        .unwrap_err();
    assert_eq!(e.code(), Some(ErrorCode::QueryInvalid), "{e}");
    assert!(
        e.to_string().contains("1:1") && e.to_string().contains("nmae"),
        "{e}"
    );
    // A filter that is not a predicate, and `event` outside a watch.
    for bad in ["token + 1", r#"event == "claimed""#] {
        let e = c.list_where("", bad, 0, 10).await.unwrap_err();
        assert_eq!(e.code(), Some(ErrorCode::QueryInvalid), "{bad}: {e}");
    }
    // The connection, and the session, go on: the same session still owns its port.
    c.ping().await.unwrap();
    let page = c.list_where("svc/", r#"text == "x""#, 0, 10).await.unwrap();
    assert_eq!(page.entries.len(), 1);
    assert_eq!(c.session().id, session);
    assert_eq!(page.entries[0].session, session);
    assert_eq!(stat(&c, "watch_filters").await, 0);

    // The binary: exit code 2, the position and the caret on standard error.
    let (code, out, err) = run(ctl(&srv.addr, &["list", "svc/", "--where", "name == $"])).await;
    assert_eq!((code, out.as_str()), (2, ""), "{err}");
    assert!(err.contains("1:9") && err.contains("^"), "{err}");
    let (code, _, err) = run(ctl(
        &srv.addr,
        &["watch", "svc/", "--prefix", "--where", "((("],
    ))
    .await;
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("does not compile"), "{err}");
    // --where needs --prefix on watch.
    let (code, _, err) = run(ctl(&srv.addr, &["watch", "svc/a", "--where", "true"])).await;
    assert_eq!(code, 2, "{err}");
}

#[tokio::test]
async fn a_hostile_filter_is_refused_or_stopped_while_others_are_served() {
    let srv = serve().await;
    let owner = client(&srv.addr).await;
    // Values at the protocol's largest, 4 KiB.
    register_many(&owner, "big/", 2_000, |i| format!("{i:0>4096}")).await;
    let c = client(&srv.addr).await;

    // A huge comprehension over literals is costed when compiled: refused.
    let lit: String = format!(
        "[{}]",
        (0..100)
            .map(|i| i.to_string())
            .collect::<Vec<_>>()
            .join(",")
    );
    let huge = format!("{lit}.all(a, {lit}.all(b, {lit}.all(c, a + b + c >= 0)))");
    let e = c.list_where("big/", &huge, 0, 100).await.unwrap_err();
    assert_eq!(e.code(), Some(ErrorCode::QueryInvalid));
    assert!(e.to_string().contains("steps"), "{e}");
    let e = c.watch_prefix_where("big/", &huge).await.unwrap_err();
    assert_eq!(e.code(), Some(ErrorCode::QueryInvalid));
    // A filter longer than the protocol allows is refused by the client before sending.
    assert!(c.list_where("", &"x".repeat(5_000), 0, 1).await.is_err());

    // A comprehension over the bound 4 KiB values runs out of steps on every port:
    // each is skipped and counted, the listing ends, and meanwhile another client is
    // served promptly.
    let costly = r#"[text, text, text, text, text, text, text, text].exists(a,
        [text, text, text, text, text, text, text, text].exists(b,
        [text, text, text, text, text, text, text, text].exists(c,
        (a + b + c).contains("needle"))))"#;
    let other = client(&srv.addr).await;
    let pinger = tokio::spawn(async move {
        let mut worst = Duration::ZERO;
        let mut n = 0u32;
        let stop = Instant::now() + Duration::from_millis(1_500);
        while Instant::now() < stop {
            let t = Instant::now();
            other.register("p/x", "v").await.unwrap();
            other.unregister("p/x").await.unwrap();
            worst = worst.max(t.elapsed());
            n += 1;
        }
        (n, worst)
    });
    let started = Instant::now();
    let all = within("hostile listing", c.list_all_where("big/", costly))
        .await
        .unwrap();
    let took = started.elapsed();
    assert!(all.is_empty());
    assert_eq!(stat(&c, "filter_errors_total").await, 2_000);
    let (n, worst) = pinger.await.unwrap();
    eprintln!("hostile listing: {took:?}; other client: {n} round trips, worst {worst:?}");
    assert!(n > 10, "the other client was served ({n} round trips)");
    // One filtered LIST holds the server for at most list_filter_entries_max evaluations
    // of FILTER_STEPS_MAX steps; even an unoptimised build stays well under this.
    assert!(
        worst < Duration::from_secs(1),
        "worst round trip {worst:?} (listing took {took:?})"
    );
    c.ping().await.unwrap();
}

/// A filtered watch survives a restart of the server on its data directory: the
/// client re-watches with its filter on the new master, which delivers only what the
/// filter selects.
#[tokio::test]
async fn a_filtered_watch_is_sent_again_with_its_filter_after_a_restart() {
    let dir = std::env::temp_dir().join(format!("portswitch-where-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let args = |listen: &str| {
        vec![
            "--listen".to_string(),
            listen.to_string(),
            "--no-http".into(),
            "--data-dir".into(),
            dir.to_str().unwrap().to_string(),
            "--recovery-window-ms".into(),
            "1000".into(),
        ]
    };
    let first_args = args("127.0.0.1:0");
    let first_args: Vec<&str> = first_args.iter().map(String::as_str).collect();
    let (mut first, addr) = common::serve_process(&first_args, &[]).await;
    let a = client(&addr).await;
    let mut events = a.events();
    a.watch_prefix_where("svc/", r#"text == "up""#)
        .await
        .unwrap();
    a.register("mine", "").await.unwrap();

    first.kill().await.unwrap();
    let again = args(&addr);
    let again: Vec<&str> = again.iter().map(String::as_str).collect();
    let (_second, addr2) = common::serve_process(&again, &[]).await;
    assert_eq!(addr, addr2);
    common::resynced(&mut events).await;
    assert_eq!(
        stat(&a, "watch_filters").await,
        1,
        "re-watched with its filter"
    );
    // Ports nobody reclaimed are unknown until the window closes.
    common::eventually_async("the recovery window closes", || async {
        stat(&a, "recovering").await == 0
    })
    .await;

    let b = client(&addr).await;
    b.register("svc/down", "down").await.unwrap();
    b.register("svc/up", "up").await.unwrap();
    loop {
        match within("event", events.recv()).await.unwrap() {
            Event::Claimed { port, .. } => {
                assert_eq!(&port[..], b"svc/up");
                break;
            }
            Event::Released { port, .. } => panic!("released {port:?}"),
            _ => {}
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// A filter reads values, which watch events never carry: a role with watch but not
/// list on the prefix is refused a filtered watch (with it, it could learn a value a
/// bit at a time from which events get through); with list as well it is allowed.
#[tokio::test]
async fn a_filtered_watch_needs_list_as_well_as_watch() {
    use portswitch_server::auth::AuthConfig;
    use portswitch_server::ServerConfig;
    use serde_json::json;

    let dir = std::env::temp_dir().join(format!(
        "portswitch-where-acl-{}-{}",
        std::process::id(),
        fastrand::u64(..)
    ));
    std::fs::create_dir_all(&dir).unwrap();
    let mut cfg = ServerConfig::ephemeral();
    cfg.auth = AuthConfig {
        data_dir: Some(dir.clone()),
        iterations: portswitch_auth::scram::ITERATIONS_MIN,
        ..AuthConfig::default()
    };
    let srv = common::server_with(cfg).await;
    let login = |user: &str, pw: &str| {
        let mut o = common::opts(&srv);
        o.credentials = Some((user.into(), pw.into()));
        Client::connect(o)
    };
    let (root_pw, pw) = ("Granite-Falcon-2026!", "Tulip-Orbit-93");
    let anon = common::client(&srv).await;
    anon.admin(
        &json!({"op": "user_add", "user": "root", "password": root_pw, "roles": ["root"]})
            .to_string(),
    )
    .await
    .unwrap();
    drop(anon);
    let root = login("root", root_pw).await.unwrap();
    for (role, perms) in [("watcher", "watch"), ("reader", "watch,list")] {
        root.admin(
            &json!({"op": "role_add", "role": role, "grants": [
                {"prefix": "svc/", "perms": perms},
            ]})
            .to_string(),
        )
        .await
        .unwrap();
        root.admin(
            &json!({"op": "user_add", "user": role, "password": pw, "roles": [role]}).to_string(),
        )
        .await
        .unwrap();
    }
    root.register("svc/secret", "s3cret").await.unwrap();

    let watcher = login("watcher", pw).await.unwrap();
    let e = watcher
        .watch_prefix_where("svc/", r#"text.startsWith("s")"#)
        .await
        .unwrap_err();
    assert_eq!(e.code(), Some(ErrorCode::PermissionDenied), "{e}");
    // A watch without a filter is still the watcher's to make.
    watcher.watch_prefix("svc/").await.unwrap();
    let reader = login("reader", pw).await.unwrap();
    reader
        .watch_prefix_where("svc/", r#"text.startsWith("s")"#)
        .await
        .unwrap();
    assert_eq!(stat(&root, "watch_filters").await, 1);
    let _ = std::fs::remove_dir_all(&dir);
}
