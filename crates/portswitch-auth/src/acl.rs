//! Role-based access control on port-name prefixes.
//!
//! A role grants a set of permissions on one or more prefixes; a user has roles; an
//! operation on a port is allowed if any of the user's roles grants its permission on
//! a prefix of the port's name. The built-in `root` role grants everything.

/// What an operation needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Perm {
    Register = 1,
    Query = 2,
    Watch = 4,
    Send = 8,
    Broadcast = 16,
    List = 32,
    /// Managing users and roles, and server-wide operations.
    Admin = 64,
}

impl Perm {
    pub const ALL: [Perm; 7] = [
        Perm::Register,
        Perm::Query,
        Perm::Watch,
        Perm::Send,
        Perm::Broadcast,
        Perm::List,
        Perm::Admin,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Perm::Register => "register",
            Perm::Query => "query",
            Perm::Watch => "watch",
            Perm::Send => "send",
            Perm::Broadcast => "broadcast",
            Perm::List => "list",
            Perm::Admin => "admin",
        }
    }

    pub fn parse(s: &str) -> Option<Perm> {
        Perm::ALL.into_iter().find(|p| p.name() == s)
    }
}

/// A set of permissions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Hash)]
pub struct Perms(u8);

impl Perms {
    pub const NONE: Perms = Perms(0);
    pub const ALL: Perms = Perms(127);

    pub fn with(self, p: Perm) -> Perms {
        Perms(self.0 | p as u8)
    }
    pub fn has(self, p: Perm) -> bool {
        self.0 & p as u8 != 0
    }
    pub fn iter(self) -> impl Iterator<Item = Perm> {
        Perm::ALL.into_iter().filter(move |p| self.has(*p))
    }
    /// Parses `register,query,...` or `all`.
    pub fn parse(s: &str) -> Result<Perms, String> {
        if s == "all" {
            return Ok(Perms::ALL);
        }
        s.split(',').map(str::trim).try_fold(Perms::NONE, |acc, w| {
            Perm::parse(w)
                .map(|p| acc.with(p))
                .ok_or_else(|| format!("unknown permission {w:?}"))
        })
    }
}

/// One grant of a role.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grant {
    pub prefix: Vec<u8>,
    pub perms: Perms,
}

/// A named set of grants.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Role {
    pub name: String,
    pub grants: Vec<Grant>,
}

/// The built-in role that may do anything.
pub const ROOT_ROLE: &str = "root";

impl Role {
    pub fn root() -> Role {
        Role {
            name: ROOT_ROLE.into(),
            grants: vec![Grant {
                prefix: Vec::new(),
                perms: Perms::ALL,
            }],
        }
    }

    pub fn allows(&self, perm: Perm, port: &[u8]) -> bool {
        self.grants
            .iter()
            .any(|g| g.perms.has(perm) && port.starts_with(&g.prefix))
    }
}

/// The effective grants of one authenticated session (its roles' grants, flattened
/// once at login so each check is a short scan).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Access {
    grants: Vec<Grant>,
}

impl Access {
    pub fn of<'a>(roles: impl IntoIterator<Item = &'a Role>) -> Access {
        Access {
            grants: roles
                .into_iter()
                .flat_map(|r| r.grants.iter().cloned())
                .collect(),
        }
    }

    pub fn all() -> Access {
        Access {
            grants: Role::root().grants,
        }
    }

    /// Whether `perm` is granted on `port`.
    pub fn allows(&self, perm: Perm, port: &[u8]) -> bool {
        self.grants
            .iter()
            .any(|g| g.perms.has(perm) && port.starts_with(&g.prefix))
    }

    /// Whether `perm` is granted on every port under `prefix` (for prefix watches,
    /// listings and broadcasts): some grant's prefix must be a prefix of it.
    pub fn allows_prefix(&self, perm: Perm, prefix: &[u8]) -> bool {
        self.allows(perm, prefix)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grants_apply_to_prefixes() {
        let ops = Role {
            name: "ops".into(),
            grants: vec![
                Grant {
                    prefix: b"svc/".to_vec(),
                    perms: Perms::parse("query,watch,list").unwrap(),
                },
                Grant {
                    prefix: b"svc/billing/".to_vec(),
                    perms: Perms::parse("register,send").unwrap(),
                },
            ],
        };
        let a = Access::of([&ops]);
        assert!(a.allows(Perm::Query, b"svc/api/1"));
        assert!(!a.allows(Perm::Register, b"svc/api/1"));
        assert!(a.allows(Perm::Register, b"svc/billing/leader"));
        assert!(!a.allows(Perm::Query, b"db/primary"));
        assert!(a.allows_prefix(Perm::List, b"svc/api/"));
        assert!(
            !a.allows_prefix(Perm::List, b"sv"),
            "a shorter prefix reaches beyond the grant"
        );
        assert!(!a.allows(Perm::Admin, b""));
        assert!(Access::all().allows(Perm::Admin, b"anything"));
        assert_eq!(
            Perms::parse("query,bogus"),
            Err("unknown permission \"bogus\"".into())
        );
        assert_eq!(Perms::parse("all"), Ok(Perms::ALL));
    }
}
