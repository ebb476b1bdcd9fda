//! What the cluster crate's public operations can fail with.

/// An error of a group operation or of group settings.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClusterError {
    /// This member's id is missing from the member list it was given.
    #[error("member {0} is not in the member list")]
    NotInMemberList(u64),
    /// A group (not joining one) of other than 1, 3 or 5 members.
    #[error("a group has 1, 3 or 5 members, not {0}")]
    GroupSize(usize),
    /// Heartbeat and election timeouts that cannot work together.
    #[error("need 0 < 2 × heartbeat_ms < election_timeout_ms_min < election_timeout_ms_max (got {heartbeat_ms}, {min}, {max})")]
    Timeouts {
        heartbeat_ms: u64,
        min: u64,
        max: u64,
    },
    /// A master lease too short to be renewed between heartbeats.
    #[error("master_lease_ms ({lease_ms}) must be more than 2 × heartbeat_ms ({heartbeat_ms})")]
    MasterLeaseTooShort { lease_ms: u64, heartbeat_ms: u64 },
    /// Adding a member the group already has.
    #[error("member {0} is already in the group")]
    AlreadyMember(u64),
    /// Adding a member to a group of the most members it may have.
    #[error("a group has at most {0} members")]
    TooManyMembers(usize),
    /// Removing a member the group does not have.
    #[error("member {0} is not in the group")]
    NotAMember(u64),
    /// A group operation asked of a server that is not a member of a group.
    #[error("this server is not a member of a group")]
    NoGroup,
    /// Removing the last member.
    #[error("the last member cannot be removed")]
    LastMember,
    /// This member is not the group's leader; `leader` is the one it knows of.
    #[error("this member is not the group's leader{}", .leader.map(|l| format!(" (member {l} is)")).unwrap_or_default())]
    NotLeader { leader: Option<u64> },
    /// A write for a master whose epoch has ended.
    #[error("epoch {0} is over")]
    EpochOver(u64),
    /// The users changed since they were read (another admin change got in first).
    #[error("the users and roles changed meanwhile; try again")]
    UsersChanged,
    /// No quorum answered within the master lease.
    #[error("no quorum within the master lease ({0} ms)")]
    NoQuorum(u64),
    /// Raft refused or failed otherwise (storage, shutdown, a membership change in
    /// progress).
    #[error("raft: {0}")]
    Raft(String),
}

impl ClusterError {
    /// Maps an openraft error, picking out "not the leader".
    pub(crate) fn from_raft<E>(e: openraft::error::RaftError<u64, E>) -> ClusterError
    where
        E: std::error::Error
            + openraft::TryAsRef<openraft::error::ForwardToLeader<u64, crate::Member>>,
    {
        if let Some(f) = e.forward_to_leader() {
            return ClusterError::NotLeader {
                leader: f.leader_id,
            };
        }
        ClusterError::Raft(e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{ClusterConfig, Member};

    fn member(i: u64) -> (u64, Member) {
        (
            i,
            Member {
                peer_addr: format!("127.0.0.1:{}", 9000 + i),
                client_addr: format!("127.0.0.1:{}", 8000 + i),
            },
        )
    }

    #[test]
    fn settings_that_cannot_work_are_typed_errors() {
        let dir = std::env::temp_dir();
        let three: std::collections::BTreeMap<_, _> = (1..=3).map(member).collect();
        let ok = ClusterConfig::new(1, three.clone(), dir.clone(), 10_000);
        assert!(ok.validate().is_ok());
        let stranger = ClusterConfig::new(4, three.clone(), dir.clone(), 10_000);
        assert!(matches!(
            stranger.validate(),
            Err(ClusterError::NotInMemberList(4))
        ));
        let two: std::collections::BTreeMap<_, _> = (1..=2).map(member).collect();
        let even = ClusterConfig::new(1, two, dir.clone(), 10_000);
        assert!(matches!(even.validate(), Err(ClusterError::GroupSize(2))));
        let mut slow = ok.clone();
        slow.heartbeat_ms = slow.election_timeout_ms.0;
        assert!(matches!(
            slow.validate(),
            Err(ClusterError::Timeouts { .. })
        ));
        let mut short = ok;
        short.lease.lease_ms = 2 * short.heartbeat_ms;
        let e = short.validate().unwrap_err();
        assert!(matches!(e, ClusterError::MasterLeaseTooShort { .. }));
        assert!(e.to_string().contains("master_lease_ms"), "{e}");
        assert_eq!(
            ClusterError::NotLeader { leader: Some(2) }.to_string(),
            "this member is not the group's leader (member 2 is)"
        );
    }
}
