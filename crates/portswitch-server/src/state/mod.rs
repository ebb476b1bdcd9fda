//! The state shared by every task: the core and the output queues of all connections,
//! behind one lock (`Shared`, `State`), plus the glue that turns core effects into
//! queued bytes. By concern: `feed` (frames from a connection to the core),
//! `conn_out` (each connection's output and channel ids), `edge` (authentication and
//! ADMIN at the edge), `role` (master or not), `ceiling` (the lease ceiling and
//! recovery windows), `admin` (ADMIN changes that go through the group), `stats`.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use bytes::BytesMut;
use portswitch_core::{ConnId, Core, Outbox, Stats};
use portswitch_proto::frame::{frame_len, messages, FrameError};
use portswitch_proto::{msg::encode_stat, msg::op, ErrorCode, Event, FrameBuf, Reply, Request};
use tokio::sync::Notify;

use crate::auth::{AdminOutcome, Auth};
use crate::config::{ServerConfig, STALL_MS_THRESHOLD};
use portswitch_core::Perm;
use portswitch_proto::MemberRole;

mod admin;
mod ceiling;
mod conn_out;
mod edge;
mod feed;
mod role;
mod stats;

use admin::*;
use ceiling::*;
use conn_out::*;
use edge::*;
use role::*;
use stats::*;

pub(crate) use ceiling::{Ceiling, CeilingKeeper};
pub(crate) use role::Member;
pub use stats::StatsSnapshot;

/// Whether this server may serve clients now.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Serving {
    /// Standalone, or the master of its group.
    Yes,
    /// A member that is not master: the master's client address if it knows it,
    /// and — while taking over — when it expects to serve.
    No {
        master: Option<Vec<u8>>,
        serve_at: Option<Instant>,
    },
}

pub(crate) struct State {
    pub(crate) core: Core,
    serving: Serving,
    /// HELLO admission: tokens left and when they were last refilled (real ms).
    hello_tokens: f64,
    hello_refilled_ms: u64,
    role: MemberRole,
    auth: Auth,
    /// Permission denials of the current batch, for the audit log.
    denials: Vec<(String, Perm, Vec<u8>)>,
    /// Real milliseconds since start when the lock was last taken.
    last_real_ms: u64,
    /// Milliseconds of server stalls not charged to leases (see `STALL_MS_THRESHOLD`).
    stalled_ms: u64,
    conns: slab::Slab<ConnOut>,
    dirty: Vec<usize>,
    conn_seq: u32,
    counters: Counters,
    scratch: BytesMut,
    /// Since when (core ms) no session has held a lease as long as the ceiling, and
    /// the longest lease held since: the ceiling comes down to it after a whole
    /// ceiling of that.
    ceiling_quiet_since_ms: u64,
    ceiling_quiet_peak_ms: u32,
}

/// What reading a buffer of bytes from a connection came to.
pub(crate) enum Fed {
    /// Consumed this many bytes; wants more.
    Consumed(usize),
    /// The connection must close (GOAWAY already queued).
    Close,
    /// A request is answered later (a membership change, once Raft has committed
    /// it). Replies come in request order, so nothing after it is read until then:
    /// `consumed` bytes of whole frames were handled, and the first `skip` messages
    /// of the next frame; `answered` resolves once the reply is queued, and `feed`
    /// is then called again with that `skip`.
    Suspended {
        consumed: usize,
        skip: usize,
        answered: tokio::sync::oneshot::Receiver<()>,
    },
}

pub(crate) struct Shared {
    state: Mutex<State>,
    cfg: ServerConfig,
    start: Instant,
    epoch: AtomicU64,
    member: Option<Member>,
    /// The lease ceiling of a master that records one (a group's, or a server's
    /// alone on a data directory; its `Keeper::Dir` also holds the directory's lock
    /// while the server runs).
    ceiling: Option<CeilingKeeper>,
    /// This `Shared` itself, for tasks that answer a request later (membership
    /// changes go through Raft, which takes a while).
    me: std::sync::OnceLock<std::sync::Weak<Shared>>,
}

impl Shared {
    pub(crate) fn new(
        cfg: ServerConfig,
        epoch: u64,
        group: Option<crate::group::GroupState>,
        member: Option<Member>,
    ) -> std::io::Result<Shared> {
        let mut seed = random_seed();
        if let Some(g) = &group {
            // Session secrets under the group's keys: a later master can verify them.
            seed[1] = g.secret_keys[0];
            seed[2] = g.secret_keys[1];
        }
        let mut core = Core::new(cfg.core.clone(), epoch, seed);
        if let Some(w) = group.as_ref().and_then(|g| g.recovery_window_ms) {
            core.start_recovery(0, w);
        }
        let mut fake_salt_key = [0u8; 32];
        fill_random(&mut fake_salt_key);
        let auth = Auth::load(cfg.auth.clone(), fake_salt_key)?;
        let ceiling = match (group.map(Arc::new), &member) {
            (Some(g), _) => Some(CeilingKeeper {
                ceiling: Arc::new(Ceiling {
                    epoch: AtomicU64::new(g.epoch),
                    lease_ms: g.lease_ceiling_ms.into(),
                    wanted_ms: 0.into(),
                    // Recorded once the window closes: the next restart owes less.
                    settle_epoch: AtomicU64::new(if g.recovery_window_ms.is_some() {
                        g.epoch
                    } else {
                        0
                    }),
                    lowering: false.into(),
                }),
                keeper: Keeper::Dir(g),
            }),
            // Set when it becomes master.
            (None, Some(m)) => Some(CeilingKeeper {
                ceiling: Arc::default(),
                keeper: Keeper::Raft(m.node.clone()),
            }),
            (None, None) => None,
        };
        Ok(Shared {
            state: Mutex::new(State {
                core,
                hello_tokens: cfg.hello_rate_max as f64,
                hello_refilled_ms: 0,
                serving: match member {
                    None => Serving::Yes,
                    Some(_) => Serving::No {
                        master: None,
                        serve_at: None,
                    },
                },
                role: match member {
                    None => MemberRole::Standalone,
                    Some(_) => MemberRole::Follower,
                },
                auth,
                denials: Vec::new(),
                last_real_ms: 0,
                stalled_ms: 0,
                conns: slab::Slab::new(),
                dirty: Vec::new(),
                conn_seq: 0,
                counters: Counters::default(),
                scratch: BytesMut::new(),
                ceiling_quiet_since_ms: 0,
                ceiling_quiet_peak_ms: 0,
            }),
            cfg,
            start: Instant::now(),
            epoch: AtomicU64::new(epoch),
            member,
            ceiling,
            me: std::sync::OnceLock::new(),
        })
    }

    pub(crate) fn config(&self) -> &ServerConfig {
        &self.cfg
    }

    pub(crate) fn epoch(&self) -> u64 {
        self.epoch.load(Ordering::Relaxed)
    }

    /// Lets tasks spawned by this `Shared` reach it later.
    pub(crate) fn set_self(self: &Arc<Self>) {
        let _ = self.me.set(Arc::downgrade(self));
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock means a broken invariant in the core; the
        // process is configured to abort on panic, so poisoning is not recoverable.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The core's clock: milliseconds since start, less server stalls. Read under the
    /// lock, so the core sees time rise.
    fn now_ms(&self, st: &mut State) -> u64 {
        let real = self.start.elapsed().as_millis() as u64;
        let gap = real.saturating_sub(st.last_real_ms);
        if gap > STALL_MS_THRESHOLD {
            st.stalled_ms += gap - STALL_MS_THRESHOLD;
            st.counters.stalls_total += 1;
            // Short gaps happen when the machine is saturated; long ones deserve a look.
            if gap >= 250 {
                tracing::warn!(
                    gap_ms = gap,
                    "server stalled; the stall is not charged to leases"
                );
            } else {
                tracing::debug!(
                    gap_ms = gap,
                    "server stalled; the stall is not charged to leases"
                );
            }
        }
        st.last_real_ms = st.last_real_ms.max(real);
        real - st.stalled_ms
    }

    /// Registers a new connection. `None` when the server is at `connections_max`.
    pub(crate) fn open(
        &self,
        addr: std::net::IpAddr,
        security: crate::tls::ConnSecurity,
    ) -> Option<(ConnId, Arc<Notify>)> {
        let mut st = self.lock();
        if st.conns.len() >= self.cfg.connections_max {
            st.counters.connections_rejected_total += 1;
            return None;
        }
        st.conn_seq = st.conn_seq.wrapping_add(1);
        let seq = st.conn_seq & ((1 << (64 - CONN_KEY_BITS - CONN_CHANNEL_BITS)) - 1);
        let entry = st.conns.vacant_entry();
        if entry.key() >= 1 << CONN_KEY_BITS {
            // Unreachable with a validated connections_max; refuse rather than alias.
            st.counters.connections_rejected_total += 1;
            return None;
        }
        let id = (seq as u64) << (CONN_KEY_BITS + CONN_CHANNEL_BITS) | entry.key() as u64;
        let notify = Arc::new(Notify::new());
        entry.insert(ConnOut {
            id,
            addr,
            security,
            out: FrameBuf::new(
                self.cfg.core.frame_bytes_max as usize,
                self.cfg.core.commands_per_frame_max as usize,
            ),
            notify: notify.clone(),
            closing: false,
            dirty: false,
            in_channel: 0,
            out_channel: 0,
            channels: Vec::new(),
            logged_in: false,
        });
        st.counters.connections_total += 1;
        Some((id, notify))
    }

    /// Whether a HELLO has succeeded on `conn` (see `ConnOut::logged_in`).
    pub(crate) fn logged_in(&self, conn: ConnId) -> bool {
        self.lock()
            .conns
            .get(conn_key(conn))
            .is_some_and(|c| c.id == conn && c.logged_in)
    }

    /// `conn` has had no session for `login_timeout_ms`: GOAWAY and close.
    pub(crate) fn login_timed_out(&self, conn: ConnId) {
        let mut st = self.lock();
        let Some(c) = st.conns.get_mut(conn_key(conn)).filter(|c| c.id == conn) else {
            return;
        };
        if c.logged_in || c.closing {
            return;
        }
        let msg = format!(
            "no session within login_timeout_ms ({} ms) of connecting",
            self.cfg.login_timeout_ms
        );
        c.replace_with_goaway(&Event::GoAway {
            code: ErrorCode::LoginTimeout,
            message: msg.as_bytes(),
        });
        c.closing = true;
        c.notify.notify_one();
        st.counters.login_timeouts_total += 1;
    }

    pub(crate) fn connections(&self) -> usize {
        self.lock().conns.len()
    }

    /// The connection is gone (EOF, error, or its writer finished closing it).
    pub(crate) fn closed(&self, conn: ConnId) {
        let mut st = self.lock();
        let st = &mut *st;
        let now = self.now_ms(st);
        let key = conn_key(conn);
        let ids = match st.conns.get(key).filter(|c| c.id == conn) {
            Some(c) => c.ids(),
            None => vec![conn],
        };
        let mut out = Out {
            conns: &mut st.conns,
            dirty: &mut st.dirty,
            denials: &mut st.denials,
        };
        for id in ids {
            st.auth.forget(id);
            st.core.handle_disconnect(id, now, &mut out);
        }
        if st.conns.get(key).is_some_and(|c| c.id == conn) {
            let c = st.conns.remove(key);
            // Wake the writer so it sees the slot is gone and exits.
            c.notify.notify_one();
        }
        self.flush(st, now);
    }

    /// Moves queued output towards the writers: enforces the send-queue bound and
    /// wakes each writer with something new.
    fn flush(&self, st: &mut State, now: u64) {
        let max = self.cfg.send_queue_bytes_max;
        while !st.dirty.is_empty() {
            let dirty = std::mem::take(&mut st.dirty);
            let mut slow = Vec::new();
            for key in dirty {
                let Some(c) = st.conns.get_mut(key) else {
                    continue;
                };
                c.dirty = false;
                if c.out.len() > max && !c.closing {
                    c.replace_with_goaway(&Event::GoAway {
                        code: ErrorCode::SlowConsumer,
                        message: b"send queue passed send_queue_bytes_max; read faster",
                    });
                    c.closing = true;
                    slow.extend(c.ids());
                }
                c.notify.notify_one();
            }
            for conn in slow {
                st.counters.slow_consumer_total += 1;
                let mut out = Out {
                    conns: &mut st.conns,
                    dirty: &mut st.dirty,
                    denials: &mut st.denials,
                };
                st.core.handle_disconnect(conn, now, &mut out);
            }
        }
    }

    /// Takes what is queued for `conn` into `buf`. Returns whether the connection
    /// should close after writing it, or `None` if the connection is gone.
    pub(crate) fn take_output(&self, conn: ConnId, buf: &mut BytesMut) -> Option<bool> {
        let mut st = self.lock();
        let key = conn_key(conn);
        let c = st.conns.get_mut(key).filter(|c| c.id == conn)?;
        c.out.take_into(buf);
        Some(c.closing)
    }

    pub(crate) fn tick(&self) {
        let mut st = self.lock();
        let st = &mut *st;
        let now = self.now_ms(st);
        if !self.may_serve(st) {
            return;
        }
        if st.core.next_deadline().is_some_and(|d| d <= now) {
            let mut out = Out {
                conns: &mut st.conns,
                dirty: &mut st.dirty,
                denials: &mut st.denials,
            };
            st.core.handle_timeout(now, &mut out);
            self.flush(st, now);
        }
        if let Some(k) = &self.ceiling {
            let c = &k.ceiling;
            if st.core.recovery_left_ms().is_none() && c.settle_epoch.load(Ordering::Acquire) != 0 {
                let epoch = c.settle_epoch.swap(0, Ordering::AcqRel);
                let keeper = k.keeper.clone();
                tokio::spawn(async move {
                    match keeper.settle(epoch).await {
                        Ok(()) => tracing::info!(epoch, "recovery window closed and recorded"),
                        Err(e) => tracing::warn!(error = %e, "could not record the closed window"),
                    }
                });
            }
            self.maybe_lower_ceiling(st, k, now);
        }
    }

    pub(crate) fn shutdown(&self) {
        self.lock()
            .goaway_all(ErrorCode::ShuttingDown, b"server shutting down");
    }
}

/// A random number of milliseconds below `max`, to spread clients told to retry.
fn fastrand_ms(max: u64) -> u64 {
    let mut b = [0u8; 8];
    fill_random(&mut b);
    u64::from_le_bytes(b) % max.max(1)
}

/// Fills `buf` from the OS's randomness (nonces, salts, keys).
fn fill_random(buf: &mut [u8]) {
    // Without the OS's randomness no secret can be made; stopping is the only safe choice.
    getrandom::getrandom(buf).expect("the OS random number generator is available");
}

/// Seeds for the port hash and session secrets, from the OS.
fn random_seed() -> [u64; 3] {
    let mut bytes = [0u8; 24];
    let ok = std::fs::File::open("/dev/urandom")
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut bytes))
        .is_ok();
    if !ok {
        // No /dev/urandom: fall back to std's randomly keyed hasher.
        use std::hash::{BuildHasher, RandomState};
        for (i, chunk) in bytes.chunks_mut(8).enumerate() {
            chunk.copy_from_slice(&RandomState::new().hash_one(i).to_le_bytes());
        }
    }
    let word = |i: usize| u64::from_le_bytes(bytes[i * 8..i * 8 + 8].try_into().expect("8 bytes"));
    [word(0), word(1), word(2)]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn conn(id: ConnId) -> ConnOut {
        ConnOut {
            id,
            addr: std::net::IpAddr::from([127, 0, 0, 1]),
            security: Default::default(),
            out: FrameBuf::new(1 << 16, 64),
            notify: Arc::new(Notify::new()),
            closing: false,
            dirty: false,
            in_channel: 0,
            out_channel: 0,
            channels: Vec::new(),
            logged_in: false,
        }
    }

    #[test]
    fn channel_ids_keep_the_slot_and_generation() {
        let base: ConnId = (0xAB_CDEF << (CONN_KEY_BITS + CONN_CHANNEL_BITS)) | 0x12_3456;
        for ch in [0u16, 1, 77, u16::MAX] {
            let id = on_channel(base, ch);
            assert_eq!(conn_key(id), 0x12_3456);
            assert_eq!(conn_base(id), base);
            assert_eq!(conn_channel(id), ch);
        }
        assert_eq!(
            on_channel(base, 0),
            base,
            "channel 0 is the connection itself"
        );
    }

    #[test]
    fn a_connection_reports_every_channel_it_used() {
        let base: ConnId = (5 << (CONN_KEY_BITS + CONN_CHANNEL_BITS)) | 9;
        let mut c = conn(base);
        assert_eq!(c.ids(), vec![base]);
        for ch in [3u16, 64, 3, 4095, 65535] {
            c.mark(ch);
        }
        let chans: Vec<u16> = c.ids().iter().map(|&id| conn_channel(id)).collect();
        assert_eq!(chans, vec![0, 3, 64, 4095, 65535]);
    }

    #[test]
    fn output_switches_channel_only_when_it_changes() {
        let mut c = conn(1);
        c.select(0);
        assert!(c.out.is_empty(), "a plain connection never sees a switch");
        c.select(2);
        c.select(2);
        let one = c.out.len();
        assert_eq!(one, 4 + 9, "one frame holding one switch");
        // After dropped output the client's channel is unknown: switch again, even to 0.
        c.mark(2);
        c.replace_with_goaway(&Event::Resync);
        let mut b = BytesMut::new();
        c.out.take_into(&mut b);
        let msgs: Vec<_> = messages(&b[4..], usize::MAX)
            .map(|m| m.unwrap().opcode)
            .collect();
        assert_eq!(msgs, vec![op::CHANNEL, portswitch_proto::msg::op::RESYNC]);
    }
}
