//! `portswitch mq consume --selector` against a broker process: a group gets only the
//! messages its selector matches, keeps its selector across kill -9 of the broker,
//! and bad or mismatched selectors are refused with typed errors.

use std::process::Stdio;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

const BIN: &str = env!("CARGO_BIN_EXE_portswitch");

/// `portswitch mq serve` on `dir`, once it listens.
async fn broker(dir: &std::path::Path) -> (Child, String) {
    let mut child = Command::new(BIN)
        .args(["mq", "serve", "--listen", "127.0.0.1:0", "--no-http"])
        .arg("--data-dir")
        .arg(dir)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn");
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let line = tokio::time::timeout(Duration::from_secs(40), lines.next_line())
        .await
        .expect("it starts")
        .unwrap()
        .expect("a line");
    let addr = line
        .strip_prefix("listening on ")
        .expect("listening line")
        .trim()
        .to_string();
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    (child, addr)
}

/// `portswitch mq ARGS --addr ADDR` with `stdin`: (success, stdout, stderr).
fn mq(addr: &str, args: &[&str], stdin: &str) -> (bool, String, String) {
    use std::io::Write;
    let mut child = std::process::Command::new(BIN)
        .arg("mq")
        .args(args)
        .args(["--addr", addr])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(stdin.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    (
        out.status.success(),
        String::from_utf8(out.stdout).unwrap(),
        String::from_utf8(out.stderr).unwrap(),
    )
}

fn ok(addr: &str, args: &[&str], stdin: &str) -> String {
    let (success, out, err) = mq(addr, args, stdin);
    assert!(success, "mq {args:?}: {err}");
    out
}

fn sorted(out: &str) -> Vec<String> {
    let mut v: Vec<String> = out.lines().map(str::to_string).collect();
    v.sort();
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consume_with_a_selector_gets_only_its_messages_across_kill_9() {
    let dir = tempfile::tempdir().unwrap();
    let (mut child, addr) = broker(dir.path()).await;
    ok(&addr, &["create", "orders", "--partitions", "2"], "");
    ok(&addr, &["produce", "orders", "--key", "eu"], "e1\ne2\ne3\n");
    ok(&addr, &["produce", "orders", "--key", "us"], "u1\nu2\n");
    ok(
        &addr,
        &["produce", "orders", "--key", "eu"],
        "{\"amount\": 500}\n{\"amount\": 5}\n",
    );
    let eu = r#"key_str == "eu" && !has(json.amount)"#;
    // A group with a selector; another without one sees everything.
    let out = ok(
        &addr,
        &[
            "consume",
            "orders",
            "--group",
            "eu",
            "--selector",
            eu,
            "--count",
            "2",
        ],
        "",
    );
    let first = sorted(&out);
    assert_eq!(first.len(), 2, "{out}");
    let big = r#"json.amount > 100"#;
    let out = ok(
        &addr,
        &[
            "consume",
            "orders",
            "--group",
            "big",
            "--selector",
            big,
            "--count",
            "1",
        ],
        "",
    );
    assert_eq!(out, "{\"amount\": 500}\n");
    let out = ok(
        &addr,
        &["consume", "orders", "--group", "all", "--count", "7"],
        "",
    );
    assert_eq!(out.lines().count(), 7, "{out}");
    // The broker dies without warning and starts again on its data.
    child.kill().await.unwrap();
    let _ = child.wait().await;
    let (_child, addr) = broker(dir.path()).await;
    // Joining the group without its selector, or with another, is refused by name.
    for args in [
        &["consume", "orders", "--group", "eu", "--count", "1"][..],
        &[
            "consume",
            "orders",
            "--group",
            "eu",
            "--selector",
            "true",
            "--count",
            "1",
        ][..],
    ] {
        let (success, _, err) = mq(&addr, args, "");
        assert!(!success);
        assert!(err.contains("selector_mismatch"), "{err}");
        assert!(err.contains("key_str"), "{err}");
    }
    ok(&addr, &["produce", "orders", "--key", "eu"], "e4\n");
    ok(&addr, &["produce", "orders", "--key", "us"], "u3\n");
    let out = ok(
        &addr,
        &[
            "consume",
            "orders",
            "--group",
            "eu",
            "--selector",
            eu,
            "--count",
            "2",
        ],
        "",
    );
    let mut all = first.clone();
    all.extend(sorted(&out));
    all.sort();
    assert_eq!(all, ["e1", "e2", "e3", "e4"], "{out}");
    // Nothing else comes to the group.
    let out = ok(
        &addr,
        &[
            "consume",
            "orders",
            "--group",
            "eu",
            "--selector",
            eu,
            "--count",
            "1",
            "--idle-timeout-ms",
            "500",
        ],
        "",
    );
    assert_eq!(out, "");
    let stat = ok(&addr, &["stat", "orders", "--json"], "");
    let v: serde_json::Value = serde_json::from_str(&stat).unwrap();
    let depth = |g: &str| {
        (0..2)
            .map(|p| v[format!("p{p}.group.{g}.depth")].as_u64().unwrap_or(0))
            .sum::<u64>()
    };
    assert_eq!(depth("eu"), 0, "{v}");
    // A selector that does not compile: the compiler's position and a caret.
    let (success, _, err) = mq(
        &addr,
        &[
            "consume",
            "orders",
            "--group",
            "x",
            "--selector",
            "json.amount >",
            "--count",
            "1",
        ],
        "",
    );
    assert!(!success);
    assert!(err.contains("bad_selector") && err.contains("1:"), "{err}");
    assert!(err.contains('^'), "{err}");
}
