//! Authentication at the server's edge: the user and role store (persisted as JSON in
//! the data directory), SCRAM-SHA-256 exchanges in progress, lockout, admin commands
//! and the audit log. The SCRAM, policy, lockout and ACL logic itself is
//! `portswitch-auth`; this module does the bookkeeping and the I/O.
//!
//! A server with no users accepts sessions without credentials, as before. Once a user
//! exists every HELLO must authenticate. The first user can only be created from a
//! loopback connection and must have the `root` role, so that someone can administer.

use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::net::IpAddr;
use std::path::PathBuf;

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use portswitch_auth::acl::{Access, Grant, Perm, Perms, Role, ROOT_ROLE};
use portswitch_auth::lockout::{Lockout, LockoutConfig};
use portswitch_auth::policy::PasswordPolicy;
use portswitch_auth::scram::{self, Channel, ServerExchange, Verifier};
use portswitch_core::{ConnId, Identity};
use portswitch_proto::{ErrorCode, Hello};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

/// The SASL mechanism name that prefixes HELLO credentials.
pub const MECHANISM: &str = "SCRAM-SHA-256 ";
/// Default size at which the audit log is rotated.
pub const AUDIT_LOG_BYTES_MAX_DEFAULT: u64 = 64 << 20;
/// Rotated audit logs kept (`audit.log.1` … `.N`).
pub const AUDIT_LOG_FILES: u32 = 5;
/// Most users and most roles the store holds.
pub const USERS_MAX: usize = 100_000;
pub const ROLES_MAX: usize = 10_000;
/// Most grants in one role.
pub const GRANTS_PER_ROLE_MAX: usize = 1_000;
/// Exchanges in progress at once (HELLO answered, AUTH not yet received).
pub const PENDING_MAX: usize = 100_000;

/// Security settings of a server.
#[derive(Debug, Clone)]
pub struct AuthConfig {
    /// Where `auth.json` (users, roles) lives. Without it no users can be created and
    /// the server runs without authentication.
    pub data_dir: Option<PathBuf>,
    pub lockout: LockoutConfig,
    pub policy: PasswordPolicy,
    /// PBKDF2 iterations for new verifiers.
    pub iterations: u32,
    /// JSON-lines audit log of logins, lockouts, denials and admin changes.
    pub audit_log: Option<PathBuf>,
    pub audit_log_bytes_max: u64,
}

impl Default for AuthConfig {
    fn default() -> Self {
        AuthConfig {
            data_dir: None,
            lockout: LockoutConfig::default(),
            policy: PasswordPolicy::default(),
            iterations: scram::ITERATIONS_DEFAULT,
            audit_log: None,
            audit_log_bytes_max: AUDIT_LOG_BYTES_MAX_DEFAULT,
        }
    }
}

#[derive(Serialize, Deserialize, Default)]
struct StoreFile {
    users: BTreeMap<String, UserFile>,
    roles: BTreeMap<String, Vec<GrantFile>>,
}

#[derive(Serialize, Deserialize, Clone)]
struct UserFile {
    salt: String,
    iterations: u32,
    stored_key: String,
    server_key: String,
    roles: Vec<String>,
}

#[derive(Serialize, Deserialize, Clone)]
struct GrantFile {
    prefix: String,
    perms: String,
}

/// A HELLO kept while its authentication runs.
#[derive(Debug, Clone)]
pub(crate) struct OwnedHello {
    lease_ms: u32,
    end_on_disconnect: bool,
    node_name: Vec<u8>,
    resume_session: u64,
    resume_secret: u64,
}

impl OwnedHello {
    pub(crate) fn as_hello(&self) -> Hello<'_> {
        Hello {
            version_min: 1,
            version_max: 1,
            features: 0,
            lease_ms: self.lease_ms,
            end_on_disconnect: self.end_on_disconnect,
            node_name: &self.node_name,
            credentials: b"",
            resume_session: self.resume_session,
            resume_secret: self.resume_secret,
        }
    }
}

struct Pending {
    exchange: ServerExchange,
    hello: OwnedHello,
}

pub(crate) type Refusal = (ErrorCode, String);

/// The audit log: one JSON object per line, rotated by size.
struct Audit {
    path: PathBuf,
    file: std::fs::File,
    bytes: u64,
    bytes_max: u64,
}

impl Audit {
    fn open(path: PathBuf, bytes_max: u64) -> std::io::Result<Audit> {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)?;
        let bytes = file.metadata()?.len();
        Ok(Audit {
            path,
            file,
            bytes,
            bytes_max,
        })
    }

    fn write(&mut self, mut event: Value) {
        let ts = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        event["ts_ms"] = ts.into();
        let mut line = event.to_string();
        line.push('\n');
        if self.bytes + line.len() as u64 > self.bytes_max && self.bytes > 0 {
            if let Err(e) = self.rotate() {
                tracing::warn!("audit log rotation failed: {e}");
            }
        }
        match self.file.write_all(line.as_bytes()) {
            Ok(()) => self.bytes += line.len() as u64,
            Err(e) => tracing::warn!("audit log write failed: {e}"),
        }
    }

    fn rotate(&mut self) -> std::io::Result<()> {
        let name = |n: u32| {
            let mut p = self.path.clone().into_os_string();
            p.push(format!(".{n}"));
            PathBuf::from(p)
        };
        for n in (1..AUDIT_LOG_FILES).rev() {
            let _ = std::fs::rename(name(n), name(n + 1));
        }
        std::fs::rename(&self.path, name(1))?;
        self.file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.path)?;
        self.bytes = 0;
        Ok(())
    }
}

/// See the module docs.
pub(crate) struct Auth {
    cfg: AuthConfig,
    users: BTreeMap<String, (Verifier, Vec<String>)>,
    roles: BTreeMap<String, Role>,
    lockout: Lockout,
    fake_salt_key: [u8; 32],
    pending: HashMap<ConnId, Pending>,
    audit: Option<Audit>,
}

fn b64d(s: &str) -> std::io::Result<Vec<u8>> {
    B64.decode(s)
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))
}

fn key32(s: &str) -> std::io::Result<[u8; 32]> {
    b64d(s)?
        .try_into()
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::InvalidData, "key is not 32 bytes"))
}

/// Runs an admin command (as `ctl user ...` / `ctl role ...` would send it) on the
/// user store in the data directory of a server that is not running: for the first
/// user of a server reachable only from the network, and for members of a group,
/// each of which keeps its own users. The directory is locked meanwhile, so a running
/// server's store is never changed behind its back. Returns the command's answer.
pub fn admin_offline(cfg: AuthConfig, command: &[u8]) -> Result<String, String> {
    let dir = cfg
        .data_dir
        .clone()
        .ok_or("a data directory is needed for offline user commands")?;
    let _lock = crate::group::lock_dir(&dir).map_err(|e| e.to_string())?;
    let mut random = [0u8; 32 + scram::SALT_BYTES];
    getrandom::getrandom(&mut random).map_err(|e| format!("no OS randomness: {e}"))?;
    let fake_salt_key: [u8; 32] = random[..32].try_into().expect("32 bytes");
    let salt: [u8; scram::SALT_BYTES] = random[32..].try_into().expect("salt bytes");
    let mut auth = Auth::load(cfg, fake_salt_key).map_err(|e| e.to_string())?;
    let cmd: Value =
        serde_json::from_slice(command).map_err(|e| format!("command is not JSON: {e}"))?;
    let local = IpAddr::V4(std::net::Ipv4Addr::LOCALHOST);
    auth.admin_command("(offline)".into(), local, cmd, &salt)
        .map_err(|(code, m)| format!("{}: {m}", code.name()))
}

impl Auth {
    /// Loads the store from the data directory (if any) and opens the audit log.
    pub(crate) fn load(cfg: AuthConfig, fake_salt_key: [u8; 32]) -> std::io::Result<Auth> {
        let mut auth = Auth {
            lockout: Lockout::new(cfg.lockout.clone()),
            audit: match &cfg.audit_log {
                Some(p) => Some(Audit::open(p.clone(), cfg.audit_log_bytes_max)?),
                None => None,
            },
            cfg,
            users: BTreeMap::new(),
            roles: BTreeMap::new(),
            fake_salt_key,
            pending: HashMap::new(),
        };
        if let Some(dir) = &auth.cfg.data_dir {
            std::fs::create_dir_all(dir)?;
            let path = dir.join("auth.json");
            if path.exists() {
                let text = std::fs::read_to_string(&path)?;
                let file: StoreFile = serde_json::from_str(&text).map_err(|e| {
                    std::io::Error::new(
                        std::io::ErrorKind::InvalidData,
                        format!("{}: {e}", path.display()),
                    )
                })?;
                for (name, u) in file.users {
                    let v = Verifier {
                        salt: b64d(&u.salt)?,
                        iterations: u.iterations,
                        stored_key: key32(&u.stored_key)?,
                        server_key: key32(&u.server_key)?,
                    };
                    auth.users.insert(name, (v, u.roles));
                }
                for (name, grants) in file.roles {
                    let grants = grants
                        .into_iter()
                        .map(|g| {
                            Perms::parse(&g.perms)
                                .map(|perms| Grant {
                                    prefix: g.prefix.into_bytes(),
                                    perms,
                                })
                                .map_err(|e| {
                                    std::io::Error::new(std::io::ErrorKind::InvalidData, e)
                                })
                        })
                        .collect::<std::io::Result<Vec<_>>>()?;
                    auth.roles.insert(name.clone(), Role { name, grants });
                }
            }
        }
        Ok(auth)
    }

    /// Whether HELLO must authenticate (some user exists).
    pub(crate) fn enabled(&self) -> bool {
        !self.users.is_empty()
    }

    /// Whether a session without credentials is allowed from `addr`. A server with a
    /// data directory but no users yet is waiting for its first user: until then only
    /// loopback clients may use it, so a server reachable from the network is never
    /// open, even for the moment before the first user exists.
    pub(crate) fn admits_anonymous(&self, addr: IpAddr) -> bool {
        !self.enabled() && (self.cfg.data_dir.is_none() || addr.is_loopback())
    }

    fn save(&self) -> Result<(), Refusal> {
        let Some(dir) = &self.cfg.data_dir else {
            return Err((
                ErrorCode::InvalidArgument,
                "the server has no --data-dir: users cannot be stored".into(),
            ));
        };
        let file = StoreFile {
            users: self
                .users
                .iter()
                .map(|(n, (v, roles))| {
                    (
                        n.clone(),
                        UserFile {
                            salt: B64.encode(&v.salt),
                            iterations: v.iterations,
                            stored_key: B64.encode(v.stored_key),
                            server_key: B64.encode(v.server_key),
                            roles: roles.clone(),
                        },
                    )
                })
                .collect(),
            roles: self
                .roles
                .iter()
                .map(|(n, r)| {
                    let grants = r
                        .grants
                        .iter()
                        .map(|g| GrantFile {
                            prefix: String::from_utf8_lossy(&g.prefix).into_owned(),
                            perms: g.perms.iter().map(Perm::name).collect::<Vec<_>>().join(","),
                        })
                        .collect();
                    (n.clone(), grants)
                })
                .collect(),
        };
        let text = serde_json::to_string_pretty(&file)
            .map_err(|e| (ErrorCode::InvalidArgument, e.to_string()))?;
        // Write aside, sync, then rename: a crash leaves the old or the new file, whole.
        let write = || -> std::io::Result<()> {
            let tmp = dir.join("auth.json.tmp");
            let mut f = std::fs::File::create(&tmp)?;
            f.write_all(text.as_bytes())?;
            f.sync_all()?;
            std::fs::rename(&tmp, dir.join("auth.json"))?;
            std::fs::File::open(dir)?.sync_all()
        };
        write().map_err(|e| {
            (
                ErrorCode::InvalidArgument,
                format!("cannot store users: {e}"),
            )
        })
    }

    fn access_of(&self, roles: &[String]) -> Access {
        let root = Role::root();
        Access::of(roles.iter().filter_map(|r| {
            if r == ROOT_ROLE {
                Some(&root)
            } else {
                self.roles.get(r)
            }
        }))
    }

    pub(crate) fn audit(&mut self, event: Value) {
        if let Some(a) = &mut self.audit {
            a.write(event);
        }
    }

    /// A HELLO with credentials: starts the exchange and returns the challenge.
    pub(crate) fn start(
        &mut self,
        conn: ConnId,
        addr: IpAddr,
        hello: &Hello<'_>,
        server_nonce: &str,
        now_ms: u64,
        channel: Channel<'_>,
    ) -> Result<String, Refusal> {
        let failed = || (ErrorCode::AuthFailed, "authentication failed".to_string());
        let Some(first) = std::str::from_utf8(hello.credentials)
            .ok()
            .and_then(|c| c.strip_prefix(MECHANISM))
        else {
            return Err((
                ErrorCode::AuthFailed,
                "only SCRAM-SHA-256 is supported".into(),
            ));
        };
        if self.pending.len() >= PENDING_MAX {
            return Err((
                ErrorCode::AuthFailed,
                "too many logins in progress; retry".into(),
            ));
        }
        let users = &self.users;
        let (exchange, server_first) = ServerExchange::start(
            first,
            |u| users.get(u).map(|(v, _)| v.clone()),
            &self.fake_salt_key,
            server_nonce,
            channel,
        )
        .map_err(|_| failed())?;
        let user = exchange.username().to_string();
        if self.lockout.check(&user, addr, now_ms).is_err() {
            self.audit(
                json!({"event": "login_refused_locked", "user": user, "addr": addr.to_string()}),
            );
            return Err(failed());
        }
        let hello = OwnedHello {
            lease_ms: hello.lease_ms,
            end_on_disconnect: hello.end_on_disconnect,
            node_name: hello.node_name.to_vec(),
            resume_session: hello.resume_session,
            resume_secret: hello.resume_secret,
        };
        self.pending.insert(conn, Pending { exchange, hello });
        Ok(server_first)
    }

    /// AUTH: finishes the exchange. On success returns the HELLO to run, the identity
    /// and the server's signature.
    pub(crate) fn finish(
        &mut self,
        conn: ConnId,
        addr: IpAddr,
        client_final: &[u8],
        now_ms: u64,
        channel: Channel<'_>,
    ) -> Result<(OwnedHello, Identity, String), Refusal> {
        let failed = || (ErrorCode::AuthFailed, "authentication failed".to_string());
        let Some(p) = self.pending.remove(&conn) else {
            return Err((
                ErrorCode::InvalidArgument,
                "AUTH without HELLO credentials first".into(),
            ));
        };
        let user = p.exchange.username().to_string();
        let result = std::str::from_utf8(client_final)
            .map_err(|_| scram::ScramError::Malformed("not UTF-8"))
            .and_then(|m| p.exchange.finish(m, channel));
        match result {
            Ok((user, server_final)) => {
                self.lockout.success(&user, addr);
                let roles = self
                    .users
                    .get(&user)
                    .map(|(_, r)| r.clone())
                    .unwrap_or_default();
                let access = self.access_of(&roles);
                self.audit(json!({"event": "login", "user": user, "addr": addr.to_string()}));
                Ok((p.hello, Identity { user, access }, server_final))
            }
            Err(e) => {
                let locked = self.lockout.failure(&user, addr, now_ms);
                self.audit(json!({"event": "login_failed", "user": user, "addr": addr.to_string(), "reason": e.to_string()}));
                if locked.user_locked {
                    self.audit(json!({"event": "lockout", "user": user, "lock_ms": self.cfg.lockout.lock_ms}));
                }
                if locked.addr_locked {
                    self.audit(json!({"event": "lockout", "addr": addr.to_string(), "lock_ms": self.cfg.lockout.lock_ms}));
                }
                Err(failed())
            }
        }
    }

    /// A verified client certificate names `user`: the identity to log in as, if that
    /// user exists.
    pub(crate) fn cert_login(&mut self, user: &str, addr: IpAddr) -> Option<Identity> {
        let roles = self.users.get(user)?.1.clone();
        let access = self.access_of(&roles);
        self.audit(json!({"event": "login", "user": user, "addr": addr.to_string(), "method": "certificate"}));
        Some(Identity {
            user: user.to_string(),
            access,
        })
    }

    /// The connection went away: forget an exchange in progress.
    pub(crate) fn forget(&mut self, conn: ConnId) {
        self.pending.remove(&conn);
    }

    /// Runs an admin command for `caller` (None: unauthenticated, allowed only while
    /// there are no users and only from loopback). `salt` is fresh randomness for a
    /// new verifier.
    pub(crate) fn admin(
        &mut self,
        caller: Option<(&str, &Access)>,
        addr: IpAddr,
        command: &[u8],
        salt: &[u8; scram::SALT_BYTES],
    ) -> Result<String, Refusal> {
        let bad = |m: String| (ErrorCode::InvalidArgument, m);
        let who = self.check_admin(caller, addr)?;
        let cmd: Value = serde_json::from_slice(command)
            .map_err(|e| bad(format!("command is not JSON: {e}")))?;
        self.admin_command(who, addr, cmd, salt)
    }

    /// Who may run an ADMIN command: a user with the admin permission, or — on a
    /// server without users — anyone from loopback (to create the first user).
    pub(crate) fn check_admin(
        &mut self,
        caller: Option<(&str, &Access)>,
        addr: IpAddr,
    ) -> Result<String, Refusal> {
        Ok(match caller {
            Some((user, access)) if access.allows(Perm::Admin, b"") => user.to_string(),
            Some((user, _)) => {
                self.audit(json!({"event": "denied", "user": user, "perm": "admin", "addr": addr.to_string()}));
                return Err((
                    ErrorCode::PermissionDenied,
                    "the admin permission is required".into(),
                ));
            }
            None if !self.enabled() && addr.is_loopback() => "(bootstrap)".to_string(),
            None if self.enabled() => {
                return Err((ErrorCode::AuthRequired, "log in with an admin user".into()))
            }
            None => {
                return Err((
                    ErrorCode::PermissionDenied,
                    "the first user must be created from loopback".into(),
                ))
            }
        })
    }

    fn admin_command(
        &mut self,
        who: String,
        addr: IpAddr,
        cmd: Value,
        salt: &[u8; scram::SALT_BYTES],
    ) -> Result<String, Refusal> {
        let bad = |m: String| (ErrorCode::InvalidArgument, m);
        let op = cmd["op"].as_str().unwrap_or("");
        if !op.ends_with("_list") && self.cfg.data_dir.is_none() {
            // Refuse before changing anything, so memory and disk never disagree.
            return Err(bad(
                "the server has no --data-dir: users and roles cannot be stored".into(),
            ));
        }
        let text = |k: &str| {
            cmd[k]
                .as_str()
                .map(str::to_string)
                .ok_or_else(|| bad(format!("\"{k}\" (a string) is required")))
        };
        let list = |k: &str| -> Vec<String> {
            cmd[k]
                .as_array()
                .map(|a| {
                    a.iter()
                        .filter_map(|v| v.as_str().map(str::to_string))
                        .collect()
                })
                .unwrap_or_default()
        };
        let result = match op {
            "user_add" | "user_passwd" => {
                let user = text("user")?;
                let password = text("password")?;
                if user.is_empty() || user.len() > scram::USERNAME_BYTES_MAX {
                    return Err(bad(format!(
                        "user names are 1 to {} bytes",
                        scram::USERNAME_BYTES_MAX
                    )));
                }
                self.cfg
                    .policy
                    .check(&user, &password)
                    .map_err(|e| bad(e.to_string()))?;
                let verifier = Verifier::new(&password, salt, self.cfg.iterations);
                if op == "user_add" {
                    if self.users.contains_key(&user) {
                        return Err(bad(format!("user {user} exists")));
                    }
                    if self.users.len() >= USERS_MAX {
                        return Err(bad(format!("the server holds {USERS_MAX} users")));
                    }
                    let roles = list("roles");
                    if let Some(r) = roles
                        .iter()
                        .find(|r| *r != ROOT_ROLE && !self.roles.contains_key(*r))
                    {
                        return Err(bad(format!("no role {r}")));
                    }
                    if !self.enabled() && !roles.iter().any(|r| r == ROOT_ROLE) {
                        return Err(bad("the first user must have the root role".into()));
                    }
                    self.users.insert(user.clone(), (verifier, roles));
                } else {
                    let Some(u) = self.users.get_mut(&user) else {
                        return Err(bad(format!("no user {user}")));
                    };
                    u.0 = verifier;
                }
                json!({"ok": true, "user": user})
            }
            "user_del" => {
                let user = text("user")?;
                if self.users.remove(&user).is_none() {
                    return Err(bad(format!("no user {user}")));
                }
                json!({"ok": true, "user": user})
            }
            "user_grant" | "user_revoke" => {
                let (user, role) = (text("user")?, text("role")?);
                if role != ROOT_ROLE && !self.roles.contains_key(&role) {
                    return Err(bad(format!("no role {role}")));
                }
                let Some(u) = self.users.get_mut(&user) else {
                    return Err(bad(format!("no user {user}")));
                };
                u.1.retain(|r| *r != role);
                if op == "user_grant" {
                    u.1.push(role.clone());
                }
                json!({"ok": true, "user": user, "roles": u.1})
            }
            "user_list" => json!(self
                .users
                .iter()
                .map(|(n, (_, r))| json!({"user": n, "roles": r}))
                .collect::<Vec<_>>()),
            "role_add" => {
                let role = text("role")?;
                if role == ROOT_ROLE || role.is_empty() {
                    return Err(bad("that role name is reserved or empty".into()));
                }
                if !self.roles.contains_key(&role) && self.roles.len() >= ROLES_MAX {
                    return Err(bad(format!("the server holds {ROLES_MAX} roles")));
                }
                let grants = cmd["grants"].as_array().cloned().unwrap_or_default();
                if grants.len() > GRANTS_PER_ROLE_MAX {
                    return Err(bad(format!(
                        "a role has at most {GRANTS_PER_ROLE_MAX} grants"
                    )));
                }
                let grants = grants
                    .iter()
                    .map(|g| {
                        let prefix = g["prefix"].as_str().unwrap_or("").as_bytes().to_vec();
                        Perms::parse(g["perms"].as_str().unwrap_or(""))
                            .map(|perms| Grant { prefix, perms })
                    })
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(bad)?;
                self.roles.insert(
                    role.clone(),
                    Role {
                        name: role.clone(),
                        grants,
                    },
                );
                json!({"ok": true, "role": role})
            }
            "role_del" => {
                let role = text("role")?;
                if self.roles.remove(&role).is_none() {
                    return Err(bad(format!("no role {role}")));
                }
                for (_, roles) in self.users.values_mut() {
                    roles.retain(|r| *r != role);
                }
                json!({"ok": true, "role": role})
            }
            "role_list" => json!(self
                .roles
                .values()
                .map(
                    |r| json!({"role": r.name, "grants": r.grants.iter().map(|g| json!({
                    "prefix": String::from_utf8_lossy(&g.prefix),
                    "perms": g.perms.iter().map(Perm::name).collect::<Vec<_>>().join(","),
                })).collect::<Vec<_>>()})
                )
                .collect::<Vec<_>>()),
            _ => return Err(bad(format!("unknown admin op {op:?}"))),
        };
        if !op.ends_with("_list") {
            self.save()?;
            let target = cmd
                .get("user")
                .or_else(|| cmd.get("role"))
                .cloned()
                .unwrap_or(Value::Null);
            self.audit(json!({"event": "admin", "by": who, "op": op, "target": target, "addr": addr.to_string()}));
        }
        Ok(result.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn auth(data_dir: Option<PathBuf>) -> Auth {
        Auth::load(
            AuthConfig {
                data_dir,
                ..AuthConfig::default()
            },
            [3; 32],
        )
        .unwrap()
    }

    #[test]
    fn anonymous_sessions_only_where_safe() {
        let remote = IpAddr::from([192, 0, 2, 7]);
        let local = IpAddr::from([127, 0, 0, 1]);
        // No user store at all: open (the server itself refuses non-loopback listening).
        let open = auth(None);
        assert!(open.admits_anonymous(remote) && open.admits_anonymous(local));
        // A user store awaiting its first user: loopback only.
        let dir = std::env::temp_dir().join(format!("portswitch-auth-unit-{}", std::process::id()));
        let mut waiting = auth(Some(dir.clone()));
        assert!(!waiting.admits_anonymous(remote));
        assert!(waiting.admits_anonymous(local));
        // Once a user exists nobody gets in without credentials.
        let cmd = br#"{"op":"user_add","user":"root","password":"Granite-Falcon-2026!","roles":["root"]}"#;
        waiting.cfg.iterations = scram::ITERATIONS_MIN;
        waiting
            .admin(None, local, cmd, &[1; scram::SALT_BYTES])
            .unwrap();
        assert!(!waiting.admits_anonymous(local) && !waiting.admits_anonymous(remote));
        // ...and the first user cannot be created from the network.
        let mut fresh = auth(Some(dir.join("other")));
        assert_eq!(
            fresh
                .admin(None, remote, cmd, &[1; scram::SALT_BYTES])
                .unwrap_err()
                .0,
            ErrorCode::PermissionDenied
        );
        let _ = std::fs::remove_dir_all(dir);
    }
}
