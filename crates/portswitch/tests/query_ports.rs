//! `portswitch query run` over the port switch's ports (configuration data) mixed with
//! a JSON Lines file (business data) in one query, against a real `portswitch serve` on
//! loopback: the answer is right, and the simple conditions on the port record reach
//! the server as its LIST_WHERE filter.

mod common;

use common::within;
use portswitch_client::{Client, ClientOptions};
use tokio::process::Command;

const BIN: &str = env!("CARGO_BIN_EXE_portswitch");

async fn query(addr: &str, args: &[&str]) -> (i32, String, String) {
    let out = within(
        "query run",
        Command::new(BIN)
            .args(["query", "run", "--addr", addr, "--explain"])
            .args(args)
            .env_remove("PORTSWITCH_USER")
            .env_remove("PORTSWITCH_CA")
            .kill_on_drop(true)
            .output(),
    )
    .await
    .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test]
async fn ports_and_a_file_in_one_query() {
    let (_child, addr) =
        common::serve_process(&["--listen", "127.0.0.1:0", "--no-http"], &[]).await;
    let mut o = ClientOptions::new(addr.clone());
    o.node_name = "cache-node".into();
    let owner = within("connect", Client::connect(o)).await.unwrap();
    for i in 0..8 {
        let zone = if i % 2 == 0 { "eu" } else { "us" };
        owner
            .register(
                format!("svc/cache/{i}"),
                format!(r#"{{"zone":"{zone}","load":{i}}}"#),
            )
            .await
            .unwrap();
    }
    owner.register("svc/db/leader", "not json").await.unwrap();

    // Configuration data alone, with the name condition sent to the server.
    let (code, out, err) = query(
        &addr,
        &[r#"SELECT p.name AS name, p.json.zone AS zone, p.node AS node FROM ports("svc/") p WHERE p.name >= "svc/cache/5" && p.json != null ORDER BY name"#],
    )
    .await;
    assert_eq!(code, 0, "{err}");
    assert!(
        err.contains(r#"server filter: name >= "svc/cache/5""#),
        "{err}"
    );
    let names: Vec<serde_json::Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(names.len(), 3, "{out}");
    assert_eq!(names[0]["name"], "svc/cache/5");
    assert_eq!(names[0]["zone"], "us");
    assert_eq!(names[0]["node"], "cache-node");

    // Business data joined with configuration data: each order with the caches of
    // its zone whose load is below its limit.
    let dir = tempfile::tempdir().unwrap();
    let orders = dir.path().join("orders.ndjson");
    std::fs::write(
        &orders,
        "{\"id\":1,\"zone\":\"eu\",\"max_load\":3}\n{\"id\":2,\"zone\":\"us\",\"max_load\":6}\n{\"id\":3,\"zone\":\"ap\",\"max_load\":9}\n",
    )
    .unwrap();
    let (code, out, err) = query(
        &addr,
        &[
            "--source",
            &format!("orders={}", orders.display()),
            r#"SELECT o.id AS id, count(*) AS caches, max(p.json.load) AS top FROM orders o JOIN ports("svc/cache/") p ON p.json.zone == o.zone WHERE p.json.load < o.max_load GROUP BY o.id ORDER BY id"#,
        ],
    )
    .await;
    assert_eq!(code, 0, "{err}");
    assert_eq!(
        out, "{\"caches\":2,\"id\":1,\"top\":2}\n{\"caches\":3,\"id\":2,\"top\":5}\n",
        "{err}"
    );

    // Without --addr, ports(…) is a source error naming what is missing.
    let out = within(
        "query run",
        Command::new(BIN)
            .args(["query", "run", r#"SELECT p.name FROM ports("svc/") p"#])
            .env_remove("PORTSWITCH_ADDR")
            .output(),
    )
    .await
    .unwrap();
    assert_eq!(out.status.code(), Some(4));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--addr"));
}
