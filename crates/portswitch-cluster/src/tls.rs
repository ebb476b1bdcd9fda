//! Mutual TLS between members (rustls, ring provider). Every member presents its
//! certificate both when it connects and when it accepts, and accepts only peers whose
//! certificate chains to the peer CA — the model of etcd's `--peer-trusted-ca-file`
//! with client certificate authentication. Use a CA for peers alone: anyone holding a
//! certificate from it can speak Raft to the group.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::server::WebPkiClientVerifier;
use rustls_pki_types::ServerName;
use tokio_rustls::{TlsAcceptor, TlsConnector};

/// Where a member's peer TLS material is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerTlsSettings {
    /// PEM certificate chain of this member, valid for its peer address (an IP
    /// address SAN for a numeric address) and for both server and client use.
    pub cert: PathBuf,
    /// PEM private key of `cert`.
    pub key: PathBuf,
    /// PEM CA that signed every member's certificate.
    pub ca: PathBuf,
}

/// Ready-made TLS configurations for both directions of peer links.
#[derive(Clone)]
pub struct PeerTls {
    pub(crate) connector: TlsConnector,
    pub(crate) acceptor: TlsAcceptor,
}

impl std::fmt::Debug for PeerTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PeerTls")
    }
}

fn bad(what: &str, path: &Path, e: impl std::fmt::Display) -> std::io::Error {
    std::io::Error::new(
        std::io::ErrorKind::InvalidInput,
        format!("peer TLS {what} {}: {e}", path.display()),
    )
}

/// Says which setting a file error is about (the error names the file).
fn file(what: &str) -> impl Fn(portswitch_files::FileError) -> std::io::Error + '_ {
    move |e| {
        let e = std::io::Error::from(e);
        std::io::Error::new(e.kind(), format!("peer TLS {what}: {e}"))
    }
}

impl PeerTls {
    /// Loads the files, failing with the one at fault.
    pub fn load(s: &PeerTlsSettings) -> std::io::Result<PeerTls> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let certs = portswitch_files::load_certs(&s.cert).map_err(file("certificate"))?;
        let key = portswitch_files::load_key(&s.key).map_err(file("key"))?;
        let mut roots = rustls::RootCertStore::empty();
        for c in portswitch_files::load_roots(&s.ca).map_err(file("CA"))? {
            roots.add(c).map_err(|e| bad("CA", &s.ca, e))?;
        }
        let roots = Arc::new(roots);
        let verifier = WebPkiClientVerifier::builder_with_provider(roots.clone(), provider.clone())
            .build()
            .map_err(|e| bad("CA", &s.ca, e))?;
        let server = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(std::io::Error::other)?
            .with_client_cert_verifier(verifier)
            .with_single_cert(certs.clone(), key.clone_key())
            .map_err(|e| bad("certificate/key", &s.cert, e))?;
        let client = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(std::io::Error::other)?
            .with_root_certificates(roots)
            .with_client_auth_cert(certs, key)
            .map_err(|e| bad("certificate/key", &s.cert, e))?;
        Ok(PeerTls {
            connector: TlsConnector::from(Arc::new(client)),
            acceptor: TlsAcceptor::from(Arc::new(server)),
        })
    }
}

/// The name to verify a peer's certificate against: the host part of its address.
pub(crate) fn server_name(addr: &str) -> std::io::Result<ServerName<'static>> {
    let host = match addr.parse::<std::net::SocketAddr>() {
        Ok(sa) => return Ok(ServerName::IpAddress(sa.ip().into())),
        Err(_) => addr.rsplit_once(':').map_or(addr, |(h, _)| h),
    };
    ServerName::try_from(host.trim_matches(['[', ']']).to_string()).map_err(|e| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("peer address {addr}: {e}"),
        )
    })
}
