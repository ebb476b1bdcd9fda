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

/// The only thing written through Raft: a node taking over as master. Nothing per
/// client request ever is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Command {
    /// `node` becomes master. The epoch becomes `max(epoch + 1, epoch_floor)`
    /// (`epoch_floor` is the proposer's Unix second, so epochs keep rising even if
    /// the whole group loses its disks). `keys` become the group's session-secret keys
    /// if it has none yet. `lease_ms_max` and `master_lease_ms` are this master's
    /// settings, which its successor must wait out.
    Master {
        node: u64,
        epoch_floor: u64,
        keys: [u64; 2],
        lease_ms_max: u32,
        master_lease_ms: u64,
    },
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
}

/// The answer to an applied [`Command::Master`].
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Grant {
    pub epoch: u64,
    pub secret_keys: [u64; 2],
    /// If the group had a master before: the longest client lease and master lease
    /// any master used. The new master waits out that master lease and keeps a
    /// recovery window as long as that client lease.
    pub previous: Option<(u32, u64)>,
}

/// Responses of the state machine (blank and membership entries answer `None`).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Response(pub Option<Grant>);

impl GroupFacts {
    /// Applies a command: the pure, deterministic part of the state machine.
    pub fn apply(&mut self, cmd: &Command) -> Grant {
        match *cmd {
            Command::Master {
                node,
                epoch_floor,
                keys,
                lease_ms_max,
                master_lease_ms,
            } => {
                let previous = self
                    .master
                    .map(|_| (self.lease_ms_max, self.master_lease_ms));
                self.epoch = (self.epoch + 1).max(epoch_floor);
                self.master = Some(node);
                let keys = *self.secret_keys.get_or_insert(keys);
                self.lease_ms_max = self.lease_ms_max.max(lease_ms_max);
                self.master_lease_ms = self.master_lease_ms.max(master_lease_ms);
                Grant {
                    epoch: self.epoch,
                    secret_keys: keys,
                    previous,
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
        }
    }

    #[test]
    fn epochs_rise_keys_stay_and_the_successor_learns_what_to_wait_out() {
        let mut f = GroupFacts::default();
        let g1 = f.apply(&master(1, 1_000, [1, 2]));
        assert_eq!(
            (g1.epoch, g1.secret_keys, g1.previous),
            (1_000, [1, 2], None)
        );
        // A later master in the same second still gets a higher epoch, and the same keys.
        let g2 = f.apply(&master(2, 1_000, [3, 4]));
        assert_eq!((g2.epoch, g2.secret_keys), (1_001, [1, 2]));
        assert_eq!(g2.previous, Some((60_000, 500)));
        // A clock behind the group's epoch cannot lower it.
        assert_eq!(f.apply(&master(3, 5, [0, 0])).epoch, 1_002);
        // A master configured with shorter leases does not shorten what its successor
        // must cover: an earlier master's views may still run.
        let short = Command::Master {
            node: 4,
            epoch_floor: 0,
            keys: [0, 0],
            lease_ms_max: 1_000,
            master_lease_ms: 100,
        };
        f.apply(&short);
        assert_eq!(f.apply(&master(5, 0, [0, 0])).previous, Some((60_000, 500)));
        // A group that lost its disks restarts from the wall clock, above the old epochs.
        let mut fresh = GroupFacts::default();
        assert_eq!(fresh.apply(&master(1, 2_000, [5, 6])).epoch, 2_000);
    }
}
