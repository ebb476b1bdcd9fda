//! A member's role, as the `role` entry of STATS (and `/metrics`) reports it.

/// What a server is doing in its group. Travels as the number of the STATS entry
/// `role`; numbers this crate does not know read as [`MemberRole::Unknown`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum MemberRole {
    /// A server without a group: it is its own master.
    #[default]
    Standalone,
    /// A member that is not master: it answers `not_master` with the master's address.
    Follower,
    /// Elected, waiting out the old master's lease before it serves.
    TakingOver,
    /// The group's master, serving.
    Master,
    /// A number from a newer server.
    Unknown(u64),
}

impl MemberRole {
    /// The name of the STATS entry that carries it.
    pub const STAT: &'static str = "role";

    pub fn from_u64(n: u64) -> MemberRole {
        match n {
            0 => MemberRole::Standalone,
            1 => MemberRole::Follower,
            2 => MemberRole::TakingOver,
            3 => MemberRole::Master,
            n => MemberRole::Unknown(n),
        }
    }

    pub fn to_u64(self) -> u64 {
        match self {
            MemberRole::Standalone => 0,
            MemberRole::Follower => 1,
            MemberRole::TakingOver => 2,
            MemberRole::Master => 3,
            MemberRole::Unknown(n) => n,
        }
    }

    /// The role in a list of STATS entries, if it has one.
    pub fn from_stats<S: AsRef<str>>(stats: &[(S, u64)]) -> Option<MemberRole> {
        stats
            .iter()
            .find(|(k, _)| k.as_ref() == Self::STAT)
            .map(|(_, v)| MemberRole::from_u64(*v))
    }

    /// Whether this server serves clients (a master, or a server on its own).
    pub fn serves(self) -> bool {
        matches!(self, MemberRole::Master | MemberRole::Standalone)
    }

    /// A stable lowercase name for output.
    pub fn name(self) -> &'static str {
        match self {
            MemberRole::Standalone => "standalone",
            MemberRole::Follower => "follower",
            MemberRole::TakingOver => "taking-over",
            MemberRole::Master => "master",
            MemberRole::Unknown(_) => "unknown",
        }
    }
}

impl std::fmt::Display for MemberRole {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roles_round_trip_and_are_found_in_stats() {
        for n in 0..8 {
            assert_eq!(MemberRole::from_u64(n).to_u64(), n);
        }
        let stats = vec![("epoch".to_string(), 9), ("role".to_string(), 3)];
        assert_eq!(MemberRole::from_stats(&stats), Some(MemberRole::Master));
        assert_eq!(MemberRole::from_stats::<&str>(&[]), None);
        assert!(MemberRole::Standalone.serves() && !MemberRole::TakingOver.serves());
    }
}
