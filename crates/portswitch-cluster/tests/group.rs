//! Three members on loopback elect one master; when it stops, another takes over in a
//! higher epoch with the same keys and a recovery window.

use std::collections::BTreeMap;
use std::time::Duration;

use portswitch_cluster::{ClusterConfig, ClusterNode, Member, Role};
use tokio::net::TcpListener;

async fn group(tag: &str) -> (Vec<ClusterNode>, std::path::PathBuf) {
    let dir = std::env::temp_dir().join(format!("ps-cluster-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let mut listeners = Vec::new();
    let mut members = BTreeMap::new();
    for id in 1..=3u64 {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        members.insert(
            id,
            Member {
                peer_addr: l.local_addr().unwrap().to_string(),
                client_addr: format!("client-{id}"),
            },
        );
        listeners.push(l);
    }
    let mut nodes = Vec::new();
    for (i, l) in listeners.into_iter().enumerate() {
        let id = i as u64 + 1;
        let cfg = ClusterConfig::new(id, members.clone(), dir.join(id.to_string()), 10_000);
        nodes.push(ClusterNode::start(cfg, l).await.unwrap());
    }
    (nodes, dir)
}

/// Waits (bounded) until exactly one member is master; returns its index and role.
async fn one_master(nodes: &[ClusterNode]) -> (usize, portswitch_cluster::node::MasterRole) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let masters: Vec<_> = nodes
            .iter()
            .enumerate()
            .filter_map(|(i, n)| match &*n.role().borrow() {
                Role::Master(m) => Some((i, m.clone())),
                _ => None,
            })
            .collect();
        assert!(masters.len() <= 1, "two masters at once: {masters:?}");
        if let [(i, m)] = &masters[..] {
            return (*i, m.clone());
        }
        assert!(tokio::time::Instant::now() < deadline, "no master elected");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_elects_a_master_and_fails_over_to_a_higher_epoch() {
    let (mut nodes, dir) = group("failover").await;
    let (i, first) = one_master(&nodes).await;
    assert!(nodes[i].lease().valid());
    assert_eq!(first.recovery_window_ms, None, "nothing to recover from");
    // Followers point clients at the master.
    let master_addr = format!("client-{}", i + 1);
    for (j, n) in nodes.iter().enumerate() {
        if j != i {
            let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
            loop {
                if let Role::Follower { master: Some(m) } = &*n.role().borrow() {
                    assert_eq!(m.client_addr, master_addr);
                    break;
                }
                assert!(tokio::time::Instant::now() < deadline, "no hint");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }
    let status = nodes[i].status();
    assert_eq!(status.members.len(), 3);
    assert_eq!(status.facts.epoch, first.epoch);

    // The master stops; another takes over.
    let old = nodes.remove(i);
    let old_lease = old.lease();
    old.shutdown().await;
    assert!(!old_lease.valid(), "a stopped master serves no more");
    let (_, second) = one_master(&nodes).await;
    assert!(second.epoch > first.epoch);
    assert_eq!(
        second.secret_keys, first.secret_keys,
        "the group's keys stay"
    );
    // The previous master granted leases of up to 10 s: the window covers them.
    assert!(second.recovery_window_ms.unwrap() >= 10_000);
    for n in nodes {
        n.shutdown().await;
    }
    std::fs::remove_dir_all(&dir).unwrap();
}
