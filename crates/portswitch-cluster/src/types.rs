//! The Raft type configuration and what the group's replicated state machine holds.

use std::fmt;
use std::io::Cursor;

use serde::{Deserialize, Serialize};

/// A member of the group: where its peers reach it, and where clients do.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Member {
    pub peer_addr: String,
    pub client_addr: String,
}

impl fmt::Display for Member {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} (peers {})", self.client_addr, self.peer_addr)
    }
}

/// What is written through Raft: a node taking over as master, and the rare change
/// of how long a lease that master may grant. Nothing per client request ever is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Command {
    /// `node` becomes master. The epoch becomes `max(epoch + 1, epoch_floor)`
    /// (`epoch_floor` is the proposer's Unix second, so epochs keep rising even if
    /// the whole group loses its disks). `keys` become the group's session-secret keys
    /// if it has none yet. `lease_ms_max` and `master_lease_ms` are this master's
    /// settings, which its successor must wait out.
    ///
    /// `lease_ms_start` is the longest client lease the new master may grant before it
    /// raises its ceiling ([`Command::Raise`]); absent (entries written before
    /// ceilings existed), the ceiling is the group's `lease_ms_max`.
    Master {
        node: u64,
        epoch_floor: u64,
        keys: [u64; 2],
        lease_ms_max: u32,
        master_lease_ms: u64,
        #[serde(default)]
        lease_ms_start: Option<u32>,
    },
    /// The master of `epoch` may grant client leases up to `lease_ms` (it asks before
    /// it grants the first one that long). Ignored unless `epoch` is current.
    Raise { epoch: u64, lease_ms: u32 },
    /// The master of `epoch` closed its recovery window: no client lease of an earlier
    /// master can still be in force. Ignored unless `epoch` is current.
    Settle { epoch: u64 },
    /// The master of `epoch` lowers its ceiling from `from` to `lease_ms`: for a whole
    /// ceiling no session of it has held a longer lease, so no lease view it granted
    /// can outlast `lease_ms` from now on, and it grants no longer one without raising
    /// first. Ignored unless `epoch` is current and the ceiling is still `from` (a
    /// raise that got in first wins); never raises.
    Lower {
        epoch: u64,
        from: u32,
        lease_ms: u32,
    },
    /// The group's users and roles become `store` (the server's user-store document,
    /// opaque here), if they are still at version `expect`: a compare-and-set, so two
    /// admin changes racing through different masters cannot lose one another.
    Users { expect: u64, store: String },
}

/// What the group knows, replicated and durable on every member.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct GroupFacts {
    pub epoch: u64,
    pub master: Option<u64>,
    /// SipHash keys of session secrets, shared by every master of the group.
    pub secret_keys: Option<[u64; 2]>,
    /// The longest client lease and the longest master lease of **any** master so
    /// far. They never go down: a master that dies inside its own recovery window (or
    /// before it waited out its predecessor) leaves an obligation to its successor
    /// that only the largest setting ever used is sure to cover when members are
    /// configured differently. Lowering them takes effect once the group is
    /// re-formed.
    pub lease_ms_max: u32,
    pub master_lease_ms: u64,
    /// The longest client lease the current master may grant (`None`, from before
    /// ceilings existed: `lease_ms_max`). Its successor's recovery window covers it.
    #[serde(default)]
    pub lease_ceiling_ms: Option<u32>,
    /// The longest client lease an earlier master may have granted that the current
    /// master has not yet outlived (its recovery window is open): its successor's
    /// window covers this too. `None`, from before ceilings existed: `lease_ms_max`.
    #[serde(default)]
    pub lease_owed_ms: Option<u32>,
    /// The group's users and roles (the server's user-store document), replicated so
    /// that every master logs in the same users; `None` until the first admin change.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub users: Option<String>,
    /// How many times `users` was written.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub users_version: u64,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// The answer to an applied [`Command::Master`].
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Grant {
    pub epoch: u64,
    pub secret_keys: [u64; 2],
    /// If the group had a master before: the longest client lease an earlier master
    /// may have granted that is not known to have run out, and the longest master
    /// lease any master used. The new master waits out that master lease and keeps a
    /// recovery window as long as that client lease.
    pub previous: Option<(u32, u64)>,
    /// The longest client lease the new master may grant before it raises it.
    pub lease_ceiling_ms: u32,
}

/// Responses of the state machine (blank and membership entries answer the default).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Response {
    /// For [`Command::Master`].
    pub grant: Option<Grant>,
    /// For [`Command::Raise`]: the master's ceiling afterwards, if its epoch is current.
    pub ceiling: Option<u32>,
    /// For [`Command::Users`]: the version written, if `expect` matched.
    #[serde(default)]
    pub users_version: Option<u64>,
}

impl GroupFacts {
    /// The longest client lease the current master may grant.
    pub fn ceiling(&self) -> u32 {
        self.lease_ceiling_ms.unwrap_or(self.lease_ms_max)
    }

    fn owed(&self) -> u32 {
        self.lease_owed_ms.unwrap_or(self.lease_ms_max)
    }

    /// Applies a command: the pure, deterministic part of the state machine.
    pub fn apply(&mut self, cmd: &Command) -> Response {
        match *cmd {
            Command::Users { expect, ref store } => {
                let written = (expect == self.users_version).then(|| {
                    self.users = Some(store.clone());
                    self.users_version += 1;
                    self.users_version
                });
                Response {
                    users_version: written,
                    ..Response::default()
                }
            }
            Command::Master {
                node,
                epoch_floor,
                keys,
                lease_ms_max,
                master_lease_ms,
                lease_ms_start,
            } => {
                // What the successor must cover: every lease the outgoing master may
                // have granted, and whatever it had not yet outlived itself.
                let owed = self.owed().max(self.ceiling());
                let previous = self.master.map(|_| (owed, self.master_lease_ms));
                // The successor starts where the leases in use are: no higher than its
                // predecessor's ceiling (the sessions it adopts come back with those
                // leases), raising it if a client asks for more.
                let previous_ceiling = self.master.map(|_| self.ceiling());
                self.epoch = (self.epoch + 1).max(epoch_floor);
                self.master = Some(node);
                let keys = *self.secret_keys.get_or_insert(keys);
                self.lease_ms_max = self.lease_ms_max.max(lease_ms_max);
                self.master_lease_ms = self.master_lease_ms.max(master_lease_ms);
                self.lease_owed_ms = Some(previous.map_or(0, |(o, _)| o));
                self.lease_ceiling_ms = lease_ms_start.map(|s| {
                    let start = s.min(lease_ms_max);
                    previous_ceiling.map_or(start, |c| start.min(c.max(1)))
                });
                Response {
                    grant: Some(Grant {
                        epoch: self.epoch,
                        secret_keys: keys,
                        previous,
                        lease_ceiling_ms: self.ceiling(),
                    }),
                    ..Response::default()
                }
            }
            Command::Raise { epoch, lease_ms } => {
                let ceiling = (epoch == self.epoch).then(|| {
                    let c = self.ceiling().max(lease_ms.min(self.lease_ms_max));
                    self.lease_ceiling_ms = Some(c);
                    c
                });
                Response {
                    ceiling,
                    ..Response::default()
                }
            }
            Command::Settle { epoch } => {
                if epoch == self.epoch {
                    self.lease_owed_ms = Some(0);
                }
                Response::default()
            }
            Command::Lower {
                epoch,
                from,
                lease_ms,
            } => {
                let ceiling = (epoch == self.epoch && self.ceiling() == from).then(|| {
                    let c = from.min(lease_ms.max(1));
                    self.lease_ceiling_ms = Some(c);
                    c
                });
                Response {
                    ceiling,
                    ..Response::default()
                }
            }
        }
    }
}

openraft::declare_raft_types!(
    /// Raft types of a portswitch group.
    pub TypeConfig:
        D = Command,
        R = Response,
        NodeId = u64,
        Node = Member,
        Entry = openraft::Entry<TypeConfig>,
        SnapshotData = Cursor<Vec<u8>>,
        AsyncRuntime = openraft::TokioRuntime,
);

pub type Raft = openraft::Raft<TypeConfig>;

#[cfg(test)]
mod tests {
    use super::*;

    fn master(node: u64, floor: u64, keys: [u64; 2]) -> Command {
        Command::Master {
            node,
            epoch_floor: floor,
            keys,
            lease_ms_max: 60_000,
            master_lease_ms: 500,
            lease_ms_start: None,
        }
    }

    fn grant(f: &mut GroupFacts, cmd: Command) -> Grant {
        f.apply(&cmd)
            .grant
            .expect("a master command answers a grant")
    }

    fn start(node: u64, lease_ms_start: u32) -> Command {
        Command::Master {
            node,
            epoch_floor: 0,
            keys: [1, 2],
            lease_ms_max: 300_000,
            master_lease_ms: 300,
            lease_ms_start: Some(lease_ms_start),
        }
    }

    #[test]
    fn users_are_written_only_over_the_version_they_were_read_at() {
        let mut f = GroupFacts::default();
        let put = |f: &mut GroupFacts, expect, s: &str| {
            f.apply(&Command::Users {
                expect,
                store: s.into(),
            })
            .users_version
        };
        assert_eq!(put(&mut f, 0, "a"), Some(1));
        // A change prepared against version 0 lost the race: refused, nothing lost.
        assert_eq!(put(&mut f, 0, "b"), None);
        assert_eq!((f.users.as_deref(), f.users_version), (Some("a"), 1));
        assert_eq!(put(&mut f, 1, "c"), Some(2));
        // Masters come and go; the users stay.
        grant(&mut f, master(2, 0, [1, 2]));
        assert_eq!((f.users.as_deref(), f.users_version), (Some("c"), 2));
    }

    #[test]
    fn the_window_covers_the_longest_lease_granted_until_a_master_outlives_it() {
        let mut f = GroupFacts::default();
        let g1 = grant(&mut f, start(1, 10_000));
        assert_eq!((g1.previous, g1.lease_ceiling_ms), (None, 10_000));
        // Master 1 raises its ceiling once a client asks for a minute.
        let raised = f.apply(&Command::Raise {
            epoch: g1.epoch,
            lease_ms: 60_000,
        });
        assert_eq!(raised.ceiling, Some(60_000));
        // Lower asks never lower it; asks above lease_ms_max are capped.
        let e = g1.epoch;
        assert_eq!(
            f.apply(&Command::Raise {
                epoch: e,
                lease_ms: 5_000
            })
            .ceiling,
            Some(60_000)
        );
        assert_eq!(
            f.apply(&Command::Raise {
                epoch: e,
                lease_ms: u32::MAX
            })
            .ceiling,
            Some(300_000)
        );
        let mut f = GroupFacts::default();
        let g1 = grant(&mut f, start(1, 10_000));
        f.apply(&Command::Raise {
            epoch: g1.epoch,
            lease_ms: 60_000,
        });
        // Its successor covers the minute, starts at 10 s itself, and a raise of the
        // old epoch (a deposed master) changes nothing.
        let g2 = grant(&mut f, start(2, 10_000));
        assert_eq!(
            (g2.previous, g2.lease_ceiling_ms),
            (Some((60_000, 300)), 10_000)
        );
        assert_eq!(
            f.apply(&Command::Raise {
                epoch: g1.epoch,
                lease_ms: 120_000
            })
            .ceiling,
            None
        );
        // Master 2 dies inside its window: master 3 still owes master 1's minute.
        let g3 = grant(&mut f, start(3, 10_000));
        assert_eq!(g3.previous, Some((60_000, 300)));
        // Master 3 outlives its window and says so (a stale settle is ignored).
        f.apply(&Command::Settle { epoch: g2.epoch });
        assert_eq!(f.lease_owed_ms, Some(60_000));
        f.apply(&Command::Settle { epoch: g3.epoch });
        let g4 = grant(&mut f, start(4, 10_000));
        assert_eq!(
            g4.previous,
            Some((10_000, 300)),
            "only master 3's own 10 s is owed"
        );
    }

    #[test]
    fn a_lowered_ceiling_is_what_the_successor_owes_and_where_it_starts() {
        let mut f = GroupFacts::default();
        let g1 = grant(&mut f, start(1, 10_000));
        // Every client uses 2 s leases: master 1 lowers its ceiling.
        let lowered = f.apply(&Command::Lower {
            epoch: g1.epoch,
            from: 10_000,
            lease_ms: 2_000,
        });
        assert_eq!(lowered.ceiling, Some(2_000));
        // A lower that lost the race with a raise changes nothing.
        f.apply(&Command::Raise {
            epoch: g1.epoch,
            lease_ms: 5_000,
        });
        let stale = f.apply(&Command::Lower {
            epoch: g1.epoch,
            from: 2_000,
            lease_ms: 2_000,
        });
        assert_eq!((stale.ceiling, f.ceiling()), (None, 5_000));
        f.apply(&Command::Lower {
            epoch: g1.epoch,
            from: 5_000,
            lease_ms: 2_000,
        });
        // The successor owes 2 s and starts granting up to 2 s itself.
        let g2 = grant(&mut f, start(2, 10_000));
        assert_eq!(g2.previous, Some((2_000, 300)));
        assert_eq!(g2.lease_ceiling_ms, 2_000);
        // It dies inside its window: its successor owes master 1's 2 s and its own 2 s.
        let g3 = grant(&mut f, start(3, 10_000));
        assert_eq!(g3.previous, Some((2_000, 300)));
        // A lower of a deposed epoch is ignored; lowering never raises.
        assert_eq!(
            f.apply(&Command::Lower {
                epoch: g2.epoch,
                from: 2_000,
                lease_ms: 1_000
            })
            .ceiling,
            None
        );
        assert_eq!(
            f.apply(&Command::Lower {
                epoch: g3.epoch,
                from: 2_000,
                lease_ms: 9_000
            })
            .ceiling,
            Some(2_000)
        );
    }

    #[test]
    fn facts_from_before_ceilings_owe_the_longest_configured_lease() {
        let old = r#"{"epoch":7,"master":1,"secret_keys":[1,2],"lease_ms_max":300000,"master_lease_ms":300}"#;
        let mut f: GroupFacts = serde_json::from_str(old).unwrap();
        assert_eq!(
            grant(&mut f, start(2, 10_000)).previous,
            Some((300_000, 300))
        );
        let old_cmd = r#"{"Master":{"node":1,"epoch_floor":0,"keys":[1,2],"lease_ms_max":300000,"master_lease_ms":300}}"#;
        let cmd: Command = serde_json::from_str(old_cmd).unwrap();
        assert_eq!(grant(&mut f, cmd).lease_ceiling_ms, 300_000);
    }

    #[test]
    fn epochs_rise_keys_stay_and_the_successor_learns_what_to_wait_out() {
        let mut f = GroupFacts::default();
        let g1 = grant(&mut f, master(1, 1_000, [1, 2]));
        assert_eq!(
            (g1.epoch, g1.secret_keys, g1.previous),
            (1_000, [1, 2], None)
        );
        // A later master in the same second still gets a higher epoch, and the same keys.
        let g2 = grant(&mut f, master(2, 1_000, [3, 4]));
        assert_eq!((g2.epoch, g2.secret_keys), (1_001, [1, 2]));
        assert_eq!(g2.previous, Some((60_000, 500)));
        // A clock behind the group's epoch cannot lower it.
        assert_eq!(grant(&mut f, master(3, 5, [0, 0])).epoch, 1_002);
        // A master configured with shorter leases does not shorten what its successor
        // must cover: an earlier master's views may still run.
        let short = Command::Master {
            node: 4,
            epoch_floor: 0,
            keys: [0, 0],
            lease_ms_max: 1_000,
            master_lease_ms: 100,
            lease_ms_start: None,
        };
        f.apply(&short);
        assert_eq!(
            grant(&mut f, master(5, 0, [0, 0])).previous,
            Some((60_000, 500))
        );
        // A group that lost its disks restarts from the wall clock, above the old epochs.
        let mut fresh = GroupFacts::default();
        assert_eq!(grant(&mut fresh, master(1, 2_000, [5, 6])).epoch, 2_000);
    }
}
