//! Tests' view of a group of three `portswitch serve` members as child processes
//! (the harness's [`portswitch_harness::Group`]): one group at a time, leases up to
//! 12 s by default, and every failure a panic with its reason.

use std::time::Duration;

use portswitch_client::{Client, RegisterOutcome};
#[allow(unused_imports)]
pub use portswitch_harness::free_port;
use portswitch_harness::group::Signal;
use portswitch_harness::GroupSpec;

const BIN: &str = env!("CARGO_BIN_EXE_portswitch");

/// Client leases in these tests; the recovery window after a failover is this plus
/// the drift margin.
pub const LEASE_MS_MAX: u32 = 12_000;

/// One group at a time: each runs three debug-build servers, and several at once on
/// a loaded two-core machine starve their leases and elections, which then measure
/// the machine rather than the failover.
pub static ONE_GROUP: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

pub struct Group {
    _turn: tokio::sync::MutexGuard<'static, ()>,
    pub inner: portswitch_harness::Group,
}

impl std::ops::Deref for Group {
    type Target = portswitch_harness::Group;
    fn deref(&self) -> &Self::Target {
        &self.inner
    }
}

impl Group {
    pub async fn start(tag: &str) -> Group {
        Group::start_with(tag, &[]).await
    }

    pub async fn start_with(tag: &str, extra: &[&str]) -> Group {
        Group::start_staggered(tag, extra, Duration::ZERO).await
    }

    /// Starts the members `pause` apart.
    pub async fn start_staggered(tag: &str, extra: &[&str], pause: Duration) -> Group {
        Group::start_full(tag, extra, pause, &[]).await
    }

    /// Starts the members `pause` apart; each `(i, addr)` of `via` has member `i`'s
    /// peers reach it at `addr` (a relay's), while it accepts them at a port of its own.
    pub async fn start_full(
        tag: &str,
        extra: &[&str],
        pause: Duration,
        via: &[(usize, String)],
    ) -> Group {
        let turn = ONE_GROUP.lock().await;
        let mut spec = GroupSpec::new(BIN, tag).flags(&["--http-listen", "127.0.0.1:0"]);
        if !extra.contains(&"--lease-ms-max") {
            spec = spec.flags(&[format!("--lease-ms-max={LEASE_MS_MAX}")]);
        }
        spec = spec.flags(extra);
        spec.pause = pause;
        spec.via = via.to_vec();
        let inner = portswitch_harness::Group::start(spec)
            .await
            .expect("the group starts");
        Group { _turn: turn, inner }
    }

    /// Starts member `i` again (after a kill or an exit).
    pub async fn respawn(&mut self, i: usize) {
        self.inner.spawn(i).await.expect("member starts again");
    }

    /// SIGKILLs member `i` and reaps it.
    pub async fn kill(&mut self, i: usize) {
        self.inner.kill(i).await.expect("kill");
    }

    /// Waits for member `i` to exit by itself.
    pub async fn wait(&mut self, i: usize) -> std::process::ExitStatus {
        self.inner.wait(i).await.expect("member was running")
    }

    pub fn pid(&self, i: usize) -> String {
        self.inner.pid(i).expect("member running").to_string()
    }

    /// Sends member `i` a signal named as `kill` takes it: "-KILL", "-STOP"…
    pub fn signal(&self, i: usize, sig: &str) {
        let sig: Signal = format!("SIG{}", sig.trim_start_matches('-'))
            .parse()
            .expect("a signal name");
        self.inner.signal(i, sig).expect("signal");
    }

    /// The member serving as master (bounded wait), optionally other than `not`.
    pub async fn master(&self, not: Option<usize>) -> usize {
        self.inner.master(not).await.expect("a master")
    }

    pub async fn client(&self) -> Client {
        self.client_with_lease(LEASE_MS_MAX).await
    }

    pub async fn client_with_lease(&self, lease_ms: u32) -> Client {
        self.inner
            .client(Duration::from_millis(lease_ms as u64))
            .await
            .expect("a client finds the master")
    }

    /// One of member `i`'s STATS.
    pub async fn stat(&self, i: usize, name: &str) -> u64 {
        self.inner.stat(i, name).await.expect(name)
    }
}

pub async fn own(c: &Client, port: &str) -> u64 {
    match c.register(port, "").await.unwrap() {
        RegisterOutcome::Owned { token } => token,
        other => panic!("{port}: {other:?}"),
    }
}
