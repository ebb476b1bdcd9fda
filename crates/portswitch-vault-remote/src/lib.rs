//! Vault backups on another node.
//!
//! `portswitch vault backup-serve` runs a [`Server`]: it keeps backups of any number of
//! vaults under one root directory (`<root>/<vault id hex>/`), each a directory the
//! vault's own code writes and checks ([`portswitch_vault::target::DirTarget`]). A vault
//! ships to it through a [`RemoteTarget`], the same [`BackupTarget`] operations as a
//! local backup, forwarded over a channel that both sides open with a pre-shared key
//! (Noise NNpsk0: see [`wire`]). The server only ever holds ciphertext (segments and
//! the sealed header): it needs no passphrase and learns none. Every shipped range is
//! verified by SHA-256 computed by the server over what it stored. [`pull`] brings a
//! backup back to a local directory, verified the same way.
//!
//! A vault can also name the server as a copy to repair damaged records from
//! (`Vault::set_remote_copy`): a record the mirror and the parity cannot restore is
//! read from the backup (same bytes at the same place) and trusted only once its
//! seal opens.
//!
//! Requests are one byte of operation then fixed little-endian fields; answers are a
//! status byte (0 ok, 1 error followed by the message) then the result.

pub mod wire;

use std::net::{SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use std::sync::Arc;
use std::time::Duration;

use portswitch_vault::format::VAULT_ID_BYTES;
use portswitch_vault::target::{
    BackupTarget, DirTarget, TargetEntry, TargetFile, TARGET_IO_BYTES_MAX,
};
use portswitch_vault::VaultError;

use wire::Channel;

/// Connections a server serves at once; more are closed at once.
pub const CONNECTIONS_MAX: usize = 64;
/// Of those, connections still in their handshake (peers not yet proven to hold the
/// key): a flood of unauthenticated connections cannot take every slot.
pub const HANDSHAKES_MAX: usize = 16;
/// A handshake must finish within this (a deadline, not a per-read timeout).
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// A connection idle (or a peer silent mid-message) this long is closed.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(120);
/// Bytes of the pre-shared key (a key file holds them as 64 hex digits).
pub const KEY_BYTES: usize = 32;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
    #[error("handshake failed: {0}")]
    Handshake(String),
    #[error("a frame failed authentication: the channel was tampered with")]
    Tampered,
    #[error("protocol violation: {0}")]
    Protocol(&'static str),
    #[error("message of {0} bytes is over the limit")]
    TooLarge(usize),
    #[error("the server answered: {0}")]
    Remote(String),
    #[error("key: {0}")]
    Key(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl From<Error> for VaultError {
    fn from(e: Error) -> VaultError {
        match e {
            Error::Io(e) => VaultError::Io(e),
            e => VaultError::Io(std::io::Error::other(format!("remote backup: {e}"))),
        }
    }
}

/// The pre-shared key both sides hold.
#[derive(Clone)]
pub struct Key(pub [u8; KEY_BYTES]);

impl std::fmt::Debug for Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Key(..)")
    }
}

impl Key {
    pub fn generate() -> Key {
        let mut k = [0u8; KEY_BYTES];
        ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut k)
            .expect("the OS random source failed");
        Key(k)
    }

    pub fn to_hex(&self) -> String {
        hex(&self.0)
    }

    pub fn from_hex(s: &str) -> Result<Key> {
        let s = s.trim();
        if s.len() != 2 * KEY_BYTES || !s.is_ascii() {
            return Err(Error::Key(format!(
                "expected {} hex digits, found {} characters",
                2 * KEY_BYTES,
                s.chars().count()
            )));
        }
        let mut k = [0u8; KEY_BYTES];
        for (i, b) in k.iter_mut().enumerate() {
            *b = u8::from_str_radix(&s[2 * i..2 * i + 2], 16)
                .map_err(|_| Error::Key("not hexadecimal".into()))?;
        }
        Ok(Key(k))
    }

    pub fn read_file(path: &Path) -> Result<Key> {
        let s = std::fs::read_to_string(path)
            .map_err(|e| Error::Key(format!("{}: {e}", path.display())))?;
        Key::from_hex(&s)
    }
}

pub fn hex(b: &[u8]) -> String {
    b.iter().map(|b| format!("{b:02x}")).collect()
}

/// Parses a vault id written as 32 hex digits.
pub fn parse_vault_id(s: &str) -> Result<[u8; VAULT_ID_BYTES]> {
    let s = s.trim();
    if s.len() != 2 * VAULT_ID_BYTES || !s.is_ascii() {
        return Err(Error::Key(format!(
            "a vault id is {} hex digits",
            2 * VAULT_ID_BYTES
        )));
    }
    let mut id = [0u8; VAULT_ID_BYTES];
    for (i, b) in id.iter_mut().enumerate() {
        *b = u8::from_str_radix(&s[2 * i..2 * i + 2], 16)
            .map_err(|_| Error::Key("vault id: not hexadecimal".into()))?;
    }
    Ok(id)
}

mod op {
    pub const BEGIN: u8 = 1;
    pub const END: u8 = 2;
    pub const FENCE: u8 = 3;
    pub const SET_FENCE: u8 = 4;
    pub const HEADER: u8 = 5;
    pub const SET_HEADER: u8 = 6;
    pub const LIST: u8 = 7;
    pub const HASH: u8 = 8;
    pub const WRITE: u8 = 9;
    pub const READ: u8 = 10;
    pub const SET_LEN: u8 = 11;
    pub const SYNC: u8 = 12;
    pub const REMOVE: u8 = 13;
    pub const SYNC_DIR: u8 = 14;
    pub const BEGIN_READ: u8 = 15;
}

fn put_file(out: &mut Vec<u8>, f: TargetFile) {
    let (kind, id) = match f {
        TargetFile::Segment(id) => (0u8, id),
        TargetFile::Parity(id) => (1u8, id),
    };
    out.push(kind);
    out.extend_from_slice(&id.to_le_bytes());
}

/// Reads fields of a request or answer, refusing short input.
struct Cursor<'a>(&'a [u8]);

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        if self.0.len() < n {
            return Err(Error::Protocol("short message"));
        }
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        Ok(a)
    }
    fn u8(&mut self) -> Result<u8> {
        Ok(self.take(1)?[0])
    }
    fn u32(&mut self) -> Result<u32> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into().expect("4")))
    }
    fn u64(&mut self) -> Result<u64> {
        Ok(u64::from_le_bytes(self.take(8)?.try_into().expect("8")))
    }
    fn file(&mut self) -> Result<TargetFile> {
        let kind = self.u8()?;
        let id = self.u32()?;
        match kind {
            0 => Ok(TargetFile::Segment(id)),
            1 => Ok(TargetFile::Parity(id)),
            _ => Err(Error::Protocol("unknown file kind")),
        }
    }
    fn rest(&mut self) -> &'a [u8] {
        std::mem::take(&mut self.0)
    }
}

// ---- client ---------------------------------------------------------------------------

/// Finds the addresses (`host:port`) of backup servers when a connection is dialled:
/// e.g. from the port switch, where servers register (`vault backup-serve --switch`).
pub type Resolver = Box<dyn Fn() -> std::io::Result<Vec<String>> + Send>;

/// A backup server as a [`BackupTarget`]. Connects on [`BackupTarget::begin`] (and
/// again there after a broken connection), to a fixed address or to the first server
/// a [`Resolver`] names that answers.
pub struct RemoteTarget {
    addr: String,
    resolver: Option<Resolver>,
    key: Key,
    conn: Option<Channel>,
}

impl RemoteTarget {
    pub fn new(addr: impl Into<String>, key: Key) -> RemoteTarget {
        RemoteTarget {
            addr: addr.into(),
            resolver: None,
            key,
            conn: None,
        }
    }

    /// Servers found by `resolver` at each dial; `what` names them in messages.
    pub fn discovered(what: impl Into<String>, resolver: Resolver, key: Key) -> RemoteTarget {
        RemoteTarget {
            addr: what.into(),
            resolver: Some(resolver),
            key,
            conn: None,
        }
    }

    fn dial(&self) -> Result<Channel> {
        let names = match &self.resolver {
            Some(r) => r()?,
            None => vec![self.addr.clone()],
        };
        if names.is_empty() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::NotFound,
                format!("{}: no backup server registered", self.addr),
            )
            .into());
        }
        let mut addrs: Vec<SocketAddr> = Vec::new();
        for n in &names {
            match n.to_socket_addrs() {
                Ok(a) => addrs.extend(a),
                Err(e) => tracing::warn!(server = %n, error = %e, "backup server address"),
            }
        }
        let mut last = None;
        for a in addrs {
            match TcpStream::connect_timeout(&a, HANDSHAKE_TIMEOUT) {
                Ok(s) => {
                    let c = s
                        .set_nodelay(true)
                        .and_then(|()| s.set_read_timeout(Some(HANDSHAKE_TIMEOUT)))
                        .and_then(|()| s.set_write_timeout(Some(IDLE_TIMEOUT)))
                        .map_err(Error::from)
                        .and_then(|()| Channel::connect(s, &self.key))
                        .and_then(|c| {
                            c.stream().set_read_timeout(Some(IDLE_TIMEOUT))?;
                            Ok(c)
                        });
                    match c {
                        Ok(c) => return Ok(c),
                        // Another registered server may answer (this one may be full,
                        // stale, or not hold the key).
                        Err(e) => {
                            tracing::warn!(server = %a, error = %e, "backup server");
                            last = Some(e);
                        }
                    }
                }
                Err(e) => last = Some(e.into()),
            }
        }
        Err(last
            .unwrap_or_else(|| std::io::Error::other(format!("{}: no address", self.addr)).into()))
    }

    /// Sends a request and returns the answer's body; a broken channel is dropped.
    fn call(&mut self, req: &[u8]) -> Result<Vec<u8>> {
        let c = self
            .conn
            .as_mut()
            .ok_or(Error::Protocol("backup target used before begin"))?;
        let ans = match c.send(req).and_then(|()| c.recv()) {
            Ok(a) => a,
            Err(e) => {
                self.conn = None;
                return Err(e);
            }
        };
        match ans.split_first() {
            Some((0, rest)) => Ok(rest.to_vec()),
            Some((1, msg)) => Err(Error::Remote(String::from_utf8_lossy(msg).into_owned())),
            _ => {
                self.conn = None;
                Err(Error::Protocol("bad answer"))
            }
        }
    }

    /// `BEGIN` or `BEGIN_READ` for `vault_id`, over the open connection or, if there is
    /// none or the server closed it meanwhile (idle), a new one.
    fn start(&mut self, code: u8, vault_id: &[u8; VAULT_ID_BYTES]) -> VResult<()> {
        let mut req = vec![code];
        req.extend_from_slice(vault_id);
        if self.conn.is_some() {
            match self.call(&req) {
                Ok(_) => return Ok(()),
                Err(Error::Io(_)) | Err(Error::Tampered) | Err(Error::Protocol(_)) => {}
                Err(e) => return Err(e.into()),
            }
        }
        self.conn = Some(self.dial()?);
        self.call(&req)?;
        Ok(())
    }

    fn simple(&mut self, code: u8, f: Option<TargetFile>, nums: &[u64]) -> Result<Vec<u8>> {
        let mut req = vec![code];
        if let Some(f) = f {
            put_file(&mut req, f);
        }
        for n in nums {
            req.extend_from_slice(&n.to_le_bytes());
        }
        self.call(&req)
    }
}

type VResult<T> = portswitch_vault::Result<T>;

impl BackupTarget for RemoteTarget {
    fn describe(&self) -> String {
        format!("backup server {}", self.addr)
    }

    fn begin(&mut self, vault_id: &[u8; VAULT_ID_BYTES]) -> VResult<()> {
        self.start(op::BEGIN, vault_id)
    }

    fn begin_read(&mut self, vault_id: &[u8; VAULT_ID_BYTES]) -> VResult<()> {
        self.start(op::BEGIN_READ, vault_id)
    }

    fn end(&mut self) {
        if self.conn.is_some() {
            let _ = self.call(&[op::END]);
        }
    }

    fn fence(&mut self) -> VResult<u64> {
        let a = self.simple(op::FENCE, None, &[])?;
        Ok(Cursor(&a).u64()?)
    }

    fn set_fence(&mut self, token: u64) -> VResult<()> {
        self.simple(op::SET_FENCE, None, &[token])?;
        Ok(())
    }

    fn header(&mut self) -> VResult<Option<Vec<u8>>> {
        let a = self.simple(op::HEADER, None, &[])?;
        let mut c = Cursor(&a);
        Ok(match c.u8()? {
            0 => None,
            _ => Some(c.rest().to_vec()),
        })
    }

    fn set_header(&mut self, bytes: &[u8]) -> VResult<()> {
        let mut req = vec![op::SET_HEADER];
        req.extend_from_slice(bytes);
        self.call(&req)?;
        Ok(())
    }

    fn list(&mut self) -> VResult<Vec<TargetEntry>> {
        let a = self.simple(op::LIST, None, &[])?;
        let mut c = Cursor(&a);
        let n = c.u32()? as usize;
        let mut out = Vec::with_capacity(n.min(1 << 16));
        for _ in 0..n {
            let id = c.u32()?;
            let segment_len = c.u64()?;
            let p = c.u64()?;
            out.push(TargetEntry {
                id,
                segment_len,
                parity_len: (p != u64::MAX).then_some(p),
            });
        }
        Ok(out)
    }

    fn hash(&mut self, f: TargetFile, from: u64, to: u64) -> VResult<[u8; 32]> {
        let a = self.simple(op::HASH, Some(f), &[from, to])?;
        Ok(Cursor(&a).take(32)?.try_into().expect("32"))
    }

    fn write(&mut self, f: TargetFile, off: u64, bytes: &[u8]) -> VResult<()> {
        if bytes.len() > TARGET_IO_BYTES_MAX {
            return Err(VaultError::TooLarge {
                what: "backup write",
                limit: TARGET_IO_BYTES_MAX as u64,
            });
        }
        let mut req = Vec::with_capacity(14 + bytes.len());
        req.push(op::WRITE);
        put_file(&mut req, f);
        req.extend_from_slice(&off.to_le_bytes());
        req.extend_from_slice(bytes);
        self.call(&req)?;
        Ok(())
    }

    fn read(&mut self, f: TargetFile, off: u64, len: usize) -> VResult<Vec<u8>> {
        let a = self.simple(op::READ, Some(f), &[off, len as u64])?;
        if a.len() != len {
            return Err(Error::Protocol("read answered the wrong length").into());
        }
        Ok(a)
    }

    fn set_len(&mut self, f: TargetFile, len: u64) -> VResult<()> {
        self.simple(op::SET_LEN, Some(f), &[len])?;
        Ok(())
    }

    fn sync(&mut self, f: TargetFile) -> VResult<()> {
        self.simple(op::SYNC, Some(f), &[])?;
        Ok(())
    }

    fn remove(&mut self, id: u32) -> VResult<()> {
        let mut req = vec![op::REMOVE];
        req.extend_from_slice(&id.to_le_bytes());
        self.call(&req)?;
        Ok(())
    }

    fn sync_dir(&mut self) -> VResult<()> {
        self.simple(op::SYNC_DIR, None, &[])?;
        Ok(())
    }
}

/// Copies the backup of `vault_id` held by the server at `addr` into the local
/// directory `to` (verified by hash), which can then be opened like the vault.
pub fn pull(addr: &str, key: &Key, vault_id: &[u8; VAULT_ID_BYTES], to: &Path) -> VResult<u64> {
    pull_from(RemoteTarget::new(addr, key.clone()), vault_id, to)
}

/// [`pull`] from any server target (one found through a [`Resolver`], say).
pub fn pull_from(mut t: RemoteTarget, vault_id: &[u8; VAULT_ID_BYTES], to: &Path) -> VResult<u64> {
    let r = portswitch_vault::target::pull(&mut t, vault_id, to);
    t.end();
    r
}

// ---- server ---------------------------------------------------------------------------

/// Counters a server keeps (Prometheus metrics: [`ServerStats::register`]). Cheap to
/// clone (the counters are shared).
#[derive(Default, Debug, Clone)]
pub struct ServerStats {
    pub connections: Gauge,
    /// Connections still in their handshake.
    pub handshakes: Gauge,
    pub connections_total: Counter,
    /// Connections closed at once because `CONNECTIONS_MAX` were open.
    pub refused_total: Counter,
    /// Peers that did not prove the key (or spoke garbage) in the handshake.
    pub handshake_failures_total: Counter,
    pub bytes_written_total: Counter,
    pub bytes_read_total: Counter,
    /// Requests answered with an error.
    pub errors_total: Counter,
}

impl ServerStats {
    /// Registers every counter (prefix it with `vault_backup_server` at the caller).
    pub fn register(&self, r: &mut Registry) {
        r.register(
            "connections_open",
            "connections open",
            self.connections.clone(),
        );
        r.register(
            "handshakes_open",
            "connections still in their handshake",
            self.handshakes.clone(),
        );
        r.register(
            "connections_accepted",
            "connections accepted",
            self.connections_total.clone(),
        );
        r.register(
            "refused",
            "connections closed at once at the connection limit",
            self.refused_total.clone(),
        );
        r.register(
            "handshake_failures",
            "peers that did not prove the key",
            self.handshake_failures_total.clone(),
        );
        r.register(
            "written_bytes",
            "backup bytes stored",
            self.bytes_written_total.clone(),
        );
        r.register(
            "read_bytes",
            "backup bytes read (pulls, repairs)",
            self.bytes_read_total.clone(),
        );
        r.register(
            "errors",
            "requests answered with an error",
            self.errors_total.clone(),
        );
    }
}

/// A backup server: backups of many vaults under `root`.
pub struct Server {
    listener: TcpListener,
    root: PathBuf,
    key: Key,
    stop: Arc<AtomicBool>,
    pub stats: ServerStats,
}

impl Server {
    pub fn bind(addr: &str, root: impl Into<PathBuf>, key: Key) -> Result<Server> {
        let root = root.into();
        std::fs::create_dir_all(&root)?;
        Ok(Server {
            listener: TcpListener::bind(addr)?,
            root,
            key,
            stop: Arc::default(),
            stats: ServerStats::default(),
        })
    }

    pub fn local_addr(&self) -> Result<SocketAddr> {
        Ok(self.listener.local_addr()?)
    }

    /// A flag that makes [`Server::run`] return (checked on each accept).
    pub fn stopper(&self) -> Arc<AtomicBool> {
        self.stop.clone()
    }

    /// Accepts and serves connections (a thread each, at most [`CONNECTIONS_MAX`])
    /// until stopped.
    pub fn run(&self) -> Result<()> {
        for conn in self.listener.incoming() {
            if self.stop.load(Ordering::Acquire) {
                return Ok(());
            }
            let stream = match conn {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!(error = %e, "backup server: accept failed");
                    std::thread::sleep(Duration::from_millis(50));
                    continue;
                }
            };
            let stats = self.stats.clone();
            stats.connections_total.inc();
            if stats.connections.inc() >= CONNECTIONS_MAX as i64 {
                stats.connections.dec();
                stats.refused_total.inc();
                tracing::warn!("backup server: {CONNECTIONS_MAX} connections already; closing one");
                continue;
            }
            let (root, key) = (self.root.clone(), self.key.clone());
            let spawned = std::thread::Builder::new()
                .name("vault-backup-conn".into())
                .spawn(move || {
                    let peer = stream.peer_addr().ok();
                    if let Err(e) = serve(stream, &root, &key, &stats) {
                        tracing::info!(?peer, error = %e, "backup server: connection ended");
                    }
                    stats.connections.dec();
                });
            if spawned.is_err() {
                self.stats.connections.dec();
            }
        }
        Ok(())
    }
}

fn serve(stream: TcpStream, root: &Path, key: &Key, stats: &ServerStats) -> Result<()> {
    stream.set_nodelay(true)?;
    stream.set_write_timeout(Some(HANDSHAKE_TIMEOUT))?;
    if stats.handshakes.inc() >= HANDSHAKES_MAX as i64 {
        stats.handshakes.dec();
        stats.refused_total.inc();
        return Err(Error::Handshake(format!(
            "{HANDSHAKES_MAX} handshakes under way already"
        )));
    }
    let accepted = Channel::accept(stream, key, HANDSHAKE_TIMEOUT);
    stats.handshakes.dec();
    let mut ch = match accepted {
        Ok(c) => c,
        Err(e) => {
            stats.handshake_failures_total.inc();
            return Err(e);
        }
    };
    ch.stream().set_write_timeout(Some(IDLE_TIMEOUT))?;
    ch.stream().set_read_timeout(Some(IDLE_TIMEOUT))?;
    let mut target: Option<(DirTarget, [u8; VAULT_ID_BYTES])> = None;
    loop {
        let req = match ch.recv() {
            Ok(r) => r,
            // The client went away.
            Err(Error::Io(e)) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(()),
            Err(e) => return Err(e),
        };
        let answer = match handle(&req, root, &mut target, stats) {
            Ok(mut body) => {
                body.insert(0, 0);
                body
            }
            Err(HandleError::Protocol(e)) => return Err(e),
            Err(HandleError::Vault(e)) => {
                stats.errors_total.inc();
                let mut b = vec![1u8];
                b.extend_from_slice(e.to_string().as_bytes());
                b
            }
        };
        ch.send(&answer)?;
    }
}

enum HandleError {
    /// Ends the connection.
    Protocol(Error),
    /// Answered, and the connection goes on.
    Vault(VaultError),
}

impl From<VaultError> for HandleError {
    fn from(e: VaultError) -> HandleError {
        HandleError::Vault(e)
    }
}

impl From<Error> for HandleError {
    fn from(e: Error) -> HandleError {
        HandleError::Protocol(e)
    }
}

fn handle(
    req: &[u8],
    root: &Path,
    target: &mut Option<(DirTarget, [u8; VAULT_ID_BYTES])>,
    stats: &ServerStats,
) -> Result<Vec<u8>, HandleError> {
    let mut c = Cursor(req);
    let code = c.u8()?;
    if code == op::BEGIN || code == op::BEGIN_READ {
        let id: [u8; VAULT_ID_BYTES] = c.take(VAULT_ID_BYTES)?.try_into().expect("16");
        // Release this connection's previous lock before taking one again.
        if let Some((mut t, _)) = target.take() {
            t.end();
        }
        let mut t = DirTarget::new(root.join(hex(&id)));
        if code == op::BEGIN {
            t.begin(&id)?;
        } else {
            t.begin_read(&id)?;
        }
        *target = Some((t, id));
        return Ok(Vec::new());
    }
    if code == op::END {
        if let Some((mut t, _)) = target.take() {
            t.end();
        }
        return Ok(Vec::new());
    }
    let (t, id) = target
        .as_mut()
        .ok_or(HandleError::Protocol(Error::Protocol(
            "no vault chosen yet",
        )))?;
    let mut out = Vec::new();
    match code {
        op::FENCE => out.extend_from_slice(&t.fence()?.to_le_bytes()),
        op::SET_FENCE => t.set_fence(c.u64()?)?,
        op::HEADER => match t.header()? {
            Some(h) => {
                out.push(1);
                out.extend_from_slice(&h);
            }
            None => out.push(0),
        },
        op::SET_HEADER => {
            let h = c.rest();
            // Only a header of the vault this connection began with.
            let (clear, _) = portswitch_vault::format::HeaderClear::decode(h)?;
            if clear.vault_id != *id {
                return Err(HandleError::Vault(VaultError::Invalid(
                    "a header of another vault",
                )));
            }
            t.set_header(h)?
        }
        op::LIST => {
            let l = t.list()?;
            out.extend_from_slice(&(l.len() as u32).to_le_bytes());
            for e in l {
                out.extend_from_slice(&e.id.to_le_bytes());
                out.extend_from_slice(&e.segment_len.to_le_bytes());
                out.extend_from_slice(&e.parity_len.unwrap_or(u64::MAX).to_le_bytes());
            }
        }
        op::HASH => {
            let f = c.file()?;
            let (from, to) = (c.u64()?, c.u64()?);
            if from > to {
                return Err(HandleError::Vault(VaultError::Invalid(
                    "hash range reversed",
                )));
            }
            out.extend_from_slice(&t.hash(f, from, to)?);
        }
        op::WRITE => {
            let f = c.file()?;
            let off = c.u64()?;
            let bytes = c.rest();
            t.write(f, off, bytes)?;
            stats.bytes_written_total.inc_by(bytes.len() as u64);
        }
        op::READ => {
            let f = c.file()?;
            let (off, len) = (c.u64()?, c.u64()?);
            if len > TARGET_IO_BYTES_MAX as u64 {
                return Err(HandleError::Vault(VaultError::TooLarge {
                    what: "backup read",
                    limit: TARGET_IO_BYTES_MAX as u64,
                }));
            }
            out = t.read(f, off, len as usize)?;
            stats.bytes_read_total.inc_by(len);
        }
        op::SET_LEN => {
            let f = c.file()?;
            t.set_len(f, c.u64()?)?
        }
        op::SYNC => t.sync(c.file()?)?,
        op::REMOVE => t.remove(c.u32()?)?,
        op::SYNC_DIR => t.sync_dir()?,
        _ => return Err(HandleError::Protocol(Error::Protocol("unknown operation"))),
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Malformed and hostile requests get an error (or end the connection), never a
    /// panic, and nothing outside the root is touched.
    #[test]
    fn hostile_requests_are_refused_without_panics() {
        let root = std::env::temp_dir().join(format!(
            "psvremote-unit-{}-{}",
            std::process::id(),
            fastrand::u64(..)
        ));
        std::fs::create_dir_all(&root).unwrap();
        let stats = ServerStats::default();
        let mut rng = fastrand::Rng::with_seed(7);
        let mut target = None;
        for i in 0..5_000 {
            let len = rng.usize(0..48);
            let mut req: Vec<u8> = (0..len).map(|_| rng.u8(..)).collect();
            if let Some(b) = req.first_mut() {
                *b = rng.u8(0..17);
            }
            // Now and then a valid BEGIN, so later requests reach a target.
            if i % 500 == 0 {
                req = vec![op::BEGIN];
                req.extend_from_slice(&[i as u8; VAULT_ID_BYTES]);
            }
            let _ = handle(&req, &root, &mut target, &stats);
        }
        // Every directory made is a vault id's, under the root.
        for e in std::fs::read_dir(&root).unwrap() {
            let name = e.unwrap().file_name().into_string().unwrap();
            assert_eq!(name.len(), 2 * VAULT_ID_BYTES, "{name}");
        }
        let _ = std::fs::remove_dir_all(&root);
    }
}
