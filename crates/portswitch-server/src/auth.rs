//! Authentication at the server's edge: the user and role store (persisted as JSON in
//! the data directory), SCRAM-SHA-256 exchanges in progress, throttling of failed
//! logins, admin commands and the audit log. The SCRAM, policy, throttling and ACL
//! logic itself is `portswitch-auth`; this module does the bookkeeping and the I/O.
//!
//! A server with no users accepts sessions without credentials, as before. Once a user
//! exists every HELLO must authenticate. The first user can only be created from a
//! loopback connection and must have the `root` role, so that someone can administer.
//!
//! Files (all through `portswitch-files`): `auth.json` holds the password verifiers
//! and `auth.key` the key the fake salts of unknown user names and the audit log's
//! hashes of them derive from; both are written 0600 and refused on open if group or
//! others have any access. The audit log is created 0600 and records a failed login
//! for a name that is no user without the name (a password typed into the user field
//! must not end up in a log), only a keyed hash of it.

use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::Instant;

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use portswitch_auth::acl::{Access, Grant, Perm, Perms, Role, ROOT_ROLE};
use portswitch_auth::lockout::{Lockout, LockoutConfig, Refused, Tracked};
use portswitch_auth::policy::PasswordPolicy;
use portswitch_auth::scram::{self, Channel, ServerExchange, Verifier};
use portswitch_core::{ConnId, Identity};
use portswitch_files::SECRET_MODE;
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
/// The user store's file in the data directory.
pub const AUTH_FILE: &str = "auth.json";
/// The key the fake salts of unknown user names and the audit log's hashes of them
/// derive from, in the data directory: kept, so that a name shows the same salt
/// before and after a restart (a new salt would tell a prober the name is no user).
pub const AUTH_KEY_FILE: &str = "auth.key";
/// Hex digits of the keyed hash an unknown user name is logged as: enough to tell
/// repeated names apart, too few to test guesses against offline without the key.
pub const AUDIT_USER_HASH_HEX: usize = 16;

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
    /// JSON-lines audit log of logins, refusals, back-offs, denials and admin
    /// changes. Created 0600; a user name that is no user is logged as a keyed hash.
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

type Users = BTreeMap<String, (Verifier, Vec<String>)>;
type Roles = BTreeMap<String, Role>;

/// The users and roles of a store document.
fn parse_store(file: StoreFile) -> std::io::Result<(Users, Roles)> {
    let mut users = Users::new();
    for (name, u) in file.users {
        let v = Verifier {
            salt: b64d(&u.salt)?,
            iterations: u.iterations,
            stored_key: key32(&u.stored_key)?,
            server_key: key32(&u.server_key)?,
        };
        users.insert(name, (v, u.roles));
    }
    let mut roles = Roles::new();
    for (name, grants) in file.roles {
        let grants = grants
            .into_iter()
            .map(|g| {
                Perms::parse(&g.perms)
                    .map(|perms| Grant {
                        prefix: g.prefix.into_bytes(),
                        perms,
                    })
                    .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))
            })
            .collect::<std::io::Result<Vec<_>>>()?;
        roles.insert(name.clone(), Role { name, grants });
    }
    Ok((users, roles))
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
    /// Opens (creating it 0600) the log. An existing log keeps the mode it has, which
    /// may be the operator's choice (a log shipper's group): only warned about.
    fn open(path: PathBuf, bytes_max: u64) -> std::io::Result<Audit> {
        let file = portswitch_files::open_append(&path, SECRET_MODE)?;
        if !portswitch_files::is_private(&file)? {
            tracing::warn!(
                "the audit log {} is readable by group or others; it names users and \
                 addresses (chmod 600 it unless that is meant)",
                path.display()
            );
        }
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
        // The copies keep the log's mode; the new log is created 0600.
        std::fs::rename(&self.path, name(1))?;
        self.file = portswitch_files::open_append(&self.path, SECRET_MODE)?;
        self.bytes = 0;
        Ok(())
    }
}

/// See the module docs.
pub(crate) struct Auth {
    cfg: AuthConfig,
    users: Users,
    roles: Roles,
    lockout: Lockout,
    fake_salt_key: [u8; 32],
    /// Keys the hashes unknown user names are logged as.
    audit_key: [u8; 32],
    /// The server's clock at the last login, and when that was: admin commands are
    /// not given the time, and listing back-offs needs it.
    clock: Option<(u64, Instant)>,
    pending: HashMap<ConnId, Pending>,
    audit: Option<Audit>,
    /// On a group's master: the version of the group's replicated users and roles
    /// this store holds. Changes then go through the group (`AdminOutcome::Replicate`)
    /// instead of straight to `auth.json`.
    replicated: Option<u64>,
}

impl AdminOutcome {
    /// The command's answer.
    pub(crate) fn answer(&self) -> &str {
        match self {
            AdminOutcome::Done { answer, .. } | AdminOutcome::Replicate { answer, .. } => answer,
        }
    }
}

/// What an ADMIN command names, for the audit log.
fn admin_target(cmd: &Value) -> Value {
    cmd.get("user")
        .or_else(|| cmd.get("role"))
        .cloned()
        .unwrap_or(Value::Null)
}

/// What an ADMIN command decided.
#[derive(Debug)]
pub(crate) enum AdminOutcome {
    /// Done (nothing stored, or stored in the data directory): the answer, and the
    /// user it deleted, whose sessions must end.
    Done {
        answer: String,
        deleted: Option<String>,
    },
    /// A change of a group's users and roles: write `store` through the group over
    /// version `expect`, then [`Auth::adopt_replicated`] it, audit `audit`, end the
    /// sessions of `deleted`, and answer `answer`. Nothing changed yet.
    Replicate {
        expect: u64,
        store: String,
        answer: String,
        audit: Value,
        deleted: Option<String>,
    },
}

fn hmac_sha256(key: &[u8], data: &[u8]) -> [u8; 32] {
    use hmac::{Hmac, Mac};
    let mut mac = Hmac::<sha2::Sha256>::new_from_slice(key).expect("HMAC takes keys of any size");
    mac.update(data);
    mac.finalize().into_bytes().into()
}

/// The two keys derived from a server's auth key: the fake salts' and the audit
/// log's.
fn derive_keys(auth_key: &[u8; 32]) -> ([u8; 32], [u8; 32]) {
    (
        hmac_sha256(auth_key, b"portswitch fake salt of unknown user names"),
        hmac_sha256(auth_key, b"portswitch audit log hash of unknown user names"),
    )
}

/// Reads the data directory's auth key, creating it on first use (0600, never
/// replacing one that exists).
fn auth_key(dir: &Path) -> std::io::Result<[u8; 32]> {
    let path = dir.join(AUTH_KEY_FILE);
    let read = |bytes: Vec<u8>| -> std::io::Result<[u8; 32]> {
        let text = String::from_utf8(bytes).map_err(|e| invalid(&path, e))?;
        key32(text.trim()).map_err(|e| invalid(&path, e))
    };
    match portswitch_files::read_secret(&path) {
        Ok(bytes) => return read(bytes),
        Err(e) if e.is_not_found() => {}
        Err(e) => return Err(e.into()),
    }
    let mut key = [0u8; 32];
    getrandom::getrandom(&mut key).map_err(|e| std::io::Error::other(e.to_string()))?;
    let text = format!("{}\n", B64.encode(key));
    match portswitch_files::write_new_durable(&path, text.as_bytes(), SECRET_MODE) {
        Ok(()) => Ok(key),
        Err(portswitch_files::FileError::Io { source, .. })
            if source.kind() == std::io::ErrorKind::AlreadyExists =>
        {
            read(portswitch_files::read_secret(&path)?)
        }
        Err(e) => Err(e.into()),
    }
}

fn invalid(path: &Path, e: impl std::fmt::Display) -> std::io::Error {
    std::io::Error::new(
        std::io::ErrorKind::InvalidData,
        format!("{}: {e}", path.display()),
    )
}

/// The answer to an attempt refused for too many failures.
fn refused_message(r: Refused, now_ms: u64) -> String {
    let s = r.until_ms().saturating_sub(now_ms).div_ceil(1_000).max(1);
    match r {
        Refused::User { .. } => {
            format!("too many failed logins for this user name: retry in {s} s")
        }
        Refused::Addr { .. } => format!("too many failed logins from this address: retry in {s} s"),
    }
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
    if let Some(op) = cmd["op"].as_str().filter(|op| is_lockout_op(op)) {
        return Err(format!(
            "{op}: failed logins are counted in a running server's memory; send it to the \
             server instead"
        ));
    }
    let local = IpAddr::V4(std::net::Ipv4Addr::LOCALHOST);
    // (An offline store follows no group: it is never `Replicate`.)
    auth.admin_command("(offline)".into(), local, cmd, &salt)
        .map(|done| done.answer().to_string())
        .map_err(|(code, m)| format!("{}: {m}", code.name()))
}

/// Admin commands about failed logins: they act on the running server's memory, need
/// no data directory and store nothing.
fn is_lockout_op(op: &str) -> bool {
    matches!(op, "user_unlock" | "addr_unlock" | "lockout_list")
}

impl Auth {
    /// Loads the store from the data directory (if any) and opens the audit log.
    /// `random_key` keys the fake salts and the audit log's hashes of unknown user
    /// names when there is no data directory; with one, the directory's own key
    /// (`auth.key`, created on first use) does, so they survive a restart.
    pub(crate) fn load(cfg: AuthConfig, random_key: [u8; 32]) -> std::io::Result<Auth> {
        let key = match &cfg.data_dir {
            Some(dir) => {
                portswitch_files::create_dir_private(dir)?;
                auth_key(dir)?
            }
            None => random_key,
        };
        let (fake_salt_key, audit_key) = derive_keys(&key);
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
            audit_key,
            clock: None,
            pending: HashMap::new(),
            replicated: None,
        };
        if let Some(dir) = &auth.cfg.data_dir {
            let path = dir.join(AUTH_FILE);
            let bytes = match portswitch_files::read_secret(&path) {
                Ok(bytes) => Some(bytes),
                Err(e) if e.is_not_found() => None,
                Err(e) => return Err(e.into()),
            };
            if let Some(bytes) = bytes {
                let file: StoreFile =
                    serde_json::from_slice(&bytes).map_err(|e| invalid(&path, e))?;
                (auth.users, auth.roles) = parse_store(file)?;
            }
        }
        Ok(auth)
    }

    /// The users and roles as the document a group replicates (the `auth.json`
    /// format).
    pub(crate) fn store_json(&self) -> String {
        serde_json::to_string(&self.store_file()).unwrap_or_default()
    }

    /// Whether this store follows a group's replicated users (see `replicated`).
    pub(crate) fn replicated(&self) -> Option<u64> {
        self.replicated
    }

    /// Makes this store follow the group's users at `version` (`None`: the group has
    /// none yet — this store's own are what the group gets first).
    pub(crate) fn follow_group(&mut self, users: Option<&str>, version: u64) {
        match users {
            // Already this version (the member was master before): nothing to parse
            // or to write to disk again.
            Some(_) if self.replicated == Some(version) => {}
            Some(json) => self.adopt_replicated(json, version),
            None => self.replicated = Some(version),
        }
    }

    /// Takes the group's users and roles at `version`: they replace this store's, and
    /// are kept in `auth.json` too (a member that restarts alone still has them).
    pub(crate) fn adopt_replicated(&mut self, json: &str, version: u64) {
        let parsed = serde_json::from_str::<StoreFile>(json)
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))
            .and_then(parse_store);
        match parsed {
            Ok((users, roles)) => {
                self.users = users;
                self.roles = roles;
                self.replicated = Some(version);
                if self.cfg.data_dir.is_some() {
                    if let Err((_, e)) = self.save() {
                        tracing::warn!("cannot keep the group's users in auth.json: {e}");
                    }
                }
            }
            Err(e) => tracing::error!(version, "the group's users do not parse: {e}"),
        }
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
        let file = self.store_file();
        let text = serde_json::to_string_pretty(&file)
            .map_err(|e| (ErrorCode::InvalidArgument, e.to_string()))?;
        // Private (it holds the verifiers), and a crash leaves the old or the new file.
        portswitch_files::write_durable(&dir.join(AUTH_FILE), text.as_bytes(), SECRET_MODE).map_err(
            |e| {
                (
                    ErrorCode::InvalidArgument,
                    format!("cannot store users: {e}"),
                )
            },
        )
    }

    fn store_file(&self) -> StoreFile {
        StoreFile {
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
        }
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

    /// Logs a login event about the name `user` typed at `addr`. A name that is no
    /// user may be a password typed into the wrong field: it is logged only as a
    /// keyed hash (`user_hash`), which tells repeated names apart.
    fn audit_login(&mut self, event: &str, user: &str, addr: IpAddr, mut fields: Value) {
        if self.audit.is_none() {
            return;
        }
        fields["event"] = event.into();
        fields["addr"] = addr.to_string().into();
        if self.users.contains_key(user) {
            fields["user"] = user.into();
            fields["user_known"] = true.into();
        } else {
            fields["user"] = Value::Null;
            fields["user_known"] = false.into();
            fields["user_hash"] = self.user_hash(user).into();
        }
        self.audit(fields);
    }

    /// What a name that is no user is shown as: a keyed hash, stable across restarts
    /// when there is a data directory.
    fn user_hash(&self, user: &str) -> String {
        let hash = hmac_sha256(&self.audit_key, user.as_bytes());
        let hex: String = hash.iter().map(|b| format!("{b:02x}")).collect();
        hex[..AUDIT_USER_HASH_HEX].to_string()
    }

    /// Refuses an attempt while its name or address is throttled (logged).
    fn throttled(&mut self, user: &str, addr: IpAddr, now_ms: u64) -> Result<(), Refusal> {
        let Err(r) = self.lockout.check(user, addr, now_ms) else {
            return Ok(());
        };
        let reason = match r {
            Refused::User { .. } => "user_backoff",
            Refused::Addr { .. } => "addr_refused",
        };
        let retry_ms = r.until_ms().saturating_sub(now_ms);
        self.audit_login(
            "login_refused_locked",
            user,
            addr,
            json!({"reason": reason, "retry_ms": retry_ms}),
        );
        Err((ErrorCode::AuthFailed, refused_message(r, now_ms)))
    }

    /// The server's clock now, as well as this module knows it (see `clock`).
    fn now_ms(&self) -> u64 {
        self.clock.map_or(0, |(ms, at)| {
            ms.saturating_add(at.elapsed().as_millis().try_into().unwrap_or(u64::MAX))
        })
    }

    fn tick(&mut self, now_ms: u64) {
        self.clock = Some((now_ms, Instant::now()));
    }

    /// An administrator ends the back-off of `user` (every one of it: the name's own
    /// and those at its trusted addresses). Returns whether it had failures counted.
    pub(crate) fn unlock_user(&mut self, user: &str) -> bool {
        self.lockout.unlock_user(user)
    }

    /// An administrator ends the refusal of the address `addr` (for IPv6, of its /64).
    /// Returns whether it had failures counted.
    pub(crate) fn unlock_addr(&mut self, addr: IpAddr) -> bool {
        self.lockout.unlock_addr(addr)
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
        let (exchange, server_first) = ServerExchange::start_with(
            first,
            |u| users.get(u).map(|(v, _)| v.clone()),
            &self.fake_salt_key,
            self.cfg.iterations,
            server_nonce,
            channel,
        )
        .map_err(|_| failed())?;
        let user = exchange.username().to_string();
        self.tick(now_ms);
        self.throttled(&user, addr, now_ms)?;
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
        self.tick(now_ms);
        // Again: failures of other attempts at this name, in flight at the same time,
        // may have started a back-off since HELLO. The proof is then not checked.
        self.throttled(&user, addr, now_ms)?;
        let result = std::str::from_utf8(client_final)
            .map_err(|_| scram::ScramError::Malformed("not UTF-8"))
            .and_then(|m| p.exchange.finish(m, channel));
        match result {
            Ok((user, server_final)) => {
                self.lockout.success(&user, addr, now_ms);
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
                let outcome = self.lockout.failure(&user, addr, now_ms);
                self.audit_login(
                    "login_failed",
                    &user,
                    addr,
                    json!({"reason": e.to_string()}),
                );
                if let Some(ms) = outcome.user_refused_ms {
                    self.audit_login(
                        "lockout",
                        &user,
                        addr,
                        json!({"kind": "user_backoff", "refuse_ms": ms}),
                    );
                }
                if let Some(ms) = outcome.addr_refused_ms {
                    self.audit(json!({"event": "lockout", "kind": "addr_refused", "addr": addr.to_string(), "refuse_ms": ms}));
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
    ) -> Result<AdminOutcome, Refusal> {
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
    ) -> Result<AdminOutcome, Refusal> {
        let bad = |m: String| (ErrorCode::InvalidArgument, m);
        let op = cmd["op"].as_str().unwrap_or("");
        // What the command changes: nothing, the memory (failed logins), or the store.
        let stores = !op.ends_with("_list") && !is_lockout_op(op);
        if let (true, Some(expect)) = (stores, self.replicated) {
            // A group's users change through the group: work the change out on this
            // store, hand back the document, and put the store back as it was until
            // the group has it.
            let before = (self.users.clone(), self.roles.clone());
            let done = self.change(op, &cmd, salt);
            let store = self.store_json();
            (self.users, self.roles) = before;
            let (answer, deleted) = done?;
            return Ok(AdminOutcome::Replicate {
                expect,
                store,
                answer,
                audit: json!({"event": "admin", "by": who, "op": op, "target": admin_target(&cmd), "addr": addr.to_string()}),
                deleted,
            });
        }
        if stores && self.cfg.data_dir.is_none() {
            // Refuse before changing anything, so memory and disk never disagree.
            return Err(bad(
                "the server has no --data-dir: users and roles cannot be stored".into(),
            ));
        }
        let (answer, deleted) = self.change(op, &cmd, salt)?;
        if is_lockout_op(op) && !op.ends_with("_list") {
            let target = cmd
                .get("user")
                .or_else(|| cmd.get("addr"))
                .cloned()
                .unwrap_or(Value::Null);
            self.audit(json!({"event": "admin", "by": who, "op": op, "target": target, "addr": addr.to_string()}));
        }
        if stores {
            self.save()?;
            let target = admin_target(&cmd);
            self.audit(json!({"event": "admin", "by": who, "op": op, "target": target, "addr": addr.to_string()}));
        }
        Ok(AdminOutcome::Done { answer, deleted })
    }

    /// Runs `op` on this store (in memory): its answer, and the user it deleted.
    fn change(
        &mut self,
        op: &str,
        cmd: &Value,
        salt: &[u8; scram::SALT_BYTES],
    ) -> Result<(String, Option<String>), Refusal> {
        let bad = |m: String| (ErrorCode::InvalidArgument, m);
        let mut deleted = None;
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
                deleted = Some(user.clone());
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
            "user_unlock" => {
                let user = text("user")?;
                let counted = self.unlock_user(&user);
                json!({"ok": true, "user": user, "had_failures": counted})
            }
            "addr_unlock" => {
                let addr: IpAddr = text("addr")?
                    .parse()
                    .map_err(|e| bad(format!("\"addr\" is no IP address: {e}")))?;
                let counted = self.unlock_addr(addr);
                json!({"ok": true, "addr": addr.to_string(), "had_failures": counted})
            }
            "lockout_list" => {
                let now_ms = self.now_ms();
                json!(self
                    .lockout
                    .refused(now_ms)
                    .into_iter()
                    .map(|t| match t {
                        Tracked::User {
                            name,
                            at,
                            failures,
                            refused_ms,
                        } => {
                            // Like the audit log, no name that is no user.
                            let known = self.users.contains_key(&name);
                            let hash = (!known).then(|| self.user_hash(&name));
                            json!({
                                "user": known.then_some(name),
                                "user_known": known,
                                "user_hash": hash,
                                "at": at.map(|a| a.to_string()),
                                "failures": failures,
                                "refused_ms": refused_ms,
                            })
                        }
                        Tracked::Addr {
                            addr,
                            failures,
                            refused_ms,
                        } => json!({
                            "addr": addr.to_string(),
                            "failures": failures,
                            "refused_ms": refused_ms,
                        }),
                    })
                    .collect::<Vec<_>>())
            }
            _ => return Err(bad(format!("unknown admin op {op:?}"))),
        };
        Ok((result.to_string(), deleted))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use portswitch_auth::scram::ClientExchange;
    use std::os::unix::fs::PermissionsExt;

    const ROOT_PW: &str = "Granite-Falcon-2026!";
    const ALICE_PW: &str = "Tulip-Orbit-93";

    fn temp_dir(tag: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!(
            "portswitch-auth-{tag}-{}-{}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    fn mode(path: &Path) -> u32 {
        std::fs::metadata(path).unwrap().permissions().mode() & 0o777
    }

    /// A server's Auth on `dir`, with root and alice, audit log in `dir`.
    fn secured(dir: &Path, random_key: u8, lockout: LockoutConfig) -> Auth {
        let mut auth = Auth::load(
            AuthConfig {
                data_dir: Some(dir.to_path_buf()),
                audit_log: Some(dir.join("audit.log")),
                iterations: scram::ITERATIONS_MIN,
                lockout,
                ..AuthConfig::default()
            },
            [random_key; 32],
        )
        .unwrap();
        if !auth.enabled() {
            let local = IpAddr::from([127, 0, 0, 1]);
            for cmd in [
                json!({"op": "user_add", "user": "root", "password": ROOT_PW, "roles": ["root"]}),
                json!({"op": "user_add", "user": "alice", "password": ALICE_PW, "roles": []}),
            ] {
                let who = auth.check_admin(None, local).unwrap_or("(test)".into());
                auth.admin_command(who, local, cmd, &[7; scram::SALT_BYTES])
                    .unwrap();
            }
        }
        auth
    }

    /// The salt the server offers `user` in its first message.
    fn salt_offered(auth: &mut Auth, user: &str) -> String {
        let (_, first) = ClientExchange::start(user, "whatever", "cnonce", Channel::Plain);
        let hello = hello_with(&first);
        let server_first = auth
            .start(
                99,
                IpAddr::from([127, 0, 0, 1]),
                &hello.0.as_hello_with(&hello.1),
                "snonce",
                0,
                Channel::Plain,
            )
            .unwrap();
        auth.forget(99);
        server_first
            .split(',')
            .find_map(|f| f.strip_prefix("s="))
            .unwrap()
            .to_string()
    }

    fn hello_with(first: &str) -> (OwnedHello, Vec<u8>) {
        (
            OwnedHello {
                lease_ms: 10_000,
                end_on_disconnect: false,
                node_name: b"test".to_vec(),
                resume_session: 0,
                resume_secret: 0,
            },
            format!("{MECHANISM}{first}").into_bytes(),
        )
    }

    impl OwnedHello {
        fn as_hello_with<'a>(&'a self, credentials: &'a [u8]) -> Hello<'a> {
            Hello {
                credentials,
                ..self.as_hello()
            }
        }
    }

    /// HELLO on connection `conn`: the client's exchange, or the refusal.
    fn hello(
        auth: &mut Auth,
        conn: ConnId,
        user: &str,
        password: &str,
        addr: IpAddr,
        now_ms: u64,
    ) -> Result<(ClientExchange, String), Refusal> {
        let (client, first) = ClientExchange::start(user, password, "cnonce", Channel::Plain);
        let (h, creds) = hello_with(&first);
        let server_first = auth.start(
            conn,
            addr,
            &h.as_hello_with(&creds),
            "snonce",
            now_ms,
            Channel::Plain,
        )?;
        Ok((client, server_first))
    }

    /// AUTH on `conn` after [`hello`].
    fn auth_step(
        auth: &mut Auth,
        conn: ConnId,
        (client, server_first): (ClientExchange, String),
        addr: IpAddr,
        now_ms: u64,
    ) -> Result<String, Refusal> {
        let (_, client_final) = client.respond(&server_first, Channel::Plain).unwrap();
        auth.finish(conn, addr, client_final.as_bytes(), now_ms, Channel::Plain)
            .map(|(_, ident, _)| ident.user)
    }

    fn login(
        auth: &mut Auth,
        user: &str,
        password: &str,
        addr: IpAddr,
        now_ms: u64,
    ) -> Result<String, Refusal> {
        let started = hello(auth, 1, user, password, addr, now_ms)?;
        auth_step(auth, 1, started, addr, now_ms)
    }

    fn audit_events(dir: &Path) -> Vec<Value> {
        std::fs::read_to_string(dir.join("audit.log"))
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }

    #[test]
    fn a_password_typed_as_a_user_name_never_reaches_the_audit_log() {
        let dir = temp_dir("redact");
        let mut auth = secured(&dir, 1, LockoutConfig::default());
        let addr = IpAddr::from([192, 0, 2, 1]);
        let typo = "Tulip-Orbit-93";
        assert_eq!(
            login(&mut auth, typo, "", addr, 0).unwrap_err().0,
            ErrorCode::AuthFailed
        );
        // A known user's failure still names them.
        login(&mut auth, "alice", "Wrong-Guess-11", addr, 0).unwrap_err();
        let log = std::fs::read_to_string(dir.join("audit.log")).unwrap();
        assert!(!log.contains(typo), "{log}");
        let events = audit_events(&dir);
        let failed: Vec<&Value> = events
            .iter()
            .filter(|e| e["event"] == "login_failed")
            .collect();
        assert_eq!(failed.len(), 2, "{log}");
        assert_eq!(failed[0]["user"], Value::Null);
        assert_eq!(failed[0]["user_known"], false);
        let hash = failed[0]["user_hash"].as_str().unwrap().to_string();
        assert_eq!(hash.len(), AUDIT_USER_HASH_HEX);
        assert!(hash.chars().all(|c| c.is_ascii_hexdigit()));
        assert_eq!(failed[1]["user"], "alice");
        assert_eq!(failed[1]["user_known"], true);
        // The same name hashes alike after a restart (the key is kept), so repeated
        // attempts can be told apart from many names.
        drop(auth);
        let mut auth = secured(&dir, 2, LockoutConfig::default());
        login(&mut auth, typo, "", addr, 0).unwrap_err();
        login(&mut auth, "ghost", "", addr, 0).unwrap_err();
        let events = audit_events(&dir);
        let hashes: Vec<&str> = events
            .iter()
            .filter(|e| e["event"] == "login_failed" && e["user"].is_null())
            .map(|e| e["user_hash"].as_str().unwrap())
            .collect();
        assert_eq!(hashes.len(), 3);
        assert_eq!(hashes[0], hashes[1]);
        assert_ne!(hashes[0], hashes[2]);
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn an_unknown_name_shows_the_same_salt_after_a_restart() {
        let dir = temp_dir("salt");
        let mut first = secured(&dir, 1, LockoutConfig::default());
        let salt = salt_offered(&mut first, "nobody");
        assert_ne!(salt, salt_offered(&mut first, "somebody-else"));
        drop(first);
        // A restart brings fresh randomness; the salt stays, as a real user's would.
        let mut second = secured(&dir, 2, LockoutConfig::default());
        assert_eq!(salt_offered(&mut second, "nobody"), salt);
        // Without a data directory the randomness decides (nothing to keep it in).
        let mut a = Auth::load(AuthConfig::default(), [1; 32]).unwrap();
        let mut b = Auth::load(AuthConfig::default(), [2; 32]).unwrap();
        assert_ne!(
            salt_offered(&mut a, "nobody"),
            salt_offered(&mut b, "nobody")
        );
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn secrets_are_written_private_and_refused_when_they_are_not() {
        let dir = temp_dir("modes");
        let mut auth = secured(&dir, 1, LockoutConfig::default());
        for f in [AUTH_FILE, AUTH_KEY_FILE, "audit.log"] {
            assert_eq!(mode(&dir.join(f)), 0o600, "{f}");
        }
        // Rotated copies of the audit log are private too.
        auth.audit.as_mut().unwrap().bytes_max = 200;
        for _ in 0..20 {
            login(&mut auth, "ghost", "", IpAddr::from([192, 0, 2, 1]), 0).unwrap_err();
        }
        for f in ["audit.log", "audit.log.1", "audit.log.2"] {
            assert_eq!(mode(&dir.join(f)), 0o600, "{f}");
        }
        drop(auth);
        for f in [AUTH_FILE, AUTH_KEY_FILE] {
            let path = dir.join(f);
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
            let err = Auth::load(
                AuthConfig {
                    data_dir: Some(dir.clone()),
                    ..AuthConfig::default()
                },
                [0; 32],
            )
            .err()
            .expect("refused");
            assert_eq!(err.kind(), std::io::ErrorKind::PermissionDenied);
            assert_eq!(
                err.to_string(),
                format!(
                    "{0} is readable by group or others (mode 0644); run chmod 600 {0}",
                    path.display()
                )
            );
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        }
        let auth = secured(&dir, 1, LockoutConfig::default());
        assert!(auth.users.contains_key("alice"));
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn guesses_back_off_the_name_and_an_admin_unlocks_it() {
        let dir = temp_dir("unlock");
        let lockout = LockoutConfig {
            user_failures_max: 3,
            addr_failures_max: 6,
            ..LockoutConfig::default()
        };
        let mut auth = secured(&dir, 1, lockout);
        let (attacker, office) = (
            IpAddr::from([198, 51, 100, 9]),
            IpAddr::from([192, 0, 2, 1]),
        );
        for _ in 0..3 {
            login(&mut auth, "alice", "Wrong-Guess-11", attacker, 1_000).unwrap_err();
        }
        // The right password is refused during the back-off, and says for how long.
        let (code, msg) = login(&mut auth, "alice", ALICE_PW, office, 1_500).unwrap_err();
        assert_eq!(code, ErrorCode::AuthFailed);
        assert_eq!(
            msg,
            "too many failed logins for this user name: retry in 1 s"
        );
        // It ends on its own (1 s, not 15 minutes).
        assert_eq!(
            login(&mut auth, "alice", ALICE_PW, office, 2_000).unwrap(),
            "alice"
        );
        // Three more failures: alice backs off again, and the attacker's sixth failure
        // has its address refused.
        for _ in 0..3 {
            login(&mut auth, "alice", "Wrong-Guess-11", attacker, 2_000).unwrap_err();
        }
        assert!(login(
            &mut auth,
            "alice",
            ALICE_PW,
            IpAddr::from([203, 0, 113, 5]),
            2_001
        )
        .is_err());
        // The attacker's address is refused for everyone now.
        let (_, msg) = login(&mut auth, "root", ROOT_PW, attacker, 2_001).unwrap_err();
        assert!(msg.contains("from this address"), "{msg}");
        // An admin sees both and lifts both.
        let local = IpAddr::from([127, 0, 0, 1]);
        let listed: Value = serde_json::from_str(
            auth.admin_command(
                "root".into(),
                local,
                json!({"op": "lockout_list"}),
                &[0; 16],
            )
            .unwrap()
            .answer(),
        )
        .unwrap();
        let listed = listed.as_array().unwrap();
        assert!(listed
            .iter()
            .any(|e| e["user"] == "alice" && e["at"].is_null()));
        assert!(listed.iter().any(|e| e["addr"] == "198.51.100.9"));
        let answer = auth
            .admin_command(
                "root".into(),
                local,
                json!({"op": "user_unlock", "user": "alice"}),
                &[0; 16],
            )
            .unwrap();
        let answer = answer.answer();
        assert!(answer.contains("\"had_failures\":true"), "{answer}");
        assert_eq!(
            login(
                &mut auth,
                "alice",
                ALICE_PW,
                IpAddr::from([203, 0, 113, 5]),
                2_002
            )
            .unwrap(),
            "alice"
        );
        auth.admin_command(
            "root".into(),
            local,
            json!({"op": "addr_unlock", "addr": "198.51.100.9"}),
            &[0; 16],
        )
        .unwrap();
        assert_eq!(
            login(&mut auth, "root", ROOT_PW, attacker, 2_003).unwrap(),
            "root"
        );
        let bad = auth
            .admin_command(
                "root".into(),
                local,
                json!({"op": "addr_unlock", "addr": "nowhere"}),
                &[0; 16],
            )
            .unwrap_err();
        assert_eq!(bad.0, ErrorCode::InvalidArgument);
        // Unlocks are audited; they store nothing and need no admin of the store.
        let events = audit_events(&dir);
        assert!(events
            .iter()
            .any(|e| e["event"] == "admin" && e["op"] == "user_unlock" && e["target"] == "alice"));
        assert!(events.iter().any(|e| e["event"] == "lockout"
            && e["kind"] == "user_backoff"
            && e["user"] == "alice"));
        assert!(events
            .iter()
            .any(|e| e["event"] == "lockout" && e["kind"] == "addr_refused"));
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn unlocking_needs_the_admin_permission_and_a_running_server() {
        let dir = temp_dir("unlock-perm");
        let auth_cfg = || AuthConfig {
            data_dir: Some(dir.clone()),
            ..AuthConfig::default()
        };
        let mut auth = secured(&dir, 1, LockoutConfig::default());
        let nobody = Access::of(std::iter::empty());
        let err = auth
            .admin(
                Some(("alice", &nobody)),
                IpAddr::from([127, 0, 0, 1]),
                br#"{"op":"user_unlock","user":"alice"}"#,
                &[0; 16],
            )
            .unwrap_err();
        assert_eq!(err.0, ErrorCode::PermissionDenied);
        drop(auth);
        let err = admin_offline(auth_cfg(), br#"{"op":"user_unlock","user":"alice"}"#).unwrap_err();
        assert!(err.contains("running server"), "{err}");
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn attempts_in_flight_together_are_held_to_the_back_off_too() {
        let dir = temp_dir("parallel");
        let lockout = LockoutConfig {
            user_failures_max: 3,
            ..LockoutConfig::default()
        };
        let mut auth = secured(&dir, 1, lockout);
        let addr = IpAddr::from([198, 51, 100, 9]);
        // Ten HELLOs at once all pass the check...
        let started: Vec<_> = (0..10)
            .map(|c| hello(&mut auth, 100 + c, "alice", "Wrong-Guess-11", addr, 0).unwrap())
            .collect();
        // ...but only three proofs are checked: the back-off began with the third.
        for (c, s) in started.into_iter().enumerate() {
            auth_step(&mut auth, 100 + c as u64, s, addr, 0).unwrap_err();
        }
        let events = audit_events(&dir);
        let count = |kind: &str| events.iter().filter(|e| e["event"] == kind).count();
        assert_eq!(count("login_failed"), 3);
        assert_eq!(count("login_refused_locked"), 7);
        let _ = std::fs::remove_dir_all(dir);
    }

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
